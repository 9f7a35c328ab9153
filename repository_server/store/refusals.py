"""The SQL of the refused-handshake summary (table `tls_refusals`, see obs/refusals.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from repository_server.obs.refusals import RefusalRow
from repository_server.store.db import Store


async def add(store: Store, rows: list[RefusalRow]) -> None:
    """Add these counts (several processes and nodes add to the same rows)."""
    if not rows:
        return
    async with store.pool.acquire() as conn:
        await conn.executemany(
            "INSERT INTO tls_refusals (minute, listener, reason, peer, count, detail)"
            " VALUES ($1, $2, $3, $4, $5, $6)"
            " ON CONFLICT (minute, listener, reason, peer) DO UPDATE"
            " SET count = tls_refusals.count + EXCLUDED.count, detail = EXCLUDED.detail",
            [(datetime.fromtimestamp(r.minute, UTC), r.listener, r.reason, r.peer, r.count,
              r.detail) for r in rows])


async def summary(store: Store, since: datetime,
                  until: datetime) -> list[dict[str, Any]]:
    """Counts per listener, reason and peer in [since, until), most first."""
    rows = await store.pool.fetch(
        "SELECT listener, reason, peer, sum(count)::int8 AS count, min(minute) AS first_minute,"
        " max(minute) AS last_minute, (array_agg(detail ORDER BY minute DESC))[1] AS detail"
        " FROM tls_refusals WHERE minute >= $1 AND minute < $2"
        " GROUP BY listener, reason, peer ORDER BY count DESC, listener, reason, peer",
        since, until)
    return [dict(r) for r in rows]
