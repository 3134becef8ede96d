"""Observability in the VM: ``hbactl daemon --metrics`` serving a disk that fio drives.

Checks: a scrape of ``/metrics`` (parsed with prometheus_client's own text parser) before and
after fio shows the disk's command, byte and latency counters moving by what fio did;
``hbactl top`` in a pseudo-terminal shows the disk's line with non-zero IOPS while fio runs;
killing and restarting the target (tgtd) shows a lost connection and a reinstatement counted
for the session; the daemon's log has the session events.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kernel import helpers
from tests.kernel.helpers import wait_for
from tests.support.prometheus import families, value
from tests.support.targets import free_tcp_port
from tests.support.tgtd import Tgtd

pytestmark = pytest.mark.timeout(900)

CHECKOUT = Path(__file__).resolve().parents[2]
HBACTL = Path(sys.executable).parent / "hbactl"
MiB = 1 << 20


class MetricsDaemon:
    """``hbactl daemon --metrics 127.0.0.1:PORT`` as a subprocess, ready at ``READY=1``."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.port = free_tcp_port()
        self.config = config
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 240.0) -> None:
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        name = f"hba-obs-{os.getpid()}-{secrets.token_hex(4)}"
        notify.bind("\0" + name)
        try:
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    [HBACTL, "daemon", "--config", str(self.config), "--metrics",
                     f"127.0.0.1:{self.port}"], cwd=CHECKOUT, stdin=subprocess.DEVNULL,
                    stdout=log, stderr=log, env=dict(os.environ, NOTIFY_SOCKET="@" + name),
                    start_new_session=True)
            assert helpers.wait_for_ready(notify, self.proc, timeout), \
                f"no READY=1 within {timeout:.0f} s:\n{self.log()}"
        finally:
            notify.close()

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def scrape(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}/metrics"
        return families(urllib.request.urlopen(url, timeout=30).read().decode())


@pytest.fixture
def daemon(tgtd: Tgtd, tmp_path: Path, results_dir: Path) -> Iterator[MetricsDaemon]:
    """The daemon, started after (and stopped before) the ``tgtd`` its disk uses."""
    config = tmp_path / "iscsi-hba.conf"
    config.write_text("")
    config.chmod(0o600)
    (results_dir / "daemon.log").unlink(missing_ok=True)
    proc = MetricsDaemon(config, results_dir / "daemon.log")
    proc.start()
    try:
        yield proc
    finally:
        listed = json.loads(hbactl("list", "--json").stdout)["disks"]
        for disk in listed:
            hbactl("detach", "--force", disk["name"], check=False)
        status = proc.stop()
        assert status == 0, f"hbactl daemon exited with {status}:\n{proc.log()}"
    assert "Traceback" not in proc.log(), proc.log()


def hbactl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return helpers.run([HBACTL, *args], check=check, timeout=300)


def top_in_a_terminal(count: int, columns: int = 160, rows: int = 30) -> str:
    """``hbactl top --count N`` on a pseudo-terminal of the given size; what it drew."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    # The terminal's size, not the environment's (COLUMNS, LINES), decides the layout.
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen([HBACTL, "top", "--count", str(count)], stdin=slave,
                            stdout=slave, stderr=slave, close_fds=True, start_new_session=True,
                            env=env)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the terminal's last user is gone
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(30) == 0, out.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return out.decode(errors="replace")


def test_metrics_top_and_reinstatement(daemon: MetricsDaemon, tgtd: Tgtd, tmp_path: Path,
                                       results_dir: Path) -> None:
    target = tgtd.add_target(64 * MiB)
    node = hbactl("attach", target.url()).stdout.strip()
    (disk,) = json.loads(hbactl("list", "--json").stdout)["disks"]
    name = disk["name"]
    session = {"target": disk["target"], "portal": disk["portal"]}
    before = daemon.scrape()
    assert value(before, "iscsi_hba_disk_info", disk=name, device=node) == 1
    assert value(before, "iscsi_hba_session_state", state="logged in", **session) == 1
    reads0 = value(before, "iscsi_hba_disk_commands_total", disk=name, op="read")
    writes0 = value(before, "iscsi_hba_disk_commands_total", disk=name, op="write")

    # fio: 4 KiB random reads and writes, 8 MiB of each at most, for 20 s; top meanwhile.
    fio = subprocess.Popen(
        ["fio", "--name=obs", f"--filename={node}", "--ioengine=libaio", "--direct=1",
         "--rw=randrw", "--bs=4k", "--iodepth=8", "--size=32m", "--time_based",
         "--runtime=20", "--output-format=json"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)
        screen = top_in_a_terminal(count=3)
        (results_dir / "top-screen.txt").write_text(screen)
        during = daemon.scrape()
        out, err = fio.communicate(timeout=600)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    assert fio.returncode == 0, err
    job = json.loads(out[out.index("{"):])["jobs"][0]
    after = daemon.scrape()

    # top drew the disk's line with non-zero IOPS (escape codes stripped), cut to 160 columns.
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "\n", screen)
    lines = [line for line in plain.splitlines() if line.split()[:1] == [name]]
    assert lines, screen
    assert all(len(line) < 160 for line in plain.splitlines())
    iops = [float(line.split()[2]) for line in lines]
    assert max(iops) > 0, lines
    assert any(line.rstrip().endswith("logged in") for line in lines), lines

    # The counters moved by what fio did (and a little more: the kernel's own commands).
    reads = value(after, "iscsi_hba_disk_commands_total", disk=name, op="read") - reads0
    writes = value(after, "iscsi_hba_disk_commands_total", disk=name, op="write") - writes0
    assert reads >= job["read"]["total_ios"] and writes >= job["write"]["total_ios"]
    assert reads <= job["read"]["total_ios"] + 200 and writes <= job["write"]["total_ios"] + 200
    assert value(after, "iscsi_hba_disk_bytes_total", disk=name, direction="write") >= \
        job["write"]["io_bytes"]
    assert value(after, "iscsi_hba_disk_latency_seconds_count", disk=name, op="read") == \
        value(after, "iscsi_hba_disk_commands_total", disk=name, op="read")
    assert value(after, "iscsi_hba_disk_latency_seconds_sum", disk=name, op="read") > 0
    assert value(during, "iscsi_hba_disk_commands_total", disk=name, op="read") > reads0
    assert value(after, "iscsi_hba_disk_queue_depth", disk=name) == 0
    assert value(after, "iscsi_hba_disk_scsi_statuses_total", disk=name, status="good") >= \
        reads + writes
    assert value(after, "iscsi_hba_disks", state="attached") == 1

    # The target dies and comes back: a lost connection, a reinstatement.
    tgtd.kill()
    time.sleep(1.0)
    tgtd.restart()
    helpers.run(["dd", f"if={node}", "of=/dev/null", "bs=4k", "count=256", "iflag=direct",
                 "status=none"], timeout=300)
    families = wait_for(
        lambda: (f := daemon.scrape()) and value(
            f, "iscsi_hba_session_reinstatements_total", **session) >= 1 and f,
        180, "a reinstatement counted")
    assert value(families, "iscsi_hba_session_connection_losses_total", **session) >= 1
    assert value(families, "iscsi_hba_session_state", state="logged in", **session) == 1
    log = daemon.log()
    assert f"session {disk['target']} at {disk['portal']}: connection lost" in log, log
    assert f"session {disk['target']} at {disk['portal']}: reinstated" in log, log
    print(f"fio: {job['read']['total_ios']} reads, {job['write']['total_ios']} writes; top "
          f"showed {max(iops):.0f} IOPS")
