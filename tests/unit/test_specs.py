"""hba.specs: what a URL, a configuration nickname or a TCMU cfgstring stands for."""

from __future__ import annotations

import dataclasses

import pytest

from hba import cfgstring
from hba.config import parse_config
from hba.errors import AttachError
from hba.specs import LunSpec, SpecDefaults, SpecResolver, default_name, same_portal
from initiator.login import Portal
from initiator.url import parse_url
from tcmu_handler.scsi import PathPolicy

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
db {{
    TargetAddress = "192.0.2.10, 192.0.2.11:3261"
    TargetName = iqn.2003-01.org.example:db
    Lun = 1
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
    assert spec.paths()[0].cfgstring() == "192.0.2.1%3A3260/iqn.2003-01.org.example%3Adisk1/3"
    assert not spec.multipath and spec.paths()[0].backstore == "hba-disk1-3"


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
    assert spec.paths()[0].cfgstring() == "disk1"


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
    path, by_name = r.from_cfgstring("iscsi/disk1", "hba-disk1"), r.resolve("disk1")
    by_cfgstring = path.disk
    assert path.cfgstring() == "disk1" and path.index == 1 and path.portal == by_name.portal
    assert (by_cfgstring.name, by_cfgstring.portal, by_cfgstring.lun) == \
        (by_name.name, by_name.portal, by_name.lun)
    assert by_cfgstring.session.credentials == by_name.session.credentials
    path = r.from_cfgstring("192.0.2.1%3A3261/iqn.2003-01.org.example%3Adisk1/5", "hba-d5")
    spec = path.disk
    assert (spec.name, spec.lun, spec.nickname) == ("d5", 5, None)
    assert spec.session.credentials is not None
    assert spec.session.credentials.initiator.name == "me"   # the entry of its target


@pytest.mark.parametrize("names", [
    ("ISCSI_HBA_CHAP_NAME", "ISCSI_HBA_CHAP_SECRET"),
    ("LIBISCSI_CHAP_USERNAME", "LIBISCSI_CHAP_PASSWORD"),
])
def test_cfgstring_without_an_entry_takes_the_environment(names: tuple[str, str]) -> None:
    cfg = "192.0.2.5%3A3260/iqn.2003-01.org.example%3Anone/0"
    assert resolver(config=False).from_cfgstring(cfg, "hba-n").disk.session.credentials is None
    env = {names[0]: "envuser", names[1]: SECRET}
    creds = resolver(env, config=False).from_cfgstring(cfg, "hba-n").disk.session.credentials
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


# ------------------------------------------------------------------------------------------
# multipath: a path per portal


def test_a_multipath_url_makes_a_path_per_portal() -> None:
    spec = resolver(config=False).resolve(
        f"iscsi://192.0.2.1,[fd00::1]:3261/{IQN}/0?discover_portals=on")
    assert spec.portals == (Portal("192.0.2.1", 3260), Portal("fd00::1", 3261))
    assert spec.portal == Portal("192.0.2.1", 3260)
    assert spec.multipath and spec.discover and spec.policy is PathPolicy.MULTIPATH
    # A down path fails over after 5 s (not the daemon's 50 s), reconnects within 5 s.
    assert (spec.session.replacement_timeout, spec.session.max_reconnect_interval) == (5.0, 5.0)
    paths = spec.paths()
    assert [(p.index, p.backstore) for p in paths] == [(1, "hba-disk1-0.1"),
                                                       (2, "hba-disk1-0.2")]
    assert [p.cfgstring() for p in paths] == [
        "192.0.2.1%3A3260/iqn.2003-01.org.example%3Adisk1/0",
        "[fd00%3A%3A1]%3A3261/iqn.2003-01.org.example%3Adisk1/0"]
    assert str(paths[1]) == "disk1-0 path 2 ([fd00::1]:3261)"
    single = resolver(config=False).resolve(f"iscsi://192.0.2.1/{IQN}/0")
    assert not single.multipath and single.policy is PathPolicy.SINGLE
    assert (single.session.replacement_timeout,
            single.session.max_reconnect_interval) == (50.0, 5.0)


def test_a_multipath_entry_names_the_portal_in_each_cfgstring() -> None:
    r = resolver()
    spec = r.resolve("db")
    assert spec.multipath and not spec.discover and spec.session.replacement_timeout == 5
    assert [p.cfgstring() for p in spec.paths()] == ["db@192.0.2.10%3A3260",
                                                     "db@192.0.2.11%3A3261"]
    assert [p.backstore for p in spec.paths()] == ["hba-db.1", "hba-db.2"]
    # ... which a restart reads back as the same paths.
    for path in spec.paths():
        back = r.from_cfgstring(path.cfgstring(), path.backstore)
        same = dataclasses.replace(back.disk, session=spec.session)   # (its random ISID)
        assert (back.index, back.portal, same) == (path.index, path.portal, spec)
    # A backstore of an older daemon (one path, plain nickname) is path 1 at the first
    # portal; a path through a portal the entry no longer lists comes after its own.
    assert r.from_cfgstring("db", "hba-db").index == 1
    stray = r.from_cfgstring("db@192.0.2.99%3A3260", "hba-x")
    assert (stray.index, stray.portal) == (3, Portal("192.0.2.99", 3260))


def test_a_url_backstores_path_number_is_its_name_suffix() -> None:
    r = resolver(config=False)
    cfg = "192.0.2.11%3A3260/iqn.2003-01.org.example%3Adisk1/0"
    path = r.from_cfgstring(cfg, "hba-disk1-0.2")
    assert (path.disk.name, path.index, path.disk.multipath) == ("disk1-0", 2, True)
    assert path.disk.session.replacement_timeout == 5
    assert path.backstore == "hba-disk1-0.2"
    plain = r.from_cfgstring(cfg, "hba-disk1-0")
    assert (plain.disk.name, plain.index, plain.disk.multipath) == ("disk1-0", 1, False)
    other = r.from_cfgstring(cfg, "mine.v2")      # targetcli's name: not a path number
    assert (other.disk.name, other.index) == ("mine.v2", 1)


def test_discovered_portals_are_added_once_with_their_tags() -> None:
    spec = resolver().resolve("db")
    more = spec.with_portals((Portal("192.0.2.10", 3260, 1), Portal("192.0.2.12", 3260, 3),
                              Portal("192.0.2.11", 3261, 2), Portal("192.0.2.12", 3260, 3)))
    assert more.portals == (Portal("192.0.2.10", 3260, 1), Portal("192.0.2.11", 3261, 2),
                            Portal("192.0.2.12", 3260, 3))
    assert same_portal(Portal("Host.Example", 3260, 1), Portal("host.example", 3260))
    assert not same_portal(Portal("h", 3260), Portal("h", 3261))


@pytest.mark.parametrize(("ref", "text"), [
    (cfgstring.TargetRef(nickname="db", portal=Portal("192.0.2.11", 3261)),
     "db@192.0.2.11%3A3261"),
    (cfgstring.TargetRef(nickname="db", portal=Portal("fd00::1", 3260)), "db@[fd00%3A%3A1]%3A3260"),
    (cfgstring.TargetRef(nickname="db"), "db"),
])
def test_cfgstring_of_a_path(ref: cfgstring.TargetRef, text: str) -> None:
    assert ref.encode() == text
    assert cfgstring.decode(text) == ref
    assert ":" not in text   # targetcli (rtslib) refuses ':' in a cfgstring


def test_cfgstring_with_a_bad_portal() -> None:
    with pytest.raises(cfgstring.CfgStringError, match="'db@nohost%3Ax'"):
        cfgstring.decode("db@nohost%3Ax")
