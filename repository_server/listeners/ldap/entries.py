"""The directory's entries, built from the read model's values: pure (no I/O).

The layout (DIT) is described in `directory.py`. Every entry is built here, with its
attributes in the order the entry lists them: the root DSE, the subschema entry, the suffix,
the organisational units, one entry per CA key (its certificates and its current CRL or ARL),
one per device or organisation (`smkiEui64=…`), and one per certificate below it (or below
``ou=Other``). Times are written as GeneralizedTime from the read model's numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from repository_server.listeners.ldap import dn
from repository_server.listeners.ldap.filters import Entry
from repository_server.listeners.ldap.schema import SCHEMA
from repository_server.pki.ids import format_key_id
from repository_server.readmodel.catalog import CertEntry
from repository_server.readmodel.records import CrlRecord

SUBSCHEMA_DN = "cn=Subschema"
SUBSCHEMA_NDN = dn.parse_normalised(SUBSCHEMA_DN)

# the objectClass values of each kind of entry (lower-case), for planning by objectClass
CLASSES = {
    "suffix": frozenset({"top", "organization"}),
    "ou": frozenset({"top", "organizationalunit"}),
    "ca": frozenset({"top", "crldistributionpoint", "pkica", "smkica"}),
    "subject": frozenset({"top", "smkisubjectentry"}),
    "cert": frozenset({"top", "smkicertificate", "pkiuser"}),
}
# organisational units: (RDN value, the certificate kind below it or None)
UNITS = {"cas": ("CAs", None), "devices": ("Devices", "device"),
         "organisations": ("Organisations", "organisation"), "other": ("Other", None)}


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


CertAttr = Callable[[CertEntry, str, str], list[bytes] | None]
# A certificate entry's attributes, in the order its entry lists them (key, build(cert, status,
# entry DN) -> values, or None when the certificate has no such value).
_CERT_ATTRS: tuple[tuple[str, CertAttr], ...] = (
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
CERT_ATTRS = _CERT_ATTRS  # (ldap/fastpath.py encodes a certificate entry from these directly)


def unit_of(c: CertEntry) -> str:
    """The organisational unit a certificate's entry lies in."""
    if c.kind in ("device", "organisation") and c.eui_text:
        return "devices" if c.kind == "device" else "organisations"
    if c.kind in ("root", "ca") and c.subject_key_id:
        return "cas"
    return "other"


class Entries:
    """Builds the entries of one directory (its suffix and root DSE values)."""

    def __init__(self, suffix: str, root_dse: dict[str, list[bytes]]) -> None:
        self.suffix = suffix
        self.nsuffix = dn.parse_normalised(suffix)
        if not self.nsuffix:
            raise ValueError("ldap.suffix: must not be empty")
        self._root_dse = root_dse

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
        return Entry(SUBSCHEMA_DN, SUBSCHEMA_NDN, attrs)

    def suffix_entry(self) -> Entry:
        _, value = single(dn.parse(self.suffix)[0])
        key = single(self.nsuffix[0])[0]
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

    def unit_entry(self, unit: str, children: bool) -> Entry:
        name, _ = UNITS[unit]
        entry_dn = f"ou={name},{self.suffix}"
        attrs: dict[str, list[bytes]] = {"objectclass": [b"top", b"organizationalUnit"],
                                         "ou": [name.encode()]}
        _common(entry_dn, "organizationalUnit", children, attrs)
        return Entry(entry_dn, ((("ou", unit),), *self.nsuffix), attrs)

    def ca_entry(self, key_id: bytes, certs: list[CertEntry], crl: CrlRecord | None) -> Entry:
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
    def subject_entry(self, unit: str, eui_text: str) -> Entry:
        name, kind = UNITS[unit]
        entry_dn = f"smkiEui64={eui_text},ou={name},{self.suffix}"
        attrs: dict[str, list[bytes]] = {
            "objectclass": [b"top", b"smkiSubjectEntry"], "smkieui64": [eui_text.encode()],
            "smkikind": [(kind or "").encode()]}
        _common(entry_dn, "smkiSubjectEntry", True, attrs)
        return Entry(entry_dn, ((("smkieui64", eui_text),), (("ou", unit),), *self.nsuffix),
                     attrs, public=False)

    def certificate_dn(self, c: CertEntry, unit: str) -> str:
        """The DN of a certificate's entry in organisational unit `unit` (`unit_of`)."""
        if unit == "other":
            return f"smkiSerial={c.serial},ou=Other,{self.suffix}"
        return f"smkiSerial={c.serial}{self.subject_dn_tail(unit, c.eui_text)}"

    def subject_dn_tail(self, unit: str, eui_text: str) -> str:
        """What follows `smkiSerial=<serial>` in the DN of a device's or organisation's
        certificate (`unit` "devices" or "organisations")."""
        return f",smkiEui64={eui_text},ou={UNITS[unit][0]},{self.suffix}"

    def certificate_entry(self, c: CertEntry, status: str,
                          keys: frozenset[str] | None = None) -> Entry:
        """A certificate's entry; with `keys`, only those attributes (the same values in the
        same order as the whole entry: what a search needs to evaluate its filter and
        answer, see ldap/fastpath.py)."""
        unit = unit_of(c)
        entry_dn = self.certificate_dn(c, unit)
        if unit == "other":
            ndn: dn.DN = ((("smkiserial", c.serial),), (("ou", "other"),), *self.nsuffix)
        else:
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



def single(rdn: dn.RDN) -> tuple[str, str]:
    """The one (attribute, value) of a single-valued RDN; ("", "") for a multi-valued one."""
    return rdn[0] if len(rdn) == 1 else ("", "")


def eui_text(eui: bytes) -> str:
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
