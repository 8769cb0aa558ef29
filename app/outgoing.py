"""Postbacks -> the HTTP request that goes over the wire (auth applied, batches enveloped)."""

from __future__ import annotations

import base64
import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus

import orjson

from app.version import VERSION
from handlers import BY_SLUG, Postback, Skip, Vendor
from handlers._base import Auth, BasicAuth, HeaderAuth

REDACTED = "<redacted>"
_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*")  # what quote_plus leaves as it is
_UNRESERVED_OR_COLON = re.compile(r"[A-Za-z0-9_.~:-]*")  # ... and colons, which it writes %3A (times, "2026-...T10:30")
USER_AGENT = f"segrelay/{VERSION}"


@dataclass(frozen=True, slots=True)
class OutgoingRequest:
    method: str
    url: str
    headers: dict[str, str]
    content: bytes

    def describe(self, vendor: str) -> dict[str, Any]:
        """JSON-ready view for `segrelay translate` and dry runs (headers already redacted by render)."""
        is_json = self.headers.get("content-type") == "application/json"
        body: Any = orjson.loads(self.content) if is_json else self.content.decode()
        return {"vendor": vendor, "method": self.method, "url": self.url, "headers": self.headers, "body": body}


@dataclass(frozen=True, slots=True)
class EncodedPostback:
    """A postback with its body already in wire form (JSON, or a form's fields): what a delivery process keeps
    from the moment it builds an event's postbacks until each is sent: its bytes, where the body's dicts and
    strings took several times as much, all of it tracked by Python's garbage collector."""

    vendor: str
    target: str
    path: str
    content: bytes
    form: bool
    auth: Auth | None
    batch_key: str


def encode(postback: Postback) -> EncodedPostback:
    """The postback's body in wire form; a TypeError or ValueError when it holds what JSON cannot carry.

    JSON is copied to bytes of its own size: orjson 3.12 and later return bytes whose allocation is its whole
    working buffer, 4 KB and more for a body of a few hundred bytes (home-assistant/core#181245), which a delivery
    process keeps for every event's other vendors (measured with tracemalloc: 4.2 KB each, 0.6 KB copied)."""
    content = _form(postback.body).encode() if postback.form else bytes(memoryview(orjson.dumps(postback.body)))
    return EncodedPostback(postback.vendor, postback.target, postback.path, content, postback.form, postback.auth,
                           postback.batch_key)


def render(vendor: Vendor, postbacks: Sequence[Postback | EncodedPostback], base_url: str, *,
           redact: bool = False) -> OutgoingRequest:
    """One request for one postback, or for a batch of postbacks sharing a batch key (a batch's JSON is its bodies'
    bytes joined in the vendor's envelope: byte for byte what encoding the envelope as one object gives)."""
    encoded = [p if isinstance(p, EncodedPostback) else encode(p) for p in postbacks]
    first = encoded[0]
    headers = {"user-agent": USER_AGENT}
    content = first.content
    if first.form:
        headers["content-type"] = "application/x-www-form-urlencoded"
    else:
        headers["content-type"] = "application/json"
        if vendor.batch is not None:
            content = b"".join((b"{", orjson.dumps(vendor.batch.envelope), b":[",
                                b",".join(p.content for p in encoded), b"]}"))
    if isinstance(first.auth, BasicAuth):
        headers["authorization"] = "Basic " + (REDACTED if redact else _basic(first.auth.username))
    elif isinstance(first.auth, HeaderAuth):
        headers[first.auth.name] = REDACTED if redact else first.auth.value
    return OutgoingRequest("POST", base_url.rstrip("/") + first.path, headers, content)


def preview(postbacks: list[Postback], skips: list[Skip], urls: Mapping[str, str]) -> dict[str, list[Any]]:
    """What would be sent (secrets redacted) and what is skipped and why: dry runs and `segrelay translate`."""
    return {
        "send": [render(BY_SLUG[p.vendor], [p], urls[p.vendor], redact=True).describe(p.vendor) for p in postbacks],
        "skipped": [{"vendor": s.vendor, "reason": s.reason} for s in skips],
    }


def _form(fields: Mapping[str, Any]) -> str:
    """application/x-www-form-urlencoded, byte for byte as urllib's urlencode, without quoting what needs none
    (most ids, amounts and codes): 17 -> 5 µs for SegmentStream's data stream body."""
    return "&".join(f"{_quoted(key)}={_quoted(_form_value(value))}" for key, value in fields.items())


@functools.lru_cache(maxsize=1024)  # a tenant's tokens repeat from request to request; bounded for any number
def _basic(username: str) -> str:
    return base64.b64encode(f"{username}:".encode()).decode()


def _quoted(text: str) -> str:
    if _UNRESERVED.fullmatch(text):
        return text
    if _UNRESERVED_OR_COLON.fullmatch(text):
        return text.replace(":", "%3A")
    return quote_plus(text)


def _form_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
