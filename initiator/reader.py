"""Incremental PDU decoding, and the Data-In receive path into the caller's buffers.

Theory of operation
-------------------
:class:`PDUReader` is sans-I/O: it exposes the ``get_buffer`` / ``buffer_updated`` pair of
``asyncio.BufferedProtocol`` (and, for ``socket.recvmsg_into``, :meth:`PDUReader.
direct_buffers` / :meth:`PDUReader.direct_updated`), parses what arrived and returns the PDUs,
in wire order. Headers and control PDUs are received into the reader's own buffer.

A Data-In's payload can instead go straight into the buffers of the command it belongs to. The
reader's :class:`DataSink` (the connection core) names them from the header's fields, and the
payload takes one of three routes:

- **inline copy**: the whole PDU is already in the reader's buffer (small reads, several PDUs
  per read): the payload is copied into the sink's views;
- **direct receive**: the payload is still to come: the sink's views become the receive
  buffers, so the payload is never copied (large reads). A read past the header would take
  the next payload into the reader's buffer, so after a large payload the reader reads only up
  to the next header ("stream mode": see :meth:`PDUReader.get_buffer`);
- **generic**: everything else, including a Data-In whose sink declines it (an unknown task,
  data outside the command's buffer), becomes a PDU object with its payload in ``data``, for
  the code that handles it to check and report.

On the first two routes the sink then processes the Data-In from its header's fields
(:meth:`DataSink.data_in_placed`), with no PDU object; if it declines, the reader hands over a
:class:`~initiator.pdu.DataIn` with ``placed`` set instead. Either way the data digest has
been checked first (before the copy on the inline route; once the payload has landed on the
direct route, where the command's buffer holds bad bytes until the connection fails).

Order: a PDU processed by the sink must not overtake a PDU the reader has parsed and not yet
returned (a SCSI Response that completes a command, then a Data-In for it in the same read,
would otherwise write into a buffer its owner has been given back). So a batch that returns
PDUs stops before the next Data-In for the sink, with :attr:`PDUReader.held` set: the caller
processes the PDUs, then calls :meth:`PDUReader.parse_buffered`.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from typing import Protocol

from initiator import digest as _digest
from initiator.errors import LocalProtocolError, PDUFormatError
from initiator.pdu import (
    BHS_LEN,
    DIGEST_LEN,
    PDU,
    PDU_CLASSES,
    Buffer,
    DataIn,
    Opcode,
    _parse_ahs,
    decode_bhs,
    pad_len,
)


class DataSink(Protocol):
    """Where Data-In payloads go, and what processes a Data-In once its payload has landed.

    Both methods take the fields of the Data-In's header as ints (RFC 7143 §11.7): ``flags`` is
    byte 1 (F, A, O, U, S bits), ``residual`` the Residual Count as sent. The reader calls them
    on the per-command path of reads, so they take no PDU object.
    """

    def data_in_buffers(self, itt: int, offset: int, length: int) -> Sequence[memoryview] | None:
        """The views that together take the ``length`` payload bytes at ``offset`` of task
        ``itt``'s data, or None to decline (the reader then hands over a DataIn with the payload
        in ``data``, and whoever processes it reports what is wrong). Views that are not flat
        byte views are cast; a read-only or non-contiguous view, or views of another total
        length, are a :class:`~initiator.errors.LocalProtocolError`."""
        ...

    def data_in_placed(self, flags: int, status: int, itt: int, offset: int, stat_sn: int,
                       exp_cmd_sn: int, max_cmd_sn: int, data_sn: int, residual: int,
                       length: int) -> bool:
        """The ``length`` payload bytes are in the views :meth:`data_in_buffers` named (and
        passed the data digest): process the rest of the Data-In. False declines: the reader
        then hands over a DataIn with ``placed`` = ``length`` instead."""
        ...


def _landing(views: Sequence[memoryview], length: int) -> list[memoryview]:
    """``views`` as non-empty flat writable byte views taking exactly ``length`` bytes.

    A cast view still exports the caller's memory: nothing is copied. (The common case, one
    such view already, is tested in PDUReader._parse without calling this.)
    """
    out: list[memoryview] = []
    total = 0
    for view in views:
        if view.readonly or not view.c_contiguous:
            raise LocalProtocolError(
                "DataSink returned a read-only or non-contiguous view; Data-In cannot land in it"
            )
        flat = view if view.format == "B" and view.ndim == 1 else view.cast("B")
        if len(flat):
            out.append(flat)
            total += len(flat)
    if total != length:
        raise LocalProtocolError(
            f"DataSink returned buffers of {total} bytes for a {length}-byte Data-In payload")
    return out


def _copy(payload: memoryview, views: list[memoryview]) -> None:
    """Copy ``payload`` into ``views`` (flat byte views that take exactly its bytes)."""
    pos = 0
    for view in views:
        n = len(view)
        view[:] = payload[pos : pos + n]
        pos += n


_OP_DATA_IN = int(Opcode.DATA_IN)
# The fields of a Data-In BHS (RFC 7143 §11.7) that the routes use: flags, status, the
# TotalAHSLength/DataSegmentLength word, ITT, StatSN, ExpCmdSN, MaxCmdSN, DataSN, Buffer
# Offset, Residual Count.
_DATA_IN_FIELDS = struct.Struct(">xBxBI8xI4xIIIIII").unpack_from
_Fields = tuple[int, int, int, int, int, int, int, int, int]
"""A Data-In header's fields for DataSink.data_in_placed(), less the length."""
_NO_FIELDS: _Fields = (0, 0, 0, 0, 0, 0, 0, 0, 0)


class _State(enum.Enum):
    HEADER = 1
    DIRECT = 2
    TRAILER = 3


_HEADER, _DIRECT, _TRAILER = _State.HEADER, _State.DIRECT, _State.TRAILER  # for _parse's loop


class PDUReader:
    """Incremental PDU decoder with the ``asyncio.BufferedProtocol`` buffer interface.

    See the module docstring for the routes a Data-In's payload takes. ``max_data_segment_
    length`` is the MaxRecvDataSegmentLength we declared; a larger segment is a protocol error,
    which also bounds the memory a hostile peer can make us allocate.

    ``one_at_a_time`` (the Login Phase) parses at most one PDU per call and leaves the bytes
    after it unparsed, for :meth:`parse_buffered` to take later: the PDUs that follow the final
    Login Response belong to the Full Feature Phase, whose digests and segment limit apply to
    them (RFC 7143 §13.12). A target may send them in the same TCP segment.
    """

    # Below this many outstanding payload bytes a direct receive is not worth a syscall.
    DIRECT_THRESHOLD = 2048
    # A Data-In payload at least this large puts the reader in stream mode (see get_buffer
    # and direct_buffers): copying it costs more than the read that receiving it in place
    # takes, even for a caller that has to make one read per PDU.
    LARGE_PAYLOAD = 32 * 1024
    # At most this many of a payload's views go into one direct_buffers() list, so that it
    # stays under IOV_MAX (1024) for socket.recvmsg_into with room for the next header.
    MAX_DIRECT_VIEWS = 512

    def __init__(
        self,
        *,
        header_digest: bool = False,
        data_digest: bool = False,
        max_data_segment_length: int = 8192,
        sink: DataSink | None = None,
        buffer_size: int = 256 * 1024,
        one_at_a_time: bool = False,
    ) -> None:
        self.header_digest = header_digest
        self.one_at_a_time = one_at_a_time
        self.data_digest = data_digest
        self.max_data_segment_length = max_data_segment_length
        self.sink = sink
        """Where Data-In payloads go (see :class:`DataSink`); None to keep them in PDUs."""
        self.held = False
        """The last call stopped before a Data-In for the sink, so that the PDUs it returned
        are processed first: call :meth:`parse_buffered` once they are."""
        self._buf = bytearray(max(buffer_size, BHS_LEN + 2 * DIGEST_LEN))
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._state = _State.HEADER
        self._direct_out = False
        # Stream mode: the Data-In being received (or the last one) has a large payload.
        self._large = False
        # The Data-In whose payload is being received (direct route): its header's fields
        # for the sink's data_in_placed(), its BHS (a DataIn is made of it only if the sink
        # declines), the views the payload goes to and how far it has come.
        self._fields = _NO_FIELDS
        self._bhs = bytearray()
        self._dest: Sequence[memoryview] = ()
        self._dest_index = 0
        self._dest_pos = 0
        self._remaining = 0
        self._trailer = 0
        self._dsl = 0

    # -- the BufferedProtocol pair ---------------------------------------------------------

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A writable view for the next bytes from the wire."""
        self._direct_out = (self._state is _State.DIRECT and self._start == self._end
                            and self._remaining >= self.DIRECT_THRESHOLD)
        if self._direct_out:
            view = self._dest[self._dest_index]
            return view[self._dest_pos : self._dest_pos + self._remaining]
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):
            self._compact()
        if self._large:
            # Stream mode: the next PDU is most likely another large Data-In, and a read
            # past its header would take its payload into this buffer, to be copied. So the
            # read ends where the next header does (after this payload's small rest, if
            # any); the payload that follows is then received in place.
            state = self._state
            want = BHS_LEN + (DIGEST_LEN if self.header_digest else 0) + self._start \
                - self._end
            if state is not _HEADER:
                want += self._trailer + (self._remaining if state is _DIRECT else 0)
            if want > 0:
                self._ensure_capacity(self._end - self._start + want)
                return self._view[self._end : self._end + want]
        if self._end == len(self._buf):
            self._ensure_capacity(len(self._buf) + 4096)
        return self._view[self._end :]

    def direct_buffers(self) -> list[memoryview] | None:
        """Receive buffers for ``socket.recvmsg_into`` while a large Data-In payload is due.

        None unless the reader is in stream mode (receiving a Data-In of at least
        ``LARGE_PAYLOAD`` bytes into the caller's views) with some of that payload to come.
        Else: the rest of that payload's views, then room in the reader's own buffer for
        exactly the payload's trailer and the next PDU's header, so that one read finishes
        this PDU and parses the next header without copying any payload. Follow with
        :meth:`direct_updated`; a read that fails needs no undoing.
        """
        # In DIRECT state nothing is buffered: _copy_to_dest() took it all.
        if self._state is not _DIRECT or not self._large:
            return None
        self._start = self._end = 0
        index, dest = self._dest_index, self._dest
        rest = dest[index][self._dest_pos :] if self._dest_pos else dest[index]
        room = self._view[: self._trailer + BHS_LEN + (DIGEST_LEN if self.header_digest else 0)]
        if len(dest) == 1:
            return [rest, room]  # the common case: one view
        last = index + self.MAX_DIRECT_VIEWS
        bufs = [rest, *dest[index + 1 : last]]
        if last >= len(dest):  # else the views do not reach the end of the payload
            bufs.append(room)
        return bufs

    def direct_updated(self, nbytes: int) -> list[PDU]:
        """Account for ``nbytes`` read into :meth:`direct_buffers`; returns completed PDUs."""
        out: list[PDU] = []
        remaining = self._remaining
        if nbytes < remaining:
            # Still DIRECT, with nothing buffered: there is nothing to parse (held is False
            # since the last parse, which set DIRECT).
            self._advance_dest(nbytes)
            return out
        # The payload is in (the views are done with: no need to advance through them); the
        # rest of the read went into the room after them, from its start.
        self._remaining = 0
        self._state = _TRAILER
        self._end += nbytes - remaining
        if self._end - self._start >= self._trailer:
            self._finish_direct(out)   # what _parse would do first, without its set-up
        self._parse(out, True)
        return out

    def buffer_updated(self, nbytes: int) -> list[PDU]:
        """Account for ``nbytes`` written into the last buffer; returns completed PDUs."""
        out: list[PDU] = []
        self._received(nbytes)
        self._parse(out, True)
        return out

    def parse_buffered(self) -> list[PDU]:
        """Parse the bytes already buffered (after ``one_at_a_time`` or :attr:`held` held them
        back, or the digests or limits changed); returns the completed PDUs."""
        out: list[PDU] = []
        self._parse(out, True)
        return out

    def feed(self, data: Buffer) -> list[PDU]:
        """Convenience for tests and non-asyncio callers: push bytes, get every PDU in them.

        Nothing is held back: the caller processes the PDUs only afterwards, so the sink
        processes only the Data-Ins that come before every other PDU; the later ones are placed
        and handed over as DataIns with ``placed`` set, in order.
        """
        view = memoryview(data)
        out: list[PDU] = []
        while view:
            dest = self.get_buffer(len(view))
            n = min(len(dest), len(view))
            dest[:n] = view[:n]
            view = view[n:]
            self._received(n)
            self._parse(out, False)
        return out

    @property
    def receiving_payload(self) -> bool:
        """True while a Data-In payload is being placed into a command's buffers."""
        return self._state is not _State.HEADER

    @property
    def partial(self) -> bool:
        """True when part of a PDU has come and the rest has not (after the last parse):
        nothing that follows it on the connection can be read until it has."""
        return self._state is not _HEADER or self._end != self._start

    # -- internals -------------------------------------------------------------------------

    def _received(self, nbytes: int) -> None:
        """Account for ``nbytes`` written into the buffer get_buffer() handed out."""
        if self._direct_out:
            self._direct_out = False
            self._advance_dest(nbytes)
            if self._remaining == 0:
                self._state = _TRAILER
        else:
            self._end += nbytes

    def _compact(self) -> None:
        n = self._end - self._start
        self._view[:n] = self._view[self._start : self._end]
        self._start, self._end = 0, n

    def _ensure_capacity(self, needed: int) -> None:
        """Make room for a unit of ``needed`` bytes starting at ``_start``."""
        if self._start + needed <= len(self._buf):
            return
        if needed <= len(self._buf):
            self._compact()
            return
        n = self._end - self._start
        new = bytearray(needed)
        new[:n] = self._view[self._start : self._end]
        self._view.release()
        self._buf = new
        self._view = memoryview(new)
        self._start, self._end = 0, n

    def _advance_dest(self, nbytes: int) -> None:
        self._remaining -= nbytes
        self._dest_pos += nbytes
        while self._dest_index < len(self._dest) and \
                self._dest_pos >= len(self._dest[self._dest_index]):
            self._dest_pos -= len(self._dest[self._dest_index])
            self._dest_index += 1

    def _copy_to_dest(self) -> None:
        """Move buffered payload bytes of the Data-In in progress into its views."""
        while self._remaining and self._start < self._end:
            view = self._dest[self._dest_index]
            n = min(len(view) - self._dest_pos, self._remaining, self._end - self._start)
            view[self._dest_pos : self._dest_pos + n] = self._view[self._start : self._start + n]
            self._start += n
            self._advance_dest(n)
        if self._remaining == 0:
            self._state = _State.TRAILER

    def _parse(self, out: list[PDU], hold: bool) -> None:
        # The inline-copy and direct routes run in this loop itself, one Python call per batch
        # of PDUs rather than one per PDU: they are the per-command path of reads. Whatever
        # they do not take (not a Data-In, an AHS, no payload, a payload over the limit, a
        # sink that declines) is _parse_one()'s, with all its checks.
        # Order (see the module docstring): the sink processes a Data-In only when nothing
        # is in `out`; with `hold`, a Data-In for the sink after PDUs in `out` waits.
        self.held = False
        sink = self.sink
        buf, view, filled = self._buf, self._view, self._end
        header_digest = self.header_digest
        hdr_len = BHS_LEN + DIGEST_LEN if header_digest else BHS_LEN
        data_digest = self.data_digest
        dd_len = DIGEST_LEN if data_digest else 0
        max_dsl = self.max_data_segment_length
        while True:
            state = self._state
            if state is _HEADER:
                start = self._start
                if sink is not None and filled - start >= hdr_len and \
                        buf[start] & 0x3F == _OP_DATA_IN:
                    if header_digest:
                        # First: the fields of a corrupted header are noise (§7.8).
                        _digest.check(view[start + BHS_LEN : start + hdr_len],
                                      _digest.crc32c(view[start : start + BHS_LEN]),
                                      header=True)
                    (flags, status, dsl, itt, stat_sn, exp_cmd_sn, max_cmd_sn, data_sn, offset,
                     residual) = _DATA_IN_FIELDS(buf, start)
                    # dsl is the TotalAHSLength/DataSegmentLength word: an AHS makes it larger
                    # than any limit (the AHS is _parse_one()'s).
                    if 0 < dsl <= max_dsl:
                        if out and hold:
                            self.held = True
                            return
                        dest = sink.data_in_buffers(itt, offset, dsl)
                        if dest is not None:
                            data_start = start + hdr_len
                            trailer = (-dsl & 3) + dd_len
                            end = data_start + dsl + trailer
                            if end <= filled:
                                # The inline-copy route.
                                if data_digest:
                                    tail = end - DIGEST_LEN
                                    _digest.check(view[tail:end],
                                                  _digest.crc32c(view[data_start:tail]),
                                                  header=False)
                                payload = view[data_start : data_start + dsl]
                                if len(dest) == 1 and (part := dest[0]).c_contiguous:
                                    try:
                                        part[:] = payload
                                    except (TypeError, ValueError, NotImplementedError):
                                        # Read-only, or of other items, shape or size: the
                                        # checks (cheaper to make only when it fails).
                                        _copy(payload, _landing(dest, dsl))
                                else:
                                    _copy(payload, _landing(dest, dsl))
                                self._start = end
                                if out or not sink.data_in_placed(
                                        flags, status, itt, offset, stat_sn, exp_cmd_sn,
                                        max_cmd_sn, data_sn, residual, dsl):
                                    self._placed_pdu(out, view[start : start + BHS_LEN], dsl)
                                continue
                            # The direct route: the DIRECT state, with the payload's views
                            # (checked first: socket.recv_into takes nothing else).
                            if len(dest) != 1 or len(part := dest[0]) != dsl or \
                                    part.format != "B" or part.ndim != 1 or \
                                    part.readonly or not part.c_contiguous:
                                dest = _landing(dest, dsl)
                            self._fields = (flags, status, itt, offset, stat_sn, exp_cmd_sn,
                                            max_cmd_sn, data_sn, residual)
                            self._bhs = buf[start : start + BHS_LEN]
                            self._start = data_start
                            self._large = dsl >= self.LARGE_PAYLOAD
                            self._dest = dest
                            self._dest_index = self._dest_pos = 0
                            self._remaining = self._dsl = dsl
                            self._trailer = trailer
                            self._state = _DIRECT
                            continue
                if not self._parse_one(out) or self.one_at_a_time:
                    return
                buf, view, filled = self._buf, self._view, self._end
                continue
            if state is _DIRECT:
                if self._start == self._end:
                    return  # nothing buffered to move (a payload that is still due is > 0)
                self._copy_to_dest()
                if self._state is _DIRECT:
                    return
            if self._state is _TRAILER:
                if self._end - self._start < self._trailer:
                    self._ensure_capacity(self._trailer)
                    return
                self._finish_direct(out)
                buf, view, filled = self._buf, self._view, self._end

    def _finish_direct(self, out: list[PDU]) -> None:
        """The trailer of the Data-In received in place is buffered: check it and have the
        sink process the Data-In."""
        start = self._start
        self._start = start + self._trailer
        if self.data_digest:
            trailer = self._view[start : start + self._trailer]
            pad = trailer[: len(trailer) - DIGEST_LEN]
            value = _digest.crc32c(pad, _digest.crc32c_of(self._dest))
            _digest.check(trailer[len(pad):], value, header=False)
        self._dest = ()
        self._state = _HEADER
        sink = self.sink
        if out or sink is None or not sink.data_in_placed(*self._fields, self._dsl):
            self._placed_pdu(out, memoryview(self._bhs), self._dsl)

    @staticmethod
    def _placed_pdu(out: list[PDU], bhs: memoryview, placed: int) -> None:
        """Hand over a Data-In whose payload is in place and that the sink declined."""
        pdu = DataIn._unpack(bhs, (), b"")
        pdu.placed = placed
        out.append(pdu)

    def _not_a_pdu(self, start: int) -> PDUFormatError:
        """The error for bytes at ``start`` whose first byte is no opcode of RFC 7143."""
        opcode = self._buf[start] & 0x3F
        head = bytes(self._buf[start : min(self._end, start + 32)])
        return PDUFormatError(
            f"unknown PDU opcode 0x{opcode:02x}; the peer sent {head!r}, which is not an iSCSI "
            f"PDU (is it an iSCSI target?)")

    def _parse_one(self, out: list[PDU]) -> bool:
        """The generic route: one PDU, with its payload in ``data``. False: more bytes are
        needed."""
        start = self._start
        avail = self._end - start
        # The opcode is judged from the first byte (unless a header digest covers it), before
        # waiting for the rest of a header or for the AHS junk may announce: a peer that is
        # not an iSCSI target (an HTTP or SSH server) fails at once, not when it closes or the
        # caller's timeout ends.
        if avail and not self.header_digest and self._buf[start] & 0x3F not in PDU_CLASSES:
            raise self._not_a_pdu(start)
        if avail < BHS_LEN:
            self._ensure_capacity(BHS_LEN)
            return False
        bhs = self._view[start : start + BHS_LEN]
        ahs_len = bhs[4] * 4
        dsl = int.from_bytes(bhs[5:8], "big")
        hdr_len = BHS_LEN + ahs_len + (DIGEST_LEN if self.header_digest else 0)
        if avail < hdr_len:
            self._ensure_capacity(hdr_len)
            return False
        if self.header_digest:
            # Checked first: when the header is corrupted its opcode and lengths are noise, and
            # the caller must see a digest error, not a format error (§7.8).
            end = start + BHS_LEN + ahs_len
            _digest.check(self._view[end : end + DIGEST_LEN],
                          _digest.crc32c(self._view[start:end]), header=True)
        opcode = bhs[0] & 0x3F
        if opcode not in PDU_CLASSES:
            raise self._not_a_pdu(start)
        if dsl > self.max_data_segment_length:
            raise PDUFormatError(
                f"{PDU_CLASSES[opcode].__name__} PDU has a {dsl}-byte data segment, more than "
                f"the MaxRecvDataSegmentLength of {self.max_data_segment_length} we declared"
            )
        ahs = _parse_ahs(self._view[start + BHS_LEN : start + BHS_LEN + ahs_len]) \
            if ahs_len else ()
        trailer = pad_len(dsl) + (DIGEST_LEN if self.data_digest and dsl else 0)
        total = hdr_len + dsl + trailer
        self._large = False
        if avail < total:
            self._ensure_capacity(total)
            return False
        data_start = start + hdr_len
        data = bytes(self._view[data_start : data_start + dsl])
        if self.data_digest and dsl:
            tail = data_start + dsl + pad_len(dsl)
            _digest.check(self._view[tail : tail + DIGEST_LEN],
                          _digest.crc32c(self._view[data_start:tail]), header=False)
        pdu = decode_bhs(bhs, ahs, data)
        self._start += total
        out.append(pdu)
        return True


__all__ = ["DataSink", "PDUReader"]
