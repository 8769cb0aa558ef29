from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support import RedisServer, Segrelay, VendorStub


@pytest.fixture(scope="session")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VendorStub]:
    vendor_stub = VendorStub(tmp_path_factory.mktemp("stub"))
    yield vendor_stub
    vendor_stub.stop()


@pytest.fixture
def fresh_stub(stub: VendorStub) -> VendorStub:
    stub.reset()
    return stub


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, stub: VendorStub) -> Iterator[Segrelay]:
    """One segrelay process per test module, its vendors pointed at the stub."""
    service = Segrelay(tmp_path_factory.mktemp("segrelay"), stub.env()).start()
    yield service
    service.stop()
    service.cleanup()


@pytest.fixture
def make_server(tmp_path: Path, stub: VendorStub) -> Iterator[type[Segrelay]]:
    started: list[Segrelay] = []

    class Factory(Segrelay):
        def __init__(self, env: dict[str, str] | None = None, name: str = "segrelay", tmp: Path = tmp_path) -> None:
            super().__init__(tmp, {**stub.env(), **(env or {})}, name)
            started.append(self)

    yield Factory
    for service in started:
        service.cleanup()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty store of each kind: a new SQLite file, or a flushed database on the test Redis."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    url = f"redis://127.0.0.1:{server.port}/11"
    redis.Redis.from_url(url).flushdb()
    yield url
