"""What a vendor module is made of: declared settings, postbacks, skips and shared field helpers.

A vendor module is data plus two pure functions: `route(event, settings) -> list[Target | Skip]` decides what the
vendor gets (the accept path answers Segment with it) and `build(event, settings) -> list[Postback | Skip]` routes,
then renders each body (delivery sends it). No I/O, no clock, no randomness. Auth is declared on the postback and
applied by delivery, which also owns retries, metrics and logging.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Literal, TypeVar

from app.event import Event

SettingType = Literal["string", "boolean", "array", "uuid", "select", "currency"]
Settings = Mapping[str, Any]  # resolved settings: declared name -> coerced value
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Setting:
    name: str
    type: SettingType
    description: str
    required: bool = False  # required once the vendor is active
    secret: bool = False
    activates: bool = False  # its presence makes the vendor active for the request
    default: Any = None
    choices: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BasicAuth:
    """`Authorization: Basic base64("<username>:")`."""

    username: str


@dataclass(frozen=True, slots=True)
class HeaderAuth:
    name: str
    value: str


Auth = BasicAuth | HeaderAuth


@dataclass(slots=True)
class Postback:
    vendor: str
    target: str  # which endpoint of the vendor: a bounded word, used in responses and logs
    path: str  # appended to the operator-configured base URL of the vendor
    body: dict[str, Any]
    form: bool = False  # form-encoded flat body instead of JSON
    auth: Auth | None = None
    batch_key: str = ""  # postbacks with the same non-empty key may share one request


@dataclass(slots=True)
class Skip:
    vendor: str
    code: str  # bounded word for metrics: not_routed, missing_field, too_large
    reason: str  # what a customer reads in Segment's Event Delivery view


Outcome = Postback | Skip


@dataclass(slots=True)
class Target:
    """A postback the vendor will receive, decided without building its body (what the accept path needs)."""

    vendor: str
    target: str  # as Postback.target
    batch_key: str = ""
    kind: str = ""  # the vendor's routing decision (its event type or name), handed on to the body


Route = Target | Skip


@dataclass(frozen=True, slots=True)
class Batch:
    envelope: str  # {"<envelope>": [body, ...]}
    max_size: int


@dataclass(frozen=True, slots=True)
class Vendor:
    slug: str
    title: str
    settings: tuple[Setting, ...]
    route: Callable[[Event, Settings], list[Route]]  # cheap: which postbacks, or why not
    build: Callable[[Event, Settings], list[Outcome]]  # route, then each body
    default_url: str
    batch: Batch | None = None
    success: Callable[[int, bytes], bool] = field(default=lambda status, body: 200 <= status < 300)

    @property
    def url_env(self) -> str:
        return f"SEGRELAY_{self.slug.upper()}_URL"

    def is_active(self, settings: Settings) -> bool:
        return any(settings.get(s.name) not in (None, "", []) for s in self.settings if s.activates)


# Shared field helpers ------------------------------------------------------------------------------------

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_SNAKE = re.compile(r"[^a-z0-9]+")
_UUID_EPOCH = datetime(1582, 10, 15, tzinfo=UTC)
_MULTICAST = 0x010000000000


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def email_hash(email: str, *, lower: bool) -> str:
    """sha256 hex of the trimmed (and optionally lower-cased) address; a 64-hex value is already a hash."""
    value = email.strip()
    if _HEX64.match(value):
        return value.lower()
    return sha256_hex(value.lower() if lower else value)


def snake_case(name: str) -> str:
    """"Subscription Created" -> "subscription_created"."""
    return _SNAKE.sub("_", name.lower()).strip("_")


@functools.lru_cache(maxsize=256)  # one event's bodies repeat its time: built once per event, not per body
def iso_millis(ts: datetime) -> str:
    """2026-11-20T10:30:00.123Z."""
    ts = ts.astimezone(UTC)
    return (f"{ts.year:04d}-{ts.month:02d}-{ts.day:02d}T{ts.hour:02d}:{ts.minute:02d}:{ts.second:02d}."
            f"{ts.microsecond // 1000:03d}Z")


def deterministic_uuid1(ts: datetime, seed: str) -> str:
    """A version-1 UUID whose time is `ts` and whose clock_seq and node come from sha256(seed).

    The same message always gets the same id, so a vendor deduplicating on it drops our retries.
    """
    delta = ts - _UUID_EPOCH
    ticks = (delta.days * 86_400 + delta.seconds) * 10_000_000 + delta.microseconds * 10
    digest = hashlib.sha256(seed.encode()).digest()
    clock_seq = (int.from_bytes(digest[:2], "big") & 0x3FFF) | 0x8000  # RFC 4122 variant
    node = int.from_bytes(digest[2:8], "big") | _MULTICAST
    time_hi = ((ticks >> 48) & 0x0FFF) | 0x1000  # version 1
    return f"{ticks & 0xFFFFFFFF:08x}-{(ticks >> 32) & 0xFFFF:04x}-{time_hi:04x}-{clock_seq:04x}-{node:012x}"


def money(value: Decimal, *, comma: bool = False) -> str:
    """Two decimals, "100.00" (or "100,00")."""
    result = f"{value.quantize(Decimal('0.01'), rounding=ROUND_HALF_UP):f}"
    return result.replace(".", ",") if comma else result


def as_number(value: Decimal) -> int | float:
    """A JSON number: integral values as integers (30, not 30.0)."""
    integral = int(value)
    return integral if integral == value else float(value)


def drop_empty(value: Any) -> Any:
    """Remove None, "", {} and [] recursively."""
    kind = type(value)
    if kind is dict:
        out = {}
        for key, item in value.items():
            kind = type(item)
            if kind is dict or kind is list:
                item = drop_empty(item)
                if not item:
                    continue
            elif item is None or (kind is str and not item):  # no `== ""`: a Decimal compared with a str is slow
                continue
            out[key] = item
        return out
    if kind is list:
        return [drop_empty(item) if type(item) is dict or type(item) is list else item for item in value]
    return value


def routed_name(event: Event, table: Mapping[str, T]) -> T | None:
    """The vendor's entry for a spec event in its routing table, keyed by `page` and canonical track names.

    Spec events keep their meaning even when also listed in `conversionEvents`.
    """
    return table.get("page" if event.type == "page" else (event.canonical_name or ""))


def is_conversion(event: Event, settings: Settings) -> bool:
    names = settings.get("conversionEvents") or []
    return event.type == "track" and listed(event.event_name, names)


def listed(name: str | None, names: list[str]) -> bool:
    """Case-insensitive membership of an event name in a list setting."""
    if not name:
        return False
    wanted = name.strip().lower()
    return any(n.strip().lower() == wanted for n in names)


def missing_currency(event: Event, vendor: str) -> str | None:
    """Why a conversion with an amount cannot be sent: it has no (valid) currency. None when it can. The reason
    names the vendor (or its API) and the event, described only when there is a reason to give."""
    if event.order_total is None or event.currency:
        return None
    what = f"{vendor}: {describe(event)}"
    if event.bad_currency:
        return f"{what} has an amount but its currency {event.bad_currency!r} is not an ISO 4217 code"
    return f"{what} has an amount but no currency (set properties.currency, or the defaultCurrency setting)"


def describe(event: Event) -> str:
    """'track "Order Completed"' or 'page' for messages."""
    return f'{event.type} "{event.event_name}"' if event.type == "track" else event.type
