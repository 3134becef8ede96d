"""uio discovery in a fake sysfs, opening and mapping, the event fd, configfs actions and the
restart takeover sequence."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import pytest

from tcmu_handler import ring
from tcmu_handler.device import (
    ResetLevel,
    TcmuConfigfs,
    UioDevice,
    UioInfo,
    UioName,
    find_device,
    find_devices,
    takeover,
    takeover_with,
)
from tcmu_handler.dispatcher import Dispatcher
from tcmu_handler.errors import (
    ConfigfsError,
    DeviceBusy,
    DeviceNotFound,
    DeviceRemoved,
    RingError,
    TCMUError,
)
from tests.unit.tcmu_helpers import FakeTarget

MAP_SIZE = 0x3000  # mailbox + a 4 KiB - 128 ring + 8 KiB of data


@pytest.mark.parametrize(("text", "parsed"), [
    ("tcm-user/1/disk0/iscsi/iscsi://10.0.0.1/iqn.2003-01.org.example:t/0\n",
     UioName(1, "disk0", "iscsi", "iscsi://10.0.0.1/iqn.2003-01.org.example:t/0")),
    ("tcm-user/12/d/iscsi/", UioName(12, "d", "iscsi", "")),
    ("tcm-user/0/file1/file", UioName(0, "file1", "file", "")),
    ("tcm-user/3/nocfg", UioName(3, "nocfg", "", "")),
    ("uio_pdrv_genirq", None),
    ("tcm-user/x/d/iscsi/c", None),
    ("tcm-user/1//iscsi/c", None),
])
def test_uio_name(text: str, parsed: UioName | None) -> None:
    assert UioName.parse(text) == parsed
    if parsed is not None and parsed.cfgstring:
        assert str(parsed) == text.strip()


def make_uio(sysfs: Path, dev: Path, index: int, name: str, size: int = MAP_SIZE,
             *, with_map: bool = True) -> None:
    d = sysfs / "class" / "uio" / f"uio{index}"
    (d / "maps" / "map0").mkdir(parents=True)
    (d / "name").write_text(name + "\n")
    if with_map:
        (d / "maps" / "map0" / "size").write_text(f"0x{size:08x}\n")
        (d / "maps" / "map0" / "offset").write_text("0x0\n")
    dev.mkdir(exist_ok=True)
    f = dev / f"uio{index}"
    buf = bytearray(size)
    ring.write_mailbox(buf, flags=ring.MailboxFlag(0xF), cmdr_size=4096 - 128)
    f.write_bytes(bytes(buf))


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    make_uio(sysfs, dev, 10, "tcm-user/1/disk0/iscsi/iscsi://h/iqn.x:t/0")
    make_uio(sysfs, dev, 2, "tcm-user/1/disk1/iscsi/iscsi://h/iqn.x:t/1", size=0x5000)
    make_uio(sysfs, dev, 3, "tcm-user/2/other/file/path")
    make_uio(sysfs, dev, 4, "uio_pdrv_genirq")
    make_uio(sysfs, dev, 5, "tcm-user/1/gone/iscsi/x", with_map=False)
    (sysfs / "class" / "uio" / "README").write_text("not a device")
    return sysfs, dev


def test_find_devices(tree: tuple[Path, Path]) -> None:
    sysfs, dev = tree
    found = find_devices(sysfs_root=sysfs, dev_root=dev)
    assert [(i.index, i.name.dev_name, i.map_size) for i in found] == [
        (2, "disk1", 0x5000), (10, "disk0", MAP_SIZE)]
    assert found[1].dev_path == dev / "uio10"
    assert found[1].sysfs_path == sysfs / "class" / "uio" / "uio10"
    assert found[1].label == "uio10 (user_1/disk0)"
    everything = find_devices(None, sysfs_root=sysfs, dev_root=dev)
    assert [i.index for i in everything] == [2, 3, 10]


def test_find_device(tree: tuple[Path, Path]) -> None:
    sysfs, dev = tree
    assert find_device("disk0", sysfs_root=sysfs, dev_root=dev).index == 10
    assert find_device("disk0", hba_index=1, sysfs_root=sysfs, dev_root=dev).index == 10
    with pytest.raises(DeviceNotFound, match=r"user_2/disk0.*modprobe target_core_user"):
        find_device("disk0", hba_index=2, sysfs_root=sysfs, dev_root=dev)


def test_no_uio_class_at_all(tmp_path: Path) -> None:
    assert find_devices(sysfs_root=tmp_path) == []


def test_bad_map_size(tmp_path: Path) -> None:
    make_uio(tmp_path / "sys", tmp_path / "dev", 0, "tcm-user/1/d/iscsi/x")
    (tmp_path / "sys/class/uio/uio0/maps/map0/size").write_text("lots\n")
    with pytest.raises(TCMUError, match="not a hex size"):
        find_devices(sysfs_root=tmp_path / "sys")


def _info(tree: tuple[Path, Path], index: int = 10) -> UioInfo:
    sysfs, dev = tree
    (info,) = [i for i in find_devices(sysfs_root=sysfs, dev_root=dev) if i.index == index]
    return info


def test_open_maps_exactly_the_map(tree: tuple[Path, Path]) -> None:
    d = UioDevice.open(_info(tree))
    try:
        assert d.size == MAP_SIZE and len(d.view) == MAP_SIZE and d.mapped and not d.closed
        mb = d.mailbox()
        assert (mb.version, mb.cmdr_size, mb.data_off) == (2, 4096 - 128, 4096)
        assert "uio10" in repr(d)
    finally:
        assert d.close() is True
    assert (d.closed, d.mapped) == (True, False) and "closed" in repr(d)
    assert d.close() is True  # idempotent
    with pytest.raises(TCMUError):
        d.view  # noqa: B018


def test_open_rejects_what_is_not_a_tcmu_map(tree: tuple[Path, Path]) -> None:
    _, dev = tree
    (dev / "uio10").write_bytes(bytes(MAP_SIZE))  # version 0
    with pytest.raises(RingError, match="version 0"):
        UioDevice.open(_info(tree))


def test_open_errors(tree: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    info = _info(tree)
    os.unlink(info.dev_path)
    with pytest.raises(DeviceNotFound, match="devtmpfs"):
        UioDevice.open(info)

    def busy(*_args: object) -> int:
        raise OSError(errno.EBUSY, "Device or resource busy")

    monkeypatch.setattr(os, "open", busy)
    try:
        with pytest.raises(DeviceBusy, match="tcmu-runner"):
            UioDevice.open(info)
    finally:
        monkeypatch.undo()


def test_short_file_cannot_be_mapped(tree: tuple[Path, Path]) -> None:
    info = _info(tree)
    big = UioInfo(info.index, info.name, MAP_SIZE * 4, info.dev_path, info.sysfs_path)
    with pytest.raises(TCMUError, match="exact size"):
        UioDevice.open(big)


def test_close_is_deferred_while_views_live(tree: tuple[Path, Path]) -> None:
    d = UioDevice.open(_info(tree))
    piece = d.view[4096:4100]
    assert d.close() is False and d.closed and d.mapped
    piece.release()
    assert d.close() is True and not d.mapped


def _socket_device(tree: tuple[Path, Path]) -> tuple[UioDevice, socket.socket]:
    import mmap

    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    with open(_info(tree).dev_path, "r+b") as f:
        mapping = mmap.mmap(f.fileno(), MAP_SIZE)
    return UioDevice(ours.detach(), mapping, name="test"), peer


def test_event_read_and_write(tree: tuple[Path, Path]) -> None:
    d, peer = _socket_device(tree)
    assert d.read_event() is False  # EAGAIN: nothing pending
    peer.send(b"\x05\0\0\0")
    assert d.read_event() is True
    assert d.notify() is True and peer.recv(16) == b"\0\0\0\0"  # exactly 4 bytes
    peer.close()
    with pytest.raises(DeviceRemoved, match="end of file"):
        d.read_event()
    with pytest.raises(DeviceRemoved, match="removed"):
        d.notify()
    d.close()


@pytest.mark.parametrize(("err", "words"), [
    (errno.EIO, "was removed (read: "), (errno.ENODEV, "was removed"),
    (errno.EINVAL, "read failed"),
])
def test_read_errors_mean_removal(tree: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                                  err: int, words: str) -> None:
    d, peer = _socket_device(tree)

    def failing(*_args: object) -> bytes:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "read", failing)
    try:
        with pytest.raises(DeviceRemoved, match=words.replace("(", r"\(")):
            d.read_event()
    finally:
        monkeypatch.undo()
    d.close()
    peer.close()


# --- configfs and takeover -----------------------------------------------------------------------


def make_configfs(root: Path, hba: int = 1, dev: str = "disk0", *,
                  actions: bool = True) -> Path:
    d = root / "target" / "core" / f"user_{hba}" / dev
    (d / "attrib").mkdir(parents=True)
    (d / "attrib" / "tmr_notification").write_text("0\n")
    if actions:
        (d / "action").mkdir()
        (d / "action" / "block_dev").write_text("unblocked\n")
        (d / "action" / "reset_ring").write_text("")
    return d


def test_configfs_paths_and_attributes(tmp_path: Path) -> None:
    path = make_configfs(tmp_path)
    cfg = TcmuConfigfs(1, "disk0", configfs_root=tmp_path)
    assert cfg.path == path and cfg.exists() and cfg.can_reset()
    assert not cfg.is_blocked()
    cfg.write_attrib("tmr_notification", 1)
    assert cfg.read_attrib("tmr_notification") == "1"
    cfg.block()
    assert (path / "action" / "block_dev").read_text() == "1"
    cfg.reset_ring(ResetLevel.CHECK_CONDITION)
    assert (path / "action" / "reset_ring").read_text() == "2"
    missing = TcmuConfigfs(9, "nope", configfs_root=tmp_path)
    assert not missing.exists() and not missing.can_reset()
    with pytest.raises(ConfigfsError, match="configfs mounted"):
        missing.block()
    with pytest.raises(ConfigfsError, match="reading"):
        missing.read_attrib("x")


class Recorder:
    """A DeviceControl that records the call order (configfs writes, and opening)."""

    def __init__(self, *, can_reset: bool = True, fail_reset: bool = False) -> None:
        self.calls: list[str] = []
        self._can_reset = can_reset
        self.fail_reset = fail_reset

    def can_reset(self) -> bool:
        return self._can_reset

    def block(self) -> None:
        self.calls.append("block_dev=1")

    def unblock(self) -> None:
        self.calls.append("block_dev=0")

    def reset_ring(self, level: int) -> None:
        self.calls.append(f"reset_ring={level}")
        if self.fail_reset:
            raise ConfigfsError("writing '1' to reset_ring failed: Invalid argument")


def test_takeover_sequence(tree: tuple[Path, Path]) -> None:
    info = _info(tree)
    rec = Recorder()

    def opener() -> UioDevice:
        rec.calls.append("open")
        return UioDevice.open(info)

    d = takeover_with(opener, rec)
    assert rec.calls == ["open", "block_dev=1", "reset_ring=1", "block_dev=0"]
    assert not d.closed
    d.close()


def test_takeover_of_a_busy_device_changes_nothing() -> None:
    rec = Recorder()

    def opener() -> UioDevice:
        raise DeviceBusy("busy")

    with pytest.raises(DeviceBusy):
        takeover_with(opener, rec)
    assert rec.calls == []


def test_takeover_unblocks_even_when_the_reset_fails(tree: tuple[Path, Path]) -> None:
    info = _info(tree)
    rec = Recorder(fail_reset=True)
    opened: list[UioDevice] = []

    def opener() -> UioDevice:
        opened.append(UioDevice.open(info))
        return opened[0]

    with pytest.raises(ConfigfsError):
        takeover_with(opener, rec)
    assert rec.calls == ["block_dev=1", "reset_ring=1", "block_dev=0"]
    assert opened[0].closed


def test_takeover_on_a_kernel_without_actions(tree: tuple[Path, Path],
                                              caplog: pytest.LogCaptureFixture) -> None:
    info = _info(tree)
    rec = Recorder(can_reset=False)
    d = takeover_with(lambda: UioDevice.open(info), rec)
    assert rec.calls == [] and "no action/reset_ring" in caplog.text
    d.close()


def test_takeover_writes_the_real_action_files_in_order(
        tree: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = _info(tree)
    path = make_configfs(tmp_path / "cfg")
    writes: list[tuple[str, str]] = []
    original = TcmuConfigfs._write

    def recording(self: TcmuConfigfs, rel: str, value: str) -> None:
        writes.append((rel, value))
        original(self, rel, value)

    monkeypatch.setattr(TcmuConfigfs, "_write", recording)
    d = takeover(info, configfs_root=tmp_path / "cfg")
    assert writes == [("action/block_dev", "1"), ("action/reset_ring", "1"),
                      ("action/block_dev", "0")]
    assert (path / "action" / "block_dev").read_text() == "0"
    d.close()


async def test_dispatcher_takeover_classmethod(tree: tuple[Path, Path], tmp_path: Path) -> None:
    path = make_configfs(tmp_path / "cfg")
    d = Dispatcher.takeover(_info(tree), FakeTarget(), lun=4, configfs_root=tmp_path / "cfg")
    assert d.lun == 4 and not d.device.closed and d.flags == ring.MailboxFlag(0xF)
    assert (path / "action" / "block_dev").read_text() == "0"
    assert (path / "action" / "reset_ring").read_text() == "1"
    await d.close()
    assert (d.device.closed, d.device.mapped) == (True, False)
