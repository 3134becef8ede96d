"""SendTargets discovery (RFC 7143 §4.3, §13.3, Appendix C).

A discovery session logs in with ``SessionType=Discovery``, sends one Text Request with
``SendTargets=All`` and reads the answer: a ``TargetName`` key per target, each followed by the
``TargetAddress`` keys of the portals it is reachable through (``host:port,tpgt``, IPv6 hosts in
brackets). A target listed without any address is reachable through the portal we asked.

A TargetAddress that cannot be used (not ``host[:port][,tpgt]``, a port out of range) is
skipped with the reason, and the rest of the answer is kept, as open-iscsi's iscsiadm does
(it logs the address it cannot resolve and goes on with the other targets): one target's bad
address says nothing about the others. A target all of whose addresses are unusable is left
with no portal (:attr:`DiscoveredTarget.portals` empty), its reasons in
:attr:`DiscoveredTarget.unusable`; the caller says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from initiator.errors import ConfigurationError, RemoteProtocolError
from initiator.login import Portal
from initiator.printable import quoted
from initiator.text import Pair, TextFormatError, decode, encode
from initiator.transport import Session, SessionConfig


@dataclass(frozen=True, slots=True)
class DiscoveredTarget:
    """One target of a SendTargets answer and the portals it listed for it."""

    name: str
    portals: tuple[Portal, ...]
    unusable: tuple[tuple[str, str], ...] = ()
    """The TargetAddresses listed for it that cannot be used, each with why (one sentence
    naming the portal asked, the target and the address), in the order listed."""


def parse_send_targets(pairs: list[Pair], asked: Portal) -> list[DiscoveredTarget]:
    """Group a SendTargets answer into targets with their portals (Appendix C). A name listed
    twice is one target: its portals are merged (each once), in the order first listed. An
    unusable address is skipped and noted in its target's ``unusable``."""
    targets: dict[str, list[Portal]] = {}
    unusable: dict[str, list[tuple[str, str]]] = {}
    name: str | None = None
    portals: list[Portal] = []
    bad: list[tuple[str, str]] = []

    def flush() -> None:
        if name is not None:
            known = targets.setdefault(name, [])
            skipped = unusable.setdefault(name, [])
            # No address at all: the portal asked; only unusable ones: none.
            for portal in portals or ([] if bad else [asked]):
                if portal not in known:
                    known.append(portal)
            skipped.extend(b for b in bad if b not in skipped)

    for key, value in pairs:
        if key == "TargetName":
            flush()
            name, portals, bad = value, [], []
        elif key == "TargetAddress":
            if name is None:
                raise RemoteProtocolError(
                    f"portal {asked} answered SendTargets with a TargetAddress before any "
                    "TargetName")
            try:
                portals.append(Portal.parse(value))
            except ConfigurationError as exc:
                bad.append((value, f"portal {asked} listed an unusable TargetAddress for "
                                   f"{quoted(name)}, skipped: {exc}"))
        # Other keys (e.g. TargetAlias from some targets) carry nothing we need.
    flush()
    return [DiscoveredTarget(n, tuple(p), tuple(unusable[n])) for n, p in targets.items()]


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
