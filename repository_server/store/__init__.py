"""The store of record: PostgreSQL through asyncpg. All SQL lives in `store.db`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Config
    from .db import Store


@contextlib.asynccontextmanager
async def opened_store(config: Config, *, max_size: int | None = None,
                       supervise: bool = False) -> AsyncIterator[Store]:
    """The configured PostgreSQL (`database.url`) or the embedded one in the data directory,
    migrated and connected; on exit the pool is closed and the embedded server's lease
    released (the last user stops it). With `supervise` (the server), the embedded one is
    started again whenever it stops meanwhile (`EmbeddedPostgres.supervise`)."""
    from .db import Store
    from .embedded import EmbeddedPostgres

    db = config.database
    embedded = None
    dsn = db.url
    if not dsn:
        embedded = EmbeddedPostgres(Path(config.data_dir))
        dsn = await asyncio.to_thread(embedded.acquire)
    watchdog = (asyncio.get_running_loop().create_task(embedded.supervise())
                if embedded is not None and supervise else None)
    try:
        store = await Store.connect(dsn, min_size=min(db.pool_min, max_size or db.pool_max),
                                    max_size=max_size or db.pool_max,
                                    command_timeout=db.command_timeout,
                                    connect_timeout=db.connect_timeout)
        try:
            yield store
        finally:
            await store.close()
    finally:
        if watchdog is not None:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
        if embedded is not None:
            await asyncio.to_thread(embedded.release)
