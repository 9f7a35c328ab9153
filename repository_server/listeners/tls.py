"""TLS for the listeners that have it (https, lodge, ldaps): the contexts built from the
configuration, and the gate in front of them.

The TLS listeners accept TCP themselves (`TlsGate`) and hand a connection to the loop's TLS
protocol only when its first bytes arrive: connections in their handshake count against the
listener's cap, a refused handshake (no client certificate, unknown CA, expired, timed out)
is reported to `on_refused` (counted per minute, reason and peer: obs/refusals.py) rather
than silently dropped inside the TLS layer, and the client gets the TLS alert that says why.
Plain HTTP is capped by `capped`.
"""

from __future__ import annotations

import asyncio
import ssl
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from repository_server.config import Config, ConfigError

_LODGE_CIPHERS = "ECDHE+AESGCM"  # TLS 1.2: ECDHE with AES-GCM only


_TLS13_AES_GCM = ("TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256")


def require_file(config: Config, value: str, setting: str) -> Path:
    path = config.path(value)
    if not path.is_file():
        raise ConfigError(f"{setting}: file not found: {path} (run `smki-repository demo` or"
                          " `smki-repository testpki`, or point the setting at your file)")
    return path


def server_tls_context(config: Config) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    cert = require_file(config, config.tls.cert, "tls.cert")
    key = require_file(config, config.tls.key, "tls.key")
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
    ca = require_file(config, config.lodge.client_ca, "lodge.client_ca")
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except ssl.SSLError as exc:
        raise ConfigError(f"lodge.client_ca: no usable CA certificate in {ca}:"
                          f" {exc.reason or exc}") from None
    return ctx


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
        cert = check(lambda: require_file(config, config.tls.cert, "tls.cert"))
        key = check(lambda: require_file(config, config.tls.key, "tls.key"))
        if cert and key:
            check(lambda: server_tls_context(config))
    if lis.lodge and check(lambda: require_file(config, config.lodge.client_ca,
                                                 "lodge.client_ca")) and not problems:
        check(lambda: lodge_tls_context(config))
    if (lis.ldap or lis.ldaps) and config.ldap.client_ca:
        check(lambda: require_file(config, config.ldap.client_ca, "ldap.client_ca"))
    return problems


def ldap_tls_context(config: Config) -> ssl.SSLContext:
    """LDAPS and StartTLS: the server certificate; client certificates are asked for (and
    verified) only when ldap.client_ca names the CAs allowed to SASL EXTERNAL bind."""
    ctx = server_tls_context(config)
    if config.ldap.client_ca:
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cafile=str(require_file(config, config.ldap.client_ca,
                                                           "ldap.client_ca")))
    return ctx


def _ssl_protocol_class(loop: asyncio.AbstractEventLoop) -> Any:
    """The loop's own TLS protocol (what `loop.start_tls` uses internally)."""
    if type(loop).__module__.startswith("uvloop"):
        import uvloop.loop

        return uvloop.loop.SSLProtocol  # type: ignore[attr-defined]
    import asyncio.sslproto

    return asyncio.sslproto.SSLProtocol


class TlsListener:
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
        return TlsGate(self)


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


class TlsGate(asyncio.Protocol):
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

    def __init__(self, listener: TlsListener) -> None:
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
TRIM_AFTER_REFUSALS = 100


def release_freed_memory() -> None:
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


def open_connections(handlers: web.Server) -> int:
    return len(handlers.connections)


def capped(handlers: web.Server, limit: int, on_over_cap: Callable[[], None],
           protocol: Callable[[], asyncio.Protocol] | None = None,
           ) -> Callable[[], asyncio.Protocol]:
    """aiohttp has no connection limit: this protocol factory is one, for plain HTTP (TLS
    listeners are capped by their `TlsListener`, handshakes included). `protocol` makes a
    connection's protocol (default: `handlers`, aiohttp's; the HTTP fast front registers its
    connections with `handlers` too, so they count)."""
    make = protocol or handlers

    def factory() -> asyncio.Protocol:
        if len(handlers.connections) >= limit:
            on_over_cap()
            return _Busy()
        return make()

    return factory
