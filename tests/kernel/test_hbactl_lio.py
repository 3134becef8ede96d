"""Issue 3's remaining check: an LIO target made with rtslib-fb inside the VM is reachable by the
project's own initiator, ``hbactl`` (the venv's console script, run as a subprocess): INQUIRY,
READ CAPACITY, and a WRITE/READ round trip whose data is also checked in the target's backing
file, without CHAP and with mutual CHAP plus CRC32C digests from the URL; one-way CHAP with the
credentials in the environment; a wrong secret is refused with a message and status 1.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.kernel import helpers
from tests.kernel.tcmu import HBACTL
from tests.support.targets import Chap

LioFactory = Callable[..., helpers.LioTarget]

SIZE = 16 << 20
LBA = 1000
BLOCK = 512


def hbactl(*args: str, env: dict[str, str] | None = None,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([os.fspath(HBACTL), *args], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, **(env or {})), check=False)
    if check and proc.returncode != 0:
        raise helpers.CommandError([os.fspath(HBACTL), *args], proc)
    return proc


def hbactl_json(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(hbactl(*args, "--json", env=env).stdout)
    return result


def url_and_env(target: helpers.LioTarget, how: str) -> tuple[str, dict[str, str]]:
    """The URL hbactl gets, and the environment carrying what the URL leaves out."""
    if how == "env":
        assert target.chap is not None
        return target.url(credentials=False), {"ISCSI_HBA_CHAP_NAME": target.chap.userid,
                                               "ISCSI_HBA_CHAP_SECRET": target.chap.password}
    url = target.url()
    if how == "url+digests":
        url += ("&" if "?" in url else "?") + "header_digest=crc32c&data_digest=crc32c"
    return url, {}


CASES: dict[str, tuple[Callable[[], Chap | None], str]] = {
    "no-chap": (lambda: None, "url"),
    "mutual-chap-and-digests": (Chap.two_way, "url+digests"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hbactl_round_trip_with_lio(lio_target: LioFactory, tmp_path: Path, case: str) -> None:
    make_chap, how = CASES[case]
    target = lio_target(SIZE, chap=make_chap(), backstore="fileio")
    url, env = url_and_env(target, how)

    ident = hbactl_json("inquiry", url, env=env)
    assert (ident["vendor"], ident["product"]) == ("LIO-ORG", "FILEIO")
    serial = next(helpers.CONFIGFS_TARGET.glob(f"core/fileio_*/{target.storage_name}/wwn/"
                                               "vpd_unit_serial")).read_text()
    assert ident["unit_serial"] == serial.split(":", 1)[1].strip()
    assert ident["naa"] is not None and ident["naa"].startswith("naa.6001405")

    cap = hbactl_json("readcap", url, env=env)
    assert (cap["block_size"], cap["size_bytes"]) == (BLOCK, SIZE)

    data = os.urandom(256 * 1024)
    (tmp_path / "in").write_bytes(data)
    hbactl("write", url, "--lba", str(LBA), "-i", str(tmp_path / "in"), env=env)
    hbactl("read", url, "--lba", str(LBA), "--blocks", str(len(data) // BLOCK),
           "-o", str(tmp_path / "out"), env=env)
    assert (tmp_path / "out").read_bytes() == data
    # The second path: LIO's fileio backstore wrote through to its backing file.
    assert target.backing_file is not None
    with target.backing_file.open("rb") as f:
        f.seek(LBA * BLOCK)
        assert f.read(len(data)) == data


def test_hbactl_chap_from_the_environment(lio_target: LioFactory) -> None:
    """One-way CHAP with the URL carrying no credentials: ISCSI_HBA_CHAP_NAME/SECRET."""
    target = lio_target(SIZE, chap=Chap.one_way())
    url, env = url_and_env(target, "env")
    assert "@" not in url
    assert hbactl_json("inquiry", url, env=env)["vendor"] == "LIO-ORG"


def test_hbactl_wrong_chap_secret_is_refused(lio_target: LioFactory) -> None:
    target = lio_target(SIZE, chap=Chap.one_way())
    assert target.chap is not None
    wrong = target.url().replace(target.chap.password, "0123456789abcdef")
    proc = hbactl("inquiry", wrong, check=False)
    assert proc.returncode == 1, proc
    assert "Traceback" not in proc.stderr
    assert "authentication" in proc.stderr.lower() or "chap" in proc.stderr.lower(), proc.stderr
    assert "0123456789abcdef" not in proc.stderr  # secrets never reach a message
