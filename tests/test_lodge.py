"""The lodging listener over real mutual TLS: who may write, and what is accepted."""

from __future__ import annotations

import asyncio
import datetime as dt
import http.client
import json
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from repository_server.pki.certificates import parse_certificate
from repository_server.pki.pem import load_pem_or_der_certificates
from tests.conftest import REALDATA, Running, client_ssl, http_get, lodge_pki
from tests.pkitools import client_cert, crl, load_cert, load_key, pem, self_signed_ca, tamper, write_pair

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _attempt(running: Running, cert: tuple[str, str] | None, **ctx_opts: Any) -> int | str:
    """GET /lodge/whoami with this client certificate: HTTP status, or the error's name."""
    ctx = client_ssl(running, cert)
    for key, value in ctx_opts.items():
        if key == "ciphers":
            ctx.set_ciphers(value)
        else:
            setattr(ctx, key, value)
    port = running.repo.bound["lodge"].port
    conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=10)
    try:
        conn.request("GET", "/lodge/whoami")
        return conn.getresponse().status
    except (ssl.SSLError, OSError) as exc:
        return type(exc).__name__
    finally:
        conn.close()


async def _refusals(running: Running, count: int) -> list[dict[str, Any]]:
    assert running.repo.store is not None
    for _ in range(50):
        rows = [r for r in await running.repo.store.audit_entries()
                if r["action"] == "lodge.refused"]
        if len(rows) >= count:
            return rows
        await asyncio.sleep(0.1)
    return rows


async def test_refusal_matrix(server: Running, tmp_path: Path) -> None:
    assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")  # as in production
    dcc_subject = x509.Name.from_rfc4514_string(server.pki["dcc_client"]["subject"])
    ca_cert = load_cert(server.path(server.pki["dcc_client"]["ca"]))
    ca_key = load_key(server.path(server.pki["dcc_client"]["ca_key"]))
    other_ca, other_ca_key = self_signed_ca("Some Other CA")
    cases = {
        "no certificate": None,
        "self-signed": write_pair(tmp_path, "self", *client_cert(dcc_subject, None, None)),
        "other CA": write_pair(tmp_path, "other-ca",
                               *client_cert(dcc_subject, other_ca, other_ca_key)),
        "expired": write_pair(tmp_path, "expired",
                              *client_cert(dcc_subject, ca_cert, ca_key, expired=True)),
        "wrong identity": (str(server.path(server.pki["dcc_client"]["other_cert"])),
                           str(server.path(server.pki["dcc_client"]["other_key"]))),
    }
    outcomes = {name: await asyncio.to_thread(_attempt, server, cert)
                for name, cert in cases.items()}
    assert outcomes["wrong identity"] == 403
    for name in ("no certificate", "self-signed", "other CA", "expired"):
        assert outcomes[name] not in (200, 403), f"{name}: {outcomes[name]}"
    # the right certificate works
    assert await asyncio.to_thread(_attempt, server, server.client_cert) == 200
    # a refused handshake is counted (tls_refusals, see test_tls_listeners.py), not audited;
    # the refused request of an authenticated client is audited
    await server.repo.flush_refusals()
    assert server.repo.store is not None
    counted = {r["reason"]: r["count"] for r in await server.repo.store.pool.fetch(
        "SELECT reason, sum(count)::int8 AS count FROM tls_refusals WHERE listener = 'lodge'"
        " GROUP BY reason")}
    assert counted == {"no_certificate": 1, "unknown_ca": 2, "expired": 1}, counted
    rows = await _refusals(server, 1)
    assert len(rows) == 1 and "is not the DCC identity" in rows[0]["detail"]["reason"]
    assert rows[0]["outcome"] == "refused" and rows[0]["peer"]


async def test_only_ecdhe_aes_gcm(server: Running) -> None:
    outcome = await asyncio.to_thread(
        _attempt, server, server.client_cert, maximum_version=ssl.TLSVersion.TLSv1_2,
        ciphers="ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-AES128-SHA")
    assert outcome not in (200, 403)
    ok = await asyncio.to_thread(_attempt, server, server.client_cert,
                                 maximum_version=ssl.TLSVersion.TLSv1_2)
    assert ok == 200


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
async def test_curl_with_client_certificate(server: Running) -> None:
    cert, key = server.client_cert
    out = await asyncio.to_thread(subprocess.run, [
        "curl", "-sS", "--cacert", server.tls_ca, "--cert", cert, "--key", key,
        f"{server.lodge_url}/lodge/whoami"], capture_output=True, text=True, timeout=30)
    assert json.loads(out.stdout)["client"] == server.pki["dcc_client"]["subject"]
    out = await asyncio.to_thread(subprocess.run, [
        "curl", "-sS", "--cacert", server.tls_ca, f"{server.lodge_url}/lodge/whoami"],
        capture_output=True, text=True, timeout=30)
    assert out.returncode != 0  # no client certificate: the handshake fails


async def test_lodge_pki_then_again_is_noop(loaded: Running) -> None:
    store = loaded.repo.store
    assert store is not None
    count = await store.certificate_count()
    certs = [o for o in loaded.pki["objects"]
             if o["kind"] in ("root", "ca", "organisation", "device")]
    assert count == len(certs)
    # again: identical bytes are a no-op success
    await asyncio.to_thread(lodge_pki, loaded)
    assert await store.certificate_count() == count
    bundle = loaded.path(loaded.objects("device")[0]["path"]).read_bytes()
    reply = await asyncio.to_thread(lambda: loaded.client().certificates(bundle))
    assert reply.status == 200
    assert reply.body["stored"] == 0 and reply.body["identical"] == len(loaded.objects("device"))
    assert {r["outcome"] for r in reply.body["results"]} == {"identical"}


async def test_batch_with_one_bad_certificate_stores_nothing(server: Running) -> None:
    # CAs first, then a device batch whose last certificate has a broken signature
    ca_files = [server.path(o["path"]) for o in server.pki["objects"] if o["kind"] in ("root",)]
    client = server.client()
    for f in ca_files:
        assert (await asyncio.to_thread(client.certificates, f.read_bytes(),
                                        trust_anchor=True)).status == 200
    for o in server.objects("ca"):
        assert (await asyncio.to_thread(client.certificates,
                                        server.path(o["path"]).read_bytes())).status == 200
    ders = load_pem_or_der_certificates(server.path(server.objects("device")[0]["path"]).read_bytes())
    bad = tamper(ders[-1])
    body = b"".join(pem(x509.load_der_x509_certificate(d)) for d in ders[:-1]) + b"\n" + pem(
        x509.load_der_x509_certificate(bad))
    store = server.repo.store
    assert store is not None
    before = await store.certificate_count()
    reply = await asyncio.to_thread(client.certificates, body)
    assert reply.status == 422
    assert "nothing was stored" in reply.body["reason"]
    results = reply.body["results"]
    assert results[-1]["outcome"] == "refused" and "signature" in results[-1]["reason"]
    assert {r["outcome"] for r in results[:-1]} == {"not stored"}
    assert await store.certificate_count() == before
    # without the bad one the batch goes in
    good = await asyncio.to_thread(client.certificates, b"".join(
        pem(x509.load_der_x509_certificate(d)) for d in ders[:-1]))
    assert good.status == 200 and good.body["stored"] == len(ders) - 1
    client.close()


async def test_unknown_issuer_and_self_signed_refused(loaded: Running) -> None:
    client = loaded.client()
    device = next(REALDATA.glob("gbcs-parser/test/rtds/keystore/00db1234567890*-ds.pem"), None)
    if device is None:
        pytest.skip("realdata not available")
    reply = await asyncio.to_thread(client.certificates, device.read_bytes())
    assert reply.status == 422
    assert "is not in the repository" in reply.body["results"][0]["reason"]
    root, _ = self_signed_ca("Unexpected Root")
    reply = await asyncio.to_thread(client.certificates, pem(root))
    assert reply.status == 422 and "trust anchor" in reply.body["results"][0]["reason"]
    reply = await asyncio.to_thread(client.certificates, b"this is not a certificate")
    assert reply.status == 400 and reply.body["reason"]
    # a trust anchor must be a CA
    leaf = loaded.path(loaded.objects("organisation")[0]["path"]).read_bytes()
    reply = await asyncio.to_thread(client.certificates, leaf, trust_anchor=True)
    assert reply.status == 422
    client.close()


async def test_same_issuer_and_serial_is_a_conflict(loaded: Running) -> None:
    org = loaded.objects("organisation")[0]
    original = load_cert(loaded.path(org["path"]))
    issuer_obj = next(o for o in loaded.pki["objects"] if o.get("name") == "issuing-oca")
    issuer_key = load_key(loaded.path(issuer_obj["key"]))
    issuer = load_cert(loaded.path(issuer_obj["path"]))
    builder = (x509.CertificateBuilder().subject_name(original.subject)
               .issuer_name(issuer.subject).public_key(original.public_key())
               .serial_number(original.serial_number)
               .not_valid_before(original.not_valid_before_utc + dt.timedelta(seconds=1))
               .not_valid_after(original.not_valid_after_utc))
    for ext in original.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    twin = builder.sign(issuer_key, hashes.SHA256())
    client = loaded.client()
    reply = await asyncio.to_thread(client.certificates, pem(twin))
    assert reply.status == 409, reply.body
    assert reply.body["results"][0]["outcome"] == "conflict"
    rows = await loaded.repo.store.certificates_by_serial(org["serial"])  # type: ignore[union-attr]
    assert len(rows) == 1 and rows[0].der == original.public_bytes(serialization.Encoding.DER)
    client.close()


async def test_crl_rules(loaded: Running) -> None:
    issuer_obj = next(o for o in loaded.pki["objects"] if o.get("name") == "issuing-oca")
    issuer = load_cert(loaded.path(issuer_obj["path"]))
    key = load_key(loaded.path(issuer_obj["key"]))
    revoked = [int(o["serial"], 16) for o in loaded.objects("organisation")[:3]]
    client = loaded.client()

    def lodge(body: bytes) -> Any:
        return client.crl(body)

    two = crl(issuer, key, 2, revoked)
    reply = await asyncio.to_thread(lodge, two)
    assert reply.status == 200 and reply.body["outcome"] == "stored", reply.body
    assert reply.body["previous_crl_number"] == 1 and reply.body["kind"] == "crl"
    again = await asyncio.to_thread(lodge, two)
    assert again.status == 200 and again.body["outcome"] == "identical"
    equal = await asyncio.to_thread(lodge, crl(issuer, key, 2, revoked[:1]))
    assert equal.status == 409 and "not greater" in equal.body["reason"]
    rollback = await asyncio.to_thread(lodge, crl(issuer, key, 1, []))
    assert rollback.status == 409
    bad_sig = await asyncio.to_thread(lodge, tamper(crl(issuer, key, 3, revoked)))
    assert bad_sig.status == 422 and "signature" in bad_sig.body["reason"]
    stranger, stranger_key = self_signed_ca("Stranger CA")
    unknown = await asyncio.to_thread(lodge, crl(stranger, stranger_key, 5, []))
    assert unknown.status == 422 and "not a CA certificate in the repository" in unknown.body["reason"]
    no_number = await asyncio.to_thread(lodge, crl(issuer, key, None, []))
    assert no_number.status == 422 and "CRL number" in no_number.body["reason"]
    future = await asyncio.to_thread(lodge, crl(issuer, key, 4, [], this_update=dt.datetime.now(
        dt.UTC) + dt.timedelta(hours=2)))
    assert future.status == 422 and "future" in future.body["reason"]
    garbage = await asyncio.to_thread(lodge, b"\x30\x03\x02\x01")
    assert garbage.status == 400
    huge = await asyncio.to_thread(lodge, b"\x00" * (17 * 1024 * 1024))
    assert huge.status == 413
    # the current CRL is number 2, served over HTTP right after the acknowledgement
    key_id = reply.body["issuer_key_id"]
    status, _, body = await asyncio.to_thread(http_get, loaded.http + f"/crls/{key_id}.crl")
    assert status == 200 and body == two
    rows = [r for r in await loaded.repo.store.audit_entries()  # type: ignore[union-attr]
            if r["action"] == "lodge.crl"]
    assert {r["outcome"] for r in rows} >= {"ok", "noop", "refused", "conflict"}
    client.close()


async def test_documents_are_versioned(server: Running) -> None:
    client = server.client()
    one = await asyncio.to_thread(client.document, "SMKI-RAPP", b"version one", "text/plain")
    assert one.status == 200 and one.body["version"] == 1
    same = await asyncio.to_thread(client.document, "SMKI-RAPP", b"version one", "text/plain")
    assert same.body["outcome"] == "identical" and same.body["version"] == 1
    two = await asyncio.to_thread(client.document, "SMKI-RAPP", b"%PDF-1.4 two", "application/pdf")
    assert two.body["version"] == 2
    status, headers, body = await asyncio.to_thread(http_get, server.http + "/documents/SMKI-RAPP")
    assert status == 200 and body == b"%PDF-1.4 two" and headers["content-type"] == "application/pdf"
    status, headers, body = await asyncio.to_thread(http_get, server.http + "/documents/SMKI-RAPP/1")
    assert body == b"version one" and headers["content-type"].startswith("text/plain")
    status, _, body = await asyncio.to_thread(http_get, server.http + "/documents/SMKI-RAPP/versions")
    assert [v["version"] for v in json.loads(body)] == [2, 1]
    bad = await asyncio.to_thread(client.document, "../etc/passwd", b"x", "text/plain")
    assert bad.status in (400, 404)
    bad = await asyncio.to_thread(client.document, "has space", b"x", "text/plain")
    assert bad.status == 400 and "document name" in bad.body["reason"]
    client.close()


async def test_status_change_is_audited_with_officer(loaded: Running) -> None:
    device = loaded.objects("device")[0]
    client = loaded.client()
    reply = await asyncio.to_thread(client.status, device["serial"].lower().lstrip("0"),
                                    {"status": "N", "manufacturing_flag": True,
                                     "on_behalf_of": "officer 42"})
    assert reply.status == 200, reply.body
    assert reply.body["status"] == "N" and reply.body["manufacturing_flag"] is True
    entry = [r for r in await loaded.repo.store.audit_entries()  # type: ignore[union-attr]
             if r["action"] == "lodge.status"][-1]
    assert entry["on_behalf_of"] == "officer 42" and entry["object"] == device["serial"]
    missing = await asyncio.to_thread(client.status, "ABCDEF", {"status": "I"})
    assert missing.status == 404
    invalid = await asyncio.to_thread(client.status, device["serial"], {"status": "X"})
    assert invalid.status == 400 and "P, I or N" in invalid.body["reason"]
    invalid = await asyncio.to_thread(client.status, device["serial"], {"colour": "red"})
    assert invalid.status == 400 and "colour" in invalid.body["reason"]
    client.close()


async def test_lodged_certificate_columns(loaded: Running) -> None:
    store = loaded.repo.store
    assert store is not None
    device = loaded.objects("device")[0]
    rows = await store.pool.fetch("SELECT * FROM certificates WHERE serial = $1", device["serial"])
    assert len(rows) == 1
    row = rows[0]
    info = parse_certificate(row["der"])
    assert row["eui64"] == info.eui64 and row["usage"] == device["usage"]
    assert row["issuer_verified"] is True and row["lodged_by"] == loaded.pki["dcc_client"]["subject"]
    assert row["kind"] == "device" and row["status"] == "I"
    # nothing is ever deleted, and the audit is append-only
    import asyncpg

    with pytest.raises(asyncpg.RaiseError):
        await store.pool.execute("DELETE FROM certificates WHERE id = $1", row["id"])
    with pytest.raises(asyncpg.RaiseError):
        await store.pool.execute("UPDATE audit SET outcome = 'x'")


async def test_identity_by_eui64_and_role(pki: dict[str, Any]) -> None:
    """The DCC identity can also be an EUI-64 and a role (an organisation certificate)."""
    from repository_server.config import load
    from repository_server.listeners.lodge.app import Identity

    orgs = [o for o in pki["objects"] if o["kind"] == "organisation"]
    me, other = orgs[0], next(o for o in orgs if o["eui64"] != orgs[0]["eui64"])
    der = (pki["dir"] / me["path"]).read_bytes()
    other_der = (pki["dir"] / other["path"]).read_bytes()
    config = load(None, environ={}, overrides={"lodge": {
        "client_subject": "", "client_eui64": me["eui64"].lower().replace("-", ""),
        "client_role": me["role"]}})
    identity = Identity(config)
    assert identity.check(der)[1] is None
    assert "EUI-64" in (identity.check(other_der)[1] or "")
    wrong_role = Identity(load(None, environ={}, overrides={"lodge": {
        "client_subject": "", "client_eui64": me["eui64"], "client_role": (me["role"] + 1) % 256}}))
    assert "role" in (wrong_role.check(der)[1] or "")
