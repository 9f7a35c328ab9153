"""Differential test: our LDAP server against OpenLDAP's slapd holding the same directory.

The whole test PKI is lodged through the real mutual-TLS API; `smki-repository export-ldif`
and `export-ldap-schema` (run as the operator would, in a subprocess) produce what a private
slapd (its own config, mdb database, pid file and loopback port) loads with `slapadd -q`.
Then every search below is sent by OpenLDAP's own `ldapsearch` to both servers, anonymously
(``ldap.open_reads = true``), and the answers must agree: the same result code, the same set
of entries (DNs compared case-insensitively; order is not defined by RFC 4511), and for each
entry the same requested user attributes with the same values (binary values as bytes).
What is implementation-specific is left out, with the reason beside it: slapd's own
operational attributes, approximate matching beyond equal values (slapd's is phonetic),
our identifier attributes' lenient spellings (an extension of caseIgnoreMatch), the root DSE
and subschema entry.

slapd is Debian's (packages slapd and ldap-utils, installed by .ci/run). Without it the
test fails in CI (CI set) and is skipped elsewhere.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from cryptography import x509

from repository_server.store.embedded import EmbeddedPostgres

from .conftest import Running, cli_env, create_database, run_process, running_repository, smki_cli
from .ldaptools import LDAPSEARCH, SLAPADD, SLAPD, SUFFIX, Answer, Slapd, ldapsearch, parse_ldif

if not (SLAPD.exists() and SLAPADD.exists() and shutil.which(LDAPSEARCH)) and not os.environ.get("CI"):
    pytest.skip("OpenLDAP slapd is not installed (apt-get install slapd ldap-utils); "
                "CI installs it and runs this test", allow_module_level=True)


@dataclass
class Pair:
    ours: Running
    slapd: Slapd
    facts: dict[str, str]


async def cli(*args: str) -> str:
    code, out, err = await run_process(*smki_cli(), *args, timeout=300, env=cli_env())
    assert code == 0, err.decode()
    return out.decode()


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def pair(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Any],
               embedded: EmbeddedPostgres) -> AsyncIterator[Pair]:
    dsn = await create_database(embedded)
    work = tmp_path_factory.mktemp("ldap-slapd")
    slapd: Slapd | None = None
    async with running_repository(work / "data", pki, dsn, lodge=True,
                                  ldap={"open_reads": True, "suffix": SUFFIX}) as ours:
        try:
            conf = work / "export.toml"
            conf.write_text(f'data_dir = "{work / "data"}"\n[database]\nurl = "{dsn}"\n'
                            f'[ldap]\nsuffix = "{SUFFIX}"\n')
            ldif, schema = work / "smki.ldif", work / "smki.schema"
            await cli("export-ldif", "--config", str(conf), "--out", str(ldif))
            await cli("export-ldap-schema", "--out", str(schema))
            slapd = await asyncio.to_thread(Slapd, work / "slapd", schema, ldif, SUFFIX)
            yield Pair(ours, slapd, facts(ldif.read_bytes()))
        finally:
            if slapd is not None:
                await asyncio.to_thread(slapd.stop)


def facts(ldif: bytes) -> dict[str, str]:
    """Names and values the searches below use, read from the exported directory."""
    entries = parse_ldif(ldif)

    def first(pred: Any) -> tuple[str, dict[str, list[bytes]]]:
        return next((dn, e) for dn, e in sorted(entries.items()) if pred(dn, e))

    def text(e: dict[str, list[bytes]], name: str) -> str:
        return e[name][0].decode()

    cert_dn, cert = first(lambda dn, e: ",ou=Devices," in dn and b"DS" in e.get("smkiKeyUsage", []))
    device = text(cert, "smkiEui64")
    x = x509.load_der_x509_certificate(cert["userCertificate;binary"][0])
    org_dn, org = first(lambda dn, e: ",ou=Organisations," in dn and "smkiRole" in e)
    ca_dn, ca = first(lambda dn, e: "certificateRevocationList;binary" in e)
    sub_ca = x509.load_der_x509_certificate(ca["cACertificate;binary"][0])
    return {
        "suffix": SUFFIX,
        "device": device,
        "device_dn": f"smkiEui64={device},ou=Devices,{SUFFIX}",
        "cert_dn": cert_dn,
        "serial": text(cert, "smkiSerial"),
        "serial_lower": text(cert, "smkiSerial").lower(),
        "serial_dec": str(x.serial_number),
        "serial_hex": f"{x.serial_number:X}",
        "issuer": x.issuer.rfc4514_string(),
        "issuer_lower": x.issuer.rfc4514_string().lower(),
        "eui_prefix": device[:10],
        "notafter": text(org, "smkiNotAfter"),
        "org_dn": org_dn,
        "org_eui": text(org, "smkiEui64"),
        "sha_head": text(cert, "smkiSha256")[:6],
        "ca_dn": ca_dn,
        "ca_serial_dec": str(sub_ca.serial_number),
        "ca_issuer": sub_ca.issuer.rfc4514_string(),
    }


def norm_dn(text: str) -> str:
    """DNs compared case-insensitively, ignoring spaces around separators."""
    return ",".join("=".join(p.strip() for p in rdn.split("=", 1)) for rdn in text.split(",")).lower()


def comparable(answer: Answer) -> dict[str, dict[str, list[bytes]]]:
    return {norm_dn(dn): {name.lower(): sorted(values) for name, values in attrs.items()}
            for dn, attrs in answer.entries.items()}



@dataclass(frozen=True)
class Search:
    base: str  # templates over facts(): "{cert_dn}", …
    scope: str  # base, one, sub
    filter: str
    attrs: tuple[str, ...] = ()
    size_limit: int = 0
    types_only: bool = False


ANY = "(objectClass=*)"
# RFC 4523 certificateExactMatch in GSER, as ldapsearch users write it (":=" is replaced below)
CERT = "(userCertificate:={ serialNumber {serial_dec}, issuer rdnSequence:\"{issuer}\" })"
SEARCHES: dict[str, Search] = {
    # --- scopes from every kind of base; no attributes named: every user attribute
    "suffix-base": Search("{suffix}", "base", ANY),
    "suffix-one": Search("{suffix}", "one", ANY),
    "suffix-sub": Search("{suffix}", "sub", ANY),
    "cas-base": Search("ou=CAs,{suffix}", "base", ANY),
    "cas-one": Search("ou=CAs,{suffix}", "one", ANY),
    "cas-sub": Search("ou=CAs,{suffix}", "sub", ANY),
    "devices-base": Search("ou=Devices,{suffix}", "base", ANY),
    "devices-one": Search("ou=Devices,{suffix}", "one", ANY),
    "devices-sub": Search("ou=Devices,{suffix}", "sub", ANY),
    "organisations-one": Search("ou=Organisations,{suffix}", "one", ANY),
    "other-sub": Search("ou=Other,{suffix}", "sub", ANY),
    "device-base": Search("{device_dn}", "base", ANY),
    "device-one": Search("{device_dn}", "one", ANY),
    "device-sub": Search("{device_dn}", "sub", ANY),
    "cert-base": Search("{cert_dn}", "base", ANY),
    "cert-one": Search("{cert_dn}", "one", ANY),
    "cert-sub": Search("{cert_dn}", "sub", ANY),
    "ca-base": Search("{ca_dn}", "base", ANY),
    "ca-one": Search("{ca_dn}", "one", ANY),
    "ca-sub": Search("{ca_dn}", "sub", ANY),
    "base-other-spelling": Search("SMKIEUI64={device}, OU=devices, O=smki", "base", ANY),
    # --- no such base: noSuchObject, and the matched DN (RFC 4511 §4.1.9)
    "missing-device": Search("smkiEui64=FF-FF-FF-FF-FF-FF-FF-FF,ou=Devices,{suffix}", "sub", ANY),
    "missing-unit": Search("ou=Nowhere,{suffix}", "base", ANY),
    "missing-cert": Search("smkiSerial=0ABC,{device_dn}", "base", ANY),
    # --- equality
    "eq-objectclass": Search("{suffix}", "sub", "(objectClass=pkiCA)", ("1.1",)),
    "eq-objectclass-oid": Search("{suffix}", "sub", "(objectClass=2.5.6.21)", ("smkiSerial",)),
    "eq-objectclass-case": Search("{suffix}", "sub", "(objectclass=SMKISUBJECTENTRY)", ("1.1",)),
    "eq-eui64": Search("{suffix}", "sub", "(smkiEui64={device})", ("smkiKind",)),
    "eq-serial": Search("{suffix}", "sub", "(smkiSerial={serial})"),
    "eq-serial-lower": Search("{suffix}", "sub", "(smkiSerial={serial_lower})", ("smkiSerial",)),
    "eq-keyusage-case": Search("ou=Organisations,{suffix}", "sub", "(smkiKeyUsage=ka)", ("1.1",)),
    "eq-role": Search("{suffix}", "sub", "(smkiRole=2)", ("smkiRole", "smkiEui64")),
    "eq-boolean": Search("ou=Organisations,{suffix}", "sub", "(smkiManufacturingFlag=FALSE)", ("1.1",)),
    "eq-time": Search("{suffix}", "sub", "(smkiNotAfter={notafter})", ("smkiNotAfter",)),
    "eq-status": Search("{suffix}", "sub", "(smkiStatus=R)", ("smkiStatus", "smkiSerial")),
    "eq-cn": Search("ou=CAs,{suffix}", "one", "(cn=t1)", ("cn",)),
    # --- and / or / not, absolute true and false (RFC 4526)
    "and": Search("{suffix}", "sub",
                  "(&(objectClass=smkiCertificate)(smkiKeyUsage=DS)(smkiKind=organisation))", ("1.1",)),
    "or": Search("{suffix}", "sub", "(|(smkiRole=1)(smkiRole=127)(cn=T1))", ("smkiRole", "cn")),
    "not": Search("{suffix}", "sub", "(&(objectClass=smkiCertificate)(!(smkiStatus=I)))", ("smkiStatus",)),
    "nested": Search("{suffix}", "sub",
                     "(|(&(smkiKind=device)(!(smkiKeyUsage=KA))(smkiEui64={eui_prefix}*))"
                     "(&(objectClass=pkiCA)(|(cn=TA)(cn=TD))))", ("1.1",)),
    "absolute-true": Search("ou=CAs,{suffix}", "one", "(&)", ("cn",)),
    "absolute-false": Search("{suffix}", "sub", "(|)"),
    # --- substrings
    "substr-initial": Search("{suffix}", "sub", "(smkiEui64={eui_prefix}*)", ("smkiEui64",)),
    "substr-any": Search("{suffix}", "sub", "(smkiSubject=*testsupp*)", ("smkiSubject",)),
    "substr-final": Search("ou=CAs,{suffix}", "sub", "(cn=*1)", ("cn",)),
    "substr-all": Search("{suffix}", "sub", "(smkiSha256={sha_head}*0*0*)", ("smkiSha256",)),
    "substr-issuer": Search("{suffix}", "sub", "(smkiIssuer=CN=T*,OU=0*)", ("smkiIssuer",)),
    # --- ordering
    "ge-role": Search("{suffix}", "sub", "(smkiRole>=100)", ("smkiRole",)),
    "le-role": Search("{suffix}", "sub", "(smkiRole<=3)", ("smkiRole",)),
    "le-notafter": Search("{suffix}", "sub", "(smkiNotAfter<=20400101000000Z)", ("smkiNotAfter",)),
    "ge-notafter": Search("{suffix}", "sub", "(smkiNotAfter>=20400101000000Z)", ("1.1",)),
    "ge-notbefore-offset": Search("{suffix}", "sub", "(smkiNotBefore>=197001010100+0100)", ("1.1",)),
    "ge-cn": Search("ou=CAs,{suffix}", "one", "(cn>=TD)", ("cn",)),  # cn has no ORDERING (RFC 4519)
    "ge-eui64": Search("{suffix}", "sub", "(smkiEui64>=90-b3-d5-1f-30-7)", ("1.1",)),
    # --- presence
    "present-usercert": Search("ou=Organisations,{suffix}", "sub", "(userCertificate=*)", ("1.1",)),
    "present-crl": Search("{suffix}", "sub", "(certificateRevocationList=*)",
                          ("certificateRevocationList;binary",)),
    "present-arl": Search("{suffix}", "sub", "(authorityRevocationList=*)",
                          ("authorityRevocationList;binary", "cn")),
    "present-role": Search("{suffix}", "sub", "(smkiRole=*)", ("1.1",)),
    # --- approximate: only equal values (slapd's approximate rule is phonetic: "TA" ~ "TE")
    "approx-kind": Search("{suffix}", "sub", "(smkiKind~=device)", ("1.1",)),
    "approx-role": Search("{suffix}", "sub", "(smkiRole~=8)", ("smkiRole",)),
    # --- extensible match (RFC 4511 §4.5.1.7.7)
    "ext-caseexact": Search("{suffix}", "sub", "(smkiKeyUsage:caseExactMatch:=KA)", ("smkiKeyUsage",)),
    "ext-caseexact-miss": Search("{suffix}", "sub", "(smkiKeyUsage:caseExactMatch:=ka)"),
    "ext-oid": Search("{suffix}", "sub", "(smkiKeyUsage:2.5.13.5:=DS)", ("1.1",)),
    "ext-dn": Search("{suffix}", "sub", "(ou:dn:=Devices)", ("1.1",)),
    "ext-dn-rule": Search("{suffix}", "sub", "(:dn:caseIgnoreMatch:=organisations)", ("1.1",)),
    "ext-dn-eui": Search("{suffix}", "sub", "(smkiEui64:dn:={org_eui})", ("1.1",)),
    "cert-exact-rule": Search("{suffix}", "sub", CERT.replace(":=", ":certificateExactMatch:="),
                              ("smkiSerial",)),
    "cert-exact-hex": Search("{suffix}", "sub", "(userCertificate:certificateExactMatch:={ serialNumber"
                             " '{serial_hex}'H, issuer rdnSequence:\"{issuer_lower}\" })", ("1.1",)),
    "cert-equality": Search("{suffix}", "sub", CERT.replace(":=", "="), ("userCertificate;binary",)),
    "cert-equality-ca": Search("{suffix}", "sub", "(cACertificate={ serialNumber {ca_serial_dec}, "
                               "issuer rdnSequence:\"{ca_issuer}\" })", ("1.1",)),
    "cert-equality-miss": Search("{suffix}", "sub",
                                 CERT.replace(":=", "=").replace("{issuer}", "{ca_issuer}"), ("1.1",)),
    # --- Undefined (RFC 4511 §4.5.1.7): unknown types and values invalid for the rule
    "undefined-type": Search("{suffix}", "sub", "(noSuchAttribute=x)"),
    "undefined-not": Search("{suffix}", "sub", "(!(noSuchAttribute=x))"),
    # present on an unknown type is FALSE (RFC 4511 §4.5.1.7.5), so its negation is TRUE; slapd
    # makes it Undefined and returns nothing for (!(noSuchAttribute=*)): that case is left out
    "unknown-present": Search("ou=CAs,{suffix}", "sub", "(noSuchAttribute=*)", ("1.1",)),
    "invalid-integer": Search("{suffix}", "sub", "(smkiRole=abc)"),
    "invalid-integer-not": Search("{suffix}", "sub", "(!(smkiRole=abc))"),
    "or-undefined-true": Search("ou=CAs,{suffix}", "one", "(|(smkiRole=abc)(cn=TA))", ("cn",)),
    # --- attribute selections
    "attrs-star": Search("{ca_dn}", "base", ANY, ("*",)),
    "attrs-none-sub": Search("{device_dn}", "sub", ANY, ()),
    "attrs-1.1": Search("{suffix}", "sub", ANY, ("1.1",)),
    "attrs-usercert-binary": Search("{device_dn}", "sub", ANY, ("userCertificate;binary",)),
    "attrs-usercert-plain": Search("{device_dn}", "one", ANY, ("userCertificate", "smkiSerial")),
    "attrs-ca-binary": Search("ou=CAs,{suffix}", "one", ANY, (
        "cACertificate;binary", "certificateRevocationList;binary", "authorityRevocationList;binary")),
    "attrs-mixed-case": Search("{cert_dn}", "base", ANY, ("SMKISERIAL", "smkikeyusage", "cn")),
    "attrs-unknown": Search("{cert_dn}", "base", ANY, ("noSuchAttribute", "smkiKind")),
    # operational attributes both define the same way (hasSubordinates of the empty ou=Other too)
    "attrs-star-operational": Search("{device_dn}", "sub", ANY, (
        "*", "structuralObjectClass", "entryDN", "subschemaSubentry", "hasSubordinates")),
    "attrs-units-hassubordinates": Search("{suffix}", "one", ANY, ("hasSubordinates", "ou")),
    "types-only": Search("{cert_dn}", "base", ANY, (), types_only=True),
    "types-only-named": Search("{ca_dn}", "sub", ANY, ("cACertificate;binary", "cn"), types_only=True),
    # --- size limits: sizeLimitExceeded with exactly that many entries (which ones is not defined)
    "size-suffix": Search("{suffix}", "sub", ANY, ("1.1",), size_limit=3),
    "size-one": Search("ou=Devices,{suffix}", "one", ANY, size_limit=1),
    "size-filtered": Search("{suffix}", "sub", "(smkiKeyUsage=KA)", ("smkiSerial",), size_limit=5),
    "size-exact": Search("{device_dn}", "sub", ANY, ("1.1",), size_limit=3),  # 3 match: success
}


def expand(text: str, facts: dict[str, str]) -> str:
    for key, value in facts.items():
        text = text.replace("{" + key + "}", value)
    return text


@pytest.mark.parametrize("name", list(SEARCHES))
async def test_search_agrees_with_slapd(pair: Pair, name: str) -> None:
    s = SEARCHES[name]
    base, flt = expand(s.base, pair.facts), expand(s.filter, pair.facts)
    ours, theirs = await asyncio.gather(*(
        ldapsearch(url, base, s.scope, flt, list(s.attrs), size_limit=s.size_limit, types_only=s.types_only)
        for url in (pair.ours.ldap, pair.slapd.url)))
    what = f"{name}: -b {base!r} -s {s.scope} {flt!r} {list(s.attrs)}"
    # the same search again: now answered from our response cache where it is cacheable
    again = await ldapsearch(pair.ours.ldap, base, s.scope, flt, list(s.attrs), size_limit=s.size_limit,
                             types_only=s.types_only)
    assert (again.code, comparable(again)) == (ours.code, comparable(ours)), f"{what}: repeated"
    assert ours.code == theirs.code, f"{what}: result {ours.code} vs slapd {theirs.code}\n" \
        f"ours: {ours.stderr}\nslapd: {theirs.stderr}"
    if ours.code == 4:  # sizeLimitExceeded
        assert len(ours.entries) == len(theirs.entries) == s.size_limit, what
        return
    if ours.code == 32:
        assert norm_dn(ours.matched or "") == norm_dn(theirs.matched or ""), what
    mine, slapds = comparable(ours), comparable(theirs)
    assert sorted(mine) == sorted(slapds), f"{what}: entries differ"
    for dn, attrs in slapds.items():
        assert mine[dn] == attrs, f"{what}: {dn}: attributes differ"
    if s.size_limit:
        assert ours.code == 0 and len(mine) == s.size_limit, what


async def test_paged_search_agrees_with_slapd(pair: Pair) -> None:
    """Simple paged results (RFC 2696), pages of 7: the union of the pages is the same."""
    for base, flt in ((SUFFIX, ANY), (f"ou=Organisations,{SUFFIX}", "(smkiKeyUsage=KA)")):
        ours, theirs = await asyncio.gather(*(
            ldapsearch(url, base, "sub", flt, ["smkiSerial", "objectClass"], extra=["-E", "pr=7/noprompt"])
            for url in (pair.ours.ldap, pair.slapd.url)))
        assert ours.code == theirs.code == 0, (ours.stderr, theirs.stderr)
        assert len(ours.entries) > 7
        assert comparable(ours) == comparable(theirs)
