"""hba.devices: by-id links are waited for on attach (but not forever) and on detach.

udev is not involved: the sysfs lookup and udev's view of the disk are stubbed, so these
tests show the waiting rules, not udev (the kernel tier has the real one).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hba import devices
from hba.devices import BlockDevice, DeviceTimeout

LINKED = BlockDevice("sdz", "/dev/sdz", ("/dev/disk/by-id/wwn-0x6001405abc",))
UNLINKED = BlockDevice("sdz", "/dev/sdz", ())


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> list[BlockDevice | None]:
    """What udev says of the disk, changed by the test; the SCSI address always has sdz."""
    state: list[BlockDevice | None] = [None]
    monkeypatch.setattr(devices, "disk_name", lambda address, sysfs=None: "sdz")
    monkeypatch.setattr(devices, "_ready", lambda name: state[0])
    monkeypatch.setattr(devices, "LINK_GRACE", 0.3)
    return state


async def test_links_are_waited_for(disk: list[BlockDevice | None]) -> None:
    disk[0] = UNLINKED
    loop = asyncio.get_running_loop()
    loop.call_later(0.1, disk.__setitem__, 0, LINKED)
    assert await devices.wait_for_disk("1:0:1:0", timeout=5) == LINKED


async def test_a_disk_without_links_is_taken_after_the_grace(
        disk: list[BlockDevice | None]) -> None:
    disk[0] = UNLINKED
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await devices.wait_for_disk("1:0:1:0", timeout=10) == UNLINKED
    assert loop.time() - started >= 0.3


async def test_no_disk_times_out_with_advice(disk: list[BlockDevice | None]) -> None:
    with pytest.raises(DeviceTimeout, match=r"1:0:1:0 was not ready within 0.2 s \(/dev/sdz "
                                            r"so far\).*systemd-udevd"):
        await devices.wait_for_disk("1:0:1:0", timeout=0.2)


async def test_gone_waits_for_our_links_only(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    (sysfs / "class/block/sdz").mkdir(parents=True)
    ours = tmp_path / "wwn-0x6001405abc"
    ours.symlink_to("/dev/sdz")               # dangling once /dev/sdz is gone
    moved = tmp_path / "scsi-36001405abc"
    moved.symlink_to("/dev/null")             # udev gave it to another path of the LUN
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, (sysfs / "class/block/sdz").rmdir)
    loop.call_later(0.3, ours.unlink)
    started = loop.time()
    await devices.wait_until_gone("sdz", timeout=5, links=(str(ours), str(moved)), sysfs=sysfs)
    assert loop.time() - started >= 0.3

    ours.symlink_to("/dev/sdz")
    with pytest.raises(DeviceTimeout, match=f"udev has not removed {ours} 0.2 s after "
                                            r"/dev/sdz went: check that systemd-udevd runs"):
        await devices.wait_until_gone("sdz", timeout=0.2, links=(str(ours),), sysfs=sysfs)


# ------------------------------------------------------------------------------------------
# multipath: what the kernel made of a LUN's paths (a sysfs tree made here)


def _paths_in(sysfs: Path, held: bool) -> None:
    for name, address, state in (("sdc", "3:0:1:0", "active/optimized"),
                                 ("sdd", "4:0:1:0", "standby")):
        device = sysfs / "class/block" / name
        (device / "holders").mkdir(parents=True)
        (device / "device").mkdir()
        (device / "device/wwid").write_text("naa.6001405ABCDEF0123456789abcdef012\n")
        scsi = sysfs / "bus/scsi/devices" / address
        scsi.mkdir(parents=True)
        (scsi / "access_state").write_text(state + "\n")
        if held:
            (device / "holders/dm-3").mkdir()
    (sysfs / "class/block/dm-3/dm").mkdir(parents=True)
    (sysfs / "class/block/dm-3/dm/name").write_text("mpatha\n")


def test_the_multipath_device_over_the_paths(tmp_path: Path) -> None:
    _paths_in(tmp_path, held=True)
    assert devices.holder(["sdc", "sdd"], tmp_path) == "/dev/mapper/mpatha"
    assert devices.holder(["sdx"], tmp_path) is None
    assert devices.access_state("4:0:1:0", tmp_path) == "standby"
    assert devices.access_state("9:0:0:0", tmp_path) is None
    assert devices.wwid("sdc", tmp_path) == "36001405abcdef0123456789abcdef012"
    assert devices.multipath_hint(["sdc", "sdd"], "/dev/mapper/mpatha", tmp_path) is None


def test_why_there_is_no_multipath_device(tmp_path: Path) -> None:
    _paths_in(tmp_path, held=False)
    wwids = tmp_path / "wwids"
    assert devices.holder(["sdc", "sdd"], tmp_path) is None
    hint = devices.multipath_hint(["sdc", "sdd"], None, tmp_path, wwids)
    assert hint is not None and "WWID 36001405abcdef0123456789abcdef012 is not in" in hint
    assert "run `multipath -a /dev/sdc` once" in hint
    wwids.write_text("# multipath wwids\n/36001405abcdef0123456789abcdef012/\n")
    hint = devices.multipath_hint(["sdc", "sdd"], None, tmp_path, wwids)
    assert hint is not None and "check that it runs" in hint
    assert devices.multipath_hint(["sdc"], None, tmp_path, wwids) is None   # one path
