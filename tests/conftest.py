"""Shared fixtures: one embedded PostgreSQL and one test PKI per session, and a running
repository (every listener on an ephemeral loopback port, real TLS) per test module.
Nothing is mocked: tests talk to the server over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from repository_server import config as config_mod
from repository_server.server import Repository
from repository_server.store.embedded import EmbeddedPostgres

ROOT = Path(__file__).resolve().parents[1]
TEST_KEY = "test-key-3f9a1c22d0e1"  # the API key of user "tester" in every `server`
REALDATA = ROOT.parent / "shared" / "realdata"


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """The same event loop as production (uvloop), so tests see what users see."""
    import uvloop

    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("smki")


@pytest.fixture(scope="session")
def pki(session_dir: Path) -> dict[str, Any]:
    """A small test PKI: 10 devices, 24 organisation certificates."""
    from repository_server.pki.testpki import TestPkiParams, generate, load_manifest

    out = session_dir / "pki"
    generate(out, TestPkiParams(devices=10, organisations=24, workers=2, seed=7))
    manifest = load_manifest(out, devices=True)  # objects include the 20 device certificates
    manifest["dir"] = out
    return manifest


@pytest.fixture(scope="session")
def embedded(session_dir: Path) -> Iterator[EmbeddedPostgres]:
    pg = EmbeddedPostgres(session_dir / "pgdata-owner")
    pg.acquire()
    yield pg
    pg.release()


async def create_database(embedded: EmbeddedPostgres) -> str:
    """A new empty database on the shared embedded server; its DSN."""
    name = "t_" + uuid.uuid4().hex[:12]
    admin = await asyncpg.connect(embedded.dsn)
    await admin.execute(f"CREATE DATABASE {name}")
    await admin.close()
    return embedded.dsn.replace("/postgres?", f"/{name}?")


@pytest_asyncio.fixture(loop_scope="session")
async def fresh_db(embedded: EmbeddedPostgres) -> AsyncIterator[str]:
    """A new empty database on the shared embedded server; its DSN."""
    yield await create_database(embedded)


def make_config(data_dir: Path, pki: dict[str, Any], dsn: str, **over: Any) -> config_mod.Config:
    pki_dir: Path = pki["dir"]
    overrides: dict[str, Any] = {
        "database": {"url": dsn},
        "listeners": {"http": "127.0.0.1:0", "https": "127.0.0.1:0", "lodge": "127.0.0.1:0",
                      "ldap": "127.0.0.1:0", "ldaps": "127.0.0.1:0", "sftp": "127.0.0.1:0",
                      "metrics": "127.0.0.1:0"},
        "tls": {"cert": str(pki_dir / pki["tls"]["cert"]), "key": str(pki_dir / pki["tls"]["key"])},
        "lodge": {"client_ca": str(pki_dir / pki["dcc_client"]["ca"]),
                  "client_subject": pki["dcc_client"]["subject"]},
        "log": {"access_log": False},
        "extracts": {"schedule": False},  # tests produce extracts when they mean to
    }
    for section, values in over.items():
        overrides.setdefault(section, {}).update(values)
    return config_mod.load(None, data_dir=str(data_dir), environ={}, overrides=overrides)


class Running:
    """A started repository and what a test needs to talk to it."""

    def __init__(self, repo: Repository, pki: dict[str, Any]) -> None:
        self.repo = repo
        self.pki = pki
        self.pki_dir: Path = pki["dir"]

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.repo.bound['http'].port}"

    @property
    def https(self) -> str:
        return f"https://localhost:{self.repo.bound['https'].port}"

    @property
    def ldap(self) -> str:
        return f"ldap://127.0.0.1:{self.repo.bound['ldap'].port}"

    @property
    def ldaps(self) -> str:
        return f"ldaps://127.0.0.1:{self.repo.bound['ldaps'].port}"  # the certificate has an IP SAN

    @property
    def metrics(self) -> str:
        """The operations listener's /metrics (never on the read listeners)."""
        return f"http://127.0.0.1:{self.repo.bound['metrics'].port}/metrics"

    @property
    def lodge_url(self) -> str:
        return f"https://localhost:{self.repo.bound['lodge'].port}"

    def path(self, rel: str) -> Path:
        return self.pki_dir / rel

    @property
    def tls_ca(self) -> str:
        return str(self.path(self.pki["tls"]["ca"]))

    @property
    def client_cert(self) -> tuple[str, str]:
        d = self.pki["dcc_client"]
        return str(self.path(d["cert"])), str(self.path(d["key"]))

    def client(self, cert: tuple[str, str] | None = None) -> Any:
        from repository_server.cli.lodge_client import LodgeClient

        c, k = cert or self.client_cert
        return LodgeClient(self.lodge_url, c, k, self.tls_ca)

    def objects(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.pki["objects"] if o["kind"] == kind]

    def ca(self, name: str) -> tuple[Any, Any]:
        """A test PKI CA by manifest name ("issuing-oca", "issuing-dca", ...): (cert, key)."""
        from tests.pkitools import load_cert, load_key

        obj = next(o for o in self.pki["objects"] if o.get("name") == name)
        return load_cert(self.path(obj["path"])), load_key(self.path(obj["key"]))

    def next_oca_crl(self, number: int, *serials: int) -> bytes:
        """A new Organisation CRL (DER): the test PKI's, with `serials` revoked too."""
        from cryptography import x509

        from tests.pkitools import crl

        oca, key = self.ca("issuing-oca")
        current = x509.load_der_x509_crl(self.path(self.objects("crl")[0]["path"]).read_bytes())
        return crl(oca, key, number, [e.serial_number for e in current] + list(serials))


async def start_repository(data_dir: Path, pki: dict[str, Any], dsn: str,
                           **over: Any) -> Repository:
    repo = Repository(make_config(data_dir, pki, dsn, **over))
    await repo.start()
    return repo


async def add_user(repo: Repository, name: str, key: str | None, role: str = "party") -> None:
    """A user with this API key, as `smki-repository users add NAME --api-key KEY` makes it,
    known to the running server before this returns."""
    from repository_server.cli import admin

    assert repo.store is not None and repo.accounts is not None
    await admin.users_add(repo.store, name, role=role, api_key=key, with_key=key is not None)
    await repo.accounts.load()


@contextlib.asynccontextmanager
async def running_repository(data_dir: Path, pki: dict[str, Any], dsn: str, *, lodge: bool = False,
                             **over: Any) -> AsyncIterator[Running]:
    """A started repository with user "tester" (TEST_KEY), the test PKI lodged through the
    mTLS API if `lodge`; stopped on exit."""
    repo = await start_repository(data_dir, pki, dsn, **over)
    try:
        await add_user(repo, "tester", TEST_KEY)
        running = Running(repo, pki)
        if lodge:
            await asyncio.to_thread(lodge_pki, running)
        yield running
    finally:
        await repo.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def server(tmp_path: Path, pki: dict[str, Any], fresh_db: str) -> AsyncIterator[Running]:
    """An empty repository (fresh database) with every listener up."""
    async with running_repository(tmp_path, pki, fresh_db) as running:
        yield running


def lodge_pki(running: Running) -> None:
    """Lodge the whole test PKI through the real lodging API (as the demo does)."""
    from repository_server.cli.lodge_client import lodge_manifest

    client = running.client()
    try:
        failures = lodge_manifest(client, running.pki_dir, running.pki, out=lambda _l: None)
    finally:
        client.close()
    assert failures == 0


@pytest_asyncio.fixture(loop_scope="session")
async def loaded(server: Running) -> Running:
    """A repository holding the whole test PKI, lodged through the mTLS API."""
    await asyncio.to_thread(lodge_pki, server)
    return server


def smki_cli() -> list[str]:
    return [sys.executable, "-m", "repository_server"]


async def run_process(*args: str, timeout: float, merge_stderr: bool = False,
                      **kw: Any) -> tuple[int, bytes, bytes]:
    """Run a program without blocking the event loop: (exit code, stdout, stderr); killed
    and TimeoutError raised if it takes longer than `timeout` seconds."""
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT if merge_stderr else asyncio.subprocess.PIPE, **kw)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out, err or b""


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMKI_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def client_ssl(running: Running, cert: tuple[str, str] | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=running.tls_ca)
    if cert:
        ctx.load_cert_chain(*cert)
    return ctx


def http_get(url: str, headers: dict[str, str] | None = None, method: str = "GET",
             ca: str | None = None, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """One HTTP(S) request: status, lower-cased headers, body (a blocking client: call it
    through asyncio.to_thread from tests that share the server's event loop)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    if parts.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, parts.port, timeout=10, context=ssl.create_default_context(cafile=ca))
    else:
        conn = http.client.HTTPConnection(host, parts.port, timeout=10)
    try:
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=body,
                     headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@contextlib.asynccontextmanager
async def loop_stalls(stall: float, every: float) -> AsyncIterator[None]:
    """A server running in this process stops answering for `stall` seconds in every `every`:
    the event loop is blocked, as a starved or paused process is, while clients (in other
    threads or processes) keep sending; their requests wait in the kernel's buffers."""
    async def stall_forever() -> None:
        while True:
            await asyncio.sleep(every - stall)
            time.sleep(stall)  # blocks the loop: the fault under test

    task = asyncio.create_task(stall_forever())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
