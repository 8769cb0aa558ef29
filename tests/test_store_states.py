"""Property-based: random sequences of queue operations keep each store in step with a simple model."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import redis as redis_lib
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from app.store import Job, NewJob, Store, open_store

VENDORS = ["tracify", "audiohook"]
LEASE = 1000.0  # leases never expire during a run: expiry has its own tests


class QueueMachine(RuleBasedStateMachine):
    url = ""

    @initialize()
    def open(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.store: Store = open_store(self.url, consumer="machine")
        self.now = time.time()
        self.seen: set[str] = set()
        self.state: dict[str, str] = {}  # job tag (its target) -> due | leased | later | dead
        self.due_at: dict[str, float] = {}
        self.attempts: dict[str, int] = {}
        self.held: dict[str, Job] = {}
        self.size: dict[str, int] = {}

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        if hasattr(self, "store"):
            self.run(self.store.close())
            self.loop.close()

    @rule(message=st.sampled_from([f"m{i}" for i in range(8)]), count=st.integers(1, 3))
    def accept(self, message: str, count: int) -> None:
        jobs = [NewJob(VENDORS[i % 2], f"{message}:{i}:{len(self.state)}", "e", "") for i in range(count)]
        payload = message.encode() * count
        async def accepted() -> bool:  # on the running loop: a store's accept is its pipelined answer's future
            return await self.store.accept("acme", message, payload, jobs, now=self.now, ttl=10_000)

        fresh = self.run(accepted())
        assert fresh == (message not in self.seen)
        self.seen.add(message)
        if fresh:
            for j in jobs:
                self.state[j.target], self.due_at[j.target], self.attempts[j.target] = "due", self.now, 0
                self.size[j.target] = len(payload)

    @rule(vendor=st.sampled_from(VENDORS), limit=st.integers(1, 5))
    def lease(self, vendor: str, limit: int) -> None:
        leased = self.run(self.store.lease(vendor, now=self.now, limit=limit, lease_seconds=LEASE))
        due = [p for p, s in self.state.items() if s in ("due", "later") and self.due_at[p] <= self.now
               and p.split(":")[1] in (("0", "2") if vendor == "tracify" else ("1",))]
        assert len(leased) == min(limit, len(due))
        for job in leased:
            assert job.target in due and job.vendor == vendor
            assert job.attempts == self.attempts[job.target]
            assert job.payload == job.message_id.encode() * (len(job.payload) // len(job.message_id))
            self.state[job.target] = "leased"
            self.held[job.target] = job

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data(), action=st.sampled_from(["complete", "retry", "release", "bury"]))
    def finish(self, data: st.DataObject, action: str) -> None:
        payload = data.draw(st.sampled_from(sorted(self.held)))
        job = self.held.pop(payload)
        if action == "complete":
            self.run(self.store.complete([job]))
            del self.state[payload]
        elif action == "retry":
            self.run(self.store.retry(job, due_at=self.now + 10, status=503, body="busy"))
            self.state[payload], self.due_at[payload] = "later", self.now + 10
            self.attempts[payload] += 1
        elif action == "release":
            self.run(self.store.release([job], due_at=self.now))
            self.state[payload], self.due_at[payload] = "due", self.now
        else:
            self.run(self.store.bury(job, now=self.now, status=400, body="no"))
            self.state[payload] = "dead"
            self.attempts[payload] += 1

    @rule()
    def replay(self) -> None:
        dead = [p for p, s in self.state.items() if s == "dead"]
        assert self.run(self.store.replay(None, now=self.now)) == len(dead)
        for p in dead:
            self.state[p], self.due_at[p], self.attempts[p] = "due", self.now, 0

    @rule(seconds=st.sampled_from([1.0, 11.0]))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @invariant()
    def counts_match(self) -> None:
        if not hasattr(self, "store"):
            return
        counts = self.run(self.store.counts())
        live = [p for p, s in self.state.items() if s != "dead"]
        assert sum(counts.pending.values()) == len(live)
        assert counts.queued_bytes.get("*", 0) == sum(self.size[p] for p in live)
        assert sum(counts.dead.values()) == sum(1 for s in self.state.values() if s == "dead")
        stats = self.run(self.store.stats(now=self.now))
        for vendor in VENDORS:
            index = ("0", "2") if vendor == "tracify" else ("1",)
            mine = {p: s for p, s in self.state.items() if p.split(":")[1] in index}
            got = stats.vendors.get(vendor)
            dead = got.dead if got else 0
            leased = got.leased if got else 0
            assert dead == sum(1 for s in mine.values() if s == "dead")
            assert leased == sum(1 for s in mine.values() if s == "leased")


def test_queue_state_machine(store_url: str, tmp_path: Path) -> None:
    counter = iter(range(10_000))

    class Machine(QueueMachine):
        @initialize()
        def open(self) -> None:
            if store_url.startswith("sqlite"):
                self.url = f"sqlite:///{tmp_path / f'machine-{next(counter)}.db'}"
            else:
                redis_lib.Redis.from_url(store_url).flushdb()
                self.url = store_url
            super().open()

    Machine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
    Machine.TestCase().runTest()
