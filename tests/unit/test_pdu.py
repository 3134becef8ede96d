"""PDU codec (RFC 7143 §11): byte-exact vectors, round trips, AHS, flags, framing.

The vectors are laid out here field by field from the figures of RFC 7143 §11 with ``struct``,
never by calling the PDU classes, so a wrong offset in ``initiator.pdu`` cannot hide behind the
same wrong offset in the test.
"""

from __future__ import annotations

import array
import dataclasses
import itertools
import struct
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from initiator import digest, pdu
from initiator.errors import LocalProtocolError, PDUFormatError
from initiator.pdu import (
    PDU,
    PDU_CLASSES,
    R2T,
    AHSType,
    AsyncEvent,
    AsyncMessage,
    DataIn,
    DataOut,
    LoginRequest,
    LoginResponse,
    LogoutReason,
    LogoutRequest,
    LogoutResponse,
    LogoutResponseCode,
    NopIn,
    NopOut,
    Opcode,
    Reject,
    RejectReason,
    ScsiCommand,
    ScsiResponse,
    SnackRequest,
    SnackType,
    Stage,
    TaskAttribute,
    TaskMgmtRequest,
    TaskMgmtResponse,
    TextRequest,
    TextResponse,
    TMFunction,
    TMResponse,
)
from initiator.reader import PDUReader

BHS = 48

# --------------------------------------------------------------------------------------------
# Helpers that do not use the code under test


def layout(*fields: tuple[int, str, int | bytes]) -> bytes:
    """A 48-byte BHS: each ``(offset, struct format, value)`` packed big-endian, the rest zero
    (reserved). Overlapping fields are a mistake in the test and fail loudly."""
    buf = bytearray(BHS)
    used = [False] * BHS
    for offset, fmt, value in fields:
        size = struct.calcsize(">" + fmt)
        assert offset + size <= BHS, f"field at {offset} runs past the BHS"
        assert not any(used[offset : offset + size]), f"overlapping field at byte {offset}"
        used[offset : offset + size] = [True] * size
        struct.pack_into(">" + fmt, buf, offset, value)
    return bytes(buf)


def u24(n: int) -> bytes:
    """DataSegmentLength, bytes 5-7."""
    return n.to_bytes(3, "big")


def zero_pad(n: int) -> bytes:
    return bytes(-n % 4)


def crc(data: bytes) -> bytes:
    # digest.crc32c itself is checked against the RFC 3720 B.4 vectors in test_digest.py.
    return digest.crc32c(data).to_bytes(4, "little")


def wire_form(header: bytes, data: bytes, *, hd: bool, dd: bool) -> bytes:
    """The PDU on the wire, assembled independently: header (BHS + AHS), header digest, data,
    padding, data digest over data and padding (§11.1, §7.8)."""
    out = header
    if hd:
        out += crc(header)
    if data:
        padded = data + zero_pad(len(data))
        out += padded
        if dd:
            out += crc(padded)
    return out


def expected_after_decode(p: PDU) -> PDU:
    """What decoding ``p``'s wire form gives back: the data as bytes, a short CDB padded to the
    16 bytes of the BHS field, NSG as 0 when T is clear (it is reserved then, §11.12.3)."""
    p = dataclasses.replace(p, data=bytes(p.data))
    if isinstance(p, ScsiCommand) and len(p.cdb) < 16:
        p = dataclasses.replace(p, cdb=p.cdb.ljust(16, b"\0"))
    if isinstance(p, LoginRequest | LoginResponse) and not p.transit:
        p = dataclasses.replace(p, nsg=Stage.SECURITY)
    return p


# --------------------------------------------------------------------------------------------
# Byte-exact vectors, one per opcode (RFC 7143 §11). Distinct values per field, so that a field
# at the wrong offset shows.

LUN = 0x0102030405060708
ITT = 0x11121314
TTT = 0x21222324
CMDSN = 0x31323334
EXPSTATSN = 0x41424344
STATSN = 0x51525354
EXPCMDSN = 0x61626364
MAXCMDSN = 0x71727374
DATASN = 0x81828384
OFFSET = 0x91929394
RESID = 0xA1A2A3A4
BIDIRESID = 0xB1B2B3B4
EDTL = 0xC1C2C3C4
REFTASK = 0xD1D2D3D4
REFCMDSN = 0xE1E2E3E4
EXPDATASN = 0xF1F2F3F4
SNACKTAG = 0x0A0B0C0D
BEGRUN = 0x1A1B1C1D
RUNLENGTH = 0x2A2B2C2D
R2TSN = 0x3A3B3C3D
DDTL = 0x4A4B4C4D
ISID = 0x80_1234_5678_9A
TSIH = 0x5A5B
CID = 0x6A6B
CDB16 = bytes(range(0x28, 0x38))
READ_CAPACITY_SENSE = b"\x00\x12" + bytes.fromhex("7000050000000a000000002400000000") + b"\x00\x00"


def _vectors() -> list[tuple[PDU, bytes, bytes]]:
    """(PDU object, its 48-byte BHS laid out by hand, its data segment)."""
    v: list[tuple[PDU, bytes, bytes]] = []

    # §11.18 NOP-Out
    data = b"ping"
    v.append((
        NopOut(immediate=True, lun=LUN, itt=ITT, ttt=TTT, cmd_sn=CMDSN, exp_stat_sn=EXPSTATSN,
               data=data),
        layout((0, "B", 0x40 | 0x00), (1, "B", 0x80), (4, "B", 0), (5, "3s", u24(len(data))),
               (8, "Q", LUN), (16, "I", ITT), (20, "I", TTT), (24, "I", CMDSN),
               (28, "I", EXPSTATSN)),
        data,
    ))

    # §11.3 SCSI Command: F, R, ATTR=ordered; immediate data
    data = b"immediate"
    v.append((
        ScsiCommand(immediate=False, final=True, read=True, write=False,
                    attr=TaskAttribute.ORDERED, lun=LUN, itt=ITT,
                    expected_data_transfer_length=EDTL, cmd_sn=CMDSN, exp_stat_sn=EXPSTATSN,
                    cdb=CDB16, data=data),
        layout((0, "B", 0x01), (1, "B", 0x80 | 0x40 | 0x02), (4, "B", 0),
               (5, "3s", u24(len(data))), (8, "Q", LUN), (16, "I", ITT), (20, "I", EDTL),
               (24, "I", CMDSN), (28, "I", EXPSTATSN), (32, "16s", CDB16)),
        data,
    ))

    # §11.5 Task Management Function Request
    v.append((
        TaskMgmtRequest(immediate=True, function=TMFunction.LOGICAL_UNIT_RESET, lun=LUN, itt=ITT,
                        referenced_task_tag=REFTASK, cmd_sn=CMDSN, exp_stat_sn=EXPSTATSN,
                        ref_cmd_sn=REFCMDSN, exp_data_sn=EXPDATASN),
        layout((0, "B", 0x40 | 0x02), (1, "B", 0x80 | 5), (8, "Q", LUN), (16, "I", ITT),
               (20, "I", REFTASK), (24, "I", CMDSN), (28, "I", EXPSTATSN), (32, "I", REFCMDSN),
               (36, "I", EXPDATASN)),
        b"",
    ))

    # §11.12 Login Request: T, CSG=1, NSG=3
    data = b"InitiatorName=iqn.2024-01.test:init\0SessionType=Normal\0"
    v.append((
        LoginRequest(transit=True, cont=False, csg=Stage.OPERATIONAL,
                     nsg=Stage.FULL_FEATURE, version_max=0x02, version_min=0x01, isid=ISID,
                     tsih=TSIH, itt=ITT, cid=CID, cmd_sn=CMDSN, exp_stat_sn=EXPSTATSN, data=data),
        layout((0, "B", 0x40 | 0x03), (1, "B", 0x80 | (1 << 2) | 3), (2, "B", 0x02),
               (3, "B", 0x01), (5, "3s", u24(len(data))), (8, "6s", ISID.to_bytes(6, "big")),
               (14, "H", TSIH), (16, "I", ITT), (20, "H", CID), (24, "I", CMDSN),
               (28, "I", EXPSTATSN)),
        data,
    ))

    # §11.10 Text Request: C set, F clear
    data = b"SendTargets=All\0"
    v.append((
        TextRequest(immediate=False, final=False, cont=True, lun=LUN, itt=ITT, ttt=TTT,
                    cmd_sn=CMDSN, exp_stat_sn=EXPSTATSN, data=data),
        layout((0, "B", 0x04), (1, "B", 0x40), (5, "3s", u24(len(data))), (8, "Q", LUN),
               (16, "I", ITT), (20, "I", TTT), (24, "I", CMDSN), (28, "I", EXPSTATSN)),
        data,
    ))

    # §11.7.1 SCSI Data-Out
    data = bytes(range(13))
    v.append((
        DataOut(final=True, lun=LUN, itt=ITT, ttt=TTT, exp_stat_sn=EXPSTATSN, data_sn=DATASN,
                buffer_offset=OFFSET, data=data),
        layout((0, "B", 0x05), (1, "B", 0x80), (5, "3s", u24(len(data))), (8, "Q", LUN),
               (16, "I", ITT), (20, "I", TTT), (28, "I", EXPSTATSN), (36, "I", DATASN),
               (40, "I", OFFSET)),
        data,
    ))

    # §11.14 Logout Request
    v.append((
        LogoutRequest(immediate=True, reason=LogoutReason.CLOSE_CONNECTION, itt=ITT, cid=CID,
                      cmd_sn=CMDSN, exp_stat_sn=EXPSTATSN),
        layout((0, "B", 0x40 | 0x06), (1, "B", 0x80 | 1), (16, "I", ITT), (20, "H", CID),
               (24, "I", CMDSN), (28, "I", EXPSTATSN)),
        b"",
    ))

    # §11.16 SNACK Request: bytes 24-27 and 32-39 reserved, BegRun at 40, RunLength at 44
    v.append((
        SnackRequest(type=SnackType.R_DATA, lun=LUN, itt=ITT, ttt=TTT, exp_stat_sn=EXPSTATSN,
                     beg_run=BEGRUN, run_length=RUNLENGTH),
        layout((0, "B", 0x10), (1, "B", 0x80 | 3), (8, "Q", LUN), (16, "I", ITT),
               (20, "I", TTT), (28, "I", EXPSTATSN), (40, "I", BEGRUN), (44, "I", RUNLENGTH)),
        b"",
    ))

    # §11.19 NOP-In
    data = b"pong!"
    v.append((
        NopIn(lun=LUN, itt=ITT, ttt=TTT, stat_sn=STATSN, exp_cmd_sn=EXPCMDSN,
              max_cmd_sn=MAXCMDSN, data=data),
        layout((0, "B", 0x20), (1, "B", 0x80), (5, "3s", u24(len(data))), (8, "Q", LUN),
               (16, "I", ITT), (20, "I", TTT), (24, "I", STATSN), (28, "I", EXPCMDSN),
               (32, "I", MAXCMDSN)),
        data,
    ))

    # §11.4 SCSI Response: u and U set, CHECK CONDITION with sense data
    data = READ_CAPACITY_SENSE
    v.append((
        ScsiResponse(bidi_overflow=False, bidi_underflow=True, overflow=False, underflow=True,
                     response=0x00, status=0x02, itt=ITT, snack_tag=SNACKTAG, stat_sn=STATSN,
                     exp_cmd_sn=EXPCMDSN, max_cmd_sn=MAXCMDSN, exp_data_sn=EXPDATASN,
                     bidi_residual_count=BIDIRESID, residual_count=RESID, data=data),
        layout((0, "B", 0x21), (1, "B", 0x80 | 0x08 | 0x02), (2, "B", 0x00), (3, "B", 0x02),
               (5, "3s", u24(len(data))), (16, "I", ITT), (20, "I", SNACKTAG),
               (24, "I", STATSN), (28, "I", EXPCMDSN), (32, "I", MAXCMDSN),
               (36, "I", EXPDATASN), (40, "I", BIDIRESID), (44, "I", RESID)),
        data,
    ))

    # §11.6 Task Management Function Response
    v.append((
        TaskMgmtResponse(response=TMResponse.TASK_DOES_NOT_EXIST, itt=ITT, stat_sn=STATSN,
                         exp_cmd_sn=EXPCMDSN, max_cmd_sn=MAXCMDSN),
        layout((0, "B", 0x22), (1, "B", 0x80), (2, "B", 1), (16, "I", ITT), (24, "I", STATSN),
               (28, "I", EXPCMDSN), (32, "I", MAXCMDSN)),
        b"",
    ))

    # §11.13 Login Response: T, CSG=0, NSG=1, a status class and detail
    data = b"TargetPortalGroupTag=1\0"
    v.append((
        LoginResponse(transit=True, cont=False, csg=Stage.SECURITY,
                      nsg=Stage.OPERATIONAL, version_max=0x03,
                      version_active=0x01, isid=ISID, tsih=TSIH, itt=ITT, stat_sn=STATSN,
                      exp_cmd_sn=EXPCMDSN, max_cmd_sn=MAXCMDSN, status_class=0x02,
                      status_detail=0x05, data=data),
        layout((0, "B", 0x23), (1, "B", 0x80 | (0 << 2) | 1), (2, "B", 0x03), (3, "B", 0x01),
               (5, "3s", u24(len(data))), (8, "6s", ISID.to_bytes(6, "big")), (14, "H", TSIH),
               (16, "I", ITT), (24, "I", STATSN), (28, "I", EXPCMDSN), (32, "I", MAXCMDSN),
               (36, "B", 0x02), (37, "B", 0x05)),
        data,
    ))

    # §11.11 Text Response
    data = b"TargetName=iqn.2024-01.test:target\0TargetAddress=127.0.0.1:3260,1\0"
    v.append((
        TextResponse(final=True, cont=False, lun=LUN, itt=ITT, ttt=TTT, stat_sn=STATSN,
                     exp_cmd_sn=EXPCMDSN, max_cmd_sn=MAXCMDSN, data=data),
        layout((0, "B", 0x24), (1, "B", 0x80), (5, "3s", u24(len(data))), (8, "Q", LUN),
               (16, "I", ITT), (20, "I", TTT), (24, "I", STATSN), (28, "I", EXPCMDSN),
               (32, "I", MAXCMDSN)),
        data,
    ))

    # §11.7.2 SCSI Data-In: F, U, S with a status
    data = bytes(range(7))
    v.append((
        DataIn(final=True, ack=False, overflow=False, underflow=True, status_present=True,
               status=0x18, lun=LUN, itt=ITT, ttt=TTT, stat_sn=STATSN, exp_cmd_sn=EXPCMDSN,
               max_cmd_sn=MAXCMDSN, data_sn=DATASN, buffer_offset=OFFSET, residual_count=RESID,
               data=data),
        layout((0, "B", 0x25), (1, "B", 0x80 | 0x02 | 0x01), (3, "B", 0x18),
               (5, "3s", u24(len(data))), (8, "Q", LUN), (16, "I", ITT), (20, "I", TTT),
               (24, "I", STATSN), (28, "I", EXPCMDSN), (32, "I", MAXCMDSN), (36, "I", DATASN),
               (40, "I", OFFSET), (44, "I", RESID)),
        data,
    ))

    # §11.15 Logout Response
    v.append((
        LogoutResponse(response=LogoutResponseCode.CID_NOT_FOUND, itt=ITT, stat_sn=STATSN,
                       exp_cmd_sn=EXPCMDSN, max_cmd_sn=MAXCMDSN, time2wait=0x0A0B,
                       time2retain=0x0C0D),
        layout((0, "B", 0x26), (1, "B", 0x80), (2, "B", 1), (16, "I", ITT), (24, "I", STATSN),
               (28, "I", EXPCMDSN), (32, "I", MAXCMDSN), (40, "H", 0x0A0B), (42, "H", 0x0C0D)),
        b"",
    ))

    # §11.8 Ready To Transfer
    v.append((
        R2T(lun=LUN, itt=ITT, ttt=TTT, stat_sn=STATSN, exp_cmd_sn=EXPCMDSN, max_cmd_sn=MAXCMDSN,
            r2t_sn=R2TSN, buffer_offset=OFFSET, desired_data_transfer_length=DDTL),
        layout((0, "B", 0x31), (1, "B", 0x80), (8, "Q", LUN), (16, "I", ITT), (20, "I", TTT),
               (24, "I", STATSN), (28, "I", EXPCMDSN), (32, "I", MAXCMDSN), (36, "I", R2TSN),
               (40, "I", OFFSET), (44, "I", DDTL)),
        b"",
    ))

    # §11.9 Asynchronous Message
    data = b"\x00\x00"
    v.append((
        AsyncMessage(lun=LUN, itt=0xFFFFFFFF, stat_sn=STATSN, exp_cmd_sn=EXPCMDSN,
                     max_cmd_sn=MAXCMDSN, async_event=AsyncEvent.LOGOUT_REQUEST,
                     async_vcode=0x77, parameter1=0xB1B2, parameter2=0xC1C2, parameter3=0xD1D2,
                     data=data),
        layout((0, "B", 0x32), (1, "B", 0x80), (5, "3s", u24(len(data))), (8, "Q", LUN),
               (16, "I", 0xFFFFFFFF), (24, "I", STATSN), (28, "I", EXPCMDSN),
               (32, "I", MAXCMDSN), (36, "B", 1), (37, "B", 0x77), (38, "H", 0xB1B2),
               (40, "H", 0xC1C2), (42, "H", 0xD1D2)),
        data,
    ))

    # §11.17 Reject, carrying the rejected PDU's header
    rejected = v[0][1]
    v.append((
        Reject(reason=RejectReason.PROTOCOL_ERROR, itt=0xFFFFFFFF, stat_sn=STATSN,
               exp_cmd_sn=EXPCMDSN, max_cmd_sn=MAXCMDSN, data_sn=DATASN, data=rejected),
        layout((0, "B", 0x3F), (1, "B", 0x80), (2, "B", 0x04), (5, "3s", u24(BHS)),
               (16, "I", 0xFFFFFFFF), (24, "I", STATSN), (28, "I", EXPCMDSN),
               (32, "I", MAXCMDSN), (36, "I", DATASN)),
        rejected,
    ))
    return v


VECTORS = _vectors()
VECTOR_IDS = [type(p).__name__ for p, _, _ in VECTORS]
DIGESTS = [(False, False), (True, False), (False, True), (True, True)]
DIGEST_IDS = ["plain", "hd", "dd", "hd+dd"]


def test_registry_covers_every_opcode() -> None:
    assert set(PDU_CLASSES) == set(Opcode)
    for opcode, cls in PDU_CLASSES.items():
        assert opcode == cls.OPCODE
    # Initiator opcodes are below 0x20, target opcodes above (§11.2.1.2).
    assert all(op < 0x20 for op in (Opcode.NOP_OUT, Opcode.SCSI_COMMAND, Opcode.SNACK_REQUEST))
    assert all(op >= 0x20 for op in (Opcode.NOP_IN, Opcode.R2T, Opcode.REJECT))


def test_vectors_cover_every_class() -> None:
    assert sorted(VECTOR_IDS) == sorted(cls.__name__ for cls in PDU_CLASSES.values())


@pytest.mark.parametrize(("p", "bhs", "data"), VECTORS, ids=VECTOR_IDS)
def test_vector_encode(p: PDU, bhs: bytes, data: bytes) -> None:
    assert pdu.encode(p) == bhs + data + zero_pad(len(data))


@pytest.mark.parametrize(("p", "bhs", "data"), VECTORS, ids=VECTOR_IDS)
def test_vector_decode(p: PDU, bhs: bytes, data: bytes) -> None:
    raw = bhs + data + zero_pad(len(data))
    decoded, used = pdu.decode(raw)
    assert type(decoded) is type(p)
    assert decoded == p  # every field, data included
    assert used == len(raw)
    assert pdu.decode_bhs(memoryview(bhs), (), data) == p


@pytest.mark.parametrize(("hd", "dd"), DIGESTS, ids=DIGEST_IDS)
@pytest.mark.parametrize(("p", "bhs", "data"), VECTORS, ids=VECTOR_IDS)
def test_vector_with_digests(p: PDU, bhs: bytes, data: bytes, hd: bool, dd: bool) -> None:
    raw = wire_form(bhs, data, hd=hd, dd=dd)
    assert pdu.encode(p, header_digest=hd, data_digest=dd) == raw
    assert pdu.pdu_length(raw, header_digest=hd, data_digest=dd) == len(raw)
    assert pdu.decode(raw, header_digest=hd, data_digest=dd) == (p, len(raw))


def test_rfc3720_read10_vector_is_a_scsi_command() -> None:
    # RFC 3720 B.4's "iSCSI - SCSI Read (10) Command PDU" and its CRC, as a header digest.
    wire = bytes.fromhex(
        "01c00000" "00000000" "00000000" "00000000"
        "14000000" "00000400" "00000014" "00000018"
        "28000000" "00000000" "02000000" "00000000"
    )
    cmd = ScsiCommand(final=True, read=True, attr=TaskAttribute.UNTAGGED, itt=0x14000000,
                      expected_data_transfer_length=0x400, cmd_sn=0x14, exp_stat_sn=0x18,
                      cdb=bytes.fromhex("28000000000000000200000000000000"))
    assert pdu.encode(cmd, header_digest=True) == wire + bytes.fromhex("563a96d9")
    assert pdu.decode(wire + bytes.fromhex("563a96d9"), header_digest=True) == (cmd, 52)


# --------------------------------------------------------------------------------------------
# Round trips with every field at its full range

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u48 = st.integers(0, (1 << 48) - 1)
u64 = st.integers(0, (1 << 64) - 1)
flag = st.booleans()

FIELDS: dict[type[PDU], dict[str, st.SearchStrategy[Any]]] = {
    NopOut: dict(immediate=flag, lun=u64, itt=u32, ttt=u32, cmd_sn=u32, exp_stat_sn=u32),
    ScsiCommand: dict(
        immediate=flag, final=flag, read=flag, write=flag, attr=st.sampled_from(TaskAttribute),
        lun=u64, itt=u32, expected_data_transfer_length=u32, cmd_sn=u32, exp_stat_sn=u32,
        cdb=st.binary(min_size=1, max_size=260), bidi_read_length=st.none() | u32,
    ),
    TaskMgmtRequest: dict(
        immediate=flag, function=st.sampled_from(TMFunction), lun=u64, itt=u32,
        referenced_task_tag=u32, cmd_sn=u32, exp_stat_sn=u32, ref_cmd_sn=u32, exp_data_sn=u32,
    ),
    LoginRequest: dict(
        transit=flag, cont=flag, csg=st.sampled_from(Stage), nsg=st.sampled_from(Stage),
        version_max=u8, version_min=u8, isid=u48, tsih=u16, itt=u32, cid=u16, cmd_sn=u32,
        exp_stat_sn=u32,
    ),
    TextRequest: dict(immediate=flag, final=flag, cont=flag, lun=u64, itt=u32, ttt=u32,
                      cmd_sn=u32, exp_stat_sn=u32),
    DataOut: dict(final=flag, lun=u64, itt=u32, ttt=u32, exp_stat_sn=u32, data_sn=u32,
                  buffer_offset=u32),
    LogoutRequest: dict(immediate=flag, reason=st.sampled_from(LogoutReason), itt=u32, cid=u16,
                        cmd_sn=u32, exp_stat_sn=u32),
    SnackRequest: dict(type=st.sampled_from(SnackType), lun=u64, itt=u32, ttt=u32,
                       exp_stat_sn=u32, beg_run=u32, run_length=u32),
    NopIn: dict(lun=u64, itt=u32, ttt=u32, stat_sn=u32, exp_cmd_sn=u32, max_cmd_sn=u32),
    ScsiResponse: dict(
        bidi_overflow=flag, bidi_underflow=flag, overflow=flag, underflow=flag, response=u8,
        status=u8, itt=u32, snack_tag=u32, stat_sn=u32, exp_cmd_sn=u32, max_cmd_sn=u32,
        exp_data_sn=u32, bidi_residual_count=u32, residual_count=u32,
    ),
    TaskMgmtResponse: dict(response=u8, itt=u32, stat_sn=u32, exp_cmd_sn=u32, max_cmd_sn=u32),
    LoginResponse: dict(
        transit=flag, cont=flag, csg=st.sampled_from(Stage), nsg=st.sampled_from(Stage),
        version_max=u8, version_active=u8, isid=u48, tsih=u16, itt=u32, stat_sn=u32,
        exp_cmd_sn=u32, max_cmd_sn=u32, status_class=u8, status_detail=u8,
    ),
    TextResponse: dict(final=flag, cont=flag, lun=u64, itt=u32, ttt=u32, stat_sn=u32,
                       exp_cmd_sn=u32, max_cmd_sn=u32),
    DataIn: dict(
        final=flag, ack=flag, overflow=flag, underflow=flag, status_present=flag, status=u8,
        lun=u64, itt=u32, ttt=u32, stat_sn=u32, exp_cmd_sn=u32, max_cmd_sn=u32, data_sn=u32,
        buffer_offset=u32, residual_count=u32,
    ),
    LogoutResponse: dict(response=u8, itt=u32, stat_sn=u32, exp_cmd_sn=u32, max_cmd_sn=u32,
                         time2wait=u16, time2retain=u16),
    R2T: dict(lun=u64, itt=u32, ttt=u32, stat_sn=u32, exp_cmd_sn=u32, max_cmd_sn=u32,
              r2t_sn=u32, buffer_offset=u32, desired_data_transfer_length=u32),
    AsyncMessage: dict(lun=u64, itt=u32, stat_sn=u32, exp_cmd_sn=u32, max_cmd_sn=u32,
                       async_event=u8, async_vcode=u8, parameter1=u16, parameter2=u16,
                       parameter3=u16),
    Reject: dict(reason=u8, itt=u32, stat_sn=u32, exp_cmd_sn=u32, max_cmd_sn=u32, data_sn=u32),
}

# Lengths 0..9 cover every padding case twice; larger ones cross the reader's thresholds.
DATA = st.one_of(
    st.binary(max_size=9),
    st.binary(min_size=10, max_size=600),
    st.integers(2000, 20000).map(lambda n: bytes(i * 7 & 0xFF for i in range(n))),
)


def pdus(cls: type[PDU], data: st.SearchStrategy[bytes] = DATA) -> st.SearchStrategy[PDU]:
    return st.builds(cls, data=data, **FIELDS[cls])


def any_pdu(data: st.SearchStrategy[bytes] = DATA) -> st.SearchStrategy[PDU]:
    return st.one_of([pdus(cls, data) for cls in PDU_CLASSES.values()])


def test_strategies_cover_every_field() -> None:
    assert set(FIELDS) == set(PDU_CLASSES.values())
    for cls, strategies in FIELDS.items():
        wire_fields = {f.name for f in dataclasses.fields(cls)} - {"data", "placed"}
        assert set(strategies) == wire_fields, cls.__name__


def _ahs_len(p: PDU) -> int:
    if not isinstance(p, ScsiCommand):
        return 0
    n = len(ext_cdb_ahs(p.cdb)) if len(p.cdb) > 16 else 0
    return n + (8 if p.bidi_read_length is not None else 0)


@pytest.mark.parametrize("cls", list(PDU_CLASSES.values()), ids=lambda c: c.__name__)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_round_trip(cls: type[PDU], data: st.DataObject) -> None:
    p = data.draw(pdus(cls))
    want = expected_after_decode(p)
    payload = bytes(p.data)
    ahs = _ahs_len(p)
    for hd, dd in DIGESTS:
        raw = pdu.encode(p, header_digest=hd, data_digest=dd)
        # Lengths, padding and digests, checked independently of the decoder.
        assert raw[0] & 0x3F == cls.OPCODE
        assert raw[4] * 4 == ahs
        assert int.from_bytes(raw[5:8], "big") == len(payload)
        header = raw[: BHS + ahs]
        assert raw == wire_form(header, payload, hd=hd, dd=dd)
        # Decoding gives back every field; encoding that is byte-exact.
        assert pdu.decode(raw, header_digest=hd, data_digest=dd) == (want, len(raw))
        assert pdu.encode(want, header_digest=hd, data_digest=dd) == raw
        reader = PDUReader(header_digest=hd, data_digest=dd, max_data_segment_length=1 << 16)
        assert reader.feed(raw) == [want]


@pytest.mark.parametrize("n", [*range(10), 11, 255, 1021, 4096, 8191, 65535])
@pytest.mark.parametrize(("hd", "dd"), DIGESTS, ids=DIGEST_IDS)
def test_data_segment_lengths_and_padding(n: int, hd: bool, dd: bool) -> None:
    payload = bytes((i * 31 + 5) & 0xFF for i in range(n))
    p = NopIn(itt=7, data=payload)
    raw = pdu.encode(p, header_digest=hd, data_digest=dd)
    pad = -n % 4
    expected_len = BHS + (4 if hd else 0) + n + pad + (4 if dd and n else 0)
    assert len(raw) == expected_len
    start = BHS + (4 if hd else 0)
    assert raw[start : start + n] == payload
    assert raw[start + n : start + n + pad] == bytes(pad)
    assert pdu.pad_len(n) == pad
    assert pdu.decode(raw, header_digest=hd, data_digest=dd) == (p, len(raw))


# --------------------------------------------------------------------------------------------
# Additional header segments (§11.2.2, §11.3.5)


def ext_cdb_ahs(cdb: bytes) -> bytes:
    """The Extended CDB AHS, by hand: AHSLength = CDBLength - 15, AHSType 1, a reserved byte,
    CDB bytes 16.., zero padding to a 4-byte boundary."""
    rest = cdb[16:]
    body = struct.pack(">HBB", len(cdb) - 15, 1, 0) + rest
    return body + zero_pad(len(body))


def bidi_ahs(length: int) -> bytes:
    """The Bidirectional Read Expected Data Transfer Length AHS: AHSLength 5, AHSType 2."""
    return struct.pack(">HBBI", 5, 2, 0, length)


@pytest.mark.parametrize("n", range(17, 261))
def test_extended_cdb(n: int) -> None:
    cdb = bytes((i * 13 + 1) & 0xFF for i in range(n))
    cmd = ScsiCommand(itt=ITT, cdb=cdb, write=True, expected_data_transfer_length=512)
    raw = pdu.encode(cmd)
    ahs = ext_cdb_ahs(cdb)
    assert len(ahs) % 4 == 0
    assert raw[4] == len(ahs) // 4  # TotalAHSLength in 4-byte words
    assert raw[32:48] == cdb[:16]  # the first 16 CDB bytes stay in the BHS
    assert raw[48:] == ahs
    assert struct.unpack_from(">HB", raw, 48) == (n - 15, AHSType.EXTENDED_CDB)
    assert cmd.ahs_bytes() == ahs
    decoded, used = pdu.decode(raw)
    assert used == len(raw)
    assert isinstance(decoded, ScsiCommand)
    assert decoded.cdb == cdb
    assert decoded == cmd


@pytest.mark.parametrize("n", range(1, 17))
def test_short_cdb_has_no_ahs(n: int) -> None:
    cdb = bytes(range(1, n + 1))
    raw = pdu.encode(ScsiCommand(cdb=cdb))
    assert len(raw) == BHS
    assert raw[4] == 0
    assert raw[32:48] == cdb.ljust(16, b"\0")
    decoded, _ = pdu.decode(raw)
    assert isinstance(decoded, ScsiCommand)
    assert decoded.cdb == cdb.ljust(16, b"\0")


@pytest.mark.parametrize("n", [0, 261, 300])
def test_cdb_size_limits(n: int) -> None:
    with pytest.raises(LocalProtocolError):
        pdu.encode(ScsiCommand(cdb=bytes(n)))


@pytest.mark.parametrize("length", [0, 1, 0x12345678, 0xFFFFFFFF])
def test_bidi_read_length_ahs(length: int) -> None:
    cmd = ScsiCommand(read=True, write=True, cdb=CDB16, bidi_read_length=length)
    raw = pdu.encode(cmd)
    assert raw[4] == 2
    assert raw[48:] == bidi_ahs(length)
    assert raw[48:52] == b"\x00\x05\x02\x00"
    assert pdu.decode(raw) == (cmd, 56)


@pytest.mark.parametrize("n", [17, 18, 19, 20, 21, 32, 33, 100, 260])
@pytest.mark.parametrize(("hd", "dd"), DIGESTS, ids=DIGEST_IDS)
def test_extended_cdb_and_bidi_together(n: int, hd: bool, dd: bool) -> None:
    cdb = bytes((0x7F + i) & 0xFF for i in range(n))
    cmd = ScsiCommand(read=True, write=True, cdb=cdb, bidi_read_length=0xCAFE,
                      itt=ITT, data=b"abcde")
    ahs = ext_cdb_ahs(cdb) + bidi_ahs(0xCAFE)
    raw = pdu.encode(cmd, header_digest=hd, data_digest=dd)
    header = raw[:BHS] + ahs
    assert raw[4] == len(ahs) // 4
    assert raw == wire_form(header, b"abcde", hd=hd, dd=dd)
    assert pdu.decode(raw, header_digest=hd, data_digest=dd) == (cmd, len(raw))


def _with_ahs(bhs: bytes, ahs: bytes, data: bytes = b"") -> bytes:
    assert len(ahs) % 4 == 0
    raw = bytearray(bhs)
    raw[4] = len(ahs) // 4
    raw[5:8] = u24(len(data))
    return bytes(raw) + ahs + data + zero_pad(len(data))


def test_ahs_in_either_order() -> None:
    cdb = bytes(range(40))
    bhs = layout((0, "B", 0x01), (1, "B", 0xE1), (16, "I", ITT), (32, "16s", cdb[:16]))
    raw = _with_ahs(bhs, bidi_ahs(99) + ext_cdb_ahs(cdb))
    decoded, _ = pdu.decode(raw)
    assert isinstance(decoded, ScsiCommand)
    assert decoded.cdb == cdb
    assert decoded.bidi_read_length == 99
    assert (decoded.read, decoded.write, decoded.attr) == (True, True, TaskAttribute.SIMPLE)


def test_unknown_ahs_type_is_skipped() -> None:
    bhs = layout((0, "B", 0x01), (1, "B", 0x81), (32, "16s", CDB16))
    vendor = struct.pack(">HBB", 9, 0x3F, 0) + bytes(range(8))  # 3 + 9 bytes: no padding
    raw = _with_ahs(bhs, vendor + bidi_ahs(5), b"xyz")
    decoded, used = pdu.decode(raw)
    assert used == len(raw)
    assert isinstance(decoded, ScsiCommand)
    assert decoded.cdb == CDB16
    assert decoded.bidi_read_length == 5
    assert decoded.data == b"xyz"


def test_an_ahs_of_length_zero_is_named_as_such() -> None:
    # It used to say "claims 0 bytes, more than the 1 left in TotalAHSLength": 0 is no more.
    bhs = layout((0, "B", 0x01), (1, "B", 0x81), (32, "16s", CDB16))
    raw = _with_ahs(bhs, struct.pack(">HBB", 0, 0x3F, 0))
    with pytest.raises(PDUFormatError) as info:
        pdu.decode(raw)
    assert str(info.value) == (
        "additional header segment of type 63 has AHSLength 0, too short for even its "
        "type-specific byte (RFC 7143 §11.2.2.2)")


def test_ahs_on_other_pdus_is_ignored() -> None:
    p, bhs, data = VECTORS[VECTOR_IDS.index("NopIn")]
    raw = _with_ahs(bhs, bidi_ahs(1), data)
    assert pdu.decode(raw) == (p, len(raw))


@pytest.mark.parametrize(
    "ahs",
    [
        pytest.param(struct.pack(">HBB", 0, 1, 0), id="AHSLength 0"),
        pytest.param(struct.pack(">HBB", 2, 1, 0), id="longer than TotalAHSLength"),
        pytest.param(struct.pack(">HBB", 0xFFFF, 1, 0) + bytes(4), id="AHSLength 65535"),
        pytest.param(struct.pack(">HBBI", 5, 1, 0, 0) + struct.pack(">HBB", 6, 2, 0),
                     id="second AHS truncated"),
        pytest.param(struct.pack(">HBBH", 3, 2, 0, 0), id="bidi AHSLength 3"),
        pytest.param(struct.pack(">HBBI", 9, 2, 0, 0) + bytes(8), id="bidi AHSLength 9"),
    ],
)
def test_malformed_ahs(ahs: bytes) -> None:
    ahs += zero_pad(len(ahs))
    bhs = layout((0, "B", 0x01), (1, "B", 0x81), (32, "16s", CDB16))
    raw = _with_ahs(bhs, ahs)
    with pytest.raises(PDUFormatError):
        pdu.decode(raw)
    for hd in (False, True):
        stream = raw[:BHS + len(ahs)] + (crc(raw[:BHS + len(ahs)]) if hd else b"")
        with pytest.raises(PDUFormatError):
            PDUReader(header_digest=hd).feed(stream)


def test_total_ahs_length_beyond_the_bytes_given() -> None:
    raw = bytearray(VECTORS[0][1])
    raw[4] = 255  # 1020 bytes of AHS that never come
    with pytest.raises(PDUFormatError, match="truncated"):
        pdu.decode(bytes(raw))
    reader = PDUReader()
    assert reader.feed(bytes(raw)) == []  # waits for the rest


# --------------------------------------------------------------------------------------------
# Flag bits and enumerated fields


def byte1(p: PDU) -> int:
    return pdu.encode(p)[1]


@pytest.mark.parametrize(
    ("kwargs", "bits"),
    [
        (dict(final=False), 0x01),
        (dict(final=True), 0x81),
        (dict(final=False, read=True), 0x41),
        (dict(final=False, write=True), 0x21),
        (dict(final=True, read=True, write=True), 0xE1),
        *[(dict(final=False, attr=a), int(a)) for a in TaskAttribute],
    ],
)
def test_scsi_command_flags(kwargs: dict[str, Any], bits: int) -> None:
    cmd = ScsiCommand(cdb=CDB16, **kwargs)
    assert byte1(cmd) == bits
    raw = bytearray(pdu.encode(cmd))
    decoded, _ = pdu.decode(bytes(raw))
    assert decoded == cmd


@pytest.mark.parametrize("attr", [5, 6, 7])
def test_scsi_command_reserved_attr(attr: int) -> None:
    raw = layout((0, "B", 0x01), (1, "B", 0x80 | attr), (32, "16s", CDB16))
    with pytest.raises(PDUFormatError, match="task attribute"):
        pdu.decode(raw)


@pytest.mark.parametrize(
    ("cls", "immediate_by_default"),
    [(NopOut, True), (ScsiCommand, False), (TaskMgmtRequest, True), (TextRequest, False),
     (LogoutRequest, False)],
)
def test_immediate_bit(cls: type[PDU], immediate_by_default: bool) -> None:
    extra: dict[str, Any] = {"cdb": CDB16} if cls is ScsiCommand else {}
    for immediate in (False, True):
        p = cls(immediate=immediate, **extra)  # type: ignore[call-arg]
        raw = pdu.encode(p)
        assert raw[0] == (0x40 if immediate else 0) | cls.OPCODE
        assert pdu.decode(raw)[0] == p
    default = cls(immediate=immediate_by_default, **extra)  # type: ignore[call-arg]
    assert cls(**extra) == default


def test_login_request_is_always_immediate() -> None:
    assert pdu.encode(LoginRequest())[0] == 0x43


@pytest.mark.parametrize("cls", [NopOut, TaskMgmtRequest, LogoutRequest, SnackRequest, NopIn,
                                 ScsiResponse, TaskMgmtResponse, LogoutResponse, R2T,
                                 AsyncMessage, Reject])
def test_final_bit_always_set(cls: type[PDU]) -> None:
    # These PDUs have bit 7 of byte 1 fixed at 1 in their figures.
    assert byte1(cls()) & 0x80


@pytest.mark.parametrize("cls", [DataIn, DataOut, TextRequest, TextResponse])
def test_final_bit_follows_field(cls: type[PDU]) -> None:
    for final in (False, True):
        p = cls(final=final)  # type: ignore[call-arg]
        assert bool(byte1(p) & 0x80) is final
        assert pdu.decode(pdu.encode(p))[0] == p


@pytest.mark.parametrize("cls", [TextRequest, TextResponse])
def test_text_continue_bit(cls: type[PDU]) -> None:
    p = cls(final=False, cont=True)  # type: ignore[call-arg]
    assert byte1(p) == 0x40
    assert pdu.decode(pdu.encode(p))[0] == p


@pytest.mark.parametrize("cls", [LoginRequest, LoginResponse])
@pytest.mark.parametrize("transit", [False, True])
@pytest.mark.parametrize("cont", [False, True])
@pytest.mark.parametrize("csg", list(Stage))
@pytest.mark.parametrize("nsg", list(Stage))
def test_login_flags(cls: type[PDU], transit: bool, cont: bool, csg: Stage, nsg: Stage) -> None:
    p = cls(transit=transit, cont=cont, csg=csg, nsg=nsg)  # type: ignore[call-arg]
    # T C . . CSG CSG NSG NSG; NSG is reserved (sent as 0) unless T is set (§11.12.3).
    expected = (0x80 if transit else 0) | (0x40 if cont else 0) | (csg << 2) \
        | (nsg if transit else 0)
    assert byte1(p) == expected
    assert pdu.decode(pdu.encode(p))[0] == expected_after_decode(p)


@pytest.mark.parametrize("cls", [LoginRequest, LoginResponse])
def test_login_reserved_stage(cls: type[PDU]) -> None:
    op = 0x43 if cls is LoginRequest else 0x23
    with pytest.raises(PDUFormatError, match="CSG"):
        pdu.decode(layout((0, "B", op), (1, "B", 2 << 2)))
    with pytest.raises(PDUFormatError, match="NSG"):
        pdu.decode(layout((0, "B", op), (1, "B", 0x80 | 2)))
    # NSG 2 without T is a reserved field and ignored.
    decoded, _ = pdu.decode(layout((0, "B", op), (1, "B", 0x02)))
    assert isinstance(decoded, LoginRequest | LoginResponse)
    assert decoded.nsg == Stage.SECURITY


@pytest.mark.parametrize(
    ("name", "bit"),
    [("bidi_overflow", 0x10), ("bidi_underflow", 0x08), ("overflow", 0x04),
     ("underflow", 0x02)],
)
def test_scsi_response_flags(name: str, bit: int) -> None:
    flags: dict[str, Any] = {name: True}
    p = ScsiResponse(**flags)
    assert byte1(p) == 0x80 | bit
    decoded, _ = pdu.decode(layout((0, "B", 0x21), (1, "B", 0x80 | bit)))
    assert decoded == p
    # Reserved bit 0 and bits 5-6 are ignored on receipt.
    decoded, _ = pdu.decode(layout((0, "B", 0x21), (1, "B", 0x80 | 0x61 | bit)))
    assert decoded == p


@pytest.mark.parametrize(
    ("name", "bit"),
    [("final", 0x80), ("ack", 0x40), ("overflow", 0x04), ("underflow", 0x02),
     ("status_present", 0x01)],
)
def test_data_in_flags(name: str, bit: int) -> None:
    flags: dict[str, Any] = {name: True}
    p = DataIn(ttt=0, **flags)
    assert byte1(p) == bit
    decoded, _ = pdu.decode(layout((0, "B", 0x25), (1, "B", bit)))
    assert decoded == p


def test_data_in_all_flags() -> None:
    p = DataIn(final=True, ack=True, overflow=True, underflow=True, status_present=True,
               status=0x02)
    raw = pdu.encode(p)
    assert raw[1] == 0xC7
    assert raw[3] == 0x02
    assert pdu.decode(raw)[0] == p


@pytest.mark.parametrize("snack_type", list(SnackType))
def test_snack_type(snack_type: SnackType) -> None:
    p = SnackRequest(type=snack_type)
    assert byte1(p) == 0x80 | snack_type
    assert pdu.decode(pdu.encode(p))[0] == p


@pytest.mark.parametrize("value", range(4, 16))
def test_snack_reserved_type(value: int) -> None:
    with pytest.raises(PDUFormatError, match="SNACK type"):
        pdu.decode(layout((0, "B", 0x10), (1, "B", 0x80 | value)))


@pytest.mark.parametrize("function", list(TMFunction))
def test_tmf_function(function: TMFunction) -> None:
    p = TaskMgmtRequest(function=function)
    assert byte1(p) == 0x80 | function
    assert pdu.decode(pdu.encode(p))[0] == p


@pytest.mark.parametrize("value", [0, 9, 14, 0x7F])
def test_tmf_reserved_function(value: int) -> None:
    with pytest.raises(PDUFormatError, match="function"):
        pdu.decode(layout((0, "B", 0x02), (1, "B", 0x80 | value)))


@pytest.mark.parametrize("reason", list(LogoutReason))
def test_logout_reason(reason: LogoutReason) -> None:
    p = LogoutRequest(reason=reason)
    assert byte1(p) == 0x80 | reason
    assert pdu.decode(pdu.encode(p))[0] == p


@pytest.mark.parametrize("value", [3, 0x7F])
def test_logout_reserved_reason(value: int) -> None:
    with pytest.raises(PDUFormatError, match="logout reason"):
        pdu.decode(layout((0, "B", 0x06), (1, "B", 0x80 | value)))


@pytest.mark.parametrize(
    ("p", "offset", "value"),
    [
        (TaskMgmtResponse(response=TMResponse.REJECTED), 2, 255),
        (LogoutResponse(response=LogoutResponseCode.CLEANUP_FAILED), 2, 3),
        (Reject(reason=RejectReason.WAITING_FOR_LOGOUT), 2, 0x0C),
        (AsyncMessage(async_event=AsyncEvent.VENDOR_SPECIFIC), 36, 255),
        (ScsiResponse(response=0x01, status=0x28), 2, 0x01),
        (ScsiResponse(response=0x01, status=0x28), 3, 0x28),
    ],
)
def test_response_code_bytes(p: PDU, offset: int, value: int) -> None:
    assert pdu.encode(p)[offset] == value
    assert pdu.decode(pdu.encode(p))[0] == p


# --------------------------------------------------------------------------------------------
# LUN encoding (SAM-2 single level, §11.2.2.3)


@pytest.mark.parametrize(
    ("lun", "first_two_bytes"),
    [(0, b"\x00\x00"), (1, b"\x00\x01"), (255, b"\x00\xff"),  # peripheral device addressing
     (256, b"\x01\x00"), (300, b"\x01\x2c"), (0x4123, b"\x41\x23"), (0xFFFF, b"\xff\xff")],
)
def test_lun_to_wire(lun: int, first_two_bytes: bytes) -> None:
    # Linux's int_to_scsilun numbering, which LIO, tgt and libiscsi share.
    wire = pdu.lun_to_wire(lun)
    assert struct.pack(">Q", wire) == first_two_bytes + bytes(6)
    assert pdu.lun_from_wire(wire) == lun
    # And in a PDU, at bytes 8-15.
    assert pdu.encode(ScsiCommand(lun=wire, cdb=CDB16))[8:16] == first_two_bytes + bytes(6)


@pytest.mark.parametrize("lun", [-1, -256, 0x10000, 1 << 20])
def test_lun_out_of_range(lun: int) -> None:
    with pytest.raises(LocalProtocolError):
        pdu.lun_to_wire(lun)


def test_lun_round_trip_every_single_level_lun() -> None:
    for lun in range(0x10000):
        wire = pdu.lun_to_wire(lun)
        assert 0 <= wire < 1 << 64
        assert pdu.lun_from_wire(wire) == lun


def test_lun_from_wire_other_forms() -> None:
    # Only the first level counts, as in Linux's scsilun_to_int for single-level LUNs.
    assert pdu.lun_from_wire(0x4005 << 48) == 0x4005
    assert pdu.lun_from_wire(0x0001_0002_0000_0000) == 1


# --------------------------------------------------------------------------------------------
# frame(): scatter/gather output for sendmsg


def _split(data: bytes, cuts: Sequence[int]) -> list[memoryview]:
    view = memoryview(data)
    bounds = [0, *sorted({min(c, len(data)) for c in cuts}), len(data)]
    return [view[lo:hi] for lo, hi in itertools.pairwise(bounds)]


@pytest.mark.parametrize(("hd", "dd"), DIGESTS, ids=DIGEST_IDS)
def test_frame_passes_views_through(hd: bool, dd: bool) -> None:
    area = bytearray(range(256)) * 40  # stands in for the TCMU data area
    views = [memoryview(area)[0:1000], memoryview(area)[1000:1000], memoryview(area)[5000:7001]]
    p = DataOut(itt=1, ttt=2, data_sn=3, buffer_offset=4096, final=True)
    parts = pdu.frame(p, views, header_digest=hd, data_digest=dd)
    # Zero copy: the very same view objects, in order, empty ones dropped.
    assert parts[1] is views[0]
    assert parts[2] is views[2]
    joined = bytes(views[0]) + bytes(views[2])
    assert len(joined) == 3001
    trailer = parts[3]
    assert len(parts) == 4
    assert bytes(trailer) == zero_pad(3001) + (crc(joined + zero_pad(3001)) if dd else b"")
    # The header holds BHS and header digest; DataSegmentLength counts all views.
    assert int.from_bytes(parts[0][5:8], "big") == 3001
    assert len(parts[0]) == BHS + (4 if hd else 0)
    whole = b"".join(parts)
    assert whole == pdu.encode(dataclasses.replace(p, data=joined), header_digest=hd,
                               data_digest=dd)
    # The views still export the caller's memory, so nothing was copied into them.
    assert isinstance(parts[1], memoryview)
    assert parts[1].obj is area


@pytest.mark.parametrize(("hd", "dd"), DIGESTS, ids=DIGEST_IDS)
def test_frame_without_data(hd: bool, dd: bool) -> None:
    p = NopOut()
    assert pdu.frame(p, header_digest=hd, data_digest=dd) == [
        pdu.encode(p, header_digest=hd, data_digest=dd)
    ]
    assert len(pdu.frame(p, [memoryview(b""), b""], header_digest=hd, data_digest=dd)) == 1
    # No data digest for an empty data segment (§11.1).
    assert len(pdu.encode(p, header_digest=hd, data_digest=dd)) == BHS + (4 if hd else 0)


def test_frame_no_trailer_when_aligned_and_no_digest() -> None:
    view = memoryview(bytearray(8))
    parts = pdu.frame(DataOut(), [view])
    assert len(parts) == 2
    assert parts[1] is view


def test_frame_data_overrides_pdu_data() -> None:
    p = DataOut(data=b"ignored")
    view = memoryview(b"used")
    parts = pdu.frame(p, [view])
    assert parts[1] is view
    assert int.from_bytes(parts[0][5:8], "big") == 4


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=3000), st.lists(st.integers(0, 3000), max_size=10), st.booleans(),
       st.booleans())
def test_frame_digest_over_split_data(payload: bytes, cuts: list[int], hd: bool,
                                      dd: bool) -> None:
    views = _split(payload, cuts)
    p = DataOut(itt=9, data_sn=1)
    parts = pdu.frame(p, views, header_digest=hd, data_digest=dd)
    nonempty = [v for v in views if len(v)]
    assert all(a is b for a, b in zip(parts[1 : 1 + len(nonempty)], nonempty, strict=True))
    assert b"".join(parts) == pdu.encode(dataclasses.replace(p, data=payload),
                                         header_digest=hd, data_digest=dd)


def test_frame_counts_bytes_of_non_byte_views() -> None:
    # A view of 32-bit items: DataSegmentLength is in bytes, not items.
    words = array.array("I", range(5))
    view = memoryview(words)
    parts = pdu.frame(DataOut(), [view], data_digest=True)
    assert parts[1] is view
    assert int.from_bytes(parts[0][5:8], "big") == 20
    assert bytes(parts[2]) == crc(words.tobytes())
    assert b"".join(parts) == pdu.encode(DataOut(data=words.tobytes()), data_digest=True)


def test_frame_too_much_data() -> None:
    mib = memoryview(bytes(1 << 20))
    with pytest.raises(LocalProtocolError):
        pdu.frame(DataOut(), [mib] * 16)  # 16 MiB > 2**24 - 1
    assert int.from_bytes(pdu.frame(DataOut(), [mib] * 15)[0][5:8], "big") == 15 << 20


# --------------------------------------------------------------------------------------------
# decode() and pdu_length()


def test_decode_ignores_trailing_bytes() -> None:
    p, bhs, data = VECTORS[0]
    raw = bhs + data + zero_pad(len(data))
    assert pdu.decode(raw + b"next PDU...") == (p, len(raw))
    assert pdu.decode(bytearray(raw)) == (p, len(raw))
    assert pdu.decode(memoryview(raw)) == (p, len(raw))


@pytest.mark.parametrize(("hd", "dd"), DIGESTS, ids=DIGEST_IDS)
def test_decode_truncated(hd: bool, dd: bool) -> None:
    _, bhs, data = VECTORS[0]
    raw = wire_form(bhs, data, hd=hd, dd=dd)
    for n in range(len(raw)):
        with pytest.raises(PDUFormatError, match="truncated"):
            pdu.decode(raw[:n], header_digest=hd, data_digest=dd)


def test_pdu_length() -> None:
    bhs = layout((0, "B", 0x20), (4, "B", 3), (5, "3s", u24(5)))
    assert pdu.pdu_length(bhs) == 48 + 12 + 8
    assert pdu.pdu_length(bhs, header_digest=True) == 48 + 12 + 4 + 8
    assert pdu.pdu_length(bhs, data_digest=True) == 48 + 12 + 8 + 4
    empty = layout((0, "B", 0x20))
    assert pdu.pdu_length(empty, data_digest=True) == 48
    with pytest.raises(PDUFormatError):
        pdu.pdu_length(bhs[:47])


# --------------------------------------------------------------------------------------------
# Helpers of the decoded PDUs


def test_scsi_response_sense() -> None:
    p, _, _ = VECTORS[VECTOR_IDS.index("ScsiResponse")]
    assert isinstance(p, ScsiResponse)
    assert p.sense() == READ_CAPACITY_SENSE[2:20]
    assert ScsiResponse().sense() == b""
    with pytest.raises(PDUFormatError):
        ScsiResponse(data=b"\x00\x10abc").sense()


def test_async_message_sense() -> None:
    assert AsyncMessage(data=b"\x00\x03abcdef").sense() == b"abc"
    assert AsyncMessage().sense() == b""


def test_reject_rejected_header() -> None:
    p, _, _ = VECTORS[VECTOR_IDS.index("Reject")]
    assert isinstance(p, Reject)
    assert p.rejected_header() == dataclasses.replace(VECTORS[0][0], data=b"")
    assert Reject(data=b"short").rejected_header() is None
    assert Reject(data=bytes([0x3E]) + bytes(47)).rejected_header() is None  # unknown opcode
