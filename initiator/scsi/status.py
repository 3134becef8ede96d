"""What a completed command's status means: an error, a retry, or the bytes it moved.

* :class:`ScsiCommandError` is how every command that reached the target and failed ends; its
  message names the command, the status, the sense key and the ASC/ASCQ in words, the failing
  LBA or CDB field, and what to check.
* :func:`check_result` raises it unless the status is GOOD (or a sense key that still means
  success); :func:`retryable` says whether, and how soon, the Linux midlayer would retry.
* :func:`check_transfer` holds a command to the length its buffer expects (RFC 7143 §11.4.5
  residuals), so a short read never passes for a whole one.
"""

from __future__ import annotations

import enum

from initiator.command import CommandResult, ScsiStatus
from initiator.errors import CommandError, TransferError
from initiator.scsi.asc import asc_hint
from initiator.scsi.cdb import describe_cdb
from initiator.scsi.data import ScsiDataError
from initiator.scsi.sense import Sense, SenseKey, parse_sense

__all__ = ["Retry", "ScsiCommandError", "check_result", "check_transfer", "retryable"]


class ScsiCommandError(CommandError):
    """A SCSI command reached the target and completed with a status other than GOOD.

    Carries the wire codes: ``status`` (a :class:`ScsiStatus` when known), and, for CHECK
    CONDITION with sense data, ``sense_key``, ``asc``, ``ascq`` and the parsed ``sense``.
    ``hint`` is a sentence saying what to check, when there is something useful to say.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        sense: Sense | None = None,
        cdb: bytes = b"",
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status: ScsiStatus | int = _status_enum(status)
        self.sense = sense
        self.sense_key: SenseKey | None = sense.sense_key if sense is not None else None
        self.asc: int | None = sense.asc if sense is not None else None
        self.ascq: int | None = sense.ascq if sense is not None else None
        self.cdb = bytes(cdb)
        self.hint = hint

    @classmethod
    def from_status(
        cls,
        cdb: bytes,
        status: int,
        sense: bytes = b"",
        *,
        where: str | None = None,
    ) -> ScsiCommandError:
        """Build the error for ``cdb`` that completed with ``status`` and ``sense`` data.

        ``where`` names the LUN for the message, e.g. ``"iqn.2003-01.org.x:t1 LUN 0"``.
        """
        what = describe_cdb(cdb)
        prefix = f"{where}: " if where else ""
        status_enum = _status_enum(status)
        if status_enum != ScsiStatus.CHECK_CONDITION:
            words = _status_words(status)
            hint = _STATUS_HINTS.get(status)
            message = f"{prefix}{what} failed: status {words} (0x{status:02X})"
            if hint:
                message += f"; {hint}"
            return cls(message, status=status, cdb=cdb, hint=hint)
        if not sense:
            message = f"{prefix}{what} failed: CHECK CONDITION without sense data"
            return cls(message, status=status, cdb=cdb)
        try:
            parsed = parse_sense(sense)
        except ScsiDataError as exc:
            message = f"{prefix}{what} failed: CHECK CONDITION with unreadable sense data ({exc})"
            return cls(message, status=status, cdb=cdb)
        message = f"{prefix}{what} failed: {parsed.description}"
        detail = _sense_detail(parsed)
        if detail:
            message += f" {detail}"
        hint = asc_hint(parsed.asc, parsed.ascq)
        if hint:
            message += f"; {hint}"
        return cls(message, status=status, sense=parsed, cdb=cdb, hint=hint)


def check_result(cdb: bytes, result: CommandResult, *, where: str | None = None) -> None:
    """Raise :class:`ScsiCommandError` unless ``result`` is GOOD or CONDITION MET.

    Sense data with sense key RECOVERED ERROR or COMPLETED is not an error either (the command
    did what was asked); everything else is.
    """
    if result.status in (ScsiStatus.GOOD, ScsiStatus.CONDITION_MET):
        return
    if result.status == ScsiStatus.CHECK_CONDITION and result.sense:
        try:
            key = parse_sense(result.sense).sense_key
        except ScsiDataError:
            key = None
        if key in (SenseKey.RECOVERED_ERROR, SenseKey.COMPLETED):
            return
    raise ScsiCommandError.from_status(cdb, result.status, result.sense, where=where)


class Retry(enum.Enum):
    """How the Linux SCSI midlayer retries a command that ended in a given condition."""

    NOW = "at once"
    LATER = "after a delay"


# NOT READY, LOGICAL UNIT NOT READY (04/xx) qualifiers that mean "in progress, try again":
# scsi_io_completion_action() of Linux 6.x retries them after a delay (04/0A, an ALUA state
# transition, too).
_NOT_READY_IN_PROGRESS = frozenset({
    0x01, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x11, 0x14, 0x1A, 0x1B, 0x1D, 0x24, 0x25})
# MEDIUM ERROR ASCs that are final (unrecovered read error, address mark not found, recorded
# entity not found); other medium errors are retried.
_MEDIUM_ERROR_FINAL = frozenset({0x11, 0x13, 0x14})


def retryable(result: CommandResult) -> Retry | None:
    """Whether, and how, to retry a command that ended with ``result``: as Linux does.

    The midlayer's rules (drivers/scsi/scsi_error.c ``scsi_decide_disposition`` and
    ``scsi_check_sense``, scsi_lib.c ``scsi_io_completion_action``): BUSY and TASK SET FULL
    after a delay; TASK ABORTED at once; for CHECK CONDITION, deferred errors, UNIT ATTENTION
    (a reset, a new I_T nexus after a session reinstatement, changed parameters), ABORTED
    COMMAND (but not a protection information error, 10/xx, or a command duration limit,
    2E/01-03) and MEDIUM ERROR other than an unrecovered read at once; NOT READY "in progress"
    after a delay. Everything else (ILLEGAL REQUEST, DATA PROTECT, HARDWARE ERROR,
    RESERVATION CONFLICT ...) is final: None.
    """
    status = result.status
    if status in (ScsiStatus.BUSY, ScsiStatus.TASK_SET_FULL):
        return Retry.LATER
    if status == ScsiStatus.TASK_ABORTED:
        return Retry.NOW
    if status != ScsiStatus.CHECK_CONDITION or not result.sense:
        return None
    try:
        sense = parse_sense(result.sense)
    except ScsiDataError:
        return None
    if sense.deferred:
        return Retry.NOW
    key, asc, ascq = sense.sense_key, sense.asc, sense.ascq
    if key == SenseKey.UNIT_ATTENTION:
        return Retry.NOW
    if key == SenseKey.ABORTED_COMMAND:
        if asc == 0x10 or (asc == 0x2E and 0x01 <= ascq <= 0x03):
            return None
        return Retry.NOW
    if key == SenseKey.NOT_READY:
        return Retry.LATER if asc == 0x04 and ascq in _NOT_READY_IN_PROGRESS else None
    if key == SenseKey.MEDIUM_ERROR:
        return None if asc in _MEDIUM_ERROR_FINAL else Retry.NOW
    return None


def check_transfer(cdb: bytes, result: CommandResult, expected: int, *, data_in: bool = True,
                   minimum: int | None = None, where: str | None = None) -> int:
    """How many bytes ``cdb`` moved; raise :class:`TransferError` unless it moved them all.

    ``expected`` is the size of the command's buffer. A read must fill it exactly, with no
    residual either way (RFC 7143 §11.4.5: an underflow leaves bytes that the target never
    sent, an overflow means the command addressed more data than the buffer holds, and a
    residual that contradicts the Data-In received means the target's lengths cannot be
    trusted): a short read never passes for a whole one, whatever the status. With
    ``minimum`` (commands that return "up to" their allocation length, like INQUIRY) any
    length from ``minimum`` up is fine: the bytes received are the target's data. With
    ``data_in=False`` it is a write: any residual means the target took less (or the command
    addressed more) than was sent.
    """
    residual = result.residual
    prefix = f"{where}: " if where else ""
    what = describe_cdb(cdb)
    if not data_in:
        if not residual:
            return expected
        taken = expected - residual if residual > 0 else expected
        message = (f"{prefix}{what} took only {taken} of the {expected} bytes sent (underflow "
                   f"residual {residual}): the write is incomplete" if residual > 0 else
                   f"{prefix}{what} addresses {-residual} bytes more than the {expected} sent "
                   "(overflow residual): has the LUN's block size changed?")
        raise TransferError(message, expected=expected, transferred=taken, residual=residual)
    got = result.data_in_length
    if minimum is not None:
        if got >= minimum:
            return got
        message = (f"{prefix}{what} returned {got} bytes ({_residual_words(residual)}); at "
                   f"least {minimum} are needed")
    elif got == expected and not residual:
        return got
    elif got == expected:
        message = (f"{prefix}{what} returned all {expected} bytes but reported an "
                   + (f"underflow residual of {residual}, which contradicts that"
                      if residual > 0 else
                      f"overflow residual of {-residual}: the command addresses more data "
                      "than was returned (has the LUN's block size changed?)"))
    else:
        if residual > 0 and got + residual == expected:
            why = f"underflow residual {residual}"
        elif residual > 0:
            why = (f"yet an underflow residual of {residual}, which does not add up: the "
                   "target's lengths are wrong")
        elif residual < 0:
            why = f"and an overflow residual of {-residual}"
        else:
            why = "and no underflow residual: the target's lengths are wrong"
        message = (f"{prefix}{what} returned only {got} of {expected} bytes with status "
                   f"{_status_words(result.status)} ({why}); the read is incomplete")
    raise TransferError(message, expected=expected, transferred=got, residual=residual)


def _residual_words(residual: int) -> str:
    if residual > 0:
        return f"underflow residual {residual}"
    if residual < 0:
        return f"overflow residual {-residual}"
    return "no residual"


def _status_enum(status: int) -> ScsiStatus | int:
    try:
        return ScsiStatus(status)
    except ValueError:
        return status


def _status_words(status: int) -> str:
    value = _status_enum(status)
    if isinstance(value, ScsiStatus):
        return value.name.replace("_", " ")
    return "unknown"


_STATUS_HINTS: dict[int, str] = {
    ScsiStatus.BUSY: "the target is busy; retry later",
    ScsiStatus.RESERVATION_CONFLICT: (
        "another initiator holds a reservation on this LUN (see PERSISTENT RESERVE IN)"
    ),
    ScsiStatus.TASK_SET_FULL: "the target's queue for this LUN is full; lower QueueDepth",
    ScsiStatus.TASK_ABORTED: "the command was aborted by another initiator or a reset",
}


def _sense_detail(sense: Sense) -> str:
    """Extra facts for an error message: the failing LBA, the offending CDB field."""
    if sense.information is not None and sense.sense_key in (
        SenseKey.MEDIUM_ERROR,
        SenseKey.RECOVERED_ERROR,
        SenseKey.HARDWARE_ERROR,
        SenseKey.MISCOMPARE,
    ):
        if sense.sense_key == SenseKey.MISCOMPARE:
            return f"at offset {sense.information}"
        return f"at LBA {sense.information}"
    pointer = sense.field_pointer
    if pointer is not None:
        in_cdb, byte, bit = pointer
        where = "CDB" if in_cdb else "parameter list"
        bit_text = f" bit {bit}" if bit is not None else ""
        return f"at byte {byte}{bit_text} of the {where}"
    progress = sense.progress
    if progress is not None:
        return f"({progress:.0%} done)"
    return ""
