"""Deadlines for many concurrent requests, checked by one timer per event loop instead of one timer each.

A timer per request (`asyncio.timeout()`, `loop.call_later()` and its cancel) cost the accept path several µs each,
and it had two: the store's deadline (SEGRELAY_ACCEPT_TIMEOUT_SECONDS) and the time to read a request
(SEGRELAY_REQUEST_READ_SECONDS). Neither needs that precision: here a request only notes its deadline in a dict,
and one timer per event loop and cadence, running while any deadline is noted, calls what is past due. The
bench/HISTORY.md's 0.10.0 figures give what it changed.

`within` is `asyncio.wait_for()` for a future that a store resolves (TimeoutError when past due; the store's write may
still land later); `Sweeper` calls a function at a deadline (the request-read limit, vendor requests' deadlines).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable
from typing import TypeVar

log = logging.getLogger("segrelay.deadlines")
T = TypeVar("T")
TICK_SECONDS = 0.05  # how late past its deadline a future `within` waits for fails, at most


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


def sweeper(tick: float = TICK_SECONDS, loop: asyncio.AbstractEventLoop | None = None) -> Sweeper:
    """The event loop's sweeper of this cadence (the running loop's unless one is given: on Python 3.11 asking for
    the running loop is a getpid() system call)."""
    loop = loop or asyncio.get_running_loop()
    found = _SWEEPERS.get((loop, tick))
    if found is None:
        for old in [key for key in _SWEEPERS if key[0].is_closed()]:  # loops of finished asyncio.run() calls
            del _SWEEPERS[old]
        found = _SWEEPERS[(loop, tick)] = Sweeper(loop, tick)
    return found


async def within(future: asyncio.Future[T], seconds: float | None) -> T:
    """`await future`, or TimeoutError when it is not done within `seconds` (give or take TICK_SECONDS): the future
    itself fails with it, so whatever would have set its result later finds it done and leaves it. No timer, no
    task and no cancellation of its own: the loop's sweeper checks it (`asyncio.timeout()` around the await, or
    a block-level deadline that cancels the task, cost the accept path about 6 µs an event)."""
    if seconds is None:
        return await future
    deadlines = sweeper(loop=future.get_loop())
    deadlines.add(future, seconds, lambda: _time_out(future))
    try:
        return await future
    finally:
        deadlines.discard(future)


def _time_out(future: asyncio.Future[T]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())
