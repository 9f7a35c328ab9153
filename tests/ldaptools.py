"""Test helpers for the LDAP tests: a private OpenLDAP slapd loaded from our export, and
`ldapsearch` output (LDIF) read back into comparable form. No mocks: real processes."""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .conftest import run_process

SLAPD = Path("/usr/sbin/slapd")
SLAPADD = Path("/usr/sbin/slapadd")
LDAPSEARCH = "ldapsearch"

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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
