"""Postbacks -> HTTP requests: the form encoding is urllib's, byte for byte, for any text."""

from __future__ import annotations

from urllib.parse import urlencode

from hypothesis import given
from hypothesis import strategies as st

from app.outgoing import render
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
