"""The numbers a person types on hbactl's command line, as argparse types.

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

__all__ = ["seconds", "whole_number"]

# A decimal number as a person writes one, or nan/inf (which check_seconds names).
_SECONDS = re.compile(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?|[-+]?(nan|inf)",
                      re.IGNORECASE)


def whole_number(text: str) -> int:
    """ASCII digits, with an optional ``-`` (the command names a negative number itself); a
    number too long to matter is :data:`initiator.url.TOO_LARGE`."""
    sign, digits = (-1, text[1:]) if text[:1] == "-" else (1, text)
    number = decimal(digits)
    if number is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (digits 0-9)")
    return sign * number


def seconds(text: str) -> float:
    """A number of seconds in ASCII digits (``2``, ``0.5``, ``1e3``)."""
    if not text.isascii() or _SECONDS.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (e.g. 2, 0.5)")
    return float(text)
