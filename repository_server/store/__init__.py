"""The store of record: PostgreSQL through asyncpg. All SQL lives in this package: `db.Store`
composed of one module per area, `feed` for the read replica, `refusals` for TLS refusals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from repository_server.config import Config
    from repository_server.store.db import Store


def database_name(dsn: str) -> str:
    """A database URL without its password, for messages."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}" if user else netloc))


@contextlib.asynccontextmanager
async def opened_store(config: Config, *, max_size: int | None = None,
                       supervise: bool = False, create: bool = False) -> AsyncIterator[Store]:
    """The configured PostgreSQL (`database.url`) or the embedded one in the data directory,
    migrated and connected; on exit the pool is closed and the embedded server's lease
    released (the last user stops it). With `supervise` (the server), the embedded one is
    started again whenever it stops meanwhile (`EmbeddedPostgres.supervise`).

    Only with `create` (serve, demo, import) is a store made where there is none (logged:
    "created a new store in ..."); otherwise that is NoStore, so a command pointed at a
    wrong or missing data directory says so instead of reporting on an empty store."""
    from repository_server.store.db import Store
    from repository_server.store.embedded import EmbeddedPostgres, NoStore

    db = config.database
    embedded = None
    dsn = db.url
    where = database_name(dsn)
    if not dsn:
        embedded = EmbeddedPostgres(Path(config.data_dir))
        where = str(embedded.data_dir)
        dsn = await asyncio.to_thread(embedded.acquire, create=create)
    watchdog = (asyncio.get_running_loop().create_task(embedded.supervise())
                if embedded is not None and supervise else None)
    try:
        store = await Store.connect(dsn, min_size=min(db.pool_min, max_size or db.pool_max),
                                    max_size=max_size or db.pool_max,
                                    command_timeout=db.command_timeout,
                                    connect_timeout=db.connect_timeout, migrate=False)
        try:
            if not await store.has_schema():
                if not create:
                    raise NoStore(where, "the database has no smki-repository schema: check"
                                  " --data-dir, --config or SMKI_DATABASE__URL; `serve` or"
                                  " `demo` creates a store")
                log.info("created a new store in %s", where)
            await store.migrate()
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
