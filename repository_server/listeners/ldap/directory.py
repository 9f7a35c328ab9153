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
whatever the store holds. Nothing here reads PostgreSQL. Entries of devices,
organisations and other certificates are ``public=False``: the server shows them only to
bound users unless ``ldap.open_reads`` is set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from repository_server.listeners.ldap import dn
from repository_server.listeners.ldap.codec import ResultCode
from repository_server.listeners.ldap.filters import Entry, Plan
from repository_server.listeners.ldap.schema import SCHEMA
from repository_server.pki.ids import IdentifierError, format_key_id, parse_eui64, parse_key_id, parse_serial
from repository_server.readmodel.catalog import Catalog, CertEntry
from repository_server.readmodel.records import CrlRecord
from repository_server.store.db import Store

log = logging.getLogger(__name__)

SUBSCHEMA_DN = "cn=Subschema"
_SUBSCHEMA_NDN = dn.parse_normalised(SUBSCHEMA_DN)
PAGE_ROWS = 500

_CLASSES = {
    "suffix": frozenset({"top", "organization"}),
    "ou": frozenset({"top", "organizationalunit"}),
    "ca": frozenset({"top", "crldistributionpoint", "pkica", "smkica"}),
    "subject": frozenset({"top", "smkisubjectentry"}),
    "cert": frozenset({"top", "smkicertificate", "pkiuser"}),
}
# organisational units: (RDN value, the certificate kind below it or None)
UNITS = {"cas": ("CAs", None), "devices": ("Devices", "device"),
         "organisations": ("Organisations", "organisation"), "other": ("Other", None)}


class DirectoryError(Exception):
    def __init__(self, code: ResultCode, message: str, matched: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.matched = matched


_GT: dict[float, bytes] = {}


def _gt(ts: float) -> bytes:
    """GeneralizedTime of a POSIX time (memoised: validity ends repeat across certificates)."""
    found = _GT.get(ts)
    if found is None:
        found = datetime.fromtimestamp(ts, UTC).strftime("%Y%m%d%H%M%SZ").encode()
        if len(_GT) >= 65536:
            _GT.clear()
        _GT[ts] = found
    return found


def _common(entry_dn: str, structural: str, children: bool, attrs: dict[str, list[bytes]]) -> None:
    attrs["structuralobjectclass"] = [structural.encode()]
    attrs["hassubordinates"] = [b"TRUE" if children else b"FALSE"]
    attrs["entrydn"] = [entry_dn.encode()]
    attrs["subschemasubentry"] = [SUBSCHEMA_DN.encode()]


def _opt(value: str | None) -> list[bytes] | None:
    return [value.encode()] if value else None


_CertAttr = Callable[[CertEntry, str, str], list[bytes] | None]
# A certificate entry's attributes, in the order its entry lists them (key, build(cert, status,
# entry DN) -> values, or None when the certificate has no such value).
_CERT_ATTRS: tuple[tuple[str, _CertAttr], ...] = (
    ("objectclass", lambda c, s, d: [b"top", b"smkiCertificate", b"pkiUser"]),
    ("smkiserial", lambda c, s, d: [c.serial.encode()]),
    ("smkikind", lambda c, s, d: [c.kind.encode()]),
    ("smkistatus", lambda c, s, d: [s.encode()]),
    ("smkimanufacturingflag", lambda c, s, d: [b"TRUE" if c.manufacturing_flag else b"FALSE"]),
    ("smkinotbefore", lambda c, s, d: [_gt(c.not_before_ts)]),
    ("smkinotafter", lambda c, s, d: [_gt(c.not_after_ts)]),
    ("smkisha256", lambda c, s, d: [c.sha_hex.encode()]),
    ("usercertificate", lambda c, s, d: [c.der]),
    ("createtimestamp", lambda c, s, d: [_gt(c.modified_ts)]),
    ("smkisubject", lambda c, s, d: _opt(c.subject_name)),  # a device's subject is empty
    ("smkiissuer", lambda c, s, d: _opt(c.issuer_name)),
    ("smkieui64", lambda c, s, d: _opt(c.eui_text)),
    ("smkikeyusage", lambda c, s, d: _opt(c.usage)),
    ("smkirole", lambda c, s, d: None if c.role is None else [str(c.role).encode()]),
    ("smkiissuerkeyid", lambda c, s, d: _opt(format_key_id(c.issuer_key_id)
                                             if c.issuer_key_id else None)),
    ("smkisubjectkeyid", lambda c, s, d: _opt(format_key_id(c.subject_key_id)
                                              if c.subject_key_id else None)),
    # operational (as _common writes them)
    ("structuralobjectclass", lambda c, s, d: [b"smkiCertificate"]),
    ("hassubordinates", lambda c, s, d: [b"FALSE"]),
    ("entrydn", lambda c, s, d: [d.encode()]),
    ("subschemasubentry", lambda c, s, d: [SUBSCHEMA_DN.encode()]),
)
CERT_ATTR_KEYS = frozenset(key for key, _ in _CERT_ATTRS)


@dataclass(frozen=True, slots=True)
class Node:
    """A resolved base DN."""

    kind: str  # dse, schema, suffix, ou, ca, subject, cert
    unit: str = ""  # cas, devices, organisations, other
    key: bytes = b""  # CA key id or EUI-64
    serial: str = ""


class Directory:
    def __init__(self, catalog: Catalog, store: Store, *, suffix: str,
                 root_dse: dict[str, list[bytes]], clock: Callable[[], float] = time.time) -> None:
        self.catalog = catalog
        self.replica = catalog.replica
        self.store = store
        self.clock = clock
        self.suffix = suffix
        self.nsuffix = dn.parse_normalised(suffix)
        if not self.nsuffix:
            raise ValueError("ldap.suffix: must not be empty")
        self._root_dse = root_dse
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

    # -- fixed entries ----------------------------------------------------------------------
    def root_dse(self) -> Entry:
        attrs = {"objectclass": [b"top"], **{k: v for k, v in self._root_dse.items() if v}}
        attrs["namingcontexts"] = [self.suffix.encode()]
        attrs["subschemasubentry"] = [SUBSCHEMA_DN.encode()]
        return Entry("", (), attrs)

    def subschema(self) -> Entry:
        attrs: dict[str, list[bytes]] = {
            "objectclass": [b"top", b"subentry", b"subschema", b"extensibleObject"],
            "cn": [b"Subschema"]}
        for name, values in SCHEMA.subschema_values():
            attrs[name.lower()] = values
        _common(SUBSCHEMA_DN, "subentry", False, attrs)
        return Entry(SUBSCHEMA_DN, _SUBSCHEMA_NDN, attrs)

    def suffix_entry(self) -> Entry:
        _, value = _single(dn.parse(self.suffix)[0])
        key = _single(self.nsuffix[0])[0]
        raw = value.encode()
        attrs: dict[str, list[bytes]]
        if key == "ou":
            structural = "organizationalUnit"
            attrs = {"objectclass": [b"top", b"organizationalUnit"], "ou": [raw]}
        elif key == "dc":
            structural = "organization"
            attrs = {"objectclass": [b"top", b"organization", b"dcObject"], "dc": [raw], "o": [raw]}
        else:
            structural = "organization"
            attrs = {"objectclass": [b"top", b"organization"], "o": [raw]}
        attrs["description"] = [b"GB Smart Metering PKI repository (smki-repository)"]
        _common(self.suffix, structural, True, attrs)
        return Entry(self.suffix, self.nsuffix, attrs)

    async def unit_entry(self, unit: str) -> Entry:
        name, kind = UNITS[unit]
        entry_dn = f"ou={name},{self.suffix}"
        attrs: dict[str, list[bytes]] = {"objectclass": [b"top", b"organizationalUnit"],
                                         "ou": [name.encode()]}
        # hasSubordinates: one indexed row at most (migration 0004 indexes the "other" rows)
        self.catalog._check_ready()
        if unit == "cas":
            children = bool(await self.ca_entries())
        elif kind is not None:
            children = self.replica.has_subjects(kind == "device")
        else:
            children = self.replica.has_other()
        _common(entry_dn, "organizationalUnit", children, attrs)
        return Entry(entry_dn, ((("ou", unit),), *self.nsuffix), attrs)

    # -- CA entries ---------------------------------------------------------------------------
    def _cas_usable(self) -> bool:
        # Kept while the replica is not being fed (PostgreSQL unreachable), but not past the
        # first nextUpdate of the CRLs/ARLs they hold: then the store must say what is current.
        return self._cas is not None and (self.clock() < self._cas_until or self.catalog.live)

    async def ca_entries(self) -> dict[bytes, Entry]:
        cas = self._cas
        if cas is not None and self._cas_usable():
            return cas
        async with self._cas_lock:
            if self._cas is not None and self._cas_usable():
                return self._cas
            self.catalog._check_ready()
            rows = self.replica.ca_certificates()
            crls = {c.issuer_key_id: c for c in self.replica.current_crls()}
            self._cas_until = min((c.next_update.timestamp() for c in crls.values()
                                   if c.next_update is not None), default=float("inf"))
            built: dict[bytes, Entry] = {}
            by_key: dict[bytes, list[CertEntry]] = {}
            for row in rows:
                assert row.subject_key_id is not None
                by_key.setdefault(row.subject_key_id, []).append(row)
            for key_id, certs in by_key.items():
                built[key_id] = self._ca_entry(key_id, certs, crls.get(key_id))
            self._cas = built
            if not self._cas_usable():
                raise DirectoryError(ResultCode.UNAVAILABLE, "a CRL/ARL is past its nextUpdate and"
                                     " the store cannot be reached to say which is current")
            return built

    def _ca_entry(self, key_id: bytes, certs: list[CertEntry], crl: CrlRecord | None) -> Entry:
        key_hex = format_key_id(key_id)
        entry_dn = f"smkiKeyId={key_hex},ou=CAs,{self.suffix}"
        cn = _common_name(certs[-1].subject_name) or key_hex
        attrs: dict[str, list[bytes]] = {
            "objectclass": [b"top", b"cRLDistributionPoint", b"pkiCA", b"smkiCA"],
            "cn": [cn.encode()],
            "smkikeyid": [key_hex.encode()],
            "smkikind": _distinct(c.kind for c in certs),
            "smkiserial": _distinct(c.serial for c in certs),
            "smkinotbefore": _distinct(_gt(c.not_before_ts).decode() for c in certs),
            "smkinotafter": _distinct(_gt(c.not_after_ts).decode() for c in certs),
            "smkisubjectkeyid": [key_hex.encode()],
            "smkisha256": _distinct(c.sha_hex for c in certs),
            "smkisubject": _distinct(c.subject_name for c in certs if c.subject_name),
            "smkiissuer": _distinct(c.issuer_name for c in certs if c.issuer_name),
            "cacertificate": [c.der for c in certs],
            "createtimestamp": [_gt(min(c.modified_ts for c in certs))],
        }
        issuers = _distinct(format_key_id(c.issuer_key_id) for c in certs if c.issuer_key_id)
        if issuers:
            attrs["smkiissuerkeyid"] = issuers
        if crl is not None:
            attrs["certificaterevocationlist" if crl.kind == "crl" else "authorityrevocationlist"] = [
                crl.der]
            attrs["smkicrlnumber"] = [str(crl.crl_number).encode()]
            if crl.next_update is not None:
                attrs["smkicrlnextupdate"] = [_gt(crl.next_update.timestamp())]
            attrs["modifytimestamp"] = [_gt(crl.lodged_at.timestamp())]
        _common(entry_dn, "cRLDistributionPoint", False, attrs)
        certs_ids = tuple((c.serial, _issuer_ndn(c.issuer_name)) for c in certs)
        crl_ids = ((_issuer_ndn(crl.issuer_name), _gt(crl.this_update.timestamp()).decode()),) \
            if crl is not None else ()
        # A cached answer holding a CRL is not kept past its nextUpdate (it may be served
        # from memory while PostgreSQL is unreachable: then only within its validity).
        until = crl.next_update.timestamp() if crl is not None and crl.next_update else float("inf")
        return Entry(entry_dn, ((("smkikeyid", key_hex),), (("ou", "cas"),), *self.nsuffix),
                     attrs, certs_ids, valid_until=until, crls=crl_ids)

    # -- device, organisation and other certificate entries ---------------------------------
    def unit_of(self, c: CertEntry) -> str:
        if c.kind in ("device", "organisation") and c.eui_text:
            return "devices" if c.kind == "device" else "organisations"
        if c.kind in ("root", "ca") and c.subject_key_id:
            return "cas"
        return "other"

    def subject_entry(self, unit: str, eui_text: str) -> Entry:
        name, kind = UNITS[unit]
        entry_dn = f"smkiEui64={eui_text},ou={name},{self.suffix}"
        attrs: dict[str, list[bytes]] = {
            "objectclass": [b"top", b"smkiSubjectEntry"], "smkieui64": [eui_text.encode()],
            "smkikind": [(kind or "").encode()]}
        _common(entry_dn, "smkiSubjectEntry", True, attrs)
        return Entry(entry_dn, ((("smkieui64", eui_text),), (("ou", unit),), *self.nsuffix),
                     attrs, public=False)

    def certificate_entry(self, c: CertEntry, status: str,
                          keys: frozenset[str] | None = None) -> Entry:
        """A certificate's entry; with `keys`, only those attributes (the same values in the
        same order as the whole entry: what a search needs to evaluate its filter and
        answer, see ldap/fastpath.py)."""
        unit = self.unit_of(c)
        name, _ = UNITS[unit]
        if unit == "other":
            entry_dn = f"smkiSerial={c.serial},ou=Other,{self.suffix}"
            ndn: dn.DN = ((("smkiserial", c.serial),), (("ou", "other"),), *self.nsuffix)
        else:
            entry_dn = f"smkiSerial={c.serial},smkiEui64={c.eui_text},ou={name},{self.suffix}"
            ndn = ((("smkiserial", c.serial),), (("smkieui64", c.eui_text),), (("ou", unit),),
                   *self.nsuffix)
        attrs: dict[str, list[bytes]] = {}
        for key, build in _CERT_ATTRS:
            if keys is None or key in keys:
                values = build(c, status, entry_dn)
                if values is not None:
                    attrs[key] = values
        return Entry(entry_dn, ndn, attrs, ((c.serial, _issuer_ndn(c.issuer_name)),), public=False,
                     valid_until=c.not_after_ts if status not in ("E", "R") else float("inf"))

    async def _certificate_entries(self, certs: Sequence[CertEntry],
                                   statuses: Sequence[str] | None = None) -> list[Entry]:
        if statuses is None:
            statuses = await self.catalog.statuses(certs, self.clock())
        return [self.certificate_entry(c, s) for c, s in zip(certs, statuses, strict=True)]

    # -- base resolution -----------------------------------------------------------------------
    async def resolve(self, base: dn.DN) -> Node:
        """The node a (normalised) base DN names; DirectoryError(noSuchObject) if none."""
        if base == ():
            return Node("dse")
        if base == _SUBSCHEMA_NDN:
            return Node("schema")
        depth = len(base) - len(self.nsuffix)
        if depth < 0 or base[depth:] != self.nsuffix:
            raise DirectoryError(ResultCode.NO_SUCH_OBJECT,
                                 f"no such entry: the directory holds {self.suffix} and below")
        if depth == 0:
            return Node("suffix")
        matched = self.suffix
        attr, unit = _single(base[depth - 1])
        if attr != "ou" or unit not in UNITS:
            raise DirectoryError(ResultCode.NO_SUCH_OBJECT, "no such organisational unit"
                                 " (ou=CAs, ou=Devices, ou=Organisations, ou=Other)", matched)
        if depth == 1:
            return Node("ou", unit)
        # below a unit: the matched DN names the deepest entry that exists (RFC 4511 §4.1.9)
        matched = f"ou={UNITS[unit][0]},{self.suffix}"
        attr, value = _single(base[depth - 2])
        try:
            if unit == "cas" and attr == "smkikeyid":
                key_id = parse_key_id(value)
                ca = (await self.ca_entries()).get(key_id)
                if ca is not None:
                    if depth == 2:
                        return Node("ca", unit, key_id)
                    matched = ca.dn
            elif unit == "other" and attr == "smkiserial":
                serial = parse_serial(value)
                if any(self.unit_of(c) == "other" for c in await self.catalog.certificates(serial)):
                    if depth == 2:
                        return Node("cert", unit, b"", serial)
                    matched = f"smkiSerial={serial},{matched}"
            elif unit in ("devices", "organisations") and attr == "smkieui64":
                eui = parse_eui64(value)
                certs = await self.catalog.by_eui(eui, unit == "devices")
                if certs:
                    if depth == 2:
                        return Node("subject", unit, eui)
                    matched = f"smkiEui64={certs[0].eui_text},{matched}"
                    attr, value = _single(base[depth - 3])
                    if attr == "smkiserial":
                        serial = parse_serial(value)
                        if any(c.serial == serial for c in certs):
                            if depth == 3:
                                return Node("cert", unit, eui, serial)
                            matched = f"smkiSerial={serial},{matched}"
        except IdentifierError:
            pass
        raise DirectoryError(ResultCode.NO_SUCH_OBJECT, "no such entry", matched)

    # -- searching ----------------------------------------------------------------------------------
    async def candidates(self, node: Node, scope: int, plan: Plan, private: bool,
                         base: dn.DN) -> AsyncIterator[Entry]:
        """Entries in scope of the base that may match (a superset: the caller applies the
        filter). `private`: include device, organisation and other certificate entries.
        Scopes: 0 base, 1 one level, 2 subtree, 3 subordinate subtree (the subtree without
        the base, as `ldapsearch -s children` asks)."""
        with_base = scope in (0, 2)
        if node.kind == "dse":
            if scope == 0:
                yield self.root_dse()
            elif scope == 1 or (plan.classes is not None and "organization" in plan.classes):
                yield self.suffix_entry()
            else:  # subtree from the root: the whole naming context
                async for e in self.candidates(Node("suffix"), 2, plan, private, self.nsuffix):
                    yield e
            return
        if node.kind == "schema":
            if with_base:
                yield self.subschema()
            return
        if plan.indexed:
            for e in await self._indexed(plan, private, base):
                if dn.is_within(e.ndn, base, scope):
                    yield e
            return
        def want(kind: str) -> bool:
            return plan.classes is None or plan.classes <= _CLASSES[kind]

        if node.kind == "suffix":
            if with_base and want("suffix"):
                yield self.suffix_entry()
            if scope == 0:
                return
            for unit in UNITS:
                if want("ou"):
                    yield await self.unit_entry(unit)
                if scope != 1:
                    async for e in self._unit_contents(unit, 2, private, want):
                        yield e
        elif node.kind == "ou":
            if with_base and want("ou"):
                yield await self.unit_entry(node.unit)
            if scope != 0:
                async for e in self._unit_contents(node.unit, min(scope, 2), private, want):
                    yield e
        elif node.kind == "ca":
            if with_base and want("ca"):
                yield (await self.ca_entries())[node.key]
        elif node.kind == "subject":
            certs = await self.catalog.by_eui(node.key, node.unit == "devices")
            if with_base and want("subject"):
                yield self.subject_entry(node.unit, certs[0].eui_text)
            if scope != 0 and want("cert"):
                for e in await self._certificate_entries(certs):
                    yield e
        elif node.kind == "cert" and with_base and want("cert"):
            found = [c for c in await self.catalog.certificates(node.serial)
                     if self.unit_of(c) == node.unit and (not node.key or c.eui_text == _eui(node.key))]
            for e in await self._certificate_entries(found):
                yield e

    async def _unit_contents(self, unit: str, scope: int, private: bool,
                             want: Callable[[str], bool]) -> AsyncIterator[Entry]:
        if unit == "cas":
            if want("ca"):
                for e in (await self.ca_entries()).values():
                    yield e
            return
        if not private:
            return
        if unit == "other":
            if not want("cert"):
                return
            after = 0
            while True:
                rows = self.replica.other_certificates_page(after, PAGE_ROWS)
                for e in await self._certificate_entries(rows):
                    yield e
                if len(rows) < PAGE_ROWS:
                    return
                after = rows[-1].id
        kind = UNITS[unit][1]
        assert kind is not None
        if scope == 1 or not want("cert"):  # the subject entries only
            if not want("subject"):
                return
            after_eui = b""
            while True:
                euis = self.replica.subjects_page(kind == "device", after_eui, PAGE_ROWS)
                for eui in euis:
                    yield self.subject_entry(unit, _eui(eui))
                if len(euis) < PAGE_ROWS:
                    return
                after_eui = euis[-1]
        after_eui, after_id = b"", 0
        last = b""
        while True:
            rows = self.replica.subject_certificates_page(kind == "device", after_eui, after_id,
                                                          PAGE_ROWS)
            entries = await self._certificate_entries(rows)
            for row, e in zip(rows, entries, strict=True):
                assert row.eui64 is not None
                if row.eui64 != last:
                    last = row.eui64
                    if want("subject"):
                        yield self.subject_entry(unit, _eui(row.eui64))
                yield e
            if len(rows) < PAGE_ROWS:
                return
            after_eui, after_id = rows[-1].eui64 or b"", rows[-1].id

    def _relevant(self, unit: str, base: dn.DN) -> bool:
        """May entries of this organisational unit lie in the subtree of base?"""
        unit_ndn = ((("ou", unit),), *self.nsuffix)
        return dn.is_within(unit_ndn, base, 2) or dn.is_within(base, unit_ndn, 2)

    async def _indexed(self, plan: Plan, private: bool, base: dn.DN) -> list[Entry]:
        """Candidates through an index: by SHA-256, serial, EUI-64 or key id."""
        certs: list[CertEntry] = []
        out: list[Entry] = []
        if plan.eui is not None:  # the hot path (a device's or organisation's certificates)
            eui = plan.eui_bytes or parse_eui64(plan.eui)
            if private:
                for unit in ("devices", "organisations"):
                    if not self._relevant(unit, base):
                        continue
                    found, statuses = await self.catalog.by_eui_now(eui, unit == "devices",
                                                                    self.clock())
                    if found:
                        out.append(self.subject_entry(unit, plan.eui))
                        out += await self._certificate_entries(found, statuses)
            return out
        cas = await self.ca_entries()
        if plan.sha256 is not None:
            certs = self.replica.by_sha256(plan.sha256)
            want_sha = plan.sha256.hex().encode()
            out += [e for e in cas.values() if want_sha in e.attrs["smkisha256"]]
        elif plan.serial is not None:
            certs = [*await self.catalog.certificates(plan.serial)]
            want_serial = plan.serial.encode()
            out += [e for e in cas.values() if want_serial in e.attrs["smkiserial"]]
        elif plan.key_id is not None:
            if plan.key_id in cas:
                out.append(cas[plan.key_id])
            if private:
                certs = self.replica.by_subject_key_id(plan.key_id)
        certs = [c for c in certs if self.unit_of(c) != "cas" and (private or c.public)]
        out += await self._certificate_entries(certs)
        return out

    async def all_entries(self) -> AsyncIterator[Entry]:
        """Every entry below the suffix, in DIT order (for export-ldif)."""
        async for e in self.candidates(Node("suffix"), 2, Plan(), True, self.nsuffix):
            yield e


def _single(rdn: dn.RDN) -> tuple[str, str]:
    """The one (attribute, value) of a single-valued RDN; ("", "") for a multi-valued one."""
    return rdn[0] if len(rdn) == 1 else ("", "")


def _eui(eui: bytes) -> str:
    return "-".join(f"{b:02X}" for b in eui)


def _distinct(values: Iterable[str]) -> list[bytes]:
    return [v.encode() for v in dict.fromkeys(values)]


def _common_name(name: str) -> str | None:
    try:
        for rdn in dn.parse(name):
            for attr, value in rdn:
                if attr.lower() in ("cn", "2.5.4.3", "commonname"):
                    return value
    except dn.DNError:
        pass
    return None


_ISSUERS: dict[str, dn.DN] = {}


def _issuer_ndn(name: str) -> dn.DN:
    """Normalised issuer name (a handful of distinct issuers: memoised)."""
    found = _ISSUERS.get(name)
    if found is None:
        try:
            found = dn.parse_normalised(name)
        except dn.DNError:
            found = ()
        if len(_ISSUERS) < 4096:
            _ISSUERS[name] = found
    return found
