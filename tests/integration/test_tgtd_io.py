"""Data through tgtd: hbactl's one-shot commands, header and data digests, 64 MiB of random
data at scattered LBAs with many commands in flight, and a window of 32 commands at once.

Data written through the initiator is checked twice: read back through the initiator, and
read straight from tgtd's backing file (a check that does not trust our own read path).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from initiator import scsi
from initiator.client import ScsiClient
from tests.integration.helpers import (
    Job,
    assert_all_good,
    assert_ok,
    assert_one_line_error,
    hbactl,
    logged_in,
    max_outstanding_commands,
    run_window,
    wire_pdus,
)
from tests.support.tgtd import TgtdTarget

MakeTarget = Callable[..., TgtdTarget]
BLOCK = 512
DIGESTS_ALLOWED = {"HeaderDigest": "CRC32C,None", "DataDigest": "CRC32C,None"}


def backing_bytes(target: TgtdTarget, offset: int, length: int) -> bytes:
    assert target.backing_file is not None
    with target.backing_file.open("rb") as f:
        f.seek(offset)
        return f.read(length)


# -- hbactl ------------------------------------------------------------------------------------

def test_hbactl_inquiry(target: TgtdTarget) -> None:
    out = assert_ok(hbactl("inquiry", target.url()))
    fields = {k: v.strip() for k, v in (line.split(":", 1) for line in out.splitlines())}
    assert fields["Vendor"] == "IET"
    assert fields["Device type"] == "disk"
    result = json.loads(assert_ok(hbactl("inquiry", target.url(), "--json")))
    assert result["target"] == target.iqn and result["lun"] == target.lun
    assert result["vendor"] == "IET" and result["device_type"] == "disk"
    assert result["unit_serial"] == fields["Unit serial"]
    assert result["naa"] and result["naa"].startswith("naa.")


def test_hbactl_readcap(target: TgtdTarget) -> None:
    out = assert_ok(hbactl("readcap", target.url()))
    fields = {k: v.strip() for k, v in (line.split(":", 1) for line in out.splitlines())}
    assert fields["Blocks"] == str(target.size // BLOCK)
    assert fields["Block size"] == "512"
    assert fields["Size"] == f"{target.size} bytes (64.0 MiB)"
    result = json.loads(assert_ok(hbactl("readcap", target.url(), "--json")))
    assert result == {"target": target.iqn, "lun": target.lun, "blocks": target.size // BLOCK,
                      "block_size": BLOCK, "size_bytes": target.size, "thin_provisioned": False}


def test_hbactl_write_then_read(target: TgtdTarget, tmp_path: Path) -> None:
    data = os.urandom(3 << 20)  # 3 MiB: several commands of at most 1 MiB each
    source = tmp_path / "in.bin"
    source.write_bytes(data)
    lba = 1000
    proc = hbactl("write", target.url(), "--lba", str(lba), "-i", source, "--json")
    result = json.loads(assert_ok(proc))
    assert result == {"target": target.iqn, "lun": target.lun, "lba": lba,
                      "blocks": len(data) // BLOCK, "bytes": len(data), "input": str(source)}
    assert backing_bytes(target, lba * BLOCK, len(data)) == data

    copy = tmp_path / "out.bin"
    proc = hbactl("read", target.url(), "--lba", str(lba), "--blocks", str(len(data) // BLOCK),
                  "-o", copy)
    assert_ok(proc)
    assert f"read {len(data) // BLOCK} blocks".encode() in proc.stderr
    assert copy.read_bytes() == data

    # stdin and stdout, and --blocks shorter than the input.
    part = os.urandom(64 * BLOCK)
    assert_ok(hbactl("write", target.url(), "--lba", "7", "-i", "-", "--blocks", "8",
                     stdin=part))
    proc = hbactl("read", target.url(), "--lba", "7", "--blocks", "9", "-o", "-")
    assert_ok(proc)
    assert proc.stdout == part[: 8 * BLOCK] + bytes(BLOCK)


def test_hbactl_io_errors(target: TgtdTarget, tmp_path: Path) -> None:
    blocks = target.size // BLOCK
    assert_one_line_error(
        hbactl("read", target.url(), "--lba", str(blocks - 1), "--blocks", "2", "-o", "-"), 2,
        mentions=["beyond the end", str(blocks)])
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"x" * 1000)
    assert_one_line_error(hbactl("write", target.url(), "--lba", "0", "-i", odd), 2,
                          mentions=["1000 bytes", "512"])
    assert_one_line_error(hbactl("write", target.url(), "--lba", "0", "-i", tmp_path / "none"),
                          2, mentions=["none"])
    assert_one_line_error(hbactl("readcap", target.url(lun=5)), 1,
                          mentions=["LUN 5", "ILLEGAL REQUEST"])
    assert_one_line_error(hbactl("inquiry", target.url(lun=5)), 1,
                          mentions=["LUN 5", "no logical unit", "check the LUN number"])
    # tgt's LUN 0 is its controller: no READ CAPACITY, and the message says why.
    for command in (["readcap"], ["read", "--lba", "0", "--blocks", "1", "-o", "-"]):
        assert_one_line_error(hbactl(*command, target.url(lun=0)), 1,
                              mentions=["LUN 0", "storage array controller", "not a block device"])


# -- digests -----------------------------------------------------------------------------------

async def test_header_and_data_digests(make_target: MakeTarget) -> None:
    target = make_target(16 << 20, params=DIGESTS_ALLOWED)
    data = os.urandom(4 << 20)
    async with logged_in(target, header_digest="CRC32C", data_digest="CRC32C") as session:
        params = session.parameters
        assert params is not None and params.header_digest and params.data_digest
        client = ScsiClient(session, target.lun)
        for i in range(4):
            await client.write(i * 2048, 2048, memoryview(data)[i << 20 : (i + 1) << 20])
        back = bytearray(len(data))
        await client.read(0, len(data) // BLOCK, memoryview(back))
    assert back == data
    assert backing_bytes(target, 0, len(data)) == data


def test_hbactl_digests(make_target: MakeTarget, tmp_path: Path) -> None:
    target = make_target(16 << 20, params=DIGESTS_ALLOWED)
    url = target.url() + "?header_digest=crc32c&data_digest=crc32c"
    data = os.urandom(2 << 20)
    source = tmp_path / "in.bin"
    source.write_bytes(data)
    assert_ok(hbactl("write", url, "--lba", "0", "-i", source))
    proc = hbactl("read", url, "--lba", "0", "--blocks", str(len(data) // BLOCK), "-o", "-")
    assert_ok(proc)
    assert proc.stdout == data


def test_digest_refused_by_target(target: TgtdTarget) -> None:
    # tgtd's default is HeaderDigest=None, and it answers None to an offer of CRC32C alone
    # instead of Reject: either way the login must fail with a sentence naming the key.
    assert_one_line_error(hbactl("readcap", target.url() + "?header_digest=crc32c"), 1,
                          mentions=["HeaderDigest", "header_digest=crc32c-none"])
    # Offering CRC32C,None falls back to no digest.
    assert "Blocks:" in assert_ok(hbactl("readcap", target.url() + "?header_digest=crc32c-none"))


# -- many commands in flight -------------------------------------------------------------------

@pytest.mark.parametrize("digests", [False, True], ids=["plain", "digests"])
async def test_64mib_random_data_at_scattered_lbas(make_target: MakeTarget,
                                                   digests: bool) -> None:
    """64 MiB of random data in writes of random sizes (512 B .. 256 KiB) at random,
    non-overlapping places of a 1 GiB LUN, 32 commands in flight; read back the same way."""
    target = make_target(1 << 30, params=DIGESTS_ALLOWED if digests else None)
    rng = random.Random(0x15C5 + digests)
    slot = 256 << 10
    slots = rng.sample(range(target.size // slot), 1000)
    extents: list[tuple[int, int]] = []  # (byte offset, length)
    total = 0
    for s in slots:
        length = rng.randrange(1, slot // BLOCK + 1) * BLOCK
        start = s * slot + rng.randrange(0, (slot - length) // BLOCK + 1) * BLOCK
        extents.append((start, length))
        total += length
        if total >= 64 << 20:
            break
    assert total >= 64 << 20, "not enough slots for 64 MiB"
    data = memoryview(os.urandom(total))
    views, pos = [], 0
    for _, length in extents:
        views.append(data[pos : pos + length])
        pos += length

    digest = "CRC32C" if digests else "None"
    async with logged_in(target, header_digest=digest, data_digest=digest) as session:
        writes = [Job(scsi.write(start // BLOCK, length // BLOCK), data_out=view)
                  for (start, length), view in zip(extents, views, strict=True)]
        run = await run_window(session, target.lun, writes, depth=32)
        assert_all_good(run)
        assert max(run.in_flight_seen) >= 31  # the window was full

        back = bytearray(total)
        back_view = memoryview(back)
        reads, pos = [], 0
        for start, length in extents:
            reads.append(Job(scsi.read(start // BLOCK, length // BLOCK),
                             data_in=back_view[pos : pos + length]))
            pos += length
        rng.shuffle(reads)
        run = await run_window(session, target.lun, reads, depth=32)
        assert_all_good(run)
    assert back == data
    # Straight from the backing file, without our read path.
    assert target.backing_file is not None
    with target.backing_file.open("rb") as f:
        for (start, length), view in zip(extents, views, strict=True):
            f.seek(start)
            assert f.read(length) == view


async def test_more_data_in_flight_than_the_socket_holds(make_target: MakeTarget) -> None:
    """32 writes of 1 MiB at once: the socket fills and sending waits for it to drain (a
    regression test: waiting used to crash the connection, asyncio refusing add_writer() on
    the fd its transport owns, and the session reconnected in a loop)."""
    target = make_target(64 << 20)
    size = 1 << 20
    data = memoryview(os.urandom(32 * size))
    async with logged_in(target) as session:
        jobs = [Job(scsi.write(i * size // BLOCK, size // BLOCK),
                    data_out=data[i * size : (i + 1) * size]) for i in range(32)]
        assert_all_good(await run_window(session, target.lun, jobs, depth=32))
        assert session.reconnects == 0
    assert backing_bytes(target, 0, len(data)) == data


@pytest.mark.parametrize("write", [False, True], ids=["reads", "writes"])
async def test_32_commands_in_flight(target: TgtdTarget, tmp_path: Path, write: bool) -> None:
    """32 commands submitted at once are all outstanding at the target at the same time: the
    capture shows 32 sent before the first answer, and the first completion callback still
    sees the 31 others in flight."""
    # Small writes (immediate data only) go out in one sendmsg; 64 KiB reads need none.
    size = 4 << 10 if write else 64 << 10
    blocks = size // BLOCK
    pcap = tmp_path / "window.pcap"
    data = memoryview(os.urandom(32 * size))
    back = memoryview(bytearray(32 * size))
    async with logged_in(target, pcap=pcap) as session:
        client = ScsiClient(session, target.lun)
        await client.test_unit_ready()  # takes the UNIT ATTENTION that follows a login
        if write:
            jobs = [Job(scsi.write(i * blocks, blocks), data_out=data[i * size : (i + 1) * size])
                    for i in range(32)]
        else:
            jobs = [Job(scsi.read(i * blocks, blocks), data_in=back[i * size : (i + 1) * size])
                    for i in range(32)]
        run = await run_window(session, target.lun, jobs, depth=32)
        assert_all_good(run)
        assert run.unit_attention_retries == 0
        assert run.in_flight_seen[0] == 31
        assert run.in_flight_seen == list(range(31, -1, -1))
    capture = wire_pdus(pcap, target.port)
    assert not capture.problems, capture.problems
    assert max_outstanding_commands(capture) == 32
    if write:
        assert backing_bytes(target, 0, len(data)) == data
