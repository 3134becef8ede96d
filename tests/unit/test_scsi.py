"""initiator.scsi as a package: every public name of its modules is re-exported, as itself.

The parts are tested in test_scsi_cdb.py, test_scsi_data.py, test_scsi_sense.py,
test_scsi_asc.py and test_scsi_status.py.
"""

from __future__ import annotations

import types

import pytest

from initiator import scsi
from initiator.scsi import asc, cdb, data, sense, status

MODULES = (cdb, asc, data, sense, status)
# Shared by the builders of the package, not SCSI vocabulary: deliberately not re-exported.
INTERNAL = frozenset({"U16", "U32", "U64", "check_range"})


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_every_public_name_is_re_exported_as_the_same_object(module: types.ModuleType) -> None:
    names = set(module.__all__) - INTERNAL
    assert names <= set(scsi.__all__)
    for name in names:
        assert getattr(scsi, name) is getattr(module, name), name


def test_the_package_exports_only_what_its_modules_define() -> None:
    homes = {name: m for m in MODULES for name in m.__all__}
    assert len(homes) == sum(len(m.__all__) for m in MODULES)  # each name has one home
    assert set(scsi.__all__) == set(homes) - INTERNAL
    assert len(scsi.__all__) == len(set(scsi.__all__))


def test_the_per_command_builders_are_not_wrapped() -> None:
    # hbactl perf and the block-device client call these once per command: the package must
    # hand out the functions themselves, not a layer around them.
    assert scsi.read is cdb.read and scsi.write is cdb.write
    assert scsi.read.__module__ == "initiator.scsi.cdb"
