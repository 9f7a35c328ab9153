"""ldap/fastpath.py answers searches by EUI-64 the short way: it must answer exactly as the
general path does. Two servers on one store, one with `ldap.fast_path` off, are asked the same
few hundred searches (bases, scopes, filters, attribute lists, bound and anonymous, valid and
invalid values); every answer must be the same bytes."""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
from pathlib import Path
from typing import Any

import ldap3
import pytest
from ldap3.operation.bind import bind_operation
from ldap3.operation.search import search_operation

from repository_server.listeners.ldap.fastpath import HOT
from tests.conftest import TEST_KEY, Running, add_user, lodge_pki, start_repository
from tests.ldaptools import pdu, split_frames

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _answer(port: int, bind: bytes | None, request: bytes) -> tuple[bytes, int]:
    """The raw bytes of every response to `request` (message id 2) up to its done, and how
    many entries they hold."""
    from ldap3.protocol.rfc4511 import LDAPMessage
    from pyasn1.codec.ber import decoder as ber_decoder

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        buf = b""
        if bind is not None:  # bound first: a search sent behind a bind waits for it
            s.sendall(bind)
            while not split_frames(buf)[0]:
                chunk = s.recv(65536)
                assert chunk, "connection closed before the bind was answered"
                buf += chunk
            buf = split_frames(buf)[1]
        s.sendall(request)
        out = b""
        entries = 0
        while True:
            chunk = s.recv(65536)
            assert chunk, "connection closed before the search was done"
            buf += chunk
            frames, buf = split_frames(buf)
            for frame in frames:
                msg, _ = ber_decoder.decode(frame, asn1Spec=LDAPMessage())
                if int(msg["messageID"]) != 2:
                    continue
                out += frame
                name = msg["protocolOp"].getName()
                entries += name == "searchResEntry"
                if name == "searchResDone":
                    return out, entries


def _requests(euis: list[str], serial: str) -> list[bytes]:
    rng = random.Random(7)
    spellings = []
    for e in euis:
        h = e.replace("-", "")
        spellings += [e, e.lower(), h, h.lower(), e.replace("-", ":")]
    spellings += ["00-DB-12", "ZZ-DB-12-34-56-78-90-A4", "", "00-db-12-34-56-78-90-a4-ff"]
    extra = ["", "(smkiKeyUsage=KA)", "(smkiKeyUsage=ka)", "(smkiKeyUsage=DS)",
             "(smkiKeyUsage=XX)", "(objectClass=smkiCertificate)",
             "(objectClass=smkiSubjectEntry)", "(objectClass=top)", "(smkiStatus=I)",
             "(smkiStatus=R)", "(smkiKind=device)", "(smkiKind=organisation)", "(smkiRole=*)",
             "(smkiKeyUsage=*)", f"(smkiSerial={serial})", "(smkiManufacturingFlag=FALSE)",
             "(cn=x)", "(smkiKeyUsage;binary=KA)", "(smkiNotAfter>=20300101000000Z)",
             "(!(smkiKeyUsage=KA))", "(|(smkiKeyUsage=KA)(smkiKeyUsage=DS))"]
    bases = ["ou=Devices,o=SMKI", "ou=Organisations,o=SMKI", "OU=devices, O=smki", "o=SMKI",
             "ou=CAs,o=SMKI"]
    attr_lists = [[], ["userCertificate;binary"], ["userCertificate"], ["smkiSerial", "smkiStatus"],
                  ["*"], ["+"], ["1.1"], ["cn", "smkiKeyUsage"], ["*", "+"], ["entryDN"],
                  ["smkiSubject", "smkiIssuerKeyId", "createTimestamp"]]
    out = []
    for eui, more in itertools.product(spellings, extra):
        flt = f"(smkiEui64={eui})" if not more else f"(&(smkiEui64={eui}){more})"
        if rng.random() < 0.5 and more:
            flt = f"(&{more}(smkiEui64={eui}))"
        base = rng.choice(bases)
        scope = rng.choice((ldap3.BASE, ldap3.LEVEL, ldap3.SUBTREE, ldap3.SUBTREE))
        attrs = rng.choice(attr_lists)
        types_only = rng.random() < 0.1
        size = rng.choice((0, 0, 0, 1))
        req = search_operation(base, flt, scope, ldap3.DEREF_NEVER, attrs, size, 0, types_only,
                               True, True)
        out.append(pdu(2, "searchRequest", req))
    # the commonest search's neighbours (ldap/_hot.c encodes these): each EUI-64 spelling,
    # filters on what a record's head holds, userCertificate alone, a size limit of 0 or 1
    for eui, more, base, size in itertools.product(
            spellings, ["(smkiKeyUsage=KA)", "(smkiKeyUsage=DS)", "(smkiKeyUsage=XX)",
                        "(objectClass=smkiCertificate)", "(smkiKind=organisation)"],
            bases[:2], (0, 1)):
        req = search_operation(base, f"(&(smkiEui64={eui}){more})", ldap3.SUBTREE,
                               ldap3.DEREF_NEVER, ["userCertificate;binary"], size, 0, False,
                               True, True)
        out.append(pdu(2, "searchRequest", req))
    return out


async def test_the_short_way_answers_exactly_as_the_general_way(
        tmp_path: Path, pki: dict[str, Any], fresh_db: str) -> None:
    fast = await start_repository(tmp_path / "fast", pki, fresh_db)
    slow = await start_repository(tmp_path / "slow", pki, fresh_db, ldap={"fast_path": False})
    # no response cache: a search of a learnt shape is read without the decoder
    uncached = await start_repository(tmp_path / "uncached", pki, fresh_db,
                                      ldap={"response_cache_mb": 0})
    # and the same in Python only, without ldap/_hot.c
    python = await start_repository(tmp_path / "python", pki, fresh_db,
                                    ldap={"response_cache_mb": 0, "compiled": False})
    try:
        assert fast.ldap is not None and fast.ldap.fast is not None
        assert slow.ldap is not None and slow.ldap.fast is None
        await add_user(fast, "tester", TEST_KEY)
        await slow.accounts.load()  # type: ignore[union-attr]
        running = Running(fast, pki)
        await asyncio.to_thread(lodge_pki, running)
        await slow.catalog.synced(fast.replica.applied())  # type: ignore[union-attr]
        await uncached.catalog.synced(fast.replica.applied())  # type: ignore[union-attr]
        await python.catalog.synced(fast.replica.applied())  # type: ignore[union-attr]
        devices = running.objects("device")
        orgs = running.objects("organisation")
        euis = sorted({d["eui64"] for d in devices[:3]} | {o["eui64"] for o in orgs[:2]
                                                           if o.get("eui64")})
        requests = _requests(euis, devices[0]["serial"])
        bind = pdu(1, "bindRequest", bind_operation(3, ldap3.SIMPLE, "uid=tester,ou=Users,o=SMKI",
                                                    TEST_KEY))
        fast_port, slow_port = fast.bound["ldap"].port, slow.bound["ldap"].port
        uncached_port = uncached.bound["ldap"].port
        python_port = python.bound["ldap"].port
        # Each request again with another device's or organisation's EUI-64 spelt the same
        # way: the same shape (ldap/fastpath.py `Shapes`), answered from its compiled form.
        # (each right after its original: the shapes kept are bounded)
        swapped = []
        corpus = []
        for request in requests:
            corpus.append(request)
            for eui, other in zip(euis, [*euis[1:], euis[0]], strict=True):
                for spell in (lambda e: e, str.lower, lambda e: e.replace("-", ""),
                              lambda e: e.replace("-", "").lower(), lambda e: e.replace("-", ":")):
                    if spell(eui).encode() in request:
                        swapped.append(request.replace(spell(eui).encode(), spell(other).encode()))
                        corpus.append(swapped[-1])
        with_entries = 0
        for request in corpus:
            for b in (bind, None):
                got = await asyncio.to_thread(_answer, fast_port, b, request)
                want = await asyncio.to_thread(_answer, slow_port, b, request)
                assert got == want, (request.hex(), b is not None)
                got = await asyncio.to_thread(_answer, uncached_port, b, request)
                assert got == want, (request.hex(), b is not None, "uncached")
                got = await asyncio.to_thread(_answer, python_port, b, request)
                assert got == want, (request.hex(), b is not None, "python")
                with_entries += got[1] > 0
        assert len(requests) >= 750 and len(swapped) >= 600 and with_entries > 100
        assert fast.ldap.fast.answered > 60  # the short way answered many of them
        # many from records read undecoded (tested on their heads), many not
        assert 30 < fast.ldap.fast.answered_raw < fast.ldap.fast.answered - 30
        assert fast.ldap.shapes is not None and fast.ldap.shapes.matched > 60  # and from shapes
        assert uncached.ldap is not None and uncached.ldap.shapes is not None
        assert uncached.ldap.shapes.whole > 60  # read without the decoder
        # ... and many encoded by ldap/_hot.c (when built; test_ldap_hot.py wants it in CI)
        assert uncached.ldap.fast is not None and python.ldap is not None
        assert python.ldap.fast is not None and python.ldap.fast.answered_hot == 0
        assert python.ldap.shapes is not None and python.ldap.shapes.whole > 60
        if HOT is not None:
            assert uncached.ldap.fast.hot is HOT and uncached.ldap.fast.answered_hot > 30
    finally:
        await python.stop()
        await uncached.stop()
        await slow.stop()
        await fast.stop()
