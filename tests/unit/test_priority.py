"""The daemon's CPU priority (hba.priority): every thread gets the nice value, the autogroup
only when it is the process's own, and a refusal is one warning, not a failure.

The processes that change their priority here are children: the test runner keeps its own.
They lower it (a positive nice value), which needs no privilege. Debian's kernels have
autogroup (CONFIG_SCHED_AUTOGROUP), which these tests expect. A process whose session never
made a group of its own (one started by init without setsid, as some CI runners are) is in the
root group, and its /proc/self/autogroup is empty: that reads as "root" here.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hba import cli, priority

ROOT = Path(__file__).resolve().parents[2]

# A child process: a second thread, then raise_priority(3); it prints what it did and what
# every thread's nice value and its autogroup then are.
CHILD = """
import os, sys, threading
from hba.priority import own_session, raise_priority
if sys.argv[1] == "own": own_session()
gate = threading.Event()
t = threading.Thread(target=gate.wait)
t.start()
done = raise_priority(3)
nices = sorted({os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir("/proc/self/task")})
group = (open("/proc/self/autogroup").read().split() or ["root"])[-1]
gate.set()
print(done, nices, group, os.getsid(0) == os.getpid())
"""


def child(session: str, new_session: bool) -> str:
    return subprocess.run([sys.executable, "-c", CHILD, session], cwd=ROOT, check=True,
                          capture_output=True, text=True, timeout=60,
                          start_new_session=new_session).stdout.strip()


def test_every_thread_and_an_own_autogroup_get_the_nice_value() -> None:
    # Started as systemd starts a service: session leader, so its autogroup is its own.
    assert child("as is", new_session=True) == "True [3] 3 True"


def test_a_shared_autogroup_is_left_alone() -> None:
    # Started from a shell: the autogroup is the shell's session's, theirs to keep.
    group = (Path("/proc/self/autogroup").read_text().split() or ["root"])[-1]
    assert child("as is", new_session=False) == f"True [3] {group} False"


def test_a_worker_makes_itself_a_session_to_own_its_autogroup() -> None:
    assert child("own", new_session=False) == "True [3] 3 True"


def test_a_refusal_is_one_warning_that_says_what_to_do(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def refuse(which: int, who: int, value: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setpriority", refuse)
    with caplog.at_level(logging.WARNING, "hba.priority"):
        assert priority.raise_priority(-10, "worker 1") is False
    (record,) = caplog.records
    message = record.getMessage()
    assert message.startswith("worker 1: cannot set its CPU priority to nice -10 "
                              "(Operation not permitted)"), message
    assert "run it as root" in message and "Priority = 0" in message


@pytest.mark.parametrize(("text", "value"), [("-10", -10), ("0", 0), ("+5", 5), ("19", 19),
                                             ("-20", -20), ("-007", -7)])
def test_nice_values(text: str, value: int) -> None:
    assert priority.parse_priority(text) == value


@pytest.mark.parametrize("text", ["", "-", "+", "20", "-21", "--1", "- 1", "1.5", "-\u00b2",
                                  "\u0661", "high", "-" + "9" * 5000])
def test_what_is_no_nice_value(text: str) -> None:
    assert priority.parse_priority(text) is None


def test_hbactl_daemon_priority_option(capsys: pytest.CaptureFixture[str]) -> None:
    args = cli.build_parser().parse_args(["daemon", "--priority", "-10"])
    assert args.priority == -10
    assert cli.build_parser().parse_args(["daemon"]).priority is None
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["daemon", "--priority", "-21"])
    assert "'-21' is not a nice value, a whole number from -20 to 19" in capsys.readouterr().err
