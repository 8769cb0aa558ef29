"""Process-wide tuning shared by the HTTP process and the delivery processes.

- The garbage collector: each request and each postback allocate a few thousand short-lived objects, and a
  delivery process keeps thousands of parsed events in its cache. With CPython's default first threshold (700
  allocations) the collector ran hundreds of times a second and walked those caches over and over: a delivery
  process spent about 15 % of its CPU there. A first threshold of 50,000 keeps young collections rare; objects that
  live on are still collected by the older generations as before.
- Priority: answering Segment is latency-bound, delivering is throughput-bound and catches up. Delivery processes
  run at the lowest CPU priority (`SEGRELAY_DELIVERY_NICE`, 19 by default), so under load the HTTP process (and
  redis-server beside it) gets a core when it needs one and delivery uses the rest.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import signal

log = logging.getLogger("segrelay")
YOUNG_GENERATION_THRESHOLD = 50_000  # allocations between young collections (CPython's default: 700)


def tune_garbage_collector() -> None:
    """Raise the young generation's threshold, keep the older generations' (see the module's docstring)."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, older, oldest)


def lower_priority(nice: int) -> None:
    """Add `nice` to this process's niceness (0 leaves it as it is); a refusal is logged, never fatal."""
    if nice <= 0:
        return
    with contextlib.suppress(AttributeError):  # no os.nice on this platform
        try:
            os.nice(nice)
        except OSError as exc:
            log.warning("could not lower the delivery process's priority", extra={"error": str(exc)})


def die_with_parent(parent: int | None) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (a kill -9 of `serve` takes its children with it).

    A parent that died before this call (while this child was still importing) would never send the signal: with the
    parent's pid given, a child that finds itself orphaned already ends itself the same way."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)
