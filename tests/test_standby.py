"""Many nodes, one of them fed from a real PostgreSQL streaming standby (`database.replica_url`):
node A uses the primary for everything; node B lodges on the primary and feeds its read replica
from a hot standby made with `pg_basebackup -R` (tests/standby.py). Real processes throughout:
two PostgreSQL servers, two repositories, real sockets.

The tests share one cluster and run in this order; each leaves the cluster as it found it
(replay resumed, standby started, primary started again), the primary's outage last."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from repository_server.server import Repository
from tests.conftest import (
    TEST_KEY,
    Running,
    add_user,
    cli_env,
    http_get,
    lodge_pki,
    run_process,
    smki_cli,
    start_repository,
)
from tests.standby import StandbyPair

pytestmark = pytest.mark.asyncio(loop_scope="session")

MAX_LAG = 2.0  # node B's replica.max_lag_seconds


@dataclass
class Cluster:
    pair: StandbyPair
    pki: dict[str, Any]
    a: Running  # database.url = the primary
    b: Running  # database.url = the primary, database.replica_url = the standby
    b_dir: Path
    next_eui: int = 700_000

    async def start_b(self) -> Running:
        node_b = await start_repository(
            self.b_dir, self.pki, self.pair.primary_dsn,
            database={"replica_url": self.pair.standby_dsn, "command_timeout": 3.0,
                      "connect_timeout": 2.0},
            replica={"max_lag_seconds": MAX_LAG, "poll_seconds": 0.1})
        self.b = Running(node_b, self.pki)
        await node_b.accounts.load()  # type: ignore[union-attr]
        return self.b


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory,
                  pki: dict[str, Any]) -> AsyncIterator[Cluster]:
    root = tmp_path_factory.mktemp("standby")
    pair = StandbyPair(root / "pg")
    await asyncio.to_thread(pair.start)
    cluster: Cluster | None = None
    node_a: Repository | None = None
    try:
        node_a = await start_repository(root / "a", pki, pair.primary_dsn)
        a = Running(node_a, pki)
        await add_user(node_a, "tester", TEST_KEY)
        cluster = Cluster(pair, pki, a, a, root / "b")
        await cluster.start_b()
        await asyncio.to_thread(lodge_pki, a)
        yield cluster
    finally:
        if cluster is not None and cluster.b is not cluster.a:
            await cluster.b.repo.stop()
        if node_a is not None:
            await node_a.stop()
        await asyncio.to_thread(pair.close)


# -- helpers --------------------------------------------------------------------------------


def _get(url: str) -> int:
    return http_get(url, headers={"X-API-Key": TEST_KEY})[0]


async def get(url: str) -> int:
    return await asyncio.to_thread(_get, url)


async def readyz(running: Running) -> tuple[int, dict[str, Any]]:
    status, _headers, body = await asyncio.to_thread(http_get, f"{running.http}/readyz")
    return status, json.loads(body)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < timeout, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


def _lodge_devices(cluster: Cluster, on: Running, count: int = 2) -> tuple[int, list[Any]]:
    """`count` new device certificates lodged on node `on`: (HTTP status, certificates)."""
    from tests.test_ldap import _devices

    pem, certs = _devices(on, count, cluster.next_eui)
    cluster.next_eui += count
    client = on.client()
    try:
        reply = client.certificates(pem)
    finally:
        client.close()
    return reply.status, certs


async def lodge_devices(cluster: Cluster, on: Running, count: int = 2) -> list[Any]:
    status, certs = await asyncio.to_thread(_lodge_devices, cluster, on, count)
    assert status == 200
    return certs


def serial_of(cert: Any) -> str:
    return format(cert.serial_number, "X")


def eui_of(cert: Any) -> str:
    from cryptography import x509

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    other = next(n for n in san if isinstance(n, x509.OtherName))
    return other.value[-8:].hex()  # an OCTET STRING of 8 bytes: the EUI-64


def _ldap_serials(conn: Any, eui: str) -> list[str]:
    ok = conn.search("ou=Devices,o=SMKI", f"(smkiEui64={eui})", attributes=["smkiSerial"])
    assert ok or conn.result["result"] == 0, conn.result
    # the device entry (no serial) and its certificates' entries below it
    return [format(int(e["smkiSerial"].value, 16), "X") for e in conn.entries
            if e["smkiSerial"].value]


async def ldap_serials(running: Running, eui: str, conn: Any = None) -> list[str]:
    """The device certificates an LDAP search by EUI-64 finds (bound as tester, on a new
    connection unless one is given)."""
    from tests.test_ldap import ldap3_conn

    def search() -> list[str]:
        c = conn or ldap3_conn(running)
        try:
            return _ldap_serials(c, eui)
        finally:
            if conn is None:
                c.unbind()

    return await asyncio.to_thread(search)


async def serves(running: Running, cert: Any) -> bool:
    return await get(f"{running.http}/certificates/{serial_of(cert)}") == 200


async def caught_up(running: Running) -> bool:
    status, body = await readyz(running)
    return status == 200 and body["replica"]["behind_changes"] == 0


# -- the tests ------------------------------------------------------------------------------


async def test_a_lodging_on_the_primary_reaches_the_node_on_the_standby(cluster: Cluster) -> None:
    """Lodged on A: B serves it over HTTP and LDAP within a few seconds, fed by the standby;
    `replica verify` says B's replica equals the store. A lodging on B itself is served by B
    when acknowledged (read-your-writes, with the standby between B and its feed)."""
    assert await asyncio.to_thread(cluster.pair.in_recovery)  # a real standby, read-only
    a, b = cluster.a, cluster.b
    old = a.objects("device")[0]
    assert await get(f"{b.http}/certificates/{old['serial']}") == 200

    certs = await lodge_devices(cluster, a)
    took = await eventually(lambda: serves(b, certs[0]), 5, "B serves A's lodging")
    assert all([await serves(b, c) for c in certs])
    assert await ldap_serials(b, eui_of(certs[1])) == [serial_of(certs[1])]
    assert took < 5

    # read-your-writes on B: acknowledged only once B's replica, fed by the standby, has it
    mine = await lodge_devices(cluster, b, 1)
    assert await serves(b, mine[0])
    assert await ldap_serials(b, eui_of(mine[0])) == [serial_of(mine[0])]
    await eventually(lambda: serves(a, mine[0]), 5, "A serves B's lodging")

    await verify_b(cluster)


async def test_a_paused_standby_the_node_says_how_far_behind_and_catches_up(
        cluster: Cluster) -> None:
    """The standby's WAL replay paused (it receives WAL, applies none: a lagging standby): B
    keeps serving what it has, /readyz reports behind_changes and behind_seconds and turns 503
    past replica.max_lag_seconds; replay resumed, B catches up by itself and is ready."""
    a, b = cluster.a, cluster.b
    before = await lodge_devices(cluster, a, 1)
    await eventually(lambda: serves(b, before[0]), 5, "B serves it")
    await eventually(lambda: caught_up(b), 5, "B caught up")

    await asyncio.to_thread(cluster.pair.pause_replay)
    try:
        certs = await lodge_devices(cluster, a)
        assert await serves(a, certs[0])
        # while within max_lag: 200, and the lag is said
        status, body = await readyz(b)
        deadline = time.monotonic() + 5
        while body["replica"]["behind_changes"] < 1:
            assert time.monotonic() < deadline, body
            await asyncio.sleep(0.1)
            status, body = await readyz(b)
        assert status == 200 or body["replica"]["behind_seconds"] > MAX_LAG, body
        # past it: 503, saying why
        await eventually(lambda: _readyz_is(b, 503), MAX_LAG + 5, "503 past max_lag")
        status, body = await readyz(b)
        assert status == 503 and "behind" in body["reason"], body
        assert body["replica"]["behind_changes"] >= 1
        assert body["replica"]["behind_seconds"] > MAX_LAG
        # what B has is served; the new certificates are not there yet
        assert await serves(b, before[0])
        assert await ldap_serials(b, eui_of(before[0])) == [serial_of(before[0])]
        assert not await serves(b, certs[0])
        assert await ldap_serials(b, eui_of(certs[0])) == []

        # read-your-writes on B while its standby lags: B's own lodging is acknowledged
        # once B serves it (its changes read from the primary after a short wait)
        started = time.monotonic()
        mine = await lodge_devices(cluster, b, 1)
        assert time.monotonic() - started < 10
        assert await serves(b, mine[0])
        assert await ldap_serials(b, eui_of(mine[0])) == [serial_of(mine[0])]
        built = (await readyz(b))[1]["replica"]["built"]
        # B restarted meanwhile: its replica is ahead of its standby, not of the store,
        # so it is opened as it is (not rebuilt)
        await b.repo.stop()
        b = await cluster.start_b()
        status, body = await readyz(b)
        assert body["replica"]["built"] == built, body
        assert await serves(b, mine[0]) and await serves(b, before[0])
        # `replica verify` while the standby lags behind a lodging on A: caught up to the
        # primary's head (what the standby lacks read from the primary), then equal
        await lodge_devices(cluster, a, 1)
        await verify_b(cluster)
    finally:
        await asyncio.to_thread(cluster.pair.resume_replay)
    took = await eventually(lambda: caught_up(b), 10, "B catches up once replay resumes")
    assert all([await serves(b, c) for c in certs])
    assert await ldap_serials(b, eui_of(certs[1])) == [serial_of(certs[1])]
    assert took < 10
    await verify_b(cluster)


async def verify_b(cluster: Cluster) -> None:
    """`smki-repository replica verify` as an operator runs it on node B (its data
    directory, both URLs): B's replica equals the store."""
    env = {**cli_env(), "SMKI_DATABASE__URL": cluster.pair.primary_dsn,
           "SMKI_DATABASE__REPLICA_URL": cluster.pair.standby_dsn}
    code, out, err = await run_process(*smki_cli(), "replica", "verify", "--data-dir",
                                       str(cluster.b_dir), timeout=60, env=env)
    assert code == 0 and b"equals the store" in out, (out, err)


async def _readyz_is(running: Running, want: int) -> bool:
    return (await readyz(running))[0] == want


async def test_the_standby_stopped_and_started_again(cluster: Cluster) -> None:
    """pg_ctl stop on the standby: B serves everything it has throughout; lodgings on A go on;
    the standby started again, B catches up by itself."""
    a, b = cluster.a, cluster.b
    before = await lodge_devices(cluster, a, 1)
    await eventually(lambda: serves(b, before[0]), 5, "B serves it")
    await asyncio.to_thread(cluster.pair.stop_standby)
    try:
        certs = await lodge_devices(cluster, a)
        await asyncio.sleep(1.0)  # B's feed fails and retries meanwhile
        assert await serves(b, before[0])
        assert await get(f"{b.http}/certificates/{a.objects('root')[0]['serial']}") == 200
        assert await ldap_serials(b, eui_of(before[0])) == [serial_of(before[0])]
        assert not await serves(b, certs[0])
        _status, body = await readyz(b)
        assert body["database"] == "ok" and body["replica"]["behind_changes"] >= 1, body
    finally:
        await asyncio.to_thread(cluster.pair.start_standby)
    await eventually(lambda: caught_up(b), 10, "B catches up once the standby is back")
    assert all([await serves(b, c) for c in certs])
    assert await ldap_serials(b, eui_of(certs[0])) == [serial_of(certs[0])]


async def test_the_primary_stopped_the_node_on_the_standby_serves_every_read(
        cluster: Cluster) -> None:
    """pg_ctl stop on the primary (the standby stays up): B serves every read from its
    replica (HTTP certificate, LDAP search on a connection bound before), /readyz 200
    "degraded"; a lodging on B answers 503. The primary back, B lodges again."""
    from tests.ldaptools import ldapsearch
    from tests.test_ldap import ldap3_conn

    a, b = cluster.a, cluster.b
    certs = await lodge_devices(cluster, a)
    await eventually(lambda: serves(b, certs[-1]), 5, "B serves it")
    device = a.objects("device")[0]
    bound = await asyncio.to_thread(ldap3_conn, b)  # a bind reads the users from the primary
    await asyncio.to_thread(cluster.pair.stop_primary)
    try:
        status, body = await readyz(b)
        assert status == 200 and body["status"] == "degraded", body
        assert body["database"].startswith("unavailable") and "lodging" in body
        for _ in range(2):  # and again, after B's feeder and heartbeat have hit the outage
            for cert in certs:
                assert await serves(b, cert)
                assert await ldap_serials(b, eui_of(cert), bound) == [serial_of(cert)]
            assert await get(f"{b.http}/certificates/{device['serial']}") == 200
            answer = await ldapsearch(b.ldap, "ou=CAs,o=SMKI", "one",
                                      "(certificateRevocationList=*)", ["cn"])
            assert answer.code == 0 and answer.entries, answer.stderr
            await asyncio.sleep(1.0)
        status, _certs = await asyncio.to_thread(_lodge_devices, cluster, b, 1)
        assert status == 503
    finally:
        await asyncio.to_thread(bound.unbind)
        await asyncio.to_thread(cluster.pair.start_primary)
    await eventually(lambda: _readyz_is(b, 200), 15, "B ready again")
    mine = await lodge_devices(cluster, b, 1)
    assert await serves(b, mine[0])
