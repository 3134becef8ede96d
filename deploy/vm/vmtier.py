"""The kernel tier, one VM boot per test module: ``deploy/vm/tier [MODULE.py...] [PYTEST ARGS]``.

Theory of operation
-------------------
The kernel tier used to be one VM boot with one deadline for all of it: on a busy machine it
was killed after 69 of 72 tests had passed, and a hang anywhere cost every result after it.
Now each ``tests/kernel/test_*.py`` module runs in a VM of its own (``vmharness.run_in_vm``):

- a module's failure, hang or kernel trouble (a stuck configfs, a leaked disk, an unloaded
  module) stays in its VM; the next module starts from a fresh boot;
- each boot has its own limits — ``HBA_VM_TIMEOUT`` for the run (default 3600 s) and
  ``HBA_VM_IDLE_TIMEOUT`` for silence (default 1500 s, longer than any test's own pytest
  timeout) — so a machine several times slower makes the tier longer, not red: the limits
  catch hangs, not slowness;
- each module's boot and run times are printed as it ends, and again in a summary that names,
  for each module that did not pass, why.

The price is one boot per module: 30-60 s under TCG on a quiet machine.

What a module needs from the network is fetched on the host first, since the VM has none:
``test_install.py`` installs the package in the VM from an offline wheelhouse
(``deploy/install --make-wheelhouse .cache/wheelhouse``, kept until pyproject.toml changes),
named to it by ``HBA_WHEELHOUSE``.

Extra arguments go to every module's pytest; an argument that is an existing ``.py`` file
selects that module instead of all of them. A module whose tests the arguments deselect
entirely (pytest's exit status 5) is reported as such and is not a failure, unless no module
ran a test at all.

Exit status: 0 when every module passed; otherwise the most serious outcome of any module:
125 a VM could not be prepared or booted (the harness failed), 124 a module was stopped for
time (overall limit or hang), 1 tests failed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import vmharness
from vmharness import EXIT_HARNESS, EXIT_TIMEOUT, HarnessError, Outcome

REPO = vmharness.REPO
KERNEL_TESTS = REPO / "tests" / "kernel"
PYTEST_NO_TESTS = 5
# --durations: the tests that took over a minute, to see which come near their own time limit
# on a slow machine.
PYTEST_OPTIONS = ("-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
                  "--durations=10", "--durations-min=60")
WHEELHOUSE = REPO / ".cache" / "wheelhouse"
NEEDS_WHEELHOUSE = frozenset({"test_install.py"})


@dataclass(frozen=True)
class ModuleResult:
    module: Path
    outcome: Outcome
    seconds: float

    @property
    def verdict(self) -> str:
        status = self.outcome.status
        if status == 0:
            return "passed"
        if status == PYTEST_NO_TESTS:
            return "no tests"
        if status == EXIT_TIMEOUT:
            return "STOPPED"
        if status == EXIT_HARNESS:
            return "VM FAILED"
        return "FAILED"

    @property
    def why(self) -> str:
        status = self.outcome.status
        if self.outcome.reason:
            return self.outcome.reason
        if status == PYTEST_NO_TESTS:
            return "the arguments selected no test in it (pytest exit status 5)"
        if status == 1:
            return "tests failed (pytest exit status 1; see its output above)"
        return f"pytest exit status {status} (interrupted or an internal error; see above)"


def duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def say(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def split_arguments(args: Sequence[str]) -> tuple[list[Path], list[str]]:
    """(modules to run, pytest arguments): existing ``.py`` arguments select modules."""
    modules: list[Path] = []
    rest: list[str] = []
    for arg in args:
        if arg.endswith(".py") and Path(arg).is_file():
            modules.append(Path(arg).resolve())
        else:
            rest.append(arg)
    return modules or sorted(KERNEL_TESTS.glob("test_*.py")), rest


def prepare_wheelhouse() -> None:
    """The wheels ``test_install.py`` installs from in the VM (see the module doc)."""
    proc = subprocess.run([str(REPO / "deploy" / "install"), "--make-wheelhouse", str(WHEELHOUSE)],
                          stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0:
        raise HarnessError(f"cannot prepare the offline wheelhouse {WHEELHOUSE} for "
                           f"test_install.py (deploy/install --make-wheelhouse exited "
                           f"{proc.returncode}; see above)")
    os.environ["HBA_WHEELHOUSE"] = str(WHEELHOUSE)


def run_module(prep: vmharness.Prepared, module: Path, pytest_args: Sequence[str],
               index: int, total: int) -> ModuleResult:
    name = module.relative_to(REPO) if module.is_relative_to(REPO) else module
    say(f"kernel tier {index}/{total}: {name} (in a VM of its own)")
    pytest = REPO / ".venv" / "bin" / "pytest"
    command = [str(pytest), *PYTEST_OPTIONS, str(module), *pytest_args]
    opts = vmharness.run_options(prep, command)
    opts.logs_name = module.stem
    started = time.monotonic()
    try:
        outcome = vmharness.run_in_vm(prep, opts)
    except HarnessError as exc:
        outcome = Outcome(EXIT_HARNESS, str(exc))
    result = ModuleResult(module, outcome, time.monotonic() - started)
    vmharness.report(outcome)
    boot = outcome.boot_seconds
    booted = f" (VM boot {duration(boot)})" if boot is not None else ""
    line = f"{name}: {result.verdict} in {duration(result.seconds)}{booted}"
    say(line if outcome.status in (0, PYTEST_NO_TESTS) else f"{line}: {result.why}")
    return result


def summary(results: list[ModuleResult], seconds: float) -> int:
    say(f"kernel tier: {len(results)} modules, one VM boot each, in {duration(seconds)}")
    width = max(len(r.module.name) for r in results)
    for r in results:
        boot = r.outcome.boot_seconds
        line = (f"    {r.module.name:<{width}}  {r.verdict:<9}  {duration(r.seconds):>12}"
                f"  (boot {duration(boot) if boot is not None else '-':>6})")
        if r.outcome.status not in (0, PYTEST_NO_TESTS):
            line += f"  {r.why}"
        print(line, flush=True)
    statuses = [r.outcome.status for r in results]
    passed = sum(s == 0 for s in statuses)
    failed = sum(s not in (0, PYTEST_NO_TESTS) for s in statuses)
    # A closing line CI reads as a test runner's ("N passed, N failed"), counting modules.
    print(f"modules: {passed} passed, {failed} failed", flush=True)
    if all(s == PYTEST_NO_TESTS for s in statuses):
        print("    no module ran a test: check the arguments", flush=True)
        return 1
    for status in (EXIT_HARNESS, EXIT_TIMEOUT):
        if status in statuses:
            return status
    return 0 if all(s in (0, PYTEST_NO_TESTS) for s in statuses) else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    modules, pytest_args = split_arguments(args)
    if not modules:
        vmharness.log(f"no test modules in {KERNEL_TESTS}")
        return EXIT_HARNESS
    if not (REPO / ".venv" / "bin" / "pytest").exists():
        vmharness.log(f"{REPO / '.venv/bin/pytest'} is missing: run deploy/setup")
        return EXIT_HARNESS
    try:
        prep = vmharness.prepare(vmharness.cache_dir())
        if any(m.name in NEEDS_WHEELHOUSE for m in modules):
            prepare_wheelhouse()
    except HarnessError as exc:
        vmharness.log(str(exc))
        return EXIT_HARNESS
    os.chdir(REPO)
    vmharness.handle_stop_signals()
    started = time.monotonic()
    results = []
    try:
        for i, module in enumerate(modules, 1):
            results.append(run_module(prep, module, pytest_args, i, len(modules)))
    except KeyboardInterrupt:
        vmharness.log("interrupted; the VM was stopped")
        return 130
    except vmharness.Interrupted as exc:
        vmharness.log(f"stopped by signal {exc.signum}; the VM was stopped")
        return 128 + exc.signum
    return summary(results, time.monotonic() - started)
