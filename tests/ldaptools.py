"""Test helpers for the LDAP tests: a private OpenLDAP slapd loaded from our export, and
`ldapsearch` output (LDIF) read back into comparable form. No mocks: real processes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ldap3
from ldap3.operation.abandon import abandon_operation
from ldap3.operation.add import add_operation
from ldap3.operation.bind import bind_operation
from ldap3.operation.compare import compare_operation
from ldap3.operation.delete import delete_operation
from ldap3.operation.extended import extended_operation
from ldap3.operation.modify import modify_operation
from ldap3.operation.modifyDn import modify_dn_operation
from ldap3.operation.search import search_operation
from ldap3.operation.unbind import unbind_operation
from ldap3.protocol.convert import build_controls_list
from ldap3.protocol.rfc4511 import LDAPMessage, MessageID, ProtocolOp
from pyasn1.codec.ber import encoder as ber_encoder

from repository_server.listeners.ldap import protocol, responses
from repository_server.listeners.ldap.server import WHOAMI_OID
from tests import ports
from tests.conftest import TEST_KEY, run_process

SLAPD = Path("/usr/sbin/slapd")
SLAPADD = Path("/usr/sbin/slapadd")
LDAPSEARCH = "ldapsearch"
SUFFIX = "o=SMKI"

SLAPD_CONF = """\
include     /etc/ldap/schema/core.schema
include     /etc/ldap/schema/cosine.schema
include     {schema}
pidfile     {run}/slapd.pid
argsfile    {run}/slapd.args
modulepath  /usr/lib/ldap
moduleload  back_mdb
loglevel    0
sizelimit   1000
database    mdb
suffix      "{suffix}"
rootdn      "cn=admin,{suffix}"
directory   {db}
maxsize     268435456
access to * by * read
"""


def pdu(msg_id: int, op_name: str, request: Any, controls: Any = None) -> bytes:
    """One LDAPMessage encoded by ldap3/pyasn1 (an independent encoder), e.g.
    pdu(1, "bindRequest", ldap3.operation.bind.bind_operation(3, ldap3.SIMPLE, dn, password))."""
    msg = LDAPMessage()
    msg["messageID"] = MessageID(msg_id)
    msg["protocolOp"] = ProtocolOp().setComponentByName(op_name, request)
    ctl = build_controls_list(controls)
    if ctl is not None:
        msg["controls"] = ctl
    return bytes(ber_encoder.encode(msg))


def search(mid: int, base: str, flt: str, attrs: list[str] | None = None, scope: str = "SUBTREE",
           size: int = 0, controls: Any = None) -> bytes:
    """A SearchRequest encoded by ldap3 (scope: BASE, LEVEL or SUBTREE)."""
    req = search_operation(base, flt, getattr(ldap3, scope), ldap3.DEREF_NEVER, attrs or [], size, 10,
                           False, True, True)
    return pdu(mid, "searchRequest", req, controls)


def sample_requests(eui: str, serial: str) -> list[bytes]:
    """Valid requests of every kind the server handles (encoded by ldap3), for fuzzing:
    binds, searches with many filters and controls, extended, abandon, compare, updates, unbind."""
    user = f"uid=tester,ou=Users,{SUFFIX}"
    paged = responses.paged_results_control(3, b"")
    bogus = responses.paged_results_control(3, b"no such cookie")
    devices = f"ou=Devices,{SUFFIX}"
    return [
        pdu(1, "bindRequest", bind_operation(3, ldap3.SIMPLE, user, TEST_KEY)),
        pdu(1, "bindRequest", bind_operation(3, ldap3.ANONYMOUS, "", None)),
        pdu(2, "bindRequest", bind_operation(3, ldap3.SIMPLE, user, "wrong password")),
        pdu(2, "bindRequest", bind_operation(3, ldap3.SIMPLE, "uid=test\x00er,ou=Users,o=SMKI", "pw")),
        pdu(3, "bindRequest", bind_operation(3, ldap3.SASL, "", None, "EXTERNAL", b"")),
        pdu(4, "bindRequest", bind_operation(3, ldap3.SASL, "", None, "DIGEST-MD5", b"x")),
        pdu(5, "bindRequest", bind_operation(2, ldap3.SIMPLE, "tester", TEST_KEY)),
        search(6, SUFFIX, "(objectClass=*)", ["*"]),
        search(7, devices, f"(smkiEui64={eui})", ["userCertificate;binary", "smkiStatus"]),
        search(8, SUFFIX, f"(&(objectClass=smkiCertificate)(|(smkiSerial={serial})(!(smkiRole<=3))))"),
        search(9, SUFFIX, "(|(smkiEui64=00-DB*)(cn=*A)(smkiSubject=*TEST*SUPPLIER*01))", ["1.1"]),
        search(10, SUFFIX, "(&(smkiKeyUsage:caseExactMatch:=KA)(ou:dn:=Devices)(smkiNotAfter>=2020010100Z))"),
        search(11, SUFFIX, '(userCertificate={ serialNumber 1234, issuer rdnSequence:"CN=TE,OU=07" })'),
        search(12, devices, "(objectClass=*)", ["smkiSerial"], controls=[(paged.oid, True, paged.value)]),
        search(13, devices, "(objectClass=*)", controls=[(bogus.oid, False, bogus.value)]),
        search(14, devices, "(objectClass=*)", controls=[("1.2.3.4.5", True, b"x")]),
        search(15, SUFFIX, "(smkiKind~=device)", ["+"], size=2),
        search(16, "", "(objectClass=*)", ["+"], scope="BASE"),
        search(17, "cn=Subschema", "(objectClass=subschema)", ["attributeTypes"], scope="BASE"),
        search(18, "smkiEui64=zz,ou=Devices,o=SMKI", "(objectClass=*)", scope="LEVEL"),
        pdu(19, "extendedReq", extended_operation(protocol.STARTTLS_OID)),
        pdu(20, "extendedReq", extended_operation(WHOAMI_OID)),
        pdu(21, "extendedReq", extended_operation("1.2.3.4", b"value")),
        pdu(22, "abandonRequest", abandon_operation(7)),
        pdu(23, "compareRequest", compare_operation(f"ou=CAs,{SUFFIX}", "ou", "CAs", False)),
        pdu(24, "compareRequest", compare_operation(f"smkiEui64={eui},{devices}", "smkiKind", "device",
                                                    False)),
        pdu(25, "modifyRequest", modify_operation(
            f"ou=CAs,{SUFFIX}", {"description": [(ldap3.MODIFY_REPLACE, ["x"])]}, None)),
        pdu(26, "addRequest", add_operation(f"cn=x,{SUFFIX}", {"objectClass": ["top"], "cn": ["x"]}, None)),
        pdu(27, "delRequest", delete_operation(f"ou=CAs,{SUFFIX}")),
        pdu(28, "modDNRequest", modify_dn_operation(f"ou=CAs,{SUFFIX}", "ou=X", True, None)),
        pdu(29, "unbindRequest", unbind_operation()),
    ]


def free_port() -> int:
    return ports.free_port()


class Slapd:
    """A private slapd: its own config, database, pid file and loopback port."""

    def __init__(self, run: Path, schema: Path, ldif: Path, suffix: str = "o=SMKI") -> None:
        self.run = run
        db = run / "db"
        db.mkdir(parents=True)
        self.conf = run / "slapd.conf"
        self.conf.write_text(SLAPD_CONF.format(schema=schema, run=run, db=db, suffix=suffix))
        res = subprocess.run([str(SLAPADD), "-q", "-f", str(self.conf), "-l", str(ldif)],
                             capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"slapadd failed ({res.returncode}): {res.stderr[-4000:]}")
        self.port = free_port()
        self.url = f"ldap://127.0.0.1:{self.port}"
        self.pidfile = run / "slapd.pid"
        # -d 0: stay in the foreground (no daemonising), no debug output
        self.proc = subprocess.Popen([str(SLAPD), "-f", str(self.conf), "-h", f"{self.url}/", "-d", "0"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"slapd exited with {self.proc.returncode}: {err[-4000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5):
                break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("slapd did not start listening within 20 s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop this slapd by its own pid (never by name), then wait for it."""
        pid = self.proc.pid
        if self.pidfile.exists():
            with contextlib.suppress(ValueError):
                pid = int(self.pidfile.read_text().split()[0])
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@dataclass
class Answer:
    """What one ldapsearch saw: the result code, entries (DN as sent -> attribute
    description as sent -> values), and the matched DN if the server gave one."""

    code: int
    entries: dict[str, dict[str, list[bytes]]] = field(default_factory=dict)
    matched: str | None = None
    stderr: str = ""


def parse_ldif(text: bytes) -> dict[str, dict[str, list[bytes]]]:
    """ldapsearch -LLL -o ldif-wrap=no output: 'name: value', 'name:: base64', blank lines
    between entries; typesOnly (-A) prints 'name:' alone."""
    entries: dict[str, dict[str, list[bytes]]] = {}
    current: dict[str, list[bytes]] | None = None
    for raw in text.split(b"\n"):
        line = raw.rstrip(b"\r")
        if not line:
            current = None
            continue
        if line.startswith(b"#"):
            continue
        name, sep, rest = line.partition(b":")
        assert sep, f"not an LDIF line: {line!r}"
        if rest.startswith(b":"):
            value = base64.b64decode(rest[1:].strip())
        elif rest.startswith(b"<"):
            raise AssertionError(f"unexpected URL value: {line!r}")
        else:
            value = rest[1:] if rest.startswith(b" ") else rest
        key = name.decode()
        if key == "dn":
            current = entries.setdefault(value.decode(), {})
            continue
        assert current is not None, f"attribute before dn: {line!r}"
        values = current.setdefault(key, [])
        if rest:  # typesOnly prints the name alone
            values.append(value)
    return entries


async def ldapsearch(url: str, base: str, scope: str, flt: str, attrs: list[str], *,
                     size_limit: int = 0, types_only: bool = False,
                     extra: list[str] | None = None, timeout: float = 30) -> Answer:
    """Run OpenLDAP's ldapsearch (anonymous simple bind) without blocking the event loop."""
    args = [LDAPSEARCH, "-x", "-LLL", "-o", "ldif-wrap=no", "-o", "nettimeout=10", "-H", url,
            "-b", base, "-s", scope, "-z", str(size_limit), *(extra or [])]
    if types_only:
        args.append("-A")
    args += [flt, *attrs]
    code, out, err = await run_process(*args, timeout=timeout, env={**os.environ, "LDAPNOINIT": "1"})
    text = err.decode(errors="replace")
    matched = None
    for line in text.splitlines():
        if line.strip().startswith("Matched DN:"):
            matched = line.split(":", 1)[1].strip()
    return Answer(code, parse_ldif(out), matched, text)


def split_frames(data: bytes) -> tuple[list[bytes], bytes]:
    """LDAPMessage frames by their BER header (a small framer of the test's own), and the rest."""
    frames = []
    pos = 0
    while pos + 2 <= len(data):
        assert data[pos] == 0x30, f"response does not start with a SEQUENCE: {data[pos:pos + 16]!r}"
        n, hdr = data[pos + 1], 2
        if n & 0x80:
            k = n & 0x7F
            if pos + 2 + k > len(data):
                break
            n, hdr = int.from_bytes(data[pos + 2:pos + 2 + k], "big"), 2 + k
        if pos + hdr + n > len(data):
            break
        frames.append(data[pos:pos + hdr + n])
        pos += hdr + n
    return frames, data[pos:]


def parse_batch(text: bytes) -> list[Answer]:
    """The output of `ldapsearch -c -f FILE` (extended LDIF): one Answer per filter line, in
    order. Each search opens with a "# filter:" comment; its entries are LDIF; its "# search
    result" block gives the code ("result: 32 No such object") and the matchedDN (a notice of
    disconnection's block its code). A filter ldapsearch could not send has no such block:
    code -1."""
    answers = []
    for section in text.split(b"\n# filter:")[1:]:
        body, found, result = section.partition(b"\n# search result\n")
        if not found:  # a notice of disconnection instead: its result code
            body, found, result = section.partition(b"\n# extended result response\n")
        answer = Answer(-1, parse_ldif(body.partition(b"\n")[2]))
        for line in result.split(b"\n"):
            name, _, value = line.partition(b": ")
            if name == b"result":
                answer.code = int(value.split()[0])
            elif name == b"matchedDN":
                answer.matched = value.decode()
        answers.append(answer)
    return answers


async def ldapsearch_batch(url: str, base: str, scope: str, filters: list[str], attrs: list[str], *,
                           size_limit: int = 0, types_only: bool = False,
                           timeout: float = 60) -> list[Answer]:
    """Many searches, one per filter, over one connection: `ldapsearch -f` (OpenLDAP's own
    filter parser and encoder), continuing past errors (-c)."""
    args = [LDAPSEARCH, "-x", "-c", "-o", "ldif-wrap=no", "-o", "nettimeout=10", "-H", url,
            "-b", base, "-s", scope, "-z", str(size_limit), "-f", "-"]
    if types_only:
        args.append("-A")
    # the pattern must start with "(" to be taken for one; each line fills it without its own
    # outer parentheses, so the filter sent is the filter given
    args += ["(%s)", *attrs]
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "LDAPNOINIT": "1"})
    try:
        out, err = await asyncio.wait_for(proc.communicate(
            "".join(f[1:-1] + "\n" for f in filters).encode()),
                                          timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    answers = parse_batch(out)
    assert len(answers) == len(filters), (len(answers), len(filters), err.decode()[-2000:])
    return answers
