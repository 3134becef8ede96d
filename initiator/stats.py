"""Counters of a session and latency histograms: plain numbers, no clock, no I/O.

Theory of operation
-------------------
What an operator watches (``hbactl top``, Prometheus: see :mod:`hba.metrics`) is counted where it
happens, into small objects of this module, and read from outside whenever someone looks: no
callback, no lock, nothing but an integer added on the paths where the event occurs. They are
apart from the objects that count into them (:class:`~initiator.session.ConnectionCore`,
:class:`~initiator.transport.Session`, the TCMU dispatcher), which keep few attributes for
fast access on the per-command path.

:class:`Histogram` is a Prometheus-style cumulative-at-export histogram: a fixed tuple of upper
bounds (``le``), one count per bucket plus the overflow bucket, a sum and a count. Observations
may be added in bulk (``observe(value, n)``), so a caller that knows many observations share a
value records them at once. :func:`quantile` estimates a quantile from bucket counts the way
Prometheus' ``histogram_quantile`` does (linear within the bucket).

:class:`SessionStats` holds what one iSCSI session counts across its connections: connections
lost and why, login failures by reason (:func:`login_failure_reason`), digest errors, NOP-Out
round trips, how often the command window closed, and the replacement timeouts that expired.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

from initiator.errors import (
    AuthenticationError,
    ConnectionFailed,
    DigestError,
    ISCSIError,
    NegotiationError,
    ProtocolError,
)
from initiator.login import LoginAuthorizationError, LoginError, StatusClass, TargetNotFoundError

__all__ = [
    "LATENCY_BUCKETS",
    "Histogram",
    "SessionStats",
    "login_failure_reason",
    "quantile",
]


def _series(low_exponent: int, high_exponent: int, steps: Sequence[float]) -> tuple[float, ...]:
    return tuple(round(step * 10.0 ** e, 9) for e in range(low_exponent, high_exponent + 1)
                 for step in steps)


LATENCY_BUCKETS: tuple[float, ...] = (*_series(-5, 0, (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)),
                                      10.0, 15.0, 20.0, 30.0, 60.0)
"""Upper bounds in seconds, 10 µs to 60 s, about 1.5 apart: fine enough for a p99 within half
a bucket of the truth, few enough (41) for every disk's three operations in one scrape."""


class Histogram:
    """Counts of observations by bucket (see the module docstring)."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError("histogram bounds must be increasing and not empty")
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        """Per bucket (not cumulative); the last is above every bound (+Inf)."""
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, n: int = 1) -> None:
        """Record ``n`` observations of ``value`` (in the bucket whose bound is the first
        >= ``value``, as Prometheus' ``le``)."""
        self.counts[bisect_left(self.bounds, value)] += n
        self.sum += value * n
        self.count += n

    def cumulative(self) -> list[int]:
        """Counts at or below each bound, then the total (Prometheus' ``_bucket`` series)."""
        out: list[int] = []
        total = 0
        for n in self.counts:
            total += n
            out.append(total)
        return out


def quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> float | None:
    """The ``q`` quantile (0..1) of per-bucket ``counts`` over ``bounds`` (one more count than
    bounds: the last is the overflow), interpolated linearly inside its bucket as Prometheus'
    ``histogram_quantile`` does; the highest bound when it falls in the overflow bucket. None
    when there is no observation."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for index, n in enumerate(counts):
        if n and seen + n >= rank:
            if index >= len(bounds):
                return bounds[-1]
            low = bounds[index - 1] if index else 0.0
            return low + (bounds[index] - low) * max(0.0, rank - seen) / n
        seen += n
    return bounds[-1]


def login_failure_reason(error: BaseException) -> str:
    """A short label for why a login failed (Prometheus label value, journal field)."""
    if isinstance(error, AuthenticationError):
        return "authentication"
    if isinstance(error, LoginAuthorizationError):
        return "authorization"
    if isinstance(error, TargetNotFoundError):
        return "target_not_found"
    if isinstance(error, LoginError):
        if error.status_class == StatusClass.TARGET_ERROR:
            return "target_error"
        if error.status_class == StatusClass.REDIRECTION:
            return "redirect"
        return "initiator_error"
    if isinstance(error, NegotiationError):
        return "negotiation"
    if isinstance(error, ConnectionFailed):
        return "connection"
    if isinstance(error, ProtocolError):
        return "protocol"
    if isinstance(error, ISCSIError):
        return "other"
    return "internal"


class SessionStats:
    """What one session counts, over all its connections (see the module docstring)."""

    __slots__ = ("connections_lost", "digest_errors", "give_ups", "last_error",
                 "login_failures", "nop_rtt", "window_closed")

    def __init__(self) -> None:
        self.connections_lost = 0
        """Connections that failed (each then reinstated or given up)."""
        self.digest_errors = {"header": 0, "data": 0}
        """Header and data digest mismatches (each ends its connection, RFC 7143 §7.8)."""
        self.login_failures: dict[str, int] = {}
        """Failed logins (the first one and recovery attempts) by :func:`login_failure_reason`."""
        self.nop_rtt = Histogram()
        """Round trip of each answered NOP-Out ping, seconds."""
        self.window_closed = 0
        """Times a request had to wait because CmdSN reached MaxCmdSN (§4.2.2.1)."""
        self.give_ups = 0
        """Outages that reached the replacement timeout."""
        self.last_error = ""
        """Why the last connection was lost (or the last login failed)."""

    def connection_lost(self, error: BaseException) -> None:
        self.connections_lost += 1
        self.last_error = str(error)
        if isinstance(error, DigestError):
            self.digest_errors["header" if error.header else "data"] += 1

    def login_failed(self, error: BaseException) -> None:
        reason = login_failure_reason(error)
        self.login_failures[reason] = self.login_failures.get(reason, 0) + 1
        self.last_error = str(error)
