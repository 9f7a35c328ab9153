"""The read model: what the read listeners serve, as ready-to-send objects.

Certificates never change once lodged, so their responses (DER, ETag, Last-Modified) are
built once and kept in a bounded LRU (`cache.max_mb`), preloaded newest-first at start. CRLs
and documents do change (new versions), so the current ones are cached per issuer/name and
dropped when PostgreSQL says so: every write sends NOTIFY `smki_changes` inside its
transaction and this process LISTENs on a dedicated connection. If that connection is lost,
everything mutable is dropped (we may have missed a notification) and it reconnects. The
lodging path also invalidates directly after commit, so a read right after an acknowledged
lodging in the same process never sees the old version.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

import asyncpg

from .store.db import NOTIFY_CHANNEL, CrlRow, DocumentRow, Store

log = logging.getLogger(__name__)

_ENTRY_OVERHEAD = 400  # bytes per cached certificate beyond its DER (objects, strings)


def http_date(when: datetime) -> str:
    return format_datetime(when.astimezone(UTC), usegmt=True)


@dataclass(frozen=True, slots=True)
class CertEntry:
    serial: str
    issuer_key_id: bytes | None
    der: bytes
    etag: str  # quoted strong validator (SHA-256 of the DER)
    last_modified: str
    modified_ts: float  # whole seconds, for If-Modified-Since


@dataclass(frozen=True, slots=True)
class CrlEntry:
    row: CrlRow
    etag: str
    last_modified: str
    modified_ts: float
    expires: str | None  # HTTP date of nextUpdate
    next_update_ts: float | None
    disposition: str


@dataclass(frozen=True, slots=True)
class DocEntry:
    row: DocumentRow
    etag: str
    last_modified: str
    modified_ts: float


def _etag(digest: bytes) -> str:
    return '"' + digest.hex() + '"'


def _cert_entry(serial: str, issuer_key_id: bytes | None, der: bytes, sha256: bytes,
                lodged_at: datetime) -> CertEntry:
    return CertEntry(serial, issuer_key_id, der, _etag(sha256), http_date(lodged_at),
                     float(int(lodged_at.timestamp())))


class Catalog:
    def __init__(self, store: Store, *, cache_bytes: int,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.store = store
        self.clock = clock
        self.cache_bytes = cache_bytes
        self._certs: OrderedDict[str, tuple[CertEntry, ...]] = OrderedDict()
        self._cert_bytes = 0
        self._crls: dict[bytes, CrlEntry] = {}
        self._crl_versions: OrderedDict[tuple[bytes, int], CrlEntry] = OrderedDict()
        self._docs: dict[str, DocEntry] = {}
        self._listener: asyncpg.Connection | None = None
        self._listen_task: asyncio.Task[None] | None = None
        self._preload_task: asyncio.Task[None] | None = None
        self.hits = 0
        self.misses = 0

    # -- life cycle ---------------------------------------------------------------------
    async def start(self, *, preload: bool) -> None:
        self._listen_task = asyncio.create_task(self._listen_forever(), name="catalog-listen")
        if preload and self.cache_bytes:
            self._preload_task = asyncio.create_task(self._preload(), name="catalog-preload")

    async def stop(self) -> None:
        for task in (self._listen_task, self._preload_task):
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()

    async def _preload(self) -> None:
        started = asyncio.get_running_loop().time()
        count = 0
        try:
            batch: dict[str, list[CertEntry]] = {}
            budget = self.cache_bytes
            async with contextlib.aclosing(self.store.iter_recent_certificates()) as rows:
                async for row in rows:
                    budget -= len(row.der) + _ENTRY_OVERHEAD
                    if budget < 0:
                        break
                    entry = _cert_entry(row.serial, row.issuer_key_id, row.der, row.sha256,
                                        row.lodged_at)
                    batch.setdefault(row.serial, []).append(entry)
                    count += 1
            for serial, entries in batch.items():
                if serial not in self._certs:
                    self._put_cert(serial, tuple(entries), newest=False)
        except Exception:  # preload is an optimisation: never fatal
            log.exception("certificate cache preload failed")
            return
        # The preloaded entries live as long as the process: move them (and everything else
        # allocated so far) out of the cyclic GC's reach, so full collections do not walk
        # hundreds of thousands of cache objects in the middle of requests.
        gc.collect()
        gc.freeze()
        log.info("cache preloaded with %d certificates in %.1f s", count,
                 asyncio.get_running_loop().time() - started)

    async def _listen_forever(self) -> None:
        delay = 0.5
        while True:
            try:
                conn = await asyncpg.connect(self.store.dsn, timeout=10)
                self._listener = conn
                lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

                def on_lost(_conn: object, fut: asyncio.Future[None] = lost) -> None:
                    if not fut.done():
                        fut.set_result(None)

                conn.add_termination_listener(on_lost)
                await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
                self.invalidate_mutable()  # anything cached before LISTEN may be stale
                delay = 0.5
                await lost
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("catalog LISTEN connection failed: %s", exc)
            self.invalidate_mutable()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10)

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.invalidate(payload)

    def invalidate(self, payload: str) -> None:
        kind, _, key = payload.partition(":")
        if kind == "crl":
            with contextlib.suppress(ValueError):
                self._crls.pop(bytes.fromhex(key), None)
        elif kind == "doc":
            self._docs.pop(key, None)
        elif kind == "serials":
            for serial in key.split(","):
                self._drop_cert(serial)

    def invalidate_mutable(self) -> None:
        self._crls.clear()
        self._docs.clear()

    # -- certificates ---------------------------------------------------------------------
    @staticmethod
    def _size(entries: tuple[CertEntry, ...]) -> int:
        return sum(len(e.der) + _ENTRY_OVERHEAD for e in entries)

    def _drop_cert(self, serial: str) -> None:
        old = self._certs.pop(serial, None)
        if old:
            self._cert_bytes -= self._size(old)

    def _put_cert(self, serial: str, entries: tuple[CertEntry, ...], *, newest: bool = True) -> None:
        size = self._size(entries)
        if size > self.cache_bytes:
            return
        self._drop_cert(serial)
        self._certs[serial] = entries
        if not newest:
            self._certs.move_to_end(serial, last=False)
        self._cert_bytes += size
        while self._cert_bytes > self.cache_bytes and self._certs:
            _, evicted = self._certs.popitem(last=False)
            self._cert_bytes -= self._size(evicted)

    def cached_certificates_for(self, serial: str) -> tuple[CertEntry, ...] | None:
        """The cached entries for an exactly canonical serial, or None (no I/O)."""
        cached = self._certs.get(serial)
        if cached is not None:
            self.hits += 1
            self._certs.move_to_end(serial)
        return cached

    async def certificates(self, serial: str) -> tuple[CertEntry, ...]:
        """Every stored certificate with this canonical serial (usually one)."""
        cached = self.cached_certificates_for(serial)
        if cached is not None:
            return cached
        self.misses += 1
        rows = await self.store.certificates_by_serial(serial)
        entries = tuple(_cert_entry(r.serial, r.issuer_key_id, r.der, r.sha256, r.lodged_at)
                        for r in rows)
        if entries and self.cache_bytes:
            self._put_cert(serial, entries)
        return entries

    @property
    def cached_certificates(self) -> int:
        return len(self._certs)

    # -- CRLs ---------------------------------------------------------------------------
    @staticmethod
    def _crl_entry(row: CrlRow) -> CrlEntry:
        filename = f"{row.issuer_key_id.hex().upper()}-{row.crl_number}.crl"
        return CrlEntry(row, _etag(row.sha256), http_date(row.this_update),
                        float(int(row.this_update.timestamp())),
                        http_date(row.next_update) if row.next_update else None,
                        row.next_update.timestamp() if row.next_update else None,
                        f'inline; filename="{filename}"')

    async def current_crl(self, issuer_key_id: bytes) -> CrlEntry | None:
        entry = self._crls.get(issuer_key_id)
        if entry is None:
            row = await self.store.crl(issuer_key_id)
            if row is None:
                return None
            entry = self._crl_entry(row)
            self._crls[issuer_key_id] = entry
        return entry

    async def crl_version(self, issuer_key_id: bytes, number: int) -> CrlEntry | None:
        key = (issuer_key_id, number)
        entry = self._crl_versions.get(key)
        if entry is None:
            row = await self.store.crl(issuer_key_id, number)
            if row is None:
                return None
            entry = self._crl_entry(row)
            self._crl_versions[key] = entry  # immutable: safe to keep
            if len(self._crl_versions) > 64:
                self._crl_versions.popitem(last=False)
        return entry

    # -- documents -------------------------------------------------------------------------
    @staticmethod
    def _doc_entry(row: DocumentRow) -> DocEntry:
        return DocEntry(row, _etag(row.sha256), http_date(row.lodged_at),
                        float(int(row.lodged_at.timestamp())))

    async def document(self, name: str, version: int | None = None) -> DocEntry | None:
        if version is not None:
            row = await self.store.document(name, version)
            return self._doc_entry(row) if row else None
        entry = self._docs.get(name)
        if entry is None:
            row = await self.store.document(name)
            if row is None:
                return None
            entry = self._doc_entry(row)
            if row.size <= 8 * 1024 * 1024:
                self._docs[name] = entry
        return entry
