"""initiator.scsi.cdb: CDB builders, command names and descriptions (hand-built vectors)."""

from __future__ import annotations

import pytest

from initiator import scsi


def test_test_unit_ready() -> None:
    assert scsi.test_unit_ready() == bytes(6)


def test_inquiry_standard_and_vpd() -> None:
    assert scsi.inquiry() == bytes.fromhex("12 00 00 00 ff 00")
    assert scsi.inquiry(allocation_length=36) == bytes.fromhex("12 00 00 00 24 00")
    assert scsi.inquiry(0x00) == bytes.fromhex("12 01 00 00 ff 00")
    assert scsi.inquiry(0x80) == bytes.fromhex("12 01 80 00 ff 00")
    assert scsi.inquiry(0x83, allocation_length=0x1000) == bytes.fromhex("12 01 83 10 00 00")
    assert scsi.inquiry(scsi.VpdPage.BLOCK_LIMITS) == bytes.fromhex("12 01 b0 00 ff 00")
    assert scsi.inquiry(0xB1)[2] == 0xB1
    assert scsi.inquiry(0xB2)[2] == 0xB2
    with pytest.raises(ValueError):
        scsi.inquiry(0x100)
    with pytest.raises(ValueError):
        scsi.inquiry(allocation_length=0x10000)


def test_read_capacity() -> None:
    assert scsi.read_capacity10() == bytes.fromhex("25 00 00 00 00 00 00 00 00 00")
    assert scsi.read_capacity16() == bytes.fromhex("9e 10 0000000000000000 00000020 00 00")
    assert scsi.read_capacity16(allocation_length=12)[10:14] == bytes.fromhex("0000000c")


def test_read_write_10_and_16() -> None:
    assert scsi.read10(0x12345678, 8) == bytes.fromhex("28 00 12345678 00 0008 00")
    assert scsi.read10(1, 1, fua=True) == bytes.fromhex("28 08 00000001 00 0001 00")
    assert scsi.write10(2048, 0xFFFF) == bytes.fromhex("2a 00 00000800 00 ffff 00")
    assert scsi.read16(0x1_0000_0000, 0x10000) == bytes.fromhex(
        "88 00 0000000100000000 00010000 00 00"
    )
    assert scsi.write16(5, 3, fua=True) == bytes.fromhex("8a 08 0000000000000005 00000003 00 00")
    with pytest.raises(ValueError):
        scsi.read10(0x1_0000_0000, 1)
    with pytest.raises(ValueError):
        scsi.read10(0, 0x10000)
    with pytest.raises(ValueError):
        scsi.write16(-1, 1)
    with pytest.raises(ValueError):
        scsi.write16(0, 0x1_0000_0000)


@pytest.mark.parametrize(
    ("lba", "blocks", "opcode"),
    [
        (0, 8, 0x28),
        (0xFFFF_FFF8, 8, 0x28),  # ends exactly at LBA 2**32-1
        (0xFFFF_FFF8, 9, 0x88),  # would reach LBA 2**32
        (0x1_0000_0000, 1, 0x88),
        (0, 0xFFFF, 0x28),
        (0, 0x10000, 0x88),
        (0, 0, 0x28),
    ],
)
def test_read_write_choose_cdb_size(lba: int, blocks: int, opcode: int) -> None:
    assert scsi.read(lba, blocks)[0] == opcode
    assert scsi.write(lba, blocks)[0] == opcode + 2


def test_synchronize_cache() -> None:
    assert scsi.synchronize_cache10() == bytes.fromhex("35 00 00000000 00 0000 00")
    assert scsi.synchronize_cache10(16, 4, immed=True) == bytes.fromhex("35 02 00000010 00 0004 00")
    assert scsi.synchronize_cache16(0x1_0000_0000, 1, immed=True) == bytes.fromhex(
        "91 02 0000000100000000 00000001 00 00"
    )


def test_report_luns() -> None:
    assert scsi.report_luns() == bytes.fromhex("a0 00 00 000000 00001000 00 00")
    assert scsi.report_luns(select_report=2, allocation_length=16) == bytes.fromhex(
        "a0 00 02 000000 00000010 00 00"
    )
    with pytest.raises(ValueError):
        scsi.report_luns(allocation_length=15)


def test_mode_sense() -> None:
    assert scsi.mode_sense6() == bytes.fromhex("1a 08 3f 00 ff 00")
    assert scsi.mode_sense6(
        scsi.ModePage.CACHING, pc=scsi.PageControl.CHANGEABLE, dbd=False, allocation_length=32
    ) == bytes.fromhex("1a 00 48 00 20 00")
    assert scsi.mode_sense10(0x0A, 0x01, llbaa=True) == bytes.fromhex(
        "5a 18 0a 01 00 00 00 1000 00"
    )
    assert scsi.mode_sense10(pc=scsi.PageControl.SAVED, dbd=False)[2] == 0xFF
    with pytest.raises(ValueError):
        scsi.mode_sense6(0x40)


def test_command_name_and_describe() -> None:
    assert scsi.command_name(scsi.read16(0, 1)) == "READ(16)"
    assert scsi.command_name(scsi.read_capacity16()) == "READ CAPACITY(16)"
    assert scsi.command_name(bytes([0x9E, 0x12]) + bytes(14)) == "GET LBA STATUS"
    assert scsi.command_name(bytes([0xC0]) + bytes(5)) == "opcode 0xC0"
    assert scsi.command_name(b"") == "empty CDB"
    assert scsi.describe_cdb(scsi.read16(2048, 8)) == "READ(16) at LBA 2048"
    assert scsi.describe_cdb(scsi.write10(7, 1)) == "WRITE(10) at LBA 7"
    assert scsi.describe_cdb(bytes.fromhex("08 1f ff ff 01 00")) == "READ(6) at LBA 2097151"
    assert scsi.describe_cdb(scsi.synchronize_cache16(9)) == "SYNCHRONIZE CACHE(16) at LBA 9"
    assert scsi.describe_cdb(scsi.inquiry(0x83)) == "INQUIRY VPD page 0x83"
    assert scsi.describe_cdb(scsi.test_unit_ready()) == "TEST UNIT READY"
