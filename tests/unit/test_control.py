"""``hbactl daemon/attach/detach/list/status`` and the DBus service, without a kernel.

Pure parts: argument parsing, the sd_notify datagrams, table/status/JSON formatting, DBus value
conversion and error mapping in both directions. The DBus parts run against a private
``dbus-daemon`` configured like the system bus (default deny) plus the project's policy file,
``deploy/dbus/iscsi-hba.conf``: the service with a stand-in daemon, ``CheckConfig`` with a real
login to the in-memory target, the policy as seen by an unprivileged user, and ``hbactl
daemon``'s start/notify/stop sequence with the kernel side stubbed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from hba import cli, control, dbus_service
from hba.config import ConfigError
from hba.daemon import Daemon, DaemonOptions, Disk, prepare_capture_dir
from hba.disks import DiskPath, DiskState
from hba.errors import AttachError, DetachError, DiskBusyError, NoSuchDiskError
from hba.kernel import KernelSetupError
from hba.specs import LunSpec
from initiator.errors import AuthenticationError, ConfigurationError
from initiator.login import Portal
from initiator.transport import Session, SessionConfig, default_initiator_name
from initiator.url import URL_SYNTAX, parse_url
from tcmu_handler.sdnotify import sd_notify
from tests.support.fake_target import FakeTarget, FakeTargetServer, RamDisk, TargetNode
from tests.unit.test_pcap import assert_clean, iscsi_opcodes

CHECKOUT = Path(__file__).resolve().parents[2]
POLICY = CHECKOUT / "deploy" / "dbus" / "iscsi-hba.conf"
IQN = "iqn.2003-01.org.example:disk1"
INITIATOR = "iqn.2024-01.org.example:unit-host"

DISK = {
    "name": "disk1", "target": IQN, "portal": "127.0.0.1:3260", "lun": 0, "device": "/dev/sdb",
    "by_id": "/dev/disk/by-id/wwn-0x6001405abc", "size": 64 << 20, "block_size": 512,
    "backstore": "user_1/hba-disk1", "scsi_address": "3:0:1:0", "state": "attached",
    "session": "logged in", "in_flight": 0, "commands": 12, "reconnects": 0,
}


# ------------------------------------------------------------------------------------------
# argument parsing


def parse(*argv: str) -> Any:
    return cli.build_parser().parse_args(list(argv))


def test_control_commands_parse() -> None:
    args = parse("attach", "iscsi://h/iqn.2003-01.org.example:x/0", "--json", "--timeout", "5")
    assert (args.handler, args.what, args.json, args.timeout) == \
        (control.cmd_attach, "iscsi://h/iqn.2003-01.org.example:x/0", True, 5.0)
    args = parse("detach", "/dev/sdb", "--force")
    assert (args.handler, args.what, args.force, args.json) == \
        (control.cmd_detach, "/dev/sdb", True, False)
    assert parse("detach", "disk1").force is False
    assert parse("list").handler is control.cmd_list
    assert parse("status", "--json").json is True
    args = parse("-v", "daemon", "--config", "/tmp/x.conf", "--initiator-name", INITIATOR, "-vv")
    assert (args.handler, args.config, args.initiator_name, args.verbose, args.daemon_verbose) \
        == (control.cmd_daemon, "/tmp/x.conf", INITIATOR, 1, 2)
    assert parse("daemon").config == "/etc/iscsi-hba.conf"


@pytest.mark.parametrize(("argv", "count"), [
    (["readcap", "iscsi://h/iqn.2003-01.org.example:x/0", "-v"], 1),
    (["discover", "iscsi://h", "-vv"], 2),
    (["list", "--verbose"], 1),
    (["top", "-v", "--count", "1"], 1),
])
def test_verbose_goes_after_the_command_too(argv: list[str], count: int) -> None:
    # "hbactl: error: unrecognized arguments: -v", as only `hbactl -v readcap ...` was taken.
    assert parse(*argv).command_verbose == count
    assert parse("-v", *argv).verbose == 1


def test_missing_argument_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse("attach")
    assert info.value.code == 2
    assert "URL|NAME" in capsys.readouterr().err


def imported_by(code: str, modules: tuple[str, ...]) -> list[str]:
    probe = f"import sys; {code}; print(sorted(m for m in {modules!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=CHECKOUT).stdout
    return list(json.loads(out.strip().replace("'", '"')))


def test_help_needs_neither_dbus_nor_the_daemon() -> None:
    assert imported_by("import hba.cli; hba.cli.build_parser().format_help()",
                       ("dbus_next", "hba.daemon", "hba.dbus_service", "hba.oneshot",
                        "rtslib_fb", "pyudev", "initiator.transport")) == []


def test_clients_load_no_initiator() -> None:
    # hbactl list/attach/... import the DBus names, not the protocol stack.
    assert imported_by("import hba.cli, hba.control, hba.dbus_service",
                       ("hba.daemon", "hba.oneshot", "initiator.transport", "initiator.pdu",
                        "tcmu_handler.dispatcher", "rtslib_fb", "pyudev")) == []


# ------------------------------------------------------------------------------------------
# sd_notify (tcmu_handler.sdnotify, shared with the standalone handler)


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"hba-unit-notify-{os.getpid()}-{time.monotonic_ns()}"
    sock.bind("\0" + name)
    sock.settimeout(5)
    yield sock, "@" + name
    sock.close()


def test_sd_notify_abstract_socket(notify_socket: tuple[socket.socket, str]) -> None:
    sock, address = notify_socket
    assert sd_notify("READY=1\nSTATUS=serving 2 disks", {"NOTIFY_SOCKET": address})
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving 2 disks"


def test_sd_notify_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        assert sd_notify("STOPPING=1", {"NOTIFY_SOCKET": str(path)})
        assert sock.recv(4096) == b"STOPPING=1"


def test_sd_notify_without_a_manager(tmp_path: Path) -> None:
    assert not sd_notify("READY=1", {})
    assert not sd_notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    assert not sd_notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1234"})


# ------------------------------------------------------------------------------------------
# formatting


def test_human_size() -> None:
    assert control.human_size(0) == "0 B"
    assert control.human_size(1023) == "1023 B"
    assert control.human_size(64 << 20) == "64.0 MiB"
    assert control.human_size(3 << 39) == "1.5 TiB"
    assert control.human_size(1 << 50) == "1.0 PiB"   # readcap's copy stopped at TiB


def test_table() -> None:
    other = dict(DISK, name="scratch-0", target="iqn.2003-01.org.example:scratch", lun=3,
                 device=None, size=1536 << 30, session="recovering")
    broken = dict(DISK, name="x", state="ring broken")
    lines = control.format_table([DISK, other, broken]).splitlines()
    assert lines[0].split() == ["NAME", "TARGET", "LUN", "DEVICE", "SIZE", "STATE"]
    assert lines[1].split() == ["disk1", IQN, "0", "/dev/sdb", "64.0", "MiB", "logged", "in"]
    assert lines[2].split() == ["scratch-0", "iqn.2003-01.org.example:scratch", "3", "-",
                                "1.5", "TiB", "recovering"]
    assert lines[3].endswith("ring broken")
    # Columns line up: every row starts its TARGET where the header does.
    col = lines[0].index("TARGET")
    assert all(line[col - 2: col] == "  " and line[col] != " " for line in lines)
    assert control.format_table([]) == "no LUNs attached"


MULTIPATH = dict(
    DISK, name="db", multipath=True, device="/dev/sdc", paths_up=1,
    holder="/dev/mapper/36001405abc",
    paths=[{"path": 1, "portal": "192.0.2.10:3260,1", "device": "/dev/sdc", "state": "up",
            "session": "logged in", "alua": "active/optimized", "error": None},
           {"path": 2, "portal": "192.0.2.11:3260,2", "device": "/dev/sdd", "state": "failed",
            "session": "failed", "alua": "standby", "since": 1_700_000_000.0,
            "error": "target \x1b]0;evil did not answer a NOP-Out ping"}])


def test_table_with_a_multipath_disk() -> None:
    lines = control.format_table([DISK, MULTIPATH]).splitlines()
    assert lines[0].split() == ["NAME", "TARGET", "LUN", "DEVICE", "PATHS", "SIZE", "STATE"]
    # The multipath device stands for the disk; a plain disk has its one path.
    assert lines[1].split()[3:] == ["/dev/sdb", "0/0", "64.0", "MiB", "logged", "in"]
    assert lines[2].split()[3:] == ["/dev/mapper/36001405abc", "1/2", "64.0", "MiB",
                                    "degraded"]
    row = control.normalize_disk(MULTIPATH)
    assert control.disk_state(row) == "degraded"
    assert control.disk_state(dict(row, paths_up=2, paths=[
        dict(p, state="up") for p in row["paths"]])) == "logged in"
    assert control.disk_state(dict(row, session="failed", paths=[
        dict(p, state="failed") for p in row["paths"]])) == "failed"


def test_status_shows_every_path_and_why_it_is_down() -> None:
    lines = control.format_paths(dict(MULTIPATH, hint="not assembled by multipathd: run it"))
    assert lines[0] == "  db path 1: 192.0.2.10:3260,1, /dev/sdc, up, ALUA active/optimized"
    assert re.fullmatch(r"  db path 2: 192\.0\.2\.11:3260,2, /dev/sdd, failed since "
                        r"\d\d:\d\d:\d\d, ALUA standby: target \\x1b\]0;evil did not "
                        r"answer a NOP-Out ping", lines[1]), lines[1]
    assert lines[2] == "  db: not assembled by multipathd: run it"
    # A plain disk's path is shown only when it is not up.
    assert control.format_paths(dict(DISK, paths=[{"path": 1, "state": "up"}])) == []
    down = control.format_paths(dict(DISK, paths=[{"path": 1, "portal": "h:3260,1",
                                                   "state": "down", "error": "lost"}]))
    assert down == ["  disk1 path 1: h:3260,1, no disk yet, down: lost"]
    text = control.format_status({"disks": [control.normalize_disk(MULTIPATH)],
                                  "sessions": [{"target": IQN, "portal": "192.0.2.10:3260",
                                                "state": "logged in", "luns": 1,
                                                "isid": "8012345a0000"}]})
    assert "0 reconnects, ISID 8012345a0000" in text and "db path 2: 192.0.2.11" in text


def test_status_text() -> None:
    status = {"pid": 42, "version": "0.1.0", "uptime": 3600.0, "ready": True,
              "initiator_name": INITIATOR, "config": "/etc/iscsi-hba.conf",
              "tcmu_handler": True, "disks": [DISK],
              "sessions": [{"target": IQN, "portal": "127.0.0.1:3260", "state": "logged in",
                            "luns": 1, "commands": 12, "reconnects": 0}]}
    text = control.format_status(status)
    assert "pid 42" in text and "up 60 min" in text
    assert f"{IQN} at 127.0.0.1:3260: logged in, 1 LUN, 12 commands" in text
    assert "user:iscsi offered" in text
    assert "disk1" in text.splitlines()[-1]
    assert "workers:" not in text
    pooled = dict(status, disks=[dict(DISK, worker=7)], workers=[{"index": 0, "pid": 7},
                                                                 {"index": 1, "pid": 8}])
    assert "workers:        pid 7 (1 disk), pid 8 (0 disks)" in control.format_status(pooled)
    assert "workers:        none running yet" in control.format_status(dict(status, workers=[]))
    # A configuration path is any bytes a file name may hold: shown escaped.
    odd = control.format_status(dict(status, config="/tmp/x\x1b[2J\nfake: line"))
    assert "configuration:  /tmp/x\\x1b[2J\\nfake: line" in odd


def test_status_of_a_disk_being_taken_over_is_no_retry() -> None:
    # A worker that died: its disks' rows carry why; status said "attempt ? failed, next in
    # 0 s" of them, as if they were entries being retried.
    why = "worker 1 ended; a new worker takes over its disks"
    text = control.format_status({"disks": [dict(DISK, state="taking over", error=why)]})
    assert text.splitlines()[-1] == f"  disk1: {why}"


def test_disk_states_are_plain_strings_on_the_wire() -> None:
    """``list``/``status --json`` and the DBus dictionaries carry a disk's state as the same
    strings as before it became an enum; the STATE column shows the session instead of
    ``attached``."""
    assert {s.name: s.value for s in DiskState} == {
        "ATTACHING": "attaching", "ATTACHED": "attached", "DETACHING": "detaching",
        "DETACHED": "detached", "RING_BROKEN": "ring broken", "RETRYING": "retrying",
        "TAKEOVER": "taking over", "FAILED": "failed", "UNSERVED": "not served"}
    spec = LunSpec(name="disk1", portals=(Portal("127.0.0.1", 3260),), target=IQN, lun=0,
                   session=SessionConfig(initiator_name=INITIATOR))
    path = spec.paths()[0]
    disk = Disk(spec=spec, paths=[DiskPath(spec=path, backstore=path.backstore, hba_index=1,
                                       session=Session(spec.portal, spec.target,
                                                       spec.session))], size=64 << 20)
    row = disk.describe()
    assert row["state"] == "attaching" and type(row["state"]) is str
    assert disk.describe(DiskState.DETACHED)["state"] == "detached"
    assert disk.state is DiskState.ATTACHING   # describing the end does not change it
    disk.state = DiskState.ATTACHED
    row = disk.describe()
    assert json.loads(json.dumps(row))["state"] == "attached"
    assert dbus_service.unwrap(dbus_service.vardict(row))["state"] == "attached"
    assert set(row) <= set(control.DISK_FIELDS)
    assert control.disk_state(row) == row["session"]
    for state in (DiskState.DETACHING, DiskState.RING_BROKEN, DiskState.RETRYING):
        assert control.disk_state(dict(row, state=state.value)) == state.value


def test_normalize_disk_fills_every_field() -> None:
    sparse = {"name": "d", "state": "attached"}
    full = control.normalize_disk(sparse)
    assert set(full) == set(control.DISK_FIELDS)
    assert full["device"] is None and full["name"] == "d"


# ------------------------------------------------------------------------------------------
# DBus values and errors


def test_variants_round_trip() -> None:
    status = {"pid": 7, "ready": True, "uptime": 1.5, "config": None,
              "disks": [DISK, dict(DISK, device=None)], "sessions": [], "names": ["a", "b"]}
    wire = dbus_service.vardict(status)
    assert "config" not in wire
    assert wire["pid"].signature == "x" and wire["ready"].signature == "b"
    assert wire["disks"].signature == "aa{sv}"
    back = dbus_service.unwrap(wire)
    assert back["disks"][0] == DISK
    assert "device" not in back["disks"][1]
    assert back["sessions"] == [] and back["names"] == ["a", "b"] and back["uptime"] == 1.5
    with pytest.raises(TypeError):
        dbus_service.to_variant(object())


@pytest.mark.parametrize(("exc", "doing", "name"), [
    (DiskBusyError("d (/dev/sdb) is in use"), "detach", dbus_service.Errors.IN_USE),
    (NoSuchDiskError("no attached LUN is called 'x'"), "detach",
     dbus_service.Errors.NO_SUCH_DISK),
    (DetachError("could not remove"), "detach", dbus_service.Errors.DETACH_FAILED),
    (KernelSetupError("the kernel is not ready"), "attach",
     dbus_service.Errors.KERNEL_NOT_READY),
    (ConfigError(["/etc/x.conf:3: bad"]), "attach", dbus_service.Errors.CONFIG),
    (AttachError("attaching d failed"), "attach", dbus_service.Errors.ATTACH_FAILED),
    (AuthenticationError("authentication failed"), "attach",
     dbus_service.Errors.ATTACH_FAILED),
])
def test_dbus_error_names(exc: Exception, doing: str, name: str) -> None:
    error = dbus_service.dbus_error(exc, doing)
    assert (error.type, error.text) == (name, str(exc))


def test_unexpected_exception_reveals_no_internals(caplog: pytest.LogCaptureFixture) -> None:
    error = dbus_service.dbus_error(KeyError("secret-ish internals"), "attach")
    assert error.type == dbus_service.Errors.FAILED
    assert "internals" not in error.text and "KeyError" in error.text
    assert "internal error during attach" in caplog.text  # the traceback goes to the log


@pytest.mark.parametrize(("name", "expected"), [
    ("org.freedesktop.DBus.Error.ServiceUnknown", "systemctl start iscsi-hba"),
    ("org.freedesktop.DBus.Error.NameHasNoOwner", "hbactl daemon"),
    ("org.freedesktop.DBus.Error.AccessDenied", "only root"),
    ("org.freedesktop.DBus.Error.NoReply", "did not answer"),
    ("org.freedesktop.DBus.Error.UnknownMethod", "another version"),
    ("org.iscsihba.Error.InUse", "the daemon's own sentence"),
    ("org.example.Other", "org.example.Other"),
])
def test_client_errors(name: str, expected: str) -> None:
    error = control.client_error(name, "the daemon's own sentence", "attach")
    assert expected in str(error)
    assert "\n" not in str(error)
    if "ServiceUnknown" in name or "NameHasNoOwner" in name:
        assert isinstance(error, control.DaemonNotRunning)


def test_a_configuration_error_from_the_daemon_prints_a_problem_a_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    problems = ConfigError(["/etc/x.conf:2: Lun 'x' is bad", "/etc/x.conf:5: unknown key '\x1b'"],
                           path="/etc/x.conf")
    sent = dbus_service.dbus_error(problems, "attach")

    async def refused(*args: Any, **kwargs: Any) -> list[Any]:
        raise control.client_error(sent.type, sent.text, "attach")

    monkeypatch.setattr(control, "call", refused)
    assert cli.main(["attach", "disk1"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "hbactl: 2 problems in /etc/x.conf:",
        "  /etc/x.conf:2: Lun 'x' is bad",
        "  /etc/x.conf:5: unknown key '\\x1b'",
    ]


def test_environment_secrets_reach_the_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "iscsi://host1@192.0.2.1/iqn.2003-01.org.example:d/0?header_digest=crc32c"
    monkeypatch.delenv("ISCSI_HBA_CHAP_SECRET", raising=False)
    monkeypatch.delenv("LIBISCSI_CHAP_PASSWORD", raising=False)
    with pytest.raises(ConfigurationError, match="no secret"):  # hbactl says so itself
        control._with_env_secrets(url)
    plain = "iscsi://192.0.2.1/iqn.2003-01.org.example:d/0"
    assert control._with_env_secrets(plain) == plain
    assert control._with_env_secrets("disk1") == "disk1"
    monkeypatch.setenv("ISCSI_HBA_CHAP_SECRET", "a secret/with %odd& chars")
    monkeypatch.setenv("ISCSI_HBA_TARGET_CHAP_NAME", "tgt")
    monkeypatch.setenv("ISCSI_HBA_TARGET_CHAP_SECRET", "another secret?")
    sent = control._with_env_secrets(url)
    parsed = parse_url(sent, environ={})  # the daemon's environment has none of them
    assert (parsed.chap_user, parsed.chap_secret, parsed.target_user, parsed.target_secret) == \
        ("host1", "a secret/with %odd& chars", "tgt", "another secret?")
    assert parsed.header_digest is not None and parsed.header_digest.value == "crc32c"


# ------------------------------------------------------------------------------------------
# a private bus configured like the system bus


BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"""


@pytest.fixture
def system_bus(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A dbus-daemon with the system bus's default policy and ours; its address is in
    ``DBUS_SYSTEM_BUS_ADDRESS`` (which dbus-next, gdbus and hbactl honour)."""
    if shutil.which("dbus-daemon") is None:
        pytest.fail("dbus-daemon is not installed (Debian package dbus): run deploy/setup")
    workdir = Path(tempfile.mkdtemp(prefix="hba-bus-"))
    workdir.chmod(0o755)  # the unprivileged client of the policy test connects too
    sock = workdir / "socket"
    config = workdir / "bus.conf"
    config.write_text(BUS_CONFIG.format(socket=sock, policy=POLICY))
    proc = subprocess.Popen(["dbus-daemon", f"--config-file={config}", "--nofork",
                             "--nopidfile"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    # Until it accepts: the socket's file exists from bind(), and a connection between that
    # and listen() is refused ("system DBus connection refused", seen on a busy machine).
    while not _accepts(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"dbus-daemon did not start: {err.decode()}")
        time.sleep(0.02)
    address = f"unix:path={sock}"
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", address)
    yield address
    proc.terminate()
    proc.wait(timeout=10)
    shutil.rmtree(workdir, ignore_errors=True)


def _accepts(path: Path) -> bool:
    """Whether a Unix socket at ``path`` takes a connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class Described:
    """What ``Daemon.attach`` returns, as far as the service looks at it."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def describe(self) -> dict[str, Any]:
        return self.data


class StandIn(Daemon):
    """A daemon without a kernel: attach/detach/list answer from a dict."""

    def __init__(self, options: DaemonOptions) -> None:
        super().__init__(options)
        self.table: dict[str, dict[str, Any]] = {}
        self.mounted: set[str] = set()

    async def attach(self, what: str) -> Disk:
        if what == "bad":
            raise AttachError("'bad' is neither an iscsi:// URL nor the nickname of an entry")
        if what == "boom":
            raise RuntimeError("a bug")
        self.table[what] = dict(DISK, name=what)
        if self.options.on_event is not None:
            self.options.on_event("attach", self.table[what])

        return Described(self.table[what])  # type: ignore[return-value]

    async def detach(self, what: str, *, force: bool = False) -> dict[str, Any]:
        if what not in self.table:
            raise NoSuchDiskError(f"no attached LUN is called {what!r} (attached: none)")
        if what in self.mounted and not force:
            raise DiskBusyError(f"{what} (/dev/sdb) is in use: /dev/sdb is mounted on /mnt. "
                                "Unmount it first, or detach with --force")
        return dict(self.table.pop(what), state="detached")

    def list(self) -> list[dict[str, Any]]:
        return list(self.table.values())

    async def refresh_devices(self) -> None:
        pass


@pytest.fixture
async def service(system_bus: str, monkeypatch: pytest.MonkeyPatch
                  ) -> AsyncIterator[dbus_service.DaemonService]:
    monkeypatch.setattr("hba.kernel.preflight", lambda: None)
    daemon = StandIn(DaemonOptions(initiator_name=INITIATOR))
    svc = await dbus_service.DaemonService.connect(daemon)
    await svc.claim()
    daemon.options.on_event = svc.publish
    svc.set_ready()
    yield svc
    await svc.close()


def ns(**kw: Any) -> Any:
    import argparse

    return argparse.Namespace(**{"timeout": 10.0, "force": False, **kw})


async def test_attach_list_status_detach_over_the_bus(
        service: dbus_service.DaemonService) -> None:
    disk = await control.cmd_attach(ns(what="disk1"))
    assert disk["device"] == "/dev/sdb" and disk["name"] == "disk1"
    assert set(disk) == set(control.DISK_FIELDS)
    listed = await control.cmd_list(ns())
    assert [d["name"] for d in listed["disks"]] == ["disk1"]
    status = await control.cmd_status(ns())
    assert status["pid"] == os.getpid() and status["ready"] is True
    assert status["tcmu_handler"] is True and status["initiator_name"] == INITIATOR
    assert status["disks"][0]["by_id"] == DISK["by_id"]
    json.dumps(status)  # what --json prints

    service.daemon.mounted.add("disk1")  # type: ignore[attr-defined]
    with pytest.raises(control.ControlError, match="in use: /dev/sdb is mounted on /mnt"):
        await control.cmd_detach(ns(what="disk1"))
    gone = await control.cmd_detach(ns(what="disk1", force=True))
    assert gone["state"] == "detached"
    with pytest.raises(control.ControlError, match="no attached LUN is called 'disk1'"):
        await control.cmd_detach(ns(what="disk1"))


async def test_daemon_errors_reach_the_client_as_sentences(
        service: dbus_service.DaemonService, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(control.ControlError, match="neither an iscsi:// URL") as info:
        await control.cmd_attach(ns(what="bad"))
    assert "Traceback" not in str(info.value)
    with pytest.raises(control.ControlError, match="internal error") as info:
        await control.cmd_attach(ns(what="boom"))
    assert "a bug" not in str(info.value)
    await asyncio.sleep(0.05)
    # The refused attach is no error of the daemon's; the bug is logged once, with its cause.
    assert caplog.text.count("Traceback") == 1 and "a bug" in caplog.text


async def test_client_without_a_daemon(system_bus: str) -> None:
    with pytest.raises(control.DaemonNotRunning, match="systemctl start iscsi-hba"):
        await control.cmd_list(ns())


@pytest.mark.parametrize("argv", [["attach", "disk\udcff"], ["attach", "a\x00b"],
                                  ["detach", "a\x00b"], ["detach", "/dev/sd\udcff"]],
                         ids=["attach-not-utf8", "attach-nul", "detach-nul", "detach-not-utf8"])
def test_an_argument_dbus_cannot_carry_is_a_usage_error(
        system_bus: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # Not UTF-8: dbus-next raised UnicodeEncodeError; a NUL: the bus dropped the connection
    # (EOFError). Both were tracebacks.
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"hbactl: the argument of hbactl {argv[0]} is not text a DBus call")
    assert err.count("\n") == 1


@pytest.mark.parametrize("argv", [
    ["attach", "disk1", "--timeout", "nan"], ["attach", "disk1", "--timeout", "0"],
    ["detach", "disk1", "--timeout", "-1"], ["top", "--interval", "nan"],
    ["top", "--interval", "inf"], ["top", "--count", "0"],
    ["perf", "iscsi://192.0.2.1/iqn.2003-01.org.example:x/0", "--seconds", "nan"],
])
def test_a_bound_that_is_no_number_of_seconds_is_a_usage_error(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # NaN passed the '<= 0' checks (perf ran 0 s, top slept NaN); attach and detach checked
    # nothing, and asyncio gave up before sending the call, saying it goes on.
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("hbactl: --") and err.count("\n") == 1


async def test_a_daemon_that_does_not_answer_a_question(
        system_bus: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon that owns its name but answers nothing (stopped, wedged): list and status
    said "it goes on in the background: see `hbactl list`" of a question."""
    from dbus_next.aio.message_bus import MessageBus
    from dbus_next.constants import BusType

    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    try:
        await bus.request_name(dbus_service.BUS_NAME)
        bus.add_message_handler(lambda message: True)   # taken, never answered
        monkeypatch.setattr(control, "QUERY_TIMEOUT", 0.2)
        for command in (control.cmd_list, control.cmd_status):
            with pytest.raises(control.ControlError) as info:
                await command(ns())
            assert "did not answer" in str(info.value)
            assert str(info.value).endswith(
                "within 0.2 s: it is hung or overloaded; see its log (`journalctl -u iscsi-hba`)")
    finally:
        bus.disconnect()  # type: ignore[no-untyped-call]


async def test_client_without_a_bus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/none")
    with pytest.raises(control.DaemonNotRunning, match="cannot reach the system DBus"):
        await control.cmd_status(ns())


async def test_signals(service: dbus_service.DaemonService, system_bus: str) -> None:
    from dbus_next.aio.message_bus import MessageBus
    from dbus_next.message import Message

    listener = await MessageBus(bus_address=system_bus).connect()
    got: asyncio.Queue[Message] = asyncio.Queue()

    def on_message(msg: Message) -> bool:
        if msg.interface == dbus_service.INTERFACE:
            got.put_nowait(msg)
        return False

    listener.add_message_handler(on_message)
    await listener.call(Message(
        destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus", member="AddMatch", signature="s",
        body=[f"type='signal',interface='{dbus_service.INTERFACE}'"]))
    await control.cmd_attach(ns(what="disk2"))
    service.publish("session", {"target": IQN, "portal": "127.0.0.1:3260",
                                "state": "recovering"})
    attached = await asyncio.wait_for(got.get(), 5)
    assert attached.member == "DiskAttached"
    assert dbus_service.unwrap(attached.body[0])["name"] == "disk2"
    changed = await asyncio.wait_for(got.get(), 5)
    assert (changed.member, changed.body) == \
        ("SessionStateChanged", [IQN, "127.0.0.1:3260", "recovering"])
    listener.disconnect()  # type: ignore[no-untyped-call]


async def test_second_daemon_is_refused(service: dbus_service.DaemonService) -> None:
    other = await dbus_service.DaemonService.connect(StandIn(DaemonOptions()))
    try:
        with pytest.raises(dbus_service.BusNameTaken,
                           match=rf"another iscsi-hba daemon \(pid {os.getpid()}\) already"):
            await other.claim()
    finally:
        await other.close()


async def gdbus_as_nobody(address: str, dest: str, path: str, method: str,
                         *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "gdbus", "call", "--address", address, "--dest", dest, "--object-path", path,
        "--method", method, *args, user=65534, group=65534, extra_groups=[],
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode()


async def test_policy_lets_everyone_read_and_only_root_change(
        service: dbus_service.DaemonService, system_bus: str) -> None:
    """As ``nobody`` (the loop keeps serving while gdbus runs): List, Status and the handler's
    read side work; Attach, Detach and CheckConfig are refused by the bus itself."""
    if shutil.which("gdbus") is None:
        pytest.fail("gdbus is not installed (Debian package libglib2.0-bin): run deploy/setup")
    daemon, handler = dbus_service.BUS_NAME, dbus_service.TCMU_BUS_NAME
    allowed = [
        (daemon, dbus_service.OBJECT_PATH, f"{dbus_service.INTERFACE}.List"),
        (daemon, dbus_service.OBJECT_PATH, f"{dbus_service.INTERFACE}.Status"),
        (handler, dbus_service.TCMU_ROOT, "org.freedesktop.DBus.ObjectManager.GetManagedObjects"),
        (handler, dbus_service.HANDLER_PATH, "org.freedesktop.DBus.Properties.Get",
         "org.kernel.TCMUService1", "ConfigDesc"),
    ]
    for dest, path, method, *args in allowed:
        status, out = await gdbus_as_nobody(system_bus, dest, path, method, *args)
        assert status == 0, (method, out)
    refused = [
        (daemon, dbus_service.OBJECT_PATH, f"{dbus_service.INTERFACE}.Attach", "disk9"),
        (daemon, dbus_service.OBJECT_PATH, f"{dbus_service.INTERFACE}.Detach", "disk9", "true"),
        (daemon, dbus_service.OBJECT_PATH, f"{dbus_service.INTERFACE}.Reload"),
        (handler, dbus_service.HANDLER_PATH, "org.kernel.TCMUService1.CheckConfig", "iscsi/x"),
    ]
    for dest, path, method, *args in refused:
        status, out = await gdbus_as_nobody(system_bus, dest, path, method, *args)
        assert status != 0 and "org.freedesktop.DBus.Error.AccessDenied" in out, (method, out)
    assert service.daemon.list() == []  # nothing got through


# ------------------------------------------------------------------------------------------
# org.kernel.TCMUService1


async def call(bus_address: str, path: str, interface: str, member: str,
               signature: str = "", body: list[Any] | None = None) -> list[Any]:
    from dbus_next.aio.message_bus import MessageBus
    from dbus_next.constants import MessageType
    from dbus_next.message import Message

    bus = await MessageBus(bus_address=bus_address).connect()
    try:
        reply = await bus.call(Message(destination=dbus_service.TCMU_BUS_NAME, path=path,
                                       interface=interface, member=member,
                                       signature=signature, body=body or []))
    finally:
        bus.disconnect()  # type: ignore[no-untyped-call]
    assert reply is not None
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    return list(reply.body)


async def test_refused_calls_log_no_traceback(service: dbus_service.DaemonService,
                                             system_bus: str,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """targetcli's proxies ask GetAll on /org/kernel/TCMUService1, where nothing is exported:
    an error reply, and no traceback in the daemon's log (dbus-next would log one)."""
    from dbus_next.aio.message_bus import MessageBus
    from dbus_next.constants import MessageType
    from dbus_next.message import Message

    bus = await MessageBus(bus_address=system_bus).connect()
    try:
        reply = await bus.call(Message(
            destination=dbus_service.TCMU_BUS_NAME, path=dbus_service.TCMU_ROOT,
            interface="org.freedesktop.DBus.Properties", member="GetAll", signature="s",
            body=["org.freedesktop.DBus.ObjectManager"]))
    finally:
        bus.disconnect()  # type: ignore[no-untyped-call]
    assert reply is not None and reply.message_type == MessageType.ERROR
    with pytest.raises(control.ControlError, match="no attached LUN"):
        await control.cmd_detach(ns(what="nothing"))
    assert "Traceback" not in caplog.text and "unexpected error" not in caplog.text


async def test_targetcli_discovers_the_handler(service: dbus_service.DaemonService,
                                               system_bus: str) -> None:
    (objects,) = await call(system_bus, dbus_service.TCMU_ROOT,
                            "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
    assert list(objects) == [dbus_service.HANDLER_PATH]
    props = objects[dbus_service.HANDLER_PATH]["org.kernel.TCMUService1"]
    assert "%3A" in props["ConfigDesc"].value and "nickname" in props["ConfigDesc"].value
    ok, message = await call(system_bus, dbus_service.HANDLER_PATH, "org.kernel.TCMUService1",
                             "CheckConfig", "s", ["iscsi/not a cfgstring"])
    assert not ok and "spaces" in message


@pytest.fixture
async def fake_portal() -> AsyncIterator[FakeTargetServer]:
    target = FakeTarget([TargetNode(IQN, {0: RamDisk(blocks=4096), 2: RamDisk(blocks=8)})])
    server = await FakeTargetServer(target).start()
    yield server
    await server.stop()


def write_config(path: Path, text: str, mode: int = 0o600) -> str:
    path.write_text(text)
    path.chmod(mode)
    return str(path)


@pytest.fixture(autouse=True)
def priorities(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The nice values run_daemon() gives itself (hba.priority), recorded instead of set: the
    test runner keeps its own priority."""
    given: list[int] = []

    def record(nice: int, what: str = "daemon") -> bool:
        given.append(nice)
        return True

    monkeypatch.setattr("hba.priority.raise_priority", record)
    return given


@pytest.mark.parametrize(("text", "option", "expected"), [
    ("", None, None), ("Priority = 5\n", None, 5), ("Priority = 5\n", -3, -3),
    ("Priority = 5\n", 0, 0), ("", -7, -7)])
async def test_daemon_priority_comes_from_the_option_the_file_or_the_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, priorities: list[int], text: str,
        option: int | None, expected: int | None) -> None:
    options: list[DaemonOptions] = []

    def stop_here(self: Daemon, given: DaemonOptions) -> None:
        options.append(given)
        raise ConfigurationError("stop here")

    monkeypatch.setattr(Daemon, "__init__", stop_here)
    config = write_config(tmp_path / "hba.conf", text)
    with pytest.raises(control.StartupError, match="stop here"):
        await control.run_daemon(config, INITIATOR, priority=option, workers=2)
    # The main process first, then each worker (its command line: hba.workers).
    # None: the priority it was started with is left alone.
    assert priorities == ([] if expected is None else [expected])
    assert options[0].priority == expected


async def test_check_config_logs_in_and_asks_the_lun(
        fake_portal: FakeTargetServer, tmp_path: Path) -> None:
    port = fake_portal.port
    config = write_config(tmp_path / "hba.conf", "")
    daemon = Daemon(DaemonOptions(config_path=config, initiator_name=INITIATOR))
    await daemon.reload_config()
    encoded = f"127.0.0.1%3A{port}/{IQN.replace(':', '%3A')}"

    ok, message = await dbus_service.check_config(daemon, f"iscsi/{encoded}/0")
    assert ok, message
    assert message == (f"{IQN} LUN 0 at 127.0.0.1:{port} answers: 2097152 bytes (2.0 MiB), "
                       "4096 blocks of 512 bytes")
    ok, message = await dbus_service.check_config(daemon, f"{encoded}/2")
    assert ok and "8 blocks" in message

    ok, message = await dbus_service.check_config(daemon, f"iscsi/{encoded}/5")
    assert not ok and f"{IQN} LUN 5" in message

    ok, message = await dbus_service.check_config(daemon, f"iscsi/127.0.0.1:{port}/{IQN}/0")
    assert not ok and f"cfgstring={encoded}/0" in message

    # A nickname added to the file after the start: read again, then logged in with it.
    ok, message = await dbus_service.check_config(daemon, "iscsi/later")
    assert not ok and "'later' is not the nickname of an entry" in message
    write_config(tmp_path / "hba.conf",
                 f"later {{\n  TargetAddress = 127.0.0.1:{port}\n  TargetName = {IQN}\n}}\n")
    ok, message = await dbus_service.check_config(daemon, "iscsi/later")
    assert ok, message


async def test_check_config_failures_are_readable(fake_portal: FakeTargetServer,
                                                  tmp_path: Path) -> None:
    daemon = Daemon(DaemonOptions(initiator_name=INITIATOR))
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    cases = {
        "iscsi/": "empty",
        "iscsi/a,b": "','",
        "iscsi/x/y": "neither a configuration nickname",
        f"iscsi/127.0.0.1%3A{dead_port}/{IQN.replace(':', '%3A')}/0": "Connection refused",
        "iscsi/127.0.0.1%3A1/not-an-iqn/0": "not-an-iqn",
        "iscsi/" + "a" * 300: "longer than the kernel's 255",
    }
    for cfg, expected in cases.items():
        ok, message = await dbus_service.check_config(daemon, cfg, timeout=5)
        assert not ok and expected in message, (cfg, message)
        assert "\n" not in message

    # A target that accepts the connection but never answers: the short timeout applies.
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    started = time.monotonic()
    ok, message = await dbus_service.check_config(
        daemon, f"127.0.0.1%3A{port}/{IQN.replace(':', '%3A')}/0", timeout=1.0)
    assert not ok and time.monotonic() - started < 5
    assert "did not answer within 1 s" in message or "timed out" in message, message
    server.close()
    with contextlib.suppress(Exception):
        await server.wait_closed()


# ------------------------------------------------------------------------------------------
# hbactl daemon: configuration first, name, READY=1, STOPPING=1


async def test_daemon_refuses_a_config_others_can_read(tmp_path: Path) -> None:
    config = write_config(tmp_path / "hba.conf",
                          "d {\n TargetAddress = 192.0.2.1\n TargetName = iqn.2003-01.org.e:x\n"
                          " chapIName = me\n chapSecret = a-long-enough-secret\n bogus = 1\n}\n",
                          0o644)
    with pytest.raises(control.StartupError) as info:
        await control.run_daemon(config)
    assert info.value.exit_status == control.EXIT_CONFIG
    message = str(info.value)
    assert f"chmod 600 {config}" in message
    assert f"{config}:6:" in message  # and the bad line, in the same report
    assert "a-long-enough-secret" not in message


def test_daemon_prints_each_problem_of_its_configuration_on_a_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "hba.conf", "a {\n Lun = x\n}\nb {\n Foo\x1b[2J = 1\n}\n")
    root = logging.getLogger()
    before = list(root.handlers), root.level
    assert cli.main(["daemon", "--config", config]) == control.EXIT_CONFIG
    # The daemon's logging set-up, which replaces the root logger's handlers, is a no-op in
    # every unit test without a stub of its own (tests/unit/conftest.py).
    assert (list(root.handlers), root.level) == before
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"hbactl: 6 problems in {config}:"
    assert lines[3] == (f"  {config}:2: Lun 'x' must be a whole number from 0 to 65535 (the LUN "
                        "as lsscsi and libiscsi number it)")
    assert lines[6] == f"  {config}:5: unknown key 'Foo\\x1b[2J' in \"b\""
    assert len(lines) == 7


async def test_a_bad_configuration_on_reload_is_logged_a_problem_a_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = write_config(tmp_path / "hba.conf", "")
    daemon = Daemon(DaemonOptions(config_path=config, initiator_name="iqn.2024-01.org.e:i"))
    write_config(tmp_path / "hba.conf", "a {\n Lun = x\n}\n")
    with caplog.at_level("ERROR", logger="iscsi-hba"):
        await control._reload(daemon)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == f"keeping the previous configuration: 3 problems in {config}:"
    assert messages[3].startswith(f"keeping the previous configuration: {config}:2: Lun 'x'")
    assert all("\n" not in m for m in messages) and len(messages) == 4


async def test_daemon_with_a_dangling_config_symlink_says_so(tmp_path: Path) -> None:
    # A link to a configuration that went away is not "no configuration".
    link = tmp_path / "hba.conf"
    link.symlink_to(tmp_path / "gone.conf")
    with pytest.raises(control.StartupError, match=rf"cannot open {link}: No such file") as info:
        await control.run_daemon(str(link), INITIATOR)
    assert info.value.exit_status == control.EXIT_CONFIG


def test_daemon_with_a_mistyped_config_path_refuses_to_start(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``hbactl daemon --config /etc/iscsi-hba.cnf`` started a daemon that attached nothing
    and said so only at level info; only the default path may be missing."""
    missing = tmp_path / "iscsi-hba.cnf"
    assert cli.main(["daemon", "--config", str(missing), "--initiator-name", INITIATOR,
                     "--workers", "1"]) == control.EXIT_CONFIG
    assert capsys.readouterr().err == (
        f"hbactl: configuration file {missing} does not exist; check the path given to "
        "--config (only the default, /etc/iscsi-hba.conf, may be missing: then the daemon "
        "attaches nothing at start)\n")


def test_daemon_with_an_empty_or_unprintable_config_path_says_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # `--config ''` said "configuration file  does not exist"; a line break in the path
    # broke the one line in two.
    assert cli.main(["daemon", "--config", "", "--initiator-name", INITIATOR,
                     "--workers", "1"]) == control.EXIT_CONFIG
    assert capsys.readouterr().err == (
        "hbactl: --config is empty; give the configuration file's path (the default is "
        "/etc/iscsi-hba.conf)\n")
    odd = f"{tmp_path}/a\nb.conf"
    assert cli.main(["daemon", "--config", odd, "--initiator-name", INITIATOR,
                     "--workers", "1"]) == control.EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path}/a\\nb.conf does not exist" in err, err


async def test_daemon_with_an_unusable_initiator_name_file_is_not_restarted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "initiatorname.iscsi"
    path.write_bytes(b"InitiatorName=iqn.1993-08.org.debian:01:\xff\n")
    monkeypatch.setattr("hba.daemon.default_initiator_name",
                        lambda: default_initiator_name(str(path)))
    with pytest.raises(control.StartupError, match="is not UTF-8 text") as info:
        await control.run_daemon(None)
    # EX_CONFIG, which the unit's RestartPreventExitStatus names: restarting cannot help.
    assert info.value.exit_status == control.EXIT_CONFIG


async def test_daemon_start_notify_and_stop(system_bus: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            notify_socket: tuple[socket.socket, str]) -> None:
    sock, address = notify_socket
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    started: list[str] = []

    async def start(self: Daemon, *, attach_enabled: bool = True) -> None:
        await self.reload_config()
        started.append(self.initiator_name)

    async def stop(self: Daemon) -> None:
        started.append("stopped")

    monkeypatch.setattr(Daemon, "start", start)
    monkeypatch.setattr(Daemon, "stop", stop)
    config = write_config(tmp_path / "hba.conf", "")
    task = asyncio.ensure_future(control.run_daemon(config, INITIATOR))
    loop = asyncio.get_running_loop()
    messages: list[str] = []
    while not any("READY=1" in m for m in messages):
        messages.append((await asyncio.wait_for(loop.sock_recv(sock, 4096), 10)).decode())
        assert not task.done(), task
    assert "STATUS=serving 0 disks" in messages[-1]
    assert started == [INITIATOR]
    status = await control.cmd_status(ns())
    assert status["ready"] is True and status["config"] == config

    with pytest.raises(control.StartupError, match="already runs"):
        await control.run_daemon(config, INITIATOR)

    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(task, 10) == 0
    assert started[-1] == "stopped"
    rest = []
    with contextlib.suppress(BlockingIOError):
        while True:
            rest.append(sock.recv(4096).decode())
    assert "STOPPING=1" in rest
    with pytest.raises(control.DaemonNotRunning):
        await control.cmd_list(ns())


async def test_each_entry_attached_at_start_extends_systemds_start_timeout(
        system_bus: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        notify_socket: tuple[socket.socket, str]) -> None:
    """The start attaches the entries one after the other: with many, it outlasted the
    unit's TimeoutStartSec and systemd killed the daemon before READY=1, on every restart.
    Each entry now extends the start, and STATUS names it."""
    sock, address = notify_socket
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setattr("hba.kernel.preflight", lambda: None)
    monkeypatch.setattr("hba.kernel.list_backstores", lambda: [])
    attempts: list[str] = []

    async def attach_described(self: Daemon, what: str) -> dict[str, Any]:
        attempts.append(what)
        raise AttachError(f"attaching {what} failed: authentication failed")

    monkeypatch.setattr(Daemon, "attach_described", attach_described)
    text = "".join(f"{name} {{ TargetAddress = 127.0.0.1:1\n TargetName = {IQN}\n"
                   f" LoginTimeout = {timeout} }}\n" for name, timeout in [("a", 15), ("b", 60)])
    task = asyncio.ensure_future(control.run_daemon(write_config(tmp_path / "hba.conf", text),
                                                    INITIATOR, workers=1))
    loop = asyncio.get_running_loop()
    messages: list[str] = []
    while not any("READY=1" in m for m in messages):
        messages.append((await asyncio.wait_for(loop.sock_recv(sock, 4096), 10)).decode())
        assert not task.done(), task
    extended = [m for m in messages if "EXTEND_TIMEOUT_USEC" in m]
    assert extended == [
        "EXTEND_TIMEOUT_USEC=330000000\nSTATUS=starting: attaching a (1 of 2)",
        "EXTEND_TIMEOUT_USEC=420000000\nSTATUS=starting: attaching b (2 of 2)"]
    assert attempts == ["a", "b"]
    # A reload attaches too, after the start: nothing to extend then.
    os.kill(os.getpid(), signal.SIGHUP)
    async with asyncio.timeout(10):
        while len(attempts) < 4:
            await asyncio.sleep(0.01)
    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(task, 10) == 0
    rest = []
    with contextlib.suppress(BlockingIOError):
        while True:
            rest.append(sock.recv(4096).decode())
    assert not any("EXTEND_TIMEOUT_USEC" in m for m in rest), rest


@pytest.mark.parametrize("argv", [["status"], ["list"], ["list", "--json"]])
def test_a_reader_that_stops_reading_is_no_error(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        argv: list[str]) -> None:
    """``hbactl status | head -3``: the pipe closed before the output was written, and hbactl
    ended with a BrokenPipeError traceback."""
    async def status(args: Any) -> dict[str, Any]:
        return {"pid": 1, "version": "0", "uptime": 1.0, "ready": True, "disks": [DISK],
                "sessions": [], "initiator_name": INITIATOR, "config": None}

    monkeypatch.setattr(control, "cmd_status", status)
    monkeypatch.setattr(control, "cmd_list", status)
    read, write = os.pipe()
    os.close(read)
    with capsys.disabled(), open(write, "w", encoding="utf-8") as pipe:
        monkeypatch.setattr(sys, "stdout", pipe)
        assert cli.main(argv) == 0
        pipe.write("x" * 100_000)   # now /dev/null: the exit's flush cannot fail either
        pipe.flush()


def test_daemon_lists_the_kernel_problems_a_line_each(
        system_bus: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """On a host without the target modules the preflight names each one with its fix; they
    were printed as one line with their newlines escaped (``\\n  - kernel module ...``)."""
    def not_ready(configfs: Path = Path(), *, load_modules: bool = True) -> None:
        raise KernelSetupError("the kernel is not ready for iscsi-hba:\n  - module a missing"
                               "\n  - module b missing")

    monkeypatch.setattr("hba.kernel.preflight", not_ready)
    config = write_config(tmp_path / "hba.conf", "")
    assert cli.main(["daemon", "--config", config, "--initiator-name", INITIATOR,
                     "--workers", "1"]) == control.EXIT_CONFIG
    assert capsys.readouterr().err.splitlines() == [
        "hbactl: the kernel is not ready for iscsi-hba:", "  - module a missing",
        "  - module b missing"]


async def test_daemon_pcap_records_each_session(fake_portal: FakeTargetServer, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``hbactl daemon --pcap DIR``: a session the daemon opens is captured into DIR (the
    attach then fails in the stubbed kernel, which ends the session and closes the file)."""
    def no_backstore(*args: Any, **kwargs: Any) -> None:
        raise KernelSetupError("no configfs here")

    monkeypatch.setattr("hba.kernel.preflight", lambda: None)
    monkeypatch.setattr("hba.kernel.list_backstores", lambda: [])
    monkeypatch.setattr("hba.kernel.create_backstore", no_backstore)
    captures = tmp_path / "captures"
    daemon = Daemon(DaemonOptions(initiator_name=INITIATOR, watch_uio=False,
                                  pcap_dir=str(captures)))
    await daemon.start()
    try:
        with pytest.raises(AttachError, match="no configfs here"):
            await daemon.attach(f"iscsi://127.0.0.1:{fake_portal.port}/{IQN}/0")
    finally:
        await daemon.stop()
    assert captures.stat().st_mode & 0o777 == 0o700
    (pcap,) = captures.iterdir()
    assert pcap.name.endswith(f"-disk1-{fake_portal.port}.pcap"), pcap.name
    # Login (operational stage only: no CHAP), READ CAPACITY and Block Limits VPD with their
    # Data-In, Logout: as tshark dissects them, with nothing malformed.
    assert iscsi_opcodes(pcap, "-d", f"tcp.port=={fake_portal.port},iscsi") == [
        "0x03", "0x23", "0x01", "0x25", "0x01", "0x25", "0x06", "0x26"]
    assert_clean(pcap, "-d", f"tcp.port=={fake_portal.port},iscsi")


async def test_daemon_pcap_directory_must_be_usable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(control.StartupError, match=f"cannot create the capture directory "
                                                   f"{blocker}/sub"):
        await control.run_daemon(None, INITIATOR, pcap_dir=str(blocker / "sub"))
    # `--pcap FILE`: it said "cannot create the capture directory FILE: File exists".
    with pytest.raises(control.StartupError, match=f"--pcap {blocker} is a file, not a "
                                                   "directory; name a directory"):
        await control.run_daemon(None, INITIATOR, pcap_dir=str(blocker))


@pytest.mark.parametrize("mode", [0o755, 0o1777, 0o750, 0o701])
async def test_daemon_pcap_directory_others_can_read_is_refused(tmp_path: Path,
                                                                mode: int) -> None:
    # The captures hold the disks' data and are made with the umask's mode: in /tmp (or any
    # directory others may read) every user could read them.
    shared = tmp_path / "shared dir"
    shared.mkdir()
    shared.chmod(mode)
    with pytest.raises(control.StartupError) as info:
        await control.run_daemon(None, INITIATOR, pcap_dir=str(shared))
    assert info.value.exit_status == control.EXIT_CONFIG
    assert str(info.value) == (
        f"--pcap {shared}: other users could read the captures there, which hold the disks' "
        f"data (owner uid {os.geteuid()}, mode {mode:04o}); run `chown root: '{shared}' && "
        f"chmod 700 '{shared}'`, or name a directory that does not exist yet (it is created "
        "mode 700)")
    shared.chmod(0o700)
    prepare_capture_dir(str(shared))          # accepted once only its owner may enter it
    prepare_capture_dir(str(tmp_path / "new"))
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700


async def test_daemon_refuses_a_malformed_initiator_name(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Before the bus: the name is wrong whether or not DBus runs.
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/none")
    with pytest.raises(control.StartupError, match=r"initiator name \(--initiator-name\) "
                                                   "'bogus' is not a valid iSCSI name") as info:
        await control.run_daemon(None, "bogus")
    assert info.value.exit_status == control.EXIT_CONFIG


@pytest.mark.parametrize("command", ["attach", "detach"])
@pytest.mark.parametrize("timeout", ["0", "-5", "nan"])
def test_attach_and_detach_refuse_a_timeout_that_waits_for_nothing(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        command: str, timeout: str) -> None:
    # Refused before the bus: without the check this is "cannot reach the system DBus".
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/none")
    assert cli.main([command, "disk1", "--timeout", timeout]) == 2
    assert f"--timeout {float(timeout):g}: expected a number of seconds above 0" in \
        capsys.readouterr().err


@pytest.mark.parametrize("command", ["inquiry", "readcap", "read", "write", "perf"])
def test_one_shot_help_shows_the_url_form(command: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([command, "--help"])
    help_text = "".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert f"URL{URL_SYNTAX}" in help_text
