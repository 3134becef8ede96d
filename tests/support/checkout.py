"""The checkout's own Python for a script run by hand (``bench/ring``, not ``./run bench``).

Theory of operation
-------------------
The scripts under ``bench/`` start with ``#!/usr/bin/env python3``: the first Python on PATH.
``./run bench`` puts the checkout's ``.venv/bin`` first, where ``deploy/setup`` installed the
project's dependencies (crc32c, pyudev, dbus-next, ...); run as the documentation shows them
(``bench/ring --disks 2 --workers 2``), the scripts got the system's Python and ended in a
``ModuleNotFoundError`` traceback. Importing this module (right after the script's
``sys.path`` entry, before any other of the project's imports: a call there would put the
imports after it out of order) calls :func:`use_checkout_python`, which runs the script again with
``.venv/bin/python`` when it runs under another one, once (an environment variable marks the
second start); without a ``.venv`` it says to run ``./run setup``. Under ``.venv/bin/python``
already (``./run bench``, the VM's ``deploy/vm/run -- $PWD/.venv/bin/python bench/...``) it
does nothing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv"
_AGAIN = "ISCSI_HBA_CHECKOUT_PYTHON"


def use_checkout_python() -> None:
    """Re-run this script (``sys.argv``) with the checkout's ``.venv/bin/python`` unless it
    runs under it; exit with a message when there is none."""
    if Path(sys.prefix).resolve() == VENV.resolve() or os.environ.get(_AGAIN):
        return
    python = VENV / "bin" / "python"
    if not python.exists():
        sys.exit(f"{sys.argv[0]}: this checkout has no .venv with the project's dependencies "
                 f"({VENV}); run ./run setup first, or run the benchmarks with ./run bench")
    os.environ[_AGAIN] = "1"
    os.execv(python, [str(python), *sys.argv])


use_checkout_python()
