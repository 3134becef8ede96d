"""When to try again an ``Enable = on`` entry whose attach failed for a reason that may go away.

Theory of operation
-------------------
FreeBSD's iscsid keeps a configured session reconnecting until its target answers; the daemon
does the same for the entries it attaches at start (and after a reload). An attach that fails
for a reason that may go away with nobody changing anything (:func:`worth_retrying`: the
target is down, unreachable, or does not have the target yet) puts the entry in the
:class:`RetrySchedule`: it is tried again :data:`RETRY_FIRST` seconds later, and after every
further failure the wait doubles, up to :data:`RETRY_MAX`. A wrong secret or a refused
initiator is not retried: trying again would fail the same way, and might lock the account.
The entry leaves the schedule when it attaches (in the background or by ``hbactl attach``), is
detached, or is no longer enabled in the configuration.

Reading the configuration again (``systemctl reload iscsi-hba``, SIGHUP) tries every entry
still in the schedule at once and starts its backoff over (:meth:`RetrySchedule.restart`):
not only those whose entry changed. Whoever reloads has just fixed something — the entry, or
as often the target, the network or the secret on the target's side, which the daemon cannot
see — and asks it to look again; after up to :data:`RETRY_MAX` of waiting they would think
the fix did not work. open-iscsi does the same (``iscsiadm -m node -L all`` logs in at once
whatever its earlier attempts). The backoff is there to spare a target that stays down an
attempt every few seconds, not to make a person wait: one attempt per reload costs nothing.

The schedule does no I/O and reads no clock: it is told ``now`` (the event loop's time) with
every failure and keeps, per entry, the error a person sees in ``hbactl status``, the number of
attempts and the time of the next one. The daemon's glue (:meth:`hba.daemon.Daemon._retry`)
sleeps until then and makes the attempt.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hba.disks import DiskState, entry_row
from initiator.errors import (
    AuthenticationError,
    ConfigurationError,
    ISCSIError,
    LocalProtocolError,
    NegotiationError,
)
from initiator.login import LoginError, TargetNotFoundError

if TYPE_CHECKING:
    from hba.specs import LunSpec

__all__ = ["RETRY_FIRST", "RETRY_MAX", "Retry", "RetrySchedule", "worth_retrying"]

RETRY_FIRST = 5.0   # seconds before a failed Enable = on entry is tried again,
RETRY_MAX = 60.0    # doubling after each failure up to this


def worth_retrying(exc: ISCSIError) -> bool:
    """Whether an attach that failed with ``exc`` may succeed later with nothing changed."""
    if isinstance(exc, (AuthenticationError, ConfigurationError, NegotiationError,
                        LocalProtocolError)):
        return False
    if isinstance(exc, LoginError):
        # A target that is being set up answers "not found" until its LUNs exist.
        return exc.retryable or isinstance(exc, TargetNotFoundError)
    return True


@dataclass(slots=True)
class Retry:
    """One entry waiting for its next attempt."""

    spec: LunSpec
    error: str            # why the last attempt failed
    delay: float          # seconds from the last failure to the next attempt
    next_attempt: float   # in the clock of the ``now`` the schedule is given
    attempts: int = 1

    def describe(self, now: float, state: DiskState = DiskState.RETRYING) -> dict[str, Any]:
        """The row ``hbactl list``/``status`` show for the entry (``state``: as it ends)."""
        return entry_row(self.spec.name, self.spec.target, str(self.spec.portal),
                         self.spec.lun, state, error=self.error, attempts=self.attempts,
                         retry_in=round(max(0.0, self.next_attempt - now), 1))


class RetrySchedule(Mapping[str, Retry]):
    """The entries being retried, by nickname (read-only as a mapping; see the module
    docstring). ``first`` and ``maximum`` default to :data:`RETRY_FIRST` / :data:`RETRY_MAX`
    as they are when the schedule is made."""

    def __init__(self, first: float | None = None, maximum: float | None = None) -> None:
        self.first = RETRY_FIRST if first is None else first
        self.maximum = RETRY_MAX if maximum is None else maximum
        self._entries: dict[str, Retry] = {}

    def __getitem__(self, name: str) -> Retry:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def start(self, name: str, spec: LunSpec, error: str, now: float) -> Retry:
        """The first attach of ``name`` failed at ``now``: try again :attr:`first` s later."""
        retry = Retry(spec, error, delay=self.first, next_attempt=now + self.first)
        self._entries[name] = retry
        return retry

    def failed(self, name: str, error: str, now: float) -> Retry | None:
        """Another attempt failed at ``now``: wait twice as long (at most :attr:`maximum`;
        :attr:`first` after a :meth:`restart`). None when ``name`` left the schedule
        meanwhile."""
        retry = self._entries.get(name)
        if retry is None:
            return None
        retry.attempts += 1
        retry.error = error
        retry.delay = min(max(retry.delay * 2, self.first), self.maximum)
        retry.next_attempt = now + retry.delay
        return retry

    def restart(self, name: str, spec: LunSpec, now: float) -> Retry | None:
        """The configuration was read again at ``now`` (see the module docstring): try
        ``name`` at once, as its entry now says (``spec``), and should that fail, wait
        :attr:`first` again. None when ``name`` is not scheduled."""
        retry = self._entries.get(name)
        if retry is None:
            return None
        retry.spec = spec
        retry.delay = 0.0
        retry.next_attempt = now
        return retry

    def remove(self, name: str) -> Retry | None:
        """Stop retrying ``name``; its last state, or None when it was not scheduled."""
        return self._entries.pop(name, None)
