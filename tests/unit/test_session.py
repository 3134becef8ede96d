"""ConnectionCore, the sans-I/O Full Feature Phase (RFC 7143 §4.2, §7, §11).

The tests play the target by hand (:class:`Harness`): they read what the core queued, decode
it, and hand back target PDUs through a :class:`~initiator.reader.PDUReader` whose DataSink is
the core, as the transport does. Time is the ``now`` argument; nothing sleeps. The end of the
file runs the same core against the in-memory fake target for whole read/write exchanges.
"""

from __future__ import annotations

import array
import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from initiator import pdu as P
from initiator import serial
from initiator.command import CommandResult, ScsiStatus
from initiator.errors import (
    CommandError,
    CommandTimeout,
    ConnectionFailed,
    ISCSIError,
    LocalProtocolError,
    RemoteProtocolError,
    TaskAborted,
    TransferError,
)
from initiator.keys import NegotiationSettings
from initiator.login import LoginMachine, LoginSuccess
from initiator.reader import PDUReader
from initiator.session import (
    MAX_DATA_IN_RANGES,
    MAX_TEXT_RESPONSES,
    ConnectionCore,
    Event,
    EventKind,
    Task,
    TaskState,
    TransferParameters,
)
from tests.support.fake_target import (
    CHECK_CONDITION,
    FakeTarget,
    Hostility,
    Loopback,
    RamDisk,
    TargetNode,
    cdb_inquiry,
    cdb_read10,
    cdb_read16,
    cdb_read_capacity10,
    cdb_read_capacity16,
    cdb_test_unit_ready,
    cdb_write10,
    cdb_write16,
    sense_key_asc,
)

M = 0xFFFFFFFF


class Window(TypedDict):
    exp_cmd_sn: int
    max_cmd_sn: int


class Numbers(Window):
    stat_sn: int

READ = cdb_read10(0, 8)
WRITE = cdb_write10(0, 8)


def views(*parts: bytearray) -> list[memoryview]:
    return [memoryview(p) for p in parts]


class Harness:
    """A ConnectionCore and a hand-played target."""

    def __init__(self, params: TransferParameters | None = None, *, cmd_sn: int = 1,
                 window: int = 32, exp_stat_sn: int = 100, now: float = 0.0,
                 noop_interval: float = 0.0, noop_timeout: float = 5.0,
                 command_timeout: float = 0.0, tmf_timeout: float = 15.0) -> None:
        self.params = params or TransferParameters()
        self.core = ConnectionCore(
            self.params, cmd_sn=cmd_sn, exp_stat_sn=exp_stat_sn, exp_cmd_sn=cmd_sn,
            max_cmd_sn=(cmd_sn + window - 1) & M, target="iqn.test:t", now=now,
            noop_interval=noop_interval, noop_timeout=noop_timeout,
            command_timeout=command_timeout, tmf_timeout=tmf_timeout)
        self.stat_sn = exp_stat_sn
        self.reader = PDUReader(header_digest=self.params.header_digest,
                                data_digest=self.params.data_digest,
                                max_data_segment_length=self.params.max_recv_data_segment_length,
                                sink=self.core)
        self.results: dict[int, CommandResult | ISCSIError] = {}
        self.order: list[int] = []
        self.hold_max: Callable[[], int] | None = None
        self.data_sns: dict[int, int] = {}

    # -- initiator side ---------------------------------------------------------------------

    def submit(self, cdb: bytes = READ, *, data_out: Sequence[memoryview] | None = None,
               data_in: Sequence[memoryview] | None = None, lun: int = 0) -> Task:
        holder: list[Task] = []

        def done(result: CommandResult | ISCSIError) -> None:
            task = holder[0]
            assert id(task) not in self.results, "on_done ran twice"
            self.results[id(task)] = result
            self.order.append(id(task))

        task = Task(lun, cdb, data_out, data_in, done)
        holder.append(task)
        self.core.submit(task)
        return task

    def result(self, task: Task) -> CommandResult | ISCSIError | None:
        return self.results.get(id(task))

    def ok(self, task: Task) -> CommandResult:
        result = self.result(task)
        assert isinstance(result, CommandResult), result
        return result

    def wire(self) -> bytes:
        """Everything queued, as one byte string, marked sent."""
        core = self.core
        out = bytearray()
        while core.wants_to_send:
            bufs = core.send_buffers()
            data = b"".join(bytes(b) for b in bufs)
            core.sent(len(data))
            out += data
        return bytes(out)

    def sent(self) -> list[P.PDU]:
        reader = PDUReader(header_digest=self.params.header_digest,
                           data_digest=self.params.data_digest,
                           max_data_segment_length=1 << 24)
        return reader.feed(self.wire())

    # -- target side --------------------------------------------------------------------------

    def numbers(self, *, advance: bool = True, max_cmd_sn: int | None = None) -> Numbers:
        sn = self.stat_sn
        if advance:
            self.stat_sn = (sn + 1) & M
        window = self.window()
        return {"stat_sn": sn, "exp_cmd_sn": window["exp_cmd_sn"],
                "max_cmd_sn": window["max_cmd_sn"] if max_cmd_sn is None else max_cmd_sn}

    def window(self) -> Window:
        """ExpCmdSN: the target saw everything sent; MaxCmdSN: unchanged (or ``hold_max``)."""
        hold = self.hold_max
        return {"exp_cmd_sn": self.core.cmd_sn,
                "max_cmd_sn": self.core.max_cmd_sn if hold is None else hold()}

    def deliver(self, *pdus: P.PDU, now: float = 0.0, chunk: int | None = None) -> None:
        raw = b"".join(P.encode(p, header_digest=self.params.header_digest,
                                data_digest=self.params.data_digest) for p in pdus)
        step = chunk or len(raw) or 1
        for pos in range(0, len(raw), step):
            for pdu in self.reader.feed(raw[pos : pos + step]):
                self.core.receive_pdu(pdu, now)

    def response(self, task: Task, status: int = 0, **kw: Any) -> P.ScsiResponse:
        return P.ScsiResponse(itt=task.itt, status=status, **{**self.numbers(), **kw})

    def data_in(self, task: Task, offset: int, data: bytes, *, status: bool = False,
                data_sn: int | None = None, **kw: Any) -> P.DataIn:
        if data_sn is None:
            # Numbered as a target numbers them: 0, 1, 2... per command (§11.7.5).
            data_sn = self.data_sns.get(task.itt, 0)
        self.data_sns[task.itt] = data_sn + 1
        numbers = self.numbers(advance=status)
        if not status:
            numbers["stat_sn"] = 0
        return P.DataIn(itt=task.itt, buffer_offset=offset, data=data, data_sn=data_sn,
                        final=status or kw.pop("final", False), status_present=status,
                        **numbers, **kw)


def exports(buf: bytearray) -> bool:
    """True while any memoryview of ``buf`` is alive (a bytearray cannot resize then)."""
    try:
        buf.append(0)
    except BufferError:
        return True
    del buf[-1]
    return False


# --------------------------------------------------------------------------------------------
# Sending commands and the command window


def test_read_command_fields() -> None:
    h = Harness(cmd_sn=41, exp_stat_sn=7)
    buf = bytearray(4096)
    task = h.submit(cdb_read10(3, 8), data_in=views(buf), lun=5)
    (cmd,) = h.sent()
    assert isinstance(cmd, P.ScsiCommand)
    assert cmd.read and not cmd.write and cmd.final and not cmd.immediate
    assert cmd.expected_data_transfer_length == 4096
    assert (cmd.cmd_sn, cmd.exp_stat_sn, cmd.itt) == (41, 7, task.itt)
    assert cmd.lun == P.lun_to_wire(5) and cmd.cdb[:10] == cdb_read10(3, 8)
    assert cmd.itt != P.RESERVED_TAG and task.state is TaskState.ACTIVE
    assert h.core.cmd_sn == 42 and h.core.in_flight == 1


def test_non_data_command() -> None:
    h = Harness()
    h.submit(cdb_test_unit_ready())
    (cmd,) = h.sent()
    assert isinstance(cmd, P.ScsiCommand)
    assert not cmd.read and not cmd.write and cmd.final
    assert cmd.expected_data_transfer_length == 0 and cmd.data == b""


def test_bidirectional_command_carries_read_length() -> None:
    h = Harness(TransferParameters(immediate_data=False))
    task = h.submit(cdb_write10(0, 1), data_out=views(bytearray(512)),
                    data_in=views(bytearray(300)))
    (cmd,) = h.sent()
    assert isinstance(cmd, P.ScsiCommand)
    assert cmd.read and cmd.write
    assert cmd.expected_data_transfer_length == 512 and cmd.bidi_read_length == 300
    h.deliver(P.R2T(itt=task.itt, ttt=1, r2t_sn=0, buffer_offset=0,  # the write's data, asked
                    desired_data_transfer_length=512, **h.numbers(advance=False)))  # for, sent
    h.sent()
    h.deliver(h.response(task, bidi_underflow=True, bidi_residual_count=44))
    assert h.ok(task).bidi_residual == 44


def test_itts_are_unique_and_never_reserved() -> None:
    h = Harness()
    h.core._next_itt = M - 1
    tasks = [h.submit() for _ in range(4)]
    itts = [t.itt for t in tasks]
    assert len(set(itts)) == 4 and P.RESERVED_TAG not in itts
    assert itts == [M - 1, 0, 1, 2]


START_POINTS = [0, 1, 1000, M - 3, M - 1, M, 0x7FFFFFFF, 0x80000000]


@pytest.mark.parametrize("start", START_POINTS)
@pytest.mark.parametrize("window", [1, 2, 5])
def test_window_with_serial_wraparound(start: int, window: int) -> None:
    h = Harness(cmd_sn=start, window=window)
    tasks = [h.submit() for _ in range(window + 3)]
    cmds = [p for p in h.sent() if isinstance(p, P.ScsiCommand)]
    assert [c.cmd_sn for c in cmds] == [(start + i) & M for i in range(window)]
    assert [t.state for t in tasks].count(TaskState.QUEUED) == 3
    assert h.core.in_flight == window + 3
    # The target opens the window by two: exactly two more go, in submission order.
    h.deliver(P.NopIn(exp_cmd_sn=(start + window) & M,
                      max_cmd_sn=(start + window + 1) & M))
    more = [p for p in h.sent() if isinstance(p, P.ScsiCommand)]
    assert [c.cmd_sn for c in more] == [(start + window + i) & M for i in range(2)]
    assert [c.itt for c in more] == [t.itt for t in tasks[window : window + 2]]
    assert tasks[-1].state is TaskState.QUEUED


def test_closed_window_queues_everything_until_it_opens() -> None:
    h = Harness(cmd_sn=10, window=0)  # MaxCmdSN = ExpCmdSN - 1: closed
    tasks = [h.submit() for _ in range(3)]
    assert h.sent() == [] and all(t.state is TaskState.QUEUED for t in tasks)
    h.deliver(P.NopIn(exp_cmd_sn=10, max_cmd_sn=20))
    cmds = h.sent()
    assert [getattr(c, "cmd_sn", None) for c in cmds] == [10, 11, 12]


def test_new_commands_wait_behind_queued_ones() -> None:
    h = Harness(cmd_sn=5, window=1)
    first, second = h.submit(), h.submit()
    h.sent()
    h.deliver(P.NopIn(exp_cmd_sn=6, max_cmd_sn=6))
    third = h.submit()
    sent = [p.itt for p in h.sent() if isinstance(p, P.ScsiCommand)]
    assert sent == [second.itt]
    assert third.state is TaskState.QUEUED and first.state is TaskState.ACTIVE


@pytest.mark.parametrize(("exp", "max_", "expect_exp", "expect_max"), [
    (10, 30, 10, 30),       # larger MaxCmdSN: taken
    (8, 25, 10, 25),        # stale ExpCmdSN ignored, larger MaxCmdSN taken
    (12, 15, 12, 20),       # smaller MaxCmdSN ignored (stale), larger ExpCmdSN taken
    (30, 10, 10, 20),       # MaxCmdSN < ExpCmdSN - 1: invalid, ignored entirely
    (21, 20, 21, 20),       # MaxCmdSN = ExpCmdSN - 1: valid, window closed
])
def test_window_updates(exp: int, max_: int, expect_exp: int, expect_max: int) -> None:
    h = Harness(cmd_sn=10, window=11)
    # CmdSN 10..20 sent: an ExpCmdSN up to 21 acknowledges commands we did send (beyond
    # that it is the target's protocol error: test_expcmdsn_beyond_what_we_sent...).
    for _ in range(11):
        h.submit()
    h.sent()
    assert (h.core.cmd_sn, h.core.exp_cmd_sn, h.core.max_cmd_sn) == (21, 10, 20)
    h.deliver(P.NopIn(exp_cmd_sn=exp, max_cmd_sn=max_))
    assert (h.core.exp_cmd_sn, h.core.max_cmd_sn) == (expect_exp, expect_max)


@pytest.mark.parametrize(("cmd_sn", "sent", "exp"), [
    (10, 0, 11), (10, 3, 14), (M - 1, 1, 1), (M - 1, 0, 0)])
def test_expcmdsn_beyond_what_we_sent_is_a_protocol_error(cmd_sn: int, sent: int,
                                                          exp: int) -> None:
    h = Harness(cmd_sn=cmd_sn, window=8)
    for _ in range(sent):
        h.submit()
    h.sent()
    with pytest.raises(RemoteProtocolError, match="counts commands we never sent"):
        h.deliver(P.NopIn(exp_cmd_sn=exp, max_cmd_sn=exp + 7))


def test_stale_window_update_across_the_wrap() -> None:
    h = Harness(cmd_sn=M - 1, window=4)   # window M-1, M, 0, 1
    h.submit(), h.submit()
    h.sent()                              # CmdSN M-1 and M: ExpCmdSN 0 acknowledges both
    h.deliver(P.NopIn(exp_cmd_sn=M - 1, max_cmd_sn=M))  # stale: smaller in serial terms
    assert h.core.max_cmd_sn == 1
    h.deliver(P.NopIn(exp_cmd_sn=0, max_cmd_sn=5))
    assert (h.core.exp_cmd_sn, h.core.max_cmd_sn) == (0, 5)


def test_every_status_pdu_updates_the_window_and_expstatsn() -> None:
    h = Harness(cmd_sn=1, window=1)
    a, b = h.submit(), h.submit()
    h.sent()
    assert b.state is TaskState.QUEUED
    h.deliver(h.response(a, max_cmd_sn=2))
    assert b.itt != P.RESERVED_TAG  # sent
    (cmd,) = h.sent()
    assert isinstance(cmd, P.ScsiCommand) and cmd.exp_stat_sn == 101


def test_expstatsn_only_moves_forward() -> None:
    h = Harness(exp_stat_sn=50)
    a, b = h.submit(), h.submit()
    h.sent()
    h.deliver(P.ScsiResponse(itt=b.itt, stat_sn=60, **h.window()))
    h.deliver(P.ScsiResponse(itt=a.itt, stat_sn=55, **h.window()))
    assert h.core.exp_stat_sn == 61


# --------------------------------------------------------------------------------------------
# Task states x task PDUs


def _task_pdu(kind: str, h: Harness, itt: int) -> P.PDU:
    if kind == "data_in":
        return P.DataIn(itt=itt, data=bytes(512), buffer_offset=0, **h.window())
    if kind == "data_in_status":
        return P.DataIn(itt=itt, data=bytes(512), buffer_offset=0, final=True,
                        status_present=True, **h.numbers())
    if kind == "data_in_status_no_data":
        return P.DataIn(itt=itt, final=True, status_present=True, **h.numbers())
    if kind == "scsi_response":
        return P.ScsiResponse(itt=itt, **h.numbers())
    if kind == "r2t":
        return P.R2T(itt=itt, ttt=0x77, buffer_offset=0, desired_data_transfer_length=512,
                     **h.numbers(advance=False))
    raise AssertionError(kind)


TASK_PDUS = ["data_in", "data_in_status", "data_in_status_no_data", "scsi_response", "r2t"]
STATES = ["queued", "active_read", "active_write", "done"]
# What becomes of the task: "error" (the connection must go), "active", "done".
OUTCOME: dict[tuple[str, str], str] = {
    **{("queued", k): "error" for k in TASK_PDUS},
    **{("done", k): "error" for k in TASK_PDUS},
    ("active_read", "data_in"): "active",
    ("active_read", "data_in_status"): "done",
    ("active_read", "data_in_status_no_data"): "done",
    ("active_read", "scsi_response"): "done",
    ("active_read", "r2t"): "error",
    ("active_write", "data_in"): "error",
    ("active_write", "data_in_status"): "error",
    # GOOD for a write none of whose data was asked for: done, but incomplete.
    ("active_write", "data_in_status_no_data"): "incomplete",
    ("active_write", "scsi_response"): "incomplete",
    ("active_write", "r2t"): "active",
}


def _task_in_state(h: Harness, state: str) -> tuple[Task, int]:
    """A task in ``state`` and the ITT a target would use for it."""
    if state == "queued":
        h.core.max_cmd_sn = (h.core.cmd_sn - 1) & M  # close the window
        task = h.submit(data_in=views(bytearray(4096)))
        return task, h.core._next_itt  # the tag it would get; nobody has it yet
    if state == "active_write":
        task = h.submit(WRITE, data_out=views(bytearray(4096)))
    else:
        task = h.submit(READ, data_in=views(bytearray(4096)))
    h.sent()
    if state == "done":
        itt = task.itt
        h.deliver(h.response(task))
        return task, itt
    return task, task.itt


@pytest.mark.parametrize("kind", TASK_PDUS)
@pytest.mark.parametrize("state", STATES)
def test_task_state_by_inbound_pdu(state: str, kind: str) -> None:
    h = Harness(TransferParameters(immediate_data=False))
    task, itt = _task_in_state(h, state)
    done_before = h.result(task)
    expected = OUTCOME[(state, kind)]
    if expected == "error":
        with pytest.raises(RemoteProtocolError, match=f"0x{itt:08x}|Data-In|R2T"):
            h.deliver(_task_pdu(kind, h, itt))
        assert h.result(task) is done_before  # nothing completed by a rejected PDU
        return
    h.deliver(_task_pdu(kind, h, itt))
    if expected == "active":
        assert task.state is TaskState.ACTIVE and h.result(task) is None
        if kind == "r2t":
            (data_out,) = h.sent()
            assert isinstance(data_out, P.DataOut)
            assert (data_out.ttt, data_out.buffer_offset, len(data_out.data)) == (0x77, 0, 512)
            assert data_out.final and data_out.data_sn == 0
    elif expected == "incomplete":
        assert task.state is TaskState.DONE
        assert isinstance(h.result(task), TransferError)
        assert task.itt not in h.core._tasks
    else:
        assert task.state is TaskState.DONE
        assert isinstance(h.result(task), CommandResult)
        assert task.itt not in h.core._tasks


def test_data_in_with_status_needs_the_final_bit() -> None:
    h = Harness()
    task = h.submit(data_in=views(bytearray(512)))
    h.sent()
    with pytest.raises(RemoteProtocolError, match="F bit"):
        h.deliver(P.DataIn(itt=task.itt, status_present=True, final=False, **h.numbers()))


# --------------------------------------------------------------------------------------------
# Data-In reassembly


def _pattern(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.mark.parametrize("chunk", [None, 1, 7, 100, 3000])
@pytest.mark.parametrize("order", ["in_order", "reversed", "shuffled"])
def test_data_in_lands_by_offset_in_several_views(chunk: int | None, order: str) -> None:
    # Out of order only where the target may send it so: DataPDUInOrder=No and
    # DataSequenceInOrder=No (with both Yes, the core refuses it: test_hostile_target).
    h = Harness(None if order == "in_order" else TransferParameters(
        data_pdu_in_order=False, data_sequence_in_order=False))
    parts = [bytearray(n) for n in (100, 1, 2500, 0, 1499, 4096)]
    total = sum(len(p) for p in parts)
    task = h.submit(cdb_read10(0, 16), data_in=views(*parts))
    h.sent()
    source = _pattern(total)
    cuts = [0, 50, 101, 2000, 2601, 5000, 6000, total]
    pieces = [(a, source[a:b]) for a, b in itertools.pairwise(cuts)]
    if order == "reversed":
        pieces.reverse()
    elif order == "shuffled":
        random.Random(3).shuffle(pieces)
    pdus = [h.data_in(task, off, data, data_sn=i) for i, (off, data) in enumerate(pieces)]
    h.deliver(*pdus, h.response(task), chunk=chunk)
    assert b"".join(parts) == source
    assert h.ok(task).data_in_length == total


def test_data_in_into_non_byte_views() -> None:
    h = Harness()
    words = array.array("I", [0] * 256)   # 1024 bytes, 4-byte items
    task = h.submit(data_in=[memoryview(words)])
    h.sent()
    source = _pattern(1024, 9)
    h.deliver(h.data_in(task, 0, source[:1000]), h.data_in(task, 1000, source[1000:], status=True))
    assert words.tobytes() == source
    assert h.ok(task).data_in_length == 1024


def test_data_in_without_sink_uses_the_copy_path() -> None:
    # Out of order, as DataPDUInOrder=No allows.
    h = Harness(TransferParameters(data_pdu_in_order=False, data_sequence_in_order=False))
    buf_a, buf_b = bytearray(10), bytearray(30)
    task = h.submit(data_in=views(buf_a, buf_b))
    h.sent()
    source = _pattern(40, 4)
    h.core.receive_pdu(h.data_in(task, 5, source[5:]), 0.0)
    h.core.receive_pdu(h.data_in(task, 0, source[:5], status=True), 0.0)
    assert bytes(buf_a + buf_b) == source


OUT_OF_ORDER = TransferParameters(data_pdu_in_order=False, data_sequence_in_order=False)


@pytest.mark.parametrize("params", [
    OUT_OF_ORDER, TransferParameters(data_pdu_in_order=False),
    TransferParameters(data_sequence_in_order=False)])
@pytest.mark.parametrize("chunk", [None, 1, 48, 1000])
@pytest.mark.parametrize(("pieces", "again"), [
    ([(0, 1024), (1024, 2048)], (0, 1024)),        # a PDU repeated
    ([(2048, 4096)], (2048, 4096)),                 # the same, out of order
    ([(1024, 2048)], (1536, 2560)),                 # overlapping the end of a range
    ([(1024, 2048)], (512, 1025)),                  # overlapping its start
    ([(0, 1024), (3072, 4096)], (512, 3584)),       # spanning a hole into the next range
    ([(0, 1024), (2048, 3072)], (1000, 1100)),      # a few bytes
])
def test_out_of_order_data_in_received_twice_is_a_protocol_error(
        params: TransferParameters, chunk: int | None, pieces: list[tuple[int, int]],
        again: tuple[int, int]) -> None:
    """With DataPDUInOrder or DataSequenceInOrder No, a byte of a read sent twice was counted
    twice towards its length, so a read could complete with a hole of stale bytes. Any
    overlap is the target's protocol error, named with offset, length, task and target, on
    every path into the buffer."""
    h = Harness(params)
    buf = bytearray(4096)
    task = h.submit(data_in=views(buf))
    h.sent()
    source = _pattern(4096, 6)
    h.deliver(*(h.data_in(task, a, source[a:b]) for a, b in pieces), chunk=chunk)
    a, b = again
    with pytest.raises(RemoteProtocolError) as info:
        h.deliver(h.data_in(task, a, source[a:b]), h.response(task), chunk=chunk)
    message = str(info.value)
    assert f"at offset {a}, {b - a} bytes, overlapping bytes" in message
    assert f"task 0x{task.itt:08x}" in message and "iqn.test:t" in message
    assert h.result(task) is None


@pytest.mark.parametrize("chunk", [None, 48])
@pytest.mark.parametrize(("pieces", "residual", "hole"), [
    ([(0, 1024), (1024, 2048), (3072, 4096)], 1024, (2048, 3072)),
    ([(1024, 4096)], 1024, (0, 1024)),               # 3072 bytes, but not the first ones
    ([(0, 1024), (2048, 4096)], 1024, (1024, 2048)),  # 3072 bytes, with a hole
    ([(3072, 4096), (0, 1024)], 2048, (1024, 3072)),
    ([(0, 1024), (2048, 4096)], 0, (1024, 2048)),    # no residual claimed either
])
def test_out_of_order_data_in_with_a_hole_fails_the_read(
        chunk: int | None, pieces: list[tuple[int, int]], residual: int,
        hole: tuple[int, int]) -> None:
    """The bytes received must be 0..data_in_length: a read whose ranges leave a hole fails
    (the first hole named), whatever residual the target claims."""
    h = Harness(OUT_OF_ORDER)
    task = h.submit(data_in=views(bytearray(4096)))
    h.sent()
    source = _pattern(4096, 7)
    for via in ("response", "data_in"):
        if via == "data_in":
            h = Harness(OUT_OF_ORDER)
            task = h.submit(data_in=views(bytearray(4096)))
            h.sent()
        pdus = [h.data_in(task, a, source[a:b]) for a, b in pieces]
        status = {"underflow": True, "residual_count": residual} if residual else {}
        last = (h.response(task, **status) if via == "response" else
                h.data_in(task, 4096, b"", status=True, **status))
        h.deliver(*pdus, last, chunk=chunk)
        error = h.result(task)
        assert isinstance(error, TransferError), (via, error)
        assert f"bytes {hole[0]}..{hole[1]} of the read never sent" in str(error)
        assert "iqn.test:t" in str(error) and f"task 0x{task.itt:08x}" in str(error)
        assert not h.core._tasks


@pytest.mark.parametrize("chunk", [None, 48])
def test_out_of_order_data_in_short_but_whole_from_0_completes(chunk: int | None) -> None:
    """An honest underflow out of order: the first 3072 bytes in any order, 1024 residual."""
    h = Harness(OUT_OF_ORDER)
    buf = bytearray(4096)
    task = h.submit(data_in=views(buf))
    h.sent()
    source = _pattern(4096, 8)
    pieces = [(2048, 3072), (0, 512), (1024, 2048), (512, 1024)]
    h.deliver(*(h.data_in(task, a, source[a:b]) for a, b in pieces),
              h.response(task, underflow=True, residual_count=1024), chunk=chunk)
    result = h.ok(task)
    assert (result.data_in_length, result.residual) == (3072, 1024)
    assert buf[:3072] == source[:3072]


def test_out_of_order_data_in_in_too_many_ranges_is_a_protocol_error() -> None:
    """1-byte PDUs at every other offset make a range each: bounded, and the ranges of
    adjacent PDUs merge (filling the gaps then leaves one)."""
    h = Harness(OUT_OF_ORDER)
    size = 2 * MAX_DATA_IN_RANGES + 2
    task = h.submit(data_in=views(bytearray(size)))
    h.sent()
    h.deliver(*(h.data_in(task, off, b"x") for off in range(0, 2 * MAX_DATA_IN_RANGES, 2)))
    assert task.ranges is not None and len(task.ranges.bounds) == 2 * MAX_DATA_IN_RANGES
    h.deliver(*(h.data_in(task, off, b"y") for off in range(1, 2 * MAX_DATA_IN_RANGES, 2)))
    assert task.ranges.bounds == [0, 2 * MAX_DATA_IN_RANGES]
    h = Harness(OUT_OF_ORDER)
    task = h.submit(data_in=views(bytearray(size)))
    h.sent()
    with pytest.raises(RemoteProtocolError, match=f"more than {MAX_DATA_IN_RANGES} separate "
                       f"ranges .*offset {2 * MAX_DATA_IN_RANGES}, 1 bytes"):
        h.deliver(*(h.data_in(task, off, b"x") for off in range(0, size, 2)))


@pytest.mark.parametrize("params", [
    OUT_OF_ORDER, TransferParameters(data_pdu_in_order=False),
    TransferParameters(data_sequence_in_order=False)])
@pytest.mark.parametrize("chunk", [None, 48])
@pytest.mark.parametrize(("sns", "again"), [
    ([0, 1], 0),           # the first DataSN again, with bytes never sent
    ([1, 0], 1),           # out of order, then repeated
    ([0, 2], 2),
])
def test_out_of_order_data_in_with_a_datasn_repeated_is_a_protocol_error(
        params: TransferParameters, chunk: int | None, sns: list[int], again: int) -> None:
    """Out of order the bytes may come in any order, but each PDU still has its own DataSN
    (§11.7.4): a DataSN again, even with new bytes (or none), is the target's protocol
    error, as it is in order, on every path into the buffer."""
    for last in (b"x" * 1024, b""):
        h = Harness(params)
        task = h.submit(data_in=views(bytearray(4096)))
        h.sent()
        h.deliver(*(h.data_in(task, 1024 * n, bytes(1024), data_sn=sn)
                    for n, sn in enumerate(sns)), chunk=chunk)
        with pytest.raises(RemoteProtocolError) as info:
            h.deliver(h.data_in(task, 3072, last, data_sn=again), h.response(task),
                      chunk=chunk)
        message = str(info.value)
        assert f"at offset 3072 with DataSN {again}, a DataSN it had already sent" in message
        assert f"task 0x{task.itt:08x}" in message and "iqn.test:t" in message
        assert h.result(task) is None and task.itt in h.core._tasks


@pytest.mark.parametrize("chunk", [None, 48])
@pytest.mark.parametrize(("sns", "missing"), [
    ([1, 2, 3], "DataSN 0"),
    ([0, 1, 3], "DataSN 2"),
    ([3, 0], "DataSNs 1..2"),
])
def test_out_of_order_status_with_a_datasn_missing_is_a_protocol_error(
        chunk: int | None, sns: list[int], missing: str) -> None:
    """All the bytes there (or an honest residual), but a DataSN below the highest one never
    came: a PDU was lost, and the status, in a SCSI Response or the last Data-In, is the
    target's protocol error; the command stays for re-issue on the next connection."""
    for via in ("response", "data_in"):
        h = Harness(OUT_OF_ORDER)
        size = 1024 * len(sns)
        task = h.submit(data_in=views(bytearray(size)))
        h.sent()
        pdus: list[P.DataIn | P.ScsiResponse] = [
            h.data_in(task, 1024 * n, bytes(1024), data_sn=sn, status=(
                via == "data_in" and n == len(sns) - 1)) for n, sn in enumerate(sns)]
        if via == "response":
            pdus.append(h.response(task))
        with pytest.raises(RemoteProtocolError) as info:
            h.deliver(*pdus, chunk=chunk)
        message = str(info.value)
        assert f"with {missing} never sent, though it sent DataSN {max(sns)}" in message, via
        assert f"task 0x{task.itt:08x}" in message and "iqn.test:t" in message
        assert h.result(task) is None and task.itt in h.core._tasks


def test_out_of_order_bidi_numbers_r2ts_and_data_in_in_one_sequence() -> None:
    """A bidirectional command's R2Ts and Data-In share one numbering (§11.7.4): the R2TSNs
    fill the DataSNs' sequence, and one a Data-In already had is the target's error."""
    for repeat in (False, True):
        h = Harness(TransferParameters(data_pdu_in_order=False, data_sequence_in_order=False,
                                       immediate_data=False))
        task = h.submit(data_out=views(bytearray(1024)), data_in=views(bytearray(2048)))
        h.sent()
        h.deliver(h.data_in(task, 1024, bytes(1024), data_sn=1),
                  h.data_in(task, 0, bytes(1024), data_sn=0))
        if repeat:
            with pytest.raises(RemoteProtocolError, match="R2TSN 1, a number a Data-In or R2T"):
                h.deliver(_nth_r2t(h, task, 1, 0, 1024))
            continue
        h.deliver(_nth_r2t(h, task, 2, 0, 1024))
        assert task.sns is not None and task.sns.bounds == [0, 3]
        h.sent()
        h.deliver(h.response(task))
        assert h.ok(task).data_in_length == 2048


def test_out_of_order_datasns_in_too_many_ranges_is_a_protocol_error() -> None:
    """Every other DataSN makes a range each: bounded as the byte ranges are, and adjacent
    ones merge (then every DataSN there lets the read complete)."""
    h = Harness(OUT_OF_ORDER)
    n = 2 * MAX_DATA_IN_RANGES
    task = h.submit(data_in=views(bytearray(n)))
    h.sent()
    h.deliver(*(h.data_in(task, sn, b"x", data_sn=sn) for sn in range(0, n, 2)))
    assert task.sns is not None and len(task.sns.bounds) == n
    h.deliver(*(h.data_in(task, sn, b"y", data_sn=sn) for sn in range(1, n, 2)),
              h.response(task))
    assert h.ok(task).data_in_length == n
    h = Harness(OUT_OF_ORDER)
    task = h.submit(data_in=views(bytearray(n)))
    h.sent()
    with pytest.raises(RemoteProtocolError, match=f"DataSNs .* more than {MAX_DATA_IN_RANGES} "
                       f"separate ranges \\(the last DataSN {n}\\)"):
        # One byte range (offsets in order), DataSNs every other number.
        h.deliver(*(h.data_in(task, i, b"x", data_sn=2 * i) for i in range(n)))


@pytest.mark.parametrize("chunk", [None, 48])
@pytest.mark.parametrize(("first", "then"), [
    ((0, 1024), (0, 1024)),       # repeated
    ((0, 1024), (512, 1536)),     # overlapping
    ((0, 1024), (2048, 3072)),    # leaving a gap
    ((1024, 2048), (0, 1024)),    # out of order
])
def test_in_order_data_in_refuses_overlaps_and_gaps(
        chunk: int | None, first: tuple[int, int], then: tuple[int, int]) -> None:
    """The default (both keys Yes): the next Data-In starts where the last ended, so the
    bytes counted are 0..data_in_length and a short read says so (its own test elsewhere)."""
    h = Harness()
    task = h.submit(data_in=views(bytearray(4096)))
    h.sent()
    source = _pattern(4096, 9)
    a, b = first
    if a:
        with pytest.raises(RemoteProtocolError, match=f"offset {a} .* next in order is offset 0"):
            h.deliver(h.data_in(task, a, source[a:b]), chunk=chunk)
        return
    h.deliver(h.data_in(task, a, source[a:b]), chunk=chunk)
    a, b = then
    with pytest.raises(RemoteProtocolError, match=f"offset {a} .* next in order is offset 1024"):
        h.deliver(h.data_in(task, a, source[a:b]), h.response(task), chunk=chunk)
    assert h.result(task) is None


def test_in_order_short_read_counts_only_the_bytes_sent() -> None:
    """Status after 3072 of 4096 bytes in order, with or without the residual: the result
    says 3072, so no reader of it takes the last 1024 bytes for data (§11.4.5.2)."""
    for status in ({"underflow": True, "residual_count": 1024}, {}):
        h = Harness()
        task = h.submit(data_in=views(bytearray(4096)))
        h.sent()
        h.deliver(h.data_in(task, 0, bytes(3072)), h.response(task, **status))
        assert h.ok(task).data_in_length == 3072


@pytest.mark.parametrize(("offset", "length"), [(4090, 7), (4096, 1), (0, 4097), (1 << 31, 4)])
def test_data_in_beyond_the_buffer_is_refused(offset: int, length: int) -> None:
    h = Harness()
    buf = bytearray(4096)
    task = h.submit(data_in=views(buf))
    h.sent()
    with pytest.raises(RemoteProtocolError, match="4096"):
        h.deliver(h.data_in(task, offset, bytes(length)))
    with pytest.raises(RemoteProtocolError):
        h.core.receive_pdu(h.data_in(task, offset, bytes(length)), 0.0)
    assert buf == bytearray(4096)


@pytest.mark.parametrize("chunk", [None, 1, 48, 100, 1000])
def test_data_in_checks_hold_on_every_path(chunk: int | None) -> None:
    # Whole in one read (the inline-copy route), header first (the direct route) or
    # through a DataIn object: a Data-In with status but no F bit, or outside the command's
    # buffer, is refused the same way, and a good one completes the command the same way.
    h = Harness()
    buf = bytearray(4096)
    task = h.submit(data_in=views(buf))
    h.sent()
    with pytest.raises(RemoteProtocolError, match="F bit"):
        h.deliver(P.DataIn(itt=task.itt, status_present=True, final=False, data=bytes(4096),
                           **h.numbers()), chunk=chunk)
    h = Harness()
    task = h.submit(data_in=views(buf))
    h.sent()
    with pytest.raises(RemoteProtocolError, match="4096"):
        h.deliver(h.data_in(task, 1, bytes(4096)), chunk=chunk)
    h = Harness()
    task = h.submit(data_in=views(buf))
    h.sent()
    with pytest.raises(RemoteProtocolError, match="not an outstanding command"):
        h.deliver(P.DataIn(itt=task.itt + 1, data=bytes(4096), **h.numbers()), chunk=chunk)
    h = Harness()
    task = h.submit(data_in=views(buf))
    h.sent()
    source = _pattern(4096, 5)
    h.deliver(h.data_in(task, 0, source, status=True, underflow=True, residual_count=512),
              chunk=chunk)
    result = h.ok(task)
    assert (result.status, result.residual, result.data_in_length) == (0, 512, 4096)
    assert buf == source
    assert h.core.exp_stat_sn == h.stat_sn and not h.core._tasks


@pytest.mark.parametrize("chunk", [None, 48])
def test_data_in_into_a_read_only_buffer_is_a_local_error(chunk: int | None) -> None:
    # Both routes into the caller's buffer: the inline copy (the whole PDU in one read) and
    # the direct receive (the header first).
    h = Harness()
    task = h.submit(data_in=[memoryview(bytes(4096))])
    h.sent()
    with pytest.raises(LocalProtocolError, match="read-only"):
        h.deliver(h.data_in(task, 0, bytes(4096)), chunk=chunk)


# --------------------------------------------------------------------------------------------
# Status, sense, residuals


def test_check_condition_carries_sense() -> None:
    h = Harness()
    task = h.submit()
    h.sent()
    sense = bytes.fromhex("7000050000000a00000000002100000000000000")[:18]
    h.deliver(h.response(task, status=CHECK_CONDITION,
                         data=len(sense).to_bytes(2, "big") + sense))
    result = h.ok(task)
    assert result.status == ScsiStatus.CHECK_CONDITION and not result.ok
    assert result.sense == sense


def test_sense_is_ignored_unless_check_condition() -> None:
    h = Harness()
    task = h.submit()
    h.sent()
    h.deliver(h.response(task, status=ScsiStatus.BUSY, data=b"\x00\x02ab"))
    assert h.ok(task).sense == b"" and h.ok(task).status == ScsiStatus.BUSY


def test_sense_length_beyond_the_segment_is_a_protocol_error() -> None:
    # The core's error, naming the target and the command, around the PDU's own words.
    h = Harness()
    task = h.submit()
    h.sent()
    with pytest.raises(RemoteProtocolError, match=r"sent a malformed SCSI Response for "
                       r"command .*: SCSI Response declares 32 bytes of sense data"):
        h.deliver(h.response(task, status=CHECK_CONDITION, data=b"\x00\x20abc"))


def test_target_failure_service_response() -> None:
    h = Harness()
    task = h.submit()
    h.sent()
    h.deliver(h.response(task, response=P.ServiceResponse.TARGET_FAILURE))
    error = h.result(task)
    assert isinstance(error, CommandError) and "target failure" in str(error)


@pytest.mark.parametrize("via", ["response", "data_in"])
@pytest.mark.parametrize(("flags", "count", "expected"), [
    ({"underflow": True}, 100, 100),
    ({"overflow": True}, 100, -100),
    ({}, 100, 0),  # no flag: the count means nothing
])
def test_residuals(via: str, flags: dict[str, bool], count: int, expected: int) -> None:
    h = Harness()
    task = h.submit(data_in=views(bytearray(512)))
    h.sent()
    if via == "response":
        h.deliver(h.response(task, residual_count=count, **flags))
    else:
        h.deliver(h.data_in(task, 0, bytes(412), status=True, residual_count=count, **flags))
    assert h.ok(task).residual == expected


# --------------------------------------------------------------------------------------------
# Writes: immediate data, unsolicited Data-Out, R2T


@dataclass(frozen=True)
class Combo:
    fbl: int
    mbl: int
    mxdsl: int
    initial_r2t: bool
    immediate: bool

    def params(self, **kw: Any) -> TransferParameters:
        return TransferParameters(first_burst_length=self.fbl, max_burst_length=self.mbl,
                                  max_xmit_data_segment_length=self.mxdsl,
                                  initial_r2t=self.initial_r2t, immediate_data=self.immediate,
                                  **kw)


COMBOS = [
    Combo(fbl, mbl, mxdsl, ir2t, imm)
    for fbl, mbl in ((512, 512), (4096, 8192), (8192, 8192), (65536, 262144), (3000, 5000))
    for mxdsl in (512, 1000, 8192)
    for ir2t in (True, False)
    for imm in (True, False)
]
SIZES = [1, 511, 512, 4096, 8193, 20000]


def expected_unsolicited(c: Combo, size: int) -> tuple[int, int]:
    """(immediate bytes, unsolicited Data-Out bytes) that RFC 7143 §13.10-13.14 allow."""
    if not c.initial_r2t:
        unsolicited = min(size, c.fbl)
    elif c.immediate:
        unsolicited = min(size, c.fbl, c.mxdsl)
    else:
        unsolicited = 0
    immediate = min(unsolicited, c.mxdsl) if c.immediate else 0
    return immediate, unsolicited - immediate


def check_sequence(data_outs: list[P.DataOut], *, start: int, length: int, ttt: int,
                   mxdsl: int, source: bytes) -> None:
    """One Data-Out sequence: contiguous, split at MaxXmitDSL, DataSN from 0, F on the last."""
    assert data_outs, "no Data-Out"
    offset = start
    for sn, d in enumerate(data_outs):
        assert d.ttt == ttt and d.data_sn == sn and d.buffer_offset == offset
        assert 0 < len(d.data) <= mxdsl
        assert bytes(d.data) == source[offset : offset + len(d.data)]
        assert d.final == (d is data_outs[-1])
        offset += len(d.data)
    assert offset == start + length


def run_write(c: Combo, size: int, *, max_outstanding: int = 1, seed: int = 0) -> None:
    h = Harness(c.params(max_outstanding_r2t=max_outstanding))
    source = _pattern(size, seed or size)
    # The caller's buffer in three views with odd boundaries.
    cut1, cut2 = size // 3, size // 3 + size // 5
    parts = [bytearray(source[:cut1]), bytearray(source[cut1:cut2]), bytearray(source[cut2:])]
    task = h.submit(cdb_write10(0, (size + 511) // 512), data_out=views(*parts))
    pdus = h.sent()
    cmd = pdus[0]
    assert isinstance(cmd, P.ScsiCommand) and cmd.write
    immediate, unsolicited = expected_unsolicited(c, size)
    assert len(cmd.data) == immediate
    assert bytes(cmd.data) == source[:immediate]
    assert cmd.expected_data_transfer_length == size
    assert cmd.final == (unsolicited == 0)
    data_outs = [p for p in pdus[1:] if isinstance(p, P.DataOut)]
    assert len(data_outs) == len(pdus) - 1
    if unsolicited:
        check_sequence(data_outs, start=immediate, length=unsolicited, ttt=P.RESERVED_TAG,
                       mxdsl=c.mxdsl, source=source)
    else:
        assert data_outs == []
    # The rest is solicited, MaxBurstLength per R2T, several R2Ts outstanding at once.
    offset = immediate + unsolicited
    r2t_sn = 0
    while offset < size:
        batch = []
        for _ in range(max_outstanding):
            if offset >= size:
                break
            length = min(c.mbl, size - offset)
            batch.append(P.R2T(itt=task.itt, ttt=0x1000 + r2t_sn, r2t_sn=r2t_sn,
                               buffer_offset=offset, desired_data_transfer_length=length,
                               **h.numbers(advance=False)))
            r2t_sn += 1
            offset += length
        h.deliver(*batch)
        answers = h.sent()
        assert all(isinstance(p, P.DataOut) for p in answers)
        for r2t in batch:
            mine = [p for p in answers if isinstance(p, P.DataOut) and p.ttt == r2t.ttt]
            check_sequence(mine, start=r2t.buffer_offset,
                           length=r2t.desired_data_transfer_length, ttt=r2t.ttt,
                           mxdsl=c.mxdsl, source=source)
        # Answers come in R2T order.
        ttts = [p.ttt for p in answers if isinstance(p, P.DataOut)]
        assert ttts == sorted(ttts)
    h.deliver(h.response(task))
    assert h.ok(task).ok
    assert h.core.stats_bytes_out == size


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("combo", COMBOS, ids=str)
def test_write_splits(combo: Combo, size: int) -> None:
    run_write(combo, size)


@pytest.mark.parametrize("max_outstanding", [2, 3, 8])
@pytest.mark.parametrize("combo", [Combo(512, 1024, 512, True, False),
                                   Combo(4096, 4096, 1000, False, True),
                                   Combo(8192, 16384, 8192, True, True)], ids=str)
def test_write_with_several_outstanding_r2ts(combo: Combo, max_outstanding: int) -> None:
    run_write(combo, 50000, max_outstanding=max_outstanding)


@settings(max_examples=60, deadline=None)
@given(fbl=st.integers(512, 20000), extra=st.integers(0, 20000), mxdsl=st.integers(512, 9000),
       initial_r2t=st.booleans(), immediate=st.booleans(), size=st.integers(1, 40000),
       outstanding=st.integers(1, 4))
def test_write_splits_property(fbl: int, extra: int, mxdsl: int, initial_r2t: bool,
                               immediate: bool, size: int, outstanding: int) -> None:
    run_write(Combo(fbl, fbl + extra, mxdsl, initial_r2t, immediate), size,
              max_outstanding=outstanding)


@pytest.mark.parametrize(("offset", "length", "match"), [
    (0, 4097, "writes 4096"),
    (4000, 200, "writes 4096"),
    (0, 0, "writes 4096"),
])
def test_r2t_out_of_range_is_refused(offset: int, length: int, match: str) -> None:
    h = Harness(TransferParameters(immediate_data=False))
    task = h.submit(WRITE, data_out=views(bytearray(4096)))
    h.sent()
    with pytest.raises(RemoteProtocolError, match=match):
        h.deliver(P.R2T(itt=task.itt, ttt=1, buffer_offset=offset,
                        desired_data_transfer_length=length, **h.window()))
    assert h.sent() == []


def test_r2t_with_reserved_ttt_is_refused() -> None:
    h = Harness(TransferParameters(immediate_data=False))
    task = h.submit(WRITE, data_out=views(bytearray(4096)))
    h.sent()
    with pytest.raises(RemoteProtocolError, match="TTT"):
        h.deliver(P.R2T(itt=task.itt, ttt=P.RESERVED_TAG, buffer_offset=0,
                        desired_data_transfer_length=512, **h.window()))


def _unordered_write(immediate: bool) -> tuple[Harness, Task, bytes]:
    """An 8 KiB write with DataSequenceInOrder=No (R2Ts may come in any order), 2 R2Ts
    outstanding; with ``immediate``, its first 1 KiB goes unsolicited."""
    h = Harness(TransferParameters(data_sequence_in_order=False, immediate_data=immediate,
                                   first_burst_length=1024, max_outstanding_r2t=2))
    source = _pattern(8192, 5)
    task = h.submit(WRITE, data_out=views(bytearray(source)))
    h.sent()
    return h, task, source


def _nth_r2t(h: Harness, task: Task, sn: int, offset: int, length: int) -> P.R2T:
    return _r2t(h, task, offset, length, ttt=sn + 1, sn=sn)


def test_r2ts_out_of_sequence_order_are_served_when_negotiated() -> None:
    h, task, source = _unordered_write(immediate=True)
    h.deliver(_nth_r2t(h, task, 0, 4096, 4096), _nth_r2t(h, task, 1, 1024, 3072))
    outs = [p for p in h.sent() if isinstance(p, P.DataOut)]
    assert sorted((p.buffer_offset, bytes(p.data)) for p in outs) == [
        (1024, source[1024:4096]), (4096, source[4096:])]
    h.deliver(h.response(task))
    assert h.ok(task).status == 0


@pytest.mark.parametrize(("immediate", "second", "seen"), [
    (False, (0, 4096), "0..4096"),        # the same range asked twice
    (False, (2048, 4096), "0..4096"),     # half of it again
    (True, (512, 512), "0..1024"),        # bytes that went unsolicited
])
def test_an_r2t_asking_again_is_refused_out_of_sequence_order_too(
        immediate: bool, second: tuple[int, int], seen: str) -> None:
    # Counted twice, two R2Ts for bytes 0..4096 made "8192 bytes asked for" of an 8 KiB write
    # whose second half nobody asked for: a GOOD status then passed for the whole write.
    h, task, _ = _unordered_write(immediate)
    h.deliver(_nth_r2t(h, task, 0, 4096 if immediate else 0, 4096))
    h.sent()
    with pytest.raises(RemoteProtocolError, match=rf"again, overlapping bytes {seen} already "
                                                  r"sent or asked for \(a recovery R2T"):
        h.deliver(_nth_r2t(h, task, 1, *second))
    assert h.sent() == []


def test_r2ts_scattered_beyond_the_bound_are_refused() -> None:
    h = Harness(TransferParameters(data_sequence_in_order=False, immediate_data=False,
                                   max_outstanding_r2t=1 << 20))
    size = 4 * (MAX_DATA_IN_RANGES + 1)
    task = h.submit(WRITE, data_out=views(bytearray(size)))
    h.sent()
    r2ts = [_nth_r2t(h, task, n, 4 * n, 1) for n in range(MAX_DATA_IN_RANGES)]
    h.deliver(*r2ts)
    with pytest.raises(RemoteProtocolError, match=f"more than {MAX_DATA_IN_RANGES} separate"):
        h.deliver(_nth_r2t(h, task, MAX_DATA_IN_RANGES, 4 * MAX_DATA_IN_RANGES, 1))


@pytest.mark.parametrize("pieces", [1, 2, 3])
def test_r2t_answer_sent_in_pieces_is_no_longer_outstanding(pieces: int) -> None:
    # With MaxOutstandingR2T=1 the target asks for the next burst once the last Data-Out of
    # the previous one is in. Sent in several sendmsg calls (a full socket), the frame's last
    # piece may be a single buffer (the data digest): once that is out, the R2T must not count
    # as outstanding (it did, and tgtd's next R2T dropped the connection).
    h = Harness(TransferParameters(immediate_data=False, data_digest=True,
                                   max_burst_length=2048, max_xmit_data_segment_length=2048))
    task = h.submit(WRITE, data_out=views(bytearray(4096)))
    h.wire()
    h.deliver(P.R2T(itt=task.itt, ttt=1, r2t_sn=0, buffer_offset=0,
                    desired_data_transfer_length=2048, **h.window()))
    bufs = h.core.send_buffers()
    total = sum(len(b) for b in bufs)
    assert len(bufs) == 3   # header, data, digest
    splits = {1: [total], 2: [total - 4, 4], 3: [48, 2048, 4]}[pieces]
    assert sum(splits) == total
    for n in splits:
        h.core.send_buffers()
        h.core.sent(n)
    assert not h.core.wants_to_send
    h.deliver(P.R2T(itt=task.itt, ttt=2, r2t_sn=1, buffer_offset=2048,
                    desired_data_transfer_length=2048, **h.window()))
    (data_out,) = h.sent()
    assert isinstance(data_out, P.DataOut) and data_out.buffer_offset == 2048


def _what(pdu: P.PDU) -> tuple[str, int, int]:
    """(kind, ITT, offset) of a command or Data-Out, to compare send orders."""
    if isinstance(pdu, P.DataOut):
        return ("data-out", pdu.itt, pdu.buffer_offset)
    assert isinstance(pdu, P.ScsiCommand), pdu
    return ("command", pdu.itt, 0)


def _r2t(h: Harness, task: Task, offset: int, length: int, ttt: int, sn: int = 0) -> P.R2T:
    return P.R2T(itt=task.itt, ttt=ttt, r2t_sn=sn, buffer_offset=offset,
                 desired_data_transfer_length=length, **h.window())


def _one_write_sent_two_waiting() -> tuple[Harness, Task, Task, Task]:
    """8 KiB writes, 4 KiB of each immediate: the first sent, two more queued behind."""
    h = Harness(TransferParameters(first_burst_length=4096, max_xmit_data_segment_length=4096))
    a = h.submit(cdb_write10(0, 16), data_out=views(bytearray(8192)))
    h.wire()
    b = h.submit(cdb_write10(16, 16), data_out=views(bytearray(8192)))
    c = h.submit(cdb_write10(32, 16), data_out=views(bytearray(8192)))
    return h, a, b, c


def test_r2t_answer_goes_ahead_of_commands_waiting_to_be_sent() -> None:
    # The target holds a buffer for the data it asked for: the answer must not wait behind
    # new commands' immediate data (after a reinstatement, 16 of them: docs/faults.md).
    h, a, b, c = _one_write_sent_two_waiting()
    h.deliver(_r2t(h, a, 4096, 4096, ttt=7))
    assert [_what(p) for p in h.sent()] == [
        ("data-out", a.itt, 4096), ("command", b.itt, 0), ("command", c.itt, 0)]
    # Among themselves, the answers go in the order the R2Ts came.
    d = h.submit(cdb_write10(48, 16), data_out=views(bytearray(8192)))
    h.deliver(_r2t(h, c, 4096, 4096, ttt=8), _r2t(h, b, 4096, 4096, ttt=9))
    assert [_what(p) for p in h.sent()] == [
        ("data-out", c.itt, 4096), ("data-out", b.itt, 4096), ("command", d.itt, 0)]


def test_r2t_answer_waits_for_a_pdu_partly_sent() -> None:
    # A PDU partly on the wire is finished first: its framing must stay whole.
    h, a, b, c = _one_write_sent_two_waiting()
    first = b"".join(bytes(x) for x in h.core.send_buffers())[:100]
    h.core.sent(100)
    h.deliver(_r2t(h, a, 4096, 4096, ttt=7))
    pdus = PDUReader(max_data_segment_length=1 << 24).feed(first + h.wire())
    assert [_what(p) for p in pdus] == [
        ("command", b.itt, 0), ("data-out", a.itt, 4096), ("command", c.itt, 0)]


def test_r2t_answer_stays_behind_its_own_tasks_pdus() -> None:
    # InitialR2T=No: the unsolicited Data-Out of a write is still queued when the target
    # asks for the rest. The answer goes behind it (DataSequenceInOrder=Yes, §13.19), even
    # behind the next command, rather than overtake its own task.
    h = Harness(TransferParameters(immediate_data=False, initial_r2t=False,
                                   first_burst_length=4096, max_xmit_data_segment_length=4096))
    a = h.submit(cdb_write10(0, 16), data_out=views(bytearray(8192)))
    h.core.send_buffers()
    h.core.sent(48)   # the command's header only
    b = h.submit(cdb_write10(16, 16), data_out=views(bytearray(8192)))
    h.deliver(_r2t(h, a, 4096, 4096, ttt=7))
    assert [_what(p) for p in h.sent()] == [
        ("data-out", a.itt, 0), ("command", b.itt, 0), ("data-out", b.itt, 0),
        ("data-out", a.itt, 4096)]


def test_r2t_answer_dropped_with_its_command_frees_its_place() -> None:
    # A write that ends (here with CHECK CONDITION) while its answer waits ahead takes the
    # answer out of the queue; the next answer still goes ahead of waiting commands.
    h = Harness(TransferParameters(first_burst_length=4096, max_xmit_data_segment_length=4096))
    a = h.submit(cdb_write10(0, 16), data_out=views(bytearray(8192)))
    b = h.submit(cdb_write10(16, 16), data_out=views(bytearray(8192)))
    h.wire()
    c = h.submit(cdb_write10(32, 16), data_out=views(bytearray(8192)))
    h.deliver(_r2t(h, a, 4096, 4096, ttt=7))
    h.deliver(h.response(a, status=CHECK_CONDITION, data=b"\x00\x12" + bytes([0x70, 0, 5]) +
                         bytes(15)))
    h.deliver(_r2t(h, b, 4096, 4096, ttt=8))
    assert [_what(p) for p in h.sent()] == [("data-out", b.itt, 4096), ("command", c.itt, 0)]
    assert isinstance(h.result(a), CommandResult)


def test_data_out_is_sent_from_the_callers_views() -> None:
    h = Harness(TransferParameters(immediate_data=False, initial_r2t=False,
                                   first_burst_length=8192))
    buf = bytearray(_pattern(4096))
    h.submit(WRITE, data_out=views(buf))
    bufs = h.core.send_buffers()
    # Zero copy: the payload buffers handed out are views of the caller's bytearray.
    assert any(isinstance(b, memoryview) and b.obj is buf for b in bufs)


# --------------------------------------------------------------------------------------------
# Partial sends and the on_done guarantee


@settings(max_examples=50, deadline=None)
@given(cuts=st.lists(st.integers(1, 3000), min_size=1, max_size=40),
       max_buffers=st.integers(1, 6), hd=st.booleans(), dd=st.booleans(),
       until=st.sampled_from([None, 1, 700, 1000]))
def test_partial_sends_produce_the_same_stream(cuts: list[int], max_buffers: int, hd: bool,
                                               dd: bool, until: int | None) -> None:
    # ``until``: the lists end at a payload view of at least that many bytes (the transport
    # splices those), which must not change the stream either.
    params = TransferParameters(header_digest=hd, data_digest=dd, initial_r2t=False,
                                first_burst_length=6000, max_xmit_data_segment_length=1000)

    def build() -> ConnectionCore:
        core = ConnectionCore(params, cmd_sn=1, exp_stat_sn=1, exp_cmd_sn=1, max_cmd_sn=99)
        for i in range(3):
            data = bytearray(_pattern(2500 + i * 700, i + 1))
            core.submit(Task(0, WRITE, [memoryview(data)], None, lambda r: None))
        core.ping(0.0, data=b"hello")
        return core

    reference = Harness(params)
    reference.core = build()
    expected = reference.wire()
    core = build()
    got = bytearray()
    sizes = itertools.cycle(cuts)
    stop = None if until is None else (lambda view: view.nbytes >= until)
    while core.wants_to_send:
        bufs = core.send_buffers(max_buffers, stop)
        if stop is not None:
            assert not any(type(b) is memoryview and stop(b) for b in bufs[:-1])
        flat = b"".join(bytes(b) for b in bufs)
        n = min(next(sizes), len(flat))
        got += flat[:n]
        core.sent(n)
    assert bytes(got) == expected


def test_send_buffers_until_ends_at_the_first_payload_it_names() -> None:
    h = Harness(TransferParameters(immediate_data=True, initial_r2t=False,
                                   first_burst_length=65536))
    small, large = bytearray(512), bytearray(4096)
    h.submit(WRITE, data_out=[memoryview(small)])
    h.submit(WRITE, data_out=[memoryview(large)])
    h.submit()
    everything = h.core.send_buffers()
    bufs = h.core.send_buffers(until=lambda view: view.nbytes >= 4096)
    # The first command (header, payload), the second's header and its payload: no more.
    assert len(bufs) == 4 and len(everything) > 4
    assert isinstance(bufs[3], memoryview) and bufs[3].obj is large
    assert [type(b) for b in bufs[:3]] == [bytes, memoryview, bytes]
    h.core.sent(sum(len(b) for b in bufs))
    assert h.core.send_buffers(until=lambda view: True) == everything[4:]


def test_sent_more_than_handed_out() -> None:
    h = Harness()
    h.submit()
    bufs = h.core.send_buffers()
    with pytest.raises(LocalProtocolError):
        h.core.sent(sum(len(b) for b in bufs) + 1)


class Guard:
    """An on_done that checks the core let go of the caller's buffer before calling it."""

    def __init__(self, core: ConnectionCore, buf: bytearray) -> None:
        self.core = core
        self.buf = buf
        self.calls: list[CommandResult | ISCSIError] = []

    def __call__(self, result: CommandResult | ISCSIError) -> None:
        for frame in self.core._frames:
            for b in frame.bufs:
                assert not (isinstance(b, memoryview) and b.obj is self.buf), \
                    "a queued frame still references the caller's buffer"
        assert not exports(self.buf), "a view of the caller's buffer is still alive"
        self.calls.append(result)
        # The caller reuses its buffer at once.
        self.buf[:] = bytes(len(self.buf))


def _guarded_write(h: Harness, size: int = 20000) -> tuple[Task, Guard, bytes]:
    source = _pattern(size, 5)
    buf = bytearray(source)
    guard = Guard(h.core, buf)
    task = Task(0, cdb_write10(0, size // 512 + 1), [memoryview(buf)], None, guard)
    h.core.submit(task)
    return task, guard, source


def _last_queued(h: Harness) -> P.PDU:
    """The PDU of the last queued frame (not sent; the queue is left as it was)."""
    raw = b"".join(bytes(b) for b in h.core._frames[-1].bufs)
    pdu, _ = P.decode(raw, header_digest=h.params.header_digest,
                      data_digest=h.params.data_digest)
    return pdu


def _finish(h: Harness, how: str, task: Task) -> None:
    if how == "response":
        h.deliver(P.ScsiResponse(itt=task.itt, status=CHECK_CONDITION,
                                 data=b"\x00\x12" + bytes(18), **h.numbers()))
    elif how == "reject":
        cmd = P.encode(P.ScsiCommand(itt=task.itt, cdb=WRITE, write=True))[:48]
        h.deliver(P.Reject(reason=P.RejectReason.PROTOCOL_ERROR, data=cmd, **h.numbers()))
    elif how in ("abort", "lun_reset"):
        if how == "abort":
            h.core.abort_task(task, lambda r: None)
        else:
            h.core.task_management(P.TMFunction.LOGICAL_UNIT_RESET, 0, lambda r: None)
        tmf = _last_queued(h)
        assert isinstance(tmf, P.TaskMgmtRequest)
        h.deliver(P.TaskMgmtResponse(itt=tmf.itt, **h.numbers()))
    elif how == "fail_all":
        h.core.fail_all(CommandError("gone"))
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["response", "reject", "abort", "lun_reset", "fail_all"])
@pytest.mark.parametrize("progress", ["unsent", "partial_header", "partial_data", "all_sent"])
@pytest.mark.parametrize("digests", [False, True])
def test_on_done_runs_after_every_buffer_reference_is_gone(how: str, progress: str,
                                                           digests: bool) -> None:
    params = TransferParameters(initial_r2t=False, first_burst_length=20000,
                                max_xmit_data_segment_length=4096, header_digest=digests,
                                data_digest=digests)
    h = Harness(params)
    task, guard, source = _guarded_write(h)
    # How far the transport got before the completion arrives.
    frame_lens = [sum(len(b) for b in f.bufs) for f in h.core._frames]
    header = P.BHS_LEN + (4 if digests else 0)
    n = {"unsent": 0,
         "partial_header": frame_lens[0] + 10,
         "partial_data": frame_lens[0] + frame_lens[1] + header + 1000,
         "all_sent": sum(frame_lens)}[progress]
    prefix = b""
    if n:
        bufs = h.core.send_buffers()
        prefix = b"".join(bytes(b) for b in bufs)[:n]
        h.core.sent(n)
        del bufs  # the transport keeps no view once sendmsg returned
    _finish(h, how, task)
    assert len(guard.calls) == 1
    # Whatever was partly on the wire is finished from a copy: the stream still decodes,
    # and the bytes of that PDU are the original ones even though the caller reused its
    # buffer.
    rest = h.wire()
    stream = prefix + rest
    reader = PDUReader(header_digest=digests, data_digest=digests,
                       max_data_segment_length=1 << 24)
    pdus = reader.feed(stream)
    assert not reader.receiving_payload
    for p in pdus:
        if isinstance(p, P.DataOut | P.ScsiCommand) and p.data:
            start = p.buffer_offset if isinstance(p, P.DataOut) else 0
            assert bytes(p.data) == source[start : start + len(p.data)]
    assert task.data_out is None and task.state is TaskState.DONE


def test_early_status_drops_the_data_out_not_yet_on_the_wire() -> None:
    # The target answers a write before taking its unsolicited data (e.g. a bad LBA). Only
    # the PDU already partly sent is finished; the rest of the Data-Out is not sent at all.
    h = Harness(TransferParameters(initial_r2t=False, first_burst_length=65536,
                                   max_xmit_data_segment_length=4096, immediate_data=False))
    task = h.submit(WRITE, data_out=views(bytearray(20000)))
    frame_lens = [sum(len(b) for b in f.bufs) for f in h.core._frames]
    assert len(frame_lens) == 6   # the command and five Data-Outs
    bufs = h.core.send_buffers()
    n = frame_lens[0] + 100
    prefix = b"".join(bytes(b) for b in bufs)[:n]
    h.core.sent(n)
    del bufs
    h.deliver(h.response(task, status=CHECK_CONDITION))
    pdus = PDUReader(max_data_segment_length=1 << 20).feed(prefix + h.wire())
    assert [type(p) for p in pdus] == [P.ScsiCommand, P.DataOut]


def test_completion_between_send_buffers_and_sent_keeps_the_framing() -> None:
    h = Harness(TransferParameters(initial_r2t=False, first_burst_length=65536,
                                   max_xmit_data_segment_length=4096, immediate_data=False))
    task = h.submit(WRITE, data_out=views(bytearray(20000)))
    bufs = h.core.send_buffers()
    raw = b"".join(bytes(b) for b in bufs)
    del bufs
    h.deliver(h.response(task))      # before the transport reported what it sent
    h.core.sent(len(raw))
    assert not h.core.wants_to_send
    assert len(PDUReader(max_data_segment_length=1 << 20).feed(raw)) == 6


def test_read_buffers_released_before_on_done() -> None:
    h = Harness()
    buf = bytearray(8192)
    guard = Guard(h.core, buf)
    task = Task(0, cdb_read10(0, 16), None, [memoryview(buf)], guard)
    h.core.submit(task)
    h.sent()
    source = _pattern(8192, 2)
    h.deliver(P.DataIn(itt=task.itt, data=source[:5000], **h.window()),
              P.DataIn(itt=task.itt, data=source[5000:], buffer_offset=5000, final=True,
                       status_present=True, data_sn=1, **h.numbers()), chunk=777)
    assert len(guard.calls) == 1 and isinstance(guard.calls[0], CommandResult)
    assert not h.reader.receiving_payload


def test_abort_of_queued_task_completes_at_once_without_sending() -> None:
    h = Harness(window=0)
    buf = bytearray(1024)
    guard = Guard(h.core, buf)
    task = Task(0, WRITE, [memoryview(buf)], None, guard)
    h.core.submit(task)
    answers: list[Any] = []
    h.core.abort_task(task, answers.append)
    assert isinstance(guard.calls[0], TaskAborted)
    assert isinstance(answers[0], P.TaskMgmtResponse)
    assert answers[0].response == P.TMResponse.COMPLETE
    assert h.sent() == [] and h.core.in_flight == 0


# --------------------------------------------------------------------------------------------
# Task management


def _tmf(h: Harness) -> P.TaskMgmtRequest:
    (tmf,) = [p for p in h.sent() if isinstance(p, P.TaskMgmtRequest)]
    return tmf


def test_abort_task() -> None:
    h = Harness()
    a, b = h.submit(data_in=views(bytearray(512))), h.submit()
    h.sent()
    answers: list[Any] = []
    h.core.abort_task(a, answers.append)
    tmf = _tmf(h)
    assert tmf.function is P.TMFunction.ABORT_TASK and tmf.immediate
    assert (tmf.referenced_task_tag, tmf.ref_cmd_sn, tmf.cmd_sn) == (a.itt, a.cmd_sn,
                                                                      h.core.cmd_sn)
    h.deliver(P.TaskMgmtResponse(itt=tmf.itt, **h.numbers()))
    assert isinstance(h.result(a), TaskAborted) and "ABORT_TASK" in str(h.result(a))
    assert h.result(b) is None and b.state is TaskState.ACTIVE
    assert answers[0].response == P.TMResponse.COMPLETE


def test_abort_task_that_completed_meanwhile() -> None:
    h = Harness()
    a = h.submit()
    h.sent()
    h.core.abort_task(a, lambda r: None)
    tmf = _tmf(h)
    h.deliver(h.response(a))   # the status overtook the abort
    h.deliver(P.TaskMgmtResponse(itt=tmf.itt, response=P.TMResponse.TASK_DOES_NOT_EXIST,
                                 **h.numbers()))
    assert isinstance(h.result(a), CommandResult)


@pytest.mark.parametrize("function", [P.TMFunction.LOGICAL_UNIT_RESET,
                                      P.TMFunction.ABORT_TASK_SET,
                                      P.TMFunction.CLEAR_TASK_SET])
def test_lun_level_tmf_completes_that_luns_tasks(function: P.TMFunction) -> None:
    h = Harness()
    on_lun1 = [h.submit(lun=1) for _ in range(3)]
    on_lun2 = h.submit(lun=2)
    h.sent()
    answers: list[Any] = []
    h.core.task_management(function, 1, answers.append)
    tmf = _tmf(h)
    assert tmf.lun == P.lun_to_wire(1)
    h.deliver(P.TaskMgmtResponse(itt=tmf.itt, **h.numbers()))
    assert all(isinstance(h.result(t), TaskAborted) for t in on_lun1)
    assert h.result(on_lun2) is None
    assert len(answers) == 1


@pytest.mark.parametrize("function", [P.TMFunction.TARGET_WARM_RESET,
                                      P.TMFunction.TARGET_COLD_RESET])
def test_target_reset_completes_everything(function: P.TMFunction) -> None:
    h = Harness()
    tasks = [h.submit(lun=n) for n in range(3)]
    h.sent()
    h.core.task_management(function, 0, lambda r: None)
    h.deliver(P.TaskMgmtResponse(itt=_tmf(h).itt, **h.numbers()))
    assert all(isinstance(h.result(t), TaskAborted) for t in tasks)


def test_commands_sent_after_a_lun_reset_are_not_terminated_by_it() -> None:
    # The target applies the reset to what arrived before it; a command sent after the TMF
    # is executed and answered normally (§4.2.3.3), so it must stay outstanding.
    h = Harness()
    before = h.submit(lun=1)
    h.sent()
    h.core.task_management(P.TMFunction.LOGICAL_UNIT_RESET, 1, lambda r: None)
    tmf = _tmf(h)
    after = h.submit(lun=1)
    h.sent()
    h.deliver(P.TaskMgmtResponse(itt=tmf.itt, **h.numbers()))
    assert isinstance(h.result(before), TaskAborted)
    assert h.result(after) is None and after.state is TaskState.ACTIVE
    h.deliver(h.response(after))
    assert isinstance(h.result(after), CommandResult)


@pytest.mark.parametrize("response", [P.TMResponse.REJECTED, P.TMResponse.NOT_SUPPORTED,
                                      P.TMResponse.LUN_DOES_NOT_EXIST,
                                      P.TMResponse.AUTHORIZATION_FAILED])
def test_failed_tmf_leaves_tasks_alone(response: P.TMResponse) -> None:
    h = Harness()
    task = h.submit()
    h.sent()
    answers: list[Any] = []
    h.core.abort_task(task, answers.append)
    h.deliver(P.TaskMgmtResponse(itt=_tmf(h).itt, response=response, **h.numbers()))
    assert h.result(task) is None and task.state is TaskState.ACTIVE
    assert answers[0].response == response


def test_abort_task_needs_abort_task() -> None:
    h = Harness()
    with pytest.raises(LocalProtocolError):
        h.core.task_management(P.TMFunction.ABORT_TASK, 0, lambda r: None)


def test_tmf_response_nobody_asked_for() -> None:
    h = Harness()
    with pytest.raises(RemoteProtocolError, match="task management"):
        h.deliver(P.TaskMgmtResponse(itt=99, **h.numbers()))


# --------------------------------------------------------------------------------------------
# NOP


def test_target_ping_is_answered_with_its_ttt() -> None:
    h = Harness(cmd_sn=9)
    h.deliver(P.NopIn(itt=P.RESERVED_TAG, ttt=0x1234, lun=P.lun_to_wire(3), data=b"ping",
                      **h.numbers(advance=False)))
    (nop,) = h.sent()
    assert isinstance(nop, P.NopOut)
    assert (nop.itt, nop.ttt, nop.lun, nop.cmd_sn) == (P.RESERVED_TAG, 0x1234,
                                                       P.lun_to_wire(3), 9)
    assert nop.immediate


def test_unsolicited_nop_in_without_ttt_needs_no_answer() -> None:
    h = Harness()
    h.deliver(P.NopIn(**h.numbers(advance=False)))
    assert h.sent() == []


def test_our_ping_and_its_answer() -> None:
    h = Harness(cmd_sn=3)
    answers: list[Any] = []
    h.core.ping(0.0, answers.append, data=b"abc")
    (nop,) = h.sent()
    assert isinstance(nop, P.NopOut) and nop.ttt == P.RESERVED_TAG and nop.data == b"abc"
    assert nop.immediate and nop.cmd_sn == 3 and h.core.cmd_sn == 3
    h.deliver(P.NopIn(itt=nop.itt, data=b"abc", **h.numbers()))
    assert isinstance(answers[0], P.NopIn) and answers[0].data == b"abc"
    assert h.core.exp_stat_sn == 101


def test_nop_in_answering_a_ping_we_never_sent() -> None:
    h = Harness()
    with pytest.raises(RemoteProtocolError, match="NOP-Out"):
        h.deliver(P.NopIn(itt=77, **h.numbers()))


def test_keepalive_and_timeout() -> None:
    h = Harness(noop_interval=5.0, noop_timeout=3.0, now=100.0)
    core = h.core
    assert core.get_timer() == 105.0
    core.handle_timer(104.0)
    assert h.sent() == []
    core.handle_timer(105.0)
    (nop,) = h.sent()
    assert isinstance(nop, P.NopOut)
    assert core.get_timer() == 108.0
    core.handle_timer(107.9)
    with pytest.raises(RemoteProtocolError, match="did not answer a NOP-Out"):
        core.handle_timer(108.0)


def test_keepalive_answered_in_time() -> None:
    h = Harness(noop_interval=5.0, noop_timeout=3.0)
    h.core.handle_timer(5.0)
    (nop,) = h.sent()
    assert isinstance(nop, P.NopOut)
    h.deliver(P.NopIn(itt=nop.itt, **h.numbers()), now=6.0)
    assert h.core.get_timer() == 11.0
    h.core.handle_timer(8.0)  # the old deadline: nothing happens
    assert h.sent() == []


def test_no_timeout_while_data_keeps_arriving() -> None:
    h = Harness(noop_interval=5.0, noop_timeout=3.0)
    task = h.submit(data_in=views(bytearray(1 << 20)))
    h.sent()
    h.core.handle_timer(5.0)
    assert [type(p) for p in h.sent()] == [P.NopOut]
    # A big read is streaming in; the ping's answer is stuck behind it.
    now = 5.0
    for i in range(10):
        now += 2.0
        h.deliver(h.data_in(task, i * 1000, bytes(1000), data_sn=i), now=now)
        h.core.handle_timer(now)
    h.core.handle_timer(now + 2.9)
    # Bytes alone are no progress: the start of a PDU and no more of it (a target trickling
    # a byte now and then) does not keep the connection alive.
    assert h.reader.feed(P.encode(h.data_in(task, 10_000, bytes(1000), data_sn=10))[:30]) == []
    with pytest.raises(RemoteProtocolError, match="no progress"):
        h.core.handle_timer(now + 3.0)


def test_keepalive_disabled() -> None:
    h = Harness(noop_interval=0.0)
    assert h.core.get_timer() is None
    h.core.handle_timer(1e9)
    assert h.sent() == []


def test_timer_after_close() -> None:
    h = Harness(noop_interval=1.0)
    h.core.close(CommandError("gone"))
    assert h.core.get_timer() is None
    h.core.handle_timer(100.0)
    assert h.sent() == []


def run_timers(h: Harness, until: float) -> float:
    """Drive the core's timer as the transport does (at the times get_timer names) up to
    ``until``; returns the time of the last run (or ``until`` when there was none)."""
    last = until
    for _ in range(10_000):
        when = h.core.get_timer()
        if when is None or when > until:
            return last
        h.core.handle_timer(when)
        last = when
    raise AssertionError("the timer keeps firing without time passing")


def test_target_pings_are_no_progress() -> None:
    # A target that pings us (and we answer) but never answers our ping: its own NOP-Ins
    # say nothing about our commands, so the connection still dies.
    h = Harness(noop_interval=5.0, noop_timeout=3.0)
    h.core.handle_timer(5.0)
    (nop,) = h.sent()
    assert isinstance(nop, P.NopOut)
    for i in range(10):
        h.deliver(P.NopIn(itt=P.RESERVED_TAG, ttt=0x100 + i, **h.numbers(advance=False)),
                  now=5.0 + 0.25 * i)
        h.core.handle_timer(5.0 + 0.25 * i)
    assert [p.ttt for p in h.sent() if isinstance(p, P.NopOut)] == [0x100 + i for i in range(10)]
    with pytest.raises(RemoteProtocolError, match="no progress"):
        h.core.handle_timer(8.0)


def test_answers_are_progress_and_postpone_the_ping() -> None:
    h = Harness(noop_interval=5.0, noop_timeout=3.0)
    task = h.submit()
    h.sent()
    h.deliver(h.response(task), now=4.0)
    assert h.core.get_timer() == 9.0
    h.core.handle_timer(9.0)
    assert [type(p) for p in h.sent()] == [P.NopOut]


def test_the_core_keeps_few_enough_attributes_for_fast_access() -> None:
    # CPython (3.11) shares the keys of instance dicts, and specialises attribute access on
    # them, only up to 30 attributes: past that every self.x of the per-command path becomes
    # a dict lookup (measured: 4-5 % more CPU per 4 KiB read). Timer state lives in small
    # slotted objects instead (_Liveness, _Deadlines).
    assert len(vars(Harness().core)) <= 30


def test_busy_target_keeps_the_keepalive_waiting_without_spinning() -> None:
    # The ping's answer is stuck behind a long read that progresses: the keepalive extends
    # its wait, and the timer it asks for is always in the future (no busy loop).
    h = Harness(noop_interval=1.0, noop_timeout=1.0)
    task = h.submit(data_in=views(bytearray(1 << 20)))
    h.sent()
    run_timers(h, 1.0)
    assert [type(p) for p in h.sent()] == [P.NopOut]
    for i in range(20):
        now = 1.0 + 0.25 * (i + 1)
        h.deliver(h.data_in(task, i * 1000, bytes(1000), data_sn=i), now=now)
        run_timers(h, now)
        timer = h.core.get_timer()
        assert timer is not None and timer > now
    with pytest.raises(RemoteProtocolError, match="no progress"):
        run_timers(h, 10.0)


def test_command_deadline_aborts_the_command() -> None:
    h = Harness(command_timeout=8.0, tmf_timeout=2.0)
    task = h.submit(data_in=views(bytearray(4096)))
    (cmd,) = h.sent()
    assert run_timers(h, 7.99) < 8.0 and h.sent() == []
    last = run_timers(h, 9.0)
    assert 8.0 <= last <= 9.0, last      # a check every command_timeout / 8
    (tmf,) = h.sent()
    assert isinstance(cmd, P.ScsiCommand)
    assert isinstance(tmf, P.TaskMgmtRequest) and tmf.function is P.TMFunction.ABORT_TASK
    assert tmf.referenced_task_tag == cmd.itt and tmf.ref_cmd_sn == cmd.cmd_sn
    h.deliver(P.TaskMgmtResponse(itt=tmf.itt, **h.numbers()), now=last + 0.1)
    error = h.result(task)
    assert isinstance(error, CommandTimeout), error
    assert "command timeout of 8 s" in str(error) and "iqn.test:t" in str(error)
    assert h.core.in_flight == 0
    run_timers(h, 100.0)
    assert h.sent() == []


def test_command_deadline_counts_from_each_command() -> None:
    # An old command that never completes is caught although newer ones complete all along
    # (progress on the connection does not help a stuck command).
    h = Harness(command_timeout=8.0, tmf_timeout=2.0)
    stuck = h.submit()
    h.sent()
    others: list[Task] = []   # kept: the harness knows results by id()
    now = 0.0
    while now < 8.0:
        now += 0.5
        others.append(h.submit())
        h.sent()
        h.deliver(h.response(others[-1]), now=now)
        run_timers(h, now)
    assert all(h.ok(t).status == 0 for t in others)
    run_timers(h, 9.0)
    (tmf,) = [p for p in h.sent() if isinstance(p, P.TaskMgmtRequest)]
    assert tmf.referenced_task_tag == stuck.itt
    assert h.result(stuck) is None   # until the target answers the abort


def test_command_deadline_escalates_to_lun_reset_when_the_abort_is_refused() -> None:
    h = Harness(command_timeout=4.0, tmf_timeout=2.0)
    stuck = h.submit(lun=3)
    h.sent()
    run_timers(h, 3.0)
    bystander = h.submit(lun=3)   # newer: not overdue yet
    other_lun = h.submit(lun=4)
    h.sent()
    run_timers(h, 5.0)
    (abort,) = h.sent()
    assert isinstance(abort, P.TaskMgmtRequest) and abort.function is P.TMFunction.ABORT_TASK
    h.deliver(P.TaskMgmtResponse(itt=abort.itt, response=P.TMResponse.REJECTED,
                                 **h.numbers()), now=5.1)
    (reset,) = h.sent()
    assert isinstance(reset, P.TaskMgmtRequest)
    assert reset.function is P.TMFunction.LOGICAL_UNIT_RESET and P.lun_from_wire(reset.lun) == 3
    h.deliver(P.TaskMgmtResponse(itt=reset.itt, **h.numbers()), now=5.2)
    assert isinstance(h.result(stuck), CommandTimeout)
    assert isinstance(h.result(bystander), TaskAborted)
    assert h.result(other_lun) is None


@pytest.mark.parametrize("status_comes", [True, False])
def test_a_deadlines_abort_answered_task_does_not_exist_waits_for_its_status(
        status_comes: bool) -> None:
    """tgtd answers ABORT TASK for a write whose data it is still taking with "Task does not
    exist" (its iSCSI layer holds the command, where the abort does not look), then sends the
    command's R2T and status all the same. The task stays outstanding: its status completes
    it (it was a protocol error, "not an outstanding command", and a new connection); without
    one, the escalation's LOGICAL UNIT RESET ends it."""
    h = Harness(command_timeout=4.0, tmf_timeout=2.0)
    stuck = h.submit()
    h.sent()
    run_timers(h, 4.5)
    abort = _tmf(h)
    assert abort.function is P.TMFunction.ABORT_TASK
    h.deliver(P.TaskMgmtResponse(itt=abort.itt, response=P.TMResponse.TASK_DOES_NOT_EXIST,
                                 **h.numbers()), now=4.6)
    assert h.result(stuck) is None
    reset = _tmf(h)
    assert reset.function is P.TMFunction.LOGICAL_UNIT_RESET
    if status_comes:
        h.deliver(h.response(stuck), now=4.7)
        assert h.ok(stuck).status == 0
    h.deliver(P.TaskMgmtResponse(itt=reset.itt, **h.numbers()), now=4.8)
    if not status_comes:
        assert isinstance(h.result(stuck), CommandTimeout)
    run_timers(h, 30.0)
    assert h.sent() == [] and h.core.take_unfinished() == []


def test_command_deadline_ends_in_a_new_connection_when_the_target_ignores_tmfs() -> None:
    h = Harness(command_timeout=4.0, tmf_timeout=1.0)
    stuck = h.submit(data_in=views(bytearray(512)))
    h.sent()
    run_timers(h, 4.5)
    assert _tmf(h).function is P.TMFunction.ABORT_TASK
    innocent = h.submit()
    h.sent()
    run_timers(h, 5.5)   # ABORT TASK unanswered for tmf_timeout
    assert _tmf(h).function is P.TMFunction.LOGICAL_UNIT_RESET
    with pytest.raises(ConnectionFailed, match="ABORT TASK and LOGICAL UNIT RESET"):
        run_timers(h, 7.0)
    h.core.close(ConnectionFailed("dropped"))
    # The stuck command is not re-issued on the next connection; the innocent one is.
    assert h.core.take_unfinished() == [innocent]
    assert isinstance(h.result(stuck), CommandTimeout)
    assert h.result(innocent) is None


def run_stalled_timers(h: Harness, until: float, stalled_since: float) -> float:
    """run_timers, with the reader holding part of a PDU since ``stalled_since``."""
    last = until
    for _ in range(10_000):
        when = h.core.get_timer()
        if when is None or when > until:
            return last
        h.core.handle_timer(when, stalled_since=stalled_since)
        last = when
    raise AssertionError("the timer keeps firing without time passing")


def _stall_mid_data_in(h: Harness, task: Task) -> None:
    """The target sends a Data-In's header and part of its payload, then nothing."""
    raw = P.encode(h.data_in(task, 0, bytes(4096)))
    assert h.reader.feed(raw[: 48 + 1000]) == []
    assert h.reader.partial


def test_command_deadline_with_the_stream_stopped_mid_pdu_drops_the_connection() -> None:
    """No answer, to an abort either, can come behind a PDU the target stopped sending: at
    the deadline, with the stream stopped for min(command_timeout, tmf_timeout) already, the
    connection is given up at once (no ABORT TASK), and the command ends, not re-issued,
    with an error that says what happened (the target, the stall, what to check)."""
    h = Harness(command_timeout=2.0, tmf_timeout=15.0)
    task = h.submit(data_in=views(bytearray(4096)))
    innocent = h.submit()
    h.sent()
    _stall_mid_data_in(h, task)
    assert run_stalled_timers(h, 1.99, stalled_since=0.1) < 2.0
    with pytest.raises(ConnectionFailed) as info:
        run_stalled_timers(h, 2.3, stalled_since=0.1)
    message = str(info.value)
    assert "target iqn.test:t stopped sending in the middle of a PDU and sent nothing for " \
        "2." in message and "check that the target is running" in message
    assert h.sent() == []   # no abort that could not be answered
    h.core.close(info.value)
    # Overdue together with the stuck one: both end; a newer command would be re-issued.
    assert h.core.take_unfinished() == []
    for t in (task, innocent):
        error = h.result(t)
        assert isinstance(error, CommandTimeout), error
        assert str(error).startswith(f"command 0x28 (task 0x{t.itt:08x}, LUN 0) did not "
                                     "complete within the command timeout of 2 s in target "
                                     "iqn.test:t; it could not be aborted: target iqn.test:t "
                                     "stopped sending in the middle of a PDU"), error


def test_a_stall_mid_pdu_after_the_deadline_ends_the_abort_within_its_bound() -> None:
    """The stream stops just before the deadline: the ABORT TASK goes out (the stream may
    move again), and once the stall has lasted min(command_timeout, tmf_timeout) the
    connection is given up, long before the abort's tmf_timeout would escalate."""
    h = Harness(command_timeout=2.0, tmf_timeout=15.0)
    task = h.submit(data_in=views(bytearray(4096)))
    h.sent()
    _stall_mid_data_in(h, task)
    last = run_stalled_timers(h, 2.3, stalled_since=1.9)
    assert 2.0 <= last <= 2.3
    assert _tmf(h).function is P.TMFunction.ABORT_TASK
    assert run_stalled_timers(h, 3.89, stalled_since=1.9) < 3.9
    with pytest.raises(ConnectionFailed, match="middle of a PDU") as info:
        run_stalled_timers(h, 4.2, stalled_since=1.9)
    assert h.sent() == []   # nor a LOGICAL UNIT RESET
    h.core.close(info.value)
    assert h.core.take_unfinished() == []
    error = h.result(task)
    assert isinstance(error, CommandTimeout) and "could not be aborted" in str(error)


def test_a_stall_mid_pdu_is_bounded_by_the_tmf_timeout_too() -> None:
    """min(command_timeout, tmf_timeout): a long command deadline does not lengthen it."""
    h = Harness(command_timeout=8.0, tmf_timeout=3.0)
    h.submit()
    h.sent()
    # Overdue at the check at 9 (one every 1 s), stopped for 2.5 s then: the abort goes out.
    assert run_stalled_timers(h, 9.99, stalled_since=6.5) < 10.0
    assert _tmf(h).function is P.TMFunction.ABORT_TASK
    with pytest.raises(ConnectionFailed, match=r"sent nothing for 3\.5 s"):
        run_stalled_timers(h, 10.0, stalled_since=6.5)


def test_no_stall_while_bytes_come_or_with_no_command_overdue() -> None:
    """A stream that moves (the transport passes a recent time) or no overdue command: the
    connection stays; the deadline's abort goes out as usual."""
    h = Harness(command_timeout=2.0, tmf_timeout=15.0)
    h.submit()
    h.sent()
    run_stalled_timers(h, 1.99, stalled_since=0.0)   # stopped long, but nothing overdue
    assert h.sent() == []
    now = 2.0
    while now < 10.0:
        h.core.handle_timer(now, stalled_since=now - 0.5)
        now += 0.25
    assert _tmf(h).function is P.TMFunction.ABORT_TASK


def test_the_deadline_error_says_how_the_abort_ended() -> None:
    """Aborted by the target: "it was aborted"; cut short by the connection's end (the
    keepalive, the target closing): "it could not be aborted" and why."""
    h = Harness(command_timeout=2.0, tmf_timeout=15.0)
    task = h.submit()
    h.sent()
    run_timers(h, 2.3)
    h.deliver(P.TaskMgmtResponse(itt=_tmf(h).itt, **h.numbers()), now=2.4)
    assert str(h.result(task)).endswith("command timeout of 2 s in target iqn.test:t; it was "
                                        "aborted")
    h = Harness(command_timeout=2.0, tmf_timeout=15.0)
    task = h.submit()
    h.sent()
    run_timers(h, 2.3)
    h.core.close(ConnectionFailed("target iqn.test:t closed the connection"))
    assert h.core.take_unfinished() == []
    assert str(h.result(task)).endswith("command timeout of 2 s in target iqn.test:t; it "
                                        "could not be aborted: target iqn.test:t closed the "
                                        "connection")


def test_command_completing_while_its_abort_is_outstanding() -> None:
    h = Harness(command_timeout=4.0, tmf_timeout=2.0)
    buf = bytearray(512)
    task = h.submit(data_in=views(buf))
    h.sent()
    run_timers(h, 4.6)
    abort = _tmf(h)
    h.deliver(h.data_in(task, 0, b"x" * 512, status=True), now=4.7)
    result = h.ok(task)
    assert result.status == 0 and buf == b"x" * 512
    h.deliver(P.TaskMgmtResponse(itt=abort.itt, response=P.TMResponse.TASK_DOES_NOT_EXIST,
                                 **h.numbers()), now=4.8)
    assert h.result(task) is result
    run_timers(h, 30.0)
    assert h.sent() == []


def test_closed_command_window_ends_the_connection() -> None:
    h = Harness(command_timeout=4.0, window=1)
    first = h.submit()
    waiting = h.submit()
    h.sent()
    h.deliver(h.response(first, max_cmd_sn=h.core.cmd_sn - 1), now=1.0)   # closes the window
    assert waiting.state is TaskState.QUEUED
    with pytest.raises(ConnectionFailed, match=r"command window closed for 4 s"):
        run_timers(h, 10.0)
    h.core.close(ConnectionFailed("dropped"))
    assert h.core.take_unfinished() == [waiting]


def test_window_that_opens_now_and_then_is_no_stall() -> None:
    h = Harness(command_timeout=4.0, window=1)
    tasks = [h.submit() for _ in range(12)]
    for i, task in enumerate(tasks):
        now = 1.0 + i
        (cmd,) = h.sent()
        assert isinstance(cmd, P.ScsiCommand) and cmd.itt == task.itt
        h.deliver(h.response(task, max_cmd_sn=h.core.cmd_sn), now=now)
        run_timers(h, now)
    assert all(h.ok(t).status == 0 for t in tasks)


def test_shrinking_window_is_ignored_and_the_commands_stay_bounded() -> None:
    # MaxCmdSN only moves forward (§4.2.2.1): a smaller one is ignored. If the target then
    # drops the commands it no longer wanted, their deadline ends them.
    h = Harness(command_timeout=4.0, tmf_timeout=1.0, window=8)
    a = h.submit()
    h.sent()
    h.deliver(P.NopIn(exp_cmd_sn=h.core.cmd_sn, max_cmd_sn=h.core.cmd_sn - 1), now=0.5)
    b = h.submit()
    assert [p.itt for p in h.sent() if isinstance(p, P.ScsiCommand)] == [b.itt]
    run_timers(h, 5.0)
    aborts = [p for p in h.sent() if isinstance(p, P.TaskMgmtRequest)]
    assert sorted(p.referenced_task_tag for p in aborts) == sorted([a.itt, b.itt])


def test_request_deadlines() -> None:
    h = Harness()
    answers: list[Any] = []
    h.core.text_request(b"SendTargets=All\0", answers.append, deadline=3.0)
    (text,) = h.sent()
    assert isinstance(text, P.TextRequest)
    assert h.core.get_timer() == 3.0
    h.core.handle_timer(3.0)
    assert isinstance(answers[0], CommandTimeout) and "Text Request" in str(answers[0])
    assert h.core.get_timer() is None
    # A late answer is accepted quietly: on_done ran once.
    h.deliver(P.TextResponse(itt=text.itt, final=True, data=b"A=1\0", **h.numbers()))
    assert len(answers) == 1
    reset: list[Any] = []
    h.core.task_management(P.TMFunction.LOGICAL_UNIT_RESET, 0, reset.append, deadline=5.0)
    h.core.handle_timer(5.0)
    assert isinstance(reset[0], CommandTimeout) and "LOGICAL UNIT RESET" in str(reset[0])
    out: list[Any] = []
    h.core.logout(out.append, deadline=7.0)
    h.core.handle_timer(7.0)
    assert isinstance(out[0], CommandTimeout) and "Logout" in str(out[0])


def test_extra_ping_has_its_own_deadline() -> None:
    h = Harness(noop_interval=0.0, noop_timeout=2.0)
    first: list[Any] = []
    second: list[Any] = []
    h.core.ping(0.0, first.append)     # the keepalive's ping: its deadline drops the connection
    h.core.ping(1.0, second.append)
    one, _ = h.sent()
    assert isinstance(one, P.NopOut)
    h.deliver(P.NopIn(itt=one.itt, **h.numbers()), now=1.5)
    assert isinstance(first[0], P.NopIn)
    assert h.core.get_timer() == 3.0
    h.core.handle_timer(3.0)
    assert isinstance(second[0], CommandTimeout) and "NOP-Out ping" in str(second[0])
    h.core.close(ConnectionFailed("dropped"))
    assert len(first) == len(second) == 1


def test_abort_of_a_queued_command_ends_it_at_once() -> None:
    h = Harness(window=0)
    task = h.submit()
    ended: list[bool] = []
    error = TaskAborted("aborted by the kernel")
    h.core.abort(task, 0.0, error, lambda: ended.append(True))
    assert h.result(task) is error and ended == [True] and h.sent() == []


def test_abort_escalation_ends_when_the_connection_closes() -> None:
    h = Harness(tmf_timeout=2.0)
    task = h.submit()
    h.sent()
    ended: list[bool] = []
    h.core.abort(task, 0.0, TaskAborted("aborted"), lambda: ended.append(True))
    assert [type(p) for p in h.sent()] == [P.TaskMgmtRequest]
    h.core.close(ConnectionFailed("dropped"))
    assert ended == [True]
    assert h.core.take_unfinished() == []
    assert isinstance(h.result(task), TaskAborted)


# --------------------------------------------------------------------------------------------
# Text, logout, async, reject


def test_text_response_with_continuation() -> None:
    h = Harness(cmd_sn=20)
    answers: list[Any] = []
    h.core.text_request(b"SendTargets=All\0", answers.append)
    (req,) = h.sent()
    assert isinstance(req, P.TextRequest) and req.cmd_sn == 20 and not req.immediate
    assert req.final and req.ttt == P.RESERVED_TAG
    h.deliver(P.TextResponse(itt=req.itt, final=False, cont=True, ttt=0x42,
                             data=b"TargetName=iqn.a:b\0Targ", **h.numbers()))
    (more,) = h.sent()
    assert isinstance(more, P.TextRequest)
    assert (more.itt, more.ttt, more.data, more.cmd_sn) == (req.itt, 0x42, b"", 21)
    h.deliver(P.TextResponse(itt=req.itt, final=True, data=b"etAddress=1.2.3.4:3260,1\0",
                             **h.numbers()))
    assert answers[0].data == b"TargetName=iqn.a:b\0TargetAddress=1.2.3.4:3260,1\0"


def test_a_text_answer_that_never_ends_is_bounded_in_responses() -> None:
    # Empty pieces with F=0 keep the 16 MiB bound from ever being reached; with no command
    # deadline (command_timeout 0) only a bound on the responses ends the exchange.
    h = Harness()
    answers: list[Any] = []
    h.core.text_request(b"SendTargets=All\0", answers.append)
    (req,) = h.sent()
    assert isinstance(req, P.TextRequest)
    with pytest.raises(RemoteProtocolError, match="Text Responses to one Text Request"):
        for _ in range(MAX_TEXT_RESPONSES + 1):
            h.deliver(P.TextResponse(itt=req.itt, final=False, ttt=0x42, **h.numbers()))
            h.sent()
    assert not answers


def test_text_request_waits_for_the_window_in_line_with_commands() -> None:
    h = Harness(cmd_sn=7, window=1)
    a, b = h.submit(), h.submit()
    answers: list[Any] = []
    h.core.text_request(b"SendTargets=All\0", answers.append)
    assert [p.cmd_sn for p in h.sent() if isinstance(p, P.ScsiCommand)] == [7]
    assert b.state is TaskState.QUEUED and h.core.in_flight == 2
    h.deliver(h.response(a, max_cmd_sn=8))
    assert [(type(p), getattr(p, "cmd_sn", None)) for p in h.sent()] == [(P.ScsiCommand, 8)]
    h.deliver(h.response(b, max_cmd_sn=9))
    (text,) = h.sent()
    assert isinstance(text, P.TextRequest) and text.cmd_sn == 9
    # The continuation waits for the window too.
    h.deliver(P.TextResponse(itt=text.itt, final=False, cont=True, ttt=3, data=b"A=",
                             **h.numbers(max_cmd_sn=9)))
    assert h.sent() == []
    h.deliver(P.NopIn(exp_cmd_sn=10, max_cmd_sn=10))
    (more,) = h.sent()
    assert isinstance(more, P.TextRequest) and (more.cmd_sn, more.ttt) == (10, 3)


def test_queued_text_request_fails_with_the_connection() -> None:
    h = Harness(window=0)
    answers: list[Any] = []
    h.core.text_request(b"SendTargets=All\0", answers.append)
    error = CommandError("lost")
    h.core.close(error)
    assert answers == [error]
    assert h.core.take_unfinished() == []


def test_partial_text_response_needs_a_ttt() -> None:
    h = Harness()
    h.core.text_request(b"SendTargets=All\0", lambda r: None)
    (req,) = h.sent()
    assert isinstance(req, P.TextRequest)
    with pytest.raises(RemoteProtocolError, match="TTT"):
        h.deliver(P.TextResponse(itt=req.itt, final=False, cont=True, **h.numbers()))


def test_text_response_nobody_asked_for() -> None:
    h = Harness()
    with pytest.raises(RemoteProtocolError, match="Text Response"):
        h.deliver(P.TextResponse(itt=5, **h.numbers()))


def test_logout() -> None:
    h = Harness(cmd_sn=4)
    answers: list[Any] = []
    h.core.logout(answers.append)
    (req,) = h.sent()
    assert isinstance(req, P.LogoutRequest) and req.reason is P.LogoutReason.CLOSE_SESSION
    assert req.cmd_sn == 4
    with pytest.raises(LocalProtocolError, match="logging out"):
        h.submit()
    h.deliver(P.LogoutResponse(itt=req.itt, time2wait=7, **h.numbers()))
    assert answers[0].time2wait == 7
    assert h.core.next_event() == Event(EventKind.LOGGED_OUT, seconds=7)


def test_logout_response_nobody_asked_for() -> None:
    h = Harness()
    with pytest.raises(RemoteProtocolError, match="Logout"):
        h.deliver(P.LogoutResponse(itt=3, **h.numbers()))


SENSE_3F0E = bytes.fromhex("700006000000000a000000003f0e0000")


@pytest.mark.parametrize(("event", "kw", "expected"), [
    (P.AsyncEvent.SCSI_ASYNC_EVENT, {"lun": 2, "data": b"\x00\x10" + SENSE_3F0E},
     Event(EventKind.SCSI_EVENT, lun=2, sense=SENSE_3F0E)),
    (P.AsyncEvent.LOGOUT_REQUEST, {"parameter3": 15}, Event(EventKind.LOGOUT_REQUESTED, 15)),
    (P.AsyncEvent.CONNECTION_DROP, {"parameter2": 4, "parameter3": 20},
     Event(EventKind.CONNECTION_DROP, 4)),
    (P.AsyncEvent.ALL_CONNECTIONS_DROP, {"parameter2": 6},
     Event(EventKind.CONNECTION_DROP, 6)),
    (P.AsyncEvent.NEGOTIATION_REQUEST, {"parameter3": 9}, Event(EventKind.RENEGOTIATE, 9)),
    (P.AsyncEvent.TASK_TERMINATION, {}, Event(EventKind.TASKS_TERMINATING)),
    (P.AsyncEvent.VENDOR_SPECIFIC, {}, Event(EventKind.VENDOR, detail="AsyncEvent 255")),
    (17, {}, Event(EventKind.VENDOR, detail="AsyncEvent 17")),
])
def test_async_events(event: int, kw: dict[str, Any], expected: Event) -> None:
    h = Harness()
    lun = kw.pop("lun", 0)
    task = h.submit()
    h.sent()
    h.deliver(P.AsyncMessage(async_event=event, lun=P.lun_to_wire(lun), **kw, **h.numbers()))
    assert h.core.next_event() == expected
    assert h.core.next_event() is None
    assert h.core.exp_stat_sn == 101
    assert task.state is TaskState.ACTIVE   # no event touches the tasks


def _header(pdu: P.PDU) -> bytes:
    return P.encode(pdu)[: P.BHS_LEN]


CONTROL_KINDS = [
    "nop_ping", "nop_answer", "nop_window", "tmf_other_lun", "text_continued", "text_final",
    "logout", *[f"async_{e.name.lower()}" for e in P.AsyncEvent],
    "reject_ping", "reject_tmf", "reject_text",
]


def _control_exchange(h: Harness, kind: str) -> list[P.PDU]:
    """Start whatever request ``kind`` answers and return the target's PDUs for it."""
    if kind == "nop_ping":
        return [P.NopIn(itt=P.RESERVED_TAG, ttt=0x10, **h.numbers(advance=False))]
    if kind == "nop_window":
        return [P.NopIn(**h.numbers(advance=False))]
    if kind in ("nop_answer", "reject_ping"):
        h.core.ping(0.0)
    elif kind in ("tmf_other_lun", "reject_tmf"):
        h.core.task_management(P.TMFunction.LOGICAL_UNIT_RESET, 9, lambda r: None)
    elif kind.startswith("text") or kind == "reject_text":
        h.core.text_request(b"X-A=1\0", lambda r: None)
    elif kind == "logout":
        h.core.logout(lambda r: None)
    elif kind.startswith("async_"):
        event = P.AsyncEvent[kind[6:].upper()]
        return [P.AsyncMessage(async_event=event, **h.numbers())]
    (req,) = [p for p in h.sent() if not isinstance(p, P.ScsiCommand | P.DataOut)]
    assert isinstance(req, P.NopOut | P.TaskMgmtRequest | P.TextRequest | P.LogoutRequest)
    if kind.startswith("reject"):
        return [P.Reject(reason=P.RejectReason.COMMAND_NOT_SUPPORTED, data=_header(req),
                         **h.numbers())]
    if kind == "nop_answer":
        return [P.NopIn(itt=req.itt, **h.numbers())]
    if kind == "tmf_other_lun":
        return [P.TaskMgmtResponse(itt=req.itt, **h.numbers())]
    if kind == "text_continued":
        return [P.TextResponse(itt=req.itt, final=False, cont=True, ttt=5,
                               data=b"X-A=", **h.numbers())]
    if kind == "text_final":
        return [P.TextResponse(itt=req.itt, data=b"X-A=1\0", **h.numbers())]
    if kind == "logout":
        return [P.LogoutResponse(itt=req.itt, **h.numbers())]
    raise AssertionError(kind)


@pytest.mark.parametrize(("state", "kind"), [
    (state, kind) for state in STATES for kind in CONTROL_KINDS
    # A text request waits in line behind a queued command: it cannot be outstanding then.
    if not (state == "queued" and "text" in kind)])
def test_control_pdus_leave_tasks_alone(state: str, kind: str) -> None:
    h = Harness(TransferParameters(immediate_data=False))
    task, _ = _task_in_state(h, state)
    before = (task.state, h.result(task), task.itt)
    if state == "queued":
        # The window stays closed across the exchange.
        h.hold_max = lambda: (h.core.cmd_sn - 1) & M
    h.deliver(*_control_exchange(h, kind))
    assert (task.state, h.result(task), task.itt) == before


@pytest.mark.parametrize("reason", [P.RejectReason.PROTOCOL_ERROR,
                                    P.RejectReason.COMMAND_NOT_SUPPORTED,
                                    P.RejectReason.TASK_IN_PROGRESS,
                                    P.RejectReason.INVALID_PDU_FIELD, 0x55])
def test_reject_of_a_command_fails_that_command_and_plugs_its_cmd_sn(reason: int) -> None:
    # The PDU cannot be sent again (§11.17.1): the command fails. Its CmdSN was not received
    # (§7.3), and the gap would hold back every later command: an ABORT TASK naming it plugs
    # it (§11.5.1), and its answer changes nothing.
    h = Harness()
    a, b = h.submit(), h.submit()
    (cmd_a, _) = h.sent()
    h.deliver(P.Reject(reason=reason, data=_header(cmd_a), **h.numbers()))
    error = h.result(a)
    assert isinstance(error, CommandError) and "rejected" in str(error)
    assert b.state is TaskState.ACTIVE
    (tmf,) = h.sent()
    assert isinstance(cmd_a, P.ScsiCommand)
    assert isinstance(tmf, P.TaskMgmtRequest) and tmf.immediate
    assert tmf.function is P.TMFunction.ABORT_TASK
    assert (tmf.referenced_task_tag, tmf.ref_cmd_sn) == (cmd_a.itt, cmd_a.cmd_sn)
    assert serial.gt(tmf.cmd_sn, cmd_a.cmd_sn)
    h.deliver(P.TaskMgmtResponse(response=P.TMResponse.TASK_DOES_NOT_EXIST, itt=tmf.itt,
                                 **h.numbers()))
    assert b.state is TaskState.ACTIVE and h.result(a) is error


def test_reject_of_a_command_names_the_reason() -> None:
    h = Harness()
    h.submit()
    a = h.submit()
    (_, cmd_a) = h.sent()
    h.deliver(P.Reject(reason=P.RejectReason.INVALID_PDU_FIELD, data=_header(cmd_a),
                       **h.numbers()))
    assert "invalid pdu field" in str(h.result(a))


@pytest.mark.parametrize("reason", [P.RejectReason.DATA_DIGEST_ERROR,
                                    P.RejectReason.IMMEDIATE_COMMAND_REJECT,
                                    P.RejectReason.LONG_OPERATION_REJECT,
                                    P.RejectReason.WAITING_FOR_LOGOUT])
def test_reject_of_a_command_that_may_be_sent_again_reconnects(reason: P.RejectReason
                                                               ) -> None:
    # "The original PDU can be re-sent" (§11.17.1): for a data digest error in the immediate
    # data (§7.8) or the target's lack of resources. At ERL 0 that is on a new connection:
    # the command is not failed (which would spend one of the SCSI layer's retries) and
    # stays to be re-issued after the reinstatement.
    h = Harness()
    a = h.submit(WRITE, data_out=[memoryview(bytearray(4096))])
    b = h.submit()
    (cmd, _) = h.sent()
    with pytest.raises(RemoteProtocolError, match="reconnecting"):
        h.deliver(P.Reject(reason=reason, data=_header(cmd), **h.numbers()))
    assert h.result(a) is None and h.result(b) is None
    assert set(h.core.take_unfinished()) == {a, b}


@pytest.mark.parametrize("kind", ["ping", "tmf", "text"])
def test_reject_of_a_control_request_fails_only_that_request(kind: str) -> None:
    h = Harness(noop_interval=5.0)
    task = h.submit()
    h.sent()
    answers: list[Any] = []
    if kind == "ping":
        h.core.ping(0.0, answers.append)
    elif kind == "tmf":
        h.core.task_management(P.TMFunction.LOGICAL_UNIT_RESET, 0, answers.append)
    else:
        h.core.text_request(b"X-Foo=1\0", answers.append)
    (req,) = h.sent()
    h.deliver(P.Reject(reason=P.RejectReason.COMMAND_NOT_SUPPORTED, data=_header(req),
                       **h.numbers()))
    assert isinstance(answers[0], CommandError) and "rejected" in str(answers[0])
    assert task.state is TaskState.ACTIVE
    if kind == "ping":
        assert h.core.get_timer() == 5.0  # no ping outstanding any more


@pytest.mark.parametrize("rejected", [
    P.DataOut(itt=1, ttt=5),
    P.LogoutRequest(itt=1),
    P.SnackRequest(itt=1),
    P.NopOut(itt=P.RESERVED_TAG, ttt=9),
    P.ScsiCommand(itt=0x999, cdb=READ),   # a command we do not have
])
def test_reject_of_other_pdus_drops_the_connection(rejected: P.PDU) -> None:
    h = Harness()
    with pytest.raises(RemoteProtocolError, match="rejected"):
        h.deliver(P.Reject(reason=P.RejectReason.PROTOCOL_ERROR, data=_header(rejected),
                           **h.numbers()))


@pytest.mark.parametrize("data", [b"", b"\x01" * 20, b"\x3e" + bytes(47)])
def test_reject_with_unusable_header(data: bytes) -> None:
    h = Harness()
    with pytest.raises(RemoteProtocolError, match="rejected a PDU"):
        h.deliver(P.Reject(reason=0x55, data=data, **h.numbers()))


@pytest.mark.parametrize("pdu", [P.NopOut(), P.ScsiCommand(cdb=READ), P.LoginResponse(),
                                 P.DataOut(), P.LogoutRequest(), P.TextRequest()],
                         ids=lambda p: type(p).__name__)
def test_pdus_a_target_never_sends(pdu: P.PDU) -> None:
    h = Harness()
    with pytest.raises(RemoteProtocolError, match="never sends"):
        h.core.receive_pdu(pdu, 0.0)


# --------------------------------------------------------------------------------------------
# Re-issue after a lost connection


@pytest.mark.parametrize("start", [1, M - 2, 0x7FFFFFFE])
def test_take_unfinished_keeps_submission_order(start: int) -> None:
    h = Harness(cmd_sn=start, window=4)
    tasks = [h.submit() for _ in range(6)]
    h.sent()
    # The target saw the first three (ExpCmdSN moved past them) but answered only the second.
    seen = (start + 3) & M
    h.deliver(h.response(tasks[1], exp_cmd_sn=seen, max_cmd_sn=seen))
    assert h.core.exp_cmd_sn == seen
    h.core.close(CommandError("connection lost"))
    unfinished = h.core.take_unfinished()
    assert unfinished == [tasks[0], *tasks[2:]]
    for t in unfinished:
        assert t.state is TaskState.QUEUED and t.itt == P.RESERVED_TAG
        assert t.reissues == 1 and t.received == 0
    assert h.core.in_flight == 0
    assert h.result(tasks[0]) is None


def test_take_unfinished_puts_the_leader_last_when_nothing_completed() -> None:
    # A connection that completed nothing may have been broken by the command that led (a
    # poison command, a flipped bit in its immediate data): it must not lead every re-issue.
    h = Harness()
    tasks = [h.submit() for _ in range(4)]
    h.sent()
    h.core.close(CommandError("connection lost"))
    assert h.core.take_unfinished() == [*tasks[1:], tasks[0]]
    h2 = Harness(window=1)
    (only,) = [h2.submit()]
    h2.core.close(CommandError("connection lost"))
    assert h2.core.take_unfinished() == [only]


def _backlog(n: int) -> list[Task]:
    return [Task(0, READ, None, [memoryview(bytearray(4096))], lambda r: None)
            for _ in range(n)]


def test_backlog_beyond_the_login_window_waits_for_a_ping_answer() -> None:
    # LIO announces a window of one command at login and opens it only after: the re-issued
    # commands wait for an immediate NOP-Out's answer, which carries the real window, and
    # then go out together instead of one alone and the rest a round trip later.
    h = Harness(cmd_sn=40, window=1)
    tasks = _backlog(5)
    h.core.submit_backlog(tasks, 0.0)
    (ping,) = h.sent()
    assert isinstance(ping, P.NopOut) and ping.immediate and ping.cmd_sn == 40
    assert ping.itt != P.RESERVED_TAG and all(t.state is TaskState.QUEUED for t in tasks)
    later = h.submit()   # the kernel's next command waits in line behind them
    assert h.sent() == []
    h.deliver(P.NopIn(itt=ping.itt, **h.numbers(max_cmd_sn=40 + 63)))
    cmds = [c for c in h.sent() if isinstance(c, P.ScsiCommand)]
    assert [c.cmd_sn for c in cmds] == list(range(40, 46))
    assert [c.itt for c in cmds] == [t.itt for t in [*tasks, later]]


def test_backlog_behind_a_window_that_stays_small_goes_out_as_it_allows() -> None:
    h = Harness(cmd_sn=7, window=2)
    tasks = _backlog(3)
    h.core.submit_backlog(tasks, 0.0)
    (ping,) = h.sent()
    assert isinstance(ping, P.NopOut)
    h.deliver(P.NopIn(itt=ping.itt, **h.numbers(advance=False)))   # the window stays 2
    cmds = [c for c in h.sent() if isinstance(c, P.ScsiCommand)]
    assert [c.cmd_sn for c in cmds] == [7, 8] and tasks[2].state is TaskState.QUEUED
    h.deliver(h.response(tasks[0], max_cmd_sn=9))
    assert [c.cmd_sn for c in h.sent() if isinstance(c, P.ScsiCommand)] == [9]


def test_backlog_within_the_login_window_goes_out_at_once() -> None:
    h = Harness(window=8)
    tasks = _backlog(8)
    h.core.submit_backlog(tasks, 0.0)
    assert [type(p) for p in h.sent()] == [P.ScsiCommand] * 8


def test_backlog_ping_the_target_never_answers_ends_the_connection() -> None:
    h = Harness(window=1, noop_timeout=5.0)
    h.core.submit_backlog(_backlog(3), 10.0)
    h.sent()
    h.core.handle_timer(14.9)
    with pytest.raises(RemoteProtocolError, match="NOP-Out"):
        h.core.handle_timer(15.0)


def test_reissued_tasks_run_again_on_a_new_core() -> None:
    h = Harness(TransferParameters(immediate_data=False))
    source = _pattern(1024, 6)
    read_buf = bytearray(512)
    r = h.submit(data_in=views(read_buf))
    w = h.submit(WRITE, data_out=views(bytearray(source)))
    h.sent()
    h.deliver(h.data_in(r, 0, b"x" * 100))   # some data, then the line drops
    h.core.close(CommandError("lost"))
    again = h.core.take_unfinished()
    h2 = Harness(TransferParameters(immediate_data=False), cmd_sn=500)
    for t in again:
        h2.core.submit(t)
    cmds = h2.sent()
    assert [c.cmd_sn for c in cmds if isinstance(c, P.ScsiCommand)] == [500, 501]
    h2.deliver(h2.data_in(r, 0, b"y" * 512, status=True))
    h2.deliver(P.R2T(itt=w.itt, ttt=3, desired_data_transfer_length=1024,
                     **h2.numbers(advance=False)))
    outs = [p for p in h2.sent() if isinstance(p, P.DataOut)]
    assert b"".join(bytes(p.data) for p in outs) == source
    h2.deliver(h2.response(w))
    assert read_buf == b"y" * 512
    assert isinstance(h.result(r), CommandResult) and isinstance(h.result(w), CommandResult)


def test_close_fails_control_requests_and_refuses_new_commands() -> None:
    h = Harness()
    answers: list[Any] = []
    h.core.ping(0.0, answers.append)
    h.core.text_request(b"X-A=1\0", answers.append)
    err = CommandError("connection lost")
    h.core.close(err)
    assert answers == [err, err]
    assert not h.core.wants_to_send
    with pytest.raises(LocalProtocolError, match="closed"):
        h.submit()


def test_fail_all_on_a_live_core_forgets_the_frames() -> None:
    h = Harness(TransferParameters(initial_r2t=False, first_burst_length=65536))
    buf = bytearray(_pattern(20000))
    guard = Guard(h.core, buf)
    h.core.submit(Task(0, WRITE, [memoryview(buf)], None, guard))
    h.core.fail_all(CommandError("session closed"))
    assert len(guard.calls) == 1
    assert not h.core.wants_to_send


# --------------------------------------------------------------------------------------------
# Against the fake target


INI = "iqn.2024-01.org.example:initiator"


def logged_in(target: FakeTarget, **machine_kw: Any) -> tuple[Loopback, ConnectionCore]:
    lb = Loopback(target)
    machine = LoginMachine(initiator_name=INI, target_name=target.node.name,
                           isid=0x800000000042, **machine_kw)
    success = lb.login(machine)
    assert isinstance(success, LoginSuccess)
    return lb, lb.start(success)


def submit(core: ConnectionCore, results: list[Any], cdb: bytes, *,
           data_out: bytes | None = None, data_in: bytearray | None = None,
           lun: int = 0) -> Task:
    task = Task(lun, cdb, [memoryview(bytearray(data_out))] if data_out is not None else None,
                [memoryview(data_in)] if data_in is not None else None, results.append)
    core.submit(task)
    return task


FAKE_COMBOS = [
    dict(initial_r2t=True, immediate_data=True),
    dict(initial_r2t=True, immediate_data=False),
    dict(initial_r2t=False, immediate_data=True, first_burst_length=8192),
    dict(initial_r2t=False, immediate_data=False, first_burst_length=4096,
         max_burst_length=8192, max_outstanding_r2t=4),
    dict(max_recv_data_segment_length=512, max_burst_length=1024, first_burst_length=512,
         initial_r2t=False, max_outstanding_r2t=3),
]


@pytest.mark.parametrize("collapse", [True, False])
@pytest.mark.parametrize("digests", [False, True])
@pytest.mark.parametrize("combo", FAKE_COMBOS, ids=lambda c: ",".join(f"{k}={v}" for k, v in
                                                                         c.items()))
def test_reads_and_writes_against_the_fake_target(combo: dict[str, Any], digests: bool,
                                                  collapse: bool) -> None:
    hd = ("CRC32C",) if digests else ("None",)
    target = FakeTarget([TargetNode("iqn.2003-01.org.example:disk1", {0: RamDisk(4096)})],
                        settings=NegotiationSettings.rfc_defaults(
                            header_digest=hd, data_digest=hd, **combo),
                        phase_collapse=collapse, cmd_window=8)
    target.disk.fill_pattern()
    overrides = {k: v for k, v in {
        "InitialR2T": "No" if not combo.get("initial_r2t", True) else None,
        "MaxOutstandingR2T": str(combo["max_outstanding_r2t"])
        if "max_outstanding_r2t" in combo else None,
        "MaxRecvDataSegmentLength": "4096"}.items() if v is not None}
    lb, core = logged_in(target, header_digest="CRC32C" if digests else "None",
                         data_digest="CRC32C" if digests else "None", overrides=overrides)
    assert core.params.header_digest is digests
    results: list[Any] = []
    writes = []
    for i in range(12):
        blocks = 1 + i * 7
        data = _pattern(blocks * 512, 100 + i)
        writes.append((1000 + i * 100, data))
        submit(core, results, cdb_write16(1000 + i * 100, blocks), data_out=data)
    reads = []
    for i in range(12):
        buf = bytearray((1 + i * 5) * 512)
        reads.append((i * 50, buf))
        submit(core, results, cdb_read10(i * 50, len(buf) // 512), data_in=buf)
    lb.pump()
    assert len(results) == 24 and all(isinstance(r, CommandResult) and r.ok for r in results)
    assert not target.violations(), target.violations()
    for lba, data in writes:
        assert target.disk.data[lba * 512 : lba * 512 + len(data)] == data
    for lba, buf in reads:
        assert buf == target.disk.data[lba * 512 : lba * 512 + len(buf)]
    assert core.in_flight == 0


def test_scsi_commands_against_the_fake_target() -> None:
    disk = RamDisk(blocks=5000, block_size=4096, vendor="ACME", product="SUPERDISK",
                   serial="SN123")
    target = FakeTarget([TargetNode("iqn.2003-01.org.example:big", {0: disk, 3: RamDisk()})])
    lb, core = logged_in(target)
    results: list[Any] = []
    inq = bytearray(96)
    submit(core, results, cdb_inquiry(allocation_length=96), data_in=inq)
    cap10, cap16 = bytearray(8), bytearray(32)
    submit(core, results, cdb_read_capacity10(), data_in=cap10)
    submit(core, results, cdb_read_capacity16(), data_in=cap16)
    submit(core, results, cdb_test_unit_ready())
    serial = bytearray(64)
    submit(core, results, cdb_inquiry(0x80, 64), data_in=serial)
    bad = bytearray(4096)
    submit(core, results, cdb_read16(5000, 1), data_in=bad)          # one past the end
    submit(core, results, cdb_write10(4999, 2), data_out=bytes(8192))  # crosses the end
    nolun = bytearray(512)
    submit(core, results, cdb_read10(0, 1), data_in=nolun, lun=7)
    lb.pump()
    inq_r, c10, c16, tur, ser, bad_r, bad_w, nolun_r = results
    assert inq_r.ok and inq_r.residual == 96 - 36 and inq_r.data_in_length == 36
    assert inq[8:16] == b"ACME    " and inq[16:25] == b"SUPERDISK"
    assert c10.ok and int.from_bytes(cap10[:4], "big") == 4999
    assert int.from_bytes(cap10[4:8], "big") == 4096
    assert c16.ok and int.from_bytes(cap16[:8], "big") == 4999
    assert tur.ok and tur.data_in_length == 0
    assert ser.ok and serial[4:9] == b"SN123"
    for r in (bad_r, bad_w):
        assert r.status == CHECK_CONDITION and sense_key_asc(r.sense) == (5, 0x21, 0)
    assert sense_key_asc(nolun_r.sense) == (5, 0x25, 0)
    assert not target.violations(), target.violations()


@pytest.mark.parametrize("collapse", [True, False])
def test_residual_underflow_and_overflow_against_the_fake_target(collapse: bool) -> None:
    target = FakeTarget(phase_collapse=collapse)
    target.disk.fill_pattern()
    lb, core = logged_in(target)
    results: list[Any] = []
    big = bytearray(4096)
    submit(core, results, cdb_read10(0, 4), data_in=big)     # 2048 bytes into 4096
    small = bytearray(1024)
    submit(core, results, cdb_read10(0, 4), data_in=small)   # 2048 bytes into 1024
    lb.pump()
    under, over = results
    assert under.residual == 2048 and under.data_in_length == 2048
    assert over.residual == -1024 and over.data_in_length == 1024
    assert small == target.disk.data[:1024]


def test_window_of_one_against_the_fake_target() -> None:
    target = FakeTarget(cmd_window=1, initial_stat_sn=M - 3)
    lb, core = logged_in(target)
    results: list[Any] = []
    for i in range(20):
        submit(core, results, cdb_read10(i, 1), data_in=bytearray(512))
    lb.pump()
    assert len(results) == 20 and all(r.ok for r in results)
    assert not target.violations()
    assert core.exp_stat_sn < 100  # StatSN wrapped


def test_withheld_commands_and_a_window_that_closes() -> None:
    target = FakeTarget(cmd_window=4, hostile=Hostility(withhold=True))
    lb, core = logged_in(target)
    results: list[Any] = []
    for i in range(10):
        submit(core, results, cdb_read10(i, 1), data_in=bytearray(512))
    lb.pump()
    assert results == [] and len(lb.conn.held) == 4 and core.in_flight == 10
    target.hostile.withhold = False
    lb.conn.release()
    lb.pump()
    assert len(results) == 10 and not target.violations()


def test_target_pings_and_async_events_through_the_fake() -> None:
    target = FakeTarget()
    lb, core = logged_in(target)
    ttt = lb.conn.send_ping(b"are you there")
    lb.conn.send_async(P.AsyncEvent.SCSI_ASYNC_EVENT, lun=0, sense=SENSE_3F0E)
    lb.pump()
    assert lb.conn.ping_answers == [ttt]
    assert core.next_event() == Event(EventKind.SCSI_EVENT, sense=SENSE_3F0E)


def test_send_targets_with_continuation_through_the_fake() -> None:
    nodes = [TargetNode(f"iqn.2003-01.org.example:t{i}",
                        addresses=(f"10.0.0.{i}:3260,1", f"[2001:db8::{i}]:3260,2"))
             for i in range(40)]
    target = FakeTarget(nodes, text_chunk=100)
    lb = Loopback(target)
    success = lb.login(LoginMachine(initiator_name=INI, target_name=None, isid=1 << 47))
    assert isinstance(success, LoginSuccess)
    core = lb.start(success)
    answers: list[Any] = []
    core.text_request(b"SendTargets=All\0", answers.append)
    lb.pump()
    text = answers[0].data
    assert text.count(b"TargetName=") == 40 and b"[2001:db8::39]:3260,2" in text
    requests = [p for p in lb.conn.received if isinstance(p, P.TextRequest)]
    assert len(requests) > 10
    assert not target.violations()


def test_abort_and_lun_reset_through_the_fake() -> None:
    target = FakeTarget(hostile=Hostility(withhold=True))
    lb, core = logged_in(target)
    results: list[Any] = []
    a = submit(core, results, cdb_read10(0, 1), data_in=bytearray(512))
    submit(core, results, cdb_read10(1, 1), data_in=bytearray(512))
    lb.pump()
    answers: list[Any] = []
    core.abort_task(a, answers.append)
    lb.pump()
    assert answers[0].response == P.TMResponse.COMPLETE
    assert isinstance(results[0], TaskAborted) and len(results) == 1
    core.task_management(P.TMFunction.LOGICAL_UNIT_RESET, 0, answers.append)
    lb.pump()
    assert len(results) == 2 and isinstance(results[1], TaskAborted)
    assert not lb.conn.held and core.in_flight == 0


@pytest.mark.parametrize("hostile", [
    Hostility(wrong_itt=True),
    Hostility(data_in_overrun=100),
    Hostility(r2t_out_of_range=True),
    Hostility(corrupt_header_digest=1),
    Hostility(corrupt_data_digest=1),
], ids=["wrong_itt", "data_in_overrun", "r2t_out_of_range", "header_digest", "data_digest"])
def test_hostile_target_ends_in_a_protocol_error(hostile: Hostility) -> None:
    target = FakeTarget(settings=NegotiationSettings.rfc_defaults(
        header_digest=("CRC32C",), data_digest=("CRC32C",), immediate_data=False),
        hostile=hostile)
    lb, core = logged_in(target, header_digest="CRC32C", data_digest="CRC32C")
    results: list[Any] = []
    submit(core, results, cdb_read10(0, 8), data_in=bytearray(4096))
    submit(core, results, cdb_write10(0, 8), data_out=bytes(4096))
    with pytest.raises(RemoteProtocolError):
        lb.pump()


def test_bogus_window_is_ignored() -> None:
    target = FakeTarget(cmd_window=2)
    lb, core = logged_in(target)
    target.hostile.bogus_window = True
    results: list[Any] = []
    submit(core, results, cdb_read10(0, 1), data_in=bytearray(512))
    lb.pump()
    assert core.max_cmd_sn == 1   # the invalid MaxCmdSN < ExpCmdSN - 1 was ignored


def test_rejects_on_demand_through_the_fake() -> None:
    target = FakeTarget()
    lb, core = logged_in(target)
    lb.conn.reject_next[P.Opcode.SCSI_COMMAND] = P.RejectReason.INVALID_PDU_FIELD
    lb.conn.reject_next[P.Opcode.NOP_OUT] = P.RejectReason.COMMAND_NOT_SUPPORTED
    results: list[Any] = []
    submit(core, results, cdb_read10(0, 1), data_in=bytearray(512))
    submit(core, results, cdb_read10(1, 1), data_in=bytearray(512))
    answers: list[Any] = []
    core.ping(0.0, answers.append)
    lb.pump()
    assert isinstance(results[0], CommandError) and "invalid pdu field" in str(results[0])
    assert isinstance(results[1], CommandResult) and results[1].ok
    assert isinstance(answers[0], CommandError)


def test_bogus_statsn_does_not_stop_commands() -> None:
    target = FakeTarget(hostile=Hostility(bogus_stat_sn=True))
    lb, core = logged_in(target)
    results: list[Any] = []
    for i in range(3):
        submit(core, results, cdb_read10(i, 1), data_in=bytearray(512))
    lb.pump()
    assert len(results) == 3 and all(r.ok for r in results)


@pytest.mark.parametrize("pdu", [
    P.DataIn(itt=0x5555, data=bytes(16)),
    P.ScsiResponse(itt=0x5555),
    P.R2T(itt=0x5555, ttt=1, desired_data_transfer_length=512),
    P.NopIn(itt=0x5555),
    P.LoginResponse(),
], ids=lambda p: type(p).__name__)
def test_unsolicited_pdus_from_the_fake(pdu: P.PDU) -> None:
    target = FakeTarget()
    lb, _ = logged_in(target)
    lb.conn.inject(pdu)
    with pytest.raises(RemoteProtocolError):
        lb.pump()

