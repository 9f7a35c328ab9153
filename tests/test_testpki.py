"""The test PKI generator: layout and manifest, the GB profile against real certificates,
signatures, determinism and the all-or-nothing output directory."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from repository_server.pki.testpki import (
    DEVICE_POLICY_OID,
    HW_MODULE_NAME_OID,
    ORGANISATION_POLICY_OID,
    ORGANISATION_ROLES,
    TestPkiParams,
    device_eui64,
    device_objects,
    generate,
    key_identifier,
    load_manifest,
    organisation_eui64,
)

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
SPEC_ROLES = {0, 1, 2, 3, 4, 5, 6, 7, 8, 127, 135, 137}
PARAMS = TestPkiParams(devices=10, organisations=24, workers=2, seed=20261121)
ECDSA_SHA256_ALG_ID = bytes.fromhex("300a06082a8648ce3d040302")
KIND_ORDER = ["root", "ca", "organisation", "device", "crl", "document"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("pki") / "testpki"
    generate(out, PARAMS)
    return out, load_manifest(out, devices=True)


def _cert(path: Path) -> x509.Certificate:
    data = path.read_bytes()
    if data.startswith(b"-----"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def _certs_by_object(out: Path, manifest: dict[str, Any]) -> list[tuple[dict[str, Any], Any]]:
    """Every certificate object of the manifest with its parsed certificate."""
    bundles: dict[str, list[x509.Certificate]] = {}
    result = []
    for obj in manifest["objects"]:
        if obj["kind"] in ("root", "ca", "organisation"):
            result.append((obj, _cert(out / obj["path"])))
        elif obj["kind"] == "device":
            if obj["path"] not in bundles:
                bundles[obj["path"]] = x509.load_pem_x509_certificates(
                    (out / obj["path"]).read_bytes()
                )
            result.append((obj, bundles[obj["path"]][obj["index"]]))
    return result


def _ca(out: Path, manifest: dict[str, Any], name: str) -> x509.Certificate:
    [obj] = [o for o in manifest["objects"] if o.get("name") == name and o["usage"] == "CA"]
    return _cert(out / obj["path"])


def _tlv(data: bytes, pos: int = 0) -> tuple[int, bytes, int]:
    """One DER TLV at ``pos``: (tag, value, position after it)."""
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    return tag, data[pos : pos + length], pos + length


def _hw_module_name(cert: x509.Certificate) -> tuple[str, bytes]:
    """(type-id, hardwareModuleName DER value) of the single otherName in the SAN."""
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    [other] = san.get_values_for_type(x509.OtherName)
    return other.type_id.dotted_string, other.value


def _hw_parts(value: bytes) -> tuple[bytes, bytes]:
    """(hwType OID DER, hwSerialNum) of a HardwareModuleName SEQUENCE."""
    tag, body, end = _tlv(value)
    assert tag == 0x30 and end == len(value)
    oid_tag, oid, pos = _tlv(body)
    serial_tag, serial, pos = _tlv(body, pos)
    assert (oid_tag, serial_tag, pos) == (0x06, 0x04, len(body))
    return oid, serial


def _shape(cert: x509.Certificate) -> dict[str, Any]:
    """What the GB profile fixes about a certificate, leaving out the values that vary."""

    def name_shape(name: x509.Name) -> list[tuple[str, Any]]:
        return [(a.oid.dotted_string, a._type) for a in name]

    ext = cert.extensions
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    shape: dict[str, Any] = {
        "version": cert.version,
        "extensions": [(e.oid.dotted_string, e.critical) for e in ext],
        "subject": name_shape(cert.subject),
        "issuer_types": sorted({a._type.value for a in cert.issuer}),
        "signature_algorithm": cert.signature_algorithm_oid.dotted_string,
        # AlgorithmIdentifier without parameters (no explicit NULL), in TBS and outside
        "signature_alg_der": cert.public_bytes(Encoding.DER).count(ECDSA_SHA256_ALG_ID),
        "serial_octets": (cert.serial_number.bit_length() + 8) // 8,  # DER INTEGER length
        "curve": public_key.curve.name,
        "ski_len": len(ext.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest),
        "aki": (
            len(aki.key_identifier or b""),
            aki.authority_cert_issuer,
            aki.authority_cert_serial_number,
        ),
        "key_usage": ext.get_extension_for_class(x509.KeyUsage).value,
        "policies": [
            (p.policy_identifier.dotted_string, p.policy_qualifiers)
            for p in ext.get_extension_for_class(x509.CertificatePolicies).value
        ],
    }
    try:
        shape["basic_constraints"] = ext.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        shape["basic_constraints"] = None
    return shape


# --- layout and manifest -----------------------------------------------------------------------
def test_layout_and_manifest(pki: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = pki
    on_file = json.loads((out / "manifest.json").read_text())
    # manifest.json lists all but the device certificates, which are rows of the index
    assert on_file["objects"] == [o for o in manifest["objects"] if o["kind"] != "device"]
    assert on_file["devices"] == {"index": "devices/index.csv",
                                  "bundles": ["devices/devices-0001.pem"]}
    assert (out / "devices/index.csv").read_text().splitlines()[0] == (
        "serial,eui64,usage,subject_key_id,issuer_key_id,path,index")
    assert manifest["format"] == 2
    assert manifest["generated_at"].endswith("Z")
    assert manifest["params"]["devices"] == 10 and manifest["params"]["seed"] == PARAMS.seed

    # the manifest names every file there is, and every file it names is there
    named = {"manifest.json", "devices/index.csv"}
    for obj in manifest["objects"]:
        named.update(obj[k] for k in ("path", "pem", "key") if k in obj)
    named.update(v for k, v in manifest["dcc_client"].items() if "subject" not in k)
    named.update(manifest["tls"].values())
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert named == on_disk

    kinds = Counter(o["kind"] for o in manifest["objects"])
    assert kinds == {
        "root": 2,
        "ca": 3,
        "organisation": 24,
        "device": 20,
        "crl": 1,
        "arl": 2,
        "document": 3,
    }
    # safe lodging order: issuers before what they issue, revocation data, then documents
    ranks = [
        KIND_ORDER.index("crl" if o["kind"] == "arl" else o["kind"]) for o in manifest["objects"]
    ]
    assert ranks == sorted(ranks)

    bundle = x509.load_pem_x509_certificates((out / "devices/devices-0001.pem").read_bytes())
    assert len(bundle) == 20
    devices = [o for o in manifest["objects"] if o["kind"] == "device"]
    assert [o["index"] for o in devices] == list(range(20))
    assert {o["path"] for o in devices} == {"devices/devices-0001.pem"}
    assert len({o["eui64"] for o in devices}) == 10
    assert Counter(o["usage"] for o in devices) == {"DS": 10, "KA": 10}
    assert all(o["eui64"].startswith("00-DB-12-") for o in devices)

    orgs = [o for o in manifest["objects"] if o["kind"] == "organisation"]
    roles = {o["role"] for o in orgs}
    assert roles == set(ORGANISATION_ROLES) == SPEC_ROLES - {0}
    assert {o["role"] for o in manifest["objects"] if "role" in o} == SPEC_ROLES
    assert all(o["eui64"].startswith("90-B3-D5-1F-30-") for o in orgs)
    by_entity: dict[str, list[str]] = {}
    for o in orgs:
        by_entity.setdefault(o["eui64"], []).append(o["usage"])
    assert all(usages == ["DS", "KA"] for usages in by_entity.values())
    assert len(by_entity) == 12

    for obj in manifest["objects"]:
        expected = {
            "root": {"kind", "path", "pem", "serial", "issuer_key_id", "subject_key_id", "role"}
            | {"usage", "revoked", "name", "key"},
            "organisation": {"kind", "path", "serial", "issuer_key_id", "subject_key_id"}
            | {"eui64", "role", "usage", "revoked", "name", "key"},
            "device": {"kind", "path", "index", "serial", "issuer_key_id", "subject_key_id"}
            | {"eui64", "usage", "revoked"},
            "crl": {"kind", "path", "issuer_key_id", "crl_number"},
            "document": {"kind", "path", "name", "content_type"},
        }[{"ca": "root", "arl": "crl"}.get(obj["kind"], obj["kind"])]
        assert set(obj) == expected, obj


def test_manifest_facts_match_the_certificates(pki: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = pki
    pairs = _certs_by_object(out, manifest)
    assert len(pairs) == 5 + 24 + 20
    serials = set()
    for obj, cert in pairs:
        ext = cert.extensions
        assert obj["serial"] == f"{cert.serial_number:032X}"
        serials.add(cert.serial_number)
        assert len(obj["serial"]) == 32 and int(obj["serial"][0], 16) < 8  # top bit clear
        ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
        assert obj["subject_key_id"] == ski.hex().upper()
        assert aki is not None and obj["issuer_key_id"] == aki.hex().upper()
        public_key = cert.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        assert ski == key_identifier(public_key)
        ku = ext.get_extension_for_class(x509.KeyUsage).value
        usage = {(True, False, False): "DS", (False, True, False): "KA", (False, False, True): "CA"}
        assert usage[(ku.digital_signature, ku.key_agreement, ku.key_cert_sign)] == obj["usage"]
        if obj["kind"] == "device":
            _, value = _hw_module_name(cert)
            assert _hw_parts(value)[1].hex("-").upper() == obj["eui64"]
        if obj["kind"] == "organisation":
            [uid] = cert.subject.get_attributes_for_oid(NameOID.X500_UNIQUE_IDENTIFIER)
            assert uid.value == b"\x00" + bytes.fromhex(obj["eui64"].replace("-", ""))
            [ou] = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
            assert ou.value == f"{obj['role']:02X}"
            key = (out / obj["key"]).read_bytes()
            assert key.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8, unencrypted
            assert stat.S_IMODE((out / obj["key"]).stat().st_mode) == 0o600
    assert len(serials) == len(pairs)


def test_crl_and_arls(pki: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = pki
    objs = {o["path"]: o for o in manifest["objects"]}
    crl = x509.load_der_x509_crl((out / "crl/issuing-oca.crl").read_bytes())
    oca = _ca(out, manifest, "issuing-oca")
    assert crl.issuer == oca.subject
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1
    assert objs["crl/issuing-oca.crl"]["crl_number"] == 1
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier is not None
    assert aki.key_identifier.hex().upper() == objs["crl/issuing-oca.crl"]["issuer_key_id"]
    assert crl.next_update_utc is not None
    assert (crl.next_update_utc - crl.last_update_utc).days in (6, 7)
    revoked_in_crl = {f"{r.serial_number:032X}" for r in crl}
    revoked_in_manifest = {
        o["serial"] for o in manifest["objects"] if o["kind"] == "organisation" and o["revoked"]
    }
    assert len(revoked_in_crl) >= 1
    assert revoked_in_crl == revoked_in_manifest
    reasons = {r.extensions.get_extension_for_class(x509.CRLReason).value.reason for r in crl}
    assert reasons <= {x509.ReasonFlags.key_compromise, x509.ReasonFlags.superseded}

    arl = x509.load_der_x509_crl((out / "crl/root-oca.arl").read_bytes())
    retired = _ca(out, manifest, "retired-oca")
    assert arl.issuer == _ca(out, manifest, "root-oca").subject
    [entry] = list(arl)
    assert entry.serial_number == retired.serial_number
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason == x509.ReasonFlags.ca_compromise
    assert [o["revoked"] for o in manifest["objects"] if o.get("name") == "retired-oca"] == [True]
    assert arl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1
    assert arl.next_update_utc is not None
    assert (arl.next_update_utc - arl.last_update_utc).days in (29, 30)

    dca_arl = x509.load_der_x509_crl((out / "crl/root-dca.arl").read_bytes())
    assert len(dca_arl) == 0
    assert dca_arl.issuer == _ca(out, manifest, "root-dca").subject


def test_documents(pki: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = pki
    docs = [o for o in manifest["objects"] if o["kind"] == "document"]
    assert {d["content_type"].split(";")[0] for d in docs} == {"application/pdf", "text/plain"}
    for doc in docs:
        data = (out / doc["path"]).read_bytes()
        assert 100 < len(data) < 4000
        if doc["content_type"] != "application/pdf":
            data.decode("utf-8")
            continue
        assert data.startswith(b"%PDF-1.") and data.endswith(b"%%EOF\n")
        # the cross-reference table points at each object
        startxref = int(data.rsplit(b"startxref\n", 1)[1].split(b"\n")[0])
        assert data[startxref:].startswith(b"xref\n")
        lines = data[startxref:].split(b"\n")
        count = int(lines[1].split()[1])
        for number, line in enumerate(lines[3 : 2 + count], start=1):
            offset = int(line[:10])
            assert data[offset:].startswith(b"%d 0 obj" % number)


def test_refuses_existing_output(pki: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    out, _ = pki
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(FileExistsError):
        generate(out, PARAMS)
    assert (out / "manifest.json").read_bytes() == before
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary left

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "something").write_text("x")
    with pytest.raises(FileExistsError):
        generate(busy, PARAMS)

    empty = tmp_path / "empty"
    empty.mkdir()
    generate(empty, TestPkiParams(devices=1, organisations=1, workers=1, seed=1))
    assert (empty / "manifest.json").is_file()


def test_failure_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "pki"

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "devices" and done > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(out, TestPkiParams(devices=20, organisations=2, workers=2, seed=3), progress)
    assert list(tmp_path.iterdir()) == []


def test_progress_reports(tmp_path: Path) -> None:
    calls: list[tuple[str, int, int]] = []
    generate(
        tmp_path / "pki",
        TestPkiParams(devices=40, organisations=5, workers=2, seed=4),
        lambda stage, done, total: calls.append((stage, done, total)),
    )
    stages = list(dict.fromkeys(s for s, _, _ in calls))
    assert stages[:3] == ["ca", "organisations", "devices"]
    devices = [(d, t) for s, d, t in calls if s == "devices"]
    assert devices[0] == (0, 80) and devices[-1] == (80, 80) and len(devices) > 2
    assert [d for d, _ in devices] == sorted(d for d, _ in devices)
    for stage in stages:  # every stage ends complete
        last = [(d, t) for s, d, t in calls if s == stage][-1]
        assert last[0] == last[1]


# --- the GB profile, compared with real certificates -------------------------------------------
def _real(pattern: str) -> x509.Certificate:
    if not REALDATA.is_dir():
        pytest.skip(f"real certificates not available at {REALDATA}")
    matches = sorted(REALDATA.glob(pattern))
    if not matches:
        pytest.skip(f"no real certificate matching {pattern}")
    return _cert(matches[0])


def _ours(pki: tuple[Path, dict[str, Any]], kind: str, usage: str) -> x509.Certificate:
    out, manifest = pki
    for obj, cert in _certs_by_object(out, manifest):
        if obj["kind"] == kind and obj["usage"] == usage:
            return cert  # type: ignore[no-any-return]
    raise AssertionError(f"no {kind} {usage}")


def test_device_certificate_matches_real(pki: tuple[Path, dict[str, Any]]) -> None:
    for usage, suffix in (("DS", "ds"), ("KA", "ka")):
        real = _real(f"gbcs-parser/test/rtds/keystore/00db*-{suffix}.pem")
        ours = _ours(pki, "device", usage)
        assert _shape(ours) == _shape(real)
        assert list(ours.subject) == list(real.subject) == []
        assert ours.not_valid_after_utc == real.not_valid_after_utc
        assert b"\x18\x0f99991231235959Z" in ours.tbs_certificate_bytes  # GeneralizedTime
        real_type, real_value = _hw_module_name(real)
        our_type, our_value = _hw_module_name(ours)
        assert our_type == real_type == HW_MODULE_NAME_OID
        real_hw_type, real_serial = _hw_parts(real_value)
        our_hw_type, our_serial = _hw_parts(our_value)
        assert our_hw_type == real_hw_type
        assert len(our_serial) == len(real_serial) == 8
        assert _shape(ours)["policies"] == [(DEVICE_POLICY_OID, None)]


def test_organisation_certificate_matches_real(pki: tuple[Path, dict[str, Any]]) -> None:
    for usage, pattern in (("DS", "Z1-supplier-ds.*.pem"), ("KA", "Z1-supplier-ka.*.pem")):
        real = _real(f"dccboxed-keystore/keystore.json-extracted/{pattern}")
        ours = _ours(pki, "organisation", usage)
        ours_shape, real_shape = _shape(ours), _shape(real)
        # CN is optional in the profile (the real Z1 KA certificates leave it out); ours
        # always has it, first and UTF8String like the real DS ones
        assert ours_shape["subject"][0] == ("2.5.4.3", _ASN1Type.UTF8String)
        if real_shape["subject"][0][0] != "2.5.4.3":
            ours_shape["subject"] = ours_shape["subject"][1:]
        assert ours_shape == real_shape
        # issuer layout and string types exactly as the real Z1-issued ones (OU, CN)
        assert [(a.oid, a._type) for a in ours.issuer] == [(a.oid, a._type) for a in real.issuer]
        # x500UniqueIdentifier as BIT STRING 03 09 00 <EUI-64>
        [uid] = ours.subject.get_attributes_for_oid(NameOID.X500_UNIQUE_IDENTIFIER)
        assert isinstance(uid.value, bytes)
        assert b"\x06\x03\x55\x04\x2d\x03\x09" + uid.value in ours.subject.public_bytes()
        assert _shape(ours)["policies"] == [(ORGANISATION_POLICY_OID, None)]


def test_ca_certificate_matches_real(pki: tuple[Path, dict[str, Any]]) -> None:
    real = _real("duis-templates/Certificate.71872BDBC82789BC1401CE01BA06ADA3.der")
    out, manifest = pki
    for name in ("issuing-oca", "issuing-dca", "retired-oca"):
        ours = _ca(out, manifest, name)
        assert _shape(ours) == _shape(real)
        assert [(a.oid, a._type) for a in ours.issuer] == [(a.oid, a._type) for a in real.issuer]
    for name in ("root-oca", "root-dca"):
        ours = _ca(out, manifest, name)
        shape, real_shape = _shape(ours), _shape(real)
        assert shape["basic_constraints"] == x509.BasicConstraints(ca=True, path_length=None)
        for key in ("extensions", "subject", "key_usage", "policies", "ski_len", "aki"):
            assert shape[key] == real_shape[key], key
        [ou] = ours.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        assert ou.value == "00"


def test_key_identifier_is_rfc5280_method_2_as_real() -> None:
    for pattern in (
        "gbcs-parser/test/rtds/keystore/00db123456789001-ds.pem",
        "dccboxed-keystore/keystore.json-extracted/Z1-supplier-ka.*.pem",
        "duis-templates/Certificate.71872BDBC82789BC1401CE01BA06ADA3.der",
    ):
        real = _real(pattern)
        public_key = real.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        ski = real.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        assert key_identifier(public_key) == ski


# --- signatures ----------------------------------------------------------------------------------
def test_every_signature_verifies(pki: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = pki
    cas = {
        o["subject_key_id"]: _cert(out / o["path"])
        for o in manifest["objects"]
        if o["kind"] in ("root", "ca")
    }
    checked = 0
    for obj, cert in _certs_by_object(out, manifest):
        cert.verify_directly_issued_by(cas[obj["issuer_key_id"]])
        checked += 1
    assert checked == 49
    for obj in manifest["objects"]:
        if obj["kind"] in ("crl", "arl"):
            crl = x509.load_der_x509_crl((out / obj["path"]).read_bytes())
            issuer = cas[obj["issuer_key_id"]]
            assert crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
            assert crl.signature_algorithm_oid == issuer.signature_algorithm_oid


def test_client_and_server_certificates(pki: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = pki
    dcc = manifest["dcc_client"]
    client_ca = _cert(out / dcc["ca"])
    assert _cert(out / dcc["ca_der"]) == client_ca
    client_ca.verify_directly_issued_by(client_ca)
    client = _cert(out / dcc["cert"])
    other = _cert(out / dcc["other_cert"])
    for cert, subject in ((client, dcc["subject"]), (other, dcc["other_subject"])):
        cert.verify_directly_issued_by(client_ca)
        assert cert.subject.rfc4514_string() == subject
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert ku.digital_signature and not ku.key_cert_sign
    assert dcc["subject"] == "CN=DCC SMKI Lodging Client,OU=DCC,O=Smart DCC Ltd"
    assert other.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Not The DCC"
    assert client.subject != other.subject

    tls = manifest["tls"]
    tls_ca = _cert(out / tls["ca"])
    server = _cert(out / tls["cert"])
    server.verify_directly_issued_by(tls_ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False

    for path in (dcc["key"], dcc["other_key"], tls["key"]):
        assert stat.S_IMODE((out / path).stat().st_mode) == 0o600


def test_openssl_accepts_the_chains(pki: tuple[Path, dict[str, Any]]) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    out, manifest = pki

    def verify(ca: str, cert: str, *extra: str) -> None:
        run = subprocess.run(
            [openssl, "verify", "-CAfile", ca, *extra, cert],
            cwd=out,
            capture_output=True,
            text=True,
            check=False,
        )
        assert run.returncode == 0, run.stdout + run.stderr

    verify(manifest["tls"]["ca"], manifest["tls"]["cert"])
    verify(manifest["dcc_client"]["ca"], manifest["dcc_client"]["cert"])
    verify("ca/root-dca.pem", "devices/devices-0001.pem", "-untrusted", "ca/issuing-dca.pem")
    org = next(o for o in manifest["objects"] if o["kind"] == "organisation")
    pem = out / "org.pem"
    pem.write_bytes(_cert(out / org["path"]).public_bytes(Encoding.PEM))
    try:
        verify("ca/root-oca.pem", "org.pem", "-untrusted", "ca/issuing-oca.pem")
    finally:
        pem.unlink()


# --- determinism -------------------------------------------------------------------------------
def _identity(manifest: dict[str, Any]) -> list[tuple[Any, ...]]:
    fields = ("kind", "path", "index", "serial", "eui64", "role", "usage", "revoked", "name")
    return [tuple(o.get(f) for f in fields) for o in manifest["objects"]]


def test_same_seed_same_identifiers(tmp_path: Path) -> None:
    params = TestPkiParams(devices=12, organisations=6, workers=1, seed=99)
    generate(tmp_path / "one", params)
    generate(tmp_path / "two", TestPkiParams(devices=12, organisations=6, workers=2, seed=99))
    one, two = (load_manifest(tmp_path / n, devices=True) for n in ("one", "two"))
    assert _identity(one) == _identity(two)
    # keys are fresh each run
    assert [o.get("subject_key_id") for o in one["objects"]] != [
        o.get("subject_key_id") for o in two["objects"]
    ]
    generate(tmp_path / "other", TestPkiParams(devices=12, organisations=6, seed=100))
    other = load_manifest(tmp_path / "other", devices=True)
    assert {o.get("serial") for o in one["objects"]} & {
        o.get("serial") for o in other["objects"]
    } == {None}
    unseeded = generate(tmp_path / "unseeded", TestPkiParams(devices=1, organisations=1))
    assert isinstance(unseeded["params"]["seed"], int)


def test_eui64s_are_distinct() -> None:
    assert len({device_eui64(5, i) for i in range(50_000)}) == 50_000
    assert len({organisation_eui64(5, i) for i in range(20_000)}) == 20_000
    assert device_eui64(5, 7) == device_eui64(5, 7) != device_eui64(6, 7)
    assert all(len(device_eui64(1, i)) == 8 for i in (0, 1, 2**40 - 1))
    with pytest.raises(ValueError):
        device_eui64(1, 2**40)


def test_bundles_roll_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import repository_server.pki.testpki as testpki

    monkeypatch.setattr(testpki, "BUNDLE_MAX", 7)
    manifest = generate(tmp_path / "pki", TestPkiParams(devices=10, organisations=0, workers=2))
    devices = list(device_objects(tmp_path / "pki", manifest))
    assert [(o["path"][-8:], o["index"]) for o in devices[6:8]] == [
        ("0001.pem", 6),
        ("0002.pem", 0),
    ]
    sizes = Counter(o["path"] for o in devices)
    assert sorted(sizes.values()) == [6, 7, 7]
    for path, n in sizes.items():
        assert len(x509.load_pem_x509_certificates((tmp_path / "pki" / path).read_bytes())) == n
    assert manifest["counts"]["device_bundles"] == 3
    crl = x509.load_der_x509_crl((tmp_path / "pki/crl/issuing-oca.crl").read_bytes())
    assert len(crl) == 0  # no organisations, nothing to revoke


def test_worker_count_does_not_matter_for_small_runs(tmp_path: Path) -> None:
    manifest = generate(tmp_path / "pki", TestPkiParams(devices=3, organisations=2, workers=8))
    assert manifest["counts"]["device_certificates"] == 6
    assert os.path.exists(tmp_path / "pki" / "devices" / "devices-0001.pem")
