"""A competing CPU load for the benchmarks: ``stress-ng --cpu N`` while a phase runs.

Issue 14 asks every benchmark to report its ratio twice, on a quiet machine and with another
busy process beside it, ours and the anchor measured in the same phase: a Python initiator that
keeps up only while it has a core to itself is not on a par with one that does not need it.

    with competing_load(1) as load:   # load.description: what ran, for the report
        ...                           # the measurements of the loaded phase

stress-ng is started in its own process group and stopped (SIGTERM, then SIGKILL after a
bound) by that group when the block ends, whatever happened in it; a stress-ng that dies on
its own during the phase is reported as an error, since the numbers would not be "loaded".
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

STOP_TIMEOUT = 10.0
"""Seconds stress-ng gets to stop after SIGTERM before it is killed."""


class LoadError(Exception):
    """The competing load could not be started or did not last; the message says why."""


@dataclass(frozen=True)
class Load:
    cpus: int
    description: str


def available() -> bool:
    return shutil.which("stress-ng") is not None


@contextlib.contextmanager
def competing_load(cpus: int = 1) -> Iterator[Load]:
    """Run ``stress-ng --cpu cpus`` (each worker spins one CPU) for the ``with`` block."""
    if cpus < 1:
        raise ValueError(f"a competing load needs at least one CPU worker, not {cpus}")
    binary = shutil.which("stress-ng")
    if binary is None:
        raise LoadError("stress-ng not found: run deploy/setup (as root) to install it")
    argv = [binary, "--cpu", str(cpus), "--cpu-method", "matrixprod", "--quiet"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        # stress-ng forks its workers at once; a quick exit means it refused to run.
        time.sleep(0.3)
        if proc.poll() is not None:
            raise LoadError(f"stress-ng --cpu {cpus} exited at once ({proc.returncode}): "
                            f"{_stop(proc)}")
        yield Load(cpus, f"stress-ng --cpu {cpus}")
        if proc.poll() is not None:
            raise LoadError(f"stress-ng --cpu {cpus} ended during the loaded phase "
                            f"({proc.returncode}): {_stop(proc)}; its numbers are not loaded")
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> str:
    """Stop stress-ng and its workers (its own process group), within bounded time; return
    the end of what it printed on stderr (read once all of them are gone)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(STOP_TIMEOUT)
    else:
        # The leader is gone; its workers may not be.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    if proc.stderr is None or proc.stderr.closed:
        return "no output"
    with proc.stderr:
        text = proc.stderr.read().decode(errors="replace").strip()
    return text[-300:] or "no output"
