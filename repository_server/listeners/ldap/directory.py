"""The directory: our layout (DIT) over the node's read replica.

```
<suffix>                                  organization (o=SMKI by default)
├─ ou=CAs                                 organizationalUnit
│  └─ smkiKeyId=<CA key id, hex>          cRLDistributionPoint + pkiCA + smkiCA
│        cACertificate;binary (every certificate of that key), certificateRevocationList;binary
│        (its current CRL), authorityRevocationList;binary (its current ARL), metadata
├─ ou=Devices                             organizationalUnit
│  └─ smkiEui64=00-DB-12-…                smkiSubjectEntry: one device
│     └─ smkiSerial=<serial hex>          smkiCertificate + pkiUser: userCertificate;binary, metadata
├─ ou=Organisations                       the same for organisations (EUI-64 = entity id)
└─ ou=Other                               smkiSerial=<serial hex>: certificates of neither kind
```

plus the root DSE ("") and the subschema entry (``cn=Subschema``). Nothing is materialised:
a search resolves its base, then reads candidates through the cheapest index the filter
allows (:func:`filters.plan`), and walks a subtree a page at a time in (EUI-64, id) order
when it has to (the replica's subject index is in that order), so memory stays bounded
whatever the store holds. Everything is read through the read model (`DirectoryReads`, which
`Catalog` implements), never PostgreSQL. The entries themselves are built in `entries.py`.

Who may read what is `access.ReadAccess`'s rule: entries of devices, organisations and other
certificates are private (``public=False``). A reader who may not read them sees neither
them nor whether they exist: a base at or below one is ``noSuchObject`` with the unit as the
matched DN, exactly as for an entry that does not exist (what slapd answers for an entry its
ACL does not disclose).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from repository_server.access import ReadAccess
from repository_server.listeners.ldap import dn
from repository_server.listeners.ldap.entries import (
    CLASSES,
    SUBSCHEMA_NDN,
    UNITS,
    Entries,
    eui_text,
    single,
    unit_of,
)
from repository_server.listeners.ldap.filters import Entry, Plan
from repository_server.listeners.ldap.protocol import ResultCode
from repository_server.pki.ids import IdentifierError, parse_eui64, parse_key_id, parse_serial
from repository_server.readmodel.catalog import CertEntry, CrlEntry, ReplicaUnavailable

log = logging.getLogger(__name__)

PAGE_ROWS = 500


class DirectoryError(Exception):
    def __init__(self, code: ResultCode, message: str, matched: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.matched = matched


@dataclass(frozen=True, slots=True)
class Node:
    """A resolved base DN."""

    kind: str  # dse, schema, suffix, ou, ca, subject, cert
    unit: str = ""  # cas, devices, organisations, other
    key: bytes = b""  # CA key id or EUI-64
    serial: str = ""


class DirectoryReads(Protocol):
    """What the directory reads from the read model (`readmodel.catalog.Catalog`). Each
    raises ReplicaUnavailable while the replica cannot answer."""

    @property
    def live(self) -> bool: ...

    def version(self) -> int: ...

    def has_subjects(self, device: bool) -> bool: ...

    def has_other(self) -> bool: ...

    def ca_certificates(self) -> list[CertEntry]: ...

    def current_crls(self) -> list[CrlEntry]: ...

    def by_sha256(self, sha256: bytes) -> list[CertEntry]: ...

    def by_subject_key_id(self, key_id: bytes) -> list[CertEntry]: ...

    def subjects_page(self, device: bool, after_eui: bytes, limit: int) -> list[bytes]: ...

    def subject_certificates_page(self, device: bool, after_eui: bytes, after_id: int,
                                  limit: int) -> list[CertEntry]: ...

    def other_certificates_page(self, after_id: int, limit: int) -> list[CertEntry]: ...

    def subject_now(self, eui64: bytes, device: bool, now: float
                    ) -> tuple[tuple[CertEntry, ...], list[str]]: ...

    def subject(self, eui64: bytes, device: bool) -> tuple[CertEntry, ...]: ...

    def subject_records(self, eui64: bytes, device: bool) -> list[bytes]: ...

    async def certificates(self, serial: str) -> tuple[CertEntry, ...]: ...

    async def by_eui(self, eui64: bytes, device: bool) -> tuple[CertEntry, ...]: ...

    async def by_eui_now(self, eui64: bytes, device: bool, now: float
                         ) -> tuple[tuple[CertEntry, ...], list[str]]: ...

    async def statuses(self, entries: Sequence[CertEntry], now: float) -> list[str]: ...


Want = Callable[[str], bool]  # may entries of this kind (CLASSES' keys) match the filter?


def wanted(classes: frozenset[str] | None) -> Want:
    """Which kinds of entry can match a filter that requires these objectClass values."""
    if classes is None:
        return lambda kind: True
    return lambda kind: classes <= CLASSES[kind]


def with_base(scope: int) -> bool:
    """Whether a scope includes its base entry (base and subtree do; one level and the
    subordinate subtree do not)."""
    return scope in (0, 2)


def unit_in_reach(unit: str, base: dn.DN, nsuffix: dn.DN) -> bool:
    """May entries of this organisational unit lie in the subtree of base?"""
    unit_ndn = ((("ou", unit),), *nsuffix)
    return dn.is_within(unit_ndn, base, 2) or dn.is_within(base, unit_ndn, 2)


class Directory:
    def __init__(self, catalog: DirectoryReads, *, suffix: str, root_dse: dict[str, list[bytes]],
                 access: ReadAccess | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.catalog = catalog
        self.access = access if access is not None else ReadAccess()
        self.clock = clock
        self.entries = Entries(suffix, root_dse)
        self.suffix = self.entries.suffix
        self.nsuffix = self.entries.nsuffix
        self._cas: dict[bytes, Entry] | None = None
        self._cas_until = float("inf")  # the earliest nextUpdate among their CRLs/ARLs
        self._cas_lock = asyncio.Lock()
        self._listeners: list[Callable[[], None]] = []
        self._version = -1  # the replica's applied change the CA entries were built at

    # -- change notification ------------------------------------------------------------
    def on_change(self, callback: Callable[[], None]) -> None:
        """Call `callback()` whenever something lodged may change an answer."""
        self._listeners.append(callback)

    def check_version(self) -> None:
        """Drop what was built from an older state of the replica (a change was applied,
        by this process or another of the node's): the CA entries and the listeners' caches
        of answers. Called before each search: one read of the replica's meta."""
        try:
            version = self.catalog.version()
        except OSError:  # the replica cannot be read: the search itself will say so
            return
        if version != self._version:
            self._version = version
            self._cas = None
            for callback in self._listeners:
                callback()

    # -- entries that need a read -------------------------------------------------------------
    async def unit_entry(self, unit: str) -> Entry:
        """An organisational unit; hasSubordinates costs one indexed read at most."""
        kind = UNITS[unit][1]
        if unit == "cas":
            children = bool(await self.ca_entries())
        elif kind is not None:
            children = self.catalog.has_subjects(kind == "device")
        else:
            children = self.catalog.has_other()
        return self.entries.unit_entry(unit, children)

    def _cas_usable(self) -> bool:
        # Kept while the replica is not being fed (PostgreSQL unreachable), but not past the
        # first nextUpdate of the CRLs/ARLs they hold: then the store must say what is current.
        return self._cas is not None and (self.clock() < self._cas_until or self.catalog.live)

    async def ca_entries(self) -> dict[bytes, Entry]:
        """One entry per CA key, built once per replica version. The entries hold the
        catalog's cached CRLs (the same objects, not a copy), and the catalog decides
        whether those may still be served."""
        cas = self._cas
        if cas is not None and self._cas_usable():
            return cas
        async with self._cas_lock:
            if self._cas is not None and self._cas_usable():
                return self._cas
            try:
                crls = {c.row.issuer_key_id: c.row for c in self.catalog.current_crls()}
            except ReplicaUnavailable as exc:
                raise DirectoryError(ResultCode.UNAVAILABLE, str(exc)) from None
            by_key: dict[bytes, list[CertEntry]] = {}
            for row in self.catalog.ca_certificates():
                assert row.subject_key_id is not None
                by_key.setdefault(row.subject_key_id, []).append(row)
            self._cas_until = min((c.next_update.timestamp() for c in crls.values()
                                   if c.next_update is not None), default=float("inf"))
            self._cas = {key_id: self.entries.ca_entry(key_id, certs, crls.get(key_id))
                         for key_id, certs in by_key.items()}
            return self._cas

    async def _certificate_entries(self, certs: Sequence[CertEntry],
                                   statuses: Sequence[str] | None = None) -> list[Entry]:
        if statuses is None:
            statuses = await self.catalog.statuses(certs, self.clock())
        return [self.entries.certificate_entry(c, s)
                for c, s in zip(certs, statuses, strict=True)]

    # -- base resolution -----------------------------------------------------------------------
    async def resolve(self, base: dn.DN, authenticated: bool) -> Node:
        """The node a (normalised) base DN names; DirectoryError(noSuchObject) if none, or
        if the reader may not read it (the matched DN then names only what it may read)."""
        if base == ():
            return Node("dse")
        if base == SUBSCHEMA_NDN:
            return Node("schema")
        depth = len(base) - len(self.nsuffix)
        if depth < 0 or base[depth:] != self.nsuffix:
            raise DirectoryError(ResultCode.NO_SUCH_OBJECT,
                                 f"no such entry: the directory holds {self.suffix} and below")
        if depth == 0:
            return Node("suffix")
        attr, unit = single(base[depth - 1])
        if attr != "ou" or unit not in UNITS:
            raise DirectoryError(ResultCode.NO_SUCH_OBJECT, "no such organisational unit"
                                 " (ou=CAs, ou=Devices, ou=Organisations, ou=Other)", self.suffix)
        if depth == 1:
            return Node("ou", unit)
        # below a unit: the matched DN names the deepest entry that exists (RFC 4511 §4.1.9)
        matched = f"ou={UNITS[unit][0]},{self.suffix}"
        try:
            if unit == "cas":
                node, matched = await self._resolve_ca(base, depth, matched)
            elif self.access.may_read_private(authenticated=authenticated):
                if unit == "other":
                    node, matched = await self._resolve_other(base, depth, matched)
                else:
                    node, matched = await self._resolve_subject(base, depth, unit, matched)
            else:  # everything below the other units is private: not even whether it exists
                node = None
        except IdentifierError:
            node = None
        if node is None:
            raise DirectoryError(ResultCode.NO_SUCH_OBJECT, "no such entry", matched)
        return node

    async def _resolve_ca(self, base: dn.DN, depth: int, matched: str
                          ) -> tuple[Node | None, str]:
        attr, value = single(base[depth - 2])
        if attr == "smkikeyid":
            key_id = parse_key_id(value)
            ca = (await self.ca_entries()).get(key_id)
            if ca is not None:
                if depth == 2:
                    return Node("ca", "cas", key_id), matched
                matched = ca.dn
        return None, matched

    async def _resolve_other(self, base: dn.DN, depth: int, matched: str
                             ) -> tuple[Node | None, str]:
        attr, value = single(base[depth - 2])
        if attr == "smkiserial":
            serial = parse_serial(value)
            if any(unit_of(c) == "other" for c in await self.catalog.certificates(serial)):
                if depth == 2:
                    return Node("cert", "other", b"", serial), matched
                matched = f"smkiSerial={serial},{matched}"
        return None, matched

    async def _resolve_subject(self, base: dn.DN, depth: int, unit: str, matched: str
                               ) -> tuple[Node | None, str]:
        attr, value = single(base[depth - 2])
        if attr != "smkieui64":
            return None, matched
        eui = parse_eui64(value)
        certs = await self.catalog.by_eui(eui, unit == "devices")
        if not certs:
            return None, matched
        if depth == 2:
            return Node("subject", unit, eui), matched
        matched = f"smkiEui64={certs[0].eui_text},{matched}"
        attr, value = single(base[depth - 3])
        if attr == "smkiserial":
            try:
                serial = parse_serial(value)
            except IdentifierError:  # no such entry below the subject's
                return None, matched
            if any(c.serial == serial for c in certs):
                if depth == 3:
                    return Node("cert", unit, eui, serial), matched
                matched = f"smkiSerial={serial},{matched}"
        return None, matched

    # -- searching ----------------------------------------------------------------------------------
    async def candidates(self, node: Node, scope: int, plan: Plan, authenticated: bool,
                         base: dn.DN) -> AsyncIterator[Entry]:
        """Entries in scope of the base that may match (a superset: the caller applies the
        filter and the read rule to each). Private entries are read only when the reader may
        read them. Scopes: 0 base, 1 one level, 2 subtree, 3 subordinate subtree (the
        subtree without the base, as `ldapsearch -s children` asks)."""
        if node.kind == "dse":
            found = self._from_root(scope, plan, authenticated)
        elif node.kind == "schema":
            found = self._schema(scope)
        elif plan.indexed:
            found = self._indexed_in_scope(plan, authenticated, base, scope)
        else:
            private = self.access.may_read_private(authenticated=authenticated)
            found = self._walk(node, scope, wanted(plan.classes), private)
        async for e in found:
            yield e

    async def _from_root(self, scope: int, plan: Plan, authenticated: bool
                         ) -> AsyncIterator[Entry]:
        if scope == 0:
            yield self.entries.root_dse()
        elif scope == 1 or (plan.classes is not None and "organization" in plan.classes):
            yield self.entries.suffix_entry()
        else:  # subtree from the root: the whole naming context
            async for e in self.candidates(Node("suffix"), 2, plan, authenticated,
                                           self.nsuffix):
                yield e

    async def _schema(self, scope: int) -> AsyncIterator[Entry]:
        if with_base(scope):
            yield self.entries.subschema()

    async def _indexed_in_scope(self, plan: Plan, authenticated: bool, base: dn.DN,
                                scope: int) -> AsyncIterator[Entry]:
        for e in await self._indexed(plan, authenticated, base):
            if dn.is_within(e.ndn, base, scope):
                yield e

    def _walk(self, node: Node, scope: int, want: Want, private: bool
              ) -> AsyncIterator[Entry]:
        """The entries in scope of a base below the root, walked (no index applies)."""
        if node.kind == "suffix":
            return self._walk_suffix(scope, want, private)
        if node.kind == "ou":
            return self._walk_unit(node.unit, scope, want, private)
        if node.kind == "ca":
            return self._walk_ca(node, scope, want)
        if node.kind == "subject":
            return self._walk_subject(node, scope, want)
        return self._walk_cert(node, scope, want)

    async def _walk_suffix(self, scope: int, want: Want, private: bool
                           ) -> AsyncIterator[Entry]:
        if with_base(scope) and want("suffix"):
            yield self.entries.suffix_entry()
        if scope == 0:
            return
        for unit in UNITS:
            if want("ou"):
                yield await self.unit_entry(unit)
            if scope != 1:
                async for e in self._unit_contents(unit, 2, private, want):
                    yield e

    async def _walk_unit(self, unit: str, scope: int, want: Want, private: bool
                         ) -> AsyncIterator[Entry]:
        if with_base(scope) and want("ou"):
            yield await self.unit_entry(unit)
        if scope != 0:
            async for e in self._unit_contents(unit, min(scope, 2), private, want):
                yield e

    async def _walk_ca(self, node: Node, scope: int, want: Want) -> AsyncIterator[Entry]:
        if with_base(scope) and want("ca"):
            yield (await self.ca_entries())[node.key]

    async def _walk_subject(self, node: Node, scope: int, want: Want) -> AsyncIterator[Entry]:
        certs = await self.catalog.by_eui(node.key, node.unit == "devices")
        if with_base(scope) and want("subject"):
            yield self.entries.subject_entry(node.unit, certs[0].eui_text)
        if scope != 0 and want("cert"):
            for e in await self._certificate_entries(certs):
                yield e

    async def _walk_cert(self, node: Node, scope: int, want: Want) -> AsyncIterator[Entry]:
        if not (with_base(scope) and want("cert")):
            return
        found = [c for c in await self.catalog.certificates(node.serial)
                 if unit_of(c) == node.unit and (not node.key or c.eui_text == eui_text(node.key))]
        for e in await self._certificate_entries(found):
            yield e

    async def _unit_contents(self, unit: str, scope: int, private: bool,
                             want: Want) -> AsyncIterator[Entry]:
        """The entries below a unit (scope 1: its children; 2: all of them)."""
        if unit == "cas":
            if want("ca"):
                for e in (await self.ca_entries()).values():
                    yield e
            return
        if not private:
            return
        if unit == "other":
            contents = self._other_certificates(want)
        elif scope == 1 or not want("cert"):  # the subject entries only
            contents = self._subjects(unit, want)
        else:
            contents = self._subjects_and_certificates(unit, want)
        async for e in contents:
            yield e

    async def _other_certificates(self, want: Want) -> AsyncIterator[Entry]:
        if not want("cert"):
            return
        after = 0
        while True:
            rows = self.catalog.other_certificates_page(after, PAGE_ROWS)
            for e in await self._certificate_entries(rows):
                yield e
            if len(rows) < PAGE_ROWS:
                return
            after = rows[-1].id

    async def _subjects(self, unit: str, want: Want) -> AsyncIterator[Entry]:
        if not want("subject"):
            return
        device = UNITS[unit][1] == "device"
        after_eui = b""
        while True:
            euis = self.catalog.subjects_page(device, after_eui, PAGE_ROWS)
            for eui in euis:
                yield self.entries.subject_entry(unit, eui_text(eui))
            if len(euis) < PAGE_ROWS:
                return
            after_eui = euis[-1]

    async def _subjects_and_certificates(self, unit: str, want: Want) -> AsyncIterator[Entry]:
        """Each subject entry followed by its certificates', in (EUI-64, id) order."""
        device = UNITS[unit][1] == "device"
        after_eui, after_id = b"", 0
        last = b""
        while True:
            rows = self.catalog.subject_certificates_page(device, after_eui, after_id, PAGE_ROWS)
            entries = await self._certificate_entries(rows)
            for row, e in zip(rows, entries, strict=True):
                assert row.eui64 is not None
                if row.eui64 != last:
                    last = row.eui64
                    if want("subject"):
                        yield self.entries.subject_entry(unit, eui_text(row.eui64))
                yield e
            if len(rows) < PAGE_ROWS:
                return
            after_eui, after_id = rows[-1].eui64 or b"", rows[-1].id

    # -- through an index --------------------------------------------------------------------
    async def _indexed(self, plan: Plan, authenticated: bool, base: dn.DN) -> list[Entry]:
        """Candidates through an index: by EUI-64, SHA-256, serial or key id (the first the
        plan has, `Plan.index`)."""
        index = plan.index
        if index == "eui":
            return await self._by_eui(plan, authenticated, base)
        cas = await self.ca_entries()
        if index == "sha256":
            assert plan.sha256 is not None
            certs = self.catalog.by_sha256(plan.sha256)
            want_sha = plan.sha256.hex().encode()
            out = [e for e in cas.values() if want_sha in e.attrs["smkisha256"]]
        elif index == "serial":
            assert plan.serial is not None
            certs = [*await self.catalog.certificates(plan.serial)]
            want_serial = plan.serial.encode()
            out = [e for e in cas.values() if want_serial in e.attrs["smkiserial"]]
        else:
            assert plan.key_id is not None
            out = [cas[plan.key_id]] if plan.key_id in cas else []
            certs = (self.catalog.by_subject_key_id(plan.key_id)
                     if self.access.may_read_private(authenticated=authenticated) else [])
        certs = [c for c in certs if unit_of(c) != "cas"
                 and self.access.may_read(public=c.public, authenticated=authenticated)]
        return out + await self._certificate_entries(certs)

    async def _by_eui(self, plan: Plan, authenticated: bool, base: dn.DN) -> list[Entry]:
        """The hot path: a device's or organisation's entry and its certificates'."""
        assert plan.eui is not None
        if not self.access.may_read_private(authenticated=authenticated):
            return []
        eui = plan.eui_bytes or parse_eui64(plan.eui)
        out: list[Entry] = []
        for unit in ("devices", "organisations"):
            if not unit_in_reach(unit, base, self.nsuffix):
                continue
            found, statuses = await self.catalog.by_eui_now(eui, unit == "devices", self.clock())
            if found:
                out.append(self.entries.subject_entry(unit, plan.eui))
                out += await self._certificate_entries(found, statuses)
        return out

    async def all_entries(self) -> AsyncIterator[Entry]:
        """Every entry below the suffix, in DIT order (for export-ldif)."""
        async for e in self.candidates(Node("suffix"), 2, Plan(), True, self.nsuffix):
            yield e
