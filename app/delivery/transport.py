"""How a vendor request goes over the wire: the worker's seam, and its aiohttp implementation.

The worker calls a `Transport` and gets a `VendorAnswer`, or one of two errors: `SendFailed` (the vendor could not
be reached or did not answer in time: retried) or `RequestRefused` (our own HTTP client will not send this
request, e.g. a header value it rejects: never the vendor's fault, so a dead letter and not a retry).

The default is `BuiltinTransport` on segrelay's own keep-alive client (http_client.py): about 20 µs of CPU per
request here, against 75-150 µs for aiohttp and 700-2,000 µs for httpx (encode/httpx#3215). `AiohttpTransport`
stays selectable (`SEGRELAY_HTTP_CLIENT=aiohttp`). Unit tests pass a function of their own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from app.delivery.http_client import BadRequest, ConnectFailed, HttpClient, NoAnswer
from app.outgoing import OutgoingRequest

MAX_BODY_KEPT = 2048  # bytes of a vendor's answer kept with a dead letter
MAX_BODY_READ = 64 * 1024  # bytes of a vendor's answer read at all


@dataclass(frozen=True, slots=True)
class VendorAnswer:
    status: int
    body: bytes
    retry_after: str | None = None


class SendFailed(Exception):
    """No answer from the vendor: connection refused or reset, DNS, TLS, timeout."""

    def __init__(self, message: str, *, connect: bool) -> None:
        super().__init__(message)
        self.connect = connect  # the connection itself failed (counts towards opening the circuit)


class RequestRefused(Exception):
    """Our HTTP client refuses to send the request as built."""


Transport = Callable[[str, OutgoingRequest], Awaitable[VendorAnswer]]


def refuse_unsafe_headers(request: OutgoingRequest) -> None:
    for name, value in request.headers.items():
        if not (value.isascii() and value.isprintable()):
            raise RequestRefused(f"header {name} holds a control or non-ASCII character")


class BuiltinTransport:
    """segrelay's own keep-alive client: one pool per vendor origin, at most `concurrency` connections each."""

    def __init__(self, *, concurrency: int, connect_timeout: float, read_timeout: float) -> None:
        self._client = HttpClient(limit=concurrency, connect_timeout=connect_timeout, read_timeout=read_timeout,
                                  max_body=MAX_BODY_READ)

    async def __call__(self, vendor: str, request: OutgoingRequest) -> VendorAnswer:
        refuse_unsafe_headers(request)
        try:
            answer = await self._client.request(request.method, request.url, request.headers, request.content)
        except ConnectFailed as exc:
            raise SendFailed(f"{exc}: could not connect to {vendor}", connect=True) from None
        except NoAnswer as exc:
            raise SendFailed(f"{exc}: no answer from {vendor}", connect=False) from None
        except BadRequest as exc:
            raise RequestRefused(str(exc)) from None
        return VendorAnswer(answer.status, answer.body, answer.retry_after)

    async def close(self) -> None:
        await self._client.close()


def transport_for(name: str, *, concurrency: int, connect_timeout: float, read_timeout: float) -> \
        BuiltinTransport | AiohttpTransport:
    kind = BuiltinTransport if name == "builtin" else AiohttpTransport
    return kind(concurrency=concurrency, connect_timeout=connect_timeout, read_timeout=read_timeout)


class AiohttpTransport:
    """One pooled aiohttp session per vendor: keep-alive, at most `concurrency` connections, the same timeouts."""

    def __init__(self, *, concurrency: int, connect_timeout: float, read_timeout: float) -> None:
        self._settings = (concurrency, connect_timeout, read_timeout)
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    def _session(self, vendor: str) -> aiohttp.ClientSession:
        session = self._sessions.get(vendor)
        if session is None:
            concurrency, connect_timeout, read_timeout = self._settings
            connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency, keepalive_timeout=30,
                                             ttl_dns_cache=300)
            timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_connect=connect_timeout,
                                            sock_read=read_timeout)
            # No cookie jar: one session serves every tenant, and a cookie a vendor sets in answer to one tenant's
            # postback must never ride along with another's (nor cost a jar look-up on every request).
            session = self._sessions[vendor] = aiohttp.ClientSession(
                connector=connector, timeout=timeout, auto_decompress=True, skip_auto_headers=("User-Agent",),
                trust_env=False, cookie_jar=aiohttp.DummyCookieJar())
        return session

    async def __call__(self, vendor: str, request: OutgoingRequest) -> VendorAnswer:
        refuse_unsafe_headers(request)
        session = self._session(vendor)
        try:
            async with session.request(request.method, request.url, headers=request.headers, data=request.content,
                                       allow_redirects=False) as response:
                body = await response.content.read(MAX_BODY_READ)
                return VendorAnswer(response.status, body, response.headers.get("retry-after"))
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise SendFailed(f"{type(exc).__name__}: could not connect to {vendor}", connect=True) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SendFailed(f"{type(exc).__name__}: no answer from {vendor}", connect=False) from None
        except (ValueError, TypeError, UnicodeError) as exc:
            raise RequestRefused(f"{type(exc).__name__}: the HTTP client refused the request as built") from None

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self._sessions.values()), return_exceptions=True)
        self._sessions.clear()
