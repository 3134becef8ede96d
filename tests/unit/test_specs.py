"""hba.specs: what a URL, a configuration nickname or a TCMU cfgstring stands for."""

from __future__ import annotations

import pytest

from hba.config import parse_config
from hba.errors import AttachError
from hba.specs import LunSpec, SpecDefaults, SpecResolver, default_name
from initiator.login import Portal
from initiator.url import parse_url

SECRET = "Zq8-secret-vX3"
TSECRET = "Tg7-target-pW9"
IQN = "iqn.2003-01.org.example:disk1"
INITIATOR = "iqn.2024-01.org.example:unit-host"
PATH = "/etc/iscsi-hba.conf"

CONFIG = f"""
disk1 {{
    TargetAddress = 192.0.2.1:3261
    TargetName = {IQN}
    Lun = 2
    chapIName = me
    chapSecret = "{SECRET}"
    tgtChapName = them
    tgtChapSecret = "{TSECRET}"
    HeaderDigest = CRC32C
    MaxBurstLength = 65536
    ImmediateData = No
    LoginTimeout = 7
    ReplacementTimeout = 30
    QueueDepth = 8
}}
other-portal {{
    TargetAddress = 192.0.2.9
    TargetName = iqn.2003-01.org.example:disk2
    chapIName = elsewhere
    chapSecret = "elsewhere-secret-1"
}}
same-portal {{
    TargetAddress = 192.0.2.2
    TargetName = iqn.2003-01.org.example:disk2
    chapIName = here
    chapSecret = "here-secret-12"
}}
finder {{
    TargetAddress = 192.0.2.1
    SessionType = Discovery
}}
"""


def resolver(environ: dict[str, str] | None = None, config: bool = True) -> SpecResolver:
    r = SpecResolver(SpecDefaults(initiator_name=INITIATOR, login_timeout=3.0,
                                  replacement_timeout=50.0, queue_depth=16),
                     PATH, environ=environ or {})
    if config:
        r.config = parse_config(CONFIG, PATH)
    return r


def test_url_takes_the_defaults_and_its_own_settings() -> None:
    spec = resolver(config=False).resolve(
        f"iscsi://u%{SECRET}@192.0.2.1/{IQN}/3?data_digest=crc32c")
    assert (spec.name, spec.portal, spec.target, spec.lun, spec.nickname) == \
        ("disk1-3", Portal("192.0.2.1", 3260), IQN, 3, None)
    assert spec.queue_depth == 16
    s = spec.session
    assert (s.initiator_name, s.login_timeout, s.replacement_timeout, s.reconnect_forever) == \
        (INITIATOR, 3.0, 50.0, True)
    assert (s.header_digest, s.data_digest) == ("None", "CRC32C")
    assert s.credentials is not None and s.credentials.initiator.name == "u"
    assert spec.cfgstring() == "192.0.2.1%3A3260/iqn.2003-01.org.example%3Adisk1/3"


def test_url_without_chap_takes_the_entry_of_its_target() -> None:
    r = resolver()
    spec = r.resolve(f"iscsi://192.0.2.1:3261/{IQN}/0")
    creds = spec.session.credentials
    assert creds is not None and creds.initiator.name == "me"
    assert creds.target is not None and creds.target.name == "them"
    # The entry at the same portal wins; another portal's entry is the fallback.
    spec = r.resolve("iscsi://192.0.2.2/iqn.2003-01.org.example:disk2/0")
    assert spec.session.credentials is not None
    assert spec.session.credentials.initiator.name == "here"
    spec = r.resolve("iscsi://192.0.2.77/iqn.2003-01.org.example:disk2/0")
    assert spec.session.credentials is not None
    assert spec.session.credentials.initiator.name in ("here", "elsewhere")
    # The URL's own credentials come first.
    spec = r.resolve(f"iscsi://u%{SECRET}@192.0.2.1:3261/{IQN}/0")
    assert spec.session.credentials is not None
    assert spec.session.credentials.initiator.name == "u"
    # The resolver's environment is for cfgstrings: a URL has had its own (parse_url).
    env = {"ISCSI_HBA_CHAP_NAME": "x", "ISCSI_HBA_CHAP_SECRET": SECRET}
    url = parse_url(f"iscsi://192.0.2.1/{IQN}/0", environ={})
    assert resolver(env, config=False).from_url(url).session.credentials is None


def test_nickname_takes_every_setting_of_its_entry() -> None:
    spec = resolver().resolve("disk1")
    assert (spec.name, spec.nickname, spec.portal, spec.lun, spec.queue_depth) == \
        ("disk1", "disk1", Portal("192.0.2.1", 3261), 2, 8)
    s = spec.session
    assert s.header_digest == "CRC32C" and s.login_timeout == 7.0
    assert s.replacement_timeout == 30.0 and s.reconnect_forever
    assert s.negotiation == {"MaxBurstLength": "65536", "ImmediateData": "No"}
    assert s.credentials is not None and s.credentials.mutual
    assert spec.cfgstring() == "disk1"


def test_what_cannot_be_resolved_is_said() -> None:
    r = resolver()
    with pytest.raises(AttachError, match=f"'nothing' is neither an iscsi:// URL nor the "
                                          f"nickname of an entry in {PATH}"):
        r.resolve("nothing")
    with pytest.raises(AttachError, match="finder is a discovery entry; it names no LUN"):
        r.resolve("finder")
    with pytest.raises(AttachError, match="names a target but no LUN"):
        r.resolve(f"iscsi://192.0.2.1/{IQN}")
    with pytest.raises(AttachError, match="names no target and LUN"):
        r.resolve("iscsi://192.0.2.1/")
    with pytest.raises(AttachError, match="backstore hba-x names configuration entry "
                                          f"'gone', which {PATH} does not have"):
        r.from_cfgstring("gone", "hba-x")


def test_cfgstring_nickname_and_portal_forms() -> None:
    r = resolver()
    by_cfgstring, by_name = r.from_cfgstring("iscsi/disk1", "hba-disk1"), r.resolve("disk1")
    assert by_cfgstring.cfgstring() == "disk1"
    assert (by_cfgstring.name, by_cfgstring.portal, by_cfgstring.lun) == \
        (by_name.name, by_name.portal, by_name.lun)
    assert by_cfgstring.session.credentials == by_name.session.credentials
    spec = r.from_cfgstring("192.0.2.1%3A3261/iqn.2003-01.org.example%3Adisk1/5", "hba-d5")
    assert (spec.name, spec.lun, spec.nickname) == ("d5", 5, None)
    assert spec.session.credentials is not None
    assert spec.session.credentials.initiator.name == "me"   # the entry of its target


@pytest.mark.parametrize("names", [
    ("ISCSI_HBA_CHAP_NAME", "ISCSI_HBA_CHAP_SECRET"),
    ("LIBISCSI_CHAP_USERNAME", "LIBISCSI_CHAP_PASSWORD"),
])
def test_cfgstring_without_an_entry_takes_the_environment(names: tuple[str, str]) -> None:
    cfg = "192.0.2.5%3A3260/iqn.2003-01.org.example%3Anone/0"
    assert resolver(config=False).from_cfgstring(cfg, "hba-n").session.credentials is None
    env = {names[0]: "envuser", names[1]: SECRET}
    creds = resolver(env, config=False).from_cfgstring(cfg, "hba-n").session.credentials
    assert creds is not None and creds.initiator.name == "envuser" and not creds.mutual
    with pytest.raises(AttachError, match="the environment gives a CHAP user name but no "
                                          "secret") as info:
        resolver({names[0]: "envuser"}, config=False).from_cfgstring(cfg, "hba-n")
    assert SECRET not in str(info.value)


def test_default_names() -> None:
    assert default_name(IQN, 0) == "disk1-0"
    assert default_name("iqn.2003-01.org.example", 4) == "iqn.2003-01.org.example-4"
    assert default_name("iqn.2003-01.org.example:a b/c", 1) == "a-b-c-1"
    assert default_name("iqn.2003-01.org.example:...", 1) == "lun-1"
    assert isinstance(resolver().resolve("disk1"), LunSpec)
