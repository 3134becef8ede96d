"""What one ring's commands did: counts, bytes, latency, statuses — for ``hbactl top`` and
Prometheus (:mod:`hba.metrics`).

Theory of operation
-------------------
The dispatcher classifies each command once, when it takes the entry off the ring, into one of
nine classes: its operation (:data:`OPERATIONS`: the READ and WRITE families by opcode, the rest
"other") times its data direction (:data:`DIRECTIONS`: Data-In, Data-Out, none; a
bidirectional command counts as Data-Out). The class is ``3 * operation + direction``; the
opcode part is one lookup in :data:`OPERATION_BASE`.

Latency is measured from the loop pass that took the entry off the ring to the loop pass that
published its completion (the 4-byte write that makes the kernel reap it). Neither end reads
the clock per command: the commands of one class that one scan takes share an
:class:`Arrival` (its time is the scan's one clock reading), a completion adds one to its
arrival (with the bytes moved; a command that failed moved none), and the flush that
publishes them reads the clock once and records each arrival's completions in bulk
(:meth:`RingStats.record`): one observation per arrival, not per command.

Statuses other than GOOD and the sense keys of CHECK CONDITION are counted as written to the
ring (what the kernel, and so the application, gets).
"""

from __future__ import annotations

from collections.abc import Iterable

from initiator.stats import Histogram

__all__ = ["DIRECTIONS", "OPERATIONS", "OPERATION_BASE", "Arrival", "RingStats"]

OPERATIONS = ("read", "write", "other")
DIRECTIONS = ("read", "write", "none")
"""Data-In (the initiator reads), Data-Out (it writes), no data."""
DATA_IN, DATA_OUT, NO_DATA = 0, 1, 2

_READS = (0x08, 0x28, 0xA8, 0x88)           # READ(6), (10), (12), (16)
_WRITES = (0x0A, 0x2A, 0xAA, 0x8A,          # WRITE(6), (10), (12), (16)
           0x2E, 0xAE, 0x8E)                # WRITE AND VERIFY(10), (12), (16)
OPERATION_BASE: tuple[int, ...] = tuple(
    0 if op in _READS else 3 if op in _WRITES else 6 for op in range(256))
"""By opcode: 3 x the operation's index in :data:`OPERATIONS`."""


class Arrival:
    """The commands of one class that one scan took off the ring: when, and how many of them
    completed since the last :meth:`RingStats.record` (with their bytes)."""

    __slots__ = ("cls", "done", "nbytes", "t0")

    def __init__(self, t0: float, cls: int) -> None:
        self.t0 = t0
        self.cls = cls
        self.done = 0
        self.nbytes = 0


class RingStats:
    """Counters of one ring (see the module docstring). Read them from the loop's thread."""

    __slots__ = ("bytes", "latency", "sense_keys", "statuses")

    def __init__(self) -> None:
        self.latency = [Histogram() for _ in range(9)]
        """By class: seconds from ring entry to ring completion; ``count`` counts commands."""
        self.bytes = [0] * 9
        """By class: bytes of the commands that completed GOOD."""
        self.statuses: dict[int, int] = {}
        """SCSI statuses other than GOOD written to the ring."""
        self.sense_keys: dict[int, int] = {}
        """Sense keys of the CHECK CONDITIONs written to the ring."""

    def record(self, arrivals: Iterable[Arrival], now: float) -> None:
        """The completions counted in ``arrivals`` were published at ``now``."""
        latency = self.latency
        nbytes = self.bytes
        for arrival in arrivals:
            cls = arrival.cls
            latency[cls].observe(now - arrival.t0, arrival.done)
            nbytes[cls] += arrival.nbytes
            arrival.done = 0
            arrival.nbytes = 0

    def status(self, status: int, sense: bytes | None) -> None:
        """A completion other than GOOD was written to the ring."""
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if sense:
            # Fixed format (70h/71h) has the key in byte 2, descriptor (72h/73h) in byte 1.
            code = sense[0] & 0x7F
            index = 1 if code in (0x72, 0x73) else 2
            if len(sense) > index:
                key = sense[index] & 0x0F
                self.sense_keys[key] = self.sense_keys.get(key, 0) + 1

    def commands(self, operation: int) -> int:
        """Commands of an operation (index into :data:`OPERATIONS`) completed."""
        return sum(h.count for h in self.latency[3 * operation:3 * operation + 3])

    def operation_latency(self, operation: int) -> Histogram:
        """The latency of an operation, all directions together (a new object)."""
        merged = Histogram(self.latency[0].bounds)
        for h in self.latency[3 * operation:3 * operation + 3]:
            merged.counts = [a + b for a, b in zip(merged.counts, h.counts, strict=True)]
            merged.sum += h.sum
            merged.count += h.count
        return merged

    def direction_bytes(self, direction: int) -> int:
        """Bytes moved in a direction (index into :data:`DIRECTIONS`)."""
        return sum(self.bytes[direction::3])
