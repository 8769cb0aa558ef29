"""SQLite's write lock: the HTTP process (durable writer) says when it waits, delivery processes give way to it."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.store.sqlite import GIVE_WAY_SECONDS, SQLiteStore


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
