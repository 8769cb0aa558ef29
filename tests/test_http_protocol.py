"""The HTTP protocol's own behaviour, on a transport that records what is written: one write per response."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from starlette.types import Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.server import ServerState

from app.http_protocol import GuardedHttpToolsProtocol

REQUEST = b"POST /segment HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}"


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8080)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def exchange(app: Any, request: bytes = REQUEST, transport: RecordingTransport | None = None,
                   closed_by_client: bool = True) -> RecordingTransport:
    config = Config(app=app, log_config=None, proxy_headers=False)  # as serve runs it: the app unwrapped
    config.load()
    protocol = GuardedHttpToolsProtocol(config, ServerState(), {})
    transport = transport or RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(request)
    await asyncio.wait_for(asyncio.gather(*protocol.tasks), 5)
    if closed_by_client:
        protocol.connection_lost(None)
    return transport


async def answer_at_once(scope: Scope, receive: Receive, send: Send) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 202, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"{}"})


async def test_a_response_leaves_in_one_write() -> None:
    transport = await exchange(answer_at_once)
    assert len(transport.writes) == 1
    assert transport.writes[0].startswith(b"HTTP/1.1 202 Accepted\r\n")
    assert transport.writes[0].endswith(b"\r\n\r\n{}")


async def test_two_responses_on_one_connection_each_leave_in_one_write() -> None:
    transport = await exchange(answer_at_once, REQUEST + REQUEST)
    await asyncio.sleep(0.05)  # the second request starts when the first response is complete
    assert [w[:21] for w in transport.writes] == [b"HTTP/1.1 202 Accepted"] * 2
    assert all(w.endswith(b"{}") for w in transport.writes)


async def test_headers_are_not_held_while_the_body_is_awaited() -> None:
    seen_before_body: list[list[bytes]] = []
    transport = RecordingTransport()

    async def slow_body(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await asyncio.sleep(0.02)
        seen_before_body.append(list(transport.writes))
        await send({"type": "http.response.body", "body": b"{}"})

    await exchange(slow_body, transport=transport)
    assert len(seen_before_body[0]) == 1 and seen_before_body[0][0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.writes[1] == b"{}"


async def test_held_headers_go_out_before_a_failing_app_s_connection_closes() -> None:
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"10")]})
        raise RuntimeError("boom")

    transport = await exchange(broken)
    assert transport.closed
    assert len(transport.writes) == 1 and transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")


# The direct path (POST /segment without an ASGI cycle): an app offering `direct`, which records what reaches it.

@dataclass
class FakeReply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class FakeEndpoint:
    path = b"/segment"

    def __init__(self, limit: int, budget: int) -> None:
        self.limit, self.budget, self.used = limit, budget, 0
        self.calls: list[tuple[dict[bytes, bytes], bytes, int]] = []
        self.gone = 0

    def reserve(self, size: int) -> bool:
        if self.used + size > self.budget:
            return False
        self.used += size
        return True

    def release(self, size: int) -> None:
        self.used -= size

    async def answer(self, headers: dict[bytes, bytes], body: bytes, *, taken: int) -> FakeReply:
        self.calls.append((headers, body, taken))
        self.release(taken)
        return FakeReply(202, [(b"content-type", b"application/json"), (b"content-length", b"2")], b"{}")

    def client_gone(self) -> None:
        self.gone += 1


class DirectApp:
    """An ASGI app that also offers a direct endpoint, as app/server.py's does."""

    def __init__(self, limit: int = 100, budget: int = 1000) -> None:
        self.direct = FakeEndpoint(limit, budget)
        self.asgi_calls: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        self.asgi_calls.append(message.get("body", b""))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"{}"})


def post(body: bytes, *headers: bytes) -> bytes:
    return (b"POST /segment HTTP/1.1\r\nhost: x\r\n" + b"".join(h + b"\r\n" for h in headers)
            + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


async def test_a_post_with_a_declared_length_is_answered_directly_in_one_write() -> None:
    app = DirectApp()
    transport = await exchange(app, post(b'{"a":1}', b"X-Request-Id: r1"), closed_by_client=False)
    assert app.asgi_calls == []
    [(headers, body, taken)] = app.direct.calls
    assert body == b'{"a":1}' and taken == 7 and headers[b"x-request-id"] == b"r1"
    assert transport.writes == [b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: 2\r\n"
                                b"\r\n{}"]
    assert not transport.closed and app.direct.used == 0


async def test_a_direct_answer_to_connection_close_says_so_and_closes() -> None:
    app = DirectApp()
    transport = await exchange(app, post(b"{}", b"Connection: close"), closed_by_client=False)
    assert len(app.direct.calls) == 1
    assert transport.writes[0].endswith(b"connection: close\r\n\r\n{}") and transport.closed


async def test_requests_the_direct_path_does_not_take_go_through_the_asgi_app() -> None:
    chunked = b"POST /segment HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    cases = {
        "chunked": (DirectApp(), chunked),
        "larger than the limit": (DirectApp(limit=5), post(b'{"a":1}')),
        "more than the budget has free": (DirectApp(budget=5), post(b'{"a":1}')),
        "another path": (DirectApp(), post(b"{}").replace(b"/segment", b"/segment?x=1")),
        "another method": (DirectApp(), post(b"{}").replace(b"POST", b"PUT")),
        "HTTP/1.0": (DirectApp(), post(b"{}").replace(b"HTTP/1.1", b"HTTP/1.0")),
        "Expect: 100-continue": (DirectApp(), post(b"{}", b"Expect: 100-continue")),
    }
    for name, (app, request) in cases.items():
        transport = await exchange(app, request)
        assert app.direct.calls == [], name
        assert len(app.asgi_calls) == 1 and transport.writes[-1].endswith(b"{}"), name
        assert app.direct.used == 0, name


async def test_pipelined_requests_are_answered_in_order_each_in_one_write() -> None:
    app = DirectApp()
    transport = await exchange(app, post(b'{"n":1}') + post(b'{"n":2}') + post(b'{"n":3}'))
    await asyncio.sleep(0.05)  # a request pipelined behind an unanswered one starts when that one is answered
    assert [call[1] for call in app.direct.calls] == [b'{"n":1}']
    assert app.asgi_calls == [b'{"n":2}', b'{"n":3}']  # behind an unanswered request: uvicorn's queue
    assert [w[:12] for w in transport.writes] == [b"HTTP/1.1 202", b"HTTP/1.1 200", b"HTTP/1.1 200"]


async def test_a_client_leaving_mid_body_gives_its_reservation_back_and_is_counted() -> None:
    app = DirectApp()
    config = Config(app=app, log_config=None, proxy_headers=False)  # as serve runs it: the app unwrapped
    config.load()
    protocol = GuardedHttpToolsProtocol(config, ServerState(), {})
    transport = RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(post(b'{"a":1}')[:-3])
    assert app.direct.used == 7
    protocol.connection_lost(None)
    assert app.direct.used == 0 and app.direct.gone == 1 and app.direct.calls == [] and transport.writes == []


async def test_an_idle_connection_after_a_direct_answer_is_closed_at_the_keep_alive_timeout() -> None:
    config = Config(app=DirectApp(), log_config=None, proxy_headers=False, timeout_keep_alive=0.1)
    config.load()
    protocol = GuardedHttpToolsProtocol(config, ServerState(), {})
    transport = RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(post(b"{}"))
    await asyncio.wait_for(asyncio.gather(*protocol.tasks), 5)
    assert len(transport.writes) == 1 and not transport.closed
    await asyncio.sleep(0.05)
    protocol.data_received(post(b"{}"))  # a new request before the deadline: answered, and the wait starts again
    await asyncio.wait_for(asyncio.gather(*protocol.tasks), 5)
    assert len(transport.writes) == 2 and not transport.closed
    for _ in range(40):
        if transport.closed:
            break
        await asyncio.sleep(0.05)
    assert transport.closed  # within a sweep (0.25 s) of the 0.1 s timeout
    protocol.connection_lost(None)


async def test_a_client_leaving_once_its_body_arrived_is_answered_and_its_reservation_given_back_once() -> None:
    app = DirectApp()
    config = Config(app=app, log_config=None, proxy_headers=False)
    config.load()
    protocol = GuardedHttpToolsProtocol(config, ServerState(), {})
    transport = RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(post(b'{"a":1}'))
    protocol.connection_lost(None)  # before its answer's task first runs
    await asyncio.wait_for(asyncio.gather(*protocol.tasks), 5)
    assert len(app.direct.calls) == 1 and app.direct.gone == 0 and app.direct.used == 0
