"""`segrelay serve`'s child processes: start them, wake them, restart them, drain them.

`segrelay serve` is one command and one process group. The process it starts (the primary) answers HTTP itself and
starts two kinds of children, all on the same store:

- `SEGRELAY_HTTP_PROCESSES - 1` more HTTP processes (`segrelay serve-http`) listening on the same port
  (SO_REUSEPORT: the kernel spreads connections over them), so that answering Segment uses every core. Each takes
  its own slot at SQLite's write lock and reads the primary's view of the group's health from a shared byte, so
  that every process answers `/readyz` alike.
- `SEGRELAY_DELIVERY_PROCESSES` delivery processes (`segrelay deliver`). A pipe wakes them when any HTTP process
  accepted an event (no polling delay).
- On SQLite, the accept writer (`segrelay accept-writer`, app/store/accept_writer.py): the one process that stores
  what every HTTP process accepts, on a Unix socket in a private temporary directory. It starts first and stops
  last, once every HTTP process has answered its last request.

A child that dies is started again, SIGTERM drains them, each child dies with the primary (a kill -9 of `serve`
leaves nothing behind), and readiness is false while a child is missing.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import mmap
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from app.store.sqlite_writers import PRIORITY_SLOTS

ACCEPT_WRITER_SLOT = PRIORITY_SLOTS - 1  # after the HTTP processes' slots (SEGRELAY_HTTP_PROCESSES <= 63)

log = logging.getLogger("segrelay.supervisor")
RESTART_DELAY = 1.0


class Waker:
    """Wakes the delivery processes through their pipe when an event was accepted: one write per event loop
    iteration however many events arrive, one byte for each delivery process."""

    def __init__(self, fd: int, count: int) -> None:
        self.fd, self.count = fd, count
        self._pending = False

    def notify(self, vendor: str) -> None:
        if not self._pending:
            self._pending = True
            asyncio.get_running_loop().call_soon(self._wake)

    def _wake(self) -> None:
        self._pending = False
        with contextlib.suppress(BlockingIOError, OSError):  # a full pipe: they have plenty of wake-ups queued
            os.write(self.fd, b"\0" * self.count)


class SharedFlag:
    """One byte of shared memory that children inherit as a file descriptor: an anonymous memfd on Linux (no file
    system needed: the root file system may be read-only), an unlinked temporary file elsewhere."""

    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            if hasattr(os, "memfd_create"):
                fd = os.memfd_create("segrelay-health", 0)
            else:  # pragma: no cover - not Linux
                fd = os.dup(tempfile.TemporaryFile().fileno())  # noqa: SIM115
            os.ftruncate(fd, 1)
        self.fd = fd
        self._map = mmap.mmap(fd, 1)

    def set(self, value: bool) -> None:
        self._map[0] = 1 if value else 0

    def get(self) -> bool:
        return self._map[0] == 1

    def close(self) -> None:
        self._map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


@dataclass(frozen=True, slots=True)
class WorkerLink:
    """What an HTTP child gets from the primary: its slot at SQLite's write lock, the pipe that wakes the delivery
    processes (None when there are none), the flag that says whether the whole group is healthy and the accept
    writer's socket (None: it stores its accepts itself)."""

    slot: int
    health_fd: int
    wake_fd: int | None = None
    wake_count: int = 0
    accept_writer: str | None = None  # the accept writer's socket (SQLite)


class _Children:
    """Processes of one kind: started, restarted when they exit, stopped with SIGTERM (killed when late)."""

    kind = "child"

    def __init__(self, count: int, stop_timeout: float) -> None:
        self.count, self.stop_timeout = count, stop_timeout
        self.procs: list[subprocess.Popen[bytes]] = []
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False

    def _command(self, index: int) -> tuple[list[str], tuple[int, ...]]:
        """The child's arguments after `python -m app`, and the file descriptors it inherits."""
        raise NotImplementedError

    def start(self) -> None:
        self.procs = [self._spawn(index) for index in range(self.count)]
        self._watch = asyncio.create_task(self._supervise(), name=f"supervise-{self.kind}")

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        args, fds = self._command(index)
        proc = subprocess.Popen([sys.executable, "-m", "app", *args, "--parent-pid", str(os.getpid())], pass_fds=fds)
        log.info(f"{self.kind} process started", extra={"child_pid": proc.pid})
        return proc

    @property
    def healthy(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    async def _supervise(self) -> None:
        while not self._stopping:
            await asyncio.sleep(0.5)
            for index, proc in enumerate(self.procs):
                if proc.poll() is not None and not self._stopping:
                    log.error(f"{self.kind} process exited; starting another",
                              extra={"child_pid": proc.pid, "exit_code": proc.returncode})
                    await asyncio.sleep(RESTART_DELAY)
                    if not self._stopping:
                        self.procs[index] = self._spawn(index)

    def terminate(self) -> None:
        """SIGTERM to every child still running (they drain); safe in a signal handler, safe to repeat."""
        self._stopping = True
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)

    async def stop(self) -> bool:
        """SIGTERM to each child, then wait; kill if late. True when every child drained and exited 0."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        self.terminate()
        clean = True
        for proc in self.procs:
            try:
                code = await asyncio.to_thread(proc.wait, self.stop_timeout)
                # Killed by our SIGTERM itself: it came before the child installed its handlers, and a child takes
                # nothing on before that, so nothing was left behind.
                clean = code in (0, -signal.SIGTERM) and clean
            except subprocess.TimeoutExpired:
                log.error(f"{self.kind} process did not stop in time; killed", extra={"child_pid": proc.pid})
                proc.kill()
                await asyncio.to_thread(proc.wait)
                clean = False
        return clean


class DeliveryProcesses(_Children):
    kind = "delivery"

    def __init__(self, count: int, stop_timeout: float) -> None:
        super().__init__(count, stop_timeout)
        self._reader, self._writer = os.pipe()
        os.set_blocking(self._writer, False)
        self.notify = Waker(self._writer, count).notify

    @property
    def wake_fd(self) -> int:
        """The pipe's writing end, for HTTP children to wake the delivery processes too."""
        return self._writer

    def _command(self, index: int) -> tuple[list[str], tuple[int, ...]]:
        return ["deliver", "--wake-fd", str(self._reader), "--slot", str(PRIORITY_SLOTS + index)], (self._reader,)

    async def stop(self) -> bool:
        clean = await super().stop()
        for fd in (self._reader, self._writer):
            with contextlib.suppress(OSError):
                os.close(fd)
        return clean


class HttpProcesses(_Children):
    """The primary's fellow HTTP processes, numbered from slot 1 (the primary is slot 0)."""

    kind = "http"

    def __init__(self, count: int, stop_timeout: float, *, address: tuple[str, int], health: SharedFlag,
                 delivery: DeliveryProcesses | None, tls: tuple[str, str] | None,
                 accept_writer: str | None = None) -> None:
        super().__init__(count, stop_timeout)
        self.address, self.health, self.delivery, self.tls = address, health, delivery, tls
        self.accept_writer = accept_writer

    def _command(self, index: int) -> tuple[list[str], tuple[int, ...]]:
        args = ["serve-http", "--host", self.address[0], "--port", str(self.address[1]), "--slot", str(index + 1),
                "--health-fd", str(self.health.fd), "--http-processes", str(self.count + 1)]
        fds = [self.health.fd]
        if self.delivery is not None:
            args += ["--wake-fd", str(self.delivery.wake_fd), "--wake-count", str(self.delivery.count)]
            fds.append(self.delivery.wake_fd)
        if self.tls is not None:
            args += ["--ssl-certfile", self.tls[0], "--ssl-keyfile", self.tls[1]]
        if self.accept_writer is not None:
            args += ["--accept-writer", self.accept_writer]
        return args, tuple(fds)


class AcceptWriterProcess(_Children):
    """The accept writer (SQLite): one process, listening on `socket` in a private directory of its own, storing
    into the primary's own database file (given by its absolute path, whatever the child's environment says)."""

    kind = "accept writer"

    def __init__(self, database: Path, stop_timeout: float) -> None:
        super().__init__(1, stop_timeout)
        self.database = str(database.resolve())
        self.directory = tempfile.mkdtemp(prefix="segrelay-")  # mode 0700: only this user reaches the socket
        atexit.register(shutil.rmtree, self.directory, True)  # also when the service was never started or stopped
        self.socket = os.path.join(self.directory, "accept-writer.sock")
        self.listening = False
        self._waiting: asyncio.Task[None] | None = None

    @property
    def healthy(self) -> bool:
        """Running and listening: a replacement still starting up cannot store anything yet."""
        return self.listening and super().healthy

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        proc = super()._spawn(index)
        self.listening = False
        if self._watch is not None:  # a replacement: the first one is awaited by the service's start()
            self._waiting = asyncio.get_running_loop().create_task(self._until_listening())
        return proc

    async def _until_listening(self) -> None:
        try:
            await self.ready()
        except RuntimeError as exc:  # it exited: the supervisor starts another
            log.error(str(exc))

    def _command(self, index: int) -> tuple[list[str], tuple[int, ...]]:
        return ["accept-writer", "--database", self.database, "--socket", self.socket,
                "--slot", str(ACCEPT_WRITER_SLOT)], ()

    async def ready(self, timeout: float = 30.0) -> None:
        """Wait until it answers on its socket (it creates or migrates the schema first)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                _, writer = await asyncio.open_unix_connection(self.socket)
            except OSError:
                if self.procs[0].poll() is not None:
                    raise RuntimeError(f"the accept writer exited with {self.procs[0].returncode} at start-up"
                                       ) from None
                if loop.time() > deadline:
                    raise RuntimeError(f"the accept writer did not listen on {self.socket} within {timeout:.0f} s"
                                       ) from None
                await asyncio.sleep(0.05)
            else:
                writer.close()
                self.listening = True
                return

    async def stop(self) -> bool:
        if self._waiting is not None:
            self._waiting.cancel()
        clean = await super().stop()
        shutil.rmtree(self.directory, ignore_errors=True)
        return clean
