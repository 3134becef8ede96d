"""The counters' building blocks: histograms and quantiles (initiator.stats), login failure
reasons, the session's counters on a sans-I/O connection, the ring's classes and statuses
(tcmu_handler.stats), and that the connection core still keeps few attributes."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from initiator import pdu as P
from initiator.errors import (
    AuthenticationError,
    ConnectionFailed,
    DigestError,
    NegotiationError,
    RemoteProtocolError,
)
from initiator.login import LoginAuthorizationError, LoginError, Portal, TargetNotFoundError
from initiator.scsi import SenseKey, build_fixed_sense
from initiator.session import ConnectionCore, Task, TransferParameters
from initiator.stats import (
    LATENCY_BUCKETS,
    Histogram,
    SessionStats,
    login_failure_reason,
    quantile,
)
from initiator.transport import Session, SessionConfig
from tcmu_handler.stats import OPERATION_BASE, OPERATIONS, Arrival, RingStats
from tests.support.fake_target import FakeTarget, FakeTargetServer, Hostility
from tests.support.targets import free_tcp_port


def test_histogram_buckets_are_prometheus_le() -> None:
    h = Histogram((0.001, 0.01, 0.1))
    for value in (0.0, 0.001, 0.0010001, 0.01, 0.5):
        h.observe(value)
    h.observe(0.05, 3)
    assert h.counts == [2, 2, 3, 1]  # <= 1 ms, <= 10 ms, <= 100 ms, above
    assert h.count == 8 and h.sum == pytest.approx(0.0120001 + 0.5 + 0.15)
    assert h.cumulative() == [2, 4, 7, 8]
    with pytest.raises(ValueError, match="increasing"):
        Histogram((0.1, 0.01))


def test_latency_buckets() -> None:
    assert LATENCY_BUCKETS[0] == 1e-5 and LATENCY_BUCKETS[-1] == 60.0
    assert list(LATENCY_BUCKETS) == sorted(set(LATENCY_BUCKETS))
    steps = [b / a for a, b in itertools.pairwise(LATENCY_BUCKETS)]
    assert max(steps) <= 2.0 and 0.003 in LATENCY_BUCKETS and 0.005 in LATENCY_BUCKETS


def test_quantile_interpolates_inside_the_bucket() -> None:
    bounds = (1.0, 2.0, 4.0)
    assert quantile(0.5, bounds, [0, 0, 0, 0]) is None
    assert quantile(0.5, bounds, [0, 10, 0, 0]) == pytest.approx(1.5)
    assert quantile(0.99, bounds, [90, 0, 10, 0]) == pytest.approx(2.0 + 2.0 * 0.9)
    assert quantile(0.25, bounds, [10, 10, 10, 10]) == pytest.approx(1.0)
    assert quantile(0.99, bounds, [0, 0, 0, 5]) == 4.0  # in the overflow: the highest bound
    assert quantile(0.0, bounds, [0, 3, 0, 0]) == pytest.approx(1.0)


@pytest.mark.parametrize(("error", "reason"), [
    (AuthenticationError("bad CHAP answer"), "authentication"),
    (LoginAuthorizationError("no", status_class=2, status_detail=2), "authorization"),
    (TargetNotFoundError("gone", status_class=2, status_detail=3), "target_not_found"),
    (LoginError("busy", status_class=3, status_detail=1), "target_error"),
    (LoginError("moved", status_class=1, status_detail=1), "redirect"),
    (LoginError("odd", status_class=2, status_detail=9), "initiator_error"),
    (NegotiationError("MaxBurstLength"), "negotiation"),
    (ConnectionFailed("refused"), "connection"),
    (RemoteProtocolError("garbage"), "protocol"),
    (RuntimeError("a bug"), "internal"),
])
def test_login_failure_reasons(error: BaseException, reason: str) -> None:
    assert login_failure_reason(error) == reason
    stats = SessionStats()
    stats.login_failed(error)
    stats.login_failed(error)
    assert stats.login_failures == {reason: 2} and stats.last_error == str(error)


def test_connection_losses_count_digest_errors_by_kind() -> None:
    stats = SessionStats()
    stats.connection_lost(DigestError("header", header=True))
    stats.connection_lost(DigestError("data", header=False))
    stats.connection_lost(DigestError("data", header=False))
    stats.connection_lost(ConnectionFailed("reset by peer"))
    assert stats.connections_lost == 4
    assert stats.digest_errors == {"header": 1, "data": 2}
    assert stats.last_error == "reset by peer"


def core(max_cmd_sn: int) -> ConnectionCore:
    return ConnectionCore(TransferParameters(), cmd_sn=1, exp_stat_sn=1, exp_cmd_sn=1,
                          max_cmd_sn=max_cmd_sn, target="t", noop_interval=0.0)


def nop_in(itt: int, stat_sn: int, max_cmd_sn: int) -> P.NopIn:
    return P.NopIn(itt=itt, ttt=P.RESERVED_TAG, stat_sn=stat_sn, exp_cmd_sn=1,
                   max_cmd_sn=max_cmd_sn)


def test_the_core_counts_window_closes_and_ping_round_trips() -> None:
    c = core(max_cmd_sn=2)
    done: list[object] = []
    tasks = [Task(0, bytes(6), None, None, done.append) for _ in range(4)]
    for task in tasks[:2]:
        c.submit(task)   # CmdSN 1 and 2: inside the window
    assert c.counters.window_closed == 0
    c.submit(tasks[2])   # CmdSN 3 > MaxCmdSN 2: waits, the window closed
    c.submit(tasks[3])   # still closed: not counted again
    assert c.counters.window_closed == 1
    c.sent(sum(len(b) for b in c.send_buffers()))
    c.ping(10.0)
    ping_itt = max(c._controls)
    c.receive_pdu(nop_in(ping_itt, 1, 4), now=10.25)  # also opens the window
    assert c.counters.nop_rtt.count == 1
    assert c.counters.nop_rtt.sum == pytest.approx(0.25)
    assert c.counters.nop_rtt.counts[LATENCY_BUCKETS.index(0.3)] == 1
    assert c.counters.window_closed == 1


def test_ring_classes_by_opcode_and_direction() -> None:
    assert [OPERATIONS[OPERATION_BASE[op] // 3] for op in (0x28, 0x88, 0x08, 0xA8)] == \
        ["read"] * 4
    assert [OPERATIONS[OPERATION_BASE[op] // 3] for op in (0x2A, 0x8A, 0x0A, 0xAA, 0x2E)] == \
        ["write"] * 5
    assert [OPERATIONS[OPERATION_BASE[op] // 3] for op in (0x00, 0x12, 0x35, 0x42, 0x93)] == \
        ["other"] * 5


def test_ring_stats_record_arrivals_in_bulk() -> None:
    stats = RingStats()
    read, write = Arrival(10.0, 0), Arrival(10.0, 4)
    read.done, read.nbytes = 3, 3 * 4096
    write.done, write.nbytes = 1, 65536
    stats.record([read, write], 10.0025)
    assert (read.done, read.nbytes) == (0, 0)  # ready for the next completions
    assert stats.commands(0) == 3 and stats.commands(1) == 1 and stats.commands(2) == 0
    assert stats.direction_bytes(0) == 3 * 4096 and stats.direction_bytes(1) == 65536
    latency = stats.operation_latency(0)
    assert latency.count == 3 and latency.counts[LATENCY_BUCKETS.index(0.003)] == 3
    assert latency.sum == pytest.approx(0.0075)


def test_ring_stats_statuses_and_sense_keys() -> None:
    stats = RingStats()
    stats.status(0x02, build_fixed_sense(SenseKey.MEDIUM_ERROR, 0x11, 0x00))
    descriptor = bytes([0x72, SenseKey.UNIT_ATTENTION, 0x29, 0x00, 0, 0, 0, 0])
    stats.status(0x02, descriptor)
    stats.status(0x08, None)   # BUSY: no sense
    stats.status(0x02, b"\x70")  # too short to hold a key: the status still counts
    assert stats.statuses == {0x02: 3, 0x08: 1}
    assert stats.sense_keys == {SenseKey.MEDIUM_ERROR: 1, SenseKey.UNIT_ATTENTION: 1}


async def test_sessions_count_login_failures_of_the_first_login() -> None:
    refused = Session(Portal("127.0.0.1", free_tcp_port()), "iqn.2003-01.org.example:nobody",
                      SessionConfig(login_timeout=2.0))
    with pytest.raises(ConnectionFailed):
        await refused.login()
    assert refused.counters.login_failures == {"connection": 1}
    target = FakeTarget(hostile=Hostility(login_status=(2, 0x02)))
    async with FakeTargetServer(target) as server:
        denied = Session(server.portal, target.node.name, SessionConfig(login_timeout=5.0))
        with pytest.raises(LoginAuthorizationError):
            await asyncio.wait_for(denied.login(), 10)
    assert denied.counters.login_failures == {"authorization": 1}
