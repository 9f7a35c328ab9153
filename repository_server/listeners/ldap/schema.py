"""The directory's schema: attribute types, object classes and how values compare.

Standard RFC 4519/4523/4512 definitions for what relying parties and PKI tools expect
(``userCertificate;binary``, ``cACertificate;binary``, ``certificateRevocationList;binary``,
``authorityRevocationList;binary``, ``pkiUser``, ``pkiCA``, ``cRLDistributionPoint``), plus
our own ``smki*`` attributes and classes that carry each certificate's metadata. The SEC
defines no LDAP schema; ours lives under an X.667 UUID arc (``2.25.<UUID>``, which anyone
may allocate without registration), and :func:`openldap_schema` writes it as an OpenLDAP
schema file (``smki-repository export-ldap-schema``).

The attribute-type hierarchy is here too (RFC 4512 §2.5.1: ``cn``, ``o`` and ``ou`` are
subtypes of ``name``, RFC 4519); how values compare, the matching rules and syntaxes, is in
``matching.py``. No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass

ARC = "2.25.217215305148347975516888385734658034679"  # UUID a36a2563-f477-4de8-8d07-ec324dc10bf7

# LDAP syntaxes (RFC 4517)
BOOLEAN = "1.3.6.1.4.1.1466.115.121.1.7"
CERTIFICATE = "1.3.6.1.4.1.1466.115.121.1.8"
CERTIFICATE_LIST = "1.3.6.1.4.1.1466.115.121.1.9"
DN_SYNTAX = "1.3.6.1.4.1.1466.115.121.1.12"
DIRECTORY_STRING = "1.3.6.1.4.1.1466.115.121.1.15"
GENERALIZED_TIME = "1.3.6.1.4.1.1466.115.121.1.24"
IA5_STRING = "1.3.6.1.4.1.1466.115.121.1.26"
INTEGER = "1.3.6.1.4.1.1466.115.121.1.27"
OID_SYNTAX = "1.3.6.1.4.1.1466.115.121.1.38"
OCTET_STRING = "1.3.6.1.4.1.1466.115.121.1.40"
PRINTABLE_STRING = "1.3.6.1.4.1.1466.115.121.1.44"
SUBSTRING_ASSERTION = "1.3.6.1.4.1.1466.115.121.1.58"
ATTRIBUTE_TYPE_DESCRIPTION = "1.3.6.1.4.1.1466.115.121.1.3"
OBJECT_CLASS_DESCRIPTION = "1.3.6.1.4.1.1466.115.121.1.37"
MATCHING_RULE_DESCRIPTION = "1.3.6.1.4.1.1466.115.121.1.30"
SYNTAX_DESCRIPTION = "1.3.6.1.4.1.1466.115.121.1.54"

SYNTAX_NAMES = {
    BOOLEAN: "Boolean", CERTIFICATE: "X.509 Certificate", CERTIFICATE_LIST: "X.509 Certificate List",
    DN_SYNTAX: "DN", DIRECTORY_STRING: "Directory String", GENERALIZED_TIME: "Generalized Time",
    IA5_STRING: "IA5 String", INTEGER: "Integer", OID_SYNTAX: "OID", OCTET_STRING: "Octet String",
    PRINTABLE_STRING: "Printable String", SUBSTRING_ASSERTION: "Substring Assertion",
    ATTRIBUTE_TYPE_DESCRIPTION: "Attribute Type Description",
    OBJECT_CLASS_DESCRIPTION: "Object Class Description",
    MATCHING_RULE_DESCRIPTION: "Matching Rule Description",
    SYNTAX_DESCRIPTION: "LDAP Syntax Description",
}

# matching rules we implement: name -> (OID, syntax)
MATCHING_RULES = {
    "booleanMatch": ("2.5.13.13", BOOLEAN),
    "caseIgnoreMatch": ("2.5.13.2", DIRECTORY_STRING),
    "caseIgnoreOrderingMatch": ("2.5.13.3", DIRECTORY_STRING),
    "caseIgnoreSubstringsMatch": ("2.5.13.4", SUBSTRING_ASSERTION),
    "caseExactMatch": ("2.5.13.5", DIRECTORY_STRING),
    "caseExactOrderingMatch": ("2.5.13.6", DIRECTORY_STRING),
    "caseExactSubstringsMatch": ("2.5.13.7", SUBSTRING_ASSERTION),
    "caseIgnoreIA5Match": ("1.3.6.1.4.1.1466.109.114.2", IA5_STRING),
    "caseIgnoreIA5SubstringsMatch": ("1.3.6.1.4.1.4203.1.2.1", SUBSTRING_ASSERTION),
    "distinguishedNameMatch": ("2.5.13.1", DN_SYNTAX),
    "objectIdentifierMatch": ("2.5.13.0", OID_SYNTAX),
    "integerMatch": ("2.5.13.14", INTEGER),
    "integerOrderingMatch": ("2.5.13.15", INTEGER),
    "octetStringMatch": ("2.5.13.17", OCTET_STRING),
    "generalizedTimeMatch": ("2.5.13.27", GENERALIZED_TIME),
    "generalizedTimeOrderingMatch": ("2.5.13.28", GENERALIZED_TIME),
    "certificateExactMatch": ("2.5.13.34", "1.3.6.1.1.15.1"),
    "certificateListExactMatch": ("2.5.13.38", "1.3.6.1.1.15.5"),
}
RULE_BY_OID = {oid: name for name, (oid, _) in MATCHING_RULES.items()}


@dataclass(frozen=True, slots=True)
class AttributeType:
    oid: str
    name: str  # the canonical spelling (returned to clients)
    syntax: str
    equality: str | None = None
    ordering: str | None = None
    substr: str | None = None
    single: bool = False
    operational: bool = False  # returned only when asked for by name or "+"
    binary: bool = False  # values are transferred with the ;binary option (RFC 4522)
    desc: str = ""
    aliases: tuple[str, ...] = ()
    custom: bool = False  # ours (exported by export-ldap-schema)
    usage: str = "userApplications"
    sup: str | None = None  # the supertype's name (RFC 4512 §2.5.1)
    dynamic: bool = False  # computed for each answer, not held (slapd's are not in its entries)

    @property
    def key(self) -> str:
        return self.name.lower()

    @property
    def wire_name(self) -> str:
        """How the attribute is named in entries we send."""
        return f"{self.name};binary" if self.binary else self.name

    def definition(self) -> str:
        names = (self.name, *self.aliases)
        name = f"'{names[0]}'" if len(names) == 1 else "( " + " ".join(f"'{n}'" for n in names) + " )"
        parts = [f"( {self.oid} NAME {name}"]
        if self.desc:
            parts.append(f"DESC '{self.desc}'")
        if self.sup:
            parts.append(f"SUP {self.sup}")
        for keyword, rule in (("EQUALITY", self.equality), ("ORDERING", self.ordering),
                              ("SUBSTR", self.substr)):
            if rule:
                parts.append(f"{keyword} {rule}")
        parts.append(f"SYNTAX {self.syntax}")
        if self.single:
            parts.append("SINGLE-VALUE")
        if self.operational:
            parts.append("NO-USER-MODIFICATION")
        if self.usage != "userApplications":
            parts.append(f"USAGE {self.usage}")
        return " ".join(parts) + " )"


@dataclass(frozen=True, slots=True)
class ObjectClass:
    oid: str
    name: str
    kind: str  # STRUCTURAL, AUXILIARY, ABSTRACT
    sup: str | None = None
    must: tuple[str, ...] = ()
    may: tuple[str, ...] = ()
    desc: str = ""
    custom: bool = False

    def definition(self) -> str:
        parts = [f"( {self.oid} NAME '{self.name}'"]
        if self.desc:
            parts.append(f"DESC '{self.desc}'")
        if self.sup:
            parts.append(f"SUP {self.sup}")
        parts.append(self.kind)
        for keyword, attrs in (("MUST", self.must), ("MAY", self.may)):
            if len(attrs) == 1:
                parts.append(f"{keyword} {attrs[0]}")
            elif attrs:
                parts.append(f"{keyword} ( {' $ '.join(attrs)} )")
        return " ".join(parts) + " )"


def _ci(name: str, oid: str, desc: str = "", **kw: object) -> AttributeType:
    """A case-insensitive string attribute."""
    return AttributeType(oid, name, DIRECTORY_STRING, "caseIgnoreMatch", "caseIgnoreOrderingMatch",
                         "caseIgnoreSubstringsMatch", desc=desc, **kw)  # type: ignore[arg-type]


def _named(name: str, oid: str, **kw: object) -> AttributeType:
    """A standard naming attribute (RFC 4519: cn, o, ou, description): case-insensitive
    equality and substrings, no ordering rule, so >= and <= on it are Undefined."""
    return AttributeType(oid, name, DIRECTORY_STRING, "caseIgnoreMatch", None,
                         "caseIgnoreSubstringsMatch", **kw)  # type: ignore[arg-type]


def _time(name: str, oid: str, desc: str, **kw: object) -> AttributeType:
    return AttributeType(oid, name, GENERALIZED_TIME, "generalizedTimeMatch",
                         "generalizedTimeOrderingMatch", desc=desc, **kw)  # type: ignore[arg-type]


_A = f"{ARC}.1"
ATTRIBUTES: tuple[AttributeType, ...] = (
    AttributeType("2.5.4.0", "objectClass", OID_SYNTAX, "objectIdentifierMatch"),
    AttributeType("2.5.4.41", "name", DIRECTORY_STRING, "caseIgnoreMatch", None,
                  "caseIgnoreSubstringsMatch"),
    _named("cn", "2.5.4.3", aliases=("commonName",), sup="name"),
    _named("o", "2.5.4.10", aliases=("organizationName",), sup="name"),
    _named("ou", "2.5.4.11", aliases=("organizationalUnitName",), sup="name"),
    AttributeType("0.9.2342.19200300.100.1.25", "dc", IA5_STRING, "caseIgnoreIA5Match", None,
                  "caseIgnoreIA5SubstringsMatch", single=True, aliases=("domainComponent",)),
    _named("description", "2.5.4.13"),
    AttributeType("2.5.4.36", "userCertificate", CERTIFICATE, "certificateExactMatch", binary=True,
                  desc="X.509 user certificate"),
    AttributeType("2.5.4.37", "cACertificate", CERTIFICATE, "certificateExactMatch", binary=True,
                  desc="X.509 CA certificate"),
    AttributeType("2.5.4.38", "authorityRevocationList", CERTIFICATE_LIST,
                  "certificateListExactMatch", binary=True, desc="X.509 authority revocation list"),
    AttributeType("2.5.4.39", "certificateRevocationList", CERTIFICATE_LIST,
                  "certificateListExactMatch", binary=True, desc="X.509 certificate revocation list"),
    # operational (RFC 4512, RFC 5020, RFC 3045)
    _time("createTimestamp", "2.5.18.1", "when the object was lodged", operational=True,
          single=True, usage="directoryOperation"),
    _time("modifyTimestamp", "2.5.18.2", "when the object last changed", operational=True,
          single=True, usage="directoryOperation"),
    AttributeType("2.5.18.10", "subschemaSubentry", DN_SYNTAX, "distinguishedNameMatch",
                  single=True, operational=True, usage="directoryOperation", dynamic=True),
    AttributeType("2.5.21.9", "structuralObjectClass", OID_SYNTAX, "objectIdentifierMatch",
                  single=True, operational=True, usage="directoryOperation"),
    AttributeType("2.5.18.9", "hasSubordinates", BOOLEAN, "booleanMatch", single=True,
                  operational=True, usage="directoryOperation", dynamic=True),
    AttributeType("1.3.6.1.1.20", "entryDN", DN_SYNTAX, "distinguishedNameMatch", single=True,
                  operational=True, usage="directoryOperation", dynamic=True),
    AttributeType("1.3.6.1.4.1.1466.101.120.5", "namingContexts", DN_SYNTAX, operational=True,
                  usage="dSAOperation"),
    AttributeType("1.3.6.1.4.1.1466.101.120.13", "supportedControl", OID_SYNTAX, operational=True,
                  usage="dSAOperation"),
    AttributeType("1.3.6.1.4.1.1466.101.120.7", "supportedExtension", OID_SYNTAX, operational=True,
                  usage="dSAOperation"),
    AttributeType("1.3.6.1.4.1.4203.1.3.5", "supportedFeatures", OID_SYNTAX,
                  "objectIdentifierMatch", operational=True, usage="dSAOperation"),
    AttributeType("1.3.6.1.4.1.1466.101.120.15", "supportedLDAPVersion", INTEGER, operational=True,
                  usage="dSAOperation"),
    AttributeType("1.3.6.1.4.1.1466.101.120.14", "supportedSASLMechanisms", DIRECTORY_STRING,
                  operational=True, usage="dSAOperation"),
    AttributeType("1.3.6.1.1.4", "vendorName", DIRECTORY_STRING, "caseExactMatch", single=True,
                  operational=True, usage="dSAOperation"),
    AttributeType("1.3.6.1.1.5", "vendorVersion", DIRECTORY_STRING, "caseExactMatch", single=True,
                  operational=True, usage="dSAOperation"),
    AttributeType("2.5.21.5", "attributeTypes", ATTRIBUTE_TYPE_DESCRIPTION,
                  "objectIdentifierFirstComponentMatch",
                  operational=True, usage="directoryOperation"),
    AttributeType("2.5.21.6", "objectClasses", OBJECT_CLASS_DESCRIPTION,
                  "objectIdentifierFirstComponentMatch", operational=True, usage="directoryOperation"),
    AttributeType("2.5.21.4", "matchingRules", MATCHING_RULE_DESCRIPTION,
                  "objectIdentifierFirstComponentMatch", operational=True, usage="directoryOperation"),
    AttributeType("1.3.6.1.4.1.1466.101.120.16", "ldapSyntaxes", SYNTAX_DESCRIPTION,
                  "objectIdentifierFirstComponentMatch", operational=True, usage="directoryOperation"),
    # ours: the certificate metadata the repository keeps (SPEC.md, GB profile)
    _ci("smkiSerial", f"{_A}.1", "certificate serial number, upper-case hex", custom=True),
    _ci("smkiEui64", f"{_A}.2", "EUI-64 of the device or organisation (00-DB-12-...)", custom=True),
    _ci("smkiKeyUsage", f"{_A}.3", "DS (digitalSignature), KA (keyAgreement) or CA", custom=True),
    AttributeType(f"{_A}.4", "smkiRole", INTEGER, "integerMatch", "integerOrderingMatch",
                  desc="remote party role code (decimal)", single=True, custom=True),
    _ci("smkiStatus", f"{_A}.5", "P pending, I in use, N not in use, R revoked, E expired",
        single=True, custom=True),
    _ci("smkiKind", f"{_A}.6", "root, ca, organisation, device or other", custom=True),
    _time("smkiNotBefore", f"{_A}.7", "start of validity", custom=True),
    _time("smkiNotAfter", f"{_A}.8", "end of validity", custom=True),
    _ci("smkiIssuerKeyId", f"{_A}.9", "authority key identifier, upper-case hex", custom=True),
    _ci("smkiSubjectKeyId", f"{_A}.10", "subject key identifier, upper-case hex", custom=True),
    _ci("smkiSha256", f"{_A}.11", "SHA-256 of the DER, lower-case hex", custom=True),
    _ci("smkiSubject", f"{_A}.12", "subject name (RFC 4514)", custom=True),
    _ci("smkiIssuer", f"{_A}.13", "issuer name (RFC 4514)", custom=True),
    AttributeType(f"{_A}.14", "smkiManufacturingFlag", BOOLEAN, "booleanMatch",
                  desc="lodged by the manufacturer", single=True, custom=True),
    _ci("smkiKeyId", f"{_A}.15", "the CA key identifier that names a CA entry", single=True,
        custom=True),
    AttributeType(f"{_A}.16", "smkiCrlNumber", INTEGER, "integerMatch", "integerOrderingMatch",
                  desc="number of the current CRL or ARL this CA issued", custom=True),
    _time("smkiCrlNextUpdate", f"{_A}.17", "nextUpdate of the current CRL or ARL", custom=True),
)

_C = f"{ARC}.2"
OBJECT_CLASSES: tuple[ObjectClass, ...] = (
    ObjectClass("2.5.6.0", "top", "ABSTRACT", must=("objectClass",)),
    ObjectClass("2.5.6.4", "organization", "STRUCTURAL", "top", ("o",), ("description",)),
    ObjectClass("2.5.6.5", "organizationalUnit", "STRUCTURAL", "top", ("ou",), ("description",)),
    ObjectClass("2.5.6.19", "cRLDistributionPoint", "STRUCTURAL", "top", ("cn",),
                ("certificateRevocationList", "authorityRevocationList")),
    ObjectClass("2.5.6.21", "pkiUser", "AUXILIARY", "top", may=("userCertificate",)),
    ObjectClass("2.5.6.22", "pkiCA", "AUXILIARY", "top",
                may=("cACertificate", "certificateRevocationList", "authorityRevocationList")),
    ObjectClass("2.5.20.1", "subschema", "AUXILIARY", may=(
        "attributeTypes", "objectClasses", "matchingRules", "ldapSyntaxes")),
    ObjectClass("2.5.17.0", "subentry", "STRUCTURAL", "top", ("cn",)),
    ObjectClass("1.3.6.1.4.1.1466.101.120.111", "extensibleObject", "AUXILIARY", "top"),
    ObjectClass("1.3.6.1.4.1.1466.344", "dcObject", "AUXILIARY", "top", ("dc",)),
    ObjectClass(f"{_C}.1", "smkiCertificate", "STRUCTURAL", "top", ("smkiSerial",), (
        "smkiEui64", "smkiKeyUsage", "smkiRole", "smkiStatus", "smkiKind", "smkiNotBefore",
        "smkiNotAfter", "smkiIssuerKeyId", "smkiSubjectKeyId", "smkiSha256", "smkiSubject",
        "smkiIssuer", "smkiManufacturingFlag"),
        "one lodged certificate (with pkiUser: userCertificate)", custom=True),
    ObjectClass(f"{_C}.2", "smkiSubjectEntry", "STRUCTURAL", "top", ("smkiEui64",),
                ("smkiKind", "description"),
                "a device or organisation: its certificates are the entries below it",
                custom=True),
    ObjectClass(f"{_C}.3", "smkiCA", "AUXILIARY", "top", ("smkiKeyId",), (
        "smkiKind", "smkiSerial", "smkiNotBefore", "smkiNotAfter", "smkiIssuerKeyId",
        "smkiSubjectKeyId", "smkiSha256", "smkiSubject", "smkiIssuer", "smkiCrlNumber",
        "smkiCrlNextUpdate"), "a CA key: its certificates, current CRL and ARL", custom=True),
)


class Schema:
    """Lookups over the definitions above (names are case-insensitive; OIDs work too)."""

    def __init__(self) -> None:
        self.attributes = ATTRIBUTES
        self.classes = OBJECT_CLASSES
        self._attr: dict[str, AttributeType] = {}
        for a in ATTRIBUTES:
            for n in (a.name, *a.aliases, a.oid):
                self._attr[n.lower()] = a
        self._class: dict[str, ObjectClass] = {}
        for c in OBJECT_CLASSES:
            self._class[c.name.lower()] = c
            self._class[c.oid] = c
        # each type with its subtypes, itself first (RFC 4512 §2.5.1)
        self.subtypes: dict[str, tuple[AttributeType, ...]] = {a.key: (a,) for a in ATTRIBUTES}
        for a in ATTRIBUTES:
            sup = a.sup
            while sup is not None:
                parent = self._attr[sup.lower()]
                self.subtypes[parent.key] += (a,)
                sup = parent.sup

    def attribute(self, description: str) -> tuple[AttributeType | None, frozenset[str]]:
        """Resolve an attribute description ("userCertificate;binary") -> (type, options)."""
        base, *options = description.split(";")
        return self._attr.get(base.lower()), frozenset(o.lower() for o in options)

    def object_class(self, name: str) -> ObjectClass | None:
        return self._class.get(name.lower())

    def subschema_values(self) -> list[tuple[str, list[bytes]]]:
        syntaxes = sorted({a.syntax for a in ATTRIBUTES} | {s for _, s in MATCHING_RULES.values()
                                                             if s in SYNTAX_NAMES})
        return [
            ("ldapSyntaxes", [f"( {s} DESC '{SYNTAX_NAMES[s]}' )".encode() for s in syntaxes]),
            ("matchingRules", [f"( {oid} NAME '{name}' SYNTAX {syntax} )".encode()
                               for name, (oid, syntax) in MATCHING_RULES.items()]),
            ("attributeTypes", [a.definition().encode() for a in ATTRIBUTES]),
            ("objectClasses", [c.definition().encode() for c in OBJECT_CLASSES]),
        ]


SCHEMA = Schema()


def openldap_schema() -> str:
    """Our own definitions as an OpenLDAP schema file (``include`` it in slapd.conf)."""
    lines = [
        "# smki-repository LDAP schema: the smki* attribute types and object classes.",
        "# Generated by `smki-repository export-ldap-schema`; needs core.schema (RFC 4523",
        "# pkiUser/pkiCA/cRLDistributionPoint are in it). OIDs: X.667 UUID arc " + ARC + ".",
        "",
    ]
    for a in ATTRIBUTES:
        if a.custom:
            lines.append(f"attributetype {a.definition()}")
            lines.append("")
    for c in OBJECT_CLASSES:
        if c.custom:
            lines.append(f"objectclass {c.definition()}")
            lines.append("")
    return "\n".join(lines)
