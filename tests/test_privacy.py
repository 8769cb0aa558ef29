"""No raw personal data reaches a vendor: a property test over events carrying names, emails, phones, birthdays and
street addresses wherever a customer might put them (handlers/_privacy.py holds the one rule)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.event import parse_event
from app.settings import resolve
from handlers import VENDORS, Postback
from handlers._privacy import free_form, personal, personal_text
from tests.support import ALL_VENDORS

NOW = datetime(2026, 11, 23, tzinfo=UTC)
SETTINGS = resolve({**ALL_VENDORS, "conversionEvents": ["Lead Captured"], "audiohookEvents": ["Signed Up"]})
BROWSER = {"ip": "198.51.100.4", "userAgent": "Mozilla/5.0", "page": {"url": "https://shop.example/p"}}

_letters = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=2, max_size=8)
emails = st.builds(lambda local, domain, tld, upper: (f"{local}.{domain}@{domain}.{tld}").upper() if upper
                   else f"{local}.{domain}@{domain}.{tld}", _letters, _letters, st.sampled_from(["com", "de", "io",
                   "co.uk", "shop"]), st.booleans())
phones = st.builds(lambda a, b, c, fmt: fmt.format(a, b, c), st.integers(200, 999), st.integers(200, 999),
                   st.integers(1000, 9999), st.sampled_from(["+1 {} {} {}", "({}) {}-{}", "{}-{}-{}", "+49 {} {}{}",
                                                             "{}.{}.{}", "+1-{}-{}-{}"]))
person_names = st.builds(lambda first, last: f"{first.title()} {last.title()}Z", _letters, _letters)
birthdays = st.dates().map(lambda d: d.isoformat() + "B")  # a marker: plain dates are not personal on their own
addresses = st.builds(lambda n, street: f"{n} {street.title()} Street", st.integers(1, 999), _letters)

# (keys a customer might use, values) pairs that must never reach a vendor in clear.
personal_fields = st.one_of(
    st.tuples(st.sampled_from(["first_name", "lastName", "Full Name", "username", "customer_name", "nickname",
                               "billing_name"]), person_names),
    st.tuples(st.sampled_from(["email", "Email", "contact_email", "e-mail", "note", "comment", "coupon", "label",
                               "payment_method", "ref"]), emails),
    st.tuples(st.sampled_from(["phone", "phoneNumber", "mobile", "tel", "contact", "note", "label"]), phones),
    st.tuples(st.sampled_from(["birthday", "date_of_birth", "dob", "birthDate"]), birthdays),
    st.tuples(st.sampled_from(["address", "street", "shipping_address", "billingAddress", "address_line1"]),
              addresses),
)
neutral = st.dictionaries(st.sampled_from(["coupon", "plan_name", "billing_cycle", "tax", "shipping", "discount",
                                           "affiliation", "step", "source_page"]),
                          st.one_of(st.integers(0, 10_000), _letters), max_size=4)
kinds = st.sampled_from([("page", None), ("track", "Order Completed"), ("track", "Checkout Started"),
                         ("track", "Product Viewed"), ("track", "Lead Captured"), ("track", "Signed Up"),
                         ("track", "Order Refunded")])


def vendor_bodies(raw: dict[str, Any]) -> list[dict[str, Any]]:
    event = parse_event(raw, orjson.dumps(raw), NOW)
    return [o.body for vendor in VENDORS for o in vendor.build(event, SETTINGS) if isinstance(o, Postback)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=kinds, leaked=st.lists(personal_fields, min_size=1, max_size=6), safe=neutral,
       email=emails, email_as_user_id=st.booleans(), where=st.sampled_from(["traits", "context.traits", "properties"]))
def test_no_vendor_body_carries_personal_data_in_clear(kind: tuple[str, str | None], leaked: list[tuple[str, str]],
                                                        safe: dict[str, Any], email: str, email_as_user_id: bool,
                                                        where: str) -> None:
    call, name = kind
    props: dict[str, Any] = {"order_id": "o-1", "total": 12.5, "currency": "EUR", **safe,
                             "products": [{"product_id": "p-1", "name": "Kettle", "price": 12.5}]}
    for key, value in leaked:
        props[key] = value
    raw: dict[str, Any] = {"type": call, "messageId": "m-1", "anonymousId": "a-1", "context": dict(BROWSER),
                           "properties": props, "userId": email if email_as_user_id else "u-1"}
    if name:
        raw["event"] = name
    if where == "traits":
        raw["traits"] = {"email": email, "firstName": "Zed", "phone": "+1 555 0100"}
    elif where == "context.traits":
        raw["context"]["traits"] = {"email": email}
    else:
        props["email"] = email
    bodies = vendor_bodies(raw)
    sent = orjson.dumps(bodies).decode()
    for _, value in [*leaked, ("email", email)]:
        assert value not in sent and value.lower() not in sent, (value, sent)
    # The rule drops personal data, not everything: plain properties still reach Audiohook's payload.
    pixel = next((b for b in bodies if "event_name" in b), None)
    if pixel is not None:
        replaced = {key for key, _ in leaked}
        assert {k: v for k, v in safe.items() if k not in replaced}.items() <= pixel.get("event_payload", {}).items()


def test_the_rule_by_example() -> None:
    assert personal("first_name", "Jane") and personal("ShippingAddress", "1 Main St") and personal("DOB", "x")
    assert personal("note", "call me at +49 30 1234567") is False  # text around a phone is not a phone
    assert personal("note", "+49 30 1234567") and personal("ref", "mail jane@x.co please")
    assert not personal("plan_name", "Pro") and not personal("order_id", "4105550123")
    assert not personal_text("2026-11-23") and not personal_text("1234567890")
    assert free_form({"coupon": "SAVE10", "phone": "1", "nested": {"a": 1}, "mapped": 1}, mapped={"mapped"}) == {
        "coupon": "SAVE10"}
