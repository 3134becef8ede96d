"""A private tgtd: the Linux SCSI target framework's userspace target on a loopback portal.

``./run demo`` serves its LUN from one (:mod:`hba.demo`), and the integration tests, the kernel
tests and the benchmarks build their targets on one (``tests/support/tgtd.py``): this module is
the one home for starting, probing and stopping it.

Theory of operation
-------------------
- *Management channel.* ``tgtd -C N`` serves ``tgtadm -C N`` on ``/var/run/tgtd/socket.N`` and
  holds a POSIX lock on ``socket.N.lock`` while it runs. tgtd accepts N in 0..32767 only
  ("-C argument value ... out of range" otherwise). A private tgtd takes a random N whose lock
  nobody holds, probed with ``lockf`` as tgtd itself takes it: the files a killed tgtd left
  behind do not make N look busy, and the packaged service (N = 0) is never met.
- *Races.* Another process may take N, or the portal's port, between the probe and tgtd's own
  bind; tgtd then exits ("another tgtd is using ...") or runs without a portal, and
  :meth:`TgtdProcess.launch` starts again with new numbers, a bounded number of times.
- *Ready* means both: ``tgtadm --op show --mode system`` answers on the channel, and the
  portal accepts TCP connections (tgtd keeps running when it cannot bind a fixed portal port).
- *Stopping.* tgtd ignores SIGTERM; it exits when asked over its channel
  (``--op delete --mode system``), else it is killed after a bound.
- *Errors* name what failed and carry the tail of tgtd's log in the message itself: the log may
  be a file the user cannot open (inside the demo's VM).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from hba.errors import HBAError

IPC_DIR = Path("/var/run/tgtd")
# tgtd -C takes 0..32767; 0 is the packaged service's, and below 1000 is left to it and tgt-admin.
MIN_CONTROL_PORT = 1000
MAX_CONTROL_PORT = 32767
LOG_TAIL_LINES = 20


class TgtdError(HBAError):
    """tgtd would not start, or a tgtadm command failed (the message names which and why)."""


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on at the moment (the kernel's choice for an ephemeral bind)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def control_port_free(n: int, ipc_dir: Path = IPC_DIR) -> bool:
    """True when no running tgtd holds management channel ``n`` (its lock file's POSIX lock)."""
    try:
        fd = os.open(ipc_dir / f"socket.{n}.lock", os.O_WRONLY)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1)
    except OSError:
        return False
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN, 1)
        return True
    finally:
        os.close(fd)


def free_control_port(ipc_dir: Path = IPC_DIR) -> int:
    """A random management channel number in tgtd's range that no running tgtd holds."""
    for _ in range(100):
        n = random.randrange(MIN_CONTROL_PORT, MAX_CONTROL_PORT + 1)
        if control_port_free(n, ipc_dir):
            return n
    raise TgtdError(f"no free tgtd control port under {ipc_dir} after 100 tries")


class TgtdProcess:
    """One tgtd process with its own management channel and portal.

    ``port`` fixes the portal's port (e.g. to bring a target back where initiators expect
    it); by default a free one is picked at each launch. The log (``workdir/tgtd.log``) is
    appended to across launches.
    """

    def __init__(self, workdir: Path, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.workdir = workdir
        self.host = host
        self.fixed_port = port
        self.port = 0
        self.control_port = 0
        self.log_path = workdir / "tgtd.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> TgtdProcess:
        self.launch()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def portal(self) -> str:
        """``host:port`` as it goes into an iSCSI URL or tgtd's ``portal=`` (IPv6 bracketed)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def launch(self, attempts: int = 5, timeout: float = 60.0) -> None:
        """Start tgtd and wait until it is ready; retry with new numbers; raise TgtdError."""
        missing = [tool for tool in ("tgtd", "tgtadm") if shutil.which(tool) is None]
        if missing:
            raise TgtdError(f"{' and '.join(missing)} not found (Debian package tgt): "
                            "run deploy/setup")
        if self.running:
            raise TgtdError(f"tgtd is already running (control port {self.control_port})")
        self.workdir.mkdir(parents=True, exist_ok=True)
        IPC_DIR.mkdir(parents=True, exist_ok=True)
        why = ""
        for attempt in range(1, attempts + 1):
            self.port = self.fixed_port or free_tcp_port(self.host)
            self.control_port = free_control_port()
            with self.log_path.open("ab") as log:
                log.write(f"--- launch {attempt}: tgtd -C {self.control_port} "
                          f"portal={self.portal}\n".encode())
                log.flush()
                self._proc = subprocess.Popen(
                    ["tgtd", "-f", "-C", str(self.control_port),
                     "--iscsi", f"portal={self.portal}"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
            why = self._wait_ready(timeout)
            if not why:
                return
            self._terminate()
        raise TgtdError(f"tgtd did not start after {attempts} attempts (last: {why}); the end "
                        f"of its log ({self.log_path}):\n{self.log_tail()}")

    def _wait_ready(self, timeout: float) -> str:
        """'' once ready; else why not."""
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is None or self._proc.poll() is not None:
                status = None if self._proc is None else self._proc.returncode
                return f"tgtd exited with status {status}"
            probe = subprocess.run(
                ["tgtadm", "-C", str(self.control_port), "--op", "show", "--mode", "system"],
                capture_output=True, check=False, timeout=max(1.0, timeout))
            if probe.returncode == 0 and self._portal_listening():
                return ""
            if time.monotonic() > deadline:
                what = "its portal" if probe.returncode == 0 else "tgtadm"
                return f"{what} did not answer within {timeout:.0f} s"
            time.sleep(0.1)

    def _portal_listening(self) -> bool:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            return sock.connect_ex((self.host, self.port)) == 0

    def tgtadm(self, *args: str, lld: bool = True) -> str:
        """``tgtadm -C <control port> [--lld iscsi] ARGS``; raise TgtdError on failure."""
        argv = ["tgtadm", "-C", str(self.control_port), *(["--lld", "iscsi"] if lld else []),
                *args]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
        if proc.returncode != 0:
            message = (proc.stderr or proc.stdout).strip()
            if not self.running:
                message += f"; tgtd is not running, the end of its log:\n{self.log_tail()}"
            raise TgtdError(f"`{' '.join(argv)}` failed ({proc.returncode}): {message}")
        return proc.stdout

    def stop(self) -> None:
        """Ask tgtd to exit (killed after 10 s) and remove its channel's files."""
        self._terminate()
        self._remove_ipc_files()

    def kill(self) -> None:
        """End tgtd with SIGKILL, as a crash would: connections are reset, nothing logged out."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        self._remove_ipc_files()

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(
                ["tgtadm", "-C", str(self.control_port), "--op", "delete", "--mode", "system"],
                capture_output=True, check=False, timeout=10)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _remove_ipc_files(self) -> None:
        if self.control_port and control_port_free(self.control_port):
            for path in IPC_DIR.glob(f"socket.{self.control_port}*"):
                path.unlink(missing_ok=True)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of tgtd's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc.strerror})"
        return "\n".join(text.rstrip("\n").splitlines()[-lines:]) or "(empty log)"
