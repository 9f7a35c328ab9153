"""Identifiers on the wire (SPEC.md): every accepted spelling meets one canonical form."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from repository_server.pki.ids import (
    IdentifierError,
    canonical_eui64,
    format_eui64,
    parse_eui64,
    parse_key_id,
    parse_serial,
    serial_to_hex,
)


@pytest.mark.parametrize("text", ["00-db-12-34-56-78-90-a4", "00DB1234567890A4", "00:DB:12:34:56:78:90:A4",
                                  " 00db1234567890a4 ", "00-DB-12-34-56-78-90-A4"])
def test_eui64_spellings(text: str) -> None:
    assert canonical_eui64(text) == "00-DB-12-34-56-78-90-A4"
    assert parse_eui64(text) == bytes.fromhex("00DB1234567890A4")


@pytest.mark.parametrize("bad", ["", "00DB", "00DB1234567890A4FF", "00DB1234567890AZ", "zz" * 8])
def test_eui64_refused_with_reason(bad: str) -> None:
    with pytest.raises(IdentifierError, match="EUI-64"):
        parse_eui64(bad)


def test_serial_spellings() -> None:
    canonical = "13E6E3409C880FDBE71A429ACF375746"
    separated = ":".join(canonical[i:i + 2] for i in range(0, len(canonical), 2))
    for text in (canonical, canonical.lower(), "0000" + canonical, separated):
        assert parse_serial(text) == canonical
    # DCC Boxed's client sends unpadded lower-case hex: an odd number of digits
    assert parse_serial("f12") == "0F12"
    assert serial_to_hex(0x0F12) == "0F12"
    with pytest.raises(IdentifierError, match="hexadecimal"):
        parse_serial("12g4")
    with pytest.raises(IdentifierError, match="octets"):
        parse_serial("1" * 41)


def test_key_ids() -> None:
    assert parse_key_id("4aa95814fe5dbc07") == bytes.fromhex("4AA95814FE5DBC07")
    with pytest.raises(IdentifierError):
        parse_key_id("abc")


@given(st.integers(min_value=1, max_value=2**159))
def test_serial_round_trip(value: int) -> None:
    text = serial_to_hex(value)
    assert len(text) % 2 == 0 and text == text.upper()
    assert parse_serial(text.lower().lstrip("0")) == text


@given(st.binary(min_size=8, max_size=8))
def test_eui64_round_trip(eui: bytes) -> None:
    assert parse_eui64(format_eui64(eui).lower()) == eui
