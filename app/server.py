"""The ASGI application: routes, JSON errors, request logging and the life cycle of store and workers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics
from app.auth import Authenticator
from app.config import Config
from app.crypto import KeyHasher, Sealer
from app.delivery.runner import DeliveryService
from app.endpoint import BodyBudget, SegmentEndpoint, request_id_of
from app.ingest import Backpressure, Ingest
from app.log import request_id
from app.store import ALL_TENANTS, Store, check_durability, open_store
from app.supervisor import AcceptWriterProcess, DeliveryProcesses, HttpProcesses, SharedFlag, Waker, WorkerLink
from handlers import VENDORS

log = logging.getLogger("segrelay.server")


class JSONResponse(Response):
    media_type = "application/json"

    def __init__(self, content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> None:
        super().__init__(orjson.dumps(content), status_code, headers)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"message": message}, status, headers)


class RequestContext:
    """Pure ASGI middleware: a request id on every response and one JSON log line per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_of(dict(scope["headers"]))
        token = request_id.set(rid)
        started, status = time.perf_counter(), 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if scope["path"] not in ("/healthz", "/readyz", "/metrics") or status >= 400:
                log.info("request", extra={"method": scope["method"], "path": scope["path"][:100],
                                           "status": status,
                                           "duration_ms": round((time.perf_counter() - started) * 1000, 2)})
            request_id.reset(token)


class Service:
    """Everything an HTTP process holds: store, ingest, backpressure and, in the primary, the other processes.

    The primary (`segrelay serve`) delivers in `config.delivery_processes` child processes (by default one per
    core), inside itself (0), or not at all (`SEGRELAY_DELIVERY=false`: another deployment delivers from the shared
    store), and starts `config.http_processes - 1` more HTTP processes on its port (`address`, set before it
    starts). Those run this same class with a `link` to the primary: they accept and wake the delivery
    processes, and leave recovery, delivery and supervision to the primary.
    """

    def __init__(self, config: Config, link: WorkerLink | None = None) -> None:
        self.config, self.link = config, link
        # On SQLite the primary starts the accept writer, which stores what every HTTP process accepts.
        self.accept_writer = (AcceptWriterProcess(config.sqlite_path, config.drain_seconds + 10)
                              if link is None and config.sqlite_path is not None and config.accept_writer else None)
        writer_socket = self.accept_writer.socket if self.accept_writer else link.accept_writer if link else None
        self.store: Store = open_store(config.store, consumer=uuid.uuid4().hex[:12],
                                       slot=link.slot if link else 0, accept_writer=writer_socket)
        self.sealer = Sealer(config.secret)
        self.backpressure = Backpressure(config)
        self.inline: DeliveryService | None = None
        self.children: DeliveryProcesses | None = None
        self.http: HttpProcesses | None = None
        self.address: tuple[str, int] | None = None  # the host and port the HTTP children share (set by serve)
        self.tls: tuple[str, str] | None = None  # their certificate and key files
        self.health = SharedFlag(link.health_fd if link else None)
        notify: Callable[[str], None] = _nobody
        if link is not None:
            if link.wake_fd is not None:
                notify = Waker(link.wake_fd, link.wake_count).notify
        elif config.delivery and config.delivery_processes == 0:
            self.inline = DeliveryService(config, self.store)
            notify = self.inline.deliverer.notify
        elif config.delivery:
            self.children = DeliveryProcesses(config.delivery_processes, config.drain_seconds + 10)
            notify = self.children.notify
        self.ingest = Ingest(config, self.store, self.sealer,
                             Authenticator(self.store, KeyHasher(config.secret), config.key_cache_seconds,
                                           config.accept_timeout_seconds),
                             self.backpressure, notify)
        self._tasks: list[asyncio.Task[None]] = []
        self.stopped_cleanly = False

    @property
    def primary(self) -> bool:
        return self.link is None

    async def start(self) -> None:
        if self.primary:
            log.info("store", extra={"store": _shown_store(self.config)})
        if self.accept_writer is not None:
            self.accept_writer.start()
            await self.accept_writer.ready()
        await check_durability(self.store, allow_unsafe=self.config.redis_unsafe)
        if self.primary:
            for advice in await self.store.tuning_advice():
                log.info("store tuning advice", extra={"advice": advice})
        if self.primary and self.config.delivery:
            # Before any delivery process runs: leases of a crashed predecessor become due now.
            recovered = await self.store.recover_leases(now=time.time())
            if recovered:
                log.info("recovered leases of a previous run", extra={"postbacks": recovered})
        await self._refresh()
        if self.inline is not None:
            await self.inline.start(recover=False)
        if self.children is not None:
            self.children.start()
        if self.primary and self.config.http_processes > 1 and self.address is not None:
            self.http = HttpProcesses(self.config.http_processes - 1, self.config.drain_seconds + 10,
                                      address=self.address, health=self.health, delivery=self.children,
                                      tls=self.tls,
                                      accept_writer=self.accept_writer.socket if self.accept_writer else None)
            self.http.start()
        self._tasks.append(asyncio.create_task(self._monitor(), name="monitor"))

    @property
    def group_healthy(self) -> bool:
        """Every process of the group is running: the primary's own view, or the one it shares with its children."""
        if not self.primary:
            return self.health.get()
        return ((self.children is None or self.children.healthy)
                and (self.http is None or self.http.healthy)
                and (self.accept_writer is None or self.accept_writer.healthy))

    def terminate_http_children(self) -> None:
        """Pass a SIGTERM on to the other HTTP processes at once, so that they all start draining together."""
        if self.http is not None:
            self.http.terminate()

    async def stop(self) -> None:
        self.ingest.draining = True
        log.info("draining: no new events are accepted")
        clean = True
        if self.http is not None:
            clean = await self.http.stop()
        if self.inline is not None:
            await self.inline.stop()
        if self.children is not None:
            clean = await self.children.stop() and clean
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.accept_writer is not None:  # last: every HTTP process has answered its last request
            clean = await self.accept_writer.stop() and clean
        await self.ingest.identities.close()
        await self.store.close()
        self.health.close()
        self.stopped_cleanly = clean
        log.info("stopped", extra={"clean": clean})

    async def _refresh(self) -> None:
        counts = await self.store.counts()
        self.backpressure.refresh(counts)
        for vendor in VENDORS:
            metrics.QUEUE_DEPTH.labels(vendor.slug).set(counts.pending.get(vendor.slug, 0))
            metrics.DEAD_LETTERS.labels(vendor.slug).set(counts.dead.get(vendor.slug, 0))
        metrics.QUEUE_BYTES.set(counts.queued_bytes.get(ALL_TENANTS, 0))
        metrics.QUEUE_LIMIT_BYTES.set(self.backpressure.max_bytes)
        if self.primary:
            self.health.set(self.group_healthy)
        if self.primary and self.config.delivery:  # the replicas that deliver watch their queue's head
            for slug, age in (await self.store.oldest_due(now=time.time())).items():
                metrics.OLDEST_DUE.labels(slug).set(age)

    async def _monitor(self) -> None:
        """Once a second, from the store's counters (never a scan): backpressure, free disk and the gauges."""
        while True:
            await asyncio.sleep(1.0)
            try:
                await self._refresh()
            except Exception:
                log.exception("monitor error")


def _nobody(vendor: str) -> None:
    """No delivery in this process: nothing to wake."""


def _shown_store(config: Config) -> str:
    """The store's location for the log: the absolute SQLite path, or the Redis URL without its password."""
    if config.sqlite_path is not None:
        return f"sqlite:///{config.sqlite_path.resolve()}"
    scheme, _, rest = config.store.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


class Segrelay:
    """The ASGI application: POST /segment goes straight to its endpoint, everything else to Starlette."""

    def __init__(self, segment: SegmentEndpoint, rest: Starlette, service: Service) -> None:
        self.segment, self.rest, self.service = segment, rest, service
        self.direct = segment  # serve's HTTP protocol answers POST /segment through it without an ASGI cycle
        self.state = rest.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/segment" and scope["method"] == "POST":
            await self.segment(scope, receive, send)
        else:
            await self.rest(scope, receive, send)


def create_app(config: Config, link: WorkerLink | None = None) -> Segrelay:
    service = Service(config, link)
    endpoint = SegmentEndpoint(service.ingest, config.max_body_bytes, BodyBudget(config.max_inflight_bytes))

    async def segment(request: Request) -> Response:  # only reached by a method other than POST: 405
        raise HTTPException(405)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if service.ingest.draining:
            return error(503, "draining: shutting down")
        if not service.group_healthy:
            return error(503, "a delivery or HTTP process is restarting")
        try:
            await asyncio.wait_for(service.store.ping(), timeout=2.0)
        except Exception:
            return error(503, "store unreachable")
        return JSONResponse({"status": "ready"})

    async def prometheus(request: Request) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        messages = {404: f"Not found: {request.url.path[:100]} (Segment posts to /segment)",
                    405: f"Method {request.method} not allowed on {request.url.path[:100]}"}
        return error(exc.status_code, messages.get(exc.status_code, str(exc.detail)), dict(exc.headers or {}))

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.error("unexpected error", exc_info=exc)
        return error(500, "Internal error in segrelay")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await service.start()
        yield
        await service.stop()

    app = Starlette(
        routes=[
            Route("/segment", segment, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", prometheus, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: internal_error},
        middleware=[Middleware(RequestContext)],
        lifespan=lifespan,
    )
    app.state.service = service
    return Segrelay(endpoint, app, service)
