"""POST /segment: the request id, the body budget, the contract answer, one log line.

This is the path every Segment event takes, so it skips Starlette's routing, request objects and middleware
stack (everything else: health, readiness, metrics, JSON 404/405, is a Starlette app beside it), and under
`serve` also uvicorn's ASGI request cycle: the HTTP protocol hands it the headers and the body (`answer`).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from app import metrics
from app.errors import ContractError, PayloadTooLargeError, UnavailableError
from app.ids import new_id
from app.ingest import Ingest
from app.log import access, request_id
from app.store import StoreUnavailableError

log = logging.getLogger("segrelay.server")
SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_JSON = (b"content-type", b"application/json")


class ClientGone(Exception):
    """The client disconnected before its body arrived."""


class BodyBudget:
    """Bytes of request bodies being read or handled at once, bounded: past the bound a request gets 503."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def reserve(self, size: int) -> bool:
        """Take `size` bytes if they are free; False (nothing taken) when they are not."""
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def take(self, size: int) -> None:
        """Take `size` bytes, or 503 when they are not free."""
        if not self.reserve(size):
            raise UnavailableError("segrelay is receiving more data than it can hold right now; retry shortly",
                                   retry_after=1)

    def release(self, size: int) -> None:
        self.used -= size


def request_id_of(headers: dict[bytes, bytes]) -> str:
    """The caller's X-Request-Id when it is safe to log, else a new one (32 hex digits, app/ids.py)."""
    incoming = headers.get(b"x-request-id")
    if incoming is None:
        return new_id()
    text = incoming.decode("latin-1")
    return text if SAFE_REQUEST_ID.match(text) else new_id()


@dataclass(slots=True)
class Reply:
    """What /segment answers: the status, the response's own headers (uvicorn adds `date`) and the JSON body."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class SegmentEndpoint:
    """POST /segment, reached two ways: `answer` from the HTTP protocol with the body already read
    (app/http_protocol.py: how `serve` answers every such request with a declared length), or as an ASGI app (any
    other request: chunked bodies, `Expect: 100-continue`, pipelined requests, other servers, the tests' ASGI
    transport)."""

    path = b"/segment"

    def __init__(self, ingest: Ingest, max_body_bytes: int, budget: BodyBudget) -> None:
        self.ingest, self.limit, self.budget = ingest, max_body_bytes, budget

    def reserve(self, size: int) -> bool:
        """Take `size` bytes of the budget for a body about to arrive (the direct path), if they are free."""
        return self.budget.reserve(size)

    def release(self, size: int) -> None:
        self.budget.release(size)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        reply = await self.answer(headers, receive=receive)
        if reply is not None:
            await send({"type": "http.response.start", "status": reply.status, "headers": reply.headers})
            await send({"type": "http.response.body", "body": reply.body})

    def client_gone(self, extra: dict[str, Any] | None = None) -> None:  # the tenant when the key was checked
        """A client that left before its body arrived: nobody to answer, nothing taken on."""
        metrics.add(metrics.labelled(metrics.REQUESTS, "unknown", "499"))
        log.info("client disconnected before the body arrived", extra={**(extra or {}), "status": 499})

    async def answer(self, headers: dict[bytes, bytes], body: bytes | None = None, *, taken: int = 0,
                     receive: Receive | None = None) -> Reply | None:
        """Check, read (from `receive` when `body` is None), handle, count and log one request; None when the client
        left before its body arrived. `taken`: budget bytes already taken for `body`, given back here."""
        started = time.perf_counter()
        rid = request_id_of(headers)
        token = request_id.set(rid)
        kind, extra = "unknown", {}
        try:
            self.ingest.check_open()
            authorization = _text(headers.get(b"authorization"))
            now = time.time()
            key = (self.ingest.authenticator.verified(authorization, now)
                   or await self.ingest.authenticator.verify(authorization, now))
            extra = {"tenant": key.tenant, "key_id": key.key_id}
            if body is None:
                assert receive is not None
                body, taken = await self._body(headers, receive)
            document, kind, message_id = self.ingest.read(body)
            if message_id:
                extra["message_id"] = message_id
            answer = await self.ingest.handle(key, _text(headers.get(b"x-segment-settings")), body, document, kind)
            status, content, retry_after = answer.status, answer.body, None
        except ClientGone:
            self.client_gone(extra)
            return None
        except ContractError as exc:
            status, content, retry_after = exc.status_code, {"message": exc.message}, exc.retry_after
            if kind == "unknown":  # refused before its call type was known: the error may know it (501)
                kind = exc.call_type
        except StoreUnavailableError as exc:
            log.warning("store unavailable", extra={"reason": str(exc)[:200]}, exc_info=True)
            status, content, retry_after = 503, {"message": "Storage is temporarily unavailable; retry later"}, 5
        except Exception:
            log.exception("unexpected error in /segment")
            status, content = 500, {"message": "Internal error in segrelay; Segment will retry this event"}
            retry_after = None
        finally:
            self.budget.release(taken)
            request_id.reset(token)
        payload = orjson.dumps(content)
        response_headers = [_JSON, (b"content-length", str(len(payload)).encode()), (b"x-request-id", rid.encode())]
        if retry_after:
            response_headers.append((b"retry-after", str(retry_after).encode()))
        elapsed = time.perf_counter() - started
        metrics.add(metrics.labelled(metrics.REQUESTS, kind, str(status)))
        metrics.observe(metrics.REQUEST_SECONDS, elapsed)
        line: dict[str, Any] = {"method": "POST", "path": "/segment", "status": status, "call_type": kind,
                                "request_id": rid, "duration_ms": round(elapsed * 1000, 2), **extra}
        if status >= 400:
            line["reason"] = content["message"][:200]
        access(line)
        return Reply(status, response_headers, payload)

    async def _body(self, headers: dict[bytes, bytes], receive: Receive) -> tuple[bytes, int]:
        """The body and the bytes it took from the budget (given back by the caller)."""
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            raise PayloadTooLargeError(f"Event is larger than {self.limit // 1024} KB")
        chunks, taken = [], 0
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone
                chunk = message.get("body", b"")
                if chunk:
                    if taken + len(chunk) > self.limit:
                        raise PayloadTooLargeError(f"Event is larger than {self.limit // 1024} KB")
                    self.budget.take(len(chunk))
                    taken += len(chunk)
                    chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        except BaseException:
            self.budget.release(taken)
            raise
        return chunks[0] if len(chunks) == 1 else b"".join(chunks), taken


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")
