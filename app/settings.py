"""X-Segment-Settings: decode the header and coerce each declared setting to its type."""

from __future__ import annotations

import base64
import binascii
import functools
import re
import uuid
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import orjson

from app.errors import BadRequestError, unreadable_json
from app.event import fold, is_currency
from handlers import ALL_SETTINGS
from handlers._base import Setting

_HEADER_SAFE = re.compile(r"^[\x20-\x7e]+$")  # printable ASCII: what every HTTP client sends in a header
_BY_FOLDED = {fold(s.name): s for s in ALL_SETTINGS}


@functools.lru_cache(maxsize=1024)
def from_header(header: str | None) -> Mapping[str, Any]:
    """Resolved settings for a header value; cached, since a destination sends the same header every time."""
    return MappingProxyType(resolve(decode_header(header)))


@functools.lru_cache(maxsize=1024)
def settings_json(header: str | None) -> bytes:
    """The resolved settings of a header value as JSON: what is stored (sealed) with each accepted event."""
    return orjson.dumps(dict(from_header(header)))


def decode_header(header: str | None) -> dict[str, Any]:
    """Standard or URL-safe base64 of a JSON object, padding optional; absent -> {}."""
    if header is None or not header.strip():
        return {}
    raw = header.strip()
    try:
        decoded = base64.b64decode(raw + "=" * (-len(raw) % 4), altchars=b"-_" if ("-" in raw or "_" in raw)
                                   else None, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequestError("X-Segment-Settings is not valid base64") from None
    try:
        value = orjson.loads(decoded)
    except orjson.JSONDecodeError as exc:
        raise BadRequestError(unreadable_json("X-Segment-Settings does not decode to JSON", exc)) from None
    if not isinstance(value, dict):
        raise BadRequestError(f"X-Segment-Settings must be a JSON object, got {type(value).__name__}")
    return value


def resolve(raw: dict[str, Any]) -> dict[str, Any]:
    """Declared settings by their declared name, coerced; names match case-insensitively, others are ignored."""
    resolved: dict[str, Any] = {s.name: s.default for s in ALL_SETTINGS}
    for key, value in raw.items():
        setting = _BY_FOLDED.get(fold(key))
        if setting is not None and value is not None and value != "":
            resolved[setting.name] = coerce(setting, value)
    return resolved


def coerce(setting: Setting, value: Any) -> Any:
    name = setting.name
    if setting.type == "boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise BadRequestError(f"Setting '{name}' must be true or false")
    if setting.type == "array":
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise BadRequestError(f"Setting '{name}' must be a list of strings or a comma-separated string")
        return [i.strip() for i in items if i.strip()]
    if not isinstance(value, str):
        raise BadRequestError(f"Setting '{name}' must be a string")
    value = value.strip()
    if setting.secret and not _HEADER_SAFE.match(value):
        raise BadRequestError(f"Setting '{name}' holds a control or non-ASCII character; it is sent in an HTTP "
                              f"header, so paste the token again exactly as the vendor shows it")
    if setting.type == "uuid":
        try:
            return str(uuid.UUID(value))
        except ValueError:
            raise BadRequestError(f"Setting '{name}' must be a UUID (like 123e4567-e89b-12d3-a456-426614174000)"
                                  ) from None
    if setting.type == "currency":
        if not is_currency(value.upper()):
            raise BadRequestError(f"Setting '{name}' must be an ISO 4217 currency code like EUR or USD, got "
                                  f"{value[:20]!r}")
        return value.upper()
    if setting.type == "select" and value not in setting.choices:
        raise BadRequestError(f"Setting '{name}' must be one of: {', '.join(setting.choices)}")
    return value
