"""``./run demo`` (``python -m hba.demo``): its options is checked before anything starts."""

from __future__ import annotations

import pytest

from hba import demo


@pytest.mark.parametrize(("value", "message"), [
    ("-1", "argument --size: '-1' is not a size in bytes"),
    ("4096", "--size 4096: the demo's filesystem needs at least 16777216 bytes"),
    ("\u0661", "argument --size: '\u0661' is not a size in bytes"),
    ("1_000_000_000", "argument --size: '1_000_000_000' is not a size in bytes"),
    # a unit is read (it was refused as not a whole number): 1 MiB is too small
    ("1m", "--size 1048576: the demo's filesystem needs at least 16777216 bytes"),
])
def test_a_size_that_is_no_disk_is_a_usage_error(capsys: pytest.CaptureFixture[str],
                                                 value: str, message: str) -> None:
    # int() took both '1_000_000_000' and -1; the demo then started on them.
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--size", value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
