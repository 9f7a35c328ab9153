"""Documents: a new version of a named document (lodging only; every read is served from
the read replica)."""

from __future__ import annotations

from typing import Any

from repository_server import events
from repository_server.store.audit import write as audit_write
from repository_server.store.pool import _CHANGE_LOCK, StoreBase, notify, record_change


class DocumentStore(StoreBase):
    async def insert_document(self, name: str, content_type: str, body: bytes, sha256: bytes,
                              *, lodged_by: str, audit: dict[str, Any]
                              ) -> tuple[str, int, int, list[events.Event]]:
        """New version of a document, or ('identical', version) if the current one matches;
        then the change-log sequence number (0 if identical) and the change events sent."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", _CHANGE_LOCK)
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                               "doc:" + name)
            current = await conn.fetchrow(
                "SELECT version, sha256, content_type FROM documents WHERE name = $1"
                " ORDER BY version DESC LIMIT 1", name)
            if current and current["sha256"] == sha256 and current["content_type"] == content_type:
                await audit_write(conn, **{**audit, "outcome": "noop"})
                return "identical", int(current["version"]), 0, []
            version = int(current["version"]) + 1 if current else 1
            doc_id = await conn.fetchval(
                "INSERT INTO documents (name, version, content_type, body, size, sha256, lodged_by)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                name, version, content_type, body, len(body), sha256, lodged_by)
            await audit_write(conn, **{**audit, "detail": {**audit.get("detail", {}),
                                                           "version": version}})
            seq = await record_change(conn, "doc", ids=[doc_id])
            event = events.DocumentLodged(name)
            await notify(conn, event)
        return "stored", version, seq, [event]
