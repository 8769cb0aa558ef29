"""Delivered postbacks recorded in batches (app/delivery/completions.py), against a store of the test's own."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from app.delivery import completions
from app.delivery.completions import Completions
from app.store import Job, Store


def job(n: int) -> Job:
    return Job(str(n), str(n), "tracify", "events", "acme", f"m{n}", "page", "", b"", 0, 0.0, 10)


class Recorder:
    """complete() as a store has it: records each call; fails while `failing`, waits while `gate` is closed."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], int | None]] = []
        self.failing = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def complete(self, jobs: Sequence[Job], *, status: int | None = None, now: float = 0.0) -> None:
        await self.gate.wait()
        if self.failing:
            self.failing -= 1
            raise OSError("disk I/O error")
        self.calls.append(([j.id for j in jobs], status))

    def written(self) -> list[str]:
        return sorted((i for ids, _ in self.calls for i in ids), key=int)


def completions_on(store: Recorder, limit: int = 100) -> Completions:
    fake: Any = store
    typed: Store = fake
    return Completions(typed, lambda: 1.0, limit=limit)


async def test_jobs_answered_meanwhile_share_one_write_per_status() -> None:
    store = Recorder()
    store.gate.clear()  # the first write waits: what is answered meanwhile goes in the next one
    done = completions_on(store)
    done.start()
    first = job(1)
    await done.add([first], 200)
    await asyncio.sleep(0.01)
    assert done.holds(first)  # being written
    for n in range(2, 6):
        await done.add([job(n)], 200 if n != 5 else 204)
    store.gate.set()
    await done.stop()
    assert store.calls == [(["1"], 200), (["2", "3", "4"], 200), (["5"], 204)]


async def test_a_failed_write_is_tried_again_and_nothing_is_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(completions, "RETRY_SECONDS", 0.01)
    store = Recorder()
    store.failing = 2
    done = completions_on(store)
    done.start()
    await done.add([job(1), job(2)], 200)
    for _ in range(200):
        if store.written():
            break
        await asyncio.sleep(0.01)
    await done.stop()
    assert store.written() == ["1", "2"]


async def test_stop_writes_what_is_left_and_a_batch_is_bounded() -> None:
    store = Recorder()
    done = completions_on(store)
    await done.add([job(n) for n in range(completions.MAX_BATCH + 5)], 200)  # not started: nothing written yet
    assert store.calls == []
    done.start()
    await done.stop()
    assert [len(ids) for ids, _ in store.calls] == [completions.MAX_BATCH, 5]


async def test_a_full_list_makes_the_next_finished_request_wait_for_the_store() -> None:
    store = Recorder()
    store.gate.clear()
    done = completions_on(store, limit=3)
    done.start()
    await done.add([job(1)], 200)
    await asyncio.sleep(0.01)  # job 1 is being written, and the store does not answer
    await done.add([job(2), job(3)], 200)
    fourth = job(4)
    waiting = asyncio.create_task(done.add([fourth], 200))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # the list is full: the request that finished waits for the store
    # What a shutdown that cancels this request must not hand back: it is answered, and will be recorded.
    assert done.holds(fourth) and not done.holds(job(4))
    store.gate.set()
    await asyncio.wait_for(waiting, 5)
    await done.stop()
    assert store.written() == ["1", "2", "3", "4"]
