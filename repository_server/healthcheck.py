"""`python -m repository_server.healthcheck [--config FILE]`: exit 0 when this node's server
answers `/readyz` with 200, 1 otherwise (one line on stderr saying why).

For container health checks (the Dockerfile's HEALTHCHECK) and process supervisors: it reads
the same configuration as `serve` (the file, then SMKI_* environment variables), so it asks
the port the http listener is really configured on (or https, when http is off), on
loopback when the listener binds every address.
"""

from __future__ import annotations

import argparse
import http.client
import os
import ssl
import sys

from repository_server.config import ConfigError, load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m repository_server.healthcheck",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--config", default=os.environ.get("SMKI_CONFIG"),
                        help="configuration file (default: $SMKI_CONFIG, else defaults)")
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds (default 4)")
    args = parser.parse_args(argv)
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 1
    for name in ("http", "https"):
        addr = config.listeners.address(name)
        if addr is None:
            continue
        host = "127.0.0.1" if addr.host in ("0.0.0.0", "") else (
            "::1" if addr.host == "::" else addr.host)
        conn: http.client.HTTPConnection
        if name == "https":  # our own certificate on loopback: reachability, not identity
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            conn = http.client.HTTPSConnection(host, addr.port, timeout=args.timeout, context=ctx)
        else:
            conn = http.client.HTTPConnection(host, addr.port, timeout=args.timeout)
        try:
            conn.request("GET", "/readyz")
            resp = conn.getresponse()
            body = resp.read(300).decode("utf-8", "replace")
        except OSError as exc:
            print(f"healthcheck: {name} {host}:{addr.port}: {exc}", file=sys.stderr)
            return 1
        finally:
            conn.close()
        if resp.status == 200:
            return 0
        print(f"healthcheck: {name} {host}:{addr.port}/readyz: {resp.status} {body}",
              file=sys.stderr)
        return 1
    print("healthcheck: neither listeners.http nor listeners.https is enabled", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
