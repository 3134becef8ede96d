"""CDBs: operation codes, the builders ``hbactl`` and the block-device client use, and names.

Every builder returns the CDB as ``bytes`` and raises ``ValueError`` for an argument that cannot
be encoded (a programming error of the caller, not a user-facing condition): the range checks
live in :func:`check_range`, which the sense builder and the LUN encoder share.
:func:`command_name` and :func:`describe_cdb` turn any CDB, ours or the kernel's, into the words
error messages use (``READ(16) at LBA 2048``).

:func:`read` and :func:`write` run once per command under ``hbactl perf`` and the block-device
client, so their common case packs the CDB inline (see the comment above them).

Sources: SPC-5 (INQUIRY, REPORT LUNS, MODE SENSE, the operation codes of Annex E), SBC-4 (READ,
WRITE, READ CAPACITY, SYNCHRONIZE CACHE).
"""

from __future__ import annotations

import enum
import struct

__all__ = [
    "U16",
    "U32",
    "U64",
    "ModePage",
    "Opcode",
    "PageControl",
    "check_range",
    "command_name",
    "describe_cdb",
    "inquiry",
    "mode_sense6",
    "mode_sense10",
    "read",
    "read10",
    "read16",
    "read_capacity10",
    "read_capacity16",
    "report_luns",
    "synchronize_cache10",
    "synchronize_cache16",
    "test_unit_ready",
    "write",
    "write10",
    "write16",
]

# Field limits: a 2-, 4- and 8-byte big-endian field holds at most these.
U16 = 0xFFFF
U32 = 0xFFFF_FFFF
U64 = 0xFFFF_FFFF_FFFF_FFFF


def check_range(name: str, value: int, low: int, high: int) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``low <= value <= high``."""
    if not low <= value <= high:
        raise ValueError(f"{name} {value} is outside {low}..{high}")


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


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------

_CDB6 = struct.Struct(">BBBBBB")
_CDB_INQUIRY = struct.Struct(">BBBHB")
_CDB_READ_WRITE_10 = struct.Struct(">BBIBHB")
_CDB_READ_WRITE_16 = struct.Struct(">BBQIBB")
_CDB_READ_CAPACITY_16 = struct.Struct(">BBQIBB")
_CDB_REPORT_LUNS = struct.Struct(">BBBxxxIBB")
_CDB_MODE_SENSE_10 = struct.Struct(">BBBBxxxHB")

_FUA = 0x08
_IMMED = 0x02


def test_unit_ready() -> bytes:
    """TEST UNIT READY (SPC-5 §6.47)."""
    return bytes(6)


def inquiry(page: int | None = None, *, allocation_length: int = 255) -> bytes:
    """INQUIRY (SPC-5 §6.7): standard data, or the VPD ``page`` (sets EVPD).

    The default allocation length of 255 is what every device accepts (SPC-2 devices read a
    one-byte field); ask for more when :func:`vpd_page_length` says the page is longer.
    """
    check_range("allocation length", allocation_length, 0, U16)
    if page is None:
        return _CDB_INQUIRY.pack(Opcode.INQUIRY, 0, 0, allocation_length, 0)
    check_range("VPD page code", page, 0, 0xFF)
    return _CDB_INQUIRY.pack(Opcode.INQUIRY, 0x01, page, allocation_length, 0)


def read_capacity10() -> bytes:
    """READ CAPACITY(10) (SBC-4 §5.20)."""
    return bytes([Opcode.READ_CAPACITY_10]) + bytes(9)


def read_capacity16(*, allocation_length: int = 32) -> bytes:
    """READ CAPACITY(16) (SBC-4 §5.21): SERVICE ACTION IN(16), service action 0x10."""
    check_range("allocation length", allocation_length, 0, U32)
    return _CDB_READ_CAPACITY_16.pack(
        Opcode.SERVICE_ACTION_IN_16, _SAI_READ_CAPACITY_16, 0, allocation_length, 0, 0
    )


def _rw10(opcode: int, lba: int, blocks: int, fua: bool) -> bytes:
    check_range("LBA", lba, 0, U32)
    check_range("transfer length", blocks, 0, U16)
    return _CDB_READ_WRITE_10.pack(opcode, _FUA if fua else 0, lba, 0, blocks, 0)


def _rw16(opcode: int, lba: int, blocks: int, fua: bool) -> bytes:
    check_range("LBA", lba, 0, U64)
    check_range("transfer length", blocks, 0, U32)
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
    return lba + max(blocks, 1) - 1 > U32 or blocks > U16


# read() and write() build a CDB per command (hbactl perf, block devices): the common case,
# a non-empty range that READ(10)/WRITE(10) can express, is packed right here, without the
# calls through _needs_16(), read10() and _rw10()'s range checks, which it passes by
# construction. Anything else takes that general path and its errors.
_PACK_RW10 = _CDB_READ_WRITE_10.pack
_READ_10 = int(Opcode.READ_10)
_WRITE_10 = int(Opcode.WRITE_10)
_LBA_END_10 = U32 + 1


def read(lba: int, blocks: int, *, fua: bool = False) -> bytes:
    """READ(10) when the range fits its 32-bit LBA and 16-bit length, READ(16) otherwise."""
    if 0 < blocks <= U16 and lba >= 0 and lba + blocks <= _LBA_END_10:
        return _PACK_RW10(_READ_10, _FUA if fua else 0, lba, 0, blocks, 0)
    if _needs_16(lba, blocks):
        return read16(lba, blocks, fua=fua)
    return read10(lba, blocks, fua=fua)


def write(lba: int, blocks: int, *, fua: bool = False) -> bytes:
    """WRITE(10) when the range fits its 32-bit LBA and 16-bit length, WRITE(16) otherwise."""
    if 0 < blocks <= U16 and lba >= 0 and lba + blocks <= _LBA_END_10:
        return _PACK_RW10(_WRITE_10, _FUA if fua else 0, lba, 0, blocks, 0)
    if _needs_16(lba, blocks):
        return write16(lba, blocks, fua=fua)
    return write10(lba, blocks, fua=fua)


def synchronize_cache10(lba: int = 0, blocks: int = 0, *, immed: bool = False) -> bytes:
    """SYNCHRONIZE CACHE(10) (SBC-4 §5.24); ``blocks == 0`` means from ``lba`` to the end."""
    check_range("LBA", lba, 0, U32)
    check_range("number of blocks", blocks, 0, U16)
    flags = _IMMED if immed else 0
    return _CDB_READ_WRITE_10.pack(Opcode.SYNCHRONIZE_CACHE_10, flags, lba, 0, blocks, 0)


def synchronize_cache16(lba: int = 0, blocks: int = 0, *, immed: bool = False) -> bytes:
    """SYNCHRONIZE CACHE(16) (SBC-4 §5.25); ``blocks == 0`` means from ``lba`` to the end."""
    check_range("LBA", lba, 0, U64)
    check_range("number of blocks", blocks, 0, U32)
    flags = _IMMED if immed else 0
    return _CDB_READ_WRITE_16.pack(Opcode.SYNCHRONIZE_CACHE_16, flags, lba, blocks, 0, 0)


def report_luns(*, select_report: int = 0, allocation_length: int = 4096) -> bytes:
    """REPORT LUNS (SPC-5 §6.33). The allocation length must be at least 16 bytes."""
    check_range("select report", select_report, 0, 0xFF)
    check_range("allocation length", allocation_length, 16, U32)
    return _CDB_REPORT_LUNS.pack(Opcode.REPORT_LUNS, 0, select_report, allocation_length, 0, 0)


def _mode_page_byte(page: int, pc: PageControl) -> int:
    check_range("mode page code", page, 0, 0x3F)
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
    check_range("subpage code", subpage, 0, 0xFF)
    check_range("allocation length", allocation_length, 0, 0xFF)
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
    check_range("subpage code", subpage, 0, 0xFF)
    check_range("allocation length", allocation_length, 0, U16)
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
