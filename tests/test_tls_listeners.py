"""The TLS listeners (lodge, https, ldaps) against anonymous peers, over real sockets:
memory that comes back after rounds of idle and half-open handshakes (a `serve` process's
RSS), connection caps that count handshakes, refused handshakes counted per minute instead
of audited one by one, and the TLS alert a refused client certificate gets."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from prometheus_client import generate_latest

from tests.conftest import (
    Running,
    cli_env,
    client_ssl,
    http_get,
    run_process,
    running_repository,
    smki_cli,
    start_repository,
)
from tests.ldaptools import free_port
from tests.pkitools import client_cert, load_cert, load_key, self_signed_ca, write_pair

pytestmark = pytest.mark.asyncio(loop_scope="session")

TLS_LISTENERS = ("lodge", "https", "ldaps")
HALF_A_CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01"  # a record header and the first byte


# -- memory ---------------------------------------------------------------------------------
def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _serve_config(path: Path, running_pki: dict[str, Any], dsn: str,
                  ports: dict[str, int]) -> None:
    pki_dir: Path = running_pki["dir"]
    dcc = running_pki["dcc_client"]
    path.write_text(f"""
data_dir = "{path.parent / 'var'}"
[database]
url = "{dsn}"
[listeners]
http = "127.0.0.1:{ports['http']}"
https = "127.0.0.1:{ports['https']}"
lodge = "127.0.0.1:{ports['lodge']}"
ldap = ""
ldaps = "127.0.0.1:{ports['ldaps']}"
sftp = ""
metrics = "127.0.0.1:{ports['metrics']}"
[tls]
cert = "{pki_dir / running_pki['tls']['cert']}"
key = "{pki_dir / running_pki['tls']['key']}"
handshake_timeout_seconds = 1.0
refusal_flush_seconds = 0.5
[lodge]
client_ca = "{pki_dir / dcc['ca']}"
client_subject = "{dcc['subject']}"
max_connections = 4000
[extracts]
schedule = false
[log]
access_log = false
""")


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "serve exited at start"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except Exception:  # not up yet
            time.sleep(0.3)
    raise AssertionError(f"{url} not ready")


def _round(ports: list[int], idle: int, half_open: int, wait: float) -> int:
    """Open `idle` connections that send nothing and `half_open` that send the start of a
    ClientHello to each port, keep them until the server's handshake timeout has closed
    them, then close our ends. The number of connections that could not be made."""
    socks = []
    failed = 0
    try:
        for port in ports:
            for i in range(idle + half_open):
                try:
                    s = socket.create_connection(("127.0.0.1", port), timeout=5)
                    if i >= idle:
                        s.sendall(HALF_A_CLIENT_HELLO)
                except OSError:
                    failed += 1
                    continue
                socks.append(s)
        time.sleep(wait)
    finally:
        for s in socks:
            s.close()
    return failed


async def test_memory_comes_back_after_rounds_of_stalled_handshakes(
        tmp_path: Path, pki: dict[str, Any], fresh_db: str) -> None:
    """Rounds of 150 idle and 150 half-open connections to each TLS listener of a `serve`
    process, dropped by the (1 s) handshake timeout: its RSS stays near where it started.
    (Before: about 50 KB a connection stayed with the process after every round.)"""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # 900 sockets here and in serve
    if soft < 4096 and (hard == resource.RLIM_INFINITY or hard > soft):
        resource.setrlimit(resource.RLIMIT_NOFILE, (
            4096 if hard == resource.RLIM_INFINITY else min(4096, hard), hard))
    ports = {name: free_port() for name in ("http", "metrics", *TLS_LISTENERS)}
    conf = tmp_path / "repo.toml"
    _serve_config(conf, pki, fresh_db, ports)
    log_path = tmp_path / "serve.log"  # a file: a full pipe would stall the server
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen([*smki_cli(), "serve", "--config", str(conf)], env=cli_env(),
                                stdout=subprocess.DEVNULL, stderr=log_file)
    try:
        await asyncio.to_thread(_wait_ready, f"http://127.0.0.1:{ports['http']}/readyz", proc)
        await asyncio.sleep(2)
        baseline = _rss_kb(proc.pid)
        after = []
        failed = 0
        for _ in range(4):
            failed += await asyncio.to_thread(_round, [ports[n] for n in TLS_LISTENERS], 150,
                                              150, 1.6)
            await asyncio.sleep(1.5)  # the refusal counts are flushed (and memory trimmed)
            after.append(_rss_kb(proc.pid))
        assert proc.poll() is None
        grown = [kb - baseline for kb in after]
        assert max(grown) < 8 * 1024, f"RSS {baseline} KB, after each round: {after}"
        assert failed == 0, f"{failed} connections could not be made"
        # the refusals were counted, by listener and reason
        _, _, body = await asyncio.to_thread(
            http_get, f"http://127.0.0.1:{ports['metrics']}/metrics")
        text = body.decode()
        for name in TLS_LISTENERS:
            assert re.search(rf'smki_tls_refused_total{{listener="{name}",reason="timeout"}}'
                             r" 1200\.0", text), name
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 60)
    log = log_path.read_text()
    assert "Traceback" not in log, log[-3000:]
    # one line per listener and minute, not one per connection
    lines = [line for line in log.splitlines() if "TLS handshake(s) refused" in line]
    assert 3 <= len(lines) <= 6, lines


# -- connection caps ------------------------------------------------------------------------
def _closed_at_once(port: int, held: int) -> tuple[bool, bool]:
    """Hold `held` connections that send nothing; is one more closed at once? And after
    they go, is a new one kept open (not closed at once)?"""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(held)]
    time.sleep(0.3)

    def closed(s: socket.socket) -> bool:
        s.settimeout(1.5)
        try:
            return s.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        finally:
            s.close()

    try:
        extra = closed(socket.create_connection(("127.0.0.1", port), timeout=5))
    finally:
        for s in socks:
            s.close()
    time.sleep(0.5)
    return extra, closed(socket.create_connection(("127.0.0.1", port), timeout=5))


def _tls_works(running: Running, name: str) -> bool:
    ctx = client_ssl(running, running.client_cert if name == "lodge" else None)
    port = running.repo.bound[name].port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s, \
            ctx.wrap_socket(s, server_hostname="localhost") as tls:
        return tls.version() is not None


async def test_caps_count_connections_still_in_their_handshake(
        tmp_path: Path, pki: dict[str, Any], fresh_db: str) -> None:
    # (running_repository's `lodge` means "lodge the test PKI")
    repo = await start_repository(tmp_path, pki, fresh_db, lodge={"max_connections": 4},
                                  web={"max_connections": 4}, ldap={"max_connections": 4})
    try:
        running = Running(repo, pki)
        for name in TLS_LISTENERS:
            port = running.repo.bound[name].port
            extra, later = await asyncio.to_thread(_closed_at_once, port, 4)
            assert extra, f"{name}: a 5th connection (4 in their handshake) was kept open"
            assert not later, f"{name}: a connection under the cap was closed"
            assert await asyncio.to_thread(_tls_works, running, name)
        text = generate_latest(running.repo.metrics.registry).decode()
        for name in TLS_LISTENERS:
            assert f'smki_connections_over_cap_total{{listener="{name}"}} 1.0' in text, text
    finally:
        await repo.stop()


async def test_lodge_cap_defaults_to_256(tmp_path: Path, pki: dict[str, Any],
                                         fresh_db: str) -> None:
    async with running_repository(tmp_path, pki, fresh_db) as running:
        assert running.repo.config.lodge.max_connections == 256
        extra, later = await asyncio.to_thread(_closed_at_once,
                                               running.repo.bound["lodge"].port, 256)
        assert extra and not later


# -- refused handshakes: counted, not audited one by one --------------------------------------
def _no_cert_attempt(running: Running, source: str, cert: tuple[str, str] | None = None,
                     ) -> str:
    """GET /lodge/whoami from this source address: the status, or the error's name."""
    import http.client

    conn = http.client.HTTPSConnection("localhost", running.repo.bound["lodge"].port,
                                       context=client_ssl(running, cert), timeout=10,
                                       source_address=(source, 0))
    try:
        conn.request("GET", "/lodge/whoami")
        return str(conn.getresponse().status)
    except (ssl.SSLError, OSError) as exc:
        return type(exc).__name__
    finally:
        conn.close()


async def _summary(running: Running) -> list[dict[str, Any]]:
    store = running.repo.store
    assert store is not None
    rows = await store.pool.fetch("SELECT listener, reason, peer, sum(count)::int8 AS count"
                                  " FROM tls_refusals GROUP BY 1, 2, 3 ORDER BY 1, 2, 3")
    return [dict(r) for r in rows]


async def test_refused_handshakes_are_counted_per_minute_reason_and_peer(
        tmp_path: Path, pki: dict[str, Any], fresh_db: str,
        caplog: pytest.LogCaptureFixture) -> None:
    if time.time() % 60 > 40:  # the peer cap is per minute: stay inside one
        await asyncio.sleep(61 - time.time() % 60)
    caplog.set_level("WARNING", logger="repository_server.server")
    dcc_subject = x509.Name.from_rfc4514_string(pki["dcc_client"]["subject"])
    other_ca, other_key = self_signed_ca("Some Other CA")
    ca_cert = load_cert(pki["dir"] / pki["dcc_client"]["ca"])
    ca_key = load_key(pki["dir"] / pki["dcc_client"]["ca_key"])
    other = write_pair(tmp_path, "other", *client_cert(dcc_subject, other_ca, other_key))
    expired = write_pair(tmp_path, "expired",
                         *client_cert(dcc_subject, ca_cert, ca_key, expired=True))
    async with running_repository(tmp_path, pki, fresh_db, tls={
            "refusal_flush_seconds": 0.2, "refusal_peers_per_minute": 1,
            "handshake_timeout_seconds": 1.0}) as running:
        for _ in range(30):
            assert await asyncio.to_thread(_no_cert_attempt, running, "127.0.0.1") != "200"
        for _ in range(5):  # a second peer address: past the cap of 1, summed as "other"
            assert await asyncio.to_thread(_no_cert_attempt, running, "127.0.0.2") != "200"
        await asyncio.to_thread(_no_cert_attempt, running, "127.0.0.1", other)
        await asyncio.to_thread(_no_cert_attempt, running, "127.0.0.1", expired)
        idle = await asyncio.to_thread(socket.create_connection,
                                       ("127.0.0.1", running.repo.bound["lodge"].port))
        wrong = (str(running.path(pki["dcc_client"]["other_cert"])),
                 str(running.path(pki["dcc_client"]["other_key"])))
        assert await asyncio.to_thread(_no_cert_attempt, running, "127.0.0.1", wrong) == "403"
        expected = [
            {"listener": "lodge", "reason": "expired", "peer": "127.0.0.1", "count": 1},
            {"listener": "lodge", "reason": "no_certificate", "peer": "127.0.0.1", "count": 30},
            {"listener": "lodge", "reason": "no_certificate", "peer": "other", "count": 5},
            {"listener": "lodge", "reason": "timeout", "peer": "127.0.0.1", "count": 1},
            {"listener": "lodge", "reason": "unknown_ca", "peer": "127.0.0.1", "count": 1},
        ]
        for _ in range(50):  # flushed every 0.2 s, while the server runs
            if await _summary(running) == expected:
                break
            await asyncio.sleep(0.1)
        assert await _summary(running) == expected
        idle.close()
        store = running.repo.store
        assert store is not None
        audit = [r for r in await store.audit_entries() if r["action"] == "lodge.refused"]
        # the one refused request of an authenticated client is still audited, alone
        assert len(audit) == 1 and "is not the DCC identity" in audit[0]["detail"]["reason"]
        text = generate_latest(running.repo.metrics.registry).decode()
        assert 'smki_tls_refused_total{listener="lodge",reason="no_certificate"} 35.0' in text
        assert 'smki_tls_refused_total{listener="lodge",reason="unknown_ca"} 1.0' in text
        # no line per refusal: at most one per listener and minute so far
        assert len([r for r in caplog.records if "refused" in r.getMessage()]) <= 1
        env = {**cli_env(), "SMKI_DATABASE__URL": fresh_db}
        code, out, err = await run_process(*smki_cli(), "report", "tls-refusals", "--json",
                                           "--data-dir", str(tmp_path), timeout=120, env=env)
        assert code == 0, err.decode()
        rows = json.loads(out)["rows"]
        assert {(r["reason"], r["peer"], r["count"]) for r in rows} == {
            (e["reason"], e["peer"], e["count"]) for e in expected}
        code, out, err = await run_process(*smki_cli(), "report", "tls-refusals",
                                           "--data-dir", str(tmp_path), timeout=120, env=env)
        assert code == 0 and "no_certificate" in out.decode() and "38 in all" in out.decode()
    lines = [r.getMessage() for r in caplog.records if "TLS handshake(s) refused" in
             r.getMessage()]
    assert lines and all(line.startswith("lodge: ") for line in lines), lines
    assert len(lines) <= 2  # the minute may have turned during the test


# -- the TLS alert a refused client certificate gets ----------------------------------------
def _curl(running: Running, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "--cacert", running.tls_ca, *args,
                           f"{running.lodge_url}/lodge/whoami"],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("openssl") is None,
                    reason="curl and openssl needed")
async def test_refused_client_certificates_get_the_proper_tls_alert(
        server: Running, tmp_path: Path) -> None:
    dcc_subject = x509.Name.from_rfc4514_string(server.pki["dcc_client"]["subject"])
    other_ca, other_key = self_signed_ca("Some Other CA")
    ca_cert = load_cert(server.path(server.pki["dcc_client"]["ca"]))
    ca_key = load_key(server.path(server.pki["dcc_client"]["ca_key"]))
    other = write_pair(tmp_path, "other", *client_cert(dcc_subject, other_ca, other_key))
    expired = write_pair(tmp_path, "expired",
                         *client_cert(dcc_subject, ca_cert, ca_key, expired=True))
    # curl said "Empty reply from server" (exit 52) for each of these
    cases = [([], "alert certificate required"),
             (["--tls-max", "1.2"], "alert handshake failure"),
             (["--cert", other[0], "--key", other[1]], "alert unknown ca"),
             (["--cert", expired[0], "--key", expired[1]], "alert certificate expired"),
             # refused on the ClientHello itself (no AES-GCM suite offered)
             (["--tls-max", "1.2", "--ciphers", "ECDHE-ECDSA-CHACHA20-POLY1305",
               "--cert", server.client_cert[0], "--key", server.client_cert[1]],
              "alert handshake failure")]
    for args, alert in cases:
        out = await asyncio.to_thread(_curl, server, *args)
        assert alert in out.stderr, (args, out.returncode, out.stderr)
    port = server.repo.bound["lodge"].port
    out = await asyncio.to_thread(
        subprocess.run, ["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                         "-CAfile", server.tls_ca, "-cert", other[0], "-key", other[1], "-ign_eof"],
        input="GET /lodge/whoami HTTP/1.0\r\n\r\n", capture_output=True, text=True,
        timeout=30)
    assert "alert unknown ca" in out.stdout + out.stderr, out.stderr
    # the lodge command says what was wrong and which option to check
    doc = tmp_path / "note.txt"
    doc.write_text("hello")
    for cert, says in ((other, "unknown CA"), (expired, "expired")):
        code, _, err = await run_process(
            *smki_cli(), "lodge", "--url", server.lodge_url, "--cert", cert[0], "--key",
            cert[1], "--ca", server.tls_ca, str(doc), timeout=60, env=cli_env())
        text = err.decode()
        assert code == 1, text  # refused (2 is for the command's own mistakes)
        assert "the server refused our client certificate" in text and says in text, text
        assert "check --cert/--key" in text and "Traceback" not in text, text
    code, _, err = await run_process(
        *smki_cli(), "lodge", "--url", server.lodge_url, "--cert", server.client_cert[0],
        "--key", server.client_cert[1], "--ca", str(Path(other[0])), str(doc), timeout=60,
        env=cli_env())
    assert code == 2 and "check --ca" in err.decode(), err.decode()

