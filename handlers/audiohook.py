"""Audiohook: the S2S pixel, one flat JSON object per request. `vendors.md` §4."""

from __future__ import annotations

from typing import Any

from app.event import UTM_KEYS, Event, fold
from handlers._base import (
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
    email_hash,
    is_conversion,
    iso_millis,
    listed,
    missing_currency,
    routed_name,
    snake_case,
)
from handlers._privacy import free_form, pseudonymous_id

SLUG = "audiohook"
ROUTES = {
    "page": "pageview",
    "Product Viewed": "product_viewed",
    "Product Added": "add_to_cart",
    "Checkout Started": "checkout_started",
    "Order Completed": "purchase",
}
FALLBACK_IP = "0.0.0.0"
# Properties already mapped to a field of their own are left out of event_payload (personal ones always are).
_MAPPED = frozenset(
    fold(k)
    for k in ("order_id", "order_number", "checkout_id", "total", "revenue", "value", "currency", "products", "url",
              "referrer", "session_id", "product_id", "sku", "price", "quantity", *UTM_KEYS)
)

SETTINGS = (
    Setting("audiohookId", "uuid", "Audiohook account id (the UUID in the pixel URL)", activates=True),
    Setting("audiohookEvents", "array", "Other track events to send to Audiohook (snake_case names)"),
    Setting("audiohookMissingIp", "select", "Purchases without ip/user agent: skip, or send with 0.0.0.0",
            default="skip", choices=("skip", "fallback")),
)


def route(event: Event, settings: Settings) -> list[Route]:
    name = routed_name(event, ROUTES)
    if name is None and event.type == "track" and event.event_name and (
        is_conversion(event, settings) or listed(event.event_name, settings.get("audiohookEvents") or [])
    ):
        name = snake_case(event.event_name)
    if name is None:
        return [Skip(SLUG, "not_routed", f"Audiohook: {describe(event)} is not mapped and not listed in "
                                         f"audiohookEvents or conversionEvents")]
    if not (event.ip and event.user_agent) and not (
            name == "purchase" and settings.get("audiohookMissingIp") == "fallback"):
        missing = " and ".join(n for n, v in (("ip", event.ip), ("user agent", event.user_agent)) if not v)
        hint = "; set audiohookMissingIp to fallback to send purchases anyway" if name == "purchase" else ""
        return [Skip(SLUG, "missing_field", f"Audiohook: {describe(event)} has no {missing} (context.ip, "
                                            f"context.userAgent){hint}")]
    if name == "purchase" and event.order_id is None:
        return [Skip(SLUG, "missing_field", "Audiohook: purchase has no order_id")]
    if name == "purchase" or is_conversion(event, settings):
        problem = missing_currency(event, "Audiohook")
        if problem:
            return [Skip(SLUG, "missing_field", problem)]
    return [Target(SLUG, "pixel", kind=name)]


def build(event: Event, settings: Settings) -> list[Outcome]:
    return [r if isinstance(r, Skip) else _render(event, settings, r.kind) for r in route(event, settings)]


def _render(event: Event, settings: Settings, name: str) -> Postback:
    ip = event.ip or FALLBACK_IP
    user_agent = event.user_agent or event.library or "unknown"
    visitor = event.anonymous_id or pseudonymous_id(event.user_id, lower=True)
    body: dict[str, Any] = {
        "event_name": name,
        "timestamp": iso_millis(event.ts),
        "visitor_id": visitor,
        "persistent_anonymous_user_id": visitor,
        "session_id": event.session_id,
        "ip_address": ip,
        "user_agent": user_agent,
        "url": event.page_url,
        "referrer": event.referrer,
        "email": email_hash(event.email, lower=True) if event.email else None,
        "order_id": event.order_id,
        **{utm: event.url_params.get(utm) for utm in UTM_KEYS},
    }
    if event.order_total is not None and event.currency:  # an amount never goes without its currency
        body["value"] = as_number(event.order_total)
        body["currency"] = event.currency
    body["items"] = [
        {
            "product_id": p.id,
            "product_name": p.name,
            "price": as_number(p.price) if p.price is not None else None,
            "quantity": as_number(p.quantity),
        }
        for p in event.products
    ]
    body["event_payload"] = free_form(event.raw_props, mapped=_MAPPED)
    return Postback(SLUG, "pixel", f"/{settings['audiohookId']}/pixel.png", drop_empty(body))


VENDOR = Vendor(
    slug=SLUG,
    title="Audiohook",
    settings=SETTINGS,
    route=route,
    build=build,
    default_url="https://listen.audiohook.com",
)
