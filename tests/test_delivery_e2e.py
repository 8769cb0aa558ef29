"""Durable delivery end to end: the real server, a real SQLite file, the vendor stub answering as scripted."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import sqlite3
import time
import uuid
from typing import Any

import httpx
import pytest
import redis

from tests.support import ALL_VENDORS, SITE_ID, Segrelay, VendorStub, child_pids, fixture, role, wait_until
from tests.test_crash_e2e import delivered_message_ids, hit_ids

SS_ONLY = {"segmentstreamApiToken": "ss-token"}
TRACIFY_ONLY = {"tracifyApiToken": "tr-token", "tracifyCustomerSiteId": SITE_ID}


def order(message_id: str | None = None) -> dict[str, Any]:
    return {**fixture("order_completed.json"), "messageId": message_id or f"m-{uuid.uuid4()}"}


def delivered(stub: VendorStub, prefix: str, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
    assert wait_until(lambda: len(stub.requests(prefix)) >= count, timeout), stub.requests(prefix)
    return stub.requests(prefix)


def dlq(service: Segrelay) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(service.cli("dlq", "list", "--json").stdout)
    return rows


def queue_stats(service: Segrelay) -> dict[str, dict[str, int]]:
    stats: dict[str, dict[str, int]] = json.loads(service.cli("queue", "stats", "--json").stdout)
    return stats


def settled(service: Segrelay, vendor: str) -> bool:
    row = queue_stats(service)[vendor]
    return row["pending"] == 0 and row["leased"] == 0


def test_500_503_500_then_204_is_delivered_once_with_the_same_hit_id(fresh_stub: VendorStub,
                                                                     make_server: type[Segrelay]) -> None:
    fresh_stub.script("/segmentstream/track", [{"status": 500}, {"status": 503}, {"status": 500}])
    service = make_server().start()
    assert service.post(order(), SS_ONLY).status_code == 202
    requests = delivered(fresh_stub, "/segmentstream/track", 4)
    assert wait_until(lambda: settled(service, "segmentstream"))
    assert len(fresh_stub.requests("/segmentstream/track")) == 4
    assert len({json.loads(r["body"])["hitId"] for r in requests}) == 1
    assert requests[0]["headers"]["authorization"] == "Basic c3MtdG9rZW46"
    metrics = httpx.get(service.url + "/metrics").text
    assert 'segrelay_postbacks_total{outcome="retried",vendor="segmentstream"} 3.0' in metrics
    assert 'segrelay_postbacks_total{outcome="delivered",vendor="segmentstream"} 1.0' in metrics
    assert dlq(service) == []


def test_429_with_retry_after_waits_before_the_next_attempt(fresh_stub: VendorStub,
                                                            make_server: type[Segrelay]) -> None:
    fresh_stub.script("/segmentstream/track", [{"status": 429, "headers": {"Retry-After": "1"}}])
    service = make_server().start()
    service.post(order(), SS_ONLY)
    first, second = delivered(fresh_stub, "/segmentstream/track", 2)
    gap = second["at"] - first["at"]
    assert gap >= 1.0, f"the retry came {gap:.3f} s after a Retry-After of 1 s"


def test_a_hang_past_the_read_timeout_is_retried(fresh_stub: VendorStub, make_server: type[Segrelay]) -> None:
    fresh_stub.script("/segmentstream/track", [{"status": 204, "delay": 3}])
    service = make_server({"SEGRELAY_READ_TIMEOUT": "0.5"}).start()
    service.post(order(), SS_ONLY)
    delivered(fresh_stub, "/segmentstream/track", 2)
    assert wait_until(lambda: settled(service, "segmentstream"))
    assert dlq(service) == []


def test_400_is_dead_lettered_at_once_then_replayed(fresh_stub: VendorStub, make_server: type[Segrelay]) -> None:
    fresh_stub.script("/segmentstream/track", [{"status": 400, "body": '{"error": "hitId malformed"}'}])
    service = make_server().start()
    event = order()
    service.post(event, SS_ONLY)
    assert wait_until(lambda: len(dlq(service)) == 1)
    (letter,) = dlq(service)
    assert letter["vendor"] == "segmentstream" and letter["last_status"] == 400 and letter["attempts"] == 1
    assert letter["last_body"] == '{"error": "hitId malformed"}'
    assert letter["message_id"] == event["messageId"] and letter["tenant"] == "acme"
    assert len(fresh_stub.requests("/segmentstream/track")) == 1
    text_listing = service.cli("dlq", "list").stdout
    assert "hitId malformed" in text_listing and "status=400" in text_listing
    dead_line = next(json.loads(line) for line in service.logs().splitlines()
                     if line.startswith("{") and '"outcome":"dead"' in line)
    assert dead_line["message_ids"] == [event["messageId"]] and dead_line["vendor"] == "segmentstream"
    assert dead_line["attempt"] == 1 and dead_line["status"] == 400
    assert "replayed 1" in service.cli("dlq", "replay", letter["id"]).stdout
    delivered(fresh_stub, "/segmentstream/track", 2)
    assert wait_until(lambda: settled(service, "segmentstream") and dlq(service) == [])


def test_fixing_the_token_in_segment_then_replaying_sends_with_the_new_token(fresh_stub: VendorStub,
                                                                            make_server: type[Segrelay]) -> None:
    fresh_stub.script("/segmentstream/track", [{"status": 401, "body": '{"error": "bad token"}'}])
    service = make_server().start()
    first = order()
    service.post(first, {"segmentstreamApiToken": "old-token"})
    assert wait_until(lambda: len(dlq(service)) == 1)
    (letter,) = dlq(service)
    assert letter["last_status"] == 401
    # The customer fixes the token in Segment; the next event arrives with it.
    service.post(order(), {"segmentstreamApiToken": "new-token"})
    delivered(fresh_stub, "/segmentstream/track", 2)
    replayed = service.cli("dlq", "replay", letter["id"]).stdout
    assert "replayed 1 dead letter(s); 1 rendered again with the latest settings received with their API key" in replayed
    sent = delivered(fresh_stub, "/segmentstream/track", 3)
    tokens = [base64.b64decode(r["headers"]["authorization"].split()[1]).decode() for r in sent]
    assert tokens == ["old-token:", "new-token:", "new-token:"]
    assert json.loads(sent[2]["body"])["hitId"] == json.loads(sent[0]["body"])["hitId"]  # the same event
    unknown = service.cli("dlq", "replay", "999999", check=False)
    assert unknown.returncode == 1 and "no dead letter with id 999999" in unknown.stderr


def test_replay_with_settings_given_on_the_command_line(fresh_stub: VendorStub,
                                                        make_server: type[Segrelay]) -> None:
    fresh_stub.script("/segmentstream/track", [{"status": 401, "body": "no"}])
    service = make_server().start()
    service.post(order(), {"segmentstreamApiToken": "old-token"})
    assert wait_until(lambda: len(dlq(service)) == 1)
    out = service.cli("dlq", "replay", "--all", "--settings", '{"segmentstreamApiToken": "cli-token"}').stdout
    assert "1 rendered again with the --settings given" in out
    sent = delivered(fresh_stub, "/segmentstream/track", 2)
    assert base64.b64decode(sent[1]["headers"]["authorization"].split()[1]) == b"cli-token:"


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_trace_follows_one_event_to_every_vendor(fresh_stub: VendorStub, make_server: type[Segrelay],
                                                 kind: str, request: pytest.FixtureRequest) -> None:
    env = {}
    if kind == "redis":
        redis_server = request.getfixturevalue("redis_server")
        env["SEGRELAY_STORE"] = f"redis://127.0.0.1:{redis_server.port}/9"
        redis.Redis.from_url(env["SEGRELAY_STORE"]).flushdb()
    fresh_stub.script("/audiohook", [{"status": 400, "body": "bad pixel"}])
    fresh_stub.script("/tracify", [], default={"status": 503, "body": "busy"})
    service = make_server(env).start()
    event = order()
    settings = {**ALL_VENDORS, "segmentstreamDataStreamId": None}  # so SegmentStream sends track only
    assert service.post(event, {k: v for k, v in settings.items() if v is not None}).status_code == 202
    delivered(fresh_stub, "/segmentstream/track", 1)

    def states() -> dict[str, dict[str, Any]]:
        out = service.cli("trace", event["messageId"], "--json", check=False).stdout
        return {f"{r['vendor']}/{r['target']}": r for r in json.loads(out or "[]")}
    assert wait_until(lambda: states().get("audiohook/pixel", {}).get("state") == "dead", 15), states()
    assert wait_until(lambda: states().get("tracify/events", {}).get("state") == "retrying", 15), states()
    rows = states()
    assert rows["segmentstream/track"]["state"] == "delivered" and rows["segmentstream/track"]["status"] == 204
    assert rows["audiohook/pixel"]["status"] == 400 and rows["audiohook/pixel"]["detail"] == "bad pixel"
    assert rows["tracify/events"]["status"] == 503 and rows["tracify/events"]["next_at"]
    table = service.cli("trace", event["messageId"], "--tenant", "acme").stdout
    assert "delivered" in table and "dead" in table and "next attempt" in table
    missing = service.cli("trace", "no-such-message", check=False)
    assert missing.returncode == 1 and "nothing known of messageId 'no-such-message'" in missing.stderr


def test_tracify_status_false_is_dead_lettered(fresh_stub: VendorStub, make_server: type[Segrelay]) -> None:
    fresh_stub.script("/tracify", [{"status": 200, "body": '{"status": false, "error": "invalid token"}'}])
    service = make_server().start()
    service.post(order(), TRACIFY_ONLY)
    assert wait_until(lambda: len(dlq(service)) == 1)
    letter = dlq(service)[0]
    assert letter["vendor"] == "tracify" and letter["last_status"] == 200 and "invalid token" in letter["last_body"]
    request = fresh_stub.requests("/tracify")[0]
    assert request["path"] == "/tracify/api/v1/events" and request["headers"]["tracify-token"] == "tr-token"


def test_a_duplicate_message_id_is_not_sent_twice(fresh_stub: VendorStub, make_server: type[Segrelay]) -> None:
    service = make_server().start()
    event = order()
    assert service.post(event, SS_ONLY).status_code == 202
    delivered(fresh_stub, "/segmentstream/track", 1)
    again = service.post(event, SS_ONLY)
    assert again.status_code == 200 and again.json()["message"] == "duplicate"
    assert wait_until(lambda: settled(service, "segmentstream"))
    assert len(fresh_stub.requests("/segmentstream/track")) == 1
    assert "segrelay_duplicates_total 1.0" in httpx.get(service.url + "/metrics").text


def test_queue_bound_in_bytes_and_each_tenants_share_answer_503(fresh_stub: VendorStub,
                                                                 make_server: type[Segrelay]) -> None:
    fresh_stub.script("/segmentstream", [], default={"status": 503})
    service = make_server({"SEGRELAY_MAX_QUEUE_MB": "0.01", "SEGRELAY_TENANT_QUEUE_SHARE": "0.5",
                           "SEGRELAY_RETRY_BASE_SECONDS": "30"}).start()
    quiet_key = service.create_key(tenant="quiet")
    flood = [service.post(order(), SS_ONLY) for _ in range(12)]
    statuses = [a.status_code for a in flood]
    assert 202 in statuses and statuses[-1] == 503, statuses
    assert statuses == sorted(statuses)  # accepted until the share was used, refused after
    refused = flood[-1]
    assert refused.headers["retry-after"] == "30"
    assert "This destination's share of the delivery queue is full" in refused.json()["message"]
    # Another tenant still has room, until the queue as a whole is full.
    quiet = [service.post(order(), SS_ONLY, key=quiet_key) for _ in range(12)]
    assert quiet[0].status_code == 202
    assert quiet[-1].status_code == 503 and "queue is full" in quiet[-1].json()["message"]


def test_retries_exhausted_become_dead_letters_with_the_last_answer(fresh_stub: VendorStub,
                                                                    make_server: type[Segrelay]) -> None:
    fresh_stub.script("/audiohook", [], default={"status": 502, "body": "bad gateway"})
    service = make_server({"SEGRELAY_MAX_ATTEMPTS": "3"}).start()
    service.post(order(), {"audiohookId": ALL_VENDORS["audiohookId"]})
    assert wait_until(lambda: len(dlq(service)) == 1)
    letter = dlq(service)[0]
    assert (letter["attempts"], letter["last_status"], letter["last_body"]) == (3, 502, "bad gateway")
    assert len(fresh_stub.requests("/audiohook")) == 3


def test_tracify_postbacks_due_together_share_one_request(fresh_stub: VendorStub,
                                                          make_server: type[Segrelay]) -> None:
    service = make_server({"SEGRELAY_DELIVERY": "off"}).start()
    for _ in range(5):
        assert service.post(order(), TRACIFY_ONLY).status_code == 202
    service.terminate()
    service.env["SEGRELAY_DELIVERY"] = "on"
    service.start()
    (request,) = delivered(fresh_stub, "/tracify", 1)
    assert len(json.loads(request["body"])["events"]) == 5
    assert wait_until(lambda: settled(service, "tracify"))
    assert len(fresh_stub.requests("/tracify")) == 1


def test_events_accepted_while_delivery_is_off_show_as_queued_and_are_each_sent_once_when_it_starts(
        fresh_stub: VendorStub, make_server: type[Segrelay]) -> None:
    """On SQLite an accept stores the event and its routes; the jobs' rows come with the next lease. Until then an
    operator still sees every postback queued, and once delivery runs each goes exactly once."""
    service = make_server({"SEGRELAY_DELIVERY": "off"}).start()
    events = [order() for _ in range(3)]
    for event in events:
        assert service.post(event, ALL_VENDORS).status_code == 202
    traced = json.loads(service.cli("trace", events[0]["messageId"], "--json").stdout)
    assert sorted((r["vendor"], r["target"], r["state"]) for r in traced) == [
        ("audiohook", "pixel", "queued"), ("segmentstream", "data_stream", "queued"),
        ("segmentstream", "track", "queued"), ("tracify", "events", "queued")]
    assert {vendor: row["pending"] for vendor, row in queue_stats(service).items()} == {
        "segmentstream": 6, "tracify": 3, "audiohook": 3}
    service.terminate()
    service.env["SEGRELAY_DELIVERY"] = "on"
    service.start()
    for path in ("/segmentstream/track", "/segmentstream/ds/", "/audiohook"):
        delivered(fresh_stub, path, 3)
    assert wait_until(lambda: all(settled(service, v) for v in ("segmentstream", "tracify", "audiohook")))
    tracify = [e for r in fresh_stub.requests("/tracify") for e in json.loads(r["body"])["events"]]
    assert len(tracify) == 3
    for path in ("/segmentstream/track", "/segmentstream/ds/", "/audiohook"):
        assert len(fresh_stub.requests(path)) == 3, path


def test_a_slow_vendor_does_not_delay_the_others(fresh_stub: VendorStub, make_server: type[Segrelay]) -> None:
    fresh_stub.script("/audiohook", [{"status": 200, "delay": 8}])
    service = make_server().start()
    service.post(order(), ALL_VENDORS)
    delivered(fresh_stub, "/segmentstream/track", 1)
    delivered(fresh_stub, "/tracify", 1)
    # Audiohook is still on its first (hanging) request while the others are done.
    assert queue_stats(service)["audiohook"]["leased"] == 1
    delivered(fresh_stub, "/audiohook", 1)


@pytest.mark.parametrize("client", ["builtin", "aiohttp"])
def test_order_completed_reaches_all_three_vendors_exactly(fresh_stub: VendorStub, make_server: type[Segrelay],
                                                         client: str) -> None:
    service = make_server({"SEGRELAY_LOG_LEVEL": "debug", "SEGRELAY_HTTP_CLIENT": client}).start()
    assert service.post(order("oc-e2e-1"), ALL_VENDORS).status_code == 202
    assert wait_until(lambda: len(fresh_stub.requests()) == 4), fresh_stub.requests()
    logs = service.logs()  # at debug level too: no token, no email, no ip, no user agent in any line
    for secret in (ALL_VENDORS["tracifyApiToken"], ALL_VENDORS["segmentstreamApiToken"], "tr-token", "ss-token"):
        assert secret not in logs
    by_path = {r["path"]: r for r in fresh_stub.requests()}
    track = by_path["/segmentstream/track"]
    assert track["headers"]["content-type"] == "application/json"
    assert json.loads(track["body"])["event"]["transaction"]["orderId"] == "50314b8e9bcf000000000000"
    stream = by_path[f"/segmentstream/ds/{ALL_VENDORS['segmentstreamDataStreamId']}"]
    assert stream["headers"]["content-type"] == "application/x-www-form-urlencoded"
    assert "orderId=50314b8e9bcf000000000000" in stream["body"] and "authorization" not in stream["headers"]
    tracify = by_path["/tracify/api/v1/events"]
    assert json.loads(tracify["body"])["events"][0]["data"]["amount"] == "30.00"
    pixel = by_path[f"/audiohook/{ALL_VENDORS['audiohookId']}/pixel.png"]
    assert json.loads(pixel["body"])["event_name"] == "purchase"


def test_stored_payloads_are_encrypted_at_rest(fresh_stub: VendorStub, make_server: type[Segrelay]) -> None:
    service = make_server({"SEGRELAY_DELIVERY": "off"}).start()
    service.post(order(), ALL_VENDORS)
    service.terminate()
    raw = b"".join(p.read_bytes() for p in service.tmp.glob("store.db*"))
    for secret in (b"203.0.113.195", b"Jane.Doe", b"Chrome/124", b"ss-token", b"tr-token", service.key.encode()):
        assert secret not in raw


def test_dry_run_sends_nothing_and_shows_everything(fresh_stub: VendorStub, make_server: type[Segrelay]) -> None:
    service = make_server().start()
    response = service.post(order(), {**ALL_VENDORS, "dryRun": True})
    assert response.status_code == 200
    body = response.json()
    assert len(body["wouldSend"]) == 4 and body["skipped"] == []
    urls = sorted(r["url"] for r in body["wouldSend"])
    assert urls[0].startswith(fresh_stub.url + "/audiohook/")
    assert "ss-token" not in response.text and "tr-token" not in response.text
    assert settled(service, "segmentstream") and queue_stats(service)["tracify"]["pending"] == 0
    assert fresh_stub.requests() == []


@pytest.mark.parametrize("args", [["dlq", "replay"], ["dlq", "replay", "--all", "1"]])
def test_dlq_replay_needs_ids_or_all(make_server: type[Segrelay], args: list[str]) -> None:
    service = make_server()
    result = service.cli(*args, check=False)
    assert result.returncode == 2


def test_one_tenants_hanging_endpoint_does_not_starve_another(fresh_stub: VendorStub,
                                                              make_server: type[Segrelay]) -> None:
    slow_id, fast_id = str(uuid.uuid4()), str(uuid.uuid4())
    fresh_stub.script(f"/audiohook/{slow_id}", [], default={"status": 200, "delay": 5})
    service = make_server({"SEGRELAY_TENANT_CONCURRENCY": "4", "SEGRELAY_VENDOR_CONCURRENCY": "8",
                           "SEGRELAY_DELIVERY_PROCESSES": "1"}).start()  # the limits hold per delivery process
    other = service.create_key(tenant="other")
    for _ in range(12):
        assert service.post(order(), {"audiohookId": slow_id}).status_code == 202
    for _ in range(5):
        assert service.post(order(), {"audiohookId": fast_id}, key=other).status_code == 202
    fast = delivered(fresh_stub, f"/audiohook/{fast_id}", 5, timeout=30)
    slow = fresh_stub.requests(f"/audiohook/{slow_id}")
    # The other tenant was served before the stub had answered any of the slow tenant's requests, and the slow
    # tenant never held more than its share of connections.
    assert max(r["at"] for r in fast) < min(r["at"] for r in slow) + 5
    assert len(slow) <= 4


def test_an_unreachable_vendor_opens_its_circuit_and_the_others_carry_on(fresh_stub: VendorStub,
                                                                         make_server: type[Segrelay]) -> None:
    from tests.support import free_port

    closed = f"http://127.0.0.1:{free_port()}/audiohook"  # nothing listens there: connection refused
    service = make_server({"SEGRELAY_AUDIOHOOK_URL": closed}).start()
    for _ in range(6):
        assert service.post(order(), ALL_VENDORS).status_code == 202
    delivered(fresh_stub, "/segmentstream/track", 6)
    delivered(fresh_stub, "/tracify", 1)

    def circuit_open() -> bool:
        return 'segrelay_circuit_open{vendor="audiohook"} 1.0' in httpx.get(service.url + "/metrics").text
    assert wait_until(circuit_open, 20)
    assert 'segrelay_circuit_open{vendor="segmentstream"} 0.0' in httpx.get(service.url + "/metrics").text
    assert dlq(service) == []  # refused connections are retried, not dead-lettered
    # All six kept: waiting, or being tried by a delivery process whose own circuit is not open yet (each process
    # has its own; the gauge shows the highest).
    audiohook = queue_stats(service)["audiohook"]
    assert audiohook["pending"] + audiohook["leased"] == 6 and audiohook["dead"] == 0


@pytest.mark.parametrize("client", ["builtin", "aiohttp"])
def test_a_cookie_a_vendor_sets_is_never_sent_back_with_another_postback(fresh_stub: VendorStub,
                                                                          make_server: type[Segrelay],
                                                                          client: str) -> None:
    """One connection pool per vendor serves every tenant: a cookie set in answer to one tenant's postback must not
    ride along with the next tenant's (vendors are reached by host name, whose cookies an HTTP client would keep)."""
    by_name = fresh_stub.url.replace("127.0.0.1", "localhost")
    fresh_stub.script("/segmentstream", [{"status": 204, "headers": {
        "set-cookie": "visitor=tenant-a-secret; Path=/; Max-Age=3600"}}], default={"status": 204})
    service = make_server({"SEGRELAY_SEGMENTSTREAM_URL": f"{by_name}/segmentstream",
                           "SEGRELAY_DELIVERY_PROCESSES": "1", "SEGRELAY_HTTP_CLIENT": client}).start()
    assert service.post(order(), SS_ONLY).status_code == 202
    delivered(fresh_stub, "/segmentstream/track", 1)
    for _ in range(3):
        assert service.post(order(), SS_ONLY).status_code == 202
    sent = delivered(fresh_stub, "/segmentstream/track", 4)
    assert [r for r in sent if "cookie" in {name.lower() for name in r["headers"]}] == []


def test_a_stopped_delivery_process_does_not_hold_up_its_share_of_the_events(
        fresh_stub: VendorStub, make_server: type[Segrelay]) -> None:
    """SQLite: serve's two delivery processes share the queue by event. With one stopped (SIGSTOP: alive, leasing
    nothing) the other delivers every event all the same, and each exactly once (when it takes the stopped one's
    share over is `tests/test_store.py`'s to show, with a clock of its own)."""
    service = make_server({"SEGRELAY_DELIVERY_PROCESSES": "2"}).start()
    assert service.proc is not None
    deliverers = [pid for pid in child_pids(service.proc.pid) if role(pid) == "deliver"]
    assert len(deliverers) == 2

    def leasing() -> int:  # delivery processes that noted their last lease in the last 2 s
        with contextlib.closing(sqlite3.connect(service.tmp / "store.db")) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM deliverers WHERE seen_at > ?",
                                    (time.time() - 2,)).fetchone()[0])
    assert wait_until(lambda: leasing() == 2, 10)  # both share the queue
    os.kill(deliverers[0], signal.SIGSTOP)
    try:
        sent = {f"share-{uuid.uuid4()}" for _ in range(30)}
        for message_id in sent:
            assert service.post(order(message_id), SS_ONLY).status_code == 202
        assert wait_until(lambda: hit_ids(sent) <= set(delivered_message_ids(fresh_stub)), 20)
    finally:
        os.kill(deliverers[0], signal.SIGCONT)
    counts = delivered_message_ids(fresh_stub)
    assert all(counts[hit] == 1 for hit in hit_ids(sent)), counts
    assert service.terminate() == 0
