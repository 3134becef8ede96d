"""deploy/vm/run seen from the host: exit status, output streaming, environment, results share,
time limits. Each VM boot costs 15-30 s under TCG, so one boot serves several tests."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "deploy" / "vm" / "run"


@dataclass
class VmRun:
    returncode: int
    stdout: list[tuple[float, str]]  # (seconds since start, line)
    stderr: str
    elapsed: float
    results: Path = field(default_factory=Path)

    @property
    def out(self) -> list[str]:
        return [line for _, line in self.stdout]


def vm_run(
    *command: str,
    options: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
    timeout: float = 600,
) -> VmRun:
    """Run deploy/vm/run, timestamping each stdout line as it arrives."""
    full_env = {**os.environ, "HBA_VM_TIMEOUT": "400", **(env or {})}
    start = time.monotonic()
    proc = subprocess.Popen(
        [str(RUN), *options, "--", *command],
        cwd=cwd, env=full_env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines: list[tuple[float, str]] = []
    err: list[str] = []
    stdout, stderr = proc.stdout, proc.stderr
    assert stdout is not None and stderr is not None
    stderr_reader = threading.Thread(target=lambda: err.append(stderr.read()))
    stderr_reader.start()
    for line in stdout:
        lines.append((time.monotonic() - start, line.rstrip("\n")))
    proc.wait(timeout=timeout)
    stderr_reader.join()
    return VmRun(proc.returncode, lines, "".join(err), time.monotonic() - start)


PROBE = r"""
echo first-line
echo to-stderr >&2
sleep 4
echo "forwarded=$HBA_TEST_VALUE"
echo "inherited=$HBA_TEST_INHERITED"
echo "cwd=$(pwd)"
echo "in-vm=$HBA_VM"
echo "shell=$(readlink /proc/$$/exe)"
grep -q target_core_user /proc/modules && test -d /sys/kernel/config/target && echo modules-ok
echo from-the-vm > "$HBA_VM_RESULTS/probe.txt"
touch /work-is-writable-but-stays-in-the-vm
echo last-line
exit 7
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmRun]:
    # The results directory is under the host's /tmp on purpose: the guest's /tmp is its own
    # tmpfs, so this also checks that the share is mounted over it at the same path.
    results = tmp_path_factory.mktemp("vm-results")
    run = vm_run(
        "sh", "-c", PROBE,
        options=("-e", "HBA_TEST_VALUE=hello world", "-e", "HBA_TEST_INHERITED"),
        env={"HBA_VM_RESULTS": str(results), "HBA_TEST_INHERITED": "from-host"},
        cwd=REPO / "tests",
    )
    run.results = results
    yield run


def test_exit_status_is_the_commands(probe: VmRun) -> None:
    assert probe.returncode == 7, probe.stderr


def test_stdout_and_stderr_are_separate(probe: VmRun) -> None:
    assert probe.out[0] == "first-line"
    assert probe.out[-1] == "last-line"
    assert "to-stderr" in probe.stderr
    assert "to-stderr" not in probe.out


def test_output_streams_while_the_command_runs(probe: VmRun) -> None:
    times = dict((line, t) for t, line in probe.stdout)
    # "first-line" must reach the host before the command's 4 s sleep is over.
    assert times["last-line"] - times["first-line"] >= 3.0


def test_environment_and_cwd(probe: VmRun) -> None:
    assert "forwarded=hello world" in probe.out
    assert "inherited=from-host" in probe.out
    assert f"cwd={REPO / 'tests'}" in probe.out
    assert "in-vm=1" in probe.out
    # The host's userland, not the initramfs's busybox.
    shell = next(line for line in probe.out if line.startswith("shell="))
    assert shell == f"shell={os.path.realpath('/bin/sh')}"


def test_target_modules_and_configfs(probe: VmRun) -> None:
    assert "modules-ok" in probe.out


def test_results_share_and_kernel_log(probe: VmRun) -> None:
    assert (probe.results / "probe.txt").read_text() == "from-the-vm\n"
    dmesg = probe.results / "vm" / "dmesg.txt"
    assert "Linux version" in dmesg.read_text()
    assert (probe.results / "vm" / "console.log").exists()
    # A failing command gets the tail of the kernel log on stderr.
    assert "last kernel messages" in probe.stderr


def test_guest_writes_do_not_reach_the_host(probe: VmRun) -> None:
    assert probe.returncode == 7
    assert not Path("/work-is-writable-but-stays-in-the-vm").exists()


def test_issue_check_command() -> None:
    """The acceptance check of the kernel test tier's issue."""
    run = vm_run(
        "sh", "-c", "grep -q target_core_user /proc/modules && test -d /sys/kernel/config/target"
    )
    assert run.returncode == 0, run.stderr


def test_time_limit_kills_the_command(tmp_path: Path) -> None:
    run = vm_run(
        "sleep", "600", env={"HBA_VM_TIMEOUT": "60", "HBA_VM_RESULTS": str(tmp_path)}, timeout=120
    )
    assert run.returncode == 124, run.stderr
    assert "timeout" in run.stderr
    assert run.elapsed < 90


def test_boot_timeout_is_a_harness_failure(tmp_path: Path) -> None:
    run = vm_run("true", env={"HBA_VM_BOOT_TIMEOUT": "1", "HBA_VM_RESULTS": str(tmp_path)})
    assert run.returncode == 125
    assert "boot timeout" in run.stderr


def test_usage_error_without_command() -> None:
    proc = subprocess.run([str(RUN)], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "no command" in proc.stderr


def test_current_directory_hidden_in_the_vm_is_refused(tmp_path: Path) -> None:
    run = vm_run("true", cwd=tmp_path)
    assert run.returncode == 125
    assert "not visible inside the VM" in run.stderr
