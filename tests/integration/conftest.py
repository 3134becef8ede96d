"""Integration tier: the initiator library and the ``hbactl`` command line against a real tgtd
(the Linux SCSI target framework daemon) on loopback.

Each tgtd is private: its own control channel and a portal on a free 127.0.0.1 port, started
and torn down here (see :mod:`tests.support.tgtd`). It needs tgtd/tgtadm (Debian package
``tgt``), tshark, and root (tgtd's control socket lives under /run/tgtd). Without them every
test of the tier FAILS with a message naming ``deploy/setup``: in CI a missing peer is a
failure, not a skip, since a green run that tested nothing would hide a broken setup.

Fixtures:

- ``tgtd`` (session): one tgtd shared by the tier, so that it starts once; tests add their
  own targets to it and never change it otherwise.
- ``make_target(size=64 MiB, *, chap=None, params=None, bstype="rdwr")``: a target of the
  shared tgtd, removed after the test. ``params`` are tgtd target parameters
  (``MaxBurstLength`` ...), set before anything logs in: tgtd negotiates from the values a
  target has when a login starts.
- ``target``: a plain 64 MiB target without CHAP.
- ``private_tgtd``: a tgtd of the test's own, for tests that kill and restart it.
- ``new_chap(mutual=False)``: CHAP credentials whose user names are unique in the shared tgtd
  (tgtd's accounts are global to the daemon).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from tests.integration.helpers import SETUP_HINT
from tests.support.targets import Chap
from tests.support.tgtd import Tgtd, TgtdTarget

INTEGRATION_DIR = Path(__file__).resolve().parent
REQUIRED_TOOLS = ("tgtd", "tgtadm", "tshark")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees every item of the session; mark only this tier's tgtd tests.
    for item in items:
        path = item.path.resolve()
        if path.parent == INTEGRATION_DIR and path.name.startswith("test_tgtd_"):
            item.add_marker(pytest.mark.integration)
            item.add_marker(pytest.mark.root)


@pytest.fixture(scope="session")
def tgtd_requirements() -> None:
    """Fail (never skip) when tgtd cannot run here."""
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"the integration tier needs {', '.join(missing)}, not installed here: "
                    f"{SETUP_HINT}", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("the integration tier needs root (tgtd's control socket is under "
                    f"/run/tgtd): run it as root, after deploy/setup ({SETUP_HINT})",
                    pytrace=False)


@pytest.fixture(scope="session")
def tgtd(tgtd_requirements: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tgtd]:
    with Tgtd.start(tmp_path_factory.mktemp("tgtd")) as daemon:
        yield daemon


@pytest.fixture
def make_target(tgtd: Tgtd) -> Iterator[Callable[..., TgtdTarget]]:
    made: list[TgtdTarget] = []

    def make(size: int = 64 << 20, *, chap: Chap | None = None,
             params: Mapping[str, str] | None = None, bstype: str = "rdwr") -> TgtdTarget:
        target = tgtd.add_target(size, chap=chap, bstype=bstype, label="it")
        made.append(target)
        for name, value in (params or {}).items():
            tgtd.set_target_param(target, name, value)
        return target

    yield make
    for target in made:
        tgtd.remove_target(target)


@pytest.fixture
def target(make_target: Callable[..., TgtdTarget]) -> TgtdTarget:
    return make_target()


@pytest.fixture
def private_tgtd(tgtd_requirements: None, tmp_path: Path) -> Iterator[Tgtd]:
    with Tgtd.start(tmp_path / "tgtd") as daemon:
        yield daemon


@pytest.fixture
def new_chap() -> Callable[..., Chap]:
    def make(mutual: bool = False) -> Chap:
        tag = secrets.token_hex(3)
        if mutual:
            return Chap.two_way(userid=f"ini-{tag}", mutual_userid=f"tgt-{tag}")
        return Chap.one_way(userid=f"ini-{tag}")

    return make
