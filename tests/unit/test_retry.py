"""The retry schedule of ``Enable = on`` entries, driven by a fake clock, and what is worth
retrying. The daemon's glue around it (tasks, logging, detach) is in test_daemon_retry.py."""

from __future__ import annotations

import pytest

from hba import retry as retry_module
from hba.disks import DiskState
from hba.retry import RetrySchedule, worth_retrying
from hba.specs import LunSpec
from initiator import errors
from initiator.login import LoginError, Portal, TargetNotFoundError, login_error
from initiator.transport import SessionConfig

IQN = "iqn.2003-01.org.example:disk1"


def spec(name: str = "disk1") -> LunSpec:
    return LunSpec(name=name, portals=(Portal("192.0.2.1", 3260),), target=IQN, lun=0,
                   session=SessionConfig(initiator_name="iqn.2024-01.org.example:host"),
                   nickname=name)


def test_what_is_worth_retrying() -> None:
    assert worth_retrying(errors.ConnectionFailed("refused"))
    assert worth_retrying(errors.SessionFailed("gone"))
    assert worth_retrying(login_error(3, 0x01, "iqn.x", "h:1"))   # target unavailable
    assert isinstance(login_error(2, 0x03, "iqn.x", "h:1"), TargetNotFoundError)
    assert worth_retrying(login_error(2, 0x03, "iqn.x", "h:1"))   # not set up yet
    assert not worth_retrying(login_error(2, 0x01, "iqn.x", "h:1"))  # wrong secret
    assert not worth_retrying(login_error(2, 0x02, "iqn.x", "h:1"))  # initiator refused
    assert not worth_retrying(LoginError("version", status_class=2, status_detail=0x05))
    assert not worth_retrying(errors.AuthenticationError("bad CHAP answer"))
    assert not worth_retrying(errors.NegotiationError("no common digest"))


def test_waits_double_up_to_the_maximum() -> None:
    schedule = RetrySchedule(first=5.0, maximum=60.0)
    now = 1000.0
    retry = schedule.start("disk1", spec(), "cannot connect", now)
    assert (retry.attempts, retry.delay, retry.next_attempt) == (1, 5.0, 1005.0)
    waits = []
    for attempt in range(2, 8):
        now = retry.next_attempt + 0.5    # the attempt itself took half a second
        again = schedule.failed("disk1", f"failure {attempt}", now)
        assert again is retry and retry.attempts == attempt
        assert retry.error == f"failure {attempt}"
        assert retry.next_attempt == now + retry.delay
        waits.append(retry.delay)
    assert waits == [10.0, 20.0, 40.0, 60.0, 60.0, 60.0]


def test_defaults_are_read_when_the_schedule_is_made(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (RetrySchedule().first, RetrySchedule().maximum) == (5.0, 60.0)
    monkeypatch.setattr(retry_module, "RETRY_FIRST", 0.02)
    monkeypatch.setattr(retry_module, "RETRY_MAX", 0.05)
    schedule = RetrySchedule()
    assert (schedule.first, schedule.maximum) == (0.02, 0.05)


def test_entries_are_independent_and_leave_for_good() -> None:
    schedule = RetrySchedule(first=5.0, maximum=60.0)
    schedule.start("disk1", spec("disk1"), "down", 0.0)
    schedule.start("disk2", spec("disk2"), "down", 3.0)
    schedule.failed("disk1", "still down", 5.0)
    assert schedule["disk1"].next_attempt == 15.0 and schedule["disk2"].next_attempt == 8.0
    assert schedule == {"disk1": schedule["disk1"], "disk2": schedule["disk2"]}
    gone = schedule.remove("disk1")
    assert gone is not None and gone.attempts == 2
    assert set(schedule) == {"disk2"} and len(schedule) == 1 and "disk1" not in schedule
    # An attempt that was under way when the entry left does not bring it back.
    assert schedule.failed("disk1", "down", 20.0) is None
    assert schedule.remove("disk1") is None and set(schedule) == {"disk2"}


def test_describe_counts_down_to_the_next_attempt() -> None:
    schedule = RetrySchedule(first=5.0, maximum=60.0)
    retry = schedule.start("disk1", spec(), "cannot connect to iSCSI portal", 100.0)
    row = retry.describe(101.26)
    assert row == {"name": "disk1", "target": IQN, "portal": "192.0.2.1:3260", "lun": 0,
                   "state": "retrying", "error": "cannot connect to iSCSI portal",
                   "attempts": 1, "retry_in": 3.7}
    assert retry.describe(200.0)["retry_in"] == 0.0   # overdue: the attempt is under way
    assert retry.describe(200.0, DiskState.DETACHED)["state"] == "detached"


def test_a_restart_tries_at_once_and_starts_the_backoff_over() -> None:
    # The configuration was read again (SIGHUP): whoever did it just fixed something.
    schedule = RetrySchedule(first=5.0, maximum=60.0)
    retry = schedule.start("disk1", spec(), "down", 0.0)
    for now in (5.0, 15.0, 35.0, 75.0):
        schedule.failed("disk1", "still down", now)
    assert (retry.attempts, retry.delay, retry.next_attempt) == (5, 60.0, 135.0)
    fixed = spec("disk1")
    assert schedule.restart("disk1", fixed, 80.0) is retry
    assert (retry.spec, retry.next_attempt, retry.attempts) == (fixed, 80.0, 5)
    assert retry.describe(80.0)["retry_in"] == 0.0
    waits = []
    for _ in range(3):
        now = retry.next_attempt + 1.0
        schedule.failed("disk1", "down again", now)
        waits.append(retry.next_attempt - now)
    assert waits == [5.0, 10.0, 20.0]
    assert retry.attempts == 8   # the count goes on: what the log says of the entry
    assert schedule.restart("disk2", spec("disk2"), 90.0) is None
    assert set(schedule) == {"disk1"}
