"""The DCC-side lodging client (`smki-repository lodge`): mutual TLS, one request per
certificate batch / CRL / document, a progress line on large batches.

Files are classified by content: a PEM `X509 CRL` block or a `.crl`/`.arl` file is a CRL;
PEM `CERTIFICATE` blocks or DER certificates (`.der`, `.cer`, `.crt`, `.pem`) are
certificates; anything else is a document named after its file name without extension.
"""

from __future__ import annotations

import http.client
import json
import mimetypes
import ssl
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from repository_server import __version__
from repository_server.pki.errors import ParseError
from repository_server.pki.pem import load_pem_or_der_certificates

CERT_SUFFIXES = {".pem", ".der", ".cer", ".crt"}
CRL_SUFFIXES = {".crl", ".arl"}
USER_AGENT = f"smki-repository-lodge/{__version__}"  # in the server's access log


class TlsRefused(Exception):
    """The TLS handshake with the lodging server failed: the message says what was wrong
    and which option to check."""


# The TLS alert the server sent (OpenSSL's reason) -> what it means for us
_SERVER_ALERTS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "no client certificate was sent",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "no client certificate was sent, or no cipher in common",
    "TLSV1_ALERT_UNKNOWN_CA": "unknown CA (not issued by the DCC client CA the server trusts,"
                              " or self-signed)",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the certificate has expired or is not yet valid",
    "SSLV3_ALERT_BAD_CERTIFICATE": "bad certificate",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "unsupported certificate (key usage or type)",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "certificate not accepted",
    "TLSV1_ALERT_DECRYPT_ERROR": "the certificate and the key do not match",
}


def explain_tls_error(exc: ssl.SSLError, url: str) -> str:
    """One line: what went wrong in the handshake and which option to check."""
    reason = exc.reason or ""
    if reason in _SERVER_ALERTS:
        return (f"the server refused our client certificate: {_SERVER_ALERTS[reason]};"
                " check --cert/--key")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"the server's certificate at {url} is not trusted ({exc.verify_message},"
                " certificate verify failed): check --ca (the CA of the server's TLS"
                " certificate) and the host name in --url")
    if reason == "TLSV1_ALERT_PROTOCOL_VERSION" or "VERSION" in reason:
        return f"no TLS version in common with {url} (the server needs TLS 1.2 or later)"
    return f"TLS handshake with {url} failed: {reason or exc}"


@dataclass
class Reply:
    status: int
    body: dict[str, Any]


class LodgeClient:
    def __init__(self, url: str, cert: str, key: str, ca: str | None, *,
                 on_behalf_of: str | None = None, timeout: float = 600) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "https" or not parsed.hostname:
            raise ValueError(f"--url must be https://HOST:PORT (got {url!r})")
        self.url = url
        self.host = parsed.hostname
        self.port = parsed.port or 8444
        self.ctx = ssl.create_default_context(cafile=ca)
        self.ctx.load_cert_chain(cert, key)
        self.on_behalf_of = on_behalf_of
        self.timeout = timeout
        self._conn: http.client.HTTPSConnection | None = None

    def _connection(self) -> http.client.HTTPSConnection:
        if self._conn is None:
            self._conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx,
                                                     timeout=self.timeout)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(self, method: str, path: str, body: bytes,
                content_type: str = "application/octet-stream") -> Reply:
        headers = {"Content-Type": content_type, "Content-Length": str(len(body)),
                   "User-Agent": USER_AGENT}
        if self.on_behalf_of:
            headers["X-On-Behalf-Of"] = self.on_behalf_of
        for attempt in (1, 2):  # one retry on a dropped keep-alive connection
            conn = self._connection()
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                break
            except ssl.SSLError as exc:
                self.close()
                raise TlsRefused(explain_tls_error(exc, self.url)) from exc
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
                self.close()
                if attempt == 2:
                    raise
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            data = {"reason": raw[:200].decode(errors="replace")}
        return Reply(resp.status, data)

    def certificates(self, body: bytes, *, trust_anchor: bool = False, status: str | None = None,
                     manufacturing_flag: bool | None = None) -> Reply:
        query: dict[str, str] = {}
        if trust_anchor:
            query["trust_anchor"] = "true"
        if status:
            query["status"] = status
        if manufacturing_flag is not None:
            query["manufacturing_flag"] = "true" if manufacturing_flag else "false"
        path = "/lodge/certificates" + ("?" + urllib.parse.urlencode(query) if query else "")
        return self.request("POST", path, body, "application/x-pem-file")

    def crl(self, body: bytes) -> Reply:
        return self.request("POST", "/lodge/crls", body, "application/pkix-crl")

    def document(self, name: str, body: bytes, content_type: str) -> Reply:
        return self.request("PUT", "/lodge/documents/" + urllib.parse.quote(name), body,
                            content_type)

    def status(self, serial: str, fields: dict[str, Any]) -> Reply:
        return self.request("POST", f"/lodge/certificates/{serial}/status",
                            json.dumps(fields).encode(), "application/json")


def classify(path: Path, data: bytes) -> str:
    suffix = path.suffix.lower()
    if suffix in CRL_SUFFIXES or b"-----BEGIN X509 CRL-----" in data:
        return "crl"
    if b"-----BEGIN CERTIFICATE-----" in data:
        return "certificates"
    if suffix in CERT_SUFFIXES:
        return "certificates"
    return "document"


def pem_chunks(ders: list[bytes], size: int) -> Iterator[bytes]:
    import base64
    import textwrap

    for start in range(0, len(ders), size):
        parts = []
        for der in ders[start:start + size]:
            b64 = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
            parts.append(f"-----BEGIN CERTIFICATE-----\n{b64}\n-----END CERTIFICATE-----\n")
        yield "".join(parts).encode()


class Progress:
    """A one-line progress display on a terminal; otherwise (a log, a pipe) a plain line at
    the start, every `every` seconds and at the end. Both show the rate and, while going,
    the time left. The terminal line is rewritten in place (`\\r`) and never wider than the
    terminal (`columns`, default its width), and the counts stay within 0..total."""

    def __init__(self, stream: TextIO = sys.stderr, every: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, columns: int | None = None) -> None:
        import shutil

        self.stream = stream
        self.tty = stream.isatty()
        self.every = every
        self.clock = clock
        self.columns = columns or shutil.get_terminal_size().columns
        self._started: dict[str, tuple[float, int]] = {}
        self._last_line = 0.0

    def _rate(self, label: str, done: int, total: int, now: float) -> str:
        t0, d0 = self._started.setdefault(label, (now, done))
        elapsed = now - t0
        if elapsed < 1 or done <= d0:
            return ""
        rate = (done - d0) / elapsed
        text = f" {rate:,.0f}/s, {elapsed:,.0f} s"
        if done < total:
            text += f", about {(total - done) / rate:,.0f} s left"
        return text

    def __call__(self, label: str, done: int, total: int) -> None:
        now = self.clock()
        total = max(0, total)
        done = max(0, min(done, total))
        rate = self._rate(label, done, total, now)
        if self.tty:
            width = max(0, min(30, self.columns // 4))
            filled = int(width * done / total) if total else width
            line = f"{label}: [{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,}{rate}"
            self.stream.write(f"\r{line[:max(1, self.columns - 1)]}\033[K")
            if done >= total:
                self.stream.write("\n")
            self.stream.flush()
        elif done >= total or done == 0 or now - self._last_line >= self.every:
            self._last_line = now
            self.stream.write(f"{label}: {done:,}/{total:,}{rate}\n")
            self.stream.flush()


def lodge_files(client: LodgeClient, files: list[Path], *, name: str | None = None,
                content_type: str | None = None,
                trust_anchor: bool = False, status: str | None = None,
                manufacturing_flag: bool | None = None, batch_size: int = 50_000,
                out: Callable[[str], None] = print,
                progress: Callable[[str, int, int], None] | None = None) -> int:
    """Lodge each file; return the number of refused requests."""
    failures = 0
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as exc:
            out(f"{path}: cannot read: {exc}")
            failures += 1
            continue
        kind = classify(path, data)
        if kind == "crl":
            reply = client.crl(data)
            failures += _report(out, path, reply, lambda b: f"{b.get('kind', 'crl').upper()}"
                                f" number {b.get('crl_number')} {b.get('outcome')}")
        elif kind == "certificates":
            try:
                ders = load_pem_or_der_certificates(data)
            except ParseError as exc:
                out(f"{path}: refused locally: {exc}")
                failures += 1
                continue
            done = 0
            if progress and len(ders) > batch_size // 10:
                progress(path.name, 0, len(ders))
            for chunk in pem_chunks(ders, batch_size):
                reply = client.certificates(chunk, trust_anchor=trust_anchor, status=status,
                                            manufacturing_flag=manufacturing_flag)
                n = chunk.count(b"-----BEGIN CERTIFICATE-----")
                done += n
                if progress and len(ders) > batch_size // 10:
                    progress(path.name, done, len(ders))
                failures += _report(out, path, reply, lambda b: f"{b.get('stored', 0)} stored,"
                                    f" {b.get('identical', 0)} identical")
        else:
            doc_name = name or path.stem
            ctype = (content_type or mimetypes.guess_type(path.name)[0]
                     or "application/octet-stream")
            reply = client.document(doc_name, data, ctype)
            failures += _report(out, path, reply, _document_summary(ctype))
    return failures


def _document_summary(sent: str) -> Callable[[dict[str, Any]], str]:
    """A lodged document's line; it says so when the server stored another type than the one
    sent (not on its allow-list)."""

    def summary(b: dict[str, Any]) -> str:
        line = f"document {b.get('name')} version {b.get('version')} {b.get('outcome')}"
        stored = str(b.get("content_type", ""))
        if sent.partition(";")[0].strip().lower() == stored.partition(";")[0]:
            return line
        return (f"{line} as {stored} (sent as {sent}: not an allowed document type, so it is"
                " served as a download of that type)")

    return summary


def _report(out: Callable[[str], None], path: Path, reply: Reply,
            summary: Callable[[dict[str, Any]], str]) -> int:
    if reply.status == 200:
        out(f"{path}: {summary(reply.body)}")
        return 0
    out(f"{path}: refused ({reply.status}): {reply.body.get('reason', '')}")
    for item in reply.body.get("results", [])[:10]:
        if item.get("outcome") in ("refused", "conflict"):
            out(f"  item {item.get('index')} serial {item.get('serial', '?')}:"
                f" {item.get('reason')}")
    return 1


def lodge_manifest(client: Any, pki_dir: Path, manifest: dict[str, Any],
                   out: Any = print) -> int:
    """Lodge a test PKI through the lodging API, in a safe order; return refusals."""
    objects = manifest["objects"]
    failures = 0

    def files(kind: str) -> list[Path]:
        if kind == "device":
            return [pki_dir / p for p in manifest["devices"]["bundles"]]
        seen: dict[str, None] = {}
        for obj in objects:
            if obj["kind"] == kind:
                seen.setdefault(obj["path"], None)
        return [pki_dir / p for p in seen]

    failures += lodge_files(client, files("root"), trust_anchor=True, out=out)
    for kind in ("ca", "organisation", "device", "crl", "arl"):
        failures += lodge_files(client, files(kind), out=out, progress=Progress())
    for obj in objects:
        if obj["kind"] == "document":
            failures += lodge_files(client, [pki_dir / obj["path"]], name=obj.get("name"),
                                    content_type=obj.get("content_type"), out=out)
    return failures
