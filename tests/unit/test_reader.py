"""PDUReader (initiator.reader): streams, splits, buffer management, errors, and Data-In placed
straight into the command's buffers through a DataSink.

The streams are encoded with :func:`initiator.pdu.encode`, whose byte-exactness
``test_pdu`` checks against vectors laid out by hand.
"""

from __future__ import annotations

import array
import dataclasses
import itertools
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from initiator import pdu
from initiator.errors import DigestError, LocalProtocolError, PDUFormatError
from initiator.pdu import (
    PDU,
    PDU_CLASSES,
    R2T,
    DataIn,
    LoginResponse,
    NopIn,
    ScsiCommand,
    ScsiResponse,
    Stage,
    TextResponse,
)
from initiator.reader import PDUReader
from tests.unit.test_pdu import (
    BHS,
    DIGEST_IDS,
    DIGESTS,
    ISID,
    VECTORS,
    any_pdu,
    crc,
    expected_after_decode,
    layout,
    u24,
)


def feed_all(reader: PDUReader, chunks: Iterable[bytes]) -> list[PDU]:
    out: list[PDU] = []
    for chunk in chunks:
        out.extend(reader.feed(chunk))
    return out


def recv_into_all(reader: PDUReader, raw: bytes, sizes: Iterable[int]) -> list[PDU]:
    """Drive the reader as asyncio.BufferedProtocol does: get_buffer, write some, updated."""
    out: list[PDU] = []
    pos = 0
    size_iter = itertools.cycle(list(sizes) or [1 << 30])
    while pos < len(raw):
        buf = reader.get_buffer(-1)
        assert len(buf) > 0
        n = min(len(buf), max(1, next(size_iter)), len(raw) - pos)
        buf[:n] = raw[pos : pos + n]
        pos += n
        out.extend(reader.buffer_updated(n))
        while reader.held:  # as Connection does, once it processed what came
            out.extend(reader.parse_buffered())
    return out



# --------------------------------------------------------------------------------------------
# PDUReader: streams, splits, buffer management


def _stream_pdus() -> list[PDU]:
    out: list[PDU] = [p for p, _, _ in VECTORS]
    for n in range(10):
        out.append(NopIn(itt=n, stat_sn=n, data=bytes(range(n))))
    out.append(ScsiCommand(cdb=bytes(range(33)), bidi_read_length=4, data=b"imm"))
    out.append(DataIn(itt=77, data_sn=1, data=bytes(i & 0xFF for i in range(301))))
    return out


STREAM = _stream_pdus()


def _encode_stream(pdus_: Sequence[PDU], hd: bool, dd: bool) -> bytes:
    return b"".join(pdu.encode(p, header_digest=hd, data_digest=dd) for p in pdus_)


@pytest.mark.parametrize(
    ("hd", "dd", "buffer_size"),
    [(False, False, 56), (True, False, 56), (False, True, 56), (True, True, 56),
     (False, False, 256 * 1024), (True, True, 256 * 1024)],
)
def test_reader_split_at_every_byte(hd: bool, dd: bool, buffer_size: int) -> None:
    raw = _encode_stream(STREAM, hd, dd)
    want = [expected_after_decode(p) for p in STREAM]
    for i in range(len(raw) + 1):
        reader = PDUReader(header_digest=hd, data_digest=dd, buffer_size=buffer_size)
        assert feed_all(reader, (raw[:i], raw[i:])) == want, f"split at {i}"
        assert not reader.receiving_payload


@pytest.mark.parametrize(("hd", "dd"), DIGESTS, ids=DIGEST_IDS)
def test_reader_partial_is_true_exactly_inside_a_pdu(hd: bool, dd: bool) -> None:
    # What tells the transport that the target stopped in the middle of a PDU (the command
    # deadline then gives up the connection: initiator.session, "Timers").
    ends = set(itertools.accumulate(
        len(pdu.encode(p, header_digest=hd, data_digest=dd)) for p in STREAM))
    raw = _encode_stream(STREAM, hd, dd)
    for i in range(len(raw) + 1):
        reader = PDUReader(header_digest=hd, data_digest=dd)
        assert not reader.partial
        reader.feed(raw[:i])
        assert reader.partial is (i != 0 and i not in ends), f"cut at {i}"


@pytest.mark.parametrize("buffer_size", [56, 100, 256 * 1024])
@pytest.mark.parametrize(("hd", "dd"), DIGESTS, ids=DIGEST_IDS)
def test_reader_one_byte_at_a_time(hd: bool, dd: bool, buffer_size: int) -> None:
    raw = _encode_stream(STREAM, hd, dd)
    want = [expected_after_decode(p) for p in STREAM]
    reader = PDUReader(header_digest=hd, data_digest=dd, buffer_size=buffer_size)
    assert feed_all(reader, (raw[i : i + 1] for i in range(len(raw)))) == want
    reader = PDUReader(header_digest=hd, data_digest=dd, buffer_size=buffer_size)
    assert recv_into_all(reader, raw, [1]) == want


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(any_pdu(), min_size=1, max_size=8), st.booleans(), st.booleans(),
       st.lists(st.integers(1, 5000), min_size=1, max_size=30), st.integers(56, 70000))
def test_reader_random_splits(pdus_: list[PDU], hd: bool, dd: bool, sizes: list[int],
                              buffer_size: int) -> None:
    raw = _encode_stream(pdus_, hd, dd)
    want = [expected_after_decode(p) for p in pdus_]
    reader = PDUReader(header_digest=hd, data_digest=dd, buffer_size=buffer_size,
                       max_data_segment_length=1 << 16)
    assert recv_into_all(reader, raw, sizes) == want
    reader = PDUReader(header_digest=hd, data_digest=dd, buffer_size=buffer_size,
                       max_data_segment_length=1 << 16)
    chunks: list[bytes] = []
    pos = 0
    for n in itertools.cycle(sizes):
        if pos >= len(raw):
            break
        chunks.append(raw[pos : pos + n])
        pos += n
    assert feed_all(reader, chunks) == want


@pytest.mark.parametrize(("hd", "dd"), DIGESTS, ids=DIGEST_IDS)
def test_reader_grows_for_large_pdus(hd: bool, dd: bool) -> None:
    big = bytes(i * 3 & 0xFF for i in range(200_001))
    pdus_: list[PDU] = [NopIn(itt=1), DataIn(itt=2, data=big), NopIn(itt=3, data=b"x" * 70),
                        TextResponse(data=big[:100_000])]
    raw = _encode_stream(pdus_, hd, dd)
    reader = PDUReader(header_digest=hd, data_digest=dd, buffer_size=64,
                       max_data_segment_length=1 << 18)
    assert recv_into_all(reader, raw, [4096, 65536, 13]) == pdus_
    reader = PDUReader(header_digest=hd, data_digest=dd, buffer_size=64,
                       max_data_segment_length=1 << 18)
    assert reader.feed(raw) == pdus_


def test_reader_get_buffer_is_never_empty() -> None:
    raw = _encode_stream(STREAM, True, True)
    reader = PDUReader(header_digest=True, data_digest=True, buffer_size=56)
    for i in range(len(raw)):
        buf = reader.get_buffer(-1)
        assert len(buf) > 0
        buf[0] = raw[i]
        reader.buffer_updated(1)


def test_reader_one_at_a_time_leaves_what_follows_the_final_login_response() -> None:
    # The Login Phase has no digests; what the target sends after the final Login Response
    # (here in the same segment) is Full Feature Phase, framed with the negotiated digests.
    final = LoginResponse(transit=True, csg=Stage.OPERATIONAL, nsg=Stage.FULL_FEATURE,
                          isid=ISID, tsih=7, itt=1, stat_sn=5)
    ping = NopIn(itt=pdu.RESERVED_TAG, ttt=0x42, stat_sn=6, data=b"ping")
    raw = pdu.encode(final) + pdu.encode(ping, header_digest=True, data_digest=True)
    reader = PDUReader(max_data_segment_length=8192, one_at_a_time=True)
    assert reader.feed(raw) == [final]
    reader.one_at_a_time = False
    reader.header_digest = reader.data_digest = True
    assert reader.parse_buffered() == [ping]
    assert reader.parse_buffered() == []


def test_reader_one_at_a_time_yields_each_pdu_on_demand() -> None:
    pdus_ = [NopIn(itt=i, stat_sn=i, data=bytes(i)) for i in range(1, 4)]
    reader = PDUReader(one_at_a_time=True)
    assert reader.feed(b"".join(pdu.encode(p) for p in pdus_)) == pdus_[:1]
    assert reader.parse_buffered() == pdus_[1:2]
    assert reader.parse_buffered() == pdus_[2:]
    assert reader.parse_buffered() == []


# --------------------------------------------------------------------------------------------
# PDUReader: errors


@pytest.mark.parametrize("opcode", sorted(set(range(64)) - set(PDU_CLASSES)))
@pytest.mark.parametrize("hd", [False, True])
def test_reader_unknown_opcode(opcode: int, hd: bool) -> None:
    bhs = layout((0, "B", opcode), (1, "B", 0x80))
    raw = bhs + (crc(bhs) if hd else b"")
    with pytest.raises(PDUFormatError, match="opcode"):
        PDUReader(header_digest=hd).feed(raw)
    with pytest.raises(PDUFormatError, match="opcode"):
        pdu.decode(raw, header_digest=hd)
    with pytest.raises(PDUFormatError, match="opcode"):
        pdu.decode_bhs(memoryview(bhs))


@pytest.mark.parametrize("junk", [
    b"S",  # the first byte of an SSH banner, which is shorter than a BHS
    b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",
    # 48 bytes and more, whose byte 4 ('/') announces an AHS of 188 bytes not yet there
    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nServer: x\r\n\r\n",
])
def test_reader_judges_a_non_iscsi_peer_by_its_first_byte(junk: bytes) -> None:
    # Without a header digest, the bytes of another service fail at once, not when it closes.
    with pytest.raises(PDUFormatError, match=r"opcode 0x(13|08); the peer sent b'(S|HTTP)"):
        PDUReader(one_at_a_time=True).feed(junk)


def test_reader_waits_for_a_whole_header_under_a_header_digest() -> None:
    # With a header digest the opcode may be a corrupted byte: the digest is judged first.
    reader = PDUReader(header_digest=True)
    assert reader.feed(b"SSH-" + bytes(44 + 3)) == []
    with pytest.raises(DigestError):
        reader.feed(b"S")


@pytest.mark.parametrize("hd", [False, True])
@pytest.mark.parametrize("limit", [0, 1, 8192, (1 << 24) - 2])
def test_reader_oversize_data_segment(limit: int, hd: bool) -> None:
    bhs = layout((0, "B", 0x25), (5, "3s", u24(limit + 1)))
    raw = bhs + (crc(bhs) if hd else b"")
    reader = PDUReader(header_digest=hd, max_data_segment_length=limit)
    with pytest.raises(PDUFormatError, match="MaxRecvDataSegmentLength"):
        reader.feed(raw)


def test_reader_data_segment_at_the_limit() -> None:
    p = DataIn(itt=1, data=bytes(1000))
    reader = PDUReader(max_data_segment_length=1000)
    assert reader.feed(pdu.encode(p)) == [p]


def test_reader_header_digest_mismatch() -> None:
    raw = bytearray(pdu.encode(NopIn(itt=5, data=b"abc"), header_digest=True))
    raw[BHS] ^= 0x01  # the digest itself
    with pytest.raises(DigestError) as info:
        PDUReader(header_digest=True).feed(bytes(raw))
    assert info.value.header is True
    with pytest.raises(DigestError):
        pdu.decode(bytes(raw), header_digest=True)


@pytest.mark.parametrize("index", range(BHS))
def test_reader_header_corruption_is_a_digest_error(index: int) -> None:
    # With header digests, a corrupted header is reported as a digest error, whatever field
    # was hit (opcode, DataSegmentLength...), or the reader waits for bytes that a larger
    # TotalAHSLength / DataSegmentLength promised.
    clean = pdu.encode(ScsiCommand(cdb=bytes(20), itt=3, data=b"abcdef"), header_digest=True,
                       data_digest=True)
    for bit in range(8):
        raw = bytearray(clean)
        raw[index] ^= 1 << bit
        reader = PDUReader(header_digest=True, data_digest=True, max_data_segment_length=64)
        try:
            out = reader.feed(bytes(raw))
        except DigestError as exc:
            assert exc.header is True
        else:
            # Only a larger TotalAHSLength makes the reader wait for more header bytes.
            assert out == []
            assert index == 4


@pytest.mark.parametrize("where", ["data", "pad", "digest"])
def test_reader_data_digest_mismatch(where: str) -> None:
    raw = bytearray(pdu.encode(NopIn(itt=5, data=b"abcde"), data_digest=True))
    offset = {"data": BHS + 2, "pad": BHS + 6, "digest": BHS + 9}[where]
    raw[offset] ^= 0x80
    with pytest.raises(DigestError) as info:
        PDUReader(data_digest=True).feed(bytes(raw))
    assert info.value.header is False
    with pytest.raises(DigestError):
        pdu.decode(bytes(raw), data_digest=True)


def test_reader_padding_is_ignored_without_data_digest() -> None:
    p = NopIn(itt=5, data=b"abcde")
    raw = bytearray(pdu.encode(p))
    raw[BHS + 6] = 0xEE
    assert PDUReader().feed(bytes(raw)) == [p]


# --------------------------------------------------------------------------------------------
# PDUReader: Data-In placed straight into the command's buffers (DataSink)


def _subviews(views: Sequence[memoryview], offset: int, length: int) -> list[memoryview]:
    """The part [offset, offset + length) of the logical buffer formed by ``views``."""
    out: list[memoryview] = []
    base = 0
    for view in views:
        lo = max(offset - base, 0)
        hi = min(offset + length - base, len(view))
        if lo < hi:
            out.append(view[lo:hi])
        base += len(view)
    assert sum(len(v) for v in out) == length
    return out


class Declines:
    """A DataSink that declines to process placed Data-Ins: the reader hands them over as
    DataIn PDUs with ``placed`` set, for the tests to look at."""

    def data_in_buffers(self, itt: int, offset: int, length: int) -> Sequence[memoryview] | None:
        return None

    def data_in_placed(self, flags: int, status: int, itt: int, offset: int, stat_sn: int,
                       exp_cmd_sn: int, max_cmd_sn: int, data_sn: int, residual: int,
                       length: int) -> bool:
        return False


class ScatterSink(Declines):
    """Commands by ITT, each with a scatter/gather list of caller buffers."""

    def __init__(self) -> None:
        self.buffers: dict[int, list[memoryview]] = {}
        self.calls: list[tuple[int, int, int]] = []

    def data_in_buffers(self, itt: int, offset: int, length: int) -> Sequence[memoryview] | None:
        self.calls.append((itt, offset, length))
        views = self.buffers.get(itt)
        if views is None:
            return None
        return _subviews(views, offset, length)


Scenario = tuple[ScatterSink, list[bytearray], bytes, list[PDU], list[PDU], list[int]]


def _read_scenario(total: int, chunk: int, sizes: Sequence[int]) -> Scenario:
    """A read of ``total`` bytes into buffers of ``sizes`` bytes, sent as Data-Ins of ``chunk``
    bytes, with other PDUs and a Data-In for an unknown task in between."""
    assert sum(sizes) == total
    payload = bytes((i * 11 + 3) & 0xFF for i in range(total))
    areas = [bytearray(n) for n in sizes]
    sink = ScatterSink()
    sink.buffers[0x10] = [memoryview(a) for a in areas]
    sent: list[PDU] = [NopIn(itt=1, data=b"hello")]
    expected: list[PDU] = [NopIn(itt=1, data=b"hello")]
    placed = [0]
    for sn, offset in enumerate(range(0, total, chunk)):
        part = payload[offset : offset + chunk]
        last = offset + chunk >= total
        din = DataIn(itt=0x10, data_sn=sn, buffer_offset=offset, final=last,
                     status_present=last, data=part)
        sent.append(din)
        expected.append(dataclasses.replace(din, data=b""))
        placed.append(len(part))
        if sn == 0:
            # The sink does not know this task: its payload is delivered in pdu.data.
            other = DataIn(itt=0x99, buffer_offset=0, data=part[:2100])
            # No payload: the sink is not asked.
            empty = DataIn(itt=0x10, data_sn=99, buffer_offset=0)
            sent += [other, empty]
            expected += [other, empty]
            placed += [0, 0]
    sent.append(ScsiResponse(itt=1, stat_sn=2))
    expected.append(ScsiResponse(itt=1, stat_sn=2))
    placed.append(0)
    return sink, areas, payload, sent, expected, placed


def _check_placed(out: list[PDU], scenario: Scenario) -> None:
    sink, areas, payload, _, expected, placed = scenario
    assert out == expected  # data == b"" for every Data-In that was placed
    assert [p.placed if isinstance(p, DataIn) else 0 for p in out] == placed
    assert b"".join(areas) == payload
    assert all(length > 0 for _, _, length in sink.calls)


@pytest.mark.parametrize(("hd", "dd"), DIGESTS, ids=DIGEST_IDS)
def test_sink_places_payload_across_views(hd: bool, dd: bool) -> None:
    scenario = _read_scenario(10_000, 4096, [1000, 3333, 5667])
    sink, _, _, sent, _, placed = scenario
    assert [n for n in placed if n] == [4096, 4096, 1808]
    reader = PDUReader(header_digest=hd, data_digest=dd, sink=sink)
    _check_placed(reader.feed(_encode_stream(sent, hd, dd)), scenario)
    assert (0x99, 0, 2100) in sink.calls  # asked, declined: data in pdu.data


@pytest.mark.parametrize(("hd", "dd"), [(False, False), (True, True)], ids=["plain", "hd+dd"])
def test_sink_split_at_every_byte(hd: bool, dd: bool) -> None:
    scenario = _read_scenario(5000, 2500, [700, 2000, 2300])
    sink, areas, _, sent, _, _ = scenario
    raw = _encode_stream(sent, hd, dd)
    for i in range(len(raw) + 1):
        for a in areas:
            a[:] = bytes(len(a))
        sink.calls.clear()
        reader = PDUReader(header_digest=hd, data_digest=dd, sink=sink, buffer_size=1024)
        _check_placed(feed_all(reader, (raw[:i], raw[i:])), scenario)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), st.booleans(), st.lists(st.integers(1, 9000), min_size=1, max_size=20),
       st.integers(56, 20000), st.lists(st.integers(0, 12000), min_size=1, max_size=5))
def test_sink_random_splits(hd: bool, dd: bool, sizes: list[int], buffer_size: int,
                            cuts: list[int]) -> None:
    total = 12_000
    bounds = [0, *sorted(set(cuts)), total]
    area_sizes = [hi - lo for lo, hi in itertools.pairwise(bounds)]
    scenario = _read_scenario(total, 5000, area_sizes)
    raw = _encode_stream(scenario[3], hd, dd)
    reader = PDUReader(header_digest=hd, data_digest=dd, sink=scenario[0],
                       buffer_size=buffer_size)
    _check_placed(recv_into_all(reader, raw, sizes), scenario)


def test_sink_get_buffer_hands_out_the_callers_memory() -> None:
    first, second = bytearray(3000), bytearray(5192)
    sink = ScatterSink()
    sink.buffers[4] = [memoryview(first), memoryview(second)]
    payload = bytes(i & 0xFF for i in range(8192))
    raw = pdu.encode(DataIn(itt=4, data=payload, final=True))
    reader = PDUReader(sink=sink)
    assert reader.feed(raw[: BHS + 100]) == []
    assert reader.receiving_payload
    # Large remainder: the receive buffer is the caller's own memory (zero copy).
    buf = reader.get_buffer(-1)
    assert buf.obj is first
    assert len(buf) == 2900
    buf[:] = raw[BHS + 100 : BHS + 3000]
    assert reader.buffer_updated(2900) == []
    buf = reader.get_buffer(-1)
    assert buf.obj is second
    assert len(buf) == 5192
    buf[:4000] = raw[BHS + 3000 : BHS + 7000]
    assert reader.buffer_updated(4000) == []
    # 1192 bytes left, below DIRECT_THRESHOLD: received into the reader's own buffer.
    buf = reader.get_buffer(-1)
    assert buf.obj is not first
    assert buf.obj is not second
    out = reader.feed(raw[BHS + 7000 :])
    assert out == [DataIn(itt=4, final=True)]
    assert isinstance(out[0], DataIn)
    assert out[0].placed == 8192
    assert out[0].data == b""
    assert bytes(first + second) == payload
    assert not reader.receiving_payload


def recvmsg_all(reader: PDUReader, raw: bytes, sizes: Iterable[int]) -> tuple[list[PDU], int]:
    """Drive the reader as Connection does: direct_buffers/recvmsg_into/direct_updated while
    it has them, else the BufferedProtocol pair. Returns the PDUs and the number of bytes
    that were received into the reader's own buffer."""
    out: list[PDU] = []
    pos = own = 0
    size_iter = itertools.cycle(list(sizes) or [1 << 30])
    while pos < len(raw):
        bufs = reader.direct_buffers()
        if bufs is None:
            buf = reader.get_buffer(-1)
            assert len(buf) > 0
            n = min(len(buf), max(1, next(size_iter)), len(raw) - pos)
            buf[:n] = raw[pos : pos + n]
            if buf.obj is reader._buf:
                own += n
            pos += n
            out.extend(reader.buffer_updated(n))
            while reader.held:
                out.extend(reader.parse_buffered())
            continue
        assert all(len(b) for b in bufs)
        n = min(sum(len(b) for b in bufs), max(1, next(size_iter)), len(raw) - pos)
        left = n
        for b in bufs:  # what recvmsg_into does
            k = min(left, len(b))
            b[:k] = raw[pos : pos + k]
            if b.obj is reader._buf:
                own += k
            pos += k
            left -= k
        out.extend(reader.direct_updated(n))
        while reader.held:
            out.extend(reader.parse_buffered())
    return out, own


@pytest.mark.parametrize(("hd", "dd"), DIGESTS, ids=DIGEST_IDS)
def test_sink_stream_of_large_data_ins_is_received_in_place(hd: bool, dd: bool) -> None:
    # Large Data-Ins back to back: after the first header, each read takes the rest of one
    # payload into the caller's views and just the next header (and the trailer) into the
    # reader, so no payload byte goes through the reader's own buffer.
    chunk = PDUReader.LARGE_PAYLOAD
    payload = bytes((i * 7) & 0xFF for i in range(4 * chunk))
    areas = [bytearray(chunk), bytearray(2 * chunk - 100), bytearray(chunk + 100)]
    sink = ScatterSink()
    sink.buffers[0x10] = [memoryview(a) for a in areas]
    sent: list[PDU] = [NopIn(itt=1, data=b"hello")]
    sent += [DataIn(itt=0x10, data_sn=sn, buffer_offset=offset, final=sn == 3,
                    data=payload[offset : offset + chunk])
             for sn, offset in enumerate(range(0, 4 * chunk, chunk))]
    sent.append(ScsiResponse(itt=0x10, stat_sn=2))
    raw = _encode_stream(sent, hd, dd)
    reader = PDUReader(header_digest=hd, data_digest=dd, sink=sink,
                       max_data_segment_length=chunk)
    head = pdu.pdu_length(raw, header_digest=hd, data_digest=dd)  # the NOP-In
    out, own = recvmsg_all(reader, raw, [head + BHS + 4 * hd, 1 << 30])
    assert out == [sent[0], *(dataclasses.replace(p, data=b"") for p in sent[1:5]), sent[5]]
    assert b"".join(areas) == payload
    assert own == len(raw) - 4 * chunk


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), st.booleans(), st.lists(st.integers(1, 90_000), min_size=1, max_size=20),
       st.integers(56, 200_000), st.sampled_from([2000, 32 * 1024, 50_000]),
       st.lists(st.integers(0, 120_000), min_size=1, max_size=5))
def test_sink_stream_random_splits(hd: bool, dd: bool, sizes: list[int], buffer_size: int,
                                   chunk: int, cuts: list[int]) -> None:
    total = 120_000
    bounds = [0, *sorted(set(cuts)), total]
    area_sizes = [hi - lo for lo, hi in itertools.pairwise(bounds)]
    scenario = _read_scenario(total, chunk, area_sizes)
    raw = _encode_stream(scenario[3], hd, dd)
    reader = PDUReader(header_digest=hd, data_digest=dd, sink=scenario[0],
                       buffer_size=buffer_size, max_data_segment_length=chunk)
    _check_placed(recvmsg_all(reader, raw, sizes)[0], scenario)


def test_sink_stream_mode_ends_with_a_small_pdu() -> None:
    # After a large Data-In the reader reads only up to the next header; a small PDU there
    # ends stream mode, and reads fill the buffer again (many small PDUs per read).
    area = bytearray(PDUReader.LARGE_PAYLOAD)
    sink = ScatterSink()
    sink.buffers[4] = [memoryview(area)]
    raw = pdu.encode(DataIn(itt=4, data=bytes(len(area)), final=True))
    reader = PDUReader(sink=sink, max_data_segment_length=len(area))
    assert reader.feed(raw[:BHS]) == []
    assert reader.direct_buffers() is not None
    buf = reader.get_buffer(-1)
    assert buf.obj is area
    buf[:] = raw[BHS:]
    assert len(reader.buffer_updated(len(buf))) == 1
    assert reader.direct_buffers() is None
    assert len(reader.get_buffer(-1)) == BHS
    assert reader.feed(pdu.encode(NopIn(itt=1, data=b"x"))) == [NopIn(itt=1, data=b"x")]
    assert len(reader.get_buffer(-1)) > BHS


def test_sink_direct_receive_with_data_digest() -> None:
    area = bytearray(4096)
    sink = ScatterSink()
    sink.buffers[4] = [memoryview(area)]
    payload = bytes(range(256)) * 16
    raw = bytearray(pdu.encode(DataIn(itt=4, data=payload), data_digest=True))
    reader = PDUReader(sink=sink, data_digest=True)
    out = recv_into_all(reader, bytes(raw), [BHS, 1 << 20])
    assert out == [DataIn(itt=4)]
    assert area == payload
    # A payload corrupted in flight is detected after it has landed in the caller's buffer.
    raw[BHS + 3000] ^= 0x04
    reader = PDUReader(sink=sink, data_digest=True)
    with pytest.raises(DigestError) as info:
        recv_into_all(reader, bytes(raw), [BHS, 1 << 20])
    assert info.value.header is False


@pytest.mark.parametrize("n", [1, 2, 3, 5, 2047, 2048, 2049, 4097])
def test_sink_payload_sizes_and_padding(n: int) -> None:
    area = bytearray(n)
    sink = ScatterSink()
    sink.buffers[4] = [memoryview(area)]
    payload = bytes(i * 5 & 0xFF for i in range(n))
    raw = pdu.encode(DataIn(itt=4, data=payload), header_digest=True, data_digest=True) \
        + pdu.encode(NopIn(itt=1), header_digest=True, data_digest=True)
    reader = PDUReader(sink=sink, header_digest=True, data_digest=True)
    out = recv_into_all(reader, raw, [BHS + 4, 7, 1 << 20])
    assert out == [DataIn(itt=4), NopIn(itt=1)]
    assert area == payload


class Processes(ScatterSink):
    """A sink that processes the Data-Ins it placed, recording their fields."""

    def __init__(self) -> None:
        super().__init__()
        self.processed: list[tuple[int, ...]] = []

    def data_in_placed(self, flags: int, status: int, itt: int, offset: int, stat_sn: int,
                       exp_cmd_sn: int, max_cmd_sn: int, data_sn: int, residual: int,
                       length: int) -> bool:
        self.processed.append((flags, status, itt, offset, stat_sn, exp_cmd_sn, max_cmd_sn,
                               data_sn, residual, length))
        return True


@pytest.mark.parametrize(("hd", "dd"), DIGESTS, ids=DIGEST_IDS)
@pytest.mark.parametrize("sizes", [[1 << 20], [BHS + 4, 1 << 20], [7]],
                         ids=["inline", "direct", "bytewise"])
def test_sink_processes_from_the_header_fields(hd: bool, dd: bool, sizes: list[int]) -> None:
    # Whichever route the payload takes, the sink gets the header's fields as ints and the
    # reader makes no PDU of a Data-In the sink processed.
    area = bytearray(5000)
    sink = Processes()
    sink.buffers[7] = [memoryview(area)]
    payload = bytes(i * 3 & 0xFF for i in range(5000))
    din = DataIn(itt=7, final=True, status_present=True, underflow=True, status=2,
                 buffer_offset=0, stat_sn=0x11223344, exp_cmd_sn=0x55667788,
                 max_cmd_sn=0x99AABBCC, data_sn=3, residual_count=123, data=payload)
    reader = PDUReader(header_digest=hd, data_digest=dd, sink=sink)
    raw = pdu.encode(din, header_digest=hd, data_digest=dd) + \
        pdu.encode(NopIn(itt=1), header_digest=hd, data_digest=dd)
    assert recv_into_all(reader, raw, sizes) == [NopIn(itt=1)]
    assert sink.processed == [(0x80 | 0x02 | 0x01, 2, 7, 0, 0x11223344, 0x55667788,
                               0x99AABBCC, 3, 123, 5000)]
    assert area == payload


def test_sink_waits_for_the_pdus_returned_before() -> None:
    # A SCSI Response that completes a command, then a Data-In in the same read: the reader
    # returns the response and holds the Data-In back (it might be for that command, whose
    # buffer the caller gets back with the response) until the caller has processed it.
    area = bytearray(100)
    sink = Processes()
    sink.buffers[5] = [memoryview(area)]
    raw = pdu.encode(ScsiResponse(itt=9, stat_sn=1)) + \
        pdu.encode(DataIn(itt=5, final=True, data=bytes(range(100))))
    reader = PDUReader(sink=sink)
    buf = reader.get_buffer(-1)
    buf[: len(raw)] = raw
    assert reader.buffer_updated(len(raw)) == [ScsiResponse(itt=9, stat_sn=1)]
    held = reader.held
    assert held and sink.calls == [] and area == bytes(100)
    assert reader.parse_buffered() == []
    assert reader.held is False
    assert sink.calls == [(5, 0, 100)] and len(sink.processed) == 1
    assert area == bytes(range(100))


def test_feed_keeps_the_order_of_processing() -> None:
    # feed() returns every PDU at once: a Data-In after another PDU is placed but handed over
    # (placed set), not processed by the sink ahead of that PDU; one before any is processed.
    sink = Processes()
    first, second = bytearray(10), bytearray(10)
    sink.buffers[1] = [memoryview(first)]
    sink.buffers[2] = [memoryview(second)]
    raw = pdu.encode(DataIn(itt=1, data=b"a" * 10)) + pdu.encode(NopIn(itt=3)) + \
        pdu.encode(DataIn(itt=2, data=b"b" * 10))
    out = PDUReader(sink=sink).feed(raw)
    assert out == [NopIn(itt=3), DataIn(itt=2)]
    assert isinstance(out[1], DataIn) and out[1].placed == 10
    assert [p[2] for p in sink.processed] == [1]
    assert first == b"a" * 10 and second == b"b" * 10


def test_sink_declines_then_data_is_in_pdu() -> None:
    sink = ScatterSink()  # knows no task: returns None
    p = DataIn(itt=4, data=bytes(5000))
    out = PDUReader(sink=sink).feed(pdu.encode(p))
    assert out == [p]
    assert isinstance(out[0], DataIn)
    assert out[0].placed == 0
    assert sink.calls == [(4, 0, 5000)]


def test_sink_only_asked_about_data_in() -> None:
    sink = ScatterSink()
    sink.buffers[1] = [memoryview(bytearray(100))]
    pdus_: list[PDU] = [NopIn(itt=1, data=b"abc"), ScsiResponse(itt=1, data=b"\x00\x00"),
                        R2T(itt=1), DataIn(itt=1)]
    assert PDUReader(sink=sink).feed(_encode_stream(pdus_, False, False)) == pdus_
    assert sink.calls == []


def test_sink_wrong_size_is_a_local_error() -> None:
    class Short(Declines):
        def data_in_buffers(self, itt: int, offset: int,
                            length: int) -> Sequence[memoryview] | None:
            return [memoryview(bytearray(length - 1))]

    with pytest.raises(LocalProtocolError):
        PDUReader(sink=Short()).feed(pdu.encode(DataIn(itt=1, data=bytes(10))))


def test_sink_error_propagates() -> None:
    class Refuse(Declines):
        def data_in_buffers(self, itt: int, offset: int,
                            length: int) -> Sequence[memoryview] | None:
            raise PDUFormatError("Data-In beyond the command's buffer")

    with pytest.raises(PDUFormatError, match="beyond"):
        PDUReader(sink=Refuse()).feed(pdu.encode(DataIn(itt=1, data=bytes(10))))


def test_sink_views_of_wider_items() -> None:
    # A sink may hand out views of 32-bit items; the payload still lands byte for byte.
    words = array.array("I", bytes(4000))
    sink = ScatterSink()
    sink.buffers[4] = [memoryview(words)]
    payload = bytes(i * 7 & 0xFF for i in range(4000))

    class Words(Declines):
        def data_in_buffers(self, itt: int, offset: int,
                            length: int) -> Sequence[memoryview] | None:
            return [memoryview(words)]

    reader = PDUReader(sink=Words(), data_digest=True)
    out = recv_into_all(reader, pdu.encode(DataIn(itt=4, data=payload), data_digest=True),
                        [BHS + 10, 1 << 20])
    assert out == [DataIn(itt=4)]
    assert words.tobytes() == payload


@pytest.mark.parametrize(
    "view",
    [
        pytest.param(memoryview(bytearray(20))[::2], id="strided"),
        pytest.param(memoryview(bytes(10)), id="read-only"),
    ],
)
def test_sink_unusable_view_is_a_local_error(view: memoryview) -> None:
    class Bad(Declines):
        def data_in_buffers(self, itt: int, offset: int,
                            length: int) -> Sequence[memoryview] | None:
            return [view]

    with pytest.raises(LocalProtocolError):
        PDUReader(sink=Bad()).feed(pdu.encode(DataIn(itt=1, data=bytes(10))))


def test_sink_two_dimensional_view() -> None:
    area = bytearray(24)
    grid = memoryview(area).cast("B", shape=[4, 6])

    class Grid(Declines):
        def data_in_buffers(self, itt: int, offset: int,
                            length: int) -> Sequence[memoryview] | None:
            return [grid]

    payload = bytes(range(1, 25))
    assert PDUReader(sink=Grid()).feed(pdu.encode(DataIn(itt=1, data=payload))) == [
        DataIn(itt=1)
    ]
    assert area == payload
