"""The project's daemon for kernel tests and benchmarks: in a thread of its own
(:class:`DaemonThread`), or as ``hbactl daemon`` in a process (:class:`DaemonProcess`).

The daemon's asyncio loop serves the TCMU rings: whatever blocks that loop blocks every I/O to
the disks it serves. A test that ran ``mkfs`` or ``fio`` on the loop's thread would deadlock
the first time the kernel waits for the ring. So :class:`DaemonThread` runs the daemon in its
own thread with its own loop (``asyncio.run``), and the test thread talks to it only through
``asyncio.run_coroutine_threadsafe``; I/O tools run from the test thread as subprocesses.

    with DaemonThread(DaemonOptions(), log_path=...) as hba:
        disk = hba.attach(target.url())        # -> AttachedDisk: node /dev/sdX, by_id links
        helpers.run(["mkfs.ext4", "-q", "-F", disk.node])
        hba.detach(disk.name)

At exit every disk still attached is detached (forced), the daemon stops and the thread ends.

:func:`leftovers` lists what an attach leaves in the kernel (TCMU backstores, tcm_loop
targets, uio devices); :meth:`DaemonThread.snapshot` what it leaves in the daemon's process
(asyncio tasks, threads, file descriptors).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from hba.daemon import Daemon, DaemonOptions, Disk
from tests.kernel.service import ServiceProcess

T = TypeVar("T")

CHECKOUT = Path(__file__).resolve().parents[2]
HBACTL = Path(sys.executable).parent / "hbactl"

CONFIGFS_TARGET = Path("/sys/kernel/config/target")
LOGGERS = ("iscsi-hba", "hba", "initiator", "tcmu_handler")


@dataclass(frozen=True)
class AttachedDisk:
    """What the test thread may keep of a :class:`hba.daemon.Disk` (a plain snapshot)."""

    name: str
    node: str                 # /dev/sdX
    by_id: tuple[str, ...]    # /dev/disk/by-id/... links
    scsi_address: str
    backstore: str            # "user_N/hba-<name>"
    size: int
    block_size: int


@dataclass(frozen=True)
class ProcessSnapshot:
    """What the daemon's process holds at one moment (see :meth:`DaemonThread.snapshot`)."""

    tasks: tuple[str, ...]            # the loop's asyncio tasks, described
    threads: tuple[str, ...]          # names of live threads other than the executor's
    executor_threads: int             # asyncio's default executor (to_thread) workers
    fds: dict[int, str]               # fd -> readlink of /proc/self/fd/N

    def describe_fds(self, fds: Iterator[int] | set[int]) -> str:
        return ", ".join(f"{fd} -> {self.fds.get(fd, '?')}" for fd in sorted(fds))


class DaemonThread:
    """A :class:`~hba.daemon.Daemon` running in its own thread and event loop."""

    def __init__(self, options: DaemonOptions | None = None, *,
                 log_path: Path | None = None, log_level: int = logging.INFO,
                 log_mode: str = "w") -> None:
        self.options = options or DaemonOptions()
        self.log_path = log_path
        self.log_mode = log_mode
        self.log_level = log_level
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._daemon: Daemon | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._handler: logging.Handler | None = None

    # -- life cycle ------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> None:
        """Start the thread, the loop and ``Daemon.start()``; raise what start raised."""
        if self.log_path is not None:
            self._handler = logging.FileHandler(self.log_path, mode=self.log_mode)
            self._handler.setFormatter(logging.Formatter(
                "%(asctime)s.%(msecs)03d %(threadName)s %(name)s %(levelname)s %(message)s",
                "%H:%M:%S"))
            self._handler.setLevel(self.log_level)
            for name in LOGGERS:
                logger = logging.getLogger(name)
                logger.addHandler(self._handler)
                if logger.level == logging.NOTSET or logger.level > self.log_level:
                    logger.setLevel(self.log_level)
        user_hook = self.options.on_event

        def on_event(kind: str, data: dict[str, Any]) -> None:
            self.events.append((kind, data))
            if user_hook is not None:
                user_hook(kind, data)

        self.options.on_event = on_event
        self._thread = threading.Thread(target=self._main, name="hba-daemon", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the daemon did not start within {timeout:g} s")
        if self._error is not None:
            self._thread.join(10)
            raise self._error

    def _main(self) -> None:
        try:
            asyncio.run(self._amain())
        except BaseException as exc:  # reported by start() or stop()
            self._error = exc
        finally:
            self._ready.set()

    async def _amain(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        daemon = Daemon(self.options)
        await daemon.start()
        self._daemon = daemon
        self._ready.set()
        await self._stop.wait()
        try:
            # Every disk, also those of worker processes (DaemonOptions.workers).
            for name in [str(row["name"]) for row in await daemon.list_all()]:
                with contextlib.suppress(Exception):
                    await daemon.detach(name, force=True)
        finally:
            await daemon.stop()

    def stop(self, timeout: float = 300.0) -> None:
        """Detach what is still attached (forced), stop the daemon, end the thread."""
        thread, loop, stop = self._thread, self._loop, self._stop
        try:
            if thread is not None and thread.is_alive() and loop is not None and stop is not None:
                loop.call_soon_threadsafe(stop.set)
                thread.join(timeout)
                if thread.is_alive():
                    raise TimeoutError(f"the daemon thread did not end within {timeout:g} s")
        finally:
            self._thread = None
            if self._handler is not None:
                for name in LOGGERS:
                    logging.getLogger(name).removeHandler(self._handler)
                self._handler.close()
                self._handler = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __enter__(self) -> DaemonThread:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- calls into the loop ---------------------------------------------------------------

    @property
    def daemon(self) -> Daemon:
        """The daemon object: read it only through :meth:`call` (it lives in the loop)."""
        if self._daemon is None:
            raise RuntimeError("the daemon is not running")
        return self._daemon

    def call(self, fn: Callable[[Daemon], Awaitable[T]], timeout: float = 300.0) -> T:
        """Run ``await fn(daemon)`` in the daemon's loop; return its result or raise."""
        if self._loop is None or self._daemon is None or self._thread is None:
            raise RuntimeError("the daemon is not running")
        daemon = self._daemon

        async def run() -> T:
            return await fn(daemon)

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"call into the daemon did not finish within {timeout:g} s") \
                from None

    def call_sync(self, fn: Callable[[Daemon], T], timeout: float = 60.0) -> T:
        """Run ``fn(daemon)`` (not a coroutine) in the daemon's loop."""

        async def run(daemon: Daemon) -> T:
            return fn(daemon)

        return self.call(run, timeout)

    def attach(self, what: str, timeout: float = 300.0) -> AttachedDisk:
        """``Daemon.attach`` (URL or nickname); returns once ``/dev/sdX`` is ready."""

        async def attach(daemon: Daemon) -> AttachedDisk:
            return _snapshot_disk(await daemon.attach(what))

        return self.call(attach, timeout)

    def detach(self, what: str, *, force: bool = False, timeout: float = 300.0
               ) -> dict[str, Any]:
        return self.call(lambda daemon: daemon.detach(what, force=force), timeout)

    def status(self) -> dict[str, Any]:
        return self.call_sync(lambda daemon: daemon.status())

    def disk(self, name: str) -> Disk:
        """The daemon's own Disk object (read its fields through :meth:`call_sync`)."""
        return self.call_sync(lambda daemon: daemon.disks[name])

    def session_info(self, name: str) -> dict[str, Any]:
        """State, reconnect count and negotiated digests of the session behind disk ``name``."""

        def read(daemon: Daemon) -> dict[str, Any]:
            session = daemon.disks[name].session
            assert session is not None
            params = session.parameters
            return {
                "state": session.state.value,
                "reconnects": session.reconnects,
                "header_digest": params.header_digest if params else None,
                "data_digest": params.data_digest if params else None,
                **session.stats(),
            }

        return self.call_sync(read)

    def snapshot(self) -> ProcessSnapshot:
        """Tasks of the loop, threads and open fds of this process, after a GC pass."""

        async def tasks(daemon: Daemon) -> tuple[str, ...]:
            await asyncio.sleep(0)  # let just-finished tasks be collected
            gc.collect()
            current = asyncio.current_task()
            return tuple(sorted(_describe_task(t) for t in asyncio.all_tasks()
                                if t is not current))

        described = self.call(tasks)
        threads = [t for t in threading.enumerate() if t.is_alive()]
        executor = [t for t in threads if t.name.startswith("asyncio_")]
        others = tuple(sorted(t.name for t in threads if t not in executor))
        fds: dict[int, str] = {}
        for entry in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                fds[int(entry)] = os.readlink(f"/proc/self/fd/{entry}")
        return ProcessSnapshot(tasks=described, threads=others,
                               executor_threads=len(executor), fds=fds)


class DaemonProcess(ServiceProcess):
    """``hbactl daemon`` of this checkout as a subprocess, with the caller's environment;
    ready when it sends ``READY=1`` (sd_notify). Each start is marked in the log."""

    def __init__(self, config: Path, log_path: Path) -> None:
        super().__init__([str(HBACTL), "daemon", "--config", str(config)], log_path,
                         cwd=CHECKOUT, inherit_environment=True, label="hbactl daemon",
                         stop_timeout=120.0)
        self.config = config
        self.starts = 0

    def start(self, timeout: float = 240.0) -> None:
        assert not self.running, "the daemon is already running"
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts}\n".encode())
        super().start(timeout)


def _snapshot_disk(disk: Disk) -> AttachedDisk:
    assert disk.device is not None and disk.scsi_address is not None
    return AttachedDisk(
        name=disk.name, node=disk.device.node, by_id=disk.device.by_id,
        scsi_address=disk.scsi_address, backstore=f"user_{disk.hba_index}/{disk.backstore}",
        size=disk.size, block_size=disk.block_size)


def _describe_task(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    name = getattr(coro, "__qualname__", None) or repr(coro)
    return f"{task.get_name()}:{name}"


# ------------------------------------------------------------------------------------------
# what an attach leaves in the kernel


def leftovers() -> list[str]:
    """TCMU backstores (``core/user_*``), tcm_loop targets and uio devices that exist now."""
    found: list[str] = []
    core = CONFIGFS_TARGET / "core"
    if core.is_dir():
        for hba in sorted(core.glob("user_*")):
            found.append(f"configfs core/{hba.name}")
            found += [f"configfs core/{hba.name}/{so.name}" for so in sorted(hba.iterdir())
                      if so.is_dir()]
    loopback = CONFIGFS_TARGET / "loopback"
    if loopback.is_dir():
        found += [f"configfs loopback/{t.name}" for t in sorted(loopback.iterdir())
                  if t.is_dir() and t.name.startswith("naa.")]
    uio = Path("/sys/class/uio")
    if uio.is_dir():
        found += [f"uio device {d.name}" for d in sorted(uio.glob("uio*"))]
    return found


def wait_for_no_leftovers(timeout: float = 30.0) -> list[str]:
    """:func:`leftovers` once it is empty, or what is still there after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        left = leftovers()
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.2)


def lio_sessions(iqn: str) -> list[str]:
    """Initiators logged in to LIO target ``iqn`` (its TPG 1), as configfs reports them."""
    path = CONFIGFS_TARGET / "iscsi" / iqn / "tpgt_1" / "dynamic_sessions"
    try:
        return [line for line in path.read_text().split() if line]
    except OSError:
        return []


__all__ = [
    "HBACTL",
    "AttachedDisk",
    "DaemonProcess",
    "DaemonThread",
    "ProcessSnapshot",
    "leftovers",
    "lio_sessions",
    "wait_for_no_leftovers",
]
