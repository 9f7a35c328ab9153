"""Extracts read from the node's read replica (issue 13): the same bytes as the PostgreSQL
path for the same store, byte for byte (a full and a delta, over certificates of every kind,
CRLs, ARLs, documents and status changes, with pages small enough to cross many page
boundaries); and, with PostgreSQL stopped, the list of published extracts (`GET /extracts`
and the portal's page) and the files themselves still served."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from repository_server.extracts import format as fmt
from repository_server.extracts.replica import ReplicaPages
from repository_server.extracts.writer import ExtractWriter, Produced
from repository_server.store.embedded import EmbeddedPostgres
from tests.conftest import TEST_KEY, Running, http_get, running_repository
from tests.pkitools import load_cert, pem
from tests.test_extracts import apply, read_extract, store_state

QUICK_DB = {"command_timeout": 2.0, "connect_timeout": 2.0, "pool_min": 1, "pool_max": 4}


def writers(running: Running, when: datetime, **kw: Any) -> tuple[ExtractWriter, ExtractWriter]:
    """(PostgreSQL, replica) writers of the running server's store and extracts directory."""
    repo = running.repo
    assert repo.store is not None and repo.replica is not None and repo.feeder is not None
    directory = repo.config.path(repo.config.extracts.dir)
    pages = ReplicaPages(repo.replica, repo.feeder.catch_up)
    return (ExtractWriter(repo.store, directory, clock=lambda: when, **kw),
            ExtractWriter(repo.store, directory, clock=lambda: when, replica=pages, **kw))


async def produce_both(running: Running, kind: str, when: datetime,
                       **kw: Any) -> tuple[Produced, bytes]:
    """The extract written from PostgreSQL, then undone (its row deleted, the id sequence
    set back, the file removed) and written again from the replica: the same id, name and
    clock, so the two files must be equal byte for byte. Returns the replica's."""
    store = running.repo.store
    assert store is not None
    from_store, from_replica = writers(running, when, **kw)
    async with store.extract_lock(wait=True):
        first = await from_store.produce(kind)
    assert first.source == "postgresql"
    expected = first.path.read_bytes()
    await store.pool.execute("DELETE FROM extracts WHERE id = $1", first.id)
    await store.pool.execute("SELECT setval('extracts_id_seq', $1, false)", first.id)
    first.path.unlink()
    async with store.extract_lock(wait=True):
        second = await from_replica.produce(kind)
    assert second.source == "replica"
    assert (second.id, second.name, second.counts) == (first.id, first.name, first.counts)
    got = second.path.read_bytes()
    assert got == expected, f"{kind}: the replica's extract differs from PostgreSQL's"
    return second, got


def other_certificate(running: Running) -> bytes:
    """An end-entity certificate outside the GB profile (no EUI-64, no OU): kind "other"."""
    issuer, issuer_key = running.ca("issuing-oca")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "other")]))
            .issuer_name(issuer.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(issuer.not_valid_before_utc)
            .not_valid_after(issuer.not_valid_after_utc)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value),
                critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(issuer_key, hashes.SHA256()))
    return pem(cert)


def renewal_of(running: Running, obj: dict[str, Any]) -> bytes:
    original = load_cert(running.path(obj["path"]))
    issuer, issuer_key = running.ca("issuing-oca")
    builder = (x509.CertificateBuilder().subject_name(original.subject)
               .issuer_name(issuer.subject).public_key(original.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(original.not_valid_before_utc)
               .not_valid_after(original.not_valid_after_utc))
    for ext in original.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    return pem(builder.sign(issuer_key, hashes.SHA256()))


async def test_replica_extracts_equal_postgresql_byte_for_byte(loaded: Running) -> None:
    repo = loaded.repo
    assert repo.store is not None
    dsn = repo.config.database.url
    state: dict[str, dict[str, Any]] = {}
    full, _ = await produce_both(loaded, "full", datetime(2026, 11, 22, 2, 0, tzinfo=UTC),
                                 page_size=7)
    apply(state, read_extract(full.path))

    # after it: new certificates (one of kind "other"), status and flag changes (one of a
    # certificate lodged in this delta's range too), a CRL, documents
    devices = loaded.objects("device")
    client = loaded.client()
    try:
        reply = await asyncio.to_thread(client.certificates,
                                        renewal_of(loaded, loaded.objects("organisation")[0])
                                        + other_certificate(loaded))
        assert reply.status == 200, reply.body
        for device, change in ((devices[0], {"status": "N", "manufacturing_flag": True}),
                               (devices[1], {"status": "I"}), (devices[0], {"status": "P"})):
            reply = await asyncio.to_thread(client.status, device["serial"], change)
            assert reply.status == 200, reply.body
        org = loaded.objects("organisation")[1]
        reply = await asyncio.to_thread(client.crl, loaded.next_oca_crl(
            2, int(org["serial"], 16)))
        assert reply.status == 200, reply.body
        for body in (b"version one\n", b"version two\n"):
            reply = await asyncio.to_thread(client.document, "SMKI-Replica-Note", body,
                                            "text/plain")
            assert reply.status == 200, reply.body
    finally:
        client.close()
    kinds = {r["kind"] for r in await repo.store.pool.fetch("SELECT DISTINCT kind FROM"
                                                             " certificates")}
    assert kinds == {"root", "ca", "organisation", "device", "other"}
    crl_kinds = {r["kind"] for r in await repo.store.pool.fetch("SELECT kind FROM crls")}
    assert crl_kinds == {"crl", "arl"}

    delta, _ = await produce_both(loaded, "delta", datetime(2026, 11, 23, 2, 0, tzinfo=UTC),
                                  page_size=3, compression="none")
    extract = read_extract(delta.path)
    changes = sorted(r["change"] for r, _ in extract["certificates"].values())
    assert changes == ["new", "new", "status", "status"], changes
    assert delta.counts["crls"] == 1 and delta.counts["documents"] == 2
    apply(state, extract)
    assert state == await store_state(dsn)

    # a full of everything now: certificates of every kind, every CRL/ARL version, every
    # document version, the statuses as changed
    everything, _ = await produce_both(loaded, "full", datetime(2026, 11, 29, 2, 0, tzinfo=UTC),
                                       page_size=5)
    whole: dict[str, dict[str, Any]] = {}
    apply(whole, read_extract(everything.path))
    assert whole == await store_state(dsn)
    # the listing beside the files is the store's table, row for row
    directory = repo.config.path(repo.config.extracts.dir)
    assert fmt.parse_listing((directory / fmt.LISTING).read_bytes()) == \
        await repo.store.extracts()


async def test_a_replica_behind_its_feed_is_not_used(loaded: Running) -> None:
    """A replica that cannot reach the markers in time (a lagging feed): PostgreSQL is read."""
    repo = loaded.repo
    assert repo.store is not None and repo.replica is not None
    applied = repo.replica.applied()

    async def stuck(_upto: int) -> int:
        return applied - 1

    pages = ReplicaPages(repo.replica, stuck, catch_up_seconds=0.5)
    assert not await pages.ready(applied)
    writer = ExtractWriter(repo.store, repo.config.path(repo.config.extracts.dir), replica=pages)
    async with repo.store.extract_lock(wait=True):
        done = await writer.produce("full")
    assert done.source == "postgresql"
    # a replica not ready (being built) is not asked at all
    assert not await ReplicaPages(repo.replica, stuck, lambda: False).ready(0)


async def get(url: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(http_get, url, **kw)


async def test_extract_list_and_downloads_with_postgresql_stopped(tmp_path: Path,
                                                                  pki: dict[str, Any]) -> None:
    from tests.portal_client import PortalClient

    pg = EmbeddedPostgres(tmp_path / "own-pg")  # not the session's: this one is stopped
    await asyncio.to_thread(pg.acquire)
    try:
        async with running_repository(tmp_path / "data", pki, pg.dsn, lodge=True,
                                      database=QUICK_DB) as running:
            repo = running.repo
            assert repo.store is not None
            _, from_replica = writers(running, datetime.now(UTC))
            async with repo.store.extract_lock(wait=True):
                full = await from_replica.produce("full")
            assert full.source == "replica"
            headers = {"X-API-Key": TEST_KEY}
            status, _h, before = await get(f"{running.http}/extracts", headers=headers)
            assert status == 200 and [e["name"] for e in json.loads(before)] == [full.name]
            async with PortalClient(running.http) as portal:
                await portal.ready(running, "extract-reader", "a long enough password 1")
                page = await portal.get("/portal/extracts")
                assert page.status == 200 and full.name in page.text

                await asyncio.to_thread(pg.stop)
                try:
                    status, _h, body = await get(f"{running.http}/readyz")
                    assert status == 200 and json.loads(body)["status"] == "degraded", body
                    # the list: what it was, from the listing beside the files
                    status, _h, during = await get(f"{running.http}/extracts", headers=headers)
                    assert status == 200, during
                    assert json.loads(during) == json.loads(before)
                    # the file, whole and by range
                    url = f"{running.http}/extracts/{full.name}"
                    status, _h, body = await get(url, headers=headers)
                    assert status == 200 and body == full.path.read_bytes()
                    status, _h, body = await get(url, headers={**headers, "Range": "bytes=0-99"})
                    assert status == 206 and body == full.path.read_bytes()[:100]
                    # the portal's page and download, for a user signed in before
                    page = await portal.get("/portal/extracts")
                    assert page.status == 200 and full.name in page.text, page.text
                    got = await portal.get(f"/portal/download/extracts/{full.name}")
                    assert got.status == 200 and got.body == full.path.read_bytes()
                finally:
                    await asyncio.to_thread(pg.acquire)
    finally:
        await asyncio.to_thread(pg.release)


async def test_scheduler_check_writes_a_missing_or_stale_listing(server: Running) -> None:
    """An installation upgraded with extracts already published, or a crash between
    publication and listing: the scheduler's next check writes the listing."""
    from repository_server.extracts.scheduler import ExtractScheduler

    repo = server.repo
    assert repo.store is not None and repo.extract_files is not None
    directory = repo.config.path(repo.config.extracts.dir)
    from_store, _ = writers(server, datetime.now(UTC))
    async with repo.store.extract_lock(wait=True):
        done = await from_store.produce("full")
    listing = directory / fmt.LISTING
    expected = listing.read_bytes()
    listing.unlink()
    # no listing: the store is read (as before this listing existed)
    assert [r.name for r in await repo.extract_files.published()] == [done.name]
    listing.write_bytes(b"{not json")  # damaged: the store is read
    assert [r.name for r in await repo.extract_files.published()] == [done.name]
    scheduler = ExtractScheduler(repo.store, from_store, repo.config.extracts)
    assert await scheduler.tick() == []  # nothing due (a full was just made) ...
    assert listing.read_bytes() == expected  # ... but the listing is written again
    assert await repo.extract_files.published() == await repo.store.extracts()
