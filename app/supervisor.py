"""The HTTP process's delivery processes: start them, wake them when work arrives, restart them, drain them.

`segrelay serve` is one command and one process group: the HTTP process (this one) starts
`SEGRELAY_DELIVERY_PROCESSES` children running `segrelay deliver`, each on the same store. A pipe wakes them when
an event was accepted (no polling delay), a child that dies is started again, SIGTERM drains them, and each child
dies with its parent (a kill -9 of `serve` leaves nothing behind). Readiness is false while a child is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys

log = logging.getLogger("segrelay.supervisor")
RESTART_DELAY = 1.0


class DeliveryProcesses:
    def __init__(self, count: int, stop_timeout: float) -> None:
        self.count, self.stop_timeout = count, stop_timeout
        self.procs: list[subprocess.Popen[bytes]] = []
        self._reader, self._writer = os.pipe()
        os.set_blocking(self._writer, False)
        self._wake_pending = False
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self.procs = [self._spawn() for _ in range(self.count)]
        self._watch = asyncio.create_task(self._supervise(), name="supervise-delivery")

    def _spawn(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "app", "deliver", "--wake-fd", str(self._reader)],
                                pass_fds=(self._reader,))
        log.info("delivery process started", extra={"pid": proc.pid})
        return proc

    @property
    def healthy(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def notify(self, vendor: str) -> None:
        """An event was accepted: wake the delivery processes, once per loop iteration however many arrive."""
        if not self._wake_pending:
            self._wake_pending = True
            asyncio.get_running_loop().call_soon(self._wake)

    def _wake(self) -> None:
        self._wake_pending = False
        with contextlib.suppress(BlockingIOError):  # the pipe is full: they have plenty of wake-ups queued
            os.write(self._writer, b"\0" * self.count)

    async def _supervise(self) -> None:
        while not self._stopping:
            await asyncio.sleep(0.5)
            for index, proc in enumerate(self.procs):
                if proc.poll() is not None and not self._stopping:
                    log.error("delivery process exited; starting another",
                              extra={"pid": proc.pid, "exit_code": proc.returncode})
                    await asyncio.sleep(RESTART_DELAY)
                    if not self._stopping:
                        self.procs[index] = self._spawn()

    async def stop(self) -> bool:
        """SIGTERM to each child (they drain in-flight sends and hand back the rest), then wait; kill if late.

        True when every child drained and exited 0."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        clean = True
        for proc in self.procs:
            try:
                code = await asyncio.to_thread(proc.wait, self.stop_timeout)
                # Killed by our SIGTERM itself: it came before the child installed its handlers, and a child leases
                # nothing before that, so nothing was left behind.
                clean = code in (0, -signal.SIGTERM) and clean
            except subprocess.TimeoutExpired:
                log.error("delivery process did not stop in time; killed", extra={"pid": proc.pid})
                proc.kill()
                await asyncio.to_thread(proc.wait)
                clean = False
        for fd in (self._reader, self._writer):
            with contextlib.suppress(OSError):
                os.close(fd)
        return clean
