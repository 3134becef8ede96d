"""Strings from a target, made safe to show a person: the one home of that escaping.

Everything a target sends is untrusted, and much of it ends up in front of a person: INQUIRY
vendor/product/revision, unit serial numbers and designators, target names, aliases and
addresses from SendTargets or a redirect, text keys quoted in error messages. Printed raw, a
target could write terminal control sequences (``ESC ] 0 ; ... BEL`` retitles the window,
``ESC [ 2 J`` clears it, others remap keys on some terminals), fake extra lines in a log or in
the journal with a newline, or reverse the text that follows with a bidirectional override.
And a target can send a name, an address or a value of any length (a 60 KiB TargetName in a
SendTargets answer): a message that quotes one must not become a 60 KiB line.

:func:`printable` replaces every character that is not printable, in the sense of
:meth:`str.isprintable` (control characters, format characters such as U+202E RIGHT-TO-LEFT
OVERRIDE, line and paragraph separators, unassigned code points, spaces other than the plain
space) with a Python-style escape (``\\x1b``, ``\\n``, ``\\u202e``). Backslashes themselves are
left alone, so the function is idempotent: escaping text that was already escaped, or a message
that embeds an escaped value, changes nothing. JSON output needs none of this (``json.dumps``
escapes control characters and keeps the original content).

:func:`quoted` is the form an error or log message quotes a value in, a person's (a URL, a
portal) or a target's (a TargetName, a TargetAddress, a redirect address, a key's value):
``repr`` (escaped, in quotes), at most :data:`QUOTE_LIMIT` characters of it. What is data
rather than a message (the names ``hbactl discover`` lists) is shown whole, through
:func:`printable`.

The human-facing outputs apply it at the last moment: ``hbactl``'s printers and its error line,
the ``hbactl list``/``status`` tables, and :class:`PrintableFormatter` on every log handler of
``hbactl`` and the daemon.
"""

from __future__ import annotations

import logging

__all__ = ["QUOTE_LIMIT", "PrintableFormatter", "printable", "quoted"]

QUOTE_LIMIT = 200
"""The most characters of a value (a URL, a name, an address) an error message quotes."""

_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(value: object, limit: int | None = None) -> str:
    """``str(value)`` with every non-printable character escaped; at most ``limit``
    characters of it (then ``...`` marks the cut)."""
    text = value if isinstance(value, str) else str(value)
    if limit is not None and len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def quoted(value: object) -> str:
    """``value`` quoted for an error message, at most :data:`QUOTE_LIMIT` characters of it: a
    URL of 100 000 characters made a message of 300 000, quoting it three times over, and a
    target's TargetAddress or TargetName of any length was quoted whole."""
    text = repr(value)
    return text if len(text) <= QUOTE_LIMIT else text[:QUOTE_LIMIT] + "..."


def _escape(char: str) -> str:
    short = _SHORT.get(char)
    if short is not None:
        return short
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


class PrintableFormatter(logging.Formatter):
    """A log formatter whose lines cannot carry control characters: the formatted message
    (which may quote what a target sent) is escaped; a traceback that follows it keeps its
    line breaks."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return printable(super().formatMessage(record))
