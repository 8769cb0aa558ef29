"""Deadlines for many concurrent requests, checked by one timer per event loop instead of one timer each.

A timer per request (`asyncio.timeout()`, `loop.call_later()` and its cancel) cost the accept path several µs each,
and it had two: the store's deadline (SEGRELAY_ACCEPT_TIMEOUT_SECONDS) and the time to read a request
(SEGRELAY_REQUEST_READ_SECONDS). Neither needs that precision: here a request only notes its deadline in a dict,
and one timer per event loop and cadence, running while any deadline is noted, calls what is past due. The
README's 0.10.0 figures give what it changed.

`Deadline` is `asyncio.timeout()` for a block of code (TimeoutError when past due; a cancellation from anywhere else
goes through untouched); `Sweeper` calls a function at a deadline (the request-read limit).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable
from typing import Any

log = logging.getLogger("segrelay.deadlines")
TICK_SECONDS = 0.05  # how late past its deadline a `Deadline` may end, at most


class Sweeper:
    """Functions due at deadlines on one event loop, called by one timer every `tick` seconds while any is due."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float) -> None:
        self.loop, self.tick = loop, tick
        self.due: dict[Hashable, tuple[float, Callable[[], object]]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def add(self, key: Hashable, seconds: float, call: Callable[[], object]) -> None:
        """Call `call` in `seconds` (give or take a tick), unless `discard(key)` comes first."""
        self.due[key] = (self.loop.time() + seconds, call)
        if self._timer is None:
            self._timer = self.loop.call_later(self.tick, self._check)

    def discard(self, key: Hashable) -> None:
        self.due.pop(key, None)

    def _check(self) -> None:
        self._timer = None
        now = self.loop.time()
        late = [key for key, (deadline, _) in self.due.items() if deadline <= now]
        calls = [self.due.pop(key)[1] for key in late]
        if self.due:
            self._timer = self.loop.call_later(self.tick, self._check)
        for call in calls:
            try:
                call()
            except Exception:  # one failing call must not keep the others from theirs
                log.exception("a deadline's call failed")


_SWEEPERS: dict[tuple[asyncio.AbstractEventLoop, float], Sweeper] = {}


def sweeper(tick: float = TICK_SECONDS) -> Sweeper:
    """The running event loop's sweeper of this cadence."""
    loop = asyncio.get_running_loop()
    found = _SWEEPERS.get((loop, tick))
    if found is None:
        for old in [key for key in _SWEEPERS if key[0].is_closed()]:  # loops of finished asyncio.run() calls
            del _SWEEPERS[old]
        found = _SWEEPERS[(loop, tick)] = Sweeper(loop, tick)
    return found


class Deadline:
    """`async with Deadline(seconds):` raises TimeoutError (or what `error` makes) when the block takes longer than
    `seconds` (give or take TICK_SECONDS), like `asyncio.timeout(seconds)`."""

    __slots__ = ("_cancelling", "_error", "_expired", "_seconds", "_sweeper", "_task")

    def __init__(self, seconds: float, error: Callable[[], BaseException] = TimeoutError) -> None:
        self._seconds, self._error = seconds, error
        self._expired = False

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Deadline must be used inside a task")
        self._task, self._cancelling = task, task.cancelling()
        self._sweeper = sweeper()
        self._sweeper.add(self, self._seconds, self._expire)

    def _expire(self) -> None:
        self._expired = True
        self._task.cancel()

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        self._sweeper.discard(self)
        # Ours to handle only if no other cancellation was asked for meanwhile (as asyncio.timeout decides).
        if self._expired and self._task.uncancel() <= self._cancelling and kind is asyncio.CancelledError:
            raise self._error() from exc
