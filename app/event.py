"""The normalised event: one Segment call, read once, with any key casing.

Every vendor handler reads this object and never the raw JSON (`vendors.md` §0). Key lookup is case- and
separator-insensitive: `orderId`, `order_id` and `OrderID` all fold to `orderid`.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pycountry

from app.errors import BadRequestError, UnsupportedTypeError

HANDLED_TYPES = frozenset({"identify", "track", "page", "group"})
MAX_MESSAGE_ID = 200

# Spec event names, keyed by their lower-cased form, including Ecommerce v1 aliases.
_CANONICAL_EVENTS = {
    name.lower(): name
    for name in (
        "Order Completed",
        "Order Updated",
        "Order Refunded",
        "Order Cancelled",
        "Product Viewed",
        "Product Added",
        "Product Removed",
        "Checkout Started",
    )
}
_CANONICAL_EVENTS.update(
    {
        "completed order": "Order Completed",
        "viewed product": "Product Viewed",
        "added product": "Product Added",
        "removed product": "Product Removed",
        "started order": "Checkout Started",
        "updated order": "Order Updated",
        "refunded order": "Order Refunded",
        "cancelled order": "Order Cancelled",
    }
)
SINGLE_PRODUCT_EVENTS = frozenset({"Product Viewed", "Product Added", "Product Removed"})
_CAMPAIGN_TO_UTM = (
    ("source", "utm_source"),
    ("medium", "utm_medium"),
    ("name", "utm_campaign"),
    ("term", "utm_term"),
    ("content", "utm_content"),
)
UTM_KEYS = tuple(utm for _, utm in _CAMPAIGN_TO_UTM)  # the campaign's url parameters
_FOLD = re.compile(r"[^a-z0-9]")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s.]+$")
_PLAIN_URL = re.compile(r"https?://[A-Za-z0-9.-]+(?::[0-9]*)?(?:[/?#]|$)", re.IGNORECASE)
# ISO 4217 codes, from a maintained list (pycountry); XXX ("no currency") and XTS (testing) are not amounts' units.
CURRENCIES = frozenset(c.alpha_3 for c in pycountry.currencies) - {"XXX", "XTS"}
# Events whose Ecommerce v1 `id` property is the order's id (on product events it is the product's).
ORDER_EVENTS = frozenset({"Order Completed", "Order Updated", "Order Refunded", "Order Cancelled",
                          "Checkout Started"})

# Bounds on what one event may cost to read (documented in the README's "Limits" section).
MAX_PRODUCTS = 250  # products read per event (Segment caps an event at 32 KB); more are dropped with a warning
MAX_KEYS = 1000  # keys read per object
MAX_KEY_LENGTH = 256  # longer keys are never one we look for
MAX_TEXT = 2000  # characters kept of a string value
MAX_NUMBER_TEXT = 40  # characters of a numeric string
MAX_DIGITS = 15  # amounts and quantities below 10**15
MAX_INT = 10**MAX_DIGITS
_MAX_FLOAT = float(MAX_INT)
# Timestamps outside these years are unreadable (a clock at 0001-01-01 is not a time to report to a vendor).
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2200, 1, 1, tzinfo=UTC)


_FOLDED_KEYS: dict[str, str] = {}  # key -> its folded form, for keys of at most MAX_KEY_LENGTH characters
MAX_FOLDED_KEYS = 8192  # keys remembered at most: a flood of made-up keys empties it, and it fills again


def fold(key: str) -> str:
    """`orderId`, `order_id`, `Order-ID` -> `orderid`, remembered (`folded` reads what is remembered directly)."""
    found = _FOLDED_KEYS.get(key)
    if found is None:
        found = _FOLD.sub("", key.lower())
        if len(key) <= MAX_KEY_LENGTH:
            if len(_FOLDED_KEYS) >= MAX_FOLDED_KEYS:
                _FOLDED_KEYS.clear()
            _FOLDED_KEYS[key] = found
    return found


def is_email(value: str | None) -> bool:
    return value is not None and len(value) <= 254 and _EMAIL.match(value) is not None


def is_currency(code: str) -> bool:
    """An ISO 4217 code (upper case)."""
    return code in CURRENCIES


def absolute_url(url: str | None) -> tuple[str | None, str | None]:
    """A page url with a scheme and a host, and a warning when it had to be completed or cannot be used.

    `www.shop.com/cart` and `//shop.com/cart` get https (what a browser would assume); a url with no host
    (`/cart`) or that does not parse (`http://[::1`) is not a page url: absent, with a warning.
    """
    if url is None:
        return None, None
    if _PLAIN_URL.match(url):  # what urlsplit would find a scheme, a host and a hostname in: most urls, at once
        return url, None
    try:
        parts = urlsplit(url)
        if parts.scheme and parts.netloc and parts.hostname:
            return url, None
        completed = "https:" + url if url.startswith("//") else "https://" + url
        parts = urlsplit(completed)
        host = parts.hostname or ""
    except ValueError:
        return None, f"page url {_shown(url)} is not a url: not used"
    plausible = host == "localhost" or "." in host.strip(".")
    if plausible and parts.username is None and not any(c.isspace() for c in host):
        return completed, f"page url {_shown(url)} has no scheme: https assumed"
    return None, f"page url {_shown(url)} has no host: not used"


def canonical_event_name(name: str) -> str:
    return _CANONICAL_EVENTS.get(name.strip().lower(), name)


def folded(value: Any) -> dict[str, Any]:
    """An object's keys folded, or {} for anything that is not an object (one level: nested objects are
    folded when read).

    On a collision (`orderId` and `order_id` both present) the first non-empty value wins. Only the first
    `MAX_KEYS` keys of an object are read, so a hostile object costs a bounded time.
    """
    if not isinstance(value, dict):
        return {}
    if len(value) <= MAX_KEYS:
        try:  # the usual object: every key seen before, no two folding alike (one dict look-up per key)
            out = {_FOLDED_KEYS[key]: item for key, item in value.items()}
        except KeyError:
            pass  # a key not seen before: the loop below folds it and remembers it
        else:
            if len(out) == len(value):
                return out
    out = {}
    items = value.items() if len(value) <= MAX_KEYS else itertools.islice(value.items(), MAX_KEYS)
    for key, item in items:
        name = fold(key) if len(key) <= MAX_KEY_LENGTH else ""
        if name not in out or is_empty(out[name]):
            out[name] = item
    return out


def is_empty(value: Any) -> bool:
    return value is None or value == "" or value == {} or value == []


def first(*values: Any) -> Any:
    for value in values:
        if not is_empty(value):
            return value
    return None


def text(value: Any) -> str | None:
    """A non-empty string from a string or a number, at most MAX_TEXT characters; anything else is absent."""
    kind = type(value)
    if kind is str:
        stripped: str = value.strip()
        return stripped[:MAX_TEXT] or None
    if kind is int:
        return str(value) if -MAX_INT < value < MAX_INT else None
    if kind is float:
        return repr(value)
    return None


def number(value: Any) -> Decimal | None:
    """A finite decimal of sensible size from a number or a numeric string ("120.13"; "1,5" is not a number).

    Magnitudes of 10**15 and more are not amounts (and would cost unbounded time to print): absent. Numbers
    closer to zero than 10**-12 read as 0. A numeric string longer than 40 characters is not a number.
    """
    kind = type(value)
    if kind is int:
        return Decimal(value) if -MAX_INT < value < MAX_INT else None
    if kind is float:
        if not -_MAX_FLOAT < value < _MAX_FLOAT:  # also rejects inf and nan
            return None
        result = Decimal(repr(value))
    elif kind is str:
        if len(value) > MAX_NUMBER_TEXT:
            return None
        try:
            result = Decimal(value.strip().removeprefix("$"))  # facade reads "$50" as 50
        except InvalidOperation:
            return None
        if not result.is_finite() or result.adjusted() >= MAX_DIGITS:
            return None
    else:
        return None
    return result if result.is_zero() or result.adjusted() >= -12 else Decimal(0)


@dataclass(slots=True)  # not frozen: frozen dataclasses are several times slower to build
class Product:
    id: str | None
    sku: str | None
    name: str | None
    brand: str | None
    category: str | None
    variant: str | None
    price: Decimal | None
    compare_at_price: Decimal | None
    quantity: Decimal


@dataclass(slots=True)  # treated as immutable; not frozen because that makes every request slower
class Event:
    type: str
    message_id: str
    ts: datetime
    user_id: str | None = None
    anonymous_id: str | None = None
    event_name: str | None = None  # as sent
    canonical_name: str | None = None  # v1 aliases resolved, spec casing
    email: str | None = None
    ip: str | None = None
    user_agent: str | None = None
    page_url: str | None = None
    referrer: str | None = None
    url_params: dict[str, str] = field(default_factory=dict)
    currency: str | None = None
    bad_currency: str | None = None  # a currency the event named that is not ISO 4217 (it is never sent)
    order_id: str | None = None
    order_total: Decimal | None = None
    product_items: tuple[dict[str, Any], ...] = ()  # the raw product objects, read into Products on first use
    _products: tuple[Product, ...] | None = None
    session_id: str | None = None
    context: dict[str, Any] = field(default_factory=dict)  # folded context: what only a body needs is read from it
    integrations: Any = None  # as sent
    props: dict[str, Any] = field(default_factory=dict)  # folded properties
    raw_props: dict[str, Any] = field(default_factory=dict)  # properties with the customer's key names
    warnings: list[str] = field(default_factory=list)  # what was read differently from how it was sent
    stitched: list[str] = field(default_factory=list)  # fields filled from a remembered identity (app/identity.py)

    def prop(self, name: str) -> Any:
        return self.props.get(fold(name))

    @property
    def library(self) -> str | None:
        """`context.library` as `name/version` (a user agent of last resort); read when a body is built."""
        library = folded(self.context.get("library"))
        name, version = text(library.get("name")), text(library.get("version"))
        return f"{name}/{version}" if name and version else name or version

    @property
    def ga_client_id(self) -> str | None:
        """Google Analytics' client id (`integrations["Google Analytics"].clientId`); read when a body is built."""
        return text(folded(folded(self.integrations).get("googleanalytics")).get("clientid"))

    @property
    def products(self) -> tuple[Product, ...]:
        """Read when a body is built, not on the accept path (which only routes)."""
        if self._products is None:
            self._products = tuple(_product(folded(p)) for p in self.product_items)
        return self._products


def parse_timestamp(value: Any) -> datetime | None:
    """ISO 8601 (any offset; no offset is UTC), or epoch seconds or milliseconds as a number or numeric string.

    None when the value is absent, unreadable, or outside 1970..2200; never raises.
    """
    if type(value) is str:
        raw = value.strip()
        if not raw or len(raw) > 64:
            return None
        digits = raw.replace(".", "", 1).removeprefix("-")
        if digits.isdigit():
            return _from_epoch(number(raw))
        try:
            parsed = datetime.fromisoformat(raw.replace("z", "Z"))
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        try:
            parsed = parsed.astimezone(UTC)
        except (OverflowError, ValueError):  # 0001-01-01T00:00:00+01:00 has no UTC time
            return None
        return parsed if EARLIEST <= parsed < LATEST else None
    if type(value) in (int, float):
        return _from_epoch(number(value))
    return None


def _from_epoch(value: Decimal | None) -> datetime | None:
    """Epoch seconds, or milliseconds when the number is too large to be seconds before 2200."""
    if value is None or value < 0:
        return None
    seconds = float(value) / 1000 if value >= 10**10 else float(value)
    try:
        parsed = datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, ValueError, OSError):
        return None
    return parsed if EARLIEST <= parsed < LATEST else None


def url_params(page_url: str | None, search: Any, campaign: dict[str, Any]) -> dict[str, str]:
    query = page_url.partition("#")[0].partition("?")[2] if page_url else ""
    if not query and isinstance(search, str):
        query = search.lstrip("?")
    params: dict[str, str] = {}
    if query:
        if "%" in query or "+" in query:
            for key, value in parse_qsl(query, keep_blank_values=False):
                params.setdefault(key, value)
        else:
            for pair in query.split("&"):
                key, _, value = pair.partition("=")
                if value and key not in params:
                    params[key] = value
    if campaign:
        for source, utm in _CAMPAIGN_TO_UTM:
            if utm not in params and (filled := text(campaign.get(source))) is not None:
                params[utm] = filled
    return params


def _product(raw: dict[str, Any]) -> Product:
    quantity = number(raw.get("quantity"))
    category = raw.get("category")
    if isinstance(category, list):
        category = "/".join(c for c in (text(item) for item in category) if c)
    return Product(
        id=text(first(raw.get("productid"), raw.get("sku"), raw.get("id"))),
        sku=text(raw.get("sku")),
        name=text(raw.get("name")),
        brand=text(raw.get("brand")),
        category=text(category),
        variant=text(raw.get("variant")),
        price=number(raw.get("price")),
        compare_at_price=number(raw.get("compareatprice")),
        quantity=quantity if quantity is not None and quantity > 0 else Decimal(1),
    )


def _order_total(props: dict[str, Any], items: tuple[dict[str, Any], ...]) -> Decimal | None:
    total = number(props.get("total"))
    if total is not None:
        return total
    revenue = number(props.get("revenue"))
    if revenue is not None:
        return revenue + (number(props.get("shipping")) or 0) + (number(props.get("tax")) or 0)
    value = number(props.get("value"))
    if value is not None:
        return value
    products = [_product(folded(p)) for p in items]
    priced = [p.price * p.quantity for p in products if p.price is not None]
    return sum(priced, Decimal(0)) if priced else None


def _email(traits: dict[str, Any], context: dict[str, Any], props: dict[str, Any], raw: dict[str, Any],
           user_id: str | None) -> str | None:
    """facade's order: traits (any call), context.traits, properties, top level, then a userId that is an email."""
    found = traits.get("email")
    if is_empty(found):  # each place read only when the ones before it have none
        found = folded(context.get("traits")).get("email")
        if is_empty(found):
            found = first(props.get("email"), raw.get("email"))
    found = text(found)
    if found is None and is_email(user_id):
        return user_id
    return found


def _order_id(props: dict[str, Any], canonical: str | None) -> str | None:
    """order_id (orderId, OrderID...), order_number, checkout_id, then the v1 `id` on order events."""
    found = text(first(props.get("orderid"), props.get("ordernumber"), props.get("checkoutid")))
    if found is None and canonical in ORDER_EVENTS:
        found = text(props.get("id"))
    return found


def _require_object(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequestError(f"'{name}' must be a JSON object, got {type(value).__name__}")
    return folded(value)


_TIME_FIELDS = tuple((name, fold(name)) for name in ("timestamp", "originalTimestamp", "sentAt", "receivedAt"))


def _shown(value: Any) -> str:
    """A short, safe rendering of a value for a warning."""
    return repr(value)[:40] if isinstance(value, str | int | float) else type(value).__name__


def call_type(body: Any) -> str:
    """The call's type, lower-cased; 400 when missing, 501 when not one we handle."""
    if not isinstance(body, dict):
        raise BadRequestError(f"Request body must be a JSON object, got {type(body).__name__}")
    raw_type = body.get("type")
    if raw_type is None:
        raw_type = first(*(v for k, v in body.items() if fold(k) == "type"))
    if raw_type is None:
        raise BadRequestError("Event is missing 'type' (identify, track, page or group)")
    if not isinstance(raw_type, str):
        raise BadRequestError(f"'type' must be a string, got {type(raw_type).__name__}")
    kind = raw_type.strip().lower()
    if kind not in HANDLED_TYPES:
        unsupported = UnsupportedTypeError(f"Unsupported call type: {raw_type.strip()[:50]}")
        unsupported.call_type = kind if kind in ("screen", "alias") else "other"  # a bounded metric label
        raise unsupported
    return kind


def parse_event(body: Any, raw_body: bytes, now: datetime | float, default_currency: str | None = None) -> Event:
    """Validate one Segment call and build its normalised view, or raise a ContractError. `now` (a datetime or epoch
    seconds) is the event's time when it has none of its own."""
    kind = call_type(body)
    raw = folded(body)
    context = _require_object(raw, "context")
    props = _require_object(raw, "properties")
    traits = _require_object(raw, "traits")
    raw_props = body.get("properties")
    if not isinstance(raw_props, dict):
        raw_props = next((v for k, v in body.items() if fold(k) == "properties" and isinstance(v, dict)), {})

    message_id = text(raw.get("messageid"))
    if message_id is None:
        # Segment always sends one; a hand-made request without it still dedupes on its exact bytes.
        message_id = "body-" + hashlib.sha256(raw_body).hexdigest()[:32]
    if len(message_id) > MAX_MESSAGE_ID:
        raise BadRequestError(f"'messageId' is longer than {MAX_MESSAGE_ID} characters")

    warnings: list[str] = []
    ts = None
    for name, folded_name in _TIME_FIELDS:
        value = raw.get(folded_name)
        ts = parse_timestamp(value)
        if ts is not None:
            break
        if not is_empty(value):
            warnings.append(f"'{name}' is not a readable time ({_shown(value)}): the next time field was used")
    user_id, anonymous_id = text(raw.get("userid")), text(raw.get("anonymousid"))
    if user_id is None and anonymous_id is None:
        raise BadRequestError(f"{kind} call has neither 'userId' nor 'anonymousId': one of them is required")

    event_name = canonical = None
    if kind == "track":
        event_name = text(raw.get("event"))
        if event_name is None:
            raise BadRequestError("track call is missing 'event' (the event name, e.g. \"Order Completed\")")
        canonical = canonical_event_name(event_name)
    elif kind == "group" and text(raw.get("groupid")) is None:
        raise BadRequestError("group call is missing 'groupId'")
    elif kind == "page":
        event_name = text(raw.get("name"))

    page = folded(context.get("page"))
    page_url, problem = absolute_url(text(first(page.get("url"), props.get("url"))))
    if problem:
        warnings.append(problem)
    campaign = folded(context.get("campaign"))
    if canonical in SINGLE_PRODUCT_EVENTS:
        product_items: tuple[dict[str, Any], ...] = (props,)
    else:
        items = props.get("products")
        product_items = ()
        if isinstance(items, list):
            if len(items) > MAX_PRODUCTS:
                warnings.append(f"{len(items)} products: only the first {MAX_PRODUCTS} were read")
                items = items[:MAX_PRODUCTS]
            product_items = tuple(p for p in items if isinstance(p, dict))
    currency, bad_currency = text(props.get("currency")), None
    if currency is not None:
        currency = currency.upper()
        if not is_currency(currency):
            bad_currency, currency = currency[:20], None
            warnings.append(f"'currency' {_shown(bad_currency)} is not an ISO 4217 code: not used")

    return Event(
        type=kind,
        message_id=message_id,
        ts=ts or (now if isinstance(now, datetime) else datetime.fromtimestamp(now, UTC)),
        user_id=user_id,
        anonymous_id=anonymous_id,
        event_name=event_name,
        canonical_name=canonical,
        email=_email(traits, context, props, raw, user_id),
        ip=text(context.get("ip")),
        user_agent=text(context.get("useragent")),
        page_url=page_url,
        referrer=text(first(page.get("referrer"), props.get("referrer"))),
        url_params=url_params(page_url, page.get("search"), campaign),
        currency=currency or (None if bad_currency else default_currency),
        bad_currency=bad_currency,
        order_id=_order_id(props, canonical),
        order_total=_order_total(props, product_items),
        product_items=product_items,
        session_id=text(first(context.get("sessionid"), props.get("sessionid"))),
        context=context,
        integrations=raw.get("integrations"),
        props=props,
        raw_props=raw_props,
        warnings=warnings,
    )
