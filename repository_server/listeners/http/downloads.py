"""Download routes: certificates by serial, CRLs/ARLs, documents, with validators.

URL scheme (documented in the README):
  GET /certificates/{serial}[.der|.pem][?issuer=KEYID]   application/pkix-cert or PEM
  GET /crls                                             JSON list of current CRLs/ARLs
  GET /crls/{issuer key id}.crl                         current CRL/ARL of that issuer
  GET /crls/{issuer key id}/{crl number}.crl            one version
  GET /crls/{issuer key id}/versions                    JSON list of versions
  GET /documents                                        JSON list (current versions)
  GET /documents/{name}                                 current version
  GET /documents/{name}/{version}                       one version
  GET /documents/{name}/versions                        JSON list of versions
  GET /certificates/search.cgi?ATTRIBUTE=KEY            RFC 4387 certificate store
  GET /crls/search.cgi?ATTRIBUTE=KEY                    RFC 4387 CRL store
Certificates are immutable (long max-age); those that need an API key (organisation and
device certificates, unless web.open_reads) are `private`, so that no shared cache hands them
to a client without a key. A CRL's max-age never reaches past its nextUpdate and its Expires is
the nextUpdate. Documents are attachments of an allow-listed type (`doctypes`). Every path and
query parameter that cannot name anything stored is a 400 or 404 with a reason, before any
lookup. The handlers only look up and format: the bytes and validators come ready-made from
the catalog.
"""

from __future__ import annotations

import base64
import re
import textwrap
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from aiohttp import web

from repository_server import doctypes
from repository_server.access import ReadAccess
from repository_server.accounts.keys import User
from repository_server.config import Config
from repository_server.jsontime import json_time, json_time_or_none
from repository_server.listeners.http.apikeys import authenticated, key_refusal
from repository_server.listeners.http.http_cache import not_modified
from repository_server.pki.certstore import CERT_ATTRIBUTES, CRL_ATTRIBUTES, SearchKeyError, parse_query
from repository_server.pki.ids import IdentifierError, format_key_id, parse_key_id, parse_serial
from repository_server.readmodel.catalog import (
    Catalog,
    CertEntry,
    CrlEntry,
    DocEntry,
    SearchIndexBuilding,
)
from repository_server.readmodel.records import DocRecord, http_date

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
FastHandler = Callable[[web.Request, User | None], web.Response | None]

PKIX_CERT = "application/pkix-cert"
PKIX_CRL = "application/pkix-crl"
PEM = "application/x-pem-file"


# a path's numbers, in ASCII digits only (str.isdigit also takes "²" and "١"), and their
# bounds: document versions are PostgreSQL integers, CRL numbers at most 20 octets (RFC 5280)
_NUMBER = re.compile(r"[0-9]{1,60}", re.ASCII)
MAX_DOC_VERSION = 2**31 - 1
MAX_CRL_NUMBER = 2**160 - 1

RETRY_AFTER = "5"  # seconds: how soon a client may retry while the store is unavailable
UNAVAILABLE = "the repository store is unavailable; try again shortly"


def error(status: int, reason: str) -> web.Response:
    return web.json_response({"status": status, "reason": reason}, status=status)


def unavailable_response() -> web.Response:
    """503 with Retry-After: PostgreSQL cannot be reached and the answer is not in memory."""
    response = error(503, UNAVAILABLE)
    response.headers["Retry-After"] = RETRY_AFTER
    return response


def etag(sha_hex: str, variant: str = "") -> str:
    """The strong ETag of stored bytes: their SHA-256 (a variant, such as "-pem", for
    another representation of the same bytes)."""
    return '"' + sha_hex + variant + '"'


def _pem(der: bytes) -> bytes:
    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n".encode()


def path_number(text: str, limit: int) -> int | None:
    """A number from a path segment: ASCII digits, at most `limit`; None otherwise."""
    if not _NUMBER.fullmatch(text):
        return None
    number = int(text)
    return number if number <= limit else None


def _wants_pem(request: web.Request, name: str) -> tuple[str, bool]:
    if name.endswith(".pem"):
        return name[:-4], True
    if name.endswith((".der", ".cer", ".crt")):
        return name[:-4], False
    accept = request.headers.get("Accept", "")
    return name, PEM in accept and PKIX_CERT not in accept


def _search_answer(content_type: str, bodies: list[bytes], total: int, cache_control: str,
                   limit: int) -> web.Response:
    """One object as itself; several as multipart/mixed (RFC 2046), binary parts."""
    headers = {"Cache-Control": cache_control, "X-Total-Count": str(total)}
    if total > len(bodies):
        headers["X-Results-Limit"] = str(limit)
    if len(bodies) == 1:
        return web.Response(body=bodies[0], content_type=content_type, headers=headers)
    boundary = uuid.uuid4().hex
    while any(boundary.encode() in b for b in bodies):  # pragma: no cover - 2**-122
        boundary = uuid.uuid4().hex
    part_head = (f"--{boundary}\r\nContent-Type: {content_type}\r\n"
                 "Content-Transfer-Encoding: binary\r\n\r\n").encode()
    body = b"".join(part_head + b + b"\r\n" for b in bodies) + f"--{boundary}--\r\n".encode()
    headers["Content-Type"] = f'multipart/mixed; boundary="{boundary}"'
    return web.Response(body=body, headers=headers)


class Downloads:
    def __init__(self, catalog: Catalog, config: Config, access: ReadAccess) -> None:
        self.catalog = catalog
        self.config = config
        self.access = access  # the read rule of the HTTP interface (web.open_reads)
        web_cfg = config.web
        # certificates, CRL versions and document versions never change; those that need a
        # key may be kept by the client's own cache only
        self._immutable = f"public, max-age={web_cfg.cert_max_age}, immutable"
        self._private = f"private, max-age={web_cfg.cert_max_age}, immutable"
        self._cert_static = {True: {"Content-Type": PKIX_CERT, "Cache-Control": self._immutable,
                                    "Vary": "Accept"},
                             False: {"Content-Type": PKIX_CERT, "Cache-Control": self._private,
                                     "Vary": "Accept"}}
        # The read rule's answer for one certificate, per (public, authenticated reader): its
        # static headers, or None (refused). Worked out once from `access` for the hottest
        # path, the download by serial; the rule itself stays in access.py.
        self._cert_answer = {
            (public, reader): self._cert_static[access.shared(public=public)]
            if access.may_read(public=public, authenticated=reader) else None
            for public in (False, True) for reader in (False, True)}

    def _cache_control(self, public: bool) -> str:
        """Cache-Control of a certificate: `private` when it needs an API key."""
        return self._immutable if self.access.shared(public=public) else self._private

    def routes(self) -> list[tuple[str, str, str, Handler]]:
        """(method, path, operation, handler); HEAD is answered for every GET. The operation
        names the request in the CPM 8 counts."""
        return [  # (search.cgi before the {serial} and {key} routes it would match)
            ("GET", "/certificates/search.cgi", "search-cgi", self.search_certificates),
            ("GET", "/crls/search.cgi", "search-cgi", self.search_crls),
            ("GET", "/certificates/{serial}", "certificate", self.certificate),
            ("GET", "/crls", "crl-list", self.crl_list),
            ("GET", "/crls/{key}/versions", "crl-versions", self.crl_versions),
            ("GET", "/crls/{key}/{number}", "crl", self.crl_version),
            ("GET", "/crls/{key}", "crl", self.crl_current),
            ("GET", "/documents", "document-list", self.document_list),
            ("GET", "/documents/{name}/versions", "document-versions", self.document_versions),
            ("GET", "/documents/{name}/{version}", "document", self.document_version),
            ("GET", "/documents/{name}", "document", self.document_current),
        ]

    # -- certificates -------------------------------------------------------------------
    def fast_paths(self) -> dict[str, FastHandler]:
        """Synchronous answers for the hottest route, tried before the full handler."""
        return {"/certificates/{serial}": self.certificate_cached}

    def certificate_cached(self, request: web.Request, user: User | None) -> web.Response | None:
        """The common case, answered without a coroutine, parsing or negotiation: the serial
        is spelt canonically, is in the replica and unique, the client may read it and wants DER
        unconditionally. None sends the request to `certificate` (see BENCHMARKS.md)."""
        raw = request.raw_path
        if "?" in raw and ("?apikey=" not in raw or "&" in raw):  # other parameters
            return None
        headers = request.headers
        if ("If-None-Match" in headers or "If-Modified-Since" in headers
                or PEM in headers.get("Accept", "")):
            return None
        answer = self.certificate_answer(request.match_info["serial"], user is not None)
        if answer is None:
            return None
        der, tag, last_modified, static = answer
        return web.Response(body=der, headers={**static, "ETag": tag,
                                               "Last-Modified": last_modified})

    def certificate_answer(self, serial: str, reader: bool
                           ) -> tuple[bytes, str, str, dict[str, str]] | None:
        """The common download by serial, once the request is known to want DER
        unconditionally: (DER, ETag, Last-Modified, the read rule's static headers: Content-Type,
        Cache-Control, Vary), `reader` saying whether the request has an authenticated reader.
        None when `certificate` must answer (not exactly one certificate, or refused). The
        static headers are one of two dicts that live as long as this object (the HTTP fast
        front keys its pre-encoded heads on them)."""
        found = self.catalog.download(serial)
        if found is None:
            return None
        der, sha_hex, last_modified, public = found
        static = self._cert_answer[public, reader]
        if static is None:
            return None
        return der, etag(sha_hex), last_modified, static

    async def certificate(self, request: web.Request) -> web.StreamResponse:
        raw = request.match_info["serial"]
        name, pem = _wants_pem(request, raw)
        try:
            serial = parse_serial(name)
        except IdentifierError as exc:
            return error(400, str(exc))
        entries = await self.catalog.certificates(serial)
        issuer = request.query.get("issuer")
        if issuer is not None:
            try:
                key_id = parse_key_id(issuer)
            except IdentifierError as exc:
                return error(400, f"issuer: {exc}")
            entries = tuple(e for e in entries if e.issuer_key_id == key_id)
        if not entries:
            return error(404, f"no certificate with serial {serial}"
                         + (f" from issuer {issuer.upper()}" if issuer else ""))
        if len(entries) > 1:
            choices = ", ".join(format_key_id(e.issuer_key_id) for e in entries if e.issuer_key_id)
            return error(300, f"serial {serial} is not unique: add ?issuer= one of {choices}")
        if not self.access.may_read(public=entries[0].public,
                                    authenticated=authenticated(request)):
            return error(403, key_refusal(request, "organisation and device certificates")
                         + " (CA certificates, CRLs and documents need none)")
        return self._cert_response(request, entries[0], pem)

    def _cert_response(self, request: web.Request, entry: CertEntry, pem: bool) -> web.Response:
        headers = {
            "ETag": etag(entry.sha_hex, "-pem" if pem else ""),
            "Last-Modified": entry.http_last_modified,
            "Cache-Control": self._cache_control(entry.public),
            "Vary": "Accept",
        }
        if not_modified(request.headers, headers["ETag"], entry.modified_ts):
            return web.Response(status=304, headers=headers)
        if pem:
            return web.Response(body=_pem(entry.der), content_type=PEM, headers=headers)
        return web.Response(body=entry.der, content_type=PKIX_CERT, headers=headers)

    # -- RFC 4387 certificate and CRL stores ---------------------------------------------------
    async def search_certificates(self, request: web.Request) -> web.StreamResponse:
        """One certificate: application/pkix-cert; several: multipart/mixed, at most
        web.search_max_results of them (oldest first), X-Total-Count saying how many match."""
        try:
            key = parse_query(request.query, CERT_ATTRIBUTES, "certificate")
        except SearchKeyError as exc:
            return error(400, str(exc))
        limit = self.config.web.search_max_results
        try:
            found, total = await self.catalog.search_certificates(key, limit)
        except SearchIndexBuilding as exc:
            response = error(503, str(exc))
            response.headers["Retry-After"] = RETRY_AFTER
            return response
        if not found:
            return error(404, "no certificate matches the search")
        publics = [c.public for c in found]
        if not self.access.may_read_all(publics, authenticated=authenticated(request)):
            return error(403, key_refusal(request, "organisation and device certificates")
                         + " (CA certificates and CRLs need none)")
        # what matches a key grows with lodgings: revalidated, never `immutable`
        scope = self.access.cache_scope(public=all(publics))
        return _search_answer(PKIX_CERT, [c.der for c in found], total, f"{scope}, no-cache",
                              limit)

    async def search_crls(self, request: web.Request) -> web.StreamResponse:
        """The current CRL/ARL of each issuer the key names."""
        try:
            key = parse_query(request.query, CRL_ATTRIBUTES, "CRL")
        except SearchKeyError as exc:
            return error(400, str(exc))
        found = await self.catalog.search_crls(key)
        if not found:
            return error(404, "no current CRL or ARL matches the search")
        return _search_answer(PKIX_CRL, [e.row.der for e in found], len(found), "no-cache",
                              len(found))

    # -- CRLs ---------------------------------------------------------------------------
    def _crl_key(self, request: web.Request, suffix: bool) -> bytes:
        raw = request.match_info["key"]
        if suffix:
            if not raw.endswith(".crl"):
                raise web.HTTPNotFound()
            raw = raw[:-4]
        return parse_key_id(raw)

    def _crl_response(self, request: web.Request, entry: CrlEntry, current: bool) -> web.Response:
        row = entry.row
        headers = {"ETag": etag(entry.sha_hex), "Last-Modified": http_date(row.this_update)}
        if current:
            now = time.time()
            max_age = self.config.web.crl_max_age
            if entry.next_update_ts is not None and row.next_update is not None:
                max_age = max(0, min(max_age, int(entry.next_update_ts - now)))
                headers["Expires"] = http_date(row.next_update)
            else:
                headers["Expires"] = http_date(datetime.fromtimestamp(now + max_age, UTC))
            headers["Cache-Control"] = f"public, max-age={max_age}, must-revalidate"
        else:
            headers["Cache-Control"] = self._immutable
        if not_modified(request.headers, headers["ETag"], entry.modified_ts):
            return web.Response(status=304, headers=headers)
        headers["Content-Disposition"] = f'inline; filename="{entry.filename}"'
        headers["Content-Type"] = PKIX_CRL
        return web.Response(body=row.der, headers=headers)

    async def crl_current(self, request: web.Request) -> web.StreamResponse:
        try:
            key = self._crl_key(request, suffix=True)
        except IdentifierError as exc:
            return error(400, str(exc))
        entry = await self.catalog.current_crl(key)
        if entry is None:
            return error(404, f"no CRL or ARL from issuer key id {format_key_id(key)}")
        return self._crl_response(request, entry, current=True)

    async def crl_version(self, request: web.Request) -> web.StreamResponse:
        number_text = request.match_info["number"]
        if not number_text.endswith(".crl"):
            return error(404, "expected /crls/{issuer key id}/{crl number}.crl")
        number = path_number(number_text[:-4], MAX_CRL_NUMBER)
        if number is None:
            return error(404, "a CRL number is decimal digits, at most 20 octets: expected"
                         " /crls/{issuer key id}/{crl number}.crl")
        try:
            key = self._crl_key(request, suffix=False)
        except IdentifierError as exc:
            return error(400, str(exc))
        entry = await self.catalog.crl_version(key, number)
        if entry is None:
            return error(404, f"no CRL number {number} from issuer key id {format_key_id(key)}")
        return self._crl_response(request, entry, current=False)

    async def crl_list(self, request: web.Request) -> web.StreamResponse:
        rows = await self.catalog.reads.current_crls()
        now = datetime.now(UTC)
        return web.json_response([
            {
                "kind": r.kind,
                "issuer": r.issuer_name,
                "issuer_key_id": format_key_id(r.issuer_key_id),
                "crl_number": r.crl_number,
                "this_update": json_time(r.this_update),
                "next_update": json_time_or_none(r.next_update),
                "overdue": bool(r.next_update and r.next_update < now),
                "revoked": r.revoked_count,
                "sha256": r.sha256.hex(),
                "size": len(r.der),
                "url": f"/crls/{format_key_id(r.issuer_key_id)}.crl",
            }
            for r in rows
        ], headers={"Cache-Control": "no-cache"})

    async def crl_versions(self, request: web.Request) -> web.StreamResponse:
        try:
            key = self._crl_key(request, suffix=False)
        except IdentifierError as exc:
            return error(400, str(exc))
        versions = await self.catalog.reads.crl_versions(key)
        if not versions:
            return error(404, f"no CRL or ARL from issuer key id {format_key_id(key)}")
        hexkey = format_key_id(key)
        return web.json_response([
            {"crl_number": n, "this_update": json_time(t),
             "next_update": json_time_or_none(nu), "url": f"/crls/{hexkey}/{n}.crl"}
            for n, t, nu in versions
        ], headers={"Cache-Control": "no-cache"})

    # -- documents -------------------------------------------------------------------------
    def _doc_response(self, request: web.Request, entry: DocEntry, current: bool) -> web.Response:
        """A document as a download: an attachment of an allow-listed type, never content a
        browser would run on this origin (whatever type an earlier version stored)."""
        row = entry.row
        content_type = doctypes.safe_type(row.content_type)
        headers = {
            "ETag": etag(entry.sha_hex),
            "Last-Modified": http_date(row.lodged_at),
            "Cache-Control": (f"public, max-age={self.config.web.document_max_age}"
                              if current else self._immutable),
            "Content-Disposition": doctypes.disposition(row.name, content_type),
            "X-Document-Version": str(row.version),
            **doctypes.DOWNLOAD_HEADERS,
        }
        if not_modified(request.headers, headers["ETag"], entry.modified_ts):
            return web.Response(status=304, headers=headers)
        assert row.body is not None
        headers["Content-Type"] = content_type
        return web.Response(body=row.body, headers=headers)

    @staticmethod
    def _doc_name(request: web.Request) -> tuple[str, web.Response | None]:
        """The document name of the path, or a 404 for a name no document can have."""
        name = request.match_info["name"]
        if doctypes.is_document_name(name):
            return name, None
        return name, error(404, f"no document named {name[:210]!r}: a document name is letters,"
                           " digits, '.', '_' and '-', up to 200 characters")

    async def document_current(self, request: web.Request) -> web.StreamResponse:
        name, refused = self._doc_name(request)
        if refused is not None:
            return refused
        entry = await self.catalog.document(name)
        if entry is None:
            return error(404, f"no document named {name!r}")
        return self._doc_response(request, entry, current=True)

    async def document_version(self, request: web.Request) -> web.StreamResponse:
        name, refused = self._doc_name(request)
        if refused is not None:
            return refused
        version_text = request.match_info["version"]
        version = path_number(version_text, MAX_DOC_VERSION)
        if version is None:
            return error(404, "expected /documents/{name}/{version number}: a version is"
                         f" decimal digits, at most {MAX_DOC_VERSION}")
        entry = await self.catalog.document(name, version)
        if entry is None:
            return error(404, f"no version {version} of document {name!r}")
        return self._doc_response(request, entry, current=False)

    @staticmethod
    def _doc_json(row: DocRecord) -> dict[str, object]:
        return {"name": row.name, "version": row.version,
                "content_type": doctypes.safe_type(row.content_type),
                "size": row.size, "sha256": row.sha256.hex(),
                "lodged_at": json_time(row.lodged_at),
                "url": f"/documents/{row.name}/{row.version}"}

    async def document_list(self, request: web.Request) -> web.StreamResponse:
        rows = await self.catalog.reads.documents()
        return web.json_response([self._doc_json(r) for r in rows],
                                 headers={"Cache-Control": "no-cache"})

    async def document_versions(self, request: web.Request) -> web.StreamResponse:
        name, refused = self._doc_name(request)
        if refused is not None:
            return refused
        rows = await self.catalog.reads.document_versions(name)
        if not rows:
            return error(404, f"no document named {name!r}")
        return web.json_response([self._doc_json(r) for r in rows],
                                 headers={"Cache-Control": "no-cache"})
