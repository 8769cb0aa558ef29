"""The accept writer alone: `segrelay accept-writer` on a new SQLite file, fed over its socket by clients like an
HTTP process's (app/store/accept_writer.py's `AcceptWriterClient`), without HTTP, parsing or sealing.

Each client sends `--turn` accepts per event loop turn (one frame, as an HTTP process sends a turn's) and waits for
their answers before the next turn; `--clients` of them run at once. Every accept is a new messageId with the four
jobs of an Order Completed and a random `--payload` of that many bytes (what a sealed event is: 2,437 bytes for the
benchmarks' Order Completed with its settings; `--payload` several sizes to see how the stored row's size moves the
writer's cost: two rows to a 4 KB page need rows under about 2,000 bytes). Prints, per round, the accepts per
second, the writer's CPU per accept (user and system, from /proc), and the clients' CPU
per accept (their hand-off, framing and answers: the HTTP process's share of storing).

    python bench/accept_writer.py [--payload 2437[,1700,...]] [--clients 3] [--turn 10] [--seconds 5] [--rounds 3]
                                  [--ids random|counted]

Figures only: it decides nothing. Reference in the same run: the payload sizes given, each measured in turn.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from common import ROOT, add_ids_option, unix_listening, user_system_seconds

from app.store.accept_writer import AcceptWriterClient
from app.supervisor import ACCEPT_WRITER_SLOT

JOBS = [("segmentstream", "track", "Order Completed", ""), ("segmentstream", "data_stream", "Order Completed", ""),
        ("tracify", "events", "Order Completed", ""), ("audiohook", "pixel", "Order Completed", "")]
TTL = 7 * 86_400.0


async def load(path: str, args: argparse.Namespace, payload: bytes, seconds: float, prefix: str) -> int:
    """Accepts stored by `--clients` clients in `seconds`."""
    clients = [AcceptWriterClient(path) for _ in range(args.clients)]
    done = 0
    stop_at = time.monotonic() + seconds

    async def run(number: int, client: AcceptWriterClient) -> None:
        nonlocal done
        turn = 0
        await client.call(("bench", f"{prefix}-{number}-first", payload, JOBS, time.time(), TTL, []), 10.0)
        while time.monotonic() < stop_at:
            turn += 1
            now = time.time()
            answers = await asyncio.gather(*(
                client.submit(("bench", message_id(args, f"{prefix}-{number}-{turn}-{i}"), payload, JOBS, now, TTL, []),
                              10.0)
                for i in range(args.turn)))
            done += sum(1 for fresh in answers if fresh)

    try:
        await asyncio.gather(*(run(n, c) for n, c in enumerate(clients)))
    finally:
        for client in clients:
            client.close()
    return done


def message_id(args: argparse.Namespace, counted: str) -> str:
    """Analytics libraries' messageIds are random (uuid4): each lands on a random page of the idempotency index."""
    return str(uuid.uuid4()) if args.ids == "random" else counted


def measure(args: argparse.Namespace, size: int) -> None:
    with tempfile.TemporaryDirectory(prefix="segrelay-bench-") as raw:
        tmp = Path(raw)
        database, path = tmp / "queue.db", str(tmp / "w.sock")
        log = (tmp / "writer.log").open("wb")
        writer = subprocess.Popen([sys.executable, "-m", "app", "accept-writer", "--database", str(database),
                                   "--socket", path, "--slot", str(ACCEPT_WRITER_SLOT)],
                                  stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            deadline = time.monotonic() + 30
            while not unix_listening(path):
                if writer.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the accept writer did not start: {(tmp / 'writer.log').read_text()[-500:]}")
                time.sleep(0.05)
            payload = os.urandom(size)
            asyncio.run(load(path, args, payload, 1.0, "warm"))
            for round_ in range(args.rounds):
                (user, system), client, started = user_system_seconds(writer.pid), time.process_time(), time.monotonic()
                stored = asyncio.run(load(path, args, payload, args.seconds, f"r{round_}"))
                elapsed = time.monotonic() - started
                (user_after, system_after) = user_system_seconds(writer.pid)
                print(f"payload {size:>6} B  {stored / elapsed:>8.0f} accepts/s  accept writer "
                      f"{1e6 * (user_after - user) / stored:5.1f} user + {1e6 * (system_after - system) / stored:5.1f} "
                      f"system us per accept  clients "
                      f"{1e6 * (time.process_time() - client) / stored:5.1f} us per accept", flush=True)
        finally:
            writer.terminate()
            writer.wait(30)
            log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--payload", default="2437", help="payload sizes in bytes, comma-separated, measured in turn")
    parser.add_argument("--clients", type=int, default=3, help="clients at once (HTTP processes)")
    parser.add_argument("--turn", type=int, default=10, help="accepts per client per turn (one frame)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    add_ids_option(parser)
    args = parser.parse_args()
    for size in (int(s) for s in args.payload.split(",")):
        measure(args, size)


if __name__ == "__main__":
    main()
