"""The userspace slot rule of the command ring (:class:`tcmu_handler.ring.CommandRing`),
synchronously: against a small kernel written with the codec over a ``bytearray`` (named
cases, and a hypothesis state machine of random interleavings checked against a list model),
and against the ring simulator.

What must hold, whatever the order commands finish in: slots are freed strictly in ring order;
each completion lands in the first CMD slot at the tail, PAD and TMR slots there skipped; the
CMD slots between the tail and the consume pointer are exactly the outstanding commands; when
nothing is outstanding the tail reaches the consume pointer, releasing trailing PAD and TMR
slots; ``cmd_tail`` in the mailbox changes only in ``done()``, after the responses; ``len_op``
is never touched; the kernel reaps every completion exactly once, with the right cmd_id.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tcmu_handler import ring
from tcmu_handler.errors import MalformedEntry, RingError, TCMUError
from tcmu_handler.ring import CmdEntry, CommandRing, InOrderCommandRing, SkippedEntry, TmrEntry
from tests.support.ring_simulator import (
    ALL_CAPS,
    PAGE_SIZE,
    CommandState,
    RingSimulator,
    SimCommand,
)
from tests.unit.tcmu_helpers import read10

MB = ring.MAILBOX_SIZE
SIZE = 1024
"""A small ring: it wraps every few entries, with PADs of every size."""
DATA = 4096
NO_OOOC = ring.MailboxFlag(ALL_CAPS & ~ring.MailboxFlag.OOOC)
CDBS = {6: bytes(6), 10: bytes([0x28]) + bytes(9), 12: bytes([0xA8]) + bytes(11),
        16: bytes([0x88]) + bytes(15)}
CHECK_CONDITION = 0x02
SENSE = bytes([0x70, 0, 0x0B, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x47, 0, 0, 0, 0, 0])


@dataclass
class Slot:
    """One entry the kernel queued, in ring order."""

    op: int
    offset: int
    length: int
    cmd_id: int = 0
    tmr_ids: tuple[int, ...] = ()


@dataclass
class Kernel:
    """The kernel side, reduced to what the slot rule touches, over a bytearray:
    ``queue_cmd_ring`` / ``queue_tmr_ring`` (PAD to the end of the ring when an entry does not
    fit before it, one byte always free, cmd_ids lowest-free as ``xa_alloc`` gives them) and
    ``tcmu_handle_completions`` (walk from the last cleaned slot to ``cmd_tail``, skip PAD and
    TMR, an unknown cmd_id breaks the ring)."""

    flags: ring.MailboxFlag = ALL_CAPS
    size: int = SIZE
    start: int = 0
    map: bytearray = field(init=False)
    view: memoryview = field(init=False)
    head: int = field(init=False)
    cleaned: int = field(init=False)
    slots: list[Slot] = field(default_factory=list)
    """Every entry ever queued, in ring order."""
    len_ops: dict[int, int] = field(default_factory=dict)
    """Ring offset -> len_op of the entries not reaped yet."""
    in_flight: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.map = bytearray(MB + self.size + DATA)
        self.view = memoryview(self.map)
        ring.write_mailbox(self.view, flags=self.flags, cmdr_size=self.size)
        self.head = self.cleaned = self.start
        ring.U32.pack_into(self.view, ring.MB_CMD_HEAD, self.start)
        ring.U32.pack_into(self.view, ring.MB_CMD_TAIL, self.start)

    @property
    def mailbox_tail(self) -> int:
        return int(ring.U32.unpack_from(self.view, ring.MB_CMD_TAIL)[0])

    def _place(self, op: int, length: int) -> int | None:
        pad = self.size - self.head if self.size - self.head < length else 0
        if pad + length > (self.cleaned - self.head - 1) % self.size:
            return None
        if pad:
            ring.write_pad(self.view, MB + self.head, pad)
            self._log(ring.Opcode.PAD, self.head, pad)
            self.head = 0
        off = self.head
        self.head = (self.head + length) % self.size
        return off

    def _log(self, op: int, off: int, length: int, **kw: object) -> Slot:
        slot = Slot(op, off, length, **kw)  # type: ignore[arg-type]
        self.slots.append(slot)
        self.len_ops[off] = length | op
        return slot

    def _publish_head(self) -> None:
        ring.U32.pack_into(self.view, ring.MB_CMD_HEAD, self.head)

    def queue_cmd(self, iov_cnt: int = 1, cdb_len: int = 10) -> int | None:
        length = ring.cmd_entry_size(iov_cnt, cdb_len)
        off = self._place(ring.Opcode.CMD, length)
        if off is None:
            return None
        cmd_id = min(set(range(1, len(self.in_flight) + 2)) - self.in_flight)
        ring.write_cmd(self.view, MB + off, cmd_id=cmd_id, length=length,
                       iovecs=[(MB + self.size, 512)] * iov_cnt, iov_bidi_cnt=0,
                       cdb_off=MB + off + ring.cmd_base_size(iov_cnt), cdb=CDBS[cdb_len])
        self._log(ring.Opcode.CMD, off, length, cmd_id=cmd_id)
        self.in_flight.add(cmd_id)
        self._publish_head()
        return cmd_id

    def cmd(self, iov_cnt: int = 1, cdb_len: int = 10) -> int:
        cmd_id = self.queue_cmd(iov_cnt, cdb_len)
        assert cmd_id is not None, "the ring is full"
        return cmd_id

    def queue_tmr(self, cmd_ids: tuple[int, ...]) -> bool:
        length = ring.tmr_entry_size(len(cmd_ids))
        off = self._place(ring.Opcode.TMR, length)
        if off is None:
            return False
        ring.write_tmr(self.view, MB + off, length=length, tmr_type=ring.TmrType.ABORT_TASK,
                       cmd_ids=cmd_ids)
        self._log(ring.Opcode.TMR, off, length, tmr_ids=cmd_ids)
        self._publish_head()
        return True

    def reap(self) -> list[ring.Response]:
        """``tcmu_handle_completions``: the responses from the last cleaned slot to cmd_tail."""
        tail = self.mailbox_tail
        out: list[ring.Response] = []
        while self.cleaned != tail:
            # A tail that is not an entry boundary runs into a KeyError here.
            len_op = self.len_ops.pop(self.cleaned)
            assert ring.U32.unpack_from(self.view, MB + self.cleaned)[0] == len_op, (
                f"len_op of the entry at {self.cleaned} was changed")
            if len_op & ring.OP_MASK == ring.Opcode.CMD:
                rsp = ring.read_response(self.view, MB + self.cleaned)
                assert rsp.cmd_id in self.in_flight, f"cmd_id {rsp.cmd_id} not found"
                self.in_flight.remove(rsp.cmd_id)
                out.append(rsp)
            self.cleaned = (self.cleaned + (len_op & ~ring.OP_MASK)) % self.size
        return out

    def len_ops_intact(self) -> bool:
        return all(ring.U32.unpack_from(self.view, MB + off)[0] == len_op
                   for off, len_op in self.len_ops.items())

    def cmd_slots_between(self, start: int, end: int) -> int:
        """CMD entries in the ring from offset ``start`` up to ``end`` (read from memory)."""
        n = 0
        for _ in range(len(self.len_ops) + 1):
            if start == end:
                return n
            op, length = ring.read_len_op(self.view, MB + start)
            n += op == ring.Opcode.CMD
            start = (start + length) % self.size
        raise AssertionError(f"{end} is not an entry boundary after {start}")


def take_all(slots: CommandRing) -> list[CmdEntry | TmrEntry | SkippedEntry]:
    slots.start()
    out: list[CmdEntry | TmrEntry | SkippedEntry] = []
    while (entry := slots.next_command()) is not None:
        out.append(entry)
        assert len(out) < 1000, "next_command() does not reach the head"
    return out


def ids(entries: Sequence[CmdEntry | TmrEntry | SkippedEntry | MalformedEntry]) -> list[int]:
    return [e.cmd_id for e in entries if isinstance(e, CmdEntry)]


# --- named cases -------------------------------------------------------------------------------


def test_over_picks_the_rule_the_mailbox_announces() -> None:
    assert type(CommandRing.over(Kernel().view)) is CommandRing
    assert type(CommandRing.over(Kernel(flags=NO_OOOC).view)) is InOrderCommandRing


def test_completions_in_any_order_free_slots_in_ring_order() -> None:
    k = Kernel()
    slots = CommandRing(k.view)
    a, b, c = (k.cmd() for _ in range(3))
    assert ids(take_all(slots)) == [a, b, c] and slots.outstanding == 3
    slots.complete(c)  # the last one first: it takes the first slot, a's
    assert slots.tail == 128 and slots.outstanding == 2
    assert slots.done()
    assert [r.cmd_id for r in k.reap()] == [c]
    slots.complete(a, CHECK_CONDITION, sense=SENSE)
    slots.complete(b)
    assert slots.tail == slots.consume == 384 and slots.outstanding == 0
    assert slots.done()
    reaped = k.reap()
    assert [(r.cmd_id, r.scsi_status) for r in reaped] == [(a, CHECK_CONDITION), (b, 0)]
    assert reaped[0].sense[:len(SENSE)] == SENSE
    assert k.in_flight == set() and k.len_ops_intact()


def test_cmd_tail_is_published_once_by_done_after_the_responses() -> None:
    k = Kernel()
    slots = CommandRing(k.view)
    a, b = k.cmd(), k.cmd()
    take_all(slots)
    slots.complete(b, 0x08)
    slots.complete(a)
    # The responses are in the slots already; the kernel cannot see them before done().
    assert ring.read_response(k.view, MB).cmd_id == b
    assert ring.read_response(k.view, MB + 128)[:3] == (a, 0, 0)
    assert k.mailbox_tail == 0 and k.reap() == []
    assert slots.done() is True
    assert k.mailbox_tail == slots.tail == 256
    assert slots.done() is False  # nothing moved: no second store, no write to the kernel
    assert [(r.cmd_id, r.scsi_status) for r in k.reap()] == [(b, 0x08), (a, 0)]


def test_tmr_in_the_middle_is_skipped_then_released() -> None:
    k = Kernel()
    slots = CommandRing(k.view)
    a, b = k.cmd(), k.cmd()
    assert k.queue_tmr((a,))
    c = k.cmd()  # ring: a, b, TMR, c
    entries = take_all(slots)
    assert [type(e) for e in entries] == [CmdEntry, CmdEntry, TmrEntry, CmdEntry]
    tmr = entries[2]
    assert isinstance(tmr, TmrEntry) and tmr.cmd_ids == (a,)
    slots.complete(b)
    slots.complete(a)
    assert slots.tail == 256  # stops at the TMR slot while c is outstanding
    slots.complete(c)  # c's own slot, past the TMR
    assert slots.tail == slots.consume == 256 + 40 + 128
    slots.done()
    assert [r.cmd_id for r in k.reap()] == [b, a, c] and k.len_ops_intact()


def test_trailing_pad_and_tmr_are_released_when_nothing_is_outstanding() -> None:
    k = Kernel(size=512)
    slots = CommandRing(k.view)
    a, b = k.cmd(), k.cmd(iov_cnt=5)  # 128 + 144 bytes
    take_all(slots)
    slots.complete(a)
    slots.complete(b)
    slots.done()
    k.reap()
    assert k.queue_tmr((b,))  # 40 bytes at 272
    c = k.cmd(iov_cnt=9)  # 208 bytes do not fit in the 200 left: PAD 200, then at 0
    assert [s.op for s in k.slots[2:]] == [ring.Opcode.TMR, ring.Opcode.PAD, ring.Opcode.CMD]
    slots.start()
    assert isinstance(slots.next_command(), TmrEntry)
    # Nothing outstanding, but the consume pointer has not reached the head yet.
    assert slots.tail == 272 and slots.consume == 312
    assert ids([e for e in [slots.next_command()] if e is not None]) == [c]
    assert slots.wraps == 1 and slots.pads == 1 and slots.tail == 272
    slots.complete(c)
    assert slots.tail == slots.consume == 208  # TMR, PAD and c's slot released together
    slots.done()
    assert [r.cmd_id for r in k.reap()] == [c] and k.cleaned == 208
    # A TMR as the last entry, nothing outstanding: the scan itself releases it.
    assert k.queue_tmr((c,))
    assert [type(e) for e in take_all(slots)] == [TmrEntry]
    assert slots.tail == slots.consume == 248 and slots.done()
    assert k.reap() == [] and k.cleaned == 248


def test_cmd_ids_come_back_once_reaped() -> None:
    k = Kernel()
    slots = CommandRing(k.view)
    seen: list[int] = []
    for _ in range(20):  # far more commands than fit in the ring at once
        a, b = k.cmd(), k.cmd()
        got = ids(take_all(slots))
        seen += got
        slots.complete(b)
        slots.complete(a)
        assert slots.done()
        assert [r.cmd_id for r in k.reap()] == [b, a]
    assert set(seen) == {1, 2} and slots.wraps >= 4 and slots.outstanding == 0


def test_wrap_around_with_commands_outstanding() -> None:
    k = Kernel(size=512)
    slots = CommandRing(k.view)
    a, b, c = k.cmd(), k.cmd(), k.cmd()  # 0, 128, 256
    take_all(slots)
    slots.complete(a)
    slots.done()
    k.reap()  # frees 0..128
    d = k.cmd()  # 384..512 fits exactly: head wraps to 0 without a PAD
    assert k.head == 0
    e = k.cmd(iov_cnt=0, cdb_len=6)  # at 0
    assert e is not None and k.head == 120
    assert ids(take_all(slots)) == [d, e] and slots.wraps == 1 and slots.pads == 0
    for cmd_id in (e, d, c, b):
        slots.complete(cmd_id)
    assert slots.tail == slots.consume == 120
    slots.done()
    assert [r.cmd_id for r in k.reap()] == [e, d, c, b]


def test_restart_serves_the_ring_again_from_cmd_tail() -> None:
    k = Kernel(start=256)
    a = k.cmd()
    slots = CommandRing(k.view)
    assert (slots.tail, slots.consume) == (256, 256)
    assert ids(take_all(slots)) == [a]
    slots.complete(a)
    assert slots.done() and k.mailbox_tail == 384 and [r.cmd_id for r in k.reap()] == [a]


def test_malformed_command_is_outstanding_until_completed() -> None:
    k = Kernel()
    slots = CommandRing(k.view)
    bad, good = k.cmd(), k.cmd()
    ring.U32.pack_into(k.view, MB + ring.REQ_IOV_DIF_CNT, 1)
    slots.start()
    with pytest.raises(MalformedEntry) as info:
        slots.next_command()
    assert info.value.cmd_id == bad and slots.outstanding == 1
    assert ids(take_all(slots)) == [good]
    slots.complete(good)
    slots.complete(bad, CHECK_CONDITION, uflags=ring.UFlag.UNKNOWN_OP)
    slots.done()
    assert [(r.cmd_id, r.uflags) for r in k.reap()] == [(good, 0), (bad, ring.UFlag.UNKNOWN_OP)]


def test_unknown_opcode_and_bad_tmr_are_passed_over() -> None:
    k = Kernel()
    slots = CommandRing(k.view)
    assert k.queue_tmr((1,)) and k.queue_tmr(())
    ring.U32.pack_into(k.view, MB, 40 | 5)  # opcode 5
    ring.U32.pack_into(k.view, MB + 40 + ring.TMR_CMD_CNT, 9)  # 9 ids in a 32-byte entry
    k.len_ops = {0: 40 | 5, 40: 32 | ring.Opcode.TMR}
    unknown, bad_tmr = take_all(slots)
    assert unknown == SkippedEntry(0, 5, "unknown opcode 5")
    assert isinstance(bad_tmr, SkippedEntry) and bad_tmr[:2] == (40, ring.Opcode.TMR)
    assert "lists 9 commands but is only 32 bytes long" in bad_tmr.reason
    assert slots.tail == slots.consume == 72 and slots.done() and k.reap() == []


def test_completing_more_than_is_outstanding_is_refused() -> None:
    for flags in (ALL_CAPS, NO_OOOC):
        k = Kernel(flags=flags)
        slots = CommandRing.over(k.view)
        a = k.cmd()
        take_all(slots)
        slots.complete(a)
        with pytest.raises(TCMUError, match="outstanding"):
            slots.complete(a)


@pytest.mark.parametrize("what", ["head", "length", "tail"])
def test_a_ring_rewritten_underneath_is_a_ring_error(what: str) -> None:
    k = Kernel()
    k.cmd()
    if what == "tail":
        ring.U32.pack_into(k.view, ring.MB_CMD_TAIL, 12)
        with pytest.raises(RingError, match="cmd_tail 12 is not a slot"):
            CommandRing(k.view, name="disk0")
        return
    slots = CommandRing(k.view, name="disk0")
    if what == "head":
        ring.U32.pack_into(k.view, ring.MB_CMD_HEAD, SIZE)
        with pytest.raises(RingError, match="disk0: cmd_head 1024"):
            slots.start()
    else:
        ring.U32.pack_into(k.view, MB, ring.Opcode.CMD)  # a CMD of length 0
        slots.start()
        with pytest.raises(RingError, match="claims 0 bytes"):
            slots.next_command()


def test_take_returns_the_batch_with_a_malformed_entry_in_its_place() -> None:
    k = Kernel()
    a, bad = k.cmd(), k.cmd()
    k.queue_tmr((a,))
    c = k.cmd(iov_cnt=3)
    bad_off = next(s.offset for s in k.slots if s.cmd_id == bad)
    ring.U32.pack_into(k.view, MB + bad_off + ring.REQ_IOV_DIF_CNT, 1)
    slots = CommandRing(k.view)
    slots.start()
    entries = slots.take()
    assert [type(e) for e in entries] == [CmdEntry, MalformedEntry, TmrEntry, CmdEntry]
    assert ids(entries) == [a, c] and isinstance(entries[1], MalformedEntry)
    assert entries[1].cmd_id == bad and slots.outstanding == 3
    assert slots.take() == []
    for cmd_id in (c, bad, a):
        slots.complete(cmd_id)
    assert slots.done() and sorted(r.cmd_id for r in k.reap()) == sorted([a, bad, c])
    assert slots.tail == slots.consume == k.head


def test_take_serves_the_entries_before_a_bad_one_then_raises() -> None:
    k = Kernel()
    a = k.cmd()
    b = k.cmd()
    b_off = next(s.offset for s in k.slots if s.cmd_id == b)
    ring.U32.pack_into(k.view, MB + b_off, ring.Opcode.CMD)  # a CMD of length 0
    slots = CommandRing(k.view, name="disk0")
    slots.start()
    assert ids(slots.take()) == [a] and slots.outstanding == 1
    with pytest.raises(RingError, match=r"disk0: entry at ring offset \d+ claims 0 bytes"):
        slots.take()
    assert slots.consume == b_off


def test_take_with_a_limit_stops_there() -> None:
    k = Kernel()
    a, b, c = k.cmd(), k.cmd(), k.cmd()
    slots = CommandRing(k.view)
    slots.start()
    assert ids(slots.take(2)) == [a, b] and slots.outstanding == 2
    assert ids(slots.take(2)) == [c] and slots.take(2) == []


def test_no_cmd_slot_at_the_tail_is_a_ring_error() -> None:
    k = Kernel()
    slots = CommandRing(k.view)
    k.cmd()
    take_all(slots)
    ring.U32.pack_into(k.view, MB, 128 | ring.Opcode.PAD)  # someone rewrote the slot
    with pytest.raises(RingError, match="no CMD slot left"):
        slots.complete(1)


def test_in_order_holds_completions_until_the_earlier_ones() -> None:
    k = Kernel(flags=NO_OOOC)
    slots = CommandRing.over(k.view)
    assert isinstance(slots, InOrderCommandRing)
    a, b, c = k.cmd(), k.cmd(), k.cmd()
    take_all(slots)
    slots.complete(c)
    slots.complete(b, 0x08)
    assert slots.tail == 0 and slots.held == 2 and slots.done() is False
    slots.complete(a)
    assert slots.tail == slots.consume == 384 and slots.held == 0 and slots.outstanding == 0
    slots.done()
    # Each response in the command's own slot, in ring order.
    assert [(r.cmd_id, r.scsi_status) for r in k.reap()] == [(a, 0), (b, 0x08), (c, 0)]


def test_in_order_refuses_a_slot_that_no_completed_command_owns() -> None:
    k = Kernel(flags=NO_OOOC)
    slots = CommandRing.over(k.view)
    k.cmd()
    take_all(slots)
    ring.ENTRY_HDR.pack_into(k.view, MB, 128 | ring.Opcode.CMD, 77, 0, 0)
    with pytest.raises(RingError, match="holds cmd_id 77"):
        slots.complete(1)


def test_release_drops_the_view_of_the_map() -> None:
    k = Kernel()
    slots = CommandRing(k.view)
    slots.release()
    with pytest.raises(ValueError, match="released"):
        slots.start()
    k.view.release()
    k.map.extend(b"\0")  # the ring kept no export of the buffer: it can be resized (unmapped)


# --- random interleavings against a model ------------------------------------------------------


class SlotRuleMachine(RuleBasedStateMachine):
    """The kernel queues commands and TMRs, the handler takes entries, completes commands in
    any order and publishes; after every step the ring must agree with a list model of the
    slot rule, and the memory with the invariant."""

    flags = ALL_CAPS

    def __init__(self) -> None:
        super().__init__()
        self.kernel = Kernel(flags=self.flags)
        self.slots = CommandRing.over(self.kernel.view)
        # The model: indexes into kernel.slots (every entry in ring order).
        self.consumed = 0  # entries taken by the handler
        self.released = 0  # entries before the tail
        self.running: list[int] = []  # taken, not completed: what the handler may complete
        self.unanswered = 0  # CMD slots taken and not written
        self.pending: dict[int, int] = {}  # in order only: completed, waiting (id -> status)
        self.expected: list[tuple[int, int]] = []  # (cmd_id, status) the next reap must see

    def _offset(self, index: int) -> int:
        slots = self.kernel.slots
        return slots[index].offset if index < len(slots) else self.kernel.head

    def _first_cmd(self, index: int) -> int:
        while self.kernel.slots[index].op != ring.Opcode.CMD:
            index += 1
        return index

    def _release_all_if_idle(self) -> None:
        if not self.unanswered:
            self.released = self.consumed

    @rule(iov_cnt=st.integers(0, 9), cdb_len=st.sampled_from(sorted(CDBS)))
    def queue_cmd(self, iov_cnt: int, cdb_len: int) -> None:
        self.kernel.queue_cmd(iov_cnt, cdb_len)

    @rule(data=st.data())
    def queue_tmr(self, data: st.DataObject) -> None:
        listed = data.draw(st.lists(st.sampled_from(sorted(self.kernel.in_flight or {1})),
                                    max_size=4, unique=True))
        self.kernel.queue_tmr(tuple(listed))

    @rule(count=st.integers(1, 4))
    def take(self, count: int) -> None:
        self.slots.start()
        for _ in range(count):
            entry = self.slots.next_command()
            slots = self.kernel.slots
            while self.consumed < len(slots) and slots[self.consumed].op == ring.Opcode.PAD:
                self.consumed += 1
            if self.consumed == len(slots):
                assert entry is None
                self._release_all_if_idle()
                return
            slot = slots[self.consumed]
            self.consumed += 1
            if slot.op == ring.Opcode.CMD:
                assert isinstance(entry, CmdEntry) and entry.cmd_id == slot.cmd_id
                self.running.append(slot.cmd_id)
                self.unanswered += 1
            else:
                assert isinstance(entry, TmrEntry) and entry.cmd_ids == slot.tmr_ids

    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        if not self.running:
            return
        cmd_id = self.running.pop(data.draw(st.integers(0, len(self.running) - 1)))
        status = data.draw(st.sampled_from([0, CHECK_CONDITION, 0x08]))
        published = self.kernel.mailbox_tail
        self.slots.complete(cmd_id, status,
                            sense=SENSE if status == CHECK_CONDITION else None)
        assert self.kernel.mailbox_tail == published  # only done() publishes
        if self.flags & ring.MailboxFlag.OOOC:
            self.released = self._first_cmd(self.released) + 1
            self.unanswered -= 1
            self.expected.append((cmd_id, status))
        else:
            self.pending[cmd_id] = status
            while self.unanswered:
                first = self._first_cmd(self.released)
                own = self.kernel.slots[first].cmd_id
                if own not in self.pending:
                    break
                self.released = first + 1
                self.unanswered -= 1
                self.expected.append((own, self.pending.pop(own)))
        self._release_all_if_idle()

    @rule()
    def publish_and_reap(self) -> None:
        moved = self.kernel.mailbox_tail != self.slots.tail
        assert self.slots.done() is moved
        assert self.kernel.mailbox_tail == self.slots.tail
        reaped = self.kernel.reap()
        assert [(r.cmd_id, r.scsi_status) for r in reaped] == self.expected
        for r in reaped:
            if r.scsi_status == CHECK_CONDITION:
                assert r.sense[:len(SENSE)] == SENSE
        self.expected = []

    @invariant()
    def ring_agrees_with_the_model(self) -> None:
        assert self.slots.consume == self._offset(self.consumed)
        assert self.slots.tail == self._offset(self.released)
        assert self.slots.outstanding == self.unanswered
        if isinstance(self.slots, InOrderCommandRing):
            assert self.slots.held == len(self.pending)

    @invariant()
    def cmd_slots_between_tail_and_consume_are_the_outstanding_ones(self) -> None:
        k = self.kernel
        assert k.cmd_slots_between(self.slots.tail, self.slots.consume) == self.slots.outstanding
        assert k.len_ops_intact()


SETTINGS = settings(max_examples=100, stateful_step_count=50, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


class InOrderSlotRuleMachine(SlotRuleMachine):
    flags = NO_OOOC


TestSlotRuleOutOfOrder = SlotRuleMachine.TestCase
TestSlotRuleOutOfOrder.settings = SETTINGS
TestSlotRuleInOrder = InOrderSlotRuleMachine.TestCase
TestSlotRuleInOrder.settings = SETTINGS


# --- against the ring simulator (the kernel's own rules, cmd_id allocation, qfull) ------------


@pytest.mark.parametrize("flags", [ALL_CAPS, NO_OOOC], ids=["ooo", "in-order"])
def test_random_load_through_the_simulated_kernel(flags: ring.MailboxFlag) -> None:
    sim = RingSimulator(cmdr_size=4 * 1024 - MB, data_size=64 * PAGE_SIZE, flags=flags)
    rng = random.Random(11)
    device = sim.open()
    slots = CommandRing.over(device.view)
    done: list[SimCommand] = []
    submitted: list[SimCommand] = []
    running: list[int] = []
    for _ in range(400):
        for _ in range(rng.randrange(4)):
            submitted.append(sim.submit(read10(len(submitted)), data_in=rng.choice((512, 4096)),
                                        gather=False, on_complete=done.append))
        if rng.random() < 0.2 and running:
            on_ring = [c for c in submitted if c.state is CommandState.ON_RING]
            sim.tmr(ring.TmrType.ABORT_TASK, on_ring[:2])
        running += ids(take_all(slots))
        rng.shuffle(running)
        for _ in range(rng.randrange(len(running) + 1)):
            slots.complete(running.pop())
        if slots.done():
            device.notify()
        sim.process()
    while running or sim.queued:
        running += ids(take_all(slots))
        while running:
            slots.complete(running.pop())
        if slots.done():
            device.notify()
        sim.process()
    assert sim.problems == [] and sim.idle
    assert len(done) == len(submitted) and all(c.status == 0 for c in done)
    assert slots.wraps > 10 and slots.pads > 0
    slots.release()
    device.close()
    sim.close()
