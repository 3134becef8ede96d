"""What to attach: a :class:`LunSpec` from a URL, a configuration entry or a TCMU cfgstring.

A person names a LUN three ways, and each becomes the same :class:`LunSpec` (where the target
is, which LUN, the session settings with their CHAP credentials):

- an ``iscsi://`` URL (``hbactl attach URL``): digests and CHAP from the URL (or the
  environment it was parsed in); without CHAP there, the credentials of a configuration entry
  for the same target (same portal first), since a URL on a command line is no place for a
  secret;
- the nickname of a configuration entry (``hbactl attach disk1``, ``Enable = on``): every
  setting from the entry;
- the cfgstring of a backstore (a restart takes over, targetcli created one): a nickname as
  above, or portal + target + LUN, whose credentials come from a configuration entry for that
  target, else from the daemon's environment. The kernel keeps no secret.

A LUN is reached through one portal or several (a multipath URL or entry, plus the portals
SendTargets lists when asked): each is a *path* (:class:`PathSpec`), with its own session,
TCMU backstore and ``/dev/sdX``, which dm-multipath assembles into one disk. A LUN with
several paths follows the multipath policy (:attr:`LunSpec.multipath`): a down path fails its
I/O after a few seconds (ReplacementTimeout 5 s unless set) with the sense dm-multipath takes
for a path error (:class:`tcmu_handler.scsi.PathPolicy`), reconnects with the sessions'
backoff (capped at ``SessionConfig.max_reconnect_interval``, 5 s), and its backstores are
named ``hba-<name>.<n>`` and carry the portal in their cfgstring, so that a restart knows
which path each one is.

Credentials are built by :mod:`initiator.credentials`, as the one-shot commands build theirs;
a problem is an :class:`~hba.errors.AttachError` naming the URL or entry.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass

from hba import cfgstring
from hba.config import MULTIPATH_REPLACEMENT_TIMEOUT, AuthMethod, Config, TargetEntry
from hba.errors import AttachError
from initiator.chap import ChapCredentials
from initiator.credentials import ENVIRONMENT, ChapFields, ChapSource
from initiator.errors import ConfigurationError
from initiator.login import Portal
from initiator.transport import SessionConfig
from initiator.url import IscsiUrl, parse_url
from tcmu_handler.scsi import PathPolicy

__all__ = ["BACKSTORE_PREFIX", "LunSpec", "PathSpec", "SpecDefaults",
           "SpecResolver", "default_name", "same_portal"]

BACKSTORE_PREFIX = "hba-"
"""Our backstores are named ``hba-<name>`` (``hba-<name>.<n>`` for the paths of a multipath
LUN); a cfgstring's LUN takes the rest as its name."""


def same_portal(a: Portal, b: Portal) -> bool:
    """One portal, whatever portal group tag either was learnt with."""
    return (a.host.lower(), a.port) == (b.host.lower(), b.port)


@dataclass(frozen=True, slots=True)
class LunSpec:
    """Everything needed to reach one LUN: where (every portal), who we are, how to behave."""

    name: str
    portals: tuple[Portal, ...]
    target: str
    lun: int
    session: SessionConfig
    queue_depth: int = 32
    nickname: str | None = None   # set when the LUN comes from the configuration file
    multipath: bool = False       # several paths: the multipath policy (module docstring)
    discover: bool = False        # also every portal SendTargets lists for the target

    def __post_init__(self) -> None:
        if not self.portals:
            raise ValueError(f"LUN {self.name} has no portal")

    @property
    def portal(self) -> Portal:
        """The first portal (the one a single-path LUN has)."""
        return self.portals[0]

    @property
    def policy(self) -> PathPolicy:
        """How the rings of this LUN report what cannot be delivered."""
        return PathPolicy.MULTIPATH if self.multipath else PathPolicy.SINGLE

    def path(self, portal: Portal, index: int) -> PathSpec:
        """Path number ``index`` (1-based) of this LUN, through ``portal``."""
        return PathSpec(self, portal, index)

    def paths(self) -> list[PathSpec]:
        """A path per portal, numbered in order."""
        return [self.path(portal, n) for n, portal in enumerate(self.portals, 1)]

    def with_portals(self, found: tuple[Portal, ...]) -> LunSpec:
        """This LUN with the portals of ``found`` it does not have yet added (SendTargets
        discovery), in the order found; the portal group tags learnt replace none given."""
        portals = list(self.portals)
        for portal in found:
            for n, known in enumerate(portals):
                if same_portal(known, portal):
                    if known.tpgt is None:
                        portals[n] = portal
                    break
            else:
                portals.append(portal)
        return dataclasses.replace(self, portals=tuple(portals))


@dataclass(frozen=True, slots=True)
class PathSpec:
    """One path of a LUN: its portal and number, the name and cfgstring of its backstore."""

    disk: LunSpec
    portal: Portal
    index: int

    @property
    def backstore(self) -> str:
        """``hba-<name>``, or ``hba-<name>.<n>`` for a path of a multipath LUN."""
        name = BACKSTORE_PREFIX + self.disk.name
        return f"{name}.{self.index}" if self.disk.multipath else name

    def cfgstring(self) -> str:
        """The backstore's cfgstring, no secret: the nickname (with the portal for a path of a
        multipath entry), or portal, target and LUN."""
        d = self.disk
        if d.nickname is not None:
            return cfgstring.TargetRef(nickname=d.nickname,
                                       portal=self.portal if d.multipath else None).encode()
        return cfgstring.TargetRef(portal=self.portal, target=d.target, lun=d.lun).encode()

    def __str__(self) -> str:
        tag = f",{self.portal.tpgt}" if self.portal.tpgt is not None else ""
        return f"{self.disk.name} path {self.index} ({self.portal}{tag})"


def default_name(target: str, lun: int) -> str:
    """The name of a LUN attached by URL: the target name's last part and the LUN."""
    tail = re.sub(r"[^A-Za-z0-9_.-]", "-", target.rsplit(":", 1)[-1])[:40].strip("-.") or "lun"
    return f"{tail}-{lun}"


@dataclass(frozen=True, slots=True)
class SpecDefaults:
    """What a URL or cfgstring does not say (``hbactl daemon`` options)."""

    initiator_name: str
    login_timeout: float = 15.0
    replacement_timeout: float = 120.0
    multipath_replacement_timeout: float = float(MULTIPATH_REPLACEMENT_TIMEOUT)
    queue_depth: int = 32


class SpecResolver:
    """Turns a URL, nickname or cfgstring into a :class:`LunSpec` (see the module docstring).

    ``config`` is the configuration as last read (None: no file); the daemon replaces it when
    it reads the file again. ``environ`` (default ``os.environ``) is where credentials for a
    cfgstring without a configuration entry come from.
    """

    def __init__(self, defaults: SpecDefaults, config_path: str | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        self.defaults = defaults
        self.config_path = config_path
        self.config: Config | None = None
        self.environ = environ

    def resolve(self, what: str) -> LunSpec:
        """A LunSpec for a configuration nickname or an ``iscsi://`` URL."""
        if what.lower().startswith("iscsi://"):
            try:
                url = parse_url(what, several_portals=True)
            except ConfigurationError as exc:
                raise AttachError(str(exc)) from None
            return self.from_url(url)
        entry = self.config.get(what) if self.config is not None else None
        if entry is None:
            where = self.config_path or "the configuration"
            raise AttachError(
                f"{what!r} is neither an iscsi:// URL nor the nickname of an entry in {where}")
        return self.from_entry(entry)

    def from_url(self, url: IscsiUrl, name: str | None = None, *,
                 environment: bool = False, multipath: bool | None = None) -> LunSpec:
        """The LunSpec of a URL; credentials from the URL, else from a configuration entry for
        its target, else (``environment``) from :attr:`environ`. ``multipath`` (default: the
        URL names several portals or asks for discovery) chooses the policy."""
        if url.target_iqn is None or url.lun is None:
            raise AttachError(f"URL {url} names no target and LUN")
        creds = _build(url.chap, ChapSource.url(repr(url.redacted())))
        if creds is None:
            entry = self._entry_for(url.target_iqn, url.host, url.port)
            if entry is not None:
                creds = _entry_credentials(entry)
        if creds is None and environment:
            creds = _build(ChapFields().or_environment(self.environ), ENVIRONMENT)
        d = self.defaults
        if multipath is None:
            multipath = len(url.portals) > 1 or url.discover_portals
        session = SessionConfig(
            initiator_name=d.initiator_name, credentials=creds,
            header_digest=url.header_digest.offer if url.header_digest else "None",
            data_digest=url.data_digest.offer if url.data_digest else "None",
            login_timeout=d.login_timeout,
            replacement_timeout=d.multipath_replacement_timeout if multipath
            else d.replacement_timeout,
            reconnect_forever=True)
        return LunSpec(name=name or default_name(url.target_iqn, url.lun),
                       portals=tuple(Portal(h, p) for h, p in url.portals),
                       target=url.target_iqn, lun=url.lun, session=session,
                       queue_depth=d.queue_depth, multipath=multipath,
                       discover=url.discover_portals)

    def from_entry(self, entry: TargetEntry) -> LunSpec:
        """The LunSpec of a configuration entry: every setting from the entry."""
        if entry.target_name is None:
            raise AttachError(f"{entry.nickname} is a discovery entry; it names no LUN")
        overrides: dict[str, str] = {}
        for key, value in (("MaxRecvDataSegmentLength", entry.max_recv_data_segment_length),
                           ("MaxBurstLength", entry.max_burst_length),
                           ("FirstBurstLength", entry.first_burst_length),
                           ("ImmediateData", entry.immediate_data),
                           ("InitialR2T", entry.initial_r2t)):
            if value is not None:
                overrides[key] = ("Yes" if value else "No") if isinstance(value, bool) \
                    else str(value)
        session = SessionConfig(
            initiator_name=entry.initiator_name or self.defaults.initiator_name,
            initiator_alias=entry.initiator_alias,
            credentials=_entry_credentials(entry),
            header_digest=entry.header_digest.offer, data_digest=entry.data_digest.offer,
            negotiation=overrides, login_timeout=float(entry.login_timeout),
            replacement_timeout=float(entry.replacement_timeout),
            noop_interval=float(entry.noop_interval), noop_timeout=float(entry.noop_timeout),
            command_timeout=float(entry.command_timeout), tmf_timeout=float(entry.tmf_timeout),
            logout_timeout=float(entry.logout_timeout), reconnect_forever=True)
        return LunSpec(name=entry.nickname,
                       portals=tuple(Portal(h, p) for h, p in entry.addresses),
                       target=entry.target_name, lun=entry.lun,
                       session=session,
                       queue_depth=entry.queue_depth, nickname=entry.nickname,
                       multipath=entry.multipath, discover=entry.discover_portals)

    def from_cfgstring(self, text: str, backstore: str) -> PathSpec:
        """The path a TCMU cfgstring (``iscsi/`` prefix optional) stands for, with the
        credentials the daemon would use; ``backstore`` is the backstore's name, whose
        ``.<n>`` suffix (ours, for the paths of a multipath LUN) numbers the path."""
        ref = cfgstring.decode(text)
        if ref.nickname is not None:
            entry = self.config.get(ref.nickname) if self.config is not None else None
            if entry is None:
                raise AttachError(
                    f"backstore {backstore} names configuration entry {ref.nickname!r}, which "
                    f"{self.config_path or 'the configuration'} does not have")
            spec = self.from_entry(entry)
            portal = ref.portal or spec.portal
            index: int | None = None
            if spec.multipath:
                _name, index = _path_number(backstore, BACKSTORE_PREFIX + spec.name)
            if index is None:
                index = next((n for n, known in enumerate(spec.portals, 1)
                              if same_portal(known, portal)), len(spec.portals) + 1)
            return spec.path(portal, index)
        assert ref.portal is not None and ref.target is not None
        url = IscsiUrl(host=ref.portal.host, port=ref.portal.port, target_iqn=ref.target,
                       lun=ref.lun)
        name, index = _path_number(backstore.removeprefix(BACKSTORE_PREFIX))
        spec = self.from_url(url, name=name, environment=True, multipath=index is not None)
        return spec.path(spec.portal, index or 1)

    def _entry_for(self, target: str, host: str, port: int) -> TargetEntry | None:
        """The configuration entry for ``target``: at this portal if there is one."""
        if self.config is None:
            return None
        for entry in self.config.entries.values():
            if entry.target_name == target and (host, port) in entry.addresses:
                return entry
        for entry in self.config.entries.values():
            if entry.target_name == target:
                return entry
        return None



_PATH_SUFFIX = re.compile(r"^(?P<name>.+)\.(?P<index>[1-9][0-9]{0,3})$")


def _path_number(name: str, base: str | None = None) -> tuple[str, int | None]:
    """``(name, n)`` of ``<name>.<n>`` (a path of a multipath LUN), else ``(name, None)``;
    with ``base``, only ``<base>.<n>`` counts."""
    match = _PATH_SUFFIX.match(name)
    if match is None or (base is not None and match["name"] != base):
        return name, None
    return match["name"], int(match["index"])


def _build(fields: ChapFields, source: ChapSource) -> ChapCredentials | None:
    try:
        return fields.build(source)
    except ConfigurationError as exc:
        raise AttachError(str(exc)) from None


def _entry_credentials(entry: TargetEntry) -> ChapCredentials | None:
    if entry.auth_method is not AuthMethod.CHAP:
        return None
    return _build(ChapFields(entry.chap_name, entry.chap_secret, entry.tgt_chap_name,
                             entry.tgt_chap_secret), ChapSource.entry(entry.nickname))
