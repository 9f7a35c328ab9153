"""The shared TLV reader (`repository_server.pki.der`) that the certificate parsers and the
LDAP codec both use: well-formed elements in short and long form, and every way an element
can be malformed (truncated, indefinite, oversized, trailing bytes), checked against an
independent encoder and fuzzed so that only `TlvError` ever escapes."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repository_server.listeners.ldap import protocol
from repository_server.pki.der import (
    TlvError,
    children,
    decode_oid,
    encode_length,
    encode_oid,
    read_header,
    read_tlv,
)


def tlv(tag: int, content: bytes) -> bytes:
    """An independent DER encoder for the expectations (not `encode_length`)."""
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(raw)]) + raw + content


@pytest.mark.parametrize("size", [0, 1, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000])
def test_short_and_long_form_lengths(size: int) -> None:
    data = tlv(0x04, b"x" * size)
    tag, start, content, end = read_tlv(data, 0, len(data))
    assert (tag, start, end) == (0x04, 0, len(data))
    assert data[content:end] == b"x" * size
    assert read_header(data, 0, len(data)) == (content, size)
    assert encode_length(size) == data[1:content]


def test_a_sequence_of_children_at_an_offset() -> None:
    kids = [tlv(0x02, b"\x05"), tlv(0x0C, "é".encode()), tlv(0x30, tlv(0x05, b""))]
    body = tlv(0x30, b"".join(kids))
    data = b"\xff\xff" + body  # read from an offset, not from 0
    top = read_tlv(data, 2, len(data))
    assert top[:2] == (0x30, 2)
    found = children(data, top[2], top[3])
    assert [(t, data[s:e]) for t, s, _c, e in found] == [(k[0], k) for k in kids]


def test_high_tag_number_form_is_skipped() -> None:
    data = b"\x9f\x81\x01\x02ab"  # [context 129], 2 content octets
    assert read_tlv(data, 0, len(data)) == (0x9F, 0, 4, 6)
    with pytest.raises(TlvError, match="truncated tag"):
        read_tlv(b"\x1f\x81\x81", 0, 3)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated element at offset 0"),
        (b"\x04", "truncated element"),
        (b"\x04\x05abc", "runs past its container"),
        (b"\x04\x82\x01", "truncated length"),
        (b"\x04\x81", "truncated length"),
        (b"\x30\x80\x02\x01\x01\x00\x00", "indefinite length"),
        (b"\x04\x85\x00\x00\x00\x00\x01", "oversized length field"),
        (b"\x1f\x01", "truncated element"),  # a high tag number, then no length
    ],
)
def test_malformed_elements(data: bytes, message: str) -> None:
    with pytest.raises(TlvError, match=message):
        read_tlv(data, 0, len(data))


def test_an_element_never_reads_past_its_container() -> None:
    """`end` bounds the read even when the buffer holds more (a child of a SEQUENCE)."""
    data = tlv(0x04, b"abcd") + b"trailing"
    assert read_tlv(data, 0, len(data))[3] == 6  # trailing bytes are the caller's business
    with pytest.raises(TlvError, match="runs past"):
        read_tlv(data, 0, 5)
    with pytest.raises(TlvError, match="runs past"):
        children(tlv(0x04, b"ab") + b"\x04\x05", 0, 6)  # a trailing, truncated child


def test_read_header_waits_for_more_bytes() -> None:
    assert read_header(b"\x30", 0, 1) is None
    assert read_header(b"\x30\x82\x01", 0, 3) is None
    assert read_header(b"\x30\x81", 0, 2) is None
    assert read_header(b"\x30\x81\x80", 0, 3) == (3, 128)
    assert read_header(b"\x30\x82\x01\x00", 0, 4) == (4, 256)  # content not there yet
    with pytest.raises(TlvError, match="indefinite"):
        read_header(b"\x30\x80", 0, 2)
    with pytest.raises(TlvError, match="oversized length field"):
        read_header(b"\x30\x85", 0, 2)


@pytest.mark.parametrize("oid", ["2.5.4.3", "1.2.840.10045.4.3.2", "2.999.1", "0.9.2342.19200300.100.1.1"])
def test_oid_round_trip(oid: str) -> None:
    element = encode_oid(oid)
    tag, _start, content, end = read_tlv(element, 0, len(element))
    assert tag == 0x06 and decode_oid(element[content:end]) == oid


def test_malformed_oids() -> None:
    with pytest.raises(TlvError):
        decode_oid(b"")
    with pytest.raises(TlvError):
        decode_oid(b"\x2a\x86")  # last arc unfinished
    with pytest.raises(TlvError, match="128 bits"):
        decode_oid(b"\x2a" + b"\xff" * 20 + b"\x7f")


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=40), st.integers(min_value=0, max_value=40))
def test_fuzz_only_tlv_error_escapes(data: bytes, start: int) -> None:
    """Whatever the bytes, a read either fails with TlvError or returns an element that
    lies within the bounds it was given."""
    pos = min(start, len(data))
    try:
        tag, header, content, end = read_tlv(data, pos, len(data))
    except TlvError:
        pass
    else:
        assert header == pos < content <= end <= len(data) and tag == data[pos]
    try:
        head = read_header(data, pos, len(data))
    except TlvError:
        pass
    else:
        assert head is None or head[0] <= pos + 6
    try:
        for _t, _s, c, e in children(data, pos, len(data)):
            assert pos < c <= e <= len(data)
    except TlvError:
        pass


@pytest.mark.parametrize(
    ("inner", "reason"),
    [
        (b"\x04\x80\x00\x00", "indefinite length"),  # an indefinite baseObject
        (b"\x04\x85\x00\x00\x00\x00\x01", "oversized length field"),
        (b"\x04\x09abc", "runs past its container"),
    ],
)
def test_both_parsers_report_reader_errors_in_their_own_terms(inner: bytes, reason: str) -> None:
    """The same malformed element is a protocolError (with the message id) for LDAP and a
    one-line ParseError for the PKI: neither lets TlvError or IndexError escape."""
    from repository_server.listeners.ldap import codec
    from repository_server.pki.certificates import parse_certificate
    from repository_server.pki.errors import ParseError
    from repository_server.pki.pem import load_pem_or_der_certificates

    op = tlv(0x63, inner)
    with pytest.raises(protocol.ProtocolError) as ldap_error:
        codec.decode_message(b"\x02\x01\x09" + op)
    assert ldap_error.value.message_id == 9 and reason in ldap_error.value.reason

    with pytest.raises(ParseError, match=f"^DER: .*{reason}"):
        parse_certificate(tlv(0x30, inner))
    with pytest.raises(ParseError, match=f"PEM block 1: not a DER certificate: DER: .*{reason}"):
        load_pem_or_der_certificates(b"-----BEGIN CERTIFICATE-----\n" + base64.b64encode(inner)
                                     + b"\n-----END CERTIFICATE-----\n")
