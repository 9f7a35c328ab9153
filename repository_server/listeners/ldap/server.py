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
* Device, organisation and other certificate entries are visible to bound users only,
  unless ``ldap.open_reads``. Writes are refused (unwillingToPerform): the repository is
  written only through the mutual-TLS lodging listener.
* Every search for lodged material (anything but the root DSE and the subschema entry) is
  timed for Code Performance Measure 8 from receipt to the SearchResultDone being written.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import ssl
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

from repository_server.accounts import Accounts
from repository_server.accounts.keys import User
from repository_server.config import Config
from repository_server.listeners.ldap import codec, dn
from repository_server.listeners.ldap.codec import PAGED_RESULTS_OID, STARTTLS_OID, ProtocolError, ResultCode
from repository_server.listeners.ldap.directory import Directory, DirectoryError, Node
from repository_server.listeners.ldap.fastpath import FastSearch
from repository_server.listeners.ldap.filters import Entry, Plan, compile_filter, plan
from repository_server.listeners.ldap.matching import selected_keys
from repository_server.listeners.ldap.schema import SCHEMA, AttributeType
from repository_server.obs.arrival import socket_waited
from repository_server.obs.logs import access_extra
from repository_server.service_levels import ANONYMOUS, ServiceLevels
from repository_server.store.db import Store
from repository_server.store.db import unavailable as store_unavailable

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
USERS_RDN = "ou=Users"
_SEARCH_DONE = 5
_CACHEABLE_ENTRIES = 16
_CACHEABLE_BYTES = 256 * 1024
_MAX_PAGED = 8  # paged searches kept open per connection
_READ_ONLY = ("the repository is read-only over LDAP: the DCC lodges through the mutual-TLS"
              " lodging API")
_PRIVATE = ("device and organisation entries need a bound repository user (simple bind with"
            " an API key or password, or SASL EXTERNAL)")


@dataclass(frozen=True, slots=True)
class Selection:
    """Which attributes a search asked for (RFC 4511 §4.5.1.8)."""

    all_user: bool
    all_operational: bool
    named: frozenset[str]  # canonical lower-case keys

    @classmethod
    def parse(cls, attributes: tuple[str, ...]) -> Selection:
        if not attributes:
            return cls(True, False, frozenset())
        named: set[str] = set()
        for a in attributes:
            if a not in ("*", "+", "1.1"):  # a type covers its subtypes; a tagged one nothing
                named.update(selected_keys(a))
        return cls("*" in attributes, "+" in attributes, frozenset(named))

    def pick(self, entry: Entry, types_only: bool) -> list[tuple[str, list[bytes]]]:
        out = []
        for key, values in entry.attrs.items():
            attr = _BY_KEY.get(key)
            if attr is None:
                continue
            if key in self.named or (self.all_operational if attr.operational else self.all_user):
                out.append((attr.wire_name, [] if types_only else values))
        return out


_BY_KEY: dict[str, AttributeType] = {a.key: a for a in SCHEMA.attributes}


@dataclass(slots=True)
class Outcome:
    """How a search ended, and what it holds back for the final write."""

    code: int
    message: str = ""
    matched: str = ""
    controls: tuple[codec.Control, ...] = ()
    sent: int = 0
    held: list[bytes] = field(default_factory=list)  # entry ops not written yet
    cache_until: float | None = None  # set while the answer may go into the response cache


class ResponseCache:
    """Pre-encoded answers to searches, keyed by the request's bytes after its message id, one
    map per access level (anonymous, or allowed to see device entries); LRU, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.maps: tuple[OrderedDict[bytes, tuple[tuple[bytes, ...], float]], ...] = (
            OrderedDict(), OrderedDict())
        self.hits = 0

    def clear(self) -> None:
        for m in self.maps:
            m.clear()
        self.bytes = 0

    @staticmethod
    def _size(key: bytes, ops: tuple[bytes, ...]) -> int:
        return len(key) + sum(len(o) for o in ops) + 200

    def put(self, private: bool, key: bytes, ops: tuple[bytes, ...], valid_until: float) -> None:
        size = self._size(key, ops)
        if size > self.max_bytes // 8:
            return
        target = self.maps[private]
        old = target.pop(key, None)
        if old is not None:
            self.bytes -= self._size(key, old[0])
        target[key] = (ops, valid_until)
        self.bytes += size
        while self.bytes > self.max_bytes:
            victim = max(self.maps, key=len)
            k, (o, _) = victim.popitem(last=False)
            self.bytes -= self._size(k, o)


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
        self.cache = ResponseCache(self.settings.response_cache_mb * 1024 * 1024)
        directory.on_change(self.cache.clear)
        self.connections: set[LdapConnection] = set()
        self.ids = itertools.count(1)
        self.accounts = accounts
        self.users_dn = f"{USERS_RDN},{directory.suffix}"
        self._nusers = dn.parse_normalised(self.users_dn)
        self._bases: dict[str, dn.DN] = {}
        self._selections: dict[tuple[str, ...], Selection] = {}
        # the short way for searches by EUI-64 (ldap/fastpath.py); off: everything the long way
        self.fast = FastSearch(directory) if self.settings.fast_path else None
        # told of each connection refused for ldap.max_connections (a metric): (listener)
        self.on_over_cap: Callable[[str], None] | None = None

    def selection(self, attributes: tuple[str, ...]) -> Selection:
        """The attributes a search asks for (memoised: clients ask for a few lists)."""
        found = self._selections.get(attributes)
        if found is None:
            found = Selection.parse(attributes)
            if len(self._selections) >= 1024:
                self._selections.clear()
            self._selections[attributes] = found
        return found

    def base_dn(self, text: str) -> dn.DN:
        """A search base, normalised (memoised: clients ask under a few bases)."""
        found = self._bases.get(text)
        if found is None:
            found = dn.parse_normalised(text)
            if len(self._bases) >= 1024:
                self._bases.clear()
            self._bases[text] = found
        return found

    def factory(self, *, ldaps: bool) -> LdapConnection:
        return LdapConnection(self, ldaps=ldaps)

    def user_name(self, bind_dn: str) -> str | None:
        """The repository user a bind DN names: uid=NAME,ou=Users,<suffix>, or NAME itself.
        None if it names none (a NUL can be in no user's name: PostgreSQL text refuses it)."""
        if "\x00" in bind_dn:
            return None
        if "=" not in bind_dn:
            return bind_dn.strip() or None
        try:
            parsed = dn.parse(bind_dn)
            normal = dn.normalise(parsed)
        except dn.DNError:
            return None
        if len(parsed) == len(self._nusers) + 1 and normal[1:] == self._nusers and \
                len(parsed[0]) == 1 and normal[0][0][0] in ("uid", "cn"):
            return parsed[0][0][1]
        return None

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
        self.private = s.open_reads
        self.peer = "?"
        self.conn_id = 0
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.pending: list[codec.Request] = []  # requests waiting behind a bind/StartTLS
        self.serial: asyncio.Task[None] | None = None
        # open paged searches: cookie -> (their entries, how many were sent so far)
        self.paged: OrderedDict[bytes, tuple[AsyncGenerator[Entry, None], int]] = OrderedDict()
        self.writable = asyncio.Event()
        self.writable.set()
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
        self.sock = transport.get_extra_info("socket")
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
        self.service.connections.discard(self)
        for handle in (self._idle, self._stall):
            if handle is not None:
                handle.cancel()
        for task in self.tasks.values():
            task.cancel()
        if self.serial is not None:
            self.serial.cancel()
        for gen, _ in self.paged.values():
            _close_later(gen)
        self.paged.clear()
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

    def disconnect(self, code: ResultCode, message: str) -> None:
        """Notice of disconnection (RFC 4511 §4.4.1), then close."""
        if self.transport is None or self.closing:
            return
        self.closing = True
        with contextlib.suppress(Exception):
            self.transport.write(codec.notice_of_disconnection(code, message))
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
        try:
            frames = self.decoder.frames(data)
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        if not frames:
            return
        self.service.directory.check_version()  # a change applied: older answers go
        received = now - socket_waited(self.sock)  # CPM 8: when the bytes reached this host
        cache = self.service.cache.maps[self.private]
        for content in frames:
            if cache and not self.pending and self.serial is None:
                ids = codec.message_id(content)
                if ids is not None:
                    key = content[ids[1]:]
                    hit = cache.get(key)
                    if hit is not None and hit[1] > time.time():
                        cache.move_to_end(key)
                        self._answer_cached(ids[0], hit[0], received)
                        continue
            try:
                request = codec.decode_message(content, self.decoder.max_depth)
            except ProtocolError as exc:
                self._protocol_error(exc)
                return
            self._dispatch(request, content, received)

    def _answer_cached(self, mid: int, ops: tuple[bytes, ...], received: float) -> None:
        service = self.service
        service.cache.hits += 1
        levels = service.levels
        mark = levels.receive("ldap", "search", self.user.name if self.user else ANONYMOUS,
                              started=received) if levels is not None else None
        self.write(codec.frames(mid, ops))
        if mark is not None and levels is not None:
            levels.answered(mark, 200)
        if service.access_log:
            access_log.info("ldap conn=%d op=%d search (cached) result=0 entries=%d", self.conn_id,
                            mid, len(ops) - 1, extra=self._access(
                                "search", 0, received, entries=len(ops) - 1, cached=True))

    def _protocol_error(self, exc: ProtocolError) -> None:
        log.info("ldap conn=%d %s: protocol error: %s", self.conn_id, self.peer, exc)
        self.disconnect(ResultCode.PROTOCOL_ERROR, exc.reason)

    def _dispatch(self, request: codec.Request, content: bytes, received: float) -> None:
        if isinstance(request, codec.AbandonRequest):
            task = self.tasks.pop(request.abandon_id, None)  # its slot is free at once
            if task is not None:
                task.cancel()
            return
        if self.pending or self.serial is not None:
            self.pending.append(request)
            return
        if isinstance(request, codec.SearchRequest | codec.CompareRequest):
            self._spawn(request, content, received)
        else:
            self.serial = asyncio.get_running_loop().create_task(self._serial_op(request))

    def _spawn(self, request: codec.SearchRequest | codec.CompareRequest, content: bytes | None,
               received: float) -> None:
        mid = request.message_id
        if len(self.tasks) >= self.service.settings.max_outstanding or mid in self.tasks:
            why = ("message id already in use" if mid in self.tasks else
                   f"more than {self.service.settings.max_outstanding} operations outstanding")
            tag = _SEARCH_DONE if isinstance(request, codec.SearchRequest) else 15
            self.write(codec.ldap_result(mid, tag, ResultCode.BUSY, "", why))
            return
        coro = (self.op_search(request, content, received) if isinstance(request, codec.SearchRequest)
                else self.op_compare(request))
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks[mid] = task
        task.add_done_callback(lambda t: self.tasks.pop(mid) if self.tasks.get(mid) is t else None)

    async def _serial_op(self, request: codec.Request) -> None:
        """A bind, extended operation, unbind or update: after the searches in flight."""
        try:
            if self.tasks:
                await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            await self._run(request)
        finally:
            self.serial = None
        while self.pending and self.serial is None and not self.closing:
            nxt = self.pending.pop(0)
            if isinstance(nxt, codec.SearchRequest | codec.CompareRequest):
                self._spawn(nxt, None, time.perf_counter())
            else:
                self.serial = asyncio.get_running_loop().create_task(self._serial_op(nxt))

    async def _run(self, request: codec.Request) -> None:
        try:
            if isinstance(request, codec.BindRequest):
                await self.op_bind(request)
            elif isinstance(request, codec.ExtendedRequest):
                await self.op_extended(request)
            elif isinstance(request, codec.UnbindRequest):
                self.closing = True
                if self.transport is not None:
                    self.transport.close()
            elif isinstance(request, codec.ModifyRequest | codec.AddRequest | codec.DelRequest
                            | codec.ModDNRequest):
                self.write(codec.ldap_result(request.message_id, request.response_tag,
                                             ResultCode.UNWILLING_TO_PERFORM, "", _READ_ONLY))
            elif isinstance(request, codec.SearchRequest | codec.CompareRequest):
                self._spawn(request, None, time.perf_counter())
        except Exception:
            log.exception("ldap conn=%d: internal error", self.conn_id)
            self.disconnect(ResultCode.OTHER, "internal error (logged on the server)")

    # -- bind ----------------------------------------------------------------------------------------
    async def op_bind(self, req: codec.BindRequest) -> None:
        try:
            await self._bind(req)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the store is unavailable (users live there): unavailable (52)
            code, message = _failure(exc, self.conn_id)
            self.write(codec.bind_response(req.message_id, code, "", message))

    async def _bind(self, req: codec.BindRequest) -> None:
        mid = req.message_id
        self.user = None
        self.private = self.service.settings.open_reads
        if req.version != 3:
            self.write(codec.bind_response(mid, ResultCode.PROTOCOL_ERROR, "",
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
            self.write(codec.bind_response(mid, ResultCode.UNWILLING_TO_PERFORM, "",
                                           "unauthenticated bind (a name without a password) is not allowed"))
            return
        if not self.tls and not self.peer.startswith(("127.", "::1", "[::1]")):
            self.write(codec.bind_response(mid, ResultCode.CONFIDENTIALITY_REQUIRED, "",
                                           "use StartTLS or LDAPS before binding with a password"))
            return
        name = self.service.user_name(req.name)
        user = await self._check_secret(name, password) if name else None
        if user is None:
            self._audit("ldap.bind", "refused", name or req.name[:100])
            self.write(codec.bind_response(mid, ResultCode.INVALID_CREDENTIALS, "",
                                           "invalid credentials"))
            return
        self._bound(mid, user, "simple")

    async def _check_secret(self, name: str, secret: bytes) -> User | None:
        """The user, if `secret` is its API key or its portal password. Passwords follow the
        portal's SEC lockout (the same counters in PostgreSQL); API keys are random secrets
        and are not counted."""
        try:
            text = secret.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return await self.service.accounts.key_or_password_login(
            name, text, actor="ldap", action="ldap.bind", peer=self.peer)

    async def _bind_sasl(self, req: codec.BindRequest) -> None:
        mid = req.message_id
        if req.sasl_mechanism != "EXTERNAL":
            self.write(codec.bind_response(mid, ResultCode.AUTH_METHOD_NOT_SUPPORTED, "",
                                           f"SASL mechanism {req.sasl_mechanism!r} is not supported"
                                           " (EXTERNAL is, over TLS with a client certificate)"))
            return
        cert = self.transport.get_extra_info("peercert") if self.transport is not None else None
        if not self.tls or not cert:
            self.write(codec.bind_response(mid, ResultCode.INAPPROPRIATE_AUTHENTICATION, "",
                                           "SASL EXTERNAL needs TLS with a client certificate"))
            return
        cn = next((value for rdn in cert.get("subject", ()) for key, value in rdn
                   if key == "commonName"), None)
        row = await self.service.store.user(cn) if cn else None
        wanted = (req.sasl_credentials or b"").decode("utf-8", "replace")
        if row is None or row.disabled or (wanted and self.service.user_name(
                wanted.removeprefix("dn:").removeprefix("u:")) != row.name):
            self._audit("ldap.bind", "refused", f"EXTERNAL {cn}")
            self.write(codec.bind_response(mid, ResultCode.INVALID_CREDENTIALS, "",
                                           "the client certificate names no enabled repository user"))
            return
        self._bound(mid, User(row.name, row.role), "EXTERNAL")

    def _bound(self, mid: int, user: User | None, how: str) -> None:
        self.user = user
        self.private = self.service.settings.open_reads or user is not None
        self.write(codec.bind_response(mid, ResultCode.SUCCESS))
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
    async def op_extended(self, req: codec.ExtendedRequest) -> None:
        mid = req.message_id
        if req.oid == STARTTLS_OID:
            await self._start_tls(mid)
        elif req.oid == WHOAMI_OID:
            who = f"dn:uid={self.user.name},{self.service.users_dn}" if self.user else ""
            self.write(codec.extended_response(mid, ResultCode.SUCCESS, value=who.encode()))
        else:
            self.write(codec.extended_response(mid, ResultCode.PROTOCOL_ERROR, "",
                                               f"unsupported extended operation {req.oid}"))

    async def _start_tls(self, mid: int) -> None:
        ctx = self.service.tls
        if self.tls:
            self.write(codec.extended_response(mid, ResultCode.OPERATIONS_ERROR, "",
                                               "TLS is already in place", oid=STARTTLS_OID))
            return
        if ctx is None:
            self.write(codec.extended_response(mid, ResultCode.UNAVAILABLE, "",
                                               "StartTLS is not configured (tls.cert)", oid=STARTTLS_OID))
            return
        if self.decoder.buffered or self.pending:
            self.disconnect(ResultCode.PROTOCOL_ERROR, "data sent after StartTLS before the TLS handshake")
            return
        assert self.transport is not None
        self.write(codec.extended_response(mid, ResultCode.SUCCESS, oid=STARTTLS_OID))
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
    async def op_compare(self, req: codec.CompareRequest) -> None:
        mid = req.message_id
        try:
            entry = await self._entry(req.entry)
            attr, _ = SCHEMA.attribute(req.attribute)
            if attr is None:
                code, message = ResultCode.UNDEFINED_ATTRIBUTE_TYPE, f"unknown attribute {req.attribute}"
            elif attr.key not in entry.attrs:
                code, message = ResultCode.NO_SUCH_ATTRIBUTE, f"the entry has no {attr.name}"
            else:
                found = compile_filter(codec.EqualityMatch(req.attribute, req.value))(entry)
                code = ResultCode.COMPARE_TRUE if found else ResultCode.COMPARE_FALSE
                message = ""
            self.write(codec.compare_response(mid, code, "", message))
        except DirectoryError as exc:
            self.write(codec.compare_response(mid, exc.code, exc.matched, exc.message))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.write(codec.compare_response(mid, *_failure(exc, self.conn_id)))

    async def _entry(self, name: str) -> Entry:
        try:
            base = self.service.base_dn(name)
        except dn.DNError as exc:
            raise DirectoryError(ResultCode.INVALID_DN_SYNTAX, f"invalid DN: {exc}") from None
        node = await self._readable(base)
        async for entry in self.service.directory.candidates(node, 0, Plan(), self.private, base):
            return entry
        raise DirectoryError(ResultCode.NO_SUCH_OBJECT, "no such entry")

    async def _readable(self, base: dn.DN) -> Node:
        """The node a base names, if this connection may read it (device, organisation and
        other certificate entries need a bound user unless ldap.open_reads)."""
        node = await self.service.directory.resolve(base)
        if node.kind in ("subject", "cert") and not self.private:
            raise DirectoryError(ResultCode.INSUFFICIENT_ACCESS_RIGHTS, _PRIVATE)
        return node

    # -- search --------------------------------------------------------------------------------------
    async def op_search(self, req: codec.SearchRequest, content: bytes | None, received: float) -> None:
        mid = req.message_id
        service = self.service
        levels = service.levels
        # Lodged material: everything but the root DSE and the subschema entry. Only such
        # searches count for CPM 8 and go into the response cache.
        lodged = not (req.scope == 0 and req.base.strip().lower() in ("", "cn=subschema"))
        mark = levels.receive("ldap", "search", self.user.name if self.user else ANONYMOUS,
                              started=received) if lodged and levels is not None else None
        try:
            out = await self._search(req, content if lodged else None)
        except asyncio.CancelledError:  # abandoned, or the connection went away
            raise
        except Exception as exc:
            out = Outcome(*_failure(exc, self.conn_id))
        done = codec.result_op(_SEARCH_DONE, out.code, out.matched, out.message)
        if out.held:  # the entries and the done in one write
            self.write(codec.frames(mid, out.held) + codec.frame(mid, done, out.controls))
        else:
            self.write(codec.frame(mid, done, out.controls))
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

    async def _search(self, req: codec.SearchRequest, content: bytes | None) -> Outcome:
        settings = self.service.settings
        paging: tuple[int, bytes] | None = None
        for control in req.controls:
            if control.oid == PAGED_RESULTS_OID:
                paging = codec.decode_paged_results(control.value)
            elif control.critical:
                return Outcome(ResultCode.UNAVAILABLE_CRITICAL_EXTENSION,
                               f"critical control {control.oid} is not supported")
        if req.scope > 3:  # base, one level, subtree, subordinate subtree
            return Outcome(ResultCode.PROTOCOL_ERROR, "invalid scope")
        try:
            base = self.service.base_dn(req.base)
        except dn.DNError as exc:
            return Outcome(ResultCode.INVALID_DN_SYNTAX, f"invalid base DN: {exc}")
        selection = self.service.selection(req.attributes)
        limits = [x for x in (req.size_limit, settings.size_limit) if x > 0]
        size_limit = min(limits) if limits else 0
        if paging is None and self.service.fast is not None:
            found = self.service.fast.entries(
                req, base, self.private, selection.named,
                selection.all_user or selection.all_operational, self.service.directory.clock())
            if found is not None and (not size_limit or len(found) <= size_limit):
                return self._fast_outcome(req, found, selection, content is not None)
        times = [x for x in (req.time_limit, settings.time_limit_seconds) if x > 0]
        deadline = time.monotonic() + min(times) if times else float("inf")

        if paging is not None:
            return await self._paged_search(req, base, selection, paging, deadline)
        try:
            node = await self._readable(base)
        except DirectoryError as exc:
            return Outcome(exc.code, exc.message, exc.matched)
        # Entries are held back (and written with the done) while the answer is small enough
        # to be cached; beyond that they are written as found, pausing while the client lags.
        out = Outcome(ResultCode.SUCCESS, cache_until=float("inf") if content is not None else None)
        held = out.held
        held_bytes = 0
        mid = req.message_id
        matches = self._matches(req, node, base)
        try:
            async for entry in matches:
                # checked between entries; one store read is bounded by database.command_timeout
                if time.monotonic() > deadline:
                    out.code, out.message = ResultCode.TIME_LIMIT_EXCEEDED, "time limit exceeded"
                    break
                if size_limit and out.sent >= size_limit:
                    out.code = ResultCode.SIZE_LIMIT_EXCEEDED
                    out.message = f"more than {size_limit} entries match"
                    break
                op = codec.entry_op(entry.dn, selection.pick(entry, req.types_only))
                out.sent += 1
                held.append(op)
                if out.cache_until is not None:
                    out.cache_until = min(out.cache_until, entry.valid_until)
                    held_bytes += len(op)
                    if len(held) <= _CACHEABLE_ENTRIES and held_bytes <= _CACHEABLE_BYTES:
                        continue
                    out.cache_until = None
                self.write(codec.frames(mid, held))
                held.clear()
                if not self.writable.is_set():
                    await self.writable.wait()
        finally:
            await matches.aclose()
        return out

    def _fast_outcome(self, req: codec.SearchRequest, found: list[Entry],
                      selection: Selection, cacheable: bool) -> Outcome:
        """The answer of ldap/fastpath.py's short way, shaped as the general path's."""
        out = Outcome(ResultCode.SUCCESS, cache_until=float("inf") if cacheable else None)
        for entry in found:
            out.held.append(codec.entry_op(entry.dn, selection.pick(entry, req.types_only)))
            if out.cache_until is not None:
                out.cache_until = min(out.cache_until, entry.valid_until)
        out.sent = len(found)
        if len(found) > _CACHEABLE_ENTRIES or sum(map(len, out.held)) > _CACHEABLE_BYTES:
            out.cache_until = None
        return out

    async def _matches(self, req: codec.SearchRequest, node: Node,
                       base: dn.DN) -> AsyncGenerator[Entry, None]:
        predicate = compile_filter(req.filter)
        private = self.private
        async for entry in self.service.directory.candidates(node, req.scope, plan(req.filter),
                                                             private, base):
            if (entry.public or private) and predicate(entry) is True:
                yield entry

    async def _paged_search(self, req: codec.SearchRequest, base: dn.DN, selection: Selection,
                            paging: tuple[int, bytes], deadline: float) -> Outcome:
        """One page. The server's size limit bounds each page; the client's bounds the whole
        search, which ends with sizeLimitExceeded after that many entries (RFC 2696 §3,
        RFC 4511 §4.5.1.4; slapd does the same)."""
        page_size, cookie = paging
        settings = self.service.settings
        ended = (codec.paged_results_control(0, b""),)
        sent_before = 0
        if cookie:
            found = self.paged.pop(cookie, None)
            if found is None:
                return Outcome(ResultCode.UNWILLING_TO_PERFORM,
                               "unknown or expired paged results cookie")
            matches, sent_before = found
            if page_size == 0:  # the client abandons the paged search
                _close_later(matches)
                return Outcome(ResultCode.SUCCESS, controls=ended)
        else:
            try:
                node = await self._readable(base)
            except DirectoryError as exc:
                return Outcome(exc.code, exc.message, exc.matched)
            if page_size == 0:
                return Outcome(ResultCode.SUCCESS, controls=ended)
            matches = self._matches(req, node, base)
        page = min(page_size, settings.size_limit) if settings.size_limit else page_size
        if req.size_limit:
            page = min(page, req.size_limit - sent_before)
        out = Outcome(ResultCode.SUCCESS, controls=ended)
        more = True
        while out.sent < page:
            if time.monotonic() > deadline:
                _close_later(matches)
                out.code, out.message = ResultCode.TIME_LIMIT_EXCEEDED, "time limit exceeded"
                return out
            try:
                entry = await anext(matches)
            except StopAsyncIteration:
                more = False
                break
            self.write(codec.frame(req.message_id, codec.entry_op(
                entry.dn, selection.pick(entry, req.types_only))))
            out.sent += 1
            if not self.writable.is_set():
                await self.writable.wait()
        if more and req.size_limit and sent_before + out.sent >= req.size_limit:
            try:  # the client's limit is reached: is there more than it allows?
                await anext(matches)
            except StopAsyncIteration:
                more = False
            else:
                out.code = ResultCode.SIZE_LIMIT_EXCEEDED
                out.message = f"more than {req.size_limit} entries match"
                more = False
        if more:
            next_cookie = secrets.token_bytes(12)
            self.paged[next_cookie] = (matches, sent_before + out.sent)
            while len(self.paged) > _MAX_PAGED:
                _, (old, _) = self.paged.popitem(last=False)
                _close_later(old)
            out.controls = (codec.paged_results_control(0, next_cookie),)
        else:
            _close_later(matches)
        return out


def _close_later(gen: AsyncGenerator[Entry, None]) -> None:
    with contextlib.suppress(RuntimeError):
        task = asyncio.get_running_loop().create_task(gen.aclose())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())


def _failure(exc: BaseException, conn_id: int) -> tuple[int, str]:
    if isinstance(exc, ProtocolError):
        return ResultCode.PROTOCOL_ERROR, exc.reason
    if store_unavailable(exc):
        log.warning("ldap conn=%d: store unavailable: %s", conn_id, exc)
        return ResultCode.UNAVAILABLE, "the repository store is unavailable; try again shortly"
    log.error("ldap conn=%d: internal error", conn_id, exc_info=exc)
    return ResultCode.OTHER, "internal error (logged on the server)"
