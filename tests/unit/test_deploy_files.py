"""What ``./run install`` puts on a server, checked without installing it: the example
configuration it copies to /etc/iscsi-hba.conf parses and attaches nothing until edited, and
the unit starts the hbactl the install puts in /opt/iscsi-hba. And ``./run`` itself answers a
wrong command with its name and the list of commands."""

from __future__ import annotations

import configparser
import shlex
import subprocess
from pathlib import Path

import pytest

from hba.config import parse_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


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


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO / "run"), *argv], capture_output=True, text=True,
                          timeout=30, check=False)


def test_run_names_an_unknown_command_and_lists_the_commands() -> None:
    done = _run("tset")
    assert done.returncode == 2 and done.stdout == ""
    first, *rest = done.stderr.splitlines()
    assert first == "./run: unknown command tset; the commands are:"
    assert any(line.lstrip().startswith("./run test ") for line in rest)


def test_run_help_is_the_usage_and_no_error() -> None:
    done = _run("--help")
    assert done.returncode == 0 and "./run demo" in done.stdout and done.stderr == ""
    assert _run().returncode == 2


@pytest.mark.parametrize("command", ["setup", "bench", "uninstall", "help", "--help"])
def test_run_refuses_arguments_a_command_does_not_take(command: str) -> None:
    # `./run setup extra-args` ran the setup and ignored them.
    done = _run(command, "extra-args", "a b")
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr == f"./run {command} takes no arguments; got: extra-args a\\ b\n"


@pytest.mark.parametrize(("script", "argv", "words"), [
    ("run", ["--help"], "./run demo"),
    ("deploy/install", ["--help"], "deploy/install --uninstall"),
])
def test_scripts_started_with_sh_run_under_bash(script: str, argv: list[str],
                                                words: str) -> None:
    """``sh run demo``, as a newcomer may type it: Debian's sh (dash) stopped at the first
    line, ``set: Illegal option -o pipefail``."""
    done = subprocess.run(["sh", str(REPO / script), *argv], capture_output=True, text=True,
                          timeout=30, check=False, cwd="/")
    assert done.returncode == 0 and words in done.stdout and done.stderr == "", done


def test_install_names_an_unknown_option() -> None:
    done = subprocess.run([str(DEPLOY / "install"), "--wheelhose", "x"], capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("deploy/install: unknown option --wheelhose\n"), done.stderr
