"""Operator bulk import (`smki-repository import DIR`): straight into the store with COPY,
no HTTP, same validation as lodging. Streams the directory in chunks (bounded memory); each
chunk is one transaction. Certificates whose issuer has not been seen yet are held back and
retried at the end (a CA may come later in the walk); with `allow_unverified_issuer` the ones
still without an issuer are stored, marked unverified. CRL/ARL files (`.crl`, `.arl`) are
lodged after all certificates. Self-signed CA certificates are taken as trust anchors (the
operator chose the directory); the lodging API instead requires `trust_anchor=true`.
Refused items are reported and skipped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..pki.profile import ParseError, load_pem_or_der_certificates
from .service import Actor, CertOptions, LodgeError, LodgingService

CERT_SUFFIXES = {".pem", ".der", ".cer", ".crt"}
CRL_SUFFIXES = {".crl", ".arl"}
CHUNK = 20_000


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

    @property
    def rate(self) -> float:
        return (self.stored + self.identical) / self.seconds if self.seconds else 0.0


def walk(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


async def import_directory(service: LodgingService, root: Path, actor: Actor, *,
                           allow_unverified_issuer: bool = False,
                           progress: Callable[[str, int, int], None] | None = None,
                           note: Callable[[str], None] = print) -> ImportReport:
    report = ImportReport()
    started = time.perf_counter()
    files = list(walk(root))
    cert_files, crl_files = [], []
    for path in files:
        suffix = path.suffix.lower()
        if suffix in CERT_SUFFIXES:
            cert_files.append(path)
        elif suffix in CRL_SUFFIXES:
            crl_files.append(path)
        else:
            report.skipped.append(str(path))
            note(f"skipped {path}: not a certificate or CRL file (.pem .der .cer .crt .crl .arl)")
    report.files = len(cert_files) + len(crl_files)
    opts = CertOptions(allow_unverified_issuer=allow_unverified_issuer, roots_are_anchors=True)
    deferred: list[tuple[str, bytes]] = []
    done = 0

    async def run_chunk(items: list[tuple[str, bytes]], defer: bool) -> None:
        nonlocal done
        ders = [d for _, d in items]
        results, records, later = await service.validate(ders, opts, defer_missing=defer)
        for i in later:
            deferred.append(items[i])
        for r in results:
            if r["outcome"] == "refused":
                report.refused.append(f"{items[r['index']][0]}: {r['reason']}")
        try:
            batch = await service.store_records(records, [r for r in results
                                                          if r["outcome"] == "pending"],
                                                actor, "import.certificates",
                                                f"import {root}", {"files": len(items)})
        except LodgeError as exc:
            report.refused.append(f"chunk of {len(items)}: {exc.reason}")
            return
        report.stored += batch.stored
        report.identical += batch.identical
        report.unverified += sum(1 for r in results if "issuer-unverified" in r.get("findings", []))
        done += len(items) - len(later)
        if progress:
            progress("import", done, len(cert_files))

    chunk: list[tuple[str, bytes]] = []
    for path in cert_files:
        try:
            data = path.read_bytes()
            if b"-----BEGIN" in data and b"CERTIFICATE-----" not in data:
                report.skipped.append(str(path))
                note(f"skipped {path}: PEM file without a certificate (a key?)")
                continue
            ders = load_pem_or_der_certificates(data)
        except (OSError, ParseError) as exc:
            report.refused.append(f"{path}: {exc}")
            continue
        name = str(path)
        chunk.extend((name if len(ders) == 1 else f"{name}[{i}]", d) for i, d in enumerate(ders))
        if len(chunk) >= CHUNK:
            await run_chunk(chunk, True)
            chunk = []
    if chunk:
        await run_chunk(chunk, True)
    # Held-back certificates: their CA may have arrived since; repeat while that helps.
    previous = -1
    while deferred and len(deferred) != previous:
        previous = len(deferred)
        retry, deferred = deferred, []
        await service.issuers.refresh()
        for start in range(0, len(retry), CHUNK):
            await run_chunk(retry[start:start + CHUNK], True)
    if deferred:
        retry, deferred = deferred, []
        for start in range(0, len(retry), CHUNK):
            await run_chunk(retry[start:start + CHUNK], False)
    for path in crl_files:
        try:
            result = await service.lodge_crl(path.read_bytes(), actor)
            report.crls += 1
            note(f"{path}: {result['kind'].upper()} number {result['crl_number']}"
                 f" {result['outcome']}")
        except LodgeError as exc:
            report.refused.append(f"{path}: {exc.reason}")
        except OSError as exc:
            report.refused.append(f"{path}: {exc}")
    report.seconds = time.perf_counter() - started
    return report
