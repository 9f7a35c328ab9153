"""Service-level counting (CPM 8 buckets, refusals, UK months/days/bands, demand flags)
against an in-memory store (`tests/fakes.py`) and controlled clocks: no server. The
end-to-end path (real requests, PostgreSQL, the CLI report) is in test_service_levels.py."""

from __future__ import annotations

from datetime import UTC, date, datetime

from repository_server.config import ServiceLevelSettings
from repository_server.service_levels import LATENCY_BOUNDS, ServiceLevels
from tests.fakes import FakeServiceLevelStore, user


class Clocks:
    """A wall clock and a perf clock the test moves."""

    def __init__(self, wall: datetime) -> None:
        self.wall = wall.timestamp()
        self.perf = 1000.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.perf += seconds


def levels(store: FakeServiceLevelStore, clocks: Clocks, trt: float = 0.5) -> ServiceLevels:
    return ServiceLevels(ServiceLevelSettings(trt_seconds=trt), store,
                         clock=lambda: clocks.wall, perf=lambda: clocks.perf)


async def test_answers_are_bucketed_and_judged_by_the_trt() -> None:
    store = FakeServiceLevelStore()
    clocks = Clocks(datetime(2026, 3, 10, 12, 0, tzinfo=UTC))
    sl = levels(store, clocks)
    for elapsed, status in ((0.0005, 200), (0.2, 200), (0.7, 304), (0.1, 503), (0.0, 401)):
        mark = sl.receive("http", "get-cert", "alice")
        clocks.advance(elapsed)
        sl.answered(mark, status)
    assert await sl.flush() == 2  # one CPM row, one demand cell
    [row] = await store.cpm_counts("2026-03")
    assert (row.received, row.answered, row.within_trt, row.failed, row.refused) == (4, 3, 2, 1, 1)
    assert len(row.buckets) == len(LATENCY_BOUNDS) + 1
    assert row.buckets[0] == 1 and sum(row.buckets) == 3  # 0.5 ms in the first bucket
    assert row.trt_seconds == 0.5
    # a second flush adds only what came since the first
    sl.answered(sl.receive("http", "get-cert", "alice"), 200)
    assert await sl.flush() == 2 and await sl.flush() == 0
    [row] = await store.cpm_counts("2026-03")
    assert (row.received, row.answered) == (5, 4) and store.flushes == 2


async def test_demand_is_counted_per_uk_day_and_band() -> None:
    """20:30 UTC on 30 June is 21:30 BST (band 20-24); 23:30 UTC is 00:30 BST on 1 July
    (band 00-07); months follow the UK day too."""
    store = FakeServiceLevelStore()
    clocks = Clocks(datetime(2026, 6, 30, 20, 30, tzinfo=UTC))
    sl = levels(store, clocks)
    sl.answered(sl.receive("ldap", "search", "bob"), 200)
    clocks.advance(3 * 3600)
    sl.answered(sl.receive("ldap", "search", "bob"), 200)
    await sl.flush()
    assert await store.demand_counts(date(2026, 6, 30)) == [("bob", 3, 1)]
    assert await store.demand_counts(date(2026, 7, 1)) == [("bob", 0, 1)]
    assert [r.received for r in await store.cpm_counts("2026-06")] == [1]
    assert [r.received for r in await store.cpm_counts("2026-07")] == [1]


async def test_users_above_their_forecast_are_flagged() -> None:
    store = FakeServiceLevelStore([user("carol", forecast=2, bands=(25, 25, 25, 25)),
                                   user("dave", forecast=100)])
    clocks = Clocks(datetime(2026, 1, 15, 9, 0, tzinfo=UTC))  # band 08-20
    sl = levels(store, clocks)
    for name in ("carol", "carol", "carol", "dave"):
        sl.answered(sl.receive("http", "get-cert", name), 200)
    await sl.flush()
    await sl.refresh_demand_gauges()
    assert sl.demand_flags == {"carol": True, "dave": False}
    assert sl.demand_ratios[("carol", "day")] == 1.5
    assert sl.demand_ratios[("carol", "08-20")] == 6.0
