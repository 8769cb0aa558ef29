"""`segrelay check` against real endpoints: segrelay passes; an endpoint that answers 200 to everything fails."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.support import ROOT, Segrelay


def check(url: str, key: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app", "check", url, "--key", key, *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)


def test_segrelay_passes_every_case(server: Segrelay) -> None:
    result = check(server.url + "/segment", server.key)
    assert result.returncode == 0, result.stdout
    assert "14 of 14 as Segment expects" in result.stdout
    settings = json.dumps({"segmentstreamApiToken": "ss-token"})  # now something is queued: a repeat is a duplicate
    rows = json.loads(check(server.url, server.key, "--settings", settings, "--json").stdout)
    assert all(r["passed"] for r in rows), rows
    repeat = next(r for r in rows if r["case"] == "the same messageId again")
    assert (repeat["status"], repeat["message"], repeat["expected"]) == (200, "duplicate", "200 duplicate")


@pytest.fixture
def yes_man(tmp_path: Path) -> Iterator[str]:
    """An endpoint that answers 200 {"message": "ok"} to everything."""
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            body = b'{"message": "ok"}'
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_an_endpoint_that_says_yes_to_everything_fails(yes_man: str) -> None:
    result = check(yes_man, "sr_aaaaaaaaaaaa_x")
    assert result.returncode == 1
    failed = [line for line in result.stdout.splitlines() if " FAIL " in line]
    assert len(failed) == 8, result.stdout  # three 501s, two 401s, three 400s


def test_an_unreachable_endpoint_fails_every_case() -> None:
    result = check("http://127.0.0.1:9/segment", "k")
    assert result.returncode == 1 and "0 of 14" in result.stdout and "no answer" in result.stdout
