"""The portal's routes and thin handlers: server-rendered HTML (Jinja2, autoescaped), no
JavaScript, under /portal/ on the http and https listeners.

Every page but sign-in needs a signed-in session; a session whose password must change
(first sign-in, or after an operator's `users reset`) reaches only the password page. Every
POST carries the session's CSRF token. Pages that show lodged content and the downloads are
counted in Code Performance Measure 8 as interface "portal", for the signed-in user; sign-in,
sign-out, the password page and the stylesheet are not (they obtain nothing lodged).
Downloads reuse the download handlers (the same bytes and validators as /certificates/…,
/crls/…, /documents/…), offered as attachments.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp_jinja2
import jinja2
from aiohttp import web
from markupsafe import Markup

from repository_server.accounts import Accounts, policy
from repository_server.accounts.keys import User
from repository_server.accounts.signin import Session
from repository_server.config import Portal as PortalSettings
from repository_server.doctypes import safe_type
from repository_server.listeners.http.downloads import MAX_CRL_NUMBER, Downloads, path_number
from repository_server.listeners.http.extracts import ExtractFiles
from repository_server.listeners.http.portal import csrf
from repository_server.listeners.http.portal.views import CertificateView, Views, cert_url, parse_query, when
from repository_server.obs.access import NOTE
from repository_server.pki.ids import IdentifierError, format_key_id, parse_key_id, parse_serial
from repository_server.readmodel.catalog import Catalog
from repository_server.service_levels import ANONYMOUS, ServiceLevels

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Route = tuple[str, str, str | None, Handler]  # method, path, CPM operation (None: not counted)

COOKIE = "smki_portal"
SESSION = web.RequestKey("smki_portal_session", Session)
HOME = "/portal/"
SIGN_IN = "/portal/sign-in"
PASSWORD = "/portal/password"
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self' data:;"
                               " form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
SIGN_IN_FAILED = ("Sign-in failed. Check your username and password and try again. If it"
                  " still fails, your account may be locked or disabled: ask your repository"
                  " operator.")


def _static_files() -> dict[str, tuple[bytes, str, str]]:
    """The stylesheet (package data), read once: name -> (bytes, content type, ETag)."""
    folder = resources.files("repository_server.listeners.http.portal").joinpath("static")
    out = {}
    for item in folder.iterdir():
        if item.name.endswith(".css"):
            data = item.read_bytes()
            out[item.name] = (data, "text/css; charset=utf-8",
                              '"' + hashlib.sha256(data).hexdigest()[:32] + '"')
    return out


class Portal:
    def __init__(self, catalog: Catalog, auth: Accounts, downloads: Downloads,
                 levels: ServiceLevels | None, settings: PortalSettings,
                 extract_files: ExtractFiles | None = None, *, csrf_key: bytes) -> None:
        self.catalog = catalog
        self.csrf_key = csrf_key  # the deployment's (csrf.CSRF_SECRET in the store)
        self.store = catalog.store
        self.auth = auth
        self.downloads = downloads
        self.levels = levels
        self.settings = settings
        self.extract_files = extract_files
        self.views = Views(catalog, cache_entries=settings.detail_cache_entries)
        self.static = _static_files()
        self._bodies: OrderedDict[str, tuple[CertificateView, Markup]] = OrderedDict()

    def setup(self, app: web.Application) -> None:
        """Template engine for one listener's app (autoescaped; templates compiled once)."""
        env = aiohttp_jinja2.setup(
            app, loader=jinja2.PackageLoader("repository_server.listeners.http.portal", "templates"),
            autoescape=True, auto_reload=False, undefined=jinja2.StrictUndefined,
            trim_blocks=True, lstrip_blocks=True, default_helpers=False)
        env.filters["when"] = when
        env.filters["q"] = lambda text: quote(str(text), safe="")

    def routes(self) -> list[Route]:
        signed = self.signed_in
        return [
            ("GET", "/", None, self.to_home),
            ("GET", "/portal", None, self.to_home),
            ("GET", "/portal/static/{name}", None, self.static_file),
            ("GET", SIGN_IN, None, self.sign_in_form),
            ("POST", SIGN_IN, None, self.sign_in),
            ("POST", "/portal/sign-out", None, signed(self.sign_out, None)),
            ("GET", PASSWORD, None, signed(self.password_form, None, may_change=True)),
            ("POST", PASSWORD, None, signed(self.password, None, may_change=True)),
            ("GET", HOME, None, signed(self.home, None)),
            ("GET", "/portal/search", "search", signed(self.search, "search")),
            ("GET", "/portal/certificates/{serial}", "certificate",
             signed(self.certificate, "certificate")),
            ("GET", "/portal/crls", "crl-list", signed(self.crls, "crl-list")),
            ("GET", "/portal/crls/{key}", "crl", signed(self.crl, "crl")),
            ("GET", "/portal/documents", "document-list", signed(self.documents, "document-list")),
            ("GET", "/portal/extracts", "extract-list", signed(self.extracts, "extract-list")),
            ("GET", "/portal/download/certificates/{serial}", "download-certificate",
             signed(self.attachment(self.downloads.certificate), "download-certificate")),
            ("GET", "/portal/download/crls/{key}/{number}", "download-crl",
             signed(self.attachment(self.downloads.crl_version), "download-crl")),
            ("GET", "/portal/download/documents/{name}/{version}", "download-document",
             signed(self.attachment(self.downloads.document_version), "download-document")),
            ("GET", "/portal/download/extracts/{name}", "download-extract",
             signed(self.attachment(self.extract_download), "download-extract")),
        ]

    # -- rendering -------------------------------------------------------------------------
    def page(self, request: web.Request, template: str, context: dict[str, Any],
             status: int = 200, token: str | None = None) -> web.Response:
        session = request.get(SESSION)
        csrf_from = token or (session.token if session else None)
        context = {"session": session, "csrf": csrf.csrf_token(self.csrf_key, csrf_from) if csrf_from
                   else "", "nav": "", "notice": None, **context}
        response = aiohttp_jinja2.render_template(template, request, context, status=status)
        response.headers.update(_HEADERS)
        return response

    def error_page(self, request: web.Request, status: int, title: str,
                   message: str) -> web.Response:
        return self.page(request, "error.html", {"title": title, "message": message,
                                                 "status": status}, status=status)

    @staticmethod
    def _set_cookie(request: web.Request, response: web.StreamResponse, token: str) -> None:
        response.set_cookie(COOKIE, token, path="/portal", httponly=True, samesite="Strict",
                            secure=request.secure)

    @staticmethod
    def _redirect(location: str) -> web.Response:
        return web.Response(status=303, headers={"Location": location, **_HEADERS})

    # -- the guard -------------------------------------------------------------------------
    def signed_in(self, handler: Handler, operation: str | None, *,
                  may_change: bool = False) -> Handler:
        """Resolve the session (and, for counted pages, make the CPM 8 receipt for its user);
        send anyone without one to sign in, and a user who must change the password there."""
        auth = self.auth
        levels = self.levels

        async def guarded(request: web.Request) -> web.StreamResponse:
            token = request.cookies.get(COOKIE)
            session = await auth.session(token)
            note = request.get(NOTE)
            if operation is not None and note is not None:
                name = session.user if session else ANONYMOUS
                note.user = name
                note.principal = User(session.user, session.role) if session else None
                if levels is not None:
                    note.mark = levels.receive("portal", operation, name, started=note.started)
            if session is None:
                query = {"next": request.path_qs} if request.method == "GET" else {}
                if token and token.startswith(policy.SESSION_PREFIX):
                    query["ended"] = "1"
                return self._redirect(SIGN_IN + ("?" + urlencode(query) if query else ""))
            if session.must_change_password and not may_change:
                return self._redirect(PASSWORD)
            request[SESSION] = session
            return await handler(request)

        return guarded

    async def _form(self, request: web.Request, token: str | None) -> dict[str, str] | None:
        """The POSTed fields, or None when the CSRF token is missing or wrong."""
        timeout = self.downloads.config.web.body_timeout_seconds
        try:
            async with asyncio.timeout(timeout):  # a stalled sender does not hold a handler
                data = await request.post()
        except TimeoutError:
            raise web.HTTPRequestTimeout(
                reason=f"form not received within {timeout:g} seconds") from None
        fields = {k: v for k, v in data.items() if isinstance(v, str)}
        return fields if csrf.csrf_ok(self.csrf_key, token, fields.get("csrf")) else None

    def _csrf_refused(self, request: web.Request) -> web.Response:
        return self.error_page(
            request, 403, "This form was not accepted",
            "The form's security token (CSRF check) is missing or wrong: the form has expired,"
            " or it was not sent from this portal. Go back, reload the page and try again.")

    # -- small routes ----------------------------------------------------------------------
    async def to_home(self, request: web.Request) -> web.StreamResponse:
        return self._redirect(HOME)

    async def static_file(self, request: web.Request) -> web.StreamResponse:
        found = self.static.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound(reason="no such file")
        body, content_type, etag = found
        headers = {"ETag": etag, "Cache-Control": "public, max-age=3600",
                   "X-Content-Type-Options": "nosniff"}
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, headers={**headers, "Content-Type": content_type})

    def attachment(self, handler: Handler) -> Handler:
        async def download(request: web.Request) -> web.StreamResponse:
            response = await handler(request)
            if response.status == 200:
                disposition = response.headers.get("Content-Disposition", "")
                if disposition.startswith("inline"):
                    disposition = "attachment" + disposition[len("inline"):]
                elif not disposition:  # a certificate: named after its serial
                    name = request.match_info.get("serial", "certificate")
                    if not name.endswith((".pem", ".der")):
                        name += ".der"
                    disposition = f'attachment; filename="{name}"'
                response.headers["Content-Disposition"] = disposition
            return response

        return download

    # -- sign-in, sign-out, password -------------------------------------------------------
    async def sign_in_form(self, request: web.Request) -> web.StreamResponse:
        token = request.cookies.get(COOKIE)
        nxt = csrf.safe_next(request.query.get("next"))
        if await self.auth.session(token) is not None:
            return self._redirect(nxt)
        if not policy.well_formed(token) or not token or not token.startswith(
                policy.ANONYMOUS_PREFIX):
            token = policy.new_token(signed_in=False)
        notice = None
        if request.query.get("ended"):
            notice = "Your session has ended. Sign in again to go on."
        elif request.query.get("signed-out"):
            notice = "You have signed out."
        response = self._sign_in_page(request, token, nxt, "", None, notice)
        self._set_cookie(request, response, token)
        return response

    def _sign_in_page(self, request: web.Request, token: str, nxt: str, username: str,
                      error: str | None, notice: str | None = None) -> web.Response:
        return self.page(request, "sign_in.html", {
            "title": "Sign in", "next": nxt, "username": username, "error": error,
            "notice": notice}, token=token)

    async def sign_in(self, request: web.Request) -> web.StreamResponse:
        token = request.cookies.get(COOKIE)
        fields = await self._form(request, token)
        if fields is None or token is None:
            return self._csrf_refused(request)
        nxt = csrf.safe_next(fields.get("next"))
        username = fields.get("username", "")[:policy.MAX_USERNAME + 1]
        result = await self.auth.sign_in(username, fields.get("password", ""), request.remote)
        if result.session is None:
            return self._sign_in_page(request, token, nxt, username.strip(), SIGN_IN_FAILED)
        response = self._redirect(PASSWORD if result.session.must_change_password else nxt)
        self._set_cookie(request, response, result.session.token)  # a new token: no fixation
        return response

    async def sign_out(self, request: web.Request) -> web.StreamResponse:
        session = request[SESSION]
        if await self._form(request, session.token) is None:
            return self._csrf_refused(request)
        await self.auth.sign_out(session, request.remote)
        response = self._redirect(SIGN_IN + "?signed-out=1")
        self._set_cookie(request, response, policy.new_token(signed_in=False))
        return response

    def _password_page(self, request: web.Request, error: str | None,
                       status: int = 200) -> web.Response:
        session = request[SESSION]
        return self.page(request, "password.html", {
            "title": "Change your password", "forced": session.must_change_password,
            "error": error, "min_length": self.settings.password_min_length}, status=status)

    async def password_form(self, request: web.Request) -> web.StreamResponse:
        return self._password_page(request, None)

    async def password(self, request: web.Request) -> web.StreamResponse:
        session = request[SESSION]
        fields = await self._form(request, session.token)
        if fields is None:
            return self._csrf_refused(request)
        new_session, problem = await self.auth.change_password(
            session, fields.get("current", ""), fields.get("new", ""), fields.get("confirm", ""),
            request.remote)
        if new_session is None:
            return self._password_page(request, problem)
        response = self._redirect(HOME + "?password-changed=1")
        self._set_cookie(request, response, new_session.token)
        return response

    # -- pages -----------------------------------------------------------------------------
    async def home(self, request: web.Request) -> web.StreamResponse:
        notice = ("Your password has been changed." if request.query.get("password-changed")
                  else None)
        return self.page(request, "search.html", {"title": "Search", "nav": "search",
                                                  "q": "", "by": "any", "results": None,
                                                  "problem": None, "notice": notice})

    async def search(self, request: web.Request) -> web.StreamResponse:
        by = request.query.get("by", "any")
        if by not in ("any", "eui", "serial"):
            by = "any"
        query = parse_query(request.query.get("q", ""), by)
        context: dict[str, Any] = {"title": "Search", "nav": "search", "q": query.text,
                                   "by": by, "results": None, "problem": query.problem}
        if query.problem is None and query.text:
            entries = await self.views.search(query)
            statuses = await self.catalog.statuses(entries, self.auth.clock())
            context["results"] = self.views.rows(entries, statuses)
            context["title"] = f"Search results for {query.text}"
        return self.page(request, "search.html", context,
                         status=400 if query.problem else 200)

    async def certificate(self, request: web.Request) -> web.StreamResponse:
        raw = request.match_info["serial"]
        try:
            serial = parse_serial(raw[:100])
        except IdentifierError:
            return self.error_page(request, 404, "Certificate not found",
                                   "That is not a certificate serial: a serial is hex digits.")
        entries = await self.catalog.certificates(serial)
        issuer = request.query.get("issuer")
        if issuer is not None:
            try:
                key_id = parse_key_id(issuer[:200])
            except IdentifierError:
                key_id = b""
            entries = tuple(e for e in entries if e.issuer_key_id == key_id)
        if not entries:
            return self.error_page(request, 404, "Certificate not found",
                                   f"There is no certificate with serial {serial}"
                                   + (" from that issuer" if issuer is not None else "")
                                   + " in the repository.")
        now = self.auth.clock()
        if len(entries) > 1:  # two issuers used the same serial: let the user choose
            statuses = await self.catalog.statuses(entries, now)
            return self.page(request, "search.html", {
                "title": f"Certificates with serial {serial}", "nav": "search", "q": serial,
                "by": "serial", "problem": None, "results": self.views.rows(entries, statuses),
                "notice": f"{len(entries)} issuers have used serial {serial}: choose one."})
        entry = entries[0]
        view = await self.views.certificate(entry)
        (status,) = await self.catalog.statuses((entry,), now)
        return self.page(request, "certificate.html", {
            "title": f"Certificate {entry.serial}", "nav": "search", "view": view,
            "body": self._certificate_body(request, view),
            "status": await self.views.status_reason(entry, status, view.summary),
            "download": cert_url(entry, "/portal/download/certificates/"),
            "download_pem": cert_url(entry, "/portal/download/certificates/").replace(
                entry.serial, entry.serial + ".pem", 1)})

    def _certificate_body(self, request: web.Request, view: CertificateView) -> Markup:
        """The fields, chain and findings of a certificate page, rendered once per
        certificate (they never change; about half the cost of rendering the page)."""
        sha = view.entry.sha_hex
        cached = self._bodies.get(sha)
        if cached is not None and cached[0] is view:
            return cached[1]
        template = aiohttp_jinja2.get_env(request.app).get_template("_certificate_body.html")
        body = Markup(template.render(view=view))
        if self.settings.detail_cache_entries:
            self._bodies[sha] = (view, body)
            if len(self._bodies) > self.settings.detail_cache_entries:
                self._bodies.popitem(last=False)
        return body

    async def crls(self, request: web.Request) -> web.StreamResponse:
        rows = await self.catalog.reads.current_crls()
        now = self.auth.now()
        items = [{"kind": "ARL" if r.kind == "arl" else "CRL", "issuer": r.issuer_name,
                  "key": format_key_id(r.issuer_key_id), "number": r.crl_number,
                  "this_update": when(r.this_update), "next_update": when(r.next_update),
                  "overdue": bool(r.next_update and r.next_update < now),
                  "revoked": r.revoked_count} for r in rows]
        return self.page(request, "crls.html", {"title": "Revocation lists", "nav": "crls",
                                                "items": items})

    async def crl(self, request: web.Request) -> web.StreamResponse:
        try:
            key = parse_key_id(request.match_info["key"][:200])
        except IdentifierError:
            return self.error_page(request, 404, "Revocation list not found",
                                   "That is not an issuer key identifier (hex digits).")
        number_text = request.query.get("number", "")
        page_text = request.query.get("page", "1")
        number = path_number(number_text, MAX_CRL_NUMBER)
        page = path_number(page_text, 10**8) or 1
        entry = (await self.catalog.crl_version(key, number) if number is not None
                 else await self.catalog.current_crl(key))
        hexkey = format_key_id(key)
        if entry is None:
            return self.error_page(request, 404, "Revocation list not found",
                                   f"There is no CRL or ARL from issuer key identifier {hexkey}"
                                   + (f" with number {number}" if number is not None else "")
                                   + ".")
        row = entry.row
        size = self.settings.page_size
        pages = max(1, -(-row.revoked_count // size))
        page = min(max(page, 1), pages)
        revoked = await self.catalog.reads.revoked_entries(row.id, (page - 1) * size, size)
        versions = await self.catalog.reads.crl_versions(key)
        issuers = await self.catalog.reads.certificates_with_key_id(key)
        now = self.auth.now()
        kind = "ARL" if row.kind == "arl" else "CRL"
        current = versions[0][0] if versions else row.crl_number
        return self.page(request, "crl.html", {
            "title": f"{kind} {row.crl_number} of {row.issuer_name}", "nav": "crls",
            "kind": kind, "row": row, "key": hexkey, "current": current,
            "overdue": bool(row.next_update and row.next_update < now),
            "issuer_url": (f"/portal/certificates/{issuers[0].serial}" if issuers else None),
            "download": f"/portal/download/crls/{hexkey}/{row.crl_number}.crl",
            "revoked": [{"serial": r.serial, "date": when(r.revocation_date),
                         "reason": r.reason or "—",
                         "url": f"/portal/certificates/{r.serial}" if r.lodged else None}
                        for r in revoked],
            "page": page, "pages": pages, "first": (page - 1) * size + 1,
            "versions": [{"number": n, "this_update": when(t), "next_update": when(nu)}
                         for n, t, nu in versions]})

    async def documents(self, request: web.Request) -> web.StreamResponse:
        items = []
        for doc in await self.catalog.reads.documents():
            versions = await self.catalog.reads.document_versions(doc.name)
            items.append({"name": doc.name, "versions": [
                {"version": v.version, "lodged": when(v.lodged_at), "type": safe_type(v.content_type),
                 "size": v.size, "sha256": v.sha256.hex().upper(),
                 "url": f"/portal/download/documents/{quote(v.name)}/{v.version}"}
                for v in versions]})
        return self.page(request, "documents.html", {"title": "Documents", "nav": "documents",
                                                     "items": items})

    async def extracts(self, request: web.Request) -> web.StreamResponse:
        rows = await self.extract_files.published() if self.extract_files else []
        items = [{"name": r.name, "kind": r.kind, "published": when(r.published_at),
                  "size": r.size, "sha256": r.sha256.hex().upper() if r.sha256 else "",
                  "certificates": r.counts.get("certificates", 0),
                  "crls": r.counts.get("crls", 0), "documents": r.counts.get("documents", 0),
                  "url": f"/portal/download/extracts/{quote(r.name)}"} for r in rows]
        return self.page(request, "extracts.html", {"title": "Extracts", "nav": "extracts",
                                                    "items": items})

    async def extract_download(self, request: web.Request) -> web.StreamResponse:
        if self.extract_files is None:
            raise web.HTTPNotFound(reason="extracts are not served here")
        return await self.extract_files.download(request)

