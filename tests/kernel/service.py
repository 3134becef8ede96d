"""``hbactl daemon`` started the way systemd starts ``deploy/iscsi-hba.service``, and a quick
check that a disk it serves keeps data (:func:`round_trip`).

:func:`exec_start` reads the unit's ``ExecStart=`` command line; :class:`ServiceProcess` runs a
command line as systemd runs a ``Type=notify`` system service without ``User=``: working
directory ``/``, stdin ``/dev/null``, an environment holding only systemd's default ``PATH`` and
``NOTIFY_SOCKET`` (nothing of the caller's: no virtualenv, no ``PYTHONPATH``, no ``HOME``),
ready at ``READY=1``, stopped with SIGTERM (``KillMode=mixed``).
"""

from __future__ import annotations

import configparser
import os
import secrets
import shlex
import signal
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.kernel import helpers

# The PATH systemd (Debian 12's) gives system services: what ExecStart= and its children see.
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def unit_settings(unit: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    parser.read_string(unit.read_text())
    return parser


def exec_start(unit: Path) -> list[str]:
    """The unit's ``ExecStart=`` as argv (no prefixes like ``-`` or ``@`` are used there)."""
    line = unit_settings(unit).get("Service", "ExecStart")
    argv = shlex.split(line)
    assert argv and argv[0].startswith("/"), f"ExecStart= of {unit} is not absolute: {line}"
    return argv


class ServiceProcess:
    """A command line run as systemd runs a ``Type=notify`` service; see the module doc.

    ``inherit_environment`` runs it with the caller's environment and ``cwd`` instead (plus
    ``NOTIFY_SOCKET``): :class:`tests.kernel.hba_daemon.DaemonProcess` starts the checkout's
    daemon that way. ``label`` names it in failures (default: the command line)."""

    def __init__(self, argv: Sequence[str], log_path: Path, *, cwd: Path | str = "/",
                 inherit_environment: bool = False, label: str | None = None,
                 stop_timeout: float = 60.0) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.cwd = cwd
        self.inherit_environment = inherit_environment
        self.label = label or f"`{shlex.join(self.argv)}`"
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 240.0) -> None:
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        name = f"hba-service-test-{os.getpid()}-{secrets.token_hex(4)}"
        notify.bind("\0" + name)
        base = dict(os.environ) if self.inherit_environment else {"PATH": SYSTEMD_PATH}
        env = {**base, "NOTIFY_SOCKET": "@" + name}
        try:
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    self.argv, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=log, start_new_session=True)
            try:
                if helpers.wait_for_ready(notify, self.proc, timeout):
                    return
            except helpers.ProcessExited as exc:
                raise AssertionError(f"{self.label} exited with {exc.status} before "
                                     f"READY=1:\n{self.log()}") from None
            self.kill()
            raise AssertionError(f"{self.label} sent no READY=1 within {timeout:.0f} s:\n"
                                 f"{self.log()}")
        finally:
            notify.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float | None = None) -> int:
        """SIGTERM, as ``systemctl stop`` sends it (TimeoutStopSec=60 by default); the exit
        status."""
        assert self.proc is not None
        timeout = self.stop_timeout if timeout is None else timeout
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"{self.label} ignored SIGTERM for {timeout:.0f} s:\n"
                                     f"{self.log()}") from None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def round_trip(node: str, workdir: Path, size: int = 1 << 20) -> None:
    """Write ``size`` random bytes to the start of disk ``node`` and read them back, both with
    O_DIRECT, so the data crosses the ring and the target both ways."""
    data = os.urandom(size)
    (workdir / "round-trip").write_bytes(data)
    helpers.run(["dd", f"if={workdir / 'round-trip'}", f"of={node}", "bs=64k", "oflag=direct",
                 "status=none"])
    back = subprocess.run(["dd", f"if={node}", "bs=64k", f"count={size // 65536}",
                           "iflag=direct", "status=none"], capture_output=True, check=True,
                          timeout=120).stdout
    assert back == data, f"{node}: read back differs from what was written"
