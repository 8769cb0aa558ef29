"""What an attacker or a sloppy client can do to the real server: idle and slow connections, malformed HTTP,
bodies that never finish, too many bytes at once. Each gets a bounded, specific answer; real requests go on."""

from __future__ import annotations

import json
import socket
import time

import httpx

from tests.support import Segrelay, basic, fixture, wait_until

SS_ONLY = {"segmentstreamApiToken": "ss-token"}


def raw_request(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def json_body(answer: bytes) -> dict[str, object]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    loaded: dict[str, object] = json.loads(body)
    return loaded


def test_malformed_http_gets_a_json_400(server: Segrelay) -> None:
    answer = raw_request(server.port, b"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert str(json_body(answer)["message"]).startswith("Malformed HTTP request")
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_idle_connections_are_bounded_and_closed_and_real_requests_go_on(make_server: type[Segrelay]) -> None:
    service = make_server({"SEGRELAY_MAX_CONNECTIONS": "20", "SEGRELAY_REQUEST_READ_SECONDS": "1"}).start()
    idle = [socket.create_connection(("127.0.0.1", service.port)) for _ in range(20)]
    try:
        time.sleep(0.2)
        refused = raw_request(service.port, b"")
        assert refused.startswith(b"HTTP/1.1 503"), refused
        assert "too many open connections" in str(json_body(refused)["message"])
        for sock in idle:  # the server closes each idle connection after the read deadline
            sock.settimeout(5)
            answer = sock.recv(4096)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer
        event = {**fixture("order_completed.json"), "messageId": "after-idle"}
        assert service.post(event, SS_ONLY).status_code == 202
    finally:
        for sock in idle:
            sock.close()


def test_a_slow_drip_body_is_cut_off_and_a_disconnect_is_not_a_500(make_server: type[Segrelay]) -> None:
    service = make_server({"SEGRELAY_REQUEST_READ_SECONDS": "1"}).start()
    head = (f"POST /segment HTTP/1.1\r\nHost: x\r\nAuthorization: {basic(service.key)}\r\n"
            f"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", service.port), timeout=5) as sock:
        sock.sendall(head + b'{"type": "track"')
        started = time.monotonic()
        assert sock.recv(4096) == b""  # closed by the server at the deadline
        assert time.monotonic() - started < 4
    with socket.create_connection(("127.0.0.1", service.port), timeout=5) as sock:
        sock.sendall(head + b'{"type"')  # the client leaves mid-body
    metrics = ""

    def counted() -> bool:
        nonlocal metrics
        metrics = httpx.get(service.url + "/metrics").text
        return 'status="499"' in metrics
    assert wait_until(counted, 5), metrics
    assert 'status="500"' not in metrics
    assert "unexpected error" not in service.logs()


def test_bytes_in_flight_are_bounded_with_a_503(make_server: type[Segrelay]) -> None:
    service = make_server({"SEGRELAY_MAX_INFLIGHT_BYTES": str(200_000)}).start()
    head = (f"POST /segment HTTP/1.1\r\nHost: x\r\nAuthorization: {basic(service.key)}\r\n"
            f"Content-Type: application/json\r\nContent-Length: 130000\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", service.port), timeout=5) as holder:
        holder.sendall(head + b" " * 120_000)  # held: not finished
        time.sleep(0.3)
        event = {**fixture("order_completed.json"), "messageId": "big",
                 "properties": {"blob": "x" * 100_000, "total": 1, "currency": "EUR", "order_id": "o"}}
        refused = service.post(event, SS_ONLY)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "more data than it can hold" in refused.json()["message"]
    # the held body was given back when its client left
    assert wait_until(lambda: service.post(event, SS_ONLY).status_code == 202, 5)
