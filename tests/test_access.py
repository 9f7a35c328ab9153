"""Who may read what, over every interface: one table, run against two real servers (the test
PKI lodged, one extract published), one with the `open_reads` settings off and one with them
on, with real clients: aiohttp for the HTTPS downloads, extracts and the web service, ldap3 for
LDAP, the portal's test client, asyncssh for SFTP. Plus the table of `ReadAccess` itself.

The readers: `anonymous` (no credentials), `wrong` (an API key nobody has, a password that is
not the user's, a user nobody is) and `valid` (the API key of a user made as `users add` makes
it, an LDAP bind with it, a signed-in portal user, an SFTP user's password).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import ldap3
import pytest
import pytest_asyncio

from repository_server.access import ReadAccess
from repository_server.accounts.keys import hash_password
from repository_server.store.embedded import EmbeddedPostgres
from tests.conftest import TEST_KEY, Running, add_user, create_database, running_repository

WRONG_KEY = "no-such-key-0123456789ab"
READER = "access-reader"  # a user with a password: LDAP binds, portal, SFTP
PASSWORD = "a long enough password 7"
SUFFIX = "o=SMKI"

# -- the table ------------------------------------------------------------------------------
# (interface, object kind): what each reader gets with open_reads off, and with it on.
# "ok" is the object; anything else is the refusal: an HTTP status, an LDAP result code
# (49 invalid credentials at the bind; 32 noSuchObject: an entry the reader may not read is
# not disclosed, as slapd does), "denied" (SSH
# authentication refused). 402 is the web service's "nothing found": it describes device
# and organisation certificates only. The portal asks everyone to sign in (303) whatever
# open_reads says; SFTP has no open_reads.
OK = ("ok", "ok")
TABLE: dict[tuple[str, str], dict[str, tuple[str, str]]] = {
    ("https", "root"):          {"anonymous": OK, "wrong": OK, "valid": OK},
    ("https", "ca"):            {"anonymous": OK, "wrong": OK, "valid": OK},
    ("https", "device"):        {"anonymous": ("403", "ok"), "wrong": ("403", "ok"), "valid": OK},
    ("https", "organisation"):  {"anonymous": ("403", "ok"), "wrong": ("403", "ok"), "valid": OK},
    ("https", "crl"):           {"anonymous": OK, "wrong": OK, "valid": OK},
    ("https", "arl"):           {"anonymous": OK, "wrong": OK, "valid": OK},
    ("https", "document"):      {"anonymous": OK, "wrong": OK, "valid": OK},
    ("https", "extract"):       {"anonymous": ("403", "ok"), "wrong": ("403", "ok"), "valid": OK},
    ("webservice", "root"):     {"anonymous": ("403", "402"), "wrong": ("403", "402"),
                                 "valid": ("402", "402")},
    ("webservice", "device"):   {"anonymous": ("403", "ok"), "wrong": ("403", "ok"), "valid": OK},
    ("webservice", "organisation"): {"anonymous": ("403", "ok"), "wrong": ("403", "ok"),
                                     "valid": OK},
    ("ldap", "root"):           {"anonymous": OK, "wrong": ("49", "49"), "valid": OK},
    ("ldap", "ca"):             {"anonymous": OK, "wrong": ("49", "49"), "valid": OK},
    ("ldap", "device"):         {"anonymous": ("32", "ok"), "wrong": ("49", "49"), "valid": OK},
    ("ldap", "organisation"):   {"anonymous": ("32", "ok"), "wrong": ("49", "49"), "valid": OK},
    ("ldap", "crl"):            {"anonymous": OK, "wrong": ("49", "49"), "valid": OK},
    ("ldap", "arl"):            {"anonymous": OK, "wrong": ("49", "49"), "valid": OK},
    ("portal", "root"):         {"anonymous": ("303", "303"), "wrong": ("303", "303"), "valid": OK},
    ("portal", "device"):       {"anonymous": ("303", "303"), "wrong": ("303", "303"), "valid": OK},
    ("portal", "organisation"): {"anonymous": ("303", "303"), "wrong": ("303", "303"), "valid": OK},
    ("portal", "crl"):          {"anonymous": ("303", "303"), "wrong": ("303", "303"), "valid": OK},
    ("portal", "arl"):          {"anonymous": ("303", "303"), "wrong": ("303", "303"), "valid": OK},
    ("portal", "document"):     {"anonymous": ("303", "303"), "wrong": ("303", "303"), "valid": OK},
    ("portal", "extract"):      {"anonymous": ("303", "303"), "wrong": ("303", "303"), "valid": OK},
    ("sftp", "extract"):        {"anonymous": ("denied", "denied"), "wrong": ("denied", "denied"),
                                 "valid": OK},
}
PRIVATE = ("device", "organisation", "extract")  # the kinds `ReadAccess` calls private

ROWS = [(interface, kind, reader, open_reads, cells[open_reads])
        for (interface, kind), by_reader in TABLE.items()
        for reader, cells in by_reader.items() for open_reads in (False, True)]


# -- the servers ----------------------------------------------------------------------------
@dataclass
class World:
    """One running server and the objects the table reads from it."""

    running: Running
    open_reads: bool
    objects: dict[str, dict[str, Any]]
    extract: Path
    portal_cookie: str

    def body(self, kind: str) -> bytes:
        """The object's bytes as the repository serves them (certificates as DER)."""
        if kind == "extract":
            return self.extract.read_bytes()
        data = self.running.path(self.objects[kind]["path"]).read_bytes()
        if data.startswith(b"-----BEGIN CERTIFICATE"):
            from cryptography import x509
            from cryptography.hazmat.primitives import serialization

            return x509.load_pem_x509_certificate(data).public_bytes(serialization.Encoding.DER)
        return data


def _objects(running: Running) -> dict[str, dict[str, Any]]:
    by_name = {o.get("name"): o for o in running.pki["objects"]}
    return {"root": by_name["root-oca"], "ca": by_name["issuing-oca"],
            "device": running.objects("device")[0],
            "organisation": next(o for o in running.objects("organisation")
                                 if not o["revoked"]),
            "crl": running.objects("crl")[0], "arl": running.objects("arl")[0],
            "document": running.objects("document")[-1]}


async def _world(running: Running, open_reads: bool) -> World:
    from repository_server.extracts.writer import ExtractWriter
    from tests.portal_client import PortalClient

    repo = running.repo
    assert repo.store is not None
    await add_user(repo, READER, None)
    await repo.store.update_user(READER, actor="test", action="test",
                                 password_hash=hash_password(PASSWORD),
                                 must_change_password=False)
    writer = ExtractWriter(repo.store, repo.config.path(repo.config.extracts.dir))
    async with repo.store.extract_lock(wait=True):
        extract = (await writer.produce("full")).path
    async with PortalClient(running.http) as client:
        signed = await client.sign_in(READER, PASSWORD)
        assert signed.status == 303, signed.text
        assert client.cookie is not None
        cookie = client.cookie
    return World(running, open_reads, _objects(running), extract, cookie)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def worlds(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Any],
                 embedded: EmbeddedPostgres) -> AsyncIterator[dict[bool, World]]:
    """Two servers for the whole module: open_reads off and on (web and LDAP)."""
    async with contextlib.AsyncExitStack() as stack:
        out = {}
        for open_reads in (False, True):
            running = await stack.enter_async_context(running_repository(
                tmp_path_factory.mktemp(f"access-{open_reads}"), pki,
                await create_database(embedded), lodge=True,
                web={"open_reads": open_reads}, ldap={"open_reads": open_reads}))
            out[open_reads] = await _world(running, open_reads)
        yield out


# -- the interfaces -------------------------------------------------------------------------
def _key(reader: str) -> str | None:
    return {"anonymous": None, "wrong": WRONG_KEY, "valid": TEST_KEY}[reader]


def _path(world: World, kind: str) -> str:
    """The object's download path (the portal's is the same under /portal/download)."""
    obj = world.objects.get(kind, {})
    if kind in ("root", "ca", "device", "organisation"):
        return f"/certificates/{obj['serial']}"
    if kind in ("crl", "arl"):
        return f"/crls/{obj['issuer_key_id']}/{obj['crl_number']}.crl"
    if kind == "document":
        return f"/documents/{obj['name']}/1"
    return f"/extracts/{world.extract.name}"


async def _https(world: World, kind: str, reader: str) -> str:
    running = world.running
    key = _key(reader)
    url = running.https + _path(world, kind) + (f"?apikey={key}" if key else "")
    ctx = ssl.create_default_context(cafile=running.tls_ca)
    async with aiohttp.ClientSession() as session, session.get(url, ssl=ctx) as resp:
        body = await resp.read()
        if resp.status != 200:
            return str(resp.status)
        assert body == world.body(kind)
        # who may keep the answer follows from the same rule
        scope = resp.headers["Cache-Control"].split(",")[0]
        assert scope == ("private" if kind in PRIVATE and not world.open_reads else "public")
        return "ok"


async def _webservice(world: World, kind: str, reader: str) -> str:
    running = world.running
    key = _key(reader)
    serial = world.objects[kind]["serial"]
    body = ('<?xml version="1.0" encoding="utf-8"?><CertificateDataRequest>'
            f"<CertificateSerial>{serial}</CertificateSerial></CertificateDataRequest>")
    url = running.http + "/services/retrievecertificate" + (f"?apikey={key}" if key else "")
    async with aiohttp.ClientSession() as session, session.post(
            url, data=body.encode(), headers={"Content-Type": "application/xml"}) as resp:
        text = await resp.text()
        if resp.status != 200:
            return str(resp.status)
        assert serial in text
        return "ok"


def _ldap_target(world: World, kind: str) -> tuple[str, str]:
    obj = world.objects[kind]
    if kind in ("root", "ca"):
        return f"smkiKeyId={obj['subject_key_id']},ou=CAs,{SUFFIX}", "cACertificate;binary"
    if kind == "crl":
        return (f"smkiKeyId={obj['issuer_key_id']},ou=CAs,{SUFFIX}",
                "certificateRevocationList;binary")
    if kind == "arl":
        return (f"smkiKeyId={obj['issuer_key_id']},ou=CAs,{SUFFIX}",
                "authorityRevocationList;binary")
    unit = "Devices" if kind == "device" else "Organisations"
    return (f"smkiSerial={obj['serial']},smkiEui64={obj['eui64']},ou={unit},{SUFFIX}",
            "userCertificate;binary")


def _ldap(world: World, kind: str, reader: str) -> str:
    """A base search on the object's entry, as the reader (blocking: ldap3)."""
    port = world.running.repo.bound["ldap"].port
    user = None if reader == "anonymous" else f"uid=tester,ou=Users,{SUFFIX}"
    conn = ldap3.Connection(ldap3.Server("127.0.0.1", port=port, connect_timeout=5),
                            user=user, password=_key(reader), receive_timeout=10,
                            raise_exceptions=False)
    try:
        if not conn.bind():
            return str(conn.result["result"])
        base, attribute = _ldap_target(world, kind)
        if not conn.search(base, "(objectClass=*)", search_scope=ldap3.BASE,
                           attributes=[attribute]):
            return str(conn.result["result"])
        (entry,) = conn.entries
        assert world.body(kind) in entry[attribute].raw_values
        return "ok"
    finally:
        conn.unbind()


async def _portal(world: World, kind: str, reader: str) -> str:
    from repository_server.listeners.http.portal.app import SIGN_IN_FAILED
    from tests.portal_client import PortalClient

    async with PortalClient(world.running.http) as client:
        if reader == "valid":
            client.cookie = world.portal_cookie
        elif reader == "wrong":  # a user nobody is: refused, and counted against nobody
            refused = await client.sign_in("nobody-at-all", PASSWORD)
            assert refused.status == 200 and SIGN_IN_FAILED in refused.text
        got = await client.get("/portal/download" + _path(world, kind))
        if got.status != 200:
            assert got.status != 303 or got.location.startswith("/portal/sign-in")
            return str(got.status)
        assert got.body == world.body(kind)
        return "ok"


async def _sftp(world: World, kind: str, reader: str) -> str:
    import asyncssh

    password = {"anonymous": None, "wrong": "not the password", "valid": PASSWORD}[reader]
    try:
        async with asyncssh.connect(
                "127.0.0.1", world.running.repo.bound["sftp"].port, username=READER,
                password=password, known_hosts=None, client_keys=None, agent_path=None,
                preferred_auth="password" if password else "none") as conn, \
                conn.start_sftp_client() as sftp, sftp.open(world.extract.name, "rb") as f:
            data = await f.read()
    except asyncssh.PermissionDenied:
        return "denied"
    assert data == world.body(kind)
    return "ok"


async def _read(world: World, interface: str, kind: str, reader: str) -> str:
    if interface == "https":
        return await _https(world, kind, reader)
    if interface == "webservice":
        return await _webservice(world, kind, reader)
    if interface == "ldap":
        return await asyncio.to_thread(_ldap, world, kind, reader)
    if interface == "portal":
        return await _portal(world, kind, reader)
    return await _sftp(world, kind, reader)


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize(("interface", "kind", "reader", "open_reads", "expected"), ROWS,
                         ids=[f"{i}-{k}-{r}-{'open' if o else 'closed'}"
                              for i, k, r, o, _e in ROWS])
async def test_who_may_read_what(worlds: dict[bool, World], interface: str, kind: str,
                                 reader: str, open_reads: bool, expected: str) -> None:
    assert await _read(worlds[open_reads], interface, kind, reader) == expected


# -- the rule itself -----------------------------------------------------------------------------
# (open_reads, public, authenticated) -> may read, Cache-Control scope
RULE = [
    (False, True, False, True, "public"),
    (False, True, True, True, "public"),
    (False, False, False, False, "private"),
    (False, False, True, True, "private"),
    (True, True, False, True, "public"),
    (True, True, True, True, "public"),
    (True, False, False, True, "public"),
    (True, False, True, True, "public"),
]


@pytest.mark.parametrize(("open_reads", "public", "authenticated", "allowed", "scope"), RULE)
def test_read_access_rule(open_reads: bool, public: bool, authenticated: bool, allowed: bool,
                          scope: str) -> None:
    access = ReadAccess(open_reads)
    assert access.may_read(public=public, authenticated=authenticated) is allowed
    assert access.cache_scope(public=public) == scope
    assert access.shared(public=public) is (scope == "public")
    if not public:  # a private object is what `may_read_private` is about
        assert access.may_read_private(authenticated=authenticated) is allowed


@pytest.mark.parametrize(("open_reads", "authenticated", "publics", "allowed"), [
    (False, False, [True, True], True),
    (False, False, [True, False], False),
    (False, True, [True, False], True),
    (True, False, [False, False], True),
    (False, False, [], True),
])
def test_read_access_of_a_search(open_reads: bool, authenticated: bool, publics: list[bool],
                                 allowed: bool) -> None:
    """A search's answer is readable when every object in it is."""
    access = ReadAccess(open_reads)
    assert access.may_read_all(publics, authenticated=authenticated) is allowed
