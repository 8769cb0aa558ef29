"""End-to-end benchmark: `segrelay serve` as shipped, wrk posting unique events, vendors on a local stand-in.

Every event is an Order Completed with settings for all three vendors (four postbacks: SegmentStream track and
data stream, Tracify, Audiohook). wrk posts for --seconds, then the benchmark waits until every accepted event has
reached the stand-in for every postback. Printed, from one run:
  accepted/s, p50/p99 (wrk), time from the start of the load to the last delivery (and to the 99th percentile of
  deliveries: a gap between the two is a tail of late postbacks), sustained events/s
  (accepted / that time), lost and duplicate postbacks (counted by the stand-in, by order id), server CPU per
  event (the accept side: HTTP processes and, on SQLite, the accept writer; and the delivery processes, from
  /proc; on Redis also redis-server's, over the load and the drain), the server's own request durations (p99, the
  longest, how many over 25 ms: from serve's request lines), on Redis the calls that held redis-server over 1 ms
  (`SLOWLOG`, by script: what accepts waited behind) and the bare Starlette accept rate (same uvicorn, same body,
  same wrk) as the reference.

    python bench/e2e.py [--store sqlite|redis|both] [--seconds 10] [--connections 32] [--prefill N]
                        [--rdbcompression no|yes]

Redis runs as the README recommends: AOF with appendfsync always, rdbcompression no (`yes`: Redis's default).

--prefill N queues N postbacks for a vendor nobody answers before the load (the queue-depth case: ingest and
delivery must not slow down as the queue grows).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis as redis_client
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
    redis_server,
    role,
    serve_segrelay,
    settings_header,
    stop,
    wrk,
)
from ingest import run_bare

KINDS = ("segmentstream_track", "segmentstream_data_stream", "tracify", "audiohook")
SLOW_US = 1000  # redis-server calls longer than this are counted (SLOWLOG)


def watch_slow_calls(url: str) -> None:
    """Have redis-server log every call over SLOW_US, from now on."""
    client = redis_client.Redis.from_url(url)
    client.config_set("slowlog-log-slower-than", SLOW_US)
    client.config_set("slowlog-max-len", 1_000_000)
    client.slowlog_reset()


def slow_calls(url: str) -> dict[str, Any]:
    """The calls that held redis-server over SLOW_US since `watch_slow_calls`: how many, the longest, and by script
    (app/store/redis_scripts.py's, named by their SHA1) or command."""
    from app.store import redis_scripts

    names = {hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest(): name
             for name, text in vars(redis_scripts).items() if name.isupper() and isinstance(text, str)}
    client = redis_client.Redis.from_url(url)
    entries: Any = client.execute_command("SLOWLOG", "GET", -1)
    by: dict[str, list[float]] = {}
    for entry in entries:
        args = [a.decode(errors="replace") if isinstance(a, bytes) else str(a) for a in entry[3]]
        name = names.get(args[1], "script") if args[0].upper() in ("EVALSHA", "EVAL") and len(args) > 1 else args[0]
        by.setdefault(name, []).append(entry[2] / 1000)
    durations = sorted(ms for one in by.values() for ms in one)
    return {"redis_over_1ms": len(durations), "redis_longest_ms": round(durations[-1], 1) if durations else 0.0,
            "redis_over_1ms_by": {name: len(ms) for name, ms in sorted(by.items(), key=lambda kv: -len(kv[1]))}}


def event_body() -> str:
    event = json.loads((ROOT / "tests/fixtures/segment/order_completed.json").read_text())
    event["messageId"] = "__MESSAGE_ID__"
    event["properties"]["order_id"] = "__MESSAGE_ID__"
    return json.dumps(event)


def standin(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "standin.py"), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "standin.log", "wb"))  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            httpx.get(url + "/_count", timeout=1)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError("stand-in did not start")


def tally(url: str) -> dict[str, Any]:
    result: dict[str, Any] = httpx.get(url + "/_count", timeout=30).json()
    return result


# Redis: move up to 10,000 entries of the Audiohook stream to its retry set, due at ARGV[1]; returns how many.
PARK = """
local entries = redis.call('XRANGE', 'segrelay:jobs:audiohook', '-', '+', 'COUNT', 10000)
for _, entry in ipairs(entries) do
  local f = entry[2]  -- a job waiting for its retry has a hash of its own (app/store/redis_scripts.py)
  redis.call('HSET', 'segrelay:job:' .. f[2], 'event', f[6], 'vendor', 'audiohook', 'target', f[8], 'tenant', f[10],
    'event_name', f[12], 'batch_key', f[14], 'size', f[16], 'created_at', f[18], 'attempts', f[20], 'message_id', f[22])
  redis.call('ZADD', 'segrelay:delayed:audiohook', ARGV[1], f[2])
  redis.call('XDEL', 'segrelay:jobs:audiohook', entry[1])
end
return #entries
"""


def lock_waits(exported: str) -> dict[str, float]:
    """SQLite: the accept writer's groups, those that took over 10 ms in all (the lock's wait, statements,
    COMMIT with its fsync and any checkpoint, the answers) and those that waited over 10 ms for the write lock (held
    by a delivery process, mostly), from serve's /metrics; nothing on Redis."""
    def value(pattern: str) -> float | None:
        found = re.search(pattern, exported, re.MULTILINE)
        return float(found.group(1)) if found else None
    groups = value(r"^segrelay_accept_writer_lock_wait_seconds_count ([0-9.e+]+)$")
    short_wait = value(r'^segrelay_accept_writer_lock_wait_seconds_bucket\{le="0\.01"\} ([0-9.e+]+)$')
    short = value(r'^segrelay_accept_writer_transaction_seconds_bucket\{le="0\.01"\} ([0-9.e+]+)$')
    if not groups or short_wait is None or short is None:  # Redis: the histograms are there, empty
        return {}
    return {"writer_groups": groups, "writer_groups_over_10ms": groups - short,
            "writer_lock_waits_over_10ms": groups - short_wait}


def prefill(env: dict[str, str], tmp: Path, count: int) -> None:
    """Queue `count` Audiohook postbacks due in a day: the backlog of a vendor outage, waiting for its retries."""
    code = f"""
PARK = {PARK!r}
import asyncio, time
from app.store import NewJob, open_store
async def main():
    store = open_store({env['SEGRELAY_STORE']!r})
    now = time.time()
    jobs = [NewJob("audiohook", "pixel", "Order Completed", "")]
    for start in range(0, {count}, 2000):
        await asyncio.gather(*(store.accept("prefill", f"p{{i}}", b"x" * 1200, jobs, now=now + 86400, ttl=604800)
                               for i in range(start, min(start + 2000, {count}))))
    await store.fan_out()  # the jobs are written when delivery first leases: before the load
    if hasattr(store, "client"):  # Redis queues every accepted job as due: park them as retries due tomorrow
        while await store.client.eval(PARK, 0, now + 86400):
            pass
        # Redis rewrote its growing AOF several times meanwhile: start the load once the last rewrite is over
        while (await store.client.info("persistence")).get("aof_rewrite_in_progress"):
            await asyncio.sleep(0.5)
    await store.close()
asyncio.run(main())
"""
    subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, cwd=ROOT, check=True)
    os.sync()  # the gigabytes just written reach the disk now, not during the measured load


def server_durations(log: Path) -> list[float]:
    """The server's own durations of POST /segment (its request lines), sorted: how long each request took inside
    segrelay, without wrk's and the network's share (a stall inside the server shows here as a run of long ones)."""
    durations = []
    with open(log, "rb") as lines:
        for line in lines:
            if b'"segrelay.access"' in line and b'"/segment"' in line:
                durations.append(float(orjson.loads(line)["duration_ms"]))
    return sorted(durations)


def run_segrelay(tmp: Path, store: str, args: argparse.Namespace, vendor_url: str, standin_pid: int,
                 redis_pid: int | None = None) -> dict[str, Any]:
    env = {"SEGRELAY_STORE": store, "SEGRELAY_SECRET": SECRET, "SEGRELAY_MAX_QUEUE_MB": "100000",
           "SEGRELAY_TENANT_QUEUE_SHARE": "1", "SEGRELAY_MIN_FREE_DISK_MB": "0",
           **{f"SEGRELAY_{v.upper()}_URL": vendor_url for v in ("segmentstream", "tracify", "audiohook")}}
    if args.delivery_processes is not None:
        env["SEGRELAY_DELIVERY_PROCESSES"] = str(args.delivery_processes)
    if args.http_processes is not None:
        env["SEGRELAY_HTTP_PROCESSES"] = str(args.http_processes)
    if args.prefill:
        prefill(env, tmp, args.prefill)
    httpx.post(vendor_url + "/_reset", timeout=10).raise_for_status()  # each run counts only its own postbacks
    proc, url, key = serve_segrelay(tmp, env)
    try:
        headers = {"Authorization": basic(key), "X-Segment-Settings": settings_header(ALL_VENDORS),
                   "Content-Type": "application/json"}
        http_pids, delivery_pids = http_and_delivery_pids(proc.pid)
        pids = http_pids + delivery_pids
        cpu_before = {p: cpu_seconds(p) for p in pids}
        redis_before = cpu_seconds(redis_pid) if redis_pid else 0.0
        standin_before = cpu_seconds(standin_pid)
        before = 0
        if redis_pid:
            watch_slow_calls(store)
        started = time.time()
        load = wrk(url, event_body(), headers, seconds=args.seconds, connections=args.connections, ids=args.ids)
        accepted = int(load["requests"] - load["non_2xx"])
        cpu_load = {p: cpu_seconds(p) - cpu_before[p] for p in pids}
        expected = accepted * len(KINDS) + before
        deadline = time.time() + 600
        while time.time() < deadline:
            seen = tally(vendor_url)
            got = sum(len(c) for c in seen["postbacks"].values())
            if got >= expected:
                break
            time.sleep(0.25)
        time.sleep(1.0)  # anything sent twice arrives now
        seen = tally(vendor_url)
        cpu_all = {p: cpu_seconds(p) - cpu_before[p] for p in pids}
        redis_cpu = cpu_seconds(redis_pid) - redis_before if redis_pid else 0.0
        standin_cpu = cpu_seconds(standin_pid) - standin_before
        sent = sum(sum(c.values()) for c in seen["postbacks"].values())
        distinct = sum(len(c) for c in seen["postbacks"].values())
        drained = seen["last"] - started
        arrivals = sorted(seen["arrivals"])
        most = arrivals[int(len(arrivals) * 0.99) - 1] - started if arrivals else 0.0
        server = server_durations(tmp / "segrelay.log")
        exported = httpx.get(url + "/metrics", timeout=10).text
        opened = re.search(r"^segrelay_delivery_events_opened_total ([0-9.e+]+)$", exported, re.MULTILINE)
        return {
            "accepted": accepted, "accepted_per_s": load["rps"], "p50_ms": load["p50_ms"], "p99_ms": load["p99_ms"],
            "non_2xx": load["non_2xx"], "load_s": args.seconds, "last_delivery_after_s": round(drained, 2),
            "p99_delivery_after_s": round(most, 2),
            "sustained_events_per_s": round(accepted / drained, 1), "lost": max(0, expected - distinct),
            "duplicates": sent - distinct,
            "http_processes": sum(1 for p in http_pids if role(p) != "accept-writer"),
            "http_cpu_us_per_event": round(sum(cpu_load[p] for p in http_pids) / max(accepted, 1) * 1e6, 1),
            "delivery_cpu_us_per_event": round(sum(cpu_all[p] for p in delivery_pids) / max(accepted, 1) * 1e6, 1),
            **({"redis_cpu_us_per_event": round(redis_cpu / max(accepted, 1) * 1e6, 1)} if redis_pid else {}),
            "standin_cpu_us_per_event": round(standin_cpu / max(accepted, 1) * 1e6, 1),  # the vendors' share
            # how many times delivery parsed each stored event (segrelay's own counter; prefilled events are not due)
            "parses_per_event": round(float(opened.group(1)) / max(accepted, 1), 2) if opened else None,
            "server_p99_ms": server[int(len(server) * 0.99) - 1] if server else 0.0,
            **lock_waits(exported),
            "server_max_ms": server[-1] if server else 0.0,
            "server_over_25ms": sum(1 for ms in server if ms > 25),
            "last_by_kind_s": {kind: round(at - started, 1) for kind, at in sorted(seen["last_by_kind"].items())},
            **(slow_calls(store) if redis_pid else {}),
        }
    finally:
        stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=["sqlite", "redis", "both"], default="sqlite")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--prefill", type=int, default=0, help="postbacks queued before the load")
    parser.add_argument("--delivery-processes", type=int, default=None,
                        help="SEGRELAY_DELIVERY_PROCESSES for serve (default: serve's own default)")
    parser.add_argument("--http-processes", type=int, default=None,
                        help="SEGRELAY_HTTP_PROCESSES for serve (default: serve's own default)")
    add_rdbcompression_option(parser)
    add_ids_option(parser)
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as raw_tmp:
        tmp = Path(raw_tmp)
        bare = run_bare(tmp, args, event_body())
        results["bare Starlette"] = {"accepted_per_s": bare["rps"], "p50_ms": bare["p50_ms"],
                                     "p99_ms": bare["p99_ms"]}
        vendor, vendor_url = standin(tmp)
        try:
            if args.store in ("sqlite", "both"):
                results["segrelay, SQLite"] = run_segrelay(tmp, f"sqlite:///{tmp / 'store.db'}", args, vendor_url,
                                                           vendor.pid)
            if args.store in ("redis", "both"):
                (tmp / "redis").mkdir()
                redis = redis_server(tmp / "redis", args)
                try:
                    results["segrelay, Redis"] = run_segrelay(tmp, redis.url, args, vendor_url, vendor.pid,
                                                              redis.proc.pid)
                finally:
                    redis.stop()
        finally:
            vendor.terminate()
    print(f"\nend to end: Order Completed to all 3 vendors (4 postbacks), wrk -c{args.connections} -d{args.seconds}s"
          f"{f', {args.prefill} postbacks queued before' if args.prefill else ''}")
    for name, figures in results.items():
        print(f"{name:<20} " + "  ".join(f"{k}={v}" for k, v in figures.items()))
    for name, figures in results.items():
        if name != "bare Starlette":
            print(f"ratio accepted/s {name} / bare Starlette: {figures['accepted_per_s'] / bare['rps']:.2f}")


if __name__ == "__main__":
    main()
