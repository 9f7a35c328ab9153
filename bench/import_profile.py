#!/usr/bin/env python3
"""Where one certificate's time goes in `import`, stage by stage, in one process (issue 13).

    .venv/bin/python bench/import_profile.py PKI_DIR [--count 20000] [--reps 3]

PKI_DIR is a `testpki` folder (`bench/scale.py prepare` makes one). Takes the first --count
device certificates of its first bundle and times, per certificate and best of --reps:
reading and PEM-decoding the bundle, `parse_certificate`, the issuer lookup with the
signature check, the lodging decision and the store record (`NewCertificate.of`), and the
two pickles between the worker and the writer (the DER out, the record back). The same code
paths as `lodging.batch.import_chunk`; OpenSSL's own verify rate (`openssl speed`) beside it
is the floor for the signature check. COPY and the index build are measured by `import`
itself (its last line: `per certificate, µs: ...`).
"""

from __future__ import annotations

import argparse
import json
import pickle
import time
from pathlib import Path

from repository_server.lodging.batch import CertOptions, Issuer, Parsed, decide, resolve_issuer
from repository_server.pki.certificates import parse_certificate
from repository_server.pki.model import CertKind
from repository_server.pki.pem import load_pem_or_der_certificates
from repository_server.store.models import NewCertificate


def best(fn, reps: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("pki", type=Path)
    p.add_argument("--count", type=int, default=20_000)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    manifest = json.loads((a.pki / "manifest.json").read_text())
    bundle = a.pki / manifest["devices"]["bundles"][0]
    issuers: dict[bytes, list[Issuer]] = {}
    for obj in manifest["objects"]:
        if obj["kind"] in ("root", "ca"):
            info = parse_certificate((a.pki / obj["path"]).read_bytes())
            issuers.setdefault(info.subject_dn, []).append(Issuer(
                1, info.subject_dn, info.subject_key_id, info.public_key_der, True,
                info.kind == CertKind.ROOT))
    raw = bundle.read_bytes()
    ders = load_pem_or_der_certificates(raw)[:a.count]
    n = len(ders)
    share = n / len(load_pem_or_der_certificates(raw))
    opts = CertOptions(roots_are_anchors=True)
    infos = [parse_certificate(d) for d in ders]
    out: dict[str, float] = {}
    out["read + PEM decode"] = best(lambda: load_pem_or_der_certificates(
        bundle.read_bytes()), a.reps) * share
    out["parse (parse_certificate + lint)"] = best(
        lambda: [parse_certificate(d) for d in ders], a.reps)

    def verify() -> None:
        for d in ders:  # parse then verify, as the worker does (the walk is reused)
            info = parse_certificate(d)
            resolve_issuer(info, issuers)

    out["verify (issuer lookup + ECDSA P-256)"] = best(verify, a.reps) - out[
        "parse (parse_certificate + lint)"]
    parsed = [Parsed(0, i, None, resolve_issuer(i, issuers)[0]) for i in infos]

    def rows() -> list[NewCertificate]:
        made = []
        for i, p in enumerate(parsed):
            d = decide(p, opts)
            assert p.info is not None
            made.append(NewCertificate.of(i, p.info, status="I", manufacturing_flag=False,
                                          issuer_verified=d.verified, trust_anchor=d.anchor,
                                          extra_findings=d.extra))
        return made

    out["rows (decision + NewCertificate.of)"] = best(rows, a.reps)
    records = rows()
    out["pickle DER to worker + unpickle"] = best(
        lambda: pickle.loads(pickle.dumps([(f"b[{i}]", d) for i, d in enumerate(ders)])),
        a.reps)
    out["pickle record to writer + unpickle"] = best(
        lambda: pickle.loads(pickle.dumps(records)), a.reps)
    print(f"{n:,} device certificates of {bundle.name}, best of {a.reps}, one process:")
    for k, v in out.items():
        print(f"  {k:42s} {v * 1e6 / n:7.1f} µs")
    total = sum(out.values())
    print(f"  {'total':42s} {total * 1e6 / n:7.1f} µs  ({n / total:,.0f}/s on one core)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
