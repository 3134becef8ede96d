"""CHAP authentication for iSCSI login (RFC 7143 §12.1.3, RFC 1994), both roles, sans-I/O.

Theory of operation
-------------------
Once both sides agreed on ``AuthMethod=CHAP`` (negotiated by :mod:`initiator.keys`), the security
stage carries this exchange (§12.1.3)::

    I->T  CHAP_A=<A1,A2,...>                      algorithms, most preferred first
    T->I  CHAP_A=<A>  CHAP_I=<I>  CHAP_C=<C>      the chosen algorithm, identifier, challenge
    I->T  CHAP_N=<N>  CHAP_R=<R>                  our name and response
          [CHAP_I=<I'>  CHAP_C=<C'>]              mutual CHAP: our own challenge
    T->I  [CHAP_N=<N'>  CHAP_R=<R'>]              mutual CHAP: the target's answer

with R = H(I || secret || C) (RFC 1994 §4.1): one identifier octet, the shared secret, then the
challenge, hashed with the chosen algorithm. C and R are binary values sent as hex (``0x...``)
or base64 (``0b...``); both are accepted on input. The algorithm numbers are those of the IANA
"PPP Authentication Algorithms" registry: 5 = MD5 (RFC 1994), 6 = SHA-1, 7 = SHA-256,
8 = SHA3-256, the values open-iscsi (usr/auth.h), libiscsi (include/iscsi.h) and the Linux target
use. Each algorithm is one small class in a registry; challenges are as long as the algorithm's
digest, as open-iscsi makes them.

:class:`ChapInitiator` and :class:`ChapTarget` are state machines fed with the CHAP_* keys the
negotiator deferred to them; they return the keys to send. They enforce the rules of §12.1.3 and
§9.2.1: a challenge reflected back at its sender is refused, a response equal to the one the
receiver itself would compute (the same secret used in both directions) is refused, secrets for
the two directions must differ, a mutual CHAP name must match, an algorithm must be one that was
offered, and every value must be well formed and of the right length. Failures raise
``AuthenticationError`` subclasses worded for the person who has to fix something, and they
name the side at fault: :class:`ChapProtocolError` when the peer broke the protocol (malformed
or missing keys, a wrong CHAP_I, an algorithm that was not offered, a reflected challenge: no
secret of ours can fix that), :class:`MutualAuthenticationError` when the target failed to
prove itself in mutual CHAP (check tgtChapName/tgtChapSecret), and a plain
``AuthenticationError`` for a configuration with no common ground (no common algorithm). A
wrong secret of ours shows as the target's status 0x0201 (:meth:`ChapInitiator.login_rejected`).

Secrets live in :class:`Secret`, whose ``repr`` and ``str`` are redacted; they never appear in an
exception, a repr or a log line. Responses and challenges are not logged either.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Final, NoReturn

from initiator.errors import (
    AuthenticationError,
    ConfigurationError,
    LocalProtocolError,
    RemoteProtocolError,
)
from initiator.printable import quoted
from initiator.text import (
    MAX_BINARY_VALUE_LENGTH,
    MAX_SIMPLE_VALUE_LENGTH,
    Answer,
    BinaryEncoding,
    Pair,
    TextValueError,
    format_binary,
    is_utf8,
    parse_binary,
    parse_number,
)

if TYPE_CHECKING:
    LogTarget = logging.Logger | logging.LoggerAdapter[Any]

__all__ = [
    "DEFAULT_ALGORITHMS",
    "DEFAULT_OFFER",
    "ChapAccount",
    "ChapAlgorithm",
    "ChapCredentials",
    "ChapHash",
    "ChapInitiator",
    "ChapProtocolError",
    "ChapTarget",
    "MutualAuthenticationError",
    "Secret",
    "available_algorithms",
    "chap_hash",
    "chap_response",
    "check_chap_name",
    "register",
]

_log = logging.getLogger(__name__)


class ChapProtocolError(AuthenticationError, RemoteProtocolError):
    """The peer's CHAP keys are malformed or out of sequence (as opposed to a wrong secret):
    a fault of the peer's CHAP implementation that no name or secret of ours can fix."""


class MutualAuthenticationError(AuthenticationError):
    """Mutual CHAP: the target failed to prove itself (its name or its answer to our challenge
    is wrong). What to check is the target's credentials (tgtChapName/tgtChapSecret), not
    ours: the target accepted ours."""


# --- secrets and credentials ---------------------------------------------------------------


class Secret:
    """A CHAP secret. Its ``repr``/``str`` never show it; :meth:`reveal` is the only way out."""

    __slots__ = ("_value",)

    def __init__(self, value: str | bytes) -> None:
        raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        if not raw:
            raise ConfigurationError("a CHAP secret must not be empty")
        self._value = raw

    def reveal(self) -> bytes:
        """The secret's bytes, for hashing."""
        return self._value

    def __len__(self) -> int:
        return len(self._value)

    def __repr__(self) -> str:
        return "Secret('<redacted>')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> NoReturn:
        # Keeps secrets out of pickles (caches, multiprocessing queues, crash dumps).
        raise TypeError("CHAP secrets cannot be pickled")


@dataclass(frozen=True, slots=True)
class ChapAccount:
    """One CHAP name and its secret (chapIName/chapSecret, or tgtChapName/tgtChapSecret)."""

    name: str
    secret: Secret

    def __post_init__(self) -> None:
        if not isinstance(self.secret, Secret):
            raise ConfigurationError("a CHAP secret must be given as a Secret")
        check_chap_name(self.name)


def check_chap_name(name: str) -> None:
    """Raise ConfigurationError unless ``name`` can be sent as CHAP_N: a non-empty simple
    value of UTF-8 text without NUL (RFC 7143 §6.1, §12.1.3)."""
    if not name:
        raise ConfigurationError("a CHAP name must not be empty")
    if "\0" in name or not is_utf8(name) or len(name.encode("utf-8")) > MAX_SIMPLE_VALUE_LENGTH:
        raise ConfigurationError(
            f"CHAP name {name!r} must be at most {MAX_SIMPLE_VALUE_LENGTH} bytes of UTF-8 "
            "text without NUL"
        )


@dataclass(frozen=True, slots=True)
class ChapCredentials:
    """CHAP configuration of one initiator-target pair, as both ends configure it.

    ``initiator`` is what the initiator proves (iscsi.conf chapIName/chapSecret); ``target``,
    when set, asks for mutual CHAP: what the target proves (tgtChapName/tgtChapSecret).
    """

    initiator: ChapAccount
    target: ChapAccount | None = None
    # Defined below; a factory defers the lookup.
    algorithms: tuple[ChapAlgorithm, ...] = field(default_factory=lambda: DEFAULT_OFFER)
    """The CHAP_A offer, most preferred first (open-iscsi's ``chap_algs``); MD5 alone by
    default (:data:`DEFAULT_OFFER` says why)."""
    settings: str = field(default="chapSecret / chapIName for this target (<user>%<secret>@ "
                          "in a URL)", compare=False)
    """The settings a person gave these in, for a message when the target rejects them
    (:class:`initiator.credentials.ChapSource` knows the place)."""

    def __post_init__(self) -> None:
        # §9.2.1: a secret used to authenticate initiators MUST NOT authenticate targets.
        if self.target is not None and self.target.secret == self.initiator.secret:
            raise ConfigurationError(
                "chapSecret and tgtChapSecret are identical; RFC 7143 §9.2.1 forbids using one "
                "CHAP secret in both directions: give the target its own secret"
            )

    @property
    def mutual(self) -> bool:
        return self.target is not None


# --- algorithms ----------------------------------------------------------------------------


class ChapAlgorithm(enum.IntEnum):
    """CHAP_A values (IANA PPP Authentication Algorithms; RFC 1994 for MD5)."""

    MD5 = 5
    SHA1 = 6
    SHA256 = 7
    SHA3_256 = 8


class ChapHash:
    """One CHAP algorithm: R = H(identifier || secret || challenge) (RFC 1994 §4.1)."""

    algorithm: ClassVar[ChapAlgorithm]
    label: ClassVar[str]
    hashlib_name: ClassVar[str]
    digest_size: ClassVar[int]

    @classmethod
    def available(cls) -> bool:
        """False when the local crypto library refuses the hash (e.g. MD5 under FIPS)."""
        try:
            hashlib.new(cls.hashlib_name)
        except ValueError:
            return False
        return True

    @classmethod
    def response(cls, identifier: int, secret: bytes, challenge: bytes) -> bytes:
        if not 0 <= identifier <= 255:
            raise LocalProtocolError(f"a CHAP identifier is one octet, not {identifier}")
        digest = hashlib.new(cls.hashlib_name)
        digest.update(bytes((identifier,)))
        digest.update(secret)
        digest.update(challenge)
        return digest.digest()


_REGISTRY: dict[ChapAlgorithm, type[ChapHash]] = {}


def register(cls: type[ChapHash]) -> type[ChapHash]:
    """Class decorator: make ``cls`` the implementation of ``cls.algorithm``."""
    _REGISTRY[cls.algorithm] = cls
    return cls


@register
class Md5Chap(ChapHash):
    algorithm = ChapAlgorithm.MD5
    label = "MD5"
    hashlib_name = "md5"
    digest_size = 16


@register
class Sha1Chap(ChapHash):
    algorithm = ChapAlgorithm.SHA1
    label = "SHA-1"
    hashlib_name = "sha1"
    digest_size = 20


@register
class Sha256Chap(ChapHash):
    algorithm = ChapAlgorithm.SHA256
    label = "SHA-256"
    hashlib_name = "sha256"
    digest_size = 32


@register
class Sha3_256Chap(ChapHash):  # noqa: N801 - the algorithm's own name
    algorithm = ChapAlgorithm.SHA3_256
    label = "SHA3-256"
    hashlib_name = "sha3_256"
    digest_size = 32


DEFAULT_ALGORITHMS: Final = (
    ChapAlgorithm.SHA3_256,
    ChapAlgorithm.SHA256,
    ChapAlgorithm.SHA1,
    ChapAlgorithm.MD5,
)
"""Strongest first, as open-iscsi's iscsid.conf lists them. MD5 stays last: RFC 7143 §12.1.3
says initiators MUST always offer it, for interoperability."""

DEFAULT_OFFER: Final[tuple[ChapAlgorithm, ...]] = (ChapAlgorithm.MD5,)
"""What an initiator offers unless configured otherwise: MD5 alone, open-iscsi's default
(iscsid.conf ``node.session.auth.chap_algs``). Offering the stronger ones by default breaks
logins to deployed targets: tgt (1.0.85 and earlier) takes CHAP_A=7 for SHA-1 rather than
SHA-256 and fails the login (open-iscsi issue #192), and Linux before 3.15 refuses any CHAP_A
list that does not start with 5 (open-iscsi issue #180)."""


def chap_hash(algorithm: ChapAlgorithm | int) -> type[ChapHash]:
    """The implementation of ``algorithm``; ``KeyError`` when none is registered."""
    return _REGISTRY[ChapAlgorithm(algorithm)]


def available_algorithms() -> tuple[ChapAlgorithm, ...]:
    """Registered algorithms the local crypto library provides, strongest first."""
    order = {alg: i for i, alg in enumerate(DEFAULT_ALGORITHMS)}
    usable = [alg for alg, cls in _REGISTRY.items() if cls.available()]
    return tuple(sorted(usable, key=lambda alg: order.get(alg, -1)))


def chap_response(
    algorithm: ChapAlgorithm | int, identifier: int, secret: Secret | bytes, challenge: bytes
) -> bytes:
    """H(identifier || secret || challenge) with ``algorithm`` (RFC 1994 §4.1)."""
    raw = secret.reveal() if isinstance(secret, Secret) else secret
    return chap_hash(algorithm).response(identifier, raw, challenge)


def _usable_algorithms(algorithms: Sequence[ChapAlgorithm | int]) -> tuple[ChapAlgorithm, ...]:
    chosen: list[ChapAlgorithm] = []
    for alg in algorithms:
        try:
            member = ChapAlgorithm(alg)
        except ValueError:
            raise ConfigurationError(
                f"unknown CHAP algorithm {alg}; known: "
                + ", ".join(f"{a.value} ({chap_hash(a).label})" for a in _REGISTRY)
            ) from None
        if member in chosen:
            raise ConfigurationError(f"CHAP algorithm {chap_hash(member).label} is listed twice")
        if member in _REGISTRY and chap_hash(member).available():
            chosen.append(member)
        else:
            _log.warning("CHAP algorithm %s is not available here; not offering it", member.name)
    if not chosen:
        raise ConfigurationError(
            "none of the configured CHAP algorithms is available in this Python's crypto library"
        )
    return tuple(chosen)


def _challenge_length(length: int | None) -> int | None:
    if length is not None and not 1 <= length <= MAX_BINARY_VALUE_LENGTH:
        raise ConfigurationError(
            f"CHAP challenge length {length} is out of range: 1 to {MAX_BINARY_VALUE_LENGTH} "
            "bytes (RFC 7143 §12.1.3)"
        )
    return length


class _State(enum.Enum):
    START = "start"
    ALGORITHMS_SENT = "algorithms sent"
    CHALLENGED = "challenge sent"
    RESPONSE_SENT = "response sent"
    DONE = "done"
    FAILED = "failed"


RandomBytes = Callable[[int], bytes]


# --- initiator -----------------------------------------------------------------------------


class ChapInitiator:
    """The initiator's side of CHAP.

    ``start()`` gives the CHAP_A offer; ``receive(pairs)`` takes the target's CHAP_* keys and
    returns ours; ``done`` becomes True once we have answered (one-way CHAP) or verified the
    target (mutual CHAP). ``target`` names the target in error messages. ``algorithms``, when
    given, replaces the credentials' CHAP_A offer. ``random_bytes`` is the source of
    identifiers and challenges (``secrets.token_bytes``; tests inject their own).
    """

    def __init__(
        self,
        credentials: ChapCredentials,
        *,
        target: str = "the target",
        algorithms: Sequence[ChapAlgorithm | int] | None = None,
        encoding: BinaryEncoding = BinaryEncoding.HEX,
        challenge_length: int | None = None,
        random_bytes: RandomBytes = secrets.token_bytes,
        logger: LogTarget | None = None,
    ) -> None:
        self._credentials = credentials
        self._target = target
        self._algorithms = _usable_algorithms(
            credentials.algorithms if algorithms is None else algorithms)
        self._encoding = encoding
        self._challenge_length = _challenge_length(challenge_length)
        self._random = random_bytes
        self._log: LogTarget = logger if logger is not None else _log
        self._state = _State.START
        self._algorithm: ChapAlgorithm | None = None
        self._identifier = 0
        self._challenge = b""

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    @property
    def responded(self) -> bool:
        """Our CHAP_R (and, for mutual CHAP, our challenge) is sent: we have nothing more to
        say, though mutual CHAP still waits for the target's answer."""
        return self._state in (_State.RESPONSE_SENT, _State.DONE)

    @property
    def algorithm(self) -> ChapAlgorithm | None:
        """The algorithm the target chose, once it did."""
        return self._algorithm

    @property
    def mutual(self) -> bool:
        return self._credentials.mutual

    @property
    def offered(self) -> tuple[ChapAlgorithm, ...]:
        return self._algorithms

    def start(self) -> list[Pair]:
        """The CHAP_A offer, most preferred algorithm first."""
        if self._state is not _State.START:
            raise LocalProtocolError("CHAP has already started on this connection")
        self._state = _State.ALGORITHMS_SENT
        return [("CHAP_A", ",".join(str(int(a)) for a in self._algorithms))]

    def receive(self, pairs: Sequence[Pair]) -> list[Pair]:
        """Take the target's CHAP_* keys of one Login Response; return the keys to send."""
        keys = _collect(pairs, self._fail_protocol, self._where())
        match self._state:
            case _State.ALGORITHMS_SENT:
                return self._answer_challenge(keys)
            case _State.RESPONSE_SENT:
                self._verify_target(keys)
                return []
            case _State.DONE if not keys:
                return []
            case _:
                names = ", ".join(keys) or "nothing"
                self._fail_protocol(
                    f"target {self._target} sent {names} while CHAP was {self._state.value}"
                )

    def check_complete(self) -> None:
        """Raise unless CHAP finished; call when the target leaves the security stage."""
        if self._state is _State.DONE:
            return
        if self._state is _State.RESPONSE_SENT:
            # §12.1.3: a target that cannot answer the challenge must fail the login; leaving
            # the stage unanswered is a protocol error, most likely for want of configuration.
            self._fail_protocol(
                f"target {self._target} left the security stage without answering our mutual "
                "CHAP challenge (is mutual CHAP, tgtChapName/tgtChapSecret, configured on the "
                "target?)"
            )
        self._fail_protocol(
            f"target {self._target} left the security stage before CHAP completed "
            f"(CHAP was {self._state.value})"
        )

    def login_rejected(self) -> NoReturn:
        """Raise the error for a Login Response with status "authentication failure" (0x0201)."""
        account = self._credentials.initiator
        # tgt and LIO refuse the login the same way when we ask for mutual CHAP and they have
        # no credentials of their own to prove themselves with: name that cause too.
        mutual = (
            "; or the target has no mutual CHAP credentials of its own, which we asked for "
            "(target_user=/target_password= in a URL, tgtChapName/tgtChapSecret in the "
            "configuration): set them up there, or ask for one-way CHAP"
            if self._credentials.mutual else ""
        )
        self._fail(
            f"target {self._target} rejected our CHAP response for {account.name!r}: check "
            f"{self._credentials.settings}{mutual}"
        )

    def _answer_challenge(self, keys: Mapping[str, str]) -> list[Pair]:
        if keys.get("CHAP_A") == Answer.REJECT:
            offered = ", ".join(chap_hash(a).label for a in self._algorithms)
            self._fail(
                f"target {self._target} supports none of the CHAP algorithms we offered "
                f"({offered}): enable a common algorithm on one side"
            )
        _expect(keys, ("CHAP_A", "CHAP_I", "CHAP_C"), self._fail_protocol, self._where())
        chosen = keys["CHAP_A"]
        algorithm = self._parse_algorithm(chosen)
        identifier = _parse_identifier(keys["CHAP_I"], self._where(), self._fail_protocol)
        challenge = _parse_challenge(keys["CHAP_C"], self._where(), self._fail_protocol)
        hasher = chap_hash(algorithm)
        self._algorithm = algorithm
        account = self._credentials.initiator
        response = hasher.response(identifier, account.secret.reveal(), challenge)
        out: list[Pair] = [
            ("CHAP_N", account.name),
            ("CHAP_R", format_binary(response, self._encoding)),
        ]
        if self._credentials.mutual:
            self._identifier = self._random(1)[0]
            self._challenge = self._random(self._challenge_length or hasher.digest_size)
            # §12.1.3: a challenge must never be reflected back at its sender. Ours is fresh,
            # so equality means a broken random source or a target that guessed it.
            if hmac.compare_digest(self._challenge, challenge):
                self._fail_protocol(
                    f"target {self._target} sent a CHAP challenge equal to ours (a reflection "
                    "attack, RFC 7143 §12.1.3); refusing to authenticate"
                )
            out += [
                ("CHAP_I", str(self._identifier)),
                ("CHAP_C", format_binary(self._challenge, self._encoding)),
            ]
            self._state = _State.RESPONSE_SENT
        else:
            self._state = _State.DONE
        self._log.debug(
            "CHAP: answering target challenge with %s as %r%s",
            hasher.label,
            account.name,
            " and challenging the target" if self._credentials.mutual else "",
        )
        return out

    def _verify_target(self, keys: Mapping[str, str]) -> None:
        expected = self._credentials.target
        assert expected is not None and self._algorithm is not None
        _expect(keys, ("CHAP_N", "CHAP_R"), self._fail_protocol, self._where())
        hasher = chap_hash(self._algorithm)
        response = _parse_response(keys["CHAP_R"], hasher, self._where(), self._fail_protocol)
        name = keys["CHAP_N"]
        if name != expected.name:
            self._fail_mutual(
                f"target {self._target} identified itself as {_show(name)} for mutual CHAP, but "
                f"tgtChapName is {expected.name!r}: check tgtChapName"
            )
        # §12.1.3: a response equal to the one we would compute with our own secret means the
        # target used our secret (or reflected our challenge to us): refuse it.
        own = hasher.response(
            self._identifier, self._credentials.initiator.secret.reveal(), self._challenge
        )
        if hmac.compare_digest(response, own):
            self._fail_mutual(
                f"target {self._target} answered our mutual CHAP challenge with our own secret "
                "(chapSecret); RFC 7143 §12.1.3 forbids one secret in both directions: give "
                "the target its own tgtChapSecret"
            )
        good = hasher.response(self._identifier, expected.secret.reveal(), self._challenge)
        if not hmac.compare_digest(response, good):
            self._fail_mutual(
                f"target {self._target}'s mutual CHAP response is wrong: check tgtChapSecret, "
                "the secret the target proves itself with, here and on the target (it accepted "
                "our own credentials)"
            )
        self._state = _State.DONE
        self._log.debug("CHAP: target %s authenticated as %r", self._target, name)

    def _parse_algorithm(self, value: str) -> ChapAlgorithm:
        if "," in value:
            self._fail_protocol(
                f"target {self._target} answered CHAP_A with a list ({quoted(value)}); it must "
                "choose one algorithm (RFC 7143 §6.2.1)"
            )
        try:
            number = parse_number(value, key="CHAP_A")
            algorithm = ChapAlgorithm(number)
        except (TextValueError, ValueError):
            algorithm = None
        if algorithm is None or algorithm not in self._algorithms:
            offered = ", ".join(f"{int(a)} ({chap_hash(a).label})" for a in self._algorithms)
            self._fail_protocol(
                f"target {self._target} chose CHAP algorithm {_show(value)}, which we did not "
                f"offer (we offered {offered})"
            )
        return algorithm

    def _where(self) -> str:
        return f"target {self._target}"

    def _fail(self, message: str) -> NoReturn:
        self._state = _State.FAILED
        raise AuthenticationError(message)

    def _fail_mutual(self, message: str) -> NoReturn:
        self._state = _State.FAILED
        raise MutualAuthenticationError(message)

    def _fail_protocol(self, message: str) -> NoReturn:
        self._state = _State.FAILED
        raise ChapProtocolError(
            f"{message}. The target broke the CHAP protocol: no CHAP name or secret of ours "
            "can fix that; see the target's logs or report it to its vendor")


# --- target --------------------------------------------------------------------------------


CredentialsLookup = Callable[[str], ChapCredentials | None]
"""Target side: find the credentials for a CHAP_N the initiator presented (None: unknown)."""


class ChapTarget:
    """The target's side of CHAP (used by the in-memory fake target and by tests).

    ``credentials`` is either one :class:`ChapCredentials` or a lookup from the initiator's
    CHAP_N to its credentials. ``receive`` takes the initiator's CHAP_* keys of one Login Request
    and returns the keys to answer. ``require_mutual`` refuses initiators that do not challenge
    the target. ``algorithms`` are those the target accepts; it picks the first of the
    initiator's list that it accepts (§6.2.1).
    """

    def __init__(
        self,
        credentials: ChapCredentials | CredentialsLookup,
        *,
        initiator: str = "the initiator",
        algorithms: Sequence[ChapAlgorithm | int] = DEFAULT_ALGORITHMS,
        encoding: BinaryEncoding = BinaryEncoding.HEX,
        challenge_length: int | None = None,
        require_mutual: bool = False,
        random_bytes: RandomBytes = secrets.token_bytes,
        logger: LogTarget | None = None,
    ) -> None:
        self._lookup: CredentialsLookup
        if isinstance(credentials, ChapCredentials):
            fixed = credentials
            self._lookup = lambda name: fixed if name == fixed.initiator.name else None
        else:
            self._lookup = credentials
        self._initiator = initiator
        self._algorithms = _usable_algorithms(algorithms)
        self._encoding = encoding
        self._challenge_length = _challenge_length(challenge_length)
        self._require_mutual = require_mutual
        self._random = random_bytes
        self._log: LogTarget = logger if logger is not None else _log
        self._state = _State.START
        self._algorithm: ChapAlgorithm | None = None
        self._identifier = 0
        self._challenge = b""
        self._authenticated: str | None = None

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    @property
    def algorithm(self) -> ChapAlgorithm | None:
        return self._algorithm

    @property
    def authenticated_name(self) -> str | None:
        """The CHAP_N the initiator proved, once it did."""
        return self._authenticated

    def receive(self, pairs: Sequence[Pair]) -> list[Pair]:
        """Take the initiator's CHAP_* keys of one Login Request; return the keys to answer."""
        keys = _collect(pairs, self._fail_protocol, self._where())
        match self._state:
            case _State.START:
                return self._send_challenge(keys)
            case _State.CHALLENGED:
                return self._check_response(keys)
            case _:
                names = ", ".join(keys) or "nothing"
                self._fail_protocol(
                    f"initiator {self._initiator} sent {names} while CHAP was "
                    f"{self._state.value}"
                )

    def _send_challenge(self, keys: Mapping[str, str]) -> list[Pair]:
        _expect(keys, ("CHAP_A",), self._fail_protocol, self._where())
        offered: list[ChapAlgorithm] = []
        for item in keys["CHAP_A"].split(","):
            try:
                offered.append(ChapAlgorithm(parse_number(item, key="CHAP_A")))
            except (TextValueError, ValueError):
                continue  # §6.2.1: values not understood are ignored
        algorithm = next((a for a in offered if a in self._algorithms), None)
        if algorithm is None:
            self._fail(
                f"initiator {self._initiator} offered CHAP algorithms {_show(keys['CHAP_A'])}; "
                "this target accepts "
                + ", ".join(f"{int(a)} ({chap_hash(a).label})" for a in self._algorithms)
            )
        hasher = chap_hash(algorithm)
        self._algorithm = algorithm
        self._identifier = self._random(1)[0]
        self._challenge = self._random(self._challenge_length or hasher.digest_size)
        self._state = _State.CHALLENGED
        return [
            ("CHAP_A", str(int(algorithm))),
            ("CHAP_I", str(self._identifier)),
            ("CHAP_C", format_binary(self._challenge, self._encoding)),
        ]

    def _check_response(self, keys: Mapping[str, str]) -> list[Pair]:
        assert self._algorithm is not None
        _expect(
            keys,
            ("CHAP_N", "CHAP_R"),
            self._fail_protocol,
            self._where(),
            optional=("CHAP_I", "CHAP_C"),
        )
        hasher = chap_hash(self._algorithm)
        name = keys["CHAP_N"]
        response = _parse_response(keys["CHAP_R"], hasher, self._where(), self._fail_protocol)
        credentials = self._lookup(name)
        if credentials is None:
            self._fail(
                f"initiator {self._initiator} authenticated as {_show(name)}, a CHAP name this "
                "target does not know: check chapIName"
            )
        # §12.1.3: refuse a response computed with the target's own (mutual) secret.
        if credentials.target is not None:
            own = hasher.response(
                self._identifier, credentials.target.secret.reveal(), self._challenge
            )
            if hmac.compare_digest(response, own):
                self._fail(
                    f"initiator {self._initiator} answered with the target's own secret; "
                    "RFC 7143 §12.1.3 forbids one secret in both directions"
                )
        good = hasher.response(
            self._identifier, credentials.initiator.secret.reveal(), self._challenge
        )
        if not hmac.compare_digest(response, good):
            self._fail(
                f"initiator {self._initiator} ({_show(name)}) sent a wrong CHAP response: check "
                "chapSecret for this initiator"
            )
        self._authenticated = name
        mutual = "CHAP_I" in keys or "CHAP_C" in keys
        if not mutual:
            if self._require_mutual:
                self._fail(
                    f"initiator {self._initiator} did not request mutual CHAP, which this "
                    "target requires: configure tgtChapName/tgtChapSecret on the initiator"
                )
            self._state = _State.DONE
            return []
        if "CHAP_I" not in keys or "CHAP_C" not in keys:
            self._fail_protocol(
                f"initiator {self._initiator} sent only one of CHAP_I and CHAP_C; mutual CHAP "
                "needs both (RFC 7143 §12.1.3)"
            )
        if credentials.target is None:
            self._fail(
                f"initiator {self._initiator} asked for mutual CHAP, but no target CHAP "
                "credentials (tgtChapName/tgtChapSecret) are configured for it"
            )
        identifier = _parse_identifier(keys["CHAP_I"], self._where(), self._fail_protocol)
        challenge = _parse_challenge(keys["CHAP_C"], self._where(), self._fail_protocol)
        # §12.1.3: "Responders MUST check for this condition" — our challenge sent back to us.
        if hmac.compare_digest(challenge, self._challenge):
            self._fail(
                f"initiator {self._initiator} reflected the target's CHAP challenge back "
                "(RFC 7143 §12.1.3); refusing to authenticate"
            )
        answer = hasher.response(identifier, credentials.target.secret.reveal(), challenge)
        self._state = _State.DONE
        return [
            ("CHAP_N", credentials.target.name),
            ("CHAP_R", format_binary(answer, self._encoding)),
        ]

    def _where(self) -> str:
        return f"initiator {self._initiator}"

    def _fail(self, message: str) -> NoReturn:
        self._state = _State.FAILED
        raise AuthenticationError(message)

    def _fail_protocol(self, message: str) -> NoReturn:
        self._state = _State.FAILED
        raise ChapProtocolError(message)


# --- shared parsing ------------------------------------------------------------------------

Fail = Callable[[str], NoReturn]


def _collect(pairs: Sequence[Pair], fail: Fail, where: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    for key, value in pairs:
        if not key.startswith("CHAP_"):
            raise LocalProtocolError(f"{key} is not a CHAP key; pass only CHAP_* keys")
        if key in keys:
            fail(f"{where} sent {key} twice in one CHAP message")
        keys[key] = value
    return keys


def _expect(
    keys: Mapping[str, str],
    required: Sequence[str],
    fail: Fail,
    where: str,
    *,
    optional: Sequence[str] = (),
) -> None:
    missing = [k for k in required if k not in keys]
    if missing:
        fail(f"{where} did not send {', '.join(missing)} (RFC 7143 §12.1.3)")
    extra = [k for k in keys if k not in required and k not in optional]
    if extra:
        fail(f"{where} sent {', '.join(extra)} out of sequence (RFC 7143 §12.1.3)")


def _parse_identifier(value: str, where: str, fail: Fail) -> int:
    try:
        number = parse_number(value, key="CHAP_I")
    except TextValueError:
        fail(f"{where} sent a malformed CHAP_I {value[:40]!r}: it must be a number 0-255")
    if number > 255:
        fail(f"{where} sent CHAP_I={number}; a CHAP identifier is one octet (0-255)")
    return number


def _parse_challenge(value: str, where: str, fail: Fail) -> bytes:
    try:
        challenge = parse_binary(value, key="CHAP_C")
    except TextValueError as exc:
        fail(f"{where} sent a malformed CHAP_C: {exc}")
    return challenge


def _parse_response(value: str, hasher: type[ChapHash], where: str, fail: Fail) -> bytes:
    try:
        response = parse_binary(value, key="CHAP_R")
    except TextValueError as exc:
        fail(f"{where} sent a malformed CHAP_R: {exc}")
    if len(response) != hasher.digest_size:
        fail(
            f"{where} sent a {len(response)}-byte CHAP_R; {hasher.label} responses are "
            f"{hasher.digest_size} bytes"
        )
    return response


def _show(text: str, limit: int = 80) -> str:
    """A peer-supplied string, quoted and cut short, for an error message."""
    return repr(text if len(text) <= limit else text[:limit] + "...")
