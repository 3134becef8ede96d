"""Latency pictures (hba.plot) and the latency of a ``hbactl perf`` run (hba.oneshot)."""

from __future__ import annotations

import asyncio
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from hba import cli, oneshot, plot
from hba.errors import HBAError
from hba.oneshot import histogram_from, latency_summary
from initiator.errors import ConfigurationError
from initiator.keys import NegotiationSettings
from initiator.stats import Histogram
from tests.support.fake_target import FakeTarget, FakeTargetServer, RamDisk, TargetNode


def test_perf_latency_summary_round_trips() -> None:
    h = Histogram(plot.fine_buckets())
    for value, n in ((0.0004, 900), (0.002, 99), (0.5, 1), (1000.0, 1)):
        h.observe(value, n)
    summary = latency_summary(h)
    back = histogram_from(json.loads(json.dumps(summary)))
    assert back.counts == h.counts and back.count == h.count
    assert back.sum == pytest.approx(h.sum)
    assert summary["p50_ms"] == pytest.approx(0.4, rel=0.13)
    assert 0.4 < summary["p99_ms"] <= 2.0 * 1.13


def test_latency_picture(tmp_path: Path) -> None:
    ours, theirs = Histogram(plot.fine_buckets()), Histogram(plot.fine_buckets())
    for i in range(1000):
        ours.observe(0.0003 + i * 1e-7)
        theirs.observe(0.0006 + i * 3e-7)
    path = tmp_path / "latency.svg"
    series = [plot.Series("iscsi-hba", ours), plot.Series("open-iscsi", theirs),
              plot.Series("libiscsi", mean=0.0005, note="from IOPS")]
    plot.latency_svg(str(path), series, "a title", "a subtitle")
    text = path.read_text()
    root = ET.fromstring(text)
    assert root.tag.endswith("svg")
    assert "a title" in text and "iscsi-hba: mean" in text and "libiscsi: mean 0.5 ms" in text
    again = tmp_path / "again.svg"
    plot.latency_svg(str(again), series, "a title", "a subtitle")
    assert again.read_text() == text  # no date, stable ids: the same data, the same file
    with pytest.raises(HBAError, match="nothing to draw"):
        plot.latency_svg(str(tmp_path / "empty.svg"), [plot.Series("x", Histogram())], "t")
    with pytest.raises(HBAError, match="cannot write"):
        plot.latency_svg(str(tmp_path / "no" / "dir.svg"), series, "t")


def test_an_unwritable_picture_is_refused_before_the_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for path, words in ((tmp_path / "no" / "x.svg", "no directory"),
                        (tmp_path, "is a directory")):
        with pytest.raises(ConfigurationError, match=f"cannot write .*{words}"):
            oneshot.check_writable(str(path))
    oneshot.check_writable(str(tmp_path / "x.svg"))
    assert not (tmp_path / "x.svg").exists()  # checked, not created
    # Port 1 refuses: had perf run first, the error would be the connection's.
    status = cli.main(["perf", "--histogram", str(tmp_path / "no" / "x.svg"),
                       "iscsi://127.0.0.1:1/iqn.2003-01.org.example:disk1/0"])
    err = capsys.readouterr().err
    assert status != 0 and "cannot write" in err and "connect" not in err, err


@pytest.mark.parametrize("name", ["lat.png", "LAT.PDF", "x.jpeg"])
def test_a_picture_named_for_another_format_is_refused_before_the_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    # `--histogram lat.png` wrote an SVG under that name, after the whole run.
    path = tmp_path / name
    status = cli.main(["perf", "--histogram", str(path),
                       "iscsi://127.0.0.1:1/iqn.2003-01.org.example:disk1/0"])
    err = capsys.readouterr().err
    assert status == 1 and err == (f"hbactl: --histogram {path}: the picture is an SVG; name "
                                   "the file .svg\n"), err
    plot.require(str(tmp_path / "lat.svg"))
    plot.require(str(tmp_path / "lat"))   # no suffix, a FIFO, /dev/stdout: as given


async def test_perf_latency_counts_every_completed_command() -> None:
    # hbactl perf bins each command's latency as it completes: every completed command is in
    # one bucket, and the sum over them gives the mean.
    tgt = "iqn.2003-01.org.example:disk1"
    target = FakeTarget([TargetNode(tgt, {0: RamDisk(blocks=4096)})],
                        settings=NegotiationSettings.rfc_defaults(default_time2wait=0))
    async with FakeTargetServer(target) as server:
        result = await asyncio.wait_for(oneshot.cmd_perf(
            f"iscsi://127.0.0.1:{server.port}/{tgt}/0",
            oneshot.Options(initiator_name="iqn.2024-01.org.example:initiator"),
            oneshot.PerfSettings(queue_depth=4, seconds=0.2), None), 10.0)
    latency = result["latency"]
    assert result["commands"] > 0
    assert sum(n for _, n in latency["buckets"]) == result["commands"]
    assert latency["sum_s"] > 0
    assert latency["mean_ms"] == pytest.approx(latency["sum_s"] / result["commands"] * 1e3,
                                               abs=1e-4)
    assert 0 < latency["p50_ms"] <= latency["p99_ms"]
