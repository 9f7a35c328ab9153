"""Producing one extract: stream the store a page at a time into a tar under
`<dir>/.partial-<name>`, fsync, rename to `<name>` (atomic: a reader sees a whole extract or
none), record it, then apply retention. Memory stays bounded whatever the store size: one
page of rows at a time; the index lines go to anonymous spool files on the same disk and
are appended as members at the end. The caller holds the cluster's extract lock
(`Store.extract_lock`), so nothing else is producing: leftovers of a crashed run
(`.partial-*` files, rows still 'producing') are cleared first.

Where the rows come from: the markers, the bookkeeping and a delta's status changes are
PostgreSQL's; the certificates, CRLs and documents come from the node's read replica when
one is given and has caught up to the markers (`extracts.replica`), else from PostgreSQL.
Both give the same rows, so the same bytes. After every publication and retention the
listing of published extracts is written beside them (`format.LISTING`), for the readers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
import tarfile
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar

from repository_server.extracts import format as fmt
from repository_server.extracts.replica import ReplicaPages
from repository_server.store.models import CertRow, CrlRow, DocumentRow, ExtractMarkers
from repository_server.store.protocols import ExtractPages, ExtractStorer

log = logging.getLogger(__name__)

_GZIP_LEVEL = 6  # zlib's default: about a third of level 9's time for nearly the same size


def _generator() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"smki-repository {version('smki-repository')}"
    except PackageNotFoundError:  # pragma: no cover - a source tree
        return "smki-repository"


class _HashingSink:
    """The file object tarfile (or gzip) writes to: counts and hashes what reaches disk."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.size = 0
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.raw.write(data)
        self.size += len(data)
        self.sha256.update(data)
        return len(data)

    def flush(self) -> None:
        self.raw.flush()


class _Spool:
    """An index member being written: lines to an anonymous temporary file, hashed."""

    def __init__(self, directory: Path) -> None:
        self.file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 - closed by produce()
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.lines = 0

    def add(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"), sort_keys=True).encode() + b"\n"
        self.file.write(line)
        self.sha256.update(line)
        self.size += len(line)
        self.lines += 1

    def summary(self) -> dict[str, Any]:
        return {"sha256": self.sha256.hexdigest(), "size": self.size, "lines": self.lines}


@dataclass(frozen=True)
class Produced:
    id: int
    name: str
    kind: str
    path: Path
    size: int
    sha256: str
    counts: dict[str, int]
    removed: list[str]
    source: str = "postgresql"  # where the certificates, CRLs and documents were read: or "replica"


class _Tar:
    """The tar stream (synchronous: called through asyncio.to_thread a page at a time)."""

    def __init__(self, path: Path, compress: bool) -> None:
        self.raw = open(path, "xb")  # noqa: SIM115 - closed in finish()/abort()
        self.sink = _HashingSink(self.raw)
        self.gz: gzip.GzipFile | None = None
        target: Any = self.sink
        if compress:
            # mtime=0 and no file name in the gzip header: the bytes depend on the content only
            self.gz = gzip.GzipFile(filename="", mode="wb", fileobj=target,
                                    compresslevel=_GZIP_LEVEL, mtime=0)
            target = self.gz
        self.tar = tarfile.open(fileobj=target, mode="w|", format=tarfile.PAX_FORMAT)  # noqa: SIM115

    def add(self, name: str, data: bytes, mtime: datetime) -> None:
        self.add_file(name, io.BytesIO(data), len(data), mtime)

    def add_file(self, name: str, fh: IO[bytes], size: int, mtime: datetime) -> None:
        info = tarfile.TarInfo(name)
        info.size = size
        info.mtime = int(mtime.timestamp())
        info.mode = 0o444
        info.uname = info.gname = "smki"
        fh.seek(0)
        self.tar.addfile(info, fh)
        # TarFile keeps every member's TarInfo (for getmembers()); a writer needs none of
        # them, and at 10^8 certificates they would be tens of gigabytes.
        self.tar.members.clear()  # type: ignore[attr-defined]  # (not in typeshed)

    def finish(self) -> tuple[int, str]:
        self.tar.close()
        if self.gz is not None:
            self.gz.close()
        self.raw.flush()
        os.fsync(self.raw.fileno())
        self.raw.close()
        return self.sink.size, self.sink.sha256.hexdigest()

    def abort(self) -> None:
        """After a failure (often a full disk): close every layer, ignoring their errors.
        Closing only the file left tarfile's and gzip's finalisers to write to it later
        ("Exception ignored in ... I/O operation on closed file" on stderr)."""
        for close in (self.tar.close, self.gz.close if self.gz else None, self.raw.close):
            if close is not None:
                with contextlib.suppress(Exception):
                    close()


T = TypeVar("T")


async def _pages(fetch: Callable[[int], Awaitable[list[T]]], key: Callable[[T], int],
                 start: int) -> AsyncIterator[list[T]]:
    """Keyset pages: fetch(after) until an empty page, `after` = the last item's key."""
    after = start
    while True:
        page = await fetch(after)
        if not page:
            return
        yield page
        after = key(page[-1])


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ExtractWriter:
    def __init__(self, store: ExtractStorer, directory: Path, *, compression: str = "gzip",
                 page_size: int = 5000, retain_full: int | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 progress: Callable[[str, int, int], None] | None = None,
                 replica: ReplicaPages | None = None) -> None:
        self.store = store
        self.replica = replica  # the node's read replica: the bulk is read there, not here
        # (stage, done, total): certificates by id position in the extract's id range
        self.progress = progress or (lambda _stage, _done, _total: None)
        self.directory = directory
        self.compress = compression == "gzip"
        self.page_size = page_size
        self.retain_full = retain_full
        self.clock = clock

    async def clear_leftovers(self) -> None:
        """What a crashed run left (only under the producer lock): `.partial-*` files, rows
        still 'producing' (marked failed), and a file renamed into place whose row was never
        marked published."""
        await self.store.extract_failed()
        published = {r.name for r in await self.store.extracts()}
        for path in self.directory.iterdir():
            if path.name.startswith(fmt.PARTIAL_PREFIX) or (
                    fmt.is_extract_name(path.name) and path.name not in published):
                log.warning("removing an unfinished extract left by a crash: %s", path.name)
                path.unlink(missing_ok=True)

    async def produce(self, kind: str, *, slot: str | None = None) -> Produced:
        """One extract; the caller holds `store.extract_lock`."""
        if kind not in ("full", "delta"):
            raise ValueError(f"kind must be full or delta, not {kind!r}")
        self.directory.mkdir(parents=True, exist_ok=True)
        await self.clear_leftovers()
        previous = await self.store.extract_latest()
        since = previous.upto if kind == "delta" and previous is not None else ExtractMarkers()
        upto = await self.store.extract_markers()
        # Read after the markers: every row at or below them was committed before, so its
        # change is at or below this head, and a replica that has applied it holds them all.
        pages: ExtractPages = self.store
        source = "postgresql"
        if self.replica is not None and await self.replica.ready(
                await self.store.extract_change_head()):
            pages, source = self.replica, "replica"
        created = self.clock()
        extract_id = await self.store.extract_next_id()
        name = fmt.extract_name(extract_id, kind, created, self.compress)
        await self.store.extract_begin(extract_id, name, kind, slot,
                                       previous.id if previous else None, upto)
        partial = self.directory / (fmt.PARTIAL_PREFIX + name)
        tar: _Tar | None = None
        spools: list[_Spool] = []
        try:
            tar = await asyncio.to_thread(_Tar, partial, self.compress)
            spools = [_Spool(self.directory) for _ in fmt.INDEXES]
            counts = await self._stream(tar, spools, kind, since, upto, pages)
            indexes = {member: spool.summary() for member, spool in zip(fmt.INDEXES, spools,
                                                                         strict=True)}
            manifest = fmt.manifest(
                name=name, kind=kind, created_at=created,
                previous=previous.name if kind == "delta" and previous else None,
                since=since if kind == "delta" else None, upto=upto, counts=counts,
                indexes=indexes, generator=_generator())
            body = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
            size, digest = await asyncio.to_thread(self._close, tar, spools, body, created)
            final = self.directory / name
            os.rename(partial, final)
            await asyncio.to_thread(_fsync_dir, self.directory)
        except BaseException:
            if tar is not None:
                tar.abort()
            partial.unlink(missing_ok=True)
            with contextlib.suppress(Exception):
                await self.store.extract_failed(extract_id)
            raise
        finally:
            for spool in spools:
                with contextlib.suppress(OSError):  # (a full disk fails the flush: no matter)
                    spool.file.close()
        await self.store.extract_published(extract_id, size, bytes.fromhex(digest), counts)
        log.info("published extract %s (%s bytes, %s, read from %s)", name, size, counts,
                 "the read replica" if source == "replica" else "PostgreSQL")
        await self.refresh_listing()
        removed = await self.apply_retention()
        return Produced(extract_id, name, kind, final, size, digest, counts, removed, source)

    async def refresh_listing(self) -> bool:
        """Write the listing of published extracts (`format.LISTING`) if it is missing or
        differs from the store's; whether it was written. Beside its final name, then
        renamed, like an extract. A failure (a full disk) is logged, not raised: the
        extracts are published all the same, and the next extract or scheduler check
        (`ExtractScheduler.tick`) writes it again."""
        body = fmt.listing_body(await self.store.extracts())
        path = self.directory / fmt.LISTING
        try:
            if path.read_bytes() == body:
                return False
        except OSError:
            pass

        def write() -> None:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / (fmt.PARTIAL_PREFIX + fmt.LISTING.lstrip("."))
            try:
                with open(tmp, "wb") as fh:
                    fh.write(body)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            _fsync_dir(self.directory)

        try:
            await asyncio.to_thread(write)
        except OSError as exc:
            log.warning("the listing of published extracts could not be written (%s);"
                        " written again at the next check", exc)
            return False
        return True

    async def apply_retention(self) -> list[str]:
        if self.retain_full is None:
            return []
        published = await self.store.extracts()
        doomed = set(fmt.to_remove([(r.id, r.kind) for r in published], self.retain_full))
        names = [r.name for r in published if r.id in doomed]
        if doomed:
            await self.store.extract_removed(sorted(doomed))  # unlisted first, then deleted
            await self.refresh_listing()
            for name in names:
                (self.directory / name).unlink(missing_ok=True)
                log.info("retention: removed extract %s", name)
        return names

    async def _stream(self, tar: _Tar, spools: list[_Spool], kind: str, since: ExtractMarkers,
                      upto: ExtractMarkers, pages: ExtractPages) -> dict[str, int]:
        certs, crls, docs = spools
        store, size = self.store, self.page_size
        counts = {"certificates": 0, "certificates_new": 0, "certificates_changed": 0,
                  "crls": 0, "documents": 0}

        def put_certs(rows: list[CertRow], change: str) -> None:
            for row in rows:
                tar.add(fmt.cert_member(row.sha256), row.der, row.lodged_at)
                certs.add(fmt.cert_record(row, change))

        def put_crls(rows: list[CrlRow]) -> None:
            for row in rows:
                tar.add(fmt.crl_member(row), row.der, row.lodged_at)
                crls.add(fmt.crl_record(row))

        def put_docs(rows: list[tuple[int, DocumentRow]]) -> None:
            for _id, row in rows:
                assert row.body is not None
                tar.add(fmt.document_member(row), row.body, row.lodged_at)
                docs.add(fmt.document_record(row))

        span = max(0, upto.cert_id - since.cert_id)
        self.progress("extract certificates (by id)", 0, span)
        async for cert_rows in _pages(lambda after: pages.extract_certificates_page(
                after, upto.cert_id, size), lambda row: row.id, since.cert_id):
            await asyncio.to_thread(put_certs, cert_rows, "new")
            counts["certificates_new"] += len(cert_rows)
            self.progress("extract certificates (by id)", cert_rows[-1].id - since.cert_id, span)
        if span:
            self.progress("extract certificates (by id)", span, span)
        if kind == "delta":
            async for changed in _pages(lambda after: store.extract_changed_page(
                    after, upto.change, since.cert_id, size), lambda item: item[0], since.change):
                await asyncio.to_thread(put_certs, [row for _seq, row in changed], "status")
                counts["certificates_changed"] += len(changed)
        counts["certificates"] = counts["certificates_new"] + counts["certificates_changed"]
        async for crl_rows in _pages(lambda after: pages.extract_crls_page(
                after, upto.crl_id, 50), lambda row: row.id, since.crl_id):
            await asyncio.to_thread(put_crls, crl_rows)
            counts["crls"] += len(crl_rows)
        async for doc_rows in _pages(lambda after: pages.extract_documents_page(
                after, upto.document_id, 20), lambda item: item[0], since.document_id):
            await asyncio.to_thread(put_docs, doc_rows)
            counts["documents"] += len(doc_rows)
        return counts

    @staticmethod
    def _close(tar: _Tar, spools: list[_Spool], manifest: bytes,
               created: datetime) -> tuple[int, str]:
        for member, spool in zip(fmt.INDEXES, spools, strict=True):
            spool.file.flush()
            tar.add_file(member, spool.file, spool.size, created)
        tar.add(fmt.MANIFEST, manifest, created)
        return tar.finish()
