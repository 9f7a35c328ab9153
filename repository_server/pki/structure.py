"""Byte-exact structure of certificates and CRLs, located with the shared TLV reader
(`pki.der`): the signed envelope (TBS bytes, signature algorithm, signature), the TBS fields
the repository indexes (serial, issuer and subject Name DER sliced as stored, the public
key), Name attributes with their string tags, and a re-encoding without the explicit NULL
parameter some real issuers put in ECDSA AlgorithmIdentifiers. Malformed input raises
`ParseError` or `TlvError`; the public parsers turn both into one `ParseError`.
"""

from __future__ import annotations

from repository_server.pki.der import Tlv, children, decode_oid, encode_length, read_tlv
from repository_server.pki.errors import ParseError
from repository_server.pki.oids import ECDSA_HASH

__all__ = [
    "BIT_STRING",
    "CTX0",
    "INTEGER",
    "OCTET_STRING",
    "OID",
    "SEQUENCE",
    "SET",
    "AlgId",
    "CertLayout",
    "CrlLayout",
    "Signed",
    "expect",
    "name_attributes",
    "strip_ecdsa_null",
]

# DER tags the PKI checks (first identifier octet).
INTEGER, BIT_STRING, OCTET_STRING, OID = 0x02, 0x03, 0x04, 0x06
SEQUENCE, SET, CTX0 = 0x30, 0x31, 0xA0


def expect(item: Tlv, tag: int, what: str) -> Tlv:
    """`item`, if it has `tag`; else a ParseError naming `what` was expected."""
    if item[0] != tag:
        raise ParseError(f"DER: {what} has tag 0x{item[0]:02X}, expected 0x{tag:02X}")
    return item


class AlgId:
    """An AlgorithmIdentifier: its OID, the raw parameters TLV (b"" if absent), the whole TLV."""

    __slots__ = ("oid", "oid_raw", "params", "raw")

    def __init__(self, buf: bytes, item: Tlv) -> None:
        expect(item, SEQUENCE, "AlgorithmIdentifier")
        kids = children(buf, item[2], item[3])
        if not kids or len(kids) > 2:
            raise ParseError("DER: AlgorithmIdentifier must hold an OID and optional parameters")
        oid_item = expect(kids[0], OID, "algorithm OID")
        self.oid = decode_oid(buf[oid_item[2] : oid_item[3]])
        self.oid_raw = buf[oid_item[1] : oid_item[3]]
        self.params = buf[kids[1][1] : kids[1][3]] if len(kids) == 2 else b""
        self.raw = buf[item[1] : item[3]]


class Signed:
    """SIGNED{ToBeSigned} ::= SEQUENCE { tbs, signatureAlgorithm, signature BIT STRING }."""

    __slots__ = ("alg", "signature", "tbs", "tbs_items")

    def __init__(self, der: bytes, what: str) -> None:
        if not der:
            raise ParseError(f"empty input: no {what}")
        outer = expect(read_tlv(der, 0, len(der)), SEQUENCE, what)
        if outer[3] != len(der):
            raise ParseError(f"{len(der) - outer[3]} bytes of trailing data after the {what}")
        kids = children(der, outer[2], outer[3])
        if len(kids) != 3:
            raise ParseError(f"{what} must be a SEQUENCE of 3 elements, has {len(kids)}")
        tbs = expect(kids[0], SEQUENCE, f"{what} TBS")
        self.tbs = der[tbs[1] : tbs[3]]
        self.tbs_items = children(der, tbs[2], tbs[3])
        self.alg = AlgId(der, kids[1])
        sig = expect(kids[2], BIT_STRING, "signature")
        if sig[3] == sig[2] or der[sig[2]] != 0:
            raise ParseError(f"{what} signature BIT STRING has unused bits or is empty")
        self.signature = der[sig[2] + 1 : sig[3]]


class CertLayout:
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
        self.signed = Signed(der, "certificate")
        items = self.signed.tbs_items
        i = 0
        self.version = 1
        if items and items[0][0] == CTX0:
            ver = children(der, items[0][2], items[0][3])
            if len(ver) != 1 or ver[0][0] != INTEGER or ver[0][3] - ver[0][2] != 1:
                raise ParseError("certificate version is not a one-octet INTEGER")
            self.version = der[ver[0][2]] + 1
            i = 1
        if len(items) < i + 6:
            raise ParseError("certificate TBS is missing fields")
        serial = expect(items[i], INTEGER, "serialNumber")
        self.serial_len = serial[3] - serial[2]
        if not self.serial_len:
            raise ParseError("certificate serialNumber is an empty INTEGER")
        self.serial = int.from_bytes(der[serial[2] : serial[3]], "big", signed=True)
        self.tbs_alg_index = i + 1
        self.tbs_alg = AlgId(der, items[i + 1])
        issuer = expect(items[i + 2], SEQUENCE, "issuer Name")
        expect(items[i + 3], SEQUENCE, "validity")
        subject = expect(items[i + 4], SEQUENCE, "subject Name")
        spki = expect(items[i + 5], SEQUENCE, "subjectPublicKeyInfo")
        self.issuer = der[issuer[1] : issuer[3]]
        self.subject = der[subject[1] : subject[3]]
        self.spki = der[spki[1] : spki[3]]


class CrlLayout:
    __slots__ = ("issuer", "signed", "tbs_alg", "tbs_alg_index")

    def __init__(self, der: bytes) -> None:
        self.signed = Signed(der, "CRL")
        items = self.signed.tbs_items
        i = 1 if items and items[0][0] == INTEGER else 0
        if len(items) < i + 3:
            raise ParseError("CRL TBS is missing fields")
        self.tbs_alg_index = i
        self.tbs_alg = AlgId(der, items[i])
        issuer = expect(items[i + 1], SEQUENCE, "CRL issuer Name")
        self.issuer = der[issuer[1] : issuer[3]]


def name_attributes(name_der: bytes) -> list[tuple[str, int, bytes]]:
    """(attribute type OID, value tag, value content) for each attribute of a Name, in order."""
    top = expect(read_tlv(name_der, 0, len(name_der)), SEQUENCE, "Name")
    attrs: list[tuple[str, int, bytes]] = []
    for rdn in children(name_der, top[2], top[3]):
        expect(rdn, SET, "RelativeDistinguishedName")
        for atv in children(name_der, rdn[2], rdn[3]):
            expect(atv, SEQUENCE, "AttributeTypeAndValue")
            kids = children(name_der, atv[2], atv[3])
            if len(kids) != 2:
                raise ParseError("DER: AttributeTypeAndValue must have 2 elements")
            oid_item = expect(kids[0], OID, "attribute type")
            value = kids[1]
            attrs.append(
                (
                    decode_oid(name_der[oid_item[2] : oid_item[3]]),
                    value[0],
                    name_der[value[2] : value[3]],
                )
            )
    return attrs


def strip_ecdsa_null(der: bytes, signed: Signed, tbs_alg_index: int) -> bytes | None:
    """`der` re-encoded without the explicit NULL in its ECDSA AlgorithmIdentifiers (RFC 5758:
    parameters absent; some real issuers write NULL and `cryptography` rejects that). Only
    used so that `cryptography` can parse; the stored DER and the signed bytes stay the
    original. None if there is no such NULL to remove."""
    tbs_item = signed.tbs_items[tbs_alg_index]
    tbs_alg = AlgId(der, tbs_item)
    if not (_ecdsa_null(signed.alg) or _ecdsa_null(tbs_alg)):
        return None

    def fix(alg: AlgId) -> bytes:
        if _ecdsa_null(alg):
            return bytes([SEQUENCE]) + encode_length(len(alg.oid_raw)) + alg.oid_raw
        return alg.raw

    parts = [
        fix(tbs_alg) if i == tbs_alg_index else der[item[1] : item[3]]
        for i, item in enumerate(signed.tbs_items)
    ]
    content = b"".join(parts)
    tbs = bytes([SEQUENCE]) + encode_length(len(content)) + content
    sig = bytes([BIT_STRING]) + encode_length(len(signed.signature) + 1) + b"\x00" + signed.signature
    body = tbs + fix(signed.alg) + sig
    return bytes([SEQUENCE]) + encode_length(len(body)) + body


def _ecdsa_null(alg: AlgId) -> bool:
    return alg.oid in ECDSA_HASH and alg.params == b"\x05\x00"

