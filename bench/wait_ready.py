#!/usr/bin/env python3
"""Wait until a started smki-repository is ready to be measured (stdlib only).

Since the read replica: ready means /readyz answers 200 with the replica caught up
(`replica.behind_changes` 0): the server serves everything from it, nothing is preloaded.
Earlier versions (a per-process cache preloaded from PostgreSQL, no "replica" in /readyz) are
waited for as follows, so the previous read path can be measured beside the new one:

The server answers as soon as its listeners are up, while the cache preload still runs in the
background (it reads every certificate from PostgreSQL, newest first, and fills the cache in
one go at the end). A benchmark started before that measures the database, not the server's
steady state. Ready means any of:

  * `smki_cache_certificates` on /metrics >= --expect (certificates held in the cache; those
    versions served /metrics on the http port: today it is on listeners.metrics only), or
  * the server log says "cache preloaded with N certificates" (the preload finished: N may be
    below --expect when the import refused some, or when the cache is too small: reported),
  * with --expect 0 and no --log: the gauge has stopped changing for --settle seconds.

Exits 1 if the server process dies, the preload fails ("cache preload failed" in the log) or
--timeout passes.

  wait_ready.py --port 8083 --expect 41005 --log server.log --pidfile server.pid
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import urllib.error
import urllib.request

GAUGE = re.compile(r"^smki_cache_certificates\s+([0-9.eE+]+)\s*$", re.M)
DONE = re.compile(r"cache preloaded with (\d+) certificates in ([0-9.]+) s")
FAILED = "certificate cache preload failed"


def replica_ready(port: int) -> str | None:
    """"applied N" once /readyz says the replica is ready and caught up; "" for a server
    without a replica (an earlier version); None while not ready."""
    import json

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        try:
            return None if "replica" in json.loads(exc.read()) else ""
        except ValueError:
            return None
    except (OSError, ValueError):
        return None
    replica = body.get("replica")
    if replica is None:
        return ""
    if body.get("status") != "ready" or replica.get("behind_changes"):
        return None
    return f"applied {replica.get('applied')}"


def gauge(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            m = GAUGE.search(r.read().decode("utf-8", "replace"))
    except (OSError, urllib.error.URLError, ValueError):
        return None
    return int(float(m.group(1))) if m else None


def alive(pidfile: str | None, seen: list[int]) -> bool:
    if not pidfile:
        return True
    try:
        with open(pidfile) as f:
            pid = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return not seen  # no pid file yet (just started) is fine; gone after one was seen is not
    seen[:] = [pid]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--port", type=int, required=True, help="the server's HTTP port on 127.0.0.1")
    ap.add_argument("--expect", type=int, default=0, help="certificates the cache should hold")
    ap.add_argument("--log", help="the server's log file (stdout/stderr)")
    ap.add_argument("--pidfile", help="the server's pid file: stop waiting if it dies")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument(
        "--settle", type=float, default=5, help="seconds without change (no --expect/--log)"
    )
    ap.add_argument("--interval", type=float, default=0.5)
    a = ap.parse_args(argv)

    t0 = time.monotonic()
    seen: list[int] = []
    last, last_change = None, t0
    while True:
        now = time.monotonic()
        state = replica_ready(a.port)
        if state:
            print(f"ready: the read replica is caught up ({state}) after {now - t0:.1f} s")
            return 0
        n = gauge(a.port) if state == "" else None
        if n is not None and n != last:
            last, last_change = n, now
        if a.expect and n is not None and n >= a.expect:
            print(
                f"ready: cache holds {n:,} certificates (expected {a.expect:,}) after "
                f"{now - t0:.1f} s"
            )
            return 0
        if a.log:
            try:
                with open(a.log, errors="replace") as f:
                    text = f.read()
            except OSError:
                text = ""
            m = DONE.search(text)
            if m:
                n = gauge(a.port)
                msg = (
                    f"ready: preload done ({m.group(1)} certificates read in {m.group(2)} s), "
                    f"cache holds {n if n is not None else '?'} after {now - t0:.1f} s"
                )
                if a.expect and (n is None or n < a.expect):
                    msg += (
                        f"; WARNING fewer than the {a.expect:,} expected (refused at import?"
                        " cache too small?)"
                    )
                print(msg)
                return 0
            if FAILED in text:
                print(f"the server's cache preload failed; see {a.log}", file=sys.stderr)
                return 1
        elif not a.expect and last and now - last_change >= a.settle:
            print(f"ready: cache holds {last:,} certificates, unchanged for {a.settle} s")
            return 0
        if not alive(a.pidfile, seen):
            print(
                "the server process is gone" + (f"; see {a.log}" if a.log else ""), file=sys.stderr
            )
            if a.log:
                try:
                    with open(a.log, errors="replace") as f:
                        sys.stderr.write("".join(f.readlines()[-20:]))
                except OSError:
                    pass
            return 1
        if now - t0 > a.timeout:
            print(f"not ready after {a.timeout} s (cache holds {last})", file=sys.stderr)
            return 1
        time.sleep(a.interval)


if __name__ == "__main__":
    sys.exit(main())
