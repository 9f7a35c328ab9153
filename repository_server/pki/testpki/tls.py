"""The TLS side of a test PKI: the DCC lodging client certificates (the right identity and
a wrong one) under their own CA, and the server's TLS certificate for localhost.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from repository_server.pki.testpki.builders import (
    KU_CA,
    KU_DS,
    Issued,
    cert_der,
    cert_pem,
    issue,
    new_key,
    private_pem,
    write_new,
)
from repository_server.pki.testpki.identifiers import serial_number

__all__ = ["client_pki", "server_tls"]


def _simple_ca(
    seed: int, tag: str, cn: str, not_before: dt.datetime, not_after: dt.datetime
) -> Issued:
    return issue(
        serial=serial_number(seed, tag, "ca"),
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]),
        key=new_key(),
        issuer=None,
        not_before=not_before,
        not_after=not_after,
        extensions=[
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (KU_CA, True),
            ("SKI", False),
            ("AKI", False),
        ],
    )


def _leaf(
    seed: int,
    tag: str,
    subject: x509.Name,
    issuer: Issued,
    not_before: dt.datetime,
    not_after: dt.datetime,
    eku: ObjectIdentifier,
    san: x509.SubjectAlternativeName | None = None,
) -> Issued:
    extensions: list[tuple[x509.ExtensionType | str, bool]] = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (KU_DS, True),
        (x509.ExtendedKeyUsage([eku]), False),
    ]
    if san is not None:
        extensions.append((san, False))
    extensions += [("SKI", False), ("AKI", False)]
    return issue(
        serial=serial_number(seed, tag),
        subject=subject,
        key=new_key(),
        issuer=issuer,
        not_before=not_before,
        not_after=not_after,
        extensions=extensions,
    )


def client_pki(
    root: Path, seed: int, not_before: dt.datetime, not_after: dt.datetime
) -> dict[str, str]:
    ca = _simple_ca(seed, "dcc-client", "DCC Lodging Client CA", not_before, not_after)
    write_new(root / "dcc" / "client-ca.der", cert_der(ca.cert))
    write_new(root / "dcc" / "client-ca.pem", cert_pem(ca.cert))
    write_new(root / "dcc" / "client-ca.key.pem", private_pem(ca.key), 0o600)

    def client(tag: str, cn: str) -> Issued:
        subject = x509.Name(
            [
                # DER order O, OU, CN: RFC 4514 "CN=...,OU=DCC,O=Smart DCC Ltd"
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Smart DCC Ltd"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "DCC"),
                x509.NameAttribute(NameOID.COMMON_NAME, cn),
            ]
        )
        issued = _leaf(
            seed, tag, subject, ca, not_before, not_after, ExtendedKeyUsageOID.CLIENT_AUTH
        )
        write_new(root / "dcc" / f"{tag}.pem", cert_pem(issued.cert))
        write_new(root / "dcc" / f"{tag}.key.pem", private_pem(issued.key), 0o600)
        return issued

    right = client("client", "DCC SMKI Lodging Client")
    wrong = client("other-client", "Not The DCC")
    return {
        "cert": "dcc/client.pem",
        "key": "dcc/client.key.pem",
        "ca": "dcc/client-ca.pem",
        "ca_der": "dcc/client-ca.der",
        "ca_key": "dcc/client-ca.key.pem",
        "subject": right.cert.subject.rfc4514_string(),
        "other_cert": "dcc/other-client.pem",
        "other_key": "dcc/other-client.key.pem",
        "other_subject": wrong.cert.subject.rfc4514_string(),
    }


def server_tls(
    root: Path, seed: int, not_before: dt.datetime, not_after: dt.datetime
) -> dict[str, str]:
    ca = _simple_ca(seed, "tls", "SMKI Repository TLS CA", not_before, not_after)
    write_new(root / "tls" / "ca.pem", cert_pem(ca.cert))
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
    )
    server = _leaf(
        seed,
        "tls-server",
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]),
        ca,
        not_before,
        not_after,
        ExtendedKeyUsageOID.SERVER_AUTH,
        san,
    )
    write_new(root / "tls" / "server.pem", cert_pem(server.cert))
    write_new(root / "tls" / "server.key.pem", private_pem(server.key), 0o600)
    return {"cert": "tls/server.pem", "key": "tls/server.key.pem", "ca": "tls/ca.pem"}
