"""systemd's readiness protocol (sd_notify(3)), without libsystemd: one datagram of
newline-separated KEY=VALUE lines to the unix socket named by $NOTIFY_SOCKET (a path, or
'@name' for the abstract namespace). Under `Type=notify` systemd counts the service started
at READY=1 (so `systemctl start` returns, and units ordered after it start, only once every
listener is up and the read replica is ready), shows STATUS=, and with RELOADING=1 and
MONOTONIC_USEC= (systemd >= 253 wants both) knows a SIGHUP reload is in progress until the
next READY=1. Without $NOTIFY_SOCKET (not under systemd) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


def _address() -> str | None:
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path or path[0] not in "/@":
        return None  # unset, or a vsock address (not ours to speak)
    return "\0" + path[1:] if path[0] == "@" else path


def notify(*fields: str) -> bool:
    """Send KEY=VALUE fields in one datagram; False when there is no one to tell or the
    message could not be sent (logged: systemd's readiness is not worth failing a server)."""
    address = _address()
    if address is None:
        return False
    message = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.warning("systemd notification %r not sent: %s", fields[0], exc)
        return False
    return True


def ready(status: str) -> bool:
    return notify("READY=1", f"STATUS={status}")


def reloading() -> bool:
    """Before a reload: its start on CLOCK_MONOTONIC, in microseconds (systemd's clock)."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")


def stopping() -> bool:
    return notify("STOPPING=1", "STATUS=stopping")

