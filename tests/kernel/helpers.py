"""Helpers for kernel tests, which run inside the VM of ``deploy/vm/run`` (real configfs, LIO,
open-iscsi, udev).

- :class:`Lio`: LIO iSCSI targets through rtslib-fb (ramdisk or fileio backstore, any LUN size,
  no CHAP / one-way / mutual CHAP, demo mode or explicit initiator ACLs), removed without a trace;
  :meth:`Lio.create_multipath`: one LUN on several portals, a TPG and an ALUA group each.
- Multipath: :class:`Multipathd` (multipathd in the foreground), :class:`PathCutter` (a path cut
  with an nftables drop), :class:`IoProbe` (the longest I/O stall, errors and corrupt reads on a
  device while paths fail).
- :class:`Iscsid` and :class:`Iscsiadm`: open-iscsi's daemon and CLI, the reference initiator.
- :func:`wait_for_block_device`: wait, through real udev events (pyudev), for a disk that udev
  has finished processing (so its ``/dev/disk/by-*`` links exist).
- :class:`KernelLog`: the kernel's messages from a given moment on (``/dev/kmsg``).
- :func:`kernel_has_target` / :func:`rerun_in_vm`: for scripts (benchmarks) that need the VM.

The conftest turns these into fixtures; tests may also use them directly.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pyudev

from hba import kernel
from initiator.url import format_portal
from tests.support.targets import Chap, TargetInfo, free_tcp_port, unique_iqn

CONFIGFS_TARGET = Path("/sys/kernel/config/target")
VM_HINT = "deploy/vm/run -- .venv/bin/pytest tests/kernel"


def in_vm() -> bool:
    """True inside the harness's VM (its init sets HBA_VM=1; LIO's configfs is mounted)."""
    return os.environ.get("HBA_VM") == "1" and CONFIGFS_TARGET.is_dir()


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    timeout: float = 120.0,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; on failure raise with the command and its output."""
    args = [os.fspath(a) for a in argv]
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, input=input, check=False
    )
    if check and proc.returncode != 0:
        raise CommandError(args, proc)
    return proc


class CommandError(AssertionError):
    """A helper's command failed; the message holds the command, its status and its output."""

    def __init__(self, argv: list[str], proc: subprocess.CompletedProcess[str]) -> None:
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        super().__init__(
            f"`{' '.join(argv)}` exited {proc.returncode}\n"
            f"stdout: {proc.stdout.strip()}\nstderr: {proc.stderr.strip()}"
        )


# ------------------------------------------------------------------------------------------
# LIO through rtslib-fb


@dataclass(frozen=True)
class LioTarget(TargetInfo):
    """An LIO target made by :class:`Lio`: what initiators need plus what teardown removes."""

    backstore: str = "ramdisk"
    storage_name: str = ""
    backing_file: Path | None = None
    initiators: tuple[str, ...] | None = None  # None: any initiator (demo mode)

    @property
    def configfs_paths(self) -> list[Path]:
        """The configfs directories this target owns (all gone after removal)."""
        plugin = "rd_mcp" if self.backstore == "ramdisk" else "fileio"
        paths = [CONFIGFS_TARGET / "iscsi" / self.iqn]
        paths += (CONFIGFS_TARGET / "core").glob(f"{plugin}_*/{self.storage_name}")
        return paths


BACKSTORES = ("ramdisk", "fileio")

# target_core_alua.h: ALUA_ACCESS_STATE_*
ALUA_STATES = {"active/optimized": 0, "active/non-optimized": 1, "standby": 2,
               "unavailable": 3, "transitioning": 15}


@dataclass(frozen=True)
class LioMultipathTarget(LioTarget):
    """One LUN reachable through several portals (``hosts``, same port), like a
    dual-controller array: each portal is a TPG of its own (its own SCSI target port, TPGT
    1, 2, ...) in an ALUA group of its own (``groups``, ids 16, 32, ...)."""

    hosts: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()

    @property
    def portals(self) -> list[str]:
        return [format_portal(h, self.port) for h in self.hosts]

    def multipath_url(self) -> str:
        """``iscsi://host1:port,host2:port/<iqn>/<lun>``."""
        return f"iscsi://{','.join(self.portals)}/{self.iqn}/{self.lun}"

    def set_alua(self, *states: str) -> None:
        """The access state of each group, in ``groups`` order (``ALUA_STATES`` names)."""
        import rtslib_fb as rts

        so = rts.RDMCPStorageObject(self.storage_name) if self.backstore == "ramdisk" else \
            rts.FileIOStorageObject(self.storage_name)
        for group, state in zip(self.groups, states, strict=True):
            rts.ALUATargetPortGroup(so, group).alua_access_state = ALUA_STATES[state]

    def registrations(self) -> list[str]:
        """The persistent reservation registrations LIO holds for the LUN (its configfs
        ``pr/res_pr_registered_i_pts``: one line per I_T nexus, ``iSCSI Node: <initiator>,i,
        0x<ISID> Key: 0x<key> PRgen: ...``)."""
        plugin = "rd_mcp" if self.backstore == "ramdisk" else "fileio"
        for path in (CONFIGFS_TARGET / "core").glob(
                f"{plugin}_*/{self.storage_name}/pr/res_pr_registered_i_pts"):
            # "SPC-3 PR Registrations:" and a line per registration, or "None".
            return [line.strip() for line in path.read_text().splitlines() if " Key: " in line]
        raise AssertionError(f"no pr/ directory for {self.storage_name}")


class Lio:
    """Creates LIO iSCSI targets and removes them (and only them) again."""

    def __init__(self, workdir: Path, host: str = "127.0.0.1") -> None:
        self.workdir = workdir
        self.host = host
        self._targets: list[LioTarget] = []
        self._serial = 0

    def create(
        self,
        size: int = 64 << 20,
        *,
        chap: Chap | None = None,
        backstore: str = "ramdisk",
        port: int | None = None,
        lun: int = 0,
        iqn: str | None = None,
        initiators: Iterable[str] | None = None,
    ) -> LioTarget:
        """An enabled target with one LUN of ``size`` bytes on ``host:port`` (default: free port).

        ``initiators=None`` lets any initiator in (demo mode; CHAP then lives on the TPG);
        otherwise each named initiator gets an ACL (carrying the CHAP credentials) and the LUN.
        ``chap`` with mutual credentials makes the target authenticate itself too.
        """
        import rtslib_fb as rts

        # The VM boots like a stock host, without /etc/target: rtslib needs it here as the
        # daemon does (benchmarks use this outside pytest, without the conftest's fixture).
        kernel.ensure_dbroot()
        if backstore not in BACKSTORES:
            raise ValueError(f"backstore must be one of {BACKSTORES}, not {backstore!r}")
        self._serial += 1
        name = f"hba_test_{self._serial}_{secrets.token_hex(3)}"
        iqn = iqn or unique_iqn("lio")
        port = port or free_tcp_port(self.host)
        acl_names = tuple(initiators) if initiators is not None else None
        so, backing = self._storage(name, size, backstore)
        target = LioTarget(
            host=self.host, port=port, iqn=iqn, lun=lun, size=size, chap=chap,
            backstore=backstore, storage_name=name, backing_file=backing, initiators=acl_names,
        )
        self._targets.append(target)  # from here on, remove() cleans up whatever exists
        try:
            fabric = rts.FabricModule("iscsi")
            rts_target = rts.Target(fabric, iqn, mode="create")
            tpg = rts.TPG(rts_target, 1, mode="create")
            rts.NetworkPortal(tpg, self.host, port, mode="create")
            rts_lun = rts.LUN(tpg, lun, so)
            tpg.set_attribute("authentication", "1" if chap is not None else "0")
            if acl_names is None:
                _demo_mode(tpg)
                if chap is not None:
                    _set_chap(tpg, chap)
            else:
                tpg.set_attribute("generate_node_acls", "0")
                for wwn in acl_names:
                    acl = rts.NodeACL(tpg, wwn, mode="create")
                    rts.MappedLUN(acl, lun, rts_lun)
                    if chap is not None:
                        _set_chap(acl, chap)
            tpg.enable = True
        except BaseException:
            self.remove(target)
            raise
        return target

    def remove(self, target: LioTarget) -> None:
        """Delete the target (sessions included), its backstore and its backing file."""
        import rtslib_fb as rts

        errors = []
        with contextlib.suppress(rts.RTSLibNotInCFSError):
            try:
                rts.Target(rts.FabricModule("iscsi"), target.iqn, mode="lookup").delete()
            except rts.RTSLibError as exc:
                errors.append(f"target {target.iqn}: {exc}")
        cls = rts.RDMCPStorageObject if target.backstore == "ramdisk" else rts.FileIOStorageObject
        with contextlib.suppress(rts.RTSLibNotInCFSError):
            try:
                cls(target.storage_name).delete()
            except rts.RTSLibError as exc:
                errors.append(f"backstore {target.storage_name}: {exc}")
        if target.backing_file is not None:
            target.backing_file.unlink(missing_ok=True)
        if target in self._targets:
            self._targets.remove(target)
        left = [str(p) for p in target.configfs_paths if p.exists()]
        if errors or left:
            raise AssertionError(
                f"LIO target {target.iqn} not fully removed: {'; '.join(errors)} "
                f"left in configfs: {left}"
            )

    def remove_all(self) -> None:
        failures = []
        for target in list(reversed(self._targets)):
            try:
                self.remove(target)
            except AssertionError as exc:
                failures.append(str(exc))
        if failures:
            raise AssertionError("\n".join(failures))

    @property
    def targets(self) -> list[LioTarget]:
        return list(self._targets)

    def create_multipath(
        self, size: int = 64 << 20, *, hosts: Sequence[str] = ("127.0.0.1", "127.0.0.2"),
        port: int | None = None, backstore: str = "ramdisk",
    ) -> LioMultipathTarget:
        """An enabled target with one LUN of ``size`` bytes behind one TPG per host (demo
        mode, no CHAP), each in its own active/optimized ALUA group (see
        :class:`LioMultipathTarget`). LIO writes persistent reservation metadata to
        ``/etc/target/pr``, made here (without it, PR OUT answers NOT READY 08/00)."""
        import rtslib_fb as rts

        if backstore not in BACKSTORES:
            raise ValueError(f"backstore must be one of {BACKSTORES}, not {backstore!r}")
        Path("/etc/target/pr").mkdir(parents=True, exist_ok=True)
        self._serial += 1
        name = f"hba_test_{self._serial}_{secrets.token_hex(3)}"
        iqn = unique_iqn("lio-mpath")
        port = port or _free_port_on(hosts)
        so, backing = self._storage(name, size, backstore)
        groups = tuple(f"ctrl_{chr(ord('a') + n)}" for n in range(len(hosts)))
        target = LioMultipathTarget(
            host=hosts[0], port=port, iqn=iqn, lun=0, size=size, backstore=backstore,
            storage_name=name, backing_file=backing, hosts=tuple(hosts), groups=groups)
        self._targets.append(target)
        try:
            rts_target = rts.Target(rts.FabricModule("iscsi"), iqn, mode="create")
            for n, (host, group) in enumerate(zip(hosts, groups, strict=True), 1):
                tpg = rts.TPG(rts_target, n, mode="create")
                rts.NetworkPortal(tpg, host, port, mode="create")
                lun = rts.LUN(tpg, 0, so)
                alua = rts.ALUATargetPortGroup(so, group, 16 * n)
                alua.alua_access_type = 3    # implicit and explicit
                lun.alua_tg_pt_gp_name = group
                tpg.set_attribute("authentication", "0")
                _demo_mode(tpg)
                tpg.enable = True
        except BaseException:
            self.remove(target)
            raise
        return target

    def _storage(self, name: str, size: int, backstore: str) -> tuple[Any, Path | None]:
        """A new ramdisk or fileio storage object, and its backing file (fileio)."""
        import rtslib_fb as rts

        if backstore == "ramdisk":
            return rts.RDMCPStorageObject(name, size=size), None
        self.workdir.mkdir(parents=True, exist_ok=True)
        backing = self.workdir / f"{name}.img"
        with backing.open("wb") as f:
            f.truncate(size)
        return rts.FileIOStorageObject(name, str(backing), size=size, write_back=False), backing


def _demo_mode(tpg: Any) -> None:
    """Let any initiator in, with write access (no ACLs)."""
    tpg.set_attribute("generate_node_acls", "1")
    tpg.set_attribute("demo_mode_write_protect", "0")
    tpg.set_attribute("cache_dynamic_acls", "1")


def _free_port_on(hosts: Sequence[str]) -> int:
    """A TCP port free on every one of ``hosts``."""
    for _ in range(50):
        port = free_tcp_port(hosts[0])
        try:
            for host in hosts[1:]:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no TCP port free on all of {', '.join(hosts)}")


def _set_chap(node: object, chap: Chap) -> None:
    # rtslib writes these configfs files without a trailing newline (LIO keeps it otherwise,
    # and CHAP then fails).
    node.chap_userid = chap.userid  # type: ignore[attr-defined]
    node.chap_password = chap.password  # type: ignore[attr-defined]
    if chap.mutual_userid is not None and chap.mutual_password is not None:
        node.chap_mutual_userid = chap.mutual_userid  # type: ignore[attr-defined]
        node.chap_mutual_password = chap.mutual_password  # type: ignore[attr-defined]


def configfs_objects() -> set[str]:
    """LIO objects in configfs now: HBAs and storage objects, fabric targets, TPGs."""
    found: set[str] = set()
    core = CONFIGFS_TARGET / "core"
    if core.is_dir():
        for hba in core.iterdir():
            if hba.is_dir() and hba.name != "alua":
                found.add(f"core/{hba.name}")
                found.update(f"core/{hba.name}/{so.name}" for so in hba.iterdir() if so.is_dir())
    for fabric in ("iscsi", "loopback"):
        base = CONFIGFS_TARGET / fabric
        if base.is_dir():
            for wwn in base.iterdir():
                if wwn.is_dir() and wwn.name != "discovery_auth":
                    found.add(f"{fabric}/{wwn.name}")
    return found


# ------------------------------------------------------------------------------------------
# open-iscsi


ISCSID_SOCKET = "@ISCSIADM_ABSTRACT_NAMESPACE"


class Iscsid:
    """open-iscsi's iscsid in the foreground, owned by the test session."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        if _unix_socket_listening(ISCSID_SOCKET):
            raise RuntimeError("an iscsid is already running in this VM")
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                ["iscsid", "-f"], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not _unix_socket_listening(ISCSID_SOCKET):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"iscsid did not start; log:\n{self.log_path.read_text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Log out every session, then stop iscsid."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            run(["iscsiadm", "-m", "node", "--logoutall=all"], check=False)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _unix_socket_listening(name: str) -> bool:
    with open("/proc/net/unix") as f:
        return any(line.split()[-1] == name for line in f if len(line.split()) >= 8)


_DISCOVERY_LINE = re.compile(r"^(?P<portal>\S+),(?P<tpgt>\d+)\s+(?P<iqn>\S+)$")


class Iscsiadm:
    """open-iscsi's CLI: discovery, node records with CHAP settings, login/logout, sessions.

    Remembers the node records it created and the sessions it opened; :meth:`cleanup` logs out
    of those and deletes the records.
    """

    def __init__(self) -> None:
        self._nodes: set[tuple[str, str]] = set()

    def discover(self, portal: str) -> list[tuple[str, str]]:
        """SendTargets discovery: ``[(portal, iqn), ...]``; creates node records for them."""
        out = run(["iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", portal]).stdout
        found = []
        for line in out.splitlines():
            m = _DISCOVERY_LINE.match(line.strip())
            if m:
                found.append((m["portal"], m["iqn"]))
                self._nodes.add((m["iqn"], m["portal"]))
        return found

    def add_node(self, target: TargetInfo, chap: Chap | None = None) -> None:
        """Create (or update) the node record for ``target`` with ``chap`` (default: its own)."""
        key = (target.iqn, target.portal)
        if key not in self._nodes:
            self.node(target, "-o", "new")
            self._nodes.add(key)
        chap = target.chap if chap is None else chap
        settings = {"node.session.auth.authmethod": "CHAP" if chap is not None else "None"}
        if chap is not None:
            settings["node.session.auth.username"] = chap.userid
            settings["node.session.auth.password"] = chap.password
            if chap.mutual_userid is not None and chap.mutual_password is not None:
                settings["node.session.auth.username_in"] = chap.mutual_userid
                settings["node.session.auth.password_in"] = chap.mutual_password
        # Fail a refused login at once rather than retrying for minutes.
        settings["node.session.initial_login_retry_max"] = "1"
        for name, value in settings.items():
            self.node(target, "-o", "update", "-n", name, "-v", value)

    def node(self, target: TargetInfo, *args: str, check: bool = True) -> str:
        return run(
            ["iscsiadm", "-m", "node", "-T", target.iqn, "-p", target.portal, *args], check=check
        ).stdout

    def login(self, target: TargetInfo, chap: Chap | None = None) -> None:
        """Log in to ``target`` (creating its node record with CHAP settings); raise on refusal."""
        self.add_node(target, chap)
        self.node(target, "--login")

    def logout(self, target: TargetInfo) -> None:
        self.node(target, "--logout")

    def sessions(self) -> list[str]:
        """``iscsiadm -m session`` lines; [] when there is none (exit status 21)."""
        proc = run(["iscsiadm", "-m", "session"], check=False)
        if proc.returncode == 21:
            return []
        if proc.returncode != 0:
            raise CommandError(["iscsiadm", "-m", "session"], proc)
        return [line for line in proc.stdout.splitlines() if line.strip()]

    def cleanup(self) -> None:
        for iqn, portal in sorted(self._nodes):
            base = ["iscsiadm", "-m", "node", "-T", iqn, "-p", portal]
            run([*base, "--logout"], check=False)
            run([*base, "-o", "delete"], check=False)
        self._nodes.clear()


# ------------------------------------------------------------------------------------------
# block devices through udev


DeviceMatch = Callable[[pyudev.Device], bool]


def wait_for_block_device(
    match: DeviceMatch, timeout: float = 60.0, *, what: str = "the block device"
) -> pyudev.Device:
    """The first whole-disk block device for which ``match`` is true, once udev processed it.

    Existing devices are looked at first, then udev's ``add``/``change`` events (sent after the
    rules ran, so ``device.device_node`` and ``device.device_links`` — the ``/dev/disk/by-*``
    links — are in place). Raises TimeoutError naming ``what`` after ``timeout`` seconds.
    """
    context = pyudev.Context()
    monitor = pyudev.Monitor.from_netlink(context)
    monitor.filter_by("block", device_type="disk")
    monitor.start()
    for device in context.list_devices(subsystem="block", DEVTYPE="disk"):
        if device.is_initialized and match(device):
            return device
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        device = monitor.poll(timeout=remaining)
        if device is not None and device.action in ("add", "change") and match(device):
            return device
    raise TimeoutError(f"{what} did not appear within {timeout:.0f} s")


def wait_until_gone(path: str | os.PathLike[str], timeout: float = 30.0) -> None:
    """Wait until a /dev node or sysfs path disappears (e.g. a disk after logout)."""
    deadline = time.monotonic() + timeout
    while os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{os.fspath(path)} still exists after {timeout:.0f} s")
        time.sleep(0.1)


def scsi_address(device: pyudev.Device) -> tuple[int, int, int, int] | None:
    """``(host, channel, target, lun)`` of a SCSI disk, from its scsi_device ancestor."""
    for parent in device.ancestors:
        if parent.subsystem == "scsi" and parent.device_type == "scsi_device":
            h, c, t, lun = (int(x) for x in parent.sys_name.split(":"))
            return h, c, t, lun
    return None


def iscsi_targetname(device: pyudev.Device) -> str | None:
    """The target IQN of the open-iscsi session a disk belongs to (None if not iSCSI)."""
    for parent in device.ancestors:
        if re.fullmatch(r"session\d+", parent.sys_name):
            name: Path = Path(parent.sys_path) / "iscsi_session" / parent.sys_name / "targetname"
            with contextlib.suppress(OSError):
                return name.read_text().strip()
    return None


def iscsi_disk(iqn: str, lun: int) -> DeviceMatch:
    """Match the disk of LUN ``lun`` of an open-iscsi session with target ``iqn``."""

    def match(device: pyudev.Device) -> bool:
        address = scsi_address(device)
        return address is not None and address[3] == lun and iscsi_targetname(device) == iqn

    return match


def by_id_links(device: pyudev.Device) -> list[str]:
    return sorted(link for link in device.device_links if link.startswith("/dev/disk/by-id/"))


@contextlib.contextmanager
def logged_in(
    iscsiadm: Iscsiadm, target: TargetInfo, timeout: float = 60.0
) -> Iterator[pyudev.Device]:
    """Log in, yield the session's disk (udev-processed), log out and wait for it to go."""
    iscsiadm.login(target)
    try:
        what = f"the disk of {target.url(credentials=False)}"
        disk = wait_for_block_device(iscsi_disk(target.iqn, target.lun), timeout, what=what)
        yield disk
    finally:
        iscsiadm.logout(target)
    if disk.device_node:
        wait_until_gone(disk.device_node)


def wait_for_ready(notify: socket.socket, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait for ``READY=1`` (systemd's notify protocol) on ``notify`` from ``proc``: True when
    it came, False after ``timeout`` seconds; raises if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    notify.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            message = notify.recv(4096).decode()
        except TimeoutError:
            message = ""
        if "READY=1" in message.split("\n"):
            return True
        if proc.poll() is not None:
            raise ProcessExited(proc.returncode)
    return False


class ProcessExited(AssertionError):
    """The process exited before it was ready."""

    def __init__(self, status: int) -> None:
        super().__init__(f"exited with status {status}")
        self.status = status


def assert_identity(node: str, ident: dict[str, Any]) -> None:
    """The disk ``node`` answers INQUIRY with the vendor, product and VPD 0x83 NAA identifier
    that ``hbactl inquiry --json`` read from the remote LUN (``ident``)."""
    inq = run(["sg_inq", node]).stdout
    vendor = re.search(r"Vendor identification:\s*(.*)", inq)
    product = re.search(r"Product identification:\s*(.*)", inq)
    assert vendor and product, inq
    assert (vendor[1].strip(), product[1].strip()) == (ident["vendor"], ident["product"])
    vpd = run(["sg_inq", "-p", "0x83", node]).stdout
    naa = re.findall(r"\[0x(6[0-9a-f]{31})\]", vpd)
    assert ident["naa"] is not None and naa, vpd
    assert ident["naa"] == f"naa.{naa[0]}"


def set_node_settings(iscsiadm: Iscsiadm, target: TargetInfo, settings: dict[str, str]) -> None:
    """Update open-iscsi's node record of ``target`` (create it first with ``add_node``), e.g.
    ``{"node.conn[0].iscsi.HeaderDigest": "CRC32C"}``; applies at the next login."""
    for name, value in settings.items():
        iscsiadm.node(target, "-o", "update", "-n", name, "-v", value)


# ------------------------------------------------------------------------------------------
# the kernel's log


class KernelMessage(NamedTuple):
    """One record of the kernel's log: when (seconds on CLOCK_MONOTONIC, the clock of
    ``time.monotonic()``) and what."""

    time: float
    text: str


class KernelLog:
    """The kernel's log from the moment this object is made (``/dev/kmsg``, not ``dmesg``:
    no ring-buffer arithmetic, and records a WARN() splat overwrote are reported, not lost
    silently).

        log = KernelLog()
        ...                                 # something the kernel may complain about
        messages = log.read()               # KernelMessage(time, text) since, in order
    """

    def __init__(self) -> None:
        self._fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        os.lseek(self._fd, 0, os.SEEK_END)
        self.lost = 0  # how many times records were overwritten before we read them

    def read(self) -> list[KernelMessage]:
        """The messages logged since the last call (or since this object was made)."""
        messages: list[KernelMessage] = []
        while True:
            try:
                record = os.read(self._fd, 8192)
            except BlockingIOError:
                return messages
            except BrokenPipeError:  # EPIPE: the ring buffer wrapped over unread records
                self.lost += 1
                continue
            if not record:
                return messages
            # "priority,sequence,microseconds,flags;message\n" then " KEY=value" lines.
            head, _, rest = record.decode(errors="replace").partition(";")
            fields = head.split(",")
            usec = int(fields[2]) if len(fields) > 2 and fields[2].isdigit() else 0
            messages.append(KernelMessage(usec / 1e6, rest.split("\n", 1)[0]))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> KernelLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for(condition: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.25) -> Any:
    """Poll ``condition`` until it returns something true, and return that; after
    ``timeout`` seconds raise TimeoutError saying ``what`` did not happen."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(interval)


# ------------------------------------------------------------------------------------------
# multipath: multipathd, cutting a path, the I/O stall an application sees


class Multipathd:
    """Debian's multipathd in the foreground (``-d``), logging into ``log_path``.

    ``config`` becomes ``/etc/multipath.conf`` (None: none, Debian's built-in settings; the VM's
    ``/etc`` is a tmpfs overlay, so nothing reaches the host). :meth:`stop` removes the maps it
    made (``multipath -F``), the WWIDs it was told (:meth:`add`) and the configuration.
    """

    CONF = Path("/etc/multipath.conf")
    WWIDS = Path("/etc/multipath/wwids")

    def __init__(self, log_path: Path, config: str | None = None) -> None:
        self.log_path = log_path
        self.config = config
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        if self.config is not None:
            self.CONF.write_text(self.config)
        self.WWIDS.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(["multipathd", "-d", "-s", "-v3"],
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                          start_new_session=True)
        deadline = time.monotonic() + timeout
        while run(["multipathd", "show", "daemon"], check=False).returncode != 0:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"multipathd did not start; see {self.log_path}")
            time.sleep(0.5)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        run(["multipath", "-F"], check=False)
        self.WWIDS.unlink(missing_ok=True)
        if self.config is not None:
            self.CONF.unlink(missing_ok=True)

    def add(self, device: str) -> None:
        """``multipath -a``: what Debian's ``find_multipaths strict`` wants before it makes a
        map of a new LUN; then ``multipathd reconfigure``."""
        run(["multipath", "-a", device])
        run(["multipathd", "reconfigure"])

    @staticmethod
    def maps() -> dict[str, list[tuple[str, str]]]:
        """Every multipath map (by name) with its paths as ``(major:minor, A|F)`` from the
        device mapper's own status (``dmsetup status``: what carries I/O, not a daemon's
        opinion)."""
        out = run(["dmsetup", "status", "--target", "multipath"], check=False).stdout
        found: dict[str, list[tuple[str, str]]] = {}
        for line in out.splitlines():
            name, colon, rest = line.partition(":")
            if colon and "multipath" in rest:
                found[name.strip()] = re.findall(r"(\d+:\d+) ([AF])", rest)
        return found

    @classmethod
    def wait_map(cls, timeout: float = 60.0) -> str:
        """The name of the (first) multipath map, once udev has made ``/dev/mapper/<name>``."""
        deadline = time.monotonic() + timeout
        while True:
            names = [n for n in cls.maps() if os.path.exists(f"/dev/mapper/{n}")]
            if names:
                return names[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"no multipath map within {timeout:.0f} s:\n"
                                   + run(["multipath", "-ll"], check=False).stdout)
            time.sleep(0.2)

    @classmethod
    def active_paths(cls, name: str) -> int:
        return sum(1 for _dev, state in cls.maps().get(name, []) if state == "A")

    @classmethod
    def wait_active(cls, name: str, count: int, timeout: float) -> float:
        """Wait until map ``name`` has ``count`` active paths (at least); the seconds it took."""
        started = time.monotonic()
        while cls.active_paths(name) < count:
            if time.monotonic() - started > timeout:
                listing = run(["multipath", "-ll"], check=False).stdout
                raise TimeoutError(
                    f"multipath map {name} has {cls.active_paths(name)} active paths, not "
                    f"{count}, after {timeout:.0f} s:\n{listing}")
            time.sleep(0.2)
        return time.monotonic() - started

    @staticmethod
    def priorities() -> dict[str, int]:
        """multipathd's priority of each path (``sdX`` -> prio), as its prioritizer set it."""
        out = run(["multipathd", "show", "paths", "format", "%d %p"], check=False).stdout
        return {dev: int(prio) for dev, prio in re.findall(r"^(sd[a-z]+)\s+(-?\d+)", out, re.M)}


class PathCutter:
    """Cut portals with nftables: drop TCP to and from ``host:port`` in both directions — no
    RST, no FIN, the connection just goes silent, like a pulled cable. :meth:`close` removes
    the table (every cut)."""

    TABLE = "hba_test_cut"

    def __init__(self) -> None:
        run(["nft", "add", "table", "inet", self.TABLE])
        for chain, hook in (("input", "input"), ("output", "output")):
            run(["nft", "add", "chain", "inet", self.TABLE, chain,
                 f"{{ type filter hook {hook} priority 0 ; }}"])
        self._cut: set[tuple[str, int]] = set()

    def cut(self, host: str, port: int) -> None:
        for chain, addr, tcp in (("input", "daddr", "dport"), ("output", "saddr", "sport")):
            run(["nft", "add", "rule", "inet", self.TABLE, chain, "ip", addr, host, "tcp", tcp,
                 str(port), "drop", "comment", f'"cut {host}:{port}"'])
        self._cut.add((host, port))

    def restore(self, host: str, port: int) -> None:
        for chain in ("input", "output"):
            listing = run(["nft", "-a", "list", "chain", "inet", self.TABLE, chain]).stdout
            for handle in re.findall(rf'"cut {re.escape(host)}:{port}" # handle (\d+)', listing):
                run(["nft", "delete", "rule", "inet", self.TABLE, chain, "handle", handle])
        self._cut.discard((host, port))

    def close(self) -> None:
        run(["nft", "delete", "table", "inet", self.TABLE], check=False)
        self._cut.clear()

    def __enter__(self) -> PathCutter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class ProbeResult:
    """What :class:`IoProbe` saw: operations, the longest one (the stall an application saw,
    errors included: it waited too), every error and every read that returned other data
    than was just written."""

    ops: int
    seconds: float
    longest: float
    longest_at: float                # seconds after the start
    errors: tuple[tuple[float, str, int], ...]   # (at, "write"|"read", errno)
    corrupt: tuple[float, ...]       # when

    def __str__(self) -> str:
        return (f"{self.ops} ops in {self.seconds:.1f} s, longest {self.longest:.2f} s at "
                f"t={self.longest_at:.1f} s, {len(self.errors)} errors"
                + (f" (errno {sorted({e for _t, _op, e in self.errors})})" if self.errors
                   else "") + f", {len(self.corrupt)} corrupt reads")


class IoProbe:
    """One synchronous loop of O_DIRECT 4 KiB write-then-read-back over the first ``span``
    bytes of ``device``, in a thread, while paths fail (after ``research/stallprobe.py``).
    Every block carries its sequence number, so a read that returns anything but what was
    just written is corrupt. It writes over the device's first blocks."""

    BLOCK = 4096

    def __init__(self, device: str, span: int = 8 << 20, offset: int = 0) -> None:
        self.device = device
        self.span = span
        self.offset = offset
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._result: ProbeResult | None = None
        self._failure: BaseException | None = None
        self.errors_so_far = 0

    def start(self) -> IoProbe:
        self._thread = threading.Thread(target=self._run, name="io-probe", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 300.0) -> ProbeResult:
        """Stop after the operation under way (which may wait for a path) and report."""
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the I/O probe on {self.device} is stuck for {timeout:.0f} s")
        if self._failure is not None:
            raise self._failure
        assert self._result is not None
        return self._result

    def _run(self) -> None:
        try:
            self._result = self._probe()
        except BaseException as exc:  # reported by stop()
            self._failure = exc

    def _probe(self) -> ProbeResult:
        fd = os.open(self.device, os.O_RDWR | os.O_DIRECT)
        buf = mmap.mmap(-1, self.BLOCK)     # page-aligned, as O_DIRECT wants
        view = memoryview(buf)
        blocks = self.span // self.BLOCK
        start = time.monotonic()
        ops, seq = 0, 0
        longest, longest_at = 0.0, 0.0
        errors: list[tuple[float, str, int]] = []
        corrupt: list[float] = []
        try:
            while not self._stop.is_set():
                seq += 1
                offset = self.offset + (seq % blocks) * self.BLOCK
                data = struct.pack("<QQ", seq, offset) * (self.BLOCK // 16)
                for op in ("write", "read"):
                    t0 = time.monotonic()
                    failed: OSError | None = None
                    try:
                        if op == "write":
                            view[:] = data
                            os.pwritev(fd, [view], offset)
                        else:
                            view[:] = bytes(self.BLOCK)
                            os.preadv(fd, [view], offset)
                    except OSError as exc:
                        failed = exc
                    ops += 1
                    took = time.monotonic() - t0
                    if took > longest:
                        longest, longest_at = took, t0 - start
                    if failed is not None:
                        errors.append((round(t0 - start, 2), op, failed.errno or 0))
                        self.errors_so_far += 1
                        time.sleep(0.05)   # a failing device fails at once: do not spin
                        break
                    if op == "read" and view != data:
                        corrupt.append(round(t0 - start, 2))
        finally:
            view.release()
            buf.close()
            os.close(fd)
        return ProbeResult(ops, time.monotonic() - start, longest, longest_at,
                           tuple(errors), tuple(corrupt))


# ------------------------------------------------------------------------------------------
# scripts (benchmarks) that need the VM


def kernel_has_target() -> bool:
    """True where LIO, TCMU and tcm_loop are loaded (the VM), so the disks can be made here."""
    return (CONFIGFS_TARGET.is_dir() and Path("/sys/module/target_core_user").is_dir()
            and Path("/sys/module/tcm_loop").is_dir())


def rerun_in_vm(script: Path, argv: Sequence[str]) -> int:
    """Run ``script argv`` again inside the project's VM (``deploy/vm/run``) with the
    checkout's virtualenv interpreter; the exit status of the script (or of the harness)."""
    repo = Path(__file__).resolve().parents[2]
    venv = repo / ".venv" / "bin" / "python"
    python = venv if venv.exists() else Path(sys.executable)
    command = [str(repo / "deploy" / "vm" / "run"), "--", str(python), str(script), *argv]
    return subprocess.run(command, cwd=repo, check=False).returncode
