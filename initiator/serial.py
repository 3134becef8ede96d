"""Serial number arithmetic for CmdSN, StatSN, DataSN and friends (RFC 7143 §4.2.2.1).

iSCSI sequence numbers are 32-bit counters compared with RFC 1982 serial arithmetic
(SERIAL_BITS = 32): ``a < b`` when ``b`` is ahead of ``a`` by less than 2**31 modulo 2**32.
Two numbers exactly 2**31 apart are incomparable; RFC 1982 leaves that undefined, and iSCSI
never lets a window grow that wide, so we report neither ``lt`` nor ``gt`` for them.
"""

from __future__ import annotations

SERIAL_BITS = 32
_MOD = 1 << SERIAL_BITS
_HALF = 1 << (SERIAL_BITS - 1)
MASK = _MOD - 1


def add(a: int, n: int) -> int:
    """``a + n`` modulo 2**32 (RFC 1982 §3.1; ``n`` may be negative here for convenience)."""
    return (a + n) & MASK


def diff(a: int, b: int) -> int:
    """The signed distance from ``b`` to ``a``: positive when ``a`` is ahead of ``b``.

    Undefined (returns -2**31) for numbers exactly 2**31 apart.
    """
    d = (a - b) & MASK
    return d - _MOD if d >= _HALF else d


def lt(a: int, b: int) -> bool:
    """``a < b`` in serial arithmetic (RFC 1982 §3.2)."""
    d = (b - a) & MASK
    return 0 < d < _HALF


def gt(a: int, b: int) -> bool:
    """``a > b`` in serial arithmetic."""
    return lt(b, a)


def le(a: int, b: int) -> bool:
    """``a <= b``: equal, or ``a < b``."""
    return a == b or lt(a, b)


def ge(a: int, b: int) -> bool:
    """``a >= b``: equal, or ``a > b``."""
    return a == b or lt(b, a)


def in_window(sn: int, low: int, high: int) -> bool:
    """``low <= sn <= high`` in serial arithmetic, the test of RFC 7143 §4.2.2.1 for CmdSN
    against [ExpCmdSN, MaxCmdSN]. An empty window (``high == low - 1``) contains nothing."""
    return le(low, sn) and le(sn, high)
