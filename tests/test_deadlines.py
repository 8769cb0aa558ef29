"""One timer per event loop for every request's deadline: the same outcomes as asyncio.timeout()."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from app import deadlines
from app.deadlines import within
from app.ingest import store_too_slow


async def until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """Wait for the condition (however slow this machine is), at most `seconds`."""
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)


async def test_a_future_past_its_deadline_fails_with_timeout_error_and_stays_failed() -> None:
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError):
        await within(future, 0.05)
    assert future.done() and isinstance(future.exception(), TimeoutError)  # a late answer finds it done
    assert deadlines.sweeper().due == {}


async def test_a_future_within_its_deadline_gives_its_result_and_leaves_nothing_behind() -> None:
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(0.01, future.set_result, "stored")
    assert await within(future, 5) == "stored"
    assert deadlines.sweeper().due == {}
    await asyncio.sleep(deadlines.TICK_SECONDS * 2)  # the timer has run and found nothing to fail
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_no_deadline_waits_as_long_as_it_takes() -> None:
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(deadlines.TICK_SECONDS * 3, future.set_result, "late but fine")
    assert await within(future, None) == "late but fine"
    assert deadlines.sweeper().due == {}


async def test_many_concurrent_deadlines_each_end_on_their_own() -> None:
    loop = asyncio.get_running_loop()

    async def wait(seconds: float, deadline: float) -> str:
        future: asyncio.Future[str] = loop.create_future()
        loop.call_later(seconds, lambda: future.done() or future.set_result("done"))
        try:
            return await within(future, deadline)
        except TimeoutError:
            return "timed out"

    results = await asyncio.gather(*(wait(0.01, 2), wait(3, 0.1), wait(0.02, 2), wait(3, 0.15)))
    assert results == ["done", "timed out", "done", "timed out"]


async def test_a_cancellation_of_the_waiter_is_not_turned_into_a_timeout() -> None:
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(within(future, 5))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert deadlines.sweeper().due == {}


async def test_a_slow_store_is_a_503_that_says_so() -> None:
    assert store_too_slow().status_code == 503
    assert store_too_slow().message == "Storage is slow to answer; retry later"


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
