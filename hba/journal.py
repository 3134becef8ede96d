"""The daemon's log under systemd: journal entries with fields, and its session events.

Theory of operation
-------------------
Under systemd (``$JOURNAL_STREAM`` is set and the journal's socket exists) every log record of
the daemon goes to the journal through its native protocol (systemd's ``sd_journal_sendv``,
spoken here in a few lines rather than through a C binding): one datagram per entry on
``/run/systemd/journal/socket``, each field ``NAME=value\\n``, or ``NAME\\n`` + the value's length
as 64-bit little endian + the value + ``\\n`` when the value holds a newline; an entry too large
for a datagram goes as a sealed memfd passed with ``SCM_RIGHTS``. Besides ``MESSAGE`` and
``PRIORITY`` (syslog levels) an entry carries the fields its record was given (``extra={"journal":
{...}}``), so ``journalctl -u iscsi-hba ISCSI_TARGET=iqn...`` or ``DISK=disk1`` finds what
concerns one target or disk. The socket is non-blocking: when the journal cannot take an entry
at once it goes to standard error instead (which systemd also collects), so a stuck journald
never stalls the loop that serves the disks. Elsewhere, records go to standard error as lines
(:func:`hba.control.configure_daemon_logging`).

:class:`SessionEvents` names what a session's state change means — ``login``, ``drop``
(connection lost, being reinstated), ``reinstatement``, ``give-up`` (the replacement timeout
passed), ``logout``, ``login-failed``, and ``path-change`` (a path of a disk went up, down,
failed over: the daemon's words, :meth:`hba.daemon.Daemon._path_changed`) — and logs one line
for it with the fields ``ISCSI_EVENT``, ``ISCSI_TARGET``, ``ISCSI_PORTAL`` and one ``DISK`` per
disk on the session (``ISCSI_PATH_STATE`` too for a path).
"""

from __future__ import annotations

import array
import fcntl
import logging
import os
import socket
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from initiator.printable import printable

__all__ = ["JOURNAL_SOCKET", "JournalHandler", "SessionEvents", "encode", "under_journal"]

JOURNAL_SOCKET = "/run/systemd/journal/socket"
PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
              logging.CRITICAL: 2}
_LENGTH = struct.Struct("<Q")

Fields = Mapping[str, "str | Sequence[str]"]


def under_journal(environ: Mapping[str, str] | None = None, path: str | None = None) -> bool:
    """Whether systemd runs us with standard error going to the journal."""
    env = os.environ if environ is None else environ
    return bool(env.get("JOURNAL_STREAM")) and os.path.exists(path or JOURNAL_SOCKET)


def _valid_name(name: str) -> bool:
    # journald: uppercase ASCII letters, digits and '_', not starting with '_' (trusted
    # fields) or a digit, at most 64 characters.
    return (0 < len(name) <= 64 and not name[0].isdigit() and name[0] != "_"
            and all(c.isascii() and (c.isupper() or c.isdigit() or c == "_") for c in name))


def encode(fields: Iterable[tuple[str, str]]) -> bytes:
    """One journal entry in the native protocol (see the module docstring)."""
    out = bytearray()
    for name, value in fields:
        if not _valid_name(name):
            raise ValueError(f"{name!r} is not a journal field name")
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += name.encode() + b"\n" + _LENGTH.pack(len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    """A logging handler that writes journal entries (see the module docstring); records it
    cannot deliver go to ``fallback``."""

    def __init__(self, identifier: str, fallback: logging.Handler, *,
                 path: str | None = None) -> None:
        super().__init__()
        self.identifier = identifier
        self.fallback = fallback
        self.path = path or JOURNAL_SOCKET
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)

    def close(self) -> None:
        self._sock.close()
        super().close()

    def fields(self, record: logging.LogRecord) -> list[tuple[str, str]]:
        out = [("MESSAGE", self.format(record)),
               ("PRIORITY", str(PRIORITIES.get(record.levelno, 6))),
               ("SYSLOG_IDENTIFIER", self.identifier),
               ("CODE_FILE", record.pathname), ("CODE_LINE", str(record.lineno)),
               ("CODE_FUNC", record.funcName), ("LOGGER", record.name)]
        extra: Fields = getattr(record, "journal", None) or {}
        for name, value in extra.items():
            values = [value] if isinstance(value, str) else list(value)
            out += [(name, v) for v in values]
        return out

    def emit(self, record: logging.LogRecord) -> None:
        try:
            entry = encode(self.fields(record))
            self._send(entry)
        except (OSError, ValueError):
            self.fallback.handle(record)

    def _send(self, entry: bytes) -> None:
        try:
            self._sock.sendto(entry, self.path)
        except OSError as exc:
            if exc.errno != getattr(os, "EMSGSIZE", 90):
                raise
            # Too large for one datagram: the entry in a sealed memfd (journald refuses an
            # unsealed one), its descriptor passed with the message.
            fd = os.memfd_create("journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            try:
                os.write(fd, entry)
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                            | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
                self._sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                         array.array("i", [fd]))], 0, self.path)
            finally:
                os.close(fd)


class SessionEvents:
    """Session state changes as journal events (see the module docstring)."""

    def __init__(self, logger: logging.Logger) -> None:
        self.log = logger
        self._last: dict[tuple[str, str], str] = {}   # the state each session was in
        self._seen: set[tuple[str, str]] = set()      # sessions that were logged in once

    def state_changed(self, target: str, portal: str, state: str, *,
                      disks: Sequence[str] = (), cause: str = "") -> None:
        """A session to ``target`` at ``portal`` went to ``state`` (a
        :class:`~initiator.transport.SessionState` value); ``cause``: why its last connection
        or login failed."""
        key = (target, portal)
        before = self._last.get(key)
        self._last[key] = state
        why = f" ({cause})" if cause else ""
        if state == "logged in":
            if before == "recovering" and key in self._seen:
                self.event("reinstatement", target, portal, disks, "reinstated")
            else:
                self.event("login", target, portal, disks, "logged in")
            self._seen.add(key)
        elif state == "recovering" and before == "logged in":
            self.event("drop", target, portal, disks,
                       f"connection lost{why}; reinstating the session", logging.WARNING)
        elif state == "failed":
            self.event("give-up", target, portal, disks,
                       f"could not be re-established within the replacement timeout{why}; "
                       "its commands fail", logging.ERROR)
        elif state == "closed" and before == "logging in":
            self.event("login-failed", target, portal, disks, f"login failed{why}",
                       logging.WARNING)
        elif state == "closed":
            self._last.pop(key, None)
            self._seen.discard(key)
            self.event("logout", target, portal, disks, "closed")
        elif state == "logging out":
            self.event("logout", target, portal, disks, "logging out")
        else:
            self.log.info("session %s at %s: %s", target, portal, state,
                          extra={"journal": self._fields("state", target, portal, disks)})

    def path_changed(self, target: str, portal: str, label: str, state: str, what: str, *,
                     disks: Sequence[str] = (), level: int = logging.INFO) -> None:
        """The path ``label`` of ``disks`` (to ``target`` through ``portal``) is now in
        ``state`` (a :class:`~hba.disks.PathState` value); ``what``: the line for a person."""
        fields = self._fields("path-change", target, portal, disks)
        fields["ISCSI_PATH_STATE"] = state
        self.log.log(level, "%s: %s", printable(label), printable(what),
                     extra={"journal": fields})

    def event(self, kind: str, target: str, portal: str, disks: Sequence[str], what: str,
              level: int = logging.INFO) -> None:
        # The cause may quote a target's words (a reject reason, a redirect): escaped.
        self.log.log(level, "session %s at %s: %s", printable(target), printable(portal),
                     printable(what),
                     extra={"journal": self._fields(kind, target, portal, disks)})

    @staticmethod
    def _fields(kind: str, target: str, portal: str, disks: Sequence[str]) -> dict[str, Any]:
        fields: dict[str, str | list[str]] = {"ISCSI_EVENT": kind, "ISCSI_TARGET": target,
                                              "ISCSI_PORTAL": portal}
        if disks:
            fields["DISK"] = list(disks)
        return fields

