"""Command-line behaviour as operators use it: config errors, import, testpki, lodge."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from repository_server.config import ConfigError, load
from repository_server.pki.testpki import load_manifest
from tests.conftest import cli_env, smki_cli


def run(*args: str, env: dict[str, str] | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*smki_cli(), *args], capture_output=True, text=True, timeout=timeout,
                          env=env or cli_env())


def test_config_file_env_and_errors(tmp_path: Path) -> None:
    conf = tmp_path / "r.toml"
    conf.write_text('[listeners]\nhttp = "127.0.0.1:9999"\n[web]\nopen_reads = true\n')
    c = load(conf, environ={"SMKI_LISTENERS__HTTPS": "", "SMKI_BIN": "/x", "SMKI_CONFIG": "y"})
    assert c.listeners.http == "127.0.0.1:9999" and c.listeners.https == "" and c.web.open_reads
    cases: list[tuple[dict[str, Any] | str, str]] = [
        ('[listeners]\nhttp = "nonsense"\n', "listeners.http"),
        ("[lodge]\nmax_batch = 0\n", "lodge.max_batch"),
        ('[lodge]\nmax_batch = "many"\n', "lodge.max_batch"),
        ("[web]\nopen_reads = 3\n", "web.open_reads"),
        ("[listeners]\nnonsense = 1\n", "listeners.nonsense"),
        ('[database]\nurl = "mysql://x"\n', "database.url"),
        ('[lodge]\nclient_subject = "not a name"\n', "lodge.client_subject"),
        ("this is [not toml", "r.toml"),
    ]
    for text, setting in cases:
        conf.write_text(str(text))
        with pytest.raises(ConfigError, match=setting.replace(".", r"\.")):
            load(conf, environ={})
    with pytest.raises(ConfigError, match=r"lodge\.max_batch"):
        load(None, environ={"SMKI_LODGE__MAX_BATCH": "lots"})
    # and from the command line: exit 2 with the setting named, no traceback
    conf.write_text('[listeners]\nlodge = "127.0.0.1:99999"\n')
    res = run("serve", "--config", str(conf))
    assert res.returncode == 2
    assert "listeners.lodge" in res.stderr and "Traceback" not in res.stderr
    res = run("serve", "--data-dir", str(tmp_path / "empty"), "--http", "127.0.0.1:0",
              "--https", "127.0.0.1:0", "--lodge", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
              "--ldap", "", "--ldaps", "", "--sftp", "")  # no fixed port: tests run in parallel
    assert res.returncode == 2 and "tls.cert" in res.stderr and "Traceback" not in res.stderr


def test_testpki_import_and_lodge_cli(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    res = run("testpki", "--devices", "30", "--organisations", "12", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "certificates/s" in res.stdout
    manifest = load_manifest(out, devices=True)
    again = run("testpki", "--out", str(out))
    assert again.returncode == 2 and "already" in again.stderr
    # operator bulk import of the whole PKI (roots become trust anchors), then idempotent
    data = tmp_path / "var"
    res = run("import", "--data-dir", str(data), str(out))
    assert res.returncode == 0, res.stderr + res.stdout
    # the SMKI certificates its manifest lists (not its TLS or DCC client certificates)
    certs = sum(1 for o in manifest["objects"] if o["kind"] in ("root", "ca", "organisation",
                                                                    "device"))
    assert f"imported {certs:,} new certificates (0 already present" in res.stdout, res.stdout
    assert "3 CRL/ARL" in res.stdout
    res = run("import", "--data-dir", str(data), str(out))
    assert res.returncode == 0 and "imported 0 new" in res.stdout
    assert f"({certs:,} already present" in res.stdout, res.stdout
    # lodge client errors are clear
    res = run("lodge", "--url", "http://localhost:1", "--cert", "x", "--key", "y", "z")
    assert res.returncode == 2 and "https://" in res.stderr


def test_example_config_documents_every_setting_with_its_default() -> None:
    import dataclasses

    from repository_server.config import Config
    from tests.conftest import ROOT

    text = (ROOT / "conf" / "repository.toml").read_text()
    assert load(ROOT / "conf" / "repository.toml", environ={}) == load(None, environ={})
    for section in dataclasses.fields(Config):
        if dataclasses.is_dataclass(section.type) or section.name == "data_dir":
            continue
        sub = getattr(Config(), section.name)
        if dataclasses.is_dataclass(sub):
            assert f"[{section.name}]" in text
            for f in dataclasses.fields(sub):
                assert f"\n{f.name} =" in text, f"{section.name}.{f.name} not documented"


@pytest.mark.asyncio(loop_scope="session")
async def test_import_beside_a_running_server_is_served_at_once(loaded: Any, tmp_path: Path) -> None:
    """`import` in another process, same database: the server's cached current CRL is
    replaced (LISTEN/NOTIFY) and the new certificates are served."""
    import asyncio
    import urllib.request

    from tests.pkitools import crl, load_cert, load_key

    issuer_obj = next(o for o in loaded.pki["objects"] if o.get("name") == "issuing-oca")
    url = f"{loaded.http}/crls/{issuer_obj['subject_key_id']}.crl"

    def fetch() -> bytes:
        with urllib.request.urlopen(url, timeout=10) as resp:
            body: bytes = resp.read()
            return body

    old = await asyncio.to_thread(fetch)  # now cached by the server
    new = crl(load_cert(loaded.path(issuer_obj["path"])), load_key(loaded.path(issuer_obj["key"])),
              7, [])
    src = tmp_path / "src"
    src.mkdir()
    (src / "newer.crl").write_bytes(new)
    env = cli_env()
    env["SMKI_DATABASE__URL"] = loaded.repo.store.dsn
    res = await asyncio.to_thread(run, "import", "--data-dir", str(tmp_path / "unused"), str(src),
                                  env=env)
    assert res.returncode == 0, res.stderr
    assert "CRL number 7 stored" in res.stderr
    for _ in range(50):
        body = await asyncio.to_thread(fetch)
        if body != old:
            break
        await asyncio.sleep(0.05)
    assert body == new


@pytest.mark.asyncio(loop_scope="session")
async def test_lodge_command_against_the_server(loaded: Any, tmp_path: Path) -> None:
    """The DCC-side client: certificates and a document lodged, a refusal gives exit 1."""
    import asyncio

    pki_dir = loaded.pki_dir
    dcc = loaded.pki["dcc_client"]
    base = ["lodge", "--url", loaded.lodge_url, "--cert", str(pki_dir / dcc["cert"]),
            "--key", str(pki_dir / dcc["key"]), "--ca", loaded.tls_ca]
    doc = tmp_path / "SMKI-Compliance-Policy.txt"
    doc.write_text("compliance policy, version 1\n")
    org = pki_dir / loaded.objects("organisation")[0]["path"]
    res = await asyncio.to_thread(run, *base, "--on-behalf-of", "officer 9", str(org), str(doc))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 stored, 1 identical" in res.stdout
    assert "document SMKI-Compliance-Policy version 1 stored" in res.stdout
    # --on-behalf-of travels as X-On-Behalf-Of and lands in the audit entry
    entries = await loaded.repo.store.audit_entries()
    doc_entry = [e for e in entries if e["action"] == "lodge.document"][-1]
    assert doc_entry["on_behalf_of"] == "officer 9"
    from tests.conftest import http_get

    status, headers, body = await asyncio.to_thread(
        http_get, f"{loaded.http}/documents/SMKI-Compliance-Policy")
    assert status == 200 and body == doc.read_bytes() and headers["content-type"] == "text/plain"
    # a type that is not allowed is stored as a plain download, and the lodger is told
    page = tmp_path / "notice.html"
    page.write_text("<script>alert(1)</script>")
    res = await asyncio.to_thread(run, *base, str(page))
    assert res.returncode == 0, res.stdout + res.stderr
    assert ("document notice version 1 stored as application/octet-stream (sent as text/html:"
            " not an allowed document type" in res.stdout), res.stdout
    # a root without --trust-anchor is refused: exit status 1 and the reason
    from tests.pkitools import pem, self_signed_ca

    root, _ = self_signed_ca("Lodged By Mistake")
    bad = tmp_path / "root.pem"
    bad.write_bytes(pem(root))
    res = await asyncio.to_thread(run, *base, str(bad))
    assert res.returncode == 1
    assert "refused (422)" in res.stdout and "trust anchor" in res.stdout


@pytest.mark.asyncio(loop_scope="session")
async def test_batch_over_the_limit_is_refused(tmp_path: Path, pki: dict[str, Any],
                                               fresh_db: str) -> None:
    import asyncio

    from tests.conftest import Running, start_repository

    repo = await start_repository(tmp_path, pki, fresh_db, lodge={"max_batch": 5})
    try:
        running = Running(repo, pki)
        bundle = (pki["dir"] / running.objects("device")[0]["path"]).read_bytes()
        client = running.client()
        reply = await asyncio.to_thread(client.certificates, bundle)
        client.close()
        assert reply.status == 413 and "exceeds the limit of 5" in reply.body["reason"]
    finally:
        await repo.stop()


def test_progress_lines_when_not_a_terminal() -> None:
    """Long work (testpki, import, extract at millions) shows a line every 10 s in a log,
    with the rate and the time left, plus the first and the last."""
    import io

    from repository_server.cli.lodge_client import Progress

    now = [0.0]
    out = io.StringIO()
    progress = Progress(out, every=10, clock=lambda: now[0])
    progress("devices", 0, 1000)
    for step in range(1, 11):
        now[0] = step * 3.0
        progress("devices", step * 90, 1000)
    now[0] = 40.0
    progress("devices", 1000, 1000)
    lines = out.getvalue().splitlines()
    assert lines[0] == "devices: 0/1,000"
    # at 12 s (360 done, 30/s) and at 24 s (720 done): one line per 10 s, not per call
    assert lines[1] == "devices: 360/1,000 30/s, 12 s, about 21 s left"
    assert lines[2].startswith("devices: 720/1,000 30/s, 24 s")
    assert lines[-1] == "devices: 1,000/1,000 25/s, 40 s"
    assert len(lines) == 4
