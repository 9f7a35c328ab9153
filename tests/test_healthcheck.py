"""`python -m repository_server.healthcheck`, the Docker image's HEALTHCHECK: it follows the
configured listener and says why it fails."""

from __future__ import annotations

import asyncio
import socket
import subprocess

import pytest

from tests.conftest import Running, cli_env, smki_cli

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([smki_cli()[0], "-m", "repository_server.healthcheck"],
                          env={**cli_env(), **env}, capture_output=True, text=True, timeout=60)


async def test_healthcheck_follows_the_configured_listener(server: Running) -> None:
    port = server.repo.bound["http"].port
    ok = await asyncio.to_thread(_check, {"SMKI_LISTENERS__HTTP": f"0.0.0.0:{port}"})
    assert ok.returncode == 0, ok.stderr
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    down = await asyncio.to_thread(_check, {"SMKI_LISTENERS__HTTP": f"127.0.0.1:{free}"})
    assert down.returncode == 1 and f"http 127.0.0.1:{free}" in down.stderr
    https = server.repo.bound["https"].port
    tls = await asyncio.to_thread(_check, {"SMKI_LISTENERS__HTTP": "",
                                           "SMKI_LISTENERS__HTTPS": f"127.0.0.1:{https}"})
    assert tls.returncode == 0, tls.stderr
    neither = await asyncio.to_thread(_check, {"SMKI_LISTENERS__HTTP": "",
                                               "SMKI_LISTENERS__HTTPS": ""})
    assert neither.returncode == 1 and "neither" in neither.stderr
