"""Encoders of what a read-mostly LDAP server sends (RFC 4511): LDAPMessage framing, bind,
search, compare and extended responses, bare LDAPResults, the notice of disconnection, and
the RFC 2696 paged results control value (encoded for responses, decoded from requests).
Sans-I/O and pure: bytes out, nothing written.
"""

from __future__ import annotations

from collections.abc import Sequence

from repository_server.listeners.ldap.ber import (
    CONTROLS,
    ENUMERATED,
    INTEGER,
    OCTET_STRING,
    SEQUENCE,
    SET,
    BerError,
    done,
    enc_int,
    enc_str,
    enc_tlv,
    encode_length,
    expect,
    read_bytes,
    read_int,
)
from repository_server.listeners.ldap.protocol import (
    MAX_INT,
    NOTICE_OF_DISCONNECTION_OID,
    PAGED_RESULTS_OID,
    Control,
    ProtocolError,
)
from repository_server.pki.der import TlvError

__all__ = [
    "attribute_name",
    "bind_response",
    "compare_response",
    "decode_paged_results",
    "entry_op",
    "entry_op_named",
    "extended_response",
    "frame",
    "frames",
    "ldap_result",
    "notice_of_disconnection",
    "paged_results_control",
    "result_op",
    "search_result_done",
    "search_result_entry",
    "single_value_op",
]


def _enc_controls(controls: Sequence[Control]) -> bytes:
    if not controls:
        return b""
    parts = []
    for c in controls:
        body = enc_str(OCTET_STRING, c.oid)
        if c.critical:
            body += b"\x01\x01\xff"
        if c.value is not None:
            body += enc_str(OCTET_STRING, c.value)
        parts.append(enc_tlv(SEQUENCE, body))
    return enc_tlv(CONTROLS, b"".join(parts))


def _message(message_id: int, op: bytes, controls: Sequence[Control] = ()) -> bytes:
    if not 0 <= message_id <= MAX_INT:
        raise ValueError(f"message id {message_id} out of range")
    return enc_tlv(SEQUENCE, b"".join((enc_int(message_id), op, _enc_controls(controls))))


def frame(message_id: int, op: bytes, controls: Sequence[Control] = ()) -> bytes:
    """One LDAPMessage around an encoded protocolOp (see :func:`entry_op`, :func:`result_op`)."""
    return _message(message_id, op, controls)


def frames(message_id: int, ops: Sequence[bytes]) -> bytes:
    """Several responses to one request (entries, then the done), pre-encoded ops, one id."""
    mid = enc_int(message_id)
    return b"".join([b"".join((b"\x30", encode_length(len(mid) + len(op)), mid, op)) for op in ops])


def _result_body(result_code: int, matched_dn: str, message: str) -> bytes:
    return b"".join((enc_int(result_code, ENUMERATED), enc_str(OCTET_STRING, matched_dn),
                     enc_str(OCTET_STRING, message)))


def result_op(app_tag: int, result_code: int, matched_dn: str = "", message: str = "") -> bytes:
    """A bare LDAPResult protocolOp with this APPLICATION number."""
    if not 0 <= app_tag <= 30:
        raise ValueError(f"bad APPLICATION tag {app_tag}")
    return enc_tlv(0x60 | app_tag, _result_body(result_code, matched_dn, message))


def ldap_result(message_id: int, app_tag: int, result_code: int, matched_dn: str = "", message: str = "",
                controls: Sequence[Control] = ()) -> bytes:
    """A response that is a bare LDAPResult: ``app_tag`` is the APPLICATION number
    (5 searchResDone, 7 modify, 9 add, 11 del, 13 modDN, 15 compare; see
    ``request.response_tag`` for the update requests)."""
    if not 0 <= app_tag <= 30:
        raise ValueError(f"bad APPLICATION tag {app_tag}")
    return _message(message_id, enc_tlv(0x60 | app_tag, _result_body(result_code, matched_dn, message)),
                    controls)


def bind_response(message_id: int, result_code: int, matched_dn: str = "", message: str = "",
                  server_sasl_creds: bytes | None = None, controls: Sequence[Control] = ()) -> bytes:
    body = _result_body(result_code, matched_dn, message)
    if server_sasl_creds is not None:
        body += enc_str(0x87, server_sasl_creds)
    return _message(message_id, enc_tlv(0x61, body), controls)


def entry_op(dn: str, attributes: Sequence[tuple[str, Sequence[bytes]]]) -> bytes:
    """A SearchResultEntry protocolOp (values as given; an empty list for typesOnly)."""
    attrs = []
    for name, values in attributes:
        vals = b"".join([b"".join((b"\x04", encode_length(len(v)), v)) for v in values])
        attrs.append(enc_tlv(SEQUENCE, b"".join((enc_str(OCTET_STRING, name), enc_tlv(SET, vals)))))
    body = b"".join((enc_str(OCTET_STRING, dn), enc_tlv(SEQUENCE, b"".join(attrs))))
    return enc_tlv(0x64, body)


_NAMES: dict[str, bytes] = {}


def attribute_name(name: str) -> bytes:
    """An attribute description as its OCTET STRING element (memoised: a server names a
    few dozen)."""
    found = _NAMES.get(name)
    if found is None:
        found = enc_str(OCTET_STRING, name)
        if len(_NAMES) < 1024:
            _NAMES[name] = found
    return found


def entry_op_named(dn: bytes, attributes: Sequence[tuple[bytes, Sequence[bytes]]]) -> bytes:
    """`entry_op` with the DN already UTF-8 and each name already an element
    (`attribute_name`): the same octets for a third less work (the LDAP short way's)."""
    length = encode_length
    attrs = []
    for name, values in attributes:
        if len(values) == 1:
            value = values[0]
            vals = b"".join((b"\x04", length(len(value)), value))
        else:
            vals = b"".join([b"".join((b"\x04", length(len(v)), v)) for v in values])
        set_length = length(len(vals))
        attrs.append(b"".join((b"\x30", length(len(name) + 1 + len(set_length) + len(vals)),
                               name, b"\x31", set_length, vals)))
    body = b"".join(attrs)
    dn_length = length(len(dn))
    body_length = length(len(body))
    return b"".join((b"\x64", length(2 + len(dn_length) + len(dn) + len(body_length) + len(body)),
                     b"\x04", dn_length, dn, b"\x30", body_length, body))


def single_value_op(dn: bytes, name: bytes, value: bytes) -> bytes:
    """`entry_op_named` of one attribute with one value (a device's certificate), in one
    join: each octet written once."""
    length = encode_length
    value_length = length(len(value))
    set_size = 1 + len(value_length) + len(value)
    set_length = length(set_size)
    attr_size = len(name) + 1 + len(set_length) + set_size
    attr_length = length(attr_size)
    attrs_size = 1 + len(attr_length) + attr_size
    attrs_length = length(attrs_size)
    dn_length = length(len(dn))
    return b"".join((b"\x64", length(2 + len(dn_length) + len(dn) + len(attrs_length) + attrs_size),
                     b"\x04", dn_length, dn, b"\x30", attrs_length, b"\x30", attr_length, name,
                     b"\x31", set_length, b"\x04", value_length, value))


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
        body += enc_str(0x8A, oid)
    if value is not None:
        body += enc_str(0x8B, value)
    return _message(message_id, enc_tlv(0x78, body), controls)


def notice_of_disconnection(result_code: int, message: str = "") -> bytes:
    """RFC 4511 §4.4.1 unsolicited notification (message id 0); close the connection after it."""
    return extended_response(0, result_code, "", message, oid=NOTICE_OF_DISCONNECTION_OID)


def paged_results_control(size: int, cookie: bytes, critical: bool = False) -> Control:
    """RFC 2696 simple paged results control (realSearchControlValue ::= SEQUENCE {size, cookie})."""
    value = enc_tlv(SEQUENCE, enc_int(size) + enc_str(OCTET_STRING, cookie))
    return Control(PAGED_RESULTS_OID, critical, value)


def decode_paged_results(value: bytes | None) -> tuple[int, bytes]:
    """Decode an RFC 2696 control value -> (size, cookie); ProtocolError if malformed."""
    if value is None:
        raise ProtocolError(None, "paged results control without a value")
    try:
        s, e = expect(value, 0, len(value), SEQUENCE, "realSearchControlValue")
        done(e, len(value), "paged results control value")
        size, p = read_int(value, s, e, INTEGER, "size", 0, MAX_INT)
        cookie, p = read_bytes(value, p, e, "cookie")
        done(p, e, "realSearchControlValue")
    except (BerError, TlvError) as exc:
        raise ProtocolError(None, f"paged results control: {exc}") from None
    return size, cookie
