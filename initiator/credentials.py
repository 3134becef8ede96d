"""CHAP credentials from wherever a person gives them: one builder, one set of messages.

The four CHAP settings (RFC 7143 §12.1.3: the name and secret the initiator proves itself with,
and for mutual CHAP the name and secret the target proves itself with) come from one of three
places, each spelling them its own way:

=============  =====================  =======================================  =============
field          URL                    environment (ours first, then libiscsi's)  configuration
=============  =====================  =======================================  =============
user           ``<user>@``            ``ISCSI_HBA_CHAP_NAME``                  ``chapIName``
                                      ``LIBISCSI_CHAP_USERNAME``
secret         ``<user>%<secret>@``   ``ISCSI_HBA_CHAP_SECRET``                ``chapSecret``
                                      ``LIBISCSI_CHAP_PASSWORD``
target user    ``target_user=``       ``ISCSI_HBA_TARGET_CHAP_NAME``           ``tgtChapName``
                                      ``LIBISCSI_CHAP_TARGET_USERNAME``
target secret  ``target_password=``   ``ISCSI_HBA_TARGET_CHAP_SECRET``         ``tgtChapSecret``
                                      ``LIBISCSI_CHAP_TARGET_PASSWORD``
=============  =====================  =======================================  =============

:class:`ChapFields` holds the four as given (any may be missing); :meth:`ChapFields.or_environment`
fills in the missing ones from the environment; :meth:`ChapFields.build` checks that they make
sense together and returns the :class:`~initiator.chap.ChapCredentials` a login uses, or None
when no CHAP is asked for. A :class:`ChapSource` says where they came from, so that every
message names the place and how to fix it there. :func:`initiator.url.parse_url` (a URL and the
environment), :func:`initiator.urlconfig.session_config` (the one-shot commands, the TCMU
handler) and the daemon (URLs, configuration entries, the environment) all build credentials
here. The configuration file's own parser reports a bad entry with its file and line first
(:mod:`hba.config`).

No message shows a secret.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from initiator.chap import ChapAccount, ChapCredentials, Secret
from initiator.errors import ConfigurationError
from initiator.text import is_utf8

__all__ = [
    "ENVIRONMENT",
    "ENV_CHAP_NAME",
    "ENV_CHAP_SECRET",
    "ENV_TARGET_CHAP_NAME",
    "ENV_TARGET_CHAP_SECRET",
    "ChapFields",
    "ChapSource",
]

ENV_CHAP_NAME = ("ISCSI_HBA_CHAP_NAME", "LIBISCSI_CHAP_USERNAME")
ENV_CHAP_SECRET = ("ISCSI_HBA_CHAP_SECRET", "LIBISCSI_CHAP_PASSWORD")
ENV_TARGET_CHAP_NAME = ("ISCSI_HBA_TARGET_CHAP_NAME", "LIBISCSI_CHAP_TARGET_USERNAME")
ENV_TARGET_CHAP_SECRET = ("ISCSI_HBA_TARGET_CHAP_SECRET", "LIBISCSI_CHAP_TARGET_PASSWORD")


def _either(names: tuple[str, str]) -> str:
    return f"{names[0]} (or {names[1]})"


@dataclass(frozen=True, slots=True)
class ChapSource:
    """Where CHAP settings came from, in the words a message needs.

    ``where`` names the place (``URL 'iscsi://***@host/...'``, ``configuration entry "disk1"``,
    ``the environment``); ``give_user``/``give_secret``/``give_one_way`` say how to supply
    what is missing; ``target_user``/``target_secret`` are how the place spells the
    mutual-CHAP fields and ``give_target`` where they go; ``settings`` names the user name and
    secret to check when the target rejects them.
    """

    where: str
    give_user: str
    give_secret: str
    give_one_way: str
    target_user: str
    target_secret: str
    give_target: str
    settings: str

    @classmethod
    def url(cls, shown: str) -> ChapSource:
        """A URL (whose environment may fill in what it leaves out); ``shown`` is the URL as
        messages quote it, without secrets."""
        return cls(
            where=f"URL {shown}",
            give_user=f"write <user>%<secret>@ in the URL or set {_either(ENV_CHAP_NAME)}",
            give_secret=f"write <user>%<secret>@ in the URL or set {_either(ENV_CHAP_SECRET)}",
            give_one_way="give <user>%<secret>@",
            target_user="target_user", target_secret="target_password",
            give_target=f"URL option, or {ENV_TARGET_CHAP_NAME[0]} / "
                        f"{ENV_TARGET_CHAP_SECRET[0]}",
            settings=f"the user name and secret of the URL's <user>%<secret>@, or of "
                     f"{ENV_CHAP_NAME[0]} / {ENV_CHAP_SECRET[0]} where it gives none")

    @classmethod
    def entry(cls, nickname: str) -> ChapSource:
        """Entry ``nickname`` of the configuration file (chapIName, chapSecret, ...)."""
        return cls(where=f'configuration entry "{nickname}"', give_user="add chapIName",
                   give_secret="add chapSecret", give_one_way="add chapIName and chapSecret",
                   target_user="tgtChapName", target_secret="tgtChapSecret",
                   give_target="add it to the entry",
                   settings=f'chapIName / chapSecret of configuration entry "{nickname}"')


ENVIRONMENT = ChapSource(
    where="the environment",
    give_user=f"set {_either(ENV_CHAP_NAME)}",
    give_secret=f"set {_either(ENV_CHAP_SECRET)}",
    give_one_way=f"set {ENV_CHAP_NAME[0]} and {ENV_CHAP_SECRET[0]}",
    target_user=ENV_TARGET_CHAP_NAME[0], target_secret=ENV_TARGET_CHAP_SECRET[0],
    give_target=f"set both, or {ENV_TARGET_CHAP_NAME[1]} / {ENV_TARGET_CHAP_SECRET[1]}",
    settings=f"{ENV_CHAP_NAME[0]} / {ENV_CHAP_SECRET[0]} (or {ENV_CHAP_NAME[1]} / "
             f"{ENV_CHAP_SECRET[1]}) in the environment")
"""CHAP settings that came from the environment alone."""


def _env(environ: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    for name in names:
        value = environ.get(name)
        if value:
            if not is_utf8(value):
                # Not shown: it may be a secret.
                raise ConfigurationError(
                    f"environment variable {name} is not UTF-8 text; set it in UTF-8")
            if "\n" in value or "\r" in value:
                # A secret file's last newline (ISCSI_HBA_CHAP_SECRET="$(< f)" drops it,
                # an EnvironmentFile or a here-string may not): a line break no target's
                # secret holds, and the configuration file cannot hold either. Taken as
                # it is, the login failed with "rejected our CHAP response", naming no cause.
                raise ConfigurationError(
                    f"environment variable {name} holds a line break (a file's trailing "
                    "newline?); set it without one")
            return value
    return None


@dataclass(frozen=True, slots=True, repr=False)
class ChapFields:
    """The four CHAP settings as a person gave them; None where not given."""

    user: str | None = None
    secret: str | None = None
    target_user: str | None = None
    target_secret: str | None = None

    def __repr__(self) -> str:
        def shown(secret: str | None) -> str:
            return "None" if secret is None else "'***'"

        return (f"ChapFields(user={self.user!r}, secret={shown(self.secret)}, "
                f"target_user={self.target_user!r}, target_secret={shown(self.target_secret)})")

    def or_environment(self, environ: Mapping[str, str] | None = None) -> ChapFields:
        """These fields, the missing ones taken from ``environ`` (default ``os.environ``):
        ours first, then libiscsi's, so a libiscsi user's environment keeps working."""
        env = os.environ if environ is None else environ
        return ChapFields(
            self.user if self.user is not None else _env(env, ENV_CHAP_NAME),
            self.secret if self.secret is not None else _env(env, ENV_CHAP_SECRET),
            self.target_user if self.target_user is not None
            else _env(env, ENV_TARGET_CHAP_NAME),
            self.target_secret if self.target_secret is not None
            else _env(env, ENV_TARGET_CHAP_SECRET))

    def check(self, source: ChapSource) -> None:
        """Raise :class:`ConfigurationError` when the fields do not make sense together."""
        where = source.where
        if self.user is not None and self.secret is None:
            raise ConfigurationError(
                f"{where} gives a CHAP user name but no secret; {source.give_secret}")
        if self.secret is not None and self.user is None:
            raise ConfigurationError(
                f"{where} gives a CHAP secret but no CHAP user name; {source.give_user}")
        if (self.target_user is None) != (self.target_secret is None):
            missing = source.target_secret if self.target_secret is None \
                else source.target_user
            raise ConfigurationError(
                f"mutual CHAP for {where} needs both {source.target_user} and "
                f"{source.target_secret}; {missing} is missing ({source.give_target})")
        if self.target_user is not None and self.user is None:
            raise ConfigurationError(
                f"mutual CHAP for {where} also needs one-way CHAP: {source.give_one_way} (the "
                "target authenticates itself only after the initiator has)")
        if self.target_secret is not None and self.target_secret == self.secret:
            raise ConfigurationError(
                f"the target CHAP secret for {where} equals the initiator's CHAP secret; "
                "RFC 7143 §9.2.1 forbids using one secret in both directions")

    def build(self, source: ChapSource) -> ChapCredentials | None:
        """The credentials for a login, or None when no CHAP is asked for; a
        :class:`ConfigurationError` naming ``source`` when the fields cannot be used."""
        self.check(source)
        if self.user is None or self.secret is None:
            return None
        try:
            target = None
            if self.target_user is not None and self.target_secret is not None:
                target = ChapAccount(self.target_user, Secret(self.target_secret))
            return ChapCredentials(ChapAccount(self.user, Secret(self.secret)), target,
                                   settings=source.settings)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{source.where}: {exc}") from None
