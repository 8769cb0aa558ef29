"""Identity stitching: remember each visitor's browser context, and fill server-side events from it.

A purchase sent from a backend (analytics-python, a CRM, a webhook) has no ip, user agent or page url, so the
attribution vendors could not credit it. For each tenant, segrelay remembers per `userId` and per `anonymousId`
the latest browser context seen on any event (ip, user agent, page url, referrer, campaign, email, the browser's
anonymousId, and when), and an event lacking some of them gets them from its `userId`'s record, else its
`anonymousId`'s, before the vendors' rules run. An event carrying both ids (identify, and every call analytics.js
makes after it) links them: the merged context is remembered under both.

Privacy: records are keyed by an HMAC of (tenant, kind, id) under a key derived from the server secret (the id is
never stored, and one tenant can never read another's), sealed like payloads (AES-GCM), expire after
`SEGRELAY_IDENTITY_TTL_DAYS` and are bounded in number (`SEGRELAY_MAX_IDENTITIES`). `segrelay identities forget`
deletes one person's records. The setting `identityStitching: false` turns it off for a destination.

The pure part (`stitch` and its helpers) has no I/O: `segrelay translate` runs it over a file of events in memory;
`IdentityBook` reads and writes the store for the accept path.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag

from app.crypto import Sealer, derive
from app.event import Event, url_params
from app.store import Identity, Store

log = logging.getLogger("segrelay.identity")

# Event attribute -> where the customer finds it in a Segment event (what the answer names).
FIELDS = {
    "ip": "context.ip",
    "user_agent": "context.userAgent",
    "page_url": "context.page.url",
    "referrer": "context.page.referrer",
    "email": "email",
    "anonymous_id": "anonymousId",  # a server-side event then names the browser's visitor, as the pixel saw it
}
CAMPAIGN = "context.campaign"
UTM_KEYS = ("utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content")
MAX_LINKS = 8  # ids of the other kind remembered per record (for `forget`)
REFRESH_SECONDS = 86_400.0  # an unchanged record is written again (its expiry pushed back) at most this often


@dataclass(slots=True)
class Context:
    """What is remembered of one visitor."""

    values: dict[str, str] = field(default_factory=dict)  # FIELDS' attributes that were seen
    campaign: dict[str, str] = field(default_factory=dict)  # utm_* parameters
    seen: float = 0.0
    links: list[str] = field(default_factory=list)  # identity keys of the linked ids

    def pack(self) -> bytes:
        return orjson.dumps({"v": self.values, "c": self.campaign, "s": self.seen, "l": self.links})

    @classmethod
    def unpack(cls, data: bytes) -> Context:
        raw = orjson.loads(data)
        return cls(dict(raw.get("v", {})), dict(raw.get("c", {})), float(raw.get("s", 0.0)), list(raw.get("l", [])))

    def same_as(self, other: Context) -> bool:
        return (self.values, self.campaign, self.links) == (other.values, other.campaign, other.links)


def observed(event: Event) -> Context:
    """The browser context the event itself carries."""
    values = {name: value for name in FIELDS if (value := getattr(event, name))}
    campaign = {key: event.url_params[key] for key in UTM_KEYS if event.url_params.get(key)}
    return Context(values, campaign)


def fill(event: Event, remembered: Sequence[Context | None]) -> dict[str, Any]:
    """What the event lacks and a remembered context has, first record first: {attribute: value}, and
    `campaign` when the event has no utm parameter."""
    found: dict[str, Any] = {}
    for name in FIELDS:
        if getattr(event, name):
            continue
        for context in remembered:
            if context is not None and context.values.get(name):
                found[name] = context.values[name]
                break
    if not any(key in event.url_params for key in UTM_KEYS):
        for context in remembered:
            if context is not None and context.campaign:
                found["campaign"] = dict(context.campaign)
                break
    return found


def apply(event: Event, filled: Mapping[str, Any]) -> None:
    """Put the filled values into the event (the accept path and delivery both do, so they agree)."""
    for name in FIELDS:
        if name in filled:
            setattr(event, name, filled[name])
    if "page_url" in filled or "campaign" in filled:
        params = url_params(event.page_url, None, {}) if "page_url" in filled else dict(event.url_params)
        for key, value in filled.get("campaign", {}).items():
            params.setdefault(key, value)
        event.url_params = params
    event.stitched = described(filled)


def described(filled: Mapping[str, Any]) -> list[str]:
    """The filled fields as the customer names them: ["context.ip", "email", ...]."""
    return [FIELDS[name] for name in FIELDS if name in filled] + ([CAMPAIGN] if "campaign" in filled else [])


def merged(newest: Context, *older: Context | None, seen: float, links: Sequence[str] = ()) -> Context:
    """Values and campaign: the newest non-empty wins. Links are the caller's (never inherited from another id's
    record, so forgetting one person never reaches another), most recent last, up to MAX_LINKS."""
    result = Context(seen=seen, links=list(dict.fromkeys(reversed(links)))[::-1][-MAX_LINKS:])
    for context in reversed([c for c in (newest, *older) if c is not None]):
        result.values.update(context.values)
        result.campaign = context.campaign or result.campaign
    return result


def stitch(event: Event, keys: Sequence[str], records: Sequence[Context | None], *,
           now: float) -> tuple[dict[str, Any], list[tuple[str, Context]]]:
    """Fill the event from the records of its ids (userId's first), and say what to remember under each key.

    Each id's record becomes: the event's own context over that id's record over the linked id's, linked to
    the other ids of the event. Unchanged records are not written again unless older than REFRESH_SECONDS.
    """
    own = observed(event)
    filled = fill(event, records)
    if filled:
        apply(event, filled)
    updates = []
    for index, key in enumerate(keys):
        previous = records[index]
        others = [record for i, record in enumerate(records) if i != index]
        links = [link for link in (previous.links if previous else []) if link not in keys]
        context = merged(own, previous, *others, seen=now, links=links + [k for k in keys if k != key])
        if previous is not None and context.same_as(previous) and now - previous.seen < REFRESH_SECONDS:
            continue
        if context.values or context.campaign or context.links:
            updates.append((key, context))
    return filled, updates


@dataclass(slots=True)
class Stitch:
    filled: dict[str, Any]  # stored with the event so that delivery renders the same bodies
    writes: list[Identity]  # what to remember (with the event's accept, or on its own)


class IdentityKeys:
    """Keyed hashes of (tenant, kind, id): the id itself is never stored, and tenants never meet."""

    def __init__(self, secret: bytes) -> None:
        self._key = derive(secret, b"identity/v1")

    def key(self, tenant: str, kind: str, value: str) -> str:
        message = f"{tenant}\0{kind}\0{value}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()[:40]


class IdentityBook:
    """Reads and writes remembered contexts in the store for the accept path, `forget` for operators."""

    def __init__(self, store: Store, sealer: Sealer, secret: bytes, *, ttl_seconds: float) -> None:
        self.store, self.sealer, self.ttl = store, sealer, ttl_seconds
        self.keys = IdentityKeys(secret)

    async def stitch(self, tenant: str, event: Event, *, now: float, remember: bool = True) -> Stitch:
        """Fill the event from what is remembered for its ids; say what to remember of it."""
        keys = self._keys(tenant, event.user_id, event.anonymous_id)
        records = [self._open(r) for r in await self.store.recall(keys, now=now)] if keys else []
        filled, updates = stitch(event, keys, records, now=now)
        if not remember:
            return Stitch(filled, [])
        return Stitch(filled, [Identity(key, self.sealer.seal(context.pack()), now + self.ttl)
                               for key, context in updates])

    async def forget(self, tenant: str, *, user_id: str | None = None, anonymous_id: str | None = None) -> int:
        """Delete what is remembered for this id and for the ids linked to it."""
        keys = self._keys(tenant, user_id, anonymous_id)
        linked = [link for record in await self.store.recall(keys, now=0.0)
                  if (context := self._open(record)) is not None for link in context.links]
        return await self.store.forget(list(dict.fromkeys(keys + linked)))

    def _keys(self, tenant: str, user_id: str | None, anonymous_id: str | None) -> list[str]:
        """The event's identity keys, userId's first."""
        keys = []
        if user_id:
            keys.append(self.keys.key(tenant, "user", user_id))
        if anonymous_id:
            keys.append(self.keys.key(tenant, "anonymous", anonymous_id))
        return keys

    def _open(self, record: bytes | None) -> Context | None:
        if record is None:
            return None
        try:
            return Context.unpack(self.sealer.open(record))
        except (InvalidTag, ValueError, TypeError, AttributeError):
            log.warning("a remembered identity could not be read (sealed under another secret?): ignored")
            return None
