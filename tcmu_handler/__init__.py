"""The TCMU side: the kernel's command ring, the uio device, and the dispatcher that hands
each CDB to an iSCSI session (see docs/tcmu-ring.md).

- :mod:`tcmu_handler.ring` — the ring codec (offsets of ``target_core_user.h``) and the
  userspace slot rule (:class:`~tcmu_handler.ring.CommandRing`), both with no I/O.
- :mod:`tcmu_handler.device` — uio discovery in sysfs, open + mmap, the event fd, configfs
  actions, restart takeover.
- :mod:`tcmu_handler.dispatcher` — the asyncio loop that serves a ring with a
  ``CommandExecutor``.
- :mod:`tcmu_handler.scsi` — data direction from a CDB, sense data, errors as sense.
- :mod:`tcmu_handler.executor` — an iSCSI ``Session`` as the dispatcher's ``CommandExecutor``.
- :mod:`tcmu_handler.serve` — ``python -m tcmu_handler.serve --device NAME URL``: one device,
  one session, in one process (restart takeover, SIGTERM, readiness through ``NOTIFY_SOCKET``).

Typical daemon use::

    info = find_device("disk0")                   # or find_devices() at start-up
    device = takeover(info) if restarting else UioDevice.open(info)
    dispatcher = Dispatcher(device, SessionExecutor(session), lun=lun)
    reason = await dispatcher.run()               # StopReason.REMOVED when the backstore goes
"""

from tcmu_handler.device import (
    TcmuConfigfs,
    UioDevice,
    UioInfo,
    UioName,
    find_device,
    find_devices,
    takeover,
)
from tcmu_handler.dispatcher import Dispatcher, DispatcherStats, StopReason
from tcmu_handler.errors import TCMUError

__all__ = [
    "Dispatcher",
    "DispatcherStats",
    "StopReason",
    "TCMUError",
    "TcmuConfigfs",
    "UioDevice",
    "UioInfo",
    "UioName",
    "find_device",
    "find_devices",
    "takeover",
]
