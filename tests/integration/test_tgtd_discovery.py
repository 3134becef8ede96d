"""SendTargets discovery and the errors a person meets before any login succeeds: nothing
listening, an unknown target, a malformed URL — through the library and through ``hbactl``."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from initiator.discovery import discover
from initiator.errors import ConnectionFailed
from initiator.login import Portal, TargetNotFoundError
from initiator.transport import Session
from tests.integration.helpers import (
    assert_ok,
    assert_one_line_error,
    hbactl,
    portal_of,
    session_config,
)
from tests.support.targets import free_tcp_port
from tests.support.tgtd import Tgtd, TgtdTarget


@pytest.fixture
def three_targets(make_target: Callable[..., TgtdTarget]) -> list[TgtdTarget]:
    return [make_target(8 << 20) for _ in range(3)]


async def test_discovery_lists_every_target_with_its_portal(
        tgtd: Tgtd, three_targets: list[TgtdTarget]) -> None:
    found = await discover(Portal("127.0.0.1", tgtd.port), session_config())
    by_name = {t.name: t for t in found}
    for target in three_targets:
        assert target.iqn in by_name, f"{target.iqn} missing from {sorted(by_name)}"
        portals = by_name[target.iqn].portals
        assert [(p.host, p.port, p.tpgt) for p in portals] == [("127.0.0.1", tgtd.port, 1)]


def test_hbactl_discover_text_and_json(tgtd: Tgtd, three_targets: list[TgtdTarget]) -> None:
    url = f"iscsi://127.0.0.1:{tgtd.port}"
    lines = assert_ok(hbactl("discover", url)).splitlines()
    for target in three_targets:
        assert f"127.0.0.1:{tgtd.port},1 {target.iqn}" in lines

    proc = hbactl("discover", url, "--json")
    result = json.loads(assert_ok(proc))
    assert proc.stderr == b""
    assert result["portal"] == f"127.0.0.1:{tgtd.port}"
    listed = {t["name"]: t["portals"] for t in result["targets"]}
    for target in three_targets:
        assert listed[target.iqn] == [{"address": f"127.0.0.1:{tgtd.port}",
                                       "host": "127.0.0.1", "port": tgtd.port, "tpgt": 1}]


async def test_nothing_listening(tgtd_requirements: None) -> None:
    port = free_tcp_port()
    with pytest.raises(ConnectionFailed, match=f"127.0.0.1:{port}.*refused"):
        await discover(Portal("127.0.0.1", port), session_config())
    for args in (["discover", f"iscsi://127.0.0.1:{port}"],
                 ["inquiry", f"iscsi://127.0.0.1:{port}/iqn.2003-01.org.example:none/1"]):
        assert_one_line_error(hbactl(*args), 1, mentions=[f"127.0.0.1:{port}", "refused",
                                                           "check"])


async def test_unknown_target(tgtd: Tgtd, target: TgtdTarget) -> None:
    # (A tgtd with no target at all closes the connection instead of answering "not found".)
    iqn = "iqn.2003-01.org.example:no-such-target"
    session = Session(Portal("127.0.0.1", tgtd.port), iqn, session_config())
    with pytest.raises(TargetNotFoundError, match=iqn):
        await session.login()
    line = assert_one_line_error(hbactl("readcap", f"iscsi://127.0.0.1:{tgtd.port}/{iqn}/1"), 1,
                                 mentions=[iqn, "not found"])
    assert "0x0203" in line


@pytest.mark.parametrize(("args", "mentions"), [
    (["inquiry", "iscsi://127.0.0.1:notaport/iqn.2003-01.org.example:t/1"], ["port"]),
    (["inquiry", "http://127.0.0.1/iqn.2003-01.org.example:t/1"], ["iscsi://"]),
    (["inquiry", "iscsi://127.0.0.1/iqn.2003-01.org.example:t/70000"], ["LUN"]),
    (["inquiry", "iscsi://127.0.0.1/not-an-iqn/1"], ["not-an-iqn"]),
    (["readcap", "iscsi://127.0.0.1:3260"], ["no target"]),
    (["inquiry", "iscsi://127.0.0.1/iqn.2003-01.org.example:t/1?header_digest=md5"],
     ["header_digest"]),
], ids=["port", "scheme", "lun", "iqn", "portal-only", "digest"])
def test_malformed_url_is_exit_2(tgtd_requirements: None, args: list[str],
                                 mentions: list[str]) -> None:
    assert_one_line_error(hbactl(*args), 2, mentions=mentions)


def test_secret_in_a_malformed_url_is_not_shown(tgtd_requirements: None) -> None:
    secret = "Sup3rSecretValue"
    proc = hbactl("inquiry", f"iscsi://user%{secret}@127.0.0.1:notaport/iqn.2003-01.org.x:t/1")
    assert_one_line_error(proc, 2, secrets=[secret])


async def test_discovery_session_logs_out(tgtd: Tgtd, target: TgtdTarget) -> None:
    # discover() leaves no session behind in tgtd.
    await discover(portal_of(target), session_config())
    assert "I_T nexus:" not in tgtd.tgtadm("--op", "show", "--mode", "target")
