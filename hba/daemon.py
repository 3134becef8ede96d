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
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hba import cfgstring, devices, kernel
from hba.config import AuthMethod, Config, ConfigError, TargetEntry, load_config
from hba.errors import HBAError
from initiator.chap import ChapAccount, ChapCredentials, Secret
from initiator.client import ScsiClient
from initiator.errors import (
    AuthenticationError,
    ConfigurationError,
    ISCSIError,
    LocalProtocolError,
    NegotiationError,
)
from initiator.login import LoginError, Portal, TargetNotFoundError
from initiator.transport import Session, SessionConfig, SessionState, default_initiator_name
from initiator.url import IscsiUrl, parse_url
from tcmu_handler.device import UioDevice, UioInfo, find_device, find_devices
from tcmu_handler.dispatcher import Dispatcher, StopReason
from tcmu_handler.errors import TCMUError
from tcmu_handler.executor import SessionExecutor

log = logging.getLogger("iscsi-hba")

BLKFLSBUF = 0x1261
BACKSTORE_PREFIX = "hba-"
MAX_TRANSFER = 8 << 20    # bytes per SCSI command we let the kernel build at most
SCSI_TIMEOUT_MARGIN = 30  # seconds on top of the replacement timeout
RETRY_FIRST = 5.0         # seconds before a failed Enable = on entry is tried again,
RETRY_MAX = 60.0          # doubling after each failure up to this


class AttachError(HBAError):
    """An attach could not be done; the message says why and what to check.

    ``retryable`` says whether the same attach may succeed later without anyone changing
    anything (the target is down, unreachable or not configured yet), as opposed to a wrong
    secret, a refused initiator or a local problem.
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class DetachError(HBAError):
    """A detach was refused or failed."""


class DiskBusyError(DetachError):
    """The disk is mounted or held (device-mapper, md, swap) and the detach was not forced."""


class NoSuchDiskError(DetachError):
    """No attached LUN goes by the name, device node or link given."""


@dataclass(frozen=True, slots=True)
class LunSpec:
    """Everything needed to reach one LUN: where, who we are, how to behave."""

    name: str
    portal: Portal
    target: str
    lun: int
    session: SessionConfig
    queue_depth: int = 32
    nickname: str | None = None   # set when the LUN comes from the configuration file

    @property
    def session_key(self) -> tuple[Any, ...]:
        creds = self.session.credentials
        secret = b""
        if creds is not None:
            secret = creds.initiator.secret.reveal() + b"\0" + (
                creds.target.secret.reveal() if creds.target else b"")
        return (self.portal.host, self.portal.port, self.target,
                creds.initiator.name if creds else None,
                hashlib.sha256(secret).hexdigest(), self.session.header_digest,
                self.session.data_digest)

    def cfgstring(self) -> str:
        if self.nickname is not None:
            return cfgstring.TargetRef(nickname=self.nickname).encode()
        return cfgstring.TargetRef(portal=self.portal, target=self.target,
                                   lun=self.lun).encode()


@dataclass(slots=True)
class Disk:
    """One LUN this daemon serves."""

    spec: LunSpec
    backstore: str
    hba_index: int
    session: Session
    dispatcher: Dispatcher | None = None
    device: devices.BlockDevice | None = None
    scsi_address: str | None = None
    size: int = 0
    block_size: int = 512
    adopted: bool = False
    watcher: asyncio.Task[None] | None = None
    state: str = "attaching"

    @property
    def name(self) -> str:
        return self.spec.name

    def describe(self) -> dict[str, Any]:
        """What ``hbactl list`` / ``status`` show."""
        stats = self.dispatcher.stats if self.dispatcher is not None else None
        return {
            "name": self.name,
            "target": self.spec.target,
            "portal": str(self.spec.portal),
            "lun": self.spec.lun,
            "device": self.device.node if self.device else None,
            "by_id": self.device.primary_link if self.device else None,
            "size": self.size,
            "block_size": self.block_size,
            "backstore": f"user_{self.hba_index}/{self.backstore}",
            "scsi_address": self.scsi_address,
            "state": self.state,
            "session": self.session.state.value,
            "in_flight": stats.in_flight if stats else 0,
            "commands": stats.completed if stats else 0,
            "reconnects": self.session.reconnects,
        }


@dataclass(slots=True)
class _Retry:
    """An ``Enable = on`` entry whose attach failed for a reason that may go away: it is tried
    again in the background, like FreeBSD's iscsid keeps a configured session reconnecting."""

    spec: LunSpec
    error: str
    attempts: int = 1
    next_attempt: float = 0.0   # loop time
    task: asyncio.Task[None] | None = None

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "target": self.spec.target,
            "portal": str(self.spec.portal),
            "lun": self.spec.lun,
            "state": "retrying",
            "error": self.error,
            "attempts": self.attempts,
            "retry_in": round(max(0.0, self.next_attempt - now), 1),
        }


@dataclass(slots=True)
class _Shared:
    session: Session
    users: int = 0
    logged_in: asyncio.Future[None] | None = None


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
        self.config: Config | None = None
        self.disks: dict[str, Disk] = {}
        self._sessions: dict[tuple[Any, ...], _Shared] = {}
        self._lock = asyncio.Lock()
        self._watch_task: asyncio.Task[None] | None = None
        self._serving: set[str] = set()     # backstore names with a dispatcher
        self._unservable: dict[str, str] = {}  # backstore -> why it could not be served
        self._retries: dict[str, _Retry] = {}  # configuration nickname -> its retry
        self._pcap_serial = 0
        self.initiator_name = self.options.initiator_name or default_initiator_name()
        self.started = False

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
        spec = self.resolve(nickname)
        retry = _Retry(spec, str(exc))
        self._retries[nickname] = retry
        retry.task = asyncio.get_running_loop().create_task(self._retry(nickname, retry))

    async def _retry(self, nickname: str, retry: _Retry) -> None:
        loop = asyncio.get_running_loop()
        delay = RETRY_FIRST
        while True:
            retry.next_attempt = loop.time() + delay
            log.warning("could not attach %s (attempt %d): %s; trying again in %.0f s",
                        nickname, retry.attempts, retry.error, delay)
            await asyncio.sleep(delay)
            if self._attached(nickname):
                break
            try:
                await self.attach(nickname)
            except AttachError as exc:
                retry.attempts += 1
                retry.error = str(exc)
                if not exc.retryable:
                    log.error("could not attach %s: %s; not trying again", nickname, exc)
                    break
            except HBAError as exc:
                log.error("could not attach %s: %s; not trying again", nickname, exc)
                break
            else:
                break
            delay = min(delay * 2, RETRY_MAX)
        if self._retries.get(nickname) is retry:
            del self._retries[nickname]

    def _stop_retrying(self, nickname: str) -> _Retry | None:
        retry = self._retries.pop(nickname, None)
        if retry is not None and retry.task is not None \
                and retry.task is not asyncio.current_task():
            retry.task.cancel()
        return retry

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
        for shared in list(self._sessions.values()):
            await shared.session.logout(timeout=5)
        self._sessions.clear()
        self.disks.clear()

    # -- resolving what to attach ----------------------------------------------------------

    def resolve(self, what: str) -> LunSpec:
        """A LunSpec for a configuration nickname or an ``iscsi://`` URL."""
        if what.lower().startswith("iscsi://"):
            try:
                url = parse_url(what)
            except ConfigurationError as exc:
                raise AttachError(str(exc)) from None
            return self._spec_from_url(url)
        entry = self.config.get(what) if self.config is not None else None
        if entry is None:
            where = self.options.config_path or "the configuration"
            raise AttachError(
                f"{what!r} is neither an iscsi:// URL nor the nickname of an entry in {where}")
        return self._spec_from_entry(entry)

    def _spec_from_url(self, url: IscsiUrl, name: str | None = None) -> LunSpec:
        if url.target_iqn is None or url.lun is None:
            raise AttachError(f"URL {url} names no target and LUN")
        creds = _credentials(url.chap_user, url.chap_secret, url.target_user, url.target_secret,
                             where=str(url))
        entry = self._entry_for(url.target_iqn, url.host, url.port)
        if creds is None and entry is not None:
            creds = _entry_credentials(entry)
        session = SessionConfig(
            initiator_name=self.initiator_name, credentials=creds,
            header_digest=url.header_digest.offer if url.header_digest else "None",
            data_digest=url.data_digest.offer if url.data_digest else "None",
            login_timeout=self.options.login_timeout,
            replacement_timeout=self.options.replacement_timeout, reconnect_forever=True)
        return LunSpec(name=name or _default_name(url.target_iqn, url.lun),
                       portal=Portal(url.host, url.port), target=url.target_iqn, lun=url.lun,
                       session=session, queue_depth=self.options.queue_depth)

    def _spec_from_entry(self, entry: TargetEntry) -> LunSpec:
        if entry.target_name is None:
            raise AttachError(f"{entry.nickname} is a discovery entry; it names no LUN")
        overrides: dict[str, str] = {}
        for key, value in (("MaxRecvDataSegmentLength", entry.max_recv_data_segment_length),
                           ("MaxBurstLength", entry.max_burst_length),
                           ("FirstBurstLength", entry.first_burst_length),
                           ("ImmediateData", entry.immediate_data),
                           ("InitialR2T", entry.initial_r2t)):
            if value is not None:
                overrides[key] = ("Yes" if value else "No") if isinstance(value, bool) \
                    else str(value)
        session = SessionConfig(
            initiator_name=entry.initiator_name or self.initiator_name,
            initiator_alias=entry.initiator_alias,
            credentials=_entry_credentials(entry),
            header_digest=entry.header_digest.offer, data_digest=entry.data_digest.offer,
            negotiation=overrides, login_timeout=float(entry.login_timeout),
            replacement_timeout=float(entry.replacement_timeout),
            noop_interval=float(entry.noop_interval), noop_timeout=float(entry.noop_timeout),
            command_timeout=float(entry.command_timeout), tmf_timeout=float(entry.tmf_timeout),
            logout_timeout=float(entry.logout_timeout), reconnect_forever=True)
        return LunSpec(name=entry.nickname, portal=Portal(entry.host, entry.port),
                       target=entry.target_name, lun=entry.lun, session=session,
                       queue_depth=entry.queue_depth, nickname=entry.nickname)

    def _entry_for(self, target: str, host: str, port: int) -> TargetEntry | None:
        if self.config is None:
            return None
        for entry in self.config.entries.values():
            if entry.target_name == target and (entry.host, entry.port) == (host, port):
                return entry
        for entry in self.config.entries.values():
            if entry.target_name == target:
                return entry
        return None

    def resolve_cfgstring(self, text: str, name: str) -> LunSpec:
        """The LunSpec a TCMU cfgstring (``iscsi/`` prefix optional) stands for, with the
        credentials the daemon would use; ``name`` is the backstore's name."""
        return self._spec_from_cfgstring(text, name)

    def _spec_from_cfgstring(self, text: str, backstore: str) -> LunSpec:
        ref = cfgstring.decode(text)
        if ref.nickname is not None:
            entry = self.config.get(ref.nickname) if self.config is not None else None
            if entry is None:
                raise AttachError(
                    f"backstore {backstore} names configuration entry {ref.nickname!r}, which "
                    f"{self.options.config_path or 'the configuration'} does not have")
            return self._spec_from_entry(entry)
        assert ref.portal is not None and ref.target is not None
        url = IscsiUrl(host=ref.portal.host, port=ref.portal.port, target_iqn=ref.target,
                       lun=ref.lun)
        spec = self._spec_from_url(url, name=backstore.removeprefix(BACKSTORE_PREFIX))
        if spec.session.credentials is None:
            env = _env_credentials()
            if env is not None:
                spec = _replace_credentials(spec, env)
        return spec

    # -- sessions --------------------------------------------------------------------------

    async def _acquire(self, spec: LunSpec, *, background: bool = False) -> Session:
        key = spec.session_key
        shared = self._sessions.get(key)
        if shared is None:
            session = Session(spec.portal, spec.target, spec.session,
                              pcap_path=self._pcap_path(spec))
            shared = _Shared(session)
            self._sessions[key] = shared
            session.on_state = lambda state, s=session: self._session_state(s, state)
            if background:
                session.start_background_login()
            else:
                fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                shared.logged_in = fut
                try:
                    await session.login()
                except BaseException as exc:
                    del self._sessions[key]
                    if not fut.done():
                        fut.set_exception(exc)
                        fut.exception()  # retrieved: nobody else may be waiting
                    raise
                fut.set_result(None)
        elif shared.logged_in is not None and not shared.logged_in.done():
            await asyncio.shield(shared.logged_in)
        shared.users += 1
        return shared.session

    def _pcap_path(self, spec: LunSpec) -> str | None:
        """Where ``--pcap DIR`` records a new session to ``spec``'s target: one file per
        session and start (a reconnect adds ``.2.pcap``, ...), named so that ``ls`` sorts it."""
        if self.options.pcap_dir is None:
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self._pcap_serial += 1
        tail = _default_name(spec.target, spec.lun).rsplit("-", 1)[0]
        name = f"{stamp}-{self._pcap_serial}-{tail}-{spec.portal.port}.pcap"
        return os.path.join(self.options.pcap_dir, name)

    async def _release(self, session: Session) -> None:
        for key, shared in list(self._sessions.items()):
            if shared.session is session:
                shared.users -= 1
                if shared.users <= 0:
                    del self._sessions[key]
                    await session.logout(timeout=10)
                    self._event("logout", {"target": session.target_name,
                                           "portal": str(session.portal)})
                return

    def _session_state(self, session: Session, state: SessionState) -> None:
        log.info("session %s: %s", session.label, state.value)
        self._event("session", {"target": session.target_name, "portal": str(session.portal),
                                "state": state.value})

    def _event(self, kind: str, data: dict[str, Any]) -> None:
        if self.options.on_event is not None:
            self.options.on_event(kind, data)

    # -- attach ----------------------------------------------------------------------------

    async def attach(self, what: str) -> Disk:
        """Attach a LUN named by URL or configuration nickname; returns it once usable."""
        spec = self.resolve(what)
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
            attached = await self._attach_locked(spec)
        if spec.nickname is not None:
            self._stop_retrying(spec.nickname)  # "attached ..." was logged
        return attached

    async def _attach_locked(self, spec: LunSpec) -> Disk:
        try:
            session = await self._acquire(spec)
        except ISCSIError as exc:
            raise AttachError(f"attaching {spec.name} ({spec.target} LUN {spec.lun} at "
                              f"{spec.portal}) failed: {exc}",
                              retryable=_worth_retrying(exc)) from None
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
                                  and _worth_retrying(exc)) from None
            if isinstance(exc, TCMUError):
                raise AttachError(f"attaching {spec.name} failed: {exc}") from None
            raise
        disk.state = "attached"
        self.disks[spec.name] = disk
        log.info("attached %s: %s LUN %d at %s -> %s (%s)", spec.name, spec.target, spec.lun,
                 spec.portal, disk.device.node, disk.device.primary_link or "no by-id link")
        self._event("attach", disk.describe())
        return disk

    async def _rollback(self, disk: Disk | None, backstore: str, created: bool,
                        session: Session) -> None:
        if disk is not None:
            # Our own removal: _watch_dispatcher must not release the session a second time.
            disk.state = "detaching"
        if created:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(kernel.unlink_and_delete, backstore)
        if disk is not None and disk.dispatcher is not None:
            with contextlib.suppress(Exception):
                await disk.dispatcher.close(timeout=5)
            self._serving.discard(backstore)
        await self._release(session)

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
        if reason is StopReason.REMOVED and disk.state != "detaching":
            # Someone removed the backstore behind our back (targetcli, rtslib): forget it.
            log.warning("%s: its TCMU device was removed; forgetting it", disk.name)
            self.disks.pop(disk.name, None)
            self._event("detach", disk.describe())
            await self._release(disk.session)
        elif reason is StopReason.RING_CORRUPT:
            disk.state = "ring broken"
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
                described = retry.describe(asyncio.get_running_loop().time())
                described["state"] = "detached"
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
            previous, disk.state = disk.state, "detaching"
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
            await self._release(disk.session)
            log.info("detached %s (%s LUN %d at %s)", disk.name, disk.spec.target,
                     disk.spec.lun, disk.spec.portal)
            described = disk.describe()
            described["state"] = "detached"
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
        spec = self._spec_from_cfgstring(info.cfgstring, info.name)
        if spec.name in self.disks:
            # Two backstores naming the same configuration entry (one made with targetcli):
            # the second goes by its backstore name rather than replacing the first here.
            spec = dataclasses.replace(spec, name=info.name)
        uio = await _wait_for_uio(info.name, info.hba_index)
        session = await self._acquire(spec, background=True)
        disk = Disk(spec=spec, backstore=info.name, hba_index=info.hba_index, session=session,
                    size=info.size, scsi_address=info.scsi_address, adopted=True)
        try:
            await self._serve(disk, uio, takeover=takeover)
        except BaseException:
            await self._release(session)
            raise
        if disk.scsi_address is not None:
            name = devices.disk_name(disk.scsi_address)
            if name is not None:
                with contextlib.suppress(devices.DeviceTimeout):
                    disk.device = await devices.wait_for_disk(disk.scsi_address, timeout=10)
        disk.state = "attached"
        self.disks[disk.name] = disk
        log.info("%s %s: backstore %s -> %s", "took over" if takeover else "serving",
                 disk.name, info.name, disk.device.node if disk.device else "no disk yet")
        self._event("adopt", disk.describe())
        return disk

    async def _watch_uio(self) -> None:
        """Serve uio devices of our subtype that appear later (targetcli, rtslib)."""
        import pyudev

        loop = asyncio.get_running_loop()
        context = pyudev.Context()
        monitor = pyudev.Monitor.from_netlink(context)
        monitor.filter_by("uio")
        monitor.filter_by("block")   # the disk of a LUN someone else links to a backstore
        monitor.start()
        wake = asyncio.Event()
        wake.set()  # one pass now: a device made between adopt_existing's scan and monitor.start

        def readable() -> None:
            while monitor.poll(timeout=0) is not None:
                pass
            wake.set()

        loop.add_reader(monitor.fileno(), readable)
        try:
            while True:
                await wake.wait()
                wake.clear()
                await asyncio.sleep(0.2)  # let a creator finish writing the device's control
                async with self._lock:
                    await self._serve_new_devices()
                    await self.refresh_devices()
        finally:
            loop.remove_reader(monitor.fileno())

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
        missing = [d for d in self.disks.values() if d.device is None and d.state == "attached"]
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
            "sessions": [
                {"target": s.session.target_name, "portal": str(s.session.portal),
                 "state": s.session.state.value, "luns": s.users,
                 "reconnects": s.session.reconnects, **s.session.stats()}
                for s in self._sessions.values()
            ],
        }


# --------------------------------------------------------------------------------------------
# helpers


def _worth_retrying(exc: ISCSIError) -> bool:
    """Whether an attach that failed with ``exc`` may succeed later with nothing changed."""
    if isinstance(exc, (AuthenticationError, ConfigurationError, NegotiationError,
                        LocalProtocolError)):
        return False
    if isinstance(exc, LoginError):
        # A target that is being set up answers "not found" until its LUNs exist.
        return exc.retryable or isinstance(exc, TargetNotFoundError)
    return True


def _default_name(target: str, lun: int) -> str:
    tail = re.sub(r"[^A-Za-z0-9_.-]", "-", target.rsplit(":", 1)[-1])[:40].strip("-.") or "lun"
    return f"{tail}-{lun}"


def _credentials(user: str | None, secret: str | None, target_user: str | None,
                 target_secret: str | None, *, where: str) -> ChapCredentials | None:
    if user is None:
        return None
    if secret is None:
        raise AttachError(f"{where} names CHAP user {user!r} but gives no secret")
    target: ChapAccount | None = None
    if target_user is not None:
        if target_secret is None:
            raise AttachError(f"{where} asks for mutual CHAP but gives no target secret")
        target = ChapAccount(target_user, Secret(target_secret))
    try:
        return ChapCredentials(ChapAccount(user, Secret(secret)), target)
    except ConfigurationError as exc:
        raise AttachError(f"{where}: {exc}") from None


def _entry_credentials(entry: TargetEntry) -> ChapCredentials | None:
    if entry.auth_method is not AuthMethod.CHAP:
        return None
    return _credentials(entry.chap_name, entry.chap_secret, entry.tgt_chap_name,
                        entry.tgt_chap_secret, where=f"configuration entry {entry.nickname}")


def _env_credentials() -> ChapCredentials | None:
    user = os.environ.get("ISCSI_HBA_CHAP_NAME")
    secret = os.environ.get("ISCSI_HBA_CHAP_SECRET")
    if user is None or secret is None:
        return None
    return _credentials(user, secret, os.environ.get("ISCSI_HBA_TARGET_CHAP_NAME"),
                        os.environ.get("ISCSI_HBA_TARGET_CHAP_SECRET"), where="environment")


def _replace_credentials(spec: LunSpec, creds: ChapCredentials) -> LunSpec:
    return dataclasses.replace(spec, session=dataclasses.replace(spec.session,
                                                                 credentials=creds))


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


__all__ = [
    "AttachError",
    "ConfigError",
    "Daemon",
    "DaemonOptions",
    "DetachError",
    "Disk",
    "LunSpec",
    "prepare_capture_dir",
]
