"""The distributed store: Redis shared by any number of replicas.

Layout (prefix `segrelay:`):
  key:<key_id>          hash   API key record            keys            set of key ids
  seen:<tenant>:<msg>   string expiry time, with a TTL   (idempotency)
  job:<id>              hash   the job: vendor, tenant, payload (sealed), attempts, last answer...
  stream:<vendor>       stream one entry per due job, consumer group `workers`; a leased job is one in the
                                group's pending list; XAUTOCLAIM takes over the entries of a dead replica
  delayed:<vendor>      zset   job ids waiting for their retry time (score = due time)
  dead:<vendor>         zset   dead-lettered job ids (score = time of death)

Accepting an event (idempotency record + jobs) is one Lua script, so it is atomic. Needs one Redis primary
(not Cluster) with AOF persistence; see the README.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.keys import KeyRecord
from app.store import DeadLetter, Job, NewJob, QueueStats, StoreError, StoreUnavailableError, VendorStats
from handlers import VENDORS

P = "segrelay:"
GROUP = "workers"
_ACCEPT = """
local seen = redis.call('GET', KEYS[1])
local now = tonumber(ARGV[1])
if seen and tonumber(seen) > now then return 0 end
redis.call('SET', KEYS[1], tostring(now + tonumber(ARGV[2])), 'PX', math.max(1, math.floor(tonumber(ARGV[2]) * 1000)))
local i = 4
for _ = 1, tonumber(ARGV[3]) do
  local id, vendor = ARGV[i], ARGV[i + 1]
  redis.call('HSET', 'segrelay:job:' .. id, 'vendor', vendor, 'tenant', ARGV[i + 2], 'message_id', ARGV[i + 3],
    'event_name', ARGV[i + 4], 'batch_key', ARGV[i + 5], 'payload', ARGV[i + 6], 'attempts', 0, 'created_at', now)
  redis.call('XADD', 'segrelay:stream:' .. vendor, '*', 'id', id)
  i = i + 7
end
return 1
"""
_MOVE = """
redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[3], ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if #ARGV > 4 then redis.call('HSET', KEYS[1], unpack(ARGV, 5)) end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
return 1
"""
_PROMOTE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('XADD', KEYS[2], '*', 'id', id)
end
return #ids
"""


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisStore:
    def __init__(self, url: str, *, consumer: str = "") -> None:
        self.client = aioredis.Redis.from_url(url, decode_responses=False, health_check_interval=30,
                                              socket_timeout=10, socket_connect_timeout=5)
        self.consumer = consumer or uuid.uuid4().hex[:12]
        self._accept = self.client.register_script(_ACCEPT)
        self._promote = self.client.register_script(_PROMOTE)
        self._move = self.client.register_script(_MOVE)
        self._groups: set[str] = set()

    async def _group(self, vendor: str) -> str:
        stream = f"{P}stream:{vendor}"
        if vendor not in self._groups:
            try:
                await self.client.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self._groups.add(vendor)
        return stream

    async def ping(self) -> None:
        try:
            await self.client.ping()
        except RedisError as exc:
            raise StoreError(f"redis: {type(exc).__name__}") from None

    async def close(self) -> None:
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

    # accept --------------------------------------------------------------------------------------------

    async def accept(self, tenant: str, message_id: str, jobs: Sequence[NewJob], *, now: float,
                     ttl: float) -> bool:
        args: list[Any] = [now, ttl, len(jobs)]
        for job in jobs:
            args += [uuid.uuid4().hex, job.vendor, job.tenant, job.message_id, job.event_name, job.batch_key,
                     job.payload]
        try:
            result = await self._accept(keys=[f"{P}seen:{tenant}:{message_id}"], args=args)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise StoreUnavailableError(f"redis: {type(exc).__name__}") from None
        return bool(result)

    # queue ---------------------------------------------------------------------------------------------

    async def lease(self, vendor: str, *, now: float, limit: int, lease_seconds: float) -> list[Job]:
        stream = await self._group(vendor)
        await self._promote(keys=[f"{P}delayed:{vendor}", stream], args=[now, limit])
        _, claimed, _ = await self.client.xautoclaim(stream, GROUP, self.consumer,
                                                     min_idle_time=int(lease_seconds * 1000), start_id="0-0",
                                                     count=limit)
        entries = [(eid, fields) for eid, fields in claimed if fields]
        if len(entries) < limit:
            read: Any = await self.client.xreadgroup(GROUP, self.consumer, {stream: ">"},
                                                     count=limit - len(entries))
            for _, items in read or []:
                entries += items
        if not entries:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for _, fields in entries:
                pipe.hgetall(f"{P}job:{_s(fields[b'id'])}")
            rows = await pipe.execute()
        jobs, orphans = [], []
        for (eid, fields), row in zip(entries, rows, strict=True):
            if b"payload" not in row:
                # Completed by another replica after a lease expired (and perhaps touched again by the slower
                # one): nothing is left to send.
                orphans.append(eid)
                if row:
                    await self.client.delete(f"{P}job:{_s(fields[b'id'])}")
                continue
            r = {_s(k): v for k, v in row.items()}
            jobs.append(Job(_s(fields[b"id"]), _s(r["vendor"]), _s(r["tenant"]), _s(r["message_id"]),
                            _s(r["event_name"]), _s(r["batch_key"]), bytes(r["payload"]), int(r["attempts"]),
                            float(r["created_at"]), _s(eid)))
        if orphans:
            await self.client.xack(stream, GROUP, *orphans)
            await self.client.xdel(stream, *orphans)
        return jobs

    async def complete(self, jobs: Sequence[Job]) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            for job in jobs:
                stream = f"{P}stream:{job.vendor}"
                pipe.xack(stream, GROUP, job.receipt)
                pipe.xdel(stream, job.receipt)
                pipe.delete(f"{P}job:{job.id}")
            await pipe.execute()

    async def _move_to(self, job: Job, zset: str, score: float, fields: dict[str, Any]) -> None:
        """Ack the job's stream entry and park its id in `zset`, unless the job is gone (completed
        elsewhere after its lease expired): atomic, so a late answer never resurrects a delivered job."""
        args: list[Any] = [GROUP, job.receipt, score, job.id]
        for name, value in fields.items():
            args += [name, value]
        await self._move(keys=[f"{P}job:{job.id}", f"{P}{zset}:{job.vendor}", f"{P}stream:{job.vendor}"],
                         args=args)

    async def retry(self, job: Job, *, due_at: float, status: int | None, body: str) -> None:
        await self._move_to(job, "delayed", due_at,
                            {"attempts": job.attempts + 1, "last_status": _status(status), "last_body": body})

    async def release(self, jobs: Sequence[Job], *, due_at: float) -> None:
        for job in jobs:
            await self._move_to(job, "delayed", due_at, {})

    async def bury(self, job: Job, *, now: float, status: int | None, body: str) -> None:
        await self._move_to(job, "dead", now, {"attempts": job.attempts + 1, "last_status": _status(status),
                                               "last_body": body, "died_at": now})

    async def dead_letters(self, vendor: str | None = None, limit: int = 100) -> list[DeadLetter]:
        letters: list[DeadLetter] = []
        for slug in [vendor] if vendor else [v.slug for v in VENDORS]:
            for raw_id in await self.client.zrange(f"{P}dead:{slug}", 0, limit - 1):
                row = {_s(k): _s(v) for k, v in (await self.client.hgetall(f"{P}job:{_s(raw_id)}")).items()
                       if _s(k) != "payload"}
                if "vendor" in row:  # a hash re-touched after completion has no job left
                    letters.append(DeadLetter(_s(raw_id), row["vendor"], row["tenant"], row["message_id"],
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
            if vendor is None or not await self.client.zrem(f"{P}dead:{_s(vendor)}", job_id):
                continue
            stream = await self._group(_s(vendor))
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.hset(f"{P}job:{job_id}", mapping={"attempts": 0, "created_at": now})
                pipe.hdel(f"{P}job:{job_id}", "died_at")
                pipe.xadd(stream, {"id": job_id})
                await pipe.execute()
            count += 1
        return count

    async def stats(self, *, now: float) -> QueueStats:
        stats = QueueStats()
        for vendor in VENDORS:
            stream = await self._group(vendor.slug)
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.xlen(stream)
                pipe.xpending(stream, GROUP)
                pipe.zcard(f"{P}delayed:{vendor.slug}")
                pipe.zcount(f"{P}delayed:{vendor.slug}", "-inf", now)
                pipe.zcard(f"{P}dead:{vendor.slug}")
                length, pending, delayed, delayed_due, dead = await pipe.execute()
            leased = int(pending["pending"])
            waiting = int(length) - leased
            stats.vendors[vendor.slug] = VendorStats(pending=waiting + int(delayed), leased=leased,
                                                     due=waiting + int(delayed_due), dead=int(dead))
        return stats

    async def depth(self) -> int:
        async with self.client.pipeline(transaction=False) as pipe:
            for vendor in VENDORS:
                pipe.xlen(f"{P}stream:{vendor.slug}")
                pipe.zcard(f"{P}delayed:{vendor.slug}")
            return sum(int(n) for n in await pipe.execute())

    async def recover_leases(self, *, now: float) -> int:
        return 0  # XAUTOCLAIM takes over a dead replica's entries once they are idle past the lease time

    async def housekeeping(self, *, now: float) -> None:
        """Forget consumers (replicas) that are gone: idle for an hour with nothing pending."""
        for vendor in VENDORS:
            stream = await self._group(vendor.slug)
            for consumer in await self.client.xinfo_consumers(stream, GROUP):
                if int(consumer["pending"]) == 0 and int(consumer["idle"]) > 3_600_000:
                    await self.client.xgroup_delconsumer(stream, GROUP, consumer["name"])


def _status(status: int | None) -> str:
    return "" if status is None else str(status)

