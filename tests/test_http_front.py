"""The HTTP fast front (listeners/http/front.py) against plain aiohttp (web.fast_front = false),
over real sockets: two nodes on one database, one with the front and one without, must send
the same bytes (but the Date) for every request; pipelining and the handover to aiohttp in
the middle of a connection; CPM 8 and the route metrics; clients that give up, dribble or send
garbage; the https listener; and the listener closing its connections."""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repository_server.listeners.http.front import FrontProtocol
from repository_server.store.embedded import EmbeddedPostgres
from tests.conftest import (
    TEST_KEY,
    Running,
    add_user,
    create_database,
    lodge_pki,
    start_repository,
)
from tests.test_webservice import search_body

ROUTE = "/certificates/{serial}"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pair(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Any],
               embedded: EmbeddedPostgres) -> AsyncIterator[tuple[Running, Running]]:
    """(front, plain): the test PKI lodged once, served by a node with the fast front and a
    node without it, on the same database."""
    dsn = await create_database(embedded)
    base = tmp_path_factory.mktemp("front")
    front = await start_repository(base / "front", pki, dsn)
    plain = None
    try:
        await add_user(front, "tester", TEST_KEY)
        await asyncio.to_thread(lodge_pki, Running(front, pki))
        plain = await start_repository(base / "plain", pki, dsn, web={"fast_front": False})
        assert plain.catalog is not None and front.catalog is not None
        await plain.catalog.sync_to()
        yield Running(front, pki), Running(plain, pki)
    finally:
        if plain is not None:
            await plain.stop()
        await front.stop()


def _serial(running: Running, kind: str) -> str:
    return next(o["serial"] for o in running.pki["objects"] if o["kind"] == kind)


def _port(running: Running, listener: str = "http") -> int:
    return running.repo.bound[listener].port


async def _connect(port: int, tls: ssl.SSLContext | None = None
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1" if tls is None else "localhost", port,
                                         ssl=tls)


async def _response(reader: asyncio.StreamReader, head_only: bool = False) -> bytes:
    """One whole response (head and, by its Content-Length, body) as read; b"" at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        return exc.partial
    found = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
    status = int(head.split(b" ", 2)[1])
    if found and not head_only and status not in (204, 304):
        return head + await reader.readexactly(int(found[1]))
    return head


def _same(data: bytes) -> bytes:
    """A response without what differs between any two: the Date, and the web service's
    audit reference (a per-process prefix and a counter, the same length in both)."""
    data = re.sub(rb"\r\nDate: [^\r]*", b"\r\nDate: -", data)
    return re.sub(rb"<AuditReference>[^<]*</AuditReference>", b"<AuditReference>-</AuditReference>",
                  data)


async def _exchange(port: int, requests: list[bytes], *, at_once: bool = True,
                    tls: ssl.SSLContext | None = None, timeout: float = 5.0) -> list[bytes]:
    """Send `requests` on one connection (in one write when `at_once`) and read one response
    to each, in order."""
    reader, writer = await _connect(port, tls)
    out = []
    try:
        if at_once:
            writer.write(b"".join(requests))
        for request in requests:
            if not at_once:
                writer.write(request)
            out.append(await asyncio.wait_for(
                _response(reader, request.startswith(b"HEAD ")), timeout))
    finally:
        writer.close()
    return out


async def _answers(port: int, request: bytes, wait: float = 0.3) -> bytes:
    """Everything the server sends after `request` until it closes or is quiet for `wait` s."""
    reader, writer = await _connect(port)
    writer.write(request)
    got = b""
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), wait)
            if not chunk:
                break
            got += chunk
    except (TimeoutError, ConnectionError):
        pass
    finally:
        writer.transport.abort()
    return got


def _get(target: str, *headers: str, method: str = "GET", version: str = "1.1") -> bytes:
    lines = [f"{method} {target} HTTP/{version}", "Host: localhost", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


SEARCH = "/services/certificatesearch"
RETRIEVE = "/services/retrievecertificate"


def _post(target: str, body: str | bytes, *headers: str, version: str = "1.1",
          length: int | None = None) -> bytes:
    """A web service POST (Content-Length from the body unless `length`)."""
    data = body.encode() if isinstance(body, str) else body
    size = [] if length == -1 else [f"Content-Length: {len(data) if length is None else length}"]
    lines = [f"POST {target} HTTP/{version}", "Host: localhost",
             "Content-Type: application/xml", *size, *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def _retrieve(serial: str) -> str:
    return (f"<CertificateDataRequest><CertificateSerial>{serial}</CertificateSerial>"
            "</CertificateDataRequest>")


def _ws_corpus(running: Running) -> list[bytes]:
    """Web service requests: the front's (a whole body with a Content-Length) and aiohttp's."""
    dev = next(o for o in running.pki["objects"] if o["kind"] == "device")
    org = next(o for o in running.pki["objects"] if o["kind"] == "organisation")
    ca = _serial(running, "ca")
    key = f"?apikey={TEST_KEY}"
    return [
        _post(SEARCH + key, search_body(dev["eui64"])),  # 200
        _post(SEARCH + key, search_body(dev["eui64"].lower().replace("-", ""))),
        _post(SEARCH + key, search_body(org["eui64"], device=False)),
        _post(SEARCH + key, search_body("00-11-22-33-44-55-66-77")),  # 402
        _post(SEARCH + key, search_body("00-11-22")),  # 401: not an EUI-64
        _post(SEARCH + key, "<CertificateSearchRequest><Nope/></CertificateSearchRequest>"),
        _post(SEARCH + key, '<!DOCTYPE x [<!ENTITY a "b">]><CertificateSearchRequest/>'),
        _post(SEARCH + key, ""),
        _post(SEARCH, search_body(dev["eui64"]), f"X-API-Key: {TEST_KEY}"),
        _post(SEARCH, search_body(dev["eui64"])),  # 403: no key
        _post(SEARCH + "?apikey=wrong-key", search_body(dev["eui64"])),
        _post(SEARCH + f"?apikey={TEST_KEY}&x=1", search_body(dev["eui64"])),
        _post(SEARCH + key, search_body(dev["eui64"]), "Connection: close"),
        _post(SEARCH + key, search_body(dev["eui64"]), version="1.0"),
        _post(SEARCH + key, search_body(dev["eui64"]), "Expect: 100-continue"),
        _post(SEARCH + key, search_body(dev["eui64"]), "Transfer-Encoding: chunked", length=-1),
        _post(SEARCH + key, "x" * 9000),  # over web.ws_max_body_bytes: 401
        _post(SEARCH + key + "/", search_body(dev["eui64"])),
        _post(RETRIEVE + key, _retrieve(dev["serial"])),
        _post(RETRIEVE + key, _retrieve(org["serial"])),
        _post(RETRIEVE + key, _retrieve(ca)),  # 402: a CA certificate
        _post(RETRIEVE + key, _retrieve("00112233445566778899AABBCCDDEEFF")),
        _post(RETRIEVE + key, _retrieve("xyz")),
        _post(RETRIEVE, _retrieve(dev["serial"])),
        _get(SEARCH + key),  # 405
        _get(RETRIEVE + key, method="HEAD"),
        _post("/services/nothing" + key, search_body(dev["eui64"])),
    ]


def _corpus(running: Running) -> list[bytes]:
    device = _serial(running, "device")
    org = _serial(running, "organisation")
    ca = _serial(running, "ca")
    key = f"?apikey={TEST_KEY}"
    return [
        _get(f"/certificates/{device}{key}"),  # hot, private, key in the query
        _get(f"/certificates/{device}", f"X-API-Key: {TEST_KEY}"),  # key in a header
        _get(f"/certificates/{org}{key}"),
        _get(f"/certificates/{ca}"),  # public, no key
        _get(f"/certificates/{ca}{key}"),
        _get(f"/certificates/{device}"),  # private without a key: 403 (aiohttp's)
        _get(f"/certificates/{device}?apikey=wrong-key"),
        _get(f"/certificates/{device}", "X-API-Key: wrong-key"),
        _get(f"/certificates/{device}?apikey="),
        _get(f"/certificates/{device}?apikey={TEST_KEY}&issuer=00"),
        _get(f"/certificates/{device}?apikey=a%20b"),
        _get("/certificates/00112233445566778899AABBCCDDEEFF"),  # unknown
        _get(f"/certificates/{device.lower()}{key}"),  # not canonical
        _get(f"/certificates/{device}.pem{key}"),
        _get(f"/certificates/{device}{key}", "Accept: application/x-pem-file"),
        _get(f"/certificates/{device}{key}", "Accept: application/pkix-cert, */*"),
        _get(f"/certificates/{ca}", 'If-None-Match: "x"'),
        _get(f"/certificates/{ca}", "If-Modified-Since: Sat, 05 Dec 2026 05:00:00 GMT"),
        _get(f"/certificates/{ca}", method="HEAD"),
        _get(f"/certificates/{device}{key}", method="HEAD"),
        _get(f"/certificates/{ca}", "Connection: close"),
        _get(f"/certificates/{ca}", "Connection: keep-alive"),
        _get(f"/certificates/{ca}", "Connection: upgrade", "Upgrade: websocket"),
        _get(f"/certificates/{ca}", version="1.0"),
        _get(f"/certificates/{ca}", "Connection: keep-alive", version="1.0"),
        _get(f"/certificates/{ca}", "User-Agent: a", "User-Agent: b"),
        _get(f"/certificates/{ca}", "Expect: 100-continue"),
        _get(f"/certificates/{ca}", "Content-Length: 0"),
        _get(f"/certificates/{ca}", method="POST"),
        _get(f"/certificates/{ca}", method="DELETE"),
        _get("/certificates/search.cgi?iHash=AAAA"),
        _get("/certificates/"),
        _get("/crls"),
        _get("/documents"),
        _get("/healthz"),
        _get("/openapi.json"),
        _get("/nowhere"),
        _get(f"http://localhost/certificates/{ca}"),
        _get(f"/certificates/{ca}#frag"),
        _get(f"/certificates//{ca}"),
        b"GET /certificates/" + ca.encode() + b" HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        *_ws_corpus(running),
    ]


async def test_the_front_sends_what_aiohttp_sends(pair: tuple[Running, Running]) -> None:
    front, plain = pair
    for request in _corpus(front):
        got = await _exchange(_port(front), [request])
        want = await _exchange(_port(plain), [request])
        assert [_same(r) for r in got] == [_same(r) for r in want], request
    hot = await _exchange(_port(front), [_get(f"/certificates/{_serial(front, 'ca')}")])
    assert hot[0].startswith(b"HTTP/1.1 200 OK\r\n")


def _curl(url: str, *args: str) -> bytes:
    return subprocess.run(["curl", "-sS", "-i", "--max-time", "5", *args, url],
                          capture_output=True, check=True).stdout


async def test_curl_sees_the_same(pair: tuple[Running, Running]) -> None:
    front, plain = pair
    device = _serial(front, "device")
    for path, args in [(f"/certificates/{device}?apikey={TEST_KEY}", ()),
                       (f"/certificates/{device}", ("-H", f"X-API-Key: {TEST_KEY}")),
                       (f"/certificates/{device}", ("-I", "-H", f"X-API-Key: {TEST_KEY}")),
                       (f"/certificates/{device}", ()),
                       ("/certificates/search.cgi?iHash=AAAA", ())]:
        got, want = await asyncio.gather(
            asyncio.to_thread(_curl, f"{front.http}{path}", *args),
            asyncio.to_thread(_curl, f"{plain.http}{path}", *args))
        assert _same(got) == _same(want), path


def _front_of(running: Running) -> Any:
    return running.repo.fronts["http"]


async def test_pipelined_hot_cold_hot_in_order_and_handover(pair: tuple[Running, Running]) -> None:
    front, plain = pair
    ca = _serial(front, "ca")
    device = _serial(front, "device")
    requests = [_get(f"/certificates/{ca}"), _get("/healthz"),
                _get(f"/certificates/{device}?apikey={TEST_KEY}")]
    handed = _front_of(front).handed_over
    got = await _exchange(_port(front), requests)
    want = await _exchange(_port(plain), requests)
    assert [_same(r) for r in got] == [_same(r) for r in want]
    assert b'"status": "ok"' in got[1] and got[2].startswith(b"HTTP/1.1 200 OK")
    assert _front_of(front).handed_over == handed + 1
    # one at a time on one connection: hot (front), cold (handed over), hot (aiohttp's now)
    got = await _exchange(_port(front), requests, at_once=False)
    assert [_same(r) for r in got] == [_same(r) for r in want]
    # many hot requests in one write, a cold one last: all in order
    many = [_get(f"/certificates/{ca}")] * 200 + [_get("/crls")]
    got = await _exchange(_port(front), many)
    want = await _exchange(_port(plain), many)
    assert [_same(r) for r in got] == [_same(r) for r in want]


async def test_a_request_split_across_reads(pair: tuple[Running, Running]) -> None:
    front, plain = pair
    request = _get(f"/certificates/{_serial(front, 'device')}?apikey={TEST_KEY}")
    for cut in (1, 5, 18, 30, len(request) - 3, len(request) - 1):
        reader, writer = await _connect(_port(front))
        writer.write(request[:cut])
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(request[cut:])
        got = await asyncio.wait_for(_response(reader), 5)
        writer.close()
        want = await _exchange(_port(plain), [request])
        assert _same(got) == _same(want[0]), cut


async def test_web_service_in_the_front(pair: tuple[Running, Running]) -> None:
    """The web service's POSTs: pipelined with downloads, a body that comes after its head
    (answered by the front when it comes soon, by aiohttp after the front's 1 s wait, also
    when it dribbles in), and
    counted for CPM 8 and the route metrics as aiohttp counts them."""
    front, plain = pair
    dev = next(o for o in front.pki["objects"] if o["kind"] == "device")
    key = f"?apikey={TEST_KEY}"
    search = _post(SEARCH + key, search_body(dev["eui64"]))
    retrieve = _post(RETRIEVE + key, _retrieve(dev["serial"]))
    requests = [search, retrieve, _get(f"/certificates/{dev['serial']}{key}"), retrieve,
                _post(SEARCH, search_body(dev["eui64"]))]
    handed = _front_of(front).handed_over
    got = await _exchange(_port(front), requests)
    want = await _exchange(_port(plain), requests)
    assert [_same(r) for r in got] == [_same(r) for r in want]
    assert [r.split(b" ", 2)[1] for r in got] == [b"200", b"200", b"200", b"200", b"403"]
    assert _front_of(front).handed_over == handed  # all answered in the front
    refs = {m for r in got for m in re.findall(rb"<AuditReference>([^<]+)<", r)}
    assert len(refs) == 4  # a fresh audit reference each
    # the body in a later write: soon (the front answers) and after 1.3 s (aiohttp's)
    cut = search.index(b"\r\n\r\n") + 4
    for pause, taken in ((0.05, 0), (1.3, 1)):
        reader, writer = await _connect(_port(front))
        writer.write(search[:cut])
        await writer.drain()
        await asyncio.sleep(pause)
        writer.write(search[cut:] + retrieve)
        answers = [await asyncio.wait_for(_response(reader), 5) for _ in range(2)]
        writer.close()
        assert [_same(a) for a in answers] == [_same(w) for w in want[:2]], pause
        assert _front_of(front).handed_over == handed + taken, pause
    # a body dribbled in, a byte every 0.1 s for 1.5 s: the front's 1 s runs from the head's
    # read, not from the last byte, so aiohttp answers it
    reader, writer = await _connect(_port(front))
    writer.write(search[:-15])
    for byte in search[-15:]:
        await asyncio.sleep(0.1)
        writer.write(bytes([byte]))
    answer = await asyncio.wait_for(_response(reader), 5)
    writer.close()
    assert _same(answer) == _same(want[0])
    assert _front_of(front).handed_over == handed + 2

    def ws_counts(running: Running) -> tuple[dict[tuple[str, str], int], int, int, int]:
        levels = running.repo.levels
        assert levels is not None
        users: dict[tuple[str, str], int] = {}
        refused = 0
        for (_m, interface, operation, user), counts in levels.counts.items():
            if interface == "ws":
                users[operation, user] = users.get((operation, user), 0) + counts.answered
                refused += counts.refused
        metrics = running.repo.metrics.http
        return (users, refused, metrics.route("http", SEARCH).statuses.get(200, 0),
                metrics.route("http", RETRIEVE).statuses.get(200, 0))

    deltas = []
    for running in (front, plain):
        before = ws_counts(running)
        await _exchange(_port(running), requests)
        after = ws_counts(running)
        deltas.append(({k: n - before[0].get(k, 0) for k, n in after[0].items()
                        if n != before[0].get(k, 0)},
                       *(a - b for a, b in zip(after[1:], before[1:], strict=True))))
    assert deltas[0] == deltas[1]
    assert deltas[0][0] == {("search", "tester"): 1, ("retrieve", "tester"): 2}, deltas
    assert deltas[0][1:] == (1, 1, 2), deltas  # the 403 refused; 200s by route


def _counted(running: Running) -> tuple[int, int, int, int]:
    """(CPM 8 received, answered, refused for download/certificate; 200s of the route's
    metrics)."""
    levels = running.repo.levels
    assert levels is not None
    received = answered = refused = 0
    for (_month, interface, operation, _user), counts in levels.counts.items():
        if (interface, operation) == ("download", "certificate"):
            received += counts.received
            answered += counts.answered
            refused += counts.refused
    stats = running.repo.metrics.http.route("http", ROUTE)
    return received, answered, refused, stats.statuses.get(200, 0)


async def test_cpm_and_metrics_count_the_front_as_aiohttp(pair: tuple[Running, Running]) -> None:
    front, plain = pair
    device = _serial(front, "device")
    ca = _serial(front, "ca")
    requests = [_get(f"/certificates/{device}?apikey={TEST_KEY}"),
                _get(f"/certificates/{ca}", method="HEAD"), _get(f"/certificates/{ca}"),
                _get(f"/certificates/{device}")]  # refused (403): the full handler's
    def by_user(running: Running) -> dict[str, int]:
        out: dict[str, int] = {}
        assert running.repo.levels is not None
        for (_m, interface, operation, user), counts in running.repo.levels.counts.items():
            if (interface, operation) == ("download", "certificate"):
                out[user] = out.get(user, 0) + counts.answered
        return out

    users = []
    for running in (front, plain):
        before, users_before = _counted(running), by_user(running)
        await _exchange(_port(running), requests)
        await _exchange(_port(running), requests, at_once=False)
        after, users_after = _counted(running), by_user(running)
        # 6 answered (the 403s are counted as refused, out of `received`), 6 in the metrics
        assert tuple(a - b for a, b in zip(after, before, strict=True)) == (6, 6, 2, 6), running
        # by user: the key's user, anonymous without one, as aiohttp counts them
        users.append({u: n - users_before.get(u, 0) for u, n in users_after.items()})
    assert users[0] == users[1] and users[0]["tester"] == 2


async def test_clients_that_give_up_or_send_garbage(
        pair: tuple[Running, Running], caplog: pytest.LogCaptureFixture) -> None:
    front, plain = pair
    port = _port(front)
    ca = _serial(front, "ca")
    caplog.set_level(logging.WARNING)
    # closes in the middle of a request head, and right after sending a whole one
    for data in (b"GET /certif", _get(f"/certificates/{ca}")[:-2], _get(f"/certificates/{ca}"),
                 _get(f"/certificates/{ca}") * 50):
        _reader, writer = await _connect(port)
        writer.write(data)
        await writer.drain()
        writer.transport.abort()
    # garbage: what aiohttp does (its 400, or closed, or waiting for more); never a crash
    for data in (b"\x00\xff" * 100, b"GET / HTTP/9.9\r\n\r\n", b"\r\n\r\n\r\n",
                 b"GET /certificates/" + b"A" * 20000 + b" HTTP/1.1\r\n\r\n",
                 b"GET /certificates/" + ca.encode() + b" HTTP/1.1\r\nHost: x\n\n",
                 b"GET /certificates/" + ca.encode() + b" HTTP/1.1\r\nHost: x\n\r\n",
                 b"HEAD /certificates/\x00 HTTP/1.1\r\n\r\n",
                 # hot requests and bytes aiohttp's parser refuses in one read: aiohttp
                 # answers such a read with its 400 alone, and so does the front
                 _get(f"/certificates/{ca}") * 3 + b"\x00\xff\r\n\r\n",
                 _post(f"{SEARCH}?apikey={TEST_KEY}", "<x/>") + b">",
                 _get(f"/certificates/{ca}") + b"GET /healthz HTTP/1.1\r\nBad Header: y\r\n\r\n"):
        got, want = await asyncio.gather(_answers(port, data), _answers(_port(plain), data))
        assert _same(got) == _same(want), data[:60]
    await asyncio.sleep(0.1)
    got = await _exchange(port, [_get(f"/certificates/{ca}")])
    assert got[0].startswith(b"HTTP/1.1 200 OK")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_https_listener_with_the_front(pair: tuple[Running, Running]) -> None:
    front, plain = pair
    tls = ssl.create_default_context(cafile=front.tls_ca)
    device = _serial(front, "device")
    requests = [_get(f"/certificates/{device}?apikey={TEST_KEY}"),
                _get(f"/certificates/{device}", f"X-API-Key: {TEST_KEY}", method="HEAD"),
                _get("/healthz"), _get(f"/certificates/{device}?apikey={TEST_KEY}"),
                _post(f"{RETRIEVE}?apikey={TEST_KEY}", _retrieve(device))]
    got = await _exchange(_port(front, "https"), requests, tls=tls)
    want = await _exchange(_port(plain, "https"), requests, tls=tls)
    assert [_same(r) for r in got] == [_same(r) for r in want]
    assert got[0].startswith(b"HTTP/1.1 200 OK") and got[1].startswith(b"HTTP/1.1 200 OK")
    assert got[4].startswith(b"HTTP/1.1 200 OK") and b"<CertificateBody>" in got[4]
    https = front.repo.metrics.http.route("https", ROUTE).statuses.get(200, 0)
    assert https >= 3
    assert front.repo.metrics.http.route("https", RETRIEVE).statuses.get(200, 0) >= 1


async def test_back_pressure_many_answers_unread(pair: tuple[Running, Running]) -> None:
    """A client that pipelines thousands of requests and reads nothing for a while gets every
    answer, in order (the front stops reading while the transport's buffer is full)."""
    front, _plain = pair
    ca = _serial(front, "ca")
    one = _get(f"/certificates/{ca}")
    reader, writer = await _connect(_port(front))
    n = 3000
    writer.write(one * n)
    await asyncio.sleep(0.5)  # answers pile up in the server's buffers
    for _ in range(n):
        answer = await asyncio.wait_for(_response(reader), 10)
        assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:100]
    writer.close()


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    b = bytearray(data)
    for kind, where, value in edits:
        if not b:
            break
        i = where % len(b)
        if kind == 0:
            b[i] = value
        elif kind == 1:
            del b[i]
        else:
            b.insert(i, value)
    return bytes(b)


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
async def test_fuzz_the_front_as_aiohttp(pair: tuple[Running, Running], data: st.DataObject) -> None:
    """Random and mutated requests: the front answers as aiohttp does (or both wait for more
    of the request), and keeps answering."""
    front, plain = pair
    corpus = _corpus(front)
    base = data.draw(st.sampled_from(corpus) | st.binary(max_size=200))
    edits = data.draw(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10**6),
                                         st.sampled_from(b"\r\n :?/%&=\x00\x7fAa0")
                                         | st.integers(0, 255)), max_size=4))
    request = _mutate(base, edits) + data.draw(st.sampled_from((b"", b"\r\n\r\n")))
    if not request:
        return

    got, want = await asyncio.gather(_answers(_port(front), request),
                                     _answers(_port(plain), request))
    assert _same(got) == _same(want), request


async def test_timeouts_access_log_and_shutdown(
        tmp_path: Path, pki: dict[str, Any], fresh_db: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """A node with a 1 s idle timeout and the access log on: a slowloris dribbling a hot head
    is closed after the timeout (also when its head stops looking hot and aiohttp takes it
    over), an idle connection too, the access log has the hot request's line as aiohttp would
    write it, and the listener closing closes the front's connections."""
    caplog.set_level(logging.INFO, logger="repository_server.server.access")
    repo = await start_repository(tmp_path, pki, fresh_db, web={"idle_timeout_seconds": 1.0},
                                  log={"access_log": True})
    try:
        await add_user(repo, "tester", TEST_KEY)
        running = Running(repo, pki)
        await asyncio.to_thread(lodge_pki, running)
        port = _port(running)
        ca = _serial(running, "ca")
        loop = asyncio.get_running_loop()

        async def dribble(data: bytes, every: float) -> float:
            reader, writer = await _connect(port)
            started = loop.time()
            for byte in data:
                if reader.at_eof() or writer.is_closing():
                    break
                writer.write(bytes([byte]))
                await asyncio.sleep(every)
            got = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            assert got == b"" or got.startswith(b"HTTP/1.1 408"), got[:80]
            return loop.time() - started

        hot_head = _get(f"/certificates/{ca}", "X-Padding: " + "x" * 40)
        assert 0.9 < await dribble(hot_head, 0.15) < 1.6
        # not hot from its 12th byte: aiohttp's from 0.6 s, closed at the front's deadline
        handed = running.repo.fronts["http"].handed_over
        assert 0.9 < await dribble(b"GET /certifZ" + b"x" * 60, 0.05) < 1.6
        assert running.repo.fronts["http"].handed_over == handed + 1
        reader, writer = await _connect(port)  # idle after an answer
        writer.write(_get(f"/certificates/{ca}", "User-Agent: front-test"))
        assert (await _response(reader)).startswith(b"HTTP/1.1 200 OK")
        started = loop.time()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert 0.5 < loop.time() - started < 2.5
        writer.close()
        lines = [r.getMessage() for r in caplog.records
                 if r.name.endswith("access") and f"/certificates/{ca}" in r.getMessage()]
        assert any(re.fullmatch(
            rf'127\.0\.0\.1 "GET /certificates/{ca}" 200 \d+ [\d.]+ms interface=download'
            r" operation=certificate user=\S+ outcome=200 audit=-", line) for line in lines), lines
        dev = next(o for o in pki["objects"] if o["kind"] == "device")
        got = await _exchange(port, [_post(f"{SEARCH}?apikey={TEST_KEY}", search_body(dev["eui64"]))])
        ref = re.search(rb"<AuditReference>([^<]+)<", got[0])
        assert ref is not None and running.repo.fronts["http"].handed_over == handed + 1
        assert any(re.fullmatch(
            rf'127\.0\.0\.1 "POST {SEARCH}" 200 \d+ [\d.]+ms interface=ws operation=search'
            rf" user=tester outcome=200 audit={ref[1].decode()}", r.getMessage())
                   for r in caplog.records if r.name.endswith("access")), caplog.text
        # the listener closing closes a connection the front still has
        reader, writer = await _connect(port)
        writer.write(_get(f"/certificates/{ca}"))
        assert (await _response(reader)).startswith(b"HTTP/1.1 200 OK")
        assert any(isinstance(c, FrontProtocol) for c in repo._runners[0].server.connections)  # type: ignore[union-attr]
    finally:
        await repo.stop()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
