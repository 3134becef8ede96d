"""From a parsed iSCSI URL to what a session needs: the target URL check and the
:class:`~initiator.transport.SessionConfig` (CHAP credentials, digests).

Shared by the one-shot ``hbactl`` commands and the TCMU handler (``tcmu_handler.serve``), which
must not depend on ``hba``. Secrets the URL leaves out come from the environment
(:func:`initiator.url.parse_url`).
"""

from __future__ import annotations

from typing import Any

from initiator.chap import ChapAccount, ChapCredentials, Secret
from initiator.errors import ConfigurationError
from initiator.transport import SessionConfig, default_initiator_name
from initiator.url import IscsiUrl, parse_url

__all__ = ["session_config", "target_url"]


def session_config(url: IscsiUrl, *, initiator_name: str | None = None,
                   login_timeout: float = 15.0, **extra: Any) -> SessionConfig:
    """The SessionConfig a URL asks for (CHAP from the URL or the environment, digests).

    ``extra`` overrides further :class:`SessionConfig` fields (``noop_interval``,
    ``reconnect_forever``, ...).
    """
    credentials: ChapCredentials | None = None
    if url.chap_user is not None:
        if url.chap_secret is None:
            raise ConfigurationError(
                f"URL {url} names CHAP user {url.chap_user!r} but no secret: put it in the URL "
                "as user%secret or in ISCSI_HBA_CHAP_SECRET")
        target: ChapAccount | None = None
        if url.target_user is not None:
            if url.target_secret is None:
                raise ConfigurationError(
                    f"URL {url} asks for mutual CHAP as {url.target_user!r} but gives no "
                    "target_password (or ISCSI_HBA_TARGET_CHAP_SECRET)")
            target = ChapAccount(url.target_user, Secret(url.target_secret))
        credentials = ChapCredentials(ChapAccount(url.chap_user, Secret(url.chap_secret)),
                                      target)
    return SessionConfig(
        initiator_name=initiator_name or default_initiator_name(),
        credentials=credentials,
        header_digest=url.header_digest.offer if url.header_digest else "None",
        data_digest=url.data_digest.offer if url.data_digest else "None",
        login_timeout=login_timeout,
        **extra,
    )


def target_url(text: str) -> IscsiUrl:
    """Parse a URL that must name a target and LUN."""
    url = parse_url(text)
    if url.is_discovery or url.target_iqn is None or url.lun is None:
        raise ConfigurationError(
            f"URL {url} names no target and LUN; expected "
            "iscsi://[user[%secret]@]host[:port]/<target-iqn>/<lun>")
    return url
