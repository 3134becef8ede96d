"""The benchmarks refuse a run length that is no length before they start anything.

``--seconds nan`` passed every ``x < 1`` check: ``bench/initiator_vs_libiscsi`` ended in a
traceback, ``bench/faults_soak`` booted its VM, ``bench/ring`` (which checked nothing) ran its
cases for 0 s, and a zero or negative count of workers, disks or commands was a traceback or
a hang. Each script runs in a session of its own, ended whole if it outlives the bound.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.parametrize("argv", [
    ["ring", "--seconds", "nan"],
    ["ring", "--seconds", "inf"],
    ["ring", "--seconds", "-1"],
    ["ring", "--repeat", "0"],
    ["ring", "--disks", "-1"],
    ["ring", "--disks", "2", "--workers", "0"],
    ["ring", "--disks", "1", "--qd", "0"],
    ["ring", "--disks", "1", "--size", "x"],
    ["initiator_vs_libiscsi", "--seconds", "nan"],
    ["initiator_vs_libiscsi", "--seconds", "1e999"],
    ["faults_soak", "--seconds", "nan"],
    ["faults_soak", "--tail", "nan"],
    ["faults_soak", "--interval", "inf"],
    ["e2e_vs_open_iscsi", "--seconds", "nan"],
    ["e2e_vs_open_iscsi", "--ramp", "nan"],
    ["workers", "--seconds", "nan"],
    ["workers", "--repeat", "0"],
], ids=" ".join)
def test_a_bad_run_length_or_count_is_refused_at_once(argv: list[str]) -> None:
    proc = subprocess.Popen([sys.executable, str(BENCH / argv[0]), *argv[1:]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)   # the VM runner stops its VM on SIGTERM
        proc.communicate(timeout=30)
        pytest.fail(f"bench/{' '.join(argv)} started instead of refusing its options")
    assert proc.returncode == 2, (out, err)
    assert "error:" in err and "Traceback" not in err
