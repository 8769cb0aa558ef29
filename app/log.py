"""JSON-lines logging to stdout with a request id. Callers pass only safe fields: never keys, settings,
emails, IPs or user agents."""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import logging
import os
import sys
import time
import traceback
from typing import Any

import orjson

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if rid := request_id.get():
            entry["request_id"] = rid
        entry.update({k: v for k, v in record.__dict__.items() if k not in _RESERVED})
        entry["pid"] = _PROCESS["pid"]
        if record.exc_info and record.exc_info[0] is not None:
            entry["error"] = record.exc_info[0].__name__
            # Frames only: an exception's message may quote request data (emails, IPs).
            entry["trace"] = [f"{f.filename}:{f.lineno} in {f.name}"
                              for f in traceback.extract_tb(record.exc_info[2])]
        return orjson.dumps(entry, default=str).decode()


_ACCESS = logging.getLogger("segrelay.access")
_PROCESS = {"pid": os.getpid()}  # which of serve's processes wrote a line (set again by configure)


def access(fields: dict[str, Any]) -> None:
    """The one line per request, in the same JSON shape as every other line, written with the other request lines
    of the same event-loop turn in one write.

    The logging module costs about 40 µs a line, a tenth of the accept path; a write of its own per line cost a
    system call per request (bench/HISTORY.md's 0.10.0 figures). The lines of a turn leave at its end, before any line
    the logging module writes (`_Stdout`), and at exit. Callers pass only safe fields (never keys, settings,
    emails, IPs or user agents).
    """
    if not _ACCESS.isEnabledFor(logging.INFO):
        return
    now = time.time()
    second = int(now)
    if second != _STAMP[0]:  # strftime once a second, not once a line
        _STAMP[0], _STAMP[1] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    entry = {"ts": f"{_STAMP[1]}.{int(now * 1000) % 1000:03d}Z", "level": "info", "logger": "segrelay.access",
             "msg": "request", **fields, "pid": _PROCESS["pid"]}
    line = orjson.dumps(entry, default=str) + b"\n"
    if not _PENDING:
        try:
            asyncio.get_running_loop().call_soon(flush_access)
        except RuntimeError:  # no event loop: write it now
            _PENDING.append(line)
            flush_access()
            return
    _PENDING.append(line)


def flush_access() -> None:
    """Write the request lines waiting for the end of their turn."""
    if _PENDING:
        data = b"".join(_PENDING)
        _PENDING.clear()
        stream = sys.stdout
        stream.flush()  # anything the logging module has buffered goes first
        stream.buffer.write(data)
        stream.buffer.flush()


_PENDING: list[bytes] = []  # request lines of this event-loop turn
_STAMP: list[Any] = [0, ""]  # the second of the last request line and its text
atexit.register(flush_access)


class _Stdout(logging.StreamHandler):  # type: ignore[type-arg]
    """stdout, after the request lines that were written before this record."""

    def emit(self, record: logging.LogRecord) -> None:
        flush_access()
        super().emit(record)


def configure(level: str = "info") -> None:
    _PROCESS["pid"] = os.getpid()
    handler = _Stdout(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # we log requests ourselves, without client IPs
    # HTTP client libraries log URLs and, at debug level, request headers (vendor tokens): never below WARNING.
    for name in ("httpx", "httpcore", "hpack", "aiohttp", "aiohttp.client", "aiohttp.internal"):
        logging.getLogger(name).setLevel(logging.WARNING)
