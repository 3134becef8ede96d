"""From a parsed iSCSI URL to what a session needs: the target URL check and the
:class:`~initiator.transport.SessionConfig` (CHAP credentials, digests).

Shared by the one-shot ``hbactl`` commands and the TCMU handler (``tcmu_handler.serve``), which
must not depend on ``hba``. Secrets the URL leaves out come from the environment
(:func:`initiator.url.parse_url`); the credentials are built and checked by
:mod:`initiator.credentials`, as the daemon's are.
"""

from __future__ import annotations

from typing import Any

from initiator.credentials import ChapSource
from initiator.errors import ConfigurationError
from initiator.transport import SessionConfig, default_initiator_name
from initiator.url import URL_SYNTAX, IscsiUrl, parse_url, validate_iscsi_name

__all__ = ["session_config", "target_url"]


def session_config(url: IscsiUrl, *, initiator_name: str | None = None,
                   login_timeout: float = 15.0, **extra: Any) -> SessionConfig:
    """The SessionConfig a URL asks for (CHAP from the URL or the environment, digests).

    ``extra`` overrides further :class:`SessionConfig` fields (``noop_interval``,
    ``reconnect_forever``, ...).
    """
    if initiator_name is not None:
        # Given on the command line: a typo must not reach the target as our name.
        validate_iscsi_name(initiator_name, what="initiator name (--initiator-name)")
    credentials = url.chap.build(ChapSource.url(repr(url.redacted())))
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
            f"URL {str(url)!r} names no target and LUN; expected {URL_SYNTAX} (`hbactl discover "
            f"{url}` lists the targets of that portal)")
    return url
