"""Serial number arithmetic (RFC 1982 with SERIAL_BITS = 32, RFC 7143 §4.2.2.1)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from initiator import serial

MAX = 0xFFFFFFFF
HALF = 1 << 31
sn = st.integers(0, MAX)
# A distance that is comparable: 1 .. 2**31 - 1.
step = st.integers(1, HALF - 1)


def test_constants() -> None:
    assert serial.SERIAL_BITS == 32
    assert serial.MASK == MAX


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (0, 1),
        (1, 2),
        (MAX, 0),  # wrap-around: 0 follows 2**32 - 1
        (MAX - 5, 5),
        (0, HALF - 1),  # the farthest ahead that is still "greater"
        (HALF, MAX),
        (HALF + 1, 0),
        (MAX, HALF - 2),
        (0x7FFFFFFF, 0x80000000),
    ],
)
def test_lt_gt_examples(a: int, b: int) -> None:
    assert serial.lt(a, b)
    assert serial.le(a, b)
    assert serial.gt(b, a)
    assert serial.ge(b, a)
    assert not serial.lt(b, a)
    assert not serial.gt(a, b)
    assert not serial.ge(a, b)
    assert not serial.le(b, a)
    assert serial.diff(b, a) > 0
    assert serial.diff(a, b) < 0


@pytest.mark.parametrize("a", [0, 1, 12345, HALF - 1, HALF, HALF + 1, MAX])
def test_exactly_half_apart_is_incomparable(a: int) -> None:
    # RFC 1982 §3.2 leaves a and a + 2**31 undefined: neither is less than the other.
    b = serial.add(a, HALF)
    assert not serial.lt(a, b)
    assert not serial.gt(a, b)
    assert not serial.lt(b, a)
    assert not serial.gt(b, a)
    assert not serial.le(a, b)
    assert not serial.ge(a, b)
    assert serial.diff(a, b) == -HALF
    assert serial.diff(b, a) == -HALF


@pytest.mark.parametrize("a", [0, 1, HALF, MAX])
def test_equal(a: int) -> None:
    assert not serial.lt(a, a)
    assert not serial.gt(a, a)
    assert serial.le(a, a)
    assert serial.ge(a, a)
    assert serial.diff(a, a) == 0


def test_add_wraps() -> None:
    assert serial.add(MAX, 1) == 0
    assert serial.add(MAX, 2) == 1
    assert serial.add(0, -1) == MAX
    assert serial.add(5, HALF - 1) == HALF + 4
    assert serial.add(HALF, HALF) == 0


def test_diff_examples() -> None:
    assert serial.diff(0, MAX) == 1
    assert serial.diff(MAX, 0) == -1
    assert serial.diff(5, MAX - 4) == 10
    assert serial.diff(HALF - 1, 0) == HALF - 1
    assert serial.diff(0, HALF - 1) == -(HALF - 1)


def test_in_window_examples() -> None:
    # CmdSN against [ExpCmdSN, MaxCmdSN] (RFC 7143 §4.2.2.1), across the wrap.
    assert serial.in_window(MAX, MAX - 1, 2)
    assert serial.in_window(0, MAX - 1, 2)
    assert serial.in_window(2, MAX - 1, 2)
    assert serial.in_window(MAX - 1, MAX - 1, 2)
    assert not serial.in_window(3, MAX - 1, 2)
    assert not serial.in_window(MAX - 2, MAX - 1, 2)
    # A window of one.
    assert serial.in_window(7, 7, 7)
    assert not serial.in_window(8, 7, 7)
    # MaxCmdSN = ExpCmdSN - 1: the target's window is closed, nothing may be sent.
    for low in (0, 1, HALF, MAX):
        high = serial.add(low, -1)
        for cand in (low, high, serial.add(low, 1), serial.add(low, HALF), serial.add(low, 7)):
            assert not serial.in_window(cand, low, high)


@given(sn, step)
def test_ahead_by_less_than_half_is_greater(a: int, n: int) -> None:
    b = serial.add(a, n)
    assert serial.lt(a, b)
    assert serial.gt(b, a)
    assert serial.le(a, b)
    assert serial.ge(b, a)
    assert not serial.lt(b, a)
    assert not serial.ge(a, b)
    assert serial.diff(b, a) == n
    assert serial.diff(a, b) == -n


@given(sn, sn)
def test_trichotomy(a: int, b: int) -> None:
    outcomes = [serial.lt(a, b), a == b, serial.gt(a, b)]
    if serial.add(a, HALF) == b:
        assert outcomes == [False, False, False]
    else:
        assert outcomes.count(True) == 1
    assert serial.le(a, b) == (serial.lt(a, b) or a == b)
    assert serial.ge(a, b) == (serial.gt(a, b) or a == b)
    assert serial.lt(a, b) == serial.gt(b, a)


@given(sn, sn)
def test_diff_is_consistent_with_add_and_lt(a: int, b: int) -> None:
    d = serial.diff(a, b)
    assert -HALF <= d < HALF
    assert serial.add(b, d) == a
    if d > 0:
        assert serial.gt(a, b)
    elif d == 0:
        assert a == b
    elif d > -HALF:
        assert serial.lt(a, b)


@given(sn, st.integers(-(1 << 40), 1 << 40))
def test_add_is_modular(a: int, n: int) -> None:
    r = serial.add(a, n)
    assert 0 <= r <= MAX
    assert r == (a + n) % (1 << 32)


@given(sn, st.integers(0, HALF - 2), st.integers(0, MAX))
def test_in_window_matches_offsets(low: int, width: int, offset: int) -> None:
    # For a window narrower than 2**31, sn is in [low, low + width] exactly when its distance
    # ahead of low is at most width.
    high = serial.add(low, width)
    cand = serial.add(low, offset)
    assert serial.in_window(cand, low, high) == (offset <= width)


@given(sn, step, step)
def test_lt_is_transitive_within_half(a: int, n: int, m: int) -> None:
    # Transitivity holds when the total distance stays below 2**31; RFC 1982 §3.2 notes that it
    # does not hold in general.
    b = serial.add(a, n)
    c = serial.add(b, m)
    assert serial.lt(a, b)
    assert serial.lt(b, c)
    assert serial.lt(a, c) == (n + m < HALF)
