"""The store: API keys, idempotency records, the delivery queue (leases, due times), dead letters and counters.

One `Store` protocol, two implementations: `sqlite` (embedded, shared by the processes of one machine) and `redis`
(shared by many replicas). The shared test suite in tests/test_store.py runs against both.

An accepted event is stored **once**: its sealed payload (the body as Segment sent it and the settings it came
with), and one small job per postback to send (vendor, target, due time, attempts). Bodies are rendered from the
payload when they are leased. A job moves through: accepted (due now) -> leased (due again when the lease expires)
-> completed (gone), retried (due later, attempts + 1), released (due now or later, attempts unchanged) or buried
(dead letter). The event's payload goes when its last job is completed.

Remembered identities (identity stitching, app/identity.py) live beside the queue: one sealed record per keyed hash
of (tenant, userId or anonymousId), expiring on their own and bounded in number by housekeeping.

Counters are kept incrementally in the same transactions (never counted by a scan): postbacks pending and dead
per vendor, and bytes queued per tenant and in all, which bound the queue (`SEGRELAY_MAX_QUEUE_MB`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from app.keys import KeyRecord

log = logging.getLogger("segrelay.store")
ALL_TENANTS = "*"  # the bytes counter of every tenant together
MAX_IDENTITIES = 1_000_000  # remembered identities kept at most (SEGRELAY_MAX_IDENTITIES); the oldest go first


@dataclass(frozen=True, slots=True)
class Identity:
    """One remembered browser context, as stored: never the id itself, never in clear."""

    key: str  # keyed hash of (tenant, kind, id), 32 hex digits: app/identity.py
    record: bytes  # sealed
    expires_at: float


@dataclass(slots=True)
class NewJob:
    vendor: str
    target: str  # which endpoint of the vendor (handlers' Postback.target)
    event_name: str
    batch_key: str  # jobs of one vendor with the same non-empty key may share a request


@dataclass(slots=True)
class Job:
    id: str
    event_id: str
    vendor: str
    target: str
    tenant: str
    message_id: str
    event_name: str
    batch_key: str
    payload: bytes  # the event's sealed payload
    attempts: int  # attempts made before this lease
    created_at: float
    size: int  # bytes this job counts in the queue bound
    receipt: str = ""  # implementation-specific handle of the lease


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str
    vendor: str
    tenant: str
    message_id: str
    event_name: str
    attempts: int
    last_status: int | None  # the vendor's HTTP status; None for a network error or a refusal of ours
    last_body: str  # the vendor's answer (truncated), or what went wrong
    created_at: float
    died_at: float


@dataclass(frozen=True, slots=True)
class Outcome:
    """One postback of one event, as `segrelay trace` shows it."""

    tenant: str
    vendor: str
    target: str  # "" for a vendor that skipped the event
    state: str  # queued, retrying, leased, delivered, dead, skipped
    attempts: int = 0
    status: int | None = None  # the vendor's last HTTP status
    detail: str = ""  # skip reason, or the vendor's last answer
    at: float | None = None  # delivered or died at
    next_at: float | None = None  # next attempt (queued, retrying) or lease end


@dataclass(slots=True)
class VendorStats:
    pending: int = 0  # waiting, due now or later
    leased: int = 0  # being sent
    due: int = 0  # pending and due now
    dead: int = 0


@dataclass(slots=True)
class QueueStats:
    vendors: dict[str, VendorStats] = field(default_factory=dict)

    def total(self, name: str) -> int:
        return sum(getattr(v, name) for v in self.vendors.values())


@dataclass(slots=True)
class Counts:
    """What the counters say, read in O(tenants + vendors): never a scan of the queue."""

    pending: dict[str, int] = field(default_factory=dict)  # by vendor: not yet delivered or buried
    dead: dict[str, int] = field(default_factory=dict)  # by vendor
    queued_bytes: dict[str, int] = field(default_factory=dict)  # by tenant, and ALL_TENANTS
    identities: int = 0  # remembered identities


class StoreError(Exception):
    """The store refused an operation."""


class StoreUnavailableError(StoreError):
    """The store cannot be reached right now: the request should be retried (503)."""


class Store(Protocol):
    # True when a delivery process's leases bring every vendor's jobs of the events it leases (SQLite's share by
    # event id): it then builds all of an event's postbacks at its first job (app/stored.py, `Renderer`).
    leases_by_event: bool

    async def ping(self) -> None: ...
    async def close(self) -> None: ...
    async def durability_problems(self) -> list[str]:
        """What in the store's own configuration could lose an accepted event (empty when nothing)."""
        ...

    async def tuning_advice(self) -> list[str]:
        """What in the store's own configuration costs CPU that segrelay's data does not need (empty when nothing
        or when the store does not say)."""
        ...

    async def save_key(self, record: KeyRecord) -> None: ...
    async def find_key(self, key_id: str) -> KeyRecord | None: ...
    async def list_keys(self) -> list[KeyRecord]: ...
    async def revoke_key(self, key_id: str) -> bool: ...

    def accept(self, tenant: str, message_id: str, payload: bytes, jobs: Sequence[NewJob], *, now: float,
               ttl: float, skips: Sequence[tuple[str, str]] = (), timeout: float | None = None) -> Awaitable[bool]:
        """Remember (tenant, message_id) for ttl seconds, store the payload once and queue its jobs, atomically.
        `skips` (vendor, reason) are kept for `trace` as long as the idempotency record.

        Awaited: False, and nothing stored, when the pair was already seen within its ttl. TimeoutError when the
        store has not answered within `timeout` seconds: the write may still land (a retry of the event is then a
        duplicate). Not a coroutine function: on the accept path each store returns the future of its pipelined
        answer itself (one coroutine less for every event to create and resume)."""
        ...

    async def recall(self, keys: Sequence[str], *, now: float) -> list[bytes | None]:
        """The sealed records of these identity keys (None where none is remembered or it expired). A read that
        the accept path makes: one round trip, no write lock."""
        ...

    async def remember(self, identities: Sequence[Identity]) -> None:
        """Insert or replace these records (a batch: app/identity.py writes behind)."""
        ...

    async def forget(self, keys: Sequence[str]) -> int:
        """Delete these identities now; returns how many there were."""
        ...

    async def trace(self, message_id: str, tenant: str | None = None) -> list[Outcome]:
        """What became of one event, per postback: queued, retrying, leased, delivered, dead or skipped."""
        ...

    async def lease(self, vendor: str, *, now: float, limit: int, lease_seconds: float,
                    every_share: bool = False, skip_tenants: Collection[str] = ()) -> list[Job]:
        """Up to `limit` due jobs of one vendor, leased: they are due again once a lease expires.

        Every caller passes the same lease_seconds (SEGRELAY_LEASE_SECONDS): Redis applies it when it takes
        over an idle entry, SQLite when it hands one out. `every_share`: where delivery processes share the queue
        by event (`leases_by_event`), look at every process's share, not this one's first (a look past blocked
        tenants for another tenant's jobs, which must not wait for another process's look). `skip_tenants`: that
        look's blocked tenants, whose jobs it does not want: SQLite passes over them; Redis's streams cannot, so
        it leases them as they come and the caller hands them back.
        """
        ...
    async def complete(self, jobs: Sequence[Job], *, status: int | None = None, now: float = 0.0) -> None:
        """Delivered: the jobs go, their outcome (the vendor's status, when) stays for `trace`."""
        ...
    async def retry(self, job: Job, *, due_at: float, status: int | None, body: str) -> None: ...
    async def release(self, jobs: Sequence[Job], *, due_at: float) -> None:
        """Hand leased jobs back without counting an attempt."""
        ...

    async def bury(self, job: Job, *, now: float, status: int | None, body: str) -> None: ...

    async def dead_letters(self, vendor: str | None = None, limit: int = 100) -> list[DeadLetter]: ...
    async def replay(self, ids: Sequence[str] | None, *, now: float) -> int:
        """Queue dead letters again (all when ids is None), attempts reset; returns how many."""
        ...

    async def save_settings(self, key_id: str, sealed: bytes, *, now: float) -> None:
        """Remember the latest settings (sealed) an API key's events came with: what a replay renders with."""
        ...

    async def latest_settings(self, key_id: str) -> bytes | None: ...

    async def dead_letter_payload(self, job_id: str) -> tuple[str, bytes] | None:
        """(event id, sealed payload) of a dead letter, or None when there is no such dead letter."""
        ...

    async def replace_payload(self, event_id: str, payload: bytes) -> None: ...

    async def fan_out(self) -> int:
        """Write the jobs of every event accepted since delivery last leased (a lease does it first, for every
        vendor); how many events. For operators and benchmarks: delivery needs no call of its own."""
        ...

    async def stats(self, *, now: float) -> QueueStats:
        """Exact figures per vendor, for operators (`segrelay queue stats`): may scan, never on a hot path."""
        ...

    async def counts(self) -> Counts:
        """The incremental counters: cheap at any queue depth."""
        ...

    async def oldest_due(self, *, now: float) -> dict[str, float]:
        """Per vendor, how long the longest-waiting due postback has been due (seconds; 0 when none). An index
        lookup, not a scan."""
        ...

    async def recover_leases(self, *, now: float) -> int:
        """At boot: make the leases of a crashed predecessor due now, where the store cannot tell on its own."""
        ...

    async def housekeeping(self, *, now: float, keep_seconds: float = 7 * 86_400,
                           max_identities: int = MAX_IDENTITIES) -> None:
        """Periodic upkeep: expire idempotency records and identities, keep at most `max_identities` (the
        oldest go), recover expired leases where needed. Bounded work per call."""
        ...


async def check_durability(store: Store, *, allow_unsafe: bool) -> None:
    """Refuse to start on a store configured to lose events, unless the operator accepted the risk
    (SEGRELAY_REDIS_UNSAFE=1)."""
    problems = await store.durability_problems()
    if not problems:
        return
    if allow_unsafe:
        log.warning("store may lose accepted events (SEGRELAY_REDIS_UNSAFE=1)", extra={"problems": problems})
        return
    message = ("refusing to start: " + "; ".join(problems) + ". Fix the store, or set SEGRELAY_REDIS_UNSAFE=1 to "
               "start anyway and accept that a Redis restart or eviction loses events")
    log.error(message)
    raise StoreError(message)


def open_store(url: str, *, consumer: str = "", durable: bool = True, slot: int | None = None,
               accept_writer: str | None = None) -> Store:
    """durable=False lets SQLite skip the fsync of this connection's commits (delivery's own bookkeeping); `slot`
    numbers the processes that share one SQLite file (their turns at its write lock; app/store/sqlite_writers.py);
    `accept_writer`: the socket of the process that stores accepts for every HTTP process (SQLite)."""
    if url.startswith("sqlite:///"):
        from app.store.sqlite import SQLiteStore

        return SQLiteStore(url.removeprefix("sqlite:///"), durable=durable, slot=slot, accept_writer=accept_writer)
    from app.store.redis import RedisStore

    return RedisStore(url, consumer=consumer)
