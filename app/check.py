"""`segrelay check URL --key KEY`: what Segment would see from a deployed endpoint, case by case.

It sends the Developer Center test suite's calls and the contract's probes (bad or missing key, bad settings,
malformed and unsupported events, a duplicate) to any deployment and compares each answer with what Segment's
contract expects. Every event carries a fresh messageId; with no --settings no vendor is configured, so nothing is
queued for a vendor.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import orjson


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    expected: str  # what Segment's contract asks for
    body: bytes | None = None
    authorization: str | None = ""  # "" = the right key, None = no header
    settings: str | None = ""  # "" = the settings given, None = no header
    accept: Callable[[int, dict[str, Any]], bool] = lambda status, body: 200 <= status < 300


@dataclass(frozen=True, slots=True)
class Result:
    case: str
    expected: str
    status: int | None
    message: str
    passed: bool


def _event(kind: str, **fields: Any) -> bytes:
    base: dict[str, Any] = {"type": kind, "userId": "segrelay-check", "messageId": f"check-{uuid.uuid4()}",
                            "timestamp": "2026-01-01T00:00:00.000Z", "context": {"library": {"name": "segrelay-check"}}}
    return orjson.dumps({**base, **fields})


def cases() -> list[Case]:
    def status(code: int) -> Callable[[int, dict[str, Any]], bool]:
        return lambda got, body: got == code

    duplicate = _event("track", event="Order Completed",
                       properties={"order_id": "check", "total": 1, "currency": "USD"})
    return [
        Case("track (Test Event Name)", "2xx", _event("track", event="Test Event Name")),
        Case("identify", "2xx", _event("identify", traits={"plan": "check"})),
        Case("page", "2xx", _event("page", name="Check")),
        Case("group", "2xx", _event("group", groupId="check-group")),
        Case("screen", "501", _event("screen", name="Check"), accept=status(501)),
        Case("alias", "501", _event("alias", previousId="a"), accept=status(501)),
        Case("unknown call type", "501", _event("teleport"), accept=status(501)),
        Case("wrong API key", "401", _event("track", event="Check"),
             authorization="Basic " + base64.b64encode(b"sr_aaaaaaaaaaaa_wrong:").decode(), accept=status(401)),
        Case("no Authorization header", "401", _event("track", event="Check"), authorization=None,
             accept=status(401)),
        Case("X-Segment-Settings not base64", "400", _event("track", event="Check"), settings="%%%",
             accept=status(400)),
        Case("body not JSON", "400", b"{not json", accept=status(400)),
        Case("track without an event name", "400", _event("track"), accept=status(400)),
        Case("first delivery of an event", "2xx", duplicate),
        # With postbacks queued the first time, a repeat is `200 duplicate`; with nothing to send (no vendor in the
        # settings), every repeat is answered like the first (see run()).
        Case("the same messageId again", "200 duplicate", duplicate,
             accept=lambda got, body: got == 200 and body.get("message") == "duplicate"),
    ]


def run(url: str, key: str, settings: dict[str, Any], *, timeout: float = 10.0) -> list[Result]:
    endpoint = url.rstrip("/")
    if not endpoint.endswith("/segment"):
        endpoint += "/segment"
    right = "Basic " + base64.b64encode(f"{key}:".encode()).decode()
    encoded = base64.b64encode(orjson.dumps(settings)).decode()
    results = []
    with httpx.Client(timeout=timeout) as client:
        for case in cases():
            headers = {"Content-Type": "application/json"}
            authorization = right if case.authorization == "" else case.authorization
            if authorization is not None:
                headers["Authorization"] = authorization
            header = encoded if case.settings == "" else case.settings
            if header is not None:
                headers["X-Segment-Settings"] = header
            try:
                response = client.post(endpoint, content=case.body, headers=headers)
            except httpx.HTTPError as exc:
                results.append(Result(case.name, case.expected, None, f"no answer: {type(exc).__name__}", False))
                continue
            try:
                body = response.json()
            except ValueError:
                body = None
            if not isinstance(body, dict) or not isinstance(body.get("message"), str):
                results.append(Result(case.name, case.expected, response.status_code,
                                      "the answer is not JSON with a message", False))
                continue
            expected, passed = case.expected, case.accept(response.status_code, body)
            if case.name == "the same messageId again" and results and results[-1].status == 200:
                expected, passed = "200", response.status_code == 200  # nothing was queued the first time
            results.append(Result(case.name, expected, response.status_code, body["message"][:80], passed))
    return results
