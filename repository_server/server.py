"""The running repository: database, catalog, lodging service and every listener.

`Repository.start()` brings the pieces up in data-flow order (store → catalog → lodging →
listeners) and `stop()` takes them down in reverse, releasing the embedded PostgreSQL last
so that Ctrl-C leaves no orphan. This module only wires: the read application is
`listeners/http/app.py`, the TLS gate of the TLS listeners `listeners/tls.py`, and each
listener's protocol lives in its own package. Refused TLS handshakes reported by the gate are
counted here (metric, and per minute, reason and peer into the store: obs/refusals.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import gc
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from repository_server.access import ReadAccess
from repository_server.accounts import Accounts
from repository_server.config import LISTENER_NAMES, Config, ConfigError, HostPort
from repository_server.extracts.replica import ReplicaPages
from repository_server.extracts.scheduler import ExtractScheduler
from repository_server.extracts.writer import ExtractWriter
from repository_server.listeners.http.app import ReadParts, build_read_app
from repository_server.listeners.http.downloads import Downloads
from repository_server.listeners.http.extracts import ExtractFiles
from repository_server.listeners.http.front import Front, build_front
from repository_server.listeners.http.portal.app import Portal
from repository_server.listeners.http.portal.csrf import CSRF_SECRET
from repository_server.listeners.http.webservice import WebService
from repository_server.listeners.ldap.directory import Directory
from repository_server.listeners.ldap.protocol import PAGED_RESULTS_OID, STARTTLS_OID
from repository_server.listeners.ldap.server import WHOAMI_OID, LdapService
from repository_server.listeners.lodge.app import ACTOR_KEY, build_lodge_app
from repository_server.listeners.metrics import build_metrics_app
from repository_server.listeners.sftp import SftpService
from repository_server.listeners.tls import (
    TRIM_AFTER_REFUSALS,
    TlsListener,
    capped,
    ldap_tls_context,
    lodge_tls_context,
    open_connections,
    release_freed_memory,
    require_file,
    server_tls_context,
)
from repository_server.lodging.service import LodgingService
from repository_server.obs.access import access_logger_class
from repository_server.obs.metrics import Metrics
from repository_server.obs.refusals import RefusalSummary
from repository_server.obs.refusals import classify as classify_refusal
from repository_server.readmodel.catalog import Catalog
from repository_server.readmodel.check import lag
from repository_server.readmodel.env import Replica, ReplicaUnavailable
from repository_server.readmodel.feed import Feeder
from repository_server.service_levels import ServiceLevelCollector, ServiceLevels
from repository_server.store import opened_store
from repository_server.store import refusals as refusals_sql
from repository_server.store.db import Store

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _lodging_user(request: web.BaseRequest) -> str | None:
    actor = request.get(ACTOR_KEY)
    return actor.name if actor is not None else None


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
        self.accounts: Accounts | None = None
        self.levels: ServiceLevels | None = None
        self.ldap: LdapService | None = None
        self.counting: ServiceLevels | None = None  # `levels` when service_levels.enabled
        self.downloads: Downloads | None = None
        self.webservices: list[WebService] = []  # one per read listener
        self.fronts: dict[str, Front] = {}  # the read listeners' fast fronts (web.fast_front)
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
        self._lodge_listener: TlsListener | None = None
        self._tls_contexts: list[ssl.SSLContext] = []  # https, ldaps and StartTLS
        self._opening: asyncio.Future[Store] | None = None

    # -- apps -----------------------------------------------------------------------------
    async def readiness(self) -> tuple[int, dict[str, Any]]:
        """Ready = the read interfaces can answer from this node's replica, and it is not
        further behind the store than replica.max_lag_seconds. The database may be down
        meanwhile (reads are served; lodging answers 503): said in the body. (HTTP status,
        body) for /readyz."""
        store, replica, catalog = self.store, self.replica, self.catalog
        assert store is not None and replica is not None and catalog is not None
        max_lag = self.config.replica.max_lag_seconds
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
            return 503, body
        return 200, body

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
        if sum(row.count for row in rows) >= TRIM_AFTER_REFUSALS:
            release_freed_memory()
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
                      established: Callable[[], int]) -> TlsListener:
        return TlsListener(name, ctx, factory, limit=limit, established=established,
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
        self.accounts = Accounts(self.store, cfg.portal)
        await self.accounts.load()
        self.catalog.subscribe("users", self.accounts.user_changed)
        self.catalog.subscribe("portal-session", self.accounts.session_ended)
        await self.catalog.start()
        self._replica_task = asyncio.create_task(self._keep_replica(), name="replica")
        await self._replica_ready.wait()
        self.levels = ServiceLevels(cfg.service_levels, self.store)
        self.metrics.registry.register(ServiceLevelCollector(self.levels))
        if cfg.service_levels.enabled:
            self.counting = self.levels
            self.levels.start()
        web_access = ReadAccess(cfg.web.open_reads)  # the HTTP interface's read rule
        self.downloads = Downloads(self.catalog, cfg, web_access)
        extracts_dir = cfg.path(cfg.extracts.dir)
        self.extract_files = ExtractFiles(self.store, extracts_dir, web_access)
        if cfg.extracts.schedule:
            catalog = self.catalog
            writer = ExtractWriter(self.store, extracts_dir, compression=cfg.extracts.compression,
                                   page_size=cfg.extracts.page_size,
                                   retain_full=cfg.extracts.retain_full,
                                   replica=ReplicaPages(self.replica, self.feeder.catch_up,
                                                        lambda: catalog.ready))
            self.extract_scheduler = ExtractScheduler(self.store, writer, cfg.extracts)
        if cfg.portal.enabled:
            self.portal = Portal(self.catalog, self.accounts, self.downloads, self.counting,
                                 cfg.portal, self.extract_files,
                                 csrf_key=await self.store.deployment_secret(CSRF_SECRET))
            self.catalog.subscribe("certs", self.portal.views.certificates_lodged)
        self.lodging = LodgingService(
            self.store, max_batch=cfg.lodge.max_batch, max_crl_bytes=cfg.lodge.max_crl_bytes,
            clock_skew=timedelta(seconds=cfg.lodge.clock_skew_seconds),
            parse_workers=cfg.lodge.parse_workers, on_change=self.catalog.invalidate,
            after_commit=self.catalog.synced)
        read_parts = ReadParts(
            config=cfg, version=_our_version(), metrics=self.metrics, store=self.store,
            catalog=self.catalog, accounts=self.accounts, levels=self.levels,
            counting=self.counting, downloads=self.downloads, extract_files=self.extract_files,
            portal=self.portal, readiness=self.readiness)
        for name, ctx in (("http", None), ("https", https_ctx)):
            addr = cfg.listeners.address(name)
            if addr is None:
                continue
            app, webservice = build_read_app(name, read_parts)
            self.webservices.append(webservice)
            runner = await self._runner(app, reads=True)
            handlers = runner.server
            assert handlers is not None
            factory: Callable[[], asyncio.Protocol]
            protocol: Callable[[], asyncio.Protocol] = handlers
            if cfg.web.fast_front:  # the hot download outside aiohttp, the rest handed to it
                access = access_logger_class(self.counting, True)(
                    log.getChild("access"), "") if cfg.log.access_log else None
                protocol = self.fronts[name] = build_front(name, read_parts, handlers, access,
                                                              webservice)
            if ctx is None:
                busy = self.metrics.http.route(name, "(too many connections)")
                over = self._over_cap(name)

                def on_over_cap(busy: Any = busy, over: Callable[[], None] = over) -> None:
                    busy.record(503, 0.0)
                    over()

                factory = capped(handlers, cfg.web.max_connections, on_over_cap, protocol)
            else:
                factory = self._tls_listener(
                    name, ctx, protocol, cfg.web.max_connections,
                    functools.partial(open_connections, handlers)).protocol
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
                functools.partial(open_connections, lodge_handlers))
            await self._listen("lodge", addr, self._lodge_listener.protocol, backlog=128)
        await self._start_ldap(ldap_ctx)
        addr = cfg.listeners.address("sftp")
        if addr is not None:
            self.sftp = SftpService(cfg, self.accounts, extracts_dir)
            with _listening("sftp", addr):
                host, port = await self.sftp.start(addr.host, addr.port)
            self.bound["sftp"] = HostPort(host, port)
        addr = cfg.listeners.address("metrics")
        if addr is not None:
            runner = await self._runner(build_metrics_app(self.metrics, self.replica),
                                        listener="metrics")
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
            cert = require_file(config, config.tls.cert, "tls.cert")
            key = require_file(config, config.tls.key, "tls.key")
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
        assert self.catalog is not None and self.store is not None and self.accounts is not None
        directory = Directory(self.catalog, suffix=cfg.ldap.suffix,
                              root_dse=_root_dse(cfg, ctx is not None),
                              access=ReadAccess(cfg.ldap.open_reads))
        self.ldap = service = LdapService(cfg, directory, self.store, self.counting, ctx,
                                          accounts=self.accounts)
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
        """Listen on listeners.NAME (TLS, where there is any, is the factory's: `TlsGate`);
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
