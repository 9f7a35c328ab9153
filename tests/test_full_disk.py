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

from .conftest import TEST_KEY, cli_env, http_get, run_process, running_repository, smki_cli
from .test_extracts import read_extract

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
            assert sorted(extracts.iterdir()) == [path] and path.parent == extracts
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
