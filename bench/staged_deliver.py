"""`segrelay deliver` with its CPU counted by step: what `bench/delivery.py --stages` runs instead of `-m app deliver`.

Wraps, before the delivery process starts, the steps whose CPU a delivery process spends, each timed with its
thread's CPU clock (user and system time of the calling thread):
- rendering: `Renderer.render` (open the stored event, parse it, build and encode its vendors' postbacks);
- SQLite: every statement a writer connection runs (`WriterConnection.execute`), by its first words, so COMMIT and
  BEGIN are counted apart from the statements of lease, complete and fan-out;
and the process's whole CPU from the first job rendered to the last one. The rest is the event loop, the HTTP
client and the worker's bookkeeping. Writes the totals as JSON to the file named by STAGED_DELIVER_FILE (one per
process: `<file>.<pid>`) every second and at exit, as seconds.

py-spy's samples do not give these shares: a profile of the same run put rendering at 69 % of the samples where its
thread CPU clock says 38-42 % (README, 0.13.14).

    STAGED_DELIVER_FILE=/tmp/stages python bench/staged_deliver.py [deliver's options]
"""

from __future__ import annotations

import atexit
import os
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from thread_clock import timed

from app.store.sqlite_writers import WriterConnection
from app.stored import Renderer

SQLITE = "sqlite: "  # the labels of SQLite's statements start with this, then their first words
SPENT: dict[str, float] = {}  # label -> CPU seconds
CALLS: dict[str, int] = {}
SPAN = {"first": 0.0, "last": 0.0}  # the process's CPU clock at the first and the last job rendered


def statement(connection: sqlite3.Connection, sql: str, *args: Any) -> str:
    return SQLITE + " ".join(sql.split()[:3])


def by_statement(spent: dict[str, float]) -> dict[str, float]:
    """SQLite's CPU seconds among the `spent` figures, by statement (its first words)."""
    return {name.removeprefix(SQLITE): seconds for name, seconds in spent.items() if name.startswith(SQLITE)}


def install() -> None:
    render = timed(Renderer.render, "render", SPENT, CALLS)

    def render_noting(self: Renderer, job: Any) -> Any:
        if not SPAN["first"]:
            SPAN["first"] = time.process_time()
        try:
            return render(self, job)
        finally:
            SPAN["last"] = time.process_time()

    Renderer.render = render_noting  # type: ignore[method-assign]
    WriterConnection.execute = timed(  # type: ignore[method-assign]
        sqlite3.Connection.execute, statement, SPENT, CALLS)


def write(path: str) -> None:
    data = {"cpu": SPAN["last"] - SPAN["first"], "spent": SPENT, "calls": CALLS}
    Path(f"{path}.{os.getpid()}").write_bytes(orjson.dumps(data))


def keep_writing(path: str) -> None:
    while True:
        time.sleep(1)
        write(path)


if __name__ == "__main__":
    from app.cli import main  # only to run `deliver`: bench/delivery_cpu.py imports the timers alone

    target = os.environ["STAGED_DELIVER_FILE"]
    install()
    atexit.register(write, target)
    threading.Thread(target=keep_writing, args=(target,), daemon=True).start()
    raise SystemExit(main(sys.argv[1:]))
