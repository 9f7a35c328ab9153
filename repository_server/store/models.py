"""What the store hands out and takes in, and the conversion between those values and
table rows, in one place: the column lists each `SELECT` names and the functions that turn
a fetched row into a value (and a certificate to lodge into the columns COPY fills).

Pure: no connection, no SQL statement beyond column lists.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from repository_server.pki.model import CertInfo
from repository_server.readmodel.records import CrlRecord


class ConflictError(Exception):
    """Another object already holds this identity (issuer + serial, or CRL number)."""

    def __init__(self, message: str, items: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.items = list(items)


# -- certificates ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CertRow:
    id: int
    serial: str
    issuer_key_id: bytes | None
    der: bytes
    sha256: bytes
    lodged_at: datetime
    kind: str
    eui64: bytes | None
    role: int | None
    usage: str | None
    status: str  # lodged status P/I/N (R and E are computed when answering)
    manufacturing_flag: bool
    not_after: datetime
    not_before: datetime
    subject_key_id: bytes | None
    subject_name: str
    issuer_name: str


CERT_ROW_COLS = ("id, serial, issuer_key_id, der, sha256, lodged_at, kind, eui64, role, usage,"
                 " status, manufacturing_flag, not_after, not_before, subject_key_id, subject_name,"
                 " issuer_name")


@dataclass(frozen=True, slots=True)
class IssuerRow:
    id: int
    subject_dn: bytes
    subject_key_id: bytes | None
    kind: str
    der: bytes


class NewCertificate(NamedTuple):
    """A certificate accepted for lodging, as it is written: the values of the columns
    `CERT_COLUMNS` names, in order (what COPY takes as is). `idx` is its position in the
    batch (conflicts are reported by it). A NamedTuple rather than a dataclass: lodging
    builds one per certificate (50,000 to a batch) and bulk import pickles them from worker
    processes, where a tuple costs a fraction of a frozen dataclass."""

    idx: int
    serial: str
    issuer_dn: bytes
    issuer_name: str
    issuer_key_id: bytes | None
    subject_dn: bytes
    subject_name: str
    subject_key_id: bytes | None
    eui64: bytes | None
    role: int | None
    usage: str | None
    kind: str
    not_before: datetime
    not_after: datetime
    sha256: bytes
    sha1: bytes
    der: bytes
    status: str
    manufacturing_flag: bool
    lint: str  # JSON array of {"code", "message"}
    issuer_verified: bool
    trust_anchor: bool

    @classmethod
    def of(cls, idx: int, info: CertInfo, *, status: str, manufacturing_flag: bool,
           issuer_verified: bool, trust_anchor: bool,
           extra_findings: Sequence[dict[str, str]] = ()) -> NewCertificate:
        lint = [{"code": f.code, "message": f.message} for f in info.findings]
        lint += list(extra_findings)
        return cls(
            idx, info.serial, info.issuer_dn, info.issuer_name, info.issuer_key_id,
            info.subject_dn, info.subject_name, info.subject_key_id, info.eui64, info.role,
            info.usage.value if info.usage else None, info.kind.value, info.not_before,
            info.not_after, info.sha256, info.sha1, info.der, status, manufacturing_flag,
            json.dumps(lint) if lint else "[]", issuer_verified, trust_anchor)


# Columns of the COPY of new certificates, in order.
CERT_COLUMNS: tuple[str, ...] = NewCertificate._fields


# -- CRLs and documents ------------------------------------------------------------------
CrlRow = CrlRecord  # one CRL version (the replica keeps the same fields)

CRL_COLS = ("id, kind, issuer_key_id, issuer_name, crl_number, this_update, next_update,"
            " sha256, der, revoked_count, lodged_at")


def crl_row(r: Any) -> CrlRow:
    return CrlRow(id=r["id"], kind=r["kind"], issuer_key_id=r["issuer_key_id"],
                  issuer_name=r["issuer_name"], crl_number=int(r["crl_number"]),
                  this_update=r["this_update"], next_update=r["next_update"], sha256=r["sha256"],
                  der=r["der"], revoked_count=r["revoked_count"], lodged_at=r["lodged_at"])


@dataclass(frozen=True, slots=True)
class DocumentRow:
    name: str
    version: int
    content_type: str
    size: int
    sha256: bytes
    lodged_at: datetime
    body: bytes | None  # None in listings


DOC_COLS = "name, version, content_type, size, sha256, lodged_at"


# -- accounts ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class UserRow:
    id: int
    name: str
    role: str  # party | operator
    api_key_sha256: bytes | None
    api_key_hint: str | None
    password_hash: str | None
    must_change_password: bool
    disabled: bool
    forecast_per_day: int | None
    forecast_bands: tuple[int, int, int, int] | None  # percentages of the day's forecast
    created_at: datetime
    updated_at: datetime


USER_COLS = ("id, name, role, api_key_sha256, api_key_hint, password_hash, must_change_password,"
             " disabled, forecast_per_day, forecast_bands, created_at, updated_at")


def user_row(r: Any) -> UserRow:
    bands = r["forecast_bands"]
    return UserRow(r["id"], r["name"], r["role"], r["api_key_sha256"], r["api_key_hint"],
                   r["password_hash"], r["must_change_password"], r["disabled"],
                   r["forecast_per_day"], tuple(bands) if bands is not None else None,
                   r["created_at"], r["updated_at"])


@dataclass(frozen=True, slots=True)
class PortalSessionRow:
    user_name: str
    role: str
    must_change_password: bool
    created_at: datetime
    last_seen: datetime


Failures = tuple[datetime, ...]
# (recent failure times, locked until) -> the same after one more failure
FailureRule = Callable[[Failures, datetime | None], tuple[Failures, datetime | None]]
# (recent failure times, attempts in flight, locked until) -> may one more attempt begin
TryRule = Callable[[Failures, int, datetime | None], bool]
# An attempt in flight this long belonged to a process that died mid-check: a failure.
STALE_ATTEMPT_SECONDS = 120


# -- service levels ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CpmRow:
    month: str
    interface: str
    operation: str
    user_name: str
    received: int
    answered: int
    within_trt: int
    failed: int
    seconds_sum: float
    buckets: tuple[int, ...]
    trt_seconds: float  # the Target Response Time these counts were judged by
    refused: int = 0  # 400/401/403 answers: not in `received` (service_levels.REFUSED)


CPM_COLS = ("month, interface, operation, user_name, received, answered, within_trt,"
            " failed, seconds_sum, buckets, trt_seconds, refused")


def cpm_row(r: Any) -> CpmRow:
    return CpmRow(r["month"], r["interface"], r["operation"], r["user_name"], r["received"],
                  r["answered"], r["within_trt"], r["failed"], r["seconds_sum"],
                  tuple(r["buckets"]), r["trt_seconds"], r["refused"])


# -- extracts ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ExtractMarkers:
    """What an extract covers: certificates with id <= cert_id, status changes numbered
    <= change, CRL versions with id <= crl_id, document versions with id <= document_id."""

    cert_id: int = 0
    change: int = 0
    crl_id: int = 0
    document_id: int = 0


@dataclass(frozen=True, slots=True)
class ExtractRow:
    id: int
    name: str
    kind: str  # full | delta
    slot: str | None
    state: str  # producing | published | failed | removed
    started_at: datetime
    published_at: datetime | None
    previous_id: int | None
    upto: ExtractMarkers
    size: int | None
    sha256: bytes | None
    counts: dict[str, Any]


EXTRACT_COLS = ("id, name, kind, slot, state, started_at, published_at, previous_id,"
                " cert_id_upto, change_upto, crl_id_upto, document_id_upto, size, sha256, counts")


def extract_row(r: Any) -> ExtractRow:
    return ExtractRow(r["id"], r["name"], r["kind"], r["slot"], r["state"], r["started_at"],
                      r["published_at"], r["previous_id"],
                      ExtractMarkers(r["cert_id_upto"], r["change_upto"], r["crl_id_upto"],
                                     r["document_id_upto"]),
                      r["size"], r["sha256"], r["counts"])
