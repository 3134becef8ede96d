"""The numbers a person types on a command line, as argparse types: hbactl's, and those of
``python -m tcmu_handler.serve`` and ``python -m hba.demo`` (here, below both, so that
tcmu_handler needs nothing of hba). Sizes in bytes take a unit as people write them
(``4k``, ``128K``, ``1m``, ``1GiB``: powers of 1024), for ``hbactl perf --block-size`` and
``./run demo --size`` alike; the benchmarks' lists (``--sizes 4k,128k``) and fio's block
sizes and ranges (``--bs 4k``, ``--bsrange 4k-64k``, one per direction: ``4k,8k``) are
those sizes too (:func:`sizes`, :func:`size_ranges`), handed to fio as bytes.

``type=int`` and ``type=float`` take more than a person means: other scripts' digits
(``--lba`` with an Arabic-Indic one, U+0661, read block 1), ``_`` between digits, spaces
around the number. A typo of that kind must be refused with the option's name, not read as
some other number. The range checks stay with the commands (``--lba`` not negative,
``--count`` at least 1, a bound in seconds finite and above 0:
:func:`initiator.url.check_seconds`), which name the option in their own words; these types
only make sure that what reaches them is the number that was written.
"""

from __future__ import annotations

import argparse
import re

from initiator.url import decimal

__all__ = ["digits", "fio_sizes", "seconds", "size", "size_ranges", "sizes", "whole_number"]

# A decimal number as a person writes one, or nan/inf (which check_seconds names).
_SECONDS = re.compile(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?|[-+]?(nan|inf)",
                      re.IGNORECASE)


def whole_number(text: str) -> int:
    """ASCII digits, with an optional ``-`` (the command names a negative number itself); a
    number too long to matter is :data:`initiator.url.TOO_LARGE`."""
    if text[:1] != "-":
        return digits(text)
    number = decimal(text[1:])
    if number is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (digits 0-9)")
    return -number


def digits(text: str) -> int:
    """ASCII digits and nothing else, for a number that has no sign (a LUN): ``-0`` and
    ``+1`` are refused like any other typo."""
    number = decimal(text)
    if number is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (digits 0-9)")
    return number


def seconds(text: str) -> float:
    """A number of seconds in ASCII digits (``2``, ``0.5``, ``1e3``)."""
    if not text.isascii() or _SECONDS.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (e.g. 2, 0.5)")
    return float(text)


_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def size(text: str) -> int:
    """A size in bytes: ASCII digits and an optional unit, ``4096``, ``4k``, ``128K``,
    ``1m``, ``1MiB``, ``2g`` (spaces around it allowed); above 0."""
    raw = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = _UNITS.get(raw[-1:], 1)
    number = decimal(raw[:-1] if mult != 1 else raw)
    if number is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in bytes (e.g. 4096, 4k, 1m)")
    if number == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be above 0")
    return number * mult


def sizes(text: str) -> list[int]:
    """Sizes separated by commas (``4k,128k``), each as :func:`size`; at least one."""
    items = text.split(",")
    if not text.strip() or any(not item.strip() for item in items):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of sizes separated by commas (e.g. 4k,128k)")
    return [size(item) for item in items]


def size_ranges(text: str) -> list[tuple[int, int]]:
    """Ranges of sizes separated by commas, each ``low-high`` (``4k-64k``) or one size
    (``4k``: both ends); fio's ``--bsrange`` (one per direction: read, write, trim)."""
    ranges = []
    for item in text.split(","):
        low, dash, high = item.partition("-")
        pair = (size(low), size(high)) if dash else (size(item),) * 2
        if pair[0] > pair[1]:
            raise argparse.ArgumentTypeError(f"{item.strip()!r}: the low end is above the high")
        ranges.append(pair)
    return ranges


def fio_sizes(values: list[int] | list[tuple[int, int]]) -> str:
    """:func:`sizes` or :func:`size_ranges` as fio takes them, in bytes (``4096,131072``,
    ``4096-65536``)."""
    return ",".join(str(v) if isinstance(v, int) else f"{v[0]}-{v[1]}" for v in values)
