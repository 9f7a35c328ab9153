#!/usr/bin/env python3
"""What Python itself can do on this machine today: the ceiling under our read path.

Bare responders, each one process pinned to CPU 0 like the server in the harness, the
load generators pinned to CPU 1 (the harness's own wrk and C LDAP engine):

  http       aiohttp + uvloop, one route returning a fixed 505-byte body with the headers a
             certificate download carries (what `GET /certificates/{serial}` costs without any
             lookup, CPM bookkeeping or access check);
  httptools  the same answer (same body, same headers, Date and Server included) from an
             asyncio.Protocol that parses with httptools (llhttp, what uvicorn uses) on uvloop:
             what the HTTP library itself costs, against aiohttp's (the listeners' fast front,
             listeners/http/front.py, is built on this);
  ldap  asyncio + uvloop protocol that answers every LDAPMessage with one fixed entry and a
        SearchResultDone, echoing the message id (what an LDAP search costs without decoding
        the request, a lookup or encoding the entry).

  bench/bare_responders.py --duration 10 --conns 1,64      # prints a Markdown table and JSON
  bench/bare_responders.py --kinds http,httptools --port-base 18090 --rounds 3   # HTTP only

Needs wrk and the shared harness's wrk script (../shared/bench/wrk); the LDAP responder also
needs the harness installed (../shared/bench/run_anchors.sh once: the C LDAP load generator in
$BENCH_WORK/bin, /tmp/benchvenv) and a dataset for the LDAP requests ($BENCH_WORK/data from a
harness run). With --rounds N each cell is run N times, the responders alternating, and the
median is reported (the machine is shared: compare side by side only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
HARNESS = HERE.parent.parent / "shared" / "bench"
BODY = os.urandom(505)
PORTS = {"http": 8099, "httptools": 8098, "ldap": 3899}
HEADERS = {"Content-Type": "application/pkix-cert", "Cache-Control": "public, max-age=1",
           "ETag": '"' + "ab" * 32 + '"', "Last-Modified": "Sat, 05 Dec 2026 05:00:00 GMT"}


def serve_http(port: int) -> None:
    import uvloop
    from aiohttp import web

    async def handler(_request: web.Request) -> web.Response:
        return web.Response(body=BODY, headers=HEADERS)

    app = web.Application()
    app.router.add_get("/certificates/{serial}", handler)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def serve_httptools(port: int) -> None:
    """The same answer as `serve_http`, byte for byte but for the Date, from httptools."""
    import asyncio
    import time
    from email.utils import formatdate

    import httptools
    import uvloop
    from aiohttp.http import SERVER_SOFTWARE

    head = ("HTTP/1.1 200 OK\r\n" + "".join(f"{k}: {v}\r\n" for k, v in HEADERS.items())
            + f"Content-Length: {len(BODY)}\r\n").encode()
    tail = f"Server: {SERVER_SOFTWARE}\r\n\r\n".encode()
    date = [0, b""]

    def date_line() -> bytes:
        now = int(time.time())
        if now != date[0]:
            date[0], date[1] = now, f"Date: {formatdate(now, usegmt=True)}\r\n".encode()
        return date[1]  # type: ignore[return-value]

    class Proto(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = transport
            self.p = httptools.HttpRequestParser(self)
            self.url = b""

        def on_url(self, url: bytes) -> None:
            self.url = url

        def on_message_complete(self) -> None:
            if not self.url.startswith(b"/certificates/"):
                self.t.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")  # type: ignore[attr-defined]
                return
            self.t.write(head + date_line() + tail + BODY)  # type: ignore[attr-defined]
            if not self.p.should_keep_alive():
                self.t.close()

        def data_received(self, data: bytes) -> None:
            try:
                self.p.feed_data(data)
            except httptools.HttpParserError:
                self.t.close()

    uvloop.install()

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Proto, "127.0.0.1", port)
        await server.serve_forever()

    asyncio.run(main())


def _len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(b)]) + b


def serve_ldap(port: int) -> None:
    import asyncio

    import uvloop

    dn = b"smkiSerial=00,smkiEui64=00-DB-12-00-00-00-00-00,ou=Devices,o=SMKI"
    def tlv(tag: int, body: bytes) -> bytes:
        return bytes([tag]) + _len(len(body)) + body

    vals = tlv(0x31, tlv(0x04, BODY))
    attr = tlv(0x30, tlv(0x04, b"userCertificate;binary") + vals)
    attrs = tlv(0x30, attr)
    entry_body = b"\x04" + _len(len(dn)) + dn + attrs
    entry = b"\x64" + _len(len(entry_body)) + entry_body
    done = b"\x65\x07\x0a\x01\x00\x04\x00\x04\x00"

    def message(mid: bytes, op: bytes) -> bytes:
        body = b"\x02" + _len(len(mid)) + mid + op
        return b"\x30" + _len(len(body)) + body

    class Proto(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = transport
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            buf = self.buf + data
            out = []
            while len(buf) >= 2:
                n = buf[1]
                pos = 2
                if n & 0x80:
                    k = n & 0x7F
                    if len(buf) < 2 + k:
                        break
                    n = int.from_bytes(buf[2:2 + k], "big")
                    pos = 2 + k
                if len(buf) < pos + n:
                    break
                frame = buf[pos:pos + n]
                buf = buf[pos + n:]
                if frame[:1] != b"\x02":
                    continue
                mid = frame[2:2 + frame[1]]
                op = frame[2 + frame[1]:3 + frame[1]]
                if op == b"\x63":  # SearchRequest
                    out.append(message(mid, entry))
                    out.append(message(mid, done))
                elif op == b"\x60":  # BindRequest: success
                    out.append(message(mid, b"\x61\x07\x0a\x01\x00\x04\x00\x04\x00"))
            self.buf = buf
            if out:
                self.t.write(b"".join(out))  # type: ignore[attr-defined]

    uvloop.install()

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Proto, "127.0.0.1", port)
        await server.serve_forever()

    asyncio.run(main())


def wrk_http(port: int, conns: int, duration: float, paths: Path) -> tuple[int, float]:
    """(requests/s, p99 µs) of one wrk run pinned to CPU 1."""
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{int(duration)}s", "-s",
         str(HARNESS / "wrk" / "paths.lua"), f"http://127.0.0.1:{port}", "--", str(paths)],
        capture_output=True, text=True).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("JSON ")), None)
    if line is None:
        raise SystemExit(f"wrk gave no result:\n{out}")
    res = json.loads(line[5:])
    return round(res["requests"] / (res["duration_us"] / 1e6)), res["lat_us"]["p99"]


NAMES = {"http": "bare aiohttp+uvloop GET", "httptools": "bare httptools+uvloop GET",
         "ldap": "bare asyncio+uvloop LDAP (fixed entry)"}


def run(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--conns", default="1,64")
    ap.add_argument("--kinds", default="http,httptools,ldap",
                    help="responders to measure (http: aiohttp, httptools, ldap)")
    ap.add_argument("--port-base", type=int, default=0,
                    help="listen on PORT_BASE, +1, +2 (http, httptools, ldap) instead of the"
                         " defaults 8099, 8098, 3899")
    ap.add_argument("--rounds", type=int, default=1, help="runs per cell; the median is shown")
    ap.add_argument("--serve", choices=tuple(PORTS), help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.serve:
        {"http": serve_http, "httptools": serve_httptools, "ldap": serve_ldap}[a.serve](a.port)
        return 0
    kinds = [k for k in a.kinds.split(",") if k]
    ports = ({k: a.port_base + i for i, k in enumerate(PORTS)} if a.port_base else PORTS)
    work = Path(os.environ.get("BENCH_WORK", "/tmp/smki-bench"))
    py = os.environ.get("BENCH_PY", "/tmp/benchvenv/bin/python")
    procs = [subprocess.Popen(["taskset", "-c", "0", sys.executable, __file__, "--serve", kind,
                               "--port", str(ports[kind])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for kind in kinds]
    rows = []
    try:
        subprocess.run([str(HARNESS / "wait_port.sh"), *(str(ports[k]) for k in kinds)],
                       check=True)
        tmp = Path(tempfile.mkdtemp(prefix="bare-"))
        paths = tmp / "bare.paths"
        paths.write_text("".join(f"/certificates/{i:032X}\n" for i in range(1000)))
        for c in [int(x) for x in a.conns.split(",")]:
            runs: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
            for _ in range(a.rounds):  # alternating, so that a busy moment hits all of them
                for kind in kinds:
                    if kind == "ldap":
                        out = subprocess.run(
                            [py, str(HARNESS / "ldapload.py"), "--data", str(work / "data"),
                             "--port", str(ports["ldap"]), "--workload", "device", "--cpu", "1",
                             "-c", str(c), "-t", str(a.duration)], capture_output=True,
                            text=True, cwd=HARNESS, env={**os.environ, "BENCH_WORK": str(work)}
                        ).stdout
                        res = json.loads(out.strip().splitlines()[-1])
                        runs[kind].append((res["ops_per_s"], res["lat_us"]["p99"]))
                    else:
                        runs[kind].append(wrk_http(ports[kind], c, a.duration, paths))
            for kind in kinds:
                ops = statistics.median(r[0] for r in runs[kind])
                p99 = statistics.median(r[1] for r in runs[kind])
                rows.append({"what": NAMES[kind], "conns": c, "ops_per_s": round(ops),
                             "p99_us": p99, "runs": [round(r[0]) for r in runs[kind]]})
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    print("| responder | conns | ops/s (median) | p99 µs | runs |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['conns']} | {r['ops_per_s']:,} | {r['p99_us']:,.0f} |"
              f" {', '.join(f'{x:,}' for x in r['runs'])} |")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
