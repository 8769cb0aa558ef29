"""Tracify: the server-side events API. `vendors.md` §3."""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson

from app.event import Event, text
from handlers._base import (
    Batch,
    HeaderAuth,
    Outcome,
    Postback,
    Route,
    Setting,
    Settings,
    Skip,
    Target,
    Vendor,
    as_number,
    describe,
    drop_empty,
    is_conversion,
    missing_currency,
    money,
    routed_name,
    sha256_hex,
)

SLUG = "tracify"
ROUTES = {
    "page": "pageview",
    "Product Viewed": "productview",
    "Product Added": "addtocart",
    "Order Completed": "purchase",
}
WITH_URL_PARAMS = frozenset({"pageview", "productview"})

SETTINGS = (
    Setting("tracifyApiToken", "string", "Tracify API token (tracify-token header)", required=True, secret=True,
            activates=True),
    Setting("tracifyCustomerSiteId", "uuid", "Tracify customer site id", required=True, activates=True),
    Setting("tracifyDecimalComma", "boolean", "Send amounts as \"100,00\" instead of \"100.00\"", default=False),
)


def calc_group(value: str) -> str:
    """sha256hex(sha256hex(x)[:-5]): Tracify's identity hash, dropping five hex characters."""
    return sha256_hex(sha256_hex(value)[:-5])


def identity_data(event: Event) -> dict[str, int]:
    identities: dict[str, int] = {}
    if event.email:
        identities[calc_group(event.email.strip().lower())] = 1
    if event.ip and event.user_agent:
        identities[calc_group(f"{event.ip}|{event.user_agent}")] = 2
    if event.ip:
        identities[calc_group(event.ip)] = 3
    if event.user_agent:
        identities[calc_group(event.user_agent)] = 4
    return identities


def route(event: Event, settings: Settings) -> list[Route]:
    kind = routed_name(event, ROUTES) or ("conversion" if is_conversion(event, settings) else None)
    if kind is None:
        return [Skip(SLUG, "not_routed", f"Tracify takes page views, product views, add-to-cart, purchases "
                                         f"and conversionEvents; {describe(event)} is none of them")]
    if not event.page_url:
        return [Skip(SLUG, "missing_field", f"Tracify: {describe(event)} has no page url (context.page.url)")]
    if not (event.email or event.ip or event.user_agent):
        return [Skip(SLUG, "missing_field", f"Tracify: {describe(event)} has no email, ip or user agent")]
    if kind == "purchase":
        missing = [n for n, v in (("order_id", event.order_id), ("amount", event.order_total)) if v is None]
        if missing:
            return [Skip(SLUG, "missing_field", f"Tracify: purchase has no {', '.join(missing)}")]
    if kind in ("purchase", "conversion"):
        problem = missing_currency(event, "Tracify")
        if problem:
            return [Skip(SLUG, "missing_field", problem)]
    token, site = settings["tracifyApiToken"], settings["tracifyCustomerSiteId"]
    return [Target(SLUG, "events", _batch_key(token, site), kind)]


@functools.lru_cache(maxsize=1024)
def _batch_key(token: str, site: str) -> str:
    """Events of one token and site may share a request."""
    return sha256_hex(f"{token}\0{site}")[:32]


def build(event: Event, settings: Settings) -> list[Outcome]:
    return [r if isinstance(r, Skip) else _render(event, settings, r) for r in route(event, settings)]


def _render(event: Event, settings: Settings, target: Target) -> Postback:
    kind = target.kind
    assert event.page_url is not None
    identities = identity_data(event)
    parts = urlsplit(event.page_url)
    comma = bool(settings.get("tracifyDecimalComma"))
    data: dict[str, Any] = {"origin": f"{parts.scheme}://{parts.netloc}", "Referer": event.referrer}
    if kind in WITH_URL_PARAMS:
        data.update(event.url_params)
    if kind == "purchase":
        data.update(_purchase(event, comma))
    elif kind == "conversion":
        data["conversion_id"] = text(event.prop("conversion_id")) or event.order_id or event.message_id
        data["currency"] = event.currency
        data["amount"] = money(event.order_total, comma=comma) if event.order_total is not None else None
    body = {
        "url": urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")),
        "customer_site_id": settings["tracifyCustomerSiteId"],
        "datetime": _datetime(event.ts),
        "type": kind,
        "identity_data": identities,
        "data": drop_empty(data),
    }
    return Postback(SLUG, "events", "/api/v1/events", body, auth=HeaderAuth("tracify-token",
                                                                              settings["tracifyApiToken"]),
                    batch_key=target.batch_key)


def _datetime(ts: datetime) -> str:
    """2026-11-20 10:30:00 (UTC; an event's time is between 1970 and 2200), without strftime's slower formatting."""
    return f"{ts.year:04d}-{ts.month:02d}-{ts.day:02d} {ts.hour:02d}:{ts.minute:02d}:{ts.second:02d}"


def _purchase(event: Event, comma: bool) -> dict[str, Any]:
    assert event.order_total is not None
    data: dict[str, Any] = {
        "order_id": event.order_id,
        "currency": event.currency,
        "cc": event.currency,
        "amount": money(event.order_total, comma=comma),
    }
    for n, product in enumerate(event.products, start=1):
        data[f"ITEM{n}"] = product.name or product.sku or product.id
        data[f"AMT{n}"] = money(product.price, comma=comma) if product.price is not None else None
        data[f"QTY{n}"] = str(as_number(product.quantity))
    return data


def succeeded(status: int, body: bytes) -> bool:
    """HTTP 200 and {"status": true}: Tracify answers 200 with status false on failure."""
    if status != 200:
        return False
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(answer, dict) and answer.get("status") is True


VENDOR = Vendor(
    slug=SLUG,
    title="Tracify",
    settings=SETTINGS,
    route=route,
    build=build,
    default_url="https://api.tracify.ai",
    batch=Batch(envelope="events", max_size=100),
    success=succeeded,
)
