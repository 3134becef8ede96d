"""Worker processes: the daemon's disks served from several event loops, one per core.

Theory of operation
-------------------
One asyncio loop can use one core. A busy disk costs the loop its ring, its session's PDUs and
its completions; two busy disks on one loop share one core, however many the machine has. So
``hbactl daemon --workers N`` (default: the number of cores; ``Workers =`` in the
configuration) serves the disks from up to N worker processes, each a
:class:`hba.daemon.Daemon` of its own on its own loop — the same code that serves every disk
in one process with ``--workers 1``, not a second implementation of it.

The main process keeps what there must be one of: the DBus face (:mod:`hba.dbus_service`),
the configuration and the retry schedule of ``Enable = on`` entries (its
:class:`~hba.daemon.Daemon` routes attach, detach, list, status and metrics here instead of
serving disks itself), the udev watcher for backstores made by targetcli, and the Prometheus
endpoint. A worker holds, for the disks given to it, their iSCSI sessions, their rings' mmap
and uio fds and their dispatchers; it reads the same configuration file (nicknames and
credentials resolve the same way) and reads it again when the main process does.

*Placement* (:func:`place`, sans-I/O): a disk goes to the worker that already serves a disk of
the same target — the LUNs of one target at one portal share one session (:mod:`hba.sessions`),
and two processes would log in twice with the same derived ISID, each reinstating the other's
session (RFC 7143 §6.3.5) — else to the least busy worker, and a new worker is started
while every running one serves a disk and fewer than N run. So the number of workers is
capped by the number of targets in use, a worker never idles while another serves two, and a
disk stays on its worker until it is detached.

*Adoption* after a restart: the main process lists our backstores in configfs, groups them by
target, places each group as above and hands it to its worker, which takes them over exactly
as a single daemon does (:meth:`hba.daemon.Daemon.adopt_existing`: block, reset the ring,
reopen, unblock; the kernel keeps the commands meanwhile). A worker that dies (SIGKILL, a
crash) is reported with its exit status; a new worker takes its index and takes over every
backstore no other worker serves — the same takeover, so its disks' I/O continues after a
pause, as after a daemon restart. Until that takeover has ended (not only until the new worker
answers), ``hbactl list`` shows those disks from the dead worker's last answer, in state
``taking over`` (:meth:`WorkerPool.list_rows`), and the scan for new devices (a udev event)
waits for it (:meth:`WorkerPool.replacements_done`): else the dead worker's rings, which no
running worker serves, would be served by another worker as new devices.

*Configfs* changes are serialised across processes by :func:`hba.kernel.configfs_lock` (rtslib
picks a free ``user_<n>`` by looking).

*The link* between the main process and a worker is a socketpair carrying length-prefixed JSON
(:func:`encode`, :class:`FrameDecoder`): a 4-byte big-endian length, then one JSON object of at
most :data:`MAX_FRAME` bytes. The main process sends requests ``{"id", "op", "args"}``; the
worker answers each ``{"id", "result"}`` or ``{"id", "error": {"kind", "message",
"retryable"}}`` (:func:`error_to_wire`, :func:`error_from_wire`: the caller gets the same
exception class and sentence as from the daemon in one process), and sends events ``{"event",
"data"}`` (attach, detach, session, path, ...) that the main process turns into DBus signals.
Every request has a bound (:data:`TIMEOUTS`); a worker that does not answer in time or whose
link breaks fails the request with a sentence naming the worker. Workers log themselves (the
journal and standard error are shared), with the same session and path lines as one process.

Workers are started with ``python -m hba.workers`` (subprocess, not ``fork``: the main loop
has threads), the socket passed as an inherited fd. A worker dies with the main process
(``PR_SET_PDEATHSIG``): a daemon killed with SIGKILL is then gone whole, as one process would
be, and the next daemon never takes over a ring an orphaned worker still serves.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import struct
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from hba.disks import DiskState
from hba.errors import (
    AttachError,
    DetachError,
    DiskBusyError,
    HBAError,
    NoSuchDiskError,
    WorkerError,
)

if TYPE_CHECKING:
    from hba.daemon import Daemon, DaemonOptions

log = logging.getLogger("iscsi-hba")

MAX_FRAME = 16 << 20          # bytes of one message at most (a metrics sample of many disks)
_HEADER = struct.Struct(">I")

# Seconds a request may take. Attach and detach wait for logins (login timeout per portal),
# udev and the kernel's SYNCHRONIZE CACHE; the DBus client gives up after 120 s by default.
TIMEOUTS = {"attach": 600.0, "detach": 600.0, "adopt": 600.0, "serve_new": 600.0,
            "stop": 60.0}
DEFAULT_TIMEOUT = 30.0        # list, status, sample, inventory, refresh, reload
START_TIMEOUT = 60.0          # a new worker's first answer (Python imports on a busy machine)
RESTART_DELAY = 1.0           # seconds before a worker that died is replaced
# Seconds from a worker's death to the end of its replacement's takeover, at most: the delay,
# the new worker's start, then the takeover (an inventory, then adoption in the workers).
REPLACEMENT_BOUND = RESTART_DELAY + START_TIMEOUT + DEFAULT_TIMEOUT + TIMEOUTS["adopt"]


class ProtocolError(HBAError):
    """The link to a worker carried something that is not a message of this protocol."""


# --------------------------------------------------------------------------------------------
# the message protocol (sans-I/O)


def encode(message: Mapping[str, Any]) -> bytes:
    """One frame: the length, then ``message`` as UTF-8 JSON."""
    body = json.dumps(message, separators=(",", ":"), default=str).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"a message of {len(body)} bytes is above the {MAX_FRAME}-byte limit")
    return _HEADER.pack(len(body)) + body


class FrameDecoder:
    """Bytes of the link in, whole messages out (:meth:`feed`)."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """The messages ``data`` completes; raises :class:`ProtocolError` on a frame above the
        limit, JSON that does not parse, or a value that is not an object."""
        self._buf += data
        out: list[dict[str, Any]] = []
        while len(self._buf) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buf)
            if length > self._max:
                raise ProtocolError(f"a frame announces {length} bytes, above the "
                                    f"{self._max}-byte limit")
            if len(self._buf) < _HEADER.size + length:
                break
            body = bytes(self._buf[_HEADER.size:_HEADER.size + length])
            del self._buf[:_HEADER.size + length]
            try:
                message = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ProtocolError(f"a frame is not JSON: {exc}") from None
            if not isinstance(message, dict):
                raise ProtocolError(f"a frame holds a JSON {type(message).__name__}, "
                                    "not an object")
            out.append(message)
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held."""
        return len(self._buf)


def _error_kinds() -> dict[str, type[HBAError]]:
    from hba.config import ConfigError
    from hba.kernel import KernelSetupError, RegistrationError

    kinds: list[type[HBAError]] = [AttachError, DetachError, DiskBusyError, NoSuchDiskError,
                                   ConfigError, KernelSetupError, RegistrationError,
                                   WorkerError, HBAError]
    return {kind.__name__: kind for kind in kinds}


def error_to_wire(exc: BaseException) -> dict[str, Any]:
    """What a worker answers for a request that raised ``exc``. Errors of the project travel
    as their class and sentence; anything else is logged here with its traceback (a bug) and
    travels as a sentence without internals, as the DBus face reports it."""
    from hba.config import ConfigError

    if isinstance(exc, ConfigError):
        return {"kind": "ConfigError", "message": str(exc), "errors": list(exc.errors),
                "path": exc.path}
    if isinstance(exc, HBAError):
        kind = type(exc).__name__ if type(exc).__name__ in _error_kinds() else "HBAError"
        return {"kind": kind, "message": str(exc),
                "retryable": bool(getattr(exc, "retryable", False))}
    from initiator.errors import ISCSIError

    if isinstance(exc, ISCSIError):
        return {"kind": "HBAError", "message": str(exc) or type(exc).__name__}
    log.error("internal error in a worker", exc_info=exc)
    return {"kind": "HBAError", "message": f"internal error in a worker of the daemon "
            f"({type(exc).__name__}); its log has the details"}


def error_from_wire(error: Mapping[str, Any]) -> HBAError:
    """The exception a worker's error answer stands for (an unknown kind: :class:`HBAError`)."""
    from hba.config import ConfigError

    kind = str(error.get("kind", "HBAError"))
    message = str(error.get("message", "a worker failed without saying why"))
    if kind == "ConfigError":
        errors = error.get("errors")
        return ConfigError([str(e) for e in errors] if isinstance(errors, list) else [message],
                           path=str(error["path"]) if error.get("path") else None)
    if kind == "AttachError":
        return AttachError(message, retryable=bool(error.get("retryable")))
    return _error_kinds().get(kind, HBAError)(message)


# --------------------------------------------------------------------------------------------
# placement (sans-I/O)


def default_workers(cores: int | None) -> int:
    """The most workers when neither ``--workers`` nor ``Workers =`` says: one per core."""
    return max(1, cores or 1)


def place(loads: Sequence[int], limit: int, owner: int | None = None) -> int:
    """The worker for a new disk: ``owner`` (the worker serving its target) if any; else the
    least busy of ``loads`` (disks per worker, lowest index on a tie) — or ``len(loads)``, a new
    worker, when every one serves a disk and fewer than ``limit`` run."""
    if owner is not None:
        return owner
    if len(loads) < limit and (not loads or min(loads) > 0):
        return len(loads)
    if not loads:
        raise ValueError("no worker to place a disk on (limit 0)")
    return min(range(len(loads)), key=lambda i: (loads[i], i))


def place_groups(groups: Iterable[str], loads: Sequence[int], limit: int,
                 owners: Mapping[str, int] | None = None) -> dict[str, int]:
    """Each group (a target's backstores, adopted together) placed in turn with :func:`place`
    and counted as one disk; ``owners``: groups whose worker is known already."""
    current, out = list(loads), {}
    for group in groups:
        index = place(current, limit, (owners or {}).get(group))
        if index == len(current):
            current.append(0)
        current[index] += 1
        out[group] = index
    return out


# --------------------------------------------------------------------------------------------
# the main process's side


@dataclass(slots=True)
class Inventory:
    """What a worker serves: its disks' names, nicknames and targets, its backstores."""

    names: set[str] = field(default_factory=set)
    nicknames: set[str] = field(default_factory=set)
    targets: set[str] = field(default_factory=set)
    backstores: set[str] = field(default_factory=set)

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Inventory:
        return cls(*(set(map(str, data.get(key) or ()))
                     for key in ("names", "nicknames", "targets", "backstores")))


class Process(Protocol):
    """What :class:`WorkerLink` needs of its process (``asyncio.subprocess.Process``)."""

    @property
    def pid(self) -> int: ...

    async def wait(self) -> int: ...

    def kill(self) -> None: ...


class WorkerLink:
    """One worker process and the socket to it: requests and their answers, its events."""

    def __init__(self, index: int, process: Process, sock: socket.socket,
                 on_event: Callable[[str, dict[str, Any]], None]) -> None:
        self.index = index
        self.process = process
        self.pid = process.pid
        self._sock = sock
        self._on_event = on_event
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 1
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self.closed = False
        self.why_closed = ""
        self.replaced: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Done when this worker has ended and what follows has ended too: its replacement
        has taken its disks over, or could not be started, or the daemon stops
        (:meth:`WorkerPool._monitor`)."""

    async def open(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(sock=self._sock)
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        decoder = FrameDecoder()
        why = "closed its end of the link"
        try:
            while data := await reader.read(1 << 16):
                for message in decoder.feed(data):
                    self._dispatch(message)
        except (ProtocolError, OSError) as exc:
            why = str(exc)
        self._close(why)

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "event" in message:
            data = message.get("data")
            self._on_event(str(message["event"]), data if isinstance(data, dict) else {})
            return
        future = self._pending.pop(message.get("id", -1), None)
        if future is None or future.done():
            return   # answered after its caller gave up
        if "error" in message and isinstance(message["error"], dict):
            future.set_exception(error_from_wire(message["error"]))
        else:
            future.set_result(message.get("result"))

    def _close(self, why: str) -> None:
        if self.closed:
            return
        self.closed, self.why_closed = True, why
        for future in self._pending.values():
            if not future.done():
                future.set_exception(WorkerError(
                    f"worker {self.index} (pid {self.pid}) went away during the request: "
                    f"{why}"))
        self._pending.clear()
        if self._writer is not None:
            self._writer.close()

    async def call(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        """Send request ``op``; its result, or raise what the worker raised (or
        :class:`WorkerError` when it went away or took longer than the bound)."""
        if self.closed or self._writer is None:
            raise WorkerError(f"worker {self.index} (pid {self.pid}) is gone "
                              f"({self.why_closed or 'not started'})")
        request_id, self._next_id = self._next_id, self._next_id + 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        bound = timeout if timeout is not None else TIMEOUTS.get(op, DEFAULT_TIMEOUT)
        try:
            self._writer.write(encode({"id": request_id, "op": op, "args": args}))
            await self._writer.drain()
            return await asyncio.wait_for(future, bound)
        except TimeoutError:
            raise WorkerError(f"worker {self.index} (pid {self.pid}) did not answer {op} "
                              f"within {bound:g} s; see the daemon's log") from None
        except (ConnectionError, OSError) as exc:
            self._close(str(exc))
            raise WorkerError(f"worker {self.index} (pid {self.pid}) is gone: {exc}") from None
        finally:
            self._pending.pop(request_id, None)

    async def wait(self) -> int:
        """The worker's exit status once it has ended (negative: the signal that ended it)."""
        status = await self.process.wait()
        self._close(f"exited with status {status}")
        if self._reader_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        return status

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        await self.wait()


def _verbosity() -> int:
    """The ``-v`` count the main process's logging was set up with (hba.control)."""
    level = logging.getLogger().getEffectiveLevel()
    return 2 if level <= logging.DEBUG else 1 if level <= logging.INFO else 0


def describe_exit(status: int) -> str:
    """``exit status 1`` or ``killed by SIGKILL``, for a worker's end."""
    if status < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-status).name}"
        return f"killed by signal {-status}"
    return f"exit status {status}"


class WorkerPool:
    """The workers of a daemon, from the main process (module docstring): started on demand
    up to ``limit``, replaced when they die, asked in turn or all at once."""

    def __init__(self, options: DaemonOptions, limit: int,
                 on_event: Callable[[str, dict[str, Any]], None],
                 on_restart: Callable[[WorkerLink], Awaitable[None]]) -> None:
        self.options = options
        self.limit = limit
        self._on_event = on_event
        self._on_restart = on_restart
        self.links: list[WorkerLink | None] = []
        self._monitors: set[asyncio.Task[None]] = set()
        self._starting: dict[int, asyncio.Future[WorkerLink]] = {}
        self._rows: dict[int, list[dict[str, Any]]] = {}   # each worker's last ``list``
        # A dead worker's last rows, until its replacement has taken its disks over; and why
        # they are not served meanwhile.
        self._orphans: dict[int, tuple[list[dict[str, Any]], str]] = {}
        # Workers that died and are being replaced, from the death until the takeover ends
        # (or fails): their rings are nobody's meanwhile (replacements_done()).
        self._replacing: set[int] = set()
        self._settled = asyncio.Event()
        self._settled.set()
        self.stopping = False

    def command(self, fd: int, index: int) -> list[str]:
        """The command line of worker ``index`` talking over ``fd``."""
        opts = self.options
        cmd = [sys.executable, "-m", "hba.workers", "--fd", str(fd), "--index", str(index),
               "--parent", str(os.getpid()),
               "--replacement-timeout", repr(opts.replacement_timeout),
               "--login-timeout", repr(opts.login_timeout),
               "--queue-depth", str(opts.queue_depth),
               "--verbose", str(_verbosity())]
        if opts.config_path is not None:
            cmd += ["--config", opts.config_path]
        if opts.initiator_name is not None:
            cmd += ["--initiator-name", opts.initiator_name]
        if opts.pcap_dir is not None:
            cmd += ["--pcap", opts.pcap_dir]
        if opts.priority is not None:
            cmd += [f"--priority={opts.priority}"]   # '=': argparse takes "-10" for an option
        return cmd

    async def _spawn(self, index: int) -> WorkerLink:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # The project's packages must import in the child as they do here.
            env = dict(os.environ)
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (root, env.get("PYTHONPATH")) if p)
            process = await asyncio.create_subprocess_exec(
                *self.command(theirs.fileno(), index), pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL, env=env, start_new_session=False)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        link = WorkerLink(index, process, ours, self._on_event)
        await link.open()
        try:
            await link.call("hello", timeout=START_TIMEOUT)
        except BaseException:
            await link.kill()
            raise
        log.info("worker %d started (pid %d)", index, link.pid)
        return link

    async def worker(self, index: int) -> WorkerLink:
        """Worker ``index``, started (or its start awaited) if it does not run."""
        if index < len(self.links):
            link = self.links[index]
            if link is not None and not link.closed:
                return link
        if index in self._starting:
            return await asyncio.shield(self._starting[index])
        future: asyncio.Future[WorkerLink] = asyncio.get_running_loop().create_future()
        self._starting[index] = future
        try:
            link = await self._spawn(index)
        except Exception as exc:
            error = WorkerError(f"could not start worker {index}: {exc or type(exc).__name__}")
            future.set_exception(error)
            future.exception()   # retrieved: nobody else may be waiting
            raise error from None
        except BaseException:
            future.cancel()
            raise
        finally:
            self._starting.pop(index, None)
        while len(self.links) <= index:
            self.links.append(None)
        self.links[index] = link
        future.set_result(link)
        task = asyncio.get_running_loop().create_task(self._monitor(link))
        self._monitors.add(task)
        task.add_done_callback(self._monitors.discard)
        return link

    def _stopped(self) -> bool:
        return self.stopping   # read again after an await (mypy keeps it narrowed)

    def running(self) -> list[WorkerLink]:
        return [link for link in self.links if link is not None and not link.closed]

    async def _monitor(self, link: WorkerLink) -> None:
        try:
            await self._replace(link)
        finally:
            if not link.replaced.done():
                link.replaced.set_result(None)

    async def _replace(self, link: WorkerLink) -> None:
        status = await link.wait()
        if self.stopping:
            return
        index = link.index
        log.error("worker %d (pid %d) ended: %s; a new worker takes over its disks in %g s",
                  index, link.pid, describe_exit(status), RESTART_DELAY)
        self._orphan(index)
        self._replacing.add(index)
        self._settled.clear()
        try:
            await asyncio.sleep(RESTART_DELAY)
            if self._stopped():
                return
            try:
                new = await self.worker(index)
            except HBAError as exc:
                log.error("%s; its disks wait (their commands stay in the kernel's rings)",
                          exc)
                rows, _ = self._orphans.get(index, ([], ""))
                self._orphans[index] = (rows, f"worker {index} ended and {exc}: its disks "
                                              "wait (see the daemon's log)")
                return
            try:
                await self._on_restart(new)
            finally:
                # Taken over, or failed to be (each failure is logged by the takeover): from
                # now on the workers' own answers say what is served.
                self._orphans.pop(index, None)
        finally:
            self._replacing.discard(index)
            if not self._replacing:
                self._settled.set()

    async def replacements_done(self) -> None:
        """Return once no worker that died is being replaced (each replacement's takeover
        ended or failed; bounded by :data:`REPLACEMENT_BOUND` each). Until then a dead
        worker's rings are nobody's: a scan for new devices would serve them elsewhere,
        as new, instead of leaving them to the replacement that takes them over."""
        await self._settled.wait()

    def _orphan(self, index: int) -> None:
        """Worker ``index`` is gone: its disks are shown from its last rows until taken over."""
        rows = self._rows.pop(index, None)
        if rows is not None:
            why = f"worker {index} ended; a new worker takes over its disks"
            self._orphans[index] = (rows, why)

    async def inventories(self) -> dict[int, Inventory]:
        """What each running worker serves (a worker that cannot answer: left out, logged)."""
        links = self.running()
        answers = await asyncio.gather(*(link.call("inventory") for link in links),
                                       return_exceptions=True)
        out: dict[int, Inventory] = {}
        for link, answer in zip(links, answers, strict=True):
            if isinstance(answer, BaseException):
                if not isinstance(answer, Exception):
                    raise answer
                log.warning("worker %d (pid %d): %s", link.index, link.pid, answer)
                continue
            out[link.index] = Inventory.from_wire(answer)
        return out

    async def gather(self, op: str, **args: Any) -> list[Any]:
        """``op`` asked of every running worker at once; the answers of those that gave one."""
        links = self.running()
        answers = await asyncio.gather(*(link.call(op, **args) for link in links),
                                       return_exceptions=True)
        out = []
        for link, answer in zip(links, answers, strict=True):
            if isinstance(answer, BaseException):
                if not isinstance(answer, Exception):
                    raise answer
                log.warning("worker %d (pid %d) did not answer %s: %s", link.index, link.pid,
                            op, answer)
                continue
            out.append(answer)
        return out

    async def list_rows(self) -> list[dict[str, Any]]:
        """Every worker's ``list`` rows. The disks of a worker that died and is being replaced
        (:meth:`_monitor`) are still the kernel's, their commands waiting in the rings: until
        the new worker has taken them over they are shown from the dead worker's last answer,
        in state ``taking over``, instead of vanishing from ``hbactl list`` (a disk a running
        worker lists is shown as that worker says)."""
        links = self.running()
        answers = await asyncio.gather(*(link.call("list") for link in links),
                                       return_exceptions=True)
        for link, answer in zip(links, answers, strict=True):
            if isinstance(answer, BaseException):
                if not isinstance(answer, Exception):
                    raise answer
                log.warning("worker %d (pid %d) did not answer list: %s", link.index,
                            link.pid, answer)
            else:
                self._rows[link.index] = list(answer)
        alive = {link.index for link in links}
        for index in sorted(set(self._rows) - alive):
            self._orphan(index)   # died since it last answered (its monitor may not know yet)
        rows = [row for _, last in sorted(self._rows.items()) for row in last]
        listed = {row.get("name") for row in rows}
        for _, (last, why) in sorted(self._orphans.items()):
            rows += [{**row, "state": DiskState.TAKEOVER.value, "error": why}
                     for row in last if row.get("name") not in listed]
        return rows

    def loads(self, inventories: Mapping[int, Inventory]) -> list[int]:
        """Disks per worker index (a worker slot not running counts as busy: it is being
        replaced and keeps its disks)."""
        return [len(inventories[i].names) if i in inventories else 1 << 30
                for i in range(len(self.links))]

    async def stop(self) -> None:
        """Ask every worker to stop (its disks stay in the kernel), kill those that do not."""
        self.stopping = True
        links = self.running()
        await asyncio.gather(*(self._stop_one(link) for link in links))
        for task in list(self._monitors):
            task.cancel()

    async def _stop_one(self, link: WorkerLink) -> None:
        try:
            await link.call("stop")
            await asyncio.wait_for(link.wait(), TIMEOUTS["stop"])
        except HBAError as exc:
            log.warning("worker %d (pid %d) did not stop (%s): killing it", link.index,
                        link.pid, exc)
            await link.kill()
        except TimeoutError:
            log.warning("worker %d (pid %d) did not exit within %g s of stopping: killing it",
                        link.index, link.pid, TIMEOUTS["stop"])
            await link.kill()


# --------------------------------------------------------------------------------------------
# the worker's side


class WorkerServer:
    """A worker: its :class:`~hba.daemon.Daemon`, answering the main process's requests."""

    def __init__(self, daemon: Daemon, writer: asyncio.StreamWriter, index: int = 0) -> None:
        self.daemon = daemon
        self.index = index   # its place in the main process's pool (log lines, metrics)
        self._writer = writer
        self.stopped = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        daemon.options.on_event = self.send_event

    def send(self, message: Mapping[str, Any]) -> None:
        if not self._writer.is_closing():
            self._writer.write(encode(message))

    def send_event(self, kind: str, data: dict[str, Any]) -> None:
        self.send({"event": kind, "data": self._tagged(data)})

    def _tagged(self, row: dict[str, Any]) -> dict[str, Any]:
        return {**row, "worker": os.getpid()}

    async def serve(self, reader: asyncio.StreamReader) -> None:
        """Answer requests until ``stop`` or until the main process goes away."""
        decoder = FrameDecoder()
        try:
            while not self.stopped.is_set() and (data := await reader.read(1 << 16)):
                for message in decoder.feed(data):
                    task = asyncio.get_running_loop().create_task(self._answer(message))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        except (ProtocolError, OSError) as exc:
            log.error("worker %d: the link to the main process broke: %s", os.getpid(), exc)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=TIMEOUTS["stop"])

    async def _answer(self, message: dict[str, Any]) -> None:
        request_id = message.get("id")
        op = str(message.get("op"))
        args = message.get("args") if isinstance(message.get("args"), dict) else {}
        try:
            result = await self.handle(op, args or {})
        except Exception as exc:
            self.send({"id": request_id, "error": error_to_wire(exc)})
        else:
            self.send({"id": request_id, "result": result})
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()
        if op == "stop":
            self.stopped.set()
            self._writer.close()   # the read in serve() ends: the process exits

    async def handle(self, op: str, args: Mapping[str, Any]) -> Any:
        """One request of the main process (module docstring); its JSON-able result."""
        from hba.metrics import process_sample, sample

        daemon = self.daemon
        if op == "hello":
            if not daemon.started:
                await daemon.start(attach_enabled=False)
            return {"pid": os.getpid()}
        if op == "adopt":
            # Under the lock: a path of this worker may be setting up its backstore meanwhile.
            async with daemon.lock:
                await daemon.adopt_existing(set(map(str, args.get("backstores") or ())))
            return None
        if op == "attach":
            disk = await daemon.attach(str(args["what"]))
            return self._tagged(disk.describe())
        if op == "detach":
            return self._tagged(await daemon.detach(str(args["what"]),
                                                    force=bool(args.get("force"))))
        if op == "list":
            return [self._tagged(row) for row in daemon.list()]
        if op == "sessions":
            return daemon.sessions.describe()
        if op == "sample":
            data = sample(daemon)
            data["disks"] = [self._tagged(row) for row in data["disks"]]
            data["process"] = {**process_sample(), "worker": self.index}
            return data
        if op == "inventory":
            return daemon.inventory()
        if op == "serve_new":
            await daemon.serve_new_devices({(int(i), str(n)) for i, n in args.get("devices") or ()})
            return None
        if op == "refresh":
            async with daemon.lock:
                await daemon.refresh_devices()
            return None
        if op == "reload":
            await daemon.reload_config()
            return None
        if op == "add_paths":
            daemon.add_missing_paths(str(args["nickname"]))
            return None
        if op == "stop":
            await daemon.stop()
            return None
        raise HBAError(f"a worker does not know the request {op!r} (another version?)")


async def serve_worker(fd: int, options: DaemonOptions, index: int = 0) -> int:
    """The worker process's loop: serve requests over ``fd`` until told to stop."""
    from hba.daemon import Daemon

    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    daemon = Daemon(options)
    server = WorkerServer(daemon, writer, index)
    loop = asyncio.get_running_loop()
    # The main process stops the workers; a signal to the process group (Ctrl-C in a
    # terminal) must not stop one before it is asked.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, lambda: None)
    try:
        await server.serve(reader)
    finally:
        if not server.stopped.is_set():
            # The main process is gone without asking: leave the disks for the next daemon.
            log.error("worker %d: the main process went away; stopping (the disks stay in "
                      "the kernel for the next daemon)", os.getpid())
            await daemon.stop()
        writer.close()
    return 0


def die_with_parent(parent: int) -> None:
    """Be killed (SIGKILL) when the main process ends (module docstring)."""
    import ctypes

    pr_set_pdeathsig = 1   # <linux/prctl.h>
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("worker %d: cannot ask to die with the main process: %s", os.getpid(),
                    os.strerror(ctypes.get_errno()))
    if os.getppid() != parent:   # it ended before the request took effect
        os._exit(1)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hba.workers``: a worker, started by the main process (never by hand)."""
    from hba.daemon import DaemonOptions

    parser = argparse.ArgumentParser(prog="python -m hba.workers",
                                     description="a worker process of hbactl daemon")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--config")
    parser.add_argument("--initiator-name")
    parser.add_argument("--pcap")
    parser.add_argument("--replacement-timeout", type=float, default=120.0)
    parser.add_argument("--login-timeout", type=float, default=15.0)
    parser.add_argument("--queue-depth", type=int, default=32)
    parser.add_argument("--verbose", type=int, default=0)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--priority", type=int)
    args = parser.parse_args(argv)
    die_with_parent(args.parent)
    from hba.control import configure_daemon_logging

    configure_daemon_logging(args.verbose)
    if args.priority is not None:
        # A session, and so a scheduling group, of its own: its share of the CPU is then
        # its own to raise (hba.priority).
        from hba.priority import own_session, raise_priority

        own_session()
        raise_priority(args.priority, f"worker {args.index}")
    options = DaemonOptions(config_path=args.config, initiator_name=args.initiator_name,
                            replacement_timeout=args.replacement_timeout,
                            login_timeout=args.login_timeout, queue_depth=args.queue_depth,
                            watch_uio=False, takeover_at_start=False, pcap_dir=args.pcap)
    return asyncio.run(serve_worker(args.fd, options, args.index))


if __name__ == "__main__":
    sys.exit(main())
