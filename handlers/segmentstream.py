"""SegmentStream: the postback API (`/track`) and the webhook data stream (`/ds/<id>`). `vendors.md` §2."""

from __future__ import annotations

from typing import Any

import orjson

from app.event import Event, Product, number, text
from handlers._base import (
    BasicAuth,
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
    deterministic_uuid1,
    drop_empty,
    email_hash,
    iso_millis,
    missing_currency,
    money,
    routed_name,
)
from handlers._privacy import free_text, pseudonymous_id

SLUG = "segmentstream"
MAX_BYTES = 64 * 1024
ECOMMERCE = "Ecommerce"
ORDER_STATUS = {"Order Updated": "updated", "Order Refunded": "refunded", "Order Cancelled": "cancelled"}
DATA_STREAM_STATUS = {"Order Completed": "completed", **ORDER_STATUS}

# canonical Segment name -> (SegmentStream event name, category)
ROUTES: dict[str, tuple[str, str | None]] = {
    "page": ("Viewed Page", None),
    "Product Viewed": ("Viewed Product Detail", ECOMMERCE),
    "Product Added": ("Added Product", ECOMMERCE),
    "Checkout Started": ("Started Order", ECOMMERCE),
    "Order Completed": ("Completed Transaction", ECOMMERCE),
    **{name: ("Updated Transaction", ECOMMERCE) for name in ORDER_STATUS},
}

SETTINGS = (
    Setting("segmentstreamApiToken", "string", "SegmentStream API token (postback API)", secret=True,
            activates=True),
    Setting("segmentstreamDataStreamId", "uuid", "SegmentStream webhook data stream id (orders to BigQuery)",
            activates=True),
    Setting("segmentstreamSource", "string", "event.source sent to SegmentStream", default="Segment"),
    Setting("segmentstreamRegion", "string", "event.website.region"),
    Setting("segmentstreamEnvironment", "string", "event.website.environment", default="production"),
)


TRANSACTIONS = frozenset({"Completed Transaction", "Updated Transaction"})


def route(event: Event, settings: Settings) -> list[Route]:
    if event.type not in ("track", "page"):
        return [Skip(SLUG, "not_routed", f"SegmentStream takes track and page calls, not {event.type}")]
    routes: list[Route] = []
    if settings.get("segmentstreamApiToken"):
        name = _name(event)[0]
        problem = _transaction_problem(event, "SegmentStream") if name in TRANSACTIONS else None
        routes.append(Skip(SLUG, "missing_field", problem) if problem else Target(SLUG, "track"))
    if settings.get("segmentstreamDataStreamId") and event.canonical_name in DATA_STREAM_STATUS:
        problem = _transaction_problem(event, "SegmentStream data stream")
        routes.append(Skip(SLUG, "missing_field", problem) if problem else Target(SLUG, "data_stream"))
    return routes


def _transaction_problem(event: Event, what: str) -> str | None:
    if event.order_id is None:
        return f"{what}: {describe(event)} has no order_id"
    return missing_currency(event, what)


def build(event: Event, settings: Settings) -> list[Outcome]:
    return [r if isinstance(r, Skip) else _track(event, settings) if r.target == "track"
            else _data_stream(event, settings["segmentstreamDataStreamId"]) for r in route(event, settings)]


def _name(event: Event) -> tuple[str, str | None]:
    return routed_name(event, ROUTES) or (event.event_name or "", None)  # else: custom, as sent


def _track(event: Event, settings: Settings) -> Outcome:
    name, category = _name(event)
    body_event: dict[str, Any] = {
        "name": name,
        "category": category,
        "label": free_text(text(event.prop("label"))),
        "value": _value(event),
        "nonInteraction": _non_interaction(event),
        "source": settings.get("segmentstreamSource") or "Segment",
        "user": {
            "userId": pseudonymous_id(event.user_id, lower=False),
            "anonymousId": event.anonymous_id,
            "emailHash": email_hash(event.email, lower=False) if event.email else None,
        },
        "website": {
            "region": settings.get("segmentstreamRegion"),
            "environment": settings.get("segmentstreamEnvironment") or "production",
            "currency": event.currency,
        },
    }
    if name in TRANSACTIONS:
        body_event["transaction"] = _transaction(event)
    body = drop_empty(
        {
            "hitId": deterministic_uuid1(event.ts, event.message_id),
            "sentAt": iso_millis(event.ts),
            "event": body_event,
            "context": {"ip": event.ip},
            "integrations": {"Google Analytics": {"clientId": event.ga_client_id}},
        }
    )
    body = _fit(body)
    if body is None:
        return Skip(SLUG, "too_large", "SegmentStream: postback exceeds 64 KB even without line items")
    token = settings["segmentstreamApiToken"]
    return Postback(SLUG, "track", "/track", body, auth=BasicAuth(token))


def _value(event: Event) -> int | None:
    amount = number(event.prop("value"))
    if amount is None or amount < 0:
        return None
    return int(amount.to_integral_value())


def _non_interaction(event: Event) -> bool | None:
    for key in ("nonInteraction", "non_interaction"):
        value = event.prop(key)
        if isinstance(value, bool):
            return value
    return True if event.canonical_name in ORDER_STATUS else None


def _transaction(event: Event) -> dict[str, Any]:
    status = ORDER_STATUS.get(event.canonical_name or "") or text(event.prop("status"))
    discount = number(event.prop("discount"))
    subtotal, shipping = number(event.prop("subtotal")), number(event.prop("shipping"))
    return {
        "orderId": event.order_id,
        "total": as_number(event.order_total) if event.order_total is not None else None,
        "subtotal": as_number(subtotal) if subtotal is not None else None,
        "status": status,
        "currency": event.currency,
        "voucher": free_text(text(event.prop("coupon"))),
        "voucherDiscount": str(discount) if discount is not None else None,
        "shippingCost": as_number(shipping) if shipping is not None else None,
        "paymentMethod": free_text(text(event.prop("payment_method"))),
        "lineItems": [_line_item(p, event.currency) for p in event.products],
    }


def _line_item(product: Product, currency: str | None) -> dict[str, Any]:
    price = product.price
    unit_price = product.compare_at_price if product.compare_at_price is not None else price
    return {
        "quantity": as_number(product.quantity),
        "subtotal": as_number(price * product.quantity) if price is not None else None,
        "product": {
            "id": product.id,
            "name": product.name,
            "currency": currency,
            "unitSalePrice": as_number(price) if price is not None else None,
            "unitPrice": as_number(unit_price) if unit_price is not None else None,
            "category": product.category,
            "manufacturer": product.brand,
            "skuCode": product.sku,
        },
    }


def _fit(body: dict[str, Any]) -> dict[str, Any] | None:
    """Shrink a body over 64 KB: drop category/manufacturer, then names, then line items; never totals."""
    if len(orjson.dumps(body)) <= MAX_BYTES:
        return body
    items: list[dict[str, Any]] = body.get("event", {}).get("transaction", {}).get("lineItems", [])
    for keys in (("category", "manufacturer"), ("name",)):
        for item in items:
            for key in keys:
                item.get("product", {}).pop(key, None)
        if len(orjson.dumps(body)) <= MAX_BYTES:
            return body
    while items:
        del items[len(items) // 2 :]
        if len(orjson.dumps(body)) <= MAX_BYTES:
            return body
    return None


def _data_stream(event: Event, stream_id: str) -> Outcome:
    status = text(event.prop("status")) or DATA_STREAM_STATUS[event.canonical_name or ""]
    stamp = iso_millis(event.ts)
    body = drop_empty(
        {
            "orderId": event.order_id,
            "status": status,
            "total": money(event.order_total) if event.order_total is not None else None,
            "currency": event.currency,
            "userId": pseudonymous_id(event.user_id, lower=False),
            "anonymousId": event.anonymous_id,
            "messageId": event.message_id,
            "createdAt": stamp,
            "updatedAt": stamp,
        }
    )
    return Postback(SLUG, "data_stream", f"/ds/{stream_id}", body, form=True)


VENDOR = Vendor(
    slug=SLUG,
    title="SegmentStream",
    settings=SETTINGS,
    route=route,
    build=build,
    default_url="https://track.segmentstream.com",
)
