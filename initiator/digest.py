"""CRC32C header and data digests (RFC 7143 §7.8, Appendix B of RFC 3720).

The digest is CRC32C (Castagnoli) over the bytes, sent as a 4-byte little-endian word: the RFC
3720 B.4 vector of 32 zero bytes gives the wire bytes ``aa 36 91 8a``. The ``crc32c`` package
uses SSE4.2 / ARMv8 CRC instructions when the CPU has them.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import crc32c as _crc32c

from initiator.errors import DigestError

DIGEST_LEN = 4
_DIGEST = struct.Struct("<I")


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """CRC32C of ``data``, continuing from ``value`` (the result of an earlier call)."""
    return int(_crc32c.crc32c(data, value))


def crc32c_of(parts: Iterable[bytes | bytearray | memoryview]) -> int:
    """CRC32C over several buffers as if they were one (scatter/gather data)."""
    value = 0
    for part in parts:
        value = int(_crc32c.crc32c(part, value))
    return value


def pack_digest(value: int) -> bytes:
    """The 4 wire bytes of a digest value."""
    return _DIGEST.pack(value)


def unpack_digest(raw: bytes | bytearray | memoryview) -> int:
    """The digest value carried by 4 wire bytes."""
    return int(_DIGEST.unpack_from(raw)[0])


def check(expected_wire: bytes | bytearray | memoryview, computed: int, *, header: bool) -> None:
    """Raise :class:`DigestError` unless the received digest equals the computed one."""
    got = unpack_digest(expected_wire)
    if got != computed:
        what = "header" if header else "data"
        raise DigestError(
            f"{what} digest mismatch: received 0x{got:08x}, computed 0x{computed:08x} "
            "(data was corrupted in transit, or the peer does not use CRC32C)",
            header=header,
        )
