#!/usr/bin/env python3
"""The iscsi-hba daemon with per-path fault injection, for the multipath experiments (issue 12).

Runs the real :class:`hba.daemon.Daemon` (in :class:`tests.kernel.hba_daemon.DaemonThread`)
with the configuration given, after replacing the daemon's ``SessionExecutor`` by one that
can answer every command of one path itself instead of sending it to the target. A shell
script picks the answer by writing a file named after the portal host into ``--control``:

    echo "status 02 2 08 00" > DIR/127.0.0.1   # CHECK CONDITION, NOT READY, 08/00
    echo "status 08" > DIR/127.0.0.1            # BUSY, no sense
    echo "error SessionFailed" > DIR/127.0.0.1  # what the product maps that error to
    echo "hold" > DIR/127.0.0.1                 # keep the commands; send them when cleared
    rm DIR/127.0.0.1                            # back to normal

That way the kernel sees exactly the ring completion (status + sense) under test, while
everything else (the rings, tcm_loop, the SCSI disks, dm-multipath) is the real thing.
The daemon runs until SIGTERM; ``--ready FILE`` is written (name -> /dev/sdX, one per line)
once every entry is attached.

Research prototype, not product code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hba.daemon
from hba.daemon import DaemonOptions
from initiator import errors
from initiator.command import Buffers, CommandResult, CompletionCallback
from initiator.scsi import SenseKey, build_fixed_sense
from initiator.session import Task
from initiator.transport import Session, SessionState
from tcmu_handler.executor import SessionExecutor
from tests.kernel.hba_daemon import DaemonThread

log = logging.getLogger("iscsi-hba.faultpath")


@dataclass(frozen=True)
class Fault:
    """What to answer instead of the target: a status (+ sense), an error, or hold."""

    spec: str
    result: CommandResult | errors.ISCSIError | None   # None: hold

    @classmethod
    def parse(cls, text: str) -> Fault:
        words = text.split()
        if words == ["hold"]:
            return cls(text, None)
        if len(words) == 2 and words[0] == "error":
            exc_type = getattr(errors, words[1])
            return cls(text, exc_type(f"injected {words[1]}"))
        if words and words[0] == "status":
            status = int(words[1], 16)
            sense = b""
            if len(words) == 5:
                key, asc, ascq = (int(w, 16) for w in words[2:])
                sense = build_fixed_sense(SenseKey(key), asc, ascq)
            return cls(text, CommandResult(status, sense))
        raise ValueError(f"cannot parse fault {text!r}")


FAULTS: dict[str, Fault] = {}
_HELD: dict[str, list[tuple[Session, int, bytes, Buffers | None, Buffers | None,
                            CompletionCallback]]] = {}


class FaultyExecutor(SessionExecutor):
    """A SessionExecutor whose ``submit`` consults :data:`FAULTS` for its portal's host."""

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        host = session.portal.host
        real = session.submit

        def submit(lun: int, cdb: bytes, *, data_out: Buffers | None = None,
                   data_in: Buffers | None = None, on_done: CompletionCallback) -> Task:
            fault = FAULTS.get(host)
            if fault is None:
                return real(lun, cdb, data_out=data_out, data_in=data_in, on_done=on_done)
            if fault.result is None:
                _HELD.setdefault(host, []).append((session, lun, bytes(cdb), data_out,
                                                   data_in, on_done))
            else:
                asyncio.get_running_loop().call_soon(on_done, fault.result)
            return Task(lun, bytes(cdb), data_out, data_in, on_done)

        self.submit = submit


def enforce_replacement_timeout() -> None:
    """Make the replacement timeout a timer (what open-iscsi's recovery_tmo is).

    Today ``Session`` checks the timeout only when a reconnect attempt ends; against a portal
    that drops packets an attempt lasts the whole login timeout (15 s), so commands fail
    that much later than ``ReplacementTimeout`` says. This wraps ``_connection_failed`` to
    also schedule ``_give_up`` at the outage start + the timeout. Research patch only: the
    change belongs in initiator/transport.py.
    """
    original = Session._connection_failed

    def connection_failed(self: Session, conn: Any, error: errors.ISCSIError,
                          time2wait: int | None = None) -> None:
        original(self, conn, error, time2wait)
        since = self._outage_since
        if since is None or self._failed_error is not None:
            return

        def expire() -> None:
            if self._outage_since == since and self._failed_error is None and \
                    self.state is SessionState.RECOVERING:
                self._give_up(error, None)

        asyncio.get_running_loop().call_at(since + self.config.replacement_timeout, expire)

    setattr(Session, "_connection_failed", connection_failed)  # noqa: B010 (research hook)


def _release_held(host: str) -> None:
    for session, lun, cdb, data_out, data_in, on_done in _HELD.pop(host, []):
        session.submit(lun, cdb, data_out=data_out, data_in=data_in, on_done=on_done)


def _watch(control: Path, loop: asyncio.AbstractEventLoop, stop: threading.Event) -> None:
    """Poll the control directory; apply changes in the daemon's loop."""
    seen: dict[str, str] = {}
    while not stop.wait(0.1):
        now: dict[str, str] = {}
        for f in control.iterdir():
            with contextlib.suppress(OSError):
                now[f.name] = f.read_text().strip()
        if now == seen:
            continue
        for host in set(seen) | set(now):
            if seen.get(host) == now.get(host):
                continue
            text = now.get(host)

            def apply(host: str = host, text: str | None = text) -> None:
                if text:
                    FAULTS[host] = Fault.parse(text)
                    log.warning("fault injection on %s: %s", host, text)
                else:
                    FAULTS.pop(host, None)
                    log.warning("fault injection on %s cleared", host)
                if host not in FAULTS or FAULTS[host].result is not None:
                    _release_held(host)

            loop.call_soon_threadsafe(apply)
        seen = now


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--control", required=True, type=Path)
    parser.add_argument("--log", required=True, type=Path)
    parser.add_argument("--ready", type=Path)
    parser.add_argument("--replacement-timer", action="store_true",
                        help="enforce ReplacementTimeout with a timer")
    args = parser.parse_args(argv)
    if args.replacement_timer:
        enforce_replacement_timeout()
    args.control.mkdir(parents=True, exist_ok=True)
    setattr(hba.daemon, "SessionExecutor", FaultyExecutor)  # noqa: B010 (research hook)
    hba_thread = DaemonThread(DaemonOptions(config_path=args.config, watch_uio=False),
                              log_path=args.log, log_level=logging.INFO)
    hba_thread.start(timeout=600)
    disks = hba_thread.call_sync(lambda d: {n: (x.device.node if x.device else "?")
                                            for n, x in d.disks.items()})
    if args.ready:
        args.ready.write_text("".join(f"{n} {node}\n" for n, node in sorted(disks.items())))
    print("ready:", disks, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    loop = hba_thread._loop
    assert loop is not None
    watcher = threading.Thread(target=_watch, args=(args.control, loop, stop), daemon=True)
    watcher.start()
    while not stop.wait(1):
        pass
    t = time.monotonic()
    hba_thread.stop(timeout=120)
    print(f"stopped in {time.monotonic() - t:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
