"""Bulk load into an empty store (`import`, issue 13): the certificates table's non-unique
indexes are dropped before the COPYs and built once after them, instead of being updated
row by row (eleven indexes, most on random keys, made the import decay from 9,000/s at 2
million certificates to ~4,400/s averaged over 10 million).

Kept during the load: the primary key (ids only grow, so it costs little; CRLs reference
it) and the unique indexes, `certificates_sha256` and `certificates_issuer_serial`:
duplicate detection rests on them (a unique violation sends a chunk's COPY to the general
path, which reports identical bytes and refuses a different certificate under the same
issuer and serial), and so do the lookups of serials shared between issuers. The table has
no foreign keys of its own and its triggers fire only on UPDATE and DELETE; its CHECK
constraints are per-row and cheap, so nothing else is worth dropping.

Crash safety: each dropped index's definition goes into `deferred_indexes` in the same
transaction as its DROP, and its row leaves in the same transaction as the CREATE INDEX
that rebuilds it. An import killed at any moment leaves every certificate it committed
stored and readable (through the primary key and the unique indexes; the others only make
some lookups faster), and `finish_interrupted` builds what is missing at the next open of
the store. A running import holds the session advisory lock "SMKB"; an open that finds it
held leaves the building to that import.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

import asyncpg

from repository_server.store.pool import BoundedPool, StoreBase, unlock

log = logging.getLogger(__name__)

_BULK_LOCK = 0x534D4B42  # "SMKB": held (session) by an import loading an empty store
# Memory for each index build (a sort of up to 10^7 keys or more fits in it), and the
# parallel workers PostgreSQL may use beside the leader: the import's own workers are done.
BUILD_MEMORY = "1GB"
BUILD_PARALLEL_WORKERS = 1
_NO_TIMEOUT = 7 * 24 * 3600.0  # an index build over 10^8 rows takes as long as it takes

Note = Callable[[str], None]


async def _build(conn: asyncpg.Connection, note: Note) -> int:
    """Build every index `deferred_indexes` names, one transaction each (the CREATE and the
    row's DELETE together), then ANALYZE. Returns how many were built."""
    pending = await conn.fetch("SELECT name, definition FROM deferred_indexes ORDER BY name")
    if not pending:
        return 0
    started = time.perf_counter()
    for n, row in enumerate(pending, 1):
        t0 = time.perf_counter()
        note(f"building indexes: {n} of {len(pending)} ({row['name']}) ...")
        async with conn.transaction():
            await conn.execute(f"SET LOCAL maintenance_work_mem = '{BUILD_MEMORY}'")
            await conn.execute("SET LOCAL max_parallel_maintenance_workers ="
                               f" {BUILD_PARALLEL_WORKERS}")
            await conn.execute("SET LOCAL statement_timeout = 0")
            await conn.execute(f"DROP INDEX IF EXISTS {_quote(row['name'])}",
                               timeout=_NO_TIMEOUT)
            await conn.execute(row["definition"], timeout=_NO_TIMEOUT)
            await conn.execute("DELETE FROM deferred_indexes WHERE name = $1", row["name"])
        note(f"building indexes: {n} of {len(pending)} done ({row['name']},"
             f" {time.perf_counter() - t0:.1f} s)")
    await conn.execute("ANALYZE certificates", timeout=_NO_TIMEOUT)
    note(f"building indexes: {len(pending)} built in {time.perf_counter() - started:.1f} s")
    return len(pending)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def finish_interrupted(pool: BoundedPool, note: Note = log.info) -> int:
    """Build the indexes an interrupted bulk load left unbuilt (none: nothing to do), unless
    an import is loading right now (it builds them when it ends). Returns how many."""
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM deferred_indexes)"):
            return 0
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _BULK_LOCK):
            log.warning("the certificates table has indexes still to build: the import"
                        " loading the store (or another process opening it) builds them")
            return 0
        try:
            log.warning("an import into an empty store was interrupted: building the"
                        " certificates table's indexes it had dropped")
            return await _build(conn, note)
        finally:
            await unlock(conn, _BULK_LOCK)


class BulkLoad:
    """An empty store being loaded: the non-unique indexes are dropped (and listed in
    `deferred_indexes`) until `finish`. Holds one pooled connection and the lock "SMKB"."""

    def __init__(self, conn: asyncpg.Connection, held: contextlib.AsyncExitStack,
                 dropped: list[str]) -> None:
        self._conn = conn
        self._held = held
        self.dropped = dropped

    async def finish(self, note: Note) -> int:
        """Build the dropped indexes; the lock and connection go back. Returns how many."""
        try:
            return await _build(self._conn, note)
        finally:
            await self.close()

    async def close(self) -> None:
        """Give the lock and connection back without building (a failed import: the next
        open of the store builds them)."""
        await self._held.aclose()


class BulkLoadStore(StoreBase):
    async def begin_bulk_load(self) -> BulkLoad | None:
        """If the store holds no certificate (and no other import is loading it), drop the
        certificates table's non-unique indexes, recording each, in one transaction that
        locks the table against concurrent lodging while it checks and drops. None: the
        store is not empty; the import takes the ordinary path with every index kept."""
        async with contextlib.AsyncExitStack() as stack:
            conn = await stack.enter_async_context(self.pool.acquire())
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _BULK_LOCK):
                return None
            stack.push_async_callback(unlock, conn, _BULK_LOCK)
            async with conn.transaction():
                await conn.execute("LOCK TABLE certificates IN SHARE ROW EXCLUSIVE MODE")
                if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM certificates)"
                                       " OR EXISTS (SELECT 1 FROM deferred_indexes)"):
                    return None
                rows = await conn.fetch(
                    "SELECT c.relname AS name, pg_get_indexdef(i.indexrelid) AS definition"
                    " FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                    " WHERE i.indrelid = 'certificates'::regclass"
                    " AND NOT i.indisunique AND NOT i.indisprimary ORDER BY c.relname")
                for r in rows:
                    await conn.execute("INSERT INTO deferred_indexes (name, definition)"
                                       " VALUES ($1, $2)", r["name"], r["definition"])
                    await conn.execute(f"DROP INDEX {_quote(r['name'])}")
            return BulkLoad(conn, stack.pop_all(), [r["name"] for r in rows])
        return None  # not reached (mypy: the exit stack may swallow nothing)
