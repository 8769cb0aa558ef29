"""Mutational fuzz of the real server, as an attacker would: radamsa mutations of real Segment requests.

Bounded (a fixed number of requests from a fixed seed, so a failure replays), on loopback only. While it runs, a
second client asks /healthz every 20 ms: the longest gap between answers shows whether any request held the event
loop. Reported: answers by status, the longest /healthz gap, the server's peak RSS. Never a 500, never a non-JSON
answer, and the loop is never held for long.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pyradamsa

from tests.support import ALL_VENDORS, FIXTURES, Segrelay, basic, settings_header

REQUESTS = 1500
SEED = 20261123
SEEDS = ["order_completed.json", "order_completed_v1_casing.json", "page.json", "identify.json", "product_added.json",
         "tester_track_sample.json", "group.json"]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_radamsa_mutations_of_real_requests_never_get_a_500_or_stall_the_server(make_server: type[Segrelay]
                                                                                ) -> None:
    service = make_server({"SEGRELAY_DELIVERY": "off"}).start()
    assert service.proc is not None
    radamsa = pyradamsa.Radamsa(seed=SEED)
    bodies = [(FIXTURES / "segment" / name).read_bytes() for name in SEEDS]
    settings = [settings_header(ALL_VENDORS).encode(), settings_header({"dryRun": True, **ALL_VENDORS}).encode()]
    gaps: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        last = time.monotonic()
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                client.get(service.url + "/healthz").raise_for_status()
                now = time.monotonic()
                gaps.append(now - last)
                last = now
                time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    try:
        with httpx.Client(timeout=30) as client:
            for n in range(REQUESTS):
                body = bodies[n % len(bodies)]
                header = settings[n % 2]
                which = n % 5
                if which < 3:
                    body = radamsa.fuzz(body, seed=SEED + n, max_mut=len(body) * 4)
                elif which == 3:
                    header = radamsa.fuzz(header, seed=SEED + n)
                else:
                    body = radamsa.fuzz(body, seed=SEED + n, max_mut=len(body) * 4)
                    header = radamsa.fuzz(header, seed=SEED + n + 1)
                headers = {"Authorization": basic(service.key), "Content-Type": "application/json"}
                try:
                    headers["X-Segment-Settings"] = header.decode("latin-1")
                    response = client.post(service.url + "/segment", content=body, headers=headers)
                except (httpx.LocalProtocolError, UnicodeError, ValueError):
                    statuses[0] += 1  # a header our own client will not send: nothing reached the server
                    continue
                statuses[response.status_code] += 1
                if (response.status_code in (500, 502) or response.status_code > 503 or not response.headers["content-type"].startswith("application/json")
                        or not json.loads(response.content).get("message")):
                    failures.append(f"#{n}: {response.status_code} {response.text[:200]}")
    finally:
        stop.set()
        watcher.join(30)
    figures = {"requests": REQUESTS, "answers": dict(sorted(statuses.items())),
               "longest_healthz_gap_ms": round(max(gaps) * 1000, 1), "peak_rss_mb": round(peak_rss_mb(
                   service.proc.pid), 1)}
    print(f"\nradamsa fuzz: {json.dumps(figures)}")
    assert not failures, failures[:10]
    assert statuses[202] + statuses[200] > REQUESTS // 10  # the mutations left plenty of valid events too
    assert max(gaps) < 2.0, figures  # no request held the loop (an 11-byte exponent once held it 12 s)
    assert httpx.get(service.url + "/healthz").status_code == 200
