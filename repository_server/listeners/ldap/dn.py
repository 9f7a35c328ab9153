"""Distinguished names (RFC 4514): parse, normalise, compare, write. No I/O.

A DN is held as a tuple of RDNs, leaf first, each RDN a tuple of (attribute key, value)
pairs sorted by key. :func:`normalise` gives the form used for comparison: attribute types
by their canonical lower-case name (aliases and OIDs resolved through the schema), values
through the attribute's equality rule (case folded and spaces collapsed; our identifier
attributes in their canonical spelling, so ``smkiEui64=00db12...`` and
``smkiEui64=00-DB-12-...`` name the same entry).
"""

from __future__ import annotations

from repository_server.listeners.ldap.schema import SCHEMA
from repository_server.pki.ids import (
    IdentifierError,
    format_eui64,
    format_key_id,
    parse_eui64,
    parse_key_id,
    parse_serial,
)

RDN = tuple[tuple[str, str], ...]
DN = tuple[RDN, ...]


class DNError(ValueError):
    """Not a valid RFC 4514 DN; the message says where."""


_HEXDIGITS = set("0123456789abcdefABCDEF")
_SPECIAL = set(",+\"\\<>;=#")


def _unescape(text: str, start: int) -> tuple[str, int]:
    """Read one attribute value starting at `start`; returns (value, index of the separator or end)."""
    if start < len(text) and text[start] == "#":  # hex-encoded BER value
        end = start + 1
        while end < len(text) and text[end] in _HEXDIGITS:
            end += 1
        raw = text[start + 1:end]
        if not raw or len(raw) % 2:
            raise DNError(f"bad hex value at offset {start}")
        return "#" + raw.upper(), end
    out = bytearray()
    i = start
    while i < len(text):
        ch = text[i]
        if ch in ",+":
            break
        if ch == "\\":
            if i + 1 >= len(text):
                raise DNError("DN ends inside an escape")
            nxt = text[i + 1]
            if nxt in _HEXDIGITS and i + 2 < len(text) and text[i + 2] in _HEXDIGITS:
                out.append(int(text[i + 1:i + 3], 16))
                i += 3
                continue
            if nxt in _SPECIAL or nxt == " ":
                out += nxt.encode()
                i += 2
                continue
            raise DNError(f"bad escape \\{nxt} at offset {i}")
        if ch in "\"<>;":
            raise DNError(f"unescaped {ch!r} at offset {i}")
        out += ch.encode()
        i += 1
    try:
        return out.decode("utf-8").strip(" "), i
    except UnicodeDecodeError:
        raise DNError("value is not UTF-8") from None


def parse(text: str) -> DN:
    """Parse a DN string (leaf first, as written). The empty string is the root DSE."""
    if not text.strip():
        return ()
    rdns: list[RDN] = []
    avas: list[tuple[str, str]] = []
    i = 0
    n = len(text)
    while True:
        eq = text.find("=", i)
        if eq < 0:
            raise DNError(f"missing '=' after offset {i}")
        attr = text[i:eq].strip()
        if not attr or not all(c.isalnum() or c in "-." for c in attr):
            raise DNError(f"bad attribute type {attr!r}")
        value, i = _unescape(text, eq + 1)
        avas.append((attr, value))
        if i >= n:
            rdns.append(tuple(avas))
            break
        sep = text[i]
        i += 1
        if sep == ",":
            rdns.append(tuple(avas))
            avas = []
        if i >= n:
            raise DNError("DN ends after a separator")
    return tuple(rdns)


# Naming attributes that appear in certificate subject and issuer names but are not in our
# directory schema: their aliases and OIDs, so that every spelling compares equal.
_NAME_ALIASES = {
    "0.9.2342.19200300.100.1.1": "uid", "userid": "uid", "0.9.2342.19200300.100.1.25": "dc",
    "domaincomponent": "dc", "2.5.4.6": "c", "countryname": "c", "2.5.4.7": "l",
    "localityname": "l", "2.5.4.8": "st", "stateorprovincename": "st", "2.5.4.9": "street",
    "2.5.4.5": "serialnumber", "2.5.4.45": "x500uniqueidentifier", "2.5.4.12": "title",
    "1.2.840.113549.1.9.1": "emailaddress", "email": "emailaddress",
}


def _attr_key(attr: str) -> str:
    a, _ = SCHEMA.attribute(attr)
    if a is not None:
        return a.key
    lower = attr.lower()
    return _NAME_ALIASES.get(lower, lower)


def normalise_value(key: str, value: str) -> str:
    try:
        if key == "smkieui64":
            return format_eui64(parse_eui64(value))
        if key == "smkiserial":
            return parse_serial(value)
        if key in ("smkikeyid", "smkisha256"):
            return format_key_id(parse_key_id(value))
    except IdentifierError:
        pass
    return " ".join(value.split()).casefold()


def normalise(dn: DN) -> DN:
    out = []
    for rdn in dn:
        pairs = []
        for attr, value in rdn:
            key = _attr_key(attr)
            pairs.append((key, normalise_value(key, value)))
        out.append(tuple(sorted(pairs)))
    return tuple(out)


def parse_normalised(text: str) -> DN:
    return normalise(parse(text))


def is_within(entry: DN, base: DN, scope: int) -> bool:
    """Is the (normalised) entry in scope 0 base, 1 one level, 2 subtree or 3 subordinate
    subtree (the subtree without the base) of the (normalised) base?"""
    depth = len(entry) - len(base)
    if depth < 0 or entry[depth:] != base:
        return False
    return depth == 0 if scope == 0 else depth == 1 if scope == 1 else depth > 0 if scope == 3 else True
