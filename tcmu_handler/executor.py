"""An iSCSI :class:`~initiator.transport.Session` as the dispatcher's ``CommandExecutor``.

A Session type-checks as a ``CommandExecutor`` by itself, but its ``abort_task`` and
``lun_reset`` *return* the target's Task Management Function Response, whatever it says: the
dispatcher would take a refused ABORT TASK (REJECTED, NOT SUPPORTED, ...) for success and never
escalate to a LOGICAL UNIT RESET. This adapter passes ``submit`` through untouched (the bound
method itself: no extra call per command) and raises :class:`TaskManagementFailed` when the
target did not do what was asked.
"""

from __future__ import annotations

from initiator import pdu as P
from initiator.command import CommandHandle
from initiator.errors import ISCSIError
from initiator.transport import Session

__all__ = ["SessionExecutor", "TaskManagementFailed"]

# RFC 7143 §11.6.1: "Function complete", and for ABORT TASK "Task does not exist" (it had
# completed already: nothing left to abort).
_DONE = frozenset({P.TMResponse.COMPLETE, P.TMResponse.TASK_DOES_NOT_EXIST})


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
        # The bound method itself: the hot path pays no adapter call.
        self.submit = session.submit

    async def abort_task(self, handle: CommandHandle) -> None:
        """ABORT TASK (RFC 7143 §11.5.1); the command's ``on_done`` still runs."""
        answer = await self.session.abort_task(handle)
        if answer.response not in _DONE:
            raise TaskManagementFailed(
                f"target {self.session.label} refused ABORT TASK for ITT 0x{handle.itt:08x}: "
                f"{_response_name(answer.response)}", answer.response)

    async def lun_reset(self, lun: int) -> None:
        """LOGICAL UNIT RESET; the session completes every command of ``lun`` it had sent."""
        answer = await self.session.lun_reset(lun)
        if answer.response != P.TMResponse.COMPLETE:
            raise TaskManagementFailed(
                f"target {self.session.label} refused LOGICAL UNIT RESET of LUN {lun}: "
                f"{_response_name(answer.response)}", answer.response)
