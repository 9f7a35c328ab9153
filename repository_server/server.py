"""The running repository: database, catalog, lodging service and every listener.

`Repository.start()` brings the pieces up in data-flow order (store → catalog → lodging →
listeners) and `stop()` takes them down in reverse, releasing the embedded PostgreSQL last
so that Ctrl-C leaves no orphan. The TLS listeners (lodge, https, ldaps) accept TCP
themselves (`_TlsGate`) and hand a connection to the loop's TLS protocol only when its
first bytes arrive: connections in their handshake count against the listener's cap, a
refused handshake (no client certificate, unknown CA, expired, timed out) is counted per
minute, reason and peer (obs/refusals.py) rather than silently dropped inside the TLS layer,
and the client gets the TLS alert that says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import gc
import json
import logging
import os
import ssl
import time
import typing
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from repository_server.access import ReadAccess
from repository_server.accounts.keys import Credentials, User
from repository_server.accounts.signin import PortalAuth
from repository_server.config import LISTENER_NAMES, Config, ConfigError, HostPort
from repository_server.extracts.scheduler import ExtractScheduler
from repository_server.extracts.writer import ExtractWriter
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
from repository_server.listeners.http.portal.csrf import CSRF_SECRET
from repository_server.listeners.http.webservice import WebService
from repository_server.listeners.ldap.codec import PAGED_RESULTS_OID, STARTTLS_OID
from repository_server.listeners.ldap.directory import Directory
from repository_server.listeners.ldap.server import WHOAMI_OID, LdapService
from repository_server.listeners.lodge.app import ACTOR_KEY, build_lodge_app
from repository_server.listeners.sftp import SftpService
from repository_server.lodging.service import LodgingService
from repository_server.obs.access import NOTE, Note, access_logger_class
from repository_server.obs.arrival import waited
from repository_server.obs.metrics import Metrics
from repository_server.obs.refusals import RefusalSummary
from repository_server.obs.refusals import classify as classify_refusal
from repository_server.readmodel.catalog import Catalog
from repository_server.readmodel.env import Replica, ReplicaUnavailable
from repository_server.readmodel.feed import Feeder, lag
from repository_server.service_levels import ANONYMOUS, ServiceLevelCollector, ServiceLevels
from repository_server.store import opened_store
from repository_server.store import refusals as refusals_sql
from repository_server.store.db import Store
from repository_server.store.db import unavailable as store_unavailable

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_LODGE_CIPHERS = "ECDHE+AESGCM"  # TLS 1.2: ECDHE with AES-GCM only
_TLS13_AES_GCM = ("TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256")


def _require_file(config: Config, value: str, setting: str) -> Path:
    path = config.path(value)
    if not path.is_file():
        raise ConfigError(f"{setting}: file not found: {path} (run `smki-repository demo` or"
                          " `smki-repository testpki`, or point the setting at your file)")
    return path


def server_tls_context(config: Config) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    cert = _require_file(config, config.tls.cert, "tls.cert")
    key = _require_file(config, config.tls.key, "tls.key")
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:  # not PEM, or a key that is not the certificate's
        raise ConfigError(f"tls.cert/tls.key: cannot use {cert} with {key}:"
                          f" {exc.reason or exc}") from None
    return ctx


def lodge_tls_context(config: Config) -> ssl.SSLContext:
    ctx = server_tls_context(config)
    ctx.set_ciphers(_LODGE_CIPHERS)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_COMPRESSION
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ca = _require_file(config, config.lodge.client_ca, "lodge.client_ca")
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except ssl.SSLError as exc:
        raise ConfigError(f"lodge.client_ca: no usable CA certificate in {ca}:"
                          f" {exc.reason or exc}") from None
    return ctx


def _lodging_user(request: web.BaseRequest) -> str | None:
    actor = request.get(ACTOR_KEY)
    return actor.name if actor is not None else None


def tls_problems(config: Config) -> list[str]:
    """Every problem `start` would stop at in the TLS files the configuration names (all of
    them, not just the first: `smki-repository config check`)."""
    problems: list[str] = []

    def check(what: Callable[[], object]) -> bool:
        try:
            what()
        except ConfigError as exc:
            problems.append(str(exc))
            return False
        return True

    lis = config.listeners
    if lis.https or lis.lodge or lis.ldaps:
        cert = check(lambda: _require_file(config, config.tls.cert, "tls.cert"))
        key = check(lambda: _require_file(config, config.tls.key, "tls.key"))
        if cert and key:
            check(lambda: server_tls_context(config))
    if lis.lodge and check(lambda: _require_file(config, config.lodge.client_ca,
                                                 "lodge.client_ca")) and not problems:
        check(lambda: lodge_tls_context(config))
    if (lis.ldap or lis.ldaps) and config.ldap.client_ca:
        check(lambda: _require_file(config, config.ldap.client_ca, "ldap.client_ca"))
    return problems


def ldap_tls_context(config: Config) -> ssl.SSLContext:
    """LDAPS and StartTLS: the server certificate; client certificates are asked for (and
    verified) only when ldap.client_ca names the CAs allowed to SASL EXTERNAL bind."""
    ctx = server_tls_context(config)
    if config.ldap.client_ca:
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cafile=str(_require_file(config, config.ldap.client_ca,
                                                           "ldap.client_ca")))
    return ctx


def _our_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("smki-repository")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def _root_dse(config: Config, tls: bool) -> dict[str, list[bytes]]:
    ours = _our_version()
    extensions = [WHOAMI_OID] + ([STARTTLS_OID] if tls else [])
    return {
        "supportedldapversion": [b"3"],
        "supportedcontrol": [PAGED_RESULTS_OID.encode()],
        "supportedextension": [e.encode() for e in extensions],
        "supportedsaslmechanisms": [b"EXTERNAL"] if tls and config.ldap.client_ca else [],
        # all operational attributes ("+"), objectClass in attribute lists, absolute true/false
        "supportedfeatures": [b"1.3.6.1.4.1.4203.1.5.1", b"1.3.6.1.4.1.4203.1.5.2",
                              b"1.3.6.1.4.1.4203.1.5.3"],
        "vendorname": [b"smki-repository"],
        "vendorversion": [ours.encode()],
    }


def _ssl_protocol_class(loop: asyncio.AbstractEventLoop) -> Any:
    """The loop's own TLS protocol (what `loop.start_tls` uses internally)."""
    if type(loop).__module__.startswith("uvloop"):
        import uvloop.loop

        return uvloop.loop.SSLProtocol  # type: ignore[attr-defined]
    import asyncio.sslproto

    return asyncio.sslproto.SSLProtocol


class _TlsListener:
    """One TLS listener (https, lodge, ldaps): its context, the protocol a connection gets
    once its handshake is done, and its connection cap. Connections in their handshake are
    counted here; those past it by their owner (`established`: aiohttp's server, the LDAP
    service), so the cap holds for both."""

    def __init__(self, name: str, ctx: ssl.SSLContext, factory: Callable[[], asyncio.Protocol],
                 *, limit: int, established: Callable[[], int], timeout: float,
                 on_refused: Callable[[str, str, BaseException | None], None],
                 on_over_cap: Callable[[], None]) -> None:
        self.name = name
        self.ctx = ctx
        self.factory = factory
        self.limit = limit
        self.established = established
        self.timeout = timeout
        self.on_refused = on_refused
        self.on_over_cap = on_over_cap
        self.handshaking = 0

    def protocol(self) -> asyncio.Protocol:
        return _TlsGate(self)


class _AlertingTransport:
    """The TCP transport as the loop's TLS protocol sees it: its own methods, except that a
    handshake refused with an SSL error (no client certificate, unknown CA, expired, ...)
    sends the alert OpenSSL wrote for it (certificate_required, unknown_ca,
    certificate_expired, ...) before closing. The loop's TLS protocol force-closes without
    sending it, and clients saw only "Empty reply from server"."""

    __slots__ = ("_tcp", "abort", "close", "get_extra_info", "outgoing", "pause_reading",
                 "resume_reading", "write")

    def __init__(self, tcp: asyncio.Transport) -> None:
        self._tcp = tcp
        self.outgoing: ssl.MemoryBIO | None = None
        # the TCP transport's methods themselves: no extra call on the data path
        self.write = tcp.write
        self.close = tcp.close
        self.abort = tcp.abort
        self.get_extra_info = tcp.get_extra_info
        self.pause_reading = tcp.pause_reading
        self.resume_reading = tcp.resume_reading

    def _force_close(self, exc: BaseException | None) -> None:
        alert = self.outgoing.read() if self.outgoing is not None else b""
        if alert and isinstance(exc, ssl.SSLError):
            # not here: this runs inside uvloop's read callback for the TLS protocol, which
            # must not change under it
            self._tcp.pause_reading()
            asyncio.get_running_loop().call_soon(_Lingering.close_after, self._tcp, alert)
        else:
            self._tcp._force_close(exc)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tcp, name)


class _Lingering(asyncio.Protocol):
    """A refused connection after its TLS alert: our side is shut (the alert, then FIN) and
    what the client still sends (a TLS 1.3 client sends its request right after its
    Finished) is read and dropped until it closes, for a second at most. Closing at once
    would answer that data with a reset, and the client's kernel would drop the unread
    alert with it."""

    LINGER_SECONDS = 1.0

    def __init__(self, tcp: asyncio.Transport) -> None:
        self.tcp = tcp
        self.timer = asyncio.get_running_loop().call_later(self.LINGER_SECONDS, tcp.abort)

    @classmethod
    def close_after(cls, tcp: asyncio.Transport, last: bytes) -> None:
        if tcp.is_closing():
            return
        tcp.pause_reading()  # (again: the gate may have resumed it) so that reading resumes
        tcp.set_protocol(cls(tcp))  # with this protocol's callbacks
        tcp.write(last)
        tcp.write_eof()
        tcp.resume_reading()

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool | None:
        return None  # close

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()


class _OneConnectionContext:
    """The SSL context as the TLS protocol of one connection sees it: `wrap_bio` also hands
    the connection's outgoing BIO to its `_AlertingTransport`."""

    __slots__ = ("_ctx", "_transport")

    def __init__(self, ctx: ssl.SSLContext, transport: _AlertingTransport) -> None:
        self._ctx = ctx
        self._transport = transport

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                 server_side: bool = False, server_hostname: str | None = None,
                 session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        self._transport.outgoing = outgoing
        return self._ctx.wrap_bio(incoming, outgoing, server_side=server_side,
                                  server_hostname=server_hostname, session=session)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)


class _TlsGate(asyncio.Protocol):
    """A TCP connection to a TLS listener until its handshake is done.

    Over the listener's cap it is closed at once. Otherwise nothing TLS is allocated until
    the client's first bytes (its ClientHello) arrive: a connection that sends nothing costs
    this object and a timer, and is closed after tls.handshake_timeout_seconds. (Before, the
    loop's TLS protocol made OpenSSL's connection state and buffers at accept; thousands of
    idle sockets left tens of MB that glibc's malloc kept after they were freed, more after
    every round: the RSS never came back.) On the first bytes the loop's TLS protocol takes
    the connection over, synchronously (uvloop starts reading at once, so `await
    loop.start_tls(...)` from a task could lose bytes), and calls the listener's protocol
    once the handshake succeeds; a refused handshake is reported with the peer's address."""

    def __init__(self, listener: _TlsListener) -> None:
        self.listener = listener
        self.tcp: asyncio.Transport | None = None
        self.peer = "?"
        self.started = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        listener = self.listener
        tcp = typing.cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if listener.handshaking + listener.established() >= listener.limit:
            listener.on_over_cap()
            tcp.abort()
            return
        listener.handshaking += 1
        self.tcp = tcp
        peer = tcp.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) else "?"
        loop = asyncio.get_running_loop()
        self.started = loop.time()
        self.timer = loop.call_later(listener.timeout, self._timed_out)

    def _ended(self, exc: BaseException | None) -> None:
        """The handshake is over, refused if `exc` is not None (or the TLS protocol never
        started)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.listener.handshaking -= 1
        self.tcp = None
        if exc is not None:
            self.listener.on_refused(self.listener.name, self.peer, exc)

    def _timed_out(self) -> None:
        self.timer = None
        tcp = self.tcp
        if tcp is not None:
            self._ended(TimeoutError("no ClientHello"))
            tcp.abort()

    def data_received(self, data: bytes) -> None:
        tcp = self.tcp
        if tcp is None:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.tcp = None  # the TLS protocol has it from here
        listener = self.listener
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        waiter.add_done_callback(self._handshake_done)
        remaining = max(0.01, listener.timeout - (loop.time() - self.started))
        shim = _AlertingTransport(tcp)
        tls = _ssl_protocol_class(loop)(loop, listener.factory(),
                                        _OneConnectionContext(listener.ctx, shim), waiter,
                                        server_side=True, ssl_handshake_timeout=remaining)
        tcp.pause_reading()  # so that reading resumes with the TLS protocol's callbacks
        tcp.set_protocol(tls)
        tls.connection_made(shim)
        view = memoryview(data)
        while view and not tcp.is_closing():
            buf = tls.get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            tls.buffer_updated(n)
            view = view[n:]
        tcp.resume_reading()

    def _handshake_done(self, fut: asyncio.Future[None]) -> None:
        self.listener.handshaking -= 1
        exc = None if fut.cancelled() else fut.exception()
        if exc is not None:
            self.listener.on_refused(self.listener.name, self.peer, exc)

    def eof_received(self) -> bool | None:
        return None  # close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.tcp is not None:  # before any byte: a port scan, a health check
            self._ended(exc or ConnectionResetError("closed before the TLS handshake"))


_BUSY_BODY = (b'{"status": 503, "reason": "too many connections to this listener;'
              b' try again shortly"}')
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
         b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
         + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY)


class _Busy(asyncio.Protocol):
    """A connection beyond web.max_connections: answered 503 at once and closed, without
    reading its request (the client may retry after a second)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp = typing.cast(asyncio.Transport, transport)
        tcp.write(_BUSY)
        tcp.close()

    def data_received(self, data: bytes) -> None:
        pass


# Refused handshakes between two flushes after which freed memory is handed back (below).
_TRIM_AFTER_REFUSALS = 100


def _release_freed_memory() -> None:
    """Hand the memory malloc keeps after it was freed back to the system. Handshakes that
    fail after the ClientHello (a partial one, a refused certificate) free OpenSSL's
    per-connection state (tens of KB), but glibc keeps freed heap memory that lies between
    live allocations, and after each burst the process was tens of MB bigger. malloc_trim
    gives those pages back (a few ms; glibc only, elsewhere a no-op)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes
            import ctypes.util

            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


def _open_connections(handlers: web.Server) -> int:
    return len(handlers.connections)


def _capped(handlers: web.Server, limit: int, on_over_cap: Callable[[], None],
            ) -> Callable[[], asyncio.Protocol]:
    """aiohttp has no connection limit: this protocol factory is one, for plain HTTP (TLS
    listeners are capped by their `_TlsListener`, handshakes included)."""

    def factory() -> asyncio.Protocol:
        if len(handlers.connections) >= limit:
            on_over_cap()
            return _Busy()
        return handlers()

    return factory


class _OneLineForBadRequests(logging.Filter):
    """aiohttp logs a request its parser refuses (a malformed request line or header: the
    client's fault, answered 400) as an ERROR with a traceback. Any client could fill the log
    with those: one INFO line naming the peer and the problem instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg = "malformed HTTP request from %s refused (400): %s"
            record.args = (peer, (exc.message or type(exc).__name__).replace("\n", " ")[:200])
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_HTTP_LOG = log.getChild("http")  # what aiohttp's protocol layer says about connections
_HTTP_LOG.addFilter(_OneLineForBadRequests())


@contextlib.contextmanager
def _listening(name: str, addr: HostPort) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"listeners.{name}: {addr} is already in use") from None
        raise ConfigError(f"listeners.{name}: cannot listen on {addr}:"
                          f" {exc.strerror or exc}") from None


def check_listeners_free(config: Config) -> None:
    """Before anything starts (PostgreSQL, a replica build): every configured address can be
    bound, else a ConfigError naming the listener. Binding for real later reports the same
    (another process may take a port meanwhile)."""
    import socket

    for name in LISTENER_NAMES:
        addr = config.listeners.address(name)
        if addr is None or addr.port == 0:
            continue
        shared = config.listeners.reuse_port and name != "metrics"
        with _listening(name, addr):
            for family, kind, proto, _, sockaddr in socket.getaddrinfo(
                    addr.host or None, addr.port, type=socket.SOCK_STREAM,
                    flags=socket.AI_PASSIVE):
                with socket.socket(family, kind, proto) as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if shared:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    sock.bind(sockaddr)


class Repository:
    def __init__(self, config: Config, *, metrics: Metrics | None = None,
                 defer_schedule: bool = False) -> None:
        """`defer_schedule`: the extract schedule waits for `start_schedule()` (the demo
        lodges its test PKI first, so that its first extract is not an empty one)."""
        self.config = config
        self.defer_schedule = defer_schedule
        self.metrics = metrics or Metrics()
        self._resources = contextlib.AsyncExitStack()  # the store (and embedded PostgreSQL)
        self.store: Store | None = None
        self.catalog: Catalog | None = None
        self.replica: Replica | None = None
        self.feeder: Feeder | None = None
        self._replica_task: asyncio.Task[None] | None = None
        self._replica_ready = asyncio.Event()
        self.lodging: LodgingService | None = None
        self.credentials: Credentials | None = None
        self.levels: ServiceLevels | None = None
        self.ldap: LdapService | None = None
        self.counting: ServiceLevels | None = None  # `levels` when service_levels.enabled
        self.downloads: Downloads | None = None
        self.webservices: list[WebService] = []  # one per read listener
        self.portal: Portal | None = None  # its `auth.clock` is what tests move
        self.extract_files: ExtractFiles | None = None
        self.extract_scheduler: ExtractScheduler | None = None
        self.sftp: SftpService | None = None
        self._runners: list[web.AppRunner] = []
        self._servers: list[asyncio.AbstractServer] = []
        self._background: set[asyncio.Task[Any]] = set()
        self.refusals = RefusalSummary(config.tls.refusal_peers_per_minute)
        self._refusal_task: asyncio.Task[None] | None = None
        self.bound: dict[str, HostPort] = {}
        self._lodge_ctx: ssl.SSLContext | None = None
        self._lodge_listener: _TlsListener | None = None
        self._tls_contexts: list[ssl.SSLContext] = []  # https, ldaps and StartTLS
        self._opening: asyncio.Future[Store] | None = None

    # -- apps -----------------------------------------------------------------------------
    def _identify(self, request: web.Request) -> User | None:
        """The user whose API key a read request carries, if any."""
        assert self.credentials is not None
        key = request_key(request)
        return self.credentials.user_for_key(key) if key else None

    def _read_app(self, listener: str) -> web.Application:
        assert self.catalog is not None and self.store is not None
        assert self.credentials is not None and self.levels is not None
        metrics = self.metrics
        store = self.store
        catalog = self.catalog
        levels = self.counting
        identify = self._identify

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

        max_lag = self.config.replica.max_lag_seconds
        replica = self.replica
        assert replica is not None

        async def readyz(_request: web.Request) -> web.Response:
            """Ready = the read interfaces can answer from this node's replica, and it is
            not further behind the store than replica.max_lag_seconds. The database may be
            down meanwhile (reads are served; lodging answers 503): said in the body."""
            body: dict[str, Any] = {"status": "ready"}
            try:
                await store.ping()
                body["database"] = "ok"
            except Exception as exc:
                body["database"] = f"unavailable: {type(exc).__name__}: {exc}".rstrip(": ")
                body["lodging"] = "unavailable until the database is back"
            try:
                body["replica"] = lag(replica)
            except ReplicaUnavailable as exc:
                body["replica"] = {"error": str(exc)}
            if not catalog.ready:
                body["status"] = "unavailable"
                body["reason"] = "the read replica is being built"
                building = self.feeder.building if self.feeder else None
                if building:
                    body["replica"]["building"] = {"done": building[0], "total": building[1]}
            elif body["replica"].get("behind_seconds", 0) > max_lag:
                body["status"] = "unavailable"
                body["reason"] = (f"the read replica is more than {max_lag:g} s behind the"
                                  " store")
            elif body["database"] != "ok":
                body["status"] = "degraded"
            if body["status"] == "unavailable":
                return web.json_response(body, status=503, headers={"Retry-After": RETRY_AFTER})
            return web.json_response(body)

        described = json.dumps(describe_api(_our_version()), indent=1).encode()

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

        downloads = self.downloads
        assert downloads is not None
        fast_paths = downloads.fast_paths()
        webservice = WebService(self.catalog, self.credentials, self.config, levels)
        self.webservices.append(webservice)
        ops = Ops(store, self.credentials, self.levels, self.catalog)
        app = web.Application(client_max_size=self.config.web.client_max_size_kb * 1024)

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
        assert self.extract_files is not None
        for method, path, operation, handler in self.extract_files.routes():
            add(method, path, observed(path, handler, ("download", operation)))
        if self.portal is not None:
            self.portal.setup(app)
            for method, path, counted, handler in self.portal.routes():
                add(method, path, observed(path, handler, ("portal", counted) if counted
                                           else None, receipt_in_handler=True))
        for method, path, handler in [*ops.routes(),
                                      ("GET", "/healthz", healthz), ("GET", "/readyz", readyz),
                                      ("GET", "/openapi.json", openapi),
                                      ("*", "/{tail:.*}", not_found)]:
            add(method, path, observed(path, handler, None))
        return app

    def _metrics_app(self) -> web.Application:
        """The operations listener (listeners.metrics): Prometheus metrics, which name users
        (demand per user), so never on the public read listeners."""
        metrics = self.metrics
        replica = self.replica
        assert replica is not None

        async def metrics_handler(_request: web.Request) -> web.Response:
            with contextlib.suppress(ReplicaUnavailable):
                state = lag(replica)
                metrics.replica_applied.set(state["applied"])
                metrics.replica_behind.set(state["behind_changes"])
                metrics.replica_behind_seconds.set(state["behind_seconds"])
                metrics.replica_bytes.set(replica.size_bytes())
            return web.Response(body=generate_latest(metrics.registry),
                                headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def not_found(request: web.Request) -> web.Response:
            return error(404, f"no such resource: {request.path} (this listener serves /metrics)")

        app = web.Application()
        app.router.add_get("/metrics", metrics_handler, allow_head=True)
        app.router.add_route("*", "/{tail:.*}", not_found)
        return app

    async def _runner(self, app: web.Application, *, reads: bool = False,
                      listener: str | None = None,
                      user_of: Callable[[web.BaseRequest], str | None] | None = None
                      ) -> web.AppRunner:
        access = log.getChild("access")
        if reads:  # the access logger also ends each request's CPM 8 timing: always on
            limits = self.config.web
            # aiohttp (3.14) arms keepalive_timeout when a connection opens and again after
            # each response, and partial data does not re-arm it: so it bounds both an idle
            # connection and one that sends its request head too slowly (slowloris).
            runner = web.AppRunner(app, access_log=access, handler_cancellation=True,
                                   logger=_HTTP_LOG, access_log_class=access_logger_class(
                                       self.counting, self.config.log.access_log),
                                   keepalive_timeout=limits.idle_timeout_seconds,
                                   max_line_size=limits.max_header_bytes,
                                   max_field_size=limits.max_header_bytes,
                                   max_headers=limits.max_headers)
        else:  # the lodging listener: only the DCC gets past its TLS handshake
            runner = web.AppRunner(app, access_log=access if self.config.log.access_log
                                   else None, handler_cancellation=True, logger=_HTTP_LOG,
                                   access_log_class=access_logger_class(None, True, listener,
                                                                        user_of),
                                   keepalive_timeout=self.config.web.idle_timeout_seconds)
        await runner.setup()
        self._runners.append(runner)
        return runner

    def _on_tls_refused(self, listener: str, peer: str, exc: BaseException | None) -> None:
        """Counted (metric, and the per-minute summary the flush task stores and logs), not
        an audit row and a log line each: anonymous peers cannot grow the store or the log."""
        reason, detail = classify_refusal(exc)
        self.metrics.tls_refused.labels(listener, reason).inc()
        self.refusals.record(listener, reason, peer, detail)

    def _over_cap(self, listener: str) -> Callable[[], None]:
        counter = self.metrics.over_cap.labels(listener)
        return counter.inc

    async def flush_refusals(self) -> None:
        """The refusal counts to the store and one log line per listener and minute."""
        rows = self.refusals.take()
        if sum(row.count for row in rows) >= _TRIM_AFTER_REFUSALS:
            _release_freed_memory()
        if rows and self.store is not None:
            try:
                await refusals_sql.add(self.store, rows)
            except Exception as exc:
                self.refusals.put_back(rows)
                log.warning("refused TLS handshakes: counts not stored yet: %s: %s",
                            type(exc).__name__, exc)
        for line in self.refusals.log_lines():
            log.warning("%s", line)

    async def _keep_flushing_refusals(self) -> None:
        while True:
            await asyncio.sleep(self.config.tls.refusal_flush_seconds)
            await self.flush_refusals()

    def _tls_listener(self, name: str, ctx: ssl.SSLContext,
                      factory: Callable[[], asyncio.Protocol], limit: int,
                      established: Callable[[], int]) -> _TlsListener:
        return _TlsListener(name, ctx, factory, limit=limit, established=established,
                            timeout=self.config.tls.handshake_timeout_seconds,
                            on_refused=self._on_tls_refused, on_over_cap=self._over_cap(name))

    # -- the read replica -----------------------------------------------------------------
    async def _keep_replica(self) -> None:
        """Forever: make this node's replica usable, then keep it so. The process holding the
        feeder lock builds it when needed and follows the change log; the others wait for it
        and reopen it when a rebuild swaps the files."""
        feeder, replica, catalog = self.feeder, self.replica, self.catalog
        assert feeder is not None and replica is not None and catalog is not None
        follow: asyncio.Task[None] | None = None
        last_note = 0.0

        def progress(done: int, total: int) -> None:
            nonlocal last_note
            now = time.monotonic()
            if now - last_note >= 10 or done == total:
                last_note = now
                log.info("read replica: building, %d of %d certificates", done, total)

        try:
            while True:
                try:
                    if replica.env is not None and replica.replaced():
                        log.info("read replica: rebuilt by another process; reopening")
                        replica.open()
                    if not catalog.ready:
                        if feeder.take_feeder_role():
                            await feeder.ensure(progress)
                            await feeder.catch_up()  # a restarted node: what it missed
                        else:
                            if not feeder.source:
                                assert self.store is not None
                                async with self.store.pool.acquire() as conn:
                                    from repository_server.store import feed as feed_sql

                                    feeder.source = await feed_sql.identity(conn)
                            why = await asyncio.to_thread(feeder.usable, feeder.source)
                            if why:
                                raise ReplicaUnavailable(f"waiting for this node's feeder: {why}")
                        catalog.ready = True
                        self._replica_ready.set()
                        log.info("read replica ready at change %d (%s)", replica.applied(),
                                 "this process feeds it" if feeder.is_feeder
                                 else "fed by another process")
                    if follow is None and feeder.take_feeder_role():
                        follow = asyncio.create_task(feeder.follow(), name="replica-feed")
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("read replica not ready: %s: %s", type(exc).__name__, exc)
                await asyncio.sleep(1.0)
        finally:
            if follow is not None:
                follow.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await follow

    # -- life cycle -----------------------------------------------------------------------
    def start_schedule(self) -> None:
        """Start producing scheduled extracts (when extracts.schedule is on), once."""
        if self.extract_scheduler is not None:
            self.extract_scheduler.start()

    async def start(self) -> None:
        cfg = self.config
        check_listeners_free(cfg)
        # TLS material first: a missing file should fail before anything starts.
        https_ctx = server_tls_context(cfg) if cfg.listeners.https else None
        lodge_ctx = lodge_tls_context(cfg) if cfg.listeners.lodge else None
        # LDAPS needs the server certificate; plain LDAP offers StartTLS when there is one.
        ldap_ctx = (ldap_tls_context(cfg) if cfg.listeners.ldaps or (
            cfg.listeners.ldap and cfg.path(cfg.tls.cert).is_file()) else None)
        self._tls_contexts = [ctx for ctx in (https_ctx, ldap_ctx) if ctx is not None]
        # shielded: a stop signal during start-up cancels start(), and a store half-opened
        # then (PostgreSQL started, lease taken) must still reach the exit stack to be released
        self._opening = asyncio.ensure_future(self._resources.enter_async_context(
            opened_store(cfg, supervise=True, create=True)))
        self.store = await asyncio.shield(self._opening)
        self.feeder = Feeder.for_node(cfg, self.store.dsn)
        self.replica = self.feeder.replica
        self.catalog = Catalog(self.store, self.replica)
        self.catalog.sync_to = self.feeder.catch_up
        for kind in ("certs", "status", "crl", "doc", "serials"):
            self.catalog.subscribe(kind, self.feeder.wake)
        self.credentials = Credentials(self.store)
        await self.credentials.load()
        self.catalog.subscribe("users", self.credentials.changed)
        await self.catalog.start()
        self._replica_task = asyncio.create_task(self._keep_replica(), name="replica")
        await self._replica_ready.wait()
        self.levels = ServiceLevels(cfg.service_levels, self.store)
        self.metrics.registry.register(ServiceLevelCollector(self.levels))
        if cfg.service_levels.enabled:
            self.counting = self.levels
            self.levels.start()
        self.downloads = Downloads(self.catalog, cfg)
        extracts_dir = cfg.path(cfg.extracts.dir)
        self.extract_files = ExtractFiles(self.store, extracts_dir, open_reads=cfg.web.open_reads)
        if cfg.extracts.schedule:
            writer = ExtractWriter(self.store, extracts_dir, compression=cfg.extracts.compression,
                                   page_size=cfg.extracts.page_size,
                                   retain_full=cfg.extracts.retain_full)
            self.extract_scheduler = ExtractScheduler(self.store, writer, cfg.extracts)
        if cfg.portal.enabled:
            auth = PortalAuth(self.store, cfg.portal)
            self.portal = Portal(self.catalog, auth, self.downloads, self.counting, cfg.portal,
                                 self.extract_files, csrf_key=await self.store.deployment_secret(
                                     CSRF_SECRET))
            self.catalog.subscribe("portal-session", auth.session_ended)
            self.catalog.subscribe("users", auth.user_changed)
            self.catalog.subscribe("certs", self.portal.views.certificates_lodged)
        self.lodging = LodgingService(
            self.store, max_batch=cfg.lodge.max_batch, max_crl_bytes=cfg.lodge.max_crl_bytes,
            clock_skew=timedelta(seconds=cfg.lodge.clock_skew_seconds),
            parse_workers=cfg.lodge.parse_workers, on_change=self.catalog.invalidate,
            after_commit=self.catalog.synced)
        for name, ctx in (("http", None), ("https", https_ctx)):
            addr = cfg.listeners.address(name)
            if addr is None:
                continue
            runner = await self._runner(self._read_app(name), reads=True)
            handlers = runner.server
            assert handlers is not None
            factory: Callable[[], asyncio.Protocol]
            if ctx is None:
                busy = self.metrics.http.route(name, "(too many connections)")
                over = self._over_cap(name)

                def on_over_cap(busy: Any = busy, over: Callable[[], None] = over) -> None:
                    busy.record(503, 0.0)
                    over()

                factory = _capped(handlers, cfg.web.max_connections, on_over_cap)
            else:
                factory = self._tls_listener(
                    name, ctx, handlers, cfg.web.max_connections,
                    functools.partial(_open_connections, handlers)).protocol
            await self._listen(name, addr, factory)
        addr = cfg.listeners.address("lodge")
        if addr is not None and lodge_ctx is not None:
            runner = await self._runner(build_lodge_app(cfg, self.lodging, _our_version()),
                                        listener="lodge",
                                        user_of=_lodging_user)
            lodge_handlers = runner.server
            assert lodge_handlers is not None
            self._lodge_ctx = lodge_ctx
            # SIGHUP (`reload`) puts a new context on it: each new connection takes it
            self._lodge_listener = self._tls_listener(
                "lodge", lodge_ctx, lodge_handlers, cfg.lodge.max_connections,
                functools.partial(_open_connections, lodge_handlers))
            await self._listen("lodge", addr, self._lodge_listener.protocol, backlog=128)
        await self._start_ldap(ldap_ctx)
        addr = cfg.listeners.address("sftp")
        if addr is not None:
            self.sftp = SftpService(cfg, self.store, extracts_dir)
            with _listening("sftp", addr):
                host, port = await self.sftp.start(addr.host, addr.port)
            self.bound["sftp"] = HostPort(host, port)
        addr = cfg.listeners.address("metrics")
        if addr is not None:
            runner = await self._runner(self._metrics_app(), listener="metrics")
            handlers = runner.server
            assert handlers is not None
            # its own port per process, never shared: a scrape must reach the process it names
            await self._listen("metrics", addr, handlers, backlog=64, reuse_port=False)
        if not self.defer_schedule:
            self.start_schedule()
        self._refusal_task = asyncio.create_task(self._keep_flushing_refusals(),
                                                 name="tls-refusals")
        # Everything allocated so far lives as long as the process: out of the cyclic GC's
        # reach, so full collections do not walk it in the middle of requests.
        gc.collect()
        gc.freeze()

    def reload(self, config: Config) -> str:
        """SIGHUP: the server certificate and key (https, lodge, ldaps, StartTLS) and the DCC
        client CA, from the files `config` names, for connections from now on; connections
        already open go on as they are. Everything is read and checked first: a missing file
        or a key that does not match is a ConfigError or ssl.SSLError and nothing changes.
        Other settings (listeners, limits, ...) need a restart. Returns what was reloaded."""
        checked = server_tls_context(config) if self._tls_contexts else None
        lodge = lodge_tls_context(config) if self._lodge_ctx is not None else None
        done = []
        if checked is not None:
            cert = _require_file(config, config.tls.cert, "tls.cert")
            key = _require_file(config, config.tls.key, "tls.key")
            for ctx in self._tls_contexts:  # the listening sockets keep their context object
                ctx.load_cert_chain(cert, key)
            done.append(f"tls.cert {cert}")
        if lodge is not None and self._lodge_listener is not None:
            self._lodge_ctx = self._lodge_listener.ctx = lodge  # for each new connection
            done.append(f"lodge.client_ca {config.path(config.lodge.client_ca)}")
        self.config = dataclasses.replace(self.config, tls=config.tls, log=config.log,
                                          lodge=dataclasses.replace(
                                              self.config.lodge,
                                              client_ca=config.lodge.client_ca))
        return ", ".join([*done, f"log.level {config.log.level}"])

    async def _start_ldap(self, ctx: ssl.SSLContext | None) -> None:
        cfg = self.config
        if not (cfg.listeners.ldap or cfg.listeners.ldaps):
            return
        assert self.catalog is not None and self.store is not None
        directory = Directory(self.catalog, suffix=cfg.ldap.suffix,
                              root_dse=_root_dse(cfg, ctx is not None),
                              access=ReadAccess(cfg.ldap.open_reads))
        self.ldap = service = LdapService(cfg, directory, self.store, self.counting, ctx)
        service.on_over_cap = lambda listener: self.metrics.over_cap.labels(listener).inc()
        for name, tls in (("ldap", None), ("ldaps", ctx)):
            addr = cfg.listeners.address(name)
            if addr is None:
                continue
            factory: Callable[[], asyncio.Protocol] = functools.partial(service.factory,
                                                                        ldaps=False)
            if tls is not None:
                factory = self._tls_listener(
                    name, tls, lambda: service.factory(ldaps=True), cfg.ldap.max_connections,
                    lambda: len(service.connections)).protocol
            await self._listen(name, addr, factory)

    async def _listen(self, name: str, addr: HostPort, factory: Callable[[], asyncio.Protocol],
                      *, backlog: int = 1024, reuse_port: bool | None = None) -> None:
        """Listen on listeners.NAME (TLS, where there is any, is the factory's: `_TlsGate`);
        an address that cannot be had is a ConfigError naming the setting, not a
        traceback."""
        shared = self.config.listeners.reuse_port if reuse_port is None else reuse_port
        with _listening(name, addr):
            server = await asyncio.get_running_loop().create_server(
                factory, addr.host, addr.port, reuse_address=True, reuse_port=shared or None,
                backlog=backlog)
        self._servers.append(server)
        sock = server.sockets[0].getsockname()
        self.bound[name] = HostPort(sock[0], sock[1])

    async def stop(self) -> None:
        if self.extract_scheduler is not None:
            await self.extract_scheduler.stop()
        for server in self._servers:
            server.close()
        if self.sftp is not None:
            await self.sftp.stop()
        if self.ldap is not None:
            self.ldap.close_all()
        for runner in reversed(self._runners):
            with contextlib.suppress(Exception):
                await runner.cleanup()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._refusal_task is not None:
            self._refusal_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._refusal_task
        await self.flush_refusals()
        for line in self.refusals.log_lines(final=True):
            log.warning("%s", line)
        if self.lodging:
            self.lodging.close()
        if self.levels:
            await self.levels.stop()  # the last counts reach the store before it closes
        if self.catalog:
            await self.catalog.stop()
        if self._replica_task is not None:
            self._replica_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._replica_task
        if self.feeder is not None:
            await self.feeder.close()
        if self.replica is not None:
            self.replica.close()
        if self._opening is not None and not self._opening.done():  # stopped while starting
            with contextlib.suppress(Exception):
                await self._opening
        await self._resources.aclose()  # the pool, then the embedded PostgreSQL's lease


def write_pid_file(path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(f"{os.getpid()}\n")
