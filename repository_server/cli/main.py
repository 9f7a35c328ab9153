"""Command line: serve, demo, testpki, import, lodge, users, report.

Every command that touches the store takes `--config FILE` and `--data-dir DIR` (default
`./var`) and may run while the server runs (they share the embedded PostgreSQL by lease).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from repository_server import __version__
from repository_server.config import LISTENER_NAMES, Config, ConfigError, HostPort, load
from repository_server.errors import UsageError

log = logging.getLogger("smki-repository")


def _setup_logging(config: Config) -> None:
    from repository_server.obs.logs import setup

    setup(config.log.level, config.log.format)


def _quiet_logging(config: Config) -> None:
    """Commands that print their own results: warnings only (without a time stamp in text;
    in JSON, as every log line is)."""
    if config.log.format == "json":
        from repository_server.obs.logs import setup

        setup("WARNING", "json")
    else:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                            format="%(levelname)s %(name)s: %(message)s")


def _config(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Config:
    return load(args.config or os.environ.get("SMKI_CONFIG") or None, data_dir=args.data_dir,
                overrides=overrides)


def _install_loop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()


def _progress() -> Any:
    from repository_server.cli.lodge_client import Progress

    return Progress()


# -- serve / demo ---------------------------------------------------------------------------
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


async def _serve(config: Config, *, pid_file: str | None, after_start: Any = None,
                 reread: Callable[[], Config] | None = None, defer_schedule: bool = False) -> int:
    """Run until SIGTERM, SIGINT or SIGQUIT, then stop cleanly: listeners closed, the last
    CPM 8 counts flushed, the embedded PostgreSQL released (stopped by its last user), the
    pid file removed; a signal during start-up stops it there. SIGHUP reloads what can change
    without dropping a connection (`Repository.reload`) from the configuration `reread`
    returns. Under systemd (Type=notify) it says READY=1 once started, RELOADING=1 and READY=1
    around a reload, STOPPING=1 when told to stop (`sdnotify`)."""
    from repository_server import sdnotify
    from repository_server.server import Repository, write_pid_file

    repo = Repository(config, defer_schedule=defer_schedule)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    started = False
    hup_while_starting = False
    reloading: asyncio.Task[None] | None = None

    def on_stop(sig: signal.Signals) -> None:
        log.info("%s: shutting down", sig.name)
        sdnotify.stopping()
        stop.set()

    async def reload() -> None:
        sdnotify.reloading()
        try:
            new = reread() if reread is not None else config
            done = repo.reload(new)
            logging.getLogger().setLevel(new.log.level.upper())
            log.info("SIGHUP: reloaded %s", done)
        except (ConfigError, OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            log.error("SIGHUP: nothing reloaded, serving on as before: %s", exc)
        sdnotify.ready("serving (SIGHUP: reloaded)")

    def on_hup() -> None:
        nonlocal reloading, hup_while_starting
        if not started:  # the files may have changed after start-up read them
            hup_while_starting = not stop.is_set()
            log.info("SIGHUP while starting: reloading once started")
        elif reloading is None or reloading.done():
            reloading = loop.create_task(reload())

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_stop, sig)
    loop.add_signal_handler(signal.SIGHUP, on_hup)

    async def startup() -> None:
        nonlocal started
        await repo.start()
        started = True
        if hup_while_starting:
            on_hup()
        write_pid_file(pid_file)
        for name, addr in repo.bound.items():
            log.info("listening: %s on %s", name, addr)
        if after_start is not None:
            await after_start(repo)
        # start() returns once every listener is up and the read replica is ready: /readyz
        # answers 200 from here
        sdnotify.ready("serving: " + ", ".join(f"{n} {a}" for n, a in repo.bound.items()))

    starting = asyncio.ensure_future(startup())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting  # start's errors (a ConfigError, ...) propagate from here
        await stopping
    finally:
        started = False  # a SIGHUP from here on is not acted on
        stopping.cancel()
        if reloading is not None:
            await reloading
        await repo.stop()
        if pid_file:
            Path(pid_file).unlink(missing_ok=True)
    return 0


def _supervise(args: argparse.Namespace, config: Config) -> int:
    """`serve --workers N`: N server processes sharing every listener (SO_REUSEPORT), so one
    node uses all its cores. Each is a whole server (own LISTEN connection and CPM counts,
    which it adds to the store itself) reading the node's one read replica, which one of
    them feeds; jobs that must run once per cluster (the extract schedule) take a PostgreSQL
    advisory lock. The first worker starts the embedded PostgreSQL (the others share it
    through its lease) and builds the replica if needed; a worker that dies is restarted,
    SIGHUP is passed on to every worker (each reloads), SIGTERM/SIGINT/SIGQUIT stop them all.
    Worker i serves /metrics on listeners.metrics' port + i: its own counters, scraped apart."""
    import subprocess

    from repository_server import sdnotify
    from repository_server.server import write_pid_file

    workers = args.workers
    for name in LISTENER_NAMES:
        addr = config.listeners.address(name)
        if addr is not None and addr.port == 0:
            raise ConfigError(f"listeners.{name}: --workers needs fixed ports (not port 0)")
    metrics = config.listeners.address("metrics")
    if metrics is not None and metrics.port + workers - 1 > 65535:
        raise ConfigError(f"listeners.metrics: worker {workers - 1} would listen on port"
                          f" {metrics.port + workers - 1} (port + worker number)")
    argv = [sys.executable, "-m", "repository_server", "serve"]
    for flag in ("config", "data_dir", *LISTENER_NAMES):
        value = getattr(args, flag, None)
        if value is not None and flag != "metrics":
            argv += [f"--{flag.replace('_', '-')}", value]
    # systemd hears from this process only (NotifyAccess=main): READY=1 once every worker
    # listens, not from each worker
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    env["SMKI_LISTENERS__REUSE_PORT"] = "true"
    run_dir = Path(config.data_dir).expanduser() / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    stopping = False
    procs: dict[int, subprocess.Popen[bytes]] = {}

    def stop(_sig: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        sdnotify.stopping()

    def pass_on(sig: int, _frame: Any) -> None:
        sdnotify.reloading()  # each worker reloads on its own: passed on is all we know
        for proc in list(procs.values()):
            if proc.poll() is None:
                proc.send_signal(sig)
        sdnotify.ready(f"{workers} workers serving (SIGHUP passed on)")

    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)
    signal.signal(signal.SIGHUP, pass_on)  # each worker reloads (its own configuration read)

    def spawn(i: int) -> subprocess.Popen[bytes]:
        pid_file = run_dir / f"worker-{i}.pid"
        pid_file.unlink(missing_ok=True)
        own = ["--metrics", str(HostPort(metrics.host, metrics.port + i)) if metrics else ""]
        proc = subprocess.Popen([*argv, *own, "--pid-file", str(pid_file)], env=env)
        procs[i] = proc  # from now on it gets the signals passed on (a SIGHUP while it starts)
        deadline = time.monotonic() + 120
        while not pid_file.exists():  # written once the worker listens
            if proc.poll() is not None or time.monotonic() > deadline or stopping:
                break
            time.sleep(0.1)
        log.info("worker %d: pid %d", i, proc.pid)
        return proc

    write_pid_file(args.pid_file)
    try:
        for i in range(workers):  # one after the other: the first starts PostgreSQL
            procs[i] = spawn(i)
            if procs[i].poll() is not None:
                print(f"serve: worker {i} exited with {procs[i].returncode} at start",
                      file=sys.stderr)
                return 2 if procs[i].returncode == 2 else 1  # its reason is on stderr
        log.info("%d workers serving", workers)
        sdnotify.ready(f"{workers} workers serving")
        restarts: list[float] = []
        while not stopping:
            time.sleep(0.5)
            for i, proc in list(procs.items()):
                if proc.poll() is not None and not stopping:
                    now = time.monotonic()
                    restarts = [t for t in restarts if now - t < 60] + [now]
                    if len(restarts) > 5 * workers:
                        print("serve: workers keep dying; giving up", file=sys.stderr)
                        return 1
                    log.warning("worker %d (pid %d) exited with %s; restarting", i, proc.pid,
                                proc.returncode)
                    procs[i] = spawn(i)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # each stops cleanly; the last one PostgreSQL
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if args.pid_file:
            Path(args.pid_file).unlink(missing_ok=True)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    listeners = {k: getattr(args, k) for k in LISTENER_NAMES if getattr(args, k) is not None}
    if listeners:
        overrides["listeners"] = listeners
    config = _config(args, overrides)
    _setup_logging(config)
    if not 1 <= args.workers <= 64:
        raise ConfigError("--workers: must be between 1 and 64")
    if args.workers > 1:
        return _supervise(args, config)
    _install_loop()
    return asyncio.run(_serve(config, pid_file=args.pid_file,
                              reread=lambda: _config(args, overrides)))


def _ensure_testpki(pki_dir: Path, devices: int | None,
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
                    progress=_progress())


def lodge_manifest(client: Any, pki_dir: Path, manifest: dict[str, Any],
                   out: Any = print) -> int:
    """Lodge a test PKI through the lodging API, in a safe order; return refusals."""
    from repository_server.cli.lodge_client import lodge_files

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
        failures += lodge_files(client, files(kind), out=out, progress=_progress())
    for obj in objects:
        if obj["kind"] == "document":
            failures += lodge_files(client, [pki_dir / obj["path"]], name=obj.get("name"),
                                    content_type=obj.get("content_type"), out=out)
    return failures


def _smki() -> str:
    """This installation's command (the virtualenv's bin/smki-repository, which need not be
    on PATH), for commands the demo prints."""
    beside = Path(sys.executable).parent / "smki-repository"
    return str(beside) if beside.is_file() else "smki-repository"


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
                     f" `{_smki()} users apikey demo-operator`")
    if repo.portal is not None:
        if await repo.store.user("demo-portal") is None:
            text = await users_add(repo.store, "demo-portal", with_key=False)
            lines += ["  portal user demo-portal: " + ln.split(" (")[0] + ": "
                      + ln.rsplit(": ", 1)[1] + " (to be changed at first sign-in)"
                      for ln in text.splitlines() if "password" in ln]
        else:
            lines.append("  portal user demo-portal: a new temporary password with"
                         f" `{_smki()} users reset demo-portal`")
    await repo.credentials.load()
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
                     f" {_smki()} extract full --data-dir {repo.config.data_dir}")
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
    base = _config(args)
    pki_dir = Path(base.data_dir).expanduser() / "pki"
    _setup_logging(base)
    manifest = _ensure_testpki(pki_dir, args.devices, args.organisations)
    overrides: dict[str, Any] = {"lodge": {"client_subject": manifest["dcc_client"]["subject"]}}
    config = _config(args, overrides)
    _install_loop()

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

    return asyncio.run(_serve(config, pid_file=args.pid_file, after_start=after_start,
                              reread=lambda: _config(args, overrides), defer_schedule=True))


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
                            progress=_progress())
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


# -- import ---------------------------------------------------------------------------------
async def _import(config: Config, root: Path, allow_unverified: bool,
                  check_signatures: bool) -> int:
    import getpass

    from repository_server.lodging.bulk import import_directory
    from repository_server.lodging.service import Actor, LodgingService
    from repository_server.store import opened_store

    actor = Actor(f"operator:{getpass.getuser()}", peer="cli")
    async with opened_store(config, max_size=4, create=True) as store:  # a first bulk load
        service = LodgingService(store, parse_workers=config.lodge.parse_workers)
        try:
            report = await import_directory(service, root, actor,
                                            allow_unverified_issuer=allow_unverified,
                                            check_signatures=check_signatures,
                                            progress=_progress(),
                                            note=lambda m: print(m, file=sys.stderr))
        finally:
            service.close()
    print(f"imported {report.stored:,} new certificates ({report.identical:,} already present,"
          f" {report.unverified:,} with unverified issuer), {report.crls} CRL/ARL, in"
          f" {report.seconds:.1f} s ({report.rate:,.0f} certificates/s);"
          f" {len(report.skipped)} files skipped, {len(report.refused)} refused")
    for line in report.refused[:50]:
        print(f"  refused: {line}", file=sys.stderr)
    if len(report.refused) > 50:
        print(f"  ... and {len(report.refused) - 50} more", file=sys.stderr)
    return 1 if report.refused else 0


def cmd_import(args: argparse.Namespace) -> int:
    config = _config(args)
    _setup_logging(config)
    root = Path(args.dir)
    if not root.exists():
        raise UsageError(f"DIR: no such file or directory: {root}")
    _install_loop()
    return asyncio.run(_import(config, root, args.allow_unverified_issuer,
                               not args.skip_signature_check))


# -- lodge ----------------------------------------------------------------------------------
def _readable(option: str, name: str) -> Path:
    """A file an option names, or a UsageError saying which option and which file."""
    path = Path(name).expanduser()
    if not path.exists():
        raise UsageError(f"{option}: no such file: {path}")
    if not path.is_file():
        raise UsageError(f"{option}: not a file: {path}")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{option}: cannot read {path} (permission denied)")
    return path


def cmd_lodge(args: argparse.Namespace) -> int:
    import http.client
    import ssl

    from repository_server.cli.lodge_client import LodgeClient, TlsRefused, lodge_files

    if not args.url.startswith("https://"):
        raise UsageError(f"--url must be https://HOST:PORT (got {args.url!r})")
    cert, key = _readable("--cert", args.cert), _readable("--key", args.key)
    ca = _readable("--ca", args.ca) if args.ca else None
    files = [_readable("FILE argument", f) for f in args.files]
    if args.batch_size < 1:
        raise UsageError("--batch-size: must be at least 1")
    try:
        client = LodgeClient(args.url, str(cert), str(key), str(ca) if ca else None,
                             on_behalf_of=args.on_behalf_of)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise UsageError(f"--key {key} does not match --cert {cert} (it is not that"
                             " certificate's private key)") from None
        if exc.reason == "NO_CERTIFICATE_OR_CRL_FOUND":
            raise UsageError(f"--ca {ca}: no PEM CA certificate in it") from None
        raise UsageError(f"--cert {cert} / --key {key}: cannot load them as a PEM certificate"
                         f" and its private key ({exc.reason or exc})") from None
    except ValueError as exc:  # --url
        raise UsageError(str(exc)) from None
    flag = None if args.manufacturing_flag is None else args.manufacturing_flag == "true"
    try:
        failures = lodge_files(client, files, name=args.name,
                               trust_anchor=args.trust_anchor, status=args.status,
                               manufacturing_flag=flag, batch_size=args.batch_size,
                               progress=_progress())
    except TlsRefused as exc:  # the handshake failed: the message says why and what to check
        print(f"error: {exc}", file=sys.stderr)
        # the server's certificate not trusted is our configuration (--ca): 2; the server
        # refusing our client certificate is a refusal: 1
        return 2 if isinstance(exc.__cause__, ssl.SSLCertVerificationError) else 1
    except (ssl.SSLError, http.client.RemoteDisconnected) as exc:
        # TLS 1.3: the server checks our certificate after the handshake, then sends an alert
        # or just closes the connection: either way it refused the client certificate
        why = (exc.reason or exc) if isinstance(exc, ssl.SSLError) else "closed without an answer"
        print(f"error: {args.url} refused the TLS connection ({why}): is --cert {cert} the DCC"
              " lodging client it accepts?", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot reach {args.url}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    finally:
        client.close()
    return 1 if failures else 0


# -- users / report -------------------------------------------------------------------------
def _admin(args: argparse.Namespace, work: Any) -> int:
    """Run `work(store, config)` (an admin coroutine returning text) against the store."""
    from repository_server.cli.admin import AdminError
    from repository_server.store import opened_store

    config = _config(args)
    _quiet_logging(config)

    async def run() -> str:
        async with opened_store(config, max_size=2) as store:
            text: str = await work(store, config)
            return text

    try:
        print(asyncio.run(run()))
    except AdminError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_users(args: argparse.Namespace) -> int:
    from repository_server.cli import admin

    action = args.action
    if action == "forecast" and not args.clear:  # checked before the store is opened
        if args.per_day is None:
            raise UsageError("users forecast: give --per-day N (requests per 24 hours), or"
                             " --clear")
        admin.parse_bands(args.bands or "25,25,25,25")
    if action == "add":
        return _admin(args, lambda store, _c: admin.users_add(
            store, args.name, role="operator" if args.operator else "party",
            api_key=args.api_key, with_key=not args.no_api_key))
    if action == "list":
        return _admin(args, lambda store, _c: admin.users_list(store, as_json=args.json))
    if action in ("disable", "enable"):
        return _admin(args, lambda store, _c: admin.users_disable(store, args.name,
                                                                    action == "disable"))
    if action == "reset":
        return _admin(args, lambda store, _c: admin.users_reset(store, args.name))
    if action == "apikey":
        return _admin(args, lambda store, _c: admin.users_apikey(store, args.name, args.set))
    if action == "sshkey":
        text = None
        if args.add:
            try:
                text = _readable("--add", args.add).read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise UsageError(f"--add: cannot read {args.add}: {exc}") from None
        return _admin(args, lambda store, _c: admin.users_sshkey(store, args.name, text,
                                                                  args.clear))
    return _admin(args, lambda store, _c: admin.users_forecast(
        store, args.name, args.per_day, args.bands, args.clear))


def cmd_report(args: argparse.Namespace) -> int:
    from repository_server.cli import admin

    if args.kind == "cpm":
        return _admin(args, lambda store, config: admin.report_cpm(
            store, config.service_levels, args.month, args.json))
    if args.kind == "tls-refusals":
        return _admin(args, lambda store, _c: admin.report_tls_refusals(store, args.hours,
                                                                         args.json))
    return _admin(args, lambda store, config: admin.report_demand(
        store, config.service_levels, args.day, args.json))


@contextlib.asynccontextmanager
async def opened_replica(config: Config, store: Any,
                         progress: Callable[[int, int], None] | None = None
                         ) -> AsyncIterator[Any]:
    """This node's read replica (built if missing, caught up with the store), as the catalog
    the read interfaces use: what `serve` would answer with."""
    from repository_server.readmodel.catalog import Catalog
    from repository_server.readmodel.feed import Feeder

    feeder = Feeder.for_node(config, store.dsn)
    replica = feeder.replica
    try:
        await feeder.ensure(progress)
        await feeder.catch_up()
        catalog = Catalog(store, replica)
        catalog.ready = True
        yield catalog
    finally:
        await feeder.close()
        replica.close()


def cmd_replica(args: argparse.Namespace) -> int:
    """`replica status|verify|rebuild`: this node's read replica against the store."""
    from repository_server.readmodel.env import ReplicaUnavailable
    from repository_server.readmodel.feed import Feeder, lag, verify
    from repository_server.store import opened_store

    config = _config(args)
    _setup_logging(config)
    path = config.path(config.replica.path)

    async def run() -> int:
        async with opened_store(config, max_size=2) as store:
            feeder = Feeder.for_node(config, store.dsn)
            replica = feeder.replica
            bar = _progress()
            try:
                if args.action == "rebuild":
                    started = time.perf_counter()
                    written = await feeder.build(lambda done, total: bar("replica", done, total))
                    took = time.perf_counter() - started
                    print(f"replica rebuilt at {path}: {written:,} certificates in {took:.1f} s"
                          f" ({written / took if took else 0:,.0f}/s), {replica.size_bytes() / 1e6:,.0f}"
                          " MB; running servers reopen it within a second")
                    started = time.perf_counter()
                    await feeder.fill_search()  # else the node's feeder does it once it reopens
                    took = time.perf_counter() - started
                    print(f"RFC 4387 search index: {written:,} certificates in {took:.1f} s"
                          f" ({written / took if took else 0:,.0f}/s),"
                          f" {replica.size_bytes() / 1e6:,.0f} MB in all")
                    return 0
                if not replica.exists():
                    print(f"error: no replica at {path} (a server builds it when it starts, or"
                          " run `smki-repository replica rebuild`)", file=sys.stderr)
                    return 1
                try:
                    replica.open()
                    state = lag(replica)
                except ReplicaUnavailable as exc:
                    print(f"error: {exc}; run `smki-repository replica rebuild`", file=sys.stderr)
                    return 1
                if args.action == "status":
                    state.update(path=str(path), bytes=replica.size_bytes(), **replica.counts())
                    print(json.dumps(state, indent=2))
                    return 0
                if not args.no_catch_up:
                    await feeder.catch_up()
                async with store.pool.acquire() as conn:
                    report = await verify(replica, conn)
                if report.ok:
                    print(f"replica at {path} equals the store (change {report.store_applied},"
                          f" {replica.counts()['certs']:,} certificates)")
                    return 0
                print(f"replica at {path} differs from the store:")
                for line in report.differences[:100]:
                    print(f"  {line}")
                if len(report.differences) > 100:
                    print(f"  ... and {len(report.differences) - 100} more")
                print("run `smki-repository replica rebuild` to rebuild it", file=sys.stderr)
                return 1
            finally:
                await feeder.close()
                replica.close()

    return asyncio.run(run())


def cmd_export_ldif(args: argparse.Namespace) -> int:
    """The directory as LDIF, streamed a page at a time (bounded memory)."""
    from repository_server.listeners.ldap.directory import Directory
    from repository_server.listeners.ldap.ldif import entry_ldif
    from repository_server.store import opened_store

    config = _config(args)
    _quiet_logging(config)

    async def run(out: Any) -> int:
        count = 0
        async with opened_store(config, max_size=2) as store, \
                opened_replica(config, store) as catalog:
            directory = Directory(catalog, suffix=config.ldap.suffix, root_dse={})
            async for entry in directory.all_entries():
                out.write(entry_ldif(entry))
                count += 1
                if count % 50_000 == 0:
                    print(f"export-ldif: {count} entries", file=sys.stderr)
        return count

    if args.out in (None, "-"):
        count = asyncio.run(run(sys.stdout))
    else:
        target = Path(args.out)
        partial = target.with_name(target.name + ".partial")
        try:
            fh = partial.open("w", encoding="ascii")
        except OSError as exc:
            raise UsageError(f"--out: cannot write {partial}: {exc.strerror or exc}") from None
        try:
            with fh:
                count = asyncio.run(run(fh))
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.replace(target)  # a half-written export is never left under the real name
    print(f"export-ldif: {count} entries", file=sys.stderr)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    """One extract now (waiting for a scheduled one in progress anywhere in the cluster)."""
    from repository_server.cli.admin import AdminError
    from repository_server.extracts.writer import ExtractWriter

    async def work(store: Any, config: Config) -> str:
        ex = config.extracts
        writer = ExtractWriter(store, config.path(ex.dir), compression=ex.compression,
                               page_size=ex.page_size, retain_full=ex.retain_full,
                               progress=_progress())
        async with store.extract_lock(wait=True):
            try:
                done = await writer.produce(args.kind)
            except OSError as exc:  # a full disk, above all: one line, not a traceback
                raise AdminError(f"extract failed, nothing was published: {exc}"
                                 f" (extracts.dir {writer.directory})") from exc
        if args.json:
            return json.dumps({"name": done.name, "kind": done.kind, "path": str(done.path),
                               "size": done.size, "sha256": done.sha256, "counts": done.counts,
                               "removed": done.removed}, indent=2)
        lines = [f"{done.path}", f"  {done.kind}, {done.size} bytes, sha256 {done.sha256}",
                 "  " + ", ".join(f"{k} {v}" for k, v in done.counts.items())]
        lines += [f"  retention removed {name}" for name in done.removed]
        return "\n".join(lines)

    return _admin(args, work)


def cmd_export_ldap_schema(args: argparse.Namespace) -> int:
    from repository_server.listeners.ldap.schema import openldap_schema

    text = openldap_schema()
    if args.out in (None, "-"):
        sys.stdout.write(text)
    else:
        try:
            Path(args.out).write_text(text)
        except OSError as exc:
            raise UsageError(f"--out: cannot write {args.out}: {exc.strerror or exc}") from None
    return 0


# -- config ---------------------------------------------------------------------------------
def cmd_config(args: argparse.Namespace) -> int:
    """`config check`: every problem in the file, the environment and the files they name
    (exit 2), like `nginx -t`; `config show`: the effective settings as TOML."""
    from repository_server.config import shipped_config_dir, to_toml

    source = args.config or os.environ.get("SMKI_CONFIG") or None
    where = source or "the built-in defaults"
    env = sorted(k for k in os.environ if k.startswith("SMKI_") and k != "SMKI_CONFIG")
    if args.action == "show":
        if args.defaults:
            shipped = shipped_config_dir() / "repository.toml"
            try:
                sys.stdout.write(shipped.read_text())
            except OSError as exc:
                print(f"error: the example configuration is not installed ({shipped}:"
                      f" {exc.strerror or exc}); reinstall the package", file=sys.stderr)
                return 1
            return 0
        sys.stdout.write(f"# effective settings: {where}"
                         + (f" + {', '.join(env)}" if env else "") + "\n" + to_toml(_config(args)))
        return 0
    from repository_server.server import tls_problems

    try:
        config = _config(args)
    except ConfigError as exc:
        problems = [str(exc)]
    else:
        problems = tls_problems(config)
        data = Path(config.data_dir).expanduser()
        existing = next((p for p in (data, *data.absolute().parents) if p.exists()), None)
        if existing is not None and not os.access(existing, os.W_OK):
            problems.append(f"data_dir: {data} cannot be written ({existing} is not writable)")
    for problem in problems:
        print(f"configuration error: {problem}", file=sys.stderr)
    env_text = f" with {', '.join(env)}" if env else ""
    if problems:
        count = f"{len(problems)} problem" + ("s" if len(problems) > 1 else "")
        print(f"config check: {where}{env_text}: {count}", file=sys.stderr)
        return 2
    print(f"config check: {where}{env_text}: ok")
    return 0


# -- parser ---------------------------------------------------------------------------------
class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option's help (not for options without one, or flags), and
    the epilog's examples kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in text:
            return text
        return super()._get_help_string(action)


# shtab's completion hints (a FILE or DIR argument), set without importing shtab
_FILE = {"bash": "_shtab_compgen_files", "zsh": "_files", "tcsh": "f"}
_DIR = {"bash": "_shtab_compgen_dirs", "zsh": "_files -/", "tcsh": "d"}


def _complete(action: argparse.Action, kind: dict[str, str]) -> argparse.Action:
    action.complete = kind  # type: ignore[attr-defined]
    return action


def _command(sub: Any, name: str, text: str, examples: list[str],
             func: Callable[[argparse.Namespace], int] | None = None) -> argparse.ArgumentParser:
    epilog = "Example" + ("s" if len(examples) > 1 else "") + ":\n" + "\n".join(
        f"  {line}" for line in examples)
    p: argparse.ArgumentParser = sub.add_parser(name, help=text, description=text, epilog=epilog,
                                                formatter_class=_Help)
    if func is not None:
        p.set_defaults(func=func)
    return p


def _store_args(p: argparse.ArgumentParser) -> None:
    _complete(p.add_argument("--config", metavar="FILE",
                             help="TOML configuration file (default: $SMKI_CONFIG, else built-in"
                                  " defaults; see `smki-repository config show`)"), _FILE)
    _complete(p.add_argument("--data-dir", metavar="DIR", default=None,
                             help="data directory (default: data_dir from the configuration,"
                                  " ./var)"), _DIR)


def _json_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} as JSON")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="smki-repository", formatter_class=_Help,
        description="SMKI certificate repository and revocation server",
        epilog="Exit status: 0 success, 1 something was refused (details on stderr),\n"
               "2 usage or configuration error, or a server that cannot be reached.\n\n"
               "Examples:\n  smki-repository demo\n  smki-repository lodge --help\n"
               "  source <(smki-repository completion bash)")
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND",
                            help="what to do (each has its own --help)")

    p = _command(sub, "serve", "run the server", [
        "smki-repository serve --config /etc/smki/repository.toml",
        "smki-repository serve --data-dir /srv/smki --http 0.0.0.0:8083 --ldaps '' --workers 2"],
        cmd_serve)
    _store_args(p)
    for name in LISTENER_NAMES:
        p.add_argument(f"--{name}", metavar="HOST:PORT",
                       help=f"override listeners.{name} (an empty string disables it)")
    _complete(p.add_argument("--pid-file", metavar="FILE",
                             help="write the process id here once listening; removed at exit"),
              _FILE)
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="N server processes sharing every listener (SO_REUSEPORT)")

    p = _command(sub, "demo", "generate a test PKI, start everything, lodge the PKI", [
        "smki-repository demo", "smki-repository demo --data-dir /tmp/smki --devices 1000"],
        cmd_demo)
    _store_args(p)
    p.add_argument("--devices", type=int, metavar="N",
                   help="devices in the test PKI (default: 50); used when it is generated,"
                        " ignored (and said so) once DATA_DIR/pki exists")
    p.add_argument("--organisations", type=int, metavar="M",
                   help="organisation certificates in the test PKI (default: 24); used when"
                        " it is generated")
    _complete(p.add_argument("--pid-file", metavar="FILE",
                             help="write the process id here once listening"), _FILE)

    p = _command(sub, "testpki", "generate a test PKI in the GB profile", [
        "smki-repository testpki --devices 1000 --organisations 24 --out /tmp/pki --seed 7"],
        cmd_testpki)
    p.add_argument("--devices", type=int, default=50, metavar="N",
                   help="devices (each has a digital-signing and a key-agreement certificate)")
    p.add_argument("--organisations", type=int, default=24, metavar="M",
                   help="organisation certificates")
    p.add_argument("--workers", type=int, default=0, metavar="W",
                   help="processes making certificates (0: one per core)")
    p.add_argument("--seed", type=int, default=None, metavar="S",
                   help="random seed, for the same serials and EUI-64s every time (default:"
                        " random)")
    _complete(p.add_argument("--out", required=True, metavar="DIR",
                             help="directory to create (must not hold a test PKI yet)"), _DIR)

    p = _command(sub, "import", "bulk-load certificates and CRLs from a directory", [
        "smki-repository import --data-dir /srv/smki /srv/incoming/certificates",
        "smki-repository import /tmp/pki      # a testpki folder: its SMKI objects only"],
        cmd_import)
    _store_args(p)
    _complete(p.add_argument("dir", metavar="DIR",
                             help="a directory (recursed into) or one file; a test PKI's"
                                  " folder (manifest.json) imports the SMKI objects it lists"),
              _DIR)
    p.add_argument("--allow-unverified-issuer", action="store_true",
                   help="store certificates whose issuer is not available, marked unverified"
                        " (self-signed CA certificates are always imported as trust anchors)")
    p.add_argument("--skip-signature-check", action="store_true",
                   help="link certificates to their issuers by name and key id without checking"
                        " signatures (a trusted source, e.g. our own extract); recorded on each")

    p = _command(sub, "lodge", "lodge files through the mutual-TLS lodging API (DCC side)", [
        "smki-repository lodge --url https://localhost:8444 --ca var/pki/tls/ca.pem \\\n"
        "    --cert var/pki/dcc/client.pem --key var/pki/dcc/client.key.pem \\\n"
        "    var/pki/crl/issuing-oca.crl var/pki/documents/SMKI-Recovery-Procedure.txt"],
        cmd_lodge)
    p.add_argument("--url", default="https://localhost:8444",
                   help="the repository's lodging listener (https://HOST:PORT)")
    _complete(p.add_argument("--cert", required=True, metavar="FILE",
                             help="the DCC lodging client's certificate (PEM)"), _FILE)
    _complete(p.add_argument("--key", required=True, metavar="FILE",
                             help="the private key of --cert (PEM)"), _FILE)
    _complete(p.add_argument("--ca", metavar="FILE",
                             help="CA certificate that issued the server's TLS certificate (PEM;"
                                  " default: the system's trusted CAs)"), _FILE)
    p.add_argument("--name", help="document name (default: the file name without extension)")
    p.add_argument("--trust-anchor", action="store_true",
                   help="lodge self-signed root CA certificates as trust anchors")
    p.add_argument("--status", choices=["P", "I", "N"],
                   help="device certificate status to record: P pending, I in use, N not in use")
    p.add_argument("--manufacturing-flag", choices=["true", "false"],
                   help="the device certificates' manufacturing flag")
    p.add_argument("--on-behalf-of", metavar="OFFICER",
                   help="the DCC officer lodging (sent as X-On-Behalf-Of, kept in the audit log)")
    p.add_argument("--batch-size", type=int, default=50_000, metavar="N",
                   help="certificates per request when a bundle is split")
    _complete(p.add_argument("files", nargs="+", metavar="FILE",
                             help="certificates (PEM/DER), CRLs/ARLs or documents"), _FILE)

    p = _command(sub, "users", "relying-party users: API keys, passwords, forecasts",
                 ["smki-repository users list"], cmd_users)
    us = p.add_subparsers(dest="action", required=True, metavar="ACTION",
                           help="what to do with users")
    q = _command(us, "add", "add a user; prints its API key and initial password once", [
        "smki-repository users add acme-energy", "smki-repository users add ops1 --operator"])
    q.add_argument("name", help="user name: letters, digits and . _ @ -")
    q.add_argument("--operator", action="store_true",
                   help="operator role (may read the service-level reports over HTTP)")
    q.add_argument("--api-key", metavar="KEY", help="use this key instead of a random one")
    q.add_argument("--no-api-key", action="store_true", help="portal sign-in only")
    q = _command(us, "list", "list users (never their keys or passwords)",
                 ["smki-repository users list --json"])
    _json_arg(q, "the users")
    for verb, text in (("disable", "disable a user (its API key stops working)"),
                       ("enable", "enable a disabled user"),
                       ("reset", "new temporary portal password, to be changed at sign-in")):
        q = _command(us, verb, text, [f"smki-repository users {verb} acme-energy"])
        q.add_argument("name", help="the user")
    q = _command(us, "apikey", "new random API key (printed once), or --set a given one", [
        "smki-repository users apikey acme-energy",
        "smki-repository users apikey dcc-boxed --set u3bg9gt38htd0j2"])
    q.add_argument("name", help="the user")
    q.add_argument("--set", metavar="KEY", help="e.g. DCC Boxed's fixed key u3bg9gt38htd0j2")
    q = _command(us, "forecast", "set a user's demand forecast", [
        "smki-repository users forecast acme-energy --per-day 20000 --bands 10,5,70,15",
        "smki-repository users forecast acme-energy --clear"])
    q.add_argument("name", help="the user")
    q.add_argument("--per-day", type=int, metavar="N",
                   help="requests per 24 hours (required unless --clear)")
    q.add_argument("--bands", metavar="A,B,C,D",
                   help="percent of the day's requests in 00-07,07-08,08-20,20-24 (UK time);"
                        " 25,25,25,25 when not given")
    q.add_argument("--clear", action="store_true", help="remove the forecast")
    q = _command(us, "sshkey", "add an SFTP public key for a user, or clear its keys", [
        "smki-repository users sshkey acme-energy --add ~/.ssh/id_ed25519.pub"])
    q.add_argument("name", help="the user")
    g = q.add_mutually_exclusive_group(required=True)
    _complete(g.add_argument("--add", metavar="FILE",
                             help="an OpenSSH public key file (e.g. id_ed25519.pub)"), _FILE)
    g.add_argument("--clear", action="store_true", help="remove every key of the user")
    for q in us.choices.values():
        _store_args(q)

    p = _command(sub, "report", "service-level reports (CPM 8, demand), refused TLS handshakes",
                 ["smki-repository report cpm", "smki-repository report tls-refusals --hours 1"],
                 cmd_report)
    rs = p.add_subparsers(dest="kind", required=True, metavar="REPORT", help="which report")
    q = _command(rs, "cpm", "Code Performance Measure 8 for a calendar month",
                 ["smki-repository report cpm --month 2026-11 --json"])
    q.add_argument("--month", metavar="YYYY-MM", help="the month (default: this month, UK time)")
    _json_arg(q, "the report")
    _store_args(q)
    q = _command(rs, "demand", "requests per user and time band against forecast",
                 ["smki-repository report demand --day 2026-11-30"])
    q.add_argument("--day", metavar="YYYY-MM-DD", help="the day (default: today, UK time)")
    _json_arg(q, "the report")
    _store_args(q)
    q = _command(rs, "tls-refusals", "refused TLS handshakes per listener, reason and peer"
                 " address (counted per minute)", ["smki-repository report tls-refusals --hours 1"])
    q.add_argument("--hours", type=float, default=24, help="this far back")
    _json_arg(q, "the report")
    _store_args(q)

    p = _command(sub, "replica", "this node's read replica: status, verify, rebuild", [
        "smki-repository replica status", "smki-repository replica verify --no-catch-up"],
        cmd_replica)
    p.add_argument("action", choices=("status", "verify", "rebuild"),
                   help="status: how far behind, sizes; verify: compare with the store (counts"
                        " and a digest per id range); rebuild: build anew from the store")
    p.add_argument("--no-catch-up", action="store_true",
                   help="verify: compare as it is, without applying pending changes first")
    _store_args(p)

    p = _command(sub, "export-ldif", "write the LDAP directory as LDIF (e.g. to load slapd)", [
        "smki-repository export-ldif --out directory.ldif",
        "smki-repository export-ldif | head -40"], cmd_export_ldif)
    _store_args(p)
    _complete(p.add_argument("--out", metavar="FILE",
                             help="output file, written as FILE.partial and renamed when"
                                  " complete (default: standard output)"), _FILE)

    p = _command(sub, "extract", "produce a full or delta extract now",
                 ["smki-repository extract full --json"], cmd_extract)
    p.add_argument("kind", choices=("full", "delta"),
                   help="full: every certificate; delta: changes since the last extract")
    p.add_argument("--json", action="store_true", help="describe it as JSON")
    _store_args(p)

    p = _command(sub, "export-ldap-schema",
                 "write our LDAP attribute types and object classes as an OpenLDAP schema",
                 ["smki-repository export-ldap-schema --out /etc/ldap/schema/smki.schema"],
                 cmd_export_ldap_schema)
    _complete(p.add_argument("--out", metavar="FILE",
                             help="output file (default: standard output)"), _FILE)

    p = _command(sub, "config", "check the configuration, or show the effective settings",
                 ["smki-repository config check --config /etc/smki/repository.toml"],
                 cmd_config)
    cs = p.add_subparsers(dest="action", required=True, metavar="ACTION", help="check or show")
    q = _command(cs, "check", "validate the file, the SMKI_* environment and the files they"
                 " name; exit 0 when good, 2 with every problem found (like `nginx -t`)",
                 ["smki-repository config check --config /etc/smki/repository.toml"])
    _store_args(q)
    q = _command(cs, "show", "print the effective settings (defaults < file < environment) as"
                 " TOML, passwords redacted", [
                     "smki-repository config show --config /etc/smki/repository.toml",
                     "smki-repository config show --defaults > repository.toml"])
    _store_args(q)
    q.add_argument("--defaults", action="store_true",
                   help="print the shipped example configuration instead (every setting, its"
                        " default and what it does)")

    p = _command(sub, "completion", "print a shell completion script", [
        "smki-repository completion bash > /etc/bash_completion.d/smki-repository",
        "smki-repository completion zsh > ~/.zfunc/_smki-repository"], cmd_completion)
    p.add_argument("shell", choices=("bash", "zsh"), help="the shell")
    return ap


def cmd_completion(args: argparse.Namespace) -> int:
    import shtab

    sys.stdout.write(shtab.complete(parser(), shell=args.shell))
    return 0


def _quiet_broken_pipe() -> int:
    """stdout's reader has gone (`| head`): stop quietly, as tools killed by SIGPIPE do, and
    keep Python's exit-time flush from complaining about it."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 128 + signal.SIGPIPE


def main(argv: list[str] | None = None) -> int:
    from repository_server.store.embedded import NoStore

    args = parser().parse_args(argv)
    try:
        result: int = args.func(args)
        sys.stdout.flush()
        return result
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except (NoStore, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except KeyboardInterrupt:
        return 130
