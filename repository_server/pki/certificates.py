"""Certificates: `parse_certificate` turns one DER certificate into a `CertInfo` (canonical
serial, issuer and subject Name DER sliced byte-exact from the TBS, key identifiers, device
or organisation EUI-64, remote party role, kind) with the GB-profile findings of `pki.lint`.
Input that is not a parseable certificate raises `ParseError` (one line) and nothing else
escapes.
"""

from __future__ import annotations

import hashlib
import warnings
from datetime import UTC, datetime

from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtensionOID

from repository_server.pki.der import TlvError
from repository_server.pki.errors import ParseError, der_error, one_line
from repository_server.pki.ids import serial_to_hex
from repository_server.pki.lint import (
    Findings,
    ext_map,
    get_ext,
    lint_key_ids,
    lint_serial,
    lint_signature_alg,
    lint_spki,
    lint_string_types,
    read_hw_module_name,
    read_key_usage,
    read_org_eui,
    read_role,
)
from repository_server.pki.model import CertInfo, CertKind, Usage
from repository_server.pki.names import cached_name
from repository_server.pki.oids import OID_OU, OID_UNIQUE_ID
from repository_server.pki.signatures import remember_signed, verify_signed
from repository_server.pki.structure import CertLayout, strip_ecdsa_null

__all__ = ["parse_certificate"]

_DEVICE_NOT_AFTER = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


def _load_certificate(der: bytes, layout: CertLayout) -> tuple[x509.Certificate, bool]:
    """`cryptography`'s view of the certificate, and whether a NULL had to be stripped."""
    if layout.serial <= 0:  # cryptography warns (a future release will refuse): lint instead
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            return _load_certificate_now(der, layout)
    return _load_certificate_now(der, layout)


def _load_certificate_now(der: bytes, layout: CertLayout) -> tuple[x509.Certificate, bool]:
    try:
        return x509.load_der_x509_certificate(der), False
    except ValueError as exc:
        fixed = strip_ecdsa_null(der, layout.signed, layout.tbs_alg_index)
        if fixed is None:
            raise ParseError(f"not a parseable certificate: {one_line(exc)}") from exc
        try:
            return x509.load_der_x509_certificate(fixed), True
        except ValueError:
            raise ParseError(f"not a parseable certificate: {one_line(exc)}") from exc


def parse_certificate(der: bytes) -> CertInfo:
    """Parse one DER certificate into a `CertInfo` with GB-profile lint findings.

    Raises `ParseError` (one-line message) if `der` is not a parseable X.509 certificate;
    profile deviations are findings, never errors."""
    try:
        return _parse_certificate(bytes(der))
    except ParseError:
        raise
    except TlvError as exc:
        raise der_error(exc) from exc
    except Exception as exc:  # any other failure inside cryptography or the walker
        raise ParseError(
            f"not a parseable certificate: {type(exc).__name__}: {one_line(exc)}"
        ) from exc


def _parse_certificate(der: bytes) -> CertInfo:
    layout = CertLayout(der)
    remember_signed(der, layout.signed)
    cert, null_stripped = _load_certificate(der, layout)
    f = Findings()

    if layout.version != 3:
        f.add("version-not-v3", f"certificate is version {layout.version}, not 3")
    lint_serial(f, layout.serial, layout.serial_len)
    lint_signature_alg(f, layout.signed.alg, layout.tbs_alg, null_stripped)
    lint_spki(f, layout.spki)

    issuer_attrs, issuer_name = cached_name(layout.issuer, cert, "issuer")
    subject_attrs, subject_name = cached_name(layout.subject, cert, "subject")
    lint_string_types(f, issuer_attrs, subject_attrs)

    self_signed = layout.issuer == layout.subject and verify_signed(layout.signed, layout.spki)

    all_exts = cert.extensions
    exts = ext_map(all_exts)
    for ext in all_exts:
        if ext.critical and isinstance(ext.value, x509.UnrecognizedExtension):
            f.add("unknown-critical-extension", f"unrecognised critical extension {ext.oid}")
    issuer_key_id, subject_key_id = lint_key_ids(f, exts, self_signed)
    flags, usage = read_key_usage(f, exts)

    policies: tuple[str, ...] = ()
    cp = get_ext(exts, ExtensionOID.CERTIFICATE_POLICIES)
    if cp is None:
        f.add("policies-missing", "no certificatePolicies extension")
    else:
        assert isinstance(cp.value, x509.CertificatePolicies)
        policies = tuple(p.policy_identifier.dotted_string for p in cp.value)
        if not cp.critical:
            f.add("policies-not-critical", "certificatePolicies is not marked critical")

    bc = get_ext(exts, ExtensionOID.BASIC_CONSTRAINTS)
    is_ca = False
    if bc is not None:
        assert isinstance(bc.value, x509.BasicConstraints)
        is_ca = bc.value.ca
    has_hw, hw_eui, san_critical = read_hw_module_name(f, exts)
    has_uid = any(oid == OID_UNIQUE_ID for oid, _t, _c in subject_attrs)
    has_ou = any(oid == OID_OU for oid, _t, _c in subject_attrs)

    if is_ca or "key_cert_sign" in flags:
        kind = CertKind.ROOT if self_signed else CertKind.CA
    elif has_hw:
        kind = CertKind.DEVICE
    elif has_uid or has_ou:
        kind = CertKind.ORGANISATION
    else:
        kind = CertKind.OTHER

    lint_org = kind is CertKind.ORGANISATION
    role = read_role(f, subject_attrs, lint_org)
    has_uid, org_eui = read_org_eui(f, subject_attrs, lint_org)
    eui64 = hw_eui if has_hw else org_eui

    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    if not_after < not_before:
        f.add("validity-inverted", "notAfter is before notBefore")

    if kind is CertKind.DEVICE:
        if subject_attrs:
            f.add("device-subject-not-empty", f"device certificate subject is {subject_name!r}")
        if not_after != _DEVICE_NOT_AFTER:
            f.add(
                "device-not-after",
                f"device notAfter is {not_after:%Y-%m-%d %H:%M:%S}, not 9999-12-31 23:59:59",
            )
        if not san_critical:
            f.add("device-san-not-critical", "device subjectAltName is not marked critical")
        if usage not in (Usage.DS, Usage.KA):
            f.add("device-key-usage", "device keyUsage is not exactly one of DS or KA")
    elif kind is CertKind.ORGANISATION:
        if not has_ou:
            f.add("org-ou-missing", "organisation certificate subject has no OU (role)")
        if not has_uid:
            f.add("org-uid-missing", "organisation certificate has no x500UniqueIdentifier")
        if usage not in (Usage.DS, Usage.KA):
            f.add("org-key-usage", "organisation keyUsage is not exactly one of DS or KA")
    elif kind in (CertKind.CA, CertKind.ROOT):
        if not is_ca:
            f.add("ca-basic-constraints", "keyCertSign without basicConstraints cA=TRUE")
        elif bc is not None and not bc.critical:
            f.add("ca-basic-constraints-not-critical", "basicConstraints is not critical")
        if not {"key_cert_sign", "crl_sign"} <= flags:
            f.add("ca-key-usage", "CA keyUsage lacks keyCertSign or cRLSign")
    else:
        f.add(
            "not-gb-profile",
            "not a GB SMKI CA, device or organisation certificate "
            "(no cA flag, hardwareModuleName, OU role or x500UniqueIdentifier)",
        )

    return CertInfo(
        der=der,
        serial=serial_to_hex(layout.serial),
        issuer_dn=layout.issuer,
        issuer_name=issuer_name,
        subject_dn=layout.subject,
        subject_name=subject_name,
        issuer_key_id=issuer_key_id,
        subject_key_id=subject_key_id,
        eui64=eui64,
        role=role,
        usage=usage,
        kind=kind,
        not_before=not_before,
        not_after=not_after,
        sha256=hashlib.sha256(der).digest(),
        sha1=hashlib.sha1(der).digest(),
        self_signed=self_signed,
        public_key_der=layout.spki,
        policies=policies,
        findings=tuple(f.items),
    )

