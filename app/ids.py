"""Unique ids without asking the kernel for randomness each time: this process's random half, then a count.

32 hex digits, the shape of `uuid4().hex`. Two processes (or two starts of one) collide only if they draw the
same random 64-bit half; `serve` starts its processes (never forks them), so each draws its own. `os.urandom`
per id (as `uuid4()` does) was a system call per request on the accept path, five per event on Redis.
"""

from __future__ import annotations

import itertools
import os

_PREFIX = os.urandom(8).hex()
_COUNT = itertools.count(int.from_bytes(os.urandom(4)))
_MASK = (1 << 64) - 1


def new_id() -> str:
    return f"{_PREFIX}{next(_COUNT) & _MASK:016x}"
