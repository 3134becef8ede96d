"""Unit tests for initiator.text: framing, value grammars, segmentation (RFC 7143 §6.1)."""

from __future__ import annotations

import base64
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from initiator.errors import (
    LocalProtocolError,
    NegotiationError,
    PDUFormatError,
    RemoteProtocolError,
)
from initiator.text import (
    MAX_TEXT_LENGTH,
    MIN_TEXT_LENGTH,
    Answer,
    BinaryEncoding,
    DuplicateKeyError,
    Pair,
    TextAssembler,
    TextFormatError,
    TextSegment,
    TextSplitter,
    TextValueError,
    check_iscsi_name,
    check_key_name,
    check_local_name,
    check_simple_value,
    check_text_value,
    decode,
    encode,
    format_binary,
    format_boolean,
    format_list,
    format_number,
    is_extension_key,
    is_key_name,
    parse_binary,
    parse_boolean,
    parse_list,
    parse_number,
    parse_range,
    split_text,
)

# Property tests check correctness, not speed: on a loaded machine a deadline would only add noise.
relaxed = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies -----------------------------------------------------------------------------

_LABEL_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-+@_"

key_names = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
    st.text(alphabet=_LABEL_CHARS, max_size=62),
)
values = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\0"),
    max_size=300,
)


@st.composite
def pair_lists(draw: st.DrawFn) -> list[Pair]:
    names = draw(st.lists(key_names, unique=True, max_size=12))
    return [(name, draw(values)) for name in names]


# --- key names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "HeaderDigest",
        "MaxRecvDataSegmentLength",
        "iSCSIProtocolLevel",  # §13.24's own key starts with a lower-case letter
        "X-com.example.vendor_key+v1@2",
        "X#NodeArchitecture",
        "CHAP_A",
        "A" * 63,
    ],
)
def test_valid_key_names(name: str) -> None:
    assert is_key_name(name)
    check_key_name(name)


@pytest.mark.parametrize(
    "name",
    ["", "A" * 64, "1Key", "_Key", "Key Name", "Key=", "Ké", "X#", "Y#Foo", "Key,Two", "Key/"],
)
def test_invalid_key_names(name: str) -> None:
    assert not is_key_name(name)
    with pytest.raises(TextFormatError):
        check_key_name(name)


def test_long_key_name_message_names_the_limit() -> None:
    with pytest.raises(TextFormatError, match="63"):
        check_key_name("K" * 64)


def test_extension_keys() -> None:
    assert is_extension_key("X-com.example.foo")
    assert is_extension_key("X#NodeArchitecture")
    assert not is_extension_key("XMarker")


# --- framing --------------------------------------------------------------------------------


def test_encode_exact_bytes() -> None:
    data = encode([("HeaderDigest", "CRC32C,None"), ("TargetAlias", "dïsk"), ("SendTargets", "")])
    assert data == b"HeaderDigest=CRC32C,None\0TargetAlias=d\xc3\xafsk\0SendTargets=\0"


def test_decode_exact_pairs() -> None:
    data = b"A=1\0B=x=y\0C=\0"
    # A value is everything after the *first* '=' (§6.1), so it may itself contain '='.
    assert decode(data) == [("A", "1"), ("B", "x=y"), ("C", "")]


def test_decode_empty() -> None:
    assert decode(b"") == []
    assert decode(memoryview(b"")) == []


def test_decode_tolerates_trailing_padding_nuls() -> None:
    assert decode(b"A=1\0\0\0\0") == [("A", "1")]
    assert decode(b"\0\0") == []


def test_decode_accepts_memoryview_and_bytearray() -> None:
    assert decode(memoryview(b"A=1\0")) == [("A", "1")]
    assert decode(bytearray(b"A=1\0")) == [("A", "1")]


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"A=1", "does not end with a NUL"),
        (b"A=1\0\0B=2\0", "empty key=value"),
        (b"NoEquals\0", "has no '='"),
        (b"=value\0", "key name ''"),
        (b"1Bad=x\0", "malformed"),
        (b"K\xc3\xa9y=x\0", "not ASCII"),
        (b"Key=\xff\xfe\0", "not valid UTF-8"),
    ],
)
def test_decode_errors(data: bytes, fragment: str) -> None:
    with pytest.raises(TextFormatError, match=fragment) as info:
        decode(data)
    # The errors are both "malformed PDU" and "negotiation" errors, and remote.
    assert isinstance(info.value, PDUFormatError)
    assert isinstance(info.value, NegotiationError)
    assert isinstance(info.value, RemoteProtocolError)


def test_decode_duplicate_key() -> None:
    with pytest.raises(DuplicateKeyError, match="TargetName appears more than once") as info:
        decode(b"TargetName=a\0TargetName=b\0")
    assert info.value.key == "TargetName"


def test_decode_repeatable_keys() -> None:
    # A SendTargets answer repeats TargetName and TargetAddress (§13.3).
    data = b"TargetName=a\0TargetAddress=1.2.3.4:3260,1\0TargetName=b\0TargetAddress=[::1],2\0"
    pairs = decode(data, repeatable={"TargetName", "TargetAddress"})
    assert [k for k, _ in pairs] == ["TargetName", "TargetAddress"] * 2


@pytest.mark.parametrize(
    "pairs",
    [[("1Bad", "x")], [("Key", "a\0b")], [("", "x")]],
)
def test_encode_refuses_malformed(pairs: list[Pair]) -> None:
    with pytest.raises(LocalProtocolError):
        encode(pairs)


@relaxed
@given(pair_lists())
def test_encode_decode_round_trip(pairs: list[Pair]) -> None:
    assert decode(encode(pairs)) == pairs


# --- values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("0", 0),
        ("8192", 8192),
        ("0x2000", 8192),
        ("0X2000", 8192),
        ("0xffffff", 2**24 - 1),
        ("0xFfFfFf", 2**24 - 1),
        ("0bIAA=", 8192),  # base64 of 0x20 0x00
        ("0bIAA", 8192),  # padding is optional (§6.1)
        ("18446744073709551615", 2**64 - 1),
    ],
)
def test_parse_number(text: str, number: int) -> None:
    assert parse_number(text, key="K") == number


@pytest.mark.parametrize(
    "text",
    [
        "",
        "010",  # leading zeros: strtoul would read octal; §6.1 forbids them
        "00",
        "-1",
        "+1",
        " 1",
        "1 ",
        "1_000",
        "\u0661",  # ARABIC-INDIC DIGIT ONE: int() would take it
        "0x",
        "0xg",
        "0b",
        "0bA",  # 4k+1 base64 characters cannot be right
        "1e3",
        "18446744073709551616",  # 2**64
        "0x10000000000000000",
    ],
)
def test_parse_number_rejects(text: str) -> None:
    with pytest.raises(TextValueError) as info:
        parse_number(text, key="MaxBurstLength")
    assert info.value.key == "MaxBurstLength"
    assert "MaxBurstLength" in str(info.value)


def test_parse_large_number() -> None:
    assert parse_number("0x10000000000000000", key="K", large=True) == 2**64


def test_format_number() -> None:
    assert format_number(262144) == "262144"
    with pytest.raises(LocalProtocolError):
        format_number(-1)


@relaxed
@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_number_round_trip(number: int) -> None:
    assert parse_number(format_number(number), key="K") == number
    assert parse_number(hex(number), key="K") == number


def test_booleans() -> None:
    assert parse_boolean("Yes", key="K") is True
    assert parse_boolean("No", key="K") is False
    assert format_boolean(True) == "Yes"
    assert format_boolean(False) == "No"
    for bad in ("yes", "NO", "True", "1", ""):
        with pytest.raises(TextValueError, match="boolean"):
            parse_boolean(bad, key="InitialR2T")


@pytest.mark.parametrize(
    ("text", "data"),
    [
        ("0x00", b"\x00"),
        ("0xABcd", b"\xab\xcd"),
        ("0xabc", b"\x0a\xbc"),  # odd digit count: implicit leading zero nibble (§6.1)
        ("0X0102", b"\x01\x02"),
        ("0bAQI=", b"\x01\x02"),
        ("0bAQI", b"\x01\x02"),
        ("0BAQID", b"\x01\x02\x03"),
        ("0bAQIDBA==", b"\x01\x02\x03\x04"),
        ("0bAQIDBA", b"\x01\x02\x03\x04"),
    ],
)
def test_parse_binary(text: str, data: bytes) -> None:
    assert parse_binary(text, key="CHAP_C") == data


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0x",
        "0b",
        "1234",  # decimal: binary values here must carry a prefix
        "abcd",
        "0xzz",
        "0bA",  # 4k+1 characters
        "0bAQI==",  # too much padding for 3 characters
        "0bAQIDBA=",  # wrong padding length
        "0bAQ===",
        "0b####",
    ],
)
def test_parse_binary_rejects(text: str) -> None:
    with pytest.raises(TextValueError, match="CHAP_C"):
        parse_binary(text, key="CHAP_C")


def test_parse_binary_length_limit() -> None:
    assert len(parse_binary("0x" + "ab" * 1024, key="CHAP_C")) == 1024
    with pytest.raises(TextValueError, match="1025 bytes"):
        parse_binary("0x" + "ab" * 1025, key="CHAP_C")
    with pytest.raises(TextValueError, match="at most 4"):
        parse_binary("0x0102030405", key="K", max_length=4)


@relaxed
@given(st.binary(min_size=1, max_size=1024), st.sampled_from(BinaryEncoding))
def test_binary_round_trip(data: bytes, encoding: BinaryEncoding) -> None:
    text = format_binary(data, encoding)
    assert text.startswith(encoding.value)
    assert parse_binary(text, key="K") == data


def test_format_binary_matches_stdlib() -> None:
    data = bytes(range(20))
    assert format_binary(data) == "0x" + data.hex()
    assert format_binary(data, BinaryEncoding.BASE64) == "0b" + base64.b64encode(data).decode()
    with pytest.raises(LocalProtocolError):
        format_binary(b"")


def test_lists() -> None:
    assert parse_list("CRC32C,None", key="HeaderDigest") == ("CRC32C", "None")
    assert parse_list("None", key="HeaderDigest") == ("None",)
    assert format_list(("CRC32C", "None")) == "CRC32C,None"
    for bad in ("CRC32C,,None", ",", "", "a b", "CRC32C,None,"):
        with pytest.raises(TextValueError):
            parse_list(bad, key="HeaderDigest")
    for bad_list in ((), ("a,b",), ("",)):
        with pytest.raises(LocalProtocolError):
            format_list(bad_list)


def test_ranges() -> None:
    assert parse_range("1~65535", key="OFMarkInt") == (1, 65535)
    assert parse_range("0x10~0x20", key="K") == (16, 32)
    assert parse_range("5~5", key="K") == (5, 5)
    for bad in ("5~4", "5", "~5", "5~", "a~b"):
        with pytest.raises(TextValueError):
            parse_range(bad, key="K")


def test_text_value() -> None:
    check_text_value("iqn.2001-04.com.example:storage/disk2[a]@x_y+z", key="K")
    check_text_value("", key="K")  # text-value is zero or more characters
    for bad in ("a b", "a,b", "a=b", "é"):
        with pytest.raises(TextValueError):
            check_text_value(bad, key="K")


def test_simple_value_length() -> None:
    check_simple_value("x" * 255, key="K")
    with pytest.raises(TextValueError, match="256 bytes"):
        check_simple_value("x" * 256, key="K")
    # The limit is in bytes of UTF-8, not characters.
    with pytest.raises(TextValueError):
        check_simple_value("é" * 128, key="K")


def test_iscsi_names() -> None:
    for good in (
        "iqn.2001-04.com.example:storage:diskarrays-sn-a8675309",
        "eui.02004567A425678D",
        "naa.52004567BA64678D",
        "iqn.2001-04.com.example:ストレージ",
        "i" * 223,
    ):
        check_iscsi_name(good, key="TargetName")
    for bad in ("", "i" * 224, "iqn.x y", "iqn.x/y", "iqn.x,y", "iqn.x_y", "iqn.\u200bx"):
        with pytest.raises(TextValueError, match="TargetName"):
            check_iscsi_name(bad, key="TargetName")


def test_names_that_are_not_utf8_are_refused_not_raised() -> None:
    # hbactl --initiator-name with bytes that are not UTF-8 reaches here as a lone surrogate.
    for check in (check_iscsi_name, check_local_name, check_simple_value):
        with pytest.raises(TextValueError, match=r"InitiatorName .* is not UTF-8 text"):
            check("iqn.2003-01.org.example:\udcff", key="InitiatorName")


def test_local_names() -> None:
    check_local_name("Disk Array 7 — ünïcode", key="TargetAlias")
    with pytest.raises(TextValueError):
        check_local_name("x" * 256, key="TargetAlias")
    with pytest.raises(TextValueError):
        check_local_name("a\0b", key="TargetAlias")


def test_reserved_answers() -> None:
    assert {a.value for a in Answer} == {"NotUnderstood", "Reject", "Irrelevant"}
    assert Answer.REJECT.value == "Reject"
    assert f"{Answer.IRRELEVANT}" == "Irrelevant"  # a StrEnum formats as its wire value


# --- segmentation ----------------------------------------------------------------------------


def test_splitter_pieces() -> None:
    text = encode([("TargetName", "iqn.2001-04.com.example:t"), ("SessionType", "Normal")])
    pieces = split_text(text, 10)
    assert all(len(p.data) <= 10 for p in pieces)
    assert [p.more for p in pieces] == [True] * (len(pieces) - 1) + [False]
    assert b"".join(p.data for p in pieces) == text


def test_splitter_exact_multiple_ends_with_full_final_piece() -> None:
    pieces = split_text(b"A=1\0B=2\0", 4)
    assert pieces == [TextSegment(b"A=1\0", True), TextSegment(b"B=2\0", False)]


def test_splitter_fits_in_one() -> None:
    assert split_text(b"A=1\0", 8192) == [TextSegment(b"A=1\0", False)]


def test_splitter_empty_text_is_one_empty_final_piece() -> None:
    assert split_text(b"", 512) == [TextSegment(b"", False)]


def test_splitter_step_by_step() -> None:
    splitter = TextSplitter(b"abcdef", 4)
    assert splitter.remaining == 6
    assert splitter.next_segment() == TextSegment(b"abcd", True)
    assert splitter.remaining == 2
    assert splitter.next_segment() == TextSegment(b"ef", False)
    assert splitter.done
    with pytest.raises(LocalProtocolError):
        splitter.next_segment()
    assert list(splitter) == []


def test_splitter_rejects_nonpositive_size() -> None:
    with pytest.raises(LocalProtocolError):
        TextSplitter(b"x", 0)


def test_assembler_single_piece() -> None:
    assembler = TextAssembler()
    assert assembler.feed(b"A=1\0", False) == [("A", "1")]
    assert assembler.buffered == 0


def test_assembler_cut_inside_a_key_and_a_value() -> None:
    assembler = TextAssembler()
    assert assembler.feed(b"Head", True) is None
    assert assembler.feed(b"erDigest=CRC", True) is None
    assert assembler.buffered == len(b"HeaderDigest=CRC")
    assert assembler.feed(memoryview(b"32C\0"), False) == [("HeaderDigest", "CRC32C")]
    # Reusable for the next text.
    assert assembler.feed(b"B=2\0", False) == [("B", "2")]


def test_assembler_cap() -> None:
    assembler = TextAssembler(max_length=MIN_TEXT_LENGTH)
    assembler.feed(b"A=" + b"x" * (MIN_TEXT_LENGTH - 10), True)
    with pytest.raises(TextFormatError, match=f"exceeds {MIN_TEXT_LENGTH} bytes"):
        assembler.feed(b"y" * 20, True)
    assert assembler.buffered == 0  # an error empties it
    assert assembler.feed(b"B=2\0", False) == [("B", "2")]


def test_assembler_default_cap_is_64k() -> None:
    assembler = TextAssembler()
    big = encode([("X-com.example.big", "v" * 255)] * 1)
    assert assembler.feed(big, False) is not None
    with pytest.raises(TextFormatError):
        assembler.feed(b"\0" * (MAX_TEXT_LENGTH + 1), True)


def test_assembler_refuses_cap_below_rfc_minimum() -> None:
    with pytest.raises(LocalProtocolError, match="8192"):
        TextAssembler(max_length=4096)


def test_assembler_decode_error_resets() -> None:
    assembler = TextAssembler()
    assembler.feed(b"A=1", True)
    with pytest.raises(TextFormatError):
        assembler.feed(b"", False)  # the text never got its NUL
    assert assembler.buffered == 0


def test_assembler_duplicates() -> None:
    with pytest.raises(DuplicateKeyError):
        TextAssembler().feed(b"A=1\0A=2\0", False)
    assembler = TextAssembler(repeatable={"TargetAddress"})
    pairs = assembler.feed(b"TargetAddress=a\0TargetAddress=b\0", False)
    assert pairs == [("TargetAddress", "a"), ("TargetAddress", "b")]


@settings(relaxed, max_examples=60)
@given(pair_lists())
def test_reassembly_at_every_cut_point(pairs: list[Pair]) -> None:
    """Every single cut (§6.1 allows one anywhere) reassembles to the same pairs."""
    text = encode(pairs)
    for cut in range(len(text) + 1):
        assembler = TextAssembler()
        assert assembler.feed(text[:cut], True) is None
        assert assembler.feed(text[cut:], False) == pairs


@settings(relaxed, max_examples=60)
@given(pair_lists(), st.data())
def test_split_and_reassemble_at_every_segment_size(pairs: list[Pair], data: st.DataObject) -> None:
    text = encode(pairs)
    size = data.draw(st.integers(min_value=1, max_value=max(1, len(text) + 1)))
    assembler = TextAssembler()
    pieces = split_text(text, size)
    assert all(len(piece.data) <= size for piece in pieces)
    results = [assembler.feed(piece.data, piece.more) for piece in pieces]
    assert results[:-1] == [None] * (len(pieces) - 1)
    assert results[-1] == pairs


@relaxed
@given(pair_lists(), st.lists(st.integers(min_value=0, max_value=4000), max_size=6))
def test_reassembly_at_arbitrary_cuts(pairs: list[Pair], cuts: list[int]) -> None:
    text = encode(pairs)
    points = sorted({min(c, len(text)) for c in cuts})
    bounds = [0, *points, len(text)]
    assembler = TextAssembler()
    chunks = [text[a:b] for a, b in itertools.pairwise(bounds)]
    for chunk in chunks[:-1]:
        assert assembler.feed(chunk, True) is None
    assert assembler.feed(chunks[-1], False) == pairs
