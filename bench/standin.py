"""A fast vendor stand-in for benchmarks: raw asyncio HTTP/1.1 on uvloop, in its own process.

It answers every POST at once (200, `{"status": true}`, keep-alive) and counts each postback by the unique order id
the benchmark puts in every event (`bench-...`), per vendor path, so duplicates and losses are exact. A Tracify
batch counts each of its events. POST /_reset forgets them; GET /_count returns them as JSON:
{"requests": n, "postbacks": {"<kind>": {"<order id>": times}}, "first": t0, "last": t1, "arrivals": [t, ...],
"last_by_kind": {"<kind>": t}}

    python bench/standin.py --port N
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from collections import Counter, defaultdict

import orjson

ORDER = re.compile(rb"bench-[0-9]+-[0-9]+")
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 16\r\n\r\n{\"status\": true}"


class Tally:
    def __init__(self) -> None:
        self.requests = 0
        self.postbacks: dict[str, Counter[bytes]] = defaultdict(Counter)
        self.first = self.last = 0.0
        self.arrivals: list[float] = []  # when each postback arrived (a Tracify batch: each of its events)
        self.last_by_kind: dict[str, float] = {}  # when each kind of postback last arrived: which vendor drains last


TALLY = Tally()


def kind_of(path: bytes) -> str:
    for marker, kind in ((b"/track", "segmentstream_track"), (b"/ds/", "segmentstream_data_stream"),
                         (b"/api/v1/events", "tracify"), (b"pixel", "audiohook")):
        if marker in path:
            return kind
    return "other"


class StandIn(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end]
            match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            length = int(match.group(1)) if match else 0
            if len(self.buffer) < head_end + 4 + length:
                return
            body = self.buffer[head_end + 4: head_end + 4 + length]
            self.buffer = self.buffer[head_end + 4 + length:]
            self.handle(head, body)

    def handle(self, head: bytes, body: bytes) -> None:
        path = head.split(b" ", 2)[1]
        if head.startswith(b"POST /_reset"):
            TALLY.__init__()  # type: ignore[misc]
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            return
        if head.startswith(b"GET /_count"):
            answer = orjson.dumps({"requests": TALLY.requests, "first": TALLY.first, "last": TALLY.last,
                                   "arrivals": TALLY.arrivals, "last_by_kind": TALLY.last_by_kind,
                                   "postbacks": {k: {o.decode(): n for o, n in c.items()}
                                                 for k, c in TALLY.postbacks.items()}})
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                                 + str(len(answer)).encode() + b"\r\n\r\n" + answer)
            return
        now = time.time()
        TALLY.requests += 1
        TALLY.first = TALLY.first or now
        TALLY.last = now
        counter = TALLY.postbacks[kind_of(path)]
        TALLY.last_by_kind[kind_of(path)] = now
        orders = ORDER.findall(body)
        # One postback per request, naming its order once or twice; a Tracify batch names each of its events.
        for order in orders if kind_of(path) == "tracify" else set(orders):
            counter[order] += 1
            TALLY.arrivals.append(now)
        self.transport.write(OK)


async def main(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(StandIn, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    try:
        import uvloop
    except ImportError:
        asyncio.run(main(port))
    else:
        uvloop.run(main(port))
