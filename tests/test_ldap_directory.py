"""The LDAP directory over an in-memory fake of what it reads (`DirectoryReads`): base
resolution and what a reader who may not read private entries is told, the walks (paged
across the read model's pages) and the indexed lookups. Fast: no server, no store."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from repository_server.access import ReadAccess
from repository_server.listeners.ldap import dn
from repository_server.listeners.ldap.directory import (
    PAGE_ROWS,
    Directory,
    DirectoryError,
    DirectoryReads,
    Node,
)
from repository_server.listeners.ldap.entries import unit_of
from repository_server.listeners.ldap.filters import Entry, Plan
from repository_server.listeners.ldap.protocol import ResultCode
from repository_server.readmodel.catalog import CertEntry, CrlEntry
from repository_server.readmodel.records import CertRecord, CrlRecord

SUFFIX = "o=SMKI"
ROOT_KEY = bytes.fromhex("0A" * 8)
_LODGED = datetime(2026, 12, 5, 6, 0, tzinfo=UTC)
_US = int(_LODGED.timestamp()) * 1_000_000


def cert(n: int, kind: str, *, eui: bytes | None = None, key: bytes | None = None) -> CertRecord:
    sha = n.to_bytes(32, "big")
    return CertRecord(n, f"{n:02X}", ROOT_KEY, b"\x30" + sha, sha, sha.hex(), _US,
                      "Sat, 05 Dec 2026 06:00:00 GMT", kind, eui,
                      eui.hex("-").upper() if eui else "", None, "KA" if eui else "CA", "I",
                      False, _US, _US + 10**15, key, "" if eui else f"CN=C{n}", "CN=Root")


class FakeReads:
    """The read model as the directory sees it, over a list of certificates."""

    live = True

    def __init__(self, certs: list[CertRecord], crls: Sequence[CrlRecord] = ()) -> None:
        self.certs = sorted(certs, key=lambda c: c.id)
        self.crls = [CrlEntry(r, r.sha256.hex(), r.this_update.timestamp(), None, "x.crl")
                     for r in crls]

    def _subject(self, device: bool) -> list[CertRecord]:
        kind = "device" if device else "organisation"
        return sorted((c for c in self.certs if c.kind == kind and c.eui64),
                      key=lambda c: (c.eui64 or b"", c.id))

    def version(self) -> int:
        return 1

    def has_subjects(self, device: bool) -> bool:
        return bool(self._subject(device))

    def has_other(self) -> bool:
        return any(unit_of(c) == "other" for c in self.certs)

    def ca_certificates(self) -> list[CertEntry]:
        return [c for c in self.certs if unit_of(c) == "cas"]

    def current_crls(self) -> list[CrlEntry]:
        return self.crls

    def by_sha256(self, sha256: bytes) -> list[CertEntry]:
        return [c for c in self.certs if c.sha256 == sha256]

    def by_subject_key_id(self, key_id: bytes) -> list[CertEntry]:
        return [c for c in self.certs if c.subject_key_id == key_id]

    def subjects_page(self, device: bool, after_eui: bytes, limit: int) -> list[bytes]:
        euis = sorted({c.eui64 for c in self._subject(device) if c.eui64 and c.eui64 > after_eui})
        return euis[:limit]

    def subject_certificates_page(self, device: bool, after_eui: bytes, after_id: int,
                                  limit: int) -> list[CertEntry]:
        return [c for c in self._subject(device)
                if (c.eui64 or b"", c.id) > (after_eui, after_id)][:limit]

    def other_certificates_page(self, after_id: int, limit: int) -> list[CertEntry]:
        return [c for c in self.certs if unit_of(c) == "other" and c.id > after_id][:limit]

    def subject_now(self, eui64: bytes, device: bool, now: float
                    ) -> tuple[tuple[CertEntry, ...], list[str]]:
        found = tuple(c for c in self._subject(device) if c.eui64 == eui64)
        return found, [c.lodged_status for c in found]

    def subject(self, eui64: bytes, device: bool) -> tuple[CertEntry, ...]:
        return self.subject_now(eui64, device, 0)[0]

    async def certificates(self, serial: str) -> tuple[CertEntry, ...]:
        return tuple(c for c in self.certs if c.serial == serial)

    async def by_eui(self, eui64: bytes, device: bool) -> tuple[CertEntry, ...]:
        return self.subject_now(eui64, device, 0)[0]

    async def by_eui_now(self, eui64: bytes, device: bool, now: float
                         ) -> tuple[tuple[CertEntry, ...], list[str]]:
        return self.subject_now(eui64, device, now)

    async def statuses(self, entries: Sequence[CertEntry], now: float) -> list[str]:
        return [c.lodged_status for c in entries]


DEVICE_EUI = bytes.fromhex("00DB1234567890A4")
ORG_EUI = bytes.fromhex("90B3D51F30000002")
CERTS = [cert(1, "root", key=ROOT_KEY), cert(2, "device", eui=DEVICE_EUI),
         cert(3, "device", eui=DEVICE_EUI), cert(4, "organisation", eui=ORG_EUI),
         cert(5, "other")]
CRL = CrlRecord(7, "arl", ROOT_KEY, "CN=Root", 3, _LODGED, None, bytes(32), b"\x30\x03arl", 0,
                _LODGED)
DEVICE_DN = "smkiEui64=00-DB-12-34-56-78-90-A4,ou=Devices,o=SMKI"


def directory(certs: list[CertRecord] = CERTS, open_reads: bool = False) -> Directory:
    reads: DirectoryReads = FakeReads(certs, [CRL])
    return Directory(reads, suffix=SUFFIX, root_dse={}, access=ReadAccess(open_reads))


def base(text: str) -> dn.DN:
    return dn.parse_normalised(text)


async def entries(d: Directory, node: Node, scope: int, plan: Plan, authenticated: bool,
                  at: str) -> list[Entry]:
    return [e async for e in d.candidates(node, scope, plan, authenticated, base(at))]


async def refusal(d: Directory, at: str, authenticated: bool) -> tuple[int, str, str]:
    with pytest.raises(DirectoryError) as caught:
        await d.resolve(base(at), authenticated)
    return caught.value.code, caught.value.matched, caught.value.message


async def test_a_reader_who_may_not_read_private_entries_cannot_tell_they_exist() -> None:
    d = directory()
    hidden = [DEVICE_DN, f"smkiSerial=02,{DEVICE_DN}", f"smkiSerial=FFFF,{DEVICE_DN}",
              f"smkiSerial=not-hex,{DEVICE_DN}", "smkiEui64=00-00-00-00-00-00-00-01,ou=Devices,o=SMKI",
              "smkiSerial=05,ou=Other,o=SMKI"]
    answers = {await refusal(d, at, False) for at in hidden}
    assert {(code, matched) for code, matched, _ in answers} == {
        (ResultCode.NO_SUCH_OBJECT, "ou=Devices,o=SMKI"), (ResultCode.NO_SUCH_OBJECT, "ou=Other,o=SMKI")}
    assert {message for _, _, message in answers} == {"no such entry"}
    # an authenticated reader, or anyone with open reads: the entries, and the deepest match
    for d, authenticated in ((directory(), True), (directory(open_reads=True), False)):
        assert await d.resolve(base(DEVICE_DN), authenticated) == Node("subject", "devices",
                                                                       DEVICE_EUI)
        assert (await d.resolve(base(f"smkiSerial=03,{DEVICE_DN}"), authenticated)
                == Node("cert", "devices", DEVICE_EUI, "03"))
        assert await refusal(d, f"smkiSerial=FFFF,{DEVICE_DN}", authenticated) == (
            ResultCode.NO_SUCH_OBJECT, DEVICE_DN, "no such entry")
        assert await refusal(d, f"smkiSerial=not-hex,{DEVICE_DN}", authenticated) == (
            ResultCode.NO_SUCH_OBJECT, DEVICE_DN, "no such entry")
    # public entries resolve for everyone
    ca_dn = "smkiKeyId=0A0A0A0A0A0A0A0A,ou=CAs,o=SMKI"
    assert await directory().resolve(base(ca_dn), False) == Node("ca", "cas", ROOT_KEY)
    assert await refusal(directory(), f"cn=x,{ca_dn}", False) == (
        ResultCode.NO_SUCH_OBJECT, ca_dn, "no such entry")


async def test_the_whole_tree_walked_in_order_and_private_entries_only_when_readable() -> None:
    d = directory()
    everything = [e.dn for e in await entries(d, Node("suffix"), 2, Plan(), True, SUFFIX)]
    assert everything == [
        "o=SMKI", "ou=CAs,o=SMKI", "smkiKeyId=0A0A0A0A0A0A0A0A,ou=CAs,o=SMKI",
        "ou=Devices,o=SMKI", DEVICE_DN, f"smkiSerial=02,{DEVICE_DN}",
        f"smkiSerial=03,{DEVICE_DN}", "ou=Organisations,o=SMKI",
        "smkiEui64=90-B3-D5-1F-30-00-00-02,ou=Organisations,o=SMKI",
        "smkiSerial=04,smkiEui64=90-B3-D5-1F-30-00-00-02,ou=Organisations,o=SMKI",
        "ou=Other,o=SMKI", "smkiSerial=05,ou=Other,o=SMKI"]
    public = [e.dn for e in await entries(d, Node("suffix"), 2, Plan(), False, SUFFIX)]
    assert public == ["o=SMKI", "ou=CAs,o=SMKI", "smkiKeyId=0A0A0A0A0A0A0A0A,ou=CAs,o=SMKI",
                      "ou=Devices,o=SMKI", "ou=Organisations,o=SMKI", "ou=Other,o=SMKI"]
    # one level below a unit, subordinates only, an objectClass the walk can skip by
    units = await entries(d, Node("suffix"), 1, Plan(), True, SUFFIX)
    assert [e.dn for e in units] == ["ou=CAs,o=SMKI", "ou=Devices,o=SMKI",
                                     "ou=Organisations,o=SMKI", "ou=Other,o=SMKI"]
    assert [e.attrs["hassubordinates"] for e in units] == [[b"TRUE"]] * 4
    subjects = await entries(d, Node("ou", "devices"), 1, Plan(), True, "ou=Devices,o=SMKI")
    assert [e.dn for e in subjects] == [DEVICE_DN]
    only_certs = Plan(classes=frozenset({"smkicertificate"}))
    assert [e.dn for e in await entries(d, Node("ou", "devices"), 3, only_certs, True,
                                        "ou=Devices,o=SMKI")] == [
        f"smkiSerial=02,{DEVICE_DN}", f"smkiSerial=03,{DEVICE_DN}"]


async def test_walks_cross_the_read_models_pages() -> None:
    many = [cert(10 + i, "device", eui=(i // 2).to_bytes(8, "big")) for i in range(2 * PAGE_ROWS + 3)]
    d = directory([cert(1, "root", key=ROOT_KEY), *many])
    found = await entries(d, Node("ou", "devices"), 2, Plan(), True, "ou=Devices,o=SMKI")
    subjects = [e for e in found if "smkisubjectentry" in {v.decode().lower()
                                                          for v in e.attrs["objectclass"]}]
    assert len(found) == 1 + len(many) + PAGE_ROWS + 2 and len(subjects) == PAGE_ROWS + 2
    assert len({e.dn for e in found}) == len(found)
    one_level = await entries(d, Node("ou", "devices"), 1, Plan(), True, "ou=Devices,o=SMKI")
    assert [e.dn for e in one_level] == [e.dn for e in subjects]


async def test_indexed_lookups_keep_to_the_scope_and_the_read_rule() -> None:
    d = directory()
    by_eui = Plan(eui="00-DB-12-34-56-78-90-A4", eui_bytes=DEVICE_EUI)
    assert [e.dn for e in await entries(d, Node("suffix"), 2, by_eui, True, SUFFIX)] == [
        DEVICE_DN, f"smkiSerial=02,{DEVICE_DN}", f"smkiSerial=03,{DEVICE_DN}"]
    assert await entries(d, Node("suffix"), 2, by_eui, False, SUFFIX) == []
    assert await entries(d, Node("ou", "organisations"), 2, by_eui, True,
                         "ou=Organisations,o=SMKI") == []
    # by serial: the CA's entry for everyone, a device's only for a reader who may read it
    assert [e.dn for e in await entries(d, Node("suffix"), 2, Plan(serial="01"), False,
                                        SUFFIX)] == ["smkiKeyId=0A0A0A0A0A0A0A0A,ou=CAs,o=SMKI"]
    assert await entries(d, Node("suffix"), 2, Plan(serial="02"), False, SUFFIX) == []
    assert [e.dn for e in await entries(d, Node("suffix"), 2, Plan(serial="02"), True,
                                        SUFFIX)] == [f"smkiSerial=02,{DEVICE_DN}"]
    sha = (5).to_bytes(32, "big")
    assert [e.dn for e in await entries(d, Node("suffix"), 2, Plan(sha256=sha), True,
                                        SUFFIX)] == ["smkiSerial=05,ou=Other,o=SMKI"]


async def test_ca_entries_hold_the_read_models_crl_itself() -> None:
    d = directory()
    (ca,) = (await d.ca_entries()).values()
    assert ca.attrs["authorityrevocationlist"][0] is CRL.der  # the one cached copy
    assert ca.attrs["smkicrlnumber"] == [b"3"] and ca.attrs["cacertificate"] == [CERTS[0].der]
    assert await d.ca_entries() is await d.ca_entries()  # built once per replica version
