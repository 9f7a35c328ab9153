"""Canonical forms of the identifiers that cross the wire: EUI-64s, serials, key ids.

Rules (SPEC.md, "Identifiers on the wire"):
* an EUI-64 is accepted in any case, with or without ``-`` or ``:`` separators, and is
  written as upper-case hyphenated octets (``00-DB-12-34-56-78-90-A4``);
* a serial is accepted in any case, with or without leading zeros (DCC Boxed's client sends
  lower-case, unpadded hex) and is written as upper-case hex of the positive integer, padded
  to whole octets (``13E6E3409C880FDBE71A429ACF375746``). The padded form is also the key the
  store indexes, so every spelling of one serial meets the same row.
"""

from __future__ import annotations

import re

_HEX = re.compile(r"[0-9A-Fa-f]+")  # (fullmatch: "$" would let a final newline through)
_SEPARATORS = str.maketrans("", "", "-: ")

MAX_SERIAL_OCTETS = 20  # RFC 5280 §4.1.2.2


class IdentifierError(ValueError):
    """An identifier from a client that does not parse; the message names the problem."""


def parse_eui64(text: str) -> bytes:
    """Return the 8 octets of an EUI-64 written in any accepted form."""
    raw = text.strip().translate(_SEPARATORS)
    if len(raw) != 16 or not _HEX.fullmatch(raw):
        raise IdentifierError(f"EUI-64 must be 16 hex digits (separators - or : allowed): {text!r}")
    return bytes.fromhex(raw)


def format_eui64(eui: bytes) -> str:
    """Upper-case hyphenated octets."""
    if len(eui) != 8:
        raise IdentifierError(f"EUI-64 must be 8 octets, got {len(eui)}")
    return "-".join(f"{b:02X}" for b in eui)


def canonical_eui64(text: str) -> str:
    return format_eui64(parse_eui64(text))


def serial_to_hex(serial: int) -> str:
    """Canonical written form of a certificate serial number (non-negative integer)."""
    if serial < 0:
        # RFC 5280 forbids negative serials but real CAs have issued them; keep them
        # distinguishable rather than failing: two's complement octets, marked with '-'.
        length = (serial.bit_length() + 8) // 8
        return "-" + serial.to_bytes(length, "big", signed=True).hex().upper()
    digits = f"{serial:X}"
    return digits if len(digits) % 2 == 0 else "0" + digits


def parse_serial(text: str) -> str:
    """Parse a serial from a client (hex, any case, separators and leading zeros allowed)."""
    raw = text.strip().translate(_SEPARATORS)
    negative = raw.startswith("-")
    digits = raw[1:] if negative else raw
    if not digits or not _HEX.fullmatch(digits):
        raise IdentifierError(f"serial must be hexadecimal digits: {text[:100]!r}")
    # (a negative serial is written as two's complement octets: one more may be needed)
    if len(digits.lstrip("0")) > 2 * MAX_SERIAL_OCTETS + (2 if negative else 0):
        raise IdentifierError(f"serial longer than {MAX_SERIAL_OCTETS} octets: {text[:100]!r}")
    if negative:
        return "-" + digits.upper()
    return serial_to_hex(int(raw, 16))


def parse_key_id(text: str) -> bytes:
    """A key identifier written as hex (any case, optional separators)."""
    raw = text.strip().translate(_SEPARATORS)
    if not raw or len(raw) % 2 or len(raw) > 128 or not _HEX.fullmatch(raw):
        raise IdentifierError("key identifier must be an even number of hex digits, at most 128:"
                              f" {text[:140]!r}")
    return bytes.fromhex(raw)


def format_key_id(key_id: bytes) -> str:
    return key_id.hex().upper()
