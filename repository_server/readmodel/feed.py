"""Keeping the replica equal to PostgreSQL: build, catch up, follow, verify.

* **Build** (a fresh node, a damaged or foreign replica, `replica rebuild`): the whole store
  is streamed in id order inside one repeatable-read snapshot into a new environment beside
  the live one (`<path>.building`), which then replaces it by rename; the snapshot's newest
  change number becomes the replica's `applied`. Processes that had the old one open notice
  the swap (`Replica.replaced`) within a second and reopen.
* **Catch up**: the change log rows after `applied`, read in one snapshot, each applied with
  `applied` in one LMDB write transaction, strictly in sequence. Any process may do it (LMDB
  serialises writers across processes and each write re-reads `applied`), so the process
  that acknowledges a lodging first makes sure its node's replica has it (read-your-writes).
* **Follow**: one process per node (whoever holds `<path>.feeder.lock`) wakes on NOTIFY from
  the primary and polls (`replica.poll_seconds`, the only way to hear of changes through a
  streaming replica), and writes a heartbeat (head seen, when, oldest change pending) that
  every process reads for readiness and for the CRL nextUpdate rule.

How the replica stands against the store (`verify`, `lag`) is `readmodel.check`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg

from repository_server.pki.certstore import index_keys
from repository_server.readmodel import records as rec
from repository_server.readmodel.env import Replica, ReplicaUnavailable, remove
from repository_server.readmodel.envwrite import Writer
from repository_server.store import feed as sql
from repository_server.store.models import crl_row

if TYPE_CHECKING:
    from repository_server.config import Config

log = logging.getLogger(__name__)

_PAGE = 20_000  # certificates per page of a build (and per LMDB write transaction)
_CHANGES = 100  # change-log rows read per snapshot while catching up
# A lodging of this node waits this long for the streaming replica to replay its change
# before reading it from the primary (read-your-writes; replay usually takes milliseconds).
_STANDBY_WAIT = 1.0
_SEARCH_PAGE = 5_000  # certificates per write transaction of fill_search (a lodging's
# catch-up waits for at most one of them: ~50 ms)
Progress = Callable[[int, int], None]  # (done, total)


_EXTRAS: dict[tuple[str, bool, bool, str], bytes] = {}


def _extra(r: Any) -> bytes:
    """The portal's extras of a certificate, as JSON (memoised: most certificates of a
    lodging share all four)."""
    key = (r["lint"] or "[]", r["issuer_verified"], r["trust_anchor"], r["lodged_by"])
    found = _EXTRAS.get(key)
    if found is None:
        found = json.dumps({"lint": json.loads(key[0]), "issuer_verified": key[1],
                            "trust_anchor": key[2], "lodged_by": key[3]},
                           separators=(",", ":")).encode()
        if len(_EXTRAS) >= 4096:
            _EXTRAS.clear()
        _EXTRAS[key] = found
    return found


def put_certificates(w: Writer, rows: Sequence[Any], *, append: bool = False,
                     indexes: bool = True, search: bool = True) -> int:
    """Store certificate rows; with `search`, their RFC 4387 index entries too (a build
    leaves those to `Feeder.fill_search`, after the replica is ready)."""
    stored = 0
    entries: list[tuple[bytes, bytes]] = []
    for r in rows:
        value = rec.pack_cert(
            serial=r["serial"], issuer_key_id=r["issuer_key_id"], der=r["der"], sha256=r["sha256"],
            lodged_us=r["lodged_us"], kind=r["kind"], eui64=r["eui64"], role=r["role"],
            usage=r["usage"], status=r["status"], manufacturing_flag=r["manufacturing_flag"],
            not_before_us=r["not_before_us"], not_after_us=r["not_after_us"],
            subject_key_id=r["subject_key_id"], subject_name=r["subject_name"],
            issuer_name=r["issuer_name"])
        if w.put_cert(r["id"], value, serial=r["serial"], eui64=r["eui64"], kind=r["kind"],
                      sha256=r["sha256"], subject_key_id=r["subject_key_id"], extra=_extra(r),
                      append=append, indexes=indexes):
            stored += 1
            if search:
                cert_key = rec.id_key(r["id"])
                entries += [(k, cert_key) for k in index_keys(r["der"], r["subject_key_id"],
                                                               r["subject_name"])]
    entries.sort()  # one pass through the B-tree, left to right
    w.put_search(entries)
    return stored


def doc_record(r: Any) -> rec.DocRecord:
    return rec.DocRecord(r["id"], r["name"], r["version"], r["content_type"], r["size"],
                         r["sha256"], r["lodged_at"], r["body"])


@dataclass
class _Batch:
    """What one snapshot of the change log holds, ready to write."""

    changes: list[sql.Change]
    certs: dict[int, list[Any]]  # seq -> rows
    states: dict[int, list[tuple[int, str, bool]]]
    crls: dict[int, list[tuple[rec.CrlRecord, list[tuple[str, datetime, str | None]]]]]
    docs: dict[int, list[rec.DocRecord]]


def _us_now() -> int:
    return int(time.time() * 1_000_000)


class FeedError(Exception):
    pass


class Feeder:
    """Builds and feeds one node's replica from PostgreSQL (`dsn`: the primary, whose NOTIFY
    wakes us; `feed_dsn`: where rows are read, the primary or a streaming replica of it)."""

    def __init__(self, replica: Replica, *, dsn: str, feed_dsn: str = "",
                 connect_timeout: float = 10.0, command_timeout: float = 60.0,
                 poll_seconds: float = 1.0) -> None:
        self.replica = replica
        self.dsn = dsn
        self.feed_dsn = feed_dsn or dsn
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout  # a stalled store is noticed, not waited on
        self.poll_seconds = poll_seconds
        self._lock = asyncio.Lock()  # one catch-up at a time in this process
        self._wake = asyncio.Event()
        self._conn: asyncpg.Connection | None = None  # the feed: rows and changes
        self._beat: asyncpg.Connection | None = None  # the heartbeat: the primary's head
        # a lodging's own changes not yet on the streaming replica (`catch_up`)
        self._primary: asyncpg.Connection | None = None
        self._feeder_lock: int | None = None  # fd holding <path>.feeder.lock
        self.is_feeder = False
        self.source = ""  # the repository's identity, once read
        self.last_error = ""
        self.building: tuple[int, int] | None = None  # (done, total) while building

    @classmethod
    def for_node(cls, config: Config, dsn: str) -> Feeder:
        """The node's replica (`replica.*`) and its feeder, as configured: the server and
        the operator commands build them alike."""
        replica = Replica(config.path(config.replica.path),
                          map_size=config.replica.map_size_gb * 1024**3)
        return cls(replica, dsn=dsn, feed_dsn=config.database.replica_url,
                   connect_timeout=config.database.connect_timeout,
                   command_timeout=config.database.command_timeout,
                   poll_seconds=config.replica.poll_seconds)

    # -- connections -----------------------------------------------------------------------
    async def _connection(self, *, primary: bool = False) -> asyncpg.Connection:
        """The feed's connection (`feed_dsn`), or with `primary` its own one to the primary
        (a lodging's changes a lagging streaming replica has not replayed yet)."""
        conn = self._primary if primary else self._conn
        if conn is None or conn.is_closed():
            conn = await asyncpg.connect(self.dsn if primary else self.feed_dsn,
                                         timeout=self.connect_timeout,
                                         command_timeout=self.command_timeout)
            if primary:
                self._primary = conn
            else:
                self._conn = conn
        return conn

    async def close(self) -> None:
        for conn in (self._conn, self._beat, self._primary):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 2)
        self._conn = self._beat = self._primary = None
        if self._feeder_lock is not None:
            os.close(self._feeder_lock)
            self._feeder_lock = None
            self.is_feeder = False

    def _lock_path(self, what: str) -> Path:
        return self.replica.path.with_name(self.replica.path.name + f".{what}.lock")

    def take_feeder_role(self) -> bool:
        """Whether this process is (now) the node's feeder: a non-blocking flock, released
        by the kernel when the process dies, so another takes over."""
        if self._feeder_lock is not None:
            return True
        self.replica.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path("feeder"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._feeder_lock = fd
        self.is_feeder = True
        return True

    # -- opening and building ----------------------------------------------------------------
    def usable(self, source: str) -> str:
        """Why the replica on disk cannot be used as it is ("" if it can)."""
        if not self.replica.exists():
            return "no replica yet"
        try:
            if self.replica.env is None or self.replica.replaced():
                self.replica.open()
            meta = self.replica.meta()
        except ReplicaUnavailable as exc:
            return str(exc)
        if not meta.ready:
            return "replica was never completed"
        if meta.format != rec.FORMAT:
            return f"replica format {meta.format}, this version uses {rec.FORMAT}"
        if meta.source != source:
            return "replica was built from another repository"
        return ""

    async def ensure(self, progress: Progress | None = None) -> None:
        """Open the replica, building it first if it is missing, damaged, foreign, of another
        format or behind a store that went back (restored from an older backup)."""
        conn = await self._connection()
        self.source = await sql.identity(conn)
        why = await asyncio.to_thread(self.usable, self.source)
        if not why:
            head = await self._store_head(conn)
            if head is not None and self.replica.applied() > head:
                why = (f"replica is ahead of the store (change {self.replica.applied()} >"
                       f" {head}): the store was restored")
        if why:
            log.warning("read replica: %s: building it from PostgreSQL", why)
            await self.build(progress)

    async def _store_head(self, feed: asyncpg.Connection) -> int | None:
        """The change log's head on the primary, for the "store was restored" check. Not the
        streaming replica's: this node may have applied its own lodgings from the primary
        (`catch_up`) before its standby replayed them, and a lagging standby is no restore.
        None (no check) when the primary cannot be reached."""
        if not self.through_standby:
            return await sql.head(feed)
        try:
            conn = await self._connection(primary=True)
            return await sql.head(conn)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.info("read replica: the primary's change log head unknown (%s: %s)",
                     type(exc).__name__, exc)
            self._forget(primary=True)
            return None

    async def build(self, progress: Progress | None = None) -> int:
        """A new replica from the whole store; returns the certificates written."""
        path = self.replica.path
        tmp = path.with_name(path.name + ".building")
        path.parent.mkdir(parents=True, exist_ok=True)  # a data_dir not made yet (database.url)
        lock_fd = os.open(self._lock_path("build"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            await asyncio.to_thread(fcntl.flock, lock_fd, fcntl.LOCK_EX)
            await asyncio.to_thread(remove, tmp)
            new = Replica(tmp, map_size=self.replica.map_size)
            new.open()
            try:
                written = await self._fill(new, progress)
            finally:
                new.close()
            old = path.with_name(path.name + ".old")
            await asyncio.to_thread(remove, old)
            if path.exists():
                path.rename(old)
            tmp.rename(path)
            await asyncio.to_thread(remove, old)
            self.replica.open()
            return written
        finally:
            self.building = None
            os.close(lock_fd)

    async def _fill(self, new: Replica, progress: Progress | None) -> int:
        conn = await self._connection()
        started = time.perf_counter()
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            source = await sql.identity(conn)
            head = await sql.head(conn)
            total = await sql.certificate_count(conn)
            self.building = (0, total)
            done = 0

            def write_page(rows: Sequence[Any]) -> int:
                with new.write() as w:
                    return put_certificates(w, rows, append=True, indexes=False, search=False)

            rows = await sql.certificates_page(conn, 0, _PAGE)
            while rows:
                # the next page is read while this one is written
                writing = asyncio.create_task(asyncio.to_thread(write_page, rows))
                try:
                    following = await sql.certificates_page(conn, rows[-1]["id"], _PAGE)
                finally:
                    await writing
                done += len(rows)
                self.building = (done, total)
                if progress is not None:
                    progress(done, total)
                rows = following
            # The indexes, each read from PostgreSQL in the replica's key order and appended
            # (random inserts into a growing B-tree were two thirds of a build's time).
            for name, query in sql.INDEX_QUERIES.items():
                await self._append_index(conn, new, name, query)
            crl_rows = await sql.crls(conn)
            crls = [(crl_row(r), await sql.revoked_entries(conn, r["id"])) for r in crl_rows]
            docs = [doc_record(r) for r in await sql.documents(conn)]

        def finish() -> None:
            with new.write() as w:
                for crl, entries in crls:
                    w.put_crl(crl, entries)
                for doc in docs:
                    w.put_doc(doc)
                now = _us_now()
                w.set_meta(format=rec.FORMAT, source=source, applied=head, head=head,
                           checked=now, pending_since=0, built=now, ready=True)
            new.sync()

        await asyncio.to_thread(finish)
        elapsed = time.perf_counter() - started
        log.info("read replica built: %d certificates, %d CRL/ARL versions, %d document"
                 " versions, up to change %d, in %.1f s (%.0f certificates/s), %.0f MB",
                 done, len(crls), len(docs), head, elapsed, done / elapsed if elapsed else 0,
                 new.size_bytes() / 1e6)
        return done

    @staticmethod
    async def _append_index(conn: asyncpg.Connection, new: Replica, name: str,
                            query: str) -> None:
        def write(items: list[tuple[bytes, bytes]]) -> None:
            with new.write() as w:
                w.append_index(name, items)

        batch: list[tuple[bytes, bytes]] = []
        writing: asyncio.Task[None] | None = None
        async for row in conn.cursor(query, prefetch=50_000):
            batch.append((row[0], row[1]))
            if len(batch) >= 100_000:
                if writing is not None:
                    await writing
                writing = asyncio.create_task(asyncio.to_thread(write, batch))
                batch = []
        if writing is not None:
            await writing
        await asyncio.to_thread(write, batch)

    # -- the RFC 4387 search index ----------------------------------------------------------
    async def fill_search(self) -> int:
        """Index every certificate of a freshly built replica for RFC 4387 searches, read
        from the replica itself; `search_ready` at the end. Not part of the build: its
        hashes are Python's work (~10 us a certificate), which would take a third off the
        build rate, so the node is ready first and search.cgi answers 503 until this is done.
        Certificates lodged meanwhile are indexed by the catch-up as always (an entry twice
        is stored once). Each page records how far it got (`search_filled`, in the page's own
        write transaction), so a node restarted part-way resumes there instead of starting
        again: at 10,000,000 certificates the fill is minutes of one core, and a node
        restarted more often than that would otherwise fill for ever (found at 5,000,000
        devices, where half the server's core went to it). Returns the certificates indexed
        by this call."""
        started = time.perf_counter()
        env = self.replica.env  # a rebuild swapping it meanwhile starts this again
        after, done = await asyncio.to_thread(self.replica.search_filled), 0
        if after:
            log.info("read replica: RFC 4387 search index resumed after certificate id %d",
                     after)
        while True:
            page = await asyncio.to_thread(self._search_page, env, after)
            if page is None:
                break
            after, count = page
            done += count
        await asyncio.to_thread(self._search_done, env)
        elapsed = time.perf_counter() - started
        log.info("read replica: RFC 4387 search index of %d certificates in %.1f s"
                 " (%.0f certificates/s)", done, elapsed, done / elapsed if elapsed else 0)
        return done

    def _same(self, env: Any) -> None:
        if self.replica.env is not env:
            raise ReplicaUnavailable("the replica was rebuilt while its search index was being"
                                     " filled")

    def _search_page(self, env: Any, after: int) -> tuple[int, int] | None:
        self._same(env)
        certs = self.replica.certificates_after(after, _SEARCH_PAGE)
        if not certs:
            return None
        entries = [(k, rec.id_key(c.id)) for c in certs
                   for k in index_keys(c.der, c.subject_key_id, c.subject_name)]
        entries.sort()
        with self.replica.write() as w:
            self._same(env)
            w.put_search(entries)
            w.set_meta(search_filled=certs[-1].id)
        return certs[-1].id, len(certs)

    def _search_done(self, env: Any) -> None:
        with self.replica.write() as w:
            self._same(env)
            w.set_meta(search_ready=True)

    # -- catching up -------------------------------------------------------------------------
    def wake(self, _key: str = "") -> None:
        self._wake.set()

    async def catch_up(self, upto: int | None = None) -> int:
        """Apply every change committed so far (or at least up to `upto`); returns the
        replica's applied sequence number.

        Through a streaming replica (`feed_dsn` is not the primary) a change just committed
        on the primary may not have been replayed there yet. A caller that names `upto` (a
        lodging of this node, before its acknowledgement) gets it all the same: the standby
        is given `_STANDBY_WAIT` seconds to replay it, then what is still missing is read
        from the primary. The change log is the same on both, so changes applied that way
        are skipped when the standby shows them."""
        async with self._lock:
            if upto is None or not self.through_standby:
                return await self._retrying(upto, primary=False)
            try:
                applied = await self._retrying(upto, primary=False)
                deadline = time.monotonic() + _STANDBY_WAIT
                while applied < upto and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                    applied = await self._catch_up(upto, primary=False)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.info("read replica: the streaming replica did not give change %d (%s: %s);"
                         " reading it from the primary", upto, type(exc).__name__, exc)
                self._forget(primary=False)
                applied = self.replica.applied()
            if applied < upto:
                applied = await self._retrying(upto, primary=True)
            return applied

    @property
    def through_standby(self) -> bool:
        """Whether the feed reads a streaming replica rather than the primary."""
        return self.feed_dsn != self.dsn

    async def _retrying(self, upto: int | None, *, primary: bool) -> int:
        had = (self._primary if primary else self._conn) is not None
        try:
            return await self._catch_up(upto, primary=primary)
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError):
            # a connection that died since its last use: once more on a new one (a new
            # one that failed is not tried again at once: a server that is down would cost
            # two connect timeouts)
            self._forget(primary=primary)
            if not had:
                raise
            return await self._catch_up(upto, primary=primary)

    def _forget(self, *, primary: bool) -> None:
        conn = self._primary if primary else self._conn
        if conn is not None:
            conn.terminate()
        if primary:
            self._primary = None
        else:
            self._conn = None

    async def _catch_up(self, upto: int | None, *, primary: bool = False) -> int:
        applied = self.replica.applied()
        if upto is not None and applied >= upto:
            return applied
        conn = await self._connection(primary=primary)
        while True:
            batch = await self._read_batch(conn, applied)
            if not batch.changes:
                return applied
            applied = await asyncio.to_thread(self._apply, batch)
            if len(batch.changes) < _CHANGES and (upto is None or applied >= upto):
                return applied

    async def _read_batch(self, conn: asyncpg.Connection, applied: int) -> _Batch:
        batch = _Batch([], {}, {}, {}, {})
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            batch.changes = await sql.changes_after(conn, applied, _CHANGES)
            for ch in batch.changes:
                if ch.kind == "certs":
                    batch.certs[ch.seq] = await sql.lodged_certificates(conn, ch)
                elif ch.kind == "status":
                    batch.states[ch.seq] = await sql.certificate_states(conn, ch.ids)
                elif ch.kind == "crl":
                    batch.crls[ch.seq] = [(crl_row(r), await sql.revoked_entries(conn, r["id"]))
                                          for r in await sql.crls(conn, ch.ids)]
                elif ch.kind == "doc":
                    batch.docs[ch.seq] = [doc_record(r) for r in await sql.documents(conn, ch.ids)]
        return batch

    def _apply(self, batch: _Batch) -> int:
        """Each change in its own write transaction with `applied` (a reader sees a change
        whole or not at all); changes another process applied meanwhile are skipped."""
        applied = 0
        for ch in batch.changes:
            with self.replica.write() as w:
                applied = w.meta().applied
                if ch.seq <= applied:
                    continue
                if ch.seq != applied + 1:
                    raise FeedError(f"change {applied + 1} missing from the batch (got {ch.seq})")
                if ch.kind == "certs":
                    put_certificates(w, batch.certs.get(ch.seq, ()))
                elif ch.kind == "status":
                    for cert_id, status, flag in batch.states.get(ch.seq, ()):
                        w.set_status(cert_id, status, flag)
                elif ch.kind == "crl":
                    for crl, entries in batch.crls.get(ch.seq, ()):
                        w.put_crl(crl, entries)
                elif ch.kind == "doc":
                    for doc in batch.docs.get(ch.seq, ()):
                        w.put_doc(doc)
                meta = w.meta()
                w.set_meta(applied=ch.seq, head=max(meta.head, ch.seq),
                           pending_since=0 if ch.seq >= meta.head else meta.pending_since_us)
                applied = ch.seq
        return applied

    async def heartbeat(self) -> None:
        """Record the head of the change log on the primary and when it was seen, and since
        when the oldest change not yet applied is waiting (readiness, lag). Read from the
        primary on a connection of its own, so a feed that stalls (a lagging or unreachable
        streaming replica) shows as a growing lag instead of hiding it."""
        conn = self._beat
        if conn is None or conn.is_closed():
            conn = await asyncpg.connect(self.dsn, timeout=self.connect_timeout,
                                         command_timeout=self.command_timeout)
            self._beat = conn
        head = await sql.head(conn)
        applied = self.replica.applied()
        pending = await sql.change_time(conn, applied + 1) if head > applied else None

        def write() -> None:
            with self.replica.write() as w:
                w.set_meta(head=max(head, w.meta().applied), checked=_us_now(),
                           pending_since=rec.to_us(pending) if pending else 0)

        await asyncio.to_thread(write)

    async def _beat_forever(self) -> None:
        while True:
            try:
                await self.heartbeat()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("read replica heartbeat: %s: %s", type(exc).__name__, exc)
                if self._beat is not None:
                    self._beat.terminate()
                    self._beat = None
            await asyncio.sleep(self.poll_seconds)

    # -- following ---------------------------------------------------------------------------
    async def follow(self) -> None:
        """Forever (the node's feeder): catch up on every wake-up and every poll; a heartbeat
        beside it."""
        delay = 0.25
        beat = asyncio.create_task(self._beat_forever(), name="replica-heartbeat")
        filling: asyncio.Task[int] | None = None
        try:
            while True:
                try:
                    self._wake.clear()
                    if ((filling is None or filling.done())
                            and not self.replica.search_ready()):  # built (or rebuilt) anew
                        if filling is not None and filling.exception() is not None:
                            log.warning("RFC 4387 search index: %s (again)", filling.exception())
                        filling = asyncio.create_task(self.fill_search(), name="replica-search")
                    await self.catch_up()
                    self.last_error = ""
                    delay = 0.25
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    text = f"{type(exc).__name__}: {exc}"
                    if text != self.last_error:
                        log.warning("read replica feed: %s (retrying)", text)
                    self.last_error = text
                    async with self._lock:  # not under a catch-up a lodging is waiting on
                        if self._conn is not None:
                            self._conn.terminate()
                            self._conn = None
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
        finally:
            for task in (beat, filling):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
