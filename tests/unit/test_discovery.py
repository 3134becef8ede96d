"""SendTargets discovery (RFC 7143 §4.3, §13.3, Appendix C): the parser, and discover() over TCP
against the fake target (several targets, several portals, IPv6, text continuation, CHAP)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from initiator import pdu as P
from initiator.chap import ChapAccount, ChapCredentials, Secret
from initiator.discovery import DiscoveredTarget, discover, parse_send_targets
from initiator.errors import ISCSIError, PDUFormatError, RemoteProtocolError
from initiator.keys import NegotiationSettings
from initiator.login import LoginAuthenticationError, LoginError, Portal
from initiator.text import decode
from initiator.transport import SessionConfig
from tests.support.fake_target import FakeTarget, FakeTargetServer, Hostility, TargetNode

ASKED = Portal("192.0.2.1", 3260)
INI = "iqn.2024-01.org.example:initiator"


def config(**kw: Any) -> SessionConfig:
    base: dict[str, Any] = dict(initiator_name=INI, login_timeout=2.0, noop_interval=0.0,
                                negotiation={"DefaultTime2Wait": "0"})
    base.update(kw)
    return SessionConfig(**base)


@asynccontextmanager
async def serve(target: FakeTarget) -> AsyncIterator[FakeTargetServer]:
    server = FakeTargetServer(target)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def run(target: FakeTarget, **kw: Any) -> tuple[list[DiscoveredTarget], FakeTargetServer]:
    async with serve(target) as server:
        what = kw.pop("what", "All")
        found = await asyncio.wait_for(discover(server.portal, config(**kw), what=what), 10)
        return found, server


# --------------------------------------------------------------------------------------------
# The parser


def test_parse_several_targets_and_portals() -> None:
    pairs = [
        ("TargetName", "iqn.a:one"),
        ("TargetAddress", "10.0.0.1:3260,1"),
        ("TargetAddress", "[2001:db8::1]:3261,2"),
        ("TargetAlias", "first"),
        ("TargetName", "iqn.a:two"),
        ("TargetAddress", "[fe80::1%eth0]"),
        ("TargetAddress", "san.example.com,7"),
        ("TargetName", "iqn.a:three"),
    ]
    assert parse_send_targets(pairs, ASKED) == [
        DiscoveredTarget("iqn.a:one", (Portal("10.0.0.1", 3260, 1),
                                       Portal("2001:db8::1", 3261, 2))),
        DiscoveredTarget("iqn.a:two", (Portal("fe80::1%eth0", 3260),
                                       Portal("san.example.com", 3260, 7))),
        DiscoveredTarget("iqn.a:three", (ASKED,)),
    ]


def test_a_name_listed_twice_is_one_target_with_its_portals_merged() -> None:
    # Else discover printed it twice and discover --luns logged in to it twice.
    pairs = [
        ("TargetName", "iqn.a:one"), ("TargetAddress", "10.0.0.1:3260,1"),
        ("TargetName", "iqn.a:two"),
        ("TargetName", "iqn.a:one"), ("TargetAddress", "10.0.0.2:3260,1"),
        ("TargetAddress", "10.0.0.1:3260,1"),
        ("TargetName", "iqn.a:two"),
    ]
    assert parse_send_targets(pairs, ASKED) == [
        DiscoveredTarget("iqn.a:one", (Portal("10.0.0.1", 3260, 1), Portal("10.0.0.2", 3260, 1))),
        DiscoveredTarget("iqn.a:two", (ASKED,)),
    ]


def test_parse_nothing() -> None:
    assert parse_send_targets([], ASKED) == []


def test_address_before_any_name_is_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="before any TargetName"):
        parse_send_targets([("TargetAddress", "10.0.0.1")], ASKED)


@pytest.mark.parametrize("address", ["[2001:db8::1", "10.0.0.1:99999", "10.0.0.1:x,1",
                                     "[::1]:3260,tag", ":3260",
                                     # int() took these, and showed another port than sent
                                     "10.0.0.1:+3260", "10.0.0.1: 3260,1", "10.0.0.1:3_260",
                                     "10.0.0.1:\u0663\u0662\u0666\u0660", "10.0.0.1:3260,+1"])
def test_unusable_address_is_skipped_naming_the_target(address: str) -> None:
    """As iscsiadm: the address is skipped with why, the rest of the answer kept (it failed the
    whole discovery). A target left without a usable address gets no portal, not the one
    asked (which stands for "no address listed")."""
    pairs = [("TargetName", "iqn.a:one"), ("TargetAddress", address),
             ("TargetAddress", "10.0.0.1:3260,1"), ("TargetName", "iqn.a:two"),
             ("TargetAddress", address), ("TargetName", "iqn.a:three")]
    one, two, three = parse_send_targets(pairs, ASKED)
    assert one.portals == (Portal("10.0.0.1", 3260, 1),) and len(one.unusable) == 1
    assert one.unusable[0][0] == address
    why = one.unusable[0][1]
    assert why.startswith(f"portal {ASKED} listed an unusable TargetAddress for 'iqn.a:one', "
                          "skipped: portal ")
    assert two.portals == () and two.unusable == ((address, why.replace(":one", ":two")),)
    assert three == DiscoveredTarget("iqn.a:three", (ASKED,))


# --------------------------------------------------------------------------------------------
# discover() against the fake target


NODES = [
    TargetNode("iqn.2003-01.org.example:alpha",
               addresses=("10.1.1.1:3260,1", "[2001:db8::10]:3260,2")),
    TargetNode("iqn.2003-01.org.example:beta", addresses=("[fe80::2]:3262,3",)),
    TargetNode("iqn.2003-01.org.example:gamma"),                       # the portal itself
    TargetNode("iqn.2003-01.org.example:delta", announce_portal=False),  # no address at all
]


async def test_discover_lists_every_target_and_portal() -> None:
    target = FakeTarget(NODES, settings=NegotiationSettings.rfc_defaults(default_time2wait=0))
    found, server = await run(target)
    assert [t.name for t in found] == [n.name for n in NODES]
    assert found[0].portals == (Portal("10.1.1.1", 3260, 1), Portal("2001:db8::10", 3260, 2))
    assert found[1].portals == (Portal("fe80::2", 3262, 3),)
    assert found[2].portals == (Portal("127.0.0.1", server.port, 1),)
    assert found[3].portals == (server.portal,)
    record = target.logins[0]
    assert record.session_type == "Discovery" and record.target_name is None
    received = target.connections[0].received
    texts = [p for p in received if isinstance(p, P.TextRequest)]
    assert decode(texts[0].data) == [("SendTargets", "All")]
    assert isinstance(received[-1], P.LogoutRequest)
    assert not target.violations(), target.violations()


async def test_discover_one_target_by_name() -> None:
    target = FakeTarget(NODES, settings=NegotiationSettings.rfc_defaults(default_time2wait=0))
    found, _ = await run(target, what="iqn.2003-01.org.example:beta")
    assert [t.name for t in found] == ["iqn.2003-01.org.example:beta"]


async def test_discover_long_answer_over_several_text_responses() -> None:
    nodes = [TargetNode(f"iqn.2003-01.org.example:t{i:03}",
                        addresses=(f"10.0.{i // 250}.{i % 250}:3260,1",
                                   f"[2001:db8::{i:x}]:3260,2")) for i in range(300)]
    target = FakeTarget(nodes, text_chunk=512)
    found, _ = await run(target)
    assert len(found) == 300
    assert found[299].portals[1] == Portal("2001:db8::12b", 3260, 2)
    requests = [p for p in target.connections[0].received if isinstance(p, P.TextRequest)]
    assert len(requests) > 20
    assert not target.violations(), target.violations()


async def test_discover_empty_answer() -> None:
    target = FakeTarget(NODES)
    found, _ = await run(target, what="iqn.2003-01.org.example:nobody")
    assert found == []


async def test_discover_with_chap() -> None:
    account = ChapAccount("disc-user", Secret("discovery-secret"))
    target = FakeTarget(NODES, chap=ChapCredentials(account), discovery_chap=True)
    found, _ = await run(target, credentials=ChapCredentials(account))
    assert len(found) == 4 and target.logins[0].auth_method == "CHAP"


async def test_discover_with_wrong_chap() -> None:
    account = ChapAccount("disc-user", Secret("discovery-secret"))
    target = FakeTarget(NODES, chap=ChapCredentials(account), discovery_chap=True)
    wrong = ChapCredentials(ChapAccount("disc-user", Secret("not-the-secret")))
    with pytest.raises(LoginAuthenticationError):
        await run(target, credentials=wrong)


async def test_discover_login_refused() -> None:
    target = FakeTarget(NODES, hostile=Hostility(login_status=(2, 0x09)))
    with pytest.raises(LoginError, match="discovery") as info:
        await run(target)
    assert "session type not supported" in str(info.value)


def answering(answer: bytes) -> Any:
    """A pdu_hook: every Text Request gets ``answer`` as its whole Text Response."""
    def reply(conn: Any, pdu: P.PDU) -> bool:
        if isinstance(pdu, P.TextRequest):
            conn.inject(P.TextResponse(itt=pdu.itt, data=answer, stat_sn=conn.stat_sn,
                                       exp_cmd_sn=conn.exp_cmd_sn, max_cmd_sn=conn.max_cmd_sn))
            conn.stat_sn += 1
            return True
        return False
    return reply


@pytest.mark.parametrize(("answer", "error"), [
    (b"TargetName=iqn.a:x", PDUFormatError),                 # no NUL at the end
    (b"TargetAddress=10.0.0.1\0", RemoteProtocolError),       # address before a name
    (b"\xff\xfe=\0", PDUFormatError),
])
async def test_discover_malformed_answer(answer: bytes, error: type[ISCSIError]) -> None:
    target = FakeTarget(NODES, hostile=Hostility(pdu_hook=answering(answer)))
    with pytest.raises(error):
        await run(target)
    # The discovery session was logged out all the same.
    assert any(isinstance(p, P.LogoutRequest) for p in target.connections[0].received)


@pytest.mark.parametrize("answer", [
    b"TargetName=iqn.a:x",                                   # no NUL at the end
    b"TargetName=iqn.a:x\0Target\xffName=y\0",              # a key that is no ASCII
    b"TargetName=\xff\xfe\0",                                # a value that is no UTF-8
    b"TargetName=iqn.a:x\0Foo=1\0Foo=2\0",                   # a key twice
])
async def test_malformed_answer_names_the_portal_that_sent_it(answer: bytes) -> None:
    # The text module says what is wrong; the message must also say who sent it, or a
    # duplicate key reads like a mistake of ours.
    target = FakeTarget(NODES, hostile=Hostility(pdu_hook=answering(answer)))
    with pytest.raises(PDUFormatError) as info:
        await run(target)
    assert "portal 127.0.0.1:" in str(info.value)
    assert "answered SendTargets with malformed text" in str(info.value)


@pytest.mark.parametrize("address", [
    "a" * 100_000,
    "host:" + "9" * 100_000,
    "host:3260," + "7" * 100_000,
    "[" + "f" * 100_000 + "]",
    "host." + "b" * 100_000 + ":3260",
])
def test_a_huge_target_address_makes_a_short_error(address: str) -> None:
    # A target's TargetAddress was quoted whole, twice, in the one line hbactl prints.
    pairs = [("TargetName", "iqn.a:one"), ("TargetAddress", address)]
    [(_, why)] = parse_send_targets(pairs, ASKED)[0].unusable
    assert "unusable TargetAddress" in why and len(why) < 1000


@pytest.mark.parametrize("url", [
    "iscsi://127.0.0.1:1/iqn.2003-01.org.example:disk1/0",
    "iscsi://127.0.0.1:1/iqn.2003-01.org.example:disk1/0?header_digest=crc32c",
])
def test_hbactl_discover_refuses_a_url_that_names_a_target(
        capsys: pytest.CaptureFixture[str], url: str) -> None:
    # It listed every target of the portal, the target and LUN of the URL ignored unsaid.
    from hba import cli

    assert cli.main(["discover", "--initiator-name", "iqn.2024-01.org.example:i", url]) == 2
    err = capsys.readouterr().err
    assert "names a target; hbactl discover takes a portal" in err and err.count("\n") == 1


def test_a_huge_target_name_makes_a_short_error() -> None:
    # The TargetName a SendTargets answer lists was put whole into the skipped address's line.
    name = "iqn.2003-01.org.example:" + "n" * 60_000
    pairs = [("TargetName", name), ("TargetAddress", "10.0.0.1:port")]
    [target] = parse_send_targets(pairs, ASKED)
    [(_, why)] = target.unusable
    assert target.name == name   # the data stays whole: hbactl discover lists it escaped
    assert "unusable TargetAddress" in why and len(why) < 1000
