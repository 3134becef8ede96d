"""``hbactl discover --luns`` against tgtd: every target's LUNs (tgt's controller at LUN 0,
its disk from LUN 1, with the capacity), and a target that wants CHAP says why on its own
line without hiding the others."""

from __future__ import annotations

import json

from tests.integration.helpers import assert_ok, hbactl, text
from tests.support.targets import Chap
from tests.support.tgtd import FIRST_DATA_LUN, Tgtd


def test_hbactl_discover_luns_lists_the_controller_and_the_disk(private_tgtd: Tgtd) -> None:
    target = private_tgtd.add_target(8 << 20, label="luns")
    url = f"iscsi://127.0.0.1:{private_tgtd.port}"
    proc = hbactl("discover", "--luns", "--json", url)
    result = json.loads(assert_ok(proc))
    (entry,) = result["targets"]
    assert entry["name"] == target.iqn and entry["error"] is None
    luns = {lun["lun"]: lun for lun in entry["luns"]}
    assert sorted(luns) == [0, FIRST_DATA_LUN]
    assert luns[0]["device_type"] == "storage_array_controller"
    assert luns[0]["size_bytes"] is None
    disk = luns[FIRST_DATA_LUN]
    assert disk["device_type"] == "disk" and disk["error"] is None
    assert disk["size_bytes"] == 8 << 20 and disk["block_size"] == 512
    assert result["exit_status"] == 0

    lines = assert_ok(hbactl("discover", "--luns", url)).splitlines()
    assert lines[0] == f"127.0.0.1:{private_tgtd.port},1 {target.iqn}"
    assert lines[1].startswith("  LUN 0: storage array controller, ")
    assert lines[2].startswith(f"  LUN {FIRST_DATA_LUN}: disk, ")
    assert lines[2].endswith(", 16384 blocks of 512 bytes (8.0 MiB)")


def test_a_target_that_wants_chap_does_not_hide_the_others(private_tgtd: Tgtd) -> None:
    locked = private_tgtd.add_target(8 << 20, label="locked",
                                     chap=Chap.one_way(userid="luns-user"))
    open_ = private_tgtd.add_target(8 << 20, label="open")
    proc = hbactl("discover", "--luns", f"iscsi://127.0.0.1:{private_tgtd.port}")
    out, err = text(proc)
    assert proc.returncode == 1, err
    assert "Traceback" not in out + err
    lines = out.splitlines()
    at = lines.index(f"127.0.0.1:{private_tgtd.port},1 {locked.iqn}")
    assert lines[at + 1].startswith("  error: ") and "authentication" in lines[at + 1].lower()
    at = lines.index(f"127.0.0.1:{private_tgtd.port},1 {open_.iqn}")
    assert lines[at + 1].startswith("  LUN 0: storage array controller")
    assert lines[at + 2].startswith(f"  LUN {FIRST_DATA_LUN}: disk, ")
