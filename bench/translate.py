"""Translation cost per event: parse + normalise, then build the postbacks of all three vendors.

    python bench/translate.py [--fixture order_completed.json] [--n 5000]

Reference measured in the same run: orjson.loads of the same body (the least any parser must do).
"""

from __future__ import annotations

import argparse
import base64
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from common import ALL_VENDORS, ROOT

from app.crypto import Sealer
from app.event import parse_event
from app.outgoing import pack
from app.settings import decode_header, from_header, resolve
from app.translate import active_vendors, translate


def per_call_us(fn: Callable[[], Any], n: int) -> float:
    for _ in range(min(n, 200)):
        fn()
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - started) / n * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixture", default="order_completed.json")
    parser.add_argument("--n", type=int, default=5000)
    args = parser.parse_args()
    raw = (ROOT / "tests/fixtures/segment" / args.fixture).read_bytes()
    header = base64.b64encode(orjson.dumps(ALL_VENDORS)).decode()
    now = datetime.now(UTC)
    document = orjson.loads(raw)
    settings = resolve(decode_header(header))
    vendors = active_vendors(settings)
    event = parse_event(document, raw, now)
    translation = translate(event, settings, vendors)
    sealer = Sealer(b"x" * 40)

    rows = [
        ("orjson.loads (reference)", per_call_us(lambda: orjson.loads(raw), args.n)),
        ("settings decode, uncached", per_call_us(lambda: resolve(decode_header(header)), args.n)),
        ("settings decode, cached", per_call_us(lambda: from_header(header), args.n)),
        ("parse + normalise event", per_call_us(lambda: parse_event(orjson.loads(raw), raw, now), args.n)),
        ("translate, 3 vendors", per_call_us(lambda: translate(event, settings, vendors), args.n)),
        ("pack + seal postbacks", per_call_us(lambda: [sealer.seal(pack(p)) for p in translation.postbacks],
                                              args.n)),
    ]
    full = per_call_us(lambda: [sealer.seal(pack(p)) for p in translate(
        parse_event(orjson.loads(raw), raw, now), from_header(header), vendors).postbacks], args.n)
    print(f"\nTranslation cost, {args.fixture}, {len(translation.postbacks)} postbacks, best of 3 x {args.n}")
    for name, us in rows:
        print(f"{name:<28}{us:>9.1f} µs")
    print(f"{'all of it, per event':<28}{full:>9.1f} µs  (as the service does it: settings cached)")


if __name__ == "__main__":
    main()
