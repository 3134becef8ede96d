"""Sending payloads from shared memory without copying them: vmsplice(2) and splice(2).

Theory of operation
-------------------
``sendmsg`` copies every byte it sends into socket buffers. For a write through the daemon that
is the second copy of the data (the kernel already copied it into the TCMU data area), and in a
slow CPU (the kernel tier's TCG VM: about 3.7 ms of CPU per MiB, against 0.6 ms this way) it was
most of the daemon's time at 1 MiB sequential writes. open-iscsi's ``iscsi_tcp`` sends the
pages themselves (``sendpage``). The same is open to a process: ``vmsplice`` puts references to
the pages of a buffer into a pipe (no copy), and ``splice`` moves them from the pipe into the
socket, where the TCP stack keeps page references in its buffers (``tcp_sendpage``). Loopback
delivery keeps them too: only MSG_ZEROCOPY pages are copied on the way in
(``skb_orphan_frags_rx``), spliced pages are not.

:class:`Splicer` is one connection's pipe. :meth:`Splicer.load` puts a payload's pages into the
pipe, :meth:`Splicer.drain` moves them into the socket; what :meth:`Splicer.load` took counts as
sent from then on (the caller tells its queue so), and ``pending`` bytes of it are still in the
pipe: nothing else may go to the socket before they did, or the stream would interleave. Both
calls are non-blocking: a full pipe takes part of a payload, a full socket part of the pipe.

Which buffers: :func:`spliceable` ones, writable ``memoryview``\\s of an ``mmap`` (the TCMU data
area) of at least ``SPLICE_MIN`` bytes; a smaller payload costs less to copy than the two extra
system calls. Heap memory is not spliced: its pages belong to the allocator.

Page lifetime. The pipe and then the socket hold references to the pages, not copies: what is
sent is what the pages hold when TCP sends (or resends) them. That is the command's data for as
long as the command is outstanding, and a write completes to its caller only on the target's
answer — a SCSI Response, or a TMF Response for an abort — which the target sends after it read
every byte we sent before its request; TCP has then delivered them and will not resend them.
Two cases remain, both handled by the transport: a connection that fails with bytes still in
the pipe or the socket (commands are then re-issued elsewhere or failed, and their pages
reused), whose socket is closed abortively (``SO_LINGER`` 0: RST, the send queue dropped, so
nothing queued goes out later with other contents) and whose pipe is closed; and a target
that ends a command before reading its data (an early CHECK CONDITION, a Reject): the rest of
that command's Data-Out may then carry whatever the pages hold next, on the same connection to
the same target, in PDUs for a task the target has already ended — their framing is intact.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os

from initiator.pdu import Buffer

SPLICE_MIN = 32 * 1024
"""Payloads smaller than this are copied by ``sendmsg``."""
PIPE_SIZE = 1 << 20
"""Pipe capacity asked for (the default ``/proc/sys/fs/pipe-max-size``)."""

_F_SETPIPE_SZ = 1031
_SPLICE_F_NONBLOCK = 2


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_vmsplice = getattr(_libc, "vmsplice", None)
if _vmsplice is not None:
    _vmsplice.argtypes = [ctypes.c_int, ctypes.POINTER(_IOVec), ctypes.c_size_t, ctypes.c_uint]
    _vmsplice.restype = ctypes.c_ssize_t
AVAILABLE = _vmsplice is not None and hasattr(os, "splice")


def spliceable(buf: Buffer) -> bool:
    """Whether ``buf`` goes by :class:`Splicer` (see the module docstring)."""
    return type(buf) is memoryview and buf.nbytes >= SPLICE_MIN and \
        type(buf.obj) is mmap.mmap and not buf.readonly and buf.c_contiguous


class Splicer:
    """One socket's pipe for payloads sent without copying (see the module docstring)."""

    def __init__(self, sock_fd: int) -> None:
        self._sock_fd = sock_fd
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self._write_fd, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass   # the user's pipe quota is used up: the default size only costs more calls
        self.pending = 0
        """Bytes in the pipe, due on the socket before anything else."""
        self.loaded = 0
        """Bytes taken by :meth:`load` so far."""

    def load(self, buf: memoryview) -> int:
        """Put as much of ``buf`` as the pipe takes into it; the byte count (0: pipe full).

        Raises ``OSError`` when the kernel refuses the buffer (then nothing was taken)."""
        assert _vmsplice is not None
        address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        iov = _IOVec(address, buf.nbytes)
        n: int = _vmsplice(self._write_fd, ctypes.byref(iov), 1, _SPLICE_F_NONBLOCK)
        if n < 0:
            err = ctypes.get_errno()
            if err == errno.EAGAIN:
                return 0
            raise OSError(err, os.strerror(err))
        self.pending += n
        self.loaded += n
        return n

    def drain(self) -> int:
        """Move pipe bytes into the socket; the byte count. Raises ``BlockingIOError`` when the
        socket is full, ``OSError`` when it failed."""
        # No SPLICE_F_MORE: it would cork the last segment of a PDU the target waits for.
        n = os.splice(self._read_fd, self._sock_fd, self.pending, flags=_SPLICE_F_NONBLOCK)
        if n <= 0:
            # The pipe had bytes and has no other reader: only a full socket moves nothing.
            raise BlockingIOError(errno.EAGAIN, "socket full")
        self.pending -= n
        return n

    def close(self) -> None:
        """Drop the pipe and the page references it holds."""
        for fd in (self._read_fd, self._write_fd):
            if fd >= 0:
                os.close(fd)
        self._read_fd = self._write_fd = -1
        self.pending = 0
