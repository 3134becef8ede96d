"""Hostile input for the PDU decoder: whatever the target sends, only ``ISCSIError`` escapes.

Arbitrary bytes, arbitrary bytes after a valid header and valid PDUs with bytes flipped are fed
in random chunks to :class:`PDUReader` (with and without digests, with and without a DataSink)
and to :func:`decode`. An ``IndexError``, ``struct.error``, ``ValueError``, ``MemoryError``...
escaping would be a crash of the connection task instead of an orderly connection drop.
"""

from __future__ import annotations

import itertools
import struct
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from initiator import pdu
from initiator.errors import CommandError, ISCSIError
from initiator.pdu import PDU, PDU_CLASSES, DataIn
from initiator.reader import PDUReader
from tests.unit.test_pdu import any_pdu, expected_after_decode

BHS = 48
MAX_AHS = 255 * 4
# Everything a PDU holds besides its data segment: BHS, AHS, header digest, padding, data digest.
OVERHEAD = BHS + MAX_AHS + 4 + 3 + 4

FUZZ = settings(max_examples=400, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class FuzzSink:
    """Places some Data-Ins into fresh buffers (split in up to three views), declines others,
    and rejects some with an ISCSIError, depending on the task tag."""

    def __init__(self) -> None:
        self.placed: list[bytearray] = []

    def data_in_buffers(self, itt: int, offset: int, length: int) -> Sequence[memoryview] | None:
        mode = itt % 4
        if mode == 0:
            return None
        if mode == 1:
            raise CommandError(f"Data-In for unknown task 0x{itt:08x}")
        area = bytearray(length)
        self.placed.append(area)
        view = memoryview(area)
        cut1, cut2 = length // 3, length // 3 + (offset % (length + 1)) // 2
        cut2 = min(max(cut1, cut2), length)
        return [view[:cut1], view[cut1:cut2], view[cut2:]]

    def data_in_placed(self, flags: int, status: int, itt: int, offset: int, stat_sn: int,
                       exp_cmd_sn: int, max_cmd_sn: int, data_sn: int, residual: int,
                       length: int) -> bool:
        return False  # the reader hands over the DataIn, with placed set


def drive(reader: PDUReader, raw: bytes, sizes: Sequence[int]) -> list[PDU]:
    """Feed ``raw`` through get_buffer/buffer_updated in chunks of ``sizes`` (cycled); stop at
    the first ISCSIError. Any other exception fails the test."""
    out: list[PDU] = []
    pos = 0
    size_iter = itertools.cycle(sizes)
    limit = max(reader.max_data_segment_length, 0) + OVERHEAD
    try:
        while pos < len(raw):
            buf = reader.get_buffer(-1)
            assert len(buf) > 0
            n = min(len(buf), next(size_iter), len(raw) - pos)
            buf[:n] = raw[pos : pos + n]
            pos += n
            out.extend(reader.buffer_updated(n))
            while reader.held:  # as the transport does, once it processed what came
                out.extend(reader.parse_buffered())
            # A hostile DataSegmentLength / TotalAHSLength cannot make the buffer grow past
            # one maximal PDU.
            assert len(reader._buf) <= max(limit, INITIAL)
    except ISCSIError:
        pass
    return out


INITIAL = 64  # small initial buffer, so that every growth is visible


def decode_only_iscsi_errors(raw: bytes, hd: bool, dd: bool) -> None:
    try:
        p, used = pdu.decode(raw, header_digest=hd, data_digest=dd)
    except ISCSIError:
        return
    assert 0 < used <= len(raw)
    check_canonical(p)


def check_canonical(p: PDU) -> None:
    """A decoded PDU has had its reserved bits dropped: encoding it and decoding that gives the
    same PDU again (or an ISCSIError when it cannot be sent, e.g. a 1000-byte CDB)."""
    try:
        raw = pdu.encode(p)
    except ISCSIError:
        return
    assert pdu.decode(raw) == (p, len(raw))


@dataclass(frozen=True)
class Params:
    hd: bool
    dd: bool
    max_dsl: int
    with_sink: bool

    def reader(self) -> PDUReader:
        return PDUReader(header_digest=self.hd, data_digest=self.dd,
                         max_data_segment_length=self.max_dsl,
                         sink=FuzzSink() if self.with_sink else None, buffer_size=INITIAL)


readers = st.builds(Params, st.booleans(), st.booleans(),
                    st.sampled_from([0, 1, 64, 2048, 8192, 65536]), st.booleans())
chunk_sizes = st.lists(st.integers(1, 700), min_size=1, max_size=16)


def valid_header() -> st.SearchStrategy[bytes]:
    """A 48-byte BHS with a known opcode and otherwise arbitrary bytes."""
    return st.tuples(st.sampled_from(sorted(PDU_CLASSES)), st.booleans(),
                     st.binary(min_size=47, max_size=47)).map(
        lambda t: bytes([t[0] | (0x40 if t[1] else 0)]) + t[2])


def small_lengths(header: bytes, ahs_words: int, dsl: int) -> bytes:
    raw = bytearray(header)
    raw[4] = ahs_words
    raw[5:8] = dsl.to_bytes(3, "big")
    return bytes(raw)


# --------------------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=3000), readers, chunk_sizes)
def test_arbitrary_bytes(raw: bytes, params: Params, sizes: list[int]) -> None:
    out = drive(params.reader(), raw, sizes)
    if not params.with_sink:
        for p in out:
            check_canonical(p)
    decode_only_iscsi_errors(raw, params.hd, params.dd)


@FUZZ
@given(valid_header(), st.binary(max_size=3000), readers, chunk_sizes)
def test_arbitrary_bytes_after_a_valid_header(header: bytes, tail: bytes,
                                              params: Params,
                                              sizes: list[int]) -> None:
    raw = header + tail
    drive(params.reader(), raw, sizes)
    decode_only_iscsi_errors(raw, params.hd, params.dd)


@FUZZ
@given(valid_header(), st.integers(0, 255), st.integers(0, 600), st.binary(max_size=3000),
       readers, chunk_sizes)
def test_valid_header_with_plausible_lengths(header: bytes, ahs_words: int, dsl: int,
                                             tail: bytes, params: Params,
                                             sizes: list[int]) -> None:
    # Small TotalAHSLength / DataSegmentLength, so that the AHS and data paths are reached.
    raw = small_lengths(header, ahs_words % 8, dsl) + tail
    out = drive(params.reader(), raw, sizes)
    if not params.with_sink:
        for p in out:
            check_canonical(p)
    decode_only_iscsi_errors(raw, params.hd, params.dd)


@FUZZ
@given(st.lists(any_pdu(st.binary(max_size=300)), min_size=1, max_size=5), readers,
       st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(1, 255)), max_size=6),
       chunk_sizes)
def test_valid_pdus_with_flipped_bytes(pdus_: list[PDU], params: Params,
                                       flips: list[tuple[int, int]], sizes: list[int]) -> None:
    hd, dd = params.hd, params.dd
    raw = bytearray(b"".join(pdu.encode(p, header_digest=hd, data_digest=dd) for p in pdus_))
    for index, mask in flips:
        raw[index % len(raw)] ^= mask
    drive(params.reader(), bytes(raw), sizes)
    decode_only_iscsi_errors(bytes(raw), hd, dd)


def big_data_in() -> st.SearchStrategy[PDU]:
    """Data-Ins with payloads on both sides of PDUReader.DIRECT_THRESHOLD, for every kind of
    answer FuzzSink gives (by ITT modulo 4)."""
    payload = st.integers(0, 9000).map(lambda n: bytes(i * 13 & 0xFF for i in range(n)))
    return st.builds(DataIn, itt=st.integers(0, 0xFFFFFFFF), data_sn=st.integers(0, 9),
                     buffer_offset=st.integers(0, 1 << 20), final=st.booleans(), data=payload)


@FUZZ
@given(st.lists(st.one_of(big_data_in(), any_pdu(st.binary(max_size=100))), min_size=1,
                max_size=4),
       st.booleans(), st.booleans(),
       st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(1, 255)), max_size=3),
       st.lists(st.integers(1, 6000), min_size=1, max_size=8))
def test_data_in_into_sink_with_flipped_bytes(pdus_: list[PDU], hd: bool, dd: bool,
                                              flips: list[tuple[int, int]],
                                              sizes: list[int]) -> None:
    raw = bytearray(b"".join(pdu.encode(p, header_digest=hd, data_digest=dd) for p in pdus_))
    for index, mask in flips:
        raw[index % len(raw)] ^= mask
    sink = FuzzSink()
    reader = PDUReader(header_digest=hd, data_digest=dd, max_data_segment_length=8192,
                       sink=sink, buffer_size=INITIAL)
    out = drive(reader, bytes(raw), sizes)
    if not flips:
        # Undamaged, the stream decodes up to the first Data-In the sink rejects.
        assert len(out) <= len(pdus_)
        for got, sent in zip(out, pdus_, strict=False):
            if isinstance(got, DataIn) and got.placed:
                assert got.data == b""
                assert got.placed == len(sent.data)
            else:
                assert got == expected_after_decode(sent)


@FUZZ
@given(st.lists(any_pdu(st.binary(max_size=300)), min_size=1, max_size=5), readers,
       st.integers(0, 1 << 16), chunk_sizes)
def test_valid_pdus_truncated(pdus_: list[PDU], params: Params, cut: int,
                              sizes: list[int]) -> None:
    hd, dd = params.hd, params.dd
    raw = b"".join(pdu.encode(p, header_digest=hd, data_digest=dd) for p in pdus_)
    raw = raw[: cut % (len(raw) + 1)]
    drive(params.reader(), raw, sizes)
    decode_only_iscsi_errors(raw, hd, dd)


@settings(max_examples=100, deadline=None)
@given(valid_header(), st.integers(0, 255), st.integers(0, (1 << 24) - 1), st.booleans(),
       st.sampled_from([0, 512, 8192, 65536]))
def test_hostile_lengths_bound_the_buffer(header: bytes, ahs_words: int, dsl: int, hd: bool,
                                          limit: int) -> None:
    raw = small_lengths(header, ahs_words, dsl)
    reader = PDUReader(header_digest=hd, max_data_segment_length=limit, buffer_size=INITIAL)
    # The header, then as much of the promised PDU as a hostile peer likes to send.
    drive(reader, raw + bytes(min(dsl, 3 * limit) + MAX_AHS), [4096])
    assert len(reader._buf) <= limit + OVERHEAD


@pytest.mark.parametrize("dsl", [8192, 8193, (1 << 24) - 1])
@pytest.mark.parametrize("ahs_words", [0, 255])
def test_hostile_length_memory_is_bounded(dsl: int, ahs_words: int) -> None:
    # Measured allocations, not only the buffer size: a DataSegmentLength of up to 16 MiB in a
    # header must cost at most MaxRecvDataSegmentLength + a small constant.
    limit = 8192
    header = small_lengths(bytes([0x24]) + bytes(47), ahs_words, dsl)
    # A well-formed (vendor-specific) AHS filling TotalAHSLength, then part of the data, never
    # the whole PDU.
    ahs = struct.pack(">HBB", ahs_words * 4 - 3, 0x3F, 0) + bytes(ahs_words * 4 - 4) \
        if ahs_words else b""
    stream = header + ahs + bytes(min(dsl, limit) // 2)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        reader = PDUReader(max_data_segment_length=limit, buffer_size=INITIAL)
        try:
            for i in range(0, len(stream), 1000):
                reader.feed(stream[i : i + 1000])
        except ISCSIError:
            assert dsl > limit
        else:
            assert dsl <= limit
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert peak < limit + OVERHEAD + 16 * 1024, peak


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=BHS, max_size=BHS))
def test_decode_bhs_of_any_48_bytes(bhs: bytes) -> None:
    try:
        p = pdu.decode_bhs(memoryview(bhs))
    except ISCSIError:
        return
    check_canonical(p)
