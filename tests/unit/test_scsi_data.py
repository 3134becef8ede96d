"""initiator.scsi.data: INQUIRY, VPD, READ CAPACITY, LUN, REPORT LUNS and MODE SENSE data
(hand-built vectors)."""

from __future__ import annotations

import pytest

from initiator import scsi
from initiator.errors import RemoteProtocolError
from initiator.scsi import AddressMethod, Association, DesignatorType, ScsiDataError

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
    assert inq.connected and inq.block_device
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
    assert inq.device_type_name == "unknown" and not inq.block_device
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


def test_scsi_data_error_is_remote() -> None:
    assert issubclass(ScsiDataError, RemoteProtocolError)
