"""When a request reached this host: the start of its Code Performance Measure 8 clock.

The kernel keeps, per TCP connection, the time the last data segment arrived
(`TCP_INFO`'s `tcpi_last_data_recv`, milliseconds before the call). Read when a request
is taken up (HTTP: before routing; LDAP: when its bytes are read), it says how long the
request waited before this process saw it: in the socket's receive buffer and, for the
first request of a connection, in the listen queue too, while the process was busy,
starved of CPU or stopped. A clock started by the handler misses all of that (a server
paused 0.4 s in every second counted requests that took 17.8 s end to end as within 3 s).

Not seen: the TCP (and TLS) handshake and anything before the request's bytes reach this
host. For a request that arrives in several segments the last one read so far counts, so a
slowly sent request is timed from its last segment. Where TCP_INFO is not available (not
Linux, a Unix socket) the clock starts when the request is taken up.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

_TCP_INFO = getattr(socket, "TCP_INFO", None)
_LAST_DATA_RECV = struct.Struct("=I")  # struct tcp_info: u8 x 8, u32 x 9, then the times
_OFFSET = 8 + 9 * 4 + 2 * 4  # tcpi_last_data_sent, tcpi_last_ack_sent, tcpi_last_data_recv
_LEN = 104
_MAX_MS = 3_600_000  # an older "last data" belongs to no request now being read


def socket_waited(sock: Any) -> float:
    """Seconds since the last data segment reached `sock` (a socket or a transport's
    socket-like object), 0.0 if that cannot be known."""
    if _TCP_INFO is None or sock is None:
        return 0.0
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _LEN)
    except (OSError, AttributeError, TypeError, ValueError):
        return 0.0
    if len(info) < _OFFSET + 4:
        return 0.0
    ms: int = _LAST_DATA_RECV.unpack_from(info, _OFFSET)[0]
    return ms / 1000.0 if ms < _MAX_MS else 0.0


def waited(transport: Any) -> float:
    """How long the request now being taken up on `transport` waited (seconds)."""
    return socket_waited(transport.get_extra_info("socket")) if transport is not None else 0.0


def own_socket(transport: Any) -> Any:
    """A socket object on the connection's descriptor for `socket_waited` (TCP_INFO): the
    loop's stand-in (uvloop's PseudoSocket) makes one and detaches it on every getsockopt,
    2.3 µs a request here against 1.0 µs. It shares the transport's descriptor, so it must be
    given back with `drop_socket` (detached, never closed) when the connection is let go.
    The loop's stand-in where that fails."""
    pseudo = transport.get_extra_info("socket")
    try:
        return socket.socket(fileno=pseudo.fileno())
    except (OSError, AttributeError, ValueError):
        return pseudo


def drop_socket(sock: Any) -> None:
    """Let go of what `own_socket` gave: the descriptor is the transport's (never closed
    here)."""
    if isinstance(sock, socket.socket):
        sock.detach()
