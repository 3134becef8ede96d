"""What ``./run install`` puts on a server, checked without installing it: the example
configuration it copies to /etc/iscsi-hba.conf parses and attaches nothing until edited, and
the unit starts the hbactl the install puts in /opt/iscsi-hba."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

from hba.config import parse_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_example_configuration_parses_and_attaches_nothing() -> None:
    config = parse_config((DEPLOY / "iscsi-hba.conf.example").read_text(), "example")
    assert {"scratch", "db"} <= set(config.entries)
    assert config.enabled() == ()


def test_unit_starts_the_installed_hbactl() -> None:
    unit = configparser.RawConfigParser(strict=False, interpolation=None)
    unit.read_string((DEPLOY / "iscsi-hba.service").read_text())
    argv = shlex.split(unit.get("Service", "ExecStart"))
    assert argv == ["/opt/iscsi-hba/bin/hbactl", "daemon", "--config", "/etc/iscsi-hba.conf"]
    install = (DEPLOY / "install").read_text()
    assert "PREFIX=/opt/iscsi-hba\n" in install and "CONFIG=/etc/iscsi-hba.conf\n" in install
