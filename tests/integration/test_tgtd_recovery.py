"""Session recovery (ErrorRecoveryLevel 0) when tgtd dies in the middle of a write.

tgtd is killed with SIGKILL from the completion callback of the 16th of 128 writes, so it
always dies with commands outstanding. Restarted on the same port with the same targets and
backing files within the replacement timeout, the session is reinstated (same ISID, TSIH 0)
and every command completes with the right data. Not restarted, every command still waiting
fails with SessionFailed once the replacement timeout has passed, with a sentence saying so.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from initiator import scsi
from initiator.client import ScsiClient
from initiator.command import CommandResult
from initiator.errors import SessionFailed
from initiator.transport import SessionState
from tests.integration.helpers import (
    HBACTL,
    LOGIN_REQUEST,
    Job,
    assert_all_good,
    logged_in,
    run_window,
    wire_pdus,
)
from tests.support.tgtd import Tgtd

pytestmark = pytest.mark.slow

BLOCK = 512
WRITE = 128 << 10
COUNT = 128          # 16 MiB
KILL_AFTER = 16      # completions before tgtd is killed


def write_jobs(data: memoryview) -> list[Job]:
    per = WRITE // BLOCK
    return [Job(scsi.write(i * per, per), data_out=data[i * WRITE : (i + 1) * WRITE])
            for i in range(COUNT)]


def isid_tsih(pcap: Path, port: int) -> tuple[int, int]:
    """ISID and TSIH of the first Login Request of a capture (RFC 7143 §11.12)."""
    login = wire_pdus(pcap, port).of(LOGIN_REQUEST)[0]
    return int.from_bytes(login.header[8:14], "big"), int.from_bytes(login.header[14:16], "big")


async def test_killed_mid_write_and_restarted_within_replacement_timeout(
        private_tgtd: Tgtd, tmp_path: Path) -> None:
    tgtd = private_tgtd
    target = tgtd.add_target(64 << 20)
    data = memoryview(os.urandom(COUNT * WRITE))
    pcap = tmp_path / "session.pcap"
    loop = asyncio.get_running_loop()
    killed = asyncio.Event()
    at_kill: dict[str, float] = {}

    async with logged_in(target, pcap=pcap, replacement_timeout=60.0) as session:
        states: list[SessionState] = []
        session.on_state = states.append
        await ScsiClient(session, target.lun).test_unit_ready()

        def on_complete(n: int) -> None:
            if n == KILL_AFTER:
                tgtd.kill()
                at_kill.update(in_flight=session.in_flight, time=loop.time())
                killed.set()

        writing = asyncio.ensure_future(run_window(session, target.lun, write_jobs(data),
                                                   depth=32, timeout=90, on_complete=on_complete))
        await asyncio.wait_for(killed.wait(), 60)
        assert at_kill["in_flight"] > 0
        await loop.run_in_executor(None, tgtd.restart)
        run = await writing
        assert_all_good(run)
        assert session.reconnects == 1
        assert states[:2] == [SessionState.RECOVERING, SessionState.LOGGED_IN]
        assert session.state is SessionState.LOGGED_IN
        assert loop.time() - at_kill["time"] < 60

        # Every byte landed: read back through the initiator ...
        back = bytearray(len(data))
        view = memoryview(back)
        per = WRITE // BLOCK
        reads = [Job(scsi.read(i * per, per), data_in=view[i * WRITE : (i + 1) * WRITE])
                 for i in range(COUNT)]
        assert_all_good(await run_window(session, target.lun, reads, depth=32))
        assert back == data
    # ... and straight from the backing file tgtd reopened.
    assert target.backing_file is not None
    assert target.backing_file.read_bytes()[: len(data)] == data

    # Reinstatement (RFC 7143 §6.3.5): the new connection logged in with the same ISID and
    # TSIH 0. Each connection has its own capture file.
    second = tmp_path / "session.2.pcap"
    assert second.exists()
    first_isid, first_tsih = isid_tsih(pcap, target.port)
    assert first_tsih == 0
    assert isid_tsih(second, target.port) == (first_isid, 0)
    assert first_isid == session.config.isid


async def test_not_restarted_within_replacement_timeout(private_tgtd: Tgtd) -> None:
    tgtd = private_tgtd
    target = tgtd.add_target(64 << 20)
    data = memoryview(os.urandom(COUNT * WRITE))
    loop = asyncio.get_running_loop()
    killed_at: list[float] = []
    replacement_timeout = 3.0

    async with logged_in(target, replacement_timeout=replacement_timeout) as session:
        await ScsiClient(session, target.lun).test_unit_ready()

        def on_complete(n: int) -> None:
            if n == KILL_AFTER:
                tgtd.kill()
                killed_at.append(loop.time())

        run = await run_window(session, target.lun, write_jobs(data), depth=32, timeout=60,
                               on_complete=on_complete)
        elapsed = loop.time() - killed_at[0]
        assert replacement_timeout <= elapsed < replacement_timeout + 15
        good = [r for r in run.results if isinstance(r, CommandResult) and r.ok]
        failed = [r for r in run.results if isinstance(r, SessionFailed)]
        assert len(good) >= KILL_AFTER
        assert len(good) + len(failed) == COUNT and failed
        message = str(failed[0])
        assert "\n" not in message
        assert target.iqn in message and "replacement timeout of 3 s" in message
        assert session.state is SessionState.FAILED
        # What comes next fails at once, with the same sentence.
        with pytest.raises(SessionFailed, match="replacement timeout"):
            await asyncio.wait_for(session.execute(target.lun, scsi.test_unit_ready()), 5)


def test_hbactl_perf_rides_through_a_tgtd_restart(private_tgtd: Tgtd) -> None:
    """``hbactl perf --write`` keeps its 32 commands going across a tgtd crash and restart:
    it runs for the whole duration, reports no error and exits 0 (the UNIT ATTENTION tgtd
    reports after its restart is retried, not counted). With ``-v`` it logs the recovery
    (without, it says nothing of a recovery that worked)."""
    tgtd = private_tgtd
    target = tgtd.add_target(64 << 20)
    seconds = 4.0
    with subprocess.Popen(
        [str(HBACTL), "-v", "perf", target.url(), "--write", "--block-size", "64k", "--seconds",
         str(seconds), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    ) as proc:
        try:
            # Wait for its session to appear in tgtd (an external process: poll, bounded).
            deadline = time.monotonic() + 30
            while "I_T nexus:" not in tgtd.tgtadm("--op", "show", "--mode", "target"):
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "hbactl perf never logged in"
                time.sleep(0.05)
            tgtd.kill()
            tgtd.restart()
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    assert result["errors"] == 0 and result["first_error"] is None
    assert result["commands"] > 0
    assert result["seconds"] >= seconds
    assert b"initiator.recovery: " in err and b"; recovering" in err
    assert b"session reinstated" in err and b"Traceback" not in err
