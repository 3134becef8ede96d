"""Full Feature Phase of one iSCSI connection: commands, data, window, NOP, TMF, logout.

Theory of operation
-------------------
:class:`ConnectionCore` is the sans-I/O heart of the initiator after login (RFC 7143 §4.2, §7).
It owns the task table, the command window and the outbound queue; it never touches a socket
or the clock. The transport feeds it:

- :meth:`ConnectionCore.receive_pdu` with every PDU read from the connection (and, through the
  :class:`~initiator.reader.DataSink` interface, tells the reader where Data-In payloads go, so
  they are received straight into the command's buffers);
- :meth:`ConnectionCore.handle_timer` when :meth:`ConnectionCore.get_timer` says so (``now`` is
  always passed in);

and drains :meth:`ConnectionCore.send_buffers` / :meth:`ConnectionCore.sent` into ``sendmsg``.
Outbound PDUs are :class:`_Frame` objects whose buffers include the caller's own ``memoryview``s
of Data-Out: nothing is copied on the way out.

Commands complete through the callback given to :meth:`ConnectionCore.submit`, called exactly
once, after every reference the core holds to the command's buffers has been dropped. Other
happenings the transport must act on (the target asks us to log out, will drop the connection,
wants renegotiation, reported a SCSI asynchronous event) become :class:`Event`\\s.

Sequence numbers (§4.2.2): non-immediate commands take consecutive CmdSNs and are sent only
while CmdSN is inside [ExpCmdSN, MaxCmdSN]; the rest wait in order. Immediate PDUs (task
management, NOP-Out pings, logout) carry the current CmdSN without consuming it. Every PDU we
send carries ExpStatSN = last StatSN received + 1, which acknowledges status. An ExpCmdSN
beyond the next CmdSN we assign (the target counting commands we never sent, which it would
then drop as duplicates) is the target's protocol error, as it is in the final Login Response
(:mod:`initiator.login`).

Writes (§4.2.4 "Data Transfer", §13.13-13.14): up to FirstBurstLength bytes go unsolicited —
as immediate data when ImmediateData=Yes, then as Data-Out PDUs with TTT 0xffffffff when
InitialR2T=No — and the rest as answers to R2Ts, each R2T answered at once, so any number of
outstanding R2Ts (MaxOutstandingR2T > 1) is served. No PDU carries more data than the target's
MaxRecvDataSegmentLength. The answers to R2Ts go ahead of commands still waiting in the send
queue (as libiscsi's ``iscsi_data_xmit`` does): the target is holding a buffer for that data,
and behind a burst of new commands' immediate data it would wait for all of them first. A
task's own PDUs never overtake each other.

Nothing the target sends is trusted to be sane. Data-In must arrive in order (with the
"in order" keys Yes), so that ``data_in_length`` is the count of bytes really placed; with
either key No each command's received ranges are kept exactly (:class:`_Ranges`): a range
received twice is the target's protocol error, and a command whose data has a hole completes
with a :class:`~initiator.errors.TransferError`, so ``data_in_length`` still counts bytes the
target placed contiguously from 0. The DataSNs are kept the same way (the PDUs may come in any
order, but they are still numbered 0, 1, 2... as sent, with a bidirectional command's R2Ts in
the same sequence, §11.7.4): a DataSN received twice, or
a status while DataSNs 0..N-1 (N - 1 the highest received) are not all there (a PDU lost),
is the target's protocol error, as a DataSN out of order is with the keys Yes; each R2T
is held to the rules of §11.8 (R2TSN, range, MaxBurstLength, no range asked twice, no more than
MaxOutstandingR2T outstanding) before it is served; answers to the target's pings that it does
not read are bounded; a flood of Async Messages asks the transport to act once. A breach is a
:class:`~initiator.errors.RemoteProtocolError`: the connection is dropped.

Bounds (see "Timers" below): liveness is progress on what we asked, judged by the keepalive
ping; a command outstanding for ``command_timeout`` is ended by :meth:`ConnectionCore.abort`'s
escalation (ABORT TASK, LOGICAL UNIT RESET, then the connection is given up), or at once by
giving up the connection when the target has stopped sending in the middle of a PDU, so that
no answer to an abort can come; requests carry their own deadline.

Only ErrorRecoveryLevel 0 is implemented (like open-iscsi and libiscsi): any protocol error,
digest error or lost connection ends the connection, and the transport reinstates the session
and re-issues the commands that did not complete (see :meth:`ConnectionCore.take_unfinished`;
when and for how long is :mod:`initiator.recovery`'s policy).
"""

from __future__ import annotations

import enum
import logging
import math
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from initiator import pdu as P
from initiator import serial
from initiator.command import Buffers, CommandResult, CompletionCallback, ScsiStatus
from initiator.errors import (
    CommandError,
    CommandTimeout,
    ConnectionFailed,
    ISCSIError,
    LocalProtocolError,
    PDUFormatError,
    RemoteProtocolError,
    TaskAborted,
    TransferError,
)
from initiator.recovery import progress_log as recovery_log
from initiator.stats import SessionStats

log = logging.getLogger(__name__)

Buffer = P.Buffer


@dataclass(frozen=True, slots=True)
class TransferParameters:
    """The negotiated values the Full Feature Phase depends on (a subset of the session's)."""

    header_digest: bool = False
    data_digest: bool = False
    max_recv_data_segment_length: int = 262144
    """What we declared: the most the target may send in one PDU."""
    max_xmit_data_segment_length: int = 8192
    """What the target declared: the most we may send in one PDU."""
    first_burst_length: int = 65536
    max_burst_length: int = 262144
    immediate_data: bool = True
    initial_r2t: bool = True
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True


class TaskState(enum.Enum):
    QUEUED = 1   # waiting for the command window
    ACTIVE = 2   # sent; waiting for data and status
    DONE = 3


# Module-level aliases for the per-command paths: a global load instead of a global load plus
# an attribute lookup on the enum class, several times per command.
_QUEUED = TaskState.QUEUED
_ACTIVE = TaskState.ACTIVE
_DONE = TaskState.DONE
_RESERVED_TAG = P.RESERVED_TAG
_MASK = 0xFFFFFFFF
MAX_UNSENT_PING_ANSWERS = 128
"""Answers to the target's NOP-In pings that may wait in the send queue (see _on_nop_in)."""
MAX_TEXT_EXCHANGE = 16 << 20
"""The most text one Text Request may bring back (a SendTargets answer of many targets)."""
MAX_TEXT_RESPONSES = MAX_TEXT_EXCHANGE // 512
"""The most Text Responses one exchange may take: the text bound in pieces of the smallest
MaxRecvDataSegmentLength (§13.12). Without it a target that sends empty pieces with F=0
forever keeps the exchange going forever when there is no command deadline."""
_HALF = 0x80000000
_pack_bhs = P.SCSI_COMMAND_BHS.pack
_OP_SCSI_COMMAND = P.SCSI_COMMAND_OPCODE
_pack_data_out = P.DATA_OUT_BHS.pack
_OP_DATA_OUT = P.DATA_OUT_OPCODE
_new_tuple = tuple.__new__
_NEVER = math.inf
_F, _O, _U, _S = 0x80, 0x04, 0x02, 0x01  # Data-In flags (byte 1, RFC 7143 §11.7.1)
_CHECKS = 8
"""Command deadline checks per command_timeout (see ConnectionCore.handle_timer)."""
MAX_DATA_IN_RANGES = 1024
"""The most separate ranges one command's Data-In, or the bytes its R2Ts asked for, may be in
at once when out of order is allowed (see _Ranges): contiguous data is one range, however many
PDUs brought it."""
# The PDUs that answer something of ours (liveness); a NOP-In does when its ITT is not 0xffffffff.
_ANSWERS = frozenset({P.DataIn, P.ScsiResponse, P.R2T, P.TaskMgmtResponse, P.TextResponse,
                      P.LogoutResponse})
_RESENDABLE = frozenset({
    P.RejectReason.DATA_DIGEST_ERROR, P.RejectReason.IMMEDIATE_COMMAND_REJECT,
    P.RejectReason.LONG_OPERATION_REJECT, P.RejectReason.WAITING_FOR_LOGOUT})
"""Reject reasons after which "the original PDU can be re-sent" (RFC 7143 §11.17.1)."""
_REQUEST_NAMES = {
    P.Opcode.NOP_OUT: "NOP-Out ping", P.Opcode.TEXT_REQUEST: "Text Request",
    P.Opcode.LOGOUT_REQUEST: "Logout Request",
    P.Opcode.TASK_MGMT_REQUEST: "task management request",
}


class Task:
    """One SCSI command in the session. Its buffers are the caller's; dropped at completion."""

    __slots__ = (
        "attr", "cdb", "cmd_sn", "data_in", "data_out", "data_sn", "immediate_sent", "in_len",
        "itt", "lost_at", "lun", "lun_wire", "on_done", "out_len", "r2t", "ranges",
        "received", "reissues", "sns", "state", "unsent_frames", "unsolicited",
    )
    lost_at: float
    """When the command was first lost with a connection (set by the transport then: never
    on the per-command path)."""

    def __init__(
        self,
        lun: int,
        cdb: bytes,
        data_out: Buffers | None,
        data_in: Buffers | None,
        on_done: CompletionCallback,
        attr: P.TaskAttribute = P.TaskAttribute.SIMPLE,
    ) -> None:
        # One Task is built per command: the common single-view buffer of bytes is checked
        # and measured inline here instead of through _byte_views()/_total().
        self.lun = lun
        self.lun_wire = lun << 48 if 0 <= lun <= 0xFFFF else P.lun_to_wire(lun)
        self.cdb = cdb
        self.data_out: Buffers | None
        self.data_in: Buffers | None
        if not data_out:
            self.data_out = None
            self.out_len = 0
        elif len(data_out) == 1 and (view := data_out[0]).format == "B" and view.ndim == 1:
            self.data_out = data_out
            self.out_len = len(view)
        else:
            self.data_out = views = _byte_views(data_out)
            self.out_len = _total(views)
        if not data_in:
            self.data_in = None
            self.in_len = 0
        elif len(data_in) == 1 and (view := data_in[0]).format == "B" and view.ndim == 1:
            self.data_in = data_in
            self.in_len = len(view)
        else:
            self.data_in = views = _byte_views(data_in)
            self.in_len = _total(views)
        self.on_done: CompletionCallback | None = on_done
        self.attr = attr
        self.itt = _RESERVED_TAG
        self.cmd_sn = 0
        self.state = _QUEUED
        self.received = 0          # Data-In bytes placed so far
        self.ranges: _Ranges | None = None  # where, when they may come out of order
        self.sns: _Ranges | None = None     # their DataSNs (and bidi R2TSNs), likewise
        self.data_sn = 0           # next expected Data-In DataSN / R2TSN (one sequence, §11.8)
        self.unsent_frames = 0     # frames in the send queue that reference our buffers
        self.unsolicited = 0       # bytes sent without an R2T
        self.immediate_sent = 0
        self.reissues = 0
        self.r2t: _R2TState | None = None  # what the target asked for so far (writes)

    def reset_for_reissue(self) -> None:
        """Forget per-connection progress so the command can be sent again (ERL 0)."""
        self.itt = P.RESERVED_TAG
        self.state = TaskState.QUEUED
        self.received = 0
        self.ranges = None
        self.sns = None
        self.data_sn = 0
        self.unsent_frames = 0
        self.unsolicited = 0
        self.immediate_sent = 0
        self.r2t = None
        self.reissues += 1

    def __repr__(self) -> str:
        return (f"<Task itt=0x{self.itt:08x} lun={self.lun} op=0x{self.cdb[0]:02x} "
                f"out={self.out_len} in={self.in_len} {self.state.name}>")


class _Ranges:
    """The byte ranges of one command's Data-In received so far (or, one number wide, their
    DataSNs), when DataPDUInOrder or
    DataSequenceInOrder is No and the target may send them in any order (§13.18, §13.19):
    sorted, disjoint and not touching, so contiguous data is one range however many PDUs
    brought it. A target may send no byte twice (the PDUs of a command partition its data,
    §11.7.5: a repeat is only ever a retransmission asked for by SNACK, which ERL 0 never
    asks), so the count of bytes received is the sum of the ranges only because an overlap
    is refused. A hostile target could scatter 1-byte PDUs to make ranges without end: past
    :data:`MAX_DATA_IN_RANGES` at once the connection is dropped, which keeps each insertion
    a short list operation."""

    __slots__ = ("bounds",)

    def __init__(self) -> None:
        self.bounds: list[int] = []
        """start0, end0, start1, end1, ...: ascending."""

    def overlap(self, start: int, end: int) -> tuple[int, int] | None:
        """The first range received that [start, end) (not empty) overlaps, or None."""
        bounds = self.bounds
        i = bisect_right(bounds, start)
        if i & 1:  # start falls in [bounds[i-1], bounds[i])
            return bounds[i - 1], bounds[i]
        if i < len(bounds) and bounds[i] < end:
            return bounds[i], bounds[i + 1]
        return None

    def add(self, start: int, end: int) -> int:
        """Note [start, end) (not empty, no overlap); returns the number of ranges."""
        bounds = self.bounds
        i = bisect_right(bounds, start)
        left = i > 0 and bounds[i - 1] == start
        right = i < len(bounds) and bounds[i] == end
        if left and right:
            del bounds[i - 1 : i + 1]
        elif left:
            bounds[i - 1] = end
        elif right:
            bounds[i] = start
        else:
            bounds[i:i] = (start, end)
        return len(bounds) >> 1

    def first_hole(self, end: int) -> tuple[int, int] | None:
        """The first range of [0, end) not received, or None when all of it was."""
        bounds = self.bounds
        if not bounds or bounds[0]:
            return 0, bounds[0] if bounds else end
        if bounds[1] < end:
            return bounds[1], bounds[2] if len(bounds) > 2 else end
        return None


class _Unsent:
    """Counts frames of one kind still in the send queue, as a Task counts its own: the
    queue decrements ``unsent_frames`` of whatever a frame's ``task`` is when it goes out."""

    __slots__ = ("unsent_frames",)

    def __init__(self) -> None:
        self.unsent_frames = 0


class _Frame:
    """One PDU waiting in the send queue: its buffers, and the task whose buffers it holds."""

    __slots__ = ("ahead", "bufs", "handed", "started", "task")

    def __init__(self, bufs: list[Buffer], task: Task | _Unsent | None) -> None:
        self.bufs = bufs
        self.task = task
        self.started = False   # some of its bytes are on the wire
        self.handed = False    # in the hands of the transport between send_buffers and sent
        self.ahead = False     # an answer to an R2T queued ahead of other PDUs (_put_ahead)


class _R2TState:
    """What the target has asked one write for so far, to hold its R2Ts to RFC 7143 §11.8."""

    __slots__ = ("asked", "next_offset", "queued", "requested", "sequences")

    def __init__(self, unsolicited: int, in_order: bool) -> None:
        self.next_offset = unsolicited
        """With DataSequenceInOrder=Yes, the lowest offset the next R2T may ask for."""
        self.asked: _Ranges | None = None
        """With DataSequenceInOrder=No, the bytes sent unsolicited or asked for so far: R2Ts
        may come in any order, and only these ranges tell one asked twice (which would make
        ``requested`` count bytes twice, and a write pass for whole with a hole in it)."""
        if not in_order:
            self.asked = _Ranges()
            if unsolicited:
                self.asked.add(0, unsolicited)
        self.requested = unsolicited
        """Bytes sent unsolicited or asked for by R2Ts: never more than the write's length."""
        self.queued = 0
        """Data-Out frames queued to answer R2Ts so far."""
        self.sequences: list[int] = []
        """For each R2T answered and not yet sent whole: ``queued`` after its last frame."""


class EventKind(enum.Enum):
    LOGOUT_REQUESTED = 1       # Async 1: log out within `seconds` (Parameter3)
    CONNECTION_DROP = 2        # Async 2/3: target will drop us; reconnect after `seconds`
    RENEGOTIATE = 3            # Async 4: target asks for text negotiation
    SCSI_EVENT = 4             # Async 0: sense data in `sense` (e.g. 3F/0E REPORTED LUNS CHANGED)
    TASKS_TERMINATING = 5      # Async 5
    VENDOR = 6                 # Async 255
    LOGGED_OUT = 7             # our Logout completed; `seconds` = Time2Wait


@dataclass(frozen=True, slots=True)
class Event:
    """Something the transport has to act on."""

    kind: EventKind
    seconds: int = 0
    lun: int = 0
    sense: bytes = b""
    detail: str = ""


ControlCallback = Callable[[P.PDU | ISCSIError], None]


@dataclass(slots=True)
class _Control:
    """A pending non-SCSI request (TMF, NOP ping, text, logout) keyed by its ITT."""

    kind: P.Opcode
    on_done: ControlCallback
    text: bytearray = field(default_factory=bytearray)
    responses: int = 0
    """Text Responses received (a text exchange may take several, §11.11.4)."""
    ref_task: Task | None = None
    lun: int | None = None
    function: P.TMFunction | None = None
    cmd_sn: int = 0
    """The CmdSN the request carried (a TMF affects only commands sent before it)."""
    deadline: float | None = None
    """When ``on_done`` gets a :class:`CommandTimeout` if no answer came (None: no bound)."""
    expired: bool = False
    """``on_done`` had its timeout; a late answer is accepted and ignored."""
    sent: float = 0.0
    """When a NOP-Out ping was queued (its round trip is measured from then)."""


@dataclass(slots=True)
class _Liveness:
    """The keepalive's state (see ConnectionCore's timers)."""

    checked_at: float
    """When the timer last ran."""
    mark: tuple[int, int] = (0, 0)
    """The Data-In fast paths' counters then (stats_answered, stats_bytes_in): they run
    without a clock, so their progress shows as a change of these."""
    ping_itt: int | None = None
    """The keepalive's ping in flight."""
    ping_deadline: float = 0.0
    ping_sent: float = 0.0
    ping_mark: tuple[int, int] = (0, 0)
    """The counters when the ping was sent (or its wait last extended)."""


@dataclass(slots=True)
class _Deadlines:
    """The per-command deadline's settings and state, and abort()'s (see ConnectionCore's
    timers). Apart from the core so that it keeps few attributes (see its __init__)."""

    command_timeout: float
    tmf_timeout: float
    next_check: float
    checkpoints: deque[tuple[float, int]] = field(default_factory=deque)
    """(time, next CmdSN) at each check: a command whose CmdSN is below that of a checkpoint
    older than command_timeout has been outstanding longer."""
    stall: tuple[int, float] | None = None
    """(commands sent, since when) while the window holds requests back."""
    expired: dict[Task, ISCSIError] = field(default_factory=dict)
    """Commands being ended by abort()'s escalation, with the error they end with."""


@dataclass(frozen=True, slots=True)
class _TextSend:
    """A Text Request waiting for the command window, in line with the commands."""

    itt: int
    text: bytes
    ttt: int


class ConnectionCore:
    """The sans-I/O Full Feature Phase of one connection. See the module docstring."""

    def __init__(
        self,
        params: TransferParameters,
        *,
        cmd_sn: int,
        exp_stat_sn: int,
        exp_cmd_sn: int,
        max_cmd_sn: int,
        target: str = "",
        now: float = 0.0,
        noop_interval: float = 5.0,
        noop_timeout: float = 5.0,
        command_timeout: float = 0.0,
        tmf_timeout: float = 15.0,
        counters: SessionStats | None = None,
    ) -> None:
        self.params = params
        # What an operator watches (initiator.stats): the session's, so that it counts across
        # connections; incremented off the per-command path only.
        self.counters = counters if counters is not None else SessionStats()
        self.target = target
        self.cmd_sn = cmd_sn
        self.exp_stat_sn = exp_stat_sn
        self.exp_cmd_sn = exp_cmd_sn
        self.max_cmd_sn = max_cmd_sn
        self.noop_interval = noop_interval
        self.noop_timeout = noop_timeout
        # With both "in order" keys Yes (the defaults, and what we offer) every Data-In of a
        # command follows the one before it: offset = bytes so far, DataSN = PDUs so far
        # (§11.7.5, §13.18, §13.19). Checked, so that data_in_length counts the bytes the
        # target really placed, contiguously from 0: a target that repeats or skips a range
        # cannot make a short read look complete.
        self._in_order = params.data_pdu_in_order and params.data_sequence_in_order
        self._tasks: dict[int, Task] = {}
        self._controls: dict[int, _Control] = {}
        self._queued: deque[Task | _TextSend] = deque()
        self._frames: deque[_Frame] = deque()
        self._ahead = 0
        """Frames queued ahead (answers to R2Ts): they are the first in ``_frames`` but for a
        frame partly sent before them."""
        self._next_itt = 1
        self._events: deque[Event] = deque()
        # Liveness (see handle_timer): when the target last made progress on something of
        # ours (receive_pdu notes it), and the keepalive's bookkeeping. Timer state lives in
        # small objects: CPython specialises attribute access on an instance dict of at most
        # 30 keys, and past that every self.x of the per-command path is slower.
        self._last_progress = now
        self._live = _Liveness(checked_at=now, ping_sent=now)
        self._deadlines = _Deadlines(
            command_timeout, tmf_timeout,
            next_check=now + command_timeout / _CHECKS if command_timeout > 0 else _NEVER)
        # Our answers to the target's pings that are still queued: a target that pings
        # faster than it reads would otherwise grow the queue without bound.
        self._ping_answers = _Unsent()
        # Requests of the target (Async Messages) that the transport acts on once: a flood of
        # them must not become a flood of logouts or text exchanges.
        self._logout_requested = False
        self._renegotiation_requested = False
        self._closed: ISCSIError | None = None
        self.logging_out = False
        self.stats_commands = 0
        self.stats_answered = 0
        """Commands that got their status on this connection: the transport's evidence that
        a reconnect really re-established the session (pings do not count: a target can
        answer them and fail every command)."""
        self.stats_bytes_in = 0
        self.stats_bytes_out = 0
        self._handlers: dict[type[P.PDU], Callable[[P.PDU], None]] = {
            P.DataIn: self._on_data_in,  # type: ignore[dict-item]
            P.ScsiResponse: self._on_scsi_response,  # type: ignore[dict-item]
            P.R2T: self._on_r2t,  # type: ignore[dict-item]
            P.NopIn: self._on_nop_in,  # type: ignore[dict-item]
            P.TaskMgmtResponse: self._on_tmf_response,  # type: ignore[dict-item]
            P.TextResponse: self._on_text_response,  # type: ignore[dict-item]
            P.LogoutResponse: self._on_logout_response,  # type: ignore[dict-item]
            P.AsyncMessage: self._on_async,  # type: ignore[dict-item]
            P.Reject: self._on_reject,  # type: ignore[dict-item]
        }

    @property
    def command_timeout(self) -> float:
        """Seconds a command may be outstanding before abort() ends it (0: no deadline)."""
        return self._deadlines.command_timeout

    @property
    def tmf_timeout(self) -> float:
        """Seconds each step of abort()'s escalation may take."""
        return self._deadlines.tmf_timeout

    # ------------------------------------------------------------------------------------
    # Submitting work

    @property
    def in_flight(self) -> int:
        """Commands sent or waiting for the window."""
        return len(self._tasks) + sum(isinstance(t, Task) for t in self._queued)

    def submit(self, task: Task) -> None:
        """Queue a SCSI command; it is sent as soon as the command window allows."""
        if self._closed is not None:
            raise LocalProtocolError("the connection is closed; commands cannot be submitted")
        if self.logging_out:
            raise LocalProtocolError("the session is logging out; no new commands")
        if task.state is not _QUEUED:
            raise LocalProtocolError(f"{task!r} was already submitted")
        # CmdSN <= MaxCmdSN in serial arithmetic (§4.2.2.1), inlined: once per command.
        if self._queued or (self.max_cmd_sn - self.cmd_sn) & _MASK >= _HALF:
            if not self._queued:
                self.counters.window_closed += 1
            self._queued.append(task)
            return
        self._send_command(task)

    def submit_backlog(self, tasks: Sequence[Task], now: float,
                       then: Callable[[], None] | None = None) -> bool:
        """Queue the commands a new connection starts with (those re-issued after a
        reinstatement), in order. True when they wait for a ping's answer (below); ``then``
        runs once they are queued for sending after it (or after the ping failed).

        When they are more than the command window the login announced, an immediate NOP-Out
        ping (§11.18: CmdSN not advanced) goes first and the commands wait for its answer,
        which carries the window the target really has: LIO announces a window of one
        command in the final Login Response and opens it to its queue depth only after
        (docs/faults.md). Sending one command alone, then the rest a round trip later, would
        put the whole backlog behind whatever happens to that one. A target whose window
        is small for real costs the ping's round trip; one that does not answer it is dead
        (the keepalive judges the ping).
        """
        window = (self.max_cmd_sn - self.cmd_sn + 1) & _MASK
        if window >= _HALF:
            window = 0
        if len(tasks) <= window or self._closed is not None:
            for task in tasks:
                self.submit(task)
            return False
        for task in tasks:
            if task.state is not _QUEUED:
                raise LocalProtocolError(f"{task!r} was already submitted")
        # In _queued, the commands (and whatever is submitted meanwhile) wait in line.
        self._queued.extend(tasks)

        def window_learned(_: P.PDU | ISCSIError) -> None:
            # The ping's answer moved the window (_on_nop_in), or it failed: send what fits.
            if self._closed is None:
                self._drain_queue()
            if then is not None:
                then()

        self.ping(now, window_learned)
        return True

    def abort_task(self, task: Task, on_done: ControlCallback, *,
                   deadline: float | None = None) -> None:
        """ABORT TASK for ``task`` (§11.5.1). ``on_done`` gets the TaskMgmtResponse, or a
        :class:`CommandTimeout` when none came by ``deadline``.

        A command still waiting for the window was never seen by the target: it completes
        at once with :class:`TaskAborted` and ``on_done`` gets a synthetic COMPLETE response.
        """
        if task.state is TaskState.QUEUED and task in self._queued:
            self._queued.remove(task)
            self._complete_error(
                task, TaskAborted(f"{self._what(task)} aborted before it was sent"))
            on_done(P.TaskMgmtResponse(response=P.TMResponse.COMPLETE))
            return
        self._task_mgmt(P.TMFunction.ABORT_TASK, task.lun, on_done, ref_task=task,
                        deadline=deadline)

    def task_management(self, function: P.TMFunction, lun: int, on_done: ControlCallback, *,
                        deadline: float | None = None) -> None:
        """ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET or TARGET WARM/COLD RESET."""
        if function in (P.TMFunction.ABORT_TASK, P.TMFunction.TASK_REASSIGN):
            raise LocalProtocolError(f"{function.name} needs a task; use abort_task")
        self._task_mgmt(function, lun, on_done, deadline=deadline)

    def abort(self, task: Task, now: float, error: ISCSIError,
              on_done: Callable[[], None] | None = None) -> None:
        """End ``task`` at the target whatever it takes, escalating as open-iscsi and the
        SCSI error handler do: ABORT TASK; if the target refuses it, answers that the task does
        not exist before its status came, or does not answer within ``tmf_timeout``, LOGICAL
        UNIT RESET of the task's LUN; if that fails too, the
        connection is given up (:class:`ConnectionFailed` is raised, from
        :meth:`handle_timer` or :meth:`receive_pdu`) and the session reinstated.

        The task completes with ``error`` (unless its own status comes first) and is not
        re-issued on the next connection: :meth:`take_unfinished` completes it. ``on_done``
        runs once the task is out of the target's hands (aborted, reset, or the connection
        dropped). Used by the per-command deadline and for aborts the kernel asks for.
        """
        done = on_done or _nothing
        if task.state is _DONE or task.on_done is None or task in self._deadlines.expired:
            done()
            return
        if task.state is _QUEUED:
            if task in self._queued:
                self._queued.remove(task)
                self._complete_error(task, error)
            done()
            return
        self._deadlines.expired[task] = error
        self._escalate(task, P.TMFunction.ABORT_TASK, now + self._deadlines.tmf_timeout, done)

    def text_request(self, text: bytes, on_done: ControlCallback, *,
                     deadline: float | None = None) -> None:
        """Send a Text Request (e.g. ``SendTargets=All``); ``on_done`` gets a TextResponse
        whose ``data`` is the whole answer, reassembled across continuation PDUs (§11.10.2),
        or a :class:`CommandTimeout` when it is not complete by ``deadline``."""
        itt = self._alloc_itt()
        self._controls[itt] = _Control(P.Opcode.TEXT_REQUEST, on_done, deadline=deadline)
        self._send_text(itt, text, P.RESERVED_TAG)

    def ping(self, now: float, on_done: ControlCallback | None = None, data: bytes = b"") -> None:
        """Send a NOP-Out ping (§11.18); the NOP-In answer goes to ``on_done``, or a
        :class:`CommandTimeout` after ``noop_timeout`` (the keepalive ping itself is judged
        by :meth:`handle_timer`, which may drop the connection instead)."""
        itt = self._alloc_itt()
        self._controls[itt] = _Control(P.Opcode.NOP_OUT, on_done or _ignore,
                                       deadline=now + self.noop_timeout, sent=now)
        if self._live.ping_itt is None:
            self._live.ping_itt = itt
            self._live.ping_deadline = now + self.noop_timeout
            self._live.ping_sent = now
            self._live.ping_mark = (self.stats_answered, self.stats_bytes_in)
        self._queue(P.NopOut(immediate=True, itt=itt, ttt=P.RESERVED_TAG, cmd_sn=self.cmd_sn,
                             exp_stat_sn=self.exp_stat_sn, data=data))

    def logout(self, on_done: ControlCallback,
               reason: P.LogoutReason = P.LogoutReason.CLOSE_SESSION, *,
               deadline: float | None = None) -> None:
        """Send a Logout Request (§11.14). New commands are refused from now on."""
        self.logging_out = True
        itt = self._alloc_itt()
        self._controls[itt] = _Control(P.Opcode.LOGOUT_REQUEST, on_done, deadline=deadline)
        self._queue(P.LogoutRequest(immediate=True, reason=reason, itt=itt, cid=0,
                                    cmd_sn=self.cmd_sn, exp_stat_sn=self.exp_stat_sn))

    # ------------------------------------------------------------------------------------
    # Transport side

    def send_buffers(self, max_buffers: int = 1024,
                     until: Callable[[memoryview], bool] | None = None) -> list[Buffer]:
        """Up to ``max_buffers`` buffers of queued PDUs, in order, for one ``sendmsg``.

        With ``until``, the list ends at the first ``memoryview`` (a caller's payload; headers
        are bytes) for which it is true, that one included: the transport sends payloads in
        shared memory another way (:mod:`initiator.splice`) and needs nothing past one."""
        out: list[Buffer] = []
        room = max_buffers
        for frame in self._frames:
            if room <= 0:
                break
            frame.handed = True
            bufs = frame.bufs
            n = len(bufs)
            if until is not None:
                for i in range(n if n < room else room):
                    buf = bufs[i]
                    if type(buf) is memoryview and until(buf):
                        out += bufs[:i + 1]
                        return out
            if n <= room:
                out += bufs
                room -= n
            else:
                out += bufs[:room]
                break
        return out

    def sent(self, nbytes: int) -> None:
        """``nbytes`` of :meth:`send_buffers` went out; drop or trim what was sent."""
        frames = self._frames
        while nbytes and frames:
            frame = frames[0]
            bufs = frame.bufs
            if len(bufs) == 1 and nbytes >= (n := len(bufs[0])):
                # A one-buffer frame (a read's header) went out whole: the common case, and
                # the frame is dropped below, so it need not be marked or trimmed first.
                nbytes -= n
            else:
                frame.started = True
                while nbytes and bufs:
                    n = len(bufs[0])
                    if nbytes >= n:
                        nbytes -= n
                        bufs.pop(0)
                    else:
                        bufs[0] = memoryview(bufs[0])[nbytes:]
                        nbytes = 0
                if bufs:
                    break  # partly sent; nbytes is 0
            frames.popleft()
            if frame.ahead:
                self._ahead -= 1
            task = frame.task
            if task is not None:
                task.unsent_frames -= 1
        # Frames handed out but not reached are back in the queue's hands: a command that
        # completes now drops them instead of sending them from a copy (a Data-Out for a
        # command that already has its status could draw a Reject).
        for frame in frames:
            if not frame.handed:
                break
            frame.handed = False
        if nbytes:
            raise LocalProtocolError("sent() reports more bytes than were handed out")

    @property
    def wants_to_send(self) -> bool:
        return bool(self._frames)

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    # -- Timers ---------------------------------------------------------------------------
    #
    # Liveness means the target makes progress on what we asked: data or status for our
    # commands, R2Ts, answers to our requests and pings. Bytes alone do not count (a target
    # trickling a byte a second would keep a dead connection alive), nor do PDUs it sends on
    # its own (NOP-In pings, Async Messages). receive_pdu() notes the time of every answer; the
    # Data-In fast paths run without a clock, so each timer run compares their counters with
    # the last run's. Three bounds come from that:
    #
    # - keepalive: after noop_interval without progress a NOP-Out ping goes out; unanswered
    #   after noop_timeout with no progress meanwhile, the connection is dead (an answer
    #   stuck behind a long read is no failure: that read progresses);
    # - per command: a command outstanding for command_timeout is ended by abort()'s
    #   escalation. No timer per command: every check records (now, next CmdSN), and the
    #   commands (in the task table in CmdSN order) whose CmdSN is below that of a record
    #   older than command_timeout are overdue. A check runs every command_timeout / _CHECKS,
    #   so a command is caught at most 1 / _CHECKS late (plus the loop's delay);
    # - the command window: commands held back by a window that does not open for
    #   command_timeout (MaxCmdSN never moving) end the connection; they were never seen by
    #   the target, and the next login grants a new window;
    # - a stream stopped mid-PDU: every answer of the target, an abort's too, comes after the
    #   rest of the PDU the reader holds part of. When the target sends no more of it, an
    #   abort cannot be answered: open-iscsi fails the connection when its abort times out
    #   (node.session.err_timeo.abort_timeout, 15 s by default), and here, knowing why no
    #   answer can come, the connection is given up as soon as a command is overdue (or being
    #   aborted) and the stream has been stopped for min(command_timeout, tmf_timeout)
    #   (_stalled). A command is then ended at most that long after its deadline, with an
    #   error that says so; the transport tells handle_timer since when the stream stopped.
    #
    # Requests (task management, text, logout, pings) carry their own deadline.

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must next run, or None."""
        if self._closed is not None:
            return None
        when = self._deadlines.next_check
        if self._live.ping_itt is not None:
            when = min(when, self._live.ping_deadline)
        elif self.noop_interval > 0:
            when = min(when, self._last_progress + self.noop_interval)
        for itt, control in self._controls.items():
            # The keepalive's own ping is judged by _keepalive, against ping_deadline.
            if control.deadline is not None and not control.expired and itt != self._live.ping_itt:
                when = min(when, control.deadline)
        return None if when == _NEVER else when

    def handle_timer(self, now: float, stalled_since: float | None = None) -> None:
        """Run the keepalive, the command deadlines and the request deadlines (see above).
        ``stalled_since``: when the last byte came, if the reader holds part of a PDU.

        Raises a ProtocolError or :class:`ConnectionFailed` when the connection must be given
        up (the transport then recovers the session)."""
        if self._closed is not None:
            return
        mark = (self.stats_answered, self.stats_bytes_in)
        if mark != self._live.mark:
            # Progress since the last run. Unless receive_pdu() noted when (an answer after
            # that run), it was a fast path's, at a time unknown: say now.
            self._live.mark = mark
            if self._last_progress <= self._live.checked_at:
                self._last_progress = now
        self._live.checked_at = now
        self._expire_controls(now)
        self._keepalive(now)
        if self._deadlines.command_timeout > 0 and now >= self._deadlines.next_check:
            self._deadlines.next_check = now + self._deadlines.command_timeout / _CHECKS
            self._check_commands(now, stalled_since)

    def _keepalive(self, now: float) -> None:
        if self._live.ping_itt is not None:
            if now < self._live.ping_deadline:
                return
            mark = (self.stats_answered, self.stats_bytes_in)
            if self._last_progress <= self._live.ping_sent and mark == self._live.ping_mark:
                raise RemoteProtocolError(
                    f"target {self.target} did not answer a NOP-Out ping within "
                    f"{self.noop_timeout:g} s and made no progress on our commands meanwhile: "
                    "the connection is considered dead")
            # The target progresses on our commands but the answer is not in yet (stuck
            # behind a long read, say): alive but busy. This is how we avoid open-iscsi's NOP
            # timeouts under load; a target that stops progressing fails the next round.
            self._live.ping_sent = now
            self._live.ping_mark = mark
            self._live.ping_deadline = now + self.noop_timeout
            return
        if self.noop_interval > 0 and now >= self._last_progress + self.noop_interval:
            self.ping(now)

    def _expire_controls(self, now: float) -> None:
        expired = [(itt, c) for itt, c in self._controls.items()
                   if c.deadline is not None and not c.expired and now >= c.deadline
                   and itt != self._live.ping_itt]
        for itt, control in expired:
            control.expired = True
            what = _REQUEST_NAMES.get(control.kind, control.kind.name)
            if control.function is not None:
                what = control.function.name.replace("_", " ")
            control.on_done(CommandTimeout(
                f"target {self.target} did not answer our {what} (ITT 0x{itt:08x}) in time"))

    def _check_commands(self, now: float, stalled_since: float | None) -> None:
        timeout = self._deadlines.command_timeout
        checkpoints = self._deadlines.checkpoints
        if not checkpoints or checkpoints[-1][1] != self.cmd_sn:
            checkpoints.append((now, self.cmd_sn))
        horizon = now - timeout
        while len(checkpoints) > 1 and checkpoints[1][0] <= horizon:
            checkpoints.popleft()
        if self._tasks and checkpoints[0][0] <= horizon:
            before = checkpoints[0][1]
            overdue: list[Task] = []
            for task in self._tasks.values():  # in CmdSN order: the oldest first
                if not 0 < (before - task.cmd_sn) & _MASK < _HALF:
                    break
                if task not in self._deadlines.expired:
                    overdue.append(task)
            for task in overdue:
                recovery_log.warning("%s: %s did not complete within %g s", self.target,
                                     self._what(task), timeout)
            if overdue and stalled_since is not None:
                self._stalled(now, stalled_since, overdue)
            for task in overdue:
                self.abort(task, now, self._overdue(task))
        if self._deadlines.expired and stalled_since is not None:
            self._stalled(now, stalled_since, [])
        if not self._queued:
            self._deadlines.stall = None
        elif self._deadlines.stall is None or self._deadlines.stall[0] != self.stats_commands:
            self._deadlines.stall = (self.stats_commands, now)
        elif now - self._deadlines.stall[1] >= timeout:
            raise ConnectionFailed(
                f"target {self.target} kept its command window closed for {timeout:g} s "
                f"(CmdSN {self.cmd_sn}, MaxCmdSN {self.max_cmd_sn}) with "
                f"{len(self._queued)} request(s) waiting: reconnecting")

    def _overdue(self, task: Task) -> CommandTimeout:
        """The error of a command past its deadline. How its abort ended is added when it
        does (_complete_error, take_unfinished)."""
        return CommandTimeout(
            f"{self._what(task)} did not complete within the command timeout of "
            f"{self._deadlines.command_timeout:g} s in target {self.target}")

    def _stalled(self, now: float, since: float, overdue: list[Task]) -> None:
        """Commands are overdue or being aborted (``overdue``: those not yet), and the target
        has sent nothing since ``since`` in the middle of a PDU: give up the connection once
        that has lasted min(command_timeout, tmf_timeout) (see "Timers"). The overdue commands
        are not re-issued: they end with their deadline's error, which take_unfinished
        completes with the connection's."""
        stalled = now - since
        if stalled < min(self._deadlines.command_timeout, self._deadlines.tmf_timeout):
            return
        for task in overdue:  # ended, not re-issued (take_unfinished says how)
            self._deadlines.expired[task] = self._overdue(task)
        raise ConnectionFailed(
            f"target {self.target} stopped sending in the middle of a PDU and sent nothing for "
            f"{stalled:.1f} s, so no answer (to an abort either) can come over the connection, "
            "which was dropped; check that the target is running and that the network path "
            "to it works")

    def _escalate(self, task: Task, function: P.TMFunction, deadline: float,
                  done: Callable[[], None]) -> None:
        """One step of :meth:`abort`: ``function`` (ABORT TASK, then LOGICAL UNIT RESET)."""
        def answered(result: P.PDU | ISCSIError) -> None:
            if task.state is _DONE or self._closed is not None:
                # Aborted, reset, completed on its own meanwhile, or the connection is gone
                # (take_unfinished ends the task with its error).
                if task.state is _DONE:
                    self._deadlines.expired.pop(task, None)
                done()
                return
            why = _tmf_outcome(result)
            if function is P.TMFunction.ABORT_TASK:
                recovery_log.warning("%s: ABORT TASK for %s failed (%s); resetting LUN %d",
                                     self.target, self._what(task), why, task.lun)
                self._escalate(task, P.TMFunction.LOGICAL_UNIT_RESET,
                               deadline + self._deadlines.tmf_timeout, done)
                return
            done()
            raise ConnectionFailed(
                f"target {self.target} could not end {self._what(task)}: ABORT TASK and "
                f"LOGICAL UNIT RESET of LUN {task.lun} failed ({why}); dropping the connection "
                "to reinstate the session")

        self._task_mgmt(function, task.lun, answered,
                        ref_task=task if function is P.TMFunction.ABORT_TASK else None,
                        deadline=deadline)

    def receive_pdu(self, pdu: P.PDU, now: float) -> None:
        """Process one PDU from the target. Raises a ProtocolError when the connection must
        be dropped (the transport then recovers the session)."""
        cls = type(pdu)
        handler = self._handlers.get(cls)
        if handler is None:
            raise RemoteProtocolError(
                f"target {self.target} sent a {cls.__name__} PDU, which a target never "
                "sends in Full Feature Phase")
        if cls in _ANSWERS or (isinstance(pdu, P.NopIn) and pdu.itt != _RESERVED_TAG):
            # An answer to something of ours (the handler checks that it is): progress.
            self._last_progress = now
        handler(pdu)

    def data_in_buffers(self, itt: int, offset: int, length: int) -> Sequence[memoryview] | None:
        """:class:`~initiator.reader.DataSink`: where the ``length`` payload bytes at ``offset``
        of task ``itt``'s Data-In go. None (an unknown task, a command without Data-In, data
        outside its buffer) has the reader hand over a DataIn: :meth:`_on_data_in` then says
        what is wrong."""
        task = self._tasks.get(itt)
        if task is None:
            return None
        if length == task.in_len and not offset:
            return task.data_in  # all of it: a read in one Data-In, the common case
        data_in = task.data_in
        if data_in is None or offset + length > task.in_len:
            return None
        return _slice(data_in, offset, length)

    def data_in_placed(self, flags: int, status: int, itt: int, offset: int, stat_sn: int,
                       exp_cmd_sn: int, max_cmd_sn: int, data_sn: int, residual: int,
                       length: int) -> bool:
        """:class:`~initiator.reader.DataSink`: the payload of a Data-In is in the command's
        buffer; process the rest of it, from its header's fields (the per-command path of
        reads). What is not the well-formed common case (in order, the F bit with the
        status) is declined: it comes back as a DataIn, for :meth:`_on_data_in`'s checks."""
        task = self._tasks.get(itt)
        if task is None or (flags & 0x81) == 0x01 or ((
                offset != task.received or data_sn != task.data_sn) if self._in_order
                else not self._place(task, offset, length, data_sn)):
            return False
        task.received += length
        task.data_sn = (data_sn + 1) & _MASK
        self.stats_bytes_in += length
        if exp_cmd_sn != self.exp_cmd_sn or max_cmd_sn != self.max_cmd_sn:
            self._window(exp_cmd_sn, max_cmd_sn)
        if flags & 0x01:
            # The status (phase collapse, §11.7.4).
            if stat_sn == self.exp_stat_sn:
                # The StatSN we expected, as every in-order status is: _ack()'s advance.
                self.exp_stat_sn = (stat_sn + 1) & _MASK
            else:
                self._ack(stat_sn)
            self._complete(task, status, b"", residual if flags & 0x02 else (
                -residual if flags & 0x04 else 0), 0)
        return True

    def close(self, error: ISCSIError) -> None:
        """The connection is gone: nothing more is sent or received on it.

        Commands stay in the table; :meth:`take_unfinished` hands them to the next connection.
        Pending control requests fail with ``error``.
        """
        if self._closed is not None:
            return
        self._closed = error
        self._frames.clear()
        self._ahead = 0
        for task in self._tasks.values():
            task.unsent_frames = 0
        controls, self._controls = self._controls, {}
        for control in controls.values():
            if not control.expired:
                control.on_done(error)

    def take_unfinished(self) -> list[Task]:
        """Every command that has not completed, in submission order, reset for re-issue;
        but when no command completed on this connection, the first goes last.

        On a live connection (``fail_all``) the send queue lets go of their buffers too.
        Commands that :meth:`abort` was ending are not re-issued: they complete now with the
        error they were being ended with (call this after the reader let go of their buffers).
        """
        # Sent commands have CmdSNs just below the next one to allocate; counting back from
        # it orders them in serial arithmetic, whether or not ExpCmdSN has passed them (the
        # target saw some of them) and across the 2**32 wrap.
        nxt = self.cmd_sn
        tasks = sorted(self._tasks.values(), key=lambda t: (t.cmd_sn - nxt) & 0xFFFFFFFF)
        tasks.extend(t for t in self._queued if isinstance(t, Task))
        if not self.stats_answered and len(tasks) > 1:
            # Whatever broke this connection, it completed nothing: the command that led may
            # be what breaks it (a "poison" command, or a flipped bit in its immediate data
            # that the target cannot recover from at ERL 0). It must not lead every
            # re-issue, or one command stops them all; SIMPLE tasks carry no order (SAM-5).
            tasks.append(tasks.pop(0))
        self._tasks.clear()
        self._queued.clear()
        unfinished: list[Task] = []
        for task in tasks:
            self._detach_frames(task)
            error = self._deadlines.expired.pop(task, None) if self._deadlines.expired else None
            if error is not None:
                if type(error) is CommandTimeout and self._closed is not None:
                    # A deadline's abort that the connection's end cut short: say how.
                    error = CommandTimeout(f"{error}; it could not be aborted: {self._closed}")
                self._complete_error(task, error)
                continue
            task.reset_for_reissue()
            unfinished.append(task)
        return unfinished

    def fail_all(self, error: ISCSIError) -> None:
        """Complete every command with ``error`` (session replacement timed out, etc.)."""
        for task in self.take_unfinished():
            self._complete_error(task, error)

    # ------------------------------------------------------------------------------------
    # Sending

    def _alloc_itt(self) -> int:
        itt = self._next_itt
        while itt in self._tasks or itt in self._controls or itt == _RESERVED_TAG:
            itt = (itt + 1) & 0xFFFFFFFF
        self._next_itt = (itt + 1) & 0xFFFFFFFF
        return itt

    def _queue(self, pdu: P.PDU, data: Sequence[Buffer] | None = None,
               task: Task | _Unsent | None = None) -> None:
        bufs = P.frame(pdu, data, header_digest=self.params.header_digest,
                       data_digest=self.params.data_digest)
        self._frames.append(_Frame(bufs, task))
        if task is not None:
            task.unsent_frames += 1

    def _put_ahead(self, frame: _Frame) -> None:
        """Put an answer to an R2T ahead of every PDU but earlier answers and a PDU partly on
        the wire (whose framing must stay whole); the caller counts it in its task's
        ``unsent_frames``."""
        frame.ahead = True
        frames = self._frames
        index = self._ahead
        if frames and frames[0].started and not frames[0].ahead:
            index += 1
        frames.insert(index, frame)
        self._ahead += 1

    def _send_command(self, task: Task) -> None:
        params = self.params
        tasks = self._tasks
        # _alloc_itt() inlined for the common case: the next tag is free (it is unless 2**32
        # tags wrapped around onto a command or request still outstanding).
        itt = self._next_itt
        if itt in tasks or itt in self._controls or itt == _RESERVED_TAG:
            itt = self._alloc_itt()
        else:
            self._next_itt = (itt + 1) & _MASK
        task.itt = itt
        task.cmd_sn = cmd_sn = self.cmd_sn
        self.cmd_sn = (cmd_sn + 1) & _MASK
        task.state = _ACTIVE
        tasks[itt] = task
        self.stats_commands += 1
        cdb = task.cdb
        if not task.out_len and len(cdb) <= 16:
            # Reads and commands without data, the hottest path: one header packed straight
            # with the struct (which pads the CDB to 16 bytes), F set.
            in_len = task.in_len
            header = _pack_bhs(_OP_SCSI_COMMAND, (0xC0 if in_len else 0x80) | task.attr, 0, 0,
                               task.lun_wire, itt, in_len, cmd_sn, self.exp_stat_sn, cdb)
            if params.header_digest:
                header += P.pack_digest(header)
            self._frames.append(_Frame([header], task))
            task.unsent_frames += 1
            return
        immediate: Sequence[Buffer] = ()
        unsolicited = 0
        if task.out_len:
            assert task.data_out is not None
            # What may go without an R2T (§13.13, §13.14): up to FirstBurstLength when
            # InitialR2T=No; only the immediate data (one PDU) when InitialR2T=Yes.
            if not params.initial_r2t:
                unsolicited = min(task.out_len, params.first_burst_length)
            elif params.immediate_data:
                unsolicited = min(task.out_len, params.first_burst_length,
                                  params.max_xmit_data_segment_length)
            if params.immediate_data and unsolicited:
                n = min(unsolicited, params.max_xmit_data_segment_length)
                immediate = _slice(task.data_out, 0, n)
                task.immediate_sent = n
        data_out_follows = unsolicited > task.immediate_sent
        if len(cdb) <= 16 and not (task.out_len and task.in_len):
            # Hot path: pack the BHS directly (no ScsiCommand object, no AHS).
            flags = (0 if data_out_follows else 0x80) | (0x40 if task.in_len else 0) \
                | (0x20 if task.out_len else 0) | task.attr
            header = P.pack_scsi_command(
                flags, task.immediate_sent, task.lun_wire, itt,
                task.out_len if task.out_len else task.in_len, task.cmd_sn, self.exp_stat_sn,
                cdb if len(cdb) == 16 else cdb.ljust(16, b"\0"))
            self._frames.append(_Frame(P.frame_header(
                header, immediate, task.immediate_sent, header_digest=params.header_digest,
                data_digest=params.data_digest), task))
            task.unsent_frames += 1
        else:
            cmd = P.ScsiCommand(
                final=not data_out_follows, read=task.in_len > 0, write=task.out_len > 0,
                attr=task.attr, lun=task.lun_wire, itt=itt,
                expected_data_transfer_length=task.out_len if task.out_len else task.in_len,
                cmd_sn=task.cmd_sn, exp_stat_sn=self.exp_stat_sn, cdb=cdb,
                bidi_read_length=task.in_len if task.out_len and task.in_len else None,
            )
            self._queue(cmd, immediate, task)
        self.stats_bytes_out += task.immediate_sent
        if data_out_follows:
            # Unsolicited Data-Out, TTT 0xffffffff, one sequence up to FirstBurstLength.
            self._send_data_out(task, task.immediate_sent, unsolicited - task.immediate_sent,
                                P.RESERVED_TAG)
        task.unsolicited = unsolicited

    def _send_data_out(self, task: Task, offset: int, length: int, ttt: int) -> None:
        """Data-Out PDUs for ``length`` bytes from ``offset``, one sequence (§11.7).

        Several per write (one per MaxXmitDataSegmentLength): each header is packed straight
        with the struct and framed inline, as :func:`initiator.pdu.frame` would frame it,
        when no digest or padding is due.
        """
        data_out = task.data_out
        assert data_out is not None
        params = self.params
        mxdsl = params.max_xmit_data_segment_length
        plain = not (params.header_digest or params.data_digest)
        lun, itt, exp_stat_sn = task.lun_wire, task.itt, self.exp_stat_sn
        frames = self._frames
        chunks = _chunks(data_out, offset, length, mxdsl)
        end = offset + length
        data_sn = 0
        # An answer to an R2T goes ahead of other tasks' PDUs (see the module docstring), but
        # not of the task's own: with PDUs of it still queued (unsolicited data, an earlier
        # answer that could not go ahead) it goes behind them, so that its sequences keep
        # their order (DataSequenceInOrder, §13.19) and _on_r2t's count of outstanding R2Ts
        # holds (a task's frames leave the queue in order).
        ahead = ttt != _RESERVED_TAG and not task.unsent_frames
        while offset < end:
            n = end - offset if end - offset < mxdsl else mxdsl
            header = _pack_data_out(_OP_DATA_OUT, 0x80 if offset + n == end else 0, 0, n, lun,
                                    itt, ttt, exp_stat_sn, data_sn, offset)
            parts = chunks[data_sn]
            if plain and not n & 3:
                parts.insert(0, header)
                frame = _Frame(parts, task)
            else:
                frame = _Frame(P.frame_header(
                    header, parts, n, header_digest=params.header_digest,
                    data_digest=params.data_digest), task)
            if ahead:
                self._put_ahead(frame)
            else:
                frames.append(frame)
            data_sn += 1
            offset += n
        task.unsent_frames += data_sn
        self.stats_bytes_out += length

    def _send_text(self, itt: int, text: bytes, ttt: int) -> None:
        # Text Requests are not immediate: they take a CmdSN like commands (§11.10), so they
        # wait for the command window like commands (§4.2.2.1: a target silently drops a
        # CmdSN outside [ExpCmdSN, MaxCmdSN], and every later command would wait behind it).
        if self._queued or not serial.le(self.cmd_sn, self.max_cmd_sn):
            if not self._queued:
                self.counters.window_closed += 1
            self._queued.append(_TextSend(itt, text, ttt))
            return
        self._emit_text(itt, text, ttt)

    def _emit_text(self, itt: int, text: bytes, ttt: int) -> None:
        self._queue(P.TextRequest(final=True, itt=itt, ttt=ttt, cmd_sn=self.cmd_sn,
                                  exp_stat_sn=self.exp_stat_sn, data=text))
        self.cmd_sn = (self.cmd_sn + 1) & 0xFFFFFFFF

    def _task_mgmt(self, function: P.TMFunction, lun: int, on_done: ControlCallback,
                   ref_task: Task | None = None, deadline: float | None = None) -> None:
        itt = self._alloc_itt()
        self._controls[itt] = _Control(P.Opcode.TASK_MGMT_REQUEST, on_done, ref_task=ref_task,
                                       lun=lun, function=function, cmd_sn=self.cmd_sn,
                                       deadline=deadline)
        self._queue(P.TaskMgmtRequest(
            immediate=True, function=function, lun=P.lun_to_wire(lun), itt=itt,
            referenced_task_tag=ref_task.itt if ref_task else P.RESERVED_TAG,
            cmd_sn=self.cmd_sn, exp_stat_sn=self.exp_stat_sn,
            ref_cmd_sn=ref_task.cmd_sn if ref_task else 0))

    def _drain_queue(self) -> None:
        queued = self._queued
        while queued and serial.le(self.cmd_sn, self.max_cmd_sn):
            item = queued.popleft()
            if isinstance(item, Task):
                self._send_command(item)
            elif item.itt in self._controls:  # not failed or answered meanwhile
                self._emit_text(item.itt, item.text, item.ttt)

    # ------------------------------------------------------------------------------------
    # Receiving

    # _ack() and _window() run for nearly every PDU received, so the serial comparisons
    # (serial.gt(a, b) is 0 < (a - b) mod 2**32 < 2**31) are written out instead of called.

    def _ack(self, stat_sn: int) -> None:
        nxt = (stat_sn + 1) & _MASK
        if 0 < (nxt - self.exp_stat_sn) & _MASK < _HALF:
            self.exp_stat_sn = nxt

    def _window(self, exp_cmd_sn: int, max_cmd_sn: int) -> None:
        # §4.2.2.1: values with MaxCmdSN < ExpCmdSN - 1 are invalid and ignored; stale
        # (smaller) values from out-of-order PDUs must not move the window back.
        if 0 < (exp_cmd_sn - 1 - max_cmd_sn) & _MASK < _HALF:
            return
        if 0 < (exp_cmd_sn - self.exp_cmd_sn) & _MASK < _HALF:
            if 0 < (exp_cmd_sn - self.cmd_sn) & _MASK < _HALF:
                # It claims CmdSNs we never used: it would take the commands that get them
                # for duplicates and drop them (§4.2.2.1), and they would only time out.
                raise RemoteProtocolError(
                    f"target {self.target} acknowledged CmdSN up to {(exp_cmd_sn - 1) & _MASK} "
                    f"(ExpCmdSN {exp_cmd_sn}), but the next CmdSN we assign is {self.cmd_sn}: "
                    "it counts commands we never sent (RFC 7143 §4.2.2.1); dropping the "
                    "connection")
            self.exp_cmd_sn = exp_cmd_sn
        if 0 < (max_cmd_sn - self.max_cmd_sn) & _MASK < _HALF:
            self.max_cmd_sn = max_cmd_sn
            if self._queued:
                self._drain_queue()

    def _task_for(self, itt: int, what: str) -> Task:
        task = self._tasks.get(itt)
        if task is None:
            raise RemoteProtocolError(
                f"target {self.target} sent a {what} for task 0x{itt:08x}, which is not an "
                "outstanding command of this connection")
        return task

    def _on_data_in(self, pdu: P.DataIn) -> None:
        task = self._task_for(pdu.itt, "Data-In")
        n = pdu.placed or len(pdu.data)
        if not pdu.placed and n and (task.data_in is None
                                     or pdu.buffer_offset + n > task.in_len):
            raise RemoteProtocolError(
                f"target {self.target} sent {n} bytes of Data-In at offset "
                f"{pdu.buffer_offset} for {self._what(task)}, which reads {task.in_len} bytes")
        if self._in_order and (pdu.buffer_offset != task.received
                               or pdu.data_sn != task.data_sn):
            raise RemoteProtocolError(
                f"target {self.target} sent Data-In for {self._what(task)} at offset "
                f"{pdu.buffer_offset} with DataSN {pdu.data_sn}, but the next in order is "
                f"offset {task.received} with DataSN {task.data_sn} (DataPDUInOrder and "
                "DataSequenceInOrder are Yes: RFC 7143 §11.7.5, §13.18, §13.19)")
        if not self._in_order and n and task.ranges is not None and (
                seen := task.ranges.overlap(pdu.buffer_offset, pdu.buffer_offset + n)):
            raise RemoteProtocolError(
                f"target {self.target} sent Data-In for {self._what(task)} at offset "
                f"{pdu.buffer_offset}, {n} bytes, overlapping bytes {seen[0]}..{seen[1]} it "
                "had already sent: each byte of a read comes once (RFC 7143 §11.7.5, "
                "DataPDUInOrder/DataSequenceInOrder=No allow another order, not repeats); "
                "dropping the connection")
        if not self._in_order and task.sns is not None and task.sns.overlap(
                pdu.data_sn, pdu.data_sn + 1):
            raise RemoteProtocolError(
                f"target {self.target} sent Data-In for {self._what(task)} at offset "
                f"{pdu.buffer_offset} with DataSN {pdu.data_sn}, a DataSN it had already "
                "sent: each PDU of a read has its own (RFC 7143 §11.7.4; "
                "DataPDUInOrder/DataSequenceInOrder=No allow another order, not repeats); "
                "dropping the connection")
        if pdu.status_present and not pdu.final:
            # Phase collapse: the status comes with the final Data-In (§11.7.4).
            raise RemoteProtocolError(
                f"target {self.target} sent a Data-In with status but without the F bit")
        if not pdu.placed and n:
            assert task.data_in is not None  # checked above
            _scatter(task.data_in, pdu.buffer_offset, pdu.data)
        # Checked: the rest is data_in_placed()'s, from the header's fields as the reader
        # would pass them (byte 1: F, O, U and S bits).
        self.data_in_placed(
            _F * pdu.final | _O * pdu.overflow | _U * pdu.underflow | _S * pdu.status_present,
            pdu.status, pdu.itt, pdu.buffer_offset, pdu.stat_sn, pdu.exp_cmd_sn,
            pdu.max_cmd_sn, pdu.data_sn, pdu.residual_count, n)

    def _place(self, task: Task, offset: int, length: int, data_sn: int) -> bool:
        """Note the ``length`` bytes at ``offset`` and the DataSN of an out-of-order Data-In;
        False (nothing noted) when they overlap bytes received before or the DataSN was
        received before: :meth:`_on_data_in` says so. Raises :class:`RemoteProtocolError`
        past :data:`MAX_DATA_IN_RANGES`."""
        ranges = task.ranges
        if length and ranges is not None and ranges.overlap(offset, offset + length):
            return False
        if not self._note_sn(task, data_sn):
            return False
        if not length:
            return True
        if ranges is None:
            ranges = task.ranges = _Ranges()
        if ranges.add(offset, offset + length) > MAX_DATA_IN_RANGES:
            raise RemoteProtocolError(
                f"target {self.target} scattered the Data-In of {self._what(task)} into more "
                f"than {MAX_DATA_IN_RANGES} separate ranges (the last at offset {offset}, "
                f"{length} bytes); dropping the connection")
        return True

    def _note_sn(self, task: Task, sn: int) -> bool:
        """Note the DataSN (or, for a bidirectional command, R2TSN: one sequence, §11.7.4)
        of a PDU of ``task`` received out of order; False (nothing noted) when it was received
        before. Raises :class:`RemoteProtocolError` past :data:`MAX_DATA_IN_RANGES` separate
        ranges of them, which bounds what a target numbering at random makes us keep."""
        sns = task.sns
        if sns is None:
            sns = task.sns = _Ranges()
        elif sns.overlap(sn, sn + 1):
            return False
        if sns.add(sn, sn + 1) > MAX_DATA_IN_RANGES:
            raise RemoteProtocolError(
                f"target {self.target} scattered the DataSNs of {self._what(task)} into more "
                f"than {MAX_DATA_IN_RANGES} separate ranges (the last DataSN {sn}): PDUs are "
                "numbered 0, 1, 2... as sent (RFC 7143 §11.7.4); dropping the connection")
        return True

    def _on_scsi_response(self, pdu: P.ScsiResponse) -> None:
        task = self._task_for(pdu.itt, "SCSI Response")
        self._ack(pdu.stat_sn)
        self._window(pdu.exp_cmd_sn, pdu.max_cmd_sn)
        if pdu.response != P.ServiceResponse.COMPLETED:
            # Answered all the same: out of the table, or it would count as in flight (a
            # logout waits for it) and be sent again on the next connection.
            del self._tasks[task.itt]
            self.stats_answered += 1
            self._complete_error(task, CommandError(
                f"{self._what(task)} failed in target {self.target}: iSCSI service response "
                f"0x{pdu.response:02x} (target failure); the command may be retried"))
            return
        residual = pdu.residual_count if pdu.underflow else (
            -pdu.residual_count if pdu.overflow else 0)
        bidi_residual = pdu.bidi_residual_count if pdu.bidi_underflow else (
            -pdu.bidi_residual_count if pdu.bidi_overflow else 0)
        sense = b""
        if pdu.status == ScsiStatus.CHECK_CONDITION:
            try:
                sense = pdu.sense()
            except PDUFormatError as exc:
                # The PDU names the lengths, not who sent it or for which command.
                raise RemoteProtocolError(
                    f"target {self.target} sent a malformed SCSI Response for "
                    f"{self._what(task)}: {exc}") from None
        self._complete(task, pdu.status, sense, residual, bidi_residual)

    def _on_r2t(self, pdu: P.R2T) -> None:
        # Several per write: the checks that pass are kept cheap (an unchanged window is
        # not recomputed, as in data_in_placed).
        task = self._tasks.get(pdu.itt) or self._task_for(pdu.itt, "R2T")
        if pdu.exp_cmd_sn != self.exp_cmd_sn or pdu.max_cmd_sn != self.max_cmd_sn:
            self._window(pdu.exp_cmd_sn, pdu.max_cmd_sn)
        offset, length = pdu.buffer_offset, pdu.desired_data_transfer_length
        end = offset + length
        if task.data_out is None or end > task.out_len or length == 0:
            raise RemoteProtocolError(
                f"target {self.target} sent an R2T for bytes {offset}..{end} of "
                f"{self._what(task)}, which writes {task.out_len} bytes")
        if pdu.ttt == P.RESERVED_TAG:
            raise RemoteProtocolError(f"target {self.target} sent an R2T with TTT 0xffffffff")
        # Each R2T is served at once, so a target that asks beyond the rules would make us
        # send without bound (an R2T storm: megabytes of Data-Out for a 4 KiB write). The
        # rules of §11.8, §13.14, §13.17 and §13.19, checked per R2T (not per command): any
        # breach is the target's protocol error, and at ERL 0 the connection is dropped and
        # the command re-issued on the next one.
        params = self.params
        state = task.r2t
        if state is None:
            state = task.r2t = _R2TState(task.unsolicited, params.data_sequence_in_order)
        problem = None
        # A bidirectional command's R2Ts are numbered with its Data-In (§11.7.4), which out of
        # order may come in any order: then the R2TSN must be one not taken yet.
        unordered_bidi = not self._in_order and task.in_len
        if unordered_bidi and task.sns is not None and task.sns.overlap(
                pdu.r2t_sn, pdu.r2t_sn + 1):
            problem = (f"R2TSN {pdu.r2t_sn}, a number a Data-In or R2T of the command already "
                       "had (one sequence for both, §11.7.4)")
        elif not unordered_bidi and pdu.r2t_sn != task.data_sn:
            problem = (f"R2TSN {pdu.r2t_sn} where {task.data_sn} was due (a lost or repeated "
                       "R2T, §11.8.2)")
        elif length > params.max_burst_length:
            problem = (f"{length} bytes in one R2T, more than MaxBurstLength "
                       f"{params.max_burst_length} (§11.8.4)")
        elif params.data_sequence_in_order and offset < state.next_offset:
            problem = (f"bytes {offset}..{end} again, below offset {state.next_offset} that was "
                       "already sent or asked for (DataSequenceInOrder=Yes, §13.19)")
        elif state.asked is not None and (seen := state.asked.overlap(offset, end)):
            # At ERL 0 a range is never asked twice: asking again is recovery R2T (§7.2.1,
            # ERL 1 and up), which we do not negotiate.
            problem = (f"bytes {offset}..{end} again, overlapping bytes {seen[0]}..{seen[1]} "
                       "already sent or asked for (a recovery R2T, which ErrorRecoveryLevel 0 "
                       "never allows, §7.2.1)")
        elif state.requested + length > task.out_len:
            problem = (f"{state.requested + length} bytes in all, more than the "
                       f"{task.out_len} the command writes")
        elif state.sequences:
            # An R2T is outstanding until its last Data-Out has gone out (§13.17); a target
            # that waits for it, as it must with MaxOutstandingR2T=1, finds it sent. A task's
            # frames leave the queue in order and the answers to R2Ts are its last ones: of
            # those, all but the task's unsent frames are out. (None answered yet: none is.)
            out = state.queued - min(task.unsent_frames, state.queued)
            pending = [end for end in state.sequences if end > out]
            if len(pending) >= params.max_outstanding_r2t:
                problem = (f"an R2T while {len(pending)} were outstanding, more than "
                           f"MaxOutstandingR2T={params.max_outstanding_r2t} (§13.17)")
            state.sequences = pending
        if problem is not None:
            raise RemoteProtocolError(
                f"target {self.target} broke the R2T rules for {self._what(task)}: it asked "
                f"for {problem}; dropping the connection")
        if unordered_bidi:
            self._note_sn(task, pdu.r2t_sn)
        task.data_sn = (task.data_sn + 1) & _MASK
        state.next_offset = max(state.next_offset, end)
        state.requested += length
        if state.asked is not None and state.asked.add(offset, end) > MAX_DATA_IN_RANGES:
            raise RemoteProtocolError(
                f"target {self.target} scattered its R2Ts for {self._what(task)} over more "
                f"than {MAX_DATA_IN_RANGES} separate ranges (the last for bytes {offset}..{end}); "
                "dropping the connection")
        unsent = task.unsent_frames
        self._send_data_out(task, offset, length, pdu.ttt)
        state.queued += task.unsent_frames - unsent
        state.sequences.append(state.queued)

    def _on_nop_in(self, pdu: P.NopIn) -> None:
        self._window(pdu.exp_cmd_sn, pdu.max_cmd_sn)
        if pdu.itt != P.RESERVED_TAG:
            # The answer to our ping (§11.19): it carries a StatSN that is acknowledged.
            self._ack(pdu.stat_sn)
            control = self._controls.pop(pdu.itt, None)
            if control is None or control.kind is not P.Opcode.NOP_OUT:
                raise RemoteProtocolError(
                    f"target {self.target} answered a NOP-Out 0x{pdu.itt:08x} we never sent")
            if pdu.itt == self._live.ping_itt:
                self._live.ping_itt = None
            # receive_pdu() noted the time of this answer as the last progress.
            self.counters.nop_rtt.observe(max(0.0, self._last_progress - control.sent))
            if not control.expired:
                control.on_done(pdu)
            return
        if pdu.ttt != P.RESERVED_TAG:
            # The target pings us: answer with its TTT, ITT reserved (§11.18.2). Answers it
            # does not read pile up here; past a bound that is its fault, not a queue to grow.
            if self._ping_answers.unsent_frames >= MAX_UNSENT_PING_ANSWERS:
                raise RemoteProtocolError(
                    f"target {self.target} sent more than {MAX_UNSENT_PING_ANSWERS} NOP-In "
                    "pings without reading our answers (RFC 7143 §11.19): a ping flood; "
                    "dropping the connection")
            self._queue(P.NopOut(immediate=True, lun=pdu.lun, itt=P.RESERVED_TAG, ttt=pdu.ttt,
                                 cmd_sn=self.cmd_sn, exp_stat_sn=self.exp_stat_sn),
                        task=self._ping_answers)

    def _on_tmf_response(self, pdu: P.TaskMgmtResponse) -> None:
        self._ack(pdu.stat_sn)
        self._window(pdu.exp_cmd_sn, pdu.max_cmd_sn)
        control = self._controls.pop(pdu.itt, None)
        if control is None or control.kind is not P.Opcode.TASK_MGMT_REQUEST:
            raise RemoteProtocolError(
                f"target {self.target} answered a task management request 0x{pdu.itt:08x} "
                "we never sent")
        if pdu.response in (P.TMResponse.COMPLETE, P.TMResponse.TASK_DOES_NOT_EXIST):
            # The target sends no status for the tasks a TMF terminates (§4.2.3.3, §11.6.1):
            # complete them here so nobody waits forever.
            function = control.function
            why = f"aborted by {function.name if function else 'task management'}"
            if control.ref_task is not None:
                task = control.ref_task
                if task.state is not TaskState.DONE and not (
                        pdu.response == P.TMResponse.TASK_DOES_NOT_EXIST
                        and task in self._deadlines.expired):
                    # "Task does not exist" before the task's status does not say the target
                    # let go of it: tgtd holds a write in its iSCSI layer until the data is
                    # in, where ABORT TASK does not look, and answers it later. abort()'s
                    # escalation goes on (LOGICAL UNIT RESET next), as open-iscsi's does;
                    # else that status would end the connection, an answer to no command.
                    self._tasks.pop(task.itt, None)
                    self._complete_error(task, TaskAborted(f"{self._what(task)} {why}"))
            elif function in (P.TMFunction.ABORT_TASK_SET, P.TMFunction.CLEAR_TASK_SET,
                              P.TMFunction.LOGICAL_UNIT_RESET):
                self._terminate(lambda t: t.lun == control.lun, control.cmd_sn, why)
            elif function in (P.TMFunction.TARGET_WARM_RESET, P.TMFunction.TARGET_COLD_RESET):
                self._terminate(lambda t: True, control.cmd_sn, why)
        if not control.expired:
            control.on_done(pdu)

    def _terminate(self, match: Callable[[Task], bool], before: int, why: str) -> None:
        # Only commands sent before the TMF (CmdSN below the one it carried) are affected:
        # the target executes and answers those that arrived after it (§4.2.3.3, §11.5).
        for task in [t for t in self._tasks.values()
                     if match(t) and serial.lt(t.cmd_sn, before)]:
            del self._tasks[task.itt]
            self._complete_error(task, TaskAborted(f"{self._what(task)} {why}"))

    def _on_text_response(self, pdu: P.TextResponse) -> None:
        self._ack(pdu.stat_sn)
        self._window(pdu.exp_cmd_sn, pdu.max_cmd_sn)
        control = self._controls.get(pdu.itt)
        if control is None or control.kind is not P.Opcode.TEXT_REQUEST:
            raise RemoteProtocolError(
                f"target {self.target} sent a Text Response for 0x{pdu.itt:08x}, which is not "
                "a text request of ours")
        if control.expired:
            # We gave up on it (its deadline passed): drop the rest of the exchange.
            del self._controls[pdu.itt]
            return
        control.text += pdu.data
        control.responses += 1
        if len(control.text) > MAX_TEXT_EXCHANGE:
            raise RemoteProtocolError(
                f"target {self.target} sent more than {MAX_TEXT_EXCHANGE >> 20} MiB of text in "
                "one exchange")
        if control.responses > MAX_TEXT_RESPONSES:
            raise RemoteProtocolError(
                f"target {self.target} sent more than {MAX_TEXT_RESPONSES} Text Responses to "
                f"one Text Request ({len(control.text)} bytes of text in all) without ending "
                "the answer (F bit, RFC 7143 §11.11.1)")
        if not pdu.final or pdu.cont:
            # More to come: ask for it with an empty Text Request echoing the TTT (§11.11.4).
            if pdu.ttt == P.RESERVED_TAG:
                raise RemoteProtocolError(
                    f"target {self.target} sent a partial Text Response with TTT 0xffffffff")
            self._send_text(pdu.itt, b"", pdu.ttt)
            return
        del self._controls[pdu.itt]
        self._renegotiation_requested = False
        control.on_done(P.TextResponse(final=True, itt=pdu.itt, ttt=pdu.ttt, stat_sn=pdu.stat_sn,
                                       exp_cmd_sn=pdu.exp_cmd_sn, max_cmd_sn=pdu.max_cmd_sn,
                                       data=bytes(control.text)))

    def _on_logout_response(self, pdu: P.LogoutResponse) -> None:
        self._ack(pdu.stat_sn)
        self._window(pdu.exp_cmd_sn, pdu.max_cmd_sn)
        control = self._controls.pop(pdu.itt, None)
        if control is None or control.kind is not P.Opcode.LOGOUT_REQUEST:
            raise RemoteProtocolError(
                f"target {self.target} sent a Logout Response 0x{pdu.itt:08x} we never asked for")
        self._events.append(Event(EventKind.LOGGED_OUT, seconds=pdu.time2wait))
        if not control.expired:
            control.on_done(pdu)

    def _on_async(self, pdu: P.AsyncMessage) -> None:
        self._ack(pdu.stat_sn)
        self._window(pdu.exp_cmd_sn, pdu.max_cmd_sn)
        event = pdu.async_event
        lun = P.lun_from_wire(pdu.lun)
        if event == P.AsyncEvent.SCSI_ASYNC_EVENT:
            self._events.append(Event(EventKind.SCSI_EVENT, lun=lun, sense=pdu.sense()))
        elif event == P.AsyncEvent.LOGOUT_REQUEST:
            # Once per connection: the transport logs out and in again on the first.
            if not self._logout_requested:
                self._logout_requested = True
                self._events.append(Event(EventKind.LOGOUT_REQUESTED, seconds=pdu.parameter3))
        elif event in (P.AsyncEvent.CONNECTION_DROP, P.AsyncEvent.ALL_CONNECTIONS_DROP):
            self._events.append(Event(EventKind.CONNECTION_DROP, seconds=pdu.parameter2))
        elif event == P.AsyncEvent.NEGOTIATION_REQUEST:
            # One at a time: asked again before a text exchange has answered the last one,
            # the target gets no second exchange.
            if not self._renegotiation_requested:
                self._renegotiation_requested = True
                self._events.append(Event(EventKind.RENEGOTIATE, seconds=pdu.parameter3))
        elif event == P.AsyncEvent.TASK_TERMINATION:
            self._events.append(Event(EventKind.TASKS_TERMINATING))
        else:
            self._events.append(Event(EventKind.VENDOR, detail=f"AsyncEvent {event}"))

    def _on_reject(self, pdu: P.Reject) -> None:
        self._ack(pdu.stat_sn)
        self._window(pdu.exp_cmd_sn, pdu.max_cmd_sn)
        try:
            reason = P.RejectReason(pdu.reason).name.lower().replace("_", " ")
        except ValueError:
            reason = f"reason 0x{pdu.reason:02x}"
        header = pdu.rejected_header()
        itt = getattr(header, "itt", None) if header is not None else None
        if isinstance(header, P.ScsiCommand) and itt in self._tasks:
            task = self._tasks[itt]
            if pdu.reason in _RESENDABLE:
                # The target discarded the command without executing it, and "the original
                # PDU can be re-sent" (§11.17.1): for a data digest error in its immediate
                # data (§7.8) that is the only recovery, and the command must run. At ERL 0
                # sending it again means a new connection (§7.1.4: LIO closes this one
                # itself); the task stays in the table and is re-issued after the
                # reinstatement. Failing it instead would spend one of the SCSI layer's
                # retries and, on a target that keeps the connection, leave a CmdSN gap.
                raise RemoteProtocolError(
                    f"target {self.target} rejected {self._what(task)} ({reason}); "
                    "reconnecting to send it again")
            # Sending it again would be rejected again: the command fails. Its CmdSN was
            # not received (§7.3): the gap holds back every later command until it is
            # plugged, which an ABORT TASK naming it does (§11.5.1, RefCmdSN); its answer
            # concerns nobody.
            del self._tasks[itt]
            self._task_mgmt(P.TMFunction.ABORT_TASK, task.lun, _ignore, ref_task=task)
            self._complete_error(task, CommandError(
                f"target {self.target} rejected {self._what(task)}: {reason}"))
            return
        if isinstance(header, (P.NopOut, P.TaskMgmtRequest, P.TextRequest)) and \
                itt in self._controls:
            control = self._controls.pop(itt)
            if itt == self._live.ping_itt:
                self._live.ping_itt = None
            if isinstance(header, P.TextRequest):
                self._renegotiation_requested = False
            if not control.expired:
                control.on_done(CommandError(
                    f"target {self.target} rejected our {type(header).__name__}: {reason}"))
            return
        # A rejected Data-Out, SNACK or an unidentifiable PDU: at ERL 0 the only recovery is a
        # new connection, on which the affected commands are re-issued.
        raise RemoteProtocolError(
            f"target {self.target} rejected a {type(header).__name__ if header else 'PDU'}: "
            f"{reason}")

    # ------------------------------------------------------------------------------------
    # Completion

    def _detach_frames(self, task: Task) -> None:
        """Take the task's buffers out of the send queue."""
        task.r2t = None  # its frames too
        if task.unsent_frames:
            for frame in list(self._frames):
                if frame.task is not task:
                    continue
                if frame.started or frame.handed:
                    # Partly on the wire (or maybe, before sent() tells): finish the PDU from a
                    # private copy so the framing stays intact while the caller reuses its
                    # buffer.
                    frame.bufs = [bytes(b) for b in frame.bufs]
                    frame.task = None
                else:
                    self._frames.remove(frame)
                    if frame.ahead:
                        self._ahead -= 1
            task.unsent_frames = 0

    def _release(self, task: Task) -> None:
        """Drop every reference to the task's buffers before anyone learns it completed."""
        if task.unsent_frames or task.r2t is not None:
            self._detach_frames(task)
        task.data_in = None
        task.data_out = None
        task.state = _DONE

    def _complete(self, task: Task, status: int, sense: bytes, residual: int,
                  bidi_residual: int) -> None:
        """The command got its status, by whichever route (a SCSI Response, a Data-In with
        status as a PDU or from its header's fields): the result goes to ``on_done``, once."""
        if task.sns is not None and (lost := task.sns.first_hole(task.sns.bounds[-1])):
            # Out of order, PDUs numbered 0..N-1 must all have come before the status
            # (§11.7.4): one missing is a PDU lost, as a DataSN skipped is in order.
            missing = (f"DataSN {lost[0]}" if lost[1] - lost[0] == 1
                       else f"DataSNs {lost[0]}..{lost[1] - 1}")
            raise RemoteProtocolError(
                f"target {self.target} sent the status of {self._what(task)} with {missing} "
                f"never sent, though it sent DataSN {task.sns.bounds[-1] - 1}: a PDU of the "
                "command is missing (RFC 7143 §11.7.4); dropping the connection")
        del self._tasks[task.itt]
        self.stats_answered += 1
        # GOOD with no residual says every byte of a write arrived (§11.4.5), but the target
        # can only have had what went unsolicited and what its R2Ts asked for (§13.13,
        # §13.14): a target that ends a write without asking for the rest has not written
        # it, and the write must not pass for done.
        if task.out_len and status == ScsiStatus.GOOD and not residual and (taken := (
                task.r2t.requested if task.r2t is not None else task.unsolicited)
                ) < task.out_len:
            self._complete_error(task, TransferError(
                f"target {self.target} reported {self._what(task)} done (status GOOD, no "
                f"residual) after taking only {taken} of the {task.out_len} bytes to write, "
                "without asking for the rest (RFC 7143 §11.4.5, §13.14): the write is "
                "incomplete", expected=task.out_len, transferred=taken, residual=0))
            return
        # Out of order, data_in_length (bytes received) may only stand for the bytes from 0
        # up to it when they are all there: a hole would hand its stale bytes on as data.
        if task.ranges is not None and (hole := task.ranges.first_hole(task.received)):
            self._complete_error(task, TransferError(
                f"target {self.target} ended {self._what(task)} (status 0x{status:02x}) with "
                f"bytes {hole[0]}..{hole[1]} of the read never sent, though it sent "
                f"{task.received} bytes in all (some beyond them): the read has a hole and "
                "fails rather than return stale bytes", expected=task.in_len,
                transferred=task.received, residual=residual))
            return
        # _release(), inlined: this runs once per command.
        if task.unsent_frames or task.r2t is not None:
            self._detach_frames(task)
        task.data_in = None
        task.data_out = None
        task.state = _DONE
        on_done = task.on_done
        if on_done is not None:
            task.on_done = None
            # CommandResult's generated __new__ is a Python function; building the tuple
            # directly skips that frame (the fields are in declaration order).
            on_done(_new_tuple(CommandResult, (status, sense, residual, bidi_residual,
                                               task.received)))

    def _complete_error(self, task: Task, error: ISCSIError) -> None:
        ending = self._deadlines.expired.pop(task, None) if self._deadlines.expired else None
        if ending is not None:
            # abort() is ending it (per-command deadline, the kernel's abort): its error wins
            # over the TMF's generic "aborted", which says how a deadline's ended.
            error = CommandTimeout(f"{ending}; it was aborted") if type(ending) is \
                CommandTimeout and isinstance(error, TaskAborted) else ending
        self._release(task)
        on_done, task.on_done = task.on_done, None
        if on_done is not None:
            on_done(error)

    def _what(self, task: Task) -> str:
        return f"command 0x{task.cdb[0]:02x} (task 0x{task.itt:08x}, LUN {task.lun})"


def _ignore(_: P.PDU | ISCSIError) -> None:
    return None


def _nothing() -> None:
    return None


def _tmf_outcome(result: P.PDU | ISCSIError) -> str:
    """How a task management request ended, in words, for a log line or an error."""
    if isinstance(result, P.TaskMgmtResponse):
        try:
            return "the target answered " + P.TMResponse(result.response).name.replace(
                "_", " ").lower()
        except ValueError:
            return f"the target answered response {result.response}"
    return str(result)


def _total(views: Buffers) -> int:
    if len(views) == 1:
        return len(views[0])
    return sum(len(v) for v in views)


def _byte_views(views: Buffers) -> Buffers:
    """The views as flat byte views (``len`` counts bytes), without copying."""
    if len(views) == 1:
        v = views[0]
        if v.format == "B" and v.ndim == 1:
            return views
    for v in views:
        if v.format != "B" or v.ndim != 1:
            return [memoryview(v).cast("B") for v in views]
    return views


def _slice(views: Buffers, offset: int, length: int) -> list[memoryview]:
    """The views covering ``length`` bytes at ``offset`` of a scatter/gather list."""
    if len(views) == 1:
        return [views[0][offset : offset + length]]
    out: list[memoryview] = []
    for view in views:
        n = len(view)
        if offset >= n:
            offset -= n
            continue
        take = min(n - offset, length)
        out.append(view[offset : offset + take])
        length -= take
        offset = 0
        if not length:
            break
    return out


def _chunks(views: Buffers, offset: int, length: int, size: int) -> list[list[Buffer]]:
    """The ``length`` bytes at ``offset`` of a scatter/gather list cut into pieces of ``size``
    (the last one shorter), each as the list of views covering it: one walk through the
    views, where a :func:`_slice` per piece would walk from the first view each time."""
    if len(views) == 1:
        view = views[0]
        return [[view[o : o + size if o + size < offset + length else offset + length]]
                for o in range(offset, offset + length, size)]
    out: list[list[Buffer]] = []
    piece: list[Buffer] = []
    room = size
    for view in views:
        n = len(view)
        if offset >= n:
            offset -= n
            continue
        while offset < n and length:
            take = min(n - offset, room, length)
            piece.append(view[offset : offset + take])
            offset += take
            length -= take
            room -= take
            if not room or not length:
                out.append(piece)
                piece = []
                room = size
        if not length:
            break
        offset = 0
    return out


def _scatter(views: Buffers, offset: int, data: Buffer) -> None:
    """Copy ``data`` into a scatter/gather list at ``offset``."""
    pos = 0
    for dest in _slice(views, offset, len(data)):
        n = len(dest)
        dest[:] = memoryview(data)[pos : pos + n]
        pos += n
