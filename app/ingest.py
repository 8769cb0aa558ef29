"""The accept path: authenticate, decode settings, normalise, translate, store durably, answer."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from app import metrics
from app.auth import Authenticator
from app.config import Config
from app.crypto import Sealer
from app.errors import BadRequestError, UnavailableError, unreadable_json
from app.event import call_type, parse_event
from app.identity import IdentityBook
from app.keys import KeyRecord
from app.outgoing import preview
from app.settings import from_header, settings_json
from app.store import ALL_TENANTS, Counts, NewJob, Store
from app.stored import pack_event
from app.translate import Routing, Translation, active_vendors, route, summary, translate
from handlers import Vendor

log = logging.getLogger("segrelay.ingest")


@dataclass(slots=True)
class Answer:
    status: int
    body: dict[str, Any]


class Backpressure:
    """Refuses new work (503) when the queue, one tenant's share of it, or the disk is past its bound.

    The queue is bounded in bytes (`SEGRELAY_MAX_QUEUE_MB`), each tenant to `SEGRELAY_TENANT_QUEUE_SHARE` of it, so
    one customer's flood or broken vendor cannot take the room of the others. Refreshed once a second from the
    store's counters (never a scan); in between, what this process accepted is added as it goes.
    """

    def __init__(self, config: Config) -> None:
        self.max_bytes = int(config.max_queue_mb * 1024 * 1024)
        self.tenant_max = int(self.max_bytes * config.tenant_queue_share)
        self.min_free = config.min_free_disk_mb * 1024 * 1024
        self.path = config.sqlite_path.parent if config.sqlite_path else None
        self.queued: dict[str, int] = {}
        self.disk_free: int | None = None

    def refresh(self, counts: Counts) -> None:
        self.queued = dict(counts.queued_bytes)
        if self.path is not None:
            self.disk_free = shutil.disk_usage(self.path).free

    def check(self, tenant: str, adding: int) -> None:
        total = self.queued.get(ALL_TENANTS, 0)
        if total + adding > self.max_bytes:
            raise UnavailableError(f"Delivery queue is full ({total // 1_048_576} MB waiting for vendors); "
                                   f"retry later", retry_after=30)
        mine = self.queued.get(tenant, 0)
        if mine + adding > self.tenant_max:
            raise UnavailableError(f"This destination's share of the delivery queue is full ({mine // 1_048_576} "
                                   f"MB waiting for its vendors); retry later", retry_after=30)
        if self.disk_free is not None and self.disk_free < self.min_free:
            raise UnavailableError("Storage is nearly full; retry later", retry_after=60)

    def add(self, tenant: str, size: int) -> None:
        self.queued[tenant] = self.queued.get(tenant, 0) + size
        self.queued[ALL_TENANTS] = self.queued.get(ALL_TENANTS, 0) + size


def store_too_slow() -> UnavailableError:
    """The 503 for a store slower than SEGRELAY_ACCEPT_TIMEOUT_SECONDS."""
    return UnavailableError("Storage is slow to answer; retry later", retry_after=5)


class Ingest:
    def __init__(self, config: Config, store: Store, sealer: Sealer, authenticator: Authenticator,
                 backpressure: Backpressure, notify: Callable[[str], None]) -> None:
        self.config, self.store, self.sealer = config, store, sealer
        self.identities = IdentityBook(store, sealer, config.secret, ttl_seconds=config.identity_ttl_days * 86_400,
                                       cache_seconds=config.identity_cache_seconds,
                                       timeout=config.accept_timeout_seconds)
        self.authenticator, self.backpressure, self.notify = authenticator, backpressure, notify
        self.draining = False
        self._settings_saved: dict[str, str | None] = {}  # key id -> the settings header last saved for it
        # (settings header, the key's vendors) -> the vendors they enable: the same for every event of a destination
        self._vendors: dict[tuple[str | None, tuple[str, ...]], list[Vendor]] = {}
        self._saving: set[asyncio.Task[None]] = set()

    def check_open(self) -> None:
        if self.draining:
            raise UnavailableError("segrelay is restarting; retry shortly", retry_after=5)

    @staticmethod
    def read(body: bytes) -> tuple[Any, str, str]:
        """The body's JSON, its call type and its messageId as sent (for the request's log line, bounded); a
        ContractError for a body that is not a call we handle (400, 501)."""
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequestError(not_json(body, exc)) from None
        kind = call_type(document)
        return document, kind, _message_id(document)

    async def handle(self, key: KeyRecord, settings_header: str | None, body: bytes, document: Any,
                     kind: str) -> Answer:
        """Everything after authentication and `read`: 200 / 202 or a ContractError (which the caller labels with
        the call type and messageId, as it does the answer: one coroutine less on every event's path)."""
        settings = from_header(settings_header)
        now = time.time()
        event = parse_event(document, body, now, settings.get("defaultCurrency"))
        vendors = self._vendors.get((settings_header, key.vendors))
        if vendors is None:  # first from this destination, or settings that fail (400/403 each time, not kept)
            vendors = active_vendors(settings, key.vendors)
            if len(self._vendors) > 1024:
                self._vendors.clear()
            self._vendors[(settings_header, key.vendors)] = vendors
        dry_run = bool(settings.get("dryRun"))
        stitched: dict[str, Any] = {}
        if settings.get("identityStitching"):
            known = self.identities.stitch_known(key.tenant, event, now=now)
            if known is not None:  # a visitor the book knows, as it was: no coroutine
                stitched = known
            else:
                try:  # the book times its own look-ups: no timer here
                    stitched = await self.identities.stitch_anew(key.tenant, event, now=now, remember=not dry_run)
                except TimeoutError:
                    raise store_too_slow() from None
        if dry_run:
            return Answer(200, self._dry_run(translate(event, settings, vendors), event.stitched))
        routing = route(event, settings, vendors)
        rows = summary(routing)
        answer: dict[str, Any] = {"message": "accepted", "postbacks": rows}
        if event.stitched:
            answer["stitched"] = event.stitched
            for name in event.stitched:
                metrics.add(metrics.labelled(metrics.STITCHED, name))
        if event.warnings:
            answer["warnings"] = event.warnings
        if not routing.vendors:
            answer["warning"] = ("No vendor is configured in this destination's settings: set "
                                 "segmentstreamApiToken, tracifyApiToken and tracifyCustomerSiteId, or audiohookId")
        if not routing.targets:
            _count(routing)
            return Answer(200, answer)
        payload = self.sealer.seal(pack_event(settings_json(settings_header), now, body, key.key_id, stitched))
        queued = len(payload) * len(routing.targets)
        self.backpressure.check(key.tenant, queued)
        name = event.event_name or event.type
        jobs = [NewJob(t.vendor, t.target, name, t.batch_key) for t in routing.targets]
        # Segment gives up after ~10 s: answer 503 well before. If the write still lands later, Segment's retry of
        # this messageId is answered as a duplicate, so the event is kept exactly once.
        try:
            fresh = await self.store.accept(key.tenant, event.message_id, payload, jobs, now=now,
                                            ttl=self.config.idempotency_seconds,
                                            skips=[(k.vendor, k.reason) for k in routing.skips],
                                            timeout=self.config.accept_timeout_seconds)
        except TimeoutError:
            raise store_too_slow() from None
        if not fresh:
            metrics.add(metrics.DUPLICATES)
            return Answer(200, {"message": "duplicate", "messageId": event.message_id})
        self.backpressure.add(key.tenant, queued)
        self._remember_settings(key.key_id, settings_header, now)
        _count(routing)
        for vendor in {t.vendor for t in routing.targets}:
            self.notify(vendor)
        return Answer(202, answer)

    def _remember_settings(self, key_id: str, header: str | None, now: float) -> None:
        """Keep the key's latest settings (sealed) for replays, off the answer's path, when they change."""
        if self._settings_saved.get(key_id, "") == header:
            return
        self._settings_saved[key_id] = header
        sealed = self.sealer.seal(settings_json(header))

        async def save() -> None:
            try:
                await self.store.save_settings(key_id, sealed, now=now)
            except Exception:
                self._settings_saved.pop(key_id, None)  # try again with the next event
                log.warning("could not save the latest settings", exc_info=True)
        task = asyncio.create_task(save())
        self._saving.add(task)
        task.add_done_callback(self._saving.discard)

    def _dry_run(self, translation: Translation, stitched: list[str]) -> dict[str, Any]:
        shown = preview(translation.postbacks, translation.skips, self.config.vendor_urls)
        answer = {"message": "dry run: nothing was queued or sent", "wouldSend": shown["send"],
                  "skipped": shown["skipped"]}
        if stitched:
            answer["stitched"] = stitched
        return answer


def not_json(body: bytes, exc: orjson.JSONDecodeError) -> str:
    """The 400's message for a body that is not JSON: what is wrong and where, so that a customer can find it in the
    event they sent."""
    problem = exc.msg
    if "depth limit" in problem:
        return "Event is nested deeper than 1024 levels"
    if not body.strip():
        return "Request body is empty: expected one Segment call as a JSON object"
    if "not valid UTF-8" in problem:
        return "Request body is not valid UTF-8 (JSON must be UTF-8 encoded)"
    return unreadable_json("Request body is not valid JSON", exc)


def _message_id(document: dict[str, Any]) -> str:
    """The messageId as sent (for the request's log line), bounded."""
    value = document.get("messageId")
    return value[:200] if isinstance(value, str) else ""


def _count(routing: Routing) -> None:
    """Metrics for an event taken on (not for duplicates or dry runs)."""
    queued: dict[str, int] = {}  # a plain dict: collections.Counter costs several µs to build per event
    for target in routing.targets:
        queued[target.vendor] = queued.get(target.vendor, 0) + 1
    for vendor, count in queued.items():
        metrics.add(metrics.labelled(metrics.POSTBACKS, vendor, "queued"), count)
    for skip in routing.skips:
        metrics.add(metrics.labelled(metrics.POSTBACKS, skip.vendor, "skipped"))
        metrics.add(metrics.labelled(metrics.SKIPS, skip.vendor, skip.code))
