"""Operator bulk import (`smki-repository import DIR`): straight into the store with COPY,
no HTTP, the same rules as lodging.

A pipeline, so that both cores and PostgreSQL work at once: worker processes read, parse,
verify and turn chunks of files into store records (`batch.import_chunk`) a few chunks
ahead, while this process COPYs each finished chunk in its own transaction. Memory stays
bounded by the number of chunks in flight, whatever the directory holds.

Certificates whose issuer has not been seen yet are held back and retried at the end (a CA
may come later in the walk); with `allow_unverified_issuer` the ones still without an issuer
are stored, marked unverified. Self-signed CA certificates are taken as trust anchors (the
operator chose the directory; the lodging API instead requires `trust_anchor=true`).
`check_signatures=False` links certificates to their issuers by name and key id without
checking signatures (re-importing a trusted extract), recorded as a finding on each.
CRL/ARL files (`.crl`, `.arl`) are lodged after all certificates. Refused items are
reported and skipped.

Into an empty store the certificates table's non-unique indexes are dropped before the
first COPY and built once the certificates are in, before the CRLs (`store.bulkload`: what
is kept and why, and how a killed import is made whole at the next start).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from repository_server.lodging.batch import CertOptions, ImportChunk, Issuer, import_chunk
from repository_server.lodging.service import Actor, LodgeError, LodgingService
from repository_server.pki.errors import ParseError
from repository_server.pki.pem import load_pem_or_der_certificates
from repository_server.store.models import ConflictError
from repository_server.store.protocols import BulkLoads

CERT_SUFFIXES = {".pem", ".der", ".cer", ".crt"}
CRL_SUFFIXES = {".crl", ".arl"}
CHUNK = 4000  # files per worker task
IN_FLIGHT = 4  # worker tasks submitted ahead of the writer
BUNDLE_SPLIT_BYTES = 1 << 20  # PEM files larger than this are split across workers
MILESTONE = 1_000_000  # a progress note with the rate over each million certificates


@dataclass
class ImportReport:
    files: int = 0
    skipped: list[str] = field(default_factory=list)
    stored: int = 0
    identical: int = 0
    refused: list[str] = field(default_factory=list)
    unverified: int = 0
    crls: int = 0
    seconds: float = 0.0
    held_back_peak: int = 0  # most certificates held in memory at once awaiting an issuer
    indexes_deferred: int = 0  # empty store: indexes dropped for the load and built after it
    index_seconds: float = 0.0  # building them
    copy_seconds: float = 0.0  # this process waiting on the store's COPY transactions
    # worker CPU, summed over the workers: file reading, parsing, signature checks, records
    worker_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return (self.stored + self.identical) / self.seconds if self.seconds else 0.0


_PEM_MARK = b"-----BEGIN CERTIFICATE-----"


def _count_pem_certificates(name: str) -> int:
    """How many PEM certificates a file holds, read 16 MiB at a time (0 if unreadable)."""
    count, tail = 0, b""
    try:
        with open(name, "rb") as fh:
            while block := fh.read(1 << 24):
                # tail is shorter than the marker: no marker is counted twice
                count += (tail + block).count(_PEM_MARK)
                tail = block[-(len(_PEM_MARK) - 1):]
    except OSError:
        return 0
    return count


def walk(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def test_pki_files(root: Path) -> tuple[list[str], list[Path], int] | None:
    """A test PKI's SMKI objects (`testpki`'s DIR, recognised by its manifest.json): the
    certificate files (roots, CAs, organisations, device bundles) and CRL/ARL files its
    manifest lists, and how many other files it holds (its TLS and DCC lodging-client
    certificates, keys, documents: not SMKI objects, not imported). None: not a test PKI."""
    from repository_server.pki.testpki import load_manifest

    if not (root.is_dir() and (root / "manifest.json").is_file()):
        return None
    try:
        manifest = load_manifest(root)
    except (ValueError, KeyError, OSError):
        return None
    certs: dict[str, None] = {}
    crls: dict[str, None] = {}
    for obj in manifest.get("objects", []):
        if obj.get("kind") in ("root", "ca", "organisation"):
            certs.setdefault(str(root / obj["path"]), None)
        elif obj.get("kind") in ("crl", "arl"):
            crls.setdefault(str(root / obj["path"]), None)
    for bundle in manifest.get("devices", {}).get("bundles", []):
        certs.setdefault(str(root / bundle), None)
    listed = {*certs, *crls, str(root / "manifest.json")}
    others = sum(1 for p in walk(root) if str(p) not in listed)
    return list(certs), [Path(c) for c in crls], others


def _find_files(root: Path, report: ImportReport,
                note: Callable[[str], None]) -> tuple[list[str], list[Path]]:
    """The certificate files and CRL/ARL files to import (a test PKI's own list, or every
    file by suffix); files of neither kind are reported as skipped."""
    pki = test_pki_files(root)
    if pki is not None:
        cert_files, crl_files, others = pki
        note(f"{root} is a test PKI (manifest.json): importing the SMKI objects it lists"
             f" ({len(cert_files)} certificate files, {len(crl_files)} CRL/ARL files); its"
             f" other {others} files (TLS and DCC lodging-client certificates, keys, documents)"
             " are not imported")
        return cert_files, crl_files
    cert_files = []
    crl_files = []
    for path in walk(root):
        suffix = path.suffix.lower()
        if suffix in CERT_SUFFIXES:
            cert_files.append(str(path))
        elif suffix in CRL_SUFFIXES:
            crl_files.append(path)
        else:
            report.skipped.append(str(path))
            note(f"skipped {path}: not a certificate or CRL file (.pem .der .cer .crt .crl .arl)")
    return cert_files, crl_files


def _measure(cert_files: Sequence[str]) -> tuple[set[str], int]:
    """The big files (PEM bundles split across workers) and how many certificates there are
    in all (PEM markers, read in blocks; a DER file is one), so that progress shows a true
    total: a PEM file may hold none (a key) or many (a bundle)."""
    big: set[str] = set()
    total = 0
    for name in cert_files:
        try:
            is_big = os.path.getsize(name) > BUNDLE_SPLIT_BYTES
        except OSError:
            is_big = False
        if is_big:
            big.add(name)
        total += _count_pem_certificates(name) if name.lower().endswith(".pem") else 1
    return big, total


class _Import:
    """One import's state: the issuers known so far (the store's and those imported since),
    certificates held back for want of an issuer, and progress."""

    def __init__(self, service: LodgingService, root: Path, actor: Actor, opts: CertOptions,
                 report: ImportReport, progress: Callable[[str, int, int], None] | None,
                 note: Callable[[str], None]) -> None:
        self.service = service
        self.root = root
        self.actor = actor
        self.opts = opts
        self.report = report
        self.progress = progress
        self.note = note
        self.issuers: dict[bytes, list[Issuer]] = {}
        self.deferred: list[tuple[str, bytes]] = []
        self.issuers_grew = False
        self.done = 0  # certificates settled (stored, identical or refused); held-back later
        self.total = 0
        self.mark = (time.perf_counter(), 0)  # the last whole million settled, and when

    def advance(self, count: int) -> None:
        self.done += count
        if self.progress:
            self.progress("import", max(0, min(self.done, self.total)), self.total)
        if self.done // MILESTONE > self.mark[1] // MILESTONE:
            # one line per million: a rate that falls as the tables grow shows here
            now, (then, before) = time.perf_counter(), self.mark
            self.mark = (now, self.done)
            self.note(f"import: {self.done:,} certificates settled,"
                      f" {(self.done - before) / max(now - then, 1e-9):,.0f}/s since"
                      f" {before:,}")

    async def write(self, chunk: ImportChunk) -> None:
        """Store what a worker made of a chunk (its own transaction) and note the rest."""
        report = self.report
        report.refused.extend(chunk.refused)
        for line in chunk.skipped:
            report.skipped.append(line)
            self.note(f"skipped {line}")
        self.deferred.extend(chunk.deferred)
        report.held_back_peak = max(report.held_back_peak, len(self.deferred))
        report.unverified += chunk.unverified
        for stage, seconds in chunk.seconds.items():
            report.worker_seconds[stage] = report.worker_seconds.get(stage, 0.0) + seconds
        for issuer in chunk.new_issuers:  # later submissions can verify against them
            self.issuers.setdefault(issuer.subject_dn, []).append(issuer)
            self.issuers_grew = True
        if chunk.records:
            t0 = time.perf_counter()
            await self._store(chunk)
            report.copy_seconds += time.perf_counter() - t0
        self.advance(chunk.certificates - len(chunk.deferred))  # held back: when settled

    async def _store(self, chunk: ImportChunk) -> None:
        service = self.service
        try:
            stored, identical, changes, seq = await service.store.insert_certificates(
                chunk.records, lodged_by=self.actor.name, audit=self.actor.audit(
                    "import.certificates", "ok", f"import {self.root}",
                    {"count": len(chunk.records), "first_serial": chunk.serials[0],
                     "last_serial": chunk.serials[-1]}))
        except ConflictError as exc:
            for i in exc.items:
                self.report.refused.append(f"serial {chunk.serials[i]}: {exc}")
            self.report.refused.append(f"a chunk of {len(chunk.records)} certificates was not"
                                       " stored because of the conflict(s) above")
        else:
            self.report.stored += len(stored)
            self.report.identical += len(identical)
            service.changed(changes)
            await service.committed(seq)

    async def run(self, items: Iterable[tuple[str, bytes | None]], defer: bool) -> None:
        """Chunks to the workers, IN_FLIGHT ahead of the writer."""
        loop = asyncio.get_running_loop()
        executor = self.service.executor()
        pending: deque[asyncio.Future[ImportChunk]] = deque()
        it = iter(items)
        while part := list(itertools.islice(it, CHUNK)):
            # the issuer map is copied at submission, so the worker sees the CAs known so far
            pending.append(loop.run_in_executor(executor, import_chunk, part,
                                                {k: list(v) for k, v in self.issuers.items()},
                                                self.opts, defer))
            if len(pending) >= IN_FLIGHT:
                await self.write(await pending.popleft())
        while pending:
            await self.write(await pending.popleft())

    def items(self, cert_files: Sequence[str],
              big: set[str]) -> Iterator[tuple[str, bytes | None]]:
        """Every certificate to import, streamed: small files first (CAs come one to a file;
        the workers read those themselves), then each big PEM bundle (devices come 50,000
        to a file), split here so that every worker gets a share, one bundle in memory at a
        time. Certificates held back for want of an issuer go round again as soon as a new
        issuer has been stored, not at the end: a CA that sorts after its own issuer
        (issuing-dca.der before root-dca.der) would otherwise hold back every certificate
        it issued, all in memory (millions of device certificates, and one wasted pass)."""
        for name in [n for n in cert_files if n not in big] + [n for n in cert_files if n in big]:
            if self.issuers_grew and self.deferred:
                self.issuers_grew = False
                retry = list(self.deferred)
                self.deferred.clear()
                yield from retry
            if name not in big:
                yield name, None
                continue
            try:
                with open(name, "rb") as fh:
                    ders = load_pem_or_der_certificates(fh.read())
            except (OSError, ParseError) as exc:
                self.report.refused.append(f"{name}: {exc}")
                continue
            yield from ((f"{name}[{i}]", der) for i, der in enumerate(ders))

    async def settle_held_back(self) -> None:
        """Held-back certificates: their CA may have arrived since; repeat while that helps."""
        previous = -1
        while self.deferred and len(self.deferred) != previous:
            previous = len(self.deferred)
            retry: list[tuple[str, bytes | None]] = list(self.deferred)
            self.deferred.clear()
            await self.run(retry, True)

    async def lodge_without_issuer(self) -> None:
        """Certificates with no issuer anywhere in the import: the lodging path decides
        (non-CA issuers found in the store, or stored unverified)."""
        retry_ders = list(self.deferred)
        self.deferred.clear()
        service, report = self.service, self.report
        for start in range(0, len(retry_ders), CHUNK):
            part = retry_ders[start:start + CHUNK]
            results, records, _ = await service.validate([d for _, d in part], self.opts)
            for r in results:
                if r["outcome"] == "refused":
                    report.refused.append(f"{part[r['index']][0]}: {r['reason']}")
            pending_results = [r for r in results if r["outcome"] == "pending"]
            try:
                batch = await service.store_records(records, pending_results, self.actor,
                                                    "import.certificates", f"import {self.root}",
                                                    {"files": len(part)})
            except LodgeError as exc:
                report.refused.append(f"chunk of {len(part)}: {exc.reason}")
                continue
            report.stored += batch.stored
            report.identical += batch.identical
            report.unverified += sum(1 for r in results
                                     if "issuer-unverified" in r.get("findings", []))
            self.advance(len(part))

    async def lodge_crls(self, crl_files: Sequence[Path]) -> None:
        for path in crl_files:
            try:
                result = await self.service.lodge_crl(path.read_bytes(), self.actor)
                self.report.crls += 1
                self.note(f"{path}: {result['kind'].upper()} number {result['crl_number']}"
                          f" {result['outcome']}")
            except LodgeError as exc:
                self.report.refused.append(f"{path}: {exc.reason}")
            except OSError as exc:
                self.report.refused.append(f"{path}: {exc}")


async def import_directory(service: LodgingService, root: Path, actor: Actor, *,
                           allow_unverified_issuer: bool = False, check_signatures: bool = True,
                           progress: Callable[[str, int, int], None] | None = None,
                           note: Callable[[str], None] = print) -> ImportReport:
    report = ImportReport()
    started = time.perf_counter()
    cert_files, crl_files = _find_files(root, report, note)
    report.files = len(cert_files) + len(crl_files)
    opts = CertOptions(allow_unverified_issuer=allow_unverified_issuer, roots_are_anchors=True,
                       check_signatures=check_signatures)
    job = _Import(service, root, actor, opts, report, progress, note)
    await service.issuers.refresh()
    job.issuers = {k: list(v) for k, v in service.issuers.by_dn.items()}
    service.executor()  # the workers start while the files are counted
    big, job.total = _measure(cert_files)
    bulk = None
    if job.total and isinstance(service.store, BulkLoads):
        bulk = await service.store.begin_bulk_load()
    if bulk is not None:
        report.indexes_deferred = len(bulk.dropped)
        note(f"the store is empty: its certificates table's {len(bulk.dropped)} non-unique"
             " indexes are dropped for the import and built after it (the primary key and"
             " the unique indexes that find duplicates stay)")
    if progress and job.total:
        progress("import", 0, job.total)
    try:
        await job.run(job.items(cert_files, big), True)
        await job.settle_held_back()
    except BaseException:
        if bulk is not None:  # the next open of the store builds them
            note("import failed: the certificates table's indexes are built at the next"
                 " start")
            with contextlib.suppress(Exception):  # the store gone too: its error is not ours
                await bulk.close()
        raise
    if bulk is not None:
        t0 = time.perf_counter()
        await bulk.finish(note)
        report.index_seconds = time.perf_counter() - t0
    if job.deferred:
        await job.lodge_without_issuer()
    await job.lodge_crls(crl_files)
    report.seconds = time.perf_counter() - started
    return report
