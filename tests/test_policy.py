"""The retry decision and the circuit breaker."""

from __future__ import annotations

from email.utils import formatdate

import pytest

from app.delivery.breaker import CircuitBreaker
from app.delivery.policy import RetryPolicy, Verdict, classify, retry_after


@pytest.mark.parametrize(("status", "ok", "verdict"), [
    (None, False, Verdict.RETRY), (408, False, Verdict.RETRY), (425, False, Verdict.RETRY),
    (429, False, Verdict.RETRY), (500, False, Verdict.RETRY), (503, False, Verdict.RETRY),
    (200, True, Verdict.DELIVERED), (204, True, Verdict.DELIVERED), (200, False, Verdict.DEAD),
    (400, False, Verdict.DEAD), (401, False, Verdict.DEAD), (403, False, Verdict.DEAD), (404, False, Verdict.DEAD),
    (413, False, Verdict.DEAD),
])
def test_classify(status: int | None, ok: bool, verdict: Verdict) -> None:
    assert classify(status, ok) is verdict


def test_backoff_is_full_jitter_capped() -> None:
    policy = RetryPolicy(base_seconds=2, max_seconds=900)
    samples = [policy.backoff(3) for _ in range(500)]
    assert all(0 <= s <= 16 for s in samples) and max(samples) > 8  # U(0, 2 * 2^3)
    assert all(0 <= policy.backoff(40) <= 900 for _ in range(100))


def test_give_up_after_four_hours_and_five_attempts_or_thirty_attempts() -> None:
    policy = RetryPolicy()
    assert not policy.exhausted(4, age_seconds=5 * 3600)
    assert not policy.exhausted(29, age_seconds=60)
    assert policy.exhausted(5, age_seconds=4 * 3600)
    assert policy.exhausted(30, age_seconds=0)


def test_retry_after_seconds_dates_and_clamps() -> None:
    assert retry_after("1", now=0) == 1.0
    assert retry_after("0", now=0) == 1.0
    assert retry_after("999999", now=0) == 3600.0
    assert retry_after(formatdate(1000.0 + 120, usegmt=True), now=1000.0) == pytest.approx(120, abs=1)
    assert retry_after("soon", now=0) is None
    assert retry_after(None, now=0) is None


def test_breaker_opens_on_failure_ratio_and_doubles() -> None:
    breaker = CircuitBreaker()
    for i in range(19):
        breaker.record(float(i) / 10, ok=False)
    assert not breaker.is_open(2.0)
    breaker.record(2.0, ok=False)
    assert breaker.is_open(2.0) and breaker.open_until == 32.0
    for _ in range(20):
        breaker.record(40.0, ok=False)
    assert breaker.open_until == 100.0  # 60 s: doubled


def test_breaker_opens_on_five_straight_connect_failures_and_closes_on_success() -> None:
    breaker = CircuitBreaker()
    for _ in range(4):
        breaker.record(0.0, ok=False, connect_error=True)
    breaker.record(0.0, ok=True)
    breaker.record(0.0, ok=False, connect_error=True)
    assert not breaker.is_open(0.0)
    for _ in range(4):
        breaker.record(1.0, ok=False, connect_error=True)
    assert breaker.is_open(1.0) and not breaker.is_open(31.0)


def test_breaker_ignores_old_calls() -> None:
    breaker = CircuitBreaker()
    for _ in range(19):
        breaker.record(0.0, ok=False)
    breaker.record(31.0, ok=False)  # the earlier failures left the 30 s window
    assert not breaker.is_open(31.0)
