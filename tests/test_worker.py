"""The delivery worker in process, with httpx.MockTransport standing in for the vendors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import orjson
import pytest

from app.config import Config
from app.crypto import Sealer
from app.delivery.worker import Deliverer
from app.outgoing import pack
from app.store import NewJob
from app.store.sqlite import SQLiteStore
from handlers import Postback
from handlers._base import HeaderAuth

SECRET = b"s" * 40


def tracify_job(n: int, sealer: Sealer, tenant: str = "acme") -> NewJob:
    postback = Postback("tracify", "events", "/api/v1/events", {"n": n}, auth=HeaderAuth("tracify-token", "t"),
                        batch_key="site-1")
    return NewJob("tracify", tenant, f"m{n}", "Order Completed", "site-1", sealer.seal(pack(postback)))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    opened = SQLiteStore(str(tmp_path / "store.db"))
    yield opened
    await opened.close()


async def run_until(deliverer: Deliverer, check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deliverer.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not await check():
        await asyncio.sleep(0.02)
    await deliverer.stop(drain_seconds=1)


def config(retry_base_seconds: float = 2.0) -> Config:
    return Config(secret=SECRET, retry_base_seconds=retry_base_seconds,
                  vendor_urls={"segmentstream": "http://ss", "tracify": "http://tr", "audiohook": "http://ah"})


async def test_tracify_jobs_due_together_go_in_one_request(store: SQLiteStore) -> None:
    sealer, seen = Sealer(SECRET), []

    def vendor(request: httpx.Request) -> httpx.Response:
        seen.append(orjson.loads(request.content))
        assert request.headers["tracify-token"] == "t" and request.url == "http://tr/api/v1/events"
        return httpx.Response(200, json={"status": True})

    for n in range(3):
        await store.accept("acme", f"m{n}", [tracify_job(n, sealer)], now=time.time(), ttl=60)
    deliverer = Deliverer(config(), store, sealer, transport=httpx.MockTransport(vendor))

    async def done() -> bool:
        return await store.depth() == 0
    await run_until(deliverer, done)
    assert seen == [{"events": [{"n": 0}, {"n": 1}, {"n": 2}]}]


async def test_retry_after_pauses_the_vendor_and_delays_the_job(store: SQLiteStore) -> None:
    sealer = Sealer(SECRET)
    await store.accept("acme", "m0", [tracify_job(0, sealer)], now=time.time(), ttl=60)
    deliverer = Deliverer(config(), store, sealer, transport=httpx.MockTransport(
        lambda request: httpx.Response(429, headers={"Retry-After": "30"})))

    async def retried() -> bool:
        return (await store.stats(now=time.time())).vendors["tracify"].pending == 1
    started = time.time()
    await run_until(deliverer, retried)
    assert deliverer.paused_until["tracify"] >= started + 30
    assert await store.lease("tracify", now=started + 29, limit=5, lease_seconds=60) == []
    (job,) = await store.lease("tracify", now=started + 31, limit=5, lease_seconds=60)
    assert job.attempts == 1


async def test_a_payload_sealed_under_another_secret_is_dead_lettered_not_dropped(store: SQLiteStore) -> None:
    await store.accept("acme", "m0", [tracify_job(0, Sealer(b"o" * 40))], now=time.time(), ttl=60)
    deliverer = Deliverer(config(), store, Sealer(SECRET), transport=httpx.MockTransport(
        lambda request: httpx.Response(200, json={"status": True})))

    async def buried() -> bool:
        return len(await store.dead_letters()) == 1
    await run_until(deliverer, buried)
    (letter,) = await store.dead_letters()
    assert "cannot be decrypted" in letter.last_body and letter.last_status is None


async def test_connection_errors_open_the_circuit(store: SQLiteStore) -> None:
    sealer = Sealer(SECRET)
    for n in range(6):
        await store.accept("acme", f"m{n}", [tracify_job(n, sealer, tenant=f"t{n}")], now=time.time(), ttl=60)

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    deliverer = Deliverer(config(retry_base_seconds=0.01), store, sealer, transport=httpx.MockTransport(refuse))

    async def opened() -> bool:
        return deliverer.breakers["tracify"].is_open(time.time())
    await run_until(deliverer, opened)
    assert deliverer.breakers["tracify"].is_open(time.time())
    assert await store.dead_letters() == []  # connection errors are retried
