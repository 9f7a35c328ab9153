"""Sans-I/O LDAPv3 message codec (RFC 4511), h11 style: bytes in, typed requests out.

This module owns the decoding side: framing of LDAPMessage PDUs out of a byte stream
(:class:`Decoder`), and decoding of each PDU's requests and search filters into the typed
model of `ldap.protocol`. The BER subset of X.690 that RFC 4511 §5.1 allows (definite
lengths, low tag numbers) is read with the shared TLV reader (`pki.der`) through the
primitives of `ldap.ber`; the responses a read-mostly directory server sends are encoded
by `ldap.responses`. It does no I/O, no asyncio, no authentication and no search
evaluation; any malformed, oversized or too-deeply nested input raises
:class:`ProtocolError` (and nothing else), after which the connection should be answered
with :func:`notice_of_disconnection` and closed.

Decoding a SearchRequest is on the server's hot path (tens of thousands a second): the
readers are flat functions over ``(data, pos, end)`` offsets, without per-element objects.
"""

from __future__ import annotations

from repository_server.listeners.ldap.ber import (
    BOOLEAN,
    CONTROLS,
    ENUMERATED,
    INTEGER,
    SEQUENCE,
    BerError,
    boolean,
    done,
    expect,
    integer,
    read_bytes,
    read_int,
    read_str,
    text,
)
from repository_server.listeners.ldap.protocol import (
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_PDU,
    MAX_INT,
    AbandonRequest,
    AddRequest,
    And,
    ApproxMatch,
    BindRequest,
    CompareRequest,
    Control,
    DelRequest,
    EqualityMatch,
    ExtendedRequest,
    ExtensibleMatch,
    Filter,
    GreaterOrEqual,
    LessOrEqual,
    ModDNRequest,
    ModifyRequest,
    Not,
    Or,
    Present,
    ProtocolError,
    Request,
    SearchRequest,
    Substrings,
    UnbindRequest,
)
from repository_server.pki.der import TlvError, read_header, read_tlv

__all__ = [
    "Decoder",
    "decode_message",
    "message_id",
]


# ----------------------------------------------------------------------------- filters

_AVA_TYPES: dict[int, type[EqualityMatch | GreaterOrEqual | LessOrEqual | ApproxMatch]] = {
    0xA3: EqualityMatch, 0xA5: GreaterOrEqual, 0xA6: LessOrEqual, 0xA8: ApproxMatch,
}


def _filter(d: bytes, pos: int, end: int, depth: int, limit: int) -> tuple[Filter, int]:
    if depth > limit:
        raise BerError("filter nested too deeply")
    tag, _, s, e = read_tlv(d, pos, end)
    if tag == 0xA0 or tag == 0xA1:  # and / or (empty allowed: RFC 4526 absolute true/false)
        items: list[Filter] = []
        p = s
        while p < e:
            f, p = _filter(d, p, e, depth + 1, limit)
            items.append(f)
        return (And(tuple(items)) if tag == 0xA0 else Or(tuple(items))), e
    if tag == 0xA2:
        f, p = _filter(d, s, e, depth + 1, limit)
        done(p, e, "not filter")
        return Not(f), e
    cls = _AVA_TYPES.get(tag)
    if cls is not None:
        attr, p = read_str(d, s, e, "attributeDesc")
        val, p = read_bytes(d, p, e, "assertionValue")
        done(p, e, "attribute value assertion")
        return cls(attr, val), e
    if tag == 0x87:
        return Present(text(d, s, e)), e
    if tag == 0xA4:
        attr, p = read_str(d, s, e, "substrings type")
        ss, se = expect(d, p, e, SEQUENCE, "substrings")
        done(se, e, "substrings filter")
        initial: bytes | None = None
        final: bytes | None = None
        anys: list[bytes] = []
        q = ss
        n = 0
        while q < se:
            t, _, cs, ce = read_tlv(d, q, se)
            if final is not None:
                raise BerError("substring after final")
            if t == 0x80:
                if n:
                    raise BerError("initial substring not first")
                initial = d[cs:ce]
            elif t == 0x81:
                anys.append(d[cs:ce])
            elif t == 0x82:
                final = d[cs:ce]
            else:
                raise BerError(f"bad substring choice tag 0x{t:02x}")
            n += 1
            q = ce
        if not n:
            raise BerError("substrings filter without substrings")
        return Substrings(attr, initial, tuple(anys), final), e
    if tag == 0xA9:
        rule: str | None = None
        typ: str | None = None
        value: bytes | None = None
        dn_attrs = False
        p = s
        last = 0
        while p < e:
            t, _, cs, ce = read_tlv(d, p, e)
            if t <= last:
                raise BerError("matching rule assertion fields out of order")
            last = t
            if t == 0x81:
                rule = text(d, cs, ce)
            elif t == 0x82:
                typ = text(d, cs, ce)
            elif t == 0x83:
                value = d[cs:ce]
            elif t == 0x84:
                dn_attrs = boolean(d, cs, ce)
            else:
                raise BerError(f"bad matching rule assertion tag 0x{t:02x}")
            p = ce
        if value is None:
            raise BerError("extensible match without matchValue")
        return ExtensibleMatch(rule, typ, value, dn_attrs), e
    raise BerError(f"unknown filter tag 0x{tag:02x}")


# ----------------------------------------------------------------------------- messages


def _controls(d: bytes, s: int, e: int) -> tuple[Control, ...]:
    out: list[Control] = []
    p = s
    while p < e:
        cs, ce = expect(d, p, e, SEQUENCE, "Control")
        oid, q = read_str(d, cs, ce, "controlType")
        critical = False
        value: bytes | None = None
        if q < ce and d[q] == BOOLEAN:
            bs, q = expect(d, q, ce, BOOLEAN, "criticality")
            critical = boolean(d, bs, q)
        if q < ce:
            value, q = read_bytes(d, q, ce, "controlValue")
        done(q, ce, "Control")
        out.append(Control(oid, critical, value))
        p = ce
    return tuple(out)


def _bind(mid: int, d: bytes, s: int, e: int, ctl: tuple[Control, ...]) -> BindRequest:
    version, p = read_int(d, s, e, INTEGER, "version", 1, 127)
    name, p = read_str(d, p, e, "bind name")
    t, _, cs, ce = read_tlv(d, p, e)
    done(ce, e, "BindRequest")
    if t == 0x80:
        return BindRequest(mid, version, name, password=d[cs:ce], controls=ctl)
    if t == 0xA3:
        mech, q = read_str(d, cs, ce, "SASL mechanism")
        creds: bytes | None = None
        if q < ce:
            creds, q = read_bytes(d, q, ce, "SASL credentials")
        done(q, ce, "SaslCredentials")
        return BindRequest(mid, version, name, sasl_mechanism=mech, sasl_credentials=creds, controls=ctl)
    raise BerError(f"unsupported authentication choice 0x{t:02x}")


def _search(mid: int, d: bytes, s: int, e: int, ctl: tuple[Control, ...], limit: int) -> SearchRequest:
    base, p = read_str(d, s, e, "baseObject")
    # any scope decodes: one we do not know is answered, not a reason to disconnect
    scope, p = read_int(d, p, e, ENUMERATED, "scope", 0, MAX_INT)
    deref, p = read_int(d, p, e, ENUMERATED, "derefAliases", 0, 3)
    size_limit, p = read_int(d, p, e, INTEGER, "sizeLimit", 0, MAX_INT)
    time_limit, p = read_int(d, p, e, INTEGER, "timeLimit", 0, MAX_INT)
    bs, p = expect(d, p, e, BOOLEAN, "typesOnly")
    types_only = boolean(d, bs, p)
    flt, p = _filter(d, p, e, 3, limit)
    as_, ae = expect(d, p, e, SEQUENCE, "attributes")
    done(ae, e, "SearchRequest")
    attrs: list[str] = []
    q = as_
    while q < ae:
        a, q = read_str(d, q, ae, "attribute selector")
        attrs.append(a)
    return SearchRequest(mid, base, scope, deref, size_limit, time_limit, types_only, flt, tuple(attrs), ctl)


def _extended(mid: int, d: bytes, s: int, e: int, ctl: tuple[Control, ...]) -> ExtendedRequest:
    oid, p = read_str(d, s, e, "requestName", 0x80)
    value: bytes | None = None
    if p < e:
        value, p = read_bytes(d, p, e, "requestValue", 0x81)
    done(p, e, "ExtendedRequest")
    return ExtendedRequest(mid, oid, value, ctl)


def _compare(mid: int, d: bytes, s: int, e: int, ctl: tuple[Control, ...]) -> CompareRequest:
    entry, p = read_str(d, s, e, "entry")
    vs, ve = expect(d, p, e, SEQUENCE, "ava")
    done(ve, e, "CompareRequest")
    attr, q = read_str(d, vs, ve, "attributeDesc")
    value, q = read_bytes(d, q, ve, "assertionValue")
    done(q, ve, "ava")
    return CompareRequest(mid, entry, attr, value, ctl)


_UPDATES: dict[int, type[ModifyRequest | AddRequest | ModDNRequest]] = {
    0x66: ModifyRequest, 0x68: AddRequest, 0x6C: ModDNRequest,
}


def message_id(content: bytes) -> tuple[int, int] | None:
    """The message id and where the protocolOp starts, read cheaply from the content octets
    of an LDAPMessage when the id is a short positive INTEGER (what every client sends);
    None otherwise (then :func:`decode_message` says what is wrong).  A server answering
    from pre-encoded responses keys them on ``content[offset:]``."""
    if len(content) < 3 or content[0] != INTEGER:
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
        mid, p = read_int(d, 0, end, INTEGER, "messageID", 0, MAX_INT)
        tag, _, s, e = read_tlv(d, p, end)
        ctl: tuple[Control, ...] = ()
        if e < end:
            cs, ce = expect(d, e, end, CONTROLS, "controls")
            done(ce, end, "LDAPMessage")
            ctl = _controls(d, cs, ce)
        if tag == 0x63:
            return _search(mid, d, s, e, ctl, max_depth)
        if tag == 0x60:
            return _bind(mid, d, s, e, ctl)
        if tag == 0x42:
            done(s, e, "UnbindRequest")
            return UnbindRequest(mid, ctl)
        if tag == 0x50:
            return AbandonRequest(mid, integer(d, s, e, 0, MAX_INT), ctl)
        if tag == 0x77:
            return _extended(mid, d, s, e, ctl)
        if tag == 0x6E:
            return _compare(mid, d, s, e, ctl)
        if tag == 0x4A:
            return DelRequest(mid, text(d, s, e), ctl)
        cls = _UPDATES.get(tag)
        if cls is not None:
            dn, _ = read_str(d, s, e, "entry")
            return cls(mid, dn, ctl)
        raise BerError(f"unsupported protocolOp tag 0x{tag:02x}")
    except (BerError, TlvError) as exc:
        raise ProtocolError(mid, str(exc)) from None
    except (IndexError, ValueError, OverflowError, RecursionError) as exc:  # defensive
        raise ProtocolError(mid, f"malformed message: {exc.__class__.__name__}: {exc}") from None


def whole_message(data: bytes, max_pdu_size: int) -> bytes | None:
    """The content octets of the LDAPMessage when `data` is exactly one whole PDU within the
    size limit, else None (then `Decoder` frames it, and reports a malformed header)."""
    if len(data) < 2 or data[0] != SEQUENCE:
        return None
    try:
        header = read_header(data, 0, len(data))
    except TlvError:
        return None
    if header is not None and header[0] + header[1] == len(data) <= max_pdu_size:
        return data[header[0]:]
    return None


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
        if not buf:  # the usual case: the chunk is exactly one whole PDU (no copy)
            content = whole_message(data, self.max_pdu_size)
            if content is not None:
                return [content]
        buf += data
        out: list[bytes] = []
        pos = 0
        try:
            while True:
                avail = len(buf) - pos
                if avail < 1:
                    break
                if buf[pos] != SEQUENCE:
                    raise ProtocolError(None, f"expected LDAPMessage SEQUENCE, got tag 0x{buf[pos]:02x}")
                try:
                    header = read_header(buf, pos, len(buf))
                except TlvError as exc:
                    raise ProtocolError(None, str(exc)) from None
                if header is None:
                    break
                start, n = header
                total = start - pos + n
                if total > self.max_pdu_size:
                    raise ProtocolError(None, f"PDU of {total} bytes exceeds the {self.max_pdu_size} limit")
                if avail < total:
                    break
                out.append(bytes(buf[start:pos + total]))
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
