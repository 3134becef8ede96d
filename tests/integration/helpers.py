"""Helpers for the integration tier: run ``hbactl``, read a pcap back PDU by PDU, run tshark.

- :func:`hbactl` runs the installed command line (the console script next to this Python) and
  :func:`assert_one_line_error` checks how a failure reads: an exit status, one ``hbactl:``
  line, no traceback, no secret.
- :func:`wire_pdus` reassembles both directions of a capture written by ``--pcap`` (or
  ``Session(pcap_path=...)``) and splits them into iSCSI PDUs with a framer of its own, written
  from RFC 7143 §11 and independent of :mod:`initiator.pdu`; it checks every header and data
  digest with the ``crc32c`` package. Tests count opcodes, R2Ts and outstanding commands on it.
- :func:`tshark_summary` runs tshark on a capture and returns the opcodes it dissected plus any
  malformed-packet or warning/error expert item; comparing its opcodes with :func:`wire_pdus`
  shows that tshark found every PDU (a PDU it misframed would be missing or malformed).
- :func:`logged_in` and :func:`run_window` drive the library: a session to a test target, and
  many commands kept in flight from completion callbacks (no asyncio Task per command), with
  ``Session.in_flight`` sampled in every callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import crc32c

from initiator import scsi
from initiator.chap import ChapAccount, ChapAlgorithm, ChapCredentials, Secret
from initiator.command import CommandResult, ScsiStatus
from initiator.errors import ISCSIError
from initiator.login import Portal
from initiator.transport import Session, SessionConfig
from tests.support.targets import Chap, TargetInfo

HBACTL = Path(sys.executable).with_name("hbactl")
SETUP_HINT = "run deploy/setup as root (it installs tgt, libiscsi-bin and tshark)"


# -- hbactl ------------------------------------------------------------------------------------

def hbactl(
    *args: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``hbactl ARGS``; stdout and stderr are captured as bytes (``read -o -`` is binary).

    The environment is ours minus any CHAP secret variables, plus ``env``; ``HBACTL_TRACEBACK``
    is removed so failures print as a user would see them.
    """
    base = {k: v for k, v in os.environ.items()
            if "CHAP" not in k and k != "HBACTL_TRACEBACK"}
    return subprocess.run(
        [str(HBACTL), *(os.fspath(a) for a in args)], input=stdin, capture_output=True,
        env={**base, **(env or {})}, timeout=timeout, check=False,
    )


def text(proc: subprocess.CompletedProcess[bytes]) -> tuple[str, str]:
    """stdout and stderr as text."""
    return proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")


def assert_ok(proc: subprocess.CompletedProcess[bytes]) -> str:
    """hbactl succeeded; return its stdout as text."""
    out, err = text(proc)
    assert proc.returncode == 0, f"hbactl exited {proc.returncode}: {err.strip()}"
    return out


def assert_one_line_error(
    proc: subprocess.CompletedProcess[bytes],
    status: int,
    *,
    mentions: Iterable[str] = (),
    secrets: Iterable[str | None] = (),
) -> str:
    """hbactl failed with ``status`` and said so in one ``hbactl: ...`` line on stderr, with
    no traceback, naming each of ``mentions`` (case-insensitive) and showing none of
    ``secrets`` anywhere; return that line."""
    out, err = text(proc)
    assert proc.returncode == status, f"exit {proc.returncode}, expected {status}: {err!r}"
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    line = lines[0]
    assert line.startswith("hbactl: "), line
    assert len(line) > 30, f"not a sentence a person can act on: {line!r}"
    for word in mentions:
        assert word.lower() in line.lower(), f"{word!r} not in {line!r}"
    assert_no_secrets(proc, secrets)
    return line


def assert_no_secrets(proc: subprocess.CompletedProcess[bytes],
                      secrets: Iterable[str | None]) -> None:
    for secret in secrets:
        if secret:
            assert secret.encode() not in proc.stdout + proc.stderr, "a secret was printed"


# -- reading a capture back --------------------------------------------------------------------

_PCAP_MAGIC = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">",
               b"\x4d\x3c\xb2\xa1": "<", b"\xa1\xb2\x3c\x4d": ">"}  # usec and nsec variants
_LINKTYPE_RAW = 101
_OPCODE_NAMES = {
    0x00: "NOP-Out", 0x01: "SCSI Command", 0x02: "Task Management Request",
    0x03: "Login Request", 0x04: "Text Request", 0x05: "Data-Out", 0x06: "Logout Request",
    0x10: "SNACK", 0x20: "NOP-In", 0x21: "SCSI Response", 0x22: "Task Management Response",
    0x23: "Login Response", 0x24: "Text Response", 0x25: "Data-In", 0x26: "Logout Response",
    0x31: "R2T", 0x32: "Async Message", 0x3F: "Reject",
}
LOGIN_REQUEST, LOGIN_RESPONSE = 0x03, 0x23
TEXT_REQUEST, TEXT_RESPONSE = 0x04, 0x24
SCSI_COMMAND, SCSI_RESPONSE = 0x01, 0x21
DATA_OUT, DATA_IN, R2T = 0x05, 0x25, 0x31
LOGOUT_REQUEST, LOGOUT_RESPONSE = 0x06, 0x26


@dataclass(frozen=True)
class WirePdu:
    """One PDU as it crossed the wire (RFC 7143 §11.2 basic header segment plus its data)."""

    index: int                 # order of completion in the capture, both directions
    from_initiator: bool
    header: bytes              # the 48-byte BHS
    data: bytes
    header_digest: bool        # a header digest followed the header
    data_digest: bool          # a data digest followed the data

    @property
    def opcode(self) -> int:
        return self.header[0] & 0x3F

    @property
    def name(self) -> str:
        return _OPCODE_NAMES.get(self.opcode, f"opcode 0x{self.opcode:02x}")

    @property
    def flags(self) -> int:
        return self.header[1]

    @property
    def itt(self) -> int:
        return int.from_bytes(self.header[16:20], "big")

    def u32(self, offset: int) -> int:
        return int.from_bytes(self.header[offset : offset + 4], "big")

    @property
    def keys(self) -> dict[str, str]:
        """The key=value pairs of a Login/Text PDU's data segment."""
        pairs = (item.partition("=") for item in self.data.decode(errors="replace").split("\0"))
        return {k: v for k, _, v in pairs if k}


@dataclass
class Capture:
    """Every PDU of a capture, and what did not check out."""

    pdus: list[WirePdu] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    target_port: int = 0

    def opcodes(self) -> Counter[int]:
        return Counter(p.opcode for p in self.pdus)

    def of(self, opcode: int) -> list[WirePdu]:
        return [p for p in self.pdus if p.opcode == opcode]


def _tcp_payloads(path: Path) -> list[tuple[tuple[str, int], tuple[str, int], bytes]]:
    """(source, destination, TCP payload) of every packet of a LINKTYPE_RAW pcap."""
    raw = path.read_bytes()
    endian = _PCAP_MAGIC.get(raw[:4])
    if endian is None:
        raise AssertionError(f"{path} is not a pcap file")
    linktype = struct.unpack_from(endian + "I", raw, 20)[0]
    assert linktype == _LINKTYPE_RAW, f"{path}: link type {linktype}, expected raw IP (101)"
    out = []
    offset = 24
    while offset < len(raw):
        incl = struct.unpack_from(endian + "IIII", raw, offset)[2]
        packet = raw[offset + 16 : offset + 16 + incl]
        offset += 16 + incl
        version = packet[0] >> 4
        if version == 4:
            ihl = (packet[0] & 0x0F) * 4
            src = ".".join(map(str, packet[12:16]))
            dst = ".".join(map(str, packet[16:20]))
            tcp = packet[ihl:]
        else:
            src, dst = packet[8:24].hex(), packet[24:40].hex()
            tcp = packet[40:]
        sport, dport = struct.unpack_from(">HH", tcp)
        payload = tcp[(tcp[12] >> 4) * 4 :]
        out.append(((src, sport), (dst, dport), payload))
    return out


def wire_pdus(path: Path | str, target_port: int) -> Capture:
    """Split both directions of a one-connection capture into PDUs, in capture order.

    Digests are expected from the PDU after the final Login Response on (RFC 7143 §13.1), as
    negotiated in the Login Responses' HeaderDigest/DataDigest keys, and each one is checked.
    """
    capture = Capture(target_port=target_port)
    buffers = {True: bytearray(), False: bytearray()}
    state = {"login_done": False, "hd": False, "dd": False}
    index = 0
    for (_, sport), (_, dport), payload in _tcp_payloads(Path(path)):
        if not payload:
            continue
        if dport == target_port:
            from_initiator = True
        elif sport == target_port:
            from_initiator = False
        else:
            continue
        buf = buffers[from_initiator]
        buf += payload
        while True:
            pdu = _next_pdu(buf, from_initiator, index, state, capture.problems)
            if pdu is None:
                break
            capture.pdus.append(pdu)
            index += 1
            if pdu.opcode == LOGIN_RESPONSE:
                keys = pdu.keys
                if "HeaderDigest" in keys:
                    state["hd"] = keys["HeaderDigest"] == "CRC32C"
                if "DataDigest" in keys:
                    state["dd"] = keys["DataDigest"] == "CRC32C"
                transit, nsg = bool(pdu.flags & 0x80), pdu.flags & 0x03
                if transit and nsg == 3 and pdu.header[36] == 0:
                    state["login_done"] = True
    for direction, rest in buffers.items():
        if rest:
            who = "initiator" if direction else "target"
            capture.problems.append(f"{len(rest)} bytes from the {who} do not form a whole PDU")
    return capture


def _next_pdu(buf: bytearray, from_initiator: bool, index: int, state: dict[str, bool],
              problems: list[str]) -> WirePdu | None:
    if len(buf) < 48:
        return None
    opcode = buf[0] & 0x3F
    digests = state["login_done"] and opcode not in (LOGIN_REQUEST, LOGIN_RESPONSE)
    hd = digests and state["hd"]
    dd = digests and state["dd"]
    ahs = buf[4] * 4
    dsl = int.from_bytes(buf[5:8], "big")
    padded = (dsl + 3) & ~3
    header_end = 48 + ahs
    data_start = header_end + (4 if hd else 0)
    total = data_start + padded + (4 if dd and dsl else 0)
    if len(buf) < total:
        return None
    header = bytes(buf[:48])
    data = bytes(buf[data_start : data_start + dsl])
    name = _OPCODE_NAMES.get(opcode, f"opcode 0x{opcode:02x}")
    if opcode not in _OPCODE_NAMES:
        problems.append(f"PDU {index}: unknown opcode 0x{opcode:02x} (lost framing?)")
    if hd:
        got = int.from_bytes(buf[header_end:data_start], "little")
        if got != crc32c.crc32c(bytes(buf[:header_end])):
            problems.append(f"PDU {index} ({name}): bad header digest")
    if dd and dsl:
        got = int.from_bytes(buf[data_start + padded : total], "little")
        if got != crc32c.crc32c(bytes(buf[data_start : data_start + padded])):
            problems.append(f"PDU {index} ({name}): bad data digest")
    del buf[:total]
    return WirePdu(index, from_initiator, header, data, hd, dd)


def max_outstanding_commands(capture: Capture) -> int:
    """The most SCSI commands sent and not yet answered at any point of the capture (a
    response is a SCSI Response, or a Data-In with the S bit)."""
    outstanding: set[int] = set()
    most = 0
    for pdu in capture.pdus:
        if pdu.opcode == SCSI_COMMAND and pdu.from_initiator:
            outstanding.add(pdu.itt)
            most = max(most, len(outstanding))
        elif pdu.opcode == SCSI_RESPONSE or (pdu.opcode == DATA_IN and pdu.flags & 0x01):
            outstanding.discard(pdu.itt)
    return most


# -- tshark ------------------------------------------------------------------------------------

# Expert info severities (epan/proto.h PI_WARN, PI_ERROR).
_PI_WARN = 0x00600000


@dataclass(frozen=True)
class TsharkSummary:
    opcodes: Counter[int]
    problems: list[str]


def tshark_summary(path: Path | str, options: Sequence[str] = ()) -> TsharkSummary:
    """Dissect a capture with tshark: the iSCSI opcodes it found, and every malformed packet
    or expert item of severity warning or error."""
    proc = subprocess.run(
        ["tshark", "-r", os.fspath(path), *options, "-T", "fields", "-E", "occurrence=a",
         "-E", "aggregator=;", "-e", "frame.number", "-e", "iscsi.opcode",
         "-e", "_ws.malformed", "-e", "_ws.expert.severity", "-e", "_ws.expert.message"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, f"tshark failed ({proc.returncode}): {proc.stderr}"
    opcodes: Counter[int] = Counter()
    problems: list[str] = []
    for line in proc.stdout.splitlines():
        frame, ops, malformed, severities, messages = (line.split("\t") + [""] * 5)[:5]
        opcodes.update(int(op, 0) for op in ops.split(";") if op)
        if malformed:
            problems.append(f"frame {frame}: malformed packet ({messages})")
        for severity, message in zip(severities.split(";"), messages.split(";"), strict=False):
            if severity and int(severity) >= _PI_WARN:
                problems.append(f"frame {frame}: {message}")
    return TsharkSummary(opcodes, problems)


def assert_tshark_dissects_everything(path: Path | str, target_port: int,
                                      options: Sequence[str] = ()) -> Capture:
    """tshark finds exactly the PDUs our own framer finds, with no malformed packet and no
    warning; every digest checks out. Returns the capture."""
    capture = wire_pdus(path, target_port)
    assert capture.pdus, f"{path}: no PDU at all"
    assert not capture.problems, capture.problems
    summary = tshark_summary(path, options)
    assert not summary.problems, summary.problems
    assert summary.opcodes == capture.opcodes(), (
        f"tshark dissected {dict(summary.opcodes)}, the stream holds {dict(capture.opcodes())}")
    return capture


# -- the library -------------------------------------------------------------------------------

INITIATOR_NAME = "iqn.2026-11.org.iscsi-hba:integration-tests"


def portal_of(target: TargetInfo) -> Portal:
    return Portal(target.host, target.port)


def session_config(**overrides: Any) -> SessionConfig:
    """A SessionConfig with this tier's initiator name and a short login timeout."""
    settings: dict[str, Any] = {"initiator_name": INITIATOR_NAME, "login_timeout": 10.0}
    settings.update(overrides)
    return SessionConfig(**settings)


def chap_credentials(chap: Chap, *, secret: str | None = None, target_secret: str | None = None,
                     algorithms: Sequence[ChapAlgorithm] | None = None) -> ChapCredentials:
    """The initiator's side of ``chap``; ``secret``/``target_secret`` replace the real ones."""
    mutual: ChapAccount | None = None
    if chap.mutual_userid is not None and chap.mutual_password is not None:
        mutual = ChapAccount(chap.mutual_userid, Secret(target_secret or chap.mutual_password))
    initiator = ChapAccount(chap.userid, Secret(secret or chap.password))
    if algorithms is None:
        return ChapCredentials(initiator, mutual)
    return ChapCredentials(initiator, mutual, tuple(algorithms))


@contextlib.asynccontextmanager
async def logged_in(target: TargetInfo, *, pcap: Path | None = None,
                    **config: Any) -> AsyncIterator[Session]:
    """A session to ``target`` in Full Feature Phase; logged out (or closed) afterwards."""
    session = Session(portal_of(target), target.iqn, session_config(**config),
                      pcap_path=os.fspath(pcap) if pcap is not None else None)
    await session.login()
    try:
        yield session
    finally:
        await asyncio.wait_for(session.logout(), 30)


@dataclass(frozen=True)
class Job:
    """One SCSI command for :func:`run_window`."""

    cdb: bytes
    data_out: memoryview | None = None
    data_in: memoryview | None = None


@dataclass
class WindowRun:
    results: list[CommandResult | ISCSIError]
    in_flight_seen: list[int]
    """``Session.in_flight`` in each completion callback (the completing command excluded)."""
    unit_attention_retries: int


def is_unit_attention(result: CommandResult) -> bool:
    if result.status != ScsiStatus.CHECK_CONDITION or not result.sense:
        return False
    return scsi.parse_sense(result.sense).sense_key == scsi.SenseKey.UNIT_ATTENTION


async def run_window(session: Session, lun: int, jobs: Sequence[Job], depth: int = 32,
                     timeout: float = 120.0,
                     on_complete: Callable[[int], None] | None = None) -> WindowRun:
    """Run ``jobs`` keeping ``depth`` of them in flight: each completion callback submits the
    next (``Session.submit``, no Task per command). UNIT ATTENTION is retried, as the Linux
    midlayer does after a login or a target restart; any other outcome is returned as is.
    ``on_complete(n)`` runs in the callback of the n-th command to complete."""
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()
    results: list[CommandResult | ISCSIError | None] = [None] * len(jobs)
    seen: list[int] = []
    state = {"next": 0, "done": 0, "retries": 0}

    def issue(i: int) -> None:
        job = jobs[i]
        session.submit(lun, job.cdb,
                       data_out=[job.data_out] if job.data_out is not None else None,
                       data_in=[job.data_in] if job.data_in is not None else None,
                       on_done=lambda result: done(i, result))

    def issue_next() -> None:
        if state["next"] < len(jobs):
            state["next"] += 1
            issue(state["next"] - 1)

    def done(i: int, result: CommandResult | ISCSIError) -> None:
        seen.append(session.in_flight)
        if isinstance(result, CommandResult) and is_unit_attention(result) \
                and state["retries"] < 8 * len(jobs):
            state["retries"] += 1
            issue(i)
            return
        results[i] = result
        state["done"] += 1
        if on_complete is not None:
            on_complete(state["done"])
        issue_next()
        if state["done"] == len(jobs) and not finished.done():
            finished.set_result(None)

    for _ in range(min(depth, len(jobs))):
        issue_next()
    if not jobs:
        finished.set_result(None)
    await asyncio.wait_for(finished, timeout)
    final = [r for r in results if r is not None]
    assert len(final) == len(jobs)
    return WindowRun(final, seen, state["retries"])


def assert_all_good(run: WindowRun) -> None:
    bad = [r for r in run.results if not (isinstance(r, CommandResult) and r.ok)]
    assert not bad, f"{len(bad)} of {len(run.results)} commands failed, first: {bad[0]!r}"
