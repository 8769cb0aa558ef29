"""`segrelay serve` with its HTTP process's CPU counted by step: what `bench/ingest.py --stages` runs instead of
`-m app serve`.

Wraps, before serve starts, the accept path's synchronous steps (bench/accept_steps.py) with the thread CPU clock
of the event loop's thread, and counts between two signals from the benchmark:
- SIGUSR1: start counting afresh (the steps' totals and calls, the event loop thread's and the process's CPU);
- SIGUSR2: write what was counted since, as JSON, to the file named by STAGED_ACCEPT_FILE.
The event loop's thread CPU less the steps is the rest: uvicorn's event loop and sockets (the answer's `send()`
among them), the request's task and coroutines, the answer and what the timing itself costs (`clock_cost`, two
clock reads per timed call). Only the HTTP process serve runs in is wrapped: run it with one HTTP process.

    STAGED_ACCEPT_FILE=/tmp/stages python bench/staged_accept.py serve [serve's options]
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accept_steps import install
from thread_clock import clock_cost

SPENT: dict[str, float] = {}  # label -> thread CPU seconds since SIGUSR1
CALLS: dict[str, int] = {}
START = {"thread": 0.0, "process": 0.0}


def start(signum: int, frame: Any) -> None:
    SPENT.clear()
    CALLS.clear()
    START["thread"], START["process"] = time.thread_time(), time.process_time()


def report(signum: int, frame: Any) -> None:
    data = {"thread": time.thread_time() - START["thread"], "process": time.process_time() - START["process"],
            "spent": SPENT, "calls": CALLS, "clock": clock_cost()}
    target = Path(os.environ["STAGED_ACCEPT_FILE"])
    target.with_suffix(".part").write_bytes(orjson.dumps(data))
    target.with_suffix(".part").rename(target)  # whole or absent for the reader


if __name__ == "__main__":
    from app.cli import main

    install(SPENT, CALLS, awaiting=False)
    signal.signal(signal.SIGUSR1, start)  # the event loop's (main) thread handles them, between two requests' steps
    signal.signal(signal.SIGUSR2, report)
    raise SystemExit(main(sys.argv[1:]))
