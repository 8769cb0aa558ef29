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
from app.translate import active_vendors, route, translate
from handlers import BY_SLUG, Postback, Skip
from tests.support import ALL_VENDORS

NOW = datetime(2026, 11, 23, tzinfo=UTC)
URLS = vendor_urls({})
# What a sloppy customer or an attacker sends: huge and tiny magnitudes, exponents, numeric strings, dates at every
# edge, unicode edges, header-breaking characters, long strings.
EDGES = ["12.50", "1e3", "-4", "USD", "https://x.example/p?a=1&b=%20", "1e300000", "1e999999999", "-1e999999",
         "1e-999999999", "0." + "0" * 40 + "1", "1" * 400, "NaN", "Infinity", "-0", "0x10", "1_000", " 7 ",
         "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "2026-02-30T00:00:00Z", "1700000000",
         "1700000000123", "99999999999999999999", "x.example", "//x.example/p", "http://", "\u202e\u0000\r\n",
         "\ud7ff\ue000\uffff\U0010ffff", "e\u0301", "A" * 3000, "tok\r\nX-Evil: 1", "é@ß.example"]
scalars = (st.none() | st.booleans() | st.integers() | st.integers(-(2**80), 2**80)
           | st.floats(allow_nan=False, allow_infinity=False) | st.floats(min_value=1e15, allow_infinity=False)
           | st.floats(max_value=1e-300, min_value=-1e-300) | st.text(max_size=20) | st.sampled_from(EDGES))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
PROPERTY_KEYS = ["order_id", "OrderId", "total", "revenue", "shipping", "tax", "value", "currency", "products",
                 "price", "quantity", "url", "email", "coupon", "discount", "conversion_id", "label"]
product_lists = st.lists(st.dictionaries(
    st.sampled_from(["product_id", "sku", "id", "name", "price", "quantity", "category", "brand"]), values),
    max_size=3) | st.sampled_from([[{}] * 3000, [{"price": "1e999999", "quantity": "1e300000"}] * 300,
                                   [{"price": 2**70, "quantity": 1e20}]])
properties = st.dictionaries(st.sampled_from(PROPERTY_KEYS), values | product_lists, max_size=8)
deep: Any = []
for _ in range(60):
    deep = [deep, {"k": deep}] if len(str(deep)) < 2000 else [deep]
contexts = st.fixed_dictionaries({}, optional={"ip": values, "userAgent": values, "page": st.dictionaries(
    st.sampled_from(["url", "referrer", "search"]), values), "campaign": st.dictionaries(
    st.sampled_from(["name", "source", "medium"]), values), "traits": st.dictionaries(st.just("email"), values)})
events = st.fixed_dictionaries(
    {"type": st.sampled_from(["track", "page", "identify", "group"])},
    optional={"event": st.sampled_from(["Order Completed", "Completed Order", "Product Viewed", "Product Added",
                                        "Checkout Started", "Order Refunded", "Subscription Created"]) | values,
              "userId": values, "anonymousId": values, "messageId": values,
              "timestamp": values | st.sampled_from([-1, 0, 1e11, 1e20, 2**70]), "originalTimestamp": values,
              "traits": st.dictionaries(st.sampled_from(["email", "name", "phone"]), values),
              "integrations": st.just(deep) | values,
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
        raw = orjson.loads(body)  # what the server sees: orjson reads 2**70 as a float, refuses lone surrogates
    except orjson.JSONDecodeError:
        return
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
    # The accept path routes without building bodies: it must promise exactly what delivery will build.
    routing = route(event, config, active_vendors(config))
    promised = sorted((t.vendor, t.target) for t in routing.targets)
    built = sorted((p.vendor, p.target) for p in translation.postbacks)
    too_large = sorted(("segmentstream", "track") for s in translation.skips if s.code == "too_large")
    assert promised == sorted(built + too_large)
    assert sorted(s.reason for s in routing.skips) == sorted(s.reason for s in translation.skips
                                                             if s.code != "too_large")

