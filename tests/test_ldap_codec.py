"""The sans-I/O LDAP codec against real BER from ldap3/pyasn1 (offline), plus limits and fuzzing."""

from __future__ import annotations

import contextlib
import importlib.util
import random
import sys
import time
from pathlib import Path
from typing import Any

import ldap3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ldap3.operation.abandon import abandon_operation
from ldap3.operation.bind import bind_operation
from ldap3.operation.compare import compare_operation
from ldap3.operation.extended import extended_operation
from ldap3.operation.search import search_operation
from ldap3.operation.unbind import unbind_operation
from ldap3.protocol.rfc4511 import LDAPMessage
from pyasn1.codec.ber import decoder as ber_decoder

from repository_server.listeners.ldap import ber, protocol, responses
from repository_server.listeners.ldap import codec as c
from tests.ldaptools import pdu, sample_requests

BENCH_FILTER = Path(__file__).resolve().parents[2] / "shared" / "bench" / "ldapfilter.py"


def search_pdu(flt: str, msg_id: int = 7, attrs: Any = None, controls: Any = None, scope: str = "SUBTREE",
               size_limit: int = 0) -> bytes:
    req = search_operation("ou=devices,dc=smki", flt, getattr(ldap3, scope), ldap3.DEREF_NEVER,
                           attrs if attrs is not None else ["cn", "userCertificate;binary"],
                           size_limit, 30, False, True, True)
    return pdu(msg_id, "searchRequest", req, controls)


def decode_one(data: bytes) -> protocol.Request:
    out = c.Decoder().feed(data)
    assert len(out) == 1
    return out[0]


def asn1(data: bytes) -> Any:
    msg, rest = ber_decoder.decode(data, asn1Spec=LDAPMessage())
    assert rest == b""
    return msg


# ------------------------------------------------------------------ requests from ldap3

def test_search_complex_filter() -> None:
    flt = ("(&(objectClass=device)(|(cn=ab*cd*ef*gh)(cn=*x)(cn=y*))(!(serialNumber=00-DB))"
           "(notBefore>=20240101)(notAfter<=20300101)(description=*)(sn~=smith)"
           "(cn:caseExactMatch:=Foo)(:dn:2.5.13.5:=bar))")
    paged = responses.paged_results_control(50, b"ck")
    req = decode_one(search_pdu(flt, 7, size_limit=100,
                                controls=[(paged.oid, True, paged.value)]))
    assert isinstance(req, protocol.SearchRequest)
    assert (req.message_id, req.base, req.scope, req.deref) == (7, "ou=devices,dc=smki", 2, 0)
    assert (req.size_limit, req.time_limit, req.types_only) == (100, 30, False)
    assert req.attributes == ("cn", "userCertificate;binary")
    assert req.controls == (protocol.Control(protocol.PAGED_RESULTS_OID, True, paged.value),)
    assert responses.decode_paged_results(req.controls[0].value) == (50, b"ck")
    assert req.filter == protocol.And((
        protocol.EqualityMatch("objectClass", b"device"),
        protocol.Or((protocol.Substrings("cn", b"ab", (b"cd", b"ef"), b"gh"),
              protocol.Substrings("cn", None, (), b"x"),
              protocol.Substrings("cn", b"y", (), None))),
        protocol.Not(protocol.EqualityMatch("serialNumber", b"00-DB")),
        protocol.GreaterOrEqual("notBefore", b"20240101"),
        protocol.LessOrEqual("notAfter", b"20300101"),
        protocol.Present("description"),
        protocol.ApproxMatch("sn", b"smith"),
        protocol.ExtensibleMatch("caseExactMatch", "cn", b"Foo", False),
        protocol.ExtensibleMatch("2.5.13.5", None, b"bar", True),
    ))


def test_search_scopes_and_no_attributes() -> None:
    req = decode_one(search_pdu("(objectClass=*)", 1, attrs=[], scope="BASE"))
    assert isinstance(req, protocol.SearchRequest)
    assert req.scope == 0 and req.attributes == () and req.filter == protocol.Present("objectClass")
    req = decode_one(search_pdu("(CN=Mixed)", 2, attrs=["*"], scope="LEVEL"))
    assert isinstance(req, protocol.SearchRequest)
    assert req.scope == 1 and req.attributes == ("*",)
    assert req.filter == protocol.EqualityMatch("CN", b"Mixed")


def test_binds() -> None:
    simple = decode_one(pdu(1, "bindRequest", bind_operation(3, ldap3.SIMPLE, "cn=admin", "s3cret")))
    assert simple == protocol.BindRequest(1, 3, "cn=admin", password=b"s3cret")
    assert simple.is_simple and not simple.is_anonymous
    anon = decode_one(pdu(2, "bindRequest", bind_operation(3, ldap3.ANONYMOUS, "", None)))
    assert isinstance(anon, protocol.BindRequest)
    assert anon.is_anonymous and anon.name == "" and anon.password == b""
    sasl = decode_one(pdu(3, "bindRequest", bind_operation(3, ldap3.SASL, "", None, "EXTERNAL", b"")))
    assert isinstance(sasl, protocol.BindRequest)
    assert sasl.sasl_mechanism == "EXTERNAL" and sasl.password is None


def test_other_operations() -> None:
    assert decode_one(pdu(4, "extendedReq", extended_operation(protocol.STARTTLS_OID))) == \
        protocol.ExtendedRequest(4, protocol.STARTTLS_OID, None)
    assert decode_one(pdu(5, "abandonRequest", abandon_operation(3))) == protocol.AbandonRequest(5, 3)
    assert decode_one(pdu(6, "unbindRequest", unbind_operation())) == protocol.UnbindRequest(6)
    cmp = compare_operation("cn=x,dc=smki", "description", "keyAgreement", False)
    assert decode_one(pdu(8, "compareRequest", cmp)) == \
        protocol.CompareRequest(8, "cn=x,dc=smki", "description", b"keyAgreement")


def test_update_requests_minimal() -> None:
    def msg(op: bytes) -> bytes:
        body = b"\x02\x01\x09" + op
        return bytes((0x30, len(body))) + body

    dn = b"\x04\x04cn=x"
    dele = decode_one(msg(b"\x4a\x04cn=x"))
    assert isinstance(dele, protocol.DelRequest) and dele.dn == "cn=x" and dele.op == "delete"
    add = decode_one(msg(b"\x68\x08" + dn + b"\x30\x00"))
    assert isinstance(add, protocol.AddRequest) and add.dn == "cn=x" and add.response_tag == 9
    mod = decode_one(msg(b"\x66\x08" + dn + b"\x30\x00"))
    assert isinstance(mod, protocol.ModifyRequest) and mod.op == "modify"
    moddn = decode_one(msg(b"\x6c\x0f" + dn + b"\x04\x04cn=y\x01\x01\xff"))
    assert isinstance(moddn, protocol.ModDNRequest) and moddn.dn == "cn=x"


def test_bench_filter_compiler() -> None:
    spec = importlib.util.spec_from_file_location("bench_ldapfilter", BENCH_FILTER)
    if spec is None or spec.loader is None or not BENCH_FILTER.exists():
        pytest.skip("shared/bench/ldapfilter.py not available")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_ldapfilter", mod)
    spec.loader.exec_module(mod)
    cases = {
        "(&(serialNumber=00-DB-12-34-56-78-9A-BC)(description=keyAgreement))":
            protocol.And((protocol.EqualityMatch("serialNumber", b"00-DB-12-34-56-78-9A-BC"),
                   protocol.EqualityMatch("description", b"keyAgreement"))),
        "objectClass=*": protocol.Present("objectClass"),
        "(&)": protocol.And(()),
        "(|)": protocol.Or(()),
        "(cn=a\\2ab*c\\29)": protocol.Substrings("cn", b"a*b", (), b"c)"),
        "(userCertificate;binary:dn:1.2.3:=v)":
            protocol.ExtensibleMatch("1.2.3", "userCertificate;binary", b"v", True),
    }
    for text, want in cases.items():
        fber = mod.encode_filter(text, placeholders=False)
        op = (ber.enc_str(0x04, "dc=smki") + b"\x0a\x01\x02\x0a\x01\x00\x02\x01\x00\x02\x01\x00\x01\x01\x00"
              + fber + b"\x30\x00")
        body = b"\x02\x01\x02" + ber.enc_tlv(0x63, op)
        req = decode_one(ber.enc_tlv(0x30, body))
        assert isinstance(req, protocol.SearchRequest) and req.filter == want, text


# ------------------------------------------------------------------ responses decoded by pyasn1

def test_responses_decode_with_pyasn1() -> None:
    m = asn1(responses.bind_response(1, protocol.ResultCode.INVALID_CREDENTIALS, "", "bad password"))
    assert int(m["messageID"]) == 1 and m["protocolOp"].getName() == "bindResponse"
    op = m["protocolOp"]["bindResponse"]
    assert int(op["resultCode"]) == 49 and str(op["diagnosticMessage"]) == "bad password"

    big = bytes(range(256)) * 2
    attributes = [("cn", [b"dev"]), ("userCertificate;binary", [big, b"x"]), ("empty", [])]
    m = asn1(responses.search_result_entry(300, "cn=dev,dc=smki", attributes))
    assert int(m["messageID"]) == 300
    op = m["protocolOp"]["searchResEntry"]
    assert str(op["object"]) == "cn=dev,dc=smki"
    attrs = [(str(a["type"]), [bytes(v) for v in a["vals"]]) for a in op["attributes"]]
    assert attrs == [("cn", [b"dev"]), ("userCertificate;binary", [big, b"x"]), ("empty", [])]

    m = asn1(responses.search_result_done(9, 0, controls=[responses.paged_results_control(0, b"next")]))
    op = m["protocolOp"]["searchResDone"]
    assert int(op["resultCode"]) == 0 and str(op["matchedDN"]) == ""
    ctl = m["controls"][0]
    assert str(ctl["controlType"]) == protocol.PAGED_RESULTS_OID
    assert responses.decode_paged_results(bytes(ctl["controlValue"])) == (0, b"next")

    m = asn1(responses.extended_response(4, 0, oid=protocol.STARTTLS_OID))
    op = m["protocolOp"]["extendedResp"]
    assert int(op["resultCode"]) == 0 and str(op["responseName"]) == protocol.STARTTLS_OID

    m = asn1(responses.notice_of_disconnection(protocol.ResultCode.PROTOCOL_ERROR, "malformed PDU"))
    assert int(m["messageID"]) == 0
    op = m["protocolOp"]["extendedResp"]
    assert str(op["responseName"]) == protocol.NOTICE_OF_DISCONNECTION_OID and int(op["resultCode"]) == 2

    m = asn1(responses.compare_response(8, protocol.ResultCode.COMPARE_TRUE))
    assert int(m["protocolOp"]["compareResponse"]["resultCode"]) == 6
    for tag, name in ((7, "modifyResponse"), (9, "addResponse"), (11, "delResponse"), (13, "modDNResponse")):
        m = asn1(responses.ldap_result(2**31 - 1, tag, protocol.ResultCode.UNWILLING_TO_PERFORM,
                                       "dc=smki", "read-only"))
        assert m["protocolOp"].getName() == name
        op = m["protocolOp"][name]
        assert int(op["resultCode"]) == 53 and str(op["matchedDN"]) == "dc=smki"


def test_integer_encoding_roundtrip() -> None:
    for v in (0, 1, 127, 128, 255, 256, -1, -128, -129, 2**31 - 1, -(2**31)):
        enc = ber.enc_int(v)
        assert int(ber_decoder.decode(enc)[0]) == v
        assert ber.integer(enc, 2, len(enc)) == v


# ------------------------------------------------------------------ streaming

def test_byte_at_a_time_and_pipelined() -> None:
    data = search_pdu("(&(cn=a*)(!(sn=b)))", 11)
    dec = c.Decoder()
    got: list[protocol.Request] = []
    for i in range(len(data)):
        got += dec.feed(data[i:i + 1])
        if i < len(data) - 1:
            assert not got
    assert len(got) == 1 and got[0].message_id == 11
    dec.eof()
    assert dec.buffered == 0

    stream = b"".join(search_pdu("(cn=x)", i) for i in range(1, 6))
    stream += pdu(6, "unbindRequest", unbind_operation())
    dec = c.Decoder()
    out = dec.feed(stream[:50]) + dec.feed(stream[50:])
    assert [r.message_id for r in out] == [1, 2, 3, 4, 5, 6]
    assert isinstance(out[-1], protocol.UnbindRequest)


# ------------------------------------------------------------------ limits

def bad(data: bytes, **kw: int) -> protocol.ProtocolError:
    dec = c.Decoder(**kw)
    with pytest.raises(protocol.ProtocolError) as ei:
        dec.feed(data)
        dec.eof()
    with pytest.raises(protocol.ProtocolError):  # the decoder stays failed
        dec.feed(b"")
    return ei.value


def test_limits() -> None:
    assert "exceeds" in bad(b"\x30\x84\x7f\xff\xff\xff").reason  # refused from the header alone
    assert "exceeds" in bad(search_pdu("(cn=x)"), max_pdu_size=20).reason
    assert "indefinite" in bad(b"\x30\x80\x02\x01\x01\x42\x00\x00\x00").reason
    assert "length field" in bad(b"\x30\x85\x00\x00\x00\x00\x05").reason
    assert "closed inside" in bad(search_pdu("(cn=x)")[:-3]).reason  # truncated at EOF
    assert bad(b"GET / HTTP/1.1\r\n").message_id is None
    # nesting: 40 nested NOTs
    fber = b"\x87\x02cn"
    for _ in range(40):
        fber = ber.enc_tlv(0xA2, fber)
    op = (b"\x04\x00\x0a\x01\x02\x0a\x01\x00\x02\x01\x00\x02\x01\x00\x01\x01\x00" + fber + b"\x30\x00")
    deep = ber.enc_tlv(0x30, b"\x02\x01\x05" + ber.enc_tlv(0x63, op))
    err = bad(deep)
    assert err.message_id == 5 and "deeply" in err.reason
    # inner length lying about its container, bad UTF-8, bad scope, empty INTEGER
    assert bad(b"\x30\x05\x02\x01\x01\x4a\x05").message_id == 1
    assert bad(b"\x30\x06\x02\x01\x01\x4a\x01\xff").message_id == 1
    assert bad(search_pdu("(cn=x)", 3).replace(b"\x0a\x01\x02", b"\x0a\x01\xff", 1)).message_id == 3
    # an unknown scope decodes (the server answers it with protocolError, as slapd does)
    assert decode_one(search_pdu("(cn=x)", 3).replace(b"\x0a\x01\x02", b"\x0a\x01\x07", 1)).scope == 7
    assert bad(b"\x30\x02\x02\x00").message_id is None
    assert "unsupported protocolOp" in bad(b"\x30\x05\x02\x01\x01\x61\x00").reason
    with pytest.raises(protocol.ProtocolError):
        responses.decode_paged_results(b"\x30\x03\x02\x01")


def test_depth_limit_boundary() -> None:
    def nested(n: int) -> bytes:
        fber = b"\x87\x02cn"
        for _ in range(n):
            fber = ber.enc_tlv(0xA2, fber)
        op = b"\x04\x00\x0a\x01\x02\x0a\x01\x00\x02\x01\x00\x02\x01\x00\x01\x01\x00" + fber + b"\x30\x00"
        return ber.enc_tlv(0x30, b"\x02\x01\x05" + ber.enc_tlv(0x63, op))

    assert isinstance(c.Decoder(max_depth=32).feed(nested(29))[0], protocol.SearchRequest)
    with pytest.raises(protocol.ProtocolError):
        c.Decoder(max_depth=32).feed(nested(30))


# ------------------------------------------------------------------ fuzz

VALID = [
    search_pdu("(&(objectClass=device)(|(cn=ab*cd*ef)(!(sn~=x)))(cn:1.2:=v)(a>=1)(b<=2)(c=*))", 3,
               controls=[(protocol.PAGED_RESULTS_OID, False,
                          responses.paged_results_control(10, b"").value)]),
    pdu(1, "bindRequest", bind_operation(3, ldap3.SIMPLE, "cn=admin", "pw")),
    pdu(4, "extendedReq", extended_operation(protocol.STARTTLS_OID)),
    pdu(8, "compareRequest", compare_operation("cn=x", "description", "k", False)),
    # every kind the server handles: binds, searches with controls, abandon, updates, unbind
    *sample_requests("00-DB-12-34-56-78-9A-BC", "0A1B2C"),
]


def check_decode(data: bytes) -> None:
    dec = c.Decoder(max_pdu_size=4096)
    t0 = time.perf_counter()
    try:
        for r in dec.feed(data):
            assert isinstance(r, protocol.Request)
            for control in r.controls:  # the paged results value is decoded when used
                if control.oid == protocol.PAGED_RESULTS_OID:
                    with contextlib.suppress(protocol.ProtocolError):
                        size, cookie = responses.decode_paged_results(control.value)
                        assert size >= 0 and isinstance(cookie, bytes)
        dec.eof()
    except protocol.ProtocolError:
        pass
    assert time.perf_counter() - t0 < 0.5


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_random(data: bytes) -> None:
    check_decode(data)
    check_decode(b"\x30" + data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(VALID), min_size=1, max_size=3),
       st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
       st.lists(st.tuples(st.integers(0, 10_000), st.binary(min_size=1, max_size=6)), max_size=2),
       st.integers(0, 1200))
def test_fuzz_mutations(bases: list[bytes], flips: list[tuple[int, int]],
                        inserts: list[tuple[int, bytes]], cut: int) -> None:
    data = bytearray(b"".join(bases))  # pipelined PDUs, as clients send them
    for pos, val in flips:
        data[pos % len(data)] = val
    for pos, extra in inserts:
        at = pos % (len(data) + 1)
        data[at:at] = extra
    check_decode(bytes(data))
    check_decode(bytes(data[:cut]))


def test_sample_requests_decode() -> None:
    """The fuzz corpus itself is valid: each PDU decodes to one request of the kind sent."""
    kinds = {type(decode_one(p)).__name__ for p in VALID}
    assert kinds == {"BindRequest", "SearchRequest", "ExtendedRequest", "CompareRequest",
                     "AbandonRequest", "ModifyRequest", "AddRequest", "DelRequest", "ModDNRequest",
                     "UnbindRequest"}


def test_entry_op_named_writes_the_octets_entry_op_writes() -> None:
    """The short way's encoders (pre-encoded names, DN as bytes; one attribute with one
    value) against the general one,
    over values and DNs whose lengths take each length form (short, 0x81, 0x82, 0x83)."""
    rng = random.Random(11)
    singles = 0
    for _ in range(1000):
        dn_text = "smkiSerial=" + "é" * rng.choice((0, 5, 60, 200)) + ",o=SMKI"
        attrs = []
        for i in range(rng.randint(0, 4)):
            values = [bytes(rng.randrange(256) for _ in range(rng.choice((0, 1, 100, 127, 128, 300))))
                      * rng.choice((1, 1, 300)) for _ in range(rng.randint(0, 3))]
            attrs.append((f"attr{i};binary" * rng.randint(1, 20), values))
        want = responses.entry_op(dn_text, attrs)
        got = responses.entry_op_named(dn_text.encode(), [
            (responses.attribute_name(name), values) for name, values in attrs])
        assert got == want
        if len(attrs) == 1 and len(attrs[0][1]) == 1:
            name, (value,) = attrs[0]
            assert responses.single_value_op(dn_text.encode(), responses.attribute_name(name),
                                             value) == want
            singles += 1
    assert singles > 30
