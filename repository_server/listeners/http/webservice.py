"""The DCC-Boxed-compatible SMKI Repository Web Service: certificate search and retrieval.

  POST /services/certificatesearch?apikey=KEY      <CertificateSearchRequest>
  POST /services/retrievecertificate?apikey=KEY    <CertificateDataRequest>

Status codes are the service's own (Smart DCC's client depends on them): 200 found, 402
nothing found, 401 invalid request (the ResponseMessage names the problem), 403 missing or
unknown API key. Every answer carries a fresh AuditReference, also in the access log. The
certificate status is worked out when answering (`Catalog.status`): R if on the issuer's
current CRL/ARL, E if expired, else as lodged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from repository_server.access import ReadAccess
from repository_server.accounts import Accounts
from repository_server.accounts.keys import User
from repository_server.config import Config
from repository_server.listeners.http import ws_xml
from repository_server.listeners.http.apikeys import UNKNOWN_KEY, request_key
from repository_server.listeners.http.downloads import RETRY_AFTER, UNAVAILABLE
from repository_server.listeners.http.ws_xml import CertificateFields, WsError
from repository_server.obs.access import NOTE, Note
from repository_server.pki.ids import format_eui64
from repository_server.readmodel.catalog import Catalog, CertEntry
from repository_server.service_levels import ANONYMOUS, ServiceLevels
from repository_server.store.pool import unavailable as store_unavailable

log = logging.getLogger(__name__)
_ROOTS = {"search": ws_xml.SEARCH_RESPONSE, "retrieve": ws_xml.DATA_RESPONSE}  # answers' roots


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class WebService:
    def __init__(self, catalog: Catalog, accounts: Accounts, config: Config,
                 levels: ServiceLevels | None, access: ReadAccess) -> None:
        self.catalog = catalog
        self.levels = levels
        self.accounts = accounts
        self.access = access  # the read rule of the HTTP interface: answers are private
        self.max_body = config.web.ws_max_body_bytes
        self.body_timeout = config.web.body_timeout_seconds
        self.refs = ws_xml.AuditReferences()
        self.headers = {"Content-Type": ws_xml.CONTENT_TYPE, "Cache-Control": "no-store"}

    def routes(self) -> list[tuple[str, str, str, Handler]]:
        """(method, path, operation, handler)."""
        return [("*", "/services/certificatesearch", "search", self.search),
                ("*", "/services/retrievecertificate", "retrieve", self.retrieve)]

    # -- shared request handling ------------------------------------------------------------
    def _reply(self, note: Note | None, status: int,
               body: Callable[[str], bytes]) -> tuple[int, bytes]:
        """(status, XML): the answer, with a fresh audit reference in its body and on the
        request's note."""
        ref = self.refs.next()
        if note is not None:
            note.audit_ref = ref
            note.outcome = str(status)
        return status, body(ref)

    def _failed(self, note: Note | None, root: str, status: int,
                message: str) -> tuple[int, bytes]:
        return self._reply(note, status,
                           lambda ref: ws_xml.error_response(root, status, message, ref))

    def _error(self, note: Note | None, root: str, status: int, message: str) -> web.Response:
        return self._response(self._failed(note, root, status, message))

    def _response(self, reply: tuple[int, bytes]) -> web.Response:
        return web.Response(body=reply[1], status=reply[0], headers=self.headers)

    def reply(self, operation: str, body: bytes, key: str | None, user: User | None,
              note: Note | None) -> tuple[int, bytes]:
        """(status, XML) for a whole request body of `operation` ("search" or "retrieve")
        from a reader who gave API key `key` (`user`: its enabled user, else None). No I/O
        but the replica's read, no await: aiohttp's handlers and the fast front
        (listeners/http/front.py) both answer with it. A store error raises (`_unavailable`)."""
        root = _ROOTS[operation]
        if len(body) > self.max_body:
            return self._failed(note, root, 401, "request body exceeds the limit of"
                                f" {self.max_body} bytes")
        if not self.access.may_read_private(authenticated=user is not None):
            reason = (UNKNOWN_KEY if key else
                      "an API key is required: add ?apikey=KEY to the URL")
            return self._failed(note, root, 403, reason)
        return (self._search if operation == "search" else self._retrieve)(body, note, root)

    async def _accept(self, request: web.Request, root: str
                      ) -> tuple[Note | None, bytes | web.Response]:
        """Receive the body: (note, body), or (note, an error answer) for a method other than
        POST, a declared size over the limit or a body not received in time."""
        note: Note | None = request.get(NOTE)
        if request.method != "POST":
            refused = self._error(note, root, 405, "use POST with an XML body")
            refused.headers["Allow"] = "POST"
            return note, refused
        declared = request.content_length
        if declared is not None and declared > self.max_body:
            return note, self._error(note, root, 401, f"request body of {declared} bytes"
                                     f" exceeds the limit of {self.max_body}")
        content = request.content
        if content.is_eof():  # the whole body came with the headers (the usual case)
            body = content.read_nowait(-1)
        else:
            try:
                async with asyncio.timeout(self.body_timeout):
                    body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                body = b"\0" * (self.max_body + 1)
            except TimeoutError:  # a slow or stalled sender does not keep a handler for ever
                answer = self._error(note, root, 408, "request body not received within"
                                     f" {self.body_timeout:g} seconds")
                answer.force_close()
                return note, answer
        return note, body

    @staticmethod
    def _fields(entry: CertEntry, status: str) -> CertificateFields:
        return CertificateFields(entry.serial, entry.eui_text, entry.kind == "device", status,
                                 entry.role, entry.usage, entry.manufacturing_flag)

    def _unavailable(self, note: Note | None, root: str, exc: Exception) -> web.Response:
        """The store cannot be reached and the answer is not in memory: 503 in the service's
        own XML shape (DCC Boxed's client treats anything but 200/401/402 as an error, so
        it never mistakes this for "not found"), with Retry-After."""
        if not store_unavailable(exc):
            raise exc
        log.warning("store unavailable for %s: %s: %s", root, type(exc).__name__, exc)
        response = self._error(note, root, 503, UNAVAILABLE)
        response.headers["Retry-After"] = RETRY_AFTER
        return response

    # -- handlers -------------------------------------------------------------------------
    async def search(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "search")

    async def retrieve(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "retrieve")

    async def _handle(self, request: web.Request, operation: str) -> web.StreamResponse:
        """aiohttp's way: the body in, the receipt counted (CPM 8), then `reply`; store
        errors become the service's own 503 (see `_unavailable`)."""
        root = _ROOTS[operation]
        try:
            note, body = await self._accept(request, root)
            if isinstance(body, web.Response):
                return body
            key = request_key(request)
            user = self.accounts.user_for_key(key) if key else None
            if note is not None:  # the request is in: CPM 8 receipt
                note.user = user.name if user else ANONYMOUS
                note.principal = user
                if self.levels is not None:
                    note.mark = self.levels.receive(note.interface, note.operation, note.user,
                                                     started=note.started)
            return self._response(self.reply(operation, body, key, user, note))
        except Exception as exc:
            return self._unavailable(request.get(NOTE), root, exc)

    def _search(self, body: bytes, note: Note | None, root: str) -> tuple[int, bytes]:
        try:
            wanted = ws_xml.parse_search(body)
        except WsError as exc:
            return self._failed(note, root, exc.status, exc.message)
        entries, statuses = self.catalog.subject_now(wanted.eui64, wanted.device, time.time())
        if not entries:
            return self._failed(note, root, 402, f"no certificates found for {wanted.field}"
                                f" {format_eui64(wanted.eui64)}")
        results = [self._fields(e, s) for e, s in zip(entries, statuses, strict=True)]
        return self._reply(note, 200, lambda ref: ws_xml.search_response(ref, results))

    def _retrieve(self, body: bytes, note: Note | None, root: str) -> tuple[int, bytes]:
        try:
            serial = ws_xml.parse_retrieve(body)
        except WsError as exc:
            return self._failed(note, root, exc.status, exc.message)
        entries, statuses = self.catalog.serial_now(serial, time.time())
        if not entries:
            return self._failed(note, root, 402, f"no certificate with serial {serial}")
        # The service describes device and organisation certificates (its answer has no
        # shape for a CA certificate: DCC Boxed's client fails on one); CA certificates are
        # downloads. Serials are unique in the GB SMKI (16 random octets); should two issuers
        # ever share one, the first lodged answers, as documented in the README.
        described = [(e, s) for e, s in zip(entries, statuses, strict=True)
                     if e.kind in ("device", "organisation")]
        if not described:
            return self._failed(note, root, 402, f"serial {serial} is a {entries[0].kind}"
                                " certificate, not a device or organisation certificate:"
                                f" download it from /certificates/{serial}")
        entry, status = described[0]
        fields = self._fields(entry, status)
        return self._reply(note, 200,
                           lambda ref: ws_xml.retrieve_response(ref, fields, entry.der))
