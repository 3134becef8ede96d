"""``--pcap FILE`` on hbactl commands: tshark dissects every PDU of the session.

Each capture is split into PDUs by the tier's own framer (which also checks every CRC32C
digest) and by tshark; both must find the same PDUs, and tshark must report no malformed
packet and no warning. tgtd listens on a free port, which tshark needs to be told
(``-d tcp.port==PORT,iscsi``, the option hbactl ``-v`` prints); one tgtd on port 3260 of a
random 127/8 address shows that a plain ``tshark -r FILE`` needs no option at all.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.helpers import (
    DATA_IN,
    DATA_OUT,
    LOGIN_REQUEST,
    LOGIN_RESPONSE,
    LOGOUT_REQUEST,
    LOGOUT_RESPONSE,
    R2T,
    SCSI_COMMAND,
    SCSI_RESPONSE,
    TEXT_REQUEST,
    TEXT_RESPONSE,
    Capture,
    assert_ok,
    assert_tshark_dissects_everything,
    hbactl,
)
from tests.support.tgtd import Tgtd, TgtdTarget

MakeTarget = Callable[..., TgtdTarget]
BLOCK = 512
SIZE = 2 << 20  # beyond tgtd's FirstBurstLength (64 KiB): R2Ts
ALL_OPCODES = {LOGIN_REQUEST, LOGIN_RESPONSE, TEXT_REQUEST, TEXT_RESPONSE, SCSI_COMMAND,
               SCSI_RESPONSE, DATA_IN, DATA_OUT, R2T, LOGOUT_REQUEST, LOGOUT_RESPONSE}


def record_session(tmp_path: Path, portal: str, url: str, query: str = "",
                   verbose: bool = False) -> tuple[dict[str, Path], dict[str, bytes]]:
    """discover, write 2 MiB, read it back, each with --pcap; returns the files and stderr."""
    data = os.urandom(SIZE)
    source = tmp_path / "in.bin"
    source.write_bytes(data)
    files = {name: tmp_path / f"{name}.pcap" for name in ("discover", "write", "read")}
    v = ["-v"] if verbose else []
    # tgtd never uses digests on discovery sessions (its per-target settings do not apply
    # there): ask for them where it can say no.
    discovery_query = query.replace("crc32c", "crc32c-none")
    runs = {
        "discover": hbactl(*v, "discover", f"iscsi://{portal}{discovery_query}", "--pcap",
                           files["discover"]),
        "write": hbactl(*v, "write", url + query, "--lba", "0", "-i", source, "--pcap",
                        files["write"]),
        "read": hbactl(*v, "read", url + query, "--lba", "0", "--blocks", str(SIZE // BLOCK),
                       "-o", "-", "--pcap", files["read"]),
    }
    for proc in runs.values():
        assert_ok(proc)
    assert runs["read"].stdout == data
    return files, {name: proc.stderr for name, proc in runs.items()}


def check_all(files: dict[str, Path], port: int, options: list[str],
              digests: bool) -> dict[str, Capture]:
    captures = {name: assert_tshark_dissects_everything(path, port, options)
                for name, path in files.items()}
    seen = set().union(*(c.opcodes() for c in captures.values()))
    assert seen >= ALL_OPCODES, f"missing: {sorted(hex(o) for o in ALL_OPCODES - seen)}"
    for name, capture in captures.items():
        if name == "discover":
            continue
        after_login = [p for p in capture.pdus
                       if p.opcode not in (LOGIN_REQUEST, LOGIN_RESPONSE)]
        assert after_login
        assert all(p.header_digest is digests for p in after_login)
        assert all(p.data_digest is digests for p in after_login)
    return captures


@pytest.mark.parametrize("digests", [False, True], ids=["no-digests", "crc32c"])
def test_pcap_of_every_command_dissects(make_target: MakeTarget, tgtd: Tgtd, tmp_path: Path,
                                        digests: bool) -> None:
    target = make_target(16 << 20, params={"HeaderDigest": "CRC32C,None",
                                           "DataDigest": "CRC32C,None"})
    query = "?header_digest=crc32c&data_digest=crc32c" if digests else ""
    files, stderr = record_session(tmp_path, target.portal, target.url(), query, verbose=True)
    option = f"tcp.port=={tgtd.port},iscsi"
    for name, path in files.items():
        # -v tells how to dissect the capture of a port that is not 3260.
        assert f"tshark -r {path} -d {option}".encode() in stderr[name], stderr[name]
    captures = check_all(files, tgtd.port, ["-d", option], digests)
    assert captures["write"].of(R2T), "the write needed no R2T"


def test_plain_tshark_on_port_3260(tgtd_requirements: None, tmp_path: Path) -> None:
    # Loopback owns all of 127/8: a random address of it has port 3260 free.
    host = f"127.{random.randrange(1, 255)}.{random.randrange(256)}.{random.randrange(1, 255)}"
    with Tgtd.start(tmp_path / "tgtd", host=host, port=3260) as tgtd:
        target = tgtd.add_target(16 << 20)
        assert target.port == 3260
        files, stderr = record_session(tmp_path, target.portal, target.url(), verbose=True)
        assert all(b"tshark -r" not in err for err in stderr.values())  # nothing to explain
        check_all(files, 3260, [], digests=False)
