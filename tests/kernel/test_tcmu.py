"""The TCMU handler against the real kernel: a ``user:iscsi`` backstore served by
``python -m tcmu_handler.serve`` (logged in to an LIO target in the same VM), exported through
tcm_loop as ``/dev/sdX``.

Checks: the disk reports the remote LUN's identity (pass-through INQUIRY and VPD 0x83); data
written with O_DIRECT at several block sizes reads back identical through the disk and straight
from the target; concurrent I/O wraps a small ring (PAD entries, out-of-order completion); the
kernel's task management (LUN RESET, ABORT TASK) reaches the handler as TMR entries without
breaking the ring; a handler killed in the middle of a write is replaced (ring replay, ring
takeover) with no data lost; the handler's exit paths (SIGTERM, device busy or missing, login
refused); the teardown goes through the handler, which then exits by itself, and leaves
nothing in configfs.

Setting a disk up costs ~15 s under TCG, so most tests share one (module scope, a 1 MiB command
ring so that it wraps often); a test that leaves its handler dead gets the disk recreated for
the next one. The teardown test makes its own.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.kernel import helpers
from tests.kernel.tcmu import (
    Handler,
    TcmuDisk,
    create_backstore,
    delete_backstore,
    hbactl,
    hbactl_json,
    remote_num_cmds,
    sha256_of,
)

LioFactory = Callable[..., helpers.LioTarget]

MiB = 1 << 20
REMOTE_SIZE = 64 * MiB
SMALL_RING = "cmd_ring_size_mb=1"
"""1 MiB - 128 bytes of ring: 8191 entries of 128 bytes (a 4 KiB READ/WRITE(10))."""


def make_remote(lio: helpers.Lio) -> helpers.LioTarget:
    """The remote LUN: an LIO ramdisk with its write cache on, so that the local disk is
    ``write back`` and the LUN's removal sends SYNCHRONIZE CACHE."""
    import rtslib_fb as rts

    target = lio.create(REMOTE_SIZE)
    rts.RDMCPStorageObject(target.storage_name).set_attribute("emulate_write_cache", "1")
    return target


class SharedDisk:
    def __init__(self, remote: helpers.LioTarget, log_dir: Path) -> None:
        self.remote = remote
        self.log_dir = log_dir
        self.disk: TcmuDisk | None = None
        self.made = 0

    def get(self) -> TcmuDisk:
        if self.disk is not None and not self.disk.handler.running:
            self.close()  # a test left it without a handler: start afresh
        if self.disk is None:
            self.made += 1
            self.disk = TcmuDisk.create(self.remote.url(), self.log_dir / f"handler-{self.made}"
                                        ".log", control=SMALL_RING)
        return self.disk

    def close(self) -> None:
        disk, self.disk = self.disk, None
        if disk is not None:
            disk.destroy()
            assert "Traceback" not in disk.handler.log(), disk.handler.log_tail()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedDisk]:
    lio = helpers.Lio(tmp_path_factory.mktemp("lio"))
    base = Path(os.environ.get("HBA_VM_RESULTS", "/tmp/hba-vm-results"))
    log_dir = base / "kernel" / "test_tcmu_shared_disk"
    log_dir.mkdir(parents=True, exist_ok=True)
    holder = SharedDisk(make_remote(lio), log_dir)
    try:
        yield holder
    finally:
        try:
            holder.close()
        finally:
            lio.remove_all()


@pytest.fixture
def remote(shared: SharedDisk) -> helpers.LioTarget:
    return shared.remote


@pytest.fixture
def tcmu_disk(shared: SharedDisk) -> TcmuDisk:
    disk = shared.get()
    helpers.run(["udevadm", "settle"])
    return disk


def random_file(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    return path


def dd_write(source: Path, node: str, block: int, *, seek_blocks: int = 0,
             timeout: float = 900) -> None:
    helpers.run(["dd", f"if={source}", f"of={node}", f"bs={block}", f"seek={seek_blocks}",
                 "oflag=direct", "conv=notrunc", "status=none"], timeout=timeout)


def remote_sha256(remote: helpers.LioTarget, size: int, path: Path) -> str:
    """Read the remote LUN straight from the LIO target (hbactl), not through the disk."""
    hbactl("read", remote.url(), "--lba", "0", "--blocks", str(size // 512), "-o", str(path))
    digest = sha256_of(path, size, direct=False)
    path.unlink()
    return digest


class Dmesg:
    """The kernel log from the moment this object was made."""

    def __init__(self) -> None:
        self._skip = len(self._lines())

    @staticmethod
    def _lines() -> list[str]:
        return helpers.run(["dmesg"]).stdout.splitlines()

    def new(self) -> str:
        return "\n".join(self._lines()[self._skip:])


def wait_for(condition: Callable[[], bool], timeout: float, what: str,
             interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(interval)


def block_stat(disk: TcmuDisk) -> list[int]:
    """``/sys/block/sdX/stat`` (field 6: sectors written)."""
    return [int(x) for x in (disk.sys_block / "stat").read_text().split()]


def written_since(disk: TcmuDisk, mark: int, amount: int) -> Callable[[], bool]:
    """A condition: ``amount`` bytes written to the disk since ``mark`` (bytes written then)."""
    return lambda: block_stat(disk)[6] * 512 - mark >= amount


def writes_in_flight(disk: TcmuDisk) -> int:
    return int((disk.sys_block / "inflight").read_text().split()[1])


# ------------------------------------------------------------------------------------------


def test_disk_reports_the_remote_identity(tcmu_disk: TcmuDisk,
                                          remote: helpers.LioTarget) -> None:
    ident = hbactl_json("inquiry", remote.url())
    node = tcmu_disk.node
    helpers.assert_identity(node, ident)
    # The kernel's own view of the same page, and the size from READ CAPACITY.
    assert (tcmu_disk.sys_block / "device" / "wwid").read_text().strip() == ident["naa"]
    size = int(helpers.run(["blockdev", "--getsize64", node]).stdout)
    assert size == remote.size == tcmu_disk.size


# 64 MiB of random data, written in three stretches of different block sizes (each O_DIRECT
# write is one SCSI command of that size; hw_max_sectors=2048 lets 1 MiB through whole).
STRETCHES = ((4096, 4 * MiB), (64 * 1024, 28 * MiB), (MiB, 32 * MiB))


def test_direct_writes_read_back_identical(tcmu_disk: TcmuDisk, remote: helpers.LioTarget,
                                           tmp_path: Path) -> None:
    size = sum(length for _, length in STRETCHES)
    assert size == REMOTE_SIZE
    data = random_file(tmp_path / "data", size)
    expected = sha256_of(data, size, direct=False)
    timings = []
    offset = 0
    for block, length in STRETCHES:
        part = tmp_path / f"part-{block}"
        helpers.run(["dd", f"if={data}", f"of={part}", f"bs={MiB}", f"skip={offset // MiB}",
                     f"count={length // MiB}", "status=none"])
        helpers.run(["udevadm", "settle"])
        before = tcmu_disk.handler.stats()["submitted"]
        started = time.monotonic()
        dd_write(part, tcmu_disk.node, block, seek_blocks=offset // block)
        elapsed = time.monotonic() - started
        commands = tcmu_disk.handler.stats()["submitted"] - before
        timings.append(f"bs={block}: {length / MiB / elapsed:.2f} MiB/s, {commands} commands")
        # One command per write (a few more from udev's probes): nothing was split on the way.
        assert length // block <= commands < 2 * (length // block), timings
        part.unlink()
        offset += length
    print("dd oflag=direct through the handler under TCG:", ", ".join(timings))
    assert sha256_of(tcmu_disk.node, size) == expected
    assert remote_sha256(remote, size, tmp_path / "remote") == expected
    stats = tcmu_disk.handler.stats()
    assert stats["unknown_op"] == stats["failed"] == 0, stats


def test_small_ring_wraps_under_concurrent_io(tcmu_disk: TcmuDisk) -> None:
    """4 KiB random writes and their verification reads at queue depth 16 through the 1 MiB
    ring: it wraps, PAD entries are skipped, commands complete out of order, and every block
    reads back as written (fio's crc32c verify)."""
    before = tcmu_disk.handler.stats()
    helpers.run(["fio", "--name=wrap", f"--filename={tcmu_disk.node}", "--direct=1",
                 "--ioengine=libaio", "--iodepth=16", "--rw=randwrite", "--bs=4k",
                 "--size=20M", "--verify=crc32c", "--verify_fatal=1", "--randrepeat=0",
                 "--output-format=terse"], timeout=900)
    stats = tcmu_disk.handler.stats()
    assert stats["submitted"] - before["submitted"] >= 10240, stats
    assert stats["wraps"] > before["wraps"] and stats["pads"] > before["pads"], stats
    assert stats["unknown_op"] == stats["failed"] == 0, stats


def test_lun_reset_reaches_the_handler_as_a_tmr_entry(tcmu_disk: TcmuDisk,
                                                      tmp_path: Path) -> None:
    """``sg_reset --device``: tcm_loop's LOGICAL UNIT RESET; LIO tells TCMU (tmr_notify), the
    handler reads the TMR entry (no command to abort) and the ring keeps working."""
    before = tcmu_disk.handler.stats()
    helpers.run(["sg_reset", "--device", tcmu_disk.node])
    wait_for(lambda: tcmu_disk.handler.log_of_last_start().count("task management LUN RESET")
             > 0, 30, "the TMR entry in the handler's log")
    data = random_file(tmp_path / "data", MiB)
    dd_write(data, tcmu_disk.node, 4096)
    assert sha256_of(tcmu_disk.node, MiB) == sha256_of(data, MiB, direct=False)
    stats = tcmu_disk.handler.stats()
    assert stats["tmr_entries"] == before["tmr_entries"] + 1, stats
    assert stats["lun_resets"] == before["lun_resets"], "nothing to reset at the target"


def test_aborted_command_reaches_the_handler_as_a_tmr_entry(tcmu_disk: TcmuDisk,
                                                            tmp_path: Path) -> None:
    """A command that times out in the SCSI mid-layer is aborted (tcm_loop ABORT TASK); with
    the handler frozen, the ring then holds the command and, after it, a TMR entry naming it.
    Resumed, the handler aborts it at the target and completes it; the mid-layer retries it."""
    data = random_file(tmp_path / "data", MiB)
    dd_write(data, tcmu_disk.node, MiB)
    # udev probes the disk after a write: its reads must not be frozen with the handler (a
    # failfast readahead that times out is an I/O error).
    helpers.run(["udevadm", "settle"])
    handler = tcmu_disk.handler
    before = handler.stats()
    timeout_file = tcmu_disk.sys_block / "device" / "timeout"
    saved = timeout_file.read_text().strip()
    kernel_log = Dmesg()
    timeout_file.write_text("3")
    handler.signal(signal.SIGSTOP)
    try:
        dd = subprocess.Popen(["dd", f"if={tcmu_disk.node}", f"of={tmp_path / 'back'}",
                               f"bs={MiB}", "count=1", "iflag=direct", "status=none"],
                              stderr=subprocess.PIPE, text=True)
        wait_for(lambda: "ABORT_TASK: Found referenced" in kernel_log.new(), 60,
                 "the SCSI mid-layer's abort", interval=0.5)
    finally:
        handler.signal(signal.SIGCONT)
        timeout_file.write_text(saved)
    _, err = dd.communicate(timeout=120)
    assert dd.returncode == 0, err
    assert sha256_of(tmp_path / "back", MiB, direct=False) == sha256_of(data, MiB, direct=False)
    log = handler.log_of_last_start()
    assert re.search(r"task management ABORT TASK for 1 command\(s\), 1 still in flight",
                     log), log
    stats = handler.stats()
    assert stats["tmr_entries"] == before["tmr_entries"] + 1, stats
    assert stats["aborts"] == before["aborts"] + 1, stats
    # The ring still works.
    dd_write(data, tcmu_disk.node, 64 * 1024, seek_blocks=16)
    assert handler.running


def test_killed_handler_is_replaced_without_losing_data(
        tcmu_disk: TcmuDisk, remote: helpers.LioTarget, tmp_path: Path) -> None:
    """SIGKILL the handler twice in the middle of a long O_DIRECT write: the first successor
    replays the ring from cmd_tail (``--no-takeover``), the second takes the ring over (the
    default: block, reset_ring, unblock, and the kernel retries the failed-BUSY commands).
    dd never sees an error and every byte arrives."""
    size = 32 * MiB
    data = random_file(tmp_path / "data", size)
    expected = sha256_of(data, size, direct=False)
    handler = tcmu_disk.handler
    kernel_log = Dmesg()
    mark = block_stat(tcmu_disk)[6] * 512
    dd = subprocess.Popen(["dd", f"if={data}", f"of={tcmu_disk.node}", "bs=64k",
                           "oflag=direct", "status=none"], stderr=subprocess.PIPE, text=True)
    try:
        for restart_args in (("--no-takeover",), ()):
            wait_for(written_since(tcmu_disk, mark, 4 * MiB), 120, "4 MiB written")
            # Freeze the handler with a write in flight, so that the ring holds a command it
            # took and will never complete, then kill it.
            handler.signal(signal.SIGSTOP)
            wait_for(lambda: writes_in_flight(tcmu_disk) > 0, 30, "a write in flight")
            time.sleep(0.5)
            assert writes_in_flight(tcmu_disk) > 0
            handler.kill()
            assert dd.poll() is None, "dd finished before the handler was killed"
            time.sleep(1)  # commands pile up on the ring meanwhile
            handler.start(*restart_args)
            mark = block_stat(tcmu_disk)[6] * 512
            log = handler.log_of_last_start()
            if restart_args:
                assert "took over" not in log, log
            else:
                assert "taking it over" in log and "took over the device" in log, log
        _, err = dd.communicate(timeout=600)
        assert dd.returncode == 0, err
    finally:
        if dd.poll() is None:
            dd.kill()
            dd.wait()
    assert sha256_of(tcmu_disk.node, size) == expected
    assert remote_sha256(remote, size, tmp_path / "remote") == expected
    assert "error" not in kernel_log.new().lower(), kernel_log.new()


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if " ERROR " in line]


def test_serve_exit_paths(lio: helpers.Lio, results_dir: Path) -> None:
    """``tcmu_handler.serve`` without a disk: SIGTERM is a clean exit; a device another
    handler holds, a device that never appears and a refused login are one ERROR line each
    and exit status 1, with the serving handler left undisturbed."""
    remote = lio.create(16 * MiB)
    name = f"hba_tcmu_{os.urandom(3).hex()}"
    create_backstore(name, remote.size)
    try:
        owner = Handler(remote.url(), name, results_dir / "owner.log")
        owner.start()
        bad_iqn = remote.url().replace(remote.iqn, remote.iqn + "-missing")
        failing = {
            "busy": Handler(remote.url(), name, results_dir / "busy.log"),
            "missing": Handler(remote.url(), name + "-missing", results_dir / "missing.log",
                               "--wait", "2"),
            "login": Handler(bad_iqn, name, results_dir / "login.log"),
        }
        for handler in failing.values():
            handler.start(wait_ready=False)
        expected = {"busy": "is already open: another handler owns",
                    "missing": "(waited 2 s)",
                    "login": "cannot log in to"}
        for key, handler in failing.items():
            assert handler.wait(120) == 1, handler.log()
            log = handler.log_of_last_start()
            errors = error_lines(log)
            assert len(errors) == 1 and expected[key] in errors[0], log
            assert "Traceback" not in log
        assert owner.running
        owner.signal(signal.SIGTERM)
        assert owner.wait(60) == 0
        log = owner.log_of_last_start()
        after_ready = log.split(" serving uio", 1)[1].splitlines()[1:]
        assert len(after_ready) == 1 and "stopped by SIGTERM" in after_ready[0], log
        assert "Traceback" not in log
    finally:
        delete_backstore(name)


def test_teardown_goes_through_the_handler_and_leaves_nothing(
        lio: helpers.Lio, results_dir: Path) -> None:
    remote = make_remote(lio)
    before = helpers.configfs_objects()
    disk = TcmuDisk.create(remote.url(), results_dir / "handler.log")
    try:
        cache_type = next((disk.sys_block / "device" / "scsi_disk").glob("*/cache_type"))
        assert cache_type.read_text().strip() == "write back"
        commands = remote_num_cmds(remote.storage_name)
        assert commands is not None
        kernel_log = Dmesg()
        # LUN unlink: sd's removal sends SYNCHRONIZE CACHE, which the handler must serve
        # (else the unlink hangs until cmd_time_out and the kernel logs the failure).
        disk.unexport()
        assert disk.handler.running
        assert "Synchronizing SCSI cache" in kernel_log.new()
        assert "error" not in kernel_log.new().lower(), kernel_log.new()
        assert (remote_num_cmds(remote.storage_name) or 0) > commands
        # Backstore deletion: the uio device goes away and the handler exits by itself.
        disk.delete_backstore()
        assert disk.handler.wait(60) == 0
    except BaseException:
        disk.destroy()
        raise
    assert disk.leftovers() == []
    assert helpers.configfs_objects() == before
    log = disk.handler.log_of_last_start()
    assert "Traceback" not in log
    last = log.strip().splitlines()[-1]
    assert "was removed" in last and "0 command(s) in flight" in last, log
