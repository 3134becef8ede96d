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


def _refused(argv: list[str]) -> str:
    """bench/argv[0] with argv[1:]: refused at once (exit 2, an error, no traceback); its
    standard error."""
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
    return err


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
    # Sizes are initiator.argtypes' (fio was handed whatever was typed).
    ["workers", "--bs", "4q"],
    ["workers", "--size", "1_000m"],
    ["faults_soak", "--block-size", "64k-4k"],
    ["faults_soak", "--block-size", "4k-x"],
    ["e2e_vs_open_iscsi", "--size", "\u0662g"],
    ["initiator_vs_libiscsi", "--sizes", "4k,,128k"],
    ["ring", "--disks", "1", "--size", "+4k"],
], ids=" ".join)
def test_a_bad_run_length_or_count_is_refused_at_once(argv: list[str]) -> None:
    _refused(argv)


@pytest.mark.parametrize(("argv", "why"), [
    # One picture, into the FIFO itself: nobody reads it (this failed after the whole run).
    (["initiator_vs_libiscsi", "--sizes", "4k", "--no-load"], "nobody is reading the FIFO"),
    # Several: the others would be regular files beside the FIFO.
    (["initiator_vs_libiscsi"], "draws 4 pictures"),
    (["initiator_vs_libiscsi", "--sizes", "4k", "--no-load", "--write"], "draws 2 pictures"),
    # Always files named after it.
    (["e2e_vs_open_iscsi"], "one per job"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_a_histogram_fifo_is_checked_before_the_run(
        tmp_path: Path, argv: list[str], why: str) -> None:
    fifo = tmp_path / "h.svg"
    os.mkfifo(fifo)
    err = _refused([*argv, "--seconds", "1", "--histogram", str(fifo)])
    assert "error: --histogram" in err and why in err and str(fifo) in err, err
    assert os.listdir(tmp_path) == ["h.svg"]


@pytest.mark.parametrize("script", ["initiator_vs_libiscsi", "e2e_vs_open_iscsi"])
def test_a_histogram_in_a_missing_directory_is_refused_before_the_run(
        tmp_path: Path, script: str) -> None:
    err = _refused([script, "--histogram", str(tmp_path / "no" / "h.svg")])
    assert "error: --histogram" in err and "there is no directory" in err, err


@pytest.mark.parametrize("name", sorted(p.name for p in BENCH.iterdir()))
def test_a_benchmark_run_by_hand_uses_the_checkouts_python(name: str) -> None:
    """``bench/ring --help`` from a shell without the .venv first on PATH got the system's
    Python, and every benchmark ended in ``ModuleNotFoundError: No module named 'crc32c'``
    (or pyudev): the scripts now run again under ``.venv/bin/python``
    (tests/support/checkout.py). Here the .venv's base interpreter plays the system's."""
    base = Path(sys.base_prefix) / "bin" / "python3"
    env = {k: v for k, v in os.environ.items() if k != "ISCSI_HBA_CHECKOUT_PYTHON"}
    done = subprocess.run([str(base), str(BENCH / name), "--help"], capture_output=True,
                          text=True, timeout=60, check=False, env=env, cwd="/")
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr


def test_the_checkouts_python_is_used_once(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    from tests.support import checkout

    calls: list[list[str]] = []
    monkeypatch.setattr(os, "execv", lambda path, argv: calls.append(argv))
    monkeypatch.setattr(sys, "argv", ["bench/ring", "--json"])
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.delenv("ISCSI_HBA_CHECKOUT_PYTHON", raising=False)
    checkout.use_checkout_python()
    assert calls == [[str(checkout.VENV / "bin" / "python"), "bench/ring", "--json"]]
    checkout.use_checkout_python()   # the second start (the variable is set): no third
    assert len(calls) == 1
    monkeypatch.delenv("ISCSI_HBA_CHECKOUT_PYTHON")
    monkeypatch.setattr(checkout, "VENV", tmp_path / "none")
    with pytest.raises(SystemExit, match=r"run \./run setup first"):
        checkout.use_checkout_python()
