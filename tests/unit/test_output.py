"""initiator.output: an output that is a FIFO with no reader fails at once, never blocks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from initiator.output import NoReader, is_stream, not_a_file, open_for_writing
from initiator.pcap import PcapRecorder


def test_a_fifo_nobody_reads_is_refused_at_once(tmp_path: Path) -> None:
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    with pytest.raises(NoReader, match=f"nobody is reading the FIFO {fifo}"):
        open_for_writing(fifo)


def test_a_fifo_with_a_reader_opens_blocking(tmp_path: Path) -> None:
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        fd = open_for_writing(fifo)
        try:
            # Blocking again: a slow reader holds the writer back, nothing is lost (EAGAIN).
            assert os.get_blocking(fd)
            os.write(fd, b"data")
        finally:
            os.close(fd)
        assert os.read(reader, 10) == b"data"
    finally:
        os.close(reader)


def test_a_pipe_named_by_dev_fd_opens(tmp_path: Path) -> None:
    # Process substitution: `-o >(gzip > x.gz)` passes /dev/fd/N, a pipe with its reader.
    r, w = os.pipe()
    try:
        fd = open_for_writing(f"/dev/fd/{w}")
        os.write(fd, b"through")
        os.close(fd)
        assert os.read(r, 10) == b"through"
    finally:
        os.close(r)
        os.close(w)


def test_a_regular_file_is_created_and_truncated(tmp_path: Path) -> None:
    path = tmp_path / "out"
    path.write_bytes(b"old contents")
    fd = open_for_writing(str(path))
    os.write(fd, b"new")
    os.close(fd)
    assert path.read_bytes() == b"new"
    fd = open_for_writing(str(path), truncate=False)
    os.close(fd)
    assert path.read_bytes() == b"new"


def test_a_capture_into_a_fifo_nobody_reads_fails_at_once(tmp_path: Path) -> None:
    fifo = str(tmp_path / "x.pcap")
    os.mkfifo(fifo)
    with pytest.raises(NoReader):
        PcapRecorder(fifo, ("192.0.2.1", 51001), ("192.0.2.2", 3260))


def test_a_capture_into_a_read_fifo_is_written(tmp_path: Path) -> None:
    fifo = str(tmp_path / "x.pcap")
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with PcapRecorder(fifo, ("192.0.2.1", 51001), ("192.0.2.2", 3260)) as rec:
            rec.sent([b"x"])
        # The pcap magic (little-endian), then the records.
        assert os.read(reader, 65536)[:4] == bytes.fromhex("d4c3b2a1")
    finally:
        os.close(reader)


def test_not_a_file_names_what_an_output_is(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "file").write_bytes(b"")
    assert not_a_file(str(fifo)) == "a FIFO"
    assert not_a_file("/dev/null") == "a character device"
    assert not_a_file(str(tmp_path)) == "a directory"
    assert not_a_file(str(tmp_path / "file")) is None
    assert not_a_file(str(tmp_path / "missing")) is None


def test_names_are_derived_only_from_a_regular_files_name(tmp_path: Path) -> None:
    # A session's capture per reconnect (FILE.2.pcap) or a target's (FILE.targetN.pcap):
    # beside a FIFO, /dev/stdout or /dev/fd/N it would be a regular file nobody asked for.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "file").write_bytes(b"")
    assert is_stream(str(fifo)) and is_stream("/dev/stdout") and is_stream("/dev/fd/1")
    assert is_stream("/dev/null") and is_stream("/proc/self/fd/2")
    assert not is_stream(str(tmp_path / "file")) and not is_stream(str(tmp_path / "new"))
