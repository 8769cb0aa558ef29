"""The accept path's steps, as the HTTP process calls them, wrapped to add up their thread CPU time by label.

Shared by `bench/accept_cpu.py --stages` (the app called in process, one event at a time) and
`bench/staged_accept.py` (serve's HTTP process under wrk, for `bench/ingest.py --stages`), so that both time the
same steps: the one figure in a loop, the other where the process also reads sockets, switches and waits.

Each entry names where the accept path looks the step up (a module attribute, or a class attribute), so a wrapper
put there is the one called. A step that awaits (ASYNC_STEPS) is only meaningful at one request in flight: its
thread CPU time then counts whatever else the event loop ran while it waited.
"""

from __future__ import annotations

import importlib
import inspect

from thread_clock import timed

PER_REQUEST = "the body's JSON and call type"  # a step every request takes once: what counts the requests

# (module, class or None, attribute, label): synchronous steps, none of them inside another
STEPS = [
    ("app.http_protocol", "GuardedHttpToolsProtocol", "data_received", "HTTP: parse and start the request (httptools)"),
    ("app.auth", "Authenticator", "verified", "the key check (cached)"),
    ("app.ingest", "Ingest", "read", PER_REQUEST),
    ("app.ingest", None, "parse_event", "parse the event"),
    ("app.ingest", None, "active_vendors", "vendors the settings enable"),
    ("app.identity", "IdentityBook", "stitch_known", "identity stitching (a known visitor)"),
    ("app.ingest", None, "route", "route"),
    ("app.ingest", None, "summary", "answer rows"),
    ("app.ingest", None, "pack_event", "pack the stored record"),
    ("app.crypto", "Sealer", "seal", "seal (AES-GCM)"),
    ("app.store.accept_writer", "AcceptWriterClient", "submit", "hand the event to the accept writer"),
    ("app.store.accept_writer", "AcceptWriterClient", "_flush", "write to the accept writer (once a turn)"),
    ("app.store.accept_writer", "AcceptWriterClient", "data_received", "the accept writer's answers (once a turn)"),
    ("app.store.redis_pipe", "RedisPipe", "submit", "hand the event to Redis"),
    ("app.store.redis_pipe", "RedisPipe", "data_received", "Redis's answers (once a turn)"),
    ("app.ingest", None, "_count", "metrics of the event"),
    ("app.endpoint", None, "access", "the request line"),
    ("app.metrics", None, "flush", "write the turn's metrics"),
    ("app.log", None, "flush_access", "write the turn's request lines"),
]
# (module, class, attribute, label): steps that await
ASYNC_STEPS = [
    ("app.auth", "Authenticator", "verify", "the key check (first use of a key)"),
    ("app.identity", "IdentityBook", "stitch_anew", "identity stitching (a visitor to look up)"),
    ("app.store.sqlite", "SQLiteStore", "accept", "store the event (awaits the commit)"),
    ("app.store.redis", "RedisStore", "accept", "store the event (awaits the commit)"),
]


def install(spent: dict[str, float], calls: dict[str, int], *, awaiting: bool) -> None:
    """Wrap every step (and with `awaiting` the ASYNC_STEPS too) so that its thread CPU seconds and its calls add
    up under its label in `spent` and `calls`."""
    for module, owner_name, name, label in STEPS + (ASYNC_STEPS if awaiting else []):
        imported = importlib.import_module(module)
        owner = imported if owner_name is None else getattr(imported, owner_name)
        found = inspect.getattr_static(owner, name)
        if isinstance(found, staticmethod):
            setattr(owner, name, staticmethod(timed(found.__func__, label, spent, calls)))
        else:
            setattr(owner, name, timed(getattr(owner, name), label, spent, calls))
