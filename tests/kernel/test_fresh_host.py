"""``hbactl attach`` on a host as it comes: no /etc/target, and LIO's core module loaded while
there was none, so the kernel's database root is its default /var/target ("db_root: cannot
open: /etc/target" at load). rtslib-fb, creating the TCMU backstore, wants the kernel's dbroot
at /etc/target and refused ("Cannot set dbroot to /etc/target. Please check if this directory
exists.") until the daemon created it. After the attach /etc/target exists, root's with mode
755, and the kernel's dbroot points at it.

The VM's initramfs loads the target modules at boot; this test unloads them, removes
/etc/target (in the VM's overlay only), loads target_core_mod again and lets the daemon load
the rest, as on a fresh Debian 12 server. At the end the modules the VM boots with are loaded
again.
"""

from __future__ import annotations

import re
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from hba import kernel
from tests.kernel import helpers
from tests.kernel.service import ServiceProcess, round_trip
from tests.kernel.tcmu import HBACTL
from tests.support.tgtd import Tgtd

DBROOT_FILE = helpers.CONFIGFS_TARGET / "dbroot"
# LIO's modules, users first: each can go only once nothing uses it.
TARGET_MODULES = ("tcm_loop", "target_core_user", "target_core_file", "target_core_iblock",
                  "target_core_pscsi", "iscsi_target_mod", "target_core_mod")
MiB = 1 << 20


def loaded(module: str) -> bool:
    return Path("/sys/module", module).is_dir()


@pytest.fixture
def host_as_it_comes() -> Iterator[None]:
    assert not helpers.configfs_objects(), \
        f"LIO objects exist, the modules cannot be unloaded: {helpers.configfs_objects()}"
    for module in TARGET_MODULES:
        if loaded(module):
            helpers.run(["rmmod", module])
    if kernel.DBROOT.exists():
        shutil.rmtree(kernel.DBROOT)
    helpers.run(["modprobe", "target_core_mod"])
    try:
        yield
    finally:
        helpers.run(["modprobe", "-a", *(m for m in TARGET_MODULES if m != "target_core_pscsi")])


def test_attach_without_etc_target(host_as_it_comes: None, tgtd: Tgtd, tmp_path: Path,
                                   results_dir: Path) -> None:
    assert not kernel.DBROOT.exists()
    assert DBROOT_FILE.read_text().strip() == "/var/target"
    assert not loaded("target_core_user") and not loaded("tcm_loop")

    target = tgtd.add_target(16 * MiB)
    config = tmp_path / "iscsi-hba.conf"
    config.write_text("")
    config.chmod(0o600)
    daemon = ServiceProcess([str(HBACTL), "daemon", "--config", str(config)],
                            results_dir / "daemon.log")
    daemon.start()
    try:
        attach = helpers.run([HBACTL, "attach", target.url()], check=False, timeout=300)
        assert attach.returncode == 0, f"{attach.stderr}\n{daemon.log()}"
        node = attach.stdout.strip()
        assert re.fullmatch(r"/dev/sd[a-z]+", node), attach.stdout
        round_trip(node, tmp_path)
        helpers.run([HBACTL, "detach", node])
    finally:
        status = daemon.stop()
    assert status == 0, daemon.log()
    assert "Cannot set dbroot" not in daemon.log(), daemon.log()

    st = kernel.DBROOT.stat()
    assert stat.S_ISDIR(st.st_mode) and (stat.S_IMODE(st.st_mode), st.st_uid) == (0o755, 0)
    assert DBROOT_FILE.read_text().strip() == str(kernel.DBROOT)
