"""Real processes on loopback for end-to-end tests: segrelay under uvicorn, the vendor stub, Redis."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SECRET = "test-secret-" + "0" * 40
SITE_ID = "3f1c2d4e-5a6b-4c7d-8e9f-0a1b2c3d4e5f"
AUDIOHOOK_ID = "9b2f7c3a-1d4e-4f5a-8b6c-7d8e9f0a1b2c"
DATA_STREAM_ID = "5e6f7a8b-9c0d-4e1f-a2b3-c4d5e6f7a8b9"
ALL_VENDORS = {
    "segmentstreamApiToken": "ss-token",
    "segmentstreamDataStreamId": DATA_STREAM_ID,
    "tracifyApiToken": "tr-token",
    "tracifyCustomerSiteId": SITE_ID,
    "audiohookId": AUDIOHOOK_ID,
    "conversionEvents": ["Subscription Created"],
}


def fixture(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((FIXTURES / "segment" / name).read_text())
    return loaded


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


def settings_header(settings: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(settings).encode()).decode()


def command(pid: int) -> list[str]:
    """A process's command line (Linux /proc): [python, -m, app, <command>, ...] for segrelay's processes."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def role(pid: int) -> str | None:
    """Which of segrelay's commands a process runs (`serve-http`, `deliver`, `accept-writer`...), or None for one that
    has exited: a killed child is a zombie with an empty command line until serve reaps it, or gone."""
    try:
        parts = command(pid)
    except (FileNotFoundError, ProcessLookupError):
        return None
    return parts[3] if len(parts) > 3 else None


def child_pids(pid: int) -> list[int]:
    """The process's children (Linux /proc): `segrelay serve`'s delivery and HTTP processes."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def unix_listening(path: str) -> bool:
    """Whether something accepts connections on the Unix socket at `path` (the accept writer's)."""
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
        return True


def wait_until(check: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            return httpx.get(url, timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False
    if not wait_until(ready, timeout):
        raise RuntimeError(f"{url} did not become ready")


class VendorStub:
    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / "stub.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "app", "stub", "--port", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        _wait_http(self.url + "/_stub/requests", self.proc)

    def env(self) -> dict[str, str]:
        return {f"SEGRELAY_{v.upper()}_URL": f"{self.url}/{v}" for v in ("segmentstream", "tracify", "audiohook")}

    def script(self, prefix: str, answers: list[dict[str, Any]], default: dict[str, Any] | None = None) -> None:
        spec: dict[str, Any] = {"prefix": prefix, "answers": answers}
        if default is not None:
            spec["default"] = default
        httpx.post(self.url + "/_stub/script", json=spec).raise_for_status()

    def requests(self, prefix: str = "") -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = httpx.get(self.url + "/_stub/requests").json()
        return [r for r in rows if r["path"].startswith(prefix)]

    def reset(self) -> None:
        httpx.post(self.url + "/_stub/reset").raise_for_status()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


class Segrelay:
    """`segrelay serve` in its own process, with its own store and key."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None, name: str = "segrelay") -> None:
        self.tmp, self.name = tmp, name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # One HTTP process unless a test asks for more: bounds such as SEGRELAY_MAX_CONNECTIONS and
        # SEGRELAY_MAX_INFLIGHT_BYTES, and what a process has cached or remembered, are per HTTP process, and which
        # process a new connection reaches is the kernel's choice (tests/test_http_processes_e2e.py covers several).
        # serve's temporary directories (the accept writer's socket, the metrics' files) in one of the test's own:
        # a service a test kills (SIGKILL) cannot remove them, and cleanup() does. Short, for the socket's path.
        self.tmpdir = tempfile.mkdtemp(prefix="segrelay-test-")
        self.env = {**os.environ, "SEGRELAY_STORE": f"sqlite:///{tmp / 'store.db'}", "SEGRELAY_SECRET": SECRET,
                    "SEGRELAY_RETRY_BASE_SECONDS": "0.2", "SEGRELAY_RETRY_MAX_SECONDS": "1",
                    "SEGRELAY_KEY_CACHE_SECONDS": "0", "SEGRELAY_HTTP_PROCESSES": "1", "TMPDIR": self.tmpdir,
                    **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.key = ""

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "app", *args], env=self.env, capture_output=True, text=True,
                              check=check, cwd=self.tmp, timeout=60)

    def create_key(self, *extra: str, tenant: str = "acme") -> str:
        out = self.cli("keys", "create", "--tenant", tenant, "--json", *extra)
        key: str = json.loads(out.stdout)["key"]
        return key

    def start(self) -> Segrelay:
        if not self.key:
            self.key = self.create_key()
        self.log = open(self.tmp / f"{self.name}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port",
                                      str(self.port)], env=self.env, cwd=self.tmp, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        _wait_http(self.url + "/readyz", self.proc)
        return self

    def post(self, event: dict[str, Any] | bytes, settings: dict[str, Any] | None = None,
             key: str | None = None, headers: dict[str, str] | None = None, timeout: float = 10.0) -> httpx.Response:
        hdrs = {"Authorization": basic(key if key is not None else self.key), "Content-Type": "application/json"}
        if settings is not None:
            hdrs["X-Segment-Settings"] = settings_header(settings)
        hdrs.update(headers or {})
        content = event if isinstance(event, bytes) else json.dumps(event).encode()
        return httpx.post(self.url + "/segment", content=content, headers=hdrs, timeout=timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()

    def terminate(self, timeout: float = 40.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.log.close()
        return code

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.terminate()

    def cleanup(self) -> None:
        """Kill whatever is still running (a test that failed half-way), close the log, remove serve's temporary
        directories."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc is not None and not self.log.closed:
            self.log.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def logs(self) -> str:
        return (self.tmp / f"{self.name}.log").read_text()


class RedisServer:
    """A private redis-server on a free port, configured as the README's Redis section recommends (AOF on with
    appendfsync always, rdbcompression off), in a temporary directory."""

    def __init__(self, tmp: Path, extra: tuple[str, ...] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("CI") == "true":
                pytest.fail("redis-server is not installed (CI must run .ci/run, which installs it)")
            pytest.skip("redis-server is not installed")
        self.binary, self.tmp, self.extra = binary, tmp, extra
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "yes", "--appendfsync", "always", "--rdbcompression", "no",
                                      "--dir", str(self.tmp),
                                      *self.extra],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def ping() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    return sock.recv(16).startswith(b"+PONG")
            except OSError:
                return False
        if not wait_until(ping, 10):
            raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def self_signed(tmp: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, written to `tmp`: (cert.pem, key.pem)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp / "cert.pem", tmp / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    return cert_file, key_file
