"""Translation cost per event, in a tight loop: what the accept path does (parse, route, pack and seal the event
once) and what delivery does (open, parse again, build and render each vendor's postbacks).

    python bench/translate.py [--fixture order_completed.json] [--n 5000]

The first rows repeat one event (its parse stays cached in the CPU, and the build rows reuse one parsed event, whose
products are read once). The last rows are what a delivery process does: its Renderer turning the jobs of --n
distinct stored events into requests, once in event order (each event parsed once for its four postbacks) and once
in vendor order (every vendor's jobs in turn, as the vendors' queues drift apart under load), and in vendor order
with `every_vendor` (SQLite's delivery: an event's first job builds all its vendors' postbacks, kept encoded).

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
from app.outgoing import EncodedPostback, render
from app.settings import decode_header, from_header, resolve
from app.store import Job
from app.stored import Renderer, pack_event, unpack_event
from app.translate import active_vendors, route, translate
from handlers import BY_SLUG, Postback


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
    settings_json = orjson.dumps(dict(settings))
    sealed = sealer.seal(pack_event(settings_json, now.timestamp(), raw, "key"))
    urls = {vendor.slug: "http://127.0.0.1:9" for vendor in vendors}

    def accept() -> bytes:
        parsed = parse_event(orjson.loads(raw), raw, now)
        route(parsed, from_header(header), vendors)
        return sealer.seal(pack_event(settings_json, now.timestamp(), raw, "key"))

    def reopen() -> Any:
        stored = unpack_event(sealer.open(sealed))
        return parse_event(orjson.loads(stored.body), stored.body, now)

    def build_and_render() -> None:
        for vendor in vendors:
            for outcome in vendor.build(event, settings):
                if isinstance(outcome, Postback):
                    render(BY_SLUG[outcome.vendor], [outcome], urls[outcome.vendor])

    def stored_jobs() -> list[Job]:
        """The jobs of --n distinct events as the accept path stores them (each event its own ids and order id)."""
        jobs = []
        for i in range(args.n):
            distinct = {**document, "messageId": f"m-{i}",
                        "properties": {**document.get("properties", {}), "order_id": f"o-{i}"}}
            body = orjson.dumps(distinct)
            parsed = parse_event(orjson.loads(body), body, now)
            payload = sealer.seal(pack_event(settings_json, now.timestamp(), body, "key"))
            for target in route(parsed, settings, vendors).targets:
                jobs.append(Job(str(len(jobs)), str(i), target.vendor, target.target, "t", f"m-{i}", "Order Completed",
                                target.batch_key, payload, 0, now.timestamp(), len(payload)))
        return jobs

    def per_event_rendering_us(jobs: list[Job], every_vendor: bool = False) -> float:
        best = float("inf")
        for _ in range(3):
            renderer = Renderer(sealer, every_vendor=every_vendor)
            started = time.perf_counter()
            for job in jobs:
                postback = renderer.render(job)
                assert isinstance(postback, EncodedPostback)
                render(BY_SLUG[job.vendor], [postback], urls[job.vendor])
            best = min(best, (time.perf_counter() - started) / args.n * 1e6)
        return best

    jobs = stored_jobs()
    rows = [
        ("orjson.loads (reference)", per_call_us(lambda: orjson.loads(raw), args.n)),
        ("settings decode, uncached", per_call_us(lambda: resolve(decode_header(header)), args.n)),
        ("settings decode, cached", per_call_us(lambda: from_header(header), args.n)),
        ("parse + normalise event", per_call_us(lambda: parse_event(orjson.loads(raw), raw, now), args.n)),
        ("route, 3 vendors", per_call_us(lambda: route(event, settings, vendors), args.n)),
        ("accept: parse, route, seal", per_call_us(accept, args.n)),
        ("delivery: open + parse", per_call_us(reopen, args.n)),
        ("delivery: build + render", per_call_us(build_and_render, args.n)),
        ("renderer, event order", per_event_rendering_us(jobs)),
        ("renderer, vendor order", per_event_rendering_us(sorted(jobs, key=lambda job: job.vendor))),
        ("renderer, every vendor", per_event_rendering_us(sorted(jobs, key=lambda job: job.vendor), True)),
    ]
    print(f"\nTranslation cost, {args.fixture}, {len(translation.postbacks)} postbacks, best of 3 x {args.n}")
    for name, us in rows:
        print(f"{name:<28}{us:>9.1f} µs")
    print(f"(renderer rows: per event, {len(jobs) // args.n} postbacks each, {args.n} distinct events)")

if __name__ == "__main__":
    main()
