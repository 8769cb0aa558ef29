"""uvicorn's httptools protocol with the limits a public endpoint needs.

- **Connections are bounded**: past `SEGRELAY_MAX_CONNECTIONS` open connections a new one gets a JSON 503 and is
  closed, so idle sockets cannot use up the file descriptors that real requests need.
- **A request must arrive in time**: from the moment a connection opens (or a new request on it begins) its headers
  and body must arrive within `SEGRELAY_REQUEST_READ_SECONDS`, else the connection is closed. This ends idle
  connections that never send anything and slow-drip clients (slowloris, slow bodies); between requests uvicorn's
  keep-alive timeout (`SEGRELAY_KEEPALIVE_SECONDS`) applies.
- **Malformed HTTP gets JSON**: a request the parser refuses is answered 400 with `{"message": ...}`, like every
  other answer of segrelay.
- **A response leaves in one write**: uvicorn writes the status line and headers as soon as the app starts its
  response, then the body; the headers are held until the body's first bytes (or the end of the event loop's
  turn), so that each answer costs one system call and one TCP segment instead of two.
- **POST /segment skips the ASGI request cycle**: when the app offers a `direct` endpoint (app/server.py) and the
  request declares a body within the endpoint's limit, the protocol reads the body itself, reserves its bytes in
  the endpoint's budget when the headers arrive, and writes the endpoint's answer in one write: no scope, no ASGI
  messages, no cycle object, no event per body chunk. That was about 8 % of the HTTP process's work per event
  (README, 0.13.7). Anything else (chunked bodies, `Expect: 100-continue`, HTTP/1.0, a request pipelined behind
  one not yet answered, a body the budget cannot hold yet) takes uvicorn's cycle and the endpoint's ASGI side,
  which answer it as before.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from app.deadlines import sweeper

# Set by the serve command before uvicorn starts (uvicorn builds the protocol from its class).
LIMITS = {"max_connections": 1024, "request_read_seconds": 30.0}
READ_DEADLINE_TICK = 0.25  # a request that takes too long to arrive is cut off at most this much late


def _response(status: bytes, message: str) -> bytes:
    body = orjson.dumps({"message": message})
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


class OneWrite:
    """A request cycle's view of the transport: its first write (the status line and headers) waits for the next
    one (the body), or at most until the end of the event loop's turn, and both leave in one write."""

    __slots__ = ("_first", "_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop = transport, loop
        self._held: bytes | None = None
        self._first = True

    def write(self, data: bytes) -> None:
        if self._first:
            self._first = False
            self._held = data
            self._loop.call_soon(self.release)
        elif self._held is not None:
            held, self._held = self._held, None
            self._transport.write(held + data)
        else:
            self._transport.write(data)

    def release(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self.release()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()


class Reply(Protocol):
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class DirectEndpoint(Protocol):
    """What an app offers (as `app.direct`) to answer POST `path` without an ASGI cycle (app/endpoint.py)."""

    path: bytes
    limit: int  # the largest body it takes

    def reserve(self, size: int) -> bool: ...

    def release(self, size: int) -> None: ...

    async def answer(self, headers: dict[bytes, bytes], body: bytes, *, taken: int) -> Reply | None:
        """The answer to a request whose body has arrived, `taken` bytes of the budget reserved for it (given back
        by the endpoint); None only for a client that left before its body arrived, which cannot happen here."""

    def client_gone(self) -> None: ...


class DirectCycle:
    """One request on the direct path: its body as it arrives, then its answer (the attributes uvicorn reads of a
    request cycle: `response_complete`, `keep_alive`)."""

    __slots__ = ("body", "headers", "keep_alive", "reserved", "response_complete")  # reserved: -1 once answering

    def __init__(self, headers: list[tuple[bytes, bytes]], keep_alive: bool, reserved: int) -> None:
        self.headers, self.keep_alive, self.reserved = headers, keep_alive, reserved
        self.body: list[bytes] = []
        self.response_complete = False


def _declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The Content-Length of a request without Transfer-Encoding, else None."""
    length = None
    for name, value in headers:
        if name == b"content-length":
            if length is not None or not value.isdigit():
                return None
            length = int(value)
        elif name == b"transfer-encoding":
            return None
    return length


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._armed = False
        self._sweeper = sweeper(READ_DEADLINE_TICK)
        # Only an app uvicorn runs as it is (serve turns proxy headers off): a middleware around it is never skipped.
        self._direct: DirectEndpoint | None = getattr(self.app, "direct", None)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > LIMITS["max_connections"]:
            transport.write(_response(b"503 Service Unavailable",
                                      "segrelay has too many open connections; retry shortly"))
            transport.close()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._sweeper.discard(self)  # a keep-alive deadline (_response_complete)
        cycle: Any = self.cycle  # uvicorn's RequestResponseCycle, or ours
        if type(cycle) is DirectCycle:
            self.cycle = None  # type: ignore[assignment]  # uvicorn's own handling is for its cycles
            if cycle.reserved >= 0 and self._direct is not None:  # its body never finished arriving
                self._direct.release(cycle.reserved)
                self._direct.client_gone()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._armed:
            self._arm()

    def on_headers_complete(self) -> None:
        direct = self._direct
        if direct is not None and self.url == direct.path and self._direct_cycle(direct):
            return
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.transport is self.transport:  # not refused before a cycle began
            cycle.transport = OneWrite(self.transport, self.loop)  # type: ignore[assignment]

    def _direct_cycle(self, direct: DirectEndpoint) -> bool:
        """Start a request on the direct path when it can take it (the docstring at the top)."""
        parser = self.parser
        if (parser.get_method() != b"POST" or parser.get_http_version() != "1.1" or self.expect_100_continue
                or parser.should_upgrade() or (self.cycle is not None and not self.cycle.response_complete)):
            return False
        length = _declared_length(self.headers)
        if length is None or length > direct.limit or not direct.reserve(length):
            return False
        self.cycle = DirectCycle(self.headers, parser.should_keep_alive(), length)  # type: ignore[assignment]
        return True

    def on_body(self, body: bytes) -> None:
        cycle: Any = self.cycle  # uvicorn's RequestResponseCycle, or ours
        if type(cycle) is DirectCycle:
            cycle.body.append(body)
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        cycle: Any = self.cycle  # uvicorn's RequestResponseCycle, or ours
        if type(cycle) is DirectCycle:
            reserved, cycle.reserved = cycle.reserved, -1  # the endpoint gives it back from here on
            task = self.loop.create_task(self._answer_direct(cycle, reserved))
            task.add_done_callback(self.tasks.discard)
            self.tasks.add(task)
        else:
            super().on_message_complete()

    async def _answer_direct(self, cycle: DirectCycle, reserved: int) -> None:
        assert self._direct is not None
        chunks = cycle.body
        reply = await self._direct.answer(dict(cycle.headers), chunks[0] if len(chunks) == 1 else b"".join(chunks),
                                          taken=reserved)
        cycle.response_complete = True
        if reply is None or self.transport.is_closing():
            return
        out = [STATUS_LINE[reply.status]]
        for name, value in (*self.server_state.default_headers, *reply.headers):
            out += (name, b": ", value, b"\r\n")
        if not cycle.keep_alive:
            out.append(b"connection: close\r\n")
        out += (b"\r\n", reply.body)
        self.transport.write(b"".join(out))
        if not cycle.keep_alive:
            self.transport.close()
        self._response_complete()

    def _response_complete(self) -> None:
        """uvicorn's `on_response_complete`, with the keep-alive deadline noted in the sweeper instead of a timer of
        its own per request (`loop.call_later` and its cancel: about 1 % of the HTTP process's work per event).
        The direct path's only: its answer always follows the whole body, when the read deadline is already
        disarmed. An ASGI answer may come before its body has arrived (a 401, a 413), while the read deadline
        (the same sweeper entry) must stay, so uvicorn's cycle keeps uvicorn's timer."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:  # replaced by the read deadline when the next request begins (_arm)
            self._sweeper.add(self, self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def send_400_response(self, msg: str) -> None:
        self.transport.write(_response(b"400 Bad Request", f"Malformed HTTP request: {msg}"))
        self.transport.close()

    def _arm(self) -> None:
        """The read deadline, checked by one timer per process (app/deadlines.py), not a timer per request."""
        self._armed = True
        self._sweeper.add(self, LIMITS["request_read_seconds"], self._too_slow)

    def _disarm(self) -> None:
        if self._armed:
            self._armed = False
            self._sweeper.discard(self)

    def _too_slow(self) -> None:
        self._armed = False
        if not self.transport.is_closing():
            if self.cycle is None or self.cycle.response_complete:  # nothing of ours is on the wire
                self.transport.write(_response(b"408 Request Timeout",
                                               "The request did not arrive in time; connection closed"))
            self.transport.close()
