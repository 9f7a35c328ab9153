"""In-memory stand-ins for the store's Protocols (`repository_server/store/protocols.py`),
for fast tests of the services' rules without PostgreSQL. Each implements its Protocol
(checked by mypy at the bottom of this file) with the same outcomes the SQL gives for the
cases the tests exercise: identities, conflicts, identical bytes, versions, change events.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, date, datetime
from typing import Any

from repository_server import events
from repository_server.pki.model import CrlInfo
from repository_server.store.models import (
    ConflictError,
    CpmRow,
    IssuerRow,
    NewCertificate,
    UserRow,
)
from repository_server.store.protocols import LodgingStore, ServiceLevelCounts


class FakeLodgingStore:
    """Certificates, CRLs, documents and the audit trail, in lists."""

    def __init__(self) -> None:
        self.certificates: list[tuple[int, NewCertificate]] = []  # (id, record)
        self.crls: list[dict[str, Any]] = []
        self.documents: dict[str, list[tuple[bytes, str]]] = {}  # name -> (sha256, type)
        self.audits: list[dict[str, Any]] = []
        self.seq = 0

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    async def audit(self, **entry: Any) -> None:
        self.audits.append(entry)

    async def issuers(self, *, key_id: bytes | None = None, subject_dn: bytes | None = None,
                      cas_only: bool = True) -> list[IssuerRow]:
        return [IssuerRow(i, c.subject_dn, c.subject_key_id, c.kind, c.der)
                for i, c in self.certificates
                if (not cas_only or c.kind in ("root", "ca"))
                and (key_id is None or c.subject_key_id == key_id)
                and (subject_dn is None or c.subject_dn == subject_dn)]

    async def insert_certificates(
        self, records: Sequence[NewCertificate], *, lodged_by: str, audit: dict[str, Any],
    ) -> tuple[list[int], list[int], list[events.Event], int]:
        held = [c for _, c in self.certificates]
        conflicts = sorted({i for i, r in enumerate(records) for c in [*held, *records]
                            if c.serial == r.serial and c.issuer_dn == r.issuer_dn
                            and c.sha256 != r.sha256})
        if conflicts:
            raise ConflictError("a different certificate with the same issuer and serial"
                                " exists", conflicts)
        stored: list[int] = []
        identical: list[int] = []
        seen = {c.sha256 for c in held}
        floor = len(self.certificates)
        for i, r in enumerate(records):
            if r.sha256 in seen:
                identical.append(i)
                continue
            seen.add(r.sha256)
            stored.append(i)
            self.certificates.append((len(self.certificates) + 1, r))
        self.audits.append(audit)
        if not stored:
            return stored, identical, [], 0
        return (stored, identical, [events.CertificatesLodged(floor, len(self.certificates))],
                self._next_seq())

    async def set_status(self, serial: str, issuer_key_id: bytes | None, status: str | None,
                         manufacturing_flag: bool | None, audit: dict[str, Any]
                         ) -> tuple[list[dict[str, Any]], int, list[events.Event]]:
        found = [(n, i, c) for n, (i, c) in enumerate(self.certificates) if c.serial == serial
                 and (issuer_key_id is None or c.issuer_key_id == issuer_key_id)]
        if len(found) > 1:
            raise ConflictError("serial is not unique: give the issuer key id")
        if not found:
            return [], 0, []
        n, cert_id, c = found[0]
        new = c._replace(status=status or c.status, manufacturing_flag=(
            c.manufacturing_flag if manufacturing_flag is None else manufacturing_flag))
        self.certificates[n] = (cert_id, new)
        self.audits.append(audit)
        row = {"id": cert_id, "serial": serial, "issuer_key_id": c.issuer_key_id,
               "status": new.status, "manufacturing_flag": new.manufacturing_flag,
               "eui64": c.eui64}
        return [row], self._next_seq(), [events.StatusChanged(serial, c.eui64)]

    async def insert_crl(self, info: CrlInfo, *, kind: str, issuer_key_id: bytes,
                         issuer_cert_id: int, lodged_by: str, audit: dict[str, Any],
                         lint: list[dict[str, str]]
                         ) -> tuple[str, int | None, int, list[events.Event]]:
        assert info.crl_number is not None
        mine = [c["crl_number"] for c in self.crls if c["issuer_key_id"] == issuer_key_id]
        current = max(mine) if mine else None
        if any(c["sha256"] == info.sha256 for c in self.crls):
            self.audits.append({**audit, "outcome": "noop"})
            return "identical", current, 0, []
        if current is not None and info.crl_number <= current:
            raise ConflictError(f"CRL number {info.crl_number} is not greater than the stored"
                                f" {current} for this issuer")
        self.crls.append({"issuer_key_id": issuer_key_id, "crl_number": info.crl_number,
                          "sha256": info.sha256, "kind": kind, "lint": json.dumps(lint)})
        self.audits.append(audit)
        return "stored", current, self._next_seq(), [events.CrlLodged(issuer_key_id)]

    async def insert_document(self, name: str, content_type: str, body: bytes, sha256: bytes,
                              *, lodged_by: str, audit: dict[str, Any]
                              ) -> tuple[str, int, int, list[events.Event]]:
        versions = self.documents.setdefault(name, [])
        if versions and versions[-1] == (sha256, content_type):
            self.audits.append({**audit, "outcome": "noop"})
            return "identical", len(versions), 0, []
        versions.append((sha256, content_type))
        self.audits.append(audit)
        return "stored", len(versions), self._next_seq(), [events.DocumentLodged(name)]


class FakeServiceLevelStore:
    """What the service-level counter flushes, summed as the SQL sums it."""

    def __init__(self, users: Sequence[UserRow] = ()) -> None:
        self.cpm: dict[tuple[str, str, str, str, float], CpmRow] = {}
        self.demand: dict[tuple[date, str, int], int] = {}
        self.flushes = 0
        self._users = list(users)

    async def add_service_level_counts(self, cpm: Sequence[CpmRow],
                                       demand: Sequence[tuple[Any, str, int, int]]) -> None:
        self.flushes += 1
        for r in cpm:
            key = (r.month, r.interface, r.operation, r.user_name, r.trt_seconds)
            old = self.cpm.get(key)
            if old is not None:
                r = CpmRow(r.month, r.interface, r.operation, r.user_name,
                           old.received + r.received, old.answered + r.answered,
                           old.within_trt + r.within_trt, old.failed + r.failed,
                           old.seconds_sum + r.seconds_sum,
                           tuple(a + b for a, b in zip(old.buckets, r.buckets, strict=True)),
                           r.trt_seconds, old.refused + r.refused)
            self.cpm[key] = r
        for day, user, band, requests in demand:
            self.demand[(day, user, band)] = self.demand.get((day, user, band), 0) + requests

    async def cpm_counts(self, month: str) -> list[CpmRow]:
        return [r for k, r in sorted(self.cpm.items()) if k[0] == month]

    async def demand_counts(self, day: date) -> list[tuple[str, int, int]]:
        return sorted((user, band, n) for (d, user, band), n in self.demand.items() if d == day)

    async def users(self) -> list[UserRow]:
        return list(self._users)


def user(name: str, forecast: int | None = None,
         bands: tuple[int, int, int, int] | None = None) -> UserRow:
    """A party user as the store would hold it."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    return UserRow(1, name, "party", None, None, None, False, False, forecast, bands, now, now)


def _implements() -> tuple[LodgingStore, ServiceLevelCounts]:
    """The fakes implement the Protocols the services take (mypy checks this)."""
    return FakeLodgingStore(), FakeServiceLevelStore()
