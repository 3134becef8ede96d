"""Serve one TCMU device with one iSCSI session: the per-device handler as a process.

    python -m tcmu_handler.serve --device NAME [--lun N] [--takeover|--no-takeover] URL

Theory of operation
-------------------
1. Log in to the URL's target (CHAP and digests from the URL or the environment, as
   ``hbactl`` does: :mod:`initiator.urlconfig`). The session reconnects for as long as the
   process lives; commands fail only after the replacement timeout of an outage.
2. Find the uio device of the TCMU backstore ``NAME`` (``user_<N>/NAME`` also accepted),
   waiting up to ``--wait`` seconds for it to appear, and open it. ``/dev/uioN`` has one
   owner: if another process holds it, that is an error and nothing is disturbed.
3. Restart takeover: a handler that died (SIGKILL, crash) leaves the commands it had taken
   between ``cmd_tail`` and ``cmd_head`` with nobody to complete them. By default (``auto``)
   a ring in that state is taken over: ``action/block_dev``, ``action/reset_ring`` (the kernel
   fails those commands with BUSY, and the SCSI mid-layer retries them), unblock
   (:func:`tcmu_handler.device.takeover_with`). ``--takeover`` always does it,
   ``--no-takeover`` never (the ring is then replayed from ``cmd_tail``).
4. Serve the ring with a :class:`~tcmu_handler.dispatcher.Dispatcher` until the device is
   removed (its backstore deleted) or SIGTERM/SIGINT (then commands in flight are drained for
   up to ``--drain-timeout`` seconds), log out, exit 0.

``kill -USR1`` logs the dispatcher's counters (commands, TMR entries, aborts, ring wraps...).

Readiness: once the ring is served the process sends ``READY=1`` to ``$NOTIFY_SOCKET`` when
that is set (systemd ``Type=notify``, or a test), and logs "serving". Every failure is one
ERROR line saying what failed and what to check, and a non-zero exit status: 2 for a bad URL
or option, 1 for anything else (target unreachable, login refused, device busy or missing,
ring corrupt). No traceback reaches the log unless ``HBA_LOG=debug``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import enum
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from initiator.argtypes import digits, seconds
from initiator.errors import ConfigurationError, ISCSIError
from initiator.login import Portal
from initiator.printable import PrintableFormatter
from initiator.transport import Session
from initiator.url import check_seconds, decimal
from initiator.urlconfig import session_config, target_url
from tcmu_handler.device import (
    SUBTYPE,
    TcmuConfigfs,
    UioDevice,
    UioInfo,
    find_device,
    find_devices,
    takeover_with,
)
from tcmu_handler.dispatcher import Dispatcher, StopReason
from tcmu_handler.errors import DeviceNotFound, TCMUError
from tcmu_handler.executor import SessionExecutor
from tcmu_handler.sdnotify import sd_notify

log = logging.getLogger("tcmu_handler.serve")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

_POLL_INTERVAL = 0.1


class Takeover(enum.Enum):
    """When to reset the ring after opening the device."""

    AUTO = "auto"
    """Only when a previous handler left commands on the ring (``cmd_head`` != ``cmd_tail``)."""
    ALWAYS = "always"
    NEVER = "never"


class Stopped(Exception):
    """SIGTERM/SIGINT arrived before the ring was being served."""


def parse_device_name(text: str) -> tuple[int | None, str]:
    """``NAME`` or ``user_<N>/NAME`` -> (hba index or None, NAME)."""
    head, slash, tail = text.partition("/")
    if slash:
        index = decimal(head.removeprefix("user_"))
        if not head.startswith("user_") or index is None or not tail or "/" in tail:
            raise ConfigurationError(
                f"--device {text!r}: expected a backstore name, or user_<N>/<name>")
        return index, tail
    if not text:
        raise ConfigurationError("--device needs the TCMU backstore's name")
    return None, text


def _not_found_hint(name: str, hba_index: int | None) -> str:
    """Why no ``iscsi`` device matched: a device of that name with another subtype?"""
    for info in find_devices(None):
        if info.name.dev_name == name and hba_index in (None, info.name.hba_index):
            return (f"; {info.label} exists but belongs to handler {info.name.subtype!r} "
                    f"(dev_config {info.name.subtype}/{info.name.cfgstring}), not {SUBTYPE!r}")
    return ""


async def wait_for_device(name: str, hba_index: int | None, timeout: float,
                          stop: asyncio.Event) -> tuple[UioInfo, UioDevice]:
    """Find and open the uio device of backstore ``name``, waiting up to ``timeout`` s.

    Its ``/dev`` node may lag its sysfs entry: a missing node is retried too. Raises
    :class:`DeviceNotFound` after ``timeout``, :class:`DeviceBusy` at once, :class:`Stopped`
    when ``stop`` is set meanwhile.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    announced = False
    while True:
        try:
            info = find_device(name, hba_index=hba_index)
            return info, UioDevice.open(info)
        except DeviceNotFound as exc:
            if loop.time() >= deadline:
                raise DeviceNotFound(
                    f"{exc} (waited {timeout:g} s){_not_found_hint(name, hba_index)}") from None
            if not announced:
                announced = True
                log.info("waiting up to %g s for TCMU backstore %s to appear", timeout, name)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), _POLL_INTERVAL)
        if stop.is_set():
            raise Stopped


def prepare_ring(info: UioInfo, device: UioDevice, mode: Takeover) -> UioDevice:
    """Take the ring over if ``mode`` says so (see the module docstring, step 3)."""
    if mode is Takeover.NEVER:
        return device
    if mode is Takeover.AUTO:
        try:
            mailbox = device.mailbox()
        except TCMUError:
            device.close()
            raise
        if mailbox.cmd_head == mailbox.cmd_tail:
            return device
        log.info("%s: a previous handler left commands on the ring (cmd_tail %d, cmd_head %d): "
                 "taking it over", device.name, mailbox.cmd_tail, mailbox.cmd_head)
    return takeover_with(lambda: device, TcmuConfigfs.for_device(info))


def log_stats(dispatcher: Dispatcher) -> None:
    """SIGUSR1: one line with the dispatcher's counters."""
    counters = " ".join(f"{k}={v}" for k, v in dataclasses.asdict(dispatcher.stats).items())
    log.info("%s: stats %s", dispatcher.device.name, counters)


async def _until_stopped(work: asyncio.Future[Any], stop: asyncio.Event) -> bool:
    """Wait for ``work`` or ``stop``; True when ``work`` finished first."""
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    return work.done()


async def serve(args: argparse.Namespace) -> int:
    """The whole life of the handler (see the module docstring)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[str] = []

    def on_signal(signum: signal.Signals) -> None:
        if not received:
            received.append(signum.name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    hba_index, name = parse_device_name(args.device)
    url = target_url(args.url)
    assert url.target_iqn is not None and url.lun is not None
    lun: int = url.lun if args.lun is None else args.lun
    config = session_config(url, initiator_name=args.initiator_name,
                            login_timeout=args.login_timeout, reconnect_forever=True)
    session = Session(Portal(url.host, url.port), url.target_iqn, config)

    login = asyncio.ensure_future(session.login())
    if not await _until_stopped(login, stop):
        login.cancel()
        with contextlib.suppress(BaseException):
            await login
        await session.close()
        log.info("stopped by %s while logging in to %s", received[0], url)
        return EXIT_OK
    try:
        login.result()
    except ISCSIError as exc:
        raise ISCSIError(f"cannot log in to {url}: {exc}") from None
    except OSError as exc:
        raise ISCSIError(f"cannot log in to {url}: {exc.strerror or exc}") from None

    dispatcher: Dispatcher | None = None
    try:
        try:
            info, device = await wait_for_device(name, hba_index, args.wait, stop)
        except Stopped:
            log.info("stopped by %s while waiting for TCMU backstore %s", received[0], name)
            return EXIT_OK
        device = prepare_ring(info, device, Takeover(args.takeover))
        try:
            dispatcher = Dispatcher(device, SessionExecutor(session), lun=lun)
        except BaseException:
            device.close()
            raise
        dispatcher.start()
        loop.add_signal_handler(signal.SIGUSR1, log_stats, dispatcher)
        log.info("serving %s with LUN %d of %s", info.label, lun, url)
        sd_notify(f"READY=1\nSTATUS=serving {info.label}\nMAINPID={os.getpid()}")
        run = asyncio.ensure_future(dispatcher.run())
        if await _until_stopped(run, stop):
            reason = run.result()
        else:
            sd_notify("STOPPING=1")
            reason = await dispatcher.close(timeout=args.drain_timeout)
            stats = dispatcher.stats
            log.info("stopped by %s: %s closed after %d command(s)", received[0], info.label,
                     stats.completed)
        if reason is StopReason.RING_CORRUPT:
            return EXIT_FAILURE  # the dispatcher logged why
        return EXIT_OK
    finally:
        if dispatcher is not None and dispatcher.stop_reason is None:
            await dispatcher.close(timeout=0)
        with contextlib.suppress(ISCSIError, OSError):
            await session.logout()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tcmu_handler.serve",
        description="Serve one TCMU backstore (user:iscsi) with an iSCSI session to URL.",
        epilog="URL: iscsi://[user[%secret]@]host[:port]/<target-iqn>/<lun>[?header_digest="
               "crc32c&data_digest=crc32c&target_user=..&target_password=..]. Secrets may come "
               "from ISCSI_HBA_CHAP_SECRET / ISCSI_HBA_TARGET_CHAP_SECRET instead. Logging: "
               "HBA_LOG=debug|info|warning (default info).")
    parser.add_argument("url", metavar="URL", help="the remote LUN")
    parser.add_argument("--device", required=True, metavar="NAME",
                        help="the TCMU backstore's name (or user_<N>/<name>)")
    parser.add_argument("--lun", type=digits, metavar="N",
                        help="the target's LUN to send the commands to (default: the URL's)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--takeover", dest="takeover", action="store_const",
                       const=Takeover.ALWAYS.value,
                       help="always reset the ring after opening (restart after a crash)")
    group.add_argument("--no-takeover", dest="takeover", action="store_const",
                       const=Takeover.NEVER.value,
                       help="never reset the ring; serve what is on it")
    parser.set_defaults(takeover=Takeover.AUTO.value)
    parser.add_argument("--wait", type=seconds, default=60.0, metavar="SECONDS",
                        help="how long to wait for the device to appear (default 60)")
    parser.add_argument("--drain-timeout", type=seconds, default=30.0, metavar="SECONDS",
                        help="on SIGTERM, how long commands in flight may take (default 30)")
    parser.add_argument("--initiator-name", metavar="IQN",
                        help="initiator name (default: /etc/iscsi/initiatorname.iscsi)")
    parser.add_argument("--login-timeout", type=seconds, default=15.0, metavar="SECONDS",
                        help="give up the first login after this long (default 15)")
    return parser


def log_handler() -> logging.Handler:
    """Where the handler logs: stderr, every line escaped (a target's names, addresses and
    reasons reach these lines, as in hbactl's: :mod:`initiator.printable`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PrintableFormatter(
        "%(asctime)s tcmu-serve[%(process)d] %(levelname)s %(message)s"))
    return handler


def _configure_logging() -> None:
    level = os.environ.get("HBA_LOG", "info").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        level = "INFO"
    logging.basicConfig(level=level, handlers=[log_handler()])


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging()
    if args.lun is not None and not 0 <= args.lun <= 0xFFFF:
        log.error("--lun %d is not a LUN from 0 to 65535", args.lun)
        return EXIT_USAGE
    try:   # every wait has a bound
        check_seconds("--wait", args.wait)
        check_seconds("--login-timeout", args.login_timeout)
        check_seconds("--drain-timeout", args.drain_timeout, zero=True)
    except ConfigurationError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    error: BaseException
    try:
        return asyncio.run(serve(args))
    except ConfigurationError as exc:
        status, error = EXIT_USAGE, exc
    except (ISCSIError, TCMUError, OSError) as exc:
        status, error = EXIT_FAILURE, exc
    except KeyboardInterrupt:  # a second Ctrl-C while shutting down
        return EXIT_OK
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        log.error("%s", error, exc_info=error)
    else:
        message = (error.strerror or str(error)) if isinstance(error, OSError) else str(error)
        log.error("%s", message or type(error).__name__)
    return status


if __name__ == "__main__":
    sys.exit(main())
