"""The Login Phase of RFC 7143 (§6), initiator side, sans-I/O.

Theory of operation
-------------------
:class:`LoginMachine` turns a login into a sequence of Login Request PDUs, one per Login
Response received; the transport only moves PDUs. The stages and transitions (§6.3, §8.1.3
connection states S4 "in login"):

====================  =======================================  ==============================
stage (CSG)           we send                                   we move on when
====================  =======================================  ==============================
SecurityNegotiation   InitiatorName, TargetName or               CHAP completed (the target
(only with CHAP       SessionType=Discovery, AuthMethod=CHAP     answered our CHAP_R, and for
credentials)          (alone: a target cannot skip it), then     mutual CHAP its CHAP_R checked)
                      CHAP_A, then CHAP_N/CHAP_R (+ our
                      challenge for mutual CHAP)
LoginOperational      every operational key (:mod:`keys`); the  nothing is outstanding and the
                      first request also the declarations       target sets T with NSG=FFP
                      when there was no security stage
FullFeaturePhase      —                                          —
====================  =======================================  ==============================

Without CHAP credentials the login starts in the operational stage (§6.3), as open-iscsi
does: there is nothing to authenticate, and a reinstatement saves a round trip.

A response with the C bit set is only part of the target's text: we send an empty request to
fetch the rest (§6.5, §11.12.2). A status class other than 0 ends the login: class 1 is a
redirect to another portal (:class:`LoginRedirect`), classes 2 and 3 raise a
:class:`LoginError` whose subclass and message say what a person should check.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from initiator import pdu as P
from initiator.chap import ChapCredentials, ChapInitiator
from initiator.errors import (
    AuthenticationError,
    ConfigurationError,
    ISCSIError,
    RemoteProtocolError,
)
from initiator.keys import (
    KEYS,
    Kind,
    NegotiationSettings,
    Negotiator,
    Role,
    SessionParameters,
    SessionType,
)
from initiator.pdu import Stage
from initiator.printable import quoted
from initiator.text import Pair, TextAssembler, TextFormatError, TextSplitter, encode
from initiator.url import decimal, ipv6_literal

log = logging.getLogger(__name__)

Credentials = ChapCredentials


@dataclass(frozen=True, slots=True)
class Portal:
    """A network portal: host (name, IPv4 or IPv6), TCP port, optional portal group tag."""

    host: str
    port: int = 3260
    tpgt: int | None = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @classmethod
    def parse(cls, text: str, default_port: int = 3260) -> Portal:
        """Parse ``host[:port][,tpgt]`` with IPv6 hosts in brackets (TargetAddress, §13.8)."""
        raw = text.strip()
        tpgt: int | None = None
        addr, comma, tag = raw.rpartition(",")
        if comma and (not addr.startswith("[") or addr.endswith("]") or "]:" in addr):
            raw = addr
            tpgt = decimal(tag)
            if tpgt is None:
                raise ConfigurationError(
                    f"portal {quoted(text)}: portal group tag {quoted(tag)} is not a number")
            if not 0 <= tpgt <= 65535:
                raise ConfigurationError(f"portal {quoted(text)}: portal group tag out of 0..65535")
        port = default_port
        if raw.startswith("["):
            host, bracket, rest = raw[1:].partition("]")
            if not bracket:
                raise ConfigurationError(
                    f"portal {quoted(text)}: IPv6 address lacks its closing ']'")
            if rest:
                if not rest.startswith(":"):
                    raise ConfigurationError(f"portal {quoted(text)}: expected ':port' after ']'")
                port = _port(rest[1:], text)
            # The zone is decoded and its characters checked (the text may be a target's),
            # not looked up: in a TargetAddress it may name the target's interface as well as
            # ours, and connecting to a zone this host lacks fails at once.
            host = ipv6_literal(host, f"portal {quoted(text)}")
        elif raw.count(":") > 1:
            host = raw  # a bare IPv6 address without a port
            try:
                ipaddress.IPv6Address(host.split("%", 1)[0])
            except ValueError:
                raise ConfigurationError(
                    f"portal {quoted(text)}: put IPv6 addresses in brackets, as in [fe80::1]:3260"
                ) from None
            host = ipv6_literal(host, f"portal {quoted(text)}")
        else:
            host, colon, port_text = raw.partition(":")
            if colon:
                port = _port(port_text, text)
            if host:
                _check_host_name(host, text)
        if not host:
            raise ConfigurationError(f"portal {quoted(text)} has no host")
        return cls(host, port, tpgt)


def _check_host_name(host: str, where: str) -> None:
    """Refuse a host name that cannot be looked up at all (the address comes from a target).

    Name resolution encodes the name with IDNA, which fails on an empty label (``a..b``) or
    one longer than 63 characters; spaces and control characters make no DNS name either.
    """
    if any(c.isspace() or not c.isprintable() for c in host):
        raise ConfigurationError(
            f"portal {quoted(where)}: host name {quoted(host)} holds spaces or control characters")
    try:
        encoded = host.encode("idna")
    except UnicodeError as exc:
        reason = str(exc.__cause__ or exc).removeprefix("encoding with 'idna' codec failed ")
        raise ConfigurationError(
            f"portal {quoted(where)}: {quoted(host)} is not a valid host name ({reason})") from None
    if len(encoded) > 253:
        raise ConfigurationError(
            f"portal {quoted(where)}: host name is longer than 253 characters")


def _port(text: str, where: str) -> int:
    # ASCII digits only: int() would take ' 3260', '+3260' or another script's digits from a
    # target's TargetAddress and show a port that was not what it sent.
    port = decimal(text)
    if port is None:
        raise ConfigurationError(f"portal {quoted(where)}: port {quoted(text)} is not a number")
    if not 0 < port < 65536:
        raise ConfigurationError(f"portal {quoted(where)}: port {port} is out of 1..65535")
    return port


class StatusClass(enum.IntEnum):
    """Login status classes (§11.13.5)."""

    SUCCESS = 0
    REDIRECTION = 1
    INITIATOR_ERROR = 2
    TARGET_ERROR = 3


# (class, detail) -> (name, what a person should do). §11.13.5.
LOGIN_STATUS: dict[tuple[int, int], tuple[str, str]] = {
    (0, 0x00): ("success", ""),
    (1, 0x01): ("target moved temporarily", "the login is retried at the new address"),
    (1, 0x02): ("target moved permanently", "update the configured portal to the new address"),
    (2, 0x00): ("initiator error", "check the initiator's settings for this target"),
    (2, 0x01): ("authentication failed",
                "the target requires CHAP, or refused ours: give its CHAP user and secret "
                "(<user>%<secret>@ in a URL, chapIName/chapSecret in the configuration; "
                "target_user=/target_password=, tgtChapName/tgtChapSecret for mutual CHAP)"),
    (2, 0x02): ("authorization failure",
                "the target does not allow this initiator: add the initiator name to the "
                "target's ACL"),
    (2, 0x03): ("target not found",
                "check the target name (IQN); run discovery to list the names the portal "
                "offers"),
    (2, 0x04): ("target removed", "the target no longer exists at this portal"),
    (2, 0x05): ("unsupported iSCSI version", "the target does not speak RFC 7143 version 0"),
    (2, 0x06): ("too many connections", "the target refuses more connections on this session"),
    (2, 0x07): ("missing parameter", "the target requires a key the initiator did not send"),
    (2, 0x08): ("can't include in session", "the target cannot add this connection"),
    (2, 0x09): ("session type not supported",
                "the target does not support this session type (discovery or normal)"),
    (2, 0x0A): ("session does not exist", "the session to add to does not exist any more"),
    (2, 0x0B): ("invalid request during login", "a protocol error during login"),
    (3, 0x00): ("target error", "the target failed; try again later or check its logs"),
    (3, 0x01): ("service unavailable", "the target is temporarily unavailable; try again later"),
    (3, 0x02): ("out of resources", "the target is out of resources; try again later"),
}


class LoginError(ISCSIError):
    """The target ended the login with a non-zero status (or the login broke the rules)."""

    def __init__(self, message: str, *, status_class: int = -1, status_detail: int = -1,
                 target: str = "") -> None:
        super().__init__(message)
        self.status_class = status_class
        self.status_detail = status_detail
        self.target = target

    @property
    def retryable(self) -> bool:
        """Whether trying again later may succeed (target-side trouble)."""
        return self.status_class == StatusClass.TARGET_ERROR or (
            self.status_class == StatusClass.INITIATOR_ERROR
            and self.status_detail in (0x06, 0x08, 0x0A))


class LoginAuthenticationError(LoginError, AuthenticationError):
    """Authentication failed: status 0x0201, or the target's CHAP answer was wrong."""


class LoginAuthorizationError(LoginError):
    """Status 0x0202: the target does not allow this initiator."""


class TargetNotFoundError(LoginError):
    """Status 0x0203 or 0x0204: no such target at this portal."""


_ERROR_CLASSES: dict[tuple[int, int], type[LoginError]] = {
    (2, 0x01): LoginAuthenticationError,
    (2, 0x02): LoginAuthorizationError,
    (2, 0x03): TargetNotFoundError,
    (2, 0x04): TargetNotFoundError,
}


def login_error(status_class: int, status_detail: int, target: str, portal: str) -> LoginError:
    """The typed error for a Login Response status, with a sentence a person can act on."""
    name, advice = LOGIN_STATUS.get(
        (status_class, status_detail),
        (f"status class {status_class} detail 0x{status_detail:02x}",
         "see RFC 7143 §11.13.5 and the target's logs"))
    cls = _ERROR_CLASSES.get((status_class, status_detail), LoginError)
    what = f"target {target}" if target else "discovery"
    message = (f"login to {what} at {portal} failed: {name} "
               f"(status 0x{status_class:02x}{status_detail:02x})")
    if advice:
        message += f"; {advice}"
    return cls(message, status_class=status_class, status_detail=status_detail, target=target)


# --------------------------------------------------------------------------------------------
# Outcomes


@dataclass(frozen=True, slots=True)
class LoginSuccess:
    """The login reached Full Feature Phase."""

    parameters: SessionParameters
    tsih: int
    cmd_sn: int
    """The CmdSN of the first command to send (login requests do not consume one)."""
    exp_stat_sn: int
    exp_cmd_sn: int
    max_cmd_sn: int


@dataclass(frozen=True, slots=True)
class LoginRedirect:
    """Status class 1: log in at ``portal`` instead (§11.13.5, TargetAddress)."""

    portal: Portal
    permanent: bool


# open-iscsi declares a smaller MaxRecvDataSegmentLength on discovery sessions.
DISCOVERY_MAX_RECV_DATA_SEGMENT_LENGTH = 32768
# Before the target declares its own, it accepts 8192 bytes per PDU (§13.12).
LOGIN_SEGMENT_LENGTH = 8192

_SETTING_OF_KEY: dict[str, str] = {
    "MaxRecvDataSegmentLength": "max_recv_data_segment_length",
    "MaxBurstLength": "max_burst_length",
    "FirstBurstLength": "first_burst_length",
    "InitialR2T": "initial_r2t",
    "ImmediateData": "immediate_data",
    "DefaultTime2Wait": "default_time2wait",
    "DefaultTime2Retain": "default_time2retain",
    "MaxConnections": "max_connections",
    "MaxOutstandingR2T": "max_outstanding_r2t",
    "ErrorRecoveryLevel": "error_recovery_level",
    "DataPDUInOrder": "data_pdu_in_order",
    "DataSequenceInOrder": "data_sequence_in_order",
}


def negotiation_settings(
    *,
    initiator_name: str,
    initiator_alias: str | None = None,
    target_name: str | None,
    chap: bool,
    header_digest: str = "None",
    data_digest: str = "None",
    overrides: Mapping[str, str] | None = None,
) -> NegotiationSettings:
    """Our offers: open-iscsi's defaults, the digests asked for, then per-key overrides.

    ``header_digest``/``data_digest`` are the key values to offer, in preference order:
    ``None``, ``CRC32C``, ``CRC32C,None`` or ``None,CRC32C``. ``overrides`` maps key names
    (``MaxBurstLength``, ``ImmediateData`` ...) to values as written in a configuration file;
    a bad name or value raises ``ConfigurationError``.
    """
    values: dict[str, object] = {
        "initiator_name": initiator_name,
        "initiator_alias": initiator_alias,
        "target_name": target_name,
        "session_type": SessionType.DISCOVERY if target_name is None else SessionType.NORMAL,
        # With credentials only CHAP is offered: a target must not be able to skip it.
        "auth_methods": ("CHAP",) if chap else ("None",),
        "header_digest": _digest_offer(header_digest, "HeaderDigest"),
        "data_digest": _digest_offer(data_digest, "DataDigest"),
    }
    if target_name is None:
        values["max_recv_data_segment_length"] = DISCOVERY_MAX_RECV_DATA_SEGMENT_LENGTH
    for key, text in (overrides or {}).items():
        setting = _SETTING_OF_KEY.get(key)
        if setting is None:
            known = ", ".join(sorted(_SETTING_OF_KEY))
            raise ConfigurationError(f"{key} cannot be set; the negotiable keys are: {known}")
        kd = KEYS[key]
        if kd.kind is Kind.BOOLEAN:
            if text.strip().lower() in ("yes", "on", "true", "1"):
                values[setting] = True
            elif text.strip().lower() in ("no", "off", "false", "0"):
                values[setting] = False
            else:
                raise ConfigurationError(f"{key} = {text!r}: expected Yes or No")
        else:
            try:
                values[setting] = int(text.strip(), 0)
            except ValueError:
                raise ConfigurationError(f"{key} = {text!r}: expected a number") from None
    if "max_burst_length" in values and "first_burst_length" not in values:
        values["first_burst_length"] = min(262144, int(str(values["max_burst_length"])))
    return dataclasses.replace(NegotiationSettings(), **values)  # type: ignore[arg-type]


def _digest_offer(text: str, key: str) -> tuple[str, ...]:
    choices = {"none": "None", "crc32c": "CRC32C"}
    offer: list[str] = []
    for item in text.replace(" ", "").split(","):
        value = choices.get(item.lower())
        if value is None or value in offer:
            raise ConfigurationError(
                f"{key} = {text!r}: expected None, CRC32C, CRC32C,None or None,CRC32C")
        offer.append(value)
    return tuple(offer)


class LoginMachine:
    """One connection's login, initiator side, sans-I/O. See the module docstring.

    ``start()`` gives the first Login Request; ``receive(response)`` gives the next request,
    or the outcome (:class:`LoginSuccess` / :class:`LoginRedirect`), or raises.
    """

    def __init__(
        self,
        *,
        initiator_name: str,
        target_name: str | None,
        isid: int,
        tsih: int = 0,
        cid: int = 0,
        cmd_sn: int = 0,
        itt: int = 0,
        initiator_alias: str | None = None,
        credentials: ChapCredentials | None = None,
        header_digest: str = "None",
        data_digest: str = "None",
        overrides: Mapping[str, str] | None = None,
        portal: Portal | str = "",
        settings: NegotiationSettings | None = None,
        chap: ChapInitiator | None = None,
    ) -> None:
        self.target_name = target_name
        self.portal = str(portal)
        self.label = f"{target_name or 'discovery'} at {self.portal}" if self.portal else (
            target_name or "discovery")
        if settings is None:
            settings = negotiation_settings(
                initiator_name=initiator_name, initiator_alias=initiator_alias,
                target_name=target_name, chap=credentials is not None,
                header_digest=header_digest, data_digest=data_digest, overrides=overrides)
        self.negotiator = Negotiator(Role.INITIATOR, settings, peer=self.label)
        self.chap = chap if chap is not None else (
            ChapInitiator(credentials, target=target_name or self.label)
            if credentials is not None else None)
        self.isid = isid
        self.tsih = tsih
        self.cid = cid
        self.cmd_sn = cmd_sn
        self.itt = itt
        self.exp_stat_sn = 0
        self.exp_cmd_sn = cmd_sn
        self.max_cmd_sn = cmd_sn
        self.stage = Stage.SECURITY
        self._assembler = TextAssembler()
        self._outgoing: TextSplitter | None = None
        self._transit = False
        self._nsg = Stage.SECURITY
        self._first_response = True
        self._started = False

    # -- building requests -----------------------------------------------------------------

    def start(self) -> P.LoginRequest:
        """The first Login Request: with CHAP the security stage's keys; without, the
        operational stage's, with the declarations (InitiatorName, TargetName, ...)."""
        if self._started:
            raise RemoteProtocolError("login already started")
        self._started = True
        if self.chap is None:
            # Nothing to authenticate: skip the security stage (RFC 7143 §6.3: the login may
            # start in the operational stage), as open-iscsi does. That is one round trip
            # less per login, which a session reinstatement pays while commands wait. A
            # target that requires authentication refuses it (status 0201).
            self.stage = self._nsg = Stage.OPERATIONAL
            return self._operational_offer([])
        pairs = self.negotiator.offer(Stage.SECURITY)
        return self._request(pairs, transit=False, nsg=Stage.OPERATIONAL)

    def _request(self, pairs: list[Pair], *, transit: bool, nsg: Stage) -> P.LoginRequest:
        self._transit = transit
        self._nsg = nsg
        text = encode(pairs)
        self._outgoing = TextSplitter(text, LOGIN_SEGMENT_LENGTH)
        return self._next_piece()

    def _next_piece(self) -> P.LoginRequest:
        assert self._outgoing is not None
        piece = self._outgoing.next_segment()
        # The T bit may only be set on the last piece of a text (§11.12.2).
        transit = self._transit and not piece.more
        return P.LoginRequest(
            transit=transit, cont=piece.more, csg=self.stage, nsg=self._nsg,
            version_max=0, version_min=0, isid=self.isid, tsih=self.tsih, itt=self.itt,
            cid=self.cid, cmd_sn=self.cmd_sn, exp_stat_sn=self.exp_stat_sn, data=piece.data)

    def _empty_request(self) -> P.LoginRequest:
        """Ask for the rest of a text the target split with the C bit (§6.5)."""
        return P.LoginRequest(
            transit=False, cont=False, csg=self.stage, nsg=self.stage,
            isid=self.isid, tsih=self.tsih, itt=self.itt, cid=self.cid, cmd_sn=self.cmd_sn,
            exp_stat_sn=self.exp_stat_sn)

    # -- receiving responses ---------------------------------------------------------------

    def receive(self, response: P.PDU) -> P.LoginRequest | LoginSuccess | LoginRedirect:
        """Process one Login Response; see the class docstring."""
        if not isinstance(response, P.LoginResponse):
            raise RemoteProtocolError(
                f"target {self.label} sent a {type(response).__name__} during login, where "
                "only Login Responses may come (RFC 7143 §6)")
        if response.status_class != StatusClass.SUCCESS:
            # Checked before the header: targets rejecting a login (tgtd for an unknown
            # target name) do not always echo the ISID.
            return self._status(response)
        self._check_header(response)
        if self._outgoing is not None and not self._outgoing.done:
            # Our text was split: the target acknowledges each piece with an empty response.
            return self._next_piece()
        try:
            pairs = self._assembler.feed(response.data, response.cont)
        except TextFormatError as exc:
            # The text module names what is wrong, not who sent it: a duplicate key or a value
            # that is no UTF-8 is the target's fault, not a problem of ours to look for.
            raise TextFormatError(
                f"target {self.label} sent a Login Response whose text is malformed: {exc}"
            ) from None
        if pairs is None:
            return self._empty_request()
        if self.stage is Stage.SECURITY:
            return self._security(response, pairs)
        return self._operational(response, pairs)

    def _check_header(self, r: P.LoginResponse) -> None:
        if r.itt != self.itt or r.isid != self.isid:
            raise RemoteProtocolError(
                f"target {self.label} answered a login that is not ours (ITT 0x{r.itt:08x}, "
                f"ISID 0x{r.isid:012x})")
        if r.status_class == StatusClass.SUCCESS and r.version_active != 0:
            raise LoginError(
                f"target {self.label} selected iSCSI version {r.version_active}; only version "
                "0 (RFC 7143) exists", status_class=2, status_detail=5, target=self.label)
        if r.status_class == StatusClass.SUCCESS and r.csg != self.stage:
            raise RemoteProtocolError(
                f"target {self.label} answered in login stage {r.csg.name} while we are in "
                f"{self.stage.name}")
        if r.status_class == StatusClass.SUCCESS and r.transit and (
                not self._transit or r.nsg > self._nsg or r.nsg <= r.csg):
            raise RemoteProtocolError(
                f"target {self.label} moved the login to stage {r.nsg.name}, which we did not "
                "ask for (RFC 7143 §6.3)")
        if r.transit and r.cont:
            raise RemoteProtocolError(
                f"target {self.label} set both T and C in a Login Response (§11.13.2)")
        # The first response's StatSN starts the connection's status numbering (§11.13.4).
        self.exp_stat_sn = (r.stat_sn + 1) & 0xFFFFFFFF
        self.exp_cmd_sn = r.exp_cmd_sn
        self.max_cmd_sn = r.max_cmd_sn
        self._first_response = False

    def _status(self, r: P.LoginResponse) -> LoginRedirect:
        if r.status_class == StatusClass.REDIRECTION and r.status_detail in (1, 2):
            try:
                pairs = self._assembler.feed(r.data, False) or []
            except ISCSIError:
                pairs = []
            address = dict(pairs).get("TargetAddress")
            if not address:
                raise LoginError(
                    f"target {self.label} redirected the login without a TargetAddress",
                    status_class=r.status_class, status_detail=r.status_detail,
                    target=self.label)
            try:
                portal = Portal.parse(address)
            except ConfigurationError as exc:
                raise LoginError(
                    f"target {self.label} redirected the login to {quoted(address)}, which is not "
                    f"a portal address: {exc}", status_class=r.status_class,
                    status_detail=r.status_detail, target=self.label) from None
            return LoginRedirect(portal, permanent=r.status_detail == 2)
        if (r.status_class, r.status_detail) == (2, 1) and self.chap is not None and \
                self.chap.responded:
            # Only once our CHAP response is out can it be what the target refused.
            try:
                self.chap.login_rejected()
            except AuthenticationError as exc:
                raise LoginAuthenticationError(
                    f"login to {self.label} failed: {exc}", status_class=2, status_detail=1,
                    target=self.label) from None
        raise login_error(r.status_class, r.status_detail, self.target_name or "",
                          self.portal or self.label)

    def _security(self, r: P.LoginResponse, pairs: list[Pair]) -> P.LoginRequest | LoginSuccess:
        got = self.negotiator.receive(pairs, Stage.SECURITY)
        answers = list(got.answers)
        method = self.negotiator.auth_method
        chap = self.chap
        if chap is not None:
            if method is not None and method != "CHAP":
                raise LoginAuthenticationError(
                    f"target {self.label} chose AuthMethod={quoted(method)}, but CHAP credentials "
                    "are configured: refusing to log in without CHAP (so that no impostor can pose "
                    "as the target); require CHAP for this initiator on the target, or remove "
                    "the credentials from the URL or configuration",
                    status_class=2, status_detail=1, target=self.label)
            if method == "CHAP" and not chap.done:
                if got.deferred or self._chap_started:
                    # Once CHAP has started every response must carry its next step: a target
                    # that answers our CHAP_A or our mutual challenge with nothing would
                    # otherwise keep us exchanging empty requests forever. ChapInitiator
                    # names the keys that are missing.
                    answers += chap.receive(got.deferred)
                else:
                    answers += chap.start()
                    self._chap_started = True
        elif got.deferred:
            raise RemoteProtocolError(
                f"target {self.label} sent CHAP keys although no authentication was agreed")
        if r.transit:
            if chap is not None:
                chap.check_complete()
            self.stage = r.nsg
            if self.stage is Stage.FULL_FEATURE:
                return self._success(r)
            return self._operational_offer(answers)
        # Still authenticating: ask to move on once we have said all we have to say, as
        # RFC 7143 Appendix B.1, open-iscsi and libiscsi do: for mutual CHAP that is with our
        # CHAP_R and challenge (the target answers with T=1 and its CHAP_R, checked above
        # before we leave the stage). tgt refuses a later, empty transit request (0x0200).
        ready = chap is None or chap.done or chap.responded or method == "None"
        if ready and not answers and not self._transit:
            return self._request([], transit=True, nsg=Stage.OPERATIONAL)
        return self._request(answers, transit=ready, nsg=Stage.OPERATIONAL)

    _chap_started = False

    def _operational_offer(self, answers: list[Pair]) -> P.LoginRequest:
        pairs = answers + self.negotiator.offer(Stage.OPERATIONAL)
        return self._request(pairs, transit=True, nsg=Stage.FULL_FEATURE)

    def _operational(self, r: P.LoginResponse, pairs: list[Pair]
                     ) -> P.LoginRequest | LoginSuccess:
        got = self.negotiator.receive(pairs, Stage.OPERATIONAL)
        if got.deferred:
            raise RemoteProtocolError(
                f"target {self.label} sent {', '.join(k for k, _ in got.deferred)} in the "
                "operational stage")
        if r.transit and r.nsg is Stage.FULL_FEATURE:
            if got.answers:
                raise RemoteProtocolError(
                    f"target {self.label} ended the login while offering "
                    f"{', '.join(k for k, _ in got.answers)}, which we could not answer")
            return self._success(r)
        return self._operational_offer(list(got.answers))

    def _success(self, r: P.LoginResponse) -> LoginSuccess:
        if r.tsih == 0:
            raise RemoteProtocolError(
                f"target {self.label} completed the login without assigning a TSIH (§11.13.3)")
        if 0 < (r.exp_cmd_sn - self.cmd_sn) & 0xFFFFFFFF < 0x80000000:
            # It would take our first commands (CmdSN from ours up) for duplicates and drop
            # them (§4.2.2.1): they would only time out, one after the other.
            raise RemoteProtocolError(
                f"target {self.label} completed the login expecting CmdSN {r.exp_cmd_sn}, "
                f"beyond the {self.cmd_sn} of our Login Request: it counts commands we never "
                "sent (RFC 7143 §4.2.2.1)")
        if self.chap is not None:
            self.chap.check_complete()
        params = self.negotiator.finish()
        self.tsih = r.tsih
        log.debug("login to %s complete: %s", self.label, params)
        return LoginSuccess(parameters=params, tsih=r.tsih, cmd_sn=self.cmd_sn,
                            exp_stat_sn=self.exp_stat_sn, exp_cmd_sn=r.exp_cmd_sn,
                            max_cmd_sn=r.max_cmd_sn)
