"""The SQL that feeds the node-local read replica (`replica/`): the change log, the rows a
change names, the whole store in id order (a build), and per-range digests (verify).

Functions take a connection rather than the pool: the feeder holds its own connection, to
the primary or to a streaming replica of it (`database.replica_url`), and reads a build or a
batch of changes inside one repeatable-read snapshot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

# Everything the replica keeps of a certificate (records.pack_cert and the portal's extras).
# Times as integer microseconds since the epoch: the replica's own form, so a build need
# not decode them into datetimes and back (a large share of its time).
FEED_CERT_COLS = (
    "id, serial, issuer_key_id, der, sha256, kind, eui64, role, usage, status,"
    " manufacturing_flag, subject_key_id, subject_name, issuer_name,"
    " (extract(epoch FROM lodged_at) * 1000000)::int8 AS lodged_us,"
    " (extract(epoch FROM not_before) * 1000000)::int8 AS not_before_us,"
    " (extract(epoch FROM not_after) * 1000000)::int8 AS not_after_us,"
    " lint::text, issuer_verified, trust_anchor, lodged_by")
_CRL_COLS = ("id, kind, issuer_key_id, issuer_name, crl_number, this_update, next_update, sha256,"
             " der, revoked_count, lodged_at")
_DOC_COLS = "id, name, version, content_type, size, sha256, lodged_at, body"

# A digest of one id range of certificates as the replica sees them (verify): the same text
# is hashed on both sides, one line per certificate.
DIGEST_BUCKET = 100_000


@dataclass(frozen=True, slots=True)
class Change:
    seq: int
    at: datetime
    kind: str  # certs | status | crl | doc
    lo: int | None
    hi: int | None
    xact: int | None
    ids: list[int]


async def identity(conn: asyncpg.Connection) -> str:
    return str(await conn.fetchval("SELECT id FROM repository_identity"))


async def head(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT coalesce(max(seq), 0) FROM changes"))


async def changes_after(conn: asyncpg.Connection, seq: int, limit: int) -> list[Change]:
    rows = await conn.fetch(
        "SELECT seq, at, kind, lo, hi, xact, ids FROM changes WHERE seq > $1 ORDER BY seq"
        " LIMIT $2", seq, limit)
    return [Change(r[0], r[1], r[2], r[3], r[4], r[5], list(r[6] or ())) for r in rows]


async def change_time(conn: asyncpg.Connection, seq: int) -> datetime | None:
    value: datetime | None = await conn.fetchval("SELECT at FROM changes WHERE seq = $1", seq)
    return value


async def lodged_certificates(conn: asyncpg.Connection, change: Change) -> list[asyncpg.Record]:
    """The certificates one `certs` change lodged."""
    return list(await conn.fetch(
        f"SELECT {FEED_CERT_COLS} FROM certificates WHERE id > $1 AND id <= $2"
        " AND lodge_xact = $3 ORDER BY id", change.lo, change.hi, change.xact))


async def certificate_states(conn: asyncpg.Connection,
                             ids: Sequence[int]) -> list[tuple[int, str, bool]]:
    rows = await conn.fetch(
        "SELECT id, status, manufacturing_flag FROM certificates WHERE id = ANY($1::bigint[])",
        list(ids))
    return [(r[0], r[1], r[2]) for r in rows]


async def certificates_page(conn: asyncpg.Connection, after_id: int,
                            limit: int) -> list[asyncpg.Record]:
    return list(await conn.fetch(
        f"SELECT {FEED_CERT_COLS} FROM certificates WHERE id > $1 ORDER BY id LIMIT $2",
        after_id, limit))


# The replica's indexes, each in the replica's key order (bytes; "C" collation for text), so
# that a build appends them: (index name, query giving key, value).
INDEX_QUERIES = {
    "serial": "SELECT convert_to(serial, 'UTF8'), string_agg(int8send(id), ''::bytea ORDER BY id)"
              " FROM certificates GROUP BY serial ORDER BY serial COLLATE \"C\"",
    "subject": "SELECT CASE kind WHEN 'device' THEN '\\x64'::bytea ELSE '\\x6f'::bytea END || eui64,"
               " string_agg(int8send(id), ''::bytea ORDER BY id) FROM certificates"
               " WHERE kind IN ('device', 'organisation') AND length(eui64) = 8"
               " GROUP BY kind, eui64 ORDER BY kind, eui64",
    "sha256": "SELECT sha256, int8send(id) FROM certificates ORDER BY sha256",
    "skid": "SELECT subject_key_id, int8send(id) FROM certificates"
            " WHERE length(subject_key_id) > 0 ORDER BY subject_key_id, id",
}


async def certificate_count(conn: asyncpg.Connection) -> int:
    """For a build's progress."""
    return int(await conn.fetchval("SELECT count(*) FROM certificates"))


async def crls(conn: asyncpg.Connection, ids: Sequence[int] | None = None) -> list[asyncpg.Record]:
    if ids is None:
        return list(await conn.fetch(f"SELECT {_CRL_COLS} FROM crls ORDER BY id"))
    return list(await conn.fetch(f"SELECT {_CRL_COLS} FROM crls WHERE id = ANY($1::bigint[])"
                                 " ORDER BY id", list(ids)))


async def revoked_entries(conn: asyncpg.Connection,
                          crl_id: int) -> list[tuple[str, datetime, str | None]]:
    rows = await conn.fetch(
        "SELECT serial, revocation_date, reason FROM revoked_entries WHERE crl_id = $1", crl_id)
    return [(r[0], r[1], r[2]) for r in rows]


async def documents(conn: asyncpg.Connection,
                    ids: Sequence[int] | None = None) -> list[asyncpg.Record]:
    if ids is None:
        return list(await conn.fetch(f"SELECT {_DOC_COLS} FROM documents ORDER BY id"))
    return list(await conn.fetch(f"SELECT {_DOC_COLS} FROM documents WHERE id = ANY($1::bigint[])"
                                 " ORDER BY id", list(ids)))


async def certificate_digests(conn: asyncpg.Connection) -> dict[int, tuple[int, str]]:
    """Per id bucket (id // DIGEST_BUCKET): (count, md5 of one line per certificate:
    id, sha256 hex, lodged status, flag)."""
    rows = await conn.fetch(
        "SELECT id / $1 AS b, count(*), md5(string_agg(id::text || ' ' || encode(sha256, 'hex')"
        " || ' ' || status || ' ' || (CASE WHEN manufacturing_flag THEN 't' ELSE 'f' END)"
        " || E'\\n', '' ORDER BY id)) FROM certificates GROUP BY 1 ORDER BY 1", DIGEST_BUCKET)
    return {int(r[0]): (int(r[1]), str(r[2])) for r in rows}


async def other_counts(conn: asyncpg.Connection) -> dict[str, Any]:
    row = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM crls), (SELECT count(*) FROM revoked_entries),"
        " (SELECT count(*) FROM documents),"
        " (SELECT md5(string_agg(encode(sha256, 'hex'), ',' ORDER BY id)) FROM crls),"
        " (SELECT md5(string_agg(encode(sha256, 'hex'), ',' ORDER BY id)) FROM documents)")
    return {"crls": int(row[0]), "revoked": int(row[1]), "docs": int(row[2]),
            "crl_digest": row[3] or "", "doc_digest": row[4] or ""}
