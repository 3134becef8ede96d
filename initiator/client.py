"""A small SCSI client over an iSCSI session: what ``hbactl`` and the daemon ask a LUN.

It builds CDBs with :mod:`initiator.scsi`, runs them with :meth:`Session.execute`, retries
what the Linux SCSI midlayer retries (:func:`initiator.scsi.retryable`: the UNIT ATTENTION a
target reports after a login, a reset or a session reinstatement, BUSY, ABORTED COMMAND, NOT
READY "in progress" ...) a bounded number of times, and turns any other failure into a
:class:`~initiator.scsi.ScsiCommandError` that says what went wrong in words.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from initiator import scsi
from initiator.command import Buffers, CommandResult, ScsiStatus
from initiator.errors import CommandError, ISCSIError, TransferError
from initiator.transport import Session

log = logging.getLogger(__name__)

COMMAND_ATTEMPTS = 8
"""How often a command is sent when it keeps ending in a condition worth retrying: a target
that answers UNIT ATTENTION (or BUSY) forever does not keep us forever."""
# The least a command must return to be parsed at all (SPC-5 §6.7.2, §7.7.1; SBC-4 §5.21.2).
STANDARD_INQUIRY_LENGTH = 36
VPD_HEADER_LENGTH = 4
MAX_ALLOCATION_LENGTH = 0xFFFF  # INQUIRY's two-byte ALLOCATION LENGTH field (SPC-5 §6.7.1)
READ_CAPACITY16_LENGTH = 12
NO_LOGICAL_UNIT = 0b011  # INQUIRY peripheral qualifier: nothing can be at this LUN
MAX_BLOCK_SIZE = 1 << 20
"""The largest logical block a LUN may report. SBC-4 leaves 32 bits for it, but block devices
use 512 bytes to 64 KiB (520, 4160 ... with protection information); a block of gigabytes is
a lie that would size every buffer (a one-block read) to match."""
_OPTIONAL_PAGE_ERRORS = (scsi.ScsiCommandError, scsi.ScsiDataError, TransferError)


@dataclass(frozen=True, slots=True)
class Capacity:
    """What READ CAPACITY says."""

    blocks: int
    block_size: int
    thin_provisioned: bool = False

    @property
    def size_bytes(self) -> int:
        return self.blocks * self.block_size


@dataclass(frozen=True, slots=True)
class Identity:
    """Who the LUN says it is: standard INQUIRY plus the identification VPD pages."""

    vendor: str
    product: str
    revision: str
    device_type: str
    unit_serial: str | None
    naa: str | None
    wwn: str | None
    designators: tuple[str, ...]


class ScsiClient:
    """SCSI commands to one LUN of a logged-in :class:`Session`."""

    def __init__(self, session: Session, lun: int) -> None:
        self.session = session
        self.lun = lun

    @property
    def where(self) -> str:
        return f"{self.session.target_name} LUN {self.lun}"

    async def run(self, cdb: bytes, *, data_in: Buffers | None = None,
                  data_out: Buffers | None = None, check: bool = True) -> CommandResult:
        """Execute ``cdb``, retrying what the midlayer retries (at most COMMAND_ATTEMPTS
        times in all); raise ScsiCommandError on failure."""
        attempt = 1
        while True:
            result = await self.session.execute(self.lun, cdb, data_in=data_in,
                                                data_out=data_out)
            retry = scsi.retryable(result)
            if retry is None or attempt >= COMMAND_ATTEMPTS:
                break
            log.info("%s: %s ended in %s; retrying %s (attempt %d of %d)", self.where,
                     scsi.describe_cdb(cdb), _condition(result), retry.value, attempt + 1,
                     COMMAND_ATTEMPTS)
            if retry is scsi.Retry.LATER:
                await asyncio.sleep(retry_delay(attempt))
            attempt += 1
        if check:
            scsi.check_result(cdb, result, where=self.where)
        return result

    async def read_data(self, cdb: bytes, length: int, minimum: int = 1) -> bytes:
        """Run a command that returns up to ``length`` bytes; return exactly the bytes the
        target sent (TransferError when fewer than ``minimum``)."""
        buf = bytearray(length)
        result = await self.run(cdb, data_in=[memoryview(buf)])
        n = scsi.check_transfer(cdb, result, length, minimum=minimum, where=self.where)
        return bytes(buf[:n])

    async def test_unit_ready(self) -> None:
        await self.run(scsi.test_unit_ready())

    async def inquiry(self) -> scsi.StandardInquiry:
        return scsi.parse_standard_inquiry(
            await self.read_data(scsi.inquiry(), 255, STANDARD_INQUIRY_LENGTH))

    async def vpd(self, page: int, length: int = 4096) -> bytes:
        """VPD ``page``: asked with ``length`` bytes and, when its header says the page is
        longer than that, asked again with its length (SPC-5 §6.7.1: the device stops at the
        allocation length), at most 65535, what the CDB's field holds. A longer page stays
        cut short, and parsing it fails (ScsiDataError)."""
        data = await self.read_data(scsi.inquiry(page, allocation_length=length), length,
                                    VPD_HEADER_LENGTH)
        whole = min(scsi.vpd_page_length(data), MAX_ALLOCATION_LENGTH)
        if len(data) == length < whole:
            data = await self.read_data(scsi.inquiry(page, allocation_length=whole), whole,
                                        VPD_HEADER_LENGTH)
        return data

    async def supported_vpd_pages(self) -> tuple[int, ...]:
        try:
            return scsi.parse_supported_vpd_pages(await self.vpd(0x00, 255))
        except scsi.ScsiCommandError:
            return ()

    async def identity(self) -> Identity:
        """Standard INQUIRY, unit serial number (VPD 0x80), device identification (0x83)."""
        std = await self.inquiry()
        if std.peripheral_qualifier == NO_LOGICAL_UNIT:
            # A target answers INQUIRY for any LUN, also one it has nothing at (SPC-5
            # §6.7.2: qualifier 011b, type 1Fh); Linux's scan skips such a LUN, and so must
            # we rather than print "unknown" device data as a success.
            raise CommandError(
                f"{self.where}: the target has no logical unit at this LUN (INQUIRY peripheral "
                "qualifier 011b); check the LUN number in the URL (`hbactl discover --luns "
                f"iscsi://{self.session.portal}` lists them)")
        pages = await self.supported_vpd_pages()
        serial: str | None = None
        naa: str | None = None
        wwn: str | None = None
        designators: tuple[str, ...] = ()
        # The serial and the designators are extras: a LUN whose pages are broken still
        # answers with its standard INQUIRY data.
        if 0x80 in pages:
            with contextlib.suppress(*_OPTIONAL_PAGE_ERRORS):
                serial = scsi.parse_unit_serial_number(await self.vpd(0x80, 255)) or None
        if 0x83 in pages:
            with contextlib.suppress(*_OPTIONAL_PAGE_ERRORS):
                ident = scsi.parse_device_identification(await self.vpd(0x83))
                designators = tuple(d.text for d in ident.designators)
                found = ident.naa
                if found is not None:
                    naa = found.text
                    wwn = found.wwn
        return Identity(vendor=std.vendor, product=std.product, revision=std.revision,
                        device_type=std.device_type_name, unit_serial=serial, naa=naa, wwn=wwn,
                        designators=designators)

    async def capacity(self) -> Capacity:
        """READ CAPACITY(16), or (10) for devices that do not know it."""
        try:
            rc16 = scsi.parse_read_capacity16(
                await self.read_data(scsi.read_capacity16(), 32, READ_CAPACITY16_LENGTH))
            return self._checked(Capacity(rc16.blocks, rc16.block_size, rc16.lbpme), 16)
        except scsi.ScsiCommandError as exc:
            if exc.sense_key != scsi.SenseKey.ILLEGAL_REQUEST:
                raise
        try:
            data = await self.read_data(scsi.read_capacity10(), 8, 8)
        except scsi.ScsiCommandError as exc:
            if exc.sense_key == scsi.SenseKey.ILLEGAL_REQUEST and exc.asc == 0x20:
                await self._refuse_if_not_a_disk(exc)
            raise
        rc10 = scsi.parse_read_capacity10(data)
        return self._checked(Capacity(rc10.blocks, rc10.block_size), 10)

    def _checked(self, cap: Capacity, command: int) -> Capacity:
        # Every user of the capacity divides by the block size and sizes buffers by it.
        if not 0 < cap.block_size <= MAX_BLOCK_SIZE:
            raise scsi.ScsiDataError(
                f"{self.where}: READ CAPACITY({command}) reports logical blocks of "
                f"{cap.block_size} bytes, "
                + ("which is no size" if not cap.block_size else
                   f"more than the {MAX_BLOCK_SIZE} bytes any block device uses")
                + "; the target's answer is wrong")
        return cap

    async def _refuse_if_not_a_disk(self, cause: scsi.ScsiCommandError) -> None:
        """READ CAPACITY refused as an unknown command: if the LUN is no block device (tgt
        puts a storage array controller at LUN 0), say that rather than the opcode."""
        try:
            std = await self.inquiry()
        except ISCSIError:
            return  # the READ CAPACITY error stands
        if std.block_device:
            return
        raise CommandError(
            f"{self.where} is a {std.device_type_name.replace('_', ' ')} (INQUIRY peripheral "
            f"device type 0x{std.peripheral_device_type:02X}), not a block device, so it has no "
            "blocks to read or write; check the LUN number (tgt numbers its disks from 1)"
        ) from cause

    async def block_limits(self) -> scsi.BlockLimits | None:
        """The Block Limits VPD page (0xB0), when the LUN has one."""
        if 0xB0 not in await self.supported_vpd_pages():
            return None
        try:
            return scsi.parse_block_limits(await self.vpd(0xB0, 64))
        except _OPTIONAL_PAGE_ERRORS:
            return None

    async def read(self, lba: int, blocks: int, into: memoryview) -> None:
        """READ ``blocks`` blocks at ``lba`` into ``into`` (exactly blocks * block size bytes).

        Either every byte of ``into`` is the target's data or TransferError says what is
        missing: a short read (residual) never passes for a whole one."""
        cdb = scsi.read(lba, blocks)
        result = await self.run(cdb, data_in=[into])
        scsi.check_transfer(cdb, result, into.nbytes, where=self.where)

    async def write(self, lba: int, blocks: int, data: memoryview) -> None:
        """WRITE ``blocks`` blocks at ``lba`` from ``data``; TransferError when the target
        reports that it took less."""
        cdb = scsi.write(lba, blocks)
        result = await self.run(cdb, data_out=[data])
        scsi.check_transfer(cdb, result, data.nbytes, data_in=False, where=self.where)

    async def synchronize_cache(self) -> None:
        await self.run(scsi.synchronize_cache10())


def retry_delay(attempt: int) -> float:
    """Seconds to wait before retrying, after ``attempt`` attempts, a command the target asked
    to come back later (BUSY, TASK SET FULL, NOT READY in progress): 50 ms, doubling, at most
    1 s."""
    return min(0.05 * 2.0 ** (attempt - 1), 1.0)


def _condition(result: CommandResult) -> str:
    if result.status == ScsiStatus.CHECK_CONDITION and result.sense:
        try:
            return scsi.parse_sense(result.sense).description
        except ISCSIError:
            pass
    return f"status 0x{result.status:02X}"
