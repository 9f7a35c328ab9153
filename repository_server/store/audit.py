"""The audit trail: one row per outcome of every write and refusal, written in the same
transaction as what it records (`write`) or on its own (`AuditStore.audit`)."""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from repository_server.store.pool import StoreBase


async def write(conn: asyncpg.Connection, *, actor: str, action: str, outcome: str,
                object: str | None = None, peer: str | None = None,
                on_behalf_of: str | None = None, detail: dict[str, Any] | None = None) -> None:
    """An audit entry inside the caller's transaction."""
    # Audit text comes partly from clients (paths, names): PostgreSQL text and jsonb
    # cannot hold NUL, which must not turn a refusal into an error.
    def clean(value: str | None) -> str | None:
        return value.replace("\x00", "\ufffd") if value else value

    await conn.execute(
        "INSERT INTO audit (actor, on_behalf_of, action, outcome, object, peer, detail)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7::text::jsonb)",
        clean(actor), clean(on_behalf_of), action, outcome, clean(object), clean(peer),
        json.dumps(detail or {}).replace("\\u0000", "\\ufffd"))


class AuditStore(StoreBase):
    async def audit(self, **entry: Any) -> None:
        """An audit entry on its own (refusals, failed validations)."""
        async with self.pool.acquire() as conn:
            await write(conn, **entry)

    async def audit_entries(self, since_id: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            "SELECT * FROM audit WHERE id > $1 ORDER BY id LIMIT $2", since_id, limit)
        return [dict(r) for r in rows]
