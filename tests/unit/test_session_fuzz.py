"""Hostile input for the initiator's state machines: only ``ISCSIError`` may ever escape.

Arbitrary bytes, arbitrary target PDUs aimed at the tags and offsets of live commands, and
valid exchanges with bytes flipped are fed to a logged-in :class:`ConnectionCore` through a
:class:`PDUReader` (as the transport does) and to :class:`LoginMachine`. Anything else escaping
(``IndexError``, ``KeyError``, ``AssertionError``, ``ValueError`` ...) would be a crash of the
connection instead of an orderly drop. Over TCP, a :class:`Session` facing a target that sends
garbage must end in a typed error: no traceback logged, no hang.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from initiator import pdu as P
from initiator.chap import ChapAccount, ChapCredentials, Secret
from initiator.command import CommandResult
from initiator.errors import ISCSIError
from initiator.keys import KEYS, NegotiationSettings
from initiator.login import LoginMachine, LoginRedirect, LoginSuccess
from initiator.reader import PDUReader
from initiator.session import ConnectionCore, Task, TransferParameters
from initiator.transport import Session, SessionConfig
from tests.support.fake_target import (
    FakeTarget,
    FakeTargetServer,
    Hostility,
    RamDisk,
    TargetNode,
    cdb_read10,
    cdb_test_unit_ready,
    cdb_write10,
)

# FUZZ_EXAMPLES=5000 runs a longer, randomised hunt; the default is quick and deterministic.
_EXAMPLES = os.environ.get("FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(_EXAMPLES or 200), deadline=None, derandomize=_EXAMPLES is None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
M = 0xFFFFFFFF
INI = "iqn.2024-01.org.example:initiator"
TGT = "iqn.2003-01.org.example:disk1"


# --------------------------------------------------------------------------------------------
# A logged-in core with work of every kind outstanding


@dataclass
class Live:
    core: ConnectionCore
    reader: PDUReader
    buffers: list[bytearray] = field(default_factory=list)
    done: dict[int, int] = field(default_factory=dict)
    now: float = 0.0

    def callback(self, key: int) -> Any:
        def on_done(result: CommandResult | ISCSIError) -> None:
            self.done[key] = self.done.get(key, 0) + 1
            assert self.done[key] == 1, "on_done ran twice"
        return on_done

    def drain(self, partial: int | None = None) -> None:
        core = self.core
        while core.wants_to_send:
            bufs = core.send_buffers(3)
            total = sum(len(b) for b in bufs)
            n = total if partial is None else min(total, partial)
            core.sent(n)
            if partial is not None:
                return


def live_core(hd: bool = False, dd: bool = False) -> Live:
    params = TransferParameters(header_digest=hd, data_digest=dd,
                                max_recv_data_segment_length=8192,
                                max_xmit_data_segment_length=4096, first_burst_length=4096,
                                initial_r2t=False, immediate_data=True)
    core = ConnectionCore(params, cmd_sn=10, exp_stat_sn=100, exp_cmd_sn=10, max_cmd_sn=13,
                       target="fuzz", noop_interval=1.0, noop_timeout=1.0)
    live = Live(core, PDUReader(header_digest=hd, data_digest=dd,
                                max_data_segment_length=8192, sink=core))
    for i, (cdb, out, inn) in enumerate([
            (cdb_read10(0, 8), None, [1000, 3096]),     # ITT 1: read into two views
            (cdb_read10(8, 1), None, [512]),            # ITT 2
            (cdb_write10(0, 16), 8192, None),           # ITT 3: write with R2Ts to come
            (cdb_test_unit_ready(), None, None),        # ITT 4
            (cdb_read10(0, 1), None, [512])]):          # queued: the window is full
        data_out = None
        if out:
            buf = bytearray(out)
            live.buffers.append(buf)
            data_out = [memoryview(buf)]
        data_in = None
        if inn:
            views = []
            for n in inn:
                buf = bytearray(n)
                live.buffers.append(buf)
                views.append(memoryview(buf))
            data_in = views
        core.submit(Task(0, cdb, data_out, data_in, live.callback(i)))
    core.ping(0.0, live.callback(100))                          # ITT 5
    core.text_request(b"SendTargets=All\0", live.callback(101))  # queued behind the read
    core.task_management(P.TMFunction.LOGICAL_UNIT_RESET, 3, live.callback(102))
    live.drain(partial=100)   # a frame partly sent
    return live


def feed(live: Live, raw: bytes, sizes: Sequence[int]) -> ISCSIError | None:
    """Feed ``raw`` in chunks; stop at the first ISCSIError (then close the core as the
    transport does). Anything else propagates and fails the test."""
    core, reader = live.core, live.reader
    pos = 0
    try:
        for size in itertools.cycle(sizes or [len(raw) or 1]):
            if pos >= len(raw):
                break
            chunk = raw[pos : pos + max(1, size)]
            pos += len(chunk)
            live.now += 0.3
            for pdu in reader.feed(chunk):
                core.receive_pdu(pdu, live.now)
                while core.next_event() is not None:
                    pass
            core.handle_timer(live.now)
            live.drain()
    except ISCSIError as exc:
        core.close(exc)
        for task in core.take_unfinished():
            assert task.itt == P.RESERVED_TAG
        return exc
    return None


ITTS = st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, P.RESERVED_TAG]) | st.integers(0, M)
OFFSETS = st.sampled_from([0, 1, 511, 512, 1000, 3095, 4095, 4096, 8191, 8192, M]) | \
    st.integers(0, M)
LENGTHS = st.sampled_from([0, 1, 512, 4096, 8192, 8193]) | st.integers(0, 1 << 16)
SN = st.sampled_from([9, 10, 11, 13, 14, 15, 99, 100, 101, M, 0, 0x80000000]) | \
    st.integers(0, M)
SMALL = st.integers(0, 255)
PAYLOAD = st.binary(max_size=64) | st.integers(0, 9000).map(bytes)


def target_pdus() -> st.SearchStrategy[P.PDU]:
    win = dict(exp_cmd_sn=SN, max_cmd_sn=SN)
    return st.one_of(
        st.builds(P.DataIn, itt=ITTS, buffer_offset=OFFSETS, data=PAYLOAD, final=st.booleans(),
                  status_present=st.booleans(), status=SMALL, underflow=st.booleans(),
                  overflow=st.booleans(), residual_count=SN, data_sn=SN, stat_sn=SN, **win),
        st.builds(P.ScsiResponse, itt=ITTS, status=SMALL, response=SMALL,
                  underflow=st.booleans(), overflow=st.booleans(), residual_count=SN,
                  data=st.binary(max_size=40), stat_sn=SN, **win),
        st.builds(P.R2T, itt=ITTS, ttt=ITTS, buffer_offset=OFFSETS,
                  desired_data_transfer_length=LENGTHS, r2t_sn=SN, stat_sn=SN, **win),
        st.builds(P.NopIn, itt=ITTS, ttt=ITTS, data=st.binary(max_size=20), stat_sn=SN, **win),
        st.builds(P.TaskMgmtResponse, itt=ITTS, response=SMALL, stat_sn=SN, **win),
        st.builds(P.TextResponse, itt=ITTS, ttt=ITTS, final=st.booleans(), cont=st.booleans(),
                  data=st.binary(max_size=40), stat_sn=SN, **win),
        st.builds(P.LogoutResponse, itt=ITTS, response=SMALL, time2wait=st.integers(0, 99),
                  stat_sn=SN, **win),
        st.builds(P.AsyncMessage, async_event=SMALL, lun=st.integers(0, (1 << 64) - 1),
                  parameter1=st.integers(0, 0xFFFF), parameter3=st.integers(0, 0xFFFF),
                  data=st.binary(max_size=40), stat_sn=SN, **win),
        st.builds(P.Reject, reason=SMALL, data=st.binary(max_size=60) | st.builds(
            lambda itt, op: bytes([op]) + bytes(15) + itt.to_bytes(4, "big") + bytes(28),
            ITTS, st.sampled_from([0x01, 0x41, 0x00, 0x40, 0x02, 0x04, 0x05, 0x06, 0x10])),
            stat_sn=SN, **win),
        st.builds(P.LoginResponse, itt=ITTS),
        st.builds(P.NopOut, itt=ITTS),
    )


@FUZZ
@given(pdus=st.lists(target_pdus(), max_size=12), hd=st.booleans(), dd=st.booleans(),
       sizes=st.lists(st.integers(1, 5000), max_size=6))
def test_arbitrary_target_pdus_against_live_commands(pdus: list[P.PDU], hd: bool, dd: bool,
                                                     sizes: list[int]) -> None:
    live = live_core(hd, dd)
    raw = b"".join(P.encode(p, header_digest=hd, data_digest=dd) for p in pdus)
    feed(live, raw, sizes)


@FUZZ
@given(raw=st.binary(max_size=3000), hd=st.booleans(), dd=st.booleans(),
       sizes=st.lists(st.integers(1, 600), max_size=6))
def test_arbitrary_bytes(raw: bytes, hd: bool, dd: bool, sizes: list[int]) -> None:
    feed(live_core(hd, dd), raw, sizes)


@FUZZ
@given(pdus=st.lists(target_pdus(), min_size=1, max_size=6), hd=st.booleans(),
       dd=st.booleans(), flips=st.lists(st.tuples(st.integers(0, 1 << 16), SMALL),
                                        min_size=1, max_size=6),
       cut=st.integers(0, 1 << 16), sizes=st.lists(st.integers(1, 3000), max_size=4))
def test_mutated_valid_pdus(pdus: list[P.PDU], hd: bool, dd: bool,
                            flips: list[tuple[int, int]], cut: int, sizes: list[int]) -> None:
    raw = bytearray(b"".join(P.encode(p, header_digest=hd, data_digest=dd) for p in pdus))
    for pos, value in flips:
        raw[pos % len(raw)] ^= value or 1
    if cut < len(raw):
        del raw[cut:]
    feed(live_core(hd, dd), bytes(raw), sizes)


def test_feed_finds_the_common_cases() -> None:
    # Sanity for the fuzzers above: a well-formed answer completes a command, and a bad one
    # is a typed error, not another exception.
    live = live_core()
    ok = P.ScsiResponse(itt=4, stat_sn=100, exp_cmd_sn=14, max_cmd_sn=20)
    assert feed(live, P.encode(ok), []) is None
    assert live.done.get(3) == 1
    bad = P.DataIn(itt=1, buffer_offset=4000, data=bytes(200), exp_cmd_sn=14, max_cmd_sn=20)
    assert isinstance(feed(live, P.encode(bad), []), ISCSIError)


# --------------------------------------------------------------------------------------------
# LoginMachine


ACCOUNT = ChapAccount("ini-user", Secret("initiator-secret-1"))
MUTUAL = ChapCredentials(ACCOUNT, ChapAccount("tgt-user", Secret("target-secret-22")))
KEY_NAMES = st.sampled_from(sorted(KEYS)) | st.sampled_from(["X-Junk", "Bogus", "a", "X#Y"])
VALUES = st.sampled_from([
    "None", "CHAP", "CRC32C", "CRC32C,None", "Yes", "No", "Reject", "Irrelevant",
    "NotUnderstood", "0", "1", "5", "512", "8192", "262144", "16777215", "16777216",
    "99999999999999999999999", "0x10", "0b", "0x", "", "Discovery", "Normal", "5,7",
    "0x" + "ab" * 16, "0b" + "A" * 24, "10.0.0.1:3260,1", "[::1]:3260", "iqn.2003-01.a:b",
    "\u00e9", "x" * 300]) | st.text(max_size=20).filter(lambda t: "\0" not in t)


def login_text() -> st.SearchStrategy[bytes]:
    pairs = st.lists(st.tuples(KEY_NAMES, VALUES), max_size=8)
    return st.one_of(
        pairs.map(lambda ps: b"".join(f"{k}={v}".encode() + b"\0" for k, v in ps)),
        st.binary(max_size=80))


def login_responses() -> st.SearchStrategy[P.LoginResponse]:
    stages = st.sampled_from(list(P.Stage))
    return st.builds(
        P.LoginResponse, transit=st.booleans(), cont=st.booleans(), csg=stages, nsg=stages,
        version_active=st.sampled_from([0, 0, 0, 1]), isid=st.sampled_from([0x800000000001]),
        itt=st.sampled_from([0, 0, 1]), tsih=st.sampled_from([0, 1, 0xFFFF]),
        stat_sn=SN, exp_cmd_sn=SN, max_cmd_sn=SN,
        status_class=st.sampled_from([0, 0, 0, 1, 2, 3, 9]),
        status_detail=st.sampled_from([0, 1, 2, 3, 0x0B, 0x7F]), data=login_text())


def _machine(kind: int) -> LoginMachine:
    credentials = [None, ChapCredentials(ACCOUNT), MUTUAL][kind]
    return LoginMachine(initiator_name=INI, target_name=TGT if kind != 1 else None,
                        isid=0x800000000001, credentials=credentials)


@FUZZ
@given(responses=st.lists(login_responses(), min_size=1, max_size=8), kind=st.integers(0, 2))
def test_login_machine_with_arbitrary_responses(responses: list[P.LoginResponse],
                                                kind: int) -> None:
    machine = _machine(kind)
    machine.start()
    try:
        for response in responses:
            outcome = machine.receive(response)
            if isinstance(outcome, LoginSuccess | LoginRedirect):
                return
    except ISCSIError:
        return


@FUZZ
@given(raw=st.binary(max_size=600), kind=st.integers(0, 2))
def test_login_machine_with_arbitrary_bytes(raw: bytes, kind: int) -> None:
    machine = _machine(kind)
    machine.start()
    try:
        for pdu in PDUReader(max_data_segment_length=8192).feed(raw):
            outcome = machine.receive(pdu)
            if not isinstance(outcome, P.LoginRequest):
                return
    except ISCSIError:
        return


@FUZZ
@given(which=st.integers(0, 8), flips=st.lists(st.tuples(st.integers(0, 400), SMALL),
                                               min_size=1, max_size=4),
       kind=st.integers(0, 2), chunk=st.sampled_from([None, 16]))
def test_login_with_a_mutated_response(which: int, flips: list[tuple[int, int]], kind: int,
                                       chunk: int | None) -> None:
    count = [0]

    def mutate(req: P.LoginRequest, resp: P.LoginResponse) -> bytes | None:
        count[0] += 1
        if count[0] - 1 != which:
            return None
        raw = bytearray(P.encode(resp))
        for pos, value in flips:
            raw[pos % len(raw)] ^= value or 1
        return bytes(raw)

    target = FakeTarget(chap=MUTUAL if kind else None, login_chunk=chunk,
                        hostile=Hostility(login_hook=mutate))
    conn = target.connect()
    machine = _machine(kind)
    request: P.PDU = machine.start()
    pending = b""
    try:
        for _ in range(60):
            pending += conn.receive(P.encode(request))
            if not pending:
                return   # the target gave up on us and closed the connection
            response, used = P.decode(pending)
            pending = pending[used:]
            outcome = machine.receive(response)
            if not isinstance(outcome, P.LoginRequest):
                return
            request = outcome
    except ISCSIError:
        return
    raise AssertionError("the login neither ended nor failed after 60 exchanges")


# --------------------------------------------------------------------------------------------
# Over TCP: garbage from the target ends in a typed error, with no traceback and no hang


class Tracebacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR:
            self.records.append(record)


def _config(**kw: Any) -> SessionConfig:
    base: dict[str, Any] = dict(initiator_name=INI, isid=0x800000001234, login_timeout=0.3,
                                replacement_timeout=0.3, noop_interval=0.1, noop_timeout=0.1,
                                negotiation={"DefaultTime2Wait": "0"})
    base.update(kw)
    return SessionConfig(**base)


async def _against_garbage(garbage: bytes, when: str, every: bool) -> str:
    loop = asyncio.get_running_loop()
    loop_errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, ctx: loop_errors.append(ctx))
    sent: list[bool] = []

    def at_login(req: P.LoginRequest, resp: P.LoginResponse) -> bytes | None:
        if every or not sent:
            sent.append(True)
            return garbage if when == "instead_of_login" else P.encode(resp) + garbage
        return None

    def at_command(conn: Any, pdu: P.PDU) -> bool:
        if isinstance(pdu, P.ScsiCommand) and (every or not sent):
            sent.append(True)
            conn.inject_bytes(garbage)
            return True
        return False

    hostile = Hostility(login_hook=at_login if when != "after_command" else None,
                        pdu_hook=at_command if when == "after_command" else None)
    target = FakeTarget([TargetNode(TGT, {0: RamDisk(64)})],
                        settings=NegotiationSettings.rfc_defaults(default_time2wait=0),
                        hostile=hostile)
    server = FakeTargetServer(target)
    await server.start()
    session = Session(server.portal, TGT, _config())
    try:
        try:
            await asyncio.wait_for(session.login(), 5)
        except ISCSIError:
            return "login failed"
        buf = bytearray(512)
        try:
            result = await asyncio.wait_for(
                session.execute(0, cdb_read10(0, 1), data_in=[memoryview(buf)]), 5)
        except ISCSIError:
            return "command failed"
        assert isinstance(result, CommandResult)
        return "command completed"
    finally:
        await asyncio.wait_for(session.close(), 5)
        await server.stop()
        assert not loop_errors, loop_errors


@settings(max_examples=12, deadline=None, derandomize=True)
@given(garbage=st.binary(min_size=1, max_size=200) | st.builds(
    lambda op, rest: bytes([op]) + rest, st.sampled_from([0x21, 0x25, 0x31, 0x3F, 0x1F]),
    st.binary(min_size=47, max_size=120)),
    when=st.sampled_from(["instead_of_login", "after_login", "after_command"]))
def test_session_over_tcp_facing_garbage(garbage: bytes, when: str) -> None:
    handler = Tracebacks()
    logging.getLogger().addHandler(handler)
    try:
        outcome = asyncio.run(asyncio.wait_for(_against_garbage(garbage, when, False), 20))
    finally:
        logging.getLogger().removeHandler(handler)
    assert outcome in ("login failed", "command failed", "command completed")
    assert not handler.records, [r.getMessage() for r in handler.records]


def test_session_over_tcp_facing_garbage_on_every_connection() -> None:
    handler = Tracebacks()
    logging.getLogger().addHandler(handler)
    try:
        # Garbage riding with the last Login Response breaks the login itself.
        for when, expected in (("after_login", "login failed"),
                               ("after_command", "command failed")):
            outcome = asyncio.run(asyncio.wait_for(
                _against_garbage(bytes([0x1F]) + bytes(47), when, True), 20))
            assert outcome == expected, when
    finally:
        logging.getLogger().removeHandler(handler)
    assert not handler.records, [r.getMessage() for r in handler.records]
