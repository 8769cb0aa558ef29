"""The commands that run segrelay: serve (and its children: serve-http, accept-writer, deliver), check, stub."""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import dataclasses
import gc
import logging
import os
import resource
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from app.config import (
    LOG_LEVELS,
    MAX_HTTP_PROCESSES,
    Config,
    ConfigError,
    default_identity_cache_seconds,
)
from app.crypto import KeyHasher
from app.keys import new_key
from app.operator_commands import dump, settings_arg, with_store
from app.store import Store

# serve --------------------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    config = Config.from_env()
    if args.delivery_processes is not None:
        if not 0 <= args.delivery_processes <= 64:
            raise ConfigError("--delivery-processes must be between 0 and 64")
        config = dataclasses.replace(config, delivery_processes=args.delivery_processes)
    if args.http_processes is not None:
        config = _with_http_processes(config, args.http_processes)
    if ((config.delivery and config.delivery_processes > 0) or config.http_processes > 1
            or (config.sqlite_path is not None and config.accept_writer)):
        # Several processes count into one set of metrics: prometheus_client's multiprocess mode, which must be
        # chosen before prometheus_client is first imported (app.server imports it). The children inherit it.
        metrics_dir = tempfile.mkdtemp(prefix="segrelay-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        atexit.register(shutil.rmtree, metrics_dir, True)
    from app.server import create_app

    certfile = args.ssl_certfile or os.environ.get("SEGRELAY_SSL_CERTFILE") or None
    keyfile = args.ssl_keyfile or os.environ.get("SEGRELAY_SSL_KEYFILE") or None
    if bool(certfile) != bool(keyfile):
        raise ConfigError("HTTPS needs both a certificate (--ssl-certfile / SEGRELAY_SSL_CERTFILE) and its key "
                          "(--ssl-keyfile / SEGRELAY_SSL_KEYFILE)")
    for name, path in (("certificate", certfile), ("key", keyfile)):
        if path and not Path(path).is_file():
            raise ConfigError(f"the {name} file {path} does not exist")
    host = args.host or os.environ.get("SEGRELAY_HOST", "0.0.0.0")
    port = args.port or int(os.environ.get("SEGRELAY_PORT", "8080"))
    if config.sqlite_path is not None:
        _first_key(config, port)
    app = create_app(config)
    tls = (certfile, keyfile) if certfile and keyfile else None
    server = _http_server(config, app, host=host, port=port, tls=tls)
    sock = listening_socket(host, port, shared=config.http_processes > 1)
    bound = sock.getsockname()[1]
    app.service.address, app.service.tls = (host, bound), tls
    logging.getLogger("segrelay").info("listening", extra={"address": f"{'https' if tls else 'http'}://{host}:{bound}",
                                                           "http_processes": config.http_processes})
    server.run(sockets=[sock])
    return 0 if app.service.stopped_cleanly else 1


def cmd_serve_http(args: argparse.Namespace) -> int:
    from app.process import die_with_parent
    from app.server import create_app
    from app.supervisor import WorkerLink

    die_with_parent(args.parent_pid)
    for name, fd in (("--health-fd", args.health_fd), ("--wake-fd", args.wake_fd)):
        try:
            if fd is not None:
                os.fstat(fd)
        except OSError:
            raise ConfigError(f"{name} {fd} is not an open file descriptor: serve-http is started by serve, which "
                              f"passes it") from None
    config = _with_http_processes(Config.from_env(), args.http_processes)
    link = WorkerLink(slot=args.slot, health_fd=args.health_fd, wake_fd=args.wake_fd, wake_count=args.wake_count,
                      accept_writer=args.accept_writer)
    app = create_app(config, link)
    tls = (args.ssl_certfile, args.ssl_keyfile) if args.ssl_certfile and args.ssl_keyfile else None
    server = _http_server(config, app, host=args.host, port=args.port, tls=tls)
    server.run(sockets=[listening_socket(args.host, args.port, shared=True)])
    return 0 if app.service.stopped_cleanly else 1


def listening_socket(host: str, port: int, *, shared: bool) -> socket.socket:
    """The HTTP port. Shared by several HTTP processes, each binds its own socket with SO_REUSEPORT and the kernel
    spreads new connections evenly over them (one socket accepted by all of them gave most connections to one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def _with_http_processes(config: Config, count: int) -> Config:
    """The configuration with --http-processes applied (the identity cache's default depends on it)."""
    if not 1 <= count <= MAX_HTTP_PROCESSES:
        raise ConfigError(f"--http-processes must be between 1 and {MAX_HTTP_PROCESSES}")
    config = dataclasses.replace(config, http_processes=count)
    if not os.environ.get("SEGRELAY_IDENTITY_CACHE_SECONDS"):
        config = dataclasses.replace(config, identity_cache_seconds=default_identity_cache_seconds(
            config.store, count))
    return config


if TYPE_CHECKING:
    import uvicorn

    from app.server import Segrelay


def _http_server(config: Config, app: Segrelay, *, host: str, port: int,
                 tls: tuple[str, str] | None) -> uvicorn.Server:
    """uvicorn as every HTTP process of serve runs it: its protocol's limits, JSON logs, the collector tuned, and
    SIGTERM answered by a drain (readiness false and 503 at once, the listener closed after the shutdown delay)."""
    import uvicorn

    from app import http_protocol
    from app.log import configure
    from app.process import tune_garbage_collector

    configure(config.log_level)
    service = app.service

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            service.ingest.draining = True
            service.terminate_http_children()
            if config.shutdown_delay_seconds > 0 and not self.should_exit:
                threading.Timer(config.shutdown_delay_seconds, self._exit, (sig, frame)).start()
            else:
                self._exit(sig, frame)

        def _exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:  # a drain on SIGTERM is the normal way to stop: exit 0, not killed-by-signal
                self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    # Everything loaded so far lives as long as the process: keep it out of the collector's way, and collect
    # young objects less often (a request allocates thousands of short-lived dicts, none of them cyclic).
    gc.freeze()
    tune_garbage_collector()
    http_protocol.LIMITS.update(max_connections=config.max_connections,
                                request_read_seconds=config.request_read_seconds)
    _raise_file_limit()
    # proxy_headers=False: segrelay never reads the client address, and the middleware cost every request.
    server = Server(uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, proxy_headers=False,
                                   timeout_graceful_shutdown=5, server_header=False,
                                   timeout_keep_alive=config.keepalive_seconds,
                                   ssl_certfile=tls[0] if tls else None, ssl_keyfile=tls[1] if tls else None,
                                   h11_max_incomplete_event_size=64 * 1024,
                                   loop="auto", http=http_protocol.GuardedHttpToolsProtocol, lifespan="on"))
    return server


def cmd_check(args: argparse.Namespace) -> int:
    from app import check

    try:
        settings = settings_arg(args.settings)
    except (ValueError, OSError) as exc:
        print(f"segrelay: {exc}", file=sys.stderr)
        return 2
    results = check.run(args.url, args.key, settings)
    if args.json:
        dump([{"case": r.case, "expected": r.expected, "status": r.status, "message": r.message,
                "passed": r.passed} for r in results])
    else:
        print(f"{'CASE':<32}{'EXPECTED':<15}{'GOT':<6}{'':<6}MESSAGE")
        for r in results:
            print(f"{r.case:<32}{r.expected:<15}{r.status or '-'!s:<6}{'PASS' if r.passed else 'FAIL':<6}{r.message}")
        print(f"{sum(r.passed for r in results)} of {len(results)} as Segment expects")
    return 0 if all(r.passed for r in results) else 1


def cmd_stub(args: argparse.Namespace) -> int:
    from app.stub import run

    print(f"segrelay stub: vendors at http://{args.host}:{args.port}/<segmentstream|tracify|audiohook>; what "
          f"arrived at http://{args.host}:{args.port}/_stub/requests", file=sys.stderr, flush=True)
    run(args.host, args.port)
    return 0


def cmd_accept_writer(args: argparse.Namespace) -> int:
    from app.log import configure
    from app.process import die_with_parent
    from app.store import accept_writer

    die_with_parent(args.parent_pid)
    level = os.environ.get("SEGRELAY_LOG_LEVEL", "info").lower()  # checked by serve, whose environment this is
    configure(level if level in LOG_LEVELS else "info")
    return accept_writer.serve(args.database, args.socket, slot=args.slot)


def cmd_deliver(args: argparse.Namespace) -> int:
    from app.delivery import runner
    from app.log import configure

    config = Config.from_env()
    configure(config.log_level)
    return runner.run(config, args.wake_fd, args.parent_pid, args.slot)


def _raise_file_limit() -> None:
    """Open connections need file descriptors: take the hard limit, which SEGRELAY_MAX_CONNECTIONS stays under."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))


def _first_key(config: Config, port: int) -> None:
    """A newcomer's first run: issue a key and show a ready-to-paste request, once."""
    async def action(store: Store) -> str | None:
        if await store.list_keys():
            return None
        key, record = new_key(KeyHasher(config.secret), "default", time.time(), None, ())
        await store.save_key(record)
        return key
    key = with_store(config, action)
    if key is None:
        return
    auth = base64.b64encode(f"{key}:".encode()).decode()
    assert config.sqlite_path is not None
    path = (config.sqlite_path.parent / "first-key.txt").resolve()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(f"""# segrelay: API key made on the first run, tenant "default" (delete this file after use)
# Paste the key into the destination in Segment, or try it with the curl command below.
{key}

curl -s -X POST http://127.0.0.1:{port}/segment \\
  -H 'Authorization: Basic {auth}' -H 'Content-Type: application/json' \\
  -d '{{"type":"track","event":"Test Event Name","userId":"test-user","messageId":"hello-1"}}'
""")
    # Never the key itself on stderr: a container's log stream is read by many.
    print(f"segrelay: no API key existed, so one was created for tenant \"default\"; it is in {path} "
          f"(readable only by this user), with a ready-to-run curl command", file=sys.stderr, flush=True)
