"""The one-shot ``hbactl`` commands against hostile targets: bounded, one clear error.

``hbactl perf`` against a target that never answers must end within the bounds it was given
(it used to run with NOP pings off and wait for in-flight commands with no deadline), and
``hbactl`` must turn a target's garbage into one ``hbactl: ...`` line, never a traceback. The
fake target runs on a real loopback port; for the command line, in a thread of its own, since
``hbactl`` runs its own event loop.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from hba import cli, oneshot
from initiator import pdu as P
from initiator.errors import CommandTimeout, ISCSIError
from initiator.keys import NegotiationSettings
from initiator.url import parse_url
from tests.support.fake_target import FakeTarget, FakeTargetServer, Hostility, RamDisk, TargetNode

INI = "iqn.2024-01.org.example:initiator"
TGT = "iqn.2003-01.org.example:disk1"


def fake(**kw: Any) -> FakeTarget:
    settings = NegotiationSettings.rfc_defaults(default_time2wait=0)
    return FakeTarget([TargetNode(TGT, {0: RamDisk(blocks=4096)})], settings=settings, **kw)


def options(**kw: Any) -> oneshot.Options:
    return oneshot.Options(initiator_name=INI, **kw)


def swallow_reads(conn: Any, pdu: P.PDU) -> bool:
    """A pdu_hook: READs vanish (never answered); everything else is served."""
    return isinstance(pdu, P.ScsiCommand) and pdu.cdb[0] in (0x28, 0x88)


async def perf_failure(**bounds: float) -> tuple[float, BaseException]:
    """Run ``hbactl perf`` (4 in flight, 0.2 s) against a target that swallows its READs;
    return how long it took to fail, and with what."""
    target = fake(hostile=Hostility(pdu_hook=swallow_reads))
    async with FakeTargetServer(target) as server:
        url = f"iscsi://127.0.0.1:{server.port}/{TGT}/0"
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            await asyncio.wait_for(oneshot.cmd_perf(
                url, options(logout_timeout=0.3, **bounds),
                oneshot.PerfSettings(queue_depth=4, seconds=0.2), None), 10.0)
        except ISCSIError as exc:
            return loop.time() - start, exc
    raise AssertionError("hbactl perf did not fail")


async def test_perf_against_a_target_that_never_answers_ends_at_the_command_deadline(
        ) -> None:
    took, error = await perf_failure(command_timeout=0.3)
    assert isinstance(error, CommandTimeout) and "command timeout of 0.3 s" in str(error)
    assert took < 4.0


async def test_perf_in_flight_wait_is_bounded_even_without_a_command_deadline() -> None:
    # Command deadlines off, the target answers pings but never a READ: the wait for the
    # commands in flight at the end still ends (replacement_timeout past the run's end).
    took, error = await perf_failure(command_timeout=0, replacement_timeout=0.3)
    assert re.search(r"4 command\(s\) .* still in flight", str(error)), error
    assert took < 5.0


def stall_mid_data_in(conn: Any, pdu: P.PDU) -> bool:
    """A pdu_hook: the first READ gets a Data-In's header and part of its payload, then the
    target sends nothing more on that connection (pings, aborts: nothing)."""
    if not (isinstance(pdu, P.ScsiCommand) and pdu.cdb[0] == 0x28):
        return False
    data_in = P.DataIn(itt=pdu.itt, data=bytes(4096), stat_sn=0, exp_cmd_sn=pdu.cmd_sn + 1,
                       max_cmd_sn=pdu.cmd_sn + 32)
    conn.inject_bytes(P.encode(data_in)[: P.BHS_LEN + 1000])
    conn.target.hostile.silent = True
    return True


def test_hbactl_read_stalled_mid_pdu_ends_at_the_command_timeout(
        tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """A target that stops sending in the middle of a Data-In: no abort can be answered
    behind it, so the read ends at its --command-timeout (plus at most that again: see
    initiator.session "Timers"), not when the keepalive or the abort's escalation would
    (both set far out here), and the one line says what happened, where, and what to do."""
    target = fake(hostile=Hostility(pdu_hook=stall_mid_data_in))
    with target_in_a_thread(target) as port:
        status = cli.main(["read", f"iscsi://127.0.0.1:{port}/{TGT}/0", "--initiator-name",
                           INI, "--lba", "0", "--blocks", "8", "-o", str(tmp_path / "out"),
                           "--command-timeout", "0.5", "--noop-interval", "0",
                           "--task-management-timeout", "60", "--replacement-timeout", "5"])
    err = capsys.readouterr().err.splitlines()
    assert status == 1
    assert err[-1].startswith("hbactl: command 0x28 (task 0x"), err
    assert "did not complete within the command timeout of 0.5 s in target " \
        f"{TGT} at 127.0.0.1:{port}; it could not be aborted: target {TGT} at " \
        f"127.0.0.1:{port} stopped sending in the middle of a PDU and sent nothing for " in err[-1]
    assert "check that the target is running and that the network path to it works" in err[-1]
    assert not any("Traceback" in line for line in err)


@pytest.mark.parametrize(("name", "option", "value"), [
    ("command_timeout", "--command-timeout", -1.0), ("noop_timeout", "--noop-timeout", 0.0),
    ("logout_timeout", "--logout-timeout", float("nan")),
    ("replacement_timeout", "--replacement-timeout", float("inf")),
    ("tmf_timeout", "--task-management-timeout", 0.0),
])
def test_bad_bounds_are_refused(name: str, option: str, value: float) -> None:
    with pytest.raises(ISCSIError, match=f"{option} "):
        options(**{name: value}).timeouts()


def test_hbactl_options_reach_the_session_config() -> None:
    args = cli.build_parser().parse_args([
        "inquiry", "iscsi://h/iqn.2003-01.org.example:d/0", "--command-timeout", "0",
        "--task-management-timeout", "2", "--replacement-timeout", "9", "--noop-interval",
        "0", "--noop-timeout", "3", "--logout-timeout", "4", "--login-timeout", "5"])
    config = oneshot.session_config(parse_url(args.url), cli._options(args))
    assert (config.command_timeout, config.tmf_timeout, config.replacement_timeout,
            config.noop_interval, config.noop_timeout, config.logout_timeout,
            config.login_timeout) == (0, 2, 9, 0, 3, 4, 5)
    defaults = oneshot.session_config(parse_url(args.url), oneshot.Options())
    assert (defaults.command_timeout, defaults.replacement_timeout) == (30, 120)


def test_login_timeout_must_be_positive() -> None:
    with pytest.raises(ISCSIError, match="--login-timeout 0"):
        options(login_timeout=0.0).timeouts()


# -- the command line ---------------------------------------------------------------------------


@contextmanager
def target_in_a_thread(target: FakeTarget) -> Iterator[int]:
    """Serve ``target`` from a thread with its own loop; yields the port."""
    ready = threading.Event()
    stop: list[asyncio.Event] = []
    port: list[int] = []

    async def serve() -> None:
        async with FakeTargetServer(target) as server:
            port.append(server.port)
            stop.append(asyncio.Event())
            ready.set()
            await stop[0].wait()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10.0)
    try:
        yield port[0]
    finally:
        loop.call_soon_threadsafe(stop[0].set)
        thread.join(10.0)
        loop.close()


@pytest.mark.parametrize("address", ["a..b", "x" * 70 + ".example:3260"])
def test_hbactl_redirect_to_garbage_is_one_line(capsys: pytest.CaptureFixture[str],
                                                address: str) -> None:
    target = fake(hostile=Hostility(redirect=(address, False)))
    with target_in_a_thread(target) as port:
        status = cli.main(["inquiry", f"iscsi://127.0.0.1:{port}/{TGT}/0",
                           "--initiator-name", INI, "--login-timeout", "5"])
    err = capsys.readouterr().err
    assert status == 1
    assert err.count("\n") == 1 and err.startswith("hbactl: "), err
    assert "not a portal address" in err and "Traceback" not in err


def test_hbactl_login_flood_names_the_login_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    target = fake(hostile=Hostility(hold_transit=1 << 60))
    with target_in_a_thread(target) as port:
        status = cli.main(["readcap", f"iscsi://127.0.0.1:{port}/{TGT}/0",
                           "--initiator-name", INI, "--login-timeout", "0.3"])
    err = capsys.readouterr().err
    assert status == 1 and "within the login timeout of 0.3 s" in err, err
    assert err.count("\n") == 1


def test_a_malformed_initiator_name_is_refused_before_connecting(
        capsys: pytest.CaptureFixture[str]) -> None:
    # Port 1 refuses: reaching it would be exit status 1 and a connection error.
    status = cli.main(["readcap", "--initiator-name", "bogus",
                       f"iscsi://127.0.0.1:1/{TGT}/0"])
    err = capsys.readouterr().err
    assert status == 2, err
    assert "initiator name (--initiator-name) 'bogus' is not a valid iSCSI name" in err
    assert err.count("\n") == 1


def test_read_into_a_path_that_cannot_be_written_is_refused_before_connecting(
        tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    # Port 1 refuses: reaching it would be a connection error.
    status = cli.main(["read", "--initiator-name", INI, f"iscsi://127.0.0.1:1/{TGT}/0",
                       "--lba", "0", "--blocks", "1", "-o", str(tmp_path / "no" / "x")])
    err = capsys.readouterr().err
    assert status == 2 and "cannot write" in err and "there is no directory" in err, err
    assert err.count("\n") == 1


@pytest.mark.parametrize("command", [["discover", "iscsi://127.0.0.1:1"],
                                     ["readcap", f"iscsi://127.0.0.1:1/{TGT}/0"]])
def test_a_capture_that_cannot_be_written_is_refused_before_connecting(
        tmp_path: Any, capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    status = cli.main([*command, "--initiator-name", INI, "--pcap",
                       str(tmp_path / "no" / "x.pcap")])
    err = capsys.readouterr().err
    assert status == 2 and "cannot write" in err and "there is no directory" in err, err


@pytest.mark.parametrize("kind", ["fifo", "/dev/null", "pipe"])
def test_discover_luns_refuses_a_capture_that_is_not_a_file_before_connecting(
        tmp_path: Any, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    """With --luns each target's session goes to x.targetN.pcap: for a FIFO or a device
    those became regular files beside it, unasked. Refused before any login (port 1
    refuses: reaching it would be a connection error), saying why and what to do; without
    --luns the same path is taken."""
    pipe = os.pipe()  # /dev/fd/N: as /dev/stdout is when standard output is a pipe
    if kind == "fifo":
        path = str(tmp_path / "x.pcap")
        os.mkfifo(path)
    else:
        path = kind if kind != "pipe" else f"/dev/fd/{pipe[1]}"
    try:
        status = cli.main(["discover", "--luns", "iscsi://127.0.0.1:1", "--initiator-name",
                           INI, "--pcap", path])
    finally:
        os.close(pipe[0])
        os.close(pipe[1])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert f"--pcap {path} is a " in err and ".target1." in err and "regular file" in err
    assert os.listdir(tmp_path) == (["x.pcap"] if kind == "fifo" else [])
    if kind == "/dev/null":
        status = cli.main(["discover", "iscsi://127.0.0.1:1", "--initiator-name", INI,
                           "--login-timeout", "2", "--pcap", path])
        err = capsys.readouterr().err
        assert status == 1 and "is a " not in err, err


@pytest.fixture
def hbactl_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """What hbactl's ``logging.basicConfig`` sets up in a process of its own, installed on
    the root logger for the test (pytest's handlers make basicConfig do nothing)."""
    root = logging.getLogger()
    before = root.level
    installed: list[logging.Handler] = []

    def basic_config(*, level: int, handlers: list[logging.Handler]) -> None:
        root.setLevel(level)
        for handler in handlers:
            root.addHandler(handler)
            installed.append(handler)

    monkeypatch.setattr(logging, "basicConfig", basic_config)
    yield
    for handler in installed:
        root.removeHandler(handler)
    root.setLevel(before)


def test_recovery_is_one_error_saying_what_was_tried(
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
        hbactl_logging: None) -> None:
    # Every connection drops at its first command: the session logs in again until the
    # replacement timeout. A person wants one error saying so, not the lines of each
    # reconnect (which were logged: the error says what they said).
    target = fake(hostile=Hostility(drop_after_commands=1))
    with target_in_a_thread(target) as port:
        status = cli.main(["readcap", f"iscsi://127.0.0.1:{port}/{TGT}/0",
                           "--initiator-name", INI, "--replacement-timeout", "2.5"])
    lines = capsys.readouterr().err.splitlines()
    assert status == 1
    assert len(lines) == 1 and re.fullmatch(
        rf"hbactl: session to {TGT} at 127\.0\.0\.1:{port} logged in again \d+ times? within "
        r"the replacement timeout of 2\.5 s, but each connection broke before a command "
        r"completed \(connection lost: .*; the last one: .*\)", lines[0]), lines
    assert any(r.name == cli.RECOVERY_LOGGER and r.levelno == logging.WARNING
               and r.getMessage().endswith("; recovering") for r in caplog.records)


def test_recovery_progress_is_shown_with_v(capsys: pytest.CaptureFixture[str]) -> None:
    recovery = logging.getLogger(cli.RECOVERY_LOGGER)

    def shown(verbose: int, logger: logging.Logger, level: int) -> bool:
        record = logger.makeRecord(logger.name, level, __file__, 1, "x: %s", ("y",), None)
        return bool(cli.log_handler(verbose).filter(record))

    for level in (logging.INFO, logging.WARNING):
        assert not shown(0, recovery, level) and shown(1, recovery, level)
    # Recovery's errors, and every other logger's warnings (a capture that stops...), stay.
    assert shown(0, recovery, logging.ERROR)
    assert shown(0, logging.getLogger("initiator.pcap"), logging.WARNING)
    assert shown(0, logging.getLogger("initiator.transport"), logging.WARNING)


def test_the_daemon_logs_recovery_at_the_default_verbosity(
        capsys: pytest.CaptureFixture[str], daemon_logging: Callable[..., None]) -> None:
    daemon_logging(0, environ={})
    logging.getLogger(cli.RECOVERY_LOGGER).warning(
        "%s: connection failed (%s); recovering", f"{TGT} at h:3260", "reset")
    assert f"WARNING {TGT} at h:3260: connection failed (reset); recovering" in \
        capsys.readouterr().err


class _ClosedPipe(io.RawIOBase):
    """Standard output whose reader has gone (``hbactl read -o - | head -c 10``)."""

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_read_and_write_name_standard_output_and_input(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    url = "iscsi://127.0.0.1:{}/" + TGT + "/0"
    with target_in_a_thread(fake()) as port:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hello\n")))
        assert cli.main(["write", "--initiator-name", INI, url.format(port), "--lba", "0",
                         "-i", "-"]) == 2
        err = capsys.readouterr().err
        assert "standard input holds 6 bytes, not a whole number of 512-byte blocks" in err
        monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BufferedWriter(_ClosedPipe())))
        assert cli.main(["read", "--initiator-name", INI, url.format(port), "--lba", "0",
                         "--blocks", "4", "-o", "-"]) == 1
        err = capsys.readouterr().err
        assert "cannot write standard output: Broken pipe" in err, err
        assert err.count("\n") == 1


def _hbactl_with(argv: list[str], port: int, **streams: Any) -> tuple[int, str]:
    """hbactl in a process of its own (standard streams as a shell leaves them), against the
    fake target on ``port``; its exit status and standard error."""
    import subprocess

    url = f"iscsi://127.0.0.1:{port}/{TGT}/0"
    done = subprocess.run([sys.executable, "-m", "hba.cli", *argv, "--initiator-name", INI, url],
                          stderr=subprocess.PIPE, text=True, timeout=60, check=False,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
                          **streams)
    return done.returncode, done.stderr


def _close(fd: int) -> Any:
    return lambda: os.close(fd)  # in the child: as `>&-` or `<&-` leaves it


@pytest.mark.parametrize(("argv", "streams", "words"), [
    (["inquiry"], "full", "cannot write standard output: No space left on device"),
    (["inquiry", "--json"], "full", "cannot write standard output: No space left on device"),
    (["inquiry", "--help"], "full", "cannot write standard output: No space left on device"),
    (["inquiry"], "no stdout", "cannot write standard output: it is closed"),
    (["readcap", "--json"], "no stdout", "cannot write standard output: it is closed"),
    (["read", "--lba", "0", "--blocks", "1", "-o", "-"], "no stdout",
     "cannot write standard output: it is closed"),
    (["write", "--lba", "0", "-i", "-"], "no stdin", "cannot read standard input: it is closed"),
])
def test_a_full_or_closed_standard_stream_is_one_line(
        argv: list[str], streams: str, words: str) -> None:
    """``hbactl inquiry URL > /dev/full`` and ``... >&-`` ended in a traceback (OSError from
    the printing, AttributeError on the ``None`` Python makes of a closed stream), and
    ``--help > /dev/full`` in silence with status 0."""
    with target_in_a_thread(fake()) as port:
        if streams == "full":
            with open("/dev/full", "w", encoding="utf-8") as full:
                status, err = _hbactl_with(argv, port, stdout=full)
        elif streams == "no stdout":
            status, err = _hbactl_with(argv, port, preexec_fn=_close(1))
        else:
            status, err = _hbactl_with(argv, port, preexec_fn=_close(0))
    assert words in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert status == (2 if argv[0] == "write" else 1)


@pytest.mark.parametrize("lba", [None, "4096"])
def test_an_error_with_standard_error_closed_stays_out_of_the_data(lba: str | None) -> None:
    """``hbactl read URL ... -o - 2>&- | xxd``: Python makes a closed standard error
    ``None``, and ``print(..., file=None)`` prints to standard output, so the error message
    went into the block data. Refused (port 1), or beyond the LUN's end: nothing on stdout."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    with target_in_a_thread(fake()) as port:
        url = f"iscsi://127.0.0.1:{1 if lba is None else port}/{TGT}/0"
        done = subprocess.run(
            [sys.executable, "-m", "hba.cli", "read", "--initiator-name", INI, url, "--lba",
             lba or "0", "--blocks", "1", "-o", "-"],
            stdout=subprocess.PIPE, timeout=60, check=False, cwd=root, preexec_fn=_close(2))
    assert done.returncode == (1 if lba is None else 2)
    assert done.stdout == b"", done.stdout


@pytest.mark.parametrize("json_output", [False, True])
def test_perf_on_ctrl_c_reports_the_run_so_far(capsys: pytest.CaptureFixture[str],
                                               json_output: bool) -> None:
    # As iscsi-perf does: Ctrl-C stops issuing, the commands in flight finish, and the totals
    # until then are printed; the exit status says it was interrupted.
    with target_in_a_thread(fake()) as port:
        timer = threading.Timer(1.0, signal.raise_signal, (signal.SIGINT,))
        timer.start()
        try:
            status = cli.main(["perf", f"iscsi://127.0.0.1:{port}/{TGT}/0", "--initiator-name",
                               INI, "--seconds", "60", "--queue-depth", "4"]
                              + (["--json"] if json_output else []))
        finally:
            timer.cancel()
    out, err = capsys.readouterr()
    assert status == 130, (out, err)
    if json_output:
        result = json.loads(out)
        assert result["interrupted"] is True and result["commands"] > 0
        assert 0.5 < result["seconds"] < 30 and result["errors"] == 0
    else:
        assert re.search(r"sequential read, 4096-byte blocks, queue depth 4: \d+ IOPS", out), out
        assert "interrupted: the totals are of the run until Ctrl-C" in out
        assert ", 0 errors)" in out and "Traceback" not in err


@pytest.mark.parametrize(("argv", "message"), [
    (["read", "--lba", "-1", "--blocks", "1", "-o", "/dev/null"],
     "--lba -1: a block number is 0 or more"),
    (["read", "--lba", "0", "--blocks", "0", "-o", "/dev/null"],
     "--blocks 0: give 1 or more blocks to move"),
    (["write", "--lba", "-5", "-i", "/dev/null"], "--lba -5: a block number is 0 or more"),
    (["write", "--lba", "0", "--blocks", "0", "-i", "/dev/null"],
     "--blocks 0: give 1 or more blocks to move"),
    (["write", "--lba", "0", "-i", "/dev/null"], "nothing to write: /dev/null is empty"),
])
def test_block_numbers_that_move_nothing_are_refused_before_a_login(
        capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    # Port 1 refuses: had the check waited for the LUN's capacity, the error would be the
    # connection's. Before, --blocks 0 read nothing and exited 0.
    status = cli.main([*argv, "--initiator-name", INI, f"iscsi://127.0.0.1:1/{TGT}/0"])
    err = capsys.readouterr().err
    assert status == 2 and message in err and "cannot connect" not in err, err


def test_perf_refuses_buffers_beyond_its_memory_bound(capsys: pytest.CaptureFixture[str]) -> None:
    # Port 1 refuses: the bound is checked before connecting, not after 2 GiB are allocated.
    status = cli.main(["perf", "--initiator-name", INI, f"iscsi://127.0.0.1:1/{TGT}/0",
                       "--block-size", "64m"])
    err = capsys.readouterr().err
    assert status == 2 and "--queue-depth 32 needs 2048 MiB of buffers" in err, err
    assert "lower one of them" in err


def test_perf_refuses_a_queue_depth_beyond_its_bound(capsys: pytest.CaptureFixture[str]) -> None:
    # 100000 ran 6.3 s for --seconds 1, setting up one stream per command before the run.
    status = cli.main(["perf", "--initiator-name", INI, f"iscsi://127.0.0.1:1/{TGT}/0",
                       "--queue-depth", "1025", "--block-size", "512"])
    err = capsys.readouterr().err
    assert status == 2 and "--queue-depth 1025 is more than 1024" in err, err
    assert cli.main(["perf", "--initiator-name", INI, f"iscsi://127.0.0.1:1/{TGT}/0",
                     "--queue-depth", "1024", "--block-size", "512", "--seconds", "0.1"]) == 1
    assert "cannot connect to iSCSI portal 127.0.0.1:1" in capsys.readouterr().err


@pytest.mark.parametrize("seconds", ["0", "-1", "nan", "inf"])
def test_perf_refuses_a_run_length_that_is_no_length(
        capsys: pytest.CaptureFixture[str], seconds: str) -> None:
    status = cli.main(["perf", "--initiator-name", INI, f"iscsi://127.0.0.1:1/{TGT}/0",
                       "--seconds", seconds])
    err = capsys.readouterr().err
    assert status == 2 and f"--seconds {float(seconds):g}: expected a number" in err, err


def test_read_refuses_to_print_blocks_on_a_terminal(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # `hbactl read URL --lba 0 --blocks 8 -o -` typed at a terminal printed binary there.
    import pty

    leader, follower = pty.openpty()
    try:
        with open(follower, "w", encoding="utf-8", closefd=False) as terminal:
            monkeypatch.setattr(sys, "stdout", terminal)
            # Port 1 refuses: the check comes before the login.
            status = cli.main(["read", "--initiator-name", INI, f"iscsi://127.0.0.1:1/{TGT}/0",
                               "--lba", "0", "--blocks", "8", "-o", "-"])
    finally:
        os.close(leader)
        os.close(follower)
    assert status == 2
    assert capsys.readouterr().err == (
        "hbactl: standard output is a terminal, and blocks are binary: give -o FILE, or send "
        "them on (-o - | xxd, -o - > FILE)\n")


def test_write_reads_only_the_blocks_it_writes() -> None:
    """``hbactl write URL --lba 0 --blocks 4 -i /dev/zero`` read its input to the end before
    the login: for ever, its memory growing. Here a pipe that stays open plays /dev/zero."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    with target_in_a_thread(fake()) as port:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hba.cli", "write", "--initiator-name", INI,
             f"iscsi://127.0.0.1:{port}/{TGT}/0", "--lba", "0", "--blocks", "4", "-i", "-"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=root)
        assert proc.stdin is not None
        proc.stdin.write(b"\xaa" * 512 * 5)
        proc.stdin.flush()
        try:
            status = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("hbactl write waited for the end of its input")
        finally:
            proc.stdin.close()
        assert proc.stdout is not None and proc.stderr is not None
        out, err = proc.stdout.read(), proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
    assert status == 0, err
    assert b"wrote 4 blocks (2048 bytes) at LBA 0 from -" in err, (out, err)


def test_write_from_a_pipe_longer_than_the_lun_is_refused(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # Without --blocks a pipe is read up to the LUN's end (4096 blocks here) and a byte more;
    # the chunk that shows it is not written (tests/unit/test_oneshot_write.py: the chunks
    # before it are, and the error says which).
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\0" * 512 * 7)))
    with target_in_a_thread(fake()) as port:
        assert cli.main(["write", "--initiator-name", INI, f"iscsi://127.0.0.1:{port}/{TGT}/0",
                         "--lba", "4090", "-i", "-"]) == 2
    err = capsys.readouterr().err
    assert err == (f"hbactl: standard input holds more than the 6 blocks from block 4090 to the "
                   f"end of {TGT} LUN 0; give --blocks; nothing was written\n")


@pytest.mark.parametrize(("name", "words"), [
    ("", "it is a directory; give a file name, or - for standard input"),
    ("missing", "there is no such file; check the path"),
])
def test_write_from_a_path_that_is_no_file_says_what_to_do(
        capsys: pytest.CaptureFixture[str], tmp_path: Any, name: str, words: str) -> None:
    # It said "Is a directory" / "No such file or directory", and nothing of what to give.
    path = str(tmp_path / name) if name else str(tmp_path)
    assert cli.main(["write", f"iscsi://127.0.0.1:1/{TGT}/0", "--initiator-name", INI,
                     "--lba", "0", "-i", path]) == 2
    err = capsys.readouterr().err
    assert f"hbactl: cannot read {path}: {words}" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["read", "--lba", "0", "--blocks", "1", "-o"],
                                  ["perf", "--seconds", "0.1", "--histogram"],
                                  ["readcap", "--pcap"]])
def test_an_output_fifo_nobody_reads_is_refused_before_connecting(
        tmp_path: Any, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    # It blocked in open() for ever: after the login for read, after the whole run for perf.
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    status = cli.main([*argv, fifo, "--initiator-name", INI, f"iscsi://127.0.0.1:1/{TGT}/0"])
    err = capsys.readouterr().err
    assert status == 2 and f"cannot write {fifo}: nobody is reading the FIFO {fifo}" in err, err
    assert err.count("\n") == 1


@contextmanager
def fifo_reader(path: str) -> Iterator[list[bytes]]:
    """A reader of the FIFO ``path`` (open before the test writes, as a shell's would be) that
    collects what arrives until its writers are done after the block."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    got: list[bytes] = []
    done = threading.Event()

    def drain() -> None:
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                data = None
            if data:
                got.append(data)
            elif data is None or not done.is_set():
                done.wait(0.01)  # no writer yet, or nothing more yet
            else:
                return

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    try:
        yield got
    finally:
        oneshot.release_outputs()
        done.set()
        thread.join(10)
        os.close(fd)


def test_read_and_perf_write_into_a_fifo_that_is_read(tmp_path: Any) -> None:
    url = f"iscsi://127.0.0.1:{{}}/{TGT}/0"
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    with target_in_a_thread(fake()) as port:
        with fifo_reader(fifo) as got:
            assert cli.main(["read", "--initiator-name", INI, url.format(port), "--lba", "0",
                             "--blocks", "4", "-o", fifo]) == 0
        assert len(b"".join(got)) == 4 * 512
        with fifo_reader(fifo) as got:
            assert cli.main(["perf", "--initiator-name", INI, url.format(port), "--seconds",
                             "0.2", "--queue-depth", "2", "--histogram", fifo]) == 0
        assert b"</svg>" in b"".join(got)


def test_ctrl_c_ends_a_write_waiting_for_its_fifo_writer(
        tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    # Opening a FIFO to read waits for its writer, as cat does; one Ctrl-C must end that wait
    # (asyncio's handler only cancelled the main task, blocked in open()).
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    # To the process, as a terminal's Ctrl-C is: the kernel gives it to the main thread, whose
    # wait it interrupts (raise_signal from the timer's thread would not wake an idle loop).
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        status = cli.main(["write", "--initiator-name", INI, f"iscsi://127.0.0.1:1/{TGT}/0",
                           "--lba", "0", "-i", fifo])
    finally:
        timer.cancel()
        # Let the reading thread, still in open(), see a writer come and go.
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert status == 130 and "interrupted" in capsys.readouterr().err
