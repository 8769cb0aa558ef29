"""Prometheus metrics, prefix `segrelay_`, base units, bounded labels (vendors, call types, outcomes)."""

from __future__ import annotations

import asyncio
import atexit
import bisect
import os
import platform
from typing import Any, TypeVar

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.metrics import MetricWrapperBase

from app.version import VERSION

if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    # Under `serve` every write to a metric asks which process it is in (prometheus_client's multiprocess mode): by
    # default a getpid() system call each time, the most frequent system call of the HTTP and delivery processes
    # (strace, bench/e2e.py's load: about four per accepted event). The process id kept here answers the same, kept
    # up to date across a fork (there is none in segrelay, but a library may fork).
    # In a tight loop: a counter's inc() 2.1 -> 1.1 µs, a histogram's observe() 4.3 -> 2.5 µs.
    _PID = [os.getpid()]
    os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))
    values.ValueClass = values.MultiProcessValue(process_identifier=lambda: _PID[0])  # type: ignore[no-untyped-call]

REQUESTS = Counter("segrelay_requests", "Requests to /segment by call type and status code",
                   ["call_type", "status"])
REQUEST_SECONDS = Histogram("segrelay_request_duration_seconds", "Time to answer Segment",
                            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
POSTBACKS = Counter("segrelay_postbacks", "Postbacks by vendor and outcome (queued, delivered, retried, dead, "
                    "skipped)", ["vendor", "outcome"])
SKIPS = Counter("segrelay_skips", "Postbacks skipped, by vendor and reason code", ["vendor", "reason"])
DUPLICATES = Counter("segrelay_duplicates", "Events answered as duplicates of an earlier messageId")
STITCHED = Counter("segrelay_stitched_fields", "Fields of accepted events filled from a remembered identity",
                   ["field"])
EVENTS_OPENED = Counter("segrelay_delivery_events_opened", "Stored events a delivery process opened and parsed to "
                        "build postbacks; divided by the events accepted, how many times each was parsed")
VENDOR_SECONDS = Histogram("segrelay_vendor_request_duration_seconds", "Vendor request duration", ["vendor"],
                           buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30))
ACCEPT_WRITER_SECONDS = Histogram("segrelay_accept_writer_transaction_seconds", "The accept writer's groups "
                                  "(SQLite): statements, COMMIT with its fsync, and the answers, per group",
                                  buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))
ACCEPT_WRITER_LOCK_WAIT_SECONDS = Histogram("segrelay_accept_writer_lock_wait_seconds", "The accept writer's wait "
                                            "for SQLite's write lock before a group (another process held it: a "
                                            "delivery process, mostly), part of its transaction's time",
                                            buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                                     0.25, 1))
ACCEPT_WRITER_ACCEPTS = Counter("segrelay_accept_writer_accepts", "Accepts the accept writer stored or refused; "
                                "divided by its transactions, the size of its groups")
# Gauges: the HTTP process sets the queue figures, delivery processes the circuits; across processes the
# highest value is the one to show (prometheus_client's multiprocess mode, used when serve runs several).
QUEUE_DEPTH = Gauge("segrelay_queue_depth", "Postbacks waiting or being sent", ["vendor"], multiprocess_mode="max")
QUEUE_BYTES = Gauge("segrelay_queue_bytes", "Bytes of stored events waiting for delivery (the queue bound)",
                    multiprocess_mode="max")
QUEUE_LIMIT_BYTES = Gauge("segrelay_queue_limit_bytes", "The queue's bound (SEGRELAY_MAX_QUEUE_MB) in bytes",
                          multiprocess_mode="max")
OLDEST_DUE = Gauge("segrelay_oldest_due_seconds", "How long the longest-waiting due postback has been due",
                   ["vendor"], multiprocess_mode="max")
DEAD_LETTERS = Gauge("segrelay_dead_letters", "Postbacks in the dead-letter store", ["vendor"],
                     multiprocess_mode="max")
CIRCUIT_OPEN = Gauge("segrelay_circuit_open", "1 while the vendor's circuit breaker is open", ["vendor"],
                     multiprocess_mode="max")


BUILD_INFO = Gauge("segrelay_build_info", "1, labelled with the running version", ["version", "python"],
                   multiprocess_mode="max")
BUILD_INFO.labels(VERSION, platform.python_version()).set(1)


M = TypeVar("M", bound=MetricWrapperBase)
_CHILDREN: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}


def labelled(metric: M, *values: str) -> M:
    """The metric's child for these label values, found once: prometheus_client's labels() takes a lock and
    builds its key on every call, which the accept path would pay several times per event. Every label here has
    a bounded set of values, so this stays small."""
    key = (metric, values)
    child = _CHILDREN.get(key)
    if child is None:
        child = _CHILDREN[key] = metric.labels(*values)
    return child


_ADDED: dict[Any, float] = {}  # counter child -> what this event-loop turn added to it, not yet written
_OBSERVED: dict[Any, list[float]] = {}  # histogram (child) -> this event-loop turn's observations, not yet written


def _written_later() -> bool:
    """Whether what is recorded now is written at the end of this event-loop turn (False: no event loop)."""
    if _ADDED or _OBSERVED:
        return True
    try:
        asyncio.get_running_loop().call_soon(flush)
    except RuntimeError:
        return False
    return True


def add(child: Any, amount: float = 1.0) -> None:
    """Add to a counter's child at the end of this event-loop turn, together with the turn's other additions to it.

    Under `serve` every process's metrics live in shared memory (prometheus_client's multiprocess mode), where each
    write takes a lock: about 1 µs, several times per event. Written once per child and turn instead (32 events to a
    turn at 32 connections), and at once outside an event loop.
    """
    if not _written_later():
        child.inc(amount)
        return
    _ADDED[child] = _ADDED.get(child, 0.0) + amount


def observe(histogram: Any, amount: float) -> None:
    """`histogram.observe(amount)` at the end of this event-loop turn, with the turn's other observations of it: one
    write of its sum and one of each bucket they fall in, where each observation wrote the sum and a bucket: the
    accept path alone 0.32 / 0.33 / 0.34x of bare Starlette against 0.30 / 0.29 / 0.32x (README, 0.13.6)."""
    if not _written_later():
        histogram.observe(amount)
        return
    _OBSERVED.setdefault(histogram, []).append(amount)


def flush() -> None:
    """Write the additions and observations of this event-loop turn (`add`, `observe`)."""
    added, observed = list(_ADDED.items()), list(_OBSERVED.items())
    _ADDED.clear()
    _OBSERVED.clear()
    for child, amount in added:
        child.inc(amount)
    for histogram, amounts in observed:
        observe_all(histogram, amounts)


def observe_all(histogram: Any, amounts: list[float]) -> None:
    """What `observe` once per amount would write, written once per bucket. Reads prometheus_client's own fields
    (`_upper_bounds`, `_buckets`, `_sum`); a histogram without them is observed one amount at a time, and a test
    compares the two ways' exposition."""
    bounds, buckets, total = (getattr(histogram, name, None) for name in ("_upper_bounds", "_buckets", "_sum"))
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for amount in amounts:
            histogram.observe(amount)
        return
    counts = [0] * len(bounds)
    for amount in amounts:
        counts[bisect.bisect_left(bounds, amount)] += 1  # the first bucket whose bound is >= amount, as observe()
    total.inc(sum(amounts))
    for index, count in enumerate(counts):
        if count:
            buckets[index].inc(count)


atexit.register(flush)


def exposition() -> bytes:
    """The text exposition: this process's metrics, or every process's when serve runs several."""
    flush()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return bytes(generate_latest(registry))
    return bytes(generate_latest(REGISTRY))
