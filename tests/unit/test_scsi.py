"""initiator.scsi: CDB builders, data parsers, sense data, ScsiCommandError (hand-built vectors)."""

from __future__ import annotations

import pytest

from initiator import scsi
from initiator.command import CommandResult, ScsiStatus
from initiator.errors import CommandError, RemoteProtocolError
from initiator.scsi import (
    AddressMethod,
    Association,
    DesignatorType,
    ScsiCommandError,
    ScsiDataError,
    SenseKey,
)

# ---------------------------------------------------------------------------------------------
# CDB builders
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# INQUIRY and VPD parsers
# ---------------------------------------------------------------------------------------------

STANDARD_INQUIRY = (
    bytes([0x00, 0x00, 0x06, 0x12, 0x5B, 0x08 | 0x10, 0x10, 0x02])
    + b"LIO-ORG "
    + b"disk1           "
    + b"4.0 "
    + bytes(60)
)


def test_standard_inquiry() -> None:
    inq = scsi.parse_standard_inquiry(STANDARD_INQUIRY)
    assert inq.peripheral_qualifier == 0
    assert inq.peripheral_device_type == scsi.PeripheralDeviceType.DISK
    assert inq.device_type_name == "disk"
    assert inq.connected
    assert not inq.removable
    assert inq.version == 6
    assert inq.hisup and not inq.normaca
    assert inq.response_data_format == 2
    assert inq.tpgs == 1 and inq.three_pc and not inq.protect
    assert inq.multip and inq.cmdque
    assert (inq.vendor, inq.product, inq.revision) == ("LIO-ORG", "disk1", "4.0")


def test_standard_inquiry_no_lun_and_odd_type() -> None:
    raw = bytes([0x7F, 0x80]) + STANDARD_INQUIRY[2:]
    inq = scsi.parse_standard_inquiry(raw)
    assert inq.peripheral_qualifier == 3 and not inq.connected
    assert inq.device_type_name == "unknown"
    assert inq.removable
    assert scsi.parse_standard_inquiry(bytes([0x15]) + raw[1:]).device_type_name == "type 0x15"


def test_standard_inquiry_too_short() -> None:
    with pytest.raises(ScsiDataError, match="36"):
        scsi.parse_standard_inquiry(STANDARD_INQUIRY[:35])


def test_supported_pages_and_serial() -> None:
    pages = bytes.fromhex("00 00 0006 00 80 83 b0 b1 b2")
    assert scsi.parse_supported_vpd_pages(pages) == (0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2)
    serial = bytes.fromhex("00 80 000c") + b"  abc-123   "
    assert scsi.parse_unit_serial_number(serial) == "abc-123"
    with pytest.raises(ScsiDataError, match="expected VPD page 0x80"):
        scsi.parse_unit_serial_number(pages)


def test_vpd_truncated_says_what_to_do() -> None:
    data = bytes.fromhex("00 83 0100") + bytes(251)
    assert scsi.vpd_page_length(data) == 260
    with pytest.raises(ScsiDataError, match="allocation length of at least 260"):
        scsi.parse_device_identification(data)
    with pytest.raises(ScsiDataError):
        scsi.vpd_page_length(b"\x00\x83")


NAA6 = bytes.fromhex("6001405f2a7e8a1b9c3d4e5f60718293")
NAA5 = bytes.fromhex("5000c500a1b2c3d4")
NAA3 = bytes.fromhex("3000000000000001")
NAA2 = bytes.fromhex("2000001b32123456")
EUI64 = bytes.fromhex("0123456789abcdef")


def _designator(code_set: int, piv_assoc_type: int, value: bytes, proto: int = 0) -> bytes:
    return bytes([(proto << 4) | code_set, piv_assoc_type, 0, len(value)]) + value


def _page83(*descriptors: bytes) -> bytes:
    body = b"".join(descriptors)
    return bytes([0x00, 0x83]) + len(body).to_bytes(2, "big") + body


PAGE83 = _page83(
    _designator(1, 0x03, NAA5),  # LU, NAA 5
    _designator(1, 0x03, NAA6),  # LU, NAA 6
    _designator(2, 0x01, b"LIO-ORG disk1:0123"),  # LU, T10 vendor id
    _designator(3, 0x08, b"iqn.2003-01.org.example:disk1\0\0\0"),  # LU, SCSI name string
    _designator(1, 0x94, (1).to_bytes(4, "big"), proto=5),  # target port, relative port, iSCSI
    _designator(1, 0x95, (7).to_bytes(4, "big"), proto=5),  # target port, TPG 7
    _designator(1, 0x02, EUI64),  # LU, EUI-64
    _designator(1, 0x13, NAA3),  # target port, NAA 3 (no PIV)
)


def test_device_identification() -> None:
    ident = scsi.parse_device_identification(PAGE83)
    d = ident.designators
    assert len(d) == 8
    assert d[0].designator_type == DesignatorType.NAA and d[0].naa_type == 5
    assert d[0].ieee_company_id == 0x000C50
    assert d[0].text == "naa.5000c500a1b2c3d4"
    assert d[0].wwn == "0x5000c500a1b2c3d4"
    assert d[1].naa_type == 6
    assert d[1].ieee_company_id == 0x001405
    assert d[1].text == "naa.6001405f2a7e8a1b9c3d4e5f60718293"
    assert d[1].wwn == "0x6001405f2a7e8a1b9c3d4e5f60718293"
    assert d[1].id_wwn == "0x6001405f2a7e8a1b"
    assert d[0].id_wwn == d[0].wwn
    assert d[1].by_id_link == "/dev/disk/by-id/wwn-0x6001405f2a7e8a1b9c3d4e5f60718293"
    assert d[2].text == "t10.LIO-ORG disk1:0123"
    assert d[3].text == "iqn.2003-01.org.example:disk1"
    assert d[4].association == Association.TARGET_PORT
    assert d[4].protocol_identifier == 5
    assert d[4].text == "1"
    assert d[5].designator_type == DesignatorType.TARGET_PORT_GROUP and d[5].text == "7"
    assert d[6].text == "eui.0123456789abcdef" and d[6].wwn is None and d[6].id_wwn is None
    assert d[7].association == Association.TARGET_PORT and d[7].protocol_identifier is None
    assert d[7].by_id_link is None  # not an LU designator
    # udev's order: NAA 6 before NAA 5, whatever the page order.
    assert ident.naa is d[1]
    assert ident.scsi_name == "iqn.2003-01.org.example:disk1"
    assert len(ident.for_association(Association.LOGICAL_UNIT)) == 5


def test_device_identification_naa2_and_naa3_preference() -> None:
    ident = scsi.parse_device_identification(
        _page83(_designator(1, 0x03, NAA3), _designator(1, 0x03, NAA2))
    )
    assert ident.naa is not None and ident.naa.naa_type == 2
    assert ident.naa.ieee_company_id == 0x001B32
    assert ident.designators[0].ieee_company_id is None
    assert scsi.parse_device_identification(_page83()).naa is None


@pytest.mark.parametrize(
    ("page", "message"),
    [
        (_page83(_designator(1, 0x03, NAA6[:8])), "NAA type 6 designator is 8 bytes"),
        (_page83(_designator(1, 0x03, NAA5 + b"\0")), "NAA type 5 designator is 9 bytes"),
        (_page83(_designator(1, 0x03, b"")), "empty NAA"),
        (bytes.fromhex("00 83 0002 01 03"), "inside a designation descriptor header"),
        (bytes.fromhex("00 83 0006 01 03 00 08 60 01"), "claims 8 bytes"),
    ],
)
def test_device_identification_malformed(page: bytes, message: str) -> None:
    with pytest.raises(ScsiDataError, match=message):
        scsi.parse_device_identification(page)


def test_block_limits_full_page() -> None:
    page = bytes.fromhex(
        "00 b0 003c"
        "01 10 0008"  # WSNZ, max compare-and-write 16, optimal granularity 8
        "00004000 00000400 00000000"  # max transfer 16384, optimal 1024, prefetch 0
        "00100000 00000100 00000008"  # max unmap LBAs, descriptors, optimal unmap granularity
        "80000002"  # UGAVALID, alignment 2
        "0000000000010000"  # max write same
        "00000020 00000001 00000001 00000040 00000080"  # atomic fields
    )
    limits = scsi.parse_block_limits(page)
    assert limits.wsnz
    assert limits.max_compare_and_write_length == 16
    assert limits.optimal_transfer_length_granularity == 8
    assert limits.max_transfer_length == 16384
    assert limits.optimal_transfer_length == 1024
    assert limits.max_prefetch_length == 0
    assert limits.max_unmap_lba_count == 0x100000
    assert limits.max_unmap_block_descriptor_count == 256
    assert limits.optimal_unmap_granularity == 8
    assert limits.unmap_granularity_alignment == 2
    assert limits.max_write_same_length == 0x10000
    assert limits.max_atomic_transfer_length == 32
    assert limits.atomic_alignment == 1
    assert limits.atomic_transfer_length_granularity == 1
    assert limits.max_atomic_transfer_length_with_boundary == 64
    assert limits.max_atomic_boundary_size == 128


def test_block_limits_short_sbc2_page() -> None:
    page = bytes.fromhex("00 b0 0010 00 00 0001 00000800 00000080 00000000")
    limits = scsi.parse_block_limits(page)
    assert limits.max_transfer_length == 2048
    assert limits.optimal_transfer_length == 128
    assert limits.max_unmap_lba_count == 0
    assert limits.unmap_granularity_alignment is None
    assert limits.max_write_same_length == 0


def test_block_device_characteristics() -> None:
    bdc = scsi.parse_block_device_characteristics(
        bytes.fromhex("00 b1 003c 0001 00 03 13") + bytes(55)
    )
    assert bdc.medium_rotation_rate == 1 and bdc.non_rotating
    assert bdc.nominal_form_factor == 3
    assert bdc.zoned == 1 and bdc.fuab and bdc.vbuls
    rotating = scsi.parse_block_device_characteristics(bytes.fromhex("00 b1 0002 1c20"))
    assert rotating.medium_rotation_rate == 7200 and not rotating.non_rotating


def test_logical_block_provisioning() -> None:
    lbp = scsi.parse_logical_block_provisioning(bytes.fromhex("00 b2 0004 0a e7 22 05"))
    assert lbp.threshold_exponent == 10
    assert lbp.lbpu and lbp.lbpws and lbp.lbpws10
    assert lbp.lbprz == 1
    assert lbp.anc_sup and lbp.dp
    assert lbp.minimum_percentage == 4
    assert lbp.provisioning_type == scsi.ProvisioningType.THIN and lbp.thin
    assert lbp.threshold_percentage == 5


# ---------------------------------------------------------------------------------------------
# READ CAPACITY
# ---------------------------------------------------------------------------------------------


def test_read_capacity10() -> None:
    cap = scsi.parse_read_capacity10(bytes.fromhex("001fffff 00000200"))
    assert cap.last_lba == 0x1FFFFF
    assert cap.blocks == 0x200000
    assert cap.block_size == 512
    assert cap.size_bytes == 1 << 30
    assert not cap.needs_read_capacity16
    assert scsi.parse_read_capacity10(bytes.fromhex("ffffffff 00000200")).needs_read_capacity16
    with pytest.raises(ScsiDataError):
        scsi.parse_read_capacity10(bytes(7))


def test_read_capacity16() -> None:
    data = bytes.fromhex("00000001ffffffff 00001000 05 13 c0 07") + bytes(16)
    cap = scsi.parse_read_capacity16(data)
    assert cap.last_lba == 0x1_FFFF_FFFF
    assert cap.blocks == 0x2_0000_0000
    assert cap.block_size == 4096
    assert cap.size_bytes == 0x2_0000_0000 * 4096
    assert cap.p_type == 2 and cap.prot_en
    assert cap.p_i_exponent == 1
    assert cap.logical_blocks_per_physical_exponent == 3
    assert cap.physical_block_size == 32768
    assert cap.lbpme and cap.lbprz
    assert cap.lowest_aligned_lba == 7
    short = scsi.parse_read_capacity16(bytes.fromhex("0000000000000fff 00000200"))
    assert short.blocks == 4096 and not short.lbpme and short.physical_block_size == 512
    with pytest.raises(ScsiDataError):
        scsi.parse_read_capacity16(bytes(11))


# ---------------------------------------------------------------------------------------------
# LUNs
# ---------------------------------------------------------------------------------------------


def test_decode_lun_methods() -> None:
    lun = scsi.decode_lun(bytes.fromhex("0005000000000000"))
    assert (lun.method, lun.value, lun.bus, lun.number) == (AddressMethod.PERIPHERAL, 5, 0, 5)
    assert str(lun) == "5"
    flat = scsi.decode_lun(bytes.fromhex("412c000000000000"))
    assert (flat.method, flat.value, flat.number) == (AddressMethod.FLAT, 300, 0x412C)
    assert "flat" in str(flat)
    bus = scsi.decode_lun(bytes.fromhex("012c000000000000"))
    assert (bus.method, bus.bus, bus.value, bus.number) == (AddressMethod.PERIPHERAL, 1, 44, 300)
    lu = scsi.decode_lun(bytes.fromhex("8a65000000000000"))
    assert (lu.method, lu.target, lu.bus, lu.value) == (AddressMethod.LOGICAL_UNIT, 10, 3, 5)
    wlun = scsi.decode_lun(bytes.fromhex("c101000000000000"))
    assert wlun.method == AddressMethod.EXTENDED and wlun.well_known and wlun.value == 1
    assert str(wlun) == "W-LUN 0x01"
    two_level = scsi.decode_lun(bytes.fromhex("0001000200000000"))
    assert two_level.hierarchical and two_level.number == 0x0002_0001
    with pytest.raises(ScsiDataError):
        scsi.decode_lun(bytes(7))


@pytest.mark.parametrize("number", [0, 1, 255, 256, 300, 0x4000 | 300, 0xC101, 0x0002_0001])
def test_encode_lun_round_trip(number: int) -> None:
    assert scsi.decode_lun(scsi.encode_lun(number)).number == number


def test_encode_lun_vectors() -> None:
    assert scsi.encode_lun(0) == bytes(8)
    assert scsi.encode_lun(5) == bytes.fromhex("0005000000000000")
    assert scsi.encode_lun(0x412C) == bytes.fromhex("412c000000000000")
    with pytest.raises(ValueError):
        scsi.encode_lun(-1)


def test_report_luns_parse() -> None:
    data = bytes.fromhex("00000018 00000000 0000000000000000 0001000000000000 412c000000000000")
    report = scsi.parse_report_luns(data)
    assert [lun.number for lun in report.luns] == [0, 1, 0x412C]
    assert report.complete
    assert report.required_allocation_length == 32


def test_report_luns_truncated() -> None:
    data = bytes.fromhex("00000100 00000000 0000000000000000 0001000000000000")
    report = scsi.parse_report_luns(data)
    assert len(report.luns) == 2
    assert not report.complete
    assert report.required_allocation_length == 0x108


def test_report_luns_malformed() -> None:
    with pytest.raises(ScsiDataError, match="header"):
        scsi.parse_report_luns(bytes(7))
    with pytest.raises(ScsiDataError, match="multiple of 8"):
        scsi.parse_report_luns(bytes.fromhex("00000009 00000000") + bytes(9))


# ---------------------------------------------------------------------------------------------
# MODE SENSE
# ---------------------------------------------------------------------------------------------


def test_mode_sense6_parse() -> None:
    caching = bytes.fromhex("08 12 04") + bytes(17)  # page 08h, length 18, WCE set
    control = bytes.fromhex("0a 0a") + bytes(10)
    header = bytes([3 + 8 + len(caching) + len(control), 0x00, 0x90, 8])
    data = header + bytes.fromhex("0000100000000200") + caching + control
    mode = scsi.parse_mode_sense6(data)
    assert mode.write_protect and mode.dpofua
    assert mode.block_descriptors == bytes.fromhex("0000100000000200")
    assert mode.pages[(0x08, 0)] == caching
    assert mode.pages[(0x0A, 0)] == control


def test_mode_sense10_parse_with_subpage() -> None:
    subpage = bytes.fromhex("4a 01 0004 11223344")  # SPF: page 0Ah subpage 01h
    body = subpage
    header = (6 + len(body)).to_bytes(2, "big") + bytes([0x00, 0x00, 0x00, 0x00, 0x00, 0x00])
    mode = scsi.parse_mode_sense10(header + body)
    assert not mode.write_protect
    assert mode.pages == {(0x0A, 0x01): subpage}


def test_mode_sense_malformed() -> None:
    with pytest.raises(ScsiDataError):
        scsi.parse_mode_sense6(bytes(3))
    with pytest.raises(ScsiDataError):
        scsi.parse_mode_sense10(bytes(7))
    with pytest.raises(ScsiDataError, match="claims"):
        scsi.parse_mode_sense6(bytes([5, 0, 0, 0, 0x08, 0x12]))
    with pytest.raises(ScsiDataError, match="block descriptors"):
        scsi.parse_mode_sense6(bytes([3, 0, 0, 8]))


# ---------------------------------------------------------------------------------------------
# Sense data
# ---------------------------------------------------------------------------------------------

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
    assert len(scsi._ASC_TABLE) > 400
    assert all(text and text == text.strip() for text in scsi._ASC_TABLE.values())


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


# ---------------------------------------------------------------------------------------------
# ScsiCommandError
# ---------------------------------------------------------------------------------------------


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


def test_scsi_data_error_is_remote() -> None:
    assert issubclass(ScsiDataError, RemoteProtocolError)
