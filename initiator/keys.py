"""Login and operational text keys: one declarative table, and a sans-I/O negotiator.

Theory of operation
-------------------
RFC 7143 §6.2 negotiates parameters as offers and answers of ``key=value`` pairs. Each key has a
*rule* that says how an offer and an answer combine (§6.2.1, §6.2.2, §13):

* ``SELECT`` (list-of-values): the offerer lists values in order of preference; the acceptor
  answers with the first one it accepts, or ``Reject`` (the key then keeps its default);
* ``MIN`` / ``MAX`` (numerical): the acceptor answers with the minimum / maximum of the offer and
  its own value, which must be admissible (inside the key's range); an inadmissible offer may be
  answered with ``Reject``;
* ``AND`` / ``OR`` (boolean): the result is the AND / OR of both sides. When the offer alone fixes
  the result (AND with No, OR with Yes) the answer is optional (§6.2.2);
* ``DECLARE`` (declarative): each side states its own value and nobody answers — most notably
  MaxRecvDataSegmentLength, which each side declares for *its own receive direction* (§13.12);
* ``DELEGATE``: keys that belong to another module (the authentication method's CHAP_* keys,
  SendTargets); the negotiator hands them back untouched;
* ``OBSOLETE``: the marker keys of RFC 3720, which §13.25 says to answer with ``Reject``.

The table :data:`KEYS` also records, per key, its phase (security, operational, or any login
stage), its use (login only, leading connection only, any time, Full Feature Phase only), its
scope (session or connection), who may send it, its range, its RFC default, and when it is
irrelevant (§13: "Irrelevant when: SessionType=Discovery", FirstBurstLength without unsolicited
data).

:class:`Negotiator` plays either role. ``offer(stage)`` yields the keys this side proposes or
declares in that login stage (each once); ``receive(pairs, stage)`` takes the peer's keys — answers
to our offers and the peer's own offers — and returns the answers we must send (plus the keys that
belong to the authentication method). It raises :class:`NegotiationViolation` when the peer breaks
a rule (a value outside the range, an answer that does not follow the combining rule, an answer
to something never offered, ``Reject`` or ``NotUnderstood`` for a key that must be negotiated,
renegotiation, a key in the wrong stage or from the wrong sender) and :class:`NegotiationFailed`
when both sides followed the rules but no acceptable outcome exists. ``awaiting`` lists offers
still unanswered, so the login machine knows when negotiation is complete and the T bit may be
set; ``finish()`` returns the typed :class:`SessionParameters`.

Nothing here touches a socket or the clock; text framing is :mod:`initiator.text`.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from initiator.errors import (
    ConfigurationError,
    LocalProtocolError,
    NegotiationError,
    RemoteProtocolError,
)
from initiator.pdu import Stage
from initiator.printable import quoted
from initiator.text import (
    MAX_NUMERICAL_VALUE,
    Answer,
    Pair,
    TextValueError,
    check_iscsi_name,
    check_local_name,
    check_simple_value,
    check_text_value,
    format_boolean,
    format_list,
    format_number,
    is_extension_key,
    parse_boolean,
    parse_list,
    parse_number,
)

if TYPE_CHECKING:
    LogTarget = logging.Logger | logging.LoggerAdapter[Any]

__all__ = [
    "DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH",
    "DIGEST_CRC32C_PREFERRED",
    "DIGEST_CRC32C_REQUIRED",
    "DIGEST_NONE",
    "INITIATOR_OFFERS",
    "KEYS",
    "TARGET_OFFERS",
    "Irrelevance",
    "KeyDef",
    "Kind",
    "MissingParameter",
    "NegotiationFailed",
    "NegotiationSettings",
    "NegotiationViolation",
    "Negotiator",
    "Phase",
    "Received",
    "Role",
    "Rule",
    "Scope",
    "SessionParameters",
    "SessionType",
    "Use",
    "key_def",
]

_log = logging.getLogger(__name__)

Value = bool | int | str
"""A negotiated or declared value, typed: Yes/No as bool, numbers as int, the rest as str."""
Preference = bool | int | str | tuple[str, ...]
"""What one side wants for a key: a value, or for list keys the acceptable values in order."""

# §13.12: "Default is 8192 bytes" — what each side may assume of the other until it declares.
DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH: Final = 8192
_MAX_24BIT: Final = 2**24 - 1

DIGEST_NONE: Final = ("None",)
"""HeaderDigest/DataDigest preference: no digest (the RFC default)."""
DIGEST_CRC32C_PREFERRED: Final = ("CRC32C", "None")
"""Digest preference: CRC32C if the peer agrees, else none."""
DIGEST_CRC32C_REQUIRED: Final = ("CRC32C",)
"""Digest preference: CRC32C or fail the login."""


# The URL options of the digest keys (initiator.url), named in the advice when a target
# refuses a digest we require.
_DIGEST_OPTIONS: Final = {"HeaderDigest": "header_digest", "DataDigest": "data_digest"}


def _digest_hint(key: str) -> str:
    """What to do when the target will not do the CRC32C ``key`` we require."""
    return (f"the target does not do CRC32C {key} as set up; offer it as optional to go on "
            f"without ({_DIGEST_OPTIONS[key]}=crc32c-none in a URL, {key} = CRC32C,None in "
            "the configuration), or enable it on the target")


# --- errors --------------------------------------------------------------------------------


class NegotiationViolation(NegotiationError, RemoteProtocolError):
    """The peer broke a negotiation rule of RFC 7143 §6 or §13.

    As initiator the connection must be dropped; as target the login is rejected with an
    initiator error (§6.2).
    """

    def __init__(self, message: str, *, key: str | None) -> None:
        super().__init__(message)
        self.key = key


class MissingParameter(NegotiationViolation):
    """A key the protocol requires was never sent (login status 0x0207, §11.13.5)."""


class NegotiationFailed(NegotiationError):
    """Both sides followed the rules, but the outcome is not acceptable to us."""

    def __init__(self, message: str, *, key: str) -> None:
        super().__init__(message)
        self.key = key


# --- the table ---------------------------------------------------------------------------


class Role(enum.Enum):
    """Which end of the connection we are."""

    INITIATOR = "initiator"
    TARGET = "target"

    @property
    def peer(self) -> Role:
        return Role.TARGET if self is Role.INITIATOR else Role.INITIATOR


class SessionType(enum.StrEnum):
    """SessionType values (§13.21)."""

    NORMAL = "Normal"
    DISCOVERY = "Discovery"


class Kind(enum.Enum):
    """The value grammar of a key (§6.1)."""

    BOOLEAN = "boolean-value"
    NUMBER = "numerical-value"
    LIST = "list-of-values"
    ENUM = "one of a fixed set of text-values"
    ISCSI_NAME = "iSCSI-name-value"
    LOCAL_NAME = "iSCSI-local-name-value"
    TEXT = "text"
    AUTH = "authentication method item"


class Rule(enum.Enum):
    """How an offer and an answer combine into the outcome."""

    SELECT = "the first value of the offer that the acceptor supports (§6.2.1)"
    MIN = "the minimum of the offer and the acceptor's value (§6.2.2)"
    MAX = "the maximum of the offer and the acceptor's value (§6.2.2)"
    AND = "the AND of the offer and the acceptor's value (§6.2.2)"
    OR = "the OR of the offer and the acceptor's value (§6.2.2)"
    DECLARE = "declarative: each side states its own value, nobody answers"
    DELEGATE = "handled by another module (authentication method, discovery)"
    OBSOLETE = "obsoleted by §13.25: answered with Reject"


class Phase(enum.Enum):
    """In which login stage a key may appear."""

    SECURITY = "security negotiation stage"
    OPERATIONAL = "operational negotiation stage"
    ANY = "any login stage"


class Use(enum.Enum):
    """When a key may be used (the "Use" line of §13)."""

    INITIALIZE_ONLY = "IO"  # during login of any connection
    LEADING_ONLY = "LO"  # during login of the leading connection only
    ALL = "ALL"  # during login and in Full Feature Phase (Text requests)
    FULL_FEATURE_ONLY = "FFPO"


class Scope(enum.Enum):
    """Whether a key's outcome is per session or per connection (the "Scope" line of §13)."""

    SESSION = "SW"
    CONNECTION = "CO"


class Irrelevance(enum.Enum):
    """Conditions under which a key is irrelevant and answered ``Irrelevant`` (§13)."""

    DISCOVERY = "SessionType=Discovery"
    NO_UNSOLICITED_DATA = "InitialR2T=Yes and ImmediateData=No"


_BOTH: Final = frozenset({Role.INITIATOR, Role.TARGET})
_INITIATOR: Final = frozenset({Role.INITIATOR})
_TARGET: Final = frozenset({Role.TARGET})
_DISCOVERY: Final = frozenset({Irrelevance.DISCOVERY})


@dataclass(frozen=True, slots=True)
class KeyDef:
    """Everything the negotiator needs to know about one key."""

    name: str
    reference: str
    kind: Kind
    rule: Rule
    phase: Phase
    use: Use
    scope: Scope
    senders: frozenset[Role]
    default: Value | None = None
    minimum: int = 0
    maximum: int = MAX_NUMERICAL_VALUE
    choices: tuple[str, ...] = ()
    irrelevant_when: frozenset[Irrelevance] = frozenset()
    repeatable: bool = False
    # Keys added after RFC 3720: a legacy peer legitimately answers NotUnderstood (§13.23-24).
    newer_than_rfc3720: bool = False

    @property
    def negotiated(self) -> bool:
        """True for keys whose outcome comes from an offer and an answer."""
        return self.rule in (Rule.SELECT, Rule.MIN, Rule.MAX, Rule.AND, Rule.OR)

    def answer_required(self, offered: Preference) -> bool:
        """Whether an offer of ``offered`` needs an answer (§6.2.2)."""
        if self.rule is Rule.AND:
            return offered is not False  # AND with No fixes the result
        if self.rule is Rule.OR:
            return offered is not True  # OR with Yes fixes the result
        return self.negotiated

    def parse(self, value: str) -> Value:
        """Parse one value of this key (not a list offer); grammar and length only."""
        key = self.name
        match self.kind:
            case Kind.BOOLEAN:
                return parse_boolean(value, key=key)
            case Kind.NUMBER:
                check_simple_value(value, key=key)
                return parse_number(value, key=key)
            case Kind.LIST:
                if "," in value:
                    raise TextValueError(
                        f"{key}={quoted(value)} is a list where a single value is required",
                        key=key,
                        value=value,
                    )
                check_text_value(value, key=key)
                return value
            case Kind.ENUM:
                if value not in self.choices:
                    raise TextValueError(
                        f"{key}={quoted(value)} is not one of {', '.join(self.choices)}",
                        key=key,
                        value=value,
                    )
                return value
            case Kind.ISCSI_NAME:
                check_iscsi_name(value, key=key)
                return value
            case Kind.LOCAL_NAME:
                check_local_name(value, key=key)
                return value
            case Kind.TEXT | Kind.AUTH:
                check_simple_value(value, key=key)
                return value

    def admissible(self, value: Value) -> bool:
        """True when ``value`` is inside this key's range (numbers) or set (enumerations)."""
        if self.kind is Kind.NUMBER:
            return (
                isinstance(value, int)
                and not isinstance(value, bool)
                and self.minimum <= value <= self.maximum
            )
        if self.kind is Kind.ENUM:
            return value in self.choices
        return True

    def format(self, value: Preference) -> str:
        """Format a value (or a list preference) for the wire."""
        if isinstance(value, bool):
            return format_boolean(value)
        if isinstance(value, int):
            return format_number(value)
        if isinstance(value, tuple):
            return format_list(value)
        return value

    def range_text(self) -> str:
        return f"{self.minimum} to {self.maximum}"


def _number(
    name: str,
    section: str,
    rule: Rule,
    default: int,
    minimum: int,
    maximum: int,
    *,
    use: Use = Use.LEADING_ONLY,
    scope: Scope = Scope.SESSION,
    senders: frozenset[Role] = _BOTH,
    irrelevant_when: frozenset[Irrelevance] = frozenset(),
    newer: bool = False,
) -> KeyDef:
    return KeyDef(
        name,
        f"RFC 7143 §{section}",
        Kind.NUMBER,
        rule,
        Phase.OPERATIONAL,
        use,
        scope,
        senders,
        default=default,
        minimum=minimum,
        maximum=maximum,
        irrelevant_when=irrelevant_when,
        newer_than_rfc3720=newer,
    )


def _boolean(name: str, section: str, rule: Rule, default: bool) -> KeyDef:
    # Every boolean key of §13 is LO, session-wide, sent by both, irrelevant for discovery.
    return KeyDef(
        name,
        f"RFC 7143 §{section}",
        Kind.BOOLEAN,
        rule,
        Phase.OPERATIONAL,
        Use.LEADING_ONLY,
        Scope.SESSION,
        _BOTH,
        default=default,
        irrelevant_when=_DISCOVERY,
    )


def _declared(
    name: str,
    section: str,
    kind: Kind,
    senders: frozenset[Role],
    *,
    use: Use = Use.INITIALIZE_ONLY,
    default: Value | None = None,
    minimum: int = 0,
    maximum: int = MAX_NUMERICAL_VALUE,
    choices: tuple[str, ...] = (),
    repeatable: bool = False,
    phase: Phase = Phase.ANY,
    scope: Scope = Scope.SESSION,
    reference: str | None = None,
) -> KeyDef:
    return KeyDef(
        name,
        reference or f"RFC 7143 §{section}",
        kind,
        Rule.DECLARE,
        phase,
        use,
        scope,
        senders,
        default=default,
        minimum=minimum,
        maximum=maximum,
        choices=choices,
        repeatable=repeatable,
    )


def _chap(name: str) -> KeyDef:
    return KeyDef(
        name,
        "RFC 7143 §12.1.3",
        Kind.AUTH,
        Rule.DELEGATE,
        Phase.SECURITY,
        Use.INITIALIZE_ONLY,
        Scope.CONNECTION,
        _BOTH,
    )


def _obsolete(name: str, kind: Kind) -> KeyDef:
    # RFC 3720 markers, obsoleted by RFC 7143 §13.25; never offered, answered with Reject.
    return KeyDef(
        name,
        "RFC 7143 §13.25",
        kind,
        Rule.OBSOLETE,
        Phase.OPERATIONAL,
        Use.INITIALIZE_ONLY,
        Scope.CONNECTION,
        _BOTH,
    )


_TABLE: Final[tuple[KeyDef, ...]] = (
    # §13.1: digests, per connection, negotiated as lists.
    KeyDef(
        "HeaderDigest", "RFC 7143 §13.1", Kind.LIST, Rule.SELECT, Phase.OPERATIONAL,
        Use.INITIALIZE_ONLY, Scope.CONNECTION, _BOTH, default="None", choices=("CRC32C", "None"),
    ),
    KeyDef(
        "DataDigest", "RFC 7143 §13.1", Kind.LIST, Rule.SELECT, Phase.OPERATIONAL,
        Use.INITIALIZE_ONLY, Scope.CONNECTION, _BOTH, default="None", choices=("CRC32C", "None"),
    ),
    _number("MaxConnections", "13.2", Rule.MIN, 1, 1, 65535, irrelevant_when=_DISCOVERY),
    KeyDef(
        "SendTargets", "RFC 7143 §13.3", Kind.TEXT, Rule.DELEGATE, Phase.ANY,
        Use.FULL_FEATURE_ONLY, Scope.SESSION, _INITIATOR,
    ),
    # §13.4: the initiator declares TargetName at login; the target sends it only in SendTargets
    # answers, which the discovery code decodes itself.
    _declared("TargetName", "13.4", Kind.ISCSI_NAME, _BOTH),
    _declared("InitiatorName", "13.5", Kind.ISCSI_NAME, _INITIATOR),
    _declared("TargetAlias", "13.6", Kind.LOCAL_NAME, _TARGET, use=Use.ALL),
    _declared("InitiatorAlias", "13.7", Kind.LOCAL_NAME, _INITIATOR, use=Use.ALL),
    # §13.8: domainname[:port][,portal-group-tag]; may be repeated (SendTargets, redirection).
    _declared("TargetAddress", "13.8", Kind.TEXT, _TARGET, use=Use.ALL, repeatable=True),
    # §13.9: a 16-bit binary-value, sent by the target in its first Login Response.
    _declared(
        "TargetPortalGroupTag", "13.9", Kind.NUMBER, _TARGET, minimum=0, maximum=65535
    ),
    _boolean("InitialR2T", "13.10", Rule.OR, True),
    _boolean("ImmediateData", "13.11", Rule.AND, True),
    # §13.12: declarative, per connection and per direction; may be redeclared by Text requests.
    _declared(
        "MaxRecvDataSegmentLength", "13.12", Kind.NUMBER, _BOTH, use=Use.ALL,
        default=DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH, minimum=512, maximum=_MAX_24BIT,
        phase=Phase.OPERATIONAL, scope=Scope.CONNECTION,
    ),
    _number("MaxBurstLength", "13.13", Rule.MIN, 262144, 512, _MAX_24BIT,
            irrelevant_when=_DISCOVERY),
    _number("FirstBurstLength", "13.14", Rule.MIN, 65536, 512, _MAX_24BIT,
            irrelevant_when=frozenset({Irrelevance.DISCOVERY, Irrelevance.NO_UNSOLICITED_DATA})),
    _number("DefaultTime2Wait", "13.15", Rule.MAX, 2, 0, 3600),
    _number("DefaultTime2Retain", "13.16", Rule.MIN, 20, 0, 3600),
    _number("MaxOutstandingR2T", "13.17", Rule.MIN, 1, 1, 65535, irrelevant_when=_DISCOVERY),
    _boolean("DataPDUInOrder", "13.18", Rule.OR, True),
    _boolean("DataSequenceInOrder", "13.19", Rule.OR, True),
    _number("ErrorRecoveryLevel", "13.20", Rule.MIN, 0, 0, 2),
    _declared(
        "SessionType", "13.21", Kind.ENUM, _INITIATOR, use=Use.LEADING_ONLY, default="Normal",
        choices=(SessionType.NORMAL.value, SessionType.DISCOVERY.value),
    ),
    # §13.23: "Whenever this key is negotiated, at least the RFC3720 value MUST be offered".
    KeyDef(
        "TaskReporting", "RFC 7143 §13.23", Kind.LIST, Rule.SELECT, Phase.OPERATIONAL,
        Use.LEADING_ONLY, Scope.SESSION, _BOTH, default="RFC3720",
        choices=("RFC3720", "ResponseFence", "FastAbort"), irrelevant_when=_DISCOVERY,
        newer_than_rfc3720=True,
    ),
    # §13.24: 1 is RFC 7143, 2 adds the RFC 7144 features.
    _number("iSCSIProtocolLevel", "13.24", Rule.MIN, 1, 0, 31, irrelevant_when=_DISCOVERY,
            newer=True),
    # RFC 4850 (now §13.26): a declarative list describing the node's software.
    _declared(
        "X#NodeArchitecture", "13.26", Kind.TEXT, _BOTH, use=Use.LEADING_ONLY,
        reference="RFC 4850 / RFC 7143 §13.26",
    ),
    # §12.1: the authentication method, negotiated in the security stage.
    KeyDef(
        "AuthMethod", "RFC 7143 §12.1", Kind.LIST, Rule.SELECT, Phase.SECURITY,
        Use.INITIALIZE_ONLY, Scope.CONNECTION, _BOTH,
        choices=("CHAP", "None", "KRB5", "SRP"),
    ),
    _chap("CHAP_A"),
    _chap("CHAP_I"),
    _chap("CHAP_C"),
    _chap("CHAP_N"),
    _chap("CHAP_R"),
    _obsolete("OFMarker", Kind.BOOLEAN),
    _obsolete("IFMarker", Kind.BOOLEAN),
    _obsolete("OFMarkInt", Kind.TEXT),
    _obsolete("IFMarkInt", Kind.TEXT),
)  # fmt: skip

KEYS: Final[Mapping[str, KeyDef]] = {k.name: k for k in _TABLE}
"""Every key this implementation knows, by name."""


def key_def(name: str) -> KeyDef:
    """The table entry of ``name``; ``KeyError`` for unknown keys."""
    return KEYS[name]


# The keys each role proposes or declares by default, in the order they are sent. The
# initiator's list and order follow open-iscsi (usr/login.c), minus the obsolete markers.
INITIATOR_OFFERS: Final = (
    "InitiatorName",
    "InitiatorAlias",
    "TargetName",
    "SessionType",
    "X#NodeArchitecture",
    "AuthMethod",
    "HeaderDigest",
    "DataDigest",
    "DefaultTime2Wait",
    "DefaultTime2Retain",
    "ErrorRecoveryLevel",
    "InitialR2T",
    "ImmediateData",
    "MaxBurstLength",
    "FirstBurstLength",
    "MaxOutstandingR2T",
    "MaxConnections",
    "DataPDUInOrder",
    "DataSequenceInOrder",
    "MaxRecvDataSegmentLength",
)
TARGET_OFFERS: Final = (
    "TargetAlias",
    "TargetPortalGroupTag",
    "X#NodeArchitecture",
    "MaxRecvDataSegmentLength",
)


# --- configuration -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NegotiationSettings:
    """What one side wants. The defaults are open-iscsi's initiator defaults (iscsid.conf,
    usr/idbm.c): a target or a test that wants the RFC defaults uses :meth:`rfc_defaults`.

    Digest and authentication preferences are lists in order of preference. ``offer`` is the
    ordered list of keys this side proposes itself; None means :data:`INITIATOR_OFFERS` or
    :data:`TARGET_OFFERS` by role. Every value is checked here; an out-of-range value raises
    ``ConfigurationError`` naming the setting.
    """

    header_digest: tuple[str, ...] = DIGEST_NONE
    data_digest: tuple[str, ...] = DIGEST_NONE
    max_recv_data_segment_length: int = 262144
    max_burst_length: int = 16776192
    first_burst_length: int = 262144
    initial_r2t: bool = False
    immediate_data: bool = True
    default_time2wait: int = 2
    # open-iscsi offers 0: with ErrorRecoveryLevel 0 nothing survives a connection loss anyway.
    default_time2retain: int = 0
    max_connections: int = 1
    max_outstanding_r2t: int = 1
    error_recovery_level: int = 0
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    auth_methods: tuple[str, ...] = ("None",)
    task_reporting: tuple[str, ...] = ("RFC3720",)
    iscsi_protocol_level: int = 1
    session_type: SessionType = SessionType.NORMAL
    initiator_name: str | None = None
    initiator_alias: str | None = None
    target_name: str | None = None
    target_alias: str | None = None
    target_portal_group_tag: int | None = None
    node_architecture: str | None = None
    offer: tuple[str, ...] | None = None

    @classmethod
    def rfc_defaults(cls, **overrides: Any) -> NegotiationSettings:
        """Settings equal to the RFC 7143 defaults of every key, with ``overrides`` applied."""
        base = cls(
            max_recv_data_segment_length=DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH,
            max_burst_length=262144,
            first_burst_length=65536,
            initial_r2t=True,
            immediate_data=True,
            default_time2retain=20,
        )
        return dataclasses.replace(base, **overrides)

    def __post_init__(self) -> None:
        for setting, key in (("header_digest", "HeaderDigest"), ("data_digest", "DataDigest")):
            _check_choice_list(getattr(self, setting), setting, key_def(key).choices)
        _check_choice_list(self.auth_methods, "auth_methods", ("CHAP", "None"))
        _check_choice_list(self.task_reporting, "task_reporting", key_def("TaskReporting").choices)
        if "RFC3720" not in self.task_reporting:
            raise ConfigurationError(
                "task_reporting must include RFC3720 (RFC 7143 §13.23 requires offering it)"
            )
        for setting, key in _NUMBER_SETTINGS:
            kd = key_def(key)
            value = getattr(self, setting)
            if isinstance(value, bool) or not isinstance(value, int) or not kd.admissible(value):
                raise ConfigurationError(
                    f"{setting} = {value!r} is out of range: {key} takes {kd.range_text()} "
                    f"({kd.reference})"
                )
        if self.first_burst_length > self.max_burst_length:
            raise ConfigurationError(
                f"first_burst_length ({self.first_burst_length}) exceeds max_burst_length "
                f"({self.max_burst_length}); RFC 7143 §13.14: FirstBurstLength MUST NOT exceed "
                "MaxBurstLength"
            )
        if not isinstance(self.session_type, SessionType):
            raise ConfigurationError(
                f"session_type = {self.session_type!r} is not Normal or Discovery"
            )
        try:
            for setting in ("initiator_name", "target_name"):
                name = getattr(self, setting)
                if name is not None:
                    check_iscsi_name(name, key=setting)
            for setting in ("initiator_alias", "target_alias"):
                alias = getattr(self, setting)
                if alias is not None:
                    check_local_name(alias, key=setting)
            if self.node_architecture is not None:
                parse_list(self.node_architecture, key="node_architecture")
        except TextValueError as exc:
            raise ConfigurationError(str(exc)) from None
        tag = self.target_portal_group_tag
        if tag is not None and (isinstance(tag, bool) or not 0 <= tag <= 65535):
            raise ConfigurationError(
                f"target_portal_group_tag = {tag!r} is out of range: 0 to 65535 (RFC 7143 §13.9)"
            )
        if self.offer is not None:
            for key in self.offer:
                entry = KEYS.get(key)
                if entry is None or entry.rule in (Rule.DELEGATE, Rule.OBSOLETE):
                    raise ConfigurationError(
                        f"offer lists {key!r}, which is not a key this side can propose"
                    )


_NUMBER_SETTINGS: Final = (
    ("max_recv_data_segment_length", "MaxRecvDataSegmentLength"),
    ("max_burst_length", "MaxBurstLength"),
    ("first_burst_length", "FirstBurstLength"),
    ("default_time2wait", "DefaultTime2Wait"),
    ("default_time2retain", "DefaultTime2Retain"),
    ("max_connections", "MaxConnections"),
    ("max_outstanding_r2t", "MaxOutstandingR2T"),
    ("error_recovery_level", "ErrorRecoveryLevel"),
    ("iscsi_protocol_level", "iSCSIProtocolLevel"),
)


def _check_choice_list(values: object, setting: str, choices: Sequence[str]) -> None:
    if not isinstance(values, tuple) or not values:
        raise ConfigurationError(f"{setting} must be a non-empty tuple of {', '.join(choices)}")
    for value in values:
        if value not in choices:
            raise ConfigurationError(
                f"{setting} lists {value!r}; the supported values are {', '.join(choices)}"
            )
    if len(set(values)) != len(values):
        raise ConfigurationError(f"{setting} lists a value twice: {values!r}")


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionParameters:
    """The outcome of a negotiation, from *our* side of the connection.

    ``max_recv_data_segment_length`` is what we declared: the largest data segment the peer may
    send us. ``max_xmit_data_segment_length`` is what the peer declared: the largest data segment
    we may send (8192 when it never declared, §13.12). Keys never negotiated hold their RFC
    default; keys answered ``Irrelevant`` or ``Reject`` keep their default too.
    ``first_burst_length`` never exceeds ``max_burst_length`` (§13.14).
    """

    header_digest: bool
    data_digest: bool
    max_recv_data_segment_length: int
    max_xmit_data_segment_length: int
    max_burst_length: int
    first_burst_length: int
    initial_r2t: bool
    immediate_data: bool
    default_time2wait: int
    default_time2retain: int
    max_outstanding_r2t: int
    data_pdu_in_order: bool
    data_sequence_in_order: bool
    error_recovery_level: int
    max_connections: int
    session_type: SessionType
    auth_method: str
    task_reporting: str
    iscsi_protocol_level: int
    initiator_name: str | None
    initiator_alias: str | None
    target_name: str | None
    target_alias: str | None
    target_portal_group_tag: int | None


@dataclass(frozen=True, slots=True)
class Received:
    """What :meth:`Negotiator.receive` found in the peer's keys.

    ``answers`` must be sent back to the peer (in our next PDU of this negotiation).
    ``deferred`` holds keys for another module, in wire order: the authentication method's keys
    (CHAP_*) in the security stage, SendTargets in Full Feature Phase.
    """

    answers: tuple[Pair, ...]
    deferred: tuple[Pair, ...]


_RESERVED: Final = frozenset(a.value for a in Answer)


class Negotiator:
    """Negotiates the text keys of one connection's login (and later Text requests), either role.

    Typical initiator use::

        neg = Negotiator(Role.INITIATOR, settings)
        send(neg.offer(Stage.SECURITY))            # InitiatorName, TargetName, ..., AuthMethod
        got = neg.receive(pairs, Stage.SECURITY)   # got.deferred -> the CHAP module
        send(got.answers + neg.offer(Stage.OPERATIONAL))
        got = neg.receive(pairs, Stage.OPERATIONAL)
        ...                                        # until neg.complete and nothing to send
        params = neg.finish()

    ``leading`` is False for a connection added to an existing session: leading-only keys are
    then neither offered nor accepted (§13, "Use: LO").
    """

    def __init__(
        self,
        role: Role,
        settings: NegotiationSettings,
        *,
        leading: bool = True,
        peer: str | None = None,
        logger: LogTarget | None = None,
    ) -> None:
        if role is Role.INITIATOR:
            if settings.initiator_name is None:
                raise ConfigurationError("InitiatorName is required to log in (RFC 7143 §13.5)")
            if settings.session_type is SessionType.NORMAL and settings.target_name is None:
                raise ConfigurationError(
                    "TargetName is required for a normal session (RFC 7143 §13.4)"
                )
        self._role = role
        self._settings = settings
        self._leading = leading
        self._peer_label = peer
        self._log: LogTarget = logger if logger is not None else _log
        self._prefs = _preferences(settings)
        self._plan = settings.offer if settings.offer is not None else (
            INITIATOR_OFFERS if role is Role.INITIATOR else TARGET_OFFERS
        )
        self._sent: set[str] = set()
        self._awaiting: dict[str, Preference] = {}
        self._optional: dict[str, Preference] = {}
        self._settled: set[str] = set()
        self._answered: set[str] = set()  # the peer's offers we answered
        self._values: dict[str, Value] = {}
        self._declared: dict[str, Value] = {}
        self._peer_declared: dict[str, list[str]] = {}
        self._peer_values: dict[str, Value] = {}
        self._irrelevant: set[str] = set()
        self._rejected: set[str] = set()
        self._not_understood: set[str] = set()
        self._stage = Stage.SECURITY

    # --- introspection -----------------------------------------------------------------------

    @property
    def role(self) -> Role:
        return self._role

    @property
    def awaiting(self) -> frozenset[str]:
        """Keys we offered whose answer is still required."""
        return frozenset(self._awaiting)

    @property
    def complete(self) -> bool:
        """True when no offer of ours awaits a required answer."""
        return not self._awaiting

    @property
    def session_type(self) -> SessionType:
        """Ours as initiator; the initiator's declaration (default Normal) as target."""
        if self._role is Role.INITIATOR:
            return self._settings.session_type
        declared = self._peer_values.get("SessionType", SessionType.NORMAL.value)
        return SessionType(str(declared))

    @property
    def auth_method(self) -> str | None:
        """The negotiated AuthMethod, or None while it is not settled."""
        value = self._values.get("AuthMethod")
        return value if isinstance(value, str) else None

    @property
    def negotiated(self) -> Mapping[str, Value]:
        """Outcomes of negotiated keys settled so far (keys answered Reject/Irrelevant absent)."""
        return dict(self._values)

    @property
    def peer_declarations(self) -> Mapping[str, tuple[str, ...]]:
        """Every declaration the peer made, as sent (repeatable keys may hold several)."""
        return {key: tuple(values) for key, values in self._peer_declared.items()}

    @property
    def rejected(self) -> frozenset[str]:
        """Keys answered ``Reject`` (by either side)."""
        return frozenset(self._rejected)

    @property
    def irrelevant(self) -> frozenset[str]:
        """Keys answered ``Irrelevant`` (by either side)."""
        return frozenset(self._irrelevant)

    @property
    def not_understood(self) -> frozenset[str]:
        """Keys answered ``NotUnderstood`` (by either side)."""
        return frozenset(self._not_understood)

    def has_offers(self, stage: Stage) -> bool:
        """True when :meth:`offer` would return something for ``stage``."""
        return bool(self._pending_offers(stage))

    # --- offering ------------------------------------------------------------------------------

    def offer(self, stage: Stage) -> list[Pair]:
        """Our proposals and declarations for ``stage`` not sent yet; each key is sent once.

        Keys the peer already negotiated, keys irrelevant to this session, leading-only keys on a
        non-leading connection and declarations without a configured value are left out.
        """
        self._enter(stage)
        pairs: list[Pair] = []
        for key in self._pending_offers(stage):
            kd = KEYS[key]
            pref = self._prefs[key]
            assert pref is not None
            wire = kd.format(pref)
            pairs.append((key, wire))
            self._sent.add(key)
            if kd.rule is Rule.DECLARE:
                assert not isinstance(pref, tuple)
                self._declared[key] = pref
            elif kd.answer_required(pref):
                self._awaiting[key] = pref
            else:
                self._optional[key] = pref
            self._log.debug("offer %s=%s", key, wire)
        return pairs

    def _enter(self, stage: Stage) -> None:
        # §6.3: login stages only move forward (security, operational, Full Feature Phase).
        if stage < self._stage:
            raise LocalProtocolError(
                f"negotiation is in the {self._stage.name.lower()} stage; it cannot go back to "
                f"the {stage.name.lower()} stage (RFC 7143 §6.3)"
            )
        self._stage = stage

    def _pending_offers(self, stage: Stage) -> list[str]:
        if stage is Stage.FULL_FEATURE or stage < self._stage:
            return []
        keys: list[str] = []
        for key in self._plan:
            kd = KEYS[key]
            if key in self._sent or key in self._settled:
                continue
            if self._role not in kd.senders or self._prefs.get(key) is None:
                continue
            if kd.phase is Phase.SECURITY and stage is not Stage.SECURITY:
                continue
            if kd.phase is Phase.OPERATIONAL and stage is not Stage.OPERATIONAL:
                continue
            if kd.use is Use.LEADING_ONLY and not self._leading:
                continue
            # §13.4: TargetName is for normal sessions; a discovery session names no target.
            if key == "TargetName" and self.session_type is SessionType.DISCOVERY:
                continue
            if self._is_irrelevant(kd):
                continue
            keys.append(key)
        return keys

    # --- receiving ---------------------------------------------------------------------------

    def receive(self, pairs: Sequence[Pair], stage: Stage) -> Received:
        """Process the peer's keys of one complete text (one logical text data segment).

        Returns the answers we owe and the keys for another module. Raises
        :class:`NegotiationViolation` when the peer broke a rule and :class:`NegotiationFailed`
        when no acceptable outcome exists.
        """
        self._enter(stage)
        answers: list[Pair] = []
        deferred: list[Pair] = []
        # Declarations first (SessionType decides what is irrelevant), FirstBurstLength last
        # (its relevance depends on InitialR2T and ImmediateData, §13.14). sorted() is stable.
        for key, value in sorted(pairs, key=_processing_order):
            kd = KEYS.get(key)
            if kd is None:
                answers.append(self._receive_unknown(key, value))
                continue
            answering = key in self._declared or key in self._awaiting or key in self._optional
            self._check_allowed(kd, stage, answering=answering)
            if kd.rule is Rule.DELEGATE:
                deferred.append((key, value))
            elif kd.rule is Rule.DECLARE:
                self._receive_declaration(kd, value, stage)
            elif key in self._awaiting or key in self._optional:
                self._receive_answer(kd, value)
            elif key in self._answered and value in _RESERVED:
                # tgt answers our answer to its own offer (FirstBurstLength=Irrelevant, when
                # InitialR2T=Yes and ImmediateData=No) with Reject, as if it were an offer.
                # An answer needs no answer (§6.2); the outcome stands, so this is ignored.
                self._log.debug("peer answered our answer %s with %s; ignored", key, value)
            elif key in self._settled:
                raise NegotiationViolation(
                    f"{self._peer()} sent {key}={quoted(value)} after {key} was already "
                    "negotiated; RFC 7143 §6.2 forbids renegotiating a key during login",
                    key=key,
                )
            else:
                answers.append((key, self._answer_offer(kd, value)))
        return Received(tuple(answers), tuple(deferred))

    def _receive_unknown(self, key: str, value: str) -> Pair:
        if value in _RESERVED:
            raise NegotiationViolation(
                f"{self._peer()} answered {key}={value} but we never offered {key}", key=key
            )
        # §6.2: "the answer for a key not understood MUST be key=NotUnderstood".
        self._log.debug("peer offered unknown key %s; answering NotUnderstood", key)
        self._not_understood.add(key)
        return key, Answer.NOT_UNDERSTOOD.value

    def _check_allowed(self, kd: KeyDef, stage: Stage, *, answering: bool) -> None:
        key, peer = kd.name, self._peer()
        # Who may send a key matters for offers and declarations; an answer to one of ours
        # naturally comes from the other side.
        if not answering and self._role.peer not in kd.senders:
            only = "initiator" if Role.INITIATOR in kd.senders else "target"
            raise NegotiationViolation(
                f"{peer} sent {key}, which only the {only} may send ({kd.reference})", key=key
            )
        if stage is Stage.FULL_FEATURE:
            if kd.use not in (Use.ALL, Use.FULL_FEATURE_ONLY):
                raise NegotiationViolation(
                    f"{peer} sent {key} in Full Feature Phase; it may be used only during login "
                    f"({kd.reference})",
                    key=key,
                )
            return
        if kd.use is Use.FULL_FEATURE_ONLY:
            raise NegotiationViolation(
                f"{peer} sent {key} during login; it may be used only in Full Feature Phase "
                f"({kd.reference})",
                key=key,
            )
        if kd.phase is Phase.SECURITY and stage is not Stage.SECURITY:
            raise NegotiationViolation(
                f"{peer} sent the security key {key} in the {stage.name.lower()} stage "
                "(RFC 7143 §6.3.2: security keys belong to the security negotiation stage)",
                key=key,
            )
        if kd.phase is Phase.OPERATIONAL and stage is Stage.SECURITY and kd.negotiated:
            raise NegotiationViolation(
                f"{peer} sent the operational key {key} in the security stage "
                "(RFC 7143 §6.3: operational keys are negotiated in the operational stage)",
                key=key,
            )
        if kd.use is Use.LEADING_ONLY and not self._leading:
            raise NegotiationViolation(
                f"{peer} sent {key} on a connection that does not lead its session; {key} may "
                f"be negotiated on the leading connection only ({kd.reference})",
                key=key,
            )

    def _receive_declaration(self, kd: KeyDef, value: str, stage: Stage) -> None:
        key, peer = kd.name, self._peer()
        if value in _RESERVED:
            if key not in self._declared:
                raise NegotiationViolation(
                    f"{peer} answered {key}={value} but we never sent {key}", key=key
                )
            if value == Answer.NOT_UNDERSTOOD and not is_extension_key(key):
                raise NegotiationViolation(
                    f"{peer} answered our declaration of {key} with NotUnderstood; every "
                    f"RFC 7143 key MUST be supported ({kd.reference}, §6.2)",
                    key=key,
                )
            # Declarations need no answer; a peer that still answers one is ignored.
            self._log.debug("peer answered our declaration %s with %s", key, quoted(value))
            if value == Answer.NOT_UNDERSTOOD:
                self._not_understood.add(key)
            return
        redeclare_allowed = kd.repeatable or (stage is Stage.FULL_FEATURE and kd.use is Use.ALL)
        if key in self._peer_declared and not redeclare_allowed:
            raise NegotiationViolation(
                f"{peer} declared {key} twice; RFC 7143 §6.2 forbids redeclaring a key during "
                "login",
                key=key,
            )
        try:
            parsed = kd.parse(value)
        except TextValueError as exc:
            raise NegotiationViolation(f"{peer} sent a malformed {key}: {exc}", key=key) from exc
        if not kd.admissible(parsed):
            raise NegotiationViolation(
                f"{peer} declared {key}={value}, outside {kd.range_text()} ({kd.reference})",
                key=key,
            )
        self._peer_declared.setdefault(key, []).append(value)
        self._peer_values[key] = parsed
        self._log.debug("peer declared %s=%s", key, quoted(value))

    def _receive_answer(self, kd: KeyDef, value: str) -> None:
        key, peer = kd.name, self._peer()
        pref = self._awaiting.pop(key) if key in self._awaiting else self._optional.pop(key)
        self._settled.add(key)
        ours = kd.format(pref)
        if value == Answer.NOT_UNDERSTOOD:
            if kd.newer_than_rfc3720 or is_extension_key(key):
                # A legacy (RFC 3720) peer: the key keeps its default.
                self._not_understood.add(key)
                return
            raise NegotiationViolation(
                f"{peer} answered {key} with NotUnderstood; every RFC 7143 key MUST be "
                f"supported ({kd.reference}, §6.2)",
                key=key,
            )
        if value == Answer.REJECT:
            self._rejected.add(key)
            if kd.rule is Rule.SELECT:
                self._accept_list_reject(kd, pref)
                return
            raise NegotiationViolation(
                f"{peer} answered {key}={ours} with Reject; our offer was admissible, so it "
                f"must answer with {kd.rule.value} ({kd.reference}, §6.2.2)",
                key=key,
            )
        if value == Answer.IRRELEVANT:
            if self._is_irrelevant(kd):
                self._irrelevant.add(key)
                return
            when = " or ".join(c.value for c in kd.irrelevant_when) or "never"
            raise NegotiationViolation(
                f"{peer} answered {key} with Irrelevant, but {key} is relevant here (it is "
                f"irrelevant only when {when}; {kd.reference})",
                key=key,
            )
        try:
            answer = kd.parse(value)
        except TextValueError as exc:
            raise NegotiationViolation(
                f"{peer} answered our {key}={ours} with a malformed value: {exc}", key=key
            ) from exc
        ok = kd.admissible(answer)
        match kd.rule:
            case Rule.SELECT:
                ok = isinstance(pref, tuple) and answer in pref
            case Rule.MIN:
                ok = ok and isinstance(pref, int) and isinstance(answer, int) and answer <= pref
            case Rule.MAX:
                ok = ok and isinstance(pref, int) and isinstance(answer, int) and answer >= pref
            case Rule.AND:
                ok = pref is not False or answer is False
            case Rule.OR:
                ok = pref is not True or answer is True
            case _:  # pragma: no cover - only negotiated keys are offered with answers
                ok = False
        if not ok:
            within = f", within {kd.range_text()}" if kd.kind is Kind.NUMBER else ""
            # tgt answers None to an offer of CRC32C alone where §6.2.1 says Reject: the
            # same refusal, so the same advice as after a Reject.
            hint = f"; {_digest_hint(key)}" if key in _DIGEST_OPTIONS and answer == "None" else ""
            raise NegotiationViolation(
                f"{peer} answered {key}={value} to our offer {key}={ours}; the outcome must be "
                f"{kd.rule.value}{within} ({kd.reference}){hint}",
                key=key,
            )
        self._values[key] = answer
        self._log.debug("peer answered %s=%s", key, quoted(value))

    def _accept_list_reject(self, kd: KeyDef, offered: Preference) -> None:
        # §6.2: after Reject the key keeps its current value (the default); the offerer decides
        # whether it can live with that.
        key = kd.name
        if kd.default is not None and isinstance(offered, tuple) and kd.default in offered:
            self._log.debug("peer rejected %s; keeping the default %s", key, kd.default)
            return
        if key == "AuthMethod":
            raise NegotiationFailed(
                f"{self._peer()} rejected every authentication method we offered "
                f"({kd.format(offered)}): check the target's authentication settings (does it "
                "require CHAP? are chapIName/chapSecret configured here?)",
                key=key,
            )
        advice = _digest_hint(key) if key in _DIGEST_OPTIONS else f"check the {key} setting"
        raise NegotiationFailed(
            f"{self._peer()} rejected {key}={kd.format(offered)} and the default "
            f"{kd.default} is not acceptable to us: {advice}",
            key=key,
        )

    def _answer_offer(self, kd: KeyDef, value: str) -> str:
        key, peer = kd.name, self._peer()
        if value in _RESERVED:
            raise NegotiationViolation(
                f"{peer} sent {key}={value} but we never offered {key} (RFC 7143 §6.2: "
                "Reject, Irrelevant and NotUnderstood are answers only)",
                key=key,
            )
        self._settled.add(key)
        self._answered.add(key)
        if kd.rule is Rule.OBSOLETE:
            # §13.25: SHOULD answer markers with Reject, MUST answer mark intervals with Reject,
            # MUST NOT answer NotUnderstood.
            self._rejected.add(key)
            return Answer.REJECT.value
        if self._is_irrelevant(kd):
            self._irrelevant.add(key)
            return Answer.IRRELEVANT.value
        pref = self._prefs[key]
        result: Value | None
        if kd.rule is Rule.SELECT:
            # §6.2.1: values we do not understand are ignored; the first acceptable one wins.
            acceptable = pref if isinstance(pref, tuple) else ()
            result = next((v for v in value.split(",") if v in acceptable), None)
        else:
            try:
                theirs = kd.parse(value)
            except TextValueError:
                theirs = None
            result = None if theirs is None else _combine(kd, theirs, pref)
            if key == "FirstBurstLength" and isinstance(result, int):
                # §13.14 integrity rule: keep FirstBurstLength within MaxBurstLength.
                mbl = self._outcome("MaxBurstLength")
                if isinstance(mbl, int) and not isinstance(mbl, bool):
                    result = min(result, mbl)
            if result is not None and not kd.admissible(result):
                result = None
        if result is None:
            # §6.2.2: an inadmissible proposal MAY be answered with Reject.
            self._rejected.add(key)
            self._log.debug("answering %s=%s with Reject", key, quoted(value))
            return Answer.REJECT.value
        self._values[key] = result
        wire = kd.format(result)
        self._log.debug("peer offered %s=%s; answering %s", key, quoted(value), wire)
        return wire

    # --- outcome -------------------------------------------------------------------------------

    def _outcome(self, key: str) -> Value | None:
        """The key's outcome as far as it is known now; None when it is still open.

        A settled key has its negotiated value (or its default after Reject, Irrelevant or
        NotUnderstood). A key we offered, or will offer, is fixed by our own preference when that
        preference decides alone (AND with No, OR with Yes, §6.2.2); otherwise a pending offer is
        open. A key nobody negotiates keeps its RFC default.
        """
        if key in self._values:
            return self._values[key]
        kd = KEYS[key]
        if key in self._settled:
            return kd.default
        pending = key in self._awaiting or key in self._optional
        if pending or (key in self._plan and key not in self._sent):
            pref = self._prefs.get(key)
            if kd.rule is Rule.AND and pref is False:
                return False
            if kd.rule is Rule.OR and pref is True:
                return True
            if pending:
                return None
        return kd.default

    def _is_irrelevant(self, kd: KeyDef) -> bool:
        if (
            Irrelevance.DISCOVERY in kd.irrelevant_when
            and self.session_type is SessionType.DISCOVERY
        ):
            return True
        # §13.14: FirstBurstLength is irrelevant when InitialR2T=Yes and ImmediateData=No.
        return (
            Irrelevance.NO_UNSOLICITED_DATA in kd.irrelevant_when
            and self._outcome("InitialR2T") is True
            and self._outcome("ImmediateData") is False
        )

    def finish(self) -> SessionParameters:
        """The negotiated parameters. May be called again after later Text negotiations.

        Raises :class:`NegotiationViolation` when an offer of ours was never answered (the peer
        ended the negotiation early), :class:`MissingParameter` (target role) when the initiator
        never declared InitiatorName, or TargetName for a normal session, and
        :class:`NegotiationFailed` (target role) when FirstBurstLength ended above MaxBurstLength.
        """
        if self._awaiting:
            keys = ", ".join(sorted(self._awaiting))
            raise NegotiationViolation(
                f"{self._peer()} ended the negotiation without answering {keys} (RFC 7143 §6.2: "
                "every offer needs an answer)",
                key=min(self._awaiting),
            )
        if self._role is Role.TARGET:
            if "InitiatorName" not in self._peer_values:
                raise MissingParameter(
                    "the initiator never declared InitiatorName (RFC 7143 §13.5)",
                    key="InitiatorName",
                )
            if self.session_type is SessionType.NORMAL and "TargetName" not in self._peer_values:
                raise MissingParameter(
                    f"{self._peer()} asked for a normal session without declaring TargetName "
                    "(RFC 7143 §13.4)",
                    key="TargetName",
                )
        max_burst = self._final_int("MaxBurstLength")
        first_burst = self._final_int("FirstBurstLength")
        fbl_relevant = not (
            self._final_bool("InitialR2T") and not self._final_bool("ImmediateData")
        )
        if first_burst > max_burst:
            if self._role is Role.TARGET and fbl_relevant:
                raise NegotiationFailed(
                    f"FirstBurstLength {first_burst} exceeds MaxBurstLength {max_burst} "
                    "(RFC 7143 §13.14 integrity rule)",
                    key="FirstBurstLength",
                )
            # An initiator may clamp: sending less unsolicited data than allowed is always valid.
            first_burst = max_burst
        mrdsl = "MaxRecvDataSegmentLength"
        max_recv = self._declared.get(mrdsl, DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH)
        max_xmit = self._peer_values.get(mrdsl, DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH)
        assert isinstance(max_recv, int) and isinstance(max_xmit, int)
        tag = self._declaration("TargetPortalGroupTag")
        return SessionParameters(
            header_digest=self._final("HeaderDigest") == "CRC32C",
            data_digest=self._final("DataDigest") == "CRC32C",
            max_recv_data_segment_length=max_recv,
            max_xmit_data_segment_length=max_xmit,
            max_burst_length=max_burst,
            first_burst_length=first_burst,
            initial_r2t=self._final_bool("InitialR2T"),
            immediate_data=self._final_bool("ImmediateData"),
            default_time2wait=self._final_int("DefaultTime2Wait"),
            default_time2retain=self._final_int("DefaultTime2Retain"),
            max_outstanding_r2t=self._final_int("MaxOutstandingR2T"),
            data_pdu_in_order=self._final_bool("DataPDUInOrder"),
            data_sequence_in_order=self._final_bool("DataSequenceInOrder"),
            error_recovery_level=self._final_int("ErrorRecoveryLevel"),
            max_connections=self._final_int("MaxConnections"),
            session_type=self.session_type,
            auth_method=str(self._values.get("AuthMethod", "None")),
            task_reporting=str(self._final("TaskReporting")),
            iscsi_protocol_level=self._final_int("iSCSIProtocolLevel"),
            initiator_name=_optional_str(self._declaration("InitiatorName")),
            initiator_alias=_optional_str(self._declaration("InitiatorAlias")),
            target_name=_optional_str(self._declaration("TargetName")),
            target_alias=_optional_str(self._declaration("TargetAlias")),
            target_portal_group_tag=tag if isinstance(tag, int) else None,
        )

    def _final(self, key: str) -> Value:
        value = self._values.get(key, KEYS[key].default)
        assert value is not None
        return value

    def _final_int(self, key: str) -> int:
        value = self._final(key)
        assert isinstance(value, int) and not isinstance(value, bool)
        return value

    def _final_bool(self, key: str) -> bool:
        value = self._final(key)
        assert isinstance(value, bool)
        return value

    def _declaration(self, key: str) -> Value | None:
        """What we declared, else what the peer declared, else what we would declare."""
        if key in self._declared:
            return self._declared[key]
        if key in self._peer_values:
            return self._peer_values[key]
        pref = self._prefs.get(key) if self._role in KEYS[key].senders else None
        return None if isinstance(pref, tuple) else pref

    def _peer(self) -> str:
        if self._peer_label:
            return self._peer_label
        if self._role is Role.INITIATOR:
            name = self._settings.target_name
            return f"target {name}" if name else "the target"
        name_value = self._peer_values.get("InitiatorName")
        return f"initiator {name_value}" if isinstance(name_value, str) else "the initiator"


def _combine(kd: KeyDef, theirs: Value, ours: Preference | None) -> Value | None:
    """The acceptor's selection for a simple-value offer (§6.2.2)."""
    if kd.rule in (Rule.AND, Rule.OR):
        if not isinstance(theirs, bool) or not isinstance(ours, bool):
            return None
        return (theirs and ours) if kd.rule is Rule.AND else (theirs or ours)
    if (
        isinstance(theirs, bool)
        or not isinstance(theirs, int)
        or isinstance(ours, bool)
        or not isinstance(ours, int)
    ):
        return None
    return min(theirs, ours) if kd.rule is Rule.MIN else max(theirs, ours)


def _processing_order(pair: Pair) -> int:
    kd = KEYS.get(pair[0])
    if kd is None:
        return 1
    if kd.rule is Rule.DECLARE:
        return 0
    if Irrelevance.NO_UNSOLICITED_DATA in kd.irrelevant_when:
        return 2
    return 1


def _optional_str(value: Value | None) -> str | None:
    return value if isinstance(value, str) else None


def _preferences(s: NegotiationSettings) -> dict[str, Preference | None]:
    prefs: dict[str, Preference | None] = {
        "HeaderDigest": s.header_digest,
        "DataDigest": s.data_digest,
        "MaxConnections": s.max_connections,
        "InitialR2T": s.initial_r2t,
        "ImmediateData": s.immediate_data,
        "MaxRecvDataSegmentLength": s.max_recv_data_segment_length,
        "MaxBurstLength": s.max_burst_length,
        "FirstBurstLength": s.first_burst_length,
        "DefaultTime2Wait": s.default_time2wait,
        "DefaultTime2Retain": s.default_time2retain,
        "MaxOutstandingR2T": s.max_outstanding_r2t,
        "DataPDUInOrder": s.data_pdu_in_order,
        "DataSequenceInOrder": s.data_sequence_in_order,
        "ErrorRecoveryLevel": s.error_recovery_level,
        "AuthMethod": s.auth_methods,
        "TaskReporting": s.task_reporting,
        "iSCSIProtocolLevel": s.iscsi_protocol_level,
        "SessionType": s.session_type.value,
        "InitiatorName": s.initiator_name,
        "InitiatorAlias": s.initiator_alias,
        "TargetName": s.target_name,
        "TargetAlias": s.target_alias,
        "TargetPortalGroupTag": s.target_portal_group_tag,
        "X#NodeArchitecture": s.node_architecture,
    }
    return prefs

