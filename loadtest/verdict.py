"""The load test's verdict, CPM 8 style: the share of requests answered within the Target
Response Time, per user class, per interface and in total. Pure: no Locust, no gevent.

Every request is counted exactly (not from Locust's approximate percentiles): a request is
*within* when it succeeded and took at most the TRT; a failed request counts as late.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MEETS = "meets target"
BELOW_TARGET = "below target, above minimum"
BELOW_MINIMUM = "below minimum"
NO_REQUESTS = "no requests"


@dataclass
class Count:
    total: int = 0
    within: int = 0
    failed: int = 0
    max_ms: float = 0.0

    def add(self, ms: float, ok: bool, trt_ms: float) -> None:
        self.total += 1
        if not ok:
            self.failed += 1
        elif ms <= trt_ms:
            self.within += 1
        if ms > self.max_ms:
            self.max_ms = ms

    def merge(self, other: Count) -> None:
        self.total += other.total
        self.within += other.within
        self.failed += other.failed
        self.max_ms = max(self.max_ms, other.max_ms)

    @property
    def percent(self) -> float | None:
        return 100.0 * self.within / self.total if self.total else None


@dataclass
class Tally:
    """Counts keyed by (user class, interface)."""

    trt_seconds: float = 3.0
    counts: dict[tuple[str, str], Count] = field(default_factory=dict)

    def add(self, user_class: str, interface: str, ms: float, ok: bool) -> None:
        key = (user_class, interface)
        c = self.counts.get(key)
        if c is None:
            c = self.counts[key] = Count()
        c.add(ms, ok, self.trt_seconds * 1000.0)

    # distributed mode: workers send their counts to the master and start again
    def export(self) -> list[list[Any]]:
        return [[u, i, c.total, c.within, c.failed, c.max_ms] for (u, i), c in self.counts.items()]

    def take(self) -> list[list[Any]]:
        out = self.export()
        self.counts = {}
        return out

    def merge(self, exported: list[list[Any]]) -> None:
        for u, i, total, within, failed, max_ms in exported:
            c = self.counts.setdefault((u, i), Count())
            c.merge(Count(int(total), int(within), int(failed), float(max_ms)))

    def rows(self) -> list[tuple[str, Count]]:
        """('class X', …), ('interface Y', …), then ('TOTAL', …)."""
        by_class: dict[str, Count] = {}
        by_interface: dict[str, Count] = {}
        total = Count()
        for (u, i), c in sorted(self.counts.items()):
            by_class.setdefault(u, Count()).merge(c)
            by_interface.setdefault(i, Count()).merge(c)
            total.merge(c)
        return ([(f"class {u}", c) for u, c in sorted(by_class.items())]
                + [(f"interface {i}", c) for i, c in sorted(by_interface.items())]
                + [("TOTAL", total)])


def verdict(percent: float | None, target: float, minimum: float) -> str:
    if percent is None:
        return NO_REQUESTS
    if percent >= target:
        return MEETS
    if percent >= minimum:
        return BELOW_TARGET
    return BELOW_MINIMUM


def passed(tally: Tally, target: float, minimum: float, fail_below_target: bool = False) -> bool:
    """True when every row (class, interface, total) is at or above the minimum (the target
    with ``fail_below_target``) and at least one request was made."""
    failing = {NO_REQUESTS, BELOW_MINIMUM} | ({BELOW_TARGET} if fail_below_target else set())
    rows = tally.rows()
    if rows[-1][1].total == 0:
        return False
    return all(verdict(c.percent, target, minimum) not in failing for _, c in rows if c.total)


def format_report(tally: Tally, target: float, minimum: float) -> str:
    lines = [f"Load test verdict: TRT {tally.trt_seconds:g} s, target {target:g}%,"
             f" minimum {minimum:g}% (failed requests count as late)", "",
             f"{'':34}{'requests':>10}{'within TRT':>12}{'failed':>8}{'max ms':>10}"
             f"{'percent':>10}  verdict"]
    for label, c in tally.rows():
        pct = "-" if c.percent is None else f"{c.percent:.3f}%"
        lines.append(f"{label:34}{c.total:>10}{c.within:>12}{c.failed:>8}{c.max_ms:>10.0f}"
                     f"{pct:>10}  {verdict(c.percent, target, minimum)}")
    return "\n".join(lines)


def cpm_difference(before: dict[str, Any] | None, after: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(row, received, within_trt) added between two /ops/reports/cpm snapshots of the same
    month, per interface and in total (the server counts per calendar month)."""
    def table(report: dict[str, Any] | None) -> dict[str, tuple[int, int]]:
        if not report:
            return {}
        rows = {i["interface"]: (int(i["received"]), int(i["within_trt"]))
                for i in report.get("interfaces", [])}
        t = report.get("total", {})
        rows["TOTAL"] = (int(t.get("received", 0)), int(t.get("within_trt", 0)))
        return rows

    b, a = table(before), table(after)
    names = [*sorted(k for k in a if k != "TOTAL"), "TOTAL"]
    return [(n, a.get(n, (0, 0))[0] - b.get(n, (0, 0))[0], a.get(n, (0, 0))[1] - b.get(n, (0, 0))[1])
            for n in names]


def format_cpm(before: dict[str, Any] | None, after: dict[str, Any]) -> str:
    lines = [f"Server CPM 8 ({after.get('month')}, TRT {after.get('trt_seconds')} s):"
             " requests counted during this run", f"{'':20}{'received':>10}{'within TRT':>12}"]
    for name, received, within in cpm_difference(before, after):
        lines.append(f"{name:20}{received:>10}{within:>12}")
    return "\n".join(lines)
