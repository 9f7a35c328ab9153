"""Parse and verify certificates in bulk, in worker processes (picklable, no I/O).

The parent passes the issuers it knows (every CA in the repository, keyed by subject key
id); each item comes back parsed with its issuer resolved, or with a reason. Items whose
issuer is not among them come back `issuer_missing` and the parent resolves them (issuers
lodged in the same batch, or non-CA issuers found by key id) in a second, in-process round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..pki.model import CertInfo
from ..pki.profile import ParseError, parse_certificate, verify_signature


@dataclass(frozen=True, slots=True)
class Issuer:
    id: int | None  # None: in the same batch, not stored yet
    subject_dn: bytes
    subject_key_id: bytes | None
    public_key_der: bytes
    is_ca: bool


IssuerMap = Mapping[bytes, Sequence[Issuer]]  # subject DN -> candidates


@dataclass(frozen=True, slots=True)
class Parsed:
    index: int
    info: CertInfo | None
    error: str | None = None  # refusal reason (unparseable, bad signature)
    issuer: Issuer | None = None
    issuer_missing: bool = False  # no candidate issuer known


def resolve_issuer(info: CertInfo, issuers: IssuerMap) -> tuple[Issuer | None, str | None, bool]:
    """(issuer, error, missing). Candidates are certificates whose subject is our issuer
    and, when both have one, whose subject key id equals our authority key id."""
    candidates = [
        c for c in issuers.get(info.issuer_dn, ())
        if info.issuer_key_id is None or c.subject_key_id is None
        or c.subject_key_id == info.issuer_key_id
    ]
    if not candidates:
        return None, None, True
    for candidate in candidates:
        if verify_signature(info, candidate.public_key_der):
            return candidate, None, False
    return None, (f"signature does not verify under the public key of issuer "
                  f"{info.issuer_name!r}"), False


def parse_items(start: int, ders: Sequence[bytes], issuers: IssuerMap) -> list[Parsed]:
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
        issuer, err, missing = resolve_issuer(info, issuers)
        out.append(Parsed(index, info, err, issuer, missing))
    return out
