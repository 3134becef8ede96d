"""Sense data: sense keys, the parser of fixed and descriptor formats, the fixed-format builder.

:func:`parse_sense` decodes what a target returned with CHECK CONDITION (fixed format 70h/71h
or descriptor format 72h/73h, SPC-5 §4.4) into a :class:`Sense`, honouring the ADDITIONAL SENSE
LENGTH and raising :class:`~initiator.scsi.data.ScsiDataError` for data that cannot be sense.
:func:`build_fixed_sense` (with :func:`field_pointer` for ILLEGAL REQUEST) goes the other way,
for the TCMU side, which synthesises CHECK CONDITION when it cannot deliver a command.

Sense data here is the sense data itself, without the 2-byte SenseLength that precedes it in an
iSCSI SCSI Response (RFC 7143 §11.4.7.2).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from initiator.scsi.asc import asc_text
from initiator.scsi.cdb import U16, U32, check_range
from initiator.scsi.data import ScsiDataError

__all__ = [
    "Sense",
    "SenseDescriptor",
    "SenseKey",
    "build_fixed_sense",
    "field_pointer",
    "parse_sense",
]


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
    check_range("field pointer", byte, 0, U16)
    first = 0x80 | (0x40 if in_cdb else 0)
    if bit is not None:
        check_range("bit pointer", bit, 0, 7)
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
    check_range("sense key", int(sense_key), 0, 0x0F)
    check_range("ASC", asc, 0, 0xFF)
    check_range("ASCQ", ascq, 0, 0xFF)
    check_range("command-specific information", command_specific, 0, U32)
    check_range("FRU code", fru, 0, 0xFF)
    b0 = 0x71 if deferred else 0x70
    if information is not None:
        check_range("information", information, 0, U32)
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
