"""Typed results of parsing lodged objects. Produced by `pki.certificates` and `pki.crls`,
consumed by the store and the lodging path; plain frozen dataclasses so they cross process
boundaries (the batch parser runs in a process pool) by pickling."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime


class CertKind(enum.StrEnum):
    ROOT = "root"  # self-signed CA (Root OCA, Root DCA)
    CA = "ca"  # issuing CA (Issuing OCA, Issuing DCA)
    ORGANISATION = "organisation"
    DEVICE = "device"
    OTHER = "other"  # parseable but outside the GB profile (e.g. a Web PKI certificate)


class Usage(enum.StrEnum):
    DS = "DS"  # digitalSignature
    KA = "KA"  # keyAgreement
    CA = "CA"  # keyCertSign / cRLSign


@dataclass(frozen=True, slots=True)
class Finding:
    """One lint finding: a stable machine code and a one-line human explanation."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class CertInfo:
    """Everything the repository indexes about one certificate. `der` is the exact input."""

    der: bytes
    serial: str  # canonical hex (pki.ids.serial_to_hex)
    issuer_dn: bytes  # DER of the issuer Name, byte-exact from the certificate
    issuer_name: str  # RFC 4514 string, for people
    subject_dn: bytes
    subject_name: str
    issuer_key_id: bytes | None  # authorityKeyIdentifier.keyIdentifier
    subject_key_id: bytes | None
    eui64: bytes | None  # device hwSerialNum or organisation x500UniqueIdentifier
    role: int | None  # remote party role from the subject OU (decimal), None if absent
    usage: Usage | None
    kind: CertKind
    not_before: datetime  # timezone-aware UTC
    not_after: datetime
    sha256: bytes
    sha1: bytes
    self_signed: bool  # issuer == subject and the signature verifies under its own key
    public_key_der: bytes  # SubjectPublicKeyInfo DER (to verify what this CA issues)
    policies: tuple[str, ...] = ()
    findings: tuple[Finding, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class RevokedEntry:
    serial: str
    revocation_date: datetime
    reason: str | None  # cryptography ReasonFlags value, e.g. "keyCompromise"


@dataclass(frozen=True, slots=True)
class CrlInfo:
    der: bytes
    issuer_dn: bytes
    issuer_name: str
    issuer_key_id: bytes | None  # authorityKeyIdentifier.keyIdentifier
    crl_number: int | None
    this_update: datetime
    next_update: datetime | None
    sha256: bytes
    revoked: tuple[RevokedEntry, ...]
    findings: tuple[Finding, ...] = field(default_factory=tuple)
