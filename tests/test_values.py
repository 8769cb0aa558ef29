"""Values that must reach the vendors (issue "Attribution fidelity"): one test per rule, on events written here."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from app.errors import BadRequestError
from app.event import Event, absolute_url, parse_event
from app.settings import resolve
from handlers import Postback, Skip, audiohook, segmentstream, tracify
from tests.support import ALL_VENDORS

NOW = datetime(2026, 11, 23, 12, tzinfo=UTC)
SETTINGS = resolve(ALL_VENDORS)
BROWSER = {"ip": "198.51.100.4", "userAgent": "Mozilla/5.0", "page": {"url": "https://shop.example/p/1"}}


def event(raw: dict[str, Any], default_currency: str | None = None) -> Event:
    return parse_event({"messageId": "m-1", **raw}, orjson.dumps(raw), NOW, default_currency)


def postbacks(outcomes: list[Any]) -> list[Postback]:
    return [o for o in outcomes if isinstance(o, Postback)]


def skips(outcomes: list[Any]) -> list[str]:
    return [o.reason for o in outcomes if isinstance(o, Skip)]


def track(name: str, properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "track", "event": name, "anonymousId": "a-1", "context": BROWSER, "properties": properties,
            **extra}


# Audiohook: every routed event keeps its value, currency, order id, products and campaign ----------------------


@pytest.mark.parametrize(("name", "audiohook_name"), [("Checkout Started", "checkout_started"),
                                                       ("Product Viewed", "product_viewed"),
                                                       ("Product Added", "add_to_cart")])
def test_audiohook_non_purchase_events_keep_value_currency_order_and_products(name: str, audiohook_name: str) -> None:
    if name == "Checkout Started":
        props: dict[str, Any] = {"order_id": "c-9", "value": 42.5, "currency": "eur",
                                 "products": [{"product_id": "p-1", "name": "Mug", "price": 21.25, "quantity": 2}]}
    else:
        props = {"product_id": "p-1", "name": "Mug", "price": 21.25, "quantity": 2, "currency": "EUR"}
    (postback,) = postbacks(audiohook.build(event(track(name, props)), SETTINGS))
    body = postback.body
    assert body["event_name"] == audiohook_name
    assert (body["value"], body["currency"]) == (42.5, "EUR")
    assert body["items"] == [{"product_id": "p-1", "product_name": "Mug", "price": 21.25, "quantity": 2}]
    if name == "Checkout Started":
        assert body["order_id"] == "c-9"


def test_audiohook_campaign_from_context_campaign_when_the_url_has_none() -> None:
    raw = track("Product Viewed", {"product_id": "p"},
                context={**BROWSER, "campaign": {"source": "fb", "medium": "cpc", "name": "spring", "term": "mugs",
                                                 "content": "a"}})
    body = postbacks(audiohook.build(event(raw), SETTINGS))[0].body
    assert [body[k] for k in ("utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content")] == [
        "fb", "cpc", "spring", "mugs", "a"]
    in_url = {**BROWSER, "page": {"url": "https://shop.example/?utm_source=google"}, "campaign": {"source": "fb"}}
    body = postbacks(audiohook.build(event(track("Product Viewed", {}, context=in_url)), SETTINGS))[0].body
    assert body["utm_source"] == "google"  # the url's own value is never overwritten


def test_audiohook_sends_no_amount_without_a_currency() -> None:
    body = postbacks(audiohook.build(event(track("Product Viewed", {"price": 5})), SETTINGS))[0].body
    assert "value" not in body and "currency" not in body


# Order ids ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("props", "name", "expected"), [
    ({"order_id": "a"}, "Order Completed", "a"),
    ({"orderId": "b"}, "Order Completed", "b"),
    ({"order_number": "c"}, "Order Completed", "c"),
    ({"orderNumber": 1001}, "Order Completed", "1001"),
    ({"checkout_id": "d"}, "Checkout Started", "d"),
    ({"id": "e"}, "Completed Order", "e"),  # v1: `id` is the order's on order events
    ({"id": "f"}, "Order Refunded", "f"),
    ({"order_id": "g", "id": "h"}, "Order Completed", "g"),
    ({"id": "p-1"}, "Product Viewed", None),  # ...and the product's on product events
    ({"id": "x"}, "Signed Up", None),
])
def test_order_id_aliases(props: dict[str, Any], name: str, expected: str | None) -> None:
    assert event(track(name, props)).order_id == expected


# Email -------------------------------------------------------------------------------------------------------


def test_email_from_top_level_traits_on_a_track_and_from_context_traits() -> None:
    assert event(track("Signed Up", {}, traits={"email": "t@x.co"})).email == "t@x.co"
    assert event(track("Signed Up", {}, context={**BROWSER, "traits": {"email": "c@x.co"}})).email == "c@x.co"


def test_an_email_user_id_is_hashed_never_sent_raw_as_an_id() -> None:
    raw = {"type": "track", "event": "Order Completed", "userId": "Jane@Example.com", "context": BROWSER,
           "properties": {"order_id": "o", "total": 5, "currency": "USD"}}
    outcomes = [*segmentstream.build(event(raw), SETTINGS), *tracify.build(event(raw), SETTINGS),
                *audiohook.build(event(raw), SETTINGS)]
    sent = orjson.dumps([p.body for p in postbacks(outcomes)]).decode()
    assert "Jane@Example.com" not in sent and "jane@example.com" not in sent
    track_body = next(p.body for p in postbacks(outcomes) if p.target == "track")
    exact = hashlib.sha256(b"Jane@Example.com").hexdigest()
    assert track_body["event"]["user"] == {"userId": exact, "emailHash": exact}
    pixel = next(p.body for p in postbacks(outcomes) if p.vendor == "audiohook")
    assert pixel["visitor_id"] == pixel["email"] == hashlib.sha256(b"jane@example.com").hexdigest()


# Page url ----------------------------------------------------------------------------------------------------


def test_page_call_uses_properties_url_when_context_has_none() -> None:
    raw = {"type": "page", "anonymousId": "a", "context": {"ip": "1.1.1.1", "userAgent": "UA"},
           "properties": {"url": "https://shop.example/landing?gclid=g"}}
    assert event(raw).page_url == "https://shop.example/landing?gclid=g"
    body = postbacks(tracify.build(event(raw), SETTINGS))[0].body
    assert body["url"] == "https://shop.example/landing" and body["data"]["gclid"] == "g"


@pytest.mark.parametrize(("url", "expected"), [
    ("https://shop.example/a", "https://shop.example/a"),
    ("shop.example/a?b=1", "https://shop.example/a?b=1"),
    ("//shop.example/a", "https://shop.example/a"),
    ("/relative/path", None),
    ("http://[::1", None),
    ("not a url", None),
])
def test_a_url_without_scheme_gets_https_or_is_not_used(url: str, expected: str | None) -> None:
    assert absolute_url(url)[0] == expected


def test_a_scheme_less_url_never_gives_an_empty_origin() -> None:
    raw = {"type": "page", "anonymousId": "a", "context": {**BROWSER, "page": {"url": "www.shop.example/x"}}}
    parsed = event(raw)
    assert any("https assumed" in w for w in parsed.warnings)
    body = postbacks(tracify.build(parsed, SETTINGS))[0].body
    assert body["data"]["origin"] == "https://www.shop.example"
    relative = event({"type": "page", "anonymousId": "a", "context": {**BROWSER, "page": {"url": "/cart"}}})
    assert "no page url" in skips(tracify.build(relative, SETTINGS))[0]


# Timestamps ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["2026-11-20T10:30:00Z", "2026-11-20T11:30:00+01:00", 1795170600,
                                   1795170600000, "1795170600", "1795170600000"])
def test_timestamps_iso_and_epoch_seconds_or_milliseconds(value: Any) -> None:
    assert event(track("E", {}, timestamp=value)).ts == datetime(2026, 11, 20, 10, 30, tzinfo=UTC)


def test_an_unreadable_timestamp_falls_back_in_order_with_a_warning() -> None:
    parsed = event(track("E", {}, timestamp="yesterday", originalTimestamp="nope",
                         sentAt="2026-11-21T00:00:00Z", receivedAt="2026-11-22T00:00:00Z"))
    assert parsed.ts == datetime(2026, 11, 21, tzinfo=UTC) and len(parsed.warnings) == 2
    assert event(track("E", {}, timestamp="never")).ts == NOW  # nothing readable: now, and never a 400


# Currency ------------------------------------------------------------------------------------------------------


def test_default_currency_is_validated_as_iso_4217() -> None:
    assert resolve({"defaultCurrency": "eur"})["defaultCurrency"] == "EUR"
    with pytest.raises(BadRequestError, match="ISO 4217"):
        resolve({"defaultCurrency": "EURO"})
    with pytest.raises(BadRequestError, match="ISO 4217"):
        resolve({"defaultCurrency": "BTC"})


def test_a_conversion_with_an_amount_and_no_currency_is_skipped_by_every_vendor() -> None:
    raw = track("Order Completed", {"order_id": "o", "total": 10})
    reasons = skips([*segmentstream.build(event(raw), SETTINGS), *tracify.build(event(raw), SETTINGS),
                     *audiohook.build(event(raw), SETTINGS)])
    assert len(reasons) == 4 and all("no currency" in r for r in reasons)  # data stream, track, tracify, audiohook
    with_default = event(raw, default_currency="EUR")
    assert len(postbacks(tracify.build(with_default, SETTINGS))) == 1


def test_an_event_currency_that_is_not_iso_4217_is_a_skip_reason_not_replaced_by_the_default() -> None:
    raw = track("Subscription Created", {"value": 9, "currency": "Dollars"})
    parsed = event(raw, default_currency="EUR")
    assert parsed.currency is None and any("ISO 4217" in w for w in parsed.warnings)
    (reason,) = skips(tracify.build(parsed, SETTINGS))
    assert "'DOLLARS' is not an ISO 4217 code" in reason


def test_a_conversion_without_an_amount_needs_no_currency() -> None:
    raw = track("Subscription Created", {"plan": "pro"})
    assert postbacks(tracify.build(event(raw), SETTINGS))[0].body["type"] == "conversion"


def test_revenue_with_a_dollar_sign_is_read_as_facade_does() -> None:
    assert event(track("Order Completed", {"revenue": "$50"})).order_total == 50
