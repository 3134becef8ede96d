"""The daemon's record of each LUN it serves: what ``hbactl list``/``status`` show of it.

:meth:`Disk.describe` is the row ``hbactl list``/``status`` print and the DBus ``a{sv}`` the
daemon sends. This module imports nothing heavy at run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

    from hba.devices import BlockDevice
    from hba.specs import LunSpec
    from initiator.transport import Session
    from tcmu_handler.dispatcher import Dispatcher

__all__ = ["Disk"]


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
