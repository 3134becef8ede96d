"""An iSCSI :class:`~initiator.transport.Session` as the dispatcher's ``CommandExecutor``.

A Session type-checks as a ``CommandExecutor`` by itself, but its ``abort_task`` and
``lun_reset`` *return* the target's Task Management Function Response, whatever it says. This
adapter passes ``submit`` and (as :class:`~initiator.command.SendBatching` and
:class:`~initiator.command.ReceiveBatching`) ``hold_sends``, ``release_sends`` and
``after_receive`` through untouched (the bound methods themselves: no extra call per command
or batch), ends an aborted
command through :meth:`Session.abort <initiator.transport.Session.abort>` — the one escalation
of the initiator, which the per-command deadline uses too: ABORT TASK, then LOGICAL UNIT RESET
if the target refuses or does not answer, then a new connection — and raises
:class:`TaskManagementFailed` when a LOGICAL UNIT RESET the kernel asked for is refused.
"""

from __future__ import annotations

from initiator import pdu as P
from initiator.command import CommandHandle
from initiator.errors import ISCSIError
from initiator.transport import Session

__all__ = ["SessionExecutor", "TaskManagementFailed"]


class TaskManagementFailed(ISCSIError):
    """The target answered a task management request with something other than success."""

    def __init__(self, message: str, response: int) -> None:
        super().__init__(message)
        self.response = response


def _response_name(code: int) -> str:
    try:
        return P.TMResponse(code).name.replace("_", " ").lower()
    except ValueError:
        return f"response {code}"


class SessionExecutor:
    """``CommandExecutor`` over one logged-in session (see the module docstring)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        # The bound methods themselves: the hot path pays no adapter call.
        self.submit = session.submit
        self.hold_sends = session.hold_sends
        self.release_sends = session.release_sends
        self.after_receive = session.after_receive

    async def abort_task(self, handle: CommandHandle) -> None:
        """End the command at the target (ABORT TASK, escalating as needed: see the module
        docstring); returns once the target has let go of it. Its ``on_done`` still runs."""
        await self.session.abort(handle)

    async def lun_reset(self, lun: int) -> None:
        """LOGICAL UNIT RESET; the session completes every command of ``lun`` it had sent."""
        answer = await self.session.lun_reset(lun)
        if answer.response != P.TMResponse.COMPLETE:
            raise TaskManagementFailed(
                f"target {self.session.label} refused LOGICAL UNIT RESET of LUN {lun}: "
                f"{_response_name(answer.response)}", answer.response)
