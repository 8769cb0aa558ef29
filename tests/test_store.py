"""The store contract, run against every implementation: SQLite (a real file) and Redis (a real server)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis

from app.keys import KeyRecord
from app.store import Identity, NewJob, Store, open_store
from app.store import sqlite as sqlite_store
from app.store.redis import RedisStore
from app.store.sqlite import LIVE_SECONDS, SCHEMA, SHARE_REFRESH, TAKE_OVER_AFTER, SQLiteStore
from app.store.sqlite_writers import PRIORITY_SLOTS, connect_writer
from tests.support import RedisServer


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    opened = open_store(store_url, consumer="test-consumer")
    yield opened
    await opened.close()


def job(vendor: str = "tracify", target: str = "events", batch_key: str = "") -> NewJob:
    return NewJob(vendor, target, "Order Completed", batch_key)


async def pending(store: Store) -> int:
    """Jobs not yet delivered or buried, from the store's counters."""
    return sum((await store.counts()).pending.values())



async def test_tuning_advice_names_what_costs_cpu_for_nothing(store: Store, store_url: str) -> None:
    """SQLite's settings are segrelay's own; on Redis, `rdbcompression yes` (its default) is named with the fix, and
    `no` (the test server's, as the README recommends) gives no advice."""
    assert await store.tuning_advice() == []
    if isinstance(store, RedisStore):
        client = redis.Redis.from_url(store_url)
        client.config_set("rdbcompression", "yes")
        try:
            assert await store.tuning_advice() == [
                "rdbcompression is yes: set `rdbcompression no` (segrelay's stored values are encrypted and do not "
                "compress, so each AOF rewrite spends about half its CPU trying)"]
        finally:
            client.config_set("rdbcompression", "no")


async def test_keys_round_trip_and_revoke(store: Store) -> None:
    record = KeyRecord("abcdefghijkl", "acme", "digest", 1.0, 99.0, ("tracify",))
    await store.save_key(record)
    assert await store.find_key("abcdefghijkl") == record
    assert await store.find_key("nope") is None
    assert [k.key_id for k in await store.list_keys()] == ["abcdefghijkl"]
    assert await store.revoke_key("abcdefghijkl") is True
    assert await store.revoke_key("missing") is False
    found = await store.find_key("abcdefghijkl")
    assert found is not None and found.revoked


async def test_a_burst_of_concurrent_accepts_waits_for_connections_instead_of_failing(store: Store) -> None:
    """More concurrent requests than the store has connections (Redis: a pool of 64 per process) queue for one."""
    now = time.time()
    results = await asyncio.gather(*(store.accept("acme", f"burst-{n}", b"payload", [job()], now=now, ttl=60)
                                     for n in range(300)))
    assert all(results)
    assert await pending(store) == 300


async def test_accept_is_idempotent_per_tenant_and_message(store: Store) -> None:
    now = time.time()
    assert await store.accept("acme", "m1", b"sealed", [job(), job("audiohook")], now=now, ttl=60)
    assert not await store.accept("acme", "m1", b"sealed", [job()], now=now + 1, ttl=60)
    assert await store.accept("other", "m1", b"sealed", [job()], now=now + 1, ttl=60)
    assert await pending(store) == 3
    assert await store.accept("acme", "m1", b"sealed", [job()], now=now + 61, ttl=60)  # the window has passed


async def test_accepts_of_one_turn_are_each_stored_as_if_alone(store: Store) -> None:
    """Accepts made together (Redis: one script call per event loop turn; SQLite: one transaction of the accept
    writer) answer each event on its own: the same messageId twice among them is new once, every other is new."""
    now = time.time()
    ids = ["t1", "t2", "t1", "t3", "t2"]
    results = await asyncio.gather(*(store.accept("acme", m, f"p-{n}".encode(), [job()], now=now, ttl=60)
                                     for n, m in enumerate(ids)))
    assert results == [True, True, False, True, False]
    assert await pending(store) == 3
    leased = await store.lease("tracify", now=now, limit=10, lease_seconds=30)
    assert sorted(j.payload for j in leased) == [b"p-0", b"p-1", b"p-3"]


async def test_counters_of_accepts_made_together_sum_over_tenants_and_vendors(store: Store) -> None:
    """Redis sums the counters of one script call and writes them at its end: a duplicate among them adds
    nothing, and each tenant and vendor gets what its own events queued."""
    now = time.time()
    calls = [("acme", "c1", b"aa", [job("segmentstream", "track"), job("tracify")]),
             ("beta", "c1", b"bbbb", [job("tracify")]),
             ("acme", "c1", b"aa", [job("segmentstream", "track"), job("tracify")]),  # a duplicate
             ("acme", "c2", b"a", [job("audiohook", "pixel")])]
    results = await asyncio.gather(*(store.accept(tenant, m, p, jobs, now=now, ttl=60, skips=[("audiohook", "off")])
                                     for tenant, m, p, jobs in calls))
    assert results == [True, True, False, True]
    counts = await store.counts()
    assert counts.pending == {"segmentstream": 1, "tracify": 2, "audiohook": 1}
    assert counts.queued_bytes == {"acme": 5, "beta": 4, "*": 9}
    states = {(o.tenant, o.vendor, o.target): o.state for o in await store.trace("c1")}
    assert states == {("acme", "segmentstream", "track"): "queued", ("acme", "tracify", "events"): "queued",
                      ("acme", "audiohook", ""): "skipped", ("beta", "tracify", "events"): "queued",
                      ("beta", "audiohook", ""): "skipped"}


async def test_names_reasons_and_keys_in_any_script_survive_the_store(store: Store) -> None:
    """Event names, batch keys and skip reasons are the customer's text: quotes, newlines, accents, emoji, and a
    separator or JSON of their own come back as they were sent (Redis carries them to its script as JSON)."""
    now = time.time()
    name = 'Bestellung "abgeschlossen" \n ✓ 🛒 \x1f[1,2]'
    batch = "token|site\u00e9"
    await store.accept("acme", "m-text", b"sealed", [NewJob("tracify", "events", name, batch)], now=now, ttl=60,
                       skips=[("audiohook", 'no "pixel" ✗ \n here')])
    (leased,) = await store.lease("tracify", now=now, limit=10, lease_seconds=30)
    assert (leased.event_name, leased.batch_key, leased.message_id) == (name, batch, "m-text")
    skipped = [o for o in await store.trace("m-text") if o.state == "skipped"]
    assert [(o.vendor, o.detail) for o in skipped] == [("audiohook", 'no "pixel" ✗ \n here')]


async def test_lease_complete_and_stats(store: Store) -> None:
    now = time.time()
    await store.accept("acme", "m1", b"p1", [job()], now=now, ttl=60)
    await store.accept("acme", "m2", b"p2", [job()], now=now, ttl=60)
    leased = await store.lease("tracify", now=now, limit=10, lease_seconds=30)
    assert sorted(j.payload for j in leased) == [b"p1", b"p2"]
    assert all(j.attempts == 0 and j.tenant == "acme" for j in leased)
    assert await store.lease("tracify", now=now, limit=10, lease_seconds=30) == []
    stats = (await store.stats(now=now)).vendors["tracify"]
    assert (stats.leased, stats.dead) == (2, 0)
    await store.complete(leased)
    assert await pending(store) == 0
    assert await store.lease("tracify", now=now + 100, limit=10, lease_seconds=30) == []


async def test_an_expired_lease_makes_the_job_due_again(store: Store) -> None:
    now = time.time()
    await store.accept("acme", "m1", b"sealed", [job()], now=now, ttl=60)
    (first,) = await store.lease("tracify", now=now, limit=10, lease_seconds=0.5)
    assert await store.lease("tracify", now=now + 0.1, limit=10, lease_seconds=0.5) == []
    await asyncio.sleep(0.7)  # Redis measures idle time on its own clock
    (again,) = await store.lease("tracify", now=time.time(), limit=10, lease_seconds=0.5)
    assert again.message_id == first.message_id and again.attempts == 0


async def test_a_dead_replicas_jobs_are_taken_over_without_a_look_at_every_lease(redis_server: RedisServer) -> None:
    """Redis: a replica that died with jobs leased; another takes them over once idle past the lease, a look through
    the pending list at a time (the cursor goes on where the last look ended), then looks again only a quarter of a
    lease later (`RedisStore.lease`)."""
    url = f"redis://127.0.0.1:{redis_server.port}/12"
    redis.Redis.from_url(url).flushdb()
    dead, alive = RedisStore(url, consumer="dead"), RedisStore(url, consumer="alive")
    try:
        now = time.time()
        for n in range(3):
            await dead.accept("acme", f"m{n}", b"sealed", [job()], now=now, ttl=60)
        assert len(await dead.lease("tracify", now=now, limit=10, lease_seconds=0.5)) == 3
        assert await alive.lease("tracify", now=now, limit=10, lease_seconds=0.5) == []  # not idle yet
        await asyncio.sleep(0.7)
        now = time.time()
        taken = [j for _ in range(3) for j in await alive.lease("tracify", now=now, limit=1, lease_seconds=0.5)]
        assert sorted(j.message_id for j in taken) == ["m0", "m1", "m2"]
        assert all(j.attempts == 0 for j in taken)
        client = redis.Redis.from_url(url)
        client.config_resetstat()
        for _ in range(5):  # the whole list was seen: no look until a quarter of a lease later
            assert await alive.lease("tracify", now=now + 0.1, limit=10, lease_seconds=0.5) == []
        assert "cmdstat_xautoclaim" not in client.info("commandstats")
        assert await alive.lease("tracify", now=now + 0.2, limit=10, lease_seconds=0.5) == []
        assert client.info("commandstats")["cmdstat_xautoclaim"]["calls"] == 1
    finally:
        await dead.close()
        await alive.close()


async def test_a_redis_accept_writes_the_event_once_and_its_jobs_wait_for_a_lease(redis_server: RedisServer) -> None:
    """Redis: an accept is the event's idempotency key, its hash and one `accepted` entry with its routes; the jobs'
    stream entries (each carrying its job: no hash of its own) and trace rows are written by the next lease of any
    vendor, once, whichever replica leases first."""
    url = f"redis://127.0.0.1:{redis_server.port}/12"
    client = redis.Redis.from_url(url)
    client.flushdb()
    one, other = RedisStore(url, consumer="one"), RedisStore(url, consumer="other")
    try:
        now = time.time()
        client.config_resetstat()
        assert await one.accept("acme", "m1", b"p1", [job("tracify"), job("audiohook", "pixel")], now=now, ttl=60,
                                skips=[("segmentstream", "no token")])
        called = {name.removeprefix("cmdstat_"): stat["calls"] for name, stat in client.info("commandstats").items()}
        assert {"xadd": 1, "hset": 1, "set": 1, "get": 1}.items() <= called.items(), called
        assert client.xlen("segrelay:accepted") == 1 and client.keys("segrelay:jobs:*") == []
        assert client.keys("segrelay:job:*") == []
        assert await other.lease("audiohook", now=now, limit=5, lease_seconds=30) != []  # fans out every vendor
        assert client.xlen("segrelay:accepted") == 0 and client.xlen("segrelay:jobs:tracify") == 1
        # 0.13.10's streams are never written: a replica of it, during a rolling upgrade, would drop such an entry
        assert client.keys("segrelay:stream:*") == []
        (leased,) = await one.lease("tracify", now=now, limit=5, lease_seconds=30)
        assert (leased.message_id, leased.payload, leased.target, leased.size) == ("m1", b"p1", "events", 2)
        assert await one.fan_out() == 0 and client.keys("segrelay:job:*") == []
        states = {(o.vendor, o.target): o.state for o in await one.trace("m1")}
        assert states == {("tracify", "events"): "queued", ("audiohook", "pixel"): "queued",
                          ("segmentstream", ""): "skipped"}
        assert 0 < client.pttl("segrelay:trace:m1") <= 60_000
    finally:
        await one.close()
        await other.close()


async def test_a_redis_completion_deletes_only_what_exists(redis_server: RedisServer) -> None:
    """Redis: a job leased from a `jobs` stream has no hash of its own, so completing it deletes its entry and, with
    its event's last job, the event: no DEL of job hashes that are not there. Its trace row says delivered, with the
    vendor's status, the attempt and the time."""
    url = f"redis://127.0.0.1:{redis_server.port}/12"
    client = redis.Redis.from_url(url)
    client.flushdb()
    store = RedisStore(url, consumer="one")
    try:
        now = time.time()
        for n in range(2):
            await store.accept("acme", f"m{n}", b"sealed", [job()], now=now, ttl=60)
        leased = await store.lease("tracify", now=now, limit=10, lease_seconds=30)
        client.config_resetstat()
        await store.complete(leased, status=202, now=now + 1)
        assert client.info("commandstats")["cmdstat_del"]["calls"] == 2  # the two events, nothing else
        assert client.keys("segrelay:event:*") == [] and client.xlen("segrelay:jobs:tracify") == 0
        (delivered,) = await store.trace("m0")
        assert (delivered.state, delivered.status, delivered.attempts) == ("delivered", 202, 1)
        await store.accept("acme", "m2", b"sealed", [job()], now=now, ttl=60)
        (unanswered,) = await store.lease("tracify", now=now, limit=10, lease_seconds=30)
        await store.complete([unanswered], now=now + 1)  # no status (a batch vendor's answer counted elsewhere)
        (row,) = await store.trace("m2")
        assert (row.state, row.status, row.attempts) == ("delivered", None, 1)
    finally:
        await store.close()


async def test_a_redis_store_of_0_13_10_is_delivered_as_it_is(redis_server: RedisServer) -> None:
    """Up to 0.13.10 the accept script wrote a hash per job and entries carrying only the job's id in a vendor's
    `stream` (this version writes `jobs` streams, which 0.13.10 does not read): such jobs, due, waiting for a retry
    or dead, are counted, leased, replayed and completed as before, beside new ones, the old stream's first."""
    url = f"redis://127.0.0.1:{redis_server.port}/12"
    client = redis.Redis.from_url(url)
    client.flushdb()
    now = time.time()
    client.hset("segrelay:event:e1", mapping={"tenant": "acme", "message_id": "m-old", "payload": b"p-old", "left": 3})
    for n, vendor, target in ((1, "tracify", "events"), (2, "audiohook", "pixel"), (3, "segmentstream", "track")):
        client.hset(f"segrelay:job:e1.{n}", mapping={
            "event": "e1", "vendor": vendor, "target": target, "tenant": "acme", "event_name": "Order Completed",
            "batch_key": "", "size": 5, "attempts": 0, "created_at": repr(now)})
    client.xadd("segrelay:stream:tracify", {"id": "e1.1", "due": repr(now)})  # due (no lease made its group yet)
    client.hset("segrelay:job:e1.2", mapping={"attempts": 1, "last_status": 503})  # waiting for its retry
    client.zadd("segrelay:delayed:audiohook", {"e1.2": now})
    client.hset("segrelay:job:e1.3", mapping={"attempts": 3, "last_status": 400, "died_at": now})  # dead
    client.zadd("segrelay:dead:segmentstream", {"e1.3": now})
    client.hset("segrelay:counters", mapping={"pending:tracify": 1, "pending:audiohook": 1, "dead:segmentstream": 1,
                                              "bytes:acme": 10, "bytes:*": 10})
    store = RedisStore(url, consumer="new")
    try:
        assert await store.accept("acme", "m-new", b"p-new", [job("tracify")], now=now + 1, ttl=60)
        stats = await store.stats(now=now + 2)  # the old stream's entry counts, beside the new one's
        assert (stats.vendors["tracify"].pending, stats.vendors["audiohook"].pending) == (2, 1)
        assert (await store.oldest_due(now=now + 2))["tracify"] == pytest.approx(2.0)
        tracify = await store.lease("tracify", now=now + 2, limit=5, lease_seconds=30)
        assert [(j.id, j.message_id, j.payload, j.attempts, j.size) for j in tracify] == [
            ("e1.1", "m-old", b"p-old", 0, 5), (tracify[1].id, "m-new", b"p-new", 0, 5)]
        (audiohook,) = await store.lease("audiohook", now=now + 2, limit=5, lease_seconds=30)
        assert (audiohook.id, audiohook.message_id, audiohook.attempts, audiohook.created_at) == ("e1.2", "m-old", 1,
                                                                                                 now)
        (letter,) = await store.dead_letters()
        assert (letter.id, letter.message_id, letter.attempts, letter.last_status) == ("e1.3", "m-old", 3, 400)
        assert await store.replay([letter.id], now=now + 2) == 1
        (again,) = await store.lease("segmentstream", now=now + 2, limit=5, lease_seconds=30)
        assert (again.id, again.message_id, again.attempts, again.target) == ("e1.3", "m-old", 0, "track")
        await store.retry(tracify[0], due_at=now + 2, status=503, body="busy")  # from the old stream
        (retried,) = await store.lease("tracify", now=now + 2, limit=5, lease_seconds=30)
        assert (retried.id, retried.message_id, retried.attempts, retried.payload) == ("e1.1", "m-old", 1, b"p-old")
        await store.complete([retried, tracify[1], audiohook, again], status=200, now=now + 3)
        counts = await store.counts()
        assert counts.pending == {"tracify": 0, "audiohook": 0, "segmentstream": 0} and counts.dead["segmentstream"] == 0
        assert counts.queued_bytes == {"acme": 0, "*": 0}
        assert client.keys("segrelay:job:*") == [] and client.keys("segrelay:event:*") == []
    finally:
        await store.close()


async def test_retry_counts_an_attempt_and_waits_until_due(store: Store) -> None:
    now = time.time()
    await store.accept("acme", "m1", b"sealed", [job()], now=now, ttl=60)
    (leased,) = await store.lease("tracify", now=now, limit=10, lease_seconds=30)
    await store.retry(leased, due_at=now + 5, status=503, body="busy")
    assert await store.lease("tracify", now=now + 1, limit=10, lease_seconds=30) == []
    assert (await store.stats(now=now + 1)).vendors["tracify"].pending == 1
    (again,) = await store.lease("tracify", now=now + 6, limit=10, lease_seconds=30)
    assert again.attempts == 1 and again.payload == b"sealed"


async def test_release_does_not_count_an_attempt(store: Store) -> None:
    now = time.time()
    await store.accept("acme", "m1", b"sealed", [job()], now=now, ttl=60)
    (leased,) = await store.lease("tracify", now=now, limit=10, lease_seconds=30)
    await store.release([leased], due_at=now)
    (again,) = await store.lease("tracify", now=now, limit=10, lease_seconds=30)
    assert again.attempts == 0


async def test_releasing_many_jobs_hands_back_each_one_at_its_due_time(store: Store) -> None:
    now = time.time()
    for n in range(5):
        await store.accept("acme", f"m{n}", b"sealed", [job()], now=now, ttl=60)
    leased = await store.lease("tracify", now=now, limit=10, lease_seconds=30)
    assert len(leased) == 5
    await store.release(leased, due_at=now + 5)
    assert await store.lease("tracify", now=now + 1, limit=10, lease_seconds=30) == []
    again = await store.lease("tracify", now=now + 6, limit=10, lease_seconds=30)
    assert sorted(j.message_id for j in again) == [f"m{n}" for n in range(5)]
    assert all(j.attempts == 0 for j in again)


async def test_bury_list_and_replay_dead_letters(store: Store) -> None:
    now = time.time()
    await store.accept("acme", "m1", b"sealed", [job(), job("audiohook")], now=now, ttl=60)
    (tracify_job,) = await store.lease("tracify", now=now, limit=10, lease_seconds=30)
    (audiohook_job,) = await store.lease("audiohook", now=now, limit=10, lease_seconds=30)
    await store.bury(tracify_job, now=now, status=400, body='{"error": "bad"}')
    await store.bury(audiohook_job, now=now, status=None, body="ConnectError")
    letters = await store.dead_letters("tracify")
    assert [(d.vendor, d.last_status, d.last_body, d.attempts) for d in letters] == [
        ("tracify", 400, '{"error": "bad"}', 1)]
    assert len(await store.dead_letters()) == 2
    assert await pending(store) == 0
    assert (await store.stats(now=now)).vendors["tracify"].dead == 1
    assert await store.replay([letters[0].id], now=now) == 1
    assert await store.replay(["no-such-id"], now=now) == 0
    (replayed,) = await store.lease("tracify", now=now, limit=10, lease_seconds=30)
    assert replayed.attempts == 0 and replayed.payload == b"sealed"
    assert await store.replay(None, now=now) == 1
    assert await store.dead_letters() == []


async def test_vendors_have_separate_queues(store: Store) -> None:
    now = time.time()
    await store.accept("acme", "m1", b"sealed", [job("tracify"), job("audiohook"), job("segmentstream")], now=now,
                       ttl=60)
    assert [j.vendor for j in await store.lease("audiohook", now=now, limit=10, lease_seconds=30)] == ["audiohook"]
    assert len(await store.lease("tracify", now=now, limit=10, lease_seconds=30)) == 1


async def test_recover_leases_and_housekeeping(store: Store) -> None:
    now = time.time()
    await store.accept("acme", "m1", b"sealed", [job()], now=now, ttl=1)
    await store.lease("tracify", now=now, limit=10, lease_seconds=300)
    await store.recover_leases(now=now)
    await store.housekeeping(now=now + 10)
    assert await store.accept("acme", "m1", b"", [], now=now + 10, ttl=1)
    await store.ping()


async def test_a_job_completed_elsewhere_is_not_resurrected_by_a_late_retry(store: Store) -> None:
    now = time.time()
    await store.accept("acme", "m1", b"sealed", [job()], now=now, ttl=60)
    (leased,) = await store.lease("tracify", now=now, limit=10, lease_seconds=30)
    await store.complete([leased])  # the replica that took the job over delivered it
    await store.retry(leased, due_at=now, status=503, body="late answer of the first attempt")
    await store.bury(leased, now=now, status=400, body="late")
    assert await store.lease("tracify", now=now + 1, limit=10, lease_seconds=30) == []
    assert await store.dead_letters() == []


async def test_a_late_success_of_a_job_waiting_for_its_retry_delivers_it(store: Store) -> None:
    """Another replica gave up on the job (its lease had expired) and set it to retry; then the first attempt's
    answer came: the job is delivered, once, and never sent again."""
    now = time.time()
    await store.accept("acme", "m1", b"sealed", [job()], now=now, ttl=60)
    (leased,) = await store.lease("tracify", now=now, limit=10, lease_seconds=30)
    await store.retry(leased, due_at=now + 5, status=503, body="the other replica's attempt")
    await store.complete([leased], status=200, now=now + 1)  # the first attempt's late answer: delivered
    await store.complete([leased], status=200, now=now + 1)  # and again: counted once
    assert await store.lease("tracify", now=now + 10, limit=10, lease_seconds=30) == []
    assert await pending(store) == 0 and (await store.counts()).queued_bytes["acme"] == 0
    assert [(o.state, o.status) for o in await store.trace("m1")] == [("delivered", 200)]


async def test_one_payload_per_event_and_counters_follow_every_move(store: Store) -> None:
    now = time.time()
    payload = b"x" * 100
    await store.accept("acme", "m1", payload, [job("segmentstream", "track"), job("segmentstream", "data_stream"),
                                               job("tracify")], now=now, ttl=60)
    await store.accept("beta", "m1", b"y" * 10, [job("tracify")], now=now, ttl=60)
    counts = await store.counts()
    assert counts.pending == {"segmentstream": 2, "tracify": 2}
    assert counts.queued_bytes == {"acme": 300, "beta": 10, "*": 310}
    jobs = await store.lease("segmentstream", now=now, limit=10, lease_seconds=30)
    assert sorted(j.target for j in jobs) == ["data_stream", "track"]
    assert {j.payload for j in jobs} == {payload} and len({j.event_id for j in jobs}) == 1
    await store.complete(jobs[:1])
    await store.bury(jobs[1], now=now, status=400, body="no")
    (tracify_acme, tracify_beta) = sorted(await store.lease("tracify", now=now, limit=10, lease_seconds=30),
                                          key=lambda j: j.tenant)
    assert tracify_acme.payload == payload  # the event stays while a job of it is left
    await store.complete([tracify_acme, tracify_beta])
    counts = await store.counts()
    assert counts.pending == {"segmentstream": 0, "tracify": 0} and counts.dead == {"segmentstream": 1}
    assert counts.queued_bytes == {"acme": 0, "beta": 0, "*": 0}
    (letter,) = await store.dead_letters()
    assert letter.message_id == "m1" and letter.tenant == "acme"
    assert await store.replay([letter.id], now=now) == 1
    counts = await store.counts()
    assert counts.pending["segmentstream"] == 1 and counts.dead["segmentstream"] == 0
    assert counts.queued_bytes["acme"] == 100
    (again,) = await store.lease("segmentstream", now=now, limit=10, lease_seconds=30)
    assert again.payload == payload and again.target == "data_stream"


async def test_one_completion_of_many_jobs_sums_every_counter_and_keeps_an_event_until_its_last_job(
        store: Store) -> None:
    """Completions come in batches (app/delivery/completions.py): jobs of several events and tenants, two of one
    event, one already completed, one named twice. Each counter moves once per job that was still there, and an
    event stays while one of its jobs is left."""
    now = time.time()
    await store.accept("acme", "m1", b"a" * 100, [job("segmentstream", "track"), job("segmentstream", "data_stream"),
                                                  job("tracify")], now=now, ttl=60)
    await store.accept("beta", "m2", b"b" * 10, [job("segmentstream", "track")], now=now, ttl=60)
    leased = await store.lease("segmentstream", now=now, limit=10, lease_seconds=30)
    assert len(leased) == 3
    beta = next(j for j in leased if j.tenant == "beta")
    await store.complete([beta], status=200, now=now)
    twice = next(j for j in leased if j.tenant == "acme")
    await store.complete([*leased, twice], status=204, now=now + 1)  # beta's again, one twice: each counted once
    counts = await store.counts()
    assert counts.pending == {"segmentstream": 0, "tracify": 1}
    assert counts.queued_bytes == {"acme": 100, "beta": 0, "*": 100}
    states = {(o.vendor, o.target): (o.state, o.status) for o in await store.trace("m1", "acme")}
    assert states == {("segmentstream", "track"): ("delivered", 204),
                      ("segmentstream", "data_stream"): ("delivered", 204), ("tracify", "events"): ("queued", None)}
    assert [(o.state, o.status) for o in await store.trace("m2", "beta")] == [("delivered", 200)]
    (tracify,) = await store.lease("tracify", now=now, limit=10, lease_seconds=30)
    assert tracify.payload == b"a" * 100 and tracify.message_id == "m1"  # the event stayed for its last job
    await store.complete([tracify], status=200, now=now + 2)
    counts = await store.counts()
    assert counts.pending == {"segmentstream": 0, "tracify": 0}
    assert counts.queued_bytes == {"acme": 0, "beta": 0, "*": 0}
    if isinstance(store, RedisStore):  # the event went with its last job (SQLite: test_an_event_goes_with_its...)
        assert await store.client.keys("segrelay:event:*") == []


async def test_oldest_due_is_how_long_the_head_of_each_queue_has_waited(store: Store) -> None:
    now = time.time()
    assert (await store.oldest_due(now=now))["tracify"] == 0.0
    await store.accept("acme", "m1", b"p", [job("tracify")], now=now - 30, ttl=60)
    await store.accept("acme", "m2", b"p", [job("tracify")], now=now - 5, ttl=60)
    ages = await store.oldest_due(now=now)
    assert 29 <= ages["tracify"] <= 31.5 and ages["audiohook"] == 0.0
    leased = await store.lease("tracify", now=now, limit=1, lease_seconds=30)
    assert 4 <= (await store.oldest_due(now=now))["tracify"] <= 6.5  # the leased one is no longer waiting
    await store.retry(leased[0], due_at=now - 60, status=503, body="")  # a retry long overdue
    assert (await store.oldest_due(now=now))["tracify"] >= 59


async def test_latest_settings_and_a_dead_letters_payload_for_replays(store: Store) -> None:
    now = time.time()
    assert await store.latest_settings("key-a") is None
    await store.save_settings("key-a", b"sealed-1", now=now)
    await store.save_settings("key-a", b"sealed-2", now=now + 1)
    await store.save_settings("key-b", b"sealed-b", now=now)
    assert await store.latest_settings("key-a") == b"sealed-2"
    await store.accept("acme", "m1", b"payload-1", [job()], now=now, ttl=60)
    (leased,) = await store.lease("tracify", now=now, limit=1, lease_seconds=30)
    assert await store.dead_letter_payload(leased.id) is None  # not dead: nothing to replay
    await store.bury(leased, now=now, status=401, body="bad token")
    found = await store.dead_letter_payload(leased.id)
    assert found is not None and found[1] == b"payload-1"
    await store.replace_payload(found[0], b"payload-2")
    assert await store.replay([leased.id], now=now) == 1
    (again,) = await store.lease("tracify", now=now, limit=1, lease_seconds=30)
    assert again.payload == b"payload-2"
    assert await store.dead_letter_payload("12345") is None


async def test_trace_follows_each_postback_of_one_event(store: Store) -> None:
    now = time.time()
    jobs = [job("segmentstream", "track"), job("tracify", "events"), job("audiohook", "pixel")]
    await store.accept("acme", "m1", b"p", jobs, now=now, ttl=60, skips=[("segmentstream", "no data stream id")])
    await store.accept("beta", "m1", b"p", [job("tracify", "events")], now=now, ttl=60)
    states = {(o.vendor, o.target): o.state for o in await store.trace("m1", "acme")}
    assert states == {("segmentstream", "track"): "queued", ("tracify", "events"): "queued",
                      ("audiohook", "pixel"): "queued", ("segmentstream", ""): "skipped"}
    assert {o.tenant for o in await store.trace("m1")} == {"acme", "beta"}
    (ss,) = await store.lease("segmentstream", now=now, limit=5, lease_seconds=30)
    await store.complete([ss], status=204, now=now + 1)
    (tr_acme, _) = sorted(await store.lease("tracify", now=now, limit=5, lease_seconds=30), key=lambda j: j.tenant)
    await store.retry(tr_acme, due_at=now + 30, status=503, body="busy")
    (ah,) = await store.lease("audiohook", now=now, limit=5, lease_seconds=30)
    await store.bury(ah, now=now + 2, status=400, body="bad pixel")
    got = {(o.vendor, o.target): o for o in await store.trace("m1", "acme")}
    assert (got[("segmentstream", "track")].state, got[("segmentstream", "track")].status) == ("delivered", 204)
    assert got[("segmentstream", "track")].attempts == 1
    assert (got[("tracify", "events")].state, got[("tracify", "events")].status) == ("retrying", 503)
    assert got[("tracify", "events")].next_at == pytest.approx(now + 30)
    dead = got[("audiohook", "pixel")]
    assert (dead.state, dead.status, dead.detail) == ("dead", 400, "bad pixel")
    assert got[("segmentstream", "")].detail == "no data stream id"
    assert await store.trace("unknown") == []


# Remembered identities (identity stitching) -----------------------------------------------------------------


def ikey(name: str) -> str:
    """An identity key as app/identity.py makes them: 32 hex digits."""
    return name.encode().hex().ljust(32, "0")


async def test_identities_remember_recall_and_forget(store: Store) -> None:
    now = time.time()
    assert await store.recall([ikey("k1"), ikey("k2")], now=now) == [None, None]
    await store.remember([Identity(ikey("k1"), b"sealed-1", now + 60), Identity(ikey("k2"), b"sealed-2", now + 60)])
    assert await store.recall([ikey("k2"), ikey("missing"), ikey("k1")], now=now) == [b"sealed-2", None, b"sealed-1"]
    await store.remember([Identity(ikey("k1"), b"newer", now + 120)])  # replaced, not added
    assert await store.recall([ikey("k1")], now=now) == [b"newer"]
    assert (await store.counts()).identities == 2
    assert await store.forget([ikey("k1"), ikey("nothing")]) == 1
    assert await store.recall([ikey("k1"), ikey("k2")], now=now) == [None, b"sealed-2"]
    assert (await store.counts()).identities == 1


async def test_identities_batch_keeps_the_last_record_of_a_key(store: Store) -> None:
    now = time.time()
    await store.remember([Identity(ikey("a"), b"first", now + 60), Identity(ikey("b"), b"x", now + 60),
                          Identity(ikey("a"), b"second", now + 60)])
    assert await store.recall([ikey("a"), ikey("b")], now=now) == [b"second", b"x"]
    assert (await store.counts()).identities == 2


async def test_identities_expire_and_are_bounded_oldest_first(store: Store) -> None:
    now = time.time()
    await store.remember([Identity(ikey("gone"), b"x", now - 1)])
    assert await store.recall([ikey("gone")], now=now) == [None]
    await store.remember([Identity(ikey(f"k{i}"), b"x", now + 100 + i) for i in range(5)])
    await store.housekeeping(now=now, max_identities=3)
    assert (await store.counts()).identities == 3
    assert await store.recall([ikey(f"k{i}") for i in range(5)], now=now) == [None, None, b"x", b"x", b"x"]


async def test_one_housekeeping_call_evicts_identities_several_batches_past_the_bound(store: Store) -> None:
    """Identities past their bound go in one call even when that is more than one batch (one batch per call, as
    before, fell behind any steady rate above 2,000 new identities a second)."""
    now = time.time()
    await store.remember([Identity(ikey(f"k{i}"), b"x", now + 100 + i) for i in range(5000)])
    await store.housekeeping(now=now, max_identities=10)
    assert (await store.counts()).identities == 10
    assert await store.recall([ikey("k4989"), ikey("k4990"), ikey("k4999")], now=now) == [None, b"x", b"x"]


async def test_writers_map_the_queue_file_as_far_as_sqlite_allows(tmp_path: Path) -> None:
    """A growing queue's busiest pages are at its file's end, and every other process's commit empties a connection's
    page cache: past the map, each page read is a system call again (with 256 MB mapped, a delivery process read
    three times as often at 1,000,000 queued; README, 0.13.13). Writers map up to SQLite's own ceiling, 2 GB
    unless the build sets another."""
    with contextlib.closing(sqlite3.connect(":memory:")) as probe:
        options = dict(o[0].partition("=")[::2] for o in probe.execute("PRAGMA compile_options"))
    wanted = min(0x7FFF0000, int(options.get("MAX_MMAP_SIZE", "0x7fff0000"), 0))
    store = SQLiteStore(str(tmp_path / "store.db"))
    accept_writer = store.accept_committer().conn
    delivery = connect_writer(tmp_path / "store.db", durable=False, prepare=lambda c: None)
    try:
        assert accept_writer.execute("PRAGMA mmap_size").fetchone()[0] == wanted
        assert delivery.execute("PRAGMA mmap_size").fetchone()[0] == wanted
    finally:
        accept_writer.close()
        delivery.close()
        await store.close()


async def test_the_accept_writer_keeps_a_small_page_cache_and_delivery_a_large_one(tmp_path: Path) -> None:
    """SQLite walks its page cache's whole hash table at the end of every transaction, and the accept writer's cache
    fills with random pages of the idempotency index: 64 MB cost it 14 % of its CPU in that walk, 4 MB under 2 %
    (README, 0.13.17). A delivery process keeps 64 MB so that its index pages stay at hand at depth."""
    store = SQLiteStore(str(tmp_path / "store.db"))
    accept_writer = store.accept_committer().conn
    delivery = connect_writer(tmp_path / "store.db", durable=False, prepare=lambda c: None)
    try:
        assert accept_writer.execute("PRAGMA cache_size").fetchone()[0] == -4096
        assert delivery.execute("PRAGMA cache_size").fetchone()[0] == -65536
    finally:
        accept_writer.close()
        delivery.close()
        await store.close()


async def test_a_look_leases_only_other_tenants_due_jobs_among_the_first_it_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A look past blocked tenants (`skip_tenants`) passes over their jobs without leasing them, takes other
    tenants' due jobs oldest first from every share, and reads no further than LOOK_SCAN due jobs."""
    monkeypatch.setattr(sqlite_store, "LOOK_SCAN", 6)
    store = SQLiteStore(str(tmp_path / "store.db"))
    now = time.time()
    try:
        for n, tenant in enumerate(["loud"] * 3 + ["quiet"] + ["loud"] * 3 + ["quiet", "late"]):
            await store.accept(tenant, f"m{n}", b"p", [job("tracify")], now=now + n, ttl=60)
        later = now + 100
        look = await store.lease("tracify", now=later, limit=5, lease_seconds=30, every_share=True,
                                 skip_tenants={"loud"})
        assert [(j.tenant, j.message_id) for j in look] == [("quiet", "m3")]  # m7 and m8 lie past the first six
        assert await store.lease("tracify", now=later, limit=5, lease_seconds=30, every_share=True,
                                 skip_tenants={"loud"}) == []  # the first six due now: all loud
        monkeypatch.setattr(sqlite_store, "LOOK_SCAN", 100)
        again = await store.lease("tracify", now=later, limit=5, lease_seconds=30, every_share=True,
                                  skip_tenants={"loud", "late"})
        assert [(j.tenant, j.message_id) for j in again] == [("quiet", "m7")]
        rest = await store.lease("tracify", now=later, limit=10, lease_seconds=30)
        assert sorted(j.message_id for j in rest) == [f"m{n}" for n in (0, 1, 2, 4, 5, 6, 8)]  # none leased before
    finally:
        await store.close()


async def test_a_lease_writes_new_jobs_first_in_short_transactions_of_their_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The jobs of newly accepted events are written before a lease, FAN_OUT_EVENTS events a transaction, at most
    FAN_OUT_ROUNDS of them (the rest wait for the next lease), and the lease's own transaction writes none: a long
    transaction holds the write lock that accepts wait for."""
    monkeypatch.setattr(sqlite_store, "FAN_OUT_EVENTS", 4)
    monkeypatch.setattr(sqlite_store, "FAN_OUT_ROUNDS", 3)
    store = SQLiteStore(str(tmp_path / "store.db"))
    now = time.time()
    try:
        for n in range(20):
            await store.accept("acme", f"m{n}", b"p", [job("tracify")], now=now, ttl=60)
        before = store.commits
        first = await store.lease("tracify", now=now + 1, limit=100, lease_seconds=30)
        assert sorted(int(j.message_id[1:]) for j in first) == list(range(12))  # three rounds of four events
        assert store.commits - before == 4  # three fan-outs, then the lease
        second = await store.lease("tracify", now=now + 1, limit=100, lease_seconds=30)
        assert sorted(int(j.message_id[1:]) for j in second) == list(range(12, 20))
        before = store.commits
        assert await store.lease("tracify", now=now + 1, limit=100, lease_seconds=30) == []
        assert store.commits - before == 2  # a fan-out that found nothing new ends the rounds
    finally:
        await store.close()


async def test_one_housekeeping_call_removes_several_batches_of_expired_records(tmp_path: Path) -> None:
    """SQLite keeps idempotency records and outcomes in tables that housekeeping empties: at 1,500 events/s that is
    6,000 outcomes a second to expire, several batches per call. (Redis expires them on its own.)"""
    store = SQLiteStore(str(tmp_path / "store.db"))
    now = time.time()
    try:
        await asyncio.gather(*(store.accept("acme", f"m{i}", b"sealed", [job("audiohook", "pixel")], now=now, ttl=1,
                                            skips=[("tracify", "no_url")]) for i in range(4500)))
        await store.housekeeping(now=now + 10, keep_seconds=5)
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "store.db")) as conn:
        assert conn.execute("SELECT COUNT(*) FROM seen").fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM outcomes").fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 4500  # the queue itself is untouched


# The layout of 0.10 and before, as it was created then: outcomes keyed by messageId, events counting their jobs left.
SCHEMA_0_10 = """
CREATE TABLE api_keys (
    key_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, digest TEXT NOT NULL, created_at REAL NOT NULL,
    expires_at REAL, vendors TEXT NOT NULL DEFAULT '', revoked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE seen (
    tenant TEXT NOT NULL, message_id TEXT NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (tenant, message_id)) WITHOUT ROWID;
CREATE INDEX seen_expiry ON seen (expires_at);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL, message_id TEXT NOT NULL, payload BLOB NOT NULL,
    jobs_left INTEGER NOT NULL);
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, event_id INTEGER NOT NULL, vendor TEXT NOT NULL, target TEXT NOT NULL,
    tenant TEXT NOT NULL, event_name TEXT NOT NULL, batch_key TEXT NOT NULL, size INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, due_at REAL NOT NULL,
    leased INTEGER NOT NULL DEFAULT 0, dead INTEGER NOT NULL DEFAULT 0,
    last_status INTEGER, last_body TEXT NOT NULL DEFAULT '', died_at REAL);
CREATE INDEX jobs_due ON jobs (vendor, due_at) WHERE dead = 0;
CREATE INDEX jobs_leased ON jobs (leased) WHERE leased = 1;
CREATE INDEX jobs_dead ON jobs (vendor, died_at) WHERE dead = 1;
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX events_message ON events (message_id);
CREATE TABLE outcomes (
    message_id TEXT NOT NULL, tenant TEXT NOT NULL, vendor TEXT NOT NULL, target TEXT NOT NULL,
    state TEXT NOT NULL, status INTEGER, detail TEXT NOT NULL DEFAULT '', attempts INTEGER NOT NULL DEFAULT 0,
    at REAL NOT NULL, PRIMARY KEY (message_id, tenant, vendor, target)) WITHOUT ROWID;
CREATE INDEX outcomes_age ON outcomes (at);
CREATE TABLE key_settings (key_id TEXT PRIMARY KEY, payload BLOB NOT NULL, updated_at REAL NOT NULL);
"""


async def test_a_file_of_0_10_keeps_its_queue_and_history_in_the_new_layout(tmp_path: Path) -> None:
    """A store file written by 0.10: a half-delivered event (one postback delivered, one queued, one skipped), a
    message delivered in full (its event gone), and an outcome whose idempotency record had already expired."""
    path = tmp_path / "store.db"
    now = time.time()
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.executescript(SCHEMA_0_10)
        conn.execute("INSERT INTO seen VALUES ('acme', 'm-half', ?), ('acme', 'm-done', ?)", (now + 60, now + 60))
        conn.execute("INSERT INTO events VALUES (7, 'acme', 'm-half', x'01', 1)")
        conn.execute("INSERT INTO jobs (id, event_id, vendor, target, tenant, event_name, batch_key, size, created_at,"
                     " due_at) VALUES (3, 7, 'audiohook', 'pixel', 'acme', 'Order Completed', '', 1, ?, ?)", (now, now))
        conn.executemany("INSERT INTO outcomes VALUES (?, 'acme', ?, ?, ?, ?, ?, ?, ?)", [
            ("m-half", "segmentstream", "track", "delivered", 204, "", 1, now),
            ("m-half", "tracify", "", "skipped", None, "no page url", 0, now),
            ("m-done", "tracify", "events", "delivered", 200, "", 2, now),
            ("m-expired", "tracify", "events", "delivered", 200, "", 1, now)])
        conn.executemany("INSERT INTO counters VALUES (?, ?)", [("pending:audiohook", 1), ("bytes:acme", 1),
                                                                ("bytes:*", 1)])
    store = SQLiteStore(str(path))
    try:
        half = {(o.vendor, o.target): (o.state, o.status, o.attempts, o.detail) for o in await store.trace("m-half")}
        assert half == {("segmentstream", "track"): ("delivered", 204, 1, ""),
                        ("tracify", ""): ("skipped", None, 0, "no page url"),
                        ("audiohook", "pixel"): ("queued", None, 0, "")}
        assert [(o.tenant, o.state, o.status, o.attempts) for o in await store.trace("m-done", "acme")] == [
            ("acme", "delivered", 200, 2)]
        assert await store.trace("m-expired") == []
        (queued,) = await store.lease("audiohook", now=now, limit=5, lease_seconds=30)
        assert (queued.event_id, queued.payload) == ("7", b"\x01")
        await store.complete([queued], status=200, now=now + 1)
        assert {o.state for o in await store.trace("m-half", "acme")} == {"delivered", "skipped"}
        assert await store.accept("acme", "m-new", b"p", [job()], now=now, ttl=60)
        assert [o.state for o in await store.trace("m-new")] == ["queued"]
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT id FROM events").fetchall() == [(8,)]  # m-half's went with its last job
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        assert "outcomes_0_10" not in names and "events_message" not in names and "jobs_event" in names


async def test_an_event_goes_with_its_last_job_and_a_dead_letter_keeps_it(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "store.db"))
    now = time.time()
    try:
        await store.accept("acme", "m1", b"p", [job("tracify"), job("audiohook", "pixel")], now=now, ttl=60)
        (tr,) = await store.lease("tracify", now=now, limit=5, lease_seconds=30)
        (ah,) = await store.lease("audiohook", now=now, limit=5, lease_seconds=30)
        await store.bury(ah, now=now, status=400, body="bad")
        await store.complete([tr], status=200, now=now)
        assert (await store.dead_letter_payload(ah.id)) == (ah.event_id, b"p")  # kept for a replay
        assert await store.replay([ah.id], now=now) == 1
        (again,) = await store.lease("audiohook", now=now, limit=5, lease_seconds=30)
        await store.complete([again], status=200, now=now)
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "store.db")) as conn:
        assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 0


async def test_the_first_lease_writes_every_vendors_jobs_of_the_new_events_once(store: Store, store_url: str) -> None:
    """On SQLite an accept stores an event with its routes, not its jobs: the next lease of any vendor writes them,
    for every vendor, in the order the events came, and never twice. Until then the event's postbacks still count as
    queued: in the counters, `trace`, `oldest_due` and `stats`. Redis writes the jobs at accept: the same answers."""
    now = time.time()
    assert await store.accept("acme", "m1", b"p1", [job("tracify"), job("audiohook", "pixel")], now=now, ttl=60)
    assert await store.accept("acme", "m2", b"p2", [job("audiohook", "pixel")], now=now + 1, ttl=60)
    assert await store.accept("acme", "m3", b"p3", [job("segmentstream", "track"),
                                                    job("segmentstream", "data_stream")], now=now + 2, ttl=60)
    if store_url.startswith("sqlite"):
        assert sqlite_rows(store_url) == (3, 0)  # three events, no job rows yet
    assert [(o.vendor, o.target, o.state, o.next_at) for o in await store.trace("m1")] == [
        ("audiohook", "pixel", "queued", now), ("tracify", "events", "queued", now)]
    assert await store.oldest_due(now=now + 10) == {"segmentstream": 8.0, "tracify": 10.0, "audiohook": 10.0}
    assert (await store.counts()).pending == {"tracify": 1, "audiohook": 2, "segmentstream": 2}

    (leased,) = await store.lease("tracify", now=now + 10, limit=5, lease_seconds=30)
    assert (leased.message_id, leased.payload, leased.created_at) == ("m1", b"p1", now)
    if store_url.startswith("sqlite"):
        assert sqlite_rows(store_url) == (3, 5)
    assert await store.oldest_due(now=now + 10) == {"segmentstream": 8.0, "tracify": 0.0, "audiohook": 10.0}

    assert await store.accept("acme", "m4", b"p4", [job("audiohook", "pixel")], now=now + 3, ttl=60)
    audiohook = await store.lease("audiohook", now=now + 10, limit=5, lease_seconds=30)
    assert [(j.message_id, j.created_at) for j in audiohook] == [("m1", now), ("m2", now + 1), ("m4", now + 3)]
    assert await store.lease("tracify", now=now + 10, limit=5, lease_seconds=30) == []  # nothing written twice
    if store_url.startswith("sqlite"):
        assert sqlite_rows(store_url) == (4, 6)
    assert await store.accept("acme", "m5", b"p5", [job("segmentstream", "track")], now=now + 4, ttl=60)
    stats = await store.stats(now=now + 10)  # writes the jobs first: exact figures
    assert {vendor: (s.pending, s.leased, s.due) for vendor, s in stats.vendors.items() if s.pending or s.leased} == {
        "segmentstream": (3, 0, 3), "tracify": (0, 1, 0), "audiohook": (0, 3, 0)}
    assert await store.fan_out() == 0
    segmentstream = await store.lease("segmentstream", now=now + 10, limit=5, lease_seconds=30)
    assert [(j.message_id, j.target) for j in segmentstream] == [("m3", "track"), ("m3", "data_stream"),
                                                                 ("m5", "track")]
    await store.complete([*segmentstream, *audiohook, leased], status=200, now=now + 11)
    assert await pending(store) == 0


def sqlite_rows(store_url: str) -> tuple[int, int]:
    """(event rows, job rows) of a SQLite store."""
    with contextlib.closing(sqlite3.connect(store_url.removeprefix("sqlite:///"))) as conn:
        (events,) = conn.execute("SELECT COUNT(*) FROM events").fetchone()
        (jobs,) = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()
        return int(events), int(jobs)


async def test_a_file_of_0_13_5_keeps_its_jobs_and_fans_out_only_what_comes_after(tmp_path: Path) -> None:
    """Up to 0.13.5 every accept wrote its jobs' rows: opening such a file must neither lose them nor write them
    again, and events accepted afterwards get theirs from the next lease."""
    path = tmp_path / "store.db"
    now = time.time()
    old_schema = SCHEMA.replace(", routes TEXT, accepted_at REAL", "").replace(
        "CREATE TABLE IF NOT EXISTS cursors (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;", "")
    assert "routes" not in old_schema and "cursors" not in old_schema
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.executescript(old_schema)
        conn.execute("INSERT INTO events (id, tenant, message_id, payload, jobs) VALUES (5, 'acme', 'm-old', x'01', 1)")
        conn.execute("INSERT INTO jobs (event_id, vendor, target, tenant, event_name, batch_key, size, created_at,"
                     " due_at) VALUES (5, 'audiohook', 'pixel', 'acme', 'Order Completed', '', 1, ?, ?)", (now, now))
    store = SQLiteStore(str(path))
    try:
        assert await store.accept("acme", "m-new", b"p", [job("audiohook", "pixel")], now=now, ttl=60)
        leased = await store.lease("audiohook", now=now + 1, limit=5, lease_seconds=30)
        assert [(j.message_id, j.event_id) for j in leased] == [("m-old", "5"), ("m-new", "6")]
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 2


async def test_a_job_keeps_every_field_exactly_through_the_store(store: Store) -> None:
    """An event's routes travel as JSON on SQLite (read back by SQLite's JSON functions when the rows are written):
    names with quotes, tabs, newlines, non-ASCII and emoji, and a long batch key, come back as they went in."""
    now = time.time()
    name = 'Ordér "Completed"\t\n\\ ✓ 🛒 ' + "x" * 300
    payload = bytes(range(256)) * 11
    assert await store.accept("acme\u00e9", "m-é", payload, [NewJob("tracify", "events", name, "k" * 64)], now=now,
                              ttl=60)
    (leased,) = await store.lease("tracify", now=now, limit=5, lease_seconds=30)
    assert (leased.tenant, leased.message_id, leased.event_name, leased.batch_key) == ("acme\u00e9", "m-é", name,
                                                                                       "k" * 64)
    assert (leased.payload, leased.size, leased.created_at, leased.attempts) == (payload, len(payload), now, 0)


async def test_delivery_processes_share_sqlites_queue_by_event_and_take_over_what_waits(tmp_path: Path) -> None:
    """Two delivery processes on one file: each leases every vendor's jobs of its own share of the events (so one
    process parses an event once for all its vendors); once its share is drained it takes the other's jobs that
    have waited TAKE_OVER_AFTER; a process that stopped leasing is left out after LIVE_SECONDS."""
    path = str(tmp_path / "store.db")
    http = SQLiteStore(path)
    first, second = (SQLiteStore(path, durable=False, slot=PRIORITY_SLOTS + i) for i in range(2))
    t0 = time.time()
    try:
        for store in (first, second):  # each notes that it leases
            assert await store.lease("tracify", now=t0, limit=10, lease_seconds=30) == []
        for n in range(10):
            assert await http.accept("acme", f"m{n}", b"p", [job("tracify"), job("audiohook", "pixel")],
                                     now=t0 + 1.5, ttl=60)
        now = t0 + 2.0  # a look at the live processes again; the events have waited 0.5 s
        mine = await first.lease("tracify", now=now, limit=10, lease_seconds=30)
        mine += await first.lease("audiohook", now=now, limit=10, lease_seconds=30)
        theirs = await second.lease("audiohook", now=now, limit=10, lease_seconds=30)
        assert len(mine) == 10 and len(theirs) == 5
        events = {j.event_id for j in mine}
        assert len(events) == 5 and not events & {j.event_id for j in theirs}
        assert {j.event_id for j in mine if j.vendor == "tracify"} == events  # both vendors of one event, here
        # The second process has not leased its share of tracify's jobs: after TAKE_OVER_AFTER the first takes them.
        assert await first.lease("tracify", now=now + 0.4, limit=10, lease_seconds=30) == []
        taken = await first.lease("tracify", now=t0 + 1.5 + TAKE_OVER_AFTER, limit=10, lease_seconds=30)
        assert {j.event_id for j in taken} == {j.event_id for j in theirs}
        # The second stops leasing: past LIVE_SECONDS the first's share is every event, fresh ones at once.
        later = t0 + 2.0 + LIVE_SECONDS + SHARE_REFRESH
        for n in range(4):
            assert await http.accept("acme", f"late{n}", b"p", [job("tracify")], now=later, ttl=60)
        assert len(await first.lease("tracify", now=later, limit=10, lease_seconds=30)) == 4
        # A look past blocked tenants (`every_share`) takes fresh jobs of every share at once.
        again = later + SHARE_REFRESH
        assert await second.lease("segmentstream", now=again, limit=10, lease_seconds=30) == []  # back, noted
        for n in range(8):
            assert await http.accept("acme", f"look{n}", b"p", [job("audiohook", "pixel")], now=again, ttl=60)
        assert len(await first.lease("audiohook", now=again, limit=2, lease_seconds=30)) == 2  # its own share
        look = await first.lease("audiohook", now=again, limit=10, lease_seconds=30, every_share=True)
        assert len(look) == 6 and len({int(j.event_id) % 2 for j in look}) == 2
    finally:
        for store in (http, first, second):
            await store.close()
