"""What is stored for an accepted event, and how a job's postback is rendered from it when it is sent.

The accept path stores the event once: the body exactly as Segment sent it, the resolved settings it came with,
the time it was received and what identity stitching filled in, sealed together. Delivery opens it, parses it
again with the same clock, applies the same stitched fields and builds the vendor's postbacks with the same pure
handler, so the body sent is the body the accept path decided on, without rendering four bodies and sealing four
payloads while Segment waits.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from app.crypto import Sealer
from app.event import Event, parse_event
from app.identity import apply
from app.outgoing import EncodedPostback, encode
from app.store import Job
from handlers import BY_SLUG, VENDORS, Postback, Skip, Vendor

NONCE = 12  # the sealed payload starts with its random AES-GCM nonce
# Parsed events kept by a delivery process: each vendor's jobs for one event share one parse while the vendors'
# queues are within this many events of each other. Bounded by count and by the events' stored bodies (a parsed
# event takes about 3-4 times its body: a typical 2 KB Order Completed about 7 KB, so at most about 130 MB).
CACHE_EVENTS = 16384
CACHE_BODY_BYTES = 32 * 1024 * 1024
CACHE_OUTCOMES = 4096  # a vendor's postbacks for one event, kept only while some of them are still to be sent
# With `every_vendor`: the other vendors' postbacks of the events opened, until their jobs come. Under a backlog
# the vendors' queues drift tens of thousands of events apart (Tracify's batches keep up while SegmentStream's
# queue waits): an Order Completed's entries take about 2 KB each with their bookkeeping (tracemalloc), of which
# about 1.2 KB of encoded bodies, so the bytes bound keeps them to about 85 MB.
KEPT_POSTBACKS = 65536
KEPT_BYTES = 48 * 1024 * 1024
# Once the bounds are reached, no more are built ahead (the next vendor to come needs the oldest, not the newest)
# until some are taken, or until the oldest have waited this long: a job that never comes for them (another
# process took it over) must not keep the room forever. Evicting the oldest instead, a backlog larger than the bounds
# (a 30 s burst: 2.75 parses per event) threw away exactly what the vendor furthest behind was about to take.
KEPT_SECONDS = 300.0
# Nor for a vendor that has rendered nothing new here for this long while the events went this far ahead of it (an
# outage, its breaker open): its postbacks would hold the room for KEPT_SECONDS while the vendors still moving found
# none built ahead. A vendor merely without traffic (every vendor idle between events) is not behind.
STALLED_SECONDS = 10.0
STALLED_LEAD = 1000


@dataclass(frozen=True, slots=True)
class StoredEvent:
    settings: Mapping[str, Any]
    received_at: float
    body: bytes
    key_id: str  # the API key it came with: a replay renders with that key's latest settings
    stitched: Mapping[str, Any] = field(default_factory=dict)  # what identity stitching filled in (app/identity.py)


def pack_event(settings_json: bytes, received_at: float, body: bytes, key_id: str = "",
               stitched: Mapping[str, Any] | None = None) -> bytes:
    """[`+` and the stitched fields as JSON, a newline,] the resolved settings as JSON, a space, the receive time, a
    space, the key id, a newline, then the body as sent (compact JSON has no raw newline, so a newline ends each
    head line; settings JSON starts with `{`, never `+`)."""
    head = [settings_json, b" ", repr(received_at).encode(), b" ", key_id.encode(), b"\n", body]
    return b"".join([b"+", orjson.dumps(stitched), b"\n", *head] if stitched else head)  # one copy of the body


def unpack_event(data: bytes) -> StoredEvent:
    stitched: Mapping[str, Any] = {}
    if data[:1] == b"+":
        filled, _, data = data[1:].partition(b"\n")
        stitched = orjson.loads(filled)
    head, _, body = data.partition(b"\n")
    rest, _, key_id = head.rpartition(b" ")
    settings, _, received_at = rest.rpartition(b" ")
    return StoredEvent(orjson.loads(settings), float(received_at), body, key_id.decode(), stitched)


def with_settings(stored: bytes, settings_json: bytes) -> bytes:
    """A packed event with other settings (a replay after the customer fixed them), the rest kept."""
    event = unpack_event(stored)
    return pack_event(settings_json, event.received_at, event.body, event.key_id, event.stitched)


class Renderer:
    """Turns leased jobs back into postbacks, in wire form.

    `every_vendor` (a store whose delivery processes lease all of an event's jobs in the same process: SQLite's
    share by event): the first job of an event builds the postbacks of every vendor its settings enable, and keeps
    the others' encoded (about 2 KB each with their bookkeeping) until their jobs come, however far the vendors'
    queues drift apart, while the bounds leave room (`_room`) and only for vendors whose jobs are still coming
    (`_coming`); the parsed event is not kept. Otherwise (Redis: any process may lease any job) a job
    builds its own vendor's postbacks, and the parsed event is kept for the event's other vendors' jobs that this
    process may lease.
    """

    def __init__(self, sealer: Sealer, *, every_vendor: bool = False, size: int = CACHE_EVENTS,
                 body_bytes: int = CACHE_BODY_BYTES) -> None:
        self.sealer, self.every_vendor = sealer, every_vendor
        self.opened = 0  # stored events opened and parsed (segrelay_delivery_events_opened_total)
        self.size, self.body_bytes = (0, 0) if every_vendor else (size, body_bytes)
        # Keyed by the event's id and its payload's random nonce: unique to one accepted event, whatever a store
        # does with ids.
        self._events: OrderedDict[tuple[str, bytes], tuple[Event, Mapping[str, Any], int]] = OrderedDict()
        self._event_bytes = 0  # the kept events' body sizes
        # (event, nonce, vendor) -> the vendor's outcomes and the targets of its postbacks not yet rendered.
        self._outcomes: OrderedDict[tuple[str, bytes, str], _Kept] = OrderedDict()
        self._outcome_bytes = 0  # the kept postbacks' encoded bodies
        self.kept_max, self.kept_bytes = ((KEPT_POSTBACKS, KEPT_BYTES) if every_vendor
                                          else (CACHE_OUTCOMES, KEPT_BYTES))
        self._reached: dict[str, int] = {}  # with `every_vendor`: each vendor's highest event id rendered here
        self._moved: dict[str, float] = {}  # ... and when it last rose (time.monotonic())
        self._first: int | None = None  # the first event id rendered here: where a vendor not seen yet stands
        self._started = time.monotonic()

    def render(self, job: Job) -> EncodedPostback | Skip:
        """The job's postback, or a Skip saying why it can no longer be built.

        Raises cryptography's InvalidTag when the payload was sealed under another secret, and what a vendor's
        build or the encoding raises for an event that no longer builds.
        """
        nonce = job.payload[:NONCE]
        key = (job.event_id, nonce, job.vendor)
        number = _event_number(job.event_id) if self.every_vendor else None
        if number is not None and number > self._reached.get(job.vendor, -1):
            self._reached[job.vendor] = number
            self._moved[job.vendor] = time.monotonic()
            if self._first is None:
                self._first = number
        kept = self._outcomes.pop(key, None)
        if kept is None:
            kept = self._build(job, nonce, number)
        else:
            self._outcome_bytes -= kept.size
        kept.waiting.discard(job.target)
        if kept.waiting:
            self._keep(key, kept)
        for outcome in kept.outcomes:
            if isinstance(outcome, EncodedPostback) and outcome.target == job.target:
                return outcome
        reasons = "; ".join(o.reason for o in kept.outcomes if isinstance(o, Skip))
        return Skip(job.vendor, "not_rendered", reasons or f"{job.vendor} has no {job.target} postback for it")

    def _build(self, job: Job, nonce: bytes, number: int | None) -> _Kept:
        """The job's vendor's outcomes; with `every_vendor`, while there is room, those of the other enabled vendors
        whose jobs for this event have not come yet (no later event of theirs rendered here) are built and kept too."""
        event, settings = self._event(job, nonce)
        own = _built(BY_SLUG[job.vendor], event, settings)
        if self.every_vendor:
            for vendor in VENDORS:
                key = (job.event_id, nonce, vendor.slug)
                if (vendor.slug == job.vendor or key in self._outcomes or not vendor.is_active(settings)
                        or not self._coming(vendor.slug, number) or not self._room()):
                    continue
                try:
                    kept = _built(vendor, event, settings)
                except Exception:  # noqa: S112  # that vendor's own job meets the error and dead-letters itself
                    continue
                if kept.waiting and self._room(kept.size):
                    self._keep(key, kept)
        return own

    def _coming(self, vendor: str, number: int | None) -> bool:
        """Whether `vendor`'s job for the event numbered `number` is still to come here, soon enough: the vendor has
        rendered no later event (its job for this one is then most likely done), and has not stalled (nothing new
        rendered for STALLED_SECONDS while the events went more than STALLED_LEAD ahead of it)."""
        if number is None or self._first is None:  # (`render` notes the first number before any build)
            return True
        seen = self._reached.get(vendor)
        if seen is not None and seen >= number:
            return False
        behind = number - (self._first if seen is None else seen)  # a vendor not seen yet: from the first event
        return behind <= STALLED_LEAD or time.monotonic() - self._moved.get(vendor, self._started) < STALLED_SECONDS

    def _room(self, size: int = 0) -> bool:
        """Whether postbacks of `size` bytes built ahead fit in the bounds, once those kept past KEPT_SECONDS are
        let go."""
        outcomes, stale = self._outcomes, time.monotonic() - KEPT_SECONDS
        while outcomes and next(iter(outcomes.values())).at < stale:
            self._outcome_bytes -= outcomes.popitem(last=False)[1].size
        return len(outcomes) < self.kept_max and self._outcome_bytes + size <= self.kept_bytes

    def _keep(self, key: tuple[str, bytes, str], kept: _Kept) -> None:
        """Keep `kept` (the oldest make way for it: a vendor's own postbacks still to come in this lease)."""
        if not kept.at:
            kept.at = time.monotonic()
        self._outcomes[key] = kept
        self._outcome_bytes += kept.size
        while len(self._outcomes) > self.kept_max or self._outcome_bytes > self.kept_bytes:
            self._outcome_bytes -= self._outcomes.popitem(last=False)[1].size

    def _event(self, job: Job, nonce: bytes) -> tuple[Event, Mapping[str, Any]]:
        event_key = (job.event_id, nonce)
        found = self._events.get(event_key)
        if found is None:
            stored = unpack_event(self.sealer.open(job.payload))
            self.opened += 1
            document = orjson.loads(stored.body)
            now = datetime.fromtimestamp(stored.received_at, UTC)
            event = parse_event(document, stored.body, now, stored.settings.get("defaultCurrency"))
            if stored.stitched:
                apply(event, stored.stitched)
            if not self.size:
                return event, stored.settings
            found = self._events[event_key] = (event, stored.settings, len(stored.body))
            self._event_bytes += len(stored.body)
            while len(self._events) > self.size or self._event_bytes > self.body_bytes:
                self._event_bytes -= self._events.popitem(last=False)[1][2]
        return found[0], found[1]


def _event_number(event_id: str) -> int | None:
    """SQLite's event ids are numbers that grow with each accepted event."""
    return int(event_id) if event_id.isdigit() else None


@dataclass(slots=True)
class _Kept:
    """A vendor's outcomes for one event, the targets whose postbacks are still to be rendered, their bytes, and
    when they were first kept (time.monotonic())."""

    outcomes: list[EncodedPostback | Skip]
    waiting: set[str]
    size: int
    at: float = 0.0


def _built(vendor: Vendor, event: Event, settings: Mapping[str, Any]) -> _Kept:
    outcomes = [encode(o) if isinstance(o, Postback) else o for o in vendor.build(event, settings)]
    postbacks = [o for o in outcomes if isinstance(o, EncodedPostback)]
    return _Kept(outcomes, {o.target for o in postbacks}, sum(len(o.content) for o in postbacks))
