"""A circuit breaker per vendor: stop calling a vendor that is failing, probe again later.

Opens at >= 50 % failures over >= 20 calls in 30 s, or 5 straight connect failures; stays open 30 s, doubling
on each re-open up to 5 min. While open, nothing is leased for the vendor: waiting costs no attempt.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(slots=True)
class CircuitBreaker:
    window: float = 30.0
    min_calls: int = 20
    failure_ratio: float = 0.5
    connect_failures: int = 5
    open_base: float = 30.0
    open_max: float = 300.0
    open_until: float = 0.0
    _calls: deque[tuple[float, bool]] = field(default_factory=deque)
    _straight_connect_failures: int = 0
    _open_for: float = 0.0

    def is_open(self, now: float) -> bool:
        return now < self.open_until

    def record(self, now: float, ok: bool, connect_error: bool = False) -> None:
        self._calls.append((now, ok))
        while self._calls and self._calls[0][0] < now - self.window:
            self._calls.popleft()
        self._straight_connect_failures = self._straight_connect_failures + 1 if connect_error else 0
        if ok:
            self._open_for = 0.0 if self.open_until <= now else self._open_for
            return
        failures = sum(1 for _, good in self._calls if not good)
        tripped = len(self._calls) >= self.min_calls and failures / len(self._calls) >= self.failure_ratio
        if (tripped or self._straight_connect_failures >= self.connect_failures) and not self.is_open(now):
            self._open_for = min(self.open_max, self._open_for * 2 if self._open_for else self.open_base)
            self.open_until = now + self._open_for
            self._calls.clear()
            self._straight_connect_failures = 0
