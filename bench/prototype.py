"""Accept-path floors: the least a durable accept can do under segrelay's uvicorn, and segrelay's steps added to it.

Issue 9 asks for an accept path at 0.4x of bare Starlette. This measures, in one run and against the bare Starlette
app of bench/ingest.py, a prototype that reads the body, parses its JSON, checks the call type and commits one row per
event (SQLite WAL, synchronous=FULL, group commit on a writer thread) before answering 202; then the same prototype
with one of segrelay's steps added (bench/prototype_app.py says what each variant adds). Server CPU per request is
the prototype process's, from /proc. The same Order Completed body and headers as bench/ingest.py, wrk on loopback.

    python bench/prototype.py [--variants min,parse,schema,seal,parse+schema+seal] [--rounds 1] [--seconds 6]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import ALL_VENDORS, ROOT, cpu_seconds, free_port, settings_header, start, stop, wrk
from ingest import UVICORN, body

STEPS = {"parse": "PROTOTYPE_PARSE", "schema": "PROTOTYPE_SCHEMA", "seal": "PROTOTYPE_SEAL"}


def run(app: str, tmp: Path, env: dict[str, str], args: argparse.Namespace) -> dict[str, float]:
    port = free_port()
    proc = start([sys.executable, *UVICORN, "--port", str(port), "--app-dir", str(ROOT / "bench"), app],
                 {"PYTHONPATH": str(ROOT), **env}, f"http://127.0.0.1:{port}/healthz", tmp / "server.log")
    try:
        url = f"http://127.0.0.1:{port}"
        event = body("order_completed.json", "unique")
        headers = {"Authorization": "Basic eDo=", "X-Segment-Settings": settings_header(ALL_VENDORS),
                   "Content-Type": "application/json"}
        wrk(url, event, headers, seconds=2, connections=args.connections)  # warm-up
        before = cpu_seconds(proc.pid)
        figures = wrk(url, event, headers, seconds=args.seconds, connections=args.connections)
        figures["cpu_us"] = (cpu_seconds(proc.pid) - before) / max(figures["requests"], 1) * 1e6
        if figures["non_2xx"]:
            raise SystemExit(f"{app} {env}: {figures['non_2xx']:.0f} answers were not 2xx; see {tmp / 'server.log'}")
        return figures
    finally:
        stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="min,parse,schema,seal,parse+schema+seal",
                        help="comma-separated: min, or steps joined by + (parse, schema, seal)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for variant in variants:
        unknown = [step for step in variant.split("+") if step not in STEPS and step != "min"]
        if unknown:
            parser.error(f"unknown step {unknown[0]!r} in {variant!r}: min, parse, schema or seal")
    print(f"POST /segment, Order Completed for all 3 vendors, wrk -c{args.connections} -d{args.seconds}s")
    with tempfile.TemporaryDirectory() as raw_tmp:
        tmp = Path(raw_tmp)
        for round_ in range(args.rounds):
            bare = run("bare_app:app", tmp, {}, args)
            print(f"round {round_ + 1}: bare Starlette {bare['rps']:,.0f} req/s at {bare['cpu_us']:.0f} us")
            for index, variant in enumerate(variants):
                env = {STEPS[step]: "1" for step in variant.split("+") if step in STEPS}
                env["PROTOTYPE_DATABASE"] = str(tmp / f"prototype-{round_}-{index}.db")
                figures = run("prototype_app:app", tmp, env, args)
                print(f"  {variant:<20} {figures['rps']:>9,.0f} req/s  {figures['rps'] / bare['rps']:.2f}x bare "
                      f"Starlette  {figures['cpu_us']:>4.0f} us per request  p99 {figures['p99_ms']:.1f} ms")


if __name__ == "__main__":
    main()
