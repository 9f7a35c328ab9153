"""The read listeners' application (http, https): every route of the downloads, the web
service, extracts, the portal and the operator reports, each wrapped once for timing, status
counts, the CPM 8 receipt (from the request's arrival: obs/arrival.py) and errors turned into
answers with a reason (never a stack trace); plus /healthz, /readyz, /openapi.json and a 404
or 405 that says what is served."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from repository_server.accounts import Accounts
from repository_server.accounts.keys import User
from repository_server.config import Config
from repository_server.listeners.http.apikeys import request_key
from repository_server.listeners.http.downloads import (
    RETRY_AFTER,
    Downloads,
    FastHandler,
    error,
    unavailable_response,
)
from repository_server.listeners.http.extracts import ExtractFiles
from repository_server.listeners.http.openapi import describe as describe_api
from repository_server.listeners.http.ops import Ops
from repository_server.listeners.http.portal.app import Portal
from repository_server.listeners.http.webservice import WebService
from repository_server.obs.access import NOTE, Note
from repository_server.obs.arrival import waited
from repository_server.obs.metrics import Metrics
from repository_server.readmodel.catalog import Catalog
from repository_server.service_levels import ANONYMOUS, ServiceLevels
from repository_server.store.db import Store
from repository_server.store.pool import unavailable as store_unavailable

log = logging.getLogger("repository_server.server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class ReadParts:
    """What the read application answers from (built once per process by the wiring)."""

    config: Config
    version: str
    metrics: Metrics
    store: Store
    catalog: Catalog
    accounts: Accounts
    levels: ServiceLevels
    counting: ServiceLevels | None  # `levels` when service_levels.enabled
    downloads: Downloads
    extract_files: ExtractFiles
    portal: Portal | None
    readiness: Callable[[], Awaitable[tuple[int, dict[str, Any]]]]  # (HTTP status, body)


def build_read_app(listener: str, parts: ReadParts) -> tuple[web.Application, WebService]:
    """The application of read listener `listener` ("http" or "https"), and its web
    service (tests reach it)."""
    metrics = parts.metrics
    levels = parts.counting
    accounts = parts.accounts

    def identify(request: web.Request) -> User | None:
        """The user whose API key a read request carries, if any."""
        key = request_key(request)
        return accounts.user_for_key(key) if key else None

    def observed(route: str, handler: Handler, cpm: tuple[str, str] | None,
                 receipt_in_handler: bool = False) -> Handler:
        """Per-route wrapper (cheaper than a middleware): timing, status counts, the
        request's Note (CPM 8 receipt: here, or in the handler once the body is in), and
        errors turned into JSON answers with a reason, never a stack trace."""
        stats = metrics.http.route(listener, route)
        clock = time.perf_counter

        async def wrapper(request: web.Request) -> web.StreamResponse:
            started = clock()
            if cpm is not None:
                arrived = started - waited(request.transport)
                user = None if receipt_in_handler else identify(request)
                name = user.name if user else ANONYMOUS
                mark = None if receipt_in_handler or levels is None else levels.receive(
                    cpm[0], cpm[1], name, started=arrived)
                request[NOTE] = Note(cpm[0], cpm[1], name, mark, user, arrived)
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                response = error(exc.status, exc.reason)
            except Exception as exc:
                if store_unavailable(exc):
                    log.warning("store unavailable for %s: %s: %s", request.path,
                                type(exc).__name__, exc)
                    response = unavailable_response()
                else:
                    log.exception("internal error on %s %s", request.method, request.path)
                    response = error(500, "internal error (logged on the server)")
            stats.record(response.status, clock() - started)
            return response

        return wrapper

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        status, answer = await parts.readiness()
        headers = {"Retry-After": RETRY_AFTER} if status == 503 else None
        return web.json_response(answer, status=status, headers=headers)

    described = json.dumps(describe_api(parts.version), indent=1).encode()

    async def openapi(_request: web.Request) -> web.Response:
        return web.Response(body=described, content_type="application/json",
                            headers={"Cache-Control": "no-cache"})

    async def not_found(request: web.Request) -> web.Response:
        """No route took the request: 405 with Allow when the path is served with other
        methods, else 404 (this path runs only for requests nothing else matched)."""
        allowed: set[str] = set()
        for resource in request.app.router.resources():
            match, methods = await resource.resolve(request)
            if match is None:
                allowed |= methods
        if allowed:
            response = error(405, f"{request.method} is not allowed on {request.path[:200]}:"
                             f" use {', '.join(sorted(allowed))}")
            response.headers["Allow"] = ", ".join(sorted(allowed))
            return response
        return error(404, f"no such resource: {request.path[:200]} (see /openapi.json or"
                     " the README for the URL scheme)")

    def with_fast_path(route: str, operation: str, fast: FastHandler,
                       handler: Handler) -> Handler:
        """Try the synchronous answer first: one coroutine less per hot request."""
        stats = metrics.http.route(listener, route)
        clock = time.perf_counter

        async def wrapper(request: web.Request) -> web.StreamResponse:
            started = clock()
            user = identify(request)
            response = fast(request, user)
            if response is None:
                return await handler(request)
            name = user.name if user else ANONYMOUS
            request[NOTE] = Note("download", operation, name, levels.receive(
                "download", operation, name, started=started - waited(request.transport))
                if levels else None)
            stats.record(200, clock() - started)
            return response

        return wrapper

    downloads = parts.downloads
    fast_paths = downloads.fast_paths()
    webservice = WebService(parts.catalog, accounts, parts.config, levels, downloads.access)
    ops = Ops(parts.store, accounts, parts.levels, parts.catalog)
    app = web.Application(client_max_size=parts.config.web.client_max_size_kb * 1024)

    def add(method: str, path: str, wrapped: Handler) -> None:
        if method == "GET":
            app.router.add_get(path, wrapped, allow_head=True)
        else:
            app.router.add_route(method, path, wrapped)

    for method, path, operation, handler in webservice.routes():
        add(method, path, observed(path, handler, ("ws", operation), receipt_in_handler=True))
    for method, path, operation, handler in downloads.routes():
        wrapped = observed(path, handler, ("download", operation))
        if path in fast_paths:
            wrapped = with_fast_path(path, operation, fast_paths[path], wrapped)
        add(method, path, wrapped)
    for method, path, operation, handler in parts.extract_files.routes():
        add(method, path, observed(path, handler, ("download", operation)))
    if parts.portal is not None:
        parts.portal.setup(app)
        for method, path, counted, handler in parts.portal.routes():
            add(method, path, observed(path, handler, ("portal", counted) if counted
                                       else None, receipt_in_handler=True))
    for method, path, handler in [*ops.routes(),
                                  ("GET", "/healthz", healthz), ("GET", "/readyz", readyz),
                                  ("GET", "/openapi.json", openapi),
                                  ("*", "/{tail:.*}", not_found)]:
        add(method, path, observed(path, handler, None))
    return app, webservice
