"""Postbacks -> HTTP requests: the form encoding is urllib's, byte for byte, for any text."""

from __future__ import annotations

from urllib.parse import urlencode

import orjson
from hypothesis import given
from hypothesis import strategies as st

from app.outgoing import encode, render
from handlers import BY_SLUG, Postback

SEGMENTSTREAM = BY_SLUG["segmentstream"]
values = st.text(max_size=40) | st.integers() | st.booleans() | st.floats(allow_nan=False)


@given(st.dictionaries(st.text(max_size=20), values, max_size=8))
def test_a_form_body_is_encoded_exactly_as_urlencode_does(body: dict[str, object]) -> None:
    request = render(SEGMENTSTREAM, [Postback("segmentstream", "data_stream", "/x", dict(body), form=True)], "http://s")
    expected = {key: ("true" if value else "false") if isinstance(value, bool) else str(value)
                for key, value in body.items()}
    assert request.content == urlencode(expected).encode()
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"


def test_what_needs_no_quoting_is_left_as_it_is_and_the_rest_is_quoted() -> None:
    body = {"orderId": "A-1_2.3~", "createdAt": "2026-11-20T10:30:00.123Z", "note": "a b&c=d/é"}
    request = render(SEGMENTSTREAM, [Postback("segmentstream", "data_stream", "/x", body, form=True)], "http://s")
    assert request.content == b"orderId=A-1_2.3~&createdAt=2026-11-20T10%3A30%3A00.123Z&note=a+b%26c%3Dd%2F%C3%A9"


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.text(max_size=20)
                           | st.floats(allow_nan=False, allow_infinity=False),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                      max_size=3), max_leaves=10)


@given(st.lists(st.dictionaries(st.text(max_size=12), json_values, max_size=5), min_size=1, max_size=5))
def test_a_batch_of_encoded_postbacks_is_the_envelope_encoded_as_one_object(bodies: list[dict[str, object]]) -> None:
    """Delivery keeps postbacks encoded (`encode`) and joins a batch's bytes in the vendor's envelope: the same
    bytes as encoding the envelope with every body in it."""
    tracify = BY_SLUG["tracify"]
    postbacks = [Postback("tracify", "events", "/events", body, batch_key="k") for body in bodies]
    request = render(tracify, [encode(p) for p in postbacks], "http://t")
    assert request.content == orjson.dumps({"events": bodies})
    assert request == render(tracify, postbacks, "http://t")
