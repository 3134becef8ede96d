"""The simulator behaves as target_core_user.c does (checked with a minimal in-order handler
written against the codec only, not with the dispatcher)."""

from __future__ import annotations

import faulthandler
import os
import random
import signal
import struct
from collections.abc import Iterator

import pytest

from initiator.command import ScsiStatus
from tcmu_handler import ring
from tcmu_handler.errors import DeviceBusy, DeviceRemoved
from tests.support.ring_simulator import (
    PAGE_SIZE,
    CommandState,
    RingSimulator,
    SimCommand,
    SimulatorError,
)
from tests.unit.tcmu_helpers import InOrderHandler, read10, write10, xdwriteread10

RING = 4096 - ring.MAILBOX_SIZE  # the smallest ring: 3968 bytes
VARLEN = bytes([0x7F, 0, 0, 0, 0, 0, 0, 0x18, 0, 0x09]) + bytes(22)  # READ(32): 32-byte CDB


@pytest.fixture
def sim() -> Iterator[RingSimulator]:
    s = RingSimulator(cmdr_size=RING, data_size=64 * PAGE_SIZE, strict=False)
    yield s
    s.close()


def state(cmd: SimCommand) -> CommandState:
    """``cmd.state`` (a call, so that mypy does not keep an old narrowing across actions)."""
    return cmd.state


def cmds(entries: list[tuple[int, ring.Entry]]) -> list[ring.CmdEntry]:
    return [e for _, e in entries if isinstance(e, ring.CmdEntry)]


def test_entry_layout_follows_queue_cmd_ring(sim: RingSimulator) -> None:
    h = InOrderHandler(sim.open())
    c = sim.submit(read10(1), data_in=3 * PAGE_SIZE + 100)
    w = sim.submit(write10(2), data_out=b"\xab" * 5000)
    (p0, e0), (p1, e1) = h.entries()
    assert isinstance(e0, ring.CmdEntry) and isinstance(e1, ring.CmdEntry)
    assert (p0, p1) == (0, 128)
    assert e0.cmd_id == c.cmd_id == 1 and e1.cmd_id == w.cmd_id == 2
    assert e0.length == ring.cmd_entry_size(1, 10) == 128
    assert e0.cdb_off == ring.MAILBOX_SIZE + 0 + 112 and e0.cdb == read10(1)
    # Four consecutive blocks merge into one iovec; the next command gets the next blocks.
    assert e0.iovecs == ((sim.data_off, 3 * PAGE_SIZE + 100),)
    assert e1.iovecs == ((sim.data_off + 4 * PAGE_SIZE, 5000),)
    assert bytes(h.view[sim.data_off + 4 * PAGE_SIZE:][:5000]) == b"\xab" * 5000
    assert sim.head == 256 and state(c) is CommandState.ON_RING


def test_fragmented_blocks_make_several_iovecs(sim: RingSimulator) -> None:
    h = InOrderHandler(sim.open())
    a, b, _c = (sim.submit(read10(i), data_in=PAGE_SIZE) for i in range(3))
    h.entries()
    h.complete(b.cmd_id)  # frees block 1 (into the slot of a: the OOOC rule)
    sim.process()
    assert state(b) is CommandState.COMPLETED and state(a) is CommandState.ON_RING
    d = sim.submit(read10(3), data_in=3 * PAGE_SIZE)
    (e,) = cmds(h.entries())
    off = sim.data_off
    assert e.iovecs == ((off + PAGE_SIZE, PAGE_SIZE), (off + 3 * PAGE_SIZE, 2 * PAGE_SIZE))
    assert e.cmd_id == d.cmd_id == 2  # the lowest free id is reused at once


def test_pad_to_the_end_of_the_ring_then_wrap(sim: RingSimulator) -> None:
    h = InOrderHandler(sim.open())
    first = [sim.submit(VARLEN, data_in=512) for _ in range(20)]  # 144-byte entries
    for e in cmds(h.entries()):
        h.complete(e.cmd_id, notify=False)
    h.publish()
    sim.process()
    assert all(state(c) is CommandState.COMPLETED for c in first)
    assert sim.last_cleaned == 20 * 144
    for _ in range(8):
        sim.submit(VARLEN, data_in=512)
    entries = h.entries()
    pads = [(pos, e) for pos, e in entries if isinstance(e, ring.PadEntry)]
    assert pads == [(20 * 144 + 7 * 144, ring.PadEntry(RING - 27 * 144))]
    assert entries[-1][0] == 0 and isinstance(entries[-1][1], ring.CmdEntry)
    assert sim.head == 144


def test_free_space_rule_keeps_one_byte(sim: RingSimulator) -> None:
    h = InOrderHandler(sim.open())
    on_ring = [sim.submit(read10(i), data_in=1) for i in range(31)]  # 128-byte entries
    # 30 entries use 3840 bytes; 127 are free, one byte short of the 31st entry.
    assert sim.queued == 1 and state(on_ring[30]) is CommandState.QUEUED
    entries = cmds(h.entries())
    assert len(entries) == 30
    h.complete(entries[0].cmd_id)
    sim.process()
    assert sim.queued == 0 and state(on_ring[30]) is CommandState.ON_RING
    assert sim.head == 0  # it exactly filled the ring up to its end
    queued = sim.submit(read10(99), data_in=1)
    assert state(queued) is CommandState.QUEUED  # used 3840 again: 127 free


def test_qfull_queue_is_served_in_order_after_reaping(sim: RingSimulator) -> None:
    h = InOrderHandler(sim.open())
    big = [sim.submit(read10(i), data_in=16 * PAGE_SIZE) for i in range(6)]
    assert [c.state for c in big].count(CommandState.ON_RING) == 4  # 64 data pages
    for e in cmds(h.entries()):
        h.complete(e.cmd_id, notify=False)
    h.publish()
    sim.process()
    assert [c.state for c in big] == [CommandState.COMPLETED] * 4 + [CommandState.ON_RING] * 2
    assert [e.cdb for e in cmds(h.entries())] == [read10(4), read10(5)]


def test_refused_commands(sim: RingSimulator) -> None:
    sim.open()
    too_big = sim.submit(read10(1), data_in=65 * PAGE_SIZE)
    assert state(too_big) is CommandState.FAILED
    assert too_big.status == ScsiStatus.CHECK_CONDITION and "too big" in str(too_big.kernel_reason)
    strict_sim = RingSimulator(cmdr_size=RING, data_size=4 * PAGE_SIZE, strict=False,
                               qfull_time_out=0)
    try:
        strict_sim.submit(read10(1), data_in=4 * PAGE_SIZE)
        refused = strict_sim.submit(read10(2), data_in=PAGE_SIZE)
        assert state(refused) is CommandState.FAILED and "OUT_OF_RESOURCES" in str(
            refused.kernel_reason)
    finally:
        strict_sim.close()


def test_unknown_cmd_id_breaks_the_ring(sim: RingSimulator) -> None:
    h = InOrderHandler(sim.open())
    sim.submit(read10(1), data_in=512)
    h.entries()
    h.complete(999)
    sim.process()
    assert sim.broken and sim.errors == ["cmd_id 999 not found, ring is broken"]
    later = sim.submit(read10(2), data_in=512)
    assert state(later) is CommandState.FAILED and "COMMUNICATION_FAILURE" in str(
        later.kernel_reason)
    sim.reset_ring(1)
    assert (sim.broken, sim.head, sim.tail) == (False, 0, 0)
    assert sim.submit(read10(3), data_in=512).state is CommandState.ON_RING


def _fill(h: InOrderHandler, e: ring.CmdEntry, data: bytes) -> None:
    pos = 0
    for off, n in e.iovecs:
        h.view[off:off + n] = data[pos:pos + n]
        pos += n


def test_read_len_sense_and_unknown_op(sim: RingSimulator) -> None:
    h = InOrderHandler(sim.open())
    data = bytes(range(256)) * 32
    short = sim.submit(read10(1), data_in=8192)
    zero_len = sim.submit(read10(2), data_in=8192)
    write = sim.submit(write10(3), data_out=b"x" * 8192)
    cc_no_len = sim.submit(read10(4), data_in=8192)
    cc_len = sim.submit(read10(5), data_in=8192)
    good_with_sense = sim.submit(read10(6), data_in=512)
    unknown = sim.submit(read10(7), data_in=512)
    es = cmds(h.entries())
    for e in es:
        if e.cdb[0] == 0x28:
            _fill(h, e, data)
    sense = bytes([0x70, 0, 3, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x11, 0, 0, 0, 0, 0])
    rl = ring.UFlag.READ_LEN
    h.complete(es[0].cmd_id, uflags=rl, read_len=1000, notify=False)
    h.complete(es[1].cmd_id, uflags=rl, read_len=0, notify=False)
    h.complete(es[2].cmd_id, uflags=rl, read_len=10, notify=False)
    h.complete(es[3].cmd_id, 2, sense=sense, notify=False)
    h.complete(es[4].cmd_id, 2, uflags=rl, read_len=300, sense=sense, notify=False)
    h.complete(es[5].cmd_id, 0, sense=sense, notify=False)
    h.complete(es[6].cmd_id, 0, uflags=ring.UFlag.UNKNOWN_OP, notify=False)
    h.publish()
    sim.process()
    assert (short.read_len, short.residual, short.data_in) == (1000, 7192, data[:1000])
    assert (zero_len.read_len, zero_len.residual, zero_len.data_in) == (8192, 0, data)
    assert write.read_len is None and write.residual == 0
    assert cc_no_len.status == 2 and cc_no_len.sense == sense + bytes(78)
    assert cc_no_len.data_in is None  # CHECK CONDITION without READ_LEN: no data
    assert cc_len.status == 2 and cc_len.data_in == data[:300] and cc_len.residual == 7892
    assert good_with_sense.status == 0 and good_with_sense.sense == b""
    assert unknown.unknown_op and unknown.status == ScsiStatus.CHECK_CONDITION
    assert sim.problems == [] and sim.idle


def test_bidi_layout_and_gather_quirk(sim: RingSimulator) -> None:
    h = InOrderHandler(sim.open())
    a = sim.submit(xdwriteread10(1), data_out=b"o" * 5000, data_in=3000)
    b = sim.submit(xdwriteread10(2), data_out=b"p" * 1000, data_in=3000)
    ea, eb = cmds(h.entries())
    assert (ea.iov_cnt, ea.iov_bidi_cnt) == (1, 1)
    out, inn = ea.bidi_split()
    assert out == ((sim.data_off, 5000),) and inn == ((sim.data_off + 2 * PAGE_SIZE, 3000),)
    _fill(h, ea._replace(iovecs=inn), b"i" * 3000)
    _fill(h, eb._replace(iovecs=eb.bidi_split()[1]), b"j" * 3000)
    h.complete(ea.cmd_id, notify=False)
    h.complete(eb.cmd_id)
    sim.process()
    assert a.data_in == b"i" * 3000
    # gather_data_area copies se_cmd->data_length (the Data-Out length) bytes: 1000, not 3000.
    assert b.data_in == b"j" * 1000


def test_tmr_entries(sim: RingSimulator) -> None:
    h = InOrderHandler(sim.open())
    on_ring = [sim.submit(read10(i), data_in=16 * PAGE_SIZE) for i in range(4)]
    waiting = sim.submit(read10(9), data_in=PAGE_SIZE)
    assert state(waiting) is CommandState.QUEUED
    h.entries()
    sim.tmr(ring.TmrType.ABORT_TASK_SET, [on_ring[1], waiting, on_ring[3]])
    assert state(waiting) is CommandState.FAILED and waiting.status == ScsiStatus.TASK_ABORTED
    assert on_ring[1].aborted and not on_ring[0].aborted
    (pos, tmr), = h.entries()
    assert pos == 4 * 128
    assert tmr == ring.TmrEntry(40, ring.TmrType.ABORT_TASK_SET,
                                (on_ring[1].cmd_id, on_ring[3].cmd_id))
    for c in on_ring:
        h.complete(c.cmd_id, notify=False)
    h.release_trailing()
    sim.process()
    assert sim.idle and sim.problems == []


def test_tmr_notification_off_and_tmr_queue(sim: RingSimulator) -> None:
    sim.tmr_notification = False
    h = InOrderHandler(sim.open())
    c = sim.submit(read10(1), data_in=512)
    sim.tmr(ring.TmrType.ABORT_TASK, [c])
    assert cmds(h.entries()) and sim.head == 128  # no TMR entry
    sim.tmr_notification = True
    fill = [sim.submit(read10(i), data_in=1) for i in range(2, 31)]  # ring full but 127 bytes
    sim.tmr(ring.TmrType.LUN_RESET, [c, *fill])  # 32 + 60 ids -> 96 bytes: fits
    sim.tmr(ring.TmrType.ABORT_TASK, [c])  # 40 bytes: no room, waits on the TMR queue
    entries = h.entries()
    assert [type(e) for _, e in entries].count(ring.TmrEntry) == 1
    h.complete(c.cmd_id)
    sim.process()
    late = [e for _, e in h.entries() if isinstance(e, ring.TmrEntry)]
    # Queued while c was on the ring; by now c is reaped and its id means nothing.
    assert late == [ring.TmrEntry(40, ring.TmrType.ABORT_TASK, (c.cmd_id,))]


def test_block_and_reset_ring(sim: RingSimulator) -> None:
    h = InOrderHandler(sim.open())
    done: list[SimCommand] = []
    a = sim.submit(read10(1), data_in=60 * PAGE_SIZE, on_complete=done.append)
    b = sim.submit(read10(2), data_in=PAGE_SIZE, on_complete=done.append)
    c = sim.submit(read10(3), data_in=10 * PAGE_SIZE, on_complete=done.append)
    assert state(c) is CommandState.QUEUED
    (ea, _eb) = cmds(h.entries())
    h.complete(ea.cmd_id, notify=False)
    h.publish(notify=False)  # completed but the handler "died" before the write
    sim.block()
    # block_dev reaps what was completed, and fails what waits for space with BUSY.
    assert state(a) is CommandState.COMPLETED and c.status == ScsiStatus.BUSY
    refused = sim.submit(read10(4), data_in=512, on_complete=done.append)
    assert refused.status == ScsiStatus.BUSY and "blocked" in str(refused.kernel_reason)
    sim.reset_ring(1)
    assert state(b) is CommandState.FAILED and b.status == ScsiStatus.BUSY
    assert (sim.head, sim.tail, sim.last_cleaned, sim.used_blocks) == (0, 0, 0, 0)
    sim.unblock()
    assert [x.cdb for x in done] == [read10(1), read10(3), read10(4), read10(2)]
    h2 = InOrderHandler(h.device)  # a fresh start: the mailbox says tail 0
    d = sim.submit(read10(5), data_in=512)
    (e,) = cmds(h2.entries())
    assert e.cmd_id == d.cmd_id == 1
    h2.complete(e.cmd_id)
    sim.process()
    assert d.status == 0 and sim.problems == [] and sim.idle
    with pytest.raises(SimulatorError):
        sim.reset_ring(3)


def test_expired_command_keeps_its_slot(sim: RingSimulator) -> None:
    h = InOrderHandler(sim.open())
    done: list[SimCommand] = []
    c = sim.submit(read10(1), data_in=PAGE_SIZE, on_complete=done.append)
    (e,) = cmds(h.entries())
    sim.expire(c)
    assert done == [c] and c.status == ScsiStatus.CHECK_CONDITION and c.expired
    assert sim.used_blocks == 1 and sim.on_ring == 1
    h.complete(e.cmd_id)
    sim.process()
    assert done == [c] and sim.idle and sim.problems == []


def test_keep_buf(sim: RingSimulator) -> None:
    h = InOrderHandler(sim.open())
    a = sim.submit(read10(1), data_in=PAGE_SIZE)
    sim.submit(read10(2), data_in=PAGE_SIZE)
    ea, eb = cmds(h.entries())
    h.complete(ea.cmd_id, uflags=ring.UFlag.KEEP_BUF)
    sim.process()
    assert state(a) is CommandState.COMPLETED and sim.used_blocks == 2 and sim.on_ring == 2
    assert sim.submit(read10(3), data_in=1).cmd_id == 3  # id 1 is still taken
    sim.free_kept_buf(ea.cmd_id)
    assert sim.used_blocks == 2 and sim.on_ring == 2
    with pytest.raises(SimulatorError):
        sim.free_kept_buf(ea.cmd_id)
    h.complete(eb.cmd_id, uflags=ring.UFlag.KEEP_BUF)
    h.complete(eb.cmd_id)  # a second completion of a kept command breaks the ring
    sim.process()
    assert sim.broken and "already completed with KEEP_BUF" in sim.errors[0]


def test_reclaim_releases_pages_and_reallocation_zeroes_them(sim: RingSimulator) -> None:
    h = InOrderHandler(sim.open())
    c = sim.submit(read10(1), data_in=4 * PAGE_SIZE)
    (e,) = cmds(h.entries())
    _fill(h, e, b"\x77" * 4 * PAGE_SIZE)
    h.complete(e.cmd_id, notify=False)
    h.publish()
    assert state(c) is CommandState.ON_RING  # not reaped before the kernel looks
    assert sim.reclaim() == 4  # reaps first, then frees everything (idle)
    assert state(c) is CommandState.COMPLETED and sim.dbi_thresh == 0
    assert bytes(sim.kernel_view()[sim.data_off:sim.data_off + 4]) == b"\xa5" * 4
    d = sim.submit(read10(2), data_in=PAGE_SIZE)
    (e2,) = cmds(h.entries())
    h.complete(e2.cmd_id)
    sim.process()
    assert d.data_in == bytes(PAGE_SIZE)
    assert sim.reclaim() == 1 and sim.reclaim() == 0


def test_reclaim_keeps_blocks_below_the_last_used_one(sim: RingSimulator) -> None:
    h = InOrderHandler(sim.open())
    cs = [sim.submit(read10(i), data_in=PAGE_SIZE) for i in range(4)]
    es = cmds(h.entries())
    for e in es[2:]:
        h.complete(e.cmd_id, notify=False)
    h.publish()
    sim.process()
    assert [c.state for c in cs].count(CommandState.COMPLETED) == 2
    assert sim.reclaim() == 2 and sim.dbi_thresh == 2 and sim.dbi_max == 1


def test_handler_mistakes_are_recorded(sim: RingSimulator) -> None:
    dev = sim.open()
    h = InOrderHandler(dev)
    sim.submit(read10(1), data_in=512)
    h.entries()
    os.write(dev.fd, b"abc")
    sim.process()
    assert "only accepts 4" in sim.violations[0]
    struct.pack_into("=I", h.view, ring.MAILBOX_SIZE, 64 | 1)  # len_op changed
    h.complete(1)
    sim.process()
    assert "changed len_op" in sim.violations[1]
    sim.violations.clear()
    sim.reset_ring()
    ring.U32.pack_into(h.view, ring.MB_CMD_TAIL, 12)
    h.device.notify()
    sim.process()
    assert sim.broken and "not a slot" in sim.violations[0]


def test_events_coalesce_and_open_snapshots(sim: RingSimulator) -> None:
    for i in range(3):
        sim.submit(read10(i), data_in=1)  # before open: nobody sees these events
    dev = sim.open()
    assert dev.read_event() is False
    for i in range(10):
        sim.submit(read10(10 + i), data_in=1)
    assert sim.events == 13 and sim.events_sent == 1
    assert dev.read_event() is True and dev.read_event() is False
    with sim.plug():
        for i in range(5):
            sim.submit(read10(20 + i), data_in=1)
        assert sim.events == 13
    assert sim.events == 14 and dev.read_event() is True
    with pytest.raises(DeviceBusy):
        sim.open()
    dev.close()
    sim.open().close()


def test_removal_reads_as_device_gone(sim: RingSimulator) -> None:
    dev = sim.open()
    sim.remove()
    with pytest.raises(DeviceRemoved):
        dev.read_event()
    with pytest.raises(DeviceRemoved):
        dev.notify()
    with pytest.raises(SimulatorError):
        sim.submit(read10(1), data_in=1)
    dev.close()


def _child_touches(view: memoryview, off: int) -> int:
    """Fork; the child reads one byte at ``off``; return the signal that killed it (0: none)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        faulthandler.disable()  # the crash is the expected outcome: no traceback dump
        try:
            view[off]
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


def test_strict_mode_faults_on_pages_no_live_command_owns() -> None:
    sim = RingSimulator(cmdr_size=RING, data_size=16 * PAGE_SIZE, strict=True)
    try:
        dev = sim.open()
        h = InOrderHandler(dev)
        sim.submit(read10(1), data_in=2 * PAGE_SIZE)
        (e,) = cmds(h.entries())
        assert _child_touches(dev.view, 0) == 0  # mailbox and ring are always mapped
        assert _child_touches(dev.view, sim.data_off + PAGE_SIZE + 5) == 0  # live command
        assert _child_touches(dev.view, sim.data_off + 2 * PAGE_SIZE) == signal.SIGSEGV
        h.complete(e.cmd_id)
        sim.process()
        assert _child_touches(dev.view, sim.data_off) == signal.SIGSEGV  # reaped: gone
        dev.close()
    finally:
        sim.close()


def test_invalid_geometry() -> None:
    with pytest.raises(SimulatorError):
        RingSimulator(cmdr_size=4096)
    with pytest.raises(SimulatorError):
        RingSimulator(cmdr_size=RING, data_size=1000)


@pytest.mark.parametrize("pages_per_blk", [1, 3])
def test_block_allocation_is_lowest_free_first(pages_per_blk: int) -> None:
    """Differential check of the allocator against the kernel's rule, block by block: each
    block is the lowest free one below dbi_thresh, and runs of consecutive blocks share an
    iovec (whatever fast path the simulator takes)."""
    rng = random.Random(pages_per_blk)
    sim = RingSimulator(cmdr_size=16 * 4096 - 128, data_size=96 * PAGE_SIZE,
                        data_pages_per_blk=pages_per_blk, strict=False)
    try:
        h = InOrderHandler(sim.open())
        blk = sim.blk_size
        live: dict[int, set[int]] = {}
        for step in range(400):
            length = rng.randint(1, 12 * blk)
            room = sim.used_blocks + -(-length // blk) <= sim.max_blocks
            if live and (rng.random() < 0.45 or not room):
                victim = rng.choice(sorted(live))
                h.complete(victim)
                sim.process()
                del live[victim]
                if rng.random() < 0.1:
                    sim.reclaim()
                continue
            used = set().union(*live.values()) if live else set()
            cmd = sim.submit(read10(step), data_in=length)
            assert state(cmd) is CommandState.ON_RING
            (e,) = cmds(h.entries())
            free = [b for b in range(sim.dbi_thresh) if b not in used]
            expected = free[:-(-length // blk)]
            got = sorted(b for off, n in e.iovecs
                         for b in range((off - sim.data_off) // blk,
                                        (off - sim.data_off + n - 1) // blk + 1))
            assert got == expected, step
            runs = sum(1 for i, b in enumerate(expected) if i == 0 or b != expected[i - 1] + 1)
            assert len(e.iovecs) == runs and sum(n for _, n in e.iovecs) == length
            live[e.cmd_id] = set(got)
        assert sim.problems == []
    finally:
        sim.close()
