"""The one rule for personal data in free-form fields, and pseudonymous ids.

Vendors get personal data only where their API asks for it, and then hashed as they document (an email hash, an
identity hash). Free-form payloads (Audiohook's `event_payload`, SegmentStream's label, voucher and payment method)
carry whatever the customer put in properties, so every value goes through `personal()` first: a value is
personal when its key names personal data (names, emails, phones, birthdays, addresses, passwords, ids of
people) or when it looks like an email address or a formatted phone number, whatever its key. Personal values are
dropped, never sent in clear. tests/test_privacy.py holds the property test.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from functools import lru_cache
from typing import Any

from app.event import fold, is_email
from handlers._base import email_hash

# Keys (folded: case and separators ignored) that name personal data, exactly...
_PERSONAL_KEYS = frozenset(fold(k) for k in (
    "name", "first_name", "last_name", "full_name", "middle_name", "maiden_name", "given_name", "family_name",
    "surname", "nickname", "user_name", "username", "display_name", "customer_name", "contact_name",
    "billing_name", "shipping_name", "recipient_name", "card_holder", "cardholder_name",
    "mail", "tel", "fax", "cell", "mobile", "dob", "age", "gender", "ssn", "tax_id", "vat_id", "passport",
    "zip", "zip_code", "zipcode", "postcode", "postal_code", "city", "latitude", "longitude",
    "lat", "lng", "ip", "ip_address", "user_agent", "userAgent",
))
# ...or contain one of these.
_PERSONAL_PARTS = ("email", "phone", "mobilenumber", "birth", "address", "street", "firstname", "lastname",
                   "fullname", "password", "passwd", "iban", "creditcard", "cardnumber", "socialsecurity")
_EMAIL_INSIDE = re.compile(r"[^@\s]+@[^@\s]+\.[a-z]{2,}", re.IGNORECASE)
_PHONE = re.compile(r"^\+?[\d\s().\-/]{7,24}$")


@lru_cache(maxsize=4096)  # a customer's property names repeat from event to event; bounded for any others
def personal_key(key: str) -> bool:
    folded_key = fold(key)
    return folded_key in _PERSONAL_KEYS or any(part in folded_key for part in _PERSONAL_PARTS)


def personal_text(value: str) -> bool:
    """An email address anywhere in it, or a phone number: "+49 30 1234567", "(555) 123-4567", "555.123.4567".

    Plain digit strings are not phones (order and product ids are often digits), nor are dates ("2026-11-23").
    """
    if "@" in value and _EMAIL_INSIDE.search(value):
        return True
    stripped = value.strip()
    if not _PHONE.match(stripped):
        return False
    digits = sum(c.isdigit() for c in stripped)
    separated = any(c in stripped for c in " ().-/")
    return (stripped.startswith("+") and digits >= 7) or (digits >= 10 and separated)


def personal(key: str, value: Any) -> bool:
    return personal_key(key) or (isinstance(value, str) and personal_text(value))


def free_form(properties: Mapping[str, Any], *, mapped: Collection[str] = ()) -> dict[str, Any]:
    """Scalar properties (the customer's own names) that are neither mapped elsewhere nor personal."""
    return {
        key: value for key, value in properties.items()
        if isinstance(value, str | int | float | bool) and fold(key) not in mapped and not personal(key, value)
    }


def free_text(value: str | None) -> str | None:
    """A free-form string field, or None when it holds personal data."""
    return None if value is None or personal_text(value) else value


def pseudonymous_id(user_id: str | None, *, lower: bool) -> str | None:
    """A userId as sent, unless it is an email address: then its hash, as the vendor hashes emails."""
    if user_id is not None and is_email(user_id):
        return email_hash(user_id, lower=lower)
    return user_id
