"""``hbactl top``: what every disk and session is doing, refreshed every second.

Theory of operation
-------------------
The daemon counts (``Metrics`` over the system DBus returns :func:`hba.metrics.sample`: totals
since each disk and session started); ``top`` asks for a sample every interval and shows the
difference with the previous one, as ``iostat -x 1`` does with ``/proc/diskstats``:
:func:`rates` turns two samples into rows — IOPS and MB/s by direction, the average and the
99th percentile of the latency from ring entry to ring completion (from the histogram's bucket
differences, as Prometheus' ``histogram_quantile``), the queue depth now and on average
(Little's law: the latency summed over the interval, divided by it), and each session's state,
reinstatements, lost connections, digest errors and command window, as ``iscsiadm -m session
-s`` shows them.

Output: on a terminal, a full-screen view (the alternate screen, as ``top`` uses, restored on
exit) redrawn every interval, each line cut to the terminal's width so that nothing wraps;
anywhere else, a block of plain text per interval with a timestamp and no escape codes;
``--json``, one JSON object per line per interval. Ctrl-C (or SIGTERM, or a closed pipe)
ends it with exit status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any

from hba.control import client_error, connect_system_bus, disk_state
from initiator.argtypes import seconds, whole_number
from initiator.printable import printable

__all__ = ["add_command", "format_frame", "rates"]

MB = 1e6


# --------------------------------------------------------------------------------------------
# rates from two samples


def _delta_hist(new: Mapping[str, Any], old: Mapping[str, Any] | None) -> tuple[int, float,
                                                                               list[int]]:
    counts = [int(n) for n in new["counts"]]
    if old is None or int(old["count"]) > int(new["count"]):
        return int(new["count"]), float(new["sum"]), counts  # new, or restarted
    return (int(new["count"]) - int(old["count"]), float(new["sum"]) - float(old["sum"]),
            [a - int(b) for a, b in zip(counts, old["counts"], strict=True)])


def rates(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """What happened between two samples of :func:`hba.metrics.sample`, per second."""
    from initiator.stats import quantile  # here: `hbactl --help` need not load the initiator

    seconds = max(float(new["time"]) - float(old["time"]), 1e-9)
    bounds = [float(b) for b in new["buckets"]]
    previous = {d["name"]: d for d in old.get("disks", [])}
    disks = []
    for disk in new.get("disks", []):
        before = previous.get(disk["name"])
        row: dict[str, Any] = {
            "name": disk["name"], "device": disk.get("device") or None,
            "state": disk_state(disk), "queue_depth": int(disk.get("in_flight", 0)),
        }
        operations = disk.get("operations")
        if operations is None:
            disks.append(row)
            continue
        total_n, total_sum = 0, 0.0
        total_counts = [0] * (len(bounds) + 1)
        for op in ("read", "write", "other"):
            old_op = before["operations"][op] if before and "operations" in before else None
            n, s, counts = _delta_hist(operations[op], old_op)
            row[f"{op}_iops"] = n / seconds
            total_n += n
            total_sum += s
            total_counts = [a + b for a, b in zip(total_counts, counts, strict=True)]
        for direction in ("read", "write"):
            now_bytes = int(disk["bytes"][direction])
            was = int(before["bytes"][direction]) if before and "bytes" in before else 0
            moved = now_bytes - was if now_bytes >= was else now_bytes  # restarted: from 0
            row[f"{direction}_mb_per_s"] = moved / MB / seconds
        p99 = quantile(0.99, bounds, total_counts)
        row.update(
            iops=total_n / seconds,
            mb_per_s=row["read_mb_per_s"] + row["write_mb_per_s"],
            avg_latency_ms=total_sum / total_n * 1e3 if total_n else None,
            p99_latency_ms=p99 * 1e3 if p99 is not None else None,
            avg_queue_depth=total_sum / seconds)
        disks.append(row)
    previous_sessions = {(s["target"], s["portal"]): s for s in old.get("sessions", [])}
    sessions = []
    for s in new.get("sessions", []):
        before = previous_sessions.get((s["target"], s["portal"]), {})
        n, total, _ = _delta_hist(s["nop_rtt"], before.get("nop_rtt"))
        sessions.append({
            "target": s["target"], "portal": s["portal"], "state": s["state"],
            "luns": s["luns"], "reinstatements": s["reinstatements"],
            "connections_lost": s["connections_lost"],
            "digest_errors": sum(int(v) for v in s["digest_errors"].values()),
            "login_failures": sum(int(v) for v in s["login_failures"].values()),
            "window": s.get("window"), "window_closed": s["window_closed"],
            "nop_rtt_ms": total / n * 1e3 if n else None,
        })
    return {"time": time.time(), "interval": round(seconds, 3), "disks": disks,
            "sessions": sessions}


# --------------------------------------------------------------------------------------------
# text


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


_DISK_COLUMNS: tuple[tuple[str, str, int], ...] = (
    # header, key, digits; left-aligned when digits < 0
    ("DISK", "name", -1), ("DEVICE", "device", -1), ("IOPS", "iops", 0), ("r/s", "read_iops", 0),
    ("w/s", "write_iops", 0), ("MB/s", "mb_per_s", 1), ("rMB/s", "read_mb_per_s", 1),
    ("wMB/s", "write_mb_per_s", 1), ("avg_ms", "avg_latency_ms", 2),
    ("p99_ms", "p99_latency_ms", 2), ("QD", "queue_depth", 0), ("aqu", "avg_queue_depth", 1),
    ("SESSION", "state", -1),
)
_SESSION_COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("TARGET", "target", -1), ("PORTAL", "portal", -1), ("STATE", "state", -1),
    ("LUNS", "luns", 0), ("REINST", "reinstatements", 0), ("LOST", "connections_lost", 0),
    ("LOGINFAIL", "login_failures", 0), ("DIGESTERR", "digest_errors", 0),
    ("WINDOW", "window", 0), ("CLOSED", "window_closed", 0), ("NOP_ms", "nop_rtt_ms", 2),
)


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, int]]
           ) -> list[str]:
    cells = [[header for header, _, _ in columns]]
    for row in rows:
        line = []
        for _, key, digits in columns:
            value = row.get(key)
            if digits < 0:
                line.append(printable(value) if value not in (None, "") else "-")
            else:
                line.append(_num(None if value is None else float(value), digits))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    out = []
    for r in cells:
        out.append("  ".join(c.ljust(w) if columns[i][2] < 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip())
    return out


def format_frame(frame: Mapping[str, Any]) -> list[str]:
    """One interval as lines of text (no escape codes; target names escaped)."""
    stamp = time.strftime("%H:%M:%S", time.localtime(float(frame["time"])))
    lines = [f"iscsi-hba top - {stamp}, interval {float(frame['interval']):.1f} s, "
             f"{len(frame['disks'])} disk{'' if len(frame['disks']) == 1 else 's'}, "
             f"{len(frame['sessions'])} session{'' if len(frame['sessions']) == 1 else 's'}", ""]
    lines += _table(frame["disks"], _DISK_COLUMNS) if frame["disks"] else ["no disks"]
    if frame["sessions"]:
        lines.append("")
        lines += _table(frame["sessions"], _SESSION_COLUMNS)
    return lines


class _Screen:
    """Where frames go: a redrawn terminal screen, or plain blocks of text, or JSON lines."""

    def __init__(self, out: IO[str], *, as_json: bool) -> None:
        self.out = out
        self.as_json = as_json
        self.tty = not as_json and out.isatty()
        self.entered = False

    def __enter__(self) -> _Screen:
        if self.tty:
            self.out.write("\x1b[?1049h\x1b[H\x1b[2J")  # the alternate screen, as top uses
            self.out.write("iscsi-hba top: waiting for the first interval...\n")
            self.out.flush()
            self.entered = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self.entered:
            with contextlib.suppress(OSError, ValueError):
                self.out.write("\x1b[?1049l")
                self.out.flush()

    def show(self, frame: dict[str, Any]) -> None:
        if self.as_json:
            self.out.write(json.dumps(frame) + "\n")
        elif self.tty:
            width, height = shutil.get_terminal_size((80, 24))
            lines = format_frame(frame)
            if len(lines) > height - 1:
                hidden = len(lines) - (height - 2)
                lines = [*lines[:height - 2], f"... {hidden} more line(s): widen the terminal "
                         "or use --json"]
            # Cut, never wrap: a wrapped line would scroll the screen and garble the view.
            self.out.write("\x1b[H\x1b[2J" + "\n".join(line[:max(width - 1, 1)]
                                                        for line in lines))
        else:
            self.out.write("\n".join(format_frame(frame)) + "\n\n")
        self.out.flush()


# --------------------------------------------------------------------------------------------
# the client


class _Client:
    """One system-bus connection for the whole run (``control.call`` connects per call)."""

    def __init__(self) -> None:
        self.bus: Any = None

    async def __aenter__(self) -> _Client:
        self.bus = await connect_system_bus()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.bus is not None:
            self.bus.disconnect()

    async def sample(self, timeout: float = 10.0) -> dict[str, Any]:
        from dbus_next.constants import MessageFlag, MessageType
        from dbus_next.message import Message

        from hba import control, dbus_service

        try:
            reply = await asyncio.wait_for(self.bus.call(Message(
                destination=dbus_service.BUS_NAME, path=dbus_service.OBJECT_PATH,
                interface=dbus_service.INTERFACE, member="Metrics",
                flags=MessageFlag.NO_AUTOSTART)), timeout)
        except TimeoutError:
            raise control.ControlError(
                f"the iscsi-hba daemon did not answer within {timeout:g} s") from None
        if reply is None:
            raise control.ControlError("no reply from the iscsi-hba daemon to top")
        if reply.message_type == MessageType.ERROR:
            raise client_error(reply.error_name or "",
                               str(reply.body[0]) if reply.body else "", "top")
        result: dict[str, Any] = dbus_service.unwrap(reply.body[0])
        return result


async def cmd_top(args: argparse.Namespace) -> dict[str, Any]:
    """``hbactl top``: see the module docstring. Returns when stopped."""
    from initiator.errors import ConfigurationError
    from initiator.url import check_seconds

    check_seconds("--interval", args.interval)  # NaN would sample without a pause
    if args.count is not None and args.count < 1:
        raise ConfigurationError("--count must be at least 1")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    shown = 0
    try:
        async with _Client() as client:
            previous = await client.sample()
            with _Screen(sys.stdout, as_json=args.json_lines) as screen:
                while not stop.is_set() and (args.count is None or shown < args.count):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), args.interval)
                    if stop.is_set():
                        break
                    current = await client.sample()
                    try:
                        screen.show(rates(previous, current))
                    except BrokenPipeError:
                        # `hbactl top --json | head`: the reader is done, so are we.
                        from hba.cli import silence_stdout

                        silence_stdout()
                        break
                    except OSError as exc:   # `> /dev/full`: say so, once
                        from hba.cli import silence_stdout, stdout_error

                        silence_stdout()
                        raise stdout_error(exc) from None
                    previous = current
                    shown += 1
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    return {"samples": shown}


def add_command(sub: Any) -> None:
    """Register ``top`` on the subparsers of ``hbactl``."""
    p = sub.add_parser(
        "top", help="live per-disk IOPS, MB/s, latency, queue depth and session state",
        description="Show, every interval, what each disk served by the daemon does (IOPS and "
                    "MB/s by direction, average and 99th-percentile latency from ring entry to "
                    "ring completion, queue depth) and how each session is (state, "
                    "reinstatements, lost connections, login failures, digest errors, command "
                    "window, NOP round trip). Ctrl-C quits.")
    p.add_argument("--interval", type=seconds, default=1.0, metavar="SECONDS",
                   help="seconds between refreshes (default 1)")
    p.add_argument("--count", type=whole_number, metavar="N",
                   help="stop after N refreshes (default: until Ctrl-C)")
    p.add_argument("--json", dest="json_lines", action="store_true",
                   help="print one JSON object per interval instead (a stream)")
    p.set_defaults(handler=cmd_top)
