"""The uio side of a TCMU device: finding it in sysfs, opening and mapping ``/dev/uioN``, the
4-byte event read and completion write, the configfs actions, and restart takeover.

Theory of operation
-------------------
``target_core_user`` registers one uio device per backstore. Its sysfs name is
``tcm-user/<hba>/<dev>/<dev_config>`` (``tcmu_update_uio_info``), where ``<dev_config>`` is what
was written as ``dev_config=`` and by convention ``<subtype>/<cfgstring>``; ours is ``iscsi``.
Map 0 (``maps/map0/size``) is mailbox + command ring + data area and must be mapped whole, at
offset 0, or ``tcmu_mmap`` refuses it (EINVAL). Only one process may hold ``/dev/uioN`` open
(``tcmu_open``: EBUSY). ``poll()`` reports POLLIN when the uio event counter moved, ``read()``
of exactly 4 bytes returns it, and a 4-byte ``write()`` makes the kernel reap completions
(``tcmu_irqcontrol`` -> ``tcmu_handle_completions``). When the backstore is deleted the uio
device is unregistered: poll reports POLLERR and read/write fail with EIO.

Data-area pages are allocated lazily and a page no live command owns faults with SIGBUS, which
kills Python. This module therefore never touches the map beyond handing out one
``memoryview`` of it; the dispatcher reads only the mailbox and ring and slices the data area
strictly per iovec.

Restart: a handler that dies leaves commands on the ring that nobody will complete.
:func:`takeover` makes the device usable again without deleting it, so ``/dev/sdX`` survives:
open (so that a device still owned by a live handler fails with EBUSY *before* anything is
disturbed), ``action/block_dev`` = 1 (new commands fail with BUSY and are retried by the SCSI
mid-layer), ``action/reset_ring`` = 1 (every command on the ring completes with BUSY and is
retried; head and tail go back to 0), ``action/block_dev`` = 0. tcmu-runner runs the same
actions but opens after the reset; the kernel does not care about the order
(``tcmu_reset_ring`` ignores ``TCMU_DEV_BIT_OPEN``).
"""

from __future__ import annotations

import enum
import errno
import logging
import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tcmu_handler import ring
from tcmu_handler.errors import (
    ConfigfsError,
    DeviceBusy,
    DeviceNotFound,
    DeviceRemoved,
    TCMUError,
)

log = logging.getLogger(__name__)

SUBTYPE = "iscsi"
"""Our handler subtype: the first path element of ``dev_config``."""

SYSFS_ROOT = Path("/sys")
DEV_ROOT = Path("/dev")
CONFIGFS_ROOT = Path("/sys/kernel/config")

_EVENT = b"\0\0\0\0"  # the value written is ignored (uio_write hands it to tcmu_irqcontrol)

# Errors after which the fd is useless: the device was unregistered underneath us (EIO, ENODEV;
# POLLERR), or — for the simulator's socket — its peer went away (EPIPE, ECONNRESET).
_GONE_ERRNOS = frozenset({errno.EIO, errno.ENODEV, errno.ENXIO, errno.EPIPE, errno.ECONNRESET,
                          errno.EBADF, errno.ESHUTDOWN})


# --- discovery ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UioName:
    """The parts of ``/sys/class/uio/uioN/name`` for a tcm-user device."""

    hba_index: int
    dev_name: str
    subtype: str
    cfgstring: str

    @classmethod
    def parse(cls, text: str) -> UioName | None:
        """Split ``tcm-user/<hba>/<dev>/<subtype>/<cfgstring>``; None for any other uio name.

        The cfgstring may itself contain slashes (an ``iscsi://`` URL); a device created
        without ``dev_config`` has an empty subtype.
        """
        parts = text.strip("\n").split("/", 3)
        if len(parts) < 3 or parts[0] != "tcm-user" or not parts[1].isdigit() or not parts[2]:
            return None
        subtype, _, cfg = parts[3].partition("/") if len(parts) == 4 else ("", "", "")
        return cls(int(parts[1]), parts[2], subtype, cfg)

    def __str__(self) -> str:
        tail = f"/{self.subtype}" if self.subtype else ""
        if self.cfgstring:
            tail += f"/{self.cfgstring}"
        return f"tcm-user/{self.hba_index}/{self.dev_name}{tail}"


@dataclass(frozen=True, slots=True)
class UioInfo:
    """A TCMU uio device found in sysfs: which ``/dev/uioN``, and how much to map."""

    index: int
    name: UioName
    map_size: int
    dev_path: Path
    sysfs_path: Path

    @property
    def label(self) -> str:
        """How messages name the device: ``uio3 (user_1/disk0)``."""
        return f"uio{self.index} (user_{self.name.hba_index}/{self.name.dev_name})"


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace").strip()


def _uio_dirs(sysfs_root: Path) -> Iterator[tuple[int, Path]]:
    base = sysfs_root / "class" / "uio"
    try:
        entries = list(base.iterdir())
    except FileNotFoundError:
        return
    for entry in entries:
        name = entry.name
        if name.startswith("uio") and name[3:].isdigit():
            yield int(name[3:]), entry


def find_devices(subtype: str | None = SUBTYPE, *, sysfs_root: Path = SYSFS_ROOT,
                 dev_root: Path = DEV_ROOT) -> list[UioInfo]:
    """Every tcm-user uio device whose subtype is ``subtype`` (all of them for None).

    Devices that disappear while we look are skipped. Sorted by uio index.
    """
    found: list[UioInfo] = []
    for index, path in _uio_dirs(sysfs_root):
        try:
            name = UioName.parse(_read_text(path / "name"))
            if name is None or (subtype is not None and name.subtype != subtype):
                continue
            size_text = _read_text(path / "maps" / "map0" / "size")
        except (FileNotFoundError, NotADirectoryError):
            continue  # removed under us, or not a TCMU device with a map
        except OSError as exc:
            raise TCMUError(f"cannot read {path}: {exc.strerror}") from exc
        try:
            map_size = int(size_text, 16)  # uio prints "0x%08llx"
        except ValueError:
            raise TCMUError(
                f"{path}/maps/map0/size holds {size_text!r}, not a hex size") from None
        found.append(UioInfo(index, name, map_size, dev_root / f"uio{index}", path))
    found.sort(key=lambda info: info.index)
    return found


def find_device(dev_name: str, *, hba_index: int | None = None, subtype: str | None = SUBTYPE,
                sysfs_root: Path = SYSFS_ROOT, dev_root: Path = DEV_ROOT) -> UioInfo:
    """The uio device of backstore ``dev_name`` (``user_<hba_index>/<dev_name>``)."""
    for info in find_devices(subtype, sysfs_root=sysfs_root, dev_root=dev_root):
        if info.name.dev_name == dev_name and hba_index in (None, info.name.hba_index):
            return info
    where = f"user_{hba_index}/{dev_name}" if hba_index is not None else dev_name
    raise DeviceNotFound(
        f"no uio device for TCMU backstore {where} with subtype {subtype!r} in "
        f"{sysfs_root}/class/uio: is the backstore created and enabled, and is "
        "target_core_user loaded (modprobe target_core_user)?")


# --- the open device ---------------------------------------------------------------------------


class UioDevice:
    """An open TCMU uio device: the event fd and the shared mapping of map 0.

    Owns both; :meth:`close` releases them. ``view`` is a ``memoryview`` of the whole map, to be
    sliced (never copied, never read beyond the ring except through live iovecs).
    """

    def __init__(self, fd: int, mapping: mmap.mmap, *, name: str, path: str = "") -> None:
        self._fd = fd
        self._map: mmap.mmap | None = mapping
        self._view: memoryview | None = memoryview(mapping)
        self._fd_open = True
        self.name = name
        """Human-readable name for messages (``uio3 (user_1/disk0)``)."""
        self.path = path
        self.size = len(mapping)

    @classmethod
    def open(cls, info: UioInfo) -> UioDevice:
        """Open ``info.dev_path`` and map exactly ``info.map_size`` bytes of it.

        Raises :class:`DeviceBusy` when another process holds it, :class:`DeviceNotFound` when
        it vanished, :class:`TCMUError` otherwise.
        """
        path = str(info.dev_path)
        backstore = f"user_{info.name.hba_index}/{info.name.dev_name}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise DeviceBusy(
                    f"{path} (TCMU backstore {backstore}) is already open: another handler owns "
                    "it (a running iscsi-hba daemon, or tcmu-runner, which claims every user_* "
                    "backstore: stop it)") from None
            if exc.errno == errno.ENOENT:
                raise DeviceNotFound(
                    f"{path} does not exist although sysfs lists it for {backstore}: is "
                    "udev/devtmpfs creating /dev/uio* nodes?") from None
            raise TCMUError(
                f"cannot open {path} (TCMU backstore {backstore}): {exc.strerror}") from None
        try:
            mapping = mmap.mmap(fd, info.map_size, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        except (OSError, ValueError) as exc:  # ValueError: a regular file shorter than asked
            os.close(fd)
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise TCMUError(
                f"cannot map {info.map_size} bytes of {path} (TCMU backstore {backstore}): "
                f"{reason}; "
                "the kernel accepts only the exact size of maps/map0/size") from None
        device = cls(fd, mapping, name=info.label, path=path)
        try:
            device.mailbox()
        except TCMUError:
            device.close()
            raise
        return device

    @property
    def fd(self) -> int:
        """The uio file descriptor (non-blocking), for ``loop.add_reader``."""
        return self._fd

    @property
    def view(self) -> memoryview:
        """A memoryview of the whole map (raises once the device is closed)."""
        if self._view is None:
            raise TCMUError(f"{self.name} is closed")
        return self._view

    @property
    def closed(self) -> bool:
        """True once :meth:`close` released the fd (the map may wait for lingering views)."""
        return not self._fd_open

    @property
    def mapped(self) -> bool:
        """True until the map is actually unmapped (which :meth:`close` may defer)."""
        return self._map is not None

    def mailbox(self) -> ring.Mailbox:
        """Read and validate the mailbox."""
        return ring.Mailbox.parse(self.view)

    def read_event(self) -> bool:
        """Consume a uio event (the 4-byte read). False when there was none (EAGAIN).

        Raises :class:`DeviceRemoved` when the device is gone.
        """
        try:
            data = os.read(self._fd, 4)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise DeviceRemoved(self._gone_message("read", exc)) from None
        if len(data) != 4:
            # A socket peer closing (simulator) reads as end of file.
            raise DeviceRemoved(f"{self.name} was removed (end of file on its fd)")
        return True

    def notify(self) -> bool:
        """Tell the kernel to reap completions (the 4-byte write). False on EAGAIN.

        Raises :class:`DeviceRemoved` when the device is gone.
        """
        try:
            os.write(self._fd, _EVENT)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise DeviceRemoved(self._gone_message("write", exc)) from None
        return True

    def _gone_message(self, what: str, exc: OSError) -> str:
        if exc.errno in _GONE_ERRNOS:
            return f"{self.name} was removed ({what}: {exc.strerror})"
        return f"{self.name}: {what} failed: {exc.strerror}"

    def close(self) -> bool:
        """Close the fd and unmap. Idempotent.

        Returns False when the unmap had to be deferred because views of the map are still
        alive (a command's buffer held by the initiator): unmapping then would turn those
        views into dangling pointers. Call again once they are released.
        """
        if self._fd_open:
            self._fd_open = False
            try:
                os.close(self._fd)
            except OSError:
                pass
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                return False
            self._map = None
        return True

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<UioDevice {self.name} {state} size={self.size:#x}>"


# --- configfs ----------------------------------------------------------------------------------


class ResetLevel(enum.IntEnum):
    """Values of ``action/reset_ring``: how the kernel fails the commands on the ring."""

    BUSY = 1
    """SAM BUSY: the initiator (SCSI mid-layer) retries them."""
    CHECK_CONDITION = 2
    """CHECK CONDITION: hard failure."""


class DeviceControl(Protocol):
    """The configfs actions :func:`takeover_with` needs (configfs, or the simulator)."""

    def can_reset(self) -> bool: ...

    def block(self) -> None: ...

    def unblock(self) -> None: ...

    def reset_ring(self, level: int) -> None: ...


class TcmuConfigfs:
    """The configfs directory of one TCMU backstore: ``core/user_<hba>/<dev>``."""

    def __init__(self, hba_index: int, dev_name: str, *,
                 configfs_root: Path = CONFIGFS_ROOT) -> None:
        self.path = configfs_root / "target" / "core" / f"user_{hba_index}" / dev_name

    @classmethod
    def for_device(cls, info: UioInfo, *, configfs_root: Path = CONFIGFS_ROOT) -> TcmuConfigfs:
        return cls(info.name.hba_index, info.name.dev_name, configfs_root=configfs_root)

    def exists(self) -> bool:
        return self.path.is_dir()

    def can_reset(self) -> bool:
        """Whether the kernel has ``action/block_dev`` and ``action/reset_ring`` (Linux 4.17+)."""
        action = self.path / "action"
        return (action / "block_dev").exists() and (action / "reset_ring").exists()

    def _write(self, rel: str, value: str) -> None:
        path = self.path / rel
        try:
            with open(path, "w", encoding="ascii") as f:
                f.write(value)
        except OSError as exc:
            raise ConfigfsError(
                f"writing {value!r} to {path} failed: {exc.strerror}"
                + ("; is configfs mounted on /sys/kernel/config and does the backstore exist?"
                   if exc.errno == errno.ENOENT else "")) from None

    def _read(self, rel: str) -> str:
        path = self.path / rel
        try:
            return _read_text(path)
        except OSError as exc:
            raise ConfigfsError(f"reading {path} failed: {exc.strerror}") from None

    def write_action(self, name: str, value: int) -> None:
        """Write ``value`` to ``action/<name>``."""
        self._write(f"action/{name}", str(value))

    def block(self) -> None:
        """``action/block_dev`` = 1: the kernel reaps what was completed, then fails new
        commands with BUSY (``tcmu_block_dev``)."""
        self.write_action("block_dev", 1)

    def unblock(self) -> None:
        """``action/block_dev`` = 0."""
        self.write_action("block_dev", 0)

    def is_blocked(self) -> bool:
        return self._read("action/block_dev") == "blocked"

    def reset_ring(self, level: int = ResetLevel.BUSY) -> None:
        """``action/reset_ring``: fail every command on the ring, head = tail = 0."""
        self.write_action("reset_ring", level)

    def read_attrib(self, name: str) -> str:
        return self._read(f"attrib/{name}")

    def write_attrib(self, name: str, value: int | str) -> None:
        self._write(f"attrib/{name}", str(value))


# --- restart takeover --------------------------------------------------------------------------


def takeover_with(open_device: Callable[[], UioDevice], control: DeviceControl, *,
                  reset_level: int = ResetLevel.BUSY) -> UioDevice:
    """Open a device a previous handler left behind and bring its ring to a clean state.

    Order: open (EBUSY here leaves a live owner undisturbed), block, reset the ring, unblock;
    the device is unblocked even when the reset fails. Kernels without the action files only
    get opened: the dispatcher then replays the ring from ``cmd_tail``.
    """
    device = open_device()
    try:
        if not control.can_reset():
            log.warning("%s: the kernel has no action/reset_ring; serving the ring as the "
                        "previous handler left it", device.name)
            return device
        control.block()
        try:
            control.reset_ring(reset_level)
        finally:
            control.unblock()
    except BaseException:
        device.close()
        raise
    log.info("%s: took over the device (ring reset, outstanding commands retried)", device.name)
    return device


def takeover(info: UioInfo, *, configfs_root: Path = CONFIGFS_ROOT,
             reset_level: int = ResetLevel.BUSY) -> UioDevice:
    """:func:`takeover_with` for a real device found by :func:`find_devices`."""
    return takeover_with(lambda: UioDevice.open(info),
                         TcmuConfigfs.for_device(info, configfs_root=configfs_root),
                         reset_level=reset_level)
