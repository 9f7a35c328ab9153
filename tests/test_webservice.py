"""The XML web service over real sockets: answers, every error path, hostile XML, API keys,
the five statuses, and who may read what."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import http.client
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from repository_server.pki.ids import parse_eui64
from tests.conftest import TEST_KEY, Running, add_user, http_get, start_repository
from tests.pkitools import aki_for, pem

pytestmark = pytest.mark.asyncio(loop_scope="session")

SEARCH = "/services/certificatesearch"
RETRIEVE = "/services/retrievecertificate"


def post(base: str, path: str, body: bytes | str, *, key: str | None = TEST_KEY,
         headers: dict[str, str] | None = None, method: str = "POST",
         ca: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request as DCC Boxed's client sends it (blocking: call through to_thread)."""
    url = base + path + (f"?apikey={key}" if key is not None else "")
    return http_get(url, {"Content-Type": "application/xml", **(headers or {})}, method, ca,
                    body.encode() if isinstance(body, str) else body)


async def apost(base: str, path: str, body: bytes | str, **kw: Any) -> tuple[int, dict[str, str],
                                                                               ET.Element]:
    status, headers, raw = await asyncio.to_thread(post, base, path, body, **kw)
    return status, headers, ET.fromstring(raw)


def search_body(eui: str, device: bool = True) -> str:
    field = "CertificateSubjectAltName" if device else "CertificateSubjectName"
    return (f'<?xml version="1.0" encoding="utf-8"?><CertificateSearchRequest><{field}>{eui}'
            f"</{field}></CertificateSearchRequest>")


def retrieve_body(serial: str) -> str:
    return (f'<?xml version="1.0" encoding="utf-8"?><CertificateDataRequest><CertificateSerial>'
            f"{serial}</CertificateSerial></CertificateDataRequest>")


def results(root: ET.Element) -> list[dict[str, str]]:
    return [{c.tag: c.text or "" for c in r} for r in root.findall("Result")]


def check_header(root: ET.Element, code: int) -> str:
    assert root.findtext("ResponseCode") == str(code)
    ref = root.findtext("AuditReference")
    assert ref
    return ref


# -- answers --------------------------------------------------------------------------------
async def test_search_device_any_spelling_and_retrieve(loaded: Running) -> None:
    dev = loaded.objects("device")[0]
    eui = dev["eui64"]
    siblings = {o["serial"]: o for o in loaded.objects("device") if o["eui64"] == eui}
    assert len(siblings) == 2
    raw = parse_eui64(eui).hex()
    for spelling in (eui.lower(), eui, raw, raw.upper(), eui.replace("-", ":")):
        status, headers, root = await apost(loaded.http, SEARCH, search_body(spelling))
        assert status == 200, ET.tostring(root)
        assert headers["content-type"] == "application/xml; charset=utf-8"
        assert root.tag == "CertificateSearchResponse"
        assert root.findtext("ResponseMessage") == "Success"
        check_header(root, 200)
        found = results(root)
        assert {r["CertificateSerial"] for r in found} == set(siblings)
        for r in found:
            assert list(r) == ["CertificateSerial", "CertificateSubjectAltName", "CertificateStatus",
                               "CertificateUsage", "ManufacturingFlag"]
            assert r["CertificateSubjectAltName"] == eui
            assert r["CertificateStatus"] == "I"
            assert r["CertificateUsage"] == siblings[r["CertificateSerial"]]["usage"]
            assert r["ManufacturingFlag"] == "false"
    # retrieve: lower case, unpadded, as the client sends it; base64 DER without armour
    der = _device_der(loaded, dev)
    unpadded = format(int(dev["serial"], 16), "x")
    for spelling in (unpadded, dev["serial"], "00" + dev["serial"].lower()):
        status, _, root = await apost(loaded.http, RETRIEVE, retrieve_body(spelling))
        assert status == 200
        assert root.tag == "CertificateDataResponse"
        check_header(root, 200)
        cert = root.find("CertificateResponse")
        assert cert is not None
        body = cert.findtext("CertificateBody") or ""
        assert "BEGIN" not in body and base64.b64decode(body, validate=True) == der
        assert cert.findtext("CertificateSerial") == dev["serial"]
        assert cert.findtext("CertificateSubjectAltName") == eui
        assert cert.findtext("CertificateUsage") == dev["usage"]


def _device_der(running: Running, dev: dict[str, Any]) -> bytes:
    from repository_server.pki.pem import load_pem_or_der_certificates

    bundle = load_pem_or_der_certificates(running.path(dev["path"]).read_bytes())
    return bundle[dev["index"]]


async def test_search_organisation_with_roles(loaded: Running) -> None:
    org = next(o for o in loaded.objects("organisation") if o["role"] == 2)
    mine = {o["serial"]: o for o in loaded.objects("organisation") if o["eui64"] == org["eui64"]}
    status, _, root = await apost(loaded.http, SEARCH, search_body(org["eui64"].lower(), False))
    assert status == 200
    found = results(root)
    assert {r["CertificateSerial"] for r in found} == set(mine)
    for r in found:
        assert list(r) == ["CertificateSerial", "CertificateSubjectName", "CertificateStatus",
                           "CertificateRole", "CertificateUsage", "ManufacturingFlag"]
        assert r["CertificateRole"] == "2" and r["CertificateSubjectName"] == org["eui64"]
    # an organisation EUI searched as a device (and the reverse) finds nothing
    status, _, root = await apost(loaded.http, SEARCH, search_body(org["eui64"], True))
    assert status == 402
    dev = loaded.objects("device")[0]
    status, _, root = await apost(loaded.http, SEARCH, search_body(dev["eui64"], False))
    assert status == 402


async def test_https_and_audit_references_are_unique(loaded: Running) -> None:
    dev = loaded.objects("device")[1]
    refs = set()
    for base, ca in ((loaded.http, None), (loaded.https, loaded.tls_ca)):
        for _ in range(5):
            status, _, root = await apost(base, SEARCH, search_body(dev["eui64"]), ca=ca)
            assert status == 200
            refs.add(check_header(root, 200))
        status, _, root = await apost(base, SEARCH, search_body("00-00-00-00-00-00-00-01"), ca=ca)
        refs.add(check_header(root, 402))
    assert len(refs) == 12


# -- errors ---------------------------------------------------------------------------------
async def test_not_found_is_402(loaded: Running) -> None:
    status, headers, root = await apost(loaded.http, SEARCH, search_body("00-00-00-00-00-00-00-01"))
    assert status == 402 and headers["content-type"] == "application/xml; charset=utf-8"
    check_header(root, 402)
    assert "00-00-00-00-00-00-00-01" in (root.findtext("ResponseMessage") or "")
    assert not root.findall("Result")
    status, _, root = await apost(loaded.http, RETRIEVE, retrieve_body("abcdef0123"))
    assert status == 402 and root.tag == "CertificateDataResponse"
    assert "ABCDEF0123" in (root.findtext("ResponseMessage") or "")


@pytest.mark.parametrize(("path", "body", "reason"), [
    (SEARCH, "<CertificateSearchRequest><CertificateSubjectAltName>00-db", "malformed XML"),
    (SEARCH, "", "empty request body"),
    (SEARCH, "not xml at all", "malformed XML"),
    (SEARCH, "<CertificateDataRequest><CertificateSerial>01</CertificateSerial>"
             "</CertificateDataRequest>", "expected root element <CertificateSearchRequest>"),
    (SEARCH, "<CertificateSearchRequest></CertificateSearchRequest>", "exactly one of"),
    (SEARCH, "<CertificateSearchRequest><CertificateSubjectName>00-DB-12-34-56-78-90-A4"
             "</CertificateSubjectName><CertificateSubjectAltName>00-DB-12-34-56-78-90-A4"
             "</CertificateSubjectAltName></CertificateSearchRequest>", "not both"),
    (SEARCH, search_body("00-db-12-34"), "CertificateSubjectAltName: EUI-64 must be 16 hex"),
    (SEARCH, search_body("zz-db-12-34-56-78-90-a4"), "EUI-64 must be 16 hex digits"),
    (SEARCH, "<CertificateSearchRequest><Colour>red</Colour></CertificateSearchRequest>",
     "unexpected element <Colour>"),
    (SEARCH, "<CertificateSearchRequest><CertificateSubjectAltName>00-DB-12-34-56-78-90-A4"
             "</CertificateSubjectAltName><CertificateSubjectAltName>00-DB-12-34-56-78-90-A4"
             "</CertificateSubjectAltName></CertificateSearchRequest>", "more than once"),
    (RETRIEVE, "<CertificateDataRequest></CertificateDataRequest>", "<CertificateSerial> is missing"),
    (RETRIEVE, retrieve_body("not-a-serial"), "CertificateSerial: serial must be hexadecimal"),
    (RETRIEVE, retrieve_body("1" * 60), "longer than 20 octets"),
    (RETRIEVE, search_body("00-db-12-34-56-78-90-a4"), "expected root element"),
])
async def test_invalid_requests_are_401_naming_the_problem(loaded: Running, path: str, body: str,
                                                          reason: str) -> None:
    status, headers, root = await apost(loaded.http, path, body)
    assert status == 401, ET.tostring(root)
    assert headers["content-type"] == "application/xml; charset=utf-8"
    check_header(root, 401)
    assert reason in (root.findtext("ResponseMessage") or ""), root.findtext("ResponseMessage")


async def test_hostile_xml_is_refused_cheaply(loaded: Running) -> None:
    laughs = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
              + "".join(f'<!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10 if i else "&lol;" * 10}">'
                        for i in range(10))
              + ']><CertificateSearchRequest><CertificateSubjectAltName>&lol9;'
                "</CertificateSubjectAltName></CertificateSearchRequest>")
    xxe = ('<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
           "<CertificateSearchRequest><CertificateSubjectAltName>&x;</CertificateSubjectAltName>"
           "</CertificateSearchRequest>")
    external_dtd = ('<?xml version="1.0"?><!DOCTYPE r SYSTEM "http://127.0.0.1:9/evil.dtd">'
                    "<CertificateSearchRequest/>")
    param_entity = ('<?xml version="1.0"?><!DOCTYPE r [<!ENTITY % p SYSTEM "file:///etc/passwd">'
                    "%p;]><CertificateSearchRequest/>")
    for body in (laughs, xxe, external_dtd, param_entity):
        started = time.perf_counter()
        status, _, raw = await asyncio.to_thread(post, loaded.http, SEARCH, body)
        elapsed = time.perf_counter() - started
        root = ET.fromstring(raw)
        assert status == 401, raw
        assert "document type declaration" in (root.findtext("ResponseMessage") or "")
        assert b"root:" not in raw and b"lollol" not in raw
        assert elapsed < 2  # not a timing target: a guard against expansion
    # a body over the cap (declared or not) is refused before parsing
    big = search_body("00-db-12-34-56-78-90-a4").replace("<CertificateSearchRequest>",
                                                         "<CertificateSearchRequest>" + " " * 9000)
    status, _, root = await apost(loaded.http, SEARCH, big)
    assert status == 401 and "exceeds the limit of 8192" in (root.findtext("ResponseMessage") or "")

    def chunked() -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", loaded.repo.bound["http"].port, timeout=10)
        conn.request("POST", f"{SEARCH}?apikey={TEST_KEY}", body=iter([big.encode()]),
                     encode_chunked=True, headers={"Transfer-Encoding": "chunked"})
        resp = conn.getresponse()
        return resp.status, resp.read()

    status, raw = await asyncio.to_thread(chunked)
    assert status == 401 and b"exceeds the limit" in raw
    # the server is fine afterwards
    dev = loaded.objects("device")[0]
    status, _, _ = await apost(loaded.http, SEARCH, search_body(dev["eui64"]))
    assert status == 200


async def test_api_keys(loaded: Running) -> None:
    dev = loaded.objects("device")[0]
    body = search_body(dev["eui64"])
    status, _, root = await apost(loaded.http, SEARCH, body, key=None)
    assert status == 403 and "API key is required" in (root.findtext("ResponseMessage") or "")
    check_header(root, 403)
    status, _, root = await apost(loaded.http, SEARCH, body, key="wrong-key-123")
    assert status == 403 and "unknown or disabled" in (root.findtext("ResponseMessage") or "")
    status, _, root = await apost(loaded.http, RETRIEVE, retrieve_body(dev["serial"]), key=None)
    assert status == 403 and root.tag == "CertificateDataResponse"
    # a key check comes before the body is looked at
    status, _, _ = await apost(loaded.http, SEARCH, "garbage", key=None)
    assert status == 403
    # disabling a user (as `users disable` does, through the store and NOTIFY) stops its key
    from repository_server.cli import admin

    repo = loaded.repo
    assert repo.store is not None
    await add_user(repo, "short-lived", "short-lived-key-1")
    status, _, _ = await apost(loaded.http, SEARCH, body, key="short-lived-key-1")
    assert status == 200
    await admin.users_disable(repo.store, "short-lived")
    for _ in range(100):  # the server hears of it through LISTEN/NOTIFY
        status, _, _ = await apost(loaded.http, SEARCH, body, key="short-lived-key-1")
        if status == 403:
            break
        await asyncio.sleep(0.05)
    assert status == 403
    # a new key replaces the old one
    out = await admin.users_apikey(repo.store, "tester")
    new_key = out.rsplit(" ", 1)[1]
    for _ in range(100):
        status, _, _ = await apost(loaded.http, SEARCH, body, key=TEST_KEY)
        if status == 403:
            break
        await asyncio.sleep(0.05)
    assert status == 403
    status, _, _ = await apost(loaded.http, SEARCH, body, key=new_key)
    assert status == 200
    # keys are stored only as hashes
    rows = await repo.store.pool.fetch("SELECT * FROM users")
    for r in rows:
        assert new_key.encode() not in repr(dict(r)).encode()
        assert "short-lived-key-1" not in repr(dict(r))


async def test_wrong_method_and_not_post(loaded: Running) -> None:
    status, _, raw = await asyncio.to_thread(post, loaded.http, SEARCH, b"", method="GET")
    assert status == 405 and b"use POST" in raw


async def test_downloads_need_a_key_for_end_entity_certificates(loaded: Running) -> None:
    dev = loaded.objects("device")[0]
    org = loaded.objects("organisation")[0]
    ca = loaded.objects("ca")[0]
    for obj in (dev, org):
        url = f"{loaded.http}/certificates/{obj['serial']}"
        status, _, body = await asyncio.to_thread(http_get, url)
        assert status == 403 and b"API key" in body
        status, _, _ = await asyncio.to_thread(http_get, f"{url}?apikey={TEST_KEY}")
        assert status == 200
        status, _, _ = await asyncio.to_thread(http_get, url, {"X-API-Key": TEST_KEY})
        assert status == 200
        status, _, _ = await asyncio.to_thread(http_get, f"{url}?apikey=nope-nope")
        assert status == 403
        # other parameters next to the key still count (the cached fast path must not skip them)
        status, _, body = await asyncio.to_thread(
            http_get, f"{url}?apikey={TEST_KEY}&issuer=0102030405060708")
        assert status == 404 and b"from issuer" in body
        status, _, _ = await asyncio.to_thread(
            http_get, f"{url}?issuer={obj['issuer_key_id']}&apikey={TEST_KEY}")
        assert status == 200
    # CA certificates, CRLs and documents need none
    status, _, _ = await asyncio.to_thread(http_get, f"{loaded.http}/certificates/{ca['serial']}")
    assert status == 200
    crl = loaded.objects("crl")[0]
    status, _, _ = await asyncio.to_thread(http_get, f"{loaded.http}/crls/{crl['issuer_key_id']}.crl")
    assert status == 200
    status, _, _ = await asyncio.to_thread(http_get, f"{loaded.http}/documents")
    assert status == 200


async def test_open_reads(tmp_path: Path, pki: dict[str, Any], fresh_db: str) -> None:
    repo = await start_repository(tmp_path, pki, fresh_db, web={"open_reads": True})
    try:
        running = Running(repo, pki)
        from tests.conftest import lodge_pki

        await asyncio.to_thread(lodge_pki, running)
        dev = running.objects("device")[0]
        status, _, root = await apost(running.http, SEARCH, search_body(dev["eui64"]), key=None)
        assert status == 200 and len(results(root)) == 2
        status, _, _ = await asyncio.to_thread(
            http_get, f"{running.http}/certificates/{dev['serial']}")
        assert status == 200
    finally:
        await repo.stop()


# -- statuses -------------------------------------------------------------------------------
def _org_cert(running: Running, eui: bytes, *, not_after: dt.datetime,
              usage: str = "DS") -> x509.Certificate:
    """An organisation certificate in the GB profile, issued by the test PKI's issuing OCA."""
    oca, oca_key = running.ca("issuing-oca")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, "TESTSTATUS"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "02"),
        x509.NameAttribute(NameOID.X500_UNIQUE_IDENTIFIER, b"\x00" + eui, _ASN1Type.BitString),
    ])
    ku = dict.fromkeys(("digital_signature", "content_commitment", "key_encipherment",
                        "data_encipherment", "key_agreement", "key_cert_sign", "crl_sign",
                        "encipher_only", "decipher_only"), False)
    ku["digital_signature" if usage == "DS" else "key_agreement"] = True
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(oca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_after - dt.timedelta(days=400)).not_valid_after(not_after)
            .add_extension(x509.KeyUsage(**ku), critical=True)
            .add_extension(x509.CertificatePolicies([x509.PolicyInformation(
                x509.ObjectIdentifier("1.2.826.0.1.8641679.1.2.1.1"), None)]), critical=True)
            .add_extension(x509.SubjectKeyIdentifier(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest[:8]),
                critical=False)
            .add_extension(aki_for(oca), critical=False)
            .sign(oca_key, hashes.SHA256()))


async def test_statuses_r_e_p_i_n(loaded: Running) -> None:
    client = loaded.client()
    eui = bytes.fromhex("90B3D51F30FFEE01")
    now = dt.datetime.now(dt.UTC)
    expired = _org_cert(loaded, eui, not_after=now - dt.timedelta(days=2))
    pending = _org_cert(loaded, eui, not_after=now + dt.timedelta(days=300))
    later = _org_cert(loaded, eui, not_after=now + dt.timedelta(days=300), usage="KA")
    try:
        for cert, status in ((expired, "I"), (pending, "P"), (later, "I")):
            reply = await asyncio.to_thread(client.certificates, pem(cert), status=status)
            assert reply.status == 200, reply.body
        eui_text = "90-B3-D5-1F-30-FF-EE-01"
        def serial(cert: x509.Certificate) -> str:  # as answered: whole octets, upper case
            text = format(cert.serial_number, "X")
            return text.rjust(len(text) + len(text) % 2, "0")

        expected = {serial(expired): "E", serial(pending): "P", serial(later): "I"}

        async def statuses() -> dict[str, str]:
            status, _, root = await apost(loaded.http, SEARCH, search_body(eui_text, False))
            assert status == 200
            return {r["CertificateSerial"]: r["CertificateStatus"] for r in results(root)}

        assert await statuses() == expected
        # the DCC sets N through the lodging API: the answer changes at once
        later_serial = next(k for k, v in expected.items() if v == "I")
        reply = await asyncio.to_thread(client.status, later_serial, {"status": "N"})
        assert reply.status == 200, reply.body
        expected[later_serial] = "N"
        assert await statuses() == expected
        # retrieve reports the same
        status, _, root = await apost(loaded.http, RETRIEVE, retrieve_body(later_serial.lower()))
        assert root.findtext("CertificateResponse/CertificateStatus") == "N"
        # R: on the issuer's current CRL (the test PKI revokes some organisation certificates)
        revoked = next(o for o in loaded.objects("organisation") if o["revoked"])
        status, _, root = await apost(loaded.http, RETRIEVE, retrieve_body(revoked["serial"]))
        assert root.findtext("CertificateResponse/CertificateStatus") == "R"
        status, _, root = await apost(loaded.http, SEARCH, search_body(revoked["eui64"], False))
        got = {r["CertificateSerial"]: r["CertificateStatus"] for r in results(root)}
        assert got[revoked["serial"]] == "R"
        assert set(got.values()) <= {"R", "I"}
        # a new CRL that revokes one more: its status turns R once the CRL is lodged
        reply = await asyncio.to_thread(client.crl, loaded.next_oca_crl(2, pending.serial_number))
        assert reply.status == 200, reply.body
        expected[serial(pending)] = "R"
        assert await statuses() == expected
    finally:
        client.close()
