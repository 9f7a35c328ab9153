"""LDIF (RFC 2849) of the directory: what `smki-repository export-ldif` writes. No I/O here
beyond the text it returns; the command streams entries through it one at a time."""

from __future__ import annotations

import base64

from repository_server.listeners.ldap.filters import Entry
from repository_server.listeners.ldap.schema import SCHEMA

_BY_KEY = {a.key: a for a in SCHEMA.attributes}


def _safe(value: bytes) -> bool:
    """RFC 2849 SAFE-STRING: ASCII without NUL, LF, CR; not starting with space, ':' or '<';
    not ending with a space (trailing spaces would not survive a round trip)."""
    if not value:
        return True
    if value[0] in b" :<" or value[-1:] == b" ":
        return False
    return all(0 < b < 128 and b not in (10, 13) for b in value)


def line(name: str, value: bytes) -> str:
    if _safe(value):
        return f"{name}: {value.decode('ascii')}\n"
    return f"{name}:: {base64.b64encode(value).decode('ascii')}\n"


def entry_ldif(entry: Entry, *, operational: bool = False) -> str:
    """One entry with its user attributes (and the operational ones if asked), then a blank line."""
    out = [line("dn", entry.dn.encode())]
    for key, values in entry.attrs.items():
        attr = _BY_KEY.get(key)
        if attr is None or (attr.operational and not operational):
            continue
        out.extend(line(attr.wire_name, v) for v in values)
    out.append("\n")
    return "".join(out)
