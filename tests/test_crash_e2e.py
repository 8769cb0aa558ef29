"""Crash safety: kill -9 under load loses nothing; SIGTERM under load loses and duplicates nothing."""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from tests.support import Segrelay, VendorStub, basic, child_pids, fixture, role, settings_header, wait_until

SS_ONLY = settings_header({"segmentstreamApiToken": "ss-token"})
CONCURRENCY = 8


class Load:
    """Posts distinct Order Completed events from a few threads until stopped; remembers what got a 202."""

    def __init__(self, service: Segrelay, total: int) -> None:
        self.service, self.total = service, total
        self.accepted: set[str] = set()
        self.statuses: Counter[str] = Counter()
        self._next = 0
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(CONCURRENCY)]

    def start(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def join(self) -> None:
        for thread in self.threads:
            thread.join(60)

    def _run(self) -> None:
        headers = {"Authorization": basic(self.service.key), "X-Segment-Settings": SS_ONLY,
                   "Content-Type": "application/json"}
        with httpx.Client(timeout=10) as client:
            while True:
                with self._lock:
                    if self._next >= self.total:
                        return
                    self._next += 1
                message_id = f"load-{uuid.uuid4()}"
                event = {**fixture("order_completed.json"), "messageId": message_id}
                try:
                    status = client.post(self.service.url + "/segment", content=json.dumps(event),
                                         headers=headers).status_code
                except httpx.HTTPError:
                    status = 0  # connection refused or reset: Segment would retry it
                with self._lock:
                    self.statuses[str(status)] += 1
                    if status == 202:
                        self.accepted.add(message_id)


def delivered_message_ids(stub: VendorStub) -> Counter[str]:
    """hitId is derived from the messageId, so it names the message in each request the stub saw."""
    return Counter(json.loads(r["body"])["hitId"] for r in stub.requests("/segmentstream/track"))


def hit_ids(message_ids: set[str]) -> set[str]:
    from datetime import datetime

    from handlers._base import deterministic_uuid1

    ts = datetime.fromisoformat(fixture("order_completed.json")["timestamp"])
    return {deterministic_uuid1(ts, m) for m in message_ids}


def settle(service: Segrelay, stub: VendorStub, load: Load) -> None:
    """Wait until every accepted event has reached the stub and nothing is left in the queue."""
    wanted = hit_ids(load.accepted)
    assert wait_until(lambda: wanted <= set(delivered_message_ids(stub)), 120)

    def empty() -> bool:
        row = json.loads(service.cli("queue", "stats", "--json").stdout)["segmentstream"]
        return bool(row["pending"] == 0 and row["leased"] == 0)
    assert wait_until(empty, 30)


def report(name: str, load: Load, seen: Counter[str], extra: dict[str, Any]) -> dict[str, Any]:
    wanted = hit_ids(load.accepted)
    figures = {"accepted": len(load.accepted), "answers": dict(load.statuses),
               "delivered": len(wanted & set(seen)), "lost": len(wanted - set(seen)),
               "duplicate_sends": sum(seen.values()) - len(seen), **extra}
    print(f"\n{name}: {json.dumps(figures)}")
    return figures


def test_kill_9_under_load_loses_nothing(fresh_stub: VendorStub, make_server: type[Segrelay]) -> None:
    fresh_stub.script("/segmentstream", [], default={"status": 204, "delay": 0.2})
    vendor_slots = 16
    # Concurrency limits hold per delivery process: one, so the in-flight bound below is exact. Two HTTP
    # processes: the one killed and the one it started, which must die with it, as must its accept writer.
    service = make_server({"SEGRELAY_VENDOR_CONCURRENCY": str(vendor_slots), "SEGRELAY_DELIVERY_PROCESSES": "1",
                           "SEGRELAY_TENANT_CONCURRENCY": str(vendor_slots), "SEGRELAY_HTTP_PROCESSES": "2"}).start()
    load = Load(service, total=600).start()
    assert wait_until(lambda: len(load.accepted) >= 300, 60)
    assert service.proc is not None
    children = child_pids(service.proc.pid)
    assert sorted(role(pid) or "" for pid in children) == ["accept-writer", "deliver", "serve-http"]
    service.kill()
    assert wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in children), 10)  # died with serve
    load.join()
    assert len(load.accepted) >= 300
    service.start()
    settle(service, fresh_stub, load)
    figures = report("kill -9", load, delivered_message_ids(fresh_stub), {"in_flight_limit": vendor_slots})
    assert figures["lost"] == 0
    # Only what was on the wire when the process died, and answered postbacks whose completion was not yet written
    # (at most as many again: app/delivery/completions.py).
    assert figures["duplicate_sends"] <= 2 * vendor_slots
    service.terminate()


def test_sigterm_under_load_loses_and_duplicates_nothing(fresh_stub: VendorStub,
                                                         make_server: type[Segrelay]) -> None:
    fresh_stub.script("/segmentstream", [], default={"status": 204, "delay": 0.2})
    service = make_server().start()
    load = Load(service, total=400).start()
    # Under load with delivery running (and sending): 150 accepted, and the delivery processes up.
    assert wait_until(lambda: len(load.accepted) >= 150 and '"msg":"delivery started"' in service.logs(), 60)
    assert service.terminate() == 0  # a clean drain on SIGTERM exits 0
    logs = service.logs()
    for line in ("draining: no new events are accepted", "delivery draining", "delivery stopped",
                 '"msg":"stopped","clean":true'):
        assert line in logs, line
    assert "Application shutdown complete" in service.logs()
    load.join()
    before_restart = delivered_message_ids(fresh_stub)
    service.start()
    settle(service, fresh_stub, load)
    figures = report("SIGTERM", load, delivered_message_ids(fresh_stub),
                     {"delivered_before_restart": len(before_restart)})
    assert figures["lost"] == 0
    assert figures["duplicate_sends"] == 0
    assert '"msg":"request"' in service.logs()
    service.terminate()
