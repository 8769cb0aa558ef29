"""Disk full, for real: segrelay's SQLite file on a small tmpfs that fills up, then gets its space back.

Every 202 must be stored and delivered once space returns, every event that could not be stored must be answered
503 (Segment retries it), and the failed writes of delivery (lease, complete) must not turn into a re-send storm.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import Segrelay, VendorStub, basic, fixture, settings_header, wait_until
from tests.test_crash_e2e import delivered_message_ids, hit_ids

SS_ONLY = settings_header({"segmentstreamApiToken": "ss-token"})


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs", str(mount_point)],
                          capture_output=True, text=True, check=False)
    if made.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs for the disk-full test (CI runs as root): {made.stderr.strip()}")
        pytest.skip(f"mounting a tmpfs needs root: {made.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def post_all(service: Segrelay, message_ids: list[str]) -> Counter[str]:
    """Post each event once from 8 threads; the answer's status per messageId."""
    statuses: dict[str, str] = {}
    lock = threading.Lock()
    todo = list(message_ids)

    def run() -> None:
        headers = {"Authorization": basic(service.key), "X-Segment-Settings": SS_ONLY,
                   "Content-Type": "application/json"}
        with httpx.Client(timeout=15) as client:
            while True:
                with lock:
                    if not todo:
                        return
                    message_id = todo.pop()
                event = {**fixture("order_completed.json"), "messageId": message_id}
                try:
                    response = client.post(service.url + "/segment", content=json.dumps(event), headers=headers)
                    status = str(response.status_code)
                    if response.status_code >= 500:
                        assert response.json()["message"], response.text
                except httpx.HTTPError:
                    status = "error"
                with lock:
                    statuses[message_id] = status
    threads = [threading.Thread(target=run) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return Counter(statuses)  # type: ignore[arg-type]


def test_disk_full_keeps_every_202_and_answers_503_until_space_returns(
        small_disk: Path, fresh_stub: VendorStub, make_server: type[Segrelay]) -> None:
    fresh_stub.script("/segmentstream", [], default={"status": 204, "delay": 0.02})
    service = make_server({"SEGRELAY_STORE": f"sqlite:///{small_disk / 'store.db'}",
                           "SEGRELAY_MIN_FREE_DISK_MB": "0",  # the guard off: the writes themselves must fail
                           "SEGRELAY_CONNECT_TIMEOUT": "1", "SEGRELAY_READ_TIMEOUT": "2",
                           "SEGRELAY_LEASE_SECONDS": "4"}).start()
    ballast = small_disk / "ballast"
    free = os.statvfs(small_disk)
    with open(ballast, "wb") as handle:  # leave about 300 KB
        handle.write(b"\0" * max(0, free.f_bavail * free.f_frsize - 300 * 1024))

    accepted: set[str] = set()
    refused: list[str] = []
    answers: Counter[str] = Counter()
    for _ in range(6):  # until the disk has refused a good number of events
        batch = [f"disk-{uuid.uuid4()}" for _ in range(300)]
        statuses = post_all(service, batch)
        answers.update(statuses.values())
        accepted |= {m for m in batch if statuses[m] == "202"}
        refused += [m for m in batch if statuses[m] != "202"]
        if len(refused) >= 200:
            break
    assert set(answers) <= {"202", "503"}, answers  # never a 500, never a dropped connection
    assert len(refused) >= 200, answers
    assert httpx.get(service.url + "/healthz").status_code == 200

    ballast.unlink()  # space returns; Segment retries what was refused
    retried = post_all(service, refused)
    assert set(retried.values()) <= {"202", "200"}, retried
    accepted |= {m for m in refused if retried[m] == "202"}

    wanted = hit_ids(accepted)
    assert wait_until(lambda: wanted <= set(delivered_message_ids(fresh_stub)), 90), "accepted events were lost"
    seen = delivered_message_ids(fresh_stub)
    duplicates = sum(seen.values()) - len(seen)
    figures = {"first_answers": dict(answers), "accepted": len(accepted), "delivered": len(wanted & set(seen)),
               "lost": len(wanted - set(seen)), "duplicate_sends": duplicates, "max_sends_of_one": max(seen.values())}
    print(f"\ndisk full: {json.dumps(figures)}")
    assert set(seen) == wanted  # exactly what was accepted, nothing else
    assert max(seen.values()) <= 3  # a send whose completion could not be written is repeated, not stormed
    assert duplicates <= len(wanted) // 4
    assert service.terminate() == 0
