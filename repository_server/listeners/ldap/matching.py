"""How values compare: matching rules, assertion syntaxes and attribute descriptions. No I/O.

The one place that filter evaluation (``filters.py``, and so the fast path) and attribute
selection (``server.py``) consult, so that both read a description and a value the same way:

* :func:`describe` reads an attribute description (RFC 4512 §2.5): a type (name, alias or
  OID) and options. ``binary`` is recognised only on the types that need it (RFC 4522) and
  only once; ``lang-…`` tags (RFC 3866) name values carrying that tag, and no value here
  carries one; any other option makes the description unrecognised. A description covers
  its type and the type's subtypes (``name`` covers ``cn``, ``o``, ``ou``).
* :data:`RULES` are the matching rules we implement, each with the syntax it suits
  (RFC 4517 §4.1: a rule applies to an attribute of its own syntax or of a compatible one)
  and a normaliser from a value's bytes to a comparable key, ``None`` when the bytes are not
  valid for the syntax (RFC 4517 §3.3: the assertion is then Undefined). Booleans are exactly
  ``TRUE``/``FALSE``; integers have no spaces, no ``-0`` and no leading zeros; a
  GeneralizedTime may end in a leap second; object classes must be known; DNs compare by
  ``distinguishedNameMatch``; certificate and CRL assertions are RFC 4523's (in the GSER and
  ``serial$issuer`` forms slapd reads).
* Our identifier attributes (EUI-64, serial, key ids, SHA-256) also accept every spelling
  the web service does, as an extension of ``caseIgnoreMatch`` on those attributes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import TypeVar

from repository_server.listeners.ldap import dn
from repository_server.listeners.ldap.schema import (
    BOOLEAN,
    CERTIFICATE,
    CERTIFICATE_LIST,
    DIRECTORY_STRING,
    DN_SYNTAX,
    GENERALIZED_TIME,
    IA5_STRING,
    INTEGER,
    MATCHING_RULES,
    OCTET_STRING,
    OID_SYNTAX,
    PRINTABLE_STRING,
    SCHEMA,
    AttributeType,
)
from repository_server.pki.ids import IdentifierError, parse_eui64, parse_key_id, parse_serial, serial_to_hex

Key = object
Normaliser = Callable[[bytes], Key | None]
_K = TypeVar("_K")
_V = TypeVar("_V")


def memoised(limit: int) -> Callable[[Callable[[_K], _V]], Callable[[_K], _V]]:
    """A function's results kept for the keys it is called with (emptied at `limit` keys):
    for what repeats across entries and searches (stored times, DNs, descriptions)."""

    def wrap(fn: Callable[[_K], _V]) -> Callable[[_K], _V]:
        memo: dict[_K, _V] = {}

        def cached(key: _K) -> _V:
            try:
                return memo[key]
            except KeyError:
                pass
            value = fn(key)
            if len(memo) >= limit:
                memo.clear()
            memo[key] = value
            return value

        return cached

    return wrap


# ----------------------------------------------------------------------------- syntaxes


def _text(v: bytes) -> str | None:
    try:
        return v.decode("utf-8")
    except UnicodeDecodeError:
        return None


def norm_case_ignore(v: bytes) -> str | None:
    """Directory String (non-empty UTF-8), spaces collapsed, case folded."""
    t = _text(v)
    return None if not t else " ".join(t.split()).casefold()


def norm_case_exact(v: bytes) -> str | None:
    t = _text(v)
    return None if not t else " ".join(t.split())


def norm_ia5(v: bytes) -> str | None:
    return None if not v.isascii() else " ".join(v.decode().split()).lower()


_INTEGER = re.compile(r"(0|-?[1-9][0-9]*)")


def norm_integer(v: bytes) -> int | None:
    t = _text(v)
    return int(t) if t is not None and _INTEGER.fullmatch(t) else None


def norm_boolean(v: bytes) -> bool | None:
    return True if v == b"TRUE" else False if v == b"FALSE" else None


_GTIME = re.compile(r"([0-9]{4})([0-9]{2})([0-9]{2})([0-9]{2})(?:([0-9]{2})([0-9]{2})?)?(?:[.,]([0-9]+))?"
                    r"(Z|[+-][0-9]{2}(?:[0-9]{2})?)")
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _days(y: int, m: int, d: int) -> int:
    """Days from 1970-01-01 to a proleptic Gregorian date (year 0 included)."""
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    return era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468


@memoised(65536)
def norm_time(v: bytes) -> tuple[int, int, Fraction] | None:
    """GeneralizedTime (RFC 4517 §3.3.13) as (UTC second, leap, fraction of a second): a leap
    second (``…60``) orders after ``…59`` and before the next minute."""
    return _parse_time(v)


def _parse_time(v: bytes) -> tuple[int, int, Fraction] | None:
    m = _GTIME.fullmatch(v.decode("ascii", "replace"))
    if m is None:
        return None
    year, month, day, hour = (int(x) for x in m.group(1, 2, 3, 4))
    minute, second, frac, zone = m.group(5, 6, 7, 8)
    leap = second == "60"
    if (not 1 <= month <= 12 or not 1 <= day <= _MONTH_DAYS[month - 1] or hour > 23
            or (minute is not None and int(minute) > 59) or (second is not None and int(second) > 60)):
        return None
    if month == 2 and day == 29 and not (year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)):
        return None
    offset = 0
    if zone != "Z":
        zh, zm = int(zone[1:3]), int(zone[3:5] or 0)
        if zh > 23 or zm > 59:
            return None
        offset = (zh * 3600 + zm * 60) * (1 if zone[0] == "+" else -1)
    whole = (_days(year, month, day) * 86400 + hour * 3600 + int(minute or 0) * 60
             + (59 if leap else int(second or 0)) - offset)
    part = Fraction(0)
    if frac is not None:  # a fraction of the last unit given
        unit = 1 if second is not None else 60 if minute is not None else 3600
        part = Fraction(int(frac), 10 ** len(frac)) * unit
        whole += int(part)
        part -= int(part)
    return whole, int(leap), part


_DESCR = re.compile(r"[A-Za-z][A-Za-z0-9-]*")
_NUMERICOID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")


def norm_oid(v: bytes) -> str | None:
    """OID syntax: a descriptor (any case) or a numeric OID."""
    t = _text(v)
    if t is None or not (_DESCR.fullmatch(t) or _NUMERICOID.fullmatch(t)):
        return None
    return t.lower()


def norm_object_class(v: bytes) -> str | None:
    """An object class by name or OID; one we do not define is Undefined (as in slapd)."""
    t = _text(v)
    c = SCHEMA.object_class(t) if t is not None and norm_oid(v) is not None else None
    return c.name.lower() if c is not None else None


def _strict_dn(text: str) -> dn.DN | None:
    """A DN normalised, or None if invalid; an attribute value may not be empty (no syntax
    of ours allows an empty value: slapd rejects ``cn=`` too)."""
    try:
        parsed = dn.parse(text)
    except dn.DNError:
        return None
    if any(not value for rdn in parsed for _, value in rdn):
        return None
    return dn.normalise(parsed)


@memoised(4096)
def norm_dn(v: bytes) -> dn.DN | None:
    """distinguishedNameMatch: any spelling of the same DN."""
    t = _text(v)
    return _strict_dn(t) if t is not None else None


# ----------------------------------------------------------------------------- RFC 4523 assertions


@dataclass(frozen=True, slots=True)
class CertificateAssertion:
    serial: str  # canonical upper-case hex
    issuer: dn.DN  # normalised


@dataclass(frozen=True, slots=True)
class CertificateListAssertion:
    issuer: dn.DN
    this_update: str  # as written (slapd compares it so)


_SERIAL = re.compile(r"(-?)(?:0[xX]([0-9A-Fa-f]+)|'([0-9A-Fa-f]*)'H|([0-9]+))")


def _serial(text: str) -> tuple[str, int] | None:
    """A serial number at the start of `text` (decimal, ``'hex'H`` or ``0xhex``, no leading
    zero) -> (canonical hex, characters read)."""
    m = _SERIAL.match(text)
    if m is None:
        return None
    neg, hex1, hex2, dec = m.groups()
    digits = hex1 if hex1 is not None else hex2 if hex2 is not None else dec
    if len(digits) > 1 and digits[0] == "0":
        return None
    value = int(digits or "0", 10 if dec is not None else 16)
    try:
        return serial_to_hex(-value if neg else value), m.end()
    except (IdentifierError, ValueError):
        return None


def _quoted(text: str) -> tuple[str, int] | None:
    """A GSER string at the start of `text` ('"' … '"', '""' for a quote) -> (value, length)."""
    if not text.startswith('"'):
        return None
    i, out = 1, list[str]()
    while i < len(text):
        if text[i] == '"':
            if text[i + 1:i + 2] != '"':
                return "".join(out), i + 1
            i += 1
        out.append(text[i])
        i += 1
    return None


_Field = Callable[[str], tuple[object, int] | None]


def _gser(text: str, fields: dict[str, _Field]) -> dict[str, object] | None:
    """``{ name value, name value }`` with every field of `fields` once, in any order, names in
    any case, spaces after ``{``, after a name and around ``,``; nothing after ``}``."""
    if len(text) < 2 or text[0] != "{" or text[-1] != "}":
        return None
    body, pos, got = text[1:-1], 0, {}
    while True:
        pos = len(body) - len(body[pos:].lstrip(" "))
        name = next((n for n in fields if body[pos:pos + len(n)].lower() == n.lower()), None)
        if name is None or name in got or body[pos + len(name):pos + len(name) + 1] != " ":
            return None
        pos += len(name)
        pos = len(body) - len(body[pos:].lstrip(" "))
        parsed = fields[name](body[pos:])
        if parsed is None:
            return None
        got[name], used = parsed
        pos += used
        pos = len(body) - len(body[pos:].lstrip(" "))
        if len(got) == len(fields):
            return got if pos == len(body) else None
        if body[pos:pos + 1] != ",":
            return None
        pos += 1


def _issuer(required_choice: bool) -> _Field:
    def read(text: str) -> tuple[object, int] | None:
        skip = len("rdnSequence:") if text[:12].lower() == "rdnsequence:" else 0
        if required_choice and not skip:
            return None
        quoted = _quoted(text[skip:])
        issuer = _strict_dn(quoted[0]) if quoted is not None else None
        return None if quoted is None or issuer is None else (issuer, skip + quoted[1])

    return read


def _this_update(text: str) -> tuple[object, int] | None:
    quoted = _quoted(text)  # a GeneralizedTime in UTC, as a CRL's thisUpdate is written
    if quoted is None or not quoted[0].endswith("Z") or len(quoted[0]) < 15 \
            or _parse_time(quoted[0].encode()) is None:
        return None
    return quoted


_CERT_FIELDS: dict[str, _Field] = {
    "serialNumber": _serial, "issuer": _issuer(False)}
_CRL_FIELDS: dict[str, _Field] = {
    "issuer": _issuer(True), "thisUpdate": _this_update}


def parse_certificate_assertion(value: bytes) -> CertificateAssertion | None:
    """A CertificateExactAssertion (RFC 4523 §2.1): the GSER form ldapsearch users write,
    ``{ serialNumber 123, issuer rdnSequence:"CN=..." }`` (decimal, ``'7B'H`` or ``0x7B``),
    or ``serial$issuer``; None if it is neither."""
    text = _text(value)
    if text is None:
        return None
    if text[:1] == "{" or text[-1:] == "}":
        got = _gser(text, _CERT_FIELDS)
        if got is None:
            return None
        return CertificateAssertion(str(got["serialNumber"]), got["issuer"])  # type: ignore[arg-type]
    serial, sep, issuer = text.partition("$")
    if not sep or not serial.isdigit() or not serial.isascii():
        return None
    name = _strict_dn(issuer)
    return CertificateAssertion(serial_to_hex(int(serial)), name) if name is not None else None


def parse_certificate_list_assertion(value: bytes) -> CertificateListAssertion | None:
    """A CertificateListExactAssertion (RFC 4523 §2.5): ``{ issuer rdnSequence:"CN=...",
    thisUpdate "20261205083825Z" }``; None if it is not one."""
    text = _text(value)
    got = _gser(text, _CRL_FIELDS) if text is not None else None
    if got is None:
        return None
    return CertificateListAssertion(got["issuer"], str(got["thisUpdate"]))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- matching rules


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    oid: str
    kind: str  # equality, ordering (TRUE when the value is less than the assertion), substrings
    syntaxes: frozenset[str]  # the attribute syntaxes it applies to (RFC 4517 §4.1)
    normalise: Normaliser

    def suits(self, attr: AttributeType) -> bool:
        return attr.syntax in self.syntaxes


_STRINGS = frozenset({DIRECTORY_STRING, PRINTABLE_STRING})
_NORMALISERS: dict[str, tuple[str, frozenset[str], Normaliser]] = {
    "booleanMatch": ("equality", frozenset({BOOLEAN}), norm_boolean),
    "caseIgnoreMatch": ("equality", _STRINGS, norm_case_ignore),
    "caseIgnoreOrderingMatch": ("ordering", _STRINGS, norm_case_ignore),
    "caseIgnoreSubstringsMatch": ("substrings", _STRINGS, norm_case_ignore),
    "caseExactMatch": ("equality", _STRINGS, norm_case_exact),
    "caseExactOrderingMatch": ("ordering", _STRINGS, norm_case_exact),
    "caseExactSubstringsMatch": ("substrings", _STRINGS, norm_case_exact),
    "caseIgnoreIA5Match": ("equality", frozenset({IA5_STRING}), norm_ia5),
    "caseIgnoreIA5SubstringsMatch": ("substrings", frozenset({IA5_STRING}), norm_ia5),
    "distinguishedNameMatch": ("equality", frozenset({DN_SYNTAX}), norm_dn),
    "objectIdentifierMatch": ("equality", frozenset({OID_SYNTAX}), norm_oid),
    "integerMatch": ("equality", frozenset({INTEGER}), norm_integer),
    "integerOrderingMatch": ("ordering", frozenset({INTEGER}), norm_integer),
    "octetStringMatch": ("equality", frozenset({OCTET_STRING}), bytes),
    "generalizedTimeMatch": ("equality", frozenset({GENERALIZED_TIME}), norm_time),
    "generalizedTimeOrderingMatch": ("ordering", frozenset({GENERALIZED_TIME}), norm_time),
    "certificateExactMatch": ("equality", frozenset({CERTIFICATE}), parse_certificate_assertion),
    "certificateListExactMatch": ("equality", frozenset({CERTIFICATE_LIST}),
                                  parse_certificate_list_assertion),
}
RULES: dict[str, Rule] = {
    name: Rule(name, oid, *_NORMALISERS[name]) for name, (oid, _) in MATCHING_RULES.items()}
_RULE_LOOKUP = {**{r.name.lower(): r for r in RULES.values()}, **{r.oid: r for r in RULES.values()}}
CERTIFICATE_RULES = frozenset({"certificateExactMatch", "certificateListExactMatch"})


def rule(name_or_oid: str | None) -> Rule | None:
    """A matching rule by name (any case) or OID; None if unknown or not given."""
    return _RULE_LOOKUP.get(name_or_oid.lower()) if name_or_oid is not None else None


def _ids(parse: Callable[[str], object]) -> Normaliser:
    def norm(v: bytes) -> Key | None:
        t = _text(v)
        if t is None:
            return None
        try:
            return parse(t)
        except IdentifierError:
            return norm_case_ignore(v)  # not an identifier: still compares as text

    return norm


# Normalisers for one attribute's own equality rule, where it differs from the rule's.
_SPECIAL: dict[str, Normaliser] = {
    "smkieui64": _ids(parse_eui64),
    "smkiserial": _ids(parse_serial),
    "smkikeyid": _ids(parse_key_id),
    "smkiissuerkeyid": _ids(parse_key_id),
    "smkisubjectkeyid": _ids(parse_key_id),
    "smkisha256": _ids(parse_key_id),
    "objectclass": norm_object_class,
    "structuralobjectclass": norm_object_class,
}


def normaliser(r: Rule, attr: AttributeType) -> Normaliser:
    """How `r` reads values of `attr` (and assertions about them)."""
    if r.name == attr.equality:
        return _SPECIAL.get(attr.key, r.normalise)
    return r.normalise


def equality(attr: AttributeType) -> tuple[Rule, Normaliser] | None:
    found = RULES.get(attr.equality or "")
    return None if found is None else (found, normaliser(found, attr))


# ----------------------------------------------------------------------------- descriptions


@dataclass(frozen=True, slots=True)
class Description:
    """A recognised attribute description."""

    type: AttributeType
    keys: tuple[str, ...]  # the keys of the type and its subtypes, as entries hold them
    tagged: bool  # has a tagging option: names only values with that tag (none here)


@memoised(4096)
def describe(text: str) -> Description | None:
    """An attribute description (RFC 4512 §2.5), or None if unrecognised."""
    base, *options = text.split(";")
    attr, _ = SCHEMA.attribute(base)
    if attr is None:
        return None
    binary = tagged = False
    for option in options:
        lower = option.lower()
        if not option or not all(c.isascii() and (c.isalnum() or c == "-") for c in option):
            return None
        if lower == "binary":  # RFC 4522: only on types transferred so, and only once
            if binary or not attr.binary:
                return None
            binary = True
        elif lower.startswith("lang-"):  # RFC 3866 language tags
            tagged = True
        else:
            return None
    return Description(attr, tuple(a.key for a in SCHEMA.subtypes[attr.key]), tagged)


def selected_keys(text: str) -> tuple[str, ...]:
    """The attributes an entry returns for a description in a search's attribute list: the
    type and its subtypes; nothing for an unrecognised or tagged description."""
    d = describe(text)
    return () if d is None or d.tagged else d.keys
