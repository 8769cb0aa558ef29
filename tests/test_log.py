"""The request line: JSON, the lines of one event-loop turn in one write, never after a later log line."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import sys
from collections.abc import Iterator

import orjson

from app import log


class Recording(io.BytesIO):
    """stdout's bytes, with each write call kept."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.writes.append(bytes(data))
        return super().write(data)


@contextlib.contextmanager
def recorded_stdout() -> Iterator[Recording]:
    """stdout replaced and logging configured as the service does, inside the test itself (pytest puts its own
    stdout back between a fixture's setup and the test)."""
    raw, saved = Recording(), sys.stdout
    sys.stdout = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    log.configure("info")
    try:
        yield raw
    finally:
        log.flush_access()
        sys.stdout = saved
        root.handlers[:] = handlers
        root.setLevel(level)


async def test_the_request_lines_of_one_turn_leave_in_one_write_at_its_end() -> None:
    with recorded_stdout() as stdout:
        await _one_turn(stdout)


async def _one_turn(stdout: Recording) -> None:
    log.access({"status": 202, "call_type": "track"})
    log.access({"status": 400, "call_type": "page", "reason": "bad"})
    assert stdout.writes == []  # the turn is not over
    await asyncio.sleep(0)
    assert len(stdout.writes) == 1
    lines = [orjson.loads(line) for line in stdout.writes[0].splitlines()]
    assert [(line["msg"], line["status"], line["logger"]) for line in lines] == [
        ("request", 202, "segrelay.access"), ("request", 400, "segrelay.access")]
    assert all(line["ts"].endswith("Z") and len(line["ts"]) == 24 for line in lines)


async def test_a_later_log_line_never_comes_before_a_request_line() -> None:
    with recorded_stdout() as stdout:
        log.access({"status": 202})
        logging.getLogger("segrelay.test").warning("after the request")
        messages = [orjson.loads(line)["msg"] for line in stdout.getvalue().splitlines()]
    assert messages == ["request", "after the request"]


def test_without_an_event_loop_the_line_is_written_at_once() -> None:
    with recorded_stdout() as stdout:
        log.access({"status": 200})
        assert [orjson.loads(line)["status"] for line in stdout.getvalue().splitlines()] == [200]
