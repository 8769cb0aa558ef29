"""The reference: a bare Starlette app that reads the body and answers JSON, nothing else."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def segment(request: Request) -> JSONResponse:
    await request.body()
    return JSONResponse({"message": "accepted"}, status_code=202)


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


app = Starlette(routes=[Route("/segment", segment, methods=["POST"]), Route("/healthz", healthz)])
