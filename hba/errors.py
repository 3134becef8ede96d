"""The ``hba`` package's exceptions: one root, so callers can catch everything it raises.

Each message says what failed and what to do about it (a file and line, a command to run).
"""

from __future__ import annotations

EXIT_INTERRUPTED = 130
"""hbactl's exit status after Ctrl-C (128 + SIGINT, as shells report it)."""


class HBAError(Exception):
    """Root of every exception raised by the ``hba`` package."""


class AttachError(HBAError):
    """An attach could not be done; the message says why and what to check.

    ``retryable`` says whether the same attach may succeed later without anyone changing
    anything (the target is down, unreachable or not configured yet), as opposed to a wrong
    secret, a refused initiator or a local problem.
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class DetachError(HBAError):
    """A detach was refused or failed."""


class DiskBusyError(DetachError):
    """The disk is mounted or held (device-mapper, md, swap) and the detach was not forced."""


class NoSuchDiskError(DetachError):
    """No attached LUN goes by the name, device node or link given."""


class WorkerError(HBAError):
    """A worker process (:mod:`hba.workers`) died, or did not answer within its bound: what it
    was asked may be worth asking again once it is replaced."""
