"""What the store's two pipelined clients share: the accept writer's (app/store/accept_writer.py, SQLite) and the
accept path's Redis connection (app/store/redis_pipe.py).

Each is one connection, opened on first use and again after it is lost (by one caller at a time, the others
waiting for the same attempt), whose answers come back in the order the requests were written. So deadlines are
kept per write, not per request: a queue of (deadline, the last request of that write) in the order they left, of
which only the oldest still waiting is watched, by the event loop's sweeper (app/deadlines.py). What a deadline
past due does is the client's own (`_expire`).
"""

from __future__ import annotations

import asyncio
import collections
from typing import cast

from app.deadlines import sweeper


class PipelinedClient(asyncio.Protocol):
    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Future[None] | None = None
        self._deadlines: collections.deque[tuple[float, int]] = collections.deque()  # (deadline, last request)

    @property
    def connected(self) -> bool:
        return self._transport is not None

    async def _open(self) -> None:
        """Connect (sets `_loop`; the transport arrives in `connection_made`), or raise StoreUnavailableError."""
        raise NotImplementedError

    def _expire(self) -> None:
        """The oldest write's deadline has passed."""
        raise NotImplementedError

    async def _connect(self) -> None:
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        try:
            await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    def _add_deadline(self, deadline: float, last: int, *, coalesce: float = 0.0) -> None:
        """A write whose requests up to `last` must be answered by `deadline` (the loop's time). With `coalesce`,
        a write whose deadline is at most that many seconds after the newest one joins it (answered by then: never
        later than asked) instead of adding one of its own."""
        if self._deadlines and deadline - coalesce <= self._deadlines[-1][0] <= deadline:
            self._deadlines[-1] = (self._deadlines[-1][0], last)
            return
        self._deadlines.append((deadline, last))
        if len(self._deadlines) == 1:
            self._watch()

    def _answered_through(self, last: int) -> None:
        """Every request up to `last` is answered: their writes' deadlines go."""
        if self._deadlines and self._deadlines[0][1] <= last:
            while self._deadlines and self._deadlines[0][1] <= last:
                self._deadlines.popleft()
            self._watch()

    def _watch(self) -> None:
        """Watch the oldest write's deadline (or nothing, when every write has been answered)."""
        if self._loop is None:
            return
        deadlines = sweeper(loop=self._loop)
        if self._deadlines:
            deadlines.add(self, self._deadlines[0][0] - self._loop.time(), self._expire)
        else:
            deadlines.discard(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def connection_lost(self, exc: Exception | None) -> None:
        """The client's own `connection_lost` fails what still waits; the deadlines go with the connection."""
        self._transport = None
        self._deadlines.clear()
        self._watch()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
