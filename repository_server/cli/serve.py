"""`serve`: one process, or a supervisor of `--workers` processes sharing the listening ports;
signals (TERM/INT/QUIT stop, HUP reloads), the pid file and systemd notification."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from repository_server.cli.common import install_loop, load_config, setup_logging
from repository_server.config import LISTENER_NAMES, Config, ConfigError, HostPort

log = logging.getLogger("smki-repository")


# -- serve / demo ---------------------------------------------------------------------------
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


async def serve(config: Config, *, pid_file: str | None, after_start: Any = None,
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
    config = load_config(args, overrides)
    setup_logging(config)
    if not 1 <= args.workers <= 64:
        raise ConfigError("--workers: must be between 1 and 64")
    if args.workers > 1:
        return _supervise(args, config)
    install_loop()
    return asyncio.run(serve(config, pid_file=args.pid_file,
                              reread=lambda: load_config(args, overrides)))
