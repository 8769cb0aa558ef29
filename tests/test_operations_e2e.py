"""Operating segrelay: version and build info, one store wherever you stand, Redis that would lose events, HTTPS."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.store.sqlite_writers import PRIORITY_SLOTS
from app.version import VERSION
from tests.support import (
    ROOT,
    SECRET,
    RedisServer,
    Segrelay,
    basic,
    child_pids,
    command,
    fixture,
    free_port,
    role,
    self_signed,
    wait_until,
)


def segrelay(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SEGRELAY_")}
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=cwd, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=60, check=False)


def test_version_and_build_info(server: Segrelay, tmp_path: Path) -> None:
    result = segrelay("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"segrelay {VERSION}" and VERSION.startswith("0.")
    metrics = httpx.get(server.url + "/metrics").text
    assert 'segrelay_build_info{python="' in metrics and f'version="{VERSION}"}} 1.0' in metrics


@pytest.mark.parametrize("command", [["queue", "stats"], ["dlq", "list"], ["keys", "list"], ["dlq", "replay", "1"],
                                     ["keys", "revoke", "abc"]])
def test_reading_commands_never_create_a_store_where_none_is(tmp_path: Path, command: list[str]) -> None:
    result = segrelay(*command, cwd=tmp_path)
    assert result.returncode == 2
    assert f"no store at {(tmp_path / 'var' / 'segrelay.db').resolve()}" in result.stderr
    assert "SEGRELAY_STORE=sqlite:///" in result.stderr
    assert not (tmp_path / "var").exists()  # neither a database nor a secret was made


def niceness(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[16])


@pytest.mark.parametrize(("nice", "added"), [(None, 19), ("3", 3), ("0", 0)])
def test_delivery_processes_yield_the_cpu_to_the_http_process(make_server: type[Segrelay], nice: str | None,
                                                               added: int) -> None:
    env = ({"SEGRELAY_DELIVERY_PROCESSES": "2", "SEGRELAY_HTTP_PROCESSES": "2"}
           | ({"SEGRELAY_DELIVERY_NICE": nice} if nice else {}))
    service = make_server(env).start()
    assert service.proc is not None
    assert wait_until(lambda: service.logs().count('"msg":"delivery started"') == 2, 30)
    children = child_pids(service.proc.pid)
    delivery = [pid for pid in children if role(pid) == "deliver"]
    http = [pid for pid in children if role(pid) == "serve-http"]
    assert len(delivery) == 2 and len(http) == 1
    # Each delivery process has its own byte at SQLite's write lock, after the HTTP processes' (their turns).
    slots = sorted(int(args[args.index("--slot") + 1]) for args in map(command, delivery))
    assert slots == [PRIORITY_SLOTS, PRIORITY_SLOTS + 1]
    ours = os.nice(0)
    assert niceness(service.proc.pid) == ours
    assert niceness(http[0]) == ours  # answering Segment keeps its priority in every HTTP process
    assert all(niceness(pid) == min(ours + added, 19) for pid in delivery)
    service.terminate()


def test_the_store_location_is_logged_and_named_by_keys_create(make_server: type[Segrelay]) -> None:
    service = make_server().start()
    created = service.cli("keys", "create", "--tenant", "x")
    assert f"key stored in sqlite:///{(service.tmp / 'store.db').resolve()}" in created.stderr
    assert f'"store":"sqlite:///{(service.tmp / "store.db").resolve()}"' in service.logs()


def test_redis_that_could_lose_events_is_refused_unless_accepted(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    redis = RedisServer(tmp_path / "r", extra=("--appendonly", "no", "--maxmemory-policy", "allkeys-lru",
                                                        "--rdbcompression", "yes"))
    try:
        env = {"SEGRELAY_STORE": redis.url, "SEGRELAY_SECRET": SECRET}
        port = str(free_port())
        refused = subprocess.run([sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", port],
                                 env={**os.environ, **env}, cwd=tmp_path, capture_output=True, text=True,
                                 timeout=60, check=False)
        assert refused.returncode != 0
        assert "refusing to start" in refused.stdout and "set `appendonly yes`" in refused.stdout
        assert "set `maxmemory-policy noeviction`" in refused.stdout
        assert "SEGRELAY_REDIS_UNSAFE=1" in refused.stdout
        service = Segrelay(tmp_path, {**env, "SEGRELAY_REDIS_UNSAFE": "1"}).start()
        try:
            assert service.post(fixture("identify.json")).status_code == 200
            assert "store may lose accepted events" in service.logs()
            assert "store tuning advice" in service.logs() and "set `rdbcompression no`" in service.logs()
        finally:
            service.stop()
            service.cleanup()
    finally:
        redis.stop()


def test_https_end_to_end_with_a_certificate_the_test_makes(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    port = free_port()
    env = {**os.environ, "SEGRELAY_STORE": f"sqlite:///{tmp_path / 'store.db'}", "SEGRELAY_SECRET": SECRET,
           "SEGRELAY_SSL_CERTFILE": str(cert), "SEGRELAY_SSL_KEYFILE": str(key), "SEGRELAY_HTTP_PROCESSES": "2"}
    api_key = subprocess.run([sys.executable, "-m", "app", "keys", "create", "--tenant", "t", "--json"], env=env,
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    trust = ssl.create_default_context(cafile=str(cert))

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    try:
        def ready() -> bool:
            try:
                return httpx.get(f"https://127.0.0.1:{port}/readyz", verify=trust).status_code == 200
            except httpx.HTTPError:
                return False
        assert wait_until(ready, 20)
        # Both HTTP processes serve HTTPS: the one serve runs in and the one it started (given the same files).
        assert wait_until(lambda: len({line["pid"] for line in lines()
                                       if line["msg"] == "Application startup complete."}) == 2, 20)
        for n in range(20):  # each on a new connection: the kernel spreads them over both
            event = {**fixture("identify.json"), "messageId": f"tls-{n}"}
            response = httpx.post(f"https://127.0.0.1:{port}/segment", json=event, verify=trust,
                                  headers={"Authorization": basic(json.loads(api_key)["key"])})
            assert response.status_code == 200 and response.json()["message"] == "accepted"
        assert len({line["pid"] for line in lines() if line["logger"] == "segrelay.access"}) == 2
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=3)  # plain HTTP is not served
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"https://127.0.0.1:{port}/healthz")  # and the certificate is what clients verify
    finally:
        proc.terminate()
        proc.wait(30)


def test_https_needs_both_files(tmp_path: Path) -> None:
    result = segrelay("serve", "--ssl-certfile", str(tmp_path / "x.pem"), cwd=tmp_path,
                      env={"SEGRELAY_SECRET": SECRET})
    assert result.returncode == 2 and "HTTPS needs both a certificate" in result.stderr
