"""The dispatcher: serve a TCMU command ring from the asyncio loop with an iSCSI session.

Theory of operation
-------------------
The dispatcher is glue between three things: the uio fd, the slot bookkeeping of
:class:`tcmu_handler.ring.CommandRing` (which entries are consumed, which slot each completion
takes, where ``cmd_tail`` goes: the out-of-order slot rule lives there, with no I/O), and a
:class:`~initiator.command.CommandExecutor`; plus task management.

The uio fd is watched with ``loop.add_reader``. On every wake-up (and once right after start,
because opening the device snapshots the event counter) the dispatcher does the 4-byte read and
takes entries from the ring up to ``cmd_head``: TMR entries start task management, and each CMD
entry becomes one ``CommandExecutor.submit(lun, cdb, data_out=..., data_in=..., on_done=...)``
whose buffers are ``memoryview`` slices of the map, exactly one per iovec: Data-In is received
straight into the data area, Data-Out is sent straight from it. No Task is created per command;
``on_done`` is a partial of :meth:`Dispatcher._complete`. An executor that is also
:class:`~initiator.command.SendBatching` (:class:`~tcmu_handler.executor.SessionExecutor`) is
held for the length of a scan: the scan's commands go out together as soon as it ends, not on
the next loop iteration, which would be one more (``epoll_wait`` included) with nothing else
to do. Likewise, with a :class:`~initiator.command.ReceiveBatching` executor the 4-byte write
for the completions that a read from the target brought waits only for the end of that read,
not for the next loop iteration.

Completions arrive in any order and are written into the ring at once; the new ``cmd_tail`` is
published once per batch (:meth:`~tcmu_handler.ring.CommandRing.done`) and the 4-byte
``write()`` tells the kernel to reap: all completions of one loop iteration share one write.
Before a command is completed every view of its buffers is released, because the kernel frees
(and may unmap) its data pages as soon as it reaps the slot: touching them later would be a
SIGBUS.

Errors: a command the transport cannot deliver ends with CHECK CONDITION and sense saying why
(:mod:`tcmu_handler.scsi`, for the ring's :class:`~tcmu_handler.scsi.PathPolicy`: the only way
to its LUN, or one path of several). An entry that cannot be served safely (iovecs outside
the data area, a CDB outside the entry, DIF iovecs) is completed with
``TCMU_UFLAG_UNKNOWN_OP``. When the device goes away (POLLERR, EIO, ENODEV) the dispatcher
logs one line and stops; commands still in flight are aborted at the target, and their
buffers are released, never written back, when the initiator reports them done; the map is
unmapped after the last one.

What the commands did (operations, bytes, latency from ring entry to ring completion, statuses)
is counted into :attr:`Dispatcher.metrics` (:mod:`tcmu_handler.stats`): one clock reading per
scan and one per flush; per command, a class and a count in the arrival it shares with the
commands of its scan.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from operator import itemgetter
from pathlib import Path
from typing import Any, NoReturn

from initiator.command import (
    CommandExecutor,
    CommandHandle,
    CommandResult,
    ReceiveBatching,
    ScsiStatus,
    SendBatching,
)
from initiator.errors import ISCSIError
from tcmu_handler import ring, scsi
from tcmu_handler.device import CONFIGFS_ROOT, ResetLevel, UioDevice, UioInfo, takeover
from tcmu_handler.errors import DeviceRemoved, MalformedEntry, RingError, TCMUError
from tcmu_handler.ring import CmdEntry, SkippedEntry, TmrEntry
from tcmu_handler.stats import DATA_OUT, NO_DATA, OPERATION_BASE, Arrival, RingStats

log = logging.getLogger(__name__)

_CHECK_CONDITION = int(ScsiStatus.CHECK_CONDITION)
_UNKNOWN_OP = int(ring.UFlag.UNKNOWN_OP)
_READ_LEN = int(ring.UFlag.READ_LEN)
_TMR = int(ring.Opcode.TMR)
_is_data_out = scsi.is_data_out
_DATA_OUT_BY_OPCODE = scsi.DATA_OUT_BY_OPCODE
_length = itemgetter(1)
_OPERATION_BASE = OPERATION_BASE
_UNKNOWN_OP_SENSE = scsi.SenseCode(scsi.SenseKey.NOT_READY, 0x08, 0x00).fixed()
"""What the kernel reports for an UNKNOWN_OP completion: tcmu_handle_completion() completes it
with CHECK CONDITION and no sense of ours, and target_complete_cmd() turns that into
TCM_LOGICAL_UNIT_COMMUNICATION_FAILURE, NOT READY 08/00 (Linux 6.1,
target_core_transport.c)."""
_ABORTS = frozenset({ring.TmrType.ABORT_TASK, ring.TmrType.ABORT_TASK_SET,
                     ring.TmrType.CLEAR_TASK_SET, ring.TmrType.LUN_RESET_PRO})
_RESETS = frozenset({ring.TmrType.LUN_RESET, ring.TmrType.TARGET_WARM_RESET,
                     ring.TmrType.TARGET_COLD_RESET})


class StopReason(enum.Enum):
    """Why :meth:`Dispatcher.run` returned."""

    CLOSED = "closed"
    """:meth:`Dispatcher.close` was called."""
    REMOVED = "removed"
    """The uio device went away (its backstore was deleted)."""
    RING_CORRUPT = "ring corrupt"
    """The ring holds what the kernel never writes; :func:`~tcmu_handler.device.takeover`
    resets it."""


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSING = "closing"
    STOPPED = "stopped"


_STOPPED = _State.STOPPED  # tested once per completion


@dataclass(frozen=True, slots=True)
class DispatcherStats:
    """Counters of one dispatcher (a snapshot)."""

    in_flight: int
    """Commands submitted to the initiator and not yet completed."""
    submitted: int
    completed: int
    """Commands completed (written back, or dropped after removal)."""
    failed: int
    """Completions that carried an initiator error instead of a SCSI status."""
    unknown_op: int
    """Entries completed with UNKNOWN_OP because they could not be served."""
    tmr_entries: int
    aborts: int
    """ABORT TASKs sent on behalf of TMR entries (or device removal)."""
    lun_resets: int
    wakeups: int
    """Reader callbacks (uio events)."""
    notifications: int
    """4-byte completion writes to the device."""
    wraps: int
    """Times the consume pointer went past the end of the ring back to offset 0."""
    pads: int
    """PAD entries skipped (the kernel's filler before a wrap, when an entry did not fit)."""


class _Command:
    """One CMD entry in flight."""

    __slots__ = ("arrival", "cmd_id", "data_in_len", "finished", "handle", "nbytes", "views")

    def __init__(self, cmd_id: int, views: list[memoryview], nbytes: int,
                 data_in_len: int, arrival: Arrival) -> None:
        self.cmd_id = cmd_id
        self.views: list[memoryview] | tuple[()] = views
        self.nbytes = nbytes            # bytes of its buffers
        self.data_in_len = data_in_len  # Data-In bytes of a unidirectional read: READ_LEN applies
        self.arrival = arrival
        """The commands of its class its scan took (tcmu_handler.stats)."""
        self.handle: CommandHandle | None = None
        self.finished = False


class Dispatcher:
    """Serve the ring of ``device`` by submitting every command to ``executor`` for ``lun``.

    Use from a running asyncio loop::

        dispatcher = Dispatcher(device, SessionExecutor(session), lun=0)
        reason = await dispatcher.run()      # until the device is removed or close() is called

    or ``dispatcher.start()`` and later ``await dispatcher.close()``.
    """

    def __init__(self, device: UioDevice, executor: CommandExecutor, *, lun: int = 0,
                 clock: Callable[[], float] = time.monotonic,
                 policy: scsi.PathPolicy = scsi.PathPolicy.SINGLE) -> None:
        mailbox = device.mailbox()
        self._device = device
        self._executor = executor
        # Optional (module docstring): sending a scan's commands as one batch when it ends,
        # and writing a read's completions when it ends.
        self._hold: Callable[[], None] | None = None
        self._release: Callable[[], None] | None = None
        if isinstance(executor, SendBatching):
            self._hold, self._release = executor.hold_sends, executor.release_sends
        self._after_receive: Callable[[Callable[[], None]], bool] | None = \
            executor.after_receive if isinstance(executor, ReceiveBatching) else None
        self._lun = lun
        self._policy = policy   # which sense an undeliverable command gets (tcmu_handler.scsi)
        self._name = device.name
        self._flags = mailbox.flags
        self._use_read_len = bool(mailbox.flags & ring.MailboxFlag.READ_LEN)
        self._cmdr_size = mailbox.cmdr_size
        self._data_size = device.size - mailbox.data_off
        self._buf = device.view
        # Serves a previous handler's commands again from cmd_tail when there was no takeover.
        self._slots = ring.CommandRing.over(self._buf, name=self._name)
        self._inflight: dict[int, _Command] = {}
        self._state = _State.NEW
        self._stop_reason: StopReason | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Future[StopReason] | None = None
        self._drained: asyncio.Event | None = None
        self._reading = False
        self._in_scan = False
        self._unsent = False  # cmd_tail published, the 4-byte write still to be done
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._warned: set[str] = set()
        self._submitted = 0
        self._completed = 0
        self._failed = 0
        self._unknown_op = 0
        self._tmr_entries = 0
        self._aborts = 0
        self._lun_resets = 0
        self._wakeups = 0
        self._notifications = 0
        self._clock = clock
        self.metrics = RingStats()
        """What the commands did (:mod:`tcmu_handler.stats`); read it from the loop."""
        self._written: list[Arrival] = []  # with completions in the ring, not yet recorded

    # --- public API ----------------------------------------------------------------------------

    @classmethod
    def takeover(cls, info: UioInfo, executor: CommandExecutor, *, lun: int = 0,
                 policy: scsi.PathPolicy = scsi.PathPolicy.SINGLE,
                 reset_level: int = ResetLevel.BUSY,
                 configfs_root: Path = CONFIGFS_ROOT) -> Dispatcher:
        """Take over a device a dead handler left (see :func:`tcmu_handler.device.takeover`)
        and return a dispatcher for it, not yet started."""
        device = takeover(info, configfs_root=configfs_root, reset_level=reset_level)
        try:
            return cls(device, executor, lun=lun, policy=policy)
        except BaseException:
            device.close()
            raise

    @property
    def device(self) -> UioDevice:
        return self._device

    @property
    def lun(self) -> int:
        return self._lun

    @property
    def flags(self) -> ring.MailboxFlag:
        """The capabilities the kernel announced in the mailbox."""
        return self._flags

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    @property
    def stop_reason(self) -> StopReason | None:
        return self._stop_reason

    @property
    def stats(self) -> DispatcherStats:
        return DispatcherStats(
            in_flight=len(self._inflight), submitted=self._submitted,
            completed=self._completed, failed=self._failed, unknown_op=self._unknown_op,
            tmr_entries=self._tmr_entries, aborts=self._aborts, lun_resets=self._lun_resets,
            wakeups=self._wakeups, notifications=self._notifications, wraps=self._slots.wraps,
            pads=self._slots.pads)

    def start(self) -> None:
        """Start serving the ring (from a running loop): watch the fd and scan once now."""
        if self._state is not _State.NEW:
            raise TCMUError(f"{self._name}: dispatcher already started")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._done = loop.create_future()
        self._drained = asyncio.Event()
        self._state = _State.RUNNING
        loop.add_reader(self._device.fd, self._on_readable)
        self._reading = True
        log.info("%s: serving LUN %d (ring %d bytes, data area %d MiB, kernel offers %s)",
                 self._name, self._lun, self._cmdr_size, self._data_size >> 20,
                 "|".join(f.name or "" for f in ring.MailboxFlag if f in self._flags) or "none")
        # Opening the device snapshot the uio event counter: whatever the kernel queued before
        # (commands sent while no handler was running) raised no event we will ever see.
        self._serve()

    async def run(self) -> StopReason:
        """Start if needed, and wait until the dispatcher stops; return why."""
        if self._state is _State.NEW:
            self.start()
        assert self._done is not None
        return await asyncio.shield(self._done)

    async def close(self, *, timeout: float | None = 30.0) -> StopReason:
        """Stop taking commands, let those in flight finish (up to ``timeout`` seconds), write
        their completions, then close the device.

        Commands still in flight after the timeout are abandoned to the kernel
        (``cmd_time_out``) or to the next handler's takeover; their buffers stay mapped until
        the initiator lets go of them.
        """
        if self._state is _State.NEW:
            self._state = _State.STOPPED
            self._stop_reason = StopReason.CLOSED
            self._release_device()
            return StopReason.CLOSED
        if self._state is _State.RUNNING:
            self._stop_reading()
            self._state = _State.CLOSING
        if self._state is _State.CLOSING:
            assert self._drained is not None
            if self._inflight:
                self._drained.clear()
                try:
                    await asyncio.wait_for(self._drained.wait(), timeout)
                except TimeoutError:
                    log.warning("%s: closing with %d command(s) still in flight after %ss; "
                                "they are left to the kernel's cmd_time_out", self._name,
                                len(self._inflight), timeout)
            self._flush()
            self._stop(StopReason.CLOSED, "")
        for task in list(self._tasks):
            task.cancel()
        assert self._stop_reason is not None
        return self._stop_reason

    # --- reading the ring ----------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            self._device.read_event()
        except DeviceRemoved as exc:
            self._stop(StopReason.REMOVED, str(exc))
            return
        self._wakeups += 1
        self._serve()

    def _serve(self) -> None:
        self._in_scan = True
        hold, release = self._hold, self._release  # both or neither (__init__)
        if hold is not None:
            hold()
        try:
            self._scan()
        except RingError as exc:
            self._stop(StopReason.RING_CORRUPT, str(exc))
            return
        finally:
            self._in_scan = False
            if release is not None:
                release()  # the commands go to the target first, then the completions out
        self._flush()

    def _scan(self) -> None:
        """Take the entries up to cmd_head; submit each command (inline: the hot path)."""
        slots = self._slots
        take = slots.take
        slots.start()
        buf = self._buf
        inflight = self._inflight
        submit = self._executor.submit
        complete = self._complete
        lun = self._lun
        running = _State.RUNNING
        now = self._clock()
        arrivals: list[Arrival | None] = [None] * 9
        base_of = _OPERATION_BASE
        data_out_by_opcode = _DATA_OUT_BY_OPCODE
        # All the entries to cmd_head in one pass; then once more, which is empty or raises the
        # RingError of a bad entry that came after some (CommandRing.take).
        while entries := take():
            for entry in entries:
                if not isinstance(entry, CmdEntry):
                    self._other_entry(entry)
                    if self._state is not running:
                        return
                    continue
                cmd_id, _kf, _uf, _len, iov_cnt, iov_bidi_cnt, _dif, _cdb_off, iovecs, cdb = entry
                if cmd_id in inflight:
                    self._duplicate(cmd_id)
                data_out: list[memoryview] | None = None
                data_in: list[memoryview] | None = None
                opcode = cdb[0]
                if iovecs:
                    if len(iovecs) == 1:
                        ((o, n),) = iovecs
                        views = [buf[o:o + n]]
                    else:
                        views = [buf[o:o + n] for o, n in iovecs]
                        n = sum(map(_length, iovecs))
                    if iov_bidi_cnt:
                        data_out = views[:iov_cnt]
                        data_in = views[iov_cnt:]
                        cls = base_of[opcode] + DATA_OUT
                        data_in_len = 0
                    else:
                        # One lookup by opcode; the CDB decides only for a few (VERIFY, ...).
                        out = data_out_by_opcode[opcode]
                        if out is None:
                            out = _is_data_out(cdb)
                        if out:
                            data_out = views
                            cls = base_of[opcode] + DATA_OUT
                            data_in_len = 0
                        else:
                            data_in = views
                            cls = base_of[opcode]
                            data_in_len = n
                else:
                    views, n, data_in_len = [], 0, 0
                    cls = base_of[opcode] + NO_DATA
                arrival = arrivals[cls]
                if arrival is None:
                    arrival = arrivals[cls] = Arrival(now, cls)
                rec = inflight[cmd_id] = _Command(cmd_id, views, n, data_in_len, arrival)
                self._submitted += 1
                try:
                    # The completion callback is a partial of the bound method: calling it runs
                    # _complete() with no Python frame in between (an instance with __call__
                    # would add one, and a slower call through the type slot).
                    rec.handle = submit(lun, cdb, data_out=data_out, data_in=data_in,
                                        on_done=partial(complete, rec))
                except ISCSIError as exc:
                    if not rec.finished:
                        self._complete_error(rec, exc)
                except Exception as exc:
                    log.exception("%s: submitting CDB %s failed", self._name, cdb.hex())
                    if not rec.finished:
                        self._complete_error(rec, exc)
                if self._state is not running:
                    return

    def _other_entry(self, entry: TmrEntry | SkippedEntry | MalformedEntry) -> None:
        """An entry of the scan that is not a CMD entry to submit."""
        if isinstance(entry, MalformedEntry):
            self._unservable(entry)
        elif isinstance(entry, TmrEntry):
            self._start_tmr(entry)
        elif entry.opcode == _TMR:
            log.warning("%s: ignoring TMR entry: %s", self._name, entry.reason)
        else:
            self._warn_once(f"op{entry.opcode}", "%s: skipping ring entry with unknown "
                            "opcode %d", self._name, entry.opcode)

    def _unservable(self, exc: MalformedEntry) -> None:
        self._unknown_op += 1
        log.warning("%s: %s; completing it with UNKNOWN_OP", self._name, exc)
        if exc.cmd_id in self._inflight:
            self._duplicate(exc.cmd_id)
        # Class 8 (other, no data): it is not a command for us.
        rec = _Command(exc.cmd_id, [], 0, 0, Arrival(self._clock(), 8))
        self._inflight[exc.cmd_id] = rec
        # The kernel turns UNKNOWN_OP into CHECK CONDITION itself (tcmu_handle_completion).
        self._finish(rec, _CHECK_CONDITION, _UNKNOWN_OP)

    def _duplicate(self, cmd_id: int) -> NoReturn:
        raise RingError(f"{self._name}: the kernel queued cmd_id {cmd_id} while it is still "
                        "in flight; the ring was reset underneath us")

    # --- completing ----------------------------------------------------------------------------

    def _complete(self, rec: _Command, result: CommandResult | ISCSIError) -> None:
        """``on_done`` of one command: build the response and write it back."""
        if rec.finished:
            self._warn_once("twice", "%s: the initiator completed cmd_id %d twice",
                            self._name, rec.cmd_id)
            return
        if result.__class__ is not CommandResult and not isinstance(result, CommandResult):
            self._complete_error(rec, result)
            return
        status = result.status & 0xFF
        expected = rec.data_in_len
        if not status and (not expected or result.data_in_length == expected):
            self._finish(rec)
            return
        sense: bytes | None = None
        uflags = 0
        read_len = 0
        if status == _CHECK_CONDITION:
            sense = result.sense
            if not sense:
                # The kernel would hand 96 stale bytes to the initiator, which then has no
                # valid sense and escalates to error handling (aborts, resets).
                self._warn_once("nosense", "%s: target returned CHECK CONDITION without "
                                "sense data; reporting %s", self._name,
                                scsi.NO_SENSE_FROM_TARGET)
                sense = scsi.NO_SENSE_FROM_TARGET.fixed()
        if expected:
            # Only the bytes the target really sent may reach the kernel: the rest of the
            # data area holds whatever earlier commands left there. (A residual the target
            # claims without the Data-In to match it is not believed.)
            got = result.data_in_length
            if 0 < got < expected and self._use_read_len:
                # tcmu_handle_completion: a short read becomes target_complete_cmd_with_length
                # (a residual for the initiator); with CHECK CONDITION the data up to read_len
                # is still returned (SCF_TREAT_READ_AS_NORMAL).
                read_len = got
                uflags = _READ_LEN
            elif got < expected and not status:
                # GOOD, and no way to tell the kernel how much came: it ignores a read_len of
                # 0, and without CAP_READ_LEN any read_len. A retryable error rather than
                # stale bytes passed off as data.
                self._warn_once("short", "%s: target returned GOOD with %d of %d bytes and no "
                                "way to report that to the kernel; reporting %s", self._name,
                                got, expected, scsi.DATA_PHASE_ERROR)
                status, sense = _CHECK_CONDITION, scsi.DATA_PHASE_ERROR.fixed()
        self._finish(rec, status, uflags, read_len, sense)

    def _complete_error(self, rec: _Command, error: BaseException) -> None:
        code = scsi.sense_for_error(error, self._policy)
        self._failed += 1
        log.debug("%s: cmd_id %d failed (%s): reporting %s", self._name, rec.cmd_id, error,
                  code)
        self._finish(rec, _CHECK_CONDITION, 0, 0, code.fixed())

    def _finish(self, rec: _Command, status: int = 0, uflags: int = 0, read_len: int = 0,
                sense: bytes | None = None) -> None:
        rec.finished = True
        views = rec.views
        if views:
            # Release our views before the kernel can reap the slot and free the pages.
            rec.views = ()
            for view in views:
                try:
                    view.release()
                except BufferError:
                    self._warn_once("export", "%s: a buffer of cmd_id %d is still exported "
                                    "at completion", self._name, rec.cmd_id)
        self._completed += 1
        inflight = self._inflight
        cmd_id = rec.cmd_id
        if inflight.pop(cmd_id, None) is not rec:
            return
        if self._state is _STOPPED:
            self._release_device()
            return
        try:
            self._slots.complete(cmd_id, status, uflags, read_len, sense)
        except RingError as exc:
            self._stop(StopReason.RING_CORRUPT, str(exc))
            return
        arrival = rec.arrival
        if status or uflags:
            # The bytes moved: the Data-In the kernel takes (READ_LEN), else none.
            arrival.nbytes += read_len
            if status:
                self.metrics.status(status, _UNKNOWN_OP_SENSE if uflags & _UNKNOWN_OP
                                    else sense)
        else:
            arrival.nbytes += rec.nbytes
        if arrival.done:
            arrival.done += 1
        else:
            arrival.done = 1
            self._written.append(arrival)
        if not inflight:
            drained = self._drained
            if drained is not None:
                drained.set()
        # Publish once for all the completions of the executor's read under way, else of this
        # loop iteration; a scan publishes when it ends.
        if not self._in_scan and not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            after_receive = self._after_receive
            if after_receive is None or not after_receive(self._flush):
                self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Publish cmd_tail and make the kernel reap: one 4-byte write per batch."""
        self._flush_scheduled = False
        if self._state not in (_State.RUNNING, _State.CLOSING):
            return
        arrivals = self._written
        if arrivals:
            self._written = []
            self.metrics.record(arrivals, self._clock())
        # CommandRing.done(): one aligned 32-bit store of cmd_tail, after the response stores.
        # x86 keeps stores in order; on weaker CPUs the write() below is the barrier for the
        # reaping it triggers, though not for the kernel's other readers of cmd_tail
        # (block_dev, the unmap worker).
        if not self._slots.done() and not self._unsent:
            return
        try:
            written = self._device.notify()
        except DeviceRemoved as exc:
            self._stop(StopReason.REMOVED, str(exc))
            return
        if not written:  # EAGAIN: only a simulated device's socket can be full; try again
            self._unsent = True
            if self._loop is not None and not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.call_later(0.001, self._flush)
            return
        self._unsent = False
        self._notifications += 1

    # --- task management -----------------------------------------------------------------------

    def _start_tmr(self, tmr: TmrEntry) -> None:
        self._tmr_entries += 1
        targets = [rec for cmd_id in tmr.cmd_ids
                   if (rec := self._inflight.get(cmd_id)) is not None and not rec.finished]
        log.info("%s: kernel task management %s for %d command(s), %d still in flight",
                 self._name, _tmr_name(tmr.tmr_type), len(tmr.cmd_ids), len(targets))
        if not targets:
            return
        coro: Coroutine[Any, Any, None]
        if tmr.tmr_type in _ABORTS:
            coro = self._abort(targets)
        elif tmr.tmr_type in _RESETS:
            coro = self._reset(targets, _tmr_name(tmr.tmr_type))
        else:
            return  # CLEAR ACA, unknown: nothing to abort
        self._spawn(coro)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _abort(self, targets: list[_Command]) -> None:
        """ABORT TASK for each command; escalate to LUN RESET if an abort fails."""
        pending = [rec for rec in targets if not rec.finished and rec.handle is not None]
        self._aborts += len(pending)
        results = await asyncio.gather(
            *(self._executor.abort_task(rec.handle) for rec in pending if rec.handle),
            return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            log.warning("%s: ABORT TASK failed for %d command(s) (%s)", self._name,
                        len(failed), failed[0])
            await self._reset(pending, "ABORT TASK failed")

    async def _reset(self, targets: list[_Command], why: str) -> None:
        if all(rec.finished for rec in targets) or self._state is _State.STOPPED:
            return
        self._lun_resets += 1
        log.warning("%s: LOGICAL UNIT RESET of LUN %d (%s)", self._name, self._lun, why)
        try:
            await self._executor.lun_reset(self._lun)
        except Exception as exc:
            log.warning("%s: LOGICAL UNIT RESET of LUN %d failed: %s", self._name, self._lun,
                        exc)

    async def _abort_quietly(self, targets: list[_Command]) -> None:
        pending = [rec for rec in targets if not rec.finished and rec.handle is not None]
        self._aborts += len(pending)
        results = await asyncio.gather(
            *(self._executor.abort_task(rec.handle) for rec in pending if rec.handle),
            return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                log.debug("%s: abort after removal failed: %s", self._name, r)

    # --- stopping ------------------------------------------------------------------------------

    def _stop_reading(self) -> None:
        if self._reading and self._loop is not None:
            self._reading = False
            self._loop.remove_reader(self._device.fd)

    def _stop(self, reason: StopReason, message: str) -> None:
        if self._state is _State.STOPPED:
            return
        self._stop_reading()
        self._state = _State.STOPPED
        self._stop_reason = reason
        n = len(self._inflight)
        if reason is StopReason.REMOVED:
            log.warning("%s; stopped serving it, %d command(s) in flight dropped", message, n)
        elif reason is StopReason.RING_CORRUPT:
            log.error("%s; stopped serving it, %d command(s) in flight dropped", message, n)
        if n and reason is not StopReason.CLOSED:
            # Nobody will read their completions: ask the target to drop them so the
            # initiator lets go of their buffers soon, and we can unmap.
            self._spawn(self._abort_quietly(list(self._inflight.values())))
        if self._done is not None and not self._done.done():
            self._done.set_result(reason)
        self._release_device()

    def _release_device(self) -> None:
        """Close the fd now; unmap once no command's buffers are in the initiator's hands."""
        if self._inflight:
            self._device.close()  # closes the fd; the unmap is deferred (views still exported)
            return
        self._slots.release()
        if not self._device.close():
            self._warn_once("unmap", "%s: views of the map outlived their commands; "
                            "unmapping is deferred", self._name)

    def _warn_once(self, key: str, fmt: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(fmt, *args)


def _tmr_name(tmr_type: int) -> str:
    try:
        return ring.TmrType(tmr_type).name.replace("_", " ")
    except ValueError:
        return f"type {tmr_type}"
