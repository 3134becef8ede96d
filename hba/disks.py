"""The daemon's record of each LUN it serves and of its paths, and the states ``hbactl list``
shows.

:class:`DiskState` is the one list of states a disk (or a configuration entry still being
tried) goes through; :class:`PathState` says where one path of a disk is, derived from its
session and its kernel side rather than kept beside them. :meth:`Disk.describe` is the row
``hbactl list``/``status`` print and the DBus ``a{sv}`` the daemon sends, with the states as
their string values and one row per path under ``paths``; a configuration entry that is no
disk yet (being attached, retried, or failed) has the row of :func:`entry_row`. The clients
read those rows with no more than this module (which imports nothing heavy at run time).

A disk has one path per portal it is reached through (one for a plain LUN). Each path is its
own session (I_T nexus), TCMU backstore, tcm_loop target and ``/dev/sdX``; dm-multipath makes
one disk of them. The keys a single-path disk always had (``device``, ``backstore``,
``scsi_address``, ``session``...) describe the first path that has a disk, so that readers of
one path keep working.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

    from hba.devices import BlockDevice
    from hba.specs import LunSpec, PathSpec
    from initiator.login import Portal
    from initiator.transport import Session
    from tcmu_handler.dispatcher import Dispatcher

__all__ = ["Disk", "DiskPath", "DiskState", "PathState", "backstore_path", "entry_row"]


def backstore_path(hba_index: int, name: str) -> str:
    """``user_0/hba-db``: how every row and log line names a backstore, as configfs has it
    (``target/core/user_0/hba-db``; the HBA first: one name may be in several)."""
    return f"user_{hba_index}/{name}"


class DiskState(enum.Enum):
    """Where a disk is in its life; the value is what ``list``/``status`` (and JSON) show."""

    ATTACHING = "attaching"        # a disk being set up; an Enable = on entry waiting its turn
    ATTACHED = "attached"
    DETACHING = "detaching"
    DETACHED = "detached"          # the last word of a detach (its reply and signal)
    RING_BROKEN = "ring broken"    # the TCMU ring went inconsistent: a restart resets it
    RETRYING = "retrying"          # an ``Enable = on`` entry tried again in the background
    FAILED = "failed"              # an ``Enable = on`` entry that trying again cannot attach
    UNSERVED = "not served"        # a backstore of ours in the kernel this daemon cannot serve
    TAKEOVER = "taking over"       # its worker process died; a new one takes over its rings


def entry_row(name: str, target: str | None, portal: str | None, lun: int | None,
              state: DiskState, **more: Any) -> dict[str, Any]:
    """The row of a configuration entry that is no disk yet (``attaching``, ``retrying``,
    ``failed``): what a disk's row says of its LUN, its state, and ``more`` (``error``...)."""
    return {"name": name, "target": target, "portal": portal, "lun": lun,
            "state": state.value, **more}


class PathState(enum.Enum):
    """Where one path is; the value is what ``status`` shows (and the daemon logs)."""

    CONNECTING = "connecting"      # not logged in yet: no disk in the kernel for it yet
    UP = "up"                      # logged in, its disk carries I/O
    DOWN = "down"                  # connection lost: its I/O waits up to the replacement timeout
    FAILED = "failed"              # not back within it: its I/O fails (over) while it reconnects
    RING_BROKEN = "ring broken"
    CLOSED = "closed"              # logged out (detached)


_BY_SESSION = {"new": PathState.CONNECTING, "logging in": PathState.CONNECTING,
               "logged in": PathState.UP, "recovering": PathState.DOWN,
               "failed": PathState.FAILED}


@dataclass(slots=True, eq=False)
class DiskPath:
    """One path of a disk: a portal, its session and (once set up) its kernel side."""

    spec: PathSpec
    session: Session
    backstore: str
    hba_index: int = -1              # user_<n> of the backstore, once created
    dispatcher: Dispatcher | None = None
    device: BlockDevice | None = None
    scsi_address: str | None = None
    watcher: asyncio.Task[None] | None = None
    setup: asyncio.Task[None] | None = None   # its kernel side being set up after a late login
    ring_broken: bool = False
    error: str | None = None         # why its kernel side could not be set up
    logged: PathState | None = None  # the state last logged (one line per change)
    changed_at: float = 0.0          # loop time of that change
    since: float = 0.0               # wall-clock time of that change

    @property
    def index(self) -> int:
        return self.spec.index

    @property
    def state(self) -> PathState:
        """Derived from the ring and the session, so it cannot disagree with them."""
        if self.ring_broken:
            return PathState.RING_BROKEN
        state = _BY_SESSION.get(self.session.state.value, PathState.CLOSED)
        if self.dispatcher is None and state is not PathState.CLOSED:
            return PathState.CONNECTING   # no disk in the kernel yet: nothing waits on it
        return state

    @property
    def portal(self) -> str:
        """``host:port,tpgt`` (the tag once a login learnt it)."""
        tag = self.session.target_portal_group_tag
        if tag is None:
            tag = self.spec.portal.tpgt
        return f"{self.session.portal}" + (f",{tag}" if tag is not None else "")

    @property
    def label(self) -> str:
        """``db path 2 (192.0.2.11:3260,2)``: how the log names the path."""
        return f"{self.spec.disk.name} path {self.index} ({self.portal})"

    def why(self) -> str | None:
        """Why the path is not up, in words (None when it is)."""
        state = self.state
        recovery = self.session.recovery
        if state is PathState.RING_BROKEN:
            return "the TCMU ring went inconsistent; restart the daemon to reset it"
        if state in (PathState.DOWN, PathState.FAILED):
            last = f"; last attempt: {recovery.last_error}" if recovery.last_error else ""
            return f"{recovery.cause}{last}"
        if state is PathState.CONNECTING:
            return self.error or recovery.last_error or recovery.cause or None
        return None

    def describe(self, sysfs: FsPath = FsPath("/sys")) -> dict[str, Any]:
        """The path's row under a disk's ``paths``."""
        from hba import devices

        return {
            "path": self.index,
            "portal": self.portal,
            "isid": f"{self.session.config.isid:012x}",
            "device": self.device.node if self.device else None,
            "scsi_address": self.scsi_address,
            "backstore": backstore_path(self.hba_index, self.backstore)
            if self.hba_index >= 0 else None,
            "state": self.state.value,
            "session": self.session.state.value,
            "since": round(self.since, 1) if self.since else None,
            "error": self.why(),
            "reconnects": self.session.reconnects,
            "alua": devices.access_state(self.scsi_address, sysfs) if self.scsi_address
            else None,
            "commands": self.dispatcher.stats.completed if self.dispatcher else 0,
        }


@dataclass(slots=True)
class Disk:
    """One LUN this daemon serves, through one path or several."""

    spec: LunSpec
    paths: list[DiskPath] = field(default_factory=list)
    size: int = 0
    block_size: int = 512
    adopted: bool = False
    state: DiskState = DiskState.ATTACHING

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def primary(self) -> DiskPath | None:
        """The first path with a disk in the kernel, else the first path."""
        for path in self.paths:
            if path.device is not None:
                return path
        return self.paths[0] if self.paths else None

    # What a single-path disk always had: its first path's.

    @property
    def session(self) -> Session | None:
        primary = self.primary
        return primary.session if primary is not None else None

    @property
    def device(self) -> BlockDevice | None:
        primary = self.primary
        return primary.device if primary is not None else None

    @property
    def scsi_address(self) -> str | None:
        primary = self.primary
        return primary.scsi_address if primary is not None else None

    @property
    def backstore(self) -> str | None:
        primary = self.primary
        return primary.backstore if primary is not None else None

    @property
    def hba_index(self) -> int:
        primary = self.primary
        return primary.hba_index if primary is not None else -1

    def path_at(self, portal: Portal) -> DiskPath | None:
        """The path of this disk through ``portal``, if it has one."""
        from hba.specs import same_portal

        for path in self.paths:
            if same_portal(path.spec.portal, portal):
                return path
        return None

    def describe(self, state: DiskState | None = None,
                 sysfs: FsPath = FsPath("/sys")) -> dict[str, Any]:
        """What ``hbactl list`` / ``status`` show; ``state`` instead of the disk's own."""
        from hba import devices

        primary = self.primary
        rows = [path.describe(sysfs) for path in self.paths]
        stats = [p.dispatcher.stats for p in self.paths if p.dispatcher is not None]
        nodes = [p.device.name for p in self.paths if p.device is not None]
        holder = devices.holder(nodes, sysfs) if nodes else None
        return {
            "name": self.name,
            "target": self.spec.target,
            "portal": str(self.spec.portal),
            "lun": self.spec.lun,
            "device": primary.device.node if primary and primary.device else None,
            "by_id": primary.device.primary_link if primary and primary.device else None,
            "size": self.size,
            "block_size": self.block_size,
            "backstore": backstore_path(primary.hba_index, primary.backstore)
            if primary is not None and primary.hba_index >= 0 else None,
            "scsi_address": primary.scsi_address if primary else None,
            "state": (state or self.state).value,
            "session": primary.session.state.value if primary else None,
            "in_flight": sum(s.in_flight for s in stats),
            "commands": sum(s.completed for s in stats),
            "reconnects": sum(p.session.reconnects for p in self.paths),
            "multipath": self.spec.multipath,
            "paths": rows,
            "paths_up": sum(1 for p in self.paths if p.state is PathState.UP),
            "holder": holder,
            "hint": devices.multipath_hint(nodes, holder, sysfs)
            if self.spec.multipath else None,
        }
