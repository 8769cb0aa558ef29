"""The HTTP protocol's own behaviour, on a transport that records what is written: one write per response."""

from __future__ import annotations

import asyncio
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


async def exchange(app: Any, request: bytes = REQUEST, transport: RecordingTransport | None = None
                   ) -> RecordingTransport:
    config = Config(app=app, log_config=None)
    config.load()
    protocol = GuardedHttpToolsProtocol(config, ServerState(), {})
    transport = transport or RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(request)
    await asyncio.wait_for(asyncio.gather(*protocol.tasks), 5)
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
