"""Ports for servers that tests start as processes."""

from __future__ import annotations

import itertools
import os
import socket

_PORTS = itertools.count()


def free_port() -> int:
    """A loopback port nothing listens on, for a server started as a process. Not an ephemeral
    port (the kernel's 32768-60999 by default): one of those could be taken by any outgoing
    connection (a PostgreSQL client, an HTTP request) between this check and the server's
    bind, which made tests flaky under parallel workers. Each pytest-xdist worker draws from
    its own block of 2,000 ports in 20000-31999, and takes the even ones."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    block = int(worker[2:]) % 6 if worker[2:].isdigit() else 0
    base = 20000 + block * 2000
    for _ in range(1000):  # even ports only: a server may take the next one too (`serve
        # --workers 2` puts its second worker's metrics listener on the metrics port + 1)
        port = base + 2 * ((next(_PORTS) + os.getpid()) % 1000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {base}-{base + 1999}")


__all__ = ["free_port"]
