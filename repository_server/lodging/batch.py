"""Parse and verify certificates in bulk, in worker processes (picklable, no I/O).

The parent passes the issuers it knows (every CA in the repository, keyed by subject key
id); each item comes back parsed with its issuer resolved, or with a reason. Items whose
issuer is not among them come back `issuer_missing` and the parent resolves them (issuers
lodged in the same batch, or non-CA issuers found by key id) in a second, in-process round.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from repository_server.pki.certificates import parse_certificate
from repository_server.pki.errors import ParseError
from repository_server.pki.ids import format_key_id
from repository_server.pki.model import CertInfo, CertKind
from repository_server.pki.pem import load_pem_or_der_certificates
from repository_server.pki.signatures import verify_signature

if TYPE_CHECKING:
    from repository_server.store.models import NewCertificate


@dataclass(frozen=True, slots=True)
class Issuer:
    id: int | None  # None: in the same batch, not stored yet
    subject_dn: bytes
    subject_key_id: bytes | None
    public_key_der: bytes
    is_ca: bool
    root: bool = False  # self-signed CA: what it revokes on is an ARL


IssuerMap = Mapping[bytes, Sequence[Issuer]]  # subject DN -> candidates


@dataclass(frozen=True, slots=True)
class Parsed:
    index: int
    info: CertInfo | None
    error: str | None = None  # refusal reason (unparseable, bad signature)
    issuer: Issuer | None = None
    issuer_missing: bool = False  # no candidate issuer known


def issuer_candidates(issuer_dn: bytes, authority_key_id: bytes | None,
                      issuers: IssuerMap) -> list[Issuer]:
    """Certificates whose subject is this issuer name and, when both have one, whose subject
    key id equals the authority key id (of a certificate or a CRL)."""
    return [c for c in issuers.get(issuer_dn, ())
            if authority_key_id is None or c.subject_key_id is None
            or c.subject_key_id == authority_key_id]


def resolve_issuer(info: CertInfo, issuers: IssuerMap,
                   verify: bool = True) -> tuple[Issuer | None, str | None, bool]:
    """(issuer, error, missing), among `issuer_candidates`."""
    candidates = issuer_candidates(info.issuer_dn, info.issuer_key_id, issuers)
    if not candidates:
        return None, None, True
    if not verify:  # operator import of a trusted source: link by name and key id only
        return candidates[0], None, False
    for candidate in candidates:
        if verify_signature(info, candidate.public_key_der):
            return candidate, None, False
    return None, (f"signature does not verify under the public key of issuer "
                  f"{info.issuer_name!r}"), False


def parse_items(start: int, ders: Sequence[bytes], issuers: IssuerMap,
                verify: bool = True) -> list[Parsed]:
    out: list[Parsed] = []
    for offset, der in enumerate(ders):
        index = start + offset
        try:
            info = parse_certificate(der)
        except ParseError as exc:
            out.append(Parsed(index, None, f"not a certificate: {exc}"))
            continue
        if info.self_signed:
            out.append(Parsed(index, info))
            continue
        issuer, err, missing = resolve_issuer(info, issuers, verify=verify)
        out.append(Parsed(index, info, err, issuer, missing))
    return out


@dataclass
class CertOptions:
    status: str = "I"
    manufacturing_flag: bool = False
    trust_anchor: bool = False
    allow_unverified_issuer: bool = False  # operator bulk import only
    roots_are_anchors: bool = False  # operator bulk import: self-signed CAs become anchors
    check_signatures: bool = True  # operator import may skip (trusted source), recorded as such



_ISSUER_UNVERIFIED = {"code": "issuer-unverified",
                      "message": "issuer not in the repository; signature not checked"}
_SIGNATURE_NOT_CHECKED = {"code": "signature-not-checked",
                          "message": "imported with --skip-signature-check"}


@dataclass(frozen=True, slots=True)
class Decision:
    reason: str | None  # refusal, or None to store
    verified: bool = False
    anchor: bool = False
    extra: list[dict[str, str]] = field(default_factory=list)  # findings beyond the profile's
    defer: bool = False  # issuer not known yet: try again later (bulk import)


def decide(p: Parsed, opts: CertOptions, defer_missing: bool = False) -> Decision:
    """What to do with one parsed certificate: the lodging rules, without I/O."""
    info = p.info
    if info is None or p.error is not None:
        return Decision(p.error or "not a certificate")
    anchor = opts.trust_anchor
    extra: list[dict[str, str]] = []
    verified = p.issuer is not None and opts.check_signatures
    if info.self_signed:
        if opts.roots_are_anchors and info.kind == CertKind.ROOT:
            anchor = True  # operator import: a self-signed CA is a root
        elif not opts.trust_anchor:
            return Decision("self-signed certificate: roots are lodged explicitly as trust"
                            " anchors (trust_anchor=true)")
        verified = True
    elif opts.trust_anchor and info.kind not in (CertKind.ROOT, CertKind.CA):
        return Decision("trust_anchor=true is only for CA certificates")
    elif p.issuer_missing:
        if defer_missing:
            return Decision(None, defer=True)
        if opts.trust_anchor:
            extra.append({"code": "anchor-issuer-not-available",
                          "message": "lodged as a trust anchor; its issuer is not in the"
                                     " repository"})
        elif opts.allow_unverified_issuer:
            extra.append(dict(_ISSUER_UNVERIFIED))
        else:
            return Decision(f"issuer {info.issuer_name!r} (key id "
                            f"{format_key_id(info.issuer_key_id or b'') or 'none'}) is not in"
                            " the repository")
    elif not opts.check_signatures:
        extra.append(dict(_SIGNATURE_NOT_CHECKED))
    if p.issuer is not None and not p.issuer.is_ca:
        extra.append({"code": "issuer-not-ca",
                      "message": "issued by a certificate that is not a CA"})
    return Decision(None, verified, anchor, extra)


class BatchIssuers:
    """The issuers a batch's items may name: the repository's CAs, and the batch's own CA
    certificates as they become acceptable (in batch order)."""

    def __init__(self, known: IssuerMap) -> None:
        self.by_dn: dict[bytes, list[Issuer]] = {k: list(v) for k, v in known.items()}

    def add(self, p: Parsed) -> None:
        """A certificate of the batch that will be stored: if it is a CA, it may issue."""
        info = p.info
        assert info is not None
        if info.kind in (CertKind.ROOT, CertKind.CA):
            self.by_dn.setdefault(info.subject_dn, []).append(Issuer(
                None, info.subject_dn, info.subject_key_id, info.public_key_der, True,
                info.kind == CertKind.ROOT))


def _acceptable(p: Parsed, opts: CertOptions) -> bool:
    """Whether a first-round item will be stored with its issuer settled (resolved, or a
    self-signed root lodged as an anchor): its CA certificate may then issue others."""
    anchor_ok = opts.trust_anchor or opts.roots_are_anchors
    return (p.info is not None and p.error is None and not p.issuer_missing
            and (p.issuer is not None or (p.info.self_signed and anchor_ok)))


def _resolve_round(pending: Sequence[Parsed], local: BatchIssuers,
                   by_index: dict[int, Parsed]) -> tuple[list[Parsed], bool]:
    """One pass over the items still without an issuer, in batch order: those whose issuer
    is now known are settled in `by_index` (and, if CAs, may issue the next ones). Returns
    the items still missing theirs and whether any was settled."""
    still: list[Parsed] = []
    progress = False
    for p in pending:
        assert p.info is not None
        issuer, err, missing = resolve_issuer(p.info, local.by_dn)
        if missing:
            still.append(p)
            continue
        settled = by_index[p.index] = Parsed(p.index, p.info, err, issuer, False)
        if err is None:
            local.add(settled)
        progress = True
    return still, progress


def _vouch(pending: Sequence[Parsed], local: BatchIssuers, vouched: set[int]) -> bool:
    """CAs still without an issuer that will be stored unverified anyway (anchors, operator
    import) vouch for what they issued in the same batch. Returns whether any new one did."""
    cas = [p for p in pending if p.index not in vouched and p.info is not None
           and p.info.kind in (CertKind.ROOT, CertKind.CA)]
    for p in cas:
        local.add(p)
        vouched.add(p.index)
    return bool(cas)


def resolve_within_batch(parsed: Sequence[Parsed], known: IssuerMap, opts: CertOptions
                         ) -> tuple[dict[int, Parsed], list[Parsed]]:
    """The second round for items whose issuer was unknown to the workers: issuers from the
    same batch, repeatedly, until no more can be settled. Returns every item by index (the
    settled ones replaced) and the items still without an issuer."""
    local = BatchIssuers(known)
    for p in parsed:
        if _acceptable(p, opts):
            local.add(p)
    by_index = {p.index: p for p in parsed}
    pending = [p for p in parsed if p.issuer_missing and p.info is not None]
    may_vouch = opts.allow_unverified_issuer or opts.trust_anchor
    vouched: set[int] = set()
    while pending:
        pending, progress = _resolve_round(pending, local, by_index)
        if not progress and may_vouch:
            progress = _vouch(pending, local, vouched)
        if not progress:
            break
    return by_index, pending


@dataclass
class ImportChunk:
    """What a worker made of a chunk of files: store records ready for COPY (idx = position),
    their serials, refusals, and certificates whose issuer it did not know yet."""

    records: list[NewCertificate] = field(default_factory=list)
    serials: list[str] = field(default_factory=list)
    new_issuers: list[Issuer] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    deferred: list[tuple[str, bytes]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    unverified: int = 0
    files: int = 0
    certificates: int = 0  # read in this chunk, deferred ones included (progress counts these)
    # this worker's CPU time by stage (read, parse, verify: issuer and signature, rows: the
    # lodging decision and the store record), its CPU and wall time in all, for the profile
    seconds: dict[str, float] = field(default_factory=dict)


def import_chunk(items: Sequence[tuple[str, bytes | None]], issuers: IssuerMap,
                 opts: CertOptions, defer_missing: bool) -> ImportChunk:
    """Bulk-import worker: read (when the bytes are None), parse, verify and decide.
    Runs in a worker process; everything it needs comes in, everything it found goes out."""
    from repository_server.store.models import NewCertificate

    perf = time.thread_time  # CPU, not wall: on a busy machine a worker also waits for a core
    started, cpu_started = time.perf_counter(), perf()
    out = ImportChunk()
    verify = opts.check_signatures
    t_read = t_parse = t_verify = t_rows = 0.0
    for name, data in items:
        out.files += 1
        t0 = perf()
        try:
            if data is None:
                with open(name, "rb") as fh:
                    raw = fh.read()
            else:
                raw = data
            if data is None and b"-----BEGIN" in raw and b"CERTIFICATE-----" not in raw:
                out.skipped.append(f"{name}: PEM file without a certificate (a key?)")
                continue
            ders = [raw] if data is not None else load_pem_or_der_certificates(raw)
        except (OSError, ParseError) as exc:
            out.refused.append(f"{name}: {exc}")
            out.certificates += 1
            continue
        finally:
            t_read += perf() - t0
        out.certificates += len(ders)
        for i, der in enumerate(ders):
            label = name if len(ders) == 1 else f"{name}[{i}]"
            t0 = perf()
            try:
                info = parse_certificate(der)
            except ParseError as exc:
                t_parse += perf() - t0
                out.refused.append(f"{label}: not a certificate: {exc}")
                continue
            t1 = perf()
            t_parse += t1 - t0
            if info.self_signed:
                p = Parsed(0, info)
            else:
                issuer, err, missing = resolve_issuer(info, issuers, verify=verify)
                p = Parsed(0, info, err, issuer, missing)
            t2 = perf()
            t_verify += t2 - t1
            d = decide(p, opts, defer_missing)
            if d.defer:
                out.deferred.append((label, der))
            elif d.reason is not None:
                out.refused.append(f"{label}: {d.reason}")
            else:
                out.records.append(NewCertificate.of(
                    len(out.records), info, status=opts.status,
                    manufacturing_flag=opts.manufacturing_flag, issuer_verified=d.verified,
                    trust_anchor=d.anchor, extra_findings=d.extra))
                out.serials.append(info.serial)
                if any(e["code"] == "issuer-unverified" for e in d.extra):
                    out.unverified += 1
                if info.kind in (CertKind.ROOT, CertKind.CA):
                    out.new_issuers.append(Issuer(None, info.subject_dn, info.subject_key_id,
                                                  info.public_key_der, True,
                                                  info.kind == CertKind.ROOT))
            t_rows += perf() - t2
    out.seconds = {"read": t_read, "parse": t_parse, "verify": t_verify, "rows": t_rows,
                   "cpu": perf() - cpu_started, "wall": time.perf_counter() - started}
    return out
