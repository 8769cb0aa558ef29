"""`segrelay serve` with several HTTP processes (SEGRELAY_HTTP_PROCESSES): one port, connections spread over them,
every event they accept delivered, one readiness for the group, a dead one restarted, SIGTERM drains them all."""

from __future__ import annotations

import json
import os
import re
import signal
import uuid
from typing import Any

import httpx

from tests.support import Segrelay, VendorStub, child_pids, fixture, role, wait_until
from tests.test_crash_e2e import delivered_message_ids, hit_ids

SS_ONLY = {"segmentstreamApiToken": "ss-token"}


def lines(service: Segrelay) -> list[dict[str, Any]]:
    return [json.loads(line) for line in service.logs().splitlines() if line.startswith("{")]


def http_children(service: Segrelay) -> list[int]:
    assert service.proc is not None
    return [pid for pid in child_pids(service.proc.pid) if role(pid) == "serve-http"]


def started_http_processes(service: Segrelay) -> set[int]:
    """Processes that have logged uvicorn's start-up as complete: they accept on the port."""
    return {line["pid"] for line in lines(service) if line["msg"] == "Application startup complete."}


def test_connections_are_spread_over_the_http_processes_and_every_event_is_delivered(
        fresh_stub: VendorStub, make_server: type[Segrelay]) -> None:
    service = make_server({"SEGRELAY_HTTP_PROCESSES": "2", "SEGRELAY_DELIVERY_PROCESSES": "1"}).start()
    assert service.proc is not None
    assert wait_until(lambda: len(started_http_processes(service)) == 2, 20)
    assert len(http_children(service)) == 1
    sent = {f"spread-{uuid.uuid4()}" for _ in range(40)}
    for message_id in sent:  # each on a new connection: the kernel picks a process for each
        answer = service.post({**fixture("order_completed.json"), "messageId": message_id}, SS_ONLY)
        assert answer.status_code == 202, answer.text
    answered_by = {line["pid"] for line in lines(service)
                   if line["logger"] == "segrelay.access" and line.get("message_id") in sent}
    assert answered_by == {service.proc.pid, *http_children(service)}

    wanted = hit_ids(sent)  # SegmentStream's hitId is derived from the messageId
    assert wait_until(lambda: wanted <= set(delivered_message_ids(fresh_stub)), 30)  # the child's events too

    assert service.terminate() == 0
    stopped = [line for line in lines(service) if line["msg"] == "stopped"]
    assert {line["pid"] for line in stopped if line["clean"]} >= answered_by  # every HTTP process drained


def test_readiness_is_the_groups_and_a_dead_http_process_is_replaced(make_server: type[Segrelay]) -> None:
    service = make_server({"SEGRELAY_HTTP_PROCESSES": "2", "SEGRELAY_DELIVERY_PROCESSES": "1"}).start()
    assert service.proc is not None
    assert wait_until(lambda: len(started_http_processes(service)) == 2, 20)
    [child] = http_children(service)
    [delivery] = [pid for pid in child_pids(service.proc.pid) if role(pid) == "deliver"]

    # A delivery process dies: the HTTP child, which does not supervise it, says so too (the shared flag).
    os.kill(delivery, signal.SIGKILL)

    def child_said_not_ready() -> bool:
        httpx.get(service.url + "/readyz", timeout=5)  # a new connection each time, to either process
        return any(line["pid"] == child and line.get("path") == "/readyz" and line.get("status") == 503
                   for line in lines(service))
    assert wait_until(child_said_not_ready, 20, interval=0.02)
    assert wait_until(lambda: httpx.get(service.url + "/readyz", timeout=5).status_code == 200, 20)

    # The HTTP child dies: readiness is false until another has taken its place.
    os.kill(child, signal.SIGKILL)
    answers = []
    assert wait_until(lambda: answers.append(httpx.get(service.url + "/readyz", timeout=5)) or
                      answers[-1].status_code == 503, 10, interval=0.02)
    assert answers[-1].json() == {"message": "a delivery or HTTP process is restarting"}
    assert wait_until(lambda: len(http_children(service)) == 1 and http_children(service) != [child], 20)
    assert wait_until(lambda: len(started_http_processes(service)) == 3, 20)  # the replacement accepts
    assert wait_until(lambda: httpx.get(service.url + "/readyz", timeout=5).status_code == 200, 20)
    assert "http process exited; starting another" in service.logs()
    assert service.terminate() == 0


def test_with_delivery_inside_the_primary_the_childs_events_are_delivered_too(fresh_stub: VendorStub,
                                                                             make_server: type[Segrelay]) -> None:
    """SEGRELAY_DELIVERY_PROCESSES=0: nothing wakes the primary's delivery for what a child accepted, so it is found
    by the delivery's own look at the queue (every half second at most)."""
    service = make_server({"SEGRELAY_HTTP_PROCESSES": "2", "SEGRELAY_DELIVERY_PROCESSES": "0"}).start()
    assert wait_until(lambda: len(started_http_processes(service)) == 2, 20)
    sent = {f"inline-{uuid.uuid4()}" for _ in range(30)}
    for message_id in sent:
        answer = service.post({**fixture("order_completed.json"), "messageId": message_id}, SS_ONLY)
        assert answer.status_code == 202, answer.text
    assert len({line["pid"] for line in lines(service)
                if line["logger"] == "segrelay.access" and line.get("message_id") in sent}) == 2
    assert wait_until(lambda: hit_ids(sent) <= set(delivered_message_ids(fresh_stub)), 20)
    assert service.terminate() == 0


def test_the_accept_writer_stores_for_every_http_process_and_a_dead_one_is_replaced(
        fresh_stub: VendorStub, make_server: type[Segrelay]) -> None:
    """On SQLite one process stores what every HTTP process accepts. Killed, accepts answer 503 (Segment retries),
    never 500, readiness is false, and serve starts another; nothing it answered 202 for is lost."""
    service = make_server({"SEGRELAY_HTTP_PROCESSES": "2", "SEGRELAY_DELIVERY_PROCESSES": "1"}).start()
    assert service.proc is not None
    assert wait_until(lambda: len(started_http_processes(service)) == 2, 20)
    [writer] = [pid for pid in child_pids(service.proc.pid) if role(pid) == "accept-writer"]

    os.kill(writer, signal.SIGKILL)
    answers: dict[str, httpx.Response] = {}

    def post_one() -> httpx.Response:
        message_id = f"gone-{uuid.uuid4()}"
        answers[message_id] = service.post({**fixture("order_completed.json"), "messageId": message_id}, SS_ONLY)
        return answers[message_id]
    assert wait_until(lambda: post_one().status_code == 503, 10, interval=0.02)
    refused = [answer for answer in answers.values() if answer.status_code == 503]
    assert refused[0].json()["message"] == "Storage is temporarily unavailable; retry later"
    assert refused[0].headers["retry-after"] == "5"
    assert all(answer.status_code in (202, 503) for answer in answers.values())
    assert wait_until(lambda: httpx.get(service.url + "/readyz", timeout=5).status_code == 503, 5, interval=0.02)

    def writers() -> list[int]:
        assert service.proc is not None
        return [pid for pid in child_pids(service.proc.pid) if role(pid) == "accept-writer"]
    assert wait_until(lambda: len(writers()) == 1 and writers() != [writer], 20)
    assert wait_until(lambda: httpx.get(service.url + "/readyz", timeout=5).status_code == 200, 20)
    accepted = {f"back-{uuid.uuid4()}" for _ in range(20)}
    for message_id in accepted:
        answer = service.post({**fixture("order_completed.json"), "messageId": message_id}, SS_ONLY)
        assert answer.status_code == 202, answer.text
    accepted |= {message_id for message_id, answer in answers.items() if answer.status_code == 202}
    exported = httpx.get(service.url + "/metrics", timeout=5).text  # the writer's own figures, every process's
    stored = re.search(r"^segrelay_accept_writer_accepts_total ([0-9.e+]+)$", exported, re.MULTILINE)
    assert stored is not None and float(stored.group(1)) >= len(accepted), exported[-2000:]
    assert "segrelay_accept_writer_transaction_seconds_count" in exported
    waits = re.search(r"^segrelay_accept_writer_lock_wait_seconds_count ([0-9.e+]+)$", exported, re.MULTILINE)
    assert waits is not None and float(waits.group(1)) >= 1, exported[-2000:]  # one per group of accepts
    assert wait_until(lambda: hit_ids(accepted) <= set(delivered_message_ids(fresh_stub)), 30)
    assert "accept writer process exited; starting another" in service.logs()
    assert service.terminate() == 0
