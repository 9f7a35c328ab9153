"""The server as a separate process, as operators run it: the demo from an empty data
directory, clean shutdown with no orphaned PostgreSQL, and crash safety (kill -9 in the
middle of a 50,000-certificate batch leaves all of it or none of it)."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from repository_server.cli.lodge_client import LodgeClient
from repository_server.pki.testpki import TestPkiParams, generate, load_manifest
from tests.conftest import cli_env, smki_cli
from tests.ports import free_port

pytestmark = pytest.mark.slow


def wait_http(url: str, timeout: float = 90) -> bytes:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                body: bytes = resp.read()
                return body
        except Exception as exc:  # not up yet
            last = exc
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer: {last}")


def postgres_running(data_dir: Path) -> bool:
    pid_file = data_dir / "pgdata" / "postmaster.pid"
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text().split()[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def ports_env() -> tuple[dict[str, str], dict[str, int]]:
    ports = {name: free_port() for name in ("http", "https", "lodge", "metrics")}
    env = cli_env()
    for name, port in ports.items():
        env[f"SMKI_LISTENERS__{name.upper()}"] = f"127.0.0.1:{port}"
    env["SMKI_LISTENERS__LDAP"] = ""
    env["SMKI_LISTENERS__LDAPS"] = ""
    env["SMKI_LISTENERS__SFTP"] = ""
    return env, ports


def start_demo(data: Path, env: dict[str, str], devices: int = 20
               ) -> tuple[subprocess.Popen[str], list[str], threading.Event]:
    """`smki-repository demo --devices 20` in `data`: the process, its output lines as they
    come, and an event set once it says it is up."""
    proc = subprocess.Popen([*smki_cli(), "demo", "--data-dir", str(data), "--devices",
                             str(devices)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "Press Ctrl-C to stop" in line:
                ready.set()

    threading.Thread(target=reader, daemon=True).start()
    return proc, lines, ready


def sign_in_status(portal: str, username: str, password: str) -> tuple[int, str]:
    """Sign in to the portal as a browser would (form, cookie, CSRF token): status, Location."""
    import urllib.parse

    parts = urllib.parse.urlsplit(portal)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request("GET", "/portal/sign-in")
        resp = conn.getresponse()
        form = resp.read().decode()
        cookie = (resp.getheader("Set-Cookie") or "").split(";")[0]
        found = re.search(r'name="csrf" value="([^"]+)"', form)
        assert found and cookie, form[:300]
        body = urllib.parse.urlencode({"csrf": found.group(1), "username": username,
                                       "password": password})
        conn.request("POST", "/portal/sign-in", body=body, headers={
            "Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"})
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("Location") or ""
    finally:
        conn.close()


def test_demo_from_empty_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "var"
    env, ports = ports_env()
    proc, lines, ready = start_demo(data, env)
    try:
        assert ready.wait(120), "".join(lines[-40:])
        text = "".join(lines)
        assert "lodging the test PKI through the mutual-TLS lodging API" in text
        assert "refusal" not in text
        manifest = load_manifest(data / "pki", devices=True)
        # every copy-paste curl command it printed works
        commands = [ln.strip() for ln in lines if ln.strip().startswith("curl ")]
        assert len(commands) >= 6
        # the operator user is named; commands of ours are this installation's own
        assert re.search(r"operator user demo-operator: API key \(shown only now\): \S+", text)
        own = Path(sys.executable).parent / "smki-repository"
        assert f"{own} extract full --data-dir {data}" in text, text
        # the schedule's first extract (it is due at once) came after the lodging: not empty
        extracts: list[dict[str, Any]] = []
        deadline = time.monotonic() + 60
        while not extracts and time.monotonic() < deadline:
            extracts = json.loads(wait_http(f"http://127.0.0.1:{ports['http']}/extracts"
                                            "?apikey=u3bg9gt38htd0j2"))
            time.sleep(0.2)
        first = extracts[-1]
        assert first["counts"].get("certificates", 0) >= 40 + 5, first
        for command in commands:
            res = subprocess.run(command, shell=True, capture_output=True, timeout=30)
            assert res.returncode == 0 and res.stdout, (command, res.stderr)
        device = next(o for o in manifest["objects"] if o["kind"] == "device")
        body = wait_http(f"http://127.0.0.1:{ports['http']}/certificates/{device['serial']}"
                         "?apikey=u3bg9gt38htd0j2")  # the demo's user for DCC Boxed's client
        assert body[:1] == b"\x30"
        crls = json.loads(wait_http(f"http://127.0.0.1:{ports['http']}/crls"))
        assert len(crls) == 3
        # the portal: its URL and a first password for demo-portal, to be changed at sign-in
        portal = re.search(r"portal \(browser\)\s+(\S+)", text)
        password = re.search(r"portal user demo-portal: initial portal password: (\S+)", text)
        assert portal and password, text
        assert sign_in_status(portal.group(1), "demo-portal", password.group(1)) == (
            303, "/portal/password")
        assert postgres_running(data)
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    assert code == 0, "".join(lines[-30:])
    assert not postgres_running(data), "embedded PostgreSQL left running after Ctrl-C"
    # a second start reuses the PKI and the store: lodging again is a no-op, and a --devices
    # that differs from the PKI's is said to be ignored
    proc, lines, ready = start_demo(data, env, devices=7)
    try:
        assert ready.wait(120), "".join(lines[-40:])
        assert "generating a test PKI" not in "".join(lines)
        assert (f"--devices 7 ignored: {data / 'pki'} already holds a test PKI with 20 devices"
                in "".join(lines)), "".join(lines)
        assert "0 stored, 40 identical" in "".join(lines)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0, "".join(lines[-30:])
    assert not postgres_running(data)


def _write_config(path: Path, pki_dir: Path, manifest: dict[str, Any], ports: dict[str, int],
                  data: Path) -> None:
    dcc = manifest["dcc_client"]
    path.write_text(f"""
data_dir = "{data}"
[listeners]
http = "127.0.0.1:{ports['http']}"
https = ""
lodge = "127.0.0.1:{ports['lodge']}"
ldap = ""
ldaps = ""
sftp = ""
metrics = "127.0.0.1:{ports['metrics']}"
[tls]
cert = "{pki_dir / manifest['tls']['cert']}"
key = "{pki_dir / manifest['tls']['key']}"
[lodge]
client_ca = "{pki_dir / dcc['ca']}"
client_subject = "{dcc['subject']}"
""")


def _count(conf: Path) -> int:
    """Certificates in the store, read by a separate process over the embedded server."""
    code = (
        "import asyncio, asyncpg, sys\n"
        "from repository_server.config import load\n"
        "from repository_server.store.embedded import EmbeddedPostgres\n"
        "from pathlib import Path\n"
        f"c = load({str(conf)!r})\n"
        "pg = EmbeddedPostgres(Path(c.data_dir)); dsn = pg.acquire()\n"
        "async def m():\n"
        "    conn = await asyncpg.connect(dsn)\n"
        "    print(await conn.fetchval('SELECT count(*) FROM certificates'))\n"
        "    await conn.close()\n"
        "asyncio.run(m()); pg.release()\n"
    )
    out = subprocess.run([smki_cli()[0], "-c", code], capture_output=True, text=True,
                         timeout=120, env=cli_env())
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().splitlines()[-1])


def test_kill_9_mid_batch_leaves_all_or_nothing(tmp_path: Path) -> None:
    pki_dir = tmp_path / "pki"
    manifest = generate(pki_dir, TestPkiParams(devices=25_000, organisations=0, workers=2,
                                                seed=11))
    data = tmp_path / "var"
    ports = {"http": free_port(), "lodge": free_port(), "metrics": free_port()}
    conf = tmp_path / "repo.toml"
    _write_config(conf, pki_dir, manifest, ports, data)
    dcc = manifest["dcc_client"]

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([*smki_cli(), "serve", "--config", str(conf)], env=cli_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(f"http://127.0.0.1:{ports['http']}/readyz")
        return proc

    def client() -> LodgeClient:
        return LodgeClient(f"https://localhost:{ports['lodge']}", str(pki_dir / dcc["cert"]),
                           str(pki_dir / dcc["key"]), str(pki_dir / manifest["tls"]["ca"]))

    proc = start()
    c = client()
    for o in manifest["objects"]:
        if o["kind"] in ("root", "ca") and o["name"] in ("root-dca", "issuing-dca"):
            reply = c.certificates((pki_dir / o["path"]).read_bytes(),
                                   trust_anchor=o["kind"] == "root")
            assert reply.status == 200, reply.body
    c.close()
    assert proc.poll() is None
    base = _count(conf)
    bundle = (pki_dir / "devices" / "devices-0001.pem").read_bytes()
    assert bundle.count(b"BEGIN CERTIFICATE") == 50_000
    killed_at: list[float] = []

    def lodge() -> None:
        c2 = client()
        try:
            c2.certificates(bundle)
        except Exception:  # the server dies under us: expected
            pass
        finally:
            c2.close()

    t = threading.Thread(target=lodge, daemon=True)
    started = time.monotonic()
    t.start()
    time.sleep(2.5)  # well inside the batch (parsing, verifying or writing)
    descendants = _descendants(proc.pid)
    assert descendants, "the batch should be parsed by worker processes"
    os.kill(proc.pid, signal.SIGKILL)
    killed_at.append(time.monotonic() - started)
    proc.wait(10)
    t.join(30)
    after_crash = _count(conf)
    assert after_crash - base in (0, 50_000), after_crash - base
    # restart on the same data directory (PostgreSQL survived the kill and is adopted)
    proc = start()
    try:
        c3 = client()
        reply = c3.certificates(bundle)
        c3.close()
        assert reply.status == 200, reply.body
        assert reply.body["stored"] + reply.body["identical"] == 50_000
        assert reply.body["stored"] in (0, 50_000)
        # a CA certificate: readable without an API key
        serial = next(o["serial"] for o in manifest["objects"] if o.get("name") == "issuing-dca")
        assert wait_http(f"http://127.0.0.1:{ports['http']}/certificates/{serial}")[:1] == b"\x30"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert _count(conf) == base + 50_000
    assert not postgres_running(data)
    # the killed server's parsing workers (and their forkserver) did not outlive it
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(descendants):
        time.sleep(0.5)
    assert not _alive(descendants), _alive(descendants)


def _descendants(pid: int) -> set[int]:
    """Every process below `pid` (from /proc/*/stat parent ids)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        alive.add(pid)
    return alive
