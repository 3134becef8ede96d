"""The TCMU shared-memory ring, byte for byte, and its slot rule: no mmap, fd or clock.

Theory of operation
-------------------
``target_core_user`` exports one uio map: a 128-byte mailbox, the command ring right after it
(``cmdr_off`` = 128, ``cmdr_size`` bytes) and the data area after the ring. The kernel appends
entries at ``cmd_head`` (mailbox offset 12); userspace hands slots back by moving ``cmd_tail``
(offset 64, on its own cache line) and writing 4 bytes to ``/dev/uioN``. Every entry starts with
an 8-byte header whose ``len_op`` carries the entry length (a multiple of 8) and, in its low 3
bits, the opcode: PAD (filler up to the end of the ring), CMD (a SCSI command) or TMR (a task
management notification). A CMD entry's request (iovec count, CDB offset, iovecs) and its
response (status, read length, sense) share one union, so the request must be copied out before
the response is written. All offsets here are those of
``include/uapi/linux/target_core_user.h``; ``tests/unit/test_ring.py`` checks them against the C
header with gcc.

Byte order: the kernel writes these fields as plain CPU integers (``struct tcmu_mailbox`` is a
C struct in vmalloc memory), so every :class:`struct.Struct` here uses ``=`` (native order,
standard sizes, no padding). ``memoryview.cast("I")`` on the map reads ``cmd_head`` as word 3
and writes ``cmd_tail`` as word 16 in one aligned 32-bit access, which ``struct.pack_into``
does not promise (it may store byte by byte).

The codec only parses and packs. The dispatcher (userspace side) and the simulator (kernel
side) both use it, so the two sides of the tests can never disagree on a layout.

The userspace half of the ring protocol lives here too, as :class:`CommandRing`: the consume
pointer, the out-of-order slot rule (a completion takes the first CMD slot at ``cmd_tail``;
slots are freed strictly in ring order) and the one store of ``cmd_tail`` per batch. Like the
codec it does no I/O: the dispatcher reads the uio fd and writes the 4-byte notification.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from typing import NamedTuple

from tcmu_handler.errors import MalformedEntry, RingError, TCMUError

# --- constants of target_core_user.h -----------------------------------------------------------

MAILBOX_VERSION = 2
"""``TCMU_MAILBOX_VERSION``. Version 1 (Linux < 4.6) had no ``flags`` capabilities."""

ALIGN_SIZE = 64
"""``ALIGN_SIZE``: ``cmd_tail`` sits on its own cache line."""

MAILBOX_SIZE = 128
"""``sizeof(struct tcmu_mailbox)`` = ``CMDR_OFF``, the ring's offset in the map."""

OP_MASK = 0x7
"""``TCMU_OP_MASK``: the opcode lives in the low bits of ``len_op``."""

OP_ALIGN_SIZE = 8
"""``TCMU_OP_ALIGN_SIZE`` = ``sizeof(__u64)``: every entry length is a multiple of 8."""

SENSE_BUFFERSIZE = 96
"""``TCMU_SENSE_BUFFERSIZE`` (= ``SCSI_SENSE_BUFFERSIZE``)."""

ENTRY_HDR_SIZE = 8
"""``sizeof(struct tcmu_cmd_entry_hdr)``."""

CMD_ENTRY_SIZE = 112
"""``sizeof(struct tcmu_cmd_entry)``: header + the larger union member (the response)."""

IOVEC_SIZE = 16
"""``sizeof(struct iovec)`` on a 64-bit kernel: ``iov_base`` then ``iov_len``."""

TMR_ENTRY_SIZE = 32
"""``sizeof(struct tcmu_tmr_entry)`` without its flexible ``cmd_ids[]``."""

# Mailbox field offsets.
MB_VERSION = 0
MB_FLAGS = 2
MB_CMDR_OFF = 4
MB_CMDR_SIZE = 8
MB_CMD_HEAD = 12
MB_CMD_TAIL = 64
HEAD_WORD = MB_CMD_HEAD // 4
"""Index of ``cmd_head`` in the map seen as 32-bit words."""
TAIL_WORD = MB_CMD_TAIL // 4
"""Index of ``cmd_tail`` in the map seen as 32-bit words."""

# Entry header offsets.
HDR_LEN_OP = 0
HDR_CMD_ID = 4
HDR_KFLAGS = 6
HDR_UFLAGS = 7

# struct tcmu_cmd_entry, request half of the union (req is not packed: cdb_off is 8-aligned).
REQ_IOV_CNT = 8
REQ_IOV_BIDI_CNT = 12
REQ_IOV_DIF_CNT = 16
REQ_CDB_OFF = 24
REQ_IOV = 48

# struct tcmu_cmd_entry, response half of the union.
RSP_SCSI_STATUS = 8
RSP_READ_LEN = 12
RSP_SENSE = 16

# struct tcmu_tmr_entry.
TMR_TYPE = 8
TMR_CMD_CNT = 12
TMR_CMD_IDS = 32


class MailboxFlag(enum.IntFlag):
    """``TCMU_MAILBOX_FLAG_CAP_*``: what the kernel offers in this mailbox."""

    OOOC = 1 << 0
    """Out-of-order completion: any finished command may take the slot at ``cmd_tail``."""
    READ_LEN = 1 << 1
    """``rsp.read_len`` with ``TCMU_UFLAG_READ_LEN`` is honoured (short reads, residuals)."""
    TMR = 1 << 2
    """TMR entries may appear (when ``attrib/tmr_notification`` is 1)."""
    KEEP_BUF = 1 << 3
    """``TCMU_UFLAG_KEEP_BUF`` keeps a command's data blocks after completion."""


class Opcode(enum.IntEnum):
    """``enum tcmu_opcode``."""

    PAD = 0
    CMD = 1
    TMR = 2


class UFlag(enum.IntFlag):
    """``TCMU_UFLAG_*``: flags userspace sets in ``hdr.uflags`` of a completed CMD slot."""

    UNKNOWN_OP = 0x1
    READ_LEN = 0x2
    KEEP_BUF = 0x4


class TmrType(enum.IntEnum):
    """``TCMU_TMR_*``: the task management function a TMR entry reports."""

    UNKNOWN = 0
    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LUN_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    LUN_RESET_PRO = 128
    """Pseudo reset: commands aborted by a PERSISTENT RESERVE OUT (PREEMPT AND ABORT)."""


# --- precompiled layouts ----------------------------------------------------------------------

MAILBOX = struct.Struct("=HHIII")
"""version, flags, cmdr_off, cmdr_size, cmd_head (offset 0)."""
U32 = struct.Struct("=I")
ENTRY_HDR = struct.Struct("=IHBB")
"""len_op, cmd_id, kflags, uflags."""
CMD_REQ = struct.Struct("=IHBBIII4xQ")
"""Header + iov_cnt, iov_bidi_cnt, iov_dif_cnt, (4 bytes hole), cdb_off: the first 32 bytes."""
CMD_RSP = struct.Struct("=HBBB3xI")
"""At entry offset 4: cmd_id, kflags, uflags, scsi_status, (3 pad bytes), read_len."""
TMR_HDR = struct.Struct("=IHBBB3xI")
"""Header + tmr_type, (3 pad bytes), cmd_cnt: the first 16 bytes of a TMR entry."""
IOVEC = struct.Struct("=QQ")
_CMD_ID = struct.Struct("=H")

assert MAILBOX.size == 16 and CMD_REQ.size == 32 and CMD_RSP.size == 12 and TMR_HDR.size == 16

_IOV_STRUCTS: dict[int, struct.Struct] = {}


def _iov_struct(count: int) -> struct.Struct:
    """A Struct reading ``count`` iovecs at once (cached: a ring uses a handful of counts)."""
    s = _IOV_STRUCTS.get(count)
    if s is None:
        s = _IOV_STRUCTS[count] = struct.Struct(f"={2 * count}Q")
    return s


# --- sizes (queue_cmd_ring / queue_tmr_ring) -----------------------------------------------------


def round_up(value: int, align: int) -> int:
    """``round_up()`` of the kernel for a power-of-two ``align``."""
    return (value + align - 1) & ~(align - 1)


def cmd_base_size(iov_cnt: int) -> int:
    """``tcmu_cmd_get_base_cmd_size``: room for the iovecs, never less than the response."""
    return max(REQ_IOV + IOVEC_SIZE * iov_cnt, CMD_ENTRY_SIZE)


def cmd_entry_size(iov_cnt: int, cdb_len: int) -> int:
    """``tcmu_cmd_get_cmd_size``: base size + the CDB rounded up to 8 bytes."""
    return cmd_base_size(iov_cnt) + round_up(cdb_len, OP_ALIGN_SIZE)


def tmr_entry_size(cmd_cnt: int) -> int:
    """Length of a TMR entry listing ``cmd_cnt`` command ids (``queue_tmr_ring``)."""
    return round_up(TMR_ENTRY_SIZE + 2 * cmd_cnt, OP_ALIGN_SIZE)


_CDB_GROUP_LEN = (6, 10, 10, 12, 16, 12, 10, 10)
"""``scsi_command_size_tbl``: CDB length by opcode group (opcode >> 5)."""
VARIABLE_LENGTH_CMD = 0x7F


def cdb_length(opcode: int, additional_length: int = 0) -> int:
    """``scsi_command_size()``: how many CDB bytes the kernel copied into the entry.

    ``additional_length`` is byte 7 of the CDB, used only for VARIABLE LENGTH (0x7F) CDBs.
    """
    if opcode == VARIABLE_LENGTH_CMD:
        return additional_length + 8
    return _CDB_GROUP_LEN[(opcode >> 5) & 7]


def make_len_op(op: Opcode, length: int) -> int:
    """``tcmu_hdr_set_op`` + ``tcmu_hdr_set_len``."""
    if length & OP_MASK:
        raise ValueError(f"entry length {length} is not a multiple of {OP_ALIGN_SIZE}")
    return length | int(op)


# --- mailbox ---------------------------------------------------------------------------------


class Mailbox(NamedTuple):
    """A snapshot of ``struct tcmu_mailbox``."""

    version: int
    flags: MailboxFlag
    cmdr_off: int
    cmdr_size: int
    cmd_head: int
    cmd_tail: int

    @classmethod
    def parse(cls, buf: memoryview | bytes | bytearray) -> Mailbox:
        """Read the mailbox at offset 0 of ``buf`` and check that it describes a TCMU ring."""
        if len(buf) < MAILBOX_SIZE:
            raise RingError(f"a TCMU map is at least {MAILBOX_SIZE} bytes, got {len(buf)}")
        version, flags, cmdr_off, cmdr_size, head = MAILBOX.unpack_from(buf, 0)
        (tail,) = U32.unpack_from(buf, MB_CMD_TAIL)
        if version not in (1, MAILBOX_VERSION):
            raise RingError(
                f"TCMU mailbox version {version} is not supported (expected {MAILBOX_VERSION}): "
                "is this map really a tcm-user device, and is the kernel's target_core_user "
                "newer than this handler?")
        if version == 1:
            flags = 0  # version 1 mailboxes predate the capability flags
        if cmdr_off != MAILBOX_SIZE or cmdr_size == 0 or cmdr_size & OP_MASK:
            raise RingError(
                f"TCMU mailbox describes an impossible ring (cmdr_off={cmdr_off}, "
                f"cmdr_size={cmdr_size})")
        if cmdr_off + cmdr_size > len(buf):
            raise RingError(
                f"TCMU ring ({cmdr_off}+{cmdr_size} bytes) does not fit in the {len(buf)}-byte "
                "map: map0/size and the mailbox disagree")
        return cls(version, MailboxFlag(flags), cmdr_off, cmdr_size, head, tail)

    @property
    def data_off(self) -> int:
        """Offset of the data area in the map (right after the ring)."""
        return self.cmdr_off + self.cmdr_size


def write_mailbox(buf: memoryview | bytearray, *, flags: MailboxFlag, cmdr_size: int,
                  version: int = MAILBOX_VERSION) -> None:
    """Initialise a mailbox as ``tcmu_configure_device`` does (kernel side; simulator use)."""
    MAILBOX.pack_into(buf, 0, version, int(flags), MAILBOX_SIZE, cmdr_size, 0)
    U32.pack_into(buf, MB_CMD_TAIL, 0)


# --- entries ---------------------------------------------------------------------------------


class PadEntry(NamedTuple):
    """A PAD entry: skip ``length`` bytes (it always runs to the end of the ring)."""

    length: int


class CmdEntry(NamedTuple):
    """A CMD entry's request, copied out of the ring.

    ``iovecs`` are ``(offset, length)`` pairs, offsets from the start of the map. For a
    bidirectional command (``iov_bidi_cnt`` > 0) the first ``iov_cnt`` iovecs are Data-Out and
    the next ``iov_bidi_cnt`` are Data-In; otherwise all of them carry the one data direction,
    which only the CDB tells (TCMU does not pass the direction).
    """

    cmd_id: int
    kflags: int
    uflags: int
    length: int
    iov_cnt: int
    iov_bidi_cnt: int
    iov_dif_cnt: int
    cdb_off: int
    iovecs: tuple[tuple[int, int], ...]
    cdb: bytes

    @property
    def is_bidi(self) -> bool:
        return self.iov_bidi_cnt > 0

    def bidi_split(self) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
        """(Data-Out iovecs, Data-In iovecs) of a bidirectional command."""
        n = self.iov_cnt
        return self.iovecs[:n], self.iovecs[n:n + self.iov_bidi_cnt]

    @property
    def data_length(self) -> int:
        """Total bytes described by the iovecs (both directions for BIDI)."""
        return sum(length for _, length in self.iovecs)


class TmrEntry(NamedTuple):
    """A TMR entry: ``tmr_type`` touched the listed commands (still to be completed by us)."""

    length: int
    tmr_type: int
    cmd_ids: tuple[int, ...]


Entry = PadEntry | CmdEntry | TmrEntry


def read_len_op(buf: memoryview | bytes | bytearray, off: int) -> tuple[int, int]:
    """``(opcode, length)`` of the entry at map offset ``off`` (reads only its 4-byte word)."""
    (len_op,) = U32.unpack_from(buf, off)
    return len_op & OP_MASK, len_op & ~OP_MASK


_CMD_REQ_IOV0 = struct.Struct("=IHBBIII4xQ16xQQ")
"""CMD_REQ plus the first iovec (bytes 0..64, always inside an entry of >= 112 bytes)."""
_CMD_ONE_IOV = struct.Struct("=IHBBIII4xQ16xQQ48x16s")
"""The common entry, one iovec and a CDB of up to 16 bytes where ``queue_cmd_ring`` puts it
(``cdb_off`` = entry + 112, the base size for one iovec): _CMD_REQ_IOV0 plus the 16 bytes at
offset 112, bytes 0..128 of an entry of at least 128 bytes."""
_ONE_IOV_CDB = cmd_base_size(1)
_ONE_IOV_MIN = _CMD_ONE_IOV.size
assert _ONE_IOV_CDB == 112 and _ONE_IOV_MIN == 128
_CDB_STRUCTS = {n: struct.Struct(f"{n}s") for n in (6, 10, 12, 16)}
_new_tuple = tuple.__new__  # builds a NamedTuple without its Python-level __new__


def _cdb_struct(n: int) -> struct.Struct:
    s = _CDB_STRUCTS.get(n)
    if s is None:
        s = _CDB_STRUCTS[n] = struct.Struct(f"{n}s")
    return s


def parse_cmd(buf: memoryview | bytes | bytearray, off: int, length: int, data_start: int,
              data_end: int) -> CmdEntry:
    """Copy out the CMD entry of ``length`` bytes at map offset ``off``.

    Every iovec must lie inside ``[data_start, data_end)`` and the CDB inside the entry:
    anything else is not something ``queue_cmd_ring`` writes and raises :class:`MalformedEntry`
    (with the cmd_id, so the slot can still be completed with ``UNKNOWN_OP``).

    This is the hot path of the dispatcher. The common entry (one iovec, the CDB right after
    the base size) is read by one unpack that covers the request, the iovec and the CDB; any
    other entry by one unpack of the request and the first iovec, then the other iovecs and
    the CDB, each with every check.
    """
    if length >= _ONE_IOV_MIN:
        (_len_op, cmd_id, kflags, uflags, iov_cnt, iov_bidi_cnt, iov_dif_cnt, cdb_off, base,
         ilen, cdb16) = _CMD_ONE_IOV.unpack_from(buf, off)
        # The same checks as below, for this layout: the iovec (and so the CDB, at 112..128)
        # fit in the entry, no DIF, the iovec inside the data area, a CDB of at most 16 bytes.
        if iov_cnt + iov_bidi_cnt == 1 and not iov_dif_cnt and cdb_off == off + _ONE_IOV_CDB \
                and data_start <= base and base + ilen <= data_end and \
                (opcode := cdb16[0]) != VARIABLE_LENGTH_CMD:
            return _new_tuple(CmdEntry, (cmd_id, kflags, uflags, length, iov_cnt, iov_bidi_cnt,
                                         0, cdb_off, ((base, ilen),),
                                         cdb16[:_CDB_GROUP_LEN[opcode >> 5]]))
    if length < CMD_ENTRY_SIZE:
        (_len_op, cmd_id) = struct.unpack_from("=IH", buf, off)
        raise MalformedEntry(f"CMD entry {cmd_id} is only {length} bytes long", cmd_id=cmd_id)
    (_len_op, cmd_id, kflags, uflags, iov_cnt, iov_bidi_cnt, iov_dif_cnt, cdb_off, base,
     ilen) = _CMD_REQ_IOV0.unpack_from(buf, off)
    count = iov_cnt + iov_bidi_cnt + iov_dif_cnt
    iov_end = off + REQ_IOV + IOVEC_SIZE * count
    end = off + length
    if iov_end > end:
        raise MalformedEntry(
            f"CMD entry {cmd_id}: {count} iovecs do not fit in its {length} bytes",
            cmd_id=cmd_id)
    if iov_dif_cnt:
        # target_core_user never queues protection iovecs (iov_dif_cnt is always 0); a DIF
        # buffer we cannot interpret must not be sent to the target as data.
        raise MalformedEntry(
            f"CMD entry {cmd_id}: {iov_dif_cnt} DIF/DIX protection iovecs are not supported",
            cmd_id=cmd_id)
    iovecs: tuple[tuple[int, int], ...]
    if count == 1:
        iovecs = ((base, ilen),)
        if base < data_start or base + ilen > data_end:
            raise MalformedEntry(
                f"CMD entry {cmd_id}: iovec {base:#x}+{ilen} lies outside the data area "
                f"[{data_start:#x}, {data_end:#x})", cmd_id=cmd_id)
    elif count:
        vals = _iov_struct(count).unpack_from(buf, off + REQ_IOV)
        iovecs = tuple(zip(vals[0::2], vals[1::2], strict=True))
        for base, ilen in iovecs:
            if base < data_start or base + ilen > data_end:
                raise MalformedEntry(
                    f"CMD entry {cmd_id}: iovec {base:#x}+{ilen} lies outside the data area "
                    f"[{data_start:#x}, {data_end:#x})", cmd_id=cmd_id)
    else:
        iovecs = ()
    # cdb_off is an absolute map offset (queue_cmd_ring: CMDR_OFF + cmd_head + base size).
    if not iov_end <= cdb_off < end:
        raise MalformedEntry(
            f"CMD entry {cmd_id}: CDB offset {cdb_off:#x} lies outside the entry "
            f"[{off:#x}, {end:#x})", cmd_id=cmd_id)
    opcode = buf[cdb_off]
    if opcode == VARIABLE_LENGTH_CMD:
        if cdb_off + 8 > end:
            raise MalformedEntry(f"CMD entry {cmd_id}: truncated variable-length CDB",
                                 cmd_id=cmd_id)
        clen = buf[cdb_off + 7] + 8
    else:
        clen = _CDB_GROUP_LEN[opcode >> 5]
    if cdb_off + clen > end:
        raise MalformedEntry(
            f"CMD entry {cmd_id}: {clen}-byte CDB (opcode {opcode:#04x}) runs past the entry",
            cmd_id=cmd_id)
    (cdb,) = (_CDB_STRUCTS.get(clen) or _cdb_struct(clen)).unpack_from(buf, cdb_off)
    return _new_tuple(CmdEntry, (cmd_id, kflags, uflags, length, iov_cnt, iov_bidi_cnt,
                                 iov_dif_cnt, cdb_off, iovecs, cdb))


def parse_tmr(buf: memoryview | bytes | bytearray, off: int, length: int) -> TmrEntry:
    """Copy out the TMR entry of ``length`` bytes at map offset ``off``."""
    if length < TMR_ENTRY_SIZE:
        raise RingError(f"TMR entry at {off:#x} is {length} bytes, shorter than its header")
    _len_op, _cmd_id, _kflags, _uflags, tmr_type, cmd_cnt = TMR_HDR.unpack_from(buf, off)
    if TMR_CMD_IDS + 2 * cmd_cnt > length:
        raise RingError(
            f"TMR entry at {off:#x} lists {cmd_cnt} commands but is only {length} bytes long")
    ids = struct.unpack_from(f"={cmd_cnt}H", buf, off + TMR_CMD_IDS) if cmd_cnt else ()
    return TmrEntry(length, tmr_type, ids)


def parse_entry(buf: memoryview | bytes | bytearray, off: int, *, ring_room: int,
                data_start: int, data_end: int) -> Entry:
    """Parse whichever entry starts at map offset ``off``.

    ``ring_room`` is the number of bytes from ``off`` to the end of the ring: entries never
    wrap (``ring_insert_padding``), so a longer one means the ring is corrupt.
    """
    op, length = read_len_op(buf, off)
    if length < ENTRY_HDR_SIZE or length > ring_room:
        raise RingError(
            f"entry at {off:#x} claims {length} bytes with {ring_room} left in the ring")
    if op == Opcode.PAD:
        return PadEntry(length)
    if op == Opcode.CMD:
        return parse_cmd(buf, off, length, data_start, data_end)
    if op == Opcode.TMR:
        return parse_tmr(buf, off, length)
    raise RingError(f"entry at {off:#x} has unknown opcode {op}")


# --- writers -----------------------------------------------------------------------------------


def write_pad(buf: memoryview | bytearray, off: int, length: int) -> None:
    """Write a PAD header (``ring_insert_padding``; kernel side)."""
    ENTRY_HDR.pack_into(buf, off, make_len_op(Opcode.PAD, length), 0, 0, 0)


def write_cmd(buf: memoryview | bytearray, off: int, *, cmd_id: int, length: int,
              iovecs: Sequence[tuple[int, int]], iov_bidi_cnt: int, cdb_off: int,
              cdb: bytes) -> None:
    """Write a CMD entry as ``queue_cmd_ring`` does (kernel side; simulator use).

    The entry is zeroed first (``memset(entry, 0, command_size)``); ``cdb_off`` is absolute.
    """
    buf[off:off + length] = bytes(length)
    n = len(iovecs)
    CMD_REQ.pack_into(buf, off, make_len_op(Opcode.CMD, length), cmd_id, 0, 0,
                      n - iov_bidi_cnt, iov_bidi_cnt, 0, cdb_off)
    if n:
        flat = [v for pair in iovecs for v in pair]
        _iov_struct(n).pack_into(buf, off + REQ_IOV, *flat)
    buf[cdb_off:cdb_off + len(cdb)] = cdb


def write_tmr(buf: memoryview | bytearray, off: int, *, length: int, tmr_type: int,
              cmd_ids: Sequence[int]) -> None:
    """Write a TMR entry as ``queue_tmr_ring`` does (kernel side; simulator use)."""
    buf[off:off + length] = bytes(length)
    TMR_HDR.pack_into(buf, off, make_len_op(Opcode.TMR, length), 0, 0, 0, tmr_type,
                      len(cmd_ids))
    if cmd_ids:
        struct.pack_into(f"={len(cmd_ids)}H", buf, off + TMR_CMD_IDS, *cmd_ids)


_ZERO_SENSE = bytes(SENSE_BUFFERSIZE)


def write_response(buf: memoryview | bytearray, off: int, *, cmd_id: int, scsi_status: int,
                   uflags: int = 0, read_len: int = 0, sense: bytes | None = None) -> None:
    """Complete the CMD slot at map offset ``off`` (userspace side).

    Writes ``cmd_id`` (which may differ from the slot's own command under out-of-order
    completion), ``uflags``, ``scsi_status`` and ``read_len``. ``sense`` is written only when
    given, zero-padded to 96 bytes, because ``tcmu_handle_completion`` reads it only for CHECK
    CONDITION. ``len_op`` is never touched: the kernel walks the ring by it.
    """
    CMD_RSP.pack_into(buf, off + HDR_CMD_ID, cmd_id, 0, uflags, scsi_status, read_len)
    if sense is not None:
        s = sense[:SENSE_BUFFERSIZE]
        start = off + RSP_SENSE
        buf[start:start + len(s)] = s
        if len(s) < SENSE_BUFFERSIZE:
            buf[start + len(s):start + SENSE_BUFFERSIZE] = _ZERO_SENSE[len(s):]


class Response(NamedTuple):
    """What ``tcmu_handle_completions`` reads back from a completed CMD slot."""

    cmd_id: int
    uflags: int
    scsi_status: int
    read_len: int
    sense: bytes


def read_response(buf: memoryview | bytes | bytearray, off: int) -> Response:
    """Read a completed CMD slot (kernel side; simulator use)."""
    cmd_id, _kflags, uflags, status, read_len = CMD_RSP.unpack_from(buf, off + HDR_CMD_ID)
    start = off + RSP_SENSE
    return Response(cmd_id, uflags, status, read_len, bytes(buf[start:start + SENSE_BUFFERSIZE]))


# --- the userspace side: consuming entries, releasing slots ------------------------------------

_LEN_MASK = ~OP_MASK
_NO_LIMIT = -1
_OP_PAD = int(Opcode.PAD)
_OP_CMD = int(Opcode.CMD)
_OP_TMR = int(Opcode.TMR)


class SkippedEntry(NamedTuple):
    """An entry :meth:`CommandRing.next_command` passed over that its caller should hear of:
    an unknown opcode, or a TMR entry that cannot be parsed. Its slot needs no completion."""

    offset: int
    """Ring offset of the entry."""
    opcode: int
    reason: str


class CommandRing:
    """The userspace side of one command ring: which entries are consumed, how many CMD slots
    are outstanding, where ``cmd_tail`` goes. No I/O: it reads and writes the memory of the map
    it is given as a ``memoryview``, never the uio fd, and knows no clock.

    The shape is libtcmu's: :meth:`start` (``tcmulib_processing_start`` without the event
    read), :meth:`next_command` (``tcmulib_get_next_command``), :meth:`complete`
    (``tcmulib_command_complete``) and :meth:`done` (``tcmulib_processing_complete`` without
    the 4-byte write, which the caller does when :meth:`done` returns True)::

        slots.start()
        while (entry := slots.next_command()) is not None:
            ...                                   # serve it; later, in any order:
        slots.complete(cmd_id, status, ...)
        if slots.done():
            device.notify()

    :meth:`take` is :meth:`next_command` for a whole batch, in one pass (the dispatcher's).

    The slot rule (``tcmu_handle_completions`` with ``CAP_OOOC``): slots are freed strictly in
    ring order, whatever order commands finish in. A private *consume* pointer walks from
    ``cmd_tail`` to ``cmd_head``; each completion takes the *first CMD slot at the tail*,
    skipping PAD and TMR slots there: the finished command's cmd_id and response go into that
    slot, whichever command it was queued for, and the tail moves past it. The kernel reads
    the cmd_id back from the slot, so which slot a command was queued in does not matter, and
    a cmd_id may come back on the ring as soon as its completion was reaped. ``len_op`` is
    never touched (the kernel walks the ring by it). Invariant: the CMD slots between the tail
    and *consume* are exactly as many as the outstanding commands, so that first CMD slot
    always exists; when nothing is outstanding the tail jumps to *consume*, so trailing PAD
    and TMR slots are released too.

    The tail is private until :meth:`done` stores it in the mailbox: one aligned 32-bit write
    per batch, after every response field of the batch (x86 is TSO: the kernel, reaping on the
    4-byte write that follows, sees the responses before the new tail).

    Kernels without ``CAP_OOOC`` get :class:`InOrderCommandRing`; :meth:`over` picks the class
    the mailbox asks for. Before the map is closed, :meth:`release` drops the ring's own view.
    """

    __slots__ = ("_buf", "_consume", "_data_end", "_data_start", "_head", "_name",
                 "_outstanding", "_pads", "_published", "_size", "_tail", "_words", "_wraps")

    def __init__(self, view: memoryview, *, name: str = "TCMU ring") -> None:
        mailbox = Mailbox.parse(view)
        size = mailbox.cmdr_size
        tail = mailbox.cmd_tail
        if tail >= size or tail & OP_MASK:
            raise RingError(f"{name}: cmd_tail {tail} is not a slot of the {size}-byte ring; "
                            "take the device over to reset it")
        self._name = name
        self._buf = view
        # 32-bit words: cmd_head and cmd_tail are read and written in one aligned access.
        self._words = view.cast("I")
        self._size = size
        self._data_start = mailbox.data_off
        self._data_end = len(view)
        # A previous handler's commands between cmd_tail and cmd_head (no takeover) are served
        # again from cmd_tail: their request slots are intact, because a slot is only ever
        # overwritten at the tail, just before the tail moves past it.
        self._tail = tail
        self._published = tail
        self._consume = tail
        self._head = tail
        self._outstanding = 0
        self._wraps = 0
        self._pads = 0

    @classmethod
    def over(cls, view: memoryview, *, name: str = "TCMU ring") -> CommandRing:
        """The ring for the map ``view``: out-of-order completion when the kernel offers
        ``CAP_OOOC``, ring order otherwise."""
        if Mailbox.parse(view).flags & MailboxFlag.OOOC:
            return CommandRing(view, name=name)
        return InOrderCommandRing(view, name=name)

    # --- state, for statistics and tests ------------------------------------------------------

    @property
    def outstanding(self) -> int:
        """CMD slots consumed and not yet answered."""
        return self._outstanding

    @property
    def consume(self) -> int:
        """Ring offset of the next entry :meth:`next_command` looks at."""
        return self._consume

    @property
    def tail(self) -> int:
        """The private ``cmd_tail`` (published by :meth:`done`)."""
        return self._tail

    @property
    def wraps(self) -> int:
        """Times *consume* went past the end of the ring back to offset 0."""
        return self._wraps

    @property
    def pads(self) -> int:
        """PAD entries skipped (the kernel's filler before a wrap)."""
        return self._pads

    # --- the four steps ---------------------------------------------------------------------

    def start(self) -> bool:
        """Snapshot ``cmd_head`` for the :meth:`next_command` calls that follow; True when
        there are entries to consume."""
        head = self._words[HEAD_WORD]
        if head >= self._size or head & OP_MASK:
            raise RingError(f"{self._name}: cmd_head {head} is not a slot of the "
                            f"{self._size}-byte ring")
        self._head = head
        return head != self._consume

    def next_command(self) -> CmdEntry | TmrEntry | SkippedEntry | None:
        """Consume entries up to the ``cmd_head`` of :meth:`start`; return the next CMD or TMR
        entry (or one passed over, :class:`SkippedEntry`), None at the head.

        A CMD entry is outstanding from here on. One that cannot be served raises
        :class:`MalformedEntry` and is outstanding all the same: complete it (with
        ``UNKNOWN_OP``). :class:`RingError` means the ring was rewritten underneath us.
        """
        entries = self.take(1)
        if not entries:
            return None
        entry = entries[0]
        if isinstance(entry, MalformedEntry):
            raise entry
        return entry

    def take(self, limit: int = _NO_LIMIT) -> list[CmdEntry | TmrEntry | SkippedEntry |
                                                    MalformedEntry]:
        """Consume the entries up to the ``cmd_head`` of :meth:`start` (or until ``limit`` are
        taken) and return them in ring order: what :meth:`next_command` returns one at a
        time, in one pass, with the :class:`MalformedEntry` of a CMD entry that cannot be
        served in its place (it is outstanding all the same). Empty at the head.

        Every CMD entry taken is outstanding when this returns: the commands may complete in
        any order while the caller serves the rest. :class:`RingError` means the ring was
        rewritten underneath us; when entries come before the bad one, they are returned and
        the next call raises it (the consume pointer stays at the bad entry).
        """
        out: list[CmdEntry | TmrEntry | SkippedEntry | MalformedEntry] = []
        words = self._words
        consume = self._consume
        head = self._head
        size = self._size
        buf = self._buf
        data_start = self._data_start
        data_end = self._data_end
        taken = 0
        while consume != head:
            off = MAILBOX_SIZE + consume
            len_op = words[off >> 2]
            length = len_op & _LEN_MASK
            if length < ENTRY_HDR_SIZE or length > size - consume:
                if out:
                    break  # serve these first; the next call finds the bad entry again
                self._consume = consume
                raise RingError(f"{self._name}: entry at ring offset {consume} claims {length} "
                                "bytes; the ring was rewritten underneath us")
            consume += length
            if consume == size:
                consume = 0
                self._wraps += 1
            op = len_op & OP_MASK
            if op == _OP_CMD:
                taken += 1
                try:
                    out.append(parse_cmd(buf, off, length, data_start, data_end))
                except MalformedEntry as exc:
                    out.append(exc)
            elif op == _OP_TMR:
                try:
                    out.append(parse_tmr(buf, off, length))
                except RingError as exc:
                    out.append(SkippedEntry(off - MAILBOX_SIZE, op, str(exc)))
            elif op != _OP_PAD:
                out.append(SkippedEntry(off - MAILBOX_SIZE, op, f"unknown opcode {op}"))
            else:
                self._pads += 1
            if len(out) == limit:
                break
        else:
            if not (self._outstanding + taken) and self._tail != consume:
                self._tail = consume  # nothing outstanding: release trailing PAD/TMR slots
        # Advanced before returning: a command completed before the next call must find its
        # slot between the tail and consume.
        self._consume = consume
        self._outstanding += taken
        return out

    def complete(self, cmd_id: int, status: int = 0, uflags: int = 0, read_len: int = 0,
                 sense: bytes | None = None) -> None:
        """Answer one outstanding command: write ``cmd_id`` and its response into the first
        CMD slot at the tail and move the tail past it (see the class docstring).

        ``sense`` is written only when given (the kernel reads it for CHECK CONDITION only).
        """
        outstanding = self._outstanding - 1
        if outstanding < 0:
            raise TCMUError(f"{self._name}: cmd_id {cmd_id} completed with no command "
                            "outstanding")
        self._outstanding = outstanding
        off = MAILBOX_SIZE + self._tail
        len_op = self._words[off >> 2]
        if len_op & OP_MASK != _OP_CMD:
            off, len_op = self._first_cmd_slot(cmd_id)
        if sense is None:
            CMD_RSP.pack_into(self._buf, off + HDR_CMD_ID, cmd_id, 0, uflags, status, read_len)
        else:
            write_response(self._buf, off, cmd_id=cmd_id, scsi_status=status, uflags=uflags,
                           read_len=read_len, sense=sense)
        if outstanding:
            tail = off - MAILBOX_SIZE + (len_op & _LEN_MASK)
            self._tail = 0 if tail >= self._size else tail
        else:
            self._tail = self._consume  # nothing outstanding: release trailing PAD/TMR slots

    def _first_cmd_slot(self, cmd_id: int) -> tuple[int, int]:
        """The map offset and ``len_op`` of the first CMD slot at the tail, past PAD and TMR
        slots (the tail itself does not move)."""
        words = self._words
        size = self._size
        tail = self._tail
        while True:
            off = MAILBOX_SIZE + tail
            len_op = words[off >> 2]
            if len_op & OP_MASK == _OP_CMD:
                return off, len_op
            length = len_op & _LEN_MASK
            tail += length
            if tail >= size:
                tail = 0
            if tail == self._consume or length == 0:
                raise RingError(f"{self._name}: no CMD slot left between cmd_tail and the "
                                f"last consumed entry for cmd_id {cmd_id}")

    def done(self) -> bool:
        """Publish the tail in the mailbox (one aligned 32-bit store, after the responses);
        True when it moved, i.e. the kernel must be told to reap (the 4-byte write)."""
        tail = self._tail
        # The tail cannot come round to the published value again between two calls: the
        # kernel never queues past the published tail, so consume stays less than a ring ahead.
        if tail == self._published:
            return False
        self._words[TAIL_WORD] = tail
        self._published = tail
        return True

    def release(self) -> None:
        """Drop the ring's own view of the map (before the map is closed); the ring cannot be
        used afterwards."""
        self._words.release()


class InOrderCommandRing(CommandRing):
    """:class:`CommandRing` for kernels without ``CAP_OOOC``: responses are written strictly in
    ring order. A command completed early is held until every command queued before it is
    complete; the ring itself says which is next (the cmd_id in the first CMD slot at the tail,
    not yet overwritten by a response)."""

    __slots__ = ("_held",)

    def __init__(self, view: memoryview, *, name: str = "TCMU ring") -> None:
        super().__init__(view, name=name)
        self._held: dict[int, tuple[int, int, int, bytes | None]] = {}

    @property
    def held(self) -> int:
        """Commands completed and waiting for one queued before them."""
        return len(self._held)

    def complete(self, cmd_id: int, status: int = 0, uflags: int = 0, read_len: int = 0,
                 sense: bytes | None = None) -> None:
        held = self._held
        if cmd_id in held or len(held) >= self._outstanding:
            raise TCMUError(f"{self._name}: cmd_id {cmd_id} is not outstanding")
        held[cmd_id] = (status, uflags, read_len, sense)
        buf = self._buf
        while self._outstanding:
            off, _len_op = self._first_cmd_slot(cmd_id)
            (next_id,) = _CMD_ID.unpack_from(buf, off + HDR_CMD_ID)
            response = held.pop(next_id, None)
            if response is None:
                if len(held) == self._outstanding:
                    raise RingError(f"{self._name}: the first CMD slot at cmd_tail holds "
                                    f"cmd_id {next_id}, which no outstanding command has; the "
                                    "ring was rewritten underneath us")
                return
            super().complete(next_id, *response)
