"""Writes larger than FirstBurstLength and MaxBurstLength: unsolicited data, then R2Ts.

tgtd's target parameters are set before the login (tgtd negotiates from the values a target
has when a login starts), and each write is recorded with ``pcap_path`` and read back PDU by
PDU: the immediate data, the unsolicited Data-Out, every R2T and the Data-Out answering it
must add up exactly to the command, within the negotiated limits.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from initiator.client import ScsiClient
from tests.integration.helpers import (
    DATA_OUT,
    R2T,
    SCSI_COMMAND,
    Capture,
    logged_in,
    tshark_summary,
    wire_pdus,
)
from tests.support.tgtd import TgtdTarget

MakeTarget = Callable[..., TgtdTarget]
BLOCK = 512
MAX_BURST = 65536
FIRST_BURST = 16384
MAX_SEGMENT = 8192      # tgtd's MaxRecvDataSegmentLength: the most we may send in one PDU
RESERVED_TTT = 0xFFFFFFFF
WRITE_SIZE = (1 << 20) + 12 * 1024  # not a multiple of any burst


def write_transfer(capture: Capture, itt: int) -> dict[str, object]:
    """What crossed the wire for one write: immediate bytes, unsolicited Data-Out bytes, the
    R2Ts as (offset, length), and the (offset, length) of every solicited Data-Out."""
    command = next(p for p in capture.of(SCSI_COMMAND) if p.itt == itt)
    unsolicited = 0
    r2ts: list[tuple[int, int]] = []
    solicited: list[tuple[int, int]] = []
    for pdu in capture.pdus:
        if pdu.itt != itt:
            continue
        if pdu.opcode == R2T:
            r2ts.append((pdu.u32(40), pdu.u32(44)))  # BufferOffset, DesiredDataTransferLength
        elif pdu.opcode == DATA_OUT:
            assert len(pdu.data) <= MAX_SEGMENT
            if pdu.u32(20) == RESERVED_TTT:
                unsolicited += len(pdu.data)
            else:
                solicited.append((pdu.u32(40), len(pdu.data)))
    return {"immediate": len(command.data), "unsolicited": unsolicited, "r2ts": r2ts,
            "solicited": solicited}


@pytest.mark.parametrize(("initial_r2t", "immediate_data"), [
    ("No", "Yes"), ("Yes", "Yes"), ("No", "No"), ("Yes", "No"),
], ids=["InitialR2T=No,ImmediateData=Yes", "InitialR2T=Yes,ImmediateData=Yes",
        "InitialR2T=No,ImmediateData=No", "InitialR2T=Yes,ImmediateData=No"])
@pytest.mark.parametrize("asked_by", ["target", "initiator"])
async def test_write_beyond_first_and_max_burst(make_target: MakeTarget, tmp_path: Path,
                                               initial_r2t: str, immediate_data: str,
                                               asked_by: str) -> None:
    params = {"MaxBurstLength": str(MAX_BURST), "FirstBurstLength": str(FIRST_BURST),
              "MaxRecvDataSegmentLength": str(MAX_SEGMENT)}
    negotiation = {}
    # Either side can ask for InitialR2T=Yes (OR) and ImmediateData=No (AND). When we ask for
    # both, FirstBurstLength is irrelevant to us while tgtd still offers it.
    wanted = {"InitialR2T": initial_r2t, "ImmediateData": immediate_data}
    if asked_by == "target":
        params.update(wanted)
    else:  # tgtd allows anything (its defaults are InitialR2T=Yes, ImmediateData=Yes)
        params.update({"InitialR2T": "No", "ImmediateData": "Yes"})
        negotiation.update(wanted)
    target = make_target(16 << 20, params=params)
    pcap = tmp_path / "write.pcap"
    data = os.urandom(WRITE_SIZE)
    lba = 24
    async with logged_in(target, pcap=pcap, negotiation=negotiation) as session:
        p = session.parameters
        assert p is not None
        assert (p.max_burst_length, p.max_xmit_data_segment_length) == (MAX_BURST, MAX_SEGMENT)
        assert p.initial_r2t is (initial_r2t == "Yes")
        assert p.immediate_data is (immediate_data == "Yes")
        if not (p.initial_r2t and not p.immediate_data):
            assert p.first_burst_length == FIRST_BURST
        client = ScsiClient(session, target.lun)
        await client.test_unit_ready()
        await client.write(lba, WRITE_SIZE // BLOCK, memoryview(data))
        back = bytearray(WRITE_SIZE)
        await client.read(lba, WRITE_SIZE // BLOCK, memoryview(back))
    assert back == data
    assert target.backing_file is not None
    with target.backing_file.open("rb") as f:
        f.seek(lba * BLOCK)
        assert f.read(WRITE_SIZE) == data

    capture = wire_pdus(pcap, target.port)
    assert not capture.problems, capture.problems
    writes = [c for c in capture.of(SCSI_COMMAND) if c.header[32] == 0x2A]  # WRITE(10)
    assert len(writes) == 1
    seen = write_transfer(capture, writes[0].itt)

    immediate = min(MAX_SEGMENT, FIRST_BURST) if immediate_data == "Yes" else 0
    unsolicited = (FIRST_BURST if initial_r2t == "No" else immediate) - immediate
    assert seen["immediate"] == immediate
    assert seen["unsolicited"] == unsolicited
    first_solicited = immediate + unsolicited
    r2ts = seen["r2ts"]
    assert isinstance(r2ts, list)
    # R2Ts ask for the rest, in order, each at most MaxBurstLength.
    assert len(r2ts) >= -(-(WRITE_SIZE - first_solicited) // MAX_BURST) >= 16
    offset = first_solicited
    for r2t_offset, length in r2ts:
        assert r2t_offset == offset and 0 < length <= MAX_BURST
        offset += length
    assert offset == WRITE_SIZE
    # The solicited Data-Out covers exactly what the R2Ts asked for, once.
    solicited = seen["solicited"]
    assert isinstance(solicited, list)
    covered = first_solicited
    for out_offset, length in sorted(solicited):
        assert out_offset == covered
        covered += length
    assert covered == WRITE_SIZE

    # tshark counts the same R2Ts and Data-Out PDUs.
    summary = tshark_summary(pcap, ["-d", f"tcp.port=={target.port},iscsi"])
    assert not summary.problems, summary.problems
    assert summary.opcodes[R2T] == len(capture.of(R2T))
    assert summary.opcodes[DATA_OUT] == len(capture.of(DATA_OUT))


async def test_max_outstanding_r2t_above_one(make_target: MakeTarget, tmp_path: Path) -> None:
    """MaxOutstandingR2T=4 negotiates (tgtd allows up to 65535) and concurrent large writes
    come out right. tgt itself only ever has one R2T outstanding per command (it sends the
    next one when the burst is complete), so the capture shows 1 here; the unit tier's fake
    target covers several outstanding R2Ts per command."""
    target = make_target(16 << 20, params={"MaxBurstLength": str(MAX_BURST),
                                           "MaxOutstandingR2T": "4"})
    pcap = tmp_path / "r2t.pcap"
    data = os.urandom(4 << 20)
    async with logged_in(target, pcap=pcap, negotiation={"MaxOutstandingR2T": "4"}) as session:
        assert session.parameters is not None
        assert session.parameters.max_outstanding_r2t == 4
        client = ScsiClient(session, target.lun)
        await client.test_unit_ready()
        await asyncio.gather(*(
            client.write(i * 2048, 2048, memoryview(data)[i << 20 : (i + 1) << 20])
            for i in range(4)))
        back = bytearray(len(data))
        await client.read(0, len(data) // BLOCK, memoryview(back))
    assert back == data

    capture = wire_pdus(pcap, target.port)
    assert not capture.problems, capture.problems
    outstanding: dict[tuple[int, int], int] = {}
    most = 0
    for pdu in capture.pdus:
        if pdu.opcode == R2T:
            outstanding[(pdu.itt, pdu.u32(20))] = pdu.u32(44)
            most = max(most, sum(1 for itt, _ in outstanding if itt == pdu.itt))
        elif pdu.opcode == DATA_OUT and pdu.u32(20) != RESERVED_TTT:
            key = (pdu.itt, pdu.u32(20))
            outstanding[key] -= len(pdu.data)
            if outstanding[key] == 0:
                del outstanding[key]
    assert not outstanding, "an R2T was not answered in full"
    assert 1 <= most <= 4
