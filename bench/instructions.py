"""Instructions per request of segrelay's HTTP process, counted by valgrind (callgrind) under wrk.

CPU time on this machine moves by ±25 % within minutes; instructions executed do not. `segrelay serve` (delivery
off) runs its HTTP process under `valgrind --tool=callgrind` (its other processes natively); after a warm-up the
counts are zeroed (`callgrind_control -z`), wrk posts Order Completed events for all three vendors (returning
visitors, stitching on, or with `--screen` a screen call: the 501 floor) for `--seconds`, and the counts are dumped
(`callgrind_control -d`) and divided by the requests. Repeated runs of the same code agree within about 1-2 %
(how a turn's requests group varies); instructions are not time (cache misses, system calls), so a change is
confirmed with `bench/ab.py`. Needs valgrind (`apt-get install valgrind`). Give each tree as in `bench/ab.py`.

    python bench/instructions.py [TREE] [--store sqlite|redis] [--seconds 20] [--screen]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import ALL_VENDORS, ROOT, SECRET, RedisServer, basic, free_port, settings_header, wrk
from ingest import body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tree", nargs="?", default=str(ROOT), help="segrelay source tree (default: this checkout)")
    parser.add_argument("--store", choices=["sqlite", "redis"], default="sqlite")
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--screen", action="store_true", help="post screen calls (answered 501) instead")
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install valgrind)")
    tree = str(Path(args.tree).resolve())
    tmp = Path(tempfile.mkdtemp(prefix="segrelay-instructions-"))
    redis = RedisServer(tmp) if args.store == "redis" else None
    env = {**os.environ, "SEGRELAY_STORE": redis.url if redis else f"sqlite:///{tmp}/segrelay.db",
           "SEGRELAY_SECRET": SECRET, "SEGRELAY_DELIVERY": "off", "PYTHONPATH": tree, "PYTHONHASHSEED": "0",
           "SEGRELAY_MAX_QUEUE_MB": "100000", "SEGRELAY_MIN_FREE_DISK_MB": "0"}
    created = subprocess.run([sys.executable, "-m", "app", "keys", "create", "--tenant", "bench", "--json"],
                             env=env, cwd=tmp, capture_output=True, text=True, check=True)
    key = json.loads(created.stdout)["key"]
    port, out = free_port(), tmp / "callgrind.out"
    with open(tmp / "serve.log", "wb") as log:
        proc = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
                                 "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"serve under valgrind did not become ready (see {tmp / 'serve.log'})") from None
                time.sleep(0.5)
        headers = {"Authorization": basic(key), "Content-Type": "application/json",
                   "X-Segment-Settings": settings_header({**ALL_VENDORS, "identityStitching": True})}
        event = body("order_completed.json", "returning")
        if args.screen:
            event = event.replace('"type": "track"', '"type": "screen"')
        wrk(url, event, headers, seconds=10, connections=32)  # warm-up
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], capture_output=True, check=True)
        figures = wrk(url, event, headers, seconds=args.seconds, connections=32)
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], capture_output=True, check=True)
    finally:
        proc.terminate()
        proc.wait(120)
        if redis is not None:
            redis.kill()
    dumped = list(tmp.glob("callgrind.out.*"))  # the dump made by callgrind_control -d
    if not dumped:
        raise SystemExit("callgrind wrote no dump")
    summary = re.search(r"^(?:summary|totals): (\d+)", sorted(dumped)[0].read_text(), re.MULTILINE)
    if summary is None:
        raise SystemExit("no instruction total in the dump")
    requests = figures["rps"] * args.seconds
    kind = "screen (501)" if args.screen else "Order Completed (202)"
    print(f"{tree} {args.store} {kind}: {requests:.0f} requests, {figures['non_2xx']:.0f} not 2xx, "
          f"{int(summary.group(1)) / max(requests, 1):,.0f} instructions per request in the HTTP process")


if __name__ == "__main__":
    main()
