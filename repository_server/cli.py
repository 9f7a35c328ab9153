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

from . import __version__
from .config import LISTENER_NAMES, Config, ConfigError, HostPort, load

log = logging.getLogger("smki-repository")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _config(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Config:
    return load(args.config or os.environ.get("SMKI_CONFIG") or None, data_dir=args.data_dir,
                overrides=overrides)


def _install_loop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()


def _progress() -> Any:
    from .lodge.client import Progress

    return Progress()


# -- serve / demo ---------------------------------------------------------------------------
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


async def _serve(config: Config, *, pid_file: str | None, after_start: Any = None,
                 reread: Callable[[], Config] | None = None) -> int:
    """Run until SIGTERM, SIGINT or SIGQUIT, then stop cleanly: listeners closed, the last
    CPM 8 counts flushed, the embedded PostgreSQL released (stopped by its last user), the
    pid file removed; a signal during start-up stops it there. SIGHUP reloads what can change
    without dropping a connection (`Repository.reload`) from the configuration `reread`
    returns. Under systemd (Type=notify) it says READY=1 once started, RELOADING=1 and READY=1
    around a reload, STOPPING=1 when told to stop (`sdnotify`)."""
    from . import sdnotify
    from .server import Repository, write_pid_file

    repo = Repository(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    started = False
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
        nonlocal reloading
        if not started:
            log.warning("SIGHUP while starting: ignored (send it again once started)")
        elif reloading is None or reloading.done():
            reloading = loop.create_task(reload())

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_stop, sig)
    loop.add_signal_handler(signal.SIGHUP, on_hup)

    async def startup() -> None:
        nonlocal started
        await repo.start()
        started = True
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

    from . import sdnotify
    from .server import write_pid_file

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
    _setup_logging(config.log.level)
    if not 1 <= args.workers <= 64:
        raise ConfigError("--workers: must be between 1 and 64")
    if args.workers > 1:
        return _supervise(args, config)
    _install_loop()
    return asyncio.run(_serve(config, pid_file=args.pid_file,
                              reread=lambda: _config(args, overrides)))


def _ensure_testpki(pki_dir: Path, devices: int, organisations: int) -> dict[str, Any]:
    from .pki.testpki import TestPkiParams, generate, load_manifest

    if (pki_dir / "manifest.json").exists():
        try:
            return load_manifest(pki_dir)
        except ValueError as exc:
            raise ConfigError(f"{exc}; remove {pki_dir} and run demo again") from exc
    print(f"generating a test PKI in {pki_dir} ({devices} devices, {organisations}"
          " organisation certificates)", file=sys.stderr)
    pki_dir.parent.mkdir(parents=True, exist_ok=True)
    return generate(pki_dir, TestPkiParams(devices=devices, organisations=organisations),
                    progress=_progress())


def lodge_manifest(client: Any, pki_dir: Path, manifest: dict[str, Any],
                   out: Any = print) -> int:
    """Lodge a test PKI through the lodging API, in a safe order; return refusals."""
    from .lodge.client import lodge_files

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


async def _demo_users(repo: Any) -> list[str]:
    """The demo's users: `dcc-boxed` with the fixed key DCC Boxed's client sends, and an
    operator (its random key is printed on the first run only)."""
    from .admin import DCC_BOXED_KEY, users_add

    lines = []
    if await repo.store.user("dcc-boxed") is None:
        await users_add(repo.store, "dcc-boxed", api_key=DCC_BOXED_KEY)
    if await repo.store.user("demo-operator") is None:
        text = await users_add(repo.store, "demo-operator", role="operator")
        lines += ["  operator user: " + ln for ln in text.splitlines() if "API key" in ln]
    if repo.portal is not None:
        if await repo.store.user("demo-portal") is None:
            text = await users_add(repo.store, "demo-portal", with_key=False)
            lines += ["  portal user demo-portal: " + ln.split(" (")[0] + ": "
                      + ln.rsplit(": ", 1)[1] + " (to be changed at first sign-in)"
                      for ln in text.splitlines() if "password" in ln]
        else:
            lines.append("  portal user demo-portal: a new temporary password with"
                         " `smki-repository users reset demo-portal`")
    await repo.credentials.load()
    return lines


def _demo_text(repo: Any, pki_dir: Path, manifest: dict[str, Any], users: list[str]) -> str:
    from .admin import DCC_BOXED_KEY
    from .pki.testpki import device_objects

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
                     f" smki-repository extract full --data-dir {repo.config.data_dir}")
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
    _setup_logging(base.log.level)
    manifest = _ensure_testpki(pki_dir, args.devices, args.organisations)
    overrides: dict[str, Any] = {"lodge": {"client_subject": manifest["dcc_client"]["subject"]}}
    config = _config(args, overrides)
    _install_loop()

    async def after_start(repo: Any) -> None:
        from .lodge.client import LodgeClient

        if "lodge" not in repo.bound:
            print("lodging listener disabled: not lodging the test PKI", file=sys.stderr)
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
        print(f"lodged in {time.perf_counter() - started:.1f} s"
              + (f" with {failures} refusal(s)" if failures else ""), file=sys.stderr)
        users = await _demo_users(repo)
        print(_demo_text(repo, pki_dir, manifest, users), flush=True)

    return asyncio.run(_serve(config, pid_file=args.pid_file, after_start=after_start,
                              reread=lambda: _config(args, overrides)))


# -- testpki --------------------------------------------------------------------------------
def cmd_testpki(args: argparse.Namespace) -> int:
    from .pki.testpki import TestPkiParams, generate

    out = Path(args.out)
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

    from .lodge.bulk import import_directory
    from .lodge.service import Actor, LodgingService
    from .store import opened_store

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
    _setup_logging(config.log.level)
    root = Path(args.dir)
    if not root.exists():
        print(f"error: {root} does not exist", file=sys.stderr)
        return 2
    _install_loop()
    return asyncio.run(_import(config, root, args.allow_unverified_issuer,
                               not args.skip_signature_check))


# -- lodge ----------------------------------------------------------------------------------
def cmd_lodge(args: argparse.Namespace) -> int:
    from .lodge.client import LodgeClient, lodge_files

    try:
        client = LodgeClient(args.url, args.cert, args.key, args.ca,
                             on_behalf_of=args.on_behalf_of)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    flag = None if args.manufacturing_flag is None else args.manufacturing_flag == "true"
    try:
        failures = lodge_files(client, [Path(f) for f in args.files], name=args.name,
                               trust_anchor=args.trust_anchor, status=args.status,
                               manufacturing_flag=flag, batch_size=args.batch_size,
                               progress=_progress())
    except OSError as exc:
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 2
    finally:
        client.close()
    return 1 if failures else 0


# -- users / report -------------------------------------------------------------------------
def _admin(args: argparse.Namespace, work: Any) -> int:
    """Run `work(store, config)` (an admin coroutine returning text) against the store."""
    from .admin import AdminError
    from .store import opened_store

    config = _config(args)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")

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
    from . import admin

    action = args.action
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
                text = Path(args.add).read_text()
            except OSError as exc:
                print(f"error: --add: {exc}", file=sys.stderr)
                return 1
        return _admin(args, lambda store, _c: admin.users_sshkey(store, args.name, text,
                                                                  args.clear))
    return _admin(args, lambda store, _c: admin.users_forecast(
        store, args.name, args.per_day, args.bands, args.clear))


def cmd_report(args: argparse.Namespace) -> int:
    from . import admin

    if args.kind == "cpm":
        return _admin(args, lambda store, config: admin.report_cpm(
            store, config.service_levels, args.month, args.json))
    return _admin(args, lambda store, config: admin.report_demand(
        store, config.service_levels, args.day, args.json))


@contextlib.asynccontextmanager
async def opened_replica(config: Config, store: Any,
                         progress: Callable[[int, int], None] | None = None
                         ) -> AsyncIterator[Any]:
    """This node's read replica (built if missing, caught up with the store), as the catalog
    the read interfaces use: what `serve` would answer with."""
    from .catalog import Catalog
    from .replica.feed import Feeder

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
    from .replica.env import ReplicaUnavailable
    from .replica.feed import Feeder, lag, verify
    from .store import opened_store

    config = _config(args)
    _setup_logging(config.log.level)
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
    from .ldap.directory import Directory
    from .ldap.ldif import entry_ldif
    from .store import opened_store

    config = _config(args)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")

    async def run(out: Any) -> int:
        count = 0
        async with opened_store(config, max_size=2) as store, \
                opened_replica(config, store) as catalog:
            directory = Directory(catalog, store, suffix=config.ldap.suffix, root_dse={})
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
            with partial.open("w", encoding="ascii") as fh:
                count = asyncio.run(run(fh))
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.replace(target)  # a half-written export is never left under the real name
    print(f"export-ldif: {count} entries", file=sys.stderr)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    """One extract now (waiting for a scheduled one in progress anywhere in the cluster)."""
    from .admin import AdminError
    from .extracts.writer import ExtractWriter

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
    from .ldap.schema import openldap_schema

    text = openldap_schema()
    if args.out in (None, "-"):
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text)
    return 0


# -- parser ---------------------------------------------------------------------------------
def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("--data-dir", metavar="DIR", default=None,
                   help="data directory (default ./var, or data_dir from the config)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="smki-repository",
                                 description="SMKI certificate repository and revocation server")
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the server")
    _store_args(p)
    for name in LISTENER_NAMES:
        p.add_argument(f"--{name}", metavar="HOST:PORT",
                       help=f"override listeners.{name} (empty string disables)")
    p.add_argument("--pid-file", metavar="FILE")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="N server processes sharing every listener (SO_REUSEPORT; default 1)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="generate a test PKI, start everything, lodge the PKI")
    _store_args(p)
    p.add_argument("--devices", type=int, default=50, help="devices in the test PKI (default 50)")
    p.add_argument("--organisations", type=int, default=24,
                   help="organisation certificates (default 24)")
    p.add_argument("--pid-file", metavar="FILE")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("testpki", help="generate a test PKI in the GB profile")
    p.add_argument("--devices", type=int, default=50)
    p.add_argument("--organisations", type=int, default=24)
    p.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", required=True, metavar="DIR")
    p.set_defaults(func=cmd_testpki)

    p = sub.add_parser("import", help="bulk-load certificates and CRLs from a directory")
    _store_args(p)
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--allow-unverified-issuer", action="store_true",
                   help="store certificates whose issuer is not available, marked unverified"
                        " (self-signed CA certificates are always imported as trust anchors)")
    p.add_argument("--skip-signature-check", action="store_true",
                   help="link certificates to their issuers by name and key id without checking"
                        " signatures (a trusted source, e.g. our own extract); recorded on each")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("lodge", help="lodge files through the mutual-TLS lodging API (DCC side)")
    p.add_argument("--url", default="https://localhost:8444")
    p.add_argument("--cert", required=True, help="DCC client certificate (PEM)")
    p.add_argument("--key", required=True, help="its private key (PEM)")
    p.add_argument("--ca", help="CA of the server's TLS certificate (PEM)")
    p.add_argument("--name", help="document name (default: file name without extension)")
    p.add_argument("--trust-anchor", action="store_true", help="lodge root CAs as trust anchors")
    p.add_argument("--status", choices=["P", "I", "N"])
    p.add_argument("--manufacturing-flag", choices=["true", "false"])
    p.add_argument("--on-behalf-of", metavar="OFFICER")
    p.add_argument("--batch-size", type=int, default=50_000)
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_lodge)

    p = sub.add_parser("users", help="relying-party users: API keys, passwords, forecasts")
    us = p.add_subparsers(dest="action", required=True)
    q = us.add_parser("add", help="add a user; prints its API key and initial password once")
    q.add_argument("name")
    q.add_argument("--operator", action="store_true",
                   help="operator role (may read the service-level reports over HTTP)")
    q.add_argument("--api-key", metavar="KEY", help="use this key instead of a random one")
    q.add_argument("--no-api-key", action="store_true", help="portal sign-in only")
    q = us.add_parser("list", help="list users (never their keys or passwords)")
    q.add_argument("--json", action="store_true")
    for verb, text in (("disable", "disable a user (its API key stops working)"),
                       ("enable", "enable a disabled user"),
                       ("reset", "new temporary portal password, to be changed at sign-in")):
        q = us.add_parser(verb, help=text)
        q.add_argument("name")
    q = us.add_parser("apikey", help="new random API key (printed once), or --set a given one")
    q.add_argument("name")
    q.add_argument("--set", metavar="KEY", help="e.g. DCC Boxed's fixed key u3bg9gt38htd0j2")
    q = us.add_parser("forecast", help="set a user's demand forecast")
    q.add_argument("name")
    q.add_argument("--per-day", type=int, help="requests per 24 hours")
    q.add_argument("--bands", metavar="A,B,C,D",
                   help="percent of the day's requests in 00-07,07-08,08-20,20-24 (UK time);"
                        " default 25,25,25,25")
    q.add_argument("--clear", action="store_true", help="remove the forecast")
    q = us.add_parser("sshkey", help="add an SFTP public key for a user, or clear its keys")
    q.add_argument("name")
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("--add", metavar="FILE", help="an OpenSSH public key file (e.g. id_ed25519.pub)")
    g.add_argument("--clear", action="store_true", help="remove every key of the user")
    for q in us.choices.values():
        _store_args(q)
    p.set_defaults(func=cmd_users)

    p = sub.add_parser("report", help="service-level reports (CPM 8, demand)")
    rs = p.add_subparsers(dest="kind", required=True)
    q = rs.add_parser("cpm", help="Code Performance Measure 8 for a calendar month")
    q.add_argument("--month", metavar="YYYY-MM", help="default: this month (UK time)")
    q.add_argument("--json", action="store_true")
    _store_args(q)
    q = rs.add_parser("demand", help="requests per user and time band against forecast")
    q.add_argument("--day", metavar="YYYY-MM-DD", help="default: today (UK time)")
    q.add_argument("--json", action="store_true")
    _store_args(q)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("replica", help="this node's read replica: status, verify, rebuild")
    p.add_argument("action", choices=("status", "verify", "rebuild"),
                   help="status: how far behind, sizes; verify: compare with the store (counts"
                        " and a digest per id range); rebuild: build anew from the store")
    p.add_argument("--no-catch-up", action="store_true",
                   help="verify: compare as it is, without applying pending changes first")
    _store_args(p)
    p.set_defaults(func=cmd_replica)

    p = sub.add_parser("export-ldif", help="write the LDAP directory as LDIF (e.g. to load slapd)")
    _store_args(p)
    p.add_argument("--out", metavar="FILE", help="output file (default: standard output)")
    p.set_defaults(func=cmd_export_ldif)

    p = sub.add_parser("extract", help="produce a full or delta extract now")
    p.add_argument("kind", choices=("full", "delta"))
    p.add_argument("--json", action="store_true", help="describe it as JSON")
    _store_args(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("export-ldap-schema",
                       help="write our LDAP attribute types and object classes as an OpenLDAP schema")
    p.add_argument("--out", metavar="FILE", help="output file (default: standard output)")
    p.set_defaults(func=cmd_export_ldap_schema)
    return ap


def main(argv: list[str] | None = None) -> int:
    from .store.embedded import NoStore

    args = parser().parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except NoStore as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
