"""Registration with the kernel: TCMU user backstores and tcm_loop LUNs, through rtslib-fb.

Every function here blocks (configfs writes do: linking a LUN makes the kernel send INQUIRY
and READ CAPACITY to the ring synchronously) and must run in a worker thread while the event
loop keeps serving the ring — see ``Daemon`` in :mod:`hba.daemon`. Nothing here touches the
ring itself.

A LUN we attach is, in configfs (docs/tcmu-ring.md §7)::

    core/user_<n>/<name>            UserBackedStorageObject, dev_config "iscsi/<cfgstring>",
                                    control nl_reply_supported=-1 (no netlink replies awaited)
    loopback/naa.5001405.../tpgt_1  tcm_loop target; its LUN 0 links the storage object and
                                    the SCSI midlayer then creates /dev/sdX

The cfgstring names the target and LUN only (:mod:`hba.cfgstring`); it is visible to every
user in ``/sys/class/uio/*/name`` and must never carry a secret.

A LUN reached through several portals has one such pair per path (docs/multipath-design.md
§1): the ring carries no I_T nexus, so only a backstore of its own per session lets each
``/dev/sdX`` report its own remote target port (ALUA), fail on its own and hold its own
persistent reservations.

Several processes change configfs (the daemon's worker processes, :mod:`hba.workers`): rtslib
picks a free ``user_<n>`` by looking, so two that create a backstore at once could pick the
same. Every change here therefore holds one lock file, :data:`LOCK_PATH` (``flock``, bounded
by :data:`LOCK_TIMEOUT`), whichever process makes it; reading configfs needs none.

Persistent reservations pass through (``attrib/pgr_support = 0``, :func:`pass_through_pr`):
with LIO's default it emulates PERSISTENT RESERVE IN/OUT, RESERVE and RELEASE itself, per
backstore, and the target never hears of them — wrong for a shared LUN even with one path,
and each path of a multipath LUN would see a reservation state of its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

from hba.errors import HBAError

log = logging.getLogger(__name__)

SUBTYPE = "iscsi"
CONFIGFS = Path("/sys/kernel/config")
# rtslib-fb's database root. Each new storage object makes rtslib (RTSRoot) write it into the
# kernel's target/dbroot when the kernel has another (target_core_mod starts with /var/target
# unless /etc/target exists when it loads), and the kernel accepts only an existing directory:
# on a host where nothing created /etc/target, rtslib refuses with "Cannot set dbroot to
# /etc/target". The kernel keeps persistent-reservation (APTPL) and ALUA state there.
DBROOT = Path("/etc/target")
LOCK_PATH = Path("/run/lock/iscsi-hba.configfs")
LOCK_TIMEOUT = 120.0   # seconds: above a LUN link's wait for the ring (INQUIRY, cmd_time_out)
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

# The modules the kernel half needs, in load order, with what each is for.
MODULES = (
    ("configfs", "the configuration file system LIO is driven through"),
    ("target_core_mod", "the LIO SCSI target core"),
    ("target_core_user", "TCMU, which hands SCSI commands to this daemon"),
    ("tcm_loop", "the loopback fabric that presents the virtual HBA"),
)


class KernelSetupError(HBAError):
    """The kernel side cannot be used: a module, configfs, or a competing handler."""


class RegistrationError(HBAError):
    """A configfs operation failed."""


@dataclass(frozen=True, slots=True)
class BackstoreInfo:
    """One user backstore of ours as configfs shows it."""

    name: str
    hba_index: int
    cfgstring: str          # without the "iscsi/" prefix
    size: int
    path: Path
    loopback_address: str | None = None   # "H:0:T" of the tcm_loop target linking it
    loopback_wwn: str | None = None
    lun: int | None = None

    @property
    def scsi_address(self) -> str | None:
        """``H:C:T:L`` of the disk, when a tcm_loop LUN links the backstore."""
        if self.loopback_address is None or self.lun is None:
            return None
        return f"{self.loopback_address}:{self.lun}"


def _module_loaded(name: str) -> bool:
    return Path("/sys/module", name).exists()


def _modprobe(name: str) -> bool:
    if shutil.which("modprobe") is None:
        return False
    proc = subprocess.run(["modprobe", name], capture_output=True, check=False)
    return proc.returncode == 0 and _module_loaded(name)


def tcmu_runner_pids(proc_root: Path = Path("/proc")) -> list[int]:
    """PIDs of running tcmu-runner processes (they claim every ``user:*`` device)."""
    pids: list[int] = []
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if comm == "tcmu-runner":
            pids.append(int(entry.name))
    return pids


def preflight(configfs: Path = CONFIGFS, *, load_modules: bool = True) -> None:
    """Check (and where possible fix) what the kernel half needs; raise with every problem.

    Missing modules are loaded with ``modprobe`` when ``load_modules``; configfs is mounted
    when it is not. What cannot be fixed is explained with the command that fixes it.
    """
    problems: list[str] = []
    for module, purpose in MODULES:
        if _module_loaded(module) or (load_modules and _modprobe(module)):
            continue
        if module == "configfs" and configfs.is_dir():
            continue  # built into the kernel
        problems.append(
            f"kernel module {module} ({purpose}) is not loaded and could not be loaded: run "
            f"`modprobe {module}`; if that fails, this kernel lacks it (Debian's stock kernel "
            "has it; ./run demo uses a VM when the host kernel does not)")
    if not problems and not os.path.ismount(configfs) and not (configfs / "target").is_dir():
        proc = subprocess.run(["mount", "-t", "configfs", "none", str(configfs)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            problems.append(
                f"configfs is not mounted at {configfs}: run "
                f"`mount -t configfs none {configfs}` ({proc.stderr.strip()})")
    if not problems and not (configfs / "target").is_dir():
        problems.append(
            f"{configfs}/target does not exist although target_core_mod is loaded: is configfs "
            f"mounted at {configfs}?")
    pids = tcmu_runner_pids()
    if pids:
        problems.append(
            f"tcmu-runner is running (pid {', '.join(map(str, pids))}); it claims every user "
            "backstore, including ours: stop it with `systemctl stop tcmu-runner` and keep it "
            "from being started again with `systemctl mask tcmu-runner`")
    if problems:
        raise KernelSetupError("the kernel is not ready for iscsi-hba:\n  - "
                               + "\n  - ".join(problems))


# --------------------------------------------------------------------------------------------
# configfs through rtslib-fb

_P = ParamSpec("_P")
_R = TypeVar("_R")


@contextlib.contextmanager
def configfs_lock(path: Path | None = None, timeout: float | None = None) -> Iterator[None]:
    """Hold the lock over configfs changes (module docstring) for the ``with`` block."""
    path = path or LOCK_PATH
    timeout = LOCK_TIMEOUT if timeout is None else timeout
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise RegistrationError(f"cannot open the configfs lock {path}: {exc.strerror}; "
                                "the daemon runs as root") from None
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RegistrationError(
                        f"another process held the configfs lock {path} for {timeout:g} s "
                        "(a worker of the daemon blocked in configfs?): try again") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)   # releases the lock


def _locked(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """``fn`` holding :func:`configfs_lock` (the lock is not reentrant: inner calls go to the
    undecorated functions)."""
    def locked(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with configfs_lock():
            return fn(*args, **kwargs)

    locked.__name__, locked.__doc__ = fn.__name__, fn.__doc__
    return locked


@_locked
def create_backstore(
    name: str,
    cfgstring: str,
    size: int,
    *,
    hw_max_sectors: int | None = None,
    max_data_area_mb: int | None = None,
    cmd_time_out: int | None = None,
    wwn: str | None = None,
) -> BackstoreInfo:
    """Create and enable ``user_N/<name>`` with dev_config ``iscsi/<cfgstring>``.

    Its uio device appears as soon as this returns: serve it before :func:`link_loopback`.
    """
    if not NAME_RE.match(name):
        raise RegistrationError(
            f"backstore name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
    ensure_dbroot()
    from rtslib_fb import RTSLibError, UserBackedStorageObject

    control = "nl_reply_supported=-1"
    if max_data_area_mb is not None:
        control += f",max_data_area_mb={max_data_area_mb}"
    try:
        so = UserBackedStorageObject(
            name, config=f"{SUBTYPE}/{cfgstring}", size=size, wwn=wwn,
            hw_max_sectors=hw_max_sectors, control=control)
    except RTSLibError as exc:
        raise RegistrationError(
            f"could not create TCMU backstore {name}: {exc}") from None
    path = Path(so.path)
    # Attributes must be set before the device is exported through a LUN (docs/tcmu-ring.md §5).
    if cmd_time_out is not None:
        _write_attrib(path, "cmd_time_out", str(cmd_time_out))
    _write_attrib(path, "tmr_notification", "1")
    pass_through_pr(path)
    return BackstoreInfo(name=name, hba_index=_hba_index(path), cfgstring=cfgstring,
                         size=size, path=path)


def set_cmd_time_out(path: Path, seconds: int) -> bool:
    """Set ``attrib/cmd_time_out`` of a backstore not exported yet; False when the kernel
    refuses (a LUN links it already: the value is fixed then) or has no such attribute."""
    f = path / "attrib" / "cmd_time_out"
    try:
        f.write_text(str(seconds))
    except OSError as exc:
        log.debug("%s: cmd_time_out stays as it is (%s)", path, exc.strerror)
        return False
    return True


def ensure_dbroot(path: Path = DBROOT, configfs: Path = CONFIGFS) -> None:
    """Make ``path`` (rtslib-fb's database root) exist — root's, mode 755, as the targetcli
    packages ship it — and point the kernel's dbroot at it while no backstore exists yet.

    rtslib does the latter itself only after creating a backstore, when the kernel no longer
    accepts a change ("db_root: cannot be changed because it's in use"): it would then warn on
    every new backstore, and keep the persistent-reservation state under a missing directory.
    """
    if not path.is_dir():
        try:
            path.mkdir(mode=0o755)
            path.chmod(0o755)  # whatever the umask
            log.info("created %s (LIO's database directory, which rtslib-fb needs)", path)
        except FileExistsError:
            if not path.is_dir():
                raise RegistrationError(
                    f"{path} exists but is not a directory; LIO keeps its database there: "
                    "move it away") from None
        except OSError as exc:
            raise RegistrationError(
                f"cannot create {path}, LIO's database directory, which rtslib-fb needs: "
                f"{exc.strerror}; create it with `mkdir -m 755 {path}`") from None
    dbroot = configfs / "target" / "dbroot"
    if _read(dbroot).strip() in ("", str(path)):
        return
    try:
        dbroot.write_text(f"{path}\n")
    except OSError as exc:  # backstores exist (EINVAL): the kernel keeps its own
        log.debug("the kernel's dbroot stays %s: %s", _read(dbroot).strip(), exc.strerror)


def pass_through_pr(path: Path) -> None:
    """Let PERSISTENT RESERVE IN/OUT, RESERVE and RELEASE through the ring to the target
    instead of LIO answering them (module docstring). Writable at any time, also while a LUN
    links the backstore (target_core_configfs.c, ``pgr_support``): backstores made by an
    older daemon or by targetcli get it when they are taken over."""
    _write_attrib(path, "pgr_support", "0")


def _write_attrib(path: Path, attrib: str, value: str) -> None:
    f = path / "attrib" / attrib
    if not f.exists():
        log.debug("%s has no attribute %s; not set", path, attrib)
        return
    try:
        f.write_text(value)
    except OSError as exc:
        log.warning("could not set %s/attrib/%s to %s: %s", path, attrib, value, exc)


def _hba_index(path: Path) -> int:
    # .../core/user_<n>/<name>
    parent = path.parent.name
    try:
        return int(parent.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        raise RegistrationError(f"unexpected configfs path {path}") from None


@_locked
def link_loopback(name: str) -> BackstoreInfo:
    """Create a tcm_loop target whose LUN 0 is backstore ``name``; the disk then appears.

    Blocks until the kernel has sent its first commands through the ring (INQUIRY, ...): the
    ring must already be served from the event loop.
    """
    from rtslib_fb import LUN, TPG, FabricModule, RTSLibError, Target, UserBackedStorageObject

    try:
        so = UserBackedStorageObject(name)
        target = Target(FabricModule("loopback"))
        try:
            tpg = TPG(target, 1)
            LUN(tpg, 0, so)
        except BaseException:
            with contextlib.suppress(Exception):
                target.delete()
            raise
    except RTSLibError as exc:
        raise RegistrationError(f"could not link backstore {name} to tcm_loop: {exc}") from None
    info = find_backstore(name)
    if info is None:  # pragma: no cover - just created
        raise RegistrationError(f"backstore {name} vanished while linking it")
    return info


@_locked
def unlink_and_delete(name: str) -> None:
    """Remove the tcm_loop targets linking backstore ``name``, then the backstore.

    Unlinking makes the kernel send SYNCHRONIZE CACHE through the ring: keep serving it until
    this returns; the uio device disappears with the backstore.
    """
    _unlink_luns(name)
    _delete_backstore(name)


def unlink_luns(name: str) -> None:
    """Remove what links backstore ``name`` (:func:`_unlink_luns`), holding the lock."""
    with configfs_lock():
        _unlink_luns(name)


def delete_backstore(name: str) -> None:
    """Delete backstore ``name`` (:func:`_delete_backstore`), holding the lock."""
    with configfs_lock():
        _delete_backstore(name)


def _unlink_luns(name: str) -> None:
    """Remove what links backstore ``name``: its tcm_loop targets whole, other fabrics' LUNs.

    The kernel sends SYNCHRONIZE CACHE through the ring meanwhile: keep serving it until this
    returns. Afterwards no command reaches the ring any more.
    """
    from rtslib_fb import RTSLibError, UserBackedStorageObject

    try:
        so = UserBackedStorageObject(name)
    except RTSLibError:
        return
    try:
        for lun in list(so.attached_luns):
            target = lun.parent_tpg.parent_target
            if target.fabric_module.name == "loopback":
                target.delete()
            else:
                lun.delete()
    except RTSLibError as exc:
        raise RegistrationError(f"could not unlink backstore {name}: {exc}") from None


def _delete_backstore(name: str) -> None:
    """Delete backstore ``name`` (its uio device goes with it); nothing if it is gone."""
    from rtslib_fb import RTSLibError, UserBackedStorageObject

    try:
        so = UserBackedStorageObject(name)
    except RTSLibError:
        return
    try:
        so.delete()
    except RTSLibError as exc:
        raise RegistrationError(f"could not remove backstore {name}: {exc}") from None


def list_backstores(configfs: Path = CONFIGFS) -> list[BackstoreInfo]:
    """Every user backstore whose dev_config is ``iscsi/...``, with its tcm_loop link."""
    core = configfs / "target" / "core"
    links = _loopback_links(configfs)
    out: list[BackstoreInfo] = []
    if not core.is_dir():
        return out
    for hba in sorted(core.glob("user_*")):
        for dev in sorted(p for p in hba.iterdir() if p.is_dir()):
            info = _read_backstore(dev, links)
            if info is not None:
                out.append(info)
    return out


def read_backstore(hba_index: int, name: str, configfs: Path = CONFIGFS) -> BackstoreInfo | None:
    """Backstore ``user_<hba_index>/<name>`` if it is ours, without its tcm_loop link.

    Unlike :func:`find_backstore` this reads the backstore's own directory only, so it does
    not wait while a LUN is being linked to it (the link holds configfs locks until the
    kernel's first commands through the ring complete).
    """
    dev = configfs / "target" / "core" / f"user_{hba_index}" / name
    if not dev.is_dir():
        return None
    return _read_backstore(dev, {})


def find_backstore(name: str, configfs: Path = CONFIGFS) -> BackstoreInfo | None:
    for info in list_backstores(configfs):
        if info.name == name:
            return info
    return None


def _read_backstore(dev: Path, links: dict[Path, tuple[str, str, int]]
                    ) -> BackstoreInfo | None:
    # tcmu_show_configfs_dev_params: "Config: <dev_config> Size: <bytes> MaxDataAreaMB: ..."
    info_text = _read(dev / "info")
    m = re.search(r"Config(?:String)?:\s*(\S+)", info_text)
    config = m.group(1) if m else ""
    m = re.search(r"\bSize:\s*(\d+)", info_text)   # not the core's "SectorSize: 512"
    size = int(m.group(1)) if m else 0
    subtype, slash, cfgstring = config.partition("/")
    if subtype != SUBTYPE or not slash:
        return None
    address = wwn = None
    lun: int | None = None
    link = links.get(dev.resolve())
    if link is not None:
        address, wwn, lun = link
    return BackstoreInfo(name=dev.name, hba_index=_hba_index(dev), cfgstring=cfgstring,
                         size=size, path=dev, loopback_address=address, loopback_wwn=wwn,
                         lun=lun)


def _loopback_links(configfs: Path) -> dict[Path, tuple[str, str, int]]:
    """Resolved backstore path -> (tcm_loop address "H:0:T", target WWN, LUN)."""
    links: dict[Path, tuple[str, str, int]] = {}
    root = configfs / "target" / "loopback"
    if not root.is_dir():
        return links
    for target in root.iterdir():
        if not target.name.startswith("naa."):
            continue
        for tpg in target.glob("tpgt_*"):
            address = _read(tpg / "address").strip()
            for lun_dir in tpg.glob("lun/lun_*"):
                try:
                    lun = int(lun_dir.name.split("_", 1)[1])
                except ValueError:
                    continue
                for link in lun_dir.iterdir():
                    if link.is_symlink():
                        links[link.resolve()] = (address, target.name, lun)
    return links


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def set_disk_timeout(scsi_address: str, seconds: int, sysfs: Path = Path("/sys")) -> None:
    """Give the SCSI midlayer a command timeout that outlasts session recovery.

    open-iscsi blocks the SCSI host during recovery; tcm_loop cannot, so commands wait in our
    queue instead, and the disk's timeout must exceed the replacement timeout or the midlayer
    would abort and error them first.
    """
    path = sysfs / "bus/scsi/devices" / scsi_address / "timeout"
    try:
        path.write_text(str(seconds))
    except OSError as exc:
        log.warning("could not set the SCSI command timeout of %s to %d s: %s",
                    scsi_address, seconds, exc)
