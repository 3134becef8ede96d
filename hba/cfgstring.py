"""The TCMU configuration string of our backstores: which target and LUN, never a secret.

The kernel shows ``dev_config`` to everyone (``/sys/class/uio/uioN/name``), and rtslib-fb
(hence targetcli) refuses ``:`` in it, while IQNs and ``host:port`` contain colons. So the
string is either

- the nickname of an entry of ``/etc/iscsi-hba.conf`` (``disk1``): the entry says where the
  target is and holds its credentials; with ``@<host>%3A<port>`` after it (``db@192.0.2.11%3A3260``)
  the path of a multipath entry through that portal; or
- ``<host>%3A<port>/<target-iqn>/<lun>``: the path part of an ``iscsi://`` URL, percent-encoded
  so that ``:`` (and ``,`` and ``%``) become ``%3A``, ``%2C``, ``%25``. Credentials for such a
  device come from a configuration entry with the same target and portal, or the environment.

``targetcli /backstores/user:iscsi create name=d1 size=1G cfgstring=disk1`` is therefore the
way to hand a LUN to the daemon from targetcli.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

from hba.errors import HBAError
from initiator.errors import ConfigurationError
from initiator.login import Portal
from initiator.url import MAX_LUN, decimal, validate_iscsi_name

MAX_LENGTH = 255   # TCMU_CONFIG_LEN - 1 minus nothing: the kernel keeps 256 bytes with the NUL
_NICKNAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SAFE = "/[]@.-_~"


class CfgStringError(HBAError):
    """A cfgstring that names no target."""


@dataclass(frozen=True, slots=True)
class TargetRef:
    """What a cfgstring points at: a configuration entry, or a portal + target + LUN."""

    nickname: str | None = None
    portal: Portal | None = None
    target: str | None = None
    lun: int = 0

    def encode(self) -> str:
        if self.nickname is not None:
            if self.portal is None:
                return self.nickname
            return f"{self.nickname}@{quote(str(self.portal), safe=_SAFE.replace('@', ''))}"
        assert self.portal is not None and self.target is not None
        text = quote(f"{self.portal}/{self.target}/{self.lun}", safe=_SAFE)
        if len(text) > MAX_LENGTH:
            raise CfgStringError(
                f"the cfgstring for {self.target} is {len(text)} characters, more than the "
                f"kernel's {MAX_LENGTH}: give this LUN a short nickname in the configuration")
        return text

    def __str__(self) -> str:
        if self.nickname is not None:
            return self.nickname if self.portal is None else f"{self.nickname} at {self.portal}"
        return f"{self.target} LUN {self.lun} at {self.portal}"


def decode(cfgstring: str) -> TargetRef:
    """Parse a cfgstring (without the ``iscsi/`` subtype prefix)."""
    text = cfgstring.strip()
    if text.startswith("iscsi/"):
        text = text[len("iscsi/"):]
    if _NICKNAME.match(text):
        return TargetRef(nickname=text)
    nickname, at, portal_text = text.partition("@")
    if at and _NICKNAME.match(nickname):
        try:
            return TargetRef(nickname=nickname, portal=Portal.parse(unquote(portal_text)))
        except ConfigurationError as exc:
            raise CfgStringError(f"cfgstring {cfgstring!r}: {exc}") from None
    parts = unquote(text).split("/")
    if len(parts) != 3:
        raise CfgStringError(
            f"cfgstring {cfgstring!r} is neither a configuration nickname (optionally "
            "@<host>%3A<port>) nor <host>%3A<port>/<target-iqn>/<lun>")
    portal_text, target, lun_text = parts
    try:
        portal = Portal.parse(portal_text)
        validate_iscsi_name(target)
    except ConfigurationError as exc:
        raise CfgStringError(f"cfgstring {cfgstring!r}: {exc}") from None
    lun = decimal(lun_text)
    if lun is None or not 0 <= lun <= MAX_LUN:
        raise CfgStringError(f"cfgstring {cfgstring!r}: LUN {lun_text!r} is not a number "
                             f"from 0 to {MAX_LUN}")
    return TargetRef(portal=portal, target=target, lun=lun)
