"""Counter additions and histogram observations of one event-loop turn are written together: the values are the
same, the writes fewer."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry, Histogram, generate_latest, multiprocess

from app import metrics

ROOT = Path(__file__).resolve().parent.parent


async def test_counter_additions_of_one_turn_are_written_together_at_its_end() -> None:
    child = metrics.labelled(metrics.POSTBACKS, "audiohook", "queued")
    before = child._value.get()
    metrics.add(child, 2)
    metrics.add(child)
    assert child._value.get() == before  # not yet: the turn is not over
    await asyncio.sleep(0)
    assert child._value.get() == before + 3


async def test_the_exposition_includes_what_this_turn_added() -> None:
    child = metrics.labelled(metrics.SKIPS, "tracify", "no_page_url")
    before = child._value.get()
    metrics.add(child, 5)
    text = metrics.exposition().decode()
    assert f'segrelay_skips_total{{reason="no_page_url",vendor="tracify"}} {before + 5}' in text


def test_outside_an_event_loop_an_addition_is_written_at_once() -> None:
    child = metrics.labelled(metrics.POSTBACKS, "tracify", "dead")
    before = child._value.get()
    metrics.add(child, 4)
    assert child._value.get() == before + 4


AMOUNTS = [0.0, 0.0004, 0.001, 0.0011, 0.01, 0.05, 0.5, 1.0, 1.5, 7.25, 0.001, 0.0004]


async def test_histogram_observations_of_one_turn_are_written_at_its_end_and_expose_as_one_by_one() -> None:
    registry = CollectorRegistry()
    one_by_one = Histogram("one_by_one_seconds", "reference", ["vendor"], buckets=(0.001, 0.01, 0.1, 1),
                           registry=registry)
    batched = Histogram("batched_seconds", "batched", ["vendor"], buckets=(0.001, 0.01, 0.1, 1), registry=registry)
    for amount in AMOUNTS:  # bounds themselves, between them, past the last finite one, zero
        one_by_one.labels("tracify").observe(amount)
        metrics.observe(batched.labels("tracify"), amount)
    assert 'batched_seconds_count{vendor="tracify"} 0.0' in generate_latest(registry).decode()  # not yet: the turn
    # is not over
    await asyncio.sleep(0)
    text = generate_latest(registry).decode()

    def samples(name: str) -> list[str]:
        return sorted(line.replace(name, "h") for line in text.splitlines()
                      if line.startswith(name) and "_created" not in line)
    assert samples("batched_seconds") == samples("one_by_one_seconds")
    assert 'h_bucket{le="0.001",vendor="tracify"} 5.0' in samples("batched_seconds")


def test_a_histogram_without_prometheus_clients_fields_is_observed_one_amount_at_a_time() -> None:
    class Plain:
        def __init__(self) -> None:
            self.seen: list[float] = []

        def observe(self, amount: float) -> None:
            self.seen.append(amount)
    plain = Plain()
    metrics.observe_all(plain, AMOUNTS)
    assert plain.seen == AMOUNTS


MULTIPROCESS_SCRIPT = """
import os, sys
calls = 0
real_getpid = os.getpid
def counting_getpid():
    global calls
    calls += 1
    return real_getpid()
os.getpid = counting_getpid  # before prometheus_client binds it as its default process identifier
from app import metrics
calls = 0
for _ in range(100):
    metrics.labelled(metrics.POSTBACKS, "tracify", "queued").inc()
    metrics.REQUEST_SECONDS.observe(0.002)
print(calls)
child = os.fork()  # a fork after the metrics exist: the child's writes go to files of its own
if child == 0:
    metrics.labelled(metrics.POSTBACKS, "tracify", "queued").inc(7)
    os._exit(0)
os.waitpid(child, 0)
print(child)
"""


def test_a_multiprocess_write_knows_its_process_without_asking_the_kernel(tmp_path: Path) -> None:
    """Under serve, prometheus_client asked getpid() at every write: the most frequent system call of the HTTP and
    delivery processes. The process id is kept instead, and kept right across a fork."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", MULTIPROCESS_SCRIPT], env=env, cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=60).stdout.split()
    calls, child = int(out[0]), int(out[1])
    assert calls == 0
    assert (tmp_path / f"counter_{child}.db").exists()  # the child wrote under its own id
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(tmp_path))  # type: ignore[no-untyped-call]
    text = generate_latest(registry).decode()
    assert 'segrelay_postbacks_total{outcome="queued",vendor="tracify"} 107.0' in text
    assert "segrelay_request_duration_seconds_count 100.0" in text
