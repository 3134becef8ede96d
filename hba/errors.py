"""The ``hba`` package's exceptions: one root, so callers can catch everything it raises.

Each message says what failed and what to do about it (a file and line, a command to run).
"""

from __future__ import annotations


class HBAError(Exception):
    """Root of every exception raised by the ``hba`` package."""
