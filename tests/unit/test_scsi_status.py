"""initiator.scsi.status: ScsiCommandError, check_result, check_transfer, retryable."""

from __future__ import annotations

import pytest

from initiator import scsi
from initiator.command import CommandResult, ScsiStatus
from initiator.errors import CommandError
from initiator.scsi import ScsiCommandError, SenseKey
from tests.unit.test_scsi_sense import DESCRIPTOR_MEDIUM_ERROR


def test_scsi_command_error_medium_error() -> None:
    err = ScsiCommandError.from_status(
        scsi.read16(2048, 8),
        ScsiStatus.CHECK_CONDITION,
        scsi.build_fixed_sense(SenseKey.MEDIUM_ERROR, 0x11, 0x00),
    )
    assert (
        str(err) == "READ(16) at LBA 2048 failed: MEDIUM ERROR, unrecovered read error (03/11/00)"
    )
    assert isinstance(err, CommandError)
    assert err.status == ScsiStatus.CHECK_CONDITION
    assert (err.sense_key, err.asc, err.ascq) == (SenseKey.MEDIUM_ERROR, 0x11, 0x00)
    assert err.sense is not None and err.cdb[0] == 0x88


def test_scsi_command_error_details_and_hints() -> None:
    err = ScsiCommandError.from_status(
        scsi.read10(100, 8), ScsiStatus.CHECK_CONDITION, DESCRIPTOR_MEDIUM_ERROR
    )
    assert str(err).endswith("(03/11/00) at LBA 2050")
    err = ScsiCommandError.from_status(
        scsi.write16(1 << 40, 1),
        ScsiStatus.CHECK_CONDITION,
        scsi.build_fixed_sense(SenseKey.ILLEGAL_REQUEST, 0x21, 0x00),
        where="iqn.2003-01.org.example:disk1 LUN 0",
    )
    assert str(err).startswith(
        "iqn.2003-01.org.example:disk1 LUN 0: WRITE(16) at LBA 1099511627776 failed: "
        "ILLEGAL REQUEST, logical block address out of range (05/21/00)"
    )
    assert err.hint is not None and "capacity" in err.hint and err.hint in str(err)
    err = ScsiCommandError.from_status(
        bytes([0xC0]) + bytes(5),
        ScsiStatus.CHECK_CONDITION,
        scsi.build_fixed_sense(
            SenseKey.ILLEGAL_REQUEST, 0x24, 0x00, sense_key_specific=scsi.field_pointer(1, bit=2)
        ),
    )
    assert "invalid field in CDB (05/24/00) at byte 1 bit 2 of the CDB" in str(err)
    err = ScsiCommandError.from_status(
        scsi.test_unit_ready(),
        ScsiStatus.CHECK_CONDITION,
        scsi.build_fixed_sense(SenseKey.NOT_READY, 0x04, 0x04, sense_key_specific=b"\x80\x80\x00"),
    )
    assert "(50% done)" in str(err)
    assert "backing store" in str(err)


def test_scsi_command_error_other_statuses() -> None:
    err = ScsiCommandError.from_status(scsi.write10(0, 1), ScsiStatus.RESERVATION_CONFLICT)
    assert str(err).startswith(
        "WRITE(10) at LBA 0 failed: status RESERVATION CONFLICT (0x18); another initiator"
    )
    assert err.sense is None and err.sense_key is None
    err = ScsiCommandError.from_status(scsi.test_unit_ready(), 0x99)
    assert "status unknown (0x99)" in str(err) and err.status == 0x99
    err = ScsiCommandError.from_status(scsi.test_unit_ready(), ScsiStatus.CHECK_CONDITION)
    assert str(err) == "TEST UNIT READY failed: CHECK CONDITION without sense data"
    err = ScsiCommandError.from_status(scsi.test_unit_ready(), ScsiStatus.CHECK_CONDITION, b"\x7f")
    assert "unreadable sense data" in str(err)


def test_check_result() -> None:
    cdb = scsi.read10(0, 1)
    scsi.check_result(cdb, CommandResult(status=ScsiStatus.GOOD))
    scsi.check_result(cdb, CommandResult(status=ScsiStatus.CONDITION_MET))
    recovered = scsi.build_fixed_sense(SenseKey.RECOVERED_ERROR, 0x17, 0x01)
    scsi.check_result(cdb, CommandResult(status=ScsiStatus.CHECK_CONDITION, sense=recovered))
    ua = scsi.build_fixed_sense(SenseKey.UNIT_ATTENTION, 0x29, 0x00)
    with pytest.raises(ScsiCommandError, match="UNIT ATTENTION") as info:
        scsi.check_result(cdb, CommandResult(status=ScsiStatus.CHECK_CONDITION, sense=ua))
    assert info.value.sense_key == SenseKey.UNIT_ATTENTION
    with pytest.raises(ScsiCommandError, match="BUSY"):
        scsi.check_result(cdb, CommandResult(status=ScsiStatus.BUSY))
    with pytest.raises(ScsiCommandError, match="unreadable"):
        scsi.check_result(cdb, CommandResult(status=ScsiStatus.CHECK_CONDITION, sense=b"\x00"))


def test_check_transfer_accepts_what_a_command_may_return() -> None:
    inquiry = scsi.inquiry()
    # INQUIRY with allocation length 255 returns what it has, with an underflow residual.
    assert scsi.check_transfer(inquiry, CommandResult(0, residual=219, data_in_length=36), 255,
                               minimum=36) == 36
    assert scsi.check_transfer(scsi.read(0, 8), CommandResult(0, data_in_length=4096),
                               4096) == 4096
    assert scsi.check_transfer(scsi.write(0, 8), CommandResult(0), 4096, data_in=False) == 4096


def test_retryable_reads_sense_as_linux_does() -> None:
    def result(sense: bytes, status: int = 0x02) -> CommandResult:
        return CommandResult(status, sense=sense)

    ua_descriptor = bytes((0x72, 0x06, 0x29, 0x00, 0, 0, 0, 0))
    assert scsi.retryable(result(ua_descriptor)) is scsi.Retry.NOW
    deferred = bytearray(scsi.build_fixed_sense(scsi.SenseKey.ILLEGAL_REQUEST, 0x24, 0))
    deferred[0] = 0x71
    assert scsi.retryable(result(bytes(deferred))) is scsi.Retry.NOW
    assert scsi.retryable(result(b"")) is None                  # no sense: nothing to go by
    assert scsi.retryable(result(b"\x70\x00")) is None          # unreadable sense
    assert scsi.retryable(CommandResult(0)) is None
    assert scsi.retryable(result(scsi.build_fixed_sense(
        scsi.SenseKey.ABORTED_COMMAND, 0x2E, 0x02))) is None   # command duration limit
