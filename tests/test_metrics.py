"""Counter additions of one event-loop turn are written together: the values are the same, the writes fewer."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest, multiprocess

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
