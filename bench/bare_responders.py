#!/usr/bin/env python3
"""What Python itself can do on this machine today: the ceiling under our read path.

Two bare responders, each one process pinned to CPU 0 like the server in the harness, the
load generators pinned to CPU 1 (the harness's own wrk and C LDAP engine):

  http  aiohttp + uvloop, one route returning a fixed 505-byte body with the headers a
        certificate download carries (what `GET /certificates/{serial}` costs without any
        lookup, CPM bookkeeping or access check);
  ldap  asyncio + uvloop protocol that answers every LDAPMessage with one fixed entry and a
        SearchResultDone, echoing the message id (what an LDAP search costs without decoding
        the request, a lookup or encoding the entry).

  bench/bare_responders.py --duration 10 --conns 1,64      # prints a Markdown table and JSON

Needs the shared harness installed (../shared/bench/run_anchors.sh once: wrk, the C LDAP
load generator in $BENCH_WORK/bin, /tmp/benchvenv) and a dataset for the LDAP requests
($BENCH_WORK/data from a harness run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
HARNESS = HERE.parent.parent / "shared" / "bench"
BODY = os.urandom(505)
HTTP_PORT, LDAP_PORT = 8099, 3899


def serve_http() -> None:
    import uvloop
    from aiohttp import web

    headers = {"Content-Type": "application/pkix-cert", "Cache-Control": "public, max-age=1",
               "ETag": '"' + "ab" * 32 + '"', "Last-Modified": "Sat, 05 Dec 2026 05:00:00 GMT"}

    async def handler(_request: web.Request) -> web.Response:
        return web.Response(body=BODY, headers=headers)

    app = web.Application()
    app.router.add_get("/certificates/{serial}", handler)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=HTTP_PORT, access_log=None, print=None)


def _len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(b)]) + b


def serve_ldap() -> None:
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
        server = await asyncio.get_running_loop().create_server(Proto, "127.0.0.1", LDAP_PORT)
        await server.serve_forever()

    asyncio.run(main())


def run(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--conns", default="1,64")
    ap.add_argument("--serve", choices=("http", "ldap"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.serve == "http":
        serve_http()
        return 0
    if a.serve == "ldap":
        serve_ldap()
        return 0
    work = Path(os.environ.get("BENCH_WORK", "/tmp/smki-bench"))
    py = os.environ.get("BENCH_PY", "/tmp/benchvenv/bin/python")
    procs = [subprocess.Popen(["taskset", "-c", "0", sys.executable, __file__, "--serve", kind],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for kind in ("http", "ldap")]
    rows = []
    try:
        for port in (HTTP_PORT, LDAP_PORT):  # until both listen
            subprocess.run([str(HARNESS / "wait_port.sh"), str(port)], check=True)
        paths = work / "bare.paths"
        paths.write_text("".join(f"/certificates/{i:032X}\n" for i in range(1000)))
        for c in [int(x) for x in a.conns.split(",")]:
            out = subprocess.run(
                ["taskset", "-c", "1", "wrk", "-t1", f"-c{c}", f"-d{int(a.duration)}s", "-s",
                 str(HARNESS / "wrk" / "paths.lua"), f"http://127.0.0.1:{HTTP_PORT}", "--",
                 str(paths)], capture_output=True, text=True).stdout
            line = next((ln for ln in out.splitlines() if ln.startswith("JSON ")), None)
            if line is None:
                raise SystemExit(f"wrk gave no result:\n{out}")
            res = json.loads(line[5:])
            rows.append({"what": "bare aiohttp+uvloop GET", "conns": c,
                         "ops_per_s": round(res["requests"] / (res["duration_us"] / 1e6)),
                         "p99_us": res["lat_us"]["p99"]})
            out = subprocess.run(
                [py, str(HARNESS / "ldapload.py"), "--data", str(work / "data"), "--port",
                 str(LDAP_PORT), "--workload", "device", "--cpu", "1", "-c", str(c), "-t",
                 str(a.duration)], capture_output=True, text=True, cwd=HARNESS,
                env={**os.environ, "BENCH_WORK": str(work)}).stdout
            res = json.loads(out.strip().splitlines()[-1])
            rows.append({"what": "bare asyncio+uvloop LDAP (fixed entry)", "conns": c,
                         "ops_per_s": round(res["ops_per_s"]), "p99_us": res["lat_us"]["p99"]})
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    print("| responder | conns | ops/s | p99 µs |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['conns']} | {r['ops_per_s']:,} | {r['p99_us']:,.0f} |")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
