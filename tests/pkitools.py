"""Certificate and CRL builders for tests (cryptography only)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = dt.datetime.now(dt.UTC)


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def load_cert(path: Path) -> x509.Certificate:
    data = path.read_bytes()
    if data.startswith(b"-----"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def aki_for(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """AKI matching the issuer's own SKI (GB key ids are 8 bytes, not SHA-1's 20)."""
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]


def self_signed_ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def client_cert(subject: x509.Name, issuer: x509.Certificate | None,
                issuer_key: ec.EllipticCurvePrivateKey | None, *, expired: bool = False,
                ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    if expired:
        nb, na = NOW - dt.timedelta(days=30), NOW - dt.timedelta(days=1)
    else:
        nb, na = NOW - dt.timedelta(days=1), NOW + dt.timedelta(days=30)
    builder = (
        x509.CertificateBuilder().subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(nb).not_valid_after(na)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(aki_for(issuer), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256()), key


def write_pair(directory: Path, tag: str, cert: x509.Certificate,
               key: ec.EllipticCurvePrivateKey) -> tuple[str, str]:
    c, k = directory / f"{tag}.pem", directory / f"{tag}.key.pem"
    c.write_bytes(pem(cert))
    k.write_bytes(key_pem(key))
    return str(c), str(k)


def crl(issuer: x509.Certificate, key: ec.EllipticCurvePrivateKey, number: int | None,
        revoked: list[int] = (), *, this_update: dt.datetime | None = None,  # type: ignore[assignment]
        next_update: dt.timedelta = dt.timedelta(days=7)) -> bytes:
    this = this_update or (NOW - dt.timedelta(minutes=1))
    builder = (
        x509.CertificateRevocationListBuilder().issuer_name(issuer.subject)
        .last_update(this).next_update(this + next_update)
        .add_extension(aki_for(issuer), critical=False)
    )
    if number is not None:
        builder = builder.add_extension(x509.CRLNumber(number), critical=False)
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial)
            .revocation_date(NOW - dt.timedelta(hours=1))
            .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False)
            .build())
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def tamper(der: bytes) -> bytes:
    """Flip one bit in the last byte (inside the signature value)."""
    return der[:-1] + bytes([der[-1] ^ 0x01])
