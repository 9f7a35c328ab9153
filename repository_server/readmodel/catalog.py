"""The read model: what the read listeners serve, read from the node's replica.

Every certificate, CRL/ARL and document the listeners serve comes from the memory-mapped
read replica (`replica/`), which all worker processes of a node share through the page cache:
no per-process certificate cache and no preload, whatever the store's size. Statuses (R from
the issuer's current CRL/ARL, E from notAfter) are worked out from it at answer time.

This process also LISTENs on PostgreSQL's `smki_changes` channel, for what is not in the
replica (users, portal sessions: `subscribe`) and to wake the node's feeder at once when
something is lodged. `live` says whether the replica is being kept current: its feeder looked
at the store within the last few seconds. While it is not (PostgreSQL down or unreachable),
everything is still served from the replica, except a CRL/ARL past its nextUpdate (a newer
one may have been issued meanwhile: 503 until the store says which is current).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from repository_server import events
from repository_server.pki.certstore import INDEX_BYTES, certificate_keys, crl_keys
from repository_server.pki.ids import format_eui64, format_key_id
from repository_server.readmodel.env import Replica, ReplicaUnavailable, RevokedEntry
from repository_server.readmodel.records import CertRecord, CrlRecord, DocRecord
from repository_server.store.db import Store

log = logging.getLogger(__name__)

_RETRY_MAX = 2.0  # seconds between LISTEN reconnection attempts, at most
_PING_SECONDS = 5.0  # the LISTEN connection is pinged when quiet this long ...
_PING_TIMEOUT = 5.0  # ... and dropped (so reconnected) when the ping takes longer
_LIVE_SECONDS = 5.0  # the feeder's heartbeat is this recent: the replica is current

_STALE_CRL = ("the current CRL/ARL is past its nextUpdate and the store cannot be reached to"
              " say whether a newer one exists")


class SearchIndexBuilding(ReplicaUnavailable):
    """The replica serves, but its RFC 4387 index is still being filled (a 503 that says so)."""


CertEntry = CertRecord  # what the listeners format (records.CertRecord)

__all__ = ["Catalog", "CertEntry", "CrlEntry", "DocEntry", "ReplicaUnavailable",
           "SearchIndexBuilding"]


@dataclass(frozen=True, slots=True)
class CrlEntry:
    """A CRL/ARL version with the values every interface derives from it, worked out once per
    version (versions never change). Neutral values: each interface formats them its own way
    (HTTP its ETag and dates, LDAP its GeneralizedTime)."""

    row: CrlRecord
    sha_hex: str  # lower-case hex SHA-256 of the DER
    modified_ts: float  # thisUpdate, whole seconds since the epoch
    next_update_ts: float | None  # nextUpdate, seconds since the epoch
    filename: str  # <ISSUER KEY ID>-<CRL number>.crl


@dataclass(frozen=True, slots=True)
class DocEntry:
    """A document version with its neutral validators (see CrlEntry)."""

    row: DocRecord
    sha_hex: str  # lower-case hex SHA-256 of the body
    modified_ts: float  # lodging time, whole seconds since the epoch


class Catalog:
    def __init__(self, store: Store, replica: Replica) -> None:
        self.store = store
        self.replica = replica
        self.ready = False  # the replica is open and complete (set by the server)
        # Applies changes up to a sequence number to this node's replica (the feeder's
        # catch_up): a lodging is acknowledged only once its own node serves it.
        self.sync_to: Callable[[int], Awaitable[int]] | None = None
        self._crl_entries: dict[int, CrlEntry] = {}  # by CRL id: versions never change
        self._crl_keys: dict[int, set[bytes]] = {}  # RFC 4387 search keys, by CRL id
        self._subscribers: dict[str, list[Callable[[str], None]]] = {}
        self._echoes = events.Echoes()  # this process's lodged events: delivered once
        self._listener: asyncpg.Connection | None = None
        self._listen_task: asyncio.Task[None] | None = None
        self.listening = False  # LISTEN in place
        self.lost_at: float | None = None  # loop time the LISTEN connection was lost
        self.reads = ReplicaReads(self)

    # -- life cycle ---------------------------------------------------------------------
    async def start(self) -> None:
        self._listen_task = asyncio.create_task(self._listen_forever(), name="catalog-listen")

    async def stop(self) -> None:
        if self._listen_task:
            self._listen_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listen_task
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()

    def _check_ready(self) -> None:
        if not self.ready:
            raise ReplicaUnavailable("the read replica is being built; try again shortly")

    @property
    def live(self) -> bool:
        """The replica is being kept current: its feeder saw the primary's change log within
        the last few seconds, and has applied it (or it is only seconds old)."""
        try:
            meta = self.replica.meta()
        except ReplicaUnavailable:
            return False
        now = time.time()
        if not self.ready or now - meta.checked_us / 1e6 >= _LIVE_SECONDS:
            return False  # the feeder has not looked at the primary lately
        # and what it saw is applied, or only just committed (a feed that stalls is not live)
        return (meta.head <= meta.applied or not meta.pending_since_us
                or now - meta.pending_since_us / 1e6 < _LIVE_SECONDS)

    def version(self) -> int:
        """The replica's applied change number (caches of answers are keyed by it)."""
        return self.replica.applied()

    async def synced(self, seq: int) -> None:
        """Return once this node's replica has applied change `seq` (read-your-writes)."""
        if seq and self.sync_to is not None:
            await self.sync_to(seq)

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
                await conn.add_listener(events.CHANNEL, self._on_notify)
                self.missed()  # anything kept before LISTEN may be stale
                self.listening = True
                if self.lost_at is not None:
                    log.info("catalog LISTEN connection back after %.1f s",
                             loop.time() - self.lost_at)
                self.lost_at = None
                delay = 0.25
                await self._watch(conn, lost)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.listening or self.lost_at is None:
                    log.warning("catalog LISTEN connection failed: %s: %s", type(exc).__name__, exc)
            if conn is not None:
                conn.terminate()
            if self.listening or self.lost_at is None:
                log.warning("catalog LISTEN connection lost: serving from the read replica until"
                            " PostgreSQL is reachable again")
                self.lost_at = loop.time()
            self.listening = False
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

    def _on_notify(self, _conn: object, pid: int, _channel: str, payload: str) -> None:
        """A change event from any process on the store. The events of this process's own
        lodgings are also handed over at commit (`invalidate`): when their NOTIFY comes from
        one of this process's connections, the two are delivered once."""
        try:
            event = events.decode(payload)
        except events.EventError as exc:
            log.warning("ignored a change notification: %s", exc)
            return
        if (pid in self.store.backend_pids and isinstance(event, events.LODGED)
                and not self._echoes.echo(payload)):
            return
        self._deliver(event)

    def subscribe(self, kind: str | events.EventType, callback: Callable[[str], None]) -> None:
        """Call `callback(key)` on every change event of this kind (an event type, or its
        `kind`, e.g. "users"), and with "" when events may have been missed."""
        name = kind if isinstance(kind, str) else kind.kind
        if name not in events.TYPES:
            raise ValueError(f"no change event of kind {name!r}")
        self._subscribers.setdefault(name, []).append(callback)

    def invalidate(self, event: events.Event) -> None:
        """A change this process's lodging has just committed: its subscribers hear of it
        now (unless its NOTIFY came back first), not again when its NOTIFY comes back."""
        if self._echoes.local(events.encode(event)):
            self._deliver(event)

    def _deliver(self, event: events.Event) -> None:
        for callback in self._subscribers.get(event.kind, ()):
            callback(event.key)

    def missed(self) -> None:
        self._echoes.forget()
        for callbacks in self._subscribers.values():
            for callback in callbacks:
                callback("")

    # -- certificates ---------------------------------------------------------------------
    def download(self, serial: str) -> tuple[bytes, str, str, bool] | None:
        """(DER, hex SHA-256, HTTP Last-Modified, public) when exactly one certificate has
        this serial; None otherwise or while the replica is not ready (the full handler says
        which). The replica stores the lodging's HTTP date ready-made for this, the hottest
        HTTP path; nothing else should use it."""
        if not self.ready:
            return None
        return self.replica.download(serial)

    async def certificates(self, serial: str) -> tuple[CertEntry, ...]:
        """Every stored certificate with this canonical serial (usually one)."""
        self._check_ready()
        return self.replica.certificates(serial)

    async def by_eui(self, eui64: bytes, device: bool) -> tuple[CertEntry, ...]:
        """Every certificate of a device (device=True) or organisation, oldest first."""
        self._check_ready()
        return self.replica.by_eui(eui64, device)

    def serial_now(self, serial: str, now: float) -> tuple[tuple[CertEntry, ...], list[str]]:
        """The certificates with this serial and their statuses now (one replica read)."""
        self._check_ready()
        return self.replica.certificates_now(serial, now)

    async def by_eui_now(self, eui64: bytes, device: bool, now: float
                         ) -> tuple[tuple[CertEntry, ...], list[str]]:
        """A subject's certificates and their statuses now (one replica read)."""
        return self.subject_now(eui64, device, now)

    def subject_now(self, eui64: bytes, device: bool, now: float
                    ) -> tuple[tuple[CertEntry, ...], list[str]]:
        """`by_eui_now` without a coroutine, for callers answering synchronously (the LDAP
        fast path): one replica read."""
        self._check_ready()
        return self.replica.by_eui_now(eui64, device, now)

    def subject(self, eui64: bytes, device: bool) -> tuple[CertEntry, ...]:
        """`by_eui` without a coroutine (the LDAP fast path, when the search neither tests nor
        sends a status)."""
        self._check_ready()
        return self.replica.by_eui(eui64, device)

    def subject_records(self, eui64: bytes, device: bool) -> list[bytes]:
        """`subject`'s certificates as stored records, undecoded (the LDAP short way reads
        their heads first: `records.CERT_HEAD`)."""
        self._check_ready()
        return self.replica.subject_records(eui64, device)

    def by_sha256(self, sha256: bytes) -> list[CertEntry]:
        """The certificate with this SHA-256 (none or one)."""
        self._check_ready()
        return self.replica.by_sha256(sha256)

    def by_subject_key_id(self, key_id: bytes) -> list[CertEntry]:
        """Every certificate with this subject key identifier, in id order."""
        self._check_ready()
        return self.replica.by_subject_key_id(key_id)

    def ca_certificates(self) -> list[CertEntry]:
        """Every root and issuing CA certificate that has a subject key identifier."""
        self._check_ready()
        return self.replica.ca_certificates()

    def has_subjects(self, device: bool) -> bool:
        """Whether any device (device=True) or organisation has a certificate."""
        self._check_ready()
        return self.replica.has_subjects(device)

    def has_other(self) -> bool:
        """Whether any certificate is of neither a CA, a device nor an organisation."""
        self._check_ready()
        return self.replica.has_other()

    # Walks in pages, so that memory stays bounded whatever the store holds: each page
    # starts after the position the previous one ended at (the indexes' own order).
    def subjects_page(self, device: bool, after_eui: bytes, limit: int) -> list[bytes]:
        """Distinct EUI-64s of devices or organisations, in order, after `after_eui`."""
        self._check_ready()
        return self.replica.subjects_page(device, after_eui, limit)

    def subject_certificates_page(self, device: bool, after_eui: bytes, after_id: int,
                                  limit: int) -> list[CertEntry]:
        """Certificates of devices or organisations in (EUI-64, id) order after a position."""
        self._check_ready()
        return self.replica.subject_certificates_page(device, after_eui, after_id, limit)

    def other_certificates_page(self, after_id: int, limit: int) -> list[CertEntry]:
        """Certificates of neither kind, in id order after `after_id`."""
        self._check_ready()
        return self.replica.other_certificates_page(after_id, limit)

    # -- status ------------------------------------------------------------------------------
    async def statuses(self, entries: typing.Sequence[CertEntry], now: float) -> list[str]:
        self._check_ready()
        return self.replica.statuses(entries, now)

    # -- CRLs ---------------------------------------------------------------------------
    def _crl_entry(self, row: CrlRecord) -> CrlEntry:
        entry = self._crl_entries.get(row.id)
        if entry is None:
            entry = CrlEntry(row, row.sha256.hex(), float(int(row.this_update.timestamp())),
                             row.next_update.timestamp() if row.next_update else None,
                             f"{row.issuer_key_id.hex().upper()}-{row.crl_number}.crl")
            if len(self._crl_entries) >= 256:
                self._crl_entries.clear()
            self._crl_entries[row.id] = entry
        return entry

    async def current_crl(self, issuer_key_id: bytes) -> CrlEntry | None:
        self._check_ready()
        row = self.replica.current_crl(issuer_key_id)
        if row is None:
            return None
        self._check_current((row,))
        return self._crl_entry(row)

    def current_crls(self) -> list[CrlEntry]:
        """Every issuer's current CRL/ARL, by issuer key id (from the one CRL cache);
        ReplicaUnavailable while one is past its nextUpdate and the replica is not live."""
        self._check_ready()
        rows = sorted(self.replica.current_crls(), key=lambda c: c.issuer_key_id)
        self._check_current(rows)
        return [self._crl_entry(r) for r in rows]

    def _check_current(self, rows: typing.Iterable[CrlRecord]) -> None:
        """Past nextUpdate a newer CRL/ARL may have been issued, and the replica cannot hear
        of it while the store is unreachable: say so rather than serve a stale one."""
        now = time.time()
        if (any(r.next_update is not None and r.next_update.timestamp() <= now for r in rows)
                and not self.live):
            raise ReplicaUnavailable(_STALE_CRL)

    async def search_certificates(self, key: bytes, limit: int
                                  ) -> tuple[list[CertEntry], int]:
        """RFC 4387: the certificates with this search key (at most `limit`), and how many
        (a collision of the index's short keys would be dropped here, and still counted)."""
        self._check_ready()
        if not self.replica.search_ready():
            raise SearchIndexBuilding("the RFC 4387 search index is being built (after a"
                                      " replica build); try again shortly")
        found, total = self.replica.search(key[:INDEX_BYTES], limit)
        return [c for c in found if key in certificate_keys(c.der, c.subject_key_id,
                                                             c.subject_name)], total

    async def search_crls(self, key: bytes) -> list[CrlEntry]:
        """RFC 4387: the current CRLs/ARLs with this search key (a handful of issuers: their
        keys are worked out once per CRL version and kept)."""
        self._check_ready()
        found = []
        for row in sorted(self.replica.current_crls(), key=lambda c: c.issuer_key_id):
            keys = self._crl_keys.get(row.id)
            if keys is None:
                if len(self._crl_keys) >= 256:
                    self._crl_keys.clear()
                keys = self._crl_keys[row.id] = crl_keys(row.der, row.issuer_key_id,
                                                         row.issuer_name)
            if key in keys:
                found.append(row)
        self._check_current(found)
        return [self._crl_entry(r) for r in found]

    async def crl_version(self, issuer_key_id: bytes, number: int) -> CrlEntry | None:
        self._check_ready()
        row = self.replica.crl(issuer_key_id, number)
        return self._crl_entry(row) if row is not None else None

    # -- documents -------------------------------------------------------------------------
    @staticmethod
    def _doc_entry(row: DocRecord) -> DocEntry:
        return DocEntry(row, row.sha256.hex(), float(int(row.lodged_at.timestamp())))

    async def document(self, name: str, version: int | None = None) -> DocEntry | None:
        self._check_ready()
        row = self.replica.document(name, version)
        return self._doc_entry(row) if row else None


class ReplicaReads:
    """The store's read methods the portal and the download listings use, answered from the
    replica with the same names and shapes (so PostgreSQL is not read to serve anyone)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.replica = catalog.replica

    async def current_crls(self) -> list[CrlRecord]:
        self.catalog._check_ready()
        return sorted(self.replica.current_crls(), key=lambda c: c.issuer_key_id)

    async def crl_versions(self, issuer_key_id: bytes) -> list[tuple[int, datetime,
                                                                      datetime | None]]:
        self.catalog._check_ready()
        return [(c.crl_number, c.this_update, c.next_update)
                for c in self.replica.crl_versions(issuer_key_id)]

    async def revoked_entries(self, crl_id: int, offset: int, limit: int) -> list[RevokedEntry]:
        self.catalog._check_ready()
        return self.replica.revoked_entries(crl_id, offset, limit)

    async def revocation(self, serial: str, issuer_key_id: bytes) -> dict[str, typing.Any] | None:
        self.catalog._check_ready()
        return self.replica.revocation(serial, issuer_key_id)

    async def certificates_with_key_id(self, key_id: bytes) -> list[CertRecord]:
        """A certificate's possible issuers, CA certificates first."""
        self.catalog._check_ready()
        found = self.replica.by_subject_key_id(key_id)
        return sorted(found, key=lambda c: (c.kind not in ("root", "ca"), c.id))

    async def certificate_record(self, sha256: bytes) -> dict[str, typing.Any] | None:
        """What a certificate page shows beyond the entry: lint, verification, who lodged."""
        self.catalog._check_ready()
        found = self.replica.by_sha256(sha256)
        if not found:
            return None
        extra = self.replica.extra(found[0].id) or {}
        return {**extra, "lodged_at": found[0].lodged_at}

    async def documents(self) -> list[DocRecord]:
        self.catalog._check_ready()
        return sorted(self.replica.documents(), key=lambda d: d.name)

    async def document_versions(self, name: str) -> list[DocRecord]:
        self.catalog._check_ready()
        return self.replica.document_versions(name)

    async def sample(self, devices: int, organisations: int) -> dict[str, typing.Any]:
        """A random sample of what the replica holds, for load tests: `devices` devices and
        `organisations` organisations (distinct, each with its certificates' serials), every
        current CRL/ARL's URL and every document's name. Costs one index seek and a read of
        each drawn subject's certificates per subject (see Replica.sample_subjects), in a
        thread: the event loop goes on serving meanwhile."""
        self.catalog._check_ready()
        replica = self.replica

        def draw() -> dict[str, typing.Any]:
            rng = random.Random()
            held = replica.subject_counts()
            out: dict[str, typing.Any] = {"holding": {"devices": held[0],
                                                      "organisations": held[1]}}
            for name, device, n, count in (("devices", True, devices, held[0]),
                                           ("organisations", False, organisations, held[1])):
                out[name] = [{"eui64": format_eui64(eui), "serials": [c.serial for c in certs]}
                             for eui, certs in replica.sample_subjects(device, n, count, rng)]
            out["crls"] = [f"/crls/{format_key_id(c.issuer_key_id)}.crl"
                           for c in sorted(replica.current_crls(), key=lambda c: c.issuer_key_id)]
            out["documents"] = sorted(d.name for d in replica.documents())
            return out

        return await asyncio.to_thread(draw)
