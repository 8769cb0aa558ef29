"""Two `segrelay serve` replicas sharing one real Redis: any replica accepts, dedupes and delivers."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import redis

from tests.support import RedisServer, Segrelay, VendorStub, fixture, wait_until
from tests.test_crash_e2e import Load, delivered_message_ids, hit_ids, report, settle

SS_ONLY = {"segmentstreamApiToken": "ss-token"}


def replicas(make_server: type[Segrelay], redis_server: RedisServer, db: int,
             env: dict[str, str] | None = None) -> tuple[Segrelay, Segrelay]:
    url = f"redis://127.0.0.1:{redis_server.port}/{db}"
    redis.Redis.from_url(url).flushdb()
    shared = {"SEGRELAY_STORE": url, **(env or {})}
    first = make_server(shared, name="replica-a")
    second = make_server(shared, name="replica-b")
    first.start()
    second.key = first.key
    second.start()
    return first, second


def order() -> dict[str, Any]:
    return {**fixture("order_completed.json"), "messageId": f"m-{uuid.uuid4()}"}


def drained(service: Segrelay) -> bool:
    row = json.loads(service.cli("queue", "stats", "--json").stdout)["segmentstream"]
    return bool(row["pending"] == 0 and row["leased"] == 0)


def test_events_posted_alternately_are_all_delivered_and_duplicates_caught_anywhere(
        fresh_stub: VendorStub, make_server: type[Segrelay], redis_server: RedisServer) -> None:
    a, b = replicas(make_server, redis_server, db=14)
    events = [order() for _ in range(40)]
    for i, event in enumerate(events):
        assert (a if i % 2 else b).post(event, SS_ONLY).status_code == 202
    wanted = hit_ids({e["messageId"] for e in events})
    assert wait_until(lambda: wanted <= set(delivered_message_ids(fresh_stub)), 30)
    duplicate = b.post(events[1], SS_ONLY)  # events[1] was accepted by replica a
    assert duplicate.status_code == 200 and duplicate.json()["message"] == "duplicate"
    assert wait_until(lambda: drained(a))
    seen = delivered_message_ids(fresh_stub)
    assert sum(seen.values()) == len(events)  # nothing sent twice


def test_kill_9_of_one_replica_loses_nothing(fresh_stub: VendorStub, make_server: type[Segrelay],
                                             redis_server: RedisServer) -> None:
    fresh_stub.script("/segmentstream", [], default={"status": 204, "delay": 0.2})
    a, b = replicas(make_server, redis_server, db=13, env={"SEGRELAY_LEASE_SECONDS": "3",
                                                           "SEGRELAY_CONNECT_TIMEOUT": "1",
                                                           "SEGRELAY_READ_TIMEOUT": "1.5",
                                                           "SEGRELAY_VENDOR_CONCURRENCY": "8",
                                                           "SEGRELAY_TENANT_CONCURRENCY": "8",
                                                           "SEGRELAY_DELIVERY_PROCESSES": "1"})
    load = Load(a, total=200).start()
    assert wait_until(lambda: len(load.accepted) >= 150, 60)
    a.kill()  # with postbacks leased and on the wire
    load.join()
    settle(b, fresh_stub, load)
    figures = report("redis kill -9 of one replica", load, delivered_message_ids(fresh_stub), {"in_flight_limit": 8})
    assert figures["lost"] == 0
    assert figures["duplicate_sends"] <= 2 * 8  # on the wire, or answered but not yet recorded (at most as many)


def test_kill_9_of_redis_itself_loses_nothing_accepted(fresh_stub: VendorStub, make_server: type[Segrelay],
                                                       tmp_path_factory: pytest.TempPathFactory) -> None:
    redis_server = RedisServer(tmp_path_factory.mktemp("redis-crash"))  # AOF, appendfsync always
    fresh_stub.script("/segmentstream", [], default={"status": 204, "delay": 0.2})
    service = make_server({"SEGRELAY_STORE": redis_server.url, "SEGRELAY_LEASE_SECONDS": "3",
                           "SEGRELAY_CONNECT_TIMEOUT": "1", "SEGRELAY_READ_TIMEOUT": "1.5",
                           "SEGRELAY_VENDOR_CONCURRENCY": "8", "SEGRELAY_TENANT_CONCURRENCY": "8"},
                          name="replica-r")
    service.start()
    try:
        load = Load(service, total=300).start()
        assert wait_until(lambda: len(load.accepted) >= 100, 60)
        redis_server.kill()  # the store itself dies, with work queued and leased
        assert wait_until(lambda: load.statuses["503"] > 0, 30)  # Segment is told to retry meanwhile
        redis_server.start()  # same port and directory: the AOF is replayed
        load.join()
        settle(service, fresh_stub, load)
        figures = report("redis kill -9 and restart", load, delivered_message_ids(fresh_stub), {})
        assert figures["lost"] == 0
    finally:
        redis_server.stop()
