"""Identity stitching: remember each visitor's browser context, and fill server-side events from it.

A purchase sent from a backend (analytics-python, a CRM, a webhook) has no ip, user agent or page url, so the
attribution vendors could not credit it. For each tenant, segrelay remembers per `userId` and per `anonymousId`
the latest browser context seen on any event (ip, user agent, page url, referrer, campaign, email, the browser's
anonymousId, and when), and an event lacking some of them gets them from its `userId`'s record, else its
`anonymousId`'s, before the vendors' rules run. An event carrying both ids (identify, and every call analytics.js
makes after it) links them: the merged context is remembered under both.

Privacy: records are keyed by a keyed hash of (tenant, kind, id) under a key derived from the server secret (the id is
never stored, and one tenant can never read another's), sealed like payloads (AES-GCM), expire after
`SEGRELAY_IDENTITY_TTL_DAYS` and are bounded in number (`SEGRELAY_MAX_IDENTITIES`). `segrelay identities forget`
deletes one person's records. The setting `identityStitching: false` turns it off for a destination.

The pure part (`stitch` and its helpers) has no I/O: `segrelay translate` runs it over a file of events in memory;
`IdentityBook` reads and writes the store for the accept path.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag

from app.crypto import Sealer, derive
from app.event import UTM_KEYS, Event, url_params
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
MAX_LINKS = 8  # ids of the other kind remembered per record (for `forget`)
REFRESH_SECONDS = 86_400.0  # an unchanged record is written again (its expiry pushed back) at most this often
FLUSH_SECONDS = 0.25  # what events teach is written in batches this often
CACHE_SIZE = 20_000  # contexts kept in memory per process (about 1 KB each)
MAX_PENDING = 50_000  # unwritten contexts kept while the store refuses writes; the oldest go past it
CACHE_SECONDS = 5.0  # ...and trusted this long before the store is asked again (SEGRELAY_IDENTITY_CACHE_SECONDS)


@dataclass(slots=True, eq=False)  # compared by identity where it matters (IdentityBook's fast path)
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


NOTHING = Context()  # a look-up that found no record (cached like one that did)


@dataclass(slots=True)
class _Seen:
    keys: list[str]
    contexts: list[Context | None]
    signature: tuple[Any, ...]
    filled: dict[str, Any]


def _signature(event: Event) -> tuple[Any, ...]:
    """What of the event's own context stitching reads (the ids are the visitor's key)."""
    params = event.url_params
    return (event.ip, event.user_agent, event.page_url, event.referrer, event.email,
            *(params.get(key) for key in UTM_KEYS))


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
    kept = list(links) if len(set(links)) == len(links) else list(dict.fromkeys(reversed(links)))[::-1]
    result = Context({}, {}, seen, kept[-MAX_LINKS:])
    for context in (*reversed(older), newest):
        if context is not None:
            result.values.update(context.values)
            result.campaign = context.campaign or result.campaign
    return result


def stitch(event: Event, keys: Sequence[str], records: Sequence[Context | None], *,
           now: float) -> tuple[dict[str, Any], list[tuple[str, Context]]]:
    """Fill the event from the records of its ids (userId's first), and say what to remember under each key.

    Each id's record becomes: the event's own context over that id's record over the linked id's, linked to
    the other ids of the event. A record that already holds all of that (`_covers`) is not written again unless
    older than REFRESH_SECONDS.
    """
    own = observed(event)
    filled = fill(event, records)
    if filled:
        apply(event, filled)
    updates = []
    for index, key in enumerate(keys):
        previous = records[index]
        others = [record for i, record in enumerate(records) if i != index]
        other_keys = [k for k in keys if k != key]
        if previous is not None and now - previous.seen < REFRESH_SECONDS and _covers(previous, own, others,
                                                                                      other_keys):
            continue  # a returning visitor with nothing new: the common case, decided without building a record
        links = [link for link in (previous.links if previous else []) if link not in keys]
        context = merged(own, previous, *others, seen=now, links=links + other_keys)
        if context.values or context.campaign or context.links:
            updates.append((key, context))
    return filled, updates


def _covers(previous: Context, own: Context, others: Sequence[Context | None], other_keys: Sequence[str]) -> bool:
    """Whether `previous` already holds all that merging would give it (then nothing needs writing)."""
    values = previous.values
    if any(values.get(name) != value for name, value in own.values.items()):
        return False
    if own.campaign and own.campaign != previous.campaign:
        return False
    if any(key not in previous.links for key in other_keys):
        return False
    for other in others:
        if other is not None and (any(name not in values for name in other.values)
                                  or (other.campaign and not previous.campaign)):
            return False
    return True


class IdentityKeys:
    """Keyed hashes (BLAKE2b with a key derived from the server secret, 128 bits) of (tenant, kind, id): the id
    itself is never stored, and tenants never meet."""

    def __init__(self, secret: bytes) -> None:
        self._key = derive(secret, b"identity/v1")

    def key(self, tenant: str, kind: str, value: str) -> str:
        return hashlib.blake2b(f"{tenant}\0{kind}\0{value}".encode(), digest_size=16, key=self._key).hexdigest()


class IdentityBook:
    """Reads and writes remembered contexts in the store: for the accept path, and `forget` for operators.

    Writes are behind: what an event teaches is kept in memory (the latest per key) and written in one batch every
    FLUSH_SECONDS, off the answer's path; this process's own look-ups see it at once, other replicas within
    FLUSH_SECONDS. A crash may lose that last fraction of a second of remembered context, never an event.
    Reads go to the store only for keys this process has not read or written in the last `cache_seconds`.
    """

    def __init__(self, store: Store, sealer: Sealer, secret: bytes, *, ttl_seconds: float,
                 flush_seconds: float = FLUSH_SECONDS, cache_seconds: float = CACHE_SECONDS,
                 timeout: float = 3.0) -> None:
        self.store, self.sealer, self.ttl, self.flush_seconds = store, sealer, ttl_seconds, flush_seconds
        self.cache_seconds, self.timeout = cache_seconds, timeout
        self.keys = IdentityKeys(secret)
        self._pending: dict[str, tuple[Context, float]] = {}  # key -> (context, expires at): sealed when written
        self._flusher: asyncio.Task[None] | None = None
        # Recently read or written contexts (a returning visitor's events come in bursts): key -> (context, when
        # cached, the sealed record it was read from or written as: when the store still holds those very bytes, a
        # re-read needs no decryption and the context stays the same object)
        self._recent: OrderedDict[str, tuple[Context, float, bytes | None]] = OrderedDict()
        # The last event of each visitor (tenant, userId, anonymousId): its keys, the contexts it met, what it
        # carried and what it was given. A visitor's next event with the same context is stitched without hashing
        # or reading, as long as those contexts are still the ones this process knows.
        self._seen: dict[tuple[str, str | None, str | None], _Seen] = {}
        self._wanted: list[tuple[list[str], asyncio.Future[list[bytes | None]]]] = []  # recalls of this turn
        self._recalling: set[asyncio.Task[None]] = set()

    def stitch_known(self, tenant: str, event: Event, *, now: float) -> dict[str, Any] | None:
        """`stitch` for the usual case, without a coroutine: the same visitor with the same context and nothing
        learned since gets the same fill and nothing to write. None when `stitch` must look further."""
        seen = self._seen.get((tenant, event.user_id, event.anonymous_id))
        if seen is None or seen.signature != _signature(event):
            return None
        for key, context in zip(seen.keys, seen.contexts, strict=True):
            if self._known(key, now) is not context:
                return None
        if seen.filled:
            apply(event, seen.filled)
        return seen.filled

    async def stitch(self, tenant: str, event: Event, *, now: float, remember: bool = True) -> dict[str, Any]:
        """Fill the event from what is remembered for its ids, and remember what it teaches. Returns what was
        filled (stored with the event, so that delivery renders the same bodies)."""
        same = self.stitch_known(tenant, event, now=now)
        if same is not None:
            return same
        return await self.stitch_anew(tenant, event, now=now, remember=remember)

    async def stitch_anew(self, tenant: str, event: Event, *, now: float, remember: bool = True) -> dict[str, Any]:
        """`stitch` once `stitch_known` has found nothing to reuse: read what the store remembers for the event's
        ids when this process does not know it lately, fill, and remember."""
        visitor = (tenant, event.user_id, event.anonymous_id)
        signature = _signature(event)
        keys = self._keys(tenant, event.user_id, event.anonymous_id)
        if not keys:
            return {}
        known = [self._known(key, now) for key in keys]
        records: list[Context | None] = [None if context is NOTHING else context for context in known]
        if None in known:
            async with asyncio.timeout(self.timeout):  # TimeoutError: the caller answers 503
                stored = await self._recall(keys, now)
            for index, record in enumerate(stored):
                if known[index] is None:
                    records[index] = self._reread(keys[index], record, now)
        filled, updates = stitch(event, keys, records, now=now)
        if remember and updates:
            for key, context in updates:
                self._pending[key] = (context, now + self.ttl)
                self._cache(key, context, now)
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.create_task(self._flush_later(), name="identity-flush")
        if remember:
            self._seen[visitor] = _Seen(keys, [self._known(key, now) for key in keys], signature, filled)
            if len(self._seen) > CACHE_SIZE:
                self._seen.pop(next(iter(self._seen)))
        return filled

    def _recall(self, keys: list[str], now: float) -> asyncio.Future[list[bytes | None]]:
        """The store's records for these keys, asked together with every other request's that wants some in the
        same turn of the event loop: one round trip for a burst of requests instead of one each."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[bytes | None]] = loop.create_future()
        self._wanted.append((keys, future))
        if len(self._wanted) == 1:
            loop.call_soon(self._start_recall, now)
        return future

    def _start_recall(self, now: float) -> None:
        wanted, self._wanted = self._wanted, []
        task = asyncio.ensure_future(self._recall_all(wanted, now))
        self._recalling.add(task)
        task.add_done_callback(self._recalling.discard)

    async def _recall_all(self, wanted: list[tuple[list[str], asyncio.Future[list[bytes | None]]]],
                          now: float) -> None:
        keys = list(dict.fromkeys(key for group, _ in wanted for key in group))
        try:
            found = dict(zip(keys, await self.store.recall(keys, now=now), strict=True))
        except Exception as exc:
            for _, future in wanted:
                if not future.done():
                    future.set_exception(exc)
            return
        for group, future in wanted:
            if not future.done():
                future.set_result([found[key] for key in group])

    def _known(self, key: str, now: float) -> Context | None:
        """What this process wrote or read lately (NOTHING: the store had no record), or None: ask the store.
        Read again after `cache_seconds`, since other replicas may have learned more, or `identities forget`
        deleted it."""
        pending = self._pending.get(key)
        if pending is not None:
            return pending[0]
        recent = self._recent.get(key)
        if recent is not None and now - recent[1] < self.cache_seconds:
            return recent[0]
        return None

    def _reread(self, key: str, record: bytes | None, now: float) -> Context | None:
        """A record just read from the store: the cached context when the store holds the same bytes."""
        previous = self._recent.get(key)
        if previous is not None and record is not None and previous[2] == record:
            self._cache(key, previous[0], now, record)
            return previous[0]
        context = self._open(record)
        self._cache(key, context or NOTHING, now, record)
        return context

    def _cache(self, key: str, context: Context, now: float, sealed: bytes | None = None) -> None:
        self._recent[key] = (context, now, sealed)
        self._recent.move_to_end(key)
        if len(self._recent) > CACHE_SIZE:
            self._recent.popitem(last=False)

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.flush_seconds)
        await self.flush()

    async def close(self) -> None:
        """Write what is pending, and stop the timer."""
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        await self.flush()

    async def flush(self) -> None:
        """Write what is pending (at shutdown too). On a store error the batch waits for the next event."""
        batch, self._pending = self._pending, {}
        if not batch:
            return
        identities = [Identity(key, self.sealer.seal(context.pack()), expires_at)
                      for key, (context, expires_at) in batch.items()]
        try:
            await self.store.remember(identities)
        except BaseException as exc:
            for key, value in batch.items():  # back for the next try
                self._pending.setdefault(key, value)
            if not isinstance(exc, Exception):  # close() cancelled the timer's write: close() writes it
                raise
            excess = len(self._pending) - MAX_PENDING
            for key in list(self._pending)[:max(0, excess)]:  # bounded memory while the store is away
                del self._pending[key]
            log.warning("could not write remembered identities; kept for the next try",
                        extra={"pending": len(self._pending), "dropped": max(0, excess)}, exc_info=True)
            return
        for identity in identities:
            recent = self._recent.get(identity.key)
            if recent is not None and recent[0] is batch[identity.key][0]:
                self._recent[identity.key] = (recent[0], recent[1], identity.record)

    async def forget(self, tenant: str, *, user_id: str | None = None, anonymous_id: str | None = None) -> int:
        """Delete what is remembered for this id and for the ids linked to it."""
        keys = self._keys(tenant, user_id, anonymous_id)
        linked = [link for record in await self.store.recall(keys, now=0.0)
                  if (context := self._open(record)) is not None for link in context.links]
        doomed = list(dict.fromkeys(keys + linked))
        for key in doomed:
            self._pending.pop(key, None)
            self._recent.pop(key, None)
        self._seen.clear()
        return await self.store.forget(doomed)

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
