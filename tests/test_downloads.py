"""The read listeners: byte-exact downloads with validators, read by curl and openssl."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import shutil
import subprocess
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest

from repository_server.lodging.bulk import import_directory
from repository_server.lodging.service import Actor
from repository_server.pki.certificates import parse_certificate
from repository_server.pki.pem import load_pem_or_der_certificates
from tests.conftest import REALDATA, TEST_KEY, Running, http_get

pytestmark = pytest.mark.asyncio(loop_scope="session")
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")


async def aget(url: str, headers: dict[str, str] | None = None, key: str | None = TEST_KEY,
               **kw: Any) -> tuple[int, dict[str, str], bytes]:
    """GET as the test user (organisation and device certificates need an API key)."""
    headers = dict(headers or {})
    if key is not None:
        headers["X-API-Key"] = key
    return await asyncio.to_thread(http_get, url, headers=headers, **kw)


async def test_certificate_der_pem_and_headers(loaded: Running) -> None:
    obj = loaded.objects("organisation")[0]
    der = loaded.path(obj["path"]).read_bytes()
    status, headers, body = await aget(f"{loaded.http}/certificates/{obj['serial']}")
    assert status == 200 and body == der
    assert headers["content-type"] == "application/pkix-cert"
    assert int(headers["content-length"]) == len(der)
    assert "immutable" in headers["cache-control"] and "max-age=31536000" in headers["cache-control"]
    assert headers["etag"].startswith('"') and parsedate_to_datetime(headers["last-modified"])
    # any spelling of the serial: lower case, leading zeros stripped or added, separators
    for spelling in (obj["serial"].lower(), "00" + obj["serial"], obj["serial"].lstrip("0"),
                     ":".join(obj["serial"][i:i + 2] for i in range(0, len(obj["serial"]), 2))):
        status, _, body = await aget(f"{loaded.http}/certificates/{spelling}")
        assert status == 200 and body == der, spelling
    # PEM by suffix and by Accept
    status, headers, body = await aget(f"{loaded.http}/certificates/{obj['serial']}.pem")
    assert status == 200 and headers["content-type"] == "application/x-pem-file"
    assert load_pem_or_der_certificates(body) == [der]
    status, headers, body = await aget(f"{loaded.http}/certificates/{obj['serial']}",
                                       headers={"Accept": "application/x-pem-file"})
    assert body.startswith(b"-----BEGIN CERTIFICATE-----")
    # with the issuer key id
    status, _, body = await aget(
        f"{loaded.http}/certificates/{obj['serial']}?issuer={obj['issuer_key_id'].lower()}")
    assert status == 200 and body == der
    status, _, body = await aget(f"{loaded.http}/certificates/{obj['serial']}?issuer=0102030405060708")
    assert status == 404 and "from issuer" in json.loads(body)["reason"]


async def test_conditional_requests_and_head(loaded: Running) -> None:
    obj = loaded.objects("device")[0]
    url = f"{loaded.http}/certificates/{obj['serial']}"
    status, headers, body = await aget(url)
    etag, modified = headers["etag"], headers["last-modified"]
    status, h304, body = await aget(url, headers={"If-None-Match": etag})
    assert status == 304 and body == b"" and h304["etag"] == etag
    status, _, _ = await aget(url, headers={"If-None-Match": f'"other", W/{etag}'})
    assert status == 304
    status, _, _ = await aget(url, headers={"If-None-Match": '"other"'})
    assert status == 200
    status, _, _ = await aget(url, headers={"If-Modified-Since": modified})
    assert status == 304
    status, _, _ = await aget(url, headers={"If-Modified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"})
    assert status == 200
    status, _, _ = await aget(url, headers={"If-Modified-Since": "not a date"})
    assert status == 200
    status, hh, body = await aget(url, method="HEAD")
    assert status == 200 and body == b"" and int(hh["content-length"]) == len(
        load_pem_or_der_certificates(loaded.path(obj["path"]).read_bytes())[obj["index"]])


async def test_not_found_and_bad_input(loaded: Running) -> None:
    status, headers, body = await aget(f"{loaded.http}/certificates/ABCDEF0123")
    assert status == 404 and headers["content-type"].startswith("application/json")
    assert "ABCDEF0123" in json.loads(body)["reason"]
    status, _, body = await aget(f"{loaded.http}/certificates/not-hex!")
    assert status == 400 and "hexadecimal" in json.loads(body)["reason"]
    status, _, body = await aget(f"{loaded.http}/crls/zz.crl")
    assert status == 400
    status, _, body = await aget(f"{loaded.http}/crls/0102030405060708.crl")
    assert status == 404 and "0102030405060708" in json.loads(body)["reason"]
    status, _, body = await aget(f"{loaded.http}/documents/nope")
    assert status == 404 and "nope" in json.loads(body)["reason"]
    status, _, body = await aget(f"{loaded.http}/no/such/path")
    assert status == 404 and json.loads(body)["status"] == 404


async def test_crls_list_current_and_caching(loaded: Running) -> None:
    status, _, body = await aget(f"{loaded.http}/crls")
    listing = json.loads(body)
    assert status == 200 and {c["kind"] for c in listing} == {"crl", "arl"}
    crl_obj = loaded.objects("crl")[0]
    entry = next(c for c in listing if c["issuer_key_id"] == crl_obj["issuer_key_id"])
    assert entry["crl_number"] == crl_obj["crl_number"] and entry["revoked"] >= 1
    status, headers, body = await aget(f"{loaded.http}{entry['url']}")
    assert status == 200 and body == loaded.path(crl_obj["path"]).read_bytes()
    assert headers["content-type"] == "application/pkix-crl"
    # Expires is the CRL's nextUpdate (HTTP dates have whole seconds)
    next_update = datetime.fromisoformat(entry["next_update"]).replace(microsecond=0)
    assert parsedate_to_datetime(headers["expires"]) == next_update
    max_age = int(headers["cache-control"].split("max-age=")[1].split(",")[0])
    assert 0 < max_age <= 3600
    status, _, _ = await aget(f"{loaded.http}{entry['url']}", headers={"If-None-Match": headers["etag"]})
    assert status == 304
    status, vh, body = await aget(
        f"{loaded.http}/crls/{crl_obj['issuer_key_id'].lower()}/{crl_obj['crl_number']}.crl")
    assert status == 200 and "immutable" in vh["cache-control"]
    status, _, body = await aget(f"{loaded.http}/crls/{crl_obj['issuer_key_id']}/versions")
    assert json.loads(body)[0]["crl_number"] == crl_obj["crl_number"]


async def test_documents_list(loaded: Running) -> None:
    status, _, body = await aget(f"{loaded.http}/documents")
    docs = json.loads(body)
    assert status == 200 and len(docs) == len(loaded.objects("document"))
    for obj in loaded.objects("document"):
        status, headers, body = await aget(f"{loaded.http}/documents/{obj['name']}")
        assert body == loaded.path(obj["path"]).read_bytes()
        assert headers["content-type"] == obj["content_type"]
        status, _, _ = await aget(f"{loaded.http}/documents/{obj['name']}",
                                  headers={"If-None-Match": headers["etag"]})
        assert status == 304


async def test_https_and_operations(loaded: Running) -> None:
    obj = loaded.objects("organisation")[1]
    status, _, body = await aget(f"{loaded.https}/certificates/{obj['serial']}", ca=loaded.tls_ca)
    assert status == 200 and body == loaded.path(obj["path"]).read_bytes()
    assert (await aget(f"{loaded.http}/healthz"))[0] == 200
    status, _, body = await aget(f"{loaded.http}/readyz")
    assert status == 200 and json.loads(body)["status"] == "ready"
    status, _, body = await aget(loaded.metrics)
    assert status == 200 and b'smki_http_requests_total{listener="http"' in body


@needs_curl
@needs_openssl
async def test_curl_and_openssl_read_what_we_serve(loaded: Running, tmp_path: Path) -> None:
    obj = loaded.objects("device")[0]
    crl_obj = loaded.objects("crl")[0]

    def run() -> None:
        cert_file, crl_file = tmp_path / "c.der", tmp_path / "c.crl"
        subprocess.run(["curl", "-sSf", "-o", str(cert_file),
                        f"{loaded.http}/certificates/{obj['serial'].lower()}?apikey={TEST_KEY}"],
                       check=True,
                       timeout=30)
        out = subprocess.run(["openssl", "x509", "-inform", "DER", "-in", str(cert_file),
                              "-noout", "-serial", "-ext", "subjectAltName"],
                             capture_output=True, text=True, check=True).stdout
        assert f"serial={obj['serial']}" in out
        subprocess.run(["curl", "-sSf", "--cacert", loaded.tls_ca, "-o", str(crl_file),
                        f"{loaded.https}/crls/{crl_obj['issuer_key_id']}.crl"], check=True,
                       timeout=30)
        out = subprocess.run(["openssl", "crl", "-inform", "DER", "-in", str(crl_file), "-noout",
                              "-crlnumber", "-text"], capture_output=True, text=True,
                             check=True).stdout
        assert "Revoked Certificates" in out and "crlNumber=0x01" in out.replace(" ", "")
        # PEM through curl, verified against the issuing CA with openssl
        pem_file = tmp_path / "c.pem"
        subprocess.run(["curl", "-sSf", "-H", "Accept: application/x-pem-file", "-H",
                        f"X-API-Key: {TEST_KEY}", "-o",
                        str(pem_file), f"{loaded.http}/certificates/{obj['serial']}"],
                       check=True, timeout=30)
        ca = next(o for o in loaded.pki["objects"] if o.get("name") == "issuing-dca")
        root = next(o for o in loaded.pki["objects"] if o.get("name") == "root-dca")
        chain = tmp_path / "chain.pem"
        chain.write_bytes(loaded.path(ca["pem"]).read_bytes() + loaded.path(root["pem"]).read_bytes())
        res = subprocess.run(["openssl", "verify", "-partial_chain", "-CAfile", str(chain),
                              str(pem_file)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        head = subprocess.run(["curl", "-sSI", "-H", f"X-API-Key: {TEST_KEY}",
                               f"{loaded.http}/certificates/{obj['serial']}"],
                              capture_output=True, text=True, check=True, timeout=30).stdout
        assert "content-length:" in head.lower() and "etag:" in head.lower()

    await asyncio.to_thread(run)


def _realdata_files() -> list[Path]:
    return sorted(p for p in REALDATA.rglob("*") if p.suffix in (".pem", ".der"))


@pytest.mark.skipif(not REALDATA.is_dir(), reason="shared/realdata not available")
async def test_every_realdata_certificate_imports_and_downloads_byte_identical(
        server: Running) -> None:
    from repository_server.lodging.service import LodgingService

    assert server.repo.store is not None
    service = LodgingService(server.repo.store, after_commit=server.repo.catalog.synced)
    notes: list[str] = []
    report = await import_directory(service, REALDATA, Actor("operator:test"),
                                    allow_unverified_issuer=True, note=notes.append)
    service.close()
    assert report.refused == [], report.refused[:5]
    expected: dict[bytes, bytes] = {}
    for path in _realdata_files():
        for der in load_pem_or_der_certificates(path.read_bytes()):
            expected[parse_certificate(der).sha256] = der
    assert len(expected) == 457
    assert report.stored == 457
    assert any("README.md" in n for n in notes)  # non-certificate files are skipped with a note
    store = server.repo.store
    rows = await store.pool.fetch("SELECT serial, issuer_key_id, sha256, issuer_verified, lint"
                                  " FROM certificates")
    assert len(rows) == 457
    verified = sum(1 for r in rows if r["issuer_verified"])
    assert 40 <= verified < 457  # Z1-issued organisation certs verify; E357 devices cannot

    def fetch_all() -> int:
        conn = http.client.HTTPConnection("127.0.0.1", server.repo.bound["http"].port, timeout=10)
        n = 0
        for r in rows:
            query = f"?issuer={r['issuer_key_id'].hex()}" if r["issuer_key_id"] else ""
            conn.request("GET", f"/certificates/{r['serial']}{query}",
                         headers={"X-API-Key": TEST_KEY})
            resp = conn.getresponse()
            body = resp.read()
            if resp.status == 300:  # same serial, no key id to tell them apart: both listed
                continue
            assert resp.status == 200, (r["serial"], resp.status, body[:200])
            assert body == expected[r["sha256"]]
            n += 1
        conn.close()
        return n

    served = await asyncio.to_thread(fetch_all)
    assert served >= 450
    # a real quirk is reported, not fatal
    lint_codes = {f["code"] for r in rows for f in r["lint"]}
    assert {"dn-mixed-string-types", "sig-alg-explicit-null", "issuer-unverified"} <= lint_codes
    # the DER is stored exactly as lodged (base64 round trip of one)
    one = rows[0]
    status, _, body = await aget(f"{server.http}/certificates/{one['serial']}")
    if status == 200:
        assert base64.b64encode(body) == base64.b64encode(expected[one["sha256"]])


async def test_serial_shared_by_two_issuers(server: Running) -> None:
    """Two CAs issue the same serial: the plain URL answers 300 naming both issuer key ids,
    `?issuer=` picks one, and a cached single answer is dropped when the sibling arrives."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from tests.pkitools import aki_for, pem, self_signed_ca

    serial = 0x1234567890ABCDEF1234567890ABCDEF
    now = dt.datetime.now(dt.UTC)
    client = server.client()
    leaves = []
    for name in ("CA One", "CA Two"):
        ca, ca_key = self_signed_ca(name)
        reply = await asyncio.to_thread(client.certificates, pem(ca), trust_anchor=True)
        assert reply.status == 200, reply.body
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]))
                .issuer_name(ca.subject).public_key(key.public_key()).serial_number(serial)
                .not_valid_before(now - dt.timedelta(days=1))
                .not_valid_after(now + dt.timedelta(days=30))
                .add_extension(aki_for(ca), critical=False)
                .sign(ca_key, hashes.SHA256()))
        leaves.append((ca, leaf))
    key_ids = [ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()
               for ca, _ in leaves]
    url = f"{server.http}/certificates/{serial:X}"
    assert (await asyncio.to_thread(client.certificates, pem(leaves[0][1]))).status == 200
    status, _, body = await aget(url)  # now cached with one entry
    assert status == 200 and body == leaves[0][1].public_bytes(serialization.Encoding.DER)
    assert (await asyncio.to_thread(client.certificates, pem(leaves[1][1]))).status == 200
    status, _, body = await aget(url)
    assert status == 300, body
    reason = json.loads(body)["reason"]
    assert all(k.upper() in reason for k in key_ids)
    for (_, leaf), key_id in zip(leaves, key_ids, strict=True):
        status, _, body = await aget(f"{url}?issuer={key_id}")
        assert status == 200 and body == leaf.public_bytes(serialization.Encoding.DER)
    client.close()


async def test_import_of_bundles_holds_back_little(server: Running, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`issuing-dca.der` sorts before its own issuer `root-dca.der`, so the first chunks
    cannot verify; the devices held back go round again as soon as the CA is stored, not at
    the end with every bundle in memory (10,000,000 devices: 6 GB before this was fixed)."""
    import repository_server.lodging.bulk as bulk
    from repository_server.lodging.service import LodgingService
    from repository_server.pki.testpki import TestPkiParams, generate

    monkeypatch.setattr(bulk, "CHUNK", 100)
    monkeypatch.setattr(bulk, "BUNDLE_SPLIT_BYTES", 10_000)  # every device bundle is "big"
    monkeypatch.setattr("repository_server.pki.testpki.BUNDLE_MAX", 500)
    pki = tmp_path / "pki"
    generate(pki, TestPkiParams(devices=2000, organisations=2, workers=2, seed=41))
    assert server.repo.store is not None
    service = LodgingService(server.repo.store, after_commit=server.repo.catalog.synced)
    seen: list[tuple[int, int]] = []
    try:
        report = await bulk.import_directory(
            service, pki, Actor("operator:test"), note=lambda _line: None,
            progress=lambda _stage, done, total: seen.append((done, total)))
    finally:
        service.close()
    assert not report.refused and report.unverified == 0
    assert report.stored == 4000 + 5 + 2  # devices, CAs, organisations (the manifest's)
    assert report.held_back_peak < 1000, report.held_back_peak  # not the 4,000 devices
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1][0] == seen[-1][1]


# -- import into an empty store: indexes built after the COPYs (issue 13) --------------------
async def _import(running: Running, root: Path, notes: list[str] | None = None,
                  **kw: Any) -> Any:
    from repository_server.lodging.service import LodgingService

    assert running.repo.store is not None
    service = LodgingService(running.repo.store, after_commit=running.repo.catalog.synced)
    try:
        return await import_directory(service, root, Actor("operator:test"),
                                      note=(notes if notes is not None else []).append, **kw)
    finally:
        service.close()


async def _indexes(dsn: str) -> dict[str, str]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM deferred_indexes") == 0
        return {r["indexname"]: r["indexdef"] for r in await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'certificates'")}
    finally:
        await conn.close()


async def _schema_indexes(embedded: Any) -> dict[str, str]:
    """The certificates table's indexes as the migrations make them."""
    from repository_server.store.db import Store
    from tests.conftest import create_database

    dsn = await create_database(embedded)
    store = await Store.connect(dsn)
    await store.close()
    return await _indexes(dsn)


async def _rows(running: Running) -> list[tuple[Any, ...]]:
    assert running.repo.store is not None
    return [tuple(r) for r in await running.repo.store.pool.fetch(
        "SELECT sha256, serial, issuer_dn, issuer_key_id, kind, eui64, status, lint::text,"
        " issuer_verified, trust_anchor, der FROM certificates ORDER BY sha256")]


async def _answers(running: Running, rows: list[tuple[Any, ...]]) -> list[Any]:
    """Every certificate over HTTP, and the whole directory over LDAP."""
    from tests.test_ldap import BIND, ldapsearch

    out: list[Any] = []
    for r in rows:
        query = f"?issuer={r[3].hex()}" if r[3] else ""
        status, _h, body = await aget(f"{running.http}/certificates/{r[1]}{query}")
        out.append((r[1], status, body))
    _code, text = await asyncio.to_thread(ldapsearch, running, *BIND, "-b", "o=SMKI", "-s",
                                          "sub", "(objectClass=*)")
    out.append(sorted(text.split("\n\n")))
    return out


async def _replica_verify(data_dir: Path, dsn: str) -> None:
    from tests.conftest import cli_env, run_process, smki_cli

    code, out, err = await run_process(*smki_cli(), "replica", "verify", "--data-dir",
                                       str(data_dir), timeout=120,
                                       env={**cli_env(), "SMKI_DATABASE__URL": dsn})
    assert code == 0 and b"equals the store" in out, (out, err)


async def test_import_into_an_empty_store_builds_indexes_after_and_answers_the_same(
        tmp_path: Path, pki: dict[str, Any], embedded: Any) -> None:
    """Into an empty store the non-unique indexes are dropped and built after the COPYs
    (with progress notes); the store then has exactly the schema's indexes, and HTTP, LDAP
    and `replica verify` answer as after an import into a store that already held a
    certificate (the ordinary path, every index kept)."""
    from tests.conftest import create_database, running_repository

    root: Path = pki["dir"]
    first = next(o for o in pki["objects"] if o["kind"] == "root")
    only_root = tmp_path / "root"
    only_root.mkdir()
    shutil.copy(root / first["path"], only_root / "root.der")
    dsn_a, dsn_b = await create_database(embedded), await create_database(embedded)
    answers, rows = [], []
    for dsn, where in ((dsn_a, tmp_path / "a"), (dsn_b, tmp_path / "b")):
        async with running_repository(where, pki, dsn) as running:
            notes: list[str] = []
            if dsn == dsn_b:  # not empty: one certificate stored before
                await _import(running, only_root)
            report = await _import(running, root, notes)
            assert not report.refused
            if dsn == dsn_a:
                assert report.indexes_deferred == 9 and report.stored == len(
                    [o for o in pki["objects"] if o["kind"] in ("root", "ca", "organisation",
                                                                "device")])
                assert any("9 non-unique indexes are dropped" in n for n in notes), notes
                assert "building indexes: 1 of 9 (certificates_ca) ..." in notes, notes
                assert any(n.startswith("building indexes: 9 built in") for n in notes)
            else:
                assert report.indexes_deferred == 0 and report.identical == 1
                assert not any("building indexes" in n for n in notes), notes
            rows.append(await _rows(running))
            answers.append(await _answers(running, rows[-1]))
        await _replica_verify(where, dsn)
    assert rows[0] == rows[1] and len(rows[0]) == 49  # 5 CAs, 24 organisations, 20 devices
    assert answers[0] == answers[1]
    assert all(status == 200 for _s, status, _b in answers[0][:-1])
    assert len(answers[0][-1]) > 49  # LDAP entries
    schema = await _schema_indexes(embedded)
    assert len(schema) == 12
    assert await _indexes(dsn_a) == schema == await _indexes(dsn_b)


def _conflicting(running: Running, der: bytes) -> bytes:
    """A different certificate with this one's issuer and serial (signed by the issuer)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    cert = x509.load_der_x509_certificate(der)
    ca, key = running.ca("issuing-oca")
    builder = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(cert.issuer)
               .public_key(cert.public_key()).serial_number(cert.serial_number)
               .not_valid_before(cert.not_valid_before_utc)
               .not_valid_after(cert.not_valid_after_utc.replace(year=cert.not_valid_after_utc.year - 1)))
    for ext in cert.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    assert cert.issuer == ca.subject
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


async def test_import_into_an_empty_store_finds_duplicates_as_before(
        tmp_path: Path, pki: dict[str, Any], embedded: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same certificate twice is stored once (identical), a different certificate with
    the same issuer and serial refuses its chunk: the same report, to the line, whether the
    store was empty (indexes deferred) or not."""
    import repository_server.lodging.bulk as bulk
    from tests.conftest import create_database, running_repository

    monkeypatch.setattr(bulk, "CHUNK", 8)
    root: Path = pki["dir"]
    src = tmp_path / "src"
    src.mkdir()
    kept = [o for o in pki["objects"] if o["kind"] in ("root", "ca", "organisation")]
    for o in kept:
        shutil.copy(root / o["path"], src / Path(o["path"]).name)
    orgs = [o for o in kept if o["kind"] == "organisation"]
    (src / "00-copy.der").write_bytes((root / orgs[0]["path"]).read_bytes())
    device = next(o for o in pki["objects"] if o["kind"] == "device")
    other = tmp_path / "other"
    other.mkdir()
    (other / "device.der").write_bytes(  # a device not in src (no CA: the same issuers known)
        load_pem_or_der_certificates((root / device["path"]).read_bytes())[device["index"]])
    reports = []
    for n, where in enumerate((tmp_path / "a", tmp_path / "b")):
        async with running_repository(where, pki, await create_database(embedded)) as running:
            if n == 0:
                (src / "zz-conflict.der").write_bytes(
                    _conflicting(running, (root / orgs[1]["path"]).read_bytes()))
            else:  # not empty: the ordinary path
                assert (await _import(running, other, allow_unverified_issuer=True)).stored == 1
            report = await _import(running, src)
            assert report.indexes_deferred == (9 if n == 0 else 0)
            reports.append((report.stored, report.identical, sorted(report.refused)))
    assert reports[0] == reports[1], reports
    stored, identical, refused = reports[0]
    assert identical == 1 and any("same issuer and serial" in r for r in refused), refused
    assert any("a chunk of" in r and "not stored because of the conflict" in r
               for r in refused), refused
    assert 0 < stored < len(kept)


async def test_import_killed_midway_is_consistent_and_built_at_the_next_start(
        tmp_path: Path, pki: dict[str, Any], fresh_db: str) -> None:
    """kill -9 of `import` (and its workers) while it loads an empty store: what it
    committed is stored; the next start builds the dropped indexes; everything stored is
    readable, lodging works, and a second import takes the ordinary path and completes
    the first."""
    import os
    import signal

    import asyncpg

    from repository_server.pki.testpki import TestPkiParams, generate
    from repository_server.store.bulkload import _BULK_LOCK
    from tests.conftest import cli_env, lodge_pki, running_repository, smki_cli

    big = tmp_path / "big"
    generate(big, TestPkiParams(devices=25_000, organisations=2, workers=2, seed=43))
    proc = await asyncio.create_subprocess_exec(
        *smki_cli(), "import", str(big), "--data-dir", str(tmp_path / "cli"),
        env={**cli_env(), "SMKI_DATABASE__URL": fresh_db}, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
    conn = await asyncpg.connect(fresh_db)
    try:
        for _ in range(1200):
            await asyncio.sleep(0.1)
            if await conn.fetchval("SELECT to_regclass('deferred_indexes') IS NOT NULL") and \
                    await conn.fetchval("SELECT count(*) FROM deferred_indexes") and \
                    await conn.fetchval("SELECT count(*) FROM certificates") >= 10_000:
                break
        else:
            raise AssertionError("the import did not get going")
        os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        for _ in range(100):  # its server process ends when it sees the client gone
            if not await conn.fetchval("SELECT count(*) FROM pg_locks WHERE locktype ="
                                       " 'advisory' AND objid = $1", _BULK_LOCK):
                break
            await asyncio.sleep(0.1)
        stored = await conn.fetchval("SELECT count(*) FROM certificates")
        assert 10_000 <= stored < 50_007
        assert await conn.fetchval("SELECT count(*) FROM deferred_indexes") == 9
    finally:
        await conn.close()
    async with running_repository(tmp_path / "srv", pki, fresh_db) as running:
        indexes = await _indexes(fresh_db)  # built at the start
        assert len(indexes) == 12 and "certificates_eui64" in indexes
        assert running.repo.store is not None
        rows = await running.repo.store.pool.fetch(
            "SELECT serial, issuer_key_id, der FROM certificates ORDER BY random() LIMIT 50")
        for r in rows:
            status, _h, body = await aget(
                f"{running.http}/certificates/{r['serial']}?issuer={r['issuer_key_id'].hex()}")
            assert status == 200 and body == r["der"]
        await asyncio.to_thread(lodge_pki, running)  # lodging works
        report = await _import(running, big)
        assert report.indexes_deferred == 0 and not report.refused
        assert report.identical == stored and report.stored == 50_007 - stored
    await _replica_verify(tmp_path / "srv", fresh_db)
