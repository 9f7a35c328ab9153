"""Extracts: a full and a delta read back by an independent reader (tarfile, json, hashlib
only, as a relying party would) and compared with the store and the download URLs; atomic
publication (a crash leaves nothing visible, and the next run succeeds); retention; the
scheduler's cluster lock; HTTPS downloads with ranges through curl."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from repository_server.config import WEEKDAYS
from repository_server.config import Extracts as ExtractSettings
from repository_server.extracts import format as fmt
from repository_server.extracts.scheduler import ExtractScheduler, latest_ticks
from repository_server.extracts.writer import ExtractWriter
from repository_server.pki.ids import serial_to_hex
from tests.conftest import TEST_KEY, Running, add_user, cli_env, http_get, run_process, smki_cli
from tests.pkitools import crl, load_cert, pem


# -- the independent reader (what the README tells a relying party to do) ------------------
def read_extract(path: Path) -> dict[str, Any]:
    """Every member checked against its digest; every member accounted for."""
    with tarfile.open(path, "r:*") as tar:
        members = {m.name: m for m in tar.getmembers()}
        names = [m.name for m in tar.getmembers()]
        assert names[-1] == "manifest.json"

        def data(name: str) -> bytes:
            fh = tar.extractfile(members[name])
            assert fh is not None
            return fh.read()

        manifest = json.loads(data("manifest.json"))
        assert manifest["format"] == "smki-extract" and manifest["version"] == 1
        indexes: dict[str, list[dict[str, Any]]] = {}
        for index in ("index.jsonl", "crls.jsonl", "documents.jsonl"):
            body = data(index)
            meta = manifest["members"][index]
            assert hashlib.sha256(body).hexdigest() == meta["sha256"]
            assert len(body) == meta["size"]
            indexes[index] = [json.loads(line) for line in body.splitlines()]
            assert len(indexes[index]) == meta["lines"]
        seen = {"manifest.json", "index.jsonl", "crls.jsonl", "documents.jsonl"}
        objects: dict[str, dict[str, tuple[dict[str, Any], bytes]]] = {}
        for index, records in indexes.items():
            objects[index] = {}
            for record in records:
                body = data(record["member"])
                assert hashlib.sha256(body).hexdigest() == record["sha256"], record["member"]
                seen.add(record["member"])
                objects[index][record["member"]] = (record, body)
        assert seen == set(members), set(members) - seen
    counts = manifest["counts"]
    assert counts["certificates"] == len(objects["index.jsonl"])
    assert counts["crls"] == len(objects["crls.jsonl"])
    assert counts["documents"] == len(objects["documents.jsonl"])
    return {"manifest": manifest, "certificates": objects["index.jsonl"],
            "crls": objects["crls.jsonl"], "documents": objects["documents.jsonl"]}


def apply(state: dict[str, dict[str, Any]], extract: dict[str, Any]) -> None:
    """Load an extract into a relying party's state (keyed by SHA-256 of the object)."""
    for record, der in extract["certificates"].values():
        state.setdefault("certificates", {})[record["sha256"]] = (
            record["serial"], record["status"], record["manufacturing_flag"], der)
    for record, der in extract["crls"].values():
        state.setdefault("crls", {})[record["sha256"]] = der
    for record, body in extract["documents"].values():
        state.setdefault("documents", {})[(record["name"], record["version"])] = body


async def store_state(dsn: str) -> dict[str, dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        certs = await conn.fetch("SELECT sha256, serial, status, manufacturing_flag, der"
                                 " FROM certificates")
        crls = await conn.fetch("SELECT sha256, der FROM crls")
        docs = await conn.fetch("SELECT name, version, body FROM documents")
    finally:
        await conn.close()
    return {"certificates": {r["sha256"].hex(): (r["serial"], r["status"],
                                                 r["manufacturing_flag"], r["der"]) for r in certs},
            "crls": {r["sha256"].hex(): r["der"] for r in crls},
            "documents": {(r["name"], r["version"]): r["body"] for r in docs}}


def files_in(directory: Path) -> list[str]:
    """The names in an extracts directory, but the listing of published ones (`fmt.LISTING`,
    written beside them at every publication)."""
    return sorted(p.name for p in directory.iterdir() if p.name != fmt.LISTING)


def writer_for(running: Running, **kw: Any) -> ExtractWriter:
    repo = running.repo
    assert repo.store is not None
    return ExtractWriter(repo.store, repo.config.path(repo.config.extracts.dir), **kw)


async def produce(running: Running, kind: str, **kw: Any) -> Path:
    writer = writer_for(running, **kw)
    assert running.repo.store is not None
    async with running.repo.store.extract_lock(wait=True):
        done = await writer.produce(kind)
    return done.path


# -- round trip -----------------------------------------------------------------------------
async def test_full_then_delta_round_trip(loaded: Running) -> None:
    repo = loaded.repo
    dsn = repo.config.database.url
    env = {**cli_env(), "SMKI_DATABASE__URL": dsn}
    code, out, err = await run_process(*smki_cli(), "extract", "full", "--json", "--data-dir",
                                       repo.config.data_dir, timeout=120, env=env)
    assert code == 0, err.decode()
    produced = json.loads(out)
    assert produced["read_from"] == "replica"  # the node's, caught up to the markers
    full_path = Path(produced["path"])
    assert full_path.parent == repo.config.path("extracts") and full_path.name.endswith(".tar.gz")
    full = read_extract(full_path)
    assert full["manifest"]["kind"] == "full" and full["manifest"]["since"] is None
    state: dict[str, dict[str, Any]] = {}
    apply(state, full)
    assert state == await store_state(dsn)
    assert {r["change"] for r, _ in full["certificates"].values()} == {"new"}
    # the index agrees with what the download URLs serve
    for record, der in full["certificates"].values():
        key = f"?issuer={record['issuer_key_id']}&apikey={TEST_KEY}" if record["issuer_key_id"] \
            else f"?apikey={TEST_KEY}"
        status, _h, body = await asyncio.to_thread(
            http_get, f"{loaded.http}/certificates/{record['serial']}{key}")
        assert status == 200 and body == der
    for record, der in full["crls"].values():
        status, _h, body = await asyncio.to_thread(
            http_get, f"{loaded.http}/crls/{record['issuer_key_id']}/{record['crl_number']}.crl")
        assert status == 200 and body == der
    device = next(r for r, _ in full["certificates"].values() if r["kind"] == "device")
    assert device["eui64"] and device["usage"] in ("DS", "KA") and device["not_after"]

    # changes after the full: a new certificate, a status change, a CRL, a document version
    org = loaded.objects("organisation")[0]
    original = load_cert(loaded.path(org["path"]))
    issuer, issuer_key = loaded.ca("issuing-oca")
    builder = (x509.CertificateBuilder().subject_name(original.subject)
               .issuer_name(issuer.subject).public_key(original.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(original.not_valid_before_utc)
               .not_valid_after(original.not_valid_after_utc))
    for ext in original.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    renewal = builder.sign(issuer_key, hashes.SHA256())
    device_obj = loaded.objects("device")[0]
    client = loaded.client()
    try:
        assert (await asyncio.to_thread(client.certificates, pem(renewal))).status == 200
        reply = await asyncio.to_thread(client.status, device_obj["serial"],
                                        {"status": "N", "manufacturing_flag": True})
        assert reply.status == 200, reply.body
        assert (await asyncio.to_thread(client.crl, crl(issuer, issuer_key, 2, [
            original.serial_number]))).status == 200
        assert (await asyncio.to_thread(client.document, "SMKI-Extract-Note", b"version one\n",
                                        "text/plain")).status == 200
    finally:
        client.close()

    delta_path = await produce(loaded, "delta")
    delta = read_extract(delta_path)
    manifest = delta["manifest"]
    assert manifest["kind"] == "delta" and manifest["previous"] == full_path.name
    assert manifest["since"] == full["manifest"]["upto"]
    records = [r for r, _ in delta["certificates"].values()]
    assert sorted((r["change"], r["serial"]) for r in records) == sorted([
        ("new", serial_to_hex(renewal.serial_number)), ("status", device_obj["serial"])])
    changed = next(r for r in records if r["change"] == "status")
    assert changed["status"] == "N" and changed["manufacturing_flag"] is True
    assert [r["crl_number"] for r, _ in delta["crls"].values()] == [2]
    assert [(r["name"], r["version"]) for r, _ in delta["documents"].values()] == [
        ("SMKI-Extract-Note", 1)]
    apply(state, delta)
    assert state == await store_state(dsn)

    # nothing changed since: the next delta is empty but chained
    empty = read_extract(await produce(loaded, "delta"))
    assert empty["manifest"]["counts"]["certificates"] == 0
    assert empty["manifest"]["previous"] == delta_path.name

    # the portal lists them with download links (signed in), newest first
    files = repo.extract_files
    assert files is not None
    assert [r.name for r in await files.published()][1:] == [delta_path.name, full_path.name]


# -- HTTPS with ranges ------------------------------------------------------------------------
async def test_https_listing_and_ranges_with_curl(loaded: Running, tmp_path: Path) -> None:
    path = await produce(loaded, "full", compression="none")
    assert path.name.endswith(".tar")
    whole = path.read_bytes()
    status, _h, body = await asyncio.to_thread(http_get, f"{loaded.http}/extracts")
    assert status == 403
    status, headers, body = await asyncio.to_thread(
        http_get, f"{loaded.https}/extracts", {"X-API-Key": TEST_KEY}, ca=loaded.tls_ca)
    assert status == 200
    listing = json.loads(body)
    assert [e["name"] for e in listing] == [path.name]
    assert listing[0]["sha256"] == hashlib.sha256(whole).hexdigest()
    assert listing[0]["size"] == len(whole) and listing[0]["url"] == f"/extracts/{path.name}"
    url = f"{loaded.https}/extracts/{path.name}"
    half = len(whole) // 2
    parts = []
    for rng in (f"0-{half - 1}", f"{half}-"):
        out = tmp_path / f"part-{rng}"
        proc = await asyncio.create_subprocess_exec(
            "curl", "-sS", "--cacert", loaded.tls_ca, "-H", f"X-API-Key: {TEST_KEY}", "-r", rng,
            "-o", str(out), "-w", "%{http_code}", url, stdout=asyncio.subprocess.PIPE)
        code, _ = await proc.communicate()
        assert code == b"206", code
        parts.append(out.read_bytes())
    assert b"".join(parts) == whole
    # resuming a cut download (-C -) completes it byte for byte
    cut = tmp_path / "resumed.tar"
    cut.write_bytes(whole[:1000])
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--cacert", loaded.tls_ca, "-C", "-", "-o", str(cut), f"{url}?apikey={TEST_KEY}")
    assert await proc.wait() == 0
    assert cut.read_bytes() == whole
    status, headers, _ = await asyncio.to_thread(
        http_get, f"{loaded.http}/extracts/{path.name}", {"X-API-Key": TEST_KEY}, "HEAD")
    assert status == 200 and int(headers["content-length"]) == len(whole)
    assert headers["content-type"] == "application/x-tar" and "content-encoding" not in headers
    for bad in (fmt.PARTIAL_PREFIX + path.name, "..%2Fmanifest.json", "nothing.tar"):
        status, _h, _b = await asyncio.to_thread(
            http_get, f"{loaded.http}/extracts/{bad}", {"X-API-Key": TEST_KEY})
        assert status == 404, bad


# -- atomic publication, retention, the lock ---------------------------------------------------
async def test_crash_mid_way_leaves_nothing_visible(server: Running) -> None:
    repo = server.repo
    assert repo.store is not None and repo.extract_files is not None
    directory = repo.config.path(repo.config.extracts.dir)
    writer = writer_for(server)
    original = repo.store.extract_crls_page
    seen: list[Path] = []

    async def failing(*args: Any) -> Any:
        seen.extend(directory.glob(fmt.PARTIAL_PREFIX + "*"))  # being written: not listed
        status, _h, body = await asyncio.to_thread(
            http_get, f"{server.http}/extracts", {"X-API-Key": TEST_KEY})
        assert status == 200 and json.loads(body) == []
        raise OSError("disk on fire")

    repo.store.extract_crls_page = failing  # type: ignore[method-assign]
    try:
        async with repo.store.extract_lock(wait=True):
            with pytest.raises(OSError):
                await writer.produce("full")
    finally:
        repo.store.extract_crls_page = original  # type: ignore[method-assign]
    assert len(seen) == 1
    assert list(directory.iterdir()) == []
    assert [r.state for r in await repo.store.extracts(("failed",))] == ["failed"]
    # a hard crash leaves its partial file behind: the next run clears it, then succeeds
    leftover = directory / (fmt.PARTIAL_PREFIX + "smki-extract-20260101T000000Z-full-000099.tar.gz")
    leftover.write_bytes(b"half")
    status, _h, _b = await asyncio.to_thread(
        http_get, f"{server.http}/extracts/{leftover.name}", {"X-API-Key": TEST_KEY})
    assert status == 404
    async with repo.store.extract_lock(wait=True):
        done = await writer.produce("full")
    assert files_in(directory) == [done.name]
    assert read_extract(done.path)["manifest"]["counts"]["certificates"] == 0


async def test_markers_wait_for_a_lodging_in_flight(server: Running) -> None:
    """A lodging transaction holds the change lock shared: an extract's markers are taken only
    once it has committed, so its ids cannot fall between two extracts."""
    from repository_server.store import pool

    repo = server.repo
    assert repo.store is not None
    conn = await asyncpg.connect(repo.config.database.url)
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", pool._CHANGE_LOCK)
        await conn.execute("INSERT INTO documents (name, version, content_type, body, size,"
                           " sha256, lodged_by) VALUES ('In-Flight', 1, 'text/plain', 'x', 1,"
                           " '\\x00', 'test')")
        markers = asyncio.ensure_future(repo.store.extract_markers())
        await asyncio.sleep(0.5)
        assert not markers.done()
        await tx.commit()
        got = await asyncio.wait_for(markers, 10)
    finally:
        await conn.close()
    doc_id = await repo.store.pool.fetchval("SELECT id FROM documents WHERE name = 'In-Flight'")
    assert got.document_id == doc_id


def test_retention_rule() -> None:
    published = [(1, "full"), (2, "delta"), (3, "delta"), (4, "full"), (5, "delta"), (6, "full")]
    assert fmt.to_remove(published, 2) == [1, 2, 3]
    assert fmt.to_remove(published, 3) == []
    assert fmt.to_remove(published, 1) == [1, 2, 3, 4, 5]


async def test_retention_removes_files_and_listing(server: Running) -> None:
    names = []
    for kind in ("full", "delta", "full", "delta", "full"):
        names.append((await produce(server, kind, retain_full=2)).name)
    directory = server.repo.config.path("extracts")
    assert files_in(directory) == sorted(names[2:])
    listed = fmt.parse_listing((directory / fmt.LISTING).read_bytes())
    assert listed == await server.repo.store.extracts()  # type: ignore[union-attr]
    files = server.repo.extract_files
    assert files is not None
    assert [r.name for r in await files.published()] == list(reversed(names[2:]))


def test_latest_ticks_uk_time() -> None:
    settings = ExtractSettings()  # full Sunday 02:00, delta daily 02:00, Europe/London
    # Saturday 2026-11-21 12:00 UTC (GMT): the full was Sunday 15th, the delta today
    ticks = latest_ticks(datetime(2026, 11, 21, 12, 0, tzinfo=UTC), settings)
    assert [(k, s) for k, s, _ in ticks] == [("full", "full 2026-11-15T02:00"),
                                              ("delta", "delta 2026-11-21T02:00")]
    # on Sunday after 02:00 the delta tick is the full's: only the full
    ticks = latest_ticks(datetime(2026, 11, 22, 3, 0, tzinfo=UTC), settings)
    assert [s for _k, s, _ in ticks] == ["full 2026-11-22T02:00"]
    # British Summer Time: 02:00 local is 01:00 UTC
    ticks = latest_ticks(datetime(2026, 7, 1, 1, 30, tzinfo=UTC), settings)
    assert ticks[1][2].astimezone(UTC) == datetime(2026, 7, 1, 1, 0, tzinfo=UTC)


async def test_scheduler_one_extract_per_tick_in_a_cluster(server: Running) -> None:
    repo = server.repo
    assert repo.store is not None
    clock = [datetime.now(UTC)]
    # the weekly full three days ago, so that a day later only a delta is due
    weekday = WEEKDAYS[(clock[0] - timedelta(days=3)).astimezone(ZoneInfo("Europe/London")).weekday()]
    settings = dataclasses.replace(repo.config.extracts, full_weekday=weekday,
                                   full_time="02:00", delta_time="02:00")
    schedulers = [ExtractScheduler(repo.store, writer_for(server), settings, lambda: clock[0])
                  for _ in range(2)]
    first = await asyncio.gather(*(s.tick() for s in schedulers))
    again = await schedulers[1].tick()
    produced = [p for batch in first for p in batch] + again
    assert [p.kind for p in produced] == ["full"]  # a fresh install: one full, no delta yet
    clock[0] += timedelta(days=1)
    later = await asyncio.gather(*(s.tick() for s in schedulers))
    assert [p.kind for batch in later for p in batch] == ["delta"]
    assert [p.kind for p in await schedulers[0].tick()] == []
    rows = await repo.store.extracts()
    assert sorted(r.kind for r in rows) == ["delta", "full"]
    assert all(r.slot for r in rows)


async def test_document_only_delta_timestamps(server: Running) -> None:
    """An extract's members carry the lodging time; the manifest its creation time."""
    client = server.client()
    try:
        reply = await asyncio.to_thread(client.document, "SMKI-Note", b"text\n", "text/plain")
        assert reply.status == 200
    finally:
        client.close()
    path = await produce(server, "delta")
    with tarfile.open(path, "r:gz") as tar:
        member = tar.getmember("documents/SMKI-Note/1")
        assert abs(member.mtime - dt.datetime.now(UTC).timestamp()) < 600
    assert read_extract(path)["manifest"]["since"] == {"cert_id": 0, "change": 0, "crl_id": 0,
                                                       "document_id": 0}


# -- SFTP ----------------------------------------------------------------------------------
SFTP = shutil.which("sftp")
needs_sftp = pytest.mark.skipif(
    (SFTP is None or shutil.which("ssh-keygen") is None) and not os.environ.get("CI"),
    reason="OpenSSH's sftp and ssh-keygen are not installed (.ci/run installs openssh-client)")


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", str(path)],
                   check=True)
    return path


async def sftp_batch(running: Running, key: Path, user: str, commands: str,
                     cwd: Path) -> tuple[int, str]:
    port = running.repo.bound["sftp"].port
    proc = await asyncio.create_subprocess_exec(
        "sftp", "-b", "-", "-i", str(key), "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
        "-o", "IdentitiesOnly=yes", "-o", "PasswordAuthentication=no", "-P", str(port),
        f"{user}@127.0.0.1", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, cwd=cwd)
    out, _ = await asyncio.wait_for(proc.communicate(commands.encode()), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


@needs_sftp
async def test_sftp_with_openssh_client(server: Running, tmp_path: Path) -> None:
    from repository_server.cli import admin

    repo = server.repo
    assert repo.store is not None
    path = await produce(server, "full")
    directory = path.parent
    (directory / (fmt.PARTIAL_PREFIX + "smki-extract-20260101T000000Z-full-000042.tar.gz")
     ).write_bytes(b"being written")
    await admin.users_add(repo.store, "sftp-reader")
    good, wrong = keygen(tmp_path / "good"), keygen(tmp_path / "wrong")
    env = {**cli_env(), "SMKI_DATABASE__URL": repo.config.database.url}
    code, out, err = await run_process(*smki_cli(), "users", "sshkey", "sftp-reader", "--add",
                                       f"{good}.pub", "--data-dir", repo.config.data_dir,
                                       timeout=60, env=env)
    assert code == 0 and b"SHA256:" in out, err
    work = tmp_path / "work"
    work.mkdir()
    code, out = await sftp_batch(server, good, "sftp-reader",
                                 f"ls -1\nget {path.name} got.tar.gz\n", work)
    assert code == 0, out
    assert path.name in out and fmt.PARTIAL_PREFIX not in out
    assert (work / "got.tar.gz").read_bytes() == path.read_bytes()
    # read-only: an upload, a removal, a rename and a mkdir are refused; nothing changes
    (work / "upload.txt").write_text("no\n")
    before = sorted(p.name for p in directory.iterdir())
    for command in ("put upload.txt", f"rm {path.name}", f"rename {path.name} x.tar.gz",
                    "mkdir sub", f"get {fmt.PARTIAL_PREFIX}smki-extract-20260101T000000Z-full-000042.tar.gz",
                    "get ../../etc/passwd"):
        code, out = await sftp_batch(server, good, "sftp-reader", command + "\n", work)
        assert code != 0, (command, out)
    assert sorted(p.name for p in directory.iterdir()) == before
    # the wrong key is refused
    code, out = await sftp_batch(server, wrong, "sftp-reader", "ls\n", work)
    assert code == 255 and "Permission denied" in out, out
    # a disabled user's key stops working
    await admin.users_disable(repo.store, "sftp-reader")
    code, out = await sftp_batch(server, good, "sftp-reader", "ls\n", work)
    assert code == 255, out


async def test_sftp_passwords_and_no_shell(server: Running) -> None:
    import asyncssh

    from repository_server.accounts.keys import hash_password

    repo = server.repo
    assert repo.store is not None
    await produce(server, "full")
    await add_user(repo, "sftp-pw", None)
    port = repo.bound["sftp"].port
    password = "correct horse battery"
    await repo.store.update_user("sftp-pw", actor="test", action="test",
                                 password_hash=hash_password(password))

    async def connect(pw: str) -> Any:
        return await asyncssh.connect("127.0.0.1", port, username="sftp-pw", password=pw,
                                      known_hosts=None, client_keys=None, agent_path=None)

    # the first password must be changed in the portal first
    with pytest.raises(asyncssh.PermissionDenied):
        await connect(password)
    await repo.store.update_user("sftp-pw", actor="test", action="test",
                                 must_change_password=False)
    with pytest.raises(asyncssh.PermissionDenied):
        await connect("wrong password!")
    account = await repo.store.portal_account("sftp-pw")
    assert account is not None and len(account[1]) == 1  # counted towards the SEC lockout
    async with await connect(password) as conn:
        async with conn.start_sftp_client() as sftp:
            names = await sftp.listdir(".")
            assert [n for n in names if n not in (".", "..")] == [
                r.name for r in await repo.store.extracts()]
        try:  # no shell or exec: the SFTP subsystem only
            result = await conn.run("ls /", check=False)
        except asyncssh.ChannelOpenError:
            pass
        else:
            assert result.exit_status != 0 and not result.stdout


async def test_portal_lists_extracts_with_downloads(server: Running) -> None:
    import re

    from tests.portal_client import PortalClient

    async with PortalClient(server.http) as c:
        await c.ready(server, "ext-viewer", "a long enough password 1")
        r = await c.get("/portal/extracts")
        assert r.status == 200 and "No extracts are published yet" in r.text
        path = await produce(server, "full")
        r = await c.get("/portal/extracts")
        href = re.search(r'href="(/portal/download/extracts/[^"]+)"', r.text)
        assert href and path.name in href.group(1)
        assert hashlib.sha256(path.read_bytes()).hexdigest().upper() in r.text
        got = await c.get(href.group(1))
        assert got.status == 200 and got.body == path.read_bytes()
        assert got.headers["content-disposition"] == f'attachment; filename="{path.name}"'
        assert (await c.get("/portal/download/extracts/nothing.tar")).status == 404


def test_tar_writer_keeps_no_member_list(tmp_path: Path) -> None:
    """Memory stays flat whatever the store size: tarfile's own list of every member written
    (100 MB at 200,000 certificates, measured) is emptied as it goes."""
    from repository_server.extracts.writer import _Tar

    tar = _Tar(tmp_path / "x.tar.gz", compress=True)
    for i in range(1000):
        tar.add(f"m/{i}", b"x" * 100, datetime.now(UTC))
    assert tar.tar.members == []  # type: ignore[attr-defined]
    size, _digest = tar.finish()
    with tarfile.open(tmp_path / "x.tar.gz") as check:
        assert len(check.getmembers()) == 1000 and size == (tmp_path / "x.tar.gz").stat().st_size
