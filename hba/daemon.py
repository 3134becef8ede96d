"""The iscsi-hba daemon: iSCSI sessions, TCMU rings and the disks they become.

Theory of operation
-------------------
One asyncio loop owns everything: the iSCSI sessions (:class:`initiator.transport.Session`,
shared by the LUNs of one target), one :class:`tcmu_handler.dispatcher.Dispatcher` per TCMU
device, and the configfs objects that make each LUN a disk. configfs writes block (linking a
LUN makes the kernel send INQUIRY through the very ring we serve), so they run in worker
threads (:mod:`hba.kernel`) while the loop keeps serving rings.

Attaching a LUN (:meth:`Daemon.attach`):

1. log in (or reuse the target's session) and ask the LUN its capacity and block limits;
2. create the TCMU user backstore (dev_config ``iscsi/<cfgstring>``, never a secret);
3. open its uio device and start serving the ring — before anything can reach it;
4. link it to a new tcm_loop target, which makes the SCSI midlayer probe it;
5. raise the disk's SCSI timeout above the replacement timeout, and wait for udev to finish
   with ``/dev/sdX`` and its ``/dev/disk/by-id`` links.

Detaching reverses it: refuse while mounted or held (unless forced), flush, unlink the LUN
(the kernel sends SYNCHRONIZE CACHE through the ring), delete the backstore (the uio device
goes, the dispatcher stops), log out when the session's last LUN is gone.

Restart safety: at start, every ``iscsi/`` backstore already in configfs (a previous daemon
died) is taken over — block, reset the ring, reopen, unblock — so its ``/dev/sdX`` keeps
working; its session logs in in the background while the kernel's commands wait. uio devices
that appear later with our subtype (made by ``targetcli /backstores/user:iscsi create``) are
served the same way.

The seams: what a URL, nickname or cfgstring stands for is :mod:`hba.specs` (credentials from
:mod:`initiator.credentials`); the sessions the LUNs of a target share are :mod:`hba.sessions`;
when an ``Enable = on`` entry that failed is tried again is :mod:`hba.retry`; a disk's record
and its states are :mod:`hba.disks`. This module is the life cycle: attach, detach, adopt,
serve, and the tasks that tie those together.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hba import devices, kernel
from hba.config import Config, load_config
from hba.disks import Disk, DiskState
from hba.errors import AttachError, DiskBusyError, HBAError, NoSuchDiskError
from hba.journal import SessionEvents
from hba.retry import Retry, RetrySchedule, worth_retrying
from hba.sessions import SessionPool
from hba.specs import BACKSTORE_PREFIX, LunSpec, SpecDefaults, SpecResolver
from initiator.client import ScsiClient
from initiator.errors import ISCSIError
from initiator.transport import Session, default_initiator_name
from tcmu_handler.device import UioDevice, UioInfo, find_device, find_devices
from tcmu_handler.dispatcher import Dispatcher, StopReason
from tcmu_handler.errors import TCMUError
from tcmu_handler.executor import SessionExecutor

log = logging.getLogger("iscsi-hba")

BLKFLSBUF = 0x1261
MAX_TRANSFER = 8 << 20    # bytes per SCSI command we let the kernel build at most
SCSI_TIMEOUT_MARGIN = 30  # seconds on top of the replacement timeout


@dataclass(slots=True)
class DaemonOptions:
    config_path: str | None = None
    initiator_name: str | None = None
    replacement_timeout: float = 120.0
    login_timeout: float = 15.0
    queue_depth: int = 32
    watch_uio: bool = True
    pcap_dir: str | None = None   # record each session's PDUs into a pcap file here
    on_event: Callable[[str, dict[str, Any]], None] | None = field(default=None, repr=False)


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
        self.sessions = SessionPool(self._event, pcap_dir=self.options.pcap_dir)
        self.disks: dict[str, Disk] = {}
        self._lock = asyncio.Lock()
        self._watch_task: asyncio.Task[None] | None = None
        self._serving: set[str] = set()     # backstore names with a dispatcher
        self._unservable: dict[str, str] = {}  # backstore -> why it could not be served
        self._retries = RetrySchedule()     # configuration nickname -> its retry
        self._retry_tasks: dict[str, asyncio.Task[None]] = {}
        self._attaching: list[LunSpec] = []    # attaches under way (their session's events)
        self.session_events = SessionEvents(log)
        self.started = False

    @property
    def config(self) -> Config | None:
        """The configuration as last read (None: no file)."""
        return self.specs.config

    @config.setter
    def config(self, config: Config | None) -> None:
        self.specs.config = config

    def _event(self, kind: str, data: dict[str, Any]) -> None:
        """Report ``kind`` (attach, adopt, detach, session, logout) to ``options.on_event``;
        log session events (hba.journal)."""
        if kind == "session":
            target, portal = str(data.get("target")), str(data.get("portal"))
            specs = [d.spec for d in self.disks.values()] + self._attaching
            self.session_events.state_changed(
                target, portal, str(data.get("state")), cause=str(data.get("cause") or ""),
                disks=sorted({s.name for s in specs
                              if s.target == target and str(s.portal) == portal}))
        if self.options.on_event is not None:
            self.options.on_event(kind, data)

    # -- life cycle ------------------------------------------------------------------------

    async def start(self, *, attach_enabled: bool = True) -> None:
        """Check the kernel, read the configuration, adopt existing devices, attach entries
        with ``Enable = on``. Attach failures of entries are logged, not fatal."""
        await asyncio.to_thread(kernel.preflight)
        if self.options.pcap_dir is not None:
            await asyncio.to_thread(prepare_capture_dir, self.options.pcap_dir)
        if self.options.config_path is not None:
            self.config = await asyncio.to_thread(self._load_config)
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
        ``retrying``. Other failures (a wrong secret, a refused initiator) are logged once."""
        wanted = set()
        if self.config is not None:
            for entry in self.config.enabled():
                if entry.session_type.value.lower() != "normal":
                    continue
                wanted.add(entry.nickname)
                if entry.nickname in self._retries or self._attached(entry.nickname):
                    continue
                try:
                    await self.attach(entry.nickname)
                except AttachError as exc:
                    self._failed_at_start(entry.nickname, exc)
                except HBAError as exc:
                    log.error("could not attach %s: %s", entry.nickname, exc)
        for nickname in list(self._retries):
            if nickname not in wanted:
                log.info("%s is no longer enabled in the configuration: not retrying it",
                         nickname)
                self._stop_retrying(nickname)

    def _attached(self, nickname: str) -> bool:
        return any(d.spec.nickname == nickname for d in self.disks.values())

    def _failed_at_start(self, nickname: str, exc: AttachError) -> None:
        if not exc.retryable:
            log.error("could not attach %s: %s", nickname, exc)
            return
        loop = asyncio.get_running_loop()
        retry = self._retries.start(nickname, self.specs.resolve(nickname), str(exc),
                                    loop.time())
        _log_retry(nickname, retry)
        self._retry_tasks[nickname] = loop.create_task(self._retry(nickname))

    async def _retry(self, nickname: str) -> None:
        """Attach ``nickname`` whenever its schedule says, until it leaves the schedule."""
        loop = asyncio.get_running_loop()
        while (retry := self._retries.get(nickname)) is not None:
            await asyncio.sleep(max(0.0, retry.next_attempt - loop.time()))
            if self._attached(nickname):
                break
            try:
                await self.attach(nickname)
            except AttachError as exc:
                if exc.retryable:
                    retry = self._retries.failed(nickname, str(exc), loop.time())
                    if retry is not None:
                        _log_retry(nickname, retry)
                    continue
                log.error("could not attach %s: %s; not trying again", nickname, exc)
            except HBAError as exc:
                log.error("could not attach %s: %s; not trying again", nickname, exc)
            break
        if self._retry_tasks.get(nickname) is asyncio.current_task():
            self._stop_retrying(nickname)

    def _stop_retrying(self, nickname: str) -> Retry | None:
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

    async def stop(self) -> None:
        """Stop serving. Devices stay in the kernel (their I/O waits) so a restarted daemon
        takes them over; use detach to remove them."""
        for nickname in list(self._retries):
            self._stop_retrying(nickname)
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        for disk in list(self.disks.values()):
            if disk.watcher is not None:
                disk.watcher.cancel()
            if disk.dispatcher is not None:
                await disk.dispatcher.close(timeout=10)
        await self.sessions.close()
        self.disks.clear()

    # -- attach ----------------------------------------------------------------------------

    async def attach(self, what: str) -> Disk:
        """Attach a LUN named by URL or configuration nickname; returns it once usable."""
        spec = self.specs.resolve(what)
        async with self._lock:
            if spec.name in self.disks:
                disk = self.disks[spec.name]
                raise AttachError(
                    f"{spec.name} is already attached"
                    + (f" as {disk.device.node}" if disk.device else ""))
            for disk in self.disks.values():
                if (disk.spec.target, disk.spec.lun, disk.spec.portal) == \
                        (spec.target, spec.lun, spec.portal):
                    raise AttachError(
                        f"{spec.target} LUN {spec.lun} at {spec.portal} is already attached "
                        f"as {disk.name}")
            self._attaching.append(spec)
            try:
                attached = await self._attach_locked(spec)
            finally:
                self._attaching.remove(spec)
        if spec.nickname is not None:
            self._stop_retrying(spec.nickname)  # "attached ..." was logged
        return attached

    async def _attach_locked(self, spec: LunSpec) -> Disk:
        try:
            session = await self.sessions.acquire(spec)
        except ISCSIError as exc:
            raise AttachError(f"attaching {spec.name} ({spec.target} LUN {spec.lun} at "
                              f"{spec.portal}) failed: {exc}",
                              retryable=worth_retrying(exc)) from None
        backstore = BACKSTORE_PREFIX + spec.name
        created = False
        disk: Disk | None = None
        try:
            client = ScsiClient(session, spec.lun)
            capacity = await client.capacity()
            limits = await client.block_limits()
            max_io = MAX_TRANSFER
            params = session.parameters
            if params is not None:
                max_io = min(max_io, params.max_burst_length)
            if limits is not None and limits.max_transfer_length:
                max_io = min(max_io, limits.max_transfer_length * capacity.block_size)
            max_io = max(max_io - max_io % capacity.block_size, capacity.block_size)
            data_area_mb = min(1024, max(64, (spec.queue_depth * max_io * 2) >> 20))
            timeout = int(spec.session.replacement_timeout) + SCSI_TIMEOUT_MARGIN
            info = await asyncio.to_thread(
                kernel.create_backstore, backstore, spec.cfgstring(), capacity.size_bytes,
                hw_max_sectors=max_io // 512, max_data_area_mb=data_area_mb,
                cmd_time_out=timeout)
            created = True
            disk = Disk(spec=spec, backstore=backstore, hba_index=info.hba_index,
                        session=session, size=capacity.size_bytes,
                        block_size=capacity.block_size)
            uio = await _wait_for_uio(backstore, info.hba_index)
            await self._serve(disk, uio, takeover=False)
            linked = await asyncio.to_thread(kernel.link_loopback, backstore)
            disk.scsi_address = linked.scsi_address
            if disk.scsi_address is None:
                raise AttachError(f"tcm_loop did not report a SCSI address for {backstore}")
            await asyncio.to_thread(kernel.set_disk_timeout, disk.scsi_address, timeout)
            disk.device = await devices.wait_for_disk(disk.scsi_address)
        except BaseException as exc:
            await self._rollback(disk, backstore, created, session)
            if isinstance(exc, (HBAError, ISCSIError)):
                raise AttachError(f"attaching {spec.name} ({spec.target} LUN {spec.lun} at "
                                  f"{spec.portal}) failed: {exc}",
                                  retryable=isinstance(exc, ISCSIError)
                                  and worth_retrying(exc)) from None
            if isinstance(exc, TCMUError):
                raise AttachError(f"attaching {spec.name} failed: {exc}") from None
            raise
        disk.state = DiskState.ATTACHED
        self.disks[spec.name] = disk
        log.info("attached %s: %s LUN %d at %s -> %s (%s)", spec.name, spec.target, spec.lun,
                 spec.portal, disk.device.node, disk.device.primary_link or "no by-id link")
        self._event("attach", disk.describe())
        return disk

    async def _rollback(self, disk: Disk | None, backstore: str, created: bool,
                        session: Session) -> None:
        if disk is not None:
            # Our own removal: _watch_dispatcher must not release the session a second time.
            disk.state = DiskState.DETACHING
        if created:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(kernel.unlink_and_delete, backstore)
        if disk is not None and disk.dispatcher is not None:
            with contextlib.suppress(Exception):
                await disk.dispatcher.close(timeout=5)
            self._serving.discard(backstore)
        await self.sessions.release(session)

    async def _serve(self, disk: Disk, uio: UioInfo, *, takeover: bool) -> None:
        """Start the ring of ``disk`` and watch for its end."""
        if takeover:
            dispatcher = await asyncio.to_thread(
                Dispatcher.takeover, uio, SessionExecutor(disk.session), lun=disk.spec.lun)
        else:
            device = await asyncio.to_thread(UioDevice.open, uio)
            # SessionExecutor: a refused ABORT TASK escalates to a LOGICAL UNIT RESET.
            dispatcher = Dispatcher(device, SessionExecutor(disk.session), lun=disk.spec.lun)
        disk.dispatcher = dispatcher
        dispatcher.start()
        self._serving.add(disk.backstore)
        disk.watcher = asyncio.get_running_loop().create_task(self._watch_dispatcher(disk))

    async def _watch_dispatcher(self, disk: Disk) -> None:
        assert disk.dispatcher is not None
        reason = await disk.dispatcher.run()
        self._serving.discard(disk.backstore)
        if reason is StopReason.REMOVED and disk.state is not DiskState.DETACHING:
            # Someone removed the backstore behind our back (targetcli, rtslib): forget it.
            log.warning("%s: its TCMU device was removed; forgetting it", disk.name)
            self.disks.pop(disk.name, None)
            self._event("detach", disk.describe())
            await self.sessions.release(disk.session)
        elif reason is StopReason.RING_CORRUPT:
            disk.state = DiskState.RING_BROKEN
            log.error("%s: the TCMU ring is inconsistent; restart the daemon to reset it",
                      disk.name)

    # -- detach ----------------------------------------------------------------------------

    def find(self, what: str) -> Disk:
        """A disk by name, device node (``/dev/sdX``, ``sdX``) or by-id link."""
        if what in self.disks:
            return self.disks[what]
        real = os.path.realpath(what) if what.startswith("/") else f"/dev/{what}"
        for disk in self.disks.values():
            dev = disk.device
            if dev is None:
                continue
            if real == dev.node or what in dev.by_id or what == dev.name:
                return disk
        known = ", ".join(sorted(self.disks)) or "none"
        raise NoSuchDiskError(f"no attached LUN is called {what!r} (attached: {known})")

    async def detach(self, what: str, *, force: bool = False) -> dict[str, Any]:
        """Orderly detach; refuses while the disk is mounted or held unless ``force``."""
        async with self._lock:
            # A LUN linked by someone else (targetcli) may have got its disk since we saw it:
            # without it, the mount check below would let a mounted disk go.
            await self.refresh_devices()
            if what not in self.disks and what in self._retries:
                retry = self._stop_retrying(what)
                assert retry is not None
                log.info("%s: not trying to attach it any more", what)
                described = retry.describe(asyncio.get_running_loop().time(),
                                           DiskState.DETACHED)
                self._event("detach", described)
                return described
            disk = self.find(what)
            if disk.device is not None:
                busy = devices.users(disk.device.name)
                if busy and not force:
                    raise DiskBusyError(
                        f"{disk.name} ({disk.device.node}) is in use: " + "; ".join(busy)
                        + ". Unmount it first, or detach with --force")
                await asyncio.to_thread(_flush, disk.device.node)
            previous, disk.state = disk.state, DiskState.DETACHING
            try:
                # Served while the LUN goes (SYNCHRONIZE CACHE); then nothing reaches the ring,
                # so the dispatcher stops before the backstore (and its uio device) does.
                await asyncio.to_thread(kernel.unlink_luns, disk.backstore)
            except BaseException:
                disk.state = previous
                raise
            if disk.dispatcher is not None:
                await disk.dispatcher.close(timeout=30)
            await asyncio.to_thread(kernel.delete_backstore, disk.backstore)
            if disk.watcher is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await disk.watcher
            self._serving.discard(disk.backstore)
            if disk.device is not None:
                with contextlib.suppress(devices.DeviceTimeout):
                    await devices.wait_until_gone(disk.device.name,
                                                  links=disk.device.by_id)
            self.disks.pop(disk.name, None)
            await self.sessions.release(disk.session)
            log.info("detached %s (%s LUN %d at %s)", disk.name, disk.spec.target,
                     disk.spec.lun, disk.spec.portal)
            described = disk.describe(DiskState.DETACHED)
            self._event("detach", described)
            return described

    # -- adoption --------------------------------------------------------------------------

    async def adopt_existing(self) -> None:
        """Take over every ``iscsi/`` backstore already in configfs (restart safety)."""
        for info in await asyncio.to_thread(kernel.list_backstores):
            if info.name in self._serving:
                continue
            try:
                await self._adopt(info, takeover=True)
            except (HBAError, ISCSIError, TCMUError) as exc:
                log.error("cannot serve existing backstore %s: %s", info.name, exc)

    async def _adopt(self, info: kernel.BackstoreInfo, *, takeover: bool) -> Disk:
        spec = self.specs.from_cfgstring(info.cfgstring, info.name)
        if spec.name in self.disks:
            # Two backstores naming the same configuration entry (one made with targetcli):
            # the second goes by its backstore name rather than replacing the first here.
            spec = dataclasses.replace(spec, name=info.name)
        uio = await _wait_for_uio(info.name, info.hba_index)
        session = await self.sessions.acquire(spec, background=True)
        disk = Disk(spec=spec, backstore=info.name, hba_index=info.hba_index, session=session,
                    size=info.size, scsi_address=info.scsi_address, adopted=True)
        try:
            await self._serve(disk, uio, takeover=takeover)
        except BaseException:
            await self.sessions.release(session)
            raise
        if disk.scsi_address is not None:
            name = devices.disk_name(disk.scsi_address)
            if name is not None:
                with contextlib.suppress(devices.DeviceTimeout):
                    disk.device = await devices.wait_for_disk(disk.scsi_address, timeout=10)
        disk.state = DiskState.ATTACHED
        self.disks[disk.name] = disk
        log.info("%s %s: backstore %s -> %s", "took over" if takeover else "serving",
                 disk.name, info.name, disk.device.node if disk.device else "no disk yet")
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
                async with self._lock:
                    await self._serve_new_devices()
                    await self.refresh_devices()

    async def _serve_new_devices(self) -> None:
        for uio in await asyncio.to_thread(find_devices):
            if uio.name.dev_name in self._serving:
                continue
            # The backstore's own directory only, not its tcm_loop link: whoever links a LUN
            # to this device holds configfs locks until the ring answers the LUN's INQUIRY,
            # so looking the link up before serving would deadlock (until cmd_time_out).
            info = await asyncio.to_thread(kernel.read_backstore, uio.name.hba_index,
                                           uio.name.dev_name)
            if info is None:
                continue
            try:
                await self._adopt(info, takeover=False)
            except (HBAError, ISCSIError, TCMUError) as exc:
                message = str(exc)
                if self._unservable.get(info.name) != message:
                    log.error("cannot serve new backstore %s: %s", info.name, message)
                self._unservable[info.name] = message
            else:
                self._unservable.pop(info.name, None)
                # Before a LUN links it (the attribute is fixed once exported): commands
                # then wait out a session recovery as they do on the disks we attach.
                await asyncio.to_thread(kernel.set_cmd_time_out, info.path,
                                        self._scsi_timeout(self.disks_by_backstore(info.name)))

    def disks_by_backstore(self, backstore: str) -> Disk | None:
        """The disk served from backstore ``backstore``, if any."""
        for disk in self.disks.values():
            if disk.backstore == backstore:
                return disk
        return None

    @staticmethod
    def _scsi_timeout(disk: Disk | None) -> int:
        replacement = disk.spec.session.replacement_timeout if disk is not None else 120.0
        return int(replacement) + SCSI_TIMEOUT_MARGIN

    async def refresh_devices(self) -> None:
        """Find the disks of LUNs that someone else (targetcli, rtslib) linked to backstores
        we serve after we started serving them."""
        missing = [d for d in self.disks.values()
                   if d.device is None and d.state is DiskState.ATTACHED]
        if not missing:
            return
        infos = {info.name: info for info in await asyncio.to_thread(kernel.list_backstores)}
        for disk in missing:
            info = infos.get(disk.backstore)
            if info is None or info.scsi_address is None:
                continue
            if disk.scsi_address != info.scsi_address:
                disk.scsi_address = info.scsi_address
                await asyncio.to_thread(kernel.set_disk_timeout, info.scsi_address,
                                        self._scsi_timeout(disk))
            device = await asyncio.to_thread(devices.find_disk, info.scsi_address)
            if device is None:
                continue
            disk.device = device
            disk.size = await asyncio.to_thread(devices.size_bytes, device.name) or disk.size
            log.info("%s: LUN linked to backstore %s -> %s (%s)", disk.name, disk.backstore,
                     device.node, device.primary_link or "no by-id link")
            self._event("attach", disk.describe())

    # -- reporting -------------------------------------------------------------------------

    def list(self) -> list[dict[str, Any]]:
        """Attached disks, and the configuration entries still being retried."""
        now = asyncio.get_running_loop().time()
        rows = [disk.describe() for disk in self.disks.values()]
        rows += [retry.describe(now) for name, retry in self._retries.items()
                 if name not in self.disks]
        return sorted(rows, key=lambda row: str(row["name"]))

    def status(self) -> dict[str, Any]:
        return {
            "initiator_name": self.initiator_name,
            "config": self.options.config_path,
            "disks": self.list(),
            "sessions": self.sessions.describe(),
        }


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
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise HBAError(f"cannot create the capture directory {path}: {exc.strerror}; give "
                       "--pcap a directory root can write") from None
    if not os.path.isdir(path):
        raise HBAError(f"--pcap {path} is not a directory")


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
