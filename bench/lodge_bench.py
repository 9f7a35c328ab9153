#!/usr/bin/env python3
"""Write-side benchmark of smki-repository: test PKI generation, lodging through the real
mutual-TLS lodging API, and bulk import. Run it with the project's interpreter (it imports
`repository_server` for the lodging client):

    .venv/bin/python bench/lodge_bench.py                      # 25,000 devices, 1 repetition
    .venv/bin/python bench/lodge_bench.py --reps 3 --json bench/lodge-results.json
    .venv/bin/python bench/lodge_bench.py --devices 2000 --reps 1   # smoke test (~1 min)

Each repetition, in a fresh work folder:

 (a) generation: `smki-repository testpki --devices N --out DIR` (2 certificates a device, plus
     5 CAs and --organisations organisation certificates). Rate = certificates / seconds, from
     the command's own report (its `generate()` call) and from the process's wall time.
 (b) lodging: `smki-repository serve` (subprocess, fresh --data-dir, its own embedded
     PostgreSQL, lodging listener on a free loopback port with the generated server TLS
     certificate, DCC client CA and DCC subject); the roots (as trust anchors) and issuing CAs
     are lodged first (cli.lodge_client.lodge_manifest), then each device bundle (devices/devices-NNNN.pem,
     up to 50,000 certificates, the lodging batch limit) is POSTed to /lodge/certificates with
     LodgeClient.certificates(body). Rate = device certificates / wall time from the start of
     the request to the acknowledged (HTTP 200, every certificate stored) response, summed over
     the bundles. The organisation certificates, CRL, ARLs and documents are lodged after
     that, untimed, to check that the whole PKI is accepted.
 (c) bulk import: `smki-repository import DIR` of the same PKI's certificate and CRL files
     (ca/*.der, organisations/*.der, devices/*.pem, crl/*; the private keys, TLS and DCC client
     certificates and documents in the PKI folder are not part of the PKI) into another fresh
     data dir. Rate from the command's own report line (certificates/s over its import work)
     and from the process's wall time (which adds interpreter start, initdb, PostgreSQL start
     and stop).

The summary is the median over the repetitions (with min-max); --json writes every figure.
Nothing is pinned (the machine's cores are shared by the client, the server, its parse
workers and PostgreSQL): these are whole-machine figures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from repository_server.cli.lodge_client import LodgeClient, lodge_manifest  # noqa: E402

CERT_KINDS = ("root", "ca", "organisation", "device")
BEGIN = b"-----BEGIN CERTIFICATE-----"
TESTPKI_LINE = re.compile(
    r"wrote ([\d,]+) certificates to .* in ([\d.]+) s \(([\d,]+) certificates/s\)"
)
IMPORT_LINE = re.compile(
    r"imported ([\d,]+) new certificates \(([\d,]+) already present, ([\d,]+) with "
    r"unverified issuer\), (\d+) CRL/ARL, in ([\d.]+) s \(([\d,]+) certificates/s\);"
    r" (\d+) files skipped, (\d+) refused"
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def num(text: str) -> float:
    return float(text.replace(",", ""))


# -- environment --------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        nproc = int(subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip())
    except (OSError, ValueError):
        nproc = os.cpu_count() or 0
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": nproc,
        "cpu_model": model,
        "python": platform.python_version(),
        "python_impl": platform.python_implementation(),
        "kernel": platform.release(),
        "loadavg": os.getloadavg()[0],
    }


def child_env() -> dict[str, str]:
    # the server takes every SMKI_* variable as a setting (and refuses unknown ones)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMKI_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


# -- (a) generation -------------------------------------------------------------------------
def generate(
    cli: list[str], out: Path, devices: int, organisations: int, workers: int, seed: int | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    cmd = [
        *cli,
        "testpki",
        "--devices",
        str(devices),
        "--organisations",
        str(organisations),
        "--out",
        str(out),
    ]
    if workers:
        cmd += ["--workers", str(workers)]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    log("generate: " + " ".join(cmd))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(
            f"testpki failed (rc={p.returncode}):\n{p.stderr[-3000:]}{p.stdout[-1000:]}"
        )
    m = TESTPKI_LINE.search(p.stdout)
    manifest: dict[str, Any] = json.loads((out / "manifest.json").read_text())
    certs = manifest["counts"]["device_certificates"] + sum(
        1 for o in manifest["objects"] if o["kind"] in CERT_KINDS)
    res = {
        "certificates": certs,
        "device_certificates": manifest["counts"]["device_certificates"],
        "wall_s": round(wall, 3),
        "wall_rate": round(certs / wall, 1),
        # the command prints its seconds to 0.1 s: derive them from its rate instead
        "own_s": round(certs / num(m.group(3)), 3) if m and num(m.group(3)) else None,
        "own_rate": num(m.group(3)) if m else None,
        "devices_s": manifest["timings"].get("devices_seconds"),
        "device_rate": manifest["timings"].get("device_certificates_per_second"),
        "output": p.stdout.strip().splitlines()[-1:],
    }
    log(
        f"generate: {certs:,} certificates, own {res['own_rate']:,} certs/s, "
        f"wall {res['wall_rate']:,} certs/s"
    )
    return manifest, res


# -- (b) lodging ----------------------------------------------------------------------------
class Server:
    """`smki-repository serve` with the lodging listener, in a fresh data dir."""

    def __init__(
        self, cli: list[str], pki: Path, manifest: dict[str, Any], work: Path, parse_workers: int
    ) -> None:
        self.work = work
        self.data_dir = work / "data"
        self.pidfile = work / "server.pid"
        self.logfile = work / "server.log"
        self.http_port, self.lodge_port = free_port(), free_port()
        while self.lodge_port == self.http_port:
            self.lodge_port = free_port()
        tls, dcc = manifest["tls"], manifest["dcc_client"]
        cfg = work / "lodge-bench.toml"
        work.mkdir(parents=True, exist_ok=True)
        cfg.write_text(
            "# written by bench/lodge_bench.py\n"
            "[listeners]\n"
            f"http = {toml_str(f'127.0.0.1:{self.http_port}')}\n"
            'https = ""\n'
            f"lodge = {toml_str(f'127.0.0.1:{self.lodge_port}')}\n"
            'ldap = ""\nldaps = ""\n'
            "[tls]\n"
            f"cert = {toml_str(str(pki / tls['cert']))}\n"
            f"key = {toml_str(str(pki / tls['key']))}\n"
            "[lodge]\n"
            f"client_ca = {toml_str(str(pki / dcc['ca']))}\n"
            f"client_subject = {toml_str(dcc['subject'])}\n"
            f"parse_workers = {parse_workers}\n"
            "[log]\naccess_log = false\n"
        )
        self.cmd = [
            *cli,
            "serve",
            "--config",
            str(cfg),
            "--data-dir",
            str(self.data_dir),
            "--pid-file",
            str(self.pidfile),
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180) -> float:
        log("serve: " + " ".join(self.cmd))
        t0 = time.perf_counter()
        self.logfh = open(self.logfile, "wb")  # noqa: SIM115 - the server's stdout, closed in stop()
        self.proc = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=self.logfh,
            stderr=subprocess.STDOUT,
            env=child_env(),
        )
        # the pid file is written once every listener is bound
        while not self.pidfile.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited (rc={self.proc.returncode}):\n{self.tail()}")
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"the server did not start in {timeout} s:\n{self.tail()}")
            time.sleep(0.1)
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/readyz", timeout=10) as r:
            if r.status != 200:
                raise RuntimeError(f"/readyz: {r.status}")
        return time.perf_counter() - t0

    def tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "".join(self.logfile.read_text(errors="replace").splitlines(True)[-n:])
        return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                log(f"server {self.proc.pid} did not stop in 60 s: SIGKILL")
                self.proc.kill()
                self.proc.wait()
        self.logfh.close()
        self.proc = None


def connect(
    server: Server, pki: Path, manifest: dict[str, Any], tries: int = 5
) -> tuple[LodgeClient, int]:
    """A LodgeClient with its keep-alive connection open (GET /lodge/whoami). The lodging
    listener sometimes loses a new connection's ClientHello (under uvloop: the server's
    _TlsGate.data_received drops it; the handshake then times out after 10 s and the client
    sees SSLEOFError): retried here, counted in the results, and never inside a timed request."""
    dcc = manifest["dcc_client"]
    failures = 0
    for attempt in range(1, tries + 1):
        client = LodgeClient(
            f"https://127.0.0.1:{server.lodge_port}",
            str(pki / dcc["cert"]),
            str(pki / dcc["key"]),
            str(pki / manifest["tls"]["ca"]),
            timeout=1800,
        )
        t0 = time.perf_counter()
        try:
            reply = client.request("GET", "/lodge/whoami", b"")
        except (ssl.SSLError, OSError) as exc:
            client.close()
            failures += 1
            log(
                f"lodge: connection {attempt} failed after {time.perf_counter() - t0:.1f} s: "
                f"{type(exc).__name__}: {exc}"
            )
            continue
        if reply.status != 200:
            client.close()
            raise RuntimeError(
                f"GET /lodge/whoami: HTTP {reply.status} {reply.body}\n{server.tail()}"
            )
        return client, failures
    raise RuntimeError(f"no lodging connection after {tries} attempts\n{server.tail()}")


def subset(manifest: dict[str, Any], kinds: tuple[str, ...]) -> dict[str, Any]:
    return {**manifest, "objects": [o for o in manifest["objects"] if o["kind"] in kinds]}


def lodge(
    cli: list[str], pki: Path, manifest: dict[str, Any], work: Path, parse_workers: int
) -> dict[str, Any]:
    server = Server(cli, pki, manifest, work, parse_workers)
    lines: list[str] = []
    try:
        start_s = server.start()
        log(f"lodge: server up in {start_s:.1f} s (lodging on 127.0.0.1:{server.lodge_port})")
        client, handshake_failures = connect(server, pki, manifest)
        try:
            # the chain first: roots as trust anchors, then the issuing CAs
            failures = lodge_manifest(
                client, pki, subset(manifest, ("root", "ca")), out=lines.append
            )
            if failures:
                raise RuntimeError("lodging the CAs was refused:\n" + "\n".join(lines[-20:]))
            bundles = list(
                dict.fromkeys(o["path"] for o in manifest["objects"] if o["kind"] == "device")
            )
            per_bundle = []
            for rel in bundles:
                body = (pki / rel).read_bytes()
                n = body.count(BEGIN)
                # normally the CA lodging's keep-alive connection is reused (no handshake timed)
                conn = client._conn
                fresh = conn is None or conn.sock is None
                t0 = time.perf_counter()
                reply = client.certificates(body)
                el = time.perf_counter() - t0
                summary = {k: v for k, v in reply.body.items() if k != "results"}
                if (
                    reply.status != 200
                    or reply.body.get("stored", 0) + reply.body.get("identical", 0) != n
                ):
                    refused = [
                        r for r in reply.body.get("results", []) if r.get("outcome") != "stored"
                    ][:5]
                    raise RuntimeError(
                        f"lodging {rel} ({n} certificates): HTTP {reply.status} {summary} "
                        f"{refused}\n{server.tail()}"
                    )
                per_bundle.append(
                    {
                        "bundle": rel,
                        "certificates": n,
                        "bytes": len(body),
                        "seconds": round(el, 3),
                        "rate": round(n / el, 1),
                        "stored": reply.body.get("stored"),
                        "new_connection": fresh,
                    }
                )
                log(
                    f"lodge: {rel}: {n:,} certificates ({len(body) / 1e6:.1f} MB) in {el:.2f} s "
                    f"= {n / el:,.0f} certs/s"
                )
            # the rest of the PKI, untimed: the whole test PKI must be accepted
            rest = subset(manifest, ("organisation", "crl", "arl", "document"))
            failures = lodge_manifest(client, pki, rest, out=lines.append)
            if failures:
                raise RuntimeError(
                    "lodging the rest of the PKI was refused:\n" + "\n".join(lines[-20:])
                )
        finally:
            client.close()
    finally:
        server.stop()
    total_n = sum(b["certificates"] for b in per_bundle)
    total_s = sum(b["seconds"] for b in per_bundle)
    return {
        "device_certificates": total_n,
        "seconds": round(total_s, 3),
        "rate": round(total_n / total_s, 1) if total_s else None,
        "bundles": per_bundle,
        "server_start_s": round(start_s, 2),
        "parse_workers": parse_workers,
        "tls_handshake_failures": handshake_failures,
    }


# -- (c) bulk import ------------------------------------------------------------------------
def import_tree(pki: Path, manifest: dict[str, Any], dest: Path) -> int:
    """The PKI's certificate and CRL files (symlinks), without keys, TLS/DCC material, documents."""
    paths = sorted(
        {o["path"] for o in manifest["objects"] if o["kind"] in (*CERT_KINDS, "crl", "arl")}
    )
    for rel in paths:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).symlink_to(pki / rel)
    return len(paths)


def bulk_import(cli: list[str], pki: Path, manifest: dict[str, Any], work: Path) -> dict[str, Any]:
    src = work / "import-src"
    nfiles = import_tree(pki, manifest, src)
    cmd = [*cli, "import", str(src), "--allow-unverified-issuer", "--data-dir", str(work / "data")]
    log("import: " + " ".join(cmd))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    wall = time.perf_counter() - t0
    (work / "import.log").write_text(p.stdout + p.stderr)
    m = IMPORT_LINE.search(p.stdout)
    if p.returncode != 0 or not m:
        raise RuntimeError(
            f"import failed (rc={p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
        )
    stored, identical = int(num(m.group(1))), int(num(m.group(2)))
    certs = stored + identical
    res = {
        "files": nfiles,
        "stored": stored,
        "identical": identical,
        "unverified": int(num(m.group(3))),
        "crls": int(m.group(4)),
        "own_s": round(certs / num(m.group(6)), 3) if num(m.group(6)) else num(m.group(5)),
        "own_rate": num(m.group(6)),
        "skipped": int(m.group(7)),
        "refused": int(m.group(8)),
        "wall_s": round(wall, 3),
        "wall_rate": round(certs / wall, 1),
        "output": m.group(0),
    }
    expected = sum(1 for o in manifest["objects"] if o["kind"] in CERT_KINDS)
    if stored != expected:
        log(f"import: WARNING stored {stored:,} certificates, the PKI has {expected:,}")
    log(
        f"import: {certs:,} certificates, own {res['own_rate']:,} certs/s, "
        f"wall {res['wall_rate']:,} certs/s"
    )
    return res


# -- report ---------------------------------------------------------------------------------
def stats(xs: list[float | None]) -> dict[str, float] | None:
    v = [x for x in xs if x is not None]
    if not v:
        return None
    return {
        "median": round(statistics.median(v), 1),
        "min": round(min(v), 1),
        "max": round(max(v), 1),
        "n": len(v),
    }


def summarise(reps: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "generate_own_rate": stats([r["generate"]["own_rate"] for r in reps]),
        "generate_own_s": stats([r["generate"]["own_s"] for r in reps]),
        "generate_wall_rate": stats([r["generate"]["wall_rate"] for r in reps]),
        "generate_wall_s": stats([r["generate"]["wall_s"] for r in reps]),
        "lodge_rate": stats([r["lodge"]["rate"] for r in reps]),
        "lodge_s": stats([r["lodge"]["seconds"] for r in reps]),
        "import_own_rate": stats([r["import"]["own_rate"] for r in reps]),
        "import_own_s": stats([r["import"]["own_s"] for r in reps]),
        "import_wall_rate": stats([r["import"]["wall_rate"] for r in reps]),
        "import_wall_s": stats([r["import"]["wall_s"] for r in reps]),
    }


def markdown(res: dict[str, Any]) -> str:
    m, a, s, r0 = res["machine"], res["args"], res["summary"], res["reps"][0]
    gen, lod, imp = r0["generate"], r0["lodge"], r0["import"]

    def cell(key: str, nd: int = 0) -> tuple[str, str]:
        st = s.get(key)
        if not st:
            return "–", "–"
        fmt = f"{{:,.{nd}f}}"
        rng = "" if st["min"] == st["max"] else f"{fmt.format(st['min'])}–{fmt.format(st['max'])}"
        return fmt.format(st["median"]), rng

    rows = [
        (
            "test PKI generation (`smki-repository testpki`, own timing)",
            gen["certificates"],
            cell("generate_own_s", 1)[0],
            *cell("generate_own_rate"),
        ),
        (
            "test PKI generation (process wall time)",
            gen["certificates"],
            cell("generate_wall_s", 1)[0],
            *cell("generate_wall_rate"),
        ),
        (
            f"lodging, mutual TLS, `POST /lodge/certificates` ({len(lod['bundles'])} device "
            f"bundle(s) of ≤50,000)",
            lod["device_certificates"],
            cell("lodge_s", 1)[0],
            *cell("lodge_rate"),
        ),
        (
            "bulk import (`smki-repository import`, own report)",
            imp["stored"] + imp["identical"],
            cell("import_own_s", 1)[0],
            *cell("import_own_rate"),
        ),
        (
            "bulk import (process wall time: + start, initdb, PostgreSQL start/stop)",
            imp["stored"] + imp["identical"],
            cell("import_wall_s", 1)[0],
            *cell("import_wall_rate"),
        ),
    ]
    L = [
        f"Write path — {m['date'][:10]}: {m['nproc']} CPUs ({m['cpu_model'] or 'unknown CPU'}), "
        f"Python {m['python']}, kernel {m['kernel']}; {a['devices']:,} devices "
        f"({gen['device_certificates']:,} device certificates) + {a['organisations']} organisation "
        f"certificates + 5 CAs; median of {len(res['reps'])} repetition(s)"
        f"{' (min–max shown)' if len(res['reps']) > 1 else ''}; nothing pinned.",
        "",
        "| measure | certificates | seconds (median) | certificates/s (median) | min–max |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, n, secs, rate, rng in rows:
        L.append(f"| {name} | {n:,} | {secs} | {rate} | {rng} |")
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--devices", type=int, default=25_000, help="devices (2 certificates each; default 25,000)"
    )
    ap.add_argument(
        "--organisations", type=int, default=24, help="organisation certificates (default 24)"
    )
    ap.add_argument(
        "--reps", type=int, default=1, help="repetitions; the summary is the median (default 1)"
    )
    ap.add_argument("--json", metavar="FILE", help="write every figure to this JSON file")
    ap.add_argument("--workers", type=int, default=0, help="testpki --workers (default: all cores)")
    ap.add_argument(
        "--parse-workers",
        type=int,
        default=0,
        help="lodge.parse_workers of the server (default 0 = number of CPUs)",
    )
    ap.add_argument("--seed", type=int, default=None, help="testpki --seed (default: random)")
    ap.add_argument(
        "--workdir", help="work folder (default: a new temporary folder, deleted at the end)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument(
        "--smki-bin",
        help="the smki-repository executable (default: this interpreter's `-m repository_server`)",
    )
    a = ap.parse_args(argv)
    cli = [a.smki_bin] if a.smki_bin else [sys.executable, "-m", "repository_server"]

    m = machine()
    log(
        f"{m['date']}  nproc {m['nproc']}  CPU {m['cpu_model']}  Python {m['python']}  "
        f"kernel {m['kernel']}  loadavg {m['loadavg']}"
    )
    base = (
        Path(a.workdir).resolve()
        if a.workdir
        else Path(tempfile.mkdtemp(prefix="smki-lodge-bench-"))
    )
    base.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"machine": m, "args": vars(a), "cli": cli, "reps": []}
    try:
        for rep in range(1, a.reps + 1):
            work = base / f"rep-{rep}"
            if work.exists():
                raise SystemExit(f"{work} exists: choose an empty --workdir")
            pki = work / "pki"
            log(f"repetition {rep}/{a.reps} in {work}")
            manifest, gen = generate(cli, pki, a.devices, a.organisations, a.workers, a.seed)
            lod = lodge(cli, pki, manifest, work / "lodge", a.parse_workers)
            imp = bulk_import(cli, pki, manifest, work / "import")
            res["reps"].append({"rep": rep, "generate": gen, "lodge": lod, "import": imp})
            if not a.keep:  # free the disk (PKI + two PostgreSQL clusters) before the next one
                shutil.rmtree(work, ignore_errors=True)
    finally:
        if res["reps"]:
            res["summary"] = summarise(res["reps"])
            res["finished"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
            if a.json:
                Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
                log(f"wrote {a.json}")
        if not a.keep and not a.workdir:
            shutil.rmtree(base, ignore_errors=True)
        elif a.keep:
            log(f"kept {base}")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
