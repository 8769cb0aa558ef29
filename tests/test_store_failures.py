"""A SQLite store whose COMMIT fails: every operation in the failed transaction fails, none looks committed.

The connection is wrapped so that COMMIT raises the error SQLite gives for a full disk; the disk-full end-to-end
test (test_disk_full_e2e.py) shows the same on a real, small filesystem.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from app.store import NewJob, StoreUnavailableError
from app.store.sqlite import SQLiteStore, accept_op, fan_out_op


class FailingCommits:
    """A sqlite3.Connection stand-in that fails COMMIT while `failing` is set (and SQLite rolls back)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn, self.failing, self.failed = conn, False, 0

    def execute(self, sql: str, *args: Any) -> Any:
        if self.failing and sql == "COMMIT":
            self.failed += 1
            self.conn.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


def job(message_id: str) -> NewJob:
    return NewJob("tracify", "events", "Order Completed", "")


@pytest.fixture
def store(tmp_path: Path) -> SQLiteStore:
    return SQLiteStore(str(tmp_path / "store.db"))


def wrap(store: SQLiteStore) -> FailingCommits:
    wrapper = FailingCommits(store._writer.committer.conn)
    store._writer.committer.conn = wrapper  # type: ignore[assignment]
    return wrapper


async def count(store: SQLiteStore) -> int:
    return sum((await store.counts()).pending.values())


async def test_a_failed_commit_fails_every_accept_in_the_group(store: SQLiteStore) -> None:
    conn = wrap(store)
    await store.accept("acme", "warm-up", b"sealed", [job("warm-up")], now=1.0, ttl=60)  # writer thread now uses the wrapper
    conn.failing = True
    results = await asyncio.gather(*(store.accept("acme", f"m{i}", b"sealed", [job(f"m{i}")], now=1.0, ttl=60)
                                     for i in range(50)), return_exceptions=True)
    assert conn.failed >= 1
    assert all(isinstance(r, StoreUnavailableError) for r in results), results
    conn.failing = False
    assert await count(store) == 1  # only the warm-up: nothing that failed was stored
    # Segment's retries of the refused events are new events, not duplicates.
    assert await store.accept("acme", "m0", b"sealed", [job("m0")], now=2.0, ttl=60) is True
    await store.close()


async def test_failed_lease_and_complete_are_reported_not_pretended(store: SQLiteStore) -> None:
    await store.accept("acme", "m1", b"sealed", [job("m1")], now=1.0, ttl=60)
    conn = wrap(store)
    conn.failing = True
    with pytest.raises(StoreUnavailableError):
        await store.lease("tracify", now=2.0, limit=10, lease_seconds=60)
    conn.failing = False
    leased = await store.lease("tracify", now=2.0, limit=10, lease_seconds=60)
    assert [j.message_id for j in leased] == ["m1"]
    conn.failing = True
    with pytest.raises(StoreUnavailableError):
        await store.complete(leased)
    with pytest.raises(StoreUnavailableError):
        await store.retry(leased[0], due_at=3.0, status=500, body="")
    with pytest.raises(StoreUnavailableError):
        await store.bury(leased[0], now=3.0, status=400, body="")
    conn.failing = False
    assert await count(store) == 1  # still there, still leased: due again when the lease expires
    assert await store.lease("tracify", now=2.0, limit=10, lease_seconds=60) == []
    assert len(await store.lease("tracify", now=63.0, limit=10, lease_seconds=60)) == 1
    await store.close()


def test_database_files_and_folder_are_private(tmp_path: Path) -> None:
    path = tmp_path / "var" / "store.db"
    store = SQLiteStore(str(path))
    asyncio.run(store.accept("acme", "m", b"sealed", [job("m")], now=1.0, ttl=60))
    for name in ("store.db", "store.db-wal", "store.db-shm"):
        assert (path.parent / name).stat().st_mode & 0o777 == 0o600, name
    assert path.parent.stat().st_mode & 0o777 == 0o700
    asyncio.run(store.close())


def test_a_group_redone_one_by_one_counts_and_points_only_at_what_was_stored(tmp_path: Path) -> None:
    """A transaction's accepts write their counters once, just before COMMIT, and learn their event ids from
    AUTOINCREMENT's sequence: when one operation of the group fails, the group rolls back and each is redone alone,
    and neither counters nor ids may carry anything of the rolled-back attempt."""
    path = tmp_path / "store.db"
    SQLiteStore(str(path))  # the schema
    committer = SQLiteStore(str(path), durable=True).accept_committer()
    jobs = [("tracify", "events", "Order Completed", ""), ("audiohook", "pixel", "Order Completed", "")]

    def accept(message_id: str) -> Any:
        return lambda c: accept_op(c, "acme", message_id, b"sealed", jobs, 1.0, 60.0, [])

    def broken(c: sqlite3.Connection) -> None:
        raise sqlite3.IntegrityError("a broken operation")

    together = committer.run([(accept("a"), "a"), (accept("b"), "b"), (accept("a"), "a again")])
    assert [value for _, value, _ in together] == [True, True, False] and committer.commits == 1  # one transaction
    results = committer.run([(accept("c"), "c"), (accept("d"), "d"), (broken, "x"), (accept("c"), "c again"),
                             (accept("e"), "e")])
    assert [(token, value, type(error).__name__ if error else None) for token, value, error in results] == [
        ("c", True, None), ("d", True, None), ("x", None, "StoreError"), ("c again", False, None), ("e", True, None)]
    conn = committer.conn
    assert dict(conn.execute("SELECT name, value FROM counters")) == {
        "pending:tracify": 5, "pending:audiohook": 5, "bytes:acme": 5 * 2 * 6, "bytes:*": 5 * 2 * 6}
    # Each idempotency record points at its own event, and ids go on from the sequence after the rollback.
    pointed = conn.execute("SELECT s.message_id, e.message_id, e.id FROM seen s JOIN events e ON e.id = s.event_id"
                           " ORDER BY e.id").fetchall()
    assert [(m, n, i) for m, n, i in pointed] == [("a", "a", 1), ("b", "b", 2), ("c", "c", 3), ("d", "d", 4),
                                                  ("e", "e", 5)]
    assert fan_out_op(conn) == 5  # the stored events' jobs, written when delivery leases
    assert conn.execute("SELECT count(*), count(DISTINCT event_id) FROM jobs").fetchone() == (10, 5)
    # Once gone, an event's id is never given again (its outcomes stay keyed by it).
    conn.execute("DELETE FROM events")
    assert committer.run([(accept("f"), "f")])[0][1] is True
    assert conn.execute("SELECT id FROM events").fetchall() == [(6,)]
