"""``python -m tcmu_handler.serve``: its bounds are checked before anything starts."""

from __future__ import annotations

import pytest

from initiator.errors import ConfigurationError
from tcmu_handler import serve

URL = "iscsi://127.0.0.1:1/iqn.2003-01.org.example:disk/0"


@pytest.mark.parametrize(("option", "value", "expected"), [
    ("--wait", "nan", "--wait nan: expected a number of seconds above 0"),
    ("--wait", "0", "--wait 0: expected a number of seconds above 0"),
    ("--login-timeout", "inf", "--login-timeout inf: expected a number of seconds above 0"),
    ("--login-timeout", "-1", "--login-timeout -1: expected a number of seconds above 0"),
    ("--drain-timeout", "-5", "--drain-timeout -5: expected a number of seconds, 0 or more"),
    ("--drain-timeout", "nan", "--drain-timeout nan: expected a number of seconds, 0 or more"),
])
def test_a_wait_without_a_bound_is_a_usage_error(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        option: str, value: str, expected: str) -> None:
    monkeypatch.setattr(serve, "_configure_logging", lambda: None)
    ran: list[object] = []
    monkeypatch.setattr(serve, "serve", ran.append)
    with caplog.at_level("ERROR"):
        status = serve.main([URL, "--device", "d", option, value])
    assert status == serve.EXIT_USAGE
    assert [r.getMessage() for r in caplog.records] == [expected]
    assert not ran


@pytest.mark.parametrize("option", ["--wait", "--login-timeout", "--drain-timeout"])
@pytest.mark.parametrize("value", ["\u0661", "1_0", "\u00b2", "five"])
def test_seconds_are_ascii_digits(capsys: pytest.CaptureFixture[str], option: str,
                                  value: str) -> None:
    # float() took them: '1_0' waited 10 s, an Arabic-Indic 1 one second.
    with pytest.raises(SystemExit) as exit_:
        serve.main([URL, "--device", "d", option, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"{option}: {value!r} is not a number of seconds" in err and "Traceback" not in err


def test_a_drain_timeout_of_0_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve, "_configure_logging", lambda: None)

    async def served(args: object) -> int:
        return 0

    monkeypatch.setattr(serve, "serve", served)
    assert serve.main([URL, "--device", "d", "--drain-timeout", "0"]) == 0


def test_the_help_shows_the_url_as_it_is_written() -> None:
    # argparse %-formats the options' help, not the epilog: '%%' there was printed as is.
    text = serve.build_parser().format_help()
    assert "[user[%secret]@]" in " ".join(text.split())
    assert "%%" not in text


@pytest.mark.parametrize("value", ["\u0661", "1_0", " 1", "+1", "-0", "\u00b2"])
def test_a_lun_is_ascii_digits(capsys: pytest.CaptureFixture[str], value: str) -> None:
    # int() took them: an Arabic-Indic 1 served LUN 1.
    with pytest.raises(SystemExit) as exit_:
        serve.main([URL, "--device", "d", "--lun", value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"--lun: {value!r} is not a whole number (digits 0-9)" in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["user_\u0661/d", "user_\u00b2/d", "user_1_0/d", "user_+1/d"])
def test_a_device_hba_index_is_ascii_digits(name: str) -> None:
    with pytest.raises(ConfigurationError, match="expected a backstore name, or user_<N>/<name>"):
        serve.parse_device_name(name)


def test_a_lun_too_large_is_a_usage_error(monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(serve, "_configure_logging", lambda: None)
    with caplog.at_level("ERROR"):
        assert serve.main([URL, "--device", "d", "--lun", "9" * 5000]) == serve.EXIT_USAGE
    assert "is not a LUN from 0 to 65535" in caplog.text
    assert serve.parse_device_name("user_07/d") == (7, "d")
