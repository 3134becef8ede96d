"""The exceptions of the ``tcmu_handler`` package: one root, :class:`TCMUError`.

Every message says what failed, on which device, and what to check.
"""

from __future__ import annotations


class TCMUError(Exception):
    """Root of every exception raised by the ``tcmu_handler`` package."""


class RingError(TCMUError):
    """The mailbox or the command ring holds something the kernel never writes.

    Seen when a mapping is not a TCMU ring at all (wrong map, wrong version) or when the ring
    was rewritten underneath us (``action/reset_ring`` by someone else). Recovery: take the
    device over again (:func:`tcmu_handler.device.takeover`), which resets the ring.
    """


class MalformedEntry(RingError):
    """One command entry cannot be served safely (its iovecs or CDB lie outside their area).

    Carries the entry's ``cmd_id`` so the dispatcher can still complete it (with
    ``TCMU_UFLAG_UNKNOWN_OP``) instead of leaving the slot, and the kernel command, hanging.
    """

    def __init__(self, message: str, *, cmd_id: int) -> None:
        super().__init__(message)
        self.cmd_id = cmd_id


class DeviceNotFound(TCMUError):
    """No ``/sys/class/uio/uioN`` carries the TCMU device we were asked for."""


class DeviceBusy(TCMUError):
    """``/dev/uioN`` is already open: another handler (a live iscsi-hba, tcmu-runner) owns it."""


class DeviceRemoved(TCMUError):
    """The uio device went away (``POLLERR``, ``EIO``, ``ENODEV``): its backstore was deleted."""


class ConfigfsError(TCMUError):
    """A configfs attribute or action of the TCMU device could not be read or written."""
