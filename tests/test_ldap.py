"""The LDAPv3 interface with real clients: OpenLDAP's ldapsearch/ldapwhoami, ldap3 and curl,
over plain LDAP, StartTLS and LDAPS, against a repository holding the lodged test PKI."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import os
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import ldap3
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from ldap3.core.exceptions import LDAPException

from repository_server.listeners.ldap import protocol, responses
from repository_server.pki.testpki import device_builder
from tests.conftest import TEST_KEY, Running, add_user, start_repository
from tests.pkitools import client_cert, load_cert, load_key, write_pair

pytestmark = pytest.mark.asyncio(loop_scope="session")

LDAPSEARCH = shutil.which("ldapsearch")
needs_ldap_utils = pytest.mark.skipif(
    LDAPSEARCH is None and not os.environ.get("CI"),
    reason="OpenLDAP client tools (ldap-utils) not installed; .ci/run installs them")

BIND = ["-D", "uid=tester,ou=Users,o=SMKI", "-w", TEST_KEY]


def ldapsearch(running: Running, *args: str, url: str | None = None, ca: bool = True,
               check: bool = True) -> tuple[int, str]:
    """Run ldapsearch (LDIF out, no wrapping); returns (exit code, output)."""
    env = {**os.environ, "LDAPTLS_CACERT": running.tls_ca if ca else "/nonexistent",
           "LDAPTLS_REQCERT": "demand"}
    proc = subprocess.run(["ldapsearch", "-x", "-LLL", "-o", "ldif-wrap=no", "-H",
                           url or running.ldap, *args], capture_output=True, text=True, env=env,
                          timeout=60)
    out = proc.stdout + proc.stderr
    if check:
        assert proc.returncode == 0, out
    return proc.returncode, out


def ldif_values(text: str, attr: str) -> list[bytes]:
    """Values of one attribute in ldapsearch's LDIF (base64 for binary ones)."""
    out = []
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if name.lower() != attr.lower() or not sep:
            continue
        out.append(base64.b64decode(value[2:]) if value.startswith(":") else value.strip().encode())
    return out


def dns(text: str) -> list[str]:
    return [line[4:] for line in text.splitlines() if line.startswith("dn: ")]


def der_of(running: Running, obj: dict[str, Any]) -> bytes:
    data = running.path(obj["path"]).read_bytes()
    if data.startswith(b"-----"):
        return x509.load_pem_x509_certificate(data).public_bytes(serialization.Encoding.DER)
    return data


def ldap3_conn(running: Running, *, user: str | None = "uid=tester,ou=Users,o=SMKI",
               password: str | None = TEST_KEY, tls: str = "none",
               get_info: Any = ldap3.NONE, check_names: bool = True) -> ldap3.Connection:
    port = running.repo.bound["ldaps" if tls == "ldaps" else "ldap"].port
    tls_cfg = ldap3.Tls(ca_certs_file=running.tls_ca, validate=ssl.CERT_REQUIRED)
    server = ldap3.Server("127.0.0.1", port=port, use_ssl=tls == "ldaps", tls=tls_cfg,
                          get_info=get_info, connect_timeout=5)
    conn = ldap3.Connection(server, user=user, password=password, receive_timeout=10,
                            raise_exceptions=False, check_names=check_names)
    if tls == "starttls":
        conn.open()
        assert conn.start_tls(), conn.result
    assert conn.bind(), conn.result
    return conn


# -- anonymous: root DSE, schema, CAs and revocation lists -------------------------------------


@needs_ldap_utils
async def test_root_dse_schema_and_ldap3_get_info(loaded: Running) -> None:
    _, out = await asyncio.to_thread(ldapsearch, loaded, "-b", "", "-s", "base", "+")
    assert "namingContexts: o=SMKI" in out
    assert "supportedLDAPVersion: 3" in out
    assert f"supportedExtension: {protocol.STARTTLS_OID}" in out
    assert f"supportedControl: {protocol.PAGED_RESULTS_OID}" in out
    _, out = await asyncio.to_thread(ldapsearch, loaded, "-b", "cn=Subschema", "-s", "base",
                                     "(objectClass=subschema)", "attributeTypes", "objectClasses")
    assert "NAME 'smkiEui64'" in out and "NAME 'pkiCA'" in out
    # ldap3 reads the root DSE and the whole schema (get_info=ALL) and understands it
    conn = await asyncio.to_thread(ldap3_conn, loaded, user=None, password=None,
                                   get_info=ldap3.ALL)
    try:
        info = conn.server.info
        schema = conn.server.schema
        assert info is not None and "o=SMKI" in info.naming_contexts
        assert schema is not None and "smkiSerial" in schema.attribute_types
        assert "smkiCertificate" in schema.object_classes
        assert "userCertificate" in schema.attribute_types
    finally:
        conn.unbind()


@needs_ldap_utils
async def test_crls_and_arls_anonymously_with_ldapsearch_and_curl(loaded: Running) -> None:
    crl_obj = loaded.objects("crl")[0]
    arl_obj = loaded.objects("arl")[0]
    crl_der = der_of(loaded, crl_obj)
    arl_der = der_of(loaded, arl_obj)
    oca_dn = f"smkiKeyId={crl_obj['issuer_key_id']},ou=CAs,o=SMKI"
    _, out = await asyncio.to_thread(ldapsearch, loaded, "-b", oca_dn, "-s", "base",
                                     "(objectClass=*)", "certificateRevocationList;binary")
    assert ldif_values(out, "certificateRevocationList;binary") == [crl_der]
    # every CA entry is a pkiCA carrying its certificate(s); roots carry their ARL
    _, out = await asyncio.to_thread(ldapsearch, loaded, "-b", "ou=CAs,o=SMKI", "-s", "one",
                                     f"(smkiKeyId={arl_obj['issuer_key_id'].lower()})",
                                     "authorityRevocationList;binary", "cACertificate;binary")
    assert ldif_values(out, "authorityRevocationList;binary") == [arl_der]
    root = next(o for o in loaded.objects("root") if o["subject_key_id"] == arl_obj["issuer_key_id"])
    assert ldif_values(out, "cACertificate;binary") == [der_of(loaded, root)]
    # curl's LDAP client: the CRL and the ARL as binary values
    for dn_, attr, want in ((oca_dn, "certificateRevocationList;binary", crl_der),
                            (f"smkiKeyId={arl_obj['issuer_key_id']},ou=CAs,o=SMKI",
                             "authorityRevocationList;binary", arl_der)):
        url = f"{loaded.ldap}/{dn_}?{attr}?base?(objectClass=*)"
        proc = await asyncio.to_thread(subprocess.run, ["curl", "-sS", "--max-time", "10", url],
                                       capture_output=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        lines = [ln.strip() for ln in proc.stdout.decode().splitlines() if ":" in ln]
        value = next(ln.split(": ", 1)[1] for ln in lines if ln.startswith(attr))
        assert base64.b64decode(value) == want


# -- binds, access to device and organisation entries -------------------------------------------


@needs_ldap_utils
async def test_device_entries_need_a_bound_user(loaded: Running) -> None:
    dev = loaded.objects("device")[0]
    base = f"smkiEui64={dev['eui64']},ou=Devices,o=SMKI"
    # anonymous: hidden in searches, and a base at or below one cannot be told from one that
    # does not exist (access.py: noSuchObject, only the unit as the matched DN, as slapd
    # answers for an entry its ACL does not disclose)
    _, out = await asyncio.to_thread(ldapsearch, loaded, "-b", "ou=Devices,o=SMKI",
                                     f"(smkiEui64={dev['eui64']})", "dn")
    assert dns(out) == []
    missing = "smkiEui64=00-00-00-00-00-00-00-01,ou=Devices,o=SMKI"
    answers = []
    for hidden in (base, f"smkiSerial={dev['serial']},{base}", f"smkiSerial=01,{base}", missing):
        code, out = await asyncio.to_thread(ldapsearch, loaded, "-b", hidden, "-s", "base",
                                            check=False)
        assert code == 32 and "matched dn: ou=devices,o=smki\n" in out.lower(), out
        answers.append(out)
    assert len(set(answers)) == 1, answers
    # bound, the matched DN names the deepest entry that exists
    code, out = await asyncio.to_thread(ldapsearch, loaded, *BIND, "-b", f"smkiSerial=01,{base}",
                                        "-s", "base", check=False)
    assert code == 32 and f"matched dn: {base.lower()}\n" in out.lower(), out
    # bound with the API key as password (a DN or the bare user name)
    for who in (BIND, ["-D", "tester", "-w", TEST_KEY]):
        _, out = await asyncio.to_thread(
            ldapsearch, loaded, *who, "-b", "ou=Devices,o=SMKI",
            f"(&(smkiEui64={dev['eui64'].lower().replace('-', '')})(smkiKeyUsage={dev['usage']}))",
            "userCertificate;binary", "smkiSerial", "smkiStatus")
        assert ldif_values(out, "userCertificate;binary") == [der_of(loaded, dev)]
        assert ldif_values(out, "smkiSerial") == [dev["serial"].encode()]
        assert ldif_values(out, "smkiStatus") == [b"I"]
        assert dns(out) == [f"smkiSerial={dev['serial']},smkiEui64={dev['eui64']},ou=Devices,o=SMKI"]
    # the device entry's children are its certificates; one-level from the device
    _, out = await asyncio.to_thread(ldapsearch, loaded, *BIND, "-b", base, "-s", "one", "dn")
    want = {o["serial"] for o in loaded.objects("device") if o["eui64"] == dev["eui64"]}
    assert {d.split(",")[0].split("=")[1] for d in dns(out)} == want
    # wrong credentials, unknown user, unauthenticated bind
    for who, code in ((["-D", "tester", "-w", "wrong"], 49), (["-D", "nobody", "-w", TEST_KEY], 49),
                      (["-D", "uid=tester,ou=Users,o=SMKI", "-w", ""], 53)):
        rc, out = await asyncio.to_thread(ldapsearch, loaded, *who, "-b", "", "-s", "base",
                                          check=False)
        assert rc == code, out


async def test_organisations_by_eui_role_and_usage_with_ldap3(loaded: Running) -> None:
    await asyncio.to_thread(_organisations, loaded)


def _organisations(loaded: Running) -> None:
    org = next(o for o in loaded.objects("organisation") if not o["revoked"])
    conn = ldap3_conn(loaded)
    try:
        ok = conn.search("ou=Organisations,o=SMKI",
                         f"(&(smkiEui64={org['eui64']})(smkiRole={org['role']})"
                         f"(smkiKeyUsage={org['usage']}))",
                         attributes=["userCertificate;binary", "smkiRole", "smkiSerial"])
        assert ok, conn.result
        got = {e.entry_dn: e for e in conn.entries}
        assert any(e["smkiSerial"].value == org["serial"] for e in got.values())
        entry = next(e for e in got.values() if e["smkiSerial"].value == org["serial"])
        assert entry["userCertificate;binary"].raw_values == [der_of(loaded, org)]
        # by serial anywhere (subtree from the suffix), in any spelling
        ok = conn.search("o=SMKI", f"(smkiSerial={org['serial'].lower().lstrip('0')})",
                         attributes=["smkiSerial"])
        assert ok and [e["smkiSerial"].value for e in conn.entries] == [org["serial"]]
        # RFC 4523 certificateExactMatch: serial and issuer
        issuer = x509.load_der_x509_certificate(der_of(loaded, org)).issuer.rfc4514_string()
        ok = conn.search("o=SMKI", f'(userCertificate={{ serialNumber {int(org["serial"], 16)},'
                         f' issuer rdnSequence:"{issuer}" }})', attributes=["smkiSerial"])
        assert ok and [e["smkiSerial"].value for e in conn.entries] == [org["serial"]]
        # compare works; writes are refused
        entry_dn = entry.entry_dn
        assert conn.compare(entry_dn, "smkiKeyUsage", org["usage"].lower()) is True
        assert conn.compare(entry_dn, "smkiKeyUsage", "XX") is False
        assert conn.modify(entry_dn, {"smkiStatus": [(ldap3.MODIFY_REPLACE, ["N"])]}) is False
        assert conn.result["result"] == 53 and "read-only" in conn.result["message"]
        assert conn.delete(entry_dn) is False and conn.result["result"] == 53
        assert conn.add("cn=x,o=SMKI", "device") is False and conn.result["result"] == 53
        assert conn.extend.standard.who_am_i() == "dn:uid=tester,ou=Users,o=SMKI"
    finally:
        conn.unbind()


# -- TLS ------------------------------------------------------------------------------------------


@needs_ldap_utils
async def test_starttls_and_ldaps(loaded: Running) -> None:
    dev = loaded.objects("device")[0]
    args = (*BIND, "-b", "ou=Devices,o=SMKI", f"(smkiSerial={dev['serial']})", "smkiSerial")
    _, out = await asyncio.to_thread(ldapsearch, loaded, "-ZZ", *args)
    assert ldif_values(out, "smkiSerial") == [dev["serial"].encode()]
    _, out = await asyncio.to_thread(ldapsearch, loaded, *args, url=loaded.ldaps)
    assert ldif_values(out, "smkiSerial") == [dev["serial"].encode()]
    # without our CA the client refuses the server (it is real TLS)
    rc, _ = await asyncio.to_thread(ldapsearch, loaded, "-ZZ", *args, ca=False, check=False)
    assert rc != 0
    # ldap3 over StartTLS and LDAPS; StartTLS twice is an operations error
    def with_ldap3(mode: str) -> None:
        conn = ldap3_conn(loaded, tls=mode)
        try:
            assert conn.search("ou=Devices,o=SMKI", f"(smkiSerial={dev['serial']})",
                               attributes=["smkiSerial"]) and len(conn.entries) == 1
            if mode == "starttls":
                assert not conn.start_tls()
        finally:
            conn.unbind()

    for mode in ("starttls", "ldaps"):
        await asyncio.to_thread(with_ldap3, mode)


async def test_sasl_external_with_a_client_certificate(tmp_path: Path, pki: dict[str, Any],
                                                       fresh_db: str) -> None:
    pki_dir: Path = pki["dir"]
    ca = load_cert(pki_dir / pki["dcc_client"]["ca"])
    ca_key = load_key(pki_dir / pki["dcc_client"]["ca_key"])
    cert, key = client_cert(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "relying-1")]),
                            ca, ca_key)
    cert_file, key_file = write_pair(tmp_path, "relying-1", cert, key)
    stranger, skey = client_cert(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME,
                                                               "nobody-here")]), ca, ca_key)
    s_cert, s_key = write_pair(tmp_path, "stranger", stranger, skey)
    repo = await start_repository(tmp_path, pki, fresh_db,
                                  ldap={"client_ca": str(pki_dir / pki["dcc_client"]["ca"])})
    try:
        running = Running(repo, pki)
        await add_user(repo, "relying-1", None)

        def external(cert_path: str, key_path: str) -> tuple[bool, Any, Any]:
            tls = ldap3.Tls(ca_certs_file=running.tls_ca, validate=ssl.CERT_REQUIRED,
                            local_certificate_file=cert_path, local_private_key_file=key_path)
            server = ldap3.Server("127.0.0.1", port=repo.bound["ldaps"].port, use_ssl=True,
                                  tls=tls, get_info=ldap3.NONE)
            conn = ldap3.Connection(server, authentication=ldap3.SASL,
                                    sasl_mechanism=ldap3.EXTERNAL, sasl_credentials="")
            ok = conn.bind()
            who = conn.extend.standard.who_am_i() if ok else None
            result = conn.result
            conn.unbind()
            return ok, who, result

        ok, who, _ = await asyncio.to_thread(external, cert_file, key_file)
        assert ok and who == "dn:uid=relying-1,ou=Users,o=SMKI"
        ok, _, result = await asyncio.to_thread(external, s_cert, s_key)
        assert not ok and result["result"] == 49
    finally:
        await repo.stop()


# -- paging, limits, lodging while running -------------------------------------------------------


def _devices(running: Running, count: int, first_eui: int) -> tuple[bytes, list[x509.Certificate]]:
    """`count` new device certificates (one per device), PEM bundle and the certificates."""
    dca, dca_key = running.ca("issuing-dca")
    aki = dca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    key = ec.generate_private_key(ec.SECP256R1())
    certs = []
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    for i in range(count):
        eui = (0x00DB12F000000000 + first_eui + i).to_bytes(8, "big")
        serial = int.from_bytes(os.urandom(15), "big") | (1 << 120)
        builder = device_builder(dca.subject, now, "KA", serial, key.public_key(), eui, aki)
        certs.append(builder.sign(dca_key, hashes.SHA256()))
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    return pem, certs


@needs_ldap_utils
async def test_paged_search_over_thousands_and_limits(loaded: Running) -> None:
    client = loaded.client()
    try:
        pem, _ = _devices(loaded, 1500, 0)
        reply = await asyncio.to_thread(client.certificates, pem)
        assert reply.status == 200, reply.body
    finally:
        client.close()
    flt = "(&(objectClass=smkiCertificate)(smkiKind=device))"
    total = 1500 + len(loaded.objects("device"))
    # without paging the server's size limit (1000) stops it
    code, out = await asyncio.to_thread(ldapsearch, loaded, *BIND, "-b", "ou=Devices,o=SMKI",
                                        flt, "1.1", check=False)
    assert code == 4 and len(dns(out)) == 1000
    # the client's own size limit
    code, out = await asyncio.to_thread(ldapsearch, loaded, *BIND, "-z", "7", "-b",
                                        "ou=Devices,o=SMKI", flt, "1.1", check=False)
    assert code == 4 and len(dns(out)) == 7
    # ldapsearch with the simple paged results control: every entry, once
    _, out = await asyncio.to_thread(ldapsearch, loaded, *BIND, "-E", "pr=400/noprompt", "-b",
                                     "ou=Devices,o=SMKI", flt, "smkiSerial")
    serials = ldif_values(out, "smkiSerial")
    assert len(serials) == total and len(set(serials)) == total
    # ldap3's paged search, one-level under ou=Devices: the device entries
    def paged() -> set[str]:
        conn = ldap3_conn(loaded)
        try:
            found = list(conn.extend.standard.paged_search(
                "ou=Devices,o=SMKI", "(objectClass=smkiSubjectEntry)", search_scope=ldap3.LEVEL,
                attributes=["smkiEui64"], paged_size=250, generator=True))
        finally:
            conn.unbind()
        return {e["attributes"]["smkiEui64"][0] for e in found if e["type"] == "searchResEntry"}

    euis = await asyncio.to_thread(paged)
    assert len(euis) == 1500 + len({o["eui64"] for o in loaded.objects("device")})


@needs_ldap_utils
async def test_lodging_shows_at_once_new_crl_wins(loaded: Running) -> None:
    """A certificate lodged after start appears; a new CRL replaces the cached answer."""
    crl_obj = loaded.objects("crl")[0]
    oca_dn = f"smkiKeyId={crl_obj['issuer_key_id']},ou=CAs,o=SMKI"
    args = ("-b", oca_dn, "-s", "base", "(objectClass=*)", "certificateRevocationList;binary")
    for _ in range(3):  # asked repeatedly: answered from the response cache
        _, out = await asyncio.to_thread(ldapsearch, loaded, *args)
        assert ldif_values(out, "certificateRevocationList;binary") == [der_of(loaded, crl_obj)]
    pem, certs = _devices(loaded, 1, 900_000)
    eui = "-".join(f"{b:02X}" for b in (0x00DB12F000000000 + 900_000).to_bytes(8, "big"))
    flt = f"(smkiEui64={eui})"
    _, out = await asyncio.to_thread(ldapsearch, loaded, *BIND, "-b", "ou=Devices,o=SMKI", flt, "1.1")
    assert dns(out) == []
    new_crl = loaded.next_oca_crl(7, 12345)
    client = loaded.client()
    try:
        assert (await asyncio.to_thread(client.certificates, pem)).status == 200
        assert (await asyncio.to_thread(client.crl, new_crl)).status == 200
    finally:
        client.close()
    _, out = await asyncio.to_thread(ldapsearch, loaded, *BIND, "-b", "ou=Devices,o=SMKI", flt,
                                     "userCertificate;binary")
    assert ldif_values(out, "userCertificate;binary") == [
        certs[0].public_bytes(serialization.Encoding.DER)]
    _, out = await asyncio.to_thread(ldapsearch, loaded, *args)
    assert ldif_values(out, "certificateRevocationList;binary") == [new_crl]
    _, out = await asyncio.to_thread(ldapsearch, loaded, "-b", oca_dn, "-s", "base",
                                     "(smkiCrlNumber>=7)", "smkiCrlNumber")
    assert ldif_values(out, "smkiCrlNumber") == [b"7"]


# -- CPM 8 -----------------------------------------------------------------------------------------


async def test_searches_count_for_cpm8(loaded: Running) -> None:
    levels = loaded.repo.levels
    assert levels is not None

    def ldap_counts() -> tuple[int, int]:
        rec = sum(c.received for (_m, i, _o, u), c in levels.counts.items() if i == "ldap"
                  and u == "tester")
        ans = sum(c.answered for (_m, i, _o, u), c in levels.counts.items() if i == "ldap"
                  and u == "tester")
        return rec, ans

    before = ldap_counts()
    dev = loaded.objects("device")[1]
    def searches() -> None:
        conn = ldap3_conn(loaded)
        try:
            for _ in range(3):  # the second and third are answered from the response cache
                assert conn.search("ou=Devices,o=SMKI", f"(smkiEui64={dev['eui64']})",
                                   attributes=["userCertificate;binary"])
            conn.search("", "(objectClass=*)", search_scope=ldap3.BASE)  # root DSE: not counted
        finally:
            conn.unbind()

    await asyncio.to_thread(searches)
    after = ldap_counts()
    assert (after[0] - before[0], after[1] - before[1]) == (3, 3)


# -- robustness ------------------------------------------------------------------------------------


def _raw(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    return s


def _read_all(s: socket.socket, deadline: float = 5.0) -> bytes:
    s.settimeout(deadline)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    return data


async def test_protocol_errors_limits_and_slow_readers(tmp_path: Path, pki: dict[str, Any],
                                                       fresh_db: str) -> None:
    repo = await start_repository(tmp_path, pki, fresh_db, ldap={
        "open_reads": True, "max_connections": 8, "write_timeout_seconds": 1,
        "idle_timeout_seconds": 2, "max_request_kb": 4})
    try:
        running = Running(repo, pki)
        from tests.conftest import lodge_pki

        await asyncio.to_thread(lodge_pki, running)
        port = repo.bound["ldap"].port

        def checks() -> None:
            # garbage: a notice of disconnection naming the problem, then close
            s = _raw(port)
            s.sendall(b"\x02\x01\x00hello")
            got = _read_all(s)
            assert protocol.NOTICE_OF_DISCONNECTION_OID.encode() in got and b"LDAPMessage" in got
            # an oversized PDU is refused on its header
            s = _raw(port)
            s.sendall(b"\x30\x84\x00\x10\x00\x00")
            got = _read_all(s)
            assert b"exceeds" in got
            # an idle client is disconnected
            s = _raw(port)
            started = time.monotonic()
            got = _read_all(s, 10)
            assert protocol.NOTICE_OF_DISCONNECTION_OID.encode() in got and b"idle" in got
            assert time.monotonic() - started < 8
            # more connections than allowed: the extra one gets busy and is closed
            held = [_raw(port) for _ in range(8)]
            time.sleep(0.2)
            s = _raw(port)
            got = _read_all(s)
            assert protocol.NOTICE_OF_DISCONNECTION_OID.encode() in got and b"too many" in got
            for h in held:
                h.close()

        await asyncio.to_thread(checks)
        from prometheus_client import generate_latest

        assert 'smki_connections_over_cap_total{listener="ldap"} 1.0' in generate_latest(
            repo.metrics.registry).decode()
        # a client that asks for a lot and never reads: bounded by the write timeout, and the
        # server keeps answering others meanwhile
        s = await asyncio.to_thread(_raw, port)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        for i in range(2, 200):
            s.sendall(responses.frame(i, bytes(_subtree_search())))
        await asyncio.sleep(0.5)
        def others_served() -> None:
            other = ldap3_conn(running, user=None, password=None)
            assert other.search("o=SMKI", "(objectClass=pkiCA)", attributes=["cn"]) and other.entries
            other.unbind()

        await asyncio.to_thread(others_served)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(c.peer.endswith(str(s.getsockname()[1]))
                                                   for c in repo.ldap.connections):  # type: ignore[union-attr]
            await asyncio.sleep(0.2)
        assert not any(c.peer.endswith(str(s.getsockname()[1]))
                       for c in repo.ldap.connections)  # type: ignore[union-attr]
        s.close()
    finally:
        await repo.stop()


def _subtree_search() -> bytes:
    """The protocolOp of a subtree search for everything under o=SMKI, every attribute."""
    from repository_server.listeners.ldap.ber import enc_int, enc_str, enc_tlv

    body = (enc_str(0x04, "o=SMKI") + enc_int(2, 0x0A) + enc_int(0, 0x0A) + enc_int(0)
            + enc_int(0) + b"\x01\x01\x00" + enc_str(0x87, "objectClass") + enc_tlv(0x30, b""))
    return enc_tlv(0x63, body)


async def test_bad_requests_get_ldap_result_codes(loaded: Running) -> None:
    await asyncio.to_thread(_bad_requests, loaded)


def _bad_requests(loaded: Running) -> None:
    conn = ldap3_conn(loaded, check_names=False)
    try:
        assert not conn.search("not a dn", "(objectClass=*)")
        assert conn.result["result"] == 34
        assert not conn.search("ou=Nowhere,o=SMKI", "(objectClass=*)")
        assert conn.result["result"] == 32 and conn.result["dn"] == "o=SMKI"
        assert not conn.search("smkiEui64=00-DB-12-00-00-00-00-01,ou=Devices,o=SMKI",
                               "(objectClass=*)")
        assert conn.result["result"] == 32 and conn.result["dn"] == "ou=Devices,o=SMKI"
        # an unknown attribute in a filter is Undefined: no entries, no error
        conn.search("ou=CAs,o=SMKI", "(noSuchAttribute=1)")
        assert conn.result["result"] == 0 and conn.entries == []
        # a critical control we do not know
        assert not conn.search("o=SMKI", "(objectClass=*)", search_scope=ldap3.BASE,
                               controls=[("1.2.3.4.5", True, None)])
        assert conn.result["result"] == 12
    finally:
        conn.unbind()
    with pytest.raises(LDAPException):
        bad = ldap3.Connection(ldap3.Server("127.0.0.1", port=loaded.repo.bound["ldap"].port),
                               user="tester", password="wrong", raise_exceptions=True)
        bad.bind()


async def test_password_binds_follow_the_sec_lockout(loaded: Running) -> None:
    """A portal password works as an LDAP bind; 5 wrong ones lock the account for LDAP and the
    portal alike (one set of counters in PostgreSQL)."""
    from repository_server.accounts.keys import hash_password

    store = loaded.repo.store
    assert store is not None
    await add_user(loaded.repo, "pw-user", None)
    password = "correct horse battery 9"
    await store.pool.execute("UPDATE users SET password_hash = $2, must_change_password = false"
                             " WHERE name = $1", "pw-user", hash_password(password))

    def bind(secret: str) -> int:
        conn = ldap3.Connection(ldap3.Server("127.0.0.1", port=loaded.repo.bound["ldap"].port),
                                user="uid=pw-user,ou=Users,o=SMKI", password=secret,
                                receive_timeout=10)
        conn.bind()
        code = int(conn.result["result"])
        conn.unbind()
        return code

    assert await asyncio.to_thread(bind, password) == 0
    for _ in range(5):
        assert await asyncio.to_thread(bind, "wrong password") == 49
    assert await asyncio.to_thread(bind, password) == 49  # locked now
    account = await store.portal_account("pw-user")
    assert account is not None and account[2] is not None  # locked_until, as the portal sees it


def _exchange(port: int, data: bytes, until_done: set[int], timeout: float = 10,
              pause: float = 0.0) -> list[Any]:
    """Send raw PDUs; read (message id, response name, response) until every id in
    `until_done` has its SearchResultDone (decoded by pyasn1 with ldap3's RFC 4511 spec).
    `pause`: read nothing for this long first, through a small receive window (a slow client)."""
    from ldap3.protocol.rfc4511 import LDAPMessage
    from pyasn1.codec.ber import decoder as ber_decoder

    from tests.ldaptools import split_frames

    s = socket.socket()
    if pause:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    s.settimeout(timeout)
    s.connect(("127.0.0.1", port))
    s.sendall(data)
    time.sleep(pause)
    buf = b""
    out: list[Any] = []
    pending = set(until_done)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
        frames, buf = split_frames(buf)
        for frame in frames:
            msg, _ = ber_decoder.decode(frame, asn1Spec=LDAPMessage())
            name = msg["protocolOp"].getName()
            mid = int(msg["messageID"])
            out.append((mid, name, msg["protocolOp"][name]))
            if name == "searchResDone":
                pending.discard(mid)
    s.close()
    assert not pending, f"no SearchResultDone for {pending}"
    return out


async def test_busy_abandon_and_another_suffix(tmp_path: Path, pki: dict[str, Any],
                                               fresh_db: str) -> None:
    from tests.conftest import lodge_pki
    from tests.ldaptools import search

    repo = await start_repository(tmp_path, pki, fresh_db, ldap={
        "open_reads": True, "max_outstanding": 1, "suffix": "dc=smki,dc=example"},
        service_levels={"enabled": False})
    try:
        running = Running(repo, pki)
        await asyncio.to_thread(lodge_pki, running)
        port = repo.bound["ldap"].port
        everything = "(objectClass=*)"
        # two searches pipelined in one write with max_outstanding = 1: the second is busy
        out = await asyncio.to_thread(_exchange, port, search(1, "dc=smki,dc=example", everything)
                                      + search(2, "dc=smki,dc=example", everything), {1, 2})
        done = {mid: int(op["resultCode"]) for mid, name, op in out if name == "searchResDone"}
        assert done == {1: 0, 2: 51}
        entries = [op for mid, name, op in out if mid == 1 and name == "searchResEntry"]
        assert str(entries[0]["object"]) == "dc=smki,dc=example"
        assert any(str(e["object"]).startswith("smkiKeyId=") and
                   str(e["object"]).endswith(",ou=CAs,dc=smki,dc=example") for e in entries)
        # abandon: the abandoned search never answers; the next one does
        abandon = responses.frame(5, b"\x50\x01\x04")  # AbandonRequest for message 4
        out = await asyncio.to_thread(_exchange, port, search(4, "dc=smki,dc=example", everything)
                                      + abandon + search(6, "ou=CAs,dc=smki,dc=example",
                                                         "(objectClass=pkiCA)"), {6})
        assert {mid for mid, _name, _op in out} == {6}
        assert [int(op["resultCode"]) for _m, name, op in out if name == "searchResDone"] == [0]
        # a repeated search is answered from the response cache (CPM 8 counting off here)
        assert repo.ldap is not None
        hits = repo.ldap.cache.hits
        for mid in (8, 9):
            await asyncio.to_thread(_exchange, port, search(mid, "ou=CAs,dc=smki,dc=example",
                                                            "(objectClass=pkiCA)"), {mid})
        assert repo.ldap.cache.hits >= hits + 1
        # the old suffix is not ours any more
        out = await asyncio.to_thread(_exchange, port, search(7, "o=SMKI", everything), {7})
        assert [int(op["resultCode"]) for _m, name, op in out if name == "searchResDone"] == [32]
    finally:
        await repo.stop()


def _local_address() -> str | None:
    """This machine's own non-loopback address (none leaves the machine: a UDP connect only
    picks the route), or None when there is no such interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent
            addr: str = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


async def test_password_binds_from_afar_need_tls(tmp_path: Path, pki: dict[str, Any],
                                                  fresh_db: str) -> None:
    addr = _local_address()
    if addr is None:
        pytest.skip("no non-loopback interface on this machine")
    repo = await start_repository(tmp_path, pki, fresh_db,
                                  listeners={"ldap": f"{addr}:0"})
    try:
        await add_user(repo, "tester", TEST_KEY)
        port = repo.bound["ldap"].port

        def bind(tls: bool) -> int:
            server = ldap3.Server(addr, port=port, tls=ldap3.Tls(
                ca_certs_file=str(pki["dir"] / pki["tls"]["ca"]), validate=ssl.CERT_NONE))
            conn = ldap3.Connection(server, user="tester", password=TEST_KEY, receive_timeout=10)
            conn.open()
            if tls:
                assert conn.start_tls(), conn.result
            conn.bind()
            code = int(conn.result["result"])
            conn.unbind()
            return code

        assert await asyncio.to_thread(bind, False) == 13  # confidentialityRequired
        assert await asyncio.to_thread(bind, True) == 0
    finally:
        await repo.stop()


async def test_a_search_slower_than_its_time_limit(tmp_path: Path, pki: dict[str, Any],
                                                  fresh_db: str) -> None:
    """A search slower than the client's time limit (1 s) ends with timeLimitExceeded: 6,000
    entries (about 7 MB, more than the kernel buffers hold) due to a client that reads nothing
    for 3 s, so the server pauses between entries and the limit passes. (Nothing else is slow
    now: the entries come from the memory-mapped replica.)"""
    from ldap3.operation.search import search_operation

    from tests.conftest import lodge_pki
    from tests.ldaptools import pdu

    repo = await start_repository(tmp_path, pki, fresh_db, ldap={"size_limit": 0})
    try:
        await add_user(repo, "tester", TEST_KEY)
        running = Running(repo, pki)
        await asyncio.to_thread(lodge_pki, running)
        client = running.client()
        try:
            pem, _ = _devices(running, 6000, 7_000_000)
            assert (await asyncio.to_thread(client.certificates, pem)).status == 200
        finally:
            client.close()
        bind = pdu(1, "bindRequest", ldap3.operation.bind.bind_operation(
            3, ldap3.SIMPLE, "uid=tester,ou=Users,o=SMKI", TEST_KEY))
        slow = pdu(2, "searchRequest", search_operation(
            "ou=Devices,o=SMKI", "(objectClass=smkiCertificate)", ldap3.SUBTREE,
            ldap3.DEREF_NEVER, ["*", "userCertificate;binary"], 0, 1, False, True, True))
        out = await asyncio.to_thread(_exchange, repo.bound["ldap"].port, bind + slow, {2}, 30,
                                      3.0)
        done = [op for mid, name, op in out if mid == 2 and name == "searchResDone"]
        assert int(done[0]["resultCode"]) == 3  # timeLimitExceeded
        sent = sum(1 for mid, name, _ in out if mid == 2 and name == "searchResEntry")
        assert 0 < sent < 6000
    finally:
        await repo.stop()


async def test_expiry_of_cached_answers(loaded: Running) -> None:
    """A cached answer that holds a certificate is not served past that certificate's
    notAfter."""
    from tests.test_webservice import _org_cert

    store = loaded.repo.store
    assert store is not None

    def search(base: str, flt: str, attrs: list[str], time_limit: int = 0) -> tuple[int, list[Any]]:
        conn = ldap3_conn(loaded)
        try:
            conn.search(base, flt, attributes=attrs, time_limit=time_limit)
            return int(conn.result["result"]), [e["attributes"] for e in conn.response
                                                 if e["type"] == "searchResEntry"]
        finally:
            conn.unbind()

    # a certificate whose validity ends in 3 s: I while valid (the second answer is cached),
    # E after, although nothing was lodged in between
    eui = bytes.fromhex("90B3D51F30FFEE77")
    cert = _org_cert(loaded, eui, not_after=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3))
    client = loaded.client()
    try:
        pem_bytes = cert.public_bytes(serialization.Encoding.PEM)
        assert (await asyncio.to_thread(client.certificates, pem_bytes)).status == 200
    finally:
        client.close()
    args = ("ou=Organisations,o=SMKI",
            "(&(objectClass=smkiCertificate)(smkiEui64=90-B3-D5-1F-30-FF-EE-77))", ["smkiStatus"])
    hits = loaded.repo.ldap.cache.hits if loaded.repo.ldap else 0
    for _ in range(2):
        code, entries = await asyncio.to_thread(search, *args)
        assert code == 0 and [e["smkiStatus"] for e in entries] == [["I"]]
    assert loaded.repo.ldap is not None and loaded.repo.ldap.cache.hits == hits + 1
    await asyncio.sleep(max(0.0, cert.not_valid_after_utc.timestamp() - time.time()) + 0.5)
    code, entries = await asyncio.to_thread(search, *args)
    assert code == 0 and [e["smkiStatus"] for e in entries] == [["E"]]
