"""The delivery side as a whole: the store, the dispatchers and their upkeep, in whatever process runs them.

`segrelay serve` runs it in its own process (`segrelay deliver`, started and watched by the HTTP process; see
app/supervisor.py), so sending uses the second core while the first answers Segment. With
`SEGRELAY_DELIVERY_PROCESSES=0` it runs inside the HTTP process instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time

from app import metrics
from app.config import Config
from app.crypto import Sealer
from app.delivery.worker import Deliverer
from app.process import die_with_parent, lower_priority, tune_garbage_collector
from app.store import Store, StoreUnavailableError, check_durability, open_store
from handlers import VENDORS

log = logging.getLogger("segrelay.delivery")
HOUSEKEEPING_SECONDS = 1.0
STORE_RETRY_SECONDS = 1.0


class DeliveryService:
    def __init__(self, config: Config, store: Store | None = None, *, slot: int | None = None) -> None:
        self.config = config
        # A delivery process's own writes need no fsync: losing its last completions to a power cut only means
        # sending them again (at least once); an accepted event is made durable by the HTTP process.
        self.store = store or open_store(config.store, consumer=f"{os.getpid()}-{os.urandom(3).hex()}",
                                         durable=False, slot=slot)
        self._owns_store = store is None
        self.deliverer = Deliverer(config, self.store, Sealer(config.secret))
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, *, recover: bool) -> None:
        if recover:
            recovered = await self.store.recover_leases(now=time.time())
            if recovered:
                log.info("recovered leases of a previous run", extra={"postbacks": recovered})
        self.deliverer.start()
        self._tasks.append(asyncio.create_task(self._upkeep(), name="delivery-upkeep"))

    async def stop(self) -> None:
        log.info("delivery draining", extra={"drain_seconds": self.config.drain_seconds})
        await self.deliverer.stop(self.config.drain_seconds)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._owns_store:
            await self.store.close()
        log.info("delivery stopped")

    async def _upkeep(self) -> None:
        """Every second: circuit gauges and expired idempotency records (bounded work per call)."""
        while True:
            await asyncio.sleep(HOUSEKEEPING_SECONDS)
            now = time.time()
            for vendor in VENDORS:
                metrics.CIRCUIT_OPEN.labels(vendor.slug).set(1 if self.deliverer.breakers[vendor.slug].is_open(now)
                                                             else 0)
            try:
                await self.store.housekeeping(now=now, keep_seconds=self.config.idempotency_seconds,
                                              max_identities=self.config.max_identities)
            except Exception:
                log.exception("housekeeping error")


def run(config: Config, wake_fd: int | None, parent: int | None = None, slot: int | None = None) -> int:
    """`segrelay deliver`: deliver until SIGTERM/SIGINT, then drain; exits with the parent (Linux)."""
    die_with_parent(parent)
    lower_priority(config.delivery_nice)
    tune_garbage_collector()
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_main(config, wake_fd, slot))
    return uvloop.run(_main(config, wake_fd, slot))


async def _main(config: Config, wake_fd: int | None, slot: int | None) -> int:
    service = DeliveryService(config, slot=slot)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if not await _store_checked(service, config, stop):
        await service.store.close()
        return 0
    if wake_fd is not None:
        os.set_blocking(wake_fd, False)

        def woken() -> None:
            with contextlib.suppress(BlockingIOError):
                if not os.read(wake_fd, 4096):  # the HTTP process is gone
                    loop.remove_reader(wake_fd)
                    stop.set()
                    return
            service.deliverer.wake_all()
        loop.add_reader(wake_fd, woken)
    await service.start(recover=False)  # the supervisor recovered leases before starting us
    log.info("delivery started")
    await stop.wait()
    await service.stop()
    return 0


async def _store_checked(service: DeliveryService, config: Config, stop: asyncio.Event) -> bool:
    """The store's durability checked (a store set to lose events stops us: StoreError). An unreachable store is
    asked again every STORE_RETRY_SECONDS rather than ending the process, so that a store that is down when delivery
    starts (or restarts) is waited for, not crash-looped on. False: asked to stop meanwhile."""
    while not stop.is_set():
        try:
            await check_durability(service.store, allow_unsafe=config.redis_unsafe)
            return True
        except StoreUnavailableError as exc:
            log.warning("store unreachable; delivery waits for it", extra={"reason": str(exc)[:200]})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), STORE_RETRY_SECONDS)
    return False
