"""Record one iSCSI connection as a pcap file that Wireshark and tshark dissect.

Theory of operation
-------------------
Where tcpdump cannot run (no CAP_NET_RAW, a container, a TCMU daemon on a busy host), the
initiator can still show exactly what it put on the wire: the transport hands every buffer it
writes to :meth:`PcapRecorder.sent` and every buffer it receives to
:meth:`PcapRecorder.received`. The recorder invents the TCP/IP framing around those bytes as a
TCP stack would have: a three-way handshake at open (MSS and window-scale options), segments of
at most ``mss`` bytes with consistent sequence and acknowledgement numbers in both directions
(every segment acknowledges all the peer sent so far; a pure ACK follows every few segments
in one direction, like delayed ACK), IPv4 (DF set) or IPv6, correct IPv4 header and TCP
checksums, and a FIN exchange at :meth:`~PcapRecorder.close`. scapy's ``PcapWriter`` writes the
file, as LINKTYPE_RAW (101): each record is a bare IPv4 or IPv6 packet. The headers are packed
here with ``struct`` rather than built as scapy layers, because scapy spends about 0.7 ms per
packet on that (an 8 MiB read at MSS 1460 would take 4 s to record); the tests parse every
packet back with scapy and check that it recomputes the same checksums.

Cost on the data path: ``sent``/``received`` copy the bytes (the caller reuses its buffers)
and cut them into segment records under a lock; they never build a packet or touch the file.
Every ``flush_every`` packets the records go to a writer thread that packs them and appends
them to a ``PcapWriter`` opened with ``sync=False`` (buffered), flushed after each batch, so a
crash loses at most one batch. Both methods are safe to call from the asyncio
loop (they do not block unless the writer falls more than ``max_batches`` batches behind) and
from other threads. A write error (disk full) stops the recording, is logged once, and is
raised by :meth:`close`; the data path never sees it.

A session records each connection (a recovery reconnects) with a recorder of its own. Into a
regular file each gets a file (``FILE``, ``FILE.2.pcap``: :class:`~initiator.transport.Session`
names them); into a stream (a FIFO, ``/dev/stdout``: :func:`initiator.output.is_stream`) the
next recorder appends (``append=True``) to the one capture without a second file header, and
the session keeps a descriptor on the stream open meanwhile, so that its reader (tshark) does
not see the end of the capture between two connections.

Dissecting the result
---------------------
Wireshark's iSCSI dissector (epan/dissectors/packet-iscsi.c) is registered on the TCP ports of
its ``iscsi.target_ports`` preference (default 3260) and as a heuristic dissector that only
accepts PDUs whose target side uses one of those ports or ``iscsi.target_system_port`` (860).
So ``tshark -r FILE`` dissects a capture to port 3260 (or 860) as is, and a capture to any other
port needs ``-d tcp.port==PORT,iscsi`` (or ``-o iscsi.target_ports:PORT``, or Wireshark's
Decode As). Nothing inside a pcap can carry that setting, so rather than rewrite the port (the
file would no longer show what crossed the wire) :meth:`PcapRecorder.tshark_options` gives the
options and the recorder logs the full command once at open. The dissector also ignores PDUs
whose data segment exceeds ``iscsi.bogus_pdu_max_data_len`` (262144), so a session that
negotiated a larger MaxRecvDataSegmentLength needs that option raised too.

Digests need no option with tshark 4.0: it detects header and data digests by checking the
CRC32C after a header and after a data segment (the old ``iscsi.enable_*_digests``
preferences are obsolete and rejected). The digests must be what RFC 7143 specifies, the
CRC32C stored least significant byte first; a wrongly ordered digest is not recognised and
the stream misframes. tshark decides once per connection, on the first PDU after login that it
sees whole together with the 4 bytes that follow it in one TCP segment. hbactl's commands all
begin with a small Data-In (READ CAPACITY, INQUIRY), so their captures always dissect; a
library session whose first data PDU spans segments (a large write right after login) leaves
tshark unable to tell, and it misframes that capture from there on.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import queue
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from scapy.utils import PcapWriter

from initiator.output import is_stream, open_for_writing

__all__ = ["ISCSI_PORTS", "PcapRecorder"]

log = logging.getLogger(__name__)

ISCSI_PORTS = (3260, 860)
"""Target ports Wireshark dissects as iSCSI without options (target_ports, target_system_port)."""

_LINKTYPE_RAW = 101  # pcap LINKTYPE_RAW: each record is a bare IPv4 or IPv6 packet
_IP_MAX = 65535  # never write an IP packet longer than this
_TCP_HEADER = 20
_IPV4_HEADER = 20
_IPV6_HEADER = 40
_DEFAULT_MSS = {4: 1460, 6: 1440}  # Ethernet MTU 1500
_WINDOW = 65535
_WSCALE = 7  # advertised window 65535 << 7 ~ 8 MiB: never "window full" for our ACK pace
_ACK_EVERY = 8  # a pure ACK after this many unacknowledged full segments in one direction
_TTL = 64
_PROTO_TCP = 6
_IPV4 = struct.Struct(">BBHHHBBH4s4s")
_IPV6 = struct.Struct(">IHBB16s16s")
_TCP = struct.Struct(">HHIIBBHHH")
_PSEUDO_V4 = struct.Struct(">4s4sxBH")
_PSEUDO_V6 = struct.Struct(">16s16sI3xB")
_DF = 0x4000
_TCP_FLAGS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10}
_WIRESHARK_MAX_DATA = 262144  # iscsi.bogus_pdu_max_data_len default

BytesLike = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class _Segment:
    """One packet to write, everything decided at record time."""

    time: float
    from_local: bool
    ip_id: int
    seq: int
    ack: int
    flags: str
    payload: bytes
    syn_options: bool = False


class PcapRecorder:
    """Write the bytes of one TCP connection to ``path`` as a pcap with synthesised TCP/IP.

    ``local`` and ``remote`` are ``(ip, port)`` of the initiator and the target, both IPv4 or
    both IPv6. ``clock`` returns the current time in seconds (``time.time`` by default); each
    call stamps its packets with one reading of it. ``mss`` defaults to what Ethernet gives
    (1460 for IPv4, 1440 for IPv6) and may be raised to see loopback-sized segments, up to
    65495 (IPv4) / 65475 (IPv6) so that no IP packet exceeds 65535 bytes. ``isn`` fixes the
    initial sequence numbers (local, remote) for reproducible files; they are random otherwise.
    ``append`` adds this connection's packets to an existing capture (a file's header is
    written only if it has none; a stream's is taken to be there: the module docstring).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        local: tuple[str, int],
        remote: tuple[str, int],
        *,
        clock: Callable[[], float] = time.time,
        mss: int | None = None,
        flush_every: int = 256,
        max_batches: int = 64,
        append: bool = False,
        isn: tuple[int, int] | None = None,
    ) -> None:
        # A link-local IPv6 address may carry a scope ("fe80::1%eth0"); packets carry none.
        local_ip = ipaddress.ip_address(local[0].split("%")[0])
        remote_ip = ipaddress.ip_address(remote[0].split("%")[0])
        if local_ip.version != remote_ip.version:
            raise ValueError(
                f"local address {local[0]} and remote address {remote[0]} are of different IP "
                "versions; one TCP connection has both ends in the same family"
            )
        for what, (_ip, port) in (("local", local), ("remote", remote)):
            if not 1 <= port <= 65535:
                raise ValueError(f"{what} port {port} is outside 1..65535")
        self._version = local_ip.version
        header = _TCP_HEADER + (_IPV4_HEADER if self._version == 4 else _IPV6_HEADER)
        max_mss = _IP_MAX - header
        self.mss = _DEFAULT_MSS[self._version] if mss is None else mss
        if not 1 <= self.mss <= max_mss:
            raise ValueError(f"mss {self.mss} is outside 1..{max_mss} for IPv{self._version}")
        if flush_every < 1 or max_batches < 1:
            raise ValueError("flush_every and max_batches must be at least 1")
        self.path = os.fspath(path)
        self.local = (str(local_ip), local[1])
        self.remote = (str(remote_ip), remote[1])
        self._packed = {True: local_ip.packed, False: remote_ip.packed}
        self._clock = clock
        self._flush_every = flush_every
        self._lock = threading.Lock()
        self._pending: list[_Segment] = []
        self._closed = False
        self._failed = False
        self.error: BaseException | None = None

        rand = int.from_bytes(os.urandom(8), "big")
        isn_local, isn_remote = isn if isn is not None else (rand >> 32, rand & 0xFFFF_FFFF)
        self._seq = {True: isn_local & 0xFFFF_FFFF, False: isn_remote & 0xFFFF_FFFF}
        self._ip_id = {True: 0, False: 0}
        self._unacked = {True: 0, False: 0}

        # Open the file now so a bad path fails here, in the caller, not later in the thread.
        # A new file is made readable by its owner only: it holds the disk's data (and a CHAP
        # exchange), which the umask's 0644 would give every user of the machine.
        # A FIFO with no reader fails here at once (NoReader) instead of blocking the open;
        # this descriptor stays open until PcapWriter has opened the path, so that a FIFO's
        # reader does not see an end of file in between.
        fd = open_for_writing(self.path, mode=0o600, truncate=False)
        try:
            self._writer: Any = PcapWriter(self.path, linktype=_LINKTYPE_RAW, append=append,
                                           sync=False)
        finally:
            os.close(fd)
        try:
            if append and is_stream(self.path):
                # A FIFO or /dev/stdout cannot be read back to see whether its header is
                # there: appending to a stream continues one capture, which has it.
                self._writer.header_present = True
            else:
                self._writer.write_header(None)
        except OSError as exc:   # `--pcap /dev/full`, a full disk: name the file
            with contextlib.suppress(OSError):
                self._writer.close()
            raise OSError(exc.errno, f"cannot write the capture {self.path}: "
                                     f"{exc.strerror or exc}") from None
        self._queue: queue.Queue[list[_Segment] | None] = queue.Queue(maxsize=max_batches)
        self._thread = threading.Thread(
            target=self._write_loop, name=f"pcap {self.path}", daemon=True
        )
        self._thread.start()

        if self.remote[1] not in ISCSI_PORTS:
            log.info(
                "pcap %s: target port %d is not 3260, dissect it with: tshark -r %s %s",
                self.path,
                self.remote[1],
                self.path,
                " ".join(self.tshark_options()),
            )
        self._handshake()

    # -- public API ------------------------------------------------------------------------

    def tshark_options(self, max_data_segment_length: int = 262144) -> tuple[str, ...]:
        """The tshark options that make it dissect this capture as iSCSI: empty for a target
        on port 3260 whose PDUs carry at most 256 KiB of data."""
        options: tuple[str, ...] = ()
        port = self.remote[1]
        if port not in ISCSI_PORTS:
            options += ("-d", f"tcp.port=={port},iscsi")
        if max_data_segment_length > _WIRESHARK_MAX_DATA:
            options += ("-o", f"iscsi.bogus_pdu_max_data_len:{max_data_segment_length}")
        return options

    def sent(self, chunks: Iterable[BytesLike]) -> None:
        """Record bytes the initiator wrote, exactly as handed to the socket (one call per
        ``sendmsg``/``write``; the chunks are concatenated)."""
        data = b"".join(chunks)
        if data:
            self._record_data(True, data)

    def received(self, data: BytesLike) -> None:
        """Record bytes the initiator read from the socket."""
        if len(data):
            self._record_data(False, bytes(data))

    def flush(self) -> None:
        """Hand buffered packets to the writer and wait until they are in the file."""
        with self._lock:
            self._submit()
        self._queue.join()

    def close(self) -> None:
        """Record the FIN exchange (initiator first), write everything, close the file.

        Raises the error that stopped the recording, if any. Calling it again does nothing.
        """
        with self._lock:
            if self._closed:
                return
            now = self._clock()
            for from_local in (True, False):
                self._segment(now, from_local, "FA", b"")
                self._seq[from_local] = (self._seq[from_local] + 1) & 0xFFFF_FFFF
            self._segment(now, True, "A", b"")
            self._closed = True
            self._submit()
        self._queue.put(None)
        self._thread.join()
        try:
            self._writer.close()
        except OSError as exc:
            self.error = self.error or exc
        if self.error is not None:
            raise self.error

    def __enter__(self) -> PcapRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- recording (caller's thread, under the lock) ----------------------------------------

    def _handshake(self) -> None:
        with self._lock:
            now = self._clock()
            self._segment(now, True, "S", b"", syn=True)
            self._seq[True] = (self._seq[True] + 1) & 0xFFFF_FFFF
            self._segment(now, False, "SA", b"", syn=True)
            self._seq[False] = (self._seq[False] + 1) & 0xFFFF_FFFF
            self._segment(now, True, "A", b"")

    def _record_data(self, from_local: bool, data: bytes) -> None:
        with self._lock:
            if self._closed:
                raise ValueError(f"pcap {self.path} is closed")
            if self._failed:
                return
            now = self._clock()
            mss = self.mss
            view = memoryview(data)
            for offset in range(0, len(data), mss):
                chunk = view[offset : offset + mss]
                last = offset + mss >= len(data)
                self._segment(now, from_local, "PA" if last else "A", chunk.tobytes())
                self._seq[from_local] = (self._seq[from_local] + len(chunk)) & 0xFFFF_FFFF
                self._unacked[from_local] += len(chunk)
                if self._unacked[from_local] >= _ACK_EVERY * mss:
                    # The peer acknowledges, as delayed ACK would, without data of its own.
                    self._segment(now, not from_local, "A", b"")

    def _segment(
        self, now: float, from_local: bool, flags: str, payload: bytes, *, syn: bool = False
    ) -> None:
        ack = 0 if flags == "S" else self._seq[not from_local]
        self._pending.append(
            _Segment(
                time=now,
                from_local=from_local,
                ip_id=self._ip_id[from_local],
                seq=self._seq[from_local],
                ack=ack,
                flags=flags,
                payload=payload,
                syn_options=syn,
            )
        )
        self._ip_id[from_local] = (self._ip_id[from_local] + 1) & 0xFFFF
        if "A" in flags:
            self._unacked[not from_local] = 0  # everything the peer sent is acknowledged
        if len(self._pending) >= self._flush_every:
            self._submit()

    def _submit(self) -> None:
        if self._pending and not self._failed:
            batch, self._pending = self._pending, []
            self._queue.put(batch)

    # -- writing (writer thread) -------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            batch = self._queue.get()
            try:
                if batch is None:
                    return
                if self.error is None:
                    self._write_batch(batch)
            except Exception as exc:  # recorded, logged, raised by close()
                self.error = exc
                self._failed = True
                log.warning("pcap %s: recording stopped: %s", self.path, exc)
            finally:
                self._queue.task_done()

    def _write_batch(self, batch: list[_Segment]) -> None:
        for segment in batch:
            raw = self._build(segment)
            seconds = int(segment.time)
            micros = round((segment.time - seconds) * 1_000_000)
            if micros == 1_000_000:
                seconds, micros = seconds + 1, 0
            self._writer.write_packet(raw, sec=seconds, usec=micros)
        self._writer.flush()

    def _build(self, segment: _Segment) -> bytes:
        src, dst = (self.local, self.remote) if segment.from_local else (self.remote, self.local)
        src_ip, dst_ip = self._packed[segment.from_local], self._packed[not segment.from_local]
        options = b""
        if segment.syn_options:
            # MSS (kind 2), NOP, window scale (kind 3): what a SYN of a real stack carries.
            options = struct.pack(">BBHBBBB", 2, 4, self.mss, 1, 3, 3, _WSCALE)
        flags = sum(_TCP_FLAGS[f] for f in segment.flags)
        header_words = (_TCP.size + len(options)) // 4
        tcp_length = _TCP.size + len(options) + len(segment.payload)
        tcp = _TCP.pack(
            src[1], dst[1], segment.seq, segment.ack, header_words << 4, flags, _WINDOW, 0, 0
        )
        if self._version == 4:
            pseudo = _PSEUDO_V4.pack(src_ip, dst_ip, _PROTO_TCP, tcp_length)
        else:
            pseudo = _PSEUDO_V6.pack(src_ip, dst_ip, tcp_length, _PROTO_TCP)
        checksum = _checksum(pseudo + tcp + options + segment.payload)
        tcp = tcp[:16] + checksum.to_bytes(2, "big") + tcp[18:]
        if self._version == 4:
            ip = _IPV4.pack(
                0x45, 0, _IPV4.size + tcp_length, segment.ip_id, _DF, _TTL, _PROTO_TCP, 0,
                src_ip, dst_ip,
            )  # fmt: skip
            ip = ip[:10] + _checksum(ip).to_bytes(2, "big") + ip[12:]
        else:
            ip = _IPV6.pack(6 << 28, tcp_length, _PROTO_TCP, _TTL, src_ip, dst_ip)
        return ip + tcp + options + segment.payload


def _checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``.

    The one's complement sum of the 16-bit words equals the whole buffer read as one big-endian
    integer modulo 0xFFFF (2**16 is 1 modulo 0xFFFF), which CPython computes at C speed. The
    data here always includes non-zero bytes (the protocol number), so a remainder of 0 stands
    for a sum of 0xFFFF.
    """
    if len(data) % 2:
        data += b"\0"
    total = int.from_bytes(data, "big") % 0xFFFF or 0xFFFF
    return ~total & 0xFFFF
