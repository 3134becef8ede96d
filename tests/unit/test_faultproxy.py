"""tests.support.faultproxy: the schedule, the framer, the flips, the core's actions, and the
proxy end to end between the initiator's Session and the fake target (digests on)."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from initiator import pdu as P
from initiator.errors import DigestError
from initiator.keys import NegotiationSettings
from initiator.login import Portal
from initiator.reader import PDUReader
from initiator.transport import Session, SessionConfig, SessionState
from tests.support.fake_target import (
    FakeTarget,
    FakeTargetServer,
    RamDisk,
    TargetNode,
    cdb_read10,
    cdb_write10,
)
from tests.support.faultproxy import (
    REPO,
    Action,
    ActionKind,
    Direction,
    Fault,
    FaultCore,
    FaultKind,
    FaultProxy,
    LinkState,
    PduFramer,
    ProxyError,
    ProxyProcess,
    Schedule,
    describe_bhs,
    parse_weights,
    summarize_trace,
)

DIGESTS = b"HeaderDigest=CRC32C\0DataDigest=CRC32C\0"
NO_DIGESTS = b"HeaderDigest=None\0DataDigest=None\0"

# ------------------------------------------------------------------------------------------
# the schedule


def test_same_seed_same_schedule_other_seed_other_schedule() -> None:
    a = Schedule.generate(7, 120, interval=3)
    b = Schedule.generate(7, 120, interval=3)
    c = Schedule.generate(8, 120, interval=3)
    assert a == b
    assert a.faults != c.faults
    assert Schedule.from_json(json.loads(json.dumps(a.to_json()))) == a


def test_schedule_spacing_kinds_and_durations() -> None:
    schedule = Schedule.generate(3, 600, interval=4, stall=(1, 2), refuse=(5, 6))
    times = [f.at for f in schedule.faults]
    assert times == sorted(times) and 0 < times[0] <= 6 and times[-1] < 600
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(2 <= g <= 6 for g in gaps)
    assert 100 <= len(times) <= 300
    kinds = {f.kind for f in schedule.faults}
    assert kinds == set(FaultKind)
    for fault in schedule.faults:
        if fault.kind is FaultKind.STALL:
            assert 1 <= fault.duration <= 2
        elif fault.kind is FaultKind.REFUSE:
            assert 5 <= fault.duration <= 6
        else:
            assert fault.duration == 0
        assert 0 <= fault.salt < 1 << 32


def test_weights_choose_the_kinds_and_keep_the_times() -> None:
    only = parse_weights("drop=1, flip-immediate=3")
    assert only[FaultKind.DROP] == 1 and only[FaultKind.FLIP_IMMEDIATE] == 3
    assert only[FaultKind.STALL] == 0
    narrow = Schedule.generate(5, 200, weights=only)
    assert {f.kind for f in narrow.faults} == {FaultKind.DROP, FaultKind.FLIP_IMMEDIATE}
    assert [f.at for f in narrow.faults] == [f.at for f in Schedule.generate(5, 200).faults]
    for bad, why in (("bogus=1", "unknown fault kind 'bogus'"),
                     ("drop=x", "not a number"), ("drop=-1", "negative"),
                     ("drop=0", "no fault kind")):
        with pytest.raises(ValueError, match=why):
            parse_weights(bad)


# ------------------------------------------------------------------------------------------
# PDUs for the framer


def login_response(text: bytes, *, final: bool = True) -> bytes:
    return P.encode(P.LoginResponse(
        transit=final, csg=P.Stage.OPERATIONAL,
        nsg=P.Stage.FULL_FEATURE if final else P.Stage.OPERATIONAL,
        isid=1, tsih=5, stat_sn=1, exp_cmd_sn=1, max_cmd_sn=32, data=text))


def login_request(text: bytes = b"HeaderDigest=CRC32C\0") -> bytes:
    return P.encode(P.LoginRequest(
        transit=True, csg=P.Stage.OPERATIONAL, nsg=P.Stage.FULL_FEATURE,
        isid=1, cmd_sn=1, data=text))


def write_command(itt: int, data: bytes, digests: bool = True) -> bytes:
    return P.encode(P.ScsiCommand(
        write=True, final=True, itt=itt, expected_data_transfer_length=len(data), cmd_sn=itt,
        exp_stat_sn=2, cdb=cdb_write10(0, len(data) // 512), data=data),
        header_digest=digests, data_digest=digests)


def data_out(itt: int, data: bytes) -> bytes:
    return P.encode(P.DataOut(final=True, itt=itt, ttt=9, data=data),
                    header_digest=True, data_digest=True)


def data_in(itt: int, data: bytes) -> bytes:
    return P.encode(P.DataIn(final=True, itt=itt, stat_sn=3, data=data),
                    header_digest=True, data_digest=True)


def nop_in() -> bytes:
    return P.encode(P.NopIn(stat_sn=4, exp_cmd_sn=2, max_cmd_sn=33),
                    header_digest=True, data_digest=True)


def chunks(data: bytes, rng: random.Random) -> Iterator[bytes]:
    pos = 0
    while pos < len(data):
        n = rng.randint(1, 200)
        yield data[pos:pos + n]
        pos += n


def run_through(core: FaultCore, conn: int, direction: Direction, data: bytes,
                rng: random.Random | None = None, now: float = 1.0) -> bytes:
    """Feed ``data`` in random pieces; everything forwarded, concatenated."""
    out = bytearray()
    for piece in chunks(data, rng or random.Random(0)):
        out += core.forward(conn, direction, piece, now)
    return bytes(out)


def logged_in_core(faults: list[Fault], text: bytes = DIGESTS,
                   flip_wait: float = 1.0) -> tuple[FaultCore, int]:
    core = FaultCore(Schedule(tuple(faults), 100.0, 1), trace=True, flip_wait=flip_wait)
    conn = core.open(0.0)
    assert conn is not None
    assert run_through(core, conn, Direction.TO_TARGET, login_request()) == login_request()
    assert run_through(core, conn, Direction.TO_INITIATOR, login_response(text)) == \
        login_response(text)
    core.start(0.0)
    assert core.handle_timer(1.0) == []
    return core, conn


def decode_all(raw: bytes, digests: bool = True) -> list[P.PDU]:
    reader = PDUReader(header_digest=digests, data_digest=digests,
                       max_data_segment_length=P.MAX_DATA_SEGMENT_LENGTH)
    return reader.feed(raw)


# ------------------------------------------------------------------------------------------
# the framer


@pytest.mark.parametrize("seed", range(5))
def test_framer_follows_login_then_digested_pdus_in_any_pieces(seed: int) -> None:
    link = LinkState()
    seen: list[int] = []
    ins = PduFramer(Direction.TO_INITIATOR, link, on_header=lambda bhs: seen.append(bhs[0]))
    outs = PduFramer(Direction.TO_TARGET, link, on_header=lambda bhs: seen.append(bhs[0]))
    rng = random.Random(seed)

    def feed(framer: PduFramer, data: bytes) -> None:
        held = b""
        for piece in chunks(data, rng):
            buf = held + piece
            ready, flips = framer.feed(memoryview(buf))
            assert flips == []
            held = buf[ready:]
            assert len(held) < P.BHS_LEN
        assert held == b""

    feed(outs, login_request())
    # The target's text may come in two Login Responses (C bit); the last one transits.
    feed(ins, login_response(b"HeaderDigest=CRC32C\0", final=False)
         + login_response(b"DataDigest=CRC32C\0"))
    assert link.ffp and link.header_digest and link.data_digest
    feed(outs, write_command(1, bytes(4096)) + data_out(1, bytes(1000)) + write_command(2, b""))
    feed(ins, data_in(1, bytes(999)) + nop_in() + data_in(2, bytes(8)))
    assert seen == [0x43, 0x23, 0x23, 0x01, 0x05, 0x01, 0x25, 0x20, 0x25]
    assert outs.pdus == 4 and ins.pdus == 5


def test_framer_without_digests_and_a_failed_login() -> None:
    link = LinkState()
    ins = PduFramer(Direction.TO_INITIATOR, link)
    ins.feed(memoryview(login_response(NO_DIGESTS)))
    assert link.ffp and not link.header_digest and not link.data_digest
    failed = LinkState()
    refused = P.encode(P.LoginResponse(transit=True, nsg=P.Stage.FULL_FEATURE,
                                       status_class=2, status_detail=1))
    PduFramer(Direction.TO_INITIATOR, failed).feed(memoryview(refused))
    assert not failed.ffp


def test_garbage_login_text_makes_the_link_opaque() -> None:
    link = LinkState()
    framer = PduFramer(Direction.TO_INITIATOR, link)
    huge = login_response(b"X" * 70000, final=False)
    for _ in range(16):
        framer.feed(memoryview(huge))
    assert link.opaque
    assert framer.feed(memoryview(b"\xff" * 10)) == (10, [])


# ------------------------------------------------------------------------------------------
# flips: one bit, where the digest covers it, caught by the receiver


def flip(kind: FaultKind, salt: int = 0x12345678) -> Fault:
    return Fault(0.5, kind, 0.0, salt)


def single_bit_difference(a: bytes, b: bytes) -> int:
    assert len(a) == len(b)
    diffs = [i for i in range(len(a)) if a[i] != b[i]]
    assert len(diffs) == 1, diffs
    assert bin(a[diffs[0]] ^ b[diffs[0]]).count("1") == 1
    return diffs[0]


@pytest.mark.parametrize(("kind", "direction", "build", "where"), [
    (FaultKind.FLIP_IMMEDIATE, Direction.TO_TARGET,
     lambda: write_command(7, random.Random(1).randbytes(4096)), "data"),
    (FaultKind.FLIP_DATA_OUT, Direction.TO_TARGET,
     lambda: data_out(7, random.Random(2).randbytes(8192)), "data"),
    (FaultKind.FLIP_DATA_IN, Direction.TO_INITIATOR,
     lambda: data_in(7, random.Random(3).randbytes(1001)), "data"),
    (FaultKind.FLIP_HEADER_OUT, Direction.TO_TARGET, lambda: write_command(7, b""), "header"),
    (FaultKind.FLIP_HEADER_IN, Direction.TO_INITIATOR, nop_in, "header"),
])
@pytest.mark.parametrize("salt", [0, 0x12345678, 0xFFFFFFFF, 0x80000003])
def test_each_flip_inverts_one_bit_the_digest_catches(
        kind: FaultKind, direction: Direction, build: Any, where: str, salt: int) -> None:
    core, conn = logged_in_core([flip(kind, salt)])
    pdu = build()
    # An ineligible PDU first (a NOP-In has no payload; a Login Request is not FFP): untouched.
    other = nop_in() if direction is Direction.TO_INITIATOR else data_out(3, b"")
    if where == "data":
        assert run_through(core, conn, direction, other) == other
    out = run_through(core, conn, direction, pdu, random.Random(salt))
    at = single_bit_difference(pdu, out)
    hd_end = P.BHS_LEN + P.DIGEST_LEN
    if where == "header":
        assert at < P.BHS_LEN
    else:
        dsl = int.from_bytes(pdu[5:8], "big")
        assert hd_end <= at < hd_end + dsl
    assert decode_all(pdu)  # the original is fine...
    with pytest.raises(DigestError):  # ...the flipped one fails its digest
        decode_all(out)
    # Exactly once: the next eligible PDU passes unharmed.
    assert run_through(core, conn, direction, pdu) == pdu
    report = core.report(2.0)
    assert report["counts"][kind.value] == {"scheduled": 1, "due": 1, "hit": 1}
    fault = report["faults"][0]
    assert fault["hit"] and fault["conns"] == [conn] and fault["applied"] == 1.0
    assert fault["pdu"] == describe_bhs(pdu)


def test_flip_waits_while_digests_are_off_and_for_the_right_pdu() -> None:
    core, conn = logged_in_core([flip(FaultKind.FLIP_IMMEDIATE)], text=NO_DIGESTS,
                                flip_wait=math.inf)
    plain = write_command(1, bytes(512), digests=False)
    assert run_through(core, conn, Direction.TO_TARGET, plain) == plain
    assert core.skipped_no_digest == 1
    report = core.report(3.0)
    assert report["flips_waiting"] == 1 and report["hit"] == 0
    # A connection with digests on takes it (a reconnect, as in a recovery).
    second = core.open(4.0)
    assert second is not None
    run_through(core, second, Direction.TO_INITIATOR, login_response(DIGESTS))
    no_data = write_command(2, b"")
    assert run_through(core, second, Direction.TO_TARGET, no_data) == no_data
    digested = write_command(3, bytes(512))
    single_bit_difference(digested, run_through(core, second, Direction.TO_TARGET, digested))
    assert core.report(5.0)["faults"][0]["conns"] == [second]


def test_a_flip_with_nothing_to_hit_in_time_is_given_up() -> None:
    core, conn = logged_in_core([flip(FaultKind.FLIP_DATA_IN)], flip_wait=2.0)
    report = core.report(2.4)  # due at 0.5: still waiting
    assert report["flips_waiting"] == 1
    payload = data_in(1, bytes(64))
    assert run_through(core, conn, Direction.TO_INITIATOR, payload, now=2.6) == payload
    report = core.report(2.6)
    assert report["flips_waiting"] == 0 and report["hit"] == 0
    assert report["faults"][0]["detail"] == "no eligible PDU within 2 s"
    assert report["schedule"]["flip_wait"] == 2.0


def test_trace_records_every_header_with_its_sequence_numbers() -> None:
    core, conn = logged_in_core([])
    core.take_trace()
    run_through(core, conn, Direction.TO_TARGET, write_command(5, bytes(512)))
    run_through(core, conn, Direction.TO_INITIATOR, nop_in())
    records = core.take_trace()
    assert [(r["dir"], r["op"]) for r in records] == [("out", "scsi-command"), ("in", "nop-in")]
    assert records[0]["itt"] == 5 and records[0]["cmd_sn"] == 5 and records[0]["dsl"] == 512
    assert records[1]["stat_sn"] == 4 and records[1]["max_cmd_sn"] == 33
    assert describe_bhs(P.encode(P.Reject(reason=2, stat_sn=9)))["reason"] == 2


# ------------------------------------------------------------------------------------------
# drops, stalls, refusals


def stalled(core: FaultCore) -> bool:
    """Read afresh (mypy would keep an earlier narrowing of the property)."""
    return core.stalled


def test_drop_stall_refuse_timetable() -> None:
    faults = [Fault(1.0, FaultKind.DROP), Fault(2.0, FaultKind.STALL, 3.0),
              Fault(3.0, FaultKind.REFUSE, 4.0), Fault(20.0, FaultKind.DROP)]
    core = FaultCore(Schedule(tuple(faults), 30.0, 1))
    a = core.open(0.0)
    b = core.open(0.0)
    assert a is not None and b is not None
    assert core.get_timer() is None
    core.start(10.0)
    assert core.get_timer() == 11.0
    assert core.handle_timer(11.0) == [Action(ActionKind.DROP, (a, b))]
    assert core.report(11.0)["connections"]["open"] == 0
    c = core.open(11.5)
    assert c is not None
    actions = core.handle_timer(12.0)
    assert [x.kind for x in actions] == [ActionKind.PAUSE] and stalled(core)
    assert core.get_timer() == 13.0
    d = core.open(12.5)  # opened during the stall: stalled too
    assert d is not None
    actions = core.handle_timer(13.0)
    assert [(x.kind, x.conns) for x in actions] == [(ActionKind.DROP, (c, d))]
    assert core.open(14.0) is None and core.open(16.0) is None
    assert core.get_timer() == 15.0
    assert [x.kind for x in core.handle_timer(15.0)] == [ActionKind.RESUME]
    assert not stalled(core)
    assert core.get_timer() == 17.0
    assert core.handle_timer(17.0) == []
    assert core.open(17.0) is not None
    assert core.get_timer() == 30.0
    report = core.report(18.0)
    assert [f["kind"] for f in report["faults"]] == ["drop", "stall", "refuse"]
    assert [f["conns"] for f in report["faults"]] == [[a, b], [c, d], [c, d]]
    assert report["faults"][2]["refused"] == 2
    assert report["connections"] == {"accepted": 5, "refused": 2, "open": 1}
    assert report["counts"]["drop"] == {"scheduled": 2, "due": 1, "hit": 1}
    # A drop with no connection up hits nothing.
    empty = FaultCore(Schedule((Fault(0.0, FaultKind.DROP),), 1.0))
    empty.start(0.0)
    assert empty.handle_timer(0.0) == []
    assert empty.report(0.0)["hit"] == 0


def test_bytes_are_counted_in_and_out_of_the_window() -> None:
    core = FaultCore(Schedule((), 10.0))
    conn = core.open(0.0)
    assert conn is not None
    core.forward(conn, Direction.TO_TARGET, login_request(), 0.0)
    core.start(1.0)
    core.forward(conn, Direction.TO_INITIATOR, login_response(DIGESTS), 2.0)
    core.forward(conn, Direction.TO_TARGET, write_command(1, bytes(100)), 20.0)
    report = core.report(20.0)
    assert report["bytes"] == {"out": len(login_request()) + len(write_command(1, bytes(100))),
                               "in": len(login_response(DIGESTS))}
    assert report["window_bytes"] == {"out": 0, "in": len(login_response(DIGESTS))}


# ------------------------------------------------------------------------------------------
# end to end: Session -> FaultProxy -> fake target, digests on

TGT = "iqn.2003-01.org.example:disk1"


@asynccontextmanager
async def through_proxy(faults: list[Fault]) -> AsyncIterator[
        tuple[FakeTarget, FaultProxy, Session]]:
    settings = NegotiationSettings.rfc_defaults(
        default_time2wait=0, header_digest=("CRC32C",), data_digest=("CRC32C",))
    target = FakeTarget([TargetNode(TGT, {0: RamDisk(blocks=4096)})], settings=settings)
    server = FakeTargetServer(target)
    await server.start()
    core = FaultCore(Schedule(tuple(faults), 30.0, 1), trace=True)
    records: list[dict[str, Any]] = []
    proxy = FaultProxy(core, (server.host, server.port), trace=records.extend)
    port = await proxy.start()
    config = SessionConfig(
        initiator_name="iqn.2024-01.org.example:initiator", login_timeout=2.0,
        replacement_timeout=10.0, noop_interval=0.0, header_digest="CRC32C",
        data_digest="CRC32C", negotiation={"DefaultTime2Wait": "0"})
    session = Session(Portal("127.0.0.1", port), TGT, config)
    try:
        await asyncio.wait_for(session.login(), 10)
        yield target, proxy, session
    finally:
        await asyncio.wait_for(session.close(), 10)
        await proxy.close()
        await server.stop()


async def write_then_read(session: Session, lba: int, data: bytes) -> bytes:
    result = await asyncio.wait_for(session.execute(
        0, cdb_write10(lba, len(data) // 512), data_out=[memoryview(bytearray(data))]), 10)
    assert result.ok
    buf = bytearray(len(data))
    result = await asyncio.wait_for(session.execute(
        0, cdb_read10(lba, len(data) // 512), data_in=[memoryview(buf)]), 10)
    assert result.ok
    return bytes(buf)


@pytest.mark.parametrize("kind", [FaultKind.FLIP_IMMEDIATE, FaultKind.FLIP_DATA_IN,
                                  FaultKind.FLIP_HEADER_OUT, FaultKind.DROP])
async def test_session_recovers_from_each_fault_through_the_proxy(kind: FaultKind) -> None:
    async with through_proxy([Fault(0.0, kind, 0.0, 0xCAFEF00D)]) as (target, proxy, session):
        data = random.Random(9).randbytes(8192)
        assert await write_then_read(session, 10, data) == data
        assert session.reconnects == 0
        proxy.begin()
        await asyncio.sleep(0.05)  # the timer fires: the fault is armed or done
        data = random.Random(10).randbytes(8192)
        assert await write_then_read(session, 20, data) == data
        assert target.disk.data[20 * 512:20 * 512 + 8192] == data
        assert session.reconnects == 1 and session.state is SessionState.LOGGED_IN
        report = proxy.core.report(proxy.loop.time())
        assert report["hit"] == 1 and report["connections"]["accepted"] == 2
        violations = target.violations()
        if kind in (FaultKind.FLIP_IMMEDIATE, FaultKind.FLIP_HEADER_OUT):
            assert len(violations) == 1 and "digest" in violations[0].lower(), violations
        else:
            assert not violations, violations


async def test_refused_reconnects_then_recovery_and_a_stall_that_is_survived() -> None:
    faults = [Fault(0.0, FaultKind.REFUSE, 0.5), Fault(1.3, FaultKind.STALL, 0.3)]
    async with through_proxy(faults) as (_, proxy, session):
        proxy.begin()
        data = random.Random(11).randbytes(4096)
        assert await write_then_read(session, 30, data) == data
        report = proxy.core.report(proxy.loop.time())
        assert report["connections"]["refused"] >= 1
        assert session.reconnects == 1
        await asyncio.sleep(1.35 - report["elapsed"])
        assert stalled(proxy.core)
        assert await write_then_read(session, 40, data) == data  # waits out the stall
        assert not stalled(proxy.core) and session.reconnects == 1


# ------------------------------------------------------------------------------------------
# the process and its line protocol


def test_proxy_process_forwards_reports_and_stops() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        target = listener.getsockname()
        with ProxyProcess(target, seed=4, length=5.0, interval=1.0, timeout=20) as proxy:
            assert proxy.schedule == Schedule.generate(4, 5.0, interval=1.0)
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as client:
                server, _ = listener.accept()
                with server:
                    client.sendall(b"x" * 100)
                    got = b""
                    server.settimeout(10)
                    while len(got) < 100:
                        got += server.recv(100)
                    assert got == b"x" * 100
                    assert proxy.report()["bytes"]["out"] == 100
                    proxy.start()
                    assert proxy.report()["started"]
        assert proxy.final is not None and proxy.final["connections"]["accepted"] == 1
    with pytest.raises(ProxyError, match="exited"), \
            ProxyProcess(("127.0.0.1", 1), weights={FaultKind.DROP: 0}, timeout=20):
        pass


def test_command_line_rejects_bad_arguments() -> None:
    proc = subprocess.run([sys.executable, "-m", "tests.support.faultproxy", "--target",
                           "nohost", "--weights", "nope=1"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "is not HOST:PORT" in proc.stderr or "unknown fault kind" in proc.stderr


# ------------------------------------------------------------------------------------------
# reading a trace: how an initiator drove the link


def test_summarize_trace_reads_window_r2t_answers_and_acknowledgements() -> None:
    core = FaultCore(Schedule((), 100.0), trace=True)
    core.start(0.0)
    conn = core.open(0.0)
    assert conn is not None

    def send(direction: Direction, raw: bytes, now: float) -> None:
        core.forward(conn, direction, raw, now)

    out, back = Direction.TO_TARGET, Direction.TO_INITIATOR
    send(out, P.encode(P.LoginRequest(transit=True, nsg=P.Stage.OPERATIONAL,
                                      data=b"AuthMethod=None\0")), 0.1)
    send(back, login_response(b"AuthMethod=None\0", final=False), 0.2)
    send(out, login_request(), 0.3)
    # The target's final Login Response: a window of one command (MaxCmdSN = ExpCmdSN = 10).
    send(back, P.encode(P.LoginResponse(
        transit=True, csg=P.Stage.OPERATIONAL, nsg=P.Stage.FULL_FEATURE,
        stat_sn=100, exp_cmd_sn=10, max_cmd_sn=10, data=DIGESTS)), 0.4)

    def command(itt: int, cmd_sn: int, edtl: int, immediate: int, exp_stat_sn: int) -> bytes:
        return P.encode(P.ScsiCommand(
            write=True, final=True, itt=itt, expected_data_transfer_length=edtl, cmd_sn=cmd_sn,
            exp_stat_sn=exp_stat_sn, cdb=cdb_write10(0, edtl // 512),
            data=bytes(immediate)), header_digest=True, data_digest=True)

    send(out, command(1, 10, 8192, 4096, 101), 0.5)
    send(out, command(2, 11, 4096, 4096, 101), 0.55)  # CmdSN 11 > MaxCmdSN 10
    send(back, P.encode(P.R2T(itt=1, ttt=7, stat_sn=101, exp_cmd_sn=11, max_cmd_sn=40,
                              buffer_offset=4096, desired_data_transfer_length=4096),
                        header_digest=True, data_digest=True), 0.6)
    send(back, P.encode(P.ScsiResponse(itt=2, stat_sn=101, exp_cmd_sn=12, max_cmd_sn=41),
                        header_digest=True, data_digest=True), 0.65)
    send(out, P.encode(P.DataOut(final=True, itt=1, ttt=7, exp_stat_sn=101,
                                 buffer_offset=4096, data=bytes(4096)),
                       header_digest=True, data_digest=True), 0.9)
    send(back, P.encode(P.ScsiResponse(itt=1, stat_sn=102, exp_cmd_sn=12, max_cmd_sn=42),
                        header_digest=True, data_digest=True), 1.0)
    send(out, command(3, 12, 4096, 4096, 103), 1.1)
    core.close(conn, 2.0)
    stats = summarize_trace(core.take_trace())
    assert stats.connections == 1
    assert stats.login_requests == [2] and stats.login_windows == [1]
    assert stats.first_command_delays == [pytest.approx(0.1)]
    assert stats.commands_before_reply == [2]
    assert stats.beyond_window == 1
    assert stats.r2t_delays == [pytest.approx(0.3)]
    assert stats.max_writes_waiting == 1
    # ExpStatSN 101 on the first two commands: nothing to acknowledge yet; then the Data-Out
    # still says 101 after StatSN 101 came (one behind); the last command is up to date.
    assert stats.exp_stat_sn_lags == [0, 0, 1, 0]
    assert stats.to_json()["beyond_window"] == 1
