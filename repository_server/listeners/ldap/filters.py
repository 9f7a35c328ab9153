"""Search filters (RFC 4511 §4.5.1, RFC 4515, RFC 4523): evaluation and planning. No I/O.

:func:`compile_filter` turns a decoded filter into a predicate over :class:`Entry`, with
every assertion value normalised once per search, not once per entry. Evaluation is
three-valued as RFC 4511 §4.5.1.7 requires: ``True``, ``False`` or ``None`` (Undefined: an
unrecognised attribute description, a value that is not valid for the matching rule's
syntax, an unknown rule or one that does not suit the type); an entry is returned only when
its filter is ``True``. What descriptions, rules and values mean is ``matching.py``'s: a
description covers its type's subtypes, a tagged one (``cn;lang-en``) no value here.

:func:`plan` reads the indexable part of a filter, an equality on EUI-64, serial, key id,
SHA-256 or ``userCertificate={ serialNumber …, issuer … }`` (certificateExactMatch), that
every matching entry must satisfy, so that the directory looks up candidates through the
store's indexes instead of walking a subtree.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from repository_server.listeners.ldap import protocol
from repository_server.listeners.ldap.dn import DN
from repository_server.listeners.ldap.dn import parse as parse_dn
from repository_server.listeners.ldap.matching import (
    CertificateAssertion,
    CertificateListAssertion,
    Description,
    Normaliser,
    Rule,
    describe,
    equality,
    memoised,
    normaliser,
    parse_certificate_assertion,
    rule,
)
from repository_server.listeners.ldap.schema import SCHEMA

Tri = bool | None
Predicate = Callable[["Entry"], Tri]


@dataclass(slots=True)
class Entry:
    """One directory entry as the evaluator and the encoder see it."""

    dn: str
    ndn: DN
    attrs: dict[str, list[bytes]]  # canonical lower-case attribute name -> values
    # (serial, normalised issuer DN) of each certificate value, for certificateExactMatch
    certs: tuple[tuple[str, DN], ...] = ()
    public: bool = True  # readable without a bound user
    valid_until: float = float("inf")  # a time-dependent value (smkiStatus E) changes then
    # (normalised issuer DN, thisUpdate as YYYYmmddHHMMSSZ) of each CRL or ARL value
    crls: tuple[tuple[DN, str], ...] = ()


# ----------------------------------------------------------------------------- compilation


def _undefined(_entry: Entry) -> Tri:
    return None


def _false(_entry: Entry) -> Tri:
    return False


def _values_match(keys: tuple[str, ...], norm: Normaliser, test: Callable[[Any], bool]) -> Predicate:
    """True if any value of the attributes (a type and its subtypes), normalised, passes
    `test`; False if none does or the entry has none of them. A value the rule cannot read
    is skipped (slapd does the same)."""
    if len(keys) == 1:  # the common case, a type without subtypes: the hot path
        key = keys[0]

        def match(entry: Entry) -> Tri:
            values = entry.attrs.get(key)
            if values is None:
                return False
            for v in values:
                got = norm(v)
                if got is not None and test(got):
                    return True
            return False

        return match

    def match_any(entry: Entry) -> Tri:
        for key in keys:
            for v in entry.attrs.get(key, ()):
                got = norm(v)
                if got is not None and test(got):
                    return True
        return False

    return match_any


def _by_identity(r: Rule, keys: tuple[str, ...], want: object) -> Predicate:
    """certificateExactMatch / certificateListExactMatch: against what the entry holds about
    its certificates and CRLs (their serials, issuers and thisUpdates), not their DER."""
    if isinstance(want, CertificateAssertion):
        target: object = (want.serial, want.issuer)

        def held(entry: Entry) -> Iterable[object]:
            return entry.certs
    else:
        assert isinstance(want, CertificateListAssertion)
        target = (want.issuer, want.this_update)

        def held(entry: Entry) -> Iterable[object]:
            return entry.crls

    def match(entry: Entry) -> Tri:
        if not any(k in entry.attrs for k in keys):
            return False
        return target in held(entry)

    return match


def _test(r: Rule, want: Any) -> Callable[[Any], bool]:
    if r.kind == "ordering":  # RFC 4517: TRUE when the attribute value is less
        return lambda got: got < want
    return lambda got: got == want


def _assertion(desc: Description, r: Rule, value: bytes) -> Predicate:
    """`desc` compared with `value` by rule `r` (which suits the type)."""
    norm = normaliser(r, desc.type)
    want = norm(value)
    if want is None:
        return _undefined
    if desc.tagged:
        return _false
    if r.name in ("certificateExactMatch", "certificateListExactMatch"):
        return _by_identity(r, desc.keys, want)
    return _values_match(desc.keys, norm, _test(r, want))


def _equality(desc: Description | None, value: bytes) -> Predicate:
    found = equality(desc.type) if desc is not None else None
    if desc is None or found is None:
        return _undefined
    return _assertion(desc, found[0], value)


def _ordering(desc: Description | None, value: bytes, greater: bool) -> Predicate:
    r = rule(desc.type.ordering) if desc is not None else None
    if desc is None or r is None:
        return _undefined
    norm = normaliser(r, desc.type)
    want: Any = norm(value)
    if want is None:
        return _undefined
    if desc.tagged:
        return _false
    return _values_match(desc.keys, norm, (lambda got: got >= want) if greater
                         else (lambda got: got <= want))


def _substrings(f: protocol.Substrings) -> Predicate:
    desc = describe(f.attribute)
    r = rule(desc.type.substr) if desc is not None else None
    if desc is None or r is None:
        return _undefined
    norm = r.normalise
    initial = norm(f.initial) if f.initial is not None else ""
    final = norm(f.final) if f.final is not None else ""
    anys = [norm(a) for a in f.any]
    if not isinstance(initial, str) or not isinstance(final, str) or None in anys:
        return _undefined
    if desc.tagged:
        return _false
    pieces = [a for a in anys if isinstance(a, str)]

    def contains(text: str) -> bool:
        if not text.startswith(initial) or len(text) - len(final) < len(initial):
            return False
        end = len(text) - len(final)
        if not text.endswith(final):
            return False
        pos = len(initial)
        for piece in pieces:
            i = text.find(piece, pos, end)
            if i < 0:
                return False
            pos = i + len(piece)
        return True

    return _values_match(desc.keys, norm, contains)


def _any_of(parts: list[Predicate]) -> Predicate:
    def any_of(entry: Entry) -> Tri:
        result: Tri = False
        for p in parts:
            r = p(entry)
            if r:
                return True
            if r is None:
                result = None
        return result

    return any_of


# attribute types an extensible match without a type reaches: every one an entry holds
_HELD = tuple(a for a in SCHEMA.attributes if not a.dynamic)


def _extensible(f: protocol.ExtensibleMatch) -> Predicate:
    """RFC 4511 §4.5.1.7.7: with a type, that type's values (and subtypes') by the rule
    (by default its equality rule), which must suit it; without one, every attribute the rule
    suits; with :dn:, also the DN's attribute values the same way."""
    r = rule(f.matching_rule)
    if f.matching_rule is not None and r is None:
        return _undefined  # an unknown or unsupported rule
    # (description, normaliser, normalised assertion) of each type compared, for :dn:
    compared: list[tuple[Description, Normaliser, Any]] = []
    parts: list[Predicate] = []
    if f.type is not None:
        desc = describe(f.type)
        if desc is None:
            return _undefined
        if r is None:
            found = equality(desc.type)
            if found is None:
                return _undefined
            r = found[0]
        if not r.suits(desc.type):
            return _undefined
        part = _assertion(desc, r, f.value)
        if part is _undefined:
            return _undefined
        parts.append(part)
        norm = normaliser(r, desc.type)
        if not desc.tagged:
            compared.append((desc, norm, norm(f.value)))
    else:
        if r is None:
            return _undefined
        for attr in _HELD:
            if r.suits(attr):
                desc = Description(attr, (attr.key,), False)
                part = _assertion(desc, r, f.value)
                if part is not _undefined:
                    parts.append(part)
                    norm = normaliser(r, attr)
                    compared.append((desc, norm, norm(f.value)))
    base = _any_of(parts) if len(parts) != 1 else parts[0]
    if not f.dn_attributes or not compared:
        return base
    assert r is not None
    tests = [(frozenset(d.keys), norm, _test(r, want)) for d, norm, want in compared]

    def with_dn(entry: Entry) -> Tri:
        result = base(entry)
        if result:
            return result
        for rdn in _raw_dn(entry.dn):
            for key, value in rdn:
                for keys, norm, test in tests:
                    if key in keys:
                        got = norm(value.encode())
                        if got is not None and test(got):
                            return True
        return result

    return with_dn


@memoised(4096)
def _raw_dn(text: str) -> tuple[tuple[tuple[str, str], ...], ...]:
    """An entry's DN with its values as written (for :dn:, where case may matter) and its
    attribute types by key."""
    return tuple(tuple((_type_key(t), v) for t, v in rdn) for rdn in parse_dn(text))


def _type_key(text: str) -> str:
    attr, _ = SCHEMA.attribute(text)
    return attr.key if attr is not None else ""


def compile_filter(f: protocol.Filter) -> Predicate:
    if isinstance(f, protocol.And):
        parts = [compile_filter(x) for x in f.filters]

        def all_of(entry: Entry) -> Tri:
            result: Tri = True
            for p in parts:
                r = p(entry)
                if r is False:
                    return False
                if r is None:
                    result = None
            return result

        return all_of
    if isinstance(f, protocol.Or):
        return _any_of([compile_filter(x) for x in f.filters])
    if isinstance(f, protocol.Not):
        inner = compile_filter(f.filter)

        def negate(entry: Entry) -> Tri:
            r = inner(entry)
            return None if r is None else not r

        return negate
    if isinstance(f, protocol.Present):
        # an unrecognised description is FALSE here, not Undefined (RFC 4511 §4.5.1.7.5)
        desc = describe(f.attribute)
        if desc is None or desc.tagged:
            return _false
        keys = desc.keys
        if len(keys) == 1:
            key = keys[0]
            return lambda entry: key in entry.attrs
        return lambda entry: any(k in entry.attrs for k in keys)
    if isinstance(f, protocol.Substrings):
        return _substrings(f)
    if isinstance(f, protocol.GreaterOrEqual):
        return _ordering(describe(f.attribute), f.value, True)
    if isinstance(f, protocol.LessOrEqual):
        return _ordering(describe(f.attribute), f.value, False)
    if isinstance(f, protocol.ExtensibleMatch):
        return _extensible(f)
    # EqualityMatch and ApproxMatch (approximate = equality: no approximate rule is defined)
    return _equality(describe(f.attribute), f.value)


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True, slots=True)
class Plan:
    """Equalities every matching entry must satisfy (None = no constraint of that kind)."""

    eui: str | None = None  # canonical dashed EUI-64
    serial: str | None = None  # canonical serial
    key_id: bytes | None = None  # smkiKeyId / smkiSubjectKeyId
    sha256: bytes | None = None
    classes: frozenset[str] | None = None  # objectClass values required (lower-case)
    eui_bytes: bytes | None = None  # the EUI-64 of `eui`

    @property
    def indexed(self) -> bool:
        return self.index is not None

    @property
    def index(self) -> str | None:
        """The index candidates are read through: "eui", "sha256", "serial" or "key_id"
        (the first the plan has, in that order), or None (walk the subtree)."""
        if self.eui is not None:
            return "eui"
        if self.sha256 is not None:
            return "sha256"
        if self.serial is not None:
            return "serial"
        if self.key_id is not None:
            return "key_id"
        return None


_CERTIFICATE_EXACT = rule("certificateExactMatch")
# the attributes an equality on which narrows the candidates (objectClass: by entry kind)
_PLANNED = frozenset({"objectclass", "smkieui64", "smkiserial", "smkikeyid", "smkisubjectkeyid",
                      "smkisha256", "usercertificate", "cacertificate"})


def conjuncts(f: protocol.Filter) -> Iterable[protocol.Filter]:
    """The filters a filter ANDs together (itself if it is no AND), nested ANDs flattened."""
    if isinstance(f, protocol.And):
        for x in f.filters:
            yield from conjuncts(x)
    else:
        yield f


def asserted(item: protocol.Filter) -> tuple[str, bytes] | None:
    """(attribute description, value) of an equality an index may serve: an equality
    match, or an extensible match on a type by its equality rule or certificateExactMatch,
    without :dn:. None for anything else."""
    if isinstance(item, protocol.EqualityMatch):
        return item.attribute, item.value
    if isinstance(item, protocol.ExtensibleMatch) and item.type and not item.dn_attributes and (
            item.matching_rule is None or rule(item.matching_rule) is _CERTIFICATE_EXACT):
        return item.type, item.value
    return None


def constraint(description: str, value: bytes) -> tuple[str, Any] | None:
    """What an equality on an attribute description tells the plan: (Plan field, value),
    with the value normalised as the attribute's equality rule does; None when it tells
    nothing (an attribute that is not indexed, a supertype whose subtypes' values count too,
    a tagged description, or a value no entry can hold)."""
    desc = describe(description)
    found = equality(desc.type) if desc is not None and not desc.tagged else None
    if desc is None or found is None:
        return None
    key, norm = desc.type.key, found[1]
    if key not in _PLANNED or desc.keys != (key,):
        return None  # not indexed, or a supertype: its subtypes' values count too
    if key in ("usercertificate", "cacertificate"):
        parsed = parse_certificate_assertion(value)
        return ("serial", parsed.serial) if parsed is not None else None
    v = norm(value)
    if key == "objectclass":
        return ("classes", v) if isinstance(v, str) else None
    if key == "smkieui64":
        return ("eui", v) if isinstance(v, bytes) and len(v) == 8 else None
    if key == "smkiserial":
        return ("serial", v) if isinstance(v, str) and re.fullmatch(r"-?[0-9A-F]+", v) else None
    if key in ("smkikeyid", "smkisubjectkeyid"):
        return ("key_id", v) if isinstance(v, bytes) else None
    if key == "smkisha256":
        return ("sha256", v) if isinstance(v, bytes) and len(v) == 32 else None
    return None


def plan(f: protocol.Filter) -> Plan:
    """The equalities on indexed attributes every entry matching `f` satisfies (the last one
    of each kind wins; objectClass values accumulate)."""
    found: dict[str, Any] = {}
    classes: set[str] = set()
    for item in conjuncts(f):
        pair = asserted(item)
        told = constraint(*pair) if pair is not None else None
        if told is None:
            continue
        field, value = told
        if field == "classes":
            classes.add(value)
        else:
            found[field] = value
    eui: bytes | None = found.get("eui")
    return Plan(eui.hex("-").upper() if eui is not None else None, found.get("serial"),
                found.get("key_id"), found.get("sha256"), frozenset(classes) or None, eui)
