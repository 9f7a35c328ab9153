"""A real PostgreSQL streaming standby for tests: a primary cluster of its own and a hot
standby made from it with `pg_basebackup -R`, both from the `pgserver` package's binaries and
run as the embedded server runs them (`store.embedded`: as the system user `pgserver` when we
are root, since PostgreSQL refuses to run as root). Each listens only on a unix socket in
its own directory (`listen_addresses = ''`, as the embedded server is configured).

    with StandbyPair(tmp / "pg") as pair:
        pair.primary_dsn, pair.standby_dsn    # postgresql://postgres@/smki?host=...
        pair.pause_replay() / pair.resume_replay()
        pair.stop_standby() / pair.start_standby()
        pair.stop_primary() / pair.start_primary()

Both servers are stopped when the block ends, also when it ends with an exception (and the
standby before the primary, so it does not wait on a primary that has gone).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from types import TracebackType

import asyncpg

from repository_server.store.embedded import EmbeddedError, EmbeddedPostgres, _bin

DATABASE = "smki"


class StandbyPair:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.primary = EmbeddedPostgres(root / "primary")
        self.standby = EmbeddedPostgres(root / "standby")

    # -- addresses -------------------------------------------------------------------------
    @staticmethod
    def _dsn(pg: EmbeddedPostgres) -> str:
        return pg.dsn.replace("/postgres?", f"/{DATABASE}?")

    @property
    def primary_dsn(self) -> str:
        return self._dsn(self.primary)

    @property
    def standby_dsn(self) -> str:
        return self._dsn(self.standby)

    # -- life cycle --------------------------------------------------------------------------
    def __enter__(self) -> StandbyPair:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        # The primary: initdb gives wal_level = replica, max_wal_senders = 10 and, with
        # --auth=trust, "local replication all trust" in pg_hba.conf: replication over its
        # unix socket is allowed as it stands.
        self.primary.acquire()
        self._sql(self.primary, f"CREATE DATABASE {DATABASE}", database="postgres")
        # The standby: a base backup streamed from the primary, with -R writing
        # standby.signal and primary_conninfo (the primary's socket) for it.
        pgdata = self.standby.pgdata
        pgdata.mkdir(parents=True)
        pgdata.chmod(0o700)
        self.standby._prepare_root()
        self.standby._chown(pgdata)
        result = self.primary._run(
            [str(_bin("pg_basebackup")), "-D", str(pgdata), "-R", "-X", "stream",
             "--checkpoint=fast", "--no-sync", "-d",
             f"host={self.primary.socket_dir} user=postgres"])
        if result.returncode != 0:
            raise EmbeddedError(f"pg_basebackup failed: {result.stderr.strip()}")
        with (pgdata / "postgresql.auto.conf").open("a") as fh:
            # report replay progress promptly; a small cluster (tests run several)
            fh.write("\n# tests/standby.py\nwal_receiver_status_interval = '1s'\n"
                     "shared_buffers = '32MB'\n")
        self.start_standby()

    def close(self) -> None:
        """Stop both (the standby first); each by `pg_ctl stop -m fast`, or immediate when
        that does not finish."""
        for pg in (self.standby, self.primary):
            with contextlib.suppress(Exception):
                pg.release()
            with contextlib.suppress(Exception):
                if pg.initialised() and pg.is_running():
                    pg._run([str(_bin("pg_ctl")), "-D", str(pg.pgdata), "-m", "immediate",
                             "-w", "stop"])

    # -- what the tests do to them ---------------------------------------------------------------
    def start_standby(self) -> None:
        """Start the standby (pg_ctl waits until it accepts read-only connections) and wait
        until it streams from the primary."""
        self.standby.acquire(create=False)
        deadline = time.monotonic() + 30
        while self._sql(self.standby, "SELECT status FROM pg_stat_wal_receiver") != "streaming":
            if time.monotonic() > deadline:
                raise EmbeddedError("the standby does not stream from the primary")
            time.sleep(0.1)

    def stop_standby(self) -> None:
        self.standby.stop()

    def stop_primary(self) -> None:
        self.primary.stop()

    def start_primary(self) -> None:
        self.primary.acquire()

    def pause_replay(self) -> None:
        """The standby keeps receiving WAL but applies none of it: a lagging standby."""
        self._sql(self.standby, "SELECT pg_wal_replay_pause()")

    def resume_replay(self) -> None:
        self._sql(self.standby, "SELECT pg_wal_replay_resume()")

    def in_recovery(self) -> bool:
        return bool(self._sql(self.standby, "SELECT pg_is_in_recovery()"))

    def _sql(self, pg: EmbeddedPostgres, query: str, database: str = DATABASE) -> object:
        """One statement, its first value (a connection of its own: callable from a thread
        or from outside any event loop)."""
        import asyncio

        async def run() -> object:
            conn = await asyncpg.connect(pg.dsn.replace("/postgres?", f"/{database}?"),
                                         timeout=10)
            try:
                return await conn.fetchval(query, timeout=10)
            finally:
                await conn.close()

        return asyncio.run(run())
