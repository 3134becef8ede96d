"""The asyncio side of the initiator: TCP connections, login, and session recovery.

Theory of operation
-------------------
:class:`Connection` is an ``asyncio.BufferedProtocol`` during login: asyncio asks it for a
buffer, receives into it and reports how many bytes arrived. In the Full Feature Phase it reads
the socket itself, from a reader callback on the event loop (:meth:`Connection._on_readable`):
several reads per wake-up, each into what :class:`~initiator.reader.PDUReader` asks for, which
is its internal buffer or, while a Data-In payload is being received, the very ``memoryview``
of the command's data buffer (the TCMU data area in the daemon) followed by room for the next
header, in one ``recvmsg_into``: payloads are not copied. Sending bypasses asyncio's write
buffer, which would copy:
frames (header bytes plus the caller's own views) go to ``socket.sendmsg`` as one scatter list,
and when the socket is full the rest waits for writability in the connection core's queue.
Large payloads in shared memory (the TCMU data area) are not copied even by the kernel: they
go by :class:`~initiator.splice.Splicer` (``vmsplice`` into a pipe, ``splice`` into the
socket), their header by ``sendmsg`` just before; bytes in the pipe go out before anything
else. A connection that fails with spliced bytes still queued is reset, not closed cleanly
(why: :mod:`initiator.splice`).

:class:`Session` drives login (:mod:`initiator.login`) over a connection, then runs the Full
Feature Phase through :class:`~initiator.session.ConnectionCore`. When the connection fails it
recovers as open-iscsi does at ErrorRecoveryLevel 0 (RFC 7143 §6.3.5, §7.1.4): it logs in
again with the same ISID and TSIH 0 — session reinstatement — and re-issues every command that
had not completed. When to try and when to give up (Time2Wait, backoff, the replacement
timeout and its outage clock) is :class:`~initiator.recovery.RecoveryPolicy`'s decision; this
module runs its timer and the login attempts it asks for. Every wait has a bound, named in
:class:`SessionConfig`; every failure, whatever raised it, ends as one error for the commands
(:class:`~initiator.errors.SessionFailed` once recovery gives up).

No asyncio Task is created per command: :meth:`Session.submit` takes a callback, and
:meth:`Session.execute` only adds one Future.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import os
import secrets
import socket
import struct
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from initiator import pdu as P
from initiator.command import Buffers, CommandHandle, CommandResult, CompletionCallback
from initiator.errors import (
    CommandTimeout,
    ConfigurationError,
    ConnectionFailed,
    DigestError,
    ISCSIError,
    LocalProtocolError,
    PDUFormatError,
    ProtocolError,
    RemoteProtocolError,
    SessionFailed,
    TaskAborted,
)
from initiator.login import (
    Credentials,
    LoginError,
    LoginMachine,
    LoginRedirect,
    LoginSuccess,
    Portal,
)
from initiator.output import is_stream, open_for_writing
from initiator.reader import PDUReader
from initiator.recovery import MAX_BACKOFF, Action, RecoveryPolicy
from initiator.recovery import progress_log as recovery_log
from initiator.session import (
    ConnectionCore,
    Event,
    EventKind,
    Task,
    TransferParameters,
)
from initiator.splice import AVAILABLE as SPLICE_AVAILABLE
from initiator.splice import Splicer, spliceable
from initiator.stats import SessionStats
from initiator.text import TextValueError, check_iscsi_name

if TYPE_CHECKING:
    from initiator.keys import SessionParameters
    from initiator.pcap import PcapRecorder

log = logging.getLogger(__name__)

IOV_MAX = 1024
_READ_ROUNDS = 16
"""Reads per wake-up in the Full Feature Phase, at most (see Connection._on_readable)."""
MAX_REDIRECTS = 8


INITIATOR_NAME_FILE = "/etc/iscsi/initiatorname.iscsi"


def default_initiator_name(path: str = INITIATOR_NAME_FILE) -> str:
    """The host's open-iscsi initiator name (``path``), or one derived from the host name.

    A file that is there but unusable (not UTF-8, a name that is not an iSCSI name) is a
    :class:`ConfigurationError` naming it: falling back would log in under another name than
    open-iscsi's, which the target's ACLs do not know."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                key, _, value = line.strip().partition("=")
                if key == "InitiatorName" and value:
                    try:
                        check_iscsi_name(value, key=f"InitiatorName in {path}")
                    except TextValueError as exc:
                        raise ConfigurationError(
                            f"{exc}; correct it or give the initiator name (--initiator-name)"
                        ) from None
                    return value
    except UnicodeDecodeError:
        raise ConfigurationError(
            f"{path} is not UTF-8 text; correct its InitiatorName line or give the initiator "
            "name (--initiator-name)") from None
    except OSError:
        pass
    host = "".join(c for c in socket.gethostname().lower() if c.isalnum() or c in ".-") or "host"
    return f"iqn.2026-11.org.iscsi-hba:{host}"


def _numeric_address(portal: Portal) -> Sequence[tuple[int, int, int, str, Any]]:
    """``portal``'s address when its host is an IP address, without asyncio's resolver
    thread: a reconnect (every Time2Wait on a faulty link) need not wait for a thread to
    parse "127.0.0.1". Empty when the host is a name."""
    try:
        return socket.getaddrinfo(portal.host, portal.port, type=socket.SOCK_STREAM,
                                  flags=socket.AI_NUMERICHOST)
    except (OSError, ValueError):
        return []   # a name (or garbage): the resolver says what is wrong with it


def random_isid() -> int:
    """An ISID of the "random" type (T=10b, RFC 7143 §11.12.5): 24 random bits in B and C."""
    return (0x80 << 40) | (secrets.randbits(24) << 16)


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """How to log in and how to behave; the defaults are open-iscsi's (docs/architecture.md)."""

    initiator_name: str = field(default_factory=default_initiator_name)
    initiator_alias: str | None = None
    credentials: Credentials | None = None
    header_digest: str = "None"
    """HeaderDigest to offer, in preference order: ``None``, ``CRC32C``, ``CRC32C,None``,
    ``None,CRC32C``. Offering ``CRC32C`` alone makes the login fail if the target refuses it."""
    data_digest: str = "None"
    """DataDigest to offer, likewise."""
    negotiation: dict[str, str] = field(default_factory=dict)
    """Overrides of our operational offers, by key name (e.g. ``{"MaxBurstLength": "65536"}``)."""
    isid: int = field(default_factory=random_isid)
    login_timeout: float = 15.0
    """Seconds a login may take in all: name resolution, connecting, every exchange and every
    redirect."""
    replacement_timeout: float = 120.0
    """Seconds commands wait for the session to work again after a connection is lost (the
    outage clock: see :mod:`initiator.recovery`); then they fail."""
    noop_interval: float = 5.0
    """Seconds without progress from the target before a NOP-Out ping (0: no pings)."""
    noop_timeout: float = 5.0
    """Seconds a ping may go unanswered, with no progress meanwhile, before the connection is
    considered dead."""
    command_timeout: float = 30.0
    """Seconds a command may be outstanding at the target (the SCSI layer's timeout); then it
    is aborted: ABORT TASK, LOGICAL UNIT RESET, a new connection (0: no deadline). Text
    requests and a command window that stays closed are held to it too."""
    tmf_timeout: float = 15.0
    """Seconds each task management request (ABORT TASK, LOGICAL UNIT RESET) may take."""
    logout_timeout: float = 10.0
    """Seconds a logout may take, waiting for outstanding commands included."""
    reconnect_forever: bool = False
    """Keep trying to reconnect after the replacement timeout (the daemon); one-shot commands
    give up then."""
    max_reconnect_interval: float = MAX_BACKOFF
    """Seconds between reconnect attempts at most: after a failed attempt, or a reconnect
    that completed no command, the wait doubles from 1 s up to this (the target's Time2Wait
    is waited in any case)."""


class SessionState(enum.Enum):
    NEW = "new"
    LOGGING_IN = "logging in"
    LOGGED_IN = "logged in"
    RECOVERING = "recovering"
    FAILED = "failed"
    LOGGING_OUT = "logging out"
    CLOSED = "closed"


_LOGGED_IN = SessionState.LOGGED_IN  # tested once per command by Session.submit


class Connection(asyncio.BufferedProtocol):
    """One TCP connection carrying PDUs. See the module docstring."""

    def __init__(self, portal: Portal, pcap: PcapRecorder | None = None) -> None:
        self.portal = portal
        self.pcap = pcap
        self.reader = _login_reader()
        self.core: ConnectionCore | None = None
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._sock: socket.socket | None = None
        # A duplicate of the socket's fd to wait on for the Full Feature Phase's reads and
        # for writability: asyncio refuses add_reader() and add_writer() on the fd its
        # transport owns ("File descriptor N is used by transport").
        self._fd = -1
        self._reading = False
        self._buf: memoryview | None = None
        self._login_waiter: asyncio.Future[P.PDU] | None = None
        self._login_pdus: list[P.PDU] = []
        self._writer_armed = False
        self._flush_scheduled = False
        self._receiving = False   # in a read: after_receive() callbacks are taken
        self._after_receive: list[Callable[[], None]] = []
        self._splicer: Splicer | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._received_at = self._loop.time()
        """When bytes last came (the Full Feature Phase's reads): with the reader holding part
        of a PDU, since when the target has stopped in the middle of it (see _on_timer)."""
        self.error: ISCSIError | None = None
        self.closed = self._loop.create_future()
        self.on_failure: Callable[[ISCSIError], None] | None = None
        self.on_event: Callable[[Event], None] | None = None

    # -- opening -------------------------------------------------------------------------

    @classmethod
    async def open(cls, portal: Portal, timeout: float, pcap_factory: Callable[
            [tuple[str, int], tuple[str, int]], PcapRecorder] | None = None) -> Connection:
        """Connect to ``portal`` within ``timeout`` seconds (in all: resolving the name and
        trying each of its addresses)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            infos = _numeric_address(portal)
            if not infos:
                infos = await asyncio.wait_for(
                    loop.getaddrinfo(portal.host, portal.port, type=socket.SOCK_STREAM),
                    timeout)
        except (OSError, TimeoutError, ValueError) as exc:
            # ValueError: UnicodeError from the IDNA codec (an empty or 64+ character label,
            # as a target's redirect may hold) and embedded NULs.
            raise ConnectionFailed(
                f"cannot resolve {portal.host!r}: {_reason(exc)}; check the target address"
            ) from None
        last: BaseException | None = None
        for family, type_, proto, _, addr in infos:
            try:
                sock = socket.socket(family, type_, proto)
            except OSError as exc:
                last = exc
                continue
            sock.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, addr),
                                       max(0.0, deadline - loop.time()))
            except (OSError, TimeoutError, ValueError, OverflowError) as exc:
                sock.close()
                last = exc
                continue
            pcap = None
            if pcap_factory is not None:
                local = sock.getsockname()
                remote = sock.getpeername()
                pcap = pcap_factory((local[0], local[1]), (remote[0], remote[1]))
            return await cls._attach(portal, pcap, sock)
        if last is None:
            raise ConnectionFailed(f"{portal.host!r} resolves to no address; check the target "
                                   "address")
        raise ConnectionFailed(
            f"cannot connect to iSCSI portal {portal}: {_reason(last)}; check that the target "
            "is running and reachable, and the address and port") from None

    @classmethod
    async def _attach(cls, portal: Portal, pcap: PcapRecorder | None,
                      sock: socket.socket) -> Connection:
        conn = cls(portal, pcap)
        conn._sock = sock
        conn._fd = os.dup(sock.fileno())
        await asyncio.get_running_loop().connect_accepted_socket(lambda: conn, sock=sock)
        return conn

    # -- asyncio protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        self._buf = buf = self.reader.get_buffer(sizehint)
        return buf

    def buffer_updated(self, nbytes: int) -> None:
        # The Login Phase (the Full Feature Phase reads in _on_readable; but a read asyncio
        # had already scheduled when it began still comes here).
        buf = self._buf
        if self.pcap is not None and buf is not None:
            self.pcap.received(buf[:nbytes])
        self._buf = None
        core = self.core
        self._receiving = True
        try:
            pdus = self.reader.buffer_updated(nbytes)
            if core is None:
                self._login_received(pdus)
                return
            self._received_at = now = self._loop.time()
            if pdus:
                self._receive(core, pdus, now)
            self._after_core_activity()
        except ISCSIError as exc:
            self.fail(exc)
        finally:
            self._receiving = False
            if self._after_receive:
                self._run_after_receive()

    def after_receive(self, callback: Callable[[], None]) -> bool:
        """Run ``callback`` once the PDUs being received now are processed, before the loop
        goes on (True); False when no read is under way."""
        if not self._receiving:
            return False
        self._after_receive.append(callback)
        return True

    def _run_after_receive(self) -> None:
        callbacks, self._after_receive = self._after_receive, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # not the connection's fault: it must not end it
                log.exception("%s: a callback after receiving failed", self.portal)

    def _on_readable(self) -> None:
        """The socket has bytes: read them into the reader, up to ``_READ_ROUNDS`` reads.

        Each read takes what the reader asks for: while a large Data-In payload is due, one
        ``recvmsg_into`` takes its rest into the command's own buffer and the next header into
        the reader's (:meth:`PDUReader.direct_buffers`), so a stream of large reads costs one
        syscall per PDU and no copy; otherwise one ``recv_into`` fills the reader's buffer
        with as many PDUs as have come. The commands that complete meanwhile are resubmitted
        by their owners, and all go out in one flush after the reads (``_flush_scheduled``
        stands for that flush, so that they schedule no other). A read that did not fill its
        buffers emptied the socket: the next one would only get EAGAIN, so the loop ends
        there (the selector calls again when more comes), and it ends after
        ``_READ_ROUNDS`` reads so that the new commands are not held back. EOF and errors
        end the connection as asyncio's own read would.
        """
        sock = self._sock
        core = self.core
        if sock is None or core is None or self.error is not None:
            return
        now = self._loop.time()
        scheduled, self._flush_scheduled = self._flush_scheduled, True
        self._receiving = True
        try:
            self._read_rounds(sock, core, now)
        finally:
            self._flush_scheduled = scheduled
            self._receiving = False
        try:
            self._after_core_activity()
        finally:
            if self._after_receive:
                self._run_after_receive()

    def _read_rounds(self, sock: socket.socket, core: ConnectionCore, now: float) -> None:
        pcap = self.pcap
        for _ in range(_READ_ROUNDS):
            reader = self.reader
            bufs = reader.direct_buffers()
            try:
                if bufs is None:
                    buf = reader.get_buffer(-1)
                    nbytes = sock.recv_into(buf)
                    wanted = len(buf)
                    if pcap is not None:
                        pcap.received(buf[:nbytes])
                else:
                    nbytes = sock.recvmsg_into(bufs)[0]
                    wanted = 0
                    for b in bufs:
                        wanted += len(b)
                    if pcap is not None:
                        pcap.received(b"".join(_first_bytes(bufs, nbytes)))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.fail(ConnectionFailed(f"connection to {self.portal} lost: {_reason(exc)}"))
                return
            if not nbytes:
                self.eof_received()
                return
            self._received_at = now
            try:
                pdus = reader.direct_updated(nbytes) if bufs is not None \
                    else reader.buffer_updated(nbytes)
                if pdus:
                    self._receive(core, pdus, now)
            except ISCSIError as exc:
                self.fail(self._from_target(exc))
                return
            if nbytes < wanted or self.error is not None:
                return

    def _receive(self, core: ConnectionCore, pdus: list[P.PDU], now: float) -> None:
        """Hand the reader's PDUs to the core, then what the reader held back until they were
        (see PDUReader.held), and so on."""
        reader = self.reader
        while True:
            for pdu in pdus:
                core.receive_pdu(pdu, now)
            if not reader.held:
                return
            pdus = reader.parse_buffered()

    def _from_target(self, error: ISCSIError) -> ISCSIError:
        """The reader's errors name the bytes (a digest, a length, an opcode), not who sent
        them: in Full Feature Phase, say it was the target (the core's errors already do)."""
        if isinstance(error, DigestError):
            return DigestError(f"target {self.portal}: {error}",
                               header=error.header)
        if type(error) is PDUFormatError:
            return PDUFormatError(f"target {self.portal} sent a malformed PDU: {error}")
        return error

    def eof_received(self) -> bool | None:
        self.fail(ConnectionFailed(f"target {self.portal} closed the connection"))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(ConnectionFailed(
            f"connection to {self.portal} lost: {_reason(exc) if exc else 'closed'}"))
        if not self.closed.done():
            self.closed.set_result(None)

    # -- login phase -----------------------------------------------------------------------

    def send_pdu(self, pdu: P.PDU, *, header_digest: bool = False,
                 data_digest: bool = False) -> None:
        """Send a control PDU outside the Full Feature Phase (login)."""
        self._sendmsg_all(P.frame(pdu, header_digest=header_digest, data_digest=data_digest))

    def _login_received(self, pdus: list[P.PDU]) -> None:
        # The login reader parses one PDU at a time (see _login_reader). Login is strictly
        # request and response: while the login code has not asked for the next PDU, the
        # socket is not read, so a target that floods us during login costs no memory.
        if not pdus:
            return
        self._login_pdus.extend(pdus)
        if self._transport is not None:
            self._transport.pause_reading()
        waiter = self._login_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(self._login_pdus.pop(0))

    async def next_pdu(self) -> P.PDU:
        """The next PDU received during login (the caller bounds the wait: the login's total
        deadline)."""
        if self.error is not None:
            raise self.error
        if not self._login_pdus:
            try:
                self._login_pdus.extend(self.reader.parse_buffered())
            except ISCSIError as exc:
                self.fail(exc)
                raise
        if self._login_pdus:
            return self._login_pdus.pop(0)
        if self._transport is not None:
            self._transport.resume_reading()
        self._login_waiter = self._loop.create_future()
        try:
            return await self._login_waiter
        finally:
            self._login_waiter = None

    def _sendmsg_all(self, bufs: list[P.Buffer]) -> None:
        # Login PDUs are small and strictly request/response, so asyncio's (copying) write
        # buffer is fine here; it is always empty again by the time Full Feature Phase starts
        # and :meth:`_flush` takes over with ``sendmsg``.
        if self.error is not None:
            raise self.error
        assert self._transport is not None
        data = b"".join(bufs)
        if self.pcap is not None:
            self.pcap.sent([data])
        self._transport.write(data)

    # -- full feature phase ----------------------------------------------------------------

    def start_full_feature(self, core: ConnectionCore) -> None:
        """Hand the connection to ``core``; PDUs received from now on go to it.

        Bytes that came after the final Login Response (in the same segment, maybe) are still
        unparsed in the reader: they are parsed now, with the negotiated digests and limits.
        """
        self.core = core
        reader = self.reader
        reader.header_digest = core.params.header_digest
        reader.data_digest = core.params.data_digest
        reader.max_data_segment_length = core.params.max_recv_data_segment_length
        reader.sink = core
        reader.one_at_a_time = False
        self._received_at = now = self._loop.time()
        try:
            if self._login_pdus:
                raise RemoteProtocolError(
                    f"target {self.portal} sent a {type(self._login_pdus[0]).__name__} PDU "
                    "during login, after a Login Response, before our next request")
            self._receive(core, reader.parse_buffered(), now)
        except ISCSIError as exc:
            self.fail(self._from_target(exc))
            return
        # From now on _on_readable reads, not asyncio: asyncio reads into one buffer per
        # loop iteration, and a large Data-In wants its payload and the next header in one.
        if self._transport is not None:
            self._transport.pause_reading()
        self._loop.add_reader(self._fd, self._on_readable)
        self._reading = True
        if SPLICE_AVAILABLE and self._sock is not None:
            try:
                self._splicer = Splicer(self._sock.fileno())
            except OSError as exc:   # out of file descriptors: copy, as without splice(2)
                log.info("%s: no pipe to send without copying (%s)", self.portal, _reason(exc))
        self.arm_timer()
        self._after_core_activity()

    def kick(self) -> None:
        """Commands were queued on the core: flush once this loop iteration is done, so
        everything submitted in one iteration goes out in one ``sendmsg``."""
        if not self._flush_scheduled and self.error is None:
            self._flush_scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self._after_core_activity()

    def hold_sends(self) -> bool:
        """Commands queued from now on wait for :meth:`release_sends` instead of having
        :meth:`kick` schedule a flush. False (and nothing held) when a flush is already
        scheduled: that one sends them."""
        if self._flush_scheduled:
            return False
        self._flush_scheduled = True
        return True

    def release_sends(self) -> None:
        """End a :meth:`hold_sends` that returned True: send what was queued meanwhile, now."""
        self._flush_scheduled = False
        self._after_core_activity()

    def flush(self) -> None:
        """Send what the core has queued now, not at the end of this loop iteration."""
        self._after_core_activity()

    def _after_core_activity(self) -> None:
        core = self.core
        if core is None or self.error is not None:
            return
        event = core.next_event()
        while event is not None:
            if self.on_event is not None:
                self.on_event(event)
            event = core.next_event()
        if core.wants_to_send and not self._writer_armed:
            self._flush()

    def _flush(self) -> None:
        core = self.core
        sock = self._sock
        if core is None or sock is None or self.error is not None:
            return
        splicer = self._splicer
        while True:
            if splicer is not None and splicer.pending:
                # Bytes of a payload already counted as sent: they go before anything else.
                try:
                    splicer.drain()
                except (BlockingIOError, InterruptedError):
                    self._wait_writable()
                    return
                except OSError as exc:
                    self.fail(ConnectionFailed(f"sending to {self.portal} failed: "
                                               f"{_reason(exc)}"))
                    return
                continue
            if not core.wants_to_send:
                break
            flags = 0
            if splicer is None:
                bufs = core.send_buffers(IOV_MAX)
            else:
                # Up to the first payload in shared memory, if any: it goes by the splicer.
                bufs = core.send_buffers(IOV_MAX, spliceable)
                last = bufs[-1]
                if type(last) is memoryview and spliceable(last):
                    if len(bufs) == 1:
                        self._splice(core, splicer, last)
                        splicer = self._splicer
                        continue
                    # What comes before it (its header) need not go out in a segment of its
                    # own (MSG_MORE).
                    bufs, flags = bufs[:-1], socket.MSG_MORE
            try:
                n = sock.sendmsg(bufs, (), flags)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self.fail(ConnectionFailed(f"sending to {self.portal} failed: {_reason(exc)}"))
                return
            if self.pcap is not None and n:
                self.pcap.sent(_first_bytes(bufs, n))
            try:
                core.sent(n)
            except LocalProtocolError as exc:  # pragma: no cover - internal consistency
                self.fail(exc)
                return
            total = 0
            for b in bufs:
                total += len(b)
            if n < total:
                # Socket full: wait until it can take more; the queue keeps the views.
                self._wait_writable()
                return
        if self._writer_armed:
            self._writer_armed = False
            self._loop.remove_writer(self._fd)

    def _splice(self, core: ConnectionCore, splicer: Splicer, buf: P.Buffer) -> None:
        """Load ``buf`` (the next bytes due, a payload in shared memory) into the empty pipe
        and tell the core they went. If the kernel refuses it, this connection copies
        (``sendmsg``) from then on, like any other."""
        assert isinstance(buf, memoryview)
        try:
            n = splicer.load(buf)
            if not n:
                raise OSError(errno.EAGAIN, "the empty pipe took nothing")
        except OSError as exc:
            log.info("%s: sending without copying failed (%s); copying from now on",
                     self.portal, _reason(exc))
            self._splicer = None
            splicer.close()
            return
        if self.pcap is not None:
            self.pcap.sent([buf[:n]])
        core.sent(n)

    def _wait_writable(self) -> None:
        if not self._writer_armed:
            self._writer_armed = True
            self._loop.add_writer(self._fd, self._on_writable)

    def _on_writable(self) -> None:
        self._flush()

    def arm_timer(self) -> None:
        """(Re)start the timer at the core's next deadline (after a request was queued)."""
        core = self.core
        if core is None or self.error is not None:
            return
        when = core.get_timer()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if when is not None:
            self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        core = self.core
        if core is None or self.error is not None:
            return
        try:
            core.handle_timer(self._loop.time(),
                              stalled_since=self._received_at if self.reader.partial else None)
        except ISCSIError as exc:
            self.fail(exc)
            return
        self._after_core_activity()
        self.arm_timer()

    # -- closing ---------------------------------------------------------------------------

    def fail(self, error: ISCSIError) -> None:
        """The connection is unusable: close it and tell the session (once)."""
        if self.error is not None:
            return
        self.error = error
        splicer, self._splicer = self._splicer, None
        if splicer is not None:
            # Spliced payloads are the pages of commands that are now re-issued or failed, and
            # then reused: no byte of them may go out later (see initiator.splice). A reset
            # drops the socket's send queue at the close below; the pipe is dropped here. Not
            # after a logout (no command left): a clean close then.
            core = self.core
            if splicer.loaded and self._sock is not None and \
                    (splicer.pending or core is None or core.in_flight):
                with contextlib.suppress(OSError):
                    self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                          struct.pack("ii", 1, 0))
            splicer.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writer_armed:
            self._writer_armed = False
            with contextlib.suppress(Exception):
                self._loop.remove_writer(self._fd)
        if self._reading:
            self._reading = False
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._fd)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        waiter = self._login_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        if self.core is not None:
            self.core.close(error)
        # Release every view of caller buffers the reader may hold.
        self.reader = _login_reader()
        if self._transport is not None:
            self._transport.abort()
        if self.pcap is not None:
            try:
                self.pcap.close()
            except OSError as exc:
                log.warning("could not finish the pcap capture of %s: %s", self.portal, exc)
            self.pcap = None
        if self.on_failure is not None:
            self.on_failure(error)

    def close(self) -> None:
        """Orderly close after logout (no error reported to the session)."""
        self.on_failure = None
        self.fail(ConnectionFailed(f"connection to {self.portal} closed"))


def _login_reader() -> PDUReader:
    """A reader with the limits of the Login Phase: 8192-byte segments, no digests (§13.12),
    one PDU at a time (what follows the final Login Response is Full Feature Phase)."""
    return PDUReader(max_data_segment_length=8192, one_at_a_time=True)


class Session:
    """An iSCSI session to one target: login, commands, recovery, logout.

    The asyncio side of it: the protocol is the connection core's, the recovery policy
    :class:`~initiator.recovery.RecoveryPolicy`'s (see the module docstring).
    """

    def __init__(
        self,
        portal: Portal,
        target_name: str | None,
        config: SessionConfig | None = None,
        *,
        pcap_path: str | None = None,
        discovery: bool = False,
    ) -> None:
        self.portal = portal
        self.original_portal = portal
        self.target_name = target_name
        self.config = config or SessionConfig()
        self.discovery = discovery
        self.pcap_path = pcap_path
        self.state = SessionState.NEW
        self.parameters: SessionParameters | None = None
        self.tsih = 0
        self.target_alias: str | None = None
        self.target_portal_group_tag: int | None = None
        self._conn: Connection | None = None
        self._core: ConnectionCore | None = None
        self._pending: list[Task] = []     # waiting for a connection (recovery)
        self._policy = RecoveryPolicy(self.config.replacement_timeout,
                                      reconnect_forever=self.config.reconnect_forever,
                                      max_backoff=self.config.max_reconnect_interval)
        self._policy_timer: asyncio.TimerHandle | None = None
        self._attempt: asyncio.Task[None] | None = None   # a recovery login under way
        self._background: set[asyncio.Task[None]] = set()
        self._failed_error: SessionFailed | None = None
        self._closing = False
        self._held: Connection | None = None   # the connection hold_sends() holds
        self._pcap_count = 0
        self._pcap_hold: int | None = None   # a descriptor on a --pcap stream (_pcap_factory)
        self.events: list[Event] = []
        self.on_event: Callable[[Event], None] | None = None
        self.on_state: Callable[[SessionState], None] | None = None
        self.reconnects = 0
        self.counters = SessionStats()
        """Counters for an operator (:mod:`initiator.stats`); ``reconnects`` counts the
        reinstatements."""

    @property
    def label(self) -> str:
        return f"{self.target_name or 'discovery'} at {self.portal}"

    @property
    def recovery(self) -> RecoveryPolicy:
        """The recovery policy's state, to read (since when the session is down and why,
        the last attempt's error, the attempts): what ``hbactl status`` shows of a path."""
        return self._policy

    # -- login -----------------------------------------------------------------------------

    async def login(self) -> None:
        """Log in the first time. Raises a typed error, with no retry, when that fails."""
        self._set_state(SessionState.LOGGING_IN)
        try:
            await self._connect_and_login()
        except BaseException as exc:
            if isinstance(exc, Exception):
                self.counters.login_failed(exc)
            self._set_state(SessionState.CLOSED)
            raise

    def start_background_login(self) -> None:
        """Log in from a background task, retrying like recovery does, and return at once.

        Commands submitted meanwhile wait for the login; after ``replacement_timeout`` they
        fail. This is how the daemon serves a device it adopts at start: the kernel's queue
        must not stall on a login, and a target that is down now may be back soon.
        """
        if self.state is not SessionState.NEW:
            raise LocalProtocolError(f"session to {self.label} was already started")
        self._policy.start(asyncio.get_running_loop().time(),
                           f"not logged in to {self.label} yet")
        self._set_state(SessionState.RECOVERING)
        self._arm_policy()

    async def _connect_and_login(self) -> None:
        """Connect and log in, following redirects, within ``login_timeout`` in all: name
        resolution, TCP connects and every exchange of every login count against it (a target
        that answers at once but never completes the login must not keep us forever)."""
        loop = asyncio.get_running_loop()
        timeout = self.config.login_timeout
        deadline = loop.time() + timeout
        portal = self.portal
        exchanges = [0, 0]   # Login Responses: in all, and on the current connection
        redirects = 0
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    conn = await Connection.open(portal, max(0.0, deadline - loop.time()),
                                                 self._pcap_factory())
                    try:
                        outcome = await self._run_login(conn, exchanges)
                    except BaseException:
                        conn.close()
                        raise
                    if isinstance(outcome, LoginSuccess):
                        self._start_full_feature(conn, outcome)
                        return
                    conn.close()
                    redirects += 1
                    if redirects > MAX_REDIRECTS:
                        raise ConnectionFailed(
                            f"target {self.target_name or self.label} redirected the login more "
                            f"than {MAX_REDIRECTS} times; check the target's portal "
                            "configuration")
                    log.info("%s: redirected %s to %s", self.label,
                             "permanently" if outcome.permanent else "temporarily",
                             outcome.portal)
                    portal = outcome.portal
                    if outcome.permanent:
                        self.portal = portal
        except TimeoutError:
            where = f" and {redirects} redirect(s)" if redirects else ""
            # A target that answers, but never ends the login (T=0 or C=1 in every response),
            # is up and reachable: saying to check that would send a person the wrong way.
            advice = "check that the target is up and its portal reachable" if not \
                exchanges[1] else ("the target answered without completing the login; check "
                                   "the target's logs and its login settings")
            raise ConnectionFailed(
                f"login to {self.target_name or 'discovery'} at {portal} did not complete "
                f"within the login timeout of {timeout:g} s ({exchanges[0]} login exchange(s)"
                f"{where}); {advice}") from None

    def _pcap_factory(self) -> Callable[[tuple[str, int], tuple[str, int]], PcapRecorder] | None:
        if self.pcap_path is None:
            return None
        path = self.pcap_path
        self._pcap_count += 1
        # Each connection of a session (a recovery reconnects) is one TCP flow. A regular file
        # gets one per connection (FILE, FILE.2.pcap, ...); a FIFO or /dev/stdout (tshark
        # reading it) cannot have names derived from it, so there they follow each other in
        # the one capture, which a pcap can hold (each flow its own ports).
        stream = is_stream(path)
        if self._pcap_count > 1 and not stream:
            root, ext = os.path.splitext(path)
            path = f"{root}.{self._pcap_count}{ext or '.pcap'}"
        append = stream and self._pcap_count > 1

        def factory(local: tuple[str, int], remote: tuple[str, int]) -> PcapRecorder:
            from initiator.pcap import PcapRecorder
            recorder = PcapRecorder(path, local=local, remote=remote, append=append)
            if stream and self._pcap_hold is None:
                # Held until the session closes: a FIFO's reader would see the end of the
                # stream when one connection's recorder closes, and stop before the next.
                self._pcap_hold = open_for_writing(path, truncate=False)
            return recorder
        return factory

    async def _run_login(self, conn: Connection, exchanges: list[int]
                         ) -> LoginSuccess | LoginRedirect:
        machine = LoginMachine(
            initiator_name=self.config.initiator_name,
            initiator_alias=self.config.initiator_alias,
            target_name=None if self.discovery else self.target_name,
            isid=self.config.isid,
            tsih=0,
            credentials=self.config.credentials,
            header_digest=self.config.header_digest,
            data_digest=self.config.data_digest,
            overrides=self.config.negotiation,
            portal=conn.portal,
        )
        request = machine.start()
        exchanges[1] = 0
        while True:
            conn.send_pdu(request)
            try:
                response = await conn.next_pdu()
            except ConnectionFailed as exc:
                # A portal that hangs up on a login request without a Login Response is
                # no iSCSI portal, or one whose target will not say why (tgt with no target
                # this initiator may see).
                raise ConnectionFailed(
                    f"{exc} during the login, without a Login Response: check that "
                    f"{conn.portal} is an iSCSI portal and that the target admits initiator "
                    f"{self.config.initiator_name}") from None
            except RemoteProtocolError as exc:
                # Bytes that are no PDU at all: likely another service on that port.
                raise type(exc)(f"login to {self.target_name or 'discovery'} at {conn.portal}: "
                                f"{exc}") from None
            exchanges[0] += 1
            exchanges[1] += 1
            result = machine.receive(response)
            if isinstance(result, P.LoginRequest):
                request = result
                continue
            return result

    def _start_full_feature(self, conn: Connection, login: LoginSuccess) -> None:
        params = login.parameters
        self.parameters = params
        self.tsih = login.tsih
        self._policy.default_time2wait = float(params.default_time2wait)
        self.target_alias = params.target_alias
        self.target_portal_group_tag = params.target_portal_group_tag
        core = ConnectionCore(
            TransferParameters(
                header_digest=params.header_digest, data_digest=params.data_digest,
                max_recv_data_segment_length=params.max_recv_data_segment_length,
                max_xmit_data_segment_length=params.max_xmit_data_segment_length,
                first_burst_length=params.first_burst_length,
                max_burst_length=params.max_burst_length,
                immediate_data=params.immediate_data, initial_r2t=params.initial_r2t,
                max_outstanding_r2t=params.max_outstanding_r2t,
                data_pdu_in_order=params.data_pdu_in_order,
                data_sequence_in_order=params.data_sequence_in_order),
            cmd_sn=login.cmd_sn, exp_stat_sn=login.exp_stat_sn, exp_cmd_sn=login.exp_cmd_sn,
            max_cmd_sn=login.max_cmd_sn, target=self.label,
            now=asyncio.get_running_loop().time(),
            noop_interval=self.config.noop_interval, noop_timeout=self.config.noop_timeout,
            command_timeout=self.config.command_timeout, tmf_timeout=self.config.tmf_timeout,
            counters=self.counters)
        first = self.state is SessionState.LOGGING_IN
        if not first:
            conn.on_failure = lambda err: self._connection_failed(conn, err)
        conn.on_event = self._core_event
        self._conn = conn
        self._core = core
        conn.start_full_feature(core)
        if conn.error is not None:
            # PDUs that came with the last Login Response broke the connection at once. A
            # first login fails with that error; a reconnect's _connection_failed has taken
            # the pending commands and goes on recovering.
            if first:
                self._conn = self._core = None
                raise conn.error
            return
        conn.on_failure = lambda err: self._connection_failed(conn, err)
        self._failed_error = None
        pending, self._pending = self._pending, []
        now = asyncio.get_running_loop().time()
        self._policy.logged_in(now, waiting=bool(pending))

        def commands_out() -> None:
            asyncio.get_running_loop().call_soon(self._tell_logged_in, conn)

        waits = core.submit_backlog(pending, now, commands_out)
        # On the wire before anyone is told: the state's watchers (the daemon's journal,
        # paths, metrics) take tens of milliseconds under load, and on a faulty link every
        # reconnect would pay them before its first command (docs/faults.md). When the
        # commands wait for the window (a ping's answer), they are told once the commands
        # are out: call_soon runs after the flush that follows the answer.
        conn.flush()
        if self._conn is not conn:
            return   # the send failed: _connection_failed took the commands back
        self._set_state(SessionState.LOGGED_IN, tell=not waits)
        if pending:
            recovery_log.info("%s: re-issued %d command(s) after reconnecting", self.label,
                              len(pending))
        self._arm_policy()   # with commands waiting, the outage goes on until one completes

    # -- commands --------------------------------------------------------------------------

    def submit(
        self,
        lun: int,
        cdb: bytes,
        *,
        data_out: Buffers | None = None,
        data_in: Buffers | None = None,
        on_done: CompletionCallback,
    ) -> Task:
        """Queue a SCSI command; ``on_done`` gets its result or a typed error, exactly once.

        Never blocks and creates no Task. During recovery the command waits for the new
        connection; after the replacement timeout it fails at once.
        """
        # A copy unless it is bytes already (the dispatcher's are: no call for those).
        task = Task(lun, cdb if cdb.__class__ is bytes else bytes(cdb), data_out, data_in,
                    on_done)
        core = self._core
        conn = self._conn
        # The common case first, in one test: logged in, nothing closing or failed. It takes
        # the same branch as the checks below would.
        if self.state is _LOGGED_IN and not self._closing and self._failed_error is None and \
                core is not None and conn is not None and not core.logging_out:
            core.submit(task)
            if not conn._flush_scheduled:  # else this command goes out with the same flush
                conn.kick()
            return task
        if self._closing or self.state in (SessionState.CLOSED, SessionState.LOGGING_OUT):
            self._loop_call(on_done, SessionFailed(f"session to {self.label} is closed"))
            return task
        if self._failed_error is not None:
            self._loop_call(on_done, self._failed_error)
            return task
        if self.state is SessionState.LOGGED_IN and core is not None and \
                conn is not None and not core.logging_out:
            core.submit(task)
            conn.kick()
        else:
            self._pending.append(task)
        return task

    def hold_sends(self) -> None:
        """Hold the commands submitted from now on until :meth:`release_sends`, which sends them
        at once, in one ``sendmsg``. For a caller that submits in batches (the TCMU
        dispatcher's scan of its ring): without it a batch goes out only on the next loop
        iteration (:meth:`Connection.kick`), an iteration with nothing else to do, and after
        whatever else this one still runs. Always pair with :meth:`release_sends` (``finally``):
        the connection schedules no flush of its own meanwhile. Holds do not nest."""
        conn = self._conn
        if self._held is None and conn is not None and conn.hold_sends():
            self._held = conn

    def release_sends(self) -> None:
        """Send what was submitted since :meth:`hold_sends`."""
        conn = self._held
        if conn is not None:
            self._held = None
            conn.release_sends()

    def after_receive(self, callback: Callable[[], None]) -> bool:
        """Run ``callback`` once the PDUs the connection is receiving now are processed, in
        this loop iteration (True), or do nothing and return False when no read is under way
        (a completion from a timer, a failure, an abort). For a caller that batches work on
        completions (the TCMU dispatcher's one 4-byte write for a batch): called from an
        ``on_done``, it ends the batch with the read that completed it, where ``call_soon``
        would take one more loop iteration."""
        conn = self._conn
        return conn is not None and conn.after_receive(callback)

    async def execute(
        self,
        lun: int,
        cdb: bytes,
        *,
        data_out: Buffers | None = None,
        data_in: Buffers | None = None,
    ) -> CommandResult:
        """Run one SCSI command and return its status, sense and residual."""
        fut: asyncio.Future[CommandResult] = asyncio.get_running_loop().create_future()

        def done(result: CommandResult | ISCSIError) -> None:
            if fut.done():
                return
            if isinstance(result, ISCSIError):
                fut.set_exception(result)
            else:
                fut.set_result(result)

        self.submit(lun, cdb, data_out=data_out, data_in=data_in, on_done=done)
        return await fut

    async def abort_task(self, task: CommandHandle) -> P.TaskMgmtResponse:
        """ABORT TASK (RFC 7143 §11.5.1). The command's callback runs with TaskAborted."""
        if not isinstance(task, Task):
            raise LocalProtocolError(f"{task!r} is not a command of this session")
        if task in self._pending:
            self._pending.remove(task)
            if task.on_done is not None:
                on_done, task.on_done = task.on_done, None
                on_done(TaskAborted(f"command 0x{task.cdb[0]:02x} aborted before it was sent"))
            return P.TaskMgmtResponse(response=P.TMResponse.COMPLETE)
        return await self._tmf(lambda core, cb: core.abort_task(
            task, cb, deadline=self._deadline(self.config.tmf_timeout)))

    async def abort(self, task: CommandHandle) -> None:
        """End a command whatever it takes, and return once the target has let go of it.

        ABORT TASK, then LOGICAL UNIT RESET if the target refuses it or does not answer
        within ``tmf_timeout``, then a new connection (the escalation of
        :meth:`ConnectionCore.abort <initiator.session.ConnectionCore.abort>`, which the
        per-command deadline uses too). The command's ``on_done`` runs with
        :class:`TaskAborted`, or with its own result if that came first; it is not re-issued.
        """
        if not isinstance(task, Task):
            raise LocalProtocolError(f"{task!r} is not a command of this session")
        error = TaskAborted(f"command 0x{task.cdb[0]:02x} (LUN {task.lun}) to {self.label} "
                            "was aborted")
        if task in self._pending:
            self._pending.remove(task)
            if task.on_done is not None:
                on_done, task.on_done = task.on_done, None
                on_done(error)
            return
        core, conn = self._core, self._conn
        if core is None or conn is None or task.on_done is None:
            return   # completed, or failed with its connection
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()

        def out_of_the_targets_hands() -> None:
            if not ended.done():
                ended.set_result(None)

        core.abort(task, loop.time(), error, out_of_the_targets_hands)
        conn.kick()
        conn.arm_timer()
        await ended

    async def task_management(self, function: P.TMFunction, lun: int) -> P.TaskMgmtResponse:
        """ABORT TASK SET, LOGICAL UNIT RESET, TARGET WARM RESET, ..."""
        return await self._tmf(lambda core, cb: core.task_management(
            function, lun, cb, deadline=self._deadline(self.config.tmf_timeout)))

    async def lun_reset(self, lun: int) -> P.TaskMgmtResponse:
        return await self.task_management(P.TMFunction.LOGICAL_UNIT_RESET, lun)

    async def _tmf(self, send: Callable[[ConnectionCore, Callable[[Any], None]], None]
                   ) -> P.TaskMgmtResponse:
        response = await self._control(send)
        if not isinstance(response, P.TaskMgmtResponse):
            raise LocalProtocolError("unexpected answer to task management")
        return response

    async def _control(self, send: Callable[[ConnectionCore, Callable[[Any], None]], None]
                       ) -> P.PDU:
        core, conn = self._core, self._conn
        if core is None or conn is None or self.state is not SessionState.LOGGED_IN:
            raise SessionFailed(f"session to {self.label} is not logged in ({self.state.value})")
        fut: asyncio.Future[P.PDU] = asyncio.get_running_loop().create_future()

        def done(result: P.PDU | ISCSIError) -> None:
            if fut.done():
                return
            if isinstance(result, ISCSIError):
                fut.set_exception(result)
            else:
                fut.set_result(result)

        send(core, done)
        conn.kick()
        conn.arm_timer()   # the request's deadline
        return await fut

    def _deadline(self, timeout: float) -> float | None:
        return asyncio.get_running_loop().time() + timeout if timeout > 0 else None

    async def text(self, text: bytes) -> bytes:
        """One text exchange in Full Feature Phase; returns the whole answer. Bounded by
        ``command_timeout``."""
        timeout = self.config.command_timeout
        try:
            response = await self._control(lambda core, cb: core.text_request(
                text, cb, deadline=self._deadline(timeout)))
        except CommandTimeout:
            # The core knows the deadline, not the bound it came from: name it, so that a
            # person knows which setting gave up (hbactl discover waited 30 s "in time").
            raise CommandTimeout(
                f"target {self.label} did not answer our Text Request within the command "
                f"timeout of {timeout:g} s; check the target's logs") from None
        return bytes(response.data)

    async def ping(self, data: bytes = b"") -> float:
        """NOP-Out ping; returns the round-trip time in seconds."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        await self._control(lambda core, cb: core.ping(loop.time(), cb, data))
        return loop.time() - start

    # -- events and recovery -----------------------------------------------------------------

    def _core_event(self, event: Event) -> None:
        self.events.append(event)
        if len(self.events) > 100:
            del self.events[:50]
        if self.on_event is not None:
            self.on_event(event)
        conn = self._conn
        if event.kind is EventKind.CONNECTION_DROP and conn is not None:
            recovery_log.warning("%s: target announced it will drop the connection", self.label)
            self._connection_failed(conn, ConnectionFailed(
                f"target {self.label} asked to drop the connection"), time2wait=event.seconds)
        elif event.kind is EventKind.LOGOUT_REQUESTED and conn is not None:
            recovery_log.warning("%s: target requested logout; logging in again", self.label)
            self._spawn(self._logout_and_relogin(conn))
        elif event.kind is EventKind.LOGGED_OUT:
            # At most 3600 s by the field's range (§11.15.2); the policy caps it further.
            self._policy.logged_out(float(min(event.seconds, 3600)))
        elif event.kind is EventKind.RENEGOTIATE:
            self._spawn(self._renegotiate())
        elif event.kind is EventKind.SCSI_EVENT:
            log.info("%s: SCSI asynchronous event on LUN %d, sense %s", self.label, event.lun,
                     event.sense.hex())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a background task of the session, kept referenced, never failing silently."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    async def _logout_and_relogin(self, conn: Connection) -> None:
        # Async logout request (§11.9.1, AsyncEvent 1): log out within Parameter3 seconds;
        # the commands not yet complete are re-issued on the next login, which waits the
        # Time2Wait of the Logout Response (§11.15.2), noted from its LOGGED_OUT event: the
        # target may close the connection before this task runs again.
        with contextlib.suppress(ISCSIError):
            await self._control(lambda core, cb: core.logout(
                cb, deadline=self._deadline(self.config.logout_timeout)))
        if self._conn is conn:
            self._connection_failed(conn, ConnectionFailed(
                f"target {self.label} requested a logout"))

    async def _renegotiate(self) -> None:
        # Async negotiation request (AsyncEvent 4): the only key that may change in Full Feature
        # Phase with one connection is MaxRecvDataSegmentLength (§13.12); restate ours.
        params = self.parameters
        if params is None:
            return
        with contextlib.suppress(ISCSIError):
            await self.text(f"MaxRecvDataSegmentLength={params.max_recv_data_segment_length}\0"
                            .encode())

    def _connection_failed(self, conn: Connection, error: ISCSIError,
                           time2wait: int | None = None) -> None:
        if conn is not self._conn:
            return
        conn.on_failure = None
        if conn.error is None:
            conn.fail(error)   # first: the reader lets go of the commands' buffers
        core = self._core
        self._conn = None
        self._core = None
        now = asyncio.get_running_loop().time()
        worked = False
        if core is not None:
            worked = core.stats_answered > 0
            unfinished = core.take_unfinished()
            # Given up (_fail_session drops the connection it logged in again): the session's
            # error, which says why, is what every command gets (_fail_pending), not another.
            self._pending = (unfinished if self._failed_error is not None else
                             self._still_due(unfinished, now, error)) + self._pending
        if self._closing or self.state in (SessionState.CLOSED, SessionState.LOGGING_OUT):
            self._fail_pending(SessionFailed(f"session to {self.label} closed"))
            return
        if self._failed_error is not None and not self._pending and \
                not self.config.reconnect_forever:
            return   # given up: nothing more to recover
        self.counters.connection_lost(error)
        recovery_log.warning("%s: connection failed (%s); recovering", self.label, error)
        self._policy.connection_lost(now, str(error), worked=worked, waiting=bool(self._pending),
                                     time2wait=time2wait)
        if self._failed_error is None:
            self._set_state(SessionState.RECOVERING)
        else:
            self._fail_pending(self._failed_error)
        self._arm_policy()

    def _still_due(self, tasks: list[Task], now: float, error: ISCSIError) -> list[Task]:
        """The commands of a lost connection that are to be re-issued: not those lost with
        connection after connection for longer than the replacement timeout (one that breaks
        every connection it is sent on would be retried forever while others complete).
        Those end with an error that says why the last connection was lost (``error``): the
        count of connections alone would not tell a person what the target did."""
        due: list[Task] = []
        for task in tasks:
            if task.reissues == 1:
                task.lost_at = now
            elif self._policy.command_expired(task.lost_at, now):
                if task.on_done is not None:
                    on_done, task.on_done = task.on_done, None
                    task.data_in = task.data_out = None
                    on_done(SessionFailed(
                        f"command 0x{task.cdb[0]:02x} (LUN {task.lun}) to {self.label} was "
                        f"lost with {task.reissues} connections in a row over "
                        f"{now - task.lost_at:.0f} s, beyond the replacement timeout of "
                        f"{self.config.replacement_timeout:g} s; the last connection "
                        f"ended with: {error}"))
                continue
            due.append(task)
        return due

    # The policy's timer and the attempts it asks for.

    def _arm_policy(self) -> None:
        if self._policy_timer is not None:
            self._policy_timer.cancel()
            self._policy_timer = None
        when = self._policy.get_timer()
        if when is not None and not self._closing:
            self._policy_timer = asyncio.get_running_loop().call_at(when, self._on_policy_timer)

    def _on_policy_timer(self) -> None:
        self._policy_timer = None
        if self._closing:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        core = self._core
        if core is not None and core.stats_answered:
            self._policy.working(now)
        action = self._policy.handle_timer(now)
        if action is Action.GIVE_UP:
            self._give_up()
        elif action is Action.CONNECT:
            self._attempt = loop.create_task(self._attempt_login())
            self._attempt.add_done_callback(self._attempt_done)
        self._arm_policy()

    async def _attempt_login(self) -> None:
        # The outage's count, the one give_up_message() says: a reconnect that logged in but
        # completed nothing does not end the outage, nor restart the numbering (the policy's
        # ``attempts``, the backoff's exponent, starts over with every login).
        attempt = self._policy.outage_attempts
        try:
            await self._connect_and_login()
        except Exception as exc:
            # Whatever failed (a typed error, or anything else from name resolution, a
            # socket or a bug) is one failed attempt, retried as the policy says.
            if self._closing:
                return
            reason = str(exc) if isinstance(exc, ISCSIError) else \
                f"{type(exc).__name__}: {exc}"
            self.counters.login_failed(exc)
            recovery_log.info("%s: reconnect attempt %d failed: %s", self.label, attempt,
                              reason)
            self._policy.attempt_failed(asyncio.get_running_loop().time(), reason)
            self._arm_policy()
            return
        if self._conn is not None and self.state is SessionState.LOGGED_IN:
            self.reconnects += 1
            recovery_log.info("%s: session reinstated after %d attempt(s)", self.label,
                              attempt)

    def _attempt_done(self, task: asyncio.Task[None]) -> None:
        if self._attempt is task:
            self._attempt = None
        if not task.cancelled() and task.exception() is not None and not self._closing:
            exc = task.exception()
            self._policy.attempt_failed(asyncio.get_running_loop().time(),
                                        f"{type(exc).__name__}: {exc}")
        self._background_done(task)
        self._arm_policy()

    def _background_done(self, task: asyncio.Task[None]) -> None:
        """A task of the session ended: one that died of an exception must not leave the
        session recovering forever, or anything silently undone. Its error becomes the
        session's."""
        self._background.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None or self._closing:
            return
        error = SessionFailed(f"recovery of the session to {self.label} failed: "
                              f"{type(exc).__name__}: {exc}")
        log.error("%s", error)
        self._fail_session(error)

    def _give_up(self) -> None:
        """The replacement timeout has passed without a working session: fail what waits."""
        error = SessionFailed(self._policy.give_up_message(self.label))
        self.counters.give_ups += 1
        # Every waiting command gets the error, and the state change (FAILED) carries it to
        # whoever watches (the daemon's journal logs it as an error, hbactl prints it as its
        # one error): here it is detail, which at -v would print the same sentence twice.
        log.debug("%s", error)
        self._fail_session(error)

    def _fail_session(self, error: SessionFailed) -> None:
        self._failed_error = error
        self._set_state(SessionState.FAILED)
        self._fail_pending(error)
        conn = self._conn
        if conn is not None:
            # Logged in again, but the target completed no command since: drop the connection
            # and fail its commands too.
            self._connection_failed(conn, error)
            self._fail_pending(error)
        if not self.config.reconnect_forever:
            self._policy.stop()
            attempt, self._attempt = self._attempt, None
            if attempt is not None:
                attempt.cancel()
            if self._policy_timer is not None:
                self._policy_timer.cancel()
                self._policy_timer = None

    def _fail_pending(self, error: ISCSIError) -> None:
        pending, self._pending = self._pending, []
        for task in pending:
            task.data_in = None
            task.data_out = None
            if task.on_done is not None:
                on_done, task.on_done = task.on_done, None
                on_done(error)

    def _set_state(self, state: SessionState, *, tell: bool = True) -> None:
        if state is self.state:
            return
        self.state = state
        if tell and self.on_state is not None:
            self.on_state(state)

    def _tell_logged_in(self, conn: Connection) -> None:
        """Tell the watchers of the login on ``conn`` that _start_full_feature kept from them
        until its re-issued commands were out; not if the connection failed meanwhile (they
        were told of that, and the session never worked on it)."""
        if self._conn is conn and self.state is SessionState.LOGGED_IN and \
                self.on_state is not None:
            self.on_state(SessionState.LOGGED_IN)

    def _loop_call(self, on_done: CompletionCallback, error: ISCSIError) -> None:
        asyncio.get_running_loop().call_soon(on_done, error)

    # -- logout ----------------------------------------------------------------------------

    async def logout(self, timeout: float | None = None) -> None:
        """Orderly logout (RFC 7143 §11.14): wait for outstanding commands, log out, close;
        within ``timeout`` (default ``logout_timeout``) in all."""
        if self.state in (SessionState.CLOSED,):
            return
        if timeout is None:
            timeout = self.config.logout_timeout
        self._closing = True
        self._stop_recovery()
        core, conn = self._core, self._conn
        if core is not None and conn is not None and self.state is SessionState.LOGGED_IN:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while core.in_flight and loop.time() < deadline and conn.error is None:
                await asyncio.sleep(0.01)
            self._set_state(SessionState.LOGGING_OUT)
            fut: asyncio.Future[P.PDU] = loop.create_future()

            def done(result: P.PDU | ISCSIError) -> None:
                if not fut.done():
                    fut.set_result(result) if isinstance(result, P.PDU) else \
                        fut.set_exception(result)

            try:
                if conn.error is not None:
                    raise conn.error
                core.logout(done, deadline=max(deadline, loop.time() + 0.1))
                conn.kick()
                conn.arm_timer()
                await fut
            except ISCSIError as exc:
                log.info("%s: logout did not complete cleanly: %s", self.label, exc)
        await self.close()

    async def close(self) -> None:
        """Drop the connection without logging out; fail whatever is outstanding."""
        self._closing = True
        self._stop_recovery()
        conn, core = self._conn, self._core
        self._conn = None
        self._core = None
        if conn is not None:
            # First the connection: the reader lets go of the views it receives into, so no
            # byte lands in a buffer whose command has been reported failed.
            conn.close()
        if core is not None:
            core.fail_all(SessionFailed(f"session to {self.label} was closed"))
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(conn.closed), 2)
        self._fail_pending(SessionFailed(f"session to {self.label} was closed"))
        if self._pcap_hold is not None:
            os.close(self._pcap_hold)
            self._pcap_hold = None
        self._set_state(SessionState.CLOSED)

    def _stop_recovery(self) -> None:
        if self._policy_timer is not None:
            self._policy_timer.cancel()
            self._policy_timer = None
        if self._attempt is not None:
            self._attempt.cancel()
            self._attempt = None
        for task in list(self._background):
            if task is not asyncio.current_task():
                task.cancel()

    # -- introspection -----------------------------------------------------------------------

    @property
    def failure(self) -> SessionFailed | None:
        """Why the session is FAILED (the error its waiting commands got), else None."""
        return self._failed_error

    @property
    def in_flight(self) -> int:
        core = self._core
        return (core.in_flight if core is not None else 0) + len(self._pending)

    @property
    def command_window(self) -> tuple[int, int, int] | None:
        """(CmdSN, ExpCmdSN, MaxCmdSN) of the current connection (§4.2.2.1), None without one:
        the next CmdSN to send and the target's window."""
        core = self._core
        return None if core is None else (core.cmd_sn, core.exp_cmd_sn, core.max_cmd_sn)

    def stats(self) -> dict[str, int]:
        core = self._core
        return {
            "commands": core.stats_commands if core else 0,
            "bytes_in": core.stats_bytes_in if core else 0,
            "bytes_out": core.stats_bytes_out if core else 0,
            "in_flight": self.in_flight,
            "reconnects": self.reconnects,
        }

    async def __aenter__(self) -> Session:
        if self.state is SessionState.NEW:
            await self.login()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.logout()


async def open_session(
    portal: Portal,
    target_name: str,
    config: SessionConfig | None = None,
    *,
    pcap_path: str | None = None,
) -> Session:
    """Log in to ``target_name`` at ``portal`` and return the session in Full Feature Phase."""
    session = Session(portal, target_name, config, pcap_path=pcap_path)
    await session.login()
    return session


def _first_bytes(bufs: Sequence[P.Buffer], n: int) -> list[P.Buffer]:
    out: list[P.Buffer] = []
    for b in bufs:
        if n <= 0:
            break
        if len(b) <= n:
            out.append(b)
            n -= len(b)
        else:
            out.append(memoryview(b)[:n])
            n = 0
    return out


def _reason(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown reason"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno) if exc.errno in errno.errorcode else str(exc)
    return str(exc) or type(exc).__name__


__all__ = [
    "Connection", "LoginError", "Portal", "ProtocolError", "Session", "SessionConfig",
    "SessionState", "default_initiator_name", "open_session", "random_isid",
]
