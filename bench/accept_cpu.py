"""Where the accept path's CPU goes, without HTTP: the ASGI app called in-process, event after event.

Builds the app as `segrelay serve` does (its store, its key check, its log line to a discarded stream), runs its
start-up, then calls POST /segment `--n` times with `--concurrency` requests in flight and prints the CPU per event:
all threads (the process), the event loop's thread alone, and the rest (SQLite's writer thread). With `--profile`
it writes a cProfile of the loop to the named file (read it with `python -m pstats`); with `--stages` it times the
accept path's main steps with the event loop's thread CPU clock (meaningful at `--concurrency 1`, where nothing
else runs while a step awaits) and prints their CPU per event. No socket is opened: this is
the cost of segrelay's own code, the figure to compare a change against; the HTTP benchmarks add uvicorn's.

    python bench/accept_cpu.py [--store sqlite|redis] [--n 20000] [--concurrency 32] [--stitching on|off]
                               [--visitors unique|returning] [--profile FILE] [--stages]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from accept_steps import install
from common import ALL_VENDORS, SECRET, RedisServer, basic, settings_header
from ingest import body

os.environ.setdefault("SEGRELAY_SECRET", SECRET)


async def run(args: argparse.Namespace, store: str) -> dict[str, float]:
    from app.config import Config
    from app.crypto import KeyHasher
    from app.keys import new_key
    from app.log import configure
    from app.server import create_app

    config = Config.from_env({**os.environ, "SEGRELAY_STORE": store, "SEGRELAY_DELIVERY": "off",
                              "SEGRELAY_MAX_QUEUE_MB": "100000", "SEGRELAY_MIN_FREE_DISK_MB": "0"})
    configure("info")
    app = create_app(config)
    service = app.service
    key, record = new_key(KeyHasher(config.secret), "bench", time.time(), None, ())
    await service.store.save_key(record)
    await service.start()
    settings = settings_header({**ALL_VENDORS, "identityStitching": args.stitching == "on"})
    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
               (b"authorization", basic(key).encode()), (b"x-segment-settings", settings.encode())]
    template = body(visitors=args.visitors)
    statuses: dict[int, int] = {}

    async def one(n: int) -> None:
        raw = template.replace("__MESSAGE_ID__", f"cpu-{n}").replace("__VISITOR__", str(n % 2000)).encode()
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses[message["status"]] = statuses.get(message["status"], 0) + 1

        scope = {"type": "http", "method": "POST", "path": "/segment", "headers": [
            *headers, (b"content-length", str(len(raw)).encode())], "query_string": b"", "root_path": ""}
        await app(scope, receive, send)

    async def loop(first: int, count: int) -> None:
        queue = iter(range(first, first + count))

        async def worker() -> None:
            for n in queue:
                await one(n)
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))

    await loop(0, 2000)  # warm-up: caches, the first commits
    stages = timed_stages() if args.stages else {}
    profiler = cProfile.Profile() if args.profile else None
    cpu, thread, wall = time.process_time(), time.thread_time(), time.perf_counter()
    if profiler:
        profiler.enable()
    await loop(10_000_000, args.n)
    if profiler:
        profiler.disable()
        profiler.dump_stats(args.profile)
    cpu, thread, wall = time.process_time() - cpu, time.thread_time() - thread, time.perf_counter() - wall
    await service.stop()
    if set(statuses) != {202}:
        raise SystemExit(f"unexpected answers: {statuses}")
    for name, spent in sorted(stages.items(), key=lambda item: -item[1]):
        print(f"  {name:<46}{spent / args.n * 1e6:8.1f} us per event", file=sys.__stdout__)
    return {"events/s": args.n / wall, "cpu_us": cpu / args.n * 1e6, "loop_us": thread / args.n * 1e6,
            "other_us": (cpu - thread) / args.n * 1e6}


def timed_stages() -> dict[str, float]:
    """Wrap each step (bench/accept_steps.py, the awaiting ones too) so that its thread CPU time adds up under its
    label; returns the running totals."""
    spent: dict[str, float] = {}
    install(spent, {}, awaiting=True)
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", choices=["sqlite", "redis"], default="sqlite")
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--stitching", choices=["on", "off"], default="on")
    parser.add_argument("--visitors", choices=["unique", "returning"], default="returning")
    parser.add_argument("--profile", metavar="FILE")
    parser.add_argument("--stages", action="store_true", help="CPU per event of each step of the accept path")
    args = parser.parse_args()
    shown, sys.stdout = sys.stdout, open(os.devnull, "w")  # noqa: SIM115 (log lines are written, to nowhere)
    with tempfile.TemporaryDirectory() as tmp:
        if args.store == "redis":
            redis = RedisServer(Path(tmp))
            try:
                figures = asyncio.run(run(args, redis.url))
            finally:
                redis.stop()
        else:
            figures = asyncio.run(run(args, f"sqlite:///{tmp}/segrelay.db"))
    sys.stdout = shown
    print(f"{args.store}, stitching {args.stitching}, {args.visitors} visitors, {args.n} events, "
          f"{args.concurrency} in flight: {figures['events/s']:,.0f} events/s; CPU per event "
          f"{figures['cpu_us']:.0f} us (event loop {figures['loop_us']:.0f}, other threads "
          f"{figures['other_us']:.0f})")


if __name__ == "__main__":
    main()
