"""One timer per event loop for every request's deadline: the same outcomes as asyncio.timeout()."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from app import deadlines
from app.deadlines import Deadline
from app.errors import UnavailableError
from app.ingest import store_deadline


async def until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """Wait for the condition (however slow this machine is), at most `seconds`."""
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)


async def test_a_block_past_its_deadline_raises_timeout_error() -> None:
    with pytest.raises(TimeoutError):
        async with Deadline(0.05):
            await asyncio.sleep(5)


async def test_a_block_within_its_deadline_is_untouched_and_leaves_nothing_behind() -> None:
    async with Deadline(5):
        await asyncio.sleep(0)
    assert deadlines.sweeper().due == {}
    await asyncio.sleep(deadlines.TICK_SECONDS * 2)  # the timer has run and found nothing to cancel
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_many_concurrent_deadlines_each_end_on_their_own() -> None:
    async def wait(seconds: float, deadline: float) -> str:
        try:
            async with Deadline(deadline):
                await asyncio.sleep(seconds)
        except TimeoutError:
            return "timed out"
        return "done"

    results = await asyncio.gather(*(wait(0.01, 2), wait(3, 0.1), wait(0.02, 2), wait(3, 0.15)))
    assert results == ["done", "timed out", "done", "timed out"]


async def test_a_cancellation_from_elsewhere_is_not_turned_into_a_timeout() -> None:
    async def inside() -> None:
        async with Deadline(5):
            await asyncio.sleep(5)

    task = asyncio.create_task(inside())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_the_store_deadline_is_a_503_that_says_so() -> None:
    with pytest.raises(UnavailableError) as raised:
        async with store_deadline(0.05):
            await asyncio.Event().wait()
    assert raised.value.status_code == 503
    assert raised.value.message == "Storage is slow to answer; retry later"


async def test_a_sweeper_calls_what_is_past_due_once_and_not_what_was_discarded() -> None:
    sweeper = deadlines.Sweeper(asyncio.get_running_loop(), tick=0.01)
    called: list[str] = []
    sweeper.add("late", 0.02, lambda: called.append("late"))
    sweeper.add("kept", 10, lambda: called.append("kept"))
    sweeper.add("gone", 0.02, lambda: called.append("gone"))
    sweeper.discard("gone")
    await until(lambda: bool(called))
    await asyncio.sleep(0.05)  # "gone" was due as early as "late"
    assert called == ["late"]
    assert list(sweeper.due) == ["kept"]


async def test_a_failing_call_does_not_keep_the_others_from_theirs(caplog: pytest.LogCaptureFixture) -> None:
    sweeper = deadlines.Sweeper(asyncio.get_running_loop(), tick=0.01)
    called: list[str] = []
    sweeper.add("bad", 0.01, lambda: 1 / 0)
    sweeper.add("good", 0.01, lambda: called.append("good"))
    await until(lambda: bool(called))
    assert called == ["good"]
    assert "a deadline's call failed" in caplog.text
