"""Certificates: the few reads not served from the read replica (issuer lookups for
lodging, by serial for operator commands) and the lodging writes (new certificates, status
changes), which only `lodging/` calls."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from repository_server import events
from repository_server.store.audit import write as audit_write
from repository_server.store.models import (
    CERT_COLUMNS,
    CERT_ROW_COLS,
    CertRow,
    ConflictError,
    IssuerRow,
    NewCertificate,
)
from repository_server.store.pool import _CHANGE_LOCK, StoreBase, copy_records, notify, record_change


class CertificateStore(StoreBase):
    # -- reads (every other read of what is lodged goes through the node's replica) -----------
    async def certificates_by_serial(self, serial: str) -> list[CertRow]:
        rows = await self.pool.fetch(
            f"SELECT {CERT_ROW_COLS} FROM certificates WHERE serial = $1 ORDER BY id", serial)
        return [CertRow(*r) for r in rows]

    async def certificate_count(self) -> int:
        return int(await self.pool.fetchval("SELECT count(*) FROM certificates"))

    async def issuers(self, *, key_id: bytes | None = None, subject_dn: bytes | None = None,
                      cas_only: bool = True) -> list[IssuerRow]:
        """Certificates that may have issued something: CAs by default, any by key id."""
        sql = "SELECT id, subject_dn, subject_key_id, kind, der FROM certificates WHERE true"
        args: list[Any] = []
        if cas_only:
            sql += " AND kind IN ('root', 'ca')"
        if key_id is not None:
            args.append(key_id)
            sql += f" AND subject_key_id = ${len(args)}"
        if subject_dn is not None:
            args.append(subject_dn)
            sql += f" AND subject_dn = ${len(args)}"
        rows = await self.pool.fetch(sql + " ORDER BY id", *args)
        return [IssuerRow(*r) for r in rows]

    # -- writes (lodging/ only) ---------------------------------------------------------------
    async def insert_certificates(
        self, records: Sequence[NewCertificate], *, lodged_by: str, audit: dict[str, Any],
    ) -> tuple[list[int], list[int], list[events.Event], int]:
        """Store a batch atomically. Returns (indexes stored, indexes already present, the
        change events sent: SerialsShared for serials now held under two issuers,
        CertificatesLodged for the id range the new rows fall in; the change-log sequence
        number: 0 when nothing was stored).

        Raises ConflictError (and stores nothing) when a record has the issuer and serial
        of a different stored certificate. Committed (and so durable: synchronous_commit)
        before it returns.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", _CHANGE_LOCK)
            # Every id this batch takes is above the sequence's value now (sequences are not
            # transactional), and at most its value after the insert: readers drop what they
            # cached for the EUI-64s lodged in that range (a superset of ours, harmlessly).
            id_floor = int(await conn.fetchval("SELECT last_value - 1 FROM certificates_id_seq"))
            stored, identical = await self._insert(conn, records, lodged_by)
            shared = await self._shared_serials(conn, {records[i].serial for i in stored})
            await audit_write(conn, **audit)
            sent: list[events.Event] = []
            seq = 0
            if shared:
                sent.append(events.SerialsShared(tuple(shared)))
            if stored:
                id_ceiling = int(await conn.fetchval("SELECT last_value FROM certificates_id_seq"))
                sent.append(events.CertificatesLodged(id_floor, id_ceiling))
                seq = await record_change(conn, "certs", lo=id_floor, hi=id_ceiling, xact=True)
            for event in sent:
                await notify(conn, event)
        return stored, identical, sent, seq

    async def _insert(self, conn: asyncpg.Connection, records: Sequence[NewCertificate],
                      lodged_by: str) -> tuple[list[int], list[int]]:
        """New certificates (the common case) are COPYed straight into the table under a
        savepoint: for PostgreSQL about a third of the work of the general path. Any unique
        violation (identical bytes, a conflict, a duplicate in the batch) rolls back to the
        savepoint and the general path sorts it out. Returns (indexes stored, identical)."""
        direct_cols = [c for c in CERT_COLUMNS if c != "idx"] + ["lodged_by"]
        try:
            async with conn.transaction():
                await copy_records(conn, "certificates",  # every column but idx
                                   [(*r[1:], lodged_by) for r in records],
                                   direct_cols, self.command_timeout)
            return list(range(len(records))), []
        except asyncpg.UniqueViolationError:
            return await self._insert_general(conn, records, lodged_by)

    @staticmethod
    async def _shared_serials(conn: asyncpg.Connection, serials: set[str]) -> list[str]:
        """Of these serials, those now stored under two issuers: caches holding one must
        learn of the sibling (rare: serials are random 16 octets). One index probe per
        serial, whatever plan PostgreSQL caches for this prepared statement (`serial =
        ANY($1)` may get a generic plan that scans the whole table)."""
        if not serials:
            return []
        return [r["s"] for r in await conn.fetch(
            "SELECT s FROM unnest($1::text[]) AS s WHERE"
            " (SELECT count(*) FROM certificates c WHERE c.serial = s) > 1 LIMIT 200",
            list(serials))]

    async def _insert_general(self, conn: asyncpg.Connection, records: Sequence[NewCertificate],
                              lodged_by: str) -> tuple[list[int], list[int]]:
        """Through a temporary table: conflicts refused, identical bytes and in-batch
        duplicates reported as identical. Returns (indexes stored, indexes identical)."""
        await conn.execute(
            "CREATE TEMPORARY TABLE incoming (LIKE certificates INCLUDING DEFAULTS,"
            " idx integer NOT NULL) ON COMMIT DROP")
        await conn.execute("ALTER TABLE incoming DROP COLUMN id, DROP COLUMN lodged_at,"
                           " DROP COLUMN lodged_by")
        await copy_records(conn, "incoming", records, CERT_COLUMNS, self.command_timeout)
        await conn.execute("ANALYZE incoming")
        conflicts = await conn.fetch(
            "SELECT i.idx FROM incoming i JOIN certificates c"
            " ON c.serial = i.serial AND c.issuer_dn = i.issuer_dn AND c.sha256 <> i.sha256"
            " UNION SELECT i.idx FROM incoming i JOIN incoming j"
            " ON j.serial = i.serial AND j.issuer_dn = i.issuer_dn AND j.sha256 <> i.sha256")
        if conflicts:
            raise ConflictError("a different certificate with the same issuer and serial"
                                " exists", sorted(r["idx"] for r in conflicts))
        present = {r["idx"] for r in await conn.fetch(
            "SELECT i.idx FROM incoming i WHERE EXISTS"
            " (SELECT 1 FROM certificates c WHERE c.sha256 = i.sha256)")}
        cols = ", ".join(c for c in CERT_COLUMNS if c != "idx")
        inserted = {r["sha256"] for r in await conn.fetch(
            f"INSERT INTO certificates ({cols}, lodged_by)"
            f" SELECT DISTINCT ON (sha256) {cols}, $1 FROM incoming ORDER BY sha256, idx"
            " ON CONFLICT DO NOTHING RETURNING sha256", lodged_by)}
        stored: list[int] = []
        identical: list[int] = []
        lost: list[int] = []
        seen: set[bytes] = set()
        for i, rec in enumerate(records):
            sha = rec.sha256
            if sha in inserted and sha not in seen:
                stored.append(i)
            elif sha in inserted or i in present:
                identical.append(i)
            else:
                lost.append(i)
            seen.add(sha)
        if lost:
            # Neither stored nor there before: a concurrent writer got there first.
            # Identical bytes are a no-op; anything else is a conflict.
            again = {r["idx"] for r in await conn.fetch(
                "SELECT i.idx FROM incoming i JOIN certificates c ON c.sha256 = i.sha256"
                " WHERE i.idx = ANY($1::int[])", lost)}
            bad = [i for i in lost if i not in again]
            if bad:
                raise ConflictError("a different certificate with the same issuer and"
                                    " serial exists", bad)
            identical = sorted(identical + lost)
        return stored, identical

    async def set_status(self, serial: str, issuer_key_id: bytes | None, status: str | None,
                         manufacturing_flag: bool | None, audit: dict[str, Any]
                         ) -> tuple[list[dict[str, Any]], int, list[events.Event]]:
        """Change a certificate's lodged status and/or flag. Returns the rows changed (one,
        or none if there is no such certificate), the change-log sequence number and the
        change events sent."""
        seq = 0
        sent: list[events.Event] = []
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", _CHANGE_LOCK)
            rows = await conn.fetch(
                "UPDATE certificates SET status = coalesce($3, status),"
                " manufacturing_flag = coalesce($4, manufacturing_flag),"
                " changed_seq = nextval('certificate_changes_seq')"
                " WHERE serial = $1 AND ($2::bytea IS NULL OR issuer_key_id = $2)"
                " RETURNING id, serial, issuer_key_id, status, manufacturing_flag, eui64",
                serial, issuer_key_id, status, manufacturing_flag)
            if len(rows) == 1:
                await audit_write(conn, **audit)
                seq = await record_change(conn, "status", ids=[rows[0]["id"]])
                sent.append(events.StatusChanged(serial, rows[0]["eui64"] or None))
                await notify(conn, sent[0])
            elif len(rows) > 1:
                raise ConflictError("serial is not unique: give the issuer key id")
            return [dict(r) for r in rows], seq, sent

