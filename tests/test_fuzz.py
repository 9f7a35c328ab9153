"""Untrusted bytes at the lodging listener: random and mutated bodies get a 4xx JSON answer
with a reason, never a 5xx, a hang or a stored object. (The parsers themselves are fuzzed
in tests/test_profile.py.)"""

from __future__ import annotations

import asyncio
import base64
import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Running


def _mutations(seed_bodies: list[bytes], rng: random.Random, count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        body = bytearray(rng.choice(seed_bodies))
        for _ in range(rng.randint(1, 8)):
            op = rng.random()
            pos = rng.randrange(len(body)) if body else 0
            if op < 0.4 and body:
                body[pos] ^= 1 << rng.randrange(8)
            elif op < 0.7:
                body[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
            elif body:
                del body[pos:pos + rng.randint(1, 32)]
        out.append(bytes(body))
    return out


async def test_mutated_lodging_bodies_are_refused_cleanly(loaded: Running) -> None:
    store = loaded.repo.store
    assert store is not None
    before = await store.certificate_count()
    seeds = [loaded.path(o["path"]).read_bytes() for o in loaded.objects("organisation")[:3]]
    seeds += [loaded.path(loaded.objects("crl")[0]["path"]).read_bytes()]
    seeds += [loaded.path(loaded.objects("organisation")[0]["path"]).read_bytes().hex().encode()]
    pem = (b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(seeds[0])
           + b"-----END CERTIFICATE-----\n")
    seeds.append(pem)
    bodies = [*_mutations(seeds, random.Random(1234), 120), b"", b"\x00", b"-----BEGIN", b"0" * 5000]

    def run() -> list[tuple[str, int, Any]]:
        client = loaded.client()
        answers = []
        try:
            for i, body in enumerate(bodies):
                reply = client.certificates(body) if i % 2 == 0 else client.crl(body)
                answers.append(("cert" if i % 2 == 0 else "crl", reply.status, reply.body))
        finally:
            client.close()
        return answers

    answers = await asyncio.to_thread(run)
    for kind, status, body in answers:
        assert status < 500, (kind, status, body)
        assert body.get("reason") or status == 200, (kind, status, body)
    # a mutation may by chance still be a valid certificate already stored: never a new one
    assert await store.certificate_count() == before


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.binary(max_size=2048), serial=st.text(max_size=40))
async def test_random_status_and_documents_are_refused_cleanly(loaded: Running, body: bytes,
                                                               serial: str) -> None:
    import urllib.parse

    def run() -> list[int]:
        client = loaded.client()
        try:
            statuses = [client.request("POST", "/lodge/certificates/"
                                       f"{urllib.parse.quote(serial or 'x', safe='')}/status",
                                       body, "application/json").status]
            statuses.append(client.request("PUT", "/lodge/documents/"
                                           + urllib.parse.quote(serial or "x", safe=""),
                                           body, "application/octet-stream").status)
            return statuses
        finally:
            client.close()

    for status in await asyncio.to_thread(run):
        assert status < 500


# -- the web service's XML ---------------------------------------------------------------------
_WS_SEEDS = [
    b'<?xml version="1.0" encoding="utf-8"?><CertificateSearchRequest><CertificateSubjectAltName>'
    b"00-db-12-34-56-78-90-a4</CertificateSubjectAltName></CertificateSearchRequest>",
    b"<CertificateSearchRequest><CertificateSubjectName>90B3D51F30010000</CertificateSubjectName>"
    b"</CertificateSearchRequest>",
    b'<?xml version="1.0" encoding="utf-8"?><CertificateDataRequest><CertificateSerial>'
    b"13e6e3409c880fdbe71a429acf375746</CertificateSerial></CertificateDataRequest>",
    b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "x">]><CertificateDataRequest>'
    b"<CertificateSerial>&a;</CertificateSerial></CertificateDataRequest>",
]


def _ws_parse(body: bytes) -> None:
    from repository_server.listeners.http.ws_xml import WsError, parse_retrieve, parse_search

    for parse in (parse_search, parse_retrieve):
        try:
            parse(body)
        except WsError as exc:
            assert exc.status == 401 and exc.message


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_ws_parsers_take_any_bytes(body: bytes) -> None:
    _ws_parse(body)


def test_ws_parsers_take_mutations() -> None:
    for body in _mutations(_WS_SEEDS, random.Random(11), 3000):
        _ws_parse(body)


@settings(max_examples=300, deadline=None)
@given(eui=st.binary(min_size=8, max_size=8), sep=st.sampled_from(["-", ":", ""]),
       upper=st.booleans(), alt=st.booleans(), space=st.sampled_from(["", " ", "\n  "]))
def test_ws_fast_path_agrees_with_the_xml_parser(eui: bytes, sep: str, upper: bool, alt: bool,
                                                 space: str) -> None:
    """The pattern that skips the XML parser for the usual request shapes answers exactly
    what defusedxml's parse would."""
    import defusedxml.ElementTree as SafeET

    from repository_server.listeners.http import ws_xml

    text = sep.join(f"{b:02x}" for b in eui)
    text = text.upper() if upper else text
    field = "CertificateSubjectAltName" if alt else "CertificateSubjectName"
    body = (f'<?xml version="1.0" encoding="utf-8"?>{space}<CertificateSearchRequest>{space}<{field}>'
            f"{space}{text}{space}</{field}>{space}</CertificateSearchRequest>{space}").encode()
    assert ws_xml._FAST_SEARCH.fullmatch(body) is not None
    got = ws_xml.parse_search(body)
    root = SafeET.fromstring(body, forbid_dtd=True)
    assert got.device == (root[0].tag == "CertificateSubjectAltName")
    assert got.eui64 == bytes.fromhex((root[0].text or "").strip().replace(sep, "") if sep else
                                      (root[0].text or "").strip())
