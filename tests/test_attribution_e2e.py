"""Identity stitching end to end: a browser page view, an identify, a restart, then a server-side purchase.

The real server under uvicorn on SQLite and on a real Redis, the vendor stub standing in for all three vendors:
the purchase, which carries only a userId, reaches Tracify with identity classes 1, 3 and 4 from the remembered
browser context, Audiohook with the browser's ip and user agent, SegmentStream with the email hash; the same
purchase under another tenant's key stitches nothing; `segrelay identities forget` makes it stitch nothing either.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from typing import Any

import pytest
import redis

from handlers.tracify import calc_group
from tests.support import ALL_VENDORS, RedisServer, Segrelay, VendorStub, wait_until

IP, UA = "203.0.113.7", "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_0) AppleWebKit/605.1.15"
EMAIL = "Jane.Doe@Example.com"
PAGE_URL = "https://shop.example/checkout?utm_source=newsletter&utm_medium=email"


def browser_page(anonymous_id: str) -> dict[str, Any]:
    return {"type": "page", "messageId": f"page-{uuid.uuid4()}", "anonymousId": anonymous_id,
            "timestamp": "2026-11-23T10:00:00.000Z", "properties": {"title": "Checkout"},
            "context": {"ip": IP, "userAgent": UA, "library": {"name": "analytics.js", "version": "2.11.1"},
                        "page": {"url": PAGE_URL, "referrer": "https://news.example/"}}}


def identify(anonymous_id: str, user_id: str) -> dict[str, Any]:
    return {"type": "identify", "messageId": f"identify-{uuid.uuid4()}", "anonymousId": anonymous_id,
            "userId": user_id, "traits": {"email": EMAIL, "name": "Jane Doe"},
            "timestamp": "2026-11-23T10:01:00.000Z", "context": {"ip": IP, "userAgent": UA}}


def server_purchase(user_id: str) -> dict[str, Any]:
    """As analytics-python sends it from a backend: no ip, no user agent, no page."""
    return {"type": "track", "event": "Order Completed", "messageId": f"order-{uuid.uuid4()}", "userId": user_id,
            "timestamp": "2026-11-23T10:05:00.000Z",
            "context": {"library": {"name": "analytics-python", "version": "2.3.2"}},
            "properties": {"order_id": f"o-{uuid.uuid4().hex[:8]}", "total": 129.9, "currency": "EUR",
                           "products": [{"product_id": "p-1", "name": "Kettle", "price": 129.9, "quantity": 1}]}}


def bodies(stub: VendorStub, prefix: str, order_id: str) -> list[dict[str, Any]]:
    found = []
    for request in stub.requests(prefix):
        body = json.loads(request["body"])
        for item in body.get("events", [body]):
            if order_id in json.dumps(item):
                found.append(item)
    return found


def delivered(stub: VendorStub, order_id: str) -> dict[str, dict[str, Any]]:
    """The purchase as each vendor received it, once all three have it."""
    got: dict[str, dict[str, Any]] = {}

    def arrived() -> bool:
        for vendor, prefix in (("segmentstream", "/segmentstream/track"), ("tracify", "/tracify/"),
                               ("audiohook", "/audiohook/")):
            found = bodies(stub, prefix, order_id)
            if found:
                got[vendor] = found[0]
        return len(got) == 3
    assert wait_until(arrived, 20), f"only {sorted(got)} received the purchase"
    return got


@pytest.fixture(params=["sqlite", "redis"])
def store_env(request: pytest.FixtureRequest) -> dict[str, str]:
    if request.param == "sqlite":
        return {}
    server: RedisServer = request.getfixturevalue("redis_server")
    url = f"redis://127.0.0.1:{server.port}/9"
    redis.Redis.from_url(url).flushdb()
    return {"SEGRELAY_STORE": url}


def test_server_side_purchase_reaches_every_vendor_with_the_browser_identity(
        fresh_stub: VendorStub, make_server: type[Segrelay], store_env: dict[str, str]) -> None:
    service = make_server({**store_env, "SEGRELAY_IDENTITY_CACHE_SECONDS": "0.5"}).start()
    anonymous_id, user_id = f"anon-{uuid.uuid4()}", f"user-{uuid.uuid4()}"
    assert service.post(browser_page(anonymous_id), ALL_VENDORS).status_code == 202
    linked = service.post(identify(anonymous_id, user_id), ALL_VENDORS)
    assert linked.status_code == 200, linked.text  # no vendor takes an identify; it still links the ids

    assert service.terminate() == 0  # what was remembered survives a restart
    service.start()

    order = server_purchase(user_id)
    answer = service.post(order, ALL_VENDORS)
    assert answer.status_code == 202, answer.text
    assert set(answer.json()["stitched"]) >= {"context.ip", "context.userAgent", "context.page.url", "email",
                                              "anonymousId"}
    assert all(row["status"] == "queued" for row in answer.json()["postbacks"]), answer.json()
    got = delivered(fresh_stub, order["properties"]["order_id"])

    identities = got["tracify"]["identity_data"]
    assert identities[calc_group(EMAIL.lower())] == 1
    assert identities[calc_group(IP)] == 3 and identities[calc_group(UA)] == 4
    assert got["tracify"]["type"] == "purchase" and got["tracify"]["url"] == "https://shop.example/checkout"
    assert (got["audiohook"]["ip_address"], got["audiohook"]["user_agent"]) == (IP, UA)
    assert got["audiohook"]["visitor_id"] == anonymous_id  # the visitor the browser pixel saw
    assert got["audiohook"]["utm_source"] == "newsletter"
    assert got["segmentstream"]["event"]["user"]["emailHash"] == hashlib.sha256(EMAIL.encode()).hexdigest()
    assert got["segmentstream"]["context"]["ip"] == IP
    sent = json.dumps(got)
    assert EMAIL not in sent and EMAIL.lower() not in sent and "Jane Doe" not in sent

    # Another tenant's key, the same userId: nothing is shared across tenants.
    other_key = service.create_key(tenant="other-shop")
    elsewhere = service.post(server_purchase(user_id), ALL_VENDORS, key=other_key)
    assert elsewhere.status_code == 202
    assert "stitched" not in elsewhere.json()
    reasons = {row["vendor"]: row.get("reason", "") for row in elsewhere.json()["postbacks"]
               if row["status"] == "skipped"}
    assert "no page url" in reasons["tracify"] and "no ip and user agent" in reasons["audiohook"]

    # Turned off for a destination: nothing stitched.
    off = service.post(server_purchase(user_id), {**ALL_VENDORS, "identityStitching": False})
    assert off.status_code == 202 and "stitched" not in off.json()

    # Forgotten on request: the user and the anonymous id linked to it.
    forgotten = service.cli("identities", "forget", "--tenant", "acme", "--user-id", user_id)
    assert "forgot 2 remembered identities" in forgotten.stdout
    time.sleep(0.6)  # SEGRELAY_IDENTITY_CACHE_SECONDS: how long a running server trusts what it read
    after = service.post(server_purchase(user_id), ALL_VENDORS)
    assert after.status_code == 202 and "stitched" not in after.json()
    service.stop()


def test_dry_run_names_the_stitched_fields_and_remembers_nothing(
        fresh_stub: VendorStub, make_server: type[Segrelay]) -> None:
    service = make_server().start()
    anonymous_id, user_id = f"anon-{uuid.uuid4()}", f"user-{uuid.uuid4()}"
    dry = {**ALL_VENDORS, "dryRun": True}
    # A dry run of the browser events remembers nothing...
    assert service.post(browser_page(anonymous_id), dry).status_code == 200
    assert service.post(identify(anonymous_id, user_id), dry).status_code == 200
    answer = service.post(server_purchase(user_id), dry).json()
    assert "stitched" not in answer
    # ...while real ones do, and a dry run then shows what a purchase would get.
    service.post(browser_page(anonymous_id), ALL_VENDORS)
    service.post(identify(anonymous_id, user_id), ALL_VENDORS)
    answer = service.post(server_purchase(user_id), dry).json()
    assert "context.ip" in answer["stitched"]
    audiohook = next(p for p in answer["wouldSend"] if p["vendor"] == "audiohook")
    assert audiohook["body"]["ip_address"] == IP
    service.stop()
