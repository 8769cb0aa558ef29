"""Prometheus metrics, prefix `segrelay_`, base units, bounded labels (vendors, call types, outcomes)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("segrelay_requests", "Requests to /segment by call type and status code",
                   ["call_type", "status"])
REQUEST_SECONDS = Histogram("segrelay_request_duration_seconds", "Time to answer Segment",
                            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
POSTBACKS = Counter("segrelay_postbacks", "Postbacks by vendor and outcome (queued, delivered, retried, dead, "
                    "skipped)", ["vendor", "outcome"])
SKIPS = Counter("segrelay_skips", "Postbacks skipped, by vendor and reason code", ["vendor", "reason"])
DUPLICATES = Counter("segrelay_duplicates", "Events answered as duplicates of an earlier messageId")
VENDOR_SECONDS = Histogram("segrelay_vendor_request_duration_seconds", "Vendor request duration", ["vendor"],
                           buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30))
QUEUE_DEPTH = Gauge("segrelay_queue_depth", "Postbacks waiting or being sent", ["vendor"])
DEAD_LETTERS = Gauge("segrelay_dead_letters", "Postbacks in the dead-letter store", ["vendor"])
CIRCUIT_OPEN = Gauge("segrelay_circuit_open", "1 while the vendor's circuit breaker is open", ["vendor"])
