"""The accept writer: one process that stores the events every HTTP process of `serve` accepts (SQLite).

Measured (`bench/ingest.py`, the accept path alone): with each HTTP process storing its own events on a writer
thread, an HTTP process spent about 120 µs of CPU per event on the store, where SQLite's own work is about 27 µs,
and neither core was busy. The writer thread and the event loop traded Python's GIL at every SQLite step, and the
HTTP processes took turns at SQLite's write lock, each committing only its own events.

Here the HTTP processes send their accepts (`marshal`, a turn's in one frame) over a Unix socket to this process,
which has no event loop and no other thread: it reads whatever has arrived from all of them, stores it in one
transaction (`app/store/sqlite.py`'s `accept_many`, the same statements), commits (one fsync for every HTTP process),
and answers each request. A caller learns its event is stored only after COMMIT returns, as before.

Frames both ways: a 4-byte little-endian length, then a marshalled list: an HTTP process sends the requests of one
event loop turn in one frame, and the writer answers the requests of one transaction from that process in one frame
(one `marshal` call and one length per turn, not per request).
- request: (request id, tenant, message id, payload, jobs as (vendor, target, event name, batch key), now, ttl,
  skips as (vendor, reason))
- answer: (request id, fresh, "") or (request id, None, "unavailable: <why>" | "error: <why>")

If this process is gone (crashed, restarting), an accept is a 503 (`StoreUnavailableError`): Segment retries, and
a retry of an event that was in fact stored is answered as a duplicate. `serve` restarts it within a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import marshal
import os
import selectors
import signal
import socket
import struct
import time
from typing import Any

from app.store import StoreError, StoreUnavailableError
from app.store.pipelined import PipelinedClient

log = logging.getLogger("segrelay.store")
_LENGTH = struct.Struct("<I")
MAX_FRAME = 16 * 1024 * 1024  # far above any accept (an event is at most 32 KB): a longer frame is a broken peer
MAX_GROUP = 512  # accepts per transaction
MAX_SOCKET_PATH = 100  # bytes: the limit of a Unix socket's path is 108 on Linux
MAX_BACKLOG = 16 * 1024 * 1024  # bytes an HTTP process holds for a writer that does not read: past it, 503 at once
FLUSH_BYTES = 1024 * 1024  # a turn's requests leave in frames of about this many payload bytes at most


def frame(value: Any) -> bytes:
    data = marshal.dumps(value)
    return _LENGTH.pack(len(data)) + data


def frames(buffer: bytearray) -> list[Any]:
    """The complete frames at the start of the buffer, removed from it."""
    found, start, end = [], 0, len(buffer)
    while end - start >= 4:
        (length,) = _LENGTH.unpack_from(buffer, start)
        if length > MAX_FRAME:
            raise ValueError(f"a frame of {length} bytes")
        if end - start - 4 < length:
            break
        # Only our own processes reach the socket (a directory private to this user): marshal is safe here.
        found.append(marshal.loads(buffer[start + 4:start + 4 + length]))  # noqa: S302
        start += 4 + length
    del buffer[:start]
    return found


class AcceptWriterClient(PipelinedClient):
    """An HTTP process's connection to the accept writer: requests of one event loop turn leave in one write,
    answers resolve their callers' futures. Connects on first use and again after the connection is lost.

    Deadlines are kept per write, not per request (app/store/pipelined.py): the requests of one write share their
    deadline (the shortest timeout among them, from the write); past it its requests not yet answered fail with
    TimeoutError (a request without a timeout never does). With
    one timeout for every accept (SEGRELAY_ACCEPT_TIMEOUT_SECONDS) deadlines come in the order of the writes. A
    deadline per request (`deadlines.within`: an entry in the sweeper, a closure and a coroutine each) was about
    3 % of the HTTP process's work per event (py-spy)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self._waiting: dict[int, asyncio.Future[Any]] = {}  # in request id order: the order of the writer's answers
        self._outgoing: list[tuple[Any, ...]] = []  # the requests of this turn, not yet written
        self._outgoing_bytes = 0  # their payloads' size
        self._incoming = bytearray()
        self._next_id = 0
        self._timeout: float | None = None  # the shortest timeout among the requests not yet written
        self._answered = 0  # the last request id answered
        self._untimed: set[int] = set()  # requests without a timeout: never failed by a deadline

    async def call(self, request: tuple[Any, ...], timeout: float | None = None) -> Any:
        """The writer's answer to `request`; TimeoutError past `timeout` (the writer may still store it)."""
        if self._transport is None:
            await self._connect()
        return await self.submit(request, timeout)

    def submit(self, request: tuple[Any, ...], timeout: float | None = None) -> asyncio.Future[Any]:
        """`call` on a connected client, without a coroutine of its own: the future of the writer's answer."""
        if self._transport is None:
            raise StoreUnavailableError("sqlite: the accept writer process went away")
        if self._transport.get_write_buffer_size() > MAX_BACKLOG:  # a stalled writer (a stuck disk): bounded
            raise StoreUnavailableError("sqlite: the accept writer is not keeping up")
        loop = self._loop or asyncio.get_running_loop()  # the connection's: asking is a getpid() call on Python 3.11
        request_id = self._next_id = self._next_id + 1
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting[request_id] = future  # until its answer, its deadline or the connection's end
        self._outgoing.append((request_id, *request))
        if len(self._outgoing) == 1:
            loop.call_soon(self._flush)
        self._outgoing_bytes += len(request[2])
        if self._outgoing_bytes > FLUSH_BYTES:  # a turn of large events: a frame now, the rest in the next one
            self._flush()
        if timeout is None:
            self._untimed.add(request_id)
        elif self._timeout is None or timeout < self._timeout:
            self._timeout = timeout
        return future

    async def _open(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await self._loop.create_unix_connection(lambda: self, self.path)
        except OSError as exc:
            raise StoreUnavailableError(f"sqlite: the accept writer process is not answering ({exc.strerror or exc})"
                                        ) from None

    def _flush(self) -> None:
        """Write the requests submitted since the last write, in one frame (nothing when they left already)."""
        requests, self._outgoing, self._outgoing_bytes = self._outgoing, [], 0
        if self._timeout is not None and self._loop is not None:
            self._add_deadline(self._loop.time() + self._timeout, self._next_id)
            self._timeout = None
        if self._transport is not None and requests:
            self._transport.write(frame(requests))

    def _expire(self) -> None:
        """Fail, with TimeoutError, the requests of every write past its deadline that are still waiting."""
        assert self._loop is not None
        now = self._loop.time()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, last = self._deadlines.popleft()
            late = []
            for request_id in self._waiting:
                if request_id > last:
                    break
                if request_id not in self._untimed:
                    late.append(request_id)
            for request_id in late:
                future = self._waiting.pop(request_id)
                if not future.done():
                    future.set_exception(TimeoutError())
        self._watch()

    def data_received(self, data: bytes) -> None:
        self._incoming += data
        try:
            answers = frames(self._incoming)
        except ValueError:
            log.error("the accept writer sent a malformed answer; reconnecting")
            if self._transport is not None:
                self._transport.close()
            return
        for request_id, value, problem in itertools.chain.from_iterable(answers):
            self._answered = max(self._answered, request_id)
            self._untimed.discard(request_id)
            future = self._waiting.pop(request_id, None)
            if future is None or future.done():
                continue
            if not problem:
                future.set_result(value)
            elif problem.startswith("unavailable: "):
                future.set_exception(StoreUnavailableError(problem.removeprefix("unavailable: ")))
            else:
                future.set_exception(StoreError(problem.removeprefix("error: ")))
        self._answered_through(self._answered)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)  # every request still waiting fails below
        self._incoming.clear()
        self._outgoing.clear()
        self._outgoing_bytes = 0
        self._untimed.clear()
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():  # stored or not: unknown. A 503; Segment's retry is answered as a duplicate if so
                future.set_exception(StoreUnavailableError("sqlite: the accept writer process went away"))


class _Peer:
    __slots__ = ("incoming", "outgoing", "sock", "watching_writes")

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.incoming, self.outgoing = sock, bytearray(), bytearray()
        self.watching_writes = False


def listening_socket(path: str) -> socket.socket:
    """The writer's socket, readable by this user only (the directory is private too)."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise StoreError(f"the accept writer's socket path is too long for a Unix socket: {path}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(256)
    sock.setblocking(False)
    return sock


def serve(database: str, path: str, *, slot: int) -> int:
    """Run the accept writer until SIGTERM: store what arrives, in groups, answer each request."""
    from app import metrics  # here: prometheus_client reads serve's multiprocess folder when first imported
    from app.store.sqlite import SQLiteStore

    # The store itself creates or migrates the schema and prepares the priority file; its writer threads stay idle.
    store = SQLiteStore(database, durable=True, slot=slot)
    committer = store.accept_committer()
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    listener = listening_socket(path)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, None)
    peers: dict[socket.socket, _Peer] = {}
    requests: list[tuple[_Peer, Any]] = []
    log.info("accept writer ready", extra={"socket": path})
    while not stopping or requests:
        for key, mask in selector.select(timeout=0 if requests else 0.5):
            if key.data is None:
                _accept_peers(listener, selector, peers)
                continue
            peer: _Peer = key.data
            if mask & selectors.EVENT_WRITE:
                _send(peer, selector, peers)
            if mask & selectors.EVENT_READ:
                _receive(peer, selector, peers, requests)
        if requests:
            group, requests = requests[:MAX_GROUP], requests[MAX_GROUP:]
            started = time.perf_counter()
            _store(committer, group, selector, peers)
            metrics.ACCEPT_WRITER_SECONDS.observe(time.perf_counter() - started)
            metrics.ACCEPT_WRITER_LOCK_WAIT_SECONDS.observe(committer.waited)
            metrics.ACCEPT_WRITER_ACCEPTS.inc(len(group))
    listener.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    for peer in list(peers.values()):
        _drop(peer, selector, peers)
    selector.close()
    committer.conn.close()
    asyncio.run(store.close())
    log.info("accept writer stopped", extra={"transactions": committer.commits})
    return 0


def _accept_peers(listener: socket.socket, selector: selectors.BaseSelector, peers: dict[socket.socket, _Peer]) -> None:
    while True:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setblocking(False)
        peer = peers[sock] = _Peer(sock)
        selector.register(sock, selectors.EVENT_READ, peer)


def _receive(peer: _Peer, selector: selectors.BaseSelector, peers: dict[socket.socket, _Peer],
             requests: list[tuple[_Peer, Any]]) -> None:
    try:
        data = peer.sock.recv(1 << 20)
    except (BlockingIOError, InterruptedError):
        return
    except OSError:
        data = b""
    if not data:
        _drop(peer, selector, peers)
        return
    peer.incoming += data
    try:
        for batch in frames(peer.incoming):
            requests.extend((peer, request) for request in batch)
    except (ValueError, EOFError, TypeError):
        log.error("malformed request on the accept writer's socket; connection closed")
        _drop(peer, selector, peers)


def _store(committer: Any, group: list[tuple[_Peer, Any]], selector: selectors.BaseSelector,
           peers: dict[socket.socket, _Peer]) -> None:
    answers: dict[_Peer, list[tuple[int, Any, str]]] = {}
    for (peer, request_id), value, error in _committed(committer, group):
        problem = "" if error is None else (
            f"unavailable: {error}" if isinstance(error, StoreUnavailableError) else f"error: {error}")
        answers.setdefault(peer, []).append((request_id, value, problem))
    for peer, batch in answers.items():
        if peer.sock not in peers:
            continue  # it went away: its callers got a 503 and Segment retries (a duplicate if this committed)
        peer.outgoing += frame(batch)
        _send(peer, selector, peers)


def _committed(committer: Any, group: list[tuple[_Peer, Any]]) -> list[tuple[tuple[_Peer, int], Any, Any]]:
    """((peer, request id), fresh, error) per request: the group in one transaction by one call (`accept_many`);
    if that fails, each request in a transaction of its own, so that one bad accept fails only itself."""
    from app.store.sqlite import accept_many, accept_op

    tokens = [(peer, request[0]) for peer, request in group]
    accepts = [request[1:] for _, request in group]
    [(_, fresh, error)] = committer.run([(lambda c: accept_many(c, accepts), None)])
    if error is None:
        return [(token, value, None) for token, value in zip(tokens, fresh, strict=True)]
    if len(group) == 1:
        return [(tokens[0], None, error)]
    # The group failed together once already: each alone now, not together again first (`Committer.run` of all).
    return [committer.run([(lambda c, accept=accept: accept_op(c, *accept), token)])[0]
            for accept, token in zip(accepts, tokens, strict=True)]


def _send(peer: _Peer, selector: selectors.BaseSelector, peers: dict[socket.socket, _Peer]) -> None:
    try:
        sent = peer.sock.send(peer.outgoing)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        _drop(peer, selector, peers)
        return
    del peer.outgoing[:sent]
    if bool(peer.outgoing) != peer.watching_writes:  # a full socket buffer: send the rest when it has room
        peer.watching_writes = bool(peer.outgoing)
        selector.modify(peer.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if peer.outgoing else 0), peer)


def _drop(peer: _Peer, selector: selectors.BaseSelector, peers: dict[socket.socket, _Peer]) -> None:
    peers.pop(peer.sock, None)
    with contextlib.suppress(KeyError, ValueError):
        selector.unregister(peer.sock)
    peer.sock.close()
