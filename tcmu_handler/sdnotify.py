"""systemd's readiness protocol (sd_notify(3)), for the two services of this project.

``hbactl daemon`` and the standalone TCMU handler (:mod:`tcmu_handler.serve`) both run as
``Type=notify`` units: they send ``READY=1`` once they serve, ``STATUS=...`` lines on the way,
``STOPPING=1`` at the end. The protocol is one datagram on the AF_UNIX socket systemd names in
``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace); without one (not run by
systemd) there is nobody to tell, and a service works on without its manager, as with
libsystemd's sd_notify(3). It lives here, the lowest package both services import.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

__all__ = ["sd_notify"]


def sd_notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (``READY=1``, ``STOPPING=1``, ``STATUS=...``; newline-separated) to the
    service manager's ``$NOTIFY_SOCKET`` (``environ``, default ``os.environ``). False when
    there is none or it cannot be reached."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.debug("NOTIFY_SOCKET=%s is not a unix socket; not notifying", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.debug("cannot notify the service manager: %s", exc.strerror or exc)
        return False
    return True
