"""A fault-injecting TCP proxy for iSCSI links: drops, stalls, bit flips, refused reconnects.

Theory of operation
-------------------
An initiator logs in to the proxy's port; the proxy connects to the real target and forwards
both directions, and on a seeded, reproducible timetable it breaks the link. Three sans-I/O
pieces and a thin asyncio layer:

- :class:`Schedule` says what goes wrong and when: :class:`Fault`\\s at seconds from the start
  of the schedule, drawn from ``random.Random(seed)``. The same seed gives the same faults at
  the same times whatever the initiator, so two initiators can be compared under one timetable.
- :class:`PduFramer` follows one direction of one TCP connection PDU by PDU (RFC 7143 §11.1:
  BHS, AHS, header digest, data segment and padding, data digest). It reads only the 48-byte
  headers and counts its way over the rest, so it costs little per byte. It learns from the
  Login Responses whether digests were negotiated (§13.1: HeaderDigest, DataDigest, used from
  the first PDU after the Login Phase), which it must know to find the next header at all.
- :class:`FaultCore` is the proxy driven by ``now``: it arms the faults that are due, refuses
  connections during a refusal window, stalls and drops connections through the actions it
  returns, hands each framer the flips it may make, and records what it injected. It never
  touches a socket or the clock.
- :class:`FaultProxy` runs a core on asyncio: accept, connect to the target, forward, apply.
  ``python -m tests.support.faultproxy`` runs it as a process of its own controlled by JSON
  lines on stdin/stdout — an initiator measured through the proxy must not share a CPU lock
  (the GIL) with it — and :class:`ProxyProcess` drives that process from a test or benchmark.

The faults (:class:`FaultKind`):

- ``drop``: every open connection is reset (RST both ways), as when a middlebox restarts.
- ``stall``: nothing is forwarded for a while, both ways, also on connections opened meanwhile
  (a black hole: no FIN, no RST); then the held bytes flow on. Long enough, it trips the
  initiator's NOP-Out timeout and its recovery.
- ``refuse``: every open connection is reset, and new ones are reset as soon as they are
  accepted for a while: reconnect attempts fail until the window ends.
- ``flip-*``: one bit of the next eligible PDU is inverted on its way: immediate data of a SCSI
  Command or the payload of a Data-Out (to the target), the payload of a Data-In (to the
  initiator), or a byte of the 48-byte header of the next PDU either way. A flip is made only
  where a CRC32C digest covers it — payload flips need DataDigest, header flips HeaderDigest
  on that connection — so the receiver must notice every one (§7.8) and no wrong byte may
  reach a disk; where the digest is off the flip waits for a connection that has it. A flip
  armed while no connection is up lands on the first eligible PDU after the reconnect.

Because a header is only interpreted whole, the proxy holds back the few bytes of a header
that is split across two reads until the rest arrives (TCP is a byte stream; the receiver
could not act on half a header either).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import enum
import json
import math
import os
import random
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

from initiator.pdu import BHS_LEN, DIGEST_LEN, Opcode, pad_len

# ------------------------------------------------------------------------------------------
# the timetable


class FaultKind(enum.Enum):
    DROP = "drop"
    STALL = "stall"
    REFUSE = "refuse"
    FLIP_IMMEDIATE = "flip-immediate"
    FLIP_DATA_OUT = "flip-data-out"
    FLIP_DATA_IN = "flip-data-in"
    FLIP_HEADER_OUT = "flip-header-out"
    FLIP_HEADER_IN = "flip-header-in"


class Direction(enum.Enum):
    TO_TARGET = "out"
    TO_INITIATOR = "in"


FLIPS: dict[FaultKind, tuple[Direction, str]] = {
    FaultKind.FLIP_IMMEDIATE: (Direction.TO_TARGET, "data"),
    FaultKind.FLIP_DATA_OUT: (Direction.TO_TARGET, "data"),
    FaultKind.FLIP_DATA_IN: (Direction.TO_INITIATOR, "data"),
    FaultKind.FLIP_HEADER_OUT: (Direction.TO_TARGET, "header"),
    FaultKind.FLIP_HEADER_IN: (Direction.TO_INITIATOR, "header"),
}
"""Which direction each flip travels and whether it hits the header or the payload."""

_PAYLOAD_OPCODE = {
    FaultKind.FLIP_IMMEDIATE: Opcode.SCSI_COMMAND,
    FaultKind.FLIP_DATA_OUT: Opcode.DATA_OUT,
    FaultKind.FLIP_DATA_IN: Opcode.DATA_IN,
}

DEFAULT_WEIGHTS: dict[FaultKind, float] = {
    FaultKind.DROP: 3,
    FaultKind.STALL: 2,
    FaultKind.REFUSE: 1,
    FaultKind.FLIP_IMMEDIATE: 2,
    FaultKind.FLIP_DATA_OUT: 1,
    FaultKind.FLIP_DATA_IN: 1,
    FaultKind.FLIP_HEADER_OUT: 1,
    FaultKind.FLIP_HEADER_IN: 1,
}


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault: ``at`` seconds after the schedule starts."""

    at: float
    kind: FaultKind
    duration: float = 0.0
    """How long a stall or a refusal window lasts (0 for the others)."""
    salt: int = 0
    """A 32-bit random number that picks the byte and bit a flip inverts."""

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "kind": self.kind.value, "duration": self.duration,
                "salt": self.salt}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Fault:
        return cls(float(data["at"]), FaultKind(data["kind"]), float(data["duration"]),
                   int(data["salt"]))


@dataclass(frozen=True)
class Schedule:
    """A reproducible timetable of faults (see the module docstring)."""

    faults: tuple[Fault, ...]
    length: float
    seed: int | None = None

    @classmethod
    def generate(
        cls,
        seed: int,
        length: float,
        *,
        interval: float = 3.0,
        weights: Mapping[FaultKind, float] | None = None,
        stall: tuple[float, float] = (1.0, 6.0),
        refuse: tuple[float, float] = (2.0, 8.0),
    ) -> Schedule:
        """Faults over ``length`` seconds, ``interval`` apart on average (each gap uniform in
        [0.5, 1.5] x ``interval``), of kinds drawn with ``weights``; stall and refusal
        durations uniform in the given ranges."""
        if length <= 0 or interval <= 0:
            raise ValueError("the schedule length and the interval must be positive")
        table = dict(DEFAULT_WEIGHTS if weights is None else weights)
        kinds = [k for k, w in table.items() if w > 0]
        if not kinds:
            raise ValueError("no fault kind has a positive weight")
        chances = [table[k] for k in kinds]
        rng = random.Random(seed)
        faults = []
        at = interval * rng.uniform(0.5, 1.5)
        while at < length:
            kind = rng.choices(kinds, chances)[0]
            # Every fault draws the same numbers, whatever its kind, so that changing one
            # weight moves kinds around but keeps the times.
            low, high = stall if kind is FaultKind.STALL else refuse
            duration = rng.uniform(low, high)
            salt = rng.getrandbits(32)
            if kind not in (FaultKind.STALL, FaultKind.REFUSE):
                duration = 0.0
            # Milliseconds: the JSON form (what the proxy process reports) is then exact.
            faults.append(Fault(round(at, 3), kind, round(duration, 3), salt))
            at += interval * rng.uniform(0.5, 1.5)
        return cls(tuple(faults), length, seed)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for fault in self.faults:
            out[fault.kind.value] = out.get(fault.kind.value, 0) + 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "length": self.length,
                "faults": [f.to_json() for f in self.faults]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Schedule:
        return cls(tuple(Fault.from_json(f) for f in data["faults"]), float(data["length"]),
                   data.get("seed"))


def parse_weights(text: str) -> dict[FaultKind, float]:
    """``"drop=3,stall=1,flip-immediate=2"`` -> weights; kinds not named get weight 0."""
    weights = dict.fromkeys(FaultKind, 0.0)
    names = ", ".join(k.value for k in FaultKind)
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            kind = FaultKind(name.strip())
        except ValueError:
            raise ValueError(f"unknown fault kind {name.strip()!r} (kinds: {names})") from None
        try:
            weight = float(value) if sep else 1.0
        except ValueError:
            raise ValueError(f"weight of {kind.value} is not a number: {value!r}") from None
        if weight < 0:
            raise ValueError(f"weight of {kind.value} is negative")
        weights[kind] = weight
    if not any(weights.values()):
        raise ValueError(f"no fault kind has a positive weight in {text!r} (kinds: {names})")
    return weights


# ------------------------------------------------------------------------------------------
# framing one direction of a connection


class LinkState:
    """What the two directions of one connection share: how far the login got."""

    __slots__ = ("data_digest", "ffp", "header_digest", "login_text", "opaque")

    def __init__(self) -> None:
        self.ffp = False            # the final Login Response has passed (§6.3)
        self.header_digest = False  # negotiated for the Full Feature Phase
        self.data_digest = False
        self.login_text = bytearray()
        self.opaque = False         # framing lost: forward as is, never flip

    def finish_login(self) -> None:
        """The final Login Response passed: digests as its text (all responses) says."""
        keys: dict[bytes, bytes] = {}
        for item in bytes(self.login_text).split(b"\0"):
            key, sep, value = item.partition(b"=")
            if sep:
                keys[key] = value
        self.header_digest = keys.get(b"HeaderDigest", b"None").upper() == b"CRC32C"
        self.data_digest = keys.get(b"DataDigest", b"None").upper() == b"CRC32C"
        self.login_text = bytearray()
        self.ffp = True


MAX_LOGIN_TEXT = 1 << 20
"""More login text than this (a target sending garbage) and the proxy stops interpreting."""

Decide = Callable[[Direction, memoryview, bool, bool], "tuple[int, int] | None"]
"""``decide(direction, bhs, header_digest, data_digest)`` for each Full Feature Phase PDU:
``(offset from the start of the PDU, xor mask)`` of a bit to flip, or None."""


class PduFramer:
    """Walks one direction's byte stream PDU by PDU; see the module docstring."""

    __slots__ = ("_collect", "_final_login", "_flip", "_rest_done", "_skip", "decide",
                 "direction", "link", "on_header", "pdus")

    def __init__(self, direction: Direction, link: LinkState, decide: Decide | None = None,
                 on_header: Callable[[memoryview], None] | None = None) -> None:
        self.direction = direction
        self.link = link
        self.decide = decide
        self.on_header = on_header
        self.pdus = 0
        self._skip = 0          # bytes of the current PDU after its BHS still to pass
        self._rest_done = 0     # bytes after the BHS already passed
        self._flip: tuple[int, int] | None = None      # (offset after the BHS, mask)
        self._collect: tuple[int, int] | None = None   # login text span after the BHS
        self._final_login = False

    def feed(self, view: memoryview) -> tuple[int, list[tuple[int, int]]]:
        """Frame ``view``: how many of its bytes may be forwarded now, and the flips
        ``(offset, xor mask)`` to apply to them. Bytes past the count are the start of a
        header: feed them again in front of whatever comes next."""
        n = len(view)
        flips: list[tuple[int, int]] = []
        if self.link.opaque:
            return n, flips
        pos = 0
        while pos < n:
            if self._skip:
                take = min(self._skip, n - pos)
                done = self._rest_done
                if self._flip is not None and done <= self._flip[0] < done + take:
                    flips.append((pos + self._flip[0] - done, self._flip[1]))
                    self._flip = None
                if self._collect is not None:
                    self._gather(view, pos, done, take)
                self._rest_done = done + take
                self._skip -= take
                pos += take
                if not self._skip:
                    self._end_pdu()
                continue
            if n - pos < BHS_LEN:
                return pos, flips
            self._begin_pdu(view[pos:pos + BHS_LEN], pos, flips)
            pos += BHS_LEN
            if not self._skip:
                self._end_pdu()
        return n, flips

    def _begin_pdu(self, bhs: memoryview, pos: int, flips: list[tuple[int, int]]) -> None:
        link = self.link
        opcode = bhs[0] & 0x3F
        dsl = int.from_bytes(bhs[5:8], "big")
        if self.direction is Direction.TO_TARGET:
            login = opcode == Opcode.LOGIN_REQUEST
        else:
            login = not link.ffp
        hd = link.header_digest and not login
        dd = link.data_digest and not login and dsl > 0
        data_at = bhs[4] * 4 + (DIGEST_LEN if hd else 0)
        self._skip = data_at + dsl + pad_len(dsl) + (DIGEST_LEN if dd else 0)
        self._rest_done = 0
        self._flip = None
        self._collect = None
        self._final_login = False
        self.pdus += 1
        if self.on_header is not None:
            self.on_header(bhs)
        if login:
            if self.direction is Direction.TO_INITIATOR and opcode == Opcode.LOGIN_RESPONSE:
                if dsl:
                    self._collect = (data_at, dsl)
                flags = bhs[1]
                # T=1, NSG=FullFeaturePhase and status class 0 (§11.13): the last one.
                self._final_login = bool(flags & 0x80) and flags & 0x03 == 3 and bhs[36] == 0
            return
        if self.decide is None:
            return
        choice = self.decide(self.direction, bhs, hd, dd)
        if choice is None:
            return
        offset, mask = choice
        if offset < BHS_LEN:
            flips.append((pos + offset, mask))
        else:
            self._flip = (offset - BHS_LEN, mask)

    def _gather(self, view: memoryview, pos: int, done: int, take: int) -> None:
        assert self._collect is not None
        start, length = self._collect
        lo, hi = max(start, done), min(start + length, done + take)
        if lo < hi:
            self.link.login_text += view[pos + lo - done:pos + hi - done]
            if len(self.link.login_text) > MAX_LOGIN_TEXT:
                self.link.opaque = True

    def _end_pdu(self) -> None:
        if self._final_login:
            self._final_login = False
            self.link.finish_login()


# ------------------------------------------------------------------------------------------
# what a header says (for flip records and traces)


_U32 = struct.Struct(">I")


def describe_bhs(bhs: Sequence[int] | memoryview | bytes) -> dict[str, Any]:
    """The fields of a BHS that tell one PDU from another: opcode, ITT, the sequence numbers
    (CmdSN/ExpStatSN to the target; StatSN/ExpCmdSN/MaxCmdSN from it), lengths and flags."""
    raw = bytes(bhs[:BHS_LEN])
    opcode = raw[0] & 0x3F
    try:
        name = Opcode(opcode).name.lower().replace("_", "-")
    except ValueError:
        name = f"0x{opcode:02x}"

    def u32(at: int) -> int:
        value: int = _U32.unpack_from(raw, at)[0]
        return value

    out: dict[str, Any] = {"op": name, "imm": bool(raw[0] & 0x40), "flags": raw[1],
                           "dsl": int.from_bytes(raw[5:8], "big"), "itt": u32(16)}
    if opcode < 0x20:
        if opcode == Opcode.DATA_OUT:
            out.update(ttt=u32(20), exp_stat_sn=u32(28), data_sn=u32(36), offset=u32(40))
        else:
            out.update(cmd_sn=u32(24), exp_stat_sn=u32(28))
            if opcode == Opcode.SCSI_COMMAND:
                out.update(edtl=u32(20), cdb0=raw[32])
    else:
        out.update(stat_sn=u32(24), exp_cmd_sn=u32(28), max_cmd_sn=u32(32))
        if opcode in (Opcode.DATA_IN, Opcode.R2T):
            out.update(ttt=u32(20), data_sn=u32(36), offset=u32(40))
        if opcode == Opcode.R2T:
            out.update(ddtl=u32(44))
        if opcode in (Opcode.SCSI_RESPONSE, Opcode.DATA_IN):
            out.update(status=raw[3])
        if opcode == Opcode.REJECT:
            out.update(reason=raw[2])
        if opcode == Opcode.LOGIN_RESPONSE:
            out.update(status_class=raw[36], status_detail=raw[37])
    return out


# ------------------------------------------------------------------------------------------
# what a trace says about how an initiator drives the link


_STATUS_OPS = frozenset({"scsi-response", "task-mgmt-response", "text-response",
                         "logout-response", "reject"})
"""Target PDUs whose StatSN is a status the initiator acknowledges with ExpStatSN (§4.2.2.2);
a Data-In too when its S bit is set, a NOP-In when it answers a ping."""


def _serial(a: int) -> int:
    """A 32-bit serial-number difference as a signed number (RFC 1982)."""
    a &= 0xFFFFFFFF
    return a - (1 << 32) if a >= 1 << 31 else a


@dataclass
class LinkStats:
    """How an initiator drove its connections, read from a proxy trace
    (:func:`summarize_trace`)."""

    connections: int = 0
    login_requests: list[int] = field(default_factory=list)
    """Login Requests per connection that reached the Full Feature Phase."""
    login_windows: list[int] = field(default_factory=list)
    """MaxCmdSN - ExpCmdSN + 1 of each final Login Response (§4.2.2.1: the command window)."""
    first_command_delays: list[float] = field(default_factory=list)
    """Seconds from the final Login Response to the first SCSI Command."""
    commands_before_reply: list[int] = field(default_factory=list)
    """SCSI Commands sent on each connection before the target's first reply."""
    beyond_window: int = 0
    """SCSI Commands sent with a CmdSN past the last MaxCmdSN the target had given."""
    r2t_delays: list[float] = field(default_factory=list)
    """Seconds from each R2T to the first Data-Out answering it."""
    max_writes_waiting: int = 0
    """The most writes at one time whose data the target was still waiting for."""
    exp_stat_sn_lags: list[int] = field(default_factory=list)
    """Per PDU to the target: statuses received but not yet acknowledged in its ExpStatSN."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _LinkTracker:
    __slots__ = ("commanded", "final", "logins", "max_cmd_sn", "r2ts", "replied",
                 "sent_before_reply", "status_next", "writes")

    def __init__(self) -> None:
        self.logins = 0
        self.commanded = False
        self.final: float | None = None        # when the final Login Response passed
        self.max_cmd_sn: int | None = None
        self.status_next: int | None = None    # the ExpStatSN that acknowledges all so far
        self.replied = False
        self.sent_before_reply = 0
        self.writes: dict[int, int] = {}       # ITT -> bytes the target still awaits
        self.r2ts: dict[tuple[int, int], float] = {}


def summarize_trace(records: Iterable[Mapping[str, Any]]) -> LinkStats:
    """Read a trace (the records of :meth:`FaultCore.take_trace`, or the JSON lines of
    ``--trace``, in order) into :class:`LinkStats`."""
    stats = LinkStats()
    links: dict[int, _LinkTracker] = {}
    for r in records:
        conn = r["conn"]
        if "event" in r:
            if r["event"] == "open":
                links[conn] = _LinkTracker()
                stats.connections += 1
            else:
                links.pop(conn, None)
            continue
        link = links.setdefault(conn, _LinkTracker())
        op, t = r["op"], r["t"]
        if r["dir"] == Direction.TO_TARGET.value:
            _outbound(stats, link, op, t, r)
        else:
            _inbound(stats, link, op, t, r)
    return stats


def _outbound(stats: LinkStats, link: _LinkTracker, op: str, t: float,
              r: Mapping[str, Any]) -> None:
    if op == "login-request":
        link.logins += 1
        return
    if link.final is None:
        return
    if link.status_next is not None and "exp_stat_sn" in r:
        stats.exp_stat_sn_lags.append(max(0, _serial(link.status_next - r["exp_stat_sn"])))
    if op == "scsi-command":
        if not link.commanded:
            link.commanded = True
            stats.first_command_delays.append(round(t - link.final, 4))
        if not link.replied:
            link.sent_before_reply += 1
        if not r["imm"] and link.max_cmd_sn is not None \
                and _serial(r["cmd_sn"] - link.max_cmd_sn) > 0:
            stats.beyond_window += 1
        if r["flags"] & 0x20 and r["edtl"] > r["dsl"]:  # W: data still to come
            link.writes[r["itt"]] = r["edtl"] - r["dsl"]
            waiting = sum(1 for left in link.writes.values() if left > 0)
            stats.max_writes_waiting = max(stats.max_writes_waiting, waiting)
    elif op == "data-out":
        if r["itt"] in link.writes:
            link.writes[r["itt"]] -= r["dsl"]
        asked = link.r2ts.pop((r["itt"], r["ttt"]), None)
        if asked is not None:
            stats.r2t_delays.append(round(t - asked, 4))


def _inbound(stats: LinkStats, link: _LinkTracker, op: str, t: float,
             r: Mapping[str, Any]) -> None:
    if op == "login-response":
        if r["flags"] & 0x80 and r["flags"] & 0x03 == 3 and r["status_class"] == 0:
            link.final = t
            link.max_cmd_sn = r["max_cmd_sn"]
            link.status_next = (r["stat_sn"] + 1) & 0xFFFFFFFF
            stats.login_requests.append(link.logins)
            stats.login_windows.append(_serial(r["max_cmd_sn"] - r["exp_cmd_sn"]) + 1)
        return
    if link.final is None:
        return
    if not link.replied:
        link.replied = True
        stats.commands_before_reply.append(link.sent_before_reply)
    if link.max_cmd_sn is None or _serial(r["max_cmd_sn"] - link.max_cmd_sn) > 0:
        link.max_cmd_sn = r["max_cmd_sn"]
    status = op in _STATUS_OPS or (op == "data-in" and r["flags"] & 0x01) \
        or (op == "nop-in" and r["itt"] != 0xFFFFFFFF)
    if status:
        link.status_next = (r["stat_sn"] + 1) & 0xFFFFFFFF
        link.writes.pop(r["itt"], None)
    if op == "r2t":
        link.r2ts[(r["itt"], r["ttt"])] = t


# ------------------------------------------------------------------------------------------
# the proxy's state machine


class ActionKind(enum.Enum):
    DROP = "drop"        # reset these connections now
    PAUSE = "pause"      # stop forwarding (a stall began)
    RESUME = "resume"    # forward again (the stall is over)


@dataclass(frozen=True, slots=True)
class Action:
    kind: ActionKind
    conns: tuple[int, ...] = ()


@dataclass(slots=True)
class Injected:
    """What became of one scheduled fault."""

    fault: Fault
    applied: float | None = None   # seconds after the start when it took effect
    conns: list[int] = field(default_factory=list)
    detail: str = ""
    pdu: dict[str, Any] | None = None
    refused: int = 0               # connections reset during a refusal window

    @property
    def hit(self) -> bool:
        """Whether it touched the link at all (a drop with no connection up did not)."""
        if self.fault.kind in FLIPS:
            return self.applied is not None
        return bool(self.conns) or self.refused > 0

    def to_json(self) -> dict[str, Any]:
        out = {**self.fault.to_json(), "hit": self.hit,
               "applied": None if self.applied is None else round(self.applied, 3),
               "conns": self.conns, "detail": self.detail}
        if self.pdu is not None:
            out["pdu"] = self.pdu
        if self.refused:
            out["refused"] = self.refused
        return out


class _Conn:
    __slots__ = ("bytes", "carry", "framers", "id", "link", "opened")

    def __init__(self, conn_id: int, now: float, core: FaultCore) -> None:
        self.id = conn_id
        self.opened = now
        self.link = LinkState()
        self.framers = {
            d: PduFramer(d, self.link, partial(core._decide, conn_id),
                         partial(core._on_header, conn_id, d) if core.tracing else None)
            for d in Direction
        }
        self.carry: dict[Direction, bytes] = dict.fromkeys(Direction, b"")
        self.bytes = dict.fromkeys(Direction, 0)


@dataclass(slots=True)
class _Window:
    """A stall or a refusal: until when, and the fault that set that end."""

    until: float | None = None
    record: Injected | None = None

    def extend(self, until: float, record: Injected) -> None:
        if self.until is None or until > self.until:
            self.until = until
            self.record = record

    def close_if_over(self, now: float) -> bool:
        """End the window if it is over; whether it just ended."""
        if self.until is None or now < self.until:
            return False
        self.until = None
        self.record = None
        return True


DEFAULT_FLIP_WAIT = 1.0
"""Seconds a due flip waits for an eligible PDU before it is given up (see FaultCore)."""


class FaultCore:
    """The proxy as a state machine driven by ``now`` (see the module docstring).

    A flip that comes due lands on the next eligible PDU, if one passes within ``flip_wait``
    seconds; otherwise it is given up, like a drop while no connection is up: a bit error on an
    idle link (an initiator waiting out Time2Wait, or logging in) hurts nothing. With
    ``flip_wait=math.inf`` a flip waits for its PDU however long: every flip due while the
    link is down then lands on the first eligible PDU after the reconnect.
    """

    def __init__(self, schedule: Schedule, *, trace: bool = False,
                 flip_wait: float = DEFAULT_FLIP_WAIT) -> None:
        self.schedule = schedule
        self.flip_wait = flip_wait
        self.started: float | None = None
        self._next = 0                                     # index of the next fault to arm
        self._records = [Injected(f) for f in schedule.faults]
        self._armed: list[Injected] = []                   # flips waiting for their PDU
        self._conns: dict[int, _Conn] = {}
        self._serial = 0
        self._stall = _Window()
        self._refuse = _Window()
        self._now = 0.0
        self.accepted = 0
        self.refused = 0
        self.bytes = dict.fromkeys(Direction, 0)
        self.window_bytes = dict.fromkeys(Direction, 0)   # while the schedule ran
        self.skipped_no_digest = 0
        self.tracing = trace
        self._trace: list[dict[str, Any]] = []

    # -- time ---------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """The schedule's clock starts: fault ``at`` seconds means ``now + at``."""
        if self.started is not None:
            raise RuntimeError("the schedule has already started")
        self.started = now

    @property
    def stalled(self) -> bool:
        return self._stall.until is not None

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` should run next (None: nothing pending)."""
        times = [t for t in (self._stall.until, self._refuse.until) if t is not None]
        if self.started is not None and self._next < len(self._records):
            times.append(self.started + self._records[self._next].fault.at)
        return min(times) if times else None

    def handle_timer(self, now: float) -> list[Action]:
        """End stalls and refusal windows that are over, apply the faults that are due."""
        self._now = now
        actions: list[Action] = []
        if self._stall.close_if_over(now):
            actions.append(Action(ActionKind.RESUME))
        self._refuse.close_if_over(now)
        if self.started is None:
            return actions
        while self._next < len(self._records):
            record = self._records[self._next]
            if self.started + record.fault.at > now:
                break
            self._next += 1
            actions.extend(self._apply(record, now))
        return actions

    def _apply(self, record: Injected, now: float) -> list[Action]:
        fault = record.fault
        since = now - self.started if self.started is not None else 0.0
        open_conns = list(self._conns)
        if fault.kind in FLIPS:
            self._armed.append(record)
            return []
        record.applied = since
        record.conns = open_conns
        if fault.kind is FaultKind.STALL:
            self._stall.extend(now + fault.duration, record)
            record.detail = f"{fault.duration:.1f} s without forwarding"
            return [Action(ActionKind.PAUSE)]
        if fault.kind is FaultKind.REFUSE:
            self._refuse.extend(now + fault.duration, record)
            record.detail = f"reset, reconnects refused for {fault.duration:.1f} s"
        else:
            record.detail = "reset"
        for conn_id in open_conns:
            self.close(conn_id, now)
        return [Action(ActionKind.DROP, tuple(open_conns))] if open_conns else []

    def _in_window(self, now: float) -> bool:
        return self.started is not None and now < self.started + self.schedule.length

    # -- connections --------------------------------------------------------------------

    def open(self, now: float) -> int | None:
        """A connection was accepted: its id, or None when it must be reset (refusal)."""
        self._now = now
        if self._refuse.until is not None and now < self._refuse.until:
            self.refused += 1
            if self._refuse.record is not None:
                self._refuse.record.refused += 1
            return None
        self._serial += 1
        self.accepted += 1
        conn = _Conn(self._serial, now, self)
        self._conns[conn.id] = conn
        if self._stall.record is not None and conn.id not in self._stall.record.conns:
            self._stall.record.conns.append(conn.id)
        if self.tracing:
            self._trace.append({"t": self._time(now), "conn": conn.id, "event": "open"})
        return conn.id

    def close(self, conn_id: int, now: float) -> None:
        """The connection is gone (either end closed it, or the proxy reset it)."""
        if self._conns.pop(conn_id, None) is None:
            return
        if self.tracing:
            self._trace.append({"t": self._time(now), "conn": conn_id, "event": "close"})

    def forward(self, conn_id: int, direction: Direction, data: bytes, now: float
                ) -> bytes | bytearray | memoryview:
        """Bytes received on ``conn_id`` going ``direction``: what to send on now (flipped
        where a fault says so; a header split across reads is held back until it is whole)."""
        self._now = now
        conn = self._conns.get(conn_id)
        if conn is None:
            return b""
        carry = conn.carry[direction]
        if carry:
            data = carry + data
        n = len(data)
        conn.bytes[direction] += n - len(carry)
        self.bytes[direction] += n - len(carry)
        if self._in_window(now):
            self.window_bytes[direction] += n - len(carry)
        ready, flips = conn.framers[direction].feed(memoryview(data))
        conn.carry[direction] = data[ready:] if ready < n else b""
        if flips:
            out = bytearray(data[:ready])
            for offset, mask in flips:
                out[offset] ^= mask
            return out
        return data if ready == n else memoryview(data)[:ready]

    # -- flips --------------------------------------------------------------------------

    def _expire(self) -> None:
        """Give up the flips that found no eligible PDU in time."""
        if self.started is None or self.flip_wait == math.inf:
            return
        for record in list(self._armed):
            if self._now > self.started + record.fault.at + self.flip_wait:
                self._armed.remove(record)
                record.detail = f"no eligible PDU within {self.flip_wait:g} s"

    def _decide(self, conn_id: int, direction: Direction, bhs: memoryview, hd: bool, dd: bool
                ) -> tuple[int, int] | None:
        if not self._armed:
            return None
        self._expire()
        opcode = bhs[0] & 0x3F
        dsl = int.from_bytes(bhs[5:8], "big")
        for record in self._armed:
            kind = record.fault.kind
            way, where = FLIPS[kind]
            if way is not direction:
                continue
            if where == "header":
                if not hd:
                    self.skipped_no_digest += 1
                    continue
                byte = record.fault.salt % BHS_LEN
                offset = byte
            else:
                if opcode != _PAYLOAD_OPCODE[kind] or not dsl:
                    continue
                if not dd:
                    self.skipped_no_digest += 1
                    continue
                byte = record.fault.salt % dsl
                offset = BHS_LEN + bhs[4] * 4 + (DIGEST_LEN if hd else 0) + byte
            bit = (record.fault.salt >> 24) & 7
            self._armed.remove(record)
            record.applied = self._time(self._now)
            record.conns = [conn_id]
            pdu = describe_bhs(bhs)
            record.pdu = pdu
            record.detail = (f"{where} byte {byte} bit {bit} of {pdu['op']} itt 0x{pdu['itt']:x}"
                             + (f" cmd_sn {pdu['cmd_sn']}" if "cmd_sn" in pdu else "")
                             + (f" stat_sn {pdu['stat_sn']}" if "stat_sn" in pdu else ""))
            return offset, 1 << bit
        return None

    # -- results ------------------------------------------------------------------------

    def _on_header(self, conn_id: int, direction: Direction, bhs: memoryview) -> None:
        self._trace.append({"t": self._time(self._now), "conn": conn_id,
                            "dir": direction.value, **describe_bhs(bhs)})

    @property
    def trace_pending(self) -> int:
        return len(self._trace)

    def take_trace(self) -> list[dict[str, Any]]:
        """Trace records (headers, connection events) gathered since the last call."""
        out, self._trace = self._trace, []
        return out

    def _time(self, now: float) -> float:
        return round(now - self.started, 4) if self.started is not None else 0.0

    def report(self, now: float) -> dict[str, Any]:
        """What was scheduled, what hit, what it hit; connections and bytes."""
        self._now = now
        self._expire()
        counts: dict[str, dict[str, int]] = {}
        for record in self._records:
            entry = counts.setdefault(record.fault.kind.value,
                                      {"scheduled": 0, "due": 0, "hit": 0})
            entry["scheduled"] += 1
            if self.started is not None and self.started + record.fault.at <= now:
                entry["due"] += 1
            entry["hit"] += record.hit
        return {
            "schedule": {"seed": self.schedule.seed, "length": self.schedule.length,
                         "faults": len(self.schedule.faults), "flip_wait": self.flip_wait},
            "started": self.started is not None,
            "start_clock": self.started,   # the glue's clock (asyncio: CLOCK_MONOTONIC)
            "elapsed": round(now - self.started, 3) if self.started is not None else 0.0,
            "counts": counts,
            "hit": sum(r.hit for r in self._records),
            "due": self._next,
            "faults": [r.to_json() for r in self._records[:self._next]],
            "flips_waiting": len(self._armed),
            "skipped_no_digest": self.skipped_no_digest,
            "connections": {"accepted": self.accepted, "refused": self.refused,
                            "open": len(self._conns)},
            "bytes": {d.value: n for d, n in self.bytes.items()},
            "window_bytes": {d.value: n for d, n in self.window_bytes.items()},
        }


# ------------------------------------------------------------------------------------------
# asyncio glue


class _Side(asyncio.Protocol):
    """One socket of a pipe; ``direction`` is where the bytes it receives go."""

    def __init__(self, pipe: _Pipe, direction: Direction) -> None:
        self.pipe = pipe
        self.direction = direction
        self.transport: asyncio.Transport | None = None
        self.flow_paused = False     # the other side's send buffer is full

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # Before any byte arrives: the client waits until the target's side is connected.
        self.pipe.update_reading()

    def data_received(self, data: bytes) -> None:
        self.pipe.received(self, data)

    def eof_received(self) -> bool | None:
        self.pipe.shut()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.pipe.shut()

    def pause_writing(self) -> None:
        self.pipe.other(self).flow_paused = True
        self.pipe.update_reading()

    def resume_writing(self) -> None:
        self.pipe.other(self).flow_paused = False
        self.pipe.update_reading()


class _Pipe:
    def __init__(self, proxy: FaultProxy, conn_id: int) -> None:
        self.proxy = proxy
        self.id = conn_id
        self.client = _Side(self, Direction.TO_TARGET)
        self.server = _Side(self, Direction.TO_INITIATOR)
        self.ready = False
        self.closed = False

    def other(self, side: _Side) -> _Side:
        return self.server if side is self.client else self.client

    def received(self, side: _Side, data: bytes) -> None:
        if self.closed:
            return
        proxy = self.proxy
        out = proxy.core.forward(self.id, side.direction, data, proxy.loop.time())
        dest = self.other(side).transport
        if out and dest is not None and not dest.is_closing():
            dest.write(out)
        proxy.flush_trace()

    def update_reading(self) -> None:
        stalled = self.proxy.core.stalled
        for side in (self.client, self.server):
            transport = side.transport
            if transport is None or transport.is_closing():
                continue
            if self.ready and not stalled and not side.flow_paused:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def shut(self) -> None:
        """One end closed or failed: close the other end too (iSCSI does not half-close)."""
        self._end(lambda transport: transport.close())

    def reset(self) -> None:
        """Reset both ends (RST, not FIN), as a failing link or middlebox does."""
        self._end(_reset)

    def _end(self, how: Callable[[asyncio.Transport], None]) -> None:
        if self.closed:
            return
        self.closed = True
        for side in (self.client, self.server):
            if side.transport is not None:
                how(side.transport)
        self.proxy.forget(self)


def _reset(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if isinstance(transport, asyncio.WriteTransport):
        transport.abort()
    else:
        transport.close()


class FaultProxy:
    """A :class:`FaultCore` on asyncio: listens, connects each client to ``target``."""

    CONNECT_TIMEOUT = 10.0

    def __init__(self, core: FaultCore, target: tuple[str, int], *,
                 host: str = "127.0.0.1", port: int = 0,
                 trace: Callable[[list[dict[str, Any]]], None] | None = None) -> None:
        self.core = core
        self.target = target
        self.host = host
        self.port = port
        self.trace = trace
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._pipes: dict[int, _Pipe] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the proxy has not been started")
        return self._loop

    async def start(self) -> int:
        """Listen; returns the port."""
        self._loop = asyncio.get_running_loop()
        self._server = await self.loop.create_server(self._accepted, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def begin(self) -> None:
        """Start the schedule now."""
        self.core.start(self.loop.time())
        self._arm()

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for pipe in list(self._pipes.values()):
            pipe.reset()
        for task in list(self._tasks):
            task.cancel()
        self.flush_trace(force=True)

    # -- connections --------------------------------------------------------------------

    def _accepted(self) -> asyncio.Protocol:
        conn_id = self.core.open(self.loop.time())
        if conn_id is None:
            return _Refused()
        pipe = _Pipe(self, conn_id)
        self._pipes[conn_id] = pipe
        task = self.loop.create_task(self._connect(pipe))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return pipe.client

    async def _connect(self, pipe: _Pipe) -> None:
        try:
            await asyncio.wait_for(self.loop.create_connection(
                lambda: pipe.server, *self.target), self.CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            print(f"faultproxy: cannot connect to {self.target[0]}:{self.target[1]}: {exc}",
                  file=sys.stderr, flush=True)
            pipe.reset()
            return
        if pipe.closed:
            if pipe.server.transport is not None:
                _reset(pipe.server.transport)
            return
        pipe.ready = True
        pipe.update_reading()

    def forget(self, pipe: _Pipe) -> None:
        self._pipes.pop(pipe.id, None)
        self.core.close(pipe.id, self.loop.time())

    # -- faults -------------------------------------------------------------------------

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = self.core.get_timer()
        if when is not None:
            self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        for action in self.core.handle_timer(self.loop.time()):
            if action.kind is ActionKind.DROP:
                for conn_id in action.conns:
                    pipe = self._pipes.get(conn_id)
                    if pipe is not None:
                        pipe.reset()
            else:
                for pipe in list(self._pipes.values()):
                    pipe.update_reading()
        self.flush_trace()
        self._arm()

    def flush_trace(self, *, force: bool = False) -> None:
        if self.trace is not None and (force or self.core.trace_pending >= 256):
            records = self.core.take_trace()
            if records:
                self.trace(records)


class _Refused(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _reset(transport)


# ------------------------------------------------------------------------------------------
# as a process of its own


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _weights(text: str) -> dict[FaultKind, float]:
    try:
        return parse_weights(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.faultproxy",
        description="A fault-injecting proxy for iSCSI. Prints one JSON line when listening "
        "(port and schedule), then answers each line on stdin: 'start' starts the schedule, "
        "'report' prints what happened so far, 'stop' (or end of input) prints the report "
        "and exits.")
    parser.add_argument("--target", type=_address, required=True, help="HOST:PORT to forward to")
    parser.add_argument("--listen", type=_address, default=("127.0.0.1", 0),
                        help="HOST:PORT to listen on (default 127.0.0.1, a free port)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--length", type=float, default=60.0, help="schedule length, seconds")
    parser.add_argument("--interval", type=float, default=3.0,
                        help="mean seconds between faults")
    parser.add_argument("--weights", type=_weights, default=None,
                        help="fault kinds and weights, e.g. drop=3,stall=1,flip-immediate=2")
    parser.add_argument("--flip-wait", type=float, default=DEFAULT_FLIP_WAIT,
                        help="seconds a due flip waits for an eligible PDU (default "
                        f"{DEFAULT_FLIP_WAIT:g}; inf: however long)")
    parser.add_argument("--trace", type=Path, default=None,
                        help="write every PDU header and connection event as JSON lines here")
    return parser


async def _serve(args: argparse.Namespace) -> int:
    schedule = Schedule.generate(args.seed, args.length, interval=args.interval,
                                 weights=args.weights)
    if not args.flip_wait > 0:
        print("faultproxy: --flip-wait must be positive (inf: wait however long)",
              file=sys.stderr)
        return 2
    core = FaultCore(schedule, trace=args.trace is not None, flip_wait=args.flip_wait)
    trace_file: IO[str] | None = None
    if args.trace is not None:
        trace_file = args.trace.open("w")

    def write_trace(records: list[dict[str, Any]]) -> None:
        assert trace_file is not None
        trace_file.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))

    proxy = FaultProxy(core, args.target, host=args.listen[0], port=args.listen[1],
                       trace=write_trace if trace_file is not None else None)
    loop = asyncio.get_running_loop()
    try:
        port = await proxy.start()
    except OSError as exc:
        print(f"faultproxy: cannot listen on {args.listen[0]}:{args.listen[1]}: {exc}",
              file=sys.stderr)
        return 1
    _emit({"listening": [args.listen[0], port], "schedule": schedule.to_json()})
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while True:
            line = (await reader.readline()).decode(errors="replace").strip()
            if line == "start":
                if core.started is None:
                    proxy.begin()
                _emit({"started": True})
            elif line == "report":
                _emit(core.report(loop.time()))
            elif line in ("stop", ""):
                break
            else:
                _emit({"error": f"unknown command {line[:40]!r}: start, report, stop"})
    finally:
        await proxy.close()
        if trace_file is not None:
            trace_file.close()
    _emit(core.report(loop.time()))
    return 0


def _emit(obj: Mapping[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(_serve(args))
    except KeyboardInterrupt:
        return 130


REPO = Path(__file__).resolve().parents[2]


class ProxyError(RuntimeError):
    """The proxy process failed or did not answer in time."""


class ProxyProcess:
    """``python -m tests.support.faultproxy`` as a child process, driven line by line.

        with ProxyProcess(("127.0.0.1", 3260), seed=7, length=60) as proxy:
            ...connect an initiator to 127.0.0.1:proxy.port...
            proxy.start()           # the schedule's clock starts now
            ...
            report = proxy.report()
    """

    def __init__(self, target: tuple[str, int], *, seed: int = 1, length: float = 60.0,
                 interval: float = 3.0, weights: Mapping[FaultKind, float] | None = None,
                 flip_wait: float = DEFAULT_FLIP_WAIT, trace: Path | None = None,
                 python: str | None = None, timeout: float = 30.0) -> None:
        argv = [python or sys.executable, "-m", "tests.support.faultproxy",
                "--target", f"{target[0]}:{target[1]}", "--seed", str(seed),
                "--length", str(length), "--interval", str(interval),
                "--flip-wait", str(flip_wait)]
        if weights is not None:
            argv += ["--weights", ",".join(f"{k.value}={w:g}" for k, w in weights.items())]
        if trace is not None:
            argv += ["--trace", str(trace)]
        self.argv = argv
        self.timeout = timeout
        self.port = 0
        self.schedule: Schedule | None = None
        self.final: dict[str, Any] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._buffer = b""

    def __enter__(self) -> ProxyProcess:
        self._proc = subprocess.Popen(self.argv, cwd=REPO, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, start_new_session=True)
        try:
            hello = self._read()
            self.port = int(hello["listening"][1])
            self.schedule = Schedule.from_json(hello["schedule"])
        except BaseException:
            self._kill()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._ask("start")

    def report(self) -> dict[str, Any]:
        return self._ask("report")

    def stop(self) -> dict[str, Any] | None:
        """Stop the proxy (resetting its connections); its final report."""
        proc = self._proc
        if proc is None:
            return self.final
        try:
            self.final = self._ask("stop")
            proc.wait(self.timeout)
        except (ProxyError, subprocess.TimeoutExpired, OSError):
            self._kill()
            raise
        finally:
            self._proc = None
        return self.final

    def _ask(self, command: str) -> dict[str, Any]:
        proc = self._proc
        if proc is None or proc.stdin is None:
            raise ProxyError("the fault proxy is not running")
        try:
            proc.stdin.write(command.encode() + b"\n")
            proc.stdin.flush()
        except OSError as exc:
            raise ProxyError(f"the fault proxy exited ({proc.poll()}): {exc}") from None
        return self._read()

    def _read(self) -> dict[str, Any]:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProxyError(f"the fault proxy did not answer within {self.timeout:g} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise ProxyError(f"the fault proxy exited with status {proc.wait()}")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise ProxyError(f"the fault proxy: {answer['error']}")
        return answer

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    sys.exit(main())
