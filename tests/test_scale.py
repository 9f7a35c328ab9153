"""Many processes and many nodes on one PostgreSQL: `serve --workers N` sharing every port,
and a lodging on one node served by another within a second."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TEST_KEY, Running, add_user, cli_env, lodge_pki, smki_cli, start_repository
from tests.test_ldap import _devices, _exchange
from tests.test_process import free_port, wait_http


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on 127.0.0.1:port (from /proc/net/tcp)."""
    inodes = set()
    with open("/proc/net/tcp") as fh:
        for line in fh.readlines()[1:]:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            if state == "0A" and int(local.split(":")[1], 16) == port:
                inodes.add(inode)
    return inodes


def _holds_socket(pid: int, inodes: set[str]) -> bool:
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_serve_workers_share_every_port(tmp_path: Path, pki: dict[str, Any]) -> None:
    pki_dir: Path = pki["dir"]
    ports = {name: free_port() for name in ("http", "ldap", "lodge")}
    dcc = pki["dcc_client"]
    conf = tmp_path / "repo.toml"
    conf.write_text(f"""
data_dir = "{tmp_path / 'var'}"
[listeners]
http = "127.0.0.1:{ports['http']}"
https = ""
lodge = "127.0.0.1:{ports['lodge']}"
ldap = "127.0.0.1:{ports['ldap']}"
ldaps = ""
sftp = ""
metrics = ""
[tls]
cert = "{pki_dir / pki['tls']['cert']}"
key = "{pki_dir / pki['tls']['key']}"
[lodge]
client_ca = "{pki_dir / dcc['ca']}"
client_subject = "{dcc['subject']}"
[extracts]
schedule = false
""")
    supervisor = subprocess.Popen([*smki_cli(), "serve", "--config", str(conf), "--workers", "2",
                                   "--pid-file", str(tmp_path / "serve.pid")], env=cli_env(),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        workers: list[int] = []
        while time.monotonic() < deadline and len(workers) < 2:
            workers = _children(supervisor.pid)
            time.sleep(0.2)
        assert len(workers) == 2, workers
        wait_http(f"http://127.0.0.1:{ports['http']}/readyz")
        # every worker holds its own listening socket on every port (SO_REUSEPORT)
        for name, port in ports.items():
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                inodes = _listening_inodes(port)
                if all(_holds_socket(w, inodes) for w in workers):
                    break
                time.sleep(0.2)
            assert len(inodes) == 2 and all(_holds_socket(w, inodes) for w in workers), name
        for _ in range(40):
            with urllib.request.urlopen(f"http://127.0.0.1:{ports['http']}/healthz", timeout=5) as r:
                assert r.status == 200
        # a worker that dies is replaced
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = _children(supervisor.pid)
            if len(now) == 2 and workers[0] not in now:
                break
            time.sleep(0.2)
        assert len(now) == 2 and workers[0] not in now
        wait_http(f"http://127.0.0.1:{ports['http']}/readyz")
    finally:
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=60) == 0
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


@pytest.mark.asyncio(loop_scope="session")
async def test_a_lodging_on_one_node_is_served_by_another_within_a_second(
        tmp_path: Path, pki: dict[str, Any], fresh_db: str) -> None:
    """Two nodes (two repositories, own data dirs and caches) on one PostgreSQL."""
    node_a = await start_repository(tmp_path / "a", pki, fresh_db)
    node_b = await start_repository(tmp_path / "b", pki, fresh_db, ldap={"open_reads": True})
    try:
        a, b = Running(node_a, pki), Running(node_b, pki)
        await add_user(node_a, "tester", TEST_KEY)
        assert node_b.accounts is not None
        await node_b.accounts.load()
        await asyncio.to_thread(lodge_pki, a)
        crl_obj = a.objects("crl")[0]
        crl_url = f"{b.http}/crls/{crl_obj['issuer_key_id']}.crl"

        def get(url: str) -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as exc:
                return exc.code, b""

        status, before = await asyncio.to_thread(get, crl_url)  # B caches the current CRL
        assert status == 200
        pem, certs = _devices(a, 1, 700_000)
        serial = format(certs[0].serial_number, "X")
        serial = serial.rjust(len(serial) + len(serial) % 2, "0")
        assert before == a.path(crl_obj["path"]).read_bytes()
        new_crl = a.next_oca_crl(9, 4242)
        client = a.client()
        try:
            assert (await asyncio.to_thread(client.certificates, pem)).status == 200
            assert (await asyncio.to_thread(client.crl, new_crl)).status == 200
        finally:
            client.close()
        lodged = time.monotonic()
        from tests.ldaptools import search

        port = node_b.bound["ldap"].port
        seen_crl = seen_cert = seen_ldap = None
        while time.monotonic() - lodged < 1.0 and None in (seen_crl, seen_cert, seen_ldap):
            if seen_crl is None and (await asyncio.to_thread(get, crl_url))[1] == new_crl:
                seen_crl = time.monotonic() - lodged
            if seen_cert is None and (await asyncio.to_thread(
                    get, f"{b.http}/certificates/{serial}?apikey={TEST_KEY}"))[0] == 200:
                seen_cert = time.monotonic() - lodged
            if seen_ldap is None:
                out = await asyncio.to_thread(_exchange, port, search(
                    1, "ou=Devices,o=SMKI", f"(smkiSerial={serial})", ["smkiSerial"]), {1})
                if any(name == "searchResEntry" for _m, name, _op in out):
                    seen_ldap = time.monotonic() - lodged
            await asyncio.sleep(0.02)
        assert seen_crl is not None and seen_cert is not None and seen_ldap is not None, (
            seen_crl, seen_cert, seen_ldap)
    finally:
        await node_b.stop()
        await node_a.stop()


@pytest.mark.asyncio(loop_scope="session")
async def test_a_status_change_missed_while_not_listening_is_not_served(
        tmp_path: Path, pki: dict[str, Any], fresh_db: str) -> None:
    """Nothing cached outlives its source: a status change whose NOTIFY this process never
    heard (its LISTEN connection was down) is caught up when LISTEN is back."""
    repo = await start_repository(tmp_path, pki, fresh_db)
    try:
        running = Running(repo, pki)
        await asyncio.to_thread(lodge_pki, running)
        catalog, store = repo.catalog, repo.store
        assert catalog is not None and store is not None
        dev = running.objects("device")[0]
        assert (await catalog.certificates(dev["serial"]))[0].lodged_status == "I"  # cached
        for _ in range(100):
            if catalog.live:
                break
            await asyncio.sleep(0.05)
        listener = catalog._listener  # the test cuts the LISTEN connection
        assert listener is not None
        listener.terminate()
        # the change happens while nobody listens in this process (its NOTIFY is lost here)
        audit = {"actor": "test", "action": "lodge.status", "outcome": "ok", "object": dev["serial"]}
        await store.set_status(dev["serial"], None, "N", None, audit)
        for _ in range(200):  # LISTEN comes back by itself
            await asyncio.sleep(0.05)
            if catalog.live and catalog._listener is not listener:
                break
        assert catalog.live
        # the replica's feeder polls the change log: the change is served within a second
        for _ in range(40):
            if (await catalog.certificates(dev["serial"]))[0].lodged_status == "N":
                break
            await asyncio.sleep(0.05)
        assert (await catalog.certificates(dev["serial"]))[0].lodged_status == "N"
    finally:
        await repo.stop()
