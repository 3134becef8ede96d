"""Journal entries in systemd's native protocol, received on a socket of our own that plays
journald; session events with their fields; standard error outside systemd."""

from __future__ import annotations

import array
import fcntl
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hba.journal import JournalHandler, SessionEvents, encode, under_journal


def parse(entry: bytes) -> list[tuple[str, str]]:
    """Decode a native-protocol entry (the inverse of encode, as journald reads it)."""
    fields: list[tuple[str, str]] = []
    pos = 0
    while pos < len(entry):
        end = entry.index(b"\n", pos)
        line = entry[pos:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            fields.append((name.decode(), value.decode()))
            pos = end + 1
        else:
            (length,) = struct.unpack_from("<Q", entry, end + 1)
            start = end + 9
            fields.append((line.decode(), entry[start:start + length].decode()))
            assert entry[start + length:start + length + 1] == b"\n"
            pos = start + length + 1
    return fields


def test_encode() -> None:
    raw = encode([("MESSAGE", "one line"), ("DISK", "a"), ("DISK", "b"),
                  ("DETAIL", "two\nlines")])
    assert raw.startswith(b"MESSAGE=one line\nDISK=a\nDISK=b\nDETAIL\n")
    assert parse(raw) == [("MESSAGE", "one line"), ("DISK", "a"), ("DISK", "b"),
                          ("DETAIL", "two\nlines")]
    for bad in ("lower", "_TRUSTED", "9LIVES", "WITH-DASH", ""):
        with pytest.raises(ValueError, match="journal field name"):
            encode([(bad, "x")])


@pytest.fixture
def journald(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "journal.socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def receive(sock: socket.socket) -> dict[str, list[str]]:
    data, ancdata, _flags, _addr = sock.recvmsg(1 << 20, socket.CMSG_SPACE(4))
    if not data:
        # A large entry: its sealed memfd.
        ((_level, _type, raw),) = ancdata
        fds = array.array("i")
        fds.frombytes(raw[:4])
        try:  # as journald does: sealed, read from the start whatever the sender's offset
            seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
            assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SHRINK, seals
            data = os.pread(fds[0], os.fstat(fds[0]).st_size, 0)
        finally:
            os.close(fds[0])
    fields: dict[str, list[str]] = {}
    for name, value in parse(data):
        fields.setdefault(name, []).append(value)
    return fields


def make_logger(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(f"test-journal-{id(handler)}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    return logger


def test_session_events_reach_the_journal_with_fields(
        journald: tuple[socket.socket, str]) -> None:
    sock, path = journald
    fallback = logging.StreamHandler(stream=open(os.devnull, "w"))  # noqa: SIM115
    handler = JournalHandler("iscsi-hba", fallback, path=path)
    logger = make_logger(handler)
    events = SessionEvents(logger)
    target, portal = "iqn.2003-01.org.example:disk1", "192.0.2.10:3260"
    steps = [("logging in", None), ("logged in", "login"), ("recovering", "drop"),
             ("logged in", "reinstatement"), ("recovering", "drop"), ("failed", "give-up"),
             ("logging out", "logout"), ("closed", "logout")]
    for state, _kind in steps:
        events.state_changed(target, portal, state, disks=["disk1", "disk2"],
                             cause="connection reset by peer")
    events.path_changed(target, "192.0.2.11:3260", "disk1 path 2 (192.0.2.11:3260)", "down",
                        "down (connection reset); its I/O waits", disks=["disk1"],
                        level=logging.WARNING)
    entries = [receive(sock) for _ in range(len(steps) + 1)]
    kinds = [e["ISCSI_EVENT"][0] for e in entries]
    assert kinds == ["state", "login", "drop", "reinstatement", "drop", "give-up", "logout",
                     "logout", "path-change"]
    drop = entries[2]
    assert drop["ISCSI_TARGET"] == [target] and drop["ISCSI_PORTAL"] == [portal]
    assert drop["DISK"] == ["disk1", "disk2"] and drop["PRIORITY"] == ["4"]
    assert drop["MESSAGE"] == [f"session {target} at {portal}: connection lost (connection "
                               "reset by peer); reinstating the session"]
    assert drop["SYSLOG_IDENTIFIER"] == ["iscsi-hba"] and drop["CODE_FUNC"] == ["event"]
    assert entries[5]["PRIORITY"] == ["3"]
    assert entries[8]["ISCSI_PORTAL"] == ["192.0.2.11:3260"] and entries[8]["DISK"] == ["disk1"]
    assert entries[8]["ISCSI_PATH_STATE"] == ["down"] and entries[8]["PRIORITY"] == ["4"]
    assert entries[8]["MESSAGE"] == ["disk1 path 2 (192.0.2.11:3260): down (connection reset); "
                                     "its I/O waits"]
    handler.close()


def test_a_failed_first_login_is_an_event() -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    events = SessionEvents(make_logger(Keep()))
    events.state_changed("iqn.x:y", "h:3260", "logging in")
    events.state_changed("iqn.x:y", "h:3260", "closed", cause="authentication failed")
    assert records[-1].getMessage() == "session iqn.x:y at h:3260: login failed " \
        "(authentication failed)"
    assert records[-1].journal["ISCSI_EVENT"] == "login-failed"  # type: ignore[attr-defined]
    assert "DISK" not in records[-1].journal  # type: ignore[attr-defined]


def test_large_entries_go_as_a_sealed_memfd(journald: tuple[socket.socket, str]) -> None:
    sock, path = journald
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    handler = JournalHandler("iscsi-hba", logging.NullHandler(), path=path)
    logger = make_logger(handler)
    big = "x" * 300_000  # beyond a datagram
    logger.warning("%s", big)
    fields = receive(sock)
    assert fields["MESSAGE"] == [big]
    handler.close()


def test_without_the_journal_records_go_to_the_fallback(tmp_path: Path) -> None:
    kept: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            kept.append(record)

    handler = JournalHandler("iscsi-hba", Keep(), path=str(tmp_path / "none"))
    make_logger(handler).error("lost")
    assert [r.getMessage() for r in kept] == ["lost"]
    handler.close()


def test_daemon_logging_picks_the_journal_under_systemd(
        journald: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch,
        daemon_logging: Callable[..., None]) -> None:
    sock, path = journald
    monkeypatch.setattr("hba.journal.JOURNAL_SOCKET", path)
    assert under_journal({"JOURNAL_STREAM": "8:1"}, path)
    assert not under_journal({}, path)
    assert not under_journal({"JOURNAL_STREAM": "8:1"}, path + ".missing")
    root = logging.getLogger()
    daemon_logging(0, {"JOURNAL_STREAM": "8:1"})
    (handler,) = root.handlers
    assert isinstance(handler, JournalHandler) and handler.path == path
    logging.getLogger("iscsi-hba").info("hello", extra={"journal": {"DISK": "d1"}})
    fields = receive(sock)
    assert fields["MESSAGE"] == ["hello"] and fields["DISK"] == ["d1"]
    handler.close()
    daemon_logging(0, {})
    (handler,) = root.handlers
    assert not isinstance(handler, JournalHandler)
