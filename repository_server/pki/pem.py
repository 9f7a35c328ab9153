"""Unwrapping lodged input: one DER object or several concatenated, or PEM blocks (a
bundle, text between blocks, CRLF), into the DER of each certificate or the one CRL. Only
the container is checked here; `parse_certificate` and `parse_crl` parse each blob.
"""

from __future__ import annotations

import binascii
import re

from repository_server.pki.der import TlvError, read_tlv
from repository_server.pki.errors import ParseError, der_error, one_line
from repository_server.pki.structure import SEQUENCE, expect

__all__ = ["load_pem_or_der_certificates", "load_pem_or_der_crl"]

_PEM_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9 ]{0,40})-----")
_CERT_LABELS = {b"CERTIFICATE", b"X509 CERTIFICATE", b"TRUSTED CERTIFICATE"}
_CRL_LABELS = {b"X509 CRL", b"CRL"}
_PEM_WHITESPACE = b" \t\r\n\v\f"


def _pem_blocks(data: bytes, labels: set[bytes], what: str) -> list[bytes]:
    """DER of each PEM block in order (text between blocks ignored); blocks numbered from 1."""
    out: list[bytes] = []
    pos = 0
    index = 0
    begin = _PEM_BEGIN.search
    while (m := begin(data, pos)) is not None:
        index += 1
        label = m.group(1)
        end_line = b"-----END " + label + b"-----"
        end = data.find(end_line, m.end())
        next_begin = data.find(b"-----BEGIN", m.end())
        if end < 0 or 0 <= next_begin < end:
            raise ParseError(f"PEM block {index}: no '-----END {label.decode()}-----' line")
        if label not in labels:
            raise ParseError(f"PEM block {index}: '{label.decode()}' is not a {what}")
        body = data[m.end() : end].translate(None, _PEM_WHITESPACE)
        if not body:
            raise ParseError(f"PEM block {index}: empty {what} block")
        try:
            blob = binascii.a2b_base64(body, strict_mode=True)
        except (binascii.Error, ValueError) as exc:
            raise ParseError(f"PEM block {index}: bad base64 ({one_line(exc)})") from exc
        try:
            first = expect(read_tlv(blob, 0, len(blob)), SEQUENCE, what)
        except ParseError as exc:
            raise ParseError(f"PEM block {index}: not a DER {what}: {exc}") from exc
        except TlvError as exc:
            raise ParseError(f"PEM block {index}: not a DER {what}: {der_error(exc)}") from exc
        if first[3] != len(blob):
            if label != b"TRUSTED CERTIFICATE":  # OpenSSL appends trust settings
                raise ParseError(f"PEM block {index}: trailing bytes after the DER {what}")
            blob = blob[: first[3]]
        out.append(blob)
        pos = end + len(end_line)
    if data.find(b"-----END", pos) >= 0:
        raise ParseError(f"PEM: '-----END' line after block {index} without a BEGIN")
    return out


def _der_sequence(data: bytes) -> list[bytes] | None:
    """Split concatenated DER SEQUENCEs; None if `data` is not entirely such TLVs."""
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        try:
            item = read_tlv(data, pos, len(data))
        except TlvError:
            return None
        if item[0] != SEQUENCE:
            return None
        out.append(data[pos : item[3]])
        pos = item[3]
    return out


def load_pem_or_der_certificates(data: bytes) -> list[bytes]:
    """The DER certificates in `data`, in order: one DER certificate (or several concatenated),
    one PEM certificate, or a PEM bundle (text between blocks and CRLF allowed; labels
    CERTIFICATE, X509 CERTIFICATE, TRUSTED CERTIFICATE). Only the container is checked here;
    `parse_certificate` parses each blob. Raises `ParseError` naming the block (from 1)."""
    data = bytes(data)
    if not data.strip():
        raise ParseError("empty input: no certificate")
    if data[0] == SEQUENCE:
        blobs = _der_sequence(data)
        if blobs is not None:
            return blobs
    if b"-----BEGIN" not in data:
        if data[0] == SEQUENCE:
            raise ParseError("input is not well-formed DER and has no PEM block")
        raise ParseError("input is neither DER (a SEQUENCE) nor PEM (no -----BEGIN line)")
    blobs = _pem_blocks(data, _CERT_LABELS, "certificate")
    if not blobs:
        raise ParseError("no PEM certificate block found")
    return blobs


def load_pem_or_der_crl(data: bytes) -> bytes:
    """One CRL as DER, from DER or a PEM `X509 CRL` block. Raises `ParseError`."""
    data = bytes(data)
    if not data.strip():
        raise ParseError("empty input: no CRL")
    if data[0] == SEQUENCE:
        blobs = _der_sequence(data)
        if blobs is not None:
            if len(blobs) != 1:
                raise ParseError(f"expected one DER CRL, found {len(blobs)} DER objects")
            return blobs[0]
    if b"-----BEGIN" not in data:
        raise ParseError("input is neither DER (a SEQUENCE) nor PEM (no -----BEGIN line)")
    blobs = _pem_blocks(data, _CRL_LABELS, "CRL")
    if len(blobs) != 1:
        raise ParseError(f"expected one PEM X509 CRL block, found {len(blobs)}")
    return blobs[0]
