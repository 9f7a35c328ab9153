"""The HTTP read surface under hostile or careless input (issue 14, items 5 and 6): lodged
documents are never served as active content, parameters that overflow give 400/404 (never a
5xx or a traceback), keyed answers are not cacheable by shared caches, and a wrong API key is
named as such. Real server, real sockets; curl where a header's exact bytes matter."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from repository_server.lodging.service import Actor
from tests.conftest import TEST_KEY, Running, http_get, running_repository

pytestmark = pytest.mark.asyncio(loop_scope="session")
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")


async def aget(url: str, key: str | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    headers = dict(headers or {})
    if key is not None:
        headers["X-API-Key"] = key
    return await asyncio.to_thread(http_get, url, headers=headers)


def curl_headers(url: str) -> dict[str, str]:
    """The response headers curl receives, as curl prints them (names lower-cased)."""
    out = subprocess.run(["curl", "-sS", "-D", "-", "-o", "/dev/null", url], check=True,
                         capture_output=True, timeout=30).stdout.decode("latin-1")
    headers = {}
    for line in out.split("\r\n")[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return headers


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.exc_info is not None or r.levelno >= logging.ERROR]


# -- 1. documents are downloads, never active content ------------------------------------------
@needs_curl
async def test_documents_are_attachments_with_safe_types(loaded: Running) -> None:
    client = loaded.client()
    lodged: dict[str, dict[str, Any]] = {}
    try:
        for name, declared, body in [
            ("evil-html", "text/html", b"<script>alert(document.cookie)</script>"),
            ("evil-svg", "image/svg+xml", b"<svg xmlns='http://www.w3.org/2000/svg'"
                                          b" onload='alert(1)'/>"),
            ("hostile", 'application/pdf; x="a"; text/html', b"%PDF-1.4 not really"),
            ("notes", "text/plain; charset=UTF-8", b"plain notes"),
            ("notes-bad-charset", 'text/plain; charset="utf-8\\"; boundary=x"', b"notes"),
            ("policy", "application/pdf; charset=utf-8", b"%PDF-1.4"),
            ("sheet", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
             b"PK\x03\x04"),
            ("shouting", "APPLICATION/ZIP", b"PK\x03\x04"),
        ]:
            reply = await asyncio.to_thread(client.document, name, body, declared)
            assert reply.status == 200, reply.body
            lodged[name] = reply.body
    finally:
        client.close()
    assert lodged["evil-html"]["content_type"] == "application/octet-stream"
    assert lodged["evil-svg"]["content_type"] == "application/octet-stream"
    assert lodged["hostile"]["content_type"] == "application/pdf"
    assert lodged["notes"]["content_type"] == "text/plain; charset=utf-8"
    assert lodged["notes-bad-charset"]["content_type"] == "text/plain"
    assert lodged["policy"]["content_type"] == "application/pdf"
    assert lodged["shouting"]["content_type"] == "application/zip"

    expected = {"evil-html": ("application/octet-stream", "evil-html.bin"),
                "evil-svg": ("application/octet-stream", "evil-svg.bin"),
                "hostile": ("application/pdf", "hostile.pdf"),
                "notes": ("text/plain; charset=utf-8", "notes.txt"),
                "sheet": ("application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
                          "sheet.xlsx"),
                "shouting": ("application/zip", "shouting.zip")}
    for name, (content_type, filename) in expected.items():
        for path in (f"/documents/{name}", f"/documents/{name}/1"):
            headers = await asyncio.to_thread(curl_headers, loaded.http + path)
            assert headers["content-type"] == content_type, (path, headers)
            assert headers["content-disposition"] == f'attachment; filename="{filename}"'
            assert headers["x-content-type-options"] == "nosniff"
            assert headers["content-security-policy"] == "sandbox"
    # the listing says what a download will be
    status, _, body = await aget(loaded.http + "/documents")
    types = {d["name"]: d["content_type"] for d in json.loads(body)}
    assert status == 200 and types["evil-html"] == "application/octet-stream"
    # the test PKI's PDFs keep their type and get their extension once
    name = loaded.objects("document")[0]["name"]
    headers = await asyncio.to_thread(curl_headers, f"{loaded.http}/documents/{name}")
    assert headers["content-disposition"] == f'attachment; filename="{name}.pdf"'


@needs_curl
async def test_documents_stored_before_the_check_are_served_safely(server: Running) -> None:
    """Types stored by an earlier version (no check then) are made safe when served: the
    decision is taken at serving too, not only at lodging."""
    repo = server.repo
    assert repo.store is not None and repo.catalog is not None
    seq = 0
    for name, content_type in [("legacy", "text/html"),
                               ("injected", "text/plain; charset=utf-8\r\nX-Injected: 1"),
                               ("legacy-notes", "TEXT/PLAIN;charset=latin-1")]:
        body = b"<script>alert(1)</script>"
        _, _, seq, _ = await repo.store.insert_document(
            name, content_type, body, hashlib.sha256(body).digest(), lodged_by="earlier",
            audit=Actor("earlier", None, None).audit("lodge.document", "ok", name, {}))
    await repo.catalog.synced(seq)
    for name, content_type, filename in [
            ("legacy", "application/octet-stream", "legacy.bin"),
            ("injected", "text/plain", "injected.txt"),
            ("legacy-notes", "text/plain; charset=latin-1", "legacy-notes.txt")]:
        headers = await asyncio.to_thread(curl_headers, f"{server.http}/documents/{name}")
        assert headers["content-type"] == content_type, headers
        assert headers["content-disposition"] == f'attachment; filename="{filename}"'
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["content-security-policy"] == "sandbox"
        assert "x-injected" not in headers


# -- 6. parameters that overflow or do not parse ----------------------------------------------
async def test_every_parameter_out_of_range_is_a_4xx_with_a_reason(
        loaded: Running, caplog: pytest.LogCaptureFixture) -> None:
    from tests.conftest import add_user

    await add_user(loaded.repo, "ops", "ops-key-7d1e0a9b44", role="operator")
    caplog.set_level(logging.WARNING)
    doc = loaded.objects("document")[0]["name"]
    crl_key = "00" * 20
    paths = [
        f"/documents/{doc}/99999999999999999999",
        f"/documents/{doc}/4294967296",
        f"/documents/{doc}/%C2%B2",  # a digit to str.isdigit, not to int()
        f"/documents/{doc}/%D9%A1",  # ARABIC-INDIC DIGIT ONE
        "/documents/" + "a" * 600,
        "/documents/" + "a" * 600 + "/versions",
        "/documents/" + "a" * 600 + "/1",
        "/documents/a%00b",
        f"/crls/{crl_key}/{'9' * 80}.crl",
        f"/crls/{crl_key}/%D9%A1.crl",
        "/certificates/-" + "F" * 1200,
        "/certificates/" + "0" * 1200 + "1",
        "/certificates/01?issuer=" + "A" * 4000,
        "/extracts/a%00b",
        "/extracts/..",
        "/ops/reports/cpm?month=%D9%A2%D9%A0%D9%A2%D9%A4-01",
        "/ops/reports/cpm?month=2024-01%0A",
        "/ops/reports/demand?day=99999-01-01",
        "/ops/reports/demand?day=%D9%A2%D9%A0%D9%A2%D9%A4-01-01",
    ]
    for path in paths:
        status, headers, body = await aget(loaded.http + path, key="ops-key-7d1e0a9b44")
        assert status in (400, 404), (path, status, body[:300])
        assert headers["content-type"].startswith("application/json"), path
        reason = json.loads(body)["reason"]
        assert reason and "\n" not in reason and "internal error" not in reason, (path, reason)
    assert tracebacks(caplog) == []


async def test_malformed_request_is_one_log_line_not_a_traceback(
        server: Running, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    port = server.repo.bound["http"].port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nIf-None-Match: a\x01b\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.split(b" ")[1] == b"400", answer[:200]
    assert tracebacks(caplog) == []
    lines = [r.getMessage() for r in caplog.records if "malformed HTTP request" in r.getMessage()]
    assert len(lines) == 1 and "127.0.0.1" in lines[0] and "\n" not in lines[0], lines


# -- 6. keyed answers are private ---------------------------------------------------------------
async def test_keyed_answers_are_private_and_public_ones_public(loaded: Running) -> None:
    from tests.test_extracts import produce

    org = loaded.objects("organisation")[0]
    serial = org["serial"]
    base = loaded.http
    # the fast path (DER, unconditional) and the full one (PEM, conditional, 304)
    for headers in ({}, {"Accept": "application/x-pem-file"}):
        status, got, _ = await aget(f"{base}/certificates/{serial}", TEST_KEY, headers)
        assert status == 200
        cache = got["cache-control"]
        assert cache.startswith("private") and "public" not in cache, cache
        assert "immutable" in cache
        status, again, _ = await aget(f"{base}/certificates/{serial}", TEST_KEY,
                                      {**headers, "If-None-Match": got["etag"]})
        assert status == 304 and again["cache-control"].startswith("private")
    status, got, _ = await aget(f"{base}/certificates/{serial}.pem", TEST_KEY)
    assert status == 200 and got["cache-control"].startswith("private")
    # CA certificates need no key: a shared cache may keep them
    root = loaded.objects("root")[0]
    status, got, _ = await aget(f"{base}/certificates/{root['serial']}", TEST_KEY)
    assert status == 200 and got["cache-control"].startswith("public")
    # extracts need a key too
    path = await produce(loaded, "full")
    status, got, _ = await aget(f"{base}/extracts/{path.name}", TEST_KEY)
    assert status == 200 and got["cache-control"].startswith("private"), got
    status, got, _ = await aget(f"{base}/extracts", TEST_KEY)
    assert status == 200 and "public" not in got["cache-control"]
    assert "private" in got["cache-control"]


async def test_open_reads_keeps_certificates_public(tmp_path: Path, pki: dict[str, Any],
                                                     fresh_db: str) -> None:
    async with running_repository(tmp_path, pki, fresh_db, lodge=True,
                                  web={"open_reads": True}) as running:
        serial = running.objects("organisation")[0]["serial"]
        for path in (f"/certificates/{serial}", f"/certificates/{serial}.pem"):
            status, got, _ = await aget(running.http + path)
            assert status == 200 and got["cache-control"].startswith("public"), got


# -- 6. a wrong key is named as such -------------------------------------------------------------
async def test_wrong_api_key_is_not_called_missing(loaded: Running) -> None:
    serial = loaded.objects("device")[0]["serial"]
    for path in (f"/certificates/{serial}", f"/certificates/{serial}.pem", "/extracts",
                 "/extracts/full-x.tar.gz"):
        status, _, body = await aget(loaded.http + path, key="not-a-key-0000000")
        assert status == 403, (path, body)
        assert json.loads(body)["reason"].startswith("unknown or disabled API key"), body
        status, _, body = await aget(f"{loaded.http}{path}?apikey=not-a-key-0000000")
        assert status == 403 and "unknown or disabled API key" in json.loads(body)["reason"]
        status, _, body = await aget(loaded.http + path)
        assert status == 403, (path, body)
        assert json.loads(body)["reason"].startswith("an API key is required"), body


async def test_portal_downloads_and_crl_pages_take_the_same_care(
        loaded: Running, caplog: pytest.LogCaptureFixture) -> None:
    from tests.portal_client import PortalClient

    caplog.set_level(logging.WARNING)
    client = loaded.client()
    try:
        reply = await asyncio.to_thread(client.document, "portal-evil", b"<script>1</script>",
                                        "text/html; charset=utf-8")
        assert reply.status == 200 and reply.body["content_type"] == "application/octet-stream"
    finally:
        client.close()
    key = json.loads((await aget(loaded.http + "/crls"))[2])[0]["issuer_key_id"]
    async with PortalClient(loaded.http) as c:
        await c.ready(loaded, "mallory", "a long enough passphrase 7")
        page = await c.get("/portal/documents")
        assert "portal-evil" in page.text and "text/html" not in page.text
        got = await c.get("/portal/download/documents/portal-evil/1")
        assert got.status == 200 and got.headers["content-type"] == "application/octet-stream"
        assert got.headers["content-disposition"] == 'attachment; filename="portal-evil.bin"'
        assert got.headers["x-content-type-options"] == "nosniff"
        assert got.headers["content-security-policy"] == "sandbox"
        for query in ("number=%C2%B2", "page=%C2%B2", "number=%D9%A1", "number=" + "9" * 59):
            r = await c.get(f"/portal/crls/{key}?{query}")
            assert r.status in (200, 404), (query, r.status)
        r = await c.get("/portal/download/documents/portal-evil/99999999999999999999")
        assert r.status == 404
    assert tracebacks(caplog) == []


async def test_document_types_and_names_without_a_server() -> None:
    """web/doctypes on its own: the allow-list, charsets, and a name the store could not hold
    today (its CHECK constraint) still quoted safely, with an RFC 6266 filename*."""
    from repository_server import doctypes

    assert doctypes.safe_type(" Text/XML ; Charset=\"ISO-8859-1\" ") == "text/xml; charset=iso-8859-1"
    assert doctypes.safe_type("application/xml; charset=utf-8; x=y") == "application/xml; charset=utf-8"
    assert doctypes.safe_type("application/zip; charset=utf-8") == "application/zip"
    assert doctypes.safe_type("text/plain; charset=") == "text/plain"
    for hostile in ("text/html", "image/svg+xml", "application/xhtml+xml", "text/javascript",
                    "", ";", "application/pdf\r\nSet-Cookie: a=b", "multipart/form-data"):
        got = doctypes.safe_type(hostile)
        assert got in ("application/octet-stream", "application/pdf"), (hostile, got)
        assert "\r" not in got and "\n" not in got
    assert doctypes.disposition("policy.PDF", "application/pdf") == 'attachment; filename="policy.PDF"'
    assert doctypes.disposition("r", "text/plain; charset=utf-8") == 'attachment; filename="r.txt"'
    assert doctypes.disposition('Q3 "report"\r\né', "application/pdf") == (
        "attachment; filename=\"Q3__report____.pdf\";"
        " filename*=UTF-8''Q3%20%22report%22%0D%0A%C3%A9.pdf")
    assert doctypes.is_document_name("a" * 200) and not doctypes.is_document_name("a" * 201)
    assert not doctypes.is_document_name("name\n") and not doctypes.is_document_name(".hidden")


async def test_other_methods_on_a_served_path_are_405_with_allow(server: Running) -> None:
    for method, path, allow in [("DELETE", "/crls", "GET, HEAD"),
                                ("POST", "/documents/x/1", "GET, HEAD"),
                                ("PUT", "/certificates/01", "GET, HEAD"),
                                ("GET", "/services/certificatesearch", "POST")]:
        status, headers, _ = await asyncio.to_thread(http_get, server.http + path, method=method)
        assert status == 405 and headers.get("allow") == allow, (method, path, status, headers)
    status, headers, body = await aget(server.http + "/no/such/thing")
    assert status == 404 and "allow" not in headers and json.loads(body)["reason"]
