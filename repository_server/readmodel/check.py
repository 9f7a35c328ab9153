"""How a node's read replica stands against the store: `verify` compares them (certificates
by id bucket, CRLs and documents by digest; `replica verify`), `lag` says how far behind the
replica is (readiness, `/readyz`). The replica is kept up to date by `readmodel.feed`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from repository_server.jsontime import json_time
from repository_server.readmodel import records as rec
from repository_server.readmodel.env import Replica
from repository_server.store import feed as sql


@dataclass
class VerifyReport:
    store_applied: int  # the change-log head the comparison was made at
    replica_applied: int
    differences: list[str]

    @property
    def ok(self) -> bool:
        return not self.differences


def replica_digests(replica: Replica) -> dict[int, tuple[int, str]]:
    import hashlib

    out: dict[int, tuple[int, str]] = {}
    current: int | None = None
    h = hashlib.md5(usedforsecurity=False)
    n = 0
    with replica._read() as txn, txn.cursor(db=replica._db["certs"]) as cur:
        for key, value in cur:
            cert_id = rec.key_id(key)
            bucket = cert_id // sql.DIGEST_BUCKET
            if bucket != current:
                if current is not None:
                    out[current] = (n, h.hexdigest())
                current, h, n = bucket, hashlib.md5(usedforsecurity=False), 0
            c = rec.unpack_cert(cert_id, value)
            h.update(f"{cert_id} {c.sha_hex} {c.lodged_status} {'t' if c.manufacturing_flag else 'f'}\n"
                     .encode())
            n += 1
    if current is not None:
        out[current] = (n, h.hexdigest())
    return out


def _replica_others(replica: Replica) -> dict[str, Any]:
    import hashlib

    crl_rows: list[tuple[int, bytes]] = []
    with replica._read() as txn, txn.cursor(db=replica._db["crls"]) as cur:
        for key, value in cur:
            crl = rec.unpack_crl(key, value)
            crl_rows.append((crl.id, crl.sha256))
    docs = sorted((d.id, d.sha256) for d in replica._docs())
    counts = replica.counts()

    def digest(items: list[tuple[int, bytes]]) -> str:
        return hashlib.md5(",".join(s.hex() for _, s in sorted(items)).encode(),
                           usedforsecurity=False).hexdigest() if items else ""

    return {"crls": len(crl_rows), "revoked": counts["revoked"], "docs": len(docs),
            "crl_digest": digest(crl_rows), "doc_digest": digest(docs)}


async def verify(replica: Replica, conn: asyncpg.Connection) -> VerifyReport:
    """Compare the replica with the store, at the replica's applied change: caught up first
    if it is behind (the caller's job), then both read in one snapshot."""
    differences: list[str] = []
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        head = await sql.head(conn)
        store_digests = await sql.certificate_digests(conn)
        store_others = await sql.other_counts(conn)
        source = await sql.identity(conn)
    meta = replica.meta()
    if meta.source != source:
        differences.append(f"replica was built from repository {meta.source or '?'}, the store"
                           f" is {source}")
    if meta.applied != head:
        differences.append(f"replica has applied change {meta.applied}, the store is at {head}")
    ours = await asyncio.to_thread(replica_digests, replica)
    for bucket in sorted(set(store_digests) | set(ours)):
        lo, hi = bucket * sql.DIGEST_BUCKET, (bucket + 1) * sql.DIGEST_BUCKET - 1
        s = store_digests.get(bucket, (0, ""))
        r = ours.get(bucket, (0, ""))
        if s != r:
            differences.append(f"certificates with ids {lo}-{hi}: store has {s[0]}, replica"
                               f" {r[0]}" + ("" if s[0] != r[0] else " (same count, different"
                                             " contents: status, flag or bytes)"))
    others = await asyncio.to_thread(_replica_others, replica)
    for key in ("crls", "revoked", "docs", "crl_digest", "doc_digest"):
        if store_others[key] != others[key]:
            differences.append(f"{key}: store {store_others[key]!r}, replica {others[key]!r}")
    return VerifyReport(head, meta.applied, differences)


def lag(replica: Replica, now: float | None = None) -> dict[str, Any]:
    """How far behind the store this node's replica is (readiness)."""
    meta = replica.meta()
    now_us = int((now if now is not None else time.time()) * 1_000_000)
    behind = max(0, meta.head - meta.applied)
    return {"applied": meta.applied, "head": meta.head, "behind_changes": behind,
            "behind_seconds": round((now_us - meta.pending_since_us) / 1e6, 3)
            if behind and meta.pending_since_us else 0.0,
            "checked_seconds_ago": round((now_us - meta.checked_us) / 1e6, 3)
            if meta.checked_us else None,
            "built": json_time(datetime.fromtimestamp(meta.built_us / 1e6, UTC))
            if meta.built_us else None}
