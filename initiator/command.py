"""What a SCSI command is to the initiator's users: its buffers in, its result out.

This is the contract between the iSCSI session and whoever submits commands (``hbactl``, the
TCMU dispatcher). Buffers are caller-owned ``memoryview``s: Data-In is received straight into
``data_in`` and Data-Out is sent straight from ``data_out``; the initiator never copies them and
drops every reference to them before it reports completion.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol, runtime_checkable

from initiator.errors import ISCSIError

Buffers = Sequence[memoryview]
"""A scatter/gather list: the views together form one contiguous logical buffer."""


class ScsiStatus(enum.IntEnum):
    """SAM-5 status codes (RFC 7143 §11.4.2)."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


class CommandResult(NamedTuple):
    """The outcome of a command that reached the target and got a status back.

    A NamedTuple rather than a frozen dataclass: one is made per command, and building a
    tuple costs a fraction of a frozen dataclass's ``__init__``.

    ``sense`` is the sense data exactly as the target sent it (fixed or descriptor format),
    empty when there is none. ``residual`` follows RFC 7143 §11.4.5: positive for underflow
    (that many bytes of the expected transfer did not happen), negative for overflow, zero
    otherwise; it describes Data-In for reads and bidirectional commands, Data-Out for writes.
    ``bidi_residual`` is the same for the read half of a bidirectional command.
    ``data_in_length`` is how many bytes of ``data_in`` the target actually filled.
    """

    status: int
    sense: bytes = b""
    residual: int = 0
    bidi_residual: int = 0
    data_in_length: int = 0

    @property
    def ok(self) -> bool:
        return self.status == ScsiStatus.GOOD


CompletionCallback = Callable[[CommandResult | ISCSIError], None]
"""Called exactly once per submitted command, from the event loop, with the result or with the
typed error that explains why the command could not be delivered."""


class CommandHandle(Protocol):
    """What ``submit`` returns: enough to abort the command later."""

    @property
    def itt(self) -> int: ...


class CommandExecutor(Protocol):
    """The submitting side of an iSCSI session, as the TCMU dispatcher sees it.

    ``submit`` never blocks and creates no asyncio Task; ``on_done`` runs later on the loop.
    ``data_out``/``data_in`` are None for commands without that direction; for bidirectional
    commands both are given.
    """

    def submit(
        self,
        lun: int,
        cdb: bytes,
        *,
        data_out: Buffers | None,
        data_in: Buffers | None,
        on_done: CompletionCallback,
    ) -> CommandHandle: ...

    async def abort_task(self, handle: CommandHandle) -> object:
        """ABORT TASK for one command (RFC 7143 §11.5.1); its on_done still runs."""
        ...

    async def lun_reset(self, lun: int) -> object:
        """LOGICAL UNIT RESET; every outstanding command of that LUN completes."""
        ...


@runtime_checkable
class SendBatching(Protocol):
    """What an executor may offer besides :class:`CommandExecutor`: holding its sends.

    Between ``hold_sends()`` and ``release_sends()`` submitted commands are queued, not sent;
    the release sends them together (one ``sendmsg`` for a whole ring scan). The dispatcher
    uses it when the executor has it (``isinstance``)."""

    def hold_sends(self) -> None: ...

    def release_sends(self) -> None: ...


@runtime_checkable
class ReceiveBatching(Protocol):
    """What an executor may offer besides :class:`CommandExecutor`: running a callback once
    the read from the target that is in progress has ended.

    ``after_receive(callback)`` returns False when no read is in progress (the caller then
    does the work its own way); else ``callback`` runs at the end of that read, once however
    many times it was given during it. The dispatcher writes the completions a read brought
    this way (``isinstance``)."""

    def after_receive(self, callback: Callable[[], None]) -> bool: ...
