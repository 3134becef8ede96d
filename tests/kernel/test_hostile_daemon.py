"""Issue 10, kernel tier: a hostile target behind one disk of the daemon never stops it serving
another disk, and the hostile disk's I/O ends with an error within the configured bounds.

One daemon (:class:`~tests.kernel.hba_daemon.DaemonThread`) serves two disks: ``good`` on an
LIO ramdisk LUN, attached by URL with the default timeouts, and ``hostile`` on the in-memory
fake target (:mod:`tests.support.fake_target`) served on a loopback port of the VM by a thread
of its own, attached through a configuration entry with small timeouts (config keys, one
second granularity). The fake target behaves while the kernel scans the disk; then, one class
per test, it turns hostile:

==============  =================================================  ==========================
class           the target                                         ends as
==============  =================================================  ==========================
silent          answers nothing after login, pings included        keepalive, then the
                                                                   replacement timeout
trickle         answers nothing, but sends a byte every 0.2 s      same (bytes are no
                                                                   progress)
ping-storm      answers nothing of ours, pings us every 10 ms      same (its pings are no
                                                                   progress)
closed-window   resets the connection, then grants no command      window stall at the
                window at login (MaxCmdSN = ExpCmdSN - 1)          command timeout, then the
                                                                   replacement timeout
drop            resets the connection on every command             replacement timeout
garbage         answers every command with a PDU of an unknown     replacement timeout
                opcode
refused         resets every new connection                        replacement timeout
withhold        takes the commands, answers pings and task         per-command deadline, ABORT
                management, never a status                         TASK; sd retries, then EIO
==============  =================================================  ==========================

Meanwhile a thread writes and reads back (``O_DIRECT``) 64 KiB blocks on ``good``: every block
must come back as written and no operation may take longer than ``GOOD_LATENCY`` — a daemon
whose loop the hostile session blocked would stall it for the whole recovery. A ``dd`` with
direct I/O on ``hostile`` must fail with EIO within the bound its class's timeouts give (plus
``SLACK`` for the VM's emulation); then the target behaves again and the same disk must serve
again (the daemon goes on reconnecting after the replacement timeout). The daemon's log
(``$HBA_VM_RESULTS/kernel/test_hostile_daemon/daemon.log``) holds no traceback; how long each
class took is in ``timings.txt`` there.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from hba.daemon import DaemonOptions
from initiator import pdu as P
from initiator.keys import NegotiationSettings
from tests.kernel import helpers
from tests.kernel.hba_daemon import AttachedDisk, DaemonThread, wait_for_no_leftovers
from tests.support.fake_target import (
    ConnState,
    FakeTarget,
    FakeTargetServer,
    Hostility,
    RamDisk,
    TargetNode,
)

pytestmark = pytest.mark.timeout(900)

T = TypeVar("T")
KiB = 1 << 10
MiB = 1 << 20
HOSTILE_IQN = "iqn.2003-01.org.example:hostile"
WINDOW = 32

# The hostile disk's bounds, as its configuration entry sets them (whole seconds).
LOGIN_TIMEOUT = 3
REPLACEMENT_TIMEOUT = 5
NOOP_INTERVAL = 1
NOOP_TIMEOUT = 1
COMMAND_TIMEOUT = 3
TMF_TIMEOUT = 1
SD_RETRIES = 5           # the SCSI disk driver's retries of a command (SD_MAX_RETRIES)
SLACK = 20.0             # QEMU's software emulation on a shared host: scheduling, udev, dd
GOOD_LATENCY = 5.0       # longest write + read-back of 64 KiB on the good disk

# How long the hostile disk's I/O may take to fail, by how the initiator gives up on it.
# - The session fails: detected (keepalive, the command window's stall, or at once), then no
#   working session for ReplacementTimeout.
SESSION_FAILS = max(NOOP_INTERVAL + NOOP_TIMEOUT, COMMAND_TIMEOUT) + REPLACEMENT_TIMEOUT
# - The command fails (ABORT TASK at its deadline) and the kernel sends it again, SD_RETRIES
#   times.
COMMAND_FAILS = (SD_RETRIES + 1) * (COMMAND_TIMEOUT + 2 * TMF_TIMEOUT)


# ------------------------------------------------------------------------------------------
# the fake target in a thread of its own


class FakeTargetThread:
    """A :class:`FakeTargetServer` on 127.0.0.1, run by its own thread and loop: the daemon's
    loop (another thread) must not be what serves the target it is being tested against."""

    def __init__(self, target: FakeTarget) -> None:
        self.target = target
        self.server = FakeTargetServer(target)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fake-target",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()
        self.call(self.server.start)

    def stop(self) -> None:
        try:
            self.call(self.server.stop)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)
            self.loop.close()

    @property
    def port(self) -> int:
        return self.server.port

    def call(self, fn: Callable[[], Any], timeout: float = 30.0) -> Any:
        """Run ``fn()`` in the target's loop (awaited if it returns an awaitable)."""

        async def run() -> Any:
            result = fn()
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)


# ------------------------------------------------------------------------------------------
# the hostile classes: each turns the target hostile (in its loop) and returns what undoes it


Undo = Callable[[], None]


def _every(server: FakeTargetServer, seconds: float, action: Callable[[Any], None]) -> Undo:
    """Do ``action(connection)`` to every connection in Full Feature Phase every ``seconds``
    (a loop task)."""

    async def repeat() -> None:
        while True:
            for link in list(server.links):
                if link.conn.state is ConnState.FULL_FEATURE and not link.conn.dropped \
                        and not link.writer.is_closing():
                    action(link.conn)
            await asyncio.sleep(seconds)

    task = asyncio.get_running_loop().create_task(repeat())

    def undo() -> None:
        task.cancel()

    return undo


def silent(server: FakeTargetServer) -> Undo | None:
    server.target.hostile.silent = True
    return None


def trickle(server: FakeTargetServer) -> Undo | None:
    server.target.hostile.silent = True
    return _every(server, 0.2, lambda conn: conn.inject_bytes(b"\x00"))


def ping_storm(server: FakeTargetServer) -> Undo | None:
    def only_answers_to_its_pings(conn: Any, pdu: P.PDU) -> bool:
        return not (isinstance(pdu, P.NopOut) and pdu.ttt != P.RESERVED_TAG)

    server.target.hostile.pdu_hook = only_answers_to_its_pings
    return _every(server, 0.01, lambda conn: conn.send_ping())


def closed_window(server: FakeTargetServer) -> Undo | None:
    # A window granted cannot be taken back (RFC 7143 §4.2.2.1: a smaller MaxCmdSN is
    # ignored), so the connection is reset and every login from now on grants none.
    server.target.cmd_window = 0
    server.drop()
    return None


def drop(server: FakeTargetServer) -> Undo | None:
    server.target.hostile.drop_after_commands = 1
    return None


def garbage(server: FakeTargetServer) -> Undo | None:
    def unknown_opcode(conn: Any, pdu: P.PDU) -> bool:
        if isinstance(pdu, P.ScsiCommand):
            conn.inject_bytes(bytes([0x1F]) + bytes(47))
            return True
        return False

    server.target.hostile.pdu_hook = unknown_opcode
    return None


def refused(server: FakeTargetServer) -> Undo | None:
    server.accepting = False
    server.drop()
    return None


def withhold(server: FakeTargetServer) -> Undo | None:
    server.target.hostile.withhold = True
    return None


@dataclass(frozen=True)
class HostileClass:
    name: str
    turn: Callable[[FakeTargetServer], Undo | None]
    bound: float
    write: bool
    """The hostile disk's I/O: a write (immediate data) or a read (classes alternate, which
    keeps the VM run short)."""


CLASSES = [
    HostileClass("silent", silent, SESSION_FAILS, write=False),
    HostileClass("trickle", trickle, SESSION_FAILS, write=True),
    HostileClass("ping-storm", ping_storm, SESSION_FAILS, write=False),
    HostileClass("closed-window", closed_window, SESSION_FAILS, write=True),
    HostileClass("drop", drop, SESSION_FAILS, write=False),
    HostileClass("garbage", garbage, SESSION_FAILS, write=True),
    HostileClass("refused", refused, SESSION_FAILS, write=False),
    HostileClass("withhold", withhold, COMMAND_FAILS, write=True),
]


def behave(server: FakeTargetServer, undo: Undo | None) -> None:
    """Undo every hostility, and reset the connections so that the next ones start afresh."""
    if undo is not None:
        undo()
    server.target.hostile = Hostility()
    server.target.cmd_window = WINDOW
    server.accepting = True
    server.drop()


# ------------------------------------------------------------------------------------------
# I/O on the good disk while the other one misbehaves


@dataclass
class GoodIO:
    """Write 64 KiB blocks at random offsets with O_DIRECT and read each back, until told to
    stop; record each round's time and every mismatch or error."""

    node: str
    region: int = 16 * MiB
    block: int = 64 * KiB
    rounds: int = 0
    slowest: float = 0.0
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> GoodIO:
        self._thread = threading.Thread(target=self._run, name="good-io", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(120)
        if self._thread.is_alive():
            self.errors.append("the good disk's I/O did not return within 120 s")

    def _run(self) -> None:
        rng = random.Random(10)
        out = mmap.mmap(-1, self.block)   # page-aligned, as O_DIRECT wants
        back = mmap.mmap(-1, self.block)
        try:
            fd = os.open(self.node, os.O_RDWR | os.O_DIRECT)
        except OSError as exc:
            self.errors.append(f"open {self.node}: {exc}")
            return
        try:
            while not self._stop.is_set():
                offset = rng.randrange(self.region // self.block) * self.block
                out[:] = rng.randbytes(self.block)
                start = time.monotonic()
                try:
                    os.pwrite(fd, out, offset)
                    os.preadv(fd, [back], offset)
                except OSError as exc:
                    self.errors.append(f"at offset {offset}: {exc}")
                    return
                took = time.monotonic() - start
                self.slowest = max(self.slowest, took)
                self.rounds += 1
                if back[:] != out[:]:
                    self.errors.append(f"at offset {offset}: the block read back differs")
                    return
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------------
# fixtures


@dataclass
class Rig:
    hba: DaemonThread
    fake: FakeTargetThread
    good: AttachedDisk
    results: Path


NOWATCH_RULE = Path("/run/udev/rules.d/99-hba-test-hostile-nowatch.rules")


@contextmanager
def no_udev_watch_on_the_fake_disk() -> Iterator[None]:
    """udev watches disks for a close after writing and then has the kernel re-read the
    partition table; while the session is failed that revalidation spins the disk up for up
    to 100 s (sd_spinup_disk() retries NOT READY 08/00, what a failed session answers), and
    every open and close of the disk waits for it: dd would end that much after its EIO. That
    is the kernel's rescan, not the I/O this test bounds: the fake target's disk is not
    watched (the VM's /run is its own)."""
    NOWATCH_RULE.parent.mkdir(parents=True, exist_ok=True)
    NOWATCH_RULE.write_text('ACTION!="remove", SUBSYSTEM=="block", KERNEL=="sd*", '
                            'ATTRS{vendor}=="FAKE*", OPTIONS+="nowatch"\n')
    helpers.run(["udevadm", "control", "--reload"])
    try:
        yield
    finally:
        NOWATCH_RULE.unlink()
        helpers.run(["udevadm", "control", "--reload"])


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("hostile")
    results = Path(os.environ.get("HBA_VM_RESULTS", "/tmp/hba-vm-results")) / "kernel" / \
        "test_hostile_daemon"
    results.mkdir(parents=True, exist_ok=True)
    (results / "timings.txt").write_text("")
    lio = helpers.Lio(tmp)
    target = FakeTarget([TargetNode(HOSTILE_IQN, {0: RamDisk(blocks=16384)})],
                        settings=NegotiationSettings.rfc_defaults(default_time2wait=1),
                        cmd_window=WINDOW)
    fake = FakeTargetThread(target)
    fake.start()
    config = tmp / "iscsi-hba.conf"
    config.write_text("\n".join([
        "hostile {",
        f"    TargetAddress = 127.0.0.1:{fake.port}",
        f"    TargetName = {HOSTILE_IQN}",
        "    Lun = 0",
        "    Enable = off",   # attached by each test, not at the daemon's start
        f"    LoginTimeout = {LOGIN_TIMEOUT}",
        f"    ReplacementTimeout = {REPLACEMENT_TIMEOUT}",
        f"    NoopInterval = {NOOP_INTERVAL}",
        f"    NoopTimeout = {NOOP_TIMEOUT}",
        f"    CommandTimeout = {COMMAND_TIMEOUT}",
        f"    TaskManagementTimeout = {TMF_TIMEOUT}",
        "}", ""]))
    config.chmod(0o600)
    log_path = results / "daemon.log"
    try:
        lio_target = lio.create(64 * MiB)
        with no_udev_watch_on_the_fake_disk(), \
                DaemonThread(DaemonOptions(config_path=str(config)), log_path=log_path) as hba:
            good = hba.attach(lio_target.url())
            yield Rig(hba, fake, good, results)
        assert wait_for_no_leftovers() == [], "the daemon left objects in the kernel"
    finally:
        fake.stop()
        lio.remove_all()
    assert "Traceback" not in log_path.read_text(errors="replace"), \
        f"a traceback in the daemon's log {log_path}"


# ------------------------------------------------------------------------------------------
# the test


def dd(node: str, *, write: bool, timeout: float) -> tuple[subprocess.CompletedProcess[str], float]:
    """One 4 KiB block, direct I/O; the result and how long it took."""
    argv = (["dd", "if=/dev/zero", f"of={node}", "oflag=direct", "conv=notrunc"] if write
            else ["dd", f"if={node}", "of=/dev/null", "iflag=direct"])
    start = time.monotonic()
    proc = helpers.run([*argv, "bs=4096", "count=1", "seek=7" if write else "skip=7"],
                       check=False, timeout=timeout)
    return proc, time.monotonic() - start


def wait_until(condition: Callable[[], T], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            assert value, f"{what} did not happen within {timeout:.0f} s"
            return value
        time.sleep(0.5)


@pytest.mark.parametrize("hostile", CLASSES, ids=lambda c: c.name)
def test_hostile_target_fails_its_disk_only(rig: Rig, hostile: HostileClass) -> None:
    hba, fake, write = rig.hba, rig.fake, hostile.write
    disk = hba.attach("hostile")
    undo: Undo | None = None
    hostile_now = False
    try:
        proc, _ = dd(disk.node, write=write, timeout=60)   # it works before
        assert proc.returncode == 0, proc.stderr
        with GoodIO(rig.good.node) as good:
            hostile_now = True
            undo = fake.call(lambda: hostile.turn(fake.server))
            proc, took = dd(disk.node, write=write, timeout=hostile.bound + SLACK + 60)
            rounds_during = good.rounds
            names = {d["name"] for d in hba.status()["disks"]}   # the daemon answers
        with (rig.results / "timings.txt").open("a") as f:
            f.write(f"{hostile.name}: {'write' if write else 'read'} failed after {took:.1f} s "
                    f"(bound {hostile.bound:g} s + {SLACK:g} s); good disk: {good.rounds} "
                    f"rounds, slowest {good.slowest:.2f} s\n")
        assert proc.returncode != 0 and "Input/output error" in proc.stderr, \
            (proc.returncode, proc.stderr)
        assert took <= hostile.bound + SLACK, \
            f"the {hostile.name} target's I/O failed after {took:.1f} s, beyond " \
            f"{hostile.bound:g} s + {SLACK:g} s"
        assert not good.errors, good.errors
        assert rounds_during > 0, "no I/O completed on the good disk meanwhile"
        assert good.slowest <= GOOD_LATENCY, \
            f"a write + read of the good disk took {good.slowest:.1f} s while the " \
            f"{hostile.name} target misbehaved"
        assert names == {rig.good.name, disk.name}, names
        # The target behaves again: the daemon, reconnecting all along, serves the disk again.
        hostile_now = False
        fake.call(lambda: behave(fake.server, undo))
        wait_until(lambda: dd(disk.node, write=write, timeout=60)[0].returncode == 0,
                   REPLACEMENT_TIMEOUT + LOGIN_TIMEOUT + 5 + SLACK, "I/O on the recovered disk")
    finally:
        if hostile_now:
            fake.call(lambda: behave(fake.server, undo))
        hba.detach(disk.name, force=True)
