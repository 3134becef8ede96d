"""The kernel side of a TCMU ring, in Python: a test double for running the real dispatcher
without a kernel (tests and ``bench/ring``; it does not ship in the package).

Theory of operation
-------------------
:class:`RingSimulator` plays ``target_core_user`` (``drivers/target/target_core_user.c``,
Linux 6.1) over an ordinary file (a memfd) mapped twice: once as "kernel" memory, where the
simulator writes entries and data, and once as the handler's map, handed out inside a real
:class:`~tcmu_handler.device.UioDevice`. The uio fd is one end of an ``AF_UNIX``
``SOCK_SEQPACKET`` pair: the simulator sends a 4-byte event count when it queues work (several
events pending coalesce into one, as a uio read returns only the latest count), and each 4-byte
write from the handler makes it reap completions, as ``tcmu_irqcontrol`` does. Removing the
device closes the simulator's end, so the handler reads end-of-file (a real device gives EIO).

What is reproduced, function by function:

- ``queue_cmd_ring``: data blocks (``data_pages_per_blk`` pages each) taken lowest-first from a
  bitmap below ``dbi_thresh``, which grows on demand; pages allocated lazily and zeroed;
  contiguous blocks merged into one iovec; BIDI Data-In iovecs after the Data-Out ones; entry
  size ``max(48 + 16*iov_cnt, 112) + round_up(cdb_len, 8)``; the free-space rule (one byte
  kept free, a PAD to the end of the ring counted when the entry does not fit before it);
  commands larger than half the ring or the data area refused; cmd_ids from ``xa_alloc`` in
  [1, 0xFFFF] (lowest free id, not cyclic); commands that do not fit wait on the qfull queue,
  in order, and are retried after each reap; ``BLOCKED`` and ``BROKEN`` fail new commands.
- ``tcmu_handle_completions``: walks from the last cleaned slot to ``cmd_tail``, skipping PAD and
  TMR, looks each CMD slot's cmd_id up and marks the ring broken on an unknown one;
  ``UNKNOWN_OP``, ``READ_LEN`` (reads only, non-zero), sense copied only for CHECK CONDITION,
  Data-In copied back up to ``read_len``, ``KEEP_BUF``; then the TMR queue and the qfull queue.
- ``tcmu_tmr_notify`` / ``queue_tmr_ring``, ``tcmu_block_dev``, ``tcmu_reset_ring``,
  ``free_kept_buf``, command time-out (:meth:`RingSimulator.expire`) and the block reclaim of
  ``find_free_blocks`` (:meth:`RingSimulator.reclaim`), which poisons released pages.

Timers are not simulated: time-outs happen when a test calls :meth:`~RingSimulator.expire`.
Ring and data sizes may be any page-compatible size (the kernel takes whole MiB) so that tests
wrap the ring often.

SIGBUS: with ``strict=True`` the data area of the handler's map is ``mprotect``-ed to
``PROT_NONE`` except the pages of commands the handler currently owns, so touching any other
data page crashes the test process, as a real data-area fault would. This is stricter than the
kernel (which lets a page stay reachable until reclaim) and is exactly the rule the handler
must obey.

Beyond what the kernel checks, :attr:`RingSimulator.violations` records handler mistakes the
kernel would not notice at once: a changed ``len_op``, a ``cmd_tail`` that is not a slot, a
write that is not 4 bytes.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import ctypes
import enum
import errno
import fcntl
import heapq
import mmap
import os
import socket
import struct
import termios
from collections.abc import Callable, Iterator, Sequence

from initiator.command import ScsiStatus
from tcmu_handler import ring
from tcmu_handler.device import UioDevice
from tcmu_handler.errors import DeviceBusy, TCMUError

PAGE_SIZE = mmap.PAGESIZE
CMDR_SIZE_DEF = 8 * 1024 * 1024 - ring.MAILBOX_SIZE
"""``CMDR_SIZE_DEF``: an 8 MiB map region for mailbox + ring."""
DATA_SIZE_DEF = 64 * 1024 * 1024
"""Smaller than the kernel's 1 GiB default: plenty for tests and benchmarks."""
ALL_CAPS = (ring.MailboxFlag.OOOC | ring.MailboxFlag.READ_LEN | ring.MailboxFlag.TMR
            | ring.MailboxFlag.KEEP_BUF)
"""The flags ``tcmu_configure_device`` sets (Linux 5.10+)."""
MAX_CMD_ID = 0xFFFF
_POISON = 0xA5

_EVENT = struct.Struct("=I")
_PAD = int(ring.Opcode.PAD)
_CMD = int(ring.Opcode.CMD)
_TMR = int(ring.Opcode.TMR)
_UNKNOWN_OP = int(ring.UFlag.UNKNOWN_OP)
_READ_LEN = int(ring.UFlag.READ_LEN)
_KEEP_BUF = int(ring.UFlag.KEEP_BUF)
_CHECK_CONDITION = int(ScsiStatus.CHECK_CONDITION)


class SimulatorError(TCMUError):
    """Misuse of the simulator, e.g. submitting after removal."""


class Direction(enum.Enum):
    """``se_cmd->data_direction`` (plus BIDI)."""

    NONE = "none"
    READ = "read"
    """DMA_FROM_DEVICE: Data-In."""
    WRITE = "write"
    """DMA_TO_DEVICE: Data-Out."""
    BIDI = "bidi"


class CommandState(enum.Enum):
    """Where a simulated command is."""

    QUEUED = "queued"
    """On the qfull queue: waiting for ring or data space (no cmd_id yet)."""
    ON_RING = "on ring"
    """In the ring; the handler owns it."""
    COMPLETED = "completed"
    """Reaped from the handler's completion."""
    FAILED = "failed"
    """Completed by the kernel itself (blocked, broken, reset, refused, timed out, aborted)."""


class SimCommand:
    """One command the simulated kernel queued, and what became of it."""

    __slots__ = (
        "_iov_bidi_cnt", "_iovecs", "_main_runs", "_runs", "aborted", "bidi_in_length", "cdb",
        "cmd_id", "data_in", "data_length", "data_out", "direction", "expired", "gather",
        "keep_buf_done", "kernel_reason", "on_complete", "raw_response", "read_len",
        "residual", "sense", "state", "status", "uflags", "unknown_op",
    )

    def __init__(self, cdb: bytes, direction: Direction, data_length: int, data_out: bytes | None,
                 bidi_in_length: int, gather: bool,
                 on_complete: Callable[[SimCommand], None] | None) -> None:
        self.cdb = cdb
        self.direction = direction
        self.data_length = data_length
        """``se_cmd->data_length``: the Data-Out length for WRITE and BIDI, Data-In for READ."""
        self.data_out = data_out
        self.bidi_in_length = bidi_in_length
        self.gather = gather
        self.on_complete = on_complete
        self.cmd_id = 0
        self.state = CommandState.QUEUED
        self.status: int | None = None
        self.sense = b""
        """The 96 sense bytes the kernel copied (CHECK CONDITION only)."""
        self.raw_response: ring.Response | None = None
        """The slot's response fields exactly as the kernel read them."""
        self.uflags = 0
        self.unknown_op = False
        self.read_len: int | None = None
        """Data-In bytes the kernel copied back (None when it copied none)."""
        self.residual = 0
        """Underflow the kernel reports to the initiator (READ_LEN shorter than asked)."""
        self.data_in: bytes | None = None
        self.aborted = False
        """A TMR listed this command (LIO then answers the initiator TASK ABORTED)."""
        self.expired = False
        self.keep_buf_done = False
        self.kernel_reason: str | None = None
        """Why the kernel failed the command itself (state FAILED)."""
        self._runs: list[list[int]] = []  # [first block, count]: runs of consecutive blocks
        self._main_runs = 0  # runs before this index hold se_cmd->data_length, then BIDI in
        self._iovecs: list[tuple[int, int]] = []
        self._iov_bidi_cnt = 0

    @property
    def data_in_length(self) -> int:
        """Bytes of Data-In the command asked for."""
        if self.direction is Direction.READ:
            return self.data_length
        if self.direction is Direction.BIDI:
            return self.bidi_in_length
        return 0

    @property
    def iovecs(self) -> list[tuple[int, int]]:
        """The iovecs written into the entry (map offsets)."""
        return list(self._iovecs)

    def __repr__(self) -> str:
        return (f"<SimCommand id={self.cmd_id} {self.cdb[:1].hex()} {self.direction.value} "
                f"{self.state.value} status={self.status}>")


class _Tmr:
    __slots__ = ("cmd_ids", "tmr_type")

    def __init__(self, tmr_type: int, cmd_ids: list[int]) -> None:
        self.tmr_type = tmr_type
        self.cmd_ids = cmd_ids


_libc = ctypes.CDLL(None, use_errno=True)
_mprotect = _libc.mprotect
_mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_mprotect.restype = ctypes.c_int


class RingSimulator:
    """A simulated ``target_core_user`` device (see the module docstring).

    ``submit`` queues a command as the target core would; the handler under test opens the
    device with :meth:`open` and serves it; completions come back through each command's
    ``on_complete`` (called after the reap, in ring order, never re-entrantly).
    """

    def __init__(self, *, cmdr_size: int = CMDR_SIZE_DEF, data_size: int = DATA_SIZE_DEF,
                 data_pages_per_blk: int = 1, flags: ring.MailboxFlag = ALL_CAPS,
                 tmr_notification: bool = True, qfull_time_out: int = -1, strict: bool = True,
                 name: str = "tcm-user/0/sim/iscsi/simulated") -> None:
        if cmdr_size <= 0 or cmdr_size % ring.OP_ALIGN_SIZE or (
                (ring.MAILBOX_SIZE + cmdr_size) % PAGE_SIZE):
            raise SimulatorError(
                f"cmdr_size {cmdr_size}: mailbox + ring must be whole pages (the kernel uses "
                f"N MiB - {ring.MAILBOX_SIZE})")
        if data_pages_per_blk < 1 or data_size < data_pages_per_blk * PAGE_SIZE or (
                data_size % PAGE_SIZE):
            raise SimulatorError(f"data_size {data_size} must be whole pages and hold a block")
        self.name = name
        self.cmdr_size = cmdr_size
        self.data_off = ring.MAILBOX_SIZE + cmdr_size
        self.map_size = self.data_off + data_size
        self.data_pages_per_blk = data_pages_per_blk
        self.blk_size = data_pages_per_blk * PAGE_SIZE
        self.max_blocks = data_size // PAGE_SIZE // data_pages_per_blk
        self.flags = flags
        self.tmr_notification = tmr_notification
        self.qfull_time_out = qfull_time_out
        self.strict = strict

        self._fd = os.memfd_create("tcmu-sim", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, self.map_size)
        self._kmap = mmap.mmap(self._fd, self.map_size)
        self._kview = memoryview(self._kmap)
        self._k32 = self._kview.cast("I")
        ring.write_mailbox(self._kview, flags=flags, cmdr_size=cmdr_size)

        self.last_cleaned = 0
        """``cmdr_last_cleaned``: the kernel's own tail."""
        self.dbi_thresh = 0
        self.dbi_max = 0
        self.broken = False
        self.blocked = False
        self.removed = False
        self.messages: list[str] = []
        """Everything the kernel would log (pr_err/pr_warn), errors included."""
        self.errors: list[str] = []
        """The kernel errors a correct handler never causes (a broken ring, for one)."""
        self.violations: list[str] = []
        """Handler mistakes the kernel would not catch at once."""
        self.submitted = 0
        self.reaped = 0
        self.events = 0
        """uio events raised (``uio_event_notify``)."""
        self.events_sent = 0
        """Events actually written to the fd (the rest coalesced)."""
        self.user_writes = 0
        self.wraps = 0
        """Times ``cmd_head`` went back to the start of the ring."""

        self._commands: dict[int, SimCommand] = {}
        self._free_ids: list[int] = []
        self._next_id = 1
        self._qfull: collections.deque[SimCommand] = collections.deque()
        self._tmr_queue: collections.deque[_Tmr] = collections.deque()
        self._bitmap = bytearray(self.max_blocks)
        self._used_blocks = 0
        self._blk_pages = array.array("I", bytes(4 * self.max_blocks))
        self._blk_full = bytearray(self.max_blocks)  # 1 where all pages of a block exist
        self._slot_len_op: dict[int, int] = {}
        self._ready: collections.deque[SimCommand] = collections.deque()
        self._delivering = False
        self._plugged = 0
        self._plug_pending = False

        self._ksock: socket.socket | None = None
        self._usock: socket.socket | None = None
        self._device: UioDevice | None = None
        self._user_addr = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # --- the handler's side ----------------------------------------------------------------------

    def open(self) -> UioDevice:
        """Open the device as a handler would (``/dev/uioN`` + mmap); EBUSY while open."""
        if self.removed:
            raise SimulatorError(f"{self.name} was removed")
        if self._device is not None and not self._device.closed:
            raise DeviceBusy(f"{self.name} is already open")
        self.detach()
        for sock in (self._ksock, self._usock):
            if sock is not None:
                sock.close()
        # A fresh pair: opening snapshots the event counter, earlier events are not seen.
        self._ksock, self._usock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._ksock.setblocking(False)
        self._usock.setblocking(False)
        mapping = mmap.mmap(self._fd, self.map_size)
        if self.strict:
            anchor = ctypes.c_char.from_buffer(mapping)
            self._user_addr = ctypes.addressof(anchor)
            del anchor  # drop the export, or the handler could never unmap
            self._protect(self.data_off, self.map_size - self.data_off, False, force=True)
            for cmd in self._commands.values():
                # Expired and kept commands still own their data until the handler lets go.
                self._protect_cmd(cmd, True, force=True)
        device = UioDevice(os.dup(self._usock.fileno()), mapping, name=f"simulated {self.name}",
                           path="simulated")
        self._device = device
        with contextlib.suppress(RuntimeError):
            self.attach(asyncio.get_running_loop())
        return device

    def attach(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Reap whenever the handler writes, from ``loop`` (the running loop by default)."""
        if self._ksock is None:
            raise SimulatorError("open the device first")
        self.detach()
        self._loop = loop or asyncio.get_running_loop()
        self._loop.add_reader(self._ksock.fileno(), self.process)

    def detach(self) -> None:
        if self._loop is not None and self._ksock is not None:
            self._loop.remove_reader(self._ksock.fileno())
        self._loop = None

    def process(self) -> int:
        """Take the handler's 4-byte writes; reap once if there were any (``tcmu_irqcontrol``).

        Returns the number of writes taken. Called by the loop when attached, or by hand.
        """
        sock = self._ksock
        if sock is None:
            return 0
        writes = 0
        while True:
            try:
                msg = sock.recv(64)
            except BlockingIOError:
                break
            except OSError:
                break
            if not msg:
                break
            if len(msg) != 4:
                self.violations.append(
                    f"handler wrote {len(msg)} bytes to the uio fd; uio_write only accepts 4 "
                    "(EINVAL)")
                continue
            writes += 1
        if writes:
            self.user_writes += writes
            if self.handle_completions():
                self._run_qfull_queue(fail=False)
            self._deliver()
        return writes

    # --- what the target core does --------------------------------------------------------------

    def submit(self, cdb: bytes, *, data_out: bytes | int | None = None, data_in: int = 0,
               gather: bool = True,
               on_complete: Callable[[SimCommand], None] | None = None) -> SimCommand:
        """Queue a SCSI command (``tcmu_queue_cmd``).

        ``data_out`` is the Data-Out payload (or just its length, to skip the copy, as the
        benchmark does); ``data_in`` the Data-In length. Both make a BIDI command. ``gather``
        False skips copying Data-In back at completion.
        """
        if self.removed or self._closed:
            raise SimulatorError(f"{self.name} was removed")
        if len(cdb) != ring.cdb_length(cdb[0], cdb[7] if len(cdb) > 7 else 0):
            raise SimulatorError(f"CDB {cdb.hex()} is not {ring.cdb_length(cdb[0])} bytes")
        payload: bytes | None
        if isinstance(data_out, int):
            out_len, payload = data_out, None
        elif data_out is not None:
            out_len, payload = len(data_out), data_out
        else:
            out_len, payload = 0, None
        if data_out is not None and data_in:
            cmd = SimCommand(cdb, Direction.BIDI, out_len, payload, data_in, gather, on_complete)
        elif data_out is not None:
            cmd = SimCommand(cdb, Direction.WRITE, out_len, payload, 0, gather, on_complete)
        elif data_in:
            cmd = SimCommand(cdb, Direction.READ, data_in, None, 0, gather, on_complete)
        else:
            cmd = SimCommand(cdb, Direction.NONE, 0, None, 0, gather, on_complete)
        self.submitted += 1
        self._queue_cmd_ring(cmd)  # a refused command is failed, its callback queued
        self._deliver()
        return cmd

    def tmr(self, tmr_type: ring.TmrType | int, commands: Sequence[SimCommand]) -> None:
        """A task management function touched ``commands`` (``tcmu_tmr_notify``)."""
        on_ring: list[int] = []
        for cmd in commands:
            if cmd.state is CommandState.QUEUED:
                # Commands on the qfull queue have no cmd_id: the kernel completes them itself.
                self._qfull.remove(cmd)
                self._fail(cmd, ScsiStatus.TASK_ABORTED, "aborted while waiting for ring space")
            elif cmd.state is CommandState.ON_RING and not cmd.expired:
                cmd.aborted = True
                on_ring.append(cmd.cmd_id)
        if self.tmr_notification:
            self._queue_tmr_ring(_Tmr(int(tmr_type), on_ring))
        self._deliver()

    @contextlib.contextmanager
    def plug(self) -> Iterator[None]:
        """Queue several commands with one notification (``tcmu_plug_device``)."""
        self._plugged += 1
        try:
            yield
        finally:
            self._plugged -= 1
            if not self._plugged and self._plug_pending:
                self._plug_pending = False
                self._notify()

    # --- configfs actions (DeviceControl for tcmu_handler.device.takeover_with) ----------------

    def can_reset(self) -> bool:
        return True

    def block(self) -> None:
        """``action/block_dev`` = 1 (``tcmu_block_dev``)."""
        if not self.blocked:
            self.blocked = True
            self.handle_completions()
            self._run_qfull_queue(fail=True)
            self._deliver()

    def unblock(self) -> None:
        """``action/block_dev`` = 0."""
        self.blocked = False

    def reset_ring(self, level: int = 1) -> None:
        """``action/reset_ring`` (``tcmu_reset_ring``): 1 fails with BUSY, 2 with CHECK
        CONDITION."""
        if level not in (1, 2):
            raise SimulatorError(f"reset_ring takes 1 or 2, not {level} (EINVAL)")
        for cmd_id, cmd in list(self._commands.items()):
            del self._commands[cmd_id]
            heapq.heappush(self._free_ids, cmd_id)
            if not cmd.expired and not cmd.keep_buf_done:
                if level == 1:
                    self._fail(cmd, ScsiStatus.BUSY, "reset_ring")
                else:
                    self._fail(cmd, ScsiStatus.CHECK_CONDITION, "reset_ring")
            self._free_data(cmd)
        self.last_cleaned = 0
        self._k32[ring.TAIL_WORD] = 0
        self._k32[ring.HEAD_WORD] = 0
        self._slot_len_op.clear()
        self.broken = False
        self._tmr_queue.clear()
        self._run_qfull_queue(fail=False)
        self._deliver()

    def free_kept_buf(self, cmd_id: int) -> None:
        """``action/free_kept_buf``: release a command completed with KEEP_BUF."""
        cmd = self._commands.get(cmd_id)
        if cmd is None or not cmd.keep_buf_done:
            raise SimulatorError(f"free_kept_buf: cmd_id {cmd_id} was not kept (EINVAL)")
        del self._commands[cmd_id]
        heapq.heappush(self._free_ids, cmd_id)
        self._free_data(cmd)
        if not self._tmr_queue:
            self._run_qfull_queue(fail=False)
        self._deliver()

    def expire(self, cmd: SimCommand) -> None:
        """``cmd_time_out`` ran out for a command on the ring (``tcmu_check_expired_ring_cmd``):
        the initiator gets CHECK CONDITION, the slot and data stay until the handler
        completes it."""
        if cmd.state is not CommandState.ON_RING or cmd.expired:
            raise SimulatorError(f"{cmd} is not waiting on the ring")
        cmd.expired = True
        self._fail(cmd, ScsiStatus.CHECK_CONDITION, "cmd_time_out")
        self._deliver()

    def reclaim(self) -> int:
        """Release data pages above the highest block in use (``find_free_blocks``).

        Released pages are poisoned; they are zeroed again when reallocated. Returns the number
        of pages released.
        """
        if self.handle_completions():
            self._run_qfull_queue(fail=False)
        self._deliver()
        if not self.dbi_thresh:
            return 0
        end = self.dbi_max + 1
        block = self._bitmap.rfind(1, 0, end)
        if block == -1:
            block = end  # find_last_bit() returns the size when no bit is set
        if block == self.dbi_max:
            return 0
        if block == end:
            start = self.dbi_thresh = 0
            self.dbi_max = 0
        else:
            start = self.dbi_thresh = block + 1
            self.dbi_max = block
        freed = 0
        for dbi in range(start, end):
            pages = self._blk_pages[dbi]
            if pages:
                off = self.data_off + dbi * self.blk_size
                self._kview[off:off + pages * PAGE_SIZE] = bytes([_POISON]) * (pages * PAGE_SIZE)
                self._blk_pages[dbi] = 0
                self._blk_full[dbi] = 0
                freed += pages
        return freed

    def remove(self) -> None:
        """Delete the backstore: the uio device is unregistered under the handler."""
        self.removed = True
        self.detach()
        if self._ksock is not None:
            self._ksock.close()
            self._ksock = None

    def close(self) -> None:
        """Free everything the simulator holds (the handler closes its own device)."""
        if self._closed:
            return
        self._closed = True
        self.remove()
        if self._usock is not None:
            self._usock.close()
            self._usock = None
        self._k32.release()
        self._kview.release()
        self._kmap.close()
        os.close(self._fd)

    # --- state -----------------------------------------------------------------------------------

    @property
    def head(self) -> int:
        return self._k32[ring.HEAD_WORD]

    @property
    def tail(self) -> int:
        """``cmd_tail`` as the handler last stored it."""
        return self._k32[ring.TAIL_WORD]

    @property
    def on_ring(self) -> int:
        """Commands the handler owns (cmd_ids in use, expired and kept ones included)."""
        return len(self._commands)

    @property
    def queued(self) -> int:
        """Commands waiting on the qfull queue."""
        return len(self._qfull)

    @property
    def used_blocks(self) -> int:
        return self._used_blocks

    @property
    def problems(self) -> list[str]:
        """Everything wrong so far: kernel errors (a broken ring) and handler violations."""
        return self.errors + self.violations

    @property
    def idle(self) -> bool:
        """Nothing queued, nothing on the ring, every slot reaped, every block free."""
        return (not self._commands and not self._qfull and not self._tmr_queue
                and self.head == self.last_cleaned and self._used_blocks == 0)

    def kernel_view(self) -> memoryview:
        """The simulator's own view of the map (for tests that corrupt entries on purpose)."""
        return self._kview

    # --- queue_cmd_ring --------------------------------------------------------------------------

    def _queue_cmd_ring(self, cmd: SimCommand) -> int:
        """Returns -1 (failed), 0 (on the ring) or 1 (waiting on the qfull queue)."""
        if self.blocked:
            self._fail(cmd, ScsiStatus.BUSY, "TCM_LUN_BUSY: device blocked")
            return -1
        if self.broken:
            self._fail(cmd, ScsiStatus.CHECK_CONDITION,
                       "TCM_LOGICAL_UNIT_COMMUNICATION_FAILURE: ring broken")
            return -1
        if self._qfull:
            return self._add_to_qfull(cmd)
        blk = self.blk_size
        main_blocks = -(-cmd.data_length // blk)
        bidi_blocks = -(-cmd.bidi_in_length // blk) if cmd.direction is Direction.BIDI else 0
        dbi_cnt = main_blocks + bidi_blocks
        if dbi_cnt * blk > self.max_blocks * blk:
            self.messages.append(f"TCMU: Request of size {dbi_cnt * blk} is too big for "
                                 f"{self.max_blocks * blk} data area")
            self._fail(cmd, ScsiStatus.CHECK_CONDITION, "TCM_INVALID_CDB_FIELD: data too big")
            return -1
        iov_cnt = self._alloc_data_space(cmd, dbi_cnt)
        if iov_cnt < 0:
            self._free_data(cmd)
            return self._add_to_qfull(cmd)
        base = ring.cmd_base_size(iov_cnt)
        size = base + ring.round_up(len(cmd.cdb), ring.OP_ALIGN_SIZE)
        if size > self.cmdr_size // 2:
            self.messages.append(f"TCMU: Request of size {size} is too big for "
                                 f"{self.cmdr_size} cmd ring")
            self._free_data(cmd)
            self._fail(cmd, ScsiStatus.CHECK_CONDITION, "TCM_INVALID_CDB_FIELD: entry too big")
            return -1
        if not self._ring_space_avail(size):
            self._free_data(cmd)
            return self._add_to_qfull(cmd)
        cmd_id = self._alloc_id()
        if cmd_id < 0:
            self.messages.append("tcmu: Could not allocate cmd id.")
            self._free_data(cmd)
            self._fail(cmd, ScsiStatus.CHECK_CONDITION, "TCM_OUT_OF_RESOURCES: no cmd id")
            return -1
        cmd.cmd_id = cmd_id
        self._commands[cmd_id] = cmd
        head = self._insert_padding(size)

        iovecs = self._runs_to_iovecs(cmd._runs[:cmd._main_runs], cmd.data_length)
        if cmd.direction is Direction.BIDI:
            bidi = self._runs_to_iovecs(cmd._runs[cmd._main_runs:], cmd.bidi_in_length)
            cmd._iov_bidi_cnt = len(bidi)
            iovecs += bidi
        if len(iovecs) != iov_cnt:
            raise AssertionError(f"iovec count {len(iovecs)} != {iov_cnt}")  # simulator bug
        cmd._iovecs = iovecs
        payload = cmd.data_out
        if payload is not None:  # scatter_data_area
            pos = 0
            view = self._kview
            for off, length in iovecs[:len(iovecs) - cmd._iov_bidi_cnt]:
                view[off:off + length] = payload[pos:pos + length]
                pos += length
        entry_off = ring.MAILBOX_SIZE + head
        cdb_off = entry_off + base
        ring.write_cmd(self._kview, entry_off, cmd_id=cmd_id, length=size, iovecs=iovecs,
                       iov_bidi_cnt=cmd._iov_bidi_cnt, cdb_off=cdb_off, cdb=cmd.cdb)
        self._slot_len_op[head] = ring.make_len_op(ring.Opcode.CMD, size)
        cmd.state = CommandState.ON_RING
        self._protect_cmd(cmd, True)
        self._advance_head(head, size)
        if self._plugged:
            self._plug_pending = True
        else:
            self._notify()
        return 0

    def _add_to_qfull(self, cmd: SimCommand) -> int:
        if self.qfull_time_out == 0:
            self._fail(cmd, ScsiStatus.CHECK_CONDITION, "TCM_OUT_OF_RESOURCES: qfull_time_out=0")
            return -1
        cmd.state = CommandState.QUEUED
        self._qfull.append(cmd)
        return 1

    def _alloc_data_space(self, cmd: SimCommand, dbi_cnt: int) -> int:
        """``tcmu_alloc_data_space``: reserve the blocks; the iovec count, or -1."""
        if not dbi_cnt:
            return 0
        space = self.dbi_thresh - self._used_blocks  # spc_bitmap_free
        if space < dbi_cnt:
            blocks_left = (self.max_blocks - self.dbi_thresh) + space
            if blocks_left < dbi_cnt:
                return -1
            self.dbi_thresh = min(self.dbi_thresh + dbi_cnt, self.max_blocks)
        iov_cnt = self._get_empty_blocks(cmd, cmd.data_length)
        if iov_cnt < 0:
            return -1
        cmd._main_runs = len(cmd._runs)
        if cmd.direction is Direction.BIDI and cmd.bidi_in_length:
            bidi_cnt = self._get_empty_blocks(cmd, cmd.bidi_in_length)
            if bidi_cnt < 0:
                return -1
            iov_cnt += bidi_cnt
        return iov_cnt

    def _get_empty_blocks(self, cmd: SimCommand, length: int) -> int:
        """``tcmu_get_empty_blocks``: one block per ``blk_size`` bytes, each the lowest free
        one (``find_first_zero_bit``); returns how many iovecs they make (a new one whenever a
        block does not follow the previous one)."""
        blk = self.blk_size
        k = -(-length // blk)
        if k <= 0:
            return 0
        bitmap = self._bitmap
        thresh = self.dbi_thresh
        first = bitmap.find(0, 0, thresh)
        if first < 0:
            return -1
        last = first + k - 1
        # Fast path, same result: the k lowest free blocks are consecutive and their pages
        # are already allocated.
        if (last < thresh and bitmap.count(0, first, last + 1) == k
                and self._blk_full.count(1, first, last) == k - 1
                and self._blk_pages[last] * PAGE_SIZE >= length - (k - 1) * blk):
            bitmap[first:last + 1] = b"\x01" * k
            self._used_blocks += k
            self.dbi_max = max(self.dbi_max, last)
            cmd._runs.append([first, k])
            return 1
        prev = -2
        iov_cnt = 0
        while length > 0:
            dbi = bitmap.find(0, 0, thresh)
            if dbi < 0:
                return -1
            self._alloc_pages(dbi, -(-min(length, blk) // PAGE_SIZE))
            self.dbi_max = max(self.dbi_max, dbi)
            bitmap[dbi] = 1
            self._used_blocks += 1
            if dbi != prev + 1:
                iov_cnt += 1
                cmd._runs.append([dbi, 1])
            else:
                cmd._runs[-1][1] += 1
            prev = dbi
            length -= blk
        return iov_cnt

    def _alloc_pages(self, dbi: int, page_cnt: int) -> None:
        """Lazily allocated, zeroed pages (``alloc_page(GFP_NOIO | __GFP_ZERO)``)."""
        have = self._blk_pages[dbi]
        if have < page_cnt:
            start = self.data_off + dbi * self.blk_size + have * PAGE_SIZE
            n = (page_cnt - have) * PAGE_SIZE
            self._kview[start:start + n] = bytes(n)
            self._blk_pages[dbi] = page_cnt
            if page_cnt == self.data_pages_per_blk:
                self._blk_full[dbi] = 1

    def _runs_to_iovecs(self, runs: Sequence[list[int]], length: int) -> list[tuple[int, int]]:
        """``new_block_to_iov``: one iovec per run of consecutive blocks."""
        iovecs: list[tuple[int, int]] = []
        blk = self.blk_size
        for first, count in runs:
            n = min(length, count * blk)
            iovecs.append((self.data_off + first * blk, n))
            length -= n
        return iovecs

    def _free_data(self, cmd: SimCommand) -> None:
        """``tcmu_cmd_free_data``."""
        if cmd._iovecs:
            self._protect_cmd(cmd, False)
        bitmap = self._bitmap
        for first, count in cmd._runs:
            bitmap[first:first + count] = bytes(count)
            self._used_blocks -= count
        cmd._runs = []

    def _alloc_id(self) -> int:
        """``xa_alloc(..., XA_LIMIT(1, 0xffff))``: the lowest free id."""
        if self._free_ids:
            return heapq.heappop(self._free_ids)
        if self._next_id > MAX_CMD_ID:
            return -1
        self._next_id += 1
        return self._next_id - 1

    def _ring_space_avail(self, size: int) -> bool:
        """``is_ring_space_avail``: room for the entry, plus a PAD if it must wrap."""
        csize = self.cmdr_size
        head = self._k32[ring.HEAD_WORD] % csize
        to_end = csize - head
        needed = size if to_end >= size else size + to_end
        used = head - self.last_cleaned
        if used < 0:
            used += csize
        return csize - used - 1 >= needed  # spc_free keeps one byte unused

    def _insert_padding(self, size: int) -> int:
        """``ring_insert_padding``: a PAD to the end of the ring if the entry does not fit."""
        csize = self.cmdr_size
        head = self._k32[ring.HEAD_WORD] % csize
        if csize - head < size:
            pad = csize - head
            ring.write_pad(self._kview, ring.MAILBOX_SIZE + head, pad)
            self._slot_len_op[head] = ring.make_len_op(ring.Opcode.PAD, pad)
            head = self._advance_head(head, pad)
        return head

    def _advance_head(self, head: int, size: int) -> int:
        """``UPDATE_HEAD``: publish the new ``cmd_head`` (after the entry is complete)."""
        head = (head + size) % self.cmdr_size
        if head == 0:
            self.wraps += 1
        self._k32[ring.HEAD_WORD] = head
        return head

    def _notify(self) -> None:
        """``uio_event_notify``: bump the event count, wake the reader."""
        self.events += 1
        ksock, usock = self._ksock, self._usock
        if ksock is None or usock is None:
            return
        try:
            pending = struct.unpack(
                "=i", fcntl.ioctl(usock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
        except OSError:
            pending = 0
        if pending:
            return  # a read returns only the latest count: pending events coalesce
        try:
            ksock.send(_EVENT.pack(self.events & 0xFFFFFFFF))
            self.events_sent += 1
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EPIPE, errno.ECONNRESET):
                raise

    # --- queue_tmr_ring --------------------------------------------------------------------------

    def _queue_tmr_ring(self, tmr: _Tmr) -> int:
        if self.broken:
            return 0  # dropped
        size = ring.tmr_entry_size(len(tmr.cmd_ids))
        if self._tmr_queue or not self._ring_space_avail(size):
            self._tmr_queue.append(tmr)
            return 1
        head = self._insert_padding(size)
        ring.write_tmr(self._kview, ring.MAILBOX_SIZE + head, length=size,
                       tmr_type=tmr.tmr_type, cmd_ids=tmr.cmd_ids)
        self._slot_len_op[head] = ring.make_len_op(ring.Opcode.TMR, size)
        self._advance_head(head, size)
        self._notify()
        return 0

    def _run_tmr_queue(self) -> bool:
        if not self._tmr_queue:
            return True
        tmrs = list(self._tmr_queue)
        self._tmr_queue.clear()
        for i, tmr in enumerate(tmrs):
            if self._queue_tmr_ring(tmr):
                self._tmr_queue.extend(tmrs[i + 1:])
                return False
        return True

    def _run_qfull_queue(self, *, fail: bool) -> None:
        if not self._qfull:
            return
        cmds = list(self._qfull)
        self._qfull.clear()
        for i, cmd in enumerate(cmds):
            if fail:
                self._fail(cmd, ScsiStatus.BUSY, "device blocked while waiting for ring space")
                continue
            ret = self._queue_cmd_ring(cmd)
            if ret > 0:
                self._qfull.extend(cmds[i + 1:])
                break

    # --- tcmu_handle_completions ---------------------------------------------------------------

    def handle_completions(self) -> bool:
        """Reap the slots the handler gave back, exactly as the kernel does.

        Returns whether ring space was freed (the kernel then retries the qfull queue).
        """
        if self.broken:
            self._error("ring broken, not handling completions")
            return False
        csize = self.cmdr_size
        k32 = self._k32
        kview = self._kview
        tail = k32[ring.TAIL_WORD]
        if tail >= csize or tail & ring.OP_MASK:
            # The kernel would walk off into garbage (it reads cmd_tail without checking).
            self.violations.append(f"cmd_tail {tail} is not a slot of the {csize}-byte ring")
            self.broken = True
            return False
        free_space = False
        while self.last_cleaned != tail:
            pos = self.last_cleaned
            off = ring.MAILBOX_SIZE + pos
            len_op = k32[off >> 2]
            op = len_op & ring.OP_MASK
            length = len_op & ~ring.OP_MASK
            expected = self._slot_len_op.pop(pos, None)
            if expected is not None and expected != len_op:
                self.violations.append(
                    f"handler changed len_op of the slot at {pos} from {expected:#x} to "
                    f"{len_op:#x}")
            if length == 0 or length > csize - pos:
                self.violations.append(f"slot at {pos} has length {length}: ring walk lost")
                self.broken = True
                return False
            free_space = True
            if op in (_PAD, _TMR):
                self.last_cleaned = (pos + length) % csize
                continue
            if op != _CMD:
                self._error(f"WARN_ON: slot at {pos} has opcode {op}")
            rsp = ring.read_response(kview, off)
            keep_buf = bool(rsp.uflags & _KEEP_BUF)
            cmd = (self._commands.get(rsp.cmd_id) if keep_buf
                   else self._commands.pop(rsp.cmd_id, None))
            if cmd is None:
                self._error(f"cmd_id {rsp.cmd_id} not found, ring is broken")
                self.broken = True
                return False
            if not keep_buf:
                heapq.heappush(self._free_ids, rsp.cmd_id)
            if not self._handle_completion(cmd, rsp, keep_buf):
                break
            self.last_cleaned = (pos + length) % csize
        if free_space:
            free_space = self._run_tmr_queue()
        return free_space

    def _handle_completion(self, cmd: SimCommand, rsp: ring.Response, keep_buf: bool) -> bool:
        ok = True
        if cmd.expired:
            pass  # completed already by the time-out: only reclaim
        elif cmd.keep_buf_done:
            self._error(f"cmd_id {rsp.cmd_id} already completed with KEEP_BUF, ring is broken")
            self.broken = True
            ok = False
        else:
            self.reaped += 1
            cmd.raw_response = rsp
            cmd.uflags = rsp.uflags
            if rsp.uflags & _UNKNOWN_OP:
                self.messages.append(f"TCMU: Userspace set UNKNOWN_OP flag on cmd_id "
                                     f"{rsp.cmd_id}")
                cmd.unknown_op = True
                cmd.status = ScsiStatus.CHECK_CONDITION
            else:
                read_len = cmd.data_length
                read_len_valid = False
                if (cmd.direction is Direction.READ and rsp.uflags & _READ_LEN
                        and rsp.read_len):
                    read_len_valid = True
                    read_len = min(read_len, rsp.read_len)
                cmd.status = rsp.scsi_status
                gather = True
                if rsp.scsi_status == _CHECK_CONDITION:
                    cmd.sense = rsp.sense
                    gather = read_len_valid  # else: no data (SCF_TREAT_READ_AS_NORMAL only w/ it)
                if gather and cmd.direction is Direction.BIDI:
                    # gather_data_area copies se_cmd->data_length (the Data-Out length) bytes
                    # into the Data-In sg list, stopping when that list is exhausted.
                    self._gather(cmd, cmd._iovecs[len(cmd._iovecs) - cmd._iov_bidi_cnt:],
                                 min(read_len, cmd.bidi_in_length))
                elif gather and cmd.direction is Direction.READ:
                    self._gather(cmd, cmd._iovecs, read_len)
                if read_len_valid:
                    cmd.residual = cmd.data_length - read_len
            cmd.state = CommandState.COMPLETED
            self._ready.append(cmd)
        if not keep_buf:
            self._free_data(cmd)
        else:
            cmd.expired = False
            cmd.keep_buf_done = True
        return ok

    def _gather(self, cmd: SimCommand, iovecs: Sequence[tuple[int, int]], length: int) -> None:
        cmd.read_len = length
        if not cmd.gather:
            return
        parts: list[bytes] = []
        kview = self._kview
        for off, n in iovecs:
            if length <= 0:
                break
            take = min(n, length)
            parts.append(bytes(kview[off:off + take]))
            length -= take
        cmd.data_in = b"".join(parts)

    # --- helpers -------------------------------------------------------------------------------

    def _error(self, message: str) -> None:
        self.messages.append(message)
        self.errors.append(message)

    def _fail(self, cmd: SimCommand, status: int, reason: str) -> None:
        cmd.state = CommandState.FAILED
        cmd.status = status
        cmd.kernel_reason = reason
        self._ready.append(cmd)

    def _deliver(self) -> None:
        """Run the completion callbacks queued so far, outside any kernel-side loop."""
        if self._delivering:
            return
        self._delivering = True
        try:
            ready = self._ready
            while ready:
                cmd = ready.popleft()
                if cmd.on_complete is not None:
                    cmd.on_complete(cmd)
        finally:
            self._delivering = False

    def _protect_cmd(self, cmd: SimCommand, accessible: bool, *, force: bool = False) -> None:
        if not self.strict:
            return
        for off, length in cmd._iovecs:
            if length:
                self._protect(off, length, accessible, force=force)

    def _protect(self, off: int, length: int, accessible: bool, *, force: bool = False) -> None:
        """mprotect the handler's view of [off, off+length) (rounded out to pages)."""
        device = self._device
        if not force and (device is None or not device.mapped):
            return  # never touch an address range that may have been unmapped and reused
        start = off & ~(PAGE_SIZE - 1)
        end = ring.round_up(off + length, PAGE_SIZE)
        prot = mmap.PROT_READ | mmap.PROT_WRITE if accessible else 0
        if _mprotect(self._user_addr + start, end - start, prot) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mprotect of the simulated data area: {os.strerror(err)}")
