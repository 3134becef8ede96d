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

Credentials are built by :mod:`initiator.credentials`, as the one-shot commands build theirs;
a problem is an :class:`~hba.errors.AttachError` naming the URL or entry.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from hba import cfgstring
from hba.config import AuthMethod, Config, TargetEntry
from hba.errors import AttachError
from initiator.chap import ChapCredentials
from initiator.credentials import ENVIRONMENT, ChapFields, ChapSource
from initiator.errors import ConfigurationError
from initiator.login import Portal
from initiator.transport import SessionConfig
from initiator.url import IscsiUrl, parse_url

__all__ = ["BACKSTORE_PREFIX", "LunSpec", "SpecDefaults", "SpecResolver", "default_name"]

BACKSTORE_PREFIX = "hba-"
"""Our backstores are named ``hba-<name>``; a cfgstring's LUN takes the rest as its name."""


@dataclass(frozen=True, slots=True)
class LunSpec:
    """Everything needed to reach one LUN: where, who we are, how to behave."""

    name: str
    portal: Portal
    target: str
    lun: int
    session: SessionConfig
    queue_depth: int = 32
    nickname: str | None = None   # set when the LUN comes from the configuration file

    def cfgstring(self) -> str:
        """The backstore's cfgstring: the nickname, or portal, target and LUN (no secret)."""
        if self.nickname is not None:
            return cfgstring.TargetRef(nickname=self.nickname).encode()
        return cfgstring.TargetRef(portal=self.portal, target=self.target,
                                   lun=self.lun).encode()


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
                url = parse_url(what)
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
                 environment: bool = False) -> LunSpec:
        """The LunSpec of a URL; credentials from the URL, else from a configuration entry for
        its target, else (``environment``) from :attr:`environ`."""
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
        session = SessionConfig(
            initiator_name=d.initiator_name, credentials=creds,
            header_digest=url.header_digest.offer if url.header_digest else "None",
            data_digest=url.data_digest.offer if url.data_digest else "None",
            login_timeout=d.login_timeout, replacement_timeout=d.replacement_timeout,
            reconnect_forever=True)
        return LunSpec(name=name or default_name(url.target_iqn, url.lun),
                       portal=Portal(url.host, url.port), target=url.target_iqn, lun=url.lun,
                       session=session, queue_depth=d.queue_depth)

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
        return LunSpec(name=entry.nickname, portal=Portal(entry.host, entry.port),
                       target=entry.target_name, lun=entry.lun, session=session,
                       queue_depth=entry.queue_depth, nickname=entry.nickname)

    def from_cfgstring(self, text: str, backstore: str) -> LunSpec:
        """The LunSpec a TCMU cfgstring (``iscsi/`` prefix optional) stands for, with the
        credentials the daemon would use; ``backstore`` is the backstore's name."""
        ref = cfgstring.decode(text)
        if ref.nickname is not None:
            entry = self.config.get(ref.nickname) if self.config is not None else None
            if entry is None:
                raise AttachError(
                    f"backstore {backstore} names configuration entry {ref.nickname!r}, which "
                    f"{self.config_path or 'the configuration'} does not have")
            return self.from_entry(entry)
        assert ref.portal is not None and ref.target is not None
        url = IscsiUrl(host=ref.portal.host, port=ref.portal.port, target_iqn=ref.target,
                       lun=ref.lun)
        return self.from_url(url, name=backstore.removeprefix(BACKSTORE_PREFIX),
                             environment=True)

    def _entry_for(self, target: str, host: str, port: int) -> TargetEntry | None:
        """The configuration entry for ``target``: at this portal if there is one."""
        if self.config is None:
            return None
        for entry in self.config.entries.values():
            if entry.target_name == target and (entry.host, entry.port) == (host, port):
                return entry
        for entry in self.config.entries.values():
            if entry.target_name == target:
                return entry
        return None


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
