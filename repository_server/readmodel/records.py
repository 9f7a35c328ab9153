"""The replica's byte layout: keys and packed values, pure (no I/O, no LMDB).

Every value starts with a fixed `struct` head followed by length-prefixed fields, so decoding
is one `unpack_from` and a few slices, and a damaged value raises `RecordError` (never
anything worse). Times are integer microseconds since the epoch (UTC): exact, and
9999-12-31 still fits in 64 bits. What the read interfaces send is stored ready-made: the
DER, the hex SHA-256 (ETag and LDAP), the HTTP Last-Modified date and the written EUI-64.
"""

from __future__ import annotations

import re
import struct
import typing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

FORMAT = 4  # bump when a layout below changes: a replica of another format is rebuilt

KINDS = ("root", "ca", "organisation", "device", "other")
USAGES = (None, "DS", "KA", "CA")
_KIND_INDEX = {k: i for i, k in enumerate(KINDS)}
_USAGE_INDEX = {u: i for i, u in enumerate(USAGES)}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class RecordError(ValueError):
    """A stored value that does not decode: the replica is damaged (rebuild it)."""


def to_us(when: datetime) -> int:
    delta = when - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


_HTTP_DATES: dict[datetime, str] = {}


def http_date(when: datetime) -> str:
    """The HTTP date of a time (memoised: a lodging's certificates share their lodging time,
    and email.utils formatting is a third of a replica build's time per certificate)."""
    found = _HTTP_DATES.get(when)
    if found is None:
        found = format_datetime(when.astimezone(UTC), usegmt=True)
        if len(_HTTP_DATES) >= 4096:
            _HTTP_DATES.clear()
        _HTTP_DATES[when] = found
    return found


def id_key(n: int) -> bytes:
    return n.to_bytes(8, "big")


def key_id(b: bytes) -> int:
    return int.from_bytes(b, "big")


def subject_key(device: bool, eui64: bytes) -> bytes:
    """Index key of a device's or organisation's certificates: (kind, EUI-64) so a walk of
    the index is the LDAP directory's (EUI-64, id) order within each unit."""
    return (b"d" if device else b"o") + eui64


def crl_key(issuer_key_id: bytes, number: int) -> bytes:
    """CRL versions of one issuer sort by number: the last key under the prefix is current."""
    return crl_prefix(issuer_key_id) + number.to_bytes(21, "big")


def crl_prefix(issuer_key_id: bytes) -> bytes:
    return bytes((len(issuer_key_id),)) + issuer_key_id


def doc_key(name: str, version: int) -> bytes:
    return name.encode() + b"\x00" + version.to_bytes(4, "big")


# -- certificates ------------------------------------------------------------------------------
@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~2 µs more per certificate read
class CertRecord:
    """One stored certificate as the read interfaces use it (treat as immutable)."""

    id: int
    serial: str
    issuer_key_id: bytes | None
    der: bytes
    sha256: bytes
    sha_hex: str  # lower-case hex of sha256 (ETag, LDAP smkiSha256)
    lodged_us: int
    http_last_modified: str  # the lodging as an HTTP date (stored ready-made for HTTP only)
    kind: str  # root, ca, organisation, device, other
    eui64: bytes | None
    eui_text: str  # 00-DB-12-... (written form), "" if none
    role: int | None
    usage: str | None  # DS, KA, CA
    lodged_status: str  # P, I, N as lodged (R and E are worked out when answering)
    manufacturing_flag: bool
    not_before_us: int
    not_after_us: int
    subject_key_id: bytes | None
    subject_name: str
    issuer_name: str

    @property
    def public(self) -> bool:
        """CA certificates are readable without credentials (SPEC: relying parties must
        always reach what they need to check revocation)."""
        return self.kind in ("root", "ca")

    @property
    def modified_ts(self) -> float:
        return float(self.lodged_us // 1_000_000)

    @property
    def not_after_ts(self) -> float:
        return self.not_after_us / 1e6

    @property
    def not_before_ts(self) -> float:
        return self.not_before_us / 1e6

    @property
    def lodged_at(self) -> datetime:
        return from_us(self.lodged_us)


# lodged_us, not_before_us, not_after_us, sha256, kind, status, flag, role (-1 none), usage,
# lengths: serial, issuer key id, subject key id, eui, subject name, issuer name, der
_BEFORE_TRAITS, _TRAITS_FORMAT = ">qqq32s", "BcBhB"  # (kind, status, flag, role, usage)
_CERT = struct.Struct(_BEFORE_TRAITS + _TRAITS_FORMAT + "BBBBHHI")
_LAST_MODIFIED_LEN = 29  # "Sun, 06 Nov 1994 08:49:37 GMT"


def _eui_text(eui: bytes) -> str:
    return eui.hex("-").upper()


def pack_cert(*, serial: str, issuer_key_id: bytes | None, der: bytes, sha256: bytes,
              lodged_us: int, kind: str, eui64: bytes | None, role: int | None,
              usage: str | None, status: str, manufacturing_flag: bool, not_before_us: int,
              not_after_us: int, subject_key_id: bytes | None, subject_name: str,
              issuer_name: str) -> bytes:
    """A certificate record (times in microseconds since the epoch, as the feed reads them)."""
    s = serial.encode()
    ik = issuer_key_id or b""
    sk = subject_key_id or b""
    eui = eui64 if eui64 is not None and len(eui64) == 8 else b""
    sn = subject_name.encode()
    isn = issuer_name.encode()
    lm = _http_date_us(lodged_us)
    head = _CERT.pack(lodged_us, not_before_us, not_after_us, sha256,
                      _KIND_INDEX[kind], status.encode(), 1 if manufacturing_flag else 0,
                      -1 if role is None else role, _USAGE_INDEX[usage], len(s), len(ik),
                      len(sk), len(eui), len(sn), len(isn), len(der))
    return b"".join((head, s, ik, sk, eui, sn, isn, lm, der))


_LM_BY_US: dict[int, bytes] = {}


def _http_date_us(us: int) -> bytes:
    found = _LM_BY_US.get(us)
    if found is None:
        found = http_date(from_us(us)).encode()
        if len(found) != _LAST_MODIFIED_LEN:
            raise RecordError(f"lodging time out of range: {us}")
        if len(_LM_BY_US) >= 4096:
            _LM_BY_US.clear()
        _LM_BY_US[us] = found
    return found


def unpack_cert(cert_id: int, value: bytes) -> CertRecord:
    try:
        (lodged, nb, na, sha, kind, status, flag, role, usage, ls, lik, lsk, le, lsn, lisn,
         lder) = _CERT.unpack_from(value)
        p = _CERT.size
        serial = value[p:p + ls].decode()
        p += ls
        ik = value[p:p + lik]
        p += lik
        sk = value[p:p + lsk]
        p += lsk
        eui = value[p:p + le]
        p += le
        sn = value[p:p + lsn].decode()
        p += lsn
        isn = value[p:p + lisn].decode()
        p += lisn
        lm = value[p:p + _LAST_MODIFIED_LEN].decode("ascii")
        p += _LAST_MODIFIED_LEN
        der = value[p:p + lder]
        if len(der) != lder or p + lder != len(value):
            raise RecordError("certificate record: wrong length")
        return CertRecord(cert_id, serial, ik or None, der, sha, sha.hex(), lodged, lm,
                          KINDS[kind], eui or None, _eui_text(eui) if eui else "",
                          None if role < 0 else role, USAGES[usage], status.decode("ascii"),
                          bool(flag), nb, na, sk or None, sn, isn)
    except (struct.error, IndexError, UnicodeDecodeError, OverflowError) as exc:
        raise RecordError(f"certificate record {cert_id}: {exc}") from exc


# The head alone, for a reader that needs a few fields of many records (the LDAP short way,
# which tests a device's certificates on their kind and usage before it decodes any):
# `CERT_HEAD.unpack_from(value)[HEAD_...]`, then `cert_serial_der`.
CERT_HEAD = _CERT
HEAD_NOT_AFTER, HEAD_SHA, HEAD_KIND, HEAD_FLAG, HEAD_ROLE, HEAD_USAGE = 2, 3, 4, 6, 7, 8
_HEAD_SERIAL_LEN, _HEAD_DER_LEN = 9, 15
# where kind, status, flag, role and usage lie in a record, in that order: `value[TRAITS]` is a
# key for what a filter on them decides, read without unpacking the head (`value[KIND_AT]` the
# kind's index)
KIND_AT = struct.calcsize(_BEFORE_TRAITS)
TRAITS = slice(KIND_AT, struct.calcsize(_BEFORE_TRAITS + _TRAITS_FORMAT))


def _offset(index: int) -> int:
    """Where field `index` of CERT_HEAD starts in a record."""
    fields = re.findall(r"\d*[a-zA-Z]", _CERT.format)  # ("q", ..., "32s", "B", ...)
    return struct.calcsize(">" + "".join(fields[:index]))


# The same places as offsets, for the LDAP short way's C loop (ldap/_hot.c `layout`): kind,
# traits start and end, head size, serial length (uint8), DER length (uint32)
HEAD_LAYOUT = (KIND_AT, TRAITS.start, TRAITS.stop, _CERT.size, _offset(_HEAD_SERIAL_LEN),
               _offset(_HEAD_DER_LEN))


def cert_serial_der(value: bytes, head: tuple[typing.Any, ...]) -> tuple[bytes, bytes]:
    """The serial (ASCII) and DER of a certificate record whose head is `head`."""
    end = _CERT.size + head[_HEAD_SERIAL_LEN]
    der = value[len(value) - head[_HEAD_DER_LEN]:]
    if len(der) != head[_HEAD_DER_LEN] or end > len(value) - len(der):
        raise RecordError("certificate record: wrong length")
    return value[_CERT.size:end], der


_KIND_PUBLIC = tuple(k in ("root", "ca") for k in KINDS)


def unpack_download(value: bytes) -> tuple[bytes, str, str, bool]:
    """(DER, hex SHA-256, HTTP Last-Modified, public) of a certificate record, without
    decoding the rest (a download by serial needs nothing else)."""
    try:
        head = _CERT.unpack_from(value)
        start = _CERT.size + sum(head[9:15])  # serial, key ids, EUI-64, names
        lm = value[start:start + _LAST_MODIFIED_LEN].decode("ascii")
        der = value[start + _LAST_MODIFIED_LEN:]
        if len(der) != head[15]:
            raise RecordError("certificate record: wrong length")
        return der, head[3].hex(), lm, _KIND_PUBLIC[head[4]]
    except (struct.error, IndexError, UnicodeDecodeError, OverflowError) as exc:
        raise RecordError(f"certificate record: {exc}") from exc


def with_status(value: bytes, status: str, manufacturing_flag: bool) -> bytes:
    """The same record with a new lodged status and ManufacturingFlag."""
    head = list(_CERT.unpack_from(value))
    head[5] = status.encode()
    head[6] = 1 if manufacturing_flag else 0
    return _CERT.pack(*head) + value[_CERT.size:]


def unit_of(kind: str, eui64: bytes | None, subject_key_id: bytes | None) -> str:
    """Which organisational unit of the LDAP directory a certificate belongs to."""
    if kind in ("device", "organisation") and eui64 is not None and len(eui64) == 8:
        return "devices" if kind == "device" else "organisations"
    if kind in ("root", "ca") and subject_key_id:
        return "cas"
    return "other"


# -- CRLs --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CrlRecord:
    id: int
    kind: str  # crl | arl
    issuer_key_id: bytes
    issuer_name: str
    crl_number: int
    this_update: datetime
    next_update: datetime | None
    sha256: bytes
    der: bytes
    revoked_count: int
    lodged_at: datetime


# id, kind, this_update, next_update (-1 none), lodged, revoked count, sha256, lengths:
# issuer key id, issuer name, der
_CRL = struct.Struct(">qcqqqI32sBHI")
_NONE_US = -(2**63)


def pack_crl(r: CrlRecord) -> bytes:
    ik = r.issuer_key_id
    name = r.issuer_name.encode()
    head = _CRL.pack(r.id, b"a" if r.kind == "arl" else b"c", to_us(r.this_update),
                     to_us(r.next_update) if r.next_update is not None else _NONE_US,
                     to_us(r.lodged_at), r.revoked_count, r.sha256, len(ik), len(name),
                     len(r.der))
    return b"".join((head, ik, name, r.der))


def unpack_crl(key: bytes, value: bytes) -> CrlRecord:
    try:
        crl_id, kind, this, nxt, lodged, count, sha, lik, ln, lder = _CRL.unpack_from(value)
        p = _CRL.size
        ik = value[p:p + lik]
        p += lik
        name = value[p:p + ln].decode()
        p += ln
        der = value[p:p + lder]
        if p + lder != len(value) or len(key) < 22:
            raise RecordError("CRL record: wrong length")
        return CrlRecord(crl_id, "arl" if kind == b"a" else "crl", ik, name,
                         int.from_bytes(key[-21:], "big"), from_us(this),
                         None if nxt == _NONE_US else from_us(nxt), sha, der, count,
                         from_us(lodged))
    except (struct.error, UnicodeDecodeError, OverflowError, ValueError) as exc:
        raise RecordError(f"CRL record: {exc}") from exc


# revoked entry of one CRL version: key = crl id + serial; value = date, reason
_REVOKED = struct.Struct(">q")


def revoked_key(crl_id: int, serial: str) -> bytes:
    return id_key(crl_id) + serial.encode()


def pack_revoked(revocation_date: datetime, reason: str | None) -> bytes:
    return _REVOKED.pack(to_us(revocation_date)) + (b"" if reason is None else
                                                    b"\x01" + reason.encode())


def unpack_revoked(value: bytes) -> tuple[datetime, str | None]:
    try:
        (when,) = _REVOKED.unpack_from(value)
        rest = value[_REVOKED.size:]
        return from_us(when), rest[1:].decode() if rest else None
    except (struct.error, UnicodeDecodeError, OverflowError, ValueError) as exc:
        raise RecordError(f"revoked entry: {exc}") from exc


# current CRL/ARL of an issuer: key = issuer key id; value = crl id + its record key
def pack_current(crl_id: int, number: int) -> bytes:
    return id_key(crl_id) + number.to_bytes(21, "big")


def unpack_current(value: bytes) -> tuple[int, int]:
    if len(value) != 29:
        raise RecordError("current CRL pointer: wrong length")
    return key_id(value[:8]), int.from_bytes(value[8:], "big")


# -- documents ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DocRecord:
    id: int
    name: str
    version: int
    content_type: str
    size: int
    sha256: bytes
    lodged_at: datetime
    body: bytes


_DOC = struct.Struct(">qqq32sH")


def pack_doc(r: DocRecord) -> bytes:
    ct = r.content_type.encode()
    return _DOC.pack(r.id, r.size, to_us(r.lodged_at), r.sha256, len(ct)) + ct + r.body


def unpack_doc(key: bytes, value: bytes) -> DocRecord:
    try:
        doc_id, size, lodged, sha, lct = _DOC.unpack_from(value)
        name, version = key[:-5], key[-4:]
        p = _DOC.size
        ct = value[p:p + lct].decode()
        body = value[p + lct:]
        if len(body) != size or len(key) < 6 or key[-5] != 0:
            raise RecordError("document record: wrong length")
        return DocRecord(doc_id, name.decode(), int.from_bytes(version, "big"), ct, size, sha,
                         from_us(lodged), body)
    except (struct.error, UnicodeDecodeError, OverflowError, ValueError) as exc:
        raise RecordError(f"document record: {exc}") from exc
