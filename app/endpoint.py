"""POST /segment as a plain ASGI handler: the request id, the body budget, the contract answer, one log line.

This is the path every Segment event takes, so it skips Starlette's routing, request objects and middleware
stack; everything else (health, readiness, metrics, JSON 404/405) is a Starlette app beside it.
"""

from __future__ import annotations

import logging
import re
import time
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

    def take(self, size: int) -> None:
        if self.used + size > self.limit:
            raise UnavailableError("segrelay is receiving more data than it can hold right now; retry shortly",
                                   retry_after=1)
        self.used += size


def request_id_of(headers: dict[bytes, bytes]) -> str:
    """The caller's X-Request-Id when it is safe to log, else a new one (32 hex digits, app/ids.py)."""
    incoming = headers.get(b"x-request-id", b"").decode("latin-1")
    return incoming if SAFE_REQUEST_ID.match(incoming) else new_id()


class SegmentEndpoint:
    def __init__(self, ingest: Ingest, max_body_bytes: int, budget: BodyBudget) -> None:
        self.ingest, self.limit, self.budget = ingest, max_body_bytes, budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        headers = dict(scope["headers"])
        rid = request_id_of(headers)
        token = request_id.set(rid)
        kind, taken, extra = "unknown", 0, {}
        try:
            self.ingest.check_open()
            key = await self.ingest.authenticator.authenticate(_text(headers.get(b"authorization")))
            extra = {"tenant": key.tenant, "key_id": key.key_id}
            body, taken = await self._body(headers, receive)
            answer = await self.ingest.handle(key, _text(headers.get(b"x-segment-settings")), body)
            kind, status, content, retry_after = answer.call_type, answer.status, answer.body, None
            if answer.message_id:
                extra["message_id"] = answer.message_id
        except ClientGone:
            metrics.add(metrics.labelled(metrics.REQUESTS, kind, "499"))  # nobody to answer, nothing taken on
            log.info("client disconnected before the body arrived", extra={**extra, "status": 499})
            return
        except ContractError as exc:
            status, content, retry_after = exc.status_code, {"message": exc.message}, exc.retry_after
            kind = exc.call_type
            if exc.message_id:
                extra["message_id"] = exc.message_id
        except StoreUnavailableError as exc:
            log.warning("store unavailable", extra={"reason": str(exc)[:200]}, exc_info=True)
            status, content, retry_after = 503, {"message": "Storage is temporarily unavailable; retry later"}, 5
        except Exception:
            log.exception("unexpected error in /segment")
            status, content = 500, {"message": "Internal error in segrelay; Segment will retry this event"}
            retry_after = None
        finally:
            self.budget.used -= taken
            request_id.reset(token)
        payload = orjson.dumps(content)
        response_headers = [_JSON, (b"content-length", str(len(payload)).encode()), (b"x-request-id", rid.encode())]
        if retry_after:
            response_headers.append((b"retry-after", str(retry_after).encode()))
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": payload})
        elapsed = time.perf_counter() - started
        metrics.add(metrics.labelled(metrics.REQUESTS, kind, str(status)))
        metrics.observe(metrics.REQUEST_SECONDS, elapsed)
        line: dict[str, Any] = {"method": "POST", "path": "/segment", "status": status, "call_type": kind,
                                "request_id": rid, "duration_ms": round(elapsed * 1000, 2), **extra}
        if status >= 400:
            line["reason"] = content["message"][:200]
        access(line)

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
            self.budget.used -= taken
            raise
        return chunks[0] if len(chunks) == 1 else b"".join(chunks), taken


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")
