"""The little SCSI the ring path needs: data direction from a CDB, and the sense we report when
a command could not be delivered (its words and bytes come from :mod:`initiator.scsi`).

Data direction
--------------
A TCMU CMD entry carries the iovecs but not the direction of a unidirectional transfer
(``tcmu_cmd_entry`` has no such field and ``kflags`` is always 0), so the dispatcher derives it
from the CDB, as every TCMU handler does. The table below lists the SPC/SBC/SSC/MMC commands that
move data *to* the device; a command that has iovecs and is not listed is a Data-In command.
Where two command sets reuse an opcode in opposite directions (0x51: obsolete XPWRITE(10) vs
MMC READ DISC INFORMATION) the live command wins.

Sense for errors the transport reports
--------------------------------------
When the initiator cannot deliver a command (``on_done`` receives an ``ISCSIError``) the
command still has to finish: we complete it with CHECK CONDITION and fixed-format sense. The
sense key decides what Linux does with it; tcm_loop passes our sense to the mid-layer
unchanged (``tcmu_handle_completion`` copies it and sets ``SCF_TRANSPORT_TASK_SENSE``).
What ``scsi_check_sense()`` (scsi_error.c) and ``scsi_io_completion_action()`` (scsi_lib.c) of
Linux 6.x do with each choice:

- ``ConnectionFailed`` -> NOT READY, 04/01 (logical unit is in process of becoming ready).
  ``scsi_check_sense`` says NEEDS_RETRY, then ``scsi_io_completion_action`` says
  ACTION_DELAYED_RETRY every few ms until (retries + 1) x timeout (about 180 s for sd): the I/O
  waits out session recovery, as open-iscsi holds it within replacement_timeout.
- ``SessionFailed`` -> NOT READY, 08/00 (logical unit communication failure). No retry
  (ACTION_FAIL): the session is gone after replacement_timeout, so the I/O fails now, as with
  open-iscsi, and dm-multipath fails over.
- ``AuthenticationError``, ``NegotiationError``, ``ConfigurationError`` -> NOT READY, 04/03
  (manual intervention required). No retry: a person must fix the configuration.
- ``DigestError`` -> ABORTED COMMAND, 47/05 (protocol service CRC error). NEEDS_RETRY (up to 5
  immediate resends): the bytes were damaged in flight; iSCSI targets report digest errors
  with this very code (RFC 7143 §7.8).
- ``CommandTimeout`` -> ABORTED COMMAND, 08/01 (logical unit communication time-out).
  NEEDS_RETRY.
- ``TaskAborted`` -> ABORTED COMMAND, 2F/02 (commands cleared by device server). NEEDS_RETRY.
  When the abort came from the kernel's own TMR, LIO has already aborted the command and
  ignores our status.
- ``RemoteProtocolError`` -> ABORTED COMMAND, 4B/00 (data phase error). NEEDS_RETRY: the
  target broke the exchange; a resend may get through.
- any other ``ISCSIError`` -> ABORTED COMMAND, 08/00 (logical unit communication failure).
  NEEDS_RETRY.
- ``LocalProtocolError`` and any other exception (a bug) -> HARDWARE ERROR, 44/00 (internal
  target failure). No retry (SUCCESS, then ACTION_FAIL): retrying would repeat the bug.
  Deliberately not ILLEGAL REQUEST 20/00, which makes sd switch READ(10)/WRITE(10) to 6-byte
  CDBs for good.

One path or several (:class:`PathPolicy`)
-----------------------------------------
The table above is for a disk whose ring is the only way to its LUN (``PathPolicy.SINGLE``):
there a lost connection is best waited out in the SCSI layer. A ring that is one *path* of a
LUN that dm-multipath reaches through several (``PathPolicy.MULTIPATH``) must instead report
"this path is down" so that dm-multipath acts on it at once: every error that says so becomes
NOT READY 08/00 there. ``scsi_io_completion_action`` fails it without retry (ACTION_FAIL,
``BLK_STS_IOERR``), ``blk_path_error()`` counts that as a path error, and dm-multipath fails
the path and requeues the I/O on another (docs/multipath-design.md §2.1). What must never reach
the kernel for a path: BUSY, NOT READY 04/01 and 04/0A — the SCSI layer keeps retrying those
for up to (retries + 1) x timeout, out of dm-multipath's reach — so ``ConnectionFailed`` maps
to 08/00 too. The target errors (HARDWARE ERROR, MEDIUM ERROR, ...) stay what they are on a
path: they are not path errors, and retrying them elsewhere would not help.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from initiator.errors import (
    AuthenticationError,
    CommandTimeout,
    ConfigurationError,
    ConnectionFailed,
    DigestError,
    ISCSIError,
    LocalProtocolError,
    NegotiationError,
    RemoteProtocolError,
    SessionFailed,
    TaskAborted,
)
from initiator.scsi import SenseKey, asc_text, build_fixed_sense

__all__ = [
    "COMMANDS_CLEARED", "DATA_PHASE_ERROR", "INTERNAL_FAILURE", "LU_BECOMING_READY",
    "LU_COMMUNICATION_FAILURE", "LU_COMMUNICATION_TIMEOUT", "LU_MANUAL_INTERVENTION",
    "NO_SENSE_FROM_TARGET", "PROTOCOL_CRC_ERROR", "TRANSPORT_FAILURE", "PathPolicy", "SenseCode",
    "SenseKey", "is_data_out", "sense_for_error",
]


class SenseCode(NamedTuple):
    """A sense key with its additional sense code and qualifier.

    Their words and their bytes come from :mod:`initiator.scsi`, the one home of sense data:
    the ASC/ASCQ table and the fixed-format builder.
    """

    key: SenseKey
    asc: int
    ascq: int

    @property
    def text(self) -> str:
        """The ASC/ASCQ in words, as SPC names them."""
        return asc_text(self.asc, self.ascq)

    def fixed(self) -> bytes:
        """This code as 18 bytes of fixed-format, current sense (SPC-5 §4.4.3)."""
        return build_fixed_sense(self.key, self.asc, self.ascq)

    def __str__(self) -> str:
        return f"{self.key.words}, {self.text} ({self.asc:02X}/{self.ascq:02X})"


LU_BECOMING_READY = SenseCode(SenseKey.NOT_READY, 0x04, 0x01)
LU_COMMUNICATION_FAILURE = SenseCode(SenseKey.NOT_READY, 0x08, 0x00)
LU_MANUAL_INTERVENTION = SenseCode(SenseKey.NOT_READY, 0x04, 0x03)
PROTOCOL_CRC_ERROR = SenseCode(SenseKey.ABORTED_COMMAND, 0x47, 0x05)
LU_COMMUNICATION_TIMEOUT = SenseCode(SenseKey.ABORTED_COMMAND, 0x08, 0x01)
COMMANDS_CLEARED = SenseCode(SenseKey.ABORTED_COMMAND, 0x2F, 0x02)
DATA_PHASE_ERROR = SenseCode(SenseKey.ABORTED_COMMAND, 0x4B, 0x00)
TRANSPORT_FAILURE = SenseCode(SenseKey.ABORTED_COMMAND, 0x08, 0x00)
INTERNAL_FAILURE = SenseCode(SenseKey.HARDWARE_ERROR, 0x44, 0x00)
NO_SENSE_FROM_TARGET = SenseCode(SenseKey.ABORTED_COMMAND, 0x00, 0x00)

class PathPolicy(enum.Enum):
    """Whether a ring is the only way to its LUN or one path of several (module docstring)."""

    SINGLE = "single path"
    """A lost connection is waited out in the SCSI layer (NOT READY 04/01)."""
    MULTIPATH = "multipath"
    """Every "path down" error is NOT READY 08/00, a path error for dm-multipath."""


_ERROR_SENSE: tuple[tuple[type[BaseException], SenseCode], ...] = (
    # Most specific first: the first isinstance() match wins.
    (SessionFailed, LU_COMMUNICATION_FAILURE),
    (ConnectionFailed, LU_BECOMING_READY),
    (AuthenticationError, LU_MANUAL_INTERVENTION),
    (NegotiationError, LU_MANUAL_INTERVENTION),
    (ConfigurationError, LU_MANUAL_INTERVENTION),
    (DigestError, PROTOCOL_CRC_ERROR),
    (CommandTimeout, LU_COMMUNICATION_TIMEOUT),
    (TaskAborted, COMMANDS_CLEARED),
    (LocalProtocolError, INTERNAL_FAILURE),
    (RemoteProtocolError, DATA_PHASE_ERROR),
    (ISCSIError, TRANSPORT_FAILURE),
)


# What a path of a multipath LUN answers differently; checked before the common table.
_PATH_SENSE: dict[PathPolicy, tuple[tuple[type[BaseException], SenseCode], ...]] = {
    PathPolicy.SINGLE: (),
    PathPolicy.MULTIPATH: ((ConnectionFailed, LU_COMMUNICATION_FAILURE),),
}
_TABLES = {policy: overrides + _ERROR_SENSE for policy, overrides in _PATH_SENSE.items()}


def sense_for_error(error: BaseException, policy: PathPolicy = PathPolicy.SINGLE) -> SenseCode:
    """The sense code reporting ``error`` to the kernel for a ring of ``policy`` (see the
    module docstring for why)."""
    for cls, code in _TABLES[policy]:
        if isinstance(error, cls):
            return code
    return INTERNAL_FAILURE


# --- data direction ------------------------------------------------------------------------------

_DATA_OUT_OPCODES = frozenset({
    0x04,  # FORMAT UNIT (parameter list)
    0x07,  # REASSIGN BLOCKS
    0x0A,  # WRITE(6)
    0x15,  # MODE SELECT(6)
    0x18,  # COPY (obsolete)
    0x1D,  # SEND DIAGNOSTIC
    0x24,  # SET WINDOW (scanners)
    0x2A,  # WRITE(10)
    0x2E,  # WRITE AND VERIFY(10)
    0x39,  # COMPARE (obsolete)
    0x3A,  # COPY AND VERIFY (obsolete)
    0x3B,  # WRITE BUFFER
    0x3D,  # UPDATE BLOCK (obsolete)
    0x3F,  # WRITE LONG(10)
    0x41,  # WRITE SAME(10)
    0x42,  # UNMAP
    0x4C,  # LOG SELECT
    0x50,  # XDWRITE(10) (obsolete)
    0x54,  # SEND OPC INFORMATION (MMC)
    0x55,  # MODE SELECT(10)
    0x56,  # RESERVE(10) (third-party parameter list)
    0x5D,  # SEND CUE SHEET (MMC)
    0x5F,  # PERSISTENT RESERVE OUT
    0x83,  # EXTENDED COPY / THIRD-PARTY COPY OUT
    0x89,  # COMPARE AND WRITE
    0x8D,  # WRITE ATTRIBUTE
    0x8A,  # WRITE(16)
    0x8B,  # ORWRITE(16)
    0x8E,  # WRITE AND VERIFY(16)
    0x93,  # WRITE SAME(16)
    0x9C,  # WRITE ATOMIC(16)
    0x9F,  # SERVICE ACTION OUT(16) (WRITE LONG(16), ...)
    0xA4,  # MAINTENANCE OUT (SET TARGET PORT GROUPS, ...)
    0xA9,  # SERVICE ACTION OUT(12)
    0xAA,  # WRITE(12)
    0xAE,  # WRITE AND VERIFY(12)
    0xB5,  # SECURITY PROTOCOL OUT
    0xB6,  # SET STREAMING (MMC)
    0xBF,  # SEND DVD STRUCTURE (MMC)
})
_VERIFY_OPCODES = frozenset({0x2F, 0xAF, 0x8F})  # VERIFY(10), VERIFY(12), VERIFY(16)
_ATA_PASS_THROUGH = frozenset({0x85, 0xA1})  # ATA PASS-THROUGH(16), (12)
_VARLEN_DATA_OUT = frozenset({
    0x0004,  # XDWRITE(32)
    0x0006,  # XPWRITE(32)
    0x000B,  # WRITE(32)
    0x000C,  # WRITE AND VERIFY(32)
    0x000D,  # WRITE SAME(32)
    0x000E,  # ORWRITE(32)
    0x0018,  # WRITE ATOMIC(32)
})
_VARLEN_VERIFY = 0x000A  # VERIFY(32)
DATA_OUT_BY_OPCODE: tuple[bool | None, ...] = tuple(
    None if op in _VERIFY_OPCODES or op in _ATA_PASS_THROUGH or op == 0x7F
    else op in _DATA_OUT_OPCODES for op in range(256))
"""By opcode: whether a unidirectional command's data flows to the device, or None when a
CDB field decides (:func:`is_data_out`). One lookup for the dispatcher's per-command path."""


def is_data_out(cdb: bytes) -> bool:
    """True when the data of a unidirectional command flows to the device (a "write").

    Commands whose direction depends on a CDB field are decided by that field: VERIFY sends
    data only with BYTCHK != 0 (SBC-4), ATA PASS-THROUGH reads when T_DIR is 1 (SAT-4).
    """
    if not cdb:
        return False
    opcode = cdb[0]
    decided = DATA_OUT_BY_OPCODE[opcode]
    if decided is not None:
        return decided
    if opcode in _VERIFY_OPCODES:
        return len(cdb) > 1 and (cdb[1] >> 1) & 0x3 != 0
    if opcode in _ATA_PASS_THROUGH:
        return len(cdb) > 2 and not cdb[2] & 0x08
    if opcode == 0x7F and len(cdb) >= 11:
        action = (cdb[8] << 8) | cdb[9]
        if action in _VARLEN_DATA_OUT:
            return True
        if action == _VARLEN_VERIFY:
            return (cdb[10] >> 1) & 0x3 != 0
    return False
