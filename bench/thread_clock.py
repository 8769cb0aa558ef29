"""A function's calls timed with the calling thread's CPU clock, added up by label: what `bench/accept_steps.py`
(the accept path's steps) and `bench/staged_deliver.py` (a delivery process's) wrap their steps with."""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from typing import Any


def timed(fn: Any, label: str | Callable[..., str], spent: dict[str, float], calls: dict[str, int]) -> Any:
    """`fn` (a coroutine function too), adding each call's thread CPU seconds to `spent` and one to `calls` under
    `label`, or under `label(*args)` when it is a function of the call's arguments."""
    def named(args: tuple[Any, ...]) -> str:
        return label if isinstance(label, str) else label(*args)

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def wrapped_async(*args: Any, **kwargs: Any) -> Any:
            started = time.thread_time()
            try:
                return await fn(*args, **kwargs)
            finally:
                name = named(args)
                spent[name] = spent.get(name, 0.0) + time.thread_time() - started
                calls[name] = calls.get(name, 0) + 1
        return wrapped_async

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        started = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            name = named(args)
            spent[name] = spent.get(name, 0.0) + time.thread_time() - started
            calls[name] = calls.get(name, 0) + 1
    return wrapped


def clock_cost() -> float:
    """Seconds one `time.thread_time()` call takes here: each timed call adds two."""
    started = time.perf_counter()
    for _ in range(100_000):
        time.thread_time()
    return (time.perf_counter() - started) / 100_000
