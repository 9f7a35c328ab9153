"""The SEC lockout under concurrency, on every interface that takes a password (portal,
LDAP simple bind, SFTP) and across two servers on one store.

The rule: `lockout_failures` wrong passwords lock the account; once that many have been
counted, no later attempt is accepted, whatever its password, even one already in flight.
So a burst of attempts gets at most `lockout_failures` passwords checked, and the right
password sent in the middle of a burst of wrong ones is refused. Each test fires N attempts
at once over real sockets and reads the audit (one "wrong password" row per password that
was checked and found wrong) to see how many were checked."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from repository_server.accounts.keys import hash_password
from repository_server.server import Repository
from tests.conftest import Running, add_user, start_repository
from tests.portal_client import PortalClient

pytestmark = pytest.mark.asyncio(loop_scope="session")

GOOD = "correct horse battery staple"
WRONG = "not the password at all"
BURST = 24


async def _password_user(repo: Repository, name: str) -> None:
    """A user whose portal password is GOOD (already changed from the initial one)."""
    assert repo.store is not None
    await add_user(repo, name, None)
    await repo.store.update_user(name, actor="test", action="test",
                                 password_hash=hash_password(GOOD), must_change_password=False)


async def _checked(repo: Repository, name: str, action: str) -> int:
    """How many wrong passwords were checked for `name` over `action` (audit rows)."""
    assert repo.store is not None
    return int(await repo.store.pool.fetchval(
        "SELECT count(*) FROM audit WHERE action = $1 AND object = $2"
        " AND detail->>'reason' = 'wrong password'", action, name))


async def _locked(repo: Repository, name: str) -> bool:
    assert repo.store is not None
    account = await repo.store.portal_account(name)
    assert account is not None
    return account[2] is not None


async def _burst_then_right(attempt: Callable[[int, str], Awaitable[bool]],
                            n: int = BURST) -> tuple[list[bool], bool]:
    """Fire n-1 wrong attempts at once; as soon as the first of them is answered (all have
    reached the server by then, most are still in flight) send the right one. Returns the
    wrong ones' results and the right one's."""
    wrong = [asyncio.ensure_future(attempt(i, WRONG)) for i in range(n - 1)]
    await asyncio.wait(wrong, return_when=asyncio.FIRST_COMPLETED)
    right = await attempt(n - 1, GOOD)
    return list(await asyncio.gather(*wrong)), right


# -- portal ------------------------------------------------------------------------------------------
async def _portal_attempts(bases: list[str], n: int, name: str) -> tuple[
        list[PortalClient], Callable[[int, str], Awaitable[bool]]]:
    """n browsers, each with its sign-in form already loaded (so the POSTs go out together);
    browser i talks to bases[i % len(bases)]."""
    clients = [PortalClient(bases[i % len(bases)]) for i in range(n)]
    forms: list[str] = []
    for c in clients:
        await c.__aenter__()
        forms.append((await c.get("/portal/sign-in")).csrf())

    async def attempt(i: int, password: str) -> bool:
        r = await clients[i].post("/portal/sign-in", {"csrf": forms[i], "username": name,
                                                      "password": password})
        return r.status == 303

    return clients, attempt


async def _portal_case(repos: list[Repository], bases: list[str], name: str) -> None:
    repo = repos[0]
    limit = repo.config.portal.lockout_failures
    await _password_user(repo, name)
    clients, attempt = await _portal_attempts(bases, BURST, name)
    try:
        wrong, right = await _burst_then_right(attempt)
        assert not any(wrong)
        assert not right, "the right password, sent after the burst began, signed in"
        assert await _checked(repo, name, "portal.sign-in") <= limit
        assert await _locked(repo, name)
        # and a fresh attempt with the right password, the burst over, is refused too
        async with PortalClient(bases[-1]) as late:
            r = await late.sign_in(name, GOOD)
            assert r.status == 200 and "Sign-in failed" in r.text
    finally:
        for c in clients:
            await c.__aexit__(None, None, None)
    assert await _checked(repo, name, "portal.sign-in") == limit


async def test_sequential_rule_unchanged(loaded: Running) -> None:
    """One at a time, limit-1 wrong passwords then the right one still signs in (and forgets
    them); the limit-th wrong one locks."""
    repo = loaded.repo
    limit = repo.config.portal.lockout_failures
    await _password_user(repo, "race-seq")
    async with PortalClient(loaded.http) as c:
        for _round in range(2):
            for _ in range(limit - 1):
                assert (await c.sign_in("race-seq", WRONG)).status == 200
            assert (await c.sign_in("race-seq", GOOD)).status == 303
            await c.sign_out()
        for _ in range(limit):
            assert (await c.sign_in("race-seq", WRONG)).status == 200
        assert (await c.sign_in("race-seq", GOOD)).status == 200
    assert await _locked(repo, "race-seq")


async def test_a_client_that_hangs_up_still_counts(loaded: Running) -> None:
    """Attempts whose clients go away while their passwords are being checked run to the end:
    each checked password is counted (none is left in flight, holding the account)."""
    repo = loaded.repo
    assert repo.store is not None
    limit = repo.config.portal.lockout_failures
    await _password_user(repo, "race-hangup")
    clients, attempt = await _portal_attempts([loaded.http], limit, "race-hangup")

    async def in_flight() -> int:
        assert repo.store is not None
        return int(await repo.store.pool.fetchval(
            "SELECT count(*) FROM sign_in_attempts WHERE user_name = 'race-hangup'"))

    try:
        tasks = [asyncio.ensure_future(attempt(i, WRONG)) for i in range(limit)]
        for _ in range(500):  # until the server is checking one
            if await in_flight():
                break
            await asyncio.sleep(0.002)
        for t in tasks:  # now the clients go away
            t.cancel()
        for c in clients:
            await c.__aexit__(None, None, None)
        clients = []
        for _ in range(100):
            if not await in_flight():
                break
            await asyncio.sleep(0.05)
        assert not await in_flight()
        checked = await _checked(repo, "race-hangup", "portal.sign-in")
        assert checked >= 1
        account = await repo.store.portal_account("race-hangup")
        assert account is not None
        assert account[2] is not None if checked == limit else len(account[1]) == checked
    finally:
        for c in clients:
            await c.__aexit__(None, None, None)


# -- LDAP --------------------------------------------------------------------------------------------
def _ldap_attempt(ports: list[int], name: str) -> Callable[[int, str], Awaitable[bool]]:
    import ldap3

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=BURST)

    def bind(i: int, password: str) -> bool:
        conn = ldap3.Connection(ldap3.Server("127.0.0.1", port=ports[i % len(ports)]),
                                user=f"uid={name},ou=Users,o=SMKI", password=password,
                                receive_timeout=30)
        try:
            return bool(conn.bind())
        finally:
            conn.unbind()

    async def attempt(i: int, password: str) -> bool:
        return await asyncio.get_running_loop().run_in_executor(pool, bind, i, password)

    return attempt


async def _burst_case(repos: list[Repository], name: str, action: str,
                      attempt: Callable[[int, str], Awaitable[bool]], n: int = BURST) -> None:
    """A burst at LDAP or SFTP: nothing accepted, exactly the limit checked, locked."""
    repo = repos[0]
    wrong, right = await _burst_then_right(attempt, n)
    assert not any(wrong)
    assert not right, "the right password, sent after the burst began, was accepted"
    assert await _checked(repo, name, action) == repo.config.portal.lockout_failures
    assert await _locked(repo, name)
    assert not await attempt(0, GOOD)


async def _ldap_case(repos: list[Repository], name: str) -> None:
    await _password_user(repos[0], name)
    await _burst_case(repos, name, "ldap.bind",
                      _ldap_attempt([r.bound["ldap"].port for r in repos], name))


# -- SFTP --------------------------------------------------------------------------------------------
def _sftp_attempt(ports: list[int], name: str) -> Callable[[int, str], Awaitable[bool]]:
    import asyncssh

    async def attempt(i: int, password: str) -> bool:
        try:
            conn: Any = await asyncssh.connect(
                "127.0.0.1", ports[i % len(ports)], username=name, password=password,
                known_hosts=None, client_keys=None, agent_path=None, connect_timeout=30)
        except asyncssh.PermissionDenied:
            return False
        conn.close()
        await conn.wait_closed()
        return True

    return attempt


async def _sftp_case(repos: list[Repository], name: str) -> None:
    await _password_user(repos[0], name)
    await _burst_case(repos, name, "sftp.login",
                      _sftp_attempt([r.bound["sftp"].port for r in repos], name),
                      n=12)  # an SSH handshake each: fewer


@pytest.mark.parametrize("servers", [1, 2], ids=["one-server", "two-servers-one-store"])
@pytest.mark.parametrize("interface", ["portal", "ldap", "sftp"])
async def test_a_burst_cannot_pass_the_lockout(loaded: Running, tmp_path: Path, interface: str,
                                               servers: int) -> None:
    repos = [loaded.repo]
    if servers == 2:
        repos.append(await start_repository(tmp_path / "b", loaded.pki,
                                            loaded.repo.config.database.url))
    name = f"race-{interface}-{servers}"
    try:
        if interface == "portal":
            await _portal_case(repos, [f"http://127.0.0.1:{r.bound['http'].port}" for r in repos],
                               name)
        else:
            await (_ldap_case if interface == "ldap" else _sftp_case)(repos, name)
    finally:
        for other in repos[1:]:
            await other.stop()


async def test_an_attempt_left_by_a_dead_process_counts_as_a_failure(loaded: Running) -> None:
    """Attempts still registered STALE_ATTEMPT_SECONDS after they began belonged to a process
    that died mid-check: the next attempt counts each as a failure (and audits it), so dying
    is not a way to get free guesses; fresh ones only hold their place."""
    from repository_server.store.models import STALE_ATTEMPT_SECONDS

    repo = loaded.repo
    assert repo.store is not None
    limit = repo.config.portal.lockout_failures
    await _password_user(repo, "race-dead")
    await repo.store.pool.execute(
        "INSERT INTO sign_in_attempts (user_name, started_at) SELECT 'race-dead',"
        " clock_timestamp() - make_interval(secs => $1) FROM generate_series(1, $2)",
        STALE_ATTEMPT_SECONDS + 10, limit - 1)
    async with PortalClient(loaded.http) as c:
        # the stale ones become limit-1 failures: one wrong password more locks the account
        assert (await c.sign_in("race-dead", WRONG)).status == 200
        assert await _locked(repo, "race-dead")
        assert (await c.sign_in("race-dead", GOOD)).status == 200  # locked: refused
    left = await repo.store.pool.fetchval(
        "SELECT count(*) FROM sign_in_attempts WHERE user_name = 'race-dead'")
    assert left == 0
    abandoned = await repo.store.pool.fetchval(
        "SELECT detail->>'count' FROM audit WHERE action = 'auth.attempt-abandoned'"
        " AND object = 'race-dead'")
    assert abandoned == str(limit - 1)
