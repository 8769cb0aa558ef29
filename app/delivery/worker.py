"""The delivery worker: one dispatcher per vendor leases due jobs, renders their postbacks and sends them.

Each vendor has its own connection pool (see transport.py), concurrency limit, circuit breaker and Retry-After
pause, so one slow or failing vendor never delays another. Per (vendor, tenant) limits keep one customer's backlog
from taking every connection. A job is leased only when a connection slot is free for it, so a lease never runs
out while a job merely waits its turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag

from app import metrics
from app.config import Config
from app.crypto import Sealer
from app.delivery.breaker import CircuitBreaker
from app.delivery.completions import Completions
from app.delivery.policy import RetryPolicy, Verdict, classify, retry_after
from app.delivery.transport import MAX_BODY_KEPT, RequestRefused, SendFailed, Transport, transport_for
from app.outgoing import EncodedPostback, render
from app.store import ALL_TENANTS, Job, Store
from app.stored import Renderer
from handlers import VENDORS, Skip, Vendor

log = logging.getLogger("segrelay.delivery")
IDLE_POLL = 0.5  # seconds between looks at the queue when nothing woke us
READY_MIN, READY_MAX = 32, 1000  # jobs leased ahead per vendor, waiting in memory for a slot
# Jobs per lease, at most (a look past blocked tenants aside): on SQLite a lease reads and updates its rows while it
# holds the write lock that every accept waits for. Tracify's list (100 to a request) took up to 1,000 at once.
LEASE_MAX = 256
READY_PER_TENANT = 4  # a tenant's share of that list: this many times its concurrency (times the batch size)
TENANT_BACKOFF = 1.0  # a job past its tenant's share is due again this much later
PROBE_SECONDS = 1.0  # how often a vendor blocked on one tenant's limit looks for other tenants' jobs
PROBE_MAX_SECONDS = 8.0  # ... at the slowest, after looks that found none (their jobs not due yet)
PROBE_GRACE_SECONDS = 4.0  # ... but only once no look has found any for this long
PROBE_SIZE = 256  # jobs (times the batch size) such a look leases


@dataclass(slots=True)
class _Probe:
    """A vendor's looks past its blocked tenants' backlog: when it last looked, how often, which others it saw."""

    at: float = 0.0
    every: float = PROBE_SECONDS
    others: frozenset[str] = frozenset()
    found_at: float = 0.0  # when a look last found other tenants' jobs (or the others changed)


class Deliverer:
    def __init__(self, config: Config, store: Store, sealer: Sealer, *, transport: Transport | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config, self.store, self.sealer, self.clock = config, store, sealer, clock
        self.policy = RetryPolicy(config.retry_base_seconds, config.retry_max_seconds, config.give_up_seconds,
                                  config.give_up_min_attempts, config.max_attempts)
        self._own_transport = transport_for(config.http_client, concurrency=config.vendor_concurrency,
                                            connect_timeout=config.connect_timeout,
                                            read_timeout=config.read_timeout) if transport is None else None
        self.transport: Transport = transport or self._own_transport  # type: ignore[assignment]
        self.renderer = Renderer(sealer, every_vendor=store.leases_by_event)
        self.completions = Completions(store, clock, limit=config.vendor_concurrency)
        self.breakers = {v.slug: CircuitBreaker() for v in VENDORS}
        self.paused_until: dict[str, float] = defaultdict(float)  # Retry-After, per vendor host
        self._wake = {v.slug: asyncio.Event() for v in VENDORS}
        self._inflight: dict[str, set[asyncio.Task[None]]] = {v.slug: set() for v in VENDORS}
        self._ready: dict[str, list[tuple[float, Job]]] = {v.slug: [] for v in VENDORS}
        # Per vendor: the ready jobs' postbacks, rendered one after the other as soon as they are leased (or the
        # error that prevented it), by job id; a job's entry goes when it is sent or handed back.
        self._rendered: dict[str, dict[str, EncodedPostback | Skip | Exception]] = {v.slug: {} for v in VENDORS}
        self._probes = {v.slug: _Probe() for v in VENDORS}
        self._counted_at = 0.0  # when _tenants_queued was read from the store's counters
        self._tenants_queued: frozenset[str] = frozenset()
        self._tenant_inflight: Counter[tuple[str, str]] = Counter()
        self._dispatchers: list[asyncio.Task[None]] = []
        self._top_ups: dict[str, asyncio.Task[None]] = {}  # per vendor: the lease that tops its ready list up
        self._top_up_after: dict[str, float] = defaultdict(float)  # after a failed top-up, the next not before
        self._stopping = False

    # Life cycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._dispatchers = [asyncio.create_task(self._dispatch(v), name=f"dispatch-{v.slug}") for v in VENDORS]
        self.completions.start()

    def notify(self, vendor: str) -> None:
        self._wake[vendor].set()

    async def stop(self, drain_seconds: float) -> None:
        """Stop leasing, let in-flight sends finish for up to drain_seconds, hand the rest back."""
        self._stopping = True
        self.wake_all()
        await asyncio.gather(*self._dispatchers, *self._top_ups.values(), return_exceptions=True)
        waiting = [job for ready in self._ready.values() for _, job in ready]
        if waiting:  # leased ahead, never sent: due again at once, attempts unchanged
            with contextlib.suppress(Exception):
                await self.store.release(waiting, due_at=self.clock())
            for ready in self._ready.values():
                ready.clear()
        for rendered in self._rendered.values():  # of jobs handed back just now
            rendered.clear()
        inflight = [t for tasks in self._inflight.values() for t in tasks]
        if inflight:
            _, pending = await asyncio.wait(inflight, timeout=drain_seconds)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            log.info("in-flight sends ended", extra={"finished": len(inflight) - len(pending),
                                                      "handed_back": len(pending)})
        await self.completions.stop()
        if waiting:
            log.info("handed back postbacks leased ahead", extra={"postbacks": len(waiting)})
        if self._own_transport is not None:
            await self._own_transport.close()

    def wake_all(self) -> None:
        for event in self._wake.values():
            event.set()

    # Dispatch ---------------------------------------------------------------------------------------------

    async def _dispatch(self, vendor: Vendor) -> None:
        while not self._stopping:
            try:
                await self._dispatch_once(vendor)
            except Exception:
                log.exception("dispatcher error", extra={"vendor": vendor.slug})
                await asyncio.sleep(1.0)

    async def _dispatch_once(self, vendor: Vendor) -> None:
        """Start every request a free slot allows from the vendor's ready list, and have it topped up from the store.

        Jobs are leased a few slots' worth ahead and wait in memory for a slot of their tenant; one that waits
        longer than a third of its lease is handed back, so a lease never runs out while its job merely waits.
        The lease runs in a task of its own (one per vendor at a time), so requests that end meanwhile are replaced
        at once: a dispatcher that waited for its lease left its slots idle for as long as the store took to
        answer (SQLite's write lock held by another process, say).
        """
        slug, now = vendor.slug, self.clock()
        pause = max(self.breakers[slug].open_until, self.paused_until[slug])
        if pause > now or self._free(slug) <= 0:
            await self._idle(slug, min(pause - now, IDLE_POLL) if pause > now else IDLE_POLL)
            return
        started = self._start_ready(vendor)
        top_up = self._top_ups.get(slug)
        if (top_up is None or top_up.done()) and now >= self._top_up_after[slug]:
            self._top_ups[slug] = asyncio.create_task(self._top_up(vendor), name=f"top-up-{slug}")
        ready = self._ready[slug]
        stale_before = now - self.config.lease_seconds / 3
        stale = [job for at, job in ready if at < stale_before]
        if stale:
            self._ready[slug] = [(at, job) for at, job in ready if at >= stale_before]
            self._forget(slug, stale)
            await self.store.release(stale, due_at=now)
        if not started:  # nothing ready, or every ready job waits for its tenant: until a request or a lease ends
            await self._idle(slug, IDLE_POLL)

    async def _top_up(self, vendor: Vendor) -> None:
        """Lease enough to keep the vendor's ready list at its tenants' share (or, when every ready job waits for its
        tenant, look past them for other tenants' jobs), then wake the dispatcher."""
        slug = vendor.slug
        try:
            if await self._lease_more(vendor):
                self._wake[slug].set()
        except Exception:
            log.exception("dispatcher error", extra={"vendor": slug})
            self._top_up_after[slug] = self.clock() + 1.0
            self._wake[slug].set()

    async def _lease_more(self, vendor: Vendor) -> bool:
        slug, now = vendor.slug, self.clock()
        ready = self._ready[slug]
        batch_size = vendor.batch.max_size if vendor.batch else 1
        tenants = len({job.tenant for _, job in ready}) or 1
        share = max(READY_PER_TENANT * self._tenant_limit(tenants) * batch_size, READY_MIN)
        dispatchable = self._dispatchable(slug)
        probing = False
        blocked: set[str] = set()  # tenants a look passes over: only ever set when it looks
        wanted = min(READY_MAX - len(ready), share, LEASE_MAX) - dispatchable  # the list kept at the tenants' share
        if ready and dispatchable == 0:
            # Every ready job waits for its tenant while slots are free. Leasing more of the same would only churn;
            # at most once a second, when the counters show other tenants queued, look past the backlog for their
            # jobs (the blocked tenant's own go back for a moment).
            wanted = 0
            blocked = {job.tenant for _, job in ready}
            probe = self._probes[slug]
            if now - probe.at >= PROBE_SECONDS:
                others = await self._others_queued(blocked, now)
                if others != probe.others:  # a tenant came or went: look at the normal pace again
                    probe.others, probe.every, probe.found_at = others, PROBE_SECONDS, now
                if others and now - probe.at >= probe.every:
                    probe.at, probing = now, True
                    wanted = min(PROBE_SIZE * batch_size, READY_MAX - len(ready))
        if wanted <= 0 or self._stopping:
            return False
        # A look past blocked tenants takes another tenant's jobs from every delivery process's share of the
        # queue: the process whose share it is may be blocked on the same tenant, and look only a second later.
        leased = await self.store.lease(slug, now=now, limit=wanted, lease_seconds=self.config.lease_seconds,
                                        every_share=probing, skip_tenants=blocked)
        if probing:
            # Once no look has found another tenant's jobs for PROBE_GRACE_SECONDS (their jobs are not due:
            # retries waiting for their time, say), the looks come less and less often, up to PROBE_MAX_SECONDS
            # apart. One empty look is no such sign: another delivery process's look may have taken them first.
            found = any(job.tenant not in blocked for job in leased)
            if found:
                probe.found_at = now
            grace = now - probe.found_at < PROBE_GRACE_SECONDS
            probe.every = PROBE_SECONDS if grace else min(probe.every * 2, PROBE_MAX_SECONDS)
            if not found:
                # Only the blocked tenants' own jobs (from a store that cannot pass over them: Redis), most of
                # them from other delivery processes' shares: all go back at once, due as they were, unrendered.
                # Kept, they would wait here for slots their tenant cannot have, and their events would be opened
                # and parsed in two processes: with 1,000,000 postbacks of another tenant queued but not due,
                # delivery parsed each event 1.22 times instead of 1.04 and spent 18 % more CPU per event (README,
                # 0.13.17). SQLite's looks lease none of them (0.13.18).
                if leased:
                    await self.store.release(leased, due_at=now)
                return False
        self._ready[slug].extend((now, job) for job in leased)
        excess = self._beyond_tenant_share(slug, share)
        self._render_ahead(slug, leased, excess)
        if excess:
            # One tenant's backlog must not fill the list. With other tenants waiting, its excess goes back to the
            # store behind theirs; alone, it goes back as due as it was.
            alone = len({job.tenant for _, job in self._ready[slug]}) <= 1
            await self.store.release(excess, due_at=now if alone else now + TENANT_BACKOFF)
        return bool(leased)

    def _render_ahead(self, slug: str, leased: list[Job], excess: list[Job]) -> None:
        """Render the postbacks of the jobs just leased and kept, one after the other. Rendered inside each send's
        task instead, between one request's aiohttp calls and the next's, the same work took 1.1-1.4 times as long
        (the processor's caches: `Renderer.render` timed inside a delivery process), and delivery 11-12 % more CPU
        per event end to end (bench/HISTORY.md's 0.9.0 figures)."""
        self._forget(slug, excess)
        handed_back = {job.id for job in excess}
        rendered = self._rendered[slug]
        if len(rendered) > 4 * READY_MAX:  # never expected: every entry goes with its job; bounded all the same
            rendered.clear()
        for job in leased:
            if job.id not in handed_back:
                rendered[job.id] = self._render_one(job)

    def _render_one(self, job: Job) -> EncodedPostback | Skip | Exception:
        opened = self.renderer.opened
        try:
            return self.renderer.render(job)
        except Exception as exc:  # kept for the job's send, which dead-letters it with the reason
            return exc
        finally:
            if self.renderer.opened != opened:  # the stored event was opened and parsed for this job
                metrics.add(metrics.EVENTS_OPENED)

    def _forget(self, slug: str, jobs: list[Job]) -> None:
        """Jobs handed back unsent: their rendered postbacks go (a later lease renders them again)."""
        rendered = self._rendered[slug]
        for job in jobs:
            rendered.pop(job.id, None)

    def _free(self, slug: str) -> int:
        """The vendor's connection slots not in use."""
        return self.config.vendor_concurrency - len(self._inflight[slug])

    def _start_ready(self, vendor: Vendor) -> int:
        """Start the requests that the vendor's free slots and each tenant's limit allow from its ready list."""
        slug = vendor.slug
        ready, free = self._ready[slug], self._free(slug)
        if not ready or free <= 0:
            return 0
        requests, waiting = self._plan(vendor, [job for _, job in ready], free)
        if requests:
            leased_at = {id(job): at for at, job in ready}
            self._ready[slug] = [(leased_at[id(job)], job) for job in waiting]
        for group in requests:
            self._tenant_inflight[(slug, group[0].tenant)] += 1
            task = asyncio.create_task(self._deliver(vendor, group))
            self._inflight[slug].add(task)
            task.add_done_callback(self._inflight[slug].discard)
        return len(requests)

    async def _others_queued(self, tenants: set[str], now: float) -> frozenset[str]:
        """Tenants other than these with postbacks queued, from the store's byte counters (read at most once per
        PROBE_SECONDS for all vendors). With one tenant alone in the queue a probe would only lease its own jobs
        and hand them back: about a fifth of Redis's work in a one-tenant benchmark."""
        if now - self._counted_at >= PROBE_SECONDS:
            counts = await self.store.counts()
            self._counted_at = now
            self._tenants_queued = frozenset(tenant for tenant, size in counts.queued_bytes.items()
                                             if tenant != ALL_TENANTS and size > 0)
        return self._tenants_queued - tenants

    def _tenant_limit(self, tenants: int) -> int:
        """Requests in flight per (vendor, tenant). A tenant alone may use every slot but one tenant's share,
        which stays free for a newcomer; with others waiting, each keeps to SEGRELAY_TENANT_CONCURRENCY."""
        limit = self.config.tenant_concurrency
        return max(limit, self.config.vendor_concurrency - limit) if tenants <= 1 else limit

    def _dispatchable(self, slug: str) -> int:
        """Ready jobs that a free slot could take now."""
        ready = self._ready[slug]
        limit = self._tenant_limit(len({job.tenant for _, job in ready}))
        return sum(1 for _, job in ready if self._tenant_inflight[(slug, job.tenant)] < limit)

    def _beyond_tenant_share(self, slug: str, share: int) -> list[Job]:
        """Ready jobs past each tenant's share of the list (removed from it)."""
        kept: list[tuple[float, Job]] = []
        excess: list[Job] = []
        per_tenant: Counter[str] = Counter()
        for leased_at, job in self._ready[slug]:
            per_tenant[job.tenant] += 1
            (kept.append((leased_at, job)) if per_tenant[job.tenant] <= share else excess.append(job))
        self._ready[slug] = kept
        return excess

    def _plan(self, vendor: Vendor, jobs: Sequence[Job], free: int) -> tuple[list[list[Job]], list[Job]]:
        """Group ready jobs into requests within the vendor's free slots and each tenant's limit."""
        groups: dict[tuple[str, str], list[Job]] = {}
        singles: list[list[Job]] = []
        for job in jobs:
            if vendor.batch and job.batch_key:
                group = groups.setdefault((job.tenant, job.batch_key), [])
                if len(group) >= vendor.batch.max_size:
                    singles.append(group)
                    group = groups[(job.tenant, job.batch_key)] = []
                group.append(job)
            else:
                singles.append([job])
        candidates = singles + list(groups.values())
        planned: list[list[Job]] = []
        waiting: list[Job] = []
        tenants = Counter(self._tenant_inflight)
        limit = self._tenant_limit(len({j.tenant for j in jobs}))
        for group in candidates:
            key = (vendor.slug, group[0].tenant)
            if len(planned) < free and tenants[key] < limit:
                planned.append(group)
                tenants[key] += 1
            else:
                waiting.extend(group)
        return planned, waiting

    async def _idle(self, slug: str, seconds: float) -> None:
        event = self._wake[slug]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=max(seconds, 0.01))
        event.clear()

    # One request ------------------------------------------------------------------------------------------

    async def _deliver(self, vendor: Vendor, jobs: list[Job]) -> None:
        slug = vendor.slug
        try:
            await self._attempt(vendor, jobs)
        except asyncio.CancelledError:
            # Shutdown while sending: hand the jobs back without counting an attempt (not those already answered
            # and waiting to be recorded as delivered).
            self._forget(slug, jobs)
            unanswered = [job for job in jobs if not self.completions.holds(job)]
            with contextlib.suppress(Exception):
                await asyncio.shield(self.store.release(unanswered, due_at=self.clock()))
            raise
        except Exception:
            # Most likely the store failed to record the outcome. Hand the jobs back if it can; if not, their
            # lease expires and they are sent again (at least once, never lost).
            log.exception("delivery error", extra={"vendor": slug})
            self._forget(slug, jobs)
            with contextlib.suppress(Exception):
                await self.store.release(jobs, due_at=self.clock() + self.config.retry_base_seconds)
        finally:
            key = (slug, jobs[0].tenant)
            self._tenant_inflight[key] -= 1
            if self._tenant_inflight[key] <= 0:
                del self._tenant_inflight[key]
            self._wake[slug].set()

    async def _attempt(self, vendor: Vendor, jobs: list[Job]) -> None:
        slug = vendor.slug
        jobs, postbacks = await self._render(slug, jobs)
        if not jobs:
            return
        try:
            request = render(vendor, postbacks, self.config.vendor_urls[slug])
        except (ValueError, TypeError, UnicodeError) as exc:
            await self._refused(slug, jobs, f"{type(exc).__name__} while building the request")
            return
        started = time.monotonic()
        status: int | None = None
        connect_error = False
        try:
            answer = await self.transport(slug, request)
            status, body = answer.status, answer.body[:MAX_BODY_KEPT].decode("utf-8", "replace")
            succeeded = vendor.success(status, answer.body)
            pause = retry_after(answer.retry_after, self.clock())
        except RequestRefused as exc:
            await self._refused(slug, jobs, str(exc))
            return
        except SendFailed as exc:
            connect_error = exc.connect
            succeeded, pause, body = False, None, str(exc)
        metrics.observe(metrics.labelled(metrics.VENDOR_SECONDS, slug), time.monotonic() - started)
        verdict = classify(status, succeeded)
        now = self.clock()
        self.breakers[slug].record(now, ok=verdict is not Verdict.RETRY, connect_error=connect_error)
        if verdict is Verdict.DELIVERED:
            await self.completions.add(jobs, status)
            metrics.add(metrics.labelled(metrics.POSTBACKS, slug, "delivered"), len(jobs))
            if log.isEnabledFor(logging.DEBUG):
                log.debug("delivered", extra={**_described(slug, status, jobs), "outcome": "delivered"})
            return
        extra = _described(slug, status, jobs)
        if verdict is Verdict.DEAD:
            await self._bury(slug, jobs, status, body)
            log.warning("dead-lettered: vendor refused the postback", extra={**extra, "outcome": "dead"})
            return
        if pause is not None:
            self.paused_until[slug] = max(self.paused_until[slug], now + pause)
        for job in jobs:
            attempts = job.attempts + 1
            if self.policy.exhausted(attempts, now - job.created_at):
                await self._bury(slug, [job], status, body)
                log.warning("dead-lettered: retries exhausted", extra={**extra, "outcome": "dead"})
            else:
                delay = max(self.policy.backoff(attempts), pause or 0.0)
                await self.store.retry(job, due_at=now + delay, status=status, body=body)
                metrics.labelled(metrics.POSTBACKS, slug, "retried").inc()
                log.info("retry scheduled", extra={**extra, "outcome": "retried", "delay_seconds": round(delay, 3)})

    async def _render(self, slug: str, jobs: list[Job]) -> tuple[list[Job], list[EncodedPostback]]:
        """The postbacks of the jobs that can still be built; the others are dead-lettered with the reason."""
        sendable: list[Job] = []
        postbacks: list[EncodedPostback] = []
        rendered = self._rendered[slug]
        for job in jobs:
            outcome = rendered.pop(job.id, None)
            if outcome is None:  # leased before this process rendered ahead, or handed back and leased again
                outcome = self._render_one(job)
            if isinstance(outcome, InvalidTag):
                await self._bury(slug, [job], None,
                                 "stored payload cannot be decrypted: was SEGRELAY_SECRET changed?")
                continue
            if isinstance(outcome, Exception):  # a stored event that no longer builds: a dead letter, never a retry
                log.error("could not build a postback", exc_info=outcome,
                          extra={"vendor": slug, "message_ids": [job.message_id]})
                await self._bury(slug, [job], None, f"segrelay could not build this postback from the stored event: "
                                                    f"{type(outcome).__name__}")
                continue
            if isinstance(outcome, EncodedPostback):
                sendable.append(job)
                postbacks.append(outcome)
            else:
                await self._bury(slug, [job], None, f"not sent: {outcome.reason}")
        return sendable, postbacks

    async def _refused(self, slug: str, jobs: list[Job], why: str) -> None:
        """Our own client will not send it: a dead letter with the reason, not a vendor failure (the circuit
        and the other tenants are untouched) and never an endless retry."""
        await self._bury(slug, jobs, None, f"segrelay could not send this request: {why}")
        log.warning("dead-lettered: request refused by the HTTP client", extra={"vendor": slug,
                                                                                 "postbacks": len(jobs)})

    async def _bury(self, slug: str, jobs: list[Job], status: int | None, body: str) -> None:
        """Dead-letter jobs with the vendor's answer (or what went wrong) kept."""
        now = self.clock()
        for job in jobs:
            await self.store.bury(job, now=now, status=status, body=body)
        metrics.labelled(metrics.POSTBACKS, slug, "dead").inc(len(jobs))


def _described(slug: str, status: int | None, jobs: list[Job]) -> dict[str, object]:
    """A request's log fields (built only for a line that is written)."""
    return {"vendor": slug, "status": status, "postbacks": len(jobs), "attempt": jobs[0].attempts + 1,
            "message_ids": [job.message_id for job in jobs[:20]]}
