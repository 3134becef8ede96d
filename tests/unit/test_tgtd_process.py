"""The parts of :mod:`hba.tgtd` that need no tgtd: which management channels are free, and the
log's tail that error messages carry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hba import tgtd


def test_a_channel_without_lock_file_is_free(tmp_path: Path) -> None:
    assert tgtd.control_port_free(4242, tmp_path)


def test_a_stale_lock_file_does_not_make_a_channel_busy(tmp_path: Path) -> None:
    (tmp_path / "socket.4242.lock").touch()  # left by a killed tgtd: nobody holds the lock
    assert tgtd.control_port_free(4242, tmp_path)


def test_a_channel_whose_lock_is_held_is_busy(tmp_path: Path) -> None:
    lock = tmp_path / "socket.4242.lock"
    lock.touch()
    # tgtd holds a POSIX lock (lockf); those belong to a process, so another one holds it here.
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_WRONLY); "
         "fcntl.lockf(fd, fcntl.LOCK_EX, 1); print('locked', flush=True); sys.stdin.read()",
         str(lock)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        assert not tgtd.control_port_free(4242, tmp_path)
    finally:
        holder.communicate("", timeout=10)
    assert tgtd.control_port_free(4242, tmp_path)


def test_free_control_port_is_in_tgtds_range(tmp_path: Path) -> None:
    ports = {tgtd.free_control_port(tmp_path) for _ in range(200)}
    assert all(tgtd.MIN_CONTROL_PORT <= p <= tgtd.MAX_CONTROL_PORT == 32767 for p in ports)
    assert len(ports) > 100  # random, so two tgtds rarely try the same one


def test_no_free_control_port_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tgtd, "control_port_free", lambda n, ipc_dir: False)
    with pytest.raises(tgtd.TgtdError, match="no free tgtd control port"):
        tgtd.free_control_port(tmp_path)


def test_log_tail_is_the_end_of_the_log(tmp_path: Path) -> None:
    process = tgtd.TgtdProcess(tmp_path)
    assert process.log_tail().startswith("(no log:")
    process.log_path.write_text("".join(f"line {i}\n" for i in range(100)))
    assert process.log_tail(3) == "line 97\nline 98\nline 99"


def test_portal_brackets_ipv6(tmp_path: Path) -> None:
    process = tgtd.TgtdProcess(tmp_path, host="::1", port=3260)
    process.port = 3260
    assert process.portal == "[::1]:3260"


def test_missing_tgtd_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(tgtd.TgtdError, match=r"tgtd and tgtadm not found \(Debian package tgt\)"):
        tgtd.TgtdProcess(tmp_path).launch()


