"""The LDAPv3 listener: one asyncio protocol per connection over the sans-I/O codec.

Each operation is a method (``op_bind``, ``op_search``, ``op_compare``, ``op_extended``, …)
in the spirit of aiosmtpd. Rules:

* Requests are framed as they arrive. A search whose exact bytes (after the message id) were
  answered before, for the same access level, is answered from pre-encoded responses (the
  response cache) without decoding; everything a lodging may change empties that cache
  (the directory's change callback, fed by LISTEN/NOTIFY), and an answer holding a
  certificate is kept no longer than the certificate's notAfter (its status turns E).
* Searches run as tasks (at most ``ldap.max_outstanding`` per connection, else busy); a bind,
  StartTLS or unbind first waits for them (RFC 4511 §4.2.1). Abandon cancels one.
* Entries are written as they are found; while the client does not read (the transport's
  buffer is above its high-water mark) the search waits, and reading from the client stops
  too. A client that reads nothing for ``ldap.write_timeout_seconds`` is disconnected.
* A malformed or oversized PDU gets a notice of disconnection (protocolError) and the
  connection is closed; idle connections are closed after ``ldap.idle_timeout_seconds``.
* Who may read what is `access.ReadAccess` (device, organisation and other certificate
  entries: bound users, or anyone with ``ldap.open_reads``; see `directory.py` for what
  others are told). Writes are refused (unwillingToPerform): the repository is written only
  through the mutual-TLS lodging listener.
* The search itself is `search.py`, credential checks `binds.py`, the response cache and
  attribute selection `answers.py`; this module is the protocol around them.
* Every search for lodged material (anything but the root DSE and the subschema entry) is
  timed for Code Performance Measure 8 from receipt to the SearchResultDone being written.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

from repository_server.accounts import Accounts
from repository_server.accounts.keys import User
from repository_server.config import Config
from repository_server.listeners.ldap import codec, dn, protocol, responses
from repository_server.listeners.ldap.answers import Outcome, ResponseCache
from repository_server.listeners.ldap.binds import BindCredentials
from repository_server.listeners.ldap.directory import Directory, DirectoryError
from repository_server.listeners.ldap.fastpath import FastSearch, Query, Shapes
from repository_server.listeners.ldap.filters import Entry, Plan, compile_filter
from repository_server.listeners.ldap.protocol import STARTTLS_OID, ProtocolError, ResultCode
from repository_server.listeners.ldap.schema import SCHEMA
from repository_server.listeners.ldap.search import Searches, SearchService
from repository_server.obs.arrival import drop_socket, own_socket, socket_waited
from repository_server.obs.logs import access_extra
from repository_server.readmodel.catalog import ReplicaUnavailable
from repository_server.service_levels import ANONYMOUS, ServiceLevels
from repository_server.store.db import Store
from repository_server.store.pool import unavailable as store_unavailable

log = logging.getLogger(__name__)
# A search's result for CPM 8, as the HTTP status service_levels counts by: the server
# failed (500), or the request was refused (403 no access, 400 malformed: left out of the
# percentage); every other result (entries, none, a size limit) is a request served.
_CPM_STATUS: dict[int, int] = {ResultCode.OTHER: 500, ResultCode.UNAVAILABLE: 500, ResultCode.BUSY: 500,
               ResultCode.OPERATIONS_ERROR: 500, ResultCode.TIME_LIMIT_EXCEEDED: 500,
               ResultCode.INSUFFICIENT_ACCESS_RIGHTS: 403, ResultCode.PROTOCOL_ERROR: 400,
               ResultCode.INVALID_DN_SYNTAX: 400, ResultCode.UNDEFINED_ATTRIBUTE_TYPE: 400,
               ResultCode.INAPPROPRIATE_MATCHING: 400, ResultCode.INVALID_ATTRIBUTE_SYNTAX: 400,
               ResultCode.UNAVAILABLE_CRITICAL_EXTENSION: 400,
               ResultCode.CONFIDENTIALITY_REQUIRED: 403, ResultCode.UNWILLING_TO_PERFORM: 400}
access_log = logging.getLogger("repository_server.access")

WHOAMI_OID = "1.3.6.1.4.1.4203.1.11.3"
_SEARCH_DONE = 5
_READ_ONLY = ("the repository is read-only over LDAP: the DCC lodges through the mutual-TLS"
              " lodging API")


class LdapService:
    """What every connection shares: the directory, settings, limits, the response cache."""

    def __init__(self, config: Config, directory: Directory, store: Store,
                 levels: ServiceLevels | None, tls: ssl.SSLContext | None, *,
                 accounts: Accounts) -> None:
        self.config = config
        self.settings = config.ldap
        self.directory = directory
        self.store = store
        self.levels = levels
        self.tls = tls
        self.access_log = config.log.access_log
        self.access = directory.access
        self.cache = ResponseCache(self.settings.response_cache_mb * 1024 * 1024)
        directory.on_change(self.cache.clear)
        self.connections: set[LdapConnection] = set()
        self.ids = itertools.count(1)
        self.credentials = BindCredentials(accounts, directory.suffix)
        self.users_dn = self.credentials.users_dn
        self.search = SearchService(self.settings, directory)
        # learnt shapes of the short way's searches (ldap/fastpath.py), None when it is off
        self.shapes: Shapes | None = self.search.fast.shapes if self.search.fast else None
        # ldap/_hot.c when it was built and ldap.compiled is on (the short way's first steps)
        self.hot = self.search.fast.hot if self.search.fast else None
        if self.search.fast is not None and self.settings.compiled and self.hot is None:
            log.warning("ldap: the short way runs in Python (ldap/_hot.c was not built: no C"
                        " compiler when installed); searches by EUI-64 are slower")
        # told of each connection refused for ldap.max_connections (a metric): (listener)
        self.on_over_cap: Callable[[str], None] | None = None

    @property
    def fast(self) -> FastSearch | None:
        """The short way for searches by EUI-64, None when ldap.fast_path is off."""
        return self.search.fast

    def factory(self, *, ldaps: bool) -> LdapConnection:
        return LdapConnection(self, ldaps=ldaps)

    def close_all(self) -> None:
        for conn in list(self.connections):
            conn.disconnect(ResultCode.UNAVAILABLE, "the server is shutting down")


class LdapConnection(asyncio.Protocol):
    def __init__(self, service: LdapService, *, ldaps: bool) -> None:
        self.service = service
        s = service.settings
        self.decoder = codec.Decoder(max_pdu_size=s.max_request_kb * 1024)
        self.transport: asyncio.Transport | None = None
        self.tls = ldaps
        self.user: User | None = None
        # may read private entries (access.ReadAccess): also which response cache map serves
        self.private = service.access.may_read_private(authenticated=False)
        self.peer = "?"
        self.conn_id = 0
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.pending: list[protocol.Request] = []  # requests waiting behind a bind/StartTLS
        self.serial: asyncio.Task[None] | None = None
        self.writable = asyncio.Event()
        self.writable.set()
        self.searches = Searches(service.search, self)
        self.closing = False
        self.last_activity = 0.0
        self.sock: Any = None  # the TCP socket, for when each request's bytes arrived
        self._idle: asyncio.TimerHandle | None = None
        self._stall: asyncio.TimerHandle | None = None
        self._tls_upgrading = False

    # -- connection life cycle ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is not None:  # StartTLS: the TLS transport replaces the TCP one
            self.transport = transport  # type: ignore[assignment]
            return
        self.transport = transport  # type: ignore[assignment]
        self.sock = own_socket(transport)  # given back when the connection is lost
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"
        self.conn_id = next(self.service.ids)
        service = self.service
        if len(service.connections) >= service.settings.max_connections:
            log.warning("ldap: refusing %s: %d connections open", self.peer, len(service.connections))
            if service.on_over_cap is not None:
                service.on_over_cap("ldaps" if self.tls else "ldap")
            self.disconnect(ResultCode.BUSY, "too many connections; try again later")
            return
        service.connections.add(self)
        self.last_activity = time.perf_counter()
        self._idle = asyncio.get_running_loop().call_later(service.settings.idle_timeout_seconds,
                                                           self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        sock, self.sock = self.sock, None
        drop_socket(sock)
        self.service.connections.discard(self)
        for handle in (self._idle, self._stall):
            if handle is not None:
                handle.cancel()
        for task in self.tasks.values():
            task.cancel()
        if self.serial is not None:
            self.serial.cancel()
        self.searches.close()
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()
        if self.transport is not None and not self._tls_upgrading:
            with contextlib.suppress(Exception):
                self.transport.pause_reading()
        self._stall = asyncio.get_running_loop().call_later(
            self.service.settings.write_timeout_seconds, self._stalled)

    def resume_writing(self) -> None:
        self.writable.set()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        if self.transport is not None and not self.closing:
            with contextlib.suppress(Exception):
                self.transport.resume_reading()

    def _stalled(self) -> None:
        log.warning("ldap conn=%d %s: client stopped reading for %ss; disconnected", self.conn_id,
                    self.peer, self.service.settings.write_timeout_seconds)
        self.abort()

    def _check_idle(self) -> None:
        loop = asyncio.get_running_loop()
        limit = self.service.settings.idle_timeout_seconds
        idle = time.perf_counter() - self.last_activity
        if self.tasks or idle < limit:
            self._idle = loop.call_later(max(limit - idle, 1.0), self._check_idle)
            return
        self.disconnect(ResultCode.UNAVAILABLE, f"idle for {limit} s; connection closed")

    @property
    def authenticated(self) -> bool:
        """Bound as a repository user."""
        return self.user is not None

    def disconnect(self, code: ResultCode, message: str) -> None:
        """Notice of disconnection (RFC 4511 §4.4.1), then close."""
        if self.transport is None or self.closing:
            return
        self.closing = True
        with contextlib.suppress(Exception):
            self.transport.write(responses.notice_of_disconnection(code, message))
        self.transport.close()

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closing:
            self.transport.write(data)

    # -- reading ---------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.last_activity = now = time.perf_counter()
        if (self.private and self.service.shapes is not None and not self.decoder.buffered
                and not self.pending and self.serial is None
                and not self.service.cache.maps[self.private] and self._answer_whole(data, now)):
            return
        try:
            frames = self.decoder.frames(data)
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        if not frames:
            return
        received = now - socket_waited(self.sock)  # CPM 8: when the bytes reached this host
        directory = self.service.directory
        # A change applied: older answers go (the response cache, CA entries). Checked before
        # either is used; a learnt shape's answer is read from the replica itself.
        checked = False
        cache = self.service.cache.maps[self.private]
        # learnt request shapes (ldap/fastpath.py): only for readers of device entries
        shapes = self.service.shapes if self.private else None
        for content in frames:
            if (cache or shapes) and not self.pending and self.serial is None:
                ids = codec.message_id(content)
                if ids is not None:
                    key = content[ids[1]:]
                    if cache and not checked:
                        directory.check_version()
                        checked = True
                    if cache:
                        hit = cache.get(key)
                        if hit is not None and hit[1] > time.time():
                            cache.move_to_end(key)
                            self._answer_cached(ids[0], hit[0], received)
                            continue
                    if shapes is not None:
                        shaped = shapes.match(key)
                        if shaped is not None and self._answer_shaped(ids[0], *shaped, received):
                            continue
            if not checked:
                directory.check_version()
                checked = True
            try:
                request = codec.decode_message(content, self.decoder.max_depth)
            except ProtocolError as exc:
                self._protocol_error(exc)
                return
            self._dispatch(request, content, received)

    def _answer_whole(self, data: bytes, now: float) -> bool:
        """The commonest case the short way, without the decoder's buffering: `data` is one
        whole LDAPMessage (`codec.whole_message`) with a short message id, and the rest of it
        a learnt shape (`Shapes`). False, having done nothing, otherwise (the decoder then
        reads it as any other)."""
        shapes = self.service.shapes
        assert shapes is not None
        hot = self.service.hot
        if hot is not None:  # (ldap/_hot.c: the same three steps in one call)
            matched = hot.match(data, self.decoder.max_pdu_size, shapes.by_length)
            if matched is None:
                return False
            mid, query, eui_value = matched
        else:
            content = codec.whole_message(data, self.decoder.max_pdu_size)
            ids = codec.message_id(content) if content is not None else None
            if content is None or ids is None:
                return False
            shaped = shapes.match(content[ids[1]:])
            if shaped is None:
                return False
            mid, (query, eui_value) = ids[0], shaped
        received = now - socket_waited(self.sock)  # CPM 8: when the bytes reached this host
        if not self._answer_shaped(mid, query, eui_value, received):
            return False
        shapes.whole += 1
        return True

    def _answer_cached(self, mid: int, ops: tuple[bytes, ...], received: float) -> None:
        service = self.service
        service.cache.hits += 1
        levels = service.levels
        mark = levels.receive("ldap", "search", self.user.name if self.user else ANONYMOUS,
                              started=received) if levels is not None else None
        self.write(responses.frames(mid, ops))
        if mark is not None and levels is not None:
            levels.answered(mark, 200)
        if service.access_log:
            access_log.info("ldap conn=%d op=%d search (cached) result=0 entries=%d", self.conn_id,
                            mid, len(ops) - 1, extra=self._access(
                                "search", 0, received, entries=len(ops) - 1, cached=True))

    def _answer_shaped(self, mid: int, query: Query, eui_value: bytes, received: float) -> bool:
        """A search of a learnt shape, answered from its compiled form (no decoding, no task);
        False when the short way does not give its answer (the general path then does)."""
        service = self.service
        fast = service.fast
        assert fast is not None
        try:
            framed = fast.framed(mid, query, eui_value, service.directory.clock())
        except Exception:  # the replica unavailable, say: the general path says why
            return False
        if framed is None:
            return False
        data, entries = framed
        fast.shapes.matched += 1
        user = self.user.name if self.user else ANONYMOUS
        self.write(data)
        if service.levels is not None:
            service.levels.served("ldap", "search", user, received)
        if service.access_log:
            access_log.info("ldap conn=%d op=%d search base=%r scope=%d user=%s result=0 entries=%d",
                            self.conn_id, mid, query.base[:200], query.scope, user, entries,
                            extra=self._access("search", 0, received, entries=entries,
                                               base=query.base[:200], scope=query.scope))
        return True

    def _protocol_error(self, exc: ProtocolError) -> None:
        log.info("ldap conn=%d %s: protocol error: %s", self.conn_id, self.peer, exc)
        self.disconnect(ResultCode.PROTOCOL_ERROR, exc.reason)

    def _dispatch(self, request: protocol.Request, content: bytes, received: float) -> None:
        if isinstance(request, protocol.AbandonRequest):
            task = self.tasks.pop(request.abandon_id, None)  # its slot is free at once
            if task is not None:
                task.cancel()
            return
        if self.pending or self.serial is not None:
            self.pending.append(request)
            return
        if isinstance(request, protocol.SearchRequest | protocol.CompareRequest):
            self._spawn(request, content, received)
        else:
            self.serial = asyncio.get_running_loop().create_task(self._serial_op(request))

    def _spawn(self, request: protocol.SearchRequest | protocol.CompareRequest, content: bytes | None,
               received: float) -> None:
        mid = request.message_id
        if len(self.tasks) >= self.service.settings.max_outstanding or mid in self.tasks:
            why = ("message id already in use" if mid in self.tasks else
                   f"more than {self.service.settings.max_outstanding} operations outstanding")
            tag = _SEARCH_DONE if isinstance(request, protocol.SearchRequest) else 15
            self.write(responses.ldap_result(mid, tag, ResultCode.BUSY, "", why))
            return
        coro = (self.op_search(request, content, received) if isinstance(request, protocol.SearchRequest)
                else self.op_compare(request))
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks[mid] = task
        task.add_done_callback(lambda t: self.tasks.pop(mid) if self.tasks.get(mid) is t else None)

    async def _serial_op(self, request: protocol.Request) -> None:
        """A bind, extended operation, unbind or update: after the searches in flight."""
        try:
            if self.tasks:
                await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            await self._run(request)
        finally:
            self.serial = None
        while self.pending and self.serial is None and not self.closing:
            nxt = self.pending.pop(0)
            if isinstance(nxt, protocol.SearchRequest | protocol.CompareRequest):
                self._spawn(nxt, None, time.perf_counter())
            else:
                self.serial = asyncio.get_running_loop().create_task(self._serial_op(nxt))

    async def _run(self, request: protocol.Request) -> None:
        try:
            if isinstance(request, protocol.BindRequest):
                await self.op_bind(request)
            elif isinstance(request, protocol.ExtendedRequest):
                await self.op_extended(request)
            elif isinstance(request, protocol.UnbindRequest):
                self.closing = True
                if self.transport is not None:
                    self.transport.close()
            elif isinstance(request, protocol.ModifyRequest | protocol.AddRequest | protocol.DelRequest
                            | protocol.ModDNRequest):
                self.write(responses.ldap_result(request.message_id, request.response_tag,
                                             ResultCode.UNWILLING_TO_PERFORM, "", _READ_ONLY))
            elif isinstance(request, protocol.SearchRequest | protocol.CompareRequest):
                self._spawn(request, None, time.perf_counter())
        except Exception:
            log.exception("ldap conn=%d: internal error", self.conn_id)
            self.disconnect(ResultCode.OTHER, "internal error (logged on the server)")

    # -- bind ----------------------------------------------------------------------------------------
    async def op_bind(self, req: protocol.BindRequest) -> None:
        try:
            await self._bind(req)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the store is unavailable (users live there): unavailable (52)
            code, message = _failure(exc, self.conn_id)
            self.write(responses.bind_response(req.message_id, code, "", message))

    async def _bind(self, req: protocol.BindRequest) -> None:
        mid = req.message_id
        self._set_user(None)
        if req.version != 3:
            self.write(responses.bind_response(mid, ResultCode.PROTOCOL_ERROR, "",
                                           "only LDAP version 3 is supported"))
            return
        if req.sasl_mechanism is not None:
            await self._bind_sasl(req)
            return
        password = req.password or b""
        if not req.name and not password:
            self._bound(mid, None, "anonymous")
            return
        if not password:
            self.write(responses.bind_response(mid, ResultCode.UNWILLING_TO_PERFORM, "",
                                           "unauthenticated bind (a name without a password) is not allowed"))
            return
        if not self.tls and not self.peer.startswith(("127.", "::1", "[::1]")):
            self.write(responses.bind_response(mid, ResultCode.CONFIDENTIALITY_REQUIRED, "",
                                           "use StartTLS or LDAPS before binding with a password"))
            return
        credentials = self.service.credentials
        name = credentials.user_name(req.name)
        user = await credentials.check_secret(name, password, self.peer) if name else None
        if user is None:
            self._audit("ldap.bind", "refused", name or req.name[:100])
            self.write(responses.bind_response(mid, ResultCode.INVALID_CREDENTIALS, "",
                                           "invalid credentials"))
            return
        self._bound(mid, user, "simple")

    async def _bind_sasl(self, req: protocol.BindRequest) -> None:
        mid = req.message_id
        if req.sasl_mechanism != "EXTERNAL":
            self.write(responses.bind_response(mid, ResultCode.AUTH_METHOD_NOT_SUPPORTED, "",
                                           f"SASL mechanism {req.sasl_mechanism!r} is not supported"
                                           " (EXTERNAL is, over TLS with a client certificate)"))
            return
        cert = self.transport.get_extra_info("peercert") if self.transport is not None else None
        if not self.tls or not cert:
            self.write(responses.bind_response(mid, ResultCode.INAPPROPRIATE_AUTHENTICATION, "",
                                           "SASL EXTERNAL needs TLS with a client certificate"))
            return
        cn = next((value for rdn in cert.get("subject", ()) for key, value in rdn
                   if key == "commonName"), None)
        wanted = (req.sasl_credentials or b"").decode("utf-8", "replace")
        user = await self.service.credentials.external(cn, wanted)
        if user is None:
            self._audit("ldap.bind", "refused", f"EXTERNAL {cn}")
            self.write(responses.bind_response(mid, ResultCode.INVALID_CREDENTIALS, "",
                                           "the client certificate names no enabled repository user"))
            return
        self._bound(mid, user, "EXTERNAL")

    def _set_user(self, user: User | None) -> None:
        self.user = user
        self.private = self.service.access.may_read_private(authenticated=user is not None)

    def _bound(self, mid: int, user: User | None, how: str) -> None:
        self._set_user(user)
        self.write(responses.bind_response(mid, ResultCode.SUCCESS))
        if self.service.access_log:
            access_log.info("ldap conn=%d op=%d bind %s user=%s result=0", self.conn_id, mid, how,
                            user.name if user else ANONYMOUS,
                            extra=self._access("bind", 0, None, method=how))

    def _access(self, operation: str, result: int, received: float | None,
                **more: Any) -> dict[str, Any]:
        """The access line's fields (obs.logs), as the HTTP listeners give them."""
        took = (time.perf_counter() - received) * 1000 if received is not None else None
        return access_extra("ldaps" if self.tls else "ldap", self.peer.rsplit(":", 1)[0],
                            self.user.name if self.user else ANONYMOUS, operation, result, took,
                            None, connection=self.conn_id, **more)

    def _audit(self, action: str, outcome: str, detail: str) -> None:
        detail = detail.replace("\x00", "\\x00")  # the client's bytes; PostgreSQL text refuses NUL
        log.info("ldap conn=%d %s: %s %s (%s)", self.conn_id, self.peer, action, outcome, detail)
        task = asyncio.get_running_loop().create_task(self.service.store.audit(
            actor=f"ldap:{detail}"[:200], action=action, outcome=outcome, peer=self.peer))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    # -- extended ------------------------------------------------------------------------------------
    async def op_extended(self, req: protocol.ExtendedRequest) -> None:
        mid = req.message_id
        if req.oid == STARTTLS_OID:
            await self._start_tls(mid)
        elif req.oid == WHOAMI_OID:
            who = f"dn:uid={self.user.name},{self.service.users_dn}" if self.user else ""
            self.write(responses.extended_response(mid, ResultCode.SUCCESS, value=who.encode()))
        else:
            self.write(responses.extended_response(mid, ResultCode.PROTOCOL_ERROR, "",
                                               f"unsupported extended operation {req.oid}"))

    async def _start_tls(self, mid: int) -> None:
        ctx = self.service.tls
        if self.tls:
            self.write(responses.extended_response(mid, ResultCode.OPERATIONS_ERROR, "",
                                               "TLS is already in place", oid=STARTTLS_OID))
            return
        if ctx is None:
            self.write(responses.extended_response(mid, ResultCode.UNAVAILABLE, "",
                                               "StartTLS is not configured (tls.cert)", oid=STARTTLS_OID))
            return
        if self.decoder.buffered or self.pending:
            self.disconnect(ResultCode.PROTOCOL_ERROR, "data sent after StartTLS before the TLS handshake")
            return
        assert self.transport is not None
        self.write(responses.extended_response(mid, ResultCode.SUCCESS, oid=STARTTLS_OID))
        self._tls_upgrading = True
        try:
            new = await asyncio.get_running_loop().start_tls(
                self.transport, self, ctx, server_side=True,
                ssl_handshake_timeout=self.service.config.tls.handshake_timeout_seconds)
        except Exception as exc:
            log.info("ldap conn=%d %s: StartTLS handshake failed: %s", self.conn_id, self.peer, exc)
            self.abort()
            return
        finally:
            self._tls_upgrading = False
        if new is None:
            self.abort()
            return
        self.transport = new
        self.tls = True

    # -- compare -------------------------------------------------------------------------------------
    async def op_compare(self, req: protocol.CompareRequest) -> None:
        mid = req.message_id
        try:
            entry = await self._entry(req.entry)
            attr, _ = SCHEMA.attribute(req.attribute)
            if attr is None:
                code, message = ResultCode.UNDEFINED_ATTRIBUTE_TYPE, f"unknown attribute {req.attribute}"
            elif attr.key not in entry.attrs:
                code, message = ResultCode.NO_SUCH_ATTRIBUTE, f"the entry has no {attr.name}"
            else:
                found = compile_filter(protocol.EqualityMatch(req.attribute, req.value))(entry)
                code = ResultCode.COMPARE_TRUE if found else ResultCode.COMPARE_FALSE
                message = ""
            self.write(responses.compare_response(mid, code, "", message))
        except DirectoryError as exc:
            self.write(responses.compare_response(mid, exc.code, exc.matched, exc.message))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.write(responses.compare_response(mid, *_failure(exc, self.conn_id)))

    async def _entry(self, name: str) -> Entry:
        try:
            base = self.service.search.base_dn(name)
        except dn.DNError as exc:
            raise DirectoryError(ResultCode.INVALID_DN_SYNTAX, f"invalid DN: {exc}") from None
        node = await self.service.search.readable(base, self.authenticated)
        async for entry in self.service.directory.candidates(node, 0, Plan(), self.authenticated,
                                                             base):
            return entry
        raise DirectoryError(ResultCode.NO_SUCH_OBJECT, "no such entry")

    # -- search --------------------------------------------------------------------------------------
    async def op_search(self, req: protocol.SearchRequest, content: bytes | None, received: float) -> None:
        mid = req.message_id
        service = self.service
        levels = service.levels
        # Lodged material: everything but the root DSE and the subschema entry. Only such
        # searches count for CPM 8 and go into the response cache.
        lodged = not (req.scope == 0 and req.base.strip().lower() in ("", "cn=subschema"))
        mark = levels.receive("ldap", "search", self.user.name if self.user else ANONYMOUS,
                              started=received) if lodged and levels is not None else None
        try:
            out = await self.searches.search(req, content if lodged else None)
        except asyncio.CancelledError:  # abandoned, or the connection went away
            raise
        except Exception as exc:
            out = Outcome(*_failure(exc, self.conn_id))
        done = responses.result_op(_SEARCH_DONE, out.code, out.matched, out.message)
        if out.held:  # the entries and the done in one write
            self.write(responses.frames(mid, out.held) + responses.frame(mid, done, out.controls))
        else:
            self.write(responses.frame(mid, done, out.controls))
        if out.cache_until is not None and out.code == ResultCode.SUCCESS and content is not None:
            ids = codec.message_id(content)
            if ids is not None:
                service.cache.put(self.private, content[ids[1]:], (*out.held, done),
                                  out.cache_until)
        if mark is not None and levels is not None:
            levels.answered(mark, _CPM_STATUS.get(out.code, 200))
        if service.access_log:
            access_log.info("ldap conn=%d op=%d search base=%r scope=%d user=%s result=%d entries=%d",
                            self.conn_id, mid, req.base[:200], req.scope,
                            self.user.name if self.user else ANONYMOUS, out.code, out.sent,
                            extra=self._access("search", int(out.code), received,
                                               entries=out.sent, base=req.base[:200],
                                               scope=req.scope))

def _failure(exc: BaseException, conn_id: int) -> tuple[int, str]:
    if isinstance(exc, ProtocolError):
        return ResultCode.PROTOCOL_ERROR, exc.reason
    if isinstance(exc, ReplicaUnavailable):  # says why (being built, a CRL gone stale)
        log.warning("ldap conn=%d: read replica unavailable: %s", conn_id, exc)
        return ResultCode.UNAVAILABLE, str(exc)
    if store_unavailable(exc):
        log.warning("ldap conn=%d: store unavailable: %s", conn_id, exc)
        return ResultCode.UNAVAILABLE, "the repository store is unavailable; try again shortly"
    log.error("ldap conn=%d: internal error", conn_id, exc_info=exc)
    return ResultCode.OTHER, "internal error (logged on the server)"
