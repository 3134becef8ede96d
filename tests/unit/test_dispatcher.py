"""The dispatcher against the simulated kernel: random load through wrap-around with data
verified, out-of-order completion, BIDI, READ_LEN, sense, errors, TMR, UNKNOWN_OP, removal,
restart."""

from __future__ import annotations

import asyncio
import errno
import logging
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from initiator.command import CommandResult, ReceiveBatching, ScsiStatus, SendBatching
from initiator.errors import (
    AuthenticationError,
    CommandError,
    CommandTimeout,
    ConfigurationError,
    ConnectionFailed,
    DigestError,
    ISCSIError,
    LocalProtocolError,
    NegotiationError,
    PDUFormatError,
    SessionFailed,
    TaskAborted,
)
from initiator.scsi import SenseKey, build_fixed_sense
from tcmu_handler import ring, scsi
from tcmu_handler.device import UioDevice, takeover_with
from tcmu_handler.dispatcher import Dispatcher, StopReason
from tcmu_handler.errors import DeviceRemoved, RingError, TCMUError
from tcmu_handler.executor import SessionExecutor
from tests.support.ring_simulator import (
    ALL_CAPS,
    PAGE_SIZE,
    CommandState,
    RingSimulator,
    SimCommand,
)
from tests.unit.tcmu_helpers import (
    FakeTarget,
    Workload,
    pattern,
    read10,
    tur,
    write10,
    xdwriteread10,
)

RING = 16 * 1024 - ring.MAILBOX_SIZE


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0)


@pytest.fixture
async def sim() -> AsyncIterator[RingSimulator]:
    s = RingSimulator(cmdr_size=RING, data_size=256 * PAGE_SIZE)
    yield s
    s.close()


def _record_loop_errors(errors: list[dict[str, Any]]) -> None:
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))


async def start(sim: RingSimulator, target: FakeTarget, **kw: Any) -> Dispatcher:
    d = Dispatcher(sim.open(), target, **kw)
    d.start()
    return d


def done_list() -> tuple[list[SimCommand], Callable[[SimCommand], None]]:
    done: list[SimCommand] = []
    return done, done.append


# --- the big one -------------------------------------------------------------------------------


@pytest.mark.parametrize(("ooo", "pages_per_blk", "mode", "reclaim_every"), [
    (True, 1, "shuffle", 0),
    (True, 4, "now", 0),
    (True, 2, "soon", 97),
    (False, 1, "shuffle", 0),
])
async def test_random_commands_through_wraparound(ooo: bool, pages_per_blk: int, mode: str,
                                                  reclaim_every: int) -> None:
    errors: list[dict[str, Any]] = []
    _record_loop_errors(errors)
    flags = ALL_CAPS if ooo else ALL_CAPS & ~ring.MailboxFlag.OOOC
    sim = RingSimulator(cmdr_size=RING, data_size=4 * 1024 * 1024,
                        data_pages_per_blk=pages_per_blk, flags=ring.MailboxFlag(flags),
                        strict=True)
    rng = random.Random(f"{ooo}{pages_per_blk}{mode}")
    target = FakeTarget(mode=mode, rng=random.Random(7))  # type: ignore[arg-type]
    d = await start(sim, target, lun=3)
    wl = Workload(sim, target, total=3000, max_qd=rng.choice((16, 64, 128)), rng=rng,
                  reclaim_every=reclaim_every)
    wl.start()
    await asyncio.wait_for(wl.done.wait(), 60)
    await until(lambda: sim.idle)
    assert wl.failures == []
    assert sim.problems == []
    assert sim.head != 0 or sim.last_cleaned == 0
    stats = d.stats
    assert (stats.submitted, stats.completed, stats.in_flight, stats.failed) == (3000, 3000, 0, 0)
    assert stats.notifications <= stats.completed
    assert {lun for lun, _ in target.submitted} == {3}
    assert await d.close() is StopReason.CLOSED
    assert not d.device.mapped
    sim.close()
    assert errors == []


async def test_the_ring_wraps_many_times(sim: RingSimulator) -> None:
    target = FakeTarget(mode="soon")
    await start(sim, target)
    wl = Workload(sim, target, total=1500, max_qd=40, rng=random.Random(3), max_size=8192,
                  kinds=("read", "write"))
    wl.start()
    await asyncio.wait_for(wl.done.wait(), 30)
    assert wl.failures == [] and sim.problems == []
    assert sim.wraps >= 10


# --- data paths --------------------------------------------------------------------------------


async def test_views_are_slices_of_the_map_and_released_before_completion(
        sim: RingSimulator) -> None:
    target = FakeTarget(keep_views=True, plan={1: "hold"})
    d = await start(sim, target)
    done, cb = done_list()
    c = sim.submit(read10(1), data_in=3 * PAGE_SIZE + 10, on_complete=cb)
    sim.submit(write10(2), data_out=b"w" * 100, on_complete=cb)
    await until(lambda: len(done) == 1)
    v1, v2 = target.kept_views
    assert len(v1) == 3 * PAGE_SIZE + 10 and target.written[2] == b"w" * 100
    with pytest.raises(ValueError):
        v2[0]  # released when command 2 completed
    v1[:5] = b"hello"  # lands in the data area directly
    target.release(1, CommandResult(status=0, data_in_length=3 * PAGE_SIZE + 10))
    await until(lambda: len(done) == 2)
    assert c.data_in is not None and c.data_in[:5] == b"hello"
    with pytest.raises(ValueError):
        len(v1)
    assert d.stats.in_flight == 0


async def test_bidi(sim: RingSimulator) -> None:
    target = FakeTarget(mode="soon")
    await start(sim, target)
    done, cb = done_list()
    payload = random.Random(1).randbytes(10000)
    c = sim.submit(xdwriteread10(5), data_out=payload, data_in=10000, on_complete=cb)
    await until(lambda: bool(done))
    assert c.status == 0 and target.written[5] == payload
    assert c.data_in == bytes(b ^ 0xFF for b in payload)


@pytest.mark.parametrize(("result", "read_len", "residual"), [
    (CommandResult(status=0, residual=1000, data_in_length=7192), 7192, 1000),
    (CommandResult(status=0, data_in_length=7192), 7192, 1000),  # short, no residual claimed
    (CommandResult(status=0, residual=2000, data_in_length=7192), 7192, 1000),
    (CommandResult(status=0, data_in_length=8192), 8192, 0),
    (CommandResult(status=0, residual=-512, data_in_length=8192), 8192, 0),
])
async def test_read_len_residual(sim: RingSimulator, result: CommandResult, read_len: int,
                                 residual: int) -> None:
    target = FakeTarget(plan={1: result})
    await start(sim, target)
    done, cb = done_list()
    c = sim.submit(read10(1), data_in=8192, on_complete=cb)
    await until(lambda: bool(done))
    assert (c.status, c.read_len, c.residual) == (0, read_len, residual)
    assert c.data_in == pattern(1, 8192)[:read_len]
    assert bool(c.uflags & ring.UFlag.READ_LEN) == (read_len != 8192)


async def test_read_len_needs_the_capability_and_a_read() -> None:
    sim = RingSimulator(cmdr_size=RING, data_size=64 * PAGE_SIZE,
                        flags=ring.MailboxFlag.OOOC | ring.MailboxFlag.TMR)
    short = CommandResult(status=0, residual=100, data_in_length=412)
    target = FakeTarget(plan={1: short, 2: short, 3: short})
    await start(sim, target)
    done, cb = done_list()
    r = sim.submit(read10(1), data_in=512, on_complete=cb)
    w = sim.submit(write10(2), data_out=b"x" * 512, on_complete=cb)
    b = sim.submit(xdwriteread10(3), data_out=b"y" * 512, data_in=512, on_complete=cb)
    await until(lambda: len(done) == 3)
    assert (r.uflags, w.uflags, b.uflags) == (0, 0, 0)
    # Without READ_LEN a short read cannot be reported: a retryable error, not 100 stale
    # bytes of the data area passed off as data.
    assert r.status == 2 and r.sense[:18] == scsi.DATA_PHASE_ERROR.fixed()
    sim.close()


@pytest.mark.parametrize("result", [
    CommandResult(status=0, residual=1000),   # the target claims 7192 bytes, sent none
    CommandResult(status=0),                  # GOOD with no data at all
    CommandResult(status=0, residual=8192),   # honest, but read_len 0 means "all" to LIO
])
async def test_good_without_data_is_an_error_not_stale_bytes(sim: RingSimulator,
                                                             result: CommandResult) -> None:
    target = FakeTarget(plan={1: result})
    await start(sim, target)
    done, cb = done_list()
    c = sim.submit(read10(1), data_in=8192, on_complete=cb)
    await until(lambda: bool(done))
    assert c.status == 2 and c.sense[:18] == scsi.DATA_PHASE_ERROR.fixed()
    assert c.uflags == 0


async def test_check_condition_with_partial_data(sim: RingSimulator) -> None:
    sense = build_fixed_sense(SenseKey.MEDIUM_ERROR, 0x11, 0)
    target = FakeTarget(plan={1: CommandResult(status=2, sense=sense, residual=4096,
                                               data_in_length=4096)})
    await start(sim, target)
    done, cb = done_list()
    c = sim.submit(read10(1), data_in=8192, on_complete=cb)
    await until(lambda: bool(done))
    assert c.status == 2 and c.sense == sense + bytes(96 - len(sense))
    assert c.read_len == 4096 and c.data_in == pattern(1, 8192)[:4096]


# --- status and sense ------------------------------------------------------------------------


async def test_sense_is_written_only_for_check_condition(sim: RingSimulator) -> None:
    desc = bytes([0x72, 0x05, 0x24, 0x00, 0, 0, 0, 0])  # descriptor format, as received
    bogus = build_fixed_sense(SenseKey.MEDIUM_ERROR, 0x11, 0)
    target = FakeTarget(plan={1: CommandResult(status=2, sense=desc),
                              2: CommandResult(status=0, sense=bogus)})
    await start(sim, target)
    done, cb = done_list()
    cc = sim.submit(tur(1), on_complete=cb)
    good = sim.submit(tur(2), on_complete=cb)
    await until(lambda: len(done) == 2)
    assert cc.status == 2 and cc.sense == desc + bytes(88)
    assert good.status == 0 and good.sense == b""
    assert good.raw_response is not None and good.raw_response.sense[:18] != bogus


@pytest.mark.parametrize("status", [ScsiStatus.BUSY, ScsiStatus.RESERVATION_CONFLICT,
                                    ScsiStatus.TASK_SET_FULL, ScsiStatus.CONDITION_MET])
async def test_other_statuses_pass_through(sim: RingSimulator, status: int) -> None:
    await start(sim, FakeTarget(plan={1: CommandResult(status=status)}))
    done, cb = done_list()
    c = sim.submit(tur(1), on_complete=cb)
    await until(lambda: bool(done))
    assert c.status == status and c.sense == b""


async def test_check_condition_without_sense_gets_sense(
        sim: RingSimulator, caplog: pytest.LogCaptureFixture) -> None:
    await start(sim, FakeTarget(plan={1: CommandResult(status=2), 2: CommandResult(status=2)}))
    done, cb = done_list()
    c = sim.submit(tur(1), on_complete=cb)
    sim.submit(tur(2), on_complete=cb)
    await until(lambda: len(done) == 2)
    assert c.sense[:18] == scsi.NO_SENSE_FROM_TARGET.fixed()
    assert len([r for r in caplog.records if "without sense" in r.message]) == 1


@pytest.mark.parametrize(("error", "code"), [
    (SessionFailed("replacement timeout"), scsi.LU_COMMUNICATION_FAILURE),
    (ConnectionFailed("lost"), scsi.LU_BECOMING_READY),
    (AuthenticationError("chap"), scsi.LU_MANUAL_INTERVENTION),
    (NegotiationError("keys"), scsi.LU_MANUAL_INTERVENTION),
    (ConfigurationError("url"), scsi.LU_MANUAL_INTERVENTION),
    (DigestError("crc", header=False), scsi.PROTOCOL_CRC_ERROR),
    (CommandTimeout("slow"), scsi.LU_COMMUNICATION_TIMEOUT),
    (TaskAborted("aborted"), scsi.COMMANDS_CLEARED),
    (PDUFormatError("bad pdu"), scsi.DATA_PHASE_ERROR),
    (LocalProtocolError("bug"), scsi.INTERNAL_FAILURE),
    (CommandError("other"), scsi.TRANSPORT_FAILURE),
    (ISCSIError("other"), scsi.TRANSPORT_FAILURE),
])
async def test_transport_errors_become_check_condition(sim: RingSimulator, error: ISCSIError,
                                                       code: scsi.SenseCode) -> None:
    d = await start(sim, FakeTarget(mode="soon", plan={1: error}))
    done, cb = done_list()
    c = sim.submit(read10(1), data_in=4096, on_complete=cb)
    await until(lambda: bool(done))
    assert c.status == ScsiStatus.CHECK_CONDITION
    assert c.sense == code.fixed() + bytes(96 - 18)
    assert (c.sense[2] & 0xF, c.sense[12], c.sense[13]) == (code.key, code.asc, code.ascq)
    assert c.data_in is None  # no data without READ_LEN on a CHECK CONDITION
    assert d.stats.failed == 1


async def test_a_path_of_a_multipath_lun_reports_every_path_down_as_08_00(
        sim: RingSimulator) -> None:
    """On a path, a lost connection is a path error (NOT READY 08/00) that dm-multipath acts on
    at once, not 04/01, which the SCSI layer would retry for minutes out of its reach."""
    await start(sim, FakeTarget(mode="soon", plan={1: ConnectionFailed("lost"),
                                                   2: SessionFailed("given up")}),
                policy=scsi.PathPolicy.MULTIPATH)
    done, cb = done_list()
    a = sim.submit(read10(1), data_in=4096, on_complete=cb)
    b = sim.submit(write10(2), data_out=pattern(4096, 2), on_complete=cb)
    await until(lambda: len(done) == 2)
    for c in (a, b):
        assert c.status == ScsiStatus.CHECK_CONDITION
        assert c.sense[:18] == scsi.LU_COMMUNICATION_FAILURE.fixed()


# Sense a path must never answer when it cannot deliver a command: the SCSI layer retries them
# itself (ACTION_DELAYED_RETRY / _REPREP) for up to (retries + 1) x timeout.
_HELD_IN_THE_SCSI_LAYER = {(SenseKey.NOT_READY, 0x04, 0x01), (SenseKey.NOT_READY, 0x04, 0x0A)}


@pytest.mark.parametrize("error", [
    SessionFailed("x"), ConnectionFailed("x"), AuthenticationError("x"), NegotiationError("x"),
    ConfigurationError("x"), DigestError("x", header=True), CommandTimeout("x"),
    TaskAborted("x"), PDUFormatError("x"), LocalProtocolError("x"), CommandError("x"),
    ISCSIError("x"), RuntimeError("x")])
def test_no_error_is_held_in_the_scsi_layer_on_a_path(error: BaseException) -> None:
    code = scsi.sense_for_error(error, scsi.PathPolicy.MULTIPATH)
    assert (code.key, code.asc, code.ascq) not in _HELD_IN_THE_SCSI_LAYER
    single = scsi.sense_for_error(error)
    # Only what says "the connection is down" differs between the policies.
    assert code == single or isinstance(error, ConnectionFailed)


async def test_submit_raising(sim: RingSimulator, caplog: pytest.LogCaptureFixture) -> None:
    target = FakeTarget(submit_error=SessionFailed("down"))
    await start(sim, target)
    done, cb = done_list()
    a = sim.submit(tur(1), on_complete=cb)
    await until(lambda: bool(done))
    assert a.sense[:18] == scsi.LU_COMMUNICATION_FAILURE.fixed()
    target.submit_error = RuntimeError("bug in the initiator")
    b = sim.submit(tur(2), on_complete=cb)
    await until(lambda: len(done) == 2)
    assert b.sense[:18] == scsi.INTERNAL_FAILURE.fixed()
    assert any(r.exc_info for r in caplog.records)
    assert sim.problems == []


def test_sense_codes() -> None:
    assert scsi.LU_BECOMING_READY.fixed() == build_fixed_sense(SenseKey.NOT_READY, 4, 1) == (
        bytes.fromhex("700002000000000a00000000040100000000"))
    assert scsi.sense_for_error(ValueError()) is scsi.INTERNAL_FAILURE
    assert str(scsi.LU_BECOMING_READY) == (
        "NOT READY, logical unit is in process of becoming ready (04/01)")
    # Their words come from initiator.scsi's ASC table, which must name every one of them.
    codes = [v for v in vars(scsi).values() if isinstance(v, scsi.SenseCode)]
    assert len(codes) == 10 and not any(c.text.startswith("ASC 0x") for c in codes)


@pytest.mark.parametrize(("cdb", "out"), [
    (read10(1), False), (write10(1), True), (bytes([0x8A]) + bytes(15), True),
    (bytes([0x88]) + bytes(15), False), (bytes([0x12, 0, 0, 0, 96, 0]), False),
    (bytes([0x15, 0x10, 0, 0, 12, 0]), True), (bytes([0x55]) + bytes(9), True),
    (bytes([0x42]) + bytes(9), True), (bytes([0x93]) + bytes(15), True),
    (bytes([0x89]) + bytes(15), True), (bytes([0x5F]) + bytes(9), True),
    (bytes([0x5E]) + bytes(9), False), (bytes([0x2F, 0x00]) + bytes(8), False),
    (bytes([0x2F, 0x02]) + bytes(8), True), (bytes([0x8F, 0x06]) + bytes(14), True),
    (bytes([0x85, 0, 0x0E]) + bytes(13), False), (bytes([0x85, 0, 0x06]) + bytes(13), True),
    (bytes([0x3B]) + bytes(9), True), (bytes([0x3C]) + bytes(9), False),
    (bytes([0xA3]) + bytes(11), False), (bytes([0xA4]) + bytes(11), True),
    (bytes([0x7F, 0, 0, 0, 0, 0, 0, 0x18, 0, 0x0B, 0]) + bytes(21), True),
    (bytes([0x7F, 0, 0, 0, 0, 0, 0, 0x18, 0, 0x09, 0]) + bytes(21), False),
    (bytes([0x7F, 0, 0, 0, 0, 0, 0, 0x18, 0, 0x0A, 0x02]) + bytes(21), True),
    (b"", False),
])
def test_data_direction_from_the_cdb(cdb: bytes, out: bool) -> None:
    assert scsi.is_data_out(cdb) is out


# --- out of order, in order, batching --------------------------------------------------------


async def test_out_of_order_completion_uses_the_first_slot(sim: RingSimulator) -> None:
    target = FakeTarget(plan={1: "hold", 2: "hold", 3: "hold"})
    await start(sim, target)
    done, cb = done_list()
    cs = [sim.submit(read10(i), data_in=512, on_complete=cb) for i in (1, 2, 3)]
    await until(lambda: len(target.held) == 3)
    target.release(3)
    await until(lambda: len(done) == 1)
    assert done == [cs[2]] and sim.tail == 128  # command 3 completed in command 1's slot
    target.release(1)
    target.release(2)
    await until(lambda: len(done) == 3)
    assert sim.idle and sim.problems == []


async def test_without_oooc_completions_are_retired_in_ring_order() -> None:
    sim = RingSimulator(cmdr_size=RING, data_size=64 * PAGE_SIZE,
                        flags=ring.MailboxFlag.READ_LEN | ring.MailboxFlag.TMR)
    target = FakeTarget(plan={1: "hold", 2: "hold", 3: "hold"})
    d = await start(sim, target)
    done, cb = done_list()
    cs = [sim.submit(read10(i), data_in=512, on_complete=cb) for i in (1, 2, 3)]
    await until(lambda: len(target.held) == 3)
    target.release(3)
    target.release(2)
    for _ in range(20):
        await asyncio.sleep(0)
    assert done == [] and sim.tail == 0 and d.in_flight == 1
    target.release(1)
    await until(lambda: len(done) == 3)
    assert done == cs and [c.raw_response.cmd_id for c in cs if c.raw_response] == [1, 2, 3]
    assert sim.problems == [] and sim.idle
    sim.close()


async def test_one_write_per_batch(sim: RingSimulator) -> None:
    d = await start(sim, FakeTarget(mode="now"))
    done, cb = done_list()
    with sim.plug():
        for i in range(32):
            sim.submit(read10(i), data_in=4096, on_complete=cb)
    await until(lambda: len(done) == 32)
    assert (d.stats.wakeups, d.stats.notifications, sim.user_writes) == (1, 1, 1)


class HoldingTarget(FakeTarget):
    """A FakeTarget with the executor's optional hold_sends()/release_sends(): it records
    the order."""

    def __init__(self) -> None:
        super().__init__(mode="soon")
        self.log: list[str] = []

    def hold_sends(self) -> None:
        self.log.append("hold")

    def release_sends(self) -> None:
        self.log.append("release")

    def submit(self, *args: Any, **kw: Any) -> Any:
        self.log.append("submit")
        return super().submit(*args, **kw)


async def test_a_scan_holds_the_executor_and_releases_it_at_its_end(sim: RingSimulator) -> None:
    # The scan's commands go out as one batch when it ends, not on the next loop iteration.
    target = HoldingTarget()
    await start(sim, target)
    assert target.log == ["hold", "release"]  # the scan at start, with nothing to take
    done, cb = done_list()
    with sim.plug():
        for i in range(3):
            sim.submit(read10(i), data_in=512, on_complete=cb)
    await until(lambda: len(done) == 3)
    assert target.log[2:] == ["hold", "submit", "submit", "submit", "release"]


@pytest.mark.parametrize("corrupt", ["first", "second"])
async def test_the_executor_is_released_when_the_scan_finds_a_corrupt_ring(
        sim: RingSimulator, corrupt: str) -> None:
    # A corrupt entry after others: those are submitted first (CommandRing.take()).
    target = HoldingTarget()
    d = await start(sim, target)
    run = asyncio.create_task(d.run())
    with sim.plug():
        sim.submit(read10(1), data_in=512)
        bad = ring.MAILBOX_SIZE
        if corrupt == "second":
            sim.submit(read10(2), data_in=512)
            bad += sim.head - ring.cmd_entry_size(1, 10)
        ring.U32.pack_into(sim.kernel_view(), bad, 1)  # len_op: CMD of length 0
    assert await asyncio.wait_for(run, 2) is StopReason.RING_CORRUPT
    if corrupt == "first":
        assert target.log == ["hold", "release"] * 2
    else:
        assert target.log == ["hold", "release", "hold", "submit", "release"]
        assert d.stats.submitted == 1


def test_the_session_executor_batches_sends_and_completions() -> None:
    # What the daemon's dispatchers get: both optional batchings (the protocols' names are the
    # session's own methods, passed through).
    from types import SimpleNamespace
    from typing import cast

    from initiator.transport import Session

    session = SimpleNamespace(submit=print, hold_sends=print, release_sends=print,
                              after_receive=print)
    executor = SessionExecutor(cast(Session, session))
    assert isinstance(executor, SendBatching) and isinstance(executor, ReceiveBatching)
    assert not isinstance(FakeTarget(), SendBatching | ReceiveBatching)
    assert isinstance(HoldingTarget(), SendBatching)
    assert not isinstance(HoldingTarget(), ReceiveBatching)


class ReadingTarget(FakeTarget):
    """A FakeTarget with the executor's optional after_receive(): its completions come in
    "reads" (its ticks), and the callbacks taken during one run at its end."""

    def __init__(self) -> None:
        super().__init__(mode="soon")
        self.reading = False
        self.callbacks: list[Callable[[], None]] = []
        self.log: list[str] = []

    def after_receive(self, callback: Callable[[], None]) -> bool:
        if not self.reading:
            return False
        self.callbacks.append(callback)
        return True

    def _tick(self) -> None:
        self.reading = True
        try:
            super()._tick()
        finally:
            self.reading = False
        callbacks, self.callbacks = self.callbacks, []
        self.log.append(f"read end, {len(callbacks)} callback(s)")
        for callback in callbacks:
            callback()


async def test_completions_of_a_read_are_written_at_its_end(sim: RingSimulator) -> None:
    # One 4-byte write for the completions the executor's read brought, when it ends.
    target = ReadingTarget()
    d = await start(sim, target)
    done, cb = done_list()
    with sim.plug():
        for i in range(5):
            sim.submit(read10(i), data_in=512, on_complete=cb)
    await until(lambda: len(done) == 5)
    assert target.log == ["read end, 1 callback(s)"]
    assert d.stats.notifications == 1 and sim.user_writes == 1
    # Completions outside a read (none under way) still get their write, a loop iteration on.
    target.plan[7] = "hold"
    sim.submit(read10(7), data_in=512, on_complete=cb)
    await until(lambda: 7 in target.held)
    target.release(7)
    await until(lambda: len(done) == 6)
    assert d.stats.notifications == 2 and all(c.status == 0 for c in done)


async def test_commands_queued_before_start_are_served(sim: RingSimulator) -> None:
    dev = sim.open()
    done, cb = done_list()
    for i in range(5):
        sim.submit(read10(i), data_in=100, on_complete=cb)
    assert dev.read_event() is True  # someone consumed the event: only the scan finds them
    d = Dispatcher(dev, FakeTarget())
    d.start()
    await until(lambda: len(done) == 5)
    assert all(c.status == 0 for c in done) and d.stats.wakeups == 0


# --- malformed entries, corrupt rings ------------------------------------------------------------


async def test_unservable_entry_gets_unknown_op(sim: RingSimulator,
                                                caplog: pytest.LogCaptureFixture) -> None:
    dev = sim.open()
    done, cb = done_list()
    with sim.plug():
        bad = sim.submit(read10(1), data_in=512, on_complete=cb)
        good = sim.submit(read10(2), data_in=512, on_complete=cb)
        kv = sim.kernel_view()
        ring.U32.pack_into(kv, ring.MAILBOX_SIZE + ring.REQ_IOV_DIF_CNT, 1)
    d = Dispatcher(dev, FakeTarget())
    d.start()
    await until(lambda: len(done) == 2)
    assert bad.unknown_op and bad.status == ScsiStatus.CHECK_CONDITION
    assert good.status == 0 and good.data_in == pattern(2, 512)
    assert d.stats.unknown_op == 1 and sim.problems == []
    assert any("UNKNOWN_OP" in r.message for r in caplog.records)
    # Counted as what the kernel reports for it (NOT READY 08/00), not as our own sense.
    assert d.metrics.sense_keys == {SenseKey.NOT_READY: 1}


async def test_entries_passed_over_are_logged_and_serving_goes_on(
        sim: RingSimulator, caplog: pytest.LogCaptureFixture) -> None:
    dev = sim.open()
    done, cb = done_list()
    kv = sim.kernel_view()
    with sim.plug():
        c1 = sim.submit(read10(1), data_in=512, on_complete=cb)  # ring offset 0, 128 bytes
        sim.tmr(ring.TmrType.ABORT_TASK, [c1])  # at 128, 40 bytes
        c2 = sim.submit(read10(2), data_in=512, on_complete=cb)
        ring.U32.pack_into(kv, ring.MAILBOX_SIZE + 128 + ring.TMR_CMD_CNT, 9)  # 9 ids, 40 bytes
    d = Dispatcher(dev, FakeTarget())
    d.start()
    await until(lambda: len(done) == 2)
    assert (c1.status, c2.status) == (0, 0) and d.stop_reason is None
    assert (d.stats.tmr_entries, d.stats.aborts) == (0, 0)
    assert any("ignoring TMR entry" in r.message and "lists 9 commands" in r.message
               for r in caplog.records)
    with sim.plug():  # an opcode the kernel never writes (the simulated kernel then WARNs)
        sim.tmr(ring.TmrType.ABORT_TASK, [])
        ring.U32.pack_into(kv, ring.MAILBOX_SIZE + sim.head - 32, 32 | 5)
    await until(lambda: any("skipping ring entry with unknown opcode 5" in r.message
                            for r in caplog.records))
    assert d.stop_reason is None


async def test_corrupt_ring_stops_the_dispatcher(sim: RingSimulator,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    d = await start(sim, FakeTarget())
    run = asyncio.create_task(d.run())
    with sim.plug():
        sim.submit(read10(1), data_in=512)
        ring.U32.pack_into(sim.kernel_view(), ring.MAILBOX_SIZE, 1)  # len_op: CMD of length 0
    assert await asyncio.wait_for(run, 2) is StopReason.RING_CORRUPT
    assert [r.levelno for r in caplog.records if r.name == "tcmu_handler.dispatcher"] == [
        logging.ERROR]
    assert d.stop_reason is StopReason.RING_CORRUPT


async def test_bad_tail_is_refused(sim: RingSimulator) -> None:
    dev = sim.open()
    ring.U32.pack_into(dev.view, ring.MB_CMD_TAIL, 12)
    with pytest.raises(RingError):
        Dispatcher(dev, FakeTarget())
    dev.close()


async def test_start_twice(sim: RingSimulator) -> None:
    d = await start(sim, FakeTarget())
    with pytest.raises(TCMUError):
        d.start()


# --- task management -----------------------------------------------------------------------------


async def test_abort_task(sim: RingSimulator) -> None:
    target = FakeTarget(plan={1: "hold", 2: "hold"})
    d = await start(sim, target)
    done, cb = done_list()
    c1, c2, c3 = (sim.submit(read10(i), data_in=512, on_complete=cb) for i in (1, 2, 3))
    await until(lambda: len(target.held) == 2 and len(done) == 1)
    sim.tmr(ring.TmrType.ABORT_TASK, [c1])
    await until(lambda: len(done) == 2)
    assert target.aborted == [1] and target.resets == []
    assert c1.aborted and c1.status == ScsiStatus.CHECK_CONDITION
    assert c1.sense[:18] == scsi.COMMANDS_CLEARED.fixed()
    assert c2.state is CommandState.ON_RING and c3.status == 0
    target.release(2)
    await until(lambda: len(done) == 3)
    await until(lambda: sim.idle)  # the TMR slot was released too
    assert d.stats.tmr_entries == 1 and d.stats.aborts == 1 and sim.problems == []


async def test_tmr_slot_between_outstanding_commands_is_skipped(sim: RingSimulator) -> None:
    target = FakeTarget(plan={1: "hold", 2: "hold", 3: "hold"})
    await start(sim, target)
    done, cb = done_list()
    c1 = sim.submit(read10(1), data_in=512, on_complete=cb)
    sim.submit(read10(2), data_in=512, on_complete=cb)
    await until(lambda: len(target.held) == 2)
    sim.tmr(ring.TmrType.ABORT_TASK, [c1])
    sim.submit(read10(3), data_in=512, on_complete=cb)  # ring: c1, c2, TMR, c3
    await until(lambda: len(done) == 1 and len(target.held) == 2)
    target.release(2)
    await until(lambda: len(done) == 2)
    assert sim.tail == 256  # cmd_tail stops at the TMR slot while c3 is outstanding
    target.release(3)  # completes in c3's slot, past the TMR
    await until(lambda: len(done) == 3)
    await until(lambda: sim.idle)
    assert sim.problems == []


@pytest.mark.parametrize("tmr_type", [ring.TmrType.LUN_RESET, ring.TmrType.TARGET_WARM_RESET,
                                      ring.TmrType.TARGET_COLD_RESET])
async def test_resets_reset_the_remote_lun(sim: RingSimulator, tmr_type: ring.TmrType) -> None:
    target = FakeTarget(plan={1: "hold", 2: "hold"})
    d = await start(sim, target, lun=7)
    done, cb = done_list()
    cs = [sim.submit(read10(i), data_in=512, on_complete=cb) for i in (1, 2)]
    await until(lambda: len(target.held) == 2)
    sim.tmr(tmr_type, cs)
    await until(lambda: len(done) == 2)
    assert target.resets == [7] and target.aborted == []
    assert d.stats.lun_resets == 1
    await until(lambda: sim.idle)


async def test_failed_abort_escalates_to_lun_reset(sim: RingSimulator) -> None:
    target = FakeTarget(plan={1: "hold", 2: "hold"}, abort_error=CommandError("no such task"))
    await start(sim, target)
    done, cb = done_list()
    cs = [sim.submit(read10(i), data_in=512, on_complete=cb) for i in (1, 2)]
    await until(lambda: len(target.held) == 2)
    sim.tmr(ring.TmrType.ABORT_TASK_SET, cs)
    await until(lambda: len(done) == 2)
    assert sorted(target.aborted) == [1, 2] and target.resets == [0]


async def test_tmr_for_finished_commands_does_nothing(sim: RingSimulator) -> None:
    target = FakeTarget(plan={1: "hold"})
    d = await start(sim, target)
    done, cb = done_list()
    c1 = sim.submit(read10(1), data_in=512, on_complete=cb)
    c2 = sim.submit(read10(2), data_in=512, on_complete=cb)
    await until(lambda: len(done) == 1)
    sim.tmr(ring.TmrType.CLEAR_ACA, [c1])
    sim.tmr(ring.TmrType.ABORT_TASK, [c2])  # already reaped: nothing listed
    await until(lambda: d.stats.tmr_entries == 2)
    for _ in range(10):
        await asyncio.sleep(0)
    assert target.aborted == [] and target.resets == []
    target.release(1)
    await until(lambda: sim.idle)


# --- removal, close, restart ---------------------------------------------------------------------


async def test_device_removed_mid_flight(sim: RingSimulator,
                                         caplog: pytest.LogCaptureFixture) -> None:
    errors: list[dict[str, Any]] = []
    _record_loop_errors(errors)
    target = FakeTarget(plan={1: "hold", 2: "hold"}, keep_views=True)
    d = await start(sim, target)
    run = asyncio.create_task(d.run())
    done, cb = done_list()
    for i in (1, 2, 3):
        sim.submit(read10(i), data_in=PAGE_SIZE, on_complete=cb)
    await until(lambda: len(target.held) == 2 and len(done) == 1)
    tail = sim.tail
    caplog.clear()
    sim.remove()
    assert await asyncio.wait_for(run, 2) is StopReason.REMOVED
    records = [r for r in caplog.records if r.name.startswith("tcmu_handler")]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "removed" in records[0].message and "2 command(s) in flight" in records[0].message
    # The held commands are aborted at the target; their buffers are dropped, not written back.
    await until(lambda: d.in_flight == 0)
    assert sorted(target.aborted) == [1, 2]
    assert sim.tail == tail and not d.device.mapped and d.device.closed
    assert all(_released(v) for v in target.kept_views)
    assert errors == [] and d.stats.completed == 3


def _released(view: memoryview) -> bool:
    try:
        len(view)
    except ValueError:
        return True
    return False


async def test_removed_device_unmaps_only_after_the_last_buffer_comes_back(
        sim: RingSimulator) -> None:
    target = FakeTarget(plan={1: "hold"}, abort_error=SessionFailed("gone"))
    d = await start(sim, target)
    sim.submit(read10(1), data_in=PAGE_SIZE)
    await until(lambda: bool(target.held))
    sim.remove()
    assert await asyncio.wait_for(d.run(), 2) is StopReason.REMOVED
    for _ in range(10):
        await asyncio.sleep(0)
    assert d.device.closed and d.device.mapped  # the initiator still holds the buffer
    target.release(1)
    assert not d.device.mapped


class _EIODevice(UioDevice):
    def read_event(self) -> bool:
        raise DeviceRemoved(self._gone_message("read", OSError(errno.EIO, "Input/output error")))


async def test_eio_on_read_stops_without_traceback(sim: RingSimulator,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    errors: list[dict[str, Any]] = []
    _record_loop_errors(errors)
    dev = sim.open()
    dev.__class__ = _EIODevice
    d = Dispatcher(dev, FakeTarget())
    d.start()
    sim.submit(read10(1), data_in=1)
    assert await asyncio.wait_for(d.run(), 2) is StopReason.REMOVED
    (record,) = [r for r in caplog.records if r.name.startswith("tcmu_handler")]
    assert "Input/output error" in record.message and record.exc_info is None
    assert errors == []


async def test_close_drains_in_flight_commands(sim: RingSimulator) -> None:
    target = FakeTarget(plan={1: "hold"})
    d = await start(sim, target)
    done, cb = done_list()
    c = sim.submit(read10(1), data_in=512, on_complete=cb)
    await until(lambda: bool(target.held))
    closing = asyncio.create_task(d.close(timeout=5))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not closing.done()
    later = sim.submit(read10(2), data_in=512, on_complete=cb)  # not taken any more
    target.release(1)
    assert await closing is StopReason.CLOSED
    await until(lambda: bool(done))
    assert done == [c] and later.state is CommandState.ON_RING
    assert d.device.closed and not d.device.mapped


async def test_close_timeout_abandons_commands(sim: RingSimulator,
                                               caplog: pytest.LogCaptureFixture) -> None:
    target = FakeTarget(plan={1: "hold"})
    d = await start(sim, target)
    sim.submit(read10(1), data_in=512)
    await until(lambda: bool(target.held))
    assert await d.close(timeout=0.01) is StopReason.CLOSED
    assert any("still in flight" in r.message for r in caplog.records)
    assert d.device.closed and d.device.mapped
    target.release(1)
    assert not d.device.mapped


async def test_close_before_start(sim: RingSimulator) -> None:
    d = Dispatcher(sim.open(), FakeTarget())
    assert await d.close() is StopReason.CLOSED
    assert d.device.closed


async def test_restart_replays_the_ring_without_takeover(sim: RingSimulator) -> None:
    dead = FakeTarget(plan={1: "hold", 2: "hold"})
    a = await start(sim, dead)
    done, cb = done_list()
    cs = [sim.submit(read10(i), data_in=1000, on_complete=cb) for i in (1, 2)]
    await until(lambda: len(dead.held) == 2)
    await a.close(timeout=0)  # the handler dies with both commands outstanding
    b = await start(sim, FakeTarget())
    await until(lambda: len(done) == 2)
    assert [c.data_in for c in cs] == [pattern(1, 1000), pattern(2, 1000)]
    assert b.stats.submitted == 2 and sim.problems == [] and sim.idle


async def test_takeover_resets_the_ring_and_serves_again(sim: RingSimulator) -> None:
    dead = FakeTarget(plan={1: "hold", 2: "hold"})
    a = await start(sim, dead)
    done, cb = done_list()
    old = [sim.submit(read10(i), data_in=1000, on_complete=cb) for i in (1, 2)]
    await until(lambda: len(dead.held) == 2)
    await a.close(timeout=0)
    b = Dispatcher(takeover_with(sim.open, sim), FakeTarget())
    assert [c.status for c in old] == [ScsiStatus.BUSY] * 2  # the mid-layer retries them
    assert not sim.blocked
    b.start()
    new = sim.submit(read10(3), data_in=1000, on_complete=cb)
    await until(lambda: len(done) == 3)
    assert new.status == 0 and new.data_in == pattern(3, 1000)
    dead.release(1)  # the dead handler's initiator finishing late writes nothing
    dead.release(2)
    assert sim.problems == [] and a.device.closed and not a.device.mapped
    await until(lambda: sim.idle)
