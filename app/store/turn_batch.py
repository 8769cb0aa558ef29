"""Calls that arrive during one turn of the event loop, made as one call to the store.

Every request handled in one turn of the event loop (all those whose bytes arrived together) asks the store for
its write; instead of one round trip each, `TurnBatch` gathers them and, on the next turn, makes one call with all
of them. Each caller still waits for its own answer, and gets it only once that call has returned: the durability
of each write is that of the batch's call. An error fails every call of its batch. A batch's calls share one
deadline (the shortest timeout among them, from when the batch is sent), watched by the event loop's sweeper: one
entry per batch instead of one per call (a coroutine, a closure and a sweeper entry each: `deadlines.within`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from app.deadlines import sweeper

T = TypeVar("T")
R = TypeVar("R")


class TurnBatch(Generic[T, R]):
    """`await batch(item)` → that item's result from `send(items)`, which answers a list in the items' order."""

    def __init__(self, send: Callable[[list[T]], Awaitable[list[R]]], *, limit: int) -> None:
        self._send, self.limit = send, limit
        self._waiting: list[tuple[T, asyncio.Future[R], bool]] = []  # (item, its result, whether it has a timeout)
        self._timeout: float | None = None  # the shortest timeout among the calls waiting to be sent
        self._calls: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, item: T, timeout: float | None = None) -> R:
        """`item`'s result; TimeoutError past `timeout` (its batch's call may still be made and land)."""
        return await self.submit(item, timeout)

    def submit(self, item: T, timeout: float | None = None) -> asyncio.Future[R]:
        """`__call__` without a coroutine of its own: the future of `item`'s result."""
        waiting = self._waiting
        if not waiting:  # the turn's first call: asking for the running loop is a getpid() call on Python 3.11
            self._loop = asyncio.get_running_loop()
        loop = self._loop
        assert loop is not None
        future: asyncio.Future[R] = loop.create_future()
        waiting.append((item, future, timeout is not None))
        if timeout is not None and (self._timeout is None or timeout < self._timeout):
            self._timeout = timeout
        if len(waiting) == 1:
            loop.call_soon(self._flush)  # after every request of this turn has had its say
        elif len(waiting) >= self.limit:
            self._flush()
        return future

    def _flush(self) -> None:
        if not self._waiting:  # already sent in full
            return
        batch, self._waiting = self._waiting, []
        timeout, self._timeout = self._timeout, None
        call = asyncio.ensure_future(self._call(batch, timeout))
        self._calls.add(call)
        call.add_done_callback(self._calls.discard)

    @staticmethod
    def _expire(batch: list[tuple[T, asyncio.Future[R], bool]]) -> None:
        for _, future, timed in batch:
            if timed and not future.done():  # a call without a timeout never fails by a deadline
                future.set_exception(TimeoutError())

    async def _call(self, batch: list[tuple[T, asyncio.Future[R], bool]], timeout: float | None) -> None:
        deadlines = None
        if timeout is not None:
            deadlines = sweeper()
            deadlines.add(batch[0][1], timeout, lambda: self._expire(batch))
        try:
            results = await self._send([item for item, _, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} calls got {len(results)} results")
        except asyncio.CancelledError:
            for _, future, _ in batch:
                future.cancel()
            raise
        except Exception as exc:  # the callers see it, each at its own await
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        finally:
            if deadlines is not None:
                deadlines.discard(batch[0][1])
        for (_, future, _), result in zip(batch, results, strict=True):
            if not future.done():  # a caller that gave up (its deadline) no longer waits
                future.set_result(result)

    async def drain(self) -> None:
        """Wait for the calls already made (at shutdown, before the connection closes)."""
        self._flush()
        if self._calls:
            await asyncio.gather(*self._calls, return_exceptions=True)
