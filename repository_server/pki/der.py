"""The one tag-length-value reader of X.690 encodings, shared by the PKI (DER certificates
and CRLs) and the LDAP codec (BER, which RFC 4511 §5.1 restricts to definite lengths).

What both need is the same: find where an element's content starts and ends without ever
reading past its container, and refuse what neither may carry (indefinite lengths, length
fields over four octets, lengths that run past the container). Stricter DER rules (minimal
lengths, sorted SETs) are not checked here: the PKI keeps the original bytes and leaves
full DER validation to `cryptography`. The reader accepts the high tag number form (a
certificate may carry one in a value the PKI only skips); the tag it returns is then the
first identifier octet, which matches none of the low tags LDAP expects, so LDAP refuses
such an element wherever it reads one.

Every function is pure, works on `bytes` or `bytearray` between explicit offsets, and
raises `TlvError` (never IndexError) on malformed input; callers turn it into their own
error (`ParseError` for the PKI, a protocolError for LDAP).
"""

from __future__ import annotations

import functools

__all__ = [
    "Tlv",
    "TlvError",
    "children",
    "decode_oid",
    "encode_length",
    "encode_oid",
    "read_header",
    "read_tlv",
]

#: (tag, header start, content start, content end) of one element.
Tlv = tuple[int, int, int, int]

_MAX_LENGTH_OCTETS = 4  # 4 GiB: more than anything either side accepts


class TlvError(ValueError):
    """Malformed tag-length-value encoding; the message names the offset."""


def read_tlv(buf: bytes | bytearray, pos: int, end: int) -> Tlv:
    """The element starting at `pos`, which must end no later than `end`.

    On the LDAP server's hot path (a SearchRequest reads about twenty elements): one flat
    function for the common case (one tag octet, short or one-octet long-form length). The
    one-octet long form (elements of 128 to 255 octets, such as a typical SearchRequest) is
    read inline because a helper call costs more than the read itself (0.33 us against
    0.18 us an element through `_long_form`, timeit, Python 3.11)."""
    if pos + 2 > end:
        raise TlvError(f"truncated element at offset {pos}")
    tag = buf[pos]
    at = pos + 1 if tag & 0x1F != 0x1F else _skip_tag_number(buf, pos, end)
    length = buf[at]
    at += 1
    if length & 0x80:
        if length == 0x81 and at < end:  # 128..255 octets: most long forms LDAP reads
            length = buf[at]
            at += 1
        else:
            long_form = _long_form(buf, pos, at, end)
            if long_form is None:
                raise TlvError(f"truncated length at offset {pos}")
            at, length = long_form
    if at + length > end:
        raise TlvError(f"element at offset {pos} runs past its container")
    return tag, pos, at, at + length


def _skip_tag_number(buf: bytes | bytearray, pos: int, end: int) -> int:
    """Where the length octets start after the high tag number form identifier at `pos`."""
    at = pos + 1
    while True:
        if at >= end:
            raise TlvError(f"truncated tag at offset {pos}")
        more = buf[at] & 0x80
        at += 1
        if not more:
            break
    if at >= end:
        raise TlvError(f"truncated element at offset {pos}")
    return at


def read_header(buf: bytes | bytearray, pos: int, end: int) -> tuple[int, int] | None:
    """(content start, content length) of the element whose header starts at `pos`, for a
    reader framing a byte stream: None while the header is still incomplete (more bytes
    may come); its content may not have arrived yet. Only low tag numbers (one identifier
    octet), as in LDAP. Raises `TlvError` for an indefinite or over-long length field."""
    if end - pos < 2:
        return None
    length = buf[pos + 1]
    at = pos + 2
    if length & 0x80:
        if length == 0x81 and at < end:  # as in read_tlv
            return at + 1, buf[at]
        return _long_form(buf, pos, at, end)
    return at, length


def _long_form(buf: bytes | bytearray, pos: int, at: int, end: int) -> tuple[int, int] | None:
    """(content start, length) from the long-form length whose first octet is `buf[at - 1]`,
    for the element at `pos`; None if its length octets run past `end`."""
    count = buf[at - 1] & 0x7F
    if count == 0:
        raise TlvError(f"indefinite length at offset {pos}")
    if count > _MAX_LENGTH_OCTETS:
        raise TlvError(f"oversized length field at offset {pos}")
    if at + count > end:
        return None
    return at + count, int.from_bytes(buf[at : at + count], "big")


def children(buf: bytes | bytearray, start: int, end: int) -> list[Tlv]:
    """The elements filling `buf[start:end]` exactly (the content of a SEQUENCE or SET)."""
    out: list[Tlv] = []
    pos = start
    while pos < end:
        item = read_tlv(buf, pos, end)
        out.append(item)
        pos = item[3]
    return out


@functools.lru_cache(maxsize=2048)
def decode_oid(content: bytes) -> str:
    """Dotted form of the content octets of an OBJECT IDENTIFIER (cached: certificates
    repeat a few dozen OIDs)."""
    if not content or content[-1] & 0x80:
        raise TlvError("malformed OBJECT IDENTIFIER")
    arcs: list[int] = []
    value = 0
    for octet in content:
        value = (value << 7) | (octet & 0x7F)
        if value >> 128:
            raise TlvError("OBJECT IDENTIFIER arc longer than 128 bits")
        if not octet & 0x80:
            arcs.append(value)
            value = 0
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(arc) for arc in head + arcs[1:])


_SHORT_LENGTH = [bytes((n,)) for n in range(0x80)]


def encode_length(n: int) -> bytes:
    """The definite length octets for `n` content octets, in the shortest form (DER).

    On the LDAP server's hot path (every response element): the short forms are
    precomputed and the one- and two-octet long forms built without `to_bytes`."""
    if n < 0x80:
        return _SHORT_LENGTH[n]
    if n < 0x100:
        return bytes((0x81, n))
    if n < 0x10000:
        return bytes((0x82, n >> 8, n & 0xFF))
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(raw),)) + raw


def encode_oid(dotted: str) -> bytes:
    """The whole DER OBJECT IDENTIFIER element (tag 06) for a dotted OID."""
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return b"\x06" + encode_length(len(body)) + bytes(body)
