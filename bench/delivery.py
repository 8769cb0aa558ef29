"""Delivery benchmark: postbacks/s from a full queue to the vendor stand-in, vs raw aiohttp and raw httpx.

N Order Completed events are queued in a fresh SQLite store, exactly as the accept path stores them: for
SegmentStream's postback API only (one postback each, the default), or with `--vendors all` for all three vendors
(four postbacks each, as in bench/e2e.py, without the HTTP side). Then `segrelay deliver` alone drains them to the
raw-asyncio stand-in (bench/standin.py); its CPU per event comes from /proc. The references post the same rendered
requests (one per postback) to the same stand-in with the same concurrency from one process: segrelay's own
client (app/delivery/http_client.py) alone, a raw aiohttp.ClientSession and a raw httpx.AsyncClient, each with its
CPU per request. Rates are the stand-in's own arrival times (first to last). `--client aiohttp` runs `segrelay
deliver` with SEGRELAY_HTTP_CLIENT=aiohttp.

    python bench/delivery.py [--n 5000] [--concurrency 32] [--vendors segmentstream|all] [--client builtin|aiohttp]
                             [--processes N] [--store sqlite|redis] [--no-references]

`--processes N` drains the queue with N delivery processes together, as `serve` runs them (each with its slot at
SQLite's write lock); the CPU per event is theirs summed. `--store redis` queues the events in a private
redis-server (AOF, appendfsync always) instead, and also prints redis-server's CPU per event and the commands
it ran per event (`INFO commandstats`, delivery only: the counts are reset once the queue is full).
`--no-references` skips the raw clients (raw httpx alone takes minutes for large N). `--stages` runs each delivery
process under bench/staged_deliver.py and prints where its CPU went, per event: rendering, SQLite's statements
(COMMIT and BEGIN apart) and the rest (the event loop, the HTTP client, the worker's bookkeeping), each timed with
its thread's CPU clock.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
import redis as redis_client
import staged_deliver
from common import ALL_VENDORS, ROOT, SECRET, RedisServer, cpu_seconds
from e2e import standin, tally

from app.crypto import Sealer
from app.delivery.http_client import HttpClient
from app.event import parse_event
from app.outgoing import OutgoingRequest, render
from app.settings import resolve
from app.store import NewJob, Store
from app.store.redis import RedisStore
from app.store.sqlite import PRIORITY_SLOTS, SQLiteStore
from app.stored import pack_event
from app.translate import active_vendors, translate
from handlers import BY_SLUG, Postback
from handlers._base import Settings

SETTINGS = {"segmentstream": resolve({"segmentstreamApiToken": "ss-token"}), "all": resolve(ALL_VENDORS)}


def events(n: int) -> list[bytes]:
    raw = orjson.loads((ROOT / "tests/fixtures/segment/order_completed.json").read_bytes())
    out = []
    for i in range(n):
        raw["messageId"] = raw["properties"]["order_id"] = f"bench-1-{i}"
        out.append(orjson.dumps(raw))
    return out


def postbacks(body: bytes, settings: Settings) -> list[Postback]:
    event = parse_event(orjson.loads(body), body, datetime.now(UTC))
    return translate(event, settings, active_vendors(settings)).postbacks


def requests(bodies: list[bytes], url: str, settings: Settings) -> list[OutgoingRequest]:
    return [render(BY_SLUG[p.vendor], [p], url) for body in bodies for p in postbacks(body, settings)]


async def queue(location: str, bodies: list[bytes], settings: Settings) -> None:
    """The events, accepted as the accept path stores them, in a SQLite file (a path) or Redis (a redis:// url)."""
    store: Store = RedisStore(location) if location.startswith("redis://") else SQLiteStore(location)
    sealer = Sealer(SECRET.encode())
    now = time.time()
    packed = orjson.dumps(dict(settings))
    jobs = [NewJob(p.vendor, p.target, "Order Completed", p.batch_key) for p in postbacks(bodies[0], settings)]
    for start in range(0, len(bodies), 500):
        batch = bodies[start:start + 500]
        await asyncio.gather(*(store.accept("bench", f"m{start + i}", sealer.seal(pack_event(packed, now, body)),
                                            jobs, now=now, ttl=3600) for i, body in enumerate(batch)))
    await store.close()


async def raw_builtin(items: list[OutgoingRequest], concurrency: int) -> None:
    client = HttpClient(limit=concurrency, connect_timeout=5, read_timeout=15, max_body=64 * 1024)
    pending = iter(items)

    async def worker() -> None:
        for request in pending:
            answer = await client.request(request.method, request.url, request.headers, request.content)
            assert answer.status == 200
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await client.close()


async def raw_aiohttp(items: list[OutgoingRequest], concurrency: int) -> None:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        pending = iter(items)

        async def worker() -> None:
            for request in pending:
                async with session.request(request.method, request.url, headers=request.headers,
                                           data=request.content) as response:
                    await response.read()
                    assert response.status == 200
        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def raw_httpx(items: list[OutgoingRequest], concurrency: int) -> None:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(15, connect=5)) as client:
        pending = iter(items)

        async def worker() -> None:
            for request in pending:
                response = await client.request(request.method, request.url, headers=request.headers,
                                                content=request.content)
                assert response.status_code == 200
        await asyncio.gather(*(worker() for _ in range(concurrency)))


def drained(url: str, pids: list[int], n: int, timeout: float = 600) -> tuple[float, float]:
    """Once the stand-in (reset before) has seen n distinct postbacks: their rate (first to last arrival) and the
    CPU seconds the processes spent from the first arrival to the last."""
    deadline = time.monotonic() + timeout
    cpu_at_first, got = None, 0
    while time.monotonic() < deadline:
        seen = tally(url)
        got = sum(len(counted) for counted in seen["postbacks"].values())
        if got and cpu_at_first is None:
            cpu_at_first = sum(map(cpu_seconds, pids))
        if got >= n:
            return n / (seen["last"] - seen["first"]), sum(map(cpu_seconds, pids)) - (cpu_at_first or 0.0)
        time.sleep(0.1)
    raise SystemExit(f"only {got} of {n} postbacks arrived")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--vendors", choices=["segmentstream", "all"], default="segmentstream")
    parser.add_argument("--processes", type=int, default=1,
                        help="delivery processes draining the queue together, as serve runs them (default 1)")
    parser.add_argument("--client", choices=["builtin", "aiohttp"], default="builtin",
                        help="the HTTP client of `segrelay deliver` (SEGRELAY_HTTP_CLIENT)")
    parser.add_argument("--store", choices=["sqlite", "redis"], default="sqlite",
                        help="where the events are queued (redis: a private redis-server, AOF always)")
    parser.add_argument("--no-references", action="store_true",
                        help="skip the raw clients: only `segrelay deliver`")
    parser.add_argument("--stages", action="store_true",
                        help="the delivery processes' CPU per event by step (bench/staged_deliver.py)")
    args = parser.parse_args()
    settings = SETTINGS[args.vendors]
    with tempfile.TemporaryDirectory() as raw_tmp:
        tmp = Path(raw_tmp)
        vendor, url = standin(tmp)
        redis = RedisServer(tmp) if args.store == "redis" else None
        try:
            bodies = events(args.n)
            items = requests(bodies, url, settings)
            results, cpu_per_request = {}, {}
            for name, client in () if args.no_references else (
                    ("raw segrelay client", raw_builtin), ("raw aiohttp", raw_aiohttp), ("raw httpx", raw_httpx)):
                before = tally(url)["requests"]
                started, cpu_started = time.monotonic(), time.process_time()
                asyncio.run(client(items, args.concurrency))
                results[name] = len(items) / (time.monotonic() - started)
                cpu_per_request[name] = (time.process_time() - cpu_started) / len(items) * 1e6
                assert tally(url)["requests"] - before == len(items)
            location = redis.url if redis else str(tmp / "store.db")
            asyncio.run(queue(location, bodies, settings))
            httpx.post(url + "/_reset", timeout=10).raise_for_status()
            env = {**os.environ, "SEGRELAY_STORE": location if redis else f"sqlite:///{location}",
                   "SEGRELAY_SECRET": SECRET, "SEGRELAY_LOG_LEVEL": "warning",
                   "SEGRELAY_VENDOR_CONCURRENCY": str(args.concurrency), "SEGRELAY_HTTP_CLIENT": args.client,
                   **{f"SEGRELAY_{v.upper()}_URL": url for v in ("segmentstream", "tracify", "audiohook")}}
            # One process, or several as serve runs them, each with its slot at SQLite's write lock (app/supervisor.py).
            slots = [["--slot", str(PRIORITY_SLOTS + i)]
                     for i in range(args.processes)] if args.processes > 1 and not redis else [[]] * args.processes
            if redis:
                redis_client.Redis.from_url(redis.url).config_resetstat()
            redis_cpu = cpu_seconds(redis.proc.pid) if redis else 0.0
            command = [sys.executable, str(ROOT / "bench/staged_deliver.py")] if args.stages else [
                sys.executable, "-m", "app"]
            if args.stages:
                env["STAGED_DELIVER_FILE"] = str(tmp / "stages")
            procs = [subprocess.Popen([*command, "deliver", *extra], env=env, cwd=tmp) for extra in slots]
            try:
                rate, cpu = drained(url, [proc.pid for proc in procs], len(items))
                results[f"segrelay deliver ({args.client})"] = rate
            finally:
                for proc in procs:
                    proc.terminate()
                for proc in procs:
                    proc.wait(30)
            if redis:
                redis_cpu = cpu_seconds(redis.proc.pid) - redis_cpu
                commands = command_counts(redis)
            stages = [orjson.loads(path.read_bytes()) for path in tmp.glob("stages.*")]
        finally:
            vendor.terminate()
            if redis:
                redis.stop()
    per_event = len(items) // args.n
    print(f"\nDelivery of {args.n} events ({per_event} postback{'s' if per_event > 1 else ''} each, "
          f"{args.vendors}) from {args.store} to the stand-in, concurrency {args.concurrency}, "
          f"{args.processes} process{'es' if args.processes > 1 else ''}")
    for name, value in results.items():
        cpu_note = f"  {cpu_per_request[name]:.0f} µs of CPU per request" if name in cpu_per_request else ""
        print(f"{name:<34}{value:>10.0f} postbacks/s{cpu_note}")
    print(f"segrelay deliver: {rate / per_event:.0f} events/s, {cpu / args.n * 1e6:.0f} µs of its CPU per event")
    if redis:
        total = sum(commands.values())
        shown = ", ".join(f"{name} {count / args.n:.1f}" for name, count in commands.most_common(12))
        print(f"redis-server: {redis_cpu / args.n * 1e6:.0f} µs of its CPU per event (from the first delivery's "
              f"start to the last), {total / args.n:.1f} commands per event: {shown}")
    if args.stages:
        print_stages(stages, args.n, args.store)
    if not args.no_references:
        ours = results[f"segrelay deliver ({args.client})"]
        print(f"ratio segrelay deliver / raw segrelay client: {ours / results['raw segrelay client']:.2f}; "
              f"/ raw aiohttp: {ours / results['raw aiohttp']:.2f}; / raw httpx: {ours / results['raw httpx']:.2f}")


def print_stages(stages: list[dict[str, Any]], n: int, store: str) -> None:
    """The delivery processes' CPU per event by step, summed over the processes (bench/staged_deliver.py). On Redis
    the store's calls are not timed apart: they are in the rest."""
    cpu = sum(stage["cpu"] for stage in stages)
    if not cpu:
        print("where delivery's CPU went: no delivery process wrote its figures (bench/staged_deliver.py)")
        return
    spent: Counter[str] = Counter()
    for stage in stages:
        spent.update(stage["spent"])
    sql = staged_deliver.by_statement(spent)
    parts = [("rendering", spent["render"]), *([("SQLite", sum(sql.values()))] if store == "sqlite" else []),
             ("the rest", cpu - spent["render"] - sum(sql.values()))]
    print(f"where delivery's CPU went (thread CPU clock, first job rendered to last): {cpu / n * 1e6:.0f} µs per event;"
          + "".join(f" {name} {seconds / n * 1e6:.0f} µs ({seconds / cpu:.0%})" + (";" if name != "the rest" else "")
                    for name, seconds in parts))
    if store != "sqlite":
        return
    top = sorted(sql.items(), key=lambda item: -item[1])[:8]
    print("  SQLite by statement, per event: " + ", ".join(f"{name} {seconds / n * 1e6:.0f} µs"
                                                          for name, seconds in top))


def command_counts(redis: RedisServer) -> Counter[str]:
    """The private redis-server's `INFO commandstats` as calls per command (script calls and the commands they ran,
    both counted), parsed by redis-py."""
    stats = redis_client.Redis.from_url(redis.url).info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(fields["calls"]) for name, fields in stats.items()})


if __name__ == "__main__":
    main()
