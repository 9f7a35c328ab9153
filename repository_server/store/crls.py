"""CRLs and ARLs: a new version of an issuer's list, with its revoked entries (lodging
only; every read is served from the read replica)."""

from __future__ import annotations

import json
from typing import Any

from repository_server import events
from repository_server.pki.model import CrlInfo
from repository_server.store.audit import write as audit_write
from repository_server.store.models import ConflictError
from repository_server.store.pool import _CHANGE_LOCK, StoreBase, copy_records, notify, record_change


class CrlStore(StoreBase):
    async def insert_crl(self, info: CrlInfo, *, kind: str, issuer_key_id: bytes,
                         issuer_cert_id: int, lodged_by: str, audit: dict[str, Any],
                         lint: list[dict[str, str]]
                         ) -> tuple[str, int | None, int, list[events.Event]]:
        """Store a CRL version. Returns ('stored'|'identical', stored_max_before, change-log
        sequence number or 0, the change events sent).

        Raises ConflictError when the CRL number is not strictly greater than the stored one
        for this issuer (checked under a per-issuer advisory lock, so two lodgings of
        different CRLs cannot both pass the check)."""
        assert info.crl_number is not None
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", _CHANGE_LOCK)
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                               "crl:" + issuer_key_id.hex())
            existing = await conn.fetchval("SELECT id FROM crls WHERE sha256 = $1", info.sha256)
            current = await conn.fetchval(
                "SELECT max(crl_number) FROM crls WHERE issuer_key_id = $1", issuer_key_id)
            current_int = int(current) if current is not None else None
            if existing is not None:
                await audit_write(conn, **{**audit, "outcome": "noop"})
                return "identical", current_int, 0, []
            if current_int is not None and info.crl_number <= current_int:
                raise ConflictError(
                    f"CRL number {info.crl_number} is not greater than the stored"
                    f" {current_int} for this issuer")
            crl_id = await conn.fetchval(
                "INSERT INTO crls (kind, issuer_dn, issuer_name, issuer_key_id, issuer_cert_id,"
                " crl_number, this_update, next_update, sha256, der, revoked_count, lint,"
                " lodged_by) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12::text::jsonb,$13)"
                " RETURNING id",
                kind, info.issuer_dn, info.issuer_name, issuer_key_id, issuer_cert_id,
                info.crl_number, info.this_update, info.next_update, info.sha256, info.der,
                len(info.revoked), json.dumps(lint), lodged_by)
            if info.revoked:
                await copy_records(
                    conn, "revoked_entries",
                    [(crl_id, e.serial, e.revocation_date, e.reason) for e in info.revoked],
                    ("crl_id", "serial", "revocation_date", "reason"), self.command_timeout)
            await audit_write(conn, **audit)
            seq = await record_change(conn, "crl", ids=[crl_id])
            event = events.CrlLodged(issuer_key_id)
            await notify(conn, event)
        return "stored", current_int, seq, [event]
