"""The embedded store: one SQLite file in WAL mode, shared by `segrelay serve`'s processes.

What it stores and how it finds it. How writes reach the file (group commit, one writer at a time across processes,
the HTTP side first) is app/store/sqlite_writers.py: an HTTP process writes on a writer thread, a delivery process
on its event loop, and on `serve` the HTTP processes' accepts go to the accept writer (app/store/accept_writer.py),
which runs `accept_op` for all of them. The HTTP side commits with synchronous=FULL (an accepted event survives power
loss); the delivery processes may use NORMAL, since losing their last completions to a power cut only means sending
them again.

Ids are AUTOINCREMENT, never reused: a late answer for a job, or a cached event, can never meet a newer one.
Every query is served by an index: due jobs per vendor, leased jobs, dead letters, expired idempotency records, an
event's jobs; an event goes with its last job; counts come from the `counters` table, kept in the same transactions.
What is written for a delivered postback lands next to the previous one: its outcome is keyed by its event's id
(increasing), and the event's row is written once more only when it goes. A message's event is found through its
idempotency record (`segrelay trace`).

An accept writes its event with the event's routes (one JSON column), not its jobs' rows: the next lease of any
vendor writes them for every event accepted since the last lease (`fan_out_op`, in transactions of their own
before the lease's), by a cursor in `cursors` that moves in the same transaction. Ids only grow and one transaction
writes at a time, so an event past the cursor is complete, and each is fanned out once.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import orjson

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
    VendorStats,
)
from app.store.accept_writer import AcceptWriterClient
from app.store.sqlite_writers import (
    ACCEPT_WRITER_CACHE_KIB,
    DELIVERY_SLOTS,
    MAX_GROUP,
    MAX_GROUP_UNDURABLE,
    PRIORITY_SLOTS,
    Committer,
    LoopWriter,
    ThreadWriter,
    WriterConnection,
    WriterPriority,
    bump_counters,
    connect_writer,
    private_file,
    rollback,
    store_error,
)
from handlers import VENDORS

T = TypeVar("T")
CHUNK = 500  # rows per statement where lease and complete name many rows at once
# Expired rows of one kind deleted per transaction (delivery calls housekeeping every second): each holds the write
# lock that accepts wait for, 0.8 ms at the median for 500 rows (2,000 took 2.8 ms, up to 11.7).
HOUSEKEEPING_BATCH = 500
HOUSEKEEPING_ROUNDS = 64  # ... and transactions of one kind per call, at most: 32,000 rows a second per table
LOOK_SCAN = 4_096  # due jobs a look past blocked tenants reads through for other tenants' (`_others_due`)
FAN_OUT_EVENTS = 64  # events whose job rows one transaction writes (about 260 rows): 1-3 ms with the lock held
FAN_OUT_ROUNDS = 16  # fan-out transactions before a lease, at most (1,024 events): the rest at the next lease
OLDEST_UNFANNED = 64  # events not fanned out yet that `oldest_due` looks at for each vendor's oldest
# Delivery processes share the queue by event (`SQLiteStore._share_of`): a process that has leased in the last
# LIVE_SECONDS counts; each looks again at most every SHARE_REFRESH seconds; another's jobs due this long are taken.
LIVE_SECONDS = 5.0
SHARE_REFRESH = 1.0
TAKE_OVER_AFTER = 1.0

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
    jobs INTEGER NOT NULL, routes TEXT, accepted_at REAL);
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
CREATE TABLE IF NOT EXISTS cursors (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deliverers (slot INTEGER PRIMARY KEY, seen_at REAL NOT NULL) WITHOUT ROWID;
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


class SQLiteStore:
    leases_by_event = True  # `lease` takes this process's share of the events (`_share_of`)

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
        private_file(self.path)
        private_file(self.identities_path)
        self.slot = slot
        self._share_at, self._share = -1.0, (0, 1)  # when this process last looked, and its share: (index, of)
        self.priority = WriterPriority(self.path.with_name(f"{self.path.name}-priority"), slot)
        self.priority.want(False)  # a flag left in this slot by a crashed process
        connection = connect_writer(self.path, durable=durable, prepare=self._prepare)
        # An HTTP process's writes (keys, settings, and accepts when the accept writer is off) on a thread of their
        # own, which waits for the disk; a delivery process's on its event loop (`LoopWriter`).
        self._writer: ThreadWriter | LoopWriter = (
            ThreadWriter(connection, name="sqlite-writer", max_group=MAX_GROUP, priority=self.priority, urgent=True)
            if durable else LoopWriter(connection, max_group=MAX_GROUP_UNDURABLE, priority=self.priority))
        # Remembered identities live in a file of their own, committed without an fsync each time: their random
        # keys would otherwise double what every durable commit of the queue writes (and waits for), and a power
        # cut may only cost the last seconds of remembered context, never an event.
        self._identity_writer = ThreadWriter(
            connect_writer(self.identities_path, durable=False, prepare=lambda c: c.executescript(IDENTITY_SCHEMA),
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
        require_json_functions(conn)
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
            events = _columns(conn, "events")
            if events and "routes" not in events:  # 0.13.5 and before: every event's jobs were written with it
                conn.execute("ALTER TABLE events ADD COLUMN routes TEXT")
                conn.execute("ALTER TABLE events ADD COLUMN accepted_at REAL")
            for statement in SCHEMA.split(";"):
                conn.execute(statement)
            # Events up to here have their jobs (a new file has none): only later ones are fanned out.
            conn.execute("INSERT OR IGNORE INTO cursors VALUES ('fanned_out', (SELECT COALESCE(MAX(id), 0)"
                         " FROM events))")
            if unpointed:
                conn.execute(POINT_SEEN)
            if old_outcomes:
                for statement in MOVE_OUTCOMES:
                    conn.execute(statement)
            conn.execute("COMMIT")
        except BaseException:
            rollback(conn)
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
            raise store_error(exc) from None

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._writer.call(fn)

    def accept_committer(self) -> Committer:
        """A connection of its own for the accept writer process, with this store's turn at the write lock."""
        return Committer(connect_writer(self.path, durable=True, prepare=lambda c: None,
                                        cache_kib=ACCEPT_WRITER_CACHE_KIB), priority=self.priority, urgent=True)

    @property
    def commits(self) -> int:
        return self._writer.commits

    # Store protocol -------------------------------------------------------------------------------------

    async def ping(self) -> None:
        await self._call(lambda c: c.execute("SELECT 1").fetchone())

    async def durability_problems(self) -> list[str]:
        return []  # WAL with synchronous=FULL on the HTTP process: set here, not by the operator

    async def tuning_advice(self) -> list[str]:
        return []  # every setting is segrelay's own

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

    def accept(self, tenant: str, message_id: str, payload: bytes, jobs: Sequence[NewJob], *, now: float,
               ttl: float, skips: Sequence[tuple[str, str]] = (), timeout: float | None = None) -> Awaitable[bool]:
        rows = [(j.vendor, j.target, j.event_name, j.batch_key) for j in jobs]
        if self._accepts is not None:  # the accept writer process (app/store/accept_writer.py): it answers a bool
            request = (tenant, message_id, payload, rows, now, ttl, list(skips))
            if self._accepts.connected:  # the usual case: its answer's future
                return self._accepts.submit(request, timeout)
            return self._accepts.call(request, timeout)
        return self._writer.call(lambda c: accept_op(c, tenant, message_id, payload, rows, now, ttl, skips),
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
            bump_counters(c, [("identities", -gone)])
            return gone
        return await self._identity_writer.call(op)

    # Lease and complete touch their rows a statement per chunk, not per row: fewer SQLite steps while the write lock
    # is held (the writer thread gives up the GIL at every step, and the HTTP processes wait for the lock).

    async def lease(self, vendor: str, *, now: float, limit: int, lease_seconds: float,
                    every_share: bool = False, skip_tenants: Collection[str] = ()) -> list[Job]:
        """Up to `limit` due jobs of the vendor, oldest first, from this process's share of the events (`_share_of`)
        unless `every_share`; with `skip_tenants` (a look past blocked tenants), only other tenants' jobs among the
        vendor's first LOOK_SCAN due ones, in every share.

        The newest accepts' jobs, every vendor's, are written first, in transactions of their own (`fan_out`, at
        most FAN_OUT_ROUNDS of them). Inside the lease's own transaction, a fan-out of up to 256 events and
        Tracify's lease of 256 jobs held the write lock 12-18 ms at the median and up to 40-67 ms with 1,000,000
        postbacks queued, while the accept writer waited (up to 40-44 ms); in transactions of their own, 64 events
        each, its longest wait was 16-24 ms and the server's p99 20.5-24.5 ms against 24.5-37 (three runs each,
        README, 0.13.19)."""
        await self.fan_out(rounds=FAN_OUT_ROUNDS)

        def op(c: sqlite3.Connection) -> list[Job]:
            index, of = self._share_of(c, now)  # noted even when looking at every share
            due = _JOB_SELECT + " WHERE j.vendor = ? AND j.dead = 0 AND j.due_at <= ?"
            if skip_tenants:
                rows = _others_due(c, vendor, now, limit, skip_tenants)
            elif of == 1 or every_share:
                rows = c.execute(due + " ORDER BY j.due_at LIMIT ?", (vendor, now, limit)).fetchall()
            else:
                rows = c.execute(due + " AND j.event_id % ? = ? ORDER BY j.due_at LIMIT ?",
                                 (vendor, now, of, index, limit)).fetchall()
                if len(rows) < limit:  # its own share drained: the others' jobs that have waited, oldest first
                    rows += c.execute(due + " AND j.event_id % ? != ? ORDER BY j.due_at LIMIT ?",
                                      (vendor, now - TAKE_OVER_AFTER, of, index, limit - len(rows))).fetchall()
            for ids in _chunks([r[0] for r in rows]):
                c.execute(f"UPDATE jobs SET leased = 1, due_at = ? WHERE id IN ({_marks(len(ids))})",  # noqa: S608
                          (now + lease_seconds, *ids))
            return [_job(r) for r in rows]
        return await self._call(op)

    def _share_of(self, c: sqlite3.Connection, now: float) -> tuple[int, int]:
        """Which events' jobs this process leases: those whose event id is `index` modulo `of`, the number of
        processes that leased in the last LIVE_SECONDS (this one included), by their slots' order. An event's
        vendors are then rendered by one process, which parses it once (two delivery processes taking jobs as they
        came parsed each event 1.74 times). A process whose share is drained takes the others' jobs that have
        waited TAKE_OVER_AFTER, so a slow or stuck one delays its share by that much, and one that stopped leasing
        is left out after LIVE_SECONDS. Noted and looked up at most every SHARE_REFRESH seconds, in the lease's
        transaction; processes that disagree for a moment only lease the same due jobs in turn, never twice."""
        if 0 <= now - self._share_at < SHARE_REFRESH:
            return self._share
        c.execute("INSERT INTO deliverers VALUES (?, ?) ON CONFLICT (slot) DO UPDATE SET seen_at = excluded.seen_at",
                  (self.slot, now))
        live = [slot for (slot,) in c.execute("SELECT slot FROM deliverers WHERE seen_at > ? OR slot = ?"
                                              " ORDER BY slot", (now - LIVE_SECONDS, self.slot))]
        self._share_at, self._share = now, (live.index(self.slot), len(live))
        return self._share

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
            bump_counters(c, _leaving(done))
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
                bump_counters(c, [*_leaving([job]), (f"dead:{job.vendor}", 1)])
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
            bump_counters(c, list(bumps.items()))
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
            # An event accepted since delivery last leased has no job rows yet: its jobs are queued.
            live += [(t, vendor, target, 0, 0, 0, None, "", accepted_at, None)
                     for t, event_id in events for routes, accepted_at in c.execute(
                         "SELECT routes, accepted_at FROM events WHERE id = ? AND id > (SELECT value FROM cursors"
                         " WHERE name = 'fanned_out')", (event_id,))
                     for vendor, target, *_ in orjson.loads(routes)]
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
        await self.fan_out()
        def op(c: sqlite3.Connection) -> list[Any]:
            return c.execute(
                "SELECT vendor, SUM(dead = 0 AND leased = 0), SUM(dead = 0 AND leased = 1 AND due_at > ?),"
                " SUM(dead = 0 AND due_at <= ?), SUM(dead = 1) FROM jobs GROUP BY vendor", (now, now)).fetchall()
        rows = await self._call(op)
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
        # Events whose jobs are not written yet (delivery has not leased since they came) are due for their vendors
        # too: the oldest of them, as far as the first OLDEST_UNFANNED tell.
        unfanned: dict[str, float] = {}
        for routes, accepted_at in self._read("SELECT routes, accepted_at FROM events WHERE id > (SELECT value FROM"
                                              " cursors WHERE name = 'fanned_out') ORDER BY id LIMIT ?",
                                              (OLDEST_UNFANNED,)):
            for vendor, *_ in orjson.loads(routes):
                unfanned.setdefault(vendor, float(accepted_at))
        ages = {}
        for vendor in VENDORS:
            ((due,),) = self._read("SELECT MIN(due_at) FROM jobs WHERE vendor = ? AND dead = 0", (vendor.slug,))
            oldest = min((d for d in (due, unfanned.get(vendor.slug)) if d is not None), default=None)
            ages[vendor.slug] = max(0.0, now - oldest) if oldest is not None else 0.0
        return ages

    async def fan_out(self, rounds: int | None = None) -> int:
        """Write the job rows of every event accepted since the last fan-out (`fan_out_op`), a transaction per
        FAN_OUT_EVENTS so that accepts take the lock in between, until one finds fewer (none left then), or after
        `rounds` transactions (the rest wait for the next call); how many events."""
        limit, total = FAN_OUT_EVENTS, 0
        for _ in range(rounds) if rounds is not None else itertools.count():
            count = await self._call(lambda c: fan_out_op(c, limit))
            total += count
            if count < limit:
                break
        return total

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
                bump_counters(c, [("identities", -expired - evicted)])
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


Accept = tuple[str, str, bytes, Sequence[tuple[str, str, str, str]], float, float, Sequence[tuple[str, str]]]
_SEEN = ("INSERT INTO seen VALUES (?, ?, ?, ?) ON CONFLICT (tenant, message_id) DO UPDATE"
         " SET expires_at = excluded.expires_at, event_id = excluded.event_id WHERE seen.expires_at <= ?")
_EVENT = "INSERT INTO events (id, tenant, message_id, payload, jobs, routes, accepted_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
_SKIP = "INSERT OR REPLACE INTO outcomes VALUES (?, ?, '', 'skipped', NULL, ?, 0, ?)"


def accept_op(c: sqlite3.Connection, tenant: str, message_id: str, payload: bytes,
              jobs: Sequence[tuple[str, str, str, str]], now: float, ttl: float,
              skips: Sequence[tuple[str, str]]) -> bool:
    """Store one accepted event in the open transaction (`accept_many` of one). False when the messageId was seen
    within the ttl."""
    return accept_many(c, [(tenant, message_id, payload, jobs, now, ttl, skips)])[0]


def accept_many(c: sqlite3.Connection, accepts: Sequence[Accept]) -> list[bool]:
    """Store accepted events in the open transaction, each as if alone (tenant, message id, payload, jobs as
    (vendor, target, event name, batch key), now, ttl, skips as (vendor, reason)): its idempotency record, the event
    with its jobs as one JSON column, its counters and its skips. Per event, False when its messageId was seen within
    the ttl (a messageId twice in one call is new only the first time). The jobs' own rows are written later, off
    the accept path, by `fan_out_op`.

    Two statements per accept (three with skips). The counters of the call are summed and written once (on a
    `WriterConnection` inside `Committer.run_begun`, once per transaction, just before COMMIT), and the events' ids
    are known before their idempotency records are written (AUTOINCREMENT's own sequence, read once), so a record
    needs no second write to point at its event: the statements of an accept took 16.5 µs of CPU instead of 20.2
    (transactions of ten; 0.13.2's benchmark figures). The accept writer stores a whole group in one call: one
    function call per transaction instead of a closure and a call per accept. Writing the four job rows of an Order
    Completed here (until 0.13.5) was the larger part of the accept writer's work: without them the accept path took
    0.29-0.30x of bare Starlette instead of 0.23-0.24x (README, 0.13.6)."""
    execute = c.execute
    next_id: int | None = None  # the id the next event stored here gets
    bumps: dict[str, int] = {}
    fresh: list[bool] = []
    for tenant, message_id, payload, jobs, now, ttl, skips in accepts:
        if jobs and next_id is None:
            next_id = _next_event_id(c)
        event_id = next_id if jobs else None
        # Inserted, or replaced an expired record: new. An unexpired record: a duplicate (no row changed).
        new = execute(_SEEN, (tenant, message_id, now + ttl, event_id, now)).rowcount > 0
        fresh.append(new)
        if not new or event_id is None:
            continue
        size = len(payload)
        execute(_EVENT, (event_id, tenant, message_id, payload, len(jobs), orjson.dumps(jobs).decode(), now))
        next_id = event_id + 1
        for job in jobs:
            counter = f"pending:{job[0]}"
            bumps[counter] = bumps.get(counter, 0) + 1
        queued = size * len(jobs)
        for counter in (f"bytes:{tenant}", f"bytes:{ALL_TENANTS}"):
            bumps[counter] = bumps.get(counter, 0) + queued
        if skips:
            c.executemany(_SKIP, [(event_id, vendor, reason, now) for vendor, reason in skips])
    if isinstance(c, WriterConnection) and c.deferring and next_id is not None:
        c.next_event_id = next_id
    if bumps:
        _bump_at_commit(c, list(bumps.items()))
    return fresh


def fan_out_op(c: sqlite3.Connection, limit: int = FAN_OUT_EVENTS) -> int:
    """Write the job rows of up to `limit` events accepted since the last fan-out, in the open transaction, in the
    order they were accepted; how many events that was. Ids only grow and one transaction writes at a time, so
    every event past the cursor is complete and each is fanned out exactly once."""
    (cursor,) = c.execute("SELECT value FROM cursors WHERE name = 'fanned_out'").fetchone()
    count, last = c.execute("SELECT COUNT(*), MAX(id) FROM (SELECT id FROM events WHERE id > ? ORDER BY id LIMIT ?)",
                            (cursor, limit)).fetchone()
    if not count:
        return 0
    c.execute(
        "INSERT INTO jobs (event_id, vendor, target, tenant, event_name, batch_key, size, created_at, due_at)"
        " SELECT e.id, json_extract(j.value, '$[0]'), json_extract(j.value, '$[1]'), e.tenant,"
        " json_extract(j.value, '$[2]'), json_extract(j.value, '$[3]'), length(e.payload), e.accepted_at,"
        " e.accepted_at FROM events e, json_each(e.routes) j WHERE e.id > ? AND e.id <= ? ORDER BY e.id, j.key",
        (cursor, last))
    c.execute("UPDATE cursors SET value = ? WHERE name = 'fanned_out'", (last,))
    return int(count)


def _others_due(c: sqlite3.Connection, vendor: str, now: float, limit: int, skip: Collection[str]) -> list[Any]:
    """Up to `limit` due jobs of the vendor whose tenant is not in `skip`, oldest first, among its first LOOK_SCAN
    due jobs. The skipped tenants' jobs are passed over, not leased: a look used to lease them too (up to 1,000, with
    their events' payloads, from every share) and hand them back in a second transaction; with 1,000,000 postbacks
    of another tenant queued but not due that held the write lock up to 50 ms at a time while accepts waited
    (README, 0.13.18)."""
    skipped = list(skip)
    return c.execute(
        _JOB_SELECT + " WHERE j.id IN (SELECT id FROM (SELECT id, tenant, due_at FROM jobs WHERE vendor = ?"  # noqa: S608
        " AND dead = 0 AND due_at <= ? ORDER BY due_at LIMIT ?)"
        f" WHERE tenant NOT IN ({_marks(len(skipped))}) ORDER BY due_at LIMIT ?) ORDER BY j.due_at",
        (vendor, now, LOOK_SCAN, *skipped, limit)).fetchall()


def require_json_functions(conn: sqlite3.Connection) -> None:
    """`fan_out_op` reads an event's routes with SQLite's JSON functions: a build without them is refused at once."""
    try:
        conn.execute("SELECT json_extract('[1]', '$[0]')")
    except sqlite3.OperationalError:
        raise StoreError(f"SQLite {sqlite3.sqlite_version} was built without its JSON functions, which this store "
                         f"needs (SQLite 3.38 or later has them built in)") from None


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
        bump_counters(c, bumps)
        return
    pending = c.bumps
    for name, amount in bumps:
        pending[name] = pending.get(name, 0) + amount


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
        bump_counters(c, [("identities", len(keys) - known)])


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


def _key(row: Sequence[Any]) -> KeyRecord:
    return KeyRecord(row[0], row[1], row[2], row[3], row[4], tuple(v for v in row[5].split(",") if v),
                     bool(row[6]))


def _job(row: Sequence[Any]) -> Job:
    return Job(str(row[0]), str(row[1]), row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9], row[10],
               row[11], str(row[0]))
