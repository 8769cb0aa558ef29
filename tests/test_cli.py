"""The `segrelay` command line, run as a user runs it."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from app.cli import main
from app.store import StoreError
from app.store.sqlite import SQLiteStore, require_json_functions
from tests.support import ALL_VENDORS, FIXTURES, SECRET, free_port, wait_until


def segrelay(*args: str, cwd: Path, env: dict[str, str] | None = None, stdin: str | None = None,
             ) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SEGRELAY_")}
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=cwd, env={**base, **(env or {})},
                          input=stdin, capture_output=True, text=True, timeout=60)


def test_help_lists_every_command(tmp_path: Path) -> None:
    out = segrelay("--help", cwd=tmp_path).stdout
    for command in ("serve", "keys", "translate", "dlq", "queue"):
        assert command in out
    assert "--expires-in-days" in segrelay("keys", "create", "--help", cwd=tmp_path).stdout


def test_keys_create_list_revoke(tmp_path: Path) -> None:
    env = {"SEGRELAY_SECRET": SECRET}
    created = json.loads(segrelay("keys", "create", "--tenant", "acme", "--vendors", "tracify,audiohook",
                                  "--expires-in-days", "30", "--json", cwd=tmp_path, env=env).stdout)
    assert set(created) >= {"key", "key_id", "tenant", "expires_at", "vendors"}
    assert created["vendors"] == ["tracify", "audiohook"] and created["key"].startswith("sr_" + created["key_id"])
    listed = segrelay("keys", "list", "--json", cwd=tmp_path, env=env).stdout
    assert created["key_id"] in listed and created["key"] not in listed
    table = segrelay("keys", "list", cwd=tmp_path, env=env).stdout
    assert "acme" in table and created["key"] not in table
    assert segrelay("keys", "revoke", created["key_id"], cwd=tmp_path, env=env).returncode == 0
    assert json.loads(segrelay("keys", "list", "--json", cwd=tmp_path, env=env).stdout)[0]["revoked"] is True
    missing = segrelay("keys", "revoke", "nope", cwd=tmp_path, env=env)
    assert missing.returncode == 1 and "no key with id nope" in missing.stderr
    db = (tmp_path / "var" / "segrelay.db").read_bytes()
    assert created["key"].encode() not in db  # only the HMAC is stored


def test_keys_create_rejects_unknown_vendors(tmp_path: Path) -> None:
    result = segrelay("keys", "create", "--tenant", "x", "--vendors", "tracify,facebook", cwd=tmp_path,
                      env={"SEGRELAY_SECRET": SECRET})
    assert result.returncode == 2 and "unknown vendor(s): facebook" in result.stderr


def test_configuration_errors_are_reported_not_raised(tmp_path: Path) -> None:
    result = segrelay("queue", "stats", cwd=tmp_path, env={"SEGRELAY_STORE": "postgres://x"})
    assert result.returncode == 2 and "SEGRELAY_STORE must start with" in result.stderr
    result = segrelay("queue", "stats", cwd=tmp_path, env={"SEGRELAY_STORE": "redis://127.0.0.1:1/0"})
    assert result.returncode == 2 and "SEGRELAY_SECRET or SEGRELAY_SECRET_FILE is required" in result.stderr
    result = segrelay("queue", "stats", cwd=tmp_path, env={"SEGRELAY_SECRET": "short"})
    assert result.returncode == 2 and "at least 32 bytes" in result.stderr
    result = segrelay("queue", "stats", cwd=tmp_path, env={"SEGRELAY_LEASE_SECONDS": "10"})
    assert result.returncode == 2 and "SEGRELAY_LEASE_SECONDS must exceed" in result.stderr
    result = segrelay("queue", "stats", cwd=tmp_path, env={"SEGRELAY_MAX_QUEUE_MB": "lots"})
    assert result.returncode == 2 and "SEGRELAY_MAX_QUEUE_MB must be a number, got 'lots'" in result.stderr
    result = segrelay("queue", "stats", cwd=tmp_path, env={"SEGRELAY_DELIVERY_NICE": "20"})
    assert result.returncode == 2 and "SEGRELAY_DELIVERY_NICE must be between 0" in result.stderr
    result = segrelay("queue", "stats", cwd=tmp_path, env={"SEGRELAY_HTTP_CLIENT": "httpx"})
    assert result.returncode == 2 and "SEGRELAY_HTTP_CLIENT must be builtin or aiohttp" in result.stderr
    result = segrelay("queue", "stats", cwd=tmp_path, env={"SEGRELAY_MAX_QUEUE": "1000"})
    assert result.returncode == 2 and "set SEGRELAY_MAX_QUEUE_MB instead" in result.stderr
    for processes in ("0", "65"):
        result = segrelay("queue", "stats", cwd=tmp_path, env={"SEGRELAY_HTTP_PROCESSES": processes})
        assert result.returncode == 2 and "SEGRELAY_HTTP_PROCESSES must be" in result.stderr
    result = segrelay("queue", "stats", cwd=tmp_path, env={"SEGRELAY_DELIVERY_PROCESSES": "65"})
    assert result.returncode == 2 and "SEGRELAY_DELIVERY_PROCESSES must be between 0 and 64" in result.stderr
    result = segrelay("serve", "--delivery-processes", "65", cwd=tmp_path, env={"SEGRELAY_SECRET": SECRET})
    assert result.returncode == 2 and "--delivery-processes must be between 0 and 64" in result.stderr
    result = segrelay("serve", "--http-processes", "0", cwd=tmp_path, env={"SEGRELAY_SECRET": SECRET})
    assert result.returncode == 2 and "--http-processes must be between 1 and 63" in result.stderr
    result = segrelay("serve-http", "--host", "127.0.0.1", "--port", "1", "--slot", "1", "--health-fd", "999",
                      "--http-processes", "2", cwd=tmp_path, env={"SEGRELAY_SECRET": SECRET})
    assert result.returncode == 2 and "serve-http is started by serve" in result.stderr


def test_http_processes_and_the_identity_cache_they_allow() -> None:
    """One HTTP process on SQLite is the only writer of identities and trusts what it knows for a minute; with
    several (or on Redis), another may have learned more meanwhile: 5 s. An explicit setting always wins."""
    from app.config import Config, default_http_processes

    base = {"SEGRELAY_SECRET": SECRET, "SEGRELAY_STORE": "sqlite:///x.db"}
    cores = min(os.cpu_count() or 1, 4)
    # The accept writer on SQLite, delivery and Redis on Redis, take a core's share; SQLite without the writer: one
    # HTTP process per core.
    assert Config.from_env(base).http_processes == default_http_processes() == max(1, cores - 1)
    assert Config.from_env({**base, "SEGRELAY_ACCEPT_WRITER": "off"}).http_processes == cores
    assert Config.from_env({**base, "SEGRELAY_STORE": "redis://127.0.0.1:6379/0"}).http_processes == max(1, cores - 1)
    assert Config.from_env({**base, "SEGRELAY_HTTP_PROCESSES": "1"}).identity_cache_seconds == 60
    assert Config.from_env({**base, "SEGRELAY_HTTP_PROCESSES": "3"}).identity_cache_seconds == 5
    assert Config.from_env({**base, "SEGRELAY_HTTP_PROCESSES": "3",
                            "SEGRELAY_IDENTITY_CACHE_SECONDS": "30"}).identity_cache_seconds == 30
    redis = {**base, "SEGRELAY_STORE": "redis://127.0.0.1:6379/0", "SEGRELAY_HTTP_PROCESSES": "1"}
    assert Config.from_env(redis).identity_cache_seconds == 5


def test_translate_prints_requests_with_secrets_redacted(tmp_path: Path) -> None:
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps(ALL_VENDORS))
    event = FIXTURES / "segment" / "order_completed.json"
    result = segrelay("translate", "--settings", str(settings), str(event), cwd=tmp_path,
                      env={"SEGRELAY_TRACIFY_URL": "http://127.0.0.1:9/tracify"})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    by_url = {r["url"]: r for r in out["send"]}
    assert by_url["http://127.0.0.1:9/tracify/api/v1/events"]["headers"]["tracify-token"] == "<redacted>"
    assert "https://track.segmentstream.com/track" in by_url
    assert "ss-token" not in result.stdout and "tr-token" not in result.stdout
    assert not (tmp_path / "var").exists()  # translating needs no store and no secret


def test_translate_stitches_across_a_file_of_events_and_says_what_it_filled(tmp_path: Path) -> None:
    browser = {"type": "page", "messageId": "p1", "anonymousId": "a-1", "context": {
        "ip": "203.0.113.7", "userAgent": "Mozilla/5.0", "page": {"url": "https://shop.example/cart"}}}
    identify = {"type": "identify", "messageId": "i1", "anonymousId": "a-1", "userId": "u-1",
                "traits": {"email": "jane@example.com"}}
    order = {"type": "track", "event": "Order Completed", "messageId": "o1", "userId": "u-1",
             "properties": {"order_id": "o-1", "total": 10, "currency": "EUR"}}
    events = tmp_path / "events.json"
    events.write_text(json.dumps([browser, identify, order]))
    result = segrelay("translate", "--settings", json.dumps(ALL_VENDORS), str(events), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    page, linked, purchase = json.loads(result.stdout)
    assert "stitched" not in page and "context.ip" in linked["stitched"]
    assert purchase["stitched"] == ["context.ip", "context.userAgent", "context.page.url", "email", "anonymousId"]
    pixel = next(r for r in purchase["send"] if r["vendor"] == "audiohook")
    assert (pixel["body"]["ip_address"], pixel["body"]["visitor_id"]) == ("203.0.113.7", "a-1")
    assert "jane@example.com" not in result.stdout
    # JSON lines, with stitching turned off: the same order is on its own.
    events.write_text("\n".join(json.dumps(e) for e in (browser, identify, order)))
    off = segrelay("translate", "--settings", json.dumps({**ALL_VENDORS, "identityStitching": False}), str(events),
                   cwd=tmp_path)
    assert "stitched" not in json.loads(off.stdout)[2]


def test_translate_reads_stdin_and_reports_skips_and_errors(tmp_path: Path) -> None:
    event = (FIXTURES / "segment" / "order_completed_server.json").read_text()
    result = segrelay("translate", "--settings", json.dumps(ALL_VENDORS), "-", cwd=tmp_path, stdin=event)
    skipped = json.loads(result.stdout)["skipped"]
    assert {s["vendor"] for s in skipped} == {"tracify", "audiohook"}
    screen = (FIXTURES / "segment" / "screen.json").read_text()
    result = segrelay("translate", cwd=tmp_path, stdin=screen)
    assert result.returncode == 1 and json.loads(result.stdout)["status"] == 501
    assert segrelay("translate", "--settings", "nope.json", cwd=tmp_path, stdin="{}").returncode == 2


def test_first_serve_writes_a_key_and_a_working_curl_command_to_a_private_file(tmp_path: Path) -> None:
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("SEGRELAY_")}
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=tmp_path, env=base, stdout=log, stderr=subprocess.STDOUT, text=True)
    key_file = tmp_path / "var" / "first-key.txt"
    try:
        assert wait_until(lambda: "first-key.txt" in (tmp_path / "serve.log").read_text(), 20)
        assert str(key_file.resolve()) in (tmp_path / "serve.log").read_text()  # the path, not the key
        text = key_file.read_text()
        auth = re.search(r"-H 'Authorization: (Basic [^']+)'", text)
        body = re.search(r"-d '([^']+)'", text)
        key = next(line for line in text.splitlines() if line.startswith("sr_"))
        assert auth and body

        def ready() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
            except httpx.HTTPError:
                return False
        assert wait_until(ready, 20)
        response = httpx.post(f"http://127.0.0.1:{port}/segment", content=body.group(1),
                              headers={"Authorization": auth.group(1), "Content-Type": "application/json"})
        assert response.status_code == 200 and response.json()["message"] == "accepted"
        for path in (tmp_path / "var" / "secret", key_file, tmp_path / "var" / "segrelay.db"):
            assert path.stat().st_mode & 0o777 == 0o600, path
        assert (tmp_path / "var").stat().st_mode & 0o777 == 0o700
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    logged = (tmp_path / "serve.log").read_text()
    assert key not in logged and auth.group(1) not in logged


def test_every_option_of_every_command_has_help() -> None:
    from app.cli import _parser

    def walk(parser: argparse.ArgumentParser, path: str) -> list[str]:
        missing = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    missing += walk(sub, f"{path} {name}")
            elif action.help is None and not isinstance(action, argparse._HelpAction):
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
        return missing
    assert walk(_parser(), "segrelay") == []


class _NoJsonConnection:
    """A connection to an SQLite built without its JSON functions (what `json_extract` then raises)."""

    def execute(self, sql: str) -> None:
        raise sqlite3.OperationalError("no such function: json_extract")


def test_a_store_error_is_one_line_and_exit_2_and_sqlite_without_json_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(StoreError, match=r"built without its JSON functions, which this store needs"):
        require_json_functions(_NoJsonConnection())  # type: ignore[arg-type]
    require_json_functions(sqlite3.connect(":memory:"))  # this machine's SQLite has them

    asyncio.run(SQLiteStore(str(tmp_path / "store.db")).close())  # an existing store, opened again below

    def refused(self: SQLiteStore, conn: sqlite3.Connection) -> None:
        require_json_functions(_NoJsonConnection())  # type: ignore[arg-type]
    monkeypatch.setattr(SQLiteStore, "_create", refused)
    monkeypatch.setenv("SEGRELAY_SECRET", SECRET)
    monkeypatch.setenv("SEGRELAY_STORE", f"sqlite:///{tmp_path / 'store.db'}")
    assert main(["keys", "list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("segrelay: store error: SQLite ") and "Traceback" not in err
