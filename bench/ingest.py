"""Ingest benchmark: POST /segment through the full durable accept path vs a bare Starlette app.

Both run under the same uvicorn (one process, same loop and HTTP implementation), receive the same body and
headers from wrk on loopback, and are measured in the same run. segrelay runs with SEGRELAY_DELIVERY=off so
the figure is the accept path alone: auth, settings, normalisation, translation for three vendors (four
postbacks), encryption, durable group commit.

    python bench/ingest.py [--store sqlite|redis|both] [--seconds 10] [--connections 32] [--fixture F]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import (
    ALL_VENDORS,
    ROOT,
    SECRET,
    RedisServer,
    basic,
    free_port,
    print_table,
    settings_header,
    start,
    stop,
    wrk,
)

UVICORN = ["-m", "uvicorn", "--host", "127.0.0.1", "--no-access-log", "--log-level", "warning"]


def body(fixture: str = "order_completed.json") -> str:
    event = json.loads((ROOT / "tests/fixtures/segment" / fixture).read_text())
    event["messageId"] = "__MESSAGE_ID__"
    return json.dumps(event)


def run_segrelay(tmp: Path, store: str, args: argparse.Namespace) -> dict[str, float]:
    port = free_port()
    # Default log level: one JSON line per request, as in production.
    env = {"SEGRELAY_STORE": store, "SEGRELAY_SECRET": SECRET, "SEGRELAY_DELIVERY": "off",
           "SEGRELAY_MAX_QUEUE_MB": "100000", "SEGRELAY_MIN_FREE_DISK_MB": "0"}
    key_out = subprocess.run([sys.executable, "-m", "app", "keys", "create", "--tenant", "bench", "--json"],
                             env={**os.environ, **env}, cwd=tmp, capture_output=True, text=True, check=True).stdout
    key = json.loads(key_out)["key"]
    proc = start([sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port)], env,
                 f"http://127.0.0.1:{port}/readyz", tmp / "segrelay.log")
    try:
        headers = {"Authorization": basic(key), "X-Segment-Settings": settings_header(ALL_VENDORS),
                   "Content-Type": "application/json"}
        event = body(args.fixture)
        wrk(f"http://127.0.0.1:{port}", event, headers, seconds=2, connections=args.connections)  # warm-up
        return wrk(f"http://127.0.0.1:{port}", event, headers, seconds=args.seconds, connections=args.connections)
    finally:
        stop(proc)


def run_bare(tmp: Path, args: argparse.Namespace, event: str | None = None) -> dict[str, float]:
    """The reference: bare Starlette under the same uvicorn, the same body and headers, the same wrk."""
    port = free_port()
    proc = start([sys.executable, *UVICORN, "--port", str(port), "--app-dir", str(ROOT / "bench"), "bare_app:app"],
                 {}, f"http://127.0.0.1:{port}/healthz", tmp / "bare.log")
    try:
        headers = {"Authorization": "Basic eDo=", "X-Segment-Settings": settings_header(ALL_VENDORS),
                   "Content-Type": "application/json"}
        event = event or body(args.fixture)
        wrk(f"http://127.0.0.1:{port}", event, headers, seconds=2, connections=args.connections)
        return wrk(f"http://127.0.0.1:{port}", event, headers, seconds=args.seconds, connections=args.connections)
    finally:
        stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=["sqlite", "redis", "both"], default="both")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--fixture", default="order_completed.json", help="event from tests/fixtures/segment")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as raw_tmp:
        tmp = Path(raw_tmp)
        bare = run_bare(tmp, args)
        rows.append(("bare Starlette", bare))
        if args.store in ("sqlite", "both"):
            rows.append(("segrelay, SQLite FULL", run_segrelay(tmp, f"sqlite:///{tmp / 'store.db'}", args)))
        if args.store in ("redis", "both"):
            (tmp / "redis").mkdir()
            redis = RedisServer(tmp / "redis")  # AOF, appendfsync always
            try:
                rows.append(("segrelay, Redis AOF always", run_segrelay(tmp, redis.url, args)))
            finally:
                redis.stop()
    print_table(f"POST /segment, {args.fixture} with settings for all 3 vendors, wrk -c{args.connections} "
                f"-d{args.seconds}s", rows)
    for name, figures in rows[1:]:
        print(f"ratio {name} / bare Starlette: {figures['rps'] / bare['rps']:.2f}")


if __name__ == "__main__":
    main()
