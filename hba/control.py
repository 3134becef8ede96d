"""``hbactl daemon`` and its clients ``hbactl attach / detach / list / status``.

``hbactl daemon`` runs :class:`hba.daemon.Daemon` and :class:`hba.dbus_service.DaemonService`
in the foreground on one asyncio loop, in this order:

1. read the configuration (so a bad file is reported first, even when a daemon runs; only
   the default path may be missing, a ``--config`` path must exist);
2. connect to the system DBus and own ``org.iscsihba.Daemon`` — a second daemon stops here,
   before it touches any device another one serves;
3. start the daemon: check the kernel, take over the devices a previous daemon left, attach
   the entries with ``Enable = on``;
4. tell systemd ``READY=1`` (``Type=notify``; :func:`tcmu_handler.sdnotify.sd_notify` speaks
   the datagram protocol of sd_notify(3) itself), serve until SIGTERM/SIGINT, then
   ``STOPPING=1`` and stop. SIGHUP reads the configuration again, attaches the entries
   newly enabled in it, tries at once those still waiting to be tried again and stops
   trying those no longer enabled.

Stopping leaves every disk in the kernel (its commands wait) for the next daemon to take over;
``hbactl detach`` is what removes one.

The client commands call the daemon over the system DBus and print its answer; every failure
is one sentence. Nothing here imports dbus-next, the daemon or rtslib until a command runs, so
``hbactl --help`` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hba.disks import DiskState
from hba.errors import HBAError
from initiator.argtypes import seconds
from initiator.printable import PrintableFormatter, printable

if TYPE_CHECKING:
    from hba.daemon import Daemon
    from hba.dbus_service import DaemonService
    from hba.metrics import MetricsServer

log = logging.getLogger("iscsi-hba")

DEFAULT_CONFIG = "/etc/iscsi-hba.conf"
EXIT_CONFIG = 78  # EX_CONFIG: the unit's RestartPreventExitStatus (restarting cannot help)

START_HINT = "start it with `systemctl start iscsi-hba`, or run `hbactl daemon` in the foreground"

# The keys of a disk as ``list``/``status --json`` print them (a missing one is null). The
# single-path keys (device, backstore, scsi_address, session) describe its first path with a
# disk; ``paths`` has a row per path (hba.disks.DiskPath.describe), ``holder`` is the
# multipath device over them, ``hint`` why there is none yet.
DISK_FIELDS = ("name", "target", "portal", "lun", "device", "by_id", "size", "block_size",
               "backstore", "scsi_address", "state", "session", "in_flight", "commands",
               "reconnects", "error", "multipath", "paths", "paths_up", "holder", "hint")


class ControlError(HBAError):
    """A client command failed; the message is what ``hbactl`` prints, ``lines`` the same as
    the lines to print one by one (a configuration's problems)."""

    def __init__(self, message: str, lines: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.lines = lines or (message,)


class DaemonNotRunning(ControlError):
    """Nobody owns ``org.iscsihba.Daemon`` on the system bus."""


class StartupError(HBAError):
    """``hbactl daemon`` could not start; ``exit_status`` tells systemd whether to retry.
    ``lines``: the message as lines to print one by one (a configuration's problems)."""

    def __init__(self, message: str, exit_status: int = 1,
                 lines: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.exit_status = exit_status
        self.lines = lines or (message,)


# --------------------------------------------------------------------------------------------
# formatting


def human_size(n: int) -> str:
    """``1.5 GiB``: binary units, one decimal (``hbactl list``, ``readcap``, CheckConfig)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if size < 1024 or unit == "PiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def normalize_disk(disk: Mapping[str, Any]) -> dict[str, Any]:
    """A disk as the daemon described it, with every :data:`DISK_FIELDS` key present."""
    return {**{key: None for key in DISK_FIELDS}, "paths": [], **disk}


def disk_state(disk: Mapping[str, Any]) -> str:
    """What the STATE column shows: the session's state, or the disk's when it is not
    simply attached (``detaching``, ``ring broken``, ``retrying``, ``taking over``:
    :class:`DiskState`);
    ``degraded`` for a multipath disk with some of its paths down."""
    state = disk.get("state")
    if state not in (None, DiskState.ATTACHED.value):
        return str(state)
    paths = disk.get("paths") or []
    up = sum(1 for p in paths if p.get("state") == "up")
    if disk.get("multipath") and 0 < up < len(paths):
        return "degraded"
    return str(disk.get("session") or "-")


def format_table(disks: Sequence[Mapping[str, Any]]) -> str:
    """The ``hbactl list`` table: name, target, LUN, device (the multipath device over the
    paths, when there is one), paths up (with multipath disks), size, state."""
    if not disks:
        return "no LUNs attached"
    multipath = any(d.get("multipath") for d in disks)
    header = ("NAME", "TARGET", "LUN", "DEVICE", *(("PATHS",) if multipath else ()), "SIZE",
              "STATE")
    # Target names (and errors quoting a target) come from the wire: escaped for the terminal.
    rows = [header] + [
        (printable(d.get("name") or "-"), printable(d.get("target") or "-"),
         printable("-" if d.get("lun") is None else d["lun"]),
         printable(d.get("holder") or d.get("device") or "-"),
         *((f"{d.get('paths_up') or 0}/{len(d.get('paths') or [])}",) if multipath else ()),
         human_size(int(d["size"])) if d.get("size") else "-", printable(disk_state(d)))
        for d in disks
    ]
    right = {header.index(column) for column in ("LUN", "PATHS", "SIZE") if column in header}
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for row in rows:
        cells = [cell.rjust(w) if i in right and row is not header else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_paths(disk: Mapping[str, Any]) -> list[str]:
    """``hbactl status``'s lines for the paths of a disk: every path of a multipath disk, the
    path of a plain one when it is not up; with why a path is down, and the ALUA state."""
    paths = disk.get("paths") or []
    if not disk.get("multipath") and all(p.get("state") == "up" for p in paths):
        return []
    name = printable(disk.get("name"))
    lines = []
    for p in paths:
        state, why = printable(p.get("state")), ""
        if p.get("state") != "up":
            since = p.get("since")
            if since:
                state += time.strftime(" since %H:%M:%S", time.localtime(float(since)))
            if p.get("error"):
                why = f": {printable(p['error'])}"
        parts = [printable(p.get("portal")), printable(p.get("device") or "no disk yet"), state]
        if p.get("alua"):
            parts.append(f"ALUA {printable(p['alua'])}")
        lines.append(f"  {name} path {p.get('path')}: {', '.join(parts)}{why}")
    if disk.get("hint"):
        lines.append(f"  {name}: {printable(disk['hint'])}")
    return lines


def format_status(status: Mapping[str, Any]) -> str:
    """``hbactl status`` as text."""
    lines = [
        f"daemon:         pid {status.get('pid', '?')}, iscsi-hba {status.get('version', '?')}, "
        f"up {_duration(float(status.get('uptime', 0)))}"
        + ("" if status.get("ready", True) else ", still starting"),
        f"initiator name: {printable(status.get('initiator_name') or '-')}",
        f"configuration:  {printable(status.get('config') or '-')}",
        "targetcli:      user:iscsi "
        + ("offered (org.kernel.TCMUService1)" if status.get("tcmu_handler")
           else "not offered (another process owns org.kernel.TCMUService1)"),
    ]
    workers = status.get("workers")
    if workers is not None:   # the disks are served by worker processes (hba.workers)
        served = [d.get("worker") for d in status.get("disks") or []]
        lines.append("workers:        " + (", ".join(
            f"pid {w.get('pid')} ({served.count(w.get('pid'))} "
            f"disk{'' if served.count(w.get('pid')) == 1 else 's'})" for w in workers)
            or "none running yet"))
    sessions = status.get("sessions") or []
    lines.append(f"sessions:       {len(sessions) or 'none'}")
    for s in sessions:
        luns = int(s.get("luns", 0))
        isid = f", ISID {printable(s['isid'])}" if s.get("isid") else ""
        lines.append(f"  {printable(s.get('target'))} at {printable(s.get('portal'))}: "
                     f"{printable(s.get('state'))}, {luns} "
                     f"LUN{'s' if luns != 1 else ''}, {s.get('commands', 0)} commands, "
                     f"{s.get('reconnects', 0)} reconnects{isid}")
    lines.append("disks:")
    lines.extend("  " + line for line in format_table(status.get("disks") or []).splitlines())
    for d in status.get("disks") or []:
        lines.extend(format_paths(d))
    for d in status.get("disks") or []:
        if not d.get("error"):
            continue
        name = printable(d.get("name"))
        if d.get("state") == DiskState.RETRYING.value:
            lines.append(f"  {name}: attempt {d.get('attempts', '?')} failed, next in "
                         f"{float(d.get('retry_in') or 0):.0f} s: {printable(d['error'])}")
        elif d.get("state") == DiskState.FAILED.value:
            lines.append(f"  {name}: not attached, and not tried again: "
                         f"{printable(d['error'])}; once the entry is fixed, run "
                         f"`systemctl reload iscsi-hba` or `hbactl attach {name}`")
        elif d.get("state") == DiskState.UNSERVED.value:
            lines.append(f"  {name}: a backstore in the kernel that this daemon cannot serve "
                         f"(its disk's I/O waits, then fails): {printable(d['error'])}")
        else:   # a worker's disks being taken over
            lines.append(f"  {name}: {printable(d['error'])}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# --------------------------------------------------------------------------------------------
# the client side


def client_error(name: str, message: str, command: str) -> HBAError:
    """The exception for a DBus error reply ``name`` to ``hbactl <command>``."""
    if name in ("org.freedesktop.DBus.Error.ServiceUnknown",
                "org.freedesktop.DBus.Error.NameHasNoOwner"):
        return DaemonNotRunning(f"the iscsi-hba daemon is not running: {START_HINT}")
    if name == "org.freedesktop.DBus.Error.AccessDenied":
        return ControlError(
            f"the system DBus does not let you {command}: only root may attach, detach or "
            "reload; if you are root, install deploy/dbus/iscsi-hba.conf into "
            "/etc/dbus-1/system.d/ (deploy/setup does)")
    if name in ("org.freedesktop.DBus.Error.NoReply", "org.freedesktop.DBus.Error.Timeout"):
        return ControlError(f"the iscsi-hba daemon did not answer {command}; see its log "
                            "(`journalctl -u iscsi-hba`)")
    if name in ("org.freedesktop.DBus.Error.UnknownMethod",
                "org.freedesktop.DBus.Error.UnknownObject",
                "org.freedesktop.DBus.Error.UnknownInterface"):
        return ControlError(f"the running iscsi-hba daemon does not know {command}: it is "
                            "another version than this hbactl; restart it")
    from hba.dbus_service import Errors

    if name == Errors.CONFIG:
        # ConfigError's lines, joined by the daemon: one problem a line, as `hbactl daemon`
        # prints them (each line still escaped when printed).
        return ControlError(message, tuple(message.split("\n")))
    if name.startswith(f"{Errors.PREFIX}."):
        return ControlError(message)
    return ControlError(f"{command} failed: {message} ({name})")


async def connect_system_bus(timeout: float = 10.0) -> Any:
    """A connected ``dbus_next`` MessageBus on the system bus (``$DBUS_SYSTEM_BUS_ADDRESS``
    if set); DaemonNotRunning, saying what to start, when there is none."""
    from dbus_next.aio.message_bus import MessageBus
    from dbus_next.constants import BusType

    try:
        return await asyncio.wait_for(MessageBus(bus_type=BusType.SYSTEM).connect(), timeout)
    except Exception as exc:
        raise DaemonNotRunning(
            f"cannot reach the system DBus ({exc or type(exc).__name__}), so the iscsi-hba "
            f"daemon cannot be running: start dbus-daemon (`systemctl start dbus`), then "
            f"{START_HINT}") from None


QUERY_TIMEOUT = 10.0
"""Seconds ``hbactl list`` and ``status`` wait for the daemon's answer."""


async def call(member: str, signature: str = "", body: Sequence[Any] = (), *,
               command: str, timeout: float | None = None) -> list[Any]:
    """Call ``member`` of ``org.iscsihba.Daemon1`` on the system bus; the reply's body."""
    from dbus_next.constants import MessageFlag, MessageType
    from dbus_next.message import Message

    from hba import dbus_service
    from initiator.errors import ConfigurationError
    from initiator.text import is_utf8

    for value in body:
        # dbus-next raises UnicodeEncodeError for the first, and the bus drops the connection
        # (EOFError) for the second. Not shown: an attach URL may hold a secret.
        if isinstance(value, str) and (not is_utf8(value) or "\0" in value):
            raise ConfigurationError(
                f"the argument of hbactl {command} is not text a DBus call can carry (UTF-8 "
                "without NUL bytes); give the URL, nickname or device in UTF-8")
    if timeout is None:
        timeout = QUERY_TIMEOUT
    bus = await connect_system_bus()
    try:
        reply = await asyncio.wait_for(bus.call(Message(
            destination=dbus_service.BUS_NAME, path=dbus_service.OBJECT_PATH,
            interface=dbus_service.INTERFACE, member=member, signature=signature,
            body=list(body), flags=MessageFlag.NO_AUTOSTART)), timeout)
    except TimeoutError:
        if member in ("List", "Status"):
            # Nothing goes on of a question: the daemon is stuck, or too busy to answer.
            raise ControlError(
                f"the iscsi-hba daemon did not answer {command} within {timeout:g} s: it is "
                "hung or overloaded; see its log (`journalctl -u iscsi-hba`)") from None
        raise ControlError(
            f"the iscsi-hba daemon did not finish {command} within {timeout:g} s; it goes on "
            "in the background: see `hbactl list` and the daemon's log") from None
    finally:
        bus.disconnect()
    if reply is None:
        raise ControlError(f"no reply from the iscsi-hba daemon to {command}")
    if reply.message_type == MessageType.ERROR:
        text = str(reply.body[0]) if reply.body else ""
        raise client_error(reply.error_name or "", text, command)
    return [dbus_service.unwrap(value) for value in reply.body]


def _with_env_secrets(what: str) -> str:
    """``what`` with the CHAP secrets this user's environment holds written into the URL.

    The daemon parses URLs in its own environment; a user who keeps secrets out of the
    command line (``ISCSI_HBA_CHAP_SECRET``...) expects them to count. The URL goes to the
    daemon alone, over the system bus, where only root may call Attach.
    """
    if not what.lower().startswith("iscsi://"):
        return what
    from urllib.parse import quote, urlsplit

    from initiator.errors import ConfigurationError
    from initiator.url import parse_url

    url = parse_url(what, several_portals=True)  # a malformed URL: a usage error, here
    try:
        bare = parse_url(what, environ={}, several_portals=True)
    except ConfigurationError:
        bare = None  # incomplete without the environment
    if url.chap_user is None or url.chap_secret is None or (bare is not None and (
            url.chap_user, url.chap_secret, url.target_user, url.target_secret) == (
            bare.chap_user, bare.chap_secret, bare.target_user, bare.target_secret)):
        return what  # the environment adds nothing
    parts = urlsplit(what)
    netloc = parts.netloc.rpartition("@")[2]
    query = [q for q in parts.query.split("&") if q and not q.startswith("target_password=")]
    if url.target_user is not None and url.target_secret is not None:
        if not any(q.startswith("target_user=") for q in query):
            query.append(f"target_user={quote(url.target_user, safe='')}")
        query.append(f"target_password={quote(url.target_secret, safe='')}")
    user = f"{url.chap_user}%{quote(url.chap_secret, safe='')}@"
    return (f"iscsi://{user}{netloc}{parts.path}" + (f"?{'&'.join(query)}" if query else ""))


def _check_timeout(seconds: float) -> None:
    """--timeout of attach and detach: 0, a negative number or NaN would stop waiting at
    once while the daemon goes on, which no one means."""
    from initiator.url import check_seconds

    check_seconds("--timeout", seconds)


async def cmd_attach(args: argparse.Namespace) -> dict[str, Any]:
    _check_timeout(args.timeout)
    (disk,) = await call("Attach", "s", [_with_env_secrets(args.what)], command="attach",
                         timeout=args.timeout)
    return normalize_disk(disk)


async def cmd_detach(args: argparse.Namespace) -> dict[str, Any]:
    _check_timeout(args.timeout)
    (disk,) = await call("Detach", "sb", [args.what, bool(args.force)], command="detach",
                         timeout=args.timeout)
    return normalize_disk(disk)


async def cmd_list(args: argparse.Namespace) -> dict[str, Any]:
    (disks,) = await call("List", command="list")
    return {"disks": [normalize_disk(d) for d in disks]}


async def cmd_status(args: argparse.Namespace) -> dict[str, Any]:
    (status,) = await call("Status", command="status")
    status["disks"] = [normalize_disk(d) for d in status.get("disks", [])]
    status.setdefault("sessions", [])
    return dict(status)


def print_attach(result: dict[str, Any]) -> None:
    # The device alone, so that `dev=$(hbactl attach disk1)` works.
    print(printable(result.get("device") or result.get("name")))


def print_detach(result: dict[str, Any]) -> None:
    device = f" ({result['device']})" if result.get("device") else ""
    print(f"detached {printable(result.get('name'))}{printable(device)}")


def print_list(result: dict[str, Any]) -> None:
    print(format_table(result["disks"]))


def print_status(result: dict[str, Any]) -> None:
    print(format_status(result))


# --------------------------------------------------------------------------------------------
# the daemon


class _JournalFormatter(PrintableFormatter):
    """Prefix each line with its syslog priority (``<6>``), which journald understands."""

    PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                  logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        priority = self.PRIORITIES.get(record.levelno, 6)
        return f"<{priority}>{super().format(record)}"


def configure_daemon_logging(verbose: int, environ: Mapping[str, str] | None = None) -> None:
    """One line per event at INFO from the daemon's own loggers; ``-v`` adds the protocol's
    INFO lines, ``-vv`` everything. Under systemd (``$JOURNAL_STREAM``) journal entries with
    fields (:mod:`hba.journal`; standard error, prefixed with priorities, when the journal's
    socket is missing or full)."""
    from hba import journal

    env = os.environ if environ is None else environ
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    fmt = "%(message)s" if verbose < 2 else "%(name)s: %(message)s"
    if env.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter(fmt))
        if journal.under_journal(env):
            handler = journal.JournalHandler("iscsi-hba", fallback=handler)
            handler.setFormatter(PrintableFormatter(fmt))
    else:
        handler.setFormatter(PrintableFormatter(f"%(asctime)s %(levelname)s {fmt}",
                                                "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING if verbose == 0 else logging.INFO if verbose == 1
                  else logging.DEBUG)
    own = logging.DEBUG if verbose >= 2 else logging.INFO
    for name in ("iscsi-hba", "hba", "tcmu_handler"):
        logging.getLogger(name).setLevel(own)


async def cmd_daemon(args: argparse.Namespace) -> dict[str, Any]:
    """``hbactl daemon``: see the module docstring. Returns when stopped."""
    configure_daemon_logging(max(args.verbose, args.daemon_verbose))
    return {"exit_status": await run_daemon(args.config, args.initiator_name,
                                            pcap_dir=args.daemon_pcap, metrics=args.metrics,
                                            workers=args.workers, priority=args.priority)}


async def run_daemon(config_path: str | None, initiator_name: str | None = None, *,
                     bus_address: str | None = None, pcap_dir: str | None = None,
                     metrics: str | None = None, workers: int | None = None,
                     priority: int | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT (or the bus goes away); the exit status.
    ``metrics``: serve Prometheus metrics there (else the configuration's ``Metrics``);
    ``workers``: the most worker processes (else the configuration's ``Workers``, else one
    per core: :mod:`hba.workers`); ``priority``: the nice value of the daemon and its workers
    (else the configuration's ``Priority``, else the one it was started with)."""
    from hba import dbus_service
    from hba.config import ConfigError, load_config
    from hba.daemon import Daemon, DaemonOptions, prepare_capture_dir
    from hba.kernel import KernelSetupError
    from initiator.errors import ConfigurationError
    from initiator.url import validate_iscsi_name
    from tcmu_handler.sdnotify import sd_notify

    if initiator_name is not None:
        try:
            validate_iscsi_name(initiator_name, what="initiator name (--initiator-name)")
        except ConfigurationError as exc:
            raise StartupError(str(exc), EXIT_CONFIG) from None
    # lexists: a dangling symlink is a configuration that went missing, not "none", and
    # load_config says why it cannot be opened. Only the default path may be missing
    # (nothing to attach at start); another one is a mistyped --config, which would
    # otherwise start a daemon that serves nothing and says so only at level info.
    if config_path == "":
        raise StartupError(
            f"--config is empty; give the configuration file's path (the default is "
            f"{DEFAULT_CONFIG})", EXIT_CONFIG)
    if config_path is not None and config_path != DEFAULT_CONFIG and \
            not os.path.lexists(config_path):
        sd_notify(f"STATUS=no configuration file {printable(config_path)}")
        raise StartupError(
            f"configuration file {printable(config_path)} does not exist; check the path given to "
            f"--config (only the default, {DEFAULT_CONFIG}, may be missing: then the daemon "
            "attaches nothing at start)", EXIT_CONFIG)
    if config_path is not None and os.path.lexists(config_path):
        try:
            config = await asyncio.to_thread(load_config, config_path)
            metrics = metrics or config.metrics
            workers = workers or config.workers
            priority = config.priority if priority is None else priority
        except ConfigError as exc:
            sd_notify(f"STATUS=bad configuration {printable(config_path)}")
            raise StartupError(str(exc), EXIT_CONFIG, exc.lines) from None
    if pcap_dir is not None:
        try:
            await asyncio.to_thread(prepare_capture_dir, pcap_dir)
        except HBAError as exc:
            raise StartupError(str(exc), EXIT_CONFIG) from None
    if workers is None:
        from hba.workers import default_workers

        workers = default_workers(len(os.sched_getaffinity(0)))
    if priority is not None:
        from hba.priority import raise_priority

        raise_priority(priority)
    try:
        daemon = Daemon(DaemonOptions(config_path=config_path, initiator_name=initiator_name,
                                      pcap_dir=pcap_dir, workers=workers, priority=priority))
    except ConfigurationError as exc:   # an unusable /etc/iscsi/initiatorname.iscsi
        sd_notify(f"STATUS={exc}")
        raise StartupError(str(exc), EXIT_CONFIG) from None
    try:
        service = await dbus_service.DaemonService.connect(daemon, address=bus_address)
    except dbus_service.BusError as exc:
        sd_notify(f"STATUS={exc}")
        raise StartupError(str(exc), exc.exit_status) from None
    try:
        await service.claim()
    except dbus_service.BusError as exc:
        await service.close()
        sd_notify(f"STATUS={exc}")
        raise StartupError(str(exc), exc.exit_status) from None
    daemon.options.on_event = service.publish
    exporter = None
    if metrics is not None:
        exporter = await _serve_metrics(daemon, metrics, service)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: set[asyncio.Task[None]] = set()

    def reload() -> None:
        task = loop.create_task(_reload(daemon))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    handled = (signal.SIGTERM, signal.SIGINT)
    for signum in handled:
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    status = 0
    daemon.options.on_attaching = _extend_start
    try:
        sd_notify("STATUS=starting: checking the kernel, taking over existing devices")
        started = await _until_stopped(daemon.start(), stop)
        daemon.options.on_attaching = None
        if started:
            service.set_ready()
            count = await daemon.disk_count()
            log.info("iscsi-hba daemon ready: %d disk%s, initiator %s, configuration %s%s, "
                     "nice %s", count, "" if count == 1 else "s", daemon.initiator_name,
                     config_path or "none",
                     f", up to {workers} worker processes" if workers > 1 else "",
                     "as started" if priority is None else priority)
            sd_notify(f"READY=1\nSTATUS=serving {count} disk{'' if count == 1 else 's'}")
            lost = await _wait_stop_or_disconnect(stop, service)
            if lost:
                log.error("lost the connection to the system DBus; stopping so that systemd "
                          "restarts the daemon (the disks are taken over)")
                status = 1
    except (KernelSetupError, ConfigError) as exc:
        sd_notify(f"STATUS={str(exc).splitlines()[0]}")
        # Both list their problems a line each (hba.kernel.preflight); printed as one line,
        # the '\n's between them would show escaped.
        lines = exc.lines if isinstance(exc, ConfigError) else tuple(str(exc).split("\n"))
        raise StartupError(str(exc), EXIT_CONFIG, lines) from None
    finally:
        sd_notify("STOPPING=1")
        for signum in handled:
            loop.remove_signal_handler(signum)
        loop.remove_signal_handler(signal.SIGHUP)
        count = await daemon.disk_count()
        if count:
            log.info("stopping: %d disk%s stay%s in the kernel for the next daemon to take "
                     "over", count, "" if count == 1 else "s", "s" if count == 1 else "")
        await daemon.stop()
        if exporter is not None:
            await exporter.stop()
        await service.close()
    return status


ENTRY_START_BOUND = 300.0
"""Seconds of the start each configuration entry attached before READY=1 may take, besides
twice its LoginTimeout (a SendTargets login, then the paths'): what the unit's
TimeoutStartSec gives a whole start (a login and up to 60 s of udev, with room to spare)."""


def _extend_start(nickname: str, number: int, count: int, login_timeout: float) -> None:
    """Before entry ``number`` of ``count`` is attached at start: tell systemd what it waits
    for and give it the time. Each wait of an attach is bounded, but the start attaches the
    entries one after the other, so its length grows with their number: twenty LUNs of an
    array that is down and drops packets took 20 x 15 s, past TimeoutStartSec, and systemd
    killed and restarted the daemon, again and again, never ready."""
    from tcmu_handler.sdnotify import sd_notify

    bound = ENTRY_START_BOUND + 2 * login_timeout
    sd_notify(f"EXTEND_TIMEOUT_USEC={int(bound * 1_000_000)}\n"
              f"STATUS=starting: attaching {nickname} ({number} of {count})")


async def _serve_metrics(daemon: Daemon, address: str, service: DaemonService) -> MetricsServer:
    """Start the Prometheus endpoint (after the bus name is ours: a second daemon must not
    take the port first), or raise :class:`StartupError`."""
    from hba.metrics import MetricsServer
    from initiator.errors import ConfigurationError

    try:
        exporter = MetricsServer(daemon, address)
        exporter.start()
    except (ConfigurationError, HBAError) as exc:
        await service.close()
        raise StartupError(str(exc), EXIT_CONFIG if isinstance(exc, ConfigurationError)
                           else 1) from None
    return exporter


async def _until_stopped(start: Coroutine[Any, Any, None], stop: asyncio.Event) -> bool:
    """Run the daemon's start; False when a signal came first (the start is cancelled)."""
    task: asyncio.Task[None] = asyncio.ensure_future(start)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task.done():
        task.result()  # raises what the start raised
        return True
    log.info("stopping before the start finished")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False


async def _wait_stop_or_disconnect(stop: asyncio.Event, service: DaemonService) -> bool:
    """Wait for a stop signal; True if the bus connection went away instead."""
    stopper = asyncio.ensure_future(stop.wait())
    lost = asyncio.ensure_future(service.wait_disconnected())
    try:
        await asyncio.wait({stopper, lost}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        lost.cancel()
    return not stop.is_set()


async def _reload(daemon: Daemon) -> None:
    from hba.config import ConfigError

    try:
        await daemon.reload_config()
    except ConfigError as exc:
        # A line per problem: one log line holding them all would show its '\n's escaped.
        for line in exc.lines:
            log.error("keeping the previous configuration: %s", line.strip())
        return
    await daemon.attach_enabled()


# --------------------------------------------------------------------------------------------
# argparse


def _worker_count(text: str) -> int:
    from initiator.url import decimal

    number = decimal(text)
    if number is None or not 1 <= number <= 256:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of workers from 1 to 256")
    return number


def _metrics_address(text: str) -> str:
    """``--metrics``, checked when the arguments are parsed: a bad one was told only after
    the daemon had connected to DBus."""
    from hba.metrics import parse_listen_address
    from initiator.errors import ConfigurationError

    try:
        parse_listen_address(text)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _nice_value(text: str) -> int:
    from hba.priority import HIGHEST, LOWEST, parse_priority

    number = parse_priority(text)
    if number is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a nice value, a whole number from {HIGHEST} to {LOWEST}")
    return number


def add_commands(sub: Any) -> None:
    """Register ``daemon``, ``attach``, ``detach``, ``list`` and ``status`` on the
    subparsers of ``hbactl`` (``sub`` is what ``add_subparsers`` returned)."""
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser(
        "daemon", help="run the daemon in the foreground (systemd Type=notify)",
        description="Serve the disks: take over existing ones, attach the configuration's "
                    "entries with Enable = on, answer hbactl and targetcli over the system "
                    "DBus. Stops on SIGTERM/SIGINT (the disks stay for the next start); "
                    "SIGHUP reads the configuration again, attaches the entries newly "
                    "enabled in it, tries at once those waiting to be tried again and stops "
                    "trying those no longer enabled. An entry whose target cannot be reached "
                    "is tried again in the background until it attaches; one refused for its "
                    "credentials or initiator name is not (fix it, then SIGHUP).")
    p.add_argument("--config", default=DEFAULT_CONFIG, metavar="PATH",
                   help=f"configuration file (default {DEFAULT_CONFIG}, which may be "
                        "missing: then nothing is attached at start; another path must exist)")
    p.add_argument("--initiator-name", metavar="IQN",
                   help="initiator name (default: /etc/iscsi/initiatorname.iscsi)")
    p.add_argument("--metrics", type=_metrics_address, metavar="[HOST:]PORT",
                   help="serve Prometheus metrics on this address (a bare port: 127.0.0.1; "
                        "default: the configuration's Metrics key, else none)")
    p.add_argument("--pcap", dest="daemon_pcap", metavar="DIR",
                   help="record every session's PDUs into a pcap file in DIR (created mode "
                        "700), one per session; tshark -r FILE dissects it")
    p.add_argument("--workers", type=_worker_count, metavar="N",
                   help="serve the disks from up to N worker processes, one event loop each "
                        "(default: the configuration's Workers, else the number of cores; "
                        "1: everything in this process)")
    p.add_argument("--priority", type=_nice_value, metavar="NICE",
                   help="the nice value of the daemon and its workers, from -20 (the most CPU) "
                        "to 19, their scheduling groups' too (default: the configuration's "
                        "Priority, else as started; below 0 needs root). Below 0 keeps the "
                        "disks fast beside a CPU-bound program, but slows small I/O of a "
                        "program that competes for the same CPUs: hba/priority.py")
    p.add_argument("-v", "--verbose", dest="daemon_verbose", action="count", default=0,
                   help="also log protocol events (twice: debug)")
    p.set_defaults(handler=cmd_daemon)

    p = sub.add_parser("attach", parents=[as_json],
                       help="attach a LUN through the daemon; prints its /dev/sdX once usable")
    p.add_argument("what", metavar="URL|NAME",
                   help="iscsi://host[:port]/<target-iqn>/<lun> or a configuration nickname")
    p.add_argument("--timeout", type=seconds, default=120.0, metavar="SECONDS",
                   help="stop waiting after this long (default 120; the attach goes on)")
    p.set_defaults(handler=cmd_attach)

    p = sub.add_parser("detach", parents=[as_json],
                       help="flush and remove a disk, log out when it was the last of a target")
    p.add_argument("what", metavar="DEV|NAME",
                   help="name (as hbactl list shows it), /dev/sdX or a /dev/disk/by-id link")
    p.add_argument("--force", action="store_true",
                   help="detach even while mounted or held (its users get I/O errors)")
    p.add_argument("--timeout", type=seconds, default=120.0, metavar="SECONDS",
                   help="stop waiting after this long (default 120)")
    p.set_defaults(handler=cmd_detach)

    p = sub.add_parser("list", parents=[as_json], help="the disks the daemon serves")
    p.set_defaults(handler=cmd_list)

    p = sub.add_parser("status", parents=[as_json],
                       help="the daemon, its sessions and its disks")
    p.set_defaults(handler=cmd_status)


PRINTERS = {"attach": print_attach, "detach": print_detach, "list": print_list,
            "status": print_status}
