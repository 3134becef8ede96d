"""The iscsi-hba daemon: iSCSI sessions, TCMU rings and the disks they become.

Theory of operation
-------------------
One asyncio loop owns everything: the iSCSI sessions (:class:`initiator.transport.Session`,
shared by the LUNs of one target at one portal), one
:class:`tcmu_handler.dispatcher.Dispatcher` per TCMU device, and the configfs objects that
make each LUN a disk. configfs writes block (linking a LUN makes the kernel send INQUIRY
through the very ring we serve), so they run in worker threads (:mod:`hba.kernel`) while the
loop keeps serving rings.

Attaching a LUN (:meth:`Daemon.attach`) makes one *path* per portal it is reached through
(:class:`hba.disks.DiskPath`; one for a plain LUN, several for a multipath URL or entry, plus
what SendTargets lists with ``DiscoverPortals``). Every path logs in at once; then, for each
path that did:

1. log in (or reuse the target's session at that portal) and ask the LUN its capacity and
   block limits (a path whose LUN differs in size from the first's is refused);
2. create the TCMU user backstore (dev_config ``iscsi/<cfgstring>``, never a secret);
3. open its uio device and start serving the ring — before anything can reach it;
4. link it to a new tcm_loop target, which makes the SCSI midlayer probe it;
5. raise the disk's SCSI timeout above the replacement timeout, and wait for udev to finish
   with ``/dev/sdX`` and its ``/dev/disk/by-id`` links.

The attach succeeds when one path did. The paths whose portal did not answer log in in the
background (their sessions retry as recovery does) and get steps 1-5 once they are logged in.
dm-multipath (multipathd) assembles the ``/dev/sdX`` of the paths into one device: they report
the same VPD 0x83 identifiers, each with its own remote target port (ALUA passes through).

Paths fail and come back on their own, driven by their sessions' states
(:meth:`Daemon._path_changed`, one log line per change): a lost connection holds the path's
I/O up to the replacement timeout (5 s for multipath), then its ring answers NOT READY 08/00
— a path error that dm-multipath moves to another path (:class:`tcmu_handler.scsi.PathPolicy`)
— until the session logs in again and multipathd's checker reinstates the path. The timeouts
are ordered replacement < TCMU ``cmd_time_out`` < SCSI timeout (:func:`cmd_time_out`,
:func:`scsi_timeout`), so that even a daemon that stopped answering degrades into path errors
(TCMU's own NOT READY 08/00) before the SCSI error handler resets and offlines the disk.

Detaching reverses it for every path: refuse while mounted or held (unless forced), flush,
unlink the LUN (the kernel sends SYNCHRONIZE CACHE through the ring), delete the backstore
(the uio device goes, the dispatcher stops), log out when the session's last LUN is gone.

Restart safety: at start, every ``iscsi/`` backstore already in configfs (a previous daemon
died) is taken over — block, reset the ring, reopen, unblock — so its ``/dev/sdX`` keeps
working; its session logs in in the background while the kernel's commands wait. The
backstores of one multipath disk (their cfgstrings name the portal, their names the path
number) become its paths again, and their sessions log in with the same derived ISIDs
(:mod:`hba.sessions`), so the target keeps their persistent reservations. uio devices that
appear later with our subtype (made by ``targetcli /backstores/user:iscsi create``) are served
the same way.

Cores: with ``workers`` above 1 (``hbactl daemon --workers N``) this object in the main process
serves no disk itself: it keeps the configuration, the retries and the udev watcher, and
routes attach, detach, adoption and the reports to worker processes, each running a Daemon of
its own over the disks placed on it (:mod:`hba.workers`, which has the why). With one worker
everything stays in this process, as described above.

The seams: what a URL, nickname or cfgstring stands for is :mod:`hba.specs` (credentials from
:mod:`initiator.credentials`); the sessions the LUNs of a target share are :mod:`hba.sessions`;
when an ``Enable = on`` entry that failed is tried again is :mod:`hba.retry`; a disk's record
and its states are :mod:`hba.disks`. This module is the life cycle: attach, detach, adopt,
serve, and the tasks that tie those together.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import fcntl
import logging
import os
import shlex
import stat
import time
from collections.abc import Callable, Collection, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hba import devices, kernel
from hba.config import Config, load_config
from hba.disks import Disk, DiskPath, DiskState, PathState, backstore_path, entry_row
from hba.errors import AttachError, DiskBusyError, HBAError, NoSuchDiskError, WorkerError
from hba.journal import SessionEvents
from hba.retry import Retry, RetrySchedule, worth_retrying
from hba.sessions import SessionPool
from hba.specs import LunSpec, PathSpec, SpecDefaults, SpecResolver, same_portal
from initiator.client import ScsiClient
from initiator.discovery import discover
from initiator.errors import ISCSIError
from initiator.transport import Session, SessionState, default_initiator_name
from tcmu_handler.device import UioDevice, UioInfo, find_device, find_devices
from tcmu_handler.dispatcher import Dispatcher, StopReason
from tcmu_handler.errors import TCMUError
from tcmu_handler.executor import SessionExecutor

if TYPE_CHECKING:
    from hba.workers import Inventory, WorkerLink, WorkerPool

log = logging.getLogger("iscsi-hba")

BLKFLSBUF = 0x1261
MAX_TRANSFER = 8 << 20    # bytes per SCSI command we let the kernel build at most
SCSI_TIMEOUT_MARGIN = 30  # seconds on top of the replacement timeout: the disk's SCSI timeout
RING_TIMEOUT_MARGIN = 10  # and TCMU's cmd_time_out, between the two (module docstring)
BLOCK_LAYER_MAX_REQUEST = 1280 << 10
"""The largest request the block layer builds by default (BLK_DEF_MAX_SECTORS, Linux 6.1).
It, not the backstore's ``hw_max_sectors``, is our disk's ``max_sectors_kb``: INQUIRY passes
through the ring, so sd reads the remote's Block Limits page."""


def data_area_mb(queue_depth: int, max_io: int, max_transfer: int | None) -> int:
    """TCMU's ``max_data_area_mb`` for a disk: room for twice ``queue_depth`` commands of
    the largest size the kernel will send (:data:`BLOCK_LAYER_MAX_REQUEST`, or the remote's
    ``max_transfer`` bytes when smaller; at least ``max_io``), 64 to 1024 MiB. The kernel
    allocates the pages as commands need them: a large area costs nothing until used, a
    small one makes commands wait for room."""
    largest = BLOCK_LAYER_MAX_REQUEST
    if max_transfer:
        largest = min(largest, max_transfer)
    return min(1024, max(64, (queue_depth * max(largest, max_io) * 2) >> 20))


def cmd_time_out(spec: LunSpec) -> int:
    """TCMU's ``cmd_time_out`` for the backstores of ``spec``: after the replacement timeout
    (until which the session may hold a command), before the SCSI timeout."""
    return int(spec.session.replacement_timeout) + RING_TIMEOUT_MARGIN


def scsi_timeout(spec: LunSpec) -> int:
    """The SCSI command timeout of the disks of ``spec``: after everything else."""
    return int(spec.session.replacement_timeout) + SCSI_TIMEOUT_MARGIN


@dataclass(slots=True)
class DaemonOptions:
    config_path: str | None = None
    initiator_name: str | None = None
    replacement_timeout: float = 120.0
    login_timeout: float = 15.0
    queue_depth: int = 32
    watch_uio: bool = True
    pcap_dir: str | None = None   # record each session's PDUs into a pcap file here
    workers: int = 1              # above 1: serve the disks from worker processes (hba.workers)
    priority: int | None = None   # the nice value of the workers (hba.priority); None: as is
    takeover_at_start: bool = True   # a worker is told which backstores to take over
    on_event: Callable[[str, dict[str, Any]], None] | None = field(default=None, repr=False)
    # Called before each configuration entry attach_enabled() tries: (nickname, its number,
    # how many, the entry's LoginTimeout); hbactl daemon tells systemd during the start.
    on_attaching: Callable[[str, int, int, float], None] | None = field(default=None,
                                                                        repr=False)


class Daemon:
    """See the module docstring. Create, ``await start()``, use, ``await stop()``."""

    def __init__(self, options: DaemonOptions | None = None) -> None:
        self.options = options or DaemonOptions()
        self.initiator_name = self.options.initiator_name or default_initiator_name()
        self.specs = SpecResolver(
            SpecDefaults(initiator_name=self.initiator_name,
                         login_timeout=self.options.login_timeout,
                         replacement_timeout=self.options.replacement_timeout,
                         queue_depth=self.options.queue_depth),
            self.options.config_path)
        self.sessions = SessionPool(self._event, pcap_dir=self.options.pcap_dir,
                                    on_state=self._session_changed)
        self.disks: dict[str, Disk] = {}
        self._tasks: set[asyncio.Task[None]] = set()   # _spawn's
        self._stopping = False
        self._lock = asyncio.Lock()
        self._watch_task: asyncio.Task[None] | None = None
        self._serving: set[str] = set()     # backstore names with a dispatcher
        # user_N/backstore (hba.disks.backstore_path) -> why it could not be served
        self._unservable: dict[str, str] = {}
        self._retries = RetrySchedule()     # configuration nickname -> its retry
        self._retry_tasks: dict[str, asyncio.Task[None]] = {}
        self._retry_wakes: dict[str, asyncio.Event] = {}   # set: attempt now (_retry_now)
        # Enable = on entries whose attach failed in a way trying again cannot fix (a wrong
        # secret, a refused initiator): hbactl list/status rows until attached, detached,
        # disabled, or tried again after a reload.
        self._failed: dict[str, dict[str, Any]] = {}
        self._attaching: list[LunSpec] = []    # attaches under way (their session's events)
        # Enable = on entries attach_enabled() is attaching or about to (one after the other:
        # a start with a target down can take minutes): hbactl list shows them "attaching".
        self._queued: dict[str, dict[str, Any]] = {}
        self.session_events = SessionEvents(log)
        self.started = False
        self.pool: WorkerPool | None = None
        if self.options.workers > 1:
            from hba.workers import WorkerPool

            self.pool = WorkerPool(self.options, self.options.workers, self._worker_event,
                                   self._worker_restarted)

    @property
    def lock(self) -> asyncio.Lock:
        """Held by attach, detach, adoption and the udev watcher: one change at a time."""
        return self._lock

    @property
    def config(self) -> Config | None:
        """The configuration as last read (None: no file)."""
        return self.specs.config

    @config.setter
    def config(self, config: Config | None) -> None:
        self.specs.config = config

    def _event(self, kind: str, data: dict[str, Any]) -> None:
        """Report ``kind`` (attach, adopt, detach, session, path, logout) to
        ``options.on_event``; log session events (hba.journal)."""
        if kind == "session":
            target, portal = str(data.get("target")), str(data.get("portal"))
            specs = [d.spec for d in self.disks.values()] + self._attaching
            self.session_events.state_changed(
                target, portal, str(data.get("state")), cause=str(data.get("cause") or ""),
                disks=sorted({s.name for s in specs if s.target == target
                              and any(str(p) == portal for p in s.portals)}))
        if self.options.on_event is not None:
            self.options.on_event(kind, data)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a background task of the daemon, kept referenced; its failure is logged."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.error("background task failed: %s", task.exception(),
                          exc_info=task.exception())

        task.add_done_callback(done)

    # -- life cycle ------------------------------------------------------------------------

    async def start(self, *, attach_enabled: bool = True) -> None:
        """Check the kernel, read the configuration, adopt existing devices, attach entries
        with ``Enable = on``. Attach failures of entries are logged, not fatal."""
        await asyncio.to_thread(kernel.preflight)
        if self.options.pcap_dir is not None:
            await asyncio.to_thread(prepare_capture_dir, self.options.pcap_dir)
        if self.options.config_path is not None:
            self.config = await asyncio.to_thread(self._load_config)
        if self.pool is not None:
            async with self._lock:
                await self._adopt_in_workers()
        elif self.options.takeover_at_start:
            await self.adopt_existing()
        if self.options.watch_uio:
            self._watch_task = asyncio.get_running_loop().create_task(self._watch_uio())
        self.started = True
        if attach_enabled:
            await self.attach_enabled()

    async def attach_enabled(self) -> None:
        """Attach every ``Enable = on`` entry of the configuration that is not attached yet
        (at start, and after the configuration was read again). An entry that fails for a
        reason that may go away (the target is down, unreachable or not set up yet) is tried
        again in the background, 5 s later and then at doubling intervals up to a minute, until
        it attaches, is detached, or leaves the configuration; ``hbactl list`` shows it as
        ``retrying``; called again (the configuration was read again), it tries every entry
        still retrying at once (:mod:`hba.retry` has why). Other failures (a wrong secret, a
        refused initiator) are logged once and listed as ``failed`` until the entry is fixed
        and the configuration read again.
        An attached multipath entry gets a path for each address (or SendTargets portal) it
        has none through yet, in the background (a taken-over disk, an edited entry)."""
        wanted = set()
        if self.config is not None:
            attached = await self._attached_nicknames()
            todo = []
            for entry in self.config.enabled():
                if entry.session_type.value.lower() != "normal":
                    continue
                wanted.add(entry.nickname)
                where = attached.get(entry.nickname)
                if where is not None:
                    self._add_paths_on(where, entry.nickname)
                if where is None and entry.nickname in self._retries:
                    self._retry_now(entry.nickname)
                elif where is None:
                    todo.append(entry)
            for entry in todo:
                self._queued[entry.nickname] = self._entry_row(entry.nickname,
                                                               DiskState.ATTACHING)
            try:
                for number, entry in enumerate(todo, start=1):
                    if self.options.on_attaching is not None:
                        self.options.on_attaching(entry.nickname, number, len(todo),
                                                  float(entry.login_timeout))
                    self._failed.pop(entry.nickname, None)
                    try:
                        await self.attach_described(entry.nickname)
                    except AttachError as exc:
                        self._failed_at_start(entry.nickname, exc)
                    except HBAError as exc:
                        self._give_up(entry.nickname, exc)
                    finally:
                        self._queued.pop(entry.nickname, None)
            finally:   # cancelled (a stop during the start): the rest are not attaching
                for entry in todo:
                    self._queued.pop(entry.nickname, None)
        for nickname in list(self._retries):
            if nickname not in wanted:
                log.info("%s is no longer enabled in the configuration: not retrying it",
                         nickname)
                self._stop_retrying(nickname)
        for nickname in list(self._failed):
            if nickname not in wanted:
                del self._failed[nickname]

    def _attached(self, nickname: str) -> Disk | None:
        return next((d for d in self.disks.values() if d.spec.nickname == nickname), None)

    async def _attached_nicknames(self) -> dict[str, int]:
        """Nicknames of attached disks -> the worker serving them (-1: this process)."""
        if self.pool is None:
            return {d.spec.nickname: -1 for d in self.disks.values()
                    if d.spec.nickname is not None}
        return {nickname: index for index, inv in (await self.pool.inventories()).items()
                for nickname in inv.nicknames}

    def _add_paths_on(self, where: int, nickname: str) -> None:
        """:meth:`add_missing_paths` of ``nickname``, here or in worker ``where``."""
        if where < 0 or self.pool is None:
            self.add_missing_paths(nickname)
            return
        link = self.pool.links[where]
        if link is not None:
            self._spawn(self._ask(link, "add_paths", nickname=nickname))

    def add_missing_paths(self, nickname: str) -> None:
        """In the background, :meth:`_add_missing_paths` of the multipath disk of
        configuration entry ``nickname``, if it is attached (here)."""
        disk = self._attached(nickname)
        if disk is not None and disk.spec.multipath:
            self._spawn(self._add_missing_paths(disk))

    def _failed_at_start(self, nickname: str, exc: AttachError) -> None:
        if not exc.retryable:
            self._give_up(nickname, exc)
            return
        loop = asyncio.get_running_loop()
        retry = self._retries.start(nickname, self.specs.resolve(nickname), str(exc),
                                    loop.time())
        _log_retry(nickname, retry)
        wake = self._retry_wakes[nickname] = asyncio.Event()
        self._retry_tasks[nickname] = loop.create_task(self._retry(nickname, wake))

    def _retry_now(self, nickname: str) -> None:
        """The configuration was read again: try ``nickname``, which is being retried, at
        once and as its entry now says (:meth:`hba.retry.RetrySchedule.restart`). An
        attempt under way is not cancelled: another follows it at once, since it may have
        started with the entry as it was."""
        retry = self._retries.get(nickname)
        wake = self._retry_wakes.get(nickname)
        if retry is None or wake is None:
            return
        try:
            spec = self.specs.resolve(nickname)
        except (HBAError, ISCSIError):
            spec = retry.spec   # the attempt fails with the same error, which says what
        self._retries.restart(nickname, spec, asyncio.get_running_loop().time())
        log.info("%s: the configuration was read again: trying to attach it now", nickname)
        wake.set()

    async def _retry(self, nickname: str, wake: asyncio.Event) -> None:
        """Attach ``nickname`` whenever its schedule says (or ``wake`` is set), until it
        leaves the schedule."""
        loop = asyncio.get_running_loop()
        failure: HBAError | None = None
        while (retry := self._retries.get(nickname)) is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, retry.next_attempt - loop.time())):
                    await wake.wait()
            wake.clear()
            if nickname in await self._attached_nicknames():
                break
            try:
                await self.attach_described(nickname)
            except (AttachError, WorkerError) as exc:
                # A worker that died under the attach is replaced: worth another attempt.
                if isinstance(exc, WorkerError) or exc.retryable:
                    retry = self._retries.failed(nickname, str(exc), loop.time())
                    if retry is not None:
                        _log_retry(nickname, retry)
                    continue
                failure = exc
            except HBAError as exc:
                failure = exc
            break
        if (self._retry_tasks.get(nickname) is asyncio.current_task()
                and self._stop_retrying(nickname) is not None and failure is not None):
            self._give_up(nickname, failure)

    def _give_up(self, nickname: str, exc: HBAError) -> None:
        """Entry ``nickname`` failed to attach in a way trying again cannot fix: log it, and
        list it as failed, with why and what to do, until it is fixed and read again."""
        log.error("could not attach %s: %s; not trying again until the configuration is "
                  "read again (systemctl reload iscsi-hba) or `hbactl attach %s`",
                  nickname, exc, nickname)
        self._failed[nickname] = self._entry_row(nickname, DiskState.FAILED, error=str(exc))

    def _entry_row(self, nickname: str, state: DiskState, **more: Any) -> dict[str, Any]:
        """The ``list`` row of configuration entry ``nickname``, which is no disk yet."""
        entry = self.config.get(nickname) if self.config is not None else None
        if entry is None:
            return entry_row(nickname, None, None, None, state, **more)
        return entry_row(nickname, entry.target_name, entry.portal, entry.lun, state, **more)

    def _stop_retrying(self, nickname: str) -> Retry | None:
        self._retry_wakes.pop(nickname, None)
        task = self._retry_tasks.pop(nickname, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        return self._retries.remove(nickname)

    def _load_config(self) -> Config | None:
        path = self.options.config_path
        assert path is not None
        if not os.path.exists(path):
            log.info("no configuration file %s; nothing to attach at start", path)
            return None
        config = load_config(path)
        for warning in config.warnings:
            log.warning("%s", warning)
        return config

    async def reload_config(self) -> None:
        """Read the configuration file again (SIGHUP, or a cfgstring naming a new entry).

        Disks already attached keep the settings they were attached with. A file that cannot
        be used leaves the previous configuration in place and raises :class:`ConfigError`.
        """
        if self.options.config_path is None:
            return
        self.config = await asyncio.to_thread(self._load_config)
        log.info("read the configuration %s again: %d entries", self.options.config_path,
                 len(self.config.entries) if self.config is not None else 0)
        if self.pool is not None:
            await self.pool.gather("reload")

    async def stop(self) -> None:
        """Stop serving. Devices stay in the kernel (their I/O waits) so a restarted daemon
        takes them over; use detach to remove them."""
        self._stopping = True   # the paths' sessions close now: not a state change to log
        for nickname in list(self._retries):
            self._stop_retrying(nickname)
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        for task in list(self._tasks):
            task.cancel()
        if self.pool is not None:
            await self.pool.stop()
        for disk in list(self.disks.values()):
            for path in disk.paths:
                if path.setup is not None:
                    path.setup.cancel()
                if path.watcher is not None:
                    path.watcher.cancel()
                if path.dispatcher is not None:
                    await path.dispatcher.close(timeout=10)
        await self.sessions.close()
        self.disks.clear()

    # -- attach ----------------------------------------------------------------------------

    async def attach(self, what: str) -> Disk:
        """Attach a LUN named by URL or configuration nickname; returns it once usable.
        Here: with worker processes, :meth:`attach_described` places it on one."""
        if self.pool is not None:
            raise HBAError("this daemon serves its disks from worker processes: "
                           "attach_described() places a disk on one")
        spec = self.specs.resolve(what)
        async with self._lock:
            self._refuse_twice(spec)
            self._attaching.append(spec)
            try:
                attached = await self._attach_locked(spec)
            finally:
                self._attaching.remove(spec)
        if spec.nickname is not None:
            self._stop_retrying(spec.nickname)  # "attached ..." was logged
            self._failed.pop(spec.nickname, None)
        return attached

    async def attach_described(self, what: str) -> dict[str, Any]:
        """:meth:`attach`, here or in a worker (:func:`hba.workers.place`); the disk as
        ``hbactl list`` shows it."""
        if self.pool is None:
            return (await self.attach(what)).describe()
        from hba.workers import REPLACEMENT_BOUND, place

        spec = self.specs.resolve(what)
        for attempt in (1, 2):
            async with self._lock:
                inventories = await self.pool.inventories()
                if attempt == 2 and any(spec.name in inv.names for inv in inventories.values()):
                    # The dead worker had made the backstore, and its replacement took it over.
                    row = next((row for row in await self.pool.list_rows()
                                if row.get("name") == spec.name), None)
                    if row is not None:
                        described = row
                        break
                owner = next((index for index, inv in inventories.items()
                              if spec.target in inv.targets or spec.name in inv.names), None)
                link = await self.pool.worker(
                    place(self.pool.loads(inventories), self.pool.limit, owner))
                try:
                    described = await link.call("attach", what=what)
                    break
                except WorkerError:
                    if attempt == 2 or not link.closed:
                        raise
            # The worker died under the attach (a crash, SIGKILL). Whatever it had made of
            # the disk is taken over by its replacement (which needs the lock): wait for that,
            # then find the disk there or attach it again.
            log.warning("worker %d (pid %d) ended during the attach of %s: attaching again "
                        "once its replacement has taken over", link.index, link.pid,
                        spec.name)
            try:
                await asyncio.wait_for(asyncio.shield(link.replaced), REPLACEMENT_BOUND)
            except TimeoutError:
                raise AttachError(f"attaching {spec.name} failed: worker {link.index} ended "
                                  f"during the attach and was not replaced within "
                                  f"{REPLACEMENT_BOUND:g} s; see the daemon's log") from None
        if spec.nickname is not None:
            self._stop_retrying(spec.nickname)
            self._failed.pop(spec.nickname, None)
        return described

    def _refuse_twice(self, spec: LunSpec) -> None:
        for disk in self.disks.values():
            if (disk.spec.target, disk.spec.lun) != (spec.target, spec.lun):
                continue
            for path in disk.paths:
                if any(same_portal(path.spec.portal, p) for p in spec.portals):
                    raise AttachError(
                        f"{spec.target} LUN {spec.lun} at {path.spec.portal} is already "
                        f"attached as {disk.name}")
            # The same LUN through other portals: one disk with several paths, not two disks
            # (a path's timeouts are chosen when its disk is attached).
            raise AttachError(
                f"{spec.target} LUN {spec.lun} is already attached as {disk.name} through "
                f"{', '.join(str(p.spec.portal) for p in disk.paths)}; to reach it through "
                f"{', '.join(map(str, spec.portals))} as well, detach {disk.name} and attach "
                "all portals in one URL (iscsi://host1,host2/...) or one configuration entry "
                "(TargetAddress = host1, host2)")
        if spec.name in self.disks:
            disk = self.disks[spec.name]
            raise AttachError(
                f"{spec.name} is already attached"
                + (f" as {disk.device.node}" if disk.device else ""))

    async def _attach_locked(self, spec: LunSpec) -> Disk:
        if spec.discover:
            spec = await self._discover(spec)
        paths = spec.paths()
        # Every path logs in at once: a portal that does not answer costs its login timeout.
        logins = await asyncio.gather(*(self.sessions.acquire(p) for p in paths),
                                      return_exceptions=True)
        up = [(p, s) for p, s in zip(paths, logins, strict=True) if isinstance(s, Session)]
        failed = [(p, e) for p, e in zip(paths, logins, strict=True)
                  if not isinstance(e, Session)]
        for _path, error in failed:
            if not isinstance(error, Exception):
                for _p, session in up:
                    await self.sessions.release(session)
                raise error   # cancelled
        if not up:
            errors = [e for _p, e in failed if isinstance(e, Exception)]
            where = ", ".join(map(str, spec.portals))
            raise AttachError(
                f"attaching {spec.name} ({spec.target} LUN {spec.lun} at {where}) failed: "
                + "; ".join(dict.fromkeys(map(str, errors))),
                retryable=any(isinstance(e, ISCSIError) and worth_retrying(e)
                              for e in errors)) from None
        disk = Disk(spec=spec, paths=[self._new_path(p, s) for p, s in up])
        try:
            left_out: BaseException | None = None
            for path in list(disk.paths):
                try:
                    await self._setup_path(disk, path)
                except (HBAError, ISCSIError, TCMUError) as exc:
                    if not spec.multipath:
                        raise
                    # One path that cannot be made (another LUN behind that portal, ...)
                    # does not keep the others from serving.
                    log.error("%s: left out: %s", path.label, exc)
                    left_out = left_out or exc
                    disk.paths.remove(path)
                    await self.sessions.release(path.session)
            if disk.device is None:
                assert left_out is not None
                raise left_out
            for path_spec, error in failed:
                if isinstance(error, ISCSIError) and worth_retrying(error):
                    # Logged in again in the background; its disk is made once it is.
                    session = await self.sessions.acquire(path_spec, background=True)
                    path = self._new_path(path_spec, session)
                    path.error = f"login failed: {error}"
                    disk.paths.append(path)
                else:
                    log.error("%s: left out: %s", path_spec, error)
        except BaseException as exc:
            await self._rollback(disk)
            where = ", ".join(map(str, spec.portals))
            if isinstance(exc, (HBAError, ISCSIError)):
                raise AttachError(f"attaching {spec.name} ({spec.target} LUN {spec.lun} at "
                                  f"{where}) failed: {exc}",
                                  retryable=isinstance(exc, ISCSIError)
                                  and worth_retrying(exc)) from None
            if isinstance(exc, TCMUError):
                raise AttachError(f"attaching {spec.name} failed: {exc}") from None
            raise
        disk.state = DiskState.ATTACHED
        self.disks[spec.name] = disk
        device = disk.device
        assert device is not None
        log.info("attached %s: %s LUN %d at %s -> %s (%s)", spec.name, spec.target, spec.lun,
                 ", ".join(str(p.spec.portal) for p in disk.paths), device.node,
                 device.primary_link or "no by-id link")
        for path in disk.paths:
            self._path_changed(disk, path)
        self._event("attach", disk.describe())
        return disk

    async def _discover(self, spec: LunSpec) -> LunSpec:
        """``spec`` with every portal SendTargets lists for its target, asked through its
        portals in turn (the first that answers); unchanged, with a warning, when none does."""
        config = dataclasses.replace(spec.session, reconnect_forever=False)
        problems: list[str] = []
        for portal in spec.portals:
            try:
                targets = await discover(portal, config, what=spec.target)
            except (ISCSIError, OSError) as exc:
                problems.append(f"{portal}: {exc}")
                continue
            found = [t for t in targets if t.name == spec.target]
            if not found:
                problems.append(f"{portal} does not list {spec.target}")
                continue
            for _, why in found[0].unusable:
                log.warning("%s: %s", spec.name, why)
            more = spec.with_portals(found[0].portals)
            if len(more.portals) > len(spec.portals):
                log.info("%s: SendTargets at %s lists %s", spec.name, portal,
                         ", ".join(f"{p},{p.tpgt}" for p in found[0].portals))
            return more
        log.warning("%s: no SendTargets answer (%s); using the configured portals only",
                    spec.name, "; ".join(problems))
        return spec

    def _new_path(self, spec: PathSpec, session: Session) -> DiskPath:
        return DiskPath(spec=spec, session=session, backstore=spec.backstore)

    async def _setup_path(self, disk: Disk, path: DiskPath) -> None:
        """Make the kernel side of a logged-in path (steps 1-5 of the module docstring).
        On failure whatever was made of it is removed again, and the error raised."""
        spec = disk.spec
        created = False
        try:
            client = ScsiClient(path.session, spec.lun)
            capacity = await client.capacity()
            if disk.size and (capacity.size_bytes, capacity.block_size) != \
                    (disk.size, disk.block_size):
                raise AttachError(
                    f"{path.label} reports {capacity.size_bytes} bytes in blocks of "
                    f"{capacity.block_size}, the disk has {disk.size} in blocks of "
                    f"{disk.block_size}: not the same LUN, check the target's portals")
            limits = await client.block_limits()
            max_io = MAX_TRANSFER
            params = path.session.parameters
            if params is not None:
                max_io = min(max_io, params.max_burst_length)
            if limits is not None and limits.max_transfer_length:
                max_io = min(max_io, limits.max_transfer_length * capacity.block_size)
            max_io = max(max_io - max_io % capacity.block_size, capacity.block_size)
            area = data_area_mb(spec.queue_depth, max_io,
                                limits.max_transfer_length * capacity.block_size
                                if limits is not None else None)
            info = await asyncio.to_thread(
                kernel.create_backstore, path.backstore, path.spec.cfgstring(),
                capacity.size_bytes, hw_max_sectors=max_io // 512, max_data_area_mb=area,
                cmd_time_out=cmd_time_out(spec))
            created = True
            path.hba_index = info.hba_index
            disk.size, disk.block_size = capacity.size_bytes, capacity.block_size
            uio = await _wait_for_uio(path.backstore, info.hba_index)
            await self._serve(disk, path, uio, takeover=False)
            linked = await asyncio.to_thread(kernel.link_loopback, path.backstore)
            path.scsi_address = linked.scsi_address
            if path.scsi_address is None:
                raise AttachError(
                    f"tcm_loop did not report a SCSI address for {path.backstore}")
            await asyncio.to_thread(kernel.set_disk_timeout, path.scsi_address,
                                    scsi_timeout(spec))
            path.device = await devices.wait_for_disk(path.scsi_address)
            path.error = None
        except BaseException:
            await self._undo_path(path, created)
            raise

    async def _undo_path(self, path: DiskPath, created: bool) -> None:
        """Remove the kernel side of a path whose set-up failed (its session stays)."""
        if created:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(kernel.unlink_and_delete, path.backstore)
        if path.dispatcher is not None:
            path.ring_broken = False
            dispatcher, path.dispatcher = path.dispatcher, None
            with contextlib.suppress(Exception):
                await dispatcher.close(timeout=5)
            self._serving.discard(path.backstore)
        path.hba_index = -1
        path.scsi_address = None
        path.device = None

    async def _rollback(self, disk: Disk) -> None:
        # Our own removal: _watch_dispatcher must not release the sessions a second time.
        disk.state = DiskState.DETACHING
        for path in disk.paths:
            await self._undo_path(path, created=path.hba_index >= 0)
            await self.sessions.release(path.session)

    async def _serve(self, disk: Disk, path: DiskPath, uio: UioInfo, *, takeover: bool) -> None:
        """Start the ring of ``path`` and watch for its end."""
        # SessionExecutor: a refused ABORT TASK escalates to a LOGICAL UNIT RESET.
        executor = SessionExecutor(path.session)
        if takeover:
            dispatcher = await asyncio.to_thread(
                Dispatcher.takeover, uio, executor, lun=disk.spec.lun, policy=disk.spec.policy)
        else:
            device = await asyncio.to_thread(UioDevice.open, uio)
            dispatcher = Dispatcher(device, executor, lun=disk.spec.lun,
                                    policy=disk.spec.policy)
        path.dispatcher = dispatcher
        dispatcher.start()
        self._serving.add(path.backstore)
        path.watcher = asyncio.get_running_loop().create_task(
            self._watch_dispatcher(disk, path))

    async def _watch_dispatcher(self, disk: Disk, path: DiskPath) -> None:
        dispatcher = path.dispatcher
        assert dispatcher is not None
        reason = await dispatcher.run()
        self._serving.discard(path.backstore)
        if path.dispatcher is not dispatcher:
            return   # replaced or undone by us
        if reason is StopReason.REMOVED and disk.state is not DiskState.DETACHING:
            # Someone removed the backstore behind our back (targetcli, rtslib): forget it.
            log.warning("%s: its TCMU device was removed; forgetting it", path.label)
            disk.paths.remove(path)
            await self.sessions.release(path.session)
            if not disk.paths:
                self.disks.pop(disk.name, None)
                self._event("detach", disk.describe())
        elif reason is StopReason.RING_CORRUPT:
            path.ring_broken = True
            self._path_changed(disk, path)
            if all(p.ring_broken for p in disk.paths):
                disk.state = DiskState.RING_BROKEN

    # -- paths -----------------------------------------------------------------------------

    def _session_changed(self, session: Session, _state: SessionState) -> None:
        """A session changed state (:class:`SessionPool`): so may the paths it carries."""
        for disk in list(self.disks.values()):
            for path in disk.paths:
                if path.session is session:
                    self._path_changed(disk, path)

    def _path_changed(self, disk: Disk, path: DiskPath) -> None:
        """Log a path's state when it changed (one line per change), and make the kernel side
        of a path that logged in late."""
        if disk.state is not DiskState.ATTACHED or self._stopping:
            return
        state = path.state
        if state is PathState.CONNECTING and path.dispatcher is None and \
                path.session.state is SessionState.LOGGED_IN and path.setup is None:
            path.setup = asyncio.get_running_loop().create_task(self._setup_late(disk, path))
        if state is path.logged:
            return
        previous, path.logged = path.logged, state
        now = asyncio.get_running_loop().time()
        lasted = now - path.changed_at
        path.changed_at, path.since = now, time.time()
        timeout = disk.spec.session.replacement_timeout
        failing = "fails over" if disk.spec.multipath else "fails"

        def say(level: int, what: str) -> None:
            self.session_events.path_changed(disk.spec.target, str(path.spec.portal),
                                             path.label, state.value, what,
                                             disks=[disk.name], level=level)

        if previous is None and state is not PathState.UP:
            # Taken over, or its portal did not answer at attach: logging in in the background.
            say(logging.INFO, "logging in in the background "
                f"({path.why() or 'not logged in yet'})")
        elif state is PathState.UP:
            device = f" as {path.device.node}" if path.device is not None else ""
            if previous is not None:
                say(logging.INFO, f"up{device} after {lasted:.0f} s")
            elif disk.spec.multipath:   # a plain disk's attach line says it
                say(logging.INFO, f"up{device}")
        elif state is PathState.DOWN:
            say(logging.WARNING, f"down ({path.session.recovery.cause}); its I/O waits, and "
                f"{failing} after {timeout:g} s unless it is back")
        elif state is PathState.FAILED:
            say(logging.WARNING,
                f"not back within {timeout:g} s: its I/O {failing} now; reconnecting")
        elif state is PathState.CONNECTING:
            say(logging.WARNING, f"not logged in ({path.why() or 'no answer yet'}); "
                "trying again in the background")
        else:
            say(logging.WARNING, path.why() or state.value)
        self._event("path", {"name": disk.name, **path.describe()})

    async def _setup_late(self, disk: Disk, path: DiskPath) -> None:
        """The kernel side of a path whose session logged in after its disk was attached."""
        try:
            async with self._lock:
                if disk.state is not DiskState.ATTACHED or path not in disk.paths or \
                        path.dispatcher is not None or \
                        path.session.state is not SessionState.LOGGED_IN:
                    return
                try:
                    await self._setup_path(disk, path)
                except (HBAError, ISCSIError, TCMUError) as exc:
                    path.error = f"could not make its disk: {exc}"
                    log.error("%s: could not make its disk: %s (tried again when it logs in "
                              "again)", path.label, exc)
                    return
        finally:
            path.setup = None
        self._path_changed(disk, path)
        self._event("attach", disk.describe())

    async def _add_missing_paths(self, disk: Disk) -> None:
        """Paths for the portals of ``disk``'s configuration entry (and, with DiscoverPortals,
        of SendTargets) it has no path through yet: after a takeover, and when the
        configuration is read again (:meth:`attach_enabled`). They log in in the
        background."""
        spec = disk.spec
        if spec.nickname is None or self.config is None:
            return
        entry = self.config.get(spec.nickname)
        if entry is None:
            return
        wanted = self.specs.from_entry(entry)
        if (wanted.target, wanted.lun) != (spec.target, spec.lun):
            return
        if wanted.discover:
            wanted = await self._discover(wanted)
        for portal in wanted.portals:
            async with self._lock:
                if disk.state is not DiskState.ATTACHED or \
                        self.disks.get(disk.name) is not disk:
                    return
                if disk.path_at(portal) is not None:
                    continue
                number = max((p.index for p in disk.paths), default=0) + 1
                path_spec = spec.path(portal, number)
                session = await self.sessions.acquire(path_spec, background=True)
                path = self._new_path(path_spec, session)
                disk.paths.append(path)
            log.info("%s: new path %d through %s", disk.name, number, portal)
            self._path_changed(disk, path)

    # -- detach ----------------------------------------------------------------------------

    def find(self, what: str) -> Disk:
        """A disk by name, device node of any path (``/dev/sdX``, ``sdX``), by-id link, or
        the multipath device holding its paths."""
        if what in self.disks:
            return self.disks[what]
        real = os.path.realpath(what) if what.startswith("/") else f"/dev/{what}"
        for disk in self.disks.values():
            for path in disk.paths:
                dev = path.device
                if dev is None:
                    continue
                if real == dev.node or what in dev.by_id or what == dev.name:
                    return disk
            held = devices.holder([p.device.name for p in disk.paths if p.device is not None])
            if held is not None and (what == held or os.path.realpath(held) == real):
                return disk
        known = ", ".join(sorted(self.disks)) or "none"
        raise NoSuchDiskError(f"no attached LUN is called {what!r} (attached: {known})")

    async def detach(self, what: str, *, force: bool = False) -> dict[str, Any]:
        """Orderly detach of every path; refuses while the disk (or any of its paths) is
        mounted or held unless ``force``."""
        async with self._lock:
            # A LUN linked by someone else (targetcli) may have got its disk since we saw it:
            # without it, the mount check below would let a mounted disk go.
            if self.pool is not None:
                return await self._detach_in_workers(what, force)
            await self.refresh_devices()
            if what not in self.disks and (what in self._retries or what in self._failed):
                return self._forget_retry(what)
            disk = self.find(what)
            nodes = [p.device for p in disk.paths if p.device is not None]
            busy = [use for dev in nodes for use in devices.users(dev.name)]
            if busy and not force:
                shown = ", ".join(dev.node for dev in nodes)
                remedy = "Unmount it first"
                if len(nodes) > 1:
                    remedy += " and remove its multipath device (`multipath -f NAME`)"
                raise DiskBusyError(f"{disk.name} ({shown}) is in use: " + "; ".join(busy)
                                    + f". {remedy}, or detach with --force")
            for dev in nodes:
                await asyncio.to_thread(_flush, dev.node)
            previous, disk.state = disk.state, DiskState.DETACHING
            try:
                # Served while the LUN goes (SYNCHRONIZE CACHE); then nothing reaches the ring,
                # so the dispatcher stops before the backstore (and its uio device) does.
                for path in disk.paths:
                    if path.setup is not None:
                        path.setup.cancel()
                    if path.hba_index >= 0:
                        await asyncio.to_thread(kernel.unlink_luns, path.backstore)
            except BaseException:
                disk.state = previous
                raise
            for path in disk.paths:
                if path.dispatcher is not None:
                    await path.dispatcher.close(timeout=30)
                if path.hba_index >= 0:
                    await asyncio.to_thread(kernel.delete_backstore, path.backstore)
                if path.watcher is not None:
                    with contextlib.suppress(asyncio.CancelledError):
                        await path.watcher
                self._serving.discard(path.backstore)
            for dev in nodes:
                with contextlib.suppress(devices.DeviceTimeout):
                    await devices.wait_until_gone(dev.name, links=dev.by_id)
            self.disks.pop(disk.name, None)
            for path in disk.paths:
                await self.sessions.release(path.session)
            log.info("detached %s (%s LUN %d at %s)", disk.name, disk.spec.target,
                     disk.spec.lun, ", ".join(str(p.spec.portal) for p in disk.paths))
            described = disk.describe(DiskState.DETACHED)
            self._event("detach", described)
            return described

    def _forget_retry(self, nickname: str) -> dict[str, Any]:
        """Detach of an entry being retried, or that failed for good: stop retrying it, or
        listing it."""
        retry = self._stop_retrying(nickname)
        failed = self._failed.pop(nickname, None)
        if retry is not None:
            log.info("%s: not trying to attach it any more", nickname)
            described = retry.describe(asyncio.get_running_loop().time(), DiskState.DETACHED)
        else:
            assert failed is not None
            described = {**failed, "state": DiskState.DETACHED.value}
        self._event("detach", described)
        return described

    async def _detach_in_workers(self, what: str, force: bool) -> dict[str, Any]:
        assert self.pool is not None
        inventories = await self.pool.inventories()
        if (what in self._retries or what in self._failed) and not any(
                what in i.names for i in inventories.values()):
            return self._forget_retry(what)
        for link in self.pool.running():
            try:
                described: dict[str, Any] = await link.call("detach", what=what, force=force)
            except NoSuchDiskError:
                continue   # another worker's, or nobody's
            return described
        known = ", ".join(sorted(n for i in inventories.values() for n in i.names)) or "none"
        raise NoSuchDiskError(f"no attached LUN is called {what!r} (attached: {known})")

    # -- adoption --------------------------------------------------------------------------

    async def adopt_existing(self, only: Collection[str] | None = None) -> None:
        """Take over every ``iscsi/`` backstore already in configfs (restart safety), or
        those named in ``only`` (a worker's share): the paths of a multipath disk become one
        disk again (:meth:`attach_enabled` then adds the paths its configuration entry names
        but the kernel has none of)."""
        for info in await asyncio.to_thread(kernel.list_backstores):
            if info.name in self._serving or (only is not None and info.name not in only):
                continue
            try:
                await self._adopt(info, takeover=True)
            except (HBAError, ISCSIError, TCMUError) as exc:
                where = backstore_path(info.hba_index, info.name)
                log.error("cannot serve existing backstore %s: %s", where, exc)
                self._unservable[where] = str(exc)
            else:
                self._unservable.pop(backstore_path(info.hba_index, info.name), None)

    async def _adopt(self, info: kernel.BackstoreInfo, *, takeover: bool) -> Disk:
        path_spec = self.specs.from_cfgstring(info.cfgstring, info.name)
        spec = path_spec.disk
        disk = self.disks.get(spec.name)
        if disk is not None and ((disk.spec.target, disk.spec.lun) != (spec.target, spec.lun)
                                 or disk.path_at(path_spec.portal) is not None):
            # Two backstores naming the same configuration entry and portal (one made with
            # targetcli): the second goes by its backstore name rather than joining the first.
            spec = dataclasses.replace(spec, name=info.name, multipath=False)
            path_spec = spec.path(path_spec.portal, 1)
            disk = self.disks.get(spec.name)
        uio = await _wait_for_uio(info.name, info.hba_index)
        await asyncio.to_thread(kernel.pass_through_pr, info.path)
        session = await self.sessions.acquire(path_spec, background=True)
        path = DiskPath(spec=path_spec, session=session, backstore=info.name,
                    hba_index=info.hba_index, scsi_address=info.scsi_address)
        if disk is None:
            disk = Disk(spec=spec, size=info.size, adopted=True)
        try:
            await self._serve(disk, path, uio, takeover=takeover)
        except BaseException:
            await self.sessions.release(session)
            raise
        if path.scsi_address is not None:
            # The timeouts of this daemon's settings (a multipath entry may have become one).
            await asyncio.to_thread(kernel.set_disk_timeout, path.scsi_address,
                                    scsi_timeout(spec))
            name = devices.disk_name(path.scsi_address)
            if name is not None:
                with contextlib.suppress(devices.DeviceTimeout):
                    path.device = await devices.wait_for_disk(path.scsi_address, timeout=10)
        disk.paths.append(path)
        disk.paths.sort(key=lambda p: p.index)
        disk.state = DiskState.ATTACHED
        self.disks[disk.name] = disk
        log.info("%s %s: backstore %s -> %s", "took over" if takeover else "serving",
                 path.label if spec.multipath else disk.name, info.name,
                 path.device.node if path.device else "no disk yet")
        self._path_changed(disk, path)
        self._event("adopt", disk.describe())
        return disk

    async def _watch_uio(self) -> None:
        """Serve uio devices of our subtype that appear later (targetcli, rtslib)."""
        # block: the disk of a LUN someone else links to a backstore we serve
        with devices.udev_events("uio", "block") as wake:
            wake.set()  # one pass now: a device made between adopt_existing's scan and now
            while True:
                await wake.wait()
                wake.clear()
                await asyncio.sleep(0.2)  # let a creator finish writing the device's control
                if self.pool is not None:
                    # A worker that died leaves its rings to nobody until its replacement
                    # has taken them over. Scanned meanwhile, they went to the other worker
                    # as new devices, and the replacement had nothing to take over (seen in
                    # the VM tier). The takeover serves every backstore nobody serves; the
                    # scan after it finds what is left.
                    await self.pool.replacements_done()
                    async with self._lock:
                        await self._serve_new_in_workers()
                    await self.pool.gather("refresh")
                else:
                    await self.serve_new_devices()

    async def serve_new_devices(self, only: Collection[tuple[int, str]] | None = None) -> None:
        """Serve the uio devices of our subtype nobody serves (or those of ``only``, by HBA
        index and name: a worker's share), and find the disks of LUNs linked meanwhile."""
        async with self._lock:
            await self._serve_new_devices(only)
            await self.refresh_devices()

    async def _serve_new_devices(self, only: Collection[tuple[int, str]] | None) -> None:
        found = await asyncio.to_thread(find_devices)
        present = {backstore_path(uio.name.hba_index, uio.name.dev_name) for uio in found}
        for where in list(self._unservable):
            if where not in present:   # removed (targetcli): nothing left to serve
                del self._unservable[where]
        for uio in found:
            if uio.name.dev_name in self._serving or (
                    only is not None and (uio.name.hba_index, uio.name.dev_name) not in only):
                continue
            # The backstore's own directory only, not its tcm_loop link: whoever links a LUN
            # to this device holds configfs locks until the ring answers the LUN's INQUIRY,
            # so looking the link up before serving would deadlock (until cmd_time_out).
            info = await asyncio.to_thread(kernel.read_backstore, uio.name.hba_index,
                                           uio.name.dev_name)
            if info is None:
                continue
            try:
                disk = await self._adopt(info, takeover=False)
            except (HBAError, ISCSIError, TCMUError) as exc:
                message, where = str(exc), backstore_path(info.hba_index, info.name)
                if self._unservable.get(where) != message:
                    log.error("cannot serve new backstore %s: %s", where, message)
                self._unservable[where] = message
            else:
                self._unservable.pop(backstore_path(info.hba_index, info.name), None)
                # Before a LUN links it (the attribute is fixed once exported): commands
                # then wait out a session recovery as they do on the disks we attach.
                await asyncio.to_thread(kernel.set_cmd_time_out, info.path,
                                        cmd_time_out(disk.spec))

    def disks_by_backstore(self, backstore: str) -> Disk | None:
        """The disk one of whose paths is served from backstore ``backstore``, if any."""
        for disk in self.disks.values():
            if any(path.backstore == backstore for path in disk.paths):
                return disk
        return None

    async def refresh_devices(self) -> None:
        """Find the disks of LUNs that someone else (targetcli, rtslib) linked to backstores
        we serve after we started serving them."""
        missing = [(d, p) for d in self.disks.values() if d.state is DiskState.ATTACHED
                   for p in d.paths if p.device is None and p.hba_index >= 0]
        if not missing:
            return
        infos = {info.name: info for info in await asyncio.to_thread(kernel.list_backstores)}
        for disk, path in missing:
            info = infos.get(path.backstore)
            if info is None or info.scsi_address is None:
                continue
            if path.scsi_address != info.scsi_address:
                path.scsi_address = info.scsi_address
                await asyncio.to_thread(kernel.set_disk_timeout, info.scsi_address,
                                        scsi_timeout(disk.spec))
            device = await asyncio.to_thread(devices.find_disk, info.scsi_address)
            if device is None:
                continue
            path.device = device
            disk.size = await asyncio.to_thread(devices.size_bytes, device.name) or disk.size
            log.info("%s: LUN linked to backstore %s -> %s (%s)", disk.name, path.backstore,
                     device.node, device.primary_link or "no by-id link")
            self._path_changed(disk, path)
            self._event("attach", disk.describe())


    # -- reporting -------------------------------------------------------------------------

    def list(self) -> list[dict[str, Any]]:
        """Attached disks, and the configuration entries being attached, retried, or that
        failed."""
        now = asyncio.get_running_loop().time()
        rows = [disk.describe() for disk in self.disks.values()]
        rows += [retry.describe(now) for name, retry in self._retries.items()
                 if name not in self.disks]
        rows += [row for name, row in self._failed.items() if name not in self.disks]
        rows += [row for name, row in self._queued.items()
                 if name not in self.disks and name not in self._retries
                 and name not in self._failed]
        # Backstores in the kernel nobody serves: their disk's I/O waits, then fails.
        rows += [{"name": where, "backstore": where, "state": DiskState.UNSERVED.value,
                  "error": why} for where, why in self._unservable.items()]
        return sorted(rows, key=lambda row: str(row["name"]))

    def status(self) -> dict[str, Any]:
        return {
            "initiator_name": self.initiator_name,
            "config": self.options.config_path,
            "disks": self.list(),
            "sessions": self.sessions.describe(),
        }

    def inventory(self) -> dict[str, builtins.list[str]]:
        """What this process serves, for the main process's routing (:mod:`hba.workers`)."""
        disks = list(self.disks.values())
        return {"names": sorted(self.disks),
                "nicknames": sorted({d.spec.nickname for d in disks if d.spec.nickname}),
                "targets": sorted({d.spec.target for d in disks}),
                "backstores": sorted(self._serving
                                     | {p.backstore for d in disks for p in d.paths})}

    # The reports and refresh of the DBus face: this process's, or every worker's together.

    async def list_all(self) -> builtins.list[dict[str, Any]]:
        """:meth:`list`, with every worker's disks (a worker's row of a name wins: the disk
        of an entry being attached there is listed there just before the attach returns)."""
        rows = self.list()
        if self.pool is not None:
            served = await self.pool.list_rows()
            names = {row.get("name") for row in served}
            rows = [row for row in rows if row["name"] not in names] + served
        return sorted(rows, key=lambda row: str(row["name"]))

    async def status_all(self) -> dict[str, Any]:
        """:meth:`status`, with every worker's disks and sessions, and the workers."""
        status = self.status()
        if self.pool is not None:
            status["disks"] = await self.list_all()
            status["sessions"] = [s for answer in await self.pool.gather("sessions")
                                  for s in answer]
            status["workers"] = [{"index": link.index, "pid": link.pid}
                                 for link in self.pool.running()]
        return status

    async def sample_all(self) -> dict[str, Any]:
        """:func:`hba.metrics.sample`, with every worker's disks and sessions."""
        from hba.metrics import merge_samples, sample

        data = sample(self)
        if self.pool is not None:
            data = merge_samples(data, await self.pool.gather("sample"))
        return data

    async def refresh_all(self) -> None:
        """:meth:`refresh_devices`, here or in every worker."""
        if self.pool is None:
            await self.refresh_devices()
        else:
            await self.pool.gather("refresh")

    async def disk_count(self) -> int:
        """Disks served, here or by the workers."""
        if self.pool is None:
            return len(self.disks)
        return sum(len(inv.names) for inv in (await self.pool.inventories()).values())

    # -- workers (hba.workers) ---------------------------------------------------------------

    def _worker_event(self, kind: str, data: dict[str, Any]) -> None:
        """An event of a worker (it logged it already): on to ``options.on_event``."""
        if self.options.on_event is not None:
            self.options.on_event(kind, data)

    async def _worker_restarted(self, link: WorkerLink) -> None:
        """A worker replaced one that died: it takes over the backstores nobody serves."""
        try:
            async with self._lock:
                await self._adopt_in_workers()
        except Exception as exc:
            log.error("worker %d (pid %d): taking over the disks of the worker it replaced "
                      "failed: %s", link.index, link.pid, exc, exc_info=exc)

    async def _ask(self, link: WorkerLink, op: str, **args: Any) -> None:
        try:
            await link.call(op, **args)
        except HBAError as exc:
            log.error("worker %d (pid %d): %s failed: %s", link.index, link.pid, op, exc)

    def _group(self, info: kernel.BackstoreInfo) -> str:
        """Backstores that go to one worker: a target's (they share sessions)."""
        try:
            return "target " + self.specs.from_cfgstring(info.cfgstring, info.name).disk.target
        except (HBAError, ISCSIError):
            return "backstore " + info.name   # its worker logs why it cannot serve it

    async def _place(self, groups: dict[str, builtins.list[Any]], op: str, key: str) -> None:
        """Hand each group to its worker (:func:`hba.workers.place_groups`) with ``op``."""
        from hba.workers import place_groups

        assert self.pool is not None
        if not groups:
            return
        inventories = await self.pool.inventories()
        owners = {"target " + target: index for index, inv in inventories.items()
                  for target in inv.targets}
        placed = place_groups(sorted(groups), self.pool.loads(inventories), self.pool.limit,
                              owners)
        shares: dict[int, builtins.list[Any]] = {}
        for group, index in placed.items():
            shares.setdefault(index, []).extend(groups[group])
        started = await asyncio.gather(*(self.pool.worker(index) for index in sorted(shares)),
                                       return_exceptions=True)
        links = []
        for index, link in zip(sorted(shares), started, strict=True):
            if not isinstance(link, BaseException):
                links.append(link)
            elif isinstance(link, Exception):
                log.error("%s; %s wait%s (their commands stay in the kernel's rings)", link,
                          ", ".join(str(b) for b in shares[index]),
                          "s" if len(shares[index]) == 1 else "")
            else:
                raise link
        await asyncio.gather(*(self._ask(link, op, **{key: shares[link.index]})
                               for link in links))

    async def _served_by_workers(self) -> tuple[dict[int, Inventory], set[str]]:
        assert self.pool is not None
        inventories = await self.pool.inventories()
        return inventories, {b for inv in inventories.values() for b in inv.backstores}

    async def _adopt_in_workers(self) -> None:
        """Every ``iscsi/`` backstore no worker serves, taken over by workers: at start, and
        when a worker replaced one that died."""
        _inventories, served = await self._served_by_workers()
        groups: dict[str, builtins.list[Any]] = {}
        for info in await asyncio.to_thread(kernel.list_backstores):
            if info.name not in served:
                groups.setdefault(self._group(info), []).append(info.name)
        await self._place(groups, "adopt", "backstores")

    async def _serve_new_in_workers(self) -> None:
        """The uio devices of our subtype no worker serves, handed to workers to serve."""
        _inventories, served = await self._served_by_workers()
        groups: dict[str, builtins.list[Any]] = {}
        for uio in await asyncio.to_thread(find_devices):
            if uio.name.dev_name in served:
                continue
            info = await asyncio.to_thread(kernel.read_backstore, uio.name.hba_index,
                                           uio.name.dev_name)
            if info is not None:
                groups.setdefault(self._group(info), []).append([info.hba_index, info.name])
        await self._place(groups, "serve_new", "devices")


# --------------------------------------------------------------------------------------------
# helpers


async def _wait_for_uio(name: str, hba_index: int, timeout: float = 10.0) -> UioInfo:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            info = await asyncio.to_thread(find_device, name, hba_index=hba_index)
            if os.path.exists(info.dev_path):
                return info
        except TCMUError:
            pass
        if loop.time() >= deadline:
            raise AttachError(
                f"the TCMU device of backstore {name} did not appear as /dev/uio* within "
                f"{timeout:g} s: check that target_core_user is loaded and udev runs")
        await asyncio.sleep(0.05)


def prepare_capture_dir(path: str) -> None:
    """Create the ``--pcap`` directory, readable by root only: captures hold the data."""
    if os.path.lexists(path) and not os.path.isdir(path):
        # makedirs said "File exists", which reads as if the directory were the problem.
        raise HBAError(f"--pcap {path} is a file, not a directory; name a directory (it is "
                       "created mode 700 if it does not exist)")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise HBAError(f"cannot create the capture directory {path}: {exc.strerror}; give "
                       "--pcap a directory the daemon's user can create or write") from None
    # An existing directory keeps its mode, and the capture files get the umask's (0644):
    # `--pcap /tmp` handed every user the disks' data.
    st = os.stat(path)
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in (0, os.geteuid()) or mode & 0o077:
        quoted = shlex.quote(path)
        raise HBAError(
            f"--pcap {path}: other users could read the captures there, which hold the disks' "
            f"data (owner uid {st.st_uid}, mode {mode:04o}); run `chown root: {quoted} && "
            f"chmod 700 {quoted}`, or name a directory that does not exist yet (it is created "
            "mode 700)")


def _flush(node: str) -> None:
    """Write back the page cache of a block device (``blockdev --flushbufs``)."""
    try:
        fd = os.open(node, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        log.warning("could not open %s to flush it: %s", node, exc.strerror)
        return
    try:
        os.fsync(fd)
        fcntl.ioctl(fd, BLKFLSBUF)
    except OSError as exc:
        log.warning("could not flush %s: %s", node, exc.strerror)
    finally:
        os.close(fd)


def _log_retry(nickname: str, retry: Retry) -> None:
    log.warning("could not attach %s (attempt %d): %s; trying again in %.0f s",
                nickname, retry.attempts, retry.error, retry.delay)


__all__ = ["Daemon", "DaemonOptions", "Disk", "DiskState", "prepare_capture_dir"]
