"""Writing to one SQLite file that several processes share: transactions in groups, one writer at a time, the
HTTP side first.

A writer's connection (`connect_writer`: WAL, its synchronous level, big caches) runs its operations through a
`Committer`: whatever has queued up, in one transaction, each operation alone if the group fails, and a caller
learns success only after COMMIT returns. In an HTTP process they run on a thread of their own (`ThreadWriter`),
so the event loop never blocks on the disk; in a delivery process on its event loop (`LoopWriter`), where waiting
for the lock is an await and the statements then run without a pause; the accept writer
(app/store/accept_writer.py), a process with no event loop, drives a `Committer` itself.

SQLite serialises the writers of the file. A writer retries BEGIN itself rather than through SQLite's busy handler,
whose sleeps grow to 100 ms and would show as long tails: the HTTP side every half millisecond, delivery in pauses
growing to 4 ms (`_pauses`). The HTTP side goes first: while one of its writers waits for the lock it says so in its
byte of a small file beside the database (`<name>-priority`, `WriterPriority`); delivery processes do not begin
meanwhile, and a writer that has just committed lets a waiting one of its kind have the next turn (`lock_steps`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import mmap
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from app.deadlines import within
from app.store import StoreError, StoreUnavailableError

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
# A writer reads the pages it changes through a map of the file, not a read() call per page: every commit of another
# process empties a connection's page cache, and a growing queue's busiest pages (the newest events and jobs) are
# at the file's end. SQLite's own ceiling (2 GB, larger values are cut to it): with a 256 MB map, a delivery process
# under a backlog of 1,000,000 postbacks (a 1.2 GB file) made three times the read calls it makes on a small file,
# and accepts waited behind its longer transactions (README, 0.13.13). The map takes address space, not memory: its
# pages are the file's own cache, which the kernel can drop.
MMAP_BYTES = 2_147_418_112
# Pages a writer's connection keeps besides the map: those it changed and those it read from the WAL. 64 MB, so that
# a delivery process's index pages stay at hand at depth. Not for the accept writer: at the end of every transaction
# SQLite walks the page cache's whole hash table (pcache1's truncate), whose size follows the most pages the cache
# ever held, and an accept writer's cache fills with the random pages of the idempotency index (messageIds are
# random), so a 64 MB cache cost it 14 % of its CPU in that walk. 4 MB holds a full WAL's worth of pages (SQLite
# checkpoints it at 1,000) and cost it under 2 % (README, 0.13.17).
CACHE_KIB = 65_536
ACCEPT_WRITER_CACHE_KIB = 4_096


class _Stop:
    pass


_PAUSED = {"depth": 0, "resume": False}  # writers of this process inside `collector_paused`, and the collector's state
_PAUSED_LOCK = threading.Lock()


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's garbage collector waits while this process holds SQLite's write lock; what it would have collected
    meanwhile is collected at the next allocation after.

    Every other writer of the file waits for the lock, the accept writer (and Segment's requests) first. A delivery
    process keeps thousands of parsed events, and its young collections took 15-270 ms of wall time at its lower
    priority: one that fell inside a transaction held the lock as long (timers and a collector callback in a
    patched copy under `bench/e2e.py`: a `lease` of 22 ms with a collection inside; statements of one operation
    taking 16-29 ms of CPU, each a stall of every accept in flight).
    Nested and concurrent pauses (a process's writer thread and its event loop) resume the collector once, at the
    last one's end, and only if it was running before the first."""
    with _PAUSED_LOCK:
        if _PAUSED["depth"] == 0:
            _PAUSED["resume"] = gc.isenabled()
            gc.disable()
        _PAUSED["depth"] += 1
    try:
        yield
    finally:
        with _PAUSED_LOCK:
            _PAUSED["depth"] -= 1
            if _PAUSED["depth"] == 0 and _PAUSED["resume"]:
                gc.enable()


class WriterConnection(sqlite3.Connection):
    """A writer's connection, and what its open transaction's accepts (`accept_op`, app/store/sqlite.py) leave to
    write at COMMIT:
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

    Used by a `ThreadWriter`'s thread, and by the accept writer process (app/store/accept_writer.py) on its own."""

    def __init__(self, conn: sqlite3.Connection, *, priority: WriterPriority | None = None,
                 urgent: bool = False) -> None:
        self.conn, self.priority, self.urgent = conn, priority, urgent
        self.commits = 0  # transactions committed (group commit makes this much smaller than operations)
        self.waited = 0.0  # seconds the last `run` waited for the write lock (another process held it)

    def run(self, group: Sequence[tuple[Callable[[sqlite3.Connection], Any], Any]]) -> list[Any]:
        """Run the group (operations, each with a token) in one transaction; if it fails, redo each operation in
        its own transaction. Returns (token, value, error) per operation.

        A caller learns success only once its transaction has committed: results are collected first and handed
        out after COMMIT returns. A failed COMMIT (a full disk, an I/O error) fails every operation in it.
        """
        self.waited = 0.0
        try:
            self._begin(self.conn)
        except Exception as exc:
            rollback(self.conn)
            if len(group) == 1:
                return [(group[0][1], None, store_error(exc))]
        else:
            done = self.run_begun(group)
            if not isinstance(done, BaseException):
                return done
            if len(group) == 1:
                return [(group[0][1], None, store_error(done))]
        results: list[tuple[Any, Any, StoreError | None]] = []
        for operation in group:
            try:
                self._begin(self.conn)
            except Exception as exc:
                rollback(self.conn)
                results.append((operation[1], None, store_error(exc)))
                continue
            alone = self.run_begun([operation])
            results += [(operation[1], None, store_error(alone))] if isinstance(alone, BaseException) else alone
        return results

    def run_begun(self, group: Sequence[tuple[Callable[[sqlite3.Connection], Any], Any]]
                  ) -> list[Any] | BaseException:
        """The group in the transaction just begun: (token, value, None) per operation once COMMIT has returned,
        or the exception that made it roll back."""
        conn = self.conn
        deferring = conn if isinstance(conn, WriterConnection) else None
        with collector_paused():  # the write lock is held from BEGIN to here: no collection inside it
            try:
                if deferring is not None:
                    deferring.defer(True)
                values = [fn(conn) for fn, _ in group]
                if deferring is not None and deferring.bumps:
                    bump_counters(conn, list(deferring.bumps.items()))
                conn.execute("COMMIT")
            except Exception as exc:
                rollback(conn)
                return exc
            finally:
                if deferring is not None:
                    deferring.defer(False)
        self.commits += 1
        return [(token, value, None) for (_, token), value in zip(group, values, strict=True)]

    def _begin(self, conn: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE (`lock_steps`), sleeping between attempts: this writer's thread has nothing else to do.
        The time until the lock is held adds to `waited`."""
        started = time.perf_counter()
        try:
            with contextlib.closing(lock_steps(conn, self.priority, urgent=self.urgent)) as steps:
                for pause in steps:
                    time.sleep(pause)
        finally:
            self.waited += time.perf_counter() - started


class ThreadWriter:
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
                    loop.call_soon_threadsafe(resolve_futures, entries)
        self.committer.conn.close()


class LoopWriter:
    """A delivery process's writes, on its event loop's own thread: the operations that queued up meanwhile (up to
    `max_group`) in one transaction, run without a pause once SQLite's write lock is held. Waiting for the lock,
    and giving way to the accept writer first (`WriterPriority`), is an `await`, never a block.

    On a writer thread (`ThreadWriter`), every SQLite step gives up Python's GIL, and taking it back waits for the event
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
                resolve_futures([(fut, None, store_error(exc)) for _, fut in group])
                continue
            done = self.committer.run_begun(group)
            if isinstance(done, BaseException):  # each alone, so that only a failing one fails
                done = [(group[0][1], None, store_error(done))] if len(group) == 1 else await self._each_alone(group)
            resolve_futures(done)

    async def _each_alone(self, group: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]]
                          ) -> list[Any]:
        results: list[Any] = []
        for operation in group:
            try:
                await self._begin()
            except Exception as exc:
                results.append((operation[1], None, store_error(exc)))
                continue
            alone = self.committer.run_begun([operation])
            results += [(operation[1], None, store_error(alone))] if isinstance(alone, BaseException) else alone
        return results

    async def _begin(self) -> None:
        """BEGIN IMMEDIATE (`lock_steps`), awaiting between attempts: the event loop goes on meanwhile."""
        committer = self.committer
        with contextlib.closing(lock_steps(committer.conn, committer.priority, urgent=committer.urgent)) as steps:
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
        private_file(path)
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


def connect_writer(path: Path, *, durable: bool, prepare: Callable[[sqlite3.Connection], object],
                   mmap: bool = True, cache_kib: int = CACHE_KIB) -> sqlite3.Connection:
    """A writer's connection: WAL, its synchronous level, a page cache of `cache_kib` KB, the file mapped;
    `prepare` creates or migrates the schema while SQLite's own busy handler still waits for other processes."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=LOCK_TIMEOUT,
                           factory=WriterConnection)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
    conn.execute(f"PRAGMA cache_size=-{int(cache_kib)}")
    if mmap:
        conn.execute(f"PRAGMA mmap_size={MMAP_BYTES}")
    prepare(conn)
    conn.execute("PRAGMA busy_timeout=0")  # from here on, a writer waits for the lock itself (lock_steps)
    return conn


def bump_counters(c: sqlite3.Connection, bumps: Sequence[tuple[str, int]]) -> None:
    """Counter changes (name, amount to add), in one statement on the `counters` table (app/store/sqlite.py's
    schema): here because a `Committer` writes its transaction's deferred changes with it."""
    if bumps:
        c.execute("INSERT INTO counters VALUES " + ", ".join(["(?, ?)"] * len(bumps))  # noqa: S608
                  + " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                  [v for bump in bumps for v in bump])


def private_file(path: Path) -> None:
    """The database folder (0700) and file (0600) are private; SQLite gives -wal and -shm the file's mode."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    with contextlib.suppress(OSError):  # not ours to change (a mounted volume): best effort
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)


def lock_steps(conn: sqlite3.Connection, priority: WriterPriority | None, *,
                urgent: bool) -> Generator[float, None, None]:
    """BEGIN IMMEDIATE for a writer, as the pauses to wait between attempts: a writer thread sleeps them, a delivery
    process's event loop awaits them. A delivery writer (not `urgent`) first gives way to the HTTP processes; any
    writer lets another waiting one of its kind have its turn, then says it is waiting while it waits (see
    WriterPriority), in short steps (`_pauses`) up to LOCK_TIMEOUT."""
    if priority is not None:
        if not urgent:
            yield from give_way(priority.wanted, GIVE_WAY_SECONDS, urgent)
        yield from give_way(priority.others_waiting, TURN_SECONDS, urgent)
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


def give_way(waiting: Callable[[], bool], seconds: float, urgent: bool) -> Generator[float, None, None]:
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


def rollback(conn: sqlite3.Connection) -> None:
    """Undo an open transaction; SQLite may already have rolled it back after a failed COMMIT."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def store_error(exc: BaseException) -> StoreError:
    """Locked, busy, full or failing disks are passing conditions (503); anything else is our bug (500)."""
    if isinstance(exc, sqlite3.OperationalError):
        return StoreUnavailableError(f"sqlite: {exc}")
    if isinstance(exc, sqlite3.Error):
        return StoreError(f"sqlite: {exc}")
    return StoreError(f"sqlite: {type(exc).__name__} in a store operation")


def resolve_futures(entries: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for fut, result, error in entries:
        if fut.done():
            continue
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
