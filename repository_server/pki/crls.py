"""CRLs and ARLs: `parse_crl` turns one DER CertificateList into a `CrlInfo` (issuer Name
DER as stored, authority key identifier, CRL number, revoked serials with reasons) with the
GB-profile findings. Input that is not a parseable CRL raises `ParseError` (one line).
"""

from __future__ import annotations

import hashlib
import warnings

from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtensionOID

from repository_server.pki.der import TlvError
from repository_server.pki.errors import ParseError, der_error, one_line
from repository_server.pki.ids import serial_to_hex
from repository_server.pki.lint import Findings, ext_map, get_ext, lint_signature_alg
from repository_server.pki.model import CrlInfo, RevokedEntry
from repository_server.pki.names import render_name
from repository_server.pki.structure import INTEGER, CrlLayout, name_attributes, strip_ecdsa_null

__all__ = ["parse_crl"]


def parse_crl(der: bytes) -> CrlInfo:
    """Parse one DER CRL (or ARL). Raises `ParseError` if it is not a parseable CRL."""
    try:
        with warnings.catch_warnings():  # non-positive revoked serials: cryptography warns
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            return _parse_crl(bytes(der))
    except ParseError:
        raise
    except TlvError as exc:
        raise der_error(exc) from exc
    except Exception as exc:
        raise ParseError(f"not a parseable CRL: {type(exc).__name__}: {one_line(exc)}") from exc


def _parse_crl(der: bytes) -> CrlInfo:
    layout = CrlLayout(der)
    null_stripped = False
    try:
        crl = x509.load_der_x509_crl(der)
    except ValueError as exc:
        fixed = strip_ecdsa_null(der, layout.signed, layout.tbs_alg_index)
        if fixed is None:
            raise ParseError(f"not a parseable CRL: {one_line(exc)}") from exc
        try:
            crl = x509.load_der_x509_crl(fixed)
        except ValueError:
            raise ParseError(f"not a parseable CRL: {one_line(exc)}") from exc
        null_stripped = True

    f = Findings()
    lint_signature_alg(f, layout.signed.alg, layout.tbs_alg, null_stripped)
    if not layout.signed.tbs_items or layout.signed.tbs_items[0][0] != INTEGER:
        f.add("crl-version", "CRL is version 1 (no version field), not 2")
    issuer_attrs = name_attributes(layout.issuer)
    exts = ext_map(crl.extensions)

    aki = get_ext(exts, ExtensionOID.AUTHORITY_KEY_IDENTIFIER)
    issuer_key_id: bytes | None = None
    if aki is None:
        f.add("aki-missing", "no authorityKeyIdentifier extension")
    else:
        assert isinstance(aki.value, x509.AuthorityKeyIdentifier)
        issuer_key_id = aki.value.key_identifier
        if issuer_key_id is None:
            f.add("aki-key-id-missing", "authorityKeyIdentifier has no keyIdentifier")
        elif len(issuer_key_id) != 8:
            f.add("aki-length", f"authority key identifier is {len(issuer_key_id)} bytes, not 8")

    number = get_ext(exts, ExtensionOID.CRL_NUMBER)
    crl_number: int | None = None
    if number is None:
        f.add("crl-number-missing", "no cRLNumber extension")
    else:
        assert isinstance(number.value, x509.CRLNumber)
        crl_number = number.value.crl_number
    for ext in exts.values():
        if ext.critical and isinstance(ext.value, x509.UnrecognizedExtension):
            f.add("unknown-critical-extension", f"unrecognised critical extension {ext.oid}")

    this_update = crl.last_update_utc
    next_update = crl.next_update_utc
    if next_update is None:
        f.add("next-update-missing", "no nextUpdate")
    elif next_update < this_update:
        f.add("next-update-before-this-update", "nextUpdate is before thisUpdate")

    revoked: list[RevokedEntry] = []
    seen: set[str] = set()
    duplicates = 0
    for entry in crl:
        serial = serial_to_hex(entry.serial_number)
        if serial in seen:
            duplicates += 1
        seen.add(serial)
        reason: str | None = None
        try:
            reason_ext = entry.extensions.get_extension_for_class(x509.CRLReason)
        except x509.ExtensionNotFound:
            pass
        else:
            reason = reason_ext.value.reason.value
        revoked.append(RevokedEntry(serial, entry.revocation_date_utc, reason))
    if duplicates:
        f.add("crl-duplicate-serial", f"{duplicates} revoked serials are listed more than once")

    return CrlInfo(
        der=der,
        issuer_dn=layout.issuer,
        issuer_name=render_name(crl.issuer, issuer_attrs),
        issuer_key_id=issuer_key_id,
        crl_number=crl_number,
        this_update=this_update,
        next_update=next_update,
        sha256=hashlib.sha256(der).digest(),
        revoked=tuple(revoked),
        findings=tuple(f.items),
    )

