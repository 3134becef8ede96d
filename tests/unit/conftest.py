"""Shared configuration of the unit tier.

``hbactl daemon`` (and a worker process's main) sets up the daemon's logging by replacing the
root logger's handlers and level (:func:`hba.control.configure_daemon_logging`). In a test
process that would take pytest's log capture away from every test after it, so it is a no-op
in every unit test; a test of the set-up itself asks for :func:`daemon_logging`, the real one,
with the root logger put back afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping

import pytest


def _no_daemon_logging(verbose: int, environ: Mapping[str, str] | None = None) -> None:
    """What every unit test gets for the daemon's logging set-up: nothing."""


@pytest.fixture(autouse=True)
def _daemon_logging_stubbed(request: pytest.FixtureRequest,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    if "daemon_logging" in request.fixturenames:
        return
    from hba import control

    monkeypatch.setattr(control, "configure_daemon_logging", _no_daemon_logging)


@pytest.fixture
def daemon_logging() -> Iterator[Callable[..., None]]:
    """The real :func:`hba.control.configure_daemon_logging`; the root logger's handlers and
    level are restored when the test ends."""
    from hba import control

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield control.configure_daemon_logging
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
