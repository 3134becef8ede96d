"""iSCSI PDUs: one class per opcode, encode and decode byte-exact (RFC 7143 §11).

Theory of operation
-------------------
Every PDU starts with a 48-byte Basic Header Segment (BHS). Bytes 0-7 have the same shape for
every opcode: the I (immediate) bit and the 6-bit opcode in byte 0, opcode-specific flags in
byte 1, TotalAHSLength (in 4-byte words) in byte 4 and the 24-bit DataSegmentLength in bytes
5-7. Then come Additional Header Segments (only the SCSI Command uses them: extended CDB and
expected bidirectional read length), an optional CRC32C header digest, the data segment padded to
a multiple of 4 bytes, and an optional CRC32C data digest over data and padding (§11.1, §7.8).

Each PDU class knows only its own 48 bytes (``_pack`` / ``_unpack``), with the AHS words and
data length passed in, so that the same class serves a 48-byte control PDU and a Data-Out whose
payload is a list of ``memoryview``s of the TCMU data area that are never copied:
:func:`frame` returns the header bytes followed by the caller's data views and a short trailer
(padding and data digest), ready for ``socket.sendmsg``.

Incremental decoding of a byte stream (and the Data-In receive path) is
:mod:`initiator.reader`'s.

Reserved fields are written as zero and ignored on receipt (§11, "Any compliant receiver MUST
ignore any bit not defined and all reserved fields"), so decode-then-encode is byte-exact for
every PDU a compliant peer sends.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Self, TypeVar

from initiator import digest as _digest
from initiator.errors import DigestError, LocalProtocolError, PDUFormatError

Buffer = bytes | bytearray | memoryview

BHS_LEN = 48
DIGEST_LEN = _digest.DIGEST_LEN
MAX_DATA_SEGMENT_LENGTH = (1 << 24) - 1
RESERVED_TAG = 0xFFFFFFFF
"""The Initiator Task Tag value that means "no task" (§11.18, §11.19)."""

_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")


def pad_len(n: int) -> int:
    """Bytes of zero padding after a data segment of ``n`` bytes (§11.1)."""
    return -n & 3


def _nbytes(buf: Buffer) -> int:
    # len() of a memoryview counts items, not bytes: a view of an array('I') has 4 per item.
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)


class Opcode(enum.IntEnum):
    """PDU opcodes (§11.2.1.2): initiator opcodes below 0x20, target opcodes above."""

    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_MGMT_REQUEST = 0x02
    LOGIN_REQUEST = 0x03
    TEXT_REQUEST = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQUEST = 0x06
    SNACK_REQUEST = 0x10
    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_MGMT_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    ASYNC_MESSAGE = 0x32
    REJECT = 0x3F


class TaskAttribute(enum.IntEnum):
    """ATTR of the SCSI Command PDU (§11.3.1.3)."""

    UNTAGGED = 0
    SIMPLE = 1
    ORDERED = 2
    HEAD_OF_QUEUE = 3
    ACA = 4


class ServiceResponse(enum.IntEnum):
    """Response field of the SCSI Response PDU (§11.4.3)."""

    COMPLETED = 0x00
    TARGET_FAILURE = 0x01


class TMFunction(enum.IntEnum):
    """Task management functions (§11.5.1)."""

    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class TMResponse(enum.IntEnum):
    """Task management response codes (§11.6.1)."""

    COMPLETE = 0
    TASK_DOES_NOT_EXIST = 1
    LUN_DOES_NOT_EXIST = 2
    TASK_STILL_ALLEGIANT = 3
    REASSIGNMENT_NOT_SUPPORTED = 4
    NOT_SUPPORTED = 5
    AUTHORIZATION_FAILED = 6
    REJECTED = 255


class Stage(enum.IntEnum):
    """Login stages as numbered in the CSG and NSG fields (§11.12.3): SecurityNegotiation,
    LoginOperationalNegotiation, FullFeaturePhase. The one stage type of the package: the
    negotiation (:mod:`initiator.keys`) and the login machine use it too."""

    SECURITY = 0
    OPERATIONAL = 1
    FULL_FEATURE = 3


class LogoutReason(enum.IntEnum):
    """Reason codes of the Logout Request (§11.14.1)."""

    CLOSE_SESSION = 0
    CLOSE_CONNECTION = 1
    REMOVE_CONNECTION_FOR_RECOVERY = 2


class LogoutResponseCode(enum.IntEnum):
    """Response field of the Logout Response (§11.15.1)."""

    CLOSED = 0
    CID_NOT_FOUND = 1
    RECOVERY_NOT_SUPPORTED = 2
    CLEANUP_FAILED = 3


class SnackType(enum.IntEnum):
    """SNACK types (§11.16.1)."""

    DATA_R2T = 0
    STATUS = 1
    DATA_ACK = 2
    R_DATA = 3


class AsyncEvent(enum.IntEnum):
    """AsyncEvent codes of the Asynchronous Message (§11.9.1)."""

    SCSI_ASYNC_EVENT = 0
    LOGOUT_REQUEST = 1
    CONNECTION_DROP = 2
    ALL_CONNECTIONS_DROP = 3
    NEGOTIATION_REQUEST = 4
    TASK_TERMINATION = 5
    VENDOR_SPECIFIC = 255


class RejectReason(enum.IntEnum):
    """Reason codes of the Reject PDU (§11.17.1)."""

    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OPERATION_REJECT = 0x0A
    NEGOTIATION_RESET = 0x0B
    WAITING_FOR_LOGOUT = 0x0C


class AHSType(enum.IntEnum):
    """Additional Header Segment types (§11.2.2.1)."""

    EXTENDED_CDB = 1
    BIDI_READ_LENGTH = 2


_F = 0x80  # the Final bit, byte 1 of most PDUs
_I = 0x40  # the Immediate bit, byte 0


def lun_to_wire(lun: int) -> int:
    """The 8-byte LUN field for a LUN number, numbered as Linux, LIO and libiscsi number them.

    The number goes into the first two bytes (Linux's ``int_to_scsilun``): LUNs 0-255 are then
    SAM peripheral device addressing, and a target built on the same convention (LIO, tgt)
    decodes larger numbers back to the LUN it was configured with (§11.2.2.3, SAM-2 §4.9).
    """
    if 0 <= lun <= 0xFFFF:
        return lun << 48
    raise LocalProtocolError(f"LUN {lun} is outside 0..65535, the single-level LUN range")


def lun_from_wire(raw: int) -> int:
    """The LUN number of an 8-byte LUN field: its first level, as Linux's ``scsilun_to_int``
    reads a single-level LUN (inverse of :func:`lun_to_wire`)."""
    return raw >> 48


# --------------------------------------------------------------------------------------------
# Additional header segments


@dataclass(slots=True, frozen=True)
class AHS:
    """One Additional Header Segment as received (§11.2.2)."""

    type: int
    specific: int
    data: bytes


_AHS_HEAD = struct.Struct(">HBB")


def _pack_ahs(ahs_type: int, payload: bytes) -> bytes:
    # AHSLength counts the bytes after AHSType, the AHS-specific byte 3 included: "CDBLength -
    # 15" for an extended CDB, 5 for the bidirectional read length (§11.2.2.3, §11.2.2.4).
    # ``payload`` therefore starts with that byte.
    return (len(payload).to_bytes(2, "big") + bytes((ahs_type,)) + payload
            + _PAD[(3 + len(payload)) & 3])


def _parse_ahs(raw: memoryview) -> tuple[AHS, ...]:
    out: list[AHS] = []
    pos = 0
    while pos < len(raw):
        if len(raw) - pos < 4:
            raise PDUFormatError("truncated additional header segment")
        length, ahs_type, specific = _AHS_HEAD.unpack_from(raw, pos)
        end = pos + 3 + length
        if length == 0:
            # The length counts the type-specific byte (see _ahs_bytes): 0 is no AHS at all.
            raise PDUFormatError(
                f"additional header segment of type {ahs_type} has AHSLength 0, too short "
                "for even its type-specific byte (RFC 7143 §11.2.2.2)")
        if end > len(raw):
            raise PDUFormatError(
                f"additional header segment of type {ahs_type} claims {length} bytes, "
                f"more than the {len(raw) - pos - 3} left in TotalAHSLength"
            )
        out.append(AHS(ahs_type, specific, bytes(raw[pos + 4 : end])))
        pos = end + pad_len(end - pos)
    return tuple(out)


# --------------------------------------------------------------------------------------------
# PDU classes


@dataclass(slots=True, kw_only=True)
class PDU:
    """Base of every PDU class. ``data`` is the data segment without padding."""

    OPCODE: ClassVar[Opcode]
    data: Buffer = field(default=b"", repr=False)

    def _pack(self, ahs_words: int, dsl: int) -> bytes:
        raise NotImplementedError

    @classmethod
    def _unpack(cls, bhs: memoryview, ahs: tuple[AHS, ...], data: bytes) -> Self:
        raise NotImplementedError

    def ahs_bytes(self) -> bytes:
        """The encoded AHS of this PDU (only the SCSI Command has any)."""
        return b""


def _len_word(ahs_words: int, dsl: int) -> int:
    return (ahs_words << 24) | dsl


# -- initiator -> target ----------------------------------------------------------------------

_NOP_OUT = struct.Struct(">BBHIQIIII16x")


@dataclass(slots=True, kw_only=True)
class NopOut(PDU):
    """NOP-Out: a ping, or the answer to a target's NOP-In (§11.18)."""

    OPCODE: ClassVar[Opcode] = Opcode.NOP_OUT
    immediate: bool = True
    lun: int = 0
    itt: int = RESERVED_TAG
    ttt: int = RESERVED_TAG
    cmd_sn: int = 0
    exp_stat_sn: int = 0

    def _pack(self, ahs_words: int, dsl: int) -> bytes:
        return _NOP_OUT.pack(
            self.OPCODE | (_I if self.immediate else 0), _F, 0, _len_word(ahs_words, dsl),
            self.lun, self.itt, self.ttt, self.cmd_sn, self.exp_stat_sn,
        )

    @classmethod
    def _unpack(cls, bhs: memoryview, ahs: tuple[AHS, ...], data: bytes) -> Self:
        b0, _, _, _, lun, itt, ttt, cmd_sn, exp_stat_sn = _NOP_OUT.unpack_from(bhs)
        return cls(immediate=bool(b0 & _I), lun=lun, itt=itt, ttt=ttt, cmd_sn=cmd_sn,
                   exp_stat_sn=exp_stat_sn, data=data)


_SCSI_COMMAND = struct.Struct(">BBHIQIIII16s")


@dataclass(slots=True, kw_only=True)
class ScsiCommand(PDU):
    """SCSI Command (§11.3). ``data`` is the immediate data, if any.

    CDBs longer than 16 bytes travel in an Extended CDB AHS, and a bidirectional command
    carries its expected read length in a Bidirectional Read Expected Data Transfer Length AHS;
    both are built and parsed here from ``cdb`` and ``bidi_read_length``.
    """

    OPCODE: ClassVar[Opcode] = Opcode.SCSI_COMMAND
    immediate: bool = False
    final: bool = True
    read: bool = False
    write: bool = False
    attr: TaskAttribute = TaskAttribute.SIMPLE
    lun: int = 0
    itt: int = 0
    expected_data_transfer_length: int = 0
    cmd_sn: int = 0
    exp_stat_sn: int = 0
    cdb: bytes = b""
    bidi_read_length: int | None = None

    def ahs_bytes(self) -> bytes:
        out = b""
        if len(self.cdb) > 16:
            out += _pack_ahs(AHSType.EXTENDED_CDB, b"\0" + self.cdb[16:])
        if self.bidi_read_length is not None:
            out += _pack_ahs(AHSType.BIDI_READ_LENGTH,
                             b"\0" + self.bidi_read_length.to_bytes(4, "big"))
        return out

    def _pack(self, ahs_words: int, dsl: int) -> bytes:
        if not 0 < len(self.cdb) <= 260:
            raise LocalProtocolError(f"a CDB of {len(self.cdb)} bytes cannot be sent")
        flags = (_F if self.final else 0) | (0x40 if self.read else 0) \
            | (0x20 if self.write else 0) | (self.attr & 7)
        return _SCSI_COMMAND.pack(
            self.OPCODE | (_I if self.immediate else 0), flags, 0, _len_word(ahs_words, dsl),
            self.lun, self.itt, self.expected_data_transfer_length, self.cmd_sn,
            self.exp_stat_sn, self.cdb[:16].ljust(16, b"\0"),
        )

    @classmethod
    def _unpack(cls, bhs: memoryview, ahs: tuple[AHS, ...], data: bytes) -> Self:
        b0, flags, _, _, lun, itt, edtl, cmd_sn, exp_stat_sn, cdb = _SCSI_COMMAND.unpack_from(bhs)
        bidi: int | None = None
        for seg in ahs:
            if seg.type == AHSType.EXTENDED_CDB:
                cdb += seg.data
            elif seg.type == AHSType.BIDI_READ_LENGTH:
                if len(seg.data) != 4:
                    raise PDUFormatError("bidirectional read length AHS is not 4 bytes")
                bidi = int.from_bytes(seg.data, "big")
        try:
            attr = TaskAttribute(flags & 7)
        except ValueError:
            raise PDUFormatError(f"SCSI Command with unknown task attribute {flags & 7}") from None
        return cls(immediate=bool(b0 & _I), final=bool(flags & _F), read=bool(flags & 0x40),
                   write=bool(flags & 0x20), attr=attr, lun=lun, itt=itt,
                   expected_data_transfer_length=edtl, cmd_sn=cmd_sn, exp_stat_sn=exp_stat_sn,
                   cdb=cdb, bidi_read_length=bidi, data=data)


_TASK_MGMT_REQUEST = struct.Struct(">BBHIQIIIIII8x")


@dataclass(slots=True, kw_only=True)
class TaskMgmtRequest(PDU):
    """Task Management Function Request (§11.5)."""

    OPCODE: ClassVar[Opcode] = Opcode.TASK_MGMT_REQUEST
    immediate: bool = True
    function: TMFunction = TMFunction.ABORT_TASK
    lun: int = 0
    itt: int = 0
    referenced_task_tag: int = RESERVED_TAG
    cmd_sn: int = 0
    exp_stat_sn: int = 0
    ref_cmd_sn: int = 0
    exp_data_sn: int = 0

    def _pack(self, ahs_words: int, dsl: int) -> bytes:
        return _TASK_MGMT_REQUEST.pack(
            self.OPCODE | (_I if self.immediate else 0), _F | self.function, 0,
            _len_word(ahs_words, dsl), self.lun, self.itt, self.referenced_task_tag, self.cmd_sn,
            self.exp_stat_sn, self.ref_cmd_sn, self.exp_data_sn,
        )

    @classmethod
    def _unpack(cls, bhs: memoryview, ahs: tuple[AHS, ...], data: bytes) -> Self:
        b0, b1, _, _, lun, itt, rtt, cmd_sn, exp_stat_sn, ref_cmd_sn, exp_data_sn = \
            _TASK_MGMT_REQUEST.unpack_from(bhs)
        return cls(immediate=bool(b0 & _I), function=_enum(TMFunction, b1 & 0x7F, "function"),
                   lun=lun, itt=itt, referenced_task_tag=rtt, cmd_sn=cmd_sn,
                   exp_stat_sn=exp_stat_sn, ref_cmd_sn=ref_cmd_sn, exp_data_sn=exp_data_sn,
                   data=data)


_LOGIN_REQUEST = struct.Struct(">BBBBI6sHIH2xII16x")


@dataclass(slots=True, kw_only=True)
class _LoginPDU(PDU):
    """The fields Login Requests and Responses share (§11.12, §11.13); ``data`` is text."""

    transit: bool = False
    cont: bool = False
    csg: Stage = Stage.SECURITY
    nsg: Stage = Stage.SECURITY
    version_max: int = 0
    isid: int = 0
    tsih: int = 0
    itt: int = 0


@dataclass(slots=True, kw_only=True)
class LoginRequest(_LoginPDU):
    """Login Request (§11.12). ``data`` is the text of key=value pairs."""

    OPCODE: ClassVar[Opcode] = Opcode.LOGIN_REQUEST
    version_min: int = 0
    cid: int = 0
    cmd_sn: int = 0
    exp_stat_sn: int = 0

    def _pack(self, ahs_words: int, dsl: int) -> bytes:
        return _LOGIN_REQUEST.pack(
            self.OPCODE | _I, _login_flags(self.transit, self.cont, self.csg, self.nsg),
            self.version_max, self.version_min, _len_word(ahs_words, dsl),
            self.isid.to_bytes(6, "big"), self.tsih, self.itt, self.cid, self.cmd_sn,
            self.exp_stat_sn,
        )

    @classmethod
    def _unpack(cls, bhs: memoryview, ahs: tuple[AHS, ...], data: bytes) -> Self:
        _, flags, vmax, vmin, _, isid, tsih, itt, cid, cmd_sn, exp_stat_sn = \
            _LOGIN_REQUEST.unpack_from(bhs)
        transit, cont, csg, nsg = _parse_login_flags(flags)
        return cls(transit=transit, cont=cont, csg=csg, nsg=nsg, version_max=vmax,
                   version_min=vmin, isid=int.from_bytes(isid, "big"), tsih=tsih, itt=itt,
                   cid=cid, cmd_sn=cmd_sn, exp_stat_sn=exp_stat_sn, data=data)


def _login_flags(transit: bool, cont: bool, csg: Stage, nsg: Stage) -> int:
    return (0x80 if transit else 0) | (0x40 if cont else 0) | (csg << 2) | (nsg if transit else 0)


def _parse_login_flags(flags: int) -> tuple[bool, bool, Stage, Stage]:
    transit, cont = bool(flags & 0x80), bool(flags & 0x40)
    csg = _enum(Stage, (flags >> 2) & 3, "login CSG")
    # NSG is reserved unless T is set (§11.12.3); treat it as 0 then.
    nsg = _enum(Stage, flags & 3, "login NSG") if transit else Stage.SECURITY
    return transit, cont, csg, nsg


_TEXT_REQUEST = struct.Struct(">BBHIQIIII16x")


@dataclass(slots=True, kw_only=True)
class TextRequest(PDU):
    """Text Request (§11.10): negotiation in Full Feature Phase, and SendTargets."""

    OPCODE: ClassVar[Opcode] = Opcode.TEXT_REQUEST
    immediate: bool = False
    final: bool = True
    cont: bool = False
    lun: int = 0
    itt: int = 0
    ttt: int = RESERVED_TAG
    cmd_sn: int = 0
    exp_stat_sn: int = 0

    def _pack(self, ahs_words: int, dsl: int) -> bytes:
        flags = (_F if self.final else 0) | (0x40 if self.cont else 0)
        return _TEXT_REQUEST.pack(
            self.OPCODE | (_I if self.immediate else 0), flags, 0, _len_word(ahs_words, dsl),
            self.lun, self.itt, self.ttt, self.cmd_sn, self.exp_stat_sn,
        )

    @classmethod
    def _unpack(cls, bhs: memoryview, ahs: tuple[AHS, ...], data: bytes) -> Self:
        b0, flags, _, _, lun, itt, ttt, cmd_sn, exp_stat_sn = _TEXT_REQUEST.unpack_from(bhs)
        return cls(immediate=bool(b0 & _I), final=bool(flags & _F), cont=bool(flags & 0x40),
                   lun=lun, itt=itt, ttt=ttt, cmd_sn=cmd_sn, exp_stat_sn=exp_stat_sn, data=data)


_DATA_OUT = struct.Struct(">BBHIQII4xI4xII4x")


@dataclass(slots=True, kw_only=True)
class DataOut(PDU):
    """SCSI Data-Out (§11.7): unsolicited data, or data solicited by an R2T."""

    OPCODE: ClassVar[Opcode] = Opcode.DATA_OUT
    final: bool = False
    lun: int = 0
    itt: int = 0
    ttt: int = RESERVED_TAG
    exp_stat_sn: int = 0
    data_sn: int = 0
    buffer_offset: int = 0

    def _pack(self, ahs_words: int, dsl: int) -> bytes:
        return _DATA_OUT.pack(
            self.OPCODE, _F if self.final else 0, 0, _len_word(ahs_words, dsl), self.lun,
            self.itt, self.ttt, self.exp_stat_sn, self.data_sn, self.buffer_offset,
        )

    @classmethod
    def _unpack(cls, bhs: memoryview, ahs: tuple[AHS, ...], data: bytes) -> Self:
        _, flags, _, _, lun, itt, ttt, exp_stat_sn, data_sn, offset = _DATA_OUT.unpack_from(bhs)
        return cls(final=bool(flags & _F), lun=lun, itt=itt, ttt=ttt, exp_stat_sn=exp_stat_sn,
                   data_sn=data_sn, buffer_offset=offset, data=data)


_LOGOUT_REQUEST = struct.Struct(">BBHI8xIH2xII16x")


@dataclass(slots=True, kw_only=True)
class LogoutRequest(PDU):
    """Logout Request (§11.14)."""

    OPCODE: ClassVar[Opcode] = Opcode.LOGOUT_REQUEST
    immediate: bool = False
    reason: LogoutReason = LogoutReason.CLOSE_SESSION
    itt: int = 0
    cid: int = 0
    cmd_sn: int = 0
    exp_stat_sn: int = 0

    def _pack(self, ahs_words: int, dsl: int) -> bytes:
        return _LOGOUT_REQUEST.pack(
            self.OPCODE | (_I if self.immediate else 0), _F | self.reason, 0,
            _len_word(ahs_words, dsl), self.itt, self.cid, self.cmd_sn, self.exp_stat_sn,
        )

    @classmethod
    def _unpack(cls, bhs: memoryview, ahs: tuple[AHS, ...], data: bytes) -> Self:
        b0, b1, _, _, itt, cid, cmd_sn, exp_stat_sn = _LOGOUT_REQUEST.unpack_from(bhs)
        return cls(immediate=bool(b0 & _I), reason=_enum(LogoutReason, b1 & 0x7F, "logout reason"),
                   itt=itt, cid=cid, cmd_sn=cmd_sn, exp_stat_sn=exp_stat_sn, data=data)


# Bytes 24-27 reserved, 28 ExpStatSN, 32-39 reserved, 40 BegRun, 44 RunLength (§11.16).
_SNACK_REQUEST = struct.Struct(">BBHIQII4xI8xII")


@dataclass(slots=True, kw_only=True)
class SnackRequest(PDU):
    """SNACK Request (§11.16). Only meaningful at ErrorRecoveryLevel > 0."""

    OPCODE: ClassVar[Opcode] = Opcode.SNACK_REQUEST
    type: SnackType = SnackType.DATA_R2T
    lun: int = 0
    itt: int = RESERVED_TAG
    ttt: int = RESERVED_TAG
    exp_stat_sn: int = 0
    beg_run: int = 0
    run_length: int = 0

    def _pack(self, ahs_words: int, dsl: int) -> bytes:
        return _SNACK_REQUEST.pack(
            self.OPCODE, _F | self.type, 0, _len_word(ahs_words, dsl), self.lun, self.itt,
            self.ttt, self.exp_stat_sn, self.beg_run, self.run_length,
        )

    @classmethod
    def _unpack(cls, bhs: memoryview, ahs: tuple[AHS, ...], data: bytes) -> Self:
        _, b1, _, _, lun, itt, ttt, exp_stat_sn, beg_run, run_length = \
            _SNACK_REQUEST.unpack_from(bhs)
        return cls(type=_enum(SnackType, b1 & 0x0F, "SNACK type"), lun=lun, itt=itt, ttt=ttt,
                   exp_stat_sn=exp_stat_sn, beg_run=beg_run, run_length=run_length, data=data)


# -- target -> initiator ----------------------------------------------------------------------

_NOP_IN = struct.Struct(">BBHIQIIIII12x")


@dataclass(slots=True, kw_only=True)
class NopIn(PDU):
    """NOP-In: the answer to our ping, or the target's own ping when TTT is set (§11.19)."""

    OPCODE: ClassVar[Opcode] = Opcode.NOP_IN
    lun: int = 0
    itt: int = RESERVED_TAG
    ttt: int = RESERVED_TAG
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0

    def _pack(self, ahs_words: int, dsl: int) -> bytes:
        return _NOP_IN.pack(
            self.OPCODE, _F, 0, _len_word(ahs_words, dsl), self.lun, self.itt, self.ttt,
            self.stat_sn, self.exp_cmd_sn, self.max_cmd_sn,
        )

    @classmethod
    def _unpack(cls, bhs: memoryview, ahs: tuple[AHS, ...], data: bytes) -> Self:
        _, _, _, _, lun, itt, ttt, stat_sn, exp_cmd_sn, max_cmd_sn = _NOP_IN.unpack_from(bhs)
        return cls(lun=lun, itt=itt, ttt=ttt, stat_sn=stat_sn, exp_cmd_sn=exp_cmd_sn,
                   max_cmd_sn=max_cmd_sn, data=data)


_SCSI_RESPONSE = struct.Struct(">BBBBI8xIIIIIIII")


@dataclass(slots=True, kw_only=True)
class ScsiResponse(PDU):
    """SCSI Response (§11.4). ``data`` is SenseLength + sense data + response data."""

    OPCODE: ClassVar[Opcode] = Opcode.SCSI_RESPONSE
    bidi_overflow: bool = False
    bidi_underflow: bool = False
    overflow: bool = False
    underflow: bool = False
    response: int = ServiceResponse.COMPLETED
    status: int = 0
    itt: int = 0
    snack_tag: int = 0
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0
    exp_data_sn: int = 0
    bidi_residual_count: int = 0
    residual_count: int = 0

    def _pack(self, ahs_words: int, dsl: int) -> bytes:
        flags = _F | (0x10 if self.bidi_overflow else 0) | (0x08 if self.bidi_underflow else 0) \
            | (0x04 if self.overflow else 0) | (0x02 if self.underflow else 0)
        return _SCSI_RESPONSE.pack(
            self.OPCODE, flags, self.response, self.status, _len_word(ahs_words, dsl), self.itt,
            self.snack_tag, self.stat_sn, self.exp_cmd_sn, self.max_cmd_sn, self.exp_data_sn,
            self.bidi_residual_count, self.residual_count,
        )

    @classmethod
    def _unpack(cls, bhs: memoryview, ahs: tuple[AHS, ...], data: bytes) -> Self:
        (_, flags, response, status, _, itt, snack_tag, stat_sn, exp_cmd_sn, max_cmd_sn,
         exp_data_sn, bidi_residual, residual) = _SCSI_RESPONSE.unpack_from(bhs)
        return cls(bidi_overflow=bool(flags & 0x10), bidi_underflow=bool(flags & 0x08),
                   overflow=bool(flags & 0x04), underflow=bool(flags & 0x02), response=response,
                   status=status, itt=itt, snack_tag=snack_tag, stat_sn=stat_sn,
                   exp_cmd_sn=exp_cmd_sn, max_cmd_sn=max_cmd_sn, exp_data_sn=exp_data_sn,
                   bidi_residual_count=bidi_residual, residual_count=residual, data=data)

    def sense(self) -> bytes:
        """The sense data of the data segment (§11.4.7.2), without its length prefix."""
        if len(self.data) < 2:
            return b""
        n = int.from_bytes(self.data[:2], "big")
        if n > len(self.data) - 2:
            raise PDUFormatError(
                f"SCSI Response declares {n} bytes of sense data but carries {len(self.data) - 2}"
            )
        return bytes(self.data[2 : 2 + n])


_TASK_MGMT_RESPONSE = struct.Struct(">BBBBI8xI4xIII12x")


@dataclass(slots=True, kw_only=True)
class TaskMgmtResponse(PDU):
    """Task Management Function Response (§11.6)."""

    OPCODE: ClassVar[Opcode] = Opcode.TASK_MGMT_RESPONSE
    response: int = TMResponse.COMPLETE
    itt: int = 0
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0

    def _pack(self, ahs_words: int, dsl: int) -> bytes:
        return _TASK_MGMT_RESPONSE.pack(
            self.OPCODE, _F, self.response, 0, _len_word(ahs_words, dsl), self.itt,
            self.stat_sn, self.exp_cmd_sn, self.max_cmd_sn,
        )

    @classmethod
    def _unpack(cls, bhs: memoryview, ahs: tuple[AHS, ...], data: bytes) -> Self:
        _, _, response, _, _, itt, stat_sn, exp_cmd_sn, max_cmd_sn = \
            _TASK_MGMT_RESPONSE.unpack_from(bhs)
        return cls(response=response, itt=itt, stat_sn=stat_sn, exp_cmd_sn=exp_cmd_sn,
                   max_cmd_sn=max_cmd_sn, data=data)


_LOGIN_RESPONSE = struct.Struct(">BBBBI6sHI4xIIIBB10x")


@dataclass(slots=True, kw_only=True)
class LoginResponse(_LoginPDU):
    """Login Response (§11.13)."""

    OPCODE: ClassVar[Opcode] = Opcode.LOGIN_RESPONSE
    version_active: int = 0
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0
    status_class: int = 0
    status_detail: int = 0

    def _pack(self, ahs_words: int, dsl: int) -> bytes:
        return _LOGIN_RESPONSE.pack(
            self.OPCODE, _login_flags(self.transit, self.cont, self.csg, self.nsg),
            self.version_max, self.version_active, _len_word(ahs_words, dsl),
            self.isid.to_bytes(6, "big"), self.tsih, self.itt, self.stat_sn, self.exp_cmd_sn,
            self.max_cmd_sn, self.status_class, self.status_detail,
        )

    @classmethod
    def _unpack(cls, bhs: memoryview, ahs: tuple[AHS, ...], data: bytes) -> Self:
        (_, flags, vmax, vactive, _, isid, tsih, itt, stat_sn, exp_cmd_sn, max_cmd_sn,
         status_class, status_detail) = _LOGIN_RESPONSE.unpack_from(bhs)
        transit, cont, csg, nsg = _parse_login_flags(flags)
        return cls(transit=transit, cont=cont, csg=csg, nsg=nsg, version_max=vmax,
                   version_active=vactive, isid=int.from_bytes(isid, "big"), tsih=tsih, itt=itt,
                   stat_sn=stat_sn, exp_cmd_sn=exp_cmd_sn, max_cmd_sn=max_cmd_sn,
                   status_class=status_class, status_detail=status_detail, data=data)


_TEXT_RESPONSE = struct.Struct(">BBHIQIIIII12x")


@dataclass(slots=True, kw_only=True)
class TextResponse(PDU):
    """Text Response (§11.11)."""

    OPCODE: ClassVar[Opcode] = Opcode.TEXT_RESPONSE
    final: bool = True
    cont: bool = False
    lun: int = 0
    itt: int = 0
    ttt: int = RESERVED_TAG
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0

    def _pack(self, ahs_words: int, dsl: int) -> bytes:
        flags = (_F if self.final else 0) | (0x40 if self.cont else 0)
        return _TEXT_RESPONSE.pack(
            self.OPCODE, flags, 0, _len_word(ahs_words, dsl), self.lun, self.itt, self.ttt,
            self.stat_sn, self.exp_cmd_sn, self.max_cmd_sn,
        )

    @classmethod
    def _unpack(cls, bhs: memoryview, ahs: tuple[AHS, ...], data: bytes) -> Self:
        _, flags, _, _, lun, itt, ttt, stat_sn, exp_cmd_sn, max_cmd_sn = \
            _TEXT_RESPONSE.unpack_from(bhs)
        return cls(final=bool(flags & _F), cont=bool(flags & 0x40), lun=lun, itt=itt, ttt=ttt,
                   stat_sn=stat_sn, exp_cmd_sn=exp_cmd_sn, max_cmd_sn=max_cmd_sn, data=data)


_DATA_IN = struct.Struct(">BBBBIQIIIIIIII")


@dataclass(slots=True, kw_only=True)
class DataIn(PDU):
    """SCSI Data-In (§11.7), possibly carrying the command's status (S bit, phase collapse).

    ``placed`` is not on the wire: it counts the payload bytes that
    :class:`~initiator.reader.PDUReader` received straight into the command's own buffers (then
    ``data`` is empty).
    """

    OPCODE: ClassVar[Opcode] = Opcode.DATA_IN
    final: bool = False
    ack: bool = False
    overflow: bool = False
    underflow: bool = False
    status_present: bool = False
    status: int = 0
    lun: int = 0
    itt: int = 0
    ttt: int = RESERVED_TAG
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0
    data_sn: int = 0
    buffer_offset: int = 0
    residual_count: int = 0
    placed: int = field(default=0, compare=False)

    def _pack(self, ahs_words: int, dsl: int) -> bytes:
        flags = (_F if self.final else 0) | (0x40 if self.ack else 0) \
            | (0x04 if self.overflow else 0) | (0x02 if self.underflow else 0) \
            | (0x01 if self.status_present else 0)
        return _DATA_IN.pack(
            self.OPCODE, flags, 0, self.status, _len_word(ahs_words, dsl), self.lun, self.itt,
            self.ttt, self.stat_sn, self.exp_cmd_sn, self.max_cmd_sn, self.data_sn,
            self.buffer_offset, self.residual_count,
        )

    @classmethod
    def _unpack(cls, bhs: memoryview, ahs: tuple[AHS, ...], data: bytes) -> Self:
        (_, flags, _, status, _, lun, itt, ttt, stat_sn, exp_cmd_sn, max_cmd_sn, data_sn,
         offset, residual) = _DATA_IN.unpack_from(bhs)
        return cls(final=bool(flags & _F), ack=bool(flags & 0x40), overflow=bool(flags & 0x04),
                   underflow=bool(flags & 0x02), status_present=bool(flags & 0x01),
                   status=status, lun=lun, itt=itt, ttt=ttt, stat_sn=stat_sn,
                   exp_cmd_sn=exp_cmd_sn, max_cmd_sn=max_cmd_sn, data_sn=data_sn,
                   buffer_offset=offset, residual_count=residual, data=data)


_LOGOUT_RESPONSE = struct.Struct(">BBBBI8xI4xIII4xHH4x")


@dataclass(slots=True, kw_only=True)
class LogoutResponse(PDU):
    """Logout Response (§11.15)."""

    OPCODE: ClassVar[Opcode] = Opcode.LOGOUT_RESPONSE
    response: int = LogoutResponseCode.CLOSED
    itt: int = 0
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0
    time2wait: int = 0
    time2retain: int = 0

    def _pack(self, ahs_words: int, dsl: int) -> bytes:
        return _LOGOUT_RESPONSE.pack(
            self.OPCODE, _F, self.response, 0, _len_word(ahs_words, dsl), self.itt,
            self.stat_sn, self.exp_cmd_sn, self.max_cmd_sn, self.time2wait, self.time2retain,
        )

    @classmethod
    def _unpack(cls, bhs: memoryview, ahs: tuple[AHS, ...], data: bytes) -> Self:
        _, _, response, _, _, itt, stat_sn, exp_cmd_sn, max_cmd_sn, t2w, t2r = \
            _LOGOUT_RESPONSE.unpack_from(bhs)
        return cls(response=response, itt=itt, stat_sn=stat_sn, exp_cmd_sn=exp_cmd_sn,
                   max_cmd_sn=max_cmd_sn, time2wait=t2w, time2retain=t2r, data=data)


_R2T = struct.Struct(">BBHIQIIIIIIII")


@dataclass(slots=True, kw_only=True)
class R2T(PDU):
    """Ready To Transfer (§11.8): the target asks for a range of a write's data."""

    OPCODE: ClassVar[Opcode] = Opcode.R2T
    lun: int = 0
    itt: int = 0
    ttt: int = 0
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0
    r2t_sn: int = 0
    buffer_offset: int = 0
    desired_data_transfer_length: int = 0

    def _pack(self, ahs_words: int, dsl: int) -> bytes:
        return _R2T.pack(
            self.OPCODE, _F, 0, _len_word(ahs_words, dsl), self.lun, self.itt, self.ttt,
            self.stat_sn, self.exp_cmd_sn, self.max_cmd_sn, self.r2t_sn, self.buffer_offset,
            self.desired_data_transfer_length,
        )

    @classmethod
    def _unpack(cls, bhs: memoryview, ahs: tuple[AHS, ...], data: bytes) -> Self:
        (_, _, _, _, lun, itt, ttt, stat_sn, exp_cmd_sn, max_cmd_sn, r2t_sn, offset,
         ddtl) = _R2T.unpack_from(bhs)
        return cls(lun=lun, itt=itt, ttt=ttt, stat_sn=stat_sn, exp_cmd_sn=exp_cmd_sn,
                   max_cmd_sn=max_cmd_sn, r2t_sn=r2t_sn, buffer_offset=offset,
                   desired_data_transfer_length=ddtl, data=data)


_ASYNC_MESSAGE = struct.Struct(">BBHIQI4xIIIBBHHH4x")


@dataclass(slots=True, kw_only=True)
class AsyncMessage(PDU):
    """Asynchronous Message (§11.9). ``data`` is SenseLength + sense + iSCSI event data."""

    OPCODE: ClassVar[Opcode] = Opcode.ASYNC_MESSAGE
    lun: int = 0
    itt: int = RESERVED_TAG
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0
    async_event: int = AsyncEvent.SCSI_ASYNC_EVENT
    async_vcode: int = 0
    parameter1: int = 0
    parameter2: int = 0
    parameter3: int = 0

    def _pack(self, ahs_words: int, dsl: int) -> bytes:
        return _ASYNC_MESSAGE.pack(
            self.OPCODE, _F, 0, _len_word(ahs_words, dsl), self.lun, self.itt, self.stat_sn,
            self.exp_cmd_sn, self.max_cmd_sn, self.async_event, self.async_vcode,
            self.parameter1, self.parameter2, self.parameter3,
        )

    @classmethod
    def _unpack(cls, bhs: memoryview, ahs: tuple[AHS, ...], data: bytes) -> Self:
        (_, _, _, _, lun, itt, stat_sn, exp_cmd_sn, max_cmd_sn, event, vcode, p1, p2,
         p3) = _ASYNC_MESSAGE.unpack_from(bhs)
        return cls(lun=lun, itt=itt, stat_sn=stat_sn, exp_cmd_sn=exp_cmd_sn,
                   max_cmd_sn=max_cmd_sn, async_event=event, async_vcode=vcode, parameter1=p1,
                   parameter2=p2, parameter3=p3, data=data)

    def sense(self) -> bytes:
        """The SCSI sense data of a SCSI Async Event (§11.9.4)."""
        if len(self.data) < 2:
            return b""
        n = int.from_bytes(self.data[:2], "big")
        return bytes(self.data[2 : 2 + n])


_REJECT = struct.Struct(">BBBBI8xI4xIIII8x")


@dataclass(slots=True, kw_only=True)
class Reject(PDU):
    """Reject (§11.17). ``data`` is the complete header of the rejected PDU."""

    OPCODE: ClassVar[Opcode] = Opcode.REJECT
    reason: int = RejectReason.PROTOCOL_ERROR
    itt: int = RESERVED_TAG
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0
    data_sn: int = 0

    def _pack(self, ahs_words: int, dsl: int) -> bytes:
        return _REJECT.pack(
            self.OPCODE, _F, self.reason, 0, _len_word(ahs_words, dsl), self.itt, self.stat_sn,
            self.exp_cmd_sn, self.max_cmd_sn, self.data_sn,
        )

    @classmethod
    def _unpack(cls, bhs: memoryview, ahs: tuple[AHS, ...], data: bytes) -> Self:
        _, _, reason, _, _, itt, stat_sn, exp_cmd_sn, max_cmd_sn, data_sn = \
            _REJECT.unpack_from(bhs)
        return cls(reason=reason, itt=itt, stat_sn=stat_sn, exp_cmd_sn=exp_cmd_sn,
                   max_cmd_sn=max_cmd_sn, data_sn=data_sn, data=data)

    def rejected_header(self) -> PDU | None:
        """The rejected PDU's BHS decoded, or None when the target sent too little of it."""
        if len(self.data) < BHS_LEN:
            return None
        try:
            return decode_bhs(memoryview(bytes(self.data[:BHS_LEN])))
        except PDUFormatError:
            return None


PDU_CLASSES: dict[int, type[PDU]] = {
    cls.OPCODE: cls
    for cls in (NopOut, ScsiCommand, TaskMgmtRequest, LoginRequest, TextRequest, DataOut,
                LogoutRequest, SnackRequest, NopIn, ScsiResponse, TaskMgmtResponse,
                LoginResponse, TextResponse, DataIn, LogoutResponse, R2T, AsyncMessage, Reject)
}
"""The opcode registry: every opcode of RFC 7143 maps to its class."""


_E = TypeVar("_E", bound=enum.IntEnum)


def _enum(kind: type[_E], value: int, what: str) -> _E:
    try:
        return kind(value)
    except ValueError:
        raise PDUFormatError(f"unknown {what} {value}") from None


# --------------------------------------------------------------------------------------------
# Encoding


def frame(
    pdu: PDU,
    data: Sequence[Buffer] | None = None,
    *,
    header_digest: bool = False,
    data_digest: bool = False,
) -> list[Buffer]:
    """The wire form of ``pdu`` as a list of buffers for ``sendmsg``.

    ``data`` overrides ``pdu.data`` with a scatter/gather list that is passed through without
    copying; the first element returned holds BHS, AHS and header digest, the last (when there
    is data) its padding and data digest.
    """
    parts: Sequence[Buffer] = (pdu.data,) if data is None else data
    dsl = 0
    for part in parts:
        dsl += _nbytes(part)
    if dsl > MAX_DATA_SEGMENT_LENGTH:
        raise LocalProtocolError(f"a data segment of {dsl} bytes does not fit in one PDU")
    ahs = pdu.ahs_bytes()
    return frame_header(pdu._pack(len(ahs) >> 2, dsl) + ahs, parts, dsl,
                        header_digest=header_digest, data_digest=data_digest)


def frame_header(
    header: bytes,
    parts: Sequence[Buffer],
    dsl: int,
    *,
    header_digest: bool = False,
    data_digest: bool = False,
) -> list[Buffer]:
    """Frame an already packed BHS (+AHS) with its ``dsl`` bytes of data ``parts``.

    The hot path of :mod:`initiator.session` packs SCSI Command headers itself
    (:func:`pack_scsi_command`) and frames them here, skipping the PDU object.
    """
    if header_digest:
        header += _digest.pack_digest(_digest.crc32c(header))
    if not dsl:
        return [header]
    out: list[Buffer] = [header]
    out.extend(part for part in parts if _nbytes(part))
    pad = _PAD[dsl & 3]
    if data_digest:
        value = _digest.crc32c_of(parts)
        if pad:
            value = _digest.crc32c(pad, value)
        out.append(pad + _digest.pack_digest(value))
    elif pad:
        out.append(pad)
    return out


def pack_digest(header: bytes) -> bytes:
    """The 4-byte CRC32C header digest of a packed header (§7.8)."""
    return _digest.pack_digest(_digest.crc32c(header))


def pack_scsi_command(flags: int, dsl: int, lun: int, itt: int, edtl: int, cmd_sn: int,
                      exp_stat_sn: int, cdb: bytes) -> bytes:
    """The 48-byte BHS of a SCSI Command with a CDB of at most 16 bytes and no AHS (§11.3),
    without building a :class:`ScsiCommand`: the per-command hot path."""
    return _SCSI_COMMAND.pack(SCSI_COMMAND_OPCODE, flags, 0, dsl, lun, itt, edtl, cmd_sn,
                              exp_stat_sn, cdb)


SCSI_COMMAND_OPCODE = int(Opcode.SCSI_COMMAND)

SCSI_COMMAND_BHS = _SCSI_COMMAND
"""The ``struct`` behind :func:`pack_scsi_command`, for the one caller that packs a header per
command and saves the Python call by packing itself (:mod:`initiator.session`). Its fields:
opcode (:data:`SCSI_COMMAND_OPCODE`), flags, 0, the TotalAHSLength/DataSegmentLength word, LUN,
ITT, expected data transfer length, CmdSN, ExpStatSN, and the CDB of at most 16 bytes, which
the struct pads with zeros."""

DATA_OUT_OPCODE = int(Opcode.DATA_OUT)

DATA_OUT_BHS = _DATA_OUT
"""The ``struct`` behind :class:`DataOut`, for the one caller that packs a header per Data-Out
PDU (:mod:`initiator.session`, several per write). Its fields: opcode
(:data:`DATA_OUT_OPCODE`), flags (F = 0x80), 0, the TotalAHSLength/DataSegmentLength word,
LUN, ITT, TTT, ExpStatSN, DataSN, Buffer Offset."""


def encode(pdu: PDU, *, header_digest: bool = False, data_digest: bool = False) -> bytes:
    """The whole PDU as one ``bytes`` (control PDUs, tests)."""
    return b"".join(frame(pdu, header_digest=header_digest, data_digest=data_digest))


# --------------------------------------------------------------------------------------------
# Decoding


def decode_bhs(bhs: memoryview, ahs: tuple[AHS, ...] = (), data: bytes = b"") -> PDU:
    """Decode a 48-byte BHS (plus its parsed AHS and data) into its PDU class."""
    opcode = bhs[0] & 0x3F
    cls = PDU_CLASSES.get(opcode)
    if cls is None:
        raise PDUFormatError(f"unknown PDU opcode 0x{opcode:02x}")
    try:
        return cls._unpack(bhs, ahs, data)
    except struct.error as exc:  # pragma: no cover - lengths are checked by the callers
        raise PDUFormatError(f"malformed {cls.__name__} header: {exc}") from None


def decode(
    raw: Buffer, *, header_digest: bool = False, data_digest: bool = False
) -> tuple[PDU, int]:
    """Decode one complete PDU from the start of ``raw``; returns it and the bytes used."""
    view = memoryview(raw)
    total = pdu_length(view, header_digest=header_digest, data_digest=data_digest)
    if len(view) < total:
        raise PDUFormatError(f"truncated PDU: {len(view)} bytes of a {total}-byte PDU")
    from initiator.reader import PDUReader  # the reader imports this module

    reader = PDUReader(header_digest=header_digest, data_digest=data_digest,
                       max_data_segment_length=MAX_DATA_SEGMENT_LENGTH, buffer_size=total)
    return reader.feed(view[:total])[0], total


def pdu_length(raw: Buffer, *, header_digest: bool = False, data_digest: bool = False) -> int:
    """The wire length of the PDU whose BHS starts ``raw`` (padding and digests included)."""
    if len(raw) < BHS_LEN:
        raise PDUFormatError(f"truncated PDU: {len(raw)} bytes, a BHS takes {BHS_LEN}")
    dsl = int.from_bytes(raw[5:8], "big")
    total = BHS_LEN + raw[4] * 4 + dsl + pad_len(dsl)
    if header_digest:
        total += DIGEST_LEN
    if data_digest and dsl:
        total += DIGEST_LEN
    return total


__all__ = [
    "AHS", "BHS_LEN", "PDU", "PDU_CLASSES", "R2T", "RESERVED_TAG", "AHSType", "AsyncEvent",
    "AsyncMessage", "DataIn", "DataOut", "DigestError", "LoginRequest",
    "LoginResponse", "LogoutReason", "LogoutRequest", "LogoutResponse", "LogoutResponseCode",
    "NopIn", "NopOut", "Opcode", "Reject", "RejectReason", "ScsiCommand",
    "ScsiResponse", "ServiceResponse", "SnackRequest", "SnackType", "Stage", "TMFunction",
    "TMResponse", "TaskAttribute", "TaskMgmtRequest", "TaskMgmtResponse", "TextRequest",
    "TextResponse", "decode", "decode_bhs", "encode", "frame", "lun_from_wire", "lun_to_wire",
    "pad_len", "pdu_length",
]
