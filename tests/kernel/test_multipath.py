"""Multipath in the VM (issue 12): one LIO LUN on two portals (127.0.0.1 and 127.0.0.2, a TPG
and an ALUA group each), one configuration entry naming the first with ``DiscoverPortals = on``
(SendTargets lists the second), ``hbactl daemon`` as a process
and Debian's multipathd with its built-in settings — only ``no_path_retry`` is overridden
(8 checks of 5 s, instead of 12) to keep the both-paths-down case short.

Checks: the daemon makes two paths, ``hbactl list/status`` show them (portal, state, ALUA,
and why multipathd has not made a map yet), ``multipath -ll`` groups them under one map after
``multipath -a`` and ext4 works on it; remote ALUA states become multipathd's priorities and
steer the I/O; persistent reservations taken through one path are the target's, seen through
the other, and survive a ``kill -9`` of the daemon (same ISIDs after the takeover);
``fio --verify=crc32c`` on ext4 on the map goes on while one path after the other is cut with
an nftables drop and restored — no verify error, no I/O error in the file system, the path
comes back by itself; both paths cut for less than the no-path window lose nothing, for
longer fail the I/O with EIO while the daemon keeps running and serves again afterwards.

The tests share one set-up (module scope: under TCG it costs a minute) and run in file order;
each leaves both paths up.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hba import kernel
from tests.kernel import helpers
from tests.kernel.hba_daemon import HBACTL, DaemonProcess

pytestmark = pytest.mark.timeout(900)

MiB = 1 << 20
LUN_SIZE = 128 * MiB
NO_PATH_RETRY = 8          # multipathd checks (5 s apart) that I/O is queued with no path
MULTIPATH_CONF = f"overrides {{\n    no_path_retry {NO_PATH_RETRY}\n}}\n"
FAST_FAIL = 5              # the entry's ReplacementTimeout: the multipath default


def hbactl(*args: str, check: bool = True, timeout: float = 300.0
           ) -> subprocess.CompletedProcess[str]:
    return helpers.run([HBACTL, *args], check=check, timeout=timeout)


@dataclass
class Rig:
    """What the module's tests share: the target, the daemon, multipathd, the cutter."""

    target: helpers.LioMultipathTarget
    daemon: DaemonProcess
    multipathd: helpers.Multipathd
    cutter: helpers.PathCutter
    results: Path
    before: dict[str, Any] = field(default_factory=dict)   # status --json before the map
    before_text: str = ""
    map_name: str = ""

    @property
    def map(self) -> str:
        return f"/dev/mapper/{self.map_name}"

    def disk(self) -> dict[str, Any]:
        (disk,) = json.loads(hbactl("list", "--json").stdout)["disks"]
        return dict(disk)

    def nodes(self) -> list[str]:
        """The ``/dev/sdX`` of path 1 and path 2."""
        return [p["device"] for p in self.disk()["paths"]]

    def paths_up(self) -> bool:
        disk = self.disk()
        return all(p["state"] == "up" for p in disk["paths"]) and len(disk["paths"]) == 2

    def healthy(self, timeout: float = 120.0) -> None:
        """Both paths up in the daemon and active in the map."""
        helpers.wait_for(self.paths_up, timeout, "both paths up in hbactl list")
        helpers.Multipathd.wait_active(self.map_name, 2, timeout)

    def log(self) -> str:
        return self.daemon.log()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    results = Path(os.environ.get("HBA_VM_RESULTS", "/tmp/hba-vm-results")) / "kernel" / \
        "test_multipath"
    results.mkdir(parents=True, exist_ok=True)
    for old in results.glob("*.log"):
        old.unlink()   # the share outlives the VM
    work = tmp_path_factory.mktemp("multipath")
    lio = helpers.Lio(work)
    target = lio.create_multipath(LUN_SIZE)
    config = work / "iscsi-hba.conf"
    # One address: SendTargets there lists both portals (bench/multipath_failover names
    # both in TargetAddress instead).
    config.write_text(
        "db {\n"
        f"    TargetAddress = {target.portals[0]}\n    DiscoverPortals = on\n"
        f"    TargetName    = {target.iqn}\n"
        "    NoopInterval  = 2\n    NoopTimeout   = 2\n    LoginTimeout  = 5\n}\n")
    config.chmod(0o600)
    daemon = DaemonProcess(config, results / "daemon.log")
    multipathd = helpers.Multipathd(results / "multipathd.log", MULTIPATH_CONF)
    cutter = helpers.PathCutter()
    rig = Rig(target, daemon, multipathd, cutter, results)
    try:
        daemon.start()
        multipathd.start()
        rig.before = json.loads(hbactl("status", "--json").stdout)
        rig.before_text = hbactl("status").stdout
        nodes = rig.nodes()
        multipathd.add(nodes[0])
        rig.map_name = helpers.Multipathd.wait_map(60)
        rig.healthy()
        yield rig
    finally:
        cutter.close()
        multipathd.stop()
        if daemon.running:
            hbactl("detach", "db", check=False)
            status = daemon.stop()
            assert status == 0, f"hbactl daemon exited with {status}:\n{daemon.log()}"
        elif daemon.proc is not None:
            daemon.kill()
        lio.remove_all()
        assert "Traceback" not in daemon.log(), daemon.log()
        left = [b.name for b in kernel.list_backstores()]
        assert not left, f"left in configfs: {left}"


# ------------------------------------------------------------------------------------------


def test_two_paths_become_one_map(rig: Rig, tmp_path: Path) -> None:
    port = rig.target.port
    (disk,) = rig.before["disks"]
    assert disk["name"] == "db" and disk["multipath"] and disk["paths_up"] == 2
    paths = disk["paths"]
    assert [p["portal"] for p in paths] == [f"127.0.0.1:{port},1", f"127.0.0.2:{port},2"]
    assert all(p["state"] == "up" and p["session"] == "logged in" for p in paths), paths
    assert all(p["alua"] == "active/optimized" for p in paths), paths
    assert [p["backstore"].split("/")[1] for p in paths] == ["hba-db.1", "hba-db.2"]
    a, b = (p["device"] for p in paths)
    assert a != b and a.startswith("/dev/sd") and b.startswith("/dev/sd")
    # One I_T nexus per path, and the sessions status lists are those.
    isids = [p["isid"] for p in paths]
    assert len(set(isids)) == 2 and all(re.fullmatch(r"8[0-9a-f]{11}", i) for i in isids)
    assert sorted(s["isid"] for s in rig.before["sessions"]) == sorted(isids)
    # Debian's find_multipaths strict: status says why there was no map and what to run.
    assert disk["holder"] is None and f"multipath -a {a}" in disk["hint"], disk["hint"]
    assert "db path 2: 127.0.0.2" in rig.before_text and "multipath -a" in rig.before_text

    # The same LUN (WWID) through two remote target ports.
    names = [os.path.basename(n) for n in (a, b)]
    wwids = {Path(f"/sys/block/{n}/device/wwid").read_text().strip() for n in names}
    assert len(wwids) == 1, wwids
    ports = [re.search(r"Relative target port: 0x([0-9a-f]+)",
                       helpers.run(["sg_vpd", "-p", "di", n]).stdout) for n in (a, b)]
    assert [int(m[1], 16) if m else None for m in ports] == [1, 2]

    listing = helpers.run(["multipath", "-ll", rig.map_name]).stdout
    assert "hwhandler='1 alua'" in listing and names[0] in listing and names[1] in listing
    after = rig.disk()
    assert after["holder"] == rig.map and after["hint"] is None
    assert hbactl("list").stdout.splitlines()[1].split()[3] == rig.map

    # ext4 on the map
    helpers.run(["mkfs.ext4", "-q", "-F", rig.map], timeout=300)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    data = secrets.token_bytes(3 * MiB)
    helpers.run(["mount", rig.map, mnt])
    try:
        (mnt / "data.bin").write_bytes(data)
    finally:
        helpers.run(["umount", mnt], timeout=300)
    helpers.run(["fsck.ext4", "-f", "-n", rig.map], timeout=300)
    helpers.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"])
    helpers.run(["mount", "-o", "ro", rig.map, mnt])
    try:
        assert (mnt / "data.bin").read_bytes() == data
    finally:
        helpers.run(["umount", mnt], timeout=300)

    log = rig.log()
    assert f"db: SendTargets at 127.0.0.1:{port} lists 127.0.0.1:{port},1, " \
        f"127.0.0.2:{port},2" in log, log
    for n, host in ((1, "127.0.0.1"), (2, "127.0.0.2")):
        assert re.search(rf"db path {n} \({host}:{port},{n}\): up as /dev/sd", log), log
    assert "fails over after" not in log   # nothing went down


def deliver_unit_attentions(nodes: list[str]) -> None:
    """A TEST UNIT READY through each path (SG_IO: the ALUA handler does not hold it back on
    a standby path), which fetches the target's UNIT ATTENTION 2A/06 and so makes the ALUA
    handler ask REPORT TARGET PORT GROUPS again."""
    for node in nodes:
        helpers.run(["sg_turs", "-n", "2", node], check=False)


def test_alua_states_become_priorities(rig: Rig) -> None:
    rig.healthy()
    a, b = rig.nodes()
    na, nb = os.path.basename(a), os.path.basename(b)

    def settle(expected: dict[str, int], states: list[str]) -> None:
        def done() -> bool:
            deliver_unit_attentions([a, b])
            prios = helpers.Multipathd.priorities()
            alua = [p["alua"] for p in rig.disk()["paths"]]
            return {n: prios.get(n) for n in expected} == expected and alua == states
        helpers.wait_for(done, 90, f"priorities {expected} and ALUA states {states}")

    try:
        rig.target.set_alua("active/optimized", "active/non-optimized")
        settle({na: 50, nb: 10}, ["active/optimized", "active/non-optimized"])
        rig.target.set_alua("active/optimized", "standby")
        settle({na: 50, nb: 1}, ["active/optimized", "standby"])
        # The I/O goes to the optimized path only.
        before = [int(Path(f"/sys/block/{n}/stat").read_text().split()[0]) for n in (na, nb)]
        helpers.run(["dd", f"if={rig.map}", "of=/dev/null", "bs=4k", "count=64",
                     "iflag=direct"])
        after = [int(Path(f"/sys/block/{n}/stat").read_text().split()[0]) for n in (na, nb)]
        assert after[0] - before[0] >= 64 and after[1] == before[1], (before, after)
        listing = helpers.run(["multipath", "-ll", rig.map_name]).stdout
        assert "prio=50 status=active" in listing and "prio=1 status=enabled" in listing, \
            listing
    finally:
        rig.target.set_alua("active/optimized", "active/optimized")
        settle({na: 50, nb: 50}, ["active/optimized", "active/optimized"])


def sg_persist(*args: str, check: bool = True) -> str:
    return helpers.run(["sg_persist", *args], check=check).stdout


def write_through(node: str) -> subprocess.CompletedProcess[str]:
    """One 4 KiB O_DIRECT write at 64 MiB (away from anything else the tests write)."""
    return helpers.run(["dd", "if=/dev/zero", f"of={node}", "bs=4k", "count=1",
                        f"seek={64 * MiB // 4096}", "oflag=direct"], check=False)


def test_persistent_reservations_across_paths_and_a_restart(rig: Rig) -> None:
    rig.healthy()
    a, b = rig.nodes()
    isids = [p["isid"] for p in rig.disk()["paths"]]
    try:
        sg_persist("--out", "--register", "--param-sark=0x1111", a)
        sg_persist("--out", "--register", "--param-sark=0x2222", b)
        for node in (a, b):   # the target's registrations, whichever path asks
            keys = sg_persist("--in", "--read-keys", node)
            assert "0x1111" in keys and "0x2222" in keys, keys
        registered = rig.target.registrations()
        assert len(registered) == 2, registered
        for isid in isids:
            assert any(f"0x{isid}" in line for line in registered), (isid, registered)

        sg_persist("--out", "--reserve", "--param-rk=0x1111", "--prout-type=1", a)
        held = sg_persist("--in", "--read-reservation", b)
        assert "Key=0x1111" in held and "Write Exclusive" in held, held
        assert write_through(a).returncode == 0
        conflict = write_through(b)
        assert conflict.returncode != 0, "a write through the other path got past the " \
            "reservation"

        # A restart takes the paths over with the same I_T nexuses: the registrations and
        # the reservation are still ours.
        rig.daemon.kill()
        rig.daemon.start()
        rig.healthy()
        assert rig.nodes() == [a, b]
        assert sorted(rig.target.registrations()) == sorted(registered)
        assert [p["isid"] for p in rig.disk()["paths"]] == isids
        assert write_through(a).returncode == 0
        assert write_through(b).returncode != 0

        sg_persist("--out", "--release", "--param-rk=0x1111", "--prout-type=1", a)
        assert write_through(b).returncode == 0
    finally:
        sg_persist("--out", "--register", "--param-rk=0x1111", "--param-sark=0", a,
                   check=False)
        sg_persist("--out", "--register", "--param-rk=0x2222", "--param-sark=0", b,
                   check=False)
    assert rig.target.registrations() == []

    # mpathpersist registers a key through every path of the map.
    try:
        helpers.run(["mpathpersist", "--out", "--register", "--param-sark=0x3333", rig.map])
        registered = rig.target.registrations()
        assert len(registered) == 2 and all(re.search(r"Key: 0x0*3333 ", r)
                                            for r in registered), registered
        helpers.run(["mpathpersist", "--out", "--reserve", "--param-rk=0x3333",
                     "--prout-type=5", rig.map])
        assert write_through(rig.map).returncode == 0   # registrants may write
        helpers.run(["mpathpersist", "--out", "--release", "--param-rk=0x3333",
                     "--prout-type=5", rig.map])
    finally:
        helpers.run(["mpathpersist", "--out", "--register", "--param-rk=0x3333",
                     "--param-sark=0", rig.map], check=False)
    assert rig.target.registrations() == []


class FioLoop:
    """``fio --verify=crc32c`` runs, one after the other, on a file, until stopped: every
    run writes and verifies its own blocks, so a run that ends while a path is down still
    has its data checked."""

    def __init__(self, filename: Path, results: Path, seconds: int = 20) -> None:
        self.filename = filename
        self.results = results
        self.seconds = seconds
        self.reports: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fio-loop", daemon=True)

    def start(self) -> FioLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.seconds + 300)
        assert not self._thread.is_alive(), "fio does not end"

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            argv = ["fio", f"--name=failover{n}", f"--filename={self.filename}", "--size=24M",
                    "--ioengine=libaio", "--direct=1", "--rw=randwrite", "--bsrange=4k-64k",
                    "--iodepth=8", "--verify=crc32c", "--verify_backlog=64",
                    "--verify_fatal=1", "--verify_dump=0", f"--randseed={n}",
                    "--time_based", f"--runtime={self.seconds}", "--output-format=json"]
            proc = subprocess.run(argv, capture_output=True, text=True, check=False,
                                  timeout=self.seconds + 600)
            (self.results / f"fio-failover{n}.json").write_text(proc.stdout + proc.stderr)
            try:
                text = proc.stdout
                job = json.loads(text[text.index("{"):])["jobs"][0]
            except (ValueError, KeyError, IndexError):
                self.failures.append(f"run {n}: exit {proc.returncode}: {proc.stderr[-500:]}")
                continue
            self.reports.append(job)
            if proc.returncode != 0 or job["error"]:
                self.failures.append(f"run {n}: exit {proc.returncode}, error {job['error']}: "
                                     f"{proc.stderr[-500:]}")


def test_fio_verify_goes_on_while_paths_are_cut(rig: Rig, tmp_path: Path) -> None:
    rig.healthy()
    port = rig.target.port
    helpers.run(["mkfs.ext4", "-q", "-F", rig.map], timeout=300)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    helpers.run(["mount", rig.map, mnt])
    log = helpers.KernelLog()
    fio = FioLoop(mnt / "fio.dat", rig.results)
    timeline: list[str] = []
    try:
        fio.start()
        time.sleep(5)
        for n, host in enumerate(("127.0.0.1", "127.0.0.2", "127.0.0.1"), 1):
            rig.healthy()
            rig.cutter.cut(host, port)
            cut = time.monotonic()
            helpers.wait_for(lambda: helpers.Multipathd.active_paths(rig.map_name) < 2, 90,
                     f"dm-multipath failing the path through {host}")
            failed = time.monotonic() - cut
            time.sleep(3)
            rig.cutter.restore(host, port)
            back = helpers.Multipathd.wait_active(rig.map_name, 2, 120)
            timeline.append(f"round {n}, {host}: path failed {failed:.1f} s after the cut, "
                            f"active again {back:.1f} s after the restore")
        time.sleep(5)
    finally:
        fio.stop()
        helpers.run(["umount", mnt], timeout=300)
    (rig.results / "failover-timeline.txt").write_text("\n".join(timeline) + "\n")
    assert not fio.failures, fio.failures
    assert len(fio.reports) >= 2
    assert all(job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0
               for job in fio.reports), "a fio run wrote or verified nothing"
    helpers.run(["fsck.ext4", "-f", "-n", rig.map], timeout=300)
    messages = [m.text for m in log.read()]
    dm = os.path.basename(os.path.realpath(rig.map))
    bad = [m for m in messages if "EXT4-fs error" in m or f"dev {dm}" in m
           or "Device offlined" in m]
    assert not bad, bad
    assert sum("Failing path" in m for m in messages) >= 3, messages
    text = rig.log()
    for n, host in ((1, "127.0.0.1"), (2, "127.0.0.2")):
        label = rf"db path {n} \({host}:{port},{n}\)"
        assert re.search(label + r": down \(", text), text
        assert re.search(label + rf": not back within {FAST_FAIL} s: its I/O fails over now",
                         text), text
        assert re.search(label + r": up as /dev/sd\w+ after \d+ s", text), text
    rig.healthy()


def test_both_paths_cut(rig: Rig) -> None:
    rig.healthy()
    port = rig.target.port
    hosts = rig.target.hosts
    log = helpers.KernelLog()

    # Shorter than the no-path window: the I/O waits in dm-multipath and goes on.
    probe = helpers.IoProbe(rig.map).start()
    time.sleep(3)
    for host in hosts:
        rig.cutter.cut(host, port)
    time.sleep(12)
    for host in hosts:
        rig.cutter.restore(host, port)
    rig.healthy()
    time.sleep(2)
    short = probe.stop()
    assert not short.errors and not short.corrupt, short
    assert short.longest > 3, short   # it did wait

    # Longer: the I/O fails with EIO once multipathd gives up queueing; the daemon lives on
    # and the map serves again when the paths are back.
    probe = helpers.IoProbe(rig.map).start()
    time.sleep(3)
    for host in hosts:
        rig.cutter.cut(host, port)
    cut = time.monotonic()
    helpers.wait_for(lambda: probe.errors_so_far > 0, 9 + NO_PATH_RETRY * 5 + 60,
             "an I/O error once the no-path window is over")
    failed_after = time.monotonic() - cut
    for host in hosts:
        rig.cutter.restore(host, port)
    rig.healthy()
    time.sleep(3)
    long = probe.stop()
    (rig.results / "both-paths.txt").write_text(
        f"short cut: {short}\nlong cut: {long}; first error {failed_after:.0f} s after the "
        "cut\n")
    assert long.errors and {errno for _t, _op, errno in long.errors} == {5}, long
    assert not long.corrupt, long
    assert long.errors[-1][0] < long.seconds - 2, "no I/O worked after the restore"
    assert rig.daemon.running
    status = json.loads(hbactl("status", "--json").stdout)
    assert all(p["state"] == "up" for p in status["disks"][0]["paths"]), status
    assert not [m.text for m in log.read() if "Device offlined" in m.text]
