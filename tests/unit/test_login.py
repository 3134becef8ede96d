"""LoginMachine (RFC 7143 §6) against the in-memory fake target, and against hand-made responses.

Every stage transition, AuthMethod None, CHAP one-way and mutual with each algorithm, C-bit
continuation both ways, redirects, every login status (table-driven over ``LOGIN_STATUS``),
and the ways a target can get a login wrong: each must end in a typed error with a message a
person can act on, never in success and never in a loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from initiator import login as L
from initiator import pdu as P
from initiator.chap import (
    DEFAULT_ALGORITHMS,
    ChapAccount,
    ChapAlgorithm,
    ChapCredentials,
    Secret,
    available_algorithms,
    chap_hash,
)
from initiator.errors import (
    AuthenticationError,
    ConfigurationError,
    ISCSIError,
    NegotiationError,
    PDUFormatError,
    RemoteProtocolError,
)
from initiator.keys import NegotiationSettings, SessionType
from initiator.login import (
    LOGIN_STATUS,
    LoginAuthenticationError,
    LoginAuthorizationError,
    LoginError,
    LoginMachine,
    LoginRedirect,
    LoginSuccess,
    Portal,
    TargetNotFoundError,
)
from initiator.text import decode, encode
from tests.support.fake_target import FakeTarget, Hostility, Loopback, TargetNode

INI = "iqn.2024-01.org.example:initiator"
TGT = "iqn.2003-01.org.example:disk1"
ISID = 0x80_12_34_56_00_00
PORTAL = "192.0.2.10:3260"

INITIATOR_ACCOUNT = ChapAccount("ini-user", Secret("initiator-secret-1"))
TARGET_ACCOUNT = ChapAccount("tgt-user", Secret("target-secret-22"))
# Offering every algorithm (the default offer is MD5 alone) lets the target pick each.
ONE_WAY = ChapCredentials(INITIATOR_ACCOUNT, algorithms=DEFAULT_ALGORITHMS)
MUTUAL = ChapCredentials(INITIATOR_ACCOUNT, TARGET_ACCOUNT, algorithms=DEFAULT_ALGORITHMS)


def machine(target_name: str | None = TGT, **kw: object) -> LoginMachine:
    return LoginMachine(initiator_name=INI, target_name=target_name, isid=ISID,
                        portal=PORTAL, **kw)  # type: ignore[arg-type]


def run(target: FakeTarget, m: LoginMachine) -> tuple[LoginSuccess | LoginRedirect, Loopback]:
    lb = Loopback(target)
    return lb.login(m), lb


def succeed(target: FakeTarget, m: LoginMachine) -> tuple[LoginSuccess, Loopback]:
    outcome, lb = run(target, m)
    assert isinstance(outcome, LoginSuccess), outcome
    assert not target.violations(), target.violations()
    return outcome, lb


def requests(lb: Loopback) -> list[P.LoginRequest]:
    return [p for p in lb.conn.received if isinstance(p, P.LoginRequest)]


def transitions(lb: Loopback) -> list[tuple[int, int]]:
    """(CSG, NSG) of every request with T=1, in order."""
    return [(int(r.csg), int(r.nsg)) for r in requests(lb) if r.transit]


class Recorder:
    """A login hook that keeps every response (and can rewrite them)."""

    def __init__(self, rewrite: Callable[[P.LoginRequest, P.LoginResponse],
                                         P.LoginResponse | bytes | None] | None = None) -> None:
        self.responses: list[P.LoginResponse] = []
        self.rewrite = rewrite

    def __call__(self, req: P.LoginRequest, resp: P.LoginResponse
                 ) -> P.LoginResponse | bytes | None:
        out = self.rewrite(req, resp) if self.rewrite else None
        self.responses.append(out if isinstance(out, P.LoginResponse) else resp)
        return out


# --------------------------------------------------------------------------------------------
# Stage transitions


def test_without_chap_the_login_starts_in_the_operational_stage() -> None:
    # Nothing to authenticate: no security stage (RFC 7143 §6.3), as open-iscsi does; one
    # round trip in all, the declarations with the operational keys.
    target = FakeTarget()
    success, lb = succeed(target, machine())
    assert transitions(lb) == [(1, 3)]
    reqs = requests(lb)
    assert len(reqs) == 1 and reqs[0].csg is P.Stage.OPERATIONAL
    first = dict(decode(reqs[0].data))
    assert first["InitiatorName"] == INI and first["TargetName"] == TGT
    assert first["SessionType"] == "Normal" and "AuthMethod" not in first
    assert first["HeaderDigest"] == "None" and "MaxRecvDataSegmentLength" in first
    assert all(r.isid == ISID and r.tsih == 0 and r.itt == 0 for r in reqs)
    assert success.tsih == target.logins[0].tsih != 0
    assert success.parameters.auth_method == "None"
    assert success.parameters.target_portal_group_tag == 1
    record = target.logins[0]
    assert record.isid == ISID and record.tsih_requested == 0 and record.auth_method == "None"


def test_login_numbers_carry_into_full_feature_phase() -> None:
    target = FakeTarget(initial_stat_sn=0xFFFFFFFE, cmd_window=7,
                        hostile=Hostility(hold_transit=1))
    m = LoginMachine(initiator_name=INI, target_name=TGT, isid=ISID, cmd_sn=0xFFFFFFFF, itt=5)
    success, lb = succeed(target, m)
    # Login requests are immediate and do not consume CmdSN (§11.12).
    assert all(r.cmd_sn == 0xFFFFFFFF and r.itt == 5 for r in requests(lb))
    assert success.cmd_sn == 0xFFFFFFFF
    assert success.exp_cmd_sn == 0xFFFFFFFF
    assert success.max_cmd_sn == (0xFFFFFFFF + 6) & 0xFFFFFFFF
    # Two responses: StatSN 0xFFFFFFFE then 0xFFFFFFFF; the next expected wraps to 0.
    assert success.exp_stat_sn == 0
    # Every request acknowledges the last StatSN it saw.
    assert [r.exp_stat_sn for r in requests(lb)] == [0, 0xFFFFFFFF]


def test_target_holding_transit_adds_rounds() -> None:
    target = FakeTarget(hostile=Hostility(hold_transit=2))
    success, lb = succeed(target, machine())
    assert success.tsih
    assert transitions(lb)[-1] == (1, 3)
    assert len(requests(lb)) > 2


def test_target_offering_operational_keys_takes_another_round() -> None:
    settings = NegotiationSettings.rfc_defaults(
        max_burst_length=65536, first_burst_length=4096, max_outstanding_r2t=4,
        offer=("MaxBurstLength", "FirstBurstLength", "MaxOutstandingR2T",
               "MaxRecvDataSegmentLength"))
    target = FakeTarget(settings=settings)
    success, lb = succeed(target, machine())
    params = success.parameters
    assert params.max_burst_length == 65536
    assert params.first_burst_length == 4096
    assert params.max_outstanding_r2t == 1  # MIN of our 1 and the target's 4
    assert transitions(lb)[-1] == (1, 3)


def test_security_straight_to_full_feature_is_refused() -> None:
    # We always ask for NSG=Operational in the security stage, so a target may not jump to
    # Full Feature Phase from there (§6.3: it may not go beyond the stage we asked for).
    def jump(req: P.LoginRequest, resp: P.LoginResponse) -> P.LoginResponse | None:
        if resp.transit and resp.csg == P.Stage.SECURITY:
            return dataclasses.replace(resp, nsg=P.Stage.FULL_FEATURE, tsih=7)
        return None

    target = FakeTarget(chap=ONE_WAY, hostile=Hostility(login_hook=jump))
    with pytest.raises(RemoteProtocolError, match="did not ask for"):
        run(target, machine(credentials=ONE_WAY))


def test_start_twice_is_refused() -> None:
    m = machine()
    m.start()
    with pytest.raises(ISCSIError):
        m.start()


def test_discovery_session_login() -> None:
    target = FakeTarget()
    success, lb = succeed(target, machine(target_name=None))
    first = dict(decode(requests(lb)[0].data))
    assert first["SessionType"] == "Discovery" and "TargetName" not in first
    assert success.parameters.session_type is SessionType.DISCOVERY
    assert target.logins[0].session_type == "Discovery"


@pytest.mark.parametrize(("hd", "dd", "target_hd", "target_dd", "expect"), [
    ("CRC32C", "CRC32C", ("CRC32C", "None"), ("CRC32C", "None"), (True, True)),
    ("CRC32C,None", "None", ("None",), ("CRC32C", "None"), (False, False)),
    ("None,CRC32C", "CRC32C,None", ("CRC32C", "None"), ("CRC32C",), (False, True)),
])
def test_digest_negotiation(hd: str, dd: str, target_hd: tuple[str, ...],
                            target_dd: tuple[str, ...], expect: tuple[bool, bool]) -> None:
    target = FakeTarget(settings=NegotiationSettings.rfc_defaults(
        header_digest=target_hd, data_digest=target_dd))
    success, _ = succeed(target, machine(header_digest=hd, data_digest=dd))
    assert (success.parameters.header_digest, success.parameters.data_digest) == expect


def test_required_digest_refused_fails_the_login() -> None:
    target = FakeTarget(settings=NegotiationSettings.rfc_defaults(header_digest=("None",)))
    with pytest.raises(NegotiationError, match="HeaderDigest"):
        run(target, machine(header_digest="CRC32C"))


# --------------------------------------------------------------------------------------------
# CHAP


ALGORITHMS = available_algorithms()


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda a: a.name)
def test_chap_one_way_each_algorithm(algorithm: ChapAlgorithm) -> None:
    target = FakeTarget(chap=ONE_WAY, chap_algorithms=(algorithm,))
    success, lb = succeed(target, machine(credentials=ONE_WAY))
    record = target.logins[0]
    assert record.auth_method == "CHAP" and record.chap_algorithm is algorithm
    assert success.parameters.auth_method == "CHAP"
    texts = [dict(decode(r.data)) for r in requests(lb)]
    assert texts[0]["AuthMethod"] == "CHAP"
    assert "CHAP_A" in texts[1]
    assert texts[2]["CHAP_N"] == "ini-user"
    r_value = texts[2]["CHAP_R"]
    assert len(bytes.fromhex(r_value[2:])) == chap_hash(algorithm).digest_size
    # One-way CHAP: the response goes with T=1, straight to the operational stage.
    assert transitions(lb) == [(0, 1), (1, 3)]
    assert requests(lb)[2].transit


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda a: a.name)
def test_chap_mutual_each_algorithm(algorithm: ChapAlgorithm) -> None:
    target = FakeTarget(chap=MUTUAL, chap_algorithms=(algorithm,), require_mutual=True)
    success, lb = succeed(target, machine(credentials=MUTUAL))
    assert target.logins[0].chap_algorithm is algorithm
    texts = [dict(decode(r.data)) for r in requests(lb)]
    assert {"CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C"} <= set(texts[2])
    # Our response and challenge ask to leave the security stage (RFC 7143 Appendix B.1);
    # the target's CHAP_R comes with its transit and is checked before we move on.
    assert requests(lb)[2].transit
    assert transitions(lb) == [(0, 1), (1, 3)]
    assert success.parameters.auth_method == "CHAP"


def test_chap_algorithm_preference_is_ours_when_target_accepts_all() -> None:
    target = FakeTarget(chap=ONE_WAY)
    succeed(target, machine(credentials=ONE_WAY))
    assert target.logins[0].chap_algorithm is ALGORITHMS[0]


def test_default_credentials_offer_md5_alone() -> None:
    target = FakeTarget(chap=ONE_WAY)
    succeed(target, machine(credentials=ChapCredentials(INITIATOR_ACCOUNT)))
    assert target.logins[0].chap_algorithm is ChapAlgorithm.MD5


def test_wrong_secret_is_an_authentication_error() -> None:
    wrong = ChapCredentials(ChapAccount("ini-user", Secret("not-the-secret-1")))
    target = FakeTarget(chap=ONE_WAY)
    with pytest.raises(LoginAuthenticationError) as info:
        run(target, machine(credentials=wrong))
    err = info.value
    assert (err.status_class, err.status_detail) == (2, 1)
    assert "chapSecret" in str(err) and "ini-user" in str(err)
    assert not err.retryable
    assert target.logins[0].status == (2, 1)


def test_wrong_target_secret_in_mutual_chap() -> None:
    impostor = ChapCredentials(INITIATOR_ACCOUNT, ChapAccount("tgt-user",
                                                              Secret("impostor-secret-9")))
    target = FakeTarget(chap=impostor)
    with pytest.raises(AuthenticationError, match="tgtChapSecret"):
        run(target, machine(credentials=MUTUAL))


def test_target_requiring_mutual_chap_refuses_one_way() -> None:
    target = FakeTarget(chap=MUTUAL, require_mutual=True)
    with pytest.raises(LoginAuthenticationError):
        run(target, machine(credentials=ONE_WAY))


def test_target_requiring_chap_refuses_initiator_without_credentials() -> None:
    target = FakeTarget(chap=ONE_WAY)
    with pytest.raises(LoginAuthenticationError, match="authentication failed") as info:
        run(target, machine())
    assert "0x0201" in str(info.value)
    # How to give credentials, in a URL as in the configuration.
    assert "requires CHAP" in str(info.value) and "<user>%<secret>@ in a URL" in str(info.value)
    assert "chapIName/chapSecret in the configuration" in str(info.value)


def test_target_choosing_auth_none_when_we_have_credentials_fails() -> None:
    # We offered only CHAP, so AuthMethod=None is an answer we never allowed.
    target = FakeTarget(chap=ONE_WAY, hostile=Hostility(force_auth_method="None"))
    with pytest.raises(ISCSIError) as info:
        run(target, machine(credentials=ONE_WAY))
    assert isinstance(info.value, NegotiationError | AuthenticationError)
    assert "AuthMethod" in str(info.value)


def test_target_rejecting_every_auth_method() -> None:
    target = FakeTarget(chap=ONE_WAY, hostile=Hostility(force_auth_method="Reject"))
    with pytest.raises(NegotiationError, match="authentication"):
        run(target, machine(credentials=ONE_WAY))


def test_target_skipping_chap_fails() -> None:
    target = FakeTarget(chap=ONE_WAY, hostile=Hostility(skip_chap=True))
    with pytest.raises(ISCSIError):
        run(target, machine(credentials=ONE_WAY))


def test_target_skipping_mutual_chap_answer_fails() -> None:
    target = FakeTarget(chap=MUTUAL, hostile=Hostility(skip_mutual_response=True))
    with pytest.raises(AuthenticationError, match="CHAP_N"):
        run(target, machine(credentials=MUTUAL))


def test_target_leaving_security_stage_before_mutual_answer_fails() -> None:
    def leave(req: P.LoginRequest, resp: P.LoginResponse) -> P.LoginResponse | None:
        if "CHAP_C" in dict(decode(req.data)):
            return dataclasses.replace(resp, transit=True, data=b"",
                                       nsg=P.Stage.OPERATIONAL)
        return None

    target = FakeTarget(chap=MUTUAL, hostile=Hostility(login_hook=leave))
    with pytest.raises(ISCSIError):
        run(target, machine(credentials=MUTUAL))


def test_chap_keys_without_chap_are_refused() -> None:
    def add_chap(req: P.LoginRequest, resp: P.LoginResponse) -> P.LoginResponse | None:
        return dataclasses.replace(resp, data=bytes(resp.data) + encode([("CHAP_A", "5")]))

    target = FakeTarget(hostile=Hostility(login_hook=add_chap))
    with pytest.raises(RemoteProtocolError, match="CHAP"):
        run(target, machine())


# --------------------------------------------------------------------------------------------
# C bit


def test_target_text_split_with_c_bit() -> None:
    recorder = Recorder()
    target = FakeTarget(login_chunk=16, hostile=Hostility(login_hook=recorder))
    success, lb = succeed(target, machine())
    assert success.tsih
    assert sum(r.cont for r in recorder.responses) >= 3
    # Each continued piece was fetched with an empty request that does not ask to move on.
    reqs = requests(lb)
    assert any(not r.data and not r.transit for r in reqs)
    # T is set only on the last piece of the target's text.
    assert not any(r.transit and r.cont for r in recorder.responses)


def test_initiator_text_split_with_c_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(L, "LOGIN_SEGMENT_LENGTH", 24)
    recorder = Recorder()
    target = FakeTarget(hostile=Hostility(login_hook=recorder))
    success, lb = succeed(target, machine())
    assert success.tsih
    reqs = requests(lb)
    pieces = [r for r in reqs if r.cont]
    assert len(pieces) >= 5
    assert all(len(r.data) <= 24 for r in reqs)
    assert not any(r.transit and r.cont for r in reqs)
    # The target acknowledges every piece with an empty response.
    assert sum(1 for r in recorder.responses if not r.data) >= len(pieces)


def test_c_bit_in_both_directions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(L, "LOGIN_SEGMENT_LENGTH", 40)
    target = FakeTarget(login_chunk=20, chap=MUTUAL)
    success, lb = succeed(target, machine(credentials=MUTUAL))
    assert success.parameters.auth_method == "CHAP"
    assert any(r.cont for r in requests(lb))


def test_t_and_c_together_are_refused() -> None:
    def both(req: P.LoginRequest, resp: P.LoginResponse) -> P.LoginResponse | None:
        return dataclasses.replace(resp, cont=True) if resp.transit else None

    target = FakeTarget(hostile=Hostility(login_hook=both))
    with pytest.raises(RemoteProtocolError, match="T and C"):
        run(target, machine())


# --------------------------------------------------------------------------------------------
# Redirects and statuses


@pytest.mark.parametrize("permanent", [False, True])
@pytest.mark.parametrize(("address", "portal"), [
    ("198.51.100.7:3261,2", Portal("198.51.100.7", 3261, 2)),
    ("[2001:db8::7]:3262,3", Portal("2001:db8::7", 3262, 3)),
    ("target.example.com", Portal("target.example.com", 3260, None)),
])
def test_redirect(permanent: bool, address: str, portal: Portal) -> None:
    target = FakeTarget(hostile=Hostility(redirect=(address, permanent)))
    outcome, lb = run(target, machine())
    assert outcome == LoginRedirect(portal, permanent)
    assert lb.conn.closing
    assert target.logins[0].status == (1, 2 if permanent else 1)


def test_redirect_without_address_is_an_error() -> None:
    def strip(req: P.LoginRequest, resp: P.LoginResponse) -> P.LoginResponse | None:
        return dataclasses.replace(resp, data=b"")

    target = FakeTarget(hostile=Hostility(redirect=("198.51.100.7", False), login_hook=strip))
    with pytest.raises(LoginError, match="without a TargetAddress"):
        run(target, machine())


@pytest.mark.parametrize(("address", "why"), [
    ("[fe80::1", "closing"),
    ("a..b:3260", "not a valid host name"),          # IDNA: empty label
    ("x" * 70 + ".example", "not a valid host name"),  # IDNA: label over 63 characters
    (".", "not a valid host name"),
    ("bad host", "spaces or control characters"),
    ("\x1b]0;x\x07:3260", "spaces or control characters"),
    (".".join(["h" * 60] * 5), "longer than 253"),
])
def test_redirect_to_a_malformed_address_is_an_error(address: str, why: str) -> None:
    # A name that name resolution cannot even encode must fail here, with the address in the
    # message, not as a UnicodeError out of getaddrinfo later.
    target = FakeTarget(hostile=Hostility(redirect=(address, True)))
    with pytest.raises(LoginError, match="not a portal address") as info:
        run(target, machine())
    assert why in str(info.value)


@pytest.mark.parametrize("status", sorted(LOGIN_STATUS), ids=lambda s: f"{s[0]:02x}{s[1]:02x}")
def test_every_status_of_the_table_has_its_outcome(status: tuple[int, int]) -> None:
    hostile = Hostility(redirect=("198.51.100.1:3260,1", status[1] == 2)) if status[0] == 1 \
        else Hostility(login_status=status if status[0] else None)
    target = FakeTarget(hostile=hostile)
    if status[0] == 0:
        assert isinstance(run(target, machine())[0], LoginSuccess)
    elif status[0] == 1:
        outcome = run(target, machine())[0]
        assert isinstance(outcome, LoginRedirect) and outcome.permanent == (status[1] == 2)
    else:
        with pytest.raises(LoginError):
            run(target, machine())
    assert target.logins[0].status == status


EXPECTED_CLASS: dict[tuple[int, int], type[LoginError]] = {
    (2, 0x01): LoginAuthenticationError,
    (2, 0x02): LoginAuthorizationError,
    (2, 0x03): TargetNotFoundError,
    (2, 0x04): TargetNotFoundError,
}
FAILURES = sorted(k for k in LOGIN_STATUS if k[0] >= 2)


@pytest.mark.parametrize("stage", [0, 1], ids=["security", "operational"])
@pytest.mark.parametrize("status", FAILURES, ids=lambda s: f"{s[0]:02x}{s[1]:02x}")
def test_every_failure_status_maps_to_a_typed_error(status: tuple[int, int], stage: int) -> None:
    # A security stage only with CHAP (without, the login starts in the operational stage).
    chap = ONE_WAY if stage == 0 else None
    target = FakeTarget(chap=chap, hostile=Hostility(login_status=status,
                                                     login_status_stage=stage))
    with pytest.raises(LoginError) as info:
        run(target, machine(credentials=chap))
    err = info.value
    assert type(err) is EXPECTED_CLASS.get(status, LoginError)
    assert (err.status_class, err.status_detail) == status
    name, advice = LOGIN_STATUS[status]
    text = str(err)
    assert name in text and advice in text
    assert f"0x{status[0]:02x}{status[1]:02x}" in text
    assert TGT in text and PORTAL in text
    assert err.retryable == (status[0] == 3 or status in ((2, 6), (2, 8), (2, 0x0A)))


@pytest.mark.parametrize("status", [(1, 0x03), (2, 0x7F), (3, 0x42), (9, 0x01)])
def test_unknown_status_is_still_a_readable_login_error(status: tuple[int, int]) -> None:
    target = FakeTarget(hostile=Hostility(login_status=status))
    with pytest.raises(LoginError) as info:
        run(target, machine())
    assert f"status class {status[0]}" in str(info.value)
    assert "RFC 7143" in str(info.value)


def test_unknown_target_name_is_target_not_found() -> None:
    target = FakeTarget([TargetNode("iqn.2003-01.org.example:other")])
    with pytest.raises(TargetNotFoundError, match="discovery"):
        run(target, machine())


def test_discovery_failure_message_names_discovery() -> None:
    target = FakeTarget(hostile=Hostility(login_status=(3, 1)))
    with pytest.raises(LoginError, match="discovery") as info:
        run(target, machine(target_name=None))
    assert info.value.retryable


def test_status_with_wrong_isid_is_still_reported() -> None:
    # Some targets (tgtd) reject a login without echoing the ISID: the status matters more.
    target = FakeTarget(hostile=Hostility(login_status=(2, 3), login_isid_xor=0xFF))
    with pytest.raises(TargetNotFoundError):
        run(target, machine())


# --------------------------------------------------------------------------------------------
# Malformed responses


def _rewrite(**changes: object) -> Callable[[P.LoginRequest, P.LoginResponse],
                                            P.LoginResponse | None]:
    def hook(req: P.LoginRequest, resp: P.LoginResponse) -> P.LoginResponse | None:
        return dataclasses.replace(resp, **changes)  # type: ignore[arg-type]
    return hook


@pytest.mark.parametrize(("hostile", "error", "match"), [
    (Hostility(login_itt_xor=1), RemoteProtocolError, "not ours"),
    (Hostility(login_isid_xor=1 << 20), RemoteProtocolError, "not ours"),
    (Hostility(version_active=1), LoginError, "version 1"),
    (Hostility(zero_tsih=True), RemoteProtocolError, "TSIH"),
    (Hostility(login_hook=_rewrite(csg=P.Stage.SECURITY)),
     RemoteProtocolError, "stage"),
    (Hostility(login_hook=_rewrite(data=b"AuthMethod=None")), PDUFormatError, "NUL"),
    (Hostility(login_hook=_rewrite(data=b"AuthMethod=None\0AuthMethod=None\0")),
     PDUFormatError, "more than once"),
    (Hostility(login_hook=_rewrite(data=b"\xff\xfe=1\0")), PDUFormatError, "ASCII"),
    (Hostility(login_hook=_rewrite(data=b"MaxBurstLength=256\0")), NegotiationError,
     "MaxBurstLength"),
])
def test_malformed_responses(hostile: Hostility, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        run(FakeTarget(hostile=hostile), machine())


@pytest.mark.parametrize("data", [
    b"AuthMethod=None",                       # no NUL at the end
    b"AuthMethod=None\0AuthMethod=None\0",    # a key twice
    b"\xff\xfe=1\0",                          # a key that is no ASCII
    b"AuthMethod=None\0X-Alias=\xff\0",       # a value that is no UTF-8
])
def test_malformed_text_names_the_target_that_sent_it(data: bytes) -> None:
    # The text module says what is wrong, not who sent it: without the target's name
    # "key AuthMethod appears more than once" reads like a mistake in our configuration.
    with pytest.raises(PDUFormatError) as info:
        run(FakeTarget(hostile=Hostility(login_hook=_rewrite(data=data))), machine())
    assert f"target {TGT} at {PORTAL}" in str(info.value)
    assert "sent a Login Response whose text is malformed" in str(info.value)


def test_version_mismatch_carries_status() -> None:
    with pytest.raises(LoginError) as info:
        run(FakeTarget(hostile=Hostility(version_active=3)), machine())
    assert (info.value.status_class, info.value.status_detail) == (2, 5)


def test_transit_back_to_an_earlier_stage_is_refused() -> None:
    def back(req: P.LoginRequest, resp: P.LoginResponse) -> P.LoginResponse | None:
        if resp.transit and resp.csg == P.Stage.OPERATIONAL:
            return dataclasses.replace(resp, nsg=P.Stage.SECURITY)
        return None

    with pytest.raises(RemoteProtocolError):
        run(FakeTarget(hostile=Hostility(login_hook=back)), machine())


def test_transit_we_did_not_ask_for_is_refused() -> None:
    # With credentials our first request has T=0; a target answering T=1 skips CHAP.
    def force(req: P.LoginRequest, resp: P.LoginResponse) -> P.LoginResponse | None:
        return dataclasses.replace(resp, transit=True,
                                   nsg=P.Stage.OPERATIONAL)

    target = FakeTarget(chap=ONE_WAY, hostile=Hostility(login_hook=force))
    with pytest.raises(RemoteProtocolError, match="did not ask for"):
        run(target, machine(credentials=ONE_WAY))


def test_target_ending_login_with_unanswered_offer() -> None:
    # The target transits to Full Feature Phase while offering a key we must answer.
    def offer(req: P.LoginRequest, resp: P.LoginResponse) -> P.LoginResponse | None:
        if resp.transit and resp.nsg == P.Stage.FULL_FEATURE:
            return dataclasses.replace(resp, data=bytes(resp.data) + encode(
                [("MaxOutstandingR2T", "4")]))
        return None

    with pytest.raises(RemoteProtocolError, match="MaxOutstandingR2T"):
        run(FakeTarget(hostile=Hostility(login_hook=offer)), machine())


def test_target_ending_login_without_answering_our_offers() -> None:
    def drop_answers(req: P.LoginRequest, resp: P.LoginResponse) -> P.LoginResponse | None:
        if resp.csg == P.Stage.OPERATIONAL:
            return dataclasses.replace(resp, data=b"")
        return None

    with pytest.raises(NegotiationError, match="without answering"):
        run(FakeTarget(hostile=Hostility(login_hook=drop_answers)), machine())


def test_non_login_pdu_during_login() -> None:
    m = machine()
    m.start()
    with pytest.raises(RemoteProtocolError, match="NopIn"):
        m.receive(P.NopIn(itt=0))


def test_garbage_instead_of_a_response() -> None:
    target = FakeTarget(hostile=Hostility(login_hook=lambda req, resp: b"\x3f" * 48))
    with pytest.raises(ISCSIError):
        run(target, machine())


def test_a_target_address_zone_is_decoded_and_checked_escaped() -> None:
    assert Portal.parse("[fe80::1%25eth0]:3261,2") == Portal("fe80::1%eth0", 3261, 2)
    assert Portal.parse("fe80::1%25eth0") == Portal("fe80::1%eth0", 3260)
    # A target's zone was taken whatever it held, terminal escapes included.
    with pytest.raises(ConfigurationError) as exc:
        Portal.parse("[fe80::1%\x1b[2J]:3260,1")
    assert "\x1b" not in str(exc.value) and "'\\x1b[2J'" in str(exc.value)


def test_a_huge_redirect_address_makes_a_short_error() -> None:
    # The address a target redirects to was quoted whole: 60 KiB sent, a 60 KiB line shown.
    target = FakeTarget(hostile=Hostility(redirect=("h" * 60_000 + ":3260", True)))
    with pytest.raises(LoginError, match="not a portal address") as info:
        run(target, machine())
    assert len(str(info.value)) < 1000
