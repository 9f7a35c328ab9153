"""RFC 4387 certificate and CRL stores (/certificates/search.cgi, /crls/search.cgi) over real
sockets. Every search key is worked out here from the test PKI's own files and from real GB
SMKI certificates, with hashlib and cryptography, never with the server's code."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email
import email.policy
import hashlib
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from repository_server.config import ConfigError
from tests.conftest import REALDATA, ROOT, TEST_KEY, Running, http_get, make_config, running_repository

pytestmark = pytest.mark.asyncio(loop_scope="session")
# ../shared/realdata, or the project's shared folder when this checkout is a worktree
REAL = next((p for p in (REALDATA, ROOT.parents[1] / "shared" / "realdata") if p.is_dir()),
            REALDATA)
CAP = 7  # web.search_max_results in these tests (the test PKI's device CA issued 20)


def key(value: bytes) -> str:
    """RFC 4387 section 2.1: base64 of the SHA-1, trailing '=' removed."""
    return base64.b64encode(hashlib.sha1(value).digest()).decode().rstrip("=")


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(size),)) + size


def issuer_and_serial(cert: x509.Certificate) -> bytes:
    """DER of IssuerAndSerialNumber ::= SEQUENCE { issuer Name, serialNumber INTEGER }."""
    n = cert.serial_number
    content = n.to_bytes(n.bit_length() // 8 + 1, "big", signed=True)
    integer = b"\x02" + _der_length(len(content)) + content
    body = cert.issuer.public_bytes() + integer
    return b"\x30" + _der_length(len(body)) + body


def keys_of(cert: x509.Certificate) -> dict[str, str]:
    from cryptography.hazmat.primitives.serialization import Encoding

    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    return {"certHash": key(cert.public_bytes(Encoding.DER)),
            "iHash": key(cert.issuer.public_bytes()), "sHash": key(cert.subject.public_bytes()),
            "iAndSHash": key(issuer_and_serial(cert)), "sKIDHash": key(ski)}


async def get(url: str, api_key: str | None = TEST_KEY) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session, session.get(
            url, headers={"X-API-Key": api_key} if api_key else {}) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()


def parts(headers: dict[str, str], body: bytes) -> list[tuple[str, bytes]]:
    """A multipart/mixed answer's parts (content type, bytes), read by the email package."""
    msg = email.message_from_bytes(b"Content-Type: " + headers["content-type"].encode()
                                   + b"\r\n\r\n" + body, policy=email.policy.HTTP)
    assert msg.is_multipart() and msg.get_content_type() == "multipart/mixed"
    out = []
    for part in msg.iter_parts():
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        out.append((part.get_content_type(), payload))
    return out


@pytest.fixture
async def capped(tmp_path: Path, pki: dict[str, Any], fresh_db: str) -> Any:
    async with running_repository(tmp_path, pki, fresh_db, lodge=True,
                                  web={"search_max_results": CAP}) as running:
        yield running


def _load(running: Running, kind: str) -> list[tuple[x509.Certificate, bytes]]:
    from repository_server.pki.pem import load_pem_or_der_certificates

    out = []
    for obj in running.objects(kind):  # device certificates come in bundles: one per index
        der = load_pem_or_der_certificates(running.path(obj["path"]).read_bytes())[
            obj.get("index", 0)]
        out.append((x509.load_der_x509_certificate(der), der))
    return out


async def test_every_attribute_finds_the_certificate(capped: Running) -> None:
    base = f"{capped.http}/certificates/search.cgi"
    cas = _load(capped, "root") + _load(capped, "ca")
    orgs = _load(capped, "organisation")
    devices = _load(capped, "device")
    # unique keys: each finds exactly its certificate, byte for byte
    for cert, der in [*cas, orgs[0], orgs[5], devices[0], devices[7]]:
        for attribute, value in keys_of(cert).items():
            if attribute == "iHash" or (attribute == "sHash" and (cert, der) not in cas):
                continue  # not unique: below
            status, headers, body = await get(f"{base}?{attribute}={quote(value, safe='')}")
            assert status == 200, (attribute, body)
            assert headers["content-type"] == "application/pkix-cert"
            assert body == der, attribute
    # a root certificate by its subject, without any API key (CA certificates are open)
    root, root_der = cas[0]
    status, headers, body = await get(f"{base}?sHash={quote(keys_of(root)['sHash'])}", None)
    assert status == 200 and body == root_der
    assert headers["cache-control"] == "public, no-cache"  # what matches grows: revalidated
    # name: a CA's commonName, in any case and spacing, and its whole RFC 4514 name
    cn = root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert isinstance(cn, str)
    for name in (cn, cn.lower(), f"  {cn} ", root.subject.rfc4514_string()):
        status, _, body = await get(f"{base}?name={quote(name)}", None)
        assert status == 200 and body == root_der, name


async def test_many_results_multipart_capped(capped: Running) -> None:
    base = f"{capped.http}/certificates/search.cgi"
    devices = _load(capped, "device")
    by_issuer = Counter(keys_of(c)["iHash"] for c, _ in devices)
    ihash, count = by_issuer.most_common(1)[0]
    assert count == 20 > CAP
    status, headers, body = await get(f"{base}?iHash={quote(ihash)}")
    assert status == 200, body
    found = parts(headers, body)
    assert len(found) == CAP and headers["x-total-count"] == "20"
    assert headers["x-results-limit"] == str(CAP)
    assert {t for t, _ in found} == {"application/pkix-cert"}
    ders = {der for _, der in devices}
    assert all(der in ders for _, der in found) and len({d for _, d in found}) == CAP
    # the organisation CA's certificates: within the cap? no: 24 of them, also capped
    orgs = _load(capped, "organisation")
    oca_key = keys_of(orgs[0][0])["iHash"]
    issued = [der for c, der in orgs if keys_of(c)["iHash"] == oca_key]
    status, headers, body = await get(f"{base}?iHash={quote(oca_key)}")
    got_orgs = [d for _, d in parts(headers, body)]
    assert len(issued) > CAP and len(got_orgs) == CAP and set(got_orgs) <= set(issued)
    # the root's subordinates: few, all in one answer, no cap header
    roots = _load(capped, "root")
    cas = _load(capped, "ca")
    root_subject = roots[0][0].subject
    subordinates = [der for c, der in cas if c.issuer == root_subject]
    status, headers, body = await get(f"{base}?iHash={quote(key(root_subject.public_bytes()))}",
                                      None)
    assert status == 200 and "x-results-limit" not in headers
    got = [d for _, d in parts(headers, body)] if len(subordinates) > 1 else [body]
    assert sorted(got) == sorted([*subordinates, roots[0][1]])  # the root issued itself
    # the same from a replica built afresh (a build writes the index its own way)
    assert capped.repo.feeder is not None
    await capped.repo.feeder.build()
    # ready at once; the search index follows from the replica itself (503 until then)
    status, headers, again = await get(f"{base}?iHash={quote(ihash)}")
    deadline = time.monotonic() + 30
    while status == 503 and time.monotonic() < deadline:
        assert b"search index is being built" in again and headers["retry-after"]
        await asyncio.sleep(0.2)
        status, headers, again = await get(f"{base}?iHash={quote(ihash)}")
    assert status == 200 and headers["x-total-count"] == "20"
    assert [d for _, d in parts(headers, again)] == [d for _, d in found]
    status, _, body = await get(f"{base}?certHash={quote(keys_of(devices[3][0])['certHash'])}")
    assert status == 200 and body == devices[3][1]


async def test_access_rule_and_bad_requests(capped: Running) -> None:
    base = f"{capped.http}/certificates/search.cgi"
    device, der = _load(capped, "device")[0]
    cert_hash = keys_of(device)["certHash"]
    status, _, body = await get(f"{base}?certHash={quote(cert_hash)}", None)
    assert status == 403 and b"API key" in body
    status, _, body = await get(f"{base}?certHash={quote(cert_hash)}", "wrong-key")
    assert status == 403 and b"unknown or disabled API key" in body
    status, headers, body = await get(f"{base}?certHash={quote(cert_hash)}&apikey={TEST_KEY}",
                                      None)
    assert status == 200 and body == der
    assert headers["cache-control"] == "private, no-cache"  # never from a shared cache
    status, _, body = await get(f"{base}?CERTHASH={quote(cert_hash)}")  # names in any case
    assert status == 200 and body == der
    digest = hashlib.sha1(b"nothing stored").digest()
    good = base64.b64encode(digest).decode()
    for query, expect in [
        (f"certHash={quote(good)}", "27 characters"),  # with its trailing '='
        (f"certHash={quote(good[:26])}", "27 characters"),
        ("certHash=" + "-" * 27, "A-Z a-z 0-9 + /"),  # URL-safe base64 is not RFC 4387
        ("certHash=" + "_" * 27, "A-Z a-z 0-9 + /"),
        ("", "exactly one search attribute"),
        (f"certHash={quote(good[:27])}&sHash={quote(good[:27])}", "exactly one"),
        (f"certHash={quote(good[:27])}&certHash={quote(good[:27])}", "exactly one"),
        (f"serial={quote(good[:27])}", "not a search attribute"),
        ("name=", "name: give a name"),
    ]:
        status, headers, body = await get(f"{base}?{query}")
        assert status == 400, query
        assert headers["content-type"].startswith("application/json")
        assert expect.encode() in body, (query, body)
    status, _, body = await get(f"{base}?certHash={quote(good[:27])}")
    assert status == 404 and b"no certificate matches" in body
    # sHash is only for certificates: the CRL store refuses it, naming its attributes
    status, _, body = await get(f"{capped.http}/crls/search.cgi?sHash={quote(good[:27])}")
    assert status == 400 and b"iHash, sKIDHash, name" in body


async def test_crl_store(capped: Running) -> None:
    base = f"{capped.http}/crls/search.cgi"
    for obj in capped.objects("crl") + capped.objects("arl"):
        der = capped.path(obj["path"]).read_bytes()
        crl = x509.load_der_x509_crl(der)
        aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier is not None
        cn = crl.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        assert isinstance(cn, str)
        for query in (f"iHash={quote(key(crl.issuer.public_bytes()))}",
                      f"sKIDHash={quote(key(aki.key_identifier))}", f"name={quote(cn)}"):
            status, headers, body = await get(f"{base}?{query}", None)  # CRLs need no key
            assert status == 200, (query, body)
            assert headers["content-type"] == "application/pkix-crl"
            assert body == der, query
    status, _, _ = await get(f"{base}?iHash={quote(key(b'no such issuer'), safe='')}")
    assert status == 404


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
async def test_curl_and_cpm_counting(capped: Running) -> None:
    root_obj = capped.objects("root")[0]
    der = capped.path(root_obj["path"]).read_bytes()
    cert = x509.load_der_x509_certificate(der)
    url = (f"{capped.https}/certificates/search.cgi?iAndSHash="
           f"{quote(keys_of(cert)['iAndSHash'], safe='')}")
    done = await asyncio.to_thread(subprocess.run, [
        "curl", "-sS", "--fail", "--cacert", capped.tls_ca, "-o", "-", url],
        capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout == der
    # counted as a download, operation search-cgi, like every other read
    _, _, metrics = await asyncio.to_thread(http_get, capped.metrics)
    assert any(line.startswith("smki_cpm_requests_total{") and 'interface="download"' in line
               and 'operation="search-cgi"' in line
               for line in metrics.decode().splitlines()), metrics.decode()[:2000]


@pytest.mark.skipif(not REAL.is_dir(), reason="shared/realdata not available")
async def test_real_certificates(server: Running) -> None:
    """Real GB SMKI certificates (the ZAZ1 set DCC Boxed ships): each found by every key."""
    from repository_server.lodging.bulk import import_directory
    from repository_server.lodging.service import Actor, LodgingService
    from repository_server.pki.pem import load_pem_or_der_certificates

    folder = REAL / "dccboxed-keystore" / "keystore.json-extracted"
    assert server.repo.store is not None and server.repo.catalog is not None
    service = LodgingService(server.repo.store, after_commit=server.repo.catalog.synced)
    report = await import_directory(service, folder, Actor("operator:test"),
                                    allow_unverified_issuer=True)
    service.close()
    assert report.refused == [] and report.stored > 10
    certs = []
    for p in sorted(folder.glob("*.pem")):
        for d in load_pem_or_der_certificates(p.read_bytes()):
            with contextlib.suppress(ValueError):  # some real ones cryptography refuses
                certs.append(x509.load_der_x509_certificate(d))
    assert len(certs) >= 8
    from cryptography.hazmat.primitives.serialization import Encoding

    for cert in certs[:12]:
        der = cert.public_bytes(Encoding.DER)
        for attribute in ("certHash", "iAndSHash", "sKIDHash"):
            value = keys_of(cert)[attribute]
            status, headers, body = await get(
                f"{server.http}/certificates/search.cgi?{attribute}={quote(value, safe='')}")
            assert status == 200, (attribute, body)
            assert (body == der if headers["content-type"] == "application/pkix-cert"
                    else der in [d for _, d in parts(headers, body)]), attribute
        status, headers, body = await get(
            f"{server.http}/certificates/search.cgi?sHash={quote(keys_of(cert)['sHash'])}")
        assert status == 200
        found = [body] if headers["content-type"] == "application/pkix-cert" else [
            d for _, d in parts(headers, body)]
        assert der in found or int(headers["x-total-count"]) > len(found)


async def test_search_max_results_is_checked(tmp_path: Path, pki: dict[str, Any]) -> None:
    for bad in (0, 10_001):
        with pytest.raises(ConfigError, match=r"web\.search_max_results"):
            make_config(tmp_path, pki, "", web={"search_max_results": bad})


async def test_the_search_index_fill_resumes_where_a_stopped_node_left_it(
        capped: Running, fresh_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node stopped part-way through filling the RFC 4387 index resumes after the last page
    it wrote, not from the start (at 5,000,000 devices a server restarted every minute spent
    half its core re-filling for ever), and ends with the index a fill from scratch makes."""
    from repository_server.readmodel import feed
    from repository_server.readmodel.env import Replica

    monkeypatch.setattr(feed, "_SEARCH_PAGE", 5)  # many pages from the test PKI
    indexes = []
    for stop_after in (0, 2):  # from scratch; stopped after two pages, then a new fill
        replica = Replica(tmp_path / f"replica-{stop_after}", map_size=1 << 30)
        feeder = feed.Feeder(replica, dsn=fresh_db)
        try:
            await feeder.build()
            assert replica.search_filled() == 0 and not replica.search_ready()
            after = 0
            for _ in range(stop_after):
                page = await asyncio.to_thread(feeder._search_page, replica.env, after)
                assert page is not None
                after = page[0]
            assert replica.search_filled() == after
            total = sum(1 for _ in replica.certificates_after(0, 10**6))
            indexed = await feeder.fill_search()  # the restarted node's fill
            assert indexed == total - 5 * stop_after
            assert replica.search_ready()
            with replica._read() as txn, txn.cursor(db=replica._db["search"]) as cur:
                indexes.append(list(cur))
        finally:
            await feeder.close()
            replica.close()
    assert indexes[0] == indexes[1] and len(indexes[0]) > 10
