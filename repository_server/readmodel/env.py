"""The node-local read replica: one memory-mapped LMDB environment that every worker process
of a node reads in place (no per-process certificate cache, no preload).

Readers open read transactions (MVCC: never blocked, never see half a write); one writer at a
time (LMDB's own lock, across processes) applies changes in sequence order, and the applied
sequence number is written in the same transaction as the change, so a reader sees a lodging
whole or not at all. Sub-databases:

```
meta      key -> value            format, source (repository id), applied, head, checked, ...
certs     id -> CertRecord        (records.pack_cert)
extra     id -> JSON              lint, issuer_verified, trust_anchor, lodged_by (portal)
serial    serial -> ids           (8 bytes each: every certificate with it, oldest first)
subject   d|o + EUI-64 -> ids     (8 bytes each, oldest first; walked in (EUI-64, id) order
                                    by the LDAP directory)
sha256    sha256 -> id
skid      subject key id -> id ...(dupsort)
cas       id -> ""                root and issuing CA certificates with a key id
other     id -> ""                certificates of ou=Other
crls      len+issuer key id + number -> CrlRecord   (last under a prefix: current)
crlid     crl id -> crls key
current   issuer key id -> crl id + number          (the current CRL/ARL of each issuer)
revoked   crl id + serial -> date, reason           (every version's entries)
docs      name \\0 version -> DocRecord
search    attribute + SHA-1[:8] -> id ...  (dupsort: RFC 4387 search keys, pki/certstore.py)
```
What a change writes into them is `readmodel.envwrite`; this module opens the environment
and reads it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import lmdb

from repository_server.readmodel import records as rec
from repository_server.readmodel.envwrite import Meta, Writer, read_meta, u64
from repository_server.readmodel.records import CertRecord, CrlRecord, DocRecord, RecordError

_DBS = ("meta", "certs", "extra", "serial", "subject", "sha256", "skid", "cas", "other", "crls",
        "crlid", "current", "revoked", "docs", "search")
_DUPSORT = ("skid", "search")


class ReplicaUnavailable(ConnectionError):
    """The replica cannot answer (not built yet, being rebuilt, damaged). An OSError, so
    every listener answers it as it answers an unreachable store: 503 / LDAP unavailable."""


@dataclass(frozen=True, slots=True)
class RevokedEntry:
    serial: str
    revocation_date: datetime
    reason: str | None
    lodged: bool  # a certificate with this serial is in the repository


class _ReadTxn:
    __slots__ = ("env", "txn")

    def __init__(self, env: Any) -> None:
        self.env = env
        self.txn: Any = None

    def __enter__(self) -> Any:
        try:
            self.txn = self.env.begin(buffers=False)
        except lmdb.Error as exc:
            raise ReplicaUnavailable(f"the read replica cannot be read: {exc}") from exc
        return self.txn

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.txn.abort()
        if exc is not None and isinstance(exc, lmdb.Error):
            raise ReplicaUnavailable(f"the read replica cannot be read: {exc}") from exc


class Replica:
    """One node's replica at `path` (a directory). Thread-safe for readers; writes go through
    `write()` (one at a time per environment; LMDB serialises writers across processes)."""

    def __init__(self, path: Path, *, map_size: int, readonly: bool = False) -> None:
        self.path = path
        self.map_size = map_size
        self.readonly = readonly
        self.env: Any = None
        self._db: dict[str, Any] = {}
        self._inode: int | None = None
        self._retired: list[tuple[Any, float]] = []

    # -- opening ---------------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.path / "data.mdb").is_file()

    def open(self) -> None:
        """Open (creating it empty if missing). Raises ReplicaUnavailable if the files are
        not an LMDB environment of ours (damaged: rebuild)."""
        if not self.readonly:
            self.path.mkdir(parents=True, exist_ok=True)
        try:
            env = lmdb.open(str(self.path), map_size=self.map_size, max_dbs=len(_DBS) + 2,
                            readonly=self.readonly, metasync=False, readahead=False,
                            max_readers=1024, create=not self.readonly, lock=True)
            dbs = {}
            with env.begin(write=not self.readonly) as txn:
                for name in _DBS:
                    dbs[name] = env.open_db(name.encode(), txn=txn, dupsort=name in _DUPSORT,
                                            dupfixed=name in _DUPSORT,
                                            create=not self.readonly)
        except lmdb.Error as exc:
            raise ReplicaUnavailable(f"replica at {self.path} cannot be opened: {exc}") from exc
        old = self.env
        self.env, self._db = env, dbs
        self._inode = self._current_inode()
        # A replaced environment may still be in use by a thread (a catch-up or heartbeat
        # that began before the swap): closed only a minute later.
        now = time.monotonic()
        for retired, since in list(self._retired):
            if now - since > 60:
                self._retired.remove((retired, since))
                with contextlib.suppress(Exception):
                    retired.close()
        if old is not None:
            self._retired.append((old, now))

    def close(self) -> None:
        for retired, _ in self._retired:
            with contextlib.suppress(Exception):
                retired.close()
        self._retired.clear()
        if self.env is not None:
            self.env.close()
            self.env = None

    def _current_inode(self) -> int | None:
        try:
            return os.stat(self.path / "data.mdb").st_ino
        except OSError:
            return None

    def replaced(self) -> bool:
        """Whether the files at `path` are no longer the ones open (a rebuild swapped them)."""
        inode = self._current_inode()
        return inode is not None and inode != self._inode

    def _read(self) -> _ReadTxn:
        """A read transaction, as a context manager (a class, not a generator: this is on
        every request's path and costs half as much)."""
        env = self.env
        if env is None:
            raise ReplicaUnavailable("the read replica is not open")
        return _ReadTxn(env)

    # -- meta --------------------------------------------------------------------------------
    def meta(self) -> Meta:
        with self._read() as txn:
            return self._meta(txn)

    def _meta(self, txn: Any) -> Meta:
        return read_meta(txn, self._db["meta"])

    def applied(self) -> int:
        with self._read() as txn:
            return u64(txn.get(b"applied", db=self._db["meta"]))

    # -- certificates ------------------------------------------------------------------------
    def _cert(self, txn: Any, id_bytes: bytes) -> CertRecord:
        value = txn.get(id_bytes, db=self._db["certs"])
        if value is None:
            raise ReplicaUnavailable(f"replica damaged: index names certificate"
                                     f" {rec.key_id(id_bytes)} that is not there (rebuild it)")
        return rec.unpack_cert(rec.key_id(id_bytes), value)

    def _prefixed(self, txn: Any, db: str, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) of every entry whose key starts with `prefix`, in key order."""
        with txn.cursor(db=self._db[db]) as cur:
            if cur.set_range(prefix):
                for key, value in cur:
                    if not key.startswith(prefix):
                        return
                    yield key, value

    def _dups(self, txn: Any, db: str, key: bytes) -> list[bytes]:
        with txn.cursor(db=self._db[db]) as cur:
            if not cur.set_key(key):
                return []
            return list(cur.iternext_dup())

    def _ids(self, txn: Any, ids: bytes | None) -> tuple[CertRecord, ...]:
        """The certificates an index value names (8-byte ids, concatenated)."""
        if not ids:
            return ()
        return tuple(self._cert(txn, ids[i:i + 8]) for i in range(0, len(ids), 8))

    def _serial_ids(self, txn: Any, serial: str) -> list[bytes]:
        ids = txn.get(serial.encode(), db=self._db["serial"])
        if not ids:
            return []
        return [ids[i:i + 8] for i in range(0, len(ids), 8)]

    def download(self, serial: str) -> tuple[bytes, str, str, bool] | None:
        """What a certificate download by serial sends: (DER, hex SHA-256, Last-Modified, public),
        with the least decoding (the hottest HTTP path); None unless exactly one
        certificate has this serial."""
        with self._read() as txn:
            ids = txn.get(serial.encode(), db=self._db["serial"])
            if ids is None or len(ids) != 8:
                return None
            value = txn.get(ids, db=self._db["certs"])
        if value is None:
            return None
        return rec.unpack_download(value)

    def certificates(self, serial: str) -> tuple[CertRecord, ...]:
        """Every certificate with this canonical serial (usually one), oldest first."""
        with self._read() as txn:
            return tuple(self._cert(txn, i) for i in self._serial_ids(txn, serial))

    def by_eui(self, eui64: bytes, device: bool) -> tuple[CertRecord, ...]:
        with self._read() as txn:
            return self._ids(txn, txn.get(rec.subject_key(device, eui64), db=self._db["subject"]))

    def subject_records(self, eui64: bytes, device: bool) -> list[bytes]:
        """`by_eui`'s certificates as their stored records, undecoded (see
        `records.CERT_HEAD`)."""
        env = self.env  # (no context manager: this is the LDAP short way's every search)
        if env is None:
            raise ReplicaUnavailable("the read replica is not open")
        try:
            txn = env.begin(buffers=False)
            try:
                ids = txn.get(rec.subject_key(device, eui64), db=self._db["subject"])
                if not ids:
                    return []
                certs = self._db["certs"]
                out = [txn.get(ids[i:i + 8], db=certs) for i in range(0, len(ids), 8)]
            finally:
                txn.abort()
        except lmdb.Error as exc:
            raise ReplicaUnavailable(f"the read replica cannot be read: {exc}") from exc
        if None in out:
            raise ReplicaUnavailable("replica damaged: the subject index names a certificate"
                                     " that is not there (rebuild it)")
        return out

    def by_sha256(self, sha256: bytes) -> list[CertRecord]:
        with self._read() as txn:
            found = txn.get(sha256, db=self._db["sha256"])
            return [self._cert(txn, found)] if found else []

    def search_filled(self) -> int:
        """The id of the last certificate `Feeder.fill_search` indexed (0: none yet)."""
        with self._read() as txn:
            return u64(txn.get(b"search_filled", db=self._db["meta"]))

    def search_ready(self) -> bool:
        """Whether the RFC 4387 index holds every certificate (`Feeder.fill_search`)."""
        with self._read() as txn:
            return bool(txn.get(b"search_ready", db=self._db["meta"]) == b"1")

    def certificates_after(self, after_id: int, limit: int) -> list[CertRecord]:
        """Certificates in id order after an id (a walk of the whole replica, a page at a
        time)."""
        out: list[CertRecord] = []
        with self._read() as txn, txn.cursor(db=self._db["certs"]) as cur:
            if cur.set_range(rec.id_key(after_id + 1)):
                for key, value in cur:
                    out.append(rec.unpack_cert(rec.key_id(key), value))
                    if len(out) >= limit:
                        break
        return out

    def certificates_between(self, after_id: int, upto_id: int,
                             limit: int) -> list[CertRecord]:
        """Certificates with after_id < id <= upto_id in id order, at most `limit`, in one
        read transaction (an extract's keyset page: the same rows as its SQL page)."""
        with self._read() as txn:
            return [rec.unpack_cert(rec.key_id(key), value) for key, value
                    in self._id_range(txn, "certs", after_id, upto_id, limit)]

    def _id_range(self, txn: Any, db: str, after_id: int, upto_id: int,
                  limit: int) -> list[tuple[bytes, bytes]]:
        """(key, value) of database `db`, keyed by 8-byte ids, with after_id < id <= upto_id,
        in id order, at most `limit`."""
        out: list[tuple[bytes, bytes]] = []
        upto = rec.id_key(upto_id)
        with txn.cursor(db=self._db[db]) as cur:
            if cur.set_range(rec.id_key(after_id + 1)):
                for key, value in cur:
                    if key > upto or len(out) >= limit:
                        break
                    out.append((key, value))
        return out

    def search(self, key: bytes, limit: int) -> tuple[list[CertRecord], int]:
        """The certificates under this RFC 4387 index key (oldest first, at most `limit`)
        and how many there are in all (a count LMDB keeps: no walk). The caller checks
        the candidates' full keys (the index holds a prefix)."""
        out: list[CertRecord] = []
        with self._read() as txn, txn.cursor(db=self._db["search"]) as cur:
            if not cur.set_key(key):
                return out, 0
            total = int(cur.count())
            for cert_id in cur.iternext_dup():
                if len(out) >= limit:
                    break
                out.append(self._cert(txn, cert_id))
        return out, total

    def by_subject_key_id(self, key_id: bytes) -> list[CertRecord]:
        with self._read() as txn:
            return [self._cert(txn, i) for i in self._dups(txn, "skid", key_id)]

    def ca_certificates(self) -> list[CertRecord]:
        with self._read() as txn, txn.cursor(db=self._db["cas"]) as cur:
            return [self._cert(txn, k) for k in cur.iternext(keys=True, values=False)]

    def extra(self, cert_id: int) -> dict[str, Any] | None:
        with self._read() as txn:
            value = txn.get(rec.id_key(cert_id), db=self._db["extra"])
        try:
            return json.loads(value) if value is not None else None
        except ValueError as exc:
            raise ReplicaUnavailable(f"replica damaged: certificate {cert_id}: {exc}") from exc

    def subject_certificates_page(self, device: bool, after_eui: bytes, after_id: int,
                                  limit: int) -> list[CertRecord]:
        """Certificates of devices or organisations in (EUI-64, id) order after a position."""
        prefix = b"d" if device else b"o"
        out: list[CertRecord] = []
        with self._read() as txn, txn.cursor(db=self._db["subject"]) as cur:
            start = prefix + after_eui
            if not cur.set_range(start):
                return out
            for key, ids in cur:
                if not key.startswith(prefix) or len(out) >= limit:
                    break
                for i in range(0, len(ids), 8):
                    cert_id = ids[i:i + 8]
                    if key == start and rec.key_id(cert_id) <= after_id:
                        continue
                    if len(out) >= limit:
                        break
                    out.append(self._cert(txn, cert_id))
        return out

    def subjects_page(self, device: bool, after_eui: bytes, limit: int) -> list[bytes]:
        """Distinct EUI-64s of devices or organisations, in order, after a position."""
        prefix = b"d" if device else b"o"
        out: list[bytes] = []
        with self._read() as txn, txn.cursor(db=self._db["subject"]) as cur:
            start = prefix + after_eui
            ok = cur.set_range(start)
            while ok and len(out) < limit:
                key = cur.key()
                if not key.startswith(prefix):
                    break
                if key != start or not after_eui:
                    out.append(key[1:])
                ok = cur.next()
        return out

    def other_certificates_page(self, after_id: int, limit: int) -> list[CertRecord]:
        out: list[CertRecord] = []
        with self._read() as txn, txn.cursor(db=self._db["other"]) as cur:
            if not cur.set_range(rec.id_key(after_id + 1)):
                return out
            for key in cur.iternext(keys=True, values=False):
                if len(out) >= limit:
                    break
                out.append(self._cert(txn, key))
        return out

    def has_other(self) -> bool:
        with self._read() as txn:
            return int(txn.stat(self._db["other"])["entries"]) > 0

    def has_subjects(self, device: bool) -> bool:
        with self._read() as txn, txn.cursor(db=self._db["subject"]) as cur:
            prefix = b"d" if device else b"o"
            found: bytes = cur.key() if cur.set_range(prefix) else b""
            return found.startswith(prefix)

    def subject_counts(self) -> tuple[int, int]:
        """(devices, organisations) with certificates: the organisations are walked (a few
        hundred), the devices are the index's other entries (no walk)."""
        with self._read() as txn:
            organisations = sum(1 for _ in self._prefixed(txn, "subject", b"o"))
            return int(txn.stat(self._db["subject"])["entries"]) - organisations, organisations

    def sample_subjects(self, device: bool, n: int, held: int, rng: random.Random
                        ) -> list[tuple[bytes, tuple[CertRecord, ...]]]:
        """Up to `n` distinct devices (or organisations) at random, with their certificates,
        of the `held` there are (subject_counts). Each draw is one seek to a random EUI-64
        between the lowest and highest held (O(log size): no walk of the index), so EUI-64s
        after a wide gap are drawn more often; `n` >= `held` walks them all instead."""
        prefix = b"d" if device else b"o"
        chosen: dict[bytes, bytes] = {}
        with self._read() as txn:
            if n >= held:
                chosen.update(self._prefixed(txn, "subject", prefix))
            elif n > 0:
                with txn.cursor(db=self._db["subject"]) as cur:
                    if not cur.set_range(prefix) or not cur.key().startswith(prefix):
                        return []
                    low = int.from_bytes(cur.key()[1:], "big")
                    if not cur.set_range(bytes([prefix[0] + 1])) or not cur.prev():
                        cur.last()
                    high = int.from_bytes(cur.key()[1:], "big")
                    for _ in range(4 * n + 16):  # duplicates are drawn again, a bounded number
                        cur.set_range(prefix + rng.randint(low, high).to_bytes(8, "big"))
                        chosen.setdefault(cur.key(), cur.value())
                        if len(chosen) >= n:
                            break
                    # the draws kept hitting the same few: the rest in key order from the
                    # last draw on (at most 2n steps: each is new or one of the n drawn)
                    ok = True
                    while len(chosen) < n:
                        if not ok or not cur.key().startswith(prefix):
                            ok = cur.set_range(prefix)
                            continue
                        chosen.setdefault(cur.key(), cur.value())
                        ok = cur.next()
            return [(key[1:], self._ids(txn, ids)) for key, ids in list(chosen.items())[:n]]

    def counts(self) -> dict[str, int]:
        with self._read() as txn:
            return {name: txn.stat(self._db[name])["entries"]
                    for name in ("certs", "crls", "revoked", "docs")}

    # -- status ------------------------------------------------------------------------------
    def statuses(self, certs: Sequence[CertRecord], now: float) -> list[str]:
        """What a relying party sees now: R if on the issuer's current CRL/ARL, E if past
        notAfter, else the lodged P/I/N."""
        with self._read() as txn:
            return self._statuses(txn, certs, now)

    def _statuses(self, txn: Any, certs: Sequence[CertRecord], now: float) -> list[str]:
        now_us = int(now * 1_000_000)
        out: list[str] = []
        current: dict[bytes, bytes | None] = {}
        current_db, revoked_db = self._db["current"], self._db["revoked"]
        for c in certs:
            issuer = c.issuer_key_id
            if issuer is not None:
                if issuer not in current:
                    pointer = txn.get(issuer, db=current_db)
                    current[issuer] = pointer[:8] if pointer else None
                crl_id = current[issuer]
                if crl_id is not None and txn.get(crl_id + c.serial.encode(),
                                                  db=revoked_db) is not None:
                    out.append("R")
                    continue
            out.append("E" if c.not_after_us < now_us else c.lodged_status)
        return out

    def certificates_now(self, serial: str, now: float
                         ) -> tuple[tuple[CertRecord, ...], list[str]]:
        """`certificates` and their `statuses`, in one read transaction."""
        with self._read() as txn:
            found = self._ids(txn, txn.get(serial.encode(), db=self._db["serial"]))
            return found, self._statuses(txn, found, now)

    def by_eui_now(self, eui64: bytes, device: bool, now: float
                   ) -> tuple[tuple[CertRecord, ...], list[str]]:
        """`by_eui` and their `statuses`, in one read transaction."""
        with self._read() as txn:
            found = self._ids(txn, txn.get(rec.subject_key(device, eui64),
                                           db=self._db["subject"]))
            return found, self._statuses(txn, found, now)

    # -- CRLs --------------------------------------------------------------------------------
    def current_crl(self, issuer_key_id: bytes) -> CrlRecord | None:
        with self._read() as txn:
            pointer = txn.get(issuer_key_id, db=self._db["current"])
            if pointer is None:
                return None
            key = rec.crl_key(issuer_key_id, rec.unpack_current(pointer)[1])
            value = txn.get(key, db=self._db["crls"])
            if value is None:
                raise ReplicaUnavailable("replica damaged: current CRL missing (rebuild it)")
            return rec.unpack_crl(key, value)

    def crl(self, issuer_key_id: bytes, number: int) -> CrlRecord | None:
        key = rec.crl_key(issuer_key_id, number)
        with self._read() as txn:
            value = txn.get(key, db=self._db["crls"])
        return rec.unpack_crl(key, value) if value is not None else None

    def crl_by_id(self, crl_id: int) -> CrlRecord | None:
        with self._read() as txn:
            key = txn.get(rec.id_key(crl_id), db=self._db["crlid"])
            value = txn.get(key, db=self._db["crls"]) if key else None
        return rec.unpack_crl(key, value) if key and value is not None else None

    def crl_versions(self, issuer_key_id: bytes) -> list[CrlRecord]:
        """Every version of an issuer's CRL/ARL, newest first."""
        with self._read() as txn:  # (the prefix holds the key id's length: no other issuer)
            out = [rec.unpack_crl(key, value) for key, value
                   in self._prefixed(txn, "crls", rec.crl_prefix(issuer_key_id))]
        return out[::-1]

    def crls_between(self, after_id: int, upto_id: int, limit: int) -> list[CrlRecord]:
        """CRL/ARL versions with after_id < id <= upto_id in id order, at most `limit`, in
        one read transaction (an extract's page)."""
        out: list[CrlRecord] = []
        with self._read() as txn:
            for id_bytes, key in self._id_range(txn, "crlid", after_id, upto_id, limit):
                value = txn.get(key, db=self._db["crls"])
                if value is None:
                    raise ReplicaUnavailable(f"replica damaged: CRL {rec.key_id(id_bytes)}"
                                             " missing (rebuild it)")
                out.append(rec.unpack_crl(key, value))
        return out

    def current_crls(self) -> list[CrlRecord]:
        """The current CRL/ARL of every issuer, by issuer key id."""
        out = []
        with self._read() as txn, txn.cursor(db=self._db["current"]) as cur:
            for issuer, pointer in cur:
                key = rec.crl_key(issuer, rec.unpack_current(pointer)[1])
                value = txn.get(key, db=self._db["crls"])
                if value is not None:
                    out.append(rec.unpack_crl(key, value))
        return out

    def revocation(self, serial: str, issuer_key_id: bytes) -> dict[str, Any] | None:
        """The issuer's current CRL/ARL entry for this serial, if it is on it."""
        crl = self.current_crl(issuer_key_id)
        if crl is None:
            return None
        with self._read() as txn:
            value = txn.get(rec.revoked_key(crl.id, serial), db=self._db["revoked"])
        if value is None:
            return None
        when, reason = rec.unpack_revoked(value)
        return {"kind": crl.kind, "crl_number": crl.crl_number, "this_update": crl.this_update,
                "revocation_date": when, "reason": reason}

    def revoked_entries(self, crl_id: int, offset: int, limit: int) -> list[RevokedEntry]:
        """One CRL version's entries by (revocation date, serial), a page at a time."""
        prefix = rec.id_key(crl_id)
        with self._read() as txn:
            found = [(*rec.unpack_revoked(value), key[8:].decode())
                     for key, value in self._prefixed(txn, "revoked", prefix)]
            found.sort(key=lambda e: (e[0], e[2]))
            serial_db = self._db["serial"]
            return [RevokedEntry(s, when, reason, txn.get(s.encode(), db=serial_db) is not None)
                    for when, reason, s in found[offset:offset + limit]]

    # -- documents ---------------------------------------------------------------------------
    def _docs(self, prefix: bytes = b"") -> list[DocRecord]:
        with self._read() as txn:
            return [rec.unpack_doc(key, value) for key, value in self._prefixed(txn, "docs", prefix)]

    def documents(self) -> list[DocRecord]:
        """The current version of every document, by name."""
        latest: dict[str, DocRecord] = {}
        for d in self._docs():
            latest[d.name] = d
        return list(latest.values())

    def documents_between(self, after_id: int, upto_id: int, limit: int) -> list[DocRecord]:
        """Document versions with after_id < id <= upto_id in id order, at most `limit`, in
        one read transaction (an extract's page; documents are few, and keyed by name, so
        the index is walked for their ids)."""
        with self._read() as txn:
            chosen = sorted((i, key) for key, value in self._prefixed(txn, "docs", b"")
                            if after_id < (i := rec.key_id(value[:8])) <= upto_id)[:limit]
            out = []
            for _i, key in chosen:
                value = txn.get(key, db=self._db["docs"])
                if value is None:  # (the same transaction: it cannot have gone)
                    raise ReplicaUnavailable("replica damaged: a document vanished")
                out.append(rec.unpack_doc(key, value))
        return out

    def document_versions(self, name: str) -> list[DocRecord]:
        return self._docs(name.encode() + b"\x00")[::-1]

    def document(self, name: str, version: int | None = None) -> DocRecord | None:
        if version is None:
            versions = self._docs(name.encode() + b"\x00")
            return versions[-1] if versions else None
        key = rec.doc_key(name, version)
        with self._read() as txn:
            value = txn.get(key, db=self._db["docs"])
        return rec.unpack_doc(key, value) if value is not None else None

    # -- writing -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def write(self) -> Iterator[Writer]:
        """One write transaction (committed at the end of the block, aborted on error)."""
        if self.env is None:
            raise ReplicaUnavailable("the read replica is not open")
        with self.env.begin(write=True) as txn:
            yield Writer(txn, self._db)

    def sync(self) -> None:
        if self.env is not None:
            self.env.sync(True)

    def size_bytes(self) -> int:
        try:
            return (self.path / "data.mdb").stat().st_size
        except OSError:
            return 0


def remove(path: Path) -> None:
    """Delete a replica directory (a rebuild's leftovers, or a damaged one)."""
    shutil.rmtree(path, ignore_errors=True)


__all__ = ["CertRecord", "CrlRecord", "DocRecord", "Meta", "RecordError", "Replica",
           "ReplicaUnavailable", "RevokedEntry", "Writer", "remove"]
