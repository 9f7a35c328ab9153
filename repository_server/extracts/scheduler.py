"""When extracts are made: a full one weekly (extracts.full_weekday at full_time) and a delta
daily (delta_time), in UK local time, by one process in the cluster.

Every process looks at the clock every `check_seconds`. The latest tick at or before now of
each kind is due unless an extract already has that slot or the newest extract started
after the tick (so a fresh install makes one full at once and no delta until the next
tick, and a delta that falls on the full's tick is the full). Work happens under
PostgreSQL's session advisory lock (`Store.extract_lock`, tried without waiting: a process
that does not get it leaves the tick to the one that did); the slot's unique index is the
second line of defence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from repository_server.config import WEEKDAYS
from repository_server.config import Extracts as ExtractSettings
from repository_server.extracts.writer import ExtractWriter, Produced
from repository_server.store.protocols import ExtractSchedule

log = logging.getLogger(__name__)


def latest_ticks(now: datetime, settings: ExtractSettings) -> list[tuple[str, str, datetime]]:
    """(kind, slot, tick) of the latest full and delta ticks at or before `now` (aware)."""
    zone = ZoneInfo(settings.timezone)
    local = now.astimezone(zone)
    (fh, fm), (dh, dm) = settings.times()
    weekday = WEEKDAYS.index(settings.full_weekday.lower())
    full = local.replace(hour=fh, minute=fm, second=0, microsecond=0)
    full -= timedelta(days=(local.weekday() - weekday) % 7)
    if full > local:
        full -= timedelta(days=7)
    delta = local.replace(hour=dh, minute=dm, second=0, microsecond=0)
    if delta > local:
        delta -= timedelta(days=1)
    # (aware datetimes in one ZoneInfo do wall-clock arithmetic: 02:00 stays 02:00 across
    # a change of summer time, and the UTC offset follows)
    out = [("full", f"full {full:%Y-%m-%dT%H:%M}", full)]
    if delta.replace(tzinfo=None) != full.replace(tzinfo=None):
        out.append(("delta", f"delta {delta:%Y-%m-%dT%H:%M}", delta))
    return out


class ExtractScheduler:
    def __init__(self, store: ExtractSchedule, writer: ExtractWriter, settings: ExtractSettings,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.store = store
        self.writer = writer
        self.settings = settings
        self.clock = clock
        self._task: asyncio.Task[None] | None = None

    async def tick(self) -> list[Produced]:
        """Produce whatever is due, if this process gets the lock."""
        produced: list[Produced] = []
        async with self.store.extract_lock(wait=False) as got:
            if not got:
                return produced
            # the readers' listing: written if missing (an upgraded installation, a crash
            # between publication and listing) or stale
            await self.writer.refresh_listing()
            for kind, slot, at in latest_ticks(self.clock(), self.settings):
                latest = await self.store.extract_latest()
                if latest is not None and latest.started_at >= at:
                    continue
                if await self.store.extract_slot_taken(slot):
                    continue
                log.info("scheduled %s extract for %s", kind, slot)
                produced.append(await self.writer.produce(kind, slot=slot))
        return produced

    def start(self) -> None:
        if self._task is None:  # once
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scheduled extract failed (retried at the next check)")
            await asyncio.sleep(self.settings.check_seconds)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
