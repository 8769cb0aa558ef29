"""segrelay's own HTTP client against a real server on loopback that answers as each test scripts it.

Each server reads one request at a time (headers and Content-Length body) and answers with the bytes the test's
`answer` function returns for it (or closes, or stays silent). The server counts connections and keeps every
request it read, so reuse, limits and what went over the wire are checked from the server's side.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from app.delivery.http_client import BadRequest, ConnectFailed, HttpClient, NoAnswer
from app.delivery.transport import BuiltinTransport, RequestRefused, SendFailed
from app.outgoing import OutgoingRequest
from tests.support import free_port, self_signed

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
Answer = Callable[[bytes, bytes], bytes | None]  # (head, body) -> bytes to write, or None to stay silent


@dataclass
class Server:
    answer: Answer
    port: int = 0
    connections: int = 0
    open_now: int = 0
    most_open: int = 0
    requests: list[bytes] = field(default_factory=list)
    close_after_answer: bool = False
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                reply = self.answer(head, body)
                if reply is None:
                    await asyncio.sleep(30)
                    return
                writer.write(reply)
                await writer.drain()
                if self.close_after_answer:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            self.open_now -= 1
            writer.close()

    def drop_connections(self) -> None:
        for writer in self.writers:
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., asyncio.Future[Server]]]:
    servers: list[asyncio.Server] = []

    async def start(answer: Answer = lambda head, body: OK, tls: ssl.SSLContext | None = None,
                    close_after_answer: bool = False) -> Server:
        state = Server(answer, close_after_answer=close_after_answer)
        server = await asyncio.start_server(state.handle, "127.0.0.1", 0, ssl=tls)
        state.port = server.sockets[0].getsockname()[1]
        servers.append(server)
        return state

    yield start  # type: ignore[misc]
    for server in servers:
        server.close()


def client(**options: float) -> HttpClient:
    settings = {"limit": 4, "connect_timeout": 2.0, "read_timeout": 2.0, "max_body": 1024, **options}
    return HttpClient(limit=int(settings.pop("limit")), connect_timeout=settings["connect_timeout"],
                      read_timeout=settings["read_timeout"], max_body=int(settings["max_body"]),
                      idle_seconds=settings.get("idle_seconds", 30.0))


async def test_the_request_on_the_wire_is_exactly_what_was_asked(serve: Callable[..., asyncio.Future[Server]]) -> None:
    server = await serve()
    http = client()
    answer = await http.request("POST", f"http://127.0.0.1:{server.port}/v1/track?site=a%20b&x=1",
                                {"content-type": "application/json", "authorization": "Basic abc"}, b'{"a":1}')
    assert (answer.status, answer.body, answer.retry_after) == (200, b"ok", None)
    assert server.requests == [
        b"POST /v1/track?site=a%20b&x=1 HTTP/1.1\r\nhost: 127.0.0.1:" + str(server.port).encode() + b"\r\n"
        b"content-type: application/json\r\nauthorization: Basic abc\r\naccept-encoding: identity\r\n"
        b"content-length: 7\r\n\r\n{\"a\":1}"]
    await http.close()


async def test_a_target_with_spaces_or_non_ascii_is_escaped_and_a_fragment_is_not_sent(
        serve: Callable[..., asyncio.Future[Server]]) -> None:
    server = await serve()
    http = client()
    await http.request("POST", f"http://127.0.0.1:{server.port}/p/ä b?q=é#frag", {}, b"")
    assert server.requests[0].startswith(b"POST /p/%C3%A4%20b?q=%C3%A9 HTTP/1.1\r\n")
    await http.request("POST", f"http://127.0.0.1:{server.port}?only=query", {}, b"")
    assert server.requests[1].startswith(b"POST /?only=query HTTP/1.1\r\n")
    await http.close()


async def test_keep_alive_reuses_one_connection(serve: Callable[..., asyncio.Future[Server]]) -> None:
    server = await serve()
    http = client()
    for _ in range(5):
        assert (await http.request("POST", f"http://127.0.0.1:{server.port}/", {}, b"x")).status == 200
    assert (server.connections, len(server.requests)) == (1, 5)
    await http.close()


async def test_concurrent_requests_open_at_most_limit_connections(
        serve: Callable[..., asyncio.Future[Server]]) -> None:
    server = await serve()
    http = client(limit=3)
    answers = await asyncio.gather(*(http.request("POST", f"http://127.0.0.1:{server.port}/", {}, b"x")
                                     for _ in range(30)))
    assert [a.status for a in answers] == [200] * 30
    assert 1 <= server.most_open <= 3 and server.connections <= 3
    await http.close()


@pytest.mark.parametrize(("reply", "body"), [
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", b"abcde"),
    (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 3\r\n\r\nnew", b"new"),
])
async def test_answers_framed_every_way_are_read_whole_and_the_connection_kept(
        serve: Callable[..., asyncio.Future[Server]], reply: bytes, body: bytes) -> None:
    server = await serve(lambda head, _: reply)
    http = client()
    first = await http.request("POST", f"http://127.0.0.1:{server.port}/", {}, b"x")
    second = await http.request("POST", f"http://127.0.0.1:{server.port}/", {}, b"x")
    assert first.body == second.body == body
    assert first.status in (200, 201, 204)
    assert server.connections == 1
    await http.close()


async def test_an_answer_that_ends_with_the_connection_is_complete(
        serve: Callable[..., asyncio.Future[Server]]) -> None:
    server = await serve(lambda head, _: b"HTTP/1.1 503 Busy\r\nretry-after: 120\r\n\r\ncome back later",
                         close_after_answer=True)
    http = client()
    answer = await http.request("POST", f"http://127.0.0.1:{server.port}/", {}, b"x")
    assert (answer.status, answer.body, answer.retry_after) == (503, b"come back later", "120")
    assert (await http.request("POST", f"http://127.0.0.1:{server.port}/", {}, b"x")).status == 503
    assert server.connections == 2  # the first connection ended with its answer: a new one for the next
    await http.close()


async def test_connection_close_is_honoured(serve: Callable[..., asyncio.Future[Server]]) -> None:
    server = await serve(lambda head, _: b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
    http = client()
    for _ in range(3):
        assert (await http.request("POST", f"http://127.0.0.1:{server.port}/", {}, b"x")).status == 200
    assert server.connections == 3
    await http.close()


async def test_a_long_answer_is_cut_to_max_body_and_the_connection_still_reused(
        serve: Callable[..., asyncio.Future[Server]]) -> None:
    big = b"y" * 200_000
    server = await serve(lambda head, _: b"HTTP/1.1 400 Bad\r\ncontent-length: %d\r\n\r\n%s" % (len(big), big))
    http = client(max_body=1000)
    answer = await http.request("POST", f"http://127.0.0.1:{server.port}/", {}, b"x")
    assert (answer.status, answer.body) == (400, b"y" * 1000)
    assert (await http.request("POST", f"http://127.0.0.1:{server.port}/", {}, b"x")).body == b"y" * 1000
    assert server.connections == 1
    await http.close()


async def test_a_connection_the_server_closed_while_idle_is_replaced_without_an_error(
        serve: Callable[..., asyncio.Future[Server]]) -> None:
    server = await serve()
    http = client()
    assert (await http.request("POST", f"http://127.0.0.1:{server.port}/", {}, b"x")).status == 200
    server.drop_connections()
    await asyncio.sleep(0.2)  # the FIN arrives: the idle connection learns it is closed
    assert (await http.request("POST", f"http://127.0.0.1:{server.port}/", {}, b"x")).status == 200
    assert server.connections == 2
    await http.close()


async def test_a_connection_idle_past_idle_seconds_is_not_reused(
        serve: Callable[..., asyncio.Future[Server]]) -> None:
    server = await serve()
    http = client(idle_seconds=0.05)
    await http.request("POST", f"http://127.0.0.1:{server.port}/", {}, b"x")
    await asyncio.sleep(0.1)
    await http.request("POST", f"http://127.0.0.1:{server.port}/", {}, b"x")
    assert server.connections == 2
    await http.close()


async def test_a_server_that_closes_without_answering_gives_no_answer(
        serve: Callable[..., asyncio.Future[Server]]) -> None:
    server = await serve(lambda head, _: b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", close_after_answer=True)
    http = client()
    with pytest.raises(NoAnswer, match="connection closed before the answer was complete"):
        await http.request("POST", f"http://127.0.0.1:{server.port}/", {}, b"x")
    await http.close()


async def test_a_malformed_answer_gives_no_answer_and_the_connection_is_dropped(
        serve: Callable[..., asyncio.Future[Server]]) -> None:
    replies = iter([b"NOT HTTP AT ALL\r\n\r\n", OK])
    server = await serve(lambda head, _: next(replies))
    http = client()
    with pytest.raises(NoAnswer, match="malformed answer"):
        await http.request("POST", f"http://127.0.0.1:{server.port}/", {}, b"x")
    assert (await http.request("POST", f"http://127.0.0.1:{server.port}/", {}, b"x")).status == 200
    assert server.connections == 2
    await http.close()


async def test_a_silent_server_times_out_within_the_read_timeout(
        serve: Callable[..., asyncio.Future[Server]]) -> None:
    server = await serve(lambda head, _: None)
    http = client(read_timeout=0.2)
    started = asyncio.get_running_loop().time()
    with pytest.raises(NoAnswer, match=r"no complete answer within 0.2 s"):
        await http.request("POST", f"http://127.0.0.1:{server.port}/", {}, b"x")
    assert asyncio.get_running_loop().time() - started < 10  # not the server's 30 s: our deadline ended it
    await http.close()


async def test_a_deadline_checked_after_its_answer_came_leaves_the_connection_alone(
        serve: Callable[..., asyncio.Future[Server]]) -> None:
    server = await serve()
    http = client()
    await http.request("POST", f"http://127.0.0.1:{server.port}/", {}, b"x")
    (pool, _), = http._pools.values()
    pool.idle[0]._time_out()  # the sweeper's tick ran between the answer and the exchange's end
    await http.request("POST", f"http://127.0.0.1:{server.port}/", {}, b"x")
    assert server.connections == 1
    await http.close()


async def test_an_answer_for_nobody_condemns_the_connection(serve: Callable[..., asyncio.Future[Server]]) -> None:
    server = await serve(lambda head, _: OK + OK)  # two answers to one request
    http = client()
    assert (await http.request("POST", f"http://127.0.0.1:{server.port}/", {}, b"x")).status == 200
    await asyncio.sleep(0.05)
    assert (await http.request("POST", f"http://127.0.0.1:{server.port}/", {}, b"x")).status == 200
    assert server.connections == 2
    await http.close()


async def test_a_cancelled_request_closes_its_connection(serve: Callable[..., asyncio.Future[Server]]) -> None:
    replies = iter([None, OK])
    server = await serve(lambda head, _: next(replies))
    http = client()
    task = asyncio.create_task(http.request("POST", f"http://127.0.0.1:{server.port}/", {}, b"x"))
    for _ in range(200):
        if server.requests:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await http.request("POST", f"http://127.0.0.1:{server.port}/", {}, b"x")).status == 200
    assert server.connections == 2  # the cancelled exchange's connection was not reused
    await http.close()


async def test_a_hosts_addresses_are_looked_up_once_and_tried_in_turn(
        serve: Callable[..., asyncio.Future[Server]]) -> None:
    server = await serve(lambda head, _: b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
    lookups: list[str] = []  # a new connection for every request, one look-up for all

    async def resolve(host: str, port: int) -> list[tuple[int, tuple[Any, ...]]]:
        lookups.append(host)
        return [(socket.AF_INET, ("127.0.0.2", port)), (socket.AF_INET, ("127.0.0.1", port))]  # nobody on .2

    http = HttpClient(limit=2, connect_timeout=2, read_timeout=2, max_body=100, resolve=resolve)
    for _ in range(3):
        assert (await http.request("POST", f"http://vendor.example:{server.port}/", {}, b"x")).status == 200
    assert lookups == ["vendor.example"] and server.connections == 3
    assert server.requests[0].split(b"\r\n")[1] == f"host: vendor.example:{server.port}".encode()
    await http.close()


async def test_a_failed_connect_looks_the_name_up_again() -> None:
    lookups: list[str] = []
    port = free_port()

    async def resolve(host: str, port: int) -> list[tuple[int, tuple[Any, ...]]]:
        lookups.append(host)
        return [(socket.AF_INET, ("127.0.0.1", port))]

    http = HttpClient(limit=2, connect_timeout=2, read_timeout=2, max_body=100, resolve=resolve)
    for _ in range(2):
        with pytest.raises(ConnectFailed, match="ConnectionRefusedError"):
            await http.request("POST", f"http://vendor.example:{port}/", {}, b"x")
    assert lookups == ["vendor.example", "vendor.example"]
    await http.close()


async def test_a_name_that_does_not_resolve_is_a_connect_failure() -> None:
    http = client()
    with pytest.raises(ConnectFailed, match="gaierror"):
        await http.request("POST", "http://no-such-host.invalid/", {}, b"x")
    await http.close()


async def test_nobody_listening_is_a_connect_failure() -> None:
    http = client()
    with pytest.raises(ConnectFailed, match="ConnectionRefusedError"):
        await http.request("POST", f"http://127.0.0.1:{free_port()}/", {}, b"x")
    await http.close()


async def test_urls_this_client_will_not_send_are_refused_before_connecting() -> None:
    http = client()
    for url in ("ftp://example.com/x", "http:///nohost", "http://user:pw@127.0.0.1/"):
        with pytest.raises(BadRequest):
            await http.request("POST", url, {}, b"x")
    await http.close()


async def test_tls_checks_the_certificate(serve: Callable[..., asyncio.Future[Server]], tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    tls_server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_server.load_cert_chain(cert, key)
    server = await serve(tls=tls_server)
    untrusting = client()
    with pytest.raises(ConnectFailed, match="SSLCertVerificationError"):
        await untrusting.request("POST", f"https://127.0.0.1:{server.port}/", {}, b"x")
    await untrusting.close()
    trusting = HttpClient(limit=2, connect_timeout=2, read_timeout=2, max_body=100,
                          tls=ssl.create_default_context(cafile=str(cert)))
    for _ in range(3):
        assert (await trusting.request("POST", f"https://127.0.0.1:{server.port}/", {}, b"x")).body == b"ok"
    assert server.connections == 1
    await trusting.close()


async def test_the_transport_maps_the_clients_errors_to_the_workers() -> None:
    transport = BuiltinTransport(concurrency=2, connect_timeout=2, read_timeout=2)
    with pytest.raises(SendFailed, match="could not connect to tracify") as refused:
        await transport("tracify", OutgoingRequest("POST", f"http://127.0.0.1:{free_port()}/", {}, b"x"))
    assert refused.value.connect
    with pytest.raises(RequestRefused, match="control or non-ASCII"):
        await transport("tracify", OutgoingRequest("POST", "http://127.0.0.1:1/", {"x-token": "a\r\nb"}, b"x"))
    with pytest.raises(RequestRefused, match="credentials"):
        await transport("tracify", OutgoingRequest("POST", "http://u:p@127.0.0.1:1/", {}, b"x"))
    await transport.close()
