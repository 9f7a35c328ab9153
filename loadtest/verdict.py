"""The load test's verdict, CPM 8 style: the share of requests answered within the Target
Response Time, per user class, per interface, per SEC band (or stage) and in total. Pure: no
Locust, no gevent.

Every request is counted exactly (not from Locust's approximate percentiles): a request is
*within* when it succeeded and took at most the TRT; a failed request counts as late, and so
does one still in flight when the run ended (after waiting up to the TRT for it). CPM 8
leaves lodging out: the total is of the read interfaces, lodging has a row of its own.

Beside the percentages the verdict checks the load itself: each user class must have made
(at least the margin below) the arrivals its rate should have produced.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import quoteattr

MEETS = "meets target"
BELOW_TARGET = "below target, above minimum"
BELOW_MINIMUM = "below minimum"
NO_REQUESTS = "no requests"
LODGE = "lodge"  # the interface CPM 8 leaves out
TOTAL = "TOTAL (CPM 8: read interfaces)"
_BAND = re.compile(r"^\d\d-\d\d$")  # an SEC time band's label; other periods are stages


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
    def late(self) -> int:
        return self.total - self.within

    @property
    def percent(self) -> float | None:
        return 100.0 * self.within / self.total if self.total else None


@dataclass
class Tally:
    """Counts keyed by (user class, interface, period: SEC band or stage label), and the
    arrivals each user class made."""

    trt_seconds: float = 3.0
    counts: dict[tuple[str, str, str], Count] = field(default_factory=dict)
    arrivals: dict[str, int] = field(default_factory=dict)

    def add(self, user_class: str, interface: str, ms: float, ok: bool, period: str = "") -> None:
        key = (user_class, interface, period)
        c = self.counts.get(key)
        if c is None:
            c = self.counts[key] = Count()
        c.add(ms, ok, self.trt_seconds * 1000.0)

    def arrived(self, user_class: str) -> None:
        self.arrivals[user_class] = self.arrivals.get(user_class, 0) + 1

    # distributed mode: workers send their counts to the master and start again
    def export(self) -> dict[str, Any]:
        return {"counts": [[u, i, p, c.total, c.within, c.failed, c.max_ms]
                           for (u, i, p), c in self.counts.items()],
                "arrivals": dict(self.arrivals)}

    def take(self) -> dict[str, Any]:
        out = self.export()
        self.counts, self.arrivals = {}, {}
        return out

    def merge(self, exported: dict[str, Any] | None) -> None:
        if not exported:
            return
        for u, i, p, total, within, failed, max_ms in exported.get("counts", []):
            c = self.counts.setdefault((u, i, p), Count())
            c.merge(Count(int(total), int(within), int(failed), float(max_ms)))
        for u, n in exported.get("arrivals", {}).items():
            self.arrivals[u] = self.arrivals.get(u, 0) + int(n)

    def rows(self) -> list[tuple[str, Count]]:
        """('class X', …), ('interface Y', …), ('band Z' or 'stage Z', …: read interfaces),
        the CPM 8 total of the read interfaces, then lodging on its own."""
        by_class: dict[str, Count] = {}
        by_interface: dict[str, Count] = {}
        by_period: dict[str, Count] = {}
        total, lodging = Count(), Count()
        for (u, i, p), c in sorted(self.counts.items()):
            if i == LODGE:
                lodging.merge(c)
                continue
            by_class.setdefault(u, Count()).merge(c)
            by_interface.setdefault(i, Count()).merge(c)
            if p:
                by_period.setdefault(p, Count()).merge(c)
            total.merge(c)
        rows = ([(f"class {u}", c) for u, c in sorted(by_class.items())]
                + [(f"interface {i}", c) for i, c in sorted(by_interface.items())]
                + [(f"{'band' if _BAND.match(p) else 'stage'} {p}", c)
                   for p, c in sorted(by_period.items())]
                + [(TOTAL, total)])
        if lodging.total:
            rows.append(("lodging (not in CPM 8)", lodging))
        return rows

    def total(self) -> Count:
        return dict(self.rows())[TOTAL]


def verdict(percent: float | None, target: float, minimum: float) -> str:
    if percent is None:
        return NO_REQUESTS
    if percent >= target:
        return MEETS
    if percent >= minimum:
        return BELOW_TARGET
    return BELOW_MINIMUM


def failing_rows(tally: Tally, target: float, minimum: float, fail_below_target: bool = False
                 ) -> list[str]:
    """The rows below the minimum (the target with `fail_below_target`); the total too when
    no request was made at all."""
    failing = {BELOW_MINIMUM} | ({BELOW_TARGET} if fail_below_target else set())
    rows = tally.rows()
    out = [label for label, c in rows if c.total and verdict(c.percent, target, minimum) in failing]
    if tally.total().total == 0:
        out.append(f"{TOTAL}: no requests")
    return out


def passed(tally: Tally, target: float, minimum: float, fail_below_target: bool = False) -> bool:
    return not failing_rows(tally, target, minimum, fail_below_target)


def shortfalls(expected: dict[str, float], arrivals: dict[str, int], margin_percent: float
               ) -> list[str]:
    """User classes that made fewer arrivals than their rates should have produced, less
    `margin_percent` and 2 (a run starts and ends mid-interval)."""
    out = []
    for cls, want in sorted(expected.items()):
        made = arrivals.get(cls, 0)
        if made < want * (1 - margin_percent / 100) - 2:
            out.append(f"{cls}: {made} arrivals, its rate should have produced {want:.0f}"
                       f" (margin {margin_percent:g}%)")
    return out


def format_report(tally: Tally, target: float, minimum: float) -> str:
    lines = [f"Load test verdict: TRT {tally.trt_seconds:g} s, target {target:g}%,"
             f" minimum {minimum:g}% (failed requests and requests still in flight at the end"
             " count as late)", "",
             f"{'':34}{'requests':>10}{'within TRT':>12}{'late':>8}{'failed':>8}{'max ms':>10}"
             f"{'percent':>10}  verdict"]
    for label, c in tally.rows():
        pct = "-" if c.percent is None else f"{c.percent:.3f}%"
        lines.append(f"{label:34}{c.total:>10}{c.within:>12}{c.late:>8}{c.failed:>8}"
                     f"{c.max_ms:>10.0f}{pct:>10}  {verdict(c.percent, target, minimum)}")
    return "\n".join(lines)


# -- the server's own CPM 8 counts beside the client's ---------------------------------------------
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


def server_figures(tally: Tally, server: list[tuple[str, int, int]] | None
                   ) -> dict[str, tuple[int, int]]:
    """The server's (received, within) for each verdict row it has a figure for: its
    interfaces, and its total for the CPM 8 total."""
    if not server:
        return {}
    found = {("interface " + n if n != "TOTAL" else TOTAL): (r, w) for n, r, w in server}
    return {label: found[label] for label, _ in tally.rows() if label in found}


def server_warnings(tally: Tally, server: list[tuple[str, int, int]] | None) -> list[str]:
    """Rows where the server counts more requests within the TRT than the client saw: the
    server's clock misses time the client waited (or something else loaded it meanwhile)."""
    rows = dict(tally.rows())
    return [f"{label}: the server counts {within} within TRT, the client saw {rows[label].within}"
            for label, (_received, within) in server_figures(tally, server).items()
            if within > rows[label].within]


# -- reports: CSV, JUnit XML, an HTML section ----------------------------------------------------
@dataclass
class Outcome:
    """Everything the reports carry."""

    tally: Tally
    target: float
    minimum: float
    fail_below_target: bool = False
    server: list[tuple[str, int, int]] | None = None
    server_trt: Any = None
    expected: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # the load broke: exit 3
    strict: bool = False

    @property
    def failing(self) -> list[str]:
        return failing_rows(self.tally, self.target, self.minimum, self.fail_below_target)

    @property
    def comparable(self) -> bool:
        """The server judged its counts by the client's TRT (else they are not compared)."""
        try:
            return abs(float(self.server_trt) - self.tally.trt_seconds) < 1e-9
        except (TypeError, ValueError):
            return False

    @property
    def warnings(self) -> list[str]:
        return server_warnings(self.tally, self.server) if self.comparable else []

    @property
    def notes(self) -> list[str]:
        if self.server is None or self.comparable:
            return []
        return [f"the server's TRT ({self.server_trt} s) is not --trt"
                f" ({self.tally.trt_seconds:g} s): its figures are shown, not compared"]

    def exit_code(self) -> int:
        if self.problems:
            return 3
        if self.failing or (self.strict and self.warnings):
            return 1
        return 0

    @property
    def word(self) -> str:
        return {0: "PASS", 1: "FAIL", 3: "LOAD BROKEN"}[self.exit_code()]

    def table(self) -> list[list[str]]:
        head = ["row", "requests", "within_trt", "late", "failed", "max_ms", "percent", "verdict",
                "server_received", "server_within_trt"]
        figures = server_figures(self.tally, self.server)
        out = [head]
        for label, c in self.tally.rows():
            server = figures.get(label)
            out.append([label, str(c.total), str(c.within), str(c.late), str(c.failed),
                        f"{c.max_ms:.0f}", "" if c.percent is None else f"{c.percent:.3f}",
                        verdict(c.percent, self.target, self.minimum),
                        str(server[0]) if server else "", str(server[1]) if server else ""])
        return out

    def csv_text(self) -> str:
        import csv
        import io

        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(self.table())
        return buf.getvalue()

    def junit_xml(self) -> str:
        """One test case per verdict row, one for the load's arrivals and one for the
        server's figures; a failing row is a <failure>, a broken load an <error>."""
        cases: list[str] = []
        failing = set(self.failing)

        def case(name: str, failure: str | None = None, kind: str = "failure") -> None:
            body = (f"<{kind} message={quoteattr(failure)}/>" if failure else "")
            cases.append(f"  <testcase classname=\"smki.loadtest\" name={quoteattr(name)}>"
                         f"{body}</testcase>")

        for label, c in self.tally.rows():
            pct = "-" if c.percent is None else f"{c.percent:.3f}%"
            case(f"{label}: {c.within}/{c.total} within TRT {self.tally.trt_seconds:g} s ({pct})",
                 f"{verdict(c.percent, self.target, self.minimum)}" if label in failing else None)
        case("the load: every enabled user class ran at its rate",
             "; ".join(self.problems) or None, kind="error")
        warn = "; ".join(self.warnings)
        case("server counts no more within TRT than the client saw",
             warn if warn and self.strict else None)
        errors = 1 if self.problems else 0
        failures = sum(1 for c in cases if "<failure" in c)
        return ('<?xml version="1.0" encoding="utf-8"?>\n'
                f'<testsuite name="smki-loadtest" tests="{len(cases)}" failures="{failures}"'
                f' errors="{errors}">\n' + "\n".join(cases) + "\n</testsuite>\n")

    def html_section(self) -> str:
        rows = self.table()
        cells = "".join(f"<th>{html.escape(h)}</th>" for h in rows[0])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in r) + "</tr>"
                       for r in rows[1:])
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in
                        [*self.problems, *self.failing, *(f"warning: {w}" for w in self.warnings),
                         *self.notes])
        server = ("" if self.server is None else
                  f" The server's figures are its CPM 8 counts added during the run (its TRT:"
                  f" {html.escape(str(self.server_trt))} s).")
        return (f'<section id="smki-verdict" style="font-family:sans-serif;margin:1em">'
                f"<h2>SMKI verdict: {self.word}</h2>"
                f"<p>TRT {self.tally.trt_seconds:g} s, target {self.target:g}%, minimum"
                f" {self.minimum:g}%. Failed requests and requests still in flight at the end"
                f" count as late; CPM 8 leaves lodging out.{server}</p>"
                f"<table border=\"1\" cellpadding=\"3\"><tr>{cells}</tr>{body}</table>"
                + (f"<ul>{notes}</ul>" if notes else "") + "</section>")


def add_to_html(page: str, section: str) -> str:
    """Locust's HTML report with the verdict's section at the top of its body."""
    at = page.find("<body")
    if at < 0:
        return section + page
    end = page.find(">", at) + 1
    return page[:end] + section + page[end:]
