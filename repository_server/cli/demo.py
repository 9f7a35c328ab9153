"""`demo` (a whole repository on embedded defaults, with the test PKI lodged and users made)
and `testpki`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from repository_server.cli.common import install_loop, load_config, progress_bar, setup_logging, smki_command
from repository_server.cli.lodge_client import lodge_manifest
from repository_server.cli.serve import serve
from repository_server.config import ConfigError
from repository_server.errors import UsageError

log = logging.getLogger("smki-repository")


def ensure_testpki(pki_dir: Path, devices: int | None,
                    organisations: int | None) -> dict[str, Any]:
    """The demo's test PKI: generated when there is none; the one there is used as it is
    (and a --devices/--organisations that differs from it said to be ignored)."""
    from repository_server.pki.testpki import TestPkiParams, generate, load_manifest

    if (pki_dir / "manifest.json").exists():
        try:
            manifest = load_manifest(pki_dir)
        except ValueError as exc:
            raise ConfigError(f"{exc}; remove {pki_dir} and run demo again") from exc
        params = manifest.get("params", {})
        for option, given in (("devices", devices), ("organisations", organisations)):
            if given is not None and given != params.get(option):
                print(f"--{option} {given} ignored: {pki_dir} already holds a test PKI with"
                      f" {params.get(option)} {option} (remove {pki_dir} to generate another)",
                      file=sys.stderr)
        return manifest
    devices = 50 if devices is None else devices
    organisations = 24 if organisations is None else organisations
    if devices < 0 or organisations < 0:
        raise UsageError("--devices/--organisations: must be 0 or more")
    print(f"generating a test PKI in {pki_dir} ({devices} devices, {organisations}"
          " organisation certificates)", file=sys.stderr)
    pki_dir.parent.mkdir(parents=True, exist_ok=True)
    return generate(pki_dir, TestPkiParams(devices=devices, organisations=organisations),
                    progress=progress_bar())


async def _demo_users(repo: Any) -> list[str]:
    """The demo's users: `dcc-boxed` with the fixed key DCC Boxed's client sends, and an
    operator (its random key is printed on the first run only)."""
    from repository_server.cli.admin import DCC_BOXED_KEY, users_add

    lines = []
    if await repo.store.user("dcc-boxed") is None:
        await users_add(repo.store, "dcc-boxed", api_key=DCC_BOXED_KEY)
    if await repo.store.user("demo-operator") is None:
        text = await users_add(repo.store, "demo-operator", role="operator")
        lines += ["  operator user demo-operator: " + ln for ln in text.splitlines()
                  if "API key" in ln]
    else:
        lines.append("  operator user demo-operator: a new API key with"
                     f" `{smki_command()} users apikey demo-operator`")
    if repo.portal is not None:
        if await repo.store.user("demo-portal") is None:
            text = await users_add(repo.store, "demo-portal", with_key=False)
            lines += ["  portal user demo-portal: " + ln.split(" (")[0] + ": "
                      + ln.rsplit(": ", 1)[1] + " (to be changed at first sign-in)"
                      for ln in text.splitlines() if "password" in ln]
        else:
            lines.append("  portal user demo-portal: a new temporary password with"
                         f" `{smki_command()} users reset demo-portal`")
    await repo.accounts.load()
    return lines


def _demo_text(repo: Any, pki_dir: Path, manifest: dict[str, Any], users: list[str]) -> str:
    from repository_server.cli.admin import DCC_BOXED_KEY
    from repository_server.pki.testpki import device_objects

    objs = manifest["objects"]
    device = next(device_objects(pki_dir, manifest), None)
    crl = next((o for o in objs if o["kind"] == "crl"), None)
    doc = next((o for o in objs if o["kind"] == "document"), None)
    http = f"http://{repo.bound['http']}" if "http" in repo.bound else None
    https = f"https://{repo.bound['https']}" if "https" in repo.bound else None
    lodge = f"https://{repo.bound['lodge']}" if "lodge" in repo.bound else None
    tls_ca = pki_dir / manifest["tls"]["ca"]
    dcc = manifest["dcc_client"]
    lines = ["", "smki-repository demo is up.", ""]
    portal = f"{http or https}/portal/" if repo.portal is not None and (http or https) else None
    sftp = f"sftp://{repo.bound['sftp']}" if "sftp" in repo.bound else None
    for label, url in (("downloads (http)", http), ("downloads (https)", https),
                       ("portal (browser)", portal), ("lodging (mutual TLS)", lodge),
                       ("extracts (sftp)", sftp)):
        if url:
            lines.append(f"  {label:22} {url}")
    lines += ["", f"API key of user dcc-boxed (DCC Boxed's client sends it): {DCC_BOXED_KEY}",
              *users, "", "Try:"]
    base = http or https
    key = f"apikey={DCC_BOXED_KEY}"
    if base:
        if device:
            eui = device.get("eui64", "")
            lines.append(f"  curl -s -H 'Content-Type: application/xml' --data '<CertificateSearch"
                         f"Request><CertificateSubjectAltName>{eui.lower()}</CertificateSubject"
                         f"AltName></CertificateSearchRequest>' '{base}/services/certificatesearch"
                         f"?{key}'")
            lines.append(f"  curl -s -H 'Content-Type: application/xml' --data '<CertificateData"
                         f"Request><CertificateSerial>{device['serial'].lower()}</CertificateSerial>"
                         f"</CertificateDataRequest>' '{base}/services/retrievecertificate?{key}'")
            lines.append(f"  curl -s '{base}/certificates/{device['serial']}.pem?{key}'")
            lines.append(f"  curl -s '{base}/certificates/{device['serial']}?{key}' | openssl x509"
                         " -inform DER -noout -text | head -20")
        lines.append(f"  curl -s {base}/crls")
        if crl:
            lines.append(f"  curl -s {base}/crls/{crl['issuer_key_id']}.crl | openssl crl"
                         " -inform DER -noout -text | head -20")
        lines.append(f"  curl -s {base}/documents")
        if doc:
            lines.append(f"  curl -sI {base}/documents/{doc['name']}")
        lines.append(f"  curl -s '{base}/extracts?{key}'   # after a scheduled extract, or:"
                     f" {smki_command()} extract full --data-dir {repo.config.data_dir}")
    if "metrics" in repo.bound:
        lines.append(f"  curl -s http://{repo.bound['metrics']}/metrics | grep smki_")
    if https:
        lines.append(f"  curl -s --cacert {tls_ca} {https}/readyz")
    if "ldap" in repo.bound:
        ldap_url = f"ldap://{repo.bound['ldap']}"
        suffix = repo.config.ldap.suffix
        bind = f"-D uid=dcc-boxed,ou=Users,{suffix} -w {DCC_BOXED_KEY}"
        lines.append(f"  ldapsearch -x -H {ldap_url} -b ou=CAs,{suffix} '(objectClass=pkiCA)'"
                     " cn smkiCrlNumber")
        if crl:
            lines.append(f"  curl -s 'ldap://{repo.bound['ldap']}/smkiKeyId={crl['issuer_key_id']},"
                         f"ou=CAs,{suffix}?certificateRevocationList;binary?base'")
        if device:
            lines.append(f"  LDAPTLS_CACERT={tls_ca} ldapsearch -x -ZZ -H {ldap_url} {bind}"
                         f" -b ou=Devices,{suffix} '(&(smkiEui64={device.get('eui64', '')})"
                         f"(smkiKeyUsage={device.get('usage', 'DS')}))' smkiSerial smkiStatus")
        lines.append(f"  ldapwhoami -x -H {ldap_url} {bind}")
    if lodge:
        lines.append(f"  curl -s --cacert {tls_ca} --cert {pki_dir / dcc['cert']} --key"
                     f" {pki_dir / dcc['key']} {lodge}/lodge/whoami")
    lines += ["", "Press Ctrl-C to stop.", ""]
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    base = load_config(args)
    pki_dir = Path(base.data_dir).expanduser() / "pki"
    setup_logging(base)
    manifest = ensure_testpki(pki_dir, args.devices, args.organisations)
    overrides: dict[str, Any] = {"lodge": {"client_subject": manifest["dcc_client"]["subject"]}}
    config = load_config(args, overrides)
    install_loop()

    async def after_start(repo: Any) -> None:
        from repository_server.cli.lodge_client import LodgeClient

        if "lodge" not in repo.bound:
            print("lodging listener disabled: not lodging the test PKI", file=sys.stderr)
            repo.start_schedule()
            return
        dcc = manifest["dcc_client"]
        client = LodgeClient(f"https://localhost:{repo.bound['lodge'].port}",
                             str(pki_dir / dcc["cert"]), str(pki_dir / dcc["key"]),
                             str(pki_dir / manifest["tls"]["ca"]))
        started = time.perf_counter()
        print("lodging the test PKI through the mutual-TLS lodging API ...", file=sys.stderr)
        try:
            failures = await asyncio.to_thread(
                lodge_manifest, client, pki_dir, manifest,
                lambda line: print("  " + line, file=sys.stderr))
        finally:
            client.close()
            repo.start_schedule()  # its first extract holds what was just lodged
        print(f"lodged in {time.perf_counter() - started:.1f} s"
              + (f" with {failures} refusal(s)" if failures else ""), file=sys.stderr)
        users = await _demo_users(repo)
        print(_demo_text(repo, pki_dir, manifest, users), flush=True)

    return asyncio.run(serve(config, pid_file=args.pid_file, after_start=after_start,
                              reread=lambda: load_config(args, overrides), defer_schedule=True))


# -- testpki --------------------------------------------------------------------------------
def cmd_testpki(args: argparse.Namespace) -> int:
    from repository_server.pki.testpki import TestPkiParams, generate

    out = Path(args.out)
    for option, value, least in (("--devices", args.devices, 0),
                                 ("--organisations", args.organisations, 0),
                                 ("--workers", args.workers, 0)):
        if value < least:
            raise UsageError(f"{option}: must be {least} or more (got {value})")
    started = time.perf_counter()
    try:
        manifest = generate(out, TestPkiParams(devices=args.devices,
                                               organisations=args.organisations,
                                               workers=args.workers or os.cpu_count() or 1,
                                               seed=args.seed),
                            progress=progress_bar())
    except FileExistsError:
        print(f"error: {out} already holds a test PKI (manifest.json); choose another --out",
              file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    certs = manifest["counts"]["device_certificates"] + sum(
        1 for o in manifest["objects"] if o["kind"] in ("root", "ca", "organisation"))
    print(f"wrote {certs:,} certificates to {out} in {elapsed:.1f} s"
          f" ({certs / elapsed:,.0f} certificates/s); manifest: {out / 'manifest.json'}")
    return 0
