"""An extract's pages read from the node's read replica instead of PostgreSQL.

The writer takes the extract's markers on PostgreSQL (under the change lock, as always: they
are the cluster's record of what each extract covers), then asks `ready(head)`: is this
node's replica caught up to at least the change-log head read after the markers were taken?
Every certificate, CRL and document at or below the markers was committed before then, so a
replica at that head holds them all, and each page (one LMDB read transaction, bounded above
by the markers like the SQL pages) holds exactly the rows the SQL page would. The rows are
turned into the store's row types so that `extracts.format` writes the very same bytes.

What is not here: the certificates whose status changed since the previous extract (a
delta's `"change": "status"` records). The replica keeps each certificate's status but not
the number of the change that set it (`certificates.changed_seq`), so those few rows still
come from PostgreSQL, through its index on changed_seq.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from repository_server.readmodel.env import Replica, ReplicaUnavailable
from repository_server.readmodel.records import CertRecord, from_us
from repository_server.store.models import CertRow, CrlRow, DocumentRow

log = logging.getLogger(__name__)


def cert_row(c: CertRecord) -> CertRow:
    """The store's row of a replica certificate record (the same fields, times as datetimes)."""
    return CertRow(c.id, c.serial, c.issuer_key_id, c.der, c.sha256, from_us(c.lodged_us),
                   c.kind, c.eui64, c.role, c.usage, c.lodged_status, c.manufacturing_flag,
                   from_us(c.not_after_us), from_us(c.not_before_us), c.subject_key_id,
                   c.subject_name, c.issuer_name)


class ReplicaPages:
    """The keyset pages of an extract (`ExtractPages`), from a replica.

    `sync(upto)` applies the change log up to at least `upto` to the replica and returns the
    replica's applied change (the feeder's `catch_up`); `usable()` says whether the replica
    is open and complete (a node whose replica is being built extracts from PostgreSQL)."""

    def __init__(self, replica: Replica, sync: Callable[[int], Awaitable[int]],
                 usable: Callable[[], bool] = lambda: True, *,
                 catch_up_seconds: float = 30.0) -> None:
        self.replica = replica
        self.sync = sync
        self.usable = usable
        self.catch_up_seconds = catch_up_seconds  # a feed from a lagging standby: then SQL

    async def ready(self, head: int) -> bool:
        """Whether the replica holds every change up to `head` (caught up first). False, and
        the extract is read from PostgreSQL, if it is not usable or does not get there within
        `catch_up_seconds` (its feed, a streaming replica, lagging)."""
        if not self.usable():
            log.warning("extract: the read replica is not ready; reading PostgreSQL")
            return False
        deadline = time.monotonic() + self.catch_up_seconds
        while True:
            try:
                applied = await self.sync(head)
            except Exception as exc:  # (any: the extract then reads PostgreSQL)
                log.warning("extract: the read replica cannot catch up (%s: %s); reading"
                            " PostgreSQL", type(exc).__name__, exc)
                return False
            if applied >= head:
                return True
            if time.monotonic() >= deadline:
                log.warning("extract: the read replica is at change %d, not %d, after %.0f s;"
                            " reading PostgreSQL", applied, head, self.catch_up_seconds)
                return False
            await asyncio.sleep(0.2)

    async def extract_certificates_page(self, after_id: int, upto_id: int,
                                        limit: int) -> list[CertRow]:
        def page() -> list[CertRow]:
            return [cert_row(c) for c in self.replica.certificates_between(after_id, upto_id,
                                                                            limit)]
        return await asyncio.to_thread(page)

    async def extract_crls_page(self, after_id: int, upto_id: int, limit: int) -> list[CrlRow]:
        return await asyncio.to_thread(self.replica.crls_between, after_id, upto_id, limit)

    async def extract_documents_page(self, after_id: int, upto_id: int,
                                     limit: int) -> list[tuple[int, DocumentRow]]:
        def page() -> list[tuple[int, DocumentRow]]:
            return [(d.id, DocumentRow(d.name, d.version, d.content_type, d.size, d.sha256,
                                       d.lodged_at, d.body))
                    for d in self.replica.documents_between(after_id, upto_id, limit)]
        return await asyncio.to_thread(page)


__all__ = ["ReplicaPages", "ReplicaUnavailable", "cert_row"]
