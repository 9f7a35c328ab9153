"""Operating the server: /metrics on its own listener, signals (reload on SIGHUP, clean
shutdown on every terminating one), commands refusing a data directory without a store, a
listener port already taken, and the portal's per-deployment CSRF key. Real processes,
real sockets, real TLS."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from repository_server.cli import admin
from repository_server.config import ConfigError
from tests.conftest import TEST_KEY, Running, cli_env, http_get, run_process, smki_cli
from tests.test_process import free_port


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
    from tests.conftest import create_database, start_repository
    from tests.portal_client import PortalClient

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


# -- signals -----------------------------------------------------------------------------------
def _postgres_processes(data: Path) -> list[int]:
    """Processes running with this data directory's pgdata (the embedded PostgreSQL)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(data / "pgdata").encode() in cmdline:
                found.append(int(entry.name))
    return found


def _served_certificate(port: int) -> str:
    """The subject of the certificate the https listener sends now, as openssl s_client
    prints it."""
    res = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                          "-servername", "localhost"], input=b"", capture_output=True,
                         timeout=30)
    found = re.search(rb"^subject=(.*)$", res.stdout, re.M)
    assert found, res.stdout + res.stderr
    return found.group(1).decode()


def _cpm_received(data: Path, conf: Path) -> int:
    res = subprocess.run([*smki_cli(), "report", "cpm", "--json", "--config", str(conf)],
                         capture_output=True, text=True, timeout=120, env=_env())
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    return sum(op["received"] for i in report["interfaces"] for op in i["operations"])


def _answers(url: str) -> bool:
    try:
        return http_get(url)[0] == 200
    except OSError:
        return False


class _Serve:
    """`smki-repository serve` as a separate process, its log in a file."""

    def __init__(self, conf: Path, work: Path, name: str, *extra: str) -> None:
        self.pid_file = work / "serve.pid"
        self.log = work / f"{name}.log"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([*smki_cli(), "serve", "--config", str(conf),
                                          "--pid-file", str(self.pid_file), *extra],
                                         stdout=log, stderr=subprocess.STDOUT, env=_env(),
                                         start_new_session=True)

    def ready(self, base: str) -> None:
        """Once the pid file is written and /readyz answers 200."""
        deadline = time.monotonic() + 120
        while not self.pid_file.exists() or not _answers(f"{base}/readyz"):
            assert self.proc.poll() is None, self.log_text()[-3000:]
            assert time.monotonic() < deadline, self.log_text()[-3000:]
            time.sleep(0.1)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def __enter__(self) -> _Serve:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:  # the test failed: do not leave it (or its workers) running
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _tls_files(target: Path, cert: bytes, key: bytes) -> None:
    """Replace the server certificate files the way an operator's renewal does (new files
    renamed over the old)."""
    for name, data in (("server.pem", cert), ("server.key.pem", key)):
        (target / (name + ".new")).write_bytes(data)
        (target / (name + ".new")).replace(target / name)


def _signal_setup(tmp_path: Path, pki: dict[str, Any]) -> tuple[Path, Path, dict[str, int]]:
    """A configuration for `serve` with http, https and metrics on free ports, an embedded
    PostgreSQL in tmp_path/var, the test PKI's server certificate copied to tmp_path/tls and
    an hour between CPM 8 flushes: (configuration file, data directory, ports)."""
    pki_dir: Path = pki["dir"]
    tls = tmp_path / "tls"
    tls.mkdir()
    first = (pki_dir / pki["tls"]["cert"]).read_bytes(), (pki_dir / pki["tls"]["key"]).read_bytes()
    _tls_files(tls, *first)
    data = tmp_path / "var"
    ports = {name: free_port() for name in ("http", "https", "metrics")}
    dcc = pki["dcc_client"]
    conf = tmp_path / "repo.toml"
    conf.write_text(f"""
data_dir = "{data}"
[listeners]
http = "127.0.0.1:{ports['http']}"
https = "127.0.0.1:{ports['https']}"
metrics = "127.0.0.1:{ports['metrics']}"
lodge = ""
ldap = ""
ldaps = ""
sftp = ""
[tls]
cert = "{tls / 'server.pem'}"
key = "{tls / 'server.key.pem'}"
[lodge]
client_ca = "{pki_dir / dcc['ca']}"
client_subject = "{dcc['subject']}"
[extracts]
schedule = false
[service_levels]
flush_seconds = 3600
""")
    return conf, data, ports


@pytest.mark.slow
def test_signals_reload_and_stop_cleanly(tmp_path: Path, pki: dict[str, Any]) -> None:
    """A real `serve` with its embedded PostgreSQL: SIGHUP sends the new certificate to new
    connections (openssl s_client) while a connection opened before goes on; a broken
    certificate is refused and nothing changes; SIGTERM, SIGINT and SIGQUIT each stop it
    cleanly: pid file gone, PostgreSQL stopped, the CPM 8 counts of the last requests in the
    store (the flush interval is an hour: only the shutdown flush can have written them)."""
    from tests.pkitools import key_pem, pem, self_signed_ca

    conf, data, ports = _signal_setup(tmp_path, pki)
    pki_dir: Path = pki["dir"]
    tls = tmp_path / "tls"
    renewed_cert, renewed_key = self_signed_ca("renewed.smki.test")
    base = f"http://127.0.0.1:{ports['http']}"
    requests = 0
    for number, sig in enumerate((signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)):
        with _Serve(conf, tmp_path, f"serve-{sig.name}") as server:
            server.ready(base)
            if number == 0:
                assert f"created a new store in {data.resolve()}" in server.log_text()
                assert "localhost" in _served_certificate(ports["https"])
                kept = http.client.HTTPSConnection(
                    "localhost", ports["https"], timeout=10,
                    context=ssl.create_default_context(cafile=str(pki_dir / pki["tls"]["ca"])))
                kept.request("GET", "/healthz")
                assert kept.getresponse().read() == b'{"status": "ok"}'
                _tls_files(tls, pem(renewed_cert), key_pem(renewed_key))
                settings = conf.read_text()
                conf.write_text(settings + '[log]\nlevel = "WARNING"\n')
                server.proc.send_signal(signal.SIGHUP)
                deadline = time.monotonic() + 20
                while "renewed.smki.test" not in _served_certificate(ports["https"]):
                    assert time.monotonic() < deadline, server.log_text()[-3000:]
                    time.sleep(0.2)
                logged = server.log_text().count('"GET /healthz"')
                kept.request("GET", "/healthz")  # the connection from before the reload
                assert kept.getresponse().read() == b'{"status": "ok"}'
                kept.close()
                assert server.log_text().count('"GET /healthz"') == logged  # WARNING now
                # a key that does not belong to the certificate: refused, nothing changes
                (tls / "server.key.pem").write_bytes(key_pem(self_signed_ca("x")[1]))
                server.proc.send_signal(signal.SIGHUP)
                deadline = time.monotonic() + 20
                while "SIGHUP: nothing reloaded" not in server.log_text():
                    assert time.monotonic() < deadline, server.log_text()[-3000:]
                    time.sleep(0.2)
                assert "renewed.smki.test" in _served_certificate(ports["https"])
                assert server.proc.poll() is None
                (tls / "server.key.pem").write_bytes(key_pem(renewed_key))
                conf.write_text(settings)  # back to INFO
                server.proc.send_signal(signal.SIGHUP)
                deadline = time.monotonic() + 20
                while "SIGHUP: reloaded tls.cert" not in server.log_text():
                    assert time.monotonic() < deadline, server.log_text()[-3000:]
                    time.sleep(0.2)
            else:
                assert "created a new store" not in server.log_text()
            for _ in range(5):  # counted, not flushed yet
                assert http_get(f"{base}/crls")[0] == 200
                requests += 1
            assert http_get(f"http://127.0.0.1:{ports['metrics']}/metrics")[0] == 200
            server.proc.send_signal(sig)
            assert server.proc.wait(60) == 0, server.log_text()[-3000:]
        assert f"{sig.name}: shutting down" in server.log_text()
        assert not server.pid_file.exists(), sig
        assert _postgres_processes(data) == [], (sig, server.log_text()[-3000:])
        assert "Traceback" not in server.log_text()
        assert _cpm_received(data, conf) == requests, sig
        assert _postgres_processes(data) == []


def _consecutive_free_ports() -> int:
    """P such that P and P + 1 are free (metrics of worker 0 and worker 1)."""
    while True:
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


@pytest.mark.slow
def test_workers_pass_signals_on(tmp_path: Path, pki: dict[str, Any]) -> None:
    """`serve --workers 2`: each worker's /metrics on its own port (metrics port + worker);
    SIGHUP to the supervisor reaches every worker (every new connection gets the new
    certificate); SIGQUIT to it stops all of them cleanly, each flushing its CPM 8 counts."""
    from tests.pkitools import key_pem, pem, self_signed_ca

    conf, data, ports = _signal_setup(tmp_path, pki)
    metrics = _consecutive_free_ports()
    base = f"http://127.0.0.1:{ports['http']}"
    with _Serve(conf, tmp_path, "workers", "--workers", "2", "--metrics",
               f"127.0.0.1:{metrics}") as server:
        server.ready(base)
        deadline = time.monotonic() + 120
        while not all(_answers(f"http://127.0.0.1:{metrics + i}/metrics") for i in (0, 1)):
            assert server.proc.poll() is None and time.monotonic() < deadline, \
                server.log_text()[-3000:]
            time.sleep(0.2)
        for _ in range(20):
            assert http_get(f"{base}/crls")[0] == 200
        renewed_cert, renewed_key = self_signed_ca("renewed.smki.test")
        _tls_files(tmp_path / "tls", pem(renewed_cert), key_pem(renewed_key))
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while not all("renewed.smki.test" in _served_certificate(ports["https"])
                      for _ in range(12)):  # new connections, spread over both workers
            assert time.monotonic() < deadline, server.log_text()[-3000:]
            time.sleep(0.2)
        assert server.log_text().count("SIGHUP: reloaded tls.cert") == 2
        server.proc.send_signal(signal.SIGQUIT)
        assert server.proc.wait(90) == 0, server.log_text()[-3000:]
    assert not server.pid_file.exists()
    assert not list((data / "run").glob("worker-*.pid"))
    assert _postgres_processes(data) == [], server.log_text()[-3000:]
    assert server.log_text().count("SIGTERM: shutting down") == 2
    assert _cpm_received(data, conf) == 20


async def test_reload_takes_a_new_dcc_client_ca(tmp_path: Path, pki: dict[str, Any],
                                                fresh_db: str) -> None:
    """What SIGHUP does for lodging (`Repository.reload`): a new lodge.client_ca file is
    used for new connections; one that cannot be used changes nothing."""
    from tests.conftest import client_ssl, start_repository
    from tests.pkitools import pem, self_signed_ca

    ca_file = tmp_path / "client-ca.pem"
    ca_file.write_bytes((pki["dir"] / pki["dcc_client"]["ca"]).read_bytes())
    # (running_repository's `lodge` is another thing)
    running = Running(await start_repository(tmp_path, pki, fresh_db,
                                             lodge={"client_ca": str(ca_file)}), pki)
    try:

        def whoami() -> int | str:
            ctx = client_ssl(running, running.client_cert)
            conn = http.client.HTTPSConnection("localhost", running.repo.bound["lodge"].port,
                                               timeout=10, context=ctx)
            try:
                conn.request("GET", "/lodge/whoami")
                return conn.getresponse().status
            except (ssl.SSLError, ConnectionError) as exc:
                return f"refused: {exc}"
            finally:
                conn.close()

        assert await asyncio.to_thread(whoami) == 200
        original = ca_file.read_bytes()
        ca_file.write_bytes(pem(self_signed_ca("Another DCC client CA")[0]))
        assert "lodge.client_ca" in running.repo.reload(running.repo.config)
        assert str(await asyncio.to_thread(whoami)).startswith("refused")
        ca_file.write_text("not a certificate\n")
        with pytest.raises(ConfigError, match=r"lodge\.client_ca"):
            running.repo.reload(running.repo.config)
        assert str(await asyncio.to_thread(whoami)).startswith("refused")
        ca_file.write_bytes(original)
        running.repo.reload(running.repo.config)
        assert await asyncio.to_thread(whoami) == 200
    finally:
        await running.repo.stop()


@pytest.mark.slow
def test_a_stop_signal_during_start_up_stops_cleanly(tmp_path: Path, pki: dict[str, Any]) -> None:
    """A server that cannot become ready (its replica cannot be made) waits in start-up with
    PostgreSQL running; SIGTERM then stops it there, PostgreSQL included."""
    conf, data, _ = _signal_setup(tmp_path, pki)
    conf.write_text(conf.read_text() + '[replica]\npath = "/proc/no-replica-here"\n')
    with _Serve(conf, tmp_path, "starting") as server:
        deadline = time.monotonic() + 120
        while "read replica not ready" not in server.log_text():
            assert server.proc.poll() is None and time.monotonic() < deadline, \
                server.log_text()[-3000:]
            time.sleep(0.1)
        assert _postgres_processes(data)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0, server.log_text()[-3000:]
    assert "SIGTERM: shutting down" in server.log_text()
    assert _postgres_processes(data) == [], server.log_text()[-3000:]
    assert not server.pid_file.exists() and "Traceback" not in server.log_text()


async def test_a_key_that_is_not_the_certificates_is_one_line(tmp_path: Path, pki: dict[str, Any],
                                                              fresh_db: str) -> None:
    from tests.pkitools import key_pem, self_signed_ca

    wrong = tmp_path / "wrong.key.pem"
    wrong.write_bytes(key_pem(self_signed_ca("x")[1]))
    cert = pki["dir"] / pki["tls"]["cert"]
    code, _, err = await run_process(
        *_serve_args(tmp_path / "var", https="127.0.0.1:0"), timeout=120,
        env=_env(database__url=fresh_db, tls__cert=str(cert), tls__key=str(wrong)))
    assert code == 2 and "Traceback" not in err.decode(), err
    assert err.decode().startswith(f"configuration error: tls.cert/tls.key: cannot use {cert}"
                                   f" with {wrong}: KEY_VALUES_MISMATCH"), err
