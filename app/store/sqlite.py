"""The embedded store: one SQLite file in WAL mode, one writer per process with group commit.

In an HTTP process every operation runs on a writer thread. The thread takes whatever has queued up (up to
`MAX_GROUP` operations) and commits them in one transaction: one fsync serves many concurrent requests, and the
event loop never blocks on the disk. In a delivery process (`durable=False`) they run on the event loop itself
(`_LoopWriter`): what queued up meanwhile, in one transaction, its statements run without a pause once the write
lock is held (no fsync to wait for there), while waiting for the lock is an await. A caller learns success only
after COMMIT returns; if the group fails, each operation is redone in a transaction of its own, so only a failing
one fails.

The HTTP process and the delivery processes of `segrelay serve` share the file: SQLite serialises their writers
(a writer retries BEGIN itself rather than through SQLite's busy handler, whose sleeps grow to 100 ms and would show
as long tails: the HTTP side every half millisecond, delivery in pauses growing to 4 ms, `_pauses`), and the HTTP
processes go first: while one waits for the lock it says so in its byte of a small file beside the database
(`<name>-priority`); delivery processes do not begin meanwhile, and another HTTP process that has just committed
lets it have the next turn.
The HTTP process commits with synchronous=FULL (an accepted event survives power loss); the delivery processes may
use NORMAL, since losing their last completions to a power cut only means sending them again.
Ids are AUTOINCREMENT, never reused: a late answer for a job, or a cached event, can never meet a newer one.
Every query is served by an index: due jobs per vendor, leased jobs, dead letters, expired idempotency records, an
event's jobs; an event goes with its last job; counts come from the `counters` table, kept in the same transactions.
What is written for a delivered postback lands next to the previous one: its outcome is keyed by its event's id
(increasing), and the event's row is written once more only when it goes. A message's event is found through its
idempotency record (`segrelay trace`).
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import queue
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from app.deadlines import within
from app.keys import KeyRecord
from app.store import (
    ALL_TENANTS,
    MAX_IDENTITIES,
    Counts,
    DeadLetter,
    Identity,
    Job,
    NewJob,
    Outcome,
    QueueStats,
    StoreError,
    StoreUnavailableError,
    VendorStats,
)
from app.store.accept_writer import AcceptWriterClient
from handlers import VENDORS

T = TypeVar("T")
MAX_GROUP = 512  # operations per transaction for the HTTP process (accepts: one fsync serves them all)
MAX_GROUP_UNDURABLE = 64  # for a delivery process: short transactions, so accepts never wait long for the lock
LOCK_TIMEOUT = 30.0  # seconds a write waits for another process's lock before it fails (503)
LOCK_POLL = 0.0005  # seconds between attempts at the write lock: the HTTP side's, and delivery's first
LOCK_POLL_MAX = 0.004  # delivery's longest, its pauses doubling from LOCK_POLL (`_pauses`)
GIVE_WAY_SECONDS = 0.05  # how long a delivery process lets the HTTP processes go first, at most, per transaction
TURN_SECONDS = 0.02  # how long an HTTP process lets another waiting HTTP process have its turn, at most
PRIORITY_SLOTS = 64  # HTTP processes that can share one database file (each says it waits in its own byte)
DELIVERY_SLOTS = 64  # ... and delivery processes, in the bytes after those
CHUNK = 500  # rows per statement where lease and complete name many rows at once
# Expired rows of one kind deleted per transaction (delivery calls housekeeping every second): each holds the write
# lock that accepts wait for, 0.8 ms at the median for 500 rows (2,000 took 2.8 ms, up to 11.7).
HOUSEKEEPING_BATCH = 500
HOUSEKEEPING_ROUNDS = 64  # ... and transactions of one kind per call, at most: 32,000 rows a second per table

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, digest TEXT NOT NULL, created_at REAL NOT NULL,
    expires_at REAL, vendors TEXT NOT NULL DEFAULT '', revoked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS seen (
    tenant TEXT NOT NULL, message_id TEXT NOT NULL, expires_at REAL NOT NULL, event_id INTEGER,
    PRIMARY KEY (tenant, message_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_expiry ON seen (expires_at);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL, message_id TEXT NOT NULL, payload BLOB NOT NULL,
    jobs INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, event_id INTEGER NOT NULL, vendor TEXT NOT NULL, target TEXT NOT NULL,
    tenant TEXT NOT NULL, event_name TEXT NOT NULL, batch_key TEXT NOT NULL, size INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, due_at REAL NOT NULL,
    leased INTEGER NOT NULL DEFAULT 0, dead INTEGER NOT NULL DEFAULT 0,
    last_status INTEGER, last_body TEXT NOT NULL DEFAULT '', died_at REAL);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (vendor, due_at) WHERE dead = 0;
CREATE INDEX IF NOT EXISTS jobs_leased ON jobs (leased) WHERE leased = 1;
CREATE INDEX IF NOT EXISTS jobs_dead ON jobs (vendor, died_at) WHERE dead = 1;
CREATE INDEX IF NOT EXISTS jobs_event ON jobs (event_id);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outcomes (
    event_id INTEGER NOT NULL, vendor TEXT NOT NULL, target TEXT NOT NULL, state TEXT NOT NULL, status INTEGER,
    detail TEXT NOT NULL DEFAULT '', attempts INTEGER NOT NULL DEFAULT 0, at REAL NOT NULL,
    PRIMARY KEY (event_id, vendor, target)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS outcomes_age ON outcomes (at);
CREATE TABLE IF NOT EXISTS key_settings (key_id TEXT PRIMARY KEY, payload BLOB NOT NULL, updated_at REAL NOT NULL);
"""
# Up to 0.10, outcomes were keyed by messageId (a random place in the table for every delivered postback), and events
# were found by an index on messageId and counted down their jobs (a write to the event's page for every delivered
# postback). `SQLiteStore._create` moves such a file to this layout at start-up, once.
POINT_SEEN = (  # a message's idempotency record points at its latest stored event
    "UPDATE seen SET event_id = latest.id FROM (SELECT tenant, message_id, MAX(id) AS id FROM events"
    " GROUP BY tenant, message_id) AS latest WHERE latest.tenant = seen.tenant AND latest.message_id = seen.message_id"
)
MOVE_OUTCOMES = (
    # A message whose event is gone (delivered) gets a number of its own below zero to keep its outcomes under.
    "CREATE TEMP TABLE gone AS SELECT DISTINCT o.tenant, o.message_id FROM outcomes_0_10 o JOIN seen s"
    " ON s.tenant = o.tenant AND s.message_id = o.message_id WHERE s.event_id IS NULL",
    "UPDATE seen SET event_id = -gone.rowid FROM gone WHERE gone.tenant = seen.tenant"
    " AND gone.message_id = seen.message_id",
    "INSERT OR REPLACE INTO outcomes SELECT s.event_id, o.vendor, o.target, o.state, o.status, o.detail, o.attempts,"
    " o.at FROM outcomes_0_10 o JOIN seen s ON s.tenant = o.tenant AND s.message_id = o.message_id"
    " WHERE s.event_id IS NOT NULL",
    "DROP TABLE temp.gone",
    "DROP TABLE outcomes_0_10",
)
IDENTITY_SCHEMA = """
CREATE TABLE IF NOT EXISTS identities (
    id INTEGER PRIMARY KEY, key BLOB NOT NULL UNIQUE, record BLOB NOT NULL, expires_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS identities_expiry ON identities (expires_at);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
"""
_JOB_SELECT = ("SELECT j.id, j.event_id, j.vendor, j.target, j.tenant, e.message_id, j.event_name, j.batch_key,"
               " e.payload, j.attempts, j.created_at, j.size FROM jobs j JOIN events e ON e.id = j.event_id")


class _Stop:
    pass


class WriterConnection(sqlite3.Connection):
    """A writer's connection, and what its open transaction's accepts leave to write at COMMIT (`accept_op`):
    their counter changes, summed into one statement for the whole transaction instead of one per accept, and the
    next event id, read once per transaction instead of written back to each idempotency record."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deferring = False  # inside `Committer.run_begun`, which writes `bumps` before its COMMIT
        self.bumps: dict[str, int] = {}
        self.next_event_id: int | None = None

    def defer(self, on: bool) -> None:
        """Begin (True) or end (False) a transaction whose accepts leave their counters and next id here."""
        self.deferring, self.next_event_id = on, None
        self.bumps.clear()


class Committer:
    """One connection's transactions: a group of operations in one transaction, each alone if the group fails.

    Used by a `_Writer`'s thread, and by the accept writer process (app/store/accept_writer.py) on its own."""

    def __init__(self, conn: sqlite3.Connection, *, priority: WriterPriority | None = None,
                 urgent: bool = False) -> None:
        self.conn, self.priority, self.urgent = conn, priority, urgent
        self.commits = 0  # transactions committed (group commit makes this much smaller than operations)

    def run(self, group: Sequence[tuple[Callable[[sqlite3.Connection], Any], Any]]) -> list[Any]:
        """Run the group (operations, each with a token) in one transaction; if it fails, redo each operation in
        its own transaction. Returns (token, value, error) per operation.

        A caller learns success only once its transaction has committed: results are collected first and handed
        out after COMMIT returns. A failed COMMIT (a full disk, an I/O error) fails every operation in it.
        """
        try:
            self._begin(self.conn)
        except Exception as exc:
            _rollback(self.conn)
            if len(group) == 1:
                return [(group[0][1], None, _error(exc))]
        else:
            done = self.run_begun(group)
            if not isinstance(done, BaseException):
                return done
            if len(group) == 1:
                return [(group[0][1], None, _error(done))]
        results: list[tuple[Any, Any, StoreError | None]] = []
        for operation in group:
            try:
                self._begin(self.conn)
            except Exception as exc:
                _rollback(self.conn)
                results.append((operation[1], None, _error(exc)))
                continue
            alone = self.run_begun([operation])
            results += [(operation[1], None, _error(alone))] if isinstance(alone, BaseException) else alone
        return results

    def run_begun(self, group: Sequence[tuple[Callable[[sqlite3.Connection], Any], Any]]
                  ) -> list[Any] | BaseException:
        """The group in the transaction just begun: (token, value, None) per operation once COMMIT has returned,
        or the exception that made it roll back."""
        conn = self.conn
        deferring = conn if isinstance(conn, WriterConnection) else None
        try:
            if deferring is not None:
                deferring.defer(True)
            values = [fn(conn) for fn, _ in group]
            if deferring is not None and deferring.bumps:
                _bump(conn, list(deferring.bumps.items()))
            conn.execute("COMMIT")
        except Exception as exc:
            _rollback(conn)
            return exc
        finally:
            if deferring is not None:
                deferring.defer(False)
        self.commits += 1
        return [(token, value, None) for (_, token), value in zip(group, values, strict=True)]

    def _begin(self, conn: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE (`_lock_steps`), sleeping between attempts: this writer's thread has nothing else to do."""
        with contextlib.closing(_lock_steps(conn, self.priority, urgent=self.urgent)) as steps:
            for pause in steps:
                time.sleep(pause)


class _Writer:
    """One connection and the one thread that uses it: operations queue up and commit in groups."""

    def __init__(self, conn: sqlite3.Connection, *, name: str, max_group: int,
                 priority: WriterPriority | None = None, urgent: bool = False) -> None:
        self.max_group = max_group
        self.committer = Committer(conn, priority=priority, urgent=urgent)
        self._ops: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def commits(self) -> int:
        return self.committer.commits

    async def call(self, fn: Callable[[sqlite3.Connection], T], timeout: float | None = None) -> T:
        """`fn`'s result once its transaction has committed; TimeoutError past `timeout` (it may commit later)."""
        if not self._thread.is_alive():
            raise StoreError("sqlite store is closed")
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._ops.put((fn, fut))
        return await within(fut, timeout)

    async def close(self) -> None:
        if self._thread.is_alive():
            self._ops.put(_Stop())
            await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        while True:
            item = self._ops.get()
            if isinstance(item, _Stop):
                break
            group = [item]
            while len(group) < self.max_group:
                try:
                    nxt = self._ops.get_nowait()
                except queue.Empty:
                    break
                if isinstance(nxt, _Stop):
                    self._ops.put(nxt)
                    break
                group.append(nxt)
            results = self.committer.run(group)
            by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
            for entry in results:
                by_loop.setdefault(entry[0].get_loop(), []).append(entry)
            for loop, entries in by_loop.items():
                with contextlib.suppress(RuntimeError):  # the loop closed while we worked
                    loop.call_soon_threadsafe(_resolve, entries)
        self.committer.conn.close()


class _LoopWriter:
    """A delivery process's writes, on its event loop's own thread: the operations that queued up meanwhile (up to
    `max_group`) in one transaction, run without a pause once SQLite's write lock is held. Waiting for the lock,
    and giving way to the accept writer first (`WriterPriority`), is an `await`, never a block.

    On a writer thread (`_Writer`), every SQLite step gives up Python's GIL, and taking it back waits for the event
    loop's thread, busy rendering at a lower CPU priority: a delivery transaction then held the write lock for 20 to
    500 ms at times, while the accept writer, and Segment's requests, waited for it (timed inside both writers in a
    patched copy, `bench/e2e.py`). Here the lock is held only for the statements' own work (and whatever time the
    kernel gives the other processes meanwhile)."""

    def __init__(self, conn: sqlite3.Connection, *, max_group: int, priority: WriterPriority | None) -> None:
        self.max_group = max_group
        self.committer = Committer(conn, priority=priority)
        self._ops: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._draining: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def commits(self) -> int:
        return self.committer.commits

    async def call(self, fn: Callable[[sqlite3.Connection], T], timeout: float | None = None) -> T:
        """`fn`'s result once its transaction has committed; TimeoutError past `timeout` (it may commit later)."""
        if self._closed:
            raise StoreError("sqlite store is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._ops.append((fn, fut))
        if self._draining is None or self._draining.done():
            self._draining = loop.create_task(self._drain())
        return await within(fut, timeout)

    async def close(self) -> None:
        self._closed = True
        if self._draining is not None:
            with contextlib.suppress(Exception):
                await self._draining
        self.committer.conn.close()

    async def _drain(self) -> None:
        while self._ops:
            group, self._ops = self._ops[:self.max_group], self._ops[self.max_group:]
            try:
                await self._begin()
            except Exception as exc:
                _resolve([(fut, None, _error(exc)) for _, fut in group])
                continue
            done = self.committer.run_begun(group)
            if isinstance(done, BaseException):  # each alone, so that only a failing one fails
                done = [(group[0][1], None, _error(done))] if len(group) == 1 else await self._each_alone(group)
            _resolve(done)

    async def _each_alone(self, group: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]]
                          ) -> list[Any]:
        results: list[Any] = []
        for operation in group:
            try:
                await self._begin()
            except Exception as exc:
                results.append((operation[1], None, _error(exc)))
                continue
            alone = self.committer.run_begun([operation])
            results += [(operation[1], None, _error(alone))] if isinstance(alone, BaseException) else alone
        return results

    async def _begin(self) -> None:
        """BEGIN IMMEDIATE (`_lock_steps`), awaiting between attempts: the event loop goes on meanwhile."""
        committer = self.committer
        with contextlib.closing(_lock_steps(committer.conn, committer.priority, urgent=committer.urgent)) as steps:
            for pause in steps:
                await asyncio.sleep(pause)


class WriterPriority:
    """A small file beside the database, shared by every process that writes to it: each process has a byte (its
    slot: HTTP processes in the first PRIORITY_SLOTS, delivery processes in the DELIVERY_SLOTS after them), set while
    it waits for SQLite's write lock. The delivery processes do not begin a transaction while an HTTP process waits,
    since its callers wait for their 202 (for at most GIVE_WAY_SECONDS, so a flag left by a crash only slows them),
    and a process that has just committed lets a waiting one of its kind go next (TURN_SECONDS at most).

    Without it, a writer that commits and begins again at once wins the lock over one polling for it every
    LOCK_POLL, again and again: accepts waited up to 50-110 ms for the lock while delivery ran, and p99 accept
    latency was 35-60 ms instead of about 20 ms; two HTTP processes without turns had a p99 of 118 ms; two delivery
    processes without turns waited 10-35 % of the time for each other, up to 190 ms at once, and their dispatchers
    with them (`bench/e2e.py`)."""

    def __init__(self, path: Path, slot: int = 0) -> None:
        if not 0 <= slot < PRIORITY_SLOTS + DELIVERY_SLOTS:
            raise StoreError(f"sqlite: writer slot {slot} is out of range (0-{PRIORITY_SLOTS + DELIVERY_SLOTS - 1})")
        self.slot = slot
        size = PRIORITY_SLOTS + DELIVERY_SLOTS
        # The slots of this process's kind: HTTP processes take turns among themselves, and so do delivery processes.
        self._group = (0, PRIORITY_SLOTS) if slot < PRIORITY_SLOTS else (PRIORITY_SLOTS, size)
        _private_file(path)
        with path.open("r+b") as handle:
            found = handle.seek(0, os.SEEK_END)
            if found < size:
                handle.write(b"\0" * (size - found))
                handle.flush()
            self._map = mmap.mmap(handle.fileno(), size)

    def want(self, waiting: bool) -> None:
        self._map[self.slot] = 1 if waiting else 0

    def wanted(self) -> bool:
        """Some HTTP process waits for the lock."""
        return self._map.find(b"\1", 0, PRIORITY_SLOTS) >= 0

    def others_waiting(self) -> bool:
        """A process of this one's kind (HTTP or delivery), other than this one, waits for the lock."""
        start, end = self._group
        first = self._map.find(b"\1", start, end)
        return first >= 0 and (first != self.slot or self._map.find(b"\1", first + 1, end) >= 0)

    def close(self) -> None:
        self._map.close()


class SQLiteStore:
    def __init__(self, path: str, *, durable: bool = True, slot: int | None = None,
                 accept_writer: str | None = None) -> None:
        """`slot`: this process's byte in the priority file; by default 0 for a durable store (the HTTP side), and
        one of the delivery slots picked by process id for an undurable one (serve gives its children theirs).
        `accept_writer`: the socket of the accept writer process that stores accepted events for every HTTP process
        of `serve` (app/store/accept_writer.py); None: this process stores them on its own writer thread."""
        if slot is None:
            slot = 0 if durable else PRIORITY_SLOTS + os.getpid() % DELIVERY_SLOTS
        self.path = Path(path)
        self.identities_path = self.path.with_name(f"{self.path.stem}-identities{self.path.suffix or '.db'}")
        self.durable = durable
        _private_file(self.path)
        _private_file(self.identities_path)
        self.priority = WriterPriority(self.path.with_name(f"{self.path.name}-priority"), slot)
        self.priority.want(False)  # a flag left in this slot by a crashed process
        connection = _connect(self.path, durable=durable, prepare=self._prepare)
        # An HTTP process's writes (keys, settings, and accepts when the accept writer is off) on a thread of their
        # own, which waits for the disk; a delivery process's on its event loop (`_LoopWriter`).
        self._writer: _Writer | _LoopWriter = (
            _Writer(connection, name="sqlite-writer", max_group=MAX_GROUP, priority=self.priority, urgent=True)
            if durable else _LoopWriter(connection, max_group=MAX_GROUP_UNDURABLE, priority=self.priority))
        # Remembered identities live in a file of their own, committed without an fsync each time: their random
        # keys would otherwise double what every durable commit of the queue writes (and waits for), and a power
        # cut may only cost the last seconds of remembered context, never an event.
        self._identity_writer = _Writer(
            _connect(self.identities_path, durable=False, prepare=lambda c: c.executescript(IDENTITY_SCHEMA),
                     mmap=False),
            name="sqlite-identities", max_group=MAX_GROUP)
        self._readers = threading.local()  # read-only connections per thread: identities, and short reads of the queue
        self._accepts = AcceptWriterClient(accept_writer) if accept_writer else None

    def _prepare(self, conn: sqlite3.Connection) -> None:
        if "payload" in _columns(conn, "jobs"):  # the layout of 0.1: one rendered postback per row
            left = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
            if left:
                raise StoreError(f"{self.path} holds {left} postbacks queued by segrelay 0.1; let that version "
                                 f"deliver them (or move the file away) before starting this one")
            conn.execute("DROP TABLE jobs")
        self._create(conn)

    def _create(self, conn: sqlite3.Connection) -> None:
        """The tables and indexes, and a file of 0.10 or before moved to this layout, in one transaction (another
        process starting at the same time waits for it, then finds everything in place)."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            old_outcomes = "message_id" in _columns(conn, "outcomes")
            if old_outcomes:
                conn.execute("DROP INDEX outcomes_age")
                conn.execute("ALTER TABLE outcomes RENAME TO outcomes_0_10")
            if "jobs_left" in _columns(conn, "events"):
                conn.execute("ALTER TABLE events RENAME COLUMN jobs_left TO jobs")  # now: what it was accepted with
            seen = _columns(conn, "seen")
            unpointed = bool(seen) and "event_id" not in seen  # idempotency records of 0.10: no event id yet
            if unpointed:
                conn.execute("ALTER TABLE seen ADD COLUMN event_id INTEGER")
            conn.execute("DROP INDEX IF EXISTS events_message")
            for statement in SCHEMA.split(";"):
                conn.execute(statement)
            if unpointed:
                conn.execute(POINT_SEEN)
            if old_outcomes:
                for statement in MOVE_OUTCOMES:
                    conn.execute(statement)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

    def _query(self, path: Path, sql: str, args: Sequence[Any]) -> list[Any]:
        """A point read of one of the store's files on the caller's own thread, on a read-only connection kept per
        thread and file: a WAL reader neither waits for the write lock nor holds it. A failure is a store error
        (503), never a 500."""
        readers: dict[Path, sqlite3.Connection] = self._readers.__dict__.setdefault("by_path", {})
        try:
            conn = readers.get(path)
            if conn is None:
                conn = readers[path] = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True,
                                                       isolation_level=None, timeout=1.0, check_same_thread=False)
            return conn.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise _error(exc) from None

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._writer.call(fn)

    def accept_committer(self) -> Committer:
        """A connection of its own for the accept writer process, with this store's turn at the write lock."""
        return Committer(_connect(self.path, durable=True, prepare=lambda c: None), priority=self.priority,
                         urgent=True)

    @property
    def commits(self) -> int:
        return self._writer.commits

    # Store protocol -------------------------------------------------------------------------------------

    async def ping(self) -> None:
        await self._call(lambda c: c.execute("SELECT 1").fetchone())

    async def durability_problems(self) -> list[str]:
        return []  # WAL with synchronous=FULL on the HTTP process: set here, not by the operator

    async def close(self) -> None:
        if self._accepts is not None:
            self._accepts.close()
        for reader in self._readers.__dict__.pop("by_path", {}).values():  # this thread's; others close with it
            reader.close()
        await self._writer.close()
        await self._identity_writer.close()
        self.priority.close()

    async def save_key(self, record: KeyRecord) -> None:
        def op(c: sqlite3.Connection) -> None:
            c.execute("INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, ?)",
                      (record.key_id, record.tenant, record.digest, record.created_at, record.expires_at,
                       ",".join(record.vendors), int(record.revoked)))
        await self._call(op)

    async def find_key(self, key_id: str) -> KeyRecord | None:
        rows = self._read("SELECT * FROM api_keys WHERE key_id = ?", (key_id,))
        return _key(rows[0]) if rows else None

    async def list_keys(self) -> list[KeyRecord]:
        rows = await self._call(lambda c: c.execute("SELECT * FROM api_keys ORDER BY created_at").fetchall())
        return [_key(r) for r in rows]

    async def revoke_key(self, key_id: str) -> bool:
        count = await self._call(
            lambda c: c.execute("UPDATE api_keys SET revoked = 1 WHERE key_id = ?", (key_id,)).rowcount)
        return count > 0

    async def accept(self, tenant: str, message_id: str, payload: bytes, jobs: Sequence[NewJob], *, now: float,
                     ttl: float, skips: Sequence[tuple[str, str]] = (), timeout: float | None = None) -> bool:
        rows = [(j.vendor, j.target, j.event_name, j.batch_key) for j in jobs]
        if self._accepts is not None:  # the accept writer process (app/store/accept_writer.py)
            return bool(await self._accepts.call((tenant, message_id, payload, rows, now, ttl, list(skips)),
                                                 timeout=timeout))
        return await self._writer.call(lambda c: accept_op(c, tenant, message_id, payload, rows, now, ttl, skips),
                                       timeout=timeout)

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        """A short read of the queue's file (`_query`). Through the writer, in a write transaction, such reads held
        SQLite's write lock for 5-11 ms at times while the accept writer waited (timed in a patched copy,
        `bench/e2e.py`)."""
        return self._query(self.path, sql, args)

    def _read_identities(self, sql: str, args: Sequence[Any]) -> list[Any]:
        return self._query(self.identities_path, sql, args)

    async def recall(self, keys: Sequence[str], *, now: float) -> list[bytes | None]:
        sql = f"SELECT key, record FROM identities WHERE key IN ({_marks(len(keys))}) AND expires_at > ?"  # noqa: S608
        rows = self._read_identities(sql, (*map(bytes.fromhex, keys), now))
        found = {bytes(key).hex(): bytes(record) for key, record in rows}
        return [found.get(key) for key in keys]

    async def remember(self, identities: Sequence[Identity]) -> None:
        if identities:
            await self._identity_writer.call(lambda c: _remember(c, identities))

    async def forget(self, keys: Sequence[str]) -> int:
        def op(c: sqlite3.Connection) -> int:
            gone = sum(c.execute("DELETE FROM identities WHERE key = ?", (bytes.fromhex(key),)).rowcount
                       for key in set(keys))
            _bump(c, [("identities", -gone)])
            return gone
        return await self._identity_writer.call(op)

    # Lease and complete touch their rows a statement per chunk, not per row: fewer SQLite steps while the write lock
    # is held (the writer thread gives up the GIL at every step, and the HTTP processes wait for the lock).

    async def lease(self, vendor: str, *, now: float, limit: int, lease_seconds: float) -> list[Job]:
        def op(c: sqlite3.Connection) -> list[Job]:
            rows = c.execute(_JOB_SELECT + " WHERE j.vendor = ? AND j.dead = 0 AND j.due_at <= ?"
                             " ORDER BY j.due_at LIMIT ?", (vendor, now, limit)).fetchall()
            for ids in _chunks([r[0] for r in rows]):
                c.execute(f"UPDATE jobs SET leased = 1, due_at = ? WHERE id IN ({_marks(len(ids))})",  # noqa: S608
                          (now + lease_seconds, *ids))
            return [_job(r) for r in rows]
        return await self._call(op)

    async def complete(self, jobs: Sequence[Job], *, status: int | None = None, now: float = 0.0) -> None:
        def op(c: sqlite3.Connection) -> None:
            by_id = {int(j.id): j for j in jobs}
            done: list[Job] = []  # those still queued (a job whose lease ran out may have been completed elsewhere)
            for ids in _chunks(list(by_id)):
                done += [by_id[row[0]] for row in c.execute(
                    f"DELETE FROM jobs WHERE id IN ({_marks(len(ids))}) RETURNING id", ids)]  # noqa: S608
            for chunk in _chunks(done, CHUNK // 8):
                c.execute("INSERT OR REPLACE INTO outcomes VALUES "  # noqa: S608
                          + ", ".join(["(?, ?, ?, 'delivered', ?, '', ?, ?)"] * len(chunk)),
                          [v for j in chunk for v in (int(j.event_id), j.vendor, j.target, status, j.attempts + 1,
                                                      now)])
            events = list({int(j.event_id) for j in done})
            for ids in _chunks(events):  # an event goes with its last job (a dead letter keeps it for a replay)
                c.execute(f"DELETE FROM events WHERE id IN ({_marks(len(ids))}) AND NOT EXISTS"  # noqa: S608
                          " (SELECT 1 FROM jobs WHERE jobs.event_id = events.id)", ids)
            _bump(c, _leaving(done))
        await self._call(op)

    async def retry(self, job: Job, *, due_at: float, status: int | None, body: str) -> None:
        await self._call(lambda c: c.execute(
            "UPDATE jobs SET leased = 0, due_at = ?, attempts = ?, last_status = ?, last_body = ? WHERE id = ?",
            (due_at, job.attempts + 1, status, body, int(job.id))))

    async def release(self, jobs: Sequence[Job], *, due_at: float) -> None:
        await self._call(lambda c: c.executemany("UPDATE jobs SET leased = 0, due_at = ? WHERE id = ?",
                                                 [(due_at, int(j.id)) for j in jobs]))

    async def bury(self, job: Job, *, now: float, status: int | None, body: str) -> None:
        def op(c: sqlite3.Connection) -> None:
            moved = c.execute(
                "UPDATE jobs SET leased = 0, dead = 1, attempts = ?, last_status = ?, last_body = ?, died_at = ?"
                " WHERE id = ? AND dead = 0", (job.attempts + 1, status, body, now, int(job.id))).rowcount
            if moved:
                _bump(c, [*_leaving([job]), (f"dead:{job.vendor}", 1)])
        await self._call(op)

    async def dead_letters(self, vendor: str | None = None, limit: int = 100) -> list[DeadLetter]:
        sql = ("SELECT j.id, j.vendor, j.tenant, e.message_id, j.event_name, j.attempts, j.last_status, j.last_body,"
               " j.created_at, j.died_at FROM jobs j JOIN events e ON e.id = j.event_id WHERE j.dead = 1")
        args: tuple[Any, ...] = ()
        if vendor:
            sql, args = sql + " AND j.vendor = ?", (vendor,)
        rows = await self._call(lambda c: c.execute(sql + " ORDER BY j.died_at LIMIT ?", (*args, limit)).fetchall())
        return [DeadLetter(str(r[0]), *r[1:]) for r in rows]

    async def replay(self, ids: Sequence[str] | None, *, now: float) -> int:
        def op(c: sqlite3.Connection) -> int:
            if ids is None:
                rows = c.execute("SELECT id, vendor, tenant, size FROM jobs WHERE dead = 1").fetchall()
            else:
                wanted = [(int(i),) for i in ids if i.isdigit()]
                rows = [r for (i,) in wanted for r in c.execute(
                    "SELECT id, vendor, tenant, size FROM jobs WHERE dead = 1 AND id = ?", (i,)).fetchall()]
            c.executemany("UPDATE jobs SET dead = 0, leased = 0, attempts = 0, created_at = ?, due_at = ?,"
                          " died_at = NULL WHERE id = ?", [(now, now, r[0]) for r in rows])
            bumps: Counter[str] = Counter()
            for _, vendor, tenant, size in rows:
                bumps.update({f"pending:{vendor}": 1, f"dead:{vendor}": -1, f"bytes:{tenant}": size,
                              f"bytes:{ALL_TENANTS}": size})
            _bump(c, list(bumps.items()))
            return len(rows)
        return await self._call(op)

    async def trace(self, message_id: str, tenant: str | None = None) -> list[Outcome]:
        def op(c: sqlite3.Connection) -> tuple[list[Any], list[Any]]:
            # The message's event, through its idempotency record; without a tenant, in each tenant that ever
            # queued a postback (the byte counters name them: outcomes exist only for events with postbacks).
            tenants = [tenant] if tenant is not None else [
                name.removeprefix("bytes:") for (name,) in c.execute(
                    "SELECT name FROM counters WHERE name >= 'bytes:' AND name < 'bytes;' AND name != ?",
                    (f"bytes:{ALL_TENANTS}",))]
            events = [(t, row[0]) for t in tenants for row in c.execute(
                "SELECT event_id FROM seen WHERE tenant = ? AND message_id = ? AND event_id IS NOT NULL",
                (t, message_id))]
            live = [(t, *row) for t, event_id in events for row in c.execute(
                "SELECT vendor, target, leased, dead, attempts, last_status, last_body, due_at, died_at FROM jobs"
                " WHERE event_id = ?", (event_id,))]
            kept = [(t, *row) for t, event_id in events for row in c.execute(
                "SELECT vendor, target, state, status, detail, attempts, at FROM outcomes WHERE event_id = ?",
                (event_id,))]
            return live, kept
        live, kept = await self._call(op)
        outcomes = [Outcome(r[0], r[1], r[2], r[3], r[6], r[4], r[5], r[7]) for r in kept]
        for t, vendor, target, leased, dead, attempts, status, body, due_at, died_at in live:
            if dead:
                outcomes.append(Outcome(t, vendor, target, "dead", attempts, status, body, died_at))
            else:
                state = "leased" if leased else "retrying" if attempts else "queued"
                outcomes.append(Outcome(t, vendor, target, state, attempts, status, body, None, due_at))
        return sorted(outcomes, key=lambda o: (o.tenant, o.vendor, o.target))

    async def save_settings(self, key_id: str, sealed: bytes, *, now: float) -> None:
        await self._call(lambda c: c.execute(
            "INSERT INTO key_settings VALUES (?, ?, ?) ON CONFLICT (key_id) DO UPDATE"
            " SET payload = excluded.payload, updated_at = excluded.updated_at", (key_id, sealed, now)))

    async def latest_settings(self, key_id: str) -> bytes | None:
        row = await self._call(lambda c: c.execute("SELECT payload FROM key_settings WHERE key_id = ?",
                                                   (key_id,)).fetchone())
        return bytes(row[0]) if row else None

    async def dead_letter_payload(self, job_id: str) -> tuple[str, bytes] | None:
        if not job_id.isdigit():
            return None
        row = await self._call(lambda c: c.execute(
            "SELECT e.id, e.payload FROM jobs j JOIN events e ON e.id = j.event_id WHERE j.id = ? AND j.dead = 1",
            (int(job_id),)).fetchone())
        return (str(row[0]), bytes(row[1])) if row else None

    async def replace_payload(self, event_id: str, payload: bytes) -> None:
        await self._call(lambda c: c.execute("UPDATE events SET payload = ? WHERE id = ?", (payload, int(event_id))))

    async def stats(self, *, now: float) -> QueueStats:
        rows = await self._call(lambda c: c.execute(
            "SELECT vendor, SUM(dead = 0 AND leased = 0), SUM(dead = 0 AND leased = 1 AND due_at > ?),"
            " SUM(dead = 0 AND due_at <= ?), SUM(dead = 1) FROM jobs GROUP BY vendor", (now, now)).fetchall())
        return QueueStats({r[0]: VendorStats(*(int(x or 0) for x in r[1:])) for r in rows})

    async def counts(self) -> Counts:
        rows = self._read("SELECT name, value FROM counters")
        counts = Counts()
        for name, value in rows:
            kind, _, key = name.partition(":")
            {"pending": counts.pending, "dead": counts.dead, "bytes": counts.queued_bytes}[kind][key] = value
        rows = self._read_identities("SELECT value FROM counters WHERE name = 'identities'", ())
        counts.identities = rows[0][0] if rows else 0
        return counts

    async def oldest_due(self, *, now: float) -> dict[str, float]:
        ages = {}
        for vendor in VENDORS:
            ((due,),) = self._read("SELECT MIN(due_at) FROM jobs WHERE vendor = ? AND dead = 0", (vendor.slug,))
            ages[vendor.slug] = max(0.0, now - due) if due is not None else 0.0
        return ages

    async def housekeeping(self, *, now: float, keep_seconds: float = 7 * 86_400,
                           max_identities: int = MAX_IDENTITIES) -> None:
        """Expired identities, idempotency records and outcomes go, and identities past their bound, oldest first.

        Each kind goes HOUSEKEEPING_BATCH rows per transaction, again while a batch was full, up to
        HOUSEKEEPING_ROUNDS transactions per call: other writers take the lock between them, and a call every
        second keeps up with far more than the goal's 1,500 events/s (6,000 outcomes a second). One batch per call
        fell behind above 2,000 rows a second, and the tables would have grown without bound once the retention
        window filled."""
        def expire_identities(c: sqlite3.Connection) -> int:
            expired = c.execute("DELETE FROM identities WHERE id IN (SELECT id FROM identities WHERE expires_at <= ?"
                                " LIMIT ?)", (now, HOUSEKEEPING_BATCH)).rowcount
            row = c.execute("SELECT value FROM counters WHERE name = 'identities'").fetchone()
            excess = min(max(0, (row[0] if row else 0) - expired - max_identities), HOUSEKEEPING_BATCH)
            evicted = c.execute("DELETE FROM identities WHERE id IN (SELECT id FROM identities ORDER BY expires_at"
                                " LIMIT ?)", (excess,)).rowcount if excess else 0
            if expired or evicted:
                _bump(c, [("identities", -expired - evicted)])
            return max(expired, evicted)

        def expire_seen(c: sqlite3.Connection) -> int:
            return int(c.execute("DELETE FROM seen WHERE (tenant, message_id) IN (SELECT tenant, message_id FROM seen"
                                 " WHERE expires_at <= ? LIMIT ?)", (now, HOUSEKEEPING_BATCH)).rowcount)

        def expire_outcomes(c: sqlite3.Connection) -> int:
            return int(c.execute("DELETE FROM outcomes WHERE (event_id, vendor, target) IN (SELECT"
                                 " event_id, vendor, target FROM outcomes WHERE at <= ? LIMIT ?)",
                                 (now - keep_seconds, HOUSEKEEPING_BATCH)).rowcount)

        for writer, op in ((self._identity_writer, expire_identities), (self._writer, expire_seen),
                           (self._writer, expire_outcomes)):
            for _ in range(HOUSEKEEPING_ROUNDS):
                if await writer.call(op) < HOUSEKEEPING_BATCH:
                    break

    async def recover_leases(self, *, now: float) -> int:
        """At boot of the delivery process: leases held by a previous (dead) one become due now."""
        return await self._call(lambda c: c.execute(
            "UPDATE jobs SET leased = 0, due_at = ? WHERE leased = 1 AND dead = 0", (now,)).rowcount)


def _connect(path: Path, *, durable: bool, prepare: Callable[[sqlite3.Connection], object],
             mmap: bool = True) -> sqlite3.Connection:
    """A writer's connection: WAL, its synchronous level, big caches; `prepare` creates or migrates the schema
    while SQLite's own busy handler still waits for other processes."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=LOCK_TIMEOUT,
                           factory=WriterConnection)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
    conn.execute("PRAGMA cache_size=-65536")  # 64 MB of pages per connection: index pages stay hot at depth
    if mmap:
        conn.execute("PRAGMA mmap_size=268435456")  # reads through a 256 MB map instead of read() calls
    prepare(conn)
    conn.execute("PRAGMA busy_timeout=0")  # from here on, a writer waits for the lock itself (_lock_steps)
    return conn


def accept_op(c: sqlite3.Connection, tenant: str, message_id: str, payload: bytes,
              jobs: Sequence[tuple[str, str, str, str]], now: float, ttl: float,
              skips: Sequence[tuple[str, str]]) -> bool:
    """Store one accepted event in the open transaction: its idempotency record, the event, its jobs (vendor,
    target, event name, batch key), its counters and its skips. False when the messageId was seen within the ttl.

    Three statements per accept, one per table. On a `WriterConnection` inside `Committer.run_begun`, the
    counters of every accept in the transaction are written once, just before COMMIT, and the event's id is known
    before the idempotency record is written (AUTOINCREMENT's own sequence, read once per transaction), so the
    record needs no second write to point at its event: the statements of an accept took 16.5 µs of CPU instead
    of 20.2 (transactions of ten; 0.13.2's benchmark figures)."""
    event_id = _next_event_id(c) if jobs else None
    # Inserted, or replaced an expired record: new. An unexpired record: a duplicate (no row changed).
    fresh = c.execute(
        "INSERT INTO seen VALUES (?, ?, ?, ?) ON CONFLICT (tenant, message_id) DO UPDATE"
        " SET expires_at = excluded.expires_at, event_id = excluded.event_id WHERE seen.expires_at <= ?",
        (tenant, message_id, now + ttl, event_id, now)).rowcount
    if fresh and jobs:
        size = len(payload)
        c.execute("INSERT INTO events (id, tenant, message_id, payload, jobs) VALUES (?, ?, ?, ?, ?)",
                  (event_id, tenant, message_id, payload, len(jobs)))
        if isinstance(c, WriterConnection) and c.deferring and event_id is not None:
            c.next_event_id = event_id + 1
        c.execute("INSERT INTO jobs (event_id, vendor, target, tenant, event_name, batch_key, size,"  # noqa: S608
                  " created_at, due_at) VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * len(jobs)),
                  [v for vendor, target, name, batch in jobs
                   for v in (event_id, vendor, target, tenant, name, batch, size, now, now)])
        bumps: dict[str, int] = {}
        for job in jobs:
            counter = f"pending:{job[0]}"
            bumps[counter] = bumps.get(counter, 0) + 1
        queued = size * len(jobs)
        _bump_at_commit(c, [*bumps.items(), (f"bytes:{tenant}", queued), (f"bytes:{ALL_TENANTS}", queued)])
        if skips:
            c.executemany("INSERT OR REPLACE INTO outcomes VALUES (?, ?, '', 'skipped', NULL, ?, 0, ?)",
                          [(event_id, vendor, reason, now) for vendor, reason in skips])
    return bool(fresh)


def _next_event_id(c: sqlite3.Connection) -> int:
    """The id the next event stored in this transaction gets: one past the largest ever given (AUTOINCREMENT's
    sequence, so an id is never reused even after its event is gone)."""
    deferring = c if isinstance(c, WriterConnection) and c.deferring else None
    if deferring is not None and deferring.next_event_id is not None:
        return deferring.next_event_id
    row = c.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
    next_id = (int(row[0]) if row else 0) + 1
    if deferring is not None:
        deferring.next_event_id = next_id
    return next_id


def _bump_at_commit(c: sqlite3.Connection, bumps: Sequence[tuple[str, int]]) -> None:
    """Counter changes written with the transaction's others just before COMMIT (`Committer.run_begun`), or now on
    a connection that is not a `WriterConnection`."""
    if not isinstance(c, WriterConnection) or not c.deferring:
        _bump(c, bumps)
        return
    pending = c.bumps
    for name, amount in bumps:
        pending[name] = pending.get(name, 0) + amount


def _bump(c: sqlite3.Connection, bumps: Sequence[tuple[str, int]]) -> None:
    """Counter changes (name, amount to add), in one statement."""
    if bumps:
        c.execute("INSERT INTO counters VALUES " + ", ".join(["(?, ?)"] * len(bumps))  # noqa: S608
                  + " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                  [v for bump in bumps for v in bump])


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def _chunks(items: Sequence[T], size: int = CHUNK) -> Iterable[Sequence[T]]:
    """The items in slices of at most `size`: parameters per statement stay well under SQLite's limit."""
    return (items[start:start + size] for start in range(0, len(items), size))


def _marks(count: int) -> str:
    """`?, ?, ?`: placeholders only, the values stay parameters."""
    return ", ".join("?" * count)


def _remember(c: sqlite3.Connection, identities: Sequence[Identity]) -> None:
    """Insert or replace the records in a few statements, counting the new ones (no count(*) to bound them)."""
    latest = {bytes.fromhex(identity.key): identity for identity in identities}
    keys = list(latest)
    known = 0
    for start in range(0, len(keys), 500):
        chunk = keys[start:start + 500]
        sql = f"SELECT COUNT(*) FROM identities WHERE key IN ({_marks(len(chunk))})"  # noqa: S608
        known += c.execute(sql, chunk).fetchone()[0]
    c.executemany("INSERT INTO identities (key, record, expires_at) VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE"
                  " SET record = excluded.record, expires_at = excluded.expires_at",
                  [(key, i.record, i.expires_at) for key, i in latest.items()])
    if len(keys) > known:
        _bump(c, [("identities", len(keys) - known)])


def _leaving(jobs: Iterable[Job]) -> list[tuple[str, int]]:
    """Counter changes for jobs that leave the queue (delivered or buried): summed per vendor and tenant first."""
    per_vendor: Counter[str] = Counter()
    per_tenant: Counter[str] = Counter()
    for job in jobs:
        per_vendor[job.vendor] += 1
        per_tenant[job.tenant] += job.size
    if not per_vendor:
        return []
    return [*((f"pending:{vendor}", -count) for vendor, count in per_vendor.items()),
            *((f"bytes:{tenant}", -size) for tenant, size in per_tenant.items()),
            (f"bytes:{ALL_TENANTS}", -sum(per_tenant.values()))]


def _private_file(path: Path) -> None:
    """The database folder (0700) and file (0600) are private; SQLite gives -wal and -shm the file's mode."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    with contextlib.suppress(OSError):  # not ours to change (a mounted volume): best effort
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)


def _lock_steps(conn: sqlite3.Connection, priority: WriterPriority | None, *,
                urgent: bool) -> Generator[float, None, None]:
    """BEGIN IMMEDIATE for a writer, as the pauses to wait between attempts: a writer thread sleeps them, a delivery
    process's event loop awaits them. A delivery writer (not `urgent`) first gives way to the HTTP processes; any
    writer lets another waiting one of its kind have its turn, then says it is waiting while it waits (see
    WriterPriority), in short steps (`_pauses`) up to LOCK_TIMEOUT."""
    if priority is not None:
        if not urgent:
            yield from _give_way(priority.wanted, GIVE_WAY_SECONDS, urgent)
        yield from _give_way(priority.others_waiting, TURN_SECONDS, urgent)
    deadline, pauses = 0.0, _pauses(urgent)
    try:
        while not _try_begin(conn):
            now = time.monotonic()
            if not deadline:
                deadline = now + LOCK_TIMEOUT
                if priority is not None:
                    priority.want(True)
            if now >= deadline:
                raise sqlite3.OperationalError("database is locked")
            yield next(pauses)
    finally:
        if priority is not None:
            priority.want(False)


def _give_way(waiting: Callable[[], bool], seconds: float, urgent: bool) -> Generator[float, None, None]:
    """Pauses while another writer says it is waiting for the lock, `seconds` at most (a flag left by a crash)."""
    until, pauses = time.monotonic() + seconds, _pauses(urgent)
    while waiting() and time.monotonic() < until:
        yield next(pauses)


def _pauses(urgent: bool) -> Iterator[float]:
    """The pauses of one wait: LOCK_POLL each for the HTTP side (an accept is waiting); for delivery, doubling up to
    LOCK_POLL_MAX, since every look costs its event loop a turn and, at the lock, a failed BEGIN's system calls.
    At a steady LOCK_POLL a delivery process looked about 60 times per transaction under bench/e2e.py's load."""
    pause = LOCK_POLL
    while True:
        yield pause
        if not urgent:
            pause = min(pause * 2, LOCK_POLL_MAX)


def _try_begin(conn: sqlite3.Connection) -> bool:
    """BEGIN IMMEDIATE: True, or False while another process holds the write lock (any other error raises)."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc) and "busy" not in str(exc):
            raise
        return False
    return True


def _rollback(conn: sqlite3.Connection) -> None:
    """Undo an open transaction; SQLite may already have rolled it back after a failed COMMIT."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _error(exc: BaseException) -> StoreError:
    """Locked, busy, full or failing disks are passing conditions (503); anything else is our bug (500)."""
    if isinstance(exc, sqlite3.OperationalError):
        return StoreUnavailableError(f"sqlite: {exc}")
    if isinstance(exc, sqlite3.Error):
        return StoreError(f"sqlite: {exc}")
    return StoreError(f"sqlite: {type(exc).__name__} in a store operation")


def _resolve(entries: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for fut, result, error in entries:
        if fut.done():
            continue
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)


def _key(row: Sequence[Any]) -> KeyRecord:
    return KeyRecord(row[0], row[1], row[2], row[3], row[4], tuple(v for v in row[5].split(",") if v),
                     bool(row[6]))


def _job(row: Sequence[Any]) -> Job:
    return Job(str(row[0]), str(row[1]), row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9], row[10],
               row[11], str(row[0]))
