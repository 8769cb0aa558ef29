"""The distributed store: Redis shared by any number of replicas.

Layout (prefix `segrelay:`):
  key:<key_id>          hash   API key record            keys            set of key ids
  seen:<tenant>:<msg>   string expiry time, with a TTL   (idempotency)
  event:<id>            hash   the accepted event, once: tenant, message_id, payload (sealed), left (jobs not done)
  accepted              stream one entry per accepted event whose jobs are not written yet: its id, tenant,
                               message id, time, ttl, size, routes and skips (JSON); the next lease writes its jobs
                               (`FAN_OUT` in app/store/redis_scripts.py) and deletes the entry
  jobs:<vendor>         stream one entry per due job, carrying the job (its id: the event's id, a dot and its number;
                               event, target, tenant, event name, batch key, size, attempts, message id...), consumer
                               group `workers`; a leased job is one in the group's pending list; XAUTOCLAIM takes
                               over the entries of a dead replica
  stream:<vendor>       stream 0.13.10's: an entry per due job with only its id (the job in its hash); read by leases
                               until it is empty, never written (a 0.13.10 replica would drop an entry it cannot read)
  job:<id>              hash   a job waiting for its retry or dead: its entry's fields and its last answer
  delayed:<vendor>      zset   job ids waiting for their retry time (score = due time)
  dead:<vendor>         zset   dead-lettered job ids (score = time of death)
  counters              hash   pending:<vendor>, dead:<vendor>, bytes:<tenant>, bytes:* (kept by the scripts)
  settings              hash   API key id -> the latest settings its events came with (sealed): what replays use
  trace:<msg>           hash   tenant|vendor|target -> what became of that postback (JSON), expiring with `seen`
  identity:<key>        string a remembered browser context (sealed), expiring on its own
  identities            zset   identity keys by expiry time: how many there are, and which go first past the bound

Accepting an event (idempotency record + event + its `accepted` entry + counters) is one Lua script, so it is
atomic (one call stores the accepts of one event loop turn, each as if alone: `TurnBatch`); so are fanning out,
leasing, completing, retrying and burying jobs (the scripts are app/store/redis_scripts.py). A store written by
0.13.10 or before (a hash per job, stream entries with only its id) is read as it is, and its replicas may run beside
this version's during a rolling upgrade: this version delivers what they accept, and they never meet an entry they
cannot read (the events accepted here are delivered by replicas of this version). Needs one Redis primary (not
Cluster) with AOF persistence; see the README.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Collection, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.ids import new_id
from app.keys import KeyRecord
from app.store import (
    ALL_TENANTS,
    MAX_IDENTITIES,
    Counts,
    DeadLetter,
    Identity,
    Job,
    NewJob,
    Outcome,
    QueueStats,
    StoreError,
    StoreUnavailableError,
    VendorStats,
)
from app.store import redis_scripts as scripts
from app.store.redis_pipe import RedisPipe
from app.store.turn_batch import TurnBatch
from handlers import VENDORS

P = "segrelay:"
GROUP = "workers"
COUNTERS = P + "counters"
IDENTITIES = P + "identities"
HOUSEKEEPING_BATCH = 2000  # identities evicted per round past their bound
HOUSEKEEPING_ROUNDS = 16  # rounds per housekeeping call, at most (as on SQLite)
POOL_SIZE = 64  # connections per process; more concurrent calls wait for one (redis-py's own pool fails at 100)
POOL_WAIT_SECONDS = 10.0  # a call waiting longer for a connection fails as unavailable (503)
ACCEPT_BATCH = 64  # accepts per script call at most (those of one event loop turn)
ACCEPTED = P + "accepted"  # the stream of accepted events whose jobs are not written yet
FAN_OUT_EVENTS = 16  # accepted events whose jobs one lease (or one fan-out call) writes at most
OLDEST_UNFANNED = 64  # events not yet fanned out that `oldest_due` looks at (as on SQLite)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisStore:
    leases_by_event = False  # a vendor's stream is read by every consumer: any process may lease any job

    def __init__(self, url: str, *, consumer: str = "") -> None:
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=POOL_SIZE, timeout=POOL_WAIT_SECONDS, decode_responses=False,
            health_check_interval=30, socket_timeout=10, socket_connect_timeout=5)
        self.client = aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes it
        self.consumer = consumer or uuid.uuid4().hex[:12]
        self._lease = self.client.register_script(scripts.LEASE)
        self._move = self.client.register_script(scripts.MOVE)
        self._complete = self.client.register_script(scripts.COMPLETE)
        self._replay = self.client.register_script(scripts.REPLAY)
        self._fan_out = self.client.register_script(scripts.FAN_OUT)
        self._remember = self.client.register_script(scripts.REMEMBER)
        self._groups: set[str] = set()
        # Per vendor: where this process's next look for a dead replica's idle entries starts, and not before when
        self._claims: dict[str, tuple[str, float]] = {}
        self._accepts = TurnBatch(self._accept_batch, limit=ACCEPT_BATCH)
        # The accept path's calls (accept scripts, identity look-ups): one pipelined connection of their own
        self._pipe = RedisPipe(pool, connect_timeout=5, reply_timeout=10)
        self._accept_sha = hashlib.sha1(scripts.ACCEPT.encode(), usedforsecurity=False).hexdigest()  # its name

    async def _group(self, vendor: str) -> str:
        """The vendor's `jobs` stream, with its consumer group."""
        return await self._grouped(f"{P}jobs:{vendor}", create=True)

    async def _grouped(self, stream: str, *, create: bool) -> str:
        """`stream`, its consumer group made once per process (the stream too when `create`)."""
        if stream not in self._groups:
            try:
                await self.client.xgroup_create(stream, GROUP, id="0", mkstream=create)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self._groups.add(stream)
        return stream

    async def _streams(self, vendor: str) -> list[str]:
        """The vendor's job streams, for operators: its `jobs` stream, and 0.13.10's `stream` while it exists (with
        its group, which LEASE makes too when a 0.13.10 replica's accepts wrote the stream before any lease)."""
        streams = [await self._group(vendor)]
        legacy = f"{P}stream:{vendor}"
        if await self.client.exists(legacy):
            streams.append(await self._grouped(legacy, create=False))
        return streams

    async def ping(self) -> None:
        try:
            await self.client.ping()
        except RedisError as exc:
            raise StoreError(f"redis: {type(exc).__name__}") from None

    async def durability_problems(self) -> list[str]:
        """AOF on and no eviction (INFO works where CONFIG is disabled, as on managed Redis)."""
        try:
            persistence = await self.client.info("persistence")
            memory = await self.client.info("memory")
        except RedisError as exc:
            raise StoreUnavailableError(f"redis: {type(exc).__name__}") from None
        problems = []
        if str(persistence.get("aof_enabled", "0")) != "1":
            problems.append("AOF persistence is off: set `appendonly yes` (without it a restart of Redis loses "
                            "every queued event)")
        policy = str(memory.get("maxmemory_policy", ""))
        if policy != "noeviction":
            problems.append(f"maxmemory-policy is {policy}: set `maxmemory-policy noeviction` (an evicted key is "
                            f"a lost event or a forgotten duplicate)")
        return problems

    async def tuning_advice(self) -> list[str]:
        """`rdbcompression yes` (Redis's default) makes every AOF rewrite try to compress each value, and what
        segrelay stores is mostly ciphertext, which does not compress: on a store filled by 34,000 accepts a rewrite
        took 1.34-1.41 s with it and 0.71 s without, for a file 8 % larger (README, Redis). Read with CONFIG GET,
        which a managed Redis may refuse: then nothing is said."""
        try:
            compression = await self.client.config_get("rdbcompression")
        except RedisError:
            return []
        if str(compression.get("rdbcompression", "")).lower() == "yes":
            return ["rdbcompression is yes: set `rdbcompression no` (segrelay's stored values are encrypted and do "
                    "not compress, so each AOF rewrite spends about half its CPU trying)"]
        return []

    async def close(self) -> None:
        await self._accepts.drain()
        self._pipe.close()
        await self.client.aclose()

    # keys ----------------------------------------------------------------------------------------------

    async def save_key(self, record: KeyRecord) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(f"{P}key:{record.key_id}", mapping={
                "tenant": record.tenant, "digest": record.digest, "created_at": record.created_at,
                "expires_at": "" if record.expires_at is None else record.expires_at,
                "vendors": ",".join(record.vendors), "revoked": int(record.revoked)})
            pipe.sadd(f"{P}keys", record.key_id)
            await pipe.execute()

    async def find_key(self, key_id: str) -> KeyRecord | None:
        try:
            raw = await self.client.hgetall(f"{P}key:{key_id}")
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise StoreUnavailableError(f"redis: {type(exc).__name__}") from None
        if not raw:
            return None
        row = {_s(k): _s(v) for k, v in raw.items()}
        return KeyRecord(key_id, row["tenant"], row["digest"], float(row["created_at"]),
                         float(row["expires_at"]) if row["expires_at"] else None,
                         tuple(v for v in row["vendors"].split(",") if v), row["revoked"] == "1")

    async def list_keys(self) -> list[KeyRecord]:
        ids = sorted(_s(i) for i in await self.client.smembers(f"{P}keys"))
        records = [r for r in [await self.find_key(i) for i in ids] if r is not None]
        return sorted(records, key=lambda r: r.created_at)

    async def revoke_key(self, key_id: str) -> bool:
        if not await self.client.exists(f"{P}key:{key_id}"):
            return False
        await self.client.hset(f"{P}key:{key_id}", "revoked", 1)
        return True

    # accept ----------------------------------------------------------------------------------------------

    def accept(self, tenant: str, message_id: str, payload: bytes, jobs: Sequence[NewJob], *, now: float,
               ttl: float, skips: Sequence[tuple[str, str]] = (), timeout: float | None = None) -> Awaitable[bool]:
        event_id = new_id()  # its jobs' ids are the event's and their number, given when they are fanned out
        event = [orjson.dumps([repr(now), repr(ttl), event_id, tenant, message_id, [job.vendor for job in jobs]]),
                 orjson.dumps([[job.vendor, job.target, job.event_name, job.batch_key] for job in jobs]),
                 orjson.dumps(skips) if skips else b"", payload]
        return self._accepts.submit((f"{P}seen:{tenant}:{message_id}", event), timeout)  # the pipe's errors

    async def _accept_batch(self, events: list[tuple[str, list[Any]]]) -> list[bool]:
        """One script call stores the events of one event loop turn (`TurnBatch`)."""
        args: list[Any] = [self._accept_sha, len(events)]
        args += [seen for seen, _ in events]
        for _, event_args in events:
            args += event_args
        try:
            fresh = await self._pipe.call("EVALSHA", *args)
        except ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            args[0] = scripts.ACCEPT  # Redis restarted or its scripts flushed: EVAL loads it again
            fresh = await self._pipe.call("EVAL", *args)
        return [bool(one) for one in fresh]

    # identities ----------------------------------------------------------------------------------------

    async def recall(self, keys: Sequence[str], *, now: float) -> list[bytes | None]:
        found = await self._pipe.call("MGET", *[f"{P}identity:{key}" for key in keys])
        return [value if isinstance(value, bytes) else None for value in found]

    async def remember(self, identities: Sequence[Identity]) -> None:
        if not identities:
            return
        args: list[Any] = []
        for identity in identities:
            args += [identity.key, identity.record, max(1, int(identity.expires_at * 1000)), identity.expires_at]
        try:
            await self._remember(keys=[], args=args)  # one script for a batch: cheaper than a command per key
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise StoreUnavailableError(f"redis: {type(exc).__name__}") from None

    async def forget(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(*(f"{P}identity:{key}" for key in keys))
            pipe.zrem(IDENTITIES, *keys)
            gone, _ = await pipe.execute()
        return int(gone)

    # queue ---------------------------------------------------------------------------------------------

    async def lease(self, vendor: str, *, now: float, limit: int, lease_seconds: float,
                    every_share: bool = False, skip_tenants: Collection[str] = ()) -> list[Job]:
        """Due jobs, new or retried, and a dead replica's jobs once idle past the lease.

        The pending list is looked through for idle entries at the first lease, then from where the last look
        ended until it has been seen whole, then again a quarter of a lease later: a dead replica's jobs are taken
        over at most a quarter of a lease after their lease ends (`bench/delivery.py --store redis`: the look at
        every lease took 17-21 µs of redis-server's CPU per job leased, of 32-41)."""
        await self._group(vendor)
        cursor, not_before = self._claims.get(vendor, ("0-0", 0.0))
        looking = now >= not_before
        found, rows = await self._lease(keys=[], args=[vendor, GROUP, self.consumer, now, limit,
                                                       int(lease_seconds * 1000), cursor if looking else "",
                                                       FAN_OUT_EVENTS])
        if looking:
            ended = _s(found)
            self._claims[vendor] = ("0-0", now + lease_seconds / 4) if ended == "0-0" else (ended, 0.0)
        return [Job(_s(r[1]), _s(r[2]), vendor, _s(r[3]), _s(r[4]), _s(r[10]), _s(r[5]), _s(r[6]), bytes(r[11]),
                    int(r[7]), float(r[8]), int(r[9]), _s(r[0])) for r in rows]

    async def complete(self, jobs: Sequence[Job], *, status: int | None = None, now: float = 0.0) -> None:
        args: list[Any] = [GROUP, _status(status), now]
        for job in jobs:
            args += [job.id, job.vendor, job.receipt, job.message_id, job.event_id, job.tenant, job.target, job.size,
                     job.attempts]
        await self._complete(keys=[], args=args)

    async def _move_to(self, job: Job, zset: str, score: float, fields: dict[str, Any], *, bury: bool = False,
                       state: str = "", status: int | None = None, body: str = "", client: Any = None) -> None:
        """Ack the job's stream entry and park the job in its hash and its id in `zset`, unless its lease is no
        longer its own (completed or moved elsewhere after its lease expired): atomic, so a late answer never
        resurrects a delivered job."""
        args: list[Any] = [GROUP, job.receipt, score, job.id, "1" if bury else "0", state, _status(status), body,
                           job.attempts + 1, job.message_id, job.vendor]
        whole = {"event": job.event_id, "vendor": job.vendor, "target": job.target, "tenant": job.tenant,
                 "event_name": job.event_name, "batch_key": job.batch_key, "size": job.size,
                 "created_at": repr(job.created_at), "attempts": job.attempts, "message_id": job.message_id}
        for name, value in {**whole, **fields}.items():
            args += [name, value]
        await self._move(keys=[f"{P}job:{job.id}", f"{P}{zset}:{job.vendor}"], args=args, client=client)

    async def retry(self, job: Job, *, due_at: float, status: int | None, body: str) -> None:
        await self._move_to(job, "delayed", due_at,
                            {"attempts": job.attempts + 1, "last_status": _status(status), "last_body": body},
                            state="retrying", status=status, body=body)

    async def release(self, jobs: Sequence[Job], *, due_at: float) -> None:
        """Each job back to its vendor's retry set, in one round trip (one script call per job, pipelined)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for job in jobs:
                await self._move_to(job, "delayed", due_at, {}, client=pipe)
            await pipe.execute()

    async def bury(self, job: Job, *, now: float, status: int | None, body: str) -> None:
        await self._move_to(job, "dead", now, {"attempts": job.attempts + 1, "last_status": _status(status),
                                               "last_body": body, "died_at": now}, bury=True, state="dead",
                            status=status, body=body)

    async def dead_letters(self, vendor: str | None = None, limit: int = 100) -> list[DeadLetter]:
        letters: list[DeadLetter] = []
        for slug in [vendor] if vendor else [v.slug for v in VENDORS]:
            for raw_id in await self.client.zrange(f"{P}dead:{slug}", 0, limit - 1):
                row = {_s(k): _s(v) for k, v in (await self.client.hgetall(f"{P}job:{_s(raw_id)}")).items()}
                if "vendor" not in row:
                    continue
                message_id = await self.client.hget(f"{P}event:{row['event']}", "message_id")
                letters.append(DeadLetter(_s(raw_id), row["vendor"], row["tenant"], _s(message_id or b""),
                                          row["event_name"], int(row["attempts"]),
                                          int(row["last_status"]) if row.get("last_status") else None,
                                          row.get("last_body", ""), float(row["created_at"]),
                                          float(row["died_at"])))
        return sorted(letters, key=lambda d: d.died_at)[:limit]

    async def replay(self, ids: Sequence[str] | None, *, now: float) -> int:
        if ids is None:
            ids = [d.id for d in await self.dead_letters(limit=1_000_000)]
        count = 0
        for job_id in ids:
            vendor = await self.client.hget(f"{P}job:{job_id}", "vendor")
            if vendor is None:
                continue
            await self._group(_s(vendor))
            count += int(await self._replay(keys=[f"{P}job:{job_id}", f"{P}dead:{_s(vendor)}"],
                                            args=[job_id, now, _s(vendor)]))
        return count

    async def trace(self, message_id: str, tenant: str | None = None) -> list[Outcome]:
        await self.fan_out()  # an event's trace rows are written with its jobs
        raw = await self.client.hgetall(f"{P}trace:{message_id}")
        outcomes = []
        for field, value in raw.items():
            who, vendor, target = _s(field).split("|", 2)
            if tenant is not None and who != tenant:
                continue
            row = orjson.loads(value)
            status = row.get("st")
            outcomes.append(Outcome(who, vendor, target, row["s"], int(row.get("a", 0)),
                                    int(status) if status not in (None, "") else None, row.get("d", ""),
                                    row.get("at"), row.get("n")))
        return sorted(outcomes, key=lambda o: (o.tenant, o.vendor, o.target))

    async def save_settings(self, key_id: str, sealed: bytes, *, now: float) -> None:
        await self.client.hset(f"{P}settings", key_id, sealed)

    async def latest_settings(self, key_id: str) -> bytes | None:
        found: Any = await self.client.hget(f"{P}settings", key_id)
        return bytes(found) if found is not None else None

    async def dead_letter_payload(self, job_id: str) -> tuple[str, bytes] | None:
        event_id, died_at = await self.client.hmget(f"{P}job:{job_id}", "event", "died_at")
        if event_id is None or died_at is None:
            return None
        payload: Any = await self.client.hget(f"{P}event:{_s(event_id)}", "payload")
        return (_s(event_id), bytes(payload)) if payload is not None else None

    async def replace_payload(self, event_id: str, payload: bytes) -> None:
        await self.client.hset(f"{P}event:{event_id}", "payload", payload)

    async def fan_out(self) -> int:
        """Write the jobs of every event accepted since delivery last leased (`scripts.FAN_OUT`), FAN_OUT_EVENTS per
        call so that accepts are served in between; how many events."""
        total = 0
        while count := int(await self._fan_out(keys=[], args=[FAN_OUT_EVENTS])):
            total += count
        return total

    async def stats(self, *, now: float) -> QueueStats:
        await self.fan_out()  # exact figures: every event's jobs written first
        stats = QueueStats()
        for vendor in VENDORS:
            streams = await self._streams(vendor.slug)
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.zcard(f"{P}delayed:{vendor.slug}")
                pipe.zcount(f"{P}delayed:{vendor.slug}", "-inf", now)
                pipe.zcard(f"{P}dead:{vendor.slug}")
                for stream in streams:
                    pipe.xlen(stream)
                    pipe.xpending(stream, GROUP)
                delayed, delayed_due, dead, *per_stream = await pipe.execute()
            leased = sum(int(pending["pending"]) for pending in per_stream[1::2])
            waiting = sum(int(length) for length in per_stream[0::2]) - leased
            stats.vendors[vendor.slug] = VendorStats(pending=waiting + int(delayed), leased=leased,
                                                     due=waiting + int(delayed_due), dead=int(dead))
        return stats

    async def oldest_due(self, *, now: float) -> dict[str, float]:
        # Events whose jobs are not written yet (delivery has not leased since they came) are due for their vendors
        # too: the oldest of them, as far as the first OLDEST_UNFANNED tell.
        unfanned: dict[str, float] = {}
        accepted: Any = await self.client.xrange(ACCEPTED, count=OLDEST_UNFANNED)
        for _, fields in accepted:
            for vendor, *_ in orjson.loads(fields[b"r"]):
                unfanned.setdefault(vendor, float(fields[b"c"]))
        ages = {}
        for vendor in VENDORS:
            oldest = []
            for stream in await self._streams(vendor.slug):
                groups = await self.client.xinfo_groups(stream)
                last = next((_s(g["last-delivered-id"]) for g in groups if _s(g["name"]) == GROUP), "0-0")
                waiting: Any = await self.client.xrange(stream, min=f"({last}", count=1)
                oldest += [float(waiting[0][1].get(b"due", now))] if waiting else []
            delayed: Any = await self.client.zrangebyscore(f"{P}delayed:{vendor.slug}", "-inf", now, start=0, num=1,
                                                           withscores=True)
            oldest += [float(entry[1]) for entry in delayed]
            oldest += [unfanned[vendor.slug]] if vendor.slug in unfanned else []
            ages[vendor.slug] = max(0.0, now - min(oldest)) if oldest else 0.0
        return ages

    async def counts(self) -> Counts:
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.hgetall(COUNTERS)
                pipe.zcard(IDENTITIES)
                raw, identities = await pipe.execute()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise StoreUnavailableError(f"redis: {type(exc).__name__}") from None
        counts = Counts(identities=int(identities))
        for name, value in raw.items():
            kind, _, key = _s(name).partition(":")
            {"pending": counts.pending, "dead": counts.dead, "bytes": counts.queued_bytes}[kind][key] = int(value)
        counts.queued_bytes.setdefault(ALL_TENANTS, 0)
        return counts

    async def recover_leases(self, *, now: float) -> int:
        return 0  # XAUTOCLAIM takes over a dead replica's entries once they are idle past the lease time

    async def housekeeping(self, *, now: float, keep_seconds: float = 7 * 86_400,
                           max_identities: int = MAX_IDENTITIES) -> None:
        """Drop expired identities from their index (the records expire on their own) and the oldest past the
        bound; forget consumers (replicas) that are gone: idle for an hour with nothing pending."""
        await self.client.zremrangebyscore(IDENTITIES, "-inf", now)
        for _ in range(HOUSEKEEPING_ROUNDS):  # as on SQLite: again while a batch was full, bounded per call
            excess = min(int(await self.client.zcard(IDENTITIES)) - max_identities, HOUSEKEEPING_BATCH)
            if excess <= 0:
                break
            popped: list[tuple[bytes, float]] = await self.client.zpopmin(IDENTITIES, excess)  # type: ignore[assignment]
            oldest = [_s(member) for member, _ in popped]
            await self.client.delete(*(f"{P}identity:{key}" for key in oldest))
            if excess < HOUSEKEEPING_BATCH:
                break
        for vendor in VENDORS:
            for stream in await self._streams(vendor.slug):
                for consumer in await self.client.xinfo_consumers(stream, GROUP):
                    if int(consumer["pending"]) == 0 and int(consumer["idle"]) > 3_600_000:
                        await self.client.xgroup_delconsumer(stream, GROUP, consumer["name"])


def _status(status: int | None) -> str:
    return "" if status is None else str(status)

