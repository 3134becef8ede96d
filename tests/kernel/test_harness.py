"""The VM itself: modules, configfs, udev, DBus, modprobe from the cached module tree."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.kernel import helpers
from tests.support.targets import Chap

# Loaded by the initramfs on every boot (deploy/vm/modules).
MODULES = [
    "configfs", "target_core_mod", "target_core_user", "uio", "tcm_loop", "sd_mod", "sg",
    "target_core_file", "target_core_iblock", "iscsi_target_mod", "scsi_transport_iscsi",
    "libiscsi", "iscsi_tcp", "crc32c_generic", "crc_t10dif", "ext4", "xfs", "loop", "dm_mod",
    "dm_multipath", "9p", "overlay",
]


def loaded_modules() -> set[str]:
    return {line.split()[0] for line in Path("/proc/modules").read_text().splitlines()}


@pytest.mark.parametrize("module", MODULES)
def test_module_loaded(module: str) -> None:
    assert module in loaded_modules()


def test_crc32c_available_to_lio() -> None:
    # LIO's iSCSI login allocates the "crc32c" hash; without it logins fail.
    names = {
        line.split(":", 1)[1].strip()
        for line in Path("/proc/crypto").read_text().splitlines()
        if line.startswith("name")
    }
    assert "crc32c" in names


def test_configfs_and_target_mounted() -> None:
    mounts = Path("/proc/mounts").read_text().split("\n")
    assert any(m.split()[1:3] == ["/sys/kernel/config", "configfs"] for m in mounts if m)
    assert (helpers.CONFIGFS_TARGET / "core").is_dir()
    assert Path("/sys/class/uio").is_dir() or "uio" in loaded_modules()


def test_guest_filesystems() -> None:
    mounts = {
        fields[1]: fields[2]
        for fields in (m.split() for m in Path("/proc/mounts").read_text().splitlines())
    }
    assert mounts["/"] == "overlay"
    assert mounts["/tmp"] == "tmpfs"
    assert mounts["/run"] == "tmpfs"
    assert mounts[os.environ["HBA_VM_RESULTS"]] == "9p"


def test_loopback_up() -> None:
    assert "UP" in helpers.run(["ip", "-o", "link", "show", "lo"]).stdout


def test_initiator_name_present() -> None:
    text = Path("/etc/iscsi/initiatorname.iscsi").read_text()
    assert any(line.startswith("InitiatorName=iqn.") for line in text.splitlines())


def test_udevd_running() -> None:
    helpers.run(["udevadm", "control", "--ping"])


def test_system_dbus_running() -> None:
    out = helpers.run(
        [
            "dbus-send", "--system", "--print-reply", "--dest=org.freedesktop.DBus",
            "/org/freedesktop/DBus", "org.freedesktop.DBus.GetId",
        ]
    ).stdout
    assert "string" in out


def test_checkout_writes_stay_in_the_vm(tmp_path: Path) -> None:
    # The checkout is the host's, under a tmpfs overlay: writable here, never written back.
    probe = Path(__file__).with_name(f".vm-write-probe-{os.getpid()}")
    probe.write_text("x")
    try:
        assert probe.read_text() == "x"
    finally:
        probe.unlink()


def test_results_share_writable(results_dir: Path) -> None:
    (results_dir / "probe.txt").write_text("from the VM\n")
    assert (results_dir / "probe.txt").read_text() == "from the VM\n"


def test_modprobe_from_cached_module_tree() -> None:
    # Modules not in the initramfs load from /lib/modules/<kver>, the host's cached tree.
    helpers.run(["modprobe", "nbd", "nbds_max=1"])
    try:
        assert "nbd" in loaded_modules()
    finally:
        helpers.run(["modprobe", "-r", "nbd"], check=False)


def test_tcm_loop_disk_gets_by_id_link(lio: helpers.Lio) -> None:
    """A tcm_loop LUN (the product's kernel half) becomes /dev/sdX with udev's by-id links."""
    import rtslib_fb as rts

    target = lio.create(16 << 20)  # only for its ramdisk backstore
    so = rts.RDMCPStorageObject(target.storage_name)
    loop_target = rts.Target(rts.FabricModule("loopback"), _naa(), mode="create")
    try:
        tpg = rts.TPG(loop_target, 1, mode="create")
        if not tpg.nexus:  # tcm_loop's I_T nexus (rtslib makes one): commands fail without it
            tpg.nexus = _naa()
        rts.LUN(tpg, 0, so)
        disk = helpers.wait_for_block_device(
            lambda device: "/tcm_loop_adapter_" in device.sys_path, what="the tcm_loop disk"
        )
        assert disk.device_node is not None
        assert disk.device_node.startswith("/dev/sd")
        links = helpers.by_id_links(disk)
        assert any("/wwn-0x6001405" in link for link in links), links
        assert all(os.path.realpath(link) == disk.device_node for link in links)
    finally:
        loop_target.delete()


def _naa() -> str:
    return "naa.5001405" + os.urandom(5).hex()[:9]


def test_lio_target_teardown_leaves_nothing(
    lio_target: Callable[..., helpers.LioTarget], lio: helpers.Lio
) -> None:
    before = helpers.configfs_objects()
    targets = [
        lio_target(8 << 20),
        lio_target(8 << 20, backstore="fileio"),
        lio_target(8 << 20, chap=Chap.two_way()),
        lio_target(8 << 20, initiators=["iqn.2003-01.org.example:some-initiator"]),
    ]
    assert all(p.exists() for t in targets for p in t.configfs_paths)
    lio.remove_all()
    assert helpers.configfs_objects() == before
