"""The accept writer (app/store/accept_writer.py) as a real process on a real SQLite file: stores what several
HTTP processes' stores send it, exactly once, answers a duplicate as one, and a caller whose writer is gone gets a
StoreUnavailableError (a 503), then is served again by the next writer."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from app.store import NewJob, StoreUnavailableError, accept_writer
from app.store.accept_writer import MAX_FRAME, frame, frames
from app.store.sqlite import SQLiteStore
from app.supervisor import ACCEPT_WRITER_SLOT, AcceptWriterProcess
from tests.support import unix_listening, wait_until

JOBS = [NewJob("segmentstream", "track", "Order Completed", ""), NewJob("audiohook", "pixel", "Order Completed", "")]


class Writer:
    def __init__(self, tmp: Path) -> None:
        self.database = tmp / "queue.db"
        self.socket = str(tmp / "w.sock")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Writer:
        with (self.database.parent / "writer.log").open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "app", "accept-writer", "--database",
                                          str(self.database), "--socket", self.socket,
                                          "--slot", str(ACCEPT_WRITER_SLOT)], stderr=log)
        assert wait_until(self.listening, 15)
        return self

    def listening(self) -> bool:
        return unix_listening(self.socket)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(15)


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[Writer]:
    started = Writer(tmp_path).start()
    yield started
    if started.proc is not None and started.proc.poll() is None:
        started.stop(signal.SIGKILL)


def http_store(writer: Writer, slot: int) -> SQLiteStore:
    """What an HTTP process of serve opens: its own store, with the accept writer's socket."""
    return SQLiteStore(str(writer.database), slot=slot, accept_writer=writer.socket)


@pytest.fixture
async def store(writer: Writer) -> AsyncIterator[SQLiteStore]:
    opened = http_store(writer, 0)
    yield opened
    await opened.close()


async def test_accepts_from_two_http_processes_are_stored_once_each(writer: Writer) -> None:
    first, second = http_store(writer, 0), http_store(writer, 1)
    try:
        now = time.time()
        ids = [f"m-{i}" for i in range(300)]
        answers = await asyncio.gather(
            *(store.accept("acme", message_id, b"x" * 100, JOBS, now=now, ttl=3600)
              for message_id in ids for store in (first, second)))
        assert sorted(answers) == [False] * 300 + [True] * 300  # each id: one store first, the other a duplicate
        counts = await first.counts()
        assert counts.pending == {"segmentstream": 300, "audiohook": 300}
        assert counts.queued_bytes["acme"] == 300 * 2 * 100
        leased = await second.lease("audiohook", now=now + 1, limit=1000, lease_seconds=60)
        assert sorted(job.message_id for job in leased) == sorted(ids)
        assert await first.accept("acme", "m-0", b"x", JOBS, now=now + 2, ttl=3600) is False  # still a duplicate
    finally:
        await first.close()
        await second.close()


async def test_a_skip_is_recorded_with_its_reason(store: SQLiteStore) -> None:
    fresh = await store.accept("acme", "skipped-1", b"x", JOBS[:1], now=time.time(), ttl=3600,
                               skips=[("tracify", "no tracifyApiToken")])
    assert fresh is True
    trace = await store.trace("skipped-1", "acme")
    assert {(o.vendor, o.state, o.detail) for o in trace if o.vendor == "tracify"} == {
        ("tracify", "skipped", "no tracifyApiToken")}


async def test_without_its_writer_an_accept_is_unavailable_then_served_by_the_next_one(
        writer: Writer, store: SQLiteStore) -> None:
    assert await store.accept("acme", "before", b"x", JOBS, now=time.time(), ttl=3600) is True
    writer.stop(signal.SIGKILL)
    with pytest.raises(StoreUnavailableError, match="accept writer"):
        await store.accept("acme", "while-gone", b"x", JOBS, now=time.time(), ttl=3600)
    writer.start()
    assert await store.accept("acme", "while-gone", b"x", JOBS, now=time.time(), ttl=3600) is True
    assert (await store.counts()).pending == {"segmentstream": 2, "audiohook": 2}


async def test_sigterm_stores_what_arrived_then_exits_cleanly(writer: Writer, store: SQLiteStore) -> None:
    assert await store.accept("acme", "last", b"x", JOBS, now=time.time(), ttl=3600) is True
    assert writer.stop() == 0
    assert not os.path.exists(writer.socket)


async def test_a_turn_of_large_events_leaves_in_several_frames_and_each_is_stored(store: SQLiteStore) -> None:
    """Requests of one turn share a frame up to FLUSH_BYTES of payload; past it the rest go in the next one."""
    payload = b"x" * (accept_writer.FLUSH_BYTES // 8)
    answers = await asyncio.gather(*(store.accept("acme", f"big-{i}", payload, JOBS, now=time.time(), ttl=3600)
                                     for i in range(20)))
    assert answers == [True] * 20
    assert (await store.counts()).queued_bytes["acme"] == 20 * len(JOBS) * len(payload)


class Wire:
    """A transport that keeps what is written to it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def get_write_buffer_size(self) -> int:
        return 0


async def test_the_requests_of_one_turn_leave_in_one_frame_and_their_answers_come_back_in_one() -> None:
    client = accept_writer.AcceptWriterClient("unused")
    wire = Wire()
    client.connection_made(wire)  # type: ignore[arg-type]
    futures = [client.submit(("acme", f"m-{i}", b"payload", [], 1.0, 60.0, []), 5.0) for i in range(3)]
    await asyncio.sleep(0)  # the end of the turn
    assert len(wire.writes) == 1
    sent = frames(bytearray(wire.writes[0]))
    assert [[request[:3] for request in batch] for batch in sent] == [[(1, "acme", "m-0"), (2, "acme", "m-1"),
                                                                       (3, "acme", "m-2")]]
    client.data_received(frame([(1, True, ""), (2, False, ""), (3, None, "unavailable: disk full")]))
    assert [futures[0].result(), futures[1].result()] == [True, False]
    with pytest.raises(StoreUnavailableError, match="disk full"):
        futures[2].result()


def test_a_group_is_stored_by_one_call_and_redone_request_by_request_when_one_fails(tmp_path: Path) -> None:
    """The writer stores a transaction's accepts in one `accept_many` call; when one of them cannot be stored, the
    group rolls back and each is redone alone: the others are stored once, the broken one gets its own error."""
    path = tmp_path / "queue.db"
    SQLiteStore(str(path))  # the schema
    committer = SQLiteStore(str(path), durable=True).accept_committer()
    jobs = [("tracify", "events", "Order Completed", "")]

    def request(request_id: int, message_id: str, payload: object = b"sealed") -> tuple[object, ...]:
        return (request_id, "acme", message_id, payload, jobs, 1.0, 60.0, [])

    peer = object()
    together = accept_writer._committed(committer, [(peer, request(1, "a")), (peer, request(2, "b")),
                                                    (peer, request(3, "a"))])
    assert [(token[1], fresh, error) for token, fresh, error in together] == [(1, True, None), (2, True, None),
                                                                              (3, False, None)]
    assert committer.commits == 1
    broken = accept_writer._committed(committer, [(peer, request(4, "c")), (peer, request(5, "d", {"not": "bytes"})),
                                                  (peer, request(6, "e"))])
    assert [(token[1], fresh, type(error).__name__ if error else None) for token, fresh, error in broken] == [
        (4, True, None), (5, None, "StoreError"), (6, True, None)]
    conn = committer.conn
    assert conn.execute("SELECT message_id FROM events ORDER BY id").fetchall() == [("a",), ("b",), ("c",), ("e",)]
    assert dict(conn.execute("SELECT name, value FROM counters")) == {
        "pending:tracify": 4, "bytes:acme": 4 * 6, "bytes:*": 4 * 6}


def test_frames_wait_for_their_last_byte_and_refuse_a_broken_length() -> None:
    data = frame((1, "acme", b"payload")) + frame((2, None, "unavailable: disk"))
    buffer = bytearray(data[:-3])
    assert frames(buffer) == [(1, "acme", b"payload")]
    buffer += data[-3:]
    assert frames(buffer) == [(2, None, "unavailable: disk")] and buffer == bytearray()
    with pytest.raises(ValueError, match="frame of"):
        frames(bytearray((MAX_FRAME + 1).to_bytes(4, "little") + b"x"))


def test_serve_gives_its_writer_its_own_database_by_absolute_path(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Not whatever the child's environment says (an app built with a configuration of its own, as the benchmark
    in bench/accept_cpu.py does, had its accepts stored in ./var/segrelay.db)."""
    monkeypatch.chdir(tmp_path)
    writer = AcceptWriterProcess(Path("var/queue.db"), 1)
    try:
        args, _ = writer._command(0)
        assert args[args.index("--database") + 1] == str(tmp_path / "var" / "queue.db")
    finally:
        shutil.rmtree(writer.directory)


async def test_a_writer_that_stops_reading_costs_a_bounded_backlog_then_503s(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer stuck on a disk keeps its socket open but reads nothing: the HTTP process stops queueing frames for
    it past MAX_BACKLOG and answers 503 at once, instead of holding every timed-out accept in memory."""
    monkeypatch.setattr(accept_writer, "MAX_BACKLOG", 256 * 1024)
    path = str(tmp_path / "stuck.sock")
    stuck = accept_writer.listening_socket(path)  # listens, never accepts nor reads
    client = accept_writer.AcceptWriterClient(path)
    calls: list[asyncio.Future[object]] = []

    async def send_until_refused() -> BaseException | None:
        for i in range(10_000):
            calls.append(asyncio.ensure_future(client.call(("acme", f"m{i}", b"x" * 4096, [], 1.0, 60.0, []))))
            await asyncio.sleep(0)  # the frame leaves at the end of the turn
            if calls[-1].done():
                return calls.pop().exception()
        return None
    try:
        refused = await send_until_refused()
        assert isinstance(refused, StoreUnavailableError) and "not keeping up" in str(refused)
        assert 256 * 1024 // 4096 < len(calls) < 10_000  # the kernel's buffer and the backlog, no more
    finally:
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        client.close()
        stuck.close()


async def test_requests_past_their_deadline_fail_with_timeout_each_write_on_its_own(tmp_path: Path) -> None:
    """A writer that never answers: each write's requests fail with TimeoutError at their own deadline, those of a
    later write later (deadlines are kept per write, the oldest watched)."""
    path = str(tmp_path / "silent.sock")
    silent = accept_writer.listening_socket(path)  # the kernel accepts the connection; nobody reads or answers
    client = accept_writer.AcceptWriterClient(path)
    request = ("acme", "m", b"x", [], 1.0, 60.0, [])
    try:
        started = time.monotonic()
        first = [asyncio.ensure_future(client.call(request, timeout=0.3)) for _ in range(3)]
        await asyncio.sleep(0.15)
        second = asyncio.ensure_future(client.call(request, timeout=0.3))
        untimed = asyncio.ensure_future(client.call(request))
        done, _ = await asyncio.wait(first, timeout=5)
        first_at = time.monotonic() - started
        assert len(done) == 3 and all(isinstance(call.exception(), TimeoutError) for call in first)
        assert not second.done()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(second, 5)
        second_at = time.monotonic() - started
        assert 0.3 <= first_at < 1.0 and first_at < second_at and 0.45 <= second_at < 1.5
        assert not untimed.done()  # no timeout, no deadline
        untimed.cancel()
    finally:
        client.close()
        silent.close()
