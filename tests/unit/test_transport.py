"""initiator.transport.Session end to end against the fake target on a real loopback port.

Login, commands (64 in flight), digests, redirects, target pings and events, recovery after a
dropped connection (reinstatement: same ISID, TSIH 0, in-flight commands re-issued), the
replacement timeout, the async logout request, task management and logout. Timeouts are kept
small through SessionConfig; every wait is bounded so a regression fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import random
import re
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

import pytest
from scapy.utils import RawPcapReader

from initiator import pdu as P
from initiator.chap import ChapAccount, ChapCredentials, Secret
from initiator.command import CommandResult
from initiator.errors import (
    CommandTimeout,
    ConfigurationError,
    ConnectionFailed,
    ISCSIError,
    PDUFormatError,
    SessionFailed,
    TaskAborted,
)
from initiator.keys import NegotiationSettings
from initiator.login import LoginAuthenticationError, LoginError, Portal, TargetNotFoundError
from initiator.session import ConnectionCore, EventKind
from initiator.transport import (
    Connection,
    Session,
    SessionConfig,
    SessionState,
    default_initiator_name,
)
from tests.support.fake_target import (
    FakeTarget,
    FakeTargetServer,
    Hostility,
    RamDisk,
    TargetNode,
    cdb_inquiry,
    cdb_read10,
    cdb_read_capacity10,
    cdb_test_unit_ready,
    cdb_write10,
    sense_key_asc,
)

INI = "iqn.2024-01.org.example:initiator"
TGT = "iqn.2003-01.org.example:disk1"
ISID = 0x80_00_5A_5A_00_00
T = TypeVar("T")


def config(**kw: Any) -> SessionConfig:
    base: dict[str, Any] = dict(
        initiator_name=INI, isid=ISID, login_timeout=2.0, replacement_timeout=5.0,
        noop_interval=0.0, noop_timeout=1.0, negotiation={"DefaultTime2Wait": "0"})
    base.update(kw)
    return SessionConfig(**base)


def fake(**kw: Any) -> FakeTarget:
    settings = kw.pop("settings", None) or NegotiationSettings.rfc_defaults(default_time2wait=0)
    nodes = kw.pop("nodes", None) or [TargetNode(TGT, {0: RamDisk(blocks=8192)})]
    target = FakeTarget(nodes, settings=settings, **kw)
    target.disk.fill_pattern()
    return target


@asynccontextmanager
async def serve(target: FakeTarget) -> AsyncIterator[FakeTargetServer]:
    server = FakeTargetServer(target)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@asynccontextmanager
async def logged_in(target: FakeTarget, **cfg: Any) -> AsyncIterator[
        tuple[FakeTargetServer, Session]]:
    async with serve(target) as server:
        session = Session(server.portal, TGT, config(**cfg))
        await within(session.login())
        try:
            yield server, session
        finally:
            await within(session.close())


async def within(aw: Awaitable[T], seconds: float = 10.0) -> T:
    return await asyncio.wait_for(aw, seconds)


async def until(cond: Callable[[], bool]) -> None:
    while not cond():
        await asyncio.sleep(0.001)


def state(session: Session) -> SessionState:
    """The session's state, read afresh (mypy would keep an earlier narrowing across awaits)."""
    return session.state


def queued(core: ConnectionCore) -> bool:
    """PDUs wait in the send queue (read afresh, as state() does)."""
    return core.wants_to_send


def pattern(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


async def read(session: Session, lba: int, blocks: int) -> tuple[CommandResult, bytearray]:
    buf = bytearray(blocks * 512)
    result = await within(session.execute(0, cdb_read10(lba, blocks),
                                          data_in=[memoryview(buf)]))
    return result, buf


async def write(session: Session, lba: int, data: bytes) -> CommandResult:
    return await within(session.execute(0, cdb_write10(lba, len(data) // 512),
                                        data_out=[memoryview(bytearray(data))]))


# --------------------------------------------------------------------------------------------
# Login, commands, logout


async def test_login_commands_and_logout() -> None:
    target = fake()
    async with serve(target) as server:
        states: list[SessionState] = []
        session = Session(server.portal, TGT, config())
        session.on_state = states.append
        await within(session.login())
        assert state(session) is SessionState.LOGGED_IN
        assert session.tsih == target.logins[0].tsih != 0
        assert target.logins[0].isid == ISID
        inq = bytearray(36)
        result = await within(session.execute(0, cdb_inquiry(allocation_length=36),
                                              data_in=[memoryview(inq)]))
        assert result.ok and inq[8:12] == b"FAKE"
        cap = bytearray(8)
        await within(session.execute(0, cdb_read_capacity10(), data_in=[memoryview(cap)]))
        assert int.from_bytes(cap[:4], "big") == 8191
        assert (await within(session.execute(0, cdb_test_unit_ready()))).ok
        data = pattern(8192, 1)
        assert (await write(session, 100, data)).ok
        result, buf = await read(session, 100, 16)
        assert result.ok and buf == data
        stats = session.stats()
        assert stats["commands"] == 5 and stats["in_flight"] == 0
        await within(session.logout())
        assert state(session) is SessionState.CLOSED
        assert any(isinstance(p, P.LogoutRequest) for p in target.connections[0].received)
        assert states == [SessionState.LOGGING_IN, SessionState.LOGGED_IN,
                          SessionState.LOGGING_OUT, SessionState.CLOSED]
        with pytest.raises(SessionFailed, match="closed"):
            await within(session.execute(0, cdb_test_unit_ready()))
        await within(session.logout())   # a second logout is harmless
    assert not target.violations(), target.violations()


async def test_context_manager_logs_in_and_out() -> None:
    target = fake()
    async with serve(target) as server:
        async with Session(server.portal, TGT, config()) as session:
            assert state(session) is SessionState.LOGGED_IN
        assert state(session) is SessionState.CLOSED
    assert any(isinstance(p, P.LogoutRequest) for p in target.connections[0].received)


async def test_check_condition_reaches_the_caller() -> None:
    target = fake()
    async with logged_in(target) as (_, session):
        result, _ = await read(session, 8191, 2)
        assert result.status == 2 and sense_key_asc(result.sense) == (5, 0x21, 0)


async def test_64_commands_in_flight() -> None:
    target = fake(cmd_window=64, hostile=Hostility(withhold=True))
    async with logged_in(target) as (server, session):
        writes = [pattern(4096, i) for i in range(32)]
        reads = [bytearray(4096) for _ in range(32)]
        futures = [asyncio.ensure_future(session.execute(
            0, cdb_write10(1000 + 8 * i, 8), data_out=[memoryview(bytearray(d))]))
            for i, d in enumerate(writes)]
        futures += [asyncio.ensure_future(session.execute(
            0, cdb_read10(8 * i, 8), data_in=[memoryview(b)])) for i, b in enumerate(reads)]
        conn = server.connections[-1]
        await server.wait_for(lambda: len(conn.held) == 64)
        assert session.in_flight == 64
        target.hostile.withhold = False
        conn.release()
        results = await within(asyncio.gather(*futures))
        assert all(r.ok for r in results)
        for i, d in enumerate(writes):
            assert target.disk.data[(1000 + 8 * i) * 512 : (1008 + 8 * i) * 512] == d
        for i, b in enumerate(reads):
            assert b == target.disk.data[8 * i * 512 : (8 * i + 8) * 512]
    assert not target.violations(), target.violations()


async def test_commands_submitted_under_hold_go_out_at_release() -> None:
    # Session.hold_sends(): submitted commands wait, with no flush of their own on the next
    # loop iteration, until release_sends() sends them at once (the TCMU dispatcher holds
    # each scan).
    target = fake()
    async with logged_in(target) as (_server, session):
        core = session._core
        assert core is not None
        session.hold_sends()
        bufs = [bytearray(4096) for _ in range(4)]
        futures = [asyncio.ensure_future(session.execute(
            0, cdb_read10(8 * i, 8), data_in=[memoryview(b)])) for i, b in enumerate(bufs)]
        for _ in range(3):
            await asyncio.sleep(0)  # the commands are submitted; a kick() would flush them
        assert core.in_flight == 4 and queued(core)
        session.release_sends()
        assert not queued(core)  # on the wire, from release_sends() itself
        results = await within(asyncio.gather(*futures))
        assert all(r.ok for r in results)
        for i, b in enumerate(bufs):
            assert b == target.disk.data[8 * i * 512 : (8 * i + 8) * 512]
        # A flush already scheduled is left to send them: hold_sends() takes nothing over.
        later = asyncio.ensure_future(session.execute(0, cdb_read10(0, 8),
                                                      data_in=[memoryview(bytearray(4096))]))
        await asyncio.sleep(0)  # submitted: kick() scheduled its flush
        session.hold_sends()
        session.release_sends()
        assert queued(core)
        assert (await within(later)).ok


async def test_after_receive_runs_when_the_read_that_completed_a_command_ends() -> None:
    async with logged_in(fake()) as (_server, session):
        order: list[str] = []
        assert session.after_receive(lambda: order.append("never")) is False  # no read

        def on_done(result: CommandResult | ISCSIError) -> None:
            order.append(f"done {isinstance(result, CommandResult) and result.ok}")
            taken = session.after_receive(lambda: order.append("after"))
            order.append(f"taken {taken}")

        def failing() -> None:
            raise RuntimeError("a callback's own bug")

        def on_done_failing(_result: CommandResult | ISCSIError) -> None:
            session.after_receive(failing)

        # In one read or two: a callback that fails must not stop the others or end the
        # connection.
        bufs = [bytearray(4096), bytearray(4096)]
        session.submit(0, cdb_read10(0, 8), data_in=[memoryview(bufs[0])],
                       on_done=on_done_failing)
        session.submit(0, cdb_read10(8, 8), data_in=[memoryview(bufs[1])], on_done=on_done)
        await within(until(lambda: "after" in order))
        assert order == ["done True", "taken True", "after"]
        assert state(session) is SessionState.LOGGED_IN
        assert (await read(session, 0, 8))[0].ok


async def test_full_feature_reads_resubmit_without_another_loop_iteration() -> None:
    # In the Full Feature Phase the connection reads in its own reader callback, not through
    # asyncio's transport; commands that completions resubmit during a read go out in the
    # flush after it, scheduling none of their own (kick() is not called for them).
    target = fake(cmd_window=64, hostile=Hostility(withhold=True))
    async with logged_in(target) as (server, session):
        conn = session._conn
        assert conn is not None and conn._transport is not None
        assert not conn._transport.is_reading()
        kicks = 0
        kick = conn.kick

        def counting_kick() -> None:
            nonlocal kicks
            kicks += 1
            kick()

        conn.kick = counting_kick  # type: ignore[method-assign]
        size = 64 * 1024   # payloads of the reader's stream mode: received in place
        bufs = [bytearray(size) for _ in range(8)]
        again = [bytearray(size) for _ in range(8)]
        seconds: list[asyncio.Future[CommandResult]] = []
        loop = asyncio.get_running_loop()

        def resubmit(i: int) -> Callable[[CommandResult | ISCSIError], None]:
            def done(result: CommandResult | ISCSIError) -> None:
                assert isinstance(result, CommandResult) and result.ok
                fut: asyncio.Future[CommandResult] = loop.create_future()
                seconds.append(fut)
                session.submit(0, cdb_read10(1024 + i * 128, 128),
                               data_in=[memoryview(again[i])],
                               on_done=lambda r: fut.set_result(r)
                               if isinstance(r, CommandResult) else fut.set_exception(r))
            return done

        for i in range(8):
            session.submit(0, cdb_read10(i * 128, 128), data_in=[memoryview(bufs[i])],
                           on_done=resubmit(i))
        wire = server.connections[-1]
        await server.wait_for(lambda: len(wire.held) == 8)
        kicks = 0   # the first eight were submitted from outside a read
        target.hostile.withhold = False
        wire.release()
        await within(until(lambda: len(seconds) == 8))
        assert kicks == 0
        assert all(r.ok for r in await within(asyncio.gather(*seconds)))
        for i in range(8):
            assert bufs[i] == target.disk.data[i * size : (i + 1) * size]
            assert again[i] == target.disk.data[(8 + i) * size : (9 + i) * size]
    assert not target.violations(), target.violations()



async def test_window_smaller_than_the_load() -> None:
    target = fake(cmd_window=3)
    async with logged_in(target) as (_, session):
        results = await within(asyncio.gather(*(read(session, i, 1) for i in range(40))))
        assert all(r.ok for r, _ in results)
    assert not target.violations(), target.violations()


@pytest.mark.parametrize("collapse", [True, False])
async def test_digests_and_large_transfers(collapse: bool) -> None:
    settings = NegotiationSettings.rfc_defaults(
        default_time2wait=0, header_digest=("CRC32C",), data_digest=("CRC32C",),
        max_recv_data_segment_length=4096, max_burst_length=16384, first_burst_length=8192,
        max_outstanding_r2t=2)
    target = fake(settings=settings, phase_collapse=collapse)
    async with logged_in(target, header_digest="CRC32C", data_digest="CRC32C",
                         negotiation={"DefaultTime2Wait": "0", "MaxOutstandingR2T": "2",
                                      "MaxRecvDataSegmentLength": "8192",
                                      "InitialR2T": "No"}) as (_, session):
        params = session.parameters
        assert params is not None and params.header_digest and params.data_digest
        assert params.max_xmit_data_segment_length == 4096
        data = pattern(256 * 1024, 7)
        assert (await write(session, 0, data)).ok
        result, buf = await read(session, 0, 512)
        assert result.ok and buf == data
    assert not target.violations(), target.violations()


async def test_pdu_pipelined_with_the_final_login_response_uses_the_digests() -> None:
    # The target sends a NOP-In ping in the same write as the final Login Response, framed
    # with the header digest just negotiated: parsed with the login's settings (no digests)
    # it would leave every later PDU 4 bytes out of step.
    settings = NegotiationSettings.rfc_defaults(default_time2wait=0, header_digest=("CRC32C",),
                                                data_digest=("CRC32C",))
    target = fake(settings=settings, hostile=Hostility(ping_with_final_login_response=True))
    async with logged_in(target, header_digest="CRC32C", data_digest="CRC32C") as (
            server, session):
        conn = server.connections[-1]
        await server.wait_for(lambda: len(conn.ping_answers) == 1)
        result, buf = await read(session, 2, 4)
        assert result.ok and buf == target.disk.data[2 * 512 : 6 * 512]
        assert session.reconnects == 0 and len(target.logins) == 1
    assert not target.violations(), target.violations()


async def test_target_ping_is_answered() -> None:
    target = fake()
    async with logged_in(target) as (server, session):
        conn = server.connections[-1]
        ttt = conn.send_ping(b"hello")
        await server.wait_for(lambda: conn.ping_answers == [ttt])
        rtt = await within(session.ping(b"xyz"))
        assert rtt >= 0


async def test_scsi_async_event_is_reported() -> None:
    target = fake()
    events: list[Any] = []
    async with logged_in(target) as (server, session):
        session.on_event = events.append
        sense = bytes.fromhex("700006000000000a000000003f0e0000")
        server.connections[-1].send_async(P.AsyncEvent.SCSI_ASYNC_EVENT, sense=sense)
        await server.wait_for(lambda: bool(events))
        assert events[0].kind is EventKind.SCSI_EVENT and events[0].sense == sense
        assert session.events[-1] == events[0]


async def test_renegotiation_request_restates_max_recv_data_segment_length() -> None:
    target = fake()
    async with logged_in(target) as (server, session):
        conn = server.connections[-1]
        conn.send_async(P.AsyncEvent.NEGOTIATION_REQUEST, parameter3=10)
        await server.wait_for(lambda: any(isinstance(p, P.TextRequest) for p in conn.received))
        text = next(p for p in conn.received if isinstance(p, P.TextRequest))
        assert bytes(text.data).startswith(b"MaxRecvDataSegmentLength=")
        assert (await read(session, 0, 1))[0].ok
    assert not target.violations(), target.violations()


async def test_abort_task_and_lun_reset() -> None:
    target = fake(hostile=Hostility(withhold=True))
    async with logged_in(target) as (server, session):
        results: list[CommandResult | ISCSIError] = []
        tasks = [session.submit(0, cdb_read10(i, 1), data_in=[memoryview(bytearray(512))],
                                on_done=results.append) for i in range(3)]
        conn = server.connections[-1]
        await server.wait_for(lambda: len(conn.held) == 3)
        response = await within(session.abort_task(tasks[0]))
        assert response.response == P.TMResponse.COMPLETE
        assert isinstance(results[0], TaskAborted)
        response = await within(session.lun_reset(0))
        assert response.response == P.TMResponse.COMPLETE
        assert len(results) == 3 and all(isinstance(r, TaskAborted) for r in results)
        assert not conn.held


# --------------------------------------------------------------------------------------------
# Login failures and redirects


async def test_wrong_chap_secret() -> None:
    account = ChapAccount("ini-user", Secret("initiator-secret-1"))
    target = fake(chap=ChapCredentials(account))
    async with serve(target) as server:
        wrong = ChapCredentials(ChapAccount("ini-user", Secret("wrong-secret-123")))
        session = Session(server.portal, TGT, config(credentials=wrong))
        with pytest.raises(LoginAuthenticationError, match="chapSecret"):
            await within(session.login())
        assert state(session) is SessionState.CLOSED
        good = Session(server.portal, TGT, config(credentials=ChapCredentials(account)))
        await within(good.login())
        assert (await read(good, 0, 1))[0].ok
        await within(good.logout())


async def test_unknown_target() -> None:
    target = fake()
    async with serve(target) as server:
        session = Session(server.portal, "iqn.2003-01.org.example:nope", config())
        with pytest.raises(TargetNotFoundError, match="nope"):
            await within(session.login())


async def test_nothing_listening() -> None:
    server = FakeTargetServer(fake())
    await server.start()
    portal = server.portal
    await server.stop()
    session = Session(portal, TGT, config())
    with pytest.raises(ConnectionFailed, match=r"cannot connect to iSCSI portal 127\.0\.0\.1"):
        await within(session.login())


async def test_target_that_never_answers_the_login() -> None:
    target = fake(hostile=Hostility(login_hook=lambda req, resp: b""))
    async with serve(target) as server:
        session = Session(server.portal, TGT, config(login_timeout=0.2))
        with pytest.raises(ConnectionFailed, match=r"did not complete within the login "
                                                   r"timeout of 0\.2 s \(0 login exchange.*"
                                                   r"check that the target is up"):
            await within(session.login())


async def test_login_flood_is_bounded_by_the_total_login_timeout() -> None:
    # Every Login Response comes at once and never moves the login on (T=0 forever): each
    # exchange is quick, so only a bound over all of them ends it, at the time it names.
    target = fake(hostile=Hostility(hold_transit=1 << 60))
    async with serve(target) as server:
        session = Session(server.portal, TGT, config(login_timeout=0.4))
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(ConnectionFailed, match=r"within the login timeout of 0\.4 s") as info:
            await within(session.login())
        elapsed = loop.time() - start
        assert 0.4 <= elapsed < 2.0, elapsed
        exchanges = re.search(r"\((\d+) login exchange", str(info.value))
        assert exchanges is not None and int(exchanges.group(1)) > 10
        # It answered thousands of times: "check that the target is up" would mislead.
        assert str(info.value).endswith("the target answered without completing the login; "
                                        "check the target's logs and its login settings")
        assert state(session) is SessionState.CLOSED


async def test_login_timeout_covers_redirects_too() -> None:
    # The front redirects to a target that accepts the connection and never answers: the
    # whole login, redirect included, ends at the login timeout, not one timeout per portal.
    silent = fake(hostile=Hostility(login_hook=lambda req, resp: b""))
    async with serve(silent) as destination:
        front = fake(hostile=Hostility(redirect=(f"127.0.0.1:{destination.port}", False)))
        async with serve(front) as server:
            session = Session(server.portal, TGT, config(login_timeout=0.4))
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(ConnectionFailed, match=r"0\.4 s \(1 login exchange\(s\) and "
                                                       r"1 redirect\(s\)\); check that the "
                                                       r"target is up"):
                await within(session.login())
            assert loop.time() - start < 1.5


@pytest.mark.parametrize("host", ["a..b", "x" * 70 + ".example", "x\0y"])
async def test_a_host_name_resolution_cannot_encode_is_a_connection_error(host: str) -> None:
    with pytest.raises(ConnectionFailed, match="cannot resolve"):
        await within(Connection.open(Portal(host, 3260), 1.0))


async def test_an_ip_address_is_connected_without_the_resolver_thread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A reconnect to "127.0.0.1" must not wait for asyncio's resolver thread (on a faulty
    # link it reconnects after every Time2Wait); a name still goes through the resolver.
    resolved: list[str] = []
    loop = asyncio.get_running_loop()
    resolver = loop.getaddrinfo

    async def counting(host: Any, *args: Any, **kw: Any) -> Any:
        resolved.append(host)
        return await resolver(host, *args, **kw)

    monkeypatch.setattr(loop, "getaddrinfo", counting)
    async with serve(fake()) as server:
        conn = await within(Connection.open(Portal("127.0.0.1", server.port), 1.0))
        conn.close()
        assert resolved == []
        conn = await within(Connection.open(Portal("localhost", server.port), 1.0))
        conn.close()
        assert resolved == ["localhost"]


async def test_redirect_to_garbage_fails_the_login_clearly() -> None:
    target = fake(hostile=Hostility(redirect=("a..b", False)))
    async with serve(target) as server:
        session = Session(server.portal, TGT, config())
        with pytest.raises(LoginError, match=r"redirected the login to 'a\.\.b', which is not "
                                             "a portal address"):
            await within(session.login())
        assert state(session) is SessionState.CLOSED


@pytest.mark.parametrize("permanent", [False, True])
async def test_redirect(permanent: bool) -> None:
    real = fake()
    async with serve(real) as destination:
        front = fake(hostile=Hostility(redirect=(f"127.0.0.1:{destination.port},1",
                                                 permanent)))
        async with serve(front) as server:
            session = Session(server.portal, TGT, config())
            await within(session.login())
            assert state(session) is SessionState.LOGGED_IN
            assert real.successful_logins() and not front.successful_logins()
            expected = Portal("127.0.0.1", destination.port, 1) if permanent else server.portal
            assert session.portal == expected
            assert (await read(session, 0, 1))[0].ok
            await within(session.logout())


async def test_redirect_loop_gives_up() -> None:
    target = fake()
    async with serve(target) as server:
        target.hostile.redirect = (f"127.0.0.1:{server.port}", False)
        session = Session(server.portal, TGT, config())
        with pytest.raises(ConnectionFailed, match="redirected the login more than"):
            await within(session.login())


# --------------------------------------------------------------------------------------------
# Recovery


async def test_recovery_after_a_dropped_connection() -> None:
    target = fake(hostile=Hostility(withhold=True))
    async with logged_in(target) as (server, session):
        writes = {2000 + 16 * i: pattern(8192, 100 + i) for i in range(6)}
        reads = {16 * i: bytearray(8192) for i in range(6)}
        futures = [asyncio.ensure_future(session.execute(
            0, cdb_write10(lba, 16), data_out=[memoryview(bytearray(d))]))
            for lba, d in writes.items()]
        futures += [asyncio.ensure_future(session.execute(
            0, cdb_read10(lba, 16), data_in=[memoryview(b)])) for lba, b in reads.items()]
        first = server.connections[-1]
        await server.wait_for(lambda: len(first.held) == 12)
        target.hostile.withhold = False
        server.drop()
        results = await within(asyncio.gather(*futures))
        assert all(r.ok for r in results)
        for lba, d in writes.items():
            assert target.disk.data[lba * 512 : lba * 512 + 8192] == d
        for lba, b in reads.items():
            assert b == target.disk.data[lba * 512 : lba * 512 + 8192]
        logins = target.successful_logins()
        assert len(logins) == 2
        # Session reinstatement (§6.3.5): the same ISID, and TSIH 0 to ask for a new session.
        assert logins[1].isid == logins[0].isid == ISID
        assert logins[1].tsih_requested == 0
        assert session.tsih == logins[1].tsih
        assert session.reconnects == 1 and state(session) is SessionState.LOGGED_IN
    assert not target.violations(), target.violations()


async def reissue_after_a_drop(server: FakeTargetServer, session: Session, count: int) -> None:
    """``count`` reads, the first held by the target (``withhold``, a login window of one),
    then the connection dropped: all are re-issued on the next one and must succeed."""
    futures = [asyncio.ensure_future(read(session, i, 1)) for i in range(count)]
    await server.wait_for(lambda: len(server.connections[-1].held) == 1)
    server.target.hostile.withhold = False
    server.drop()
    results = await within(asyncio.gather(*futures))
    assert all(r.ok for r, _ in results)
    assert session.reconnects == 1


async def test_reissue_asks_for_the_real_window_first() -> None:
    # Like LIO, the target announces a window of one command in the Login Response. The
    # re-issued commands wait for an immediate NOP-Out's answer, which shows the real window,
    # and then go out together; none is sent outside the window.
    target = fake(hostile=Hostility(withhold=True), login_window=1)
    async with logged_in(target) as (server, session):
        await reissue_after_a_drop(server, session, 6)
        second = server.connections[-1]
        ffp = [p for p in second.received if not isinstance(p, P.LoginRequest)]
        assert isinstance(ffp[0], P.NopOut) and ffp[0].immediate
        assert [type(p) for p in ffp[1:7]] == [P.ScsiCommand] * 6
    assert not target.violations(), target.violations()


async def test_reissue_is_on_the_wire_before_the_state_is_told() -> None:
    # The state's watchers (the daemon's journal, paths, metrics) are slow under load: the
    # re-issued commands are handed to the socket before they run, and when the commands
    # wait for the window (a ping's answer), the watchers wait for them.
    target = fake(hostile=Hostility(withhold=True), login_window=1)
    async with logged_in(target) as (server, session):
        # When told: (commands sent on the new connection, whether any is left to send).
        when_told: list[tuple[int, bool]] = []

        def told(new: SessionState) -> None:
            if new is SessionState.LOGGED_IN:
                core = session._core
                assert core is not None
                when_told.append((core.stats_commands, core.wants_to_send))

        session.on_state = told
        await reissue_after_a_drop(server, session, 3)
        assert when_told == [(3, False)]


async def test_a_login_that_fails_before_its_commands_are_out_is_not_told() -> None:
    # The connection breaks while the re-issued commands wait for the ping's answer: the
    # watchers hear of no login on it, only that the session recovers.
    target = fake(hostile=Hostility(withhold=True), login_window=1)
    async with logged_in(target, negotiation={"DefaultTime2Wait": "0"}) as (server, session):
        states: list[SessionState] = []
        session.on_state = states.append
        future = asyncio.ensure_future(read(session, 0, 1))
        await server.wait_for(lambda: len(server.connections[-1].held) == 1)
        def drop_at_a_ping(conn: Any, pdu: P.PDU) -> bool:
            if not isinstance(pdu, P.NopOut):
                return False
            conn.drop()   # the window ping of every new connection: it breaks
            return True

        target.hostile.pdu_hook = drop_at_a_ping
        second = asyncio.ensure_future(read(session, 1, 1))
        server.drop()
        await server.wait_for(lambda: len(server.connections) >= 3)
        assert SessionState.LOGGED_IN not in states
        target.hostile.pdu_hook = None
        target.hostile.withhold = False
        results = await within(asyncio.gather(future, second))
        assert all(r.ok for r, _ in results)
        assert states[-1] is SessionState.LOGGED_IN


async def test_connection_dropped_by_the_target_mid_command() -> None:
    # The target drops only the first connection: the reconnect re-issues the commands at
    # once, and a test that switched the drop off after seeing it could be too late (it was,
    # under load: two reconnects).
    target = fake(hostile=Hostility(drop_after_commands=3, drop_connections=1))
    async with logged_in(target) as (server, session):
        first = asyncio.gather(*(read(session, i, 1) for i in range(5)))
        results = await within(first)
        assert server.connections[0].dropped
        assert all(r.ok for r, _ in results)
        assert session.reconnects == 1


async def test_commands_submitted_during_recovery_wait_for_it() -> None:
    target = fake()
    async with logged_in(target, negotiation={"DefaultTime2Wait": "0"}) as (server, session):
        server.accepting = False
        server.drop()
        await server.wait_for(lambda: state(session) is SessionState.RECOVERING)
        pending = asyncio.ensure_future(read(session, 3, 1))
        await asyncio.sleep(0.05)
        assert not pending.done() and session.in_flight == 1
        server.accepting = True
        result, buf = await within(pending)
        assert result.ok and buf == target.disk.data[3 * 512 : 4 * 512]


async def test_reconnect_broken_by_pdus_riding_on_the_login_response() -> None:
    # The final Login Response arrives together with a PDU that breaks the new connection
    # at once: the pending commands must survive for the next attempt.
    target = fake(hostile=Hostility(withhold=True))
    async with logged_in(target) as (server, session):
        future = asyncio.ensure_future(read(session, 7, 1))
        await server.wait_for(lambda: len(server.connections[-1].held) == 1)
        fired: list[bool] = []

        def hook(req: P.LoginRequest, resp: P.LoginResponse) -> bytes | None:
            if resp.transit and resp.nsg == P.Stage.FULL_FEATURE and not fired:
                fired.append(True)
                bogus = P.ScsiResponse(itt=0x4242, stat_sn=resp.stat_sn + 1,
                                       exp_cmd_sn=resp.exp_cmd_sn, max_cmd_sn=resp.max_cmd_sn)
                return P.encode(resp) + P.encode(bogus)
            return None

        target.hostile.withhold = False
        target.hostile.login_hook = hook
        server.drop()
        result, buf = await within(future)
        assert fired and result.ok and buf == target.disk.data[7 * 512 : 8 * 512]
        assert len(target.successful_logins()) == 3
        assert state(session) is SessionState.LOGGED_IN


async def test_target_restart() -> None:
    target = fake()
    async with logged_in(target) as (server, session):
        data = pattern(4096, 3)
        assert (await write(session, 40, data)).ok
        await server.restart()
        result, buf = await read(session, 40, 8)
        assert result.ok and buf == data
        assert session.reconnects == 1 and server.portal.port == session.portal.port


async def test_the_reinstated_line_counts_the_login_attempts(
        caplog: pytest.LogCaptureFixture) -> None:
    # The count is the one the "reconnect attempt N failed" lines before it use: the login
    # that succeeded reset the policy's count, and the line said "after 0 attempt(s)".
    caplog.set_level(logging.INFO, "initiator.recovery")
    target = fake()
    async with logged_in(target) as (server, session):
        server.accepting = False
        server.drop()
        await within(until(lambda: "reconnect attempt 1 failed" in caplog.text))
        server.accepting = True
        result, _ = await read(session, 0, 1)
        assert result.ok and session.reconnects == 1
    assert "session reinstated after 2 attempt(s)" in caplog.text, caplog.text


async def test_reconnect_attempts_are_numbered_over_the_whole_outage(
        caplog: pytest.LogCaptureFixture) -> None:
    """A reconnect that logged in but completed nothing does not end the outage, and the
    give-up message counts its attempts from its start: the "reconnect attempt N failed"
    lines restarted from 1 after it. One count per outage, reset when a command completes."""
    caplog.set_level(logging.INFO, "initiator.recovery")
    target = fake(hostile=Hostility(withhold=True))
    async with logged_in(target, replacement_timeout=60.0) as (server, session):
        future = asyncio.ensure_future(read(session, 7, 1))
        await server.wait_for(lambda: len(server.connections[-1].held) == 1)
        server.accepting = False
        server.drop()
        await within(until(lambda: "reconnect attempt 1 failed" in caplog.text))
        # Attempt 2 logs in; the command it re-issues is held, and the connection breaks.
        server.accepting = True
        await within(until(lambda: "session reinstated after 2 attempt(s)" in caplog.text))
        await server.wait_for(lambda: len(server.connections[-1].held) == 1)
        server.accepting = False
        server.drop()
        await within(until(lambda: "reconnect attempt 3 failed" in caplog.text), 20)
        assert caplog.text.count("reconnect attempt 1 failed") == 1, caplog.text
        target.hostile.withhold = False
        server.accepting = True
        result, _ = await within(future, 20)
        assert result.ok and "session reinstated after 4 attempt(s)" in caplog.text
        # Working again: the next outage counts from 1.
        server.accepting = False
        server.drop()
        await within(until(lambda: caplog.text.count("reconnect attempt 1 failed") == 2), 20)
        server.accepting = True
        assert (await within(read(session, 0, 1), 20))[0].ok


async def test_replacement_timeout_fails_the_commands() -> None:
    target = fake(hostile=Hostility(withhold=True))
    async with serve(target) as server:
        session = Session(server.portal, TGT, config(replacement_timeout=0.3))
        await within(session.login())
        futures = [asyncio.ensure_future(read(session, i, 1)) for i in range(3)]
        await server.wait_for(lambda: len(server.connections[-1].held) == 3)
        await server.stop()
        for future in futures:
            with pytest.raises(SessionFailed) as info:
                await within(future)
            text = str(info.value)
            assert "replacement timeout of 0.3 s" in text and TGT in text
        assert state(session) is SessionState.FAILED
        with pytest.raises(SessionFailed, match="replacement timeout"):
            await within(read(session, 0, 1))
        await within(session.close())


@contextmanager
def dropped_portal(port: int) -> Iterator[None]:
    """127.0.0.1:``port`` answers no SYN, as behind a firewall that drops: a listener with a
    backlog of 0 whose one slot is taken (Linux drops SYNs to a full accept queue)."""
    with socket.socket() as listener, socket.socket() as filler:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(0)
        filler.connect(("127.0.0.1", port))
        yield


@pytest.mark.parametrize("forever", [False, True], ids=["one-shot", "daemon"])
async def test_give_up_at_the_deadline_while_a_login_attempt_hangs(forever: bool) -> None:
    # The portal drops our SYNs: a login attempt would run its whole login timeout (30 s
    # here). The replacement deadline (0.5 s) must fail the commands when it comes, not when
    # the attempt ends; the daemon's attempt goes on.
    target = fake(hostile=Hostility(withhold=True))
    async with serve(target) as server:
        session = Session(server.portal, TGT, config(
            replacement_timeout=0.5, login_timeout=30.0, reconnect_forever=forever))
        await within(session.login())
        future = asyncio.ensure_future(read(session, 0, 1))
        await server.wait_for(lambda: len(server.connections[-1].held) == 1)
        await server.stop_listening()
        with dropped_portal(server.port):
            await server.stop()   # the portal drops SYNs before the reconnect can come
            with pytest.raises(SessionFailed, match=r"replacement timeout of 0\.5 s") as info:
                await within(future, 10.0)
            assert "a login attempt was still under way" in str(info.value)
            assert state(session) is SessionState.FAILED
            assert (session._attempt is not None) == forever
            with pytest.raises(SessionFailed, match="replacement timeout"):
                await within(read(session, 0, 1))
            await within(session.close())


async def test_commands_fail_at_the_deadline_while_a_login_hangs_on_a_silent_portal() -> None:
    """A path whose portal goes silent (a pulled cable: the reconnect's login waits for its
    whole login timeout) still fails its commands at the replacement deadline, and with
    ``reconnect_forever`` serves again once the target answers (multipath fast-fail)."""
    target = fake(hostile=Hostility(withhold=True))
    async with serve(target) as server:
        session = Session(server.portal, TGT, config(
            replacement_timeout=0.3, login_timeout=30.0, reconnect_forever=True,
            max_reconnect_interval=0.2))
        await within(session.login())
        assert session.recovery.max_backoff == 0.2
        future = asyncio.ensure_future(read(session, 0, 1))
        await server.wait_for(lambda: len(server.connections[-1].held) == 1)
        accepted: list[asyncio.StreamWriter] = []

        async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)    # accept, never answer

        # The silent portal listens before the connection drops: a reconnect may come at once.
        await server.stop_listening()
        quiet = await asyncio.start_server(silent, server.host, server.port)
        await server.stop()
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(SessionFailed, match=r"replacement timeout of 0\.3 s"):
                await within(future, 5.0)
            assert loop.time() - started < 5.0   # not after the 30 s login timeout
            assert accepted, "no reconnect attempt reached the silent portal"
            assert state(session) is SessionState.FAILED
            assert session.recovery.outage_since is not None and session.recovery.cause
        finally:
            quiet.close()
            for writer in accepted:
                writer.close()
            await quiet.wait_closed()
        target.hostile.withhold = False
        await server.start()
        await server.wait_for(lambda: state(session) is SessionState.LOGGED_IN, 10.0)
        result, _buf = await read(session, 0, 1)
        assert result.ok
        await within(session.close())


async def test_target_failing_right_after_every_login_ends_in_session_failed() -> None:
    # Each reconnect logs in fine and then breaks at once: the commands must still fail
    # when the replacement timeout has passed, not be re-issued forever.
    target = fake(hostile=Hostility(withhold=True))
    async with serve(target) as server:
        session = Session(server.portal, TGT, config(replacement_timeout=0.5))
        await within(session.login())
        future = asyncio.ensure_future(read(session, 0, 1))
        await server.wait_for(lambda: len(server.connections[-1].held) == 1)

        def break_it(conn: Any, pdu: P.PDU) -> bool:
            if isinstance(pdu, P.ScsiCommand):
                conn.inject_bytes(bytes([0x1F]) + bytes(47))   # an opcode no target sends
                return True
            return False

        target.hostile.withhold = False
        target.hostile.pdu_hook = break_it
        server.drop()
        with pytest.raises(SessionFailed, match="replacement timeout"):
            await within(future, 5.0)
        assert len(target.successful_logins()) >= 2
        await within(session.close())


@pytest.mark.parametrize("keeps_connection", [False, True])
async def test_data_digest_reject_of_a_write_sends_it_again_on_a_new_connection(
        keeps_connection: bool) -> None:
    # A bit flipped in a write's immediate data: the target rejects the command with
    # DATA_DIGEST_ERROR and discards it (RFC 7143 §7.8); LIO closes the connection too. The
    # write is not failed back to the caller: the session is reinstated and the write sent
    # again, and it lands exactly once with the right data.
    target = fake()
    async with logged_in(target) as (_server, session):
        rejected: list[int] = []

        def reject_first_write(conn: Any, pdu: P.PDU) -> bool:
            if isinstance(pdu, P.ScsiCommand) and pdu.cdb[0] == 0x2A and not rejected:
                rejected.append(pdu.itt)
                conn.send_reject(P.RejectReason.DATA_DIGEST_ERROR, P.encode(pdu)[:48])
                if not keeps_connection:
                    conn.drop()
                return True
            return False

        target.hostile.pdu_hook = reject_first_write
        data = pattern(4096, 17)
        result = await write(session, 64, data)
        assert result.ok and rejected
        assert target.disk.data[64 * 512 : 72 * 512] == data
        assert session.reconnects == 1 and state(session) is SessionState.LOGGED_IN


async def test_async_logout_request_logs_in_again() -> None:
    target = fake(logout_time2wait=0)
    async with logged_in(target) as (server, session):
        conn = server.connections[-1]
        conn.send_async(P.AsyncEvent.LOGOUT_REQUEST, parameter3=5)
        await server.wait_for(lambda: len(target.successful_logins()) == 2)
        assert any(isinstance(p, P.LogoutRequest) for p in conn.received)
        await server.wait_for(lambda: state(session) is SessionState.LOGGED_IN)
        assert (await read(session, 0, 1))[0].ok
        assert target.logins[1].isid == ISID and target.logins[1].tsih_requested == 0
    assert not target.violations(), target.violations()


async def test_relogin_after_a_requested_logout_waits_time2wait() -> None:
    target = fake(logout_time2wait=1)
    async with logged_in(target) as (server, session):
        loop = asyncio.get_running_loop()
        conn = server.connections[-1]
        # When the target got the Logout Request (it answers at once): the Time2Wait of 1 s
        # runs from its answer. Noted by a hook, not by polling, which on a busy machine
        # notices it late and would shorten the wait measured.
        asked: list[float] = []

        def note(c: Any, pdu: P.PDU) -> bool:
            if isinstance(pdu, P.LogoutRequest) and not asked:
                asked.append(loop.time())
            return False

        target.hostile.pdu_hook = note
        conn.send_async(P.AsyncEvent.LOGOUT_REQUEST, parameter3=5)
        await server.wait_for(lambda: len(target.successful_logins()) == 2)
        assert asked and loop.time() - asked[0] >= 0.95
        await server.wait_for(lambda: state(session) is SessionState.LOGGED_IN)
        assert (await read(session, 0, 1))[0].ok
    assert not target.violations(), target.violations()


async def test_commands_submitted_while_logging_out_on_request_are_reissued() -> None:
    target = fake(logout_time2wait=0)
    async with logged_in(target) as (server, session):
        conn = server.connections[-1]
        # Hold the Logout Request unanswered so commands arrive while it is outstanding.
        held: list[P.PDU] = []

        def hook(c: Any, pdu: P.PDU) -> bool:
            if isinstance(pdu, P.LogoutRequest) and not held:
                held.append(pdu)
                return True
            return False

        target.hostile.pdu_hook = hook
        conn.send_async(P.AsyncEvent.LOGOUT_REQUEST, parameter3=5)
        await server.wait_for(lambda: bool(held))
        target.hostile.pdu_hook = None
        pending = asyncio.ensure_future(read(session, 5, 1))
        await asyncio.sleep(0.01)
        server.drop()
        result, buf = await within(pending)
        assert result.ok and buf == target.disk.data[5 * 512 : 6 * 512]


async def test_async_connection_drop_reconnects() -> None:
    target = fake()
    async with logged_in(target) as (server, session):
        server.connections[-1].send_async(P.AsyncEvent.CONNECTION_DROP, parameter2=0)
        await server.wait_for(lambda: len(target.successful_logins()) == 2)
        await server.wait_for(lambda: state(session) is SessionState.LOGGED_IN)
        assert (await read(session, 0, 1))[0].ok


async def test_nop_timeout_reconnects() -> None:
    target = fake()
    async with logged_in(target, noop_interval=0.05, noop_timeout=0.1) as (server, session):
        target.hostile.silent = True
        await server.wait_for(lambda: state(session) is SessionState.RECOVERING, 3.0)
        target.hostile.silent = False
        await server.wait_for(lambda: state(session) is SessionState.LOGGED_IN, 3.0)
        # At least once: on a busy machine the loop can miss a 0.1 s ping deadline on the new
        # connection too (seen under stress-ng), which reconnects once more, rightly.
        assert session.reconnects >= 1
        assert (await read(session, 0, 1))[0].ok


async def test_garbage_from_the_target_in_full_feature_phase_is_recovered(
        caplog: pytest.LogCaptureFixture) -> None:
    target = fake()
    async with logged_in(target) as (server, session):
        server.connections[-1].inject_bytes(bytes(range(256)))
        await server.wait_for(lambda: len(target.successful_logins()) == 2)
        await server.wait_for(lambda: state(session) is SessionState.LOGGED_IN)
        assert (await read(session, 1, 1))[0].ok
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


async def test_abort_of_a_command_waiting_for_recovery() -> None:
    target = fake()
    async with logged_in(target) as (server, session):
        server.accepting = False
        server.drop()
        await server.wait_for(lambda: state(session) is SessionState.RECOVERING)
        results: list[Any] = []
        task = session.submit(0, cdb_read10(0, 1), data_in=[memoryview(bytearray(512))],
                              on_done=results.append)
        response = await within(session.abort_task(task))
        assert response.response == P.TMResponse.COMPLETE
        assert isinstance(results[0], TaskAborted)
        server.accepting = True


async def test_close_fails_outstanding_commands() -> None:
    target = fake(hostile=Hostility(withhold=True))
    async with serve(target) as server:
        session = Session(server.portal, TGT, config())
        await within(session.login())
        future = asyncio.ensure_future(read(session, 0, 1))
        await server.wait_for(lambda: len(server.connections[-1].held) == 1)
        await within(session.close())
        with pytest.raises(SessionFailed, match="closed"):
            await within(future)


async def test_logout_with_a_command_that_never_completes() -> None:
    target = fake(hostile=Hostility(withhold=True))
    async with serve(target) as server:
        session = Session(server.portal, TGT, config())
        await within(session.login())
        future = asyncio.ensure_future(read(session, 0, 1))
        await server.wait_for(lambda: len(server.connections[-1].held) == 1)
        await within(session.logout(timeout=0.2))
        assert state(session) is SessionState.CLOSED
        with pytest.raises(SessionFailed, match="closed"):
            await within(future)


# --------------------------------------------------------------------------------------------
# Hostile targets: every wait has a bound, every failure one clear error (issue 10). Each test
# sets short timeouts and checks that the failure comes within them.


async def elapsed_while(aw: Awaitable[T]) -> tuple[float, T]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    result = await within(aw)
    return loop.time() - start, result


async def failure(aw: Awaitable[Any]) -> tuple[float, BaseException]:
    """How long ``aw`` took to fail, and with what."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        await within(aw)
    except ISCSIError as exc:
        return loop.time() - start, exc
    raise AssertionError("expected a failure")


@asynccontextmanager
async def one_read_held(target: FakeTarget, **cfg: Any) -> AsyncIterator[
        tuple[FakeTargetServer, Session, asyncio.Future[tuple[CommandResult, bytearray]]]]:
    """A logged-in session with one READ in flight that the target holds unanswered."""
    target.hostile.withhold = True
    async with serve(target) as server:
        session = Session(server.portal, TGT, config(**cfg))
        await within(session.login())
        pending = asyncio.ensure_future(read(session, 0, 1))
        await server.wait_for(lambda: len(server.connections[-1].held) == 1)
        try:
            yield server, session, pending
        finally:
            await within(session.close())


async def test_command_the_target_never_answers_is_aborted_at_its_deadline() -> None:
    target = fake(hostile=Hostility(withhold=True))
    async with logged_in(target, command_timeout=0.3, tmf_timeout=0.3) as (server, session):
        took, error = await failure(read(session, 1, 1))
        assert isinstance(error, CommandTimeout), error
        assert "command timeout of 0.3 s" in str(error) and TGT in str(error)
        assert 0.3 <= took < 1.5, took
        conn = server.connections[-1]
        aborts = [p for p in conn.received if isinstance(p, P.TaskMgmtRequest)]
        assert [p.function for p in aborts] == [P.TMFunction.ABORT_TASK]
        # The session goes on: the abort ended the command, not the connection.
        target.hostile.withhold = False
        assert (await read(session, 2, 1))[0].ok
        assert session.reconnects == 0
    assert not target.violations(), target.violations()


async def test_target_ignoring_task_management_gets_a_new_connection() -> None:
    # ABORT TASK unanswered, then LOGICAL UNIT RESET unanswered: the connection is dropped,
    # the session reinstated, the stuck command fails (not re-issued) and others go on.
    target = fake(hostile=Hostility(withhold=True))

    def ignore_tmfs(conn: Any, pdu: P.PDU) -> bool:
        return isinstance(pdu, P.TaskMgmtRequest) and conn.index == 0

    target.hostile.pdu_hook = ignore_tmfs
    async with logged_in(target, command_timeout=0.3, tmf_timeout=0.2) as (server, session):
        took, error = await failure(read(session, 1, 1))
        assert isinstance(error, CommandTimeout) and 0.7 <= took < 2.5, (took, error)
        functions = [p.function for p in server.connections[0].received
                     if isinstance(p, P.TaskMgmtRequest)]
        assert functions == [P.TMFunction.ABORT_TASK, P.TMFunction.LOGICAL_UNIT_RESET]
        target.hostile.withhold = False
        assert (await read(session, 2, 1))[0].ok
        assert session.reconnects == 1 and len(target.successful_logins()) == 2
        assert not [p for p in server.connections[1].received
                    if isinstance(p, P.ScsiCommand) and p.cdb[:6] == cdb_read10(1, 1)[:6]]


async def test_target_answering_pings_but_breaking_after_every_command_is_given_up() -> None:
    # The livelock of issue 10 item 3: each connection answers the NOP ping, then drops as
    # soon as a command arrives. The outage clock is not reset by pongs: the command fails
    # at the replacement timeout, after a bounded number of reconnects.
    target = fake(hostile=Hostility(drop_after_commands=1))
    async with serve(target) as server:
        session = Session(server.portal, TGT, config(
            replacement_timeout=0.6, noop_interval=0.05, noop_timeout=0.5))
        await within(session.login())
        await within(session.ping())
        took, error = await failure(read(session, 0, 1))
        assert isinstance(error, SessionFailed) and "replacement timeout of 0.6 s" in str(error)
        assert took < 2.0, took
        assert 2 <= len(target.successful_logins()) <= 4, len(target.successful_logins())
        assert state(session) is SessionState.FAILED
        await within(session.close())


async def time_to_recovering(server: FakeTargetServer, session: Session,
                             emit: Callable[[], object], period: float) -> float:
    """Call ``emit`` (the target sending something) every ``period`` seconds until the
    session gives its connection up; returns how long that took."""
    done = asyncio.Event()

    async def keep_emitting() -> None:
        while not done.is_set() and state(session) is SessionState.LOGGED_IN:
            emit()
            await asyncio.sleep(period)

    emitting = asyncio.ensure_future(keep_emitting())
    try:
        took, _ = await elapsed_while(server.wait_for(
            lambda: state(session) is SessionState.RECOVERING, 3.0))
    finally:
        done.set()
        await emitting
    return took


async def test_byte_trickle_does_not_keep_a_dead_connection_alive() -> None:
    # After login the target answers nothing and sends one byte every 20 ms, never a whole
    # PDU: the keepalive ping goes unanswered with no progress, and the connection dies.
    target = fake()
    async with logged_in(target, noop_interval=0.1, noop_timeout=0.2) as (server, session):
        conn = server.connections[-1]
        target.hostile.silent = True
        took = await time_to_recovering(server, session, lambda: conn.inject_bytes(b"\x00"),
                                        0.02)
        assert took < 1.5, took
        target.hostile.silent = False
        await server.wait_for(lambda: state(session) is SessionState.LOGGED_IN, 3.0)
        assert (await read(session, 0, 1))[0].ok


async def test_storm_of_target_pings_is_no_sign_of_life() -> None:
    # The target answers nothing of ours but pings us all the time (we answer each): its
    # own NOP-Ins are no progress on our commands, so our keepalive still declares it dead.
    target = fake()
    async with logged_in(target, noop_interval=0.1, noop_timeout=0.2) as (server, session):
        conn = server.connections[-1]

        def only_pings(c: Any, pdu: P.PDU) -> bool:
            return not (isinstance(pdu, P.NopOut) and pdu.ttt != P.RESERVED_TAG)

        target.hostile.pdu_hook = only_pings
        took = await time_to_recovering(server, session, conn.send_ping, 0.005)
        assert took < 1.5 and len(conn.ping_answers) > 10, (took, len(conn.ping_answers))


async def test_command_window_that_never_opens_is_bounded() -> None:
    # Every login grants a closed window (MaxCmdSN = ExpCmdSN - 1) and nothing opens it:
    # the command waits command_timeout per connection, and fails at the replacement timeout.
    target = fake(cmd_window=0)
    async with serve(target) as server:
        session = Session(server.portal, TGT, config(command_timeout=0.15,
                                                     replacement_timeout=0.5))
        await within(session.login())
        took, error = await failure(read(session, 0, 1))
        assert isinstance(error, SessionFailed) and "replacement timeout" in str(error)
        assert took < 2.0, took
        assert not any(isinstance(p, P.ScsiCommand) for c in server.connections
                       for p in c.received), "a command was sent outside the window"
        await within(session.close())


async def test_shrinking_window_leaves_no_command_waiting_forever() -> None:
    # The target announces a smaller MaxCmdSN (ignored, RFC 7143 §4.2.2.1) and then drops
    # the commands beyond it silently: their deadline ends them.
    target = fake(cmd_window=8)
    async with logged_in(target, command_timeout=0.3, tmf_timeout=0.3) as (server, session):
        conn = server.connections[-1]
        conn.set_window(1)

        def drop_commands(c: Any, pdu: P.PDU) -> bool:
            return isinstance(pdu, P.ScsiCommand)

        target.hostile.pdu_hook = drop_commands
        results = await within(asyncio.gather(*(read(session, i, 1) for i in range(3)),
                                              return_exceptions=True), 5.0)
        assert all(isinstance(r, CommandTimeout) for r in results), results
        assert session.reconnects == 0


@pytest.mark.parametrize("via", ["async", "logout"])
async def test_time2wait_of_an_hour_is_capped_by_the_replacement_timeout(via: str) -> None:
    target = fake(logout_time2wait=3600)
    async with one_read_held(target, replacement_timeout=0.4) as (server, _, pending):
        conn = server.connections[-1]
        if via == "async":
            conn.send_async(P.AsyncEvent.CONNECTION_DROP, parameter2=3600)
        else:
            conn.send_async(P.AsyncEvent.LOGOUT_REQUEST, parameter3=5)
        took, error = await failure(pending)
        assert isinstance(error, SessionFailed) and "Time2Wait" in str(error), error
        assert took < 2.0, took
        assert len(target.logins) == 1      # no login before the target's Time2Wait


async def test_redirect_to_garbage_on_reconnect_fails_the_session_clearly() -> None:
    # Issue 10 item 1: on a reconnect, a redirect to a host name that cannot be encoded
    # killed the recovery task and the session stayed "recovering" with commands pending.
    target = fake()
    async with one_read_held(target, replacement_timeout=0.5) as (server, session, pending):
        target.hostile.redirect = ("a..b", False)
        server.drop()
        took, error = await failure(pending)
        assert isinstance(error, SessionFailed), error
        assert "not a portal address" in str(error) and "a..b" in str(error)
        assert took < 2.0 and state(session) is SessionState.FAILED


async def test_redirect_loop_on_reconnect_is_bounded() -> None:
    target = fake()
    async with one_read_held(target, replacement_timeout=0.5) as (server, _, pending):
        target.hostile.redirect = (f"127.0.0.1:{server.port}", False)
        server.drop()
        took, error = await failure(pending)
        assert isinstance(error, SessionFailed) and "redirected the login more than" in \
            str(error), error
        assert took < 2.0


class _Boom(BaseException):
    """Not an Exception: what no except clause of the recovery expects."""


@pytest.mark.parametrize("exc", [RuntimeError("resolver exploded"), _Boom("boom")])
async def test_recovery_never_dies_silently(monkeypatch: pytest.MonkeyPatch,
                                            exc: BaseException) -> None:
    target = fake()
    async with one_read_held(target, replacement_timeout=0.4) as (server, session, pending):

        async def explode() -> None:
            raise exc

        monkeypatch.setattr(session, "_connect_and_login", explode)
        server.drop()
        took, error = await failure(pending)
        assert isinstance(error, SessionFailed), error
        assert type(exc).__name__ in str(error) and str(exc) in str(error)
        assert took < 2.0 and state(session) is SessionState.FAILED


async def test_text_request_never_answered_is_bounded() -> None:
    target = fake()
    async with logged_in(target, command_timeout=0.3) as (_, session):
        target.hostile.silent = True
        took, error = await failure(session.text(b"SendTargets=All\0"))
        assert isinstance(error, CommandTimeout) and "Text Request" in str(error)
        assert took < 1.5


async def test_logout_the_target_never_answers_is_bounded() -> None:
    target = fake()
    async with serve(target) as server:
        session = Session(server.portal, TGT, config(logout_timeout=0.3))
        await within(session.login())
        target.hostile.silent = True
        took, _ = await elapsed_while(session.logout())
        assert took < 1.5 and state(session) is SessionState.CLOSED


async def test_kernel_abort_escalates_like_a_deadline() -> None:
    # Session.abort (what the daemon's SessionExecutor uses for the kernel's ABORT TASK):
    # a refused abort goes on to LUN RESET; the call returns once the command is ended.
    target = fake(hostile=Hostility(withhold=True))
    async with logged_in(target, tmf_timeout=0.5) as (server, session):
        results: list[CommandResult | ISCSIError] = []
        task = session.submit(0, cdb_read10(0, 1), data_in=[memoryview(bytearray(512))],
                              on_done=results.append)
        conn = server.connections[-1]
        await server.wait_for(lambda: len(conn.held) == 1)
        conn.tmf_responses[P.TMFunction.ABORT_TASK] = P.TMResponse.REJECTED
        await within(session.abort(task))
        assert len(results) == 1 and isinstance(results[0], TaskAborted)
        functions = [p.function for p in conn.received if isinstance(p, P.TaskMgmtRequest)]
        assert functions == [P.TMFunction.ABORT_TASK, P.TMFunction.LOGICAL_UNIT_RESET]
        assert session.reconnects == 0


async def test_a_portal_that_hangs_up_on_the_login_says_what_to_check() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(48)  # the Login Request's header, then nothing in return
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for target in (TGT, None):  # a normal login, and discovery's
            session = Session(Portal("127.0.0.1", port), target, config(),
                              discovery=target is None)
            with pytest.raises(ConnectionFailed) as info:
                await asyncio.wait_for(session.login(), 5)
            message = str(info.value)
            assert "closed the connection during the login, without a Login Response" in message
            assert f"127.0.0.1:{port} is an iSCSI portal" in message and INI in message
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nServer: x\r\n\r\n",
    b"SSH-2.0-OpenSSH_9.2p1\r\n",
])
async def test_another_service_on_the_port_fails_the_login_at_once(answer: bytes) -> None:
    # Not at the login timeout (15 s by default, beyond within()'s bound): at its first byte.
    async def other_service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answer)
        await reader.read()  # and keep the connection open
        writer.close()

    server = await asyncio.start_server(other_service, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for target in (TGT, None):
            session = Session(Portal("127.0.0.1", port), target, config(),
                              discovery=target is None)
            with pytest.raises(PDUFormatError) as info:
                await within(session.login())
            message = str(info.value)
            assert message.startswith(f"login to {target or 'discovery'} at 127.0.0.1:{port}: "
                                      "unknown PDU opcode"), message
            assert repr(answer[:20])[:-1] in message and "is it an iSCSI target?" in message
    finally:
        server.close()
        await server.wait_closed()


# ---------------------------------------------------------------------------------------------
# The default initiator name: open-iscsi's file, checked


def test_default_initiator_name_reads_open_iscsis_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "initiatorname.iscsi"
    path.write_text("## written by iscsi-iname\nInitiatorName=iqn.1993-08.org.debian:01:abc\n")
    assert default_initiator_name(str(path)) == "iqn.1993-08.org.debian:01:abc"
    assert default_initiator_name(str(tmp_path / "absent")).startswith(
        "iqn.2026-11.org.iscsi-hba:")


@pytest.mark.parametrize(("content", "message"), [
    (b"InitiatorName=iqn.1993-08.org.debian:01:\xff\n", "is not UTF-8 text"),
    (b"InitiatorName=my host\x1b[2J\n", r"InitiatorName in .* 'my host\\x1b\[2J' contains ' '"),
])
def test_an_unusable_initiator_name_file_is_named(tmp_path: pathlib.Path, content: bytes,
                                                   message: str) -> None:
    path = tmp_path / "initiatorname.iscsi"
    path.write_bytes(content)
    with pytest.raises(ConfigurationError, match=message) as info:
        default_initiator_name(str(path))
    assert str(path) in str(info.value) and "--initiator-name" in str(info.value)


async def _recorded_reconnect(pcap: pathlib.Path, check: Callable[[], bool | str]) -> None:
    """A session recorded into ``pcap`` whose first connection the target drops: its
    commands complete on the second; ``check()`` holds before the session closes."""
    target = fake(hostile=Hostility(drop_after_commands=3, drop_connections=1))
    async with serve(target) as server:
        session = Session(server.portal, TGT, config(), pcap_path=str(pcap))
        await within(session.login())
        try:
            results = await within(asyncio.gather(*(read(session, i, 1) for i in range(5))))
            assert all(r.ok for r, _ in results) and session.reconnects == 1
            assert check() is True, check()
        finally:
            await within(session.close())


def _flows(capture: pathlib.Path) -> list[int]:
    """The initiator ports of the SYNs in a pcap of IPv4 packets (LINKTYPE_RAW), in order."""
    ports = []
    for packet, _meta in RawPcapReader(str(capture)):
        tcp = packet[(packet[0] & 0x0F) * 4:]
        if tcp[13] == 0x02:   # SYN alone: the initiator opening a connection
            ports.append(int.from_bytes(tcp[0:2], "big"))
    return ports


async def test_a_pcap_fifo_keeps_one_capture_across_a_reconnect(tmp_path: pathlib.Path) -> None:
    # `--pcap FIFO` (tshark reading it) with a recovery: the second connection's capture went
    # to a regular file named FIFO.2.pcap beside it, and the FIFO's reader saw the end of the
    # stream when the first connection's recorder closed. Both connections are now flows of
    # the one capture, which ends when the session closes.

    (tmp_path / "out").mkdir()
    fifo = tmp_path / "out" / "capture.pcap"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)   # the reader, there before the writer
    os.set_blocking(fd, True)
    chunks: list[bytes] = []
    ended = threading.Event()

    def reader() -> None:
        while True:
            data = os.read(fd, 1 << 16)
            if data:
                chunks.append(data)
            elif chunks:   # no writer left, after one came: the end of the stream
                break
            else:          # no writer yet
                ended.wait(0.005)
        ended.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        await _recorded_reconnect(fifo, lambda: not ended.is_set() or
                                  "the FIFO's reader saw its end before the session's")
        await within(asyncio.to_thread(thread.join, 10))
        assert ended.is_set()
    finally:
        os.close(fd)
    assert sorted(p.name for p in fifo.parent.iterdir()) == ["capture.pcap"]
    (tmp_path / "read.pcap").write_bytes(b"".join(chunks))
    ports = _flows(tmp_path / "read.pcap")
    assert len(ports) == 2 and ports[0] != ports[1], ports


async def test_a_pcap_file_gets_one_file_per_connection(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "capture.pcap"
    await _recorded_reconnect(path, lambda: True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["capture.2.pcap", "capture.pcap"]
    assert len(_flows(path)) == 1 and len(_flows(tmp_path / "capture.2.pcap")) == 1
