"""The retry decision, in one place: what to retry, when, and when to give up."""

from __future__ import annotations

import random
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import Enum

RETRYABLE_STATUS = frozenset({408, 425, 429})
RETRY_AFTER_MIN, RETRY_AFTER_MAX = 1.0, 3600.0


class Verdict(Enum):
    DELIVERED = "delivered"
    RETRY = "retried"
    DEAD = "dead"


def classify(status: int | None, succeeded: bool) -> Verdict:
    """status None = network error or timeout. Success is the vendor's own rule (Tracify: status true)."""
    if status is None or status in RETRYABLE_STATUS or status >= 500:
        return Verdict.RETRY
    return Verdict.DELIVERED if succeeded else Verdict.DEAD


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base_seconds: float = 2.0
    max_seconds: float = 900.0
    give_up_seconds: float = 4 * 3600.0
    give_up_min_attempts: int = 5
    max_attempts: int = 30

    def backoff(self, attempts: int) -> float:
        """Full jitter: U(0, min(max, base * 2^n)) after the n-th failed attempt (n from 1)."""
        return random.uniform(0, min(self.max_seconds, self.base_seconds * 2 ** min(attempts, 30)))

    def exhausted(self, attempts: int, age_seconds: float) -> bool:
        """After `attempts` failed attempts, is it time to dead-letter?"""
        if attempts >= self.max_attempts:
            return True
        return age_seconds >= self.give_up_seconds and attempts >= self.give_up_min_attempts


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date), clamped to 1 s..1 h."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError):
            return None
    return min(max(seconds, RETRY_AFTER_MIN), RETRY_AFTER_MAX)
