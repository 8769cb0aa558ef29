"""`segrelay stub`: a local HTTP server standing in for the three vendors, recording what it receives.

Try segrelay without posting test data to a real vendor: run `segrelay stub --port 9000`, point
SEGRELAY_<VENDOR>_URL at http://127.0.0.1:9000/<vendor>, and read what arrived at /_stub/requests. The end-to-end
tests use it too, with scripted answers. It keeps what it receives in memory (headers included: vendor tokens),
so run it on loopback only.

Admin endpoints (JSON):
  POST /_stub/script    {"prefix": "/tracify", "answers": [{"status": 500, "body": "...", "headers": {},
                         "delay": 0.0}, ...], "default": {...}}   answers are used once each, in order
  GET  /_stub/requests  every request received: method, path, headers, body (text), at (unix time)
  GET  /_stub/count     {"count": n, "first": t0, "last": t1} (request arrival times)
  POST /_stub/reset     forget requests and scripts
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

DEFAULTS: dict[str, dict[str, Any]] = {
    "/segmentstream": {"status": 204, "body": ""},
    "/tracify": {"status": 200, "body": '{"status": true}'},
    "/audiohook": {"status": 200, "body": ""},
}


class Stub:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.scripts: dict[str, list[dict[str, Any]]] = {}
        self.defaults: dict[str, dict[str, Any]] = dict(DEFAULTS)

    def answer_for(self, path: str) -> dict[str, Any]:
        for prefix in sorted(self.scripts, key=len, reverse=True):
            if path.startswith(prefix) and self.scripts[prefix]:
                return self.scripts[prefix].pop(0)
        for prefix in sorted(self.defaults, key=len, reverse=True):
            if path.startswith(prefix):
                return self.defaults[prefix]
        return {"status": 404, "body": "no such vendor path"}


def create_stub_app() -> Starlette:
    stub = Stub()

    async def script(request: Request) -> Response:
        spec = orjson.loads(await request.body())
        prefix = spec["prefix"]
        stub.scripts[prefix] = list(spec.get("answers", []))
        if "default" in spec:
            stub.defaults[prefix] = spec["default"]
        return Response(b"{}", media_type="application/json")

    async def requests(request: Request) -> Response:
        return Response(orjson.dumps(stub.requests), media_type="application/json")

    async def count(request: Request) -> Response:
        times = [r["at"] for r in stub.requests]
        summary = {"count": len(times), "first": min(times, default=None), "last": max(times, default=None)}
        return Response(orjson.dumps(summary), media_type="application/json")

    async def reset(request: Request) -> Response:
        stub.reset()
        return Response(b"{}", media_type="application/json")

    async def vendor(request: Request) -> Response:
        body = await request.body()
        stub.requests.append({"method": request.method, "path": request.url.path,
                              "query": request.url.query, "headers": dict(request.headers),
                              "body": body.decode("utf-8", "replace"), "at": time.time()})
        answer = stub.answer_for(request.url.path)
        if answer.get("delay"):
            await asyncio.sleep(float(answer["delay"]))
        return Response(answer.get("body", ""), status_code=int(answer.get("status", 200)),
                        headers=answer.get("headers") or {})

    return Starlette(routes=[
        Route("/_stub/script", script, methods=["POST"]),
        Route("/_stub/requests", requests, methods=["GET"]),
        Route("/_stub/reset", reset, methods=["POST"]),
        Route("/_stub/count", count, methods=["GET"]),
        Route("/{path:path}", vendor, methods=["GET", "POST", "PUT"]),
    ])


def run(host: str, port: int) -> None:
    uvicorn.run(create_stub_app(), host=host, port=port, log_level="warning", access_log=False)
