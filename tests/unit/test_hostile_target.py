"""A target that lies, floods or sends control characters: what the initiator must survive.

Each class of misbehaviour has its own :class:`~tests.support.fake_target.Hostility` switches
(``data_in_*``, ``residual_claim``, ``overflow_claim``, ``data_sn_skip``, ``r2t_*``,
``fail_*``, ``chap_*``; control characters go straight into INQUIRY strings and target names)
and is driven through the sans-I/O core over :class:`Loopback`, through
:class:`~initiator.transport.Session` on a loopback port, or through ``hbactl`` itself. What is
asserted is the rule of issue 10: a read delivers exactly the target's data or fails with an
error naming what was wrong; the protocol is enforced (R2Ts checked, ping answers bounded);
what the SCSI midlayer retries is retried, a bounded number of times; strings from the target
reach a terminal escaped; errors blame the side at fault.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pytest

from hba import cli, oneshot
from initiator import pdu as P
from initiator import scsi
from initiator.chap import (
    ChapAccount,
    ChapCredentials,
    ChapProtocolError,
    MutualAuthenticationError,
    Secret,
)
from initiator.client import COMMAND_ATTEMPTS, ScsiClient
from initiator.command import CommandResult
from initiator.errors import (
    CommandError,
    ISCSIError,
    RemoteProtocolError,
    SessionFailed,
    TransferError,
)
from initiator.keys import NegotiationSettings
from initiator.login import LoginAuthenticationError, LoginMachine, LoginSuccess
from initiator.printable import PrintableFormatter, printable, quoted
from initiator.reader import PDUReader
from initiator.session import MAX_UNSENT_PING_ANSWERS, ConnectionCore, EventKind, Task
from initiator.transport import Session, SessionConfig
from tests.support.fake_target import (
    FakeTarget,
    FakeTargetServer,
    Hostility,
    Loopback,
    RamDisk,
    TargetNode,
    cdb_read10,
    cdb_write10,
)

INI = "iqn.2024-01.org.example:initiator"
TGT = "iqn.2003-01.org.example:disk1"
ISID = 0x80_00_5A_5A_00_00
# What a hostile target would like a terminal to see: retitle the window, clear the screen,
# a fake log line, a right-to-left override.
EVIL = "\x1b]0;owned\x07\x1b[2J\nFAKE LINE\u202e"
READS = frozenset({0x28, 0x88})      # READ(10), READ(16)
WRITES = frozenset({0x2A, 0x8A})
INQUIRY = frozenset({0x12})
T = TypeVar("T")


def config(**kw: Any) -> SessionConfig:
    base: dict[str, Any] = dict(
        initiator_name=INI, isid=ISID, login_timeout=2.0, replacement_timeout=2.0,
        noop_interval=0.0, noop_timeout=1.0, negotiation={"DefaultTime2Wait": "0"})
    base.update(kw)
    return SessionConfig(**base)


def fake(hostile: Hostility | None = None, **kw: Any) -> FakeTarget:
    settings = kw.pop("settings", None) or NegotiationSettings.rfc_defaults(default_time2wait=0)
    nodes = kw.pop("nodes", None) or [TargetNode(TGT, {0: RamDisk(blocks=2048)})]
    target = FakeTarget(nodes, settings=settings, hostile=hostile, **kw)
    for node in target.nodes:
        for disk in node.luns.values():
            disk.fill_pattern()
    return target


@asynccontextmanager
async def logged_in(target: FakeTarget, **cfg: Any) -> AsyncIterator[
        tuple[FakeTargetServer, Session]]:
    """A session logged in to ``target`` served on a loopback port."""
    async with FakeTargetServer(target) as server:
        session = Session(server.portal, TGT, config(**cfg))
        await within(session.login())
        try:
            yield server, session
        finally:
            await within(session.close())


async def within(aw: Awaitable[T], seconds: float = 10.0) -> T:
    return await asyncio.wait_for(aw, seconds)


async def hbactl(*argv: str) -> int:
    """``hbactl argv`` in a worker thread (it runs its own event loop) while the fake target
    serves on this one."""
    return await within(asyncio.to_thread(
        cli.main, [argv[0], "--initiator-name", INI, "--login-timeout", "2", *argv[1:]]))


def url(server: FakeTargetServer, target: str = TGT) -> str:
    return f"iscsi://127.0.0.1:{server.port}/{target}/0"


def loopback(target: FakeTarget, **offers: str) -> tuple[Loopback, ConnectionCore]:
    """The sans-I/O core logged in to ``target`` in memory, offering ``offers``."""
    lb = Loopback(target)
    success = lb.login(LoginMachine(initiator_name=INI, target_name=TGT, isid=ISID,
                                    overrides=offers))
    assert isinstance(success, LoginSuccess)
    return lb, lb.start(success)


def submit(core: ConnectionCore, results: list[CommandResult | ISCSIError], cdb: bytes, *,
           data_in: bytearray | None = None, data_out: bytes | None = None) -> Task:
    task = Task(0, cdb, [memoryview(bytearray(data_out))] if data_out is not None else None,
                [memoryview(data_in)] if data_in is not None else None, results.append)
    core.submit(task)
    return task


def assert_clean(text: str) -> None:
    """Nothing in ``text`` that a terminal would interpret, only the escaped forms."""
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    assert "FAKE LINE" not in text or "\\nFAKE LINE" in text


# --------------------------------------------------------------------------------------------
# Terminal escapes (item 7)


def test_printable_escapes_what_a_terminal_would_interpret() -> None:
    assert printable(EVIL) == "\\x1b]0;owned\\x07\\x1b[2J\\nFAKE LINE\\u202e"
    assert printable("LIO-ORG disk1 naa.6001405") == "LIO-ORG disk1 naa.6001405"
    assert printable("Ünïcödé ok") == "Ünïcödé ok"
    assert printable("\x00\x7f\x9b\u2028\U000e0001") == "\\x00\\x7f\\x9b\\u2028\\U000e0001"
    assert printable(None) == "None" and printable(42) == "42"


def test_printable_is_idempotent_and_bounded() -> None:
    once = printable(EVIL)
    assert printable(once) == once
    assert printable(f"error: {once}") == f"error: {once}"
    assert printable("x" * 100, limit=10) == "x" * 10 + "..."


def test_log_lines_are_escaped_but_tracebacks_keep_their_lines() -> None:
    formatter = PrintableFormatter("%(name)s: %(message)s")
    record = logging.LogRecord("initiator", logging.WARNING, __file__, 1,
                               "target said %s", (EVIL,), None)
    line = formatter.format(record)
    assert_clean(line)
    assert "\n" not in line
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("initiator", logging.ERROR, __file__, 1, "failed %s",
                                   (EVIL,), sys.exc_info())
    text = formatter.format(record)
    first, _, trace = text.partition("\n")
    assert_clean(first)
    assert "Traceback" in trace


def test_the_tcmu_handler_process_logs_escaped_lines() -> None:
    from tcmu_handler.serve import log_handler

    record = logging.LogRecord("initiator", logging.WARNING, __file__, 1, "target said %s",
                               (EVIL,), None)
    line = log_handler().format(record)
    assert_clean(line)
    assert "\n" not in line and "tcmu-serve[" in line


async def test_inquiry_strings_reach_the_terminal_escaped(
        capsys: pytest.CaptureFixture[str]) -> None:
    disk = RamDisk(blocks=64, vendor="\x1b]0;", product="\x07\x1b[2J\nFAKE", revision="\u202e1",
                   serial="S\x1b[31mN")
    target = fake(nodes=[TargetNode(TGT, {0: disk})])
    async with FakeTargetServer(target) as server:
        assert await hbactl("inquiry", url(server)) == 0
        out = capsys.readouterr().out
        assert_clean(out)
        assert "\\x1b]0;" in out and "\\x07\\x1b[2J\\nFAKE" in out and "S\\x1b[31mN" in out
        # JSON keeps the target's very strings (json escapes the control characters).
        assert await hbactl("inquiry", "--json", url(server)) == 0
        out = capsys.readouterr().out
        assert "\x1b" not in out
        result = json.loads(out)
        assert result["vendor"] == "\x1b]0;" and result["unit_serial"] == "S\x1b[31mN"


async def test_discovered_names_and_addresses_are_escaped(
        capsys: pytest.CaptureFixture[str]) -> None:
    name = "iqn.2003-01.org.example:\x1b[2Jdisk"
    target = fake(nodes=[TargetNode(name, {0: RamDisk(blocks=64)},
                                    addresses=("127.0.0.1:3260,1",), alias=EVIL)])
    async with FakeTargetServer(target) as server:
        assert await hbactl("discover", f"iscsi://127.0.0.1:{server.port}") == 0
        out = capsys.readouterr().out
        assert_clean(out)
        assert "iqn.2003-01.org.example:\\x1b[2Jdisk" in out
        assert await hbactl("discover", "--json", f"iscsi://127.0.0.1:{server.port}") == 0
        assert json.loads(capsys.readouterr().out)["targets"][0]["name"] == name


async def test_error_messages_quoting_the_target_are_escaped(
        capsys: pytest.CaptureFixture[str]) -> None:
    target = fake(hostile=Hostility(redirect=(f"127.0.0.1:3260,{EVIL}", False)))
    async with FakeTargetServer(target) as server:
        assert await hbactl("readcap", url(server)) == 1
        err = capsys.readouterr().err
        assert err.startswith("hbactl: ") and err.count("\n") == 1 and "redirected" in err
        assert_clean(err)
    # A target name quoted raw inside the message, as discovery does: a warning line for the
    # address skipped, and (no usable portal left, iscsiadm's "No portals found") an error.
    target = fake(nodes=[TargetNode(f"iqn.2003-01.org.example:{EVIL}", {0: RamDisk(blocks=64)},
                                    addresses=("127.0.0.1:port",))])
    async with FakeTargetServer(target) as server:
        assert await hbactl("discover", f"iscsi://127.0.0.1:{server.port}") == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 2 and "unusable TargetAddress" in err
        assert "no usable portal" in err.splitlines()[1]
        assert_clean(err)


@pytest.mark.parametrize("json_output", [False, True])
async def test_discover_skips_an_unusable_address_and_lists_the_rest(
        capsys: pytest.CaptureFixture[str], json_output: bool) -> None:
    """One target's bad TargetAddress failed the whole discover (exit 1, nothing listed).
    As iscsiadm: a warning naming the target, the address and why; the rest listed; exit 0."""
    bad = f"10.0.0.1:{EVIL}"
    nodes = [TargetNode(f"iqn.2003-01.org.example:{EVIL}", {0: RamDisk(blocks=64)},
                        addresses=(bad, "10.0.0.2:3260,2")),
             TargetNode("iqn.2003-01.org.example:bad", {0: RamDisk(blocks=64)},
                        addresses=("10.0.0.3:99999",)),
             TargetNode("iqn.2003-01.org.example:good", {0: RamDisk(blocks=64)},
                        addresses=("10.0.0.4:3260,1",))]
    async with FakeTargetServer(fake(nodes=nodes)) as server:
        argv = ["discover", *(["--json"] if json_output else []),
                f"iscsi://127.0.0.1:{server.port}"]
        assert await hbactl(*argv) == 0
        captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert len(err) == 2 and all(line.startswith("hbactl: warning: portal ") for line in err)
    assert f"for {printable(quoted(nodes[0].name))}, skipped" in err[0]
    assert "for 'iqn.2003-01.org.example:bad', skipped" in err[1] and "99999" in err[1]
    assert_clean(captured.err)
    if json_output:
        result = json.loads(captured.out)
        assert [t["name"] for t in result["targets"]] == [
            f"iqn.2003-01.org.example:{EVIL}", "iqn.2003-01.org.example:good"]
        assert [(s["target"], s["address"]) for s in result["skipped"]] == [
            (f"iqn.2003-01.org.example:{EVIL}", bad),
            ("iqn.2003-01.org.example:bad", "10.0.0.3:99999")]
    else:
        assert_clean(captured.out)
        assert captured.out.splitlines() == [
            f"10.0.0.2:3260,2 {printable(nodes[0].name)}",
            "10.0.0.4:3260,1 iqn.2003-01.org.example:good"]


def test_daemon_list_and_status_escape_what_the_target_named() -> None:
    from hba import control

    disk = control.normalize_disk({"name": "disk1", "target": f"iqn.x:{EVIL}", "lun": 0,
                                   "device": "/dev/sdb", "size": 1 << 20,
                                   "session": "recovering", "error": f"target said {EVIL}",
                                   "attempts": 2, "retry_in": 5})
    table = control.format_table([disk])
    assert_clean(table)
    assert len(table.splitlines()) == 2
    status = control.format_status({"pid": 1, "version": "0", "uptime": 3, "disks": [disk],
                                    "sessions": [{"target": EVIL, "portal": "127.0.0.1:3260",
                                                  "state": "logged in", "luns": 1}]})
    assert_clean(status)
    assert "target said \\x1b]0;owned" in status


# --------------------------------------------------------------------------------------------
# Lying lengths and residuals (item 5): exactly the target's data, or an error naming why


@pytest.mark.parametrize(("hostile", "words"), [
    (Hostility(data_in_withheld=512), "returned only 3584 of 4096 bytes with status GOOD "
                                      "(underflow residual 512)"),
    (Hostility(data_in_withheld=512, residual_claim=0), "no underflow residual: the target's "
                                                        "lengths are wrong"),
    (Hostility(data_in_withheld=512, residual_claim=100), "underflow residual of 100, which "
                                                          "does not add up"),
    (Hostility(data_in_withheld=4096), "returned only 0 of 4096 bytes"),
    (Hostility(data_in_withheld=4096, residual_claim=0), "returned only 0 of 4096 bytes with "
                                                         "status GOOD (and no underflow"),
    (Hostility(residual_claim=512), "returned all 4096 bytes but reported an underflow "
                                    "residual of 512"),
    (Hostility(overflow_claim=4096), "overflow residual of 4096"),
])
async def test_a_short_or_inconsistent_read_is_an_error(hostile: Hostility, words: str) -> None:
    hostile.data_in_opcodes = READS
    async with logged_in(fake(hostile)) as (_, session):
        client = ScsiClient(session, 0)
        buf = bytearray(b"\xee" * 4096)
        with pytest.raises(TransferError, match="READ") as info:
            await within(client.read(8, 8, memoryview(buf)))
        assert words in str(info.value) and TGT in str(info.value)
        # The session is fine: the next honest read works and reads the target's bytes.
        hostile.data_in_opcodes = frozenset()
        await within(client.read(8, 8, memoryview(buf)))
        assert buf[:8] == (8).to_bytes(8, "big")


@pytest.mark.parametrize(("hostile", "words"), [
    # The first PDU again instead of the last one: as many bytes as asked, no residual.
    (Hostility(data_in_repeat_first=True, data_in_withheld=1024, residual_claim=0),
     "offset 0 with DataSN 0, but the next in order is offset 1024 with DataSN 1"),
    (Hostility(data_sn_skip=True), "DataSN 1, but the next in order is offset 0 with DataSN 0"),
])
def test_data_in_out_of_order_is_a_protocol_error(hostile: Hostility, words: str) -> None:
    hostile.data_in_opcodes = READS
    lb, core = loopback(fake(hostile), MaxRecvDataSegmentLength="1024")
    results: list[CommandResult | ISCSIError] = []
    submit(core, results, cdb_read10(0, 8), data_in=bytearray(4096))
    with pytest.raises(RemoteProtocolError, match="Data-In") as info:
        lb.pump()
    assert words in str(info.value) and not results


def test_sense_data_longer_than_its_segment_names_the_target_and_command() -> None:
    """A CHECK CONDITION whose sense length (255) is more than the segment holds (18): the
    connection is dropped with an error that says who sent it and for what (it used to say
    only "SCSI Response declares 255 bytes of sense data but carries 18")."""
    def lying_sense(conn: Any, pdu: P.PDU) -> bool:
        if not (isinstance(pdu, P.ScsiCommand) and pdu.cdb[0] in READS):
            return False
        conn.exp_cmd_sn = (pdu.cmd_sn + 1) & 0xFFFFFFFF
        conn.inject(P.ScsiResponse(response=0, status=0x02, itt=pdu.itt,
                                   data=b"\x00\xff" + bytes(18), **conn._status_fields()))
        return True

    lb, core = loopback(fake(Hostility(pdu_hook=lying_sense)))
    results: list[CommandResult | ISCSIError] = []
    task = submit(core, results, cdb_read10(0, 8), data_in=bytearray(4096))
    with pytest.raises(RemoteProtocolError) as info:
        lb.pump()
    assert str(info.value) == (
        f"target fake sent a malformed SCSI Response for command 0x28 (task 0x{task.itt:08x}, "
        "LUN 0): SCSI Response declares 255 bytes of sense data but carries 18")
    assert not results


def test_data_in_repeated_with_data_pdu_in_order_no_is_a_protocol_error() -> None:
    # DataPDUInOrder=No (forced by both sides, as SessionConfig.negotiation can): the first
    # PDU again instead of the last one used to count twice, and the read "completed" with
    # its last 1024 bytes never sent.
    hostile = Hostility(data_in_repeat_first=True, data_in_withheld=1024, residual_claim=0,
                        data_in_opcodes=READS)
    settings = NegotiationSettings.rfc_defaults(default_time2wait=0, data_pdu_in_order=False)
    lb, core = loopback(fake(hostile, settings=settings), MaxRecvDataSegmentLength="1024",
                        DataPDUInOrder="No")
    assert not core.params.data_pdu_in_order
    results: list[CommandResult | ISCSIError] = []
    task = submit(core, results, cdb_read10(0, 8), data_in=bytearray(4096))
    with pytest.raises(RemoteProtocolError, match="Data-In") as info:
        lb.pump()
    assert f"(task 0x{task.itt:08x}, LUN 0)" in str(info.value)
    assert "at offset 0, 1024 bytes, overlapping bytes 0..1024" in str(info.value)
    assert str(info.value).startswith("target fake sent Data-In") and not results


async def test_hbactl_read_of_a_short_read_fails_and_writes_no_wrong_byte(
        tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    # 3000 blocks: two chunks of at most 2048 (1 MiB); the second one comes back short, and
    # the buffer it reuses still holds the first chunk's bytes.
    target = fake(nodes=[TargetNode(TGT, {0: RamDisk(blocks=4096)})])
    out = tmp_path / "out.bin"
    reads = 0

    def second_read_is_short(conn: Any, pdu: P.PDU) -> bool:
        nonlocal reads
        if isinstance(pdu, P.ScsiCommand) and pdu.cdb[0] in READS:
            reads += 1
            target.hostile.data_in_withheld = 512 if reads == 2 else 0
        return False

    target.hostile.pdu_hook = second_read_is_short
    target.hostile.data_in_opcodes = READS
    async with FakeTargetServer(target) as server:
        assert await hbactl("read", url(server), "--lba", "0", "--blocks", "3000",
                            "-o", str(out)) == 1
    err = capsys.readouterr().err
    assert "returned only" in err and "underflow residual 512" in err
    data = out.read_bytes()
    assert data == bytes(target.disk.data[: len(data)]) and len(data) < 3000 * 512


def capacity_of_blocks(block_size: int) -> Any:
    """A pdu_hook: READ CAPACITY(16) says 4096 blocks of ``block_size`` bytes."""
    def hook(conn: Any, pdu: P.PDU) -> bool:
        if not (isinstance(pdu, P.ScsiCommand) and pdu.cdb[0] == 0x9E):
            return False
        conn.exp_cmd_sn = (pdu.cmd_sn + 1) & 0xFFFFFFFF
        data = (4095).to_bytes(8, "big") + block_size.to_bytes(4, "big") + bytes(20)
        conn.inject(P.DataIn(final=True, status_present=True, itt=pdu.itt, lun=pdu.lun,
                             data=data[: pdu.expected_data_transfer_length],
                             stat_sn=conn.stat_sn, exp_cmd_sn=conn.exp_cmd_sn,
                             max_cmd_sn=conn.max_cmd_sn))
        conn.stat_sn = (conn.stat_sn + 1) & 0xFFFFFFFF
        return True
    return hook


@pytest.mark.parametrize(("block_size", "words"), [
    (0, "logical blocks of 0 bytes, which is no size"),
    (1 << 31, "logical blocks of 2147483648 bytes, more than the 1048576 bytes"),
])
async def test_a_block_size_that_is_no_size_is_the_targets_error(
        block_size: int, words: str, tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    # Every user divides by the block size (0 was a ZeroDivisionError traceback) and sizes
    # buffers by it (2 GiB for a one-block read).
    target = fake(Hostility(pdu_hook=capacity_of_blocks(block_size)))
    async with logged_in(target) as (_, session):
        with pytest.raises(scsi.ScsiDataError, match=words):
            await within(ScsiClient(session, 0).capacity())
    async with FakeTargetServer(target) as server:
        assert await hbactl("read", url(server), "--lba", "0", "--blocks", "1",
                            "-o", str(tmp_path / "out.bin")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "Traceback" not in err


async def test_inquiry_with_no_data_at_all_names_it() -> None:
    target = fake(Hostility(data_in_withheld=1 << 16, residual_claim=0,
                            data_in_opcodes=INQUIRY))
    async with logged_in(target) as (_, session):
        with pytest.raises(TransferError, match=r"INQUIRY returned 0 bytes \(no residual\); "
                                                "at least 36 are needed"):
            await within(ScsiClient(session, 0).identity())


async def test_inquiry_of_a_lun_with_no_unit_is_an_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    # The fake target answers INQUIRY for LUN 7 with qualifier 011b, as tgt and LIO do.
    target = fake()
    async with logged_in(target) as (_, session):
        with pytest.raises(CommandError, match="no logical unit at this LUN"):
            await within(ScsiClient(session, 7).identity())
    async with FakeTargetServer(target) as server:
        assert await hbactl("inquiry", url(server).removesuffix("/0") + "/7") == 1
    err = capsys.readouterr().err
    assert "LUN 7" in err and "check the LUN number" in err and err.count("\n") == 1
    # The hint names the portal in use, ready to paste.
    portal = url(server).removeprefix("iscsi://").split("/")[0]
    assert f"`hbactl discover --luns iscsi://{portal}` lists them" in err


async def test_a_write_the_target_took_only_part_of_is_an_error() -> None:
    target = fake(Hostility(residual_claim=512, data_in_opcodes=WRITES))
    async with logged_in(target) as (_, session):
        with pytest.raises(TransferError, match="took only 3584 of the 4096 bytes sent"):
            await within(ScsiClient(session, 0).write(0, 8, memoryview(bytes(4096))))


def answer_writes_at_once(response: int = 0) -> Any:
    """A pdu_hook: every WRITE gets its SCSI Response (status GOOD, no residual, the service
    ``response``) at once, asking for none of its data; its Data-Out is swallowed."""
    def hook(conn: Any, pdu: P.PDU) -> bool:
        if isinstance(pdu, P.DataOut):
            return True
        if not (isinstance(pdu, P.ScsiCommand) and pdu.cdb[0] in WRITES):
            return False
        conn.exp_cmd_sn = (pdu.cmd_sn + 1) & 0xFFFFFFFF
        conn.inject(P.ScsiResponse(itt=pdu.itt, response=response, stat_sn=conn.stat_sn,
                                   exp_cmd_sn=conn.exp_cmd_sn, max_cmd_sn=conn.max_cmd_sn))
        conn.stat_sn = (conn.stat_sn + 1) & 0xFFFFFFFF
        return True
    return hook


async def test_a_write_reported_done_without_its_data_is_an_error() -> None:
    # 64 KiB: more than the immediate data, so the rest waits for R2Ts that never come.
    # GOOD without a residual is a lie about what arrived, not a completed write.
    target = fake(Hostility(pdu_hook=answer_writes_at_once()))
    async with logged_in(target) as (_, session):
        with pytest.raises(TransferError, match="without asking for the rest") as info:
            await within(ScsiClient(session, 0).write(0, 128, memoryview(bytes(65536))))
        assert info.value.transferred < info.value.expected == 65536
        assert session.in_flight == 0


async def test_a_target_failure_response_leaves_nothing_in_flight() -> None:
    # The command is answered (service response 0x01): it must leave the task table, or a
    # logout waits for it to its timeout and a reconnect sends it again.
    target = fake(Hostility(pdu_hook=answer_writes_at_once(response=1)))
    async with logged_in(target) as (_, session):
        with pytest.raises(CommandError, match="target failure"):
            await within(session.execute(0, scsi.write(0, 1), data_out=[memoryview(
                bytes(512))]))
        assert session.in_flight == 0


async def test_perf_does_not_count_short_reads() -> None:
    target = fake(Hostility(data_in_withheld=512, data_in_opcodes=READS))
    async with FakeTargetServer(target) as server:
        with pytest.raises(TransferError, match="underflow residual 512"):
            await within(oneshot.cmd_perf(
                url(server), oneshot.Options(initiator_name=INI, login_timeout=2.0),
                oneshot.PerfSettings(seconds=0.2, queue_depth=2), None))


# --------------------------------------------------------------------------------------------
# R2T storms (item 6): every R2T is held to RFC 7143 §11.8 before it is served


def data_out_bytes(target: FakeTarget) -> int:
    """Data-Out payload bytes the target received, on every connection."""
    return sum(len(p.data) for c in target.connections for p in c.received
               if isinstance(p, P.DataOut))


def write_4k(target: FakeTarget, size: int = 4096, **offers: str) -> tuple[
        Loopback, list[CommandResult | ISCSIError]]:
    lb, core = loopback(target, **offers)
    results: list[CommandResult | ISCSIError] = []
    submit(core, results, cdb_write10(0, size // 512), data_out=bytes(size))
    return lb, results


def test_an_r2t_storm_is_refused_after_the_first_r2t() -> None:
    # 1000 R2Ts for the same 4 KiB: served, that was 4 MB of Data-Out for a 4 KiB write.
    target = fake(Hostility(r2t_repeat=1000),
                  settings=NegotiationSettings.rfc_defaults(immediate_data=False))
    lb, results = write_4k(target)
    with pytest.raises(RemoteProtocolError, match=r"broke the R2T rules .* bytes 0\.\.4096 "
                                                  "again, below offset 4096"):
        lb.pump()
    assert data_out_bytes(target) <= 4096 and not results


@pytest.mark.parametrize(("hostile", "size", "words"), [
    (Hostility(r2t_ignore_max_outstanding=True), 16384,
     "an R2T while 1 were outstanding, more than MaxOutstandingR2T=1"),
    (Hostility(r2t_sn_offset=5), 4096, "R2TSN 5 where 0 was due"),
    (Hostility(r2t_length_extra=512), 16384, "4608 bytes in one R2T, more than MaxBurstLength "
                                             "4096"),
    (Hostility(r2t_out_of_range=True), 4096, "which writes 4096 bytes"),
])
def test_r2ts_beyond_the_rules_are_a_protocol_error(hostile: Hostility, size: int,
                                                    words: str) -> None:
    target = fake(hostile, settings=NegotiationSettings.rfc_defaults(
        immediate_data=False, max_burst_length=4096, first_burst_length=4096))
    lb, results = write_4k(target, size)
    with pytest.raises(RemoteProtocolError, match="R2T") as info:
        lb.pump()
    assert words in str(info.value)
    assert data_out_bytes(target) <= 4096 and not results


def test_several_outstanding_r2ts_when_negotiated_are_all_served() -> None:
    target = fake(settings=NegotiationSettings.rfc_defaults(
        immediate_data=False, max_burst_length=4096, first_burst_length=4096,
        max_outstanding_r2t=4))
    lb, results = write_4k(target, 65536, MaxOutstandingR2T="4")
    lb.pump()
    (result,) = results
    assert isinstance(result, CommandResult) and result.ok
    assert data_out_bytes(target) == 65536 and not target.violations()
    r2ts = [p for p in lb.conn.received if isinstance(p, P.DataOut) and p.final]
    assert len(r2ts) == 16


async def test_a_session_with_an_r2t_storming_target_fails_instead_of_streaming() -> None:
    target = fake(Hostility(r2t_repeat=2000),
                  settings=NegotiationSettings.rfc_defaults(immediate_data=False,
                                                            default_time2wait=0))
    async with logged_in(target, replacement_timeout=0.5) as (_, session):
        with pytest.raises(SessionFailed, match="broke the R2T rules"):
            await within(ScsiClient(session, 0).write(0, 8, memoryview(bytes(4096))))
    logins = len(target.successful_logins())
    assert data_out_bytes(target) <= 4096 * logins


# --------------------------------------------------------------------------------------------
# NOP-In and Async Message floods (item 6)


def nop_in_pings(n: int, first_ttt: int = 0x100) -> bytes:
    return b"".join(P.encode(P.NopIn(itt=P.RESERVED_TAG, ttt=first_ttt + i, stat_sn=0x1000,
                                     exp_cmd_sn=0, max_cmd_sn=64)) for i in range(n))


def flood_core() -> tuple[ConnectionCore, PDUReader]:
    lb, core = loopback(fake())
    assert lb.reader is not None
    return core, lb.reader


def test_pings_the_target_does_not_read_the_answers_to_are_bounded() -> None:
    core, reader = flood_core()
    pdus = reader.feed(nop_in_pings(MAX_UNSENT_PING_ANSWERS + 50))
    with pytest.raises(RemoteProtocolError, match="without reading our answers"):
        for pdu in pdus:
            core.receive_pdu(pdu, 0.0)
    assert len(core.send_buffers()) == MAX_UNSENT_PING_ANSWERS


def test_pings_that_are_read_are_all_answered() -> None:
    core, reader = flood_core()
    answered = 0
    for _ in range(20):
        for pdu in reader.feed(nop_in_pings(100)):
            core.receive_pdu(pdu, 0.0)
        bufs = core.send_buffers()
        core.sent(sum(len(b) for b in bufs))
        answered += len(bufs)
    assert answered == 2000 and not core.wants_to_send


def test_a_flood_of_async_requests_is_acted_on_once() -> None:
    core, reader = flood_core()
    raw = b"".join(P.encode(P.AsyncMessage(itt=P.RESERVED_TAG, async_event=event, stat_sn=0x1000,
                                           exp_cmd_sn=0, max_cmd_sn=64))
                   for event in (P.AsyncEvent.LOGOUT_REQUEST, P.AsyncEvent.NEGOTIATION_REQUEST)
                   for _ in range(500))
    for pdu in reader.feed(raw):
        core.receive_pdu(pdu, 0.0)
    kinds = []
    while (event := core.next_event()) is not None:
        kinds.append(event.kind)
    assert kinds == [EventKind.LOGOUT_REQUESTED, EventKind.RENEGOTIATE]


# --------------------------------------------------------------------------------------------
# What the SCSI midlayer retries, our tools retry (item 8)


def commands_seen(target: FakeTarget, opcodes: frozenset[int]) -> int:
    return sum(1 for c in target.connections for p in c.received
               if isinstance(p, P.ScsiCommand) and p.cdb[0] in opcodes)


RETRIED = [
    (0x02, (0x6, 0x29, 0x00)),   # UNIT ATTENTION, power on or reset: a new I_T nexus
    (0x02, (0x6, 0x2A, 0x01)),   # UNIT ATTENTION, mode parameters changed
    (0x02, (0xB, 0x47, 0x05)),   # ABORTED COMMAND, protocol service CRC error
    (0x02, (0x2, 0x04, 0x01)),   # NOT READY, becoming ready: after a delay
    (0x02, (0x2, 0x04, 0x0A)),   # NOT READY, ALUA state transition: after a delay
    (0x02, (0x3, 0x0C, 0x00)),   # MEDIUM ERROR, write error
    (0x08, (0, 0, 0)),           # BUSY: after a delay
    (0x28, (0, 0, 0)),           # TASK SET FULL: after a delay
    (0x40, (0, 0, 0)),           # TASK ABORTED
]
FINAL = [
    (0x02, (0x5, 0x24, 0x00)),   # ILLEGAL REQUEST, invalid field in CDB
    (0x02, (0x3, 0x11, 0x00)),   # MEDIUM ERROR, unrecovered read error
    (0x02, (0xB, 0x10, 0x01)),   # ABORTED COMMAND, guard check failed (protection info)
    (0x02, (0x2, 0x04, 0x02)),   # NOT READY, initializing command required
    (0x02, (0x7, 0x27, 0x00)),   # DATA PROTECT, write protected
    (0x02, (0x4, 0x44, 0x00)),   # HARDWARE ERROR, internal target failure
    (0x18, (0, 0, 0)),           # RESERVATION CONFLICT
]


@pytest.mark.parametrize(("status", "sense"), RETRIED)
async def test_conditions_the_midlayer_retries_are_retried(
        status: int, sense: tuple[int, int, int]) -> None:
    target = fake(Hostility(fail_first=3, fail_status=status, fail_sense=sense,
                            fail_opcodes=READS))
    async with logged_in(target) as (_, session):
        buf = bytearray(4096)
        await within(ScsiClient(session, 0).read(8, 8, memoryview(buf)))
        assert buf[:8] == (8).to_bytes(8, "big")
    assert commands_seen(target, READS) == 4


@pytest.mark.parametrize(("status", "sense"), FINAL)
async def test_final_conditions_are_not_retried(status: int, sense: tuple[int, int, int]) -> None:
    target = fake(Hostility(fail_first=3, fail_status=status, fail_sense=sense,
                            fail_opcodes=READS))
    async with logged_in(target) as (_, session):
        with pytest.raises(scsi.ScsiCommandError):
            await within(ScsiClient(session, 0).read(8, 8, memoryview(bytearray(4096))))
    assert commands_seen(target, READS) == 1


async def test_a_target_that_raises_unit_attention_forever_is_not_waited_on_forever() -> None:
    target = fake(Hostility(fail_first=1 << 20, fail_opcodes=READS))
    async with logged_in(target) as (_, session):
        with pytest.raises(scsi.ScsiCommandError, match="UNIT ATTENTION"):
            await within(ScsiClient(session, 0).read(8, 8, memoryview(bytearray(4096))))
    assert commands_seen(target, READS) == COMMAND_ATTEMPTS


@pytest.mark.parametrize(("status", "sense"), [RETRIED[0], RETRIED[6]])
async def test_perf_retries_what_the_midlayer_retries(status: int,
                                                      sense: tuple[int, int, int]) -> None:
    target = fake(Hostility(fail_first=6, fail_status=status, fail_sense=sense,
                            fail_opcodes=READS))
    async with FakeTargetServer(target) as server:
        result = await within(oneshot.cmd_perf(
            url(server), oneshot.Options(initiator_name=INI, login_timeout=2.0),
            oneshot.PerfSettings(seconds=0.3, queue_depth=2), None))
    assert result["errors"] == 0 and result["commands"] > 0 and result["exit_status"] == 0
    assert target.hostile.fail_first == 0


# --------------------------------------------------------------------------------------------
# CHAP errors blame the side at fault (item 9)

INI_ACCOUNT = ChapAccount("ini-user", Secret("initiator-secret-1"))
TGT_ACCOUNT = ChapAccount("tgt-user", Secret("target-secret-22"))
ONE_WAY = ChapCredentials(INI_ACCOUNT)
MUTUAL = ChapCredentials(INI_ACCOUNT, TGT_ACCOUNT)


@pytest.mark.parametrize(("mutual", "hostile", "words"), [
    (False, Hostility(chap_replace={"CHAP_C": "0xZZ"}), "malformed CHAP_C"),
    (False, Hostility(chap_replace={"CHAP_I": "300"}), "CHAP_I=300"),
    (False, Hostility(chap_replace={"CHAP_I": "x\x1b[2J"}), "malformed CHAP_I 'x\\x1b[2J'"),
    (False, Hostility(chap_replace={"CHAP_A": "99"}), "which we did not offer"),
    (False, Hostility(chap_replace={"CHAP_A": "5,7"}), "must choose one"),
    (False, Hostility(chap_drop=("CHAP_C",)), "did not send CHAP_C"),
    (True, Hostility(chap_replace={"CHAP_R": "0x1234"}), "2-byte CHAP_R"),
    (True, Hostility(chap_drop=("CHAP_R",)), "did not send CHAP_R"),
    (True, Hostility(skip_mutual_response=True), "did not send CHAP_N, CHAP_R"),
])
async def test_chap_garbage_from_the_target_is_its_protocol_error(
        mutual: bool, hostile: Hostility, words: str) -> None:
    credentials = MUTUAL if mutual else ONE_WAY
    target = fake(hostile, chap=credentials)
    async with FakeTargetServer(target) as server:
        session = Session(server.portal, TGT, config(credentials=credentials))
        with pytest.raises(ChapProtocolError) as info:
            await within(session.login())
    message = str(info.value)
    assert words in message and TGT in message
    assert "broke the CHAP protocol" in message and "chapSecret" not in message
    assert_clean(message)


async def test_our_wrong_secret_and_the_targets_are_told_apart() -> None:
    target = fake(chap=MUTUAL)
    async with FakeTargetServer(target) as server:
        wrong = ChapCredentials(ChapAccount("ini-user", Secret("not-the-secret-1")), TGT_ACCOUNT)
        with pytest.raises(LoginAuthenticationError, match="check chapSecret") as ours:
            await within(Session(server.portal, TGT, config(credentials=wrong)).login())
        assert not isinstance(ours.value, ChapProtocolError | MutualAuthenticationError)
        theirs = ChapCredentials(INI_ACCOUNT, ChapAccount("tgt-user", Secret("not-theirs-22")))
        with pytest.raises(MutualAuthenticationError, match="check tgtChapSecret"):
            await within(Session(server.portal, TGT, config(credentials=theirs)).login())
        alias = ChapCredentials(INI_ACCOUNT, ChapAccount("someone-else", TGT_ACCOUNT.secret))
        with pytest.raises(MutualAuthenticationError, match="check tgtChapName"):
            await within(Session(server.portal, TGT, config(credentials=alias)).login())


async def test_hbactl_blames_the_target_for_its_chap_protocol_errors(
        capsys: pytest.CaptureFixture[str]) -> None:
    target = fake(Hostility(chap_replace={"CHAP_C": "0xZZ"}), chap=ONE_WAY)
    async with FakeTargetServer(target) as server:
        with_secret = url(server).replace("iscsi://", "iscsi://ini-user%initiator-secret-1@")
        assert await hbactl("readcap", with_secret) == 1
        err = capsys.readouterr().err
        assert "broke the CHAP protocol" in err and "malformed CHAP_C" in err
        assert "user name and secret" not in err and "chapSecret" not in err
        target.hostile.chap_replace = {}
        wrong = url(server).replace("iscsi://", "iscsi://ini-user%wrong-secret-123@")
        assert await hbactl("readcap", wrong) == 1
        err = capsys.readouterr().err
        # A URL's credentials: the message names the URL's, not the configuration's.
        assert "check the user name and secret of the URL's <user>%<secret>@" in err
        assert "broke the CHAP protocol" not in err and "chapSecret" not in err


@pytest.mark.parametrize("length", [251, 252, 4000])
async def test_a_long_unit_serial_is_asked_for_again_and_shown_escaped(
        capsys: pytest.CaptureFixture[str], length: int) -> None:
    # Asked with 255 bytes, a serial over 251 was cut short, and the error hidden: `-`.
    serial = ("\x1bS" + "0123456789" * 500)[:length]
    target = fake(nodes=[TargetNode(TGT, {0: RamDisk(blocks=64, serial=serial)})])
    async with FakeTargetServer(target) as server:
        assert await hbactl("inquiry", "--json", url(server)) == 0
        assert json.loads(capsys.readouterr().out)["unit_serial"] == serial
        assert await hbactl("inquiry", url(server)) == 0
        out = capsys.readouterr().out
        assert_clean(out)
        assert "\\x1bS0123456789" in out and serial[-20:] in out


# --------------------------------------------------------------------------------------------
# A lie that breaks connection after connection: the command's one error says what the target
# did, not only how many connections it took


async def test_a_command_window_that_never_opens_ends_with_the_reason() -> None:
    """The window stays closed on every connection (MaxCmdSN = ExpCmdSN - 1): the session
    gives up at the replacement timeout, and the READ gets the session's error, which names
    the closed window; it used to get "lost with 2 connections in a row", naming nothing."""
    target = fake(cmd_window=0)
    async with logged_in(target, command_timeout=1.0, replacement_timeout=1.5,
                         negotiation={"DefaultTime2Wait": "1"}) as (_, session):
        with pytest.raises(SessionFailed) as failed:
            await within(ScsiClient(session, 0).read(0, 8, memoryview(bytearray(4096))))
    assert "kept its command window closed for 1 s" in str(failed.value), failed.value
    assert "in a row" not in str(failed.value)


async def test_a_command_that_breaks_every_connection_ends_with_the_last_reason() -> None:
    """Every connection a READ is sent on is dropped by the target, after other commands
    (TEST UNIT READY) completed on it: the session works, the READ alone is given up at the
    replacement timeout, and its error says what ended the last connection."""
    loop = asyncio.get_running_loop()
    swallowed: set[object] = set()

    def drop_after_a_read(conn: Any, pdu: P.PDU) -> bool:
        if isinstance(pdu, P.ScsiCommand) and pdu.cdb[0] in READS:
            swallowed.add(conn)
            return True
        if isinstance(pdu, P.ScsiCommand) and conn in swallowed:
            loop.call_later(0.02, conn.drop)   # after this command's answer went out
        return False

    target = fake(Hostility(pdu_hook=drop_after_a_read))
    async with logged_in(target, replacement_timeout=0.5) as (_, session):
        client = ScsiClient(session, 0)
        stop = asyncio.Event()

        async def others() -> None:
            while not stop.is_set():
                try:
                    await client.test_unit_ready()
                except ISCSIError:
                    pass
                await asyncio.sleep(0.03)

        background = asyncio.create_task(others())
        try:
            with pytest.raises(SessionFailed) as failed:
                await within(client.read(0, 8, memoryview(bytearray(4096))))
        finally:
            stop.set()
            await within(background)
    assert "connections in a row" in str(failed.value), failed.value
    assert str(failed.value).endswith(
        f"; the last connection ended with: target 127.0.0.1:{target.portal_address.split(':')[1]}"
        " closed the connection"), failed.value


async def test_hbactl_discover_of_a_target_that_never_answers_names_the_bound(
        capsys: pytest.CaptureFixture[str]) -> None:
    """SendTargets swallowed: discover ends at the command timeout, and says so (it said
    "did not answer our Text Request (ITT 0x00000001) in time", after 30 s by default)."""
    def swallow_text(conn: Any, pdu: P.PDU) -> bool:
        return isinstance(pdu, P.TextRequest)

    target = fake(Hostility(pdu_hook=swallow_text))
    async with FakeTargetServer(target) as server:
        assert await hbactl("discover", f"iscsi://127.0.0.1:{server.port}",
                            "--command-timeout", "0.3") == 1
    err = capsys.readouterr().err
    assert err == (f"hbactl: target discovery at 127.0.0.1:{server.port} did not answer our "
                   "Text Request within the command timeout of 0.3 s; check the target's "
                   "logs\n"), err


# --------------------------------------------------------------------------------------------
# The reader's errors say who sent the bytes


async def test_a_pdu_beyond_our_segment_length_is_blamed_on_the_target(
        caplog: pytest.LogCaptureFixture) -> None:
    """A NOP-In with 300000 bytes where we declared 262144: the connection is dropped (and the
    READ re-issued on the next one) with an error that says which target sent it; it used
    to say only "NopIn PDU has a 300000-byte data segment, ..."."""
    sent: list[P.PDU] = []

    def one_huge_nop_in(conn: Any, pdu: P.PDU) -> bool:
        if not sent and isinstance(pdu, P.ScsiCommand) and pdu.cdb[0] in READS:
            sent.append(pdu)
            conn.inject(P.NopIn(itt=P.RESERVED_TAG, ttt=0x77, data=bytes(300000),
                                **conn._status_fields(advance=False)))
            return True
        return False

    target = fake(Hostility(pdu_hook=one_huge_nop_in))
    caplog.set_level(logging.WARNING, logger="initiator.recovery")
    async with logged_in(target) as (server, session):
        await within(ScsiClient(session, 0).read(0, 8, memoryview(bytearray(4096))))
    assert (f"connection failed (target 127.0.0.1:{server.port} sent a malformed PDU: NopIn "
            "PDU has a 300000-byte data segment, more than the MaxRecvDataSegmentLength of "
            "262144 we declared)") in caplog.text, caplog.text


async def test_a_digest_error_is_blamed_on_the_target(caplog: pytest.LogCaptureFixture) -> None:
    settings = NegotiationSettings.rfc_defaults(default_time2wait=0, header_digest=("CRC32C",))
    target = fake(Hostility(corrupt_header_digest=1), settings=settings)
    caplog.set_level(logging.WARNING, logger="initiator.recovery")
    async with logged_in(target, header_digest="CRC32C") as (server, session):
        await within(ScsiClient(session, 0).read(0, 8, memoryview(bytearray(4096))))
    assert f"connection failed (target 127.0.0.1:{server.port}: header digest mismatch" \
        in caplog.text, caplog.text


# --------------------------------------------------------------------------------------------
# ExpCmdSN beyond every CmdSN we used: the target would drop our next commands as duplicates


def test_a_login_that_expects_cmdsns_we_never_used_is_refused() -> None:
    """The final Login Response says ExpCmdSN 1000 where our Login Request carried CmdSN 0:
    the target would take CmdSN 0..999 for duplicates (§4.2.2.1) and every command would only
    time out; the login fails at once, naming the target and the numbers."""
    def expect_1000(req: P.LoginRequest, resp: P.LoginResponse) -> P.LoginResponse | None:
        if resp.transit and resp.nsg is P.Stage.FULL_FEATURE:
            resp.exp_cmd_sn, resp.max_cmd_sn = 1000, 1031
            return resp
        return None

    lb = Loopback(fake(Hostility(login_hook=expect_1000)))
    with pytest.raises(RemoteProtocolError) as info:
        lb.login(LoginMachine(initiator_name=INI, target_name=TGT, isid=ISID))
    assert str(info.value) == (
        f"target {TGT} completed the login expecting CmdSN 1000, beyond the 0 of our Login "
        "Request: it counts commands we never sent (RFC 7143 §4.2.2.1)")


def test_an_expcmdsn_beyond_the_commands_sent_is_a_protocol_error() -> None:
    lb, core = loopback(fake())
    results: list[CommandResult | ISCSIError] = []
    submit(core, results, cdb_read10(0, 8), data_in=bytearray(4096))
    lb.pump()
    assert results and core.cmd_sn == core.exp_cmd_sn == 1
    # A NOP-In (no ping, only the numbers) acknowledging CmdSN 1..4 as well.
    lb.conn.inject(P.NopIn(itt=P.RESERVED_TAG, ttt=P.RESERVED_TAG, stat_sn=lb.conn.stat_sn,
                           exp_cmd_sn=5, max_cmd_sn=36))
    with pytest.raises(RemoteProtocolError) as info:
        lb.pump()
    assert str(info.value) == (
        "target fake acknowledged CmdSN up to 4 (ExpCmdSN 5), but the next CmdSN we assign is "
        "1: it counts commands we never sent (RFC 7143 §4.2.2.1); dropping the connection")
