"""The schema: migrations (files `migrations/NNNN_name.sql`, applied once each, in order)."""

from __future__ import annotations

import logging
from importlib import resources

from repository_server.store.bulkload import finish_interrupted
from repository_server.store.pool import _MIGRATION_LOCK, StoreBase, unlock

log = logging.getLogger(__name__)


class SchemaStore(StoreBase):
    async def migrate(self) -> list[str]:
        """Apply pending migrations (files `NNNN_name.sql`) once, under an advisory lock; then
        build any indexes an interrupted bulk load left unbuilt (`bulkload`)."""
        scripts = sorted(
            (p.name, p.read_text())
            for p in resources.files("repository_server.store").joinpath("migrations").iterdir()
            if p.name.endswith(".sql")
        )
        applied: list[str] = []
        async with self.pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
            try:
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                )
                done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
                for name, sql in scripts:
                    if name in done:
                        continue
                    async with conn.transaction():
                        await conn.execute(sql)
                        await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", name)
                    log.info("applied migration %s", name)
                    applied.append(name)
            finally:
                await unlock(conn, _MIGRATION_LOCK)
        # an import into an empty store killed before it built the indexes it had dropped
        await finish_interrupted(self.pool)
        return applied

    async def has_schema(self) -> bool:
        """Whether this database holds a store (our schema), before any migration."""
        found: bool = await self.pool.fetchval(
            "SELECT to_regclass('schema_migrations') IS NOT NULL")
        return found

    async def ping(self) -> None:
        async with self.pool.acquire(timeout=2) as conn:
            await conn.fetchval("SELECT 1", timeout=2)
