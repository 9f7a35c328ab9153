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

**Shapes: from bytes in to bytes out.** Clients ask the same search over and over with only
the EUI-64 changed. Once a request has qualified, its bytes after the message id are learnt as
a *shape*: the bytes before the EUI-64's value, the bytes after it, and the compiled search
(`Query`). A later request of the same length that starts and ends with the same bytes is the
same search with another EUI-64 (the bytes before it fix every tag and length, the value's
own included), so `Shapes.match` answers it without decoding the request into objects, without
a task, and with the answer's entries encoded from the replica's values (`FastSearch.encode`).
A request that matches no shape, or whose answer would not be the short way's (an invalid
EUI-64, more entries than the size limit, the replica unavailable), takes the ordinary road,
which decodes it and says what is wrong.

**Records read undecoded.** When the rest of the filter tests only what a certificate
record's head holds (its kind, usage, role, manufacturing flag, object classes) and the
search sends none of the attributes that need more than its serial, DER, SHA-256 and head
(no status, dates, names or key ids), the device's records are read as stored
(`Catalog.subject_records`, no decoding). Each is tested on the six bytes of its head that
hold kind, status, flag, role and usage (`records.TRAITS`), the verdict memoised per distinct
value of them; only the certificates that pass are sliced for their serial and DER (`_Raw`),
so a device's certificate for the other key usage is never decoded. An entry that sends
userCertificate alone is encoded in one join (`responses.single_value_op`); other attributes
are built by the same `CERT_ATTRS` functions as the whole entry's, from a `_Brief` holding
just the fields those read. `LdapConnection._answer_whole` takes a request that arrives as one
whole PDU to its shape without the frame decoder's buffering. Measured (BENCHMARKS.md, *third
pass*): at 100k devices, a store that fits in the page cache, 64 connections, one pinned core,
the answer took 14.4 µs in-server before the undecoded read and 10.8 µs after it; in the
shared harness the search went from 0.42× to 0.85× slapd at 1,000,000 devices (0.81× at 100k).
"""

from __future__ import annotations

import struct
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass

from repository_server.listeners.ldap import dn, protocol, responses
from repository_server.listeners.ldap.answers import SELECTABLE, Selection
from repository_server.listeners.ldap.directory import Directory
from repository_server.listeners.ldap.entries import CERT_ATTR_KEYS, CERT_ATTRS, CertAttr, unit_of
from repository_server.listeners.ldap.filters import Entry, Predicate, compile_filter
from repository_server.listeners.ldap.matching import equality
from repository_server.listeners.ldap.schema import SCHEMA
from repository_server.readmodel import records
from repository_server.readmodel.catalog import CertEntry

try:  # the innermost loops in C (setup.py builds it when it can; ldap/_hot.c says why)
    from repository_server.listeners.ldap import _hot as _compiled  # type: ignore[attr-defined]
except ImportError:  # built without a C compiler: the same work in Python
    HOT: types.ModuleType | None = None
else:
    HOT = _compiled
    HOT.layout(*records.HEAD_LAYOUT)

_PLAIN = frozenset({"objectclass", "smkikind", "smkikeyusage", "smkistatus", "smkiserial",
                    "smkirole", "smkimanufacturingflag", "smkieui64", "smkisha256"})
# the attributes of a subject entry (`Entries.subject_entry`): a rest of the filter that tests
# none of them is never true of it (each conjunct is an equality or a presence)
_SUBJECT_KEYS = frozenset({"objectclass", "smkieui64", "smkikind", "structuralobjectclass",
                           "hassubordinates", "entrydn", "subschemasubentry"})
_EUI = SCHEMA.attribute("smkiEui64")[0]
assert _EUI is not None
_EUI_EQUALITY = equality(_EUI)
assert _EUI_EQUALITY is not None
_EUI_NORM = _EUI_EQUALITY[1]
_BY_KEY = SELECTABLE
_FOREVER = float("inf")
MAX_SHAPES = 64  # learnt shapes kept (clients ask a handful); beyond, the memo starts again
# what a certificate record's head decides (`_Raw.accepts`), and what `_Brief` can build
_HEAD_TESTED = frozenset({"objectclass", "smkikind", "smkimanufacturingflag", "smkikeyusage",
                          "smkirole"})
_BRIEF_SENT = _HEAD_TESTED | {"smkiserial", "smkisha256", "usercertificate", "smkieui64",
                              "structuralobjectclass", "hassubordinates", "entrydn",
                              "subschemasubentry"}
_KIND_INDEX = {kind: i for i, kind in enumerate(records.KINDS)}
_UNHEAD = records.CERT_HEAD.unpack_from
_KIND_AT, _TRAITS = records.KIND_AT, records.TRAITS
_H_NOT_AFTER, _H_KIND, _H_FLAG, _H_ROLE, _H_USAGE = (
    records.HEAD_NOT_AFTER, records.HEAD_KIND, records.HEAD_FLAG, records.HEAD_ROLE,
    records.HEAD_USAGE)
# a successful SearchResultDone (protocolOp), the last frame of every answer
SUCCESS_DONE = responses.result_op(5, protocol.ResultCode.SUCCESS)
_DN_START = b"smkiSerial="


def _always(_entry: Entry) -> bool:
    return True


def _eui64(value: bytes) -> bytes | None:
    """The 8 octets of an assertion value of smkiEui64's equality rule, None when it is not an
    EUI-64. The written form (`00-DB-12-...`, either case) without the general normaliser."""
    if len(value) == 23 and value[2::3] == b"-------":
        try:  # 8 octets only from 16 hex digits: any other character refused or one short
            octets = bytes.fromhex(value.decode("ascii").replace("-", ""))
        except ValueError:  # (UnicodeDecodeError among them)
            octets = b""
        if len(octets) == 8:
            return octets
    eui = _EUI_NORM(value)
    return eui if isinstance(eui, bytes) and len(eui) == 8 else None


@dataclass(frozen=True, slots=True)
class _Shape:
    """What a qualifying search needs beyond its EUI-64: the rest of its filter."""

    rest: Predicate
    keys: frozenset[str]  # the attributes the rest of the filter reads
    subject: bool | None  # the rest is always (True) or never (False) true of a subject entry


class _Brief:
    """The fields of a certificate record that the builds of `_BRIEF_SENT`'s attributes read
    (`CERT_ATTRS`'s functions take it where they take a `CertRecord`)."""

    __slots__ = ("_sha", "der", "eui_text", "kind", "manufacturing_flag", "role", "serial",
                 "usage")

    def __init__(self, head: tuple[typing.Any, ...], serial: str, der: bytes, eui_text: str
                 ) -> None:
        self.serial = serial
        self.der = der
        self.eui_text = eui_text
        self.kind = records.KINDS[head[_H_KIND]]
        self.manufacturing_flag = bool(head[_H_FLAG])
        role = head[_H_ROLE]
        self.role = None if role < 0 else role
        self.usage = records.USAGES[head[_H_USAGE]]
        self._sha: bytes = head[records.HEAD_SHA]

    @property
    def sha_hex(self) -> str:
        return self._sha.hex()


@dataclass(slots=True)
class _Raw:
    """How a qualifying search reads a device's records undecoded (module docstring)."""

    kind: int  # the records' kind (KINDS index): device or organisation
    accepts: dict[bytes, bool]  # record's value[TRAITS] -> the rest of the filter is true
    sent: tuple[tuple[bytes, CertAttr], ...]  # Query.sent, each name an element already
    der_only: bytes | None  # the name element when userCertificate is all that is sent
    dn_parts: tuple[bytes, bytes]  # a certificate's DN after its serial: before, after EUI-64


@dataclass(frozen=True, slots=True)
class Query:
    """A qualifying search compiled, all but its EUI-64."""

    unit: str  # "devices" or "organisations"
    device: bool
    subtree: bool  # scope subtree (the certificates too), else one level (the subject only)
    shape: _Shape
    selection: Selection
    size_limit: int  # 0: none
    base: str  # as the client spelt it (the access log)
    scope: int
    # a certificate entry, straight from the read model's values: the attributes the rest of
    # the filter tests (key, build), and those sent (wire name, build), in the entry's order
    tested: tuple[tuple[str, CertAttr], ...]
    sent: tuple[tuple[str, CertAttr], ...]
    statuses: bool  # whether the search tests or sends smkiStatus (else it is not worked out)
    raw: _Raw | None  # its records are read undecoded, tested on their heads


class FastSearch:
    def __init__(self, directory: Directory, compiled: bool = True) -> None:
        self.directory = directory
        # ldap/_hot.c when it was built and `ldap.compiled` is on, else None (Python)
        self.hot = HOT if compiled else None
        self.catalog = directory.catalog
        suffix = directory.nsuffix
        self._units = {((("ou", "devices"),), *suffix): ("devices", True),
                       ((("ou", "organisations"),), *suffix): ("organisations", False)}
        self._rests: dict[tuple[protocol.EqualityMatch | protocol.Present, ...], _Shape | None] = {}
        self._encoder_memo: dict[tuple[frozenset[str], Selection], tuple[
            tuple[tuple[str, CertAttr], ...], tuple[tuple[str, CertAttr], ...],
            frozenset[str]]] = {}
        self.shapes = Shapes()
        self.answered = 0  # searches answered the short way (tests, curiosity)
        self.answered_raw = 0  # of which from records read undecoded
        self.answered_hot = 0  # of which answered by ldap/_hot.c

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
            subject = True if not rest else (False if not keys & _SUBJECT_KEYS else None)
            shape = _Shape(predicate, frozenset(keys), subject)
        if len(self._rests) >= 256:
            self._rests.clear()
        self._rests[rest] = shape
        return shape

    def compile(self, req: protocol.SearchRequest, base: dn.DN, private: bool,
                selection: Selection, size_limit: int) -> tuple[Query, bytes] | None:
        """The search compiled and its EUI-64 as the client sent it; None when it does not
        qualify (`private`: the reader may read private entries, as
        `access.ReadAccess.may_read_private` says, else it never does; `size_limit`: the
        lower of the client's and the server's, 0 for none)."""
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
        shape = self._shape(tuple(rest))
        if shape is None:
            return None
        everything = selection.all_user or selection.all_operational
        keys = None if everything else shape.keys | selection.named
        if keys is not None and not keys <= CERT_ATTR_KEYS:
            return None
        unit_name, device = unit
        tested, sent, sent_keys = self._encoders(shape.keys, selection)
        statuses = keys is None or "smkistatus" in keys  # (keys holds what the filter tests)
        raw = None
        if shape.keys <= _HEAD_TESTED and sent_keys <= _BRIEF_SENT and req.scope == 2:
            named = tuple((responses.attribute_name(name), build) for name, build in sent)
            before, _, after = self.directory.entries.subject_dn_tail(unit_name, "\0"
                                                                      ).partition("\0")
            raw = _Raw(_KIND_INDEX["device" if device else "organisation"], {}, named,
                       named[0][0] if sent_keys == {"usercertificate"} else None,
                       (before.encode(), after.encode()))
        return Query(unit_name, device, req.scope == 2, shape, selection, size_limit,
                     req.base, req.scope, tested, sent, statuses, raw), eui_value

    def _encoders(self, tested_keys: frozenset[str], selection: Selection
                  ) -> tuple[tuple[tuple[str, CertAttr], ...], tuple[tuple[str, CertAttr], ...],
                             frozenset[str]]:
        """Which of a certificate entry's attributes the filter tests and which are sent
        (`Selection.pick`'s rule, in `CERT_ATTRS` order; the keys of those sent);
        memoised per distinct pair."""
        found = self._encoder_memo.get((tested_keys, selection))
        if found is None:
            tested = tuple((key, build) for key, build in CERT_ATTRS if key in tested_keys)
            sent = []
            sent_keys = set()
            for key, build in CERT_ATTRS:
                attr = _BY_KEY[key]
                if key in selection.named or (selection.all_operational if attr.operational
                                              else selection.all_user):
                    sent.append((attr.wire_name, build))
                    sent_keys.add(key)
            found = tested, tuple(sent), frozenset(sent_keys)
            if len(self._encoder_memo) >= 256:
                self._encoder_memo.clear()
            self._encoder_memo[tested_keys, selection] = found
        return found

    def answer(self, query: Query, eui_value: bytes, now: float) -> tuple[list[bytes], float] | None:
        """The SearchResultEntry protocolOps the search returns, in the general path's order,
        and until when the answer holds (a status turns E at notAfter); None when the EUI-64
        is not one (the general path says so)."""
        eui = _eui64(eui_value)
        if eui is None:
            return None
        if query.raw is not None:
            return self._answer_raw(query, query.raw, eui)
        if query.statuses:
            certs, statuses = self.catalog.subject_now(eui, query.device, now)
        else:  # nothing reads a status (R from the CRL, E from notAfter): not worked out
            certs = self.catalog.subject(eui, query.device)
            statuses = [""] * len(certs)
        self.answered += 1
        until = _FOREVER
        if not certs:
            return [], until
        shape = query.shape
        entries = self.directory.entries
        rest = shape.rest
        ops = self._subject_ops(query, certs[0].eui_text)
        if query.subtree:
            tested, sent = query.tested, query.sent
            for c, status in zip(certs, statuses, strict=True):
                # the filter sees the attributes it tests (no DN: it tests none that holds one)
                if tested and rest(Entry("", (), {key: values for key, build in tested
                                                  if (values := build(c, status, "")) is not None}
                                         )) is not True:
                    continue
                entry_dn = entries.certificate_dn(c, unit_of(c))
                ops.append(responses.entry_op(entry_dn, [
                    (name, values) for name, build in sent
                    if (values := build(c, status, entry_dn)) is not None]))
                if status not in ("E", "R"):  # (unknown: as if it were not, the earlier)
                    until = min(until, c.not_after_ts)
        return ops, until


    def framed(self, mid: int, query: Query, eui_value: bytes, now: float
               ) -> tuple[bytes, int] | None:
        """The whole answer to a search of a learnt shape with message id `mid`: its
        LDAPMessages (the entries, then a successful done) and how many entries; None when the
        short way does not give the answer (`answer` says when; or more entries than the size
        limit), and the general path then answers it. A search that sends userCertificate
        alone and never returns the subject entry (the commonest) is encoded by ldap/_hot.c
        when it is there, else as `answer` and `responses.frames` do."""
        raw, hot = query.raw, self.hot
        if hot is not None and raw is not None and raw.der_only is not None \
                and query.shape.subject is False:
            # (the dashed form in C: 62 ns against `_eui64`'s 702, timeit, 3 % of a search)
            eui = hot.dashed_eui64(eui_value) or _eui64(eui_value)
            if eui is None:
                return None
            found = self.catalog.subject_records(eui, query.device)
            tail = eui.hex("-").upper().encode().join(raw.dn_parts)
            out = hot.frames(mid, found, raw.kind, raw.accepts if query.tested else None,
                             raw.der_only, _DN_START, tail, SUCCESS_DONE)
            if out is not None:
                self.answered += 1
                self.answered_raw += 1
                self.answered_hot += 1
                data, entries = out
                if query.size_limit and entries > query.size_limit:
                    return None
                return data, entries
            # a record of another kind, a verdict not yet memoised, a damaged record: Python
            answered = self._answer_raw(query, raw, eui, found)
        else:
            answered = self.answer(query, eui_value, now)
        if answered is None:
            return None
        ops = answered[0]
        if query.size_limit and len(ops) > query.size_limit:
            return None
        ops.append(SUCCESS_DONE)
        return responses.frames(mid, ops), len(ops) - 1

    def _subject_ops(self, query: Query, eui_text: str) -> list[bytes]:
        """The subject entry's SearchResultEntry when the search returns it, else nothing."""
        shape = query.shape
        if shape.subject is False:
            return []
        subject = self.directory.entries.subject_entry(query.unit, eui_text)
        if shape.subject or shape.rest(subject) is True:
            return [responses.entry_op(subject.dn, query.selection.pick(subject, False))]
        return []

    def _answer_raw(self, query: Query, raw: _Raw, eui: bytes, found: list[bytes] | None = None
                    ) -> tuple[list[bytes], float] | None:
        """`answer` from the device's records undecoded (module docstring), read now unless
        `found` holds them; None when a record is not of the query's kind (the general path
        says what it is)."""
        if found is None:
            found = self.catalog.subject_records(eui, query.device)
        self.answered += 1
        self.answered_raw += 1
        if not found:
            return [], _FOREVER
        eui_text = eui.hex("-").upper()
        ops = self._subject_ops(query, eui_text)
        tail = eui_text.encode().join(raw.dn_parts)
        accepts, kind, der_only = raw.accepts, raw.kind, raw.der_only
        tested = query.tested
        until_us = _FOREVER
        try:
            for value in found:
                if value[_KIND_AT] != kind:
                    return None
                if tested:  # decided by kind, status, flag, role and usage: memoised on them
                    traits = value[_TRAITS]
                    verdict = accepts.get(traits)
                    if verdict is None:
                        verdict = self._verdict(query, value, eui_text)
                        if len(accepts) >= 4096:
                            accepts.clear()
                        accepts[traits] = verdict
                    if not verdict:
                        continue
                head = _UNHEAD(value)
                serial, der = records.cert_serial_der(value, head)
                entry_dn = _DN_START + serial + tail
                if der_only is not None:  # (the commonest: userCertificate alone)
                    ops.append(responses.single_value_op(entry_dn, der_only, der))
                else:
                    text = entry_dn.decode()
                    cert = typing.cast(CertEntry, _Brief(head, serial.decode(), der, eui_text))
                    ops.append(responses.entry_op_named(entry_dn, [
                        (name, values) for name, build in raw.sent
                        if (values := build(cert, "", text)) is not None]))
                if head[_H_NOT_AFTER] < until_us:
                    until_us = head[_H_NOT_AFTER]
        except (IndexError, struct.error, UnicodeDecodeError) as exc:
            raise records.RecordError(f"certificate record: {exc}") from exc
        return ops, (_FOREVER if until_us == _FOREVER else until_us / 1e6)

    @staticmethod
    def _verdict(query: Query, value: bytes, eui_text: str) -> bool:
        """Whether the rest of the filter is true of the certificate whose record is
        `value` (it tests only what the head holds)."""
        cert = typing.cast(CertEntry, _Brief(_UNHEAD(value), "", b"", eui_text))
        return query.shape.rest(Entry("", (), {
            key: values for key, build in query.tested
            if (values := build(cert, "", "")) is not None})) is True


class Shapes:
    """Learnt request shapes: request bytes after the message id -> (Query, EUI-64 value).
    Bounded (MAX_SHAPES); shared by every connection of a process."""

    def __init__(self) -> None:
        # length of the request's bytes after its message id -> (prefix, suffix, query):
        # read by ldap/_hot.c `match` too, so its form is fixed (a list of 3-tuples)
        self.by_length: dict[int, list[tuple[bytes, bytes, Query]]] = {}
        self.count = 0
        self.matched = 0  # requests answered from a learnt shape (tests, curiosity)
        self.whole = 0  # of which read without the decoder (`LdapConnection._answer_whole`)

    def learn(self, key: bytes, eui_value: bytes, query: Query) -> None:
        """Remember the shape of `key`, a request that compiled to `query` with `eui_value`
        (learnt only when the value occurs exactly once in it)."""
        at = key.find(eui_value)
        if not eui_value or at < 2 or key.rfind(eui_value) != at:
            return
        prefix, suffix = key[:at], key[at + len(eui_value):]
        bucket = self.by_length.setdefault(len(key), [])
        for known_prefix, known_suffix, _ in bucket:
            if known_prefix == prefix and known_suffix == suffix:
                return
        if self.count >= MAX_SHAPES:
            self.by_length.clear()
            self.count = 0
            bucket = self.by_length.setdefault(len(key), [])
        bucket.append((prefix, suffix, query))
        self.count += 1

    def match(self, key: bytes) -> tuple[Query, bytes] | None:
        """The compiled search and EUI-64 value of a request of a learnt shape, else None."""
        bucket = self.by_length.get(len(key))
        if bucket is None:
            return None
        for prefix, suffix, query in bucket:
            if key.startswith(prefix) and key.endswith(suffix):
                return query, key[len(prefix):len(key) - len(suffix)]
        return None
