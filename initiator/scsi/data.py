"""Parameter data: what INQUIRY, the VPD pages, READ CAPACITY, REPORT LUNS and MODE SENSE return.

Each parser takes ``bytes``-like data exactly as a Data-In delivered it and returns a frozen
dataclass, or raises :class:`ScsiDataError` when the data is too short or inconsistent: nothing
a target sends is trusted, and the message says what to repeat (usually the command with a
larger allocation length). :class:`ScsiDataError` is also what the sense parser raises, so every
malformed piece of SCSI data ends as the same error.

LUNs live here too: the 8-byte SAM-5 LUN of REPORT LUNS data and iSCSI PDU headers, decoded into
its address method and encoded from the integer Linux, LIO and libiscsi use.

Identifier renderings follow what Linux shows: the kernel's ``wwid`` attribute
(``naa.6001405...``), udev's ``ID_WWN_WITH_EXTENSION`` used for the ``/dev/disk/by-id/wwn-0x...``
link, and ``sg_inq``/``sg_vpd``.

Sources: SPC-5 (INQUIRY, VPD pages, REPORT LUNS, MODE SENSE), SBC-4 (READ CAPACITY, the block
VPD pages), SAM-5 (LUN addressing).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from initiator.errors import RemoteProtocolError
from initiator.scsi.cdb import U32, U64, check_range

__all__ = [
    "BLOCK_DEVICE_TYPES",
    "AddressMethod",
    "Association",
    "BlockDeviceCharacteristics",
    "BlockLimits",
    "CodeSet",
    "Designator",
    "DesignatorType",
    "DeviceIdentification",
    "LogicalBlockProvisioning",
    "Lun",
    "ModeSense",
    "PeripheralDeviceType",
    "ProvisioningType",
    "ReadCapacity10",
    "ReadCapacity16",
    "ReportLuns",
    "ScsiDataError",
    "StandardInquiry",
    "VpdPage",
    "decode_lun",
    "encode_lun",
    "parse_block_device_characteristics",
    "parse_block_limits",
    "parse_device_identification",
    "parse_logical_block_provisioning",
    "parse_mode_sense6",
    "parse_mode_sense10",
    "parse_read_capacity10",
    "parse_read_capacity16",
    "parse_report_luns",
    "parse_standard_inquiry",
    "parse_supported_vpd_pages",
    "parse_unit_serial_number",
    "vpd_page_length",
]


class ScsiDataError(RemoteProtocolError):
    """Data a SCSI command returned (INQUIRY, VPD, capacity, LUN list, sense) is malformed."""


# --------------------------------------------------------------------------------------------
# Codes
# --------------------------------------------------------------------------------------------


class PeripheralDeviceType(enum.IntEnum):
    """PERIPHERAL DEVICE TYPE of INQUIRY data (SPC-5 §6.7.2, table 150)."""

    DISK = 0x00
    TAPE = 0x01
    PRINTER = 0x02
    PROCESSOR = 0x03
    WRITE_ONCE = 0x04
    CD_DVD = 0x05
    SCANNER = 0x06
    OPTICAL_MEMORY = 0x07
    MEDIUM_CHANGER = 0x08
    COMMUNICATIONS = 0x09
    STORAGE_ARRAY_CONTROLLER = 0x0C
    ENCLOSURE_SERVICES = 0x0D
    SIMPLIFIED_DIRECT_ACCESS = 0x0E
    OPTICAL_CARD = 0x0F
    BRIDGE_CONTROLLER = 0x10
    OBJECT_STORAGE = 0x11
    AUTOMATION_DRIVE_INTERFACE = 0x12
    SECURITY_MANAGER = 0x13
    HOST_MANAGED_ZONED = 0x14
    WELL_KNOWN_LU = 0x1E
    UNKNOWN = 0x1F


BLOCK_DEVICE_TYPES = frozenset({
    PeripheralDeviceType.DISK, PeripheralDeviceType.WRITE_ONCE, PeripheralDeviceType.CD_DVD,
    PeripheralDeviceType.OPTICAL_MEMORY, PeripheralDeviceType.SIMPLIFIED_DIRECT_ACCESS,
    PeripheralDeviceType.HOST_MANAGED_ZONED,
})
"""The peripheral device types READ CAPACITY applies to (SBC-4, MMC-6, RBC, ZBC)."""

class VpdPage(enum.IntEnum):
    """Vital product data page codes this module builds requests for and parses."""

    SUPPORTED_PAGES = 0x00
    UNIT_SERIAL_NUMBER = 0x80
    DEVICE_IDENTIFICATION = 0x83
    BLOCK_LIMITS = 0xB0
    BLOCK_DEVICE_CHARACTERISTICS = 0xB1
    LOGICAL_BLOCK_PROVISIONING = 0xB2


class DesignatorType(enum.IntEnum):
    """DESIGNATOR TYPE of a Device Identification VPD descriptor (SPC-5 table 597)."""

    VENDOR_SPECIFIC = 0x0
    T10_VENDOR_ID = 0x1
    EUI64 = 0x2
    NAA = 0x3
    RELATIVE_TARGET_PORT = 0x4
    TARGET_PORT_GROUP = 0x5
    LOGICAL_UNIT_GROUP = 0x6
    MD5_LOGICAL_UNIT = 0x7
    SCSI_NAME_STRING = 0x8
    PROTOCOL_SPECIFIC_PORT = 0x9
    UUID = 0xA


class CodeSet(enum.IntEnum):
    """CODE SET of a designation descriptor."""

    BINARY = 0x1
    ASCII = 0x2
    UTF8 = 0x3


class Association(enum.IntEnum):
    """What a designator names: the LU, the target port it was read through, or the target."""

    LOGICAL_UNIT = 0
    TARGET_PORT = 1
    TARGET_DEVICE = 2


class ProvisioningType(enum.IntEnum):
    """PROVISIONING TYPE of the Logical Block Provisioning VPD page (SBC-4 table 262)."""

    FULL = 0
    RESOURCE = 1
    THIN = 2


class AddressMethod(enum.IntEnum):
    """ADDRESS METHOD of the first level of a SAM-5 LUN (SAM-5 §4.7.4, table 11)."""

    PERIPHERAL = 0
    FLAT = 1
    LOGICAL_UNIT = 2
    EXTENDED = 3


# --------------------------------------------------------------------------------------------
# Parsers: INQUIRY and VPD pages
# --------------------------------------------------------------------------------------------

_VPD_HEADER = struct.Struct(">BBH")
_STANDARD_INQUIRY = struct.Struct(">BBBBBBBB8s16s4s")


def _ascii(raw: bytes) -> str:
    return raw.decode("ascii", errors="replace").rstrip(" \0")


@dataclass(frozen=True, slots=True)
class StandardInquiry:
    """Standard INQUIRY data (SPC-5 §6.7.2)."""

    peripheral_qualifier: int
    peripheral_device_type: int
    removable: bool
    version: int
    normaca: bool
    hisup: bool
    response_data_format: int
    sccs: bool
    tpgs: int
    three_pc: bool
    protect: bool
    encserv: bool
    multip: bool
    cmdque: bool
    vendor: str
    product: str
    revision: str

    @property
    def connected(self) -> bool:
        """A logical unit is attached at this LUN (qualifier 000b)."""
        return self.peripheral_qualifier == 0

    @property
    def block_device(self) -> bool:
        """The device type has blocks and a capacity (:data:`BLOCK_DEVICE_TYPES`)."""
        return self.peripheral_device_type in BLOCK_DEVICE_TYPES

    @property
    def device_type_name(self) -> str:
        """``disk``, ``tape``, ... or ``type 0xNN`` for reserved values."""
        try:
            return PeripheralDeviceType(self.peripheral_device_type).name.lower()
        except ValueError:
            return f"type 0x{self.peripheral_device_type:02X}"


def parse_standard_inquiry(data: bytes | bytearray | memoryview) -> StandardInquiry:
    """Parse standard INQUIRY data; at least the 36 bytes every device returns are needed."""
    raw = bytes(data)
    if len(raw) < _STANDARD_INQUIRY.size:
        raise ScsiDataError(
            f"standard INQUIRY data is {len(raw)} bytes; at least 36 are needed "
            "(repeat INQUIRY with an allocation length of 36 or more)"
        )
    (b0, b1, b2, b3, _addl, b5, b6, b7, vendor, product, revision) = _STANDARD_INQUIRY.unpack_from(
        raw
    )
    return StandardInquiry(
        peripheral_qualifier=b0 >> 5,
        peripheral_device_type=b0 & 0x1F,
        removable=bool(b1 & 0x80),
        version=b2,
        normaca=bool(b3 & 0x20),
        hisup=bool(b3 & 0x10),
        response_data_format=b3 & 0x0F,
        sccs=bool(b5 & 0x80),
        tpgs=(b5 >> 4) & 0x03,
        three_pc=bool(b5 & 0x08),
        protect=bool(b5 & 0x01),
        encserv=bool(b6 & 0x40),
        multip=bool(b6 & 0x10),
        cmdque=bool(b7 & 0x02),
        vendor=_ascii(vendor),
        product=_ascii(product),
        revision=_ascii(revision),
    )


def vpd_page_length(data: bytes | bytearray | memoryview) -> int:
    """The full size of the VPD page whose first bytes are ``data`` (header included).

    Use it to repeat INQUIRY with a large enough allocation length.
    """
    if len(data) < _VPD_HEADER.size:
        raise ScsiDataError(f"VPD page data is {len(data)} bytes; the header alone is 4")
    _pdt, _page, length = _VPD_HEADER.unpack_from(data)
    return _VPD_HEADER.size + int(length)


def _vpd_payload(data: bytes | bytearray | memoryview, page: int) -> bytes:
    raw = bytes(data)
    total = vpd_page_length(raw)
    if raw[1] != page:
        raise ScsiDataError(f"expected VPD page 0x{page:02X}, the target returned 0x{raw[1]:02X}")
    if len(raw) < total:
        raise ScsiDataError(
            f"VPD page 0x{page:02X} is {total} bytes but only {len(raw)} were returned; "
            f"repeat INQUIRY with an allocation length of at least {total}"
        )
    return raw[_VPD_HEADER.size : total]


def parse_supported_vpd_pages(data: bytes | bytearray | memoryview) -> tuple[int, ...]:
    """Supported VPD Pages (page 0x00): the page codes the device implements."""
    return tuple(_vpd_payload(data, VpdPage.SUPPORTED_PAGES))


def parse_unit_serial_number(data: bytes | bytearray | memoryview) -> str:
    """Unit Serial Number (page 0x80), without the padding spaces devices add."""
    return _vpd_payload(data, VpdPage.UNIT_SERIAL_NUMBER).decode("ascii", "replace").strip(" \0")


_NAA_LENGTHS = {0x2: 8, 0x3: 8, 0x5: 8, 0x6: 16}
# udev's scsi_id picks the LU designator in this order for ID_WWN (NAA 6, 5, 2, 3).
_NAA_PREFERENCE = (0x6, 0x5, 0x2, 0x3)


@dataclass(frozen=True, slots=True)
class Designator:
    """One designation descriptor of the Device Identification VPD page (SPC-5 §7.7.6)."""

    designator_type: int
    code_set: int
    association: int
    protocol_identifier: int | None
    value: bytes

    @property
    def naa_type(self) -> int | None:
        """The NAA field (2, 3, 5 or 6) of an NAA designator, else None."""
        if self.designator_type != DesignatorType.NAA or not self.value:
            return None
        return self.value[0] >> 4

    @property
    def ieee_company_id(self) -> int | None:
        """The IEEE company ID (OUI) inside an NAA 2, 5 or 6 designator."""
        naa = self.naa_type
        if naa in (0x5, 0x6):
            return (int.from_bytes(self.value[0:4], "big") >> 4) & 0xFFFFFF
        if naa == 0x2:
            return int.from_bytes(self.value[2:5], "big")
        return None

    @property
    def text(self) -> str:
        """The identifier as Linux's sysfs ``wwid`` attribute spells it.

        NAA ``naa.6001405...``, EUI-64 ``eui.0123...``, T10 vendor ID ``t10.VENDOR...``,
        a SCSI name string as itself, UUID ``uuid.xxxxxxxx-...``, anything else as hex.
        """
        kind = self.designator_type
        if kind == DesignatorType.NAA:
            return "naa." + self.value.hex()
        if kind == DesignatorType.EUI64:
            return "eui." + self.value.hex()
        if kind == DesignatorType.T10_VENDOR_ID:
            return "t10." + self.value.decode("ascii", "replace").rstrip(" \0")
        if kind == DesignatorType.SCSI_NAME_STRING:
            return self.value.decode("utf-8", "replace").rstrip("\0")
        if kind == DesignatorType.UUID and len(self.value) == 18:
            u = self.value[2:].hex()
            return f"uuid.{u[0:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:32]}"
        if kind in (DesignatorType.RELATIVE_TARGET_PORT, DesignatorType.TARGET_PORT_GROUP):
            return str(int.from_bytes(self.value[-2:], "big"))
        if kind == DesignatorType.LOGICAL_UNIT_GROUP:
            return str(int.from_bytes(self.value[-2:], "big"))
        if self.code_set in (CodeSet.ASCII, CodeSet.UTF8):
            return self.value.decode("utf-8", "replace").rstrip(" \0")
        return self.value.hex()

    @property
    def wwn(self) -> str | None:
        """``0x`` + all hex digits of an NAA designator: udev's ``ID_WWN_WITH_EXTENSION``,
        the name of the by-id link."""
        if self.naa_type is None:
            return None
        return "0x" + self.value.hex()

    @property
    def id_wwn(self) -> str | None:
        """udev's ``ID_WWN``: ``0x`` + the first 16 hex digits (an NAA 6 designator's
        vendor-specific extension cut off)."""
        if self.naa_type is None:
            return None
        return "0x" + self.value[:8].hex()

    @property
    def by_id_link(self) -> str | None:
        """The ``/dev/disk/by-id/wwn-0x...`` link udev creates for an NAA LU designator."""
        wwn = self.wwn
        if wwn is None or self.association != Association.LOGICAL_UNIT:
            return None
        return f"/dev/disk/by-id/wwn-{wwn}"


@dataclass(frozen=True, slots=True)
class DeviceIdentification:
    """The Device Identification VPD page (0x83): every designator, in the device's order."""

    designators: tuple[Designator, ...]

    def for_association(self, association: Association) -> tuple[Designator, ...]:
        """The designators naming the LU, the target port or the target device."""
        return tuple(d for d in self.designators if d.association == association)

    @property
    def naa(self) -> Designator | None:
        """The LU's preferred NAA designator, chosen as udev does (NAA 6, 5, 2, then 3)."""
        lu = [d for d in self.for_association(Association.LOGICAL_UNIT) if d.naa_type]
        for wanted in _NAA_PREFERENCE:
            for designator in lu:
                if designator.naa_type == wanted:
                    return designator
        return None

    @property
    def scsi_name(self) -> str | None:
        """The LU's SCSI name string designator, if any."""
        for d in self.for_association(Association.LOGICAL_UNIT):
            if d.designator_type == DesignatorType.SCSI_NAME_STRING:
                return d.text
        return None


def parse_device_identification(data: bytes | bytearray | memoryview) -> DeviceIdentification:
    """Device Identification (page 0x83); NAA designators have their length checked."""
    payload = _vpd_payload(data, VpdPage.DEVICE_IDENTIFICATION)
    designators: list[Designator] = []
    offset = 0
    while offset < len(payload):
        if offset + 4 > len(payload):
            raise ScsiDataError(
                f"VPD page 0x83 ends inside a designation descriptor header at byte {offset + 4}"
            )
        b0, b1, _reserved, length = payload[offset : offset + 4]
        end = offset + 4 + length
        if end > len(payload):
            raise ScsiDataError(
                f"VPD page 0x83: designation descriptor at byte {offset + 4} claims {length} "
                f"bytes but the page ends after {len(payload) - offset - 4}"
            )
        value = payload[offset + 4 : end]
        kind = b1 & 0x0F
        association = (b1 >> 4) & 0x03
        piv = bool(b1 & 0x80)
        protocol = b0 >> 4 if piv and association in (1, 2) else None
        if kind == DesignatorType.NAA:
            if not value:
                raise ScsiDataError("VPD page 0x83: empty NAA designator")
            naa = value[0] >> 4
            expected = _NAA_LENGTHS.get(naa)
            if expected is not None and len(value) != expected:
                raise ScsiDataError(
                    f"VPD page 0x83: NAA type {naa} designator is {len(value)} bytes, "
                    f"expected {expected}"
                )
        designators.append(
            Designator(
                designator_type=kind,
                code_set=b0 & 0x0F,
                association=association,
                protocol_identifier=protocol,
                value=value,
            )
        )
        offset = end
    return DeviceIdentification(tuple(designators))


_BLOCK_LIMITS = struct.Struct(">4xBBH7IQ5I")


@dataclass(frozen=True, slots=True)
class BlockLimits:
    """Block Limits VPD page (0xB0, SBC-4 §6.6.4). Lengths are in logical blocks; 0 = none."""

    wsnz: bool
    max_compare_and_write_length: int
    optimal_transfer_length_granularity: int
    max_transfer_length: int
    optimal_transfer_length: int
    max_prefetch_length: int
    max_unmap_lba_count: int
    max_unmap_block_descriptor_count: int
    optimal_unmap_granularity: int
    unmap_granularity_alignment: int | None
    max_write_same_length: int
    max_atomic_transfer_length: int
    atomic_alignment: int
    atomic_transfer_length_granularity: int
    max_atomic_transfer_length_with_boundary: int
    max_atomic_boundary_size: int


def parse_block_limits(data: bytes | bytearray | memoryview) -> BlockLimits:
    """Block Limits (page 0xB0). Devices implementing an older SBC return a shorter page;
    the fields it lacks read as 0 ("not reported")."""
    payload = _vpd_payload(data, VpdPage.BLOCK_LIMITS)
    full = bytes(4) + payload[: _BLOCK_LIMITS.size - 4]
    full += bytes(_BLOCK_LIMITS.size - len(full))
    (
        b4,
        mcawl,
        otlg,
        mtl,
        otl,
        mpl,
        mulc,
        mubdc,
        oug,
        uga,
        mwsl,
        matl,
        aa,
        atlg,
        matlwab,
        mabs,
    ) = _BLOCK_LIMITS.unpack(full)
    return BlockLimits(
        wsnz=bool(b4 & 0x01),
        max_compare_and_write_length=mcawl,
        optimal_transfer_length_granularity=otlg,
        max_transfer_length=mtl,
        optimal_transfer_length=otl,
        max_prefetch_length=mpl,
        max_unmap_lba_count=mulc,
        max_unmap_block_descriptor_count=mubdc,
        optimal_unmap_granularity=oug,
        unmap_granularity_alignment=(uga & 0x7FFF_FFFF) if uga & 0x8000_0000 else None,
        max_write_same_length=mwsl,
        max_atomic_transfer_length=matl,
        atomic_alignment=aa,
        atomic_transfer_length_granularity=atlg,
        max_atomic_transfer_length_with_boundary=matlwab,
        max_atomic_boundary_size=mabs,
    )


@dataclass(frozen=True, slots=True)
class BlockDeviceCharacteristics:
    """Block Device Characteristics VPD page (0xB1, SBC-4 §6.6.2)."""

    medium_rotation_rate: int
    product_type: int
    nominal_form_factor: int
    zoned: int
    fuab: bool
    vbuls: bool

    @property
    def non_rotating(self) -> bool:
        """Rotation rate 0001h: a solid-state medium."""
        return self.medium_rotation_rate == 1


def parse_block_device_characteristics(
    data: bytes | bytearray | memoryview,
) -> BlockDeviceCharacteristics:
    """Block Device Characteristics (page 0xB1)."""
    payload = _vpd_payload(data, VpdPage.BLOCK_DEVICE_CHARACTERISTICS)
    payload += bytes(max(0, 5 - len(payload)))
    return BlockDeviceCharacteristics(
        medium_rotation_rate=int.from_bytes(payload[0:2], "big"),
        product_type=payload[2],
        nominal_form_factor=payload[3] & 0x0F,
        zoned=(payload[4] >> 4) & 0x03,
        fuab=bool(payload[4] & 0x02),
        vbuls=bool(payload[4] & 0x01),
    )


@dataclass(frozen=True, slots=True)
class LogicalBlockProvisioning:
    """Logical Block Provisioning VPD page (0xB2, SBC-4 §6.6.6)."""

    threshold_exponent: int
    lbpu: bool
    lbpws: bool
    lbpws10: bool
    lbprz: int
    anc_sup: bool
    dp: bool
    minimum_percentage: int
    provisioning_type: int
    threshold_percentage: int

    @property
    def thin(self) -> bool:
        """The LU is thin provisioned (capacity allocated on write)."""
        return self.provisioning_type == ProvisioningType.THIN


def parse_logical_block_provisioning(
    data: bytes | bytearray | memoryview,
) -> LogicalBlockProvisioning:
    """Logical Block Provisioning (page 0xB2)."""
    payload = _vpd_payload(data, VpdPage.LOGICAL_BLOCK_PROVISIONING)
    payload += bytes(max(0, 4 - len(payload)))
    b5, b6 = payload[1], payload[2]
    return LogicalBlockProvisioning(
        threshold_exponent=payload[0],
        lbpu=bool(b5 & 0x80),
        lbpws=bool(b5 & 0x40),
        lbpws10=bool(b5 & 0x20),
        lbprz=(b5 >> 2) & 0x07,
        anc_sup=bool(b5 & 0x02),
        dp=bool(b5 & 0x01),
        minimum_percentage=b6 >> 3,
        provisioning_type=b6 & 0x07,
        threshold_percentage=payload[3],
    )


# --------------------------------------------------------------------------------------------
# Parsers: READ CAPACITY
# --------------------------------------------------------------------------------------------

_READ_CAPACITY_10 = struct.Struct(">II")
_READ_CAPACITY_16 = struct.Struct(">QIBBH16x")


@dataclass(frozen=True, slots=True)
class ReadCapacity10:
    """READ CAPACITY(10) data (SBC-4 §5.20.2)."""

    last_lba: int
    block_size: int

    @property
    def blocks(self) -> int:
        """Number of logical blocks: the last LBA plus one."""
        return self.last_lba + 1

    @property
    def size_bytes(self) -> int:
        """Capacity in bytes."""
        return self.blocks * self.block_size

    @property
    def needs_read_capacity16(self) -> bool:
        """The LU is too large for this command (last LBA reported as FFFFFFFFh)."""
        return self.last_lba == U32


def parse_read_capacity10(data: bytes | bytearray | memoryview) -> ReadCapacity10:
    """Parse the 8 bytes of READ CAPACITY(10) data."""
    if len(data) < _READ_CAPACITY_10.size:
        raise ScsiDataError(f"READ CAPACITY(10) data is {len(data)} bytes, expected 8")
    last_lba, block_size = _READ_CAPACITY_10.unpack_from(bytes(data))
    return ReadCapacity10(last_lba=last_lba, block_size=block_size)


@dataclass(frozen=True, slots=True)
class ReadCapacity16:
    """READ CAPACITY(16) data (SBC-4 §5.21.2)."""

    last_lba: int
    block_size: int
    p_type: int
    prot_en: bool
    p_i_exponent: int
    logical_blocks_per_physical_exponent: int
    lbpme: bool
    lbprz: bool
    lowest_aligned_lba: int

    @property
    def blocks(self) -> int:
        """Number of logical blocks: the last LBA plus one."""
        return self.last_lba + 1

    @property
    def size_bytes(self) -> int:
        """Capacity in bytes."""
        return self.blocks * self.block_size

    @property
    def physical_block_size(self) -> int:
        """Physical block size: logical block size << LOGICAL BLOCKS PER PHYSICAL exponent."""
        return self.block_size << self.logical_blocks_per_physical_exponent


def parse_read_capacity16(data: bytes | bytearray | memoryview) -> ReadCapacity16:
    """Parse READ CAPACITY(16) data; 12 bytes suffice, later fields read as 0 if absent."""
    raw = bytes(data)
    if len(raw) < 12:
        raise ScsiDataError(f"READ CAPACITY(16) data is {len(raw)} bytes; at least 12 are needed")
    raw = raw[: _READ_CAPACITY_16.size] + bytes(max(0, _READ_CAPACITY_16.size - len(raw)))
    last_lba, block_size, b12, b13, b14_15 = _READ_CAPACITY_16.unpack(raw)
    return ReadCapacity16(
        last_lba=last_lba,
        block_size=block_size,
        p_type=(b12 >> 1) & 0x07,
        prot_en=bool(b12 & 0x01),
        p_i_exponent=b13 >> 4,
        logical_blocks_per_physical_exponent=b13 & 0x0F,
        lbpme=bool(b14_15 & 0x8000),
        lbprz=bool(b14_15 & 0x4000),
        lowest_aligned_lba=b14_15 & 0x3FFF,
    )


# --------------------------------------------------------------------------------------------
# LUNs and REPORT LUNS
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lun:
    """One 8-byte LUN decoded per SAM-5 §4.7 (first addressing level).

    ``value`` is the LUN within its address method: 0..255 for peripheral device addressing
    (``bus`` holds the bus identifier), 0..16383 for flat space, 0..31 for logical unit
    addressing (with ``target`` and ``bus``), the W-LUN code for well-known LUNs.
    ``number`` is the integer Linux, LIO and libiscsi use for the same LUN
    (``scsilun_to_int``), which is what ``lsscsi`` shows and what a URL's ``/<lun>`` means.
    """

    raw: bytes
    method: AddressMethod
    value: int
    bus: int = 0
    target: int = 0
    well_known: bool = False
    hierarchical: bool = False

    @property
    def number(self) -> int:
        """The Linux/LIO/libiscsi integer for this LUN (each 2-byte level packed)."""
        r = self.raw
        return (
            (r[0] << 8 | r[1])
            | (r[2] << 8 | r[3]) << 16
            | (r[4] << 8 | r[5]) << 32
            | (r[6] << 8 | r[7]) << 48
        )

    def __str__(self) -> str:
        if self.well_known:
            return f"W-LUN 0x{self.value:02X}"
        if self.method == AddressMethod.PERIPHERAL and self.bus == 0 and not self.hierarchical:
            return str(self.value)
        return f"{self.number} ({self.method.name.lower()} addressing, {self.raw.hex()})"


def decode_lun(raw: bytes | bytearray | memoryview) -> Lun:
    """Decode an 8-byte SAM LUN (as carried in REPORT LUNS data and iSCSI PDU headers)."""
    lun = bytes(raw)
    if len(lun) != 8:
        raise ScsiDataError(f"a LUN is 8 bytes, got {len(lun)}")
    method = AddressMethod(lun[0] >> 6)
    hierarchical = any(lun[2:])
    if method == AddressMethod.PERIPHERAL:
        return Lun(lun, method, value=lun[1], bus=lun[0] & 0x3F, hierarchical=hierarchical)
    if method == AddressMethod.FLAT:
        return Lun(lun, method, value=((lun[0] & 0x3F) << 8) | lun[1], hierarchical=hierarchical)
    if method == AddressMethod.LOGICAL_UNIT:
        return Lun(
            lun,
            method,
            value=lun[1] & 0x1F,
            target=lun[0] & 0x3F,
            bus=lun[1] >> 5,
            hierarchical=hierarchical,
        )
    # Extended addressing: length (bits 5-4) and extended address method (bits 3-0).
    # Method 1 with length 0 is a well-known LUN (W-LUN), SAM-5 §4.7.8.
    well_known = (lun[0] & 0x3F) == 0x01
    return Lun(lun, method, value=lun[1], well_known=well_known, hierarchical=hierarchical)


def encode_lun(number: int) -> bytes:
    """The 8-byte LUN for a Linux/LIO/libiscsi LUN integer (``int_to_scsilun``).

    0..255 become peripheral device addressing; a flat-space LUN ``k`` is ``0x4000 | k``;
    larger integers fill the following levels, 16 bits each.
    """
    check_range("LUN", number, 0, U64)
    out = bytearray(8)
    for level in range(4):
        chunk = (number >> (16 * level)) & 0xFFFF
        out[2 * level] = chunk >> 8
        out[2 * level + 1] = chunk & 0xFF
    return bytes(out)


@dataclass(frozen=True, slots=True)
class ReportLuns:
    """REPORT LUNS parameter data (SPC-5 §6.33.2)."""

    luns: tuple[Lun, ...]
    list_length: int

    @property
    def complete(self) -> bool:
        """Every LUN the target listed fitted in the allocation length."""
        return len(self.luns) * 8 >= self.list_length

    @property
    def required_allocation_length(self) -> int:
        """The allocation length that returns the whole list."""
        return self.list_length + 8


def parse_report_luns(data: bytes | bytearray | memoryview) -> ReportLuns:
    """Parse REPORT LUNS data; a list cut short by the allocation length is not an error
    (check :attr:`ReportLuns.complete`)."""
    raw = bytes(data)
    if len(raw) < 8:
        raise ScsiDataError(f"REPORT LUNS data is {len(raw)} bytes; the header alone is 8")
    list_length = int.from_bytes(raw[0:4], "big")
    if list_length % 8:
        raise ScsiDataError(f"REPORT LUNS list length {list_length} is not a multiple of 8")
    available = min(list_length, (len(raw) - 8) // 8 * 8)
    luns = tuple(decode_lun(raw[8 + i : 16 + i]) for i in range(0, available, 8))
    return ReportLuns(luns=luns, list_length=list_length)


# --------------------------------------------------------------------------------------------
# MODE SENSE
# --------------------------------------------------------------------------------------------

_MODE6_HEADER = struct.Struct(">BBBB")
_MODE10_HEADER = struct.Struct(">HBBBxH")


@dataclass(frozen=True, slots=True)
class ModeSense:
    """MODE SENSE(6)/(10) parameter data: header fields and the pages, keyed by
    ``(page code, subpage code)``, each page's bytes including its own header."""

    medium_type: int
    write_protect: bool
    dpofua: bool
    block_descriptors: bytes
    pages: dict[tuple[int, int], bytes]


def _mode_pages(raw: bytes, start: int, end: int) -> Iterator[tuple[tuple[int, int], bytes]]:
    offset = start
    while offset + 2 <= end:
        b0 = raw[offset]
        page = b0 & 0x3F
        if b0 & 0x40:  # SPF: sub_page format, 4-byte header
            if offset + 4 > end:
                raise ScsiDataError(f"mode page 0x{page:02X} header is cut off")
            subpage = raw[offset + 1]
            length = 4 + int.from_bytes(raw[offset + 2 : offset + 4], "big")
        else:
            subpage = 0
            length = 2 + raw[offset + 1]
        if offset + length > end:
            raise ScsiDataError(
                f"mode page 0x{page:02X} claims {length} bytes but only {end - offset} remain"
            )
        yield (page, subpage), raw[offset : offset + length]
        offset += length


def parse_mode_sense6(data: bytes | bytearray | memoryview) -> ModeSense:
    """Parse MODE SENSE(6) parameter data."""
    raw = bytes(data)
    if len(raw) < _MODE6_HEADER.size:
        raise ScsiDataError(f"MODE SENSE(6) data is {len(raw)} bytes; the header alone is 4")
    length, medium, specific, bd_length = _MODE6_HEADER.unpack_from(raw)
    end = min(len(raw), length + 1)
    bd_end = _MODE6_HEADER.size + bd_length
    if bd_end > end:
        raise ScsiDataError("MODE SENSE(6) block descriptors run past the returned data")
    return ModeSense(
        medium_type=medium,
        write_protect=bool(specific & 0x80),
        dpofua=bool(specific & 0x10),
        block_descriptors=raw[_MODE6_HEADER.size : bd_end],
        pages=dict(_mode_pages(raw, bd_end, end)),
    )


def parse_mode_sense10(data: bytes | bytearray | memoryview) -> ModeSense:
    """Parse MODE SENSE(10) parameter data."""
    raw = bytes(data)
    if len(raw) < _MODE10_HEADER.size:
        raise ScsiDataError(f"MODE SENSE(10) data is {len(raw)} bytes; the header alone is 8")
    length, medium, specific, _longlba, bd_length = _MODE10_HEADER.unpack_from(raw)
    end = min(len(raw), length + 2)
    bd_end = _MODE10_HEADER.size + bd_length
    if bd_end > end:
        raise ScsiDataError("MODE SENSE(10) block descriptors run past the returned data")
    return ModeSense(
        medium_type=medium,
        write_protect=bool(specific & 0x80),
        dpofua=bool(specific & 0x10),
        block_descriptors=raw[_MODE10_HEADER.size : bd_end],
        pages=dict(_mode_pages(raw, bd_end, end)),
    )
