"""The commonest search, answered the short way: a device's or organisation's certificates by
EUI-64 (`(&(smkiEui64=…)(smkiKeyUsage=KA))` under `ou=Devices`), read straight from the
replica, without planning the filter, compiling it anew or building attributes nobody asked
for. No I/O of its own.

A search qualifies when its base is `ou=Devices` or `ou=Organisations`, its scope one level or
subtree, it carries no control, and its filter is an equality on `smkiEui64` alone or ANDed
with equalities and presences on a certificate entry's plain attributes, each named without
options (one with options, or a supertype such as `name`, takes the general path). Then the
candidates are exactly what the general path would read through the EUI-64 index (the subject
entry and its certificates), every candidate satisfies the `smkiEui64` equality by
construction, the rest of the filter is compiled once per distinct rest (a handful:
`smkiKeyUsage=KA`, ...), and each certificate entry is built with only the attributes the
filter tests and the client asked for, in the same order and with the same values as the whole
entry. Anything else returns None and takes the general path. `tests/test_ldap_fastpath.py`
checks that both paths answer byte for byte the same over a corpus of such searches (and
`tests/test_ldap_slapd.py` compares both with slapd).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from repository_server.listeners.ldap import dn, protocol
from repository_server.listeners.ldap.directory import Directory
from repository_server.listeners.ldap.entries import CERT_ATTR_KEYS
from repository_server.listeners.ldap.filters import Entry, Predicate, compile_filter
from repository_server.listeners.ldap.matching import equality
from repository_server.listeners.ldap.schema import SCHEMA

_PLAIN = frozenset({"objectclass", "smkikind", "smkikeyusage", "smkistatus", "smkiserial",
                    "smkirole", "smkimanufacturingflag", "smkieui64", "smkisha256"})
_EUI = SCHEMA.attribute("smkiEui64")[0]
assert _EUI is not None
_EUI_EQUALITY = equality(_EUI)
assert _EUI_EQUALITY is not None
_EUI_NORM = _EUI_EQUALITY[1]


def _always(_entry: Entry) -> bool:
    return True


@dataclass(frozen=True, slots=True)
class _Shape:
    """What a qualifying search needs beyond its EUI-64: the rest of its filter."""

    rest: Predicate
    keys: frozenset[str]  # the attributes the rest of the filter reads


class FastSearch:
    def __init__(self, directory: Directory) -> None:
        self.directory = directory
        self.catalog = directory.catalog
        suffix = directory.nsuffix
        self._units = {((("ou", "devices"),), *suffix): ("devices", True),
                       ((("ou", "organisations"),), *suffix): ("organisations", False)}
        self._rests: dict[tuple[protocol.EqualityMatch | protocol.Present, ...], _Shape | None] = {}
        self.answered = 0  # searches answered the short way (tests, curiosity)

    def _shape(self, rest: tuple[protocol.EqualityMatch | protocol.Present, ...]) -> _Shape | None:
        if rest in self._rests:
            return self._rests[rest]
        shape: _Shape | None = None
        keys = set()
        for f in rest:
            attr = SCHEMA.attribute(f.attribute)[0]
            if attr is None or attr.key not in _PLAIN or ";" in f.attribute:
                break
            keys.add(attr.key)
        else:
            predicate = compile_filter(protocol.And(rest)) if rest else _always
            shape = _Shape(predicate, frozenset(keys))
        if len(self._rests) >= 256:
            self._rests.clear()
        self._rests[rest] = shape
        return shape

    def entries(self, req: protocol.SearchRequest, base: dn.DN, private: bool,
                named: frozenset[str], everything: bool, now: float) -> list[Entry] | None:
        """The entries the search returns, in the general path's order; None when it does
        not qualify (`private`: the reader may read private entries, as
        `access.ReadAccess.may_read_private` says, else it never does; `named`: the attribute
        keys asked for; `everything`: "*" or "+")."""
        if req.controls or req.types_only or req.scope not in (1, 2) or not private:
            return None
        unit = self._units.get(base)
        if unit is None:
            return None
        f = req.filter
        conjuncts: Sequence[protocol.Filter] = f.filters if isinstance(f, protocol.And) else (f,)
        eui_value: bytes | None = None
        rest: list[protocol.EqualityMatch | protocol.Present] = []
        for item in conjuncts:
            if isinstance(item, protocol.EqualityMatch) and type(item) is protocol.EqualityMatch:
                attr = SCHEMA.attribute(item.attribute)[0]
                if attr is _EUI and ";" not in item.attribute and eui_value is None:
                    eui_value = item.value
                    continue
                rest.append(item)
            elif isinstance(item, protocol.Present):
                rest.append(item)
            else:
                return None
        if eui_value is None:
            return None
        eui = _EUI_NORM(eui_value)
        if not isinstance(eui, bytes) or len(eui) != 8:
            return None
        shape = self._shape(tuple(rest))
        if shape is None:
            return None
        keys = None if everything else shape.keys | named
        if keys is not None and not keys <= CERT_ATTR_KEYS:
            return None
        unit_name, device = unit
        certs, statuses = self.catalog.subject_now(eui, device, now)
        out: list[Entry] = []
        self.answered += 1
        if not certs:
            return out
        entries = self.directory.entries
        subject = entries.subject_entry(unit_name, certs[0].eui_text)
        if shape.rest(subject) is True:
            out.append(subject)
        if req.scope == 2:
            for c, status in zip(certs, statuses, strict=True):
                entry = entries.certificate_entry(c, status, keys)
                if shape.rest(entry) is True:
                    out.append(entry)
        return out
