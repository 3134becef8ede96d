"""SCSI for ``hbactl`` and the TCMU side: CDB builders, data parsers, sense data, status.

Theory of operation
-------------------
The initiator itself never looks inside a CDB: the kernel's CDBs pass through unchanged. This
package is for the places that *do* speak SCSI themselves:

* ``hbactl`` and the block-device client build CDBs (INQUIRY, READ CAPACITY, REPORT LUNS,
  READ/WRITE ...) and parse what comes back into frozen dataclasses;
* the TCMU side synthesises CHECK CONDITION sense data (``build_fixed_sense``) when a command
  cannot be delivered;
* everyone turns a failed command into a :class:`ScsiCommandError` whose message names the
  command, the sense key and the ASC/ASCQ in words.

One module per part, each importing only the ones before it:

* :mod:`~initiator.scsi.cdb` — operation codes, CDB builders, command names;
* :mod:`~initiator.scsi.asc` — the ASC/ASCQ table in words and hints of what to check;
* :mod:`~initiator.scsi.data` — parsers of INQUIRY, VPD pages, READ CAPACITY, REPORT LUNS
  and MODE SENSE data, LUN addressing, :class:`ScsiDataError`;
* :mod:`~initiator.scsi.sense` — sense keys, sense data parsing and the fixed-format builder;
* :mod:`~initiator.scsi.status` — :class:`ScsiCommandError`, ``check_result``,
  ``check_transfer`` and the retry rules (``retryable``).

Every public name is re-exported here: ``from initiator import scsi; scsi.read(...)``.

Sources: SPC-4/SPC-5 (INQUIRY, VPD pages, sense data, REPORT LUNS, MODE SENSE, the ASC/ASCQ
assignments of Annex D), SBC-3/SBC-4 (READ/WRITE, READ CAPACITY, SYNCHRONIZE CACHE, the block
VPD pages), SAM-5 (LUN addressing).
"""

from __future__ import annotations

from initiator.scsi.asc import asc_hint, asc_text
from initiator.scsi.cdb import (
    ModePage,
    Opcode,
    PageControl,
    command_name,
    describe_cdb,
    inquiry,
    mode_sense6,
    mode_sense10,
    read,
    read10,
    read16,
    read_capacity10,
    read_capacity16,
    report_luns,
    synchronize_cache10,
    synchronize_cache16,
    test_unit_ready,
    write,
    write10,
    write16,
)
from initiator.scsi.data import (
    BLOCK_DEVICE_TYPES,
    AddressMethod,
    Association,
    BlockDeviceCharacteristics,
    BlockLimits,
    CodeSet,
    Designator,
    DesignatorType,
    DeviceIdentification,
    LogicalBlockProvisioning,
    Lun,
    ModeSense,
    PeripheralDeviceType,
    ProvisioningType,
    ReadCapacity10,
    ReadCapacity16,
    ReportLuns,
    ScsiDataError,
    StandardInquiry,
    VpdPage,
    decode_lun,
    encode_lun,
    parse_block_device_characteristics,
    parse_block_limits,
    parse_device_identification,
    parse_logical_block_provisioning,
    parse_mode_sense6,
    parse_mode_sense10,
    parse_read_capacity10,
    parse_read_capacity16,
    parse_report_luns,
    parse_standard_inquiry,
    parse_supported_vpd_pages,
    parse_unit_serial_number,
    vpd_page_length,
)
from initiator.scsi.sense import (
    Sense,
    SenseDescriptor,
    SenseKey,
    build_fixed_sense,
    field_pointer,
    parse_sense,
)
from initiator.scsi.status import (
    Retry,
    ScsiCommandError,
    check_result,
    check_transfer,
    retryable,
)

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
    "ModePage",
    "ModeSense",
    "Opcode",
    "PageControl",
    "PeripheralDeviceType",
    "ProvisioningType",
    "ReadCapacity10",
    "ReadCapacity16",
    "ReportLuns",
    "Retry",
    "ScsiCommandError",
    "ScsiDataError",
    "Sense",
    "SenseDescriptor",
    "SenseKey",
    "StandardInquiry",
    "VpdPage",
    "asc_hint",
    "asc_text",
    "build_fixed_sense",
    "check_result",
    "check_transfer",
    "command_name",
    "decode_lun",
    "describe_cdb",
    "encode_lun",
    "field_pointer",
    "inquiry",
    "mode_sense6",
    "mode_sense10",
    "parse_block_device_characteristics",
    "parse_block_limits",
    "parse_device_identification",
    "parse_logical_block_provisioning",
    "parse_mode_sense6",
    "parse_mode_sense10",
    "parse_read_capacity10",
    "parse_read_capacity16",
    "parse_report_luns",
    "parse_sense",
    "parse_standard_inquiry",
    "parse_supported_vpd_pages",
    "parse_unit_serial_number",
    "read",
    "read10",
    "read16",
    "read_capacity10",
    "read_capacity16",
    "report_luns",
    "retryable",
    "synchronize_cache10",
    "synchronize_cache16",
    "test_unit_ready",
    "vpd_page_length",
    "write",
    "write10",
    "write16",
]
