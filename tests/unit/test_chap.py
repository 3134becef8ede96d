"""Unit tests for initiator.chap: algorithms, vectors, both roles, failures (RFC 7143 §12.1.3)."""

from __future__ import annotations

import base64
import hashlib
import logging
import pickle
import random
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from initiator.chap import (
    DEFAULT_ALGORITHMS,
    DEFAULT_OFFER,
    ChapAccount,
    ChapAlgorithm,
    ChapCredentials,
    ChapInitiator,
    ChapProtocolError,
    ChapTarget,
    Md5Chap,
    Secret,
    available_algorithms,
    chap_hash,
    chap_response,
)
from initiator.errors import (
    AuthenticationError,
    ConfigurationError,
    LocalProtocolError,
    RemoteProtocolError,
)
from initiator.text import BinaryEncoding, Pair, decode, encode, format_binary

INI = "iqn.2024-01.org.example:initiator"
TGT = "iqn.2024-01.org.example:target"
INI_SECRET = "initiator-secret-1"
TGT_SECRET = "target-secret-22"
WRONG_SECRET = "not-the-secret-3"

HASHLIB_NAME = {
    ChapAlgorithm.MD5: "md5",
    ChapAlgorithm.SHA1: "sha1",
    ChapAlgorithm.SHA256: "sha256",
    ChapAlgorithm.SHA3_256: "sha3_256",
}


# The helpers offer every algorithm (the default offer is MD5 alone), so the machinery is
# exercised with each.
def one_way(secret: str = INI_SECRET, name: str = "alice") -> ChapCredentials:
    return ChapCredentials(ChapAccount(name, Secret(secret)), algorithms=DEFAULT_ALGORITHMS)


def mutual(
    secret: str = INI_SECRET,
    target_secret: str = TGT_SECRET,
    target_name: str = "disk-array",
) -> ChapCredentials:
    return ChapCredentials(
        ChapAccount("alice", Secret(secret)), ChapAccount(target_name, Secret(target_secret)),
        algorithms=DEFAULT_ALGORITHMS,
    )


def seeded(seed: int) -> Callable[[int], bytes]:
    rng = random.Random(seed)
    return rng.randbytes


def wire(pairs: list[Pair]) -> list[Pair]:
    """The pairs as the peer would decode them from a Login PDU."""
    return decode(encode(pairs))


def make_initiator(creds: ChapCredentials, **kwargs: object) -> ChapInitiator:
    kwargs.setdefault("random_bytes", seeded(1))
    return ChapInitiator(creds, target=TGT, **kwargs)  # type: ignore[arg-type]


def make_target(creds: ChapCredentials, **kwargs: object) -> ChapTarget:
    kwargs.setdefault("random_bytes", seeded(2))
    return ChapTarget(creds, initiator=INI, **kwargs)  # type: ignore[arg-type]


def challenge_from(tgt: ChapTarget, ini: ChapInitiator) -> dict[str, str]:
    return dict(tgt.receive(wire(ini.start())))


# Property tests check correctness, not speed: on a loaded machine a deadline would only add noise.
relaxed = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- algorithms and vectors ------------------------------------------------------------------


def test_algorithm_numbers_match_open_iscsi_and_libiscsi() -> None:
    # open-iscsi usr/auth.h AUTH_CHAP_ALG_*, libiscsi include/iscsi.h ISCSI_CHAP_*: IANA PPP
    # Authentication Algorithms registry values.
    assert [int(a) for a in ChapAlgorithm] == [5, 6, 7, 8]
    assert [a.name for a in ChapAlgorithm] == ["MD5", "SHA1", "SHA256", "SHA3_256"]


@pytest.mark.parametrize(
    ("algorithm", "size", "label"),
    [
        (ChapAlgorithm.MD5, 16, "MD5"),
        (ChapAlgorithm.SHA1, 20, "SHA-1"),
        (ChapAlgorithm.SHA256, 32, "SHA-256"),
        (ChapAlgorithm.SHA3_256, 32, "SHA3-256"),
    ],
)
def test_registry(algorithm: ChapAlgorithm, size: int, label: str) -> None:
    cls = chap_hash(algorithm)
    assert cls.algorithm is algorithm
    assert cls.digest_size == size
    assert cls.label == label
    assert chap_hash(int(algorithm)) is cls
    assert cls.available()


def test_registry_unknown() -> None:
    with pytest.raises(ValueError):
        chap_hash(9)


def test_default_order_is_strongest_first_with_md5_last() -> None:
    assert DEFAULT_ALGORITHMS == (
        ChapAlgorithm.SHA3_256,
        ChapAlgorithm.SHA256,
        ChapAlgorithm.SHA1,
        ChapAlgorithm.MD5,
    )
    assert available_algorithms() == DEFAULT_ALGORITHMS


# Published digests of "abc" (RFC 1321 A.5, FIPS 180-2 B.1, FIPS 202 examples): with identifier
# 0x61 ('a'), secret "b" and challenge "c", R = H("abc").
ABC_VECTORS = {
    ChapAlgorithm.MD5: "900150983cd24fb0d6963f7d28e17f72",
    ChapAlgorithm.SHA1: "a9993e364706816aba3e25717850c26c9cd0d89d",
    ChapAlgorithm.SHA256: "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
    ChapAlgorithm.SHA3_256: "3a985da74fe225b2045c172d6bd390bd855f086e3e9d525b46bfe24511431532",
}
# A second published message per algorithm, split as identifier || secret || challenge.
LONG = b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
SECOND_VECTORS = {
    ChapAlgorithm.MD5: (b"message digest", "f96b697d7cb7938d525a2f31aaf161d0"),
    ChapAlgorithm.SHA1: (LONG, "84983e441c3bd26ebaae4aa1f95129e5e54670f1"),
    ChapAlgorithm.SHA256: (
        LONG,
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
    ),
    ChapAlgorithm.SHA3_256: (
        LONG,
        "41c0dba2a9d6240849100376a8235e2c82e1b9998a999e21db32dd97496d3376",
    ),
}


@pytest.mark.parametrize("algorithm", list(ChapAlgorithm))
def test_published_vectors(algorithm: ChapAlgorithm) -> None:
    assert chap_response(algorithm, 0x61, b"b", b"c").hex() == ABC_VECTORS[algorithm]
    message, digest = SECOND_VECTORS[algorithm]
    identifier, secret, challenge = message[0], message[1:-3], message[-3:]
    assert chap_response(algorithm, identifier, Secret(secret), challenge).hex() == digest


@pytest.mark.parametrize("algorithm", list(ChapAlgorithm))
@relaxed
@given(
    identifier=st.integers(min_value=0, max_value=255),
    secret=st.binary(min_size=1, max_size=64),
    challenge=st.binary(min_size=1, max_size=1024),
)
def test_response_is_hash_of_id_secret_challenge(
    algorithm: ChapAlgorithm, identifier: int, secret: bytes, challenge: bytes
) -> None:
    expected = hashlib.new(
        HASHLIB_NAME[algorithm], bytes([identifier]) + secret + challenge
    ).digest()
    assert chap_response(algorithm, identifier, Secret(secret), challenge) == expected
    assert len(expected) == chap_hash(algorithm).digest_size


def test_md5_fixed_vector_against_independent_hashlib() -> None:
    # MD5(id || secret || challenge) for fixed inputs, computed independently.
    identifier, secret, challenge = 0x2A, b"s3cr3t-password", bytes(range(16))
    expected = hashlib.md5(b"\x2a" + secret + challenge).hexdigest()
    assert Md5Chap.response(identifier, secret, challenge).hex() == expected


def test_response_refuses_bad_identifier() -> None:
    with pytest.raises(LocalProtocolError):
        chap_response(ChapAlgorithm.MD5, 256, b"s", b"c")


# --- secrets and credentials -----------------------------------------------------------------


def test_secret_is_redacted_everywhere() -> None:
    secret = Secret("hunter2-very-secret")
    account = ChapAccount("alice", secret)
    creds = ChapCredentials(account, ChapAccount("array", Secret("other-secret-99")))
    for text in (repr(secret), str(secret), f"{secret}", repr(account), repr(creds), str(creds)):
        assert "hunter2" not in text
        assert "other-secret" not in text
    assert "redacted" in repr(secret)
    assert secret.reveal() == b"hunter2-very-secret"
    assert len(secret) == 19


def test_secret_equality_and_bytes() -> None:
    assert Secret("abc") == Secret(b"abc")
    assert Secret("abc") != Secret("abd")
    assert Secret("abc") != "abc"
    assert hash(Secret("abc")) == hash(Secret(b"abc"))
    assert Secret("é").reveal() == "é".encode()


def test_secret_cannot_be_pickled() -> None:
    with pytest.raises(TypeError, match="pickled"):
        pickle.dumps(Secret("x"))


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (lambda: Secret(""), "empty"),
        (lambda: ChapAccount("", Secret("x")), "name must not be empty"),
        (lambda: ChapAccount("a\0b", Secret("x")), "without NUL"),
        (lambda: ChapAccount("n" * 256, Secret("x")), "255"),
        (lambda: ChapAccount("alice", "plain-string"), "Secret"),  # type: ignore[arg-type]
        (lambda: mutual(secret="same-secret", target_secret="same-secret"), "identical"),
    ],
)
def test_credentials_configuration_errors(build: Callable[[], object], fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        build()


def test_algorithm_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="unknown CHAP algorithm 4"):
        ChapInitiator(one_way(), algorithms=[4])
    with pytest.raises(ConfigurationError, match="twice"):
        ChapInitiator(one_way(), algorithms=[5, 5])
    with pytest.raises(ConfigurationError, match="challenge length 0"):
        ChapInitiator(one_way(), challenge_length=0)
    with pytest.raises(ConfigurationError, match="challenge length 1025"):
        ChapTarget(one_way(), challenge_length=1025)


def test_default_offer_is_md5_alone() -> None:
    # open-iscsi's default; tgt reads CHAP_A=7 as SHA-1, so offering more breaks logins there.
    creds = ChapCredentials(ChapAccount("alice", Secret(INI_SECRET)))
    assert creds.algorithms == DEFAULT_OFFER == (ChapAlgorithm.MD5,)
    assert ChapInitiator(creds).start() == [("CHAP_A", "5")]
    assert ChapInitiator(creds, algorithms=[6, 5]).start() == [("CHAP_A", "6,5")]


def test_unavailable_algorithms_are_not_offered(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # As under FIPS, where MD5 is refused by the crypto library (open-iscsi skips it too).
    monkeypatch.setattr(Md5Chap, "available", classmethod(lambda cls: False))
    ini = ChapInitiator(one_way(), algorithms=DEFAULT_ALGORITHMS)
    assert ini.start() == [("CHAP_A", "8,7,6")]
    assert "MD5" in caplog.text
    with pytest.raises(ConfigurationError, match="none of the configured"):
        ChapInitiator(one_way(), algorithms=[ChapAlgorithm.MD5])


# --- end to end ------------------------------------------------------------------------------


def run(ini: ChapInitiator, tgt: ChapTarget) -> None:
    """The whole exchange, through real text encoding, as the login machine would drive it."""
    offer = ini.start()
    challenge = tgt.receive(wire(offer))
    response = ini.receive(wire(challenge))
    verdict = tgt.receive(wire(response))
    if ini.mutual:
        assert ini.receive(wire(verdict)) == []
    else:
        assert verdict == []
    assert ini.done and tgt.done


@pytest.mark.parametrize("algorithm", list(ChapAlgorithm))
@pytest.mark.parametrize("ini_encoding", list(BinaryEncoding))
@pytest.mark.parametrize("tgt_encoding", list(BinaryEncoding))
def test_mutual_chap_end_to_end(
    algorithm: ChapAlgorithm, ini_encoding: BinaryEncoding, tgt_encoding: BinaryEncoding
) -> None:
    creds = mutual()
    ini = make_initiator(creds, algorithms=[algorithm], encoding=ini_encoding)
    tgt = make_target(creds, encoding=tgt_encoding)
    run(ini, tgt)
    assert ini.algorithm is tgt.algorithm is algorithm
    assert tgt.authenticated_name == "alice"


@pytest.mark.parametrize("algorithm", list(ChapAlgorithm))
def test_one_way_chap_end_to_end(algorithm: ChapAlgorithm) -> None:
    creds = one_way()
    ini = make_initiator(creds, algorithms=[algorithm])
    tgt = make_target(creds)
    run(ini, tgt)
    assert ini.algorithm is algorithm


def test_real_randomness_end_to_end() -> None:
    creds = mutual()
    run(ChapInitiator(creds, target=TGT), ChapTarget(creds, initiator=INI))


def test_message_contents() -> None:
    creds = mutual()
    ini = make_initiator(creds)
    tgt = make_target(creds)
    assert ini.start() == [("CHAP_A", "8,7,6,5")]
    challenge = dict(tgt.receive([("CHAP_A", "8,7,6,5")]))
    assert challenge["CHAP_A"] == "8"  # the first of the initiator's list the target accepts
    assert 0 <= int(challenge["CHAP_I"]) <= 255
    assert challenge["CHAP_C"].startswith("0x")
    assert len(challenge["CHAP_C"]) == 2 + 2 * 32  # challenge as long as the digest (open-iscsi)
    response = dict(ini.receive(list(challenge.items())))
    assert list(response) == ["CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C"]
    assert response["CHAP_N"] == "alice"
    expected = chap_response(
        ChapAlgorithm.SHA3_256,
        int(challenge["CHAP_I"]),
        Secret(INI_SECRET),
        bytes.fromhex(challenge["CHAP_C"][2:]),
    )
    assert response["CHAP_R"] == "0x" + expected.hex()


def test_target_picks_first_of_initiator_list_it_accepts() -> None:
    tgt = make_target(one_way(), algorithms=[ChapAlgorithm.MD5, ChapAlgorithm.SHA256])
    assert dict(tgt.receive([("CHAP_A", "8,7,6,5")]))["CHAP_A"] == "7"
    tgt = make_target(one_way())
    assert dict(tgt.receive([("CHAP_A", "99,foo,5")]))["CHAP_A"] == "5"  # unknown ones ignored


def test_custom_challenge_length_and_base64() -> None:
    creds = mutual()
    ini = make_initiator(creds, challenge_length=1024, encoding=BinaryEncoding.BASE64)
    tgt = make_target(creds, challenge_length=1024)
    challenge = dict(tgt.receive(wire(ini.start())))
    assert len(challenge["CHAP_C"]) == 2 + 2 * 1024
    response = dict(ini.receive(list(challenge.items())))
    assert response["CHAP_C"].startswith("0b")
    assert len(base64.b64decode(response["CHAP_C"][2:])) == 1024
    assert tgt.receive(list(response.items()))[0] == ("CHAP_N", "disk-array")


def test_target_lookup_callable() -> None:
    table = {"alice": mutual(), "bob": one_way(name="bob", secret="bob-secret-123")}
    for name in ("alice", "bob"):
        creds = table[name]
        run(make_initiator(creds), make_target(creds))
        tgt = ChapTarget(table.get, initiator=INI, random_bytes=seeded(3))
        run(make_initiator(creds), tgt)
        assert tgt.authenticated_name == name


# --- initiator-side failures ---------------------------------------------------------------


def target_challenge(
    algorithm: ChapAlgorithm = ChapAlgorithm.SHA256, challenge: bytes = b"\x11" * 32
) -> list[Pair]:
    return [("CHAP_A", str(int(algorithm))), ("CHAP_I", "7"), ("CHAP_C", format_binary(challenge))]


def started(creds: ChapCredentials, **kwargs: object) -> ChapInitiator:
    ini = make_initiator(creds, **kwargs)
    ini.start()
    return ini


def test_wrong_initiator_secret_is_caught_by_target() -> None:
    ini = make_initiator(one_way(secret=WRONG_SECRET))
    tgt = make_target(one_way())
    response = ini.receive(wire(tgt.receive(wire(ini.start()))))
    with pytest.raises(AuthenticationError, match="check chapSecret") as info:
        tgt.receive(wire(response))
    assert WRONG_SECRET not in str(info.value) and INI_SECRET not in str(info.value)
    # The login machine then reports the target's status 0x0201 through the initiator.
    with pytest.raises(AuthenticationError, match=f"target {TGT} rejected our CHAP response"):
        ini.login_rejected()


def test_login_rejected_names_the_settings_to_check() -> None:
    with pytest.raises(AuthenticationError) as info:
        started(one_way()).login_rejected()
    assert "chapSecret / chapIName" in str(info.value)
    assert "<user>%<secret>@ in a URL" in str(info.value)  # where a hbactl user gives them
    assert "mutual" not in str(info.value)
    assert INI_SECRET not in str(info.value)
    # Asking for mutual CHAP of a target that has no credentials of its own is refused alike.
    with pytest.raises(AuthenticationError) as info:
        started(mutual()).login_rejected()
    assert "no mutual CHAP credentials" in str(info.value)
    assert "target_user=/target_password=" in str(info.value)


def test_wrong_target_secret_is_caught_by_initiator() -> None:
    ini = make_initiator(mutual())
    tgt = make_target(mutual(target_secret="wrong-target-secret"))
    response = ini.receive(wire(tgt.receive(wire(ini.start()))))
    verdict = tgt.receive(wire(response))
    with pytest.raises(AuthenticationError, match="mutual CHAP response is wrong: check "
                       "tgtChapSecret") as info:
        ini.receive(wire(verdict))
    assert "wrong-target-secret" not in str(info.value) and TGT_SECRET not in str(info.value)
    assert not ini.done


def test_target_name_mismatch() -> None:
    ini = make_initiator(mutual())
    tgt = make_target(mutual(target_name="someone-else"))
    response = ini.receive(wire(tgt.receive(wire(ini.start()))))
    with pytest.raises(AuthenticationError, match=r"'someone-else'.*check tgtChapName"):
        ini.receive(wire(tgt.receive(wire(response))))


def test_target_using_our_own_secret_is_refused() -> None:
    # The target answers our mutual challenge with chapSecret instead of tgtChapSecret.
    ini = started(mutual())
    response = dict(ini.receive(target_challenge()))
    identifier = int(response["CHAP_I"])
    challenge = bytes.fromhex(response["CHAP_C"][2:])
    forged = chap_response(ChapAlgorithm.SHA256, identifier, Secret(INI_SECRET), challenge)
    with pytest.raises(AuthenticationError, match="our own secret"):
        ini.receive([("CHAP_N", "disk-array"), ("CHAP_R", format_binary(forged))])


def test_reflected_challenge_is_refused_by_initiator() -> None:
    # A target that sends the very challenge we are about to send (here: predictable random).
    ours = seeded(1)
    ours(1)  # the identifier
    predicted = ours(32)
    ini = started(mutual(), random_bytes=seeded(1))
    with pytest.raises(AuthenticationError, match="reflection"):
        ini.receive(target_challenge(challenge=predicted))


def test_algorithm_not_offered() -> None:
    ini = started(one_way(), algorithms=[ChapAlgorithm.SHA256, ChapAlgorithm.MD5])
    with pytest.raises(AuthenticationError, match=r"'6', which we did not offer \(we offered 7"):
        ini.receive(target_challenge(ChapAlgorithm.SHA1, b"\x01" * 20))


@pytest.mark.parametrize("value", ["9", "abc", "0x", "-5"])
def test_unknown_algorithm_answer(value: str) -> None:
    ini = started(one_way())
    with pytest.raises(AuthenticationError, match="which we did not offer"):
        ini.receive([("CHAP_A", value), ("CHAP_I", "1"), ("CHAP_C", "0x01")])


@pytest.mark.parametrize("value", ["7,5", "7," + "5" * 60_000])
def test_algorithm_list_as_answer(value: str) -> None:
    ini = started(one_way())
    with pytest.raises(ChapProtocolError, match="must choose one") as info:
        ini.receive([("CHAP_A", value), ("CHAP_I", "1"), ("CHAP_C", "0x01")])
    assert len(str(info.value)) < 1000   # the target's list is quoted, at most 200 characters


def test_algorithm_rejected_by_target() -> None:
    ini = started(one_way(), algorithms=[ChapAlgorithm.SHA3_256])
    with pytest.raises(AuthenticationError, match="supports none of the CHAP algorithms"):
        ini.receive([("CHAP_A", "Reject")])


@pytest.mark.parametrize(
    ("pairs", "fragment"),
    [
        ([("CHAP_A", "7"), ("CHAP_I", "1")], "did not send CHAP_C"),
        ([("CHAP_A", "7"), ("CHAP_C", "0x01")], "did not send CHAP_I"),
        ([("CHAP_I", "1"), ("CHAP_C", "0x01")], "did not send CHAP_A"),
        ([("CHAP_A", "7"), ("CHAP_I", "1"), ("CHAP_C", "0x01"), ("CHAP_N", "x")],
         "CHAP_N out of sequence"),
        ([("CHAP_A", "7"), ("CHAP_I", "256"), ("CHAP_C", "0x01")], "one octet"),
        ([("CHAP_A", "7"), ("CHAP_I", "x"), ("CHAP_C", "0x01")], "malformed CHAP_I"),
        ([("CHAP_A", "7"), ("CHAP_I", "1"), ("CHAP_C", "0xzz")], "malformed CHAP_C"),
        ([("CHAP_A", "7"), ("CHAP_I", "1"), ("CHAP_C", "")], "malformed CHAP_C"),
        ([("CHAP_A", "7"), ("CHAP_I", "1"), ("CHAP_C", "1234")], "malformed CHAP_C"),
        ([("CHAP_A", "7"), ("CHAP_I", "1"), ("CHAP_C", "0x" + "00" * 1025)], "1025 bytes"),
        ([("CHAP_A", "7"), ("CHAP_A", "7")], "twice"),
    ],
)  # fmt: skip
def test_malformed_target_challenge(pairs: list[Pair], fragment: str) -> None:
    ini = started(one_way())
    with pytest.raises(ChapProtocolError, match=fragment) as info:
        ini.receive(pairs)
    assert isinstance(info.value, AuthenticationError)
    assert isinstance(info.value, RemoteProtocolError)
    assert TGT in str(info.value)


def test_challenge_accepts_hex_and_base64_and_odd_hex() -> None:
    for encoded in ("0x" + "ab" * 16, "0b" + base64.b64encode(b"\xab" * 16).decode(), "0xabc"):
        ini = started(one_way())
        out = dict(ini.receive([("CHAP_A", "7"), ("CHAP_I", "0x10"), ("CHAP_C", encoded)]))
        assert out["CHAP_N"] == "alice"
        assert ini.done


@pytest.mark.parametrize(
    ("pairs", "fragment"),
    [
        ([("CHAP_N", "disk-array")], "did not send CHAP_R"),
        ([("CHAP_R", "0x" + "00" * 32)], "did not send CHAP_N"),
        ([("CHAP_N", "disk-array"), ("CHAP_R", "0x" + "00" * 16)], "16-byte CHAP_R"),
        ([("CHAP_N", "disk-array"), ("CHAP_R", "0xnothex")], "malformed CHAP_R"),
        ([("CHAP_N", "disk-array"), ("CHAP_R", "0x" + "00" * 32), ("CHAP_A", "7")],
         "out of sequence"),
    ],
)  # fmt: skip
def test_malformed_target_mutual_response(pairs: list[Pair], fragment: str) -> None:
    ini = started(mutual())
    ini.receive(target_challenge())
    with pytest.raises(ChapProtocolError, match=fragment):
        ini.receive(pairs)


def test_target_must_answer_mutual_challenge() -> None:
    ini = started(mutual())
    ini.receive(target_challenge())
    with pytest.raises(ChapProtocolError, match="did not send CHAP_N, CHAP_R"):
        ini.receive([])
    ini = started(mutual())
    ini.receive(target_challenge())
    with pytest.raises(AuthenticationError, match="without answering our mutual CHAP challenge"):
        ini.check_complete()


def test_check_complete() -> None:
    with pytest.raises(AuthenticationError, match="before CHAP completed"):
        make_initiator(one_way()).check_complete()
    ini = make_initiator(one_way())
    ini.start()
    ini.receive(target_challenge())
    ini.check_complete()
    assert ini.receive([]) == []  # nothing more to do after one-way CHAP


def test_unexpected_mutual_answer_after_one_way() -> None:
    ini = started(one_way())
    ini.receive(target_challenge())
    with pytest.raises(ChapProtocolError, match="while CHAP was done"):
        ini.receive([("CHAP_N", "x"), ("CHAP_R", "0x00")])


def test_receive_before_start() -> None:
    with pytest.raises(ChapProtocolError, match="while CHAP was start"):
        make_initiator(one_way()).receive(target_challenge())


def test_start_twice() -> None:
    ini = started(one_way())
    with pytest.raises(LocalProtocolError):
        ini.start()


def test_non_chap_keys_are_a_caller_bug() -> None:
    ini = started(one_way())
    with pytest.raises(LocalProtocolError, match="not a CHAP key"):
        ini.receive([("AuthMethod", "CHAP")])


def test_failed_initiator_stays_failed() -> None:
    ini = started(one_way())
    with pytest.raises(AuthenticationError):
        ini.receive([("CHAP_A", "Reject")])
    with pytest.raises(ChapProtocolError, match="failed"):
        ini.receive(target_challenge())


# --- target-side failures ------------------------------------------------------------------


def challenged_target(creds: ChapCredentials, **kwargs: object) -> tuple[ChapTarget, bytes, int]:
    tgt = make_target(creds, **kwargs)
    out = dict(tgt.receive([("CHAP_A", "7")]))
    return tgt, bytes.fromhex(out["CHAP_C"][2:]), int(out["CHAP_I"])


def initiator_response(
    tgt_challenge: bytes, identifier: int, secret: str = INI_SECRET, name: str = "alice"
) -> list[Pair]:
    r = chap_response(ChapAlgorithm.SHA256, identifier, Secret(secret), tgt_challenge)
    return [("CHAP_N", name), ("CHAP_R", format_binary(r))]


def test_target_unknown_name() -> None:
    tgt, c, i = challenged_target(one_way())
    with pytest.raises(AuthenticationError, match=r"'mallory'.*check chapIName"):
        tgt.receive(initiator_response(c, i, name="mallory"))


def test_target_refuses_initiator_reflecting_its_challenge() -> None:
    tgt, c, i = challenged_target(mutual())
    pairs = [*initiator_response(c, i), ("CHAP_I", "9"), ("CHAP_C", format_binary(c))]
    with pytest.raises(AuthenticationError, match="reflected"):
        tgt.receive(pairs)


def test_target_refuses_response_made_with_its_own_secret() -> None:
    tgt, c, i = challenged_target(mutual())
    with pytest.raises(AuthenticationError, match="target's own secret"):
        tgt.receive(initiator_response(c, i, secret=TGT_SECRET))


def test_target_without_mutual_credentials() -> None:
    tgt, c, i = challenged_target(one_way())
    pairs = [*initiator_response(c, i), ("CHAP_I", "9"), ("CHAP_C", "0x" + "22" * 32)]
    with pytest.raises(AuthenticationError, match="no target CHAP credentials"):
        tgt.receive(pairs)


def test_target_requiring_mutual() -> None:
    tgt, c, i = challenged_target(mutual(), require_mutual=True)
    with pytest.raises(AuthenticationError, match="requires"):
        tgt.receive(initiator_response(c, i))


def test_target_half_mutual_request() -> None:
    tgt, c, i = challenged_target(mutual())
    with pytest.raises(ChapProtocolError, match="only one of CHAP_I and CHAP_C"):
        tgt.receive([*initiator_response(c, i), ("CHAP_I", "9")])


def test_target_no_common_algorithm() -> None:
    tgt = make_target(one_way(), algorithms=[ChapAlgorithm.SHA3_256])
    with pytest.raises(AuthenticationError, match="this target accepts 8 \\(SHA3-256\\)"):
        tgt.receive([("CHAP_A", "5,6")])


@pytest.mark.parametrize(
    ("pairs", "fragment"),
    [
        ([], "did not send CHAP_A"),
        ([("CHAP_A", "7"), ("CHAP_N", "alice")], "out of sequence"),
    ],
)
def test_target_malformed_first_message(pairs: list[Pair], fragment: str) -> None:
    with pytest.raises(ChapProtocolError, match=fragment):
        make_target(one_way()).receive(pairs)


def test_target_wrong_length_response() -> None:
    tgt, _, _ = challenged_target(one_way())
    with pytest.raises(ChapProtocolError, match="16-byte CHAP_R; SHA-256 responses are 32"):
        tgt.receive([("CHAP_N", "alice"), ("CHAP_R", "0x" + "00" * 16)])


def test_target_after_done() -> None:
    creds = one_way()
    ini = make_initiator(creds)
    tgt = make_target(creds)
    run(ini, tgt)
    with pytest.raises(ChapProtocolError, match="while CHAP was done"):
        tgt.receive([("CHAP_A", "5")])


# --- secrets never leak ------------------------------------------------------------------------


def test_no_secret_in_any_error_or_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    messages: list[str] = []
    scenarios: list[tuple[ChapCredentials, ChapCredentials]] = [
        (mutual(), mutual()),
        (one_way(secret=WRONG_SECRET), one_way()),
        (mutual(), mutual(target_secret=WRONG_SECRET)),
        (mutual(), mutual(target_name="other")),
    ]
    for ini_creds, tgt_creds in scenarios:
        try:
            run(make_initiator(ini_creds), make_target(tgt_creds))
        except AuthenticationError as exc:
            messages.append(str(exc))
            messages.append(repr(exc))
    assert len(messages) == 6
    everything = "\n".join(messages) + caplog.text
    for secret in (INI_SECRET, TGT_SECRET, WRONG_SECRET):
        assert secret not in everything
        assert secret.encode().hex() not in everything
