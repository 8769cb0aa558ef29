"""Ingest benchmark: POST /segment through the full durable accept path vs a bare Starlette app.

Both run under the same uvicorn (same loop and HTTP implementation), receive the same body and headers from wrk on
loopback, and are measured in the same run: bare Starlette in one process, segrelay as `segrelay serve` ships (its
default number of HTTP processes; `--http-processes N` to choose). segrelay runs with SEGRELAY_DELIVERY=off so
the figure is the accept path alone: auth, settings, normalisation, routing for three vendors (four
postbacks), identity stitching, encryption, durable group commit. Every request is a new message; with
`--visitors unique` each also comes from a new visitor (unique userId and anonymousId: for stitching the costly case,
every look-up misses the store and both ids are written), with `--visitors returning` from a pool of 2,000
visitors whose events come again and again. `--stitching both` measures the setting on and off side by side;
server CPU per request from /proc, summed over segrelay's HTTP processes and, on SQLite, its accept writer.

`--breakdown` also prints where the machine's cores went during each run: every segrelay process's (and
redis-server's) share of a core on it (with that share as CPU per request) and waiting for it (the kernel's
schedstat), wrk's own, and the cores left idle.
`--stages` runs serve's HTTP process (one) under bench/staged_accept.py and prints its CPU per request by step
during the measured run, with its event loop thread's thread CPU clock: the steps bench/accept_cpu.py --stages times
in a loop, here under wrk with the sockets, the switches and the waits (the timing adds two clock reads per step).
`--floors` also measures the same serve's cheapest answers: a screen call (501: the key check, the body, its JSON,
the call type, the answer and its log line) and an unknown key (401: the key check alone), each against the bare
Starlette figure it prints.

    python bench/ingest.py [--store sqlite|redis|both] [--stitching on|off|both] [--visitors unique|returning]
                           [--rounds N] [--seconds 10] [--connections 32] [--fixture F] [--http-processes N]
                           [--breakdown] [--stages] [--floors] [--rdbcompression no|yes]

Redis runs as the README recommends (AOF with appendfsync always, rdbcompression no), a new one for each run as
SQLite gets a new file: an accept-only load never drains, and a Redis kept across runs rewrites an ever larger AOF.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from accept_steps import PER_REQUEST
from common import (
    ALL_VENDORS,
    ROOT,
    SECRET,
    add_ids_option,
    add_rdbcompression_option,
    basic,
    cpu_seconds,
    free_port,
    http_and_delivery_pids,
    machine_idle_seconds,
    print_table,
    redis_server,
    role,
    scheduler_seconds,
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


def run_segrelay(tmp: Path, store: str, args: argparse.Namespace, stitching: bool = True,
                 redis_pid: int | None = None) -> dict[str, float]:
    # Default log level: one JSON line per request, as in production.
    env = {"SEGRELAY_STORE": store, "SEGRELAY_SECRET": SECRET, "SEGRELAY_DELIVERY": "off",
           "SEGRELAY_MAX_QUEUE_MB": "100000", "SEGRELAY_MIN_FREE_DISK_MB": "0"}
    if args.http_processes is not None:
        env["SEGRELAY_HTTP_PROCESSES"] = str(args.http_processes)
    entry = None
    if args.stages:  # one HTTP process, the wrapped one
        env["SEGRELAY_HTTP_PROCESSES"] = "1"
        env["STAGED_ACCEPT_FILE"] = str(tmp / f"stages-{time.monotonic_ns()}.json")
        entry = [str(ROOT / "bench/staged_accept.py")]
    proc, url, key = serve_segrelay(tmp, env, entry)
    try:
        settings = {**ALL_VENDORS, "identityStitching": stitching}
        headers = {"Authorization": basic(key), "X-Segment-Settings": settings_header(settings),
                   "Content-Type": "application/json"}
        event = body(args.fixture, args.visitors)
        wrk(url, event, headers, seconds=2, connections=args.connections, ids=args.ids)  # warm-up
        pids = http_and_delivery_pids(proc.pid)[0]
        names = {p: f"{'accept writer' if role(p) == 'accept-writer' else 'HTTP process'} {p}" for p in pids}
        if redis_pid is not None:
            names[redis_pid] = f"redis-server {redis_pid}"
        scheduled = {p: scheduler_seconds(p) for p in names}
        if args.stages:
            proc.send_signal(signal.SIGUSR1)  # count from here
        figures = measured_load(url, event, headers, args, pids)
        if args.stages:
            figures.update(counted_steps(proc, Path(env["STAGED_ACCEPT_FILE"])))
        elapsed = figures["elapsed_s"]
        figures["processes"] = len(pids)
        for pid, name in names.items():
            (on_cpu, queued), (on_cpu_before, queued_before) = scheduler_seconds(pid), scheduled[pid]
            figures[f"busy {name}"] = (on_cpu - on_cpu_before) / elapsed
            figures[f"queued {name}"] = (queued - queued_before) / elapsed
        if args.floors:
            figures.update(floors(url, event, headers, args))
        return figures
    finally:
        stop(proc)


def measured_load(url: str, event: str, headers: dict[str, str], args: argparse.Namespace,
                  pids: list[int]) -> dict[str, float]:
    """wrk's figures for the measured run, with the CPU the server's processes (`pids`) spent per request and in
    cores, wrk's cores, the machine's idle cores and the run's length (`elapsed_s`)."""
    before, idle, started = sum(cpu_seconds(p) for p in pids), machine_idle_seconds(), time.monotonic()
    figures = wrk(url, event, headers, seconds=args.seconds, connections=args.connections, ids=args.ids)
    elapsed = time.monotonic() - started
    used = sum(cpu_seconds(p) for p in pids) - before
    figures["cpu_us"] = used / max(figures["rps"] * args.seconds, 1) * 1e6
    figures["cpu_cores"] = used / elapsed
    figures["idle_cores"] = (machine_idle_seconds() - idle) / elapsed
    figures["wrk_cores"] = figures["wrk_cpu_s"] / elapsed
    figures["elapsed_s"] = elapsed
    return figures


def counted_steps(proc: subprocess.Popen[bytes], path: Path) -> dict[str, float]:
    """What bench/staged_accept.py counted since SIGUSR1, per request: `step <label>` in µs, `step calls <label>`
    in calls, `loop_us` (the event loop's thread), `other_threads_us` and `clock_us` (the timing's clock reads)."""
    proc.send_signal(signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"the staged HTTP process wrote no counts to {path}")
        time.sleep(0.05)
    counted = json.loads(path.read_text())
    path.unlink()
    requests = max(counted["calls"].get(PER_REQUEST, 0), 1)
    figures = {f"step {label}": seconds / requests * 1e6 for label, seconds in counted["spent"].items()}
    figures.update({f"step calls {label}": calls / requests for label, calls in counted["calls"].items()})
    timed_calls = sum(counted["calls"].values())
    figures["loop_us"] = counted["thread"] / requests * 1e6
    figures["other_threads_us"] = (counted["process"] - counted["thread"]) / requests * 1e6
    figures["clock_us"] = 2 * counted["clock"] * timed_calls / requests * 1e6
    return figures


def print_steps(figures: dict[str, float]) -> None:
    steps = {key.removeprefix("step "): value for key, value in figures.items()
             if key.startswith("step ") and not key.startswith("step calls ")}
    print("  the HTTP process by step, µs per request (its event loop thread's CPU clock under wrk; "
          "bench/accept_cpu.py --stages times the same steps in a loop):")
    for label, us in sorted(steps.items(), key=lambda item: -item[1]):
        calls = figures[f"step calls {label}"]
        every = f"  (once every {1 / calls:.1f} requests)" if calls < 0.95 else ""
        print(f"    {label:<46}{us:7.1f}{every}")
    rest = figures["loop_us"] - sum(steps.values())
    print(f"    {'the rest: the event loop, sockets, tasks, the answer':<46}{rest:7.1f}")
    print(f"    event loop thread in all {figures['loop_us']:.1f} (of which the timing's clock reads about "
          f"{figures['clock_us']:.1f}); the process's other threads {figures['other_threads_us']:.1f}")


def floors(url: str, event: str, headers: dict[str, str], args: argparse.Namespace) -> dict[str, float]:
    """The same serve's cheapest answers, each after a warm-up: a screen call (501: auth, the body, its JSON, the
    call type, the answer and its log line) and an unknown key (401: auth alone, the body unread)."""
    screen = event.replace('"type": "track"', '"type": "screen"')
    if screen == event:
        raise SystemExit("--floors needs a track event as --fixture")
    unknown = {**headers, "Authorization": basic("sr_unknown_key")}
    rates = {}
    for name, body, sent in (("501", screen, headers), ("401", event, unknown)):
        wrk(url, body, sent, seconds=2, connections=args.connections)
        rates[f"floor {name}"] = wrk(url, body, sent, seconds=args.seconds, connections=args.connections)["rps"]
    return rates


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
        return measured_load(f"http://127.0.0.1:{port}", event, headers, args, [proc.pid])
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
    parser.add_argument("--breakdown", action="store_true",
                        help="also print each segrelay process's share of a core (on one, and waiting for one), "
                             "wrk's and the machine's idle cores during the run")
    parser.add_argument("--stages", action="store_true",
                        help="also print the HTTP process's CPU per request by step (one HTTP process)")
    parser.add_argument("--floors", action="store_true",
                        help="also measure the same serve's cheapest answers (501 screen call, 401 unknown key)")
    add_rdbcompression_option(parser)
    add_ids_option(parser)
    args = parser.parse_args()
    if args.stages and args.http_processes not in (None, 1):
        parser.error("--stages times one HTTP process: leave out --http-processes or give 1")
    runs: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as raw_tmp:
        tmp = Path(raw_tmp)
        modes = {"on": [True], "off": [False], "both": [False, True]}[args.stitching]
        for round_ in range(args.rounds):
            runs.setdefault("bare Starlette", []).append(run_bare(tmp, args))
            for on in modes:
                label = f"stitching {'on' if on else 'off'}"
                if args.store in ("sqlite", "both"):
                    store = f"sqlite:///{tmp / f'store-{on}-{round_}.db'}"
                    runs.setdefault(f"SQLite FULL, {label}", []).append(run_segrelay(tmp, store, args, on))
                if args.store in ("redis", "both"):
                    (tmp / f"redis-{on}-{round_}").mkdir()
                    redis = redis_server(tmp / f"redis-{on}-{round_}", args)
                    try:
                        figures = run_segrelay(tmp, redis.url, args, on, redis_pid=redis.proc.pid)
                    finally:
                        redis.stop()
                    runs.setdefault(f"Redis AOF, {label}", []).append(figures)
    rows = [(name, median_run(figures)) for name, figures in runs.items()]
    bare = rows[0][1]
    rounds = f", median of {args.rounds} interleaved rounds" if args.rounds > 1 else ""
    print_table(f"POST /segment, {args.fixture} with settings for all 3 vendors, {args.visitors} visitors, "
                f"wrk -c{args.connections} -d{args.seconds}s{rounds}", rows)
    if args.breakdown:
        print(f"bare Starlette: {bare['cpu_us']:.0f} us of its CPU per request, {bare['cpu_cores']:.2f} on a core; "
              f"wrk {bare['wrk_cores']:.2f}; idle {bare['idle_cores']:.2f} (of {os.cpu_count()})")
    for name, figures in rows[1:]:
        cpu = sorted(r["cpu_us"] for r in runs[name])
        print(f"{name}: {figures['rps'] / bare['rps']:.2f} x bare Starlette, {cpu[len(cpu) // 2]:.0f} us server CPU "
              f"per request (runs: {', '.join(f'{c:.0f}' for c in cpu)})")
        if args.breakdown:
            # a process's share of a core over the accepts per second: its CPU per request, in µs
            shares = [f"{key.removeprefix('busy ')} {value:.2f} on a core ({value / figures['rps'] * 1e6:.0f} us per "
                      f"request) + {figures['queued ' + key.removeprefix('busy ')]:.2f} waiting for one"
                      for key, value in figures.items() if key.startswith("busy ")]
            print(f"  cores during the run: {'; '.join(shares)}; wrk {figures['wrk_cores']:.2f}; "
                  f"idle {figures['idle_cores']:.2f} (of {os.cpu_count()})")
        if args.stages:
            print_steps(figures)
        if args.floors:
            print(f"  the same serve's cheapest answers: 501 (a screen call) {figures['floor 501']:.0f} req/s = "
                  f"{figures['floor 501'] / bare['rps']:.2f} x; 401 (an unknown key) {figures['floor 401']:.0f} "
                  f"req/s = {figures['floor 401'] / bare['rps']:.2f} x")


if __name__ == "__main__":
    main()
