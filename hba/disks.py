"""The daemon's record of each LUN it serves, and the states ``hbactl list`` shows.

:class:`DiskState` is the one list of states a disk (or a configuration entry still being
tried) goes through; :meth:`Disk.describe` is the row ``hbactl list``/``status`` print and the
DBus ``a{sv}`` the daemon sends, with the state as its string value. The clients read those rows
with no more than this module (which imports nothing heavy at run time).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

    from hba.devices import BlockDevice
    from hba.specs import LunSpec
    from initiator.transport import Session
    from tcmu_handler.dispatcher import Dispatcher

__all__ = ["Disk", "DiskState"]


class DiskState(enum.Enum):
    """Where a disk is in its life; the value is what ``list``/``status`` (and JSON) show."""

    ATTACHING = "attaching"
    ATTACHED = "attached"
    DETACHING = "detaching"
    DETACHED = "detached"          # the last word of a detach (its reply and signal)
    RING_BROKEN = "ring broken"    # the TCMU ring went inconsistent: a restart resets it
    RETRYING = "retrying"          # an ``Enable = on`` entry tried again in the background


@dataclass(slots=True)
class Disk:
    """One LUN this daemon serves."""

    spec: LunSpec
    backstore: str
    hba_index: int
    session: Session
    dispatcher: Dispatcher | None = None
    device: BlockDevice | None = None
    scsi_address: str | None = None
    size: int = 0
    block_size: int = 512
    adopted: bool = False
    watcher: asyncio.Task[None] | None = None
    state: DiskState = DiskState.ATTACHING

    @property
    def name(self) -> str:
        return self.spec.name

    def describe(self, state: DiskState | None = None) -> dict[str, Any]:
        """What ``hbactl list`` / ``status`` show; ``state`` instead of the disk's own."""
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
            "state": (state or self.state).value,
            "session": self.session.state.value,
            "in_flight": stats.in_flight if stats else 0,
            "commands": stats.completed if stats else 0,
            "reconnects": self.session.reconnects,
        }
