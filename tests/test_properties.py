"""Property-based: arbitrary JSON, headers and bytes at the real server never get a 500 or a non-JSON answer."""

from __future__ import annotations

import base64
import json
import string
import uuid
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import ALL_VENDORS, Segrelay, basic, fixture
from tests.test_translate_fuzz import EDGES

SEGMENT_KEYS = ["type", "event", "userId", "anonymousId", "messageId", "timestamp", "context", "properties",
                "traits", "groupId", "name", "integrations", "Type", "user_id", "ORDERID", "products", "ip",
                "userAgent", "page", "url", "email", "total", "price", "quantity", "currency", "campaign"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30) | st.sampled_from(EDGES),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(SEGMENT_KEYS) | st.text(max_size=8), children, max_size=6),
    max_leaves=25,
)
events = st.fixed_dictionaries(
    {"type": st.sampled_from(["track", "page", "identify", "group", "screen", "TRACK", ""]) | json_values},
    optional={k: json_values for k in SEGMENT_KEYS[1:]},
)
header_text = st.text(alphabet=string.printable.strip() + " ", max_size=60).map(str.strip)
settings_values = st.dictionaries(st.sampled_from(list(ALL_VENDORS) + ["dryRun", "audiohookEvents",
                                                                       "tracifyDecimalComma", "audiohookMissingIp",
                                                                       "defaultCurrency"]), json_values, max_size=6)
bad_tokens = st.fixed_dictionaries({"tracifyApiToken": st.sampled_from(["t\r\nX-A: 1", "t\x00", "tök", "\u2028"])
                                    | st.text(max_size=10), "tracifyCustomerSiteId": st.just(ALL_VENDORS[
                                        "tracifyCustomerSiteId"]), "segmentstreamApiToken": st.text(max_size=10)})


@pytest.fixture(scope="module")
def client(server: Segrelay) -> Any:
    with httpx.Client(base_url=server.url, timeout=10) as http:
        yield http


def check(response: httpx.Response) -> None:
    assert response.status_code != 500, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body, dict) and isinstance(body["message"], str) and body["message"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(event=events | json_values, config=settings_values | bad_tokens, dry=st.booleans())
def test_arbitrary_json_never_breaks_the_server(client: httpx.Client, server: Segrelay, event: Any,
                                                config: dict[str, Any], dry: bool) -> None:
    if dry:
        config = {**config, "dryRun": True}
    header = base64.b64encode(json.dumps(config).encode()).decode()
    check(client.post("/segment", content=json.dumps(event),
                      headers={"Authorization": basic(server.key), "X-Segment-Settings": header}))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(authorization=header_text, settings_header=header_text, body=st.binary(max_size=200))
def test_arbitrary_headers_and_bytes_never_break_the_server(client: httpx.Client, server: Segrelay,
                                                            authorization: str, settings_header: str,
                                                            body: bytes) -> None:
    check(client.post("/segment", content=body,
                      headers={"Authorization": authorization, "X-Segment-Settings": settings_header}))
    check(client.post("/segment", content=body,
                      headers={"Authorization": basic(server.key), "X-Segment-Settings": settings_header}))


ORDER = fixture("order_completed.json")
poison = st.sampled_from(EDGES) | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.none()
poisoned_orders = st.fixed_dictionaries(
    {"properties": st.fixed_dictionaries({}, optional={
        k: poison for k in ("total", "revenue", "tax", "shipping", "value", "currency", "order_id", "discount",
                            "subtotal")}),
     "products": st.lists(st.fixed_dictionaries({}, optional={
         k: poison for k in ("price", "quantity", "product_id", "name", "category")}), max_size=3),
     "timestamp": poison, "ip": poison, "userAgent": poison, "url": poison})


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(change=poisoned_orders)
def test_a_real_order_with_poisoned_values_is_accepted_or_refused_never_a_500(client: httpx.Client,
                                                                                server: Segrelay,
                                                                                change: dict[str, Any]) -> None:
    event = json.loads(json.dumps(ORDER))
    event["messageId"] = f"poison-{uuid.uuid4()}"
    event["properties"].update(change["properties"])
    for product, poisoned in zip(event["properties"]["products"], change["products"], strict=False):
        product.update(poisoned)
    event["timestamp"] = change["timestamp"]
    event["context"].update({"ip": change["ip"], "userAgent": change["userAgent"]})
    event["context"].setdefault("page", {})["url"] = change["url"]
    header = base64.b64encode(json.dumps(ALL_VENDORS).encode()).decode()
    response = client.post("/segment", content=json.dumps(event),
                           headers={"Authorization": basic(server.key), "X-Segment-Settings": header}, timeout=5)
    check(response)
    assert response.status_code in (200, 202), response.text
