""":class:`hba.tgtd.TgtdProcess` against a real tgtd: its management channel is in tgtd's
range, and a tgtd that cannot serve its portal fails with the end of tgtd's own log in the
message (the demo's users cannot open a log inside the VM)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from hba.tgtd import MAX_CONTROL_PORT, TgtdError, TgtdProcess, control_port_free


def test_starts_answers_and_stops(tmp_path: Path) -> None:
    with TgtdProcess(tmp_path) as tgtd:
        assert 0 < tgtd.control_port <= MAX_CONTROL_PORT
        assert not control_port_free(tgtd.control_port)
        assert "State: ready" in tgtd.tgtadm("--op", "show", "--mode", "system", lld=False)
        with socket.create_connection(("127.0.0.1", tgtd.port), timeout=5):
            pass
        port = tgtd.control_port
    assert not tgtd.running and control_port_free(port)


def test_a_portal_it_cannot_bind_fails_with_tgtds_log(tmp_path: Path) -> None:
    # The port is taken (bound, not listening): tgtd runs on without a portal.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        tgtd = TgtdProcess(tmp_path, port=taken.getsockname()[1])
        with pytest.raises(TgtdError) as failure:
            tgtd.launch(attempts=1, timeout=3)
    message = str(failure.value)
    assert "tgtd did not start after 1 attempts (last: its portal did not answer within 3 s)" \
        in message
    assert f"the end of its log ({tgtd.log_path}):\n--- launch 1: tgtd -C" in message
    assert "unable to bind server socket" in message  # tgtd's own words, from its log
    assert not tgtd.running


def test_tgtadm_failure_names_the_command(tmp_path: Path) -> None:
    with TgtdProcess(tmp_path) as tgtd, pytest.raises(TgtdError, match=r"`tgtadm -C \d+ --lld "
                                                      r"iscsi --op delete --mode target "
                                                      r"--tid 99` failed \(\d+\): \S"):
        tgtd.tgtadm("--op", "delete", "--mode", "target", "--tid", "99")
