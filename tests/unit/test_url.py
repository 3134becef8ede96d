"""initiator.url: every URL form, every error, and that secrets never show."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from initiator.errors import ConfigurationError
from initiator.url import (
    TOO_LARGE,
    URL_SYNTAX,
    DigestPreference,
    IscsiUrl,
    decimal,
    format_portal,
    parse_portal,
    parse_url,
    validate_iscsi_name,
)
from initiator.urlconfig import target_url

IQN = "iqn.2003-01.org.example:disk1"
SECRET = "Zq8-secret-vX3"
TSECRET = "Tg7-target-pW9"
NOENV: dict[str, str] = {}


def parse(text: str, **env: str) -> IscsiUrl:
    return parse_url(text, environ=env)


# ---------------------------------------------------------------------------------------------
# Accepted forms
# ---------------------------------------------------------------------------------------------


def test_full_url_defaults() -> None:
    url = parse(f"iscsi://192.0.2.1/{IQN}/0")
    assert url == IscsiUrl(host="192.0.2.1", port=3260, target_iqn=IQN, lun=0)
    assert not url.is_discovery
    assert url.portal == "192.0.2.1:3260"
    assert url.header_digest is None and url.data_digest is None
    assert url.chap_user is None and not url.mutual_chap


def test_full_url_with_everything() -> None:
    url = parse(
        f"iscsi://iqn.2024-01.org.example:host%{SECRET}@[fe80::1]:3261/{IQN}/7"
        f"?header_digest=crc32c&data_digest=none-crc32c&target_user=tgt&target_password={TSECRET}"
    )
    assert url.host == "fe80::1" and url.port == 3261
    assert url.portal == "[fe80::1]:3261"
    assert url.target_iqn == IQN and url.lun == 7
    assert url.chap_user == "iqn.2024-01.org.example:host"
    assert url.chap_secret == SECRET
    assert url.target_user == "tgt" and url.target_secret == TSECRET
    assert url.mutual_chap
    assert url.header_digest is DigestPreference.CRC32C
    assert url.data_digest is DigestPreference.NONE_CRC32C


@pytest.mark.parametrize(
    "text",
    ["iscsi://192.0.2.1", "iscsi://192.0.2.1/", "iscsi://192.0.2.1:3262/", "ISCSI://host.example"],
)
def test_discovery_forms(text: str) -> None:
    url = parse(text)
    assert url.is_discovery
    assert url.target_iqn is None and url.lun is None


def test_discovery_with_options_and_ipv6() -> None:
    url = parse("iscsi://u%" + SECRET + "@[2001:db8::7]/?header_digest=none")
    assert (url.host, url.port) == ("2001:db8::7", 3260)
    assert url.is_discovery and url.chap_user == "u"
    assert url.header_digest is DigestPreference.NONE


def test_trailing_slash_after_lun() -> None:
    assert parse(f"iscsi://h/{IQN}/3/").lun == 3


def test_hostnames() -> None:
    assert parse(f"iscsi://san-01.example.com:860/{IQN}/1").host == "san-01.example.com"
    assert parse(f"iscsi://localhost/{IQN}/1").host == "localhost"


def test_percent_decoding_of_secret_target_and_options() -> None:
    url = parse("iscsi://user%p%25w%40rd%3F/x@h/iqn.2003-01.org.example%3Adisk1/0")
    assert url.chap_user == "user"
    assert url.chap_secret == "p%w@rd?/x"  # '/' may stay unescaped
    assert url.target_iqn == IQN
    url = parse("iscsi://u%s%C3%A9cret-long-1@h/?target_user=a%20b&target_password=x%26y-long-2")
    assert url.chap_secret == "s\u00e9cret-long-1"
    assert (url.target_user, url.target_secret) == ("a b", "x&y-long-2")


def test_first_percent_ends_the_user_name() -> None:
    # libiscsi's rule: the user name cannot hold an escape, what follows the '%' is the secret
    url = parse("iscsi://us%41er@h/")
    assert (url.chap_user, url.chap_secret) == ("us", "41er")


def test_colon_belongs_to_user_name() -> None:
    url = parse(f"iscsi://iqn.2024-01.org.example:host@h/{IQN}/0", ISCSI_HBA_CHAP_SECRET=SECRET)
    assert url.chap_user == "iqn.2024-01.org.example:host"
    assert url.chap_secret == SECRET


@pytest.mark.parametrize(
    ("value", "expected", "offer"),
    [
        ("none", DigestPreference.NONE, "None"),
        ("crc32c", DigestPreference.CRC32C, "CRC32C"),
        ("crc32c-none", DigestPreference.CRC32C_NONE, "CRC32C,None"),
        ("none-crc32c", DigestPreference.NONE_CRC32C, "None,CRC32C"),
        ("CRC32C", DigestPreference.CRC32C, "CRC32C"),
    ],
)
def test_digest_values(value: str, expected: DigestPreference, offer: str) -> None:
    url = parse(f"iscsi://h/{IQN}/0?header_digest={value}&data_digest={value}")
    assert url.header_digest is expected and url.data_digest is expected
    assert expected.offer == offer
    assert DigestPreference.parse(offer) is expected


def test_lun_range() -> None:
    assert parse(f"iscsi://h/{IQN}/65535").lun == 65535
    assert parse(f"iscsi://h/{IQN}/0016").lun == 16


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------


def test_secrets_from_project_environment() -> None:
    url = parse(
        f"iscsi://h/{IQN}/0",
        ISCSI_HBA_CHAP_NAME="me",
        ISCSI_HBA_CHAP_SECRET=SECRET,
        ISCSI_HBA_TARGET_CHAP_NAME="them",
        ISCSI_HBA_TARGET_CHAP_SECRET=TSECRET,
    )
    assert (url.chap_user, url.chap_secret) == ("me", SECRET)
    assert (url.target_user, url.target_secret) == ("them", TSECRET)


def test_secrets_from_libiscsi_environment() -> None:
    url = parse(
        f"iscsi://h/{IQN}/0",
        LIBISCSI_CHAP_USERNAME="me",
        LIBISCSI_CHAP_PASSWORD=SECRET,
        LIBISCSI_CHAP_TARGET_USERNAME="them",
        LIBISCSI_CHAP_TARGET_PASSWORD=TSECRET,
    )
    assert (url.chap_user, url.chap_secret) == ("me", SECRET)
    assert (url.target_user, url.target_secret) == ("them", TSECRET)


def test_precedence_url_then_project_then_libiscsi() -> None:
    url = parse(
        f"iscsi://urluser%{SECRET}@h/{IQN}/0",
        ISCSI_HBA_CHAP_NAME="envuser",
        LIBISCSI_CHAP_USERNAME="libuser",
        ISCSI_HBA_CHAP_SECRET="project-secret-1",
        LIBISCSI_CHAP_PASSWORD="libiscsi-secret",
    )
    assert (url.chap_user, url.chap_secret) == ("urluser", SECRET)
    url = parse(
        f"iscsi://urluser@h/{IQN}/0",
        ISCSI_HBA_CHAP_SECRET="project-secret-1",
        LIBISCSI_CHAP_PASSWORD="libiscsi-secret",
    )
    assert url.chap_secret == "project-secret-1"


def test_default_environment_is_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISCSI_HBA_CHAP_NAME", "me")
    monkeypatch.setenv("ISCSI_HBA_CHAP_SECRET", SECRET)
    url = parse_url(f"iscsi://h/{IQN}/0")
    assert url.chap_secret == SECRET


# ---------------------------------------------------------------------------------------------
# Secrets never show
# ---------------------------------------------------------------------------------------------


def test_str_repr_redacted_hide_secrets() -> None:
    url = parse(
        f"iscsi://me%{SECRET}@192.0.2.1/{IQN}/2?target_user=them&target_password={TSECRET}"
        "&header_digest=crc32c"
    )
    for text in (str(url), repr(url), url.redacted(), f"{url}", f"{url!r}"):
        assert SECRET not in text and TSECRET not in text
        assert "***" in text
    assert url.redacted() == (
        f"iscsi://me%***@192.0.2.1:3260/{IQN}/2"
        "?header_digest=crc32c&target_user=them&target_password=***"
    )
    assert "chap_secret='***'" in repr(url) and "target_secret='***'" in repr(url)


def test_redacted_round_trips_without_secrets() -> None:
    url = IscsiUrl(
        host="::1",
        chap_user="iqn.2024-01.org.example:me",
        chap_secret=SECRET,
        target_user="t g",
        target_secret=TSECRET,
        target_iqn=IQN,
        lun=4,
        data_digest=DigestPreference.CRC32C_NONE,
    )
    text = url.redacted()
    assert text == (
        f"iscsi://iqn.2024-01.org.example:me%***@[::1]:3260/{IQN}/4"
        "?data_digest=crc32c-none&target_user=t%20g&target_password=***"
    )
    again = parse_url(text.replace("***", SECRET, 1).replace("***", TSECRET), environ=NOENV)
    assert again == url


def test_no_secret_repr_is_plain() -> None:
    url = parse(f"iscsi://h/{IQN}/0")
    assert str(url) == f"iscsi://h:3260/{IQN}/0"
    assert "chap_secret=None" in repr(url)


# ---------------------------------------------------------------------------------------------
# Errors: each names the problem and the expected form, and never shows a secret
# ---------------------------------------------------------------------------------------------

ERRORS = [
    (f"http://h/{IQN}/0", "does not start with iscsi://"),
    (f"iscsi:///{IQN}/0", "has no host"),
    ("iscsi://", "has no host"),
    (f"iscsi://h/{IQN}", "names a target but no LUN"),
    (f"iscsi://h/{IQN}/", "names a target but no LUN"),
    ("iscsi://h//0", "empty target name"),
    (f"iscsi://h/{IQN}/0/extra", "path parts"),
    (f"iscsi://h/{IQN}/x", "LUN 'x' in URL .* is not a number"),
    (f"iscsi://h/{IQN}/-1", "is not a number"),
    (f"iscsi://h/{IQN}/65536", "larger than 65535"),
    (f"iscsi://h:0/{IQN}/0", "port '0' .* not a number from 1 to 65535"),
    (f"iscsi://h:65536/{IQN}/0", "from 1 to 65535"),
    (f"iscsi://h:/{IQN}/0", "port ''"),
    (f"iscsi://h:x/{IQN}/0", "port 'x'"),
    (f"iscsi://fe80::1/{IQN}/0", r"put it in brackets, e.g. \[fe80::1\] or \[fe80::1\]:3260"),
    # ::1:53649 is no address (a group has at most 4 hex digits): ::1 with its port.
    (f"iscsi://::1:53649/{IQN}/0", r"e.g. \[::1\]:53649$"),
    (f"iscsi://fd00::1:3260/{IQN}/0",
     r"e.g. \[fd00::1:3260\] for that address, or \[fd00::1\]:3260 if 3260 is the port"),
    (f"iscsi://[fe80::1/{IQN}/0", "without closing it"),
    (f"iscsi://[fe80::1]x/{IQN}/0", "after ']'"),
    (f"iscsi://[example.com]/{IQN}/0", "brackets are only for IPv6"),
    (f"iscsi://300.1.1.1/{IQN}/0", "not a valid IPv4 address"),
    (f"iscsi://bad_host/{IQN}/0", "not a valid host name"),
    (f"iscsi://-bad.example/{IQN}/0", "not a valid host name"),
    ("iscsi://h/iqn.2003-13.org.example/0", "month 13"),
    ("iscsi://h/iqn.03-01.org.example/0", "date yyyy-mm"),
    ("iscsi://h/iqn.2003-01/0", "date yyyy-mm and a '.'"),
    ("iscsi://h/iqn.2003-01.-bad/0", "reversed domain name"),
    ("iscsi://h/iqn.2003-01.org.example:a_b/0", "character '_' is not allowed"),
    ("iscsi://h/eui.0123/0", "exactly 16 hexadecimal"),
    ("iscsi://h/eui.0123456789abcdeg/0", "exactly 16 hexadecimal"),
    ("iscsi://h/naa.0123456789abcdef01/0", "16 or 32 hexadecimal"),
    ("iscsi://h/target1/0", "must start with 'iqn.', 'eui.' or 'naa.'"),
    ("iscsi://h/iqn.2003-01.org.example:" + "x" * 200 + "/0", "longer than 223 bytes"),
    (f"iscsi://h/{IQN}/0?foo=bar", "unknown option 'foo'; the options are header_digest="),
    (f"iscsi://h/{IQN}/0?header_digest", "has no '=value'"),
    (f"iscsi://h/{IQN}/0?header_digest=md5", "not one of none, crc32c, crc32c-none"),
    (f"iscsi://h/{IQN}/0?data_digest=crc", "data_digest='crc'"),
    (f"iscsi://h/{IQN}/0?header_digest=none&header_digest=none", "appears twice"),
    (f"iscsi://h/{IQN}/0?target_user=", "is empty"),
    (f"iscsi://@h/{IQN}/0", "nothing before it"),
    (f"iscsi://%{SECRET}@h/{IQN}/0", "empty CHAP user name"),
    (f"iscsi://user%@h/{IQN}/0", "empty CHAP secret"),
    (f"iscsi://user@h/{IQN}/0", "CHAP user name but no secret"),
    (f"iscsi://user%{SECRET}%zz@h/{IQN}/0", "not followed by two hex digits"),
    (f"iscsi://user%{SECRET}%ff@h/{IQN}/0", "does not decode to UTF-8"),
    (f"iscsi://h/{IQN}%zz/0", "target name in URL .* '%' that is not followed"),
    (f"iscsi://user%{SECRET}@h/{IQN}/0?target_user=t", "target_password is missing"),
    (
        f"iscsi://user%{SECRET}@h/{IQN}/0?target_password={TSECRET}",
        "target_user is missing",
    ),
    (
        f"iscsi://h/{IQN}/0?target_user=t&target_password={TSECRET}",
        "also needs one-way CHAP",
    ),
    (
        f"iscsi://u%{SECRET}@h/{IQN}/0?target_user=t&target_password={SECRET}",
        "equals the initiator's CHAP secret",
    ),
    (f"iscsi://u%{SECRET}?x@h/{IQN}/0", "no valid host"),
    (f"iscsi://u%{SECRET}@h/{IQN}/0?x%20y=1", "has an unknown option"),
]


@pytest.mark.parametrize(("text", "message"), ERRORS)
def test_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as info:
        parse(text)
    shown = str(info.value)
    assert SECRET not in shown and TSECRET not in shown
    # every error says what form is expected or what is wrong in words
    assert len(shown) > 30


def test_error_for_env_secret_without_user() -> None:
    with pytest.raises(ConfigurationError, match="no CHAP user name") as info:
        parse(f"iscsi://h/{IQN}/0", LIBISCSI_CHAP_PASSWORD=SECRET)
    assert SECRET not in str(info.value)


def test_error_shows_scrubbed_url() -> None:
    with pytest.raises(ConfigurationError) as info:
        parse(f"iscsi://me%{SECRET}@h/{IQN}/x?target_password={TSECRET}")
    assert f"'iscsi://***@h/{IQN}/x?target_password=***'" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        IQN,
        "iqn.1991-05.com.microsoft:host-01.example.com",
        "IQN.2003-01.ORG.EXAMPLE:Upper",
        "iqn.2003-01.org.example",
        "eui.0123456789ABCDEF",
        "naa.52004567BA64678D",
        "naa.6001405f2a7e8a1b9c3d4e5f60718293",
    ],
)
def test_valid_names(name: str) -> None:
    assert validate_iscsi_name(name) == name


def test_empty_name() -> None:
    with pytest.raises(ConfigurationError, match="target name is empty"):
        validate_iscsi_name("")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.1", ("192.0.2.1", 3260)),
        ("192.0.2.1:3261", ("192.0.2.1", 3261)),
        ("[::1]", ("::1", 3260)),
        ("[2001:db8::1]:860", ("2001:db8::1", 860)),
        ("san.example", ("san.example", 3260)),
    ],
)
def test_parse_portal(text: str, expected: tuple[str, int]) -> None:
    assert parse_portal(text) == expected
    assert parse_portal(format_portal(*expected)) == expected


def test_parse_portal_empty() -> None:
    with pytest.raises(ConfigurationError, match="empty"):
        parse_portal("")


# ---------------------------------------------------------------------------------------------
# Several portals: one LUN, one multipath path per portal (hbactl attach)
# ---------------------------------------------------------------------------------------------


def paths(text: str) -> IscsiUrl:
    return parse_url(text, environ=NOENV, several_portals=True)


def test_several_portals_each_with_its_own_port() -> None:
    url = paths(f"iscsi://me%{SECRET}@192.0.2.10,192.0.2.11:3261,[fd00::1]/{IQN}/1")
    assert url.portals == (("192.0.2.10", 3260), ("192.0.2.11", 3261), ("fd00::1", 3260))
    assert (url.host, url.port) == ("192.0.2.10", 3260)
    assert url.target_iqn == IQN and url.lun == 1 and url.chap_secret == SECRET
    assert not url.discover_portals
    assert url.redacted() == (
        f"iscsi://me%***@192.0.2.10:3260,192.0.2.11:3261,[fd00::1]:3260/{IQN}/1")
    assert SECRET not in repr(url) and "more_portals=" in repr(url)


def test_one_portal_keeps_the_single_form() -> None:
    url = paths(f"iscsi://192.0.2.10/{IQN}/0")
    assert url.portals == (("192.0.2.10", 3260),) and url.more_portals == ()
    assert url == parse(f"iscsi://192.0.2.10/{IQN}/0")


@pytest.mark.parametrize(("value", "expected"), [("on", True), ("YES", True), ("off", False),
                                                 ("no", False)])
def test_discover_portals_option(value: str, expected: bool) -> None:
    url = paths(f"iscsi://192.0.2.10/{IQN}/0?discover_portals={value}")
    assert url.discover_portals is expected
    assert ("discover_portals=on" in url.redacted()) is expected
    assert paths(url.redacted()) == url


@pytest.mark.parametrize(("text", "message"), [
    (f"iscsi://a,b/{IQN}/0", "names 2 portals; only hbactl attach"),
    (f"iscsi://a/{IQN}/0?discover_portals=on", "for hbactl attach .* only"),
])
def test_one_shot_commands_refuse_several_portals(text: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse(text)


@pytest.mark.parametrize(("text", "message"), [
    (f"iscsi://a,,b/{IQN}/0", "empty portal between commas"),
    (f"iscsi://a,/{IQN}/0", "empty portal between commas"),
    (f"iscsi://a:3260,a/{IQN}/0", "names portal a:3260 twice"),
    (f"iscsi://a,b:x/{IQN}/0", "port 'x'"),
    (f"iscsi://a,fe80::1/{IQN}/0", "put it in brackets"),
    (f"iscsi://a/{IQN}/0?discover_portals=maybe", "not one of on, off"),
])
def test_several_portals_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        paths(text)


@pytest.mark.parametrize("text", ["iscsi://192.0.2.1:3261", "iscsi://192.0.2.1:3261/"])
def test_a_portal_url_where_a_lun_is_needed_points_at_discovery(text: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        target_url(text)
    message = str(info.value)
    assert "'iscsi://192.0.2.1:3261' names no target and LUN" in message
    assert URL_SYNTAX in message and "`hbactl discover iscsi://192.0.2.1:3261`" in message


# ---------------------------------------------------------------------------------------------
# Numbers a person types: ASCII digits only, never a traceback
# ---------------------------------------------------------------------------------------------

HUGE = "9" * 5000   # past Python's 4300-digit limit of int()


@pytest.mark.parametrize(("text", "message"), [
    (f"iscsi://a/{IQN}/\u00b2", "is not a number"),
    (f"iscsi://a/{IQN}/\u0661", "is not a number"),   # ARABIC-INDIC ONE: int() takes it
    (f"iscsi://a/{IQN}/+1", "is not a number"),
    (f"iscsi://a/{IQN}/{HUGE}", r"LUN 9{20}\.\.\. .* is larger than 65535"),
    (f"iscsi://a:\u00b2/{IQN}/0", "is not a number from 1 to 65535"),
    (f"iscsi://a:{HUGE}/{IQN}/0", "is not a number from 1 to 65535"),
])
def test_numbers_are_ascii_digits_of_any_length(text: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse(text)


def test_decimal() -> None:
    assert [decimal(t) for t in ("0", "007", "65535", "1" + "0" * 18)] == [0, 7, 65535, 10**18]
    assert decimal("0" * 5000 + "12") == 12
    assert decimal(HUGE) == decimal("1" + "0" * 19) == TOO_LARGE
    for text in ("", " 1", "1 ", "+1", "-1", "1_0", "\u00b2", "\u0661", "1.0", "0x1"):
        assert decimal(text) is None, text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("iscsi:/[]@%?&=,.0123456789abf-_\u00b2\u0661 \x00"),
               max_size=60).map(lambda tail: "iscsi://" + tail))
def test_any_url_parses_or_raises_configuration_error(text: str) -> None:
    try:
        parse_url(text, environ=NOENV, several_portals=True)
    except ConfigurationError as exc:
        assert str(exc) and "\n" not in str(exc)


# ---------------------------------------------------------------------------------------------
# Bytes that are not UTF-8 (an argument or variable reaches Python as lone surrogates, PEP 383)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    f"iscsi://192.0.2.1/{IQN}\udcff/0",
    f"iscsi://me\udcff%{SECRET}@192.0.2.1/{IQN}/0",
    f"iscsi://me%{SECRET}\udcff@192.0.2.1/{IQN}/0",
    f"iscsi://192.0.2.1/{IQN}/0?target_user=t\udcff",
])
def test_a_url_that_is_not_utf8_is_refused(text: str) -> None:
    with pytest.raises(ConfigurationError, match="is not UTF-8 text") as info:
        parse(text)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("variable", ["ISCSI_HBA_CHAP_NAME", "ISCSI_HBA_CHAP_SECRET",
                                      "LIBISCSI_CHAP_TARGET_USERNAME",
                                      "ISCSI_HBA_TARGET_CHAP_SECRET"])
def test_an_environment_variable_that_is_not_utf8_is_named(variable: str) -> None:
    env = {"ISCSI_HBA_CHAP_NAME": "me", "ISCSI_HBA_CHAP_SECRET": SECRET,
           "ISCSI_HBA_TARGET_CHAP_NAME": "them", "ISCSI_HBA_TARGET_CHAP_SECRET": TSECRET}
    if variable == "LIBISCSI_CHAP_TARGET_USERNAME":
        del env["ISCSI_HBA_TARGET_CHAP_NAME"]   # ours comes first
    env[variable] = "x\udcff" + SECRET
    with pytest.raises(ConfigurationError,
                       match=f"environment variable {variable} is not UTF-8") as info:
        parse(f"iscsi://192.0.2.1/{IQN}/0", **env)
    assert SECRET not in str(info.value)


def test_a_name_that_is_not_utf8_is_not_valid() -> None:
    with pytest.raises(ConfigurationError, match="not a valid iSCSI name: it is not UTF-8"):
        validate_iscsi_name(IQN + "\udcff")


@pytest.mark.parametrize("text", [
    "iscsi://" + "a" * 100_000 + "/iqn.2003-01.org.example:disk1/0",
    "iscsi://[" + "f" * 100_000 + "]/iqn.2003-01.org.example:disk1/0",
    "iscsi://host/iqn.2003-01.org.example:" + "\x01" * 100_000 + "/0",
    "iscsi://host/iqn.2003-01.org.example:disk1/" + "x" * 100_000,
    "iscsi://host/iqn.2003-01.org.example:disk1/0?" + "k" * 100_000 + "=1",
    "iscsi://host:" + "9" * 100_000 + "/iqn.2003-01.org.example:disk1/0",
])
def test_a_huge_url_makes_a_short_message(text: str) -> None:
    # It was quoted whole, up to three times: a 300 000-character "sentence".
    with pytest.raises(ConfigurationError) as info:
        parse_url(text)
    assert len(str(info.value)) < 1500


@pytest.mark.parametrize(("text", "host"), [
    # RFC 6874: the zone's '%' is %25 in a URL; it was kept, and 'fe80::1%25lo' looked up.
    ("iscsi://[fe80::1%25lo]/iqn.2003-01.org.example:d/0", "fe80::1%lo"),
    ("iscsi://u%s@[fe80::1%25lo]:3261/iqn.2003-01.org.example:d/0", "fe80::1%lo"),
    ("iscsi://[fe80::1%25%6Co]/iqn.2003-01.org.example:d/0", "fe80::1%lo"),
    # RFC 6874 §4: a bare '%' not followed by two hex digits is taken as typed.
    ("iscsi://[fe80::1%lo]/iqn.2003-01.org.example:d/0", "fe80::1%lo"),
    ("iscsi://[fe80::1%251]/iqn.2003-01.org.example:d/0", "fe80::1%1"),  # lo's index
])
def test_an_ipv6_zone_is_decoded(text: str, host: str) -> None:
    url = parse(text)
    assert url.host == host
    assert parse(str(url)).host == host and "[fe80::1%25" in str(url)


@pytest.mark.parametrize(("text", "words"), [
    ("iscsi://[fe80::1%25nosuchif0]/iqn.2003-01.org.example:d/0",
     "the zone 'nosuchif0' of 'fe80::1%nosuchif0' in address '[fe80::1%25nosuchif0]' names "
     "no network interface of this host"),
    ("iscsi://[fe80::1%nosuchif0]/iqn.2003-01.org.example:d/0",
     "the zone 'nosuchif0' of 'fe80::1%nosuchif0'"),
    ("iscsi://[fe80::1%254000000000]/iqn.2003-01.org.example:d/0",
     "names no network interface"),
    ("iscsi://[fe80::1%2Flo]/iqn.2003-01.org.example:d/0",
     "write the '%' before the zone as %25 (RFC 6874)"),
    ("iscsi://[fe80::1%25]/iqn.2003-01.org.example:d/0",
     "the zone '' of 'fe80::1%25'"),
    ("iscsi://[fe80::1%25%1B]/iqn.2003-01.org.example:d/0",
     "the zone '\\x1b' of 'fe80::1%25%1B'"),
])
def test_an_ipv6_zone_naming_no_interface_is_refused_when_parsed(text: str, words: str) -> None:
    with pytest.raises(ConfigurationError) as exc:
        parse(text)
    assert words in str(exc.value)
