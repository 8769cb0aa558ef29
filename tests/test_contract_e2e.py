"""Segment's partner contract, end to end: `segrelay serve` under uvicorn, answered over loopback.

Every row of the status table in segment-contract.md §5 and every rule of the contract issue.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import uuid
from typing import Any

import httpx
import pytest

from tests.support import ALL_VENDORS, AUDIOHOOK_ID, SITE_ID, Segrelay, basic, fixture, settings_header, wait_until


def fresh(event: dict[str, Any]) -> dict[str, Any]:
    """The event with a new messageId, so idempotency never answers for it."""
    return {**event, "messageId": f"test-{uuid.uuid4()}"}


def assert_json(response: httpx.Response, status: int, message: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    if message is not None:
        assert message in body["message"]
    return body


TRACK = {"type": "track", "event": "Signed Up", "userId": "u-1", "properties": {"plan": "pro"}}

# The Developer Center test suite's eight cases (segment-contract.md §7).
SUITE = [
    ({"type": "page", "anonymousId": "anon-1", "name": "Home", "properties": {"url": "https://example.com/"}}, 200),
    ({"type": "page", "anonymousId": "anon-1", "name": "Signup",
      "properties": {"url": "https://example.com/signup"}}, 200),
    ({"type": "identify", "anonymousId": "anon-1", "traits": {"email": "a@example.com"}}, 200),
    ({"type": "track", "userId": "u-1", "event": "Signed Up"}, 200),
    ({"type": "track", "userId": "u-1", "event": "Enabled Integration"}, 200),
    ({"type": "track", "userId": "u-1", "event": "Invited Teammate"}, 200),
    ({"type": "group", "userId": "u-1", "groupId": "myUsers", "traits": {"name": "My Users"}}, 200),
    ({"type": "screen", "userId": "u-1", "name": "Opens Mobile App"}, 501),
]


# 200 / 202 --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("event", "status"), SUITE)
def test_developer_center_test_suite(server: Segrelay, event: dict[str, Any], status: int) -> None:
    # With no vendor configured the partner's test suite must still come out green (yellow for screen).
    body = assert_json(server.post(fresh(event)), status)
    if status == 200:
        assert body["message"] == "accepted"
        assert "No vendor is configured" in body["warning"]


def test_developer_center_default_test_event_is_queued_for_segmentstream(server: Segrelay) -> None:
    body = assert_json(server.post(fresh(fixture("devcenter_test_event.json")), ALL_VENDORS), 202)
    assert body["message"] == "accepted"
    statuses = {(row["vendor"], row["status"]) for row in body["postbacks"]}
    assert statuses == {("segmentstream", "queued"), ("tracify", "skipped"), ("audiohook", "skipped")}
    assert all(row["reason"] for row in body["postbacks"] if row["status"] == "skipped")


def test_identify_and_group_answer_200_with_nothing_to_send(server: Segrelay) -> None:
    for name in ("identify.json", "group.json"):
        body = assert_json(server.post(fresh(fixture(name)), ALL_VENDORS), 200)
        assert not [row for row in body["postbacks"] if row["status"] == "queued"]


def test_order_completed_is_accepted_for_every_vendor(server: Segrelay) -> None:
    body = assert_json(server.post(fresh(fixture("order_completed.json")), ALL_VENDORS), 202)
    queued = sorted((row["vendor"], row["target"]) for row in body["postbacks"] if row["status"] == "queued")
    assert queued == [("audiohook", "pixel"), ("segmentstream", "data_stream"), ("segmentstream", "track"),
                      ("tracify", "events")]


def test_odd_casing_fixture_is_understood(server: Segrelay) -> None:
    body = assert_json(server.post(fresh(fixture("order_completed_v1_casing.json")), ALL_VENDORS), 202)
    queued = {row["vendor"] for row in body["postbacks"] if row["status"] == "queued"}
    assert queued == {"segmentstream", "tracify", "audiohook"}


def test_tolerates_what_the_spec_says_to_tolerate(server: Segrelay) -> None:
    event = {"TYPE": "Track", "Event": "order completed", "USER_ID": "u-9", "version": {"odd": True},
             "projectId": "p", "_metadata": {"x": 1}, "channel": "server",
             "Properties": {"Order_ID": "o-9", "TOTAL": "12.50", "currency": "eur"}}
    body = assert_json(server.post(fresh(event), {"segmentstreamApiToken": "t"}), 202)
    assert body["postbacks"][0] == {"vendor": "segmentstream", "target": "track", "status": "queued"}


def test_content_type_with_parameters_is_accepted(server: Segrelay) -> None:
    response = server.post(fresh(TRACK), headers={"Content-Type": "application/json; charset=utf-8"})
    assert_json(response, 200)


def test_duplicate_message_id_is_answered_200_duplicate(server: Segrelay) -> None:
    event = fresh(fixture("order_completed.json"))
    assert_json(server.post(event, ALL_VENDORS), 202)
    body = assert_json(server.post(event, ALL_VENDORS), 200)
    assert body["message"] == "duplicate"


# 400 ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("content", "message"), [
    (b"{not json", "not valid JSON: unexpected character, expected a string key (line 1, column 2)"),
    (b'{"type": "track",}', "not valid JSON: trailing comma is not allowed (line 1, column 17)"),
    (b"", "Request body is empty"),
    (b'{"type": "track", "event": "\xed\xa0\x80"}', "not valid UTF-8"),
    (b"[1, 2]", "must be a JSON object, got list"),
    (b'"track"', "must be a JSON object, got str"),
    (b'{"userId": "u"}', "missing 'type'"),
    (b'{"type": 7, "userId": "u"}', "'type' must be a string"),
    (b'{"type": "track", "userId": "u"}', "missing 'event'"),
    (b'{"type": "track", "event": "X"}', "neither 'userId' nor 'anonymousId'"),
    (b'{"type": "group", "userId": "u"}', "missing 'groupId'"),
    (b'{"type": "page", "userId": "u", "context": "nope"}', "'context' must be a JSON object"),
    (b'{"type": "page", "userId": "u", "properties": [1]}', "'properties' must be a JSON object"),
    (b'[' * 2000 + b']' * 2000, "nested deeper than"),
    (b'{"type": "page", "userId": "u", "messageId": "' + b"m" * 300 + b'"}', "longer than 200"),
])
def test_malformed_bodies_get_400_with_a_specific_message(server: Segrelay, content: bytes, message: str) -> None:
    assert_json(server.post(content), 400, message)


@pytest.mark.parametrize(("header", "message"), [
    ("%%%not-base64%%%", "not valid base64"),
    (base64.b64encode(b"not json").decode(), "does not decode to JSON"),
    (base64.b64encode(b"[1]").decode(), "must be a JSON object"),
    (settings_header({"audiohookId": "../../evil.example.com"}), "Setting 'audiohookId' must be a UUID"),
    (settings_header({"segmentstreamDataStreamId": "x/../y"}), "'segmentstreamDataStreamId' must be a UUID"),
    (settings_header({"tracifyApiToken": "t"}), "'tracifyCustomerSiteId' is required"),
    (settings_header({"dryRun": "maybe"}), "'dryRun' must be true or false"),
    (settings_header({"conversionEvents": 5}), "'conversionEvents' must be a list"),
    (settings_header({"audiohookId": AUDIOHOOK_ID, "audiohookMissingIp": "guess"}), "one of: skip, fallback"),
])
def test_bad_settings_header_gets_400(server: Segrelay, header: str, message: str) -> None:
    response = server.post(fresh(TRACK), headers={"X-Segment-Settings": header})
    assert_json(response, 400, message)


@pytest.mark.parametrize("token", ["tok\r\nX-Injected: 1", "tok\x00", "t\u00f6ken", "tab\there"])
@pytest.mark.parametrize("name", ["tracifyApiToken", "segmentstreamApiToken"])
def test_tokens_that_cannot_travel_in_a_header_get_400_naming_the_setting(server: Segrelay, name: str,
                                                                          token: str) -> None:
    settings = {name: token, "tracifyCustomerSiteId": SITE_ID}
    assert_json(server.post(fresh(TRACK), settings), 400, f"Setting '{name}' holds a control or non-ASCII")


@pytest.mark.parametrize("stamp", ["yesterday", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", -17,
                                   ["2026-01-01"], "1e999999999"])
def test_an_unreadable_timestamp_falls_back_with_a_warning(server: Segrelay, stamp: Any) -> None:
    for kind in ("identify", "page"):
        event = fresh({"type": kind, "userId": "u", "timestamp": stamp, "sentAt": "2026-11-20T10:00:00Z",
                       "context": {"ip": "1.2.3.4", "userAgent": "UA", "page": {"url": "https://e.com/"}}})
        body = assert_json(server.post(event, ALL_VENDORS), 200 if kind == "identify" else 202)
        assert any("'timestamp' is not a readable time" in w for w in body["warnings"]), body


POISON = [
    {"total": 2**70}, {"total": 1e20}, {"total": "1e30"}, {"total": -1e300}, {"revenue": "1e999999", "tax": 1},
    {"total": 10, "products": [{"price": "1e999999", "quantity": 2}]},
    {"total": 10, "products": [{"price": 3, "quantity": "1e300000"}]},
    {"total": 10, "products": [{"price": 3, "quantity": "1e999999999"}]},
    {"total": "1" * 5000}, {"total": "0." + "0" * 30 + "1"}, {"total": "-0"}, {"total": "NaN"},
    {"total": "Infinity"}, {"big": 2**63, "huge": -(2**64), "f": 1.7e308, "tiny": 5e-324},
    {"total": 10, "products": [{}] * 5000},
    {"total": 10, "order_id": "o" * 100_000},
]


@pytest.mark.parametrize("props", POISON, ids=range(len(POISON)))
def test_poison_values_never_get_a_500(server: Segrelay, props: dict[str, Any]) -> None:
    event = fresh({**fixture("order_completed.json"), "properties": {"order_id": "o-1", "currency": "EUR",
                                                                      **props}})
    response = server.post(event, ALL_VENDORS, timeout=5)
    assert response.status_code in (200, 202), response.text[:300]
    assert response.json()["message"] == "accepted"


def test_settings_accept_url_safe_base64_without_padding_and_any_name_casing(server: Segrelay) -> None:
    settings = {"TRACIFYAPITOKEN": "tok>>??", "tracify_customer_site_id": SITE_ID,
                "ConversionEvents": "Signed Up, Other"}
    raw = base64.urlsafe_b64encode(json.dumps(settings).encode()).decode().rstrip("=")
    assert "-" in raw or "_" in raw
    event = fresh({**TRACK, "context": {"ip": "1.2.3.4", "page": {"url": "https://e.com/x"}}})
    body = assert_json(server.post(event, headers={"X-Segment-Settings": raw}), 202)
    assert body["postbacks"] == [{"vendor": "tracify", "target": "events", "status": "queued"}]


# 401 / 403 ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("authorization", "message"), [
    (None, "Missing Authorization header"),
    ("Bearer abc", "Basic scheme"),
    ("Basic !!!", "not valid base64"),
    ("Basic " + base64.b64encode(b"no-colon-here").decode(), "colon is missing"),
    ("Basic " + base64.b64encode(b":").decode(), "API key is empty"),
    (basic("sr_aaaaaaaaaaaa_" + "x" * 43), "Unknown API key"),
    (basic("segment"), "Unknown API key"),
])
def test_bad_authorization_gets_401(server: Segrelay, authorization: str | None, message: str) -> None:
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    response = httpx.post(server.url + "/segment", content=json.dumps(fresh(TRACK)), headers=headers)
    assert_json(response, 401, message)


def test_scheme_name_is_case_insensitive(server: Segrelay) -> None:
    response = server.post(fresh(TRACK), headers={"Authorization": basic(server.key).replace("Basic", "bAsIc")})
    assert_json(response, 200)


def test_a_wrong_secret_with_a_known_key_id_is_unknown(server: Segrelay) -> None:
    forged = server.key[:16] + "A" * (len(server.key) - 16)
    assert_json(server.post(fresh(TRACK), key=forged), 401, "Unknown API key")


def test_revoked_key_gets_401(server: Segrelay) -> None:
    key = server.create_key()
    assert_json(server.post(fresh(TRACK), key=key), 200)
    key_id = key.split("_")[1]
    assert server.cli("keys", "revoke", key_id).returncode == 0
    assert_json(server.post(fresh(TRACK), key=key), 401, "API key revoked")


def test_expired_key_gets_401(server: Segrelay) -> None:
    key = server.create_key("--expires-in-days", "-1")
    assert_json(server.post(fresh(TRACK), key=key), 401, "API key expired")


def test_key_limited_to_vendors_gets_403_naming_the_other_vendor(server: Segrelay) -> None:
    key = server.create_key("--vendors", "tracify")
    settings = {"tracifyApiToken": "t", "tracifyCustomerSiteId": SITE_ID, "audiohookId": AUDIOHOOK_ID}
    body = assert_json(server.post(fresh(TRACK), settings, key=key), 403, "Audiohook (audiohook)")
    assert "tracify" not in body["message"].lower().split("audiohook")[0]
    allowed = {"tracifyApiToken": "t", "tracifyCustomerSiteId": SITE_ID}
    assert_json(server.post(fresh(TRACK), allowed, key=key), 200)
    every = assert_json(server.post(fresh(TRACK), ALL_VENDORS, key=key), 403)
    assert every["message"] == ("This API key is not allowed to send to SegmentStream (segmentstream) and Audiohook "
                                "(audiohook); remove their settings or ask for a key that includes them")
    # The same answers again (the vendors a destination's settings enable are remembered per settings and key)
    assert_json(server.post(fresh(TRACK), settings, key=key), 403, "Audiohook (audiohook)")
    assert_json(server.post(fresh(TRACK), allowed, key=key), 200)
    assert_json(server.post(fresh(TRACK), allowed, key=server.create_key("--vendors", "audiohook")), 403,
                "Tracify (tracify)")


def test_skip_reasons_fit_the_event(server: Segrelay) -> None:
    # A user never seen before: nothing remembered to stitch from.
    page = fresh({"type": "page", "userId": uuid.uuid4().hex, "context": {"page": {"url": "https://e.com/"}}})
    body = assert_json(server.post(page, {"audiohookId": AUDIOHOOK_ID}), 200)
    (skip,) = body["postbacks"]
    assert skip["reason"] == "Audiohook: page has no ip and user agent (context.ip, context.userAgent)"


# 413 / 501 / 404 / 405 ---------------------------------------------------------------------------------------


def test_body_over_128_kb_gets_413(server: Segrelay) -> None:
    event = fresh({**TRACK, "properties": {"blob": "x" * (130 * 1024)}})
    assert_json(server.post(event), 413, "larger than 128 KB")


@pytest.mark.parametrize(("name", "kind"), [("screen.json", "screen"), ("alias.json", "alias")])
def test_screen_and_alias_get_501(server: Segrelay, name: str, kind: str) -> None:
    body = assert_json(server.post(fixture(name)), 501)
    assert body == {"message": f"Unsupported call type: {kind}"}


def test_unknown_type_gets_501(server: Segrelay) -> None:
    assert_json(server.post({"type": "teleport", "userId": "u"}), 501, "Unsupported call type: teleport")


def test_other_paths_and_methods_answer_json(server: Segrelay) -> None:
    assert_json(httpx.get(server.url + "/nope"), 404, "Not found: /nope")
    assert_json(httpx.get(server.url + "/segment"), 405, "Method GET not allowed")
    assert_json(httpx.put(server.url + "/healthz"), 405)


# 500 ---------------------------------------------------------------------------------------------------------


def test_internal_error_gets_500_with_a_generic_message(make_server: type[Segrelay]) -> None:
    service = make_server().start()
    with sqlite3.connect(service.tmp / "store.db") as db:
        db.execute("CREATE TRIGGER sabotage BEFORE INSERT ON events BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
    body = assert_json(service.post(fresh(fixture("order_completed.json")), ALL_VENDORS), 500)
    assert body == {"message": "Internal error in segrelay; Segment will retry this event"}
    assert "disk says no" not in json.dumps(body)
    service.terminate()
    errors = [json.loads(line) for line in service.logs().splitlines() if '"unexpected error in /segment"' in line]
    assert errors and errors[0]["error"] == "StoreError" and errors[0]["request_id"]
    assert any("app/ingest.py" in frame for frame in errors[0]["trace"])
    assert "disk says no" not in service.logs()  # exception messages may quote request data: never logged


# health, readiness, metrics, logs ----------------------------------------------------------------------------


def test_health_readiness_and_metrics(server: Segrelay) -> None:
    assert_json(httpx.get(server.url + "/healthz"), 200)
    assert assert_json(httpx.get(server.url + "/readyz"), 200)["status"] == "ready"
    server.post(fresh(TRACK))
    server.post(fresh(fixture("devcenter_test_event.json")), ALL_VENDORS)
    server.post(fresh(fixture("screen.json")))
    server.post(fresh({"type": "track", "userId": "u"}))  # no event name: 400
    text = httpx.get(server.url + "/metrics").text
    assert 'segrelay_requests_total{call_type="track",status="200"}' in text
    assert 'segrelay_requests_total{call_type="screen",status="501"}' in text
    assert 'segrelay_requests_total{call_type="track",status="400"}' in text
    assert 'segrelay_skips_total{reason="not_routed",vendor="tracify"}' in text
    assert 'segrelay_postbacks_total{outcome="skipped",vendor="audiohook"}' in text
    assert 'segrelay_postbacks_total{outcome="queued",vendor="segmentstream"}' in text
    assert "segrelay_request_duration_seconds_bucket" in text


def test_responses_carry_a_request_id(server: Segrelay) -> None:
    response = server.post(fresh(TRACK), headers={"X-Request-Id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"


def test_logs_never_hold_keys_settings_emails_ips_or_user_agents(server: Segrelay) -> None:
    order = fresh(fixture("order_completed.json"))
    server.post(order, ALL_VENDORS)
    server.post(fresh(TRACK), headers={"Authorization": "Basic !!!"})
    server.post(b"{broken", headers={"X-Segment-Settings": settings_header(ALL_VENDORS)})
    # a request's line is written at the end of the event-loop turn that answered it: maybe just after the answer
    assert wait_until(lambda: "Request body is not valid JSON: " in server.logs(), 5)
    logs = server.logs()
    assert '"path":"/segment"' in logs
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    accepted = next(line for line in lines if line.get("message_id") == order["messageId"])
    assert accepted["status"] == 202 and accepted["call_type"] == "track" and accepted["tenant"] == "acme"
    assert accepted["key_id"] == server.key.split("_")[1] and accepted["request_id"]
    refused = next(line for line in lines if line.get("status") == 400 and "reason" in line)
    assert refused["reason"] == ("Request body is not valid JSON: unexpected character, expected a string key "
                                 "(line 1, column 2)")
    bad = fresh(TRACK)
    server.post(bad, {"audiohookId": "not-a-uuid"})

    def logged() -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in server.logs().splitlines() if line.startswith("{")]
        return [line for line in lines if line.get("message_id") == bad["messageId"]]
    assert wait_until(lambda: bool(logged()), 5)
    rejected = logged()[0]
    assert rejected["status"] == 400 and rejected["call_type"] == "track" and "audiohookId" in rejected["reason"]
    for secret in (server.key, basic(server.key).split()[1], "ss-token", "tr-token", "Jane.Doe@Example.com",
                   "203.0.113.195", "Chrome/124", settings_header(ALL_VENDORS)[:24]):
        assert secret not in logs
    for line in logs.splitlines():
        if line.startswith("{"):
            json.loads(line)
