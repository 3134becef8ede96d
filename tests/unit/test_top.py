"""``hbactl top``'s arithmetic and output: rates, averages and percentiles from two samples;
a terminal frame cut to the terminal's width, plain text elsewhere, JSON lines; the
``Metrics`` key and ``--metrics`` address."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from hba import top
from hba.cli import build_parser, main
from hba.config import ConfigError, parse_config
from hba.metrics import parse_listen_address
from initiator.errors import ConfigurationError
from initiator.stats import LATENCY_BUCKETS

NB = len(LATENCY_BUCKETS) + 1


def hist(count: int, total: float, at: dict[int, int] | None = None) -> dict[str, Any]:
    counts = [0] * NB
    for index, n in (at or {}).items():
        counts[index] = n
    return {"count": count, "sum": total, "counts": counts}


def sample(time: float, reads: int, read_sum: float, read_at: dict[int, int],
           read_bytes: int, in_flight: int = 4, name: str = "disk1") -> dict[str, Any]:
    return {
        "time": time, "buckets": list(LATENCY_BUCKETS),
        "disks": [{
            "name": name, "device": "/dev/sdb", "state": "attached", "session": "logged in",
            "in_flight": in_flight,
            "operations": {"read": hist(reads, read_sum, read_at), "write": hist(0, 0.0),
                           "other": hist(1, 0.001, {0: 1})},
            "bytes": {"read": read_bytes, "write": 0},
        }],
        "sessions": [{
            "target": "iqn.2003-01.org.example:\x1b[31mred", "portal": "127.0.0.1:3260",
            "state": "logged in", "luns": 1, "reinstatements": 2, "connections_lost": 3,
            "digest_errors": {"header": 1, "data": 0}, "login_failures": {"connection": 4},
            "window": 32, "window_closed": 5, "nop_rtt": hist(1, 0.0002, {3: 1}),
        }],
        "daemon": {"disks": {"attached": 1}, "retries_pending": 0},
    }


B1MS = LATENCY_BUCKETS.index(0.001)
B10MS = LATENCY_BUCKETS.index(0.01)


def test_rates_between_two_samples() -> None:
    old = sample(100.0, 1000, 1.0, {B1MS: 1000}, 1000 * 4096)
    # Two seconds later: 2000 more reads, 1980 at <= 1 ms and 20 at <= 10 ms, 4 s of latency.
    new = sample(102.0, 3000, 5.0, {B1MS: 2980, B10MS: 20}, 3000 * 4096)
    frame = top.rates(old, new)
    (disk,) = frame["disks"]
    assert frame["interval"] == 2.0
    assert disk["read_iops"] == 1000.0 and disk["write_iops"] == 0.0 and disk["iops"] == 1000.0
    assert disk["read_mb_per_s"] == pytest.approx(2000 * 4096 / 1e6 / 2)
    assert disk["avg_latency_ms"] == pytest.approx(2.0)        # 4 s over 2000 commands
    assert disk["avg_queue_depth"] == pytest.approx(2.0)       # 4 s of latency in 2 s
    # The 99th percentile: rank 1980 of 2000, the last of the <= 1 ms bucket.
    assert disk["p99_latency_ms"] == pytest.approx(1.0)
    assert disk["queue_depth"] == 4 and disk["state"] == "logged in"
    (session,) = frame["sessions"]
    assert (session["reinstatements"], session["digest_errors"], session["login_failures"]) \
        == (2, 1, 4)
    assert session["nop_rtt_ms"] is None  # no ping in the interval


def test_a_new_or_restarted_disk_counts_from_zero() -> None:
    old = sample(100.0, 5000, 9.0, {B1MS: 5000}, 5000 * 4096)
    new = sample(101.0, 100, 0.1, {B1MS: 100}, 100 * 4096)  # counters went back: restarted
    (disk,) = top.rates(old, new)["disks"]
    assert disk["read_iops"] == 100.0 and disk["read_mb_per_s"] == pytest.approx(0.4096)
    other = sample(101.0, 10, 0.01, {B1MS: 10}, 40960, name="disk2")
    (disk,) = top.rates(old, other)["disks"]
    assert disk["name"] == "disk2" and disk["read_iops"] == 10.0


def frame() -> dict[str, Any]:
    return top.rates(sample(100.0, 0, 0.0, {}, 0),
                     sample(101.0, 500, 0.25, {B1MS: 500}, 500 * 4096))


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_frames_are_cut_to_the_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("hba.top.shutil.get_terminal_size", lambda fallback: (40, 10))
    out = Terminal()
    with top._Screen(out, as_json=False) as screen:
        screen.show(frame())
    text = out.getvalue()
    assert text.startswith("\x1b[?1049h") and text.endswith("\x1b[?1049l")
    last = text.rsplit("\x1b[H\x1b[2J", 1)[1].removesuffix("\x1b[?1049l")
    lines = last.split("\n")
    assert all(len(line) <= 39 for line in lines), lines
    assert any(line.startswith("DISK") for line in lines)
    assert "\x1b[31m" not in text  # the target's escape sequence is shown escaped


def test_terminal_frames_fit_the_height(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("hba.top.shutil.get_terminal_size", lambda fallback: (200, 5))
    out = Terminal()
    top._Screen(out, as_json=False).show(frame())
    lines = out.getvalue().removeprefix("\x1b[H\x1b[2J").split("\n")
    assert len(lines) == 4 and "more line(s)" in lines[-1]


def test_plain_output_has_no_escape_codes() -> None:
    out = io.StringIO()
    with top._Screen(out, as_json=False) as screen:
        screen.show(frame())
        screen.show(frame())
    text = out.getvalue()
    assert "\x1b" not in text
    blocks = [b for b in text.split("\n\n") if b.strip().startswith("iscsi-hba top")]
    assert len(blocks) == 2
    header, row = [line for line in text.splitlines() if line.startswith(("DISK", "disk1"))][:2]
    assert header.split()[:4] == ["DISK", "DEVICE", "IOPS", "r/s"]
    assert row.split()[:4] == ["disk1", "/dev/sdb", "500", "500"]
    assert "\\x1b[31mred" in text


def test_json_lines() -> None:
    out = io.StringIO()
    with top._Screen(out, as_json=True) as screen:
        screen.show(frame())
    (line,) = out.getvalue().splitlines()
    data = json.loads(line)
    assert data["disks"][0]["iops"] == 500.0


def test_top_parses() -> None:
    args = build_parser().parse_args(["top", "--interval", "0.5", "--count", "3", "--json"])
    assert (args.interval, args.count, args.json_lines) == (0.5, 3, True)
    assert not getattr(args, "json", False)  # the stream is top's own output
    args = build_parser().parse_args(["daemon", "--metrics", "9433"])
    assert args.metrics == "9433"


@pytest.mark.parametrize(("value", "words"), [
    ("70000", "metrics listen address '70000': port 70000 is not between 1 and 65535"),
    ("a b:1", "metrics listen address: 'a b' in address 'a b:1' is not a valid host name"),
])
def test_daemon_refuses_a_bad_metrics_address_when_parsing(
        capsys: pytest.CaptureFixture[str], value: str, words: str) -> None:
    # It was told only after the daemon had connected to DBus.
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["daemon", "--metrics", value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument --metrics: {words}" in err, err


def test_top_without_a_bus_says_what_to_start(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    # The same sentence as list and status: which daemon to start, and how.
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/none")
    assert main(["top", "--count", "1"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach the system DBus" in err and "systemctl start iscsi-hba" in err
    assert err.count("\n") == 1


class _Full(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        raise OSError(28, "No space left on device")


def test_top_into_a_full_disk_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """``hbactl top --count 1 > /dev/full`` ended in a traceback; only a closed pipe was
    caught."""
    class Client:
        def __init__(self) -> None:
            self.time = 0.0

        async def __aenter__(self) -> Client:
            return self

        async def __aexit__(self, *exc: object) -> None:
            pass

        async def sample(self) -> dict[str, Any]:
            self.time += 1.0
            return sample(self.time, 0, 0.0, {}, 0)

    monkeypatch.setattr(top, "_Client", Client)
    full = io.TextIOWrapper(io.BufferedWriter(_Full()), write_through=True)
    monkeypatch.setattr("sys.stdout", full)
    assert main(["top", "--count", "1", "--interval", "0.01", "--json"]) == 1
    err = capsys.readouterr().err
    assert "cannot write standard output: No space left on device" in err, err
    assert err.count("\n") == 1


@pytest.mark.parametrize(("argv", "words"), [
    (["--interval", "nan"], "--interval nan: expected a number of seconds above 0"),
    (["--interval", "0"], "--interval 0: expected a number of seconds above 0"),
    (["--count", "0"], "--count must be at least 1"),
    (["--count", "-1"], "--count must be at least 1"),
])
def test_top_refuses_bad_intervals_and_counts_before_the_bus(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        argv: list[str], words: str) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/none")
    assert main(["top", *argv]) == 2
    assert words in capsys.readouterr().err


@pytest.mark.parametrize(("text", "address"), [
    ("9433", ("127.0.0.1", 9433)),
    ("0.0.0.0:9100", ("0.0.0.0", 9100)),
    ("[::1]:9433", ("::1", 9433)),
    ("localhost", ("localhost", 9433)),
])
def test_listen_addresses(text: str, address: tuple[str, int]) -> None:
    assert parse_listen_address(text) == address


@pytest.mark.parametrize("text", ["0", "70000", "[::1", "host:port", ""])
def test_bad_listen_addresses(text: str) -> None:
    with pytest.raises(ConfigurationError, match=r"metrics listen address|port"):
        parse_listen_address(text)


def test_metrics_key_of_the_configuration() -> None:
    config = parse_config("Metrics = 9433;\nd {\n TargetAddress = 192.0.2.1\n"
                          " TargetName = iqn.2003-01.org.example:x\n}\n", "f")
    assert config.metrics == "9433" and list(config.entries) == ["d"]
    assert parse_config("", "f").metrics is None
    for text, message in (("Metrics = 1\nMetrics = 2\n", "f:2: Metrics is set twice"),
                          ("Metrics = 99999\n", "f:1: Metrics '99999' is not usable"),
                          ("Metrics = 1 2\n", "f:1: unexpected text after a value"),
                          ("Metrics =\n", "f:1: Metrics has no value"),
                          ("Other = 1\n", "outside a block")):
        with pytest.raises(ConfigError) as info:
            parse_config(text, "f")
        assert message in str(info.value), (text, str(info.value))
