"""SQLite's write lock: HTTP processes (durable writers) say when they wait; delivery processes give way to them, and
processes of one kind take turns."""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.store import StoreError
from app.store.sqlite import SQLiteStore
from app.store.sqlite_writers import (
    DELIVERY_SLOTS,
    GIVE_WAY_SECONDS,
    LOCK_POLL,
    LOCK_POLL_MAX,
    PRIORITY_SLOTS,
    TURN_SECONDS,
    Committer,
    collector_paused,
    give_way,
    lock_steps,
)


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[tuple[SQLiteStore, SQLiteStore]]:
    """The HTTP process's store and a delivery process's, on one file (as `segrelay serve` runs them)."""
    http = SQLiteStore(str(tmp_path / "store.db"))
    delivery = SQLiteStore(str(tmp_path / "store.db"), durable=False)
    yield http, delivery
    await delivery.close()
    await http.close()


async def test_the_http_process_flags_its_wait_for_the_write_lock(stores: tuple[SQLiteStore, SQLiteStore],
                                                                  tmp_path: Path) -> None:
    http, delivery = stores
    holder = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    ping = asyncio.create_task(http.ping())
    deadline = time.monotonic() + 5
    while not delivery.priority.wanted() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    assert delivery.priority.wanted()  # seen through the file by the other store, as another process would
    assert not ping.done()
    holder.execute("COMMIT")
    await asyncio.wait_for(ping, 5)
    assert not delivery.priority.wanted()  # cleared once it has the lock
    holder.close()


async def test_a_delivery_process_gives_way_while_the_http_process_waits(
        stores: tuple[SQLiteStore, SQLiteStore]) -> None:
    http, delivery = stores
    http.priority.want(True)
    ping = asyncio.create_task(delivery.ping())
    await asyncio.sleep(GIVE_WAY_SECONDS / 3)
    assert not ping.done()  # it did not begin while the flag was up
    http.priority.want(False)
    await asyncio.wait_for(ping, 5)


async def test_a_flag_left_behind_only_delays_delivery_briefly(stores: tuple[SQLiteStore, SQLiteStore]) -> None:
    http, delivery = stores
    http.priority.want(True)  # as if the HTTP process died while waiting
    await asyncio.wait_for(delivery.ping(), 5)  # gives way for GIVE_WAY_SECONDS at most, then goes on
    reopened = SQLiteStore(str(http.path))  # a new HTTP process clears it
    assert not delivery.priority.wanted()
    await reopened.close()


async def test_http_processes_take_turns_at_the_write_lock(tmp_path: Path) -> None:
    """With several HTTP processes (serve's SEGRELAY_HTTP_PROCESSES), one that has just committed lets another that
    waits go first, rather than beginning again at once (without turns one starved the other: p99 118 ms)."""
    first = SQLiteStore(str(tmp_path / "store.db"), slot=0)
    second = SQLiteStore(str(tmp_path / "store.db"), slot=1)
    try:
        assert not first.priority.others_waiting()
        first.priority.want(True)
        assert not first.priority.others_waiting()  # its own flag is not someone else's turn
        assert second.priority.others_waiting()
        first.priority.want(False)
        second.priority.want(True)  # the second waits for the lock
        assert first.priority.others_waiting() and first.priority.wanted()
        ping = asyncio.create_task(first.ping())
        await asyncio.sleep(TURN_SECONDS / 3)
        assert not ping.done()  # the first lets it go first
        second.priority.want(False)
        await asyncio.wait_for(ping, 5)
        second.priority.want(True)  # left behind by a crash: only a short delay
        await asyncio.wait_for(first.ping(), 5)
    finally:
        await second.close()
        await first.close()


async def test_delivery_processes_take_turns_among_themselves_and_never_hold_up_an_accept(tmp_path: Path) -> None:
    """Two delivery processes without turns waited 10-35 % of the time for each other's write lock, up to 190 ms at
    once, and their dispatchers with them."""
    http = SQLiteStore(str(tmp_path / "store.db"))
    first = SQLiteStore(str(tmp_path / "store.db"), durable=False, slot=PRIORITY_SLOTS)
    second = SQLiteStore(str(tmp_path / "store.db"), durable=False, slot=PRIORITY_SLOTS + 1)
    try:
        second.priority.want(True)  # the second delivery process waits for the lock
        assert first.priority.others_waiting()
        assert not http.priority.wanted() and not http.priority.others_waiting()  # not an HTTP process's turn
        ping = asyncio.create_task(first.ping())
        await asyncio.sleep(TURN_SECONDS / 3)
        assert not ping.done()  # the first lets it go first
        second.priority.want(False)
        await asyncio.wait_for(ping, 5)
        http.priority.want(True)  # an HTTP process's flag is not a delivery process's turn, and both give way to it
        assert not first.priority.others_waiting() and first.priority.wanted()
        http.priority.want(False)
    finally:
        for store in (second, first, http):
            await store.close()


async def test_a_delivery_store_takes_a_delivery_slot_by_default(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "store.db"), durable=False)
    try:
        assert PRIORITY_SLOTS <= store.priority.slot < PRIORITY_SLOTS + DELIVERY_SLOTS
    finally:
        await store.close()


def test_a_slot_outside_the_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="slot 128 is out of range"):
        SQLiteStore(str(tmp_path / "store.db"), slot=PRIORITY_SLOTS + DELIVERY_SLOTS)


async def test_the_one_byte_file_of_an_earlier_version_grows_to_every_slot(tmp_path: Path) -> None:
    (tmp_path / "store.db-priority").write_bytes(b"\1")  # 0.4.0's file, its flag left up by a crash
    store = SQLiteStore(str(tmp_path / "store.db"), slot=3)
    try:
        assert (tmp_path / "store.db-priority").stat().st_size == PRIORITY_SLOTS + DELIVERY_SLOTS
        assert store.priority.others_waiting()  # slot 0's old flag still counts (a delivery gives way briefly)
        await asyncio.wait_for(store.ping(), 5)
    finally:
        await store.close()


async def test_a_delivery_store_waits_for_the_lock_without_blocking_its_event_loop(
        stores: tuple[SQLiteStore, SQLiteStore], tmp_path: Path) -> None:
    """A delivery process's writes run on its event loop (`LoopWriter`): waiting for the lock is an await, so its
    requests to vendors go on meanwhile, and the lock is then held only for the statements themselves."""
    _, delivery = stores
    holder = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    ping = asyncio.create_task(delivery.ping())
    ticks = 0
    for _ in range(20):
        await asyncio.sleep(0.005)
        ticks += 1
    assert ticks == 20 and not ping.done()  # the loop ran on while the write waited
    holder.execute("COMMIT")
    await asyncio.wait_for(ping, 5)
    holder.close()


async def test_a_delivery_stores_writes_of_one_turn_share_a_transaction_and_a_failing_one_fails_alone(
        stores: tuple[SQLiteStore, SQLiteStore]) -> None:
    _, delivery = stores
    before = delivery.commits
    await asyncio.gather(*(delivery.ping() for _ in range(5)))
    assert delivery.commits == before + 1
    results = await asyncio.gather(delivery.ping(), delivery._call(lambda c: c.execute("SELECT * FROM nowhere")),
                                   delivery.ping(), return_exceptions=True)
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], StoreError) and "nowhere" in str(results[1])
    assert delivery.commits == before + 3  # the group failed, then each went alone: the two good ones committed


def test_delivery_waits_for_the_lock_in_growing_steps_and_the_http_side_in_short_ones(tmp_path: Path) -> None:
    """Each failed BEGIN costs system calls and, in a delivery process, an event loop turn: at a steady 0.5 ms a
    delivery process failed about ten BEGINs per success under bench/e2e.py's load. Its pauses double up to
    LOCK_POLL_MAX; the HTTP side (urgent: an accept waits) keeps looking every LOCK_POLL."""
    holder = sqlite3.connect(tmp_path / "q.db", isolation_level=None)
    waiter = sqlite3.connect(tmp_path / "q.db", isolation_level=None, timeout=0)
    holder.execute("BEGIN IMMEDIATE")
    try:
        for urgent, expected in ((False, [LOCK_POLL * 2 ** n for n in range(4)] + [LOCK_POLL_MAX] * 2),
                                 (True, [LOCK_POLL] * 6)):
            steps = lock_steps(waiter, None, urgent=urgent)
            assert [next(steps) for _ in range(6)] == expected
            steps.close()
            # So do its pauses while it gives way to a waiting HTTP process or lets another delivery process have
            # its turn: at a steady 0.5 ms a delivery process looked about 60 times per transaction.
            turns = give_way(lambda: True, TURN_SECONDS, urgent)
            assert [next(turns) for _ in range(6)] == expected
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        waiter.close()


async def test_no_garbage_collection_while_a_process_holds_the_write_lock(
        stores: tuple[SQLiteStore, SQLiteStore]) -> None:
    """A collection inside a transaction held the write lock for its whole length, and every accept waited: the
    collector waits while a writer holds the lock, in both kinds of writer, and runs again once it is released."""
    http, delivery = stores
    seen: list[bool] = []

    def look(c: sqlite3.Connection) -> None:
        assert c.in_transaction
        seen.append(gc.isenabled())

    assert gc.isenabled()
    await http._call(look)  # the HTTP process's writer thread
    await delivery._call(look)  # a delivery process's event loop
    assert seen == [False, False]
    assert gc.isenabled()


def test_paused_collection_resumes_once_after_nested_pauses_and_never_if_it_was_off() -> None:
    with collector_paused():
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer pause is still on
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # it was off before: it stays off
    finally:
        gc.enable()


def test_a_failing_transaction_resumes_the_collector(tmp_path: Path) -> None:
    committer = Committer(sqlite3.connect(tmp_path / "plain.db", isolation_level=None))
    committer.conn.execute("BEGIN IMMEDIATE")

    def fail(c: sqlite3.Connection) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    assert isinstance(committer.run_begun([(fail, "token")]), sqlite3.OperationalError)
    assert gc.isenabled()
    committer.conn.close()


def test_a_committer_counts_its_wait_for_the_write_lock(tmp_path: Path) -> None:
    """`Committer.waited` is the time its last transaction waited for another process's write lock (the accept
    writer exports it as segrelay_accept_writer_lock_wait_seconds): here the lock is held 0.2 s after the committer
    starts, and given back; the next transaction, with the lock free, counts its own wait only."""
    path = tmp_path / "plain.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")
    committer = Committer(sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0))
    starting = threading.Event()
    done: list[Any] = []

    def write() -> None:
        starting.set()
        done.extend(committer.run([(lambda c: c.execute("INSERT INTO t VALUES (1)"), "token")]))

    writer = threading.Thread(target=write)
    writer.start()
    starting.wait(5)
    time.sleep(0.2)
    holder.execute("COMMIT")
    writer.join(10)
    assert done == [("token", done[0][1], None)]
    held = committer.waited
    assert held >= 0.02  # the lock was held about 0.2 s after the committer began to wait
    committer.run([(lambda c: c.execute("INSERT INTO t VALUES (2)"), "token")])
    assert committer.waited < held  # each transaction counts its own wait
    committer.conn.close()
    holder.close()
