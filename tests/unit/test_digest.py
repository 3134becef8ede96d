"""CRC32C digests (RFC 7143 §7.8, §13.1): the RFC 3720 Appendix B.4 vectors and properties."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from initiator import digest
from initiator.errors import DigestError, ISCSIError

# RFC 3720 Appendix B.4 (repeated as RFC 7143 Appendix A.4): each vector with the four CRC bytes
# in the order they go on the wire.
READ10_PDU = bytes.fromhex(
    "01c00000" "00000000" "00000000" "00000000"
    "14000000" "00000400" "00000014" "00000018"
    "28000000" "00000000" "02000000" "00000000"
)
B4_VECTORS: list[tuple[str, bytes, bytes]] = [
    ("32 bytes of zeros", bytes(32), bytes.fromhex("aa36918a")),
    ("32 bytes of ones", b"\xff" * 32, bytes.fromhex("43aba862")),
    ("32 incrementing bytes 00..1f", bytes(range(32)), bytes.fromhex("4e79dd46")),
    ("32 decrementing bytes 1f..00", bytes(range(31, -1, -1)), bytes.fromhex("5cdb3f11")),
    ("an iSCSI SCSI Read (10) Command PDU", READ10_PDU, bytes.fromhex("563a96d9")),
]


@pytest.mark.parametrize(("data", "wire"), [(d, w) for _, d, w in B4_VECTORS],
                         ids=[name for name, _, _ in B4_VECTORS])
def test_rfc3720_b4_vectors(data: bytes, wire: bytes) -> None:
    value = digest.crc32c(data)
    assert digest.pack_digest(value) == wire
    assert digest.unpack_digest(wire) == value
    # The same value for every buffer type the data path uses.
    assert digest.crc32c(bytearray(data)) == value
    assert digest.crc32c(memoryview(data)) == value
    digest.check(wire, value, header=True)


def test_zero_vector_value() -> None:
    # The docstring's claim, as a number: the wire word is little-endian.
    assert digest.crc32c(bytes(32)) == 0x8A9136AA
    assert digest.DIGEST_LEN == 4


def test_crc32c_of_nothing_is_zero() -> None:
    assert digest.crc32c(b"") == 0
    assert digest.crc32c_of([]) == 0
    assert digest.crc32c_of([b"", memoryview(b"")]) == 0


def test_crc32c_of_b4_vector_in_pieces() -> None:
    parts: list[bytes | bytearray | memoryview] = [
        memoryview(READ10_PDU)[:5], b"", bytearray(READ10_PDU[5:17]), READ10_PDU[17:],
    ]
    assert digest.pack_digest(digest.crc32c_of(parts)) == bytes.fromhex("563a96d9")


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_crc32c_continues(a: bytes, b: bytes) -> None:
    assert digest.crc32c(b, digest.crc32c(a)) == digest.crc32c(a + b)


@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=8))
def test_crc32c_of_splits(data: bytes, cuts: list[int]) -> None:
    points = sorted({min(c, len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    parts = [memoryview(data)[lo:hi] for lo, hi in itertools.pairwise(bounds)]
    assert digest.crc32c_of(parts) == digest.crc32c(data)


@given(st.integers(0, 0xFFFFFFFF))
def test_pack_unpack_round_trip(value: int) -> None:
    wire = digest.pack_digest(value)
    assert len(wire) == 4
    assert wire == value.to_bytes(4, "little")
    assert digest.unpack_digest(wire) == value
    assert digest.unpack_digest(bytearray(wire)) == value
    assert digest.unpack_digest(memoryview(wire)) == value


@pytest.mark.parametrize("header", [True, False])
def test_check_mismatch_raises(header: bool) -> None:
    with pytest.raises(DigestError) as info:
        digest.check(bytes.fromhex("aa36918a"), 0x12345678, header=header)
    assert isinstance(info.value, ISCSIError)
    assert info.value.header is header
    message = str(info.value)
    assert ("header" if header else "data") in message
    assert "0x8a9136aa" in message
    assert "0x12345678" in message


@given(st.binary(max_size=100), st.integers(0, 31))
def test_single_bit_flip_is_detected(data: bytes, bit: int) -> None:
    # CRC32C detects every single-bit error.
    value = digest.crc32c(data)
    wire = digest.pack_digest(value)
    flipped = bytearray(wire)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(DigestError):
        digest.check(flipped, value, header=False)
    if data:
        corrupted = bytearray(data)
        corrupted[bit % len(data)] ^= 1 << (bit % 8)
        with pytest.raises(DigestError):
            digest.check(wire, digest.crc32c(corrupted), header=False)
