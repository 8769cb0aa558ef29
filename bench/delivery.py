"""Delivery benchmark: postbacks/s from the queue to a local vendor stand-in, vs a raw httpx client.

N SegmentStream postbacks are queued in a fresh SQLite store, then `segrelay serve` starts and delivers them
to the stub; the rate is taken from the stub's own arrival times (first to last request). The reference is a
raw httpx.AsyncClient posting the same rendered requests to the same stub with the same concurrency.

    python bench/delivery.py [--n 3000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
from common import ROOT, SECRET, VendorStub, free_port, start, stop

from app.crypto import Sealer
from app.event import parse_event
from app.outgoing import pack, render
from app.settings import resolve
from app.store import NewJob
from app.store.sqlite import SQLiteStore
from app.translate import active_vendors, translate
from handlers import BY_SLUG

SETTINGS = resolve({"segmentstreamApiToken": "ss-token"})


def postbacks(n: int) -> list:  # type: ignore[type-arg]
    raw = orjson.loads((ROOT / "tests/fixtures/segment/order_completed.json").read_bytes())
    out = []
    for _ in range(n):
        raw["messageId"] = f"bench-{uuid.uuid4()}"
        event = parse_event(raw, b"", datetime.now(UTC))
        out += translate(event, SETTINGS, active_vendors(SETTINGS)).postbacks
    return out


def wait_for(stub: VendorStub, n: int, timeout: float = 300) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        summary = httpx.get(stub.url + "/_stub/count").json()
        if summary["count"] >= n:
            return summary  # type: ignore[no-any-return]
        time.sleep(0.2)
    raise SystemExit(f"only {summary['count']} of {n} arrived")


def rate(summary: dict[str, float]) -> float:
    return (summary["count"] - 1) / (summary["last"] - summary["first"])


async def queue(path: Path, items: list) -> None:  # type: ignore[type-arg]
    store, sealer = SQLiteStore(str(path)), Sealer(SECRET.encode())
    now = time.time()
    for p in items:
        job = NewJob(p.vendor, "bench", str(uuid.uuid4()), "Order Completed", p.batch_key, sealer.seal(pack(p)))
        await store.accept("bench", job.message_id, [job], now=now, ttl=3600)
    await store.close()


async def raw_client(stub: VendorStub, items: list, concurrency: int) -> None:  # type: ignore[type-arg]
    requests = [render(BY_SLUG[p.vendor], [p], stub.url + "/segmentstream") for p in items]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(15, connect=5)) as client:
        pending = iter(requests)

        async def worker() -> None:
            for request in pending:
                response = await client.request(request.method, request.url, headers=request.headers,
                                                content=request.content)
                assert response.status_code == 204

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as raw_tmp:
        tmp = Path(raw_tmp)
        stub = VendorStub(tmp)
        try:
            items = postbacks(args.n)
            asyncio.run(raw_client(stub, items[:200], args.concurrency))  # warm-up
            stub.reset()
            asyncio.run(raw_client(stub, items, args.concurrency))
            reference = rate(wait_for(stub, args.n))
            stub.reset()
            asyncio.run(queue(tmp / "store.db", items))
            port = free_port()
            env = {"SEGRELAY_STORE": f"sqlite:///{tmp / 'store.db'}", "SEGRELAY_SECRET": SECRET,
                   "SEGRELAY_LOG_LEVEL": "warning", "SEGRELAY_VENDOR_CONCURRENCY": str(args.concurrency),
                   "SEGRELAY_TENANT_CONCURRENCY": str(args.concurrency), **stub.env()}
            proc = start([sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port)], env,
                         f"http://127.0.0.1:{port}/healthz", tmp / "segrelay.log")
            try:
                ours = rate(wait_for(stub, args.n))
            finally:
                stop(proc)
        finally:
            stub.stop()
    print(f"\nDelivery of {args.n} SegmentStream postbacks to a local stub, concurrency {args.concurrency}")
    print(f"{'raw httpx.AsyncClient':<28}{reference:>10.0f} postbacks/s")
    print(f"{'segrelay (SQLite queue)':<28}{ours:>10.0f} postbacks/s")
    print(f"ratio segrelay / raw httpx: {ours / reference:.2f}")


if __name__ == "__main__":
    main()
