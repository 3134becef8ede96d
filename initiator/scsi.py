"""SCSI helpers for ``hbactl`` and the TCMU side: CDB builders, data parsers, sense data.

Theory of operation
-------------------
The initiator itself never looks inside a CDB: the kernel's CDBs pass through unchanged. This
module is for the places that *do* speak SCSI themselves:

* ``hbactl`` builds CDBs (INQUIRY, READ CAPACITY, REPORT LUNS, READ/WRITE ...) and parses what
  comes back into frozen dataclasses;
* the TCMU side synthesises CHECK CONDITION sense data (``build_fixed_sense``) when a command
  cannot be delivered;
* everyone turns a failed command into a :class:`ScsiCommandError` whose message names the
  command, the sense key and the ASC/ASCQ in words.

Sources: SPC-4/SPC-5 (INQUIRY, VPD pages, sense data, REPORT LUNS, MODE SENSE, the ASC/ASCQ
assignments of Annex D), SBC-3/SBC-4 (READ/WRITE, READ CAPACITY, SYNCHRONIZE CACHE, the block
VPD pages), SAM-5 (LUN addressing). Identifier renderings follow what Linux shows: the kernel's
``wwid`` attribute (``naa.6001405...``), udev's ``ID_WWN_WITH_EXTENSION`` used for the
``/dev/disk/by-id/wwn-0x...`` link, and ``sg_inq``/``sg_vpd``.

Parsers take ``bytes``-like data exactly as a Data-In delivered it and raise
:class:`ScsiDataError` when it is too short or inconsistent. Builders raise ``ValueError`` for
arguments that cannot be encoded (a programming error of the caller, not a user-facing
condition). Sense data here is the sense data itself, without the 2-byte SenseLength that
precedes it in an iSCSI SCSI Response (RFC 7143 §11.4.7.2).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from initiator.command import CommandResult, ScsiStatus
from initiator.errors import CommandError, RemoteProtocolError, TransferError

__all__ = [
    "AddressMethod",
    "Association",
    "BlockDeviceCharacteristics",
    "BlockLimits",
    "CodeSet",
    "Designator",
    "DesignatorType",
    "DeviceIdentification",
    "LogicalBlockProvisioning",
    "Lun",
    "ModePage",
    "ModeSense",
    "Opcode",
    "PageControl",
    "PeripheralDeviceType",
    "ProvisioningType",
    "ReadCapacity10",
    "ReadCapacity16",
    "ReportLuns",
    "Retry",
    "ScsiCommandError",
    "ScsiDataError",
    "Sense",
    "SenseDescriptor",
    "SenseKey",
    "StandardInquiry",
    "VpdPage",
    "asc_text",
    "build_fixed_sense",
    "check_result",
    "check_transfer",
    "command_name",
    "decode_lun",
    "describe_cdb",
    "encode_lun",
    "field_pointer",
    "inquiry",
    "mode_sense6",
    "mode_sense10",
    "parse_block_device_characteristics",
    "parse_block_limits",
    "parse_device_identification",
    "parse_logical_block_provisioning",
    "parse_mode_sense6",
    "parse_mode_sense10",
    "parse_read_capacity10",
    "parse_read_capacity16",
    "parse_report_luns",
    "parse_sense",
    "parse_standard_inquiry",
    "parse_supported_vpd_pages",
    "parse_unit_serial_number",
    "read",
    "read10",
    "read16",
    "read_capacity10",
    "read_capacity16",
    "report_luns",
    "retryable",
    "synchronize_cache10",
    "synchronize_cache16",
    "test_unit_ready",
    "vpd_page_length",
    "write",
    "write10",
    "write16",
]


# --------------------------------------------------------------------------------------------
# Codes
# --------------------------------------------------------------------------------------------


class Opcode(enum.IntEnum):
    """Operation codes (SPC-5 Annex E) of the commands a disk user meets."""

    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    FORMAT_UNIT = 0x04
    READ_6 = 0x08
    WRITE_6 = 0x0A
    INQUIRY = 0x12
    MODE_SELECT_6 = 0x15
    RESERVE_6 = 0x16
    RELEASE_6 = 0x17
    MODE_SENSE_6 = 0x1A
    START_STOP_UNIT = 0x1B
    RECEIVE_DIAGNOSTIC_RESULTS = 0x1C
    SEND_DIAGNOSTIC = 0x1D
    PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    WRITE_AND_VERIFY_10 = 0x2E
    VERIFY_10 = 0x2F
    SYNCHRONIZE_CACHE_10 = 0x35
    WRITE_BUFFER = 0x3B
    READ_BUFFER = 0x3C
    WRITE_SAME_10 = 0x41
    UNMAP = 0x42
    LOG_SELECT = 0x4C
    LOG_SENSE = 0x4D
    MODE_SELECT_10 = 0x55
    RESERVE_10 = 0x56
    RELEASE_10 = 0x57
    MODE_SENSE_10 = 0x5A
    PERSISTENT_RESERVE_IN = 0x5E
    PERSISTENT_RESERVE_OUT = 0x5F
    VARIABLE_LENGTH = 0x7F
    EXTENDED_COPY = 0x83
    RECEIVE_COPY_RESULTS = 0x84
    ATA_PASS_THROUGH_16 = 0x85
    READ_16 = 0x88
    COMPARE_AND_WRITE = 0x89
    WRITE_16 = 0x8A
    WRITE_AND_VERIFY_16 = 0x8E
    VERIFY_16 = 0x8F
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0
    ATA_PASS_THROUGH_12 = 0xA1
    MAINTENANCE_IN = 0xA3
    MAINTENANCE_OUT = 0xA4
    READ_12 = 0xA8
    WRITE_12 = 0xAA
    WRITE_AND_VERIFY_12 = 0xAE
    VERIFY_12 = 0xAF


# Service actions of SERVICE ACTION IN(16) (SBC-4 §5.x).
_SAI_READ_CAPACITY_16 = 0x10
_SAI_GET_LBA_STATUS = 0x12

_OPCODE_NAMES: dict[int, str] = {
    Opcode.TEST_UNIT_READY: "TEST UNIT READY",
    Opcode.REQUEST_SENSE: "REQUEST SENSE",
    Opcode.FORMAT_UNIT: "FORMAT UNIT",
    Opcode.READ_6: "READ(6)",
    Opcode.WRITE_6: "WRITE(6)",
    Opcode.INQUIRY: "INQUIRY",
    Opcode.MODE_SELECT_6: "MODE SELECT(6)",
    Opcode.RESERVE_6: "RESERVE(6)",
    Opcode.RELEASE_6: "RELEASE(6)",
    Opcode.MODE_SENSE_6: "MODE SENSE(6)",
    Opcode.START_STOP_UNIT: "START STOP UNIT",
    Opcode.RECEIVE_DIAGNOSTIC_RESULTS: "RECEIVE DIAGNOSTIC RESULTS",
    Opcode.SEND_DIAGNOSTIC: "SEND DIAGNOSTIC",
    Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL: "PREVENT ALLOW MEDIUM REMOVAL",
    Opcode.READ_CAPACITY_10: "READ CAPACITY(10)",
    Opcode.READ_10: "READ(10)",
    Opcode.WRITE_10: "WRITE(10)",
    Opcode.WRITE_AND_VERIFY_10: "WRITE AND VERIFY(10)",
    Opcode.VERIFY_10: "VERIFY(10)",
    Opcode.SYNCHRONIZE_CACHE_10: "SYNCHRONIZE CACHE(10)",
    Opcode.WRITE_BUFFER: "WRITE BUFFER",
    Opcode.READ_BUFFER: "READ BUFFER",
    Opcode.WRITE_SAME_10: "WRITE SAME(10)",
    Opcode.UNMAP: "UNMAP",
    Opcode.LOG_SELECT: "LOG SELECT",
    Opcode.LOG_SENSE: "LOG SENSE",
    Opcode.MODE_SELECT_10: "MODE SELECT(10)",
    Opcode.RESERVE_10: "RESERVE(10)",
    Opcode.RELEASE_10: "RELEASE(10)",
    Opcode.MODE_SENSE_10: "MODE SENSE(10)",
    Opcode.PERSISTENT_RESERVE_IN: "PERSISTENT RESERVE IN",
    Opcode.PERSISTENT_RESERVE_OUT: "PERSISTENT RESERVE OUT",
    Opcode.VARIABLE_LENGTH: "VARIABLE LENGTH",
    Opcode.EXTENDED_COPY: "EXTENDED COPY",
    Opcode.RECEIVE_COPY_RESULTS: "RECEIVE COPY RESULTS",
    Opcode.ATA_PASS_THROUGH_16: "ATA PASS-THROUGH(16)",
    Opcode.READ_16: "READ(16)",
    Opcode.COMPARE_AND_WRITE: "COMPARE AND WRITE",
    Opcode.WRITE_16: "WRITE(16)",
    Opcode.WRITE_AND_VERIFY_16: "WRITE AND VERIFY(16)",
    Opcode.VERIFY_16: "VERIFY(16)",
    Opcode.SYNCHRONIZE_CACHE_16: "SYNCHRONIZE CACHE(16)",
    Opcode.WRITE_SAME_16: "WRITE SAME(16)",
    Opcode.SERVICE_ACTION_IN_16: "SERVICE ACTION IN(16)",
    Opcode.REPORT_LUNS: "REPORT LUNS",
    Opcode.ATA_PASS_THROUGH_12: "ATA PASS-THROUGH(12)",
    Opcode.MAINTENANCE_IN: "MAINTENANCE IN",
    Opcode.MAINTENANCE_OUT: "MAINTENANCE OUT",
    Opcode.READ_12: "READ(12)",
    Opcode.WRITE_12: "WRITE(12)",
    Opcode.WRITE_AND_VERIFY_12: "WRITE AND VERIFY(12)",
    Opcode.VERIFY_12: "VERIFY(12)",
}

# Where the LBA sits in CDBs that carry one: (offset, size in bytes).
_LBA_FIELD: dict[int, tuple[int, int]] = {
    Opcode.READ_10: (2, 4),
    Opcode.WRITE_10: (2, 4),
    Opcode.WRITE_AND_VERIFY_10: (2, 4),
    Opcode.VERIFY_10: (2, 4),
    Opcode.SYNCHRONIZE_CACHE_10: (2, 4),
    Opcode.WRITE_SAME_10: (2, 4),
    Opcode.READ_12: (2, 4),
    Opcode.WRITE_12: (2, 4),
    Opcode.WRITE_AND_VERIFY_12: (2, 4),
    Opcode.VERIFY_12: (2, 4),
    Opcode.READ_16: (2, 8),
    Opcode.WRITE_16: (2, 8),
    Opcode.WRITE_AND_VERIFY_16: (2, 8),
    Opcode.VERIFY_16: (2, 8),
    Opcode.SYNCHRONIZE_CACHE_16: (2, 8),
    Opcode.WRITE_SAME_16: (2, 8),
    Opcode.COMPARE_AND_WRITE: (2, 8),
}


class SenseKey(enum.IntEnum):
    """Sense keys (SPC-5 §4.4.8, table 49)."""

    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    BLANK_CHECK = 0x8
    VENDOR_SPECIFIC = 0x9
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    EQUAL = 0xC  # obsolete since SPC-3; kept so every 4-bit value decodes
    VOLUME_OVERFLOW = 0xD
    MISCOMPARE = 0xE
    COMPLETED = 0xF

    @property
    def words(self) -> str:
        """The name as sg3_utils and the kernel print it: ``MEDIUM ERROR``."""
        return self.name.replace("_", " ")


class PeripheralDeviceType(enum.IntEnum):
    """PERIPHERAL DEVICE TYPE of INQUIRY data (SPC-5 §6.7.2, table 150)."""

    DISK = 0x00
    TAPE = 0x01
    PRINTER = 0x02
    PROCESSOR = 0x03
    WRITE_ONCE = 0x04
    CD_DVD = 0x05
    SCANNER = 0x06
    OPTICAL_MEMORY = 0x07
    MEDIUM_CHANGER = 0x08
    COMMUNICATIONS = 0x09
    STORAGE_ARRAY_CONTROLLER = 0x0C
    ENCLOSURE_SERVICES = 0x0D
    SIMPLIFIED_DIRECT_ACCESS = 0x0E
    OPTICAL_CARD = 0x0F
    BRIDGE_CONTROLLER = 0x10
    OBJECT_STORAGE = 0x11
    AUTOMATION_DRIVE_INTERFACE = 0x12
    SECURITY_MANAGER = 0x13
    HOST_MANAGED_ZONED = 0x14
    WELL_KNOWN_LU = 0x1E
    UNKNOWN = 0x1F


class VpdPage(enum.IntEnum):
    """Vital product data page codes this module builds requests for and parses."""

    SUPPORTED_PAGES = 0x00
    UNIT_SERIAL_NUMBER = 0x80
    DEVICE_IDENTIFICATION = 0x83
    BLOCK_LIMITS = 0xB0
    BLOCK_DEVICE_CHARACTERISTICS = 0xB1
    LOGICAL_BLOCK_PROVISIONING = 0xB2


class DesignatorType(enum.IntEnum):
    """DESIGNATOR TYPE of a Device Identification VPD descriptor (SPC-5 table 597)."""

    VENDOR_SPECIFIC = 0x0
    T10_VENDOR_ID = 0x1
    EUI64 = 0x2
    NAA = 0x3
    RELATIVE_TARGET_PORT = 0x4
    TARGET_PORT_GROUP = 0x5
    LOGICAL_UNIT_GROUP = 0x6
    MD5_LOGICAL_UNIT = 0x7
    SCSI_NAME_STRING = 0x8
    PROTOCOL_SPECIFIC_PORT = 0x9
    UUID = 0xA


class CodeSet(enum.IntEnum):
    """CODE SET of a designation descriptor."""

    BINARY = 0x1
    ASCII = 0x2
    UTF8 = 0x3


class Association(enum.IntEnum):
    """What a designator names: the LU, the target port it was read through, or the target."""

    LOGICAL_UNIT = 0
    TARGET_PORT = 1
    TARGET_DEVICE = 2


class ProvisioningType(enum.IntEnum):
    """PROVISIONING TYPE of the Logical Block Provisioning VPD page (SBC-4 table 262)."""

    FULL = 0
    RESOURCE = 1
    THIN = 2


class PageControl(enum.IntEnum):
    """PC field of MODE SENSE: which values of the mode pages to return."""

    CURRENT = 0
    CHANGEABLE = 1
    DEFAULT = 2
    SAVED = 3


class ModePage(enum.IntEnum):
    """Mode page codes commonly read from disks (SBC-4 / SPC-5)."""

    READ_WRITE_ERROR_RECOVERY = 0x01
    DISCONNECT_RECONNECT = 0x02
    VERIFY_ERROR_RECOVERY = 0x07
    CACHING = 0x08
    CONTROL = 0x0A
    POWER_CONDITION = 0x1A
    INFORMATIONAL_EXCEPTIONS_CONTROL = 0x1C
    ALL = 0x3F


class AddressMethod(enum.IntEnum):
    """ADDRESS METHOD of the first level of a SAM-5 LUN (SAM-5 §4.7.4, table 11)."""

    PERIPHERAL = 0
    FLAT = 1
    LOGICAL_UNIT = 2
    EXTENDED = 3


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class ScsiDataError(RemoteProtocolError):
    """Data a SCSI command returned (INQUIRY, VPD, capacity, LUN list, sense) is malformed."""


class ScsiCommandError(CommandError):
    """A SCSI command reached the target and completed with a status other than GOOD.

    Carries the wire codes: ``status`` (a :class:`ScsiStatus` when known), and, for CHECK
    CONDITION with sense data, ``sense_key``, ``asc``, ``ascq`` and the parsed ``sense``.
    ``hint`` is a sentence saying what to check, when there is something useful to say.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        sense: Sense | None = None,
        cdb: bytes = b"",
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status: ScsiStatus | int = _status_enum(status)
        self.sense = sense
        self.sense_key: SenseKey | None = sense.sense_key if sense is not None else None
        self.asc: int | None = sense.asc if sense is not None else None
        self.ascq: int | None = sense.ascq if sense is not None else None
        self.cdb = bytes(cdb)
        self.hint = hint

    @classmethod
    def from_status(
        cls,
        cdb: bytes,
        status: int,
        sense: bytes = b"",
        *,
        where: str | None = None,
    ) -> ScsiCommandError:
        """Build the error for ``cdb`` that completed with ``status`` and ``sense`` data.

        ``where`` names the LUN for the message, e.g. ``"iqn.2003-01.org.x:t1 LUN 0"``.
        """
        what = describe_cdb(cdb)
        prefix = f"{where}: " if where else ""
        status_enum = _status_enum(status)
        if status_enum != ScsiStatus.CHECK_CONDITION:
            words = _status_words(status)
            hint = _STATUS_HINTS.get(status)
            message = f"{prefix}{what} failed: status {words} (0x{status:02X})"
            if hint:
                message += f"; {hint}"
            return cls(message, status=status, cdb=cdb, hint=hint)
        if not sense:
            message = f"{prefix}{what} failed: CHECK CONDITION without sense data"
            return cls(message, status=status, cdb=cdb)
        try:
            parsed = parse_sense(sense)
        except ScsiDataError as exc:
            message = f"{prefix}{what} failed: CHECK CONDITION with unreadable sense data ({exc})"
            return cls(message, status=status, cdb=cdb)
        message = f"{prefix}{what} failed: {parsed.description}"
        detail = _sense_detail(parsed)
        if detail:
            message += f" {detail}"
        hint = _hint_for(parsed)
        if hint:
            message += f"; {hint}"
        return cls(message, status=status, sense=parsed, cdb=cdb, hint=hint)


def check_result(cdb: bytes, result: CommandResult, *, where: str | None = None) -> None:
    """Raise :class:`ScsiCommandError` unless ``result`` is GOOD or CONDITION MET.

    Sense data with sense key RECOVERED ERROR or COMPLETED is not an error either (the command
    did what was asked); everything else is.
    """
    if result.status in (ScsiStatus.GOOD, ScsiStatus.CONDITION_MET):
        return
    if result.status == ScsiStatus.CHECK_CONDITION and result.sense:
        try:
            key = parse_sense(result.sense).sense_key
        except ScsiDataError:
            key = None
        if key in (SenseKey.RECOVERED_ERROR, SenseKey.COMPLETED):
            return
    raise ScsiCommandError.from_status(cdb, result.status, result.sense, where=where)


class Retry(enum.Enum):
    """How the Linux SCSI midlayer retries a command that ended in a given condition."""

    NOW = "at once"
    LATER = "after a delay"


# NOT READY, LOGICAL UNIT NOT READY (04/xx) qualifiers that mean "in progress, try again":
# scsi_io_completion_action() of Linux 6.x retries them after a delay (04/0A, an ALUA state
# transition, too).
_NOT_READY_IN_PROGRESS = frozenset({
    0x01, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x11, 0x14, 0x1A, 0x1B, 0x1D, 0x24, 0x25})
# MEDIUM ERROR ASCs that are final (unrecovered read error, address mark not found, recorded
# entity not found); other medium errors are retried.
_MEDIUM_ERROR_FINAL = frozenset({0x11, 0x13, 0x14})


def retryable(result: CommandResult) -> Retry | None:
    """Whether, and how, to retry a command that ended with ``result``: as Linux does.

    The midlayer's rules (drivers/scsi/scsi_error.c ``scsi_decide_disposition`` and
    ``scsi_check_sense``, scsi_lib.c ``scsi_io_completion_action``): BUSY and TASK SET FULL
    after a delay; TASK ABORTED at once; for CHECK CONDITION, deferred errors, UNIT ATTENTION
    (a reset, a new I_T nexus after a session reinstatement, changed parameters), ABORTED
    COMMAND (but not a protection information error, 10/xx, or a command duration limit,
    2E/01-03) and MEDIUM ERROR other than an unrecovered read at once; NOT READY "in progress"
    after a delay. Everything else (ILLEGAL REQUEST, DATA PROTECT, HARDWARE ERROR,
    RESERVATION CONFLICT ...) is final: None.
    """
    status = result.status
    if status in (ScsiStatus.BUSY, ScsiStatus.TASK_SET_FULL):
        return Retry.LATER
    if status == ScsiStatus.TASK_ABORTED:
        return Retry.NOW
    if status != ScsiStatus.CHECK_CONDITION or not result.sense:
        return None
    try:
        sense = parse_sense(result.sense)
    except ScsiDataError:
        return None
    if sense.deferred:
        return Retry.NOW
    key, asc, ascq = sense.sense_key, sense.asc, sense.ascq
    if key == SenseKey.UNIT_ATTENTION:
        return Retry.NOW
    if key == SenseKey.ABORTED_COMMAND:
        if asc == 0x10 or (asc == 0x2E and 0x01 <= ascq <= 0x03):
            return None
        return Retry.NOW
    if key == SenseKey.NOT_READY:
        return Retry.LATER if asc == 0x04 and ascq in _NOT_READY_IN_PROGRESS else None
    if key == SenseKey.MEDIUM_ERROR:
        return None if asc in _MEDIUM_ERROR_FINAL else Retry.NOW
    return None


def check_transfer(cdb: bytes, result: CommandResult, expected: int, *, data_in: bool = True,
                   minimum: int | None = None, where: str | None = None) -> int:
    """How many bytes ``cdb`` moved; raise :class:`TransferError` unless it moved them all.

    ``expected`` is the size of the command's buffer. A read must fill it exactly, with no
    residual either way (RFC 7143 §11.4.5: an underflow leaves bytes that the target never
    sent, an overflow means the command addressed more data than the buffer holds, and a
    residual that contradicts the Data-In received means the target's lengths cannot be
    trusted): a short read never passes for a whole one, whatever the status. With
    ``minimum`` (commands that return "up to" their allocation length, like INQUIRY) any
    length from ``minimum`` up is fine: the bytes received are the target's data. With
    ``data_in=False`` it is a write: any residual means the target took less (or the command
    addressed more) than was sent.
    """
    residual = result.residual
    prefix = f"{where}: " if where else ""
    what = describe_cdb(cdb)
    if not data_in:
        if not residual:
            return expected
        taken = expected - residual if residual > 0 else expected
        message = (f"{prefix}{what} took only {taken} of the {expected} bytes sent (underflow "
                   f"residual {residual}): the write is incomplete" if residual > 0 else
                   f"{prefix}{what} addresses {-residual} bytes more than the {expected} sent "
                   "(overflow residual): has the LUN's block size changed?")
        raise TransferError(message, expected=expected, transferred=taken, residual=residual)
    got = result.data_in_length
    if minimum is not None:
        if got >= minimum:
            return got
        message = (f"{prefix}{what} returned {got} bytes ({_residual_words(residual)}); at "
                   f"least {minimum} are needed")
    elif got == expected and not residual:
        return got
    elif got == expected:
        message = (f"{prefix}{what} returned all {expected} bytes but reported an "
                   + (f"underflow residual of {residual}, which contradicts that"
                      if residual > 0 else
                      f"overflow residual of {-residual}: the command addresses more data "
                      "than was returned (has the LUN's block size changed?)"))
    else:
        if residual > 0 and got + residual == expected:
            why = f"underflow residual {residual}"
        elif residual > 0:
            why = (f"yet an underflow residual of {residual}, which does not add up: the "
                   "target's lengths are wrong")
        elif residual < 0:
            why = f"and an overflow residual of {-residual}"
        else:
            why = "and no underflow residual: the target's lengths are wrong"
        message = (f"{prefix}{what} returned only {got} of {expected} bytes with status "
                   f"{_status_words(result.status)} ({why}); the read is incomplete")
    raise TransferError(message, expected=expected, transferred=got, residual=residual)


def _residual_words(residual: int) -> str:
    if residual > 0:
        return f"underflow residual {residual}"
    if residual < 0:
        return f"overflow residual {-residual}"
    return "no residual"


def _status_enum(status: int) -> ScsiStatus | int:
    try:
        return ScsiStatus(status)
    except ValueError:
        return status


def _status_words(status: int) -> str:
    value = _status_enum(status)
    if isinstance(value, ScsiStatus):
        return value.name.replace("_", " ")
    return "unknown"


_STATUS_HINTS: dict[int, str] = {
    ScsiStatus.BUSY: "the target is busy; retry later",
    ScsiStatus.RESERVATION_CONFLICT: (
        "another initiator holds a reservation on this LUN (see PERSISTENT RESERVE IN)"
    ),
    ScsiStatus.TASK_SET_FULL: "the target's queue for this LUN is full; lower QueueDepth",
    ScsiStatus.TASK_ABORTED: "the command was aborted by another initiator or a reset",
}


# --------------------------------------------------------------------------------------------
# CDB builders
# --------------------------------------------------------------------------------------------

_CDB6 = struct.Struct(">BBBBBB")
_CDB_INQUIRY = struct.Struct(">BBBHB")
_CDB_READ_WRITE_10 = struct.Struct(">BBIBHB")
_CDB_READ_WRITE_16 = struct.Struct(">BBQIBB")
_CDB_READ_CAPACITY_16 = struct.Struct(">BBQIBB")
_CDB_REPORT_LUNS = struct.Struct(">BBBxxxIBB")
_CDB_MODE_SENSE_10 = struct.Struct(">BBBBxxxHB")

_U16 = 0xFFFF
_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF
_FUA = 0x08
_IMMED = 0x02


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} {value} is outside {low}..{high}")


def test_unit_ready() -> bytes:
    """TEST UNIT READY (SPC-5 §6.47)."""
    return bytes(6)


def inquiry(page: int | None = None, *, allocation_length: int = 255) -> bytes:
    """INQUIRY (SPC-5 §6.7): standard data, or the VPD ``page`` (sets EVPD).

    The default allocation length of 255 is what every device accepts (SPC-2 devices read a
    one-byte field); ask for more when :func:`vpd_page_length` says the page is longer.
    """
    _check_range("allocation length", allocation_length, 0, _U16)
    if page is None:
        return _CDB_INQUIRY.pack(Opcode.INQUIRY, 0, 0, allocation_length, 0)
    _check_range("VPD page code", page, 0, 0xFF)
    return _CDB_INQUIRY.pack(Opcode.INQUIRY, 0x01, page, allocation_length, 0)


def read_capacity10() -> bytes:
    """READ CAPACITY(10) (SBC-4 §5.20)."""
    return bytes([Opcode.READ_CAPACITY_10]) + bytes(9)


def read_capacity16(*, allocation_length: int = 32) -> bytes:
    """READ CAPACITY(16) (SBC-4 §5.21): SERVICE ACTION IN(16), service action 0x10."""
    _check_range("allocation length", allocation_length, 0, _U32)
    return _CDB_READ_CAPACITY_16.pack(
        Opcode.SERVICE_ACTION_IN_16, _SAI_READ_CAPACITY_16, 0, allocation_length, 0, 0
    )


def _rw10(opcode: int, lba: int, blocks: int, fua: bool) -> bytes:
    _check_range("LBA", lba, 0, _U32)
    _check_range("transfer length", blocks, 0, _U16)
    return _CDB_READ_WRITE_10.pack(opcode, _FUA if fua else 0, lba, 0, blocks, 0)


def _rw16(opcode: int, lba: int, blocks: int, fua: bool) -> bytes:
    _check_range("LBA", lba, 0, _U64)
    _check_range("transfer length", blocks, 0, _U32)
    return _CDB_READ_WRITE_16.pack(opcode, _FUA if fua else 0, lba, blocks, 0, 0)


def read10(lba: int, blocks: int, *, fua: bool = False) -> bytes:
    """READ(10): 32-bit LBA, up to 65535 blocks (SBC-4 §5.16)."""
    return _rw10(Opcode.READ_10, lba, blocks, fua)


def read16(lba: int, blocks: int, *, fua: bool = False) -> bytes:
    """READ(16): 64-bit LBA, up to 2**32-1 blocks (SBC-4 §5.18)."""
    return _rw16(Opcode.READ_16, lba, blocks, fua)


def write10(lba: int, blocks: int, *, fua: bool = False) -> bytes:
    """WRITE(10): 32-bit LBA, up to 65535 blocks (SBC-4 §5.40)."""
    return _rw10(Opcode.WRITE_10, lba, blocks, fua)


def write16(lba: int, blocks: int, *, fua: bool = False) -> bytes:
    """WRITE(16): 64-bit LBA, up to 2**32-1 blocks (SBC-4 §5.42)."""
    return _rw16(Opcode.WRITE_16, lba, blocks, fua)


def _needs_16(lba: int, blocks: int) -> bool:
    # Like Linux sd: the 10-byte form when it can express the request, the 16-byte form when
    # the range reaches past LBA 2**32-1 or the length exceeds 16 bits.
    return lba + max(blocks, 1) - 1 > _U32 or blocks > _U16


# read() and write() build a CDB per command (hbactl perf, block devices): the common case,
# a non-empty range that READ(10)/WRITE(10) can express, is packed right here, without the
# calls through _needs_16(), read10() and _rw10()'s range checks, which it passes by
# construction. Anything else takes that general path and its errors.
_PACK_RW10 = _CDB_READ_WRITE_10.pack
_READ_10 = int(Opcode.READ_10)
_WRITE_10 = int(Opcode.WRITE_10)
_LBA_END_10 = _U32 + 1


def read(lba: int, blocks: int, *, fua: bool = False) -> bytes:
    """READ(10) when the range fits its 32-bit LBA and 16-bit length, READ(16) otherwise."""
    if 0 < blocks <= _U16 and lba >= 0 and lba + blocks <= _LBA_END_10:
        return _PACK_RW10(_READ_10, _FUA if fua else 0, lba, 0, blocks, 0)
    if _needs_16(lba, blocks):
        return read16(lba, blocks, fua=fua)
    return read10(lba, blocks, fua=fua)


def write(lba: int, blocks: int, *, fua: bool = False) -> bytes:
    """WRITE(10) when the range fits its 32-bit LBA and 16-bit length, WRITE(16) otherwise."""
    if 0 < blocks <= _U16 and lba >= 0 and lba + blocks <= _LBA_END_10:
        return _PACK_RW10(_WRITE_10, _FUA if fua else 0, lba, 0, blocks, 0)
    if _needs_16(lba, blocks):
        return write16(lba, blocks, fua=fua)
    return write10(lba, blocks, fua=fua)


def synchronize_cache10(lba: int = 0, blocks: int = 0, *, immed: bool = False) -> bytes:
    """SYNCHRONIZE CACHE(10) (SBC-4 §5.24); ``blocks == 0`` means from ``lba`` to the end."""
    _check_range("LBA", lba, 0, _U32)
    _check_range("number of blocks", blocks, 0, _U16)
    flags = _IMMED if immed else 0
    return _CDB_READ_WRITE_10.pack(Opcode.SYNCHRONIZE_CACHE_10, flags, lba, 0, blocks, 0)


def synchronize_cache16(lba: int = 0, blocks: int = 0, *, immed: bool = False) -> bytes:
    """SYNCHRONIZE CACHE(16) (SBC-4 §5.25); ``blocks == 0`` means from ``lba`` to the end."""
    _check_range("LBA", lba, 0, _U64)
    _check_range("number of blocks", blocks, 0, _U32)
    flags = _IMMED if immed else 0
    return _CDB_READ_WRITE_16.pack(Opcode.SYNCHRONIZE_CACHE_16, flags, lba, blocks, 0, 0)


def report_luns(*, select_report: int = 0, allocation_length: int = 4096) -> bytes:
    """REPORT LUNS (SPC-5 §6.33). The allocation length must be at least 16 bytes."""
    _check_range("select report", select_report, 0, 0xFF)
    _check_range("allocation length", allocation_length, 16, _U32)
    return _CDB_REPORT_LUNS.pack(Opcode.REPORT_LUNS, 0, select_report, allocation_length, 0, 0)


def _mode_page_byte(page: int, pc: PageControl) -> int:
    _check_range("mode page code", page, 0, 0x3F)
    return (int(pc) << 6) | page


def mode_sense6(
    page: int = ModePage.ALL,
    subpage: int = 0,
    *,
    pc: PageControl = PageControl.CURRENT,
    dbd: bool = True,
    allocation_length: int = 255,
) -> bytes:
    """MODE SENSE(6) (SPC-5 §6.13). ``dbd`` omits the block descriptors."""
    _check_range("subpage code", subpage, 0, 0xFF)
    _check_range("allocation length", allocation_length, 0, 0xFF)
    byte1 = 0x08 if dbd else 0
    return _CDB6.pack(
        Opcode.MODE_SENSE_6, byte1, _mode_page_byte(page, pc), subpage, allocation_length, 0
    )


def mode_sense10(
    page: int = ModePage.ALL,
    subpage: int = 0,
    *,
    pc: PageControl = PageControl.CURRENT,
    dbd: bool = True,
    llbaa: bool = False,
    allocation_length: int = 4096,
) -> bytes:
    """MODE SENSE(10) (SPC-5 §6.14). ``llbaa`` allows 16-byte block descriptors."""
    _check_range("subpage code", subpage, 0, 0xFF)
    _check_range("allocation length", allocation_length, 0, _U16)
    byte1 = (0x08 if dbd else 0) | (0x10 if llbaa else 0)
    return _CDB_MODE_SENSE_10.pack(
        Opcode.MODE_SENSE_10, byte1, _mode_page_byte(page, pc), subpage, allocation_length, 0
    )


def command_name(cdb: bytes) -> str:
    """The command's name as T10 spells it, ``READ(16)``, or ``opcode 0xNN`` when unknown."""
    if not cdb:
        return "empty CDB"
    opcode = cdb[0]
    if opcode == Opcode.SERVICE_ACTION_IN_16 and len(cdb) > 1:
        action = cdb[1] & 0x1F
        if action == _SAI_READ_CAPACITY_16:
            return "READ CAPACITY(16)"
        if action == _SAI_GET_LBA_STATUS:
            return "GET LBA STATUS"
    name = _OPCODE_NAMES.get(opcode)
    return name if name is not None else f"opcode 0x{opcode:02X}"


def describe_cdb(cdb: bytes) -> str:
    """The command and, when it has one, its LBA: ``READ(16) at LBA 2048``."""
    name = command_name(cdb)
    if not cdb:
        return name
    opcode = cdb[0]
    if opcode in (Opcode.READ_6, Opcode.WRITE_6) and len(cdb) >= 4:
        lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
        return f"{name} at LBA {lba}"
    field = _LBA_FIELD.get(opcode)
    if field is not None and len(cdb) >= field[0] + field[1]:
        offset, size = field
        lba = int.from_bytes(cdb[offset : offset + size], "big")
        return f"{name} at LBA {lba}"
    if opcode == Opcode.INQUIRY and len(cdb) >= 3 and cdb[1] & 0x01:
        return f"{name} VPD page 0x{cdb[2]:02X}"
    return name


# --------------------------------------------------------------------------------------------
# Parsers: INQUIRY and VPD pages
# --------------------------------------------------------------------------------------------

_VPD_HEADER = struct.Struct(">BBH")
_STANDARD_INQUIRY = struct.Struct(">BBBBBBBB8s16s4s")


def _ascii(raw: bytes) -> str:
    return raw.decode("ascii", errors="replace").rstrip(" \0")


@dataclass(frozen=True, slots=True)
class StandardInquiry:
    """Standard INQUIRY data (SPC-5 §6.7.2)."""

    peripheral_qualifier: int
    peripheral_device_type: int
    removable: bool
    version: int
    normaca: bool
    hisup: bool
    response_data_format: int
    sccs: bool
    tpgs: int
    three_pc: bool
    protect: bool
    encserv: bool
    multip: bool
    cmdque: bool
    vendor: str
    product: str
    revision: str

    @property
    def connected(self) -> bool:
        """A logical unit is attached at this LUN (qualifier 000b)."""
        return self.peripheral_qualifier == 0

    @property
    def device_type_name(self) -> str:
        """``disk``, ``tape``, ... or ``type 0xNN`` for reserved values."""
        try:
            return PeripheralDeviceType(self.peripheral_device_type).name.lower()
        except ValueError:
            return f"type 0x{self.peripheral_device_type:02X}"


def parse_standard_inquiry(data: bytes | bytearray | memoryview) -> StandardInquiry:
    """Parse standard INQUIRY data; at least the 36 bytes every device returns are needed."""
    raw = bytes(data)
    if len(raw) < _STANDARD_INQUIRY.size:
        raise ScsiDataError(
            f"standard INQUIRY data is {len(raw)} bytes; at least 36 are needed "
            "(repeat INQUIRY with an allocation length of 36 or more)"
        )
    (b0, b1, b2, b3, _addl, b5, b6, b7, vendor, product, revision) = _STANDARD_INQUIRY.unpack_from(
        raw
    )
    return StandardInquiry(
        peripheral_qualifier=b0 >> 5,
        peripheral_device_type=b0 & 0x1F,
        removable=bool(b1 & 0x80),
        version=b2,
        normaca=bool(b3 & 0x20),
        hisup=bool(b3 & 0x10),
        response_data_format=b3 & 0x0F,
        sccs=bool(b5 & 0x80),
        tpgs=(b5 >> 4) & 0x03,
        three_pc=bool(b5 & 0x08),
        protect=bool(b5 & 0x01),
        encserv=bool(b6 & 0x40),
        multip=bool(b6 & 0x10),
        cmdque=bool(b7 & 0x02),
        vendor=_ascii(vendor),
        product=_ascii(product),
        revision=_ascii(revision),
    )


def vpd_page_length(data: bytes | bytearray | memoryview) -> int:
    """The full size of the VPD page whose first bytes are ``data`` (header included).

    Use it to repeat INQUIRY with a large enough allocation length.
    """
    if len(data) < _VPD_HEADER.size:
        raise ScsiDataError(f"VPD page data is {len(data)} bytes; the header alone is 4")
    _pdt, _page, length = _VPD_HEADER.unpack_from(data)
    return _VPD_HEADER.size + int(length)


def _vpd_payload(data: bytes | bytearray | memoryview, page: int) -> bytes:
    raw = bytes(data)
    total = vpd_page_length(raw)
    if raw[1] != page:
        raise ScsiDataError(f"expected VPD page 0x{page:02X}, the target returned 0x{raw[1]:02X}")
    if len(raw) < total:
        raise ScsiDataError(
            f"VPD page 0x{page:02X} is {total} bytes but only {len(raw)} were returned; "
            f"repeat INQUIRY with an allocation length of at least {total}"
        )
    return raw[_VPD_HEADER.size : total]


def parse_supported_vpd_pages(data: bytes | bytearray | memoryview) -> tuple[int, ...]:
    """Supported VPD Pages (page 0x00): the page codes the device implements."""
    return tuple(_vpd_payload(data, VpdPage.SUPPORTED_PAGES))


def parse_unit_serial_number(data: bytes | bytearray | memoryview) -> str:
    """Unit Serial Number (page 0x80), without the padding spaces devices add."""
    return _vpd_payload(data, VpdPage.UNIT_SERIAL_NUMBER).decode("ascii", "replace").strip(" \0")


_NAA_LENGTHS = {0x2: 8, 0x3: 8, 0x5: 8, 0x6: 16}
# udev's scsi_id picks the LU designator in this order for ID_WWN (NAA 6, 5, 2, 3).
_NAA_PREFERENCE = (0x6, 0x5, 0x2, 0x3)


@dataclass(frozen=True, slots=True)
class Designator:
    """One designation descriptor of the Device Identification VPD page (SPC-5 §7.7.6)."""

    designator_type: int
    code_set: int
    association: int
    protocol_identifier: int | None
    value: bytes

    @property
    def naa_type(self) -> int | None:
        """The NAA field (2, 3, 5 or 6) of an NAA designator, else None."""
        if self.designator_type != DesignatorType.NAA or not self.value:
            return None
        return self.value[0] >> 4

    @property
    def ieee_company_id(self) -> int | None:
        """The IEEE company ID (OUI) inside an NAA 2, 5 or 6 designator."""
        naa = self.naa_type
        if naa in (0x5, 0x6):
            return (int.from_bytes(self.value[0:4], "big") >> 4) & 0xFFFFFF
        if naa == 0x2:
            return int.from_bytes(self.value[2:5], "big")
        return None

    @property
    def text(self) -> str:
        """The identifier as Linux's sysfs ``wwid`` attribute spells it.

        NAA ``naa.6001405...``, EUI-64 ``eui.0123...``, T10 vendor ID ``t10.VENDOR...``,
        a SCSI name string as itself, UUID ``uuid.xxxxxxxx-...``, anything else as hex.
        """
        kind = self.designator_type
        if kind == DesignatorType.NAA:
            return "naa." + self.value.hex()
        if kind == DesignatorType.EUI64:
            return "eui." + self.value.hex()
        if kind == DesignatorType.T10_VENDOR_ID:
            return "t10." + self.value.decode("ascii", "replace").rstrip(" \0")
        if kind == DesignatorType.SCSI_NAME_STRING:
            return self.value.decode("utf-8", "replace").rstrip("\0")
        if kind == DesignatorType.UUID and len(self.value) == 18:
            u = self.value[2:].hex()
            return f"uuid.{u[0:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:32]}"
        if kind in (DesignatorType.RELATIVE_TARGET_PORT, DesignatorType.TARGET_PORT_GROUP):
            return str(int.from_bytes(self.value[-2:], "big"))
        if kind == DesignatorType.LOGICAL_UNIT_GROUP:
            return str(int.from_bytes(self.value[-2:], "big"))
        if self.code_set in (CodeSet.ASCII, CodeSet.UTF8):
            return self.value.decode("utf-8", "replace").rstrip(" \0")
        return self.value.hex()

    @property
    def wwn(self) -> str | None:
        """``0x`` + all hex digits of an NAA designator: udev's ``ID_WWN_WITH_EXTENSION``,
        the name of the by-id link."""
        if self.naa_type is None:
            return None
        return "0x" + self.value.hex()

    @property
    def id_wwn(self) -> str | None:
        """udev's ``ID_WWN``: ``0x`` + the first 16 hex digits (an NAA 6 designator's
        vendor-specific extension cut off)."""
        if self.naa_type is None:
            return None
        return "0x" + self.value[:8].hex()

    @property
    def by_id_link(self) -> str | None:
        """The ``/dev/disk/by-id/wwn-0x...`` link udev creates for an NAA LU designator."""
        wwn = self.wwn
        if wwn is None or self.association != Association.LOGICAL_UNIT:
            return None
        return f"/dev/disk/by-id/wwn-{wwn}"


@dataclass(frozen=True, slots=True)
class DeviceIdentification:
    """The Device Identification VPD page (0x83): every designator, in the device's order."""

    designators: tuple[Designator, ...]

    def for_association(self, association: Association) -> tuple[Designator, ...]:
        """The designators naming the LU, the target port or the target device."""
        return tuple(d for d in self.designators if d.association == association)

    @property
    def naa(self) -> Designator | None:
        """The LU's preferred NAA designator, chosen as udev does (NAA 6, 5, 2, then 3)."""
        lu = [d for d in self.for_association(Association.LOGICAL_UNIT) if d.naa_type]
        for wanted in _NAA_PREFERENCE:
            for designator in lu:
                if designator.naa_type == wanted:
                    return designator
        return None

    @property
    def scsi_name(self) -> str | None:
        """The LU's SCSI name string designator, if any."""
        for d in self.for_association(Association.LOGICAL_UNIT):
            if d.designator_type == DesignatorType.SCSI_NAME_STRING:
                return d.text
        return None


def parse_device_identification(data: bytes | bytearray | memoryview) -> DeviceIdentification:
    """Device Identification (page 0x83); NAA designators have their length checked."""
    payload = _vpd_payload(data, VpdPage.DEVICE_IDENTIFICATION)
    designators: list[Designator] = []
    offset = 0
    while offset < len(payload):
        if offset + 4 > len(payload):
            raise ScsiDataError(
                f"VPD page 0x83 ends inside a designation descriptor header at byte {offset + 4}"
            )
        b0, b1, _reserved, length = payload[offset : offset + 4]
        end = offset + 4 + length
        if end > len(payload):
            raise ScsiDataError(
                f"VPD page 0x83: designation descriptor at byte {offset + 4} claims {length} "
                f"bytes but the page ends after {len(payload) - offset - 4}"
            )
        value = payload[offset + 4 : end]
        kind = b1 & 0x0F
        association = (b1 >> 4) & 0x03
        piv = bool(b1 & 0x80)
        protocol = b0 >> 4 if piv and association in (1, 2) else None
        if kind == DesignatorType.NAA:
            if not value:
                raise ScsiDataError("VPD page 0x83: empty NAA designator")
            naa = value[0] >> 4
            expected = _NAA_LENGTHS.get(naa)
            if expected is not None and len(value) != expected:
                raise ScsiDataError(
                    f"VPD page 0x83: NAA type {naa} designator is {len(value)} bytes, "
                    f"expected {expected}"
                )
        designators.append(
            Designator(
                designator_type=kind,
                code_set=b0 & 0x0F,
                association=association,
                protocol_identifier=protocol,
                value=value,
            )
        )
        offset = end
    return DeviceIdentification(tuple(designators))


_BLOCK_LIMITS = struct.Struct(">4xBBH7IQ5I")


@dataclass(frozen=True, slots=True)
class BlockLimits:
    """Block Limits VPD page (0xB0, SBC-4 §6.6.4). Lengths are in logical blocks; 0 = none."""

    wsnz: bool
    max_compare_and_write_length: int
    optimal_transfer_length_granularity: int
    max_transfer_length: int
    optimal_transfer_length: int
    max_prefetch_length: int
    max_unmap_lba_count: int
    max_unmap_block_descriptor_count: int
    optimal_unmap_granularity: int
    unmap_granularity_alignment: int | None
    max_write_same_length: int
    max_atomic_transfer_length: int
    atomic_alignment: int
    atomic_transfer_length_granularity: int
    max_atomic_transfer_length_with_boundary: int
    max_atomic_boundary_size: int


def parse_block_limits(data: bytes | bytearray | memoryview) -> BlockLimits:
    """Block Limits (page 0xB0). Devices implementing an older SBC return a shorter page;
    the fields it lacks read as 0 ("not reported")."""
    payload = _vpd_payload(data, VpdPage.BLOCK_LIMITS)
    full = bytes(4) + payload[: _BLOCK_LIMITS.size - 4]
    full += bytes(_BLOCK_LIMITS.size - len(full))
    (
        b4,
        mcawl,
        otlg,
        mtl,
        otl,
        mpl,
        mulc,
        mubdc,
        oug,
        uga,
        mwsl,
        matl,
        aa,
        atlg,
        matlwab,
        mabs,
    ) = _BLOCK_LIMITS.unpack(full)
    return BlockLimits(
        wsnz=bool(b4 & 0x01),
        max_compare_and_write_length=mcawl,
        optimal_transfer_length_granularity=otlg,
        max_transfer_length=mtl,
        optimal_transfer_length=otl,
        max_prefetch_length=mpl,
        max_unmap_lba_count=mulc,
        max_unmap_block_descriptor_count=mubdc,
        optimal_unmap_granularity=oug,
        unmap_granularity_alignment=(uga & 0x7FFF_FFFF) if uga & 0x8000_0000 else None,
        max_write_same_length=mwsl,
        max_atomic_transfer_length=matl,
        atomic_alignment=aa,
        atomic_transfer_length_granularity=atlg,
        max_atomic_transfer_length_with_boundary=matlwab,
        max_atomic_boundary_size=mabs,
    )


@dataclass(frozen=True, slots=True)
class BlockDeviceCharacteristics:
    """Block Device Characteristics VPD page (0xB1, SBC-4 §6.6.2)."""

    medium_rotation_rate: int
    product_type: int
    nominal_form_factor: int
    zoned: int
    fuab: bool
    vbuls: bool

    @property
    def non_rotating(self) -> bool:
        """Rotation rate 0001h: a solid-state medium."""
        return self.medium_rotation_rate == 1


def parse_block_device_characteristics(
    data: bytes | bytearray | memoryview,
) -> BlockDeviceCharacteristics:
    """Block Device Characteristics (page 0xB1)."""
    payload = _vpd_payload(data, VpdPage.BLOCK_DEVICE_CHARACTERISTICS)
    payload += bytes(max(0, 5 - len(payload)))
    return BlockDeviceCharacteristics(
        medium_rotation_rate=int.from_bytes(payload[0:2], "big"),
        product_type=payload[2],
        nominal_form_factor=payload[3] & 0x0F,
        zoned=(payload[4] >> 4) & 0x03,
        fuab=bool(payload[4] & 0x02),
        vbuls=bool(payload[4] & 0x01),
    )


@dataclass(frozen=True, slots=True)
class LogicalBlockProvisioning:
    """Logical Block Provisioning VPD page (0xB2, SBC-4 §6.6.6)."""

    threshold_exponent: int
    lbpu: bool
    lbpws: bool
    lbpws10: bool
    lbprz: int
    anc_sup: bool
    dp: bool
    minimum_percentage: int
    provisioning_type: int
    threshold_percentage: int

    @property
    def thin(self) -> bool:
        """The LU is thin provisioned (capacity allocated on write)."""
        return self.provisioning_type == ProvisioningType.THIN


def parse_logical_block_provisioning(
    data: bytes | bytearray | memoryview,
) -> LogicalBlockProvisioning:
    """Logical Block Provisioning (page 0xB2)."""
    payload = _vpd_payload(data, VpdPage.LOGICAL_BLOCK_PROVISIONING)
    payload += bytes(max(0, 4 - len(payload)))
    b5, b6 = payload[1], payload[2]
    return LogicalBlockProvisioning(
        threshold_exponent=payload[0],
        lbpu=bool(b5 & 0x80),
        lbpws=bool(b5 & 0x40),
        lbpws10=bool(b5 & 0x20),
        lbprz=(b5 >> 2) & 0x07,
        anc_sup=bool(b5 & 0x02),
        dp=bool(b5 & 0x01),
        minimum_percentage=b6 >> 3,
        provisioning_type=b6 & 0x07,
        threshold_percentage=payload[3],
    )


# --------------------------------------------------------------------------------------------
# Parsers: READ CAPACITY
# --------------------------------------------------------------------------------------------

_READ_CAPACITY_10 = struct.Struct(">II")
_READ_CAPACITY_16 = struct.Struct(">QIBBH16x")


@dataclass(frozen=True, slots=True)
class ReadCapacity10:
    """READ CAPACITY(10) data (SBC-4 §5.20.2)."""

    last_lba: int
    block_size: int

    @property
    def blocks(self) -> int:
        """Number of logical blocks: the last LBA plus one."""
        return self.last_lba + 1

    @property
    def size_bytes(self) -> int:
        """Capacity in bytes."""
        return self.blocks * self.block_size

    @property
    def needs_read_capacity16(self) -> bool:
        """The LU is too large for this command (last LBA reported as FFFFFFFFh)."""
        return self.last_lba == _U32


def parse_read_capacity10(data: bytes | bytearray | memoryview) -> ReadCapacity10:
    """Parse the 8 bytes of READ CAPACITY(10) data."""
    if len(data) < _READ_CAPACITY_10.size:
        raise ScsiDataError(f"READ CAPACITY(10) data is {len(data)} bytes, expected 8")
    last_lba, block_size = _READ_CAPACITY_10.unpack_from(bytes(data))
    return ReadCapacity10(last_lba=last_lba, block_size=block_size)


@dataclass(frozen=True, slots=True)
class ReadCapacity16:
    """READ CAPACITY(16) data (SBC-4 §5.21.2)."""

    last_lba: int
    block_size: int
    p_type: int
    prot_en: bool
    p_i_exponent: int
    logical_blocks_per_physical_exponent: int
    lbpme: bool
    lbprz: bool
    lowest_aligned_lba: int

    @property
    def blocks(self) -> int:
        """Number of logical blocks: the last LBA plus one."""
        return self.last_lba + 1

    @property
    def size_bytes(self) -> int:
        """Capacity in bytes."""
        return self.blocks * self.block_size

    @property
    def physical_block_size(self) -> int:
        """Physical block size: logical block size << LOGICAL BLOCKS PER PHYSICAL exponent."""
        return self.block_size << self.logical_blocks_per_physical_exponent


def parse_read_capacity16(data: bytes | bytearray | memoryview) -> ReadCapacity16:
    """Parse READ CAPACITY(16) data; 12 bytes suffice, later fields read as 0 if absent."""
    raw = bytes(data)
    if len(raw) < 12:
        raise ScsiDataError(f"READ CAPACITY(16) data is {len(raw)} bytes; at least 12 are needed")
    raw = raw[: _READ_CAPACITY_16.size] + bytes(max(0, _READ_CAPACITY_16.size - len(raw)))
    last_lba, block_size, b12, b13, b14_15 = _READ_CAPACITY_16.unpack(raw)
    return ReadCapacity16(
        last_lba=last_lba,
        block_size=block_size,
        p_type=(b12 >> 1) & 0x07,
        prot_en=bool(b12 & 0x01),
        p_i_exponent=b13 >> 4,
        logical_blocks_per_physical_exponent=b13 & 0x0F,
        lbpme=bool(b14_15 & 0x8000),
        lbprz=bool(b14_15 & 0x4000),
        lowest_aligned_lba=b14_15 & 0x3FFF,
    )


# --------------------------------------------------------------------------------------------
# LUNs and REPORT LUNS
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lun:
    """One 8-byte LUN decoded per SAM-5 §4.7 (first addressing level).

    ``value`` is the LUN within its address method: 0..255 for peripheral device addressing
    (``bus`` holds the bus identifier), 0..16383 for flat space, 0..31 for logical unit
    addressing (with ``target`` and ``bus``), the W-LUN code for well-known LUNs.
    ``number`` is the integer Linux, LIO and libiscsi use for the same LUN
    (``scsilun_to_int``), which is what ``lsscsi`` shows and what a URL's ``/<lun>`` means.
    """

    raw: bytes
    method: AddressMethod
    value: int
    bus: int = 0
    target: int = 0
    well_known: bool = False
    hierarchical: bool = False

    @property
    def number(self) -> int:
        """The Linux/LIO/libiscsi integer for this LUN (each 2-byte level packed)."""
        r = self.raw
        return (
            (r[0] << 8 | r[1])
            | (r[2] << 8 | r[3]) << 16
            | (r[4] << 8 | r[5]) << 32
            | (r[6] << 8 | r[7]) << 48
        )

    def __str__(self) -> str:
        if self.well_known:
            return f"W-LUN 0x{self.value:02X}"
        if self.method == AddressMethod.PERIPHERAL and self.bus == 0 and not self.hierarchical:
            return str(self.value)
        return f"{self.number} ({self.method.name.lower()} addressing, {self.raw.hex()})"


def decode_lun(raw: bytes | bytearray | memoryview) -> Lun:
    """Decode an 8-byte SAM LUN (as carried in REPORT LUNS data and iSCSI PDU headers)."""
    lun = bytes(raw)
    if len(lun) != 8:
        raise ScsiDataError(f"a LUN is 8 bytes, got {len(lun)}")
    method = AddressMethod(lun[0] >> 6)
    hierarchical = any(lun[2:])
    if method == AddressMethod.PERIPHERAL:
        return Lun(lun, method, value=lun[1], bus=lun[0] & 0x3F, hierarchical=hierarchical)
    if method == AddressMethod.FLAT:
        return Lun(lun, method, value=((lun[0] & 0x3F) << 8) | lun[1], hierarchical=hierarchical)
    if method == AddressMethod.LOGICAL_UNIT:
        return Lun(
            lun,
            method,
            value=lun[1] & 0x1F,
            target=lun[0] & 0x3F,
            bus=lun[1] >> 5,
            hierarchical=hierarchical,
        )
    # Extended addressing: length (bits 5-4) and extended address method (bits 3-0).
    # Method 1 with length 0 is a well-known LUN (W-LUN), SAM-5 §4.7.8.
    well_known = (lun[0] & 0x3F) == 0x01
    return Lun(lun, method, value=lun[1], well_known=well_known, hierarchical=hierarchical)


def encode_lun(number: int) -> bytes:
    """The 8-byte LUN for a Linux/LIO/libiscsi LUN integer (``int_to_scsilun``).

    0..255 become peripheral device addressing; a flat-space LUN ``k`` is ``0x4000 | k``;
    larger integers fill the following levels, 16 bits each.
    """
    _check_range("LUN", number, 0, _U64)
    out = bytearray(8)
    for level in range(4):
        chunk = (number >> (16 * level)) & 0xFFFF
        out[2 * level] = chunk >> 8
        out[2 * level + 1] = chunk & 0xFF
    return bytes(out)


@dataclass(frozen=True, slots=True)
class ReportLuns:
    """REPORT LUNS parameter data (SPC-5 §6.33.2)."""

    luns: tuple[Lun, ...]
    list_length: int

    @property
    def complete(self) -> bool:
        """Every LUN the target listed fitted in the allocation length."""
        return len(self.luns) * 8 >= self.list_length

    @property
    def required_allocation_length(self) -> int:
        """The allocation length that returns the whole list."""
        return self.list_length + 8


def parse_report_luns(data: bytes | bytearray | memoryview) -> ReportLuns:
    """Parse REPORT LUNS data; a list cut short by the allocation length is not an error
    (check :attr:`ReportLuns.complete`)."""
    raw = bytes(data)
    if len(raw) < 8:
        raise ScsiDataError(f"REPORT LUNS data is {len(raw)} bytes; the header alone is 8")
    list_length = int.from_bytes(raw[0:4], "big")
    if list_length % 8:
        raise ScsiDataError(f"REPORT LUNS list length {list_length} is not a multiple of 8")
    available = min(list_length, (len(raw) - 8) // 8 * 8)
    luns = tuple(decode_lun(raw[8 + i : 16 + i]) for i in range(0, available, 8))
    return ReportLuns(luns=luns, list_length=list_length)


# --------------------------------------------------------------------------------------------
# MODE SENSE
# --------------------------------------------------------------------------------------------

_MODE6_HEADER = struct.Struct(">BBBB")
_MODE10_HEADER = struct.Struct(">HBBBxH")


@dataclass(frozen=True, slots=True)
class ModeSense:
    """MODE SENSE(6)/(10) parameter data: header fields and the pages, keyed by
    ``(page code, subpage code)``, each page's bytes including its own header."""

    medium_type: int
    write_protect: bool
    dpofua: bool
    block_descriptors: bytes
    pages: dict[tuple[int, int], bytes]


def _mode_pages(raw: bytes, start: int, end: int) -> Iterator[tuple[tuple[int, int], bytes]]:
    offset = start
    while offset + 2 <= end:
        b0 = raw[offset]
        page = b0 & 0x3F
        if b0 & 0x40:  # SPF: sub_page format, 4-byte header
            if offset + 4 > end:
                raise ScsiDataError(f"mode page 0x{page:02X} header is cut off")
            subpage = raw[offset + 1]
            length = 4 + int.from_bytes(raw[offset + 2 : offset + 4], "big")
        else:
            subpage = 0
            length = 2 + raw[offset + 1]
        if offset + length > end:
            raise ScsiDataError(
                f"mode page 0x{page:02X} claims {length} bytes but only {end - offset} remain"
            )
        yield (page, subpage), raw[offset : offset + length]
        offset += length


def parse_mode_sense6(data: bytes | bytearray | memoryview) -> ModeSense:
    """Parse MODE SENSE(6) parameter data."""
    raw = bytes(data)
    if len(raw) < _MODE6_HEADER.size:
        raise ScsiDataError(f"MODE SENSE(6) data is {len(raw)} bytes; the header alone is 4")
    length, medium, specific, bd_length = _MODE6_HEADER.unpack_from(raw)
    end = min(len(raw), length + 1)
    bd_end = _MODE6_HEADER.size + bd_length
    if bd_end > end:
        raise ScsiDataError("MODE SENSE(6) block descriptors run past the returned data")
    return ModeSense(
        medium_type=medium,
        write_protect=bool(specific & 0x80),
        dpofua=bool(specific & 0x10),
        block_descriptors=raw[_MODE6_HEADER.size : bd_end],
        pages=dict(_mode_pages(raw, bd_end, end)),
    )


def parse_mode_sense10(data: bytes | bytearray | memoryview) -> ModeSense:
    """Parse MODE SENSE(10) parameter data."""
    raw = bytes(data)
    if len(raw) < _MODE10_HEADER.size:
        raise ScsiDataError(f"MODE SENSE(10) data is {len(raw)} bytes; the header alone is 8")
    length, medium, specific, _longlba, bd_length = _MODE10_HEADER.unpack_from(raw)
    end = min(len(raw), length + 2)
    bd_end = _MODE10_HEADER.size + bd_length
    if bd_end > end:
        raise ScsiDataError("MODE SENSE(10) block descriptors run past the returned data")
    return ModeSense(
        medium_type=medium,
        write_protect=bool(specific & 0x80),
        dpofua=bool(specific & 0x10),
        block_descriptors=raw[_MODE10_HEADER.size : bd_end],
        pages=dict(_mode_pages(raw, bd_end, end)),
    )


# --------------------------------------------------------------------------------------------
# Sense data
# --------------------------------------------------------------------------------------------

_FIXED_SENSE = struct.Struct(">BBBIBIBBB3s")
_FIXED_SENSE_LENGTH = 18


@dataclass(frozen=True, slots=True)
class SenseDescriptor:
    """One descriptor of descriptor-format sense data: its type and its bytes after the
    2-byte descriptor header."""

    descriptor_type: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Sense:
    """Decoded sense data, fixed (70h/71h) or descriptor (72h/73h) format (SPC-5 §4.4).

    ``information`` and ``command_specific`` are None when the device marked them invalid or
    did not send them; ``sense_key_specific`` holds the 3 SKS bytes when SKSV is set.
    """

    response_code: int
    sense_key: SenseKey
    asc: int
    ascq: int
    information: int | None = None
    command_specific: int | None = None
    sense_key_specific: bytes | None = None
    fru: int = 0
    filemark: bool = False
    eom: bool = False
    ili: bool = False
    descriptors: tuple[SenseDescriptor, ...] = ()

    @property
    def descriptor_format(self) -> bool:
        """Descriptor format (72h/73h) rather than fixed format (70h/71h)."""
        return self.response_code in (0x72, 0x73)

    @property
    def deferred(self) -> bool:
        """The error belongs to an earlier command (71h/73h)."""
        return self.response_code in (0x71, 0x73)

    @property
    def asc_text(self) -> str:
        """The ASC/ASCQ in words."""
        return asc_text(self.asc, self.ascq)

    @property
    def codes(self) -> str:
        """``03/11/00``: sense key, ASC, ASCQ in hex, the way sg3_utils prints them."""
        return f"{int(self.sense_key):02X}/{self.asc:02X}/{self.ascq:02X}"

    @property
    def description(self) -> str:
        """``MEDIUM ERROR, unrecovered read error (03/11/00)``."""
        deferred = "deferred " if self.deferred else ""
        return f"{deferred}{self.sense_key.words}, {self.asc_text} ({self.codes})"

    @property
    def field_pointer(self) -> tuple[bool, int, int | None] | None:
        """For ILLEGAL REQUEST: ``(in_cdb, byte, bit)`` of the offending field, if reported."""
        sks = self.sense_key_specific
        if sks is None or self.sense_key != SenseKey.ILLEGAL_REQUEST:
            return None
        in_cdb = bool(sks[0] & 0x40)
        bit = sks[0] & 0x07 if sks[0] & 0x08 else None
        return in_cdb, int.from_bytes(sks[1:3], "big"), bit

    @property
    def progress(self) -> float | None:
        """For NOT READY / NO SENSE: the progress indication as a fraction 0..1, if any."""
        sks = self.sense_key_specific
        if sks is None or self.sense_key not in (SenseKey.NOT_READY, SenseKey.NO_SENSE):
            return None
        return int.from_bytes(sks[1:3], "big") / 65536


def parse_sense(data: bytes | bytearray | memoryview) -> Sense:
    """Decode fixed- or descriptor-format sense data.

    Honors the ADDITIONAL SENSE LENGTH: bytes past it are ignored, and fields the device did
    not send (short fixed sense) read as 0.
    """
    raw = bytes(data)
    if not raw:
        raise ScsiDataError("sense data is empty")
    code = raw[0] & 0x7F
    if code in (0x70, 0x71):
        return _parse_fixed_sense(raw, code)
    if code in (0x72, 0x73):
        return _parse_descriptor_sense(raw, code)
    raise ScsiDataError(
        f"sense data response code 0x{code:02X} is neither fixed (70h/71h) nor "
        "descriptor (72h/73h) format"
    )


def _parse_fixed_sense(raw: bytes, code: int) -> Sense:
    if len(raw) < 3:
        raise ScsiDataError(f"fixed-format sense data is {len(raw)} bytes; the sense key is byte 2")
    if len(raw) >= 8:
        raw = raw[: 8 + raw[7]]
    padded = raw[:_FIXED_SENSE_LENGTH] + bytes(max(0, _FIXED_SENSE_LENGTH - len(raw)))
    (b0, _obsolete, b2, info, _addl, cmd_info, asc, ascq, fru, sks) = _FIXED_SENSE.unpack(padded)
    return Sense(
        response_code=code,
        sense_key=SenseKey(b2 & 0x0F),
        asc=asc,
        ascq=ascq,
        information=info if b0 & 0x80 and len(raw) >= 7 else None,
        command_specific=cmd_info if len(raw) >= 12 else None,
        sense_key_specific=sks if sks[0] & 0x80 and len(raw) >= 18 else None,
        fru=fru,
        filemark=bool(b2 & 0x80),
        eom=bool(b2 & 0x40),
        ili=bool(b2 & 0x20),
    )


def _parse_descriptor_sense(raw: bytes, code: int) -> Sense:
    if len(raw) < 4:
        raise ScsiDataError(f"descriptor-format sense data is {len(raw)} bytes; the ASCQ is byte 3")
    key, asc, ascq = raw[1] & 0x0F, raw[2], raw[3]
    end = min(len(raw), 8 + raw[7]) if len(raw) >= 8 else len(raw)
    descriptors: list[SenseDescriptor] = []
    information: int | None = None
    command_specific: int | None = None
    sks: bytes | None = None
    fru = 0
    filemark = eom = ili = False
    offset = 8
    while offset + 2 <= end:
        kind, length = raw[offset], raw[offset + 1]
        body = raw[offset + 2 : offset + 2 + length]
        if len(body) < length:
            raise ScsiDataError(
                f"sense descriptor type 0x{kind:02X} at byte {offset} claims {length} bytes "
                f"but only {len(body)} remain"
            )
        descriptors.append(SenseDescriptor(kind, body))
        if kind == 0x00 and length >= 10 and body[0] & 0x80:
            information = int.from_bytes(body[2:10], "big")
        elif kind == 0x01 and length >= 10:
            command_specific = int.from_bytes(body[2:10], "big")
        elif kind == 0x02 and length >= 6 and body[2] & 0x80:
            sks = body[2:5]
        elif kind == 0x03 and length >= 2:
            fru = body[1]
        elif kind == 0x04 and length >= 2:
            filemark = bool(body[1] & 0x80)
            eom = bool(body[1] & 0x40)
            ili = bool(body[1] & 0x20)
        elif kind == 0x05 and length >= 2:
            ili = bool(body[1] & 0x20)
        offset += 2 + length
    return Sense(
        response_code=code,
        sense_key=SenseKey(key),
        asc=asc,
        ascq=ascq,
        information=information,
        command_specific=command_specific,
        sense_key_specific=sks,
        fru=fru,
        filemark=filemark,
        eom=eom,
        ili=ili,
        descriptors=tuple(descriptors),
    )


def field_pointer(byte: int, *, bit: int | None = None, in_cdb: bool = True) -> bytes:
    """The 3 sense-key-specific bytes pointing at a bad field (SPC-5 §4.4.2.4.2), for
    ILLEGAL REQUEST sense built with :func:`build_fixed_sense`."""
    _check_range("field pointer", byte, 0, _U16)
    first = 0x80 | (0x40 if in_cdb else 0)
    if bit is not None:
        _check_range("bit pointer", bit, 0, 7)
        first |= 0x08 | bit
    return bytes([first]) + byte.to_bytes(2, "big")


def build_fixed_sense(
    sense_key: SenseKey | int,
    asc: int,
    ascq: int,
    *,
    information: int | None = None,
    command_specific: int = 0,
    sense_key_specific: bytes | None = None,
    deferred: bool = False,
    ili: bool = False,
    fru: int = 0,
) -> bytes:
    """Fixed-format sense data (SPC-5 §4.4.3), 18 bytes, for a synthesised CHECK CONDITION.

    ``information`` sets VALID; it must fit the 4-byte field. ``sense_key_specific`` must be
    3 bytes with SKSV (bit 7 of the first byte) set, e.g. from :func:`field_pointer`.
    """
    _check_range("sense key", int(sense_key), 0, 0x0F)
    _check_range("ASC", asc, 0, 0xFF)
    _check_range("ASCQ", ascq, 0, 0xFF)
    _check_range("command-specific information", command_specific, 0, _U32)
    _check_range("FRU code", fru, 0, 0xFF)
    b0 = 0x71 if deferred else 0x70
    if information is not None:
        _check_range("information", information, 0, _U32)
        b0 |= 0x80
    if sense_key_specific is None:
        sks = bytes(3)
    elif len(sense_key_specific) != 3 or not sense_key_specific[0] & 0x80:
        raise ValueError("sense-key-specific data must be 3 bytes with SKSV (0x80) set")
    else:
        sks = bytes(sense_key_specific)
    return _FIXED_SENSE.pack(
        b0,
        0,
        (0x20 if ili else 0) | int(sense_key),
        information or 0,
        _FIXED_SENSE_LENGTH - 8,
        command_specific,
        asc,
        ascq,
        fru,
        sks,
    )


def _sense_detail(sense: Sense) -> str:
    """Extra facts for an error message: the failing LBA, the offending CDB field."""
    if sense.information is not None and sense.sense_key in (
        SenseKey.MEDIUM_ERROR,
        SenseKey.RECOVERED_ERROR,
        SenseKey.HARDWARE_ERROR,
        SenseKey.MISCOMPARE,
    ):
        if sense.sense_key == SenseKey.MISCOMPARE:
            return f"at offset {sense.information}"
        return f"at LBA {sense.information}"
    pointer = sense.field_pointer
    if pointer is not None:
        in_cdb, byte, bit = pointer
        where = "CDB" if in_cdb else "parameter list"
        bit_text = f" bit {bit}" if bit is not None else ""
        return f"at byte {byte}{bit_text} of the {where}"
    progress = sense.progress
    if progress is not None:
        return f"({progress:.0%} done)"
    return ""


# --------------------------------------------------------------------------------------------
# ASC/ASCQ in words (SPC-5 Annex D, table D.1) and hints
# --------------------------------------------------------------------------------------------


def asc_text(asc: int, ascq: int) -> str:
    """The ASC/ASCQ pair in words, or ``ASC 0xXX ASCQ 0xYY`` when not in the table."""
    text = _ASC_TABLE.get((asc, ascq))
    if text is not None:
        return text
    if asc == 0x40 and ascq >= 0x80:
        return f"diagnostic failure on component 0x{ascq:02X}"
    if asc == 0x4D:
        return f"tagged overlapped commands (task tag 0x{ascq:02X})"
    if asc == 0x70:
        return f"decompression exception short algorithm id of 0x{ascq:02X}"
    vendor = " (vendor specific)" if asc >= 0x80 or ascq >= 0x80 else ""
    return f"ASC 0x{asc:02X} ASCQ 0x{ascq:02X}{vendor}"


_ASC_HINTS_EXACT: dict[tuple[int, int], str] = {
    (0x04, 0x0A): "the path is in an ALUA state transition; retry or use another path",
    (0x04, 0x0B): "this target port is in ALUA standby; use another path",
    (0x04, 0x0C): "this target port is ALUA unavailable; use another path",
    (0x20, 0x00): "the target does not implement this command",
    (0x21, 0x00): "the LBA lies past the end of the LUN; check the capacity (READ CAPACITY(16))",
    (0x24, 0x00): "the target rejected a field of the command",
    (0x25, 0x00): (
        "the LUN does not exist on the target; check the LUN number (REPORT LUNS lists them)"
    ),
    (0x27, 0x07): "the thin-provisioned pool on the target is out of space",
    (0x2A, 0x09): "the LUN was resized on the target; read its capacity again",
    (0x3F, 0x0E): "the target's LUN list changed; rescan the LUNs",
    (0x44, 0x00): "the target failed internally; check the target's logs",
    (0x3A, 0x00): "there is no medium in the device",
}

_ASC_HINTS_BY_ASC: dict[int, str] = {
    0x04: "the LUN is not ready; check its backing store on the target",
    0x27: "the LUN is write-protected on the target",
    0x29: "the target or the LUN was reset; the command can be retried",
    0x2A: "the target changed a parameter of the LUN; the command can be retried",
    0x55: "the target ran out of resources; retry later",
}


def _hint_for(sense: Sense) -> str | None:
    hint = _ASC_HINTS_EXACT.get((sense.asc, sense.ascq))
    if hint is None:
        hint = _ASC_HINTS_BY_ASC.get(sense.asc)
    return hint


_ASC_TABLE: dict[tuple[int, int], str] = {
    (0x00, 0x00): "no additional sense information",
    (0x00, 0x01): "filemark detected",
    (0x00, 0x02): "end-of-partition/medium detected",
    (0x00, 0x03): "setmark detected",
    (0x00, 0x04): "beginning-of-partition/medium detected",
    (0x00, 0x05): "end-of-data detected",
    (0x00, 0x06): "I/O process terminated",
    (0x00, 0x11): "audio play operation in progress",
    (0x00, 0x16): "operation in progress",
    (0x00, 0x17): "cleaning requested",
    (0x00, 0x1D): "ATA pass through information available",
    (0x00, 0x1E): "conflicting SA creation request",
    (0x01, 0x00): "no index/sector signal",
    (0x02, 0x00): "no seek complete",
    (0x03, 0x00): "peripheral device write fault",
    (0x04, 0x00): "logical unit not ready, cause not reportable",
    (0x04, 0x01): "logical unit is in process of becoming ready",
    (0x04, 0x02): "logical unit not ready, initializing command required",
    (0x04, 0x03): "logical unit not ready, manual intervention required",
    (0x04, 0x04): "logical unit not ready, format in progress",
    (0x04, 0x05): "logical unit not ready, rebuild in progress",
    (0x04, 0x06): "logical unit not ready, recalculation in progress",
    (0x04, 0x07): "logical unit not ready, operation in progress",
    (0x04, 0x08): "logical unit not ready, long write in progress",
    (0x04, 0x09): "logical unit not ready, self-test in progress",
    (0x04, 0x0A): "logical unit not accessible, asymmetric access state transition",
    (0x04, 0x0B): "logical unit not accessible, target port in standby state",
    (0x04, 0x0C): "logical unit not accessible, target port in unavailable state",
    (0x04, 0x0D): "logical unit not ready, structure check required",
    (0x04, 0x0E): "logical unit not ready, security session in progress",
    (0x04, 0x10): "logical unit not ready, auxiliary memory not accessible",
    (0x04, 0x11): "logical unit not ready, notify (enable spinup) required",
    (0x04, 0x12): "logical unit not ready, offline",
    (0x04, 0x13): "logical unit not ready, SA creation in progress",
    (0x04, 0x14): "logical unit not ready, space allocation in progress",
    (0x04, 0x15): "logical unit not ready, robotics disabled",
    (0x04, 0x16): "logical unit not ready, configuration required",
    (0x04, 0x17): "logical unit not ready, calibration required",
    (0x04, 0x18): "logical unit not ready, a door is open",
    (0x04, 0x19): "logical unit not ready, operating in sequential mode",
    (0x04, 0x1A): "logical unit not ready, START STOP UNIT command in progress",
    (0x04, 0x1B): "logical unit not ready, sanitize in progress",
    (0x04, 0x1C): "logical unit not ready, additional power use not yet granted",
    (0x04, 0x1D): "logical unit not ready, configuration in progress",
    (0x04, 0x1E): "logical unit not ready, microcode activation required",
    (0x04, 0x1F): "logical unit not ready, microcode download required",
    (0x04, 0x20): "logical unit not ready, logical unit reset required",
    (0x04, 0x21): "logical unit not ready, hard reset required",
    (0x04, 0x22): "logical unit not ready, power cycle required",
    (0x04, 0x23): "logical unit not ready, affiliation required",
    (0x04, 0x24): "depopulation in progress",
    (0x05, 0x00): "logical unit does not respond to selection",
    (0x06, 0x00): "no reference position found",
    (0x07, 0x00): "multiple peripheral devices selected",
    (0x08, 0x00): "logical unit communication failure",
    (0x08, 0x01): "logical unit communication time-out",
    (0x08, 0x02): "logical unit communication parity error",
    (0x08, 0x03): "logical unit communication CRC error (Ultra-DMA/32)",
    (0x08, 0x04): "unreachable copy target",
    (0x09, 0x00): "track following error",
    (0x09, 0x01): "tracking servo failure",
    (0x09, 0x02): "focus servo failure",
    (0x09, 0x03): "spindle servo failure",
    (0x09, 0x04): "head select fault",
    (0x0A, 0x00): "error log overflow",
    (0x0B, 0x00): "warning",
    (0x0B, 0x01): "warning - specified temperature exceeded",
    (0x0B, 0x02): "warning - enclosure degraded",
    (0x0B, 0x03): "warning - background self-test failed",
    (0x0B, 0x04): "warning - background pre-scan detected medium error",
    (0x0B, 0x05): "warning - background medium scan detected medium error",
    (0x0B, 0x06): "warning - non-volatile cache now volatile",
    (0x0B, 0x07): "warning - degraded power to non-volatile cache",
    (0x0B, 0x08): "warning - power loss expected",
    (0x0B, 0x09): "warning - device statistics notification active",
    (0x0C, 0x00): "write error",
    (0x0C, 0x01): "write error - recovered with auto reallocation",
    (0x0C, 0x02): "write error - auto reallocation failed",
    (0x0C, 0x03): "write error - recommend reassignment",
    (0x0C, 0x04): "compression check miscompare error",
    (0x0C, 0x05): "data expansion occurred during compression",
    (0x0C, 0x06): "block not compressible",
    (0x0C, 0x07): "write error - recovery needed",
    (0x0C, 0x08): "write error - recovery failed",
    (0x0C, 0x09): "write error - loss of streaming",
    (0x0C, 0x0A): "write error - padding blocks added",
    (0x0C, 0x0B): "auxiliary memory write error",
    (0x0C, 0x0C): "write error - unexpected unsolicited data",
    (0x0C, 0x0D): "write error - not enough unsolicited data",
    (0x0C, 0x0E): "multiple write errors",
    (0x0C, 0x0F): "defects in error window",
    (0x0C, 0x10): "incomplete multiple atomic write operations",
    (0x0C, 0x11): "write error - recovery scan needed",
    (0x0C, 0x12): "write error - insufficient zone resources",
    (0x0D, 0x00): "error detected by third party temporary initiator",
    (0x0D, 0x01): "third party device failure",
    (0x0D, 0x02): "copy target device not reachable",
    (0x0D, 0x03): "incorrect copy target device type",
    (0x0D, 0x04): "copy target device data underrun",
    (0x0D, 0x05): "copy target device data overrun",
    (0x0E, 0x00): "invalid information unit",
    (0x0E, 0x01): "information unit too short",
    (0x0E, 0x02): "information unit too long",
    (0x0E, 0x03): "invalid field in command information unit",
    (0x10, 0x00): "id CRC or ECC error",
    (0x10, 0x01): "logical block guard check failed",
    (0x10, 0x02): "logical block application tag check failed",
    (0x10, 0x03): "logical block reference tag check failed",
    (0x10, 0x04): "logical block protection error on recover buffered data",
    (0x10, 0x05): "logical block protection method error",
    (0x11, 0x00): "unrecovered read error",
    (0x11, 0x01): "read retries exhausted",
    (0x11, 0x02): "error too long to correct",
    (0x11, 0x03): "multiple read errors",
    (0x11, 0x04): "unrecovered read error - auto reallocate failed",
    (0x11, 0x05): "L-EC uncorrectable error",
    (0x11, 0x06): "CIRC unrecovered error",
    (0x11, 0x07): "data re-synchronization error",
    (0x11, 0x08): "incomplete block read",
    (0x11, 0x09): "no gap found",
    (0x11, 0x0A): "miscorrected error",
    (0x11, 0x0B): "unrecovered read error - recommend reassignment",
    (0x11, 0x0C): "unrecovered read error - recommend rewrite the data",
    (0x11, 0x0D): "de-compression CRC error",
    (0x11, 0x0E): "cannot decompress using declared algorithm",
    (0x11, 0x0F): "error reading UPC/EAN number",
    (0x11, 0x10): "error reading ISRC number",
    (0x11, 0x11): "read error - loss of streaming",
    (0x11, 0x12): "auxiliary memory read error",
    (0x11, 0x13): "read error - failed retransmission request",
    (0x11, 0x14): "read error - LBA marked bad by application client",
    (0x11, 0x15): "write after sanitize required",
    (0x12, 0x00): "address mark not found for id field",
    (0x13, 0x00): "address mark not found for data field",
    (0x14, 0x00): "recorded entity not found",
    (0x14, 0x01): "record not found",
    (0x14, 0x02): "filemark or setmark not found",
    (0x14, 0x03): "end-of-data not found",
    (0x14, 0x04): "block sequence error",
    (0x14, 0x05): "record not found - recommend reassignment",
    (0x14, 0x06): "record not found - data auto-reallocated",
    (0x14, 0x07): "locate operation failure",
    (0x15, 0x00): "random positioning error",
    (0x15, 0x01): "mechanical positioning error",
    (0x15, 0x02): "positioning error detected by read of medium",
    (0x16, 0x00): "data synchronization mark error",
    (0x16, 0x01): "data sync error - data rewritten",
    (0x16, 0x02): "data sync error - recommend rewrite",
    (0x16, 0x03): "data sync error - data auto-reallocated",
    (0x16, 0x04): "data sync error - recommend reassignment",
    (0x17, 0x00): "recovered data with no error correction applied",
    (0x17, 0x01): "recovered data with retries",
    (0x17, 0x02): "recovered data with positive head offset",
    (0x17, 0x03): "recovered data with negative head offset",
    (0x17, 0x04): "recovered data with retries and/or CIRC applied",
    (0x17, 0x05): "recovered data using previous sector id",
    (0x17, 0x06): "recovered data without ECC - data auto-reallocated",
    (0x17, 0x07): "recovered data without ECC - recommend reassignment",
    (0x17, 0x08): "recovered data without ECC - recommend rewrite",
    (0x17, 0x09): "recovered data without ECC - data rewritten",
    (0x18, 0x00): "recovered data with error correction applied",
    (0x18, 0x01): "recovered data with error correction and retries applied",
    (0x18, 0x02): "recovered data - data auto-reallocated",
    (0x18, 0x03): "recovered data with CIRC",
    (0x18, 0x04): "recovered data with L-EC",
    (0x18, 0x05): "recovered data - recommend reassignment",
    (0x18, 0x06): "recovered data - recommend rewrite",
    (0x18, 0x07): "recovered data with ECC - data rewritten",
    (0x18, 0x08): "recovered data with linking",
    (0x19, 0x00): "defect list error",
    (0x19, 0x01): "defect list not available",
    (0x19, 0x02): "defect list error in primary list",
    (0x19, 0x03): "defect list error in grown list",
    (0x1A, 0x00): "parameter list length error",
    (0x1B, 0x00): "synchronous data transfer error",
    (0x1C, 0x00): "defect list not found",
    (0x1C, 0x01): "primary defect list not found",
    (0x1C, 0x02): "grown defect list not found",
    (0x1D, 0x00): "miscompare during verify operation",
    (0x1D, 0x01): "miscompare verify of unmapped LBA",
    (0x1E, 0x00): "recovered id with ECC correction",
    (0x1F, 0x00): "partial defect list transfer",
    (0x20, 0x00): "invalid command operation code",
    (0x20, 0x01): "access denied - initiator pending-enrolled",
    (0x20, 0x02): "access denied - no access rights",
    (0x20, 0x03): "access denied - invalid mgmt id key",
    (0x20, 0x04): "illegal command while in write capable state",
    (0x20, 0x06): "illegal command while in explicit address mode",
    (0x20, 0x07): "illegal command while in implicit address mode",
    (0x20, 0x08): "access denied - enrollment conflict",
    (0x20, 0x09): "access denied - invalid LU identifier",
    (0x20, 0x0A): "access denied - invalid proxy token",
    (0x20, 0x0B): "access denied - ACL LUN conflict",
    (0x20, 0x0C): "illegal command when not in append-only mode",
    (0x20, 0x0D): "not an administrative logical unit",
    (0x20, 0x0E): "not a subsidiary logical unit",
    (0x20, 0x0F): "not a conglomerate logical unit",
    (0x21, 0x00): "logical block address out of range",
    (0x21, 0x01): "invalid element address",
    (0x21, 0x02): "invalid address for write",
    (0x21, 0x03): "invalid write crossing layer jump",
    (0x21, 0x04): "unaligned write command",
    (0x21, 0x05): "write boundary violation",
    (0x21, 0x06): "attempt to read invalid data",
    (0x21, 0x07): "read boundary violation",
    (0x21, 0x08): "misaligned write command",
    (0x22, 0x00): "illegal function",
    (0x23, 0x00): "invalid token operation, cause not reportable",
    (0x23, 0x01): "invalid token operation, unsupported token type",
    (0x23, 0x02): "invalid token operation, remote token usage not supported",
    (0x23, 0x03): "invalid token operation, remote ROD token creation not supported",
    (0x23, 0x04): "invalid token operation, token unknown",
    (0x23, 0x05): "invalid token operation, token corrupt",
    (0x23, 0x06): "invalid token operation, token revoked",
    (0x23, 0x07): "invalid token operation, token expired",
    (0x23, 0x08): "invalid token operation, token cancelled",
    (0x23, 0x09): "invalid token operation, token deleted",
    (0x23, 0x0A): "invalid token operation, invalid token length",
    (0x24, 0x00): "invalid field in CDB",
    (0x24, 0x01): "CDB decryption error",
    (0x24, 0x04): "security audit value frozen",
    (0x24, 0x05): "security working key frozen",
    (0x24, 0x06): "nonce not unique",
    (0x24, 0x07): "nonce timestamp out of range",
    (0x24, 0x08): "invalid XCDB",
    (0x24, 0x09): "invalid fast format",
    (0x25, 0x00): "logical unit not supported",
    (0x26, 0x00): "invalid field in parameter list",
    (0x26, 0x01): "parameter not supported",
    (0x26, 0x02): "parameter value invalid",
    (0x26, 0x03): "threshold parameters not supported",
    (0x26, 0x04): "invalid release of persistent reservation",
    (0x26, 0x05): "data decryption error",
    (0x26, 0x06): "too many target descriptors",
    (0x26, 0x07): "unsupported target descriptor type code",
    (0x26, 0x08): "too many segment descriptors",
    (0x26, 0x09): "unsupported segment descriptor type code",
    (0x26, 0x0A): "unexpected inexact segment",
    (0x26, 0x0B): "inline data length exceeded",
    (0x26, 0x0C): "invalid operation for copy source or destination",
    (0x26, 0x0D): "copy segment granularity violation",
    (0x26, 0x0E): "invalid parameter while port is enabled",
    (0x26, 0x0F): "invalid data-out buffer integrity check value",
    (0x26, 0x10): "data decryption key fail limit reached",
    (0x26, 0x11): "incomplete key-associated data set",
    (0x26, 0x12): "vendor specific key reference not found",
    (0x26, 0x13): "application tag mode page is invalid",
    (0x26, 0x14): "tape stream mirroring prevented",
    (0x26, 0x15): "copy source or copy destination not authorized",
    (0x27, 0x00): "write protected",
    (0x27, 0x01): "hardware write protected",
    (0x27, 0x02): "logical unit software write protected",
    (0x27, 0x03): "associated write protect",
    (0x27, 0x04): "persistent write protect",
    (0x27, 0x05): "permanent write protect",
    (0x27, 0x06): "conditional write protect",
    (0x27, 0x07): "space allocation failed write protect",
    (0x27, 0x08): "zone is read only",
    (0x28, 0x00): "not ready to ready change, medium may have changed",
    (0x28, 0x01): "import or export element accessed",
    (0x28, 0x02): "format-layer may have changed",
    (0x28, 0x03): "import/export element accessed, medium changed",
    (0x29, 0x00): "power on, reset, or bus device reset occurred",
    (0x29, 0x01): "power on occurred",
    (0x29, 0x02): "SCSI bus reset occurred",
    (0x29, 0x03): "bus device reset function occurred",
    (0x29, 0x04): "device internal reset",
    (0x29, 0x05): "transceiver mode changed to single-ended",
    (0x29, 0x06): "transceiver mode changed to LVD",
    (0x29, 0x07): "I_T nexus loss occurred",
    (0x2A, 0x00): "parameters changed",
    (0x2A, 0x01): "mode parameters changed",
    (0x2A, 0x02): "log parameters changed",
    (0x2A, 0x03): "reservations preempted",
    (0x2A, 0x04): "reservations released",
    (0x2A, 0x05): "registrations preempted",
    (0x2A, 0x06): "asymmetric access state changed",
    (0x2A, 0x07): "implicit asymmetric access state transition failed",
    (0x2A, 0x08): "priority changed",
    (0x2A, 0x09): "capacity data has changed",
    (0x2A, 0x0A): "error history I_T nexus cleared",
    (0x2A, 0x0B): "error history snapshot released",
    (0x2A, 0x0C): "error recovery attributes have changed",
    (0x2A, 0x0D): "data encryption capabilities changed",
    (0x2A, 0x10): "timestamp changed",
    (0x2A, 0x11): "data encryption parameters changed by another I_T nexus",
    (0x2A, 0x12): "data encryption parameters changed by vendor specific event",
    (0x2A, 0x13): "data encryption key instance counter has changed",
    (0x2A, 0x14): "SA creation capabilities data has changed",
    (0x2A, 0x15): "medium removal prevention preempted",
    (0x2A, 0x16): "zone reset write pointer recommended",
    (0x2B, 0x00): "copy cannot execute since host cannot disconnect",
    (0x2C, 0x00): "command sequence error",
    (0x2C, 0x01): "too many windows specified",
    (0x2C, 0x02): "invalid combination of windows specified",
    (0x2C, 0x03): "current program area is not empty",
    (0x2C, 0x04): "current program area is empty",
    (0x2C, 0x05): "illegal power condition request",
    (0x2C, 0x06): "persistent prevent conflict",
    (0x2C, 0x07): "previous busy status",
    (0x2C, 0x08): "previous task set full status",
    (0x2C, 0x09): "previous reservation conflict status",
    (0x2C, 0x0A): "partition or collection contains user objects",
    (0x2C, 0x0B): "not reserved",
    (0x2C, 0x0C): "ORWRITE generation does not match",
    (0x2C, 0x0D): "reset write pointer not allowed",
    (0x2C, 0x0E): "zone is offline",
    (0x2C, 0x0F): "stream not open",
    (0x2C, 0x10): "unwritten data in zone",
    (0x2C, 0x11): "descriptor format sense data required",
    (0x2D, 0x00): "overwrite error on update in place",
    (0x2E, 0x00): "insufficient time for operation",
    (0x2E, 0x01): "command timeout before processing",
    (0x2E, 0x02): "command timeout during processing",
    (0x2E, 0x03): "command timeout during processing due to error recovery",
    (0x2F, 0x00): "commands cleared by another initiator",
    (0x2F, 0x01): "commands cleared by power loss notification",
    (0x2F, 0x02): "commands cleared by device server",
    (0x2F, 0x03): "some commands cleared by queuing layer event",
    (0x30, 0x00): "incompatible medium installed",
    (0x30, 0x01): "cannot read medium - unknown format",
    (0x30, 0x02): "cannot read medium - incompatible format",
    (0x30, 0x03): "cleaning cartridge installed",
    (0x30, 0x04): "cannot write medium - unknown format",
    (0x30, 0x05): "cannot write medium - incompatible format",
    (0x30, 0x06): "cannot format medium - incompatible medium",
    (0x30, 0x07): "cleaning failure",
    (0x30, 0x08): "cannot write - application code mismatch",
    (0x30, 0x09): "current session not fixated for append",
    (0x30, 0x0A): "cleaning request rejected",
    (0x30, 0x0C): "WORM medium - overwrite attempted",
    (0x30, 0x0D): "WORM medium - integrity check",
    (0x30, 0x10): "medium not formatted",
    (0x30, 0x11): "incompatible volume type",
    (0x30, 0x12): "incompatible volume qualifier",
    (0x30, 0x13): "cleaning volume expired",
    (0x31, 0x00): "medium format corrupted",
    (0x31, 0x01): "format command failed",
    (0x31, 0x02): "zoned formatting failed due to spare linking",
    (0x31, 0x03): "sanitize command failed",
    (0x32, 0x00): "no defect spare location available",
    (0x32, 0x01): "defect list update failure",
    (0x33, 0x00): "tape length error",
    (0x34, 0x00): "enclosure failure",
    (0x35, 0x00): "enclosure services failure",
    (0x35, 0x01): "unsupported enclosure function",
    (0x35, 0x02): "enclosure services unavailable",
    (0x35, 0x03): "enclosure services transfer failure",
    (0x35, 0x04): "enclosure services transfer refused",
    (0x35, 0x05): "enclosure services checksum error",
    (0x36, 0x00): "ribbon, ink, or toner failure",
    (0x37, 0x00): "rounded parameter",
    (0x38, 0x00): "event status notification",
    (0x38, 0x02): "ESN - power management class event",
    (0x38, 0x04): "ESN - media class event",
    (0x38, 0x06): "ESN - device busy class event",
    (0x38, 0x07): "thin provisioning soft threshold reached",
    (0x39, 0x00): "saving parameters not supported",
    (0x3A, 0x00): "medium not present",
    (0x3A, 0x01): "medium not present - tray closed",
    (0x3A, 0x02): "medium not present - tray open",
    (0x3A, 0x03): "medium not present - loadable",
    (0x3A, 0x04): "medium not present - medium auxiliary memory accessible",
    (0x3B, 0x00): "sequential positioning error",
    (0x3B, 0x01): "tape position error at beginning-of-medium",
    (0x3B, 0x02): "tape position error at end-of-medium",
    (0x3B, 0x0D): "medium destination element full",
    (0x3B, 0x0E): "medium source element empty",
    (0x3B, 0x11): "medium magazine not accessible",
    (0x3B, 0x12): "medium magazine removed",
    (0x3B, 0x13): "medium magazine inserted",
    (0x3B, 0x14): "medium magazine locked",
    (0x3B, 0x15): "medium magazine unlocked",
    (0x3D, 0x00): "invalid bits in IDENTIFY message",
    (0x3E, 0x00): "logical unit has not self-configured yet",
    (0x3E, 0x01): "logical unit failure",
    (0x3E, 0x02): "timeout on logical unit",
    (0x3E, 0x03): "logical unit failed self-test",
    (0x3E, 0x04): "logical unit unable to update self-test log",
    (0x3F, 0x00): "target operating conditions have changed",
    (0x3F, 0x01): "microcode has been changed",
    (0x3F, 0x02): "changed operating definition",
    (0x3F, 0x03): "inquiry data has changed",
    (0x3F, 0x04): "component device attached",
    (0x3F, 0x05): "device identifier changed",
    (0x3F, 0x06): "redundancy group created or modified",
    (0x3F, 0x07): "redundancy group deleted",
    (0x3F, 0x08): "spare created or modified",
    (0x3F, 0x09): "spare deleted",
    (0x3F, 0x0A): "volume set created or modified",
    (0x3F, 0x0B): "volume set deleted",
    (0x3F, 0x0C): "volume set deassigned",
    (0x3F, 0x0D): "volume set reassigned",
    (0x3F, 0x0E): "reported luns data has changed",
    (0x3F, 0x0F): "echo buffer overwritten",
    (0x3F, 0x10): "medium loadable",
    (0x3F, 0x11): "medium auxiliary memory accessible",
    (0x3F, 0x12): "iSCSI IP address added",
    (0x3F, 0x13): "iSCSI IP address removed",
    (0x3F, 0x14): "iSCSI IP address changed",
    (0x3F, 0x15): "inspect referrals sense descriptors",
    (0x3F, 0x16): "microcode has been changed without reset",
    (0x3F, 0x17): "zone transition to full",
    (0x3F, 0x18): "bind completed",
    (0x3F, 0x19): "bind redirected",
    (0x3F, 0x1A): "subsidiary binding changed",
    (0x40, 0x00): "RAM failure",
    (0x41, 0x00): "data path failure",
    (0x42, 0x00): "power-on or self-test failure",
    (0x43, 0x00): "message error",
    (0x44, 0x00): "internal target failure",
    (0x44, 0x01): "persistent reservation information lost",
    (0x44, 0x71): "ATA device failed set features",
    (0x45, 0x00): "select or reselect failure",
    (0x46, 0x00): "unsuccessful soft reset",
    (0x47, 0x00): "SCSI parity error",
    (0x47, 0x01): "data phase CRC error detected",
    (0x47, 0x02): "SCSI parity error detected during ST data phase",
    (0x47, 0x03): "information unit iuCRC error detected",
    (0x47, 0x04): "asynchronous information protection error detected",
    (0x47, 0x05): "protocol service CRC error",
    (0x47, 0x06): "PHY test function in progress",
    (0x47, 0x7F): "some commands cleared by iSCSI protocol event",
    (0x48, 0x00): "initiator detected error message received",
    (0x49, 0x00): "invalid message error",
    (0x4A, 0x00): "command phase error",
    (0x4B, 0x00): "data phase error",
    (0x4B, 0x01): "invalid target port transfer tag received",
    (0x4B, 0x02): "too much write data",
    (0x4B, 0x03): "ACK/NAK timeout",
    (0x4B, 0x04): "NAK received",
    (0x4B, 0x05): "data offset error",
    (0x4B, 0x06): "initiator response timeout",
    (0x4B, 0x07): "connection lost",
    (0x4B, 0x08): "data-in buffer overflow - data buffer size",
    (0x4B, 0x09): "data-in buffer overflow - data buffer descriptor area",
    (0x4B, 0x0A): "data-in buffer error",
    (0x4B, 0x0B): "data-out buffer overflow - data buffer size",
    (0x4B, 0x0C): "data-out buffer overflow - data buffer descriptor area",
    (0x4B, 0x0D): "data-out buffer error",
    (0x4B, 0x0E): "PCIe fabric error",
    (0x4B, 0x0F): "PCIe completion timeout",
    (0x4B, 0x10): "PCIe completer abort",
    (0x4B, 0x11): "PCIe poisoned TLP received",
    (0x4B, 0x12): "PCIe ECRC check failed",
    (0x4B, 0x13): "PCIe unsupported request",
    (0x4B, 0x14): "PCIe ACS violation",
    (0x4B, 0x15): "PCIe TLP prefix blocked",
    (0x4C, 0x00): "logical unit failed self-configuration",
    (0x4E, 0x00): "overlapped commands attempted",
    (0x50, 0x00): "write append error",
    (0x51, 0x00): "erase failure",
    (0x52, 0x00): "cartridge fault",
    (0x53, 0x00): "media load or eject failed",
    (0x53, 0x01): "unload tape failure",
    (0x53, 0x02): "medium removal prevented",
    (0x53, 0x03): "medium removal prevented by data transfer element",
    (0x53, 0x04): "medium thread or unthread failure",
    (0x53, 0x05): "volume identifier invalid",
    (0x53, 0x06): "volume identifier missing",
    (0x53, 0x07): "duplicate volume identifier",
    (0x53, 0x08): "element status unknown",
    (0x54, 0x00): "SCSI to host system interface failure",
    (0x55, 0x00): "system resource failure",
    (0x55, 0x01): "system buffer full",
    (0x55, 0x02): "insufficient reservation resources",
    (0x55, 0x03): "insufficient resources",
    (0x55, 0x04): "insufficient registration resources",
    (0x55, 0x05): "insufficient access control resources",
    (0x55, 0x06): "auxiliary memory out of space",
    (0x55, 0x07): "quota error",
    (0x55, 0x08): "maximum number of supplemental decryption keys exceeded",
    (0x55, 0x09): "medium auxiliary memory not accessible",
    (0x55, 0x0A): "data currently unavailable",
    (0x55, 0x0B): "insufficient power for operation",
    (0x55, 0x0C): "insufficient resources to create ROD",
    (0x55, 0x0D): "insufficient resources to create ROD token",
    (0x55, 0x0E): "insufficient zone resources",
    (0x55, 0x0F): "insufficient zone resources to complete write",
    (0x55, 0x10): "maximum number of streams open",
    (0x55, 0x11): "insufficient resources to bind",
    (0x57, 0x00): "unable to recover table-of-contents",
    (0x58, 0x00): "generation does not exist",
    (0x59, 0x00): "updated block read",
    (0x5A, 0x00): "operator request or state change input",
    (0x5A, 0x01): "operator medium removal request",
    (0x5A, 0x02): "operator selected write protect",
    (0x5A, 0x03): "operator selected write permit",
    (0x5B, 0x00): "log exception",
    (0x5B, 0x01): "threshold condition met",
    (0x5B, 0x02): "log counter at maximum",
    (0x5B, 0x03): "log list codes exhausted",
    (0x5C, 0x00): "RPL status change",
    (0x5C, 0x01): "spindles synchronized",
    (0x5C, 0x02): "spindles not synchronized",
    (0x5D, 0x00): "failure prediction threshold exceeded",
    (0x5D, 0x01): "media failure prediction threshold exceeded",
    (0x5D, 0x02): "logical unit failure prediction threshold exceeded",
    (0x5D, 0x03): "spare area exhaustion prediction threshold exceeded",
    (0x5D, 0x10): "hardware impending failure general hard drive failure",
    (0x5D, 0x20): "controller impending failure general hard drive failure",
    (0x5D, 0x30): "data channel impending failure general hard drive failure",
    (0x5D, 0x40): "servo impending failure general hard drive failure",
    (0x5D, 0x50): "spindle impending failure general hard drive failure",
    (0x5D, 0x60): "firmware impending failure general hard drive failure",
    (0x5D, 0x73): "media impending failure endurance limit met",
    (0x5D, 0xFF): "failure prediction threshold exceeded (false)",
    (0x5E, 0x00): "low power condition on",
    (0x5E, 0x01): "idle condition activated by timer",
    (0x5E, 0x02): "standby condition activated by timer",
    (0x5E, 0x03): "idle condition activated by command",
    (0x5E, 0x04): "standby condition activated by command",
    (0x5E, 0x05): "idle_b condition activated by timer",
    (0x5E, 0x06): "idle_b condition activated by command",
    (0x5E, 0x07): "idle_c condition activated by timer",
    (0x5E, 0x08): "idle_c condition activated by command",
    (0x5E, 0x09): "standby_y condition activated by timer",
    (0x5E, 0x0A): "standby_y condition activated by command",
    (0x5E, 0x41): "power state change to active",
    (0x5E, 0x42): "power state change to idle",
    (0x5E, 0x43): "power state change to standby",
    (0x5E, 0x45): "power state change to sleep",
    (0x5E, 0x47): "power state change to device control",
    (0x60, 0x00): "lamp failure",
    (0x61, 0x00): "video acquisition error",
    (0x62, 0x00): "scan head positioning error",
    (0x63, 0x00): "end of user area encountered on this track",
    (0x64, 0x00): "illegal mode for this track",
    (0x65, 0x00): "voltage fault",
    (0x66, 0x00): "automatic document feeder cover up",
    (0x67, 0x00): "configuration failure",
    (0x67, 0x01): "configuration of incapable logical units failed",
    (0x67, 0x02): "add logical unit failed",
    (0x67, 0x03): "modification of logical unit failed",
    (0x67, 0x04): "exchange of logical unit failed",
    (0x67, 0x05): "remove of logical unit failed",
    (0x67, 0x06): "attachment of logical unit failed",
    (0x67, 0x07): "creation of logical unit failed",
    (0x67, 0x08): "assign failure occurred",
    (0x67, 0x09): "multiply assigned logical unit",
    (0x67, 0x0A): "set target port groups command failed",
    (0x67, 0x0B): "ATA device feature not enabled",
    (0x67, 0x0C): "command rejected",
    (0x67, 0x0D): "explicit bind not allowed",
    (0x68, 0x00): "logical unit not configured",
    (0x68, 0x01): "subsidiary logical unit not configured",
    (0x69, 0x00): "data loss on logical unit",
    (0x69, 0x01): "multiple logical unit failures",
    (0x69, 0x02): "parity/data mismatch",
    (0x6A, 0x00): "informational, refer to log",
    (0x6B, 0x00): "state change has occurred",
    (0x6B, 0x01): "redundancy level got better",
    (0x6B, 0x02): "redundancy level got worse",
    (0x6C, 0x00): "rebuild failure occurred",
    (0x6D, 0x00): "recalculate failure occurred",
    (0x6E, 0x00): "command to logical unit failed",
    (0x6F, 0x00): "copy protection key exchange failure - authentication failure",
    (0x71, 0x00): "decompression exception long algorithm id",
    (0x74, 0x00): "security error",
    (0x74, 0x01): "unable to decrypt data",
    (0x74, 0x02): "unencrypted data encountered while decrypting",
    (0x74, 0x03): "incorrect data encryption key",
    (0x74, 0x04): "cryptographic integrity validation failed",
    (0x74, 0x05): "error decrypting data",
    (0x74, 0x08): "digital signature validation failure",
    (0x74, 0x71): "logical unit access not authorized",
    (0x74, 0x79): "security conflict in translated device",
}
