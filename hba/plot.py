"""Latency pictures: the distribution of command latencies as an SVG, one run or several side
by side (``hbactl perf --histogram``, the benchmarks' ``--histogram``).

Theory of operation
-------------------
A run's latencies are a histogram (:class:`initiator.stats.Histogram`; ``hbactl perf`` uses the
fine buckets of :func:`fine_buckets`, 20 per decade). The picture has two panels on one
logarithmic latency axis: above, the share of commands in each bucket (the shape: a narrow
peak, a long tail, two modes); below, the percentile curve — the share of commands that
completed within each latency — with the median and the 99th and 99.9th percentiles marked
and named in the legend. Several runs (ours and an anchor's) are drawn over each other in
different colours; an anchor that reports only a mean (libiscsi's ``iscsi-perf``: IOPS at a
queue depth, so the mean latency by Little's law) is a dashed vertical line.

matplotlib draws it, with its Agg machinery and SVG output, no display needed; it is an
optional dependency (``pip install 'iscsi-hba[plot]'``), imported only when a picture is asked
for, and :func:`require` says how to install it before a long run starts. The SVG carries no
date and stable ids, so the same data gives the same file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from hba.errors import HBAError
from initiator.output import open_for_writing
from initiator.stats import Histogram, quantile

__all__ = ["Series", "fine_buckets", "latency_svg", "require"]

INSTALL_HINT = "pip install 'iscsi-hba[plot]' (matplotlib) into the environment of hbactl"


def fine_buckets(low: float = 1e-6, high: float = 100.0, per_decade: int = 20
                 ) -> tuple[float, ...]:
    """Bucket bounds from ``low`` to ``high`` seconds, ``per_decade`` per factor of ten."""
    start, stop = round(math.log10(low) * per_decade), round(math.log10(high) * per_decade)
    return tuple(10.0 ** (i / per_decade) for i in range(start, stop + 1))


@dataclass(frozen=True)
class Series:
    """One run to draw: a histogram of latencies (seconds), or only a mean for an anchor
    that reports nothing else."""

    label: str
    histogram: Histogram | None = None
    mean: float | None = None
    note: str = ""
    percentiles: dict[float, float] = field(default_factory=dict)

    def summary(self) -> str:
        """``label: mean 0.61 ms, p50 0.55, p99 1.9, p99.9 4.2 ms``."""
        h = self.histogram
        if h is None or not h.count:
            return f"{self.label}: mean {_ms(self.mean)}" + (f" ({self.note})" if self.note
                                                               else "")
        parts = [f"mean {_ms(h.sum / h.count)}"]
        for q, name in ((0.5, "p50"), (0.99, "p99"), (0.999, "p99.9")):
            parts.append(f"{name} {_ms(quantile(q, h.bounds, h.counts))}")
        return f"{self.label}: " + ", ".join(parts)


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3g} ms" if ms < 100 else f"{ms:.0f} ms"


def _tick(seconds: float, _position: object = None) -> str:
    if seconds >= 1:
        return f"{seconds:g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:g} ms"
    return f"{seconds * 1e6:g} \u00b5s"


# What a file name promises that the SVG written into it is not.
_OTHER_FORMATS = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".pdf")


def require(path: str | None = None) -> None:
    """Raise :class:`HBAError` saying how to install matplotlib when it is missing, or that
    ``path`` names another picture format (``--histogram lat.png`` got an SVG under that
    name, which image viewers refuse); before a long run, not after it."""
    if path is not None and path.lower().endswith(_OTHER_FORMATS):
        raise HBAError(f"--histogram {path}: the picture is an SVG; name the file .svg")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise HBAError(f"drawing a latency picture needs matplotlib: {INSTALL_HINT}") from None


def latency_svg(path: str, series: Sequence[Series], title: str, subtitle: str = "") -> None:
    """Write the picture of ``series`` (see the module docstring) to ``path`` as SVG."""
    require()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    matplotlib.rcParams.update({"svg.hashsalt": "iscsi-hba", "svg.fonttype": "none",
                                "font.size": 9})
    drawn = [s for s in series if s.histogram is not None and s.histogram.count]
    if not drawn and not any(s.mean for s in series):
        raise HBAError("no latency was recorded: nothing to draw")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True,
                                      gridspec_kw={"height_ratios": [1, 1.2]})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lows: list[float] = []
    highs: list[float] = []
    for index, s in enumerate(series):
        colour = colours[index % len(colours)]
        h = s.histogram
        if h is None or not h.count:
            if s.mean:
                for axis in (top, bottom):
                    axis.axvline(s.mean, color=colour, linestyle="--", linewidth=1.5,
                                 label=s.summary() if axis is bottom else None)
                lows.append(s.mean)
                highs.append(s.mean)
            continue
        used = [i for i, n in enumerate(h.counts) if n]
        first, last = used[0], used[-1]
        # Bucket i spans (bound i-1, bound i]; the first and the overflow bucket get the
        # width of their neighbour.
        edges = [h.bounds[0] / (h.bounds[1] / h.bounds[0]), *h.bounds,
                 h.bounds[-1] * (h.bounds[-1] / h.bounds[-2])]
        xs = edges[first:last + 2]
        shares = [100.0 * n / h.count for n in h.counts[first:last + 1]]
        top.stairs(shares, xs, color=colour, fill=len(drawn) == 1, alpha=0.35 if
                   len(drawn) == 1 else 1.0, linewidth=1.5, label=s.label)
        if len(drawn) == 1:
            top.stairs(shares, xs, color=colour, linewidth=1.5)
        # Share completed at each bucket's upper edge, joined by lines: the interpolation
        # quantile() uses for the marked percentiles.
        cumulative = [0.0]
        total = 0
        for n in h.counts[first:last + 1]:
            total += n
            cumulative.append(100.0 * total / h.count)
        bottom.plot(xs, cumulative, color=colour, linewidth=1.5, label=s.summary())
        for q, marker in ((0.5, "o"), (0.99, "s"), (0.999, "^")):
            value = quantile(q, h.bounds, h.counts)
            if value is not None:
                bottom.plot([value], [100 * q], marker=marker, color=colour, markersize=5)
        lows.append(xs[0])
        highs.append(xs[-1])
    top.set_xscale("log")
    top.xaxis.set_major_formatter(FuncFormatter(_tick))
    top.set_ylabel("commands in the bucket (%)")
    top.grid(True, which="both", alpha=0.25)
    if drawn:
        top.legend(loc="upper right")
    bottom.set_ylabel("completed within (%)")
    bottom.set_xlabel("latency: \u25cf median, \u25a0 99th, \u25b2 99.9th percentile")
    bottom.set_ylim(0, 101)
    bottom.grid(True, which="both", alpha=0.25)
    bottom.legend(loc="upper left", fontsize=8)
    if lows and highs:
        top.set_xlim(min(lows) / 1.5, max(highs) * 1.5)
    fig.suptitle(title + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    fig.tight_layout()
    try:
        # open_for_writing: a FIFO nobody reads fails at once instead of blocking for ever.
        with open(open_for_writing(path), "wb") as out:
            fig.savefig(out, format="svg", metadata={"Date": None})
    except OSError as exc:
        raise HBAError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
