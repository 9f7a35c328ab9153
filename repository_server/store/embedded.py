"""The embedded PostgreSQL: the `pgserver` package's binaries run in `<data_dir>/pgdata`
when no `database.url` is configured, so one command runs everything on a fresh machine.

Several of our processes may share one embedded server (the server, `import` run beside it,
tests). Each process that uses it holds a *lease* (`<data_dir>/pg-leases/<pid>`); the last
one to release stops PostgreSQL, so Ctrl-C leaves no orphan. Leases of dead processes (a
server killed with SIGKILL) are pruned, so a restart adopts the still-running PostgreSQL and
stops it properly later. PostgreSQL refuses to run as root: as root we run it as the system
user `pgserver` (created on demand, as the pgserver package itself does).

PostgreSQL restarts itself after a backend crashes, but when that crash recovery fails too
(a PANIC on a full disk: the recovery cannot write WAL either) the postmaster exits. A server
holding a lease therefore looks every few seconds (`supervise`) and starts it again, so the
repository recovers by itself once there is room.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

PG_USER = "pgserver"
_SOCKET_NAME = ".s.PGSQL.5432"
_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux


class EmbeddedError(RuntimeError):
    pass


class NoStore(Exception):
    """A command that reads the store was pointed where there is none (a wrong or missing
    --data-dir, or a database without our schema): it must not create an empty one."""

    def __init__(self, where: object, detail: str = "") -> None:
        self.where = str(where)
        super().__init__(f"no store in {where}" + (f" ({detail})" if detail else ""))


def _bin(name: str) -> Path:
    # Located without importing pgserver: its package import starts lock files and warnings.
    import importlib.util

    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError("the pgserver package is not installed (pip install pgserver)")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / name


def _ensure_system_user(name: str) -> None:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        name], check=True, capture_output=True)


def _make_traversable(path: Path) -> None:
    """Give others search (x) permission on every ancestor, so the postgres user can reach it."""
    for parent in [path, *path.parents]:
        if parent.exists():
            mode = parent.stat().st_mode
            if not mode & 0o001:
                parent.chmod(mode | 0o001)


def _make_readable_tree(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            mode = p.stat().st_mode
            want = mode | 0o004 | (0o001 if (mode & 0o100) else 0)
            if want != mode:
                p.chmod(want)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class EmbeddedPostgres:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.expanduser().resolve()
        self.pgdata = self.data_dir / "pgdata"
        self.leases = self.data_dir / "pg-leases"
        self._lockfile = self.data_dir / "pgdata.lock"
        self._as_root = os.geteuid() == 0
        self._held = False
        self.created = False

    # -- paths ------------------------------------------------------------------------
    @property
    def socket_dir(self) -> Path:
        local = self.data_dir / "run"
        if len(str(local / _SOCKET_NAME)) <= _MAX_SOCKET_PATH:
            return local
        digest = hashlib.sha1(str(self.pgdata).encode()).hexdigest()[:12]
        return Path("/tmp") / f"smki-pg-{digest}"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.socket_dir}"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self._lockfile.open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _run(self, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, object] = {}
        if self._as_root:
            # group too: with gid 0 left in place, root's group bits (often ---) would apply
            kwargs.update(user=PG_USER, group=PG_USER, extra_groups=[])
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            args, capture_output=True, text=True, timeout=timeout, cwd="/", **kwargs
        )

    def _prepare_root(self) -> None:
        if not self._as_root:
            return
        _ensure_system_user(PG_USER)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        _make_traversable(self.data_dir)
        install = _bin("postgres").parent.parent
        marker = install / ".smki-permissions-ok"
        if not marker.exists():
            _make_traversable(install)
            _make_readable_tree(install)
            with contextlib.suppress(OSError):
                marker.touch()

    def _chown(self, path: Path) -> None:
        if self._as_root:
            import pwd

            pw = pwd.getpwnam(PG_USER)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    # -- life cycle -----------------------------------------------------------------------
    def _initdb(self) -> None:
        log.info("initialising embedded PostgreSQL in %s", self.pgdata)
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self.pgdata.chmod(0o700)
        self._chown(self.pgdata)
        result = self._run(
            [str(_bin("initdb")), "-D", str(self.pgdata), "--auth=trust", "--encoding=UTF8",
             "--locale=C", "-U", "postgres"]
        )
        if result.returncode != 0:
            raise EmbeddedError(f"initdb failed: {result.stderr.strip() or result.stdout.strip()}")
        conf = self.pgdata / "postgresql.auto.conf"
        with conf.open("a") as fh:
            fh.write(
                "\n# smki-repository embedded defaults\n"
                "listen_addresses = ''\n"
                "max_connections = 200\n"
                "shared_buffers = '256MB'\n"
                "fsync = on\n"
                "synchronous_commit = on\n"
                "full_page_writes = on\n"
                "wal_compression = on\n"
                # Bulk imports at national scale: with a small WAL, checkpoints come every
                # few seconds and the full-page images of the random index pages written
                # after each make the WAL several KB per certificate, halving the import
                # rate. WAL only grows this big under such loads; crash recovery replays
                # at most this much.
                "max_wal_size = '16GB'\n"
                "checkpoint_timeout = '30min'\n"
                "unix_socket_permissions = 0777\n"
                "logging_collector = off\n"
            )

    def is_running(self) -> bool:
        result = self._run([str(_bin("pg_ctl")), "-D", str(self.pgdata), "status"])
        return result.returncode == 0

    def _start(self) -> None:
        sock = self.socket_dir
        sock.mkdir(parents=True, exist_ok=True)
        if self._as_root:
            sock.chmod(0o777)
        logfile = self.pgdata / "server.log"
        result = self._run(
            [str(_bin("pg_ctl")), "-D", str(self.pgdata), "-w", "-t", "60", "-l", str(logfile),
             "-o", f"-k {sock}", "start"]
        )
        if result.returncode != 0:
            tail = ""
            with contextlib.suppress(OSError):
                tail = logfile.read_text(errors="replace")[-2000:]
            raise EmbeddedError(f"embedded PostgreSQL did not start: {result.stderr.strip()}\n{tail}")

    def stop(self) -> None:
        self._run([str(_bin("pg_ctl")), "-D", str(self.pgdata), "-m", "fast", "-w", "stop"])

    def _live_leases(self) -> list[int]:
        pids = []
        if self.leases.is_dir():
            for entry in self.leases.iterdir():
                try:
                    pid = int(entry.name)
                except ValueError:
                    continue
                if _pid_alive(pid):
                    pids.append(pid)
                else:
                    entry.unlink(missing_ok=True)
        return pids

    def initialised(self) -> bool:
        return (self.pgdata / "PG_VERSION").exists()

    def acquire(self, *, create: bool = True) -> str:
        """Make sure PostgreSQL runs (initialising it the first time, if `create`: otherwise
        a data directory without one is NoStore, and nothing is written there); return its
        DSN. `created` says whether this call initialised it."""
        if not create and not self.initialised():
            raise NoStore(self.data_dir, f"no initialised PostgreSQL in {self.pgdata}: check"
                          " --data-dir, --config or SMKI_DATABASE__URL; `serve` or `demo` creates"
                          " a store")
        with self._locked():
            self._prepare_root()
            if not self.initialised():
                self._initdb()
                self.created = True
            if not self.is_running():
                started = time.monotonic()
                self._start()
                log.info("embedded PostgreSQL started in %.1f s", time.monotonic() - started)
            self.leases.mkdir(parents=True, exist_ok=True)
            (self.leases / str(os.getpid())).touch()
            self._held = True
        return self.dsn

    def _postmaster_alive(self) -> bool:
        """The cheap check (no subprocess): postmaster.pid names a live process."""
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return False
        return _pid_alive(pid)

    def revive(self) -> bool:
        """Start PostgreSQL again if it is not running while this process holds a lease (it
        stopped by itself: failed crash recovery, or killed); True if it was started. Every
        server process calls this every 2 s: the usual answer (alive) costs a file read."""
        if not self._held or self._postmaster_alive() or self.is_running():
            return False
        with self._locked():  # (then again: another process may have started it meanwhile)
            if not self._held or self.is_running():
                return False
            self._start()
            return True

    async def supervise(self, interval: float = 2.0) -> None:
        """Until cancelled: `revive` every `interval` seconds. A failed start (the disk still
        full) is tried again; logged the first time and then once a minute."""
        failures = 0
        while True:
            await asyncio.sleep(interval)
            try:
                if await asyncio.to_thread(self.revive):
                    log.warning("embedded PostgreSQL had stopped: started it again (after %d"
                                " failed attempts)", failures)
                failures = 0
            except (EmbeddedError, OSError, subprocess.SubprocessError) as exc:
                failures += 1
                if failures == 1 or failures % max(1, round(60 / interval)) == 0:
                    log.error("embedded PostgreSQL has stopped and does not start again (attempt"
                              " %d, one every %.0f s): %s", failures, interval, exc)

    def release(self) -> None:
        """Drop this process's lease; stop PostgreSQL when no other process uses it."""
        if not self._held:
            return
        with self._locked():
            (self.leases / str(os.getpid())).unlink(missing_ok=True)
            self._held = False
            if not self._live_leases() and self.is_running():
                log.info("stopping embedded PostgreSQL")
                self.stop()
