"""`serve` under systemd (Type=notify): READY=1 on $NOTIFY_SOCKET only once every listener is
up and /readyz answers 200, RELOADING=1 with MONOTONIC_USEC around a SIGHUP and READY=1 after
it, STOPPING=1 on SIGTERM; and the shipped unit file passes `systemd-analyze verify`. A real
`serve` process, a real datagram socket bound by the test (as systemd binds its own)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, cli_env, smki_cli
from tests.test_process import _write_config, free_port

UNIT = ROOT / "conf" / "smki-repository.service"


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A bound unix datagram socket with a short path (sun_path holds 108 bytes)."""
    where = tempfile.mkdtemp(prefix="smki-notify-", dir="/tmp")
    path = os.path.join(where, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # the sender's pid, as systemd
    sock.bind(path)
    try:
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(where, ignore_errors=True)


def _receive(sock: socket.socket, timeout: float) -> dict[str, str]:
    """One message's fields, and "pid": who sent it (NotifyAccess=main hears only the main
    process: the kernel's SCM_CREDENTIALS say who that was)."""
    sock.settimeout(timeout)
    data, ancillary, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(12))
    fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
    for level, kind, creds in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            fields["pid"] = str(struct.unpack("iII", creds[:12])[0])
    return fields


def _readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _end(proc: subprocess.Popen[Any]) -> None:
    """A failed test's server: stopped cleanly (its embedded PostgreSQL with it), or killed."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_serve_notifies_systemd(tmp_path: Path, pki: dict[str, Any],
                                notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    ports = {"http": free_port(), "lodge": free_port(), "metrics": free_port()}
    conf = tmp_path / "repo.toml"
    _write_config(conf, pki["dir"], pki, ports, tmp_path / "var")
    env = {**cli_env(), "NOTIFY_SOCKET": path}
    proc = subprocess.Popen([*smki_cli(), "serve", "--config", str(conf)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        first = _receive(sock, 120)  # initdb, migrations, the replica build
        assert first.get("READY") == "1", first
        assert first["pid"] == str(proc.pid)
        assert _readyz(ports["http"]) == 200  # nothing announced before it is true
        assert "STATUS" in first
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        proc.send_signal(signal.SIGHUP)
        reloading = _receive(sock, 30)
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert reloading.get("RELOADING") == "1", reloading
        assert before <= int(reloading["MONOTONIC_USEC"]) <= after  # systemd's clock
        again = _receive(sock, 30)
        assert again.get("READY") == "1", again
        proc.send_signal(signal.SIGTERM)
        stopping = _receive(sock, 30)
        assert stopping.get("STOPPING") == "1", stopping
        assert proc.wait(60) == 0
    finally:
        _end(proc)
        assert proc.stderr is not None
        proc.stderr.close()


def test_workers_only_the_supervisor_notifies(tmp_path: Path, pki: dict[str, Any],
                                              notify_socket: tuple[socket.socket, str]) -> None:
    """`serve --workers 2`: one READY=1, from the supervisor (the unit's main process), once
    both workers listen; the workers say nothing (systemd would log each as refused)."""
    sock, path = notify_socket
    ports = {"http": free_port(), "lodge": free_port(), "metrics": free_port()}
    conf = tmp_path / "repo.toml"
    _write_config(conf, pki["dir"], pki, ports, tmp_path / "var")
    env = {**cli_env(), "NOTIFY_SOCKET": path}
    proc = subprocess.Popen([*smki_cli(), "serve", "--workers", "2", "--config", str(conf)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first = _receive(sock, 180)
        assert first.get("READY") == "1" and first["pid"] == str(proc.pid), first
        assert "2 workers serving" in first["STATUS"]
        assert _readyz(ports["http"]) == 200
        proc.send_signal(signal.SIGTERM)
        messages = [_receive(sock, 30)]
        assert messages[0].get("STOPPING") == "1" and messages[0]["pid"] == str(proc.pid)
        assert proc.wait(90) == 0
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:  # nothing else arrived, from the workers least of all
                messages.append(_receive(sock, 0))
        assert len(messages) == 1, messages
    finally:
        _end(proc)


def test_serve_without_notify_socket_sends_nothing(tmp_path: Path, pki: dict[str, Any]) -> None:
    """No $NOTIFY_SOCKET (not under systemd), or one nobody listens on: serve runs as ever."""
    ports = {"http": free_port(), "lodge": free_port(), "metrics": free_port()}
    conf = tmp_path / "repo.toml"
    _write_config(conf, pki["dir"], pki, ports, tmp_path / "var")
    env = {**cli_env(), "NOTIFY_SOCKET": str(tmp_path / "nobody-listens")}
    proc = subprocess.Popen([*smki_cli(), "serve", "--config", str(conf)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while _ready_or_down(ports["http"]) != 200:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert proc.stderr is not None
        assert "systemd notification 'READY=1' not sent" in proc.stderr.read()
    finally:
        _end(proc)


def _ready_or_down(port: int) -> int:
    try:
        return _readyz(port)
    except OSError:
        return 0


def test_unit_file() -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "ReadWritePaths=/var/lib/smki", "PrivateTmp=yes", "ExecReload=/bin/kill -HUP $MAINPID"):
        assert line in text, line
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_unit_file_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` with ExecStart pointing at this checkout's executable (the
    unit's own /opt path does not exist here) and its user known to this machine."""
    exe = Path(sys.executable).with_name("smki-repository")
    assert exe.exists()
    text = UNIT.read_text().replace("/opt/smki-repository/.venv/bin/smki-repository", str(exe))
    unit = tmp_path / "smki-repository.service"
    unit.write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=60)
    problems = [line for line in (done.stdout + done.stderr).splitlines()
                if "smki-repository.service" in line]
    assert done.returncode == 0 and problems == [], done.stdout + done.stderr
    # and its hardening, as systemd scores it (0 best, 10 worst; "OK" is below 4.5)
    done = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                          capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for smki-repository.service: ([0-9.]+)",
                      done.stdout + done.stderr)
    assert found is not None, done.stdout[-2000:] + done.stderr
    assert float(found.group(1)) <= 2.5, done.stdout[-3000:]
