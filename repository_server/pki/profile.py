"""Turning lodged bytes into `pki.model` records: this module owns unwrapping PEM/DER input,
parsing certificates and CRLs with `cryptography`, extracting what the repository indexes
(canonical serial, issuer/subject Name DER sliced byte-exact from the TBS, key identifiers,
device or organisation EUI-64, remote party role), linting against the GB SMKI profile of
SPEC.md (deviations are `Finding`s, never errors, because real certificates bend the profile
and must still be stored) and checking signatures over the original TBS bytes; input that is
not a parseable certificate or CRL raises `ParseError` (one line) and nothing else escapes.
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import re
import warnings
from collections.abc import Iterable
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtensionOID

from repository_server.pki.ids import serial_to_hex
from repository_server.pki.model import (
    CertInfo,
    CertKind,
    CrlInfo,
    Finding,
    RevokedEntry,
    Usage,
)

__all__ = [
    "KNOWN_ROLES",
    "ParseError",
    "load_pem_or_der_certificates",
    "load_pem_or_der_crl",
    "parse_certificate",
    "parse_crl",
    "verify_crl_signature",
    "verify_signature",
]


class ParseError(ValueError):
    """The input is not a parseable certificate or CRL (or PEM/DER container of one)."""


# --------------------------------------------------------------------------- constants

#: Remote party roles of SPEC.md ("GB certificate profile"), decimal.
KNOWN_ROLES: dict[int, str] = {
    0: "root",
    1: "recovery",
    2: "supplier",
    3: "network operator",
    4: "access control broker",
    5: "transitional CoS",
    6: "WAN provider",
    7: "issuing authority",
    8: "load controller",
    127: "other",
    135: "XML signing",
    137: "DSP XML signing",
}

_OID_HW_MODULE_NAME = "1.3.6.1.5.5.7.8.4"
_OID_UNIQUE_ID = "2.5.4.45"
_OID_OU = "2.5.4.11"
_OID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
_OID_P256 = "1.2.840.10045.3.1.7"
_OID_ECDSA_SHA256 = "1.2.840.10045.4.3.2"
_OID_RSA_PSS = "1.2.840.113549.1.1.10"
_OID_MGF1 = "1.2.840.113549.1.1.8"
_OID_ED25519 = "1.3.101.112"
_OID_ED448 = "1.3.101.113"
_OID_RSA = "1.2.840.113549.1.1.1"

_ECDSA_HASH: dict[str, hashes.HashAlgorithm] = {
    "1.2.840.10045.4.1": hashes.SHA1(),
    "1.2.840.10045.4.3.1": hashes.SHA224(),
    "1.2.840.10045.4.3.2": hashes.SHA256(),
    "1.2.840.10045.4.3.3": hashes.SHA384(),
    "1.2.840.10045.4.3.4": hashes.SHA512(),
}
_RSA_PKCS1_HASH: dict[str, hashes.HashAlgorithm] = {
    "1.2.840.113549.1.1.5": hashes.SHA1(),
    "1.2.840.113549.1.1.14": hashes.SHA224(),
    "1.2.840.113549.1.1.11": hashes.SHA256(),
    "1.2.840.113549.1.1.12": hashes.SHA384(),
    "1.2.840.113549.1.1.13": hashes.SHA512(),
}
_DIGEST_HASH: dict[str, hashes.HashAlgorithm] = {
    "1.3.14.3.2.26": hashes.SHA1(),
    "2.16.840.1.101.3.4.2.4": hashes.SHA224(),
    "2.16.840.1.101.3.4.2.1": hashes.SHA256(),
    "2.16.840.1.101.3.4.2.2": hashes.SHA384(),
    "2.16.840.1.101.3.4.2.3": hashes.SHA512(),
}
_ALG_NAMES = {
    "1.2.840.10045.4.3.2": "ecdsa-with-SHA256",
    "1.2.840.10045.4.3.3": "ecdsa-with-SHA384",
    "1.2.840.10045.4.3.4": "ecdsa-with-SHA512",
    "1.2.840.113549.1.1.11": "sha256WithRSAEncryption",
    "1.2.840.113549.1.1.5": "sha1WithRSAEncryption",
    _OID_RSA_PSS: "RSASSA-PSS",
    _OID_RSA: "rsaEncryption",
    _OID_EC_PUBLIC_KEY: "id-ecPublicKey",
    _OID_ED25519: "Ed25519",
    _OID_ED448: "Ed448",
}

# DER tags used below (first identifier octet).
_INTEGER, _BIT_STRING, _OCTET_STRING, _OID = 0x02, 0x03, 0x04, 0x06
_SEQUENCE, _SET, _CTX0 = 0x30, 0x31, 0xA0
_STRING_TAGS = {
    0x0C: "UTF8String",
    0x13: "PrintableString",
    0x14: "TeletexString",
    0x16: "IA5String",
    0x1C: "UniversalString",
    0x1E: "BMPString",
}
_DEVICE_NOT_AFTER = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
_TWO_HEX = re.compile(r"[0-9A-Fa-f]{2}")
_DECIMAL = re.compile(r"[0-9]{1,3}")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())[:300]


# --------------------------------------------------------------------------- DER walker
#
# Just enough DER to slice byte-exact sub-structures out of a certificate or CRL. Every
# function raises ParseError (never IndexError) on malformed input.

_Tlv = tuple[int, int, int, int]  # (tag, header start, content start, content end)


def _tlv(buf: bytes, pos: int, end: int) -> _Tlv:
    """The TLV starting at `pos`, which must end no later than `end`."""
    if pos + 2 > end:
        raise ParseError(f"DER: truncated element at offset {pos}")
    start = pos
    tag = buf[pos]
    pos += 1
    if tag & 0x1F == 0x1F:  # high tag number form: skip the tag number octets
        while True:
            if pos >= end:
                raise ParseError(f"DER: truncated tag at offset {start}")
            more = buf[pos] & 0x80
            pos += 1
            if not more:
                break
    if pos >= end:
        raise ParseError(f"DER: truncated element at offset {start}")
    length = buf[pos]
    pos += 1
    if length & 0x80:
        count = length & 0x7F
        if count == 0:
            raise ParseError(f"DER: indefinite length at offset {start}")
        if count > 4:
            raise ParseError(f"DER: oversized length at offset {start}")
        if pos + count > end:
            raise ParseError(f"DER: truncated length at offset {start}")
        length = int.from_bytes(buf[pos : pos + count], "big")
        pos += count
    if pos + length > end:
        raise ParseError(f"DER: element at offset {start} runs past its container")
    return tag, start, pos, pos + length


def _children(buf: bytes, start: int, end: int) -> list[_Tlv]:
    out: list[_Tlv] = []
    pos = start
    while pos < end:
        item = _tlv(buf, pos, end)
        out.append(item)
        pos = item[3]
    return out


def _expect(item: _Tlv, tag: int, what: str) -> _Tlv:
    if item[0] != tag:
        raise ParseError(f"DER: {what} has tag 0x{item[0]:02X}, expected 0x{tag:02X}")
    return item


@functools.lru_cache(maxsize=2048)
def _oid(content: bytes) -> str:
    if not content or content[-1] & 0x80:
        raise ParseError("DER: malformed OBJECT IDENTIFIER")
    arcs: list[int] = []
    value = 0
    for octet in content:
        value = (value << 7) | (octet & 0x7F)
        if value >> 128:
            raise ParseError("DER: OBJECT IDENTIFIER arc longer than 128 bits")
        if not octet & 0x80:
            arcs.append(value)
            value = 0
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(arc) for arc in head + arcs[1:])


def _enc_len(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    raw = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


class _AlgId:
    """An AlgorithmIdentifier: its OID, the raw parameters TLV (b"" if absent), the whole TLV."""

    __slots__ = ("oid", "oid_raw", "params", "raw")

    def __init__(self, buf: bytes, item: _Tlv) -> None:
        _expect(item, _SEQUENCE, "AlgorithmIdentifier")
        kids = _children(buf, item[2], item[3])
        if not kids or len(kids) > 2:
            raise ParseError("DER: AlgorithmIdentifier must hold an OID and optional parameters")
        oid_item = _expect(kids[0], _OID, "algorithm OID")
        self.oid = _oid(buf[oid_item[2] : oid_item[3]])
        self.oid_raw = buf[oid_item[1] : oid_item[3]]
        self.params = buf[kids[1][1] : kids[1][3]] if len(kids) == 2 else b""
        self.raw = buf[item[1] : item[3]]


class _Signed:
    """SIGNED{ToBeSigned} ::= SEQUENCE { tbs, signatureAlgorithm, signature BIT STRING }."""

    __slots__ = ("alg", "signature", "tbs", "tbs_items")

    def __init__(self, der: bytes, what: str) -> None:
        if not der:
            raise ParseError(f"empty input: no {what}")
        outer = _expect(_tlv(der, 0, len(der)), _SEQUENCE, what)
        if outer[3] != len(der):
            raise ParseError(f"{len(der) - outer[3]} bytes of trailing data after the {what}")
        kids = _children(der, outer[2], outer[3])
        if len(kids) != 3:
            raise ParseError(f"{what} must be a SEQUENCE of 3 elements, has {len(kids)}")
        tbs = _expect(kids[0], _SEQUENCE, f"{what} TBS")
        self.tbs = der[tbs[1] : tbs[3]]
        self.tbs_items = _children(der, tbs[2], tbs[3])
        self.alg = _AlgId(der, kids[1])
        sig = _expect(kids[2], _BIT_STRING, "signature")
        if sig[3] == sig[2] or der[sig[2]] != 0:
            raise ParseError(f"{what} signature BIT STRING has unused bits or is empty")
        self.signature = der[sig[2] + 1 : sig[3]]


class _CertLayout:
    """Byte-exact pieces of a certificate, located with the DER walker."""

    __slots__ = (
        "issuer",
        "serial",
        "serial_len",
        "signed",
        "spki",
        "subject",
        "tbs_alg",
        "tbs_alg_index",
        "version",
    )

    def __init__(self, der: bytes) -> None:
        self.signed = _Signed(der, "certificate")
        items = self.signed.tbs_items
        i = 0
        self.version = 1
        if items and items[0][0] == _CTX0:
            ver = _children(der, items[0][2], items[0][3])
            if len(ver) != 1 or ver[0][0] != _INTEGER or ver[0][3] - ver[0][2] != 1:
                raise ParseError("certificate version is not a one-octet INTEGER")
            self.version = der[ver[0][2]] + 1
            i = 1
        if len(items) < i + 6:
            raise ParseError("certificate TBS is missing fields")
        serial = _expect(items[i], _INTEGER, "serialNumber")
        self.serial_len = serial[3] - serial[2]
        if not self.serial_len:
            raise ParseError("certificate serialNumber is an empty INTEGER")
        self.serial = int.from_bytes(der[serial[2] : serial[3]], "big", signed=True)
        self.tbs_alg_index = i + 1
        self.tbs_alg = _AlgId(der, items[i + 1])
        issuer = _expect(items[i + 2], _SEQUENCE, "issuer Name")
        _expect(items[i + 3], _SEQUENCE, "validity")
        subject = _expect(items[i + 4], _SEQUENCE, "subject Name")
        spki = _expect(items[i + 5], _SEQUENCE, "subjectPublicKeyInfo")
        self.issuer = der[issuer[1] : issuer[3]]
        self.subject = der[subject[1] : subject[3]]
        self.spki = der[spki[1] : spki[3]]


class _CrlLayout:
    __slots__ = ("issuer", "signed", "tbs_alg", "tbs_alg_index")

    def __init__(self, der: bytes) -> None:
        self.signed = _Signed(der, "CRL")
        items = self.signed.tbs_items
        i = 1 if items and items[0][0] == _INTEGER else 0
        if len(items) < i + 3:
            raise ParseError("CRL TBS is missing fields")
        self.tbs_alg_index = i
        self.tbs_alg = _AlgId(der, items[i])
        issuer = _expect(items[i + 1], _SEQUENCE, "CRL issuer Name")
        self.issuer = der[issuer[1] : issuer[3]]


def _name_attributes(name_der: bytes) -> list[tuple[str, int, bytes]]:
    """(attribute type OID, value tag, value content) for each attribute of a Name, in order."""
    top = _expect(_tlv(name_der, 0, len(name_der)), _SEQUENCE, "Name")
    attrs: list[tuple[str, int, bytes]] = []
    for rdn in _children(name_der, top[2], top[3]):
        _expect(rdn, _SET, "RelativeDistinguishedName")
        for atv in _children(name_der, rdn[2], rdn[3]):
            _expect(atv, _SEQUENCE, "AttributeTypeAndValue")
            kids = _children(name_der, atv[2], atv[3])
            if len(kids) != 2:
                raise ParseError("DER: AttributeTypeAndValue must have 2 elements")
            oid_item = _expect(kids[0], _OID, "attribute type")
            value = kids[1]
            attrs.append(
                (
                    _oid(name_der[oid_item[2] : oid_item[3]]),
                    value[0],
                    name_der[value[2] : value[3]],
                )
            )
    return attrs


def _decode_string(tag: int, content: bytes) -> str | None:
    if tag == 0x1E:
        return content.decode("utf-16-be", "replace")
    if tag == 0x1C:
        return content.decode("utf-32-be", "replace")
    if tag in (0x13, 0x16):
        return content.decode("ascii", "replace")
    if tag == 0x14:
        return content.decode("latin-1")
    if tag == 0x0C:
        return content.decode("utf-8", "replace")
    return None


_SHORT_NAMES = {
    "2.5.4.3": "CN",
    "2.5.4.6": "C",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "0.9.2342.19200300.100.1.1": "UID",
    "0.9.2342.19200300.100.1.25": "DC",
}


def _fallback_name(attrs: list[tuple[str, int, bytes]]) -> str:
    """An RFC 4514-like rendering that cannot fail (multi-valued RDNs are flattened)."""
    parts: list[str] = []
    for oid, tag, content in reversed(attrs):
        text = _decode_string(tag, content)
        if text is None:
            value = "#" + content.hex()
        else:
            value = re.sub(r'([,+"\\<>;=])', r"\\\1", text)
            value = "".join(ch if ch.isprintable() else f"\\{ord(ch):02x}" for ch in value)
        parts.append(f"{_SHORT_NAMES.get(oid, oid)}={value}")
    return ",".join(parts)


_NAME_CACHE: dict[bytes, tuple[list[tuple[str, int, bytes]], str]] = {}
_NAME_CACHE_MAX = 4096


def _name(dn: bytes, cert: x509.Certificate, which: str) -> tuple[list[tuple[str, int, bytes]], str]:
    """Attributes and RFC 4514 rendering of a Name, cached by its DER: every device
    certificate of an issuer repeats the same issuer (and the same empty subject), and
    rendering through cryptography's Name objects cost ~15 us a certificate."""
    hit = _NAME_CACHE.get(dn)
    if hit is not None:
        return hit
    attrs = _name_attributes(dn)
    rendered = _render_name(cert.issuer if which == "issuer" else cert.subject, attrs)
    if len(_NAME_CACHE) < _NAME_CACHE_MAX:
        _NAME_CACHE[dn] = (attrs, rendered)
    return attrs, rendered


def _render_name(name: x509.Name, attrs: list[tuple[str, int, bytes]]) -> str:
    try:
        return name.rfc4514_string()
    except Exception:  # odd attribute values: fall back to our own rendering
        return _fallback_name(attrs)


def _strip_ecdsa_null(der: bytes, signed: _Signed, tbs_alg_index: int) -> bytes | None:
    """`der` re-encoded without the explicit NULL in its ECDSA AlgorithmIdentifiers (RFC 5758:
    parameters absent; some real issuers write NULL and `cryptography` rejects that). Only
    used so that `cryptography` can parse; the stored DER and the signed bytes stay the
    original. None if there is no such NULL to remove."""
    tbs_item = signed.tbs_items[tbs_alg_index]
    tbs_alg = _AlgId(der, tbs_item)
    if not (_ecdsa_null(signed.alg) or _ecdsa_null(tbs_alg)):
        return None

    def fix(alg: _AlgId) -> bytes:
        if _ecdsa_null(alg):
            return bytes([_SEQUENCE]) + _enc_len(len(alg.oid_raw)) + alg.oid_raw
        return alg.raw

    parts = [
        fix(tbs_alg) if i == tbs_alg_index else der[item[1] : item[3]]
        for i, item in enumerate(signed.tbs_items)
    ]
    content = b"".join(parts)
    tbs = bytes([_SEQUENCE]) + _enc_len(len(content)) + content
    sig = bytes([_BIT_STRING]) + _enc_len(len(signed.signature) + 1) + b"\x00" + signed.signature
    body = tbs + fix(signed.alg) + sig
    return bytes([_SEQUENCE]) + _enc_len(len(body)) + body


def _ecdsa_null(alg: _AlgId) -> bool:
    return alg.oid in _ECDSA_HASH and alg.params == b"\x05\x00"


# --------------------------------------------------------------------------- signatures


@functools.lru_cache(maxsize=4096)
def _load_public_key(spki: bytes) -> PublicKeyTypes | None:
    try:
        return serialization.load_der_public_key(spki)
    except Exception:
        return None


def _pss_padding(params: bytes) -> tuple[padding.PSS, hashes.HashAlgorithm] | None:
    """RSASSA-PSS-params (RFC 4055); defaults SHA-1 / MGF1-SHA-1 / salt 20."""
    digest: hashes.HashAlgorithm = hashes.SHA1()
    mgf_digest: hashes.HashAlgorithm = hashes.SHA1()
    salt = 20
    if params:
        top = _expect(_tlv(params, 0, len(params)), _SEQUENCE, "RSASSA-PSS-params")
        for tag, _start, cs, ce in _children(params, top[2], top[3]):
            inner = _tlv(params, cs, ce)
            if tag == 0xA0:
                alg = _AlgId(params, inner)
                if alg.oid not in _DIGEST_HASH:
                    return None
                digest = _DIGEST_HASH[alg.oid]
            elif tag == 0xA1:
                mgf = _AlgId(params, inner)
                if mgf.oid != _OID_MGF1 or not mgf.params:
                    return None
                mgf_alg = _AlgId(mgf.params, _tlv(mgf.params, 0, len(mgf.params)))
                if mgf_alg.oid not in _DIGEST_HASH:
                    return None
                mgf_digest = _DIGEST_HASH[mgf_alg.oid]
            elif tag == 0xA2:
                salt = int.from_bytes(params[inner[2] : inner[3]], "big")
    return padding.PSS(mgf=padding.MGF1(mgf_digest), salt_length=salt), digest


def _verify_signed(signed: _Signed, issuer_public_key_der: bytes) -> bool:
    key = _load_public_key(bytes(issuer_public_key_der))
    if key is None:
        return False
    oid, tbs, sig = signed.alg.oid, signed.tbs, signed.signature
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            digest = _ECDSA_HASH.get(oid)
            if digest is None:
                return False
            key.verify(sig, tbs, ec.ECDSA(digest))
        elif isinstance(key, rsa.RSAPublicKey):
            if oid in _RSA_PKCS1_HASH:
                key.verify(sig, tbs, padding.PKCS1v15(), _RSA_PKCS1_HASH[oid])
            elif oid == _OID_RSA_PSS:
                pss = _pss_padding(signed.alg.params)
                if pss is None:
                    return False
                key.verify(sig, tbs, pss[0], pss[1])
            else:
                return False
        elif isinstance(key, ed25519.Ed25519PublicKey):
            if oid != _OID_ED25519:
                return False
            key.verify(sig, tbs)
        elif isinstance(key, ed448.Ed448PublicKey):
            if oid != _OID_ED448:
                return False
            key.verify(sig, tbs)
        else:
            return False
    except InvalidSignature:
        return False
    except Exception:  # odd key/algorithm combinations: not a valid signature
        return False
    return True


def verify_signature(cert_der_or_info: CertInfo | bytes, issuer_public_key_der: bytes) -> bool:
    """True if the certificate's signature verifies under `issuer_public_key_der` (a DER
    SubjectPublicKeyInfo). Works on the original TBS bytes; never raises: a bad signature,
    an unsupported key or algorithm, or an unparseable certificate gives False."""
    der = cert_der_or_info.der if isinstance(cert_der_or_info, CertInfo) else cert_der_or_info
    last = _LAST_SIGNED
    if last is not None and last[0] is der:
        signed = last[1]  # parse_certificate just walked this very object: reuse the walk
    else:
        try:
            signed = _Signed(bytes(der), "certificate")
        except Exception:  # not even the outer structure: cannot verify
            return False
    return _verify_signed(signed, issuer_public_key_der)


def verify_crl_signature(crl_der: bytes, issuer_public_key_der: bytes) -> bool:
    """True if the CRL's signature verifies under the issuer's DER SubjectPublicKeyInfo."""
    try:
        signed = _Signed(bytes(crl_der), "CRL")
    except Exception:  # not even the outer structure: cannot verify
        return False
    return _verify_signed(signed, issuer_public_key_der)


# --------------------------------------------------------------------------- lint helpers


class _Findings:
    def __init__(self) -> None:
        self.items: list[Finding] = []

    def add(self, code: str, message: str) -> None:
        self.items.append(Finding(code, _one_line(message)))


def _lint_signature_alg(
    f: _Findings, outer: _AlgId, tbs_alg: _AlgId | None, null_stripped: bool
) -> None:
    if outer.oid != _OID_ECDSA_SHA256:
        name = _ALG_NAMES.get(outer.oid, outer.oid)
        f.add("sig-alg-not-ecdsa-sha256", f"signature algorithm is {name}, not ecdsa-with-SHA256")
    ecdsa_params = [a.params for a in (outer, tbs_alg) if a is not None and a.oid in _ECDSA_HASH]
    if null_stripped or b"\x05\x00" in ecdsa_params:
        f.add(
            "sig-alg-explicit-null",
            "ECDSA signature AlgorithmIdentifier has an explicit NULL parameter; "
            "RFC 5758 requires parameters to be absent",
        )
    elif any(ecdsa_params):
        f.add(
            "sig-alg-params",
            "ECDSA signature AlgorithmIdentifier has parameters; RFC 5758 requires them absent",
        )
    if tbs_alg is not None and tbs_alg.raw != outer.raw:
        f.add("sig-alg-mismatch", "TBS signature algorithm differs from signatureAlgorithm")


# An uncompressed P-256 SubjectPublicKeyInfo (the GB profile) is these 27 octets + 64.
_P256_SPKI_PREFIX = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d03010703420004")


def _lint_spki(f: _Findings, spki: bytes) -> None:
    if len(spki) == 91 and spki.startswith(_P256_SPKI_PREFIX):
        return  # the profile's key: nothing to report (the common case, checked cheaply)
    top = _expect(_tlv(spki, 0, len(spki)), _SEQUENCE, "subjectPublicKeyInfo")
    kids = _children(spki, top[2], top[3])
    if len(kids) != 2:
        raise ParseError("subjectPublicKeyInfo must have 2 elements")
    alg = _AlgId(spki, kids[0])
    if alg.oid != _OID_EC_PUBLIC_KEY:
        name = _ALG_NAMES.get(alg.oid, alg.oid)
        f.add("key-not-p256", f"public key algorithm is {name}, not EC P-256")
        return
    curve = None
    if alg.params[:1] == bytes([_OID]):
        item = _tlv(alg.params, 0, len(alg.params))
        curve = _oid(alg.params[item[2] : item[3]])
    if curve != _OID_P256:
        f.add("key-not-p256", f"EC public key on curve {curve or 'with explicit parameters'}")
    point = _expect(kids[1], _BIT_STRING, "subjectPublicKey")
    body = spki[point[2] : point[3]]
    if curve == _OID_P256 and (len(body) != 66 or body[0] != 0 or body[1] != 0x04):
        f.add("key-point-not-uncompressed", "EC public key is not an uncompressed P-256 point")


# Extensions by OID, built once per object: cryptography's get_extension_for_oid walks the
# list in Python on every call (six calls a certificate cost ~15 us).
_Exts = dict[x509.ObjectIdentifier, x509.Extension[x509.ExtensionType]]


def _ext_map(exts: x509.Extensions) -> _Exts:
    return {ext.oid: ext for ext in exts}


def _ext(exts: _Exts, oid: x509.ObjectIdentifier) -> x509.Extension[x509.ExtensionType] | None:
    return exts.get(oid)


def _lint_key_ids(
    f: _Findings, exts: _Exts, self_signed: bool
) -> tuple[bytes | None, bytes | None]:
    aki_id: bytes | None = None
    ski_id: bytes | None = None
    aki = _ext(exts, ExtensionOID.AUTHORITY_KEY_IDENTIFIER)
    if aki is None:
        if not self_signed:
            f.add("aki-missing", "no authorityKeyIdentifier extension")
    else:
        assert isinstance(aki.value, x509.AuthorityKeyIdentifier)
        aki_id = aki.value.key_identifier
        if aki_id is None:
            f.add("aki-key-id-missing", "authorityKeyIdentifier has no keyIdentifier")
        elif len(aki_id) != 8:
            f.add("aki-length", f"authority key identifier is {len(aki_id)} bytes, not 8")
        if aki.value.authority_cert_issuer is not None:
            f.add("aki-issuer-serial", "authorityKeyIdentifier carries issuer and serial")
    ski = _ext(exts, ExtensionOID.SUBJECT_KEY_IDENTIFIER)
    if ski is None:
        f.add("ski-missing", "no subjectKeyIdentifier extension")
    else:
        assert isinstance(ski.value, x509.SubjectKeyIdentifier)
        ski_id = ski.value.digest
        if len(ski_id) != 8:
            f.add("ski-length", f"subject key identifier is {len(ski_id)} bytes, not 8")
    return aki_id, ski_id


_KU_FLAGS = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
)


def _key_usage(f: _Findings, exts: _Exts) -> tuple[set[str], Usage | None]:
    ext = _ext(exts, ExtensionOID.KEY_USAGE)
    if ext is None:
        f.add("key-usage-missing", "no keyUsage extension")
        return set(), None
    if not ext.critical:
        f.add("key-usage-not-critical", "keyUsage is not marked critical")
    ku = ext.value
    assert isinstance(ku, x509.KeyUsage)
    flags = {name for name in _KU_FLAGS if getattr(ku, name)}
    if ku.key_agreement:
        flags |= {n for n in ("encipher_only", "decipher_only") if getattr(ku, n)}
    if flags & {"key_cert_sign", "crl_sign"}:
        return flags, Usage.CA
    if flags == {"digital_signature"}:
        return flags, Usage.DS
    if flags == {"key_agreement"}:
        return flags, Usage.KA
    shown = ", ".join(sorted(flags)) or "none"
    f.add("key-usage-unexpected", f"keyUsage ({shown}) is not exactly DS, KA or CA")
    return flags, None


def _hw_module_name(f: _Findings, exts: _Exts) -> tuple[bool, bytes | None, bool]:
    """(has hardwareModuleName, its 8-byte hwSerialNum or None, SAN critical)."""
    ext = _ext(exts, ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    if ext is None:
        return False, None, False
    san = ext.value
    assert isinstance(san, x509.SubjectAlternativeName)
    hw_names = [
        gn
        for gn in san
        if isinstance(gn, x509.OtherName) and gn.type_id.dotted_string == _OID_HW_MODULE_NAME
    ]
    if not hw_names:
        return False, None, ext.critical
    if len(hw_names) != len(san):
        f.add("san-extra-names", "subjectAltName holds names besides the hardwareModuleName")
    if len(hw_names) > 1:
        f.add("san-multiple-hw-module-names", "subjectAltName holds several hardwareModuleNames")
    try:
        hw_serial = _hw_serial_num(hw_names[0].value)
    except ParseError as exc:  # the certificate parses; only this value is unreadable
        f.add("device-hw-module-name-malformed", f"hardwareModuleName does not decode: {exc}")
        return True, None, ext.critical
    if len(hw_serial) != 8:
        f.add("device-eui-length", f"hwSerialNum is {len(hw_serial)} bytes, not an 8-byte EUI-64")
        return True, None, ext.critical
    return True, hw_serial, ext.critical


def _hw_serial_num(value: bytes) -> bytes:
    """hwSerialNum of a DER `HardwareModuleName ::= SEQUENCE { hwType OBJECT IDENTIFIER,
    hwSerialNum OCTET STRING }` (RFC 4108), as `cryptography` hands over the otherName value."""
    item = _tlv(value, 0, len(value))
    if item[0] == _CTX0:  # tolerate an explicit [0] wrapper left on the value
        item = _tlv(value, item[2], item[3])
    _expect(item, _SEQUENCE, "HardwareModuleName")
    kids = _children(value, item[2], item[3])
    if len(kids) != 2:
        raise ParseError("HardwareModuleName must have hwType and hwSerialNum")
    _expect(kids[0], _OID, "hwType")
    serial = _expect(kids[1], _OCTET_STRING, "hwSerialNum")
    return value[serial[2] : serial[3]]


def _org_eui(
    f: _Findings, attrs: list[tuple[str, int, bytes]], lint: bool
) -> tuple[bool, bytes | None]:
    """(subject has x500UniqueIdentifier, its EUI-64 or None). The raw BIT STRING content
    includes the unused-bits octet (`00 <8 bytes>`); an 8-byte value without it (e.g. an
    OCTET STRING) is accepted with a finding."""
    values = [(tag, content) for oid, tag, content in attrs if oid == _OID_UNIQUE_ID]
    if not values:
        return False, None
    if len(values) > 1 and lint:
        f.add("org-uid-multiple", "subject has several x500UniqueIdentifier attributes")
    tag, content = values[0]
    if tag == _BIT_STRING and len(content) == 9 and content[0] == 0:
        return True, content[1:]
    if lint:
        f.add(
            "org-uid-encoding",
            f"x500UniqueIdentifier is tag 0x{tag:02X} with {len(content)} content bytes, "
            "not a 9-byte BIT STRING (00 + EUI-64)",
        )
    if tag == _BIT_STRING and len(content) == 8:  # unused-bits octet missing
        return True, content
    if tag != _BIT_STRING and len(content) == 8:
        return True, content
    return True, None


def _role(f: _Findings, attrs: list[tuple[str, int, bytes]], lint: bool) -> int | None:
    """Remote party role from the subject OU: two hex digits per SPEC ('7F' -> 127); a decimal
    spelling of a known role that is not two hex digits ('137') is read as decimal."""
    ous = [(tag, content) for oid, tag, content in attrs if oid == _OID_OU]
    if not ous:
        return None
    if len(ous) > 1 and lint:
        f.add("ou-multiple", "subject has several OU attributes; the first is the role")
    text = (_decode_string(*ous[0]) or "").strip()
    if _TWO_HEX.fullmatch(text):
        role = int(text, 16)
    elif _DECIMAL.fullmatch(text) and int(text) in KNOWN_ROLES:
        role = int(text)
        if lint:
            f.add(
                "ou-decimal-role",
                f"subject OU {text!r} is not two hex digits; read as decimal role {role} "
                f"({KNOWN_ROLES[role]})",
            )
    else:
        if lint:
            f.add("ou-not-role", f"subject OU {text[:40]!r} is not a two-hex-digit role")
        return None
    if role not in KNOWN_ROLES and lint:
        f.add("role-unknown", f"subject OU {text!r} is role {role}, not a known role")
    return role


def _lint_string_types(
    f: _Findings, issuer: list[tuple[str, int, bytes]], subject: list[tuple[str, int, bytes]]
) -> None:
    def kinds(attrs: Iterable[tuple[str, int, bytes]]) -> set[str]:
        return {_STRING_TAGS[tag] for _oid_, tag, _c in attrs if tag in _STRING_TAGS}

    i_types, s_types = kinds(issuer), kinds(subject)
    if i_types and s_types and i_types != s_types:
        f.add(
            "dn-mixed-string-types",
            f"issuer DN uses {'/'.join(sorted(i_types))}, "
            f"subject DN uses {'/'.join(sorted(s_types))}",
        )


def _lint_serial(f: _Findings, serial: int, der_len: int) -> None:
    if serial <= 0:
        f.add("serial-not-positive", "serial number is zero or negative")
        return
    octets = (serial.bit_length() + 7) // 8
    # 16 random octets; a leading 00 is legitimate DER when the top bit is set.
    if not (der_len == 16 or (der_len == 17 and octets == 16)):
        f.add("serial-length", f"serial number is {der_len} octets, not 16")


def _load_certificate(der: bytes, layout: _CertLayout) -> tuple[x509.Certificate, bool]:
    """`cryptography`'s view of the certificate, and whether a NULL had to be stripped."""
    if layout.serial <= 0:  # cryptography warns (a future release will refuse): lint instead
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            return _load_certificate_now(der, layout)
    return _load_certificate_now(der, layout)


def _load_certificate_now(der: bytes, layout: _CertLayout) -> tuple[x509.Certificate, bool]:
    try:
        return x509.load_der_x509_certificate(der), False
    except ValueError as exc:
        fixed = _strip_ecdsa_null(der, layout.signed, layout.tbs_alg_index)
        if fixed is None:
            raise ParseError(f"not a parseable certificate: {_one_line(exc)}") from exc
        try:
            return x509.load_der_x509_certificate(fixed), True
        except ValueError:
            raise ParseError(f"not a parseable certificate: {_one_line(exc)}") from exc


# --------------------------------------------------------------------------- certificates


def parse_certificate(der: bytes) -> CertInfo:
    """Parse one DER certificate into a `CertInfo` with GB-profile lint findings.

    Raises `ParseError` (one-line message) if `der` is not a parseable X.509 certificate;
    profile deviations are findings, never errors."""
    try:
        return _parse_certificate(bytes(der))
    except ParseError:
        raise
    except Exception as exc:  # any other failure inside cryptography or the walker
        raise ParseError(
            f"not a parseable certificate: {type(exc).__name__}: {_one_line(exc)}"
        ) from exc


# The most recent (der, signature layout) from parse_certificate: bulk paths parse then
# verify the same certificate at once, and walking its DER again cost ~20 us.
_LAST_SIGNED: tuple[bytes, _Signed] | None = None


def _parse_certificate(der: bytes) -> CertInfo:
    global _LAST_SIGNED
    layout = _CertLayout(der)
    _LAST_SIGNED = (der, layout.signed)
    cert, null_stripped = _load_certificate(der, layout)
    f = _Findings()

    if layout.version != 3:
        f.add("version-not-v3", f"certificate is version {layout.version}, not 3")
    _lint_serial(f, layout.serial, layout.serial_len)
    _lint_signature_alg(f, layout.signed.alg, layout.tbs_alg, null_stripped)
    _lint_spki(f, layout.spki)

    issuer_attrs, issuer_name = _name(layout.issuer, cert, "issuer")
    subject_attrs, subject_name = _name(layout.subject, cert, "subject")
    _lint_string_types(f, issuer_attrs, subject_attrs)

    self_signed = layout.issuer == layout.subject and _verify_signed(layout.signed, layout.spki)

    all_exts = cert.extensions
    exts = _ext_map(all_exts)
    for ext in all_exts:
        if ext.critical and isinstance(ext.value, x509.UnrecognizedExtension):
            f.add("unknown-critical-extension", f"unrecognised critical extension {ext.oid}")
    issuer_key_id, subject_key_id = _lint_key_ids(f, exts, self_signed)
    flags, usage = _key_usage(f, exts)

    policies: tuple[str, ...] = ()
    cp = _ext(exts, ExtensionOID.CERTIFICATE_POLICIES)
    if cp is None:
        f.add("policies-missing", "no certificatePolicies extension")
    else:
        assert isinstance(cp.value, x509.CertificatePolicies)
        policies = tuple(p.policy_identifier.dotted_string for p in cp.value)
        if not cp.critical:
            f.add("policies-not-critical", "certificatePolicies is not marked critical")

    bc = _ext(exts, ExtensionOID.BASIC_CONSTRAINTS)
    is_ca = False
    if bc is not None:
        assert isinstance(bc.value, x509.BasicConstraints)
        is_ca = bc.value.ca
    has_hw, hw_eui, san_critical = _hw_module_name(f, exts)
    has_uid = any(oid == _OID_UNIQUE_ID for oid, _t, _c in subject_attrs)
    has_ou = any(oid == _OID_OU for oid, _t, _c in subject_attrs)

    if is_ca or "key_cert_sign" in flags:
        kind = CertKind.ROOT if self_signed else CertKind.CA
    elif has_hw:
        kind = CertKind.DEVICE
    elif has_uid or has_ou:
        kind = CertKind.ORGANISATION
    else:
        kind = CertKind.OTHER

    lint_org = kind is CertKind.ORGANISATION
    role = _role(f, subject_attrs, lint_org)
    has_uid, org_eui = _org_eui(f, subject_attrs, lint_org)
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


# --------------------------------------------------------------------------- CRLs


def parse_crl(der: bytes) -> CrlInfo:
    """Parse one DER CRL (or ARL). Raises `ParseError` if it is not a parseable CRL."""
    try:
        with warnings.catch_warnings():  # non-positive revoked serials: cryptography warns
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            return _parse_crl(bytes(der))
    except ParseError:
        raise
    except Exception as exc:
        raise ParseError(f"not a parseable CRL: {type(exc).__name__}: {_one_line(exc)}") from exc


def _parse_crl(der: bytes) -> CrlInfo:
    layout = _CrlLayout(der)
    null_stripped = False
    try:
        crl = x509.load_der_x509_crl(der)
    except ValueError as exc:
        fixed = _strip_ecdsa_null(der, layout.signed, layout.tbs_alg_index)
        if fixed is None:
            raise ParseError(f"not a parseable CRL: {_one_line(exc)}") from exc
        try:
            crl = x509.load_der_x509_crl(fixed)
        except ValueError:
            raise ParseError(f"not a parseable CRL: {_one_line(exc)}") from exc
        null_stripped = True

    f = _Findings()
    _lint_signature_alg(f, layout.signed.alg, layout.tbs_alg, null_stripped)
    if not layout.signed.tbs_items or layout.signed.tbs_items[0][0] != _INTEGER:
        f.add("crl-version", "CRL is version 1 (no version field), not 2")
    issuer_attrs = _name_attributes(layout.issuer)
    exts = _ext_map(crl.extensions)

    aki = _ext(exts, ExtensionOID.AUTHORITY_KEY_IDENTIFIER)
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

    number = _ext(exts, ExtensionOID.CRL_NUMBER)
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
        issuer_name=_render_name(crl.issuer, issuer_attrs),
        issuer_key_id=issuer_key_id,
        crl_number=crl_number,
        this_update=this_update,
        next_update=next_update,
        sha256=hashlib.sha256(der).digest(),
        revoked=tuple(revoked),
        findings=tuple(f.items),
    )


# --------------------------------------------------------------------------- PEM / DER input

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
            raise ParseError(f"PEM block {index}: bad base64 ({_one_line(exc)})") from exc
        try:
            first = _expect(_tlv(blob, 0, len(blob)), _SEQUENCE, what)
        except ParseError as exc:
            raise ParseError(f"PEM block {index}: not a DER {what}: {exc}") from exc
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
            item = _tlv(data, pos, len(data))
        except ParseError:
            return None
        if item[0] != _SEQUENCE:
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
    if data[0] == _SEQUENCE:
        blobs = _der_sequence(data)
        if blobs is not None:
            return blobs
    if b"-----BEGIN" not in data:
        if data[0] == _SEQUENCE:
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
    if data[0] == _SEQUENCE:
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
