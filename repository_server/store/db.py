"""The store of record: one `Store` over an asyncpg pool, composed of one class per area
(certificates, CRLs, documents, accounts, service levels, extracts, audit, schema), each in
its own module with all of its SQL. Services depend on the narrow Protocols of
`store/protocols.py`, not on this class; the read replica's feed has its own SQL in
`store/feed.py`.

Writes of lodged objects (certificates, statuses, CRLs, documents) are called only from
`lodging/`; the portal writes only its own sign-in state and a user's own password change.
Every write that changes what readers see sends a change event (`events.py`) on NOTIFY
inside its transaction, so caches on every process and node hear of it at commit time and
never before.
"""

from __future__ import annotations

import asyncpg

from repository_server.store.accounts import AccountStore
from repository_server.store.audit import AuditStore
from repository_server.store.bulkload import BulkLoadStore
from repository_server.store.certificates import CertificateStore
from repository_server.store.crls import CrlStore
from repository_server.store.documents import DocumentStore
from repository_server.store.extracts import ExtractStore
from repository_server.store.pool import BoundedPool, connection_setup, reset_connection
from repository_server.store.schema import SchemaStore
from repository_server.store.service_levels import ServiceLevelStore


class Store(SchemaStore, CertificateStore, CrlStore, DocumentStore, AccountStore,
            ServiceLevelStore, ExtractStore, AuditStore, BulkLoadStore):
    def __init__(self, pool: asyncpg.Pool, dsn: str, *, connect_timeout: float = 10.0,
                 command_timeout: float = 30.0, backend_pids: set[int] | None = None) -> None:
        self.pool = BoundedPool(pool, connect_timeout)
        self.dsn = dsn
        self.connect_timeout = connect_timeout  # also for the catalog's LISTEN connection
        self.command_timeout = command_timeout
        # The server process ids of the pool's open connections: a NOTIFY from one of them
        # was sent by this process.
        self.backend_pids = backend_pids if backend_pids is not None else set()

    @classmethod
    async def connect(cls, dsn: str, *, min_size: int = 2, max_size: int = 10,
                      command_timeout: float = 30.0, connect_timeout: float = 10.0,
                      migrate: bool = True) -> Store:
        backend_pids: set[int] = set()
        pool = await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size, command_timeout=command_timeout,
            timeout=connect_timeout, init=connection_setup(backend_pids), reset=reset_connection,
        )
        store = cls(pool, dsn, connect_timeout=connect_timeout, command_timeout=command_timeout,
                    backend_pids=backend_pids)
        if migrate:
            await store.migrate()
        return store

    async def close(self) -> None:
        await self.pool.close()
