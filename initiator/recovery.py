"""When to log in again after a lost connection, and when to give up: sans-I/O.

Theory of operation
-------------------
At ErrorRecoveryLevel 0 (RFC 7143 §6.3.5, §7.1.4) every failure of the one connection ends it,
and the session is *reinstated*: a new login with the same ISID and TSIH 0, after which the
commands that had not completed are issued again. :class:`RecoveryPolicy` decides the times of
that process; :class:`~initiator.transport.Session` does the I/O. Like the connection core it
never reads the clock: every method takes ``now``, :meth:`RecoveryPolicy.get_timer` says when
:meth:`RecoveryPolicy.handle_timer` must run next, and that returns what to do
(:class:`Action`).

The outage clock measures time without a *working* session. It starts when a connection is
lost and stops only when a command completes again on a later connection (or when a login
succeeds with no command waiting: there is nothing left to prove). A reconnect that logs in,
answers pings and breaks again before completing a command does not stop it, so a target that
breaks after every login, or after every command, cannot keep the commands waiting forever.
``replacement_timeout`` after its start the policy gives up (:attr:`Action.GIVE_UP`): the
waiting commands fail, with :meth:`RecoveryPolicy.give_up_message` saying why. This happens at
the deadline whatever is under way: while waiting, while a login attempt runs (the attempt is
abandoned) and while logged in but with no command answered yet (the connection is dropped).
With ``reconnect_forever`` (the daemon) the attempts go on after that, and the next login that
succeeds accepts commands again.

Waits before an attempt:

- after a lost connection, the target's Time2Wait (RFC 7143 §11.9.1 Async Message Parameter2,
  §11.15.2 Logout Response, else the negotiated DefaultTime2Wait, §13.15); up to 3600 s on the
  wire, but never beyond the replacement deadline (the attempt is then made at the deadline,
  which gives up first unless attempts go on forever). Without ``reconnect_forever``, a
  Time2Wait that reaches past the deadline gives up at once: no login could be made in time,
  and waiting out the deadline would only hold the caller. After a connection on which no command
  completed (made during the outage), at least 1 s: a target that breaks every connection at
  once is not hammered. It took a login, though: the next one is likely to work, and on a
  faulty link every second waited is a second without I/O (open-iscsi waits Time2Wait alone);
- after a failed attempt, a backoff doubling from 1 s to ``max_backoff`` (:data:`MAX_BACKOFF`,
  5 s: open-iscsi tries again every few seconds, and a path whose target is back must not
  wait long to return), again capped by the deadline. It starts over with every login that
  succeeds.

A command lost with several connections in a row is re-issued only within
``replacement_timeout`` of its first loss (:meth:`RecoveryPolicy.command_expired`), so a
command that breaks every connection it is sent on cannot be retried forever while other
commands keep the session working.
"""

from __future__ import annotations

import enum
import logging

__all__ = ["MAX_BACKOFF", "Action", "Phase", "RecoveryPolicy", "progress_log"]

progress_log = logging.getLogger(__name__)
"""Recovery as it goes, logged by the glue that carries it out: a lost connection, each
attempt, the reinstatement (:mod:`initiator.transport`), a command's deadline and its abort's
escalation (:mod:`initiator.session`). The daemon logs it; a one-shot ``hbactl`` keeps it behind
``-v`` (:func:`hba.cli.log_handler`), since its one error says what recovery tried
(:meth:`RecoveryPolicy.give_up_message`, the command timeout's error)."""


class Action(enum.Enum):
    """What :meth:`RecoveryPolicy.handle_timer` asks the transport to do."""

    CONNECT = "connect"
    """Start a login attempt now; report its outcome with ``attempt_failed`` or ``logged_in``."""
    GIVE_UP = "give up"
    """The replacement timeout has passed: fail what waits (``give_up_message`` says why), drop
    a connection that has not worked, abandon an attempt (unless ``reconnect_forever``)."""


class Phase(enum.Enum):
    LOGGED_IN = "logged in"
    WAITING = "waiting to reconnect"
    CONNECTING = "logging in again"


_MIN_BACKOFF = 1.0
MAX_BACKOFF = 5.0
"""The default longest wait between reconnect attempts, in seconds."""


class RecoveryPolicy:
    """The reinstatement policy of one session (see the module docstring)."""

    def __init__(self, replacement_timeout: float, *, reconnect_forever: bool = False,
                 default_time2wait: float = 2.0, max_backoff: float = MAX_BACKOFF) -> None:
        self.replacement_timeout = replacement_timeout
        self.reconnect_forever = reconnect_forever
        self.default_time2wait = default_time2wait
        """Time2Wait when the target named none: DefaultTime2Wait, negotiated at login."""
        self.max_backoff = max_backoff
        self.phase = Phase.LOGGED_IN
        self.outage_since: float | None = None
        """When the current outage began; None while the session works."""
        self.gave_up = False
        """The replacement timeout of the current outage has passed."""
        self.stopped = False
        """Nothing more to do: gave up without ``reconnect_forever``, or :meth:`stop`."""
        self.next_attempt = 0.0
        self.attempts = 0
        """Attempts since the last login that succeeded (the backoff's exponent)."""
        self.logins = 0
        """Logins that succeeded during the current outage."""
        self.outage_attempts = 0
        """Logins tried during the current outage: what the give-up message counts, and the
        number of each attempt in the transport's progress lines (one count per outage, from
        its start until a command completes again)."""
        self.cause = ""
        """Why the connection that started this outage was lost."""
        self.last_error = ""
        """Why the last attempt failed ("" when it logged in)."""
        self.last_break = ""
        """Why the last connection logged in during this outage broke before a command
        completed on it ("" when none did)."""
        self._time2wait: float | None = None
        self._reconnected = False
        self._hopeless: float | None = None
        """A Time2Wait that reaches past the deadline (give up now: module docstring)."""

    # -- what the transport reports --------------------------------------------------------

    def start(self, now: float, cause: str) -> None:
        """No login yet, and the first one is to be tried in the background, as recovery does
        (the daemon adopting a disk): the outage is already on."""
        self.outage_since = now
        self.cause = cause
        self.outage_attempts = 0
        self.phase = Phase.WAITING
        self.next_attempt = now

    def stop(self) -> None:
        """The session failed for good (or closes): no more timers, no more attempts."""
        self.stopped = True

    def logged_out(self, time2wait: float) -> None:
        """A Logout Response named the Time2Wait before the next login (§11.15.2)."""
        self._time2wait = time2wait

    def connection_lost(self, now: float, cause: str, *, worked: bool, waiting: bool,
                        time2wait: float | None = None) -> None:
        """The connection failed. ``worked``: a command completed on it. ``waiting``:
        commands wait for the next connection. ``time2wait``: what the target asked for
        (Async Message); else a Logout Response's, else DefaultTime2Wait."""
        if self.stopped:
            return
        self._hopeless = None
        # A connection made during an outage that completed nothing: the outage goes on.
        broke = not worked and self.phase is Phase.LOGGED_IN and self.outage_since is not None
        if worked or not waiting:
            self.outage_since = None
        if worked:
            self.attempts = 0
        if self.outage_since is None:
            self.outage_since = now
            self.cause = cause
            self.gave_up = False
            self.logins = 0
            self.outage_attempts = 0
            self.last_break = ""
        elif broke:
            self.last_break = cause
        if time2wait is None:
            time2wait = self._time2wait
        if time2wait is None:
            time2wait = self.default_time2wait
        self._time2wait = None
        self.phase = Phase.WAITING
        # Time2Wait is what the target needs before it takes a new login; after a reconnect
        # that completed nothing, a second at least (see the module docstring).
        self._schedule(now, max(time2wait, self._backoff(), _MIN_BACKOFF if broke else 0.0))
        deadline = self.deadline
        if not self.reconnect_forever and deadline is not None and now + time2wait >= deadline:
            self._hopeless = time2wait
            self.next_attempt = now

    def attempt_failed(self, now: float, error: str) -> None:
        """The login attempt that CONNECT started failed."""
        self.last_error = error
        self.phase = Phase.WAITING
        self._schedule(now, max(self._backoff(), _MIN_BACKOFF))  # attempts >= 1 after CONNECT

    def logged_in(self, now: float, *, waiting: bool) -> None:
        """A login succeeded; ``waiting``: commands wait for it (re-issued or new)."""
        self.phase = Phase.LOGGED_IN
        self.attempts = 0
        self._reconnected = self.outage_since is not None
        if self._reconnected:
            self.logins += 1
        self.gave_up = False
        self.last_error = ""
        if not waiting:
            self.outage_since = None

    def working(self, now: float) -> None:
        """A command completed: the session works, the outage (if any) is over."""
        self.outage_since = None
        self.attempts = 0

    # -- timer -------------------------------------------------------------------------------

    @property
    def deadline(self) -> float | None:
        """When the current outage reaches the replacement timeout (None: no outage)."""
        if self.outage_since is None:
            return None
        return self.outage_since + self.replacement_timeout

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must next run, or None."""
        if self.stopped:
            return None
        when: float | None = None
        if self.phase is Phase.WAITING:
            when = self.next_attempt
        deadline = self.deadline
        if deadline is not None and not self.gave_up:
            when = deadline if when is None else min(when, deadline)
        return when

    def handle_timer(self, now: float) -> Action | None:
        """What to do at ``now``: give up (first, at the deadline), or start an attempt."""
        if self.stopped:
            return None
        deadline = self.deadline
        if deadline is not None and not self.gave_up and (
                now >= deadline or self._hopeless is not None):
            self.gave_up = True
            self.stopped = not self.reconnect_forever
            return Action.GIVE_UP
        if self.phase is Phase.WAITING and now >= self.next_attempt:
            self.phase = Phase.CONNECTING
            self.attempts += 1
            self.outage_attempts += 1
            return Action.CONNECT
        return None

    # -- questions ---------------------------------------------------------------------------

    def command_expired(self, first_lost: float, now: float) -> bool:
        """Whether a command first lost with a connection at ``first_lost`` has been retried
        for as long as it may be (the replacement timeout)."""
        return now - first_lost >= self.replacement_timeout

    def give_up_message(self, label: str) -> str:
        """Why the session failed, for the error every waiting command gets."""
        if self._hopeless is not None:
            last = (f"; the target asked to wait {self._hopeless:g} s (Time2Wait) before "
                    "logging in again, which would end after the replacement timeout does")
        elif self.phase is Phase.LOGGED_IN and self._reconnected:
            last = "; it logged in again, but the target completed no command since"
        elif self.phase is Phase.CONNECTING:
            last = "; a login attempt was still under way" + (
                f", the one before failed: {self.last_error}" if self.last_error else "")
        elif self.last_error:
            last = f"; last attempt: {self.last_error}"
        elif self.logins:
            last = ""
        elif self.attempts:
            last = "; every reconnect failed again at once"
        else:
            last = "; the target's Time2Wait ran past it"
        # What recovery tried, and for how long: a one-shot hbactl shows its progress only
        # with -v, so this sentence is all a person sees of it.
        if self.logins and self.phase is Phase.WAITING and not self.last_error:
            return self._broke_message(label, last)
        tried = self.outage_attempts
        tries = f" in {tried} login attempt{'' if tried == 1 else 's'}" if tried else ""
        return (f"session to {label} could not be re-established{tries} within the "
                f"replacement timeout of {self.replacement_timeout:g} s (connection lost: "
                f"{self.cause}{last})")

    def _broke_message(self, label: str, after: str) -> str:
        """The give-up message when the last reconnect logged in and its connection broke
        before a command completed: the logins worked, so "could not be re-established" would
        send a person to the portal and the credentials instead of to what drops the
        connections (a target that closes each one after login, a faulty link)."""
        times = f"{self.logins} time{'' if self.logins == 1 else 's'}"
        tried = self.outage_attempts
        if tried > self.logins:
            times += f" in {tried} login attempts"
        last = (f"; the last one: {self.last_break}" if self.last_break else "") + after
        return (f"session to {label} logged in again {times} within the replacement timeout "
                f"of {self.replacement_timeout:g} s, but each connection broke before a "
                f"command completed (connection lost: {self.cause}{last})")

    # -- internals ---------------------------------------------------------------------------

    def _backoff(self) -> float:
        if self.attempts == 0:
            return 0.0
        return min(self.max_backoff, _MIN_BACKOFF * 2.0 ** (self.attempts - 1))

    def _schedule(self, now: float, wait: float) -> None:
        deadline = self.deadline
        if deadline is not None and not self.gave_up:
            wait = min(wait, max(0.0, deadline - now))
        else:
            wait = min(wait, self.max_backoff)
        self.next_attempt = now + wait
