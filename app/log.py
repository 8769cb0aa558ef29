"""JSON-lines logging to stdout with a request id. Callers pass only safe fields: never keys, settings,
emails, IPs or user agents."""

from __future__ import annotations

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
    """The one line per request, written straight to stdout in the same JSON shape as every other line.

    The logging module costs about 40 µs a line, a tenth of the accept path; this costs a few. Callers pass only
    safe fields (never keys, settings, emails, IPs or user agents).
    """
    if not _ACCESS.isEnabledFor(logging.INFO):
        return
    now = time.time()
    entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z",
             "level": "info", "logger": "segrelay.access", "msg": "request", **fields,
             "pid": _PROCESS["pid"]}
    stream = sys.stdout
    stream.flush()  # anything the logging module has buffered goes first
    stream.buffer.write(orjson.dumps(entry, default=str) + b"\n")
    stream.buffer.flush()


def configure(level: str = "info") -> None:
    _PROCESS["pid"] = os.getpid()
    handler = logging.StreamHandler(sys.stdout)
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
