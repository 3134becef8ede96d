"""Every metric's value after scripted traffic: a daemon without a kernel whose disk is the
real dispatcher on the simulated ring (tests.support.ring_simulator) and a real session to the
fake target (tests.support.fake_target) on 127.0.0.1; counts exact, latencies in the buckets
a fake clock puts them in; read from :func:`hba.metrics.sample`, from the Prometheus text
(parsed with prometheus_client's own parser), over HTTP, and over DBus by ``hbactl top``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import http.client
import json
import os
import signal
import socket
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from hba import control, dbus_service, metrics, top
from hba.daemon import Daemon, DaemonOptions
from hba.disks import Disk, DiskPath, DiskState
from hba.errors import HBAError
from initiator.keys import NegotiationSettings
from initiator.stats import LATENCY_BUCKETS
from initiator.transport import Session
from tcmu_handler import ring
from tcmu_handler.dispatcher import Dispatcher
from tcmu_handler.executor import SessionExecutor
from tests.support import prometheus
from tests.support.fake_target import (
    CHECK_CONDITION,
    TEST_UNIT_READY,
    FakeTarget,
    FakeTargetServer,
    RamDisk,
    TargetNode,
    cdb_read10,
    cdb_read_capacity10,
    cdb_test_unit_ready,
    cdb_write10,
)
from tests.support.prometheus import value
from tests.support.ring_simulator import PAGE_SIZE, RingSimulator, SimCommand
from tests.support.targets import free_tcp_port
from tests.unit.test_control import system_bus  # noqa: F401  (a fixture)

IQN = "iqn.2003-01.org.example:metrics"
INITIATOR = "iqn.2003-01.org.example:metrics-host"
SYNCHRONIZE_CACHE_10 = bytes([0x35]) + bytes(9)


class Clock:
    """The dispatcher's clock, moved by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    daemon: Daemon
    server: FakeTargetServer
    target: FakeTarget
    session: Session
    sim: RingSimulator
    dispatcher: Dispatcher
    clock: Clock
    disk: Disk

    def submit(self, cdb: bytes, **kw: Any) -> SimCommand:
        return self.sim.submit(cdb, **kw)

    async def until(self, predicate: Any, timeout: float = 10.0) -> None:
        await self.server.wait_for(predicate, timeout)

    def sample(self) -> dict[str, Any]:
        return metrics.sample(self.daemon)

    def disk_row(self) -> dict[str, Any]:
        (row,) = self.sample()["disks"]
        return dict(row)

    def session_row(self) -> dict[str, Any]:
        (row,) = self.sample()["sessions"]
        return dict(row)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    settings = NegotiationSettings.rfc_defaults(default_time2wait=0, header_digest=("CRC32C",))
    target = FakeTarget([TargetNode(IQN, {0: RamDisk(blocks=4096)})], settings=settings)
    server = await FakeTargetServer(target).start()
    daemon = Daemon(DaemonOptions(initiator_name=INITIATOR, watch_uio=False))
    spec = daemon.specs.resolve(f"iscsi://127.0.0.1:{server.port}/{IQN}/0")
    spec = dataclasses.replace(spec, session=dataclasses.replace(
        spec.session, header_digest="CRC32C", noop_interval=0.0,
        negotiation={"DefaultTime2Wait": "0"}))
    path_spec = spec.path(spec.portal, 1)
    session = await daemon.sessions.acquire(path_spec)
    sim = RingSimulator(data_size=512 * PAGE_SIZE)
    clock = Clock(100.0)
    dispatcher = Dispatcher(sim.open(), SessionExecutor(session), lun=0, clock=clock)
    dispatcher.start()
    disk = Disk(spec=spec, paths=[DiskPath(spec=path_spec, session=session,
                                           backstore="hba-metrics", hba_index=0,
                                           dispatcher=dispatcher)],
                size=4096 * 512, state=DiskState.ATTACHED)
    daemon.disks[spec.name] = disk
    try:
        yield Rig(daemon, server, target, session, sim, dispatcher, clock, disk)
    finally:
        await dispatcher.close(timeout=5)
        await daemon.sessions.close()
        await server.stop()
        sim.close()


def bucket(seconds: float) -> int:
    """The index of the bucket a latency falls in (Prometheus' le: the first bound >= it)."""
    return next(i for i, bound in enumerate(LATENCY_BUCKETS) if seconds <= bound)


def per_bucket(index: int, n: int) -> list[int]:
    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    counts[index] = n
    return counts


async def scripted_traffic(r: Rig) -> list[SimCommand]:
    """The traffic every check below counts (see each phase)."""
    done: list[SimCommand] = []
    conn = r.server.connections[-1]

    # 1. Held by the target while the clock moves 4 ms: 4 reads of 4 KiB, 2 writes of 8 KiB,
    #    a READ CAPACITY (8 bytes in, "other") and a SYNCHRONIZE CACHE (no data, "other").
    r.target.hostile.withhold = True
    with r.sim.plug():
        for i in range(4):
            r.submit(cdb_read10(8 * i, 8), data_in=4096, on_complete=done.append)
        for i in range(2):
            r.submit(cdb_write10(64 + 16 * i, 16), data_out=bytes(8192),
                     on_complete=done.append)
        r.submit(cdb_read_capacity10(), data_in=8, on_complete=done.append)
        r.submit(SYNCHRONIZE_CACHE_10, on_complete=done.append)
    await r.until(lambda: len(conn.held) == 8)
    assert r.dispatcher.in_flight == 8
    row = r.disk_row()
    assert row["in_flight"] == 8 and row["operations"]["read"]["count"] == 0
    r.clock.now = 100.004
    conn.release()
    await r.until(lambda: len(done) == 8)

    # 2. TEST UNIT READY answered CHECK CONDITION, UNIT ATTENTION, at once (no clock move).
    r.target.hostile.withhold = False
    r.target.hostile.fail_first = 1
    r.target.hostile.fail_opcodes = frozenset({TEST_UNIT_READY})
    r.clock.now = 200.0
    r.submit(cdb_test_unit_ready(), on_complete=done.append)
    await r.until(lambda: len(done) == 9)

    # 3. The kernel aborts a held read (ABORT TASK), then resets the LUN for another.
    r.target.hostile.withhold = True
    r.clock.now = 300.0
    aborted = r.submit(cdb_read10(0, 8), data_in=4096, on_complete=done.append)
    await r.until(lambda: len(conn.held) == 1)
    r.sim.tmr(ring.TmrType.ABORT_TASK, [aborted])
    await r.until(lambda: len(done) == 10)
    reset = r.submit(cdb_read10(8, 8), data_in=4096, on_complete=done.append)
    await r.until(lambda: len(conn.held) == 1)
    r.sim.tmr(ring.TmrType.LUN_RESET, [reset])
    await r.until(lambda: len(done) == 11)
    r.target.hostile.withhold = False
    return done


async def test_every_disk_metric_after_scripted_traffic(rig: Rig) -> None:
    done = await scripted_traffic(rig)
    assert rig.sim.problems == []
    assert [c.status for c in done[:8]] == [0] * 8
    assert done[8].status == CHECK_CONDITION
    row = rig.disk_row()
    ops = row["operations"]
    # Counts: 6 reads (4 + the aborted + the reset one), 2 writes, 3 others (READ CAPACITY,
    # SYNCHRONIZE CACHE, TEST UNIT READY).
    assert {op: h["count"] for op, h in ops.items()} == {"read": 6, "write": 2, "other": 3}
    # Latency: phase 1 took 4 ms exactly (the 5 ms bucket); TEST UNIT READY 0 s (the first
    # bucket); the aborted and reset reads completed at the clock they were taken at.
    assert ops["read"]["counts"] == [a + b for a, b in zip(
        per_bucket(bucket(0.004), 4), per_bucket(0, 2), strict=True)]
    assert ops["write"]["counts"] == per_bucket(bucket(0.004), 2)
    assert ops["other"]["counts"] == [a + b for a, b in zip(
        per_bucket(bucket(0.004), 2), per_bucket(0, 1), strict=True)]
    assert ops["read"]["sum"] == pytest.approx(4 * 0.004)
    assert ops["write"]["sum"] == pytest.approx(2 * 0.004)
    assert ops["other"]["sum"] == pytest.approx(2 * 0.004)
    # Bytes: only what completed GOOD moved (the aborted and reset reads moved nothing).
    assert row["bytes"] == {"read": 4 * 4096 + 8, "write": 2 * 8192}
    assert row["statuses"] == {"check_condition": 3, "good": 8}
    # UNIT ATTENTION from the target; ABORTED COMMAND for the two ended by task management.
    assert row["sense_keys"] == {"unit_attention": 1, "aborted_command": 2}
    assert (row["tmr_requests"], row["aborts"], row["lun_resets"]) == (2, 1, 1)
    assert row["failed"] == 2 and row["in_flight"] == 0 and row["submitted"] == 11

    # The same through Prometheus' text format, parsed by prometheus_client itself.
    families = scrape(rig)
    name = row["name"]
    assert value(families, "iscsi_hba_disk_commands_total", disk=name, op="read") == 6
    assert value(families, "iscsi_hba_disk_commands_total", disk=name, op="other") == 3
    assert value(families, "iscsi_hba_disk_bytes_total", disk=name, direction="write") == 16384
    assert value(families, "iscsi_hba_disk_latency_seconds_bucket", disk=name, op="write",
                 le=repr(LATENCY_BUCKETS[bucket(0.004) - 1])) == 0
    assert value(families, "iscsi_hba_disk_latency_seconds_bucket", disk=name, op="write",
                 le=repr(LATENCY_BUCKETS[bucket(0.004)])) == 2
    assert value(families, "iscsi_hba_disk_latency_seconds_bucket", disk=name, op="read",
                 le="+Inf") == 6
    assert value(families, "iscsi_hba_disk_latency_seconds_count", disk=name, op="read") == 6
    assert value(families, "iscsi_hba_disk_latency_seconds_sum", disk=name,
                 op="write") == pytest.approx(0.008)
    assert value(families, "iscsi_hba_disk_queue_depth", disk=name) == 0
    assert value(families, "iscsi_hba_disk_aborts_total", disk=name) == 1
    assert value(families, "iscsi_hba_disk_lun_resets_total", disk=name) == 1
    assert value(families, "iscsi_hba_disk_task_management_requests_total", disk=name) == 2
    assert value(families, "iscsi_hba_disk_scsi_statuses_total", disk=name,
                 status="check_condition") == 3
    assert value(families, "iscsi_hba_disk_sense_keys_total", disk=name,
                 sense_key="unit_attention") == 1
    assert value(families, "iscsi_hba_disk_transport_failures_total", disk=name) == 2
    info = value(families, "iscsi_hba_disk_info", disk=name, target=IQN, lun="0")
    assert info == 1
    assert value(families, "iscsi_hba_disks", state="attached") == 1
    assert value(families, "iscsi_hba_retries_pending") == 0


async def test_every_session_metric(rig: Rig) -> None:
    session = rig.session
    row = rig.session_row()
    assert (row["state"], row["luns"], row["reinstatements"], row["connections_lost"]) == \
        ("logged in", 1, 0, 0)
    assert row["digest_errors"] == {"header": 0, "data": 0} and row["login_failures"] == {}

    # A ping: one round trip measured.
    await session.ping()
    assert rig.session_row()["nop_rtt"]["count"] == 1

    # The window: the target holds 32 commands, its whole window; the 33rd waits (the window
    # closed once) until they are answered.
    conn = rig.server.connections[-1]
    rig.target.hostile.withhold = True
    done: list[SimCommand] = []
    with rig.sim.plug():
        for i in range(33):
            rig.submit(cdb_read10(8 * i, 8), data_in=4096, on_complete=done.append)
    await rig.until(lambda: len(conn.held) == 32)
    row = rig.session_row()
    assert row["window_closed"] == 1 and row["window_free"] == 0 and row["window"] == 32
    assert row["max_cmd_sn"] == (row["exp_cmd_sn"] + 31) & 0xFFFFFFFF
    rig.target.hostile.withhold = False
    conn.release()
    await rig.until(lambda: len(done) == 33)
    assert rig.session_row()["window_closed"] == 1

    # A corrupted header digest ends the connection; the session is reinstated.
    rig.target.hostile.corrupt_header_digest = 1
    with contextlib.suppress(Exception):
        await session.ping()
    await rig.until(lambda: session.reconnects == 1 and session.state.value == "logged in")
    row = rig.session_row()
    assert (row["reinstatements"], row["connections_lost"]) == (1, 1)
    assert row["digest_errors"] == {"header": 1, "data": 0}

    # A refused login during recovery is counted by reason.
    rig.server.accepting = False
    rig.server.drop()
    await rig.until(lambda: session.counters.login_failures.get("connection", 0) >= 1)
    rig.server.accepting = True
    await rig.until(lambda: session.reconnects == 2, timeout=15)
    row = rig.session_row()
    assert row["connections_lost"] == 2 and row["login_failures"]["connection"] >= 1

    families = scrape(rig)
    labels = {"target": IQN, "portal": f"127.0.0.1:{rig.server.port}"}
    assert value(families, "iscsi_hba_session_state", state="logged in", **labels) == 1
    assert value(families, "iscsi_hba_session_state", state="recovering", **labels) == 0
    assert value(families, "iscsi_hba_session_reinstatements_total", **labels) == 2
    assert value(families, "iscsi_hba_session_connection_losses_total", **labels) == 2
    assert value(families, "iscsi_hba_session_digest_errors_total", kind="header",
                 **labels) == 1
    assert value(families, "iscsi_hba_session_login_failures_total", reason="connection",
                 **labels) == row["login_failures"]["connection"]
    # The second ping was the one whose answer was corrupted.
    assert value(families, "iscsi_hba_session_nop_rtt_seconds_count", **labels) == 1
    assert value(families, "iscsi_hba_session_cmd_window_closed_total", **labels) == 1
    assert value(families, "iscsi_hba_session_luns", **labels) == 1
    window = session.command_window
    assert window is not None
    assert value(families, "iscsi_hba_session_max_cmd_sn", **labels) == window[2]
    assert value(families, "iscsi_hba_session_replacement_timeouts_total", **labels) == 0


async def test_metrics_over_http(rig: Rig) -> None:
    await scripted_traffic(rig)
    server = metrics.MetricsServer(rig.daemon, f"127.0.0.1:{free_tcp_port()}")
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        text = await asyncio.to_thread(
            lambda: urllib.request.urlopen(url, timeout=10).read().decode())
    finally:
        await server.stop()
    families = prometheus.families(text)
    assert value(families, "iscsi_hba_disk_commands_total", op="write") == 2
    assert "process_cpu_seconds" in families  # the daemon's own CPU and memory too
    with pytest.raises(OSError):  # and the port is closed again
        urllib.request.urlopen(url, timeout=2)


def http_request(port: int, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


async def test_metrics_server_answers_get_and_head_of_metrics_only(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """/metrics answers GET and HEAD (the headers of the GET, no body); another path is a
    404 and another method a 405, each with a one-line plain-text body; a client that sends
    nothing is let go after REQUEST_TIMEOUT."""
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT", 0.2)
    server = metrics.MetricsServer(rig.daemon, f"127.0.0.1:{free_tcp_port()}")
    server.start()
    try:
        def ask(method: str, path: str) -> tuple[int, dict[str, str], bytes]:
            return http_request(server.port, method, path)

        status, headers, body = await asyncio.to_thread(ask, "GET", "/metrics")
        assert status == 200 and b"iscsi_hba_retries_pending" in body
        status, head_headers, head_body = await asyncio.to_thread(ask, "HEAD", "/metrics")
        assert status == 200 and head_body == b""
        assert head_headers["Content-Type"] == headers["Content-Type"]
        assert int(head_headers["Content-Length"]) > 0
        for path in ("/", "/metrics/", "/favicon.ico", "/metricsx", "/?x=/metrics"):
            status, headers, body = await asyncio.to_thread(ask, "GET", path)
            assert status == 404, path
            assert headers["Content-Type"].startswith("text/plain")
            assert body == b"not found: this server serves Prometheus metrics on /metrics only\n"
        for method in ("POST", "PUT", "DELETE", "OPTIONS"):
            status, headers, body = await asyncio.to_thread(ask, method, "/metrics")
            assert status == 405, method
            assert headers["Allow"] == "GET, HEAD"
            assert body == b"method not allowed: /metrics answers GET and HEAD only\n"

        def silent_client() -> bytes:
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
                return s.recv(100)  # b"" once the server gives up on the request

        assert await asyncio.to_thread(silent_client) == b""
    finally:
        await server.stop()


async def test_top_over_dbus(rig: Rig, system_bus: str,  # noqa: F811
                             capsys: pytest.CaptureFixture[str]) -> None:
    service = await dbus_service.DaemonService.connect(rig.daemon)
    await service.claim()
    service.set_ready()
    try:
        rig.target.hostile.withhold = False
        reader = asyncio.ensure_future(top.cmd_top(argparse.Namespace(
            interval=0.3, count=2, json_lines=True)))
        done: list[SimCommand] = []
        while not reader.done():
            rig.clock.now += 0.001
            rig.submit(cdb_read10(0, 8), data_in=4096, on_complete=done.append)
            await asyncio.sleep(0.01)
        assert (await reader)["samples"] == 2
    finally:
        await service.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    frame = json.loads(lines[-1])
    (disk,) = frame["disks"]
    assert disk["name"] == rig.disk.name and disk["read_iops"] > 0 and disk["iops"] > 0
    assert disk["read_mb_per_s"] > 0 and disk["state"] == "logged in"
    (session,) = frame["sessions"]
    assert session["target"] == IQN and session["state"] == "logged in"


# ------------------------------------------------------------------------------------------


def scrape(r: Rig) -> dict[str, Any]:
    registry = CollectorRegistry()
    registry.register(metrics.MetricsCollector(r.daemon, asyncio.get_running_loop()))
    return prometheus.families(generate_latest(registry).decode())


async def test_the_daemon_serves_metrics_from_its_configuration(
        system_bus: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """``Metrics`` in the configuration (or ``--metrics``) makes ``hbactl daemon`` serve
    /metrics while it runs; a port in use stops the start with a sentence naming it."""
    async def start(self: Daemon, *, attach_enabled: bool = True) -> None:
        return None

    async def stop(self: Daemon) -> None:
        return None

    monkeypatch.setattr(Daemon, "start", start)
    monkeypatch.setattr(Daemon, "stop", stop)
    port = free_tcp_port()
    config = tmp_path / "hba.conf"
    config.write_text(f"Metrics = 127.0.0.1:{port}\n")
    config.chmod(0o600)
    task = asyncio.ensure_future(control.run_daemon(str(config), INITIATOR))
    url = f"http://127.0.0.1:{port}/metrics"

    def scrape_url() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    for _ in range(200):
        try:
            text = await asyncio.to_thread(scrape_url)
            break
        except OSError:
            assert not task.done(), task
            await asyncio.sleep(0.05)
    assert value(prometheus.families(text), "iscsi_hba_retries_pending") == 0

    # A second daemon with --metrics on a port in use: refused by the bus first (it runs),
    # so try the port on its own.
    blocker = metrics.MetricsServer(Daemon(DaemonOptions(initiator_name=INITIATOR)),
                                    f"127.0.0.1:{port}")
    with pytest.raises(HBAError, match=f"cannot serve metrics on 127.0.0.1:{port}: .*another"):
        blocker.start()

    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(task, 10) == 0
    with pytest.raises(OSError):
        await asyncio.to_thread(scrape_url)
