"""deploy/vm/run seen from the host: exit status, output streaming, environment, results share,
a current directory under the guest's own /tmp, time limits (overall and idle), and
deploy/vm/tier's per-module boots and summary. Each VM boot costs 15-60 s under TCG, so one
boot serves several tests."""

from __future__ import annotations

import os
import re
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
echo "marker=$(cat marker)"
echo "venv=$(test -x "$HBA_TEST_VENV_PYTHON" && echo visible)"
echo changed > marker
echo "in-vm=$HBA_VM"
echo "shell=$(readlink /proc/$$/exe)"
grep -q target_core_user /proc/modules && test -d /sys/kernel/config/target && echo modules-ok
echo from-the-vm > "$HBA_VM_RESULTS/probe.txt"
touch /work-is-writable-but-stays-in-the-vm
echo last-line
exit 7
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The probe's current directory: under the host's /tmp, which the guest hides under its
    own tmpfs (people clone into /tmp), and with a space in its name."""
    path = tmp_path_factory.mktemp("vm-cwd") / "a checkout"
    path.mkdir()
    (path / "marker").write_text("from-the-host\n")
    return path


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory, workdir: Path) -> Iterator[VmRun]:
    # The results directory is under the host's /tmp on purpose: the guest's /tmp is its own
    # tmpfs, so this also checks that the share is mounted over it at the same path.
    results = tmp_path_factory.mktemp("vm-results")
    run = vm_run(
        "sh", "-c", PROBE,
        options=("-e", "HBA_TEST_VALUE=hello world", "-e", "HBA_TEST_INHERITED"),
        env={"HBA_VM_RESULTS": str(results), "HBA_TEST_INHERITED": "from-host",
             "HBA_TEST_VENV_PYTHON": str(REPO / ".venv" / "bin" / "python")},
        cwd=workdir,
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


def test_environment_and_cwd(probe: VmRun, workdir: Path) -> None:
    assert "forwarded=hello world" in probe.out
    assert "inherited=from-host" in probe.out
    assert f"cwd={workdir}" in probe.out
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


def test_guest_writes_do_not_reach_the_host(probe: VmRun, workdir: Path) -> None:
    assert probe.returncode == 7
    assert not Path("/work-is-writable-but-stays-in-the-vm").exists()
    assert (workdir / "marker").read_text() == "from-the-host\n"


def test_current_directory_under_tmp_is_seen(probe: VmRun) -> None:
    """The guest binds the host's view of the directory over its own /tmp; the checkout (and
    its virtualenv) stays visible too, wherever it is."""
    assert "marker=from-the-host" in probe.out
    assert "venv=visible" in probe.out


def test_issue_check_command() -> None:
    """The acceptance check of the kernel test tier's issue."""
    run = vm_run(
        "sh", "-c", "grep -q target_core_user /proc/modules && test -d /sys/kernel/config/target"
    )
    assert run.returncode == 0, run.stderr


def test_time_limit_kills_the_command(tmp_path: Path) -> None:
    # Output all along: the overall limit, not the idle one, stops it.
    run = vm_run(
        "sh", "-c", "while sleep 1; do echo tick; done",
        env={"HBA_VM_TIMEOUT": "90", "HBA_VM_RESULTS": str(tmp_path)}, timeout=200,
    )
    assert run.returncode == 124, run.stderr
    assert "timeout: time limit" in run.stderr and "HBA_VM_TIMEOUT=90" in run.stderr
    assert run.elapsed < 120  # QEMU is killed at 90 s at the latest


def test_silent_command_is_stopped_as_a_hang(tmp_path: Path) -> None:
    run = vm_run(
        "sh", "-c", "echo started; sleep 600",
        env={"HBA_VM_IDLE_TIMEOUT": "20", "HBA_VM_RESULTS": str(tmp_path)}, timeout=400,
    )
    assert run.returncode == 124, run.stderr
    assert "hang: the command printed nothing for 20 s (HBA_VM_IDLE_TIMEOUT)" in run.stderr
    assert run.out == ["started"]
    # Stopped by the guest, which saved the kernel log on the way out.
    assert "last kernel messages" in run.stderr


def test_boot_timeout_is_a_harness_failure(tmp_path: Path) -> None:
    run = vm_run("true", env={"HBA_VM_BOOT_TIMEOUT": "1", "HBA_VM_RESULTS": str(tmp_path)})
    assert run.returncode == 125
    assert "boot timeout" in run.stderr


def test_usage_error_without_command() -> None:
    proc = subprocess.run([str(RUN)], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "no command" in proc.stderr


@pytest.mark.parametrize("cwd", ["/proc", "/tmp"])
def test_current_directory_the_vm_cannot_show_is_refused(cwd: str) -> None:
    run = vm_run("true", cwd=Path(cwd))
    assert run.returncode == 125
    assert f"{cwd} " in run.stderr and "run from" in run.stderr, run.stderr
    assert run.elapsed < 60  # refused before booting


def test_tier_runs_each_module_in_its_own_vm(tmp_path: Path) -> None:
    """deploy/vm/tier: one boot per module, a per-module line and a summary naming the module
    that failed and why; the exit status is the worst outcome."""
    passing = tmp_path / "test_vm_tier_passes.py"
    passing.write_text("import os\n\ndef test_in_vm():\n    assert os.environ['HBA_VM'] == '1'\n")
    failing = tmp_path / "test_vm_tier_fails.py"
    failing.write_text("def test_fails():\n    assert 1 == 2\n")
    proc = subprocess.run(
        [str(REPO / "deploy" / "vm" / "tier"), str(passing), str(failing)],
        env={**os.environ, "HBA_VM_RESULTS": str(tmp_path / "results")},
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900, check=False,
    )
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert "kernel tier 1/2" in out and "kernel tier 2/2" in out
    assert re.search(r"test_vm_tier_passes\.py: passed in .* \(VM boot .*\)", out), out
    summary = out[out.index("kernel tier: 2 modules"):]
    assert re.search(r"test_vm_tier_fails\.py +FAILED .*tests failed \(pytest exit status 1",
                     summary), summary
    assert re.search(r"test_vm_tier_passes\.py +passed", summary), summary
    assert summary.rstrip().endswith("modules: 1 passed, 1 failed"), summary
    # Each module's VM logs are kept apart.
    for module in ("test_vm_tier_passes", "test_vm_tier_fails"):
        assert (tmp_path / "results" / "vm" / module / "dmesg.txt").exists()
