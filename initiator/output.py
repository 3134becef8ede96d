"""Open a file to write that may be a FIFO nobody reads.

Theory of operation
-------------------
open(2) of a FIFO for writing blocks until a reader opens it (fifo(7)): a command told to put
its result (``hbactl read -o``, ``--pcap``, ``--histogram``) in a FIFO that nobody reads would
wait there for ever, after its login or its whole run. Opened with ``O_NONBLOCK``, the same
open fails at once with ENXIO when there is no reader and succeeds when there is one; the flag
is then cleared on that same descriptor, so that the writes block as usual when the reader is
slow. A pipe named as ``/dev/fd/N`` (process substitution, ``-o >(gzip > x.gz)``) has its
reader and opens as before; a regular file, a terminal or ``/dev/null`` ignore the flag.

Inputs are left alone: a FIFO opened for reading waits for its writer, as ``cat`` does.

Names derived from an output's name (``hbactl discover --luns --pcap x.pcap`` records the Nth
target's session in ``x.targetN.pcap``) are regular files whatever the output is: with a FIFO,
``/dev/stdout`` or another device the derived files would land beside it unasked.
:func:`not_a_file` says what such an output is, so that the command can refuse it up front;
:func:`is_stream` says whether names may be derived from it at all, so that a session's
capture stays one stream across reconnects instead (``initiator/pcap.py``).
"""

from __future__ import annotations

import errno
import os
import stat


class NoReader(OSError):
    """A FIFO to write has nobody reading it (ENXIO from a non-blocking open)."""

    def __init__(self, path: str) -> None:
        super().__init__(
            errno.ENXIO,
            f"nobody is reading the FIFO {path}; start its reader first (e.g. "
            f"`cat {path} > FILE &`) or give a regular file",
            path)


def open_for_writing(path: str, *, mode: int = 0o666, truncate: bool = True) -> int:
    """A blocking descriptor open for writing on ``path`` (created with ``mode`` if missing;
    truncated with ``truncate``), or :class:`NoReader` at once for a FIFO with no reader."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags | (os.O_TRUNC if truncate else 0), mode)
    except OSError as exc:
        if exc.errno == errno.ENXIO and _is_fifo(path):
            raise NoReader(path) from None
        raise
    os.set_blocking(fd, True)
    return fd


def not_a_file(path: str) -> str | None:
    """What ``path`` is when it exists and is not a regular file ("a FIFO", "a character
    device", ...; symbolic links followed, so ``/dev/stdout`` is what standard output is), or
    None for a regular file or a path that does not exist yet."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    for test, what in _KINDS:
        if test(mode):
            return what
    return None


def is_stream(path: str) -> bool:
    """Whether ``path`` is an output that only its own name reaches: not a regular file (a
    FIFO, a device), or a name of a descriptor already open (``/dev/stdout``, ``/dev/fd/N``,
    ``/proc/self/fd/N``, whatever it leads to). A name derived from it (``x.2.pcap``) would be
    a regular file beside it, or a name in ``/dev`` or ``/proc``, not that output."""
    return not_a_file(path) is not None or \
        os.path.abspath(path).startswith(("/dev/", "/proc/"))


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISDIR, "a directory"))


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False
