"""``hba.kernel.ensure_dbroot``: rtslib-fb's database root on a host that has none, and the
kernel's dbroot pointed at it (configfs stood in for by a directory with a plain file)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from hba import kernel


@pytest.fixture
def configfs(tmp_path: Path) -> Path:
    root = tmp_path / "config"
    (root / "target").mkdir(parents=True)
    (root / "target" / "dbroot").write_text("/var/target\n")  # the kernel's default
    return root


@pytest.fixture
def strict_umask() -> Iterator[None]:
    old = os.umask(0o077)
    yield
    os.umask(old)


def test_creates_the_directory_755_and_points_the_kernel_at_it(
        tmp_path: Path, configfs: Path, strict_umask: None) -> None:
    dbroot = tmp_path / "etc-target"
    kernel.ensure_dbroot(dbroot, configfs)
    assert stat.S_IMODE(dbroot.stat().st_mode) == 0o755  # whatever the umask
    assert (configfs / "target" / "dbroot").read_text() == f"{dbroot}\n"


def test_leaves_an_existing_directory_and_a_matching_kernel_alone(
        tmp_path: Path, configfs: Path) -> None:
    dbroot = tmp_path / "etc-target"
    dbroot.mkdir(mode=0o700)
    (configfs / "target" / "dbroot").write_text(f"{dbroot}\n")
    os.utime(configfs / "target" / "dbroot", (1, 1))
    kernel.ensure_dbroot(dbroot, configfs)
    assert stat.S_IMODE(dbroot.stat().st_mode) == 0o700
    assert (configfs / "target" / "dbroot").stat().st_mtime == 1  # not written


def test_a_kernel_that_refuses_the_change_is_left_as_it_is(
        tmp_path: Path, configfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Backstores exist: the kernel answers EINVAL ("db_root: cannot be changed because it's in
    # use") and keeps its own.
    def refuse(self: Path, text: str) -> int:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), str(self))

    monkeypatch.setattr(Path, "write_text", refuse)
    kernel.ensure_dbroot(tmp_path / "etc-target", configfs)
    assert (tmp_path / "etc-target").is_dir()
    assert (configfs / "target" / "dbroot").read_text() == "/var/target\n"


def test_a_file_in_the_way_is_named(tmp_path: Path, configfs: Path) -> None:
    (tmp_path / "etc-target").write_text("")
    with pytest.raises(kernel.RegistrationError, match="exists but is not a directory"):
        kernel.ensure_dbroot(tmp_path / "etc-target", configfs)


def test_a_directory_that_cannot_be_created_is_named(tmp_path: Path, configfs: Path) -> None:
    with pytest.raises(kernel.RegistrationError,
                       match=r"cannot create .*: No such file or directory; create it with"):
        kernel.ensure_dbroot(tmp_path / "missing" / "etc-target", configfs)
