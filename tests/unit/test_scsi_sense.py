"""initiator.scsi.sense: fixed and descriptor sense data, sense keys, the fixed-format builder."""

from __future__ import annotations

import pytest

from initiator import scsi
from initiator.scsi import ScsiDataError, SenseKey

FIXED_MEDIUM_ERROR = bytes.fromhex("f0 00 03 00000802 0a 00000000 11 00 00 000000")
DESCRIPTOR_MEDIUM_ERROR = bytes.fromhex("72 03 11 00 000000 0c 00 0a 80 00 0000000000000802")


def test_fixed_sense() -> None:
    sense = scsi.parse_sense(FIXED_MEDIUM_ERROR)
    assert sense.response_code == 0x70
    assert not sense.descriptor_format and not sense.deferred
    assert sense.sense_key == SenseKey.MEDIUM_ERROR
    assert (sense.asc, sense.ascq) == (0x11, 0x00)
    assert sense.information == 0x802
    assert sense.command_specific == 0
    assert sense.sense_key_specific is None
    assert sense.asc_text == "unrecovered read error"
    assert sense.codes == "03/11/00"
    assert sense.description == "MEDIUM ERROR, unrecovered read error (03/11/00)"


def test_fixed_sense_information_not_valid_and_flags() -> None:
    raw = bytes.fromhex("71 00 e5 00000010 0a 00000000 24 00 00 cf0002")
    sense = scsi.parse_sense(raw)
    assert sense.deferred
    assert sense.information is None  # VALID bit clear
    assert sense.filemark and sense.eom and sense.ili
    assert sense.sense_key == SenseKey.ILLEGAL_REQUEST
    assert sense.sense_key_specific == bytes.fromhex("cf0002")
    assert sense.field_pointer == (True, 2, 7)
    assert sense.description.startswith("deferred ILLEGAL REQUEST, invalid field in CDB")


def test_fixed_sense_short_and_additional_length() -> None:
    short = scsi.parse_sense(bytes.fromhex("70 00 06 00 00 00 00 00"))
    assert short.sense_key == SenseKey.UNIT_ATTENTION
    assert (short.asc, short.ascq) == (0, 0)
    assert short.information is None and short.command_specific is None
    # bytes past ADDITIONAL SENSE LENGTH are ignored
    cut = scsi.parse_sense(bytes.fromhex("70 00 06 00000000 06 00000000 29 00 ff ffffff"))
    assert (cut.asc, cut.ascq) == (0x29, 0x00)
    assert cut.fru == 0 and cut.sense_key_specific is None


def test_descriptor_sense() -> None:
    sense = scsi.parse_sense(DESCRIPTOR_MEDIUM_ERROR)
    assert sense.descriptor_format and not sense.deferred
    assert sense.sense_key == SenseKey.MEDIUM_ERROR
    assert (sense.asc, sense.ascq) == (0x11, 0x00)
    assert sense.information == 0x802
    assert sense.description == "MEDIUM ERROR, unrecovered read error (03/11/00)"
    assert sense.descriptors[0].descriptor_type == 0x00


def test_descriptor_sense_all_descriptors() -> None:
    body = (
        bytes.fromhex("00 0a 00 00 0000000000000007")  # information, VALID clear
        + bytes.fromhex("01 0a 00 00 1122334455667788")  # command-specific
        + bytes.fromhex("02 06 00 00 80 12 34 00")  # sense-key specific, progress
        + bytes.fromhex("03 02 00 09")  # FRU
        + bytes.fromhex("04 02 00 e0")  # stream: filemark, EOM, ILI
    )
    raw = bytes([0x73, 0x02, 0x04, 0x04, 0, 0, 0, len(body)]) + body
    sense = scsi.parse_sense(raw)
    assert sense.deferred and sense.descriptor_format
    assert sense.sense_key == SenseKey.NOT_READY
    assert sense.asc_text == "logical unit not ready, format in progress"
    assert sense.information is None
    assert sense.command_specific == 0x1122334455667788
    assert sense.sense_key_specific == bytes.fromhex("801234")
    assert sense.progress == pytest.approx(0x1234 / 65536)
    assert sense.field_pointer is None
    assert sense.fru == 9
    assert sense.filemark and sense.eom and sense.ili
    assert [d.descriptor_type for d in sense.descriptors] == [0, 1, 2, 3, 4]


def test_descriptor_sense_block_ili_and_minimal() -> None:
    raw = bytes.fromhex("72 05 24 00 000000 04 05 02 00 20")
    sense = scsi.parse_sense(raw)
    assert sense.ili and sense.sense_key == SenseKey.ILLEGAL_REQUEST
    minimal = scsi.parse_sense(bytes.fromhex("72 06 2a 09"))
    assert minimal.asc_text == "capacity data has changed"
    assert minimal.descriptors == ()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "empty"),
        (bytes.fromhex("7f 00 00"), "response code 0x7F"),
        (bytes.fromhex("70 00"), "fixed-format sense data is 2 bytes"),
        (bytes.fromhex("72 00 00"), "descriptor-format sense data is 3 bytes"),
        (bytes.fromhex("72 03 11 00 000000 0c 00 0a 80 00 00"), "claims 10 bytes"),
    ],
)
def test_sense_malformed(raw: bytes, message: str) -> None:
    with pytest.raises(ScsiDataError, match=message):
        scsi.parse_sense(raw)


def test_sense_key_words() -> None:
    assert SenseKey.MEDIUM_ERROR.words == "MEDIUM ERROR"
    assert SenseKey(0xB).words == "ABORTED COMMAND"
    assert len(SenseKey) == 16  # every 4-bit value decodes


def test_build_fixed_sense_round_trip() -> None:
    raw = scsi.build_fixed_sense(SenseKey.MEDIUM_ERROR, 0x11, 0x00, information=0x802)
    assert raw == FIXED_MEDIUM_ERROR
    assert len(raw) == 18
    sense = scsi.parse_sense(raw)
    assert sense.information == 0x802


def test_build_fixed_sense_illegal_request_with_field_pointer() -> None:
    sks = scsi.field_pointer(2, bit=7)
    assert sks == bytes.fromhex("cf 0002")
    raw = scsi.build_fixed_sense(SenseKey.ILLEGAL_REQUEST, 0x24, 0x00, sense_key_specific=sks)
    assert raw == bytes.fromhex("70 00 05 00000000 0a 00000000 24 00 00 cf0002")
    sense = scsi.parse_sense(raw)
    assert sense.information is None
    assert sense.field_pointer == (True, 2, 7)
    assert scsi.field_pointer(4, in_cdb=False) == bytes.fromhex("80 0004")


def test_build_fixed_sense_flags_and_errors() -> None:
    raw = scsi.build_fixed_sense(
        SenseKey.ABORTED_COMMAND, 0x47, 0x7F, deferred=True, ili=True, fru=3, command_specific=9
    )
    sense = scsi.parse_sense(raw)
    assert sense.deferred and sense.ili and sense.fru == 3 and sense.command_specific == 9
    with pytest.raises(ValueError):
        scsi.build_fixed_sense(SenseKey.MEDIUM_ERROR, 0x11, 0, information=1 << 32)
    with pytest.raises(ValueError, match="SKSV"):
        scsi.build_fixed_sense(
            SenseKey.ILLEGAL_REQUEST, 0x24, 0, sense_key_specific=b"\x00\x00\x02"
        )
    with pytest.raises(ValueError):
        scsi.build_fixed_sense(0x10, 0, 0)
