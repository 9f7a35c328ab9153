"""The replica's byte layout (replica/records.py): what is packed comes back the same, and a
damaged value (any bytes at all) is a RecordError, never another exception."""

from __future__ import annotations

import contextlib
import struct
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from repository_server.readmodel import records as rec

_NOW = datetime(2026, 12, 5, 6, 0, 0, 123456, tzinfo=UTC)


def _cert(**over: object) -> bytes:
    fields: dict[str, object] = dict(
        serial="13E6E3409C880FDBE71A429ACF375746", issuer_key_id=b"\x01" * 8, der=b"\x30" * 480,
        sha256=b"\xab" * 32, lodged_us=rec.to_us(_NOW), kind="device",
        eui64=bytes.fromhex("00DB1234567890A4"), role=None, usage="KA", status="I",
        manufacturing_flag=True, not_before_us=rec.to_us(_NOW),
        not_after_us=rec.to_us(datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)),
        subject_key_id=b"\x02" * 8, subject_name="", issuer_name="CN=Z1,OU=07")
    fields.update(over)
    return rec.pack_cert(**fields)  # type: ignore[arg-type]


def test_a_certificate_record_round_trips() -> None:
    value = _cert()
    c = rec.unpack_cert(42, value)
    assert (c.id, c.serial, c.kind, c.usage, c.lodged_status, c.manufacturing_flag) == (
        42, "13E6E3409C880FDBE71A429ACF375746", "device", "KA", "I", True)
    assert c.eui_text == "00-DB-12-34-56-78-90-A4" and c.eui64 == bytes.fromhex("00DB1234567890A4")
    assert c.der == b"\x30" * 480 and c.sha_hex == "ab" * 32
    assert c.http_last_modified == "Sat, 05 Dec 2026 06:00:00 GMT" and c.lodged_at == _NOW
    assert c.not_after_ts == datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()
    assert c.role is None and c.issuer_name == "CN=Z1,OU=07" and c.subject_name == ""
    assert rec.unpack_download(value) == (c.der, c.sha_hex, c.http_last_modified, False)
    changed = rec.unpack_cert(42, rec.with_status(value, "N", False))
    assert (changed.lodged_status, changed.manufacturing_flag, changed.der) == ("N", False, c.der)
    org = rec.unpack_cert(1, _cert(kind="organisation", role=2, usage="DS", subject_name="CN=é"))
    assert (org.role, org.subject_name) == (2, "CN=é")
    assert rec.unpack_download(_cert(kind="root", usage="CA", eui64=None))[3] is True


def test_crl_document_and_revoked_records_round_trip() -> None:
    crl = rec.CrlRecord(7, "arl", b"\x03" * 8, "CN=ZA,OU=00", 2**150, _NOW, None, b"\x01" * 32,
                        b"\x30\x82", 3, _NOW)
    key = rec.crl_key(crl.issuer_key_id, crl.crl_number)
    assert rec.unpack_crl(key, rec.pack_crl(crl)) == crl
    doc = rec.DocRecord(9, "SMKI-RAPP", 3, "text/plain", 5, b"\x02" * 32, _NOW, b"hello")
    assert rec.unpack_doc(rec.doc_key("SMKI-RAPP", 3), rec.pack_doc(doc)) == doc
    # a version number whose bytes hold a NUL still splits right
    doc256 = rec.DocRecord(9, "a", 256, "x", 0, b"\x00" * 32, _NOW, b"")
    assert rec.unpack_doc(rec.doc_key("a", 256), rec.pack_doc(doc256)) == doc256
    assert rec.unpack_revoked(rec.pack_revoked(_NOW, "keyCompromise")) == (_NOW, "keyCompromise")
    assert rec.unpack_revoked(rec.pack_revoked(_NOW, None)) == (_NOW, None)
    assert rec.unpack_current(rec.pack_current(7, 12)) == (7, 12)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=700), st.binary(min_size=0, max_size=40))
def test_damaged_values_are_record_errors(value: bytes, key: bytes) -> None:
    for decode in (lambda: rec.unpack_cert(1, value), lambda: rec.unpack_download(value),
                   lambda: rec.unpack_crl(key, value), lambda: rec.unpack_doc(key, value),
                   lambda: rec.unpack_revoked(value), lambda: rec.unpack_current(value)):
        with contextlib.suppress(rec.RecordError):
            decode()


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=10_000), st.integers(min_value=1, max_value=60))
def test_truncated_certificate_records_are_record_errors(cut: int, extra: int) -> None:
    value = _cert()
    for damaged in (value[:cut % len(value)], value + b"\x00" * extra):
        try:
            rec.unpack_cert(1, damaged)
        except rec.RecordError:
            continue
        raise AssertionError("a damaged record decoded")


def test_traits_are_the_head_bytes_of_kind_status_flag_role_and_usage() -> None:
    """`rec.TRAITS`/`KIND_AT` (the LDAP short way's test on a stored record) lie where
    `pack_cert` writes kind, status, flag, role and usage, for every kind and usage."""
    for kind_index, kind in enumerate(rec.KINDS):
        for usage_index, usage in enumerate(rec.USAGES):
            for role, flag, status in ((None, False, "I"), (7, True, "R")):
                value = rec.pack_cert(
                    serial="0A1B", issuer_key_id=b"k" * 20, der=b"\x30\x03\x02\x01\x01",
                    sha256=b"s" * 32, lodged_us=1_700_000_000_000_000, kind=kind,
                    eui64=b"\x00\xdb\x12\x34\x56\x78\x90\xa4", role=role, usage=usage,
                    status=status, manufacturing_flag=flag, not_before_us=0,
                    not_after_us=2_000_000_000_000_000, subject_key_id=None, subject_name="",
                    issuer_name="CN=x")
                assert value[rec.KIND_AT] == kind_index
                assert value[rec.TRAITS] == struct.pack(
                    ">BcBhB", kind_index, status.encode(), int(flag),
                    -1 if role is None else role, usage_index)
