"""The extract format, version 1: names, member paths, index records, the manifest, and the
retention rule. No I/O here (the writer streams, the scheduler decides when).

An extract is one tar file (`.tar`, or `.tar.gz` with gzip), members in this order:

  certificates/<sha256[0:2]>/<sha256[2:4]>/<sha256>.der   each certificate, DER as lodged
  crls/<issuer key id>/<crl number>.crl                    each CRL/ARL version, DER as lodged
  documents/<name>/<version>                               each document version, as lodged
  index.jsonl        one JSON object per certificate (fields: `cert_record`)
  crls.jsonl         one per CRL/ARL version (`crl_record`)
  documents.jsonl    one per document version (`document_record`)
  manifest.json      last: format, kind, markers, counts, SHA-256 of the three indexes

Beside the extracts, `.published.json` (LISTING) lists the published ones as the store's
`extracts` table does (`listing_body`): what `GET /extracts`, the portal and a restarted
node answer from, without PostgreSQL. Its name is not an extract's, so it is never served.

Every member is covered by a SHA-256: the DER members by the `sha256` of their index line
(which is the SHA-256 of the object itself), the indexes by the manifest. A full extract
holds everything up to its markers; a delta everything lodged after the previous extract's
markers, plus the certificates whose status or ManufacturingFlag changed since (with
`"change": "status"`). A record carries the state when it was read, which may be newer than
the markers: a later extract then states it again, so applying extracts in order (the
latest full, then every delta after it) always ends at the current state.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from repository_server.pki.ids import format_eui64, format_key_id
from repository_server.store.models import (
    CertRow,
    CrlRow,
    DocumentRow,
    ExtractMarkers,
    ExtractRow,
)

FORMAT = "smki-extract"
VERSION = 1
MANIFEST = "manifest.json"
INDEXES = ("index.jsonl", "crls.jsonl", "documents.jsonl")
PARTIAL_PREFIX = ".partial-"
LISTING = ".published.json"
LISTING_FORMAT = "smki-extract-listing"
NAME_RE = re.compile(r"^smki-extract-(\d{8}T\d{6}Z)-(full|delta)-(\d{6,})\.tar(\.gz)?$")


def extract_name(extract_id: int, kind: str, at: datetime, gzip: bool) -> str:
    stamp = at.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"smki-extract-{stamp}-{kind}-{extract_id:06d}.tar" + (".gz" if gzip else "")


def is_extract_name(name: str) -> bool:
    """A published extract's file name (never a `.partial-` one, never a path)."""
    return NAME_RE.match(name) is not None


def _time(value: datetime | None) -> str | None:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if value else None


def cert_member(sha256: bytes) -> str:
    h = sha256.hex()
    return f"certificates/{h[0:2]}/{h[2:4]}/{h}.der"


def crl_member(row: CrlRow) -> str:
    return f"crls/{format_key_id(row.issuer_key_id)}/{row.crl_number}.crl"


def document_member(row: DocumentRow) -> str:
    return f"documents/{row.name}/{row.version}"


def cert_record(row: CertRow, change: str) -> dict[str, Any]:
    """One index.jsonl line. `change`: "new" (lodged in this extract's range) or "status"
    (lodged earlier, status or flag changed since the previous extract)."""
    return {
        "serial": row.serial,
        "issuer_key_id": format_key_id(row.issuer_key_id) if row.issuer_key_id else None,
        "subject_key_id": format_key_id(row.subject_key_id) if row.subject_key_id else None,
        "eui64": format_eui64(row.eui64) if row.eui64 else None,
        "role": row.role,
        "usage": row.usage,
        "kind": row.kind,
        "status": row.status,
        "manufacturing_flag": row.manufacturing_flag,
        "not_before": _time(row.not_before),
        "not_after": _time(row.not_after),
        "subject": row.subject_name,
        "issuer": row.issuer_name,
        "sha256": row.sha256.hex(),
        "lodged_at": _time(row.lodged_at),
        "change": change,
        "member": cert_member(row.sha256),
    }


def crl_record(row: CrlRow) -> dict[str, Any]:
    return {
        "kind": row.kind,
        "issuer": row.issuer_name,
        "issuer_key_id": format_key_id(row.issuer_key_id),
        "crl_number": row.crl_number,
        "this_update": _time(row.this_update),
        "next_update": _time(row.next_update),
        "revoked_count": row.revoked_count,
        "sha256": row.sha256.hex(),
        "lodged_at": _time(row.lodged_at),
        "member": crl_member(row),
    }


def document_record(row: DocumentRow) -> dict[str, Any]:
    return {
        "name": row.name,
        "version": row.version,
        "content_type": row.content_type,
        "size": row.size,
        "sha256": row.sha256.hex(),
        "lodged_at": _time(row.lodged_at),
        "member": document_member(row),
    }


def manifest(*, name: str, kind: str, created_at: datetime, previous: str | None,
             since: ExtractMarkers | None, upto: ExtractMarkers, counts: dict[str, int],
             indexes: dict[str, dict[str, Any]], generator: str) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "name": name,
        "kind": kind,
        "created_at": _time(created_at),
        "previous": previous,
        "since": asdict(since) if since is not None else None,
        "upto": asdict(upto),
        "counts": counts,
        "members": indexes,
        "generator": generator,
    }


def to_remove(published: Sequence[tuple[int, str]], retain_full: int) -> list[int]:
    """Retention: keep the newest `retain_full` full extracts and every extract after the
    oldest of them; remove the rest. `published`: (id, kind) of published extracts, any
    order. Nothing goes while fewer fulls than that exist."""
    ordered = sorted(published, reverse=True)
    fulls = [i for i, kind in ordered if kind == "full"]
    if len(fulls) < retain_full:
        return []
    oldest_kept = fulls[retain_full - 1]
    return sorted(i for i, _kind in ordered if i < oldest_kept)


# -- the listing of published extracts (beside the files) -----------------------------------
def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None  # microseconds and offset kept


def _from_iso(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value is not None else None


def listing_body(rows: Sequence[ExtractRow]) -> bytes:
    """The published extracts (newest first, as `Store.extracts()` gives them), every field
    kept exactly, so that reading it back gives the same rows."""
    items = [{"id": r.id, "name": r.name, "kind": r.kind, "slot": r.slot, "state": r.state,
              "started_at": _iso(r.started_at), "published_at": _iso(r.published_at),
              "previous_id": r.previous_id, "upto": asdict(r.upto), "size": r.size,
              "sha256": r.sha256.hex() if r.sha256 is not None else None, "counts": r.counts}
             for r in rows]
    return json.dumps({"format": LISTING_FORMAT, "version": 1, "extracts": items},
                      indent=1).encode() + b"\n"


def parse_listing(body: bytes) -> list[ExtractRow]:
    """The rows of `listing_body`; ValueError if it is not one."""
    try:
        doc = json.loads(body)
        if doc.get("format") != LISTING_FORMAT or doc.get("version") != 1:
            raise ValueError("not an extract listing of version 1")
        out = []
        for i in doc["extracts"]:
            started = _from_iso(i["started_at"])
            if started is None:
                raise ValueError("an extract without started_at")
            out.append(ExtractRow(
                int(i["id"]), i["name"], i["kind"], i["slot"], i["state"], started,
                _from_iso(i["published_at"]), i["previous_id"], ExtractMarkers(**i["upto"]),
                i["size"], bytes.fromhex(i["sha256"]) if i["sha256"] is not None else None,
                i["counts"]))
        return out
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"extract listing: {exc}") from exc
