"""hba.kernel's reading of configfs (a tree made here, as the kernel lays it out)."""

from __future__ import annotations

from pathlib import Path

from hba import kernel

# target_core_dev_info_show: the core's line, then TCMU's (tcmu_show_configfs_dev_params).
INFO = ("Status: ACTIVATED  Max Queue Depth: 128  SectorSize: 512  HwMaxSectors: 128\n"
        "Config: iscsi/db@127.0.0.2%3A3260 Size: 268435456 MaxDataAreaMB: 64 "
        "DataPagesPerBlk: 1 MaxRingSizeMB: 8\n")


def test_a_backstore_is_read_with_its_size_and_tcm_loop_link(tmp_path: Path) -> None:
    dev = tmp_path / "target/core/user_3/hba-db.2"
    (dev / "attrib").mkdir(parents=True)
    (dev / "info").write_text(INFO)
    other = tmp_path / "target/core/user_4/foreign"
    other.mkdir(parents=True)
    (other / "info").write_text(INFO.replace("iscsi/", "rbd/"))
    tpg = tmp_path / "target/loopback/naa.5001405abcdef012/tpgt_1"
    (tpg / "lun/lun_0").mkdir(parents=True)
    (tpg / "address").write_text("5:0:1\n")
    (tpg / "lun/lun_0/link").symlink_to(dev)
    (info,) = kernel.list_backstores(tmp_path)
    assert (info.name, info.hba_index, info.cfgstring) == ("hba-db.2", 3, "db@127.0.0.2%3A3260")
    assert info.size == 256 << 20          # not the core's SectorSize
    assert info.scsi_address == "5:0:1:0"
    assert kernel.read_backstore(3, "hba-db.2", tmp_path) == \
        kernel.BackstoreInfo(name="hba-db.2", hba_index=3, cfgstring="db@127.0.0.2%3A3260",
                             size=256 << 20, path=dev)


def test_persistent_reservations_pass_through(tmp_path: Path) -> None:
    (tmp_path / "attrib").mkdir()
    (tmp_path / "attrib/pgr_support").write_text("1\n")
    kernel.pass_through_pr(tmp_path)
    assert (tmp_path / "attrib/pgr_support").read_text() == "0"
