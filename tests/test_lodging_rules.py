"""The lodging rules (issuer resolution, anchors, refusals, conflicts, versions) and the
change events a lodging hands its own process, against an in-memory store
(`tests/fakes.py`): no PostgreSQL, no server. What the SQL itself promises (atomic batches,
concurrent writers, NOTIFY) is tested with the real store in test_lodge.py."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from repository_server import events
from repository_server.lodging.batch import CertOptions, parse_items, resolve_within_batch
from repository_server.lodging.service import Actor, LodgeError, LodgingService
from repository_server.pki.certificates import parse_certificate
from tests.conftest import ROOT
from tests.fakes import FakeLodgingStore
from tests.test_quality import _tool

ACTOR = Actor("dcc-test")


def der(pki: dict[str, Any], name: str) -> bytes:
    obj = next(o for o in pki["objects"] if o.get("name") == name)
    return Path(pki["dir"], obj["path"]).read_bytes()


def organisations(pki: dict[str, Any], n: int) -> list[bytes]:
    """`n` organisation certificates issued by issuing-oca."""
    return [Path(pki["dir"], o["path"]).read_bytes()
            for o in pki["objects"] if o["kind"] == "organisation"][:n]


def service(store: FakeLodgingStore, heard: list[events.Event] | None = None) -> LodgingService:
    return LodgingService(store, on_change=(heard.append if heard is not None else None))


async def test_a_root_is_stored_only_as_a_trust_anchor(pki: dict[str, Any]) -> None:
    store = FakeLodgingStore()
    lodging = service(store)
    with pytest.raises(LodgeError) as refused:
        await lodging.lodge_certificates(der(pki, "root-oca"), ACTOR, CertOptions())
    assert refused.value.status == 422 and "self-signed" in refused.value.results[0]["reason"]
    assert store.certificates == [] and store.audits[-1]["outcome"] == "refused"
    done = await lodging.lodge_certificates(der(pki, "root-oca"), ACTOR,
                                            CertOptions(trust_anchor=True))
    assert done.stored == 1 and store.certificates[0][1].trust_anchor


async def test_a_batch_may_hold_its_own_ca_after_what_it_issued(pki: dict[str, Any]) -> None:
    """Leaves before their CA in the same batch: the second round settles them once the CA
    (verified against the stored root) is known."""
    store = FakeLodgingStore()
    heard: list[events.Event] = []
    lodging = service(store, heard)
    await lodging.lodge_certificates(der(pki, "root-oca"), ACTOR, CertOptions(trust_anchor=True))
    batch = b"".join(organisations(pki, 3)) + der(pki, "issuing-oca")
    done = await lodging.lodge_certificates(batch, ACTOR, CertOptions())
    assert done.stored == 4
    assert [r["outcome"] for r in done.results] == ["stored"] * 4
    assert all(c.issuer_verified for _, c in store.certificates)
    # the events of each committed lodging, handed over at once (not only via NOTIFY)
    assert heard == [events.CertificatesLodged(0, 1), events.CertificatesLodged(1, 5)]


async def test_an_unknown_issuer_refuses_the_whole_batch(pki: dict[str, Any]) -> None:
    store = FakeLodgingStore()
    lodging = service(store)
    with pytest.raises(LodgeError) as refused:
        await lodging.lodge_certificates(b"".join(organisations(pki, 2)), ACTOR, CertOptions())
    assert refused.value.status == 422
    assert {r["outcome"] for r in refused.value.results} == {"refused"}
    assert "is not in the repository" in refused.value.results[0]["reason"]
    assert store.certificates == []


async def test_identical_bytes_are_a_no_op_and_a_new_ca_is_an_issuer(pki: dict[str, Any]) -> None:
    store = FakeLodgingStore()
    lodging = service(store)
    await lodging.lodge_certificates(der(pki, "root-oca"), ACTOR, CertOptions(trust_anchor=True))
    await lodging.lodge_certificates(der(pki, "issuing-oca"), ACTOR, CertOptions())
    # the issuer registry was refreshed once the CA was stored: it holds it by its store id
    assert sorted(i.id for v in lodging.issuers.by_dn.values() for i in v) == [1, 2]
    again = await lodging.lodge_certificates(der(pki, "issuing-oca") + organisations(pki, 1)[0],
                                             ACTOR, CertOptions())
    assert (again.stored, again.identical) == (1, 1)


async def test_a_conflict_stores_nothing_and_names_the_item(pki: dict[str, Any]) -> None:
    """A store that reports a conflict (same issuer and serial, other bytes): 409, each item
    told whether it conflicted or was only held back."""
    store = FakeLodgingStore()
    lodging = service(store)
    await lodging.lodge_certificates(der(pki, "root-oca"), ACTOR, CertOptions(trust_anchor=True))
    await lodging.lodge_certificates(der(pki, "issuing-oca"), ACTOR, CertOptions())
    first, second = organisations(pki, 2)
    await lodging.lodge_certificates(first, ACTOR, CertOptions())
    # the stored one now differs from `first` in its bytes, not in its issuer and serial
    cert_id, held = store.certificates[2]
    store.certificates[2] = (cert_id, held._replace(sha256=b"other"))
    with pytest.raises(LodgeError) as refused:
        await lodging.lodge_certificates(second + first, ACTOR, CertOptions())
    assert refused.value.status == 409
    assert [r["outcome"] for r in refused.value.results] == ["not stored", "conflict"]
    assert len(store.certificates) == 3


async def test_status_changes_are_checked_and_announced(pki: dict[str, Any]) -> None:
    store = FakeLodgingStore()
    heard: list[events.Event] = []
    lodging = service(store, heard)
    await lodging.lodge_certificates(der(pki, "root-oca"), ACTOR, CertOptions(trust_anchor=True))
    serial = parse_certificate(der(pki, "root-oca")).serial
    with pytest.raises(LodgeError) as bad:
        await lodging.set_status(serial, None, "X", None, ACTOR)
    assert bad.value.status == 400
    with pytest.raises(LodgeError) as missing:
        await lodging.set_status("00", None, "N", None, ACTOR)
    assert missing.value.status == 404
    done = await lodging.set_status(serial, None, "N", None, ACTOR)
    assert done["status"] == "N" and heard[-1] == events.StatusChanged(serial, None)


async def test_documents_get_versions_and_identical_ones_announce_nothing() -> None:
    store = FakeLodgingStore()
    heard: list[events.Event] = []
    lodging = service(store, heard)
    one = await lodging.lodge_document("SMKI-RAPP", "text/plain", b"one", ACTOR)
    same = await lodging.lodge_document("SMKI-RAPP", "text/plain", b"one", ACTOR)
    two = await lodging.lodge_document("SMKI-RAPP", "text/html", b"<b>two</b>", ACTOR)
    assert (one["version"], same["outcome"], two["version"]) == (1, "identical", 2)
    assert two["content_type"] != "text/html"  # never a type a browser would run
    assert heard == [events.DocumentLodged("SMKI-RAPP")] * 2
    with pytest.raises(LodgeError):
        await lodging.lodge_document("../etc", "text/plain", b"x", ACTOR)


async def test_crls_need_their_issuer_and_a_greater_number(pki: dict[str, Any]) -> None:
    store = FakeLodgingStore()
    heard: list[events.Event] = []
    lodging = service(store, heard)
    crl = Path(pki["dir"], next(o for o in pki["objects"] if o["kind"] == "crl")["path"])
    with pytest.raises(LodgeError) as no_issuer:
        await lodging.lodge_crl(crl.read_bytes(), ACTOR)
    assert no_issuer.value.status == 422 and "not a CA" in no_issuer.value.reason
    await lodging.lodge_certificates(der(pki, "root-oca"), ACTOR, CertOptions(trust_anchor=True))
    await lodging.lodge_certificates(der(pki, "issuing-oca"), ACTOR, CertOptions())
    done = await lodging.lodge_crl(crl.read_bytes(), ACTOR)
    assert done["outcome"] == "stored" and done["kind"] == "crl"
    assert isinstance(heard[-1], events.CrlLodged)
    again = await lodging.lodge_crl(crl.read_bytes(), ACTOR)
    assert again["outcome"] == "identical" and len(heard) == 3


def test_resolution_within_a_batch_is_repeated_until_nothing_moves(pki: dict[str, Any]) -> None:
    """Pure: a leaf, its CA and the CA's root in reverse order, the root an anchor."""
    ders = [*organisations(pki, 1), der(pki, "issuing-oca"), der(pki, "root-oca")]
    parsed = parse_items(0, ders, {})
    assert [p.issuer_missing for p in parsed] == [True, True, False]
    by_index, pending = resolve_within_batch(parsed, {}, CertOptions(trust_anchor=True))
    assert pending == []
    assert [by_index[i].issuer is not None for i in range(3)] == [True, True, False]
    # without the anchor the root is not acceptable: nothing below it settles
    by_index, pending = resolve_within_batch(parsed, {}, CertOptions())
    assert [p.index for p in pending] == [0, 1]


def test_unverified_cas_vouch_for_what_they_issued(pki: dict[str, Any]) -> None:
    """Operator import with allow_unverified_issuer: a CA whose own issuer is absent still
    settles its leaves in the same batch; it stays pending itself."""
    ders = [*organisations(pki, 2), der(pki, "issuing-oca")]
    parsed = parse_items(0, ders, {})
    by_index, pending = resolve_within_batch(parsed, {}, CertOptions())
    assert [p.index for p in pending] == [0, 1, 2]
    by_index, pending = resolve_within_batch(parsed, {},
                                             CertOptions(allow_unverified_issuer=True))
    assert [p.index for p in pending] == [2]
    assert by_index[0].issuer is not None and by_index[0].error is None


def test_the_fakes_implement_the_store_protocols() -> None:
    """The in-memory stores these tests use are checked against the Protocols the services
    take (`tests/fakes.py` is not in the package mypy checks by default)."""
    res = subprocess.run([*_tool("mypy"), "--strict", "tests/fakes.py"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
