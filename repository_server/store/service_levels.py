"""Service levels (CPM 8 response times, demand against forecast): counts that every
process adds to, and the month's and day's totals."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from typing import Any

from repository_server.store.models import CPM_COLS, CpmRow, cpm_row
from repository_server.store.pool import StoreBase


class ServiceLevelStore(StoreBase):
    async def add_service_level_counts(self, cpm: Sequence[CpmRow],
                                       demand: Sequence[tuple[Any, str, int, int]]) -> None:
        """Add one process's counts since its last flush (one transaction, additive, so
        every process and node can flush into the same rows)."""
        async with self.pool.acquire() as conn, conn.transaction():
            if cpm:
                await conn.executemany(
                    "INSERT INTO cpm_counts AS c (month, interface, operation, user_name, received,"
                    " answered, within_trt, failed, seconds_sum, buckets, trt_seconds, refused)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
                    " ON CONFLICT (month, interface, operation, user_name, trt_seconds)"
                    " DO UPDATE SET"
                    " received = c.received + excluded.received,"
                    " refused = c.refused + excluded.refused,"
                    " answered = c.answered + excluded.answered,"
                    " within_trt = c.within_trt + excluded.within_trt,"
                    " failed = c.failed + excluded.failed,"
                    " seconds_sum = c.seconds_sum + excluded.seconds_sum,"
                    " buckets = (SELECT array_agg(coalesce(a, 0) + coalesce(b, 0) ORDER BY i)"
                    "   FROM unnest(c.buckets, excluded.buckets) WITH ORDINALITY AS t(a, b, i))",
                    [(r.month, r.interface, r.operation, r.user_name, r.received, r.answered,
                      r.within_trt, r.failed, r.seconds_sum, list(r.buckets), r.trt_seconds,
                      r.refused) for r in cpm])
            if demand:
                await conn.executemany(
                    "INSERT INTO demand_counts AS d (day, user_name, band, requests)"
                    " VALUES ($1, $2, $3, $4) ON CONFLICT (day, user_name, band)"
                    " DO UPDATE SET requests = d.requests + excluded.requests", demand)

    async def cpm_counts(self, month: str) -> list[CpmRow]:
        rows = await self.pool.fetch(
            f"SELECT {CPM_COLS} FROM cpm_counts"
            " WHERE month = $1 ORDER BY interface, operation, user_name, trt_seconds", month)
        return [cpm_row(r) for r in rows]

    async def demand_counts(self, day: date) -> list[tuple[str, int, int]]:
        """(user, band, requests) for one UK day."""
        rows = await self.pool.fetch(
            "SELECT user_name, band, requests FROM demand_counts WHERE day = $1"
            " ORDER BY user_name, band", day)
        return [(r[0], int(r[1]), int(r[2])) for r in rows]
