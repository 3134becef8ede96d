"""Test support for the tcmu_handler tests: a fake iSCSI target behind the CommandExecutor
contract, CDB builders, a random workload driver, and a minimal in-order ring handler used to
test the simulator independently of the dispatcher."""

from __future__ import annotations

import asyncio
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from initiator.command import Buffers, CommandHandle, CommandResult, CompletionCallback
from initiator.errors import ISCSIError, TaskAborted
from tcmu_handler import ring
from tcmu_handler.device import UioDevice
from tests.support.ring_simulator import CommandState, RingSimulator, SimCommand

# --- CDBs ------------------------------------------------------------------------------------
# The LBA field carries a per-command tag so the fake target knows which command it serves.


def read10(tag: int, blocks: int = 1) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, tag, 0, blocks & 0xFFFF, 0)


def write10(tag: int, blocks: int = 1) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, tag, 0, blocks & 0xFFFF, 0)


def read16(tag: int, blocks: int = 1) -> bytes:
    return struct.pack(">BBQIBB", 0x88, 0, tag, blocks, 0, 0)


def write16(tag: int, blocks: int = 1) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, 0, tag, blocks, 0, 0)


def xdwriteread10(tag: int, blocks: int = 1) -> bytes:
    return struct.pack(">BBIBHB", 0x53, 0, tag, 0, blocks & 0xFFFF, 0)


def tur(tag: int = 0) -> bytes:
    return bytes([0x00, 0, 0, 0, tag & 0xFF, 0])


def cdb_tag(cdb: bytes) -> int:
    if cdb[0] in (0x88, 0x8A):
        return int(struct.unpack_from(">Q", cdb, 2)[0])
    if cdb[0] == 0x00:
        return cdb[4]
    return int(struct.unpack_from(">I", cdb, 2)[0])


def pattern(tag: int, n: int) -> bytes:
    """Deterministic Data-In for a tag."""
    return random.Random(tag).randbytes(n)


def bidi_answer(data_out: bytes, n: int) -> bytes:
    """What the fake target returns for a bidirectional command."""
    out = bytes(b ^ 0xFF for b in data_out[:n])
    return out + bytes(n - len(out))


# --- the fake target -------------------------------------------------------------------------

Mode = Literal["now", "soon", "shuffle"]


@dataclass(eq=False)
class FakeHandle:
    itt: int
    tag: int


@dataclass(eq=False)
class Pending:
    handle: FakeHandle
    cdb: bytes
    data_out: Buffers | None
    data_in: Buffers | None
    on_done: CompletionCallback
    result: CommandResult | ISCSIError | None = None


@dataclass
class FakeTarget:
    """A CommandExecutor that plays an iSCSI target with an in-memory disk.

    READ fills Data-In with ``pattern(tag)``; WRITE records the payload in ``written``;
    XDWRITEREAD answers ``bidi_answer``. ``plan[tag]`` overrides the result (a CommandResult,
    an ISCSIError, or "hold" to keep the command until :meth:`release`). ``mode`` decides when
    ``on_done`` runs: inside submit ("now"), on the next loop iteration ("soon"), or at random
    later iterations in random order ("shuffle").
    """

    mode: Mode = "now"
    rng: random.Random = field(default_factory=lambda: random.Random(1))
    plan: dict[int, CommandResult | ISCSIError | str] = field(default_factory=dict)
    written: dict[int, bytes] = field(default_factory=dict)
    submitted: list[tuple[int, bytes]] = field(default_factory=list)
    held: dict[int, Pending] = field(default_factory=dict)
    aborted: list[int] = field(default_factory=list)
    resets: list[int] = field(default_factory=list)
    abort_error: ISCSIError | None = None
    kept_views: list[memoryview] = field(default_factory=list)
    keep_views: bool = False
    submit_error: BaseException | None = None
    _pending: list[Pending] = field(default_factory=list)
    _tick_scheduled: bool = False
    _itt: int = 0

    def submit(self, lun: int, cdb: bytes, *, data_out: Buffers | None,
               data_in: Buffers | None, on_done: CompletionCallback) -> FakeHandle:
        if self.submit_error is not None:
            raise self.submit_error
        self._itt += 1
        tag = cdb_tag(cdb)
        handle = FakeHandle(self._itt, tag)
        self.submitted.append((lun, cdb))
        if self.keep_views:
            self.kept_views.extend(data_out or ())
            self.kept_views.extend(data_in or ())
        p = Pending(handle, cdb, data_out, data_in, on_done)
        planned = self.plan.get(tag)
        if planned == "hold":
            self.held[tag] = p
            return handle
        if self.mode == "now":
            self._finish(p)
        else:
            self._pending.append(p)
            self._schedule()
        return handle

    def _schedule(self) -> None:
        if not self._tick_scheduled:
            self._tick_scheduled = True
            asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        self._tick_scheduled = False
        pending = self._pending
        if self.mode == "soon":
            self._pending = []
            batch = pending
        else:
            self.rng.shuffle(pending)
            k = self.rng.randint(0, len(pending)) if len(pending) > 1 else len(pending)
            batch, self._pending = pending[:k], pending[k:]
        for p in batch:
            self._finish(p)
        if self._pending:
            self._schedule()

    def _result(self, p: Pending) -> CommandResult | ISCSIError:
        if p.result is not None:
            return p.result
        planned = self.plan.get(p.handle.tag)
        if isinstance(planned, (CommandResult, ISCSIError)):
            if isinstance(planned, CommandResult) and p.data_in:
                self._fill(p, planned.data_in_length or None)
            return planned
        opcode = p.cdb[0]
        if opcode in (0x2A, 0x8A):
            assert p.data_out is not None and p.data_in is None
            self.written[p.handle.tag] = b"".join(bytes(v) for v in p.data_out)
        elif p.data_out is not None and p.data_in is not None:
            self.written[p.handle.tag] = b"".join(bytes(v) for v in p.data_out)
        if p.data_in:
            return CommandResult(status=0, data_in_length=self._fill(p, None))
        return CommandResult(status=0)

    def _fill(self, p: Pending, limit: int | None) -> int:
        assert p.data_in is not None
        total = sum(len(v) for v in p.data_in)
        n = total if limit is None else min(limit, total)
        if p.data_out is not None:
            data = bidi_answer(self.written[p.handle.tag], total)
        else:
            data = pattern(p.handle.tag, total)
        pos = 0
        for v in p.data_in:
            take = max(0, min(len(v), n - pos))
            v[:take] = data[pos:pos + take]
            pos += len(v)
        return n

    def _finish(self, p: Pending) -> None:
        result = self._result(p)
        on_done = p.on_done
        # The contract: drop every reference to the buffers before reporting completion.
        p.data_out = p.data_in = None
        on_done(result)

    def release(self, tag: int, result: CommandResult | ISCSIError | None = None) -> None:
        """Complete a held command (with its default result unless ``result`` is given)."""
        p = self.held.pop(tag)
        p.result = result
        self.plan.pop(tag, None)
        self._finish(p)

    async def abort_task(self, handle: CommandHandle) -> None:
        await asyncio.sleep(0)
        assert isinstance(handle, FakeHandle)
        self.aborted.append(handle.tag)
        if self.abort_error is not None:
            raise self.abort_error
        if handle.tag in self.held:
            self.release(handle.tag, TaskAborted(f"task {handle.itt} aborted"))

    async def lun_reset(self, lun: int) -> None:
        await asyncio.sleep(0)
        self.resets.append(lun)
        for tag in list(self.held):
            self.release(tag, TaskAborted("LUN reset"))


# --- a random workload -----------------------------------------------------------------------


@dataclass
class Workload:
    """Drive ``total`` random commands through ``sim`` keeping up to ``max_qd`` in flight, and
    verify every completion against ``target``."""

    sim: RingSimulator
    target: FakeTarget
    total: int
    max_qd: int
    rng: random.Random
    max_size: int = 256 * 1024
    kinds: tuple[str, ...] = ("read", "write", "read", "write", "bidi", "none")
    reclaim_every: int = 0
    failures: list[str] = field(default_factory=list)
    completed: int = 0
    submitted: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    _expect: dict[int, tuple[str, bytes | int]] = field(default_factory=dict)

    def start(self) -> None:
        for _ in range(min(self.max_qd, self.total)):
            self._submit_one()

    def _size(self) -> int:
        # Mostly small, sometimes large, sometimes not a multiple of anything.
        r = self.rng.random()
        if r < 0.5:
            return self.rng.randint(1, 16 * 1024)
        if r < 0.9:
            return self.rng.choice((4096, 8192, 65536, 131072))
        return self.rng.randint(1, self.max_size)

    def _submit_one(self) -> None:
        tag = self.submitted
        self.submitted += 1
        kind = self.rng.choice(self.kinds)
        sim = self.sim
        if kind == "read":
            n = self._size()
            self._expect[tag] = (kind, n)
            sim.submit(read10(tag), data_in=n, on_complete=self._check)
        elif kind == "write":
            payload = self.rng.randbytes(self._size())
            self._expect[tag] = (kind, payload)
            sim.submit(write16(tag), data_out=payload, on_complete=self._check)
        elif kind == "bidi":
            payload = self.rng.randbytes(self._size())
            self._expect[tag] = (kind, payload)
            sim.submit(xdwriteread10(tag), data_out=payload, data_in=len(payload),
                       on_complete=self._check)
        else:
            self._expect[tag] = (kind, 0)
            sim.submit(tur(tag & 0xFF) if tag < 256 else read10(tag), data_in=0,
                       on_complete=self._check)

    def _check(self, cmd: SimCommand) -> None:
        tag = cdb_tag(cmd.cdb)
        kind, exp = self._expect.pop(tag)
        if cmd.state is not CommandState.COMPLETED or cmd.status != 0:
            self.failures.append(f"tag {tag} ({kind}): {cmd} {cmd.kernel_reason}")
        elif kind == "read":
            assert isinstance(exp, int)
            if cmd.data_in != pattern(tag, exp):
                self.failures.append(f"tag {tag}: read data mismatch ({exp} bytes)")
        elif kind == "write":
            if self.target.written.get(tag) != exp:
                self.failures.append(f"tag {tag}: written data mismatch")
        elif kind == "bidi":
            assert isinstance(exp, bytes)
            if self.target.written.get(tag) != exp:
                self.failures.append(f"tag {tag}: bidi Data-Out mismatch")
            if cmd.data_in != bidi_answer(exp, len(exp)):
                self.failures.append(f"tag {tag}: bidi Data-In mismatch")
        self.completed += 1
        if self.reclaim_every and self.completed % self.reclaim_every == 0:
            self.sim.reclaim()
        if self.submitted < self.total:
            self._submit_one()
        elif self.completed == self.total:
            self.done.set()


# --- an independent, minimal handler for simulator tests -------------------------------------


class InOrderHandler:
    """The simplest correct handler: parse entries in order, complete in ring order.

    Written against the codec only, so simulator tests do not depend on the dispatcher.
    """

    def __init__(self, device: UioDevice) -> None:
        self.device = device
        self.view = device.view
        mb = device.mailbox()
        self.size = mb.cmdr_size
        self.data_start = mb.data_off
        self.consume = mb.cmd_tail
        self.tail = mb.cmd_tail

    def entries(self) -> list[tuple[int, ring.Entry]]:
        """Entries from the consume pointer to cmd_head: (ring offset, entry)."""
        out: list[tuple[int, ring.Entry]] = []
        head = ring.U32.unpack_from(self.view, ring.MB_CMD_HEAD)[0]
        while self.consume != head:
            off = ring.MAILBOX_SIZE + self.consume
            entry = ring.parse_entry(self.view, off, ring_room=self.size - self.consume,
                                     data_start=self.data_start, data_end=self.device.size)
            out.append((self.consume, entry))
            self.consume = (self.consume + entry.length) % self.size
        return out

    def complete(self, cmd_id: int, status: int = 0, *, uflags: int = 0, read_len: int = 0,
                 sense: bytes | None = None, notify: bool = True,
                 fill: Callable[[memoryview], None] | None = None) -> None:
        """Complete ``cmd_id`` in the first CMD slot at the tail (the OOOC slot rule)."""
        while True:
            op, length = ring.read_len_op(self.view, ring.MAILBOX_SIZE + self.tail)
            if op == ring.Opcode.CMD:
                break
            self.tail = (self.tail + length) % self.size
        off = ring.MAILBOX_SIZE + self.tail
        ring.write_response(self.view, off, cmd_id=cmd_id, scsi_status=status, uflags=uflags,
                            read_len=read_len, sense=sense)
        self.tail = (self.tail + length) % self.size
        self.publish(notify=notify)

    def release_trailing(self) -> None:
        """Move the tail over PAD/TMR slots up to the consume pointer (nothing outstanding)."""
        self.tail = self.consume
        self.publish()

    def publish(self, *, notify: bool = True) -> None:
        ring.U32.pack_into(self.view, ring.MB_CMD_TAIL, self.tail)
        if notify:
            self.device.notify()
