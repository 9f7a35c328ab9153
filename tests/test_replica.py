"""The node-local read replica: equal to PostgreSQL after lodgings on two nodes, rebuilt when
deleted or damaged, never half-applied when its feeder is killed, converging when a node
starts in the middle of lodgings, and served from when PostgreSQL is gone (test_faults)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from repository_server.readmodel.check import verify
from repository_server.readmodel.env import Replica
from tests.conftest import (
    TEST_KEY,
    Running,
    add_user,
    cli_env,
    http_get,
    lodge_pki,
    make_config,
    start_repository,
)
from tests.test_ldap import _devices

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _caught_up(repo: Any, timeout: float = 10.0) -> None:
    """Until this node's replica has applied everything committed so far."""
    store = repo.store
    deadline = time.monotonic() + timeout
    while True:
        head = int(await store.pool.fetchval("SELECT coalesce(max(seq), 0) FROM changes"))
        if repo.replica.applied() >= head:
            return
        assert time.monotonic() < deadline, (repo.replica.applied(), head)
        await asyncio.sleep(0.05)


async def _verify(repo: Any) -> None:
    async with repo.store.pool.acquire() as conn:
        report = await verify(repo.replica, conn)
    assert report.ok, report.differences


def _get(url: str) -> tuple[int, bytes]:
    status, _headers, body = http_get(url, headers={"X-API-Key": TEST_KEY})
    return status, body


async def test_replica_equals_the_store_after_random_lodgings_on_two_nodes(
        tmp_path: Path, pki: dict[str, Any], fresh_db: str) -> None:
    node_a = await start_repository(tmp_path / "a", pki, fresh_db)
    node_b = await start_repository(tmp_path / "b", pki, fresh_db)
    try:
        await add_user(node_a, "tester", TEST_KEY)
        assert node_b.accounts is not None
        await node_b.accounts.load()
        a, b = Running(node_a, pki), Running(node_b, pki)
        await asyncio.to_thread(lodge_pki, a)
        rng = random.Random(1306)
        devices = a.objects("device")
        lodged_serials: list[str] = [d["serial"] for d in devices]
        crl_number = 10
        for step in range(24):
            node = rng.choice((a, b))
            action = rng.choice(("certs", "status", "crl", "doc"))
            client = node.client()
            try:
                if action == "certs":
                    pem, certs = _devices(node, rng.randint(1, 40), 100_000 * (step + 1))
                    reply = await asyncio.to_thread(client.certificates, pem)
                    lodged_serials += [format(c.serial_number, "X") for c in certs]
                elif action == "status":
                    serial = rng.choice(lodged_serials).lstrip("0")
                    reply = await asyncio.to_thread(
                        client.status, serial, {"status": rng.choice("PIN"),
                                                "manufacturing_flag": rng.random() < 0.5})
                elif action == "crl":
                    crl_number += 1
                    reply = await asyncio.to_thread(
                        client.crl, node.next_oca_crl(crl_number, rng.randint(1, 10**9)))
                else:
                    reply = await asyncio.to_thread(
                        client.document, rng.choice(("policy", "rapp")),
                        f"version {step}".encode(), "text/plain")
            finally:
                client.close()
            assert reply.status == 200, (action, reply.body)
            # read-your-writes: the node that acknowledged it serves it at once
            if action == "doc":
                name = reply.body["name"]
                status, body = await asyncio.to_thread(_get, f"{node.http}/documents/{name}")
                assert (status, body) == (200, f"version {step}".encode())
        for repo in (node_a, node_b):
            await _caught_up(repo)
            await _verify(repo)
        # and the two nodes answer alike
        for serial in rng.sample(lodged_serials, 20):
            assert (await asyncio.to_thread(_get, f"{a.http}/certificates/{serial}") ==
                    await asyncio.to_thread(_get, f"{b.http}/certificates/{serial}"))
    finally:
        await node_b.stop()
        await node_a.stop()


async def test_deleted_or_damaged_replica_is_rebuilt_with_the_same_answers(
        tmp_path: Path, pki: dict[str, Any], fresh_db: str) -> None:
    repo = await start_repository(tmp_path, pki, fresh_db)
    running = Running(repo, pki)
    urls: list[str] = []
    try:
        await add_user(repo, "tester", TEST_KEY)
        await asyncio.to_thread(lodge_pki, running)
        crl = running.objects("crl")[0]
        urls = [f"{running.http}/certificates/{d['serial']}" for d in running.objects("device")[:5]]
        urls += [f"{running.http}/crls/{crl['issuer_key_id']}.crl", f"{running.http}/crls",
                 f"{running.http}/documents"]
        before = [await asyncio.to_thread(_get, u) for u in urls]
        assert all(s == 200 for s, _ in before)
    finally:
        await repo.stop()
    path = repo.config.path(repo.config.replica.path)
    for damage in ("delete", "garbage", "truncate"):
        if damage == "delete":
            import shutil

            shutil.rmtree(path)
        elif damage == "garbage":
            data = path / "data.mdb"
            with data.open("r+b") as fh:  # both meta pages: LMDB refuses the file
                fh.write(os.urandom(8192))
        else:
            (path / "data.mdb").write_bytes(b"")
        repo = await start_repository(tmp_path, pki, fresh_db)
        running = Running(repo, pki)
        try:
            await repo.accounts.load()  # type: ignore[union-attr]
            urls = [u.replace(u.split("/")[2], f"127.0.0.1:{repo.bound['http'].port}")
                    for u in urls]
            after = [await asyncio.to_thread(_get, u) for u in urls]
            assert after == before, damage
            await _verify(repo)
        finally:
            await repo.stop()


async def test_a_node_started_during_lodgings_converges(
        tmp_path: Path, pki: dict[str, Any], fresh_db: str) -> None:
    node_a = await start_repository(tmp_path / "a", pki, fresh_db)
    node_b = None
    stop = threading.Event()
    errors: list[str] = []
    a = Running(node_a, pki)

    def lodge_forever() -> None:
        client = a.client()
        n = 0
        try:
            while not stop.is_set():
                pem, _ = _devices(a, 50, 10_000_000 + n * 50)
                n += 1
                reply = client.certificates(pem)
                if reply.status != 200:
                    errors.append(str(reply.body))
        finally:
            client.close()

    try:
        await asyncio.to_thread(lodge_pki, a)
        lodger = threading.Thread(target=lodge_forever, daemon=True)
        lodger.start()
        await asyncio.sleep(1.0)
        node_b = await start_repository(tmp_path / "b", pki, fresh_db)  # builds mid-stream
        await asyncio.sleep(2.0)
        stop.set()
        await asyncio.to_thread(lodger.join, 30)
        assert not errors, errors[:3]
        for repo in (node_a, node_b):
            await _caught_up(repo)
            await _verify(repo)
        count = int(await node_a.store.pool.fetchval("SELECT count(*) FROM certificates"))  # type: ignore[union-attr]
        assert node_b.replica.counts()["certs"] == count  # type: ignore[union-attr]
    finally:
        stop.set()
        if node_b is not None:
            await node_b.stop()
        await node_a.stop()


def _serve(data_dir: Path, config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "repository_server", "serve", "--config",
                             str(config), "--data-dir", str(data_dir)], env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _replica_state(path: Path) -> tuple[int, set[int]]:
    """(applied, certificate ids) of a replica on disk, read in one read transaction."""
    import lmdb

    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=32)
    try:
        meta = env.open_db(b"meta", create=False)
        certs = env.open_db(b"certs", create=False)
        with env.begin() as txn:
            applied = int.from_bytes(txn.get(b"applied", db=meta) or b"", "big")
            ids = {int.from_bytes(k, "big") for k in txn.cursor(db=certs).iternext(values=False)}
        return applied, ids
    finally:
        env.close()


async def test_feeder_killed_mid_batch_never_shows_part_of_a_lodging(
        tmp_path: Path, pki: dict[str, Any], fresh_db: str) -> None:
    """Node B is a real `serve` process feeding its replica while node A lodges batches of
    2,000; B is killed with SIGKILL again and again. Every time, B's replica holds exactly the
    certificates of the changes it has applied (none of a later lodging, all of each applied
    one), and a restarted B catches up."""
    import tomllib  # noqa: F401  (the config below is TOML)

    node_a = await start_repository(tmp_path / "a", pki, fresh_db)
    a = Running(node_a, pki)
    store = node_a.store
    assert store is not None
    cfg = make_config(tmp_path / "b", pki, fresh_db)
    conf = tmp_path / "b.toml"
    conf.write_text(
        f'[database]\nurl = "{fresh_db}"\n[listeners]\nhttp = "127.0.0.1:0"\nhttps = ""\n'
        'lodge = ""\nldap = ""\nldaps = ""\nsftp = ""\n[extracts]\nschedule = false\n'
        '[replica]\npoll_seconds = 0.05\n')
    replica_path = cfg.path(cfg.replica.path)
    stop = threading.Event()
    batches = 0

    def lodge_forever() -> None:
        nonlocal batches
        client = a.client()
        try:
            while not stop.is_set():
                pem, _ = _devices(a, 2000, 20_000_000 + batches * 2000)
                assert client.certificates(pem).status == 200
                batches += 1
        finally:
            client.close()

    proc = None
    try:
        await asyncio.to_thread(lodge_pki, a)
        lodger = threading.Thread(target=lodge_forever, daemon=True)
        lodger.start()
        kills = 0
        for _ in range(6):
            proc = _serve(tmp_path / "b", conf)
            await asyncio.sleep(random.uniform(1.5, 3.0))
            proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait, 10)
            kills += 1
            if not (replica_path / "data.mdb").exists():
                continue  # killed while building the first one
            applied, ids = _replica_state(replica_path)
            rows = await store.pool.fetch(
                "SELECT c.id FROM certificates c WHERE c.lodge_xact IS NULL OR EXISTS"
                " (SELECT 1 FROM changes ch WHERE ch.kind = 'certs' AND ch.seq <= $1"
                " AND c.id > ch.lo AND c.id <= ch.hi AND c.lodge_xact = ch.xact)", applied)
            expected = {r[0] for r in rows}
            assert ids == expected, (applied, len(ids), len(expected))
        stop.set()
        await asyncio.to_thread(lodger.join, 60)
        assert kills == 6 and batches >= 2
        proc = _serve(tmp_path / "b", conf)  # restarted: catches up
        replica = Replica(replica_path, map_size=1 << 30)
        head = int(await store.pool.fetchval("SELECT max(seq) FROM changes"))
        deadline = time.monotonic() + 60
        while True:
            await asyncio.sleep(0.2)
            if (replica_path / "data.mdb").exists() and _replica_state(replica_path)[0] >= head:
                break
            assert time.monotonic() < deadline, "the restarted node did not catch up"
        replica.open()
        try:
            async with store.pool.acquire() as conn:
                report = await verify(replica, conn)
            assert report.ok, report.differences
        finally:
            replica.close()
    finally:
        stop.set()
        if proc is not None and proc.poll() is None:
            proc.terminate()
            await asyncio.to_thread(proc.wait, 30)
        await node_a.stop()


async def test_a_node_fed_from_a_lagging_replica_url_says_how_far_behind(
        tmp_path: Path, pki: dict[str, Any], embedded: Any) -> None:
    """`database.replica_url`: node B reads its feed through a TCP proxy (standing in for a
    streaming replica), node A lodges on the primary. While the proxy stalls, B keeps serving
    what it has, /readyz reports the lag in changes and seconds and turns 503 past
    replica.max_lag_seconds; when the feed flows again B catches up by itself. (A real
    streaming standby, paused, stopped and with its primary gone: tests/test_standby.py.)"""
    from urllib.parse import urlsplit

    from tests.conftest import create_database
    from tests.test_faults import PgProxy

    direct = await create_database(embedded)
    dbname = urlsplit(direct).path.lstrip("/")
    proxy = PgProxy(embedded.socket_dir / ".s.PGSQL.5432")
    port = await proxy.start()
    feed_url = f"postgresql://postgres@127.0.0.1:{port}/{dbname}"
    node_a = await start_repository(tmp_path / "a", pki, direct)
    node_b = await start_repository(
        tmp_path / "b", pki, direct, database={"replica_url": feed_url, "command_timeout": 3.0},
        replica={"max_lag_seconds": 1.0, "poll_seconds": 0.1})
    try:
        a = Running(node_a, pki)
        await add_user(node_a, "tester", TEST_KEY)
        await node_b.accounts.load()  # type: ignore[union-attr]
        await asyncio.to_thread(lodge_pki, a)
        await _caught_up(node_b)
        b_http = f"http://127.0.0.1:{node_b.bound['http'].port}"
        serial = a.objects("device")[0]["serial"]
        assert (await asyncio.to_thread(_get, f"{b_http}/certificates/{serial}"))[0] == 200

        proxy.stall()
        client = a.client()
        try:
            pem, certs = _devices(a, 3, 900_000)
            assert (await asyncio.to_thread(client.certificates, pem)).status == 200
        finally:
            client.close()
        new_serial = format(certs[0].serial_number, "X")
        deadline = time.monotonic() + 10
        while True:
            status, _headers, body = await asyncio.to_thread(http_get, f"{b_http}/readyz")
            import json

            ready = json.loads(body)
            if status == 503:
                break
            assert time.monotonic() < deadline, ready
            await asyncio.sleep(0.2)
        assert ready["replica"]["behind_changes"] >= 1
        assert ready["replica"]["behind_seconds"] > 1.0
        assert "behind" in ready["reason"]
        # what B has is still served; the new certificate is not there yet
        assert (await asyncio.to_thread(_get, f"{b_http}/certificates/{serial}"))[0] == 200
        assert (await asyncio.to_thread(_get, f"{b_http}/certificates/{new_serial}"))[0] == 404
    finally:
        proxy.drop()
        proxy.resume()
    try:
        await _caught_up(node_b, 30)
        assert (await asyncio.to_thread(_get, f"{b_http}/certificates/{new_serial}"))[0] == 200
        status, _headers, body = await asyncio.to_thread(http_get, f"{b_http}/readyz")
        assert status == 200, body
        await _verify(node_b)
    finally:
        await node_b.stop()
        await node_a.stop()
        await proxy.close()


async def test_replica_commands_status_verify_rebuild(
        tmp_path: Path, pki: dict[str, Any], fresh_db: str) -> None:
    """`replica status`, `replica verify` (equal; then a replica altered behind the feed's back:
    the differing id range is named, exit 1) and `replica rebuild` (equal again), as an
    operator runs them against the node's data directory."""
    import json

    from tests.conftest import run_process, smki_cli

    repo = await start_repository(tmp_path, pki, fresh_db)
    try:
        await asyncio.to_thread(lodge_pki, Running(repo, pki))
        await _caught_up(repo)
    finally:
        await repo.stop()
    env = {**cli_env(), "SMKI_DATABASE__URL": fresh_db}
    cli = [*smki_cli(), "replica"]
    where = ["--data-dir", str(tmp_path)]
    code, out, err = await run_process(*cli, "status", *where, timeout=60, env=env)
    assert code == 0, err
    state = json.loads(out)
    assert state["behind_changes"] == 0 and state["certs"] > 0 and state["bytes"] > 0
    code, out, err = await run_process(*cli, "verify", *where, timeout=60, env=env)
    assert code == 0 and b"equals the store" in out, (out, err)

    # a status changed in the replica only (as a lost write would leave it)
    replica = Replica(tmp_path / "replica", map_size=1 << 30)
    replica.open()
    try:
        some = next(iter(replica.ca_certificates()))
        with replica.write() as w:
            assert w.set_status(some.id, "N" if some.lodged_status != "N" else "P", False)
    finally:
        replica.close()
    code, out, err = await run_process(*cli, "verify", "--no-catch-up", *where, timeout=60,
                                       env=env)
    assert code == 1 and b"differs from the store" in out and b"certificates with ids 0-99999" \
        in out and b"same count, different contents" in out, (out, err)
    assert b"replica rebuild" in err
    code, out, err = await run_process(*cli, "rebuild", *where, timeout=120, env=env)
    assert code == 0 and b"replica rebuilt" in out, (out, err)
    code, out, err = await run_process(*cli, "verify", *where, timeout=60, env=env)
    assert code == 0, (out, err)
    # no replica at all: a clear error, not a traceback
    import shutil

    shutil.rmtree(tmp_path / "replica")
    code, out, err = await run_process(*cli, "verify", *where, timeout=60, env=env)
    assert code == 1 and b"no replica at" in err and b"Traceback" not in err



async def test_another_process_takes_over_feeding_when_the_feeder_dies(
        tmp_path: Path, pki: dict[str, Any], fresh_db: str) -> None:
    """Two processes of one node share its replica: a `serve` process that feeds it, and a
    server in this process that only reads it. The feeder is killed (SIGKILL); within seconds
    the reader takes the feeder role (the kernel released the flock) and its answers follow
    the lodgings made after the kill."""
    node_a = await start_repository(tmp_path / "a", pki, fresh_db)
    a = Running(node_a, pki)
    conf = tmp_path / "b.toml"
    conf.write_text(
        f'[database]\nurl = "{fresh_db}"\n[listeners]\nhttp = "127.0.0.1:0"\nhttps = ""\n'
        'lodge = ""\nldap = ""\nldaps = ""\nsftp = ""\nmetrics = ""\n[extracts]\n'
        'schedule = false\n[replica]\npoll_seconds = 0.05\n')
    cfg = make_config(tmp_path / "b", pki, fresh_db)
    replica_path = cfg.path(cfg.replica.path)
    feeder = reader = None
    try:
        await add_user(node_a, "tester", TEST_KEY)
        await asyncio.to_thread(lodge_pki, a)
        feeder = _serve(tmp_path / "b", conf)
        deadline = time.monotonic() + 120
        while not ((replica_path / "data.mdb").exists() and _replica_state(replica_path)[0]):
            assert feeder.poll() is None, "the feeding process died"
            assert time.monotonic() < deadline, "the feeding process built no replica"
            await asyncio.sleep(0.2)
        reader = await asyncio.wait_for(start_repository(tmp_path / "b", pki, fresh_db), 120)
        assert reader.feeder is not None and not reader.feeder.is_feeder
        feeder.send_signal(signal.SIGKILL)
        await asyncio.to_thread(feeder.wait, 10)
        pem, certs = _devices(a, 50, 30_000_000)
        client = a.client()
        try:
            assert (await asyncio.to_thread(client.certificates, pem)).status == 200
        finally:
            client.close()
        base = f"http://127.0.0.1:{reader.bound['http'].port}"
        deadline = time.monotonic() + 30
        while True:
            status, _, _ = await asyncio.to_thread(
                http_get, f"{base}/certificates/{certs[-1].serial_number:x}",
                {"X-API-Key": TEST_KEY})
            if status == 200 and reader.feeder.is_feeder:
                break
            assert time.monotonic() < deadline, (status, reader.feeder.is_feeder)
            await asyncio.sleep(0.2)
    finally:
        if feeder is not None and feeder.poll() is None:
            feeder.kill()
            await asyncio.to_thread(feeder.wait, 10)
        if reader is not None:
            await reader.stop()
        await node_a.stop()
