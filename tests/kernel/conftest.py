"""Kernel tier: tests that need real configfs/LIO/TCMU/open-iscsi, run inside the VM.

Run them with ``deploy/vm/tier`` (each module in a VM boot of its own, as ``./run test`` does),
or one module or test with ``deploy/vm/run -- .venv/bin/pytest tests/kernel/test_x.py -k y``.
Outside the VM every test here fails (it does not skip: a green run that tested nothing would
hide a broken CI).

The VM boots like a stock host: no /etc/target when the host has none (see test_fresh_host.py).
The tests' own rtslib-fb calls (LIO targets, the TCMU helpers) need it as the daemon does, so a
session fixture creates it the daemon's way (:func:`hba.kernel.ensure_dbroot`).

Fixtures:

- ``lio_target(size=64 MiB, *, chap=None, backstore="ramdisk", port=None, lun=0, iqn=None,
  initiators=None) -> LioTarget``: factory; everything it made is removed at teardown and the
  teardown fails if anything is left in configfs.
- ``lio``: the :class:`helpers.Lio` behind ``lio_target`` (for ``remove`` in the middle of a test).
- ``iscsid`` (session): open-iscsi's iscsid, stopped (after logging out everything) at the end.
- ``iscsiadm``: an :class:`helpers.Iscsiadm` whose node records and sessions are cleaned up.
- ``tgtd``: a private :class:`tests.support.tgtd.Tgtd` (own control port, portal on a free
  127.0.0.1 port); ``tgtd.add_target(size, chap=...)`` returns a ``TgtdTarget``.
- ``results_dir``: a per-test directory in the host-visible results share (``HBA_VM_RESULTS``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hba import kernel
from tests.kernel import helpers
from tests.support.tgtd import Tgtd

KERNEL_DIR = Path(__file__).resolve().parent
# Each kernel test's own time limit, unless it sets one: everything runs under TCG here, and the
# tier must pass on a machine 2-4 times slower than a quiet one (a test that takes 3 minutes
# there must not be cut off). deploy/vm/tier's idle limit (HBA_VM_IDLE_TIMEOUT) is longer still,
# so pytest names a stuck test before the VM is stopped.
KERNEL_TEST_TIMEOUT = 900


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees every collected item of the session, not only this directory's.
    for item in items:
        if KERNEL_DIR in item.path.resolve().parents:
            item.add_marker(pytest.mark.kernel)
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(KERNEL_TEST_TIMEOUT))


@pytest.fixture(autouse=True, scope="session")
def _require_vm() -> None:
    if not helpers.in_vm():
        pytest.fail(
            "kernel tests need the VM (configfs, LIO, TCMU, open-iscsi's kernel side): run "
            f"`{helpers.VM_HINT}` from the checkout",
            pytrace=False,
        )


@pytest.fixture(autouse=True, scope="session")
def _lio_dbroot(_require_vm: None) -> None:
    kernel.ensure_dbroot()


@pytest.fixture
def results_dir(request: pytest.FixtureRequest) -> Path:
    """A directory that survives the VM: ``$HBA_VM_RESULTS/kernel/<test name>``."""
    base = Path(os.environ.get("HBA_VM_RESULTS", "/tmp/hba-vm-results"))
    path = base / "kernel" / re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def lio(tmp_path: Path) -> Iterator[helpers.Lio]:
    manager = helpers.Lio(tmp_path)
    yield manager
    manager.remove_all()


@pytest.fixture
def lio_target(lio: helpers.Lio) -> Callable[..., helpers.LioTarget]:
    """Factory: ``lio_target(size=..., chap=None|Chap, backstore="ramdisk"|"fileio", ...)``."""

    def make(size: int = 64 << 20, **kwargs: Any) -> helpers.LioTarget:
        return lio.create(size, **kwargs)

    return make


@pytest.fixture(scope="session")
def iscsid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[helpers.Iscsid]:
    daemon = helpers.Iscsid(tmp_path_factory.mktemp("iscsid") / "iscsid.log")
    daemon.start()
    yield daemon
    daemon.stop()


@pytest.fixture
def iscsiadm(iscsid: helpers.Iscsid) -> Iterator[helpers.Iscsiadm]:
    cli = helpers.Iscsiadm()
    yield cli
    cli.cleanup()


@pytest.fixture
def tgtd(tmp_path: Path) -> Iterator[Tgtd]:
    with Tgtd.start(tmp_path / "tgtd") as daemon:
        yield daemon
