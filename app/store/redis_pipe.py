"""One pipelined connection to Redis for the accept path's calls, without redis-py's layers around each call.

Every accept on Redis is one script call per event loop turn (`TurnBatch`), and identity look-ups one MGET per
turn. Through redis-py each call took a connection from the pool, went through its retry and timeout wrappers,
packed its arguments in Python, wrote through an asyncio stream and read the reply through another: about 20 µs
of the HTTP process's CPU per event beyond the packing itself (a tight loop of 8 callers, 6 events per call:
redis-py 42-49 µs per event, this pipe 20-25, the arguments' own building 4). Here a call is packed by hiredis (the
C library redis-py itself uses to read replies), written at once on one connection, and its reply read by
hiredis's reader in `data_received`; calls are answered in the order they were written, so one queue of futures
is all the bookkeeping.

The connection takes every option of the store's URL as redis-py reads it (host and port, a Unix socket, TLS and
its certificates, user and password, database): redis-py's pool builds a connection object from the URL, and
its public attributes say where and how to connect; the pipe connects and authenticates itself.

A reply that does not come within `reply_timeout` (redis-py's socket timeout for the same store) closes the
connection: every call waiting on it fails with StoreUnavailableError (a 503 for the accept path: Segment retries,
and an event that was in fact stored is then answered as a duplicate), and the next call connects again.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from app.store import StoreUnavailableError
from app.store.pipelined import PipelinedClient

MAX_BACKLOG = 16 * 1024 * 1024  # bytes written and not yet taken by Redis: past it, calls fail at once (503)
# Error replies that say Redis cannot take the call now (loading its AOF after a restart, a script running too long,
# full under `noeviction`, a replica, the wrong password...): StoreUnavailableError, a 503 with Retry-After, as
# redis-py's BusyLoadingError and AuthenticationError were; any other error reply is the caller's ResponseError.
UNAVAILABLE = ("LOADING", "BUSY", "OOM", "READONLY", "MASTERDOWN", "NOAUTH", "WRONGPASS", "NOPERM", "TRYAGAIN",
               "CLUSTERDOWN")


class RedisPipe(PipelinedClient):
    """`await pipe.call("MGET", key, ...)` → the reply; an error reply raises redis-py's ResponseError."""

    def __init__(self, pool: aioredis.ConnectionPool, *, connect_timeout: float = 5.0,
                 reply_timeout: float = 10.0) -> None:
        super().__init__()
        self._pool, self.connect_timeout, self.reply_timeout = pool, connect_timeout, reply_timeout
        self._reader = hiredis.Reader(replyError=ResponseError)
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._written = self._answered = 0

    async def call(self, *args: Any) -> Any:
        if self._transport is None:
            await self._connect()
        return await self.submit(*args)

    def submit(self, *args: Any) -> asyncio.Future[Any]:
        """`call` on a connected pipe, without a coroutine of its own: the future of the reply."""
        transport = self._transport
        if transport is None or transport.is_closing():  # a closing one is replaced once `connection_lost` has run
            raise StoreUnavailableError("redis: the connection was lost")
        if transport.get_write_buffer_size() > MAX_BACKLOG:  # Redis not reading: bounded, and a 503 at once
            raise StoreUnavailableError("redis: not keeping up")
        loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting.append(future)
        self._written += 1
        self._add_deadline(loop.time() + self.reply_timeout, self._written, coalesce=0.05)  # one per ~50 ms of calls
        transport.write(hiredis.pack_command(args))
        return future

    async def _open(self) -> None:
        """Connect as redis-py would for this URL, then authenticate and select the database."""
        self._loop = loop = asyncio.get_running_loop()
        options: Any = self._pool.make_connection()  # type: ignore[no-untyped-call]  # redis-py reads the URL
        try:
            async with asyncio.timeout(self.connect_timeout):
                if isinstance(options, aioredis.UnixDomainSocketConnection):
                    await loop.create_unix_connection(lambda: self, options.path)
                else:
                    tls = options.ssl_context.get() if isinstance(options, aioredis.SSLConnection) else None
                    await loop.create_connection(lambda: self, options.host, options.port, ssl=tls)
                handshake = []
                if options.password:
                    handshake.append(self.submit("AUTH", *([options.username] if options.username else []),
                                                 options.password))
                if options.db:
                    handshake.append(self.submit("SELECT", options.db))
                for reply in handshake:
                    await reply
        except (OSError, TimeoutError) as exc:
            self.close()
            raise StoreUnavailableError(f"redis: cannot connect ({type(exc).__name__})") from None
        except (ResponseError, StoreUnavailableError) as exc:  # AUTH or SELECT refused
            self.close()
            raise StoreUnavailableError(f"redis: {str(exc).removeprefix('redis: ')[:100]}") from None

    def _expire(self) -> None:
        """A reply overdue: the connection is no longer trusted (its calls fail in `connection_lost`)."""
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        reader, waiting = self._reader, self._waiting
        reader.feed(data)
        while waiting:
            reply = reader.gets()
            if reply is False:
                break
            self._answered += 1
            future = waiting.popleft()
            if not future.done():
                if isinstance(reply, ResponseError):
                    message = str(reply)
                    future.set_exception(StoreUnavailableError(f"redis: {message[:100]}")
                                         if message.startswith(UNAVAILABLE) else reply)
                else:
                    future.set_result(reply)
        self._answered_through(self._answered)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._reader = hiredis.Reader(replyError=ResponseError)
        waiting, self._waiting = self._waiting, collections.deque()
        self._written = self._answered = 0
        for future in waiting:
            if not future.done():  # done or not on Redis: unknown (a 503; a retry is answered as a duplicate)
                future.set_exception(StoreUnavailableError("redis: the connection was lost"))
