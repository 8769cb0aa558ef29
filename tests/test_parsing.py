"""Authorization, X-Segment-Settings and event normalisation, in process."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest

from app import event as event_module
from app.auth import api_key_from_header
from app.errors import BadRequestError, UnauthorizedError, UnsupportedTypeError
from app.event import MAX_KEY_LENGTH, MAX_KEYS, fold, folded, parse_event
from app.ingest import Ingest, not_json
from app.settings import coerce, decode_header, resolve
from handlers._base import Setting
from tests.support import fixture

NOW = datetime(2026, 11, 23, tzinfo=UTC)


def parse(raw: dict[str, Any]) -> Any:
    return parse_event(raw, json.dumps(raw).encode(), NOW)


def test_api_key_split_on_the_first_colon_only() -> None:
    header = "Basic " + base64.b64encode(b"key:with:colons").decode()
    assert api_key_from_header(header) == "key"
    assert api_key_from_header("basic " + base64.b64encode(b"segment:").decode()) == "segment"
    assert api_key_from_header("Basic " + base64.b64encode(b"k:").decode().rstrip("=")) == "k"
    with pytest.raises(UnauthorizedError):
        api_key_from_header("Basic")


def test_settings_header_variants() -> None:
    payload = json.dumps({"a": "b?>"}).encode()
    assert decode_header(base64.b64encode(payload).decode()) == {"a": "b?>"}
    assert decode_header(base64.urlsafe_b64encode(payload).decode().rstrip("=")) == {"a": "b?>"}
    assert decode_header(None) == {} and decode_header("  ") == {}


def test_settings_coercion() -> None:
    assert coerce(Setting("x", "array", ""), "a, b,,c") == ["a", "b", "c"]
    assert coerce(Setting("x", "array", ""), [" a "]) == ["a"]
    assert coerce(Setting("x", "boolean", ""), "TRUE") is True
    with pytest.raises(BadRequestError, match="'x' must be a string"):
        coerce(Setting("x", "string", ""), 5)
    resolved = resolve({"SEGMENTSTREAM_API_TOKEN": "t", "unknownSetting": 1, "dryRun": None})
    assert resolved["segmentstreamApiToken"] == "t" and resolved["dryRun"] is False
    assert "unknownSetting" not in resolved


def test_fold() -> None:
    assert fold("orderId") == fold("order_id") == fold("OrderID") == fold("ORDER-ID") == "orderid"


def test_timestamp_fallbacks_and_timezones() -> None:
    base = {"type": "page", "userId": "u"}
    assert parse(base).ts == NOW
    assert parse({**base, "receivedAt": "2026-01-01T00:00:00Z"}).ts == datetime(2026, 1, 1, tzinfo=UTC)
    assert parse({**base, "sentAt": "2026-01-01T02:00:00+02:00", "receivedAt": "2020-01-01T00:00:00Z"}).ts == (
        datetime(2026, 1, 1, tzinfo=UTC))
    assert parse({**base, "timestamp": "2026-01-01T00:00:00"}).ts.tzinfo is UTC


def test_normalised_view_of_the_odd_casing_fixture() -> None:
    raw = fixture("order_completed_v1_casing.json")
    event = parse(raw)
    assert event.canonical_name == "Order Completed" and event.event_name == "Completed Order"
    assert (event.order_id, event.order_total, event.currency) == ("N1", Decimal("120.13"), "USD")
    assert event.ip == "198.51.100.42" and event.user_agent.startswith("Mozilla")
    assert event.page_url == "https://shop.example.com/thanks"
    assert event.referrer == "https://shop.example.com/cart"
    (product,) = event.products
    assert (product.price, product.quantity, product.name) == (Decimal("60.00"), Decimal(2), "Widget")


def test_order_total_fallbacks() -> None:
    def total(props: dict[str, Any]) -> Decimal | None:
        result: Decimal | None = parse({"type": "track", "event": "Order Completed", "userId": "u",
                                        "properties": props}).order_total
        return result
    assert total({"revenue": 10, "shipping": "2.5", "tax": 1}) == Decimal("13.5")
    assert total({"value": "7"}) == Decimal(7)
    assert total({"products": [{"price": 2, "quantity": 3}, {"price": "1.5"}]}) == Decimal("7.5")
    assert total({}) is None


def test_email_sources_in_order() -> None:
    identify = parse({"type": "identify", "userId": "u", "traits": {"email": "a@x"}, "email": "b@x"})
    assert identify.email == "a@x"
    track = parse({"type": "track", "event": "E", "userId": "u", "traits": {"email": "a@x"}, "email": "b@x"})
    assert track.email == "a@x"  # top-level traits count on any call (facade)
    nested = parse({"type": "track", "event": "E", "userId": "u", "context": {"traits": {"email": "c@x"}},
                    "properties": {"email": "d@x"}})
    assert nested.email == "c@x"
    assert parse({"type": "track", "event": "E", "userId": "u", "properties": {"email": "d@x"}}).email == "d@x"
    by_id = parse({"type": "track", "event": "E", "userId": " Jane.Doe@Example.com "})
    assert by_id.email == "Jane.Doe@Example.com"  # a userId that is an email address
    assert parse({"type": "track", "event": "E", "userId": "user@123"}).email is None  # not an address


def test_unsupported_types() -> None:
    with pytest.raises(UnsupportedTypeError, match="Unsupported call type: Screen"):
        parse({"type": "Screen", "userId": "u"})
    assert parse({"type": "TRACK", "event": "e", "userId": 5}).user_id == "5"


def test_folded_keys_first_non_empty_wins() -> None:
    for _ in range(2):  # keys first seen, then remembered (folded with one look-up each)
        assert folded({"orderId": "", "order_id": "N2", "OrderID": "N3"}) == {"orderid": "N2"}
        assert folded({"order_id": None, "orderId": "N4"}) == {"orderid": "N4"}
        assert folded({"Revenue": 10, "revenue": 20}) == {"revenue": 10}
        assert folded({"Order-ID": "N5", "total": 3}) == {"orderid": "N5", "total": 3}


def test_remembered_keys_are_bounded() -> None:
    for round_ in range(event_module.MAX_FOLDED_KEYS // MAX_KEYS + 2):  # past the bound: it empties
        many = {f"made_up_{round_}_{i}": i for i in range(MAX_KEYS)}
        assert folded(many) == {f"madeup{round_}{i}": i for i in range(MAX_KEYS)}
        assert len(event_module._FOLDED_KEYS) <= event_module.MAX_FOLDED_KEYS
    assert folded({"userId": "u"}) == {"userid": "u"}
    assert folded(["not", "an", "object"]) == {} and folded(None) == {}


def test_folded_bounds_what_an_object_can_cost() -> None:
    long_key = "k" * (MAX_KEY_LENGTH + 1)  # too long to be a key we read: folds to nothing
    assert folded({long_key: "x", "email": "a@b.co"}) == {"": "x", "email": "a@b.co"}
    assert len(folded({f"key{i}": i for i in range(MAX_KEYS + 10)})) == MAX_KEYS  # only the first MAX_KEYS


URLS = ["https://shop.example.com/checkout?utm_source=x#top", "HTTP://Shop.Example.COM:8080/p", "http://a", "https://a:/",
        "https://localhost/x", "https://-/x", "https://./", "https://a.b?q", "https://a.b#f", "https://user@a.b/",
        "https://[::1]/x", "http://[::1", "https://a b.com/", "https://a.com\t/x", "https://a.com/\nx", "ftp://a.com/",
        "https:///path", "https://", "//shop.com/cart", "www.shop.com/cart", "/cart", "shop", "https://xn--bcher-kva.ch/",
        "https://a.com:99999/", "https://a.com:port/", "https://ä.com/", " https://a.com/", "https://a.com%2f/x"]


@pytest.mark.parametrize("url", URLS)
def test_the_fast_path_for_plain_urls_answers_as_urlsplit_does(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = event_module.absolute_url(url)
    monkeypatch.setattr(event_module, "_PLAIN_URL", event_module.re.compile(r"(?!)"))  # never matches: urlsplit
    assert fast == event_module.absolute_url(url)


@pytest.mark.parametrize(("body", "message"), [
    (b'{"type": "track" "event": "x"}',
     "Request body is not valid JSON: unexpected character, expected ',' or '}' (line 1, column 18)"),
    (b'{"type": "track", "userId": "a@b.co"', "Request body is not valid JSON: unexpected end of data (line 1, column 37)"),
    (b" \n ", "Request body is empty: expected one Segment call as a JSON object"),
    (b'{"name": "J\xf6rg"}', "Request body is not valid UTF-8 (JSON must be UTF-8 encoded)"),
    (b"[" * 1100 + b"]" * 1100, "Event is nested deeper than 1024 levels"),
    (b"[" * 1100, "Request body is not valid JSON (line 1, column 639)"),  # orjson: "failed to allocate memory"
])
def test_a_body_that_is_not_json_is_told_what_and_where(body: bytes, message: str) -> None:
    with pytest.raises(BadRequestError) as refused:
        Ingest.read(body)
    assert refused.value.message == message


def test_a_parser_message_that_is_not_a_plain_phrase_is_left_out() -> None:
    """Only orjson's fixed phrases are repeated: anything else (it could quote the body) gives the place alone."""
    odd = orjson.JSONDecodeError("invalid value: 'jane@example.com'", '{"email": jane@example.com}', 10)
    assert not_json(b'{"email": jane@example.com}', odd) == "Request body is not valid JSON (line 1, column 11)"


def test_settings_that_are_not_json_are_told_what_and_where() -> None:
    header = base64.b64encode(b'{"audiohookId": "x",}').decode()
    with pytest.raises(BadRequestError) as refused:
        decode_header(header)
    assert refused.value.message == ("X-Segment-Settings does not decode to JSON: trailing comma is not allowed "
                                     "(line 1, column 20)")
