"""hbactl's numbers are the ones written: ASCII digits, refused with the option's name else."""

from __future__ import annotations

import argparse

import pytest

from hba.cli import main
from initiator.argtypes import fio_sizes, size, size_ranges, sizes

URL = "iscsi://127.0.0.1:1/iqn.2003-01.org.example:disk1/0"
ARABIC_ONE = "\u0661"


@pytest.mark.parametrize(("argv", "words"), [
    (["read", URL, "--lba", ARABIC_ONE, "--blocks", "1", "-o", "-"], "argument --lba"),
    (["read", URL, "--lba", "0", "--blocks", "1_0", "-o", "-"], "argument --blocks"),
    (["write", URL, "--lba", " 1", "-i", "-"], "argument --lba"),
    (["perf", URL, "--queue-depth", ARABIC_ONE], "argument --queue-depth"),
    (["perf", URL, "--seconds", "1_0"], "argument --seconds"),
    (["inquiry", URL, "--login-timeout", ARABIC_ONE], "argument --login-timeout"),
    (["inquiry", URL, "--command-timeout", "\uff15"], "argument --command-timeout"),
    (["top", "--count", ARABIC_ONE], "argument --count"),
    (["top", "--interval", "1_0"], "argument --interval"),
    (["attach", "disk1", "--timeout", ARABIC_ONE], "argument --timeout"),
    (["detach", "disk1", "--timeout", "5 "], "argument --timeout"),
])
def test_numbers_in_other_scripts_or_with_separators_are_refused(
        capsys: pytest.CaptureFixture[str], argv: list[str], words: str) -> None:
    # int() and float() take them: --lba with an Arabic-Indic 1 read block 1 of the LUN.
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


@pytest.mark.parametrize(("argv", "words"), [
    (["top", "--count", "-1"], "--count must be at least 1"),
    (["top", "--interval", "nan"], "--interval nan: expected a number of seconds above 0"),
    (["perf", URL, "--seconds", "1e999"], "--seconds inf: expected a number of seconds"),
    (["perf", URL, "--queue-depth", "-1"], "--queue-depth must be at least 1"),
])
def test_numbers_out_of_range_still_reach_the_commands_own_words(
        capsys: pytest.CaptureFixture[str], argv: list[str], words: str) -> None:
    assert main(argv) == 2
    assert words in capsys.readouterr().err


@pytest.mark.parametrize(("text", "expected"), [("4096", 4096), ("4k", 4096), ("128K", 131072),
                                            ("1m", 1 << 20), ("1MiB", 1 << 20), ("2g", 2 << 30),
                                            (" 512 ", 512)])
def test_sizes(text: str, expected: int) -> None:
    assert size(text) == expected


@pytest.mark.parametrize("text", ["", "k", "4 k", "1_000", "+4k", "\u0664k", "\u00b2k", "1.5k",
                                  "-4k", "0x10"])
def test_a_size_is_ascii_digits_and_a_unit(text: str) -> None:
    # int() took '1_000', '+4', '4 ' and Arabic-Indic digits.
    with pytest.raises(argparse.ArgumentTypeError, match="is not a size in bytes"):
        size(text)


@pytest.mark.parametrize("text", ["0", "0k", "000m"])
def test_a_size_is_positive(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="a size must be above 0"):
        size(text)


def test_perf_block_size_is_refused_with_the_options_name(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["perf", URL, "--block-size", "3x"])
    assert exit_.value.code == 2
    assert "argument --block-size: '3x' is not a size in bytes (e.g. 4096, 4k, 1m)" in \
        capsys.readouterr().err


def test_lists_and_ranges_of_sizes_reach_fio_in_bytes() -> None:
    # The benchmarks each had a parser of their own, and passed --bs/--block-size on unread.
    assert sizes("4k,128k") == [4096, 131072]
    assert size_ranges("4k-64k") == [(4096, 65536)]
    assert size_ranges("4k-64k, 8k") == [(4096, 65536), (8192, 8192)]
    assert fio_sizes(sizes("4k,1m")) == "4096,1048576"
    assert fio_sizes(size_ranges("4KiB-64k,512")) == "4096-65536,512-512"


@pytest.mark.parametrize(("parse", "text", "words"), [
    (sizes, "", "not a list of sizes"), (sizes, "4k,,8k", "not a list of sizes"),
    (sizes, "4k,x", "'x' is not a size in bytes"), (size_ranges, "64k-4k", "low end is above"),
    (size_ranges, "4k-", "is not a size in bytes"), (size_ranges, "4k-8k-16k", "not a size"),
])
def test_a_bad_list_or_range_of_sizes_is_refused(parse: object, text: str, words: str) -> None:
    assert callable(parse)
    with pytest.raises(argparse.ArgumentTypeError, match=words):
        parse(text)
