"""The ring codec, byte for byte, against the kernel's own header."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tcmu_handler import ring
from tcmu_handler.errors import MalformedEntry, RingError

HEADER = Path("/usr/include/linux/target_core_user.h")

C_PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/target_core_user.h>

#define OFF(t, f) printf("%s.%s %zu\n", #t, #f, offsetof(struct t, f))
#define SIZE(t) printf("sizeof.%s %zu\n", #t, sizeof(struct t))
#define VAL(n) printf("%s %ld\n", #n, (long)(n))

int main(void) {
    SIZE(tcmu_mailbox); SIZE(tcmu_cmd_entry_hdr); SIZE(tcmu_cmd_entry); SIZE(tcmu_tmr_entry);
    SIZE(iovec);
    OFF(tcmu_mailbox, version); OFF(tcmu_mailbox, flags); OFF(tcmu_mailbox, cmdr_off);
    OFF(tcmu_mailbox, cmdr_size); OFF(tcmu_mailbox, cmd_head); OFF(tcmu_mailbox, cmd_tail);
    OFF(tcmu_cmd_entry_hdr, len_op); OFF(tcmu_cmd_entry_hdr, cmd_id);
    OFF(tcmu_cmd_entry_hdr, kflags); OFF(tcmu_cmd_entry_hdr, uflags);
    OFF(tcmu_cmd_entry, req.iov_cnt); OFF(tcmu_cmd_entry, req.iov_bidi_cnt);
    OFF(tcmu_cmd_entry, req.iov_dif_cnt); OFF(tcmu_cmd_entry, req.cdb_off);
    OFF(tcmu_cmd_entry, req.iov);
    OFF(tcmu_cmd_entry, rsp.scsi_status); OFF(tcmu_cmd_entry, rsp.read_len);
    OFF(tcmu_cmd_entry, rsp.sense_buffer);
    OFF(tcmu_tmr_entry, tmr_type); OFF(tcmu_tmr_entry, cmd_cnt); OFF(tcmu_tmr_entry, cmd_ids);
    VAL(TCMU_MAILBOX_VERSION); VAL(ALIGN_SIZE); VAL(TCMU_OP_MASK); VAL(TCMU_OP_ALIGN_SIZE);
    VAL(TCMU_SENSE_BUFFERSIZE);
    VAL(TCMU_MAILBOX_FLAG_CAP_OOOC); VAL(TCMU_MAILBOX_FLAG_CAP_READ_LEN);
    VAL(TCMU_MAILBOX_FLAG_CAP_TMR); VAL(TCMU_MAILBOX_FLAG_CAP_KEEP_BUF);
    VAL(TCMU_OP_PAD); VAL(TCMU_OP_CMD); VAL(TCMU_OP_TMR);
    VAL(TCMU_UFLAG_UNKNOWN_OP); VAL(TCMU_UFLAG_READ_LEN); VAL(TCMU_UFLAG_KEEP_BUF);
    VAL(TCMU_TMR_UNKNOWN); VAL(TCMU_TMR_ABORT_TASK); VAL(TCMU_TMR_ABORT_TASK_SET);
    VAL(TCMU_TMR_CLEAR_ACA); VAL(TCMU_TMR_CLEAR_TASK_SET); VAL(TCMU_TMR_LUN_RESET);
    VAL(TCMU_TMR_TARGET_WARM_RESET); VAL(TCMU_TMR_TARGET_COLD_RESET);
    VAL(TCMU_TMR_LUN_RESET_PRO);
    return 0;
}
"""


@pytest.fixture(scope="module")
def header_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is not installed: run deploy/setup")
    if not HEADER.exists():
        pytest.fail(f"{HEADER} is missing (Debian package linux-libc-dev): run deploy/setup")
    d = tmp_path_factory.mktemp("tcmu_h")
    (d / "offsets.c").write_text(C_PROGRAM)
    subprocess.run([gcc, "-o", str(d / "offsets"), str(d / "offsets.c")], check=True,
                   capture_output=True)
    out = subprocess.run([str(d / "offsets")], check=True, capture_output=True, text=True)
    return {k: int(v) for k, v in (line.split() for line in out.stdout.splitlines())}


def test_sizes_and_offsets_match_the_c_header(header_values: dict[str, int]) -> None:
    expected = {
        "sizeof.tcmu_mailbox": ring.MAILBOX_SIZE,
        "sizeof.tcmu_cmd_entry_hdr": ring.ENTRY_HDR_SIZE,
        "sizeof.tcmu_cmd_entry": ring.CMD_ENTRY_SIZE,
        "sizeof.tcmu_tmr_entry": ring.TMR_ENTRY_SIZE,
        "sizeof.iovec": ring.IOVEC_SIZE,
        "tcmu_mailbox.version": ring.MB_VERSION,
        "tcmu_mailbox.flags": ring.MB_FLAGS,
        "tcmu_mailbox.cmdr_off": ring.MB_CMDR_OFF,
        "tcmu_mailbox.cmdr_size": ring.MB_CMDR_SIZE,
        "tcmu_mailbox.cmd_head": ring.MB_CMD_HEAD,
        "tcmu_mailbox.cmd_tail": ring.MB_CMD_TAIL,
        "tcmu_cmd_entry_hdr.len_op": ring.HDR_LEN_OP,
        "tcmu_cmd_entry_hdr.cmd_id": ring.HDR_CMD_ID,
        "tcmu_cmd_entry_hdr.kflags": ring.HDR_KFLAGS,
        "tcmu_cmd_entry_hdr.uflags": ring.HDR_UFLAGS,
        "tcmu_cmd_entry.req.iov_cnt": ring.REQ_IOV_CNT,
        "tcmu_cmd_entry.req.iov_bidi_cnt": ring.REQ_IOV_BIDI_CNT,
        "tcmu_cmd_entry.req.iov_dif_cnt": ring.REQ_IOV_DIF_CNT,
        "tcmu_cmd_entry.req.cdb_off": ring.REQ_CDB_OFF,
        "tcmu_cmd_entry.req.iov": ring.REQ_IOV,
        "tcmu_cmd_entry.rsp.scsi_status": ring.RSP_SCSI_STATUS,
        "tcmu_cmd_entry.rsp.read_len": ring.RSP_READ_LEN,
        "tcmu_cmd_entry.rsp.sense_buffer": ring.RSP_SENSE,
        "tcmu_tmr_entry.tmr_type": ring.TMR_TYPE,
        "tcmu_tmr_entry.cmd_cnt": ring.TMR_CMD_CNT,
        "tcmu_tmr_entry.cmd_ids": ring.TMR_CMD_IDS,
        "TCMU_MAILBOX_VERSION": ring.MAILBOX_VERSION,
        "ALIGN_SIZE": ring.ALIGN_SIZE,
        "TCMU_OP_MASK": ring.OP_MASK,
        "TCMU_OP_ALIGN_SIZE": ring.OP_ALIGN_SIZE,
        "TCMU_SENSE_BUFFERSIZE": ring.SENSE_BUFFERSIZE,
        "TCMU_MAILBOX_FLAG_CAP_OOOC": ring.MailboxFlag.OOOC,
        "TCMU_MAILBOX_FLAG_CAP_READ_LEN": ring.MailboxFlag.READ_LEN,
        "TCMU_MAILBOX_FLAG_CAP_TMR": ring.MailboxFlag.TMR,
        "TCMU_MAILBOX_FLAG_CAP_KEEP_BUF": ring.MailboxFlag.KEEP_BUF,
        "TCMU_OP_PAD": ring.Opcode.PAD,
        "TCMU_OP_CMD": ring.Opcode.CMD,
        "TCMU_OP_TMR": ring.Opcode.TMR,
        "TCMU_UFLAG_UNKNOWN_OP": ring.UFlag.UNKNOWN_OP,
        "TCMU_UFLAG_READ_LEN": ring.UFlag.READ_LEN,
        "TCMU_UFLAG_KEEP_BUF": ring.UFlag.KEEP_BUF,
        "TCMU_TMR_UNKNOWN": ring.TmrType.UNKNOWN,
        "TCMU_TMR_ABORT_TASK": ring.TmrType.ABORT_TASK,
        "TCMU_TMR_ABORT_TASK_SET": ring.TmrType.ABORT_TASK_SET,
        "TCMU_TMR_CLEAR_ACA": ring.TmrType.CLEAR_ACA,
        "TCMU_TMR_CLEAR_TASK_SET": ring.TmrType.CLEAR_TASK_SET,
        "TCMU_TMR_LUN_RESET": ring.TmrType.LUN_RESET,
        "TCMU_TMR_TARGET_WARM_RESET": ring.TmrType.TARGET_WARM_RESET,
        "TCMU_TMR_TARGET_COLD_RESET": ring.TmrType.TARGET_COLD_RESET,
        "TCMU_TMR_LUN_RESET_PRO": ring.TmrType.LUN_RESET_PRO,
    }
    assert header_values == {k: int(v) for k, v in expected.items()}


def test_struct_layouts_agree_with_the_offsets() -> None:
    # Each precompiled Struct must put its fields where the named offsets say.
    buf = bytearray(128)
    ring.CMD_REQ.pack_into(buf, 0, 0x11223340 | 1, 0x5566, 0x77, 0x88, 3, 2, 0, 0x0102030405)
    assert struct.unpack_from("=I", buf, ring.HDR_LEN_OP)[0] == 0x11223341
    assert struct.unpack_from("=H", buf, ring.HDR_CMD_ID)[0] == 0x5566
    assert buf[ring.HDR_KFLAGS] == 0x77 and buf[ring.HDR_UFLAGS] == 0x88
    assert struct.unpack_from("=I", buf, ring.REQ_IOV_CNT)[0] == 3
    assert struct.unpack_from("=I", buf, ring.REQ_IOV_BIDI_CNT)[0] == 2
    assert struct.unpack_from("=Q", buf, ring.REQ_CDB_OFF)[0] == 0x0102030405
    buf = bytearray(128)
    ring.CMD_RSP.pack_into(buf, ring.HDR_CMD_ID, 0xBEEF, 0, 0x02, 0x08, 0xCAFE)
    assert struct.unpack_from("=H", buf, ring.HDR_CMD_ID)[0] == 0xBEEF
    assert buf[ring.HDR_UFLAGS] == 0x02 and buf[ring.RSP_SCSI_STATUS] == 0x08
    assert struct.unpack_from("=I", buf, ring.RSP_READ_LEN)[0] == 0xCAFE
    buf = bytearray(64)
    ring.TMR_HDR.pack_into(buf, 0, 32 | 2, 0, 0, 0, 5, 7)
    assert buf[ring.TMR_TYPE] == 5 and struct.unpack_from("=I", buf, ring.TMR_CMD_CNT)[0] == 7


def test_entry_sizes_follow_queue_cmd_ring() -> None:
    assert ring.cmd_base_size(0) == 112  # never less than the response
    assert ring.cmd_base_size(4) == 112  # 48 + 64
    assert ring.cmd_base_size(5) == 128
    assert ring.cmd_entry_size(1, 10) == 112 + 16
    assert ring.cmd_entry_size(1, 16) == 112 + 16
    assert ring.cmd_entry_size(8, 6) == 48 + 128 + 8
    assert ring.cmd_entry_size(0, 32) == 112 + 32
    assert ring.tmr_entry_size(0) == 32
    assert ring.tmr_entry_size(1) == 40
    assert ring.tmr_entry_size(4) == 40
    assert ring.tmr_entry_size(5) == 48


@pytest.mark.parametrize(("opcode", "length"), [
    (0x00, 6), (0x12, 6), (0x28, 10), (0x2A, 10), (0x42, 10), (0x5F, 10), (0xA0, 12),
    (0xA8, 12), (0x88, 16), (0x8A, 16), (0x9E, 16), (0xC0, 10), (0xE0, 10), (0x60, 12),
])
def test_cdb_length_is_scsi_command_size(opcode: int, length: int) -> None:
    assert ring.cdb_length(opcode) == length


def test_variable_length_cdb() -> None:
    assert ring.cdb_length(0x7F, 0x18) == 32


def _mailbox(version: int = 2, flags: int = 0xF, cmdr_off: int = 128,
             cmdr_size: int = 4096 - 128, head: int = 0, tail: int = 0,
             size: int = 8192) -> bytearray:
    buf = bytearray(size)
    ring.MAILBOX.pack_into(buf, 0, version, flags, cmdr_off, cmdr_size, head)
    ring.U32.pack_into(buf, ring.MB_CMD_TAIL, tail)
    return buf


def test_mailbox_parse() -> None:
    mb = ring.Mailbox.parse(_mailbox(head=40, tail=16))
    assert mb == ring.Mailbox(2, ring.MailboxFlag(0xF), 128, 4096 - 128, 40, 16)
    assert mb.data_off == 4096
    assert ring.MailboxFlag.OOOC in mb.flags and ring.MailboxFlag.KEEP_BUF in mb.flags


def test_mailbox_version_1_has_no_capabilities() -> None:
    assert ring.Mailbox.parse(_mailbox(version=1)).flags == ring.MailboxFlag(0)


@pytest.mark.parametrize("kwargs", [
    {"version": 3}, {"cmdr_off": 64}, {"cmdr_size": 0}, {"cmdr_size": 4097},
    {"cmdr_size": 1 << 20},
])
def test_mailbox_rejects_what_is_not_a_tcmu_ring(kwargs: dict[str, int]) -> None:
    with pytest.raises(RingError):
        ring.Mailbox.parse(_mailbox(**kwargs))


def test_write_mailbox() -> None:
    buf = bytearray(256)
    ring.write_mailbox(buf, flags=ring.MailboxFlag.OOOC | ring.MailboxFlag.TMR, cmdr_size=4096)
    assert buf[:16] == struct.pack("=HHIII", 2, 5, 128, 4096, 0)
    assert buf[64:68] == b"\0\0\0\0"


DATA_START = 0x1000
DATA_END = 0x100000


def test_cmd_round_trip_is_byte_exact() -> None:
    buf = bytearray(0x2000)
    cdb = bytes.fromhex("2a00000000100000080000000000000000")[:10]
    iovecs = [(0x1000, 4096), (0x4000, 8192), (0x9000, 100)]
    length = ring.cmd_entry_size(3, 10)
    off = 256
    cdb_off = off + ring.cmd_base_size(3)
    buf[off:off + length] = b"\xee" * length  # write_cmd zeroes the entry first
    ring.write_cmd(buf, off, cmd_id=0x1234, length=length, iovecs=iovecs, iov_bidi_cnt=1,
                   cdb_off=cdb_off, cdb=cdb)
    assert struct.unpack_from("=IHBB", buf, off) == (length | 1, 0x1234, 0, 0)
    assert struct.unpack_from("=III", buf, off + 8) == (2, 1, 0)
    assert struct.unpack_from("=Q", buf, off + 24)[0] == cdb_off
    assert struct.unpack_from("=6Q", buf, off + 48) == (0x1000, 4096, 0x4000, 8192, 0x9000, 100)
    assert buf[cdb_off:cdb_off + 10] == cdb
    assert buf[cdb_off + 10:off + length] == bytes(length - (cdb_off - off) - 10)

    entry = ring.parse_cmd(buf, off, length, 0x1000, 0x10000)
    assert entry.cmd_id == 0x1234 and entry.cdb == cdb and entry.length == length
    assert entry.iovecs == tuple(iovecs)
    assert entry.is_bidi and entry.bidi_split() == (tuple(iovecs[:2]), tuple(iovecs[2:]))
    assert entry.data_length == 4096 + 8192 + 100
    assert ring.parse_entry(buf, off, ring_room=4096, data_start=0x1000,
                            data_end=0x10000) == entry


def _cmd_buf(*, iovecs: list[tuple[int, int]], cdb: bytes = bytes(10), length: int = 0,
             cdb_off: int | None = None, dif: int = 0) -> tuple[bytearray, int]:
    buf = bytearray(0x2000)
    length = length or ring.cmd_entry_size(len(iovecs), len(cdb))
    base = ring.cmd_base_size(len(iovecs))
    ring.write_cmd(buf, 0, cmd_id=77, length=length, iovecs=iovecs, iov_bidi_cnt=0,
                   cdb_off=base, cdb=cdb)
    if cdb_off is not None:
        struct.pack_into("=Q", buf, ring.REQ_CDB_OFF, cdb_off)
    if dif:
        struct.pack_into("=I", buf, ring.REQ_IOV_DIF_CNT, dif)
    return buf, length


@pytest.mark.parametrize(("kwargs", "what"), [
    ({"iovecs": [(0x800, 512)]}, "outside the data area"),
    ({"iovecs": [(DATA_END - 100, 512)]}, "outside the data area"),
    ({"iovecs": [(DATA_START, 1), (0x10, 1)]}, "outside the data area"),
    ({"iovecs": [(DATA_START, 512)], "dif": 1}, "DIF"),
    ({"iovecs": [(DATA_START, 512)], "cdb_off": 0x1800}, "CDB offset"),
    ({"iovecs": [(DATA_START, 512)], "cdb_off": 40}, "CDB offset"),
    ({"iovecs": [(DATA_START, 512)], "cdb": bytes([0x88]) + bytes(15), "length": 120},
     "runs past"),
])
def test_malformed_cmd_entries_carry_their_cmd_id(kwargs: dict[str, object], what: str) -> None:
    buf, length = _cmd_buf(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(MalformedEntry, match=what) as info:
        ring.parse_cmd(buf, 0, length, DATA_START, DATA_END)
    assert info.value.cmd_id == 77


def test_iovec_count_larger_than_the_entry_is_malformed() -> None:
    buf, length = _cmd_buf(iovecs=[(DATA_START, 512)])
    struct.pack_into("=I", buf, ring.REQ_IOV_CNT, 50)
    with pytest.raises(MalformedEntry, match="do not fit"):
        ring.parse_cmd(buf, 0, length, DATA_START, DATA_END)


def test_variable_length_cdb_is_copied_whole() -> None:
    cdb = bytes([0x7F, 0, 0, 0, 0, 0, 0, 0x18, 0, 0x09]) + bytes(22)
    buf, length = _cmd_buf(iovecs=[(DATA_START, 512)], cdb=cdb)
    assert ring.parse_cmd(buf, 0, length, DATA_START, DATA_END).cdb == cdb


def test_write_response_leaves_len_op_and_writes_sense_only_when_given() -> None:
    buf, _ = _cmd_buf(iovecs=[(DATA_START, 512)] * 8)
    before = bytes(buf)
    ring.write_response(buf, 0, cmd_id=9, scsi_status=0, uflags=ring.UFlag.READ_LEN,
                        read_len=300)
    assert buf[0:4] == before[0:4]  # len_op untouched
    assert struct.unpack_from("=HBBB", buf, 4) == (9, 0, 2, 0)
    assert struct.unpack_from("=I", buf, 12)[0] == 300
    assert buf[16:] == before[16:]  # no sense for GOOD
    sense = bytes([0x70, 0, 3, 0, 0, 0, 0, 10]) + bytes(4) + bytes([0x11, 0]) + bytes(4)
    ring.write_response(buf, 0, cmd_id=9, scsi_status=2, sense=sense)
    assert buf[16:16 + 18] == sense and buf[34:112] == bytes(78)
    assert buf[112:] == before[112:]
    assert ring.read_response(buf, 0) == ring.Response(9, 0, 2, 0, sense + bytes(78))


def test_long_sense_is_truncated_to_the_sense_buffer() -> None:
    buf, _ = _cmd_buf(iovecs=[(DATA_START, 512)] * 8)
    after = bytes(buf[112:])
    ring.write_response(buf, 0, cmd_id=1, scsi_status=2, sense=b"\x72" * 200)
    assert buf[16:112] == b"\x72" * 96 and bytes(buf[112:]) == after


def test_tmr_round_trip() -> None:
    buf = bytearray(128)
    length = ring.tmr_entry_size(3)
    ring.write_tmr(buf, 8, length=length, tmr_type=ring.TmrType.ABORT_TASK_SET,
                   cmd_ids=[5, 0xFFFF, 1])
    assert struct.unpack_from("=IHBBB", buf, 8) == (length | 2, 0, 0, 0, 2)
    assert struct.unpack_from("=I", buf, 8 + 12)[0] == 3
    assert struct.unpack_from("=3H", buf, 8 + 32) == (5, 0xFFFF, 1)
    assert ring.parse_entry(buf, 8, ring_room=100, data_start=0, data_end=0) == ring.TmrEntry(
        length, ring.TmrType.ABORT_TASK_SET, (5, 0xFFFF, 1))


def test_tmr_with_too_many_ids_is_rejected() -> None:
    buf = bytearray(128)
    ring.write_tmr(buf, 0, length=40, tmr_type=1, cmd_ids=[1])
    struct.pack_into("=I", buf, ring.TMR_CMD_CNT, 9)
    with pytest.raises(RingError):
        ring.parse_tmr(buf, 0, 40)


def test_pad_and_corrupt_headers() -> None:
    buf = bytearray(64)
    ring.write_pad(buf, 0, 24)
    assert ring.parse_entry(buf, 0, ring_room=24, data_start=0, data_end=0) == ring.PadEntry(24)
    with pytest.raises(RingError, match="claims"):
        ring.parse_entry(buf, 0, ring_room=16, data_start=0, data_end=0)
    struct.pack_into("=I", buf, 0, 16 | 5)
    with pytest.raises(RingError, match="unknown opcode"):
        ring.parse_entry(buf, 0, ring_room=64, data_start=0, data_end=0)
    with pytest.raises(ValueError):
        ring.make_len_op(ring.Opcode.CMD, 12)
