"""The daemon's iSCSI sessions: one per target and identity, shared by the LUNs behind it.

Theory of operation
-------------------
LUNs of one target reached at one portal, as one initiator with the same CHAP secrets and
digests, share one :class:`~initiator.transport.Session` (as open-iscsi shares a session among
the LUNs of a node): :meth:`SessionPool.acquire` logs in for the first LUN, and a second LUN
that asks while that login is under way waits for it rather than logging in twice; each LUN
holds one reference, and :meth:`SessionPool.release` logs out with the last one. A taken-over
LUN (a restart) must not wait for its target: its session logs in in the background while the
kernel's commands queue.

Every state change of a session is logged and reported as a ``session`` event (DBus signal
``SessionStateChanged``). With ``--pcap DIR`` each session records its PDUs into a file of its
own there.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hba.specs import LunSpec, default_name
from initiator.printable import printable
from initiator.transport import Session, SessionState

log = logging.getLogger("iscsi-hba")

__all__ = ["SessionPool"]


def _key(spec: LunSpec) -> tuple[Any, ...]:
    """What LUNs must have in common to share a session (the secrets only as a digest)."""
    creds = spec.session.credentials
    secret = b""
    if creds is not None:
        secret = creds.initiator.secret.reveal() + b"\0" + (
            creds.target.secret.reveal() if creds.target else b"")
    return (spec.portal.host, spec.portal.port, spec.target,
            creds.initiator.name if creds else None,
            hashlib.sha256(secret).hexdigest(), spec.session.header_digest,
            spec.session.data_digest)


@dataclass(slots=True)
class _Shared:
    session: Session
    users: int = 0
    logged_in: asyncio.Future[None] | None = None


class SessionPool:
    """The shared sessions (see the module docstring). ``on_event(kind, data)`` gets the
    ``session`` and ``logout`` events."""

    def __init__(self, on_event: Callable[[str, dict[str, Any]], None], *,
                 pcap_dir: str | None = None) -> None:
        self._on_event = on_event
        self._pcap_dir = pcap_dir
        self._pcap_serial = 0
        self._shared: dict[tuple[Any, ...], _Shared] = {}

    async def acquire(self, spec: LunSpec, *, background: bool = False) -> Session:
        """A session to ``spec``'s target, logged in (unless ``background``: then logging in)."""
        key = _key(spec)
        shared = self._shared.get(key)
        if shared is None:
            session = Session(spec.portal, spec.target, spec.session,
                              pcap_path=self._pcap_path(spec))
            shared = _Shared(session)
            self._shared[key] = shared
            session.on_state = lambda state, s=session: self._session_state(s, state)
            if background:
                session.start_background_login()
            else:
                fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                shared.logged_in = fut
                try:
                    await session.login()
                except BaseException as exc:
                    del self._shared[key]
                    if not fut.done():
                        fut.set_exception(exc)
                        fut.exception()  # retrieved: nobody else may be waiting
                    raise
                fut.set_result(None)
        elif shared.logged_in is not None and not shared.logged_in.done():
            await asyncio.shield(shared.logged_in)
        shared.users += 1
        return shared.session

    async def release(self, session: Session) -> None:
        """One LUN less on ``session``; log out after the last."""
        for key, shared in list(self._shared.items()):
            if shared.session is session:
                shared.users -= 1
                if shared.users <= 0:
                    del self._shared[key]
                    await session.logout(timeout=10)
                    self._on_event("logout", {"target": session.target_name,
                                              "portal": str(session.portal)})
                return

    async def close(self) -> None:
        """Log every session out (the daemon stops; its disks stay in the kernel)."""
        for shared in list(self._shared.values()):
            await shared.session.logout(timeout=5)
        self._shared.clear()

    def describe(self) -> list[dict[str, Any]]:
        """The sessions as ``hbactl status`` shows them."""
        return [
            {"target": s.session.target_name, "portal": str(s.session.portal),
             "state": s.session.state.value, "luns": s.users,
             "reconnects": s.session.reconnects, **s.session.stats()}
            for s in self._shared.values()
        ]

    def _pcap_path(self, spec: LunSpec) -> str | None:
        """Where ``--pcap DIR`` records a new session to ``spec``'s target: one file per
        session and start (a reconnect adds ``.2.pcap``, ...), named so that ``ls`` sorts it."""
        if self._pcap_dir is None:
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self._pcap_serial += 1
        tail = default_name(spec.target, spec.lun).rsplit("-", 1)[0]
        name = f"{stamp}-{self._pcap_serial}-{tail}-{spec.portal.port}.pcap"
        return os.path.join(self._pcap_dir, name)

    def _session_state(self, session: Session, state: SessionState) -> None:
        failure = session.failure if state is SessionState.FAILED else None
        if failure is not None:
            # Its disks' I/O fails now: say why, where the operator looks (names and
            # addresses from the target escaped).
            log.warning("session %s: failed: %s", printable(session.label), printable(failure))
        else:
            log.info("session %s: %s", session.label, state.value)
        self._on_event("session", {"target": session.target_name,
                                   "portal": str(session.portal), "state": state.value})
