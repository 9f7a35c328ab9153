"""BER primitives of the LDAP codec (RFC 4511 §5.1: definite lengths, low tag numbers):
typed readers of INTEGER, BOOLEAN, OCTET STRING and the like on top of the shared TLV reader
(`pki.der`), and the writers the responses are built from. Sans-I/O and pure.
"""

from __future__ import annotations

from repository_server.pki.der import encode_length, read_tlv

__all__ = [
    "BOOLEAN",
    "CONTROLS",
    "ENUMERATED",
    "INTEGER",
    "OCTET_STRING",
    "SEQUENCE",
    "SET",
    "BerError",
    "boolean",
    "done",
    "enc_int",
    "enc_str",
    "enc_tlv",
    "encode_length",
    "expect",
    "integer",
    "read_bytes",
    "read_int",
    "read_str",
    "text",
]

# universal tags, and the one context tag an LDAPMessage uses
BOOLEAN, INTEGER, OCTET_STRING, ENUMERATED, SEQUENCE, SET = 0x01, 0x02, 0x04, 0x0A, 0x30, 0x31
CONTROLS = 0xA0  # [0] Controls in LDAPMessage


class BerError(Exception):
    """Malformed content; the codec turns it into a ProtocolError with the message id."""


# All readers take (data, pos, end) and never read past `end`: the shared reader checks
# every length against `end`, so truncated or lying lengths are TlvError, not IndexError.


def expect(d: bytes, pos: int, end: int, tag: int, what: str) -> tuple[int, int]:
    t, _, s, e = read_tlv(d, pos, end)
    if t != tag:
        raise BerError(f"expected {what} (tag 0x{tag:02x}), got tag 0x{t:02x}")
    return s, e


def integer(d: bytes, s: int, e: int, lo: int = -(2**63), hi: int = 2**63 - 1) -> int:
    if s == e:
        raise BerError("empty INTEGER")
    if e - s > 8:
        raise BerError("INTEGER too large")
    v = int.from_bytes(d[s:e], "big", signed=True)
    if not lo <= v <= hi:
        raise BerError(f"INTEGER {v} out of range {lo}..{hi}")
    return v


def boolean(d: bytes, s: int, e: int) -> bool:
    if e - s != 1:
        raise BerError("BOOLEAN must have one content octet")
    return d[s] != 0


def text(d: bytes, s: int, e: int) -> str:
    return d[s:e].decode("utf-8")


def read_int(d: bytes, pos: int, end: int, tag: int, what: str, lo: int, hi: int) -> tuple[int, int]:
    s, e = expect(d, pos, end, tag, what)
    return integer(d, s, e, lo, hi), e


def read_str(d: bytes, pos: int, end: int, what: str, tag: int = OCTET_STRING) -> tuple[str, int]:
    s, e = expect(d, pos, end, tag, what)
    return d[s:e].decode("utf-8"), e


def read_bytes(d: bytes, pos: int, end: int, what: str, tag: int = OCTET_STRING) -> tuple[bytes, int]:
    s, e = expect(d, pos, end, tag, what)
    return d[s:e], e


def done(pos: int, end: int, what: str) -> None:
    if pos != end:
        raise BerError(f"trailing data in {what}")


# ----------------------------------------------------------------------------- writing

_TAG = [bytes((i,)) for i in range(0x100)]


def enc_tlv(tag: int, body: bytes) -> bytes:
    return b"".join((_TAG[tag], encode_length(len(body)), body))


def enc_int(v: int, tag: int = INTEGER) -> bytes:
    if 0 <= v < 0x80:
        return bytes((tag, 1, v))
    nbytes = ((~v if v < 0 else v).bit_length() + 8) // 8
    return b"".join((_TAG[tag], encode_length(nbytes), v.to_bytes(nbytes, "big", signed=True)))


def enc_str(tag: int, s: str | bytes) -> bytes:
    return enc_tlv(tag, s.encode() if isinstance(s, str) else s)


