"""Where a delivery process's CPU goes, without HTTP: the worker run in process, every vendor answering at once.

Queues `--n` Order Completed events for all three vendors in a fresh SQLite store (as `bench/delivery.py` does),
then runs the delivery worker (`app/delivery/worker.py`) on this process's event loop, as `segrelay deliver` runs
it (uvloop, the store's writer on the loop), with a transport that answers 200 to every request without a socket.
Prints the CPU per event of the whole drain and of its steps, each timed with the thread's CPU clock
(bench/staged_deliver.py): rendering, SQLite's statements, and the rest, which here is the worker's own
bookkeeping and the event loop (per request too); and the garbage collector's runs, wherever they fell. The
network's part (the HTTP client, the kernel's loopback) is what `bench/delivery.py --stages` adds to these
figures. With `--profile` it writes a cProfile of the drain to the named file (read it with `python -m pstats`).

    python bench/delivery_cpu.py [--n 10000] [--concurrency 32] [--profile FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import staged_deliver
import uvloop
from common import SECRET
from delivery import SETTINGS, events, queue

from app.config import Config
from app.crypto import Sealer
from app.delivery.transport import VendorAnswer
from app.delivery.worker import Deliverer
from app.outgoing import OutgoingRequest
from app.store.sqlite import SQLiteStore


class Collections:
    """The garbage collector's runs and their CPU (its callbacks, the thread's clock)."""

    def __init__(self) -> None:
        self.count, self.seconds, self._started = 0, 0.0, 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.thread_time()
        else:
            self.count += 1
            self.seconds += time.thread_time() - self._started


async def drain(location: str, args: argparse.Namespace) -> dict[str, float]:
    requests = 0

    async def answering(vendor: str, request: OutgoingRequest) -> VendorAnswer:
        nonlocal requests
        requests += 1
        await asyncio.sleep(0)  # a turn of the loop, as an answer from a socket takes at least
        return VendorAnswer(200, b'{"status": true}', None)

    store = SQLiteStore(location, durable=False)  # as `segrelay deliver` opens it: its writer on the event loop
    config = Config.from_env({**os.environ, "SEGRELAY_STORE": f"sqlite:///{location}", "SEGRELAY_SECRET": SECRET,
                              "SEGRELAY_VENDOR_CONCURRENCY": str(args.concurrency)})
    deliverer = Deliverer(config, store, Sealer(SECRET.encode()), transport=answering)
    collections = Collections()
    gc.callbacks.append(collections)
    profiler = cProfile.Profile() if args.profile else None
    cpu, wall = time.process_time(), time.perf_counter()
    if profiler:
        profiler.enable()
    deliverer.start()
    while sum((await store.counts()).pending.values()) or len(deliverer.completions):
        await asyncio.sleep(0.02)
    if profiler:
        profiler.disable()
        profiler.dump_stats(args.profile)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    gc.callbacks.remove(collections)
    await deliverer.stop(1.0)
    await store.close()
    spent = staged_deliver.SPENT
    sql = sum(staged_deliver.by_statement(spent).values())
    return {"events/s": args.n / wall, "cpu": cpu, "render": spent.get("render", 0.0), "sql": sql,
            "gc": collections.seconds, "collections": collections.count, "requests": requests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight per vendor")
    parser.add_argument("--profile", metavar="FILE", help="write a cProfile of the drain to FILE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        location = str(Path(tmp) / "store.db")
        asyncio.run(queue(location, events(args.n), SETTINGS["all"]))
        staged_deliver.install()
        figures = uvloop.run(drain(location, args))
    n, requests = args.n, figures["requests"]
    rest = figures["cpu"] - figures["render"] - figures["sql"]
    print(f"\nDelivery in process, {n} Order Completed events for all three vendors ({requests / n:.2f} requests "
          f"per event), every vendor answering at once, {args.concurrency} requests in flight per vendor")
    print(f"{figures['events/s']:,.0f} events/s; CPU per event {figures['cpu'] / n * 1e6:.0f} µs: rendering "
          f"{figures['render'] / n * 1e6:.0f}, SQLite {figures['sql'] / n * 1e6:.0f}, the rest {rest / n * 1e6:.0f} "
          f"({rest / requests * 1e6:.0f} per request); the garbage collector's runs, wherever they fell, "
          f"{figures['gc'] / n * 1e6:.0f} ({figures['collections']:.0f} collections)")


if __name__ == "__main__":
    main()
