"""The wheel built from the tree (``python -m build``) installs into a fresh virtualenv, away
from the checkout, and its ``hbactl`` runs: package data, entry point and dependencies are
declared, not borrowed from the checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def run(argv: list[str], cwd: Path, timeout: float = 600) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          check=False)
    assert proc.returncode == 0, f"`{' '.join(argv)}` exited {proc.returncode}:\n" \
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_wheel_installs_into_a_fresh_virtualenv(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(REPO)], cwd=tmp_path)
    (wheel,) = dist.glob("iscsi_hba-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for package in ("hba", "initiator", "tcmu_handler"):
        assert f"{package}/__init__.py" in names and f"{package}/py.typed" in names
    assert not [n for n in names if n.startswith(("tests/", "bench/", "deploy/"))]

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    run([str(venv / "bin" / "pip"), "install", "--quiet", str(wheel)], cwd=tmp_path)
    # From a directory without the checkout, so nothing can be imported from it.
    out = run([str(venv / "bin" / "hbactl"), "--help"], cwd=tmp_path)
    assert "usage: hbactl" in out and "daemon" in out
    where = run([str(venv / "bin" / "python"), "-c", "import hba.daemon; print(hba.__file__)"],
                cwd=tmp_path)
    assert where.startswith(str(venv)), where
