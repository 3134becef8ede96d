"""initiator.pcap: synthesised TCP/IP around recorded iSCSI bytes, checked with scapy and tshark.

The iSCSI PDUs are laid out here by hand from RFC 7143 §11 with ``struct``, independently of the
initiator's own PDU codec, so tshark judges the recorder and not our codec.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import crc32c
import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.utils import RawPcapReader

from initiator.pcap import PcapRecorder, _checksum

# ---------------------------------------------------------------------------------------------
# iSCSI PDUs, RFC 7143 §11 (48-byte BHS, data segment padded to 4 bytes)
# ---------------------------------------------------------------------------------------------

# opcode byte, flags byte, 2 opcode-specific bytes, TotalAHSLength, DataSegmentLength (24 bit),
# 8 bytes LUN or opcode-specific, Initiator Task Tag, 28 opcode-specific bytes
BHS = struct.Struct(">BBBBB3s8sI28s")
ISID = bytes([0x00, 0x02, 0x3D, 0x00, 0x00, 0x01])  # type 0 (OUI format), as open-iscsi uses
LUN0 = bytes(8)
NO_TTT = 0xFFFF_FFFF


def _pdu(
    opcode: int, flags: int, b2: int, b3: int, field8: bytes, itt: int, rest: bytes, data: bytes
) -> bytes:
    bhs = BHS.pack(opcode, flags, b2, b3, 0, len(data).to_bytes(3, "big"), field8, itt, rest)
    return bhs + data + bytes(-len(data) % 4)


def login_request(text: bytes) -> bytes:
    """§11.12: I=1, opcode 0x03; T=1, CSG=1 (operational), NSG=3 (full feature)."""
    rest = struct.pack(">HHII16x", 1, 0, 1, 0)  # CID, reserved, CmdSN, ExpStatSN
    return _pdu(0x43, 0x80 | (1 << 2) | 3, 0, 0, ISID + bytes(2), 0x10, rest, text)


def login_response(text: bytes) -> bytes:
    """§11.13: opcode 0x23, TSIH assigned, StatSN 0, ExpCmdSN 1, MaxCmdSN 1, status 0/0."""
    rest = struct.pack(">4xIIIBB10x", 0, 1, 1, 0, 0)
    return _pdu(0x23, 0x80 | (1 << 2) | 3, 0, 0, ISID + b"\x00\x07", 0x10, rest, text)


def text_request(text: bytes, itt: int) -> bytes:
    """§11.10: I=1, opcode 0x04, F=1, TTT 0xffffffff."""
    rest = struct.pack(">III16x", NO_TTT, 1, 1)  # TTT, CmdSN, ExpStatSN
    return _pdu(0x44, 0x80, 0, 0, LUN0, itt, rest, text)


def text_response(text: bytes, itt: int) -> bytes:
    """§11.11: opcode 0x24, F=1."""
    rest = struct.pack(">IIII12x", NO_TTT, 1, 2, 2)  # TTT, StatSN, ExpCmdSN, MaxCmdSN
    return _pdu(0x24, 0x80, 0, 0, LUN0, itt, rest, text)


def scsi_command(cdb: bytes, length: int, itt: int, *, read: bool) -> bytes:
    """§11.3: opcode 0x01, F=1, R or W, SIMPLE task attribute."""
    flags = 0x80 | (0x40 if read else 0x20) | 0x01
    rest = struct.pack(">III16s", length, 2, 2, cdb.ljust(16, b"\0"))
    return _pdu(0x01, flags, 0, 0, LUN0, itt, rest, b"")


def data_in(data: bytes, itt: int) -> bytes:
    """§11.7: opcode 0x25, F=1, S=1 (status GOOD in this PDU), DataSN 0, offset 0."""
    rest = struct.pack(">IIIIIII", NO_TTT, 2, 3, 3, 0, 0, 0)
    return _pdu(0x25, 0x81, 0, 0x00, LUN0, itt, rest, data)


def r2t(itt: int, ttt: int, length: int) -> bytes:
    """§11.8: opcode 0x31, R2TSN 0, offset 0, desired length."""
    rest = struct.pack(">IIIIIII", ttt, 3, 3, 3, 0, 0, length)
    return _pdu(0x31, 0x80, 0, 0, LUN0, itt, rest, b"")


def data_out(data: bytes, itt: int, ttt: int) -> bytes:
    """§11.7: opcode 0x05, F=1, DataSN 0, offset 0."""
    rest = struct.pack(">I4xI4xIII", ttt, 3, 0, 0, 0)
    return _pdu(0x05, 0x80, 0, 0, LUN0, itt, rest, data)


def scsi_response(itt: int) -> bytes:
    """§11.4: opcode 0x21, F=1, response 0 (completed), status GOOD."""
    rest = struct.pack(">IIIIIII", 0, 4, 4, 4, 0, 0, 0)
    return _pdu(0x21, 0x80, 0x00, 0x00, bytes(8), itt, rest, b"")


def with_digests(pdu: bytes, header: bool, data: bool) -> bytes:
    """Insert the CRC32C digests RFC 7143 §13.1 puts after the header and the data segment
    (stored least significant byte first, as Linux and libiscsi send them)."""
    bhs, segment = pdu[:48], pdu[48:]
    out = bhs + (struct.pack("<I", crc32c.crc32c(bhs)) if header else b"")
    if segment:
        out += segment + (struct.pack("<I", crc32c.crc32c(segment)) if data else b"")
    return out


READ10 = struct.pack(">BBIBHB", 0x28, 0, 2048, 0, 8, 0)
WRITE10 = struct.pack(">BBIBHB", 0x2A, 0, 4096, 0, 256, 0)
INITIATOR = "iqn.2024-01.org.example:initiator"
TARGET = "iqn.2003-01.org.example:disk1"
EXPECTED_OPCODES = ["0x03", "0x23", "0x04", "0x24", "0x01", "0x25", "0x01", "0x31", "0x05", "0x21"]


def record_session(
    rec: PcapRecorder, *, big: int, digests: tuple[bool, bool] = (False, False)
) -> None:
    """A discovery login, SendTargets, a READ(10) answered by Data-In with status, and a
    WRITE(10) of ``big`` bytes through R2T / Data-Out / SCSI Response."""
    hd, dd = digests

    def d(pdu: bytes) -> bytes:
        return with_digests(pdu, hd, dd)

    rec.sent([login_request(f"InitiatorName={INITIATOR}\0SessionType=Discovery\0".encode())])
    rec.received(login_response(b"TargetPortalGroupTag=1\0"))
    request = d(text_request(b"SendTargets=All\0", itt=1))
    rec.sent([memoryview(request)[:48], memoryview(request)[48:]])  # header and data apart
    answer = f"TargetName={TARGET}\0TargetAddress=192.0.2.2:3260,1\0".encode()
    rec.received(d(text_response(answer, itt=1)))
    rec.sent([d(scsi_command(READ10, 4096, itt=2, read=True))])
    payload = d(data_in(bytes(range(256)) * 16, itt=2))
    rec.received(payload[:100])  # the target's bytes arrive in pieces
    rec.received(memoryview(payload)[100:])
    rec.sent([d(scsi_command(WRITE10, big, itt=3, read=False))])
    rec.received(d(r2t(itt=3, ttt=0x55, length=big)))
    block = bytes(range(251)) * (big // 251 + 1)
    pdu = d(data_out(block[:big], itt=3, ttt=0x55))
    rec.sent([pdu[:48], memoryview(pdu)[48 : 48 + big // 2], memoryview(pdu)[48 + big // 2 :]])
    rec.received(d(scsi_response(itt=3)))


class FakeClock:
    def __init__(self, start: float = 1_700_000_000.25) -> None:
        self.now = start
        self.readings: list[float] = []

    def __call__(self) -> float:
        self.now += 0.001
        self.readings.append(self.now)
        return self.now


def packets(path: Path) -> Iterator[tuple[float, Any]]:
    """(timestamp, scapy IP/IPv6 packet) for each record of a LINKTYPE_RAW pcap."""
    reader = RawPcapReader(str(path))
    try:
        assert reader.linktype == 101
        for raw, meta in reader:
            stamp = meta.sec + meta.usec / 1_000_000
            yield stamp, (IP(raw) if raw[0] >> 4 == 4 else IPv6(raw))
    finally:
        reader.close()


V4 = (("192.0.2.1", 51000), ("192.0.2.2", 3260))
V6 = (("2001:db8::1", 51000), ("2001:db8::2", 3260))


# ---------------------------------------------------------------------------------------------
# TCP/IP synthesis, read back with scapy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ends", [V4, V6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("mss", [None, 1000, 65475])
def test_stream_is_consistent(tmp_path: Path, ends: tuple[Any, Any], mss: int | None) -> None:
    local, remote = ends
    path = tmp_path / "s.pcap"
    sent_bytes: list[bytes] = []
    received_bytes: list[bytes] = []

    class Tap(PcapRecorder):
        def sent(self, chunks: Any) -> None:
            chunks = list(chunks)
            sent_bytes.append(b"".join(bytes(c) for c in chunks))
            super().sent(chunks)

        def received(self, data: Any) -> None:
            received_bytes.append(bytes(data))
            super().received(data)

    rec = Tap(path, local, remote, mss=mss, isn=(0xFFFF_FF00, 7), flush_every=5)
    record_session(rec, big=131072)
    rec.close()

    pkts = [p for _t, p in packets(path)]
    family = IP if ":" not in local[0] else IPv6
    assert all(isinstance(p, family) for p in pkts)
    syn, synack, ack = pkts[0][TCP], pkts[1][TCP], pkts[2][TCP]
    assert (syn.flags, synack.flags, ack.flags) == ("S", "SA", "A")
    assert syn.seq == 0xFFFF_FF00 and synack.seq == 7
    assert synack.ack == 0xFFFF_FF01 and ack.ack == 8
    effective_mss = mss or (1460 if family is IP else 1440)
    assert dict(syn.options)["MSS"] == effective_mss
    assert dict(synack.options)["WScale"] == 7
    assert [p[TCP].flags for p in pkts[-3:]] == ["FA", "FA", "A"]

    # Sequence and acknowledgement numbers continue across segments, wrapping at 2**32.
    next_seq = {True: 0xFFFF_FF01, False: 8}
    streams: dict[bool, bytearray] = {True: bytearray(), False: bytearray()}
    for p in pkts[3:-3]:
        tcp = p[TCP]
        outbound = tcp.sport == local[1]
        payload = bytes(tcp.payload)
        assert tcp.seq == next_seq[outbound]
        assert tcp.ack == next_seq[not outbound], "every segment acknowledges all the peer sent"
        assert len(payload) <= effective_mss
        next_seq[outbound] = (next_seq[outbound] + len(payload)) & 0xFFFF_FFFF
        streams[outbound] += payload
    assert bytes(streams[True]) == b"".join(sent_bytes)
    assert bytes(streams[False]) == b"".join(received_bytes)
    fin_local, fin_remote = pkts[-3][TCP], pkts[-2][TCP]
    assert fin_local.seq == next_seq[True] and fin_remote.seq == next_seq[False]
    assert pkts[-1][TCP].ack == (next_seq[False] + 1) & 0xFFFF_FFFF

    for p in pkts:
        assert len(bytes(p)) <= 65535
        # Checksums: rebuild each packet with scapy computing them afresh; they must match.
        fresh = p.copy()
        del fresh[TCP].chksum
        if family is IP:
            del fresh[IP].chksum
            assert p[IP].flags == "DF"
        assert bytes(fresh) == bytes(p)


def test_timestamps_come_from_the_clock(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "t.pcap"
    rec = PcapRecorder(path, *V4, clock=clock)
    rec.sent([b"x" * 3000])
    rec.received(b"y" * 10)
    rec.close()
    stamps = [round(t, 6) for t, _p in packets(path)]
    first, second, third, fourth = (round(r, 6) for r in clock.readings)
    assert stamps == [first] * 3 + [second] * 3 + [third] + [fourth] * 3


def test_pure_acks_keep_a_one_way_stream_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "a.pcap"
    rec = PcapRecorder(path, *V4, mss=1000)
    rec.sent([bytes(20_000)])
    rec.close()
    pkts = [p[TCP] for _t, p in packets(path)][3:-3]
    pure_acks = [t for t in pkts if t.sport == 3260]
    assert len(pure_acks) == 2  # after 8 and 16 segments
    assert all(t.flags == "A" and not bytes(t.payload) for t in pure_acks)
    data = [t for t in pkts if t.sport == 51000]
    assert [t.flags for t in data] == ["A"] * 19 + ["PA"]


def test_ipv6_scope_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "scope.pcap"
    with PcapRecorder(path, ("fe80::1%lo", 51000), ("fe80::2%lo", 3260)) as rec:
        rec.sent([b"x"])
    assert {p[IPv6].src for _t, p in packets(path)} == {"fe80::1", "fe80::2"}


def test_a_new_capture_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    # It holds the disk's data; the umask's 0644 would give it to every user.
    path = tmp_path / "private.pcap"
    old = os.umask(0o022)
    try:
        with PcapRecorder(path, *V4) as rec:
            rec.sent([b"secret"])
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o600
    kept = tmp_path / "kept.pcap"
    kept.write_bytes(b"")
    kept.chmod(0o640)   # a file the user made: its mode is theirs
    with PcapRecorder(kept, *V4) as rec:
        rec.sent([b"x"])
    assert kept.stat().st_mode & 0o777 == 0o640


def test_flush_writes_before_close(tmp_path: Path) -> None:
    path = tmp_path / "f.pcap"
    rec = PcapRecorder(path, *V4, flush_every=1000)
    rec.sent([b"hello"])
    rec.flush()
    assert len(list(packets(path))) == 4
    rec.close()
    rec.close()  # a second close does nothing
    assert len(list(packets(path))) == 7
    with pytest.raises(ValueError, match="closed"):
        rec.sent([b"late"])


def test_empty_calls_record_nothing(tmp_path: Path) -> None:
    path = tmp_path / "e.pcap"
    with PcapRecorder(path, *V4) as rec:
        rec.sent([])
        rec.sent([b"", memoryview(b"")])
        rec.received(b"")
    assert len(list(packets(path))) == 6


def test_append_mode(tmp_path: Path) -> None:
    path = tmp_path / "two.pcap"
    with PcapRecorder(path, *V4) as rec:
        rec.sent([b"one"])
    with PcapRecorder(path, ("192.0.2.1", 51001), ("192.0.2.2", 3260), append=True) as rec:
        rec.sent([b"two"])
    ports = {p[TCP].sport for _t, p in packets(path)}
    assert ports == {51000, 51001, 3260}


def test_callable_from_the_event_loop(tmp_path: Path) -> None:
    path = tmp_path / "loop.pcap"
    rec = PcapRecorder(path, *V4, flush_every=2)

    async def session() -> None:
        for i in range(50):
            rec.sent([struct.pack(">I", i) * 100])
            await asyncio.sleep(0)
            rec.received(b"ok" * 10)

    asyncio.run(session())
    rec.close()
    assert len(list(packets(path))) == 3 + 100 + 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"local": ("192.0.2.1", 1), "remote": ("::1", 3260)}, "different IP versions"),
        ({"local": ("192.0.2.1", 0), "remote": ("192.0.2.2", 3260)}, "local port 0"),
        ({"local": ("192.0.2.1", 1), "remote": ("192.0.2.2", 70000)}, "remote port 70000"),
        ({"local": V4[0], "remote": V4[1], "mss": 65496}, r"mss 65496 is outside 1\.\.65495"),
        ({"local": V6[0], "remote": V6[1], "mss": 65476}, r"outside 1\.\.65475 for IPv6"),
        ({"local": V4[0], "remote": V4[1], "flush_every": 0}, "at least 1"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PcapRecorder(tmp_path / "x.pcap", **kwargs)


def test_bad_path_fails_in_the_caller(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        PcapRecorder(tmp_path / "no" / "such" / "dir.pcap", *V4)


def test_write_error_stops_recording_and_is_raised_by_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = PcapRecorder(tmp_path / "err.pcap", *V4, flush_every=1)

    def broken(*_args: object, **_kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rec._writer, "write_packet", broken)
    for _ in range(10):
        rec.sent([b"data"])  # never raises on the data path
    rec.flush()
    assert isinstance(rec.error, OSError)
    with pytest.raises(OSError, match="No space left"):
        rec.close()


def test_internet_checksum_vectors() -> None:
    # RFC 1071 §3 example: words 0001 f203 f4f5 f6f7 sum to ddf2 (after the end-around carry)
    assert _checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0xFFFF - 0xDDF2
    assert _checksum(bytes.fromhex("0001f203f4f5f6")) == 0xFFFF - (
        (0x0001 + 0xF203 + 0xF4F5 + 0xF600) % 0xFFFF
    )
    assert _checksum(b"\xff\xff") == 0x0000  # sum 0xffff, never "0xffff" for non-zero data
    assert _checksum(b"\x00\x06") == 0xFFF9


def test_tshark_options() -> None:
    rec = PcapRecorder.__new__(PcapRecorder)
    rec.remote = ("192.0.2.2", 3260)
    assert rec.tshark_options() == ()
    assert rec.tshark_options(262144) == ()
    rec.remote = ("192.0.2.2", 860)
    assert rec.tshark_options() == ()
    rec.remote = ("192.0.2.2", 3261)
    assert rec.tshark_options() == ("-d", "tcp.port==3261,iscsi")
    assert rec.tshark_options(1 << 20) == (
        "-d",
        "tcp.port==3261,iscsi",
        "-o",
        "iscsi.bogus_pdu_max_data_len:1048576",
    )


# ---------------------------------------------------------------------------------------------
# tshark: every PDU dissected as iSCSI, nothing malformed, no expert warning or error
# ---------------------------------------------------------------------------------------------



def tshark(path: Path, *args: str) -> list[str]:
    if shutil.which("tshark") is None:
        pytest.fail("tshark is not installed (Debian package tshark): run deploy/setup")
    result = subprocess.run(
        ["tshark", "-n", "-r", str(path), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return [line for line in result.stdout.splitlines() if line.strip()]


def iscsi_opcodes(path: Path, *options: str) -> list[str]:
    rows = tshark(path, *options, "-Y", "iscsi", "-T", "fields", "-e", "iscsi.opcode")
    return [op for row in rows for op in row.split(",")]


def assert_clean(path: Path, *options: str) -> None:
    # severity >= warning (0x00600000); SYN/FIN produce only chat/note level items. Checksum
    # validation is off by default in Wireshark; turned on, a bad one is an expert error.
    checks = ("-o", "tcp.check_checksum:TRUE", "-o", "ip.check_checksum:TRUE")
    bad = tshark(
        path, *options, *checks, "-Y", "_ws.malformed || _ws.expert.severity >= 0x00600000"
    )
    assert bad == []
    status = tshark(path, *checks, "-T", "fields", "-e", "tcp.checksum.status")
    assert set(status) == {"1"}  # 1 = good


def make_capture(
    tmp_path: Path,
    name: str,
    *,
    port: int = 3260,
    v6: bool = False,
    mss: int | None = None,
    big: int = 131072,
    digests: tuple[bool, bool] = (False, False),
) -> tuple[Path, PcapRecorder]:
    path = tmp_path / name
    local, remote = V6 if v6 else V4
    rec = PcapRecorder(path, local, (remote[0], port), mss=mss)
    record_session(rec, big=big, digests=digests)
    rec.close()
    return path, rec


@pytest.mark.parametrize(
    ("big", "mss", "v6"),
    [
        (4096, None, False),  # small: each PDU in one segment, except the 4 KiB Data-In
        (131072, None, False),  # large: a 128 KiB Data-Out over 90 segments of 1460
        (131072, 65495, False),  # large: IPv4 packets of exactly 65535 bytes
        (262144, 65475, True),  # IPv6, largest PDU tshark accepts by default
    ],
    ids=["small", "large", "jumbo-v4", "jumbo-v6"],
)
def test_tshark_dissects_port_3260_as_is(
    tmp_path: Path, big: int, mss: int | None, v6: bool
) -> None:
    path, rec = make_capture(tmp_path, "c.pcap", big=big, mss=mss, v6=v6)
    assert rec.tshark_options() == ()
    assert iscsi_opcodes(path) == EXPECTED_OPCODES
    assert_clean(path)
    sizes = [
        int(s) for s in tshark(path, "-T", "fields", "-e", "ip.len" if not v6 else "frame.len")
    ]
    assert max(sizes) <= 65535
    # The login and SendTargets text reach the dissector intact.
    keys = tshark(path, "-Y", "iscsi", "-T", "fields", "-e", "iscsi.keyvalue")
    assert any(f"InitiatorName={INITIATOR}" in row for row in keys)
    assert any("SendTargets=All" in row for row in keys)
    assert any(f"TargetName={TARGET}" in row for row in keys)
    # The SCSI layer sees the READ(10) and its status.
    info = tshark(path, "-Y", "scsi", "-T", "fields", "-e", "_ws.col.Info")
    assert any("Read(10)" in row for row in info)
    assert any("Write(10)" in row for row in info)


def test_tshark_other_port_needs_decode_as(tmp_path: Path) -> None:
    path, rec = make_capture(tmp_path, "p.pcap", port=3261)
    # Wireshark's iSCSI heuristic only accepts the target_ports range (3260) and port 860,
    # so plain tshark sees TCP only ...
    assert iscsi_opcodes(path) == []
    # ... and the options the recorder gives make it dissect everything.
    options = rec.tshark_options()
    assert options == ("-d", "tcp.port==3261,iscsi")
    assert iscsi_opcodes(path, *options) == EXPECTED_OPCODES
    assert_clean(path, *options)
    # The preference route works too.
    assert iscsi_opcodes(path, "-o", "iscsi.target_ports:3261") == EXPECTED_OPCODES


def test_tshark_port_860_as_is(tmp_path: Path) -> None:
    path, _rec = make_capture(tmp_path, "p860.pcap", port=860, big=8192)
    assert iscsi_opcodes(path) == EXPECTED_OPCODES


@pytest.mark.parametrize(
    "digests", [(True, False), (False, True), (True, True)], ids=["header", "data", "both"]
)
def test_tshark_detects_digests_without_options(tmp_path: Path, digests: tuple[bool, bool]) -> None:
    path, _rec = make_capture(tmp_path, "d.pcap", digests=digests, big=65536)
    assert iscsi_opcodes(path) == EXPECTED_OPCODES
    assert_clean(path)
    fields = tshark(
        path,
        "-Y",
        "iscsi",
        "-T",
        "fields",
        "-e",
        "iscsi.headerdigest32",
        "-e",
        "iscsi.datadigest32",
    )
    header_seen = any(row.split("\t")[0] for row in fields)
    data_seen = any(row.split("\t")[1] for row in fields)
    assert (header_seen, data_seen) == digests


def test_tshark_ignores_pdus_over_256k_without_option(tmp_path: Path) -> None:
    path, rec = make_capture(tmp_path, "huge.pcap", big=524288, mss=65495)
    # the 512 KiB Data-Out exceeds iscsi.bogus_pdu_max_data_len and is skipped
    assert iscsi_opcodes(path) == [op for op in EXPECTED_OPCODES if op != "0x05"]
    options = rec.tshark_options(524288)
    assert iscsi_opcodes(path, *options) == EXPECTED_OPCODES
    assert_clean(path, *options)


def test_a_capture_that_cannot_be_written_names_its_file() -> None:
    # `hbactl readcap --pcap /dev/full URL` said "hbactl: No space left on device".
    with pytest.raises(OSError) as info:
        PcapRecorder("/dev/full", *V4)
    assert info.value.strerror == "cannot write the capture /dev/full: No space left on device"
