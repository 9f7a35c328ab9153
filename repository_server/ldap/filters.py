"""Search filters (RFC 4511 §4.5.1, RFC 4515, RFC 4523): evaluation and planning. No I/O.

:func:`compile_filter` turns a decoded filter into a predicate over :class:`Entry`, with
every assertion value normalised once per search, not once per entry. Evaluation is
three-valued as RFC 4511 §4.5.1.7 requires: ``True``, ``False`` or ``None`` (Undefined: an
unknown attribute type, a value that is not valid for the matching rule, an unsupported
rule); an entry is returned only when its filter is ``True``.

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

from ..pki.ids import IdentifierError, parse_serial, serial_to_hex
from . import codec
from .dn import DN, DNError, parse_normalised
from .schema import (
    MATCHING_RULES,
    ORDERING_NORMALISERS,
    RULE_BY_OID,
    RULE_NORMALISERS,
    SCHEMA,
    AttributeType,
    Normaliser,
    equality_normaliser,
    norm_case_exact,
    norm_case_ignore,
)

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


class FilterError(ValueError):
    """A filter that cannot be evaluated at all (not merely Undefined)."""


# ----------------------------------------------------------------------------- certificateExactMatch

_GSER = re.compile(
    r"""^\{\s*serialNumber\s+(?P<serial>-?\d+|'(?P<hex>[0-9A-Fa-f]*)'H)\s*,\s*"""
    r"""issuer\s+(?:rdnSequence\s*:\s*)?"(?P<issuer>(?:[^"]|"")*)"\s*\}$""")


@dataclass(frozen=True, slots=True)
class CertificateAssertion:
    serial: str  # canonical upper-case hex
    issuer: DN  # normalised


def parse_certificate_assertion(value: bytes) -> CertificateAssertion | None:
    """The GSER form of a CertificateExactAssertion (RFC 4523 §2.1), as ldapsearch sends it:
    ``{ serialNumber 123, issuer rdnSequence:"CN=..." }`` (decimal or ``'7B'H``)."""
    try:
        text = value.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    m = _GSER.match(text)
    if m is None:
        return None
    try:
        serial = (parse_serial(m["hex"]) if m["hex"] is not None
                  else serial_to_hex(int(m["serial"])))
        issuer = parse_normalised(m["issuer"].replace('""', '"'))
    except (IdentifierError, DNError, ValueError):
        return None
    return CertificateAssertion(serial, issuer)


# ----------------------------------------------------------------------------- compilation


def _values(entry: Entry, key: str) -> list[bytes]:
    return entry.attrs.get(key, [])


def _attr(description: str) -> AttributeType | None:
    attr, _ = SCHEMA.attribute(description)
    return attr


def _certificate_match(attr: AttributeType, assertion: bytes) -> Predicate:
    parsed = parse_certificate_assertion(assertion)
    key = attr.key
    if parsed is None:  # the value itself (DER of the certificate or CRL)
        def exact(entry: Entry) -> Tri:
            values = entry.attrs.get(key)
            return None if values is None else assertion in values

        return exact
    target = (parsed.serial, parsed.issuer)

    def by_serial_issuer(entry: Entry) -> Tri:
        if key not in entry.attrs:
            return False
        return target in entry.certs

    return by_serial_issuer


def _undefined(_entry: Entry) -> Tri:
    return None


def _values_match(key: str, norm: Normaliser, test: Callable[[Any], bool], *,
                  invalid_is_undefined: bool = False) -> Predicate:
    """True if any value of the attribute, normalised, passes `test`; False if none does (or
    the entry has no such attribute); Undefined when a value the rule cannot read was seen
    and `invalid_is_undefined`."""

    def match(entry: Entry) -> Tri:
        values = entry.attrs.get(key)
        if values is None:
            return False
        undefined = False
        for v in values:
            got = norm(v)
            if got is None:
                undefined = invalid_is_undefined
            elif test(got):
                return True
        return None if undefined else False

    return match


def _equality(attr: AttributeType | None, value: bytes, rule: str | None = None) -> Predicate:
    if attr is None:
        return _undefined
    rule = rule or attr.equality
    if rule in ("certificateExactMatch", "certificateListExactMatch"):
        return _certificate_match(attr, value)
    norm = equality_normaliser(attr) if rule == attr.equality else RULE_NORMALISERS.get(rule or "")
    want = norm(value) if norm is not None else None
    if norm is None or want is None:
        return _undefined
    return _values_match(attr.key, norm, lambda got: got == want, invalid_is_undefined=True)


def _ordering(attr: AttributeType | None, value: bytes, greater: bool) -> Predicate:
    if attr is None or attr.ordering is None:
        return _undefined
    norm = ORDERING_NORMALISERS[attr.ordering]
    want: Any = norm(value)
    if want is None:
        return _undefined
    return _values_match(attr.key, norm, (lambda got: got >= want) if greater
                         else (lambda got: got <= want))


def _substrings(f: codec.Substrings) -> Predicate:
    attr = _attr(f.attribute)
    if attr is None or attr.substr is None:
        return _undefined
    norm = norm_case_exact if attr.substr == "caseExactSubstringsMatch" else norm_case_ignore
    initial = norm(f.initial) if f.initial is not None else ""
    final = norm(f.final) if f.final is not None else ""
    anys = [norm(a) for a in f.any]
    if initial is None or final is None or None in anys:
        return _undefined
    pieces = [a for a in anys if a is not None]

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

    return _values_match(attr.key, norm, contains)


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


def _extensible(f: codec.ExtensibleMatch) -> Predicate:
    rule: str | None = None
    if f.matching_rule is not None:
        rule = RULE_BY_OID.get(f.matching_rule) or next(
            (n for n in MATCHING_RULES if n.lower() == f.matching_rule.lower()), None)
        if rule is None or (rule not in RULE_NORMALISERS and rule not in (
                "certificateExactMatch", "certificateListExactMatch")):
            return _undefined  # an unknown or unsupported rule: Undefined
    if f.type is not None:
        attr = _attr(f.type)
        base = _equality(attr, f.value, rule)
        candidates: list[AttributeType] = [attr] if attr is not None else []
    else:  # any attribute the rule applies to
        candidates = [a for a in SCHEMA.attributes if a.equality == rule and not a.operational]
        base = _any_of([_equality(a, f.value, rule) for a in candidates])

    if not f.dn_attributes:
        return base
    keys = {a.key for a in candidates}
    norm = RULE_NORMALISERS.get(rule or "caseIgnoreMatch", norm_case_ignore)
    want = norm(f.value)

    def with_dn(entry: Entry) -> Tri:
        r = base(entry)
        if r:
            return r
        for rdn in entry.ndn:
            for key, value in rdn:
                if (not keys or key in keys) and norm(value.encode()) == want:
                    return True
        return r

    return with_dn


def compile_filter(f: codec.Filter) -> Predicate:
    if isinstance(f, codec.And):
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
    if isinstance(f, codec.Or):
        return _any_of([compile_filter(x) for x in f.filters])
    if isinstance(f, codec.Not):
        inner = compile_filter(f.filter)

        def negate(entry: Entry) -> Tri:
            r = inner(entry)
            return None if r is None else not r

        return negate
    if isinstance(f, codec.Present):
        attr = _attr(f.attribute)
        if attr is None:
            return lambda _e: False
        key = attr.key
        return lambda entry: key in entry.attrs
    if isinstance(f, codec.Substrings):
        return _substrings(f)
    if isinstance(f, codec.GreaterOrEqual):
        return _ordering(_attr(f.attribute), f.value, True)
    if isinstance(f, codec.LessOrEqual):
        return _ordering(_attr(f.attribute), f.value, False)
    if isinstance(f, codec.ExtensibleMatch):
        return _extensible(f)
    # EqualityMatch and ApproxMatch (approximate = equality: no approximate rule is defined)
    return _equality(_attr(f.attribute), f.value)


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
        return (self.eui is not None or self.serial is not None or self.key_id is not None
                or self.sha256 is not None)


def _conjuncts(f: codec.Filter) -> Iterable[codec.Filter]:
    if isinstance(f, codec.And):
        for x in f.filters:
            yield from _conjuncts(x)
    else:
        yield f


def plan(f: codec.Filter) -> Plan:
    eui = serial = None
    key_id = sha256 = eui_bytes = None
    classes: set[str] = set()
    for item in _conjuncts(f):
        attr_name: str | None = None
        value = b""
        if isinstance(item, codec.EqualityMatch):
            attr_name, value = item.attribute, item.value
        elif isinstance(item, codec.ExtensibleMatch) and item.type and not item.dn_attributes and (
                item.matching_rule is None or RULE_BY_OID.get(item.matching_rule, item.matching_rule)
                in ("certificateExactMatch",)):
            attr_name, value = item.type, item.value
        if attr_name is None:
            continue
        attr = _attr(attr_name)
        if attr is None:
            continue
        norm = equality_normaliser(attr)
        if attr.key == "objectclass":
            v = norm(value) if norm else None
            if isinstance(v, str):
                classes.add(v)
        elif attr.key == "smkieui64":
            v = norm(value) if norm else None
            if isinstance(v, bytes) and len(v) == 8:
                eui, eui_bytes = v.hex("-").upper(), v
        elif attr.key == "smkiserial":
            v = norm(value) if norm else None
            if isinstance(v, str) and re.fullmatch(r"-?[0-9A-F]+", v):
                serial = v
        elif attr.key in ("smkikeyid", "smkisubjectkeyid"):
            v = norm(value) if norm else None
            if isinstance(v, bytes):
                key_id = v
        elif attr.key == "smkisha256":
            v = norm(value) if norm else None
            if isinstance(v, bytes) and len(v) == 32:
                sha256 = v
        elif attr.key in ("usercertificate", "cacertificate"):
            parsed = parse_certificate_assertion(value)
            if parsed is not None:
                serial = parsed.serial
    return Plan(eui, serial, key_id, sha256, frozenset(classes) or None, eui_bytes)
