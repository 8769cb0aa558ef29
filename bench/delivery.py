"""Delivery benchmark: postbacks/s from a full queue to the vendor stand-in, vs raw aiohttp and raw httpx.

N Order Completed events are queued for SegmentStream's postback API (one postback each) in a fresh SQLite store,
exactly as the accept path stores them; then `segrelay deliver` alone drains them to the raw-asyncio stand-in
(bench/standin.py). The references post the same rendered requests to the same stand-in with the same concurrency
from one process: a raw aiohttp.ClientSession and a raw httpx.AsyncClient. Rates are the stand-in's own arrival
times (first to last request).

    python bench/delivery.py [--n 5000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import httpx
import orjson
from common import ROOT, SECRET
from e2e import standin, tally

from app.crypto import Sealer
from app.event import parse_event
from app.outgoing import OutgoingRequest, render
from app.settings import resolve
from app.store import NewJob
from app.store.sqlite import SQLiteStore
from app.stored import pack_event
from app.translate import active_vendors, translate
from handlers import BY_SLUG

SETTINGS = resolve({"segmentstreamApiToken": "ss-token"})


def events(n: int) -> list[bytes]:
    raw = orjson.loads((ROOT / "tests/fixtures/segment/order_completed.json").read_bytes())
    out = []
    for i in range(n):
        raw["messageId"] = raw["properties"]["order_id"] = f"bench-1-{i}"
        out.append(orjson.dumps(raw))
    return out


def requests(bodies: list[bytes], url: str) -> list[OutgoingRequest]:
    out = []
    for body in bodies:
        event = parse_event(orjson.loads(body), body, datetime.now(UTC))
        for postback in translate(event, SETTINGS, active_vendors(SETTINGS)).postbacks:
            out.append(render(BY_SLUG[postback.vendor], [postback], url))
    return out


async def queue(path: Path, bodies: list[bytes]) -> None:
    store, sealer = SQLiteStore(str(path)), Sealer(SECRET.encode())
    now = time.time()
    settings = orjson.dumps(dict(SETTINGS))
    for start in range(0, len(bodies), 500):
        await asyncio.gather(*(store.accept("bench", f"m{start + i}", sealer.seal(pack_event(settings, now, body)),
                                            [NewJob("segmentstream", "track", "Order Completed", "")], now=now,
                                            ttl=3600) for i, body in enumerate(bodies[start:start + 500])))
    await store.close()


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


def rate_since(url: str, before: int, n: int, timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    first = None
    while time.monotonic() < deadline:
        seen = tally(url)
        if seen["requests"] > before and first is None:
            first = seen["last"]
        if seen["requests"] >= before + n:
            return n / (seen["last"] - (first or seen["first"]))
        time.sleep(0.1)
    raise SystemExit(f"only {tally(url)['requests'] - before} of {n} arrived")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as raw_tmp:
        tmp = Path(raw_tmp)
        vendor, url = standin(tmp)
        try:
            bodies = events(args.n)
            items = requests(bodies, url)
            results = {}
            for name, client in (("raw aiohttp", raw_aiohttp), ("raw httpx", raw_httpx)):
                before = tally(url)["requests"]
                started = time.monotonic()
                asyncio.run(client(items, args.concurrency))
                results[name] = args.n / (time.monotonic() - started)
                assert tally(url)["requests"] - before == args.n
            asyncio.run(queue(tmp / "store.db", bodies))
            before = tally(url)["requests"]
            env = {**os.environ, "SEGRELAY_STORE": f"sqlite:///{tmp / 'store.db'}", "SEGRELAY_SECRET": SECRET,
                   "SEGRELAY_LOG_LEVEL": "warning", "SEGRELAY_VENDOR_CONCURRENCY": str(args.concurrency),
                   "SEGRELAY_SEGMENTSTREAM_URL": url}
            proc = subprocess.Popen([sys.executable, "-m", "app", "deliver"], env=env, cwd=tmp)
            try:
                results["segrelay deliver (SQLite queue)"] = rate_since(url, before, args.n)
            finally:
                proc.terminate()
                proc.wait(30)
        finally:
            vendor.terminate()
    print(f"\nDelivery of {args.n} SegmentStream postbacks to the stand-in, concurrency {args.concurrency}")
    for name, value in results.items():
        print(f"{name:<34}{value:>10.0f} postbacks/s")
    ours = results["segrelay deliver (SQLite queue)"]
    print(f"ratio segrelay / raw aiohttp: {ours / results['raw aiohttp']:.2f}; "
          f"segrelay / raw httpx: {ours / results['raw httpx']:.2f}")


if __name__ == "__main__":
    main()
