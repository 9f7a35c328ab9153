"""The read model: what the read listeners serve, as ready-to-send objects.

Certificates never change once lodged, so their responses (DER, ETag, Last-Modified) are
built once and kept in a bounded LRU (`cache.max_mb`), preloaded newest-first at start. CRLs
and documents do change (new versions), so the current ones are cached per issuer/name and
dropped when PostgreSQL says so: every write sends NOTIFY `smki_changes` inside its
transaction and this process LISTENs on a dedicated connection. The lodging path also
invalidates directly after commit, so a read right after an acknowledged lodging in the same
process never sees the old version.

Faults: if the LISTEN connection is lost (PostgreSQL stopped, restarting, unreachable; a
stalled connection is noticed by a periodic ping), what is cached is *kept* and served: CA
certificates, current CRLs/ARLs while their nextUpdate has not passed, cached certificates and
EUI-64 lookups (`live` is false meanwhile). Nothing can be lodged while PostgreSQL is down,
so they are still current. The connection is retried every `_RETRY_MAX` seconds at most; once
it is back, everything mutable is dropped (a notification may have been missed) and read
again, so a version lodged elsewhere is seen at most that long after PostgreSQL returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
import typing
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

import asyncpg

from .pki.ids import format_eui64
from .store.db import NOTIFY_CHANNEL, CertRow, CrlRow, DocumentRow, Store

log = logging.getLogger(__name__)

_RETRY_MAX = 2.0  # seconds between LISTEN reconnection attempts, at most
_PING_SECONDS = 5.0  # the LISTEN connection is pinged when quiet this long ...
_PING_TIMEOUT = 5.0  # ... and dropped (so reconnected) when the ping takes longer
# Bytes per cached certificate beyond its DER (objects, strings, LRU links), so that
# cache.max_mb is what the cache really takes. Measured: with 720 here, a full 512 MB cache
# (5,000,000-device store) took 793 MB of RSS for ~447,000 entries of ~480-byte DER, i.e.
# ~1,300 bytes each beyond the DER.
_ENTRY_OVERHEAD = 1300
_EUI_ENTRY_BYTES = 200  # one EUI-64 index entry (key, tuple)


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
    kind: str  # root, ca, organisation, device, other
    eui_text: str  # 00-DB-12-… (written form), "" if none
    role: int | None
    usage: str | None  # DS, KA, CA
    lodged_status: str  # P, I, N as lodged (see Catalog.status for R and E)
    manufacturing_flag: bool
    not_after_ts: float
    not_before_ts: float
    subject_key_id: bytes | None
    subject_name: str  # RFC 4514, for people (and LDAP)
    issuer_name: str

    @property
    def public(self) -> bool:
        """CA certificates are readable without credentials (SPEC: relying parties must
        always reach what they need to check revocation)."""
        return self.kind in ("root", "ca")


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


def cert_entry(r: CertRow) -> CertEntry:
    return CertEntry(r.serial, r.issuer_key_id, r.der, _etag(r.sha256), http_date(r.lodged_at),
                     float(int(r.lodged_at.timestamp())), r.kind,
                     format_eui64(r.eui64) if r.eui64 is not None and len(r.eui64) == 8 else "",
                     r.role, r.usage,
                     r.status, r.manufacturing_flag, r.not_after.timestamp(),
                     r.not_before.timestamp(), r.subject_key_id, r.subject_name, r.issuer_name)


DEVICE_KINDS = ("device",)
ORGANISATION_KINDS = ("organisation",)


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
        # (EUI-64, device?) -> that subject's certificates, oldest first; () = none lodged.
        self._by_eui: OrderedDict[tuple[bytes, bool], tuple[CertEntry, ...]] = OrderedDict()
        self._eui_limit = max(1024, cache_bytes // _EUI_ENTRY_BYTES // 4)
        self._eui_epoch = 0  # bumped by every EUI invalidation (preload checks it)
        # issuer key id -> serials on its current CRL/ARL (None: it has lodged none)
        self._revoked: dict[bytes, frozenset[str] | None] = {}
        self._subscribers: dict[str, list[Callable[[str], None]]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._listener: asyncpg.Connection | None = None
        self._listen_task: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()  # set once the first LISTEN is in place
        self.live = False  # LISTEN in place: every change reaches us
        self._changes_seen: int | None = None  # newest status change known when LISTEN began
        self.lost_at: float | None = None  # loop time the LISTEN connection was lost
        self._preload_task: asyncio.Task[None] | None = None
        self.hits = 0
        self.misses = 0

    # -- life cycle ---------------------------------------------------------------------
    async def start(self, *, preload: bool) -> None:
        self._listen_task = asyncio.create_task(self._listen_forever(), name="catalog-listen")
        if preload and self.cache_bytes:
            self._preload_task = asyncio.create_task(self._preload(), name="catalog-preload")

    async def stop(self) -> None:
        for task in (self._listen_task, self._preload_task, *self._background):
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()

    async def _preload(self) -> None:
        # Read after LISTEN is in place: a change committed from then on reaches us (and bumps
        # the EUI epoch, which tells the preload its snapshot may be stale).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), 15)
        started = asyncio.get_running_loop().time()
        count = 0
        try:
            batch: dict[str, list[CertEntry]] = {}
            subjects: dict[tuple[bytes, bool], list[CertEntry]] = {}
            budget = self.cache_bytes
            complete = True
            epoch = self._eui_epoch
            async with contextlib.aclosing(self.store.iter_recent_certificates()) as rows:
                async for row in rows:
                    budget -= len(row.der) + _ENTRY_OVERHEAD
                    if budget < 0:
                        complete = False
                        break
                    entry = cert_entry(row)
                    batch.setdefault(row.serial, []).append(entry)
                    if row.eui64 is not None and row.kind in ("device", "organisation"):
                        subjects.setdefault((row.eui64, row.kind == "device"), []).append(entry)
                    count += 1
            for serial, entries in batch.items():
                if serial not in self._certs:
                    self._put_cert(serial, tuple(entries[::-1]), newest=False)
            # The EUI-64 index is only right for a subject whose every certificate was read:
            # filled when the whole store fitted and nothing was lodged meanwhile.
            if complete and epoch == self._eui_epoch and len(subjects) <= self._eui_limit:
                for key, entries in subjects.items():
                    self._by_eui.setdefault(key, tuple(entries[::-1]))
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
        delay = 0.25
        loop = asyncio.get_running_loop()
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self.store.dsn, timeout=self.store.connect_timeout)
                self._listener = conn
                lost: asyncio.Future[None] = loop.create_future()

                def on_lost(_conn: object, fut: asyncio.Future[None] = lost) -> None:
                    if not fut.done():
                        fut.set_result(None)

                conn.add_termination_listener(on_lost)
                await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
                self.invalidate_mutable()  # anything cached before LISTEN may be stale
                # Status and flag changes made while we were not listening: forget those
                # certificates (the cache keeps the others: certificate bytes never change).
                self._changes_seen, changed = await self.store.certificate_changes_since(
                    self._changes_seen)
                for serial in changed:
                    self._drop_cert(serial)
                if changed:
                    log.info("catalog: %d certificates changed while not listening: dropped",
                             len(changed))
                self.live = True
                if self.lost_at is not None:
                    log.info("catalog LISTEN connection back after %.1f s",
                             loop.time() - self.lost_at)
                self.lost_at = None
                self._listening.set()
                delay = 0.25
                await self._watch(conn, lost)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.live or self.lost_at is None:
                    log.warning("catalog LISTEN connection failed: %s: %s", type(exc).__name__, exc)
            if conn is not None:
                conn.terminate()
            if self.live or self.lost_at is None:
                # Keep what is cached: it is served while PostgreSQL is unreachable, and
                # dropped when the connection is back (invalidate_mutable above).
                log.warning("catalog LISTEN connection lost: serving what is cached until"
                            " PostgreSQL is reachable again")
                self.lost_at = loop.time()
            self.live = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX)

    @staticmethod
    async def _watch(conn: asyncpg.Connection, lost: asyncio.Future[None]) -> None:
        """Until the connection is lost or stops answering: a connection through a stalled
        network never reports its loss, and would silently stop delivering notifications."""
        while True:
            done, _ = await asyncio.wait((lost,), timeout=_PING_SECONDS)
            if done:
                return
            await conn.fetchval("SELECT 1", timeout=_PING_TIMEOUT)

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.invalidate(payload)

    def subscribe(self, kind: str, callback: Callable[[str], None]) -> None:
        """Call `callback(key)` on every change notification of this kind (e.g. "users"),
        and with "" when notifications may have been missed."""
        self._subscribers.setdefault(kind, []).append(callback)

    def invalidate(self, payload: str) -> None:
        kind, _, key = payload.partition(":")
        if kind == "crl":
            with contextlib.suppress(ValueError):
                issuer = bytes.fromhex(key)
                self._crls.pop(issuer, None)
                self._revoked.pop(issuer, None)
        elif kind == "doc":
            self._docs.pop(key, None)
        elif kind == "serials":
            for serial in key.split(","):
                self._drop_cert(serial)
        elif kind == "status":  # status:SERIAL:EUIHEX
            serial, _, eui = key.partition(":")
            self._drop_cert(serial)
            if eui:
                self._drop_eui(bytes.fromhex(eui))
        elif kind == "certs":  # certs:LO:HI, new certificates with LO < id <= HI
            lo, _, hi = key.partition(":")
            self._eui_epoch += 1
            if self._by_eui:
                self._spawn(self._drop_euis_lodged(int(lo), int(hi)))
        for callback in self._subscribers.get(kind, ()):
            callback(key)

    def _spawn(self, coro: typing.Coroutine[typing.Any, typing.Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _drop_euis_lodged(self, lo: int, hi: int) -> None:
        try:
            euis = await self.store.euis_lodged_between(lo, hi)
        except Exception as exc:  # cannot tell which: forget them all
            log.warning("EUI-64 index invalidation failed (%s): index cleared", exc)
            self._by_eui.clear()
            return
        for eui in euis:
            self._drop_eui(eui)

    def _drop_eui(self, eui: bytes) -> None:
        self._by_eui.pop((eui, True), None)
        self._by_eui.pop((eui, False), None)

    def invalidate_mutable(self) -> None:
        self._crls.clear()
        self._docs.clear()
        self._revoked.clear()
        self._by_eui.clear()  # a missed notification may have lodged certificates
        self._eui_epoch += 1
        for callbacks in self._subscribers.values():
            for callback in callbacks:
                callback("")

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
        entries = tuple(cert_entry(r) for r in rows)
        if entries and self.cache_bytes:
            self._put_cert(serial, entries)
        return entries

    # -- by subject (EUI-64) -----------------------------------------------------------------
    def cached_by_eui(self, eui64: bytes, device: bool) -> tuple[CertEntry, ...] | None:
        found = self._by_eui.get((eui64, device))
        if found is not None:
            self.hits += 1
            self._by_eui.move_to_end((eui64, device))
        return found

    async def by_eui(self, eui64: bytes, device: bool) -> tuple[CertEntry, ...]:
        """Every certificate of a device (device=True) or organisation, oldest first."""
        cached = self.cached_by_eui(eui64, device)
        if cached is not None:
            return cached
        self.misses += 1
        epoch = self._eui_epoch
        rows = await self.store.certificates_by_eui(
            eui64, DEVICE_KINDS if device else ORGANISATION_KINDS)
        entries = tuple(cert_entry(r) for r in rows)
        if epoch == self._eui_epoch and self.cache_bytes:  # nothing lodged meanwhile
            self._by_eui[(eui64, device)] = entries
            if len(self._by_eui) > self._eui_limit:
                self._by_eui.popitem(last=False)
        return entries

    # -- status ------------------------------------------------------------------------------
    async def revoked(self, issuer_key_id: bytes) -> frozenset[str] | None:
        """Serials on the issuer's current CRL/ARL (None: it has lodged none)."""
        if issuer_key_id not in self._revoked:
            self._revoked[issuer_key_id] = await self.store.current_revoked_serials(issuer_key_id)
        return self._revoked[issuer_key_id]

    def cached_status(self, entry: CertEntry, now: float) -> str | None:
        """The status a relying party sees now: R if on the issuer's current CRL/ARL, E if
        past notAfter, else the lodged P/I/N; None if the issuer's CRL is not cached yet."""
        issuer = entry.issuer_key_id
        if issuer is not None:
            if issuer not in self._revoked:
                return None
            revoked = self._revoked[issuer]
            if revoked and entry.serial in revoked:
                return "R"
        if entry.not_after_ts < now:
            return "E"
        return entry.lodged_status

    async def statuses(self, entries: typing.Sequence[CertEntry], now: float) -> list[str]:
        """`cached_status` of each, reading an issuer's revoked serials first where they are
        not cached yet (one coroutine per request, not per certificate)."""
        found = []
        for entry in entries:
            status = self.cached_status(entry, now)
            if status is None:
                assert entry.issuer_key_id is not None
                await self.revoked(entry.issuer_key_id)
                status = self.cached_status(entry, now)
                assert status is not None
            found.append(status)
        return found

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
        if entry is not None and not self.live and (
                entry.next_update_ts is not None and entry.next_update_ts <= time.time()):
            # Served from memory while PostgreSQL is unreachable, but only within its validity:
            # past nextUpdate a newer one may have been issued (and the store says which).
            entry = None
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
