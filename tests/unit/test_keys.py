"""Unit tests for initiator.keys: the key table and the Negotiator (RFC 7143 §6, §13)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from initiator.errors import (
    ConfigurationError,
    LocalProtocolError,
    NegotiationError,
    RemoteProtocolError,
)
from initiator.keys import (
    DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH,
    DIGEST_CRC32C_PREFERRED,
    DIGEST_CRC32C_REQUIRED,
    INITIATOR_OFFERS,
    KEYS,
    TARGET_OFFERS,
    Irrelevance,
    Kind,
    MissingParameter,
    NegotiationFailed,
    NegotiationSettings,
    NegotiationViolation,
    Negotiator,
    Phase,
    Role,
    Rule,
    Scope,
    SessionParameters,
    SessionType,
    Use,
    key_def,
)
from initiator.pdu import Stage
from initiator.text import Pair, TextAssembler, decode, encode, split_text

INI = "iqn.2024-01.org.example:initiator"
TGT = "iqn.2024-01.org.example:target"
LOGIN_STAGES = (Stage.SECURITY, Stage.OPERATIONAL)


def make_initiator(*, leading: bool = True, **settings: Any) -> Negotiator:
    settings.setdefault("initiator_name", INI)
    settings.setdefault("target_name", TGT)
    return Negotiator(Role.INITIATOR, NegotiationSettings(**settings), leading=leading)


def make_target(*, leading: bool = True, **settings: Any) -> Negotiator:
    return Negotiator(Role.TARGET, NegotiationSettings.rfc_defaults(**settings), leading=leading)


def make(role: Role, **settings: Any) -> Negotiator:
    return make_initiator(**settings) if role is Role.INITIATOR else make_target(**settings)


def over_the_wire(pairs: list[Pair], max_segment: int) -> list[Pair]:
    """Encode, cut into PDU-sized pieces, reassemble and decode, as a real connection would."""
    assembler = TextAssembler()
    result: list[Pair] | None = None
    for piece in split_text(encode(pairs), max_segment):
        result = assembler.feed(piece.data, piece.more)
    assert result is not None
    return result


def negotiate(
    ini: Negotiator,
    tgt: Negotiator,
    stages: tuple[Stage, ...] = LOGIN_STAGES,
) -> tuple[SessionParameters, SessionParameters]:
    """Drive a whole login negotiation between two Negotiators in memory."""
    for stage in stages:
        to_target = ini.offer(stage)
        for _ in range(8):
            got = tgt.receive(over_the_wire(to_target, 8192), stage)
            to_initiator = list(got.answers) + tgt.offer(stage)
            got = ini.receive(over_the_wire(to_initiator, 8192), stage)
            to_target = list(got.answers) + ini.offer(stage)
            if not to_target and ini.complete and tgt.complete:
                break
        else:  # pragma: no cover - a negotiation that does not converge is a bug
            raise AssertionError("negotiation did not converge")
    return ini.finish(), tgt.finish()


def answers(neg: Negotiator, pairs: list[Pair], stage: Stage = Stage.OPERATIONAL) -> dict[str, str]:
    return dict(neg.receive(pairs, stage).answers)


# --- the table ------------------------------------------------------------------------------


# (key, rule, default, minimum, maximum, use, scope, reference)
TABLE_EXPECTATIONS = [
    ("HeaderDigest", Rule.SELECT, "None", None, None, Use.INITIALIZE_ONLY, Scope.CONNECTION,
     "13.1"),
    ("DataDigest", Rule.SELECT, "None", None, None, Use.INITIALIZE_ONLY, Scope.CONNECTION,
     "13.1"),
    ("MaxConnections", Rule.MIN, 1, 1, 65535, Use.LEADING_ONLY, Scope.SESSION, "13.2"),
    ("SendTargets", Rule.DELEGATE, None, None, None, Use.FULL_FEATURE_ONLY, Scope.SESSION, "13.3"),
    ("TargetName", Rule.DECLARE, None, None, None, Use.INITIALIZE_ONLY, Scope.SESSION, "13.4"),
    ("InitiatorName", Rule.DECLARE, None, None, None, Use.INITIALIZE_ONLY, Scope.SESSION, "13.5"),
    ("TargetAlias", Rule.DECLARE, None, None, None, Use.ALL, Scope.SESSION, "13.6"),
    ("InitiatorAlias", Rule.DECLARE, None, None, None, Use.ALL, Scope.SESSION, "13.7"),
    ("TargetAddress", Rule.DECLARE, None, None, None, Use.ALL, Scope.SESSION, "13.8"),
    ("TargetPortalGroupTag", Rule.DECLARE, None, 0, 65535, Use.INITIALIZE_ONLY, Scope.SESSION,
     "13.9"),
    ("InitialR2T", Rule.OR, True, None, None, Use.LEADING_ONLY, Scope.SESSION, "13.10"),
    ("ImmediateData", Rule.AND, True, None, None, Use.LEADING_ONLY, Scope.SESSION, "13.11"),
    ("MaxRecvDataSegmentLength", Rule.DECLARE, 8192, 512, 2**24 - 1, Use.ALL, Scope.CONNECTION,
     "13.12"),
    ("MaxBurstLength", Rule.MIN, 262144, 512, 2**24 - 1, Use.LEADING_ONLY, Scope.SESSION, "13.13"),
    ("FirstBurstLength", Rule.MIN, 65536, 512, 2**24 - 1, Use.LEADING_ONLY, Scope.SESSION,
     "13.14"),
    ("DefaultTime2Wait", Rule.MAX, 2, 0, 3600, Use.LEADING_ONLY, Scope.SESSION, "13.15"),
    ("DefaultTime2Retain", Rule.MIN, 20, 0, 3600, Use.LEADING_ONLY, Scope.SESSION, "13.16"),
    ("MaxOutstandingR2T", Rule.MIN, 1, 1, 65535, Use.LEADING_ONLY, Scope.SESSION, "13.17"),
    ("DataPDUInOrder", Rule.OR, True, None, None, Use.LEADING_ONLY, Scope.SESSION, "13.18"),
    ("DataSequenceInOrder", Rule.OR, True, None, None, Use.LEADING_ONLY, Scope.SESSION, "13.19"),
    ("ErrorRecoveryLevel", Rule.MIN, 0, 0, 2, Use.LEADING_ONLY, Scope.SESSION, "13.20"),
    ("SessionType", Rule.DECLARE, "Normal", None, None, Use.LEADING_ONLY, Scope.SESSION, "13.21"),
    ("TaskReporting", Rule.SELECT, "RFC3720", None, None, Use.LEADING_ONLY, Scope.SESSION,
     "13.23"),
    ("iSCSIProtocolLevel", Rule.MIN, 1, 0, 31, Use.LEADING_ONLY, Scope.SESSION, "13.24"),
    ("AuthMethod", Rule.SELECT, None, None, None, Use.INITIALIZE_ONLY, Scope.CONNECTION, "12.1"),
    ("OFMarker", Rule.OBSOLETE, None, None, None, Use.INITIALIZE_ONLY, Scope.CONNECTION, "13.25"),
    ("IFMarker", Rule.OBSOLETE, None, None, None, Use.INITIALIZE_ONLY, Scope.CONNECTION, "13.25"),
    ("OFMarkInt", Rule.OBSOLETE, None, None, None, Use.INITIALIZE_ONLY, Scope.CONNECTION, "13.25"),
    ("IFMarkInt", Rule.OBSOLETE, None, None, None, Use.INITIALIZE_ONLY, Scope.CONNECTION, "13.25"),
    ("X#NodeArchitecture", Rule.DECLARE, None, None, None, Use.LEADING_ONLY, Scope.SESSION,
     "13.26"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "rule", "default", "minimum", "maximum", "use", "scope", "section"),
    TABLE_EXPECTATIONS,
)
def test_table_entry(
    name: str,
    rule: Rule,
    default: object,
    minimum: int | None,
    maximum: int | None,
    use: Use,
    scope: Scope,
    section: str,
) -> None:
    kd = key_def(name)
    assert kd.name == name
    assert kd.rule is rule
    assert kd.default == default
    if minimum is not None:
        assert (kd.minimum, kd.maximum) == (minimum, maximum)
    assert kd.use is use
    assert kd.scope is scope
    assert f"§{section}" in kd.reference


def test_table_phases_and_senders() -> None:
    assert key_def("AuthMethod").phase is Phase.SECURITY
    for chap in ("CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R"):
        assert key_def(chap).rule is Rule.DELEGATE
        assert key_def(chap).phase is Phase.SECURITY
    for declared in ("InitiatorName", "TargetName", "SessionType", "TargetPortalGroupTag"):
        assert key_def(declared).phase is Phase.ANY
    assert key_def("MaxBurstLength").phase is Phase.OPERATIONAL
    assert key_def("InitiatorName").senders == {Role.INITIATOR}
    assert key_def("SessionType").senders == {Role.INITIATOR}
    assert key_def("TargetAlias").senders == {Role.TARGET}
    assert key_def("TargetPortalGroupTag").senders == {Role.TARGET}
    assert key_def("MaxRecvDataSegmentLength").senders == {Role.INITIATOR, Role.TARGET}
    assert key_def("TargetAddress").repeatable


def test_table_irrelevance() -> None:
    discovery_irrelevant = {
        name for name, kd in KEYS.items() if Irrelevance.DISCOVERY in kd.irrelevant_when
    }
    assert discovery_irrelevant == {
        "MaxConnections", "InitialR2T", "ImmediateData", "MaxBurstLength", "FirstBurstLength",
        "MaxOutstandingR2T", "DataPDUInOrder", "DataSequenceInOrder", "TaskReporting",
        "iSCSIProtocolLevel",
    }  # fmt: skip
    assert key_def("FirstBurstLength").irrelevant_when == {
        Irrelevance.DISCOVERY,
        Irrelevance.NO_UNSOLICITED_DATA,
    }


def test_table_kinds() -> None:
    assert key_def("InitialR2T").kind is Kind.BOOLEAN
    assert key_def("MaxBurstLength").kind is Kind.NUMBER
    assert key_def("HeaderDigest").kind is Kind.LIST
    assert key_def("InitiatorName").kind is Kind.ISCSI_NAME
    assert key_def("TargetAlias").kind is Kind.LOCAL_NAME
    assert key_def("SessionType").kind is Kind.ENUM
    with pytest.raises(KeyError):
        key_def("NoSuchKey")


def test_answer_required_rules() -> None:
    assert not key_def("ImmediateData").answer_required(False)  # AND with No
    assert key_def("ImmediateData").answer_required(True)
    assert not key_def("InitialR2T").answer_required(True)  # OR with Yes
    assert key_def("InitialR2T").answer_required(False)
    assert key_def("MaxBurstLength").answer_required(65536)
    assert key_def("HeaderDigest").answer_required(("None",))
    assert not key_def("MaxRecvDataSegmentLength").answer_required(8192)


# --- settings -------------------------------------------------------------------------------


def test_settings_default_to_open_iscsi() -> None:
    s = NegotiationSettings()
    assert s.max_recv_data_segment_length == 262144
    assert s.max_burst_length == 16776192
    assert s.first_burst_length == 262144
    assert s.immediate_data is True
    assert s.initial_r2t is False
    assert s.header_digest == ("None",) and s.data_digest == ("None",)
    assert s.default_time2wait == 2
    assert s.default_time2retain == 0
    assert s.max_connections == 1
    assert s.max_outstanding_r2t == 1
    assert s.error_recovery_level == 0
    assert s.data_pdu_in_order is True and s.data_sequence_in_order is True


def test_settings_rfc_defaults() -> None:
    s = NegotiationSettings.rfc_defaults(max_burst_length=65536)
    assert s.max_recv_data_segment_length == DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH
    assert s.max_burst_length == 65536
    assert s.first_burst_length == 65536
    assert s.initial_r2t is True
    assert s.default_time2retain == 20


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"max_recv_data_segment_length": 511}, "max_recv_data_segment_length = 511"),
        ({"max_recv_data_segment_length": 2**24}, "512 to 16777215"),
        ({"max_burst_length": 100, "first_burst_length": 100}, "max_burst_length = 100"),
        ({"first_burst_length": 2**24}, "first_burst_length"),
        ({"first_burst_length": 65536, "max_burst_length": 8192}, "MUST NOT exceed"),
        ({"default_time2wait": 3601}, "0 to 3600"),
        ({"default_time2retain": -1}, "default_time2retain"),
        ({"max_connections": 0}, "1 to 65535"),
        ({"max_connections": True}, "max_connections"),
        ({"max_outstanding_r2t": 65536}, "max_outstanding_r2t"),
        ({"error_recovery_level": 3}, "0 to 2"),
        ({"iscsi_protocol_level": 32}, "0 to 31"),
        ({"header_digest": ("MD5",)}, "supported values are CRC32C, None"),
        ({"data_digest": ()}, "non-empty"),
        ({"data_digest": ("None", "None")}, "twice"),
        ({"auth_methods": ("KRB5",)}, "auth_methods"),
        ({"task_reporting": ("FastAbort",)}, "RFC3720"),
        ({"initiator_name": "iqn.bad name"}, "initiator_name"),
        ({"target_alias": "x" * 300}, "target_alias"),
        ({"target_portal_group_tag": 70000}, "0 to 65535"),
        ({"node_architecture": "a b"}, "node_architecture"),
        ({"offer": ("CHAP_A",)}, "CHAP_A"),
        ({"offer": ("Bogus",)}, "Bogus"),
        ({"session_type": "Normal"}, "session_type"),
    ],
)
def test_settings_configuration_errors(overrides: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        NegotiationSettings(**overrides)


def test_negotiator_requires_names_as_initiator() -> None:
    with pytest.raises(ConfigurationError, match="InitiatorName"):
        Negotiator(Role.INITIATOR, NegotiationSettings(target_name=TGT))
    with pytest.raises(ConfigurationError, match="TargetName"):
        Negotiator(Role.INITIATOR, NegotiationSettings(initiator_name=INI))
    # A discovery session names no target.
    Negotiator(
        Role.INITIATOR,
        NegotiationSettings(initiator_name=INI, session_type=SessionType.DISCOVERY),
    )


# --- offers ---------------------------------------------------------------------------------


def test_initiator_security_offer() -> None:
    ini = make_initiator(auth_methods=("CHAP", "None"), initiator_alias="host one")
    assert ini.offer(Stage.SECURITY) == [
        ("InitiatorName", INI),
        ("InitiatorAlias", "host one"),
        ("TargetName", TGT),
        ("SessionType", "Normal"),
        ("AuthMethod", "CHAP,None"),
    ]
    assert ini.awaiting == {"AuthMethod"}
    assert ini.offer(Stage.SECURITY) == []  # each key once


def test_initiator_operational_offer_is_open_iscsi_like() -> None:
    ini = make_initiator()
    ini.offer(Stage.SECURITY)
    assert ini.offer(Stage.OPERATIONAL) == [
        ("HeaderDigest", "None"),
        ("DataDigest", "None"),
        ("DefaultTime2Wait", "2"),
        ("DefaultTime2Retain", "0"),
        ("ErrorRecoveryLevel", "0"),
        ("InitialR2T", "No"),
        ("ImmediateData", "Yes"),
        ("MaxBurstLength", "16776192"),
        ("FirstBurstLength", "262144"),
        ("MaxOutstandingR2T", "1"),
        ("MaxConnections", "1"),
        ("DataPDUInOrder", "Yes"),
        ("DataSequenceInOrder", "Yes"),
        ("MaxRecvDataSegmentLength", "262144"),
    ]
    # OR with Yes needs no answer (§6.2.2); the rest do. Declarations never do.
    assert ini.awaiting == {
        "AuthMethod", "HeaderDigest", "DataDigest", "DefaultTime2Wait", "DefaultTime2Retain",
        "ErrorRecoveryLevel", "InitialR2T", "ImmediateData", "MaxBurstLength",
        "FirstBurstLength", "MaxOutstandingR2T", "MaxConnections",
    }  # fmt: skip
    assert not ini.complete
    assert not ini.has_offers(Stage.OPERATIONAL)


def test_initiator_going_straight_to_operational_stage() -> None:
    # Without authentication the login may start in the operational stage: the declarations
    # come with the operational keys, and AuthMethod (a security key) is never offered.
    ini = make_initiator()
    keys = [k for k, _ in ini.offer(Stage.OPERATIONAL)]
    assert keys[:3] == ["InitiatorName", "TargetName", "SessionType"]
    assert "AuthMethod" not in keys
    # §6.3: stages only move forward; AuthMethod can no longer be offered.
    assert not ini.has_offers(Stage.SECURITY)
    with pytest.raises(LocalProtocolError, match="cannot go back"):
        ini.offer(Stage.SECURITY)
    with pytest.raises(LocalProtocolError, match="cannot go back"):
        ini.receive([("TargetPortalGroupTag", "1")], Stage.SECURITY)


def test_digest_offers() -> None:
    ini = make_initiator(header_digest=DIGEST_CRC32C_PREFERRED, data_digest=DIGEST_CRC32C_REQUIRED)
    offered = dict(ini.offer(Stage.OPERATIONAL))
    assert offered["HeaderDigest"] == "CRC32C,None"
    assert offered["DataDigest"] == "CRC32C"


def test_discovery_initiator_offers_only_relevant_keys() -> None:
    ini = make_initiator(session_type=SessionType.DISCOVERY, target_name=None)
    security = ini.offer(Stage.SECURITY)
    assert ("SessionType", "Discovery") in security
    assert "TargetName" not in dict(security)
    keys = {k for k, _ in ini.offer(Stage.OPERATIONAL)}
    assert keys == {
        "HeaderDigest", "DataDigest", "DefaultTime2Wait", "DefaultTime2Retain",
        "ErrorRecoveryLevel", "MaxRecvDataSegmentLength",
    }  # fmt: skip


def test_first_burst_length_not_offered_without_unsolicited_data() -> None:
    ini = make_initiator(initial_r2t=True, immediate_data=False)
    offered = dict(ini.offer(Stage.OPERATIONAL))
    assert "FirstBurstLength" not in offered
    assert offered["InitialR2T"] == "Yes" and offered["ImmediateData"] == "No"
    # Both answers are optional then: OR with Yes, AND with No.
    assert "InitialR2T" not in ini.awaiting and "ImmediateData" not in ini.awaiting


def test_target_offers() -> None:
    tgt = make_target(target_alias="disk", target_portal_group_tag=3)
    assert tgt.offer(Stage.SECURITY) == [("TargetAlias", "disk"), ("TargetPortalGroupTag", "3")]
    assert tgt.offer(Stage.OPERATIONAL) == [("MaxRecvDataSegmentLength", "8192")]
    assert tgt.complete


def test_non_leading_connection_offers_no_leading_only_keys() -> None:
    ini = make_initiator(leading=False)
    keys = {k for k, _ in ini.offer(Stage.SECURITY) + ini.offer(Stage.OPERATIONAL)}
    assert keys == {
        "InitiatorName", "TargetName", "AuthMethod", "HeaderDigest", "DataDigest",
        "MaxRecvDataSegmentLength",
    }  # fmt: skip


def test_offer_in_full_feature_phase_is_empty() -> None:
    assert make_initiator().offer(Stage.FULL_FEATURE) == []


def test_custom_offer_plan() -> None:
    ini = make_initiator(offer=("InitiatorName", "TargetName", "iSCSIProtocolLevel"))
    assert ini.offer(Stage.SECURITY) == [("InitiatorName", INI), ("TargetName", TGT)]
    assert ini.offer(Stage.OPERATIONAL) == [("iSCSIProtocolLevel", "1")]


# --- answering the peer's offers (both roles) -------------------------------------------------


# (key, our settings, the peer's offer, our expected answer)
RESPONDER_CASES: list[tuple[str, dict[str, Any], str, str]] = [
    # MIN (§6.2.2): the smaller; an offer below the range cannot be met -> Reject.
    ("MaxBurstLength", {"max_burst_length": 262144}, "65536", "65536"),
    ("MaxBurstLength", {"max_burst_length": 262144}, "1048576", "262144"),
    ("MaxBurstLength", {"max_burst_length": 262144}, "0x10000", "65536"),
    ("MaxBurstLength", {"max_burst_length": 262144}, "0bAQAA", "65536"),
    ("MaxBurstLength", {"max_burst_length": 262144}, "100", "Reject"),
    ("MaxBurstLength", {"max_burst_length": 262144}, str(2**25), "262144"),
    ("MaxBurstLength", {"max_burst_length": 262144}, "lots", "Reject"),
    ("MaxBurstLength", {"max_burst_length": 262144}, "065536", "Reject"),
    ("MaxConnections", {"max_connections": 1}, "4", "1"),
    ("DefaultTime2Retain", {"default_time2retain": 20}, "0", "0"),
    ("MaxOutstandingR2T", {"max_outstanding_r2t": 1}, "8", "1"),
    ("ErrorRecoveryLevel", {"error_recovery_level": 0}, "2", "0"),
    ("ErrorRecoveryLevel", {"error_recovery_level": 2}, "1", "1"),
    ("iSCSIProtocolLevel", {"iscsi_protocol_level": 1}, "2", "1"),
    # MAX: the larger; above the range -> Reject.
    ("DefaultTime2Wait", {"default_time2wait": 2}, "5", "5"),
    ("DefaultTime2Wait", {"default_time2wait": 2}, "0", "2"),
    ("DefaultTime2Wait", {"default_time2wait": 2}, "4000", "Reject"),
    # OR
    ("InitialR2T", {"initial_r2t": False}, "No", "No"),
    ("InitialR2T", {"initial_r2t": False}, "Yes", "Yes"),
    ("InitialR2T", {"initial_r2t": True}, "No", "Yes"),
    ("InitialR2T", {"initial_r2t": True}, "maybe", "Reject"),
    ("DataPDUInOrder", {"data_pdu_in_order": False}, "No", "No"),
    ("DataPDUInOrder", {"data_pdu_in_order": True}, "No", "Yes"),
    ("DataSequenceInOrder", {"data_sequence_in_order": False}, "Yes", "Yes"),
    ("DataSequenceInOrder", {"data_sequence_in_order": False}, "No", "No"),
    # AND
    ("ImmediateData", {"immediate_data": True}, "Yes", "Yes"),
    ("ImmediateData", {"immediate_data": True}, "No", "No"),
    ("ImmediateData", {"immediate_data": False}, "Yes", "No"),
    # SELECT (§6.2.1): first acceptable value in the offerer's order; unknown values ignored.
    ("HeaderDigest", {"header_digest": ("None",)}, "CRC32C,None", "None"),
    ("HeaderDigest", {"header_digest": DIGEST_CRC32C_PREFERRED}, "CRC32C,None", "CRC32C"),
    ("HeaderDigest", {"header_digest": DIGEST_CRC32C_PREFERRED}, "None,CRC32C", "None"),
    ("HeaderDigest", {"header_digest": DIGEST_CRC32C_REQUIRED}, "None", "Reject"),
    ("HeaderDigest", {"header_digest": ("None",)}, "Fancy,None", "None"),
    ("DataDigest", {"data_digest": DIGEST_CRC32C_PREFERRED}, "CRC32C", "CRC32C"),
    ("DataDigest", {"data_digest": ("None",)}, "CRC32C", "Reject"),
    ("TaskReporting", {}, "ResponseFence,FastAbort,RFC3720", "RFC3720"),
    ("TaskReporting", {"task_reporting": ("FastAbort", "RFC3720")}, "ResponseFence,FastAbort",
     "FastAbort"),
    # §13.25: obsolete markers are answered Reject, never NotUnderstood.
    ("OFMarker", {}, "No", "Reject"),
    ("IFMarker", {}, "Yes", "Reject"),
    ("OFMarkInt", {}, "1~65535", "Reject"),
    ("IFMarkInt", {}, "2048~2048", "Reject"),
]  # fmt: skip


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize(("key", "ours", "offered", "expected"), RESPONDER_CASES)
def test_responder(role: Role, key: str, ours: dict[str, Any], offered: str, expected: str) -> None:
    neg = make(role, **ours)
    assert answers(neg, [(key, offered)]) == {key: expected}
    # Answering settles the key: we will not offer it ourselves, and a second offer is a
    # renegotiation (§6.2).
    assert key not in dict(neg.offer(Stage.OPERATIONAL))
    with pytest.raises(NegotiationViolation, match="already negotiated"):
        neg.receive([(key, offered)], Stage.OPERATIONAL)


@pytest.mark.parametrize("role", list(Role))
def test_responder_outcomes_reach_parameters(role: Role) -> None:
    neg = make(role, max_burst_length=262144, header_digest=DIGEST_CRC32C_PREFERRED)
    if role is Role.TARGET:
        neg.receive([("InitiatorName", INI), ("TargetName", TGT)], Stage.SECURITY)
    neg.receive(
        [("MaxBurstLength", "65536"), ("HeaderDigest", "CRC32C,None"), ("InitialR2T", "Yes")],
        Stage.OPERATIONAL,
    )
    neg.offer(Stage.OPERATIONAL)
    if role is Role.INITIATOR:
        # Answer our remaining offers as a default-valued target would.
        neg.receive([(k, _echo(k, v)) for k, v in _pending(neg)], Stage.OPERATIONAL)
    params = neg.finish()
    assert params.max_burst_length == 65536
    assert params.header_digest is True
    assert params.initial_r2t is True


def _pending(neg: Negotiator) -> list[Pair]:
    return [(k, "") for k in sorted(neg.awaiting)]


def _echo(key: str, _: str) -> str:
    # An admissible answer to any of the initiator's default offers.
    return {
        "DataDigest": "None",
        "DefaultTime2Wait": "2",
        "DefaultTime2Retain": "0",
        "ErrorRecoveryLevel": "0",
        "ImmediateData": "Yes",
        "FirstBurstLength": "65536",
        "MaxOutstandingR2T": "1",
        "MaxConnections": "1",
    }[key]


@pytest.mark.parametrize("role", list(Role))
def test_unknown_keys_are_not_understood(role: Role) -> None:
    neg = make(role)
    got = neg.receive(
        [("X-com.example.Feature", "On"), ("FancyNewKey", "7")], Stage.OPERATIONAL
    )
    assert got.answers == (
        ("X-com.example.Feature", "NotUnderstood"),
        ("FancyNewKey", "NotUnderstood"),
    )
    assert neg.not_understood == {"X-com.example.Feature", "FancyNewKey"}


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("reserved", ["NotUnderstood", "Reject", "Irrelevant"])
def test_reserved_values_are_answers_only(role: Role, reserved: str) -> None:
    neg = make(role)
    with pytest.raises(NegotiationViolation, match="never offered"):
        neg.receive([("MaxBurstLength", reserved)], Stage.OPERATIONAL)
    neg = make(role)
    with pytest.raises(NegotiationViolation, match="never offered"):
        neg.receive([("X-com.example.Thing", reserved)], Stage.OPERATIONAL)


def test_target_answers_irrelevant_in_discovery_session() -> None:
    tgt = make_target()
    tgt.receive([("InitiatorName", INI), ("SessionType", "Discovery")], Stage.SECURITY)
    got = answers(
        tgt,
        [
            ("MaxBurstLength", "65536"),
            ("InitialR2T", "No"),
            ("ImmediateData", "Yes"),
            ("FirstBurstLength", "65536"),
            ("MaxConnections", "1"),
            ("MaxOutstandingR2T", "1"),
            ("DataPDUInOrder", "Yes"),
            ("DataSequenceInOrder", "Yes"),
            ("TaskReporting", "RFC3720"),
            ("iSCSIProtocolLevel", "1"),
            ("HeaderDigest", "None"),
            ("DefaultTime2Wait", "2"),
            ("ErrorRecoveryLevel", "0"),
        ],
    )
    relevant = {"HeaderDigest", "DefaultTime2Wait", "ErrorRecoveryLevel"}
    assert {k for k, v in got.items() if v == "Irrelevant"} == set(got) - relevant
    assert tgt.irrelevant == set(got) - relevant
    params = tgt.finish()
    assert params.session_type is SessionType.DISCOVERY
    assert params.target_name is None  # a discovery session names no target


def test_initiator_answers_irrelevant_in_discovery_session() -> None:
    ini = make_initiator(session_type=SessionType.DISCOVERY, target_name=None)
    assert answers(ini, [("MaxBurstLength", "65536")]) == {"MaxBurstLength": "Irrelevant"}


def test_target_answers_first_burst_irrelevant_without_unsolicited_data() -> None:
    tgt = make_target()
    # FirstBurstLength comes first on the wire, but its relevance depends on the other two.
    got = answers(
        tgt, [("FirstBurstLength", "65536"), ("InitialR2T", "Yes"), ("ImmediateData", "No")]
    )
    assert got == {"FirstBurstLength": "Irrelevant", "InitialR2T": "Yes", "ImmediateData": "No"}


def test_target_clamps_first_burst_to_max_burst() -> None:
    tgt = make_target(max_burst_length=262144, first_burst_length=262144)
    got = answers(tgt, [("FirstBurstLength", "131072"), ("MaxBurstLength", "16384")])
    assert got == {"MaxBurstLength": "16384", "FirstBurstLength": "16384"}


def test_target_integrity_check_fails_when_max_burst_comes_later() -> None:
    tgt = make_target()
    tgt.receive([("InitiatorName", INI), ("TargetName", TGT)], Stage.SECURITY)
    assert answers(tgt, [("FirstBurstLength", "65536")]) == {"FirstBurstLength": "65536"}
    assert answers(tgt, [("MaxBurstLength", "8192")]) == {"MaxBurstLength": "8192"}
    with pytest.raises(NegotiationFailed, match="exceeds MaxBurstLength") as info:
        tgt.finish()
    assert info.value.key == "FirstBurstLength"


@pytest.mark.parametrize(
    ("ours", "offered", "expected"),
    [
        (("CHAP",), "None", "Reject"),
        (("CHAP",), "CHAP,None", "CHAP"),
        (("CHAP", "None"), "None,CHAP", "None"),
        (("None",), "KRB5,None", "None"),
    ],
)
def test_target_answers_auth_method(ours: tuple[str, ...], offered: str, expected: str) -> None:
    tgt = make_target(auth_methods=ours)
    assert answers(tgt, [("AuthMethod", offered)], Stage.SECURITY) == {"AuthMethod": expected}
    assert tgt.auth_method == (None if expected == "Reject" else expected)


# --- checking the peer's answers to our offers ---------------------------------------------------


def offered_initiator(**settings: Any) -> Negotiator:
    """An initiator past the security stage (AuthMethod=None agreed) with its operational offer
    sent."""
    ini = make_initiator(**settings)
    ini.offer(Stage.SECURITY)
    ini.receive([("AuthMethod", "None")], Stage.SECURITY)
    ini.offer(Stage.OPERATIONAL)
    return ini


# (our settings, key, the target's answer, accepted outcome or None for a violation)
ANSWER_CASES: list[tuple[dict[str, Any], str, str, object]] = [
    ({}, "MaxBurstLength", "262144", 262144),
    ({}, "MaxBurstLength", "16776192", 16776192),
    ({}, "MaxBurstLength", "0x40000", 262144),
    ({}, "MaxBurstLength", "16776193", None),  # above our offer: not the minimum
    ({}, "MaxBurstLength", "511", None),  # below the range
    ({}, "MaxBurstLength", "big", None),
    ({}, "MaxBurstLength", "0512", None),
    ({}, "MaxBurstLength", "Reject", None),  # our offer was admissible
    ({}, "MaxBurstLength", "Irrelevant", None),  # relevant in a normal session
    ({}, "MaxBurstLength", "NotUnderstood", None),  # MUST be supported
    ({}, "DefaultTime2Wait", "5", 5),
    ({}, "DefaultTime2Wait", "1", None),  # below our offer: not the maximum
    ({}, "DefaultTime2Wait", "3601", None),
    ({}, "DefaultTime2Retain", "0", 0),
    ({}, "DefaultTime2Retain", "20", None),
    ({}, "ErrorRecoveryLevel", "1", None),
    ({}, "MaxConnections", "2", None),
    ({}, "InitialR2T", "Yes", True),
    ({}, "InitialR2T", "No", False),
    ({}, "InitialR2T", "yes", None),
    ({"initial_r2t": True}, "InitialR2T", "No", None),  # OR with our Yes must stay Yes
    ({"initial_r2t": True}, "InitialR2T", "Yes", True),  # optional answer, still accepted
    ({}, "ImmediateData", "No", False),
    ({}, "ImmediateData", "Yes", True),
    ({"immediate_data": False}, "ImmediateData", "Yes", None),  # AND with our No stays No
    ({}, "DataPDUInOrder", "No", None),
    ({}, "DataPDUInOrder", "Yes", True),
    ({"data_sequence_in_order": False}, "DataSequenceInOrder", "Yes", True),
    ({"data_sequence_in_order": False}, "DataSequenceInOrder", "No", False),
    ({"header_digest": DIGEST_CRC32C_PREFERRED}, "HeaderDigest", "CRC32C", "CRC32C"),
    ({"header_digest": DIGEST_CRC32C_PREFERRED}, "HeaderDigest", "None", "None"),
    ({"header_digest": DIGEST_CRC32C_PREFERRED}, "HeaderDigest", "CRC32C,None", None),
    ({"header_digest": ("None",)}, "HeaderDigest", "CRC32C", None),  # never offered
    ({}, "FirstBurstLength", "65536", 65536),
    ({}, "FirstBurstLength", "524288", None),
]  # fmt: skip


@pytest.mark.parametrize(("ours", "key", "answer", "outcome"), ANSWER_CASES)
def test_answer_checks(ours: dict[str, Any], key: str, answer: str, outcome: object) -> None:
    ini = offered_initiator(**ours)
    if outcome is None:
        with pytest.raises(NegotiationViolation) as info:
            ini.receive([(key, answer)], Stage.OPERATIONAL)
        assert info.value.key == key
        assert key in str(info.value) and TGT in str(info.value)
        assert isinstance(info.value, RemoteProtocolError)
        assert isinstance(info.value, NegotiationError)
    else:
        assert ini.receive([(key, answer)], Stage.OPERATIONAL).answers == ()
        assert ini.negotiated[key] == outcome
        assert key not in ini.awaiting


@pytest.mark.parametrize("answer", ["None", "Reject"])
@pytest.mark.parametrize(("key", "option"), [("HeaderDigest", "header_digest"),
                                             ("DataDigest", "data_digest")])
def test_a_required_digest_refused_says_how_to_go_on(key: str, option: str,
                                                      answer: str) -> None:
    # tgt answers None where §6.2.1 says Reject; either way the user learns what to change.
    ini = offered_initiator(**{option: DIGEST_CRC32C_REQUIRED})  # the field is named alike
    with pytest.raises(NegotiationError) as info:
        ini.receive([(key, answer)], Stage.OPERATIONAL)
    message = str(info.value)
    assert f"{option}=crc32c-none in a URL" in message and f"{key} = CRC32C,None" in message


def test_violation_message_explains_the_rule() -> None:
    ini = offered_initiator()
    with pytest.raises(NegotiationViolation) as info:
        ini.receive([("MaxBurstLength", "16777215")], Stage.OPERATIONAL)
    message = str(info.value)
    assert "MaxBurstLength=16777215" in message
    assert "MaxBurstLength=16776192" in message
    assert "minimum" in message and "§13.13" in message


def test_list_reject_keeps_acceptable_default() -> None:
    ini = offered_initiator(header_digest=DIGEST_CRC32C_PREFERRED)
    assert ini.receive([("HeaderDigest", "Reject")], Stage.OPERATIONAL).answers == ()
    assert "HeaderDigest" in ini.rejected
    assert "HeaderDigest" not in ini.awaiting


def test_list_reject_of_required_value_fails() -> None:
    ini = offered_initiator(data_digest=DIGEST_CRC32C_REQUIRED)
    with pytest.raises(NegotiationFailed, match="DataDigest") as info:
        ini.receive([("DataDigest", "Reject")], Stage.OPERATIONAL)
    assert info.value.key == "DataDigest"
    assert not isinstance(info.value, RemoteProtocolError)  # nobody broke a rule


def test_auth_method_reject_fails_with_advice() -> None:
    ini = make_initiator()
    ini.offer(Stage.SECURITY)
    with pytest.raises(NegotiationFailed, match="chapIName/chapSecret"):
        ini.receive([("AuthMethod", "Reject")], Stage.SECURITY)


def test_auth_method_answer() -> None:
    ini = make_initiator(auth_methods=("CHAP", "None"))
    ini.offer(Stage.SECURITY)
    before = ini.auth_method
    ini.receive([("AuthMethod", "CHAP"), ("TargetPortalGroupTag", "1")], Stage.SECURITY)
    assert (before, ini.auth_method) == (None, "CHAP")
    ini2 = make_initiator(auth_methods=("CHAP",))
    ini2.offer(Stage.SECURITY)
    with pytest.raises(NegotiationViolation, match="AuthMethod"):
        ini2.receive([("AuthMethod", "None")], Stage.SECURITY)


@pytest.mark.parametrize("key", ["iSCSIProtocolLevel", "TaskReporting"])
def test_legacy_peer_may_not_understand_newer_keys(key: str) -> None:
    ini = make_initiator(offer=(*INITIATOR_OFFERS, key))
    ini.offer(Stage.SECURITY)
    assert key in dict(ini.offer(Stage.OPERATIONAL))
    ini.receive([(key, "NotUnderstood")], Stage.OPERATIONAL)
    assert key in ini.not_understood
    assert key not in ini.awaiting


def test_protocol_level_negotiated_down() -> None:
    ini = make_initiator(offer=(*INITIATOR_OFFERS, "iSCSIProtocolLevel"), iscsi_protocol_level=2)
    ini.offer(Stage.OPERATIONAL)
    ini.receive([("iSCSIProtocolLevel", "1")], Stage.OPERATIONAL)
    assert ini.negotiated["iSCSIProtocolLevel"] == 1
    with pytest.raises(NegotiationViolation):
        ini2 = make_initiator(offer=("InitiatorName", "TargetName", "iSCSIProtocolLevel"))
        ini2.offer(Stage.OPERATIONAL)
        ini2.receive([("iSCSIProtocolLevel", "2")], Stage.OPERATIONAL)


def test_first_burst_irrelevant_answer_accepted_only_when_true() -> None:
    # We offer InitialR2T=No: FirstBurstLength stays relevant unless the target turns the
    # outcome to InitialR2T=Yes and ImmediateData=No.
    ini = offered_initiator()
    got = ini.receive(
        [("FirstBurstLength", "Irrelevant"), ("InitialR2T", "Yes"), ("ImmediateData", "No")],
        Stage.OPERATIONAL,
    )
    assert got.answers == ()
    assert "FirstBurstLength" in ini.irrelevant
    ini = offered_initiator()
    with pytest.raises(NegotiationViolation, match="relevant here"):
        ini.receive([("FirstBurstLength", "Irrelevant")], Stage.OPERATIONAL)


def test_reserved_answer_to_our_answer_is_ignored() -> None:
    # tgt offers FirstBurstLength although our InitialR2T=Yes, ImmediateData=No made it
    # irrelevant; we answer Irrelevant and it answers that with Reject. Nothing to negotiate:
    # the login goes on. A value sent again would still be a renegotiation.
    ini = offered_initiator(initial_r2t=True, immediate_data=False)
    got = ini.receive([("InitialR2T", "Yes"), ("ImmediateData", "No"),
                       ("FirstBurstLength", "16384")], Stage.OPERATIONAL)
    assert dict(got.answers) == {"FirstBurstLength": "Irrelevant"}
    assert ini.receive([("FirstBurstLength", "Reject")], Stage.OPERATIONAL).answers == ()
    assert "FirstBurstLength" in ini.irrelevant
    with pytest.raises(NegotiationViolation, match="already negotiated"):
        ini.receive([("FirstBurstLength", "16384")], Stage.OPERATIONAL)


def test_answer_twice_is_renegotiation() -> None:
    ini = offered_initiator()
    ini.receive([("MaxBurstLength", "65536")], Stage.OPERATIONAL)
    with pytest.raises(NegotiationViolation, match="already negotiated"):
        ini.receive([("MaxBurstLength", "65536")], Stage.OPERATIONAL)


def test_optional_answer_arriving_later_is_checked() -> None:
    ini = offered_initiator()
    assert "DataPDUInOrder" not in ini.awaiting
    ini.receive([("DataPDUInOrder", "Yes")], Stage.OPERATIONAL)
    with pytest.raises(NegotiationViolation, match="already negotiated"):
        ini.receive([("DataPDUInOrder", "Yes")], Stage.OPERATIONAL)


# --- stages, senders, connections -----------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "pairs", "stage", "fragment"),
    [
        (Role.INITIATOR, [("InitiatorName", INI)], Stage.SECURITY, "only the initiator"),
        (Role.INITIATOR, [("SessionType", "Normal")], Stage.SECURITY, "only the initiator"),
        (Role.INITIATOR, [("InitiatorAlias", "x")], Stage.OPERATIONAL, "only the initiator"),
        (Role.TARGET, [("TargetAlias", "x")], Stage.SECURITY, "only the target"),
        (Role.TARGET, [("TargetPortalGroupTag", "1")], Stage.SECURITY, "only the target"),
        (Role.INITIATOR, [("SendTargets", "All")], Stage.FULL_FEATURE, "only the initiator"),
        (Role.TARGET, [("MaxBurstLength", "65536")], Stage.SECURITY, "operational key"),
        (Role.INITIATOR, [("HeaderDigest", "None")], Stage.SECURITY, "operational key"),
        (Role.TARGET, [("AuthMethod", "None")], Stage.OPERATIONAL, "security key"),
        (Role.TARGET, [("CHAP_A", "5")], Stage.OPERATIONAL, "security key"),
        (Role.TARGET, [("SendTargets", "All")], Stage.OPERATIONAL, "Full Feature Phase"),
        (Role.TARGET, [("MaxBurstLength", "65536")], Stage.FULL_FEATURE, "only during login"),
        (Role.TARGET, [("InitiatorName", INI)], Stage.FULL_FEATURE, "only during login"),
    ],
)
def test_keys_out_of_place(role: Role, pairs: list[Pair], stage: Stage, fragment: str) -> None:
    with pytest.raises(NegotiationViolation, match=fragment):
        make(role).receive(pairs, stage)


def test_chap_keys_are_deferred_in_security_stage() -> None:
    tgt = make_target(auth_methods=("CHAP",))
    got = tgt.receive(
        [("InitiatorName", INI), ("TargetName", TGT), ("AuthMethod", "CHAP"), ("CHAP_A", "7,5")],
        Stage.SECURITY,
    )
    assert got.answers == (("AuthMethod", "CHAP"),)
    assert got.deferred == (("CHAP_A", "7,5"),)
    ini = make_initiator()
    got = ini.receive(
        [("CHAP_A", "5"), ("CHAP_I", "1"), ("CHAP_C", "0x00")], Stage.SECURITY
    )
    assert got.deferred == (("CHAP_A", "5"), ("CHAP_I", "1"), ("CHAP_C", "0x00"))
    assert got.answers == ()


def test_send_targets_is_deferred_in_full_feature_phase() -> None:
    tgt = make_target()
    got = tgt.receive([("SendTargets", "All")], Stage.FULL_FEATURE)
    assert got.deferred == (("SendTargets", "All"),)


def test_non_leading_connection_refuses_leading_only_keys() -> None:
    tgt = make_target(leading=False)
    with pytest.raises(NegotiationViolation, match="leading connection only"):
        tgt.receive([("MaxBurstLength", "65536")], Stage.OPERATIONAL)
    assert answers(tgt, [("HeaderDigest", "None")]) == {"HeaderDigest": "None"}


# --- declarations --------------------------------------------------------------------------


@pytest.mark.parametrize("role", list(Role))
def test_max_recv_data_segment_length_is_per_direction(role: Role) -> None:
    neg = make(role, max_recv_data_segment_length=65536)
    if role is Role.TARGET:
        neg.receive([("InitiatorName", INI), ("TargetName", TGT)], Stage.SECURITY)
    assert ("MaxRecvDataSegmentLength", "65536") in neg.offer(Stage.OPERATIONAL)
    neg.receive([("MaxRecvDataSegmentLength", "0x2000")], Stage.OPERATIONAL)  # 8192, in hex
    _answer_all(neg)
    params = neg.finish()
    assert params.max_recv_data_segment_length == 65536  # what we declared
    assert params.max_xmit_data_segment_length == 8192  # what the peer declared


def test_max_xmit_defaults_to_8192_when_peer_never_declares() -> None:
    ini = offered_initiator(max_recv_data_segment_length=131072)
    _answer_all(ini)
    params = ini.finish()
    assert params.max_recv_data_segment_length == 131072
    assert params.max_xmit_data_segment_length == DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH


def test_max_recv_defaults_to_8192_when_we_never_declare() -> None:
    tgt = make_target()
    tgt.receive([("InitiatorName", INI), ("TargetName", TGT)], Stage.SECURITY)
    tgt.receive([("MaxRecvDataSegmentLength", "262144")], Stage.OPERATIONAL)
    params = tgt.finish()
    assert params.max_recv_data_segment_length == 8192
    assert params.max_xmit_data_segment_length == 262144


@pytest.mark.parametrize("value", ["511", "16777216", "0x1000000", "8k", "08192", ""])
def test_bad_max_recv_declaration(value: str) -> None:
    ini = offered_initiator()
    with pytest.raises(NegotiationViolation, match="MaxRecvDataSegmentLength"):
        ini.receive([("MaxRecvDataSegmentLength", value)], Stage.OPERATIONAL)


def test_declaration_may_come_in_security_stage() -> None:
    ini = make_initiator()
    ini.receive([("MaxRecvDataSegmentLength", "65536")], Stage.SECURITY)
    assert ini.peer_declarations["MaxRecvDataSegmentLength"] == ("65536",)


def test_redeclaring_during_login_is_a_violation() -> None:
    ini = make_initiator()
    ini.receive([("MaxRecvDataSegmentLength", "65536")], Stage.OPERATIONAL)
    with pytest.raises(NegotiationViolation, match="declared MaxRecvDataSegmentLength twice"):
        ini.receive([("MaxRecvDataSegmentLength", "65536")], Stage.OPERATIONAL)


def test_redeclaring_in_full_feature_phase_is_allowed() -> None:
    ini = offered_initiator()
    _answer_all(ini)
    ini.receive([("MaxRecvDataSegmentLength", "65536")], Stage.OPERATIONAL)
    assert ini.finish().max_xmit_data_segment_length == 65536
    ini.receive([("MaxRecvDataSegmentLength", "32768")], Stage.FULL_FEATURE)
    assert ini.finish().max_xmit_data_segment_length == 32768
    ini.receive([("TargetAlias", "renamed")], Stage.FULL_FEATURE)
    assert ini.finish().target_alias == "renamed"


def test_target_address_is_repeatable() -> None:
    ini = make_initiator()
    ini.receive([("TargetAddress", "192.0.2.1:3260,1")], Stage.SECURITY)
    ini.receive([("TargetAddress", "[2001:db8::1]:3260,2")], Stage.SECURITY)
    assert ini.peer_declarations["TargetAddress"] == (
        "192.0.2.1:3260,1",
        "[2001:db8::1]:3260,2",
    )


@pytest.mark.parametrize(
    ("pairs", "fragment"),
    [
        ([("TargetPortalGroupTag", "70000")], "outside 0 to 65535"),
        ([("TargetPortalGroupTag", "one")], "malformed TargetPortalGroupTag"),
        ([("TargetAlias", "x" * 256)], "malformed TargetAlias"),
        ([("TargetAddress", "a" * 256)], "malformed TargetAddress"),
    ],
)
def test_bad_declarations(pairs: list[Pair], fragment: str) -> None:
    with pytest.raises(NegotiationViolation, match=fragment):
        make_initiator().receive(pairs, Stage.SECURITY)


def test_target_declarations_reach_parameters() -> None:
    ini = make_initiator()
    ini.offer(Stage.SECURITY)
    ini.receive([("AuthMethod", "None")], Stage.SECURITY)
    ini.offer(Stage.OPERATIONAL)
    ini.receive(
        [("TargetAlias", "Disk Array 7"), ("TargetPortalGroupTag", "0x11")], Stage.OPERATIONAL
    )
    _answer_all(ini)
    params = ini.finish()
    assert params.target_alias == "Disk Array 7"
    assert params.target_portal_group_tag == 17
    assert params.initiator_name == INI
    assert params.target_name == TGT


def test_initiator_declarations_reach_target_parameters() -> None:
    tgt = make_target(target_alias="disk", target_portal_group_tag=2)
    tgt.receive(
        [("InitiatorName", INI), ("InitiatorAlias", "host"), ("TargetName", TGT),
         ("SessionType", "Normal")],
        Stage.SECURITY,
    )  # fmt: skip
    tgt.offer(Stage.SECURITY)
    params = tgt.finish()
    assert (params.initiator_name, params.initiator_alias) == (INI, "host")
    assert (params.target_name, params.target_alias) == (TGT, "disk")
    assert params.target_portal_group_tag == 2
    assert params.session_type is SessionType.NORMAL


@pytest.mark.parametrize(
    ("pairs", "fragment"),
    [
        ([("SessionType", "Fast")], "malformed SessionType"),
        ([("InitiatorName", "iqn.has space")], "malformed InitiatorName"),
        ([("InitiatorName", "")], "malformed InitiatorName"),
    ],
)
def test_bad_initiator_declarations(pairs: list[Pair], fragment: str) -> None:
    with pytest.raises(NegotiationViolation, match=fragment):
        make_target().receive(pairs, Stage.SECURITY)


def test_answers_to_our_declarations() -> None:
    ini = make_initiator(initiator_alias="host", node_architecture="ExampleOS/1.0,hba/0.1")
    ini.offer(Stage.SECURITY)
    # Declarations need no answer; an Irrelevant/Reject is tolerated, and extension keys may
    # legitimately be NotUnderstood.
    ini.receive(
        [("InitiatorAlias", "Irrelevant"), ("X#NodeArchitecture", "NotUnderstood")],
        Stage.SECURITY,
    )
    assert "X#NodeArchitecture" in ini.not_understood
    with pytest.raises(NegotiationViolation, match="MUST be supported"):
        ini.receive([("InitiatorName", "NotUnderstood")], Stage.SECURITY)
    with pytest.raises(NegotiationViolation, match="never sent"):
        make_initiator().receive([("MaxRecvDataSegmentLength", "Reject")], Stage.SECURITY)
    # A reserved value for a key the peer may not even send is refused as such.
    with pytest.raises(NegotiationViolation, match="only the initiator"):
        make_initiator().receive([("InitiatorAlias", "Reject")], Stage.SECURITY)


def test_node_architecture_is_declared() -> None:
    ini = make_initiator(node_architecture="ExampleOS/1.0,hba/0.1")
    assert ("X#NodeArchitecture", "ExampleOS/1.0,hba/0.1") in ini.offer(Stage.SECURITY)
    tgt = make_target()
    tgt.receive([("X#NodeArchitecture", "Some OS (x86_64) v2")], Stage.SECURITY)
    assert tgt.peer_declarations["X#NodeArchitecture"] == ("Some OS (x86_64) v2",)


# --- finishing -----------------------------------------------------------------------------


def _answer_all(neg: Negotiator) -> None:
    """Answer every pending offer of ``neg`` the way an RFC-default peer would."""
    replies = {
        "HeaderDigest": "None",
        "DataDigest": "None",
        "DefaultTime2Wait": "2",
        "DefaultTime2Retain": "0",
        "ErrorRecoveryLevel": "0",
        "InitialR2T": "Yes",
        "ImmediateData": "Yes",
        "MaxBurstLength": "262144",
        "FirstBurstLength": "65536",
        "MaxOutstandingR2T": "1",
        "MaxConnections": "1",
    }
    neg.receive([(k, replies[k]) for k in sorted(neg.awaiting)], Stage.OPERATIONAL)
    assert neg.complete


def test_finish_refuses_unanswered_offers() -> None:
    ini = offered_initiator()
    with pytest.raises(NegotiationViolation, match="without answering") as info:
        ini.finish()
    assert "MaxBurstLength" in str(info.value)


def test_target_finish_requires_initiator_name() -> None:
    with pytest.raises(MissingParameter, match="InitiatorName") as info:
        make_target().finish()
    assert info.value.key == "InitiatorName"


def test_target_finish_requires_target_name_for_normal_session() -> None:
    tgt = make_target()
    tgt.receive([("InitiatorName", INI)], Stage.SECURITY)
    with pytest.raises(MissingParameter, match="TargetName"):
        tgt.finish()


def test_nothing_negotiated_means_rfc_defaults() -> None:
    tgt = make_target()
    tgt.receive([("InitiatorName", INI), ("TargetName", TGT)], Stage.SECURITY)
    params = tgt.finish()
    assert params == SessionParameters(
        header_digest=False,
        data_digest=False,
        max_recv_data_segment_length=8192,
        max_xmit_data_segment_length=8192,
        max_burst_length=262144,
        first_burst_length=65536,
        initial_r2t=True,
        immediate_data=True,
        default_time2wait=2,
        default_time2retain=20,
        max_outstanding_r2t=1,
        data_pdu_in_order=True,
        data_sequence_in_order=True,
        error_recovery_level=0,
        max_connections=1,
        session_type=SessionType.NORMAL,
        auth_method="None",
        task_reporting="RFC3720",
        iscsi_protocol_level=1,
        initiator_name=INI,
        initiator_alias=None,
        target_name=TGT,
        target_alias=None,
        target_portal_group_tag=None,
    )


def test_initiator_clamps_first_burst_to_max_burst() -> None:
    ini = offered_initiator()
    ini.receive(
        [(k, v) for k, v in _default_answers().items() if k not in ("MaxBurstLength",)]
        + [("MaxBurstLength", "16384")],
        Stage.OPERATIONAL,
    )
    params = ini.finish()
    assert params.max_burst_length == 16384
    assert params.first_burst_length == 16384  # the target said 65536; §13.14 caps it


def _default_answers() -> dict[str, str]:
    return {
        "HeaderDigest": "None",
        "DataDigest": "None",
        "DefaultTime2Wait": "2",
        "DefaultTime2Retain": "0",
        "ErrorRecoveryLevel": "0",
        "InitialR2T": "No",
        "ImmediateData": "Yes",
        "MaxBurstLength": "262144",
        "FirstBurstLength": "65536",
        "MaxOutstandingR2T": "1",
        "MaxConnections": "1",
    }


def test_session_parameters_are_frozen() -> None:
    tgt = make_target()
    tgt.receive([("InitiatorName", INI), ("TargetName", TGT)], Stage.SECURITY)
    params = tgt.finish()
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.max_burst_length = 1  # type: ignore[misc]


# --- whole negotiations between two Negotiators ------------------------------------------------


def test_full_negotiation_open_iscsi_against_rfc_default_target() -> None:
    ini = make_initiator(auth_methods=("CHAP", "None"))
    tgt = make_target(target_alias="disk", target_portal_group_tag=1, auth_methods=("CHAP",))
    ip, tp = negotiate(ini, tgt)
    assert ip.auth_method == tp.auth_method == "CHAP"
    assert ip.max_burst_length == tp.max_burst_length == 262144
    assert ip.first_burst_length == tp.first_burst_length == 65536
    assert ip.initial_r2t is tp.initial_r2t is True  # OR of No and the target's Yes
    assert ip.immediate_data is tp.immediate_data is True
    assert ip.default_time2retain == tp.default_time2retain == 0
    assert ip.max_recv_data_segment_length == tp.max_xmit_data_segment_length == 262144
    assert ip.max_xmit_data_segment_length == tp.max_recv_data_segment_length == 8192
    assert ip.target_alias == tp.target_alias == "disk"
    assert ip.target_portal_group_tag == tp.target_portal_group_tag == 1
    _assert_mirrored(ip, tp)


@pytest.mark.parametrize(
    ("ini_settings", "tgt_settings", "expected"),
    [
        (
            {"header_digest": DIGEST_CRC32C_PREFERRED, "data_digest": DIGEST_CRC32C_PREFERRED},
            {"header_digest": DIGEST_CRC32C_PREFERRED, "data_digest": ("None",)},
            {"header_digest": True, "data_digest": False},
        ),
        (
            {"initial_r2t": True, "immediate_data": False},
            {"initial_r2t": False, "immediate_data": True},
            {"initial_r2t": True, "immediate_data": False},
        ),
        (
            {"max_burst_length": 65536, "first_burst_length": 16384, "default_time2wait": 0},
            {"max_burst_length": 1048576, "first_burst_length": 262144, "default_time2wait": 5,
             "default_time2retain": 0},
            {"max_burst_length": 65536, "first_burst_length": 16384, "default_time2wait": 5},
        ),
        (
            {"error_recovery_level": 2, "max_outstanding_r2t": 4, "max_connections": 8},
            {"error_recovery_level": 1, "max_outstanding_r2t": 16, "max_connections": 2},
            {"error_recovery_level": 1, "max_outstanding_r2t": 4, "max_connections": 2},
        ),
        (
            {"data_pdu_in_order": False, "data_sequence_in_order": False},
            {"data_pdu_in_order": False, "data_sequence_in_order": True},
            {"data_pdu_in_order": False, "data_sequence_in_order": True},
        ),
    ],
)  # fmt: skip
def test_full_negotiation_variants(
    ini_settings: dict[str, Any], tgt_settings: dict[str, Any], expected: dict[str, Any]
) -> None:
    ip, tp = negotiate(make_initiator(**ini_settings), make_target(**tgt_settings))
    for field, value in expected.items():
        assert getattr(ip, field) == value, field
        assert getattr(tp, field) == value, field
    _assert_mirrored(ip, tp)


def test_full_negotiation_where_target_offers_too() -> None:
    tgt = make_target(
        offer=(*TARGET_OFFERS, "MaxBurstLength", "DefaultTime2Wait"),
        max_burst_length=131072,
        default_time2wait=4,
    )
    ini = make_initiator()
    # The target offers before the initiator reaches the operational stage.
    got = ini.receive(tgt.offer(Stage.SECURITY), Stage.SECURITY)
    assert got.answers == ()
    ip, tp = negotiate(ini, tgt)
    assert ip.max_burst_length == tp.max_burst_length == 131072
    assert ip.default_time2wait == tp.default_time2wait == 4


def test_full_negotiation_discovery() -> None:
    ini = make_initiator(session_type=SessionType.DISCOVERY, target_name=None)
    tgt = make_target()
    ip, tp = negotiate(ini, tgt)
    assert ip.session_type is tp.session_type is SessionType.DISCOVERY
    assert tgt.irrelevant == set()  # the initiator offered nothing irrelevant
    _assert_mirrored(ip, tp)


def test_full_negotiation_without_security_stage() -> None:
    ip, tp = negotiate(make_initiator(), make_target(), stages=(Stage.OPERATIONAL,))
    assert ip.auth_method == tp.auth_method == "None"
    _assert_mirrored(ip, tp)


def test_full_negotiation_with_tiny_segments() -> None:
    """Texts cut at 512 bytes (the smallest MaxRecvDataSegmentLength) still negotiate."""
    ini = make_initiator(initiator_alias="a" * 255)
    tgt = make_target(target_alias="t" * 255)
    pairs = ini.offer(Stage.SECURITY)
    assert over_the_wire(pairs, 512) == pairs
    got = tgt.receive(over_the_wire(pairs, 512), Stage.SECURITY)
    ini.receive(over_the_wire(list(got.answers) + tgt.offer(Stage.SECURITY), 512), Stage.SECURITY)
    assert ini.peer_declarations["TargetAlias"] == ("t" * 255,)


def _assert_mirrored(ip: SessionParameters, tp: SessionParameters) -> None:
    """Both sides agree on every session-wide value; the segment lengths swap sides."""
    for field in dataclasses.fields(SessionParameters):
        name = field.name
        if name == "max_recv_data_segment_length":
            assert ip.max_recv_data_segment_length == tp.max_xmit_data_segment_length
        elif name == "max_xmit_data_segment_length":
            assert ip.max_xmit_data_segment_length == tp.max_recv_data_segment_length
        else:
            assert getattr(ip, name) == getattr(tp, name), name


def test_wire_text_of_a_login_offer_decodes() -> None:
    ini = make_initiator()
    text = encode(ini.offer(Stage.OPERATIONAL))
    assert decode(text)[0] == ("InitiatorName", INI)


def test_logger_receives_debug_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="initiator.keys")
    ini = make_initiator()
    ini.offer(Stage.SECURITY)
    assert any("offer InitiatorName=" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("pairs", [
    [("HeaderDigest", "None," + "x" * 60_000)],                         # a list as an answer
    [("MaxBurstLength", "65536"), ("MaxBurstLength", "6" * 60_000)],   # renegotiated
], ids=["list", "renegotiated"])
def test_a_huge_value_from_the_target_makes_a_short_error(pairs: list[tuple[str, str]]) -> None:
    # The value a target sent was quoted whole: 60 KiB sent, a 60 KiB line shown.
    ini = offered_initiator()
    with pytest.raises(NegotiationError) as info:
        for pair in pairs:
            ini.receive([pair], Stage.OPERATIONAL)
    assert len(str(info.value)) < 1000
