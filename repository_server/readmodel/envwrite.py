"""The read replica's write side: what one change does to the LMDB environment, inside one
write transaction (`Writer`: certificates and their indexes, statuses, CRLs, documents), and
the meta record the feeder keeps there (`Meta`: what is applied, when it was checked). The
environment, its sub-databases and the reads are `readmodel.env`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from repository_server.readmodel import records as rec
from repository_server.readmodel.records import CrlRecord, DocRecord


@dataclass(frozen=True, slots=True)
class Meta:
    format: int
    source: str  # the repository's identity (PostgreSQL: repository_identity)
    applied: int  # the last change applied (sequence number)
    head: int  # the newest change the feeder saw in PostgreSQL
    checked_us: int  # when the feeder last looked (0: never)
    pending_since_us: int  # when the oldest change not yet applied was made (0: none)
    built_us: int
    ready: bool


def u64(value: bytes | None) -> int:
    return int.from_bytes(value, "big") if value else 0


def read_meta(txn: Any, db: Any) -> Meta:
    g = txn.get
    return Meta(u64(g(b"format", db=db)), (g(b"source", db=db) or b"").decode(),
                u64(g(b"applied", db=db)), u64(g(b"head", db=db)),
                u64(g(b"checked", db=db)), u64(g(b"pending_since", db=db)),
                u64(g(b"built", db=db)), g(b"ready", db=db) == b"1")


class Writer:
    """What a change does to the replica, inside one write transaction."""

    def __init__(self, txn: Any, dbs: dict[str, Any]) -> None:
        self.txn = txn
        self.db = dbs

    def meta(self) -> Meta:
        return read_meta(self.txn, self.db["meta"])

    def set_meta(self, **values: int | str | bool) -> None:
        db = self.db["meta"]
        for name, value in values.items():
            key = name.encode()
            if isinstance(value, bool):
                data = b"1" if value else b"0"
            elif isinstance(value, int):
                data = value.to_bytes(8, "big")
            else:
                data = value.encode()
            self.txn.put(key, data, db=db)

    def put_cert(self, cert_id: int, value: bytes, *, serial: str, eui64: bytes | None,
                 kind: str, sha256: bytes, subject_key_id: bytes | None, extra: bytes,
                 append: bool = False, indexes: bool = True) -> bool:
        """Store one certificate and its index entries (`indexes`; a build appends them
        afterwards, sorted: `append_index`); False if it was there already."""
        put = self.txn.put
        key = rec.id_key(cert_id)
        if not put(key, value, db=self.db["certs"], overwrite=False, append=append):
            return False
        put(key, extra, db=self.db["extra"], append=append)
        if not indexes:
            unit = rec.unit_of(kind, eui64, subject_key_id)
            if unit == "cas":
                put(key, b"", db=self.db["cas"])
            elif unit == "other":
                put(key, b"", db=self.db["other"], append=append)
            return True
        serial_key = serial.encode()
        siblings = self.txn.get(serial_key, db=self.db["serial"])
        put(serial_key, key if siblings is None else siblings + key, db=self.db["serial"])
        unit = rec.unit_of(kind, eui64, subject_key_id)
        if unit in ("devices", "organisations"):
            assert eui64 is not None
            subject = rec.subject_key(unit == "devices", eui64)
            siblings = self.txn.get(subject, db=self.db["subject"])
            put(subject, key if siblings is None else siblings + key, db=self.db["subject"])
        elif unit == "cas":
            put(key, b"", db=self.db["cas"])
        else:
            put(key, b"", db=self.db["other"], append=append)
        put(sha256, key, db=self.db["sha256"])
        if subject_key_id:
            put(subject_key_id, key, db=self.db["skid"])
        return True

    def put_search(self, items: list[tuple[bytes, bytes]]) -> None:
        """RFC 4387 index entries (search key, certificate id), sorted (they come a page of
        certificates at a time, so they cannot be appended)."""
        if items:
            with self.txn.cursor(db=self.db["search"]) as cur:
                cur.putmulti(items)

    def append_index(self, name: str, items: list[tuple[bytes, bytes]]) -> None:
        """Append (key, value) pairs in key order (then value order, for a dupsort index) to
        an index being built: no comparisons, no page splits, full pages."""
        if items:
            with self.txn.cursor(db=self.db[name]) as cur:
                _consumed, added = cur.putmulti(items, append=True)
            if added != len(items):
                raise ValueError(f"index {name}: {len(items) - added} entries out of order")

    def set_status(self, cert_id: int, status: str, manufacturing_flag: bool) -> bool:
        key = rec.id_key(cert_id)
        value = self.txn.get(key, db=self.db["certs"])
        if value is None:
            return False
        self.txn.put(key, rec.with_status(value, status, manufacturing_flag), db=self.db["certs"])
        return True

    def put_crl(self, crl: CrlRecord, revoked: Sequence[tuple[str, datetime, str | None]]) -> None:
        key = rec.crl_key(crl.issuer_key_id, crl.crl_number)
        put = self.txn.put
        put(key, rec.pack_crl(crl), db=self.db["crls"])
        put(rec.id_key(crl.id), key, db=self.db["crlid"])
        for serial, when, reason in revoked:
            put(rec.revoked_key(crl.id, serial), rec.pack_revoked(when, reason),
                db=self.db["revoked"])
        pointer = self.txn.get(crl.issuer_key_id, db=self.db["current"])
        if pointer is None or rec.unpack_current(pointer)[1] < crl.crl_number:
            put(crl.issuer_key_id, rec.pack_current(crl.id, crl.crl_number), db=self.db["current"])

    def put_doc(self, doc: DocRecord) -> None:
        self.txn.put(rec.doc_key(doc.name, doc.version), rec.pack_doc(doc), db=self.db["docs"])
