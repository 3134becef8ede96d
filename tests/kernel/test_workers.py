"""``hbactl daemon --workers 2`` in the VM: disks served from worker processes (hba.workers).

Checks: two disks of two targets are served by two different worker processes, children of
the daemon (``hbactl list --json`` names each disk's worker pid); fio with verification runs
on both at once; a worker killed with SIGKILL in the middle of a ``dd`` to its disk is reported
with its exit status, a new worker takes the disk over and the ``dd`` completes with the data
intact, while the other disk's worker goes on untouched; ``hbactl status`` lists the workers;
detach removes both disks (the ``daemon`` fixture checks configfs is left clean).
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.kernel import helpers
from tests.kernel.hba_daemon import DaemonProcess
from tests.kernel.tcmu import sha256_of
from tests.kernel.test_daemon_control import (  # noqa: F401 (fixtures)
    _dbus_policy,
    daemon,
    disks,
    hbactl,
    hbactl_json,
    start_dd,
    write_config,
)
from tests.kernel.test_disks import fio_verify

LioFactory = Callable[..., helpers.LioTarget]

pytestmark = pytest.mark.timeout(900)

MiB = 1 << 20


def parent_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no PPid")


def workers_of(names: list[str]) -> dict[str, int]:
    by_name = {d["name"]: d for d in disks()}
    return {name: int(by_name[name]["worker"]) for name in names}


def test_two_disks_two_workers(daemon: DaemonProcess, lio_target: LioFactory,  # noqa: F811
                               tmp_path: Path, results_dir: Path) -> None:
    write_config(daemon.config, "Workers = 2\n")
    daemon.start()
    assert daemon.proc is not None
    targets = [lio_target(64 * MiB), lio_target(64 * MiB)]
    nodes = [hbactl("attach", t.url()).stdout.strip() for t in targets]
    names = [d["name"] for d in sorted(disks(), key=lambda d: nodes.index(d["device"]))]
    pids = workers_of(names)
    assert len(set(pids.values())) == 2, pids
    for pid in pids.values():
        assert pid != daemon.proc.pid and parent_of(pid) == daemon.proc.pid
    status = hbactl_json("status")
    assert sorted(w["pid"] for w in status["workers"]) == sorted(pids.values())
    assert len(status["sessions"]) == 2

    # fio on both disks at once, each through its own worker.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(fio_verify, node, 8 * MiB, results_dir, f"verify{i}")
                for i, node in enumerate(nodes)]
        for job in jobs:
            job.result()

    # SIGKILL the first disk's worker in the middle of a dd to it.
    size = 16 * MiB
    dd, expected = start_dd(nodes[0], tmp_path, size)
    time.sleep(2.0)
    killed_during_dd = dd.poll() is None
    victim = pids[names[0]]
    os.kill(victim, signal.SIGKILL)
    started = time.monotonic()
    # While the new worker starts and takes over, the disk stays listed (never a gap).
    states = []
    while time.monotonic() - started < 300:
        rows = {d["name"]: d for d in disks()}
        assert names[0] in rows, f"{names[0]} missing from hbactl list during the takeover"
        row = rows[names[0]]
        states.append(row.get("state"))
        if row.get("worker") != victim and row.get("state") != "taking over":
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"{names[0]} not taken over 300 s after its worker's kill")
    _, err = dd.communicate(timeout=600)
    resumed = time.monotonic() - started
    assert dd.returncode == 0, err
    assert sha256_of(nodes[0], size) == expected

    after = workers_of(names)
    assert after[names[0]] != victim and parent_of(after[names[0]]) == daemon.proc.pid
    assert after[names[1]] == pids[names[1]], "the other disk's worker must not change"
    (row,) = [d for d in disks() if d["name"] == names[0]]
    assert row["device"] == nodes[0] and row["session"] == "logged in"
    log = daemon.log()
    assert "ended: killed by SIGKILL" in log and "took over" in log
    fio_verify(nodes[0], 4 * MiB, results_dir, "after-kill")

    for name in names:
        hbactl("detach", name)
    assert disks() == []
    print(f"workers {sorted(pids.values())}; dd running when its worker was killed: "
          f"{killed_during_dd}; dd done {resumed:.1f} s after the kill; states listed meanwhile: "
          f"{sorted(set(map(str, states)))}")
