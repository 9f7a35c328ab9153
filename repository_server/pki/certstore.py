"""RFC 4387 (certificate store access via HTTP): search keys, pure (no I/O).

A search is `GET /certificates/search.cgi?ATTRIBUTE=KEY` (or `/crls/search.cgi`), KEY being
the base64 of the SHA-1 of a value with the trailing '=' dropped: 27 characters (RFC 4387
section 2.1). The values, for a certificate (section 2.2 / 3):

* certHash  the whole certificate (DER)
* iHash     the issuer Name (DER)
* sHash     the subject Name (DER)
* iAndSHash IssuerAndSerialNumber: SEQUENCE { issuer Name, serialNumber INTEGER } (DER)
* sKIDHash  the subjectKeyIdentifier's key identifier octets (GB SMKI ones are 8 bytes, so
            the SKI itself is never the key: it is hashed like every other value)
* name      not a hash: a name as text, matched without regard to case or repeated spaces
            against the subject's commonName and its whole RFC 4514 string

and for a CRL the same with the CRL's issuer: iHash (issuer Name), sKIDHash (the
authorityKeyIdentifier's key identifier, i.e. the issuing CA's SKI) and name (issuer).

Each value becomes a search key of 21 bytes: one tag byte naming the attribute, then the
SHA-1 (for `name`, the SHA-1 of the normalised text, so that every key has one length). The
replica's index keeps only the first INDEX_BYTES of it (a third of the size, and random
B-tree inserts are most of what the index costs a build); a lookup checks each candidate's
full keys, so a collision of the short form can never answer the wrong certificate.
Reading a certificate's Names takes a few slices of its DER (`tbs_parts`): no parser.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import re
from collections.abc import Mapping

CERT_ATTRIBUTES = {"certHash": b"c", "iHash": b"i", "sHash": b"s", "iAndSHash": b"a",
                   "sKIDHash": b"k", "name": b"n"}
CRL_ATTRIBUTES = {"iHash": b"i", "sKIDHash": b"k", "name": b"n"}
_KEY = re.compile(r"[A-Za-z0-9+/]{27}", re.ASCII)
MAX_NAME = 1024  # characters of a `name` search
INDEX_BYTES = 9  # tag + 64 bits of the SHA-1


class SearchKeyError(ValueError):
    """A search attribute or key that cannot name anything (the reason names it)."""


class DerError(ValueError):
    """DER that is not the certificate or CRL structure expected."""


_sha1_new = hashlib.sha1


def _sha1(data: bytes) -> bytes:
    return _sha1_new(data).digest()  # (a key, not a security use; the keyword costs 0.2 us)


def _end(buf: bytes, pos: int) -> int:
    """Where the TLV at `pos` ends (its tag not checked)."""
    first = buf[pos + 1]
    if first < 0x80:
        return pos + 2 + first
    start = pos + 2 + (first & 0x7F)
    return start + int.from_bytes(buf[pos + 2:start], "big")


def _inside(buf: bytes, pos: int) -> int:
    """Where the value of the TLV at `pos` starts."""
    first = buf[pos + 1]
    return pos + 2 + (first & 0x7F if first >= 0x80 else 0)


def tbs_parts(der: bytes) -> tuple[bytes, bytes, bytes]:
    """(issuer Name TLV, serialNumber TLV, subject Name TLV) of a certificate's DER (on the
    replica build's path: a few slices, no parser, ~2 us)."""
    try:
        pos = _inside(der, _inside(der, 0))  # Certificate, tbsCertificate
        if der[pos] == 0xA0:  # [0] version
            pos = _end(der, pos)
        serial_at = pos
        pos = _end(der, pos)
        serial = der[serial_at:pos]
        issuer_at = _end(der, pos)  # after the signature AlgorithmIdentifier
        pos = _end(der, issuer_at)
        subject_at = _end(der, pos)  # after validity
        end = _end(der, subject_at)
    except IndexError:
        raise DerError("truncated") from None
    if (serial[:1] != b"\x02" or der[issuer_at] != 0x30 or der[subject_at] != 0x30
            or end > len(der)):
        raise DerError("not a certificate's serialNumber, issuer and subject")
    return der[issuer_at:pos], serial, der[subject_at:end]


def crl_issuer(der: bytes) -> bytes:
    """The issuer Name TLV of a CRL's DER."""
    try:
        pos = _inside(der, _inside(der, 0))  # CertificateList, tbsCertList
        if der[pos] == 0x02:  # version
            pos = _end(der, pos)
        issuer_at = _end(der, pos)  # after the signature AlgorithmIdentifier
        end = _end(der, issuer_at)
    except IndexError:
        raise DerError("truncated") from None
    if der[issuer_at] != 0x30 or end > len(der):
        raise DerError("issuer is not a Name")
    return der[issuer_at:end]


def _sequence(*parts: bytes) -> bytes:
    body = b"".join(parts)
    n = len(body)
    if n < 0x80:
        return b"\x30" + bytes((n,)) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return b"\x30" + bytes((0x80 | len(size),)) + size + body


def normalise_name(text: str) -> str:
    return " ".join(text.split()).casefold()


def name_key(text: str) -> bytes:
    return b"n" + _sha1(normalise_name(text).encode())


_CN = re.compile(r"(?:^|,)\s*CN=((?:[^,\\]|\\.)*)", re.IGNORECASE)


def _names(rfc4514: str) -> set[bytes]:
    """The `name` keys of a subject or issuer in RFC 4514 form: the whole string and each
    commonName ("" has none)."""
    if not rfc4514.strip():
        return set()
    keys = {name_key(rfc4514)}
    for m in _CN.finditer(rfc4514):
        keys.add(name_key(re.sub(r"\\(.)", r"\1", m.group(1))))
    return keys


_EMPTY_NAME = b"\x30\x00"
_ISSUER_KEYS: dict[bytes, bytes] = {}


def certificate_keys(der: bytes, subject_key_id: bytes | None, subject_name: str) -> list[bytes]:
    """Every index key of one certificate (a DER that does not parse has only certHash). An
    empty subject (every device certificate's) has no sHash: there is no name to look for,
    and millions of entries under one key would only cost build time."""
    keys = [b"c" + _sha1(der)]
    try:
        issuer, serial, subject = tbs_parts(der)
    except DerError:
        return keys
    issuer_key = _ISSUER_KEYS.get(issuer)  # a few issuers sign everything
    if issuer_key is None:
        if len(_ISSUER_KEYS) >= 1024:
            _ISSUER_KEYS.clear()
        issuer_key = _ISSUER_KEYS[issuer] = b"i" + _sha1(issuer)
    keys += (issuer_key, b"a" + _sha1(_sequence(issuer, serial)))
    if subject != _EMPTY_NAME:
        keys.append(b"s" + _sha1(subject))
        keys += sorted(_names(subject_name))
    if subject_key_id:
        keys.append(b"k" + _sha1(subject_key_id))
    return keys


def index_keys(der: bytes, subject_key_id: bytes | None, subject_name: str) -> list[bytes]:
    """What the replica's index keeps of `certificate_keys` (a key twice is stored once)."""
    return [k[:INDEX_BYTES] for k in certificate_keys(der, subject_key_id, subject_name)]


def crl_keys(der: bytes, issuer_key_id: bytes, issuer_name: str) -> set[bytes]:
    keys = {b"k" + _sha1(issuer_key_id), *_names(issuer_name)}
    with contextlib.suppress(DerError):
        keys.add(b"i" + _sha1(crl_issuer(der)))
    return keys


def parse_query(query: Mapping[str, str], attributes: dict[str, bytes], store: str) -> bytes:
    """The index key a search asks for: exactly one attribute of `attributes` (others than
    `apikey` refused), its value a 27-character search key (or, for name, text). A repeated
    parameter is refused too (`items()` of a multidict has each; its `keys()` do not)."""
    asked = [k for k, _ in query.items() if k != "apikey"]
    known = ", ".join(attributes)
    if len(asked) != 1:
        raise SearchKeyError(f"give exactly one search attribute, one of: {known}"
                             f" (RFC 4387; got {len(asked)})")
    attribute = asked[0]
    value = query[attribute]
    # names in any case, as cryptlib (RFC 4387's editor's own) matches them
    attribute = next((a for a in attributes if a.lower() == attribute.lower()), attribute)
    tag = attributes.get(attribute)
    if tag is None:
        raise SearchKeyError(f"{attribute[:40]!r} is not a search attribute of the {store}"
                             f" store: use one of {known}")
    if attribute == "name":
        if not value.strip() or len(value) > MAX_NAME:
            raise SearchKeyError(f"name: give a name of 1 to {MAX_NAME} characters")
        return name_key(value)
    if not _KEY.fullmatch(value):
        raise SearchKeyError(f"{attribute}: expected the base64 of a SHA-1 without the"
                             " trailing '=': 27 characters of A-Z a-z 0-9 + / (RFC 4387"
                             f" section 2.1; got {len(value)} characters)")
    try:
        digest = base64.b64decode(value + "=", validate=True)
    except binascii.Error as exc:  # pragma: no cover - the pattern admits only valid ones
        raise SearchKeyError(f"{attribute}: not base64: {exc}") from None
    return tag + digest

