"""Multipath in the daemon without a kernel: a LUN's paths, their sessions and ISIDs, their
life (a path whose portal answers late, a path that goes down and comes back), SendTargets
discovery of more portals, and what ``list``/``status`` make of it.

The daemon runs against in-memory targets (:mod:`tests.support.fake_target`) on loopback;
the kernel side of a path (backstore, ring, tcm_loop, ``/dev/sdX``) is replaced by a stand-in
that records which paths were set up.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from hba import control
from hba.daemon import Daemon, DaemonOptions
from hba.devices import BlockDevice
from hba.disks import Disk, DiskPath, PathState
from hba.errors import AttachError
from hba.sessions import SessionPool, derived_isid
from hba.specs import LunSpec, PathSpec, SpecDefaults, SpecResolver
from initiator.keys import NegotiationSettings
from initiator.login import Portal
from initiator.transport import SessionConfig, SessionState
from tcmu_handler.scsi import PathPolicy
from tests.support.fake_target import FakeTarget, FakeTargetServer, TargetNode
from tests.support.targets import free_tcp_port

INITIATOR = "iqn.2024-01.org.example:unit-host"
IQN = "iqn.2003-01.org.example:mpath"


class _Stats:
    completed = 0
    in_flight = 0


class _Ring:
    """Stands in for a path's Dispatcher in what the daemon reads of it."""

    stats = _Stats()

    async def close(self, timeout: float | None = None) -> None:
        return None


class NoKernel(Daemon):
    """The kernel side of a path is a stand-in: it records the path and pretends to serve."""

    def __init__(self, options: DaemonOptions) -> None:
        super().__init__(options)
        self.made: list[str] = []
        self.refuse: dict[str, str] = {}   # backstore -> why its kernel side fails

    async def _setup_path(self, disk: Disk, path: DiskPath) -> None:
        assert path.session.state is SessionState.LOGGED_IN
        if path.backstore in self.refuse:
            raise AttachError(self.refuse[path.backstore])
        self.made.append(path.backstore)
        path.dispatcher = _Ring()  # type: ignore[assignment]
        path.hba_index = 0
        path.device = BlockDevice(f"sd{chr(ord('a') + len(self.made) - 1)}",
                                  f"/dev/sd{chr(ord('a') + len(self.made) - 1)}", ())
        disk.size = 1 << 20


@pytest.fixture(autouse=True)
def no_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("hba.kernel.preflight", lambda: None)
    monkeypatch.setattr("hba.kernel.list_backstores", lambda: [])


def target(*addresses: str) -> FakeTarget:
    return FakeTarget([TargetNode(IQN, addresses=addresses)],
                      settings=NegotiationSettings.rfc_defaults(default_time2wait=0))


@pytest.fixture
async def servers() -> AsyncIterator[list[FakeTargetServer]]:
    made: list[FakeTargetServer] = []
    yield made
    for server in made:
        await server.stop()


async def serve(made: list[FakeTargetServer], fake: FakeTarget, port: int = 0
                ) -> FakeTargetServer:
    server = FakeTargetServer(fake)
    server.port = port
    made.append(server)
    return await server.start()


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Callable[[str], Any]]:
    made: list[NoKernel] = []

    async def start(text: str) -> NoKernel:
        path = tmp_path / "hba.conf"
        path.write_text(text)
        path.chmod(0o600)
        d = NoKernel(DaemonOptions(config_path=str(path), initiator_name=INITIATOR,
                                   watch_uio=False))
        made.append(d)
        await d.start(attach_enabled=False)
        return d

    yield start
    for d in made:
        await d.stop()


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


def entry(*portals: str, extra: str = "") -> str:
    return (f'db {{\n TargetAddress = "{", ".join(portals)}"\n TargetName = {IQN}\n'
            f" LoginTimeout = 2\n NoopInterval = 0\n{extra}}}\n")


# ------------------------------------------------------------------------------------------


async def test_a_path_per_portal_each_its_own_session(
        daemon: Callable[[str], Any], servers: list[FakeTargetServer]) -> None:
    one, two = await serve(servers, target()), await serve(servers, target())
    d = await daemon(entry(f"127.0.0.1:{one.port}", f"127.0.0.1:{two.port}"))
    disk = await d.attach("db")
    assert d.made == ["hba-db.1", "hba-db.2"]
    assert [p.state for p in disk.paths] == [PathState.UP, PathState.UP]
    assert disk.spec.policy is PathPolicy.MULTIPATH
    assert disk.spec.session.replacement_timeout == 5
    assert disk.spec.session.max_reconnect_interval == 5
    sessions = [p.session for p in disk.paths]
    assert sessions[0] is not sessions[1]
    assert [s.config.isid for s in sessions] == [
        derived_isid(INITIATOR, IQN, Portal("127.0.0.1", one.port)),
        derived_isid(INITIATOR, IQN, Portal("127.0.0.1", two.port))]
    # Each target saw one login, with that path's ISID.
    assert [r.isid for r in one.target.successful_logins()] == [sessions[0].config.isid]
    assert [r.isid for r in two.target.successful_logins()] == [sessions[1].config.isid]
    row = control.normalize_disk(disk.describe())
    assert row["multipath"] and row["paths_up"] == 2 and control.disk_state(row) == "logged in"
    assert [p["portal"] for p in row["paths"]] == [f"127.0.0.1:{one.port},1",
                                                  f"127.0.0.1:{two.port},1"]
    described = await d.detach("db")
    assert described["state"] == "detached" and d.disks == {}
    assert all(s.state is SessionState.CLOSED for s in sessions)


async def test_a_portal_that_answers_late_becomes_a_path_then(
        daemon: Callable[[str], Any], servers: list[FakeTargetServer],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "iscsi-hba")
    one = await serve(servers, target())
    late = free_tcp_port()
    d = await daemon(entry(f"127.0.0.1:{one.port}", f"127.0.0.1:{late}"))
    disk = await d.attach("db")   # one path is enough
    assert d.made == ["hba-db.1"]
    second = disk.paths[1]
    assert second.state is PathState.CONNECTING and second.dispatcher is None
    row = disk.describe()
    assert row["paths"][1]["state"] == "connecting"
    assert "cannot connect" in row["paths"][1]["error"], row["paths"][1]
    assert control.disk_state(control.normalize_disk(row)) == "degraded"
    assert re.search(rf"db path 2 \(127.0.0.1:{late}\): logging in in the background",
                     caplog.text), caplog.text

    await serve(servers, target(), port=late)
    await until(lambda: second.state is PathState.UP)
    assert d.made == ["hba-db.1", "hba-db.2"]
    assert re.search(rf"db path 2 \(127.0.0.1:{late},1\): up as /dev/sdb after \d+ s",
                     caplog.text), caplog.text


async def test_a_path_goes_down_fails_over_and_comes_back(
        daemon: Callable[[str], Any], servers: list[FakeTargetServer],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "iscsi-hba")
    one, two = await serve(servers, target()), await serve(servers, target())
    d = await daemon(entry(f"127.0.0.1:{one.port}", f"127.0.0.1:{two.port}",
                           extra=" ReplacementTimeout = 1\n"))
    disk = await d.attach("db")
    path = disk.paths[1]
    await two.stop()
    await until(lambda: path.state is PathState.DOWN)
    assert disk.paths[0].state is PathState.UP
    row = control.normalize_disk(disk.describe())
    assert control.disk_state(row) == "degraded" and row["paths_up"] == 1
    assert "closed the connection" in row["paths"][1]["error"]
    await until(lambda: path.state is PathState.FAILED, 5)
    await two.start()
    await until(lambda: path.state is PathState.UP, 15)
    label = rf"db path 2 \(127.0.0.1:{two.port},1\)"
    lines = [r.getMessage() for r in caplog.records if re.match(label, r.getMessage())]
    assert [re.sub(r"after \d+ s", "after N s", line.split(": ", 1)[1].split(" (")[0])
            for line in lines] == [
        "up as /dev/sdb", "down", "not back within 1 s: its I/O fails over now; reconnecting",
        "up as /dev/sdb after N s"], lines
    assert d.made == ["hba-db.1", "hba-db.2"]   # its disk stayed: nothing made again


async def test_a_path_that_cannot_be_made_is_left_out(
        daemon: Callable[[str], Any], servers: list[FakeTargetServer],
        caplog: pytest.LogCaptureFixture) -> None:
    one, two = await serve(servers, target()), await serve(servers, target())
    d = await daemon(entry(f"127.0.0.1:{one.port}", f"127.0.0.1:{two.port}"))
    d.refuse["hba-db.1"] = "path 1 reports 8 bytes: not the same LUN"
    disk = await d.attach("db")
    assert [p.backstore for p in disk.paths] == ["hba-db.2"] and d.made == ["hba-db.2"]
    assert "db path 1 (127.0.0.1:" in caplog.text and "left out: path 1 reports" in caplog.text
    await d.detach("db")
    d.refuse["hba-db.2"] = "no ring"
    with pytest.raises(AttachError, match=r"attaching db .* failed: path 1 reports 8 bytes"):
        await d.attach("db")
    assert d.disks == {} and d.sessions.describe() == []


async def test_send_targets_adds_the_other_portals(
        daemon: Callable[[str], Any], servers: list[FakeTargetServer]) -> None:
    other = free_tcp_port()
    fake = target()
    one = await serve(servers, fake)
    fake.nodes[0].addresses = (f"127.0.0.1:{one.port},1", f"127.0.0.1:{other},2")
    await serve(servers, target(), port=other)
    d = await daemon(entry(f"127.0.0.1:{one.port}", extra=" DiscoverPortals = on\n"))
    disk = await d.attach("db")
    assert [str(p.spec.portal) for p in disk.paths] == [f"127.0.0.1:{one.port}",
                                                        f"127.0.0.1:{other}"]
    assert [p.spec.portal.tpgt for p in disk.paths] == [1, 2]
    assert d.made == ["hba-db.1", "hba-db.2"] and disk.spec.multipath


async def test_a_portal_added_to_the_entry_becomes_a_path_on_reload(
        daemon: Callable[[str], Any], servers: list[FakeTargetServer], tmp_path: Path) -> None:
    one, two, three = [await serve(servers, target()) for _ in range(3)]
    d = await daemon(entry(f"127.0.0.1:{one.port}", f"127.0.0.1:{two.port}"))
    disk = await d.attach("db")
    (tmp_path / "hba.conf").write_text(entry(f"127.0.0.1:{one.port}", f"127.0.0.1:{two.port}",
                                             f"127.0.0.1:{three.port}"))
    await d.reload_config()
    await d.attach_enabled()
    await d.attach_enabled()   # twice (a second SIGHUP at once): still one new path
    await until(lambda: len(disk.paths) == 3 and disk.paths[2].state is PathState.UP)
    await asyncio.sleep(0.1)
    assert [p.index for p in disk.paths] == [1, 2, 3]
    assert d.made == ["hba-db.1", "hba-db.2", "hba-db.3"]


async def test_the_same_lun_is_not_attached_twice(
        daemon: Callable[[str], Any], servers: list[FakeTargetServer]) -> None:
    one, two = await serve(servers, target()), await serve(servers, target())
    d = await daemon(entry(f"127.0.0.1:{one.port}"))
    await d.attach(f"iscsi://127.0.0.1:{one.port}/{IQN}/0")
    for again in (f"iscsi://127.0.0.1:{one.port}/{IQN}/0", "db"):
        with pytest.raises(AttachError, match=rf"{IQN} LUN 0 at 127.0.0.1:{one.port} is "
                                              "already attached as mpath-0"):
            await d.attach(again)
    with pytest.raises(AttachError, match=r"through 127\.0\.0\.1:\d+; to reach it through .* "
                                          r"detach mpath-0 and attach all portals in one URL"):
        await d.attach(f"iscsi://127.0.0.1:{two.port}/{IQN}/0")
    assert list(d.disks) == ["mpath-0"]


# ------------------------------------------------------------------------------------------
# ISIDs


def test_derived_isids_are_stable_distinct_and_of_the_random_format() -> None:
    a = derived_isid(INITIATOR, IQN, Portal("192.0.2.10", 3260))
    assert a == derived_isid(INITIATOR, IQN, Portal("192.0.2.10", 3260, tpgt=1))
    assert a >> 46 == 0b10 and a & 0xFFFF == 0 and a < 1 << 48   # T = 10b, qualifier 0
    others = {derived_isid(INITIATOR, IQN, Portal("192.0.2.11", 3260)),
              derived_isid(INITIATOR, IQN, Portal("192.0.2.10", 3261)),
              derived_isid(INITIATOR, IQN + "x", Portal("192.0.2.10", 3260)),
              derived_isid(INITIATOR + "x", IQN, Portal("192.0.2.10", 3260))}
    assert a not in others and len(others) == 4
    assert derived_isid(INITIATOR, IQN, Portal("192.0.2.10", 3260), 1) == a | 1


async def test_two_identities_at_one_portal_get_two_isids() -> None:
    pool = SessionPool(lambda _kind, _data: None)
    resolver = SpecResolver(SpecDefaults(initiator_name=INITIATOR))
    port = free_tcp_port()

    def spec(digest: str) -> PathSpec:
        lun = LunSpec(name="x", portals=(Portal("127.0.0.1", port),), target=IQN, lun=0,
                      session=SessionConfig(initiator_name=INITIATOR, header_digest=digest,
                                            reconnect_forever=True, login_timeout=1))
        return lun.paths()[0]

    try:
        a = await pool.acquire(spec("None"), background=True)
        b = await pool.acquire(spec("CRC32C"), background=True)
        again = await pool.acquire(spec("None"), background=True)
        assert again is a and b is not a
        assert b.config.isid == a.config.isid | 1
        assert resolver.defaults.multipath_replacement_timeout == 5
    finally:
        await pool.close()
