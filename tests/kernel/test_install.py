"""``./run install`` as an administrator runs it, in the VM: the package in its own virtualenv
under /opt, ``hbactl`` on the PATH, the systemd unit (``systemd-analyze verify`` clean), the DBus
policy, ``/etc/iscsi-hba.conf`` from the example with mode 600; then ``hbactl daemon`` started
exactly as the installed unit starts it (its ExecStart= line, systemd's environment, cwd /)
serves ``hbactl attach``; then ``./run uninstall`` leaves none of the installed files.

The VM has no network: the install takes its wheels from the offline wheelhouse that
``deploy/vm/tier`` prepares on the host (``deploy/install --make-wheelhouse``, passed here as
``HBA_WHEELHOUSE``). The VM's / is the host's under an overlay, so whatever the host has in
those places (the DBus policy deploy/setup installs, say) is removed first — in the VM only —
and the install starts from a machine as it comes.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.kernel.service import SYSTEMD_PATH, ServiceProcess, exec_start, round_trip
from tests.support.tgtd import Tgtd

# pip under TCG: a virtualenv, a wheel build and a dozen wheels take minutes (6 on a busy
# machine).
pytestmark = pytest.mark.timeout(1200)

CHECKOUT = Path(__file__).resolve().parents[2]
PREFIX = Path("/opt/iscsi-hba")
LINK = Path("/usr/local/bin/hbactl")
UNIT = Path("/etc/systemd/system/iscsi-hba.service")
POLICY = Path("/etc/dbus-1/system.d/iscsi-hba.conf")
CONFIG = Path("/etc/iscsi-hba.conf")
INSTALLED = (PREFIX, Path(f"{PREFIX}.manifest"), LINK, UNIT, POLICY, CONFIG)
MiB = 1 << 20


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def run_checkout(*args: str, timeout: float = 1500) -> str:
    """``./run ARGS`` of the checkout, from / (the README says: from any directory)."""
    proc = subprocess.run([str(CHECKOUT / "run"), *args], cwd="/", capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, (f"./run {' '.join(args)} exited {proc.returncode}\n"
                                  f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc.stdout + proc.stderr


def hbactl(*args: str) -> str:
    """The installed ``hbactl``, found on systemd's PATH as an administrator's shell finds it."""
    proc = subprocess.run(["hbactl", *args], env={"PATH": SYSTEMD_PATH}, cwd="/",
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"hbactl {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def test_install_serve_uninstall(tgtd: Tgtd, tmp_path: Path, results_dir: Path) -> None:
    wheelhouse = os.environ.get("HBA_WHEELHOUSE", "")
    assert wheelhouse and Path(wheelhouse).is_dir(), (
        "HBA_WHEELHOUSE names no directory: run this module through deploy/vm/tier, which "
        "prepares it on the host (deploy/install --make-wheelhouse DIR)")
    for path in INSTALLED:
        remove(path)

    out = run_checkout("install", "--wheelhouse", wheelhouse)
    (results_dir / "install.log").write_text(out)
    assert f"created {CONFIG} (mode 600)" in out, out

    # What it put in place.
    assert LINK.is_symlink() and os.readlink(LINK) == f"{PREFIX}/bin/hbactl"
    assert UNIT.read_bytes() == (CHECKOUT / "deploy/iscsi-hba.service").read_bytes()
    assert POLICY.read_bytes() == (CHECKOUT / "deploy/dbus/iscsi-hba.conf").read_bytes()
    st = CONFIG.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, 0)
    assert CONFIG.read_bytes() == (CHECKOUT / "deploy/iscsi-hba.conf.example").read_bytes()
    # The package is the wheel's copy, not the checkout's.
    where = subprocess.run([f"{PREFIX}/bin/python", "-c", "import hba; print(hba.__file__)"],
                           cwd="/", capture_output=True, text=True, check=True).stdout
    assert where.startswith(f"{PREFIX}/lib/"), where
    verify = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True,
                            text=True, timeout=120, check=False)
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, ""), verify
    argv = exec_start(UNIT)
    assert argv == [f"{PREFIX}/bin/hbactl", "daemon", "--config", str(CONFIG)], argv
    assert "usage" in hbactl("--help").lower()

    # The daemon as the unit starts it: the installed example attaches nothing by itself.
    target = tgtd.add_target(16 * MiB)
    service = ServiceProcess(argv, results_dir / "daemon.log")
    service.start()
    try:
        node = hbactl("attach", target.url()).strip()
        assert re.fullmatch(r"/dev/sd[a-z]+", node), node
        round_trip(node, tmp_path)
        assert node in hbactl("list")
        assert hbactl("detach", node).startswith("detached")
    finally:
        status = service.stop()
    assert status == 0, f"the daemon exited with {status}:\n{service.log()}"
    assert "Traceback" not in service.log(), service.log()

    out = run_checkout("uninstall")
    (results_dir / "uninstall.log").write_text(out)
    left = [str(path) for path in INSTALLED if path.exists() or path.is_symlink()]
    assert not left, f"left behind by ./run uninstall: {left}\n{out}"


@pytest.mark.parametrize("case", ["changed since the install", "not created by the install"])
def test_uninstall_keeps_the_administrators_configuration(case: str) -> None:
    """An /etc/iscsi-hba.conf changed since the install created it, or there before the
    install, holds the administrator's targets and secrets: uninstall keeps it and says so.
    (The install's record of what it created is ``/opt/iscsi-hba.manifest``.)"""
    for path in INSTALLED:
        remove(path)
    CONFIG.write_text("# my targets\n")
    CONFIG.chmod(0o600)
    if case == "changed since the install":
        created = hashlib.sha256(b"# as the install wrote it\n").hexdigest()
        Path(f"{PREFIX}.manifest").write_text(f"config-sha256 {created}\n")
    out = run_checkout("uninstall")
    try:
        assert CONFIG.read_text() == "# my targets\n"
        assert f"kept {CONFIG}: " in out and ("changed since" in out) == (
            case == "changed since the install"), out
        assert not Path(f"{PREFIX}.manifest").exists()
    finally:
        CONFIG.unlink()


@pytest.mark.parametrize("before", [True, False], ids=["there-before", "installed"])
def test_uninstall_keeps_a_dbus_policy_it_did_not_install(before: bool) -> None:
    """deploy/setup installs the DBus policy for a checkout's tests (the kernel VM reads the
    host's /etc). An install over it and an uninstall removed it, and every kernel test of
    the checkout then failed for want of it; now the manifest says whether the install made
    it."""
    for path in INSTALLED:
        remove(path)
    POLICY.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(CHECKOUT / "deploy/dbus/iscsi-hba.conf", POLICY)
    manifest = "# written by deploy/install\n" + ("" if before else "policy-created\n")
    Path(f"{PREFIX}.manifest").write_text(manifest)
    out = run_checkout("uninstall")
    try:
        assert POLICY.exists() == before, out
        assert (f"kept {POLICY}: it was there before the install" in out) == before, out
        assert not Path(f"{PREFIX}.manifest").exists()
    finally:
        POLICY.unlink(missing_ok=True)
