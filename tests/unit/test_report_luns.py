"""``hbactl discover --luns`` against the fake target: every target's LUNs, with type, vendor,
product and capacity; a target or LUN that fails says why in its entry and the exit status is
1; a REPORT LUNS that lies about its length is asked again a bounded number of times, never
for more than every single-level LUN, and never trusted beyond the bytes sent.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest

from hba import cli, oneshot
from initiator import pdu as P
from initiator.keys import NegotiationSettings
from tests.support.fake_target import FakeTarget, FakeTargetServer, Hostility, RamDisk, TargetNode
from tests.unit.test_oneshot_bounds import target_in_a_thread

INI = "iqn.2024-01.org.example:initiator"
DISK1 = "iqn.2003-01.org.example:disk1"
DISK2 = "iqn.2003-01.org.example:disk2"
INQUIRY = 0x12
REPORT_LUNS = 0xA0


def controller() -> RamDisk:
    """What tgt puts at LUN 0: a storage array controller, no blocks to read."""
    return RamDisk(blocks=1, peripheral_type=0x0C, vendor="IET", product="Controller")


def fake(nodes: list[TargetNode] | None = None, **kw: Any) -> FakeTarget:
    settings = NegotiationSettings.rfc_defaults(default_time2wait=0)
    nodes = nodes or [TargetNode(DISK1, {0: controller(), 1: RamDisk(blocks=4096),
                                         2: RamDisk(blocks=8, block_size=4096)})]
    return FakeTarget(nodes, settings=settings, **kw)


async def listing(target: FakeTarget, replacement_timeout: float | None = None
                  ) -> dict[str, Any]:
    options = oneshot.Options(initiator_name=INI, logout_timeout=1.0,
                              replacement_timeout=replacement_timeout)
    async with FakeTargetServer(target) as server:
        return await asyncio.wait_for(oneshot.cmd_discover(
            f"iscsi://127.0.0.1:{server.port}", options, luns=True), 20)


async def test_every_lun_with_its_type_and_capacity() -> None:
    target = fake()
    result = await listing(target)
    assert result["exit_status"] == 0
    (entry,) = result["targets"]
    assert entry["name"] == DISK1 and entry["error"] is None
    luns = {lun["lun"]: lun for lun in entry["luns"]}
    assert sorted(luns) == [0, 1, 2]
    assert luns[0]["device_type"] == "storage_array_controller"
    assert luns[0]["vendor"] == "IET" and luns[0]["product"] == "Controller"
    assert luns[0]["size_bytes"] is None  # no READ CAPACITY for a controller
    assert (luns[1]["blocks"], luns[1]["block_size"], luns[1]["size_bytes"]) == \
        (4096, 512, 4096 * 512)
    assert luns[2]["size_bytes"] == 8 * 4096
    assert all(lun["error"] is None for lun in luns.values())
    assert target.report_luns_allocations == [oneshot.REPORT_LUNS_INITIAL]
    assert not target.violations()


async def test_without_luns_discover_logs_in_to_no_target() -> None:
    target = fake()
    async with FakeTargetServer(target) as server:
        result = await oneshot.cmd_discover(f"iscsi://127.0.0.1:{server.port}",
                                            oneshot.Options(initiator_name=INI))
    assert "luns" not in result["targets"][0] and "exit_status" not in result
    assert [r.session_type for r in target.logins] == ["Discovery"]


async def test_a_refused_target_says_why_and_the_others_are_listed() -> None:
    target = fake([TargetNode(DISK1, {0: RamDisk()}, refuse_login=(2, 2)),
                   TargetNode(DISK2, {0: RamDisk(), 5: RamDisk()})])
    result = await listing(target)
    assert result["exit_status"] == 1
    refused, listed = result["targets"]
    assert refused["luns"] == [] and "authoriz" in refused["error"].lower(), refused["error"]
    assert listed["error"] is None and [lun["lun"] for lun in listed["luns"]] == [0, 5]


async def test_a_listed_name_that_is_no_iscsi_name_is_that_targets_error() -> None:
    # The name comes from the target's answer: it is no mistake of the user's command line
    # (a ConfigurationError, exit status 2, ended the whole listing), only of that entry.
    bad = "iqn.2003-01.org.example:bad\x1b[2Jname"
    target = fake([TargetNode(bad, {0: RamDisk(blocks=8)}), TargetNode(DISK1, {0: controller()})])
    result = await listing(target)
    assert result["exit_status"] == 1
    first, second = result["targets"]
    assert first["name"] == bad and first["luns"] == []
    assert "the portal listed a name that cannot be logged in to" in first["error"]
    assert second["error"] is None and [lun["lun"] for lun in second["luns"]] == [0]
    assert len(target.connections) == 2  # the discovery session and DISK1's: none for `bad`


async def test_a_lun_whose_inquiry_fails_says_why_and_the_next_is_listed() -> None:
    # The first INQUIRY (LUN 0's) ends in ILLEGAL REQUEST, INVALID FIELD IN CDB: not retried.
    hostile = Hostility(fail_first=1, fail_opcodes=frozenset({INQUIRY}),
                        fail_sense=(0x5, 0x24, 0x00))
    result = await listing(fake(hostile=hostile))
    assert result["exit_status"] == 1
    (entry,) = result["targets"]
    first, *rest = entry["luns"]
    assert first["lun"] == 0 and "INQUIRY" in first["error"] and first["device_type"] is None
    assert [lun["lun"] for lun in rest] == [1, 2]
    assert all(lun["error"] is None for lun in rest)
    assert entry["error"] is None


async def test_a_session_lost_midway_ends_that_targets_listing_with_why() -> None:
    # REPORT LUNS and LUN 0's INQUIRY are answered, then the connection drops; with no time
    # to replace it, the session fails, and the listing says how far it got.
    hostile = Hostility(drop_after_commands=3)
    result = await listing(fake(hostile=hostile), replacement_timeout=0)
    (entry,) = result["targets"]
    assert [lun["lun"] for lun in entry["luns"]] == [0]
    assert entry["error"].startswith("stopped after 1 LUN(s): "), entry["error"]
    assert result["exit_status"] == 1


async def test_a_lun_that_does_not_answer_ends_the_listing_at_its_deadline() -> None:
    # LUN 1's INQUIRY is never answered: after its command timeout the listing stops, so
    # that a target listing thousands of such LUNs does not take that timeout for each.
    def swallow_lun1_inquiry(conn: Any, pdu: P.PDU) -> bool:
        return isinstance(pdu, P.ScsiCommand) and pdu.cdb[0] == INQUIRY and \
            P.lun_from_wire(pdu.lun) == 1

    options = oneshot.Options(initiator_name=INI, logout_timeout=1.0, command_timeout=0.3,
                              tmf_timeout=0.3)
    target = fake(hostile=Hostility(pdu_hook=swallow_lun1_inquiry))
    async with FakeTargetServer(target) as server:
        result = await asyncio.wait_for(oneshot.cmd_discover(
            f"iscsi://127.0.0.1:{server.port}", options, luns=True), 20)
    (entry,) = result["targets"]
    assert [lun["lun"] for lun in entry["luns"]] == [0]
    assert re.match(r"stopped after 1 LUN\(s\): .*command timeout of 0.3 s", entry["error"]), \
        entry["error"]
    asked = [P.lun_from_wire(p.lun) for c in target.connections for p in c.received
             if isinstance(p, P.ScsiCommand) and p.cdb[0] == INQUIRY]
    assert 2 not in asked and result["exit_status"] == 1


async def test_a_long_list_is_asked_again_with_the_length_it_needs() -> None:
    disks = {n: RamDisk(blocks=1) for n in range(600)}  # 4808 bytes: more than 4096
    target = fake([TargetNode(DISK1, disks)])
    result = await listing(target)
    assert result["exit_status"] == 0, result["targets"][0]["error"]
    assert [lun["lun"] for lun in result["targets"][0]["luns"]] == list(range(600))
    assert target.report_luns_allocations == [oneshot.REPORT_LUNS_INITIAL, 8 + 600 * 8]


@pytest.mark.parametrize(("claim", "expected"), [
    # Says 100 LUNs, sends 3 however much room it is given: asked once more, then believed
    # for what it sent only.
    (800, r"LUN list is 800 bytes \(100 LUNs\) but sent 3 LUNs"),
    # Says 4 GiB: never asked for more than every single-level LUN.
    (0xFFFFFFF8, r"more than the 524288 bytes of every LUN"),
])
async def test_a_lying_list_length_is_bounded(claim: int, expected: str) -> None:
    target = fake(hostile=Hostility(report_luns_length=claim))
    result = await listing(target)
    assert result["exit_status"] == 1
    (entry,) = result["targets"]
    assert [lun["lun"] for lun in entry["luns"]] == [0, 1, 2]  # what it did send
    assert re.search(expected, entry["error"]), entry["error"]
    assert max(target.report_luns_allocations) <= oneshot.REPORT_LUNS_MAX
    assert len(target.report_luns_allocations) <= oneshot.REPORT_LUNS_ATTEMPTS


async def test_a_list_that_keeps_growing_is_not_chased_forever() -> None:
    # Every answer fills the allocation and says 8 more LUNs exist than fit.
    disks = {n: RamDisk(blocks=1) for n in range(1200)}
    target = fake([TargetNode(DISK1, disks)])

    def grow(conn: Any, pdu: Any) -> bool:
        if getattr(pdu, "cdb", b"\x00")[0] == REPORT_LUNS:
            alloc = int.from_bytes(pdu.cdb[6:10], "big")
            target.hostile.report_luns_length = alloc - 8 + 64
        return False

    target.hostile.pdu_hook = grow
    result = await listing(target)
    (entry,) = result["targets"]
    assert len(target.report_luns_allocations) == oneshot.REPORT_LUNS_ATTEMPTS
    assert "but sent" in entry["error"] and result["exit_status"] == 1


async def test_an_odd_list_length_is_the_targets_error() -> None:
    result = await listing(fake(hostile=Hostility(report_luns_length=13)))
    (entry,) = result["targets"]
    assert entry["luns"] == [] and "not a multiple of 8" in entry["error"]
    assert result["exit_status"] == 1


async def test_a_report_shorter_than_its_header_is_the_targets_error() -> None:
    hostile = Hostility(data_in_opcodes=frozenset({REPORT_LUNS}), data_in_withheld=4090)
    result = await listing(fake(hostile=hostile))
    (entry,) = result["targets"]
    assert entry["luns"] == [] and "REPORT LUNS" in entry["error"], entry["error"]
    assert result["exit_status"] == 1


async def test_a_lun_listed_twice_is_asked_once_and_a_deep_one_is_named() -> None:
    hostile = Hostility(report_luns_extra=(P.lun_to_wire(1), 0x0001_0002_0000_0000))
    target = fake(hostile=hostile)
    result = await listing(target)
    (entry,) = result["targets"]
    assert [lun["lun"] for lun in entry["luns"]] == [0, 1, 2, 0x0002_0001]
    deep = entry["luns"][-1]
    assert "more than one addressing level" in deep["error"] and deep["device_type"] is None
    assert result["exit_status"] == 1
    inquiries = [p for c in target.connections for p in c.received
                 if isinstance(p, P.ScsiCommand) and p.cdb[0] == INQUIRY]
    assert len(inquiries) == 3  # LUNs 0, 1, 2, once each


def test_hbactl_prints_each_lun_and_the_failures_escaped(
        capsys: pytest.CaptureFixture[str]) -> None:
    target = fake([TargetNode(DISK1, {0: controller(), 1: RamDisk(vendor="EV\x1b[2J")}),
                   TargetNode(DISK2, {0: RamDisk()}, refuse_login=(2, 2))])
    with target_in_a_thread(target) as port:
        status = cli.main(["discover", "--luns", "--initiator-name", INI,
                           f"iscsi://127.0.0.1:{port}"])
    out = capsys.readouterr().out
    assert status == 1
    lines = out.splitlines()
    assert lines[0] == f"127.0.0.1:{port},1 {DISK1}"
    assert lines[1] == "  LUN 0: storage array controller, IET Controller"
    assert lines[2] == "  LUN 1: disk, EV\\x1b[2J RAMDISK, 2048 blocks of 512 bytes (1.0 MiB)"
    assert lines[3] == f"127.0.0.1:{port},1 {DISK2}"
    assert lines[4].startswith("  error: ") and "authoriz" in lines[4].lower(), out
    assert len(lines) == 5
    assert "\x1b" not in out


def test_hbactl_discover_luns_json(capsys: pytest.CaptureFixture[str]) -> None:
    with target_in_a_thread(fake()) as port:
        status = cli.main(["discover", "--luns", "--json", "--initiator-name", INI,
                           f"iscsi://127.0.0.1:{port}"])
    assert status == 0
    result = json.loads(capsys.readouterr().out)
    assert [lun["lun"] for lun in result["targets"][0]["luns"]] == [0, 1, 2]


def test_discover_help_names_luns(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["discover", "--help"])
    assert "--luns" in capsys.readouterr().out


async def test_each_target_session_is_captured_in_a_file_of_its_own(tmp_path: Path) -> None:
    target = fake([TargetNode(DISK1, {0: RamDisk()}), TargetNode(DISK2, {0: RamDisk()})])
    pcap = tmp_path / "x.pcap"
    async with FakeTargetServer(target) as server:
        result = await oneshot.cmd_discover(
            f"iscsi://127.0.0.1:{server.port}",
            oneshot.Options(initiator_name=INI, pcap=str(pcap)), luns=True)
    assert result["exit_status"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        ["x.pcap", "x.target1.pcap", "x.target2.pcap"]
    assert all(p.stat().st_size > 24 for p in tmp_path.iterdir())  # more than the header
