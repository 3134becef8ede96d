"""``hbactl``: the command line of iscsi-hba.

Every failure is printed as one sentence saying what failed and what to check, and the exit
status says what kind of failure it was; no traceback reaches the user (``-v`` shows debug
logging, ``HBACTL_TRACEBACK=1`` shows tracebacks for bug reports).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import io
import json
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from hba import control, top
from hba.errors import EXIT_INTERRUPTED, HBAError
from initiator.argtypes import seconds, size, whole_number
from initiator.errors import ConfigurationError, ISCSIError
from initiator.printable import PrintableFormatter, printable
from initiator.recovery import progress_log
from initiator.url import PORTAL_URL_SYNTAX, URL_SYNTAX

if TYPE_CHECKING:
    from hba import oneshot

# The URL of a LUN and of a portal, as the one-shot commands' help shows them (argparse: '%'
# doubled).
LUN_URL = URL_SYNTAX.replace("%", "%%") + "[?<option>=<value>&...]"
PORTAL_URL = PORTAL_URL_SYNTAX.replace("%", "%%")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]]


# hba.oneshot (the whole initiator) is imported by the commands that use it, so that --help
# and the daemon's clients start fast.


def _options(args: argparse.Namespace) -> oneshot.Options:
    from hba import oneshot

    return oneshot.Options(
        initiator_name=args.initiator_name, login_timeout=args.login_timeout, pcap=args.pcap,
        command_timeout=args.command_timeout, tmf_timeout=args.task_management_timeout,
        replacement_timeout=args.replacement_timeout,
        noop_interval=args.noop_interval, noop_timeout=args.noop_timeout,
        logout_timeout=args.logout_timeout)


async def _discover(args: argparse.Namespace) -> dict[str, Any]:
    from hba import oneshot

    result = await oneshot.cmd_discover(args.url, _options(args), luns=args.luns)
    # On standard error with --json too, as iscsiadm does: one escaped line each.
    for skipped in result["skipped"]:
        print(f"hbactl: warning: {printable(skipped['error'])}", file=sys.stderr)
    if result["skipped"] and not result["targets"]:
        print(f"hbactl: no usable portal in the SendTargets answer of portal "
              f"{printable(result['portal'])}: check the target's portal configuration",
              file=sys.stderr)
    return result


async def _inquiry(args: argparse.Namespace) -> dict[str, Any]:
    from hba import oneshot

    return await oneshot.cmd_inquiry(args.url, _options(args))


async def _readcap(args: argparse.Namespace) -> dict[str, Any]:
    from hba import oneshot

    return await oneshot.cmd_readcap(args.url, _options(args))


async def _read(args: argparse.Namespace) -> dict[str, Any]:
    from hba import oneshot

    return await oneshot.cmd_read(args.url, _options(args), args.lba, args.blocks, args.output)


async def _write(args: argparse.Namespace) -> dict[str, Any]:
    from hba import oneshot

    return await oneshot.cmd_write(args.url, _options(args), args.lba, args.input, args.blocks)


async def _perf(args: argparse.Namespace) -> dict[str, Any]:
    from hba import oneshot

    settings = oneshot.PerfSettings(
        block_size=args.block_size, queue_depth=args.queue_depth,
        seconds=args.seconds, random=args.random, write=args.write, histogram=args.histogram)
    live = None if args.json else sys.stdout
    return await oneshot.cmd_perf(args.url, _options(args), settings, live)


# The printers below show what a target said (names, addresses, INQUIRY strings, error
# messages quoting it): every such value goes through printable() (initiator/printable.py).


def _print_discover(r: dict[str, Any]) -> None:
    if not r["targets"] and not r["skipped"]:
        print(f"portal {printable(r['portal'])} offers no targets to this initiator")
    for t in r["targets"]:
        for p in t["portals"]:
            tag = f",{p['tpgt']}" if p["tpgt"] is not None else ""
            print(f"{printable(p['address'])}{tag} {printable(t['name'])}")
        if "luns" in t:
            _print_luns(t)


def _print_luns(t: dict[str, Any]) -> None:
    """The LUNs of one target (``discover --luns``), indented under its portal lines; what
    failed on one line each (a target's whole message, escaped)."""
    if not t["luns"] and t["error"] is None:
        print("  no LUNs")
    for lun in t["luns"]:
        words = []
        if lun["device_type"] is not None:
            words.append(lun["device_type"].replace("_", " "))
            words.append(" ".join(w for w in (lun["vendor"], lun["product"]) if w) or "-")
        if lun["size_bytes"] is not None:
            words.append(f"{lun['blocks']} blocks of {lun['block_size']} bytes "
                         f"({control.human_size(lun['size_bytes'])})")
        if lun["error"] is not None:
            words.append(f"error: {lun['error']}")
        print(f"  LUN {lun['lun']}: {printable(', '.join(words))}")
    if t["error"] is not None:
        print(f"  error: {printable(t['error'])}")


def _print_fields(r: dict[str, Any], fields: Sequence[tuple[str, str]]) -> None:
    width = max(len(label) for _, label in fields)
    for key, label in fields:
        value = r.get(key)
        if value is None:
            value = "-"
        print(f"{label + ':':<{width + 1}} {printable(value)}")


def _print_inquiry(r: dict[str, Any]) -> None:
    _print_fields(r, [("vendor", "Vendor"), ("product", "Product"), ("revision", "Revision"),
                      ("device_type", "Device type"), ("unit_serial", "Unit serial"),
                      ("naa", "NAA identifier"), ("wwn", "WWN")])


def _print_readcap(r: dict[str, Any]) -> None:
    r = dict(r, size=f"{r['size_bytes']} bytes ({control.human_size(r['size_bytes'])})")
    _print_fields(r, [("blocks", "Blocks"), ("block_size", "Block size"), ("size", "Size"),
                      ("thin_provisioned", "Thin provisioned")])


def _print_transfer(r: dict[str, Any]) -> None:
    verb = "read" if "output" in r else "wrote"
    where = r.get("output") or r.get("input")
    if verb == "read" and where == "-":
        return
    print(f"{verb} {r['blocks']} blocks ({r['bytes']} bytes) at LBA {r['lba']} "
          f"{'to' if verb == 'read' else 'from'} {printable(where)}", file=sys.stderr)


def _print_perf(r: dict[str, Any]) -> None:
    print(f"\n{r['pattern']}, {r['block_size']}-byte blocks, queue depth {r['queue_depth']}: "
          f"{r['iops']:.0f} IOPS, {r['mb_per_s']:.1f} MB/s over {r['seconds']:.1f} s "
          f"({r['commands']} commands, {r['errors']} errors)")
    latency = r.get("latency") or {}
    if latency.get("mean_ms") is not None:
        print(f"latency: mean {latency['mean_ms']:.3f} ms, p50 {latency['p50_ms']:.3f} ms, "
              f"p99 {latency['p99_ms']:.3f} ms, p99.9 {latency['p999_ms']:.3f} ms")
    if r.get("histogram"):
        print(f"latency distribution drawn in {printable(r['histogram'])}")
    if r["first_error"]:
        print(f"first error: {printable(r['first_error'])}")
    if r.get("interrupted"):
        print("interrupted: the totals are of the run until Ctrl-C")


PRINTERS: dict[str, Callable[[dict[str, Any]], None]] = {
    "discover": _print_discover, "inquiry": _print_inquiry, "readcap": _print_readcap,
    "read": _print_transfer, "write": _print_transfer, "perf": _print_perf,
    **control.PRINTERS,
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a help text that standard output does not take (``hbactl --help >
    /dev/full``) is an error (:func:`main` says so), not a silent success: argparse drops
    every OSError of its printing. A reader that went away (``| head``) stays no error."""

    def _print_message(self, message: str, file: Any = None) -> None:
        if not message:
            return
        out = sys.stderr if file is None else file
        try:
            out.write(message)
            out.flush()
        except BrokenPipeError:
            if out is sys.stdout:
                silence_stdout()


def build_parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = _Parser(  # its subcommands' parsers are _Parser too
        prog="hbactl",
        description="iscsi-hba: a userspace iSCSI initiator that the kernel sees as a SCSI HBA.",
        epilog="URLs: iscsi://[user[%secret]@]host[:port]/<target-iqn>/<lun>"
               "[?header_digest=crc32c&data_digest=crc32c&target_user=..&target_password=..]. "
               "Secrets may come from ISCSI_HBA_CHAP_SECRET / ISCSI_HBA_TARGET_CHAP_SECRET "
               "instead of the URL.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log protocol events and session recovery as it goes "
                             "(twice: debug)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the result as JSON")
    common.add_argument("--pcap", metavar="FILE",
                        help="record the session's PDUs into a pcap file (Wireshark/tshark)")
    common.add_argument("--initiator-name", metavar="IQN",
                        help="initiator name (default: /etc/iscsi/initiatorname.iscsi)")
    common.add_argument("--login-timeout", type=seconds, default=15.0, metavar="SECONDS",
                        help="give up a login after this long, all exchanges and redirects "
                             "included (default 15)")
    common.add_argument("--command-timeout", type=seconds, metavar="SECONDS",
                        help="abort a command the target has not completed after this long: "
                             "ABORT TASK, then LUN RESET, then a new connection (default 30; "
                             "0: no deadline)")
    common.add_argument("--task-management-timeout", type=seconds, metavar="SECONDS",
                        help="give each ABORT TASK or LUN RESET this long (default 15)")
    common.add_argument("--replacement-timeout", type=seconds, metavar="SECONDS",
                        help="after a lost connection, fail the commands when the session has "
                             "not worked again for this long (default 120)")
    common.add_argument("--noop-interval", type=seconds, metavar="SECONDS",
                        help="ping the target after this long without progress (default 5; "
                             "0: no pings)")
    common.add_argument("--noop-timeout", type=seconds, metavar="SECONDS",
                        help="a ping unanswered this long, with no progress meanwhile, means "
                             "the connection is dead (default 5)")
    common.add_argument("--logout-timeout", type=seconds, metavar="SECONDS",
                        help="give up an orderly logout after this long (default 10)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "discover", parents=[common],
        help="list the targets and portals a portal offers (SendTargets), and with --luns "
             "their LUNs",
        description="List the targets and portals a portal offers (SendTargets). With --luns, "
                    "also log in to each target through that portal, with the same "
                    "credentials and bounds, and list its LUNs (REPORT LUNS): device type, "
                    "vendor and product (INQUIRY), and the capacity of block devices (READ "
                    "CAPACITY), like libiscsi's iscsi-ls -s. A target or LUN that cannot be "
                    "listed says why on its line and the exit status is 1. A TargetAddress "
                    "that cannot be used is skipped with a warning on standard error naming "
                    "the target, the address and why, and the rest is listed (as iscsiadm "
                    "does); the exit status is then 1 only when no usable portal is left. "
                    "With --luns --pcap x.pcap, "
                    "the session of the Nth target is recorded in x.targetN.pcap, so x.pcap "
                    "must then be a regular file (a FIFO or /dev/stdout is refused before "
                    "any login).")
    p.add_argument("url", metavar="URL", help=PORTAL_URL)
    p.add_argument("--luns", action="store_true",
                   help="log in to each target and list its LUNs: type, vendor, product, size")
    p.set_defaults(handler=_discover)

    p = sub.add_parser("inquiry", parents=[common],
                       help="vendor, product, revision, unit serial and NAA identifier")
    p.add_argument("url", metavar="URL", help=LUN_URL)
    p.set_defaults(handler=_inquiry)

    p = sub.add_parser("readcap", parents=[common], help="number of blocks and block size")
    p.add_argument("url", metavar="URL", help=LUN_URL)
    p.set_defaults(handler=_readcap)

    p = sub.add_parser("read", parents=[common], help="read blocks into a file")
    p.add_argument("url", metavar="URL", help=LUN_URL)
    p.add_argument("--lba", type=whole_number, required=True, help="first block")
    p.add_argument("--blocks", type=whole_number, required=True, help="number of blocks")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="file, or - for stdout")
    p.set_defaults(handler=_read)

    p = sub.add_parser(
        "write", parents=[common], help="write a file's blocks",
        description="Write a file's blocks (or standard input's) from block --lba on. The "
                    "input is streamed: read a chunk (1 MiB, or the LUN's Block Limits "
                    "maximum) at a time, each written as it is read with a few WRITEs in "
                    "flight, so memory stays at a few MiB whatever its size. A regular file "
                    "is judged by its size before anything is written; a pipe's length only "
                    "reading finds, so one that proves longer than the LUN (without "
                    "--blocks), shorter than --blocks, or no whole number of blocks is "
                    "refused when that shows, after the chunks before it were written. "
                    "Then, as after a failed command or Ctrl-C (exit status 130), the error "
                    "says which blocks were written.")
    p.add_argument("url", metavar="URL", help=LUN_URL)
    p.add_argument("--lba", type=whole_number, required=True, help="first block")
    p.add_argument("-i", "--input", required=True, metavar="FILE", help="file, or - for stdin")
    p.add_argument("--blocks", type=whole_number, help="number of blocks (default: the whole file)")
    p.set_defaults(handler=_write)

    p = sub.add_parser("perf", parents=[common],
                       help="measure IOPS and throughput, like libiscsi's iscsi-perf")
    p.add_argument("url", metavar="URL", help=LUN_URL)
    p.add_argument("--block-size", type=size, default=4096, metavar="BYTES",
                   help="bytes per command: 4096, 4k, 128k, 1m (default 4096)")
    p.add_argument("--queue-depth", type=whole_number, default=32, metavar="N",
                   help="commands in flight (default 32)")
    p.add_argument("--seconds", type=seconds, default=10.0, help="how long to run (default 10)")
    p.add_argument("--random", action="store_true", help="random LBAs instead of sequential")
    p.add_argument("--write", action="store_true",
                   help="WRITE instead of READ (destroys the LUN's data)")
    p.add_argument("--histogram", metavar="FILE.svg",
                   help="draw the latency distribution into this SVG file (needs matplotlib: "
                        "pip install 'iscsi-hba[plot]')")
    p.set_defaults(handler=_perf)

    control.add_commands(sub)
    top.add_command(sub)
    # `hbactl readcap URL -v` was "unrecognized arguments: -v": -v goes after the command
    # too, as `hbactl daemon -v` has it (a dest of its own: a subcommand's default would
    # overwrite the count taken before the command).
    for name, command in sub.choices.items():
        if name != "daemon":
            command.add_argument("-v", "--verbose", dest="command_verbose", action="count",
                                 default=0, help="the same as -v before the command")
    return parser


RECOVERY_LOGGER = progress_log.name
"""Session recovery as it goes (:data:`initiator.recovery.progress_log`): behind ``-v`` here."""


def _not_recovery_progress(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or not (
        record.name == RECOVERY_LOGGER or record.name.startswith(RECOVERY_LOGGER + "."))


def log_handler(verbose: int) -> logging.Handler:
    """Where a command's log lines go: standard error, escaped. Without ``-v``, the
    warnings of a session's recovery ("connection failed ...; recovering") are left out: a
    one-shot command that ends in an error says in that one error what recovery tried
    (:meth:`initiator.recovery.RecoveryPolicy.give_up_message`), and one that succeeds
    needs no word of it. ``hbactl daemon`` logs recovery all the same
    (:func:`hba.control.configure_daemon_logging` replaces this handler)."""
    handler = logging.StreamHandler()
    handler.setFormatter(PrintableFormatter("hbactl: %(name)s: %(message)s"))
    if verbose == 0:
        handler.addFilter(_not_recovery_progress)
    return handler


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, handlers=[log_handler(verbose)])


def main(argv: Sequence[str] | None = None) -> int:
    _stand_in_for_closed_streams()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except OSError as exc:   # the help, to a full disk or a closed descriptor
        silence_stdout()
        return _fail(stdout_error(exc), EXIT_FAILURE)
    _configure_logging(max(args.verbose, getattr(args, "command_verbose", 0)))
    handler: Handler = args.handler
    try:
        result: dict[str, Any] = asyncio.run(handler(args))
    except KeyboardInterrupt:
        print("hbactl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ConfigurationError, HBAError) as exc:
        return _fail(exc, EXIT_USAGE if isinstance(exc, ConfigurationError) else EXIT_FAILURE)
    except (ISCSIError, OSError) as exc:
        return _fail(exc, EXIT_FAILURE)
    try:
        if getattr(args, "json", False):
            json.dump(result, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            printer = PRINTERS.get(args.command)
            if printer is not None:
                printer(result)
        sys.stdout.flush()
    except BrokenPipeError:
        # `hbactl status | head -3`: the reader is done, and that is no error of ours (it was
        # a traceback).
        silence_stdout()
    except OSError as exc:
        # `hbactl inquiry URL > /dev/full`: the result is lost, which the user must learn.
        silence_stdout()
        return _fail(stdout_error(exc), EXIT_FAILURE)
    return int(result.get("exit_status", EXIT_OK))


def stdout_error(exc: OSError) -> HBAError:
    """The one error for a result that standard output did not take (a full disk, a closed
    descriptor), other than a reader that went away (:func:`silence_stdout`)."""
    return HBAError(f"cannot write standard output: {exc.strerror or exc}; check where it "
                    "goes (a full file system, a descriptor closed with >&-)")


class _Closed(io.BufferedIOBase):
    """A standard stream hbactl was started without (``hbactl inquiry URL >&-``): Python
    makes it ``None``, which the commands' writes and reads met as an AttributeError
    traceback; this one fails them as the closed descriptor would (EBADF), and keeps nothing
    for the interpreter's flush at exit to fail on again."""

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        raise OSError(errno.EBADF, "it is closed")

    read1 = read

    def write(self, data: Any) -> int:
        raise OSError(errno.EBADF, "it is closed")


def _stand_in_for_closed_streams() -> None:
    """Stand-ins for the standard streams hbactl was started without.

    Their descriptors are taken by /dev/null first: left free, the next file or socket
    opened would take the number, and what is written there (a C-level message on 2) would
    land in it. A closed standard error becomes /dev/null: Python makes it ``None``, and
    ``print(..., file=None)`` prints to standard output, so that ``hbactl read URL ... -o -
    2>&- | xxd`` got its error message in the block data. Its errors are lost then, as
    they would be to any program; the exit status still tells."""
    for fd in range(3):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - for the exit
    if sys.stdin is None:
        sys.stdin = io.TextIOWrapper(_Closed(), encoding="utf-8")
    if sys.stdout is None:
        sys.stdout = io.TextIOWrapper(_Closed(), encoding="utf-8")


def silence_stdout() -> None:
    """Standard output's reader went away (``| head``), or it cannot take more: point it at
    /dev/null, so that the interpreter's flush at exit cannot fail again."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):   # a stand-in for a closed one (_Closed): nothing to flush
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - for the exit
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _fail(exc: BaseException, status: int) -> int:
    if os.environ.get("HBACTL_TRACEBACK"):
        raise exc
    status = int(getattr(exc, "exit_status", status))
    message = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        message = f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
    # Every message says what to check itself, and whose fault it is: a CHAP protocol error
    # of the target is not a wrong secret of ours (initiator.chap). A message of several
    # lines (a configuration's problems) says so in ``lines``; any other '\n' may come from a
    # target and stays escaped.
    first, *more = getattr(exc, "lines", None) or (message,)
    print("\n".join([f"hbactl: {printable(first)}", *map(printable, more)]), file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
