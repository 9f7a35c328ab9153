"""What the portal's pages show, worked out from the read model: plain values for the
templates, no HTML and no aiohttp.

A certificate's decoded fields never change once lodged (only its status does), so its page
(fields from `pki.certificates`, the stored lint and the chain up to its root) is built once per
process and kept in a bounded LRU; the status is worked out on every request. A chain that
stops short of a root may be completed by a later lodging, so those pages are dropped when
certificates are lodged (NOTIFY certs:…).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from repository_server.pki.certificates import parse_certificate
from repository_server.pki.errors import ParseError
from repository_server.pki.ids import IdentifierError, format_eui64, format_key_id, parse_eui64, parse_serial
from repository_server.pki.lint import KNOWN_ROLES
from repository_server.readmodel.catalog import Catalog, CertEntry

MAX_QUERY = 200  # characters in a search box; anything longer is refused with a message
_MAX_CHAIN = 8
_CACHE_SUMMARIES = 50_000

STATUS_NAMES = {"P": "Pending", "I": "In use", "N": "Not in use", "E": "Expired", "R": "Revoked"}
USAGE_NAMES = {"DS": "Digital signature (DS)", "KA": "Key agreement (KA)",
               "CA": "Certificate and CRL signing (CA)"}
KIND_NAMES = {"root": "Root CA", "ca": "Issuing CA", "organisation": "Organisation",
              "device": "Device", "other": "Other (not GB SMKI)"}
_DEVICE_NOT_AFTER = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


def when(moment: datetime | None) -> str:
    """A date and time as the portal writes them (UTC, ISO order)."""
    if moment is None:
        return "—"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def role_text(role: int | None) -> str:
    if role is None:
        return "—"
    name = KNOWN_ROLES.get(role)
    return f"{role} ({name})" if name else str(role)


@dataclass(frozen=True, slots=True)
class Summary:
    """What a search result row shows beyond the cached entry."""

    not_before: datetime
    not_after: datetime
    subject: str
    issuer: str


@dataclass(frozen=True, slots=True)
class ChainLink:
    label: str  # subject, or a note when the issuer is missing
    serial: str | None
    issuer_key_id: str | None
    kind: str


@dataclass(frozen=True, slots=True)
class CertificateView:
    entry: CertEntry
    summary: Summary
    fields: tuple[tuple[str, str], ...]  # (label, value) in page order
    policies: tuple[str, ...]
    lint: tuple[tuple[str, str], ...]  # (code, message)
    chain: tuple[ChainLink, ...]  # issuer first, root last
    complete: bool  # the chain ends at a self-signed root


@dataclass(frozen=True, slots=True)
class Query:
    """A search box as understood: what to look up, or why nothing can be."""

    text: str
    eui64: bytes | None
    serial: str | None
    problem: str | None


def parse_query(text: str, by: str) -> Query:
    text = text.strip()
    if not text:
        return Query("", None, None, None)
    if len(text) > MAX_QUERY:
        return Query(text[:MAX_QUERY], None, None,
                     f"That is too long for an EUI-64 or a serial (at most {MAX_QUERY}"
                     " characters).")
    eui = serial = None
    if by in ("any", "eui"):
        with contextlib.suppress(IdentifierError):
            eui = parse_eui64(text)
    if by == "serial" or (by == "any" and eui is None):  # 16 hex digits: an EUI-64
        with contextlib.suppress(IdentifierError):
            serial = parse_serial(text)
    if eui is None and serial is None:
        wanted = {"eui": "an EUI-64: 16 hex digits, for example 00-DB-12-34-56-78-90-A4",
                  "serial": "a certificate serial: hex digits, for example"
                            " 13E6E3409C880FDBE71A429ACF375746"}.get(
            by, "an EUI-64 (16 hex digits, for example 00-DB-12-34-56-78-90-A4) or a"
                " certificate serial (hex digits)")
        return Query(text, None, None, f"That is not {wanted}.")
    return Query(text, eui, serial, None)


class Views:
    def __init__(self, catalog: Catalog, *, cache_entries: int) -> None:
        self.catalog = catalog
        self.cache_entries = cache_entries
        self._pages: OrderedDict[bytes, CertificateView] = OrderedDict()  # by SHA-256
        self._summaries: OrderedDict[bytes, Summary] = OrderedDict()  # by SHA-256
        # issuer key id -> the chain above it (every certificate of one CA shares it)
        self._chains: dict[bytes, tuple[tuple[ChainLink, ...], bool]] = {}

    def certificates_lodged(self, _key: str = "") -> None:
        """New certificates may complete a chain that stopped short: rebuild those pages."""
        for sha in [k for k, v in self._pages.items() if not v.complete]:
            del self._pages[sha]
        for key in [k for k, (_links, complete) in self._chains.items() if not complete]:
            del self._chains[key]

    # -- search ----------------------------------------------------------------------------
    async def search(self, query: Query) -> list[CertEntry]:
        found: dict[bytes, CertEntry] = {}
        if query.eui64 is not None:
            for device in (True, False):
                for e in await self.catalog.by_eui(query.eui64, device):
                    found.setdefault(e.sha256, e)
        if query.serial is not None:
            for e in await self.catalog.certificates(query.serial):
                found.setdefault(e.sha256, e)
        return list(found.values())

    def summary(self, entry: CertEntry) -> Summary:
        cached = self._summaries.get(entry.sha256)
        if cached is None:
            info = parse_certificate(entry.der)  # it was parsed when lodged: it parses
            cached = Summary(info.not_before, info.not_after, info.subject_name or "(empty)",
                             info.issuer_name)
            self._summaries[entry.sha256] = cached
            if len(self._summaries) > _CACHE_SUMMARIES:
                self._summaries.popitem(last=False)
        return cached

    def rows(self, entries: Sequence[CertEntry], statuses: Sequence[str]) -> list[dict[str, Any]]:
        rows = []
        for entry, status in zip(entries, statuses, strict=True):
            s = self.summary(entry)
            rows.append({
                "serial": entry.serial, "url": cert_url(entry),
                "kind": KIND_NAMES.get(entry.kind, entry.kind), "eui": entry.eui_text or "—",
                "role": role_text(entry.role), "usage": entry.usage or "—",
                "status": status, "status_name": STATUS_NAMES.get(status, status),
                "not_before": when(s.not_before), "not_after": validity_end(s.not_after),
            })
        return rows

    # -- one certificate ---------------------------------------------------------------------
    async def certificate(self, entry: CertEntry) -> CertificateView:
        page = self._pages.get(entry.sha256)
        if page is not None:
            self._pages.move_to_end(entry.sha256)
            return page
        try:
            info = parse_certificate(entry.der)
        except ParseError as exc:  # stored certificates parsed when lodged; be safe anyway
            raise ValueError(str(exc)) from exc
        record = await self.catalog.reads.certificate_record(entry.sha256) or {}
        chain, complete = await self._chain(entry, info.self_signed)
        summary = self.summary(entry)
        fields = (
            ("Serial", entry.serial),
            ("Type", KIND_NAMES.get(entry.kind, entry.kind)),
            ("Subject", info.subject_name or "(empty)"),
            ("Issuer", info.issuer_name),
            ("EUI-64", format_eui64(info.eui64) if info.eui64 and len(info.eui64) == 8
             else "—"),
            ("Remote party role", role_text(info.role)),
            ("Key usage", USAGE_NAMES.get(entry.usage or "", "—")),
            ("Subject key identifier", format_key_id(info.subject_key_id)
             if info.subject_key_id else "—"),
            ("Authority key identifier", format_key_id(info.issuer_key_id)
             if info.issuer_key_id else "—"),
            ("Valid from", when(info.not_before)),
            ("Valid until", validity_end(info.not_after)),
            ("Manufacturing flag", "true" if entry.manufacturing_flag else "false"),
            ("Issuer signature", "verified against the issuer in the repository"
             if record.get("issuer_verified") else "not verified (issuer not available)"),
            ("Trust anchor", "yes" if record.get("trust_anchor") else "no"),
            ("Lodged", when(record.get("lodged_at"))),
            ("SHA-256", entry.sha_hex.upper()),
        )
        lint = tuple((str(f.get("code", "")), str(f.get("message", "")))
                     for f in record.get("lint") or ())
        page = CertificateView(entry, summary, fields, info.policies, lint, chain, complete)
        if self.cache_entries:
            self._pages[entry.sha256] = page
            if len(self._pages) > self.cache_entries:
                self._pages.popitem(last=False)
        return page

    async def _chain(self, entry: CertEntry, self_signed: bool) -> tuple[tuple[ChainLink, ...],
                                                                         bool]:
        """The issuers of `entry` up to a self-signed root, found by key identifier."""
        if self_signed:
            return (), True
        key = entry.issuer_key_id
        found = self._chains.get(key) if key is not None else None
        if found is None:
            found = await self._walk(entry)
            if key is not None:
                if len(self._chains) >= _CACHE_SUMMARIES:
                    self._chains.clear()
                self._chains[key] = found
        return found

    async def _walk(self, entry: CertEntry) -> tuple[tuple[ChainLink, ...], bool]:
        links: list[ChainLink] = []
        current, seen = entry, {entry.sha256}
        while len(links) < _MAX_CHAIN:
            key = current.issuer_key_id
            if key is None:
                links.append(ChainLink("the issuer is not identified (no authority key"
                                       " identifier)", None, None, ""))
                return tuple(links), False
            rows = await self.catalog.reads.certificates_with_key_id(key)
            issuers = [r for r in rows if r.sha256 not in seen]
            if not issuers:
                links.append(ChainLink(f"issuer with key identifier {format_key_id(key)} is not"
                                       " in the repository", None, None, ""))
                return tuple(links), False
            issuer = (await self.catalog.certificates(issuers[0].serial))
            parent = next((e for e in issuer if e.sha256 == issuers[0].sha256), None)
            if parent is None:
                return tuple(links), False
            seen.add(parent.sha256)
            summary = self.summary(parent)
            links.append(ChainLink(summary.subject, parent.serial,
                                   format_key_id(parent.issuer_key_id)
                                   if parent.issuer_key_id else None, parent.kind))
            if parent.kind == "root":
                return tuple(links), True
            current = parent
        return tuple(links), False

    async def status_reason(self, entry: CertEntry, status: str, summary: Summary) -> dict[
            str, Any]:
        """The status and why: the CRL that revokes it, the expiry, or the lodged status."""
        out: dict[str, Any] = {"code": status, "name": STATUS_NAMES.get(status, status),
                               "crl_url": None}
        if status == "R" and entry.issuer_key_id is not None:
            found = await self.catalog.reads.revocation(entry.serial, entry.issuer_key_id)
            if found:
                kind = "ARL" if found["kind"] == "arl" else "CRL"
                reason = found["reason"] or "no reason given"
                out["reason"] = (f"on the current {kind} of its issuer, number"
                                 f" {found['crl_number']} (revoked {when(found['revocation_date'])},"
                                 f" reason: {reason})")
                out["crl_url"] = (f"/portal/crls/{format_key_id(entry.issuer_key_id)}"
                                  f"?number={found['crl_number']}")
            else:
                out["reason"] = "on the current CRL or ARL of its issuer"
        elif status == "E":
            out["reason"] = f"its validity ended {when(summary.not_after)}"
        else:
            out["reason"] = "as lodged by the DCC; it is on no current CRL or ARL"
        return out


def validity_end(not_after: datetime) -> str:
    if not_after == _DEVICE_NOT_AFTER:
        return when(not_after) + " (no expiry)"
    return when(not_after)


def cert_url(entry: CertEntry, base: str = "/portal/certificates/") -> str:
    """A certificate's portal URL (with ?issuer= in case the serial is not unique)."""
    url = base + entry.serial
    if entry.issuer_key_id is not None:
        url += "?issuer=" + format_key_id(entry.issuer_key_id)
    return url
