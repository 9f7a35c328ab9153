"""The fast front of the read listeners (http, https): the hot request without aiohttp.

Measured first (bench/bare_responders.py, and our server serving a 20,000-device test PKI
(40,029 certificates, which fit in the page cache; at 1,000,000 devices beside nginx see
BENCHMARKS.md, *The read path, second pass*) with `GET /certificates/{serial}?apikey=KEY` over every device
certificate; wrk -t1 pinned to CPU 1, each server pinned to CPU 0, 10 s, the four run in turn
and medians of 3 rounds, 2026-12-05 on the shared 2-core VM with other benchmarks running
(load average 4-6: compare within a column only); req/s, p99 in ms):

    responder                          64 connections     1 connection
    bare aiohttp + uvloop               8,852 (42 ms)      6,035 (9.1 ms)
    bare httptools + uvloop            39,321 (23 ms)     18,586 (6.7 ms)
    ours, web.fast_front = true        13,674 (21 ms)     10,616 (7.0 ms)
    ours, web.fast_front = false        6,464 (55 ms)      5,167 (18 ms)

(An earlier, quieter minute: bare aiohttp 12,091 and bare httptools 46,099 at 64 connections;
ours 22,498 with the front and 8,254 without.) Of the front's time per hot request about
5.5 µs is the replica read (`Catalog.download`) and 4 µs the head's parse and checks; the
rest is the loop's I/O, as in the bare responder.

aiohttp's own per-request cost (its parser, request and response objects, a task per
connection and the stream writer) was the ceiling under the hot download: a bare aiohttp
handler with a fixed body did fewer requests per second than nginx does with ours. So the
read listeners' protocol is this front, not aiohttp's: it parses with httptools (llhttp, as
uvicorn does) in an `asyncio.Protocol` and answers the hot request, `GET` or `HEAD
/certificates/{serial}` in the exact cases `Downloads.certificate_cached` answers (the serial
spelt canonically and in the replica, no query but `?apikey=`, no conditional header, no PEM
Accept), synchronously in `data_received`, with the bytes aiohttp would send (status, headers
in aiohttp's order, Date and Server included). It keeps what the aiohttp path does for that
request: the API key's user (`accounts.user_for_key`), the read rule
(`Downloads.certificate_answer`), the CPM 8 receipt from the request's arrival
(`levels.receive` with `waited(transport)`) and its end once written (`levels.answered`, or the
access logger, which does that and writes the line, when the access log is on), and the
route's metrics.

The web service's two POSTs are hot too (`HotWebService`): a Content-Length of at most
web.ws_max_body_bytes, no Expect or Transfer-Encoding, a query of `?apikey=KEY` or none. The
front waits up to _BODY_WAIT (1 s) for a body that comes after its head, then hands it over.
The answer is `WebService.reply`'s, the function aiohttp's handlers answer with, so the XML,
the audit reference (one counter per listener) and the status are the same; the head is what
aiohttp writes for that `web.Response`. With aiohttp (about 56 % of a web-service request's
server time, py-spy, 1,000,000 devices) the web service did 9,993 requests/s beside nginx's
67,052 (0.15×); in the front, 13,122 beside 61,339 on a slower evening (0.205×), and 1.95× the
code before at 100,000 devices (BENCHMARKS.md, *The read path, fourth pass*). A store error
(the replica not ready) leaves the request to aiohttp, which answers its 503.

Everything else goes to aiohttp: the first request that is not hot (another path or method, a
query, a conditional or PEM request, a GET with a body, Expect, Upgrade, Connection other than keep-alive
or close, HTTP/1.0, a repeated header, a head larger than web.max_header_bytes or with more
than web.max_headers lines, a bare-LF head, anything the parser refuses) makes the connection
aiohttp's for good: a `RequestHandler` of the listener's `web.Server` takes the transport and
the bytes not answered yet, so aiohttp answers it as if it had had the connection all along
(a 400 for garbage, a 431, the 404 or the full certificate handler). Requests already answered
were written first: pipelined requests are answered in order.

While the front has a connection it is one of the `web.Server`'s connections (so
web.max_connections and the TLS cap count it, and the runner's cleanup closes it), it closes a
connection that sends no complete request head for web.idle_timeout_seconds after it opened or
after the last answer (as aiohttp's keepalive_timeout does, partial data not counting: a
slowloris), and it stops reading while the transport is paused for writing. On the https
listener it sits on the TLS transport the TLS gate made. `web.fast_front = false`: plain
aiohttp, as before.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, cast

import httptools
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.tcp_helpers import tcp_keepalive

from repository_server.listeners.http.app import ReadParts
from repository_server.listeners.http.webservice import WebService
from repository_server.obs.access import NOTE, Note
from repository_server.obs.arrival import drop_socket, own_socket, socket_waited
from repository_server.service_levels import ANONYMOUS

ROUTE = "/certificates/{serial}"
_GET = b"GET /certificates/"
_HEAD = b"HEAD /certificates/"
_POST = b"POST /services/"  # the web service's routes (`WebService.routes`) start so
# how long the front waits for the rest of a web service body sent after its head (a client
# that writes head and body apart: Python's http.client) before aiohttp takes the connection
# (and its own web.body_timeout_seconds with it)
_BODY_WAIT = 1.0
# a request with any of these is aiohttp's (Connection is checked by value)
_NOT_HOT = frozenset({b"if-none-match", b"if-modified-since", b"expect", b"upgrade",
                      b"transfer-encoding", b"content-length"})
_PEM = b"application/x-pem-file"
# `?apikey=KEY` as `request_key` reads it from the raw target: a key with nothing to unescape
# (no &, %, + or #), ASCII here
_KEY_QUERY = re.compile(rb"apikey=([^&%+#\x80-\xff]+)")


# (serial, API key, HEAD, Connection: close, User-Agent) of a hot download
_Get = tuple[str, str | None, bool, bool, str | None]
# (operation, API key, Content-Length, Connection: close, User-Agent) of a web service POST
_Post = tuple[str, str | None, int, bool, str | None]


class _Date:
    """aiohttp's Date header (its own formatter: cached per second), encoded once a second."""

    __slots__ = ("line", "second")

    def __init__(self) -> None:
        self.second = -1
        self.line = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.line = f"Date: {rfc822_formatted_time()}\r\n".encode()
            self.second = now
        return self.line


class _LoggedRequest:
    """What the access logger reads of a request (`obs/access.py`), for a hot one."""

    __slots__ = ("headers", "method", "note", "path", "remote", "secure")

    def __init__(self, method: str, path: str, remote: str | None, secure: bool,
                 agent: str | None, note: Note) -> None:
        self.method = method
        self.path = path
        self.remote = remote
        self.secure = secure
        self.headers = {"User-Agent": agent} if agent is not None else {}
        self.note = note

    def get(self, key: object, default: Any = None) -> Any:
        return self.note if key is NOTE else default


class _LoggedResponse:
    __slots__ = ("body_length", "status")

    def __init__(self, status: int, body_length: int) -> None:
        self.status = status
        self.body_length = body_length


class HotDownloads:
    """The hot request's answer and bookkeeping, as `with_fast_path` and
    `certificate_cached` (listeners/http/app.py, downloads.py) do them for aiohttp."""

    def __init__(self, listener: str, parts: ReadParts,
                 access_logger: AbstractAccessLogger | None) -> None:
        self.downloads = parts.downloads
        self.user_for_key = parts.accounts.user_for_key
        self.levels = parts.counting
        self.stats = parts.metrics.http.route(listener, ROUTE)
        self.operation = next(op for _m, path, op, _h in parts.downloads.routes()
                              if path == ROUTE)
        self.access_logger = access_logger  # None: the access log is off
        self.secure = listener == "https"
        self.date = _Date()
        self.server = f"Server: {SERVER_SOFTWARE}\r\n".encode()
        self._heads: dict[int, bytes] = {}  # id(static headers) -> their lines

    def _static(self, static: dict[str, str]) -> bytes:
        head = self._heads.get(id(static))
        if head is None:  # the read rule's two header sets, encoded once each
            head = self._heads[id(static)] = b"HTTP/1.1 200 OK\r\n" + "".join(
                f"{k}: {v}\r\n" for k, v in static.items()).encode()
        return head

    def answer(self, serial: str, key: str | None, head_only: bool, close: bool,
               arrived: float, transport: asyncio.BaseTransport, agent: str | None
               ) -> bytes | None:
        """The whole response to a hot request, counted and logged; None: aiohttp's."""
        started = time.perf_counter()
        user = self.user_for_key(key) if key else None
        found = self.downloads.certificate_answer(serial, user is not None)
        if found is None:
            return None
        der, tag, last_modified, static = found
        out = b"".join((self._static(static), b"ETag: ", tag.encode(), b"\r\nLast-Modified: ",
                        last_modified.encode(), b"\r\nContent-Length: ", str(len(der)).encode(),
                        b"\r\n", self.date(), self.server,
                        b"Connection: close\r\n\r\n" if close else b"\r\n"))
        if not head_only:
            out += der
        name = user.name if user else ANONYMOUS
        note = (Note("download", self.operation, name, None, user, arrived)
                if self.access_logger is not None else None)
        self.account(self.stats, "download", self.operation, name, arrived, started, note, 200,
                     len(out), ("HEAD" if head_only else "GET", "/certificates/" + serial),
                     transport, agent)
        return out

    def account(self, stats: Any, interface: str, operation: str, user: str, arrived: float,
                started: float, note: Note | None, status: int, size: int,
                request: tuple[str, str], transport: asyncio.BaseTransport,
                agent: str | None) -> None:
        """What aiohttp's path does after an answer, for one the front gave: the CPM 8 receipt
        (from the request's arrival) and end, the route's metrics (`stats`), and the access
        log line (`note`, given when the access log is on) for `request` (method, path)."""
        levels = self.levels
        mark = levels.receive(interface, operation, user, started=arrived) if levels else None
        stats.record(status, time.perf_counter() - started)
        logger = self.access_logger
        if logger is not None and note is not None:
            note.mark = mark
            peer = transport.get_extra_info("peername")
            logger.log(cast(Any, _LoggedRequest(*request,
                                                str(peer[0]) if isinstance(peer, tuple) else None,
                                                self.secure, agent, note)),
                       cast(Any, _LoggedResponse(status, size)), time.perf_counter() - started)
        elif mark is not None and levels is not None:
            levels.answered(mark, status)


class HotWebService:
    """The web service's two POSTs answered in the front: what `observed` and
    `WebService._handle` (listeners/http/app.py, webservice.py) do for aiohttp, with
    `WebService.reply` making the answer, for a request whose whole body came with it."""

    def __init__(self, listener: str, parts: ReadParts, webservice: WebService,
                 hot: HotDownloads) -> None:
        self.webservice = webservice
        self.max_body = min(parts.config.web.ws_max_body_bytes,
                            parts.config.web.client_max_size_kb * 1024)
        self.paths = {operation: path for _m, path, operation, _h in webservice.routes()}
        self.operations = {path.encode(): operation for operation, path in self.paths.items()}
        self.stats = {operation: parts.metrics.http.route(listener, path)
                      for operation, path in self.paths.items()}
        self.hot = hot  # its API keys, Date and Server lines, accounting and access log
        self._heads: dict[int, bytes] = {}  # status -> status line and static headers
        self._content = "".join(f"{k}: {v}\r\n" for k, v in webservice.headers.items())

    def _head(self, status: int) -> bytes:
        head = self._heads.get(status)
        if head is None:
            head = self._heads[status] = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
                                          + self._content).encode()
        return head

    def answer(self, operation: str, body: bytes, key: str | None, close: bool, arrived: float,
               transport: asyncio.BaseTransport, agent: str | None) -> bytes:
        """The whole response, counted and logged. A store error raises before anything is
        counted (aiohttp's path then answers, with its 503)."""
        started = time.perf_counter()
        hot = self.hot
        user = hot.user_for_key(key) if key else None
        name = user.name if user else ANONYMOUS
        note = (Note("ws", operation, name, None, user, arrived)
                if hot.access_logger is not None else None)  # the reply puts its audit ref there
        status, xml = self.webservice.reply(operation, body, key, user, note)
        out = b"".join((self._head(status), b"Content-Length: ", str(len(xml)).encode(),
                        b"\r\n", hot.date(), hot.server,
                        b"Connection: close\r\n\r\n" if close else b"\r\n", xml))
        hot.account(self.stats[operation], "ws", operation, name, arrived, started, note, status,
                    len(out), ("POST", self.paths[operation]),
                    transport, agent)
        return out


class Front:
    """One read listener's front: `front()` is its protocol factory (in place of the
    `web.Server`'s)."""

    def __init__(self, server: web.Server, hot: HotDownloads, ws: HotWebService | None, *,
                 idle_timeout: float, max_head_bytes: int, max_headers: int) -> None:
        self.server = server
        self.hot = hot
        self.ws = ws  # None: the web service is aiohttp's
        self.idle_timeout = idle_timeout
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self.handed_over = 0  # connections given to aiohttp (tests read it)

    def __call__(self) -> asyncio.Protocol:
        return FrontProtocol(self)


class FrontProtocol(asyncio.Protocol):
    """One connection while the front has it (see the module's docstring)."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.transport: asyncio.Transport | None = None
        self.socket: Any = None  # the transport's, for the request's arrival time
        self.parser = httptools.HttpRequestParser(self)
        self.pending = b""  # received, not answered yet (an incomplete head)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False
        self.write_paused = False
        self.read_paused = False
        self.closing = False
        self.last = 0.0  # loop time of the connection's start or its last answer
        self.timer: asyncio.TimerHandle | None = None
        self.body_timer: asyncio.TimerHandle | None = None  # see _body_late
        self._task_handler = None  # what web.Server.connection_lost looks at

    # -- httptools callbacks ------------------------------------------------------------
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_message_complete(self) -> None:
        self.complete = True

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp = cast(asyncio.Transport, transport)
        self.transport = tcp
        self.socket = own_socket(tcp)
        tcp_keepalive(tcp)  # as aiohttp's RequestHandler does
        # one of the listener's connections: counted by its caps, closed by its cleanup
        cast(Any, self.front.server).connection_made(self, tcp)
        loop = asyncio.get_running_loop()
        self.last = loop.time()
        self.timer = loop.call_at(self.last + self.front.idle_timeout, self._idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        self._drop_socket()
        if self.transport is not None:
            self.transport = None
            self.front.server.connection_lost(cast(Any, self))

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.transport is not None and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        transport = self.transport
        if transport is None:
            return
        if self.read_paused:
            self.read_paused = False
            transport.resume_reading()
        if self.pending:  # pipelined requests held back meanwhile
            pending, self.pending = self.pending, b""
            self.data_received(pending)

    def eof_received(self) -> bool | None:
        return None  # close (a half-closed client gets no more answers, as with aiohttp)

    # -- what web.Server asks of its connections -----------------------------------------
    def close(self) -> None:
        """The listener is closing: close once what was answered is written."""
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        self.close()

    # -- the work -------------------------------------------------------------------------
    def _idle(self) -> None:
        self.timer = None
        transport = self.transport
        if transport is None:
            return
        loop = asyncio.get_running_loop()
        close_at = self.last + self.front.idle_timeout
        if loop.time() < close_at or self.write_paused:  # answered since, or still writing
            self.timer = loop.call_at(max(close_at, loop.time() + 1.0) if self.write_paused
                                      else close_at, self._idle)
            return
        transport.close()

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or self.closing:
            return
        if self.pending:
            data = self.pending + data
            self.pending = b""
        front = self.front
        ws = front.ws
        # first the requests this read holds whole and the front may answer (parsed only)
        found: list[tuple[int, int, _Get | None, _Post | None]] = []  # start, end, request
        pos = 0
        close = False
        awaiting_body = False
        while not (close or self.write_paused):
            end = data.find(b"\r\n\r\n", pos)
            if end < 0:
                break
            end += 4
            if end - pos > front.max_head_bytes:
                break
            if data.startswith(_GET, pos) or data.startswith(_HEAD, pos):
                request = self._parse(data[pos:end])
                if request is None:
                    break
                close = request[3]
                found.append((pos, end, request, None))
                pos = end
            elif ws is not None and data.startswith(_POST, pos):
                posted = self._parse_post(data[pos:end], ws)
                if posted is None:
                    break
                if len(data) - end < posted[2]:  # the body is still on its way
                    awaiting_body = True
                    break
                close = posted[3]
                found.append((pos, end, None, posted))
                pos = end + posted[2]
            else:
                break
        if found and pos < len(data) and not awaiting_body and _refused_so_far(data[pos:]):
            # aiohttp parses a whole read before answering, and a read that ends in bytes its
            # parser refuses gets a 400 alone: so this one is aiohttp's, all of it
            self._hand_over(data)
            return
        # then the answers, in order, until one is aiohttp's to give
        out: list[bytes] = []
        arrived = time.perf_counter() - socket_waited(self.socket) if found else 0.0
        for start, end, get, post in found:
            response: bytes | None
            try:
                if get is not None:  # a download
                    serial, key, head_only, close, agent = get
                    response = front.hot.answer(serial, key, head_only, close, arrived,
                                                transport, agent)
                else:
                    assert ws is not None and post is not None
                    operation, key, length, close, agent = post
                    response = ws.answer(operation, data[end:end + length], key, close,
                                         arrived, transport, agent)
            except Exception:  # the replica unreadable, say: aiohttp's path says what it
                response = None  # says (its 503)
            if response is None:  # this one and what follows are aiohttp's
                pos = start
                close = awaiting_body = False
                break
            out.append(response)
        if out and self.body_timer is not None:  # the body it waited for came
            self.body_timer.cancel()
            self.body_timer = None
        if out:
            transport.write(out[0] if len(out) == 1 else b"".join(out))
            self.last = asyncio.get_running_loop().time()
            if close:
                self.closing = True
                transport.close()
                return
        rest = data[pos:] if pos else data
        if not rest:
            return
        if self.write_paused and out:  # the rest when the client reads again
            self.pending = rest
            return
        if awaiting_body:  # a web service request whose body comes in a later read: waited
            self.pending = rest  # for _BODY_WAIT from the read that brought its head, however
            if self.body_timer is None:  # the rest dribbles in
                self.body_timer = asyncio.get_running_loop().call_later(_BODY_WAIT,
                                                                        self._body_late)
        elif (b"\r\n\r\n" in rest or len(rest) > front.max_head_bytes
                or rest.count(b"\n") != rest.count(b"\r\n")  # a bare LF: llhttp may end there
                or rest.count(b"\r") != rest.count(b"\r\n")  # a bare CR: llhttp's 400 at once
                or not (_GET.startswith(rest[:len(_GET)]) or _HEAD.startswith(rest[:len(_HEAD)])
                        or (ws is not None and _POST.startswith(rest[:len(_POST)])))):
            self._hand_over(rest)  # not hot, or cannot become hot
        elif _refused_so_far(rest):
            self._hand_over(rest)  # llhttp refuses it already: aiohttp's 400 now, not later
        else:
            self.pending = rest  # the start of what may be a hot request

    def _body_late(self) -> None:
        """A web service body not all here _BODY_WAIT s after its head: aiohttp's."""
        self.body_timer = None
        if self.transport is not None and self.pending and not self.closing:
            pending, self.pending = self.pending, b""
            self._hand_over(pending)

    def _head(self, head: bytes) -> list[tuple[bytes, bytes]] | None:
        """The headers of a whole HTTP/1.1 request head, as llhttp parses it (the URL in
        self.url); None when the head is aiohttp's to answer."""
        if head.count(b"\n") != head.count(b"\r\n"):  # a bare LF: where the head ends is
            return None                                  # llhttp's to say, so aiohttp's
        self.url = b""
        self.headers = []
        self.complete = False
        parser = self.parser
        try:
            parser.feed_data(head)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            return None  # aiohttp's: its 400, or an upgrade it refuses
        if not self.complete:  # a body is announced: the next head must not be read as it
            self.parser = httptools.HttpRequestParser(self)
        if parser.get_http_version() != "1.1" or len(self.headers) > self.front.max_headers:
            return None
        return self.headers

    def _parse(self, head: bytes) -> _Get | None:
        """(serial, API key, HEAD, Connection: close, User-Agent) of a hot request head;
        None when it is aiohttp's."""
        headers = self._head(head)
        if headers is None or not self.complete:
            return None
        read = _hot_headers(headers, None)
        if read is None:
            return None
        key, agent, close, _length = read
        target = _target(self.url, key)
        if target is None or not target[0].startswith(b"/certificates/"):
            return None
        path, key = target
        serial = path[len(b"/certificates/"):]
        if not serial.isalnum():  # ASCII letters and digits: nothing to decode or normalise
            return None
        head_only = self.parser.get_method() == b"HEAD"  # complete: the same parser
        return serial.decode(), key, head_only, close, agent

    def _parse_post(self, head: bytes, ws: HotWebService) -> _Post | None:
        """(operation, API key, Content-Length, Connection: close, User-Agent) of a web
        service POST whose body the front may read (a Content-Length of at most `ws.max_body`,
        no Expect or Transfer-Encoding); None when it is aiohttp's."""
        parser = self.parser
        headers = self._head(head)
        if headers is None or parser.get_method() != b"POST":
            return None
        read = _hot_headers(headers, ws.max_body)
        if read is None:
            return None
        key, agent, close, length = read
        target = _target(self.url, key)
        operation = ws.operations.get(target[0]) if target is not None else None
        if operation is None or target is None:
            return None
        return operation, target[1], length, close, agent

    def _cancel_timers(self) -> None:
        for timer in (self.timer, self.body_timer):
            if timer is not None:
                timer.cancel()
        self.timer = self.body_timer = None

    def _drop_socket(self) -> None:
        sock, self.socket = self.socket, None
        drop_socket(sock)

    def _hand_over(self, rest: bytes) -> None:
        """aiohttp's from now on: a RequestHandler of the listener takes the transport and
        the bytes not answered."""
        transport = self.transport
        assert transport is not None
        self._drop_socket()
        self._cancel_timers()
        front = self.front
        front.handed_over += 1
        self.transport = None
        front.server.connection_lost(cast(Any, self))
        handler = front.server()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        _keep_deadline(handler, self.last + front.idle_timeout)
        if self.write_paused:
            handler.pause_writing()
        if self.read_paused:
            self.read_paused = False
            transport.resume_reading()
        handler.data_received(rest)


def _target(url: bytes, header_key: str | None) -> tuple[bytes, str | None] | None:
    """(path, API key) of a hot request's target: no query, or `?apikey=KEY` alone, whose key
    comes before the header's (as `request_key` reads them); None when aiohttp's."""
    query_at = url.find(b"?")
    if query_at < 0:
        return url, header_key
    given = _KEY_QUERY.fullmatch(url, query_at + 1)
    return None if given is None else (url[:query_at], given[1].decode())


def _hot_headers(headers: list[tuple[bytes, bytes]], max_body: int | None
                 ) -> tuple[str | None, str | None, bool, int] | None:
    """(X-API-Key, User-Agent, Connection: close, Content-Length) of a hot request's headers;
    None when they make it aiohttp's. `max_body` None: a GET or HEAD (no Content-Length, and a
    PEM Accept is aiohttp's); else a POST, whose Content-Length must be given and at most that."""
    key: str | None = None
    agent: str | None = None
    close = False
    length = -1
    names = set()
    for raw_name, value in headers:
        name = raw_name.lower()
        if name in names:
            return None
        names.add(name)
        if name == b"content-length" and max_body is not None:
            if not value.isdigit() or int(value) > max_body:
                return None
            length = int(value)
        elif name in _NOT_HOT:
            return None
        elif name == b"accept":
            if max_body is None and _PEM in value:
                return None
        elif name == b"x-api-key":
            if not value.isascii():
                return None
            key = value.decode()
        elif name == b"connection":
            token = value.lower()
            if token == b"close":
                close = True
            elif token != b"keep-alive":
                return None
        elif name == b"user-agent":
            agent = value.decode("utf-8", "surrogateescape")
    if max_body is not None and length < 0:
        return None
    return key, agent, close, length


class _Ignore:
    """Callbacks for a parser that only checks bytes."""


def _refused_so_far(partial: bytes) -> bool:
    """Whether llhttp (aiohttp's parser too) already refuses the start of a head: aiohttp
    answers such bytes 400 at once, so the front must not wait for the rest. Only for a head
    split across reads (rare): a parser of its own."""
    try:
        httptools.HttpRequestParser(_Ignore()).feed_data(partial)
    except httptools.HttpParserError:
        return True
    except httptools.HttpParserUpgrade:
        return False
    return False


def _keep_deadline(handler: Any, close_at: float) -> None:
    """aiohttp arms its keepalive_timeout anew when it gets the connection: the idle/slowloris
    deadline the front had started stays the one that counts (aiohttp 3.14's attributes;
    with another version aiohttp's own, later, deadline holds)."""
    handle = getattr(handler, "_keepalive_handle", None)
    process: Callable[[], None] | None = getattr(handler, "_process_keepalive", None)
    if handle is None or process is None or not hasattr(handler, "_next_keepalive_close_time"):
        return
    handle.cancel()
    handler._next_keepalive_close_time = close_at
    handler._keepalive_handle = asyncio.get_running_loop().call_at(close_at, process)


def build_front(listener: str, parts: ReadParts, server: web.Server,
                access_logger: AbstractAccessLogger | None, webservice: WebService) -> Front:
    """The front of read listener `listener`, handing what is not hot to `server` (the
    AppRunner's); `access_logger`: the runner's access logger when the access log is on;
    `webservice`: the listener's web service (its audit references are shared)."""
    web_cfg = parts.config.web
    hot = HotDownloads(listener, parts, access_logger)
    return Front(server, hot, HotWebService(listener, parts, webservice, hot),
                 idle_timeout=web_cfg.idle_timeout_seconds,
                 max_head_bytes=web_cfg.max_header_bytes, max_headers=web_cfg.max_headers)
