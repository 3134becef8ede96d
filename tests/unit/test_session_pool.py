"""hba.sessions.SessionPool: what the daemon says when one of its sessions fails.

A session that cannot be re-established within its replacement timeout fails the I/O of every
disk behind it; the daemon's log (the pool's events through hba.journal.SessionEvents, as the
daemon wires them) must say so at error level with the reason, not only that the state changed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from hba.journal import SessionEvents
from hba.sessions import SessionPool
from hba.specs import LunSpec
from initiator.keys import NegotiationSettings
from initiator.transport import SessionConfig
from tests.support.fake_target import FakeTarget, FakeTargetServer, RamDisk, TargetNode

INI = "iqn.2024-01.org.example:initiator"
TGT = "iqn.2003-01.org.example:disk1"


async def test_a_failed_session_is_logged_as_a_warning_with_its_reason(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "iscsi-hba")
    target = FakeTarget([TargetNode(TGT, {0: RamDisk(64)})],
                        settings=NegotiationSettings.rfc_defaults(default_time2wait=0))
    events: list[tuple[str, dict[str, Any]]] = []
    journal = SessionEvents(logging.getLogger("iscsi-hba"))

    def on_event(kind: str, data: dict[str, Any]) -> None:
        events.append((kind, data))
        journal.state_changed(data["target"], data["portal"], data["state"],
                              cause=data["cause"] or "")

    pool = SessionPool(on_event)
    async with FakeTargetServer(target) as server:
        config = SessionConfig(initiator_name=INI, replacement_timeout=0.3, login_timeout=0.5,
                               noop_interval=0.0, reconnect_forever=True)
        spec = LunSpec("disk1-0", (server.portal,), TGT, 0, config)
        session = await asyncio.wait_for(pool.acquire(spec.path(server.portal, 1)), 5)
        server.accepting = False
        server.drop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while session.failure is None:
            assert loop.time() < deadline, "the session did not fail"
            await asyncio.sleep(0.01)
        await asyncio.wait_for(session.close(), 5)
    (record,) = [r for r in caplog.records if "replacement timeout" in r.getMessage()
                 and r.name == "iscsi-hba"]
    assert record.levelno == logging.ERROR
    text = record.getMessage()
    assert TGT in text and "its commands fail" in text
    (failed,) = [data for kind, data in events if data["state"] == "failed"]
    assert failed["target"] == TGT and failed["portal"] == str(server.portal)
    assert failed["cause"] and failed["cause"] in text, "the reason is not in the log"
