"""SendTargets discovery (RFC 7143 §4.3, §13.3, Appendix C).

A discovery session logs in with ``SessionType=Discovery``, sends one Text Request with
``SendTargets=All`` and reads the answer: a ``TargetName`` key per target, each followed by the
``TargetAddress`` keys of the portals it is reachable through (``host:port,tpgt``, IPv6 hosts in
brackets). A target listed without any address is reachable through the portal we asked.
"""

from __future__ import annotations

from dataclasses import dataclass

from initiator.errors import ConfigurationError, RemoteProtocolError
from initiator.login import Portal
from initiator.text import Pair, TextFormatError, decode, encode
from initiator.transport import Session, SessionConfig


@dataclass(frozen=True, slots=True)
class DiscoveredTarget:
    """One target of a SendTargets answer and the portals it listed for it."""

    name: str
    portals: tuple[Portal, ...]


def parse_send_targets(pairs: list[Pair], asked: Portal) -> list[DiscoveredTarget]:
    """Group a SendTargets answer into targets with their portals (Appendix C). A name listed
    twice is one target: its portals are merged (each once), in the order first listed."""
    targets: dict[str, list[Portal]] = {}
    name: str | None = None
    portals: list[Portal] = []

    def flush() -> None:
        if name is not None:
            known = targets.setdefault(name, [])
            for portal in portals or [asked]:
                if portal not in known:
                    known.append(portal)

    for key, value in pairs:
        if key == "TargetName":
            flush()
            name, portals = value, []
        elif key == "TargetAddress":
            if name is None:
                raise RemoteProtocolError(
                    f"portal {asked} answered SendTargets with a TargetAddress before any "
                    "TargetName")
            try:
                portals.append(Portal.parse(value))
            except ConfigurationError as exc:
                raise RemoteProtocolError(
                    f"portal {asked} listed an unusable TargetAddress for {name}: {exc}"
                ) from None
        # Other keys (e.g. TargetAlias from some targets) carry nothing we need.
    flush()
    return [DiscoveredTarget(n, tuple(p)) for n, p in targets.items()]


async def discover(
    portal: Portal,
    config: SessionConfig | None = None,
    *,
    pcap_path: str | None = None,
    what: str = "All",
) -> list[DiscoveredTarget]:
    """Log in to ``portal`` for discovery and return what ``SendTargets=<what>`` lists."""
    session = Session(portal, None, config, pcap_path=pcap_path, discovery=True)
    await session.login()
    try:
        answer = await session.text(encode([("SendTargets", what)]))
    finally:
        await session.logout()
    try:
        pairs = decode(answer, repeatable=("TargetName", "TargetAddress", "TargetAlias"))
    except TextFormatError as exc:
        raise TextFormatError(
            f"portal {portal} answered SendTargets with malformed text: {exc}") from None
    return parse_send_targets(pairs, portal)
