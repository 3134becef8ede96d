"""hba.sessions.SessionPool: what the daemon says when one of its sessions fails.

A session that cannot be re-established within its replacement timeout fails the I/O of every
disk behind it; the daemon's log must say so as a warning with the reason, not only that the
state changed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

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
    pool = SessionPool(lambda kind, data: events.append((kind, data)))
    async with FakeTargetServer(target) as server:
        config = SessionConfig(initiator_name=INI, replacement_timeout=0.3, login_timeout=0.5,
                               noop_interval=0.0, reconnect_forever=True)
        session = await asyncio.wait_for(pool.acquire(LunSpec(
            "disk1-0", server.portal, TGT, 0, config)), 5)
        server.accepting = False
        server.drop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while session.failure is None:
            assert loop.time() < deadline, "the session did not fail"
            await asyncio.sleep(0.01)
        await asyncio.wait_for(session.close(), 5)
    (record,) = [r for r in caplog.records if "failed" in r.getMessage()
                 and r.name == "iscsi-hba"]
    assert record.levelno == logging.WARNING
    text = record.getMessage()
    assert TGT in text and "replacement timeout of 0.3 s" in text
    assert "connection lost" in text
    assert ("session", {"target": TGT, "portal": str(server.portal), "state": "failed"}) \
        in events
