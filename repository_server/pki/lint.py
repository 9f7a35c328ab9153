"""The GB SMKI certificate profile of SPEC.md as lint: each deviation is a `Finding` (a code
and one line), never an error, because real certificates bend the profile and must still be
stored. Also reads what the profile puts in a certificate: key usage (DS, KA or CA), the
device EUI-64 in the hardwareModuleName, the organisation EUI-64 in x500UniqueIdentifier and
the remote party role in the subject OU.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from cryptography import x509
from cryptography.x509.oid import ExtensionOID

from repository_server.pki.der import TlvError, children, decode_oid, read_tlv
from repository_server.pki.errors import ParseError, der_error, one_line
from repository_server.pki.model import Finding, Usage
from repository_server.pki.names import decode_string
from repository_server.pki.oids import (
    ALG_NAMES,
    ECDSA_HASH,
    OID_EC_PUBLIC_KEY,
    OID_ECDSA_SHA256,
    OID_HW_MODULE_NAME,
    OID_OU,
    OID_P256,
    OID_UNIQUE_ID,
)
from repository_server.pki.structure import (
    BIT_STRING,
    CTX0,
    OCTET_STRING,
    OID,
    SEQUENCE,
    AlgId,
    expect,
)

__all__ = [
    "KNOWN_ROLES",
    "Exts",
    "Findings",
    "ext_map",
    "get_ext",
    "lint_key_ids",
    "lint_serial",
    "lint_signature_alg",
    "lint_spki",
    "lint_string_types",
    "read_hw_module_name",
    "read_key_usage",
    "read_org_eui",
    "read_role",
]

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

_STRING_TAGS = {
    0x0C: "UTF8String",
    0x13: "PrintableString",
    0x14: "TeletexString",
    0x16: "IA5String",
    0x1C: "UniversalString",
    0x1E: "BMPString",
}
_TWO_HEX = re.compile(r"[0-9A-Fa-f]{2}")
_DECIMAL = re.compile(r"[0-9]{1,3}")


class Findings:
    """The findings of one certificate or CRL, in the order found."""

    def __init__(self) -> None:
        self.items: list[Finding] = []

    def add(self, code: str, message: str) -> None:
        self.items.append(Finding(code, one_line(message)))


def lint_signature_alg(
    f: Findings, outer: AlgId, tbs_alg: AlgId | None, null_stripped: bool
) -> None:
    if outer.oid != OID_ECDSA_SHA256:
        name = ALG_NAMES.get(outer.oid, outer.oid)
        f.add("sig-alg-not-ecdsa-sha256", f"signature algorithm is {name}, not ecdsa-with-SHA256")
    ecdsa_params = [a.params for a in (outer, tbs_alg) if a is not None and a.oid in ECDSA_HASH]
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


def lint_spki(f: Findings, spki: bytes) -> None:
    if len(spki) == 91 and spki.startswith(_P256_SPKI_PREFIX):
        return  # the profile's key: nothing to report (the common case, checked cheaply)
    top = expect(read_tlv(spki, 0, len(spki)), SEQUENCE, "subjectPublicKeyInfo")
    kids = children(spki, top[2], top[3])
    if len(kids) != 2:
        raise ParseError("subjectPublicKeyInfo must have 2 elements")
    alg = AlgId(spki, kids[0])
    if alg.oid != OID_EC_PUBLIC_KEY:
        name = ALG_NAMES.get(alg.oid, alg.oid)
        f.add("key-not-p256", f"public key algorithm is {name}, not EC P-256")
        return
    curve = None
    if alg.params[:1] == bytes([OID]):
        item = read_tlv(alg.params, 0, len(alg.params))
        curve = decode_oid(alg.params[item[2] : item[3]])
    if curve != OID_P256:
        f.add("key-not-p256", f"EC public key on curve {curve or 'with explicit parameters'}")
    point = expect(kids[1], BIT_STRING, "subjectPublicKey")
    body = spki[point[2] : point[3]]
    if curve == OID_P256 and (len(body) != 66 or body[0] != 0 or body[1] != 0x04):
        f.add("key-point-not-uncompressed", "EC public key is not an uncompressed P-256 point")


# Extensions by OID, built once per object: cryptography's get_extension_for_oid walks the
# list in Python on every call (six calls a certificate cost ~15 us).
Exts = dict[x509.ObjectIdentifier, x509.Extension[x509.ExtensionType]]


def ext_map(exts: x509.Extensions) -> Exts:
    return {ext.oid: ext for ext in exts}


def get_ext(exts: Exts, oid: x509.ObjectIdentifier) -> x509.Extension[x509.ExtensionType] | None:
    return exts.get(oid)


def lint_key_ids(
    f: Findings, exts: Exts, self_signed: bool
) -> tuple[bytes | None, bytes | None]:
    aki_id: bytes | None = None
    ski_id: bytes | None = None
    aki = get_ext(exts, ExtensionOID.AUTHORITY_KEY_IDENTIFIER)
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
    ski = get_ext(exts, ExtensionOID.SUBJECT_KEY_IDENTIFIER)
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


def read_key_usage(f: Findings, exts: Exts) -> tuple[set[str], Usage | None]:
    ext = get_ext(exts, ExtensionOID.KEY_USAGE)
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


def read_hw_module_name(f: Findings, exts: Exts) -> tuple[bool, bytes | None, bool]:
    """(has hardwareModuleName, its 8-byte hwSerialNum or None, SAN critical)."""
    ext = get_ext(exts, ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    if ext is None:
        return False, None, False
    san = ext.value
    assert isinstance(san, x509.SubjectAlternativeName)
    hw_names = [
        gn
        for gn in san
        if isinstance(gn, x509.OtherName) and gn.type_id.dotted_string == OID_HW_MODULE_NAME
    ]
    if not hw_names:
        return False, None, ext.critical
    if len(hw_names) != len(san):
        f.add("san-extra-names", "subjectAltName holds names besides the hardwareModuleName")
    if len(hw_names) > 1:
        f.add("san-multiple-hw-module-names", "subjectAltName holds several hardwareModuleNames")
    try:
        hw_serial = _hw_serial_num(hw_names[0].value)
    except (ParseError, TlvError) as exc:  # the certificate parses; only this value is unreadable
        reason = der_error(exc) if isinstance(exc, TlvError) else exc
        f.add("device-hw-module-name-malformed", f"hardwareModuleName does not decode: {reason}")
        return True, None, ext.critical
    if len(hw_serial) != 8:
        f.add("device-eui-length", f"hwSerialNum is {len(hw_serial)} bytes, not an 8-byte EUI-64")
        return True, None, ext.critical
    return True, hw_serial, ext.critical


def _hw_serial_num(value: bytes) -> bytes:
    """hwSerialNum of a DER `HardwareModuleName ::= SEQUENCE { hwType OBJECT IDENTIFIER,
    hwSerialNum OCTET STRING }` (RFC 4108), as `cryptography` hands over the otherName value."""
    item = read_tlv(value, 0, len(value))
    if item[0] == CTX0:  # tolerate an explicit [0] wrapper left on the value
        item = read_tlv(value, item[2], item[3])
    expect(item, SEQUENCE, "HardwareModuleName")
    kids = children(value, item[2], item[3])
    if len(kids) != 2:
        raise ParseError("HardwareModuleName must have hwType and hwSerialNum")
    expect(kids[0], OID, "hwType")
    serial = expect(kids[1], OCTET_STRING, "hwSerialNum")
    return value[serial[2] : serial[3]]


def read_org_eui(
    f: Findings, attrs: list[tuple[str, int, bytes]], lint: bool
) -> tuple[bool, bytes | None]:
    """(subject has x500UniqueIdentifier, its EUI-64 or None). The raw BIT STRING content
    includes the unused-bits octet (`00 <8 bytes>`); an 8-byte value without it (e.g. an
    OCTET STRING) is accepted with a finding."""
    values = [(tag, content) for oid, tag, content in attrs if oid == OID_UNIQUE_ID]
    if not values:
        return False, None
    if len(values) > 1 and lint:
        f.add("org-uid-multiple", "subject has several x500UniqueIdentifier attributes")
    tag, content = values[0]
    if tag == BIT_STRING and len(content) == 9 and content[0] == 0:
        return True, content[1:]
    if lint:
        f.add(
            "org-uid-encoding",
            f"x500UniqueIdentifier is tag 0x{tag:02X} with {len(content)} content bytes, "
            "not a 9-byte BIT STRING (00 + EUI-64)",
        )
    if tag == BIT_STRING and len(content) == 8:  # unused-bits octet missing
        return True, content
    if tag != BIT_STRING and len(content) == 8:
        return True, content
    return True, None


def read_role(f: Findings, attrs: list[tuple[str, int, bytes]], lint: bool) -> int | None:
    """Remote party role from the subject OU: two hex digits per SPEC ('7F' -> 127); a decimal
    spelling of a known role that is not two hex digits ('137') is read as decimal."""
    ous = [(tag, content) for oid, tag, content in attrs if oid == OID_OU]
    if not ous:
        return None
    if len(ous) > 1 and lint:
        f.add("ou-multiple", "subject has several OU attributes; the first is the role")
    text = (decode_string(*ous[0]) or "").strip()
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


def lint_string_types(
    f: Findings, issuer: list[tuple[str, int, bytes]], subject: list[tuple[str, int, bytes]]
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


def lint_serial(f: Findings, serial: int, der_len: int) -> None:
    if serial <= 0:
        f.add("serial-not-positive", "serial number is zero or negative")
        return
    octets = (serial.bit_length() + 7) // 8
    # 16 random octets; a leading 00 is legitimate DER when the top bit is set.
    if not (der_len == 16 or (der_len == 17 and octets == 16)):
        f.add("serial-length", f"serial number is {der_len} octets, not 16")

