"""Operating the server: /metrics on its own listener, signals (reload on SIGHUP, clean
shutdown on every terminating one), commands refusing a data directory without a store, a
listener port already taken, and the portal's per-deployment CSRF key. Real processes,
real sockets, real TLS."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import socket
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from repository_server import admin

from .conftest import TEST_KEY, Running, cli_env, http_get, run_process, smki_cli
from .test_process import free_port

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _env(**settings: str) -> dict[str, str]:
    env = cli_env()
    env.update({f"SMKI_{k.upper()}": v for k, v in settings.items()})
    return env


# -- /metrics --------------------------------------------------------------------------------
async def test_metrics_only_on_the_operations_listener(server: Running) -> None:
    """/metrics names users (demand per user): served on listeners.metrics only, and no user
    name reaches an anonymous client on the read listeners."""
    repo = server.repo
    assert repo.store is not None and repo.levels is not None
    await admin.users_forecast(repo.store, "tester", 10, None)
    status, _, _ = await asyncio.to_thread(
        http_get, f"{server.http}/certificates/0102?apikey={TEST_KEY}")
    assert status == 404
    await repo.levels.flush()
    await repo.levels.refresh_demand_gauges()
    for base, ca in ((server.http, None), (server.https, server.tls_ca)):
        status, _, body = await asyncio.to_thread(http_get, f"{base}/metrics", ca=ca)
        assert status == 404 and b"smki_" not in body
        for path in ("/healthz", "/readyz", "/nothing-here", "/certificates/zz",
                     "/ops/reports/demand"):
            status, _, body = await asyncio.to_thread(http_get, f"{base}{path}", ca=ca)
            assert b"tester" not in body, (path, status, body)
    status, headers, body = await asyncio.to_thread(http_get, server.metrics)
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert b'smki_demand_usage_ratio{band="day",user="tester"}' in body
    assert b'smki_http_requests_total{listener="http"' in body
    status, _, body = await asyncio.to_thread(http_get, server.metrics.replace("/metrics", "/x"))
    assert status == 404 and b"/metrics" in body


# -- commands and a data directory without a store ---------------------------------------------
STORE_COMMANDS = (["users", "list"], ["users", "add", "someone"], ["report", "cpm"],
                  ["report", "demand"], ["extract", "full"], ["export-ldif"],
                  ["replica", "status"])


async def test_commands_refuse_a_data_dir_without_a_store(tmp_path: Path, fresh_db: str) -> None:
    """A wrong or missing --data-dir (or a database without our schema) is refused with exit
    2 and "no store in ...", and nothing is created there."""
    missing = tmp_path / "nowhere"
    for command in STORE_COMMANDS:
        code, out, err = await run_process(*smki_cli(), *command, "--data-dir", str(missing),
                                           timeout=120, env=_env())
        text = err.decode()
        assert code == 2, (command, code, out, text)
        assert f"error: no store in {missing.resolve()}" in text and "Traceback" not in text
        assert not missing.exists(), command
    # an external database (database.url) without our schema: the same, and it stays empty
    for command in STORE_COMMANDS:
        code, out, err = await run_process(*smki_cli(), *command, "--data-dir", str(missing),
                                           timeout=120, env=_env(database__url=fresh_db))
        assert code == 2 and f"no store in {fresh_db}" in err.decode(), (command, err)
    conn = await asyncpg.connect(fresh_db)
    try:
        assert await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
    finally:
        await conn.close()
    assert not missing.exists()


# -- a listener port already in use --------------------------------------------------------------
def _serve_args(data: Path, **listeners: str) -> list[str]:
    """`serve` with only http and metrics (ephemeral ports unless given)."""
    chosen = {"http": "127.0.0.1:0", "metrics": "127.0.0.1:0", "https": "", "lodge": "",
              "ldap": "", "ldaps": "", "sftp": "", **listeners}
    args = [*smki_cli(), "serve", "--data-dir", str(data)]
    for name, value in chosen.items():
        args += [f"--{name}", value]
    return args


async def test_a_listener_port_in_use_is_one_line(tmp_path: Path, fresh_db: str) -> None:
    env = _env(database__url=fresh_db, log__level="ERROR", extracts__schedule="false")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for name in ("http", "metrics"):
            code, out, err = await run_process(
                *_serve_args(tmp_path / "var", **{name: f"127.0.0.1:{port}"}), timeout=180,
                env=env)
            lines = [ln for ln in err.decode().splitlines() if ln.strip()]
            assert code == 2, (code, out, lines)
            assert lines == [f"configuration error: listeners.{name}: 127.0.0.1:{port} is"
                             " already in use"], lines
        # with --workers, the worker's line, and the same exit status
        code, _, err = await run_process(
            *_serve_args(tmp_path / "var", http=f"127.0.0.1:{port}",
                         metrics=f"127.0.0.1:{free_port()}"), "--workers", "2", timeout=180,
            env=env)
        assert code == 2, err
        assert f"listeners.http: 127.0.0.1:{port} is already in use" in err.decode()
        assert "Traceback" not in err.decode()


# -- the portal's CSRF key ---------------------------------------------------------------------
_SOURCE_KEY = b"smki-portal-csrf-v1"  # the constant key the source used to hold


async def test_csrf_key_is_per_deployment_and_shared_by_its_nodes(
        tmp_path: Path, pki: dict[str, Any], fresh_db: str, embedded: Any) -> None:
    from .conftest import create_database, start_repository
    from .portal_client import PortalClient

    a = await start_repository(tmp_path / "a", pki, fresh_db)
    b = await start_repository(tmp_path / "b", pki, fresh_db)  # a second node, same store
    other_db = await create_database(embedded)
    other = await start_repository(tmp_path / "c", pki, other_db)  # another deployment
    try:
        node_a, node_b, elsewhere = (Running(r, pki).http for r in (a, b, other))
        # a token made with the key from the source, for a cookie the attacker chose, is refused
        planted = "a." + "x" * 43
        forged = hmac.new(_SOURCE_KEY, planted.encode(), hashlib.sha256).hexdigest()[:40]
        async with PortalClient(node_a) as c:
            c.cookie = planted
            r = await c.post("/portal/sign-in", {"csrf": forged, "username": "x",
                                                 "password": "y"})
            assert r.status == 403 and "CSRF check" in r.text
        # a form from node a is accepted by node b (a wrong password, not a CSRF refusal)
        async with PortalClient(node_a) as c:
            form = await c.get("/portal/sign-in")
            token = form.csrf()
            async with PortalClient(node_b) as on_b:
                on_b.cookie = c.cookie
                r = await on_b.post("/portal/sign-in", {"csrf": token, "username": "x",
                                                        "password": "y"})
                assert r.status != 403 and "CSRF check" not in r.text, r.text
                assert (await on_b.get("/portal/sign-in")).csrf() == token
            # ... and not by another deployment
            async with PortalClient(elsewhere) as there:
                there.cookie = c.cookie
                assert (await there.get("/portal/sign-in")).csrf() != token
                r = await there.post("/portal/sign-in", {"csrf": token, "username": "x",
                                                         "password": "y"})
                assert r.status == 403
    finally:
        for repo in (a, b, other):
            await repo.stop()


async def test_deployment_secret_is_made_once_under_concurrency(fresh_db: str) -> None:
    from repository_server.store.db import Store

    stores = [await Store.connect(fresh_db, min_size=1, max_size=4) for _ in range(3)]
    try:
        got = await asyncio.gather(*(stores[i % 3].deployment_secret("race")
                                     for i in range(24)))
        assert len(set(got)) == 1 and len(got[0]) == 32
        assert await stores[0].deployment_secret("another") != got[0]
        assert await stores[2].deployment_secret("race") == got[0]
    finally:
        for store in stores:
            await store.close()
