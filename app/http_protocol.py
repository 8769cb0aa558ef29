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
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

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


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._armed = False
        self._sweeper = sweeper(READ_DEADLINE_TICK)

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
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._armed:
            self._arm()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.transport is self.transport:  # not refused before a cycle began
            cycle.transport = OneWrite(self.transport, self.loop)  # type: ignore[assignment]

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

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
