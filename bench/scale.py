#!/usr/bin/env python3
"""National-scale benchmark (issue 6): the same lookups against a small and a big store, the
write path at millions, memory per process, one process against two, and the extract.

    bench/scale.py prepare --devices 5000000      # testpki + import + a bench user (timed)
    bench/scale.py lookups --sizes 100000,5000000 # lookup rate and p99, both sizes, one run
    bench/scale.py workers --size 100000          # serve --workers 1 against --workers 2
    bench/scale.py extract --devices 5000000      # a full extract of the big store (timed)

Everything lives under --work (default /tmp/smki-scale): `pki-N/` (the test PKI), `data-N/`
(a data directory with its own embedded PostgreSQL), `view-N/data/` (the store's device
certificates in the shared harness's dataset layout, so its load generators can ask for
them), and results go to bench/results/scale-<what>-<date>.{md,json}.

Load generators are the shared harness's (../shared/bench): `ldapload.py` with its C engine
for LDAP, wrk with `paths.lua` for HTTP, both pinned to CPU 1 with taskset. The server is
pinned to CPU 0 (`lookups`) or left on both cores (`workers`, which is what the option is
for). Lookups come in two modes, run interleaved in one invocation:

  configured  bench/bench.toml as the harness runs it (LDAP response cache off there too).
  store       the same, named for the comparison it was made for before the read replica
              (both caches off, every lookup read PostgreSQL); now every lookup reads the
              node's replica in both modes, so they measure the same path.

Each lookup walks a shuffled list of device certificates drawn uniformly from the whole
store (all of them up to --sample, else a uniform sample of --sample), from a random start.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCH = Path(os.environ.get("BENCH", ROOT.parent / "shared" / "bench"))
sys.path.insert(0, str(BENCH))
import queries  # noqa: E402  (the harness's request spellings)

import bench as harness  # noqa: E402  (the shared harness: run_wrk, ws_devices_file)

PY = os.environ.get("BENCH_PY", "/tmp/benchvenv/bin/python")
API_KEY = "bench-api-key-2026"
SERVER_CPU, LOADGEN_CPU = "0", "1"
MODES = {
    "configured": {},
    "store": {"SMKI_LDAP__RESPONSE_CACHE_MB": "0"},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def smki_bin() -> str:
    return os.environ.get("SMKI_BIN") or shutil.which("smki-repository") or str(
        ROOT / ".venv" / "bin" / "smki-repository")


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMKI_")}
    env.update(SMKI_LOG__ACCESS_LOG="false", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def timed(cmd: list[str], logfile: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run cmd under /usr/bin/time -v, output to logfile; wall seconds and peak RSS."""
    t0 = time.perf_counter()
    with open(logfile, "w") as out:
        rc = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=out, stderr=subprocess.STDOUT,
                            env=env or clean_env(), check=False).returncode
    wall = time.perf_counter() - t0
    text = logfile.read_text(errors="replace")
    if rc != 0:
        raise SystemExit(f"{cmd[0]} {cmd[1]} failed (rc {rc}); see {logfile}")
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {"seconds": round(wall, 1), "peak_rss_mb": round(int(peak.group(1)) / 1024) if peak
            else None}


def du_mb(path: Path) -> int:
    out = subprocess.run(["du", "-sm", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


# -- prepare --------------------------------------------------------------------------------
def cmd_prepare(a: argparse.Namespace) -> int:
    n = a.devices
    work = Path(a.work)
    pki, data = work / f"pki-{n}", work / f"data-{n}"
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"devices": n}
    if not (pki / "manifest.json").exists():
        log(f"testpki: {n:,} devices into {pki}")
        res["testpki"] = timed([smki_bin(), "testpki", "--devices", str(n), "--organisations",
                                "1000", "--seed", "20261121", "--out", str(pki)],
                               work / f"testpki-{n}.log")
    manifest = json.loads((pki / "manifest.json").read_text())
    res["testpki_own_timings"] = manifest["timings"]
    res["certificates"] = manifest["counts"]["device_certificates"] + manifest["counts"][
        "organisations"] + manifest["counts"]["cas"]
    res["pki_mb"] = du_mb(pki)
    if not (data / "pgdata").exists():
        log(f"import: {pki} into {data}")
        res["import"] = timed([smki_bin(), "import", str(pki), "--config",
                               str(HERE / "bench.toml"), "--data-dir", str(data)],
                              work / f"import-{n}.log")
        text = (work / f"import-{n}.log").read_text()
        m = re.search(r"imported ([\d,]+) new certificates.*?\(([\d,]+) certificates/s\)", text)
        if m:
            res["import"]["reported"] = {"stored": int(m.group(1).replace(",", "")),
                                         "per_second": int(m.group(2).replace(",", ""))}
        subprocess.run([smki_bin(), "users", "add", "bench", "--api-key", API_KEY,
                        "--config", str(HERE / "bench.toml"), "--data-dir", str(data)],
                       env=clean_env(), check=True, capture_output=True)
    res["data_mb"] = du_mb(data)
    build_view(pki, manifest, view_dir(work, n), a.sample)
    out = work / f"prepare-{n}.json"
    if out.exists():  # a later run (data already there) keeps the first run's timings
        res = {**json.loads(out.read_text()), **res}
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


def view_dir(work: Path, n: int) -> Path:
    """The harness keeps request files in the dataset's sibling `reqs/`, named by workload
    only: each store's view gets a folder of its own so that they never mix."""
    return work / f"view-{n}" / "data"


def build_view(pki: Path, manifest: dict[str, Any], view: Path, sample: int) -> None:
    """The store's device certificates in the harness's dataset layout (manifest.csv,
    meta.json; CA and CRL files point into the PKI): uniform reservoir sample."""
    if (view / "manifest.csv").exists():
        return
    view.mkdir(parents=True, exist_ok=True)
    rng = random.Random(20261121)
    rows: list[list[str]] = []
    with open(pki / manifest["devices"]["index"], newline="") as f:
        for i, r in enumerate(csv.DictReader(f)):
            row = [r["serial"].lower(), "device", r["eui64"],
                   "digitalSignature" if r["usage"] == "DS" else "keyAgreement", "dca", "", "0",
                   r["path"]]
            if len(rows) < sample:
                rows.append(row)
            elif (j := rng.randrange(i + 1)) < sample:
                rows[j] = row
    with open(view / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["serial", "kind", "id", "key_usage", "issuer", "role", "revoked", "path"])
        w.writerows(rows)
    cas = {"root": "ca/root-oca.der", "oca": "ca/issuing-oca.der", "dca": "ca/issuing-dca.der"}
    (view / "meta.json").write_text(json.dumps({
        "files": {"ca": {k: str(pki / v) for k, v in cas.items()},
                  "crl": str(pki / "crl/issuing-oca.crl"), "arl": str(pki / "crl/root-oca.arl")},
        "issuer_dn": {}, "sampled_from": manifest["counts"]["device_certificates"]}))
    log(f"view: {len(rows):,} device certificates in {view}")


# -- a running server -----------------------------------------------------------------------
class Server:
    def __init__(self, data: Path, work: Path, *, mode: str = "configured", workers: int = 1,
                 cpu: str | None = SERVER_CPU) -> None:
        self.http, self.ldap = 8093, 3893
        self.pidfile = work / "scale-server.pid"
        self.logfile = work / "scale-server.log"
        cmd = [smki_bin(), "serve", "--config", str(HERE / "bench.toml"), "--data-dir",
               str(data), "--http", f"127.0.0.1:{self.http}", "--ldap",
               f"127.0.0.1:{self.ldap}", "--https", "", "--lodge", "", "--ldaps", "",
               "--pid-file", str(self.pidfile)]
        if workers > 1:
            cmd += ["--workers", str(workers)]
        if cpu is not None:
            cmd = ["taskset", "-c", cpu, *cmd]
        self.pidfile.unlink(missing_ok=True)
        self.started = time.perf_counter()
        with open(self.logfile, "w") as out:  # the child keeps its own copy
            self.proc = subprocess.Popen(cmd, env=clean_env(MODES[mode]),
                                         stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.mode, self.workers = mode, workers
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 900
        preload = False  # the read replica: ready means /readyz 200, nothing to preload
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server died; see {self.logfile}")
            text = self.logfile.read_text(errors="replace")
            if preload:
                if text.count("cache preloaded with") >= self.workers:
                    break
            else:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/readyz",
                                                timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
            time.sleep(0.5)
        else:
            raise SystemExit(f"server not ready in 900 s; see {self.logfile}")
        self.ready_s = round(time.perf_counter() - self.started, 1)
        self.wait_search_index()

    def wait_search_index(self) -> None:
        """Until the node's RFC 4387 index is filled (search.cgi answers other than 503): the
        fill runs in the server's process after a fresh build, and measuring lookups beside
        it measures the fill (at 5M it took half the core)."""
        url = (f"http://127.0.0.1:{self.http}/certificates/search.cgi?certHash="
               f"{'A' * 27}&apikey={API_KEY}")
        deadline, said = time.monotonic() + 1800, 0.0
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5):
                    return
            except urllib.error.HTTPError as exc:
                if exc.code != 503:
                    return
            except OSError:
                pass
            if time.monotonic() - said > 30:
                log("waiting for the server's RFC 4387 search index to be filled")
                said = time.monotonic()
            time.sleep(1.0)
        raise SystemExit(f"search index not filled in 1800 s; see {self.logfile}")

    def pids(self) -> list[int]:
        """The server processes (not PostgreSQL): the supervisor's children, or itself."""
        out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True)
        procs = [ln.split(None, 2) for ln in out.stdout.splitlines()[1:]]
        tree = {self.proc.pid}
        for _ in range(4):
            tree |= {int(p) for p, pp, _ in procs if int(pp) in tree}
        return sorted(int(p) for p, _, args in procs
                      if int(p) in tree and "serve" in args and "postgres" not in args)

    def rss_mb(self) -> dict[str, int]:
        res = {}
        for pid in self.pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            rss = re.search(r"VmRSS:\s+(\d+)", status)
            hwm = re.search(r"VmHWM:\s+(\d+)", status)
            anon = re.search(r"RssAnon:\s+(\d+)", status)
            file = re.search(r"RssFile:\s+(\d+)", status)
            if rss and hwm:
                res[f"{pid}"] = int(rss.group(1)) // 1024
                res[f"{pid}_peak"] = int(hwm.group(1)) // 1024
            if anon and file:  # private memory vs pages of shared files (the replica's mmap)
                res[f"{pid}_anon"] = int(anon.group(1)) // 1024
                res[f"{pid}_file"] = int(file.group(1)) // 1024
        return res

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def http_paths(view: Path) -> Path:
    out = view / "http-device.paths"
    if not out.exists():
        with open(view / "manifest.csv", newline="") as f, open(out, "w") as w:
            for r in csv.DictReader(f):
                w.write(f"/certificates/{r['serial'].upper()}?apikey={API_KEY}\n")
    return out


def load(scenario: str, server: Server, view: Path, conns: int,
         a: argparse.Namespace) -> dict[str, Any]:
    if scenario == "ldap-device":
        cmd = [PY, str(BENCH / "ldapload.py"), "--data", str(view), "--targets",
               str(HERE / "smki-target.json"), "--target", "smki-repository", "--port",
               str(server.ldap), "--workload", "device", "-c", str(conns), "-t",
               str(a.duration), "-w", str(a.warmup), "--cpu", LOADGEN_CPU]
        # one shuffled request list per store (built once, cached by the harness); the C
        # engine starts each run at a random point of it
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.duration + 600)
        try:
            r: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            return {"error": p.stderr[-800:]}
        r["error_total"] = sum(r.get("errors", {}).values())
        return r
    ws = None
    if scenario == "ws-search-retrieve":  # DCC Boxed's client: search a device, retrieve both
        paths = harness.ws_devices_file(str(view))
        ws = dict(queries.WS_DEFAULTS, apikey=API_KEY)
    else:
        paths = str(http_paths(view))
    if a.warmup > 0:
        harness.run_wrk(server.http, paths, conns, int(a.warmup), LOADGEN_CPU, 1, ws)
    r = harness.run_wrk(server.http, paths, conns, int(a.duration), LOADGEN_CPU, 1, ws)
    return dict(r)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in runs if "ops_per_s" in r]
    if not good:
        return {"error": runs[-1].get("error") if runs else "no runs"}
    return {"ops_per_s": statistics.median(r["ops_per_s"] for r in good),
            "ops_min": min(r["ops_per_s"] for r in good),
            "ops_max": max(r["ops_per_s"] for r in good),
            "p50_us": statistics.median(r["lat_us"]["p50"] for r in good),
            "p99_us": statistics.median(r["lat_us"]["p99"] for r in good),
            "errors": sum(r.get("error_total", 0) for r in good), "runs": len(good)}


def write_report(name: str, res: dict[str, Any], table: list[str]) -> None:
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (out / f"scale-{name}-{stamp}.json").write_text(json.dumps(res, indent=1))
    (out / f"scale-{name}-{stamp}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    log(f"written bench/results/scale-{name}-{stamp}.{{md,json}}")


def method(a: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(a).items() if k != "fn"}


def checkpoint(name: str, res: dict[str, Any]) -> None:
    """Every cell as it is measured: a failure later loses nothing."""
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / f"scale-{name}-partial.json").write_text(json.dumps(res, indent=1))


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "kernel": os.uname().release,
            "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "loadavg_before": os.getloadavg()}


def measure(server: Server, name: str, res: dict[str, Any],
            cells: dict[tuple[Any, ...], list[dict[str, Any]]], a: argparse.Namespace,
            view: Path, key: tuple[Any, ...], rep: int, labels: dict[str, Any]) -> None:
    """Every scenario at every concurrency against one started server, then stop it: each
    cell goes into res (saved at once) and into cells under key + (scenario, conns); the
    server's memory after the start and after the load goes into res["memory"]."""
    try:
        res["memory"].append({**labels, "rep": rep, "after_start": server.rss_mb()})
        for sc in a.scenarios.split(","):
            for c in (int(c) for c in a.conns.split(",")):
                r = load(sc, server, view, c, a)
                r.update(labels, scenario=sc, conns=c, rep=rep)
                res["cells"].append(r)
                checkpoint(name, res)
                cells.setdefault((*key, sc, c), []).append(r)
                log(f"rep {rep} {' '.join(str(v) for v in labels.values())} {sc} c={c}:"
                    f" {r.get('ops_per_s')} ops/s p99 {r.get('lat_us', {}).get('p99')} µs"
                    f" err {r.get('error_total')}")
        res["memory"][-1]["after_load"] = server.rss_mb()
    finally:
        server.stop()


# -- lookups --------------------------------------------------------------------------------
def prewarm(folder: Path) -> None:
    """Read every file of `folder` (the node's read replica) into the page cache, as the
    shared harness's PREWARM does for each target: a store just imported leaves PostgreSQL's
    and the test PKI's files in the cache instead, and the first lookups then wait on the
    disk (at 5M: 3,700 major faults a second, 5,800 LDAP searches/s, p99 70 ms)."""
    started = time.perf_counter()
    total = 0
    for path in sorted(folder.glob("*")):
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                total += len(chunk)
    log(f"prewarm: {total / 1e9:.1f} GB of {folder} read in {time.perf_counter() - started:.1f} s")


def cmd_lookups(a: argparse.Namespace) -> int:
    work = Path(a.work)
    sizes = [int(s) for s in a.sizes.split(",")]
    conns = [int(c) for c in a.conns.split(",")]
    scenarios = a.scenarios.split(",")
    modes = a.modes.split(",")
    res: dict[str, Any] = {"machine": machine(), "method": method(a), "cells": [], "memory": []}
    cells: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for rep in range(1, a.reps + 1):
        for mode in modes:
            for size in (sizes if rep % 2 else sizes[::-1]):  # alternate which size goes first
                view = view_dir(work, size)
                server = Server(work / f"data-{size}", work, mode=mode)
                if a.prewarm:
                    prewarm(work / f"data-{size}" / "replica")
                measure(server, "lookups", res, cells, a, view, (mode, size), rep,
                        {"mode": mode, "size": size})
                res["memory"][-1]["ready_s"] = server.ready_s
    table = ["| mode | scenario | conns | devices | ops/s (median) | min–max | p50 µs | p99 µs |"
             " p99 ÷ p99 at smallest | errors |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    res["summary"] = []
    for mode in modes:
        for sc in scenarios:
            for c in conns:
                base = summarise(cells.get((mode, sizes[0], sc, c), []))
                for size in sizes:
                    s = summarise(cells.get((mode, size, sc, c), []))
                    s.update(mode=mode, scenario=sc, conns=c, devices=size)
                    res["summary"].append(s)
                    if "ops_per_s" not in s:
                        table.append(f"| {mode} | {sc} | {c} | {size:,} | error | | | | | |")
                        continue
                    ratio = (s["p99_us"] / base["p99_us"]) if base.get("p99_us") else None
                    table.append(
                        f"| {mode} | {sc} | {c} | {size:,} | {s['ops_per_s']:,.0f} |"
                        f" {s['ops_min']:,.0f}–{s['ops_max']:,.0f} | {s['p50_us']:,.0f} |"
                        f" {s['p99_us']:,.0f} | {ratio:.2f} | {s['errors']} |")
    table += ["", "| mode | devices | ready after s | server RSS after start MB | after load MB |"
              " peak MB |", "|---|---:|---:|---:|---:|---:|"]
    for m in res["memory"]:
        pids = [k for k in m["after_start"] if not k.endswith("_peak")]
        start = sum(m["after_start"][k] for k in pids)
        after = sum(v for k, v in m.get("after_load", {}).items() if not k.endswith("_peak"))
        peak = sum(v for k, v in m.get("after_load", {}).items() if k.endswith("_peak"))
        table.append(f"| {m['mode']} | {m['size']:,} | {m['ready_s']} | {start} | {after} |"
                     f" {peak} |")
    write_report("lookups", res, table)
    return 0


# -- workers --------------------------------------------------------------------------------
def cmd_workers(a: argparse.Namespace) -> int:
    work = Path(a.work)
    view = view_dir(work, a.size)
    conns = [int(c) for c in a.conns.split(",")]
    scenarios = a.scenarios.split(",")
    res: dict[str, Any] = {"machine": machine(), "method": method(a), "cells": [], "memory": []}
    cells: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for rep in range(1, a.reps + 1):
        for n in ((1, 2) if rep % 2 else (2, 1)):
            # not pinned: two processes are there to use both cores (the generator is on CPU 1)
            server = Server(work / f"data-{a.size}", work, workers=n, cpu=None)
            measure(server, "workers", res, cells, a, view, (n,), rep, {"workers": n})
    table = ["| scenario | conns | workers | ops/s (median) | min–max | p50 µs | p99 µs |"
             " × workers 1 | errors |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    res["summary"] = []
    for sc in scenarios:
        for c in conns:
            one = summarise(cells.get((1, sc, c), []))
            for n in (1, 2):
                s = summarise(cells.get((n, sc, c), []))
                s.update(workers=n, scenario=sc, conns=c)
                res["summary"].append(s)
                if "ops_per_s" not in s:
                    table.append(f"| {sc} | {c} | {n} | error | | | | | |")
                    continue
                ratio = s["ops_per_s"] / one["ops_per_s"] if one.get("ops_per_s") else 0
                table.append(f"| {sc} | {c} | {n} | {s['ops_per_s']:,.0f} | {s['ops_min']:,.0f}"
                             f"–{s['ops_max']:,.0f} | {s['p50_us']:,.0f} | {s['p99_us']:,.0f} |"
                             f" {ratio:.2f} | {s['errors']} |")
    write_report("workers", res, table)
    return 0


# -- extract --------------------------------------------------------------------------------
def cmd_extract(a: argparse.Namespace) -> int:
    work = Path(a.work)
    data = work / f"data-{a.devices}"
    r = timed([smki_bin(), "extract", "full", "--config", str(HERE / "bench.toml"),
               "--data-dir", str(data)], work / f"extract-{a.devices}.log")
    text = (work / f"extract-{a.devices}.log").read_text()
    newest = max((data / "extracts").glob("*full*"), key=lambda p: p.stat().st_mtime)
    r.update(devices=a.devices, file=newest.name, mb=round(newest.stat().st_size / 2**20, 1),
             output=[ln for ln in text.splitlines() if "extract" in ln.lower()][-3:])
    print(json.dumps(r, indent=1))
    (work / f"extract-{a.devices}.json").write_text(json.dumps(r, indent=1))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/smki-scale")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("prepare")
    s.add_argument("--devices", type=int, required=True)
    s.add_argument("--sample", type=int, default=400_000,
                   help="device certificates the load generators draw from")
    s.set_defaults(fn=cmd_prepare)
    for name, fn in (("lookups", cmd_lookups), ("workers", cmd_workers)):
        s = sub.add_parser(name)
        if name == "lookups":
            s.add_argument("--sizes", default="100000,5000000")
            s.add_argument("--modes", default="configured,store")
            s.add_argument("--no-prewarm", dest="prewarm", action="store_false",
                           help="do not read the replica into the page cache before each size")
        else:
            s.add_argument("--size", type=int, default=100_000)
        s.add_argument("--scenarios", default="ldap-device,http-device")
        s.add_argument("--conns", default="1,64")
        s.add_argument("--reps", type=int, default=3)
        s.add_argument("--duration", type=int, default=15)
        # a server started on a 10 GB replica spends its first ~20 s under load faulting the
        # map's pages into its page tables (minor faults, no disk reads): with 3 s the 5M
        # cells measured that start-up, p99 1.28-1.32x of 100k, against 0.91-1.01x with 20
        s.add_argument("--warmup", type=int, default=20,
                       help="seconds of load before each measured cell (default 20)")
        s.set_defaults(fn=fn)
    s = sub.add_parser("extract")
    s.add_argument("--devices", type=int, required=True)
    s.set_defaults(fn=cmd_extract)
    a = p.parse_args()
    result: int = a.fn(a)
    return result


if __name__ == "__main__":
    sys.exit(main())
