"""A keep-alive HTTP/1.1 client for vendor postbacks: asyncio's transports (TLS included) and httptools' parser.

Why it exists: delivery is bound by CPU, and the HTTP client was the largest part of it. aiohttp took 75-80 µs
of CPU per request here alone and 100-150 inside a delivery process; this client, which parses answers with
httptools (llhttp, the parser uvicorn uses) and does nothing a postback does not need, takes about 20 alone.
bench/HISTORY.md's 0.12.0 figures give the measurements; aiohttp stays selectable (`SEGRELAY_HTTP_CLIENT=aiohttp`).

What it does: one pool per origin (scheme, host, port) of at most `limit` connections, reused while the server
keeps them alive (LIFO: the warmest first) and closed once idle for `idle_seconds`; the host's addresses looked up
at most every `dns_seconds` and tried in turn (again at once after a failed connect); TLS with certificate and
host name checks (`ssl.create_default_context()`: the system's CAs, or `SSL_CERT_FILE`); bodies framed by
Content-Length, chunked or by the connection's end; 1xx interim answers skipped; at most `max_body` bytes of an
answer kept (the rest read and dropped); a connect deadline, and a deadline for the whole answer counted from the
moment the request is written.

The caller checks header values (no control characters: transport.refuse_unsafe_headers); this client checks
the URL. What it does not: redirects (a vendor's 3xx is its answer), proxies, cookies, compression (it asks for
`identity`), HTTP/2, pipelining. A request is never re-sent by this client: when a connection fails, the caller
decides.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import httptools

from app.deadlines import Sweeper, sweeper

DEFAULT_PORTS = {"http": 80, "https": 443}
Resolver = Callable[[str, int], Awaitable[list[tuple[int, tuple[Any, ...]]]]]  # host, port -> (family, sockaddr)
TARGET_SAFE = "/?=&%:@!$'()*+,;~-._[]"  # what may stay as it is in a request target; '%' keeps escapes escaped


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    retry_after: str | None


class ConnectFailed(Exception):
    """The connection could not be made: DNS, refused, unreachable, TLS handshake or certificate, timeout."""


class NoAnswer(Exception):
    """The request may have left, but no complete answer came: closed, reset, malformed or too slow."""


class BadRequest(ValueError):
    """The request as built cannot be written on the wire (a URL this client cannot send)."""


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection: one request at a time, its answer parsed as it arrives."""

    def __init__(self, client: HttpClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Answer] | None = None
        self._reset()

    def _reset(self) -> None:
        self._status = 0
        self._chunks: list[bytes] = []
        self._size = 0
        self._retry_after: str | None = None
        self._framed = False  # Content-Length or chunked: the answer does not end with the connection
        self._headers_done = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # bytes nobody asked for: this connection can no longer be trusted
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(NoAnswer("the server switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(NoAnswer(f"malformed answer ({exc})"))

    def eof_received(self) -> bool:
        return False  # close our side too: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            if self._headers_done and not self._framed:  # an answer that ends with the connection
                self._finish(keep_alive=False)
            else:
                reason = f"{type(exc).__name__}: " if exc is not None else ""
                self._waiter.set_exception(NoAnswer(f"{reason}connection closed before the answer was complete"))

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self._waiter is None:  # an answer nobody asked for, in the same read as the one we did
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered == b"retry-after":
            self._retry_after = value.decode("latin-1")
        elif lowered in (b"content-length", b"transfer-encoding"):
            self._framed = True

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        room = self.client.max_body - self._size
        if room > 0:
            self._chunks.append(body if len(body) <= room else body[:room])
        self._size += len(body)

    def on_message_complete(self) -> None:
        if 100 <= self._status < 200:  # an interim answer (100 Continue, 103 Early Hints): the real one follows
            self._reset()
            return
        self._finish(keep_alive=self._parser.should_keep_alive())

    # the exchange

    def _finish(self, *, keep_alive: bool) -> None:
        waiter, self._waiter = self._waiter, None
        if not keep_alive:
            self.close()
        if waiter is not None and not waiter.done():
            waiter.set_result(Answer(self._status, b"".join(self._chunks), self._retry_after))

    def _fail(self, error: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        self.close()
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def _time_out(self) -> None:
        if self._waiter is not None:  # not when the answer came in the same turn as the deadline's check
            self._fail(NoAnswer(f"no complete answer within {self.client.read_timeout:g} s"))

    async def exchange(self, data: bytes) -> Answer:
        assert self.transport is not None, "exchange() on a connection that was never made"
        client = self.client
        self._reset()
        waiter: asyncio.Future[Answer] = client.loop.create_future()
        self._waiter = waiter
        deadlines = client.deadlines
        deadlines.add(self, client.read_timeout, self._time_out)
        try:
            self.transport.write(data)
            return await waiter
        finally:
            deadlines.discard(self)
            if self._waiter is waiter:  # cancelled mid-exchange: what the server sends next is not ours to read
                self._waiter = None
                self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _Pool:
    """The connections to one origin, at most `limit` of them open."""

    def __init__(self, scheme: str, host: str, port: int, client: HttpClient) -> None:
        self.host, self.port, self.client = host, port, client
        self.tls = client.tls if scheme == "https" else None
        self.idle: list[_Connection] = []
        self.slots = asyncio.Semaphore(client.limit)
        self.addresses: list[tuple[int, str]] = []
        self.addresses_until = 0.0

    async def send(self, data: bytes) -> Answer:
        async with self.slots:
            connection = self._idle_connection()
            if connection is None:
                connection = await self._connect()
            answer = await connection.exchange(data)
            if not connection.closed:
                connection.idle_since = time.monotonic()
                self.idle.append(connection)
            return answer

    def _idle_connection(self) -> _Connection | None:
        now = time.monotonic()
        while self.idle:
            connection = self.idle.pop()
            if connection.closed:
                continue
            if now - connection.idle_since > self.client.idle_seconds:  # the server may be closing it right now
                connection.close()
                continue
            return connection
        return None

    async def _connect(self) -> _Connection:
        """A new connection to the first of the host's addresses that answers, within the connect timeout."""
        client = self.client
        failure = "no address"
        try:
            async with asyncio.timeout(client.connect_timeout):
                for family, address in await self._addresses():
                    try:
                        _, connection = await client.loop.create_connection(
                            lambda: _Connection(client), address, self.port, family=family, ssl=self.tls,
                            server_hostname=self.host if self.tls is not None else None)
                        return connection
                    except ssl.SSLError as exc:
                        failure = _reason(exc)
                        break  # the server answered: another address of it would present the same certificate
                    except OSError as exc:
                        failure = _reason(exc)
        except TimeoutError:
            failure = f"TimeoutError: no connection within {client.connect_timeout:g} s"
        self.addresses_until = 0.0  # look the name up again next time: it may have moved
        raise ConnectFailed(failure)

    async def _addresses(self) -> list[tuple[int, str]]:
        """The host's addresses, looked up at most every `dns_seconds` (aiohttp kept them 300 s too): a vendor that
        closes every connection must not cost a DNS query per request."""
        if time.monotonic() >= self.addresses_until:
            try:
                found = await self.client.resolve(self.host, self.port)
            except OSError as exc:
                raise ConnectFailed(_reason(exc)) from None
            self.addresses = list(dict.fromkeys((family, str(sockaddr[0])) for family, sockaddr in found))
            self.addresses_until = time.monotonic() + self.client.dns_seconds
        return self.addresses

    def close(self) -> None:
        for connection in self.idle:
            connection.close()
        self.idle.clear()


class HttpClient:
    """Pooled keep-alive HTTP/1.1 requests from one event loop (a delivery process's)."""

    def __init__(self, *, limit: int, connect_timeout: float, read_timeout: float, max_body: int,
                 idle_seconds: float = 30.0, dns_seconds: float = 300.0, tls: ssl.SSLContext | None = None,
                 resolve: Resolver | None = None) -> None:
        self.limit, self.connect_timeout, self.read_timeout = limit, connect_timeout, read_timeout
        self.max_body, self.idle_seconds, self.dns_seconds = max_body, idle_seconds, dns_seconds
        self.resolve: Resolver = resolve or self._getaddrinfo
        self.tls = tls if tls is not None else ssl.create_default_context()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deadlines: Sweeper | None = None
        self._pools: dict[str, tuple[_Pool, bytes]] = {}  # by URL prefix: the pool and the Host header line

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def _getaddrinfo(self, host: str, port: int) -> list[tuple[int, tuple[Any, ...]]]:
        found = await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return [(family, sockaddr) for family, _, _, _, sockaddr in found]

    @property
    def deadlines(self) -> Sweeper:
        if self._deadlines is None:
            self._deadlines = sweeper()
        return self._deadlines

    async def request(self, method: str, url: str, headers: Mapping[str, str], content: bytes) -> Answer:
        """Send one request and return its answer; ConnectFailed, NoAnswer or BadRequest otherwise."""
        scheme_and_authority, target = _split(url)
        found = self._pools.get(scheme_and_authority)
        if found is None:
            found = self._pools[scheme_and_authority] = self._pool(url)
        pool, host_line = found
        head = [f"{method} {target} HTTP/1.1\r\n".encode("ascii"), host_line]
        for name, value in headers.items():
            head.append(f"{name}: {value}\r\n".encode("latin-1"))
        head.append(f"accept-encoding: identity\r\ncontent-length: {len(content)}\r\n\r\n".encode("ascii"))
        return await pool.send(b"".join(head) + content)

    def _pool(self, url: str) -> tuple[_Pool, bytes]:
        parts = urlsplit(url)
        if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
            raise BadRequest(f"not an http(s) URL with a host: {parts.scheme}://…")
        if "@" in parts.netloc:
            raise BadRequest("a URL with credentials in it is not sent")
        port = parts.port or DEFAULT_PORTS[parts.scheme]
        host = parts.hostname.encode("idna").decode("ascii")
        authority = f"[{host}]" if ":" in host else host
        if port != DEFAULT_PORTS[parts.scheme]:
            authority += f":{port}"
        return _Pool(parts.scheme, host, port, self), f"host: {authority}\r\n".encode("ascii")

    async def close(self) -> None:
        for pool, _ in self._pools.values():
            pool.close()
        self._pools.clear()


def _reason(exc: OSError) -> str:
    """Why a connection could not be made: the error's kind and the system's (or TLS's) words for it."""
    if isinstance(exc, ssl.SSLError):
        return f"{type(exc).__name__}: {getattr(exc, 'verify_message', None) or exc.reason or exc}"
    return f"{type(exc).__name__}: {exc.strerror or exc}"


def _split(url: str) -> tuple[str, str]:
    """'https://host:8443/a/b?c' -> ('https://host:8443', '/a/b?c'), the target escaped if it must be."""
    scheme_end = url.find("://")
    path_start = url.find("/", scheme_end + 3) if scheme_end > 0 else -1
    query_start = url.find("?", scheme_end + 3) if scheme_end > 0 else -1
    if path_start < 0 or (0 <= query_start < path_start):
        path_start = query_start
    if path_start < 0:
        prefix, target = url, "/"
    else:
        prefix, target = url[:path_start], url[path_start:]
        if target[0] == "?":
            target = "/" + target
    if "#" in target:
        target = target[: target.index("#")]
    if not (target.isascii() and target.isprintable()) or " " in target:
        target = quote(target, safe=TARGET_SAFE)
    return prefix, target
