"""Test PKI generator in the exact GB SMKI certificate profile. It owns everything a test,
a demo or a load test needs to stand in for the DCC: the Root and Issuing OCA/DCA
certificates (plus a retired OCA revoked on the ARL), organisation certificates for every
remote party role with their private keys, device certificates written as PEM bundles of
up to 50,000 (the lodging unit), the Organisation CRL and the ARLs, a few SMKI documents,
the DCC lodging client certificates (the right one and a wrong-identity one) and the
server TLS certificate, all described by ``manifest.json`` (the device certificates, which
may number millions, one row each in ``devices/index.csv``, written as they are made so that
memory stays flat). Output mirrors the real ZAZ1 /
RTDS certificates in ``shared/realdata`` (extension order and criticality, subject string
types, policy and hwType OIDs, 8-byte RFC 5280 method 2 key identifiers). EUI-64s and
serials are deterministic for a seed; keys and signatures are fresh each run. Device
certificates (the bulk) are made in a process pool, keys generated in the workers.

This package holds the generator itself (the named hierarchy, the manifest, the device
bundles); its building blocks are `builders` (the profile's certificates), `identifiers`,
`devices` (the process pool), `documents` and `tls`.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import json
import os
import random
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from repository_server.pki.ids import format_eui64, serial_to_hex
from repository_server.pki.testpki.builders import (
    DEVICE_POLICY_OID,
    HW_MODULE_NAME_OID,
    HW_TYPE_OID,
    KU_CA,
    ORGANISATION_POLICY_OID,
    SHA256,
    USAGE_KU,
    Issued,
    aki,
    cert_der,
    cert_pem,
    device_builder,
    gb_ca_name,
    issue,
    new_key,
    organisation_name,
    policies,
    private_pem,
    write_new,
)
from repository_server.pki.testpki.devices import device_chunks, run_device_chunks
from repository_server.pki.testpki.documents import documents
from repository_server.pki.testpki.identifiers import (
    device_eui64,
    key_identifier,
    organisation_eui64,
    seed_digest,
    serial_number,
)
from repository_server.pki.testpki.tls import client_pki, server_tls

__all__ = [
    "BUNDLE_MAX",
    "DEVICE_POLICY_OID",
    "HW_MODULE_NAME_OID",
    "HW_TYPE_OID",
    "ORGANISATION_POLICY_OID",
    "ORGANISATION_ROLES",
    "TestPkiParams",
    "device_builder",
    "device_eui64",
    "device_objects",
    "generate",
    "key_identifier",
    "load_manifest",
    "organisation_eui64",
]


#: Remote party roles an organisation certificate can carry (SPEC.md; 0 is the root CA).
ORGANISATION_ROLES: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 127, 135, 137)
_ROLE_SHORT_NAMES = {
    1: "RECOVERY",
    2: "SUPPLIER",
    3: "NETWORKOPERATOR",
    4: "ACCESSCONTROLBROKER",
    5: "TRANSITIONALCOS",
    6: "WANPROVIDER",
    7: "ISSUINGAUTHORITY",
    8: "LOADCONTROLLER",
    127: "OTHERUSER",
    135: "XMLSIGNING",
    137: "DSPXMLSIGNING",
}

MANIFEST_FORMAT = 2  # 2: device certificates listed in devices/index.csv, not in objects
BUNDLE_MAX = 50_000  # certificates per device PEM bundle (the lodging batch limit)

ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class TestPkiParams:
    """What to generate. ``seed`` fixes EUI-64s, serials and the revoked set (None: random)."""

    __test__ = False  # not a pytest test class, despite the name

    devices: int = 50
    organisations: int = 24
    workers: int = os.cpu_count() or 1
    seed: int | None = None
    revoked_fraction: float = 0.1


def _cert_object(
    kind: str,
    path: str,
    issued: Issued,
    issuer_key_id: bytes,
    *,
    usage: str,
    role: int | None = None,
    eui: bytes | None = None,
    name: str | None = None,
    revoked: bool = False,
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "kind": kind,
        "path": path,
        "serial": serial_to_hex(issued.cert.serial_number),
        "issuer_key_id": issuer_key_id.hex().upper(),
        "subject_key_id": issued.key_id.hex().upper(),
    }
    if eui is not None:
        obj["eui64"] = format_eui64(eui)
    if role is not None:
        obj["role"] = role
    obj["usage"] = usage
    obj["revoked"] = revoked
    if name is not None:
        obj["name"] = name
    return obj


def generate(
    out: Path, params: TestPkiParams, progress: ProgressFn | None = None
) -> dict[str, Any]:
    """Generate a complete test PKI into ``out`` and return its manifest (also written to
    ``out/manifest.json``). Raises FileExistsError if ``out`` already holds a manifest (or
    anything else); the caller decides whether to reuse it. Work happens in a temporary
    sibling directory renamed into place at the end, so ``out`` is complete or absent."""
    out = Path(out)
    if (out / "manifest.json").exists():
        raise FileExistsError(f"{out / 'manifest.json'} already exists")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory")
    if params.devices < 0 or params.organisations < 0:
        raise ValueError("devices and organisations must be >= 0")
    if not 0.0 <= params.revoked_fraction <= 1.0:
        raise ValueError("revoked_fraction must be within [0, 1]")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        manifest = _generate_into(tmp, params, progress or (lambda _s, _d, _t: None))
        tmp.chmod(0o755)
        try:
            if out.exists():
                out.rmdir()  # empty (checked above)
            tmp.rename(out)  # atomic; fails if another run put something there meanwhile
        except OSError as exc:
            raise FileExistsError(f"{out} appeared while generating") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


DEVICE_INDEX = "devices/index.csv"
DEVICE_INDEX_COLUMNS = ("serial", "eui64", "usage", "subject_key_id", "issuer_key_id", "path",
                        "index")


def _devices(
    root: Path,
    params: TestPkiParams,
    seed: int,
    dca: Issued,
    not_before: dt.datetime,
    progress: ProgressFn,
) -> tuple[int, list[str], float]:
    """Make every device certificate into ``devices/devices-NNNN.pem`` bundles of up to
    BUNDLE_MAX, described one row each in ``devices/index.csv`` (streamed: memory stays
    flat whatever the count); return the certificate count, the bundle paths and the
    seconds taken."""
    total = 2 * params.devices
    progress("devices", 0, total)
    started = time.perf_counter()
    initargs = (private_pem(dca.key), cert_der(dca.cert), seed, not_before.timestamp())
    issuer_key_id = dca.key_id.hex().upper()
    bundles: list[str] = []
    bundle: list[bytes] = []
    written = 0

    def flush() -> None:
        if bundle:
            write_new(root / bundles[-1], b"".join(bundle))
            bundle.clear()

    chunks = device_chunks(params.devices, params.workers)
    results = run_device_chunks(chunks, params.workers, initargs)
    with contextlib.closing(results), open(root / DEVICE_INDEX, "x", encoding="ascii",
                                           newline="") as index:
        out = csv.writer(index, lineterminator="\n")
        out.writerow(DEVICE_INDEX_COLUMNS)
        for pems, metas in results:
            rows = []
            for pem, (serial_hex, ski_hex, eui_text, usage_name) in zip(pems, metas, strict=True):
                if not bundle:
                    bundles.append(f"devices/devices-{len(bundles) + 1:04d}.pem")
                rows.append((serial_hex, eui_text, usage_name, ski_hex, issuer_key_id,
                             bundles[-1], len(bundle)))
                bundle.append(pem)
                if len(bundle) == BUNDLE_MAX:
                    flush()
            out.writerows(rows)
            written += len(rows)
            progress("devices", written, total)
    flush()
    return written, bundles, time.perf_counter() - started


def device_objects(pki_dir: Path, manifest: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The device certificates of a test PKI, streamed from its ``devices/index.csv``, as
    manifest objects (kind, path, index, serial, issuer_key_id, subject_key_id, eui64,
    usage, revoked)."""
    with open(Path(pki_dir) / manifest["devices"]["index"], encoding="ascii", newline="") as f:
        for row in csv.DictReader(f):
            yield {"kind": "device", "path": row["path"], "index": int(row["index"]),
                   "serial": row["serial"], "issuer_key_id": row["issuer_key_id"],
                   "subject_key_id": row["subject_key_id"], "eui64": row["eui64"],
                   "usage": row["usage"], "revoked": False}


def load_manifest(pki_dir: Path, *, devices: bool = False) -> dict[str, Any]:
    """Read ``manifest.json``; with ``devices``, its ``objects`` also hold every device
    certificate (from the index, in lodging order: after the organisations). Only for
    small PKIs: a national-scale one has millions (use ``device_objects``)."""
    manifest: dict[str, Any] = json.loads((Path(pki_dir) / "manifest.json").read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{pki_dir}/manifest.json: format {manifest.get('format')!r}, this"
                         f" version reads format {MANIFEST_FORMAT} (generate it again)")
    if devices:
        objects = manifest["objects"]
        at = next((i for i, o in enumerate(objects) if o["kind"] in ("crl", "arl", "document")),
                  len(objects))
        manifest["objects"] = [*objects[:at], *device_objects(pki_dir, manifest), *objects[at:]]
    return manifest


def _generate_into(root: Path, params: TestPkiParams, progress: ProgressFn) -> dict[str, Any]:
    started = time.perf_counter()
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    generated_at = now.isoformat().replace("+00:00", "Z")
    yesterday = now - dt.timedelta(days=1)
    ca_until = now + dt.timedelta(days=20 * 365)  # stays UTCTime (< 2050) like the real Z1
    org_until = now + dt.timedelta(days=10 * 365)
    for sub in ("ca", "organisations", "devices", "crl", "documents", "dcc", "tls"):
        (root / sub).mkdir()
    objects: list[dict[str, Any]] = []

    # CAs ------------------------------------------------------------------------------------
    ca_specs = [
        # name, OU, CN, issuer name, kind
        ("root-oca", "00", "TA", None, "root"),
        ("root-dca", "00", "TD", None, "root"),
        ("issuing-oca", "07", "T1", "root-oca", "ca"),
        ("issuing-dca", "07", "TE", "root-dca", "ca"),
        ("retired-oca", "07", "T0", "root-oca", "ca"),
    ]
    progress("ca", 0, len(ca_specs))
    cas: dict[str, Issued] = {}
    for done, (name, ou, cn, issuer_name, kind) in enumerate(ca_specs, start=1):
        issuer = None if issuer_name is None else cas[issuer_name]
        cas[name] = issued = issue(
            serial=serial_number(seed, "ca", name),
            subject=gb_ca_name(ou, cn),
            key=new_key(),
            issuer=issuer,
            not_before=yesterday,
            not_after=ca_until,
            # the real Z1's order; roots carry an AKI equal to their own SKI
            extensions=[
                (KU_CA, True),
                (x509.BasicConstraints(ca=True, path_length=None if issuer is None else 0), True),
                (policies(ORGANISATION_POLICY_OID), True),
                ("SKI", False),
                ("AKI", False),
            ],
        )
        write_new(root / "ca" / f"{name}.der", cert_der(issued.cert))
        write_new(root / "ca" / f"{name}.pem", cert_pem(issued.cert))
        # A test PKI's CA keys are kept so that tests can sign new CRLs and certificates.
        write_new(root / "ca" / f"{name}.key.pem", private_pem(issued.key), 0o600)
        objects.append(
            _cert_object(
                kind,
                f"ca/{name}.der",
                issued,
                issued.key_id if issuer is None else issuer.key_id,
                usage="CA",
                role=int(ou, 16),
                name=name,
                revoked=name == "retired-oca",
            )
            | {"pem": f"ca/{name}.pem", "key": f"ca/{name}.key.pem"}
        )
        progress("ca", done, len(ca_specs))
    oca = cas["issuing-oca"]

    # organisations: entity e gets a DS then a KA certificate; roles round-robin by entity --
    m = params.organisations
    progress("organisations", 0, m)
    n_revoked = round(m * params.revoked_fraction)
    if m >= 1 and params.revoked_fraction > 0:
        n_revoked = max(1, n_revoked)
    revoked_idx = set(random.Random(seed_digest(seed, "revoked")).sample(range(m), min(m, n_revoked)))
    org_objects: list[dict[str, Any]] = []
    org_policies = policies(ORGANISATION_POLICY_OID)
    for j in range(m):
        entity, usage = divmod(j, 2)
        usage_name = ("DS", "KA")[usage]
        role = ORGANISATION_ROLES[entity % len(ORGANISATION_ROLES)]
        nth = entity // len(ORGANISATION_ROLES) + 1
        cn = f"TEST{_ROLE_SHORT_NAMES[role]}{nth:02d}"
        eui = organisation_eui64(seed, entity)
        issued = issue(
            serial=serial_number(seed, "organisation", j),
            subject=organisation_name(cn, role, eui),
            key=new_key(),
            issuer=oca,
            not_before=yesterday,
            not_after=org_until,
            extensions=[  # as the real Z1-issued organisation certificates
                (USAGE_KU[usage_name], True),
                ("SKI", False),
                (org_policies, True),
                ("AKI", False),
            ],
        )
        serial_hex = serial_to_hex(issued.cert.serial_number)
        write_new(root / "organisations" / f"{serial_hex}.der", cert_der(issued.cert))
        write_new(root / "organisations" / f"{serial_hex}.key.pem", private_pem(issued.key), 0o600)
        obj = _cert_object(
            "organisation",
            f"organisations/{serial_hex}.der",
            issued,
            oca.key_id,
            usage=usage_name,
            role=role,
            eui=eui,
            name=cn,
            revoked=j in revoked_idx,
        )
        obj["key"] = f"organisations/{serial_hex}.key.pem"
        org_objects.append(obj)
        progress("organisations", j + 1, m)
    objects += org_objects

    # devices ----------------------------------------------------------------------------------
    dca = cas["issuing-dca"]
    total_device_certs, bundles, device_seconds = _devices(root, params, seed, dca, yesterday,
                                                           progress)

    # CRL and ARLs ----------------------------------------------------------------------------
    progress("crl", 0, 3)
    this_update = now - dt.timedelta(minutes=1)
    revoked_at = now - dt.timedelta(hours=1)

    def crl(
        issuer: Issued,
        next_update: dt.datetime,
        entries: list[tuple[int, x509.ReasonFlags]],
    ) -> bytes:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.cert.subject)
            .last_update(this_update)
            .next_update(next_update)
            .add_extension(aki(issuer.key_id), critical=False)
            .add_extension(x509.CRLNumber(1), critical=False)
        )
        for serial, reason in entries:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(revoked_at)
                .add_extension(x509.CRLReason(reason), critical=False)
                .build()
            )
        return builder.sign(issuer.key, SHA256).public_bytes(serialization.Encoding.DER)

    reasons = (x509.ReasonFlags.key_compromise, x509.ReasonFlags.superseded)
    org_entries = [
        (int(obj["serial"], 16), reasons[k % 2])
        for k, obj in enumerate(o for o in org_objects if o["revoked"])
    ]
    crl_specs = [
        ("crl", "crl/issuing-oca.crl", oca, dt.timedelta(days=7), org_entries),
        (
            "arl",
            "crl/root-oca.arl",
            cas["root-oca"],
            dt.timedelta(days=30),
            [(cas["retired-oca"].cert.serial_number, x509.ReasonFlags.ca_compromise)],
        ),
        ("arl", "crl/root-dca.arl", cas["root-dca"], dt.timedelta(days=30), []),
    ]
    for k, (kind, path, issuer, validity, entries) in enumerate(crl_specs, start=1):
        write_new(root / path, crl(issuer, now + validity, entries))
        objects.append(
            {
                "kind": kind,
                "path": path,
                "issuer_key_id": issuer.key_id.hex().upper(),
                "crl_number": 1,
            }
        )
        progress("crl", k, len(crl_specs))

    # documents -------------------------------------------------------------------------------
    docs = documents(generated_at)
    progress("documents", 0, len(docs))
    for k, (file_name, content_type, body) in enumerate(docs, start=1):
        write_new(root / "documents" / file_name, body)
        objects.append(
            {
                "kind": "document",
                "path": f"documents/{file_name}",
                "name": file_name.rsplit(".", 1)[0],
                "content_type": content_type,
            }
        )
        progress("documents", k, len(docs))

    # DCC lodging client and server TLS -------------------------------------------------------
    progress("tls", 0, 2)
    dcc_client = client_pki(root, seed, yesterday, now + dt.timedelta(days=10 * 365))
    progress("tls", 1, 2)
    tls = server_tls(root, seed, yesterday, now + dt.timedelta(days=10 * 365))
    progress("tls", 2, 2)

    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "generated_at": generated_at,
        "params": {**asdict(params), "seed": seed},
        "counts": {
            "cas": len(cas),
            "organisations": m,
            "devices": params.devices,
            "device_certificates": total_device_certs,
            "device_bundles": len(bundles),
            "revoked_organisations": len(org_entries),
        },
        "timings": {
            "devices_seconds": round(device_seconds, 3),
            "device_certificates_per_second": (
                round(total_device_certs / device_seconds) if device_seconds > 0 else None
            ),
            "total_seconds": round(time.perf_counter() - started, 3),
        },
        "dcc_client": dcc_client,
        "tls": tls,
        "objects": objects,
        "devices": {"index": DEVICE_INDEX, "bundles": bundles},
    }
    progress("manifest", 0, 1)
    with open(root / "manifest.json", "x", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    progress("manifest", 1, 1)
    return manifest
