"""The least a durable accept can do, under the same uvicorn as segrelay, with segrelay's steps added one by one.

Run by bench/prototype.py (one uvicorn process per variant). Each request: read the body, `orjson.loads` it, check
its call type, hand (tenant, messageId, payload) to a writer thread in this process, which stores whatever has
arrived in one transaction (SQLite WAL, synchronous=FULL) and resolves each request's future after COMMIT; then
answer 202 with a small JSON body. The environment adds segrelay's own steps:

  PROTOTYPE_PARSE=1   `parse_event`, `route` and the answer's per-vendor rows (app/event.py, app/translate.py)
  PROTOTYPE_SCHEMA=1  segrelay's tables and `accept_op` (idempotency record, event with its routes, counters),
                      instead of one row per event with a unique (tenant, messageId)
  PROTOTYPE_SEAL=1    the stored record packed and sealed as segrelay does (app/stored.py, app/crypto.py)

No authentication, no identity stitching, no request line, no metrics: a floor, not a product.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sqlite3
import threading
import time
from datetime import UTC, datetime
from typing import Any

import orjson

from app.crypto import Sealer
from app.event import call_type, parse_event
from app.settings import from_header, settings_json
from app.store.sqlite import SCHEMA, accept_op
from app.stored import pack_event
from app.translate import active_vendors, route, summary

DATABASE = os.environ.get("PROTOTYPE_DATABASE", "prototype.db")
PARSE = os.environ.get("PROTOTYPE_PARSE") == "1"
FULL_SCHEMA = os.environ.get("PROTOTYPE_SCHEMA") == "1"
SEAL = os.environ.get("PROTOTYPE_SEAL") == "1"
# What an Order Completed for all three vendors is routed to, when PROTOTYPE_PARSE does not route it.
JOBS = [("segmentstream", "track", "Order Completed", ""), ("segmentstream", "data_stream", "Order Completed", ""),
        ("tracify", "events", "Order Completed", "k"), ("audiohook", "pixel", "Order Completed", "")]

_sealer = Sealer(b"prototype secret of 32 bytes....")
_accepts: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
_loop: asyncio.AbstractEventLoop | None = None


def _writer() -> None:
    conn = sqlite3.connect(DATABASE, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    if FULL_SCHEMA:
        for statement in SCHEMA.split(";"):
            conn.execute(statement)
        conn.execute("INSERT OR IGNORE INTO cursors VALUES ('fanned_out', 0)")
    else:
        conn.execute("CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, tenant TEXT, message_id TEXT,"
                     " payload BLOB, UNIQUE (tenant, message_id))")
    while True:
        group = [_accepts.get()]
        while True:
            try:
                group.append(_accepts.get_nowait())
            except queue.Empty:
                break
        conn.execute("BEGIN IMMEDIATE")
        answers = []
        for tenant, message_id, payload, jobs, skips, now, future in group:
            if FULL_SCHEMA:
                fresh = accept_op(conn, tenant, message_id, payload, jobs, now, 86_400.0, skips)
            else:
                fresh = conn.execute("INSERT OR IGNORE INTO events (tenant, message_id, payload) VALUES (?, ?, ?)",
                                     (tenant, message_id, payload)).rowcount == 1
            answers.append((future, fresh))
        conn.execute("COMMIT")
        assert _loop is not None
        _loop.call_soon_threadsafe(_resolve, answers)


def _resolve(answers: list[tuple[asyncio.Future[bool], bool]]) -> None:
    for future, fresh in answers:
        if not future.done():
            future.set_result(fresh)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global _loop
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                _loop = asyncio.get_running_loop()
                threading.Thread(target=_writer, daemon=True).start()
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"] == "/healthz":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    document = orjson.loads(body)
    now = time.time()
    header = dict(scope["headers"]).get(b"x-segment-settings", b"").decode()
    jobs, skips = JOBS, []
    answer: dict[str, Any] = {"message": "accepted"}
    if PARSE:
        settings = from_header(header)
        event = parse_event(document, body, datetime.fromtimestamp(now, UTC), settings.get("defaultCurrency"))
        routing = route(event, settings, active_vendors(settings))
        answer["postbacks"] = summary(routing)
        message_id = event.message_id
        jobs = [(t.vendor, t.target, event.event_name or event.type, t.batch_key) for t in routing.targets]
        skips = [(k.vendor, k.reason) for k in routing.skips]
    else:
        call_type(document)
        message_id = document.get("messageId")
    payload = _sealer.seal(pack_event(settings_json(header), now, body, "key")) if SEAL else body
    assert _loop is not None
    future: asyncio.Future[bool] = _loop.create_future()
    _accepts.put(("bench", message_id, payload, jobs, skips, now, future))
    fresh = await future
    data = orjson.dumps(answer)
    await send({"type": "http.response.start", "status": 202 if fresh else 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
