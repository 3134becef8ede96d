"""The initiator's exceptions: one root, split by who is at fault.

Every exception carries a message a person can act on: what failed, against which target, and
what to check. Errors that correspond to something on the wire carry the wire code (login
status class/detail, reject reason, SCSI status and sense).
"""

from __future__ import annotations


class ISCSIError(Exception):
    """Root of every exception raised by the ``initiator`` package."""


class ProtocolError(ISCSIError):
    """A violation of RFC 7143."""


class LocalProtocolError(ProtocolError):
    """We were asked to do something the protocol forbids (a bug in the caller)."""


class RemoteProtocolError(ProtocolError):
    """The target sent something malformed or out of place."""


class PDUFormatError(RemoteProtocolError):
    """Bytes that do not decode as a well-formed PDU."""


class DigestError(RemoteProtocolError):
    """A header or data digest did not match (RFC 7143 §7.8)."""

    def __init__(self, message: str, *, header: bool) -> None:
        super().__init__(message)
        self.header = header


class NegotiationError(ISCSIError):
    """A text key could not be negotiated (RFC 7143 §6, §13)."""


class AuthenticationError(ISCSIError):
    """CHAP failed, on either side (RFC 7143 §12.1.3)."""


class ConfigurationError(ISCSIError):
    """Bad user input: a URL, a key value, an option."""


class ConnectionFailed(ISCSIError):
    """The TCP connection could not be made or was lost."""


class SessionFailed(ISCSIError):
    """The session could not be (re)established within the replacement timeout."""


class CommandError(ISCSIError):
    """A SCSI command could not be delivered or did not complete."""


class TaskAborted(CommandError):
    """The command was aborted by task management or by the target."""


class CommandTimeout(CommandError):
    """The command did not complete in time."""


class TransferError(CommandError):
    """A command completed without moving exactly the data asked for: a short read (residual
    underflow), an overflow, or Data-In whose length contradicts the residual the target
    reported (RFC 7143 §11.4.5). Carries the byte counts."""

    def __init__(self, message: str, *, expected: int, transferred: int, residual: int) -> None:
        super().__init__(message)
        self.expected = expected
        self.transferred = transferred
        self.residual = residual
