"""``hbactl write`` streams its input: memory bounded whatever the input's size, and every
way it can end early says exactly which blocks were written.

It held its whole input in memory (a 2 GiB file, or a pipe up to the LUN's size) before the
first WRITE. The fake target runs in a thread of its own (``hbactl`` runs its own loop).
"""

from __future__ import annotations

import io
import os
import re
import signal
import sys
import threading
from typing import Any

import pytest

from hba import cli, oneshot
from initiator import pdu as P
from tests.support.fake_target import FakeTarget, Hostility, RamDisk, TargetNode
from tests.unit.test_oneshot_bounds import INI, TGT, target_in_a_thread

CHUNK = oneshot.MAX_TRANSFER // 512   # blocks per WRITE on the fake target's 512-byte LUN
PATTERN = bytes(range(251)) * ((2 * oneshot.MAX_TRANSFER) // 251 + 2)
"""The input's bytes: byte ``i`` is ``i % 251``, so a chunk written at the wrong place shows."""


def expected(start: int, length: int) -> bytes:
    whole = PATTERN * (length // len(PATTERN) + 2)
    return whole[start % 251 : start % 251 + length]


class Generator(io.RawIOBase):
    """A pipe of ``length`` bytes that nobody holds: made as it is read. ``stall_at``: at
    that many bytes, Ctrl-C and wait (a writer that stopped sending)."""

    def __init__(self, length: int, stall_at: int | None = None) -> None:
        self.length, self.stall_at, self.pos = length, stall_at, 0
        self.asked: list[int] = []
        self.ahead: list[int] = []   # bytes read beyond those the target was sent, per read
        self.sent = 0
        self.release = threading.Event()

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        if self.pos == self.stall_at:
            os.kill(os.getpid(), signal.SIGINT)
            self.release.wait(30)
            return 0
        view = memoryview(buf).cast("B")
        self.asked.append(len(view))
        n = min(len(view), self.length - self.pos, len(PATTERN) - 251)
        if self.stall_at is not None:
            n = min(n, self.stall_at - self.pos)
        start = self.pos % 251
        view[:n] = PATTERN[start : start + n]
        self.pos += n
        self.ahead.append(self.pos - self.sent)
        return n


def count_writes(generator: Generator) -> Hostility:
    """The target counts the bytes each WRITE command it receives moves."""

    def hook(conn: Any, pdu: P.PDU) -> bool:
        if isinstance(pdu, P.ScsiCommand) and pdu.cdb[0] in (0x2A, 0x8A):
            blocks = int.from_bytes(pdu.cdb[7:9] if pdu.cdb[0] == 0x2A else pdu.cdb[10:14])
            generator.sent += blocks * 512
        return False

    return Hostility(pdu_hook=hook)


def target(blocks: int, **kw: Any) -> tuple[FakeTarget, RamDisk]:
    disk = RamDisk(blocks=blocks)
    return FakeTarget([TargetNode(TGT, {0: disk})], **kw), disk


def write(port: int, *argv: str) -> int:
    return cli.main(["write", "--initiator-name", INI, f"iscsi://127.0.0.1:{port}/{TGT}/0",
                     *argv])


def test_a_long_pipe_is_written_as_it_is_read(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """32 MiB through a pipe with --blocks: read a chunk at a time, never more than the
    commands in flight and the chunk being read ahead of what the target was sent (it was
    all of it, read before the first WRITE)."""
    blocks = 64 * 1024
    generator = Generator(blocks * 512)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(generator)))
    fake_target, disk = target(blocks, hostile=count_writes(generator))
    with target_in_a_thread(fake_target) as port:
        assert write(port, "--lba", "0", "--blocks", str(blocks), "-i", "-") == 0
    assert f"wrote {blocks} blocks ({blocks * 512} bytes) at LBA 0 from -" in \
        capsys.readouterr().err
    assert max(generator.asked) <= oneshot.MAX_TRANSFER + 1, max(generator.asked)
    assert max(generator.ahead) <= (oneshot.WRITE_DEPTH + 1) * oneshot.MAX_TRANSFER, \
        max(generator.ahead)
    assert disk.data == expected(0, blocks * 512)


@pytest.mark.parametrize(("lba", "length", "message"), [
    # Found in the chunk that reaches the LUN's end: that chunk is not written.
    (4090, 7 * 512, "standard input holds more than the 6 blocks from block 4090 to the end "
                    f"of {TGT} LUN 0; give --blocks; nothing was written"),
    (0, 4097 * 512, "standard input holds more than the 4096 blocks from block 0 to the end "
                    f"of {TGT} LUN 0; give --blocks; blocks 0..{CHUNK - 1} were written "
                    f"({CHUNK} blocks)"),
    (0, (CHUNK + 1) * 512 + 100,
     f"standard input holds {(CHUNK + 1) * 512 + 100} bytes, not a whole number of 512-byte "
     f"blocks; pad it or use --blocks; blocks 0..{CHUNK - 1} were written ({CHUNK} blocks)"),
])
def test_a_pipe_that_proves_too_long_or_ragged_says_what_was_written(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        lba: int, length: int, message: str) -> None:
    # A pipe's length is known only once read: the chunks before the one that shows the
    # problem are written, and the error says which, as dd reports its records out.
    generator = Generator(length)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(generator)))
    fake_target, disk = target(4096)
    with target_in_a_thread(fake_target) as port:
        assert write(port, "--lba", str(lba), "-i", "-") == 2
    assert capsys.readouterr().err == f"hbactl: {message}\n"
    written = CHUNK if "were written" in message else 0
    assert disk.data[: written * 512] == expected(0, written * 512)
    assert disk.data[written * 512 :] == bytes(len(disk.data) - written * 512)


def test_a_pipe_shorter_than_blocks_says_what_was_written(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    generator = Generator((CHUNK + 3) * 512)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(generator)))
    with target_in_a_thread(target(4096)[0]) as port:
        assert write(port, "--lba", "0", "--blocks", "4000", "-i", "-") == 2
    assert capsys.readouterr().err == (
        f"hbactl: --blocks 4000 needs {4000 * 512} bytes; standard input has only "
        f"{(CHUNK + 3) * 512}; blocks 0..{CHUNK - 1} were written ({CHUNK} blocks)\n")


def test_a_write_failing_midway_says_which_blocks_were_written(
        tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """A WRITE fails (HARDWARE ERROR, which is not retried) while others are in flight:
    the error is that command's, and says exactly which blocks the target acknowledged:
    those, and only those, hold the input (the failed chunk, and those never sent, do not)."""
    blocks = 8 * CHUNK
    path = tmp_path / "input"
    path.write_bytes(expected(0, blocks * 512))
    seen: list[int] = []

    def fail_third(conn: Any, pdu: P.PDU) -> bool:
        # The next WRITE to complete its data after the third arrives fails.
        if isinstance(pdu, P.ScsiCommand) and pdu.cdb[0] in (0x2A, 0x8A):
            seen.append(1)
            if len(seen) == 3:
                conn.target.hostile.fail_first = 1
        return False

    fake_target, disk = target(blocks, hostile=Hostility(
        pdu_hook=fail_third, fail_opcodes=frozenset({0x2A, 0x8A}), fail_sense=(0x4, 0x44, 0)))
    with target_in_a_thread(fake_target) as port:
        assert write(port, "--lba", "0", "-i", str(path)) == 1
    err = capsys.readouterr().err
    assert err.startswith("hbactl: ") and "HARDWARE ERROR" in err.upper(), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    found = re.search(r"; blocks ((?:\d+\.\.\d+(?:, )?)+) were written \((\d+) blocks\)\n$", err)
    assert found is not None, err
    spans = [tuple(map(int, span.split(".."))) for span in found[1].split(", ")]
    claimed = {lba // CHUNK for a, b in spans for lba in range(a, b + 1, CHUNK)}
    assert all(a % CHUNK == 0 and (b + 1) % CHUNK == 0 for a, b in spans), spans
    assert int(found[2]) == len(claimed) * CHUNK
    assert 2 <= len(claimed) < 8, spans
    for chunk in range(8):
        start, length = chunk * CHUNK * 512, CHUNK * 512
        held = disk.data[start : start + length]
        assert held == (expected(start, length) if chunk in claimed else bytes(length)), chunk


def test_ctrl_c_during_a_write_says_which_blocks_were_written(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # The pipe stops after two chunks and Ctrl-C comes: the WRITEs in flight finish, and the
    # one line says which blocks were written.
    generator = Generator(8 * CHUNK * 512, stall_at=2 * CHUNK * 512)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(generator)))
    try:
        with target_in_a_thread(target(8 * CHUNK)[0]) as port:
            status = write(port, "--lba", "0", "--blocks", str(8 * CHUNK), "-i", "-")
    finally:
        generator.release.set()
    assert status == 130
    assert capsys.readouterr().err == (
        f"hbactl: interrupted: blocks 0..{2 * CHUNK - 1} were written ({2 * CHUNK} blocks)\n")
