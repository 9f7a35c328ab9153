"""One row of a capacity table from one Locust level (bench/day_capacity.sh and
bench/loadtest_capacity.sh): requests, req/s and p99 from Locust's stats CSV, the load test's
own percent within TRT and the server's CPM 8 count of the same requests from its log, and
the server process's share of its core from two /proc/PID/stat tick readings.

  level_row.py header LABEL
  level_row.py row VALUE CSV_PREFIX LOG RC TICKS0 TICKS1 TIME0 TIME1 HZ
"""

from __future__ import annotations

import csv
import re
import sys

COLUMNS = ("requests", "req/s", "p99_ms", "client_%", "server_%", "server_cpu")


def main(argv: list[str]) -> None:
    if argv[0] == "header":
        print(f"{argv[1]:>8}" + "".join(f" {c:>10}" for c in COLUMNS) + "  verdict")
        return
    value, prefix, logf, rc = argv[1], argv[2], argv[3], int(argv[4])
    s0, s1, t0, t1, hz = (float(x) for x in argv[5:10])
    with open(prefix + "_stats.csv", newline="") as fh:
        agg = next(r for r in csv.DictReader(fh) if r["Name"] == "Aggregated")
    with open(logf) as fh:
        log = fh.read()
    client = re.search(r"^\s*TOTAL\b.*?([0-9.]+)%", log, re.M)
    server = re.search(r"Server CPM 8.*?^TOTAL\s+(\d+)\s+(\d+)", log, re.S | re.M)
    server_pct = (f"{100 * int(server.group(2)) / max(1, int(server.group(1))):.3f}"
                  if server else "?")
    print(f"{value:>8} {int(agg['Request Count']):>10} {float(agg['Requests/s']):>10.0f}"
          f" {float(agg['99%']):>10.0f} {client.group(1) if client else '?':>10}"
          f" {server_pct:>10} {(s1 - s0) / hz / (t1 - t0):>10.2f}"
          f"  {'passes (>= minimum)' if rc == 0 else f'FAILS (exit {rc})'}")


if __name__ == "__main__":
    main(sys.argv[1:])
