"""Extracts: the producer lock, the markers an extract covers, keyset pages of what it
holds (bounded memory whatever the store's size) and the extracts' own bookkeeping."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from repository_server.store.models import (
    CERT_ROW_COLS,
    CRL_COLS,
    DOC_COLS,
    EXTRACT_COLS,
    CertRow,
    CrlRow,
    DocumentRow,
    ExtractMarkers,
    ExtractRow,
    crl_row,
    extract_row,
)
from repository_server.store.pool import _CHANGE_LOCK, _EXTRACT_LOCK, StoreBase, unlock


class ExtractStore(StoreBase):
    @contextlib.asynccontextmanager
    async def extract_lock(self, *, wait: bool) -> AsyncIterator[bool]:
        """The cluster-wide extract producer lock, held on one connection for the duration:
        yields whether it was obtained (always, with `wait`)."""
        async with self.pool.acquire() as conn:
            if wait:
                await conn.execute("SELECT pg_advisory_lock($1)", _EXTRACT_LOCK)
                got = True
            else:
                got = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", _EXTRACT_LOCK))
            try:
                yield got
            finally:
                if got:
                    await unlock(conn, _EXTRACT_LOCK)

    async def extract_markers(self) -> ExtractMarkers:
        """The highest ids and change number now, taken with no lodging in flight."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _CHANGE_LOCK)
            r = await conn.fetchrow(
                "SELECT (SELECT coalesce(max(id), 0) FROM certificates),"
                " (SELECT coalesce(max(changed_seq), 0) FROM certificates),"
                " (SELECT coalesce(max(id), 0) FROM crls),"
                " (SELECT coalesce(max(id), 0) FROM documents)")
        return ExtractMarkers(int(r[0]), int(r[1]), int(r[2]), int(r[3]))

    async def extract_change_head(self) -> int:
        """The newest change-log number (read after `extract_markers`: a read replica that has
        applied it holds everything at or below the markers)."""
        return int(await self.pool.fetchval("SELECT coalesce(max(seq), 0) FROM changes"))

    async def extract_certificates_page(self, after_id: int, upto_id: int,
                                        limit: int) -> list[CertRow]:
        rows = await self.pool.fetch(
            f"SELECT {CERT_ROW_COLS} FROM certificates WHERE id > $1 AND id <= $2"
            " ORDER BY id LIMIT $3", after_id, upto_id, limit)
        return [CertRow(*r) for r in rows]

    async def extract_changed_page(self, after_change: int, upto_change: int, id_upto: int,
                                   limit: int) -> list[tuple[int, CertRow]]:
        """Certificates with id <= id_upto whose status changed in (after, upto], by change."""
        rows = await self.pool.fetch(
            f"SELECT changed_seq, {CERT_ROW_COLS} FROM certificates WHERE changed_seq > $1"
            " AND changed_seq <= $2 AND id <= $3 ORDER BY changed_seq LIMIT $4",
            after_change, upto_change, id_upto, limit)
        return [(int(r[0]), CertRow(*r[1:])) for r in rows]

    async def extract_crls_page(self, after_id: int, upto_id: int, limit: int) -> list[CrlRow]:
        rows = await self.pool.fetch(
            f"SELECT {CRL_COLS} FROM crls WHERE id > $1 AND id <= $2 ORDER BY id LIMIT $3",
            after_id, upto_id, limit)
        return [crl_row(r) for r in rows]

    async def extract_documents_page(self, after_id: int, upto_id: int,
                                     limit: int) -> list[tuple[int, DocumentRow]]:
        rows = await self.pool.fetch(
            f"SELECT id, {DOC_COLS}, body FROM documents WHERE id > $1 AND id <= $2"
            " ORDER BY id LIMIT $3", after_id, upto_id, limit)
        return [(int(r[0]), DocumentRow(*r[1:])) for r in rows]

    async def extract_next_id(self) -> int:
        return int(await self.pool.fetchval("SELECT nextval('extracts_id_seq')"))

    async def extract_begin(self, extract_id: int, name: str, kind: str, slot: str | None,
                            previous_id: int | None, upto: ExtractMarkers) -> None:
        await self.pool.execute(
            "INSERT INTO extracts (id, name, kind, slot, previous_id, cert_id_upto, change_upto,"
            " crl_id_upto, document_id_upto) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            extract_id, name, kind, slot, previous_id, upto.cert_id, upto.change, upto.crl_id,
            upto.document_id)

    async def extract_published(self, extract_id: int, size: int, sha256: bytes,
                                counts: dict[str, Any]) -> None:
        await self.pool.execute(
            "UPDATE extracts SET state = 'published', published_at = now(), size = $2,"
            " sha256 = $3, counts = $4::text::jsonb WHERE id = $1",
            extract_id, size, sha256, json.dumps(counts))

    async def extract_failed(self, extract_id: int | None = None) -> int:
        """Mark one extract, or (None) every one still 'producing', as failed: called under
        the producer lock, when none can really be in production."""
        status = await self.pool.execute(
            "UPDATE extracts SET state = 'failed' WHERE state = 'producing'"
            " AND ($1::bigint IS NULL OR id = $1)", extract_id)
        return int(status.split()[-1])

    async def extract_removed(self, ids: Sequence[int]) -> None:
        await self.pool.execute(
            "UPDATE extracts SET state = 'removed', removed_at = now() WHERE id = ANY($1::bigint[])",
            list(ids))

    async def extracts(self, states: Sequence[str] = ("published",)) -> list[ExtractRow]:
        """Extracts in these states, newest first."""
        rows = await self.pool.fetch(
            f"SELECT {EXTRACT_COLS} FROM extracts WHERE state = ANY($1::text[]) ORDER BY id DESC",
            list(states))
        return [extract_row(r) for r in rows]

    async def extract_latest(self) -> ExtractRow | None:
        """The newest extract produced (published, or published and since removed): where the
        next delta starts."""
        r = await self.pool.fetchrow(
            f"SELECT {EXTRACT_COLS} FROM extracts WHERE state IN ('published', 'removed')"
            " ORDER BY id DESC LIMIT 1")
        return extract_row(r) if r else None

    async def extract_slot_taken(self, slot: str) -> bool:
        return bool(await self.pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM extracts WHERE slot = $1 AND state <> 'failed')", slot))
