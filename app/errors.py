"""Errors a request can raise, typed by the status Segment must see.

    ContractError            (any 4xx/5xx answered with {"message": ...})
    ├── BadRequestError      400  malformed body or settings: Segment discards, shows the customer
    ├── UnauthorizedError    401  missing, malformed, unknown, revoked or expired key
    ├── ForbiddenError       403  known key not allowed to do what the request asks
    ├── PayloadTooLargeError 413  body over the configured limit
    ├── UnsupportedTypeError 501  call type we do not handle (screen, alias, ...)
    └── UnavailableError     503  overloaded or draining: Segment retries
"""

from __future__ import annotations

import json
import re


class ContractError(Exception):
    status_code = 500
    retry_after: int | None = None
    call_type = "unknown"  # the Segment call it answers, when known before the body was read (501's screen, alias)

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequestError(ContractError):
    status_code = 400


class UnauthorizedError(ContractError):
    status_code = 401


class ForbiddenError(ContractError):
    status_code = 403


class PayloadTooLargeError(ContractError):
    status_code = 413


class UnsupportedTypeError(ContractError):
    status_code = 501


class UnavailableError(ContractError):
    status_code = 503

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


_PLAIN_PROBLEM = re.compile(r"[A-Za-z0-9 ,:'(){}\[\]-]{1,100}")


def unreadable_json(subject: str, exc: json.JSONDecodeError) -> str:
    """`subject`, then what the JSON parser found wrong and where: `<subject>: trailing comma is not allowed (line 1,
    column 17)`. orjson's phrases never quote the input, so they are safe in an answer and a log line; anything
    else (or a phrase about the parser's own memory, not the input) gives the place alone."""
    where = f"(line {exc.lineno}, column {exc.colno})"
    if _PLAIN_PROBLEM.fullmatch(exc.msg) and "memory" not in exc.msg:
        return f"{subject}: {exc.msg} {where}"
    return f"{subject} {where}"
