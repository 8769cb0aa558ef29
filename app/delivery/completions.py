"""Delivered postbacks, recorded in the store in batches while the next requests go out.

A request's connection slot is free as soon as the vendor has answered: the job joins this list and one store call
completes every job that joined since the last one. Waiting for that write inside the slot held each slot about
as long again as the request itself (10-16 ms per request in `bench/e2e.py`, mostly waiting for SQLite's write lock)
and made one store call per request instead of one per batch.

Nothing is lost by recording later: a job stays leased until its completion is written, so a crash before that
sends it once more when its lease runs out (at least once, as before). The list is bounded (by
SEGRELAY_VENDOR_CONCURRENCY): past it, a finished request waits for the next write, which slows delivery to the
store's pace instead of letting answered work pile up, and bounds what a `kill -9` sends twice to the requests on
the wire plus that many answered ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable

from app.store import Job, Store

log = logging.getLogger("segrelay.delivery")
MAX_BATCH = 32  # jobs per store call: each call is part of one short transaction, so an accept never waits long
RETRY_SECONDS = 0.5  # after a failed write, the next try


class Completions:
    def __init__(self, store: Store, clock: Callable[[], float], limit: int) -> None:
        self.store, self.clock, self.limit = store, clock, limit
        self._pending: list[tuple[Job, int | None]] = []
        self._writing: list[tuple[Job, int | None]] = []  # the batch being written now
        self._wake = asyncio.Event()
        self._written = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="completions")

    async def add(self, jobs: list[Job], status: int | None) -> None:
        """Record these jobs as delivered with the vendor's status, soon; waits only while the list is full."""
        self._pending.extend((job, status) for job in jobs)
        self._wake.set()
        while len(self._pending) >= self.limit and self._task is not None and not self._task.done():
            self._written.clear()
            await self._written.wait()

    def __len__(self) -> int:
        return len(self._pending)

    def holds(self, job: Job) -> bool:
        """The job is waiting here (or being written) to be recorded as delivered."""
        return any(held is job for held, _ in (*self._writing, *self._pending))

    async def stop(self) -> None:
        """Write what is left (one last try if the store fails; those jobs are sent again after their lease)."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while True:
            if not self._pending:
                if self._stopping:
                    return
                await self._wake.wait()
                self._wake.clear()
                continue
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            self._writing = batch
            try:
                unwritten = await self._write(batch)
            finally:
                self._writing = []
                self._written.set()
            if not unwritten:
                continue
            if self._stopping:
                log.error("could not record delivered postbacks; they are sent again when their lease ends",
                          extra={"postbacks": len(unwritten)})
                continue
            self._pending[:0] = unwritten
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wait_stopping(), RETRY_SECONDS)

    async def _write(self, batch: list[tuple[Job, int | None]]) -> list[tuple[Job, int | None]]:
        """Complete the batch, one store call per vendor status; returns what could not be written."""
        by_status: defaultdict[int | None, list[Job]] = defaultdict(list)
        for job, status in batch:
            by_status[status].append(job)
        now = self.clock()
        for status, jobs in list(by_status.items()):
            try:
                await self.store.complete(jobs, status=status, now=now)
            except Exception:
                log.exception("could not record delivered postbacks", extra={"postbacks": len(jobs)})
                return [(job, status) for status, jobs in by_status.items() for job in jobs]
            del by_status[status]
        return []

    async def _wait_stopping(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
