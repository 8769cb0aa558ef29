"""Interleaved A/B of the accept path: segrelay from several source trees and bare Starlette, all serving at once,
loaded in turn with short wrk slices, so that every tree's rate is measured minutes, not runs, apart.

On a machine whose speed changes within a minute (this one: bare Starlette 5,400-9,600 req/s in one run), two
separate `bench/ingest.py` runs cannot tell a 10 % change from the noise. Here each round loads bare Starlette,
then every tree (in turn forward and backward on alternate rounds), then bare Starlette again; each tree's ratio in
a round is its rate over the mean of that round's two bare Starlette slices. Prints every round's figures, the
median and mean ratio, and the HTTP side's CPU per request (its processes, on SQLite the accept writer too, whose
own share is also shown).

A tree is a directory holding segrelay's `app/` and `handlers/`: a `git worktree add /tmp/old <commit>` of another
commit, or this checkout. Delivery is off (`SEGRELAY_DELIVERY=off`), identity stitching on, returning visitors,
Order Completed for all three vendors, as `bench/ingest.py` measures it.

    python bench/ab.py TREE[,TREE...] [--store sqlite|redis] [--rounds 6] [--seconds 3] [--connections 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from common import (
    ALL_VENDORS,
    ROOT,
    SECRET,
    RedisServer,
    basic,
    cpu_seconds,
    free_port,
    http_and_delivery_pids,
    role,
    serve_segrelay,
    settings_header,
    start,
    stop,
    wrk,
)
from ingest import UVICORN, body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", help="comma-separated source trees (directories with app/ and handlers/)")
    parser.add_argument("--store", choices=["sqlite", "redis"], default="sqlite")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=3, help="length of each wrk slice")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    trees = [str(Path(tree).resolve()) for tree in args.trees.split(",")]
    for tree in trees:
        if not (Path(tree) / "app" / "__main__.py").is_file():
            raise SystemExit(f"not a segrelay source tree: {tree}")
    event = body("order_completed.json", "returning")
    running, redis_servers = [], []
    tmp = Path(tempfile.mkdtemp(prefix="segrelay-ab-"))
    port = free_port()
    bare = start([sys.executable, *UVICORN, "--port", str(port), "--app-dir", str(ROOT / "bench"), "bare_app:app"],
                 {}, f"http://127.0.0.1:{port}/healthz", tmp / "bare.log")
    running.append(bare)
    bare_headers = {"Authorization": "Basic eDo=", "X-Segment-Settings": settings_header(ALL_VENDORS),
                    "Content-Type": "application/json"}
    writers: set[int] = set()  # the accept writers' pids (SQLite)
    targets = [("bare Starlette", f"http://127.0.0.1:{port}", bare_headers, [bare.pid])]
    try:
        for index, tree in enumerate(trees):
            home = tmp / f"tree{index}"
            home.mkdir()
            if args.store == "redis":
                redis_servers.append(RedisServer(home))
                store = redis_servers[-1].url
            else:
                store = f"sqlite:///{home}/segrelay.db"
            env = {"SEGRELAY_STORE": store, "SEGRELAY_SECRET": SECRET, "SEGRELAY_DELIVERY": "off",
                   "PYTHONPATH": tree, "SEGRELAY_MAX_QUEUE_MB": "100000", "SEGRELAY_MIN_FREE_DISK_MB": "0"}
            proc, url, key = serve_segrelay(home, env)
            running.append(proc)
            headers = {"Authorization": basic(key), "Content-Type": "application/json",
                       "X-Segment-Settings": settings_header({**ALL_VENDORS, "identityStitching": True})}
            targets.append((tree, url, headers, http_and_delivery_pids(proc.pid)[0]))
            writers.update(pid for pid in targets[-1][3] if role(pid) == "accept-writer")
        for _, url, headers, _ in targets:
            wrk(url, event, headers, seconds=2, connections=args.connections)  # warm-up
        rates: dict[str, list[float]] = {name: [] for name, *_ in targets}
        cpu: dict[str, list[float]] = {name: [] for name, *_ in targets}
        writer_cpu: dict[str, list[float]] = {name: [] for name, *_ in targets}  # of it, the accept writer's
        for round_ in range(args.rounds):
            trees_in_turn = targets[1:] if round_ % 2 == 0 else targets[:0:-1]
            for name, url, headers, pids in [targets[0], *trees_in_turn, targets[0]]:
                before = {pid: cpu_seconds(pid) for pid in pids}
                figures = wrk(url, event, headers, seconds=args.seconds, connections=args.connections)
                if figures["non_2xx"]:
                    raise SystemExit(f"{name}: {figures['non_2xx']:.0f} answers were not 2xx")
                rates[name].append(figures["rps"])
                spent = {pid: cpu_seconds(pid) - before[pid] for pid in pids}
                requests = max(figures["rps"] * args.seconds, 1)
                cpu[name].append(sum(spent.values()) / requests * 1e6)
                writer_cpu[name].append(sum(s for pid, s in spent.items() if pid in writers) / requests * 1e6)
    finally:
        for proc in running:
            stop(proc)
        for server in redis_servers:
            server.kill()
    bare_rates = rates["bare Starlette"]
    print(f"\naccept path, {args.store}, Order Completed for 3 vendors, returning visitors, stitching on, "
          f"wrk -c{args.connections}, {args.rounds} rounds of {args.seconds} s slices")
    print("bare Starlette req/s:", " ".join(f"{rate:.0f}" for rate in bare_rates))
    for name, *_ in targets[1:]:
        ratios = [rates[name][r] / ((bare_rates[2 * r] + bare_rates[2 * r + 1]) / 2) for r in range(args.rounds)]
        print(f"{name}\n  req/s {' '.join(f'{rate:.0f}' for rate in rates[name])}\n"
              f"  x bare Starlette {' '.join(f'{ratio:.3f}' for ratio in ratios)}: median "
              f"{statistics.median(ratios):.3f}, mean {statistics.mean(ratios):.3f}; server CPU per request median "
              f"{statistics.median(cpu[name]):.0f} us"
              + (f" (accept writer {statistics.median(writer_cpu[name]):.0f})" if args.store == "sqlite" else ""))


if __name__ == "__main__":
    main()
