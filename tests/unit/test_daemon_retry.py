"""``Enable = on`` entries whose target cannot be reached are tried again in the background.

The daemon runs here without a kernel: preflight and the configfs scan are stubbed, and in most
tests ``_attach_locked`` (the kernel part of an attach) is replaced by a stand-in that fails
with queued errors and then "attaches". One test goes through the real attach path against a
closed port, so the error a person sees in ``hbactl status`` is the real one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from hba import control
from hba import retry as retry_module
from hba.daemon import Daemon, DaemonOptions
from hba.disks import Disk, DiskPath, DiskState
from hba.errors import AttachError, HBAError, WorkerError
from hba.kernel import BackstoreInfo
from hba.specs import LunSpec
from initiator.transport import Session
from tcmu_handler.device import UioInfo, UioName
from tests.support.targets import free_tcp_port

INITIATOR = "iqn.2024-01.org.example:unit-host"


def entry(nickname: str, port: int, *extra: str) -> str:
    lines = [f"{nickname} {{", f"    TargetAddress = 127.0.0.1:{port}",
             f"    TargetName = iqn.2003-01.org.example:{nickname}", "    Lun = 0",
             "    LoginTimeout = 2", *(f"    {line}" for line in extra), "}", ""]
    return "\n".join(lines)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


class Flaky(Daemon):
    """The kernel part of an attach fails with the queued errors, then succeeds; the
    attaches of the names in ``down`` fail as long as they are in it."""

    def __init__(self, options: DaemonOptions, failures: list[HBAError]) -> None:
        super().__init__(options)
        self.failures = failures
        self.down: set[str] = set()
        self.hold: asyncio.Event | None = None   # attempts wait for it (once decided)
        self.attempts = 0

    async def _attach_locked(self, spec: LunSpec) -> Disk:
        self.attempts += 1
        failing = spec.name in self.down
        if self.hold is not None:
            await self.hold.wait()
        if failing:
            raise down(spec.name)
        if self.failures:
            raise self.failures.pop(0)
        path = spec.paths()[0]
        disk = Disk(spec=spec, paths=[DiskPath(spec=path, backstore=path.backstore, hba_index=0,
                                           session=Session(spec.portal, spec.target,
                                                           spec.session))],
                    state=DiskState.ATTACHED)
        self.disks[spec.name] = disk
        return disk


def down(name: str = "disk1") -> AttachError:
    return AttachError(f"attaching {name} failed: cannot connect", retryable=True)


def refused(name: str = "disk1") -> AttachError:
    return AttachError(f"attaching {name} failed: authentication failed", retryable=False)


@pytest.fixture(autouse=True)
def no_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("hba.kernel.preflight", lambda: None)
    monkeypatch.setattr("hba.kernel.list_backstores", lambda: [])
    monkeypatch.setattr(retry_module, "RETRY_FIRST", 0.02)
    monkeypatch.setattr(retry_module, "RETRY_MAX", 0.05)


DaemonFactory = Callable[..., Any]


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[DaemonFactory]:
    made: list[Daemon] = []

    async def start(text: str, failures: list[HBAError] | None = None,
                    real: bool = False) -> Daemon:
        options = DaemonOptions(config_path=write(tmp_path / "hba.conf", text),
                                initiator_name=INITIATOR, watch_uio=False)
        d = Daemon(options) if real else Flaky(options, failures or [])
        made.append(d)
        await d.start()
        return d

    yield start
    for d in made:
        await d.stop()


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_unreachable_target_is_retried_and_listed(make: DaemonFactory) -> None:
    port = free_tcp_port()
    d = await make(entry("disk1", port), real=True)
    (row,) = d.list()
    assert row["name"] == "disk1" and row["state"] == "retrying"
    assert row["target"] == "iqn.2003-01.org.example:disk1" and row["lun"] == 0
    assert f"cannot connect to iSCSI portal 127.0.0.1:{port}" in row["error"], row
    await until(lambda: d.list()[0]["attempts"] >= 3)
    assert d.disks == {}
    text = control.format_status({"disks": [control.normalize_disk(r) for r in d.list()]})
    assert "retrying" in text and "cannot connect" in text


async def test_attaches_once_the_target_answers(make: DaemonFactory,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "iscsi-hba")
    d = await make(entry("disk1", 3260), [down(), down(), down()])
    assert [r["state"] for r in d.list()] == ["retrying"]
    await until(lambda: "disk1" in d.disks)
    assert d.attempts == 4 and d._retries == {}
    assert [r["name"] for r in d.list()] == ["disk1"]
    assert "could not attach disk1 (attempt 3): attaching disk1 failed: cannot connect; " \
           "trying again in" in caplog.text


async def test_a_worker_gone_under_an_attempt_does_not_end_the_retries(
        make: DaemonFactory) -> None:
    # With --workers the attach runs in a worker process; one that dies under it is replaced,
    # so the entry goes on retrying rather than giving up ("not trying again").
    gone = WorkerError("worker 0 (pid 4242) is gone (exit status -9)")
    d = await make(entry("disk1", 3260), [down(), gone, down()])
    await until(lambda: "disk1" in d.disks)
    assert d.attempts == 4 and d._retries == {}


async def test_a_refusal_is_not_retried(make: DaemonFactory,
                                        caplog: pytest.LogCaptureFixture) -> None:
    d = await make(entry("disk1", 3260), [refused()])
    assert d._retries == {}
    assert "could not attach disk1: attaching disk1 failed: authentication" in caplog.text
    # Listed, not left out: `hbactl list` and `status` said nothing of the entry at all.
    assert d.list() == [{"name": "disk1", "target": "iqn.2003-01.org.example:disk1",
                         "portal": "127.0.0.1:3260", "lun": 0, "state": "failed",
                         "error": "attaching disk1 failed: authentication failed"}]

    d2 = await make(entry("disk2", 3260), [down("disk2"), refused("disk2")])
    await until(lambda: not d2._retries)
    assert d2.attempts == 2 and d2.disks == {}
    assert "not trying again" in caplog.text
    assert [(r["name"], r["state"]) for r in d2.list()] == [("disk2", "failed")]


async def test_a_refused_entry_says_what_to_do_and_is_tried_again_on_reload(
        make: DaemonFactory) -> None:
    d = await make(entry("disk1", 3260), [refused()])
    text = control.format_status({"disks": [control.normalize_disk(r) for r in d.list()]})
    assert "disk1: not attached, and not tried again: attaching disk1 failed: authentication " \
           "failed; once the entry is fixed, run `systemctl reload iscsi-hba` or " \
           "`hbactl attach disk1`" in text
    assert "attempt" not in text
    await d.reload_config()      # SIGHUP, once the secret is fixed
    await d.attach_enabled()
    assert set(d.disks) == {"disk1"} and [r["state"] for r in d.list()] == ["attached"]


async def test_detach_forgets_a_refused_entry(make: DaemonFactory) -> None:
    d = await make(entry("disk1", 3260), [refused()])
    described = await d.detach("disk1")
    assert described["state"] == "detached" and described["name"] == "disk1"
    assert d.list() == []


async def test_a_refused_entry_no_longer_enabled_is_no_longer_listed(
        make: DaemonFactory, tmp_path: Path) -> None:
    d = await make(entry("disk1", 3260), [refused()])
    write(tmp_path / "hba.conf", entry("disk1", 3260, "Enable = off"))
    await d.reload_config()
    await d.attach_enabled()
    assert d.list() == [] and d.disks == {}


async def test_detach_stops_retrying(make: DaemonFactory) -> None:
    d = await make(entry("disk1", 3260), [down()] * 1000)
    assert set(d._retries) == {"disk1"}
    (task,) = d._retry_tasks.values()
    described = await d.detach("disk1")
    assert described["state"] == "detached" and described["name"] == "disk1"
    await asyncio.sleep(0)
    assert task.cancelled() or task.done()
    assert d.list() == [] and d._retries == {}


async def test_explicit_attach_ends_the_retry(make: DaemonFactory,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry_module, "RETRY_FIRST", 60.0)
    d = await make(entry("disk1", 3260), [down(), down()])
    assert set(d._retries) == {"disk1"}
    (task,) = d._retry_tasks.values()
    with pytest.raises(AttachError, match="cannot connect"):
        await d.attach("disk1")   # fails: the retry goes on
    assert not task.done() and d.attempts == 2
    await d.attach("disk1")       # `hbactl attach disk1` once the target is back
    await asyncio.sleep(0)
    assert task.cancelled() and "disk1" in d.disks and not d._retries
    with pytest.raises(AttachError, match="already attached"):
        await d.attach("disk1")


async def test_reload_attaches_new_entries_and_drops_removed_ones(
        make: DaemonFactory, tmp_path: Path) -> None:
    d = await make(entry("disk1", 3260), [down()] * 1000)
    assert set(d._retries) == {"disk1"}
    write(tmp_path / "hba.conf", entry("disk1", 3260, "Enable = off") + entry("disk2", 3261))
    assert isinstance(d, Flaky)
    d.failures.clear()
    await d.reload_config()
    await d.attach_enabled()
    assert d._retries == {} and set(d.disks) == {"disk2"}


async def test_reload_tries_every_waiting_entry_at_once(
        make: DaemonFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # A person fixed the entry of disk1 (its port) and reloads: disk1 and disk2 (whose
    # target may have been fixed too) are tried now, not a minute later, and a failure then
    # waits the first delay again. Without the reload, the next attempt is 60 s away.
    caplog.set_level(logging.INFO, "iscsi-hba")
    monkeypatch.setattr(retry_module, "RETRY_FIRST", 60.0)
    monkeypatch.setattr(retry_module, "RETRY_MAX", 60.0)
    d = await make(entry("disk1", 3260) + entry("disk2", 3260), [down("disk1"), down("disk2")])
    assert isinstance(d, Flaky)
    assert set(d._retries) == {"disk1", "disk2"} and d.attempts == 2
    d.down.add("disk2")
    write(tmp_path / "hba.conf", entry("disk1", 3270) + entry("disk2", 3260))
    await d.reload_config()
    await d.attach_enabled()
    await until(lambda: d.attempts == 4 and "disk1" in d.disks)
    assert d.disks["disk1"].spec.portal.port == 3270   # as the entry says now
    assert set(d._retries) == {"disk2"}
    retry = d._retries["disk2"]
    assert retry.attempts == 2 and retry.delay == 60.0
    assert "disk2: the configuration was read again: trying to attach it now" in caplog.text
    # A reload during an attempt: another attempt follows it at once (the one under way
    # may have started with the entry as it was).
    d.hold = asyncio.Event()
    d._retry_now("disk2")
    await until(lambda: d.attempts == 5)   # under way, with the target still down
    d.down.clear()
    d._retry_now("disk2")
    d.hold.set()
    await until(lambda: "disk2" in d.disks)
    assert d.attempts == 6 and d._retries == {}


async def test_entries_being_attached_at_start_are_listed_as_attaching(
        tmp_path: Path) -> None:
    # The start attaches the Enable = on entries one after the other, which takes long when
    # a target is down: meanwhile hbactl list said "no LUNs attached".
    options = DaemonOptions(config_path=write(tmp_path / "hba.conf",
                                              entry("disk1", 3260) + entry("disk2", 3261)),
                            initiator_name=INITIATOR, watch_uio=False)
    d = Flaky(options, [down("disk1")])
    d.hold = asyncio.Event()
    starting = asyncio.create_task(d.start())
    try:
        await until(lambda: d.attempts == 1)    # disk1's attach under way, disk2's next
        rows = d.list()
        assert rows == [
            {"name": "disk1", "target": "iqn.2003-01.org.example:disk1",
             "portal": "127.0.0.1:3260", "lun": 0, "state": "attaching"},
            {"name": "disk2", "target": "iqn.2003-01.org.example:disk2",
             "portal": "127.0.0.1:3261", "lun": 0, "state": "attaching"}]
        table = control.format_table([control.normalize_disk(r) for r in rows])
        assert table.splitlines()[1:] == [
            "disk1  iqn.2003-01.org.example:disk1    0  -          -  attaching",
            "disk2  iqn.2003-01.org.example:disk2    0  -          -  attaching"]
        d.hold.set()
        await starting
        assert [(r["name"], r["state"]) for r in d.list()] == [("disk1", "retrying"),
                                                                ("disk2", "attached")]
        assert d._queued == {}
    finally:
        starting.cancel()
        await d.stop()


async def test_a_start_stopped_midway_lists_no_entry_as_attaching(tmp_path: Path) -> None:
    options = DaemonOptions(config_path=write(tmp_path / "hba.conf",
                                              entry("disk1", 3260) + entry("disk2", 3261)),
                            initiator_name=INITIATOR, watch_uio=False)
    d = Flaky(options, [])
    d.hold = asyncio.Event()
    starting = asyncio.create_task(d.start())
    try:
        await until(lambda: d.attempts == 1)
        assert len(d.list()) == 2
        starting.cancel()    # SIGTERM during the start
        with pytest.raises(asyncio.CancelledError):
            await starting
        assert d.list() == []
    finally:
        await d.stop()


async def test_a_backstore_left_in_the_kernel_that_cannot_be_served_is_listed(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A backstore of a previous daemon whose configuration entry is gone: its disk is in the
    # kernel, its I/O waits and then fails, and hbactl list and status said nothing of it.
    info = BackstoreInfo(name="hba-gone", hba_index=3, cfgstring="gone", size=1 << 20,
                         path=tmp_path / "user_3" / "hba-gone")
    monkeypatch.setattr("hba.kernel.list_backstores", lambda: [info])
    d = Daemon(DaemonOptions(config_path=write(tmp_path / "hba.conf", ""),
                             initiator_name=INITIATOR, watch_uio=False))
    await d.start()
    try:
        (row,) = d.list()
        # Named with its HBA, as the other rows name their backstores: where configfs has
        # it; "hba-gone" alone could be in any user_N.
        assert row["name"] == row["backstore"] == "user_3/hba-gone"
        assert row["state"] == "not served"
        assert "gone" in row["error"]
        text = control.format_status({"disks": [control.normalize_disk(row)]})
        assert "  user_3/hba-gone  -         -  -          -  not served" in text  # no LUN "None"
        assert "  user_3/hba-gone: a backstore in the kernel that this daemon cannot serve " \
               "(its disk's I/O waits, then fails): " in text
        # Still in the kernel: still listed (the uio device names it by HBA and name).
        uio = UioInfo(index=7, name=UioName(hba_index=3, dev_name="hba-gone", subtype="iscsi",
                                            cfgstring="gone"),
                      map_size=1 << 20, dev_path=tmp_path / "uio7", sysfs_path=tmp_path)
        monkeypatch.setattr("hba.daemon.find_devices", lambda: [uio])
        monkeypatch.setattr("hba.kernel.read_backstore", lambda index, name: None)
        await d.serve_new_devices()
        assert [r["name"] for r in d.list()] == ["user_3/hba-gone"]
        # Removed from the kernel (targetcli delete): no longer listed.
        monkeypatch.setattr("hba.daemon.find_devices", lambda: [])
        await d.serve_new_devices()
        assert d.list() == []
    finally:
        await d.stop()


def test_an_entry_sets_every_bound_of_its_session(tmp_path: Path) -> None:
    # Not a retry: what a configuration entry's timeouts become in the session it attaches.
    text = entry("bounds", 3260, "CommandTimeout = 0", "TaskManagementTimeout = 7",
                 "LogoutTimeout = 3", "NoopInterval = 4", "NoopTimeout = 9",
                 "ReplacementTimeout = 60")
    d = Daemon(DaemonOptions(config_path=write(tmp_path / "hba.conf", text),
                             initiator_name=INITIATOR, watch_uio=False))
    d.config = d._load_config()
    config = d.specs.resolve("bounds").session
    assert (config.login_timeout, config.replacement_timeout, config.command_timeout,
            config.tmf_timeout, config.logout_timeout, config.noop_interval,
            config.noop_timeout) == (2, 60, 0, 7, 3, 4, 9)
    assert config.reconnect_forever


def test_the_data_area_holds_the_largest_requests_the_kernel_sends() -> None:
    """Commands reach the ring at the block layer's size (1280 KiB), not at the backstore's
    hw_max_sectors (the remote's Block Limits page is what sd reads): the data area is sized
    for those, or for the remote's smaller maximum transfer."""
    from hba.daemon import BLOCK_LAYER_MAX_REQUEST, data_area_mb

    assert BLOCK_LAYER_MAX_REQUEST == 1280 << 10
    assert data_area_mb(32, 256 << 10, None) == 80          # 32 x 1.25 MiB, twice
    assert data_area_mb(32, 256 << 10, 0xFFFFFFF8 * 512) == 80
    assert data_area_mb(32, 256 << 10, 256 << 10) == 64     # the floor
    assert data_area_mb(128, 256 << 10, None) == 320
    assert data_area_mb(1024, 8 << 20, None) == 1024        # the ceiling
    assert data_area_mb(32, 4 << 20, 4 << 20) == 256        # never below max_io
