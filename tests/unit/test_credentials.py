"""initiator.credentials: the one CHAP builder of the one-shot commands and the daemon."""

from __future__ import annotations

import pytest

from initiator.chap import ChapInitiator
from initiator.credentials import ENVIRONMENT, ChapFields, ChapSource
from initiator.errors import AuthenticationError, ConfigurationError
from initiator.url import IscsiUrl, parse_url
from initiator.urlconfig import session_config

SECRET = "Zq8-secret-vX3"
TSECRET = "Tg7-target-pW9"
IQN = "iqn.2003-01.org.example:disk1"
URL = ChapSource.url(f"'iscsi://h/{IQN}/0'")
ENTRY = ChapSource.entry("disk1")


def test_nothing_given_is_no_chap() -> None:
    assert ChapFields().build(URL) is None
    assert ChapFields().build(ENTRY) is None and ChapFields().build(ENVIRONMENT) is None


def test_one_way_and_mutual() -> None:
    creds = ChapFields("me", SECRET).build(ENTRY)
    assert creds is not None and not creds.mutual
    assert creds.initiator.name == "me" and creds.initiator.secret.reveal() == SECRET.encode()
    creds = ChapFields("me", SECRET, "them", TSECRET).build(ENVIRONMENT)
    assert creds is not None and creds.mutual and creds.target is not None
    assert creds.target.name == "them" and creds.target.secret.reveal() == TSECRET.encode()


PROBLEMS = [
    (ChapFields("me"), "gives a CHAP user name but no secret"),
    (ChapFields(secret=SECRET), "gives a CHAP secret but no CHAP user name"),
    (ChapFields("me", SECRET, target_user="t"), "needs both"),
    (ChapFields("me", SECRET, target_secret=TSECRET), "needs both"),
    (ChapFields(target_user="t", target_secret=TSECRET), "also needs one-way CHAP"),
    (ChapFields("me", SECRET, "t", SECRET), "equals the initiator's CHAP secret; RFC 7143"),
    (ChapFields("x" * 256, SECRET), "CHAP name 'x"),
]


@pytest.mark.parametrize(("fields", "problem"), PROBLEMS)
@pytest.mark.parametrize("source", [URL, ENTRY, ENVIRONMENT], ids=["url", "entry", "env"])
def test_one_set_of_messages_naming_the_source(fields: ChapFields, problem: str,
                                               source: ChapSource) -> None:
    with pytest.raises(ConfigurationError, match=problem) as info:
        fields.build(source)
    message = str(info.value)
    assert source.where in message
    assert SECRET not in message and TSECRET not in message


def test_each_source_says_how_to_fix_it_in_its_own_words() -> None:
    def message(fields: ChapFields, source: ChapSource) -> str:
        with pytest.raises(ConfigurationError) as info:
            fields.build(source)
        return str(info.value)

    assert message(ChapFields("me"), URL).endswith(
        "write <user>%<secret>@ in the URL or set ISCSI_HBA_CHAP_SECRET "
        "(or LIBISCSI_CHAP_PASSWORD)")
    assert message(ChapFields("me"), ENTRY) == (
        'configuration entry "disk1" gives a CHAP user name but no secret; add chapSecret')
    assert message(ChapFields(secret=SECRET), ENVIRONMENT).endswith(
        "set ISCSI_HBA_CHAP_NAME (or LIBISCSI_CHAP_USERNAME)")
    assert "tgtChapSecret is missing" in message(ChapFields("me", SECRET, "t"), ENTRY)
    assert "target_user is missing" in message(
        ChapFields("me", SECRET, target_secret=TSECRET), URL)
    assert "ISCSI_HBA_TARGET_CHAP_NAME is missing" in message(
        ChapFields("me", SECRET, target_secret=TSECRET), ENVIRONMENT)
    assert "add chapIName and chapSecret" in message(ChapFields(None, None, "t", TSECRET), ENTRY)


@pytest.mark.parametrize(("source", "settings"), [
    (URL, "the user name and secret of the URL's <user>%<secret>@, or of ISCSI_HBA_CHAP_NAME"),
    (ENTRY, 'chapIName / chapSecret of configuration entry "disk1"'),
    (ENVIRONMENT, "ISCSI_HBA_CHAP_NAME / ISCSI_HBA_CHAP_SECRET (or LIBISCSI_CHAP_USERNAME"),
], ids=["url", "entry", "env"])
def test_a_rejected_response_names_the_settings_of_its_source(source: ChapSource,
                                                               settings: str) -> None:
    """A target's "authentication failure" told every user to check chapSecret / chapIName,
    the configuration's names, also when the secret came from the environment."""
    creds = ChapFields("me", SECRET).build(source)
    assert creds is not None
    ini = ChapInitiator(creds, target="iqn.t")
    with pytest.raises(AuthenticationError) as info:
        ini.login_rejected()
    assert f"rejected our CHAP response for 'me': check {settings}" in str(info.value)
    assert SECRET not in str(info.value)


def test_environment_fills_only_what_is_missing() -> None:
    env = {"ISCSI_HBA_CHAP_NAME": "envuser", "LIBISCSI_CHAP_USERNAME": "libuser",
           "LIBISCSI_CHAP_PASSWORD": SECRET, "ISCSI_HBA_CHAP_SECRET": "",
           "LIBISCSI_CHAP_TARGET_USERNAME": "them",
           "ISCSI_HBA_TARGET_CHAP_SECRET": TSECRET}
    filled = ChapFields().or_environment(env)
    # ours before libiscsi's; an empty variable counts as unset
    assert filled == ChapFields("envuser", SECRET, "them", TSECRET)
    assert ChapFields("urluser", "url-secret-123").or_environment(env) == \
        ChapFields("urluser", "url-secret-123", "them", TSECRET)
    assert ChapFields().or_environment({}) == ChapFields()


@pytest.mark.parametrize("name", ["ISCSI_HBA_CHAP_SECRET", "LIBISCSI_CHAP_TARGET_PASSWORD",
                                  "ISCSI_HBA_CHAP_NAME"])
@pytest.mark.parametrize("value", [SECRET + "\n", SECRET + "\r\n", "a\nb-secret-123"])
def test_a_line_break_from_the_environment_is_named(name: str, value: str) -> None:
    """``ISCSI_HBA_CHAP_SECRET=$(printf 'secret\\n')`` (a secret file's last newline) was
    sent as part of the secret, and the login failed with "rejected our CHAP response"."""
    with pytest.raises(ConfigurationError) as info:
        ChapFields().or_environment({name: value})
    assert str(info.value) == (f"environment variable {name} holds a line break (a file's "
                               "trailing newline?); set it without one")


def test_default_environment_is_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIBISCSI_CHAP_USERNAME", "me")
    monkeypatch.setenv("LIBISCSI_CHAP_PASSWORD", SECRET)
    assert ChapFields().or_environment() == ChapFields("me", SECRET)


def test_repr_hides_secrets() -> None:
    text = repr(ChapFields("me", SECRET, "them", TSECRET))
    assert "'me'" in text and "'them'" in text
    assert SECRET not in text and TSECRET not in text


def test_url_parser_and_session_config_agree() -> None:
    """The one-shot commands see the same sentence whether the URL parser or the session
    builder meets the problem first."""
    with pytest.raises(ConfigurationError) as parsed:
        parse_url(f"iscsi://me@h/{IQN}/0", environ={})
    with pytest.raises(ConfigurationError) as built:
        session_config(IscsiUrl(host="h", target_iqn=IQN, lun=0, chap_user="me"),
                       initiator_name="iqn.2024-01.org.example:host")
    assert str(parsed.value) == str(built.value).replace(
        f"'iscsi://me@h:3260/{IQN}/0'", f"'iscsi://***@h/{IQN}/0'")
    url = parse_url(f"iscsi://me%{SECRET}@h/{IQN}/0?target_user=t&target_password={TSECRET}",
                    environ={})
    creds = session_config(url, initiator_name="iqn.2024-01.org.example:host").credentials
    assert url.chap == ChapFields("me", SECRET, "t", TSECRET)
    assert creds == url.chap.build(URL)
