"""hba.config: FreeBSD iscsi.conf(5) grammar, semantic checks with path:line, file permissions."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hba.config import (
    MAX_CONFIG_BYTES,
    MAX_SHOWN_ERRORS,
    AuthMethod,
    Config,
    ConfigError,
    SessionType,
    TargetEntry,
    load_config,
    parse_config,
)
from hba.errors import HBAError
from initiator.url import DigestPreference

PATH = "/etc/iscsi-hba.conf"
SECRET = "Zq8-secret-vX3"
TSECRET = "Tg7-target-pW9"
IQN = "iqn.2003-01.org.example:disk1"


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, PATH)
    return list(info.value.errors)


def one_error(text: str) -> str:
    errors = errors_of(text)
    assert len(errors) == 1, errors
    return errors[0]


# ---------------------------------------------------------------------------------------------
# Grammar
# ---------------------------------------------------------------------------------------------

FREEBSD_EXAMPLE = """\
myiscsi { # nickname
   targetaddress = iscsi1
   targetname    = iqn.1900-01.com.com:sn.123456
}

myiscsi6 { # nickname
   targetaddress = [2001:db8::de:ef]:3260
   targetname    = iqn.1900-01.com.com:sn.123456
}

chaptest {
   targetaddress = 10.0.0.1;
   targetname    = iqn.1900-01.com.com:sn.123456;
   initiatorname = iqn.2005-01.il.ac.huji.cs:nobody;
   authmethod    = CHAP;
   chapiname     = iqn.2005-01.il.ac.huji.cs:nobody;
   chapsecret    = "secretsecret";
}
"""


def test_freebsd_man_page_example() -> None:
    config = parse_config(FREEBSD_EXAMPLE, PATH)
    assert list(config.entries) == ["myiscsi", "myiscsi6", "chaptest"]
    first = config.entries["myiscsi"]
    assert (first.host, first.port, first.line) == ("iscsi1", 3260, 1)
    assert config.entries["myiscsi6"].host == "2001:db8::de:ef"
    assert config.entries["myiscsi6"].portal == "[2001:db8::de:ef]:3260"
    chap = config.entries["chaptest"]
    assert chap.auth_method is AuthMethod.CHAP
    assert chap.chap_name == "iqn.2005-01.il.ac.huji.cs:nobody"
    assert chap.chap_secret == "secretsecret"
    assert chap.initiator_name == "iqn.2005-01.il.ac.huji.cs:nobody"
    assert config.warnings == ()


def test_defaults() -> None:
    entry = parse_config(f"t {{ TargetAddress = h\n TargetName = {IQN} }}", PATH).entries["t"]
    assert entry == TargetEntry(nickname="t", line=1, host="h", port=3260, target_name=IQN)
    assert entry.session_type is SessionType.NORMAL
    assert entry.auth_method is AuthMethod.NONE
    assert entry.header_digest is DigestPreference.NONE
    assert entry.data_digest is DigestPreference.NONE
    assert entry.enable
    assert (entry.lun, entry.queue_depth) == (0, 32)
    assert (entry.replacement_timeout, entry.login_timeout) == (120, 15)
    assert (entry.noop_interval, entry.noop_timeout) == (5, 5)
    assert (entry.command_timeout, entry.tmf_timeout, entry.logout_timeout) == (30, 15, 10)
    assert entry.max_recv_data_segment_length is None
    assert entry.immediate_data is None and entry.initial_r2t is None
    assert entry.initiator_name is None and not entry.mutual_chap


def test_every_key() -> None:
    text = f"""
    # every key, mixed case, some quoted, some with ';'
    Full {{
        TARGETADDRESS = "192.0.2.7:3261"
        TargetName = {IQN}
        InitiatorName = iqn.2024-01.org.example:host
        InitiatorAddress = 192.0.2.1
        InitiatorAlias = "my host"
        AuthMethod = chap
        chapIName = me
        chapSecret = "{SECRET}"
        tgtChapName = them
        tgtChapSecret = {TSECRET};
        HeaderDigest = CRC32C
        DataDigest = "None,CRC32C"
        SessionType = Normal
        Enable = off
        Protocol = iSCSI
        Lun = 300
        QueueDepth = 128
        ReplacementTimeout = 0
        LoginTimeout = 30
        NoopInterval = 0
        PingTimeout = 10
        CommandTimeout = 0
        TaskManagementTimeout = 7
        LogoutTimeout = 3
        MaxRecvDataSegmentLength = 262144
        MaxBurstLength = 16776192
        FirstBurstLength = 65536
        ImmediateData = Yes
        InitialR2T = no
    }}
    """
    config = parse_config(text, PATH)
    e = config.entries["Full"]
    assert (e.host, e.port, e.line) == ("192.0.2.7", 3261, 3)
    assert e.target_name == IQN
    assert e.initiator_name == "iqn.2024-01.org.example:host"
    assert e.initiator_address == "192.0.2.1"
    assert e.initiator_alias == "my host"
    assert e.auth_method is AuthMethod.CHAP
    assert (e.chap_name, e.chap_secret) == ("me", SECRET)
    assert (e.tgt_chap_name, e.tgt_chap_secret) == ("them", TSECRET)
    assert e.mutual_chap
    assert e.header_digest is DigestPreference.CRC32C
    assert e.data_digest is DigestPreference.NONE_CRC32C
    assert not e.enable
    assert e.lun == 300 and e.queue_depth == 128
    assert e.replacement_timeout == 0 and e.login_timeout == 30
    assert e.noop_interval == 0 and e.noop_timeout == 10
    assert (e.command_timeout, e.tmf_timeout, e.logout_timeout) == (0, 7, 3)
    assert e.max_recv_data_segment_length == 262144
    assert e.max_burst_length == 16776192 and e.first_burst_length == 65536
    assert e.immediate_data is True and e.initial_r2t is False
    assert config.enabled() == ()
    assert config.get("full") is e and config.get("FULL") is e and config.get("x") is None


def test_layout_freedom() -> None:
    text = (
        f"a {{ TargetAddress = h1 ; TargetName = {IQN} }} b\n{{\nTargetAddress=h2\n"
        f'TargetName="{IQN}"}}\n'
        f"c {{ sessiontype = discovery targetaddress = [::1]:3262 }}  # trailing comment\r\n"
    )
    config = parse_config(text, PATH)
    assert [e.host for e in config.entries.values()] == ["h1", "h2", "::1"]
    assert config.entries["b"].line == 1
    disc = config.entries["c"]
    assert disc.session_type is SessionType.DISCOVERY and disc.target_name is None
    assert disc.port == 3262


def test_a_byte_order_mark_before_the_first_line_is_ignored() -> None:
    config = parse_config(f"\ufefft {{ TargetAddress = h\n TargetName = {IQN} }}\n", PATH)
    assert list(config.entries) == ["t"]


def test_empty_and_comment_only_files() -> None:
    assert parse_config("", PATH) == Config(path=PATH, entries={})
    assert parse_config("# nothing\n\n   # here\n", PATH).entries == {}


def test_hash_and_spaces_inside_quotes() -> None:
    text = (
        f"t {{ TargetAddress = h\n TargetName = {IQN}\n"
        ' chapIName = "a #b"\n chapSecret = "x y #z;{}=123" }'
    )
    entry = parse_config(text, PATH).entries["t"]
    assert entry.chap_name == "a #b"
    assert entry.chap_secret == "x y #z;{}=123"


def test_chap_implied_by_chap_keys() -> None:
    text = (
        f"t {{ TargetAddress = h\n TargetName = {IQN}\n chapIName = me\n chapSecret = {SECRET} }}"
    )
    assert parse_config(text, PATH).entries["t"].auth_method is AuthMethod.CHAP


@pytest.mark.parametrize("key", ["chapIName", "tgtChapName"])
@pytest.mark.parametrize("name", ['"a\0b"', "n" * 256])
def test_a_chap_name_no_login_can_send_is_refused_at_its_line(key: str, name: str) -> None:
    # Before, it loaded and only the attach refused it, with no file or line.
    names = {"chapIName": "me", "tgtChapName": "t", key: name}
    text = (f"t {{ TargetAddress = h\n TargetName = {IQN}\n chapSecret = {SECRET}\n"
            f" tgtChapSecret = other-{SECRET}\n chapIName = {names['chapIName']}\n"
            f" tgtChapName = {names['tgtChapName']}\n}}")
    line = 5 if key == "chapIName" else 6
    with pytest.raises(ConfigError, match=rf"{PATH}:{line}: {key} .* must be at most 255 "
                                          "bytes of UTF-8 text without NUL"):
        parse_config(text, PATH)


# ---------------------------------------------------------------------------------------------
# Warnings
# ---------------------------------------------------------------------------------------------


def test_ignored_keys_warn() -> None:
    text = f"""t {{
  TargetAddress = h
  TargetName = {IQN}
  port = 3260
  MaxConnections = 4
  ErrorRecoveryLevel = 2
  tags = 64
  dscp = ef
  Offload = cxgbei
}}"""
    config = parse_config(text, PATH)
    assert config.warnings == (
        f"{PATH}:4: port is ignored: obsolete (put the port in TargetAddress)",
        f"{PATH}:5: MaxConnections is ignored: iscsi-hba uses one connection per session",
        f"{PATH}:6: ErrorRecoveryLevel is ignored: iscsi-hba implements ErrorRecoveryLevel 0 only",
        f"{PATH}:7: tags is ignored: obsolete iscontrol setting",
        f"{PATH}:8: dscp is ignored: not supported by iscsi-hba",
        f"{PATH}:9: Offload is ignored: hardware offload does not apply to iscsi-hba",
    )


def test_chap_keys_under_auth_none_warn_and_are_dropped() -> None:
    text = f"""t {{
  TargetAddress = h
  TargetName = {IQN}
  AuthMethod = None
  chapIName = me
  chapSecret = {SECRET}
}}"""
    config = parse_config(text, PATH)
    entry = config.entries["t"]
    assert entry.auth_method is AuthMethod.NONE
    assert entry.chap_name is None and entry.chap_secret is None
    assert config.warnings == (
        f'{PATH}:4: chapIName, chapSecret in "t" are ignored because AuthMethod is None',
    )


def test_short_secret_warns() -> None:
    text = f"t {{ TargetAddress = h\n TargetName = {IQN}\n chapIName = me\n chapSecret = short }}"
    (warning,) = parse_config(text, PATH).warnings
    assert warning.startswith(f'{PATH}:4: chapSecret in "t" is shorter than 12 bytes')
    assert "short" not in warning.split(":", 2)[2].replace("shorter", "")


# ---------------------------------------------------------------------------------------------
# Errors: every path, each as path:line: ...
# ---------------------------------------------------------------------------------------------

GOOD = f"TargetAddress = h\n TargetName = {IQN}\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # lexical and syntax
        ('t { TargetAddress = "h\n}', ":1: a quoted string is not closed on this line"),
        ("{ }", ":1: '{' without a nickname before it"),
        ("}", ":1: '}' without a matching '{'"),
        ("= x", ":1: unexpected '=' outside a block"),
        ("TargetAddress = h", ":1: 'key = value' outside a block"),
        # a daemon key misspelt was told to go inside a block
        ("Workrs = 2", ":1: unknown key 'Workrs' outside a block; did you mean Workers?"),
        ("metric = 9433", ":1: unknown key 'metric' outside a block; did you mean Metrics?"),
        ("t\nx { }", ":1: expected a nickname followed by '{'"),
        (f"t {{ {GOOD}", ':1: block "t" is not closed'),
        (f"t {{ {GOOD} u {{ }}", ":3: blocks cannot be nested"),
        (f"t {{ {GOOD} TargetName }}", ":3: expected 'key = value'"),
        (f"t {{ {GOOD} = 3 }}", ":3: expected 'key = value'"),
        (f"t {{ {GOOD} Lun = \n 3 }}", ":3: Lun has no value after '='"),
        (f"t {{ {GOOD} Lun = ; }}", ":3: Lun has no value after '='"),
        (f'"" {{ {GOOD} }}', ":1: the nickname is empty"),
        # keys
        (
            f"t {{ {GOOD} TargetNmae = x }}",
            ":3: unknown key 'TargetNmae' in \"t\"; did you mean TargetName?",
        ),
        (f"t {{ {GOOD} frobnicate = 1 }}", ":3: unknown key 'frobnicate' in \"t\""),
        (
            f"t {{ {GOOD} targetname = {IQN} }}",
            ':3: TargetName is set twice in "t" (also on line 2)',
        ),
        (f"t {{ {GOOD} NoopTimeout = 1\n PingTimeout = 2 }}", ":4: NoopTimeout is set twice"),
        # values
        (
            f"t {{ TargetAddress = h:0\n TargetName = {IQN} }}",
            ":1: TargetAddress 'h:0' is not usable",
        ),
        (
            f"t {{ TargetAddress = iscsi://h/{IQN}/0\n TargetName = {IQN} }}",
            f":1: TargetAddress 'iscsi://h/{IQN}/0' is a URL; TargetAddress is host[:port]",
        ),
        # '²' is a digit to str.isdigit() and none to int(): a ValueError traceback, at start.
        (
            f"t {{ TargetAddress = ::\u00b2\n TargetName = {IQN} }}",
            ":1: TargetAddress '::\u00b2' is not usable",
        ),
        (f"t {{ TargetAddress = fe80::1\n TargetName = {IQN} }}", "put it in brackets"),
        (
            "t { TargetAddress = h\n TargetName = iqn.2003-13.org.x }",
            ":2: TargetName 'iqn.2003-13.org.x' is not a valid iSCSI name: month 13",
        ),
        (
            f"t {{ {GOOD} InitiatorName = bob }}",
            ":3: InitiatorName 'bob' is not a valid iSCSI name",
        ),
        (
            f"t {{ {GOOD} InitiatorAddress = somehost }}",
            ":3: InitiatorAddress 'somehost' must be an IP address",
        ),
        (f't {{ {GOOD} InitiatorAlias = "" }}', ":3: InitiatorAlias '' must not be empty"),
        (f"t {{ {GOOD} AuthMethod = Kerberos }}", ":3: AuthMethod 'Kerberos' must be None or CHAP"),
        (f"t {{ {GOOD} HeaderDigest = MD5 }}", ":3: HeaderDigest 'MD5' must be None or CRC32C"),
        (f"t {{ {GOOD} DataDigest = crc }}", ":3: DataDigest 'crc' must be None or CRC32C"),
        (
            f"t {{ {GOOD} SessionType = Full }}",
            ":3: SessionType 'Full' must be Normal or Discovery",
        ),
        (f"t {{ {GOOD} Enable = maybe }}", ":3: Enable 'maybe' must be on or off"),
        (f"t {{ {GOOD} Protocol = iSER }}", ":3: Protocol 'iSER' iSER is not supported"),
        (f"t {{ {GOOD} Protocol = fcp }}", ":3: Protocol 'fcp' must be iSCSI"),
        (f"t {{ {GOOD} Lun = 65536 }}", ":3: Lun '65536' must be a whole number from 0 to 65535"),
        (f"t {{ {GOOD} Lun = -1 }}", ":3: Lun '-1' must be a whole number"),
        (
            f"t {{ {GOOD} QueueDepth = 0 }}",
            ":3: QueueDepth '0' must be a whole number from 1 to 1024",
        ),
        (f"t {{ {GOOD} QueueDepth = 1025 }}", "from 1 to 1024"),
        (
            f"t {{ {GOOD} ReplacementTimeout = 2m }}",
            ":3: ReplacementTimeout '2m' must be a whole number from 0 to 86400 seconds",
        ),
        (
            f"t {{ {GOOD} LoginTimeout = 0 }}",
            ":3: LoginTimeout '0' must be a whole number from 1 to 3600",
        ),
        (f"t {{ {GOOD} NoopInterval = 3601 }}", ":3: NoopInterval '3601'"),
        (f"t {{ {GOOD} NoopTimeout = 0 }}", ":3: NoopTimeout '0'"),
        (
            f"t {{ {GOOD} MaxRecvDataSegmentLength = 511 }}",
            ":3: MaxRecvDataSegmentLength '511' must be a whole number from 512 to 16777215",
        ),
        (f"t {{ {GOOD} MaxBurstLength = 16777216 }}", ":3: MaxBurstLength '16777216'"),
        (f"t {{ {GOOD} FirstBurstLength = x }}", ":3: FirstBurstLength 'x'"),
        (f"t {{ {GOOD} ImmediateData = maybe }}", ":3: ImmediateData 'maybe' must be Yes or No"),
        (f"t {{ {GOOD} InitialR2T = 1 }}", ":3: InitialR2T '1' must be Yes or No"),
        # semantics (FreeBSD conf_verify and ours)
        ("t { TargetAddress = h }", ':1: "t" has no TargetName; add TargetName'),
        (f"t {{ TargetName = {IQN} }}", ':1: "t" has no TargetAddress'),
        (
            f"t {{ {GOOD} SessionType = Discovery }}",
            ':2: "t" is a discovery session and cannot have a TargetName',
        ),
        (
            "t { TargetAddress = h\n SessionType = Discovery\n Lun = 1 }",
            ':3: "t" is a discovery session and cannot have a Lun',
        ),
        (
            f"t {{ {GOOD} AuthMethod = CHAP\n chapIName = me }}",
            ':3: "t" uses CHAP but has no chapSecret',
        ),
        (f"t {{ {GOOD} chapSecret = {SECRET} }}", ':1: "t" uses CHAP but has no chapIName'),
        (
            f"t {{ {GOOD} chapIName = me\n chapSecret = {SECRET}\n tgtChapName = them }}",
            ':5: "t" sets tgtChapName but not tgtChapSecret',
        ),
        (
            f"t {{ {GOOD} chapIName = me\n chapSecret = {SECRET}\n tgtChapSecret = {TSECRET} }}",
            ':5: "t" sets tgtChapSecret but not tgtChapName',
        ),
        (
            f"t {{ {GOOD} chapIName = me\n chapSecret = {SECRET}\n tgtChapName = x\n"
            f" tgtChapSecret = {SECRET} }}",
            ':6: tgtChapSecret in "t" equals chapSecret; RFC 7143 §9.2.1',
        ),
        (
            f"t {{ {GOOD} tgtChapName = x\n tgtChapSecret = {TSECRET} }}",
            ':3: "t" sets tgtChapName and tgtChapSecret but neither chapIName nor chapSecret',
        ),
        (
            f"t {{ {GOOD} FirstBurstLength = 65536\n MaxBurstLength = 8192 }}",
            ':3: FirstBurstLength 65536 in "t" exceeds MaxBurstLength 8192',
        ),
        (f"t {{ {GOOD} }}\nT {{ {GOOD} }}", ':4: nickname "T" is used twice (also on line 1)'),
    ],
)
def test_error(text: str, expected: str) -> None:
    errors = errors_of(text)
    assert any(expected in e for e in errors), errors
    assert all(e.startswith(f"{PATH}:") for e in errors)


def test_all_errors_of_a_file_in_line_order() -> None:
    text = f"""# a bad file
a {{
  TargetAddress = 10.0.0.1:99999
  TargetName = iqn.2003-13.org:x
  chapIName = me
  chapSecret = {SECRET} tail
  chapSecert = hunter2
  tgtChapSecret = "{TSECRET}
  Lun = -1
}}
b {{
  TargetName = {IQN}
}}
"""
    errors = errors_of(text)
    lines = [int(e.split(":")[1]) for e in errors]
    assert lines == sorted(lines)
    assert lines == [3, 4, 6, 7, 8, 8, 9, 11]
    with pytest.raises(ConfigError) as info:
        parse_config(text, PATH)
    message = str(info.value)
    assert message.startswith(f"8 problems in {PATH}:\n  {PATH}:3: ")
    assert "did you mean chapSecret?" in message
    assert "unexpected text after a value; quote values that contain spaces" in message


def test_a_wrong_file_shows_its_first_problems_not_all() -> None:
    # A file that is not a configuration (a log) has a problem on every line: all 10000 were
    # printed, and logged a line each.
    text = "".join(f"garbage line {n}\n" for n in range(10_000))
    with pytest.raises(ConfigError) as info:
        parse_config(text, PATH)
    assert len(info.value.errors) == 10_000
    lines = info.value.lines
    assert lines[0] == f"10000 problems in {PATH}:"
    assert lines[1] == f"  {PATH}:1: expected a nickname followed by '{{'"
    assert len(lines) == 1 + MAX_SHOWN_ERRORS + 1
    assert lines[-1] == f"  ... and {10_000 - MAX_SHOWN_ERRORS} more, not shown: is it the " \
                        "right file?"
    assert str(info.value) == "\n".join(lines)


def test_no_error_or_repr_shows_a_secret() -> None:
    bad = f"""t {{
  TargetAddress = h
  TargetName = {IQN}
  chapIName = me
  chapSecret = {SECRET} {TSECRET}
  chapIName = me; chapSecret = {SECRET} {TSECRET} = x
  tgtChapName = them
  tgtChapSecret = {SECRET}
  chapSecret = {TSECRET}
}}
u {{ chapSecret = "{SECRET}
"""
    with pytest.raises(ConfigError) as info:
        parse_config(bad, PATH)
    assert SECRET not in str(info.value) and TSECRET not in str(info.value)
    good = (
        f"t {{ {GOOD} chapIName = me\n chapSecret = {SECRET}\n tgtChapName = x\n"
        f" tgtChapSecret = {TSECRET} }}"
    )
    config = parse_config(good, PATH)
    entry = config.entries["t"]
    for text in (repr(entry), str(entry), repr(config), str(config)):
        assert SECRET not in text and TSECRET not in text
    assert "chap_secret='***'" in repr(entry) and "tgt_chap_secret='***'" in repr(entry)
    assert "chap_name='me'" in repr(entry)


def test_config_error_is_hba_error() -> None:
    assert issubclass(ConfigError, HBAError)
    err = ConfigError(["one thing"], path=PATH)
    assert str(err) == "one thing" and err.errors == ("one thing",) and err.path == PATH


# ---------------------------------------------------------------------------------------------
# load_config: file access and permissions
# ---------------------------------------------------------------------------------------------

WITH_SECRET = f"t {{ {GOOD} chapIName = me\n chapSecret = {SECRET} }}\n"
WITHOUT_SECRET = f"t {{ {GOOD} }}\n"


def write(tmp_path: Path, text: str, mode: int) -> Path:
    path = tmp_path / "iscsi-hba.conf"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_load_ok(tmp_path: Path) -> None:
    path = write(tmp_path, WITH_SECRET, 0o600)
    config = load_config(path)
    assert config.path == str(path)
    assert config.entries["t"].chap_secret == SECRET
    assert load_config(str(path)).entries.keys() == {"t"}


def test_load_refuses_readable_secret(tmp_path: Path) -> None:
    path = write(tmp_path, WITH_SECRET, 0o644)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message == (
        f"{path}: holds CHAP secrets but its mode is 0644, so other users can read or change "
        f"it; run: chmod 600 {path}"
    )
    assert SECRET not in message


def test_the_command_that_fixes_the_mode_quotes_the_path(tmp_path: Path) -> None:
    # A path with a space (a checkout in "/tmp/my stuff") gave `chmod 600 /tmp/my stuff/...`,
    # which a shell splits into two other files.
    folder = tmp_path / "my conf ä"
    folder.mkdir()
    path = write(folder, WITH_SECRET, 0o644)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).endswith(f"; run: chmod 600 '{path}'")
    path.chmod(0o664)
    path.write_text(WITHOUT_SECRET)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).endswith(f"; run: chmod go-w '{path}'")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o660, 0o700 | 0o007])
def test_load_refuses_any_group_or_other_access_with_secret(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path, WITH_SECRET, mode)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_config(path)


def test_load_secret_in_block_with_errors_still_checked(tmp_path: Path) -> None:
    path = write(tmp_path, f"t {{ chapSecret = {SECRET} }}\n", 0o644)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    errors = info.value.errors
    assert "chmod 600" in errors[0]
    assert any("has no TargetAddress" in e for e in errors[1:])


def test_load_allows_readable_file_without_secrets(tmp_path: Path) -> None:
    path = write(tmp_path, WITHOUT_SECRET, 0o644)
    assert load_config(path).entries["t"].host == "h"


def test_load_refuses_group_writable(tmp_path: Path) -> None:
    path = write(tmp_path, WITHOUT_SECRET, 0o664)
    with pytest.raises(ConfigError, match=r"mode is 0664, .* run: chmod go-w"):
        load_config(path)


def test_load_refuses_file_of_another_user(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file away")
    path = write(tmp_path, WITH_SECRET, 0o600)
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigError, match=r"owned by uid 65534.* chown root:root") as info:
        load_config(path)
    assert SECRET not in str(info.value)


def test_load_accepts_own_file_and_roots_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, WITH_SECRET, 0o600)
    owner = path.stat().st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner)
    assert load_config(path).entries
    # a non-root daemon may read root's file; a file of somebody else is refused
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    if owner == 0:
        assert load_config(path).entries
    else:
        with pytest.raises(ConfigError, match="owned by"):
            load_config(path)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot open .*No such file or directory"):
        load_config(tmp_path / "absent.conf")


def test_load_a_file_larger_than_any_configuration_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "image.conf"
    path.write_bytes(b"# " + b"x" * MAX_CONFIG_BYTES + b"\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match=rf"{path}: larger than {MAX_CONFIG_BYTES} bytes"):
        load_config(path)
    path.write_bytes(b"#" * (MAX_CONFIG_BYTES - 1) + b"\n")   # the largest one is read
    assert load_config(path).entries == {}


def test_load_directory(tmp_path: Path) -> None:
    # It said "not a regular file" and nothing of what it was or what to give.
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value) == (f"{tmp_path}: not a regular file but a directory; name the "
                               "configuration file itself")


def test_load_a_file_this_user_cannot_read_says_who_can(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # "cannot open /etc/iscsi-hba.conf: Permission denied", and nothing of what to do.
    def refused(path: str, flags: int) -> int:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "open", refused)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "iscsi-hba.conf")
    assert str(info.value) == (
        f"cannot open {tmp_path}/iscsi-hba.conf: Permission denied; the daemon reads it as root "
        "(systemctl start iscsi-hba, or hbactl daemon as root)")


def test_load_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.conf"
    os.mkfifo(fifo, 0o600)
    outcome: list[BaseException | Config] = []

    def load() -> None:
        try:
            outcome.append(load_config(fifo))
        except BaseException as exc:   # handed to the test's thread
            outcome.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():   # blocked in open(): let it go before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail("load_config waited for a writer of a FIFO")
    assert isinstance(outcome[0], ConfigError) and "not a regular file" in str(outcome[0])


def test_load_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.conf"
    path.write_bytes(b"# fine\nt { TargetName = \xff }\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match=r"bad.conf:2: not UTF-8 text"):
        load_config(path)


def test_load_reports_parse_errors_with_path(tmp_path: Path) -> None:
    path = write(tmp_path, "t { Lun = x }\n", 0o600)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert all(e.startswith(f"{path}:1: ") for e in info.value.errors)


# ------------------------------------------------------------------------------------------
# multipath entries


def test_several_target_addresses_make_a_multipath_entry() -> None:
    config = parse_config(
        f'db {{ TargetAddress = "192.0.2.10, 192.0.2.11:3261"\n TargetName = {IQN} }}\n'
        f"word {{ TargetAddress = [fd00::1],[fd00::2]:3262\n TargetName = {IQN}\n Lun = 1 }}\n"
        f"one {{ TargetAddress = 192.0.2.10\n TargetName = {IQN}\n Lun = 2 }}\n", PATH)
    db, word, one = (config.entries[n] for n in ("db", "word", "one"))
    assert db.addresses == (("192.0.2.10", 3260), ("192.0.2.11", 3261))
    assert (db.host, db.port, db.portal) == ("192.0.2.10", 3260, "192.0.2.10:3260")
    assert word.addresses == (("fd00::1", 3260), ("fd00::2", 3262))
    assert db.multipath and word.multipath and not one.multipath
    # A down path fails its I/O after a few seconds, so that dm-multipath moves it on.
    assert (db.replacement_timeout, word.replacement_timeout, one.replacement_timeout) == \
        (5, 5, 120)


def test_discover_portals_makes_a_multipath_entry_and_an_explicit_timeout_stays() -> None:
    config = parse_config(
        f"a {{ TargetAddress = h\n TargetName = {IQN}\n DiscoverPortals = on }}\n"
        f"b {{ TargetAddress = h1,h2\n TargetName = {IQN}\n Lun = 1\n"
        " ReplacementTimeout = 20 }\n"
        f"c {{ TargetAddress = h\n TargetName = {IQN}\n Lun = 2\n DiscoverPortals = off }}\n",
        PATH)
    a, b, c = (config.entries[n] for n in "abc")
    assert a.discover_portals and a.multipath and a.replacement_timeout == 5
    assert a.addresses == (("h", 3260),)
    assert b.multipath and b.replacement_timeout == 20
    assert not c.multipath and c.replacement_timeout == 120


@pytest.mark.parametrize(("text", "message"), [
    (f"t {{ TargetAddress = h,,h2\n TargetName = {IQN} }}",
     ":1: TargetAddress 'h,,h2' has an empty address between commas"),
    (f"t {{ TargetAddress = h,\n TargetName = {IQN} }}", "empty address between commas"),
    (f"t {{ TargetAddress = h,h:3260\n TargetName = {IQN} }}",
     ":1: TargetAddress 'h,h:3260' names h:3260 twice"),
    (f"t {{ TargetAddress = h,h2:0\n TargetName = {IQN} }}",
     ":1: TargetAddress 'h,h2:0' is not usable: port '0'"),
    (f"t {{ {GOOD} DiscoverPortals = sometimes }}",
     ":3: DiscoverPortals 'sometimes' must be on or off"),
    ("t { TargetAddress = h\n SessionType = Discovery\n DiscoverPortals = on }",
     ':3: "t" is a discovery session; DiscoverPortals is for entries with a TargetName'),
])
def test_multipath_errors(text: str, message: str) -> None:
    assert any(message in error for error in errors_of(text)), errors_of(text)


HUGE = "9" * 5000   # past Python's 4300-digit limit of int()


@pytest.mark.parametrize(("line", "message"), [
    ("Lun = \u00b2", "Lun '²' must be a whole number from 0 to 65535"),
    (f"Lun = {HUGE}", "Lun '9999.* must be a whole number from 0 to 65535"),
    ("QueueDepth = \u0661", "QueueDepth '\u0661' must be a whole number from 1 to 1024"),
    ("TargetAddress = h:\u00b2", "port '²' in address 'h:²' is not a number"),
    (f"TargetAddress = h:{HUGE}", "is not a number from 1 to 65535"),
])
def test_numbers_are_ascii_digits_of_any_length(line: str, message: str) -> None:
    text = f"a {{\n TargetAddress = h\n TargetName = {IQN}\n}}\n".replace(
        " TargetAddress = h\n", f" {line}\n" if line.startswith("TargetAddress") else
        f" TargetAddress = h\n {line}\n")
    error = one_error(text)
    assert error.startswith(f"{PATH}:")
    assert re.search(message, error), error


@pytest.mark.parametrize("line", ["Workers = \u00b2", f"Workers = {HUGE}", "Metrics = \u00b2",
                                  f"Metrics = h:{HUGE}", f"Priority = -{HUGE}",
                                  "Priority = -\u00b2", "Priority = 20", "Priority = -21",
                                  "Priority = --1", "Priority = high"])
def test_daemon_numbers_are_ascii_digits_of_any_length(line: str) -> None:
    assert one_error(line + "\n").startswith(f"{PATH}:1: {line.split(maxsplit=1)[0]} ")


@pytest.mark.parametrize("char", ["\f", "\v", "\x1c", "\x1d", "\x1e", "\x85", "\u2028",
                                  "\u2029"])
def test_only_newline_ends_a_line(char: str) -> None:
    # str.splitlines() ends lines at these too: the comment's tail became a line of its own
    # and every later line number was one too high.
    text = f"# a comment{char}with a tail\na {{\n TargetAddress = h\n TargetName = {IQN}\n"
    assert one_error(text + " Lun = x\n}\n").startswith(f"{PATH}:5: Lun 'x' ")
    assert one_error(text + f" Lun = 0{char}\n}}\n").startswith(f"{PATH}:5: Lun ")


def test_load_reports_the_line_editors_show(tmp_path: Path) -> None:
    path = tmp_path / "iscsi-hba.conf"
    path.write_bytes(b"# \x0c\na {\n TargetAddress = h\n TargetName = " + IQN.encode()
                     + b"\n Lun = x\n}\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == (
        f"{path}:5: Lun 'x' must be a whole number from 0 to 65535 (the LUN as lsscsi and "
        "libiscsi number it)",)


@pytest.mark.parametrize("nickname", ['"two words"', "disk/1", "a:b", "disk\x1b[2J", "ü",
                                      "n" * 56, "%41"])
def test_a_nickname_must_be_usable_as_a_kernel_name(nickname: str) -> None:
    # It names the backstore (hba-<nickname>[.<n>]) and is the cfgstring: a nickname the
    # kernel refuses failed only at attach, without file and line.
    error = one_error(f"# first\n{nickname} {{\n TargetAddress = h\n TargetName = {IQN}\n}}\n")
    assert error.startswith(f"{PATH}:2: nickname ") and "cannot name a disk" in error
    assert "\x1b" not in error


@pytest.mark.parametrize("nickname", ["n" * 55, "db-1_a.B", "0", "-x"])
def test_nicknames_the_kernel_takes(nickname: str) -> None:
    text = f"{nickname} {{\n TargetAddress = h\n TargetName = {IQN}\n}}\n"
    assert list(parse_config(text, PATH).entries) == [nickname]


def test_the_longest_nickname_names_the_backstore_of_every_path() -> None:
    from hba.config import MAX_NICKNAME
    from hba.kernel import NAME_RE
    from hba.specs import _PATH_SUFFIX, BACKSTORE_PREFIX

    longest = f"{BACKSTORE_PREFIX}{'n' * MAX_NICKNAME}.9999"
    assert NAME_RE.match(longest) and _PATH_SUFFIX.match(longest)
    assert not NAME_RE.match(f"{BACKSTORE_PREFIX}{'n' * (MAX_NICKNAME + 1)}.9999")


_PIECES = st.sampled_from([
    "a", "b", "{", "}", "=", ";", "#", '"', " ", "\n", "\t", "\r", "\x00", "\x0c", "\u2028",
    "\u00b2", "9" * 30, "-1", "0", "TargetAddress", "TargetName", "Lun", "chapSecret",
    "chapIName", "tgtChapName", "tgtChapSecret", "AuthMethod", "None", "CHAP", "Enable",
    "SessionType", "Discovery", "DiscoverPortals", "on", "Workers", "Metrics", "port",
    "MaxBurstLength", "FirstBurstLength", "HeaderDigest", "CRC32C,None", IQN, "[::1]:3260",
    "h:0", "h,h", "[", "]", ":", ",", "\x1b[2J",
])


@settings(max_examples=400, deadline=None)
@given(st.lists(_PIECES, max_size=40).map("".join))
def test_any_text_loads_or_gives_every_problem_with_its_line(text: str) -> None:
    last = text.count("\n") + 1
    try:
        config = parse_config(text, PATH)
    except ConfigError as exc:
        assert exc.errors
        for error in exc.errors:
            assert error.startswith(f"{PATH}:"), error
            line = int(error.split(":")[1])
            assert 1 <= line <= last, (error, text)
        return
    assert all(1 <= entry.line <= last for entry in config.entries.values())
