"""initiator.recovery.RecoveryPolicy: when to log in again and when to give up.

The policy is sans-I/O: time is the ``now`` argument, and these tests drive it with a fake
clock, at the times its own ``get_timer`` names, as the transport does. Nothing sleeps.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from initiator.recovery import MAX_BACKOFF, Action, Phase, RecoveryPolicy

React = Callable[[float, Action], None]


def run(policy: RecoveryPolicy, until: float, react: React | None = None
        ) -> list[tuple[float, Action]]:
    """Fire the policy's timer at the times it asks for, up to ``until``; ``react`` plays the
    transport (an attempt's outcome, say). Returns the actions with their times."""
    actions: list[tuple[float, Action]] = []
    for _ in range(100_000):
        when = policy.get_timer()
        if when is None or when > until:
            return actions
        action = policy.handle_timer(when)
        if action is not None:
            actions.append((when, action))
            if react is not None:
                react(when, action)
    raise AssertionError("the policy's timer fires without time passing")


def failing(policy: RecoveryPolicy, error: str = "connection refused") -> React:
    """Every login attempt fails at once."""
    def react(now: float, action: Action) -> None:
        if action is Action.CONNECT:
            policy.attempt_failed(now, error)
    return react


def lost(policy: RecoveryPolicy, now: float, *, worked: bool = False, waiting: bool = True,
         time2wait: float | None = None) -> None:
    policy.connection_lost(now, "target closed the connection", worked=worked, waiting=waiting,
                           time2wait=time2wait)


def phase(policy: RecoveryPolicy) -> Phase:
    """The phase, read afresh (mypy would keep an earlier narrowing)."""
    return policy.phase


def test_first_attempt_after_default_time2wait() -> None:
    policy = RecoveryPolicy(120.0, default_time2wait=2.0)
    lost(policy, 10.0)
    assert policy.phase is Phase.WAITING and policy.get_timer() == 12.0
    assert policy.handle_timer(11.9) is None
    assert policy.handle_timer(12.0) is Action.CONNECT
    assert phase(policy) is Phase.CONNECTING
    assert policy.get_timer() == 130.0   # the give-up deadline while the attempt runs


@pytest.mark.parametrize("time2wait", [5.0, 3600.0, 65535.0])
def test_a_time2wait_past_the_replacement_deadline_gives_up_at_once(time2wait: float) -> None:
    # Async Message Parameter2 or a Logout Response may ask for up to an hour (or, malformed,
    # 18 h): no login could be made before the deadline, so the caller is not held until it.
    policy = RecoveryPolicy(5.0)
    lost(policy, 100.0, time2wait=time2wait)
    assert policy.get_timer() == 100.0
    actions = run(policy, 1e9)
    assert actions == [(100.0, Action.GIVE_UP)]
    assert policy.get_timer() is None and policy.stopped
    message = policy.give_up_message("iqn.x at h:3260")
    assert "re-established within the replacement timeout of 5 s" in message  # none tried
    assert f"asked to wait {time2wait:g} s (Time2Wait) before logging in again" in message
    assert "iqn.x at h:3260" in message and "target closed the connection" in message
    # Not "longer than that" (than the replacement timeout, it read, also for a Time2Wait
    # shorter than it that only the time left was too short for).
    assert "which would end after the replacement timeout does" in message


def test_a_time2wait_within_the_deadline_is_waited() -> None:
    policy = RecoveryPolicy(5.0)
    lost(policy, 100.0, time2wait=4.0)
    assert policy.get_timer() == 104.0
    assert run(policy, 104.0) == [(104.0, Action.CONNECT)]


def test_time2wait_capped_for_a_daemon_tries_at_the_deadline() -> None:
    policy = RecoveryPolicy(5.0, reconnect_forever=True)
    lost(policy, 100.0, time2wait=3600.0)
    actions = run(policy, 105.0)
    assert actions == [(105.0, Action.GIVE_UP), (105.0, Action.CONNECT)]


def test_logout_response_time2wait_applies_to_the_next_login_only() -> None:
    policy = RecoveryPolicy(120.0, default_time2wait=2.0)
    policy.logged_out(7.0)
    lost(policy, 0.0)
    assert policy.get_timer() == 7.0
    assert policy.handle_timer(7.0) is Action.CONNECT
    policy.logged_in(7.5, waiting=False)
    lost(policy, 50.0)
    assert policy.get_timer() == 52.0


def test_backoff_doubles_up_to_the_maximum_and_gives_up_on_time() -> None:
    policy = RecoveryPolicy(120.0, default_time2wait=0.0, max_backoff=30.0)
    lost(policy, 0.0)
    actions = run(policy, 1000.0, failing(policy))
    connects = [t for t, a in actions if a is Action.CONNECT]
    assert connects == [0.0, 1.0, 3.0, 7.0, 15.0, 31.0, 61.0, 91.0]
    assert actions[-1] == (120.0, Action.GIVE_UP)
    assert "last attempt: connection refused" in policy.give_up_message("t")
    assert "re-established in 8 login attempts within the replacement timeout of 120 s" in \
        policy.give_up_message("t")


def test_by_default_attempts_come_every_few_seconds() -> None:
    # A long outage must not stretch the wait: a target (or a multipath path) that is back
    # is found within seconds, as open-iscsi retries every few seconds.
    policy = RecoveryPolicy(120.0, default_time2wait=2.0)
    assert policy.max_backoff == MAX_BACKOFF == 5.0
    lost(policy, 0.0)
    connects = [t for t, a in run(policy, 60.0, failing(policy)) if a is Action.CONNECT]
    assert connects[:5] == [2.0, 3.0, 5.0, 9.0, 14.0]
    assert all(b - a == 5.0 for a, b in itertools.pairwise(connects[3:]))


def test_the_last_wait_is_cut_at_the_deadline() -> None:
    policy = RecoveryPolicy(10.0, default_time2wait=0.0)
    lost(policy, 0.0)
    actions = run(policy, 100.0, failing(policy))
    assert [t for t, a in actions if a is Action.CONNECT] == [0.0, 1.0, 3.0, 7.0]
    assert actions[-1] == (10.0, Action.GIVE_UP)


def test_gives_up_at_the_deadline_while_an_attempt_is_under_way() -> None:
    # A portal that drops our SYNs keeps an attempt running for the whole login timeout:
    # the deadline does not wait for it to end.
    policy = RecoveryPolicy(3.0, default_time2wait=0.0)
    lost(policy, 0.0)
    assert run(policy, 100.0) == [(0.0, Action.CONNECT), (3.0, Action.GIVE_UP)]
    assert "a login attempt was still under way" in policy.give_up_message("t")


def test_a_reconnect_that_completes_no_command_does_not_end_the_outage() -> None:
    # The livelock of issue 10: the target logs in, answers the NOP ping, and breaks the
    # connection after each command. 22 reconnects in 200 s, never giving up, before.
    policy = RecoveryPolicy(200.0, default_time2wait=0.0)
    lost(policy, 0.0)
    reconnects: list[float] = []

    def react(now: float, action: Action) -> None:
        if action is Action.CONNECT:
            policy.logged_in(now + 0.01, waiting=True)   # the commands are re-issued ...
            reconnects.append(now)
            lost(policy, now + 0.05)                     # ... and the target breaks again

    actions = run(policy, 1000.0, react)
    assert actions[-1] == (200.0, Action.GIVE_UP)
    # Each login worked, so no backoff grows; but a connection that completed nothing is
    # followed by a second's wait at least, even with a Time2Wait of 0: no hammering.
    assert reconnects[0] == 0.0
    assert all(b - a >= 1.0 for a, b in itertools.pairwise(reconnects)), reconnects
    assert policy.logins == len(reconnects)
    assert policy.give_up_message("t") == (
        f"session to t logged in again {len(reconnects)} times within the replacement timeout "
        "of 200 s, but each connection broke before a command completed (connection lost: "
        "target closed the connection; the last one: target closed the connection)")


def test_logins_that_each_broke_are_not_called_a_failure_to_log_in() -> None:
    # A target that drops every connection right after login: each login worked, and the
    # message said the session "could not be re-established in 3 login attempts", which
    # sends a person to the portal and the credentials. It says what happened instead, with
    # the last connection's cause, and the attempts when some of them failed to log in.
    policy = RecoveryPolicy(10.0, default_time2wait=0.0)
    policy.connection_lost(0.0, "connection reset", worked=True, waiting=True)
    outcomes = iter(["logged in", "refused"])   # then each logs in

    def react(now: float, action: Action) -> None:
        if action is Action.CONNECT:
            if next(outcomes, "logged in") == "refused":
                policy.attempt_failed(now, "connection refused")
                return
            policy.logged_in(now, waiting=True)
            policy.connection_lost(now + 0.1, f"closed at {now + 0.1:g} s", worked=False,
                                   waiting=True)

    run(policy, 1000.0, react)
    message = policy.give_up_message("iqn.x at h:3260")
    assert "could not be re-established" not in message, message
    assert policy.logins == policy.outage_attempts - 1 and message.startswith(
        f"session to iqn.x at h:3260 logged in again {policy.logins} times in "
        f"{policy.outage_attempts} "
        "login attempts within the replacement timeout of 10 s, but each connection broke "
        "before a command completed (connection lost: connection reset; the last one: closed at ")


def test_a_reconnect_that_breaks_waits_time2wait_without_backoff() -> None:
    # A faulty link: every reconnect logs in and is broken by the next fault before a command
    # completes. The next attempt waits the target's Time2Wait, not a growing backoff: on
    # such a link every second waited is a second without I/O (open-iscsi waits Time2Wait).
    policy = RecoveryPolicy(120.0, default_time2wait=2.0)
    lost(policy, 0.0)
    connects: list[float] = []

    def react(now: float, action: Action) -> None:
        if action is Action.CONNECT:
            connects.append(now)
            policy.logged_in(now + 0.1, waiting=True)
            lost(policy, now + 0.5)

    run(policy, 20.0, react)
    assert connects == [2.0 + 2.5 * i for i in range(len(connects))] and len(connects) == 8


def test_a_command_completing_ends_the_outage() -> None:
    policy = RecoveryPolicy(10.0, default_time2wait=0.0)
    lost(policy, 0.0)
    assert policy.handle_timer(0.0) is Action.CONNECT
    policy.logged_in(1.0, waiting=True)
    assert policy.get_timer() == 10.0     # still in the outage: the deadline is armed
    policy.working(2.0)
    assert policy.outage_since is None and policy.get_timer() is None
    assert run(policy, 1000.0) == []


def test_logged_in_but_nothing_answered_by_the_deadline() -> None:
    policy = RecoveryPolicy(10.0, default_time2wait=0.0)
    lost(policy, 0.0)
    assert policy.handle_timer(0.0) is Action.CONNECT
    policy.logged_in(0.5, waiting=True)
    assert run(policy, 100.0) == [(10.0, Action.GIVE_UP)]
    assert "logged in again, but the target completed no command" in \
        policy.give_up_message("t")


def test_a_connection_that_worked_starts_a_new_outage_and_resets_the_backoff() -> None:
    policy = RecoveryPolicy(100.0, default_time2wait=0.0, max_backoff=30.0)
    lost(policy, 0.0)
    run(policy, 14.0, failing(policy))               # attempts at 0, 1, 3, 7 failed
    assert policy.attempts == 4
    assert policy.handle_timer(15.0) is Action.CONNECT
    policy.logged_in(15.0, waiting=True)
    lost(policy, 20.0, worked=True)                  # a command completed on it
    assert policy.outage_since == 20.0 and policy.attempts == 0
    assert policy.get_timer() == 20.0


def test_a_connection_lost_with_nothing_waiting_starts_a_new_outage() -> None:
    policy = RecoveryPolicy(10.0, default_time2wait=0.0)
    lost(policy, 0.0)
    assert policy.handle_timer(0.0) is Action.CONNECT
    policy.logged_in(0.1, waiting=False)             # nothing to prove: the outage is over
    assert policy.outage_since is None
    lost(policy, 8.0, waiting=False)
    assert policy.deadline == 18.0


def test_a_login_resets_the_backoff() -> None:
    # The backoff is for a portal that does not take logins; once one worked, the next
    # connection lost (idle here) is followed by its Time2Wait alone.
    policy = RecoveryPolicy(1000.0, default_time2wait=0.0, max_backoff=30.0)
    lost(policy, 0.0)
    run(policy, 14.0, failing(policy))
    assert policy.attempts == 4
    assert policy.handle_timer(15.0) is Action.CONNECT
    policy.logged_in(15.0, waiting=False)
    assert policy.attempts == 0
    lost(policy, 15.5)
    assert policy.get_timer() == 15.5


def test_a_daemon_keeps_trying_after_giving_up() -> None:
    policy = RecoveryPolicy(10.0, reconnect_forever=True, default_time2wait=0.0,
                            max_backoff=30.0)
    lost(policy, 0.0)
    actions = run(policy, 200.0, failing(policy))
    assert (10.0, Action.GIVE_UP) in actions
    later = [t for t, a in actions if a is Action.CONNECT and t > 10.0]
    assert later and all(b - a <= 30.0 for a, b in itertools.pairwise(later))
    assert [a for _, a in actions].count(Action.GIVE_UP) == 1
    policy.logged_in(201.0, waiting=False)            # it came back
    assert not policy.gave_up and policy.get_timer() is None


def test_background_start_connects_at_once() -> None:
    policy = RecoveryPolicy(5.0)
    policy.start(50.0, "not logged in yet")
    assert policy.handle_timer(50.0) is Action.CONNECT
    policy.attempt_failed(50.1, "connection refused")
    assert run(policy, 100.0, failing(policy))[-1] == (55.0, Action.GIVE_UP)
    assert "not logged in yet" in policy.give_up_message("t")


def test_stop_ends_everything() -> None:
    policy = RecoveryPolicy(5.0, reconnect_forever=True)
    lost(policy, 0.0)
    policy.stop()
    assert policy.get_timer() is None and policy.handle_timer(1e6) is None
    lost(policy, 10.0)
    assert policy.get_timer() is None


def test_command_expired_after_the_replacement_timeout() -> None:
    policy = RecoveryPolicy(120.0)
    assert not policy.command_expired(10.0, 129.9)
    assert policy.command_expired(10.0, 130.0)
