"""The `segrelay` command: serve, deliver, keys, translate, dlq, trace, identities, queue, check, stub."""

from __future__ import annotations

import argparse
import asyncio
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
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from cryptography.exceptions import InvalidTag

from app.config import (
    DEFAULT_STORE,
    LOG_LEVELS,
    MAX_HTTP_PROCESSES,
    Config,
    ConfigError,
    default_identity_cache_seconds,
    vendor_urls,
)
from app.crypto import KeyHasher, Sealer
from app.errors import ContractError
from app.event import parse_event
from app.identity import Context, IdentityBook, stitch
from app.keys import new_key
from app.outgoing import preview
from app.settings import resolve
from app.store import Store, open_store
from app.stored import unpack_event, with_settings
from app.translate import active_vendors, translate
from app.version import VERSION
from handlers import BY_SLUG

T = TypeVar("T")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.run(args)
    except ConfigError as exc:
        print(f"segrelay: configuration error: {exc}", file=sys.stderr)
        return 2
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segrelay", description="Segment destination partner endpoint: "
                                     "relays events to SegmentStream, Tracify and Audiohook.")
    parser.add_argument("--version", action="version", version=f"segrelay {VERSION}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the HTTP service (POST /segment) on every core, and its delivery "
                                         "workers")
    serve.add_argument("--host", default=None, help="bind address (default SEGRELAY_HOST or 0.0.0.0)")
    serve.add_argument("--port", type=int, default=None, help="port (default SEGRELAY_PORT or 8080)")
    serve.add_argument("--ssl-certfile", default=None, metavar="FILE",
                       help="serve HTTPS with this certificate chain (PEM; default SEGRELAY_SSL_CERTFILE)")
    serve.add_argument("--ssl-keyfile", default=None, metavar="FILE",
                       help="the certificate's private key (PEM; default SEGRELAY_SSL_KEYFILE)")
    serve.add_argument("--delivery-processes", type=int, default=None, metavar="N",
                       help="delivery processes started beside the HTTP process (default "
                            "SEGRELAY_DELIVERY_PROCESSES or one per core, up to 4; 0 delivers inside the HTTP "
                            "process)")
    serve.add_argument("--http-processes", type=int, default=None, metavar="N",
                       help="HTTP processes answering on the port, this one included (default "
                            "SEGRELAY_HTTP_PROCESSES or one per core, up to 4; one fewer on SQLite, "
                            "whose accept writer takes a core's share)")
    serve.set_defaults(run=cmd_serve)

    serve_http = sub.add_parser("serve-http", help="one more HTTP process of serve on serve's port (serve starts "
                                                   "these itself)")
    serve_http.add_argument("--host", required=True, help="the address serve listens on")
    serve_http.add_argument("--port", type=int, required=True, help="its port (shared with SO_REUSEPORT)")
    serve_http.add_argument("--slot", type=int, required=True, help="this process's slot at SQLite's write lock")
    serve_http.add_argument("--health-fd", type=int, required=True, help="the shared health flag (memfd)")
    serve_http.add_argument("--wake-fd", type=int, default=None, help="the delivery processes' wake-up pipe")
    serve_http.add_argument("--wake-count", type=int, default=0, help="how many delivery processes it wakes")
    serve_http.add_argument("--http-processes", type=int, required=True, help="how many HTTP processes serve runs")
    serve_http.add_argument("--parent-pid", type=int, default=None, help="serve's pid: this process dies with it")
    serve_http.add_argument("--ssl-certfile", default=None, metavar="FILE", help="certificate chain (PEM)")
    serve_http.add_argument("--ssl-keyfile", default=None, metavar="FILE", help="its private key (PEM)")
    serve_http.add_argument("--accept-writer", default=None, metavar="SOCKET",
                            help="the accept writer's socket (SQLite): accepted events are stored by it")
    serve_http.set_defaults(run=cmd_serve_http)

    writer = sub.add_parser("accept-writer", help="store the events that serve's HTTP processes accept, in one "
                                                  "process (SQLite; serve starts it itself)")
    writer.add_argument("--database", required=True, help="the SQLite file (serve passes its own)")
    writer.add_argument("--socket", required=True, help="the Unix socket the HTTP processes send accepts to")
    writer.add_argument("--slot", type=int, required=True, help="this process's slot at SQLite's write lock")
    writer.add_argument("--parent-pid", type=int, default=None, help="serve's pid: this process dies with it")
    writer.set_defaults(run=cmd_accept_writer)

    deliver = sub.add_parser("deliver", help="run only the delivery side on the configured store (serve starts "
                                             "it for you; run it yourself to deliver from a shared Redis)")
    deliver.add_argument("--wake-fd", type=int, default=None, help=argparse.SUPPRESS)
    deliver.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    deliver.add_argument("--slot", type=int, default=None, help=argparse.SUPPRESS)
    deliver.set_defaults(run=cmd_deliver)

    keys = sub.add_parser("keys", help="issue, list and revoke the API keys customers paste into Segment")
    keys_sub = keys.add_subparsers(required=True, metavar="ACTION")
    create = keys_sub.add_parser("create", help="issue a key (printed once, stored only as an HMAC)")
    create.add_argument("--tenant", required=True, help="customer name the key belongs to")
    create.add_argument("--expires-in-days", type=float, default=None, help="expiry (default: never)")
    create.add_argument("--vendors", default="", help=f"comma-separated vendors the key may send to "
                        f"(default: all of {', '.join(BY_SLUG)})")
    create.add_argument("--json", action="store_true", help="print one JSON object")
    create.set_defaults(run=cmd_keys_create)
    listing = keys_sub.add_parser("list", help="key ids, tenants, expiry, vendors, revoked (never the key)")
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(run=cmd_keys_list)
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id (effective within seconds)")
    revoke.add_argument("key_id", help="the key's id (the part after sr_, as `keys list` shows it)")
    revoke.set_defaults(run=cmd_keys_revoke)

    tr = sub.add_parser("translate", help="print what events would become, without sending anything",
                        description="Print what each event would become for each vendor enabled by --settings. A file "
                                    "of several events (a JSON array or JSON lines) is read in order, stitching "
                                    "identities across them as the server would (in memory; no store is used).")
    tr.add_argument("--settings", default="{}", help="destination settings: JSON text or a JSON file")
    tr.add_argument("event", nargs="?", default="-", help="a Segment event as JSON, a JSON array of events or JSON "
                                                          "lines, in a file or - for stdin")
    tr.set_defaults(run=cmd_translate)

    dlq = sub.add_parser("dlq", help="dead letters: postbacks a vendor refused or that ran out of retries")
    dlq_sub = dlq.add_subparsers(required=True, metavar="ACTION")
    dlist = dlq_sub.add_parser("list", help="vendor, tenant, event, attempts, last status and body")
    dlist.add_argument("--vendor", choices=sorted(BY_SLUG), help="only this vendor's dead letters")
    dlist.add_argument("--limit", type=int, default=100, help="at most this many, oldest first (default 100)")
    dlist.add_argument("--json", action="store_true", help="print a JSON array")
    dlist.set_defaults(run=cmd_dlq_list)
    replay = dlq_sub.add_parser("replay", help="queue dead letters again (attempts reset), rendered with the "
                                "latest settings Segment sent with their API key (fix a token in Segment, then replay)")
    group = replay.add_mutually_exclusive_group(required=True)
    group.add_argument("--all", action="store_true", help="every dead letter")
    group.add_argument("ids", nargs="*", default=[], metavar="ID", help="dead-letter ids, as `dlq list` shows them")
    replay.add_argument("--settings", default=None, help="render with these destination settings (JSON text or "
                        "file) instead of the latest ones received from Segment with the event's API key")
    replay.set_defaults(run=cmd_dlq_replay)

    check = sub.add_parser("check", help="send Segment's test-suite calls and contract probes to a deployed "
                                         "endpoint and show what Segment would see (exit 0 only if all pass)")
    check.add_argument("url", help="the endpoint, e.g. https://relay.example.com/segment")
    check.add_argument("--key", required=True, help="an API key issued by that deployment")
    check.add_argument("--settings", default="{}", help="destination settings: JSON text or a JSON file "
                       "(default none: nothing is queued for a vendor)")
    check.add_argument("--json", action="store_true", help="print the results as JSON")
    check.set_defaults(run=cmd_check)

    stub = sub.add_parser("stub", help="a local stand-in for the three vendors that records what it receives "
                                       "(GET /_stub/requests); for trying segrelay without real vendors")
    stub.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: keep it local)")
    stub.add_argument("--port", type=int, default=9000, help="port (default 9000)")
    stub.set_defaults(run=cmd_stub)

    trace = sub.add_parser("trace", help="what became of one event, per vendor: queued, retrying (next attempt), "
                                         "leased, delivered (when, status), dead (status, answer) or skipped (why)")
    trace.add_argument("message_id", metavar="MESSAGE_ID", help="the event's messageId, as Segment sent it")
    trace.add_argument("--tenant", default=None, help="only this tenant's event of that messageId")
    trace.add_argument("--json", action="store_true", help="print a JSON array")
    trace.set_defaults(run=cmd_trace)

    ids = sub.add_parser("identities", help="remembered browser contexts (identity stitching)")
    ids_sub = ids.add_subparsers(required=True, metavar="ACTION")
    forget = ids_sub.add_parser("forget", help="delete what is remembered of one person now (and of the ids linked "
                                               "to it), e.g. for a deletion request")
    forget.add_argument("--tenant", required=True, help="the tenant of the API key the person's events came with")
    who = forget.add_mutually_exclusive_group(required=True)
    who.add_argument("--user-id", help="the person's userId, exactly as sent")
    who.add_argument("--anonymous-id", help="an anonymousId, exactly as sent")
    forget.set_defaults(run=cmd_identities_forget)

    queue = sub.add_parser("queue", help="the delivery queue")
    queue_sub = queue.add_subparsers(required=True, metavar="ACTION")
    stats = queue_sub.add_parser("stats", help="per vendor: PENDING waiting to be sent (due now or later), LEASED "
                                               "being sent, DUE pending and due now, DEAD in the dead-letter store")
    stats.add_argument("--json", action="store_true", help="print one JSON object, by vendor")
    stats.set_defaults(run=cmd_queue_stats)
    return parser


def _existing_store_config() -> Config:
    """The configuration of a command that reads the store: it never creates one where none is.

    With the embedded store, a command run from another directory would otherwise open a new, empty database
    beside it (and a new secret): zeros for stats, no dead letters, keys the server does not know.
    """
    store = os.environ.get("SEGRELAY_STORE", DEFAULT_STORE)
    given = os.environ.get("SEGRELAY_SECRET") or os.environ.get("SEGRELAY_SECRET_FILE")
    # Every variable is checked first; a secret beside the store is only looked up (or made) once it exists.
    Config.from_env(None if given else {**os.environ, "SEGRELAY_SECRET": "-" * 32})
    if store.startswith("sqlite:///"):
        path = Path(store.removeprefix("sqlite:///")).resolve()
        if not path.exists():
            raise ConfigError(f"no store at {path}: run this command where `segrelay serve` runs, or set "
                              f"SEGRELAY_STORE=sqlite:///<absolute path of the database> (serve logs its store "
                              f"at start-up)")
    return Config.from_env()


def _with_store(config: Config, action: Callable[[Store], Coroutine[Any, Any, T]]) -> T:
    async def run() -> T:
        store = open_store(config.store)
        try:
            return await action(store)
        finally:
            await store.close()
    return asyncio.run(run())


def _dump(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ") if ts else "never"


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
        settings = _settings_arg(args.settings)
    except (ValueError, OSError) as exc:
        print(f"segrelay: {exc}", file=sys.stderr)
        return 2
    results = check.run(args.url, args.key, settings)
    if args.json:
        _dump([{"case": r.case, "expected": r.expected, "status": r.status, "message": r.message,
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
    key = _with_store(config, action)
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


# keys ---------------------------------------------------------------------------------------------------


def cmd_keys_create(args: argparse.Namespace) -> int:
    config = Config.from_env()
    vendors = tuple(v.strip() for v in args.vendors.split(",") if v.strip())
    unknown = [v for v in vendors if v not in BY_SLUG]
    if unknown:
        print(f"segrelay: unknown vendor(s): {', '.join(unknown)} (known: {', '.join(BY_SLUG)})", file=sys.stderr)
        return 2
    if not args.tenant.strip():
        print("segrelay: --tenant must not be empty", file=sys.stderr)
        return 2
    now = time.time()
    expires = now + args.expires_in_days * 86_400 if args.expires_in_days is not None else None
    key, record = new_key(KeyHasher(config.secret), args.tenant.strip(), now, expires, vendors)

    _with_store(config, lambda store: store.save_key(record))
    if config.sqlite_path is not None:  # which store holds the key: the server must use the same one
        print(f"segrelay: key stored in sqlite:///{config.sqlite_path.resolve()}", file=sys.stderr)
    if args.json:
        _dump({"key": key, **record.public()})
    else:
        print(f"key:     {key}\nkey id:  {record.key_id}\ntenant:  {record.tenant}\n"
              f"expires: {_when(expires)}\nvendors: {', '.join(vendors) or 'all'}\n"
              "The key is shown only now; segrelay keeps only its HMAC.")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    config = _existing_store_config()

    records = _with_store(config, lambda store: store.list_keys())
    if args.json:
        _dump([r.public() for r in records])
        return 0
    print(f"{'KEY ID':<14}{'TENANT':<24}{'EXPIRES':<22}{'VENDORS':<34}REVOKED")
    for r in records:
        print(f"{r.key_id:<14}{r.tenant[:23]:<24}{_when(r.expires_at):<22}{','.join(r.vendors) or 'all':<34}"
              f"{'yes' if r.revoked else 'no'}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    config = _existing_store_config()

    if not _with_store(config, lambda store: store.revoke_key(args.key_id)):
        print(f"segrelay: no key with id {args.key_id}", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id}")
    return 0


# translate ----------------------------------------------------------------------------------------------


def _json_arg(value: str, what: str) -> Any:
    text = value
    if not value.lstrip().startswith(("{", "[")):
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"{what}: {value} is neither JSON nor a readable file")
        text = path.read_text()
    return orjson.loads(text)


def _settings_arg(value: str) -> dict[str, Any]:
    """--settings: a JSON object, given as text or as a file."""
    settings = _json_arg(value, "--settings")
    if not isinstance(settings, dict):
        raise ValueError("--settings must be a JSON object")
    return settings


def cmd_translate(args: argparse.Namespace) -> int:
    urls = vendor_urls(os.environ)
    try:
        raw_settings = _settings_arg(args.settings)
        raw = sys.stdin.buffer.read() if args.event == "-" else Path(args.event).read_bytes()
        documents = _events_arg(raw)
    except (ValueError, OSError) as exc:
        print(f"segrelay: {exc}", file=sys.stderr)
        return 2
    remembered: dict[str, Context] = {}  # identity stitching across the file's events, in memory
    results, failed = [], False
    for document in documents:
        body = orjson.dumps(document) if len(documents) > 1 else raw
        try:
            settings = resolve(raw_settings)
            event = parse_event(document, body, datetime.now(UTC), settings.get("defaultCurrency"))
            vendors = active_vendors(settings)
            if settings.get("identityStitching"):
                keys = [k for k in (event.user_id and f"user:{event.user_id}",
                                    event.anonymous_id and f"anonymous:{event.anonymous_id}") if k]
                _, updates = stitch(event, keys, [remembered.get(k) for k in keys], now=time.time())
                remembered.update(updates)
            translation = translate(event, settings, vendors)
        except ContractError as exc:
            results.append({"status": exc.status_code, "message": exc.message})
            failed = True
            continue
        result: dict[str, Any] = preview(translation.postbacks, translation.skips, urls)
        if event.stitched:
            result["stitched"] = event.stitched
        if event.warnings:
            result["warnings"] = event.warnings
        results.append(result)
    _dump(results if len(documents) > 1 else results[0])
    return 1 if failed else 0


def _events_arg(raw: bytes) -> list[Any]:
    """One event, a JSON array of events, or JSON lines (one event per line)."""
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError:
        lines = [line for line in raw.splitlines() if line.strip()]
        if len(lines) < 2:
            raise
        return [orjson.loads(line) for line in lines]
    if isinstance(document, list):
        if not document:
            raise ValueError("the file holds an empty list of events")
        return document
    return [document]


# dlq and queue ------------------------------------------------------------------------------------------


def cmd_dlq_list(args: argparse.Namespace) -> int:
    config = _existing_store_config()

    letters = _with_store(config, lambda store: store.dead_letters(args.vendor, args.limit))
    if args.json:
        _dump([{"id": d.id, "vendor": d.vendor, "tenant": d.tenant, "message_id": d.message_id,
                "event": d.event_name, "attempts": d.attempts, "last_status": d.last_status,
                "last_body": d.last_body, "created_at": d.created_at, "died_at": d.died_at} for d in letters])
        return 0
    if not letters:
        print("no dead letters")
    for d in letters:
        print(f"{d.id}  {d.vendor}  tenant={d.tenant}  event={d.event_name!r}  message_id={d.message_id}  "
              f"attempts={d.attempts}  status={d.last_status if d.last_status is not None else 'network error'}"
              f"  died={_when(d.died_at)}\n    {d.last_body[:300]}")
    return 0


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    if not args.all and not args.ids:
        print("segrelay: give dead-letter ids or --all", file=sys.stderr)
        return 2
    override: bytes | None = None
    if args.settings is not None:
        try:
            override = orjson.dumps(resolve(_settings_arg(args.settings)))
        except (ValueError, OSError, ContractError) as exc:
            print(f"segrelay: {getattr(exc, 'message', exc)}", file=sys.stderr)
            return 2
    config = _existing_store_config()
    sealer = Sealer(config.secret)

    async def action(store: Store) -> tuple[int, int, list[str]]:
        ids = [d.id for d in await store.dead_letters(limit=1_000_000)] if args.all else list(args.ids)
        rerendered, unknown = 0, []
        for job_id in ids:
            found = await store.dead_letter_payload(job_id)  # None unless it is a dead letter
            if found is None:
                unknown.append(job_id)
                continue
            event_id, payload = found
            try:
                stored = sealer.open(payload)
            except InvalidTag:  # sealed under another secret: replayed as it is (and dead-lettered again)
                continue
            settings = override
            if settings is None:
                latest = await store.latest_settings(unpack_event(stored).key_id)
                settings = sealer.open(latest) if latest is not None else None
            if settings is not None:
                await store.replace_payload(event_id, sealer.seal(with_settings(stored, settings)))
                rerendered += 1
        known = [i for i in ids if i not in unknown]
        count = await store.replay(known, now=time.time()) if known else 0
        return count, rerendered, unknown

    count, rerendered, unknown = _with_store(config, action)
    for job_id in unknown:
        print(f"segrelay: no dead letter with id {job_id}", file=sys.stderr)
    source = "the --settings given" if override is not None else "the latest settings received with their API key"
    print(f"replayed {count} dead letter(s); {rerendered} rendered again with {source}"
          + (f", {count - rerendered} with the settings they were stored with" if count - rerendered else ""))
    return 0 if (count or args.all) and not unknown else 1


def cmd_trace(args: argparse.Namespace) -> int:
    config = _existing_store_config()
    outcomes = _with_store(config, lambda store: store.trace(args.message_id, args.tenant))
    if args.json:
        _dump([{"tenant": o.tenant, "vendor": o.vendor, "target": o.target, "state": o.state, "attempts": o.attempts,
                "status": o.status, "detail": o.detail, "at": o.at, "next_at": o.next_at} for o in outcomes])
        return 0 if outcomes else 1
    if not outcomes:
        print(f"segrelay: nothing known of messageId {args.message_id!r}"
              f"{f' for tenant {args.tenant}' if args.tenant else ''}: never stored here (an event with nothing to "
              f"send is not kept; the answer to Segment gave its reasons), or older than the idempotency window",
              file=sys.stderr)
        return 1
    print(f"{'TENANT':<14}{'VENDOR':<15}{'TARGET':<13}{'STATE':<11}{'ATTEMPTS':>8}  {'STATUS':<7}WHEN / DETAIL")
    for o in outcomes:
        when = (f"next attempt {_when(o.next_at)}" if o.state in ("queued", "retrying") else
                f"lease ends {_when(o.next_at)}" if o.state == "leased" else _when(o.at))
        detail = f"  {o.detail[:120]}" if o.detail else ""
        print(f"{o.tenant:<14}{o.vendor:<15}{o.target or '-':<13}{o.state:<11}{o.attempts:>8}  "
              f"{o.status if o.status is not None else '-'!s:<7}{when}{detail}")
    return 0


def cmd_identities_forget(args: argparse.Namespace) -> int:
    config = _existing_store_config()

    async def forget(store: Store) -> int:
        book = IdentityBook(store, Sealer(config.secret), config.secret, ttl_seconds=config.identity_ttl_days * 86_400)
        return await book.forget(args.tenant.strip(), user_id=args.user_id, anonymous_id=args.anonymous_id)
    gone = _with_store(config, forget)
    who = f"userId {args.user_id!r}" if args.user_id else f"anonymousId {args.anonymous_id!r}"
    print(f"forgot {gone} remembered identit{'y' if gone == 1 else 'ies'} of {who} (tenant {args.tenant.strip()}) "
          f"and the ids linked to it")
    return 0


def cmd_queue_stats(args: argparse.Namespace) -> int:
    config = _existing_store_config()

    stats = _with_store(config, lambda store: store.stats(now=time.time()))
    rows = {slug: stats.vendors.get(slug) for slug in BY_SLUG}
    table = {slug: {"pending": s.pending, "leased": s.leased, "due": s.due, "dead": s.dead} if s else
             {"pending": 0, "leased": 0, "due": 0, "dead": 0} for slug, s in rows.items()}
    if args.json:
        _dump(table)
        return 0
    print(f"{'VENDOR':<16}{'PENDING':>9}{'LEASED':>9}{'DUE':>9}{'DEAD':>9}")
    for slug, row in table.items():
        print(f"{slug:<16}{row['pending']:>9}{row['leased']:>9}{row['due']:>9}{row['dead']:>9}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
