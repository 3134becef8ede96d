"""The daemon's iSCSI sessions: one per portal, target and identity, shared by the LUNs behind it.

Theory of operation
-------------------
Paths of LUNs of one target reached at one portal, as one initiator with the same CHAP
secrets, digests and recovery settings, share one :class:`~initiator.transport.Session` (as
open-iscsi shares a session among the LUNs of a node); paths through different portals never
do (each is its own I_T nexus, which multipath and persistent reservations need).
:meth:`SessionPool.acquire` logs in for the first path, and a second one that asks while that
login is under way waits for it rather than logging in twice; each path holds one reference,
and :meth:`SessionPool.release` logs out with the last one. A taken-over path (a restart), or
one whose portal did not answer at attach, must not wait for its target: its session logs in
in the background while the kernel's commands queue.

ISIDs are derived, not random (:func:`derived_isid`): the "random" format of RFC 7143
§11.12.5 (T = 10b) with its 24 bits taken from a hash of the initiator name, the target name
and the portal. So a session gets the same I_T nexus after a daemon restart (a takeover logs
in again as the session it replaces, which the target then reinstates, RFC 7143 §6.3.5 — no
stale session is left behind — and the persistent reservations registered through that nexus
stay valid), and two portals never share one (§4.4.3). Two sessions of the pool that would
get the same ISID (two identities at one portal) differ in the qualifier (the low 16 bits).

Every state change of a session is reported as a ``session`` event (logged by the daemon,
:mod:`hba.journal`, and the DBus signal ``SessionStateChanged``). With ``--pcap DIR`` each
session records its PDUs into a file of its own there.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from hba.specs import PathSpec, default_name
from initiator.login import Portal
from initiator.transport import Session, SessionState

log = logging.getLogger("iscsi-hba")

__all__ = ["SessionPool", "derived_isid"]

_ISID_RANDOM = 0x80 << 40   # T = 10b, "random" (RFC 7143 §11.12.5); A's other bits 0


def derived_isid(initiator: str, target: str, portal: Portal, qualifier: int = 0) -> int:
    """The ISID of our session to ``target`` at ``portal``: the same for the same three, so
    the I_T nexus outlives a restart (module docstring); ``qualifier`` tells apart two
    sessions that would share it."""
    digest = hashlib.sha256(
        f"{initiator}\0{target}\0{portal.host.lower()}\0{portal.port}".encode()).digest()
    return _ISID_RANDOM | int.from_bytes(digest[:3], "big") << 16 | (qualifier & 0xFFFF)


def _key(spec: PathSpec) -> tuple[Any, ...]:
    """What paths must have in common to share a session (the secrets only as a digest)."""
    config = spec.disk.session
    creds = config.credentials
    secret = b""
    if creds is not None:
        secret = creds.initiator.secret.reveal() + b"\0" + (
            creds.target.secret.reveal() if creds.target else b"")
    return (spec.portal.host.lower(), spec.portal.port, spec.disk.target,
            config.initiator_name, creds.initiator.name if creds else None,
            hashlib.sha256(secret).hexdigest(), config.header_digest, config.data_digest,
            config.replacement_timeout, config.max_reconnect_interval)


@dataclass(slots=True)
class _Shared:
    session: Session
    users: int = 0
    logged_in: asyncio.Future[None] | None = None


class SessionPool:
    """The shared sessions (see the module docstring). ``on_event(kind, data)`` gets the
    ``session`` and ``logout`` events, ``on_state(session, state)`` every state change."""

    def __init__(self, on_event: Callable[[str, dict[str, Any]], None], *,
                 pcap_dir: str | None = None,
                 on_state: Callable[[Session, SessionState], None] | None = None) -> None:
        self._on_event = on_event
        self._on_state = on_state
        self._pcap_dir = pcap_dir
        self._pcap_serial = 0
        self._shared: dict[tuple[Any, ...], _Shared] = {}

    async def acquire(self, spec: PathSpec, *, background: bool = False) -> Session:
        """A session for path ``spec``, logged in (unless ``background``: then logging in)."""
        key = _key(spec)
        shared = self._shared.get(key)
        if shared is None:
            config = replace(spec.disk.session, isid=self._isid(spec))
            session = Session(spec.portal, spec.disk.target, config,
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
             "tpgt": s.session.target_portal_group_tag, "isid": isid_text(s.session),
             "state": s.session.state.value, "luns": s.users,
             "reconnects": s.session.reconnects, **s.session.stats()}
            for s in self._shared.values()
        ]

    def _isid(self, spec: PathSpec) -> int:
        """The derived ISID of a new session for ``spec``, qualified past those in use."""
        used = {s.session.config.isid for s in self._shared.values()
                if s.session.target_name == spec.disk.target}
        qualifier = 0
        while (isid := derived_isid(spec.disk.session.initiator_name, spec.disk.target,
                                    spec.portal, qualifier)) in used:
            qualifier += 1
        return isid

    def _pcap_path(self, spec: PathSpec) -> str | None:
        """Where ``--pcap DIR`` records a new session to ``spec``'s target: one file per
        session and start (a reconnect adds ``.2.pcap``, ...), named so that ``ls`` sorts it."""
        if self._pcap_dir is None:
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self._pcap_serial += 1
        tail = default_name(spec.disk.target, spec.disk.lun).rsplit("-", 1)[0]
        name = f"{stamp}-{self._pcap_serial}-{tail}-{spec.portal.port}.pcap"
        return os.path.join(self._pcap_dir, name)

    def _session_state(self, session: Session, state: SessionState) -> None:
        # Logged (with journal fields) by the daemon's hba.journal.SessionEvents.
        self._on_event("session", {"target": session.target_name,
                                   "portal": str(session.portal), "state": state.value,
                                   "cause": session.counters.last_error})
        if self._on_state is not None:
            self._on_state(session, state)


def isid_text(session: Session) -> str:
    """The session's ISID as the 12 hex digits targets show (LIO: ``,i,0x80...``)."""
    return f"{session.config.isid:012x}"
