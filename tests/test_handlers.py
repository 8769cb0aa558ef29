"""The vendors' rules, one by one (vendors.md §2-§4)."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest

from app.errors import BadRequestError
from app.event import Event, parse_event
from app.settings import resolve
from handlers import Postback, Skip, audiohook, segmentstream, tracify
from handlers._base import deterministic_uuid1, email_hash, iso_millis, money, snake_case
from tests.support import ALL_VENDORS, AUDIOHOOK_ID, SITE_ID, fixture

NOW = datetime(2026, 11, 23, tzinfo=UTC)


def event(raw: dict[str, Any]) -> Event:
    return parse_event(raw, orjson.dumps(raw), NOW)


def only_postback(outcomes: list[Any]) -> Postback:
    assert len(outcomes) == 1 and isinstance(outcomes[0], Postback), outcomes
    postback: Postback = outcomes[0]
    return postback


def only_skip(outcomes: list[Any]) -> Skip:
    assert len(outcomes) == 1 and isinstance(outcomes[0], Skip), outcomes
    skip: Skip = outcomes[0]
    return skip


SETTINGS = resolve(ALL_VENDORS)
ORDER = fixture("order_completed.json")


# shared helpers --------------------------------------------------------------------------------------------


def test_calc_group_matches_the_spec_test_vectors() -> None:
    assert tracify.calc_group("8.8.8.8") == "78b860bbd1b3dbeae0fc333d31d78a2431dd260dbde2ecdef86eecbb0314e45f"
    assert tracify.calc_group("8.8.8.8|Mozilla/5.0") == (
        "7e935e5bf7fb52e8c5c07e99eb256aa84445e78b45ac680a4f9fded443ffc7d4")


def test_calc_group_drops_five_hex_characters_not_four() -> None:
    inner4 = hashlib.sha256(b"8.8.8.8").hexdigest()[:-4]
    assert tracify.calc_group("8.8.8.8") != hashlib.sha256(inner4.encode()).hexdigest()


def test_hit_id_is_a_stable_version_1_uuid_carrying_the_event_time() -> None:
    ts = datetime(2026, 11, 20, 10, 30, 0, 123000, tzinfo=UTC)
    first, again = deterministic_uuid1(ts, "msg-1"), deterministic_uuid1(ts, "msg-1")
    parsed = uuid.UUID(first)
    assert first == again
    assert parsed.version == 1 and parsed.variant == uuid.RFC_4122
    assert parsed.node & 0x010000000000  # multicast bit: never a real MAC address
    gregorian_to_unix = 0x01B21DD213814000
    assert (parsed.time - gregorian_to_unix) / 1e7 == pytest.approx(ts.timestamp(), abs=1e-6)
    assert deterministic_uuid1(ts, "msg-2") != first


def test_hit_id_is_the_same_on_every_build_of_one_message() -> None:
    ids = {only_postback(segmentstream.build(event(ORDER), {**SETTINGS, "segmentstreamDataStreamId": None}))
           .body["hitId"] for _ in range(3)}
    assert len(ids) == 1


def test_email_hash_rules() -> None:
    assert email_hash(" Jane@X.com ", lower=False) == hashlib.sha256(b"Jane@X.com").hexdigest()
    assert email_hash(" Jane@X.com ", lower=True) == hashlib.sha256(b"jane@x.com").hexdigest()
    already = hashlib.sha256(b"a@b.c").hexdigest()
    assert email_hash(already, lower=False) == already
    assert email_hash(already.upper(), lower=True) == already


@pytest.mark.parametrize(("value", "comma", "expected"), [
    (Decimal("100"), False, "100.00"), (Decimal("100"), True, "100,00"), (Decimal("120.125"), False, "120.13"),
    (Decimal("0.5"), True, "0,50"), (Decimal("19.999"), False, "20.00"),
])
def test_money_has_two_decimals(value: Decimal, comma: bool, expected: str) -> None:
    assert money(value, comma=comma) == expected


def test_snake_case_and_timestamps() -> None:
    assert snake_case("Subscription Created") == "subscription_created"
    assert snake_case("  Trial -- Started! ") == "trial_started"
    assert iso_millis(datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)) == "2026-01-02T03:04:05.678Z"


# SegmentStream ----------------------------------------------------------------------------------------------


def test_segmentstream_order_completed_is_a_completed_transaction_with_line_items() -> None:
    track, stream = segmentstream.build(event(ORDER), SETTINGS)
    assert isinstance(track, Postback) and isinstance(stream, Postback)
    body = track.body
    assert body["event"]["name"] == "Completed Transaction" and body["event"]["category"] == "Ecommerce"
    assert body["event"]["transaction"]["total"] == 30.0
    assert body["event"]["transaction"]["voucherDiscount"] == "2.5"
    assert [i["subtotal"] for i in body["event"]["transaction"]["lineItems"]] == [19.0, 6.0]
    assert body["event"]["user"]["emailHash"] == hashlib.sha256(b"Jane.Doe@Example.com").hexdigest()
    assert body["integrations"] == {"Google Analytics": {"clientId": "13332315.454547"}}
    assert track.path == "/track" and track.auth is not None
    assert stream.path == f"/ds/{ALL_VENDORS['segmentstreamDataStreamId']}" and stream.form and stream.auth is None
    assert stream.body["status"] == "completed" and stream.body["total"] == "30.00"


@pytest.mark.parametrize(("name", "status"), [("Order Refunded", "refunded"), ("Order Cancelled", "cancelled"),
                                              ("Order Updated", "updated")])
def test_segmentstream_order_changes_are_updated_transactions(name: str, status: str) -> None:
    raw = {**fixture("order_refunded.json"), "event": name}
    track, stream = segmentstream.build(event(raw), SETTINGS)
    assert isinstance(track, Postback) and isinstance(stream, Postback)
    assert track.body["event"]["name"] == "Updated Transaction"
    assert track.body["event"]["transaction"]["status"] == status
    assert track.body["event"]["nonInteraction"] is True
    assert stream.body["status"] == status


def test_segmentstream_value_is_a_non_negative_integer() -> None:
    raw = {"type": "track", "event": "Lead", "userId": "u", "properties": {"value": "12.7"}}
    assert only_postback(segmentstream.build(event(raw), SETTINGS)).body["event"]["value"] == 13
    raw["properties"] = {"value": -4}
    assert "value" not in only_postback(segmentstream.build(event(raw), SETTINGS)).body["event"]


def test_segmentstream_64_kb_guard_drops_details_then_line_items_never_totals() -> None:
    products = [{"product_id": f"p{i}", "name": "N" * 200, "category": "C" * 200, "brand": "B" * 100,
                 "price": 1, "quantity": 1} for i in range(400)]
    raw = {**ORDER, "properties": {"order_id": "big", "total": 400, "currency": "EUR", "products": products}}
    body = only_postback(segmentstream.build(event(raw), {**SETTINGS, "segmentstreamDataStreamId": None})).body
    assert len(orjson.dumps(body)) <= 64 * 1024
    items = body["event"]["transaction"]["lineItems"]
    assert body["event"]["transaction"]["total"] == 400
    assert all("category" not in i["product"] and "manufacturer" not in i["product"] for i in items)
    small = [{**p, "name": "n", "category": "C" * 150} for p in products[:250]]
    raw["properties"] = {"order_id": "mid", "total": 250, "currency": "EUR", "products": small}
    body = only_postback(segmentstream.build(event(raw), {**SETTINGS, "segmentstreamDataStreamId": None})).body
    kept = body["event"]["transaction"]["lineItems"]
    assert len(kept) == 250 and all("category" not in i["product"] and i["product"]["name"] == "n" for i in kept)
    raw["properties"] = {"order_id": "huge", "total": 1500, "currency": "EUR", "products": products * 4}
    body = only_postback(segmentstream.build(event(raw), {**SETTINGS, "segmentstreamDataStreamId": None})).body
    assert len(orjson.dumps(body)) <= 64 * 1024
    assert 0 < len(body["event"]["transaction"]["lineItems"]) < 1600
    assert body["event"]["transaction"]["total"] == 1500 and body["event"]["transaction"]["orderId"] == "huge"


def test_segmentstream_skips_transactions_without_order_id() -> None:
    raw = {"type": "track", "event": "Order Completed", "userId": "u", "properties": {"total": 5}}
    outcomes = segmentstream.build(event(raw), SETTINGS)
    assert all(isinstance(o, Skip) and "order_id" in o.reason for o in outcomes) and len(outcomes) == 2


# Tracify ---------------------------------------------------------------------------------------------------


def test_tracify_identity_classes() -> None:
    ids = tracify.identity_data(event(ORDER))
    assert sorted(ids.values()) == [1, 2, 3, 4]
    assert ids[tracify.calc_group("jane.doe@example.com")] == 1
    assert ids[tracify.calc_group("203.0.113.195")] == 3


def test_tracify_pageview_has_every_url_parameter_flat_and_no_query_in_url() -> None:
    body = only_postback(tracify.build(event(fixture("page.json")), SETTINGS)).body
    assert body["url"] == "https://shop.example.com/sale"
    assert body["data"]["trc_mcmp_id"] == "120206067078490109" and body["data"]["fbclid"] == "IwAR0abc"
    assert body["data"]["utm_campaign"] == "spring_sale"  # filled from context.campaign.name
    assert body["data"]["utm_source"] == "fb"  # the URL's value is never overwritten
    assert body["data"]["origin"] == "https://shop.example.com"


def test_tracify_purchase_amounts_and_items_with_decimal_comma() -> None:
    body = only_postback(tracify.build(event(ORDER), {**SETTINGS, "tracifyDecimalComma": True})).body
    assert body["type"] == "purchase" and body["datetime"] == "2026-11-20 10:30:00"
    assert body["data"]["amount"] == "30,00" and body["data"]["cc"] == "USD"
    assert (body["data"]["ITEM2"], body["data"]["AMT2"], body["data"]["QTY2"]) == ("Uno Card Game", "3,00", "2")


def test_tracify_conversion_uses_conversion_id_then_order_then_message() -> None:
    raw = fixture("subscription_created.json")
    body = only_postback(tracify.build(event(raw), SETTINGS)).body
    assert body["type"] == "conversion" and body["data"]["conversion_id"] == "node-sub-1"
    assert body["data"]["amount"] == "29.99"
    raw = {**raw, "properties": {**raw["properties"], "conversion_id": "c-1"}}
    assert only_postback(tracify.build(event(raw), SETTINGS)).body["data"]["conversion_id"] == "c-1"


def test_tracify_skips_with_reasons() -> None:
    server = event(fixture("order_completed_server.json"))
    assert "no page url" in only_skip(tracify.build(server, SETTINGS)).reason
    assert "none of them" in only_skip(tracify.build(event(fixture("devcenter_test_event.json")), SETTINGS)).reason
    raw = {**ORDER, "properties": {"total": 3}}
    assert "order_id" in only_skip(tracify.build(event(raw), SETTINGS)).reason


def test_tracify_success_needs_status_true() -> None:
    assert tracify.succeeded(200, b'{"status": true}')
    assert not tracify.succeeded(200, b'{"status": false, "error": "bad token"}')
    assert not tracify.succeeded(200, b"ok")
    assert not tracify.succeeded(201, b'{"status": true}')


# Audiohook -------------------------------------------------------------------------------------------------


def test_audiohook_purchase_is_flat_with_both_visitor_keys_and_hashed_email() -> None:
    body = only_postback(audiohook.build(event(ORDER), SETTINGS)).body
    assert body["event_name"] == "purchase"
    assert body["visitor_id"] == body["persistent_anonymous_user_id"] == ORDER["anonymousId"]
    assert body["url"].endswith("trc_mad_id=333")  # the query string stays
    assert body["email"] == hashlib.sha256(b"jane.doe@example.com").hexdigest()
    assert body["value"] == 30.0 and body["order_id"] == "50314b8e9bcf000000000000"
    assert body["items"][1] == {"product_id": "505bd76785ebb509fc183733", "product_name": "Uno Card Game",
                                "price": 3.0, "quantity": 2}
    assert body["event_payload"]["coupon"] == "hasbros"
    assert all(not isinstance(v, dict) for v in body.values() if v is not body["event_payload"])


def test_audiohook_missing_ip_policy() -> None:
    server = event(fixture("order_completed_server.json"))
    assert "no ip and user agent" in only_skip(audiohook.build(server, SETTINGS)).reason
    body = only_postback(audiohook.build(server, {**SETTINGS, "audiohookMissingIp": "fallback"})).body
    assert body["ip_address"] == "0.0.0.0" and body["user_agent"] == "analytics-python/2.3.4"


def test_audiohook_custom_events_only_when_listed() -> None:
    raw = {"type": "track", "event": "Trial Started", "userId": "u", "context": {"ip": "1.1.1.1", "userAgent": "UA"}}
    assert only_skip(audiohook.build(event(raw), SETTINGS)).code == "not_routed"
    listed = {**SETTINGS, "audiohookEvents": ["trial started"]}
    assert only_postback(audiohook.build(event(raw), listed)).body["event_name"] == "trial_started"


# casing and v1 names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["orderId", "order_id", "OrderID", "ORDER-ID"])
def test_order_id_in_any_casing(key: str) -> None:
    raw = {"type": "track", "event": "Order Completed", "userId": "u", "properties": {key: "o-1", "total": 1}}
    assert event(raw).order_id == "o-1"


@pytest.mark.parametrize(("v1", "tracify_type", "audiohook_name"), [
    ("Completed Order", "purchase", "purchase"), ("Viewed Product", "productview", "product_viewed"),
    ("Added Product", "addtocart", "add_to_cart"), ("Started Order", None, "checkout_started"),
    ("ORDER COMPLETED", "purchase", "purchase"),
])
def test_v1_and_case_variant_event_names_route_like_v2(v1: str, tracify_type: str | None,
                                                       audiohook_name: str) -> None:
    raw = {**ORDER, "event": v1}
    outcomes = tracify.build(event(raw), SETTINGS)
    if tracify_type is None:
        assert only_skip(outcomes).code == "not_routed"
    else:
        assert only_postback(outcomes).body["type"] == tracify_type
    assert only_postback(audiohook.build(event(raw), SETTINGS)).body["event_name"] == audiohook_name


# settings that shape a URL ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["audiohookId", "segmentstreamDataStreamId", "tracifyCustomerSiteId"])
@pytest.mark.parametrize("value", ["evil.example.com", "../../x", "123e4567-e89b-12d3-a456-42661417400Z", "@x"])
def test_path_identifiers_must_be_uuids(name: str, value: str) -> None:
    with pytest.raises(BadRequestError, match=f"'{name}' must be a UUID"):
        resolve({name: value})


def test_uuid_settings_are_normalised_so_nothing_else_reaches_the_path() -> None:
    settings = resolve({"audiohookId": "{" + AUDIOHOOK_ID.upper() + "}", "tracifyCustomerSiteId": SITE_ID})
    assert settings["audiohookId"] == AUDIOHOOK_ID
    postback = only_postback(audiohook.build(event(ORDER), settings))
    assert postback.path == f"/{AUDIOHOOK_ID}/pixel.png"


def test_spec_events_keep_their_meaning_when_also_listed_as_conversions() -> None:
    settings = {**SETTINGS, "conversionEvents": ["order completed", "Subscription Created"]}
    assert only_postback(tracify.build(event(ORDER), settings)).body["type"] == "purchase"
    assert only_postback(audiohook.build(event(ORDER), settings)).body["event_name"] == "purchase"
    track = segmentstream.build(event(ORDER), settings)[0]
    assert isinstance(track, Postback) and track.body["event"]["name"] == "Completed Transaction"
    sub = segmentstream.build(event(fixture("subscription_created.json")), settings)[0]
    assert isinstance(sub, Postback) and sub.body["event"]["name"] == "Subscription Created"
