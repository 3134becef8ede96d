"""Incremental PDU decoding, and the Data-In receive path into the caller's buffers.

Theory of operation
-------------------
Decoding is incremental and sans-I/O: :class:`PDUReader` exposes the ``get_buffer`` /
``buffer_updated`` pair of ``asyncio.BufferedProtocol``. A Data-In's payload can be received
straight into the buffers of the command it belongs to: the reader asks its :class:`DataSink`
where the bytes of that Data-In go and hands out those views as receive buffers.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Protocol

from initiator import digest as _digest
from initiator.errors import LocalProtocolError, PDUFormatError
from initiator.pdu import (
    _DATA_IN,
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
    """Tells the reader where the payload of a Data-In goes (zero-copy receive).

    A sink may also have ``data_in_inline(flags, status, itt, buffer_offset, stat_sn,
    exp_cmd_sn, max_cmd_sn, data_sn, residual_count, payload) -> bool``: for a Data-In that is
    entirely buffered, the reader then passes its fields and payload view directly; returning
    True means the sink placed the data and processed the PDU (no PDU object is made), False
    that the reader should go the ordinary way.

    And, for a Data-In whose payload is still to come, ``data_in_direct(itt, buffer_offset,
    length) -> Sequence[memoryview] | None`` (non-empty, flat, writable byte views that take
    exactly ``length`` bytes, or None to have the reader go the ordinary way) with
    ``data_in_placed(flags, status, itt, buffer_offset, stat_sn, exp_cmd_sn, max_cmd_sn,
    data_sn, residual_count, length) -> bool``, called once the payload is in those views:
    True means the sink processed the PDU, False that the reader should hand it over as a
    DataIn (with ``placed`` set) after all. Both or neither.
    """

    def data_in_buffers(self, pdu: DataIn, length: int) -> Sequence[memoryview] | None:
        """Views that together take exactly ``length`` bytes of ``pdu``'s payload, or None to
        have the payload delivered in ``pdu.data`` instead. Raise an ``ISCSIError`` to reject
        the PDU (e.g. data outside the command's buffer)."""
        ...


def _never(*_: object) -> bool:
    return False


def _byte_views(views: Sequence[memoryview]) -> list[memoryview]:
    """``views`` as flat views of unsigned bytes, so that lengths and slices count bytes.

    A cast view still exports the caller's memory: nothing is copied.
    """
    out: list[memoryview] = []
    for view in views:
        if view.readonly or not view.c_contiguous:
            raise LocalProtocolError(
                "DataSink returned a read-only or non-contiguous view; Data-In cannot land in it"
            )
        out.append(view if view.format == "B" and view.ndim == 1 else view.cast("B"))
    return out


_OP_DATA_IN = int(Opcode.DATA_IN)


class _State(enum.Enum):
    HEADER = 1
    DIRECT = 2
    TRAILER = 3


_HEADER, _DIRECT, _TRAILER = _State.HEADER, _State.DIRECT, _State.TRAILER  # for _parse's loop


class PDUReader:
    """Incremental PDU decoder with the ``asyncio.BufferedProtocol`` buffer interface.

    Bytes go into an internal buffer, from which headers and control PDUs are parsed. Once a
    Data-In header is parsed and its :class:`DataSink` names destination views, the rest of its
    payload is received straight into those views: :meth:`get_buffer` hands them out.
    ``max_data_segment_length`` is the MaxRecvDataSegmentLength we declared; a larger segment is
    a protocol error, which also bounds the memory a hostile peer can make us allocate.

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
        self._sink: DataSink | None = None
        self._inline: Callable[..., bool] | None = None
        self._direct: Callable[[int, int, int], Sequence[memoryview] | None] | None = None
        self._placed: Callable[..., bool] = _never
        self.sink = sink
        self._buf = bytearray(max(buffer_size, BHS_LEN + 2 * DIGEST_LEN))
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._state = _State.HEADER
        self._direct_out = False
        # Stream mode: the Data-In being received (or the last one) has a large payload.
        self._large = False
        self.deliver: Callable[[PDU], None] | None = None
        """When set, each PDU goes to this callable as soon as it is parsed (in wire order)
        instead of into the list :meth:`buffer_updated` returns."""
        # Direct-receive bookkeeping for the Data-In being received.
        self._pending: DataIn | None = None
        # ... or, on the fast path, its header's fields for the sink's data_in_placed() and
        # its BHS, from which the DataIn is made only if the sink declines.
        self._fields: tuple[int, ...] = ()
        self._bhs = bytearray()
        self._dest: list[memoryview] = []
        self._dest_all: Sequence[memoryview] = ()
        self._dest_index = 0
        self._dest_pos = 0
        self._remaining = 0
        self._trailer = 0
        self._dsl = 0

    @property
    def sink(self) -> DataSink | None:
        """Where Data-In payloads go (see :class:`DataSink`); None to keep them in PDUs."""
        return self._sink

    @sink.setter
    def sink(self, sink: DataSink | None) -> None:
        self._sink = sink
        self._inline = getattr(sink, "data_in_inline", None)
        self._direct = getattr(sink, "data_in_direct", None)
        self._placed = getattr(sink, "data_in_placed", _never)

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
        if nbytes >= remaining:
            # The payload is in (the views are done with: no need to advance through them);
            # the rest of the read went into the room after them.
            self._remaining = 0
            self._state = _TRAILER
            self._end += nbytes - remaining
        else:
            self._advance_dest(nbytes)
        self._parse(out)
        return out

    def buffer_updated(self, nbytes: int) -> list[PDU]:
        """Account for ``nbytes`` written into the last buffer; returns completed PDUs."""
        out: list[PDU] = []
        if self._direct_out:
            self._direct_out = False
            self._advance_dest(nbytes)
            if self._remaining == 0:
                self._state = _State.TRAILER
        else:
            self._end += nbytes
        self._parse(out)
        return out

    def parse_buffered(self) -> list[PDU]:
        """Parse the bytes already buffered (after ``one_at_a_time`` held them back, or the
        digests or limits changed); returns the completed PDUs."""
        out: list[PDU] = []
        self._parse(out)
        return out

    def feed(self, data: Buffer) -> list[PDU]:
        """Convenience for tests and non-asyncio callers: push bytes, get PDUs."""
        view = memoryview(data)
        out: list[PDU] = []
        while view:
            dest = self.get_buffer(len(view))
            n = min(len(dest), len(view))
            dest[:n] = view[:n]
            view = view[n:]
            out.extend(self.buffer_updated(n))
        return out

    @property
    def receiving_payload(self) -> bool:
        """True while a Data-In payload is being placed into a command's buffers."""
        return self._state is not _State.HEADER

    # -- internals -------------------------------------------------------------------------

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

    def _parse(self, out: list[PDU]) -> None:
        # The Data-In fast path of small reads runs in this loop itself (one Python call per
        # batch of PDUs, not one per PDU): a whole AHS-less Data-In already in the buffer goes
        # to the sink's inline handler with no PDU object and no tests of other opcodes. Its
        # payload length is checked as _parse_one() checks it; anything the handler declines
        # or this test does not cover takes _parse_one()'s ordinary path and its checks.
        # Order is kept: only when every earlier PDU of this batch has been delivered.
        # A Data-In whose payload is yet to come goes the same way to the sink's
        # data_in_direct(), and on to the DIRECT state with no DataIn object: the per-command
        # hot path of large reads.
        inline = None if self.header_digest else self._inline  # None: no fast path
        direct = self._direct
        buf, view = self._buf, self._view
        data_digest = self.data_digest
        max_dsl = self.max_data_segment_length
        single = self.one_at_a_time
        while True:
            state = self._state
            if state is _HEADER:
                start = self._start
                avail = self._end - start
                if inline is not None and avail >= BHS_LEN and \
                        buf[start] & 0x3F == _OP_DATA_IN and not buf[start + 4] and \
                        (self.deliver is not None or not out):
                    (_, flags, _, status, dsl, _, itt, _, stat_sn, exp_cmd_sn, max_cmd_sn,
                     data_sn, offset, residual) = _DATA_IN.unpack_from(buf, start)
                    dsl &= 0xFFFFFF
                    total = BHS_LEN + dsl + (-dsl & 3) + (DIGEST_LEN if data_digest else 0)
                    if dsl and avail >= total and dsl <= max_dsl:
                        data_start = start + BHS_LEN
                        if data_digest:
                            tail = data_start + dsl + (-dsl & 3)
                            _digest.check(view[tail : tail + DIGEST_LEN],
                                          _digest.crc32c(view[data_start:tail]), header=False)
                        if inline(flags, status, itt, offset, stat_sn, exp_cmd_sn, max_cmd_sn,
                                  data_sn, residual, view[data_start : data_start + dsl]):
                            self._start = start + total
                            continue
                    elif dsl and dsl <= max_dsl and direct is not None:
                        dest = direct(itt, offset, dsl)
                        if dest is not None:
                            # _parse_one()'s set-up of the DIRECT state, less what the sink
                            # has promised (flat writable views of exactly dsl bytes).
                            self._fields = (flags, status, itt, offset, stat_sn, exp_cmd_sn,
                                            max_cmd_sn, data_sn, residual)
                            self._bhs = buf[start : start + BHS_LEN]
                            self._start = start + BHS_LEN
                            self._large = dsl >= self.LARGE_PAYLOAD
                            self._dest_all = self._dest = \
                                dest if isinstance(dest, list) else list(dest)
                            self._dest_index = self._dest_pos = 0
                            self._remaining = self._dsl = dsl
                            self._trailer = total - BHS_LEN - dsl
                            self._state = _DIRECT
                            continue
                if not self._parse_one(out) or single:
                    return
                buf, view = self._buf, self._view
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
                buf, view = self._buf, self._view

    def _finish_direct(self, out: list[PDU]) -> None:
        trailer = self._view[self._start : self._start + self._trailer]
        self._start += self._trailer
        if self.data_digest:
            pad = trailer[: len(trailer) - DIGEST_LEN]
            value = _digest.crc32c(pad, _digest.crc32c_of(self._dest_all))
            _digest.check(trailer[len(pad):], value, header=False)
        pdu = self._pending
        self._pending = None
        self._dest = []
        self._dest_all = ()
        self._state = _HEADER
        if pdu is None:
            # The fast path: the sink processes the PDU from its fields (nothing is buffered
            # before it: see _parse()), or declines and gets a DataIn after all.
            fields, self._fields = self._fields, ()
            if self._placed(*fields, self._dsl):
                return
            pdu = DataIn._unpack(memoryview(self._bhs), (), b"")
        pdu.placed = self._dsl
        self._emit(out, pdu)

    def _emit(self, out: list[PDU], pdu: PDU) -> None:
        deliver = self.deliver
        if deliver is None:
            out.append(pdu)
        else:
            deliver(pdu)

    def _parse_one(self, out: list[PDU]) -> bool:
        start = self._start
        avail = self._end - start
        if avail < BHS_LEN:
            self._ensure_capacity(BHS_LEN)
            return False
        inline = self._inline
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
            end = self._start + BHS_LEN + ahs_len
            _digest.check(self._view[end : end + DIGEST_LEN],
                          _digest.crc32c(self._view[self._start : end]), header=True)
        opcode = bhs[0] & 0x3F
        if opcode not in PDU_CLASSES:
            raise PDUFormatError(f"unknown PDU opcode 0x{opcode:02x}")
        if dsl > self.max_data_segment_length:
            raise PDUFormatError(
                f"{PDU_CLASSES[opcode].__name__} PDU has a {dsl}-byte data segment, more than "
                f"the MaxRecvDataSegmentLength of {self.max_data_segment_length} we declared"
            )
        ahs = _parse_ahs(self._view[self._start + BHS_LEN : self._start + BHS_LEN + ahs_len]) \
            if ahs_len else ()
        trailer = pad_len(dsl) + (DIGEST_LEN if self.data_digest and dsl else 0)
        if opcode == Opcode.DATA_IN and dsl and self.sink is not None:
            total = hdr_len + dsl + trailer
            if inline is not None and avail >= total and not ahs_len and (
                    self.deliver is not None or not out):
                # The whole Data-In is buffered: hand its fields and payload to the sink in one
                # call, with no PDU object (the per-command hot path of small reads). Order is
                # kept: only when every earlier PDU of this batch has been delivered.
                data_start = self._start + hdr_len
                if self.data_digest:
                    tail = data_start + dsl + pad_len(dsl)
                    value = _digest.crc32c(self._view[data_start:tail])
                    _digest.check(self._view[tail : tail + DIGEST_LEN], value, header=False)
                f = _DATA_IN.unpack_from(self._buf, self._start)
                if inline(f[1], f[3], f[6], f[12], f[8], f[9], f[10], f[11], f[13],
                          self._view[data_start : data_start + dsl]):
                    self._start += total
                    return True
            din = DataIn._unpack(bhs, ahs, b"")
            dest = self.sink.data_in_buffers(din, dsl)
            if dest is not None:
                views = _byte_views(dest)
                if sum(len(v) for v in views) != dsl:
                    raise LocalProtocolError("DataSink returned buffers of the wrong size")
                if avail >= total and len(views) == 1:
                    # The whole PDU is already buffered (the common case for small reads):
                    # one copy into the caller's view, no state changes.
                    data_start = self._start + hdr_len
                    payload = self._view[data_start : data_start + dsl]
                    if self.data_digest:
                        tail = data_start + dsl + pad_len(dsl)
                        value = _digest.crc32c(self._view[data_start:tail])
                        _digest.check(self._view[tail : tail + DIGEST_LEN], value, header=False)
                    views[0][:] = payload
                    self._start += total
                    din.placed = dsl
                    self._emit(out, din)
                    return True
                self._start += hdr_len
                self._large = dsl >= self.LARGE_PAYLOAD
                self._pending = din
                self._dest_all = views
                self._dest = [v for v in views if len(v)]
                self._dest_index = self._dest_pos = 0
                self._remaining = self._dsl = dsl
                self._trailer = trailer
                self._state = _State.DIRECT
                return True
        total = hdr_len + dsl + trailer
        self._large = False
        if avail < total:
            self._ensure_capacity(total)
            return False
        data_start = self._start + hdr_len
        data = bytes(self._view[data_start : data_start + dsl])
        if self.data_digest and dsl:
            value = _digest.crc32c(self._view[data_start : data_start + dsl + pad_len(dsl)])
            tail = data_start + dsl + pad_len(dsl)
            _digest.check(self._view[tail : tail + DIGEST_LEN], value, header=False)
        pdu = decode_bhs(bhs, ahs, data)
        self._start += total
        self._emit(out, pdu)
        return True


__all__ = ["DataSink", "PDUReader"]
