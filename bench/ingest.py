"""Ingest benchmark: POST /segment through the full durable accept path vs a bare Starlette app.

Both run under the same uvicorn (same loop and HTTP implementation), receive the same body and headers from wrk on
loopback, and are measured in the same run: bare Starlette in one process, segrelay as `segrelay serve` ships (one
HTTP process per core; `--http-processes N` to choose). segrelay runs with SEGRELAY_DELIVERY=off so
the figure is the accept path alone: auth, settings, normalisation, routing for three vendors (four
postbacks), identity stitching, encryption, durable group commit. Every request is a new message; with
`--visitors unique` each also comes from a new visitor (unique userId and anonymousId: for stitching the costly case,
every look-up misses the store and both ids are written), with `--visitors returning` from a pool of 2,000
visitors whose events come again and again. `--stitching both` measures the setting on and off side by side;
server CPU per request from /proc, summed over segrelay's HTTP processes and, on SQLite, its accept writer.

    python bench/ingest.py [--store sqlite|redis|both] [--stitching on|off|both] [--visitors unique|returning]
                           [--rounds N] [--seconds 10] [--connections 32] [--fixture F] [--http-processes N]
"""

from __future__ import annotations

import argparse
import json
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
    print_table,
    serve_segrelay,
    settings_header,
    start,
    stop,
    wrk,
)

UVICORN = ["-m", "uvicorn", "--host", "127.0.0.1", "--no-access-log", "--log-level", "warning"]


def body(fixture: str = "order_completed.json", visitors: str = "unique") -> str:
    event = json.loads((ROOT / "tests/fixtures/segment" / fixture).read_text())
    event["messageId"] = "__MESSAGE_ID__"
    visitor = "__MESSAGE_ID__" if visitors == "unique" else "__VISITOR__"
    event["userId"] = f"user-{visitor}"
    event["anonymousId"] = f"anon-{visitor}"
    return json.dumps(event)


def run_segrelay(tmp: Path, store: str, args: argparse.Namespace, stitching: bool = True) -> dict[str, float]:
    # Default log level: one JSON line per request, as in production.
    env = {"SEGRELAY_STORE": store, "SEGRELAY_SECRET": SECRET, "SEGRELAY_DELIVERY": "off",
           "SEGRELAY_MAX_QUEUE_MB": "100000", "SEGRELAY_MIN_FREE_DISK_MB": "0"}
    if args.http_processes is not None:
        env["SEGRELAY_HTTP_PROCESSES"] = str(args.http_processes)
    proc, url, key = serve_segrelay(tmp, env)
    try:
        settings = {**ALL_VENDORS, "identityStitching": stitching}
        headers = {"Authorization": basic(key), "X-Segment-Settings": settings_header(settings),
                   "Content-Type": "application/json"}
        event = body(args.fixture, args.visitors)
        wrk(url, event, headers, seconds=2, connections=args.connections)  # warm-up
        pids = http_and_delivery_pids(proc.pid)[0]
        before = sum(cpu_seconds(p) for p in pids)
        figures = wrk(url, event, headers, seconds=args.seconds, connections=args.connections)
        requests = figures["rps"] * args.seconds
        figures["cpu_us"] = (sum(cpu_seconds(p) for p in pids) - before) / max(requests, 1) * 1e6
        figures["processes"] = len(pids)
        return figures
    finally:
        stop(proc)


def run_bare(tmp: Path, args: argparse.Namespace, event: str | None = None) -> dict[str, float]:
    """The reference: bare Starlette under the same uvicorn, the same body and headers, the same wrk."""
    port = free_port()
    proc = start([sys.executable, *UVICORN, "--port", str(port), "--app-dir", str(ROOT / "bench"), "bare_app:app"],
                 {}, f"http://127.0.0.1:{port}/healthz", tmp / "bare.log")
    try:
        headers = {"Authorization": "Basic eDo=", "X-Segment-Settings": settings_header(ALL_VENDORS),
                   "Content-Type": "application/json"}
        event = event or body(args.fixture)
        wrk(f"http://127.0.0.1:{port}", event, headers, seconds=2, connections=args.connections)
        return wrk(f"http://127.0.0.1:{port}", event, headers, seconds=args.seconds, connections=args.connections)
    finally:
        stop(proc)


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """The run with the median throughput (this machine's neighbours make single runs noisy)."""
    return sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=["sqlite", "redis", "both"], default="both")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--http-processes", type=int, default=None,
                        help="SEGRELAY_HTTP_PROCESSES for serve (default: serve's own default)")
    parser.add_argument("--fixture", default="order_completed.json", help="event from tests/fixtures/segment")
    parser.add_argument("--stitching", choices=["on", "off", "both"], default="both",
                        help="the identityStitching setting of the requests (both: one run each)")
    parser.add_argument("--visitors", choices=["unique", "returning"], default="unique",
                        help="a new visitor per request, or a pool of 2,000 returning visitors")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the cases in turn this many times and report each one's median run")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as raw_tmp:
        tmp = Path(raw_tmp)
        modes = {"on": [True], "off": [False], "both": [False, True]}[args.stitching]
        redis = None
        if args.store in ("redis", "both"):
            (tmp / "redis").mkdir()
            redis = RedisServer(tmp / "redis")  # AOF, appendfsync always
        try:
            for round_ in range(args.rounds):
                runs.setdefault("bare Starlette", []).append(run_bare(tmp, args))
                for on in modes:
                    label = f"stitching {'on' if on else 'off'}"
                    if args.store in ("sqlite", "both"):
                        store = f"sqlite:///{tmp / f'store-{on}-{round_}.db'}"
                        runs.setdefault(f"SQLite FULL, {label}", []).append(run_segrelay(tmp, store, args, on))
                    if redis is not None:
                        runs.setdefault(f"Redis AOF, {label}", []).append(run_segrelay(tmp, redis.url, args, on))
        finally:
            if redis is not None:
                redis.stop()
    rows = [(name, median_run(figures)) for name, figures in runs.items()]
    bare = rows[0][1]
    rounds = f", median of {args.rounds} interleaved rounds" if args.rounds > 1 else ""
    print_table(f"POST /segment, {args.fixture} with settings for all 3 vendors, {args.visitors} visitors, "
                f"wrk -c{args.connections} -d{args.seconds}s{rounds}", rows)
    for name, figures in rows[1:]:
        cpu = sorted(r["cpu_us"] for r in runs[name])
        print(f"{name}: {figures['rps'] / bare['rps']:.2f} x bare Starlette, {cpu[len(cpu) // 2]:.0f} us server CPU "
              f"per request (runs: {', '.join(f'{c:.0f}' for c in cpu)})")


if __name__ == "__main__":
    main()
