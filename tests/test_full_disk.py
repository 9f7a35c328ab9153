"""A real full disk: small tmpfs mounts (root only; skipped otherwise) under the extracts
directory and under the embedded PostgreSQL's data directory, filled by a real extract and
by a real lodging, then grown with `mount -o remount,size=`. The simulated versions (a
trigger raising disk_full, a store method raising OSError) are in test_faults.py and
test_extracts.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from repository_server.extracts import format as fmt
from repository_server.pki.testpki import TestPkiParams, device_objects, generate, load_manifest
from tests.conftest import (
    TEST_KEY,
    Running,
    cli_env,
    http_get,
    run_process,
    running_repository,
    smki_cli,
)
from tests.test_extracts import read_extract
from tests.test_faults import eventually

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _mounted(path: Path) -> bool:
    return any(line.split()[1] == str(path) for line in Path("/proc/mounts").read_text().splitlines())


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted on `path` for the block; always unmounted after it."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                              str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN):"
                    f" {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(path)], check=True)  # still busy: detach
        assert not _mounted(path)


def resize(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


async def get(url: str) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(http_get, url, {"X-API-Key": TEST_KEY})


# -- an extract onto a full disk ----------------------------------------------------------------
async def test_extract_onto_a_full_disk_publishes_nothing(tmp_path: Path, pki: dict[str, Any],
                                                          fresh_db: str) -> None:
    """`smki-repository extract full` onto a disk with 8 KB left (the extract is about 21 KB):
    a one-line error naming the cause, no file left in the directory (not even `.partial-`),
    the extract recorded as failed and not listed; the server serves on. Once the disk is
    grown, the next extract is published whole."""
    data = tmp_path / "data"
    with tmpfs(tmp_path / "disk", "256k") as disk:
        extracts = disk / "extracts"
        env = {**cli_env(), "SMKI_DATABASE__URL": fresh_db, "SMKI_EXTRACTS__DIR": str(extracts)}
        extract = [*smki_cli(), "extract", "full", "--json", "--data-dir", str(data)]
        async with running_repository(data, pki, fresh_db, lodge=True,
                                      extracts={"dir": str(extracts)}) as running:
            store = running.repo.store
            assert store is not None
            (disk / "filler").write_bytes(b"\0" * (free_bytes(disk) - 8 * 1024))
            assert free_bytes(disk) == 8 * 1024

            code, out, err = await run_process(*extract, timeout=120, env=env)
            assert code == 1 and out == b"", (code, out)
            lines = err.decode().splitlines()
            assert lines[-1] == ("error: extract failed, nothing was published: [Errno 28] No space"
                                 f" left on device (extracts.dir {extracts})"), err.decode()
            assert b"Traceback" not in err and b"Exception ignored" not in err, err.decode()
            assert list(extracts.iterdir()) == []  # no extract, no .partial- file, no spool
            assert [r.state for r in await store.extracts(("failed", "producing", "published"))] \
                == ["failed"]
            status, _, body = await get(f"{running.http}/extracts")
            assert status == 200 and json.loads(body) == []
            # the server serves on: readiness, a CA certificate, a device certificate
            assert (await get(f"{running.http}/readyz"))[0] == 200
            for obj in (running.objects("root")[0], running.objects("device")[0]):
                status, _, der = await get(f"{running.http}/certificates/{obj['serial']}")
                assert status == 200 and der[:1] == b"\x30", (status, der[:200])

            resize(disk, "4m")
            code, out, err = await run_process(*extract, timeout=120, env=env)
            assert code == 0, err.decode()
            produced = json.loads(out)
            path = Path(produced["path"])
            assert sorted(p for p in extracts.iterdir() if p.name != fmt.LISTING) == [path]
            assert path.parent == extracts and (extracts / fmt.LISTING).is_file()
            assert not path.name.startswith(fmt.PARTIAL_PREFIX)
            status, _, body = await get(f"{running.http}/extracts")
            assert status == 200 and [e["name"] for e in json.loads(body)] == [path.name]
            counts = read_extract(path)["manifest"]["counts"]  # every member against its digest
            assert counts == produced["counts"]
            for table, key in (("certificates", "certificates"), ("crls", "crls"),
                               ("documents", "documents")):
                assert counts[key] == await store.pool.fetchval(f"SELECT count(*) FROM {table}")
            assert counts["certificates"] == len([o for o in pki["objects"]
                                                  if o["kind"] in ("root", "ca", "organisation",
                                                                   "device")])
    assert not _mounted(tmp_path / "disk")


# -- PostgreSQL on a full disk while lodging ---------------------------------------------------
@pytest.fixture(scope="module")
def big_pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """20,000 devices: one PEM bundle of 40,000 certificates (25 MB)."""
    out = tmp_path_factory.mktemp("full-disk") / "pki"
    generate(out, TestPkiParams(devices=20_000, organisations=0, workers=2, seed=13))
    manifest = load_manifest(out)  # (without the device certificates: they are in the bundle)
    manifest["dir"] = out
    return manifest


def _lodge_small(running: Running) -> int:
    """The CAs, CRLs/ARLs and documents (every refusal counted)."""
    from repository_server.cli.lodge_client import lodge_manifest

    small = {**running.pki, "devices": {**running.pki["devices"], "bundles": []}}
    client = running.client()
    try:
        failures: int = lodge_manifest(client, running.pki_dir, small, out=lambda _l: None)
        return failures
    finally:
        client.close()


def _lodge_bundle(running: Running, bundle: bytes) -> Any:
    from repository_server.cli.lodge_client import LodgeClient

    cert, key = running.client_cert
    client = LodgeClient(running.lodge_url, cert, key, running.tls_ca, timeout=90)  # no hang
    try:
        return client.certificates(bundle)
    finally:
        client.close()


async def _counts(running: Running) -> dict[str, int]:
    store = running.repo.store
    assert store is not None
    return {table: await store.pool.fetchval(f"SELECT count(*) FROM {table}")
            for table in ("certificates", "crls", "documents")}


async def _ready(running: Running) -> bool:
    try:
        return (await get(f"{running.http}/readyz"))[0] == 200
    except OSError:
        return False


async def _database_ok(running: Running) -> bool:
    """What /readyz says of the database (reads stay ready: they come from the replica)."""
    try:
        status, _, body = await get(f"{running.http}/readyz")
    except OSError:
        return False
    return status == 200 and json.loads(body).get("database") == "ok"


@pytest.mark.parametrize(("headroom_mb", "crash"), [(6, False), (24, True)],
                         ids=["write-refused", "wal-panic"])
async def test_postgresql_on_a_full_disk_while_lodging(tmp_path: Path, big_pki: dict[str, Any],
                                                       headroom_mb: int, crash: bool) -> None:
    """The repository's own embedded PostgreSQL with its data directory on a tmpfs left
    `headroom_mb` MB free, then a 40,000-certificate bundle lodged. With 6 MB a data file
    cannot grow: PostgreSQL refuses the write (disk_full) and stays up. With 24 MB the
    batch's WAL needs a new 16 MB segment: PostgreSQL PANICs, its crash recovery cannot write
    WAL either and it stops. Either way the lodging is answered 503 (not acknowledged),
    nothing of it is stored, and everything acknowledged before is still there; once the disk
    is grown the repository recovers with no restart and the bundle is stored whole."""
    data = tmp_path / "data"
    bundle = (big_pki["dir"] / big_pki["devices"]["bundles"][0]).read_bytes()
    assert bundle.count(b"-----BEGIN CERTIFICATE-----") == 40_000
    with tmpfs(data / "pgdata", "128m") as pgdata:
        async with running_repository(data, big_pki, "") as running:  # "": embedded, in data/
            assert await asyncio.to_thread(_lodge_small, running) == 0  # acknowledged
            before = await _counts(running)
            assert before == {"certificates": 5, "crls": 3, "documents": 3}, before
            resize(pgdata, f"{used_bytes(pgdata) // 2**20 + headroom_mb}m")

            reply = await asyncio.to_thread(_lodge_bundle, running, bundle)
            assert reply.status == 503, reply
            assert "not acknowledged" in reply.body["reason"], reply.body
            log = pgdata / "server.log"
            if crash:
                # PANIC:  could not write to file "pg_wal/xlogtemp.N": No space left on device
                # ... FATAL:  could not write to file "pg_wal/xlogtemp.M": ... (crash recovery)
                # ... LOG:  shutting down due to startup process failure
                await eventually(lambda: _contains(log, "shutting down due to startup process"
                                                   " failure"), 20, "PostgreSQL stops")
                text = log.read_text()
                assert 'PANIC:  could not write to file "pg_wal/xlogtemp' in text, text[-3000:]
                # reads stay ready (served from the replica); readiness says the database is
                # down, and it is not started again while the disk is full
                await eventually(lambda: _not(_database_ok(running)), 10, "database down")
                assert await _ready(running)
                await asyncio.sleep(5)  # the supervisor tries every 2 s, and fails: no room
                assert not await _database_ok(running)
                assert log.read_text().count("shutting down due to startup process failure") >= 2
            else:
                # ERROR:  could not extend file "base/...": No space left on device
                text = log.read_text()
                assert "could not extend file" in text and "No space left on device" in text
                assert "PANIC" not in text, text[-3000:]
                assert await _ready(running)  # reads are served as before
                assert await _counts(running) == before

            resize(pgdata, "256m")
            took = await eventually(lambda: _database_ok(running), 30, "ready again")
            assert await _counts(running) == before  # nothing of the batch; nothing lost
            reply = await asyncio.to_thread(_lodge_bundle, running, bundle)
            assert reply.status == 200 and reply.body["stored"] == 40_000, reply.body
            after = await _counts(running)
            assert after == {**before, "certificates": before["certificates"] + 40_000}
            assert await asyncio.to_thread(_lodge_small, running) == 0  # identical: no-ops
            assert await _counts(running) == after
            print(f"ready again {took:.1f} s after the disk was grown")
            # reads: a CA certificate, and the last device certificate of the bundle
            devices = list(device_objects(big_pki["dir"], big_pki))
            for serial in (running.objects("root")[0]["serial"], devices[-1]["serial"]):
                status, _, der = await get(f"{running.http}/certificates/{serial}")
                assert status == 200 and der[:1] == b"\x30", (status, der[:200])
    assert not _mounted(data / "pgdata")


async def _contains(path: Path, text: str) -> bool:
    return text in path.read_text(errors="replace")


async def _not(check: Any) -> bool:
    return not await check
