"""The daemon's configuration, ``/etc/iscsi-hba.conf``, in FreeBSD iscsi.conf(5) syntax.

Theory of operation
-------------------
The file is a list of blocks, one per target (or discovery portal)::

    # comment
    nickname {
        TargetAddress = 192.0.2.10:3260
        TargetName    = iqn.2003-01.org.example:disk1
        chapIName     = iqn.2024-01.org.example:host;   # ';' is optional
        chapSecret    = "a secret with spaces"
    }

As in FreeBSD's iscsictl (usr.bin/iscsictl: token.l, parse.y, iscsictl.c conf_verify):

* keys and nicknames are case-insensitive; values are a word (no whitespace and none of
  ``{ } = ; # "``) or a double-quoted string without escapes, on one line;
* AuthMethod defaults to CHAP when any chap*/tgtChap* key is present, None otherwise; CHAP
  needs chapIName and chapSecret; either tgtChap key needs the other;
* SessionType Normal (the default) needs TargetName, Discovery forbids it; TargetAddress is
  always needed; Enable is on/off/yes/no; Protocol iSCSI (iSER is refused here);
* FreeBSD's obsolete or unsupported keys (port, MaxConnections, tags, dscp, ...) are accepted
  and ignored with a warning; Offload likewise.

Differences, all towards telling the user sooner: a nickname must be usable as a kernel name
(:data:`MAX_NICKNAME`); a duplicated key or nickname, an unknown
key and a bad value are errors reported with ``path:line:`` and *all* of a file's errors are
reported together; CHAP keys under ``AuthMethod = None`` draw a warning (FreeBSD ignores them
silently); a mutual-CHAP secret equal to the initiator's secret is refused (RFC 7143 §9.2.1);
a secret shorter than 12 bytes draws a warning (RFC 7143 §9.2.1: 96 bits, and Microsoft-style
targets refuse less).

Outside the blocks, keys of the daemon itself, read at start only: ``Metrics = 127.0.0.1:9433``
serves Prometheus metrics there (``hbactl daemon --metrics`` wins over it; a bare port means
the loopback address); ``Workers = 2`` serves the disks from at most that many worker
processes (:mod:`hba.workers`; ``hbactl daemon --workers`` wins over it; default: the number
of cores); ``Priority = -10`` is the nice value of the daemon and its workers, from -20 (the
most CPU) to 19 (:mod:`hba.priority`; ``hbactl daemon --priority`` wins over it; default: as
started).

Multipath: TargetAddress takes a list (``TargetAddress = 192.0.2.10, 192.0.2.11:3261`` quoted,
or one word without spaces ``192.0.2.10,192.0.2.11``), one path per portal, and
``DiscoverPortals = on`` adds every portal the target lists in SendTargets. Such an entry is a
multipath entry: its ReplacementTimeout (the time after which a down path fails its I/O, so
that dm-multipath moves it to another path) defaults to 5 s, like multipathd's
``fast_io_fail_tmo``, instead of 120 s. (Two entries naming the same target and LUN are two
disks, each with one path and the single-path timeout, as in FreeBSD.)

This project's keys: Lun (0), QueueDepth (32), ReplacementTimeout (120 s; 5 s for multipath
entries), LoginTimeout (15 s),
NoopInterval (5 s, 0 disables), NoopTimeout (5 s; FreeBSD's PingTimeout is an alias),
CommandTimeout (30 s, 0 disables), TaskManagementTimeout (15 s), LogoutTimeout (10 s), and the
negotiation overrides MaxRecvDataSegmentLength, MaxBurstLength, FirstBurstLength (512 ..
16777215), ImmediateData, InitialR2T (Yes/No).

The file is refused when it holds a secret and group or others may read or write it, when
group or others may write it at all, and when it is owned by neither root nor the user running
the daemon: whoever can change the file chooses which targets this host attaches and where
its secrets go.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import ipaddress
import os
import pwd
import re
import shlex
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hba.errors import HBAError
from hba.priority import HIGHEST, LOWEST, parse_priority
from initiator.chap import check_chap_name
from initiator.errors import ConfigurationError
from initiator.keys import SessionType
from initiator.url import MAX_LUN, DigestPreference, decimal, format_portal, parse_portal
from initiator.url import validate_iscsi_name as _validate_iscsi_name

MAX_QUEUE_DEPTH = 1024
"""The most commands a LUN (QueueDepth) or ``hbactl perf --queue-depth`` keeps in flight: what
open-iscsi allows for node.session.queue_depth. The session's command window (RFC 7143 §3.2.2.1)
holds back what the target does not take anyway; more only costs buffers and setup."""

__all__ = [
    "DEFAULT_PATH",
    "AuthMethod",
    "Config",
    "ConfigError",
    "SessionType",
    "TargetEntry",
    "load_config",
    "parse_config",
]

DEFAULT_PATH = "/etc/iscsi-hba.conf"

MULTIPATH_REPLACEMENT_TIMEOUT = 5
"""ReplacementTimeout of a multipath entry that does not set one: multipathd's default
``fast_io_fail_tmo``, which it writes into open-iscsi's sessions but cannot into ours."""

MAX_NICKNAME = 55
"""A nickname names the kernel backstore of its LUN (``hba-<nickname>``, with ``.<n>`` after it
for path n of a multipath entry, :mod:`hba.specs`) and is its cfgstring (:mod:`hba.cfgstring`):
backstore names are at most 64 letters, digits, '_', '.' and '-' (:data:`hba.kernel.NAME_RE`),
less ``hba-`` and ``.9999``."""
_NICKNAME = re.compile(r"[A-Za-z0-9_.-]+", re.ASCII)

MAX_CONFIG_BYTES = 1 << 20
"""The largest configuration file read: thousands of entries, and no file by mistake (a disk
image, a log) read whole into memory."""

MAX_SHOWN_ERRORS = 50
"""The problems of a file printed (and logged) at most: a wrong file (a log, a script) has one
on every line, and ten thousand lines bury the first, which says what the file is."""

MIN_SECRET_BYTES = 12
"""RFC 7143 §9.2.1: do not answer CHAP with a secret under 96 bits unless IPsec protects it."""


class ConfigError(HBAError):
    """The configuration cannot be used. ``errors`` lists every problem, each prefixed with
    ``path:line:`` when it belongs to a line; ``lines`` is the message as the lines to print
    (or log) one by one: the problem, or a count and then the problems."""

    def __init__(self, errors: Sequence[str], *, path: str | None = None) -> None:
        self.errors = tuple(errors)
        self.path = path
        where = f" in {path}" if path else ""
        shown = self.errors[:MAX_SHOWN_ERRORS]
        more = len(self.errors) - len(shown)
        self.lines: tuple[str, ...] = self.errors if len(self.errors) == 1 else (
            f"{len(self.errors)} problems{where}:", *(f"  {error}" for error in shown),
            *([f"  ... and {more} more, not shown: is it the right file?"] if more else []))
        super().__init__("\n".join(self.lines))


class AuthMethod(enum.Enum):
    """AuthMethod of a block."""

    NONE = "None"
    CHAP = "CHAP"


_SECRET_FIELDS = frozenset({"chap_secret", "tgt_chap_secret"})


@dataclass(frozen=True, slots=True, repr=False)
class TargetEntry:
    """One block of the file, validated, with defaults filled in.

    ``initiator_name`` is None when the block does not set one (the daemon's default applies).
    The negotiation overrides are None when not set (the session's defaults apply).
    ``host``/``port`` are the first TargetAddress, ``more_addresses`` the others (one
    multipath path each).
    """

    nickname: str
    line: int
    host: str
    port: int
    more_addresses: tuple[tuple[str, int], ...] = ()
    discover_portals: bool = False
    target_name: str | None = None
    session_type: SessionType = SessionType.NORMAL
    initiator_name: str | None = None
    initiator_address: str | None = None
    initiator_alias: str | None = None
    auth_method: AuthMethod = AuthMethod.NONE
    chap_name: str | None = None
    chap_secret: str | None = None
    tgt_chap_name: str | None = None
    tgt_chap_secret: str | None = None
    header_digest: DigestPreference = DigestPreference.NONE
    data_digest: DigestPreference = DigestPreference.NONE
    enable: bool = True
    lun: int = 0
    queue_depth: int = 32
    replacement_timeout: int = 120
    login_timeout: int = 15
    noop_interval: int = 5
    noop_timeout: int = 5
    command_timeout: int = 30
    tmf_timeout: int = 15
    logout_timeout: int = 10
    max_recv_data_segment_length: int | None = None
    max_burst_length: int | None = None
    first_burst_length: int | None = None
    immediate_data: bool | None = None
    initial_r2t: bool | None = None

    @property
    def portal(self) -> str:
        """``host:port`` with an IPv6 address in brackets."""
        return format_portal(self.host, self.port)

    @property
    def addresses(self) -> tuple[tuple[str, int], ...]:
        """Every TargetAddress as ``(host, port)``, the first one first."""
        return ((self.host, self.port), *self.more_addresses)

    @property
    def multipath(self) -> bool:
        """Several paths: more than one address, or every portal SendTargets lists."""
        return bool(self.more_addresses) or self.discover_portals

    @property
    def mutual_chap(self) -> bool:
        """The target must authenticate itself too."""
        return self.tgt_chap_name is not None

    def __repr__(self) -> str:
        parts = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in _SECRET_FIELDS and value is not None:
                parts.append(f"{field.name}='***'")
            else:
                parts.append(f"{field.name}={value!r}")
        return f"TargetEntry({', '.join(parts)})"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class Config:
    """A parsed configuration file: the blocks by nickname (in file order) and the warnings
    (``path:line: ...``) the daemon should log."""

    path: str
    entries: dict[str, TargetEntry]
    warnings: tuple[str, ...] = ()
    metrics: str | None = None
    """``Metrics``, the daemon's Prometheus listen address (outside any block), checked."""
    workers: int | None = None
    """``Workers``, the most worker processes the daemon serves its disks from."""
    priority: int | None = None
    """``Priority``, the nice value of the daemon and its workers (:mod:`hba.priority`)."""

    def get(self, nickname: str) -> TargetEntry | None:
        """The block with this nickname, compared case-insensitively as FreeBSD does."""
        wanted = nickname.lower()
        for name, entry in self.entries.items():
            if name.lower() == wanted:
                return entry
        return None

    def enabled(self) -> tuple[TargetEntry, ...]:
        """The blocks with Enable on."""
        return tuple(entry for entry in self.entries.values() if entry.enable)


# --------------------------------------------------------------------------------------------
# Lexer
# --------------------------------------------------------------------------------------------


class _Kind(enum.Enum):
    WORD = "word"
    STRING = "quoted string"
    LBRACE = "'{'"
    RBRACE = "'}'"
    EQUALS = "'='"
    SEMICOLON = "';'"


@dataclass(frozen=True, slots=True)
class _Token:
    kind: _Kind
    text: str
    line: int

    @property
    def is_value(self) -> bool:
        return self.kind in (_Kind.WORD, _Kind.STRING)


_PUNCTUATION = {"{": _Kind.LBRACE, "}": _Kind.RBRACE, "=": _Kind.EQUALS, ";": _Kind.SEMICOLON}
_WORD_STOP = frozenset(' \t\r\n{}=;#"')


def _tokenize(text: str, report: Callable[[int, str], None]) -> list[_Token]:
    tokens: list[_Token] = []
    # Lines end at '\n' only, as editors, grep -n and the UTF-8 check of load_config count
    # them: str.splitlines() also ends a line at '\f', '\v', '\x1c'-'\x1e', '\x85', U+2028
    # and U+2029, which shifted every later line number and cut comments in two.
    for number, line in enumerate(text.split("\n"), start=1):
        i = 0
        while i < len(line):
            ch = line[i]
            if ch in " \t\r\f\v":
                i += 1
            elif ch == "#":
                break
            elif ch in _PUNCTUATION:
                tokens.append(_Token(_PUNCTUATION[ch], ch, number))
                i += 1
            elif ch == '"':
                end = line.find('"', i + 1)
                if end < 0:
                    report(
                        number,
                        "a quoted string is not closed on this line; values cannot span lines "
                        "and cannot contain '\"'",
                    )
                    break
                tokens.append(_Token(_Kind.STRING, line[i + 1 : end], number))
                i = end + 1
            else:
                start = i
                while i < len(line) and line[i] not in _WORD_STOP:
                    i += 1
                tokens.append(_Token(_Kind.WORD, line[start:i], number))
    return tokens


# --------------------------------------------------------------------------------------------
# Keys: one declarative table
# --------------------------------------------------------------------------------------------


class _BadValue(ValueError):
    """A value that does not parse; the message says what is expected."""


def _choice(mapping: Mapping[str, Any], expected: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return mapping[text.lower()]
        except KeyError:
            raise _BadValue(f"must be {expected}") from None

    return parse


def _integer(low: int, high: int, unit: str = "") -> Callable[[str], int]:
    def parse(text: str) -> int:
        number = decimal(text)
        if number is None or not low <= number <= high:
            raise _BadValue(f"must be a whole number from {low} to {high}{unit}")
        return number

    return parse


def _nice(text: str) -> int:
    number = parse_priority(text)
    if number is None:
        raise _BadValue(f"must be a nice value, a whole number from {HIGHEST} to {LOWEST}")
    return number


def _text(text: str) -> str:
    if not text:
        raise _BadValue("must not be empty")
    return text


def _chap_name(text: str) -> str:
    _text(text)
    try:
        check_chap_name(text)
    except ConfigurationError as exc:
        raise _BadValue(str(exc).replace(f"CHAP name {text!r} must", "must", 1)) from None
    return text


def _iscsi_name(text: str) -> str:
    try:
        return _validate_iscsi_name(text, what="the name")
    except ConfigurationError as exc:
        raise _BadValue(str(exc).replace(f"the name {text!r} is", "is", 1)) from None


def _listen_address(text: str) -> str:
    from hba.metrics import parse_listen_address

    try:
        parse_listen_address(text)
    except ConfigurationError as exc:
        raise _BadValue(f"is not usable: {exc}") from None
    return text


def _address(text: str) -> tuple[str, int]:
    if "://" in text:
        # hbactl takes URLs; someone copying one here would otherwise read that the port
        # '//host' is not a number.
        raise _BadValue("is a URL; TargetAddress is host[:port] (the TargetName and Lun "
                        "are keys of their own)")
    try:
        return parse_portal(text)
    except ConfigurationError as exc:
        raise _BadValue(f"is not usable: {exc}") from None


def _addresses(text: str) -> tuple[tuple[str, int], ...]:
    """One address, or several separated by ',' (one multipath path each)."""
    addresses: list[tuple[str, int]] = []
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            raise _BadValue("has an empty address between commas; expected host[:port], ...")
        address = _address(part)
        if address in addresses:
            raise _BadValue(f"names {format_portal(*address)} twice")
        addresses.append(address)
    return tuple(addresses)


def _ip_address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        raise _BadValue(
            "must be an IP address of this host (the source address of the connection)"
        ) from None


def _digest(text: str) -> DigestPreference:
    try:
        return DigestPreference.parse(text)
    except ValueError:
        raise _BadValue(
            "must be None or CRC32C (or the ordered offers CRC32C,None / None,CRC32C)"
        ) from None


def _protocol(text: str) -> str:
    if text.lower() == "iscsi":
        return "iscsi"
    if text.lower() == "iser":
        raise _BadValue("iSER is not supported by iscsi-hba; use iSCSI (or remove the line)")
    raise _BadValue("must be iSCSI")


_ON_OFF = {"on": True, "yes": True, "off": False, "no": False}
_YES_NO = {"yes": True, "on": True, "no": False, "off": False}
_SEGMENT = _integer(512, 16_777_215, " bytes (RFC 7143 §13.12-13.14)")


@dataclass(frozen=True, slots=True)
class _Key:
    name: str
    field: str | None
    parse: Callable[[str], Any]
    secret: bool = False
    note: str | None = None


_KEYS: tuple[_Key, ...] = (
    _Key("TargetAddress", "address", _addresses),
    _Key("TargetName", "target_name", _iscsi_name),
    _Key("InitiatorName", "initiator_name", _iscsi_name),
    _Key("InitiatorAddress", "initiator_address", _ip_address),
    _Key("InitiatorAlias", "initiator_alias", _text),
    _Key(
        "AuthMethod",
        "auth_method",
        _choice({"none": AuthMethod.NONE, "chap": AuthMethod.CHAP}, "None or CHAP"),
    ),
    _Key("chapIName", "chap_name", _chap_name),
    _Key("chapSecret", "chap_secret", _text, secret=True),
    _Key("tgtChapName", "tgt_chap_name", _chap_name),
    _Key("tgtChapSecret", "tgt_chap_secret", _text, secret=True),
    _Key("HeaderDigest", "header_digest", _digest),
    _Key("DataDigest", "data_digest", _digest),
    _Key(
        "SessionType",
        "session_type",
        _choice(
            {"normal": SessionType.NORMAL, "discovery": SessionType.DISCOVERY},
            "Normal or Discovery",
        ),
    ),
    _Key("Enable", "enable", _choice(_ON_OFF, "on or off")),
    _Key("DiscoverPortals", "discover_portals", _choice(_ON_OFF, "on or off")),
    _Key("Protocol", None, _protocol),
    _Key("Offload", None, _text, note="hardware offload does not apply to iscsi-hba"),
    _Key("Lun", "lun", _integer(0, MAX_LUN, " (the LUN as lsscsi and libiscsi number it)")),
    _Key("QueueDepth", "queue_depth", _integer(1, MAX_QUEUE_DEPTH)),
    _Key("ReplacementTimeout", "replacement_timeout", _integer(0, 86_400, " seconds")),
    _Key("LoginTimeout", "login_timeout", _integer(1, 3600, " seconds")),
    _Key("NoopInterval", "noop_interval", _integer(0, 3600, " seconds (0 disables NOPs)")),
    _Key("NoopTimeout", "noop_timeout", _integer(1, 3600, " seconds")),
    _Key("CommandTimeout", "command_timeout",
         _integer(0, 86_400, " seconds (0: no deadline)")),
    _Key("TaskManagementTimeout", "tmf_timeout", _integer(1, 3600, " seconds")),
    _Key("LogoutTimeout", "logout_timeout", _integer(1, 3600, " seconds")),
    _Key("MaxRecvDataSegmentLength", "max_recv_data_segment_length", _SEGMENT),
    _Key("MaxBurstLength", "max_burst_length", _SEGMENT),
    _Key("FirstBurstLength", "first_burst_length", _SEGMENT),
    _Key("ImmediateData", "immediate_data", _choice(_YES_NO, "Yes or No")),
    _Key("InitialR2T", "initial_r2t", _choice(_YES_NO, "Yes or No")),
)

# Other spellings of a key: they count as the same key for duplicate detection.
_ALIASES = {"pingtimeout": "NoopTimeout"}

# Keys FreeBSD's iscsictl accepts and ignores (token.l "IGNORED") or that need features this
# project does not have; accepted with a warning so a FreeBSD file keeps working.
_IGNORED: dict[str, str] = {
    "port": "obsolete (put the port in TargetAddress)",
    "maxconnections": "iscsi-hba uses one connection per session",
    "targetalias": "the target announces its own alias",
    "targetportalgrouptag": "the target announces its portal group",
    "defaulttime2wait": "negotiated by the initiator itself",
    "defaulttime2retain": "negotiated by the initiator itself",
    "maxoutstandingr2t": "iscsi-hba negotiates MaxOutstandingR2T=1",
    "datapduinorder": "iscsi-hba requires DataPDUInOrder=Yes",
    "datasequenceinorder": "iscsi-hba requires DataSequenceInOrder=Yes",
    "errorrecoverylevel": "iscsi-hba implements ErrorRecoveryLevel 0 only",
    "tags": "obsolete iscontrol setting",
    "maxluns": "obsolete iscontrol setting",
    "sockbufsize": "obsolete iscontrol setting",
    "chapdigest": "obsolete iscontrol setting",
    "dscp": "not supported by iscsi-hba",
    "pcp": "not supported by iscsi-hba",
}

_BY_NAME = {key.name.lower(): key for key in _KEYS}
_ALL_NAMES = [key.name for key in _KEYS] + list(_ALIASES)


# Keys of the daemon itself, set outside any block.
_DAEMON_KEYS = {"metrics": _Key("Metrics", "metrics", _listen_address),
                "workers": _Key("Workers", "workers", _integer(1, 256)),
                "priority": _Key("Priority", "priority", _nice)}


def _close_name(word: str, names: Sequence[str]) -> str | None:
    """The name in ``names`` that ``word`` is most likely a misspelling of, if any."""
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    if not close:
        lowered_names = {name.lower(): name for name in names}
        close = [lowered_names[m] for m in
                 difflib.get_close_matches(word.lower(), list(lowered_names), n=1, cutoff=0.6)]
    return close[0] if close else None


def _lookup(word: str) -> _Key | None:
    lowered = word.lower()
    lowered = _ALIASES.get(lowered, lowered).lower()
    return _BY_NAME.get(lowered)


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------


@dataclass
class _Block:
    nickname: str
    line: int
    values: dict[str, Any] = dataclasses.field(default_factory=dict)
    lines: dict[str, int] = dataclasses.field(default_factory=dict)


class _Parser:
    """Recursive descent over the token list, recovering at the end of a bad line so every
    error of the file is reported."""

    def __init__(self, text: str, path: str) -> None:
        self.path = path
        self.errors: list[tuple[int, str]] = []
        self.warnings: list[str] = []
        self.saw_secret = False
        self.previous_secret = False
        self.tokens = _tokenize(text, self.error)
        self.pos = 0
        self.daemon: dict[str, Any] = {}
        """The daemon's own keys (outside the blocks), by field."""
        self._daemon_lines: dict[str, int] = {}

    def error(self, line: int, message: str) -> None:
        self.errors.append((line, f"{self.path}:{line}: {message}"))

    def warn(self, line: int, message: str) -> None:
        self.warnings.append(f"{self.path}:{line}: {message}")

    def peek(self, offset: int = 0) -> _Token | None:
        index = self.pos + offset
        return self.tokens[index] if index < len(self.tokens) else None

    def skip_line(self, line: int) -> None:
        """Drop the rest of ``line``, stopping before a '}' so the block still closes."""
        while (tok := self.peek()) is not None and tok.line == line and tok.kind != _Kind.RBRACE:
            self.pos += 1

    def blocks(self) -> Iterator[_Block]:
        while (tok := self.peek()) is not None:
            if not tok.is_value:
                if tok.kind == _Kind.LBRACE:
                    self.error(tok.line, "'{' without a nickname before it; write: nickname {")
                elif tok.kind == _Kind.RBRACE:
                    self.error(tok.line, "'}' without a matching '{'")
                else:
                    self.error(tok.line, f"unexpected {tok.kind.value} outside a block")
                self.pos += 1
                continue
            brace = self.peek(1)
            if brace is not None and brace.kind == _Kind.EQUALS and \
                    tok.text.lower() in _DAEMON_KEYS:
                self.daemon_key(tok, _DAEMON_KEYS[tok.text.lower()])
                continue
            if brace is None or brace.kind != _Kind.LBRACE:
                daemon_key = _close_name(tok.text, [k.name for k in _DAEMON_KEYS.values()])
                if brace is not None and brace.kind == _Kind.EQUALS and \
                        daemon_key is not None and _lookup(tok.text) is None:
                    self.error(tok.line, f"unknown key {tok.text!r} outside a block; did you "
                                         f"mean {daemon_key}?")
                elif brace is not None and brace.kind == _Kind.EQUALS:
                    self.error(
                        tok.line,
                        "'key = value' outside a block; settings go inside nickname { ... }",
                    )
                else:
                    self.error(tok.line, "expected a nickname followed by '{'")
                self.skip_line(tok.line)
                continue
            self.pos += 2
            yield self.block(tok)

    def daemon_key(self, tok: _Token, key: _Key) -> None:
        """``key = value`` outside a block: a setting of the daemon itself."""
        value = self.peek(2)
        self.pos += 2
        if value is None or not value.is_value or value.line != tok.line:
            self.error(tok.line, f"{key.name} has no value after '='")
            return
        self.pos += 1
        if key.name in self._daemon_lines:
            self.error(tok.line, f"{key.name} is set twice (also on line "
                                 f"{self._daemon_lines[key.name]})")
            return
        self._daemon_lines[key.name] = tok.line
        try:
            self.daemon[str(key.field)] = key.parse(value.text)
        except _BadValue as exc:
            self.error(tok.line, f"{key.name} {value.text!r} {exc}")
        after = self.peek()
        if after is not None and after.line == tok.line:
            if after.kind == _Kind.SEMICOLON:
                self.pos += 1
            else:
                self.error(tok.line, "unexpected text after a value; quote values that "
                                     "contain spaces")
                self.skip_line(tok.line)

    def block(self, name: _Token) -> _Block:
        block = _Block(nickname=name.text, line=name.line)
        if not name.text:
            self.error(name.line, "the nickname is empty")
        elif not _NICKNAME.fullmatch(name.text) or len(name.text) > MAX_NICKNAME:
            # FreeBSD takes any word; here the nickname becomes a kernel name.
            self.error(name.line, f"nickname {name.text!r} cannot name a disk: use at most "
                                  f"{MAX_NICKNAME} letters, digits, '_', '.' or '-'")
        previous: _Token | None = None
        while True:
            tok = self.peek()
            if tok is None:
                self.error(
                    name.line,
                    f"block \"{name.text}\" is not closed; add '}}' after its last setting",
                )
                return block
            if tok.kind == _Kind.RBRACE:
                self.pos += 1
                return block
            if tok.kind == _Kind.SEMICOLON:
                self.pos += 1
                continue
            if tok.kind == _Kind.LBRACE:
                self.error(tok.line, "blocks cannot be nested; close the previous block with '}'")
                self.pos += 1
                continue
            previous = self.entry(block, tok, previous)

    def entry(self, block: _Block, tok: _Token, previous: _Token | None) -> _Token | None:
        """Parse ``key = value``; returns the value token (to detect text after it)."""
        equals = self.peek(1)
        has_equals = equals is not None and equals.kind == _Kind.EQUALS and equals.line == tok.line
        if not has_equals or tok.kind != _Kind.WORD:
            # Never quote the offending text: it may be part of a secret that lacks quotes.
            if equals is not None and equals.kind == _Kind.LBRACE:
                self.error(
                    tok.line,
                    f"blocks cannot be nested; close \"{block.nickname}\" with '}}' before "
                    "starting another block",
                )
            elif previous is not None and previous.line == tok.line:
                self.error(
                    tok.line,
                    "unexpected text after a value; quote values that contain spaces, "
                    'e.g. chapSecret = "two words"',
                )
            else:
                self.error(tok.line, "expected 'key = value'")
            self.skip_line(tok.line)
            return None
        self.pos += 2
        value = self.peek()
        key = _lookup(tok.text)
        if key is not None and key.secret:
            self.saw_secret = True
        if value is None or not value.is_value or value.line != tok.line:
            self.error(tok.line, f"{key.name if key else tok.text} has no value after '='")
            return None
        self.pos += 1
        if key is None:
            if previous is not None and previous.line == tok.line and self.previous_secret:
                # "chapSecret = two words = x": the "key" is likely part of the secret.
                self.error(
                    tok.line,
                    "unexpected text after a secret; quote secrets that contain spaces or '='",
                )
            else:
                self.unknown_key(block, tok)
            return value
        self.previous_secret = key.secret
        previous_line = block.lines.get(key.name)
        if previous_line is not None:
            self.error(
                tok.line,
                f'{key.name} is set twice in "{block.nickname}" (also on line {previous_line})',
            )
            return value
        block.lines[key.name] = tok.line
        try:
            parsed = key.parse(value.text)
        except _BadValue as exc:
            shown = "" if key.secret else f" {value.text!r}"
            self.error(tok.line, f"{key.name}{shown} {exc}")
            return value
        if key.note is not None:
            self.warn(tok.line, f"{key.name} is ignored: {key.note}")
        if key.field is not None:
            block.values[key.field] = parsed
        return value

    def unknown_key(self, block: _Block, tok: _Token) -> None:
        lowered = tok.text.lower()
        if lowered in _IGNORED:
            self.warn(tok.line, f"{tok.text} is ignored: {_IGNORED[lowered]}")
            return
        close = _close_name(tok.text, _ALL_NAMES)
        hint = f"; did you mean {close}?" if close else ""
        self.error(tok.line, f'unknown key {tok.text!r} in "{block.nickname}"{hint}')


def _finish(block: _Block, parser: _Parser) -> TargetEntry | None:
    """Cross-key checks (FreeBSD's conf_verify and ours); None when the block is unusable."""
    v = block.values
    where = f'"{block.nickname}"'
    errors_before = len(parser.errors)

    def err(message: str, key: str | None = None) -> None:
        parser.error(block.lines.get(key, block.line) if key else block.line, message)

    session_type = v.get("session_type", SessionType.NORMAL)
    if session_type == SessionType.NORMAL and "TargetName" not in block.lines:
        err(f"{where} has no TargetName; add TargetName = iqn.... or set SessionType = Discovery")
    if session_type == SessionType.DISCOVERY:
        if "TargetName" in block.lines:
            err(f"{where} is a discovery session and cannot have a TargetName", "TargetName")
        if "Lun" in block.lines:
            err(f"{where} is a discovery session and cannot have a Lun", "Lun")
        if "DiscoverPortals" in block.lines:
            err(f"{where} is a discovery session; DiscoverPortals is for entries with a "
                "TargetName", "DiscoverPortals")
    if "address" not in v and "TargetAddress" not in block.lines:
        err(f"{where} has no TargetAddress; add TargetAddress = host[:port]")

    chap_keys = [
        k for k in ("chapIName", "chapSecret", "tgtChapName", "tgtChapSecret") if k in block.lines
    ]
    auth = v.get("auth_method")
    if auth is None:
        auth = AuthMethod.CHAP if chap_keys else AuthMethod.NONE
    if auth == AuthMethod.NONE and chap_keys:
        parser.warn(
            block.lines["AuthMethod"],
            f"{', '.join(chap_keys)} in {where} are ignored because AuthMethod is None",
        )
        for field in ("chap_name", "chap_secret", "tgt_chap_name", "tgt_chap_secret"):
            v.pop(field, None)
    if auth == AuthMethod.CHAP:
        mutual = [k for k in ("tgtChapName", "tgtChapSecret") if k in block.lines]
        one_way = [k for k in ("chapIName", "chapSecret") if k in block.lines]
        if mutual and not one_way:
            err(
                f"{where} sets {' and '.join(mutual)} but neither chapIName nor chapSecret; "
                "the target authenticates itself only after the initiator has (mutual CHAP)",
                mutual[0],
            )
        else:
            for key in ("chapIName", "chapSecret"):
                if key not in block.lines:
                    err(f"{where} uses CHAP but has no {key}", "AuthMethod")
        if len(mutual) == 1:
            missing = "tgtChapSecret" if mutual[0] == "tgtChapName" else "tgtChapName"
            err(f"{where} sets {mutual[0]} but not {missing}; mutual CHAP needs both", mutual[0])
        secret, tgt_secret = v.get("chap_secret"), v.get("tgt_chap_secret")
        if secret is not None and secret == tgt_secret:
            err(
                f"tgtChapSecret in {where} equals chapSecret; RFC 7143 §9.2.1 forbids one secret "
                "for both directions, choose a different one",
                "tgtChapSecret",
            )
        for key, value in (("chapSecret", secret), ("tgtChapSecret", tgt_secret)):
            if value is not None and len(value.encode()) < MIN_SECRET_BYTES:
                parser.warn(
                    block.lines[key],
                    f"{key} in {where} is shorter than {MIN_SECRET_BYTES} bytes; RFC 7143 "
                    "§9.2.1 asks for at least 96 bits and many targets refuse shorter secrets",
                )
    first, burst = v.get("first_burst_length"), v.get("max_burst_length")
    if first is not None and burst is not None and first > burst:
        err(
            f"FirstBurstLength {first} in {where} exceeds MaxBurstLength {burst} (RFC 7143 §13.14)",
            "FirstBurstLength",
        )
    if len(parser.errors) > errors_before or "address" not in v:
        return None
    if session_type == SessionType.NORMAL and "target_name" not in v:
        return None
    (host, port), *more = v.pop("address")
    v["auth_method"] = auth
    if (more or v.get("discover_portals")) and "replacement_timeout" not in v:
        v["replacement_timeout"] = MULTIPATH_REPLACEMENT_TIMEOUT
    return TargetEntry(nickname=block.nickname, line=block.line, host=host, port=port,
                       more_addresses=tuple(more), **v)


def _parse(text: str, path: str) -> tuple[Config, list[str], bool]:
    # A byte order mark, which Windows editors put before the first line, is no part of the
    # text: left in, it made the first nickname "\ufeffname", refused as no kernel name.
    parser = _Parser(text.removeprefix("\ufeff"), path)
    entries: dict[str, TargetEntry] = {}
    seen: dict[str, int] = {}
    for block in parser.blocks():
        lowered = block.nickname.lower()
        if lowered in seen:
            parser.error(
                block.line,
                f'nickname "{block.nickname}" is used twice (also on line {seen[lowered]}); '
                "nicknames are compared ignoring case",
            )
            continue
        seen[lowered] = block.line
        entry = _finish(block, parser)
        if entry is not None:
            entries[block.nickname] = entry
    config = Config(path=path, entries=entries, warnings=tuple(parser.warnings),
                    metrics=parser.daemon.get("metrics"), workers=parser.daemon.get("workers"),
                    priority=parser.daemon.get("priority"))
    # In line order: the lexer reports unclosed quotes before the parser reaches those lines.
    errors = [message for _line, message in sorted(parser.errors, key=lambda e: e[0])]
    return config, errors, parser.saw_secret


def parse_config(text: str, path: str = DEFAULT_PATH) -> Config:
    """Parse configuration text; ``path`` names the file in messages.

    Raises :class:`ConfigError` listing every problem as ``path:line: what is wrong``.
    No file permission checks happen here (see :func:`load_config`).
    """
    config, errors, _secret = _parse(text, path)
    if errors:
        raise ConfigError(errors, path=path)
    return config


def _owner(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _permission_errors(path: str, st: os.stat_result, has_secret: bool) -> list[str]:
    problems: list[str] = []
    mode = stat.S_IMODE(st.st_mode)
    euid = os.geteuid()
    quoted = shlex.quote(path)   # the commands below are pasted into a shell, spaces and all
    if st.st_uid not in (0, euid):
        problems.append(
            f"{path}: owned by {_owner(st.st_uid)}, which is neither root nor the user running "
            f"iscsi-hba ({_owner(euid)}), and so can change it at any time; run: "
            f"chown root:root {quoted}"
        )
    if has_secret and mode & 0o077:
        problems.append(
            f"{path}: holds CHAP secrets but its mode is {mode:04o}, so other users can read "
            f"or change it; run: chmod 600 {quoted}"
        )
    elif mode & 0o022:
        problems.append(
            f"{path}: its mode is {mode:04o}, so other users can change which targets this host "
            f"attaches; run: chmod go-w {quoted}"
        )
    return problems


def load_config(path: str | os.PathLike[str] = DEFAULT_PATH) -> Config:
    """Read, check and parse the configuration file at ``path``.

    Besides everything :func:`parse_config` checks, the file must be a regular file owned by
    root or by the user running iscsi-hba, not writable by group or others, and, when it holds
    a CHAP secret, not readable by them either. Every problem is reported in one
    :class:`ConfigError`.
    """
    name = os.fspath(path)
    try:
        # O_NONBLOCK: opening a FIFO for reading would wait for a writer, forever; it does
        # nothing to a regular file, and anything else is refused below.
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except PermissionError as exc:
        # It is root's, mode 600, when it holds secrets: a user's `hbactl daemon` cannot read
        # it, and must not be told to make it readable.
        raise ConfigError([f"cannot open {name}: {exc.strerror}; the daemon reads it as "
                           "root (systemctl start iscsi-hba, or hbactl daemon as root)"],
                          path=name) from exc
    except OSError as exc:
        raise ConfigError([f"cannot open {name}: {exc.strerror}"], path=name) from exc
    try:
        st = os.fstat(fd)  # of the opened file, so a rename in between cannot fool the check
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else \
                "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device or socket"
            raise ConfigError([f"{name}: not a regular file but {kind}; name the "
                               "configuration file itself"], path=name)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError([f"{name}: larger than {MAX_CONFIG_BYTES} bytes, which no "
                               "configuration is; is it the right file?"], path=name)
    except OSError as exc:
        raise ConfigError([f"cannot read {name}: {exc.strerror}"], path=name) from exc
    finally:
        os.close(fd)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError([f"{name}:{line}: not UTF-8 text"], path=name) from None
    config, errors, has_secret = _parse(text, name)
    problems = _permission_errors(name, st, has_secret) + errors
    if problems:
        raise ConfigError(problems, path=name)
    return config
