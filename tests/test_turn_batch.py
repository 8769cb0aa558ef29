"""TurnBatch: the calls of one event loop turn go to the store as one, each caller still gets its own answer."""

from __future__ import annotations

import asyncio

import pytest

from app.store.turn_batch import TurnBatch


class Recorder:
    """A stand-in for the store's batch call: records each call's items and answers each item doubled."""

    def __init__(self, fail: Exception | None = None, delay: float = 0.0) -> None:
        self.calls: list[list[int]] = []
        self.fail, self.delay = fail, delay

    async def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(items)
        await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        return [item * 2 for item in items]


async def test_calls_of_one_turn_are_one_call_and_each_gets_its_own_answer() -> None:
    send = Recorder()
    batch = TurnBatch(send, limit=64)
    assert await asyncio.gather(*(batch(n) for n in range(5))) == [0, 2, 4, 6, 8]
    assert send.calls == [[0, 1, 2, 3, 4]]
    assert await batch(7) == 14  # a later turn: a call of its own
    assert send.calls[1:] == [[7]]


async def test_a_full_batch_is_sent_at_once_and_the_rest_follows() -> None:
    send = Recorder()
    batch = TurnBatch(send, limit=3)
    assert await asyncio.gather(*(batch(n) for n in range(7))) == [0, 2, 4, 6, 8, 10, 12]
    assert send.calls == [[0, 1, 2], [3, 4, 5], [6]]


async def test_an_error_fails_every_call_of_its_batch_and_the_next_batch_is_unaffected() -> None:
    send = Recorder(fail=ConnectionError("store down"))
    batch = TurnBatch(send, limit=64)
    results = await asyncio.gather(batch(1), batch(2), return_exceptions=True)
    assert [str(r) for r in results] == ["store down", "store down"]
    send.fail = None
    assert await batch(3) == 6


async def test_a_caller_that_gives_up_does_not_disturb_the_others() -> None:
    send = Recorder(delay=0.2)
    batch = TurnBatch(send, limit=64)

    async def impatient() -> int:
        return await asyncio.wait_for(batch(1), timeout=0.05)

    results = await asyncio.gather(impatient(), batch(2), return_exceptions=True)
    assert isinstance(results[0], TimeoutError)
    assert results[1] == 4
    assert sorted(send.calls[0]) == [1, 2] and len(send.calls) == 1  # the write that was given up on was still made (its caller answered 503)


async def test_a_call_past_its_timeout_fails_alone_and_its_late_result_is_dropped() -> None:
    send = Recorder(delay=0.3)
    batch = TurnBatch(send, limit=64)
    results = await asyncio.gather(batch(1, timeout=0.05), batch(2), return_exceptions=True)
    assert isinstance(results[0], TimeoutError)
    assert results[1] == 4  # the batch's answer came, after the first caller had timed out
    assert sorted(send.calls[0]) == [1, 2] and len(send.calls) == 1


async def test_a_wrong_number_of_results_is_an_error_not_a_misattributed_answer() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:1]

    batch = TurnBatch(short, limit=64)
    with pytest.raises(RuntimeError, match="a batch of 2 calls got 1 results"):
        await asyncio.gather(batch(1), batch(2))


async def test_drain_waits_for_the_calls_already_made() -> None:
    send = Recorder(delay=0.1)
    batch = TurnBatch(send, limit=64)
    waiting = asyncio.ensure_future(batch(5))
    await asyncio.sleep(0)  # the call is queued for this turn
    await batch.drain()
    assert waiting.done() and waiting.result() == 10


async def test_a_batch_s_calls_share_its_deadline_and_a_call_without_a_timeout_has_none() -> None:
    send = Recorder(delay=0.4)
    batch = TurnBatch(send, limit=64)
    results = await asyncio.gather(batch(1, timeout=0.1), batch(2, timeout=0.2), batch(3),
                                   return_exceptions=True)
    assert isinstance(results[0], TimeoutError) and isinstance(results[1], TimeoutError)
    assert results[2] == 6  # no timeout: it waits for the batch's answer
    assert send.calls == [[1, 2, 3]]
