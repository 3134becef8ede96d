"""Block devices: wait for the disk of a SCSI address with pyudev, and tell whether it is busy.

udev, not sysfs polling, decides when a disk is usable: once udev has processed the ``add``
event, ``/dev/sdX`` has its permissions and its ``/dev/disk/by-id`` links exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hba.errors import HBAError


class DeviceTimeout(HBAError):
    """The disk did not appear (or go away) in time."""


@dataclass(frozen=True, slots=True)
class BlockDevice:
    """A disk as udev knows it."""

    name: str              # sdX
    node: str              # /dev/sdX
    by_id: tuple[str, ...]  # /dev/disk/by-id/... links

    @property
    def primary_link(self) -> str | None:
        """The stable link to print: ``wwn-0x...`` when the LUN has a WWN, else the first."""
        for link in self.by_id:
            if "/wwn-" in link:
                return link
        return self.by_id[0] if self.by_id else None


def disk_name(scsi_address: str, sysfs: Path = Path("/sys")) -> str | None:
    """``sdX`` of the disk at SCSI address ``H:C:T:L``, once the sd driver has bound it."""
    block = sysfs / "bus/scsi/devices" / scsi_address / "block"
    try:
        names = sorted(p.name for p in block.iterdir())
    except OSError:
        return None
    return names[0] if names else None


def _udev_device(name: str) -> Any:
    import pyudev

    context = pyudev.Context()
    try:
        return pyudev.Devices.from_name(context, "block", name)
    except pyudev.DeviceNotFoundError:
        return None


def _ready(name: str) -> BlockDevice | None:
    device = _udev_device(name)
    if device is None or not device.is_initialized:
        return None
    links = tuple(sorted(link for link in device.device_links
                         if link.startswith("/dev/disk/by-id/")))
    node = device.device_node or f"/dev/{name}"
    if not os.path.exists(node):
        return None
    return BlockDevice(name=name, node=node, by_id=links)


def find_disk(scsi_address: str, sysfs: Path = Path("/sys")) -> BlockDevice | None:
    """The disk at ``scsi_address`` if udev has finished with it, else None (no waiting)."""
    name = disk_name(scsi_address, sysfs)
    return _ready(name) if name is not None else None


def size_bytes(name: str, sysfs: Path = Path("/sys")) -> int:
    """Size of block device ``name`` in bytes (0 when unknown); sysfs counts 512-byte units."""
    try:
        return int((sysfs / "class/block" / name / "size").read_text()) * 512
    except (OSError, ValueError):
        return 0


# How long a disk udev has finished with may still lack /dev/disk/by-id links before we take
# it as it is: a LUN that reports no serial number and no designator gets none, ever.
LINK_GRACE = 5.0


async def wait_for_disk(scsi_address: str, timeout: float = 60.0,
                        sysfs: Path = Path("/sys")) -> BlockDevice:
    """The disk at ``scsi_address`` once udev has finished with it (by-id links included,
    unless the LUN still has none :data:`LINK_GRACE` seconds after udev made its node)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    unlinked_since: float | None = None
    with udev_events("block") as event:
        while True:
            name = disk_name(scsi_address, sysfs)
            if name is not None:
                device = _ready(name)
                # udev adds the by-id links of a disk with a WWN a moment after the node.
                if device is not None:
                    if device.by_id:
                        return device
                    if unlinked_since is None:
                        unlinked_since = loop.time()
                    elif loop.time() - unlinked_since >= LINK_GRACE:
                        return device
            remaining = deadline - loop.time()
            if remaining <= 0:
                what = f"/dev/{name}" if name else "no block device"
                raise DeviceTimeout(
                    f"the disk at SCSI address {scsi_address} was not ready within "
                    f"{timeout:g} s ({what} so far): check `dmesg` and that systemd-udevd runs")
            event.clear()
            with contextlib.suppress(TimeoutError):
                # Events wake us; the short cap covers a udev that misses nothing but is slow.
                await asyncio.wait_for(event.wait(), min(remaining, 1.0))


@contextlib.contextmanager
def udev_events(*subsystems: str) -> Iterator[asyncio.Event]:
    """An event that udev sets (on the running loop) whenever it reports a device of one of
    ``subsystems`` added, changed or removed, while the context lasts; the caller clears it
    and looks at what changed."""
    import pyudev

    loop = asyncio.get_running_loop()
    monitor = pyudev.Monitor.from_netlink(pyudev.Context())
    for subsystem in subsystems:
        monitor.filter_by(subsystem)
    monitor.start()
    event = asyncio.Event()

    def drain() -> None:
        while monitor.poll(timeout=0) is not None:
            pass
        event.set()

    loop.add_reader(monitor.fileno(), drain)
    try:
        yield event
    finally:
        loop.remove_reader(monitor.fileno())


async def wait_until_gone(name: str, timeout: float = 30.0, links: tuple[str, ...] = (),
                          sysfs: Path = Path("/sys")) -> None:
    """Wait until ``/dev/<name>`` is gone (after the LUN was unlinked), and udev has removed
    its ``links`` too, so that a detach that returned leaves no dangling by-id link."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (sysfs / "class/block" / name).exists() or _stale(name, links):
        if loop.time() >= deadline:
            left = _stale(name, links)
            raise DeviceTimeout(f"/dev/{name} still exists {timeout:g} s after its removal"
                                if (sysfs / "class/block" / name).exists() else
                                f"udev has not removed {', '.join(left)} {timeout:g} s after "
                                f"/dev/{name} went: check that systemd-udevd runs")
        await asyncio.sleep(0.1)


def _stale(name: str, links: tuple[str, ...]) -> list[str]:
    """The links that still lead to (or dangle from) ``/dev/<name>``. A link udev has moved to
    another disk with the same identity (a second path to the LUN) is not ours to wait for."""
    stale = []
    for link in links:
        if os.path.lexists(link) and (not os.path.exists(link)
                                      or os.path.realpath(link) == f"/dev/{name}"):
            stale.append(link)
    return stale


def users(name: str, sysfs: Path = Path("/sys"),
          mounts: Path = Path("/proc/self/mountinfo")) -> list[str]:
    """What holds disk ``name`` or one of its partitions: mounts, device-mapper, md, swap."""
    parts = [name]
    block = sysfs / "class/block" / name
    with contextlib.suppress(OSError):
        parts += [p.name for p in block.iterdir() if p.name.startswith(name)]
    found: list[str] = []
    majmins: dict[str, str] = {}
    for part in parts:
        with contextlib.suppress(OSError):
            majmins[(sysfs / "class/block" / part / "dev").read_text().strip()] = part
        holders = sysfs / "class/block" / part / "holders"
        with contextlib.suppress(OSError):
            for holder in holders.iterdir():
                found.append(f"/dev/{part} is used by {holder.name} (device-mapper, LVM or md)")
    with contextlib.suppress(OSError):
        for line in mounts.read_text().splitlines():
            fields = line.split()
            if len(fields) > 4 and fields[2] in majmins:
                found.append(f"/dev/{majmins[fields[2]]} is mounted on {fields[4]}")
    with contextlib.suppress(OSError):
        for line in Path("/proc/swaps").read_text().splitlines()[1:]:
            dev = line.split()[0] if line.split() else ""
            if dev.rsplit("/", 1)[-1] in parts:
                found.append(f"{dev} is in use as swap")
    return found


# ------------------------------------------------------------------------------------------
# multipath: what dm-multipath and the ALUA device handler made of a LUN's paths

WWIDS = Path("/etc/multipath/wwids")
"""The WWIDs multipathd assembles under ``find_multipaths strict`` (Debian's default)."""


def holder(names: list[str], sysfs: Path = Path("/sys")) -> str | None:
    """``/dev/mapper/<name>`` of the device-mapper device holding any of the disks ``names``
    (a multipath map over the paths), or None."""
    for name in names:
        with contextlib.suppress(OSError):
            for dm in sorted((sysfs / "class/block" / name / "holders").iterdir()):
                with contextlib.suppress(OSError):
                    mapped = (sysfs / "class/block" / dm.name / "dm" / "name").read_text()
                    return f"/dev/mapper/{mapped.strip()}"
    return None


def access_state(scsi_address: str, sysfs: Path = Path("/sys")) -> str | None:
    """The ALUA state the kernel's ``scsi_dh_alua`` keeps for a path (``active/optimized``,
    ``standby``, ...), which multipathd's ``sysfs`` prioritizer reads; None without ALUA."""
    try:
        return (sysfs / "bus/scsi/devices" / scsi_address / "access_state").read_text().strip()
    except OSError:
        return None


def wwid(name: str, sysfs: Path = Path("/sys")) -> str | None:
    """The WWID multipathd knows a disk by (udev's ID_SERIAL: ``3`` + the NAA identifier of
    VPD page 0x83, for the disks of an NAA LUN), or None."""
    try:
        text = (sysfs / "class/block" / name / "device" / "wwid").read_text().strip()
    except OSError:
        return None
    kind, dot, ident = text.partition(".")
    if kind == "naa" and dot and all(c in "0123456789abcdefABCDEF" for c in ident):
        return f"3{ident.lower()}"
    return None


def multipath_hint(names: list[str], holder_node: str | None, sysfs: Path = Path("/sys"),
                   wwids: Path = WWIDS) -> str | None:
    """Why the paths ``names`` of one LUN are not one multipath device yet, in one sentence
    with what to do; None when they are (or when there are fewer than two)."""
    if holder_node is not None or len(names) < 2:
        return None
    ident = wwid(names[0], sysfs)
    known = ""
    with contextlib.suppress(OSError):
        known = wwids.read_text()
    if ident is not None and f"/{ident}/" not in known:
        return (f"not assembled by multipathd: WWID {ident} is not in {wwids} (Debian's "
                f"find_multipaths strict); run `multipath -a /dev/{names[0]}` once")
    return ("not assembled by multipathd: check that it runs (`systemctl status "
            "multipathd`) and what `multipath -ll` says")
