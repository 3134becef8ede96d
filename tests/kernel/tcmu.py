"""Kernel-test support for the TCMU path: a ``user:iscsi`` backstore served by
``python -m tcmu_handler.serve`` (a subprocess, so tests can kill and restart it) and exported
through tcm_loop as a real ``/dev/sdX``.

Order of creation matters (``docs/tcmu-ring.md`` §7): the backstore first (its uio
device appears), then the handler (serving before anything reaches the ring), then the
tcm_loop target and LUN (linking sends INQUIRY and READ CAPACITY synchronously). Teardown is
the reverse: the tcm_loop target goes while the handler still serves (the LUN's removal sends
SYNCHRONIZE CACHE when the write cache is on), then the backstore, whose uio device vanishing
makes the handler exit by itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyudev

from tests.kernel import helpers

CHECKOUT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
HBACTL = VENV_BIN / "hbactl"
CORE = helpers.CONFIGFS_TARGET / "core"
LOOPBACK = helpers.CONFIGFS_TARGET / "loopback"


def hbactl(*args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    """Run the project's ``hbactl`` (the venv's console script); raise on failure."""
    return helpers.run([HBACTL, *args], timeout=timeout)


def hbactl_json(*args: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(hbactl(*args, "--json").stdout)
    return result


# ------------------------------------------------------------------------------------------
# the handler process


class Handler:
    """``python -m tcmu_handler.serve`` as a subprocess, with its log in a file.

    Readiness comes through systemd's protocol: the handler sends ``READY=1`` to the abstract
    datagram socket named by ``NOTIFY_SOCKET``.
    """

    def __init__(self, url: str, device: str, log_path: Path, *args: str,
                 env: dict[str, str] | None = None) -> None:
        self.url = url
        self.device = device
        self.log_path = log_path
        self.args = args
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, *extra: str, wait_ready: bool = True, timeout: float = 120.0) -> None:
        """Start the handler; by default wait until it serves the ring."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("the handler is already running")
        self.starts += 1
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        name = f"hba-test-notify-{os.getpid()}-{secrets.token_hex(4)}"
        notify.bind("\0" + name)
        env = dict(os.environ, NOTIFY_SOCKET="@" + name, HBA_LOG="info", **self.env)
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts} at {time.strftime('%H:%M:%S')}: "
                      f"{' '.join(extra)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tcmu_handler.serve", "--device", self.device,
                 *self.args, *extra, self.url],
                cwd=CHECKOUT, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                start_new_session=True,
            )
        try:
            if wait_ready:
                self._wait_ready(notify, timeout)
        finally:
            notify.close()

    def _wait_ready(self, notify: socket.socket, timeout: float) -> None:
        assert self.proc is not None
        try:
            if helpers.wait_for_ready(notify, self.proc, timeout):
                return
        except helpers.ProcessExited as exc:
            raise AssertionError(f"the handler exited with status {exc.status} before "
                                 f"serving:\n{self.log_tail()}") from None
        self.kill()
        raise AssertionError(f"the handler did not get ready within {timeout:.0f} s:\n"
                             f"{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 60.0) -> int:
        """Wait for the handler to exit on its own; its exit status."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the handler did not exit within {timeout:.0f} s:\n"
                                 f"{self.log_tail()}") from None

    def kill(self) -> None:
        """SIGKILL (also resumes a stopped handler so it can die); wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.wait(30)

    def stats(self, timeout: float = 30.0) -> dict[str, int]:
        """The dispatcher's counters: SIGUSR1 makes the handler log them as one line."""
        before = self.log().count(": stats ")
        self.signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while len(lines := [line for line in self.log().splitlines() if ": stats " in line]) \
                <= before:
            if time.monotonic() > deadline:
                raise AssertionError(f"no stats line from the handler:\n{self.log_tail()}")
            time.sleep(0.1)
        fields = lines[-1].split(": stats ", 1)[1].split()
        return {key: int(value) for key, value in (f.split("=", 1) for f in fields)}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_of_last_start(self) -> str:
        return self.log().rsplit("--- start ", 1)[-1]

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


# ------------------------------------------------------------------------------------------
# the TCMU backstore + tcm_loop disk


def _naa() -> str:
    return "naa.5001405" + os.urandom(5).hex()[:9]


def create_backstore(name: str, size: int, *, cmd_time_out: int = 60,
                     hw_max_sectors: int | None = 2048, control: str = "") -> int:
    """A ``user:iscsi`` backstore (no LUN yet); returns its HBA index (``user_<N>``)."""
    import rtslib_fb as rts

    # The cfgstring names the backstore only: rtslib refuses ':' (every IQN has one), and the
    # uio name is world-readable, so it must not carry the URL's secrets anyway.
    so = rts.UserBackedStorageObject(
        name, config=f"iscsi/{name}", size=size, hw_max_sectors=hw_max_sectors,
        control=",".join(filter(None, ("nl_reply_supported=-1", control))))
    try:
        # Both must be set before the LUN is exported (cmd_time_out refuses changes then).
        for attrib, value in (("cmd_time_out", cmd_time_out), ("tmr_notification", 1)):
            if (Path(so.path) / "attrib" / attrib).exists():
                so.set_attribute(attrib, str(value))
    except BaseException:
        so.delete()
        raise
    return int(Path(so.path).parent.name.removeprefix("user_"))


def delete_backstore(name: str) -> None:
    import rtslib_fb as rts

    with contextlib.suppress(rts.RTSLibNotInCFSError):
        rts.UserBackedStorageObject(name).delete()


@dataclass
class TcmuDisk:
    """A ``user:iscsi`` backstore served by a :class:`Handler`, exported through tcm_loop."""

    name: str
    size: int
    remote_url: str
    handler: Handler
    loop_wwn: str | None = None
    disk: pyudev.Device | None = None
    hba_index: int | None = None

    @property
    def node(self) -> str:
        assert self.disk is not None and self.disk.device_node is not None
        return str(self.disk.device_node)

    @property
    def sys_block(self) -> Path:
        return Path("/sys/block") / Path(self.node).name

    @property
    def configfs_dir(self) -> Path:
        return CORE / f"user_{self.hba_index}" / self.name

    @classmethod
    def create(cls, remote_url: str, log_path: Path, *, name: str | None = None,
               cmd_time_out: int = 60, hw_max_sectors: int | None = 2048,
               control: str = "", handler_args: tuple[str, ...] = ()) -> TcmuDisk:
        """Backstore (sized like the remote LUN) -> handler -> tcm_loop LUN -> ``/dev/sdX``.

        ``control`` adds options for the backstore's ``control`` file (``cmd_ring_size_mb=1``).
        """
        name = name or f"hba_tcmu_{secrets.token_hex(3)}"
        size = int(hbactl_json("readcap", remote_url)["size_bytes"])
        handler = Handler(remote_url, name, log_path, *handler_args)
        disk = cls(name, size, remote_url, handler)
        disk.hba_index = create_backstore(name, size, cmd_time_out=cmd_time_out,
                                          hw_max_sectors=hw_max_sectors, control=control)
        try:
            handler.start()
            disk.export()
        except BaseException:
            disk.destroy()
            raise
        return disk

    def export(self) -> None:
        """tcm_loop target + TPG + LUN 0 -> wait for the disk (udev-processed)."""
        import rtslib_fb as rts

        so = rts.UserBackedStorageObject(self.name)
        self.loop_wwn = _naa()
        target = rts.Target(rts.FabricModule("loopback"), self.loop_wwn, mode="create")
        tpg = rts.TPG(target, 1, mode="create")
        if not tpg.nexus:
            tpg.nexus = _naa()
        address = (LOOPBACK / self.loop_wwn / "tpgt_1" / "address").read_text().split(":")
        host, target_id = int(address[0]), int(address[2])
        rts.LUN(tpg, 0, so)  # INQUIRY, READ CAPACITY... reach the handler now

        def match(device: pyudev.Device) -> bool:
            addr = helpers.scsi_address(device)
            return addr is not None and (addr[0], addr[2], addr[3]) == (host, target_id, 0)

        self.disk = helpers.wait_for_block_device(match, 120, what=f"the disk of {self.name}")

    def unexport(self) -> None:
        """Delete the tcm_loop target (its LUN's removal goes through the handler)."""
        import rtslib_fb as rts

        if self.loop_wwn is None:
            return
        # Let udev finish its probes first: reads racing the removal fail ("device offline").
        helpers.run(["udevadm", "settle"], check=False)
        node = self.disk.device_node if self.disk is not None else None
        with contextlib.suppress(rts.RTSLibNotInCFSError):
            rts.Target(rts.FabricModule("loopback"), self.loop_wwn, mode="lookup").delete()
        self.loop_wwn = None
        if node:
            helpers.wait_until_gone(node, 60)

    def delete_backstore(self) -> None:
        delete_backstore(self.name)

    def destroy(self) -> None:
        """Best-effort removal of everything, whatever state the test left (fixture teardown)."""
        errors: list[str] = []
        if self.handler.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.handler.pid, signal.SIGCONT)
        elif self.loop_wwn is not None and self.handler.proc is not None:
            # Unlinking the LUN needs a handler (SYNCHRONIZE CACHE), or it waits cmd_time_out.
            try:
                self.handler.start("--takeover", timeout=60)
            except AssertionError as exc:
                errors.append(f"restarting the handler for the teardown: {exc}")
        for step in (self.unexport, self.delete_backstore):
            try:
                step()
            except Exception as exc:
                errors.append(f"{step.__name__}: {exc}")
        if self.handler.running:
            try:
                self.handler.wait(30)
            except AssertionError as exc:
                errors.append(str(exc))
                self.handler.kill()
        left = self.leftovers()
        if errors or left:
            raise AssertionError(f"TCMU disk {self.name} not fully removed: {errors}; "
                                 f"left in configfs: {left}")

    def leftovers(self) -> list[str]:
        """What of this disk is still in configfs."""
        left = [str(p) for p in CORE.glob(f"user_*/{self.name}")]
        if self.hba_index is not None and (CORE / f"user_{self.hba_index}").exists():
            left.append(str(CORE / f"user_{self.hba_index}"))
        if self.loop_wwn is not None and (LOOPBACK / self.loop_wwn).exists():
            left.append(str(LOOPBACK / self.loop_wwn))
        return left


def remote_num_cmds(storage_name: str) -> int | None:
    """Commands LIO's statistics counted on a backstore (None if the kernel has no such file)."""
    for path in CORE.glob(f"*/{storage_name}/statistics/scsi_lu/num_cmds"):
        return int(path.read_text().split()[0])
    return None


def sha256_of(path: str | os.PathLike[str], size: int, block: int = 1 << 20,
              direct: bool = True) -> str:
    """SHA-256 of the first ``size`` bytes of a file or disk (O_DIRECT reads of a disk)."""
    argv = ["dd", f"if={os.fspath(path)}", f"bs={block}", f"count={size // block}",
            "status=none"]
    if direct:
        argv.append("iflag=direct")
    dd = subprocess.Popen(argv, stdout=subprocess.PIPE)
    out = subprocess.run(["sha256sum"], stdin=dd.stdout, capture_output=True, text=True,
                         check=True, timeout=600)
    assert dd.stdout is not None
    dd.stdout.close()
    if dd.wait(600) != 0:
        raise AssertionError(f"{' '.join(argv)} failed with status {dd.returncode}")
    return out.stdout.split()[0]
