"""Shared pieces of the benchmarks: processes on loopback, wrk runs and their parsing."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import (  # noqa: E402
    ALL_VENDORS,
    SECRET,
    RedisServer,
    VendorStub,
    _wait_http,
    basic,
    child_pids,
    command,
    free_port,
    role,
    settings_header,
    unix_listening,
)

__all__ = ["ALL_VENDORS", "SECRET", "RedisServer", "VendorStub", "basic", "child_pids", "command", "free_port",
           "role", "settings_header", "unix_listening"]


def http_and_delivery_pids(pid: int) -> tuple[list[int], list[int]]:
    """`segrelay serve`'s accept side (itself, its serve-http children and, on SQLite, the accept writer that stores
    what they accept) and its delivery processes."""
    children = child_pids(pid)
    return ([pid, *(c for c in children if role(c) in ("serve-http", "accept-writer"))],
            [c for c in children if role(c) == "deliver"])

WRK_SCRIPT = """
math.randomseed(os.time() * 1000 + math.floor(os.clock() * 1000000))  -- unique ids in every run
local counter = 0
local prefix = ""
local head, pieces, slots = "", {}, {}
function setup(thread)
  thread:set("tid", string.format("%010d", math.random(1, 1000000000)))
end
function init(args)
  prefix = tid
  -- Every id has a fixed width, so every request has the same length: the request line and headers are formatted
  -- once, and a request is the body's constant pieces joined with this request's ids (no pattern search per
  -- request: wrk's CPU is taken from the same two cores as the server's).
  local sample = string.gsub(wrk.body, "__MESSAGE_ID__", (RANDOM_IDS and "00000000-" or "") .. "bench-" .. prefix
                              .. "-0000000000")
  sample = string.gsub(sample, "__VISITOR__", "0000")
  local request = wrk.format("POST", "/segment", wrk.headers, sample)
  head = string.sub(request, 1, #request - #sample)
  local at = 1
  while true do
    local m_start, m_end = string.find(wrk.body, "__MESSAGE_ID__", at, true)
    local v_start, v_end = string.find(wrk.body, "__VISITOR__", at, true)
    local s, e, kind = m_start, m_end, "m"
    if v_start and (not m_start or v_start < m_start) then s, e, kind = v_start, v_end, "v" end
    if not s then break end
    pieces[#pieces + 1] = string.sub(wrk.body, at, s - 1)
    slots[#slots + 1] = kind
    at = e + 1
  end
  pieces[#pieces + 1] = string.sub(wrk.body, at)
end
function request()
  counter = counter + 1
  -- Analytics libraries make random messageIds (uuid4, md5 hex): each lands on a random page of the store's
  -- idempotency index. Random first, then what the stand-in counts each postback by (bench/standin.py), unique.
  local message_id = "bench-" .. prefix .. "-" .. string.format("%010d", counter)
  if RANDOM_IDS then
    message_id = string.format("%04x%04x-", math.random(0, 65535), math.random(0, 65535)) .. message_id
  end
  local visitor = string.format("%04d", counter % 2000)  -- a pool of 2,000 returning visitors
  local parts = {head}
  for i = 1, #slots do
    parts[#parts + 1] = pieces[i]
    parts[#parts + 1] = slots[i] == "m" and message_id or visitor
  end
  parts[#parts + 1] = pieces[#pieces]
  return table.concat(parts)
end
"""


def require_wrk() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        sys.exit("wrk is not installed: apt-get install -y wrk")
    return wrk


def wrk(url: str, body: str, headers: dict[str, str], *, seconds: int, connections: int,
        threads: int = 1, ids: str = "random") -> dict[str, float]:
    """Run wrk against url/segment with a unique messageId per request; req/s and latency percentiles in ms.
    `ids`: "random" as analytics libraries make them (a random place in the idempotency index for each), or "counted"
    (each next to the one before: what the benchmarks sent before 0.13.17, which flattered SQLite's writer)."""
    wrk_cpu_before = _children_cpu()  # wrk is the only child that ends meanwhile: its CPU is the difference
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        lines = [f"RANDOM_IDS = {'true' if ids == 'random' else 'false'}", WRK_SCRIPT,
                 f"wrk.method = 'POST'\nwrk.body = {json.dumps(body)}"]
        lines += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
        script.write_text("\n".join(lines))
        out = subprocess.run([require_wrk(), f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency",
                              "-s", str(script), url + "/segment"], capture_output=True, text=True,
                             check=True).stdout
    figures = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "99"):
        match = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out)
        assert match, out
        value, unit = float(match.group(1)), match.group(2)
        figures[f"p{pct}_ms"] = value / 1000 if unit == "us" else value * 1000 if unit == "s" else value
    figures["requests"] = float(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    figures["wrk_cpu_s"] = _children_cpu() - wrk_cpu_before
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    figures["non_2xx"] = float(non2xx.group(1)) if non2xx else 0.0
    return figures


def user_system_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time of a process so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc."""
    return sum(user_system_seconds(pid))


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def scheduler_seconds(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of all the process's threads so far, from
    /proc/<pid>/task/*/schedstat."""
    running = waiting = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            on_cpu, queued, _ = (task / "schedstat").read_text().split()
            running, waiting = running + int(on_cpu), waiting + int(queued)
    return running / 1e9, waiting / 1e9


def machine_idle_seconds() -> float:
    """CPU-seconds every core of the machine spent idle (or waiting for the disk) so far, from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")


def add_ids_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ids", choices=["random", "counted"], default="random",
                        help="messageIds: random as analytics libraries make them (the default), or counted up as the "
                             "benchmarks sent them before 0.13.17")


def add_rdbcompression_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rdbcompression", choices=["no", "yes"], default="no",
                        help="Redis's rdbcompression: no as the README recommends (the default here), yes as Redis's "
                             "own default")


def redis_server(home: Path, args: argparse.Namespace) -> RedisServer:
    """A private redis-server in `home` (AOF, appendfsync always) with the run's `--rdbcompression`."""
    return RedisServer(home, ("--rdbcompression", args.rdbcompression))


def start(args: list[str], env: dict[str, str], ready: str, log: Path) -> subprocess.Popen[bytes]:
    handle = open(log, "wb")  # noqa: SIM115
    proc = subprocess.Popen(args, env={**os.environ, **env}, stdout=handle, stderr=subprocess.STDOUT, cwd=log.parent)
    _wait_http(ready, proc)
    return proc


def serve_segrelay(tmp: Path, env: dict[str, str], entry: list[str] | None = None
                   ) -> tuple[subprocess.Popen[bytes], str, str]:
    """`segrelay serve` as shipped, on a free port, with a key of its own: (process, base url, key). `entry`: what
    runs instead of `-m app` (a wrapper such as bench/staged_accept.py)."""
    port = free_port()
    created = subprocess.run([sys.executable, "-m", "app", "keys", "create", "--tenant", "bench", "--json"],
                             env={**os.environ, **env}, cwd=tmp, capture_output=True, text=True, check=True)
    url = f"http://127.0.0.1:{port}"
    proc = start([sys.executable, *(entry or ["-m", "app"]), "serve", "--host", "127.0.0.1", "--port", str(port)], env,
                 f"{url}/readyz", tmp / "segrelay.log")
    return proc, url, json.loads(created.stdout)["key"]


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(30)


def print_table(title: str, rows: list[tuple[str, dict[str, Any]]]) -> None:
    print(f"\n{title}")
    print(f"{'':<28}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'non-2xx':>10}")
    for name, f in rows:
        print(f"{name:<28}{f['rps']:>10.0f}{f['p50_ms']:>10.2f}{f['p99_ms']:>10.2f}{f['non_2xx']:>10.0f}")
