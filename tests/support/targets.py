"""What a test needs to reach an iSCSI LUN: portal, IQN, LUN, CHAP credentials, an URL.

Both the tgtd helper (host and VM) and the LIO helpers (VM) return a :class:`TargetInfo`, so a
test written against one target kind runs against the other, and any initiator (open-iscsi's
``iscsiadm``, libiscsi's tools, the project's ``hbactl``) can be pointed at it.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from dataclasses import dataclass
from urllib.parse import urlencode

from hba.tgtd import free_tcp_port

__all__ = ["Chap", "TargetInfo", "free_tcp_port", "unique_iqn"]

# Characters that need no escaping in a libiscsi URL's user%password part or query.
_URL_SAFE = re.compile(r"^[A-Za-z0-9._~-]+$")


@dataclass(frozen=True)
class Chap:
    """CHAP credentials (RFC 7143 §12.1.3).

    ``userid``/``password``: the initiator proves itself to the target (one-way CHAP).
    ``mutual_userid``/``mutual_password``: the target proves itself back (mutual CHAP); open-iscsi
    calls them ``username_in``/``password_in``, libiscsi ``target_user``/``target_password``.
    """

    userid: str
    password: str
    mutual_userid: str | None = None
    mutual_password: str | None = None

    def __post_init__(self) -> None:
        if (self.mutual_userid is None) != (self.mutual_password is None):
            raise ValueError("mutual CHAP needs both mutual_userid and mutual_password")

    @property
    def mutual(self) -> bool:
        return self.mutual_userid is not None

    @classmethod
    def one_way(cls, userid: str = "hba-initiator") -> Chap:
        """One-way CHAP with a fresh 16-character secret (open-iscsi accepts 12 to 16)."""
        return cls(userid, _secret())

    @classmethod
    def two_way(cls, userid: str = "hba-initiator", mutual_userid: str = "hba-target") -> Chap:
        """Mutual CHAP with two different fresh secrets (LIO rejects equal ones)."""
        return cls(userid, _secret(), mutual_userid, _secret())


def _secret() -> str:
    return secrets.token_hex(8)


@dataclass(frozen=True)
class TargetInfo:
    """One LUN of an iSCSI target as an initiator sees it."""

    host: str
    port: int
    iqn: str
    lun: int
    size: int  # bytes
    chap: Chap | None = None

    @property
    def portal(self) -> str:
        """``host:port`` as iscsiadm's ``-p`` takes it (IPv6 in brackets)."""
        return f"{_url_host(self.host)}:{self.port}"

    def url(self, lun: int | None = None, *, credentials: bool = True) -> str:
        """The libiscsi-style URL of the LUN (``lun`` defaults to this one).

        ``iscsi://[user%password@]host:port/<iqn>/<lun>[?target_user=..&target_password=..]``;
        credentials must be URL-safe (the generated ones are).
        """
        userinfo = ""
        query = ""
        if credentials and self.chap is not None:
            chap = self.chap
            for value in (chap.userid, chap.password, chap.mutual_userid, chap.mutual_password):
                if value is not None and not _URL_SAFE.match(value):
                    raise ValueError(f"CHAP value {value!r} is not URL-safe")
            userinfo = f"{chap.userid}%{chap.password}@"
            if chap.mutual_userid is not None and chap.mutual_password is not None:
                query = "?" + urlencode(
                    {"target_user": chap.mutual_userid, "target_password": chap.mutual_password}
                )
        number = self.lun if lun is None else lun
        return f"iscsi://{userinfo}{self.portal}/{self.iqn}/{number}{query}"


def _url_host(host: str) -> str:
    try:
        if isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
            return f"[{host}]"
    except ValueError:
        pass
    return host


def unique_iqn(label: str, authority: str = "2003-01.org.example") -> str:
    """A fresh target IQN; the dotted naming authority keeps rtslib and tgtd happy."""
    return f"iqn.{authority}:{label}-{secrets.token_hex(4)}"
