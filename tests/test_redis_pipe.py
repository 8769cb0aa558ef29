"""The accept path's own pipelined Redis connection (app/store/redis_pipe.py), against real redis-servers."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from app.store import NewJob, StoreUnavailableError
from app.store.redis import RedisStore
from app.store.redis_pipe import MAX_BACKLOG, RedisPipe
from tests.support import RedisServer, free_port, self_signed, wait_until


def pipe(url: str, **options: float) -> RedisPipe:
    return RedisPipe(aioredis.BlockingConnectionPool.from_url(url), **options)


async def test_calls_are_pipelined_and_each_gets_its_own_reply_in_order(redis_server: RedisServer) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/12"
    redis.Redis.from_url(url).flushdb()
    connection = pipe(url)
    await connection.call("SET", "a", "1")
    futures = [connection.submit("INCR", "a") for _ in range(50)] + [connection.submit("GET", "a")]
    replies = await asyncio.gather(*futures)
    assert replies == [*range(2, 52), b"51"]
    assert redis.Redis.from_url(url).get("a") == b"51"  # database 12 of the URL, not 0
    connection.close()


async def test_an_error_reply_fails_its_call_only(redis_server: RedisServer) -> None:
    connection = pipe(redis_server.url)
    assert not connection.connected  # until the first call
    await connection.call("SET", "pipe:text", "x")
    wrong_call, next_call = connection.submit("INCR", "pipe:text"), connection.submit("GET", "pipe:text")
    with pytest.raises(ResponseError, match="not an integer"):
        await wrong_call
    assert await next_call == b"x"
    assert connection.connected
    connection.close()


async def test_a_password_and_database_from_the_url_are_used(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    redis.Redis(port=server.port).config_set("requirepass", "s3cret")
    try:
        refused = pipe(f"redis://127.0.0.1:{server.port}/0")
        with pytest.raises(StoreUnavailableError, match="NOAUTH"):  # a 503, as redis-py's AuthenticationError was
            await refused.call("GET", "x")
        refused.close()
        wrong = pipe(f"redis://:nope@127.0.0.1:{server.port}/0")
        with pytest.raises(StoreUnavailableError, match="WRONGPASS"):
            await wrong.call("GET", "x")
        connection = pipe(f"redis://:s3cret@127.0.0.1:{server.port}/5")
        await connection.call("SET", "k", "v")
        assert redis.Redis(port=server.port, password="s3cret", db=5).get("k") == b"v"
        assert redis.Redis(port=server.port, password="s3cret", db=0).get("k") is None
        connection.close()
    finally:
        server.kill()


async def test_redis_loading_its_data_is_unavailable_not_an_error() -> None:
    """Error replies that mean "not now" (LOADING after a restart, OOM when full...) are a 503, others the caller's."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", free_port()))
    listener.listen()
    listener.setblocking(False)
    loop = asyncio.get_running_loop()

    async def answer(replies: list[bytes]) -> None:  # a Redis stand-in: one error reply per command it reads
        peer, _ = await loop.sock_accept(listener)
        try:
            for reply in replies:
                await loop.sock_recv(peer, 1024)
                await loop.sock_sendall(peer, reply)
            await asyncio.sleep(5)
        finally:
            peer.close()

    answering = asyncio.create_task(answer([b"-LOADING Redis is loading the dataset in memory\r\n",
                                            b"-ERR unknown command\r\n"]))
    connection = pipe(f"redis://127.0.0.1:{listener.getsockname()[1]}/0")
    with pytest.raises(StoreUnavailableError, match="LOADING"):
        await connection.call("GET", "k")
    with pytest.raises(ResponseError, match="unknown command"):
        await connection.call("GET", "k")
    connection.close()
    answering.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await answering
    listener.close()


async def test_a_lost_connection_fails_its_calls_and_the_next_call_connects_again(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    connection = pipe(server.url)
    await connection.call("SET", "k", "v")
    waiting = connection.submit("BLPOP", "never", 0)  # blocks on Redis until the connection goes
    server.kill()
    with pytest.raises(StoreUnavailableError, match="connection was lost"):
        await waiting
    with pytest.raises(StoreUnavailableError, match="cannot connect"):
        await connection.call("GET", "k")
    server.start()
    assert await connection.call("GET", "k") == b"v"  # AOF kept it; a new connection
    connection.close()
    server.kill()


async def test_a_reply_that_never_comes_closes_the_connection_after_the_reply_timeout() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", free_port()))
    listener.listen()
    accepted: list[socket.socket] = []

    async def take() -> None:  # a peer that accepts connections and never answers
        loop = asyncio.get_running_loop()
        listener.setblocking(False)
        while True:
            peer, _ = await loop.sock_accept(listener)
            accepted.append(peer)

    taker = asyncio.create_task(take())
    connection = pipe(f"redis://127.0.0.1:{listener.getsockname()[1]}/0", reply_timeout=0.3)
    started = asyncio.get_running_loop().time()
    with pytest.raises(StoreUnavailableError, match="connection was lost"):
        await connection.call("GET", "k")
    assert 0.25 <= asyncio.get_running_loop().time() - started < 3
    assert not connection.connected
    taker.cancel()
    for peer in accepted:
        peer.close()
    listener.close()


async def test_accept_loads_its_script_again_after_redis_forgot_it(redis_server: RedisServer) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/13"
    redis.Redis.from_url(url).flushdb()
    store = RedisStore(url)
    job = NewJob("audiohook", "pixel", "Order Completed", "")
    assert await store.accept("t", "m1", b"sealed", [job], now=1000.0, ttl=60.0)
    redis.Redis.from_url(url).script_flush()  # as after a restart of Redis without AOF's scripts
    assert await store.accept("t", "m2", b"sealed", [job], now=1000.0, ttl=60.0)
    assert not await store.accept("t", "m2", b"sealed", [job], now=1000.0, ttl=60.0)  # a duplicate
    assert (await store.counts()).pending == {"audiohook": 2}
    await store.close()


async def test_tls_from_a_rediss_url_as_redis_py_reads_it(tmp_path: Path) -> None:
    """rediss:// with the URL's CA: the pipe verifies the server as redis-py would; another CA is refused."""
    cert, key = self_signed(tmp_path)
    port = free_port()
    binary = shutil.which("redis-server")
    assert binary is not None  # the redis_server fixture's tests need it too
    server = subprocess.Popen([binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                               "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                               "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no", "--save", "",
                               "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def answers() -> bool:
        context = ssl.create_default_context(cafile=str(cert))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw, \
                    context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"PING\r\n")
                return tls.recv(16).startswith(b"+PONG")
        except OSError:
            return False
    try:
        assert wait_until(answers, 10), "redis-server with TLS did not start"
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}"
        store = RedisStore(url)
        job = NewJob("audiohook", "pixel", "Order Completed", "")
        assert await store.accept("t", "over-tls", b"sealed", [job], now=1000.0, ttl=60.0)
        assert await store.recall(["nobody"], now=1000.0) == [None]
        assert redis.Redis.from_url(url).exists("segrelay:seen:t:over-tls")
        await store.close()
        (tmp_path / "other").mkdir()
        other, _ = self_signed(tmp_path / "other")  # a CA that did not sign the server's certificate
        refused = pipe(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={other}")
        with pytest.raises(StoreUnavailableError, match="cannot connect"):
            await refused.call("PING")
    finally:
        server.kill()
        server.wait(10)


async def test_calls_to_a_redis_that_does_not_read_are_bounded_in_bytes() -> None:
    """A peer that accepts and never reads: past MAX_BACKLOG bytes held for it, calls fail at once (503)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", free_port()))
    listener.listen()
    connection = pipe(f"redis://127.0.0.1:{listener.getsockname()[1]}/0", reply_timeout=1)
    big = b"x" * (1024 * 1024)
    waiting = [asyncio.ensure_future(connection.call("SET", "k", big))]
    await asyncio.sleep(0.1)  # connected, its first write left
    refused = None
    for _ in range(4 * MAX_BACKLOG // len(big)):  # the kernel's buffers take a few MB, the pipe the rest
        try:
            waiting.append(connection.submit("SET", "k", big))
        except StoreUnavailableError as exc:
            refused = exc
            break
    assert refused is not None and "not keeping up" in str(refused)
    assert MAX_BACKLOG // len(big) <= len(waiting) < 4 * MAX_BACKLOG // len(big)
    for call in waiting:  # their replies never come: the reply timeout ends the connection
        with pytest.raises(StoreUnavailableError, match="connection was lost"):
            await call
    listener.close()
