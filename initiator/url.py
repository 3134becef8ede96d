"""libiscsi-style iSCSI URLs, and the iSCSI name and portal checks the configuration shares.

Forms (libiscsi's ``ISCSI_URL_SYNTAX`` / ``ISCSI_PORTAL_URL_SYNTAX``)::

    iscsi://[<user>[%<secret>]@]<host>[:<port>]/<target-name>/<lun>[?<options>]
    iscsi://[<user>[%<secret>]@]<host>[:<port>][/][?<options>]        (discovery)
    iscsi://[<user>[%<secret>]@]<host>[:<port>],<host>[:<port>],.../<target-name>/<lun>

The last form (ours; libiscsi has none) names one LUN reachable through several portals, one
multipath path each (``hbactl attach``): only callers that ask for it (``several_portals``)
accept it, since a one-shot command talks to one portal.

* ``<host>`` is a DNS name, an IPv4 address, or an IPv6 address in brackets
  (``iscsi://[fe80::1]:3261/...``). The port defaults to 3260, IANA's ``iscsi-target``.
  A link-local address takes its zone as RFC 6874 writes it, ``[fe80::1%25eth0]`` (a bare
  ``[fe80::1%eth0]`` too); a zone that names no interface of this host is refused.
* The first ``%`` separates ``<user>`` and ``<secret>`` (libiscsi's rule), so the user name is
  taken literally and cannot contain ``%`` or ``@``. The secret is percent-decoded: a literal
  ``%``, ``@`` or ``?`` inside it must be written ``%25``, ``%40``, ``%3F`` (a ``/`` may stay as
  it is: the user information ends at the last ``@`` before the query). Query values are
  percent-decoded too.
  libiscsi also accepts ``user:secret``; here ``:`` belongs to the user name, because CHAP
  names are often IQNs (``iqn.2004-01.org.example:host``). libiscsi does not decode the
  secret; we do, so a secret containing ``%XX`` sequences must escape its ``%``.
* ``<target-name>`` is an iSCSI name (RFC 7143 §4.2.7): ``iqn.yyyy-mm.reversed.domain[:id]``,
  ``eui.`` + 16 hex digits, or ``naa.`` + 16 or 32 hex digits.
* ``<lun>`` is the LUN as Linux, LIO and libiscsi number it (what ``lsscsi`` shows as the last
  field of H:C:T:L): 0..65535, the whole first level of a SAM LUN. 0..255 travel as
  peripheral device addressing; a target that uses flat addressing for LUN ``k`` reports it
  as ``16384 + k`` (see :func:`initiator.scsi.encode_lun`). libiscsi sends the same 16 bits.
* Several portals are separated by ``,``; each has its own port (default 3260), so
  ``iscsi://192.0.2.10,192.0.2.11:3261/...`` is 192.0.2.10:3260 and 192.0.2.11:3261, and
  ``iscsi://[fd00::1],[fd00::2]/...`` two IPv6 portals. A portal named twice is an error.
* Options: ``header_digest`` and ``data_digest`` = ``none`` | ``crc32c`` (libiscsi's two
  values, lib/init.c) or the ordered offers ``crc32c-none`` | ``none-crc32c`` (libiscsi's
  enum has them but its URL parser does not accept them); ``target_user`` and
  ``target_password`` for mutual CHAP; ``discover_portals`` = ``on`` | ``off`` (with
  ``several_portals`` only: also use every portal the target lists in SendTargets as a
  path). Unknown options are errors (libiscsi ignores them).

Secrets from the environment, when the URL does not carry them: URL first, then ours, then
libiscsi's, so a libiscsi user's environment keeps working (the names are in
:mod:`initiator.credentials`, which checks the four CHAP settings for every source). Secrets on
a command line are visible in ``ps``; the environment or the configuration file is the place for
them.

No secret ever appears in ``str()``, ``repr()`` or an error message: they render as ``***``.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from initiator.credentials import ChapFields, ChapSource
from initiator.errors import ConfigurationError
from initiator.printable import quoted
from initiator.text import is_utf8

__all__ = [
    "DEFAULT_PORT",
    "MAX_LUN",
    "DigestPreference",
    "IscsiUrl",
    "check_seconds",
    "check_zone",
    "decimal",
    "format_portal",
    "ipv6_literal",
    "parse_portal",
    "parse_url",
    "validate_iscsi_name",
]

DEFAULT_PORT = 3260
"""The IANA-registered iSCSI target port ("iscsi-target"), the default of every initiator."""

MAX_LUN = 0xFFFF
"""Largest LUN a URL accepts: the first 16-bit level of a SAM LUN, as libiscsi sends it."""

MAX_NAME_BYTES = 223
"""RFC 7143 §4.2.7.1: an iSCSI name is at most 223 bytes (UTF-8)."""

URL_SYNTAX = "iscsi://[<user>[%<secret>]@]<host>[:<port>]/<target-name>/<lun>"
PATHS_SYNTAX = "iscsi://[<user>[%<secret>]@]<host>[:<port>][,<host>[:<port>]...]/<target-name>/<lun>"
PORTAL_URL_SYNTAX = "iscsi://[<user>[%<secret>]@]<host>[:<port>]"
NAME_SYNTAX = (
    "iqn.yyyy-mm.<reversed domain>[:<identifier>], eui.<16 hex digits> "
    "or naa.<16 or 32 hex digits> (RFC 7143 §4.2.7)"
)

_REDACTED = "***"


class DigestPreference(enum.Enum):
    """What to offer for HeaderDigest / DataDigest (RFC 7143 §13.1), in preference order."""

    NONE = "none"
    CRC32C = "crc32c"
    CRC32C_NONE = "crc32c-none"
    NONE_CRC32C = "none-crc32c"

    @property
    def offer(self) -> str:
        """The value of the login key: ``None``, ``CRC32C``, ``CRC32C,None``, ``None,CRC32C``."""
        return {
            DigestPreference.NONE: "None",
            DigestPreference.CRC32C: "CRC32C",
            DigestPreference.CRC32C_NONE: "CRC32C,None",
            DigestPreference.NONE_CRC32C: "None,CRC32C",
        }[self]

    @classmethod
    def parse(cls, text: str) -> DigestPreference:
        """Accept the URL spelling (``crc32c-none``) and the key spelling (``CRC32C,None``),
        case-insensitively. Raises ``ValueError`` for anything else."""
        key = text.strip().lower().replace(",", "-").replace(" ", "")
        for member in cls:
            if member.value == key:
                return member
        raise ValueError(text)


_DIGEST_CHOICES = "none, crc32c, crc32c-none or none-crc32c"


@dataclass(frozen=True, slots=True, repr=False)
class IscsiUrl:
    """A parsed iSCSI URL. ``target_iqn`` and ``lun`` are None for the discovery form.

    ``header_digest``/``data_digest`` are None when the URL did not ask for anything (the
    session's defaults apply). ``host``/``port`` are the first portal, ``more_portals`` the
    others of a multipath URL (:attr:`portals` has them all).
    """

    host: str
    port: int = DEFAULT_PORT
    target_iqn: str | None = None
    lun: int | None = None
    chap_user: str | None = None
    chap_secret: str | None = None
    target_user: str | None = None
    target_secret: str | None = None
    header_digest: DigestPreference | None = None
    data_digest: DigestPreference | None = None
    more_portals: tuple[tuple[str, int], ...] = ()
    discover_portals: bool = False

    @property
    def portals(self) -> tuple[tuple[str, int], ...]:
        """Every portal as ``(host, port)``, the first one first."""
        return ((self.host, self.port), *self.more_portals)

    @property
    def is_discovery(self) -> bool:
        """The URL names a portal only (for SendTargets discovery)."""
        return self.target_iqn is None

    @property
    def portal(self) -> str:
        """``host:port``, with an IPv6 address in brackets: a TargetAddress value."""
        return format_portal(self.host, self.port)

    @property
    def chap(self) -> ChapFields:
        """The CHAP settings the URL (and the environment it was parsed in) gave."""
        return ChapFields(self.chap_user, self.chap_secret, self.target_user,
                          self.target_secret)

    @property
    def mutual_chap(self) -> bool:
        """The target is asked to authenticate itself too."""
        return self.target_user is not None

    def redacted(self) -> str:
        """The URL with every secret replaced by ``***``: safe for logs and messages."""
        userinfo = ""
        if self.chap_user is not None:
            userinfo = self.chap_user
            if self.chap_secret is not None:
                userinfo += "%" + _REDACTED
            userinfo += "@"
        # A zone's '%' is written %25 in a URL (RFC 6874).
        text = f"iscsi://{userinfo}" + ",".join(format_portal(h.replace("%", "%25"), p)
                                                 for h, p in self.portals)
        if self.target_iqn is not None:
            text += f"/{self.target_iqn}/{self.lun}"
        options: list[str] = []
        if self.header_digest is not None:
            options.append(f"header_digest={self.header_digest.value}")
        if self.data_digest is not None:
            options.append(f"data_digest={self.data_digest.value}")
        if self.target_user is not None:
            options.append(f"target_user={_quote(self.target_user)}")
        if self.target_secret is not None:
            options.append(f"target_password={_REDACTED}")
        if self.discover_portals:
            options.append("discover_portals=on")
        if options:
            text += "?" + "&".join(options)
        return text

    def __str__(self) -> str:
        return self.redacted()

    def __repr__(self) -> str:
        def secret(value: str | None) -> str:
            return "None" if value is None else repr(_REDACTED)

        return (
            f"IscsiUrl(host={self.host!r}, port={self.port!r}, target_iqn={self.target_iqn!r}, "
            f"lun={self.lun!r}, chap_user={self.chap_user!r}, "
            f"chap_secret={secret(self.chap_secret)}, target_user={self.target_user!r}, "
            f"target_secret={secret(self.target_secret)}, "
            f"header_digest={self.header_digest!r}, data_digest={self.data_digest!r}, "
            f"more_portals={self.more_portals!r}, discover_portals={self.discover_portals!r})"
        )


_QUERY_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~:@/")


def _quote(text: str) -> str:
    """Percent-encode a query value."""
    return "".join(
        c if c in _QUERY_SAFE else "".join(f"%{b:02X}" for b in c.encode()) for c in text
    )


# --------------------------------------------------------------------------------------------
# Numbers

TOO_LARGE = 10**19
"""What :func:`decimal` returns for a number of more than 19 digits: beyond every bound a
person's number is checked against here (ports, LUNs, timeouts, sizes)."""



def decimal(text: str) -> int | None:
    """``text`` as a whole number when it is ASCII digits only, else None.

    ``str.isdigit`` followed by ``int()`` is not enough: ``'²'`` passes the first and fails the
    second, as does any number of more than 4300 digits (Python's limit), each a ValueError
    traceback; ``int()`` alone also takes signs, spaces, ``_`` and other scripts' digits. A
    number too long to matter comes back as :data:`TOO_LARGE`, so that range checks name it.
    """
    if not text or not text.isascii() or not text.isdigit():
        return None
    digits = text.lstrip("0") or "0"
    return int(digits) if len(digits) <= 19 else TOO_LARGE


def check_seconds(option: str, value: float, *, zero: bool = False) -> float:
    """``value``, a bound in seconds a person gave with ``option``, when it is one: finite and
    above 0 (or 0 when ``zero``, where 0 means "none"); else ConfigurationError naming the
    option. NaN fails every comparison, so it is refused too: as a wait it would be no bound,
    and a negative one no wait."""
    if not 0 <= value < float("inf") or (value == 0 and not zero):
        raise ConfigurationError(f"{option} {value:g}: expected a number of seconds"
                                 + (", 0 or more" if zero else " above 0"))
    return value


# --------------------------------------------------------------------------------------------
# iSCSI names
# --------------------------------------------------------------------------------------------

_IQN = re.compile(r"iqn\.(?P<year>\d{4})-(?P<month>\d{2})\.(?P<rest>.+)", re.IGNORECASE | re.DOTALL)
_HEX = re.compile(r"[0-9a-fA-F]+")
_LABEL = re.compile(r"[a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?")


def _name_chars_ok(text: str) -> str | None:
    """RFC 3722 (stringprep profile for iSCSI names): after normalisation only letters,
    digits, '-', '.', ':' remain. Returns the first offending character."""
    for ch in text:
        if ch in "-.:" or ch.isalnum():
            continue
        return ch
    return None


def validate_iscsi_name(name: str, *, what: str = "target name") -> str:
    """Check ``name`` is a well-formed iSCSI name and return it unchanged.

    Raises :class:`ConfigurationError` with a sentence saying what is wrong and which forms
    are accepted.
    """

    def fail(reason: str) -> ConfigurationError:
        return ConfigurationError(
            f"{what} {quoted(name)} is not a valid iSCSI name: {reason}; expected {NAME_SYNTAX}"
        )

    if not name:
        raise ConfigurationError(f"{what} is empty; expected {NAME_SYNTAX}")
    if not is_utf8(name):
        raise fail("it is not UTF-8 text")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise fail(f"it is longer than {MAX_NAME_BYTES} bytes")
    prefix = name[:4].lower()
    if prefix == "eui.":
        digits = name[4:]
        if len(digits) != 16 or not _HEX.fullmatch(digits):
            raise fail("'eui.' must be followed by exactly 16 hexadecimal digits")
        return name
    if prefix == "naa.":
        digits = name[4:]
        if len(digits) not in (16, 32) or not _HEX.fullmatch(digits):
            raise fail("'naa.' must be followed by 16 or 32 hexadecimal digits")
        return name
    if prefix != "iqn.":
        raise fail("it must start with 'iqn.', 'eui.' or 'naa.'")
    match = _IQN.fullmatch(name)
    if match is None:
        raise fail("'iqn.' must be followed by the date yyyy-mm and a '.'")
    month = int(match["month"])
    if not 1 <= month <= 12:
        raise fail(f"month {match['month']} of the date is not 01..12")
    domain, _colon, _identifier = match["rest"].partition(":")
    if not domain or not all(_LABEL.fullmatch(label) for label in domain.split(".")):
        raise fail(
            "the naming authority after the date must be a reversed domain name "
            "(labels of letters, digits and '-', separated by '.')"
        )
    bad = _name_chars_ok(name)
    if bad is not None:
        raise fail(f"character {quoted(bad)} is not allowed (only letters, digits, '-', '.', ':')")
    return name


# --------------------------------------------------------------------------------------------
# Portals
# --------------------------------------------------------------------------------------------


def _bracketed(text: str) -> str:
    """How an unbracketed IPv6 address is written, for the message refusing it: ``::1:3260``
    may be an address or ``::1`` with its port, and only the writer knows which."""

    def ipv6(candidate: str) -> bool:
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            return False
        return True

    head, _, tail = text.rpartition(":")
    with_port = 0 < (decimal(tail) or 0) < 65536 and ipv6(head)
    if with_port and ipv6(text):
        return f"[{text}] for that address, or [{head}]:{tail} if {tail} is the port"
    if with_port:
        return f"[{head}]:{tail}"
    return f"[{text}] or [{text}]:3260"


_ZONE = re.compile(r"[A-Za-z0-9._~-]{1,15}")
"""A zone (RFC 4007 §11: an interface name or index), once decoded: RFC 6874's ZoneID is
unreserved characters, and a Linux interface name at most 15 bytes (IFNAMSIZ - 1)."""
_PERCENT_ENCODED = re.compile(r"%[0-9A-Fa-f]{2}")


def ipv6_literal(text: str, where: str) -> str:
    """The IPv6 address written between brackets in ``where``, with its zone if it has one
    (``fe80::1%eth0``, as sockets take it); ConfigurationError if it is none.

    RFC 6874 writes the zone's ``%`` as ``%25`` in a URL (``[fe80::1%25eth0]``), and its
    §4 asks that a bare ``%`` not followed by two hex digits be taken too (``[fe80::1%eth0]``,
    as typed and as a target may send it). The zone may come from a target: it is checked
    against :data:`_ZONE` and quoted escaped, never used as it came."""
    address, percent, zone = text.partition("%")
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        raise ConfigurationError(
            f"{quoted(address)} in {where} is not an IPv6 address; brackets are only for IPv6 "
            "addresses, e.g. [fe80::1]:3260"
        ) from None
    if not percent:
        return address
    if _PERCENT_ENCODED.match("%" + zone):
        if not zone.startswith("25"):
            raise ConfigurationError(
                f"the zone of {quoted(text)} in {where} starts with {quoted('%' + zone[:2])}; "
                "write the '%' before the zone as %25 (RFC 6874), e.g. [fe80::1%25eth0]")
        zone = unquote_to_bytes(zone[2:]).decode("ascii", "replace")
    if not _ZONE.fullmatch(zone):
        raise ConfigurationError(
            f"the zone {quoted(zone)} of {quoted(text)} in {where} is not a network interface "
            "name or index (up to 15 letters, digits, '.', '_', '~', '-'), e.g. "
            "[fe80::1%25eth0]")
    return f"{address}%{zone}"


def check_zone(host: str, where: str) -> None:
    """Refuse an IPv6 address whose zone names no network interface of this host: else it
    fails only when connecting, as a host name that does not resolve."""
    _address, percent, zone = host.partition("%")
    if not percent:
        return
    try:
        index = decimal(zone)
        if index is None:
            socket.if_nametoindex(zone)
        else:
            socket.if_indextoname(index)
    except (OSError, OverflowError):
        raise ConfigurationError(
            f"the zone {quoted(zone)} of {quoted(host)} in {where} names no network interface "
            "of this host; give one `ip link` lists, e.g. [fe80::1%25eth0]") from None


def _valid_hostname(host: str) -> bool:
    if len(host) > 253 or not host:
        return False
    return all(_LABEL.fullmatch(label) and len(label) <= 63 for label in host.split("."))


def format_portal(host: str, port: int) -> str:
    """``host:port``, bracketing an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_portal(text: str, *, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """Split ``host[:port]`` (IPv6 in brackets) into a validated ``(host, port)``.

    The host is returned without brackets. Raises :class:`ConfigurationError`.
    """
    if not text:
        raise ConfigurationError("the address is empty; expected host[:port]")
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ConfigurationError(
                f"address {quoted(text)} opens '[' without closing it; expected "
                "[IPv6 address][:port]"
            )
        host = text[1:close]
        rest = text[close + 1 :]
        if rest and not rest.startswith(":"):
            raise ConfigurationError(
                f"address {quoted(text)} has {quoted(rest)} after ']'; expected "
                "[IPv6 address][:port]"
            )
        port_text = rest[1:] if rest else None
        host = ipv6_literal(host, f"address {quoted(text)}")
        check_zone(host, f"address {quoted(text)}")
    else:
        if text.count(":") > 1:
            raise ConfigurationError(
                f"address {quoted(text)} looks like an IPv6 address; put it in brackets, "
                f"e.g. {_bracketed(text)}"
            )
        host, colon, port_text_or_empty = text.partition(":")
        port_text = port_text_or_empty if colon else None
        if re.fullmatch(r"[0-9.]+", host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ConfigurationError(
                    f"{quoted(host)} in address {quoted(text)} is not a valid IPv4 address"
                ) from None
        elif not _valid_hostname(host):
            raise ConfigurationError(
                f"{quoted(host)} in address {quoted(text)} is not a valid host name (letters, "
                "digits, '-' and '.'), IPv4 address, or bracketed IPv6 address"
            )
    if port_text is None:
        return host, default_port
    port = decimal(port_text)
    if port is None or not 1 <= port <= 65535:
        raise ConfigurationError(
            f"port {quoted(port_text)} in address {quoted(text)} is not a number from 1 to 65535"
        )
    return host, port


# --------------------------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------------------------

_PREFIX = "iscsi://"
_OPTIONS = ("header_digest", "data_digest", "target_user", "target_password",
            "discover_portals")
_ON_OFF = {"on": True, "yes": True, "off": False, "no": False}


def _scrub(text: str) -> str:
    """The URL text with anything that may hold a secret replaced by ``***``."""
    body = text[len(_PREFIX) :] if text.lower().startswith(_PREFIX) else text
    head = text[: len(text) - len(body)]
    at = body.rfind("@")
    if at >= 0:
        body = _REDACTED + body[at:]
    body = re.sub(r"(?i)(password=)[^&]*", r"\1" + _REDACTED, body)
    return head + body


def _decode(part: str, what: str, shown: str) -> str:
    """Percent-decode ``part`` as UTF-8; errors name ``what`` without showing its value."""
    if re.search(r"%(?![0-9A-Fa-f]{2})", part):
        raise ConfigurationError(
            f"the {what} in URL {shown} has a '%' that is not followed by two hex digits; "
            "write a literal '%' as %25"
        )
    try:
        return unquote_to_bytes(part).decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigurationError(
            f"the {what} in URL {shown} does not decode to UTF-8 text"
        ) from None


def parse_url(text: str, *, environ: Mapping[str, str] | None = None,
              several_portals: bool = False) -> IscsiUrl:
    """Parse an ``iscsi://`` URL (target or discovery form) into an :class:`IscsiUrl`.

    ``environ`` (default ``os.environ``) supplies CHAP credentials the URL leaves out; see the
    module docstring for the variable names and their precedence. ``several_portals``
    accepts the multipath form (several portals, ``discover_portals``). Every problem raises
    :class:`ConfigurationError` naming what is wrong and the expected form, never showing a
    secret.
    """
    shown = quoted(_scrub(text))
    if not is_utf8(text):
        raise ConfigurationError(
            f"URL {shown} is not UTF-8 text (it holds bytes that are not UTF-8); write "
            "non-ASCII characters in UTF-8 or percent-encode them")
    if not text.lower().startswith(_PREFIX):
        raise ConfigurationError(
            f"URL {shown} does not start with iscsi://; expected {URL_SYNTAX} "
            f"or, for discovery, {PORTAL_URL_SYNTAX}"
        )
    rest = text[len(_PREFIX) :]

    # The user information ends at the last '@' before the query (host, target name and LUN
    # never contain '@' or '?'), so an unescaped '/' in a secret still parses.
    userinfo: str | None = None
    head, _question, query = rest.partition("?")
    at = head.rfind("@")
    if at >= 0:
        userinfo, head = head[:at], head[at + 1 :]
    rest = head

    authority, slash, path = rest.partition("/")
    # An '@' after the '?' usually means a secret with an unescaped '?': then the text before
    # the '?' may hold part of the secret and must not be quoted back.
    portals = _parse_portals(authority, shown, quote="@" not in query)
    if len(portals) > 1 and not several_portals:
        raise ConfigurationError(
            f"URL {shown} names {len(portals)} portals; only hbactl attach (the daemon) uses "
            "several, one path each: give this command one host[:port]"
        )
    (host, port), more = portals[0], tuple(portals[1:])

    target: str | None = None
    lun: int | None = None
    if slash and path:
        parts = path.split("/")
        if len(parts) == 1 or (len(parts) == 2 and parts[1] == ""):
            raise ConfigurationError(
                f"URL {shown} names a target but no LUN; expected {URL_SYNTAX}, "
                "e.g. iscsi://192.0.2.1/iqn.2003-01.org.example:disk1/0"
            )
        if len(parts) > 2 and not (len(parts) == 3 and parts[2] == ""):
            raise ConfigurationError(
                f"URL {shown} has {len(parts)} path parts after the host; expected {URL_SYNTAX}"
            )
        target_text, lun_text = parts[0], parts[1]
        if not target_text:
            raise ConfigurationError(f"URL {shown} has an empty target name; expected {URL_SYNTAX}")
        target = validate_iscsi_name(_decode(target_text, "target name", shown))
        lun = decimal(lun_text)
        if lun is None:
            raise ConfigurationError(
                f"LUN {quoted(lun_text)} in URL {shown} is not a number; expected a LUN from 0 to "
                f"{MAX_LUN} after the target name"
            )
        if lun > MAX_LUN:
            shown_lun = lun if lun < TOO_LARGE else lun_text[:20] + "..."
            raise ConfigurationError(
                f"LUN {shown_lun} in URL {shown} is larger than {MAX_LUN}; iscsi-hba addresses the "
                "first level of a SAM LUN, numbered as Linux and libiscsi do (lsscsi shows it)"
            )

    options = _parse_query(query, shown)
    discover = options.get("discover_portals")
    if discover is not None and not several_portals:
        raise ConfigurationError(
            f"option discover_portals in URL {shown} is for hbactl attach (the daemon) only"
        )
    if discover is not None and discover.lower() not in _ON_OFF:
        raise ConfigurationError(
            f"discover_portals={quoted(discover)} in URL {shown} is not one of on, off, yes, no"
        )

    chap_user: str | None = None
    chap_secret: str | None = None
    if userinfo is not None:
        if not userinfo:
            raise ConfigurationError(
                f"URL {shown} has an '@' with nothing before it; expected "
                "iscsi://<user>[%<secret>]@<host>/..."
            )
        # libiscsi's rule: the first '%' ends the user name, which therefore holds no escapes.
        chap_user, percent, secret_part = userinfo.partition("%")
        if percent:
            chap_secret = _decode(secret_part, "CHAP secret", shown)
            if not chap_secret:
                raise ConfigurationError(
                    f"URL {shown} has an empty CHAP secret after '%'; give the secret or drop "
                    "the '%' and set ISCSI_HBA_CHAP_SECRET"
                )
        if not chap_user:
            raise ConfigurationError(
                f"URL {shown} has an empty CHAP user name; expected <user>%<secret>@<host>"
            )
    chap = ChapFields(chap_user, chap_secret, options.get("target_user"),
                      options.get("target_password")).or_environment(environ)
    chap.check(ChapSource.url(shown))

    return IscsiUrl(
        host=host,
        port=port,
        target_iqn=target,
        lun=lun,
        chap_user=chap.user,
        chap_secret=chap.secret,
        target_user=chap.target_user,
        target_secret=chap.target_secret,
        header_digest=_digest(options, "header_digest", shown),
        data_digest=_digest(options, "data_digest", shown),
        more_portals=more,
        discover_portals=_ON_OFF[discover.lower()] if discover is not None else False,
    )


def _parse_portals(authority: str, shown: str, *, quote: bool) -> list[tuple[str, int]]:
    """The portals of the authority: ``host[:port]`` separated by ``,`` (module docstring)."""
    portals: list[tuple[str, int]] = []
    for part in authority.split(","):
        if not part and authority:
            raise ConfigurationError(
                f"URL {shown} has an empty portal between commas; expected {PATHS_SYNTAX}"
            )
        portal = _parse_authority(part, shown, quote=quote)
        if portal in portals:
            raise ConfigurationError(
                f"URL {shown} names portal {format_portal(*portal)} twice"
            )
        portals.append(portal)
    return portals


def _parse_authority(authority: str, shown: str, *, quote: bool) -> tuple[str, int]:
    if not authority:
        raise ConfigurationError(
            f"URL {shown} has no host; expected {URL_SYNTAX} or {PORTAL_URL_SYNTAX}"
        )
    try:
        return parse_portal(authority)
    except ConfigurationError as exc:
        if quote:
            raise ConfigurationError(f"in URL {shown}: {exc}") from None
        raise ConfigurationError(
            f"URL {shown} has no valid host[:port] before its path; if the CHAP secret "
            "contains '?' or '@', write them as %3F and %40"
        ) from None


def _parse_query(query: str, shown: str) -> dict[str, str]:
    options: dict[str, str] = {}
    if not query:
        return options
    for item in query.split("&"):
        if not item:
            continue
        key, equals, value = item.partition("=")
        if key not in _OPTIONS:
            # Quote the key only when it cannot be a piece of a mis-split secret.
            named = (
                f"unknown option {quoted(key)}"
                if re.fullmatch(r"[A-Za-z_]+", key)
                else "an unknown option"
            )
            raise ConfigurationError(
                f"URL {shown} has {named}; the options are "
                + ", ".join(f"{name}=" for name in _OPTIONS)
            )
        if not equals:
            raise ConfigurationError(f"option {key} in URL {shown} has no '=value'")
        if key in options:
            raise ConfigurationError(f"option {key} appears twice in URL {shown}")
        what = "target CHAP secret" if key == "target_password" else f"value of {key}"
        decoded = _decode(value, what, shown)
        if not decoded:
            raise ConfigurationError(f"option {key} in URL {shown} is empty")
        options[key] = decoded
    return options


def _digest(options: Mapping[str, str], key: str, shown: str) -> DigestPreference | None:
    value = options.get(key)
    if value is None:
        return None
    try:
        return DigestPreference.parse(value)
    except ValueError:
        raise ConfigurationError(
            f"{key}={quoted(value)} in URL {shown} is not one of {_DIGEST_CHOICES}"
        ) from None
