"""Search planning, piece by piece (pure functions: a filter in, a plan out), and the
directory's scope and objectClass pruning. Fast: no server, no store."""

from __future__ import annotations

import pytest

from repository_server.listeners.ldap import dn
from repository_server.listeners.ldap import protocol as c
from repository_server.listeners.ldap.directory import unit_in_reach, wanted, with_base
from repository_server.listeners.ldap.filters import Plan, asserted, conjuncts, constraint, plan

EUI = "00-DB-12-34-56-78-90-A4"
SHA = "ab" * 32
SUFFIX = dn.parse_normalised("o=SMKI")


def eq(attribute: str, value: str) -> c.EqualityMatch:
    return c.EqualityMatch(attribute, value.encode())


def test_conjuncts_flatten_nested_ands_and_keep_anything_else_whole() -> None:
    a, b, d = eq("smkiKind", "device"), eq("smkiSerial", "01"), c.Present("cn")
    either = c.Or((a, b))
    assert list(conjuncts(c.And((a, c.And((b, c.And((d,)))))))) == [a, b, d]
    assert list(conjuncts(either)) == [either]
    assert list(conjuncts(c.Not(a))) == [c.Not(a)]


def test_asserted_reads_equalities_and_plain_extensible_matches() -> None:
    assert asserted(eq("smkiEui64", EUI)) == ("smkiEui64", EUI.encode())
    assert asserted(c.ExtensibleMatch(None, "smkiSerial", b"01")) == ("smkiSerial", b"01")
    exact = c.ExtensibleMatch("certificateExactMatch", "userCertificate", b"1$CN=x")
    assert asserted(exact) == ("userCertificate", b"1$CN=x")
    # :dn:, another rule, no type, or no equality at all: nothing an index serves
    assert asserted(c.ExtensibleMatch(None, "smkiSerial", b"01", dn_attributes=True)) is None
    assert asserted(c.ExtensibleMatch("caseIgnoreMatch", "smkiSerial", b"01")) is None
    assert asserted(c.ExtensibleMatch("caseIgnoreMatch", None, b"01")) is None
    assert asserted(c.Present("smkiSerial")) is None
    assert asserted(c.Substrings("smkiSerial", b"01", (), None)) is None
    assert asserted(c.GreaterOrEqual("smkiSerial", b"01")) is None


@pytest.mark.parametrize(("attribute", "value", "told"), [
    ("smkiEui64", EUI, ("eui", bytes.fromhex("00DB1234567890A4"))),
    ("SMKIEUI64", "00db1234567890a4", ("eui", bytes.fromhex("00DB1234567890A4"))),
    ("smkiSerial", "13e6e340", ("serial", "13E6E340")),
    ("smkiKeyId", "0102030405060708", ("key_id", bytes.fromhex("0102030405060708"))),
    ("smkiSubjectKeyId", "01:02:03:04:05:06:07:08", ("key_id", bytes.fromhex("0102030405060708"))),
    ("smkiSha256", SHA, ("sha256", bytes.fromhex(SHA))),
    ("objectClass", "smkiCertificate", ("classes", "smkicertificate")),
    ("userCertificate", '{ serialNumber 255, issuer rdnSequence:"CN=Z1" }', ("serial", "FF")),
])
def test_constraint_of_each_indexed_attribute(attribute: str, value: str,
                                              told: tuple[str, object]) -> None:
    assert constraint(attribute, value.encode()) == told


@pytest.mark.parametrize(("attribute", "value"), [
    ("smkiEui64", "00-DB-12"),  # not 8 octets
    ("smkiSha256", "abcd"),  # not 32 octets
    ("smkiSerial", "not hex"),
    ("smkiKind", "device"),  # not indexed
    ("smkiEui64;x-tag", EUI),  # a tagged description holds no value here
    ("name", "x"),  # a supertype: its subtypes' values count too
    ("noSuchAttribute", "x"),
    ("userCertificate", "not an assertion"),
])
def test_constraint_of_what_tells_nothing(attribute: str, value: str) -> None:
    assert constraint(attribute, value.encode()) is None


def test_plan_of_the_commonest_search() -> None:
    got = plan(c.And((eq("smkiEui64", EUI), eq("smkiKeyUsage", "KA"))))
    assert got == Plan(eui=EUI, eui_bytes=bytes.fromhex("00DB1234567890A4"))
    assert got.indexed and got.index == "eui"


def test_plan_accumulates_classes_and_the_last_equality_of_a_kind_wins() -> None:
    got = plan(c.And((eq("objectClass", "pkiUser"), eq("smkiSerial", "01"),
                      c.And((eq("objectClass", "smkiCertificate"), eq("smkiSerial", "02"))))))
    assert got == Plan(serial="02", classes=frozenset({"pkiuser", "smkicertificate"}))
    assert got.index == "serial"


def test_plan_ignores_what_is_not_in_every_match() -> None:
    assert plan(c.Or((eq("smkiSerial", "01"), eq("smkiSerial", "02")))) == Plan()
    assert plan(c.Not(eq("smkiEui64", EUI))) == Plan()
    assert plan(c.Present("objectClass")) == Plan()
    assert not Plan().indexed and Plan().index is None


def test_the_index_a_plan_reads_through_in_order_of_preference() -> None:
    key = bytes(8)
    sha = bytes(32)
    assert Plan(eui=EUI, serial="01", key_id=key, sha256=sha).index == "eui"
    assert Plan(serial="01", key_id=key, sha256=sha).index == "sha256"
    assert Plan(serial="01", key_id=key).index == "serial"
    assert Plan(key_id=key).index == "key_id"
    assert Plan(classes=frozenset({"top"})).index is None


def test_which_kinds_of_entry_an_objectclass_plan_keeps() -> None:
    everything = wanted(None)
    assert all(everything(kind) for kind in ("suffix", "ou", "ca", "subject", "cert"))
    certs = wanted(frozenset({"smkicertificate"}))
    assert certs("cert") and not certs("subject") and not certs("ca") and not certs("ou")
    tops = wanted(frozenset({"top"}))
    assert all(tops(kind) for kind in ("suffix", "ou", "ca", "subject", "cert"))
    assert not wanted(frozenset({"nosuchclass"}))("cert")


def test_scopes_and_the_units_a_base_reaches() -> None:
    assert [with_base(scope) for scope in range(4)] == [True, False, True, False]
    devices = dn.parse_normalised("ou=Devices,o=SMKI")
    below = dn.parse_normalised(f"smkiEui64={EUI},ou=Devices,o=SMKI")
    assert unit_in_reach("devices", SUFFIX, SUFFIX)
    assert unit_in_reach("devices", devices, SUFFIX) and unit_in_reach("devices", below, SUFFIX)
    assert not unit_in_reach("organisations", devices, SUFFIX)
    assert not unit_in_reach("organisations", below, SUFFIX)
