"""503 with Retry-After whenever segrelay cannot promise to keep an event: draining, disk, store down."""

from __future__ import annotations

import signal
import sqlite3
import uuid
from pathlib import Path

import httpx

from tests.support import RedisServer, Segrelay, fixture

SS_ONLY = {"segmentstreamApiToken": "ss-token"}


def order() -> dict[str, object]:
    return {**fixture("order_completed.json"), "messageId": f"m-{uuid.uuid4()}"}


def test_sigterm_turns_readiness_false_and_answers_503_while_draining(make_server: type[Segrelay]) -> None:
    service = make_server({"SEGRELAY_SHUTDOWN_DELAY_SECONDS": "3"}).start()
    assert service.post(order(), SS_ONLY).status_code == 202
    assert service.proc is not None
    service.proc.send_signal(signal.SIGTERM)
    ready = httpx.get(service.url + "/readyz")
    assert ready.status_code == 503 and ready.json()["message"] == "draining: shutting down"
    refused = service.post(order(), SS_ONLY)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
    assert "restarting" in refused.json()["message"]
    assert service.proc.wait(30) == 0


def test_nearly_full_disk_answers_503(make_server: type[Segrelay]) -> None:
    service = make_server({"SEGRELAY_MIN_FREE_DISK_MB": str(10**12)}).start()
    response = service.post(order(), SS_ONLY)
    assert response.status_code == 503 and response.headers["retry-after"] == "60"
    assert response.json() == {"message": "Storage is nearly full; retry later"}


def test_redis_down_answers_503_not_500(make_server: type[Segrelay], tmp_path: Path) -> None:
    redis = RedisServer(tmp_path)
    service = make_server({"SEGRELAY_STORE": redis.url}).start()
    assert service.post(order(), SS_ONLY).status_code == 202
    redis.stop()
    response = service.post(order(), SS_ONLY)
    assert response.status_code == 503, response.text
    assert response.json()["message"] == "Storage is temporarily unavailable; retry later"
    assert httpx.get(service.url + "/readyz").json() == {"message": "store unreachable"}


def test_a_stalled_store_answers_503_and_the_late_write_makes_the_retry_a_duplicate(
        make_server: type[Segrelay]) -> None:
    service = make_server({"SEGRELAY_ACCEPT_TIMEOUT_SECONDS": "1", "SEGRELAY_KEY_CACHE_SECONDS": "60"}).start()
    assert service.post(order(), SS_ONLY).status_code == 202  # the key is now cached: the stall hits the write
    event = order()
    blocker = sqlite3.connect(service.tmp / "store.db", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another writer holds the database
    try:
        response = service.post(event, SS_ONLY)
        assert response.status_code == 503 and response.headers["retry-after"] == "5"
        assert response.json() == {"message": "Storage is slow to answer; retry later"}
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    retry = service.post(event, SS_ONLY)  # Segment retries the same messageId
    assert retry.status_code == 200 and retry.json()["message"] == "duplicate"


def test_sigterm_right_after_start_is_a_clean_stop(make_server: type[Segrelay]) -> None:
    """The delivery processes may not have installed their handlers yet: still exit 0, nothing left behind."""
    for _ in range(3):
        service = make_server().start()
        assert service.terminate() == 0, service.logs()[-2000:]
