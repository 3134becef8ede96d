"""Issue 5, kernel tier: remote LUNs attached by the daemon as real ``/dev/sdX`` disks, used
like any disk (file systems, fio with verification), with CHAP and digests, through a target
restart, and detached without a trace — against LIO and against tgtd, in the VM.

The daemon runs in its own thread and loop (:mod:`tests.kernel.hba_daemon`): its loop serves
the TCMU rings, so every tool that does I/O on the disk runs from the test thread as a
subprocess.

The checks of the issue, each against LIO (rtslib, ramdisk) and against a private tgtd:

- ``test_filesystem``: attach -> /dev/sdX with by-id links; mkfs (ext4, xfs), mount, 200 files
  of random sizes, unmount, ``fsck -fn`` (``xfs_repair -n``), mount, same checksums; detach.
- ``test_fio_verify``: fio random writes at QD32 with crc32c verification reads.
- ``test_chap_mutual_and_digests``: both of the above with mutual CHAP and CRC32C header and
  data digests (checked as negotiated).
- ``test_target_restart_mid_write``: during a verified fio write job, tgtd is SIGKILLed and
  restarted on the same port with the same backing file; LIO's TPG is disabled (which ends its
  sessions and closes their connections) and enabled again. fio completes, its verification
  and a second ``--verify_only`` pass are clean, the session reconnected.
- ``test_attach_detach_leaks_nothing`` (LIO): 20 attach/detach cycles; after each, no
  ``core/user_*``, tcm_loop target or uio device, no disk or session in ``status()`` and no
  session on the target; after all, the same asyncio tasks, threads and fds as before. Every
  test's teardown checks the kernel side too.

Sizes are modest because the VM runs under TCG: 64 MiB LUNs, 320 MiB for XFS (mkfs.xfs
refuses file systems under 300 MB). Each test writes the wall time of its steps to
``steps.txt`` and the daemon's log to ``daemon.log`` in its results directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hba.daemon import DaemonOptions
from tests.kernel import helpers
from tests.kernel.hba_daemon import (
    AttachedDisk,
    DaemonThread,
    leftovers,
    lio_sessions,
    wait_for_no_leftovers,
)
from tests.support.targets import Chap, TargetInfo
from tests.support.tgtd import Tgtd

MiB = 1 << 20
KiB = 1 << 10
LUN_SIZE = 64 * MiB
XFS_LUN_SIZE = 320 * MiB
FILES = 200
REPLACEMENT_TIMEOUT = 60.0
VERIFY_SIZE = 16 * MiB     # fio's verified random writes
RESTART_SIZE = 32 * MiB    # ... while the target restarts

TargetFactory = Callable[..., TargetInfo]


# ------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture
def hba(results_dir: Path) -> Iterator[DaemonThread]:
    """The daemon in its own thread; at the end nothing of it may be left in the kernel."""
    options = DaemonOptions(replacement_timeout=REPLACEMENT_TIMEOUT)
    with DaemonThread(options, log_path=results_dir / "daemon.log") as daemon:
        yield daemon
    assert wait_for_no_leftovers() == [], "the daemon left objects in the kernel"


@pytest.fixture
def steps(results_dir: Path) -> Steps:
    return Steps(results_dir)


@pytest.fixture(params=["lio", "tgtd"])
def make_target(request: pytest.FixtureRequest) -> TargetFactory:
    """``make_target(size, chap=None, digests=False) -> TargetInfo`` on LIO (ramdisk) or on a
    private tgtd; ``digests`` makes the target accept CRC32C digests."""
    if request.param == "lio":
        # LIO offers CRC32C digests by default.
        lio_target: Callable[..., helpers.LioTarget] = request.getfixturevalue("lio_target")
        return lambda size=LUN_SIZE, chap=None, digests=False: lio_target(size, chap=chap)
    tgtd: Tgtd = request.getfixturevalue("tgtd")

    def make(size: int = LUN_SIZE, chap: Chap | None = None, digests: bool = False
             ) -> TargetInfo:
        target = tgtd.add_target(size, chap=chap)
        if digests:
            # tgtd allows only None unless told otherwise (and then answers None to an offer
            # of CRC32C alone, where RFC 7143 §6.2.1 wants Reject).
            for key in ("HeaderDigest", "DataDigest"):
                tgtd.set_target_param(target, key, "CRC32C,None")
        return target

    return make


# ------------------------------------------------------------------------------------------
# helpers


def check_disk(disk: AttachedDisk, size: int) -> None:
    """A whole SCSI disk of the LUN's size, with by-id links pointing at it."""
    assert disk.node.startswith("/dev/sd"), disk
    name = os.path.basename(disk.node)
    assert int(Path(f"/sys/class/block/{name}/size").read_text()) * 512 == size
    assert disk.by_id, f"no /dev/disk/by-id link for {disk.node}"
    for link in disk.by_id:
        assert os.path.realpath(link) == disk.node, (link, disk.node)


def write_files(root: Path, count: int, seed: int) -> dict[str, str]:
    """``count`` files of random sizes (0 to ~1 MiB, most small) in a few directories."""
    rng = random.Random(seed)
    sums: dict[str, str] = {}
    for i in range(count):
        size = min(int(rng.expovariate(1 / (40 * KiB))), MiB) if i % 20 else rng.choice(
            [0, 1, 511, 512, 4095, 4096, 4097, 65536])
        data = rng.randbytes(size)
        rel = f"d{i % 7}/f{i:03d}.bin"
        path = root / rel
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        sums[rel] = hashlib.sha256(data).hexdigest()
    return sums


def read_sums(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``, read by parallel ``sha256sum`` processes (one
    file at a time would wait for the slow emulated disk once per file)."""
    script = f"find {shlex.quote(str(root))} -name '*.bin' -print0 | xargs -0 -n 10 -P 16 sha256sum"
    out = helpers.run(["sh", "-c", script], timeout=300).stdout
    sums: dict[str, str] = {}
    for line in out.splitlines():
        digest, _, name = line.partition("  ")
        sums[os.path.relpath(name, root)] = digest
    return sums


def drop_caches() -> None:
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


class Steps:
    """Wall time of each step of a test, appended to ``steps.txt`` in its results directory
    (the VM is slow and shared: this tells where the minutes went)."""

    def __init__(self, results: Path) -> None:
        self.path = results / "steps.txt"
        self.path.write_text("")
        self._t = time.monotonic()

    def __call__(self, what: str) -> None:
        now = time.monotonic()
        with self.path.open("a") as f:
            f.write(f"{now - self._t:7.2f} s  {what}\n")
        self._t = now


def filesystem_round(node: str, fstype: str, mnt: Path, steps: Steps, seed: int = 5) -> None:
    """mkfs, mount, write files, unmount, fsck -fn, mount, compare checksums, unmount."""
    if fstype == "ext4":
        helpers.run(["mkfs.ext4", "-q", "-F", node], timeout=300)
    else:
        helpers.run(["mkfs.xfs", "-q", "-f", node], timeout=300)
    steps(f"mkfs.{fstype}")
    mnt.mkdir(exist_ok=True)
    helpers.run(["mount", "-t", fstype, node, mnt])
    try:
        written = write_files(mnt, FILES, seed)
        steps(f"mount, write {FILES} files ({sum(f.stat().st_size for f in mnt.rglob('*.bin'))}"
              " bytes)")
    finally:
        helpers.run(["umount", mnt], timeout=300)
    steps("umount")
    if fstype == "ext4":
        helpers.run(["fsck.ext4", "-f", "-n", node], timeout=300)
    else:
        helpers.run(["xfs_repair", "-n", node], timeout=300)
    steps("fsck -fn" if fstype == "ext4" else "xfs_repair -n")
    drop_caches()
    helpers.run(["mount", "-t", fstype, "-o", "ro", node, mnt])
    steps("mount")
    try:
        read = read_sums(mnt)
        steps("read back")
    finally:
        helpers.run(["umount", mnt], timeout=300)
    steps("umount")
    assert len(written) == FILES
    assert read == written


def fio(node: str, *args: str, name: str = "job", timeout: float = 600.0,
        results: Path | None = None) -> dict[str, Any]:
    """Run fio on ``node`` (libaio, direct I/O); raise unless it exits 0 without errors."""
    argv = ["fio", f"--name={name}", f"--filename={node}", "--ioengine=libaio", "--direct=1",
            "--output-format=json", *args]
    proc = helpers.run(argv, check=False, timeout=timeout)
    if results is not None:
        (results / f"fio-{name}.json").write_text(proc.stdout)
        (results / f"fio-{name}.stderr").write_text(proc.stderr)
    report = _fio_report(argv, proc)
    return report


def _fio_report(argv: list[str], proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    if proc.returncode != 0:
        raise helpers.CommandError(argv, proc)
    text = proc.stdout
    report: dict[str, Any] = json.loads(text[text.index("{"):])
    errors = [job["error"] for job in report["jobs"] if job["error"]]
    assert not errors, f"fio reported errors {errors}: {proc.stderr}"
    return report


def verify_args(size: int, *, seed: int = 1) -> list[str]:
    """Random writes of 4-128 KiB at QD32 over ``size`` bytes, checked by crc32c reads."""
    return ["--rw=randwrite", "--bsrange=4k-128k", "--iodepth=32", f"--size={size}",
            "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_dump=0",
            f"--randseed={seed}"]


def fio_verify(node: str, size: int, results: Path | None = None, name: str = "verify"
               ) -> dict[str, Any]:
    report = fio(node, *verify_args(size), name=name, results=results)
    job = report["jobs"][0]
    assert job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0, job
    return report


def kernel_and_daemon_clean(hba: DaemonThread) -> None:
    assert leftovers() == []
    status = hba.status()
    assert status["disks"] == [] and status["sessions"] == [], status


# ------------------------------------------------------------------------------------------
# file systems and fio


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_filesystem(hba: DaemonThread, make_target: TargetFactory, fstype: str,
                    tmp_path: Path, steps: Steps) -> None:
    target = make_target(XFS_LUN_SIZE if fstype == "xfs" else LUN_SIZE)
    disk = hba.attach(target.url())
    steps(f"attach -> {disk.node}")
    check_disk(disk, target.size)
    filesystem_round(disk.node, fstype, tmp_path / "mnt", steps)
    hba.detach(disk.name)
    steps("detach")
    assert not os.path.exists(disk.node)
    # udev removes the by-id links after the kernel removed the disk.
    helpers.run(["udevadm", "settle", "--timeout=30"], check=False, timeout=60)
    assert not any(os.path.lexists(link) for link in disk.by_id), disk.by_id
    kernel_and_daemon_clean(hba)


def test_fio_verify(hba: DaemonThread, make_target: TargetFactory, results_dir: Path,
                    steps: Steps) -> None:
    target = make_target(LUN_SIZE)
    disk = hba.attach(target.url())
    steps(f"attach -> {disk.node}")
    fio_verify(disk.node, VERIFY_SIZE, results_dir)
    steps(f"fio: {VERIFY_SIZE >> 20} MiB random writes at QD32, verified")
    hba.detach(disk.name)
    steps("detach")
    kernel_and_daemon_clean(hba)


def test_chap_mutual_and_digests(hba: DaemonThread, make_target: TargetFactory,
                                 tmp_path: Path, results_dir: Path, steps: Steps) -> None:
    target = make_target(LUN_SIZE, chap=Chap.two_way(), digests=True)
    url = target.url()
    url += ("&" if "?" in url else "?") + "header_digest=crc32c&data_digest=crc32c"
    disk = hba.attach(url)
    steps(f"attach -> {disk.node}")
    check_disk(disk, target.size)
    info = hba.session_info(disk.name)
    assert info["header_digest"] is True and info["data_digest"] is True, info
    filesystem_round(disk.node, "ext4", tmp_path / "mnt", steps)
    fio_verify(disk.node, VERIFY_SIZE, results_dir)
    steps(f"fio: {VERIFY_SIZE >> 20} MiB random writes at QD32, verified")
    hba.detach(disk.name)
    steps("detach")
    kernel_and_daemon_clean(hba)


# ------------------------------------------------------------------------------------------
# target restart in the middle of a write


def _drop_tgtd(tgtd: Tgtd, target: TargetInfo) -> None:
    tgtd.kill()
    time.sleep(1.0)
    tgtd.restart()


def _drop_lio(lio: helpers.Lio, target: TargetInfo) -> None:
    # Disabling the TPG releases its sessions (their TCP connections are closed); logins are
    # refused while it is disabled. The ramdisk keeps its data.
    import rtslib_fb as rts

    tpg = rts.TPG(rts.Target(rts.FabricModule("iscsi"), target.iqn, mode="lookup"), 1,
                  mode="lookup")
    tpg.enable = False
    deadline = time.monotonic() + 30
    while lio_sessions(target.iqn) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert lio_sessions(target.iqn) == [], "disabling the TPG did not end the session"
    time.sleep(1.0)
    tpg.enable = True


@pytest.mark.parametrize("kind", ["lio", "tgtd"])
def test_target_restart_mid_write(hba: DaemonThread, kind: str, request: pytest.FixtureRequest,
                                  results_dir: Path, steps: Steps) -> None:
    if kind == "tgtd":
        tgtd: Tgtd = request.getfixturevalue("tgtd")
        target: TargetInfo = tgtd.add_target(LUN_SIZE)

        def drop() -> None:
            _drop_tgtd(tgtd, target)
    else:
        lio: helpers.Lio = request.getfixturevalue("lio")
        target = lio.create(LUN_SIZE)

        def drop() -> None:
            _drop_lio(lio, target)

    disk = hba.attach(target.url())
    steps(f"attach -> {disk.node}")
    size = RESTART_SIZE
    argv = ["fio", "--name=restart", f"--filename={disk.node}", "--ioengine=libaio",
            "--direct=1", "--output-format=json", *verify_args(size, seed=7)]
    errors: list[BaseException] = []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        # Drop the target once the write phase is well under way.
        deadline = time.monotonic() + 120
        while hba.session_info(disk.name)["bytes_out"] < 2 * MiB:
            assert proc.poll() is None, "fio ended before the target could be restarted"
            assert time.monotonic() < deadline, "fio wrote nothing within 120 s"
            time.sleep(0.2)
        assert proc.poll() is None, "fio ended before the target could be restarted"
        written_before = hba.session_info(disk.name)["bytes_out"]
        steps(f"fio started, {written_before} bytes written")

        def drop_and_time() -> None:
            drop()
            steps("target dropped and back" if kind == "lio" else "tgtd killed and restarted")

        dropper = threading.Thread(target=lambda: _catch(drop_and_time, errors))
        dropper.start()
        try:
            stdout, stderr = proc.communicate(timeout=600)
        finally:
            dropper.join(120)
    steps(f"fio done ({size >> 20} MiB random writes at QD32, verified)")
    assert not errors, errors
    (results_dir / "fio-restart.json").write_text(stdout)
    (results_dir / "fio-restart.stderr").write_text(stderr)
    report = _fio_report(argv, subprocess.CompletedProcess(argv, proc.returncode, stdout,
                                                           stderr))
    job = report["jobs"][0]
    assert job["write"]["io_bytes"] == size and job["read"]["io_bytes"] == size, job
    info = hba.session_info(disk.name)
    assert info["reconnects"] >= 1, f"the session never reconnected: {info}"
    assert info["state"] == "logged in", info
    assert written_before < size
    # Read everything once more, as written, from the target itself (direct I/O).
    fio(disk.node, *verify_args(size, seed=7), "--verify_only", name="restart-reverify",
        results=results_dir)
    steps("fio --verify_only")
    hba.detach(disk.name)
    steps("detach")
    kernel_and_daemon_clean(hba)


def _catch(fn: Callable[[], None], errors: list[BaseException]) -> None:
    try:
        fn()
    except BaseException as exc:  # reported by the test thread
        errors.append(exc)


# ------------------------------------------------------------------------------------------
# detach leaves nothing


CYCLES = 20


def test_attach_detach_leaks_nothing(hba: DaemonThread,
                                     lio_target: Callable[..., helpers.LioTarget],
                                     steps: Steps) -> None:
    target = lio_target(16 * MiB)
    url = target.url()
    # One round first: lazily created things (executor threads, caches) settle.
    disk = hba.attach(url)
    hba.detach(disk.name)
    kernel_and_daemon_clean(hba)
    before = hba.snapshot()
    steps("first attach and detach")
    for cycle in range(CYCLES):
        disk = hba.attach(url)
        assert lio_sessions(target.iqn), f"cycle {cycle}: no session on the target"
        hba.detach(disk.name)
        assert not os.path.exists(disk.node), f"cycle {cycle}: {disk.node} still exists"
        assert not Path(f"/sys/bus/scsi/devices/{disk.scsi_address}").exists()
        assert leftovers() == [], f"cycle {cycle}: {leftovers()}"
        status = hba.status()
        assert status["disks"] == [] and status["sessions"] == [], (cycle, status)
        deadline = time.monotonic() + 10
        while lio_sessions(target.iqn) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert lio_sessions(target.iqn) == [], f"cycle {cycle}: the target still has a session"
        steps(f"cycle {cycle + 1}")
    after = hba.snapshot()
    assert after.tasks == before.tasks, (before.tasks, after.tasks)
    assert after.threads == before.threads, (before.threads, after.threads)
    assert after.executor_threads <= max(before.executor_threads, min(32, (os.cpu_count()
                                                                           or 1) + 4))
    opened = set(after.fds) - set(before.fds)
    assert len(after.fds) <= len(before.fds), (before.fds, after.fds)
    assert not opened, f"fds left open after {CYCLES} cycles: {after.describe_fds(opened)}"
