"""Test PKI generator in the exact GB SMKI certificate profile. It owns everything a test,
a demo or a load test needs to stand in for the DCC: the Root and Issuing OCA/DCA
certificates (plus a retired OCA revoked on the ARL), organisation certificates for every
remote party role with their private keys, device certificates written as PEM bundles of
up to 50,000 (the lodging unit), the Organisation CRL and the ARLs, a few SMKI documents,
the DCC lodging client certificates (the right one and a wrong-identity one) and the
server TLS certificate, all described by ``manifest.json`` (the device certificates, which
may number millions, one row each in ``devices/index.csv``, written as they are made so that
memory stays flat). Output mirrors the real ZAZ1 /
RTDS certificates in ``shared/realdata`` (extension order and criticality, subject string
types, policy and hwType OIDs, 8-byte RFC 5280 method 2 key identifiers). EUI-64s and
serials are deterministic for a seed; keys and signatures are fresh each run. Device
certificates (the bulk) are made in a process pool, keys generated in the workers.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import csv
import datetime as dt
import hashlib
import ipaddress
import json
import multiprocessing
import os
import random
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from repository_server.pki.ids import format_eui64, serial_to_hex

__all__ = [
    "BUNDLE_MAX",
    "DEVICE_POLICY_OID",
    "HW_MODULE_NAME_OID",
    "HW_TYPE_OID",
    "ORGANISATION_POLICY_OID",
    "ORGANISATION_ROLES",
    "TestPkiParams",
    "device_eui64",
    "device_objects",
    "generate",
    "key_identifier",
    "load_manifest",
    "organisation_eui64",
]

# --- profile constants (values as in shared/realdata) --------------------------------------
ORGANISATION_POLICY_OID = "1.2.826.0.1.8641679.1.2.1.4"  # ZAZ1 CA and organisation certs
DEVICE_POLICY_OID = "1.2.826.0.1.1800000.1.2.1.4"  # RTDS device certs
HW_TYPE_OID = "1.2.826.0.1.8641679.1.2.2.1"  # RTDS device hardwareModuleName hwType
HW_MODULE_NAME_OID = "1.3.6.1.5.5.7.8.4"  # RFC 4108 id-on-hardwareModuleName

#: Remote party roles an organisation certificate can carry (SPEC.md; 0 is the root CA).
ORGANISATION_ROLES: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 127, 135, 137)
_ROLE_SHORT_NAMES = {
    1: "RECOVERY",
    2: "SUPPLIER",
    3: "NETWORKOPERATOR",
    4: "ACCESSCONTROLBROKER",
    5: "TRANSITIONALCOS",
    6: "WANPROVIDER",
    7: "ISSUINGAUTHORITY",
    8: "LOADCONTROLLER",
    127: "OTHERUSER",
    135: "XMLSIGNING",
    137: "DSPXMLSIGNING",
}

MANIFEST_FORMAT = 2  # 2: device certificates listed in devices/index.csv, not in objects
BUNDLE_MAX = 50_000  # certificates per device PEM bundle (the lodging batch limit)
DEVICE_NOT_AFTER = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
_DEVICE_EUI_PREFIX = bytes.fromhex("00DB12")  # + 40 bits
_ORG_EUI_PREFIX = bytes.fromhex("90B3D51F30")  # + 24 bits
_MAX_CHUNK = 1000  # devices per work item (2,000 certificates)

_SHA256 = hashes.SHA256()
_CURVE = ec.SECP256R1()

ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class TestPkiParams:
    """What to generate. ``seed`` fixes EUI-64s, serials and the revoked set (None: random)."""

    __test__ = False  # not a pytest test class, despite the name

    devices: int = 50
    organisations: int = 24
    workers: int = os.cpu_count() or 1
    seed: int | None = None
    revoked_fraction: float = 0.1


# --- deterministic identifiers ----------------------------------------------------------------
def _digest(seed: int, *parts: object) -> bytes:
    h = hashlib.blake2b(str(seed).encode(), digest_size=32)
    for part in parts:
        h.update(b"\x1f" + str(part).encode())
    return h.digest()


def _serial(seed: int, *parts: object) -> int:
    """A 16-octet positive serial: top bit clear, first octet non-zero (so DER keeps 16)."""
    d = bytearray(_digest(seed, "serial", *parts)[:16])
    d[0] &= 0x7F
    if d[0] == 0:
        d[0] = 0x01
    return int.from_bytes(d, "big")


def _permute(i: int, bits: int, seed: int, tag: str) -> int:
    """A seed-keyed bijection on [0, 2**bits): distinct inputs give distinct outputs."""
    if not 0 <= i < 1 << bits:
        raise ValueError(f"index {i} out of range for {bits}-bit identifiers")
    mask = (1 << bits) - 1
    k = _digest(seed, "permute", tag)
    a = int.from_bytes(k[0:8], "big") | 1  # odd multipliers are bijections mod 2**bits
    b = int.from_bytes(k[8:16], "big")
    c = int.from_bytes(k[16:24], "big") | 1
    x = (i * a + b) & mask
    x ^= x >> (bits // 2)  # xorshift right is a bijection
    x = (x * c) & mask
    x ^= x >> (bits // 3 + 1)
    return x


def device_eui64(seed: int, index: int) -> bytes:
    """EUI-64 of device ``index``: ``00-DB-12-xx-xx-xx-xx-xx``, distinct per index."""
    return _DEVICE_EUI_PREFIX + _permute(index, 40, seed, "device").to_bytes(5, "big")


def organisation_eui64(seed: int, entity: int) -> bytes:
    """EUI-64 of organisation entity ``entity``: ``90-B3-D5-1F-30-xx-xx-xx``, distinct."""
    return _ORG_EUI_PREFIX + _permute(entity, 24, seed, "organisation").to_bytes(3, "big")


def key_identifier(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """RFC 5280 §4.2.1.2 method 2: ``0100`` then the low 60 bits of SHA-1 of the key bits.

    This is how the real ZAZ1 / RTDS key identifiers were made (checked against realdata).
    """
    point = public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    h = hashlib.sha1(point).digest()[-8:]
    return bytes([0x40 | (h[0] & 0x0F)]) + h[1:]


# --- small DER and x509 helpers ----------------------------------------------------------------
def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _der_oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return b"\x06" + _der_len(len(body)) + bytes(body)


_HW_TYPE_DER = _der_oid(HW_TYPE_OID)


def _hardware_module_name(eui: bytes) -> bytes:
    """DER of ``HardwareModuleName ::= SEQUENCE { hwType OID, hwSerialNum OCTET STRING }``."""
    inner = _HW_TYPE_DER + b"\x04" + _der_len(len(eui)) + eui
    return b"\x30" + _der_len(len(inner)) + inner


def _key_usage(*, ds: bool = False, ka: bool = False, ca: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=ds,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=ka,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


_KU_DS = _key_usage(ds=True)
_KU_KA = _key_usage(ka=True)
_KU_CA = _key_usage(ca=True)
_USAGE_KU = {"DS": _KU_DS, "KA": _KU_KA}


def _policies(oid: str) -> x509.CertificatePolicies:
    return x509.CertificatePolicies([x509.PolicyInformation(ObjectIdentifier(oid), None)])


def _aki(key_id: bytes) -> x509.AuthorityKeyIdentifier:
    return x509.AuthorityKeyIdentifier(key_id, None, None)


def _gb_ca_name(ou: str, cn: str) -> x509.Name:
    """CA names as on the real Z1 CA: ``OU=07, CN=Z1`` in that order, PrintableString."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou, _ASN1Type.PrintableString),
            x509.NameAttribute(NameOID.COMMON_NAME, cn, _ASN1Type.PrintableString),
        ]
    )


def _organisation_name(cn: str, role: int, eui: bytes) -> x509.Name:
    """``CN, OU=<role hex>, x500UniqueIdentifier=<EUI-64 BIT STRING>``, UTF8String as real."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn, _ASN1Type.UTF8String),
            x509.NameAttribute(
                NameOID.ORGANIZATIONAL_UNIT_NAME, f"{role:02X}", _ASN1Type.UTF8String
            ),
            # the leading 00 is the BIT STRING unused-bits octet (SPEC.md)
            x509.NameAttribute(NameOID.X500_UNIQUE_IDENTIFIER, b"\x00" + eui, _ASN1Type.BitString),
        ]
    )


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(_CURVE)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_ec_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError("issuing key is not an EC private key")
    return key


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


@dataclass(frozen=True)
class _Issued:
    """A certificate made here, with its key and the manifest facts about it."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    key_id: bytes


def _issue(
    *,
    serial: int,
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: _Issued | None,
    not_before: dt.datetime,
    not_after: dt.datetime,
    extensions: list[tuple[x509.ExtensionType | str, bool]],
) -> _Issued:
    """Build and sign one certificate. ``issuer=None`` self-signs. In ``extensions`` the
    strings ``"SKI"`` and ``"AKI"`` stand for the 8-byte key identifiers, so callers fix the
    order."""
    key_id = key_identifier(key.public_key())
    signer_key = key if issuer is None else issuer.key
    signer_id = key_id if issuer is None else issuer.key_id
    builder = (
        x509.CertificateBuilder()
        .serial_number(serial)
        .issuer_name(subject if issuer is None else issuer.cert.subject)
        .subject_name(subject)
        .public_key(key.public_key())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    for ext, critical in extensions:
        value: x509.ExtensionType
        if ext == "SKI":
            value = x509.SubjectKeyIdentifier(key_id)
        elif ext == "AKI":
            value = _aki(signer_id)
        elif isinstance(ext, str):
            raise ValueError(ext)
        else:
            value = ext
        builder = builder.add_extension(value, critical=critical)
    return _Issued(builder.sign(signer_key, _SHA256), key, key_id)


# --- device certificates (process pool) --------------------------------------------------------
#
# Device certificates are the bulk, so they are not run through CertificateBuilder one by one
# (~120 us each). Instead each worker builds one certificate per usage with CertificateBuilder
# from dummy values, splits its TBSCertificate DER at the four fields that vary (serial, public
# key point, SKI, hwSerialNum: all fixed length, so no DER length changes), and fills the gaps
# for every device; only the ECDSA signature is computed per certificate. The initializer
# checks the template against CertificateBuilder for a second set of values, so the output is
# byte-for-byte what CertificateBuilder would have written.

_ECDSA_SHA256 = ec.ECDSA(_SHA256)
_SIG_ALG_DER = bytes.fromhex("300a06082a8648ce3d040302")  # ecdsa-with-SHA256, no parameters


def _device_builder(
    issuer_subject: x509.Name,
    not_before: dt.datetime,
    usage: str,
    serial: int,
    public_key: ec.EllipticCurvePublicKey,
    eui: bytes,
    issuer_key_id: bytes,
) -> x509.CertificateBuilder:
    """The reference device certificate, extensions in the RTDS order KU! SKI SAN! CP! AKI."""
    san = x509.SubjectAlternativeName(
        [x509.OtherName(ObjectIdentifier(HW_MODULE_NAME_OID), _hardware_module_name(eui))]
    )
    return (
        x509.CertificateBuilder()
        .serial_number(serial)
        .issuer_name(issuer_subject)  # byte-exact copy of the issuer's subject
        .subject_name(x509.Name([]))
        .public_key(public_key)
        .not_valid_before(not_before)
        .not_valid_after(DEVICE_NOT_AFTER)
        .add_extension(_USAGE_KU[usage], critical=True)
        .add_extension(x509.SubjectKeyIdentifier(key_identifier(public_key)), critical=False)
        .add_extension(san, critical=True)
        .add_extension(_policies(DEVICE_POLICY_OID), critical=True)
        .add_extension(_aki(issuer_key_id), critical=False)
    )


def _point(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def _split_template(tbs: bytes, fields: list[bytes]) -> list[bytes]:
    """Cut ``tbs`` around each of ``fields`` (in order, each occurring exactly once)."""
    parts: list[bytes] = []
    pos = 0
    for field in fields:
        if tbs.count(field) != 1:
            raise RuntimeError("device certificate template: field not unique in TBS")
        at = tbs.index(field, pos)
        parts.append(tbs[pos:at])
        pos = at + len(field)
    parts.append(tbs[pos:])
    return parts


def _fill(parts: list[bytes], values: tuple[bytes, ...]) -> bytes:
    out = bytearray(parts[0])
    for value, part in zip(values, parts[1:], strict=True):
        out += value
        out += part
    return bytes(out)


def _pem_from_der(der: bytes) -> bytes:
    b64 = base64.b64encode(der)
    body = b"\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))
    return b"-----BEGIN CERTIFICATE-----\n" + body + b"\n-----END CERTIFICATE-----\n"


@dataclass
class _DeviceIssuer:
    key: ec.EllipticCurvePrivateKey
    seed: int
    templates: dict[str, list[bytes]]  # usage -> TBS pieces around serial, point, SKI, EUI


_DEVICE_ISSUER: _DeviceIssuer | None = None

DeviceMeta = tuple[str, str, str, str]  # serial hex, subject key id hex, EUI-64, usage


def _device_values(
    serial: int, public_key: ec.EllipticCurvePublicKey, eui: bytes
) -> tuple[bytes, bytes, bytes, bytes]:
    point = _point(public_key)
    return serial.to_bytes(16, "big"), point, key_identifier(public_key), eui


def _init_device_worker(
    issuer_key_pem: bytes, issuer_cert_der: bytes, seed: int, not_before_ts: float
) -> None:
    """Pool initializer: load the Issuing DCA key once and build the TBS templates."""
    global _DEVICE_ISSUER
    key = _load_ec_key(issuer_key_pem)
    subject = x509.load_der_x509_certificate(issuer_cert_der).subject
    not_before = dt.datetime.fromtimestamp(not_before_ts, dt.UTC)
    key_id = key_identifier(key.public_key())
    templates: dict[str, list[bytes]] = {}
    samples = [
        (0x5A3C_9669_0FF0_C33C_A55A_1E2D_3C4B_5A69, bytes.fromhex("A55AC33C96690FF0")),
        (0x1234_5678_9ABC_DEF0_0FED_CBA9_8765_4321, bytes.fromhex("00DB12F00DCAFE42")),
    ]
    for usage in _USAGE_KU:
        keys = [_new_key().public_key() for _ in samples]
        tbs = [
            _device_builder(subject, not_before, usage, serial, pub, eui, key_id)
            .sign(key, _SHA256)
            .tbs_certificate_bytes
            for (serial, eui), pub in zip(samples, keys, strict=True)
        ]
        parts = _split_template(tbs[0], list(_device_values(samples[0][0], keys[0], samples[0][1])))
        if _fill(parts, _device_values(samples[1][0], keys[1], samples[1][1])) != tbs[1]:
            raise RuntimeError("device certificate template does not reproduce the builder")
        templates[usage] = parts
    _DEVICE_ISSUER = _DeviceIssuer(key=key, seed=seed, templates=templates)


def _device_chunk(bounds: tuple[int, int]) -> tuple[list[bytes], list[DeviceMeta]]:
    """Make the DS and KA certificates of devices ``start..stop-1`` (PEM, in that order)."""
    st = _DEVICE_ISSUER
    if st is None:
        raise RuntimeError("device worker not initialised")
    pems: list[bytes] = []
    meta: list[DeviceMeta] = []
    sign = st.key.sign
    start, stop = bounds
    for i in range(start, stop):
        eui = device_eui64(st.seed, i)
        eui_text = format_eui64(eui)
        for usage in ("DS", "KA"):
            serial = _serial(st.seed, "device", i, usage)
            values = _device_values(serial, _new_key().public_key(), eui)
            tbs = _fill(st.templates[usage], values)
            sig = sign(tbs, _ECDSA_SHA256)
            body = tbs + _SIG_ALG_DER + b"\x03" + _der_len(len(sig) + 1) + b"\x00" + sig
            pems.append(_pem_from_der(b"\x30" + _der_len(len(body)) + body))
            meta.append((serial_to_hex(serial), values[2].hex().upper(), eui_text, usage))
    return pems, meta


def _chunks(devices: int, workers: int) -> list[tuple[int, int]]:
    # several chunks per worker so progress moves and the pool stays balanced
    size = max(1, min(_MAX_CHUNK, -(-devices // max(1, workers * 4))))
    return [(lo, min(lo + size, devices)) for lo in range(0, devices, size)]


def _run_device_chunks(
    chunks: list[tuple[int, int]], workers: int, initargs: tuple[bytes, bytes, int, float]
) -> Generator[tuple[list[bytes], list[DeviceMeta]], None, None]:
    if workers <= 1 or len(chunks) <= 1:
        _init_device_worker(*initargs)
        for c in chunks:
            yield _device_chunk(c)
        return
    # spawn: safe whatever threads the caller runs (fork would copy their locks)
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=min(workers, len(chunks)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_device_worker,
        initargs=initargs,
    )
    try:
        yield from pool.map(_device_chunk, chunks)
    finally:  # on an error or interrupt, drop the queued chunks instead of finishing them
        pool.shutdown(wait=True, cancel_futures=True)


# --- documents ---------------------------------------------------------------------------------
def _pdf_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def _one_page_pdf(title: str, lines: list[str]) -> bytes:
    """A small, valid one-page PDF (Helvetica text) with a correct cross-reference table."""
    ops = ["BT", "/F1 16 Tf", "72 760 Td", f"({_pdf_escape(title)}) Tj", "/F1 11 Tf"]
    for line in lines:
        ops += ["0 -20 Td", f"({_pdf_escape(line)}) Tj"]
    ops.append("ET")
    stream = "\n".join(ops).encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] "
        b"/Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream",
        b"<< /Title (" + _pdf_escape(title).encode("latin-1") + b") /Producer (smki-repository) >>",
    ]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n".encode() + b"0000000000 65535 f \n"
    for off in offsets:
        out += f"{off:010d} 00000 n \n".encode()
    out += (
        f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R /Info {len(objects)} 0 R >>\n"
        f"startxref\n{xref}\n%%EOF\n"
    ).encode()
    return bytes(out)


def _documents(generated_at: str) -> list[tuple[str, str, bytes]]:
    """(file name, content type, bytes) of the sample SMKI documents."""
    note = f"Test document generated {generated_at} by smki-repository. Not a SEC text."
    return [
        (
            "SMKI-Device-Certificate-Policy.pdf",
            "application/pdf",
            _one_page_pdf(
                "SMKI Device Certificate Policy",
                ["Smart Energy Code Appendix A (test copy).", note],
            ),
        ),
        (
            "SMKI-Organisation-Certificate-Policy.pdf",
            "application/pdf",
            _one_page_pdf(
                "SMKI Organisation Certificate Policy",
                ["Smart Energy Code Appendix B (test copy).", note],
            ),
        ),
        (
            "SMKI-Recovery-Procedure.txt",
            "text/plain; charset=utf-8",
            (
                "Smart Metering Key Infrastructure: SMKI Recovery Procedure (test copy)\n"
                "======================================================================\n\n"
                "1. The DCC notifies Subscribers of the compromise of a Relevant Private Key.\n"
                "2. The Recovery Certificate is used to replace Trust Anchor Cells.\n"
                f"\n{note}\n"
            ).encode(),
        ),
    ]


# --- the generator -----------------------------------------------------------------------------
def _cert_object(
    kind: str,
    path: str,
    issued: _Issued,
    issuer_key_id: bytes,
    *,
    usage: str,
    role: int | None = None,
    eui: bytes | None = None,
    name: str | None = None,
    revoked: bool = False,
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "kind": kind,
        "path": path,
        "serial": serial_to_hex(issued.cert.serial_number),
        "issuer_key_id": issuer_key_id.hex().upper(),
        "subject_key_id": issued.key_id.hex().upper(),
    }
    if eui is not None:
        obj["eui64"] = format_eui64(eui)
    if role is not None:
        obj["role"] = role
    obj["usage"] = usage
    obj["revoked"] = revoked
    if name is not None:
        obj["name"] = name
    return obj


def generate(
    out: Path, params: TestPkiParams, progress: ProgressFn | None = None
) -> dict[str, Any]:
    """Generate a complete test PKI into ``out`` and return its manifest (also written to
    ``out/manifest.json``). Raises FileExistsError if ``out`` already holds a manifest (or
    anything else); the caller decides whether to reuse it. Work happens in a temporary
    sibling directory renamed into place at the end, so ``out`` is complete or absent."""
    out = Path(out)
    if (out / "manifest.json").exists():
        raise FileExistsError(f"{out / 'manifest.json'} already exists")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory")
    if params.devices < 0 or params.organisations < 0:
        raise ValueError("devices and organisations must be >= 0")
    if not 0.0 <= params.revoked_fraction <= 1.0:
        raise ValueError("revoked_fraction must be within [0, 1]")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        manifest = _generate_into(tmp, params, progress or (lambda _s, _d, _t: None))
        tmp.chmod(0o755)
        try:
            if out.exists():
                out.rmdir()  # empty (checked above)
            tmp.rename(out)  # atomic; fails if another run put something there meanwhile
        except OSError as exc:
            raise FileExistsError(f"{out} appeared while generating") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


DEVICE_INDEX = "devices/index.csv"
DEVICE_INDEX_COLUMNS = ("serial", "eui64", "usage", "subject_key_id", "issuer_key_id", "path",
                        "index")


def _devices(
    root: Path,
    params: TestPkiParams,
    seed: int,
    dca: _Issued,
    not_before: dt.datetime,
    progress: ProgressFn,
) -> tuple[int, list[str], float]:
    """Make every device certificate into ``devices/devices-NNNN.pem`` bundles of up to
    BUNDLE_MAX, described one row each in ``devices/index.csv`` (streamed: memory stays
    flat whatever the count); return the certificate count, the bundle paths and the
    seconds taken."""
    total = 2 * params.devices
    progress("devices", 0, total)
    started = time.perf_counter()
    initargs = (_private_pem(dca.key), _der(dca.cert), seed, not_before.timestamp())
    issuer_key_id = dca.key_id.hex().upper()
    bundles: list[str] = []
    bundle: list[bytes] = []
    written = 0

    def flush() -> None:
        if bundle:
            _write(root / bundles[-1], b"".join(bundle))
            bundle.clear()

    chunks = _chunks(params.devices, params.workers)
    results = _run_device_chunks(chunks, params.workers, initargs)
    with contextlib.closing(results), open(root / DEVICE_INDEX, "x", encoding="ascii",
                                           newline="") as index:
        out = csv.writer(index, lineterminator="\n")
        out.writerow(DEVICE_INDEX_COLUMNS)
        for pems, metas in results:
            rows = []
            for pem, (serial_hex, ski_hex, eui_text, usage_name) in zip(pems, metas, strict=True):
                if not bundle:
                    bundles.append(f"devices/devices-{len(bundles) + 1:04d}.pem")
                rows.append((serial_hex, eui_text, usage_name, ski_hex, issuer_key_id,
                             bundles[-1], len(bundle)))
                bundle.append(pem)
                if len(bundle) == BUNDLE_MAX:
                    flush()
            out.writerows(rows)
            written += len(rows)
            progress("devices", written, total)
    flush()
    return written, bundles, time.perf_counter() - started


def device_objects(pki_dir: Path, manifest: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The device certificates of a test PKI, streamed from its ``devices/index.csv``, as
    manifest objects (kind, path, index, serial, issuer_key_id, subject_key_id, eui64,
    usage, revoked)."""
    with open(Path(pki_dir) / manifest["devices"]["index"], encoding="ascii", newline="") as f:
        for row in csv.DictReader(f):
            yield {"kind": "device", "path": row["path"], "index": int(row["index"]),
                   "serial": row["serial"], "issuer_key_id": row["issuer_key_id"],
                   "subject_key_id": row["subject_key_id"], "eui64": row["eui64"],
                   "usage": row["usage"], "revoked": False}


def load_manifest(pki_dir: Path, *, devices: bool = False) -> dict[str, Any]:
    """Read ``manifest.json``; with ``devices``, its ``objects`` also hold every device
    certificate (from the index, in lodging order: after the organisations). Only for
    small PKIs: a national-scale one has millions (use ``device_objects``)."""
    manifest: dict[str, Any] = json.loads((Path(pki_dir) / "manifest.json").read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{pki_dir}/manifest.json: format {manifest.get('format')!r}, this"
                         f" version reads format {MANIFEST_FORMAT} (generate it again)")
    if devices:
        objects = manifest["objects"]
        at = next((i for i, o in enumerate(objects) if o["kind"] in ("crl", "arl", "document")),
                  len(objects))
        manifest["objects"] = [*objects[:at], *device_objects(pki_dir, manifest), *objects[at:]]
    return manifest


def _generate_into(root: Path, params: TestPkiParams, progress: ProgressFn) -> dict[str, Any]:
    started = time.perf_counter()
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    generated_at = now.isoformat().replace("+00:00", "Z")
    yesterday = now - dt.timedelta(days=1)
    ca_until = now + dt.timedelta(days=20 * 365)  # stays UTCTime (< 2050) like the real Z1
    org_until = now + dt.timedelta(days=10 * 365)
    for sub in ("ca", "organisations", "devices", "crl", "documents", "dcc", "tls"):
        (root / sub).mkdir()
    objects: list[dict[str, Any]] = []

    # CAs ------------------------------------------------------------------------------------
    ca_specs = [
        # name, OU, CN, issuer name, kind
        ("root-oca", "00", "TA", None, "root"),
        ("root-dca", "00", "TD", None, "root"),
        ("issuing-oca", "07", "T1", "root-oca", "ca"),
        ("issuing-dca", "07", "TE", "root-dca", "ca"),
        ("retired-oca", "07", "T0", "root-oca", "ca"),
    ]
    progress("ca", 0, len(ca_specs))
    cas: dict[str, _Issued] = {}
    for done, (name, ou, cn, issuer_name, kind) in enumerate(ca_specs, start=1):
        issuer = None if issuer_name is None else cas[issuer_name]
        cas[name] = issued = _issue(
            serial=_serial(seed, "ca", name),
            subject=_gb_ca_name(ou, cn),
            key=_new_key(),
            issuer=issuer,
            not_before=yesterday,
            not_after=ca_until,
            # the real Z1's order; roots carry an AKI equal to their own SKI
            extensions=[
                (_KU_CA, True),
                (x509.BasicConstraints(ca=True, path_length=None if issuer is None else 0), True),
                (_policies(ORGANISATION_POLICY_OID), True),
                ("SKI", False),
                ("AKI", False),
            ],
        )
        _write(root / "ca" / f"{name}.der", _der(issued.cert))
        _write(root / "ca" / f"{name}.pem", _pem(issued.cert))
        # A test PKI's CA keys are kept so that tests can sign new CRLs and certificates.
        _write(root / "ca" / f"{name}.key.pem", _private_pem(issued.key), 0o600)
        objects.append(
            _cert_object(
                kind,
                f"ca/{name}.der",
                issued,
                issued.key_id if issuer is None else issuer.key_id,
                usage="CA",
                role=int(ou, 16),
                name=name,
                revoked=name == "retired-oca",
            )
            | {"pem": f"ca/{name}.pem", "key": f"ca/{name}.key.pem"}
        )
        progress("ca", done, len(ca_specs))
    oca = cas["issuing-oca"]

    # organisations: entity e gets a DS then a KA certificate; roles round-robin by entity --
    m = params.organisations
    progress("organisations", 0, m)
    n_revoked = round(m * params.revoked_fraction)
    if m >= 1 and params.revoked_fraction > 0:
        n_revoked = max(1, n_revoked)
    revoked_idx = set(random.Random(_digest(seed, "revoked")).sample(range(m), min(m, n_revoked)))
    org_objects: list[dict[str, Any]] = []
    org_policies = _policies(ORGANISATION_POLICY_OID)
    for j in range(m):
        entity, usage = divmod(j, 2)
        usage_name = ("DS", "KA")[usage]
        role = ORGANISATION_ROLES[entity % len(ORGANISATION_ROLES)]
        nth = entity // len(ORGANISATION_ROLES) + 1
        cn = f"TEST{_ROLE_SHORT_NAMES[role]}{nth:02d}"
        eui = organisation_eui64(seed, entity)
        issued = _issue(
            serial=_serial(seed, "organisation", j),
            subject=_organisation_name(cn, role, eui),
            key=_new_key(),
            issuer=oca,
            not_before=yesterday,
            not_after=org_until,
            extensions=[  # as the real Z1-issued organisation certificates
                (_USAGE_KU[usage_name], True),
                ("SKI", False),
                (org_policies, True),
                ("AKI", False),
            ],
        )
        serial_hex = serial_to_hex(issued.cert.serial_number)
        _write(root / "organisations" / f"{serial_hex}.der", _der(issued.cert))
        _write(root / "organisations" / f"{serial_hex}.key.pem", _private_pem(issued.key), 0o600)
        obj = _cert_object(
            "organisation",
            f"organisations/{serial_hex}.der",
            issued,
            oca.key_id,
            usage=usage_name,
            role=role,
            eui=eui,
            name=cn,
            revoked=j in revoked_idx,
        )
        obj["key"] = f"organisations/{serial_hex}.key.pem"
        org_objects.append(obj)
        progress("organisations", j + 1, m)
    objects += org_objects

    # devices ----------------------------------------------------------------------------------
    dca = cas["issuing-dca"]
    total_device_certs, bundles, device_seconds = _devices(root, params, seed, dca, yesterday,
                                                           progress)

    # CRL and ARLs ----------------------------------------------------------------------------
    progress("crl", 0, 3)
    this_update = now - dt.timedelta(minutes=1)
    revoked_at = now - dt.timedelta(hours=1)

    def crl(
        issuer: _Issued,
        next_update: dt.datetime,
        entries: list[tuple[int, x509.ReasonFlags]],
    ) -> bytes:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.cert.subject)
            .last_update(this_update)
            .next_update(next_update)
            .add_extension(_aki(issuer.key_id), critical=False)
            .add_extension(x509.CRLNumber(1), critical=False)
        )
        for serial, reason in entries:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(revoked_at)
                .add_extension(x509.CRLReason(reason), critical=False)
                .build()
            )
        return builder.sign(issuer.key, _SHA256).public_bytes(serialization.Encoding.DER)

    reasons = (x509.ReasonFlags.key_compromise, x509.ReasonFlags.superseded)
    org_entries = [
        (int(obj["serial"], 16), reasons[k % 2])
        for k, obj in enumerate(o for o in org_objects if o["revoked"])
    ]
    crl_specs = [
        ("crl", "crl/issuing-oca.crl", oca, dt.timedelta(days=7), org_entries),
        (
            "arl",
            "crl/root-oca.arl",
            cas["root-oca"],
            dt.timedelta(days=30),
            [(cas["retired-oca"].cert.serial_number, x509.ReasonFlags.ca_compromise)],
        ),
        ("arl", "crl/root-dca.arl", cas["root-dca"], dt.timedelta(days=30), []),
    ]
    for k, (kind, path, issuer, validity, entries) in enumerate(crl_specs, start=1):
        _write(root / path, crl(issuer, now + validity, entries))
        objects.append(
            {
                "kind": kind,
                "path": path,
                "issuer_key_id": issuer.key_id.hex().upper(),
                "crl_number": 1,
            }
        )
        progress("crl", k, len(crl_specs))

    # documents -------------------------------------------------------------------------------
    docs = _documents(generated_at)
    progress("documents", 0, len(docs))
    for k, (file_name, content_type, body) in enumerate(docs, start=1):
        _write(root / "documents" / file_name, body)
        objects.append(
            {
                "kind": "document",
                "path": f"documents/{file_name}",
                "name": file_name.rsplit(".", 1)[0],
                "content_type": content_type,
            }
        )
        progress("documents", k, len(docs))

    # DCC lodging client and server TLS -------------------------------------------------------
    progress("tls", 0, 2)
    dcc_client = _client_pki(root, seed, yesterday, now + dt.timedelta(days=10 * 365))
    progress("tls", 1, 2)
    tls = _server_tls(root, seed, yesterday, now + dt.timedelta(days=10 * 365))
    progress("tls", 2, 2)

    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "generated_at": generated_at,
        "params": {**asdict(params), "seed": seed},
        "counts": {
            "cas": len(cas),
            "organisations": m,
            "devices": params.devices,
            "device_certificates": total_device_certs,
            "device_bundles": len(bundles),
            "revoked_organisations": len(org_entries),
        },
        "timings": {
            "devices_seconds": round(device_seconds, 3),
            "device_certificates_per_second": (
                round(total_device_certs / device_seconds) if device_seconds > 0 else None
            ),
            "total_seconds": round(time.perf_counter() - started, 3),
        },
        "dcc_client": dcc_client,
        "tls": tls,
        "objects": objects,
        "devices": {"index": DEVICE_INDEX, "bundles": bundles},
    }
    progress("manifest", 0, 1)
    with open(root / "manifest.json", "x", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    progress("manifest", 1, 1)
    return manifest


def _simple_ca(
    seed: int, tag: str, cn: str, not_before: dt.datetime, not_after: dt.datetime
) -> _Issued:
    return _issue(
        serial=_serial(seed, tag, "ca"),
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]),
        key=_new_key(),
        issuer=None,
        not_before=not_before,
        not_after=not_after,
        extensions=[
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (_KU_CA, True),
            ("SKI", False),
            ("AKI", False),
        ],
    )


def _leaf(
    seed: int,
    tag: str,
    subject: x509.Name,
    issuer: _Issued,
    not_before: dt.datetime,
    not_after: dt.datetime,
    eku: ObjectIdentifier,
    san: x509.SubjectAlternativeName | None = None,
) -> _Issued:
    extensions: list[tuple[x509.ExtensionType | str, bool]] = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (_KU_DS, True),
        (x509.ExtendedKeyUsage([eku]), False),
    ]
    if san is not None:
        extensions.append((san, False))
    extensions += [("SKI", False), ("AKI", False)]
    return _issue(
        serial=_serial(seed, tag),
        subject=subject,
        key=_new_key(),
        issuer=issuer,
        not_before=not_before,
        not_after=not_after,
        extensions=extensions,
    )


def _client_pki(
    root: Path, seed: int, not_before: dt.datetime, not_after: dt.datetime
) -> dict[str, str]:
    ca = _simple_ca(seed, "dcc-client", "DCC Lodging Client CA", not_before, not_after)
    _write(root / "dcc" / "client-ca.der", _der(ca.cert))
    _write(root / "dcc" / "client-ca.pem", _pem(ca.cert))
    _write(root / "dcc" / "client-ca.key.pem", _private_pem(ca.key), 0o600)

    def client(tag: str, cn: str) -> _Issued:
        subject = x509.Name(
            [
                # DER order O, OU, CN: RFC 4514 "CN=...,OU=DCC,O=Smart DCC Ltd"
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Smart DCC Ltd"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "DCC"),
                x509.NameAttribute(NameOID.COMMON_NAME, cn),
            ]
        )
        issued = _leaf(
            seed, tag, subject, ca, not_before, not_after, ExtendedKeyUsageOID.CLIENT_AUTH
        )
        _write(root / "dcc" / f"{tag}.pem", _pem(issued.cert))
        _write(root / "dcc" / f"{tag}.key.pem", _private_pem(issued.key), 0o600)
        return issued

    right = client("client", "DCC SMKI Lodging Client")
    wrong = client("other-client", "Not The DCC")
    return {
        "cert": "dcc/client.pem",
        "key": "dcc/client.key.pem",
        "ca": "dcc/client-ca.pem",
        "ca_der": "dcc/client-ca.der",
        "ca_key": "dcc/client-ca.key.pem",
        "subject": right.cert.subject.rfc4514_string(),
        "other_cert": "dcc/other-client.pem",
        "other_key": "dcc/other-client.key.pem",
        "other_subject": wrong.cert.subject.rfc4514_string(),
    }


def _server_tls(
    root: Path, seed: int, not_before: dt.datetime, not_after: dt.datetime
) -> dict[str, str]:
    ca = _simple_ca(seed, "tls", "SMKI Repository TLS CA", not_before, not_after)
    _write(root / "tls" / "ca.pem", _pem(ca.cert))
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
    )
    server = _leaf(
        seed,
        "tls-server",
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]),
        ca,
        not_before,
        not_after,
        ExtendedKeyUsageOID.SERVER_AUTH,
        san,
    )
    _write(root / "tls" / "server.pem", _pem(server.cert))
    _write(root / "tls" / "server.key.pem", _private_pem(server.key), 0o600)
    return {"cert": "tls/server.pem", "key": "tls/server.key.pem", "ca": "tls/ca.pem"}
