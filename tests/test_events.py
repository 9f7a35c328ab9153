"""Change events: one text form for every type (encode/decode), refusals of what is not an
event, and, on a running server, that a lodging reaches its own process's subscribers once
(at commit, its NOTIFY's echo skipped) while other processes' events still arrive."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
import pytest

from repository_server import events
from tests.conftest import Running

EVERY_TYPE: list[events.Event] = [
    events.CertificatesLodged(41, 4041),
    events.SerialsShared(("0A1B", "77FF00")),
    events.StatusChanged("7CA692EEDA324658711548B8B196EEC1", bytes.fromhex("90b3d51f303b52a7")),
    events.StatusChanged("01", None),
    events.CrlLodged(bytes.fromhex("443abf41064e2750")),
    events.DocumentLodged("SMKI-RAPP_v2.1"),
    events.UserChanged("dcc-boxed"),
    events.SessionEnded(bytes(range(32))),
]


@pytest.mark.parametrize("event", EVERY_TYPE, ids=lambda e: type(e).__name__)
def test_every_event_survives_its_text_form(event: events.Event) -> None:
    payload = events.encode(event)
    assert payload.startswith(event.kind + ":")
    assert events.decode(payload) == event


def test_the_text_form_is_the_one_every_process_reads() -> None:
    """Processes of one deployment share the channel: the form is fixed."""
    assert events.encode(events.CertificatesLodged(1, 9)) == "certs:1:9"
    assert events.encode(events.StatusChanged("AB", None)) == "status:AB:"
    assert events.encode(events.SessionEnded(b"\x01\xff")) == "portal-session:01ff"
    assert set(events.TYPES) == {"certs", "serials", "status", "crl", "doc", "users",
                                 "portal-session"}


@pytest.mark.parametrize("payload", [
    "", "certs", "nonsense:1", "certs:1", "certs:a:b", "certs:1:2:3", "status:AB",
    "status::", "crl:zz", "portal-session:0", "doc:", "users:", "serials:", "serials:a,,b",
    "\x00:\x00",
])
def test_what_is_not_an_event_is_refused_clearly(payload: str) -> None:
    with pytest.raises(events.EventError):
        events.decode(payload)


def test_a_lodging_and_its_echo_are_delivered_once_in_either_order() -> None:
    echoes = events.Echoes()
    assert echoes.local("doc:a") and not echoes.echo("doc:a")  # handed over, then NOTIFY
    assert echoes.echo("doc:b") and not echoes.local("doc:b")  # NOTIFY came back first
    assert echoes.local("doc:c") and echoes.local("doc:c")  # two lodgings, two echoes
    assert not echoes.echo("doc:c") and not echoes.echo("doc:c")
    # a write outside the lodging path (no handing over): every NOTIFY is delivered
    assert echoes.echo("doc:d") and echoes.echo("doc:d")
    echoes.forget()  # LISTEN re-established: what was kept is forgotten
    assert echoes.local("doc:d") and echoes.local("doc:a")
    for i in range(events.Echoes.LIMIT + 10):  # bounded, whatever never comes back
        echoes.local(f"doc:{i}")
    assert echoes.echo("doc:a")


async def _until(done: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not done():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_lodging_reaches_its_own_process_once(server: Running) -> None:
    catalog = server.repo.catalog
    assert catalog is not None and server.repo.store is not None
    await _until(lambda: catalog.listening)
    heard: list[str] = []
    users: list[str] = []
    catalog.subscribe(events.DocumentLodged, heard.append)
    catalog.subscribe("users", users.append)
    client = server.client()
    try:
        reply = await asyncio.to_thread(client.document, "Echo-Test", b"one", "text/plain")
    finally:
        client.close()
    assert reply.status == 200
    assert heard == ["Echo-Test"]  # at commit, before the acknowledgement
    # Another process's events arrive (and a malformed payload is ignored on the way);
    # NOTIFYs come in commit order, so once "Other" is heard, the lodging's own echo,
    # sent before it, has come back and been skipped.
    conn = await asyncpg.connect(server.repo.store.dsn)
    try:
        for payload in ("bogus:1", "certs:x", events.encode(events.DocumentLodged("Other"))):
            await conn.execute("SELECT pg_notify($1, $2)", events.CHANNEL, payload)
    finally:
        await conn.close()
    await _until(lambda: "Other" in heard)
    assert heard == ["Echo-Test", "Other"]
    # what this process changes outside lodging is heard through its NOTIFY only
    await server.repo.store.create_user("echo-user", "party", api_key_sha256=None,
                                        api_key_hint=None, password_hash=None, actor="test")
    await _until(lambda: "echo-user" in users)
    assert users.count("echo-user") == 1  # (the fixture's own user may come in before it)


async def test_concurrent_lodgings_each_reach_their_own_process_once(server: Running) -> None:
    """Twelve lodgings at once, each with its handing-over and its echo interleaved with the
    others': every one is heard exactly once, its echo skipped."""
    catalog = server.repo.catalog
    assert catalog is not None
    await _until(lambda: catalog.listening)
    heard: list[str] = []
    catalog.subscribe(events.DocumentLodged, heard.append)
    names = [f"Burst-{i:02d}" for i in range(12)]

    def lodge(name: str) -> int:
        client = server.client()
        try:
            return client.document(name, name.encode(), "text/plain").status
        finally:
            client.close()

    statuses = await asyncio.gather(*(asyncio.to_thread(lodge, n) for n in names))
    assert statuses == [200] * len(names)
    assert sorted(heard) == names  # each at its own commit, before its acknowledgement
    # Every echo comes back and is skipped; the marker written after them proves they have
    # (NOTIFYs arrive in commit order).
    assert server.repo.store is not None
    conn = await asyncpg.connect(server.repo.store.dsn)
    try:
        await conn.execute("SELECT pg_notify($1, $2)", events.CHANNEL,
                           events.encode(events.DocumentLodged("Marker")))
    finally:
        await conn.close()
    await _until(lambda: "Marker" in heard)
    assert sorted(heard) == [*names, "Marker"]  # no echo delivered a second time
