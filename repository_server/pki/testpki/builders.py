"""Certificate building blocks in the GB SMKI profile, as on the real ZAZ1 / RTDS
certificates: the profile's OIDs, key usages, policies, CA and organisation names, the
device certificate builder (extension order and criticality as RTDS), and `issue`, which
signs one certificate with 8-byte key identifiers in the order the caller gives.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID, ObjectIdentifier

from repository_server.pki.der import encode_length, encode_oid
from repository_server.pki.testpki.identifiers import key_identifier

__all__ = [
    "DEVICE_NOT_AFTER",
    "DEVICE_POLICY_OID",
    "HW_MODULE_NAME_OID",
    "HW_TYPE_OID",
    "KU_CA",
    "KU_DS",
    "ORGANISATION_POLICY_OID",
    "SHA256",
    "USAGE_KU",
    "Issued",
    "aki",
    "cert_der",
    "cert_pem",
    "device_builder",
    "gb_ca_name",
    "issue",
    "load_ec_key",
    "new_key",
    "organisation_name",
    "policies",
    "private_pem",
    "write_new",
]

# --- profile constants (values as in shared/realdata) --------------------------------------
ORGANISATION_POLICY_OID = "1.2.826.0.1.8641679.1.2.1.4"  # ZAZ1 CA and organisation certs
DEVICE_POLICY_OID = "1.2.826.0.1.1800000.1.2.1.4"  # RTDS device certs
HW_TYPE_OID = "1.2.826.0.1.8641679.1.2.2.1"  # RTDS device hardwareModuleName hwType
HW_MODULE_NAME_OID = "1.3.6.1.5.5.7.8.4"  # RFC 4108 id-on-hardwareModuleName
DEVICE_NOT_AFTER = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)

SHA256 = hashes.SHA256()
_CURVE = ec.SECP256R1()


_HW_TYPE_DER = encode_oid(HW_TYPE_OID)


def _hardware_module_name(eui: bytes) -> bytes:
    """DER of ``HardwareModuleName ::= SEQUENCE { hwType OID, hwSerialNum OCTET STRING }``."""
    inner = _HW_TYPE_DER + b"\x04" + encode_length(len(eui)) + eui
    return b"\x30" + encode_length(len(inner)) + inner


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


KU_DS = _key_usage(ds=True)
_KU_KA = _key_usage(ka=True)
KU_CA = _key_usage(ca=True)
USAGE_KU = {"DS": KU_DS, "KA": _KU_KA}


def policies(oid: str) -> x509.CertificatePolicies:
    return x509.CertificatePolicies([x509.PolicyInformation(ObjectIdentifier(oid), None)])


def aki(key_id: bytes) -> x509.AuthorityKeyIdentifier:
    return x509.AuthorityKeyIdentifier(key_id, None, None)


def gb_ca_name(ou: str, cn: str) -> x509.Name:
    """CA names as on the real Z1 CA: ``OU=07, CN=Z1`` in that order, PrintableString."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou, _ASN1Type.PrintableString),
            x509.NameAttribute(NameOID.COMMON_NAME, cn, _ASN1Type.PrintableString),
        ]
    )


def organisation_name(cn: str, role: int, eui: bytes) -> x509.Name:
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


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(_CURVE)


def private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_ec_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError("issuing key is not an EC private key")
    return key


def cert_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_new(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


@dataclass(frozen=True)
class Issued:
    """A certificate made here, with its key and the manifest facts about it."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    key_id: bytes


def issue(
    *,
    serial: int,
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: Issued | None,
    not_before: dt.datetime,
    not_after: dt.datetime,
    extensions: list[tuple[x509.ExtensionType | str, bool]],
) -> Issued:
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
            value = aki(signer_id)
        elif isinstance(ext, str):
            raise ValueError(ext)
        else:
            value = ext
        builder = builder.add_extension(value, critical=critical)
    return Issued(builder.sign(signer_key, SHA256), key, key_id)


def device_builder(
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
        .add_extension(USAGE_KU[usage], critical=True)
        .add_extension(x509.SubjectKeyIdentifier(key_identifier(public_key)), critical=False)
        .add_extension(san, critical=True)
        .add_extension(policies(DEVICE_POLICY_OID), critical=True)
        .add_extension(aki(issuer_key_id), critical=False)
    )
