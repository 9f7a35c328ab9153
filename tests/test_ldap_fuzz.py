"""Fuzzing the LDAP listener over real sockets.

A repository holding the whole test PKI runs in this process; hypothesis drives random bytes
and mutated valid PDUs (encoded by ldap3/pyasn1: binds, searches with many filters and the
paged results control, StartTLS, WhoAmI, abandon, compare, the update operations, unbind)
into its `ldap` listener from a client thread, one connection per example. Every
connection must end with well-formed responses (decoded by pyasn1 with ldap3's RFC 4511
spec, independently of our codec) and, when the server gives up, a notice of disconnection
(extendedResponse 1.3.6.1.4.1.1466.20036, message id 0) followed by the close; when the
client half-closes, the server must close within BOUND seconds. Afterwards the server still
answers a normal search, every connection is gone, and nothing was logged at ERROR.

Also: an oversized PDU header is refused at once, a deeply nested filter gets protocolError,
a client that sends half a PDU and stalls is closed at the idle timeout, and memory stays
bounded over many connections.

CI runs 200 examples per fuzz test (well under a minute). To fuzz longer by hand:

    SMKI_FUZZ_EXAMPLES=20000 python -m pytest -q tests/test_ldap_fuzz.py
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ldap3
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ldap3.protocol.rfc4511 import LDAPMessage
from pyasn1.codec.ber import decoder as ber_decoder

from repository_server.listeners.ldap import ber, codec, protocol
from repository_server.store.embedded import EmbeddedPostgres
from tests.conftest import TEST_KEY, Running, create_database, running_repository
from tests.ldaptools import SUFFIX, sample_requests, search, split_frames

EXAMPLES = int(os.environ.get("SMKI_FUZZ_EXAMPLES", "200"))
BOUND = 5.0  # seconds a connection may take to end after the client half-closes
QUIET = 0.1  # a connection the client keeps open: done when the server says nothing for this long
NOTICE = protocol.NOTICE_OF_DISCONNECTION_OID
RESPONSES = {"bindResponse", "searchResEntry", "searchResDone", "searchResRef", "modifyResponse",
             "addResponse", "delResponse", "modDNResponse", "compareResponse", "extendedResp",
             "intermediateResponse"}


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def loaded_module(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Any],
                        embedded: EmbeddedPostgres) -> AsyncIterator[Running]:
    """One repository with the test PKI lodged for the whole module (default settings:
    device and organisation entries need a bound user)."""
    dsn = await create_database(embedded)
    async with running_repository(tmp_path_factory.mktemp("ldap-fuzz"), pki, dsn, lodge=True) as running:
        yield running


def port_of(running: Running) -> int:
    return running.repo.bound["ldap"].port


# ----------------------------------------------------------------------------- valid requests

def valid_requests(pki: dict[str, Any]) -> list[bytes]:
    device = next(o for o in pki["objects"] if o["kind"] == "device")
    return sample_requests(device["eui64"], device["serial"])


# ----------------------------------------------------------------------------- one connection

@dataclass
class Outcome:
    data: bytes
    closed: bool  # the server closed (EOF or reset)
    elapsed: float
    responses: list[tuple[int, str, Any]] = field(default_factory=list)  # (message id, op, op value)


def exchange(port: int, chunks: list[bytes], half_close: bool, bound: float = BOUND,
             quiet: float | None = QUIET, answered: bool = False) -> Outcome:
    """Send the chunks on a new connection, then read until the server closes (or, when the
    client keeps its side open and `quiet` is set, until it has been quiet that long; with
    `answered`, quiet only counts once the first bytes of an answer have come: a request
    that must be answered may take longer than `quiet` on a busy machine)."""
    wait_close = half_close or quiet is None
    t0 = time.monotonic()
    deadline = t0 + bound
    data = bytearray()
    closed = False
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        try:
            for chunk in chunks:
                s.sendall(chunk)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:  # the server may have given up and closed already
            pass
        while (left := deadline - time.monotonic()) > 0:
            waiting = wait_close or quiet is None or (answered and not data)
            s.settimeout(left if waiting else min(quiet, left))
            try:
                got = s.recv(65536)
            except TimeoutError:
                if waiting:
                    continue
                break
            except OSError:  # reset
                closed = True
                break
            if not got:
                closed = True
                break
            data += got
    return Outcome(bytes(data), closed, time.monotonic() - t0)


def check(outcome: Outcome, half_close: bool) -> None:
    """Responses well-formed; a notice of disconnection is last and followed by the close."""
    frames, rest = split_frames(outcome.data)
    assert rest == b"", f"a partial response at the end: {rest[:64]!r}"
    for i, frame in enumerate(frames):
        msg, tail = ber_decoder.decode(frame, asn1Spec=LDAPMessage())
        assert tail == b""
        mid = int(msg["messageID"])
        op = msg["protocolOp"]
        name = op.getName()
        assert name in RESPONSES, name
        outcome.responses.append((mid, name, op[name]))
        if mid == 0 and name == "extendedResp" and str(op[name]["responseName"]) == NOTICE:
            assert i == len(frames) - 1, "responses after a notice of disconnection"
            assert outcome.closed, "notice of disconnection without the close"
    if half_close:
        assert outcome.closed, f"still open {outcome.elapsed:.1f} s after the client's half-close"


def notice(outcome: Outcome) -> int | None:
    """The result code of the notice of disconnection, if the server sent one."""
    for mid, name, op in outcome.responses:
        if mid == 0 and name == "extendedResp" and str(op["responseName"]) == NOTICE:
            return int(op["resultCode"])
    return None


# ----------------------------------------------------------------------------- the server's health

class ErrorRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def errors() -> Any:
    handler = ErrorRecords()
    loggers = [logging.getLogger(n) for n in ("repository_server", "asyncio")]
    for lg in loggers:
        lg.addHandler(handler)
    yield handler
    for lg in loggers:
        lg.removeHandler(handler)


async def healthy(running: Running, errors: ErrorRecords) -> None:
    """A normal bound search still works, every fuzz connection is gone, no ERROR was logged."""
    def normal_search() -> list[Any]:
        server = ldap3.Server(running.ldap, get_info=ldap3.NONE)
        conn = ldap3.Connection(server, f"uid=tester,ou=Users,{SUFFIX}", TEST_KEY, auto_bind=True,
                                receive_timeout=10)
        try:
            assert conn.search(f"ou=Devices,{SUFFIX}", "(smkiKind=device)", ldap3.LEVEL, attributes=["*"])
            return list(conn.entries)
        finally:
            conn.unbind()

    found = await asyncio.to_thread(normal_search)
    assert len(found) == len({o["eui64"] for o in running.pki["objects"] if o["kind"] == "device"})
    service = running.repo.ldap
    assert service is not None
    for _ in range(100):
        if not service.connections:
            break
        await asyncio.sleep(0.05)
    assert not service.connections, f"{len(service.connections)} connections still open"
    assert not errors.records, [r.getMessage() for r in errors.records]


# ----------------------------------------------------------------------------- fuzz

def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if b > a]


def run_fuzz(test: Callable[..., None]) -> Callable[..., None]:
    return settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))(test)


async def test_fuzz_random_bytes(loaded_module: Running, errors: ErrorRecords) -> None:
    port = port_of(loaded_module)

    @run_fuzz
    @given(st.binary(max_size=600), st.sampled_from([b"", b"\x30", b"\x30\x82\x01\x00\x02\x01\x01"]),
           st.booleans(), st.lists(st.integers(0, 700), max_size=3))
    def fuzz(data: bytes, prefix: bytes, half_close: bool, cuts: list[int]) -> None:
        check(exchange(port, chunked(prefix + data, cuts), half_close), half_close)

    await asyncio.to_thread(fuzz)
    await healthy(loaded_module, errors)


async def test_fuzz_mutated_requests(loaded_module: Running, errors: ErrorRecords) -> None:
    port = port_of(loaded_module)
    valid = valid_requests(loaded_module.pki)

    @run_fuzz
    @given(st.lists(st.sampled_from(valid), min_size=1, max_size=4),
           st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
           st.lists(st.tuples(st.integers(0, 10_000), st.binary(min_size=1, max_size=8)), max_size=2),
           st.one_of(st.none(), st.integers(0, 2_000)), st.booleans(),
           st.lists(st.integers(0, 3000), max_size=3))
    def fuzz(requests: list[bytes], flips: list[tuple[int, int]], inserts: list[tuple[int, bytes]],
             cut: int | None, half_close: bool, cuts: list[int]) -> None:
        data = bytearray(b"".join(requests))
        for pos, value in flips:
            data[pos % len(data)] = value
        for pos, extra in inserts:
            at = pos % (len(data) + 1)
            data[at:at] = extra
        if cut is not None:
            del data[cut:]
        check(exchange(port, chunked(bytes(data), cuts), half_close), half_close)

    await asyncio.to_thread(fuzz)
    await healthy(loaded_module, errors)


async def test_valid_requests_are_answered(loaded_module: Running, errors: ErrorRecords) -> None:
    """The unmutated requests, one connection each: every one gets its response(s)."""
    port = port_of(loaded_module)
    for data in valid_requests(loaded_module.pki):
        request = codec.Decoder().feed(data)[0]  # (pyasn1 cannot decode ldap3's own filters)
        mid, kind = request.message_id, type(request).__name__
        silent = isinstance(request, protocol.UnbindRequest | protocol.AbandonRequest)
        out = await asyncio.to_thread(exchange, port, [data], False, BOUND, QUIET, not silent)
        check(out, False)
        if silent:
            assert out.responses == [] and (kind != "UnbindRequest" or out.closed), kind
        else:
            assert out.responses and {m for m, _, _ in out.responses} == {mid}, (kind, out.responses)
            assert not out.closed, kind
    await healthy(loaded_module, errors)


# ----------------------------------------------------------------------------- limits

def nested_not_search(depth: int) -> bytes:
    fber = b"\x87\x0bobjectClass"
    for _ in range(depth):
        fber = ber.enc_tlv(0xA2, fber)
    op = (ber.enc_str(0x04, SUFFIX) + b"\x0a\x01\x02\x0a\x01\x00\x02\x01\x00\x02\x01\x00\x01\x01\x00"
          + fber + b"\x30\x00")
    return ber.enc_tlv(0x30, b"\x02\x01\x05" + ber.enc_tlv(0x63, op))


async def test_oversized_and_deeply_nested(loaded_module: Running, errors: ErrorRecords) -> None:
    port = port_of(loaded_module)
    limit = loaded_module.repo.config.ldap.max_request_kb * 1024
    # only the header of a PDU one byte over the limit: refused at once, before its body
    header = b"\x30\x84" + (limit + 1 - 6).to_bytes(4, "big")
    out = await asyncio.to_thread(exchange, port, [header], False, 3.0)
    check(out, False)
    assert out.closed and out.elapsed < 1.0 and notice(out) == protocol.ResultCode.PROTOCOL_ERROR
    # one at the limit is read (and, being garbage, refused only when complete)
    out = await asyncio.to_thread(exchange, port, [b"\x30\x84" + (limit - 6).to_bytes(4, "big")], False)
    assert not out.closed and out.data == b""
    # a filter nested deeper than the decoder allows: protocolError
    out = await asyncio.to_thread(exchange, port, [nested_not_search(64)], False)
    check(out, False)
    assert out.closed and notice(out) == protocol.ResultCode.PROTOCOL_ERROR
    # a modest nesting is answered normally: (!(!(…(objectClass=*)…))), nine times, matches nothing
    out = await asyncio.to_thread(exchange, port, [nested_not_search(9)], False)
    check(out, False)
    assert not out.closed and [n for _, n, _ in out.responses] == ["searchResDone"]
    await healthy(loaded_module, errors)


async def test_stalled_half_pdu_closed_at_idle_timeout(tmp_path: Path, pki: dict[str, Any],
                                                      fresh_db: str, errors: ErrorRecords) -> None:
    async with running_repository(tmp_path, pki, fresh_db, ldap={"idle_timeout_seconds": 1}) as running:
        half = search(3, SUFFIX, "(objectClass=*)")
        out = await asyncio.to_thread(exchange, port_of(running), [half[:len(half) // 2]], False, 6.0, None)
        check(out, False)
        assert out.closed
        assert 0.9 <= out.elapsed < 3.5, out.elapsed
        assert notice(out) == protocol.ResultCode.UNAVAILABLE
        # and a connection that is busy talking is not closed for idleness
        port = port_of(running)

        def chatty() -> float:
            t0 = time.monotonic()
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                for i in range(12):
                    s.sendall(search(100 + i, "", "(objectClass=*)", scope="BASE"))
                    data = b""
                    while True:
                        got = s.recv(65536)
                        assert got, "closed while talking"
                        data += got
                        frames, _ = split_frames(data)
                        if frames and ber_decoder.decode(frames[-1], asn1Spec=LDAPMessage())[0][
                                "protocolOp"].getName() == "searchResDone":
                            break
                    time.sleep(0.25)
            return time.monotonic() - t0

        assert await asyncio.to_thread(chatty) > 2.5
        assert not errors.records


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_memory_bounded_over_many_connections(loaded_module: Running, errors: ErrorRecords) -> None:
    port = port_of(loaded_module)
    valid = valid_requests(loaded_module.pki)

    def churn(n: int) -> None:
        for i in range(n):
            data = b"".join(valid[i % len(valid):i % len(valid) + 3])
            junk = bytes((i * 37 + k) % 256 for k in range(64))
            exchange(port, [data + (junk if i % 2 else b"")], True)

    if not Path("/proc/self/statm").exists():
        pytest.skip("needs /proc (Linux)")
    await asyncio.to_thread(churn, 150)  # warm up: caches, pools, allocator arenas
    before = rss_bytes()
    await asyncio.to_thread(churn, 600)
    grown = rss_bytes() - before
    assert grown < 48 * 1024 * 1024, f"RSS grew by {grown / 1e6:.1f} MB over 600 connections"
    await healthy(loaded_module, errors)
