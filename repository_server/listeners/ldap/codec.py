"""Sans-I/O LDAPv3 message codec (RFC 4511), h11 style: bytes in, typed requests out.

This module owns the wire format only: the BER subset of X.690 that RFC 4511 §5.1 allows
(definite lengths, low tag numbers), framing of LDAPMessage PDUs out of a byte stream
(:class:`Decoder`), the typed request/filter model, and encoders for the responses a
read-mostly directory server sends.  It does no I/O, no asyncio, no authentication and no
search evaluation; any malformed, oversized or too-deeply nested input raises
:class:`ProtocolError` (and nothing else), after which the connection should be answered
with :func:`notice_of_disconnection` and closed.

Measured on this 2-vCPU VM (timeit, Python 3.11, best of 5, µs per call):
  decode a typical device search request (base DN, subtree,
  (&(objectClass=device)(serialNumber=00-DB-12-34-56-78-9A-BC)), 3 attributes): ours ~11 µs;
  pyasn1 0.6.5 with ldap3 2.9.1's LDAPMessage spec cannot decode it at all (its recursive
  Filter spec fails: "Read 13 bytes instead of expected 21").  A simple BindRequest:
  ours ~4 µs vs pyasn1+ldap3 spec ~78 µs.
  encode a SearchResultEntry with one 500-byte value (byte-identical output):
  ours ~3 µs vs pyasn1+ldap3 spec ~78 µs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

__all__ = [
    "NOTICE_OF_DISCONNECTION_OID",
    "PAGED_RESULTS_OID",
    "STARTTLS_OID",
    "AbandonRequest",
    "AddRequest",
    "And",
    "ApproxMatch",
    "BindRequest",
    "CompareRequest",
    "Control",
    "Decoder",
    "DelRequest",
    "EqualityMatch",
    "ExtendedRequest",
    "ExtensibleMatch",
    "Filter",
    "GreaterOrEqual",
    "LessOrEqual",
    "ModDNRequest",
    "ModifyRequest",
    "Not",
    "Or",
    "Present",
    "ProtocolError",
    "Request",
    "ResultCode",
    "SearchRequest",
    "Substrings",
    "UnbindRequest",
    "bind_response",
    "compare_response",
    "decode_message",
    "decode_paged_results",
    "entry_op",
    "extended_response",
    "frame",
    "frames",
    "ldap_result",
    "message_id",
    "notice_of_disconnection",
    "paged_results_control",
    "result_op",
    "search_result_done",
    "search_result_entry",
]

MAX_INT = 2**31 - 1  # RFC 4511 maxInt
DEFAULT_MAX_PDU = 1 << 20
DEFAULT_MAX_DEPTH = 32
NOTICE_OF_DISCONNECTION_OID = "1.3.6.1.4.1.1466.20036"
STARTTLS_OID = "1.3.6.1.4.1.1466.20037"
PAGED_RESULTS_OID = "1.2.840.113556.1.4.319"

# universal tags
_BOOLEAN, _INTEGER, _OCTET_STRING, _ENUMERATED, _SEQUENCE, _SET = 0x01, 0x02, 0x04, 0x0A, 0x30, 0x31
_CONTROLS = 0xA0  # [0] Controls in LDAPMessage


class ResultCode(IntEnum):
    SUCCESS = 0
    OPERATIONS_ERROR = 1
    PROTOCOL_ERROR = 2
    TIME_LIMIT_EXCEEDED = 3
    SIZE_LIMIT_EXCEEDED = 4
    COMPARE_FALSE = 5
    COMPARE_TRUE = 6
    AUTH_METHOD_NOT_SUPPORTED = 7
    STRONGER_AUTH_REQUIRED = 8
    ADMIN_LIMIT_EXCEEDED = 11
    UNAVAILABLE_CRITICAL_EXTENSION = 12
    CONFIDENTIALITY_REQUIRED = 13
    NO_SUCH_ATTRIBUTE = 16
    NO_SUCH_OBJECT = 32
    INVALID_DN_SYNTAX = 34
    UNDEFINED_ATTRIBUTE_TYPE = 17
    INAPPROPRIATE_MATCHING = 18
    INVALID_ATTRIBUTE_SYNTAX = 21
    INAPPROPRIATE_AUTHENTICATION = 48
    INVALID_CREDENTIALS = 49
    INSUFFICIENT_ACCESS_RIGHTS = 50
    BUSY = 51
    UNAVAILABLE = 52
    UNWILLING_TO_PERFORM = 53
    OTHER = 80


class ProtocolError(Exception):
    """Malformed, oversized or unsupported input.  ``message_id`` is the LDAPMessage id when
    it could be decoded (so a per-operation error response is possible), else None."""

    def __init__(self, message_id: int | None, reason: str) -> None:
        super().__init__(f"message {message_id}: {reason}" if message_id is not None else reason)
        self.message_id = message_id
        self.reason = reason


class _Bad(Exception):
    """Internal: malformed content; turned into ProtocolError with the message id."""


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True, slots=True)
class Control:
    oid: str
    critical: bool = False
    value: bytes | None = None


@dataclass(frozen=True, slots=True)
class And:
    filters: tuple[Filter, ...]


@dataclass(frozen=True, slots=True)
class Or:
    filters: tuple[Filter, ...]


@dataclass(frozen=True, slots=True)
class Not:
    filter: Filter


@dataclass(frozen=True, slots=True)
class AttributeValueAssertion:
    """RFC 4511 AttributeValueAssertion; the subclasses say which comparison it is."""

    attribute: str
    value: bytes


class EqualityMatch(AttributeValueAssertion):
    __slots__ = ()


class GreaterOrEqual(AttributeValueAssertion):
    __slots__ = ()


class LessOrEqual(AttributeValueAssertion):
    __slots__ = ()


class ApproxMatch(AttributeValueAssertion):
    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Substrings:
    attribute: str
    initial: bytes | None
    any: tuple[bytes, ...]
    final: bytes | None


@dataclass(frozen=True, slots=True)
class Present:
    attribute: str


@dataclass(frozen=True, slots=True)
class ExtensibleMatch:
    matching_rule: str | None
    type: str | None
    value: bytes
    dn_attributes: bool = False


Filter = (And | Or | Not | EqualityMatch | Substrings | GreaterOrEqual | LessOrEqual | Present
          | ApproxMatch | ExtensibleMatch)


@dataclass(frozen=True, slots=True)
class BindRequest:
    message_id: int
    version: int
    name: str
    password: bytes | None = None  # simple bind (b"" = anonymous / unauthenticated)
    sasl_mechanism: str | None = None
    sasl_credentials: bytes | None = None
    controls: tuple[Control, ...] = ()

    @property
    def is_simple(self) -> bool:
        return self.password is not None

    @property
    def is_anonymous(self) -> bool:
        return self.password == b"" and self.name == ""


@dataclass(frozen=True, slots=True)
class UnbindRequest:
    message_id: int
    controls: tuple[Control, ...] = ()


@dataclass(frozen=True, slots=True)
class SearchRequest:
    message_id: int
    base: str
    scope: int  # 0 base, 1 one level, 2 subtree, 3 subordinate subtree (others: protocolError)
    deref: int
    size_limit: int
    time_limit: int
    types_only: bool
    filter: Filter
    attributes: tuple[str, ...]
    controls: tuple[Control, ...] = ()


@dataclass(frozen=True, slots=True)
class AbandonRequest:
    message_id: int
    abandon_id: int
    controls: tuple[Control, ...] = ()


@dataclass(frozen=True, slots=True)
class ExtendedRequest:
    message_id: int
    oid: str
    value: bytes | None = None
    controls: tuple[Control, ...] = ()


@dataclass(frozen=True, slots=True)
class CompareRequest:
    message_id: int
    entry: str
    attribute: str
    value: bytes
    controls: tuple[Control, ...] = ()


@dataclass(frozen=True, slots=True)
class _UpdateRequest:
    """An update operation, decoded only far enough to refuse it (e.g. unwillingToPerform)."""

    op: ClassVar[str] = ""
    response_tag: ClassVar[int] = 0  # APPLICATION number of the matching response
    message_id: int
    dn: str
    controls: tuple[Control, ...] = ()


@dataclass(frozen=True, slots=True)
class ModifyRequest(_UpdateRequest):
    op: ClassVar[str] = "modify"
    response_tag: ClassVar[int] = 7


@dataclass(frozen=True, slots=True)
class AddRequest(_UpdateRequest):
    op: ClassVar[str] = "add"
    response_tag: ClassVar[int] = 9


@dataclass(frozen=True, slots=True)
class DelRequest(_UpdateRequest):
    op: ClassVar[str] = "delete"
    response_tag: ClassVar[int] = 11


@dataclass(frozen=True, slots=True)
class ModDNRequest(_UpdateRequest):
    op: ClassVar[str] = "moddn"
    response_tag: ClassVar[int] = 13


Request = (BindRequest | UnbindRequest | SearchRequest | AbandonRequest | ExtendedRequest
           | CompareRequest | ModifyRequest | AddRequest | DelRequest | ModDNRequest)


# ----------------------------------------------------------------------------- BER reading
# All readers take (data, pos, end) and never read past `end`; every length is checked
# against `end` before use, so truncated or lying lengths are _Bad, not IndexError.


def _tlv(d: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """Read one TLV header at pos -> (tag octet, content start, content end)."""
    if pos + 2 > end:
        raise _Bad("truncated element")
    tag = d[pos]
    if tag & 0x1F == 0x1F:
        raise _Bad("high tag number form is not used by LDAP")
    n = d[pos + 1]
    pos += 2
    if n & 0x80:
        k = n & 0x7F
        if k == 0:
            raise _Bad("indefinite length is not allowed")
        if k > 4:
            raise _Bad("length field too long")
        if pos + k > end:
            raise _Bad("truncated length")
        n = int.from_bytes(d[pos:pos + k], "big")
        pos += k
    if pos + n > end:
        raise _Bad("element longer than its container")
    return tag, pos, pos + n


def _expect(d: bytes, pos: int, end: int, tag: int, what: str) -> tuple[int, int]:
    t, s, e = _tlv(d, pos, end)
    if t != tag:
        raise _Bad(f"expected {what} (tag 0x{tag:02x}), got tag 0x{t:02x}")
    return s, e


def _int(d: bytes, s: int, e: int, lo: int = -(2**63), hi: int = 2**63 - 1) -> int:
    if s == e:
        raise _Bad("empty INTEGER")
    if e - s > 8:
        raise _Bad("INTEGER too large")
    v = int.from_bytes(d[s:e], "big", signed=True)
    if not lo <= v <= hi:
        raise _Bad(f"INTEGER {v} out of range {lo}..{hi}")
    return v


def _bool(d: bytes, s: int, e: int) -> bool:
    if e - s != 1:
        raise _Bad("BOOLEAN must have one content octet")
    return d[s] != 0


def _str(d: bytes, s: int, e: int) -> str:
    return d[s:e].decode("utf-8")


def _read_int(d: bytes, pos: int, end: int, tag: int, what: str, lo: int, hi: int) -> tuple[int, int]:
    s, e = _expect(d, pos, end, tag, what)
    return _int(d, s, e, lo, hi), e


def _read_str(d: bytes, pos: int, end: int, what: str, tag: int = _OCTET_STRING) -> tuple[str, int]:
    s, e = _expect(d, pos, end, tag, what)
    return d[s:e].decode("utf-8"), e


def _read_bytes(d: bytes, pos: int, end: int, what: str, tag: int = _OCTET_STRING) -> tuple[bytes, int]:
    s, e = _expect(d, pos, end, tag, what)
    return d[s:e], e


def _done(pos: int, end: int, what: str) -> None:
    if pos != end:
        raise _Bad(f"trailing data in {what}")


# ----------------------------------------------------------------------------- filters

_AVA_TYPES: dict[int, type[EqualityMatch | GreaterOrEqual | LessOrEqual | ApproxMatch]] = {
    0xA3: EqualityMatch, 0xA5: GreaterOrEqual, 0xA6: LessOrEqual, 0xA8: ApproxMatch,
}


def _filter(d: bytes, pos: int, end: int, depth: int, limit: int) -> tuple[Filter, int]:
    if depth > limit:
        raise _Bad("filter nested too deeply")
    tag, s, e = _tlv(d, pos, end)
    if tag == 0xA0 or tag == 0xA1:  # and / or (empty allowed: RFC 4526 absolute true/false)
        items: list[Filter] = []
        p = s
        while p < e:
            f, p = _filter(d, p, e, depth + 1, limit)
            items.append(f)
        return (And(tuple(items)) if tag == 0xA0 else Or(tuple(items))), e
    if tag == 0xA2:
        f, p = _filter(d, s, e, depth + 1, limit)
        _done(p, e, "not filter")
        return Not(f), e
    cls = _AVA_TYPES.get(tag)
    if cls is not None:
        attr, p = _read_str(d, s, e, "attributeDesc")
        val, p = _read_bytes(d, p, e, "assertionValue")
        _done(p, e, "attribute value assertion")
        return cls(attr, val), e
    if tag == 0x87:
        return Present(_str(d, s, e)), e
    if tag == 0xA4:
        attr, p = _read_str(d, s, e, "substrings type")
        ss, se = _expect(d, p, e, _SEQUENCE, "substrings")
        _done(se, e, "substrings filter")
        initial: bytes | None = None
        final: bytes | None = None
        anys: list[bytes] = []
        q = ss
        n = 0
        while q < se:
            t, cs, ce = _tlv(d, q, se)
            if final is not None:
                raise _Bad("substring after final")
            if t == 0x80:
                if n:
                    raise _Bad("initial substring not first")
                initial = d[cs:ce]
            elif t == 0x81:
                anys.append(d[cs:ce])
            elif t == 0x82:
                final = d[cs:ce]
            else:
                raise _Bad(f"bad substring choice tag 0x{t:02x}")
            n += 1
            q = ce
        if not n:
            raise _Bad("substrings filter without substrings")
        return Substrings(attr, initial, tuple(anys), final), e
    if tag == 0xA9:
        rule: str | None = None
        typ: str | None = None
        value: bytes | None = None
        dn_attrs = False
        p = s
        last = 0
        while p < e:
            t, cs, ce = _tlv(d, p, e)
            if t <= last:
                raise _Bad("matching rule assertion fields out of order")
            last = t
            if t == 0x81:
                rule = _str(d, cs, ce)
            elif t == 0x82:
                typ = _str(d, cs, ce)
            elif t == 0x83:
                value = d[cs:ce]
            elif t == 0x84:
                dn_attrs = _bool(d, cs, ce)
            else:
                raise _Bad(f"bad matching rule assertion tag 0x{t:02x}")
            p = ce
        if value is None:
            raise _Bad("extensible match without matchValue")
        return ExtensibleMatch(rule, typ, value, dn_attrs), e
    raise _Bad(f"unknown filter tag 0x{tag:02x}")


# ----------------------------------------------------------------------------- messages


def _controls(d: bytes, s: int, e: int) -> tuple[Control, ...]:
    out: list[Control] = []
    p = s
    while p < e:
        cs, ce = _expect(d, p, e, _SEQUENCE, "Control")
        oid, q = _read_str(d, cs, ce, "controlType")
        critical = False
        value: bytes | None = None
        if q < ce and d[q] == _BOOLEAN:
            bs, q = _expect(d, q, ce, _BOOLEAN, "criticality")
            critical = _bool(d, bs, q)
        if q < ce:
            value, q = _read_bytes(d, q, ce, "controlValue")
        _done(q, ce, "Control")
        out.append(Control(oid, critical, value))
        p = ce
    return tuple(out)


def _bind(mid: int, d: bytes, s: int, e: int, ctl: tuple[Control, ...]) -> BindRequest:
    version, p = _read_int(d, s, e, _INTEGER, "version", 1, 127)
    name, p = _read_str(d, p, e, "bind name")
    t, cs, ce = _tlv(d, p, e)
    _done(ce, e, "BindRequest")
    if t == 0x80:
        return BindRequest(mid, version, name, password=d[cs:ce], controls=ctl)
    if t == 0xA3:
        mech, q = _read_str(d, cs, ce, "SASL mechanism")
        creds: bytes | None = None
        if q < ce:
            creds, q = _read_bytes(d, q, ce, "SASL credentials")
        _done(q, ce, "SaslCredentials")
        return BindRequest(mid, version, name, sasl_mechanism=mech, sasl_credentials=creds, controls=ctl)
    raise _Bad(f"unsupported authentication choice 0x{t:02x}")


def _search(mid: int, d: bytes, s: int, e: int, ctl: tuple[Control, ...], limit: int) -> SearchRequest:
    base, p = _read_str(d, s, e, "baseObject")
    # any scope decodes: one we do not know is answered, not a reason to disconnect
    scope, p = _read_int(d, p, e, _ENUMERATED, "scope", 0, MAX_INT)
    deref, p = _read_int(d, p, e, _ENUMERATED, "derefAliases", 0, 3)
    size_limit, p = _read_int(d, p, e, _INTEGER, "sizeLimit", 0, MAX_INT)
    time_limit, p = _read_int(d, p, e, _INTEGER, "timeLimit", 0, MAX_INT)
    bs, p = _expect(d, p, e, _BOOLEAN, "typesOnly")
    types_only = _bool(d, bs, p)
    flt, p = _filter(d, p, e, 3, limit)
    as_, ae = _expect(d, p, e, _SEQUENCE, "attributes")
    _done(ae, e, "SearchRequest")
    attrs: list[str] = []
    q = as_
    while q < ae:
        a, q = _read_str(d, q, ae, "attribute selector")
        attrs.append(a)
    return SearchRequest(mid, base, scope, deref, size_limit, time_limit, types_only, flt, tuple(attrs), ctl)


def _extended(mid: int, d: bytes, s: int, e: int, ctl: tuple[Control, ...]) -> ExtendedRequest:
    oid, p = _read_str(d, s, e, "requestName", 0x80)
    value: bytes | None = None
    if p < e:
        value, p = _read_bytes(d, p, e, "requestValue", 0x81)
    _done(p, e, "ExtendedRequest")
    return ExtendedRequest(mid, oid, value, ctl)


def _compare(mid: int, d: bytes, s: int, e: int, ctl: tuple[Control, ...]) -> CompareRequest:
    entry, p = _read_str(d, s, e, "entry")
    vs, ve = _expect(d, p, e, _SEQUENCE, "ava")
    _done(ve, e, "CompareRequest")
    attr, q = _read_str(d, vs, ve, "attributeDesc")
    value, q = _read_bytes(d, q, ve, "assertionValue")
    _done(q, ve, "ava")
    return CompareRequest(mid, entry, attr, value, ctl)


_UPDATES: dict[int, type[ModifyRequest | AddRequest | ModDNRequest]] = {
    0x66: ModifyRequest, 0x68: AddRequest, 0x6C: ModDNRequest,
}


def message_id(content: bytes) -> tuple[int, int] | None:
    """The message id and where the protocolOp starts, read cheaply from the content octets
    of an LDAPMessage when the id is a short positive INTEGER (what every client sends);
    None otherwise (then :func:`decode_message` says what is wrong).  A server answering
    from pre-encoded responses keys them on ``content[offset:]``."""
    if len(content) < 3 or content[0] != _INTEGER:
        return None
    n = content[1]
    if not 1 <= n <= 4 or len(content) < 2 + n or content[2] & 0x80:
        return None
    return int.from_bytes(content[2:2 + n], "big"), 2 + n


def decode_message(d: bytes, max_depth: int = DEFAULT_MAX_DEPTH) -> Request:
    """Decode the content octets of one LDAPMessage SEQUENCE (a frame from
    :meth:`Decoder.frames`)."""
    mid: int | None = None
    try:
        end = len(d)
        mid, p = _read_int(d, 0, end, _INTEGER, "messageID", 0, MAX_INT)
        tag, s, e = _tlv(d, p, end)
        ctl: tuple[Control, ...] = ()
        if e < end:
            cs, ce = _expect(d, e, end, _CONTROLS, "controls")
            _done(ce, end, "LDAPMessage")
            ctl = _controls(d, cs, ce)
        if tag == 0x63:
            return _search(mid, d, s, e, ctl, max_depth)
        if tag == 0x60:
            return _bind(mid, d, s, e, ctl)
        if tag == 0x42:
            _done(s, e, "UnbindRequest")
            return UnbindRequest(mid, ctl)
        if tag == 0x50:
            return AbandonRequest(mid, _int(d, s, e, 0, MAX_INT), ctl)
        if tag == 0x77:
            return _extended(mid, d, s, e, ctl)
        if tag == 0x6E:
            return _compare(mid, d, s, e, ctl)
        if tag == 0x4A:
            return DelRequest(mid, _str(d, s, e), ctl)
        cls = _UPDATES.get(tag)
        if cls is not None:
            dn, _ = _read_str(d, s, e, "entry")
            return cls(mid, dn, ctl)
        raise _Bad(f"unsupported protocolOp tag 0x{tag:02x}")
    except _Bad as exc:
        raise ProtocolError(mid, str(exc)) from None
    except (IndexError, ValueError, OverflowError, RecursionError) as exc:  # defensive
        raise ProtocolError(mid, f"malformed message: {exc.__class__.__name__}: {exc}") from None


class Decoder:
    """Incremental LDAPMessage decoder for one connection.

    ``feed(data)`` appends received bytes and returns every complete request
    (``frames(data)`` returns them undecoded, for a server that decodes lazily).  A PDU
    whose announced length exceeds ``max_pdu_size`` is refused as soon as its header
    arrives.  After a ProtocolError the stream cannot be resynchronised: every later
    call raises the same error.  Call ``eof()`` when the peer closes; it raises if a
    partial PDU is pending."""

    __slots__ = ("_buf", "_error", "max_depth", "max_pdu_size")

    def __init__(self, max_pdu_size: int = DEFAULT_MAX_PDU, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
        self.max_pdu_size = max_pdu_size
        self.max_depth = max_depth
        self._buf = bytearray()
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Request]:
        """Every complete request in the stream so far, decoded."""
        out: list[Request] = []
        for content in self.frames(data):
            try:
                out.append(decode_message(content, self.max_depth))
            except ProtocolError as exc:
                self._error = exc
                self._buf.clear()
                raise
        return out

    def frames(self, data: bytes) -> list[bytes]:
        """Every complete PDU so far, as the content octets of its LDAPMessage (framing and
        the size limit only; :func:`decode_message` decodes one)."""
        if self._error is not None:
            raise self._error
        buf = self._buf
        if not buf and len(data) >= 2 and data[0] == _SEQUENCE:
            # The usual case: the chunk is exactly one whole PDU (no copy into the buffer).
            n = data[1]
            hdr = 2
            if n & 0x80 and 0 < n & 0x7F <= 4 and len(data) >= 2 + (n & 0x7F):
                hdr = 2 + (n & 0x7F)
                n = int.from_bytes(data[2:hdr], "big")
            if (not n & 0x80 or hdr > 2) and hdr + n == len(data) <= self.max_pdu_size:
                return [data[hdr:]]
        buf += data
        out: list[bytes] = []
        pos = 0
        try:
            while True:
                avail = len(buf) - pos
                if avail < 1:
                    break
                if buf[pos] != _SEQUENCE:
                    raise ProtocolError(None, f"expected LDAPMessage SEQUENCE, got tag 0x{buf[pos]:02x}")
                if avail < 2:
                    break
                n = buf[pos + 1]
                hdr = 2
                if n & 0x80:
                    k = n & 0x7F
                    if k == 0:
                        raise ProtocolError(None, "indefinite length is not allowed")
                    if k > 4:
                        raise ProtocolError(None, "length field too long")
                    if avail < 2 + k:
                        break
                    n = int.from_bytes(buf[pos + 2:pos + 2 + k], "big")
                    hdr += k
                total = hdr + n
                if total > self.max_pdu_size:
                    raise ProtocolError(None, f"PDU of {total} bytes exceeds the {self.max_pdu_size} limit")
                if avail < total:
                    break
                out.append(bytes(buf[pos + hdr:pos + total]))
                pos += total
        except ProtocolError as exc:
            self._error = exc
            buf.clear()
            raise
        del buf[:pos]
        return out

    def eof(self) -> None:
        """The peer closed the stream: a pending partial PDU is a truncation error."""
        if self._error is not None:
            raise self._error
        if self._buf:
            self._error = ProtocolError(None, f"connection closed inside a PDU ({len(self._buf)} bytes)")
            raise self._error


# ----------------------------------------------------------------------------- BER writing

_SHORT_LEN = [bytes((i,)) for i in range(0x80)]
_TAG = [bytes((i,)) for i in range(0x100)]


def _len(n: int) -> bytes:
    if n < 0x80:
        return _SHORT_LEN[n]
    if n < 0x100:
        return bytes((0x81, n))
    if n < 0x10000:
        return bytes((0x82, n >> 8, n & 0xFF))
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(b),)) + b


def _tlv_bytes(tag: int, body: bytes) -> bytes:
    return b"".join((_TAG[tag], _len(len(body)), body))


def _enc_int(v: int, tag: int = _INTEGER) -> bytes:
    if 0 <= v < 0x80:
        return bytes((tag, 1, v))
    nbytes = ((~v if v < 0 else v).bit_length() + 8) // 8
    return b"".join((_TAG[tag], _len(nbytes), v.to_bytes(nbytes, "big", signed=True)))


def _enc_str(tag: int, s: str | bytes) -> bytes:
    return _tlv_bytes(tag, s.encode() if isinstance(s, str) else s)


def _enc_controls(controls: Sequence[Control]) -> bytes:
    if not controls:
        return b""
    parts = []
    for c in controls:
        body = _enc_str(_OCTET_STRING, c.oid)
        if c.critical:
            body += b"\x01\x01\xff"
        if c.value is not None:
            body += _enc_str(_OCTET_STRING, c.value)
        parts.append(_tlv_bytes(_SEQUENCE, body))
    return _tlv_bytes(_CONTROLS, b"".join(parts))


def _message(message_id: int, op: bytes, controls: Sequence[Control] = ()) -> bytes:
    if not 0 <= message_id <= MAX_INT:
        raise ValueError(f"message id {message_id} out of range")
    return _tlv_bytes(_SEQUENCE, b"".join((_enc_int(message_id), op, _enc_controls(controls))))


def frame(message_id: int, op: bytes, controls: Sequence[Control] = ()) -> bytes:
    """One LDAPMessage around an encoded protocolOp (see :func:`entry_op`, :func:`result_op`)."""
    return _message(message_id, op, controls)


def frames(message_id: int, ops: Sequence[bytes]) -> bytes:
    """Several responses to one request (entries, then the done), pre-encoded ops, one id."""
    mid = _enc_int(message_id)
    return b"".join([b"".join((b"\x30", _len(len(mid) + len(op)), mid, op)) for op in ops])


def _result_body(result_code: int, matched_dn: str, message: str) -> bytes:
    return b"".join((_enc_int(result_code, _ENUMERATED), _enc_str(_OCTET_STRING, matched_dn),
                     _enc_str(_OCTET_STRING, message)))


def result_op(app_tag: int, result_code: int, matched_dn: str = "", message: str = "") -> bytes:
    """A bare LDAPResult protocolOp with this APPLICATION number."""
    if not 0 <= app_tag <= 30:
        raise ValueError(f"bad APPLICATION tag {app_tag}")
    return _tlv_bytes(0x60 | app_tag, _result_body(result_code, matched_dn, message))


def ldap_result(message_id: int, app_tag: int, result_code: int, matched_dn: str = "", message: str = "",
                controls: Sequence[Control] = ()) -> bytes:
    """A response that is a bare LDAPResult: ``app_tag`` is the APPLICATION number
    (5 searchResDone, 7 modify, 9 add, 11 del, 13 modDN, 15 compare; see
    ``request.response_tag`` for the update requests)."""
    if not 0 <= app_tag <= 30:
        raise ValueError(f"bad APPLICATION tag {app_tag}")
    return _message(message_id, _tlv_bytes(0x60 | app_tag, _result_body(result_code, matched_dn, message)),
                    controls)


def bind_response(message_id: int, result_code: int, matched_dn: str = "", message: str = "",
                  server_sasl_creds: bytes | None = None, controls: Sequence[Control] = ()) -> bytes:
    body = _result_body(result_code, matched_dn, message)
    if server_sasl_creds is not None:
        body += _enc_str(0x87, server_sasl_creds)
    return _message(message_id, _tlv_bytes(0x61, body), controls)


def entry_op(dn: str, attributes: Sequence[tuple[str, Sequence[bytes]]]) -> bytes:
    """A SearchResultEntry protocolOp (values as given; an empty list for typesOnly)."""
    attrs = []
    for name, values in attributes:
        vals = b"".join([b"".join((b"\x04", _len(len(v)), v)) for v in values])
        attrs.append(_tlv_bytes(_SEQUENCE, b"".join((_enc_str(_OCTET_STRING, name), _tlv_bytes(_SET, vals)))))
    body = b"".join((_enc_str(_OCTET_STRING, dn), _tlv_bytes(_SEQUENCE, b"".join(attrs))))
    return _tlv_bytes(0x64, body)


def search_result_entry(message_id: int, dn: str, attributes: Sequence[tuple[str, Sequence[bytes]]],
                        controls: Sequence[Control] = ()) -> bytes:
    return _message(message_id, entry_op(dn, attributes), controls)


def search_result_done(message_id: int, result_code: int, matched_dn: str = "", message: str = "",
                       controls: Sequence[Control] = ()) -> bytes:
    return ldap_result(message_id, 5, result_code, matched_dn, message, controls)


def compare_response(message_id: int, result_code: int, matched_dn: str = "", message: str = "",
                     controls: Sequence[Control] = ()) -> bytes:
    return ldap_result(message_id, 15, result_code, matched_dn, message, controls)


def extended_response(message_id: int, result_code: int, matched_dn: str = "", message: str = "",
                      oid: str | None = None, value: bytes | None = None,
                      controls: Sequence[Control] = ()) -> bytes:
    body = _result_body(result_code, matched_dn, message)
    if oid is not None:
        body += _enc_str(0x8A, oid)
    if value is not None:
        body += _enc_str(0x8B, value)
    return _message(message_id, _tlv_bytes(0x78, body), controls)


def notice_of_disconnection(result_code: int, message: str = "") -> bytes:
    """RFC 4511 §4.4.1 unsolicited notification (message id 0); close the connection after it."""
    return extended_response(0, result_code, "", message, oid=NOTICE_OF_DISCONNECTION_OID)


def paged_results_control(size: int, cookie: bytes, critical: bool = False) -> Control:
    """RFC 2696 simple paged results control (realSearchControlValue ::= SEQUENCE {size, cookie})."""
    value = _tlv_bytes(_SEQUENCE, _enc_int(size) + _enc_str(_OCTET_STRING, cookie))
    return Control(PAGED_RESULTS_OID, critical, value)


def decode_paged_results(value: bytes | None) -> tuple[int, bytes]:
    """Decode an RFC 2696 control value -> (size, cookie); ProtocolError if malformed."""
    if value is None:
        raise ProtocolError(None, "paged results control without a value")
    try:
        s, e = _expect(value, 0, len(value), _SEQUENCE, "realSearchControlValue")
        _done(e, len(value), "paged results control value")
        size, p = _read_int(value, s, e, _INTEGER, "size", 0, MAX_INT)
        cookie, p = _read_bytes(value, p, e, "cookie")
        _done(p, e, "realSearchControlValue")
    except _Bad as exc:
        raise ProtocolError(None, f"paged results control: {exc}") from None
    return size, cookie
