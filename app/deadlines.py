"""Deadlines for many concurrent requests, checked by one timer per event loop instead of one timer each.

`asyncio.timeout()` schedules and cancels a timer for every request that enters it: about 5 µs per request on the
accept path (2-3 % of an HTTP process's CPU per event). The accept deadline (SEGRELAY_ACCEPT_TIMEOUT_SECONDS,
seconds long) needs no such precision: here a request only notes its task and its deadline in a dict, and one timer
per loop, running every TICK_SECONDS while any request is inside a deadline, cancels the tasks past theirs. A task
cancelled that way leaves its `Deadline` with TimeoutError, exactly as with `asyncio.timeout()`; a cancellation from
anywhere else (shutdown, a client gone) goes through untouched.
"""

from __future__ import annotations

import asyncio
from typing import Any

TICK_SECONDS = 0.05  # how late past its deadline a task may be cancelled, at most


class _Watch:
    """The tasks inside a deadline on one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.deadlines: dict[asyncio.Task[Any], float] = {}
        self.expired: set[asyncio.Task[Any]] = set()  # cancelled by the timer, not yet out of their deadline
        self._timer: asyncio.TimerHandle | None = None

    def add(self, task: asyncio.Task[Any], deadline: float) -> None:
        self.deadlines[task] = deadline
        if self._timer is None:
            self._timer = self.loop.call_later(TICK_SECONDS, self._check)

    def _check(self) -> None:
        self._timer = None
        now = self.loop.time()
        for task, deadline in list(self.deadlines.items()):
            if deadline <= now:
                del self.deadlines[task]
                self.expired.add(task)
                task.cancel()
        if self.deadlines:
            self._timer = self.loop.call_later(TICK_SECONDS, self._check)


_WATCHES: dict[asyncio.AbstractEventLoop, _Watch] = {}


def _watch(loop: asyncio.AbstractEventLoop) -> _Watch:
    watch = _WATCHES.get(loop)
    if watch is None:
        for old in [other for other in _WATCHES if other.is_closed()]:  # loops of finished asyncio.run() calls
            del _WATCHES[old]
        watch = _WATCHES[loop] = _Watch(loop)
    return watch


class Deadline:
    """`async with Deadline(seconds):` raises TimeoutError when the block takes longer than `seconds` (give or take
    TICK_SECONDS), like `asyncio.timeout(seconds)`."""

    __slots__ = ("_cancelling", "_seconds", "_task", "_watch")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Deadline must be used inside a task")
        self._task, self._cancelling = task, task.cancelling()
        self._watch = _watch(asyncio.get_running_loop())
        self._watch.add(task, self._watch.loop.time() + self._seconds)

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        watch, task = self._watch, self._task
        watch.deadlines.pop(task, None)
        if task in watch.expired:
            watch.expired.discard(task)
            # Ours to handle only if no other cancellation was asked for meanwhile (as asyncio.timeout decides).
            if task.uncancel() <= self._cancelling and kind is asyncio.CancelledError:
                raise TimeoutError from exc
