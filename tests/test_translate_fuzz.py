"""Property-based, in process: any event and settings either get a ContractError or translate cleanly."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from app.config import vendor_urls
from app.errors import ContractError
from app.event import parse_event
from app.outgoing import render
from app.settings import resolve
from app.translate import active_vendors, translate
from handlers import BY_SLUG, Postback, Skip
from tests.support import ALL_VENDORS

NOW = datetime(2026, 11, 23, tzinfo=UTC)
URLS = vendor_urls({})
scalars = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
           | st.text(max_size=20) | st.sampled_from(["12.50", "1e3", "-4", "USD", "https://x.example/p?a=1&b=%20"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
PROPERTY_KEYS = ["order_id", "OrderId", "total", "revenue", "shipping", "tax", "value", "currency", "products",
                 "price", "quantity", "url", "email", "coupon", "discount", "conversion_id", "label"]
properties = st.dictionaries(st.sampled_from(PROPERTY_KEYS), values | st.lists(st.dictionaries(
    st.sampled_from(["product_id", "sku", "id", "name", "price", "quantity", "category", "brand"]), values),
    max_size=3), max_size=8)
contexts = st.fixed_dictionaries({}, optional={"ip": values, "userAgent": values, "page": st.dictionaries(
    st.sampled_from(["url", "referrer", "search"]), values), "campaign": st.dictionaries(
    st.sampled_from(["name", "source", "medium"]), values), "traits": st.dictionaries(st.just("email"), values)})
events = st.fixed_dictionaries(
    {"type": st.sampled_from(["track", "page", "identify", "group"])},
    optional={"event": st.sampled_from(["Order Completed", "Completed Order", "Product Viewed", "Product Added",
                                        "Checkout Started", "Order Refunded", "Subscription Created"]) | values,
              "userId": values, "anonymousId": values, "messageId": values, "timestamp": values,
              "properties": properties | values, "context": contexts | values, "groupId": values},
)


@settings(max_examples=400, deadline=None)
@given(raw=events, dry=st.booleans(), comma=st.booleans())
def test_any_event_is_rejected_with_a_reason_or_translated_into_valid_requests(raw: dict[str, Any], dry: bool,
                                                                              comma: bool) -> None:
    config = resolve({**ALL_VENDORS, "tracifyDecimalComma": comma, "audiohookMissingIp": "fallback",
                      "audiohookEvents": ["Subscription Created"], "dryRun": dry})
    body = json.dumps(raw).encode()
    try:
        event = parse_event(raw, body, NOW)
    except ContractError as exc:
        rejection = exc
    else:
        rejection = None
    if rejection is not None:
        assert rejection.status_code in (400, 501) and rejection.message
        return
    translation = translate(event, config, active_vendors(config))
    assert {p.vendor for p in translation.postbacks} | {s.vendor for s in translation.skips} <= set(BY_SLUG)
    for skip in translation.skips:
        assert isinstance(skip, Skip) and skip.reason
    for postback in translation.postbacks:
        assert isinstance(postback, Postback)
        request = render(BY_SLUG[postback.vendor], [postback], URLS[postback.vendor])
        assert request.url.startswith(URLS[postback.vendor] + "/")
        if postback.vendor == "segmentstream" and postback.target == "track":
            assert len(orjson.dumps(postback.body)) <= 64 * 1024
            assert uuid.UUID(postback.body["hitId"]).version == 1

