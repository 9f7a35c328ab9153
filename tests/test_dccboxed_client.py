"""Smart DCC's own client, unmodified, against our web service: `@smartdcc/dccboxed-keystore`
0.4.2 from npm (pinned by tests/node/package-lock.json) searches and retrieves over HTTP and
HTTPS, for the test PKI and for the real DCC test certificates in shared/realdata.

tests/node/drive.js makes a batch of the library's own calls (`search`, `query`,
`BoxedKeyStore.query`) in one node process per protocol and prints one JSON line per call;
the expectations are worked out here, from the test PKI's manifest and from realdata's
inventory.tsv (not from the server).

What the client refuses, by its own rules (certificateMetadata.ts), and the test expects:
* an organisation certificate whose subject OU is not two hex digits: realdata's
  `dsp-xml-sign-90B3D51F30000002-ds-pre-1.4.1.pem` has OU "137" (role 0x89 spelt in decimal;
  the server reports role 137). `query` throws 'invalid subject', and so does every `search`
  whose filtered results include it (the client retrieves them with Promise.all);
* certificates that are neither a device's nor an organisation's (the ZAZ1 CA certificate,
  the Let's Encrypt negative case): the service answers 402 (they are downloads), which the
  client turns into null."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any

import pytest
import pytest_asyncio

from repository_server.lodging.bulk import import_directory
from repository_server.lodging.service import Actor
from repository_server.pki.pem import load_pem_or_der_certificates
from tests.conftest import REALDATA, ROOT, Running, add_user

pytestmark = pytest.mark.asyncio(loop_scope="session")

NODE_DIR = ROOT / "tests" / "node"
DRIVE = NODE_DIR / "drive.js"
PACKAGE = "@smartdcc/dccboxed-keystore"
VERSION = "0.4.2"
BOXED_API_KEY = "u3bg9gt38htd0j2"  # the client sends this key, always
KEY_USAGE = {"DS": "digitalSignature", "KA": "keyAgreement"}  # the client's KeyUsage names
UNKNOWN_EUI = "01-23-45-67-89-ab-cd-ef"
UNKNOWN_SERIAL = "7e57000000000000000000000000beef"


# -- the client ----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def dccboxed_node() -> str:
    """The node binary, with the pinned client installed in tests/node (npm ci if it is not)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("node and npm are required: this test runs Smart DCC's npm client"
                    " @smartdcc/dccboxed-keystore against the server (apt-get install nodejs"
                    " npm; .ci/run does this)", pytrace=False)
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    major = int(version.stdout.strip().lstrip("v").split(".")[0])
    if major < 16:
        pytest.fail(f"node {version.stdout.strip()} is too old: {PACKAGE} needs node >= 16",
                    pytrace=False)
    installed = NODE_DIR / "node_modules" / PACKAGE / "package.json"

    def installed_version() -> str | None:
        return json.loads(installed.read_text())["version"] if installed.is_file() else None

    if installed_version() != VERSION:
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR,
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.fail(f"`npm ci` in {NODE_DIR} failed (exit {done.returncode}):\n"
                        f"{done.stdout}{done.stderr}", pytrace=False)
    if installed_version() != VERSION:
        pytest.fail(f"{installed} is not version {VERSION} after `npm ci`", pytrace=False)
    return node


async def drive(node: str, url: str, ops: list[dict[str, Any]],
                env: dict[str, str]) -> list[dict[str, Any]]:
    """Run tests/node/drive.js with this plan, without blocking the server's event loop."""
    environ = {k: v for k, v in os.environ.items() if k != "NODE_EXTRA_CA_CERTS"} | env
    proc = await asyncio.create_subprocess_exec(
        node, str(DRIVE), cwd=NODE_DIR, env=environ, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(json.dumps({"url": url, "ops": ops}).encode()), 300)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, f"drive.js exited {proc.returncode}: {err.decode()}"
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert [line.get("id") for line in lines] == [op["id"] for op in ops], err.decode()
    return lines


# -- what the client should see ------------------------------------------------------------------
@dataclass(frozen=True)
class Cert:
    """A certificate as the client describes it: serial, EUI (lower-case hex, no separators,
    as the client's EUI prints), role (organisations), usage and DER."""

    serial: str
    eui: str | None
    role: int | None
    usage: str
    der: bytes


@dataclass
class Expect:
    """What one operation should give: a list of certificates (`search`, keystore by EUI), one
    certificate or None (`query`), an error message, or no certificate (null or an error)."""

    certs: list[Cert] | None = None
    cert: Cert | None = None
    error: str | None = None
    no_certificate: bool = False
    single: bool = False


@dataclass(frozen=True)
class RealCert:
    """One realdata certificate, from inventory.tsv."""

    serial: str
    kind: str  # device, organisation, CA, non-SMKI(WebPKI)
    eui: str | None
    ou: str | None
    usage: str | None
    expired: bool
    file: str
    der: bytes

    @property
    def role(self) -> int | None:
        """The role the server reports (SPEC: two hex digits; '137' is read as decimal)."""
        if self.ou is None:
            return None
        return int(self.ou, 16) if re.fullmatch(r"[0-9A-Fa-f]{2}", self.ou) else int(self.ou)

    @property
    def client_reads_subject(self) -> bool:
        """The client reads an organisation's role only from an OU of two hex digits
        (certificateMetadata.parseOrganisationSubject), else it throws 'invalid subject'."""
        return self.ou is not None and re.fullmatch(r"[0-9A-Fa-f]{2}", self.ou) is not None

    @property
    def status(self) -> str:
        return "E" if self.expired else "I"  # realdata has no CRLs: nothing is revoked

    def expected(self) -> Cert:
        assert self.usage is not None
        role = self.role if self.kind == "organisation" else None
        return Cert(self.serial, self.eui, role, self.usage, self.der)


@cache
def realdata() -> dict[str, RealCert]:
    """Every distinct realdata certificate by serial, described by inventory.tsv."""
    now = datetime.now(UTC)
    lines = (REALDATA / "inventory.tsv").read_text().splitlines()
    col = {name.split("(")[0]: i for i, name in enumerate(lines[0].split("\t"))}
    usages = {"digital_signature": "DS", "key_agreement": "KA"}
    certs: dict[str, RealCert] = {}
    for line in lines[1:]:
        row = line.split("\t")
        serial = row[col["serial_hex"]]
        if serial in certs:
            continue
        kind, subject = row[col["kind"]], row[col["subject"]]
        eui: str | None = None
        if kind == "device":
            m = re.search(r"hwSerialNum=([0-9a-f]{16})", row[col["san_hwModuleName"]])
            eui = m.group(1) if m else None
        elif kind == "organisation":
            m = re.search(r"UID\[BIT\]=00([0-9a-f]{16})", subject)
            eui = m.group(1) if m else None
        ou = re.search(r"OU\[\w+\]=([^,]*)", subject)
        not_after = datetime.fromisoformat(row[col["not_after"]]).replace(tzinfo=UTC)
        path = REALDATA / row[col["file"]]
        der = next(d for d in load_pem_or_der_certificates(path.read_bytes())
                   if hashlib.sha256(d).hexdigest()[:16] == row[col["sha256_der_16"]])
        certs[serial] = RealCert(serial, kind, eui, ou.group(1) if ou else None,
                                 usages.get(row[col["key_usage"]]), not_after < now,
                                 row[col["file"]], der)
    return certs


def client_eui(text: str) -> str:
    """The client's own spelling of an EUI in a search: lower case, hyphenated octets."""
    digits = text.replace("-", "").lower()
    return "-".join(digits[i:i + 2] for i in range(0, 16, 2))


def client_serial(serial: str) -> str:
    """`BigInt.toString(16)`: lower case, no leading zeros (what BoxedKeyStore sends)."""
    return format(int(serial, 16), "x")


def pki_der(running: Running, obj: dict[str, Any]) -> bytes:
    return load_pem_or_der_certificates(running.path(obj["path"]).read_bytes())[obj.get("index", 0)]


def pki_cert(running: Running, obj: dict[str, Any]) -> Cert:
    eui = obj["eui64"].replace("-", "").lower()
    role = obj["role"] if obj["kind"] == "organisation" else None
    return Cert(obj["serial"], eui, role, obj["usage"], pki_der(running, obj))


# -- the plan ------------------------------------------------------------------------------------
class Plan:
    def __init__(self) -> None:
        self.ops: list[dict[str, Any]] = []
        self.expect: dict[str, Expect] = {}

    def add(self, name: str, op: dict[str, Any], expect: Expect) -> None:
        assert name not in self.expect, name
        self.ops.append({"id": name, **op})
        self.expect[name] = expect

    def search(self, name: str, field_name: str, eui: str, usage: str, want: list[Cert] | str,
               status: str = "I", role: int | None = None) -> None:
        op: dict[str, Any] = {"op": "search", "q": {field_name: client_eui(eui)}, "usage": usage,
                              "status": status}
        if role is not None:
            op["role"] = str(role)  # the client compares the response's text
        self.add(name, op, Expect(error=want) if isinstance(want, str) else Expect(certs=want))


def pki_plan(plan: Plan, running: Running) -> None:
    """Searches, retrievals and key-store lookups for the lodged test PKI."""
    devices = running.objects("device")
    orgs = running.objects("organisation")

    def device_certs(eui: str, usage: str) -> list[Cert]:
        return [pki_cert(running, o) for o in devices if o["eui64"] == eui and o["usage"] == usage]

    def org_certs(eui: str, usage: str, role: int, revoked: bool) -> list[Cert]:
        return [pki_cert(running, o) for o in orgs if o["eui64"] == eui and o["usage"] == usage
                and o["role"] == role and o["revoked"] == revoked]

    # a device whose serial has a leading zero octet, so the unpadded spelling differs
    dev = next((o for o in devices if o["serial"].startswith("0")), devices[0])
    for usage in ("DS", "KA"):
        want = device_certs(dev["eui64"], usage)
        assert len(want) == 1
        plan.search(f"pki device search {usage}", "CertificateSubjectAltName", dev["eui64"], usage,
                    want)
    # organisations: a plain role, a role above 7F (OU 87/89), a revoked certificate (status R)
    org = next((o for o in orgs if not o["revoked"] and o["serial"].startswith("0")), orgs[0])
    high = next(o for o in orgs if not o["revoked"] and o["role"] > 0x7F)
    revoked = next(o for o in orgs if o["revoked"])
    for o in (org, high):
        want = org_certs(o["eui64"], o["usage"], o["role"], False)
        assert [c.serial for c in want] == [o["serial"]]
        plan.search(f"pki org search role {o['role']} {o['usage']}", "CertificateSubjectName",
                    o["eui64"], o["usage"], want, role=o["role"])
    plan.search("pki org search other role", "CertificateSubjectName", org["eui64"],
                org["usage"], [], role=org["role"] + 1)
    plan.search("pki org search revoked as I", "CertificateSubjectName", revoked["eui64"],
                revoked["usage"], org_certs(revoked["eui64"], revoked["usage"], revoked["role"],
                                            False), role=revoked["role"])
    plan.search("pki org search revoked as R", "CertificateSubjectName", revoked["eui64"],
                revoked["usage"], [pki_cert(running, revoked)], status="R", role=revoked["role"])
    # retrieval by serial, spelt as BoxedKeyStore spells it
    for o in (dev, org, *(d for d in devices if d["eui64"] == dev["eui64"] and d is not dev)):
        plan.add(f"pki query {o['kind']} {o['serial']}",
                 {"op": "query", "serial": client_serial(o["serial"])},
                 Expect(cert=pki_cert(running, o), single=True))
    # nothing there: 402, which the client turns into [] and null
    assert all(o.get("eui64") != UNKNOWN_EUI.upper() for o in running.pki["objects"])
    plan.search("unknown device EUI", "CertificateSubjectAltName", UNKNOWN_EUI, "DS", [])
    plan.search("unknown organisation EUI", "CertificateSubjectName", UNKNOWN_EUI, "DS", [],
                role=2)
    plan.add("unknown serial", {"op": "query", "serial": UNKNOWN_SERIAL}, Expect(single=True))
    # the key store (a cache over the web service): by device EUI, and by serial
    other = devices[-1]
    for usage in ("DS", "KA"):
        plan.add(f"keystore device {usage}",
                 {"op": "keystore", "eui": client_eui(other["eui64"]), "keyUsage": usage},
                 Expect(certs=device_certs(other["eui64"], usage)))
    plan.add("keystore serial", {"op": "keystoreSerial", "serial": org["serial"]},
             Expect(cert=pki_cert(running, org), single=True))


def realdata_plan(plan: Plan, sweep: bool) -> None:
    """Searches for real DCC test certificates; with `sweep`, retrieve every one by serial."""
    real = realdata()

    def matching(kind: str, eui: str, usage: str, status: str, role: int | None) -> list[RealCert]:
        key = eui.replace("-", "").lower()
        return [c for c in real.values() if c.kind == kind and c.eui == key and c.usage == usage
                and c.status == status and (role is None or c.role == role)]

    def search(name: str, kind: str, eui: str, usage: str, status: str = "I",
               role: int | None = None, some: bool = True) -> None:
        found = matching(kind, eui, usage, status, role)
        assert found or not some, f"realdata has nothing for {name}"
        # one certificate the client cannot read fails its whole search (Promise.all)
        unreadable = [c for c in found if kind == "organisation" and not c.client_reads_subject]
        want: list[Cert] | str = ("invalid subject" if unreadable
                                  else [c.expected() for c in found])
        field_name = "CertificateSubjectAltName" if kind == "device" else "CertificateSubjectName"
        plan.search(name, field_name, eui, usage, want, status=status, role=role)

    for eui in ("00DB123456789001", "00DB1234567890C8", "88738457002F966C"):
        for usage in ("DS", "KA"):
            search(f"realdata device {eui} {usage}", "device", eui, usage)
    search("realdata org load controller DS", "organisation", "90B3D51F30010008", "DS", role=8)
    search("realdata org load controller KA", "organisation", "90B3D51F30010008", "KA", role=8)
    # the ZAZ1 recovery certificates have expired (E): the client's search for I finds none
    search("realdata org recovery DS in use", "organisation", "90B3D51F30000001", "DS", role=1,
           some=False)
    search("realdata org recovery DS expired", "organisation", "90B3D51F30000001", "DS", "E",
           role=1)
    search("realdata org ACB DS", "organisation", "90B3D51F30000002", "DS", role=4)
    search("realdata org ACB DSP XML signing", "organisation", "90B3D51F30000002", "DS", role=0x89)
    if not sweep:
        return
    for c in real.values():
        if c.kind == "device" or (c.kind == "organisation" and c.client_reads_subject):
            expect = Expect(cert=c.expected(), single=True)
        elif c.kind == "organisation":
            expect = Expect(error="invalid subject")
        else:  # a CA certificate or the non-SMKI web certificate: the client must not take it
            expect = Expect(no_certificate=True)
        plan.add(f"realdata query {c.serial} ({c.file})",
                 {"op": "query", "serial": client_serial(c.serial)}, expect)


def problems_with(got: dict[str, Any], want: Cert, where: str) -> Iterator[str]:
    serials = {int(got["serial"], 16), int(got["x509Serial"], 16)}
    if serials != {int(want.serial, 16)}:
        yield f"{where}: serial {got['serial']}/{got['x509Serial']}, expected {want.serial}"
    if got["eui"] != want.eui:
        yield f"{where}: EUI {got['eui']}, expected {want.eui}"
    if got["role"] != want.role:
        yield f"{where}: role {got['role']}, expected {want.role}"
    if got["keyUsage"] != [KEY_USAGE[want.usage]]:
        yield f"{where}: keyUsage {got['keyUsage']}, expected [{KEY_USAGE[want.usage]}]"
    if base64.b64decode(got["der"]) != want.der:
        yield f"{where}: the certificate's DER differs from the lodged file"


def check(lines: list[dict[str, Any]], plan: Plan, scheme: str) -> list[str]:
    problems: list[str] = []
    for line in lines:
        where = f"{scheme}: {line['id']}"
        want = plan.expect[line["id"]]
        if want.no_certificate:  # our 402, which the client turns into null
            if "error" in line or line["result"] is not None:
                problems.append(f"{where}: expected null (a 402), got {line}")
            continue
        if want.error is not None:
            if line.get("error") != want.error:
                problems.append(f"{where}: expected the client's error {want.error!r}, got {line}")
            continue
        if "error" in line:
            problems.append(f"{where}: the client failed: {line['error']}"
                            + (f" ({line['code']})" if "code" in line else ""))
            continue
        got = line["result"]
        if want.single:
            if want.cert is None:
                if got is not None:
                    problems.append(f"{where}: expected null, got {got}")
            elif got is None:
                problems.append(f"{where}: expected {want.cert.serial}, got null")
            else:
                problems.extend(problems_with(got, want.cert, where))
            continue
        assert want.certs is not None
        if not isinstance(got, list):
            problems.append(f"{where}: expected a list of certificates, got {got}")
            continue
        expected = {int(c.serial, 16): c for c in want.certs}
        found = {int(g["serial"], 16): g for g in got}
        if sorted(found) != sorted(expected) or len(got) != len(want.certs):
            problems.append(f"{where}: serials {sorted(g['serial'] for g in got)}, expected"
                            f" {sorted(c.serial for c in want.certs)}")
            continue
        for serial, g in found.items():
            problems.extend(problems_with(g, expected[serial], where))
    return problems


# -- the server ----------------------------------------------------------------------------------
@pytest_asyncio.fixture(loop_scope="session")
async def boxed(loaded: Running) -> Running:
    """The lodged test PKI plus every realdata certificate, and the client's API key."""
    from repository_server.lodging.service import LodgingService

    assert loaded.repo.store is not None
    await add_user(loaded.repo, "dcc-boxed", BOXED_API_KEY)
    if not REALDATA.is_dir():  # a checkout without ../shared: the test PKI part still runs
        return loaded
    service = LodgingService(loaded.repo.store, after_commit=loaded.repo.catalog.synced)
    try:
        report = await import_directory(service, REALDATA, Actor("operator:test"),
                                        allow_unverified_issuer=True, note=lambda _line: None)
    finally:
        service.close()
    assert report.refused == [], report.refused[:5]
    assert report.stored == len(realdata())
    return loaded


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_dccboxed_keystore_client(dccboxed_node: str, boxed: Running, scheme: str) -> None:
    plan = Plan()
    pki_plan(plan, boxed)
    if REALDATA.is_dir():  # as the other realdata tests, only where ../shared/realdata is
        realdata_plan(plan, sweep=scheme == "http")  # every realdata serial once, over HTTP
    if scheme == "http":
        url, env = boxed.http + "/", {}
    else:
        url, env = boxed.https + "/", {"NODE_EXTRA_CA_CERTS": boxed.tls_ca}
    assert url.startswith(f"{scheme}://")
    front = boxed.repo.fronts[scheme]
    search = boxed.repo.metrics.http.route(scheme, "/services/certificatesearch")
    handed, searched = front.handed_over, search.statuses.get(200, 0)
    lines = await drive(dccboxed_node, url, plan.ops, env)
    problems = check(lines, plan, scheme)
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems)
    # every request of the client was answered in the fast front (listeners/http/front.py):
    # it sends head and body in one write, and no connection went to aiohttp
    assert search.statuses.get(200, 0) > searched
    assert front.handed_over == handed, front.handed_over - handed
    if scheme == "https":  # the client really checks the server: without our CA it refuses
        op = next(op for op in plan.ops if op["op"] == "query")
        line, = await drive(dccboxed_node, url, [op], {})
        assert "result" not in line and line.get("code") in {
            "UNABLE_TO_VERIFY_LEAF_SIGNATURE", "SELF_SIGNED_CERT_IN_CHAIN",
            "UNABLE_TO_GET_ISSUER_CERT_LOCALLY", "DEPTH_ZERO_SELF_SIGNED_CERT"}, line
