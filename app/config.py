"""Configuration: every `SEGRELAY_*` variable, read and checked once at start-up."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from handlers import VENDORS

DEFAULT_STORE = "sqlite:///./var/segrelay.db"
# SQLite's priority file has 64 bytes for the processes that store accepts: the HTTP processes and the accept writer.
MAX_HTTP_PROCESSES = 63
LOG_LEVELS = ("debug", "info", "warning", "error")
HTTP_CLIENTS = ("builtin", "aiohttp")  # for vendor requests: segrelay's own (app/delivery/http_client.py) or aiohttp


class ConfigError(Exception):
    """A `SEGRELAY_*` variable has a value segrelay cannot use."""


@dataclass(frozen=True, slots=True)
class Config:
    store: str = DEFAULT_STORE
    secret: bytes = b""
    vendor_urls: dict[str, str] = field(default_factory=dict)
    max_body_bytes: int = 128 * 1024
    idempotency_seconds: int = 7 * 86_400
    max_queue_mb: float = 2048.0
    min_free_disk_mb: int = 256
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 900.0
    give_up_seconds: float = 4 * 3600.0
    give_up_min_attempts: int = 5
    max_attempts: int = 30
    connect_timeout: float = 5.0
    read_timeout: float = 15.0
    http_client: str = "builtin"
    lease_seconds: float = 60.0
    accept_timeout_seconds: float = 3.0
    drain_seconds: float = 20.0
    shutdown_delay_seconds: float = 0.0
    vendor_concurrency: int = 32
    tenant_concurrency: int = 8
    key_cache_seconds: float = 5.0
    max_connections: int = 1024
    request_read_seconds: float = 30.0
    keepalive_seconds: int = 5
    max_inflight_bytes: int = 32 * 1024 * 1024
    tenant_queue_share: float = 0.5
    delivery: bool = True
    redis_unsafe: bool = False
    delivery_processes: int = field(default_factory=lambda: default_delivery_processes())
    delivery_nice: int = 19
    http_processes: int = field(default_factory=lambda: default_http_processes())
    log_level: str = "info"
    identity_ttl_days: float = 30.0
    max_identities: int = 1_000_000
    identity_cache_seconds: float = 5.0
    accept_writer: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        env = os.environ if env is None else env
        if env.get("SEGRELAY_MAX_QUEUE"):
            raise ConfigError("SEGRELAY_MAX_QUEUE (a row count) is gone: the queue is bounded in bytes, set "
                              "SEGRELAY_MAX_QUEUE_MB instead")
        store = env.get("SEGRELAY_STORE", DEFAULT_STORE)
        if not store.startswith(("sqlite:///", "redis://", "rediss://")):
            raise ConfigError("SEGRELAY_STORE must start with sqlite:///, redis:// or rediss://")
        accept_writer = _bool(env, "SEGRELAY_ACCEPT_WRITER", True)
        http_processes = _int(env, "SEGRELAY_HTTP_PROCESSES", default_http_processes(store, accept_writer), minimum=1)
        config = cls(
            store=store,
            secret=load_secret(env, store),
            vendor_urls=vendor_urls(env),
            max_body_bytes=_int(env, "SEGRELAY_MAX_BODY_BYTES", 128 * 1024),
            idempotency_seconds=_int(env, "SEGRELAY_IDEMPOTENCY_SECONDS", 7 * 86_400),
            max_queue_mb=_float(env, "SEGRELAY_MAX_QUEUE_MB", 2048.0),
            min_free_disk_mb=_int(env, "SEGRELAY_MIN_FREE_DISK_MB", 256, minimum=0),
            retry_base_seconds=_float(env, "SEGRELAY_RETRY_BASE_SECONDS", 2.0),
            retry_max_seconds=_float(env, "SEGRELAY_RETRY_MAX_SECONDS", 900.0),
            give_up_seconds=_float(env, "SEGRELAY_GIVE_UP_SECONDS", 4 * 3600.0),
            give_up_min_attempts=_int(env, "SEGRELAY_GIVE_UP_MIN_ATTEMPTS", 5),
            max_attempts=_int(env, "SEGRELAY_MAX_ATTEMPTS", 30),
            connect_timeout=_float(env, "SEGRELAY_CONNECT_TIMEOUT", 5.0),
            read_timeout=_float(env, "SEGRELAY_READ_TIMEOUT", 15.0),
            http_client=env.get("SEGRELAY_HTTP_CLIENT", "builtin").lower(),
            lease_seconds=_float(env, "SEGRELAY_LEASE_SECONDS", 60.0),
            accept_timeout_seconds=_float(env, "SEGRELAY_ACCEPT_TIMEOUT_SECONDS", 3.0),
            drain_seconds=_float(env, "SEGRELAY_DRAIN_SECONDS", 20.0, minimum=0),
            shutdown_delay_seconds=_float(env, "SEGRELAY_SHUTDOWN_DELAY_SECONDS", 0.0, minimum=0),
            vendor_concurrency=_int(env, "SEGRELAY_VENDOR_CONCURRENCY", 32),
            tenant_concurrency=_int(env, "SEGRELAY_TENANT_CONCURRENCY", 8),
            key_cache_seconds=_float(env, "SEGRELAY_KEY_CACHE_SECONDS", 5.0, minimum=0),
            max_connections=_int(env, "SEGRELAY_MAX_CONNECTIONS", 1024),
            request_read_seconds=_float(env, "SEGRELAY_REQUEST_READ_SECONDS", 30.0),
            keepalive_seconds=_int(env, "SEGRELAY_KEEPALIVE_SECONDS", 5),
            max_inflight_bytes=_int(env, "SEGRELAY_MAX_INFLIGHT_BYTES", 32 * 1024 * 1024),
            tenant_queue_share=_float(env, "SEGRELAY_TENANT_QUEUE_SHARE", 0.5),
            delivery=_bool(env, "SEGRELAY_DELIVERY", True),
            redis_unsafe=_bool(env, "SEGRELAY_REDIS_UNSAFE", False),
            delivery_processes=_int(env, "SEGRELAY_DELIVERY_PROCESSES", default_delivery_processes(), minimum=0),
            delivery_nice=_int(env, "SEGRELAY_DELIVERY_NICE", 19, minimum=0),
            http_processes=http_processes,
            log_level=env.get("SEGRELAY_LOG_LEVEL", "info").lower(),
            identity_ttl_days=_float(env, "SEGRELAY_IDENTITY_TTL_DAYS", 30.0, minimum=0.0001),
            max_identities=_int(env, "SEGRELAY_MAX_IDENTITIES", 1_000_000),
            accept_writer=accept_writer,
            identity_cache_seconds=_float(env, "SEGRELAY_IDENTITY_CACHE_SECONDS",
                                          default_identity_cache_seconds(store, http_processes), minimum=0),
        )
        if config.lease_seconds <= config.connect_timeout + config.read_timeout:
            raise ConfigError("SEGRELAY_LEASE_SECONDS must exceed SEGRELAY_CONNECT_TIMEOUT + SEGRELAY_READ_TIMEOUT, "
                              "or a slow send could be leased twice")
        if config.http_client not in HTTP_CLIENTS:
            raise ConfigError(f"SEGRELAY_HTTP_CLIENT must be {' or '.join(HTTP_CLIENTS)}")
        if config.tenant_queue_share > 1:
            raise ConfigError("SEGRELAY_TENANT_QUEUE_SHARE must be a fraction of the queue, at most 1")
        if config.max_inflight_bytes < config.max_body_bytes:
            raise ConfigError("SEGRELAY_MAX_INFLIGHT_BYTES must be at least SEGRELAY_MAX_BODY_BYTES")
        if config.http_processes > MAX_HTTP_PROCESSES:
            raise ConfigError(f"SEGRELAY_HTTP_PROCESSES must be between 1 and {MAX_HTTP_PROCESSES}")
        if config.delivery_processes > 64:
            raise ConfigError("SEGRELAY_DELIVERY_PROCESSES must be between 0 and 64")
        if config.delivery_nice > 19:
            raise ConfigError("SEGRELAY_DELIVERY_NICE must be between 0 (the HTTP process's priority) and 19")
        if config.log_level not in LOG_LEVELS:
            raise ConfigError("SEGRELAY_LOG_LEVEL must be debug, info, warning or error")
        return config

    @property
    def sqlite_path(self) -> Path | None:
        return Path(self.store.removeprefix("sqlite:///")) if self.store.startswith("sqlite:///") else None


def default_http_processes(store: str = DEFAULT_STORE, accept_writer: bool = True) -> int:
    """One HTTP process per core, up to 4, less one: answering Segment is CPU-bound, one Python process uses one
    core, and the rest of segrelay needs a core's share. On SQLite the accept writer takes it (measured on 2 cores,
    accept path alone: one HTTP process and the writer took 8,300 events/s at 160 µs of CPU each, two and the
    writer 6,431 at 223 µs); on Redis the delivery processes and, on one machine, Redis itself (2 cores, accept
    path alone, in turn: one HTTP process 0.19x and 0.19x of bare Starlette at 186 and 193 µs per event, two 0.15x
    and 0.16x at 245 and 232 µs; end to end the same). SQLite without the accept writer: one per core."""
    cores = max(1, min(os.cpu_count() or 1, 4))
    return cores if store.startswith("sqlite:///") and not accept_writer else max(1, cores - 1)


def default_identity_cache_seconds(store: str, http_processes: int) -> float:
    """How long an HTTP process trusts what it knows of a visitor: a minute when it is the only one writing
    identities (one HTTP process on the embedded store), 5 s when others may have learned more meanwhile."""
    return 60.0 if store.startswith("sqlite:///") and http_processes == 1 else 5.0


def default_delivery_processes() -> int:
    """One delivery process per core, up to 4 (they share one store; past that the store is the limit)."""
    return max(1, min(os.cpu_count() or 1, 4))


def vendor_urls(env: Mapping[str, str]) -> dict[str, str]:
    """Vendor base URLs: operator configuration only, never from a request's settings."""
    urls = {}
    for vendor in VENDORS:
        url = env.get(vendor.url_env, vendor.default_url).rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"{vendor.url_env} must be an http:// or https:// URL")
        urls[vendor.slug] = url
    return urls


def load_secret(env: Mapping[str, str], store: str) -> bytes:
    """SEGRELAY_SECRET, else SEGRELAY_SECRET_FILE, else (embedded store only) a 0600 file beside the store."""
    if env.get("SEGRELAY_SECRET"):
        secret = env["SEGRELAY_SECRET"].encode()
    elif env.get("SEGRELAY_SECRET_FILE"):
        try:
            secret = Path(env["SEGRELAY_SECRET_FILE"]).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"SEGRELAY_SECRET_FILE cannot be read: {exc.strerror}") from None
    elif store.startswith("sqlite:///"):
        secret = _generated_secret(Path(store.removeprefix("sqlite:///")).parent / "secret")
    else:
        raise ConfigError("SEGRELAY_SECRET or SEGRELAY_SECRET_FILE is required with a Redis store: every "
                          "replica must share it")
    if len(secret) < 32:
        raise ConfigError("The server secret must be at least 32 bytes (e.g. `openssl rand -hex 32`)")
    return secret


def _generated_secret(path: Path) -> bytes:
    if path.exists():
        return path.read_bytes().strip()
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)  # the embedded store's folder: private
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32))
    return path.read_bytes().strip()


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    return _parsed(env, name, default, minimum, int, "an integer")


def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.001) -> float:
    return _parsed(env, name, default, minimum, float, "a number")


N = TypeVar("N", int, float)


def _parsed(env: Mapping[str, str], name: str, default: N, minimum: N, cast: Callable[[str], N], kind: str) -> N:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = cast(raw)
    except ValueError:
        raise ConfigError(f"{name} must be {kind}, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")
