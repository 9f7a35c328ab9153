"""Code Performance Measure 8 and demand against forecast: counting, flushing, reporting.

CPM 8 (SEC): of the requests to obtain something lodged in the repository in a calendar
month, the percentage answered within the Target Response Time. Every read interface marks
each request twice: `receive()` when the request has been fully received (it counts as
received from then on, even if it is never answered) and `answered()` when the response has
been written to the connection (the access logger calls it, after aiohttp's write_eof).
Counts live in memory per (month, interface, operation, user): plain integers and a
fixed-bucket latency histogram, no lock, no database write per request. A background task
adds the deltas since the last flush to PostgreSQL every `flush_seconds` (one transaction,
additive, so every process and node flushes into the same rows) and once more at shutdown.
A crash therefore loses at most the last flush interval's counts.

Demand: requests per user per UK day per SEC time band (00-07, 07-08, 08-20, 20-24, UK local
time), flushed with the same transaction; a user above `demand_threshold_percent` of their
forecast (for the day or any band) is flagged by `report demand` and by a gauge.

Months, days and bands are UK local time (Europe/London, so they follow BST). Working them
out per request would cost a time-zone conversion; instead the current period's end is kept
and the month/day/band recomputed only when the clock passes it.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from repository_server.config import ServiceLevelSettings
from repository_server.store.models import CpmRow, UserRow
from repository_server.store.protocols import ServiceLevelCounts

log = logging.getLogger(__name__)

# Histogram bounds (seconds); the last bucket is everything slower.
LATENCY_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0,
                  5.0, 10.0, 30.0)
BANDS = ("00-07", "07-08", "08-20", "20-24")
_BAND_STARTS = (0, 7, 8, 20)  # local hour each band starts
ANONYMOUS = "-"
# Answers to requests that obtained nothing lodged because the request itself was refused:
# malformed (400, 405, 413, 414, 415, 431) or without a valid key (401, 403). CPM 8 measures
# "requests to obtain something lodged in the repository": these are counted apart
# (`refused`) and left out of the percentage, so a flood of bad keys cannot raise (or lower)
# it. 2xx, 304 and the web service's 402/404 ("no such certificate") are requests served.
REFUSED = frozenset({400, 401, 403, 405, 413, 414, 415, 431})


def band_of_hour(hour: int) -> int:
    return bisect.bisect_right(_BAND_STARTS, hour) - 1


class Counts:
    """Counters for one (month, interface, operation, user). `flushed` is what the store
    already has from this process."""

    __slots__ = ("answered", "buckets", "failed", "flushed", "received", "refused", "seconds",
                 "within")

    def __init__(self) -> None:
        self.received = 0
        self.answered = 0
        self.within = 0
        self.failed = 0
        self.refused = 0
        self.seconds = 0.0
        self.buckets = [0] * (len(LATENCY_BOUNDS) + 1)
        self.flushed: Snapshot = (0, 0, 0, 0, 0, 0.0, (0,) * (len(LATENCY_BOUNDS) + 1))

    def snapshot(self) -> Snapshot:
        return (self.received, self.answered, self.within, self.failed, self.refused,
                self.seconds, tuple(self.buckets))


# received, answered, within, failed, refused, seconds, buckets
Snapshot = tuple[int, int, int, int, int, float, tuple[int, ...]]


Mark = tuple[Counts, float]  # what answered() needs: the counters and the receipt time


@dataclass(frozen=True)
class Period:
    month: str  # YYYY-MM
    day: date
    band: int
    ends: float  # epoch seconds at which month, day or band may change


class ServiceLevels:
    def __init__(self, settings: ServiceLevelSettings, store: ServiceLevelCounts | None, *,
                 clock: Callable[[], float] = time.time,
                 perf: Callable[[], float] = time.perf_counter) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.perf = perf
        self.trt = settings.trt_seconds
        self.zone = ZoneInfo(settings.timezone)
        self.counts: dict[tuple[str, str, str, str], Counts] = {}
        self.demand: dict[tuple[date, str, int], list[int]] = {}  # one-element cells
        self._demand_flushed: dict[tuple[date, str, int], int] = {}
        self._hot: dict[tuple[str, str, str], tuple[Counts, list[int]]] = {}
        self._ends_perf = 0.0  # set by _current()
        self._period = self.period_at(clock())
        self._current()
        self._task: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self.demand_ratios: dict[tuple[str, str], float] = {}  # (user, band|"day") -> used/forecast
        self.demand_flags: dict[str, bool] = {}

    # -- periods --------------------------------------------------------------------------
    def period_at(self, now: float) -> Period:
        local = datetime.fromtimestamp(now, self.zone)
        band = band_of_hour(local.hour)
        if band + 1 < len(_BAND_STARTS):
            end_local = local.replace(hour=_BAND_STARTS[band + 1], minute=0, second=0,
                                      microsecond=0)
        else:
            end_local = (local + timedelta(days=1)).replace(hour=0, minute=0, second=0,
                                                            microsecond=0)
        # replace() keeps the UTC offset of `local`; re-attach the zone for the real instant
        end = end_local.replace(tzinfo=None).replace(tzinfo=self.zone).timestamp()
        return Period(f"{local.year:04d}-{local.month:02d}", local.date(), band, max(end, now + 1))

    def current(self) -> Period:
        """The month, UK day and SEC time band now."""
        return self._current()

    def _current(self) -> Period:
        now = self.clock()
        if now >= self._period.ends:
            self._period = self.period_at(now)
            self._hot.clear()  # its slots count into the period that just ended
        # the same end on the perf clock: receive() then needs no wall-clock read
        self._ends_perf = self.perf() + (self._period.ends - now)
        return self._period

    # -- the hot path ---------------------------------------------------------------------
    def receive(self, interface: str, operation: str, user: str = ANONYMOUS, *,
                started: float | None = None) -> Mark:
        """The request has been received: count it now, time it from now (or from `started`,
        a `perf` reading taken when it was received)."""
        if started is None:
            started = self.perf()
        return self._received(interface, operation, user, started), started

    def _received(self, interface: str, operation: str, user: str, started: float) -> Counts:
        if started >= self._ends_perf:
            self._current()
        hot = self._hot.get((interface, operation, user))
        if hot is None:
            hot = self._hot_slot(interface, operation, user)
        counts, cell = hot
        counts.received += 1
        cell[0] += 1
        return counts

    def _hot_slot(self, interface: str, operation: str, user: str) -> tuple[Counts, list[int]]:
        """This period's counters for one (interface, operation, user), found once per period
        so that each request costs one dictionary lookup (the CPM and demand keys hold the
        month, day and band)."""
        period = self._period
        key = (period.month, interface, operation, user)
        counts = self.counts.get(key)
        if counts is None:
            counts = self.counts[key] = Counts()
        dkey = (period.day, user, period.band)
        cell = self.demand.get(dkey)
        if cell is None:
            cell = self.demand[dkey] = [0]
        slot = self._hot[(interface, operation, user)] = (counts, cell)
        return slot

    def answered(self, mark: Mark, status: int) -> None:
        """The response has been written. A refused request (REFUSED) obtained nothing: it
        leaves `received` (and so the percentage) for a column of its own."""
        counts, started = mark
        elapsed = self.perf() - started
        if status >= 500:
            counts.failed += 1
            return
        if status in REFUSED:
            counts.received -= 1
            counts.refused += 1
            return
        self._answered(counts, elapsed)

    def _answered(self, counts: Counts, elapsed: float) -> None:
        counts.answered += 1
        if elapsed <= self.trt:
            counts.within += 1
        counts.seconds += elapsed
        counts.buckets[bisect.bisect_left(LATENCY_BOUNDS, elapsed)] += 1

    def served(self, interface: str, operation: str, user: str, started: float) -> None:
        """`receive` then `answered(..., 200)` in one call, for a request answered
        synchronously, once its response has been written (the LDAP short way; `started`
        as for `receive`)."""
        counts = self._received(interface, operation, user, started)
        self._answered(counts, self.perf() - started)

    # -- flushing -------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._flush_forever(),
                                                            name="service-levels-flush")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self.flush()

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.flush_seconds)
            try:
                await self.flush()
                await self.refresh_demand_gauges()
            except Exception as exc:  # the store is down: keep counting, retry next time
                log.warning("service-level counts not flushed (kept for the next try): %s", exc)

    async def flush(self) -> int:
        """Add everything counted since the last flush to the store; returns rows written."""
        if self.store is None:
            return 0
        async with self._flush_lock:
            cpm: list[CpmRow] = []
            taken: list[tuple[Counts, Snapshot]] = []
            for (month, interface, operation, user), counts in list(self.counts.items()):
                now = counts.snapshot()
                before = counts.flushed
                if now[:5] == before[:5]:
                    continue
                cpm.append(CpmRow(month, interface, operation, user, now[0] - before[0],
                                  now[1] - before[1], now[2] - before[2], now[3] - before[3],
                                  now[5] - before[5],
                                  tuple(a - b for a, b in zip(now[6], before[6], strict=True)),
                                  self.trt, now[4] - before[4]))
                taken.append((counts, now))
            demand_now = {k: cell[0] for k, cell in list(self.demand.items())}
            demand = [(day, user, band, n - self._demand_flushed.get((day, user, band), 0))
                      for (day, user, band), n in demand_now.items()
                      if n != self._demand_flushed.get((day, user, band), 0)]
            if not cpm and not demand:
                return 0
            await self.store.add_service_level_counts(cpm, demand)
            for counts, now in taken:
                counts.flushed = now
            self._demand_flushed = demand_now
            self._forget_old()
            return len(cpm) + len(demand)

    def _forget_old(self) -> None:
        """Drop flushed counters of past months and days (kept one period for stragglers)."""
        period = self._current()
        for key, counts in list(self.counts.items()):
            if key[0] != period.month and counts.snapshot()[:5] == counts.flushed[:5]:
                del self.counts[key]
        yesterday = period.day - timedelta(days=1)
        for dkey in [k for k in self.demand if k[0] < yesterday]:
            if self.demand[dkey][0] == self._demand_flushed.get(dkey):
                del self.demand[dkey]
                self._demand_flushed.pop(dkey, None)

    async def refresh_demand_gauges(self) -> None:
        """Today's usage against forecast from the store (every process's counts)."""
        if self.store is None:
            return
        today = self._current().day
        report = demand_report(today, await self.store.demand_counts(today),
                               await self.store.users(), self.settings.demand_threshold_percent)
        self.demand_ratios = {}
        self.demand_flags = {}
        for row in report["users"]:
            if row["forecast"] is None:
                continue
            self.demand_ratios[(row["user"], "day")] = row["percent"] / 100
            for band in row["bands"]:
                if band["percent"] is not None:
                    self.demand_ratios[(row["user"], band["band"])] = band["percent"] / 100
            self.demand_flags[row["user"]] = row["above"]


class ServiceLevelCollector(Collector):
    """Prometheus view of the in-memory counts since start (summed over users and months)."""

    def __init__(self, levels: ServiceLevels) -> None:
        self.levels = levels

    def collect(self) -> Iterator[Metric]:
        received = CounterMetricFamily("smki_cpm_requests", "Requests to obtain lodged objects,"
                                       " received (CPM 8)", labels=["interface", "operation"])
        within = CounterMetricFamily("smki_cpm_within_trt", "Requests answered within the"
                                     " Target Response Time (CPM 8)",
                                     labels=["interface", "operation"])
        latency = HistogramMetricFamily("smki_cpm_response_seconds", "From request received to"
                                        " response written (CPM 8)",
                                        labels=["interface", "operation"])
        sums: dict[tuple[str, str], list[Any]] = {}
        for (_month, interface, operation, _user), c in list(self.levels.counts.items()):
            s = sums.setdefault((interface, operation),
                                [0, 0, 0.0, [0] * (len(LATENCY_BOUNDS) + 1)])
            s[0] += c.received
            s[1] += c.within
            s[2] += c.seconds
            s[3] = [a + b for a, b in zip(s[3], c.buckets, strict=True)]
        for (interface, operation), (rec, win, secs, buckets) in sorted(sums.items()):
            received.add_metric([interface, operation], rec)
            within.add_metric([interface, operation], win)
            cumulative, running = [], 0
            for bound, n in zip((*LATENCY_BOUNDS, float("inf")), buckets, strict=True):
                running += n
                cumulative.append(("+Inf" if bound == float("inf") else str(bound), running))
            latency.add_metric([interface, operation], cumulative, secs)
        yield received
        yield within
        yield latency
        ratio = GaugeMetricFamily("smki_demand_usage_ratio", "Today's requests / forecast, per"
                                  " user and SEC time band (band=day: the whole day)",
                                  labels=["user", "band"])
        for (user, band), value in sorted(self.levels.demand_ratios.items()):
            ratio.add_metric([user, band], value)
        above = GaugeMetricFamily("smki_demand_above_forecast", "1 when a user's requests today"
                                  " exceed the demand threshold of their forecast", labels=["user"])
        for user, flag in sorted(self.levels.demand_flags.items()):
            above.add_metric([user], 1.0 if flag else 0.0)
        yield ratio
        yield above


# -- reports (pure: rows in, dicts out) ---------------------------------------------------
def verdict(percent: float | None, target: float, minimum: float) -> str:
    if percent is None:
        return "no requests"
    if percent >= target:
        return "meets target"
    if percent >= minimum:
        return "below target, above minimum"
    return "below minimum"


def cpm_report(month: str, rows: list[CpmRow], settings: ServiceLevelSettings) -> dict[str, Any]:
    """The month's CPM 8 per interface and operation. Every count is judged against the TRT in
    force when it was counted (a row per TRT): `by_trt` says how much was judged by which, and
    `trt_seconds` is the TRT in force now."""
    def summary(selected: list[CpmRow], *, parts: bool = True) -> dict[str, Any]:
        received = sum(r.received for r in selected)
        within = sum(r.within_trt for r in selected)
        percent = round(100.0 * within / received, 4) if received else None
        answered = sum(r.answered for r in selected)
        out: dict[str, Any] = {
            "received": received, "answered": answered, "within_trt": within,
            "failed": sum(r.failed for r in selected),
            "refused": sum(r.refused for r in selected), "percent": percent,
            "verdict": verdict(percent, settings.target_percent, settings.minimum_percent),
            "mean_seconds": (round(sum(r.seconds_sum for r in selected) / answered, 6)
                             if answered else None)}
        if parts:
            out["by_trt"] = [{"trt_seconds": t, **summary(
                [r for r in selected if r.trt_seconds == t], parts=False)}
                for t in sorted({r.trt_seconds for r in selected})]
        return out

    interfaces = sorted({r.interface for r in rows})
    return {
        "month": month,
        "trt_seconds": settings.trt_seconds,
        "target_percent": settings.target_percent,
        "minimum_percent": settings.minimum_percent,
        "interfaces": [{"interface": i, **summary([r for r in rows if r.interface == i]),
                        "operations": [{"operation": o, **summary(
                            [r for r in rows if r.interface == i and r.operation == o])}
                            for o in sorted({r.operation for r in rows if r.interface == i})]}
                       for i in interfaces],
        "total": summary(rows),
        "counted_against_trt": sorted({r.trt_seconds for r in rows}),
    }


def format_cpm_report(report: dict[str, Any]) -> str:
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}%"

    def line(interface: str, operation: str, s: dict[str, Any]) -> list[str]:
        out = [f"{interface:<12}{operation:<22}{s['received']:>12}{s['within_trt']:>12}"
               f"{pct(s['percent']):>11}{s['refused']:>10}  {s['verdict']}"]
        if len(s["by_trt"]) > 1:  # judged against more than one TRT this month
            out += [f"{'':<12}{'  at TRT ' + format(p['trt_seconds'], 'g') + ' s':<22}"
                    f"{p['received']:>12}{p['within_trt']:>12}{pct(p['percent']):>11}"
                    f"{p['refused']:>10}" for p in s["by_trt"]]
        return out

    judged = report["counted_against_trt"]
    lines = [f"Code Performance Measure 8, {report['month']}: TRT {report['trt_seconds']:g} s,"
             f" target {report['target_percent']:g}%, minimum {report['minimum_percent']:g}%"]
    if judged and judged != [report["trt_seconds"]]:
        lines.append("counts judged against the TRT in force when counted: "
                     + ", ".join(f"{t:g} s" for t in judged))
    lines += ["", f"{'interface':<12}{'operation':<22}{'received':>12}{'within TRT':>12}"
              f"{'percent':>11}{'refused':>10}  verdict"]
    for i in report["interfaces"]:
        for o in i["operations"]:
            lines += line(i["interface"], o["operation"], o)
        lines += line(i["interface"], "(all)", i)
    lines += line("TOTAL", "", report["total"])
    lines += ["", "refused: answers 400/401/403 (no valid key, a malformed request); they obtain"
              " nothing lodged and are not in the percentage"]
    return "\n".join(lines)


def demand_report(day: date, counts: list[tuple[str, int, int]], users: list[UserRow],
                  threshold_percent: float) -> dict[str, Any]:
    used: dict[str, list[int]] = {}
    for user, band, n in counts:
        used.setdefault(user, [0, 0, 0, 0])[band] += n
    forecasts = {u.name: u for u in users}
    rows = []
    for name in sorted(set(used) | {u.name for u in users if u.forecast_per_day is not None}):
        bands_used = used.get(name, [0, 0, 0, 0])
        total = sum(bands_used)
        u = forecasts.get(name)
        per_day = u.forecast_per_day if u else None
        split = (u.forecast_bands if u and u.forecast_bands else None)
        percent = round(100.0 * total / per_day, 2) if per_day else None
        bands = []
        for i, label in enumerate(BANDS):
            band_forecast = per_day * split[i] / 100 if per_day is not None and split else None
            band_pct = (round(100.0 * bands_used[i] / band_forecast, 2)
                        if band_forecast else None)
            bands.append({"band": label, "requests": bands_used[i], "forecast": band_forecast,
                          "percent": band_pct,
                          "above": band_pct is not None and band_pct > threshold_percent})
        above = ((percent is not None and percent > threshold_percent)
                 or any(b["above"] for b in bands))
        rows.append({"user": name, "requests": total, "forecast": per_day, "percent": percent,
                     "bands": bands, "above": above})
    return {"day": day.isoformat(), "threshold_percent": threshold_percent, "users": rows,
            "flagged": [r["user"] for r in rows if r["above"]]}


def format_demand_report(report: dict[str, Any]) -> str:
    def cell(requests: int, percent: float | None) -> str:
        return f"{requests}" + (f" ({percent:.0f}%)" if percent is not None else "")

    lines = [f"Demand against forecast, {report['day']} (UK time bands; flagged above"
             f" {report['threshold_percent']:g}% of forecast)", "",
             f"{'user':<20}{'requests':>18}{'forecast':>10}" + "".join(f"{b:>16}" for b in BANDS)
             + "  flag"]
    for r in report["users"]:
        lines.append(f"{r['user']:<20}{cell(r['requests'], r['percent']):>18}"
                     f"{r['forecast'] if r['forecast'] is not None else '-':>10}"
                     + "".join(f"{cell(b['requests'], b['percent']):>16}" for b in r["bands"])
                     + ("  ABOVE FORECAST" if r["above"] else ""))
    if not report["users"]:
        lines.append("(no requests and no forecasts)")
    return "\n".join(lines)
