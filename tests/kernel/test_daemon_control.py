"""The control plane in the VM: ``hbactl daemon`` as a process, the ``hbactl`` clients over the
system DBus, targetcli through the daemon's ``org.kernel.TCMUService1`` handler.

Checks: an ``Enable = on`` entry of a mode-600 configuration (with a CHAP secret) is attached
before ``READY=1``; ``hbactl attach URL`` prints a usable ``/dev/sdX``; ``list`` and ``status
--json`` show both; ``detach`` refuses a mounted disk and works after ``umount`` or with
``--force``; a configuration others can read, or with a bad line, is refused with ``chmod 600``
and ``file:line``; a second daemon is refused; a daemon killed with SIGKILL in the middle of a
``dd`` is restarted, takes the disk over and the ``dd`` completes with the data intact;
an ``Enable = on`` entry whose target comes up only after the start is attached once it does,
SIGHUP attaches a newly enabled entry and ``detach`` ends its retry;
``targetcli /backstores/user:iscsi create`` plus a ``/loopback`` LUN is served by the running
daemon (the disk answers INQUIRY with the remote identity) and ``CheckConfig`` turns a bad
cfgstring away with a reason. Every test leaves configfs as it found it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hba import kernel
from tests.kernel import helpers
from tests.kernel.hba_daemon import HBACTL, DaemonProcess
from tests.kernel.tcmu import sha256_of
from tests.support.targets import Chap, free_tcp_port, unique_iqn
from tests.support.tgtd import FIRST_DATA_LUN, Tgtd

LioFactory = Callable[..., helpers.LioTarget]

# Under TCG every hbactl/targetcli start costs seconds, and mkfs goes through the Python ring.
pytestmark = pytest.mark.timeout(900)

CHECKOUT = Path(__file__).resolve().parents[2]
MiB = 1 << 20
POLICY = Path("/etc/dbus-1/system.d/iscsi-hba.conf")
MKFS = ("mkfs.ext4", "-q", "-F", "-O", "^has_journal")  # no journal to write: quicker under TCG


def hbactl(*args: str, check: bool = True, timeout: float = 300.0
           ) -> subprocess.CompletedProcess[str]:
    return helpers.run([HBACTL, *args], check=check, timeout=timeout)


def hbactl_json(*args: str) -> Any:
    return json.loads(hbactl(*args, "--json").stdout)


def disks() -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = hbactl_json("list")["disks"]
    return result


def leftovers() -> list[str]:
    """Our backstores and tcm_loop targets still in configfs."""
    found = [f"backstore user_{b.hba_index}/{b.name}" for b in kernel.list_backstores()]
    loopback = helpers.CONFIGFS_TARGET / "loopback"
    if loopback.is_dir():
        found += [f"loopback {p.name}" for p in loopback.iterdir() if p.name.startswith("naa.")]
    return found


def write_config(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def entry(nickname: str, target: helpers.LioTarget, *extra: str) -> str:
    lines = [f"{nickname} {{", f"    TargetAddress = {target.portal}",
             f"    TargetName    = {target.iqn}", f"    Lun           = {target.lun}"]
    if target.chap is not None:
        lines += [f"    chapIName     = {target.chap.userid}",
                  f'    chapSecret    = "{target.chap.password}"']
    lines += [f"    {line}" for line in extra] + ["}", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# the daemon process (tests.kernel.hba_daemon.DaemonProcess)


@pytest.fixture
def daemon(lio: helpers.Lio, tmp_path: Path, results_dir: Path) -> Iterator[DaemonProcess]:
    """A daemon (not started) with an empty configuration; ``daemon.config`` may be rewritten
    before ``start()``. At the end every disk is detached through it (before the ``lio``
    targets go) and it is stopped; nothing of ours may be left in configfs."""
    assert not leftovers(), f"configfs not clean before the test: {leftovers()}"
    (results_dir / "daemon.log").unlink(missing_ok=True)  # the share outlives the VM
    proc = DaemonProcess(write_config(tmp_path / "iscsi-hba.conf", ""),
                         results_dir / "daemon.log")
    yield proc
    try:
        if leftovers() and not proc.running:
            proc.start()  # takes the disks over, so that they can be detached in order
        if proc.running:
            for disk in disks():
                hbactl("detach", "--force", disk["name"], check=False)
            status = proc.stop()
            assert status == 0, f"hbactl daemon exited with {status}:\n{proc.log()}"
    finally:
        if proc.proc is not None:
            proc.kill()
    assert "Traceback" not in proc.log(), proc.log()
    assert not leftovers(), f"left in configfs: {leftovers()}"


@pytest.fixture(autouse=True)
def _dbus_policy() -> None:
    """deploy/setup installs the policy on the host, whose /etc the VM shares; the system bus
    read it at boot. Without it, say so (a test-only install could hide a broken setup)."""
    assert POLICY.exists(), (f"{POLICY} is missing: run deploy/setup on the host (it installs "
                             "deploy/dbus/iscsi-hba.conf), then run the VM again")
    assert POLICY.read_bytes() == (CHECKOUT / "deploy/dbus/iscsi-hba.conf").read_bytes(), \
        f"{POLICY} differs from deploy/dbus/iscsi-hba.conf: run deploy/setup on the host"


# ------------------------------------------------------------------------------------------


def test_daemon_attach_list_status_detach(daemon: DaemonProcess, lio_target: LioFactory,
                                          tmp_path: Path) -> None:
    chap_target = lio_target(64 * MiB, chap=Chap.one_way())
    url_target = lio_target(32 * MiB)
    assert chap_target.chap is not None
    write_config(daemon.config, entry("disk1", chap_target) + entry(
        "spare", url_target, "Enable = off"))
    started = time.monotonic()
    daemon.start()
    ready_after = time.monotonic() - started

    # The Enable = on entry is attached before READY=1; the other one is not.
    (disk1,) = disks()
    assert (disk1["name"], disk1["target"], disk1["lun"], disk1["size"]) == \
        ("disk1", chap_target.iqn, 0, 64 * MiB)
    assert disk1["session"] == "logged in" and disk1["state"] == "attached"
    assert stat.S_ISBLK(os.stat(disk1["device"]).st_mode)
    assert disk1["by_id"] and os.path.realpath(disk1["by_id"]) == disk1["device"]

    # attach URL: prints the device once usable.
    started = time.monotonic()
    out = hbactl("attach", url_target.url()).stdout
    attach_took = time.monotonic() - started
    node = out.strip()
    assert re.fullmatch(r"/dev/sd[a-z]+", node), out
    assert stat.S_ISBLK(os.stat(node).st_mode)
    size = int(helpers.run(["blockdev", "--getsize64", node]).stdout)
    assert size == 32 * MiB
    (disk2,) = [d for d in disks() if d["device"] == node]
    assert disk2["target"] == url_target.iqn and disk2["portal"] == url_target.portal

    table = hbactl("list").stdout.splitlines()
    assert table[0].split() == ["NAME", "TARGET", "LUN", "DEVICE", "SIZE", "STATE"]
    assert any(line.split()[:4] == ["disk1", chap_target.iqn, "0", disk1["device"]]
               and "64.0 MiB" in line and line.endswith("logged in") for line in table), table
    status = hbactl_json("status")
    assert status["ready"] is True and status["config"] == str(daemon.config)
    assert status["tcmu_handler"] is True
    assert sorted(d["name"] for d in status["disks"]) == sorted(["disk1", disk2["name"]])
    assert sorted(s["target"] for s in status["sessions"]) == \
        sorted([chap_target.iqn, url_target.iqn])
    assert chap_target.chap.password not in json.dumps(status)

    # A second daemon is refused, before it touches anything.
    second = hbactl("daemon", "--config", str(daemon.config), check=False, timeout=120)
    assert second.returncode == 1 and "already runs" in second.stderr, second
    assert len(disks()) == 2

    # detach refuses while mounted, works after umount.
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    helpers.run([*MKFS, node])
    helpers.run(["mount", node, mnt])
    (mnt / "file").write_bytes(os.urandom(MiB))
    refused = hbactl("detach", disk2["name"], check=False)
    assert refused.returncode == 1
    assert f"is mounted on {mnt}" in refused.stderr and "--force" in refused.stderr, refused
    assert "Traceback" not in refused.stderr
    helpers.run(["umount", mnt])
    helpers.run(["fsck.ext4", "-fn", node])
    out = hbactl("detach", node).stdout
    assert out.strip() == f"detached {disk2['name']} ({node})"
    assert not os.path.exists(node)

    # --force detaches a mounted disk (its filesystem then sees I/O errors).
    helpers.run([*MKFS, disk1["device"]])
    helpers.run(["mount", disk1["device"], mnt])
    try:
        refused = hbactl("detach", "disk1", check=False)
        assert refused.returncode == 1 and "is mounted on" in refused.stderr
        detached = hbactl_json("detach", "--force", "disk1")
        assert detached["state"] == "detached" and detached["name"] == "disk1"
    finally:
        helpers.run(["umount", "-l", mnt], check=False)
    assert disks() == []
    assert not leftovers()

    assert daemon.stop() == 0
    log = daemon.log()
    assert chap_target.chap.password not in log
    for expected in ("attached disk1:", f"attached {disk2['name']}:", "detached disk1",
                     f"detached {disk2['name']}", f"session {chap_target.iqn}",
                     "iscsi-hba daemon ready: 1 disk"):
        assert expected in log, (expected, log)
    print(f"READY=1 after {ready_after:.1f} s (one attach); hbactl attach took "
          f"{attach_took:.1f} s")


def test_unusable_configurations_are_refused(tmp_path: Path, lio_target: LioFactory) -> None:
    target = lio_target(16 * MiB, chap=Chap.one_way())
    readable = write_config(tmp_path / "readable.conf", entry("disk1", target), 0o644)
    proc = hbactl("daemon", "--config", str(readable), check=False, timeout=120)
    assert proc.returncode == 78, proc
    assert f"chmod 600 {readable}" in proc.stderr and "Traceback" not in proc.stderr
    assert target.chap is not None and target.chap.password not in proc.stderr

    bad = write_config(tmp_path / "bad.conf",
                       "disk1 {\n    TargetAddress = 127.0.0.1\n    Lun = many\n}\n")
    proc = hbactl("daemon", "--config", str(bad), check=False, timeout=120)
    assert proc.returncode == 78, proc
    assert f"{bad}:3:" in proc.stderr and "Lun" in proc.stderr, proc.stderr
    assert f"{bad}:1:" in proc.stderr and "TargetName" in proc.stderr, proc.stderr

    # No daemon: the clients say so, and how to start one.
    for command in (["list"], ["status", "--json"], ["attach", "disk1"], ["detach", "disk1"]):
        proc = hbactl(*command, check=False)
        assert proc.returncode == 1, proc
        assert "not running" in proc.stderr and "systemctl start iscsi-hba" in proc.stderr
    assert not leftovers()


def start_dd(node: str, tmp_path: Path, size: int) -> tuple[subprocess.Popen[bytes], str]:
    """A ``dd`` of ``size`` random bytes (``tmp_path/data``) to ``node``, direct, started;
    and the SHA-256 the disk's first ``size`` bytes must have once it is done."""
    data = tmp_path / "data"
    data.write_bytes(os.urandom(size))
    expected = sha256_of(data, size, direct=False)
    dd = subprocess.Popen(["dd", f"if={data}", f"of={node}", "bs=64k", "oflag=direct",
                           "conv=notrunc", "status=none"], stderr=subprocess.PIPE)
    return dd, expected


def test_sigkill_restart_takes_the_disk_over(daemon: DaemonProcess, lio_target: LioFactory,
                                             tmp_path: Path) -> None:
    target = lio_target(64 * MiB)
    daemon.start()
    node = hbactl("attach", target.url()).stdout.strip()
    size = 32 * MiB
    dd, expected = start_dd(node, tmp_path, size)
    time.sleep(2.0)
    killed_during_dd = dd.poll() is None
    daemon.kill()
    time.sleep(1.0)  # the dd's commands pile up in the ring meanwhile
    started = time.monotonic()
    daemon.start()
    takeover = time.monotonic() - started
    _, err = dd.communicate(timeout=900)
    assert dd.returncode == 0, err
    assert sha256_of(node, size) == expected

    (disk,) = disks()
    assert disk["device"] == node and disk["session"] == "logged in"
    remote = tmp_path / "remote"
    hbactl("read", target.url(), "--lba", "0", "--blocks", str(size // 512), "-o", str(remote))
    assert sha256_of(remote, size, direct=False) == expected
    log = daemon.log()
    assert "took over" in log and "--- start 2" in log
    print(f"dd still running when killed: {killed_during_dd}; READY=1 {takeover:.1f} s after "
          "the restart")


def test_enabled_entry_waits_for_its_target(daemon: DaemonProcess, tmp_path: Path) -> None:
    """An ``Enable = on`` entry whose target is not up yet is retried until it attaches; SIGHUP
    attaches a newly enabled entry; ``detach`` stops a retry."""
    port = free_tcp_port()
    iqn = unique_iqn("late")
    late = "\n".join(["late {", "    TargetAddress = 127.0.0.1:" + str(port),
                      f"    TargetName = {iqn}", f"    Lun = {FIRST_DATA_LUN}", "}", ""])
    write_config(daemon.config, late)
    daemon.start()
    (row,) = disks()
    assert (row["name"], row["state"], row["device"]) == ("late", "retrying", None), row
    assert f"cannot connect to iSCSI portal 127.0.0.1:{port}" in row["error"], row
    assert hbactl("list").stdout.splitlines()[1].endswith("retrying")
    assert "cannot connect" in hbactl("status").stdout

    tgtd = Tgtd(tmp_path / "tgtd", port=port)
    tgtd.launch()
    try:
        tgtd.add_target(16 * MiB, iqn=iqn)
        disk = helpers.wait_for(lambda: next((d for d in disks() if d["device"]), None), 120,
                        "the disk of the late entry")
        assert disk["name"] == "late" and disk["state"] == "attached"
        node = disk["device"]
        data = os.urandom(MiB)
        (tmp_path / "data").write_bytes(data)
        helpers.run(["dd", f"if={tmp_path / 'data'}", f"of={node}", "bs=64k", "oflag=direct",
                     "status=none"])
        back = subprocess.run(["dd", f"if={node}", "bs=64k", "count=16", "iflag=direct",
                               "status=none"], capture_output=True, check=True,
                              timeout=120).stdout
        assert back == data

        # SIGHUP: a new Enable = on entry, whose target is down, is retried; detach ends it.
        ghost = "\n".join(["ghost {", f"    TargetAddress = 127.0.0.1:{free_tcp_port()}",
                           f"    TargetName = {unique_iqn('ghost')}", "}", ""])
        write_config(daemon.config, late + ghost)
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        # Listed as "attaching" while its first attempt runs, then "retrying".
        row = helpers.wait_for(lambda: next((d for d in disks() if d["name"] == "ghost"
                                             and d["state"] != "attaching"), None), 60,
                               "the ghost entry in hbactl list, attempted")
        assert row["state"] == "retrying", row
        assert hbactl("detach", "ghost").stdout.strip() == "detached ghost"
        assert [d["name"] for d in disks()] == ["late"]
        assert hbactl("detach", "late").stdout.strip() == f"detached late ({node})"
    finally:
        tgtd.stop()
    log = daemon.log()
    for expected in ("could not attach late (attempt 1)", "attached late:",
                     "could not attach ghost (attempt 1)", "detached late"):
        assert expected in log, (expected, log)


def targetcli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return helpers.run(["targetcli", *args], check=check, timeout=180)


def test_targetcli_backstore_is_served_by_the_daemon(daemon: DaemonProcess,
                                                     lio_target: LioFactory) -> None:
    target = lio_target(32 * MiB)
    daemon.start()
    targetcli("set", "global", "auto_save_on_exit=false")
    listing = targetcli("ls", "/backstores").stdout
    assert "user:iscsi" in listing, listing
    help_text = targetcli("/backstores/user:iscsi", "help", "create").stdout
    assert "%3A" in help_text and "nickname" in help_text, help_text

    # CheckConfig turns bad cfgstrings away with a reason targetcli shows.
    for cfg, reason in (("nonsense/x/y/z", "neither a configuration nickname"),
                        (f"127.0.0.1%3A{target.port}/{target.iqn}/0",
                         "refuses ':' in a cfgstring"),
                        ("nosuchentry", "'nosuchentry' is not the nickname of an entry")):
        proc = targetcli("/backstores/user:iscsi", "create", "name=bad", "size=1M",
                         f"cfgstring={cfg}", check=False)
        output = proc.stdout + proc.stderr
        assert "cfgstring invalid" in output and reason in output, (cfg, output)
    assert not leftovers()
    gdbus = helpers.run(["gdbus", "call", "--system", "--dest", "org.kernel.TCMUService1",
                         "--object-path", "/org/kernel/TCMUService1/iscsi", "--method",
                         "org.kernel.TCMUService1.CheckConfig", "iscsi/127.0.0.1%3A1/iqn.x/0"])
    assert gdbus.stdout.startswith("(false,"), gdbus.stdout

    cfg = f"127.0.0.1%3A{target.port}/{target.iqn.replace(':', '%3A')}/0"
    created = targetcli("/backstores/user:iscsi", "create", "name=tc1", "size=32M",
                        f"cfgstring={cfg}")
    assert "Created user-backed storage object tc1" in created.stdout, created
    out = targetcli("/loopback", "create").stdout
    match = re.search(r"naa\.[0-9a-f]+", out)
    assert match, out
    naa = match[0]
    targetcli(f"/loopback/{naa}/luns", "create", "/backstores/user:iscsi/tc1")

    disk = helpers.wait_for(lambda: next((d for d in disks() if d["backstore"].endswith("/tc1")
                                  and d["device"]), None), 60, "the disk of tc1 in hbactl list")
    node = disk["device"]
    assert disk["name"] == "tc1" and disk["target"] == target.iqn
    helpers.assert_identity(node, json.loads(hbactl("inquiry", target.url(), "--json").stdout))
    helpers.run(["dd", f"if={node}", "of=/dev/null", "bs=1M", "count=8", "iflag=direct",
                 "status=none"])
    assert int(helpers.run(["blockdev", "--getsize64", node]).stdout) == 32 * MiB

    log = daemon.log()
    assert "serving tc1: backstore tc1" in log and "CheckConfig" in log, log
    # hbactl detach removes what targetcli made: the /loopback target, then the backstore.
    assert hbactl("detach", "tc1").stdout.strip() == f"detached tc1 ({node})"
    assert not leftovers()
    assert "tc1" not in targetcli("ls", "/backstores/user:iscsi").stdout
