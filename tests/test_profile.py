"""Tests of the certificate and CRL parsers (`repository_server.pki`): real DCC test
certificates (../shared/realdata), synthetic GB-profile certificates and CRLs built with
`cryptography`, malformed input and a hypothesis fuzz that only `ParseError` ever escapes."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repository_server.pki.certificates import parse_certificate
from repository_server.pki.crls import parse_crl
from repository_server.pki.errors import ParseError
from repository_server.pki.model import CertInfo, CertKind, Usage
from repository_server.pki.pem import load_pem_or_der_certificates, load_pem_or_der_crl
from repository_server.pki.signatures import verify_crl_signature, verify_signature

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
Z1_FILE = "duis-templates/Certificate.71872BDBC82789BC1401CE01BA06ADA3.der"
UTC = dt.UTC

# --------------------------------------------------------------------------- real data


@dataclass(frozen=True)
class Row:
    file: str
    fields: dict[str, str]
    der: bytes
    info: CertInfo


def _inventory() -> list[dict[str, str]]:
    with (REALDATA / "inventory.tsv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


_REAL_CACHE: list[Row] = []


@pytest.fixture(scope="module")
def real() -> list[Row]:
    if not (REALDATA / "inventory.tsv").is_file():
        pytest.skip(f"real DCC test certificates not found at {REALDATA}")
    if not _REAL_CACHE:
        for fields in _inventory():
            blobs = load_pem_or_der_certificates((REALDATA / fields["file"]).read_bytes())
            assert len(blobs) == 1, fields["file"]
            _REAL_CACHE.append(Row(fields["file"], fields, blobs[0], parse_certificate(blobs[0])))
    return _REAL_CACHE


def _real_file(name: str) -> bytes:
    path = REALDATA / name
    if not path.is_file():
        pytest.skip(f"real DCC test certificate not found: {path}")
    return load_pem_or_der_certificates(path.read_bytes())[0]


def test_every_real_certificate_file_is_in_inventory_and_parses() -> None:
    if not REALDATA.is_dir():
        pytest.skip(f"real DCC test certificates not found at {REALDATA}")
    files = sorted(
        p.relative_to(REALDATA).as_posix()
        for p in REALDATA.rglob("*")
        if p.suffix in (".pem", ".der") and p.is_file()
    )
    assert len(files) >= 500
    listed = {row["file"] for row in _inventory()}
    assert set(files) == listed
    for name in files:
        for der in load_pem_or_der_certificates((REALDATA / name).read_bytes()):
            info = parse_certificate(der)
            assert info.der == der
            assert info.sha256 == hashlib.sha256(der).digest()
            assert info.sha1 == hashlib.sha1(der).digest()
            assert info.not_before.tzinfo is not None and info.not_after.tzinfo is not None
            assert all(f.code and "\n" not in f.message for f in info.findings)


_KINDS = {
    "CA": {CertKind.ROOT, CertKind.CA},
    "organisation": {CertKind.ORGANISATION},
    "device": {CertKind.DEVICE},
    "non-SMKI(WebPKI)": {CertKind.OTHER},
}
_USAGES = {
    "digital_signature": Usage.DS,
    "key_agreement": Usage.KA,
    "key_cert_sign crl_sign": Usage.CA,
}


def _expected_eui(fields: dict[str, str]) -> bytes | None:
    san = fields["san_hwModuleName"]
    if "hwSerialNum=" in san:
        return bytes.fromhex(san.split("hwSerialNum=")[1].split()[0])
    subject = fields["subject(attr[type]=value)"]
    if "UID[BIT]=" in subject:
        value = bytes.fromhex(subject.split("UID[BIT]=")[1].split(",")[0])
        assert value[0] == 0 and len(value) == 9  # unused-bits octet, then the EUI-64
        return value[1:]
    return None


def test_real_certificates_match_inventory(real: list[Row]) -> None:
    mismatches: list[str] = []
    for row in real:
        info, fields = row.info, row.fields
        checks = {
            "serial": (info.serial, fields["serial_hex"].upper()),
            "kind": (info.kind in _KINDS[fields["kind"]], True),
            "eui64": (info.eui64, _expected_eui(fields)),
            "usage": (info.usage, _USAGES[fields["key_usage"]]),
            "ski": (info.subject_key_id, bytes.fromhex(fields["ski"]) if fields["ski"] else None),
            "policies": (
                info.policies,
                tuple(fields["policy_oids"].split(",")) if fields["policy_oids"] else (),
            ),
        }
        aki = fields["aki_der"]
        if aki.startswith("300a8008"):
            checks["aki"] = (info.issuer_key_id, bytes.fromhex(aki[8:]))
        elif not aki:
            checks["aki"] = (info.issuer_key_id, None)
        for what, (got, want) in checks.items():
            if got != want:
                mismatches.append(f"{row.file}: {what} {got!r} != {want!r}")
    assert not mismatches, "\n".join(mismatches[:20])


def test_real_kind_counts(real: list[Row]) -> None:
    distinct = {row.info.sha256: row.info for row in real}
    assert len(distinct) == 457
    counts: dict[CertKind, int] = {}
    for info in distinct.values():
        counts[info.kind] = counts.get(info.kind, 0) + 1
    assert counts == {
        CertKind.CA: 1,
        CertKind.ORGANISATION: 53,
        CertKind.DEVICE: 402,
        CertKind.OTHER: 1,
    }


def test_real_roles(real: list[Row]) -> None:
    for row in real:
        subject = row.fields["subject(attr[type]=value)"]
        if "OU[" not in subject:
            assert row.info.role is None, row.file
            continue
        ou = subject.split("OU[")[1].split("=")[1].split(",")[0]
        want = int(ou) if ou == "137" else int(ou, 16)
        assert row.info.role == want, row.file


def test_lets_encrypt_is_other_with_findings(real: list[Row]) -> None:
    rows = [r for r in real if r.fields["kind"] == "non-SMKI(WebPKI)"]
    assert len(rows) == 1
    info = rows[0].info
    assert info.kind is CertKind.OTHER
    codes = {f.code for f in info.findings}
    assert {"not-gb-profile", "sig-alg-not-ecdsa-sha256", "serial-length"} <= codes
    assert info.eui64 is None and info.role is None


def test_z1_verification_matches_inventory(real: list[Row]) -> None:
    z1 = parse_certificate(_real_file(Z1_FILE))
    assert z1.kind is CertKind.CA and z1.role == 7 and not z1.self_signed
    yes = 0
    for row in real:
        want = row.fields["verifies_under_Z1_CA"] == "yes"
        assert verify_signature(row.info, z1.public_key_der) is want, row.file
        assert verify_signature(row.der, z1.public_key_der) is want, row.file
        yes += want
    assert yes > 40


def test_dcc_boxed_device_certificates_verify_under_acb_key(real: list[Row]) -> None:
    acb = parse_certificate(
        _real_file(
            "dccboxed-keystore/keystore.json-extracted/"
            "Z1-accessControlBroker-ds.587FE59553E2675B0C0E2A5C402A9F61.pem"
        )
    )
    devices = [r.info for r in real if r.info.eui64 == bytes.fromhex("88738457002F966C")]
    assert devices
    for info in devices:
        assert info.kind is CertKind.DEVICE
        assert info.issuer_dn == acb.subject_dn
        assert verify_signature(info, acb.public_key_der)
        assert "ski-missing" in {f.code for f in info.findings}


def test_names_are_byte_exact_slices(real: list[Row]) -> None:
    printable = 0
    for row in real:
        info = row.info
        assert info.issuer_dn in row.der and info.issuer_dn[0] == 0x30
        assert info.subject_dn in row.der and info.subject_dn[0] == 0x30
        assert info.public_key_der in row.der
        if "[PS]" in row.fields["issuer(attr[type]=value)"]:
            printable += 1
            for attr in row.fields["issuer(attr[type]=value)"].split(","):
                if "[PS]=" in attr:  # kept as PrintableString, not re-encoded as UTF8String
                    value = attr.split("=", 1)[1].encode()
                    assert b"\x13" + bytes([len(value)]) + value in info.issuer_dn, row.file
        if row.fields["subject(attr[type]=value)"] == "(empty)":
            assert info.subject_dn == b"\x30\x00"
    assert printable > 50
    z1 = parse_certificate(_real_file(Z1_FILE))
    by_z1 = [r.info for r in real if r.fields["verifies_under_Z1_CA"] == "yes"]
    assert all(info.issuer_dn == z1.subject_dn for info in by_z1)


def test_real_ou_137_gets_decimal_role_and_finding(real: list[Row]) -> None:
    rows = [r for r in real if "OU[UTF8]=137" in r.fields["subject(attr[type]=value)"]]
    assert rows
    for row in rows:
        assert row.info.role == 137
        assert row.info.kind is CertKind.ORGANISATION
        assert "ou-decimal-role" in {f.code for f in row.info.findings}


def test_real_explicit_null_sig_params(real: list[Row]) -> None:
    rows = [r for r in real if r.fields["sig_params"] == "NULL" and "ecdsa" in r.fields["sig_alg"]]
    assert rows
    for row in rows:
        assert "sig-alg-explicit-null" in {f.code for f in row.info.findings}
        assert bytes.fromhex("300c06082a8648ce3d0403020500") in row.der
        assert row.info.kind is CertKind.ORGANISATION
    clean = [r for r in real if r.fields["sig_params"] == "-"]
    assert all("sig-alg-explicit-null" not in {f.code for f in r.info.findings} for r in clean)


def test_real_device_certificates_are_profile_clean(real: list[Row]) -> None:
    rtds = [
        r
        for r in real
        if r.info.kind is CertKind.DEVICE and "CN[PS]=E357" in r.fields["issuer(attr[type]=value)"]
    ]
    assert len(rtds) >= 400
    for row in rtds:
        assert row.info.findings == (), (row.file, row.info.findings)
        assert row.info.not_after == dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


# --------------------------------------------------------------------------- synthetic PKI

HW_TYPE = bytes.fromhex("060a2a863a008a5c01010201")  # 1.2.826.0.1372.1.1.2.1
GB_POLICY = x509.ObjectIdentifier("1.2.826.0.1.8641679.1.2.1.4")


def _serial(n: int) -> int:
    return (0x40 << 120) | n  # 16 octets, top bit clear


def _name(ou: str | None = None, cn: str | None = None, uid: bytes | None = None) -> x509.Name:
    attrs: list[x509.NameAttribute[str] | x509.NameAttribute[bytes]] = []
    if cn is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    if ou is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    if uid is not None:
        attrs.append(
            x509.NameAttribute(
                NameOID.X500_UNIQUE_IDENTIFIER, b"\x00" + uid, _type=_ASN1Type.BitString
            )
        )
    return x509.Name(attrs)


def _key_id(key: ec.EllipticCurvePrivateKey) -> bytes:
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return hashlib.sha1(point).digest()[-8:]


@dataclass
class Issued:
    key: ec.EllipticCurvePrivateKey
    der: bytes
    name: x509.Name


def _issue(
    *,
    subject: x509.Name,
    issuer: Issued | None,
    usage: str,
    serial: int,
    key: ec.EllipticCurvePrivateKey | None = None,
    eui: bytes | None = None,
    not_after: dt.datetime | None = None,
    san_critical: bool = True,
    ku_critical: bool = True,
) -> Issued:
    key = key or ec.generate_private_key(ec.SECP256R1())
    signer_key = issuer.key if issuer else key
    signer_name = issuer.name if issuer else subject
    ku = {
        "DS": dict(digital_signature=True),
        "KA": dict(key_agreement=True),
        "DSKA": dict(digital_signature=True, key_agreement=True),
        "CA": dict(key_cert_sign=True, crl_sign=True),
    }[usage]
    flags = {
        name: ku.get(name, False)
        for name in (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        )
    }
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer_name)
        .serial_number(serial)
        .public_key(key.public_key())
        .not_valid_before(dt.datetime(2024, 1, 1, tzinfo=UTC))
        .not_valid_after(not_after or dt.datetime(2034, 1, 1, tzinfo=UTC))
        .add_extension(x509.KeyUsage(**flags), critical=ku_critical)
        .add_extension(x509.SubjectKeyIdentifier(_key_id(key)), critical=False)
        .add_extension(
            x509.CertificatePolicies([x509.PolicyInformation(GB_POLICY, None)]), critical=True
        )
        .add_extension(x509.AuthorityKeyIdentifier(_key_id(signer_key), None, None), critical=False)
    )
    if usage == "CA":
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    if eui is not None and not subject:
        hw = bytes([0x30, len(HW_TYPE) + 10]) + HW_TYPE + b"\x04\x08" + eui
        san = x509.SubjectAlternativeName(
            [x509.OtherName(x509.ObjectIdentifier("1.3.6.1.5.5.7.8.4"), hw)]
        )
        builder = builder.add_extension(san, critical=san_critical)
    cert = builder.sign(signer_key, hashes.SHA256())
    return Issued(key, cert.public_bytes(serialization.Encoding.DER), subject)


@dataclass
class Pki:
    root: Issued
    ca: Issued
    org: Issued
    device: Issued


_PKI: list[Pki] = []


@pytest.fixture(scope="module")
def pki() -> Pki:
    if not _PKI:
        root = _issue(subject=_name("00", "ZA"), issuer=None, usage="CA", serial=_serial(1))
        ca = _issue(subject=_name("07", "Z1"), issuer=root, usage="CA", serial=_serial(2))
        org = _issue(
            subject=_name("87", "XMLSIGN", uid=bytes.fromhex("90B3D51F30010000")),
            issuer=ca,
            usage="DS",
            serial=_serial(3),
        )
        device = _issue(
            subject=x509.Name([]),
            issuer=ca,
            usage="KA",
            serial=_serial(4),
            eui=bytes.fromhex("00DB1234567890A4"),
            not_after=dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC),
        )
        _PKI.append(Pki(root, ca, org, device))
    return _PKI[0]


def _spki(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_synthetic_profile_certificates(pki: Pki) -> None:
    root = parse_certificate(pki.root.der)
    assert root.kind is CertKind.ROOT and root.self_signed and root.role == 0
    assert root.usage is Usage.CA and root.findings == ()
    ca = parse_certificate(pki.ca.der)
    assert ca.kind is CertKind.CA and not ca.self_signed and ca.role == 7
    assert ca.issuer_key_id == root.subject_key_id and ca.findings == ()
    org = parse_certificate(pki.org.der)
    assert org.kind is CertKind.ORGANISATION and org.role == 135 and org.usage is Usage.DS
    assert org.eui64 == bytes.fromhex("90B3D51F30010000")
    assert org.findings == ()
    assert "XMLSIGN" in org.subject_name and org.policies == (GB_POLICY.dotted_string,)
    device = parse_certificate(pki.device.der)
    assert device.kind is CertKind.DEVICE and device.usage is Usage.KA and device.role is None
    assert device.eui64 == bytes.fromhex("00DB1234567890A4") and device.subject_dn == b"0\x00"
    assert device.findings == ()
    assert device.serial == f"{_serial(4):X}" and len(device.serial) == 32
    assert device.public_key_der == _spki(pki.device.key)


def test_verify_signature_chain(pki: Pki) -> None:
    root, ca = parse_certificate(pki.root.der), parse_certificate(pki.ca.der)
    device = parse_certificate(pki.device.der)
    assert verify_signature(ca, root.public_key_der)
    assert verify_signature(device, ca.public_key_der)
    assert not verify_signature(device, root.public_key_der)
    assert not verify_signature(ca, ca.public_key_der)
    tampered = bytearray(pki.device.der)
    tampered[-5] ^= 0x01
    assert not verify_signature(bytes(tampered), ca.public_key_der)
    assert not verify_signature(device, b"not a key")
    assert not verify_signature(b"garbage", ca.public_key_der)


def test_verify_signature_rsa_pkcs1_pss_and_ed25519() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn="leaf"))
        .issuer_name(_name(cn="rsa"))
        .serial_number(_serial(9))
        .public_key(leaf.public_key())
        .not_valid_before(dt.datetime(2024, 1, 1, tzinfo=UTC))
        .not_valid_after(dt.datetime(2025, 1, 1, tzinfo=UTC))
    )
    pkcs1 = builder.sign(rsa_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
    pss = builder.sign(
        rsa_key,
        hashes.SHA384(),
        rsa_padding=padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48),
    ).public_bytes(serialization.Encoding.DER)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    ed = builder.sign(ed_key, None).public_bytes(serialization.Encoding.DER)
    ed_spki = ed_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert verify_signature(parse_certificate(pkcs1), _spki(rsa_key))
    assert verify_signature(parse_certificate(pss), _spki(rsa_key))
    assert verify_signature(parse_certificate(ed), ed_spki)
    assert not verify_signature(parse_certificate(ed), _spki(rsa_key))
    assert not verify_signature(parse_certificate(pkcs1), _spki(leaf))
    info = parse_certificate(pkcs1)
    assert info.kind is CertKind.ORGANISATION or info.kind is CertKind.OTHER
    assert "sig-alg-not-ecdsa-sha256" in {f.code for f in info.findings}


def test_device_profile_findings(pki: Pki) -> None:
    bad = _issue(
        subject=x509.Name([]),
        issuer=pki.ca,
        usage="DSKA",
        serial=7,
        eui=bytes.fromhex("00DB1234567890A5"),
        san_critical=False,
        ku_critical=False,
    )
    info = parse_certificate(bad.der)
    assert info.kind is CertKind.DEVICE and info.usage is None
    codes = {f.code for f in info.findings}
    assert {
        "device-not-after",
        "device-san-not-critical",
        "device-key-usage",
        "key-usage-unexpected",
        "key-usage-not-critical",
        "serial-length",
    } <= codes


def test_organisation_profile_findings(pki: Pki) -> None:
    weird_ou = _issue(
        subject=_name("ZZ", uid=bytes(8)), issuer=pki.ca, usage="KA", serial=_serial(5)
    )
    info = parse_certificate(weird_ou.der)
    assert info.kind is CertKind.ORGANISATION and info.role is None
    assert "ou-not-role" in {f.code for f in info.findings}
    unknown = _issue(subject=_name("42"), issuer=pki.ca, usage="DS", serial=_serial(6))
    info = parse_certificate(unknown.der)
    assert info.role == 0x42 and info.eui64 is None
    assert {"role-unknown", "org-uid-missing"} <= {f.code for f in info.findings}
    # PrintableString issuer, UTF8String subject: the real-data quirk, kept byte-exact.
    ps_issuer = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "07", _ASN1Type.PrintableString),
            x509.NameAttribute(NameOID.COMMON_NAME, "Z1", _ASN1Type.PrintableString),
        ]
    )
    mixed = _issue(
        subject=_name("02", uid=bytes(8)),
        issuer=Issued(pki.ca.key, b"", ps_issuer),
        usage="DS",
        serial=_serial(8),
    )
    info = parse_certificate(mixed.der)
    assert "dn-mixed-string-types" in {f.code for f in info.findings}
    assert ps_issuer.public_bytes() == info.issuer_dn and b"\x13\x0207" in info.issuer_dn


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(raw)]) + raw + content


def _with_explicit_null(der: bytes, signer: ec.EllipticCurvePrivateKey) -> bytes:
    """Re-sign `der` with `NULL` parameters in both ECDSA AlgorithmIdentifiers."""
    cert = x509.load_der_x509_certificate(der)
    plain = bytes.fromhex("300a06082a8648ce3d040302")
    nulled = bytes.fromhex("300c06082a8648ce3d0403020500")
    tbs = cert.tbs_certificate_bytes
    header = 2 + (tbs[1] & 0x7F if tbs[1] & 0x80 else 0)
    content = tbs[header:].replace(plain, nulled, 1)
    new_tbs = _der(0x30, content)
    sig = signer.sign(new_tbs, ec.ECDSA(hashes.SHA256()))
    return _der(0x30, new_tbs + nulled + _der(0x03, b"\x00" + sig))


def test_explicit_null_certificate_parses_and_verifies_over_original_bytes(pki: Pki) -> None:
    nulled = _with_explicit_null(pki.org.der, pki.ca.key)
    with pytest.raises(ValueError):
        x509.load_der_x509_certificate(nulled)  # what the workaround is for
    info = parse_certificate(nulled)
    assert info.der == nulled and info.issuer_dn in nulled
    assert info.kind is CertKind.ORGANISATION and info.role == 135
    assert [f.code for f in info.findings] == ["sig-alg-explicit-null"]
    ca = parse_certificate(pki.ca.der)
    assert verify_signature(info, ca.public_key_der)
    assert not verify_signature(info, parse_certificate(pki.root.der).public_key_der)


# --------------------------------------------------------------------------- CRLs


def _build_crl(ca: Issued, *, number: int = 5) -> bytes:
    revoked = [
        (0x13E6E3409C880FDBE71A429ACF375746, x509.ReasonFlags.key_compromise),
        (0x0A, x509.ReasonFlags.superseded),
        (0x4DF56E92D528F83544EBA0547068CF8C, x509.ReasonFlags.cessation_of_operation),
    ]
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.name)
        .last_update(dt.datetime(2025, 1, 1, tzinfo=UTC))
        .next_update(dt.datetime(2025, 1, 8, tzinfo=UTC))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier(_key_id(ca.key), None, None), critical=False)
    )
    for i, (serial, reason) in enumerate(revoked):
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(dt.datetime(2024, 12, 1 + i, tzinfo=UTC))
            .add_extension(x509.CRLReason(reason), critical=False)
            .build()
        )
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca.key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.DER)


def test_parse_crl(pki: Pki) -> None:
    der = _build_crl(pki.ca)
    info = parse_crl(der)
    ca = parse_certificate(pki.ca.der)
    assert info.der == der and info.sha256 == hashlib.sha256(der).digest()
    assert info.issuer_dn == ca.subject_dn and info.issuer_name == ca.subject_name
    assert info.issuer_key_id == ca.subject_key_id
    assert info.crl_number == 5
    assert info.this_update == dt.datetime(2025, 1, 1, tzinfo=UTC)
    assert info.next_update == dt.datetime(2025, 1, 8, tzinfo=UTC)
    assert [(r.serial, r.reason) for r in info.revoked] == [
        ("13E6E3409C880FDBE71A429ACF375746", "keyCompromise"),
        ("0A", "superseded"),
        ("4DF56E92D528F83544EBA0547068CF8C", "cessationOfOperation"),
    ]
    assert info.revoked[1].revocation_date == dt.datetime(2024, 12, 2, tzinfo=UTC)
    assert info.findings == ()
    assert verify_crl_signature(der, ca.public_key_der)
    assert not verify_crl_signature(der, parse_certificate(pki.root.der).public_key_der)
    assert not verify_crl_signature(der[:-3], ca.public_key_der)
    pem = b"-----BEGIN X509 CRL-----\r\n" + base64.encodebytes(der).replace(b"\n", b"\r\n")
    pem += b"-----END X509 CRL-----\r\n"
    assert load_pem_or_der_crl(pem) == der
    assert load_pem_or_der_crl(der) == der


def test_crl_findings(pki: Pki) -> None:
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(pki.ca.name)
        .last_update(dt.datetime(2025, 1, 1, tzinfo=UTC))
        .next_update(dt.datetime(2025, 1, 8, tzinfo=UTC))
        .sign(pki.ca.key, hashes.SHA256())
    )
    info = parse_crl(crl.public_bytes(serialization.Encoding.DER))
    assert {"crl-number-missing", "aki-missing"} <= {f.code for f in info.findings}
    assert info.revoked == () and info.crl_number is None


def test_crl_errors(pki: Pki) -> None:
    for bad in (b"", b"\x30\x03\x02\x01\x01", pki.ca.der[:50], b"hello"):
        with pytest.raises(ParseError):
            parse_crl(bad)
    with pytest.raises(ParseError):
        parse_crl(pki.ca.der)  # a certificate is not a CRL
    with pytest.raises(ParseError, match="not a CRL"):
        load_pem_or_der_crl(
            b"-----BEGIN CERTIFICATE-----\n"
            + base64.encodebytes(pki.ca.der)
            + b"-----END CERTIFICATE-----\n"
        )
    crl = _build_crl(pki.ca)
    with pytest.raises(ParseError, match="one DER CRL"):
        load_pem_or_der_crl(crl + crl)


# --------------------------------------------------------------------------- PEM / DER input


def _pem(der: bytes, label: str = "CERTIFICATE", eol: bytes = b"\n") -> bytes:
    body = base64.encodebytes(der).replace(b"\n", eol)
    return (
        f"-----BEGIN {label}-----".encode() + eol + body + f"-----END {label}-----".encode() + eol
    )


def test_pem_bundle_crlf_with_text_between(pki: Pki) -> None:
    ders = [pki.root.der, pki.ca.der, pki.device.der]
    bundle = b"Bag Attributes: chain\r\n"
    for i, der in enumerate(ders):
        bundle += f"subject=#{i}\r\n".encode() + _pem(der, eol=b"\r\n") + b"\r\n"
    bundle += b"trailing words\r\n"
    assert load_pem_or_der_certificates(bundle) == ders
    assert load_pem_or_der_certificates(_pem(pki.ca.der, "X509 CERTIFICATE")) == [pki.ca.der]
    trusted = _pem(pki.ca.der + bytes.fromhex("300a300806062b0601050507"), "TRUSTED CERTIFICATE")
    assert load_pem_or_der_certificates(trusted) == [pki.ca.der]
    assert load_pem_or_der_certificates(pki.ca.der) == [pki.ca.der]
    assert load_pem_or_der_certificates(pki.ca.der + pki.org.der) == [pki.ca.der, pki.org.der]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"   \r\n", "empty"),
        (b"garbage that is not a certificate", "neither"),
        (b"\x30\x82\x05\x00\x01\x02", "not well-formed DER"),
        (b"\x30\x80\x00\x00", "not well-formed DER"),
        (b"-----BEGIN CERTIFICATE-----\nMIIB\n", "block 1: no '-----END CERTIFICATE-----'"),
        (b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n", "block 1: empty"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "not a certificate"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "block 1: not a DER"),
    ],
)
def test_container_errors(data: bytes, message: str) -> None:
    with pytest.raises(ParseError, match=message):
        load_pem_or_der_certificates(data)


def test_bad_base64_names_block(pki: Pki) -> None:
    good = _pem(pki.ca.der, eol=b"\r\n")
    bad = good.replace(b"-----\r\n", b"-----\r\n!!*", 1)
    with pytest.raises(ParseError, match=r"PEM block 2: bad base64") as err:
        load_pem_or_der_certificates(good + b"text\r\n" + bad + good)
    assert "\n" not in str(err.value)
    head, sep, tail = good.partition(b"\r\n-----END")
    short = head[:-1] + sep + tail  # without its last character the base64 cannot be complete
    with pytest.raises(ParseError, match=r"PEM block 3: bad base64"):
        load_pem_or_der_certificates(good + good + short)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"\x30",
        b"\x30\x00",
        b"\x30\x03\x30\x01\x00",
        b"\x30\x84\xff\xff\xff\xff",
        b"\x30\x85\x01\x00\x00\x00\x00\x00",
        b"\x30\x80\x00\x00",
        b"\x1f\xff\xff\xff",
        bytes(range(256)),
        b"-----BEGIN CERTIFICATE-----",
    ],
)
def test_parse_certificate_garbage(data: bytes) -> None:
    with pytest.raises(ParseError) as err:
        parse_certificate(data)
    assert str(err.value) and "\n" not in str(err.value)


def test_parse_certificate_truncations(pki: Pki) -> None:
    der = pki.org.der
    for cut in range(0, len(der), 7):
        with pytest.raises(ParseError):
            parse_certificate(der[:cut])
    with pytest.raises(ParseError, match="trailing"):
        parse_certificate(der + b"\x00")


# --------------------------------------------------------------------------- fuzz


def _seed_certificates() -> Iterator[bytes]:
    if REALDATA.is_dir():
        for name in (
            Z1_FILE,
            "dccboxed-keystore/keystore.json-extracted/mdr-ds.173CFBF08C3464D8C0E61E331D73D6A0.pem",
            "dccboxed-keystore/test-embedded/certificateSearch__deviceCert_88738457002f966c_ds.der",
            "dccboxed-keystore/test-embedded/db__https_cert.der",
        ):
            path = REALDATA / name
            if path.is_file():
                yield load_pem_or_der_certificates(path.read_bytes())[0]
    root = _issue(subject=_name("00", "ZA"), issuer=None, usage="CA", serial=_serial(1))
    yield _issue(
        subject=x509.Name([]),
        issuer=root,
        usage="DS",
        serial=_serial(2),
        eui=bytes(8),
        not_after=dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC),
    ).der
    yield _build_crl(root)


SEEDS = list(_seed_certificates())


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    if draw(st.booleans()):
        data = bytearray(_pem(bytes(data), eol=draw(st.sampled_from([b"\n", b"\r\n"]))))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "set"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from([0x00, 0x05, 0x30, 0x80, 0x81, 0x84, 0xFF]))
    return bytes(data)


def _only_parse_error(func: Callable[[bytes], object], data: bytes) -> None:
    try:
        func(data)
    except ParseError as exc:
        assert str(exc) and "\n" not in str(exc)


def _exercise(data: bytes) -> None:
    _only_parse_error(parse_certificate, data)
    _only_parse_error(parse_crl, data)
    _only_parse_error(load_pem_or_der_certificates, data)
    _only_parse_error(load_pem_or_der_crl, data)
    assert verify_signature(data, SPKI_FOR_FUZZ) in (True, False)
    assert verify_crl_signature(data, SPKI_FOR_FUZZ) in (True, False)
    try:
        blobs = load_pem_or_der_certificates(data)
    except ParseError:
        return
    for blob in blobs:
        _only_parse_error(parse_certificate, blob)


SPKI_FOR_FUZZ = _spki(ec.generate_private_key(ec.SECP256R1()))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=1500))
def test_fuzz_random_bytes(data: bytes) -> None:
    _exercise(data)
    _exercise(b"\x30\x82" + data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated())
def test_fuzz_mutated_real_der(data: bytes) -> None:
    _exercise(data)


def test_hostile_der_never_escapes() -> None:
    huge_oid = b"\x06\x29" + b"\xff" * 40 + b"\x7f"
    alg = b"\x30" + bytes([len(huge_oid)]) + huge_oid
    body = b"\x30\x00" + alg + b"\x03\x01\x00"
    hostile = b"\x30" + bytes([len(body)]) + body
    with pytest.raises(ParseError):
        parse_certificate(hostile)
    with pytest.raises(ParseError):
        parse_crl(hostile)
    assert verify_signature(hostile, SPKI_FOR_FUZZ) is False
    assert verify_crl_signature(hostile, SPKI_FOR_FUZZ) is False


def test_non_certificate_block_in_bundle_is_named(pki: Pki) -> None:
    crl = _pem(_build_crl(pki.ca), "X509 CRL")
    with pytest.raises(ParseError, match=r"PEM block 2: 'X509 CRL' is not a certificate"):
        load_pem_or_der_certificates(_pem(pki.ca.der) + crl)
