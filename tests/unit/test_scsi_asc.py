"""initiator.scsi.asc: ASC/ASCQ in words."""

from __future__ import annotations

import pytest

from initiator import scsi
from initiator.scsi import asc as asc_module


@pytest.mark.parametrize(
    ("asc", "ascq", "text"),
    [
        (0x04, 0x01, "logical unit is in process of becoming ready"),
        (0x04, 0x0B, "logical unit not accessible, target port in standby state"),
        (0x03, 0x00, "peripheral device write fault"),
        (0x11, 0x00, "unrecovered read error"),
        (0x0C, 0x00, "write error"),
        (0x21, 0x00, "logical block address out of range"),
        (0x24, 0x00, "invalid field in CDB"),
        (0x20, 0x00, "invalid command operation code"),
        (0x25, 0x00, "logical unit not supported"),
        (0x29, 0x00, "power on, reset, or bus device reset occurred"),
        (0x29, 0x07, "I_T nexus loss occurred"),
        (0x2A, 0x01, "mode parameters changed"),
        (0x2A, 0x09, "capacity data has changed"),
        (0x3F, 0x0E, "reported luns data has changed"),
        (0x27, 0x00, "write protected"),
        (0x27, 0x07, "space allocation failed write protect"),
        (0x38, 0x07, "thin provisioning soft threshold reached"),
        (0x47, 0x00, "SCSI parity error"),
        (0x47, 0x7F, "some commands cleared by iSCSI protocol event"),
        (0x4B, 0x00, "data phase error"),
        (0x4B, 0x07, "connection lost"),
        (0x44, 0x00, "internal target failure"),
        (0x3A, 0x00, "medium not present"),
        (0x5D, 0x00, "failure prediction threshold exceeded"),
        (0x55, 0x03, "insufficient resources"),
        (0x40, 0x91, "diagnostic failure on component 0x91"),
        (0x4D, 0x2A, "tagged overlapped commands (task tag 0x2A)"),
        (0x70, 0x03, "decompression exception short algorithm id of 0x03"),
        (0x7E, 0x01, "ASC 0x7E ASCQ 0x01"),
        (0x80, 0x01, "ASC 0x80 ASCQ 0x01 (vendor specific)"),
        (0x11, 0xF0, "ASC 0x11 ASCQ 0xF0 (vendor specific)"),
    ],
)
def test_asc_text(asc: int, ascq: int, text: str) -> None:
    assert scsi.asc_text(asc, ascq) == text


def test_asc_table_is_broad() -> None:
    assert len(asc_module._ASC_TABLE) > 400
    assert all(text and text == text.strip() for text in asc_module._ASC_TABLE.values())


def test_lun_not_supported_names_the_command_that_lists_the_luns() -> None:
    hint = scsi.asc_hint(0x25, 0x00)
    assert hint is not None and "hbactl discover --luns iscsi://<portal>" in hint
