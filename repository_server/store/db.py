"""All SQL of the repository, behind one `Store` class over an asyncpg pool (and, for the
read replica's feed, `store/feed.py`).

Handlers and the lodging path call methods here and never build SQL themselves. Writes of
lodged objects (`insert_*`, `set_status`) are called only from `lodge/`; the portal writes
only its own sign-in state (sessions, failure counts) and a user's own password change.
Every write that changes what readers see sends a NOTIFY on `smki_changes` inside its
transaction, so caches on every process and node hear of it at commit time and never before.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any

import asyncpg

from repository_server.pki.model import CertInfo, CrlInfo
from repository_server.readmodel.records import CrlRecord

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "smki_changes"
_MIGRATION_LOCK = 0x534D4B49  # "SMKI": advisory lock id held while migrating
# Held shared by every transaction that lodges something (or changes a status), and
# exclusively, for an instant, by an extract taking its markers: then no lodging is in
# flight, so every id at or below the markers is committed and every later one is above
# them (ids are drawn after the lock). Without it a batch drawing ids before another's but
# committing after it could fall between two deltas.
_CHANGE_LOCK = 0x534D4B43  # "SMKC"
# Held from a writer's change-log row to its commit (see migration 0006): change numbers
# commit in order, with no gaps.
_FEED_LOCK = 0x534D4B46  # "SMKF"
_EXTRACT_LOCK = 0x534D4B58  # "SMKX": one extract producer in the cluster (session lock)


def unavailable(exc: BaseException) -> bool:
    """Whether an error means the store cannot be reached right now (PostgreSQL down,
    restarting, or too slow: a timeout), as opposed to a bug or a refused statement. Readers
    answer these with 503 and Retry-After, lodging acknowledges nothing."""
    if isinstance(exc, OSError | TimeoutError):  # refused, reset, no socket; every timeout
        return True
    if isinstance(exc, asyncpg.PostgresConnectionError | asyncpg.OperatorInterventionError
                  | asyncpg.InsufficientResourcesError):
        # lost mid-statement; shutting down, starting, terminated, statement timeout;
        # disk full, out of memory, no connection slot
        return True
    if isinstance(exc, asyncpg.InterfaceError) and not isinstance(exc, ValueError):
        text = str(exc)
        return "connection" in text or "pool" in text  # "connection is closed", ...
    return False


class ConflictError(Exception):
    """Another object already holds this identity (issuer + serial, or CRL number)."""

    def __init__(self, message: str, items: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.items = list(items)


@dataclass(frozen=True, slots=True)
class CertRow:
    id: int
    serial: str
    issuer_key_id: bytes | None
    der: bytes
    sha256: bytes
    lodged_at: datetime
    kind: str
    eui64: bytes | None
    role: int | None
    usage: str | None
    status: str  # lodged status P/I/N (R and E are computed when answering)
    manufacturing_flag: bool
    not_after: datetime
    not_before: datetime
    subject_key_id: bytes | None
    subject_name: str
    issuer_name: str


_CERT_ROW_COLS = ("id, serial, issuer_key_id, der, sha256, lodged_at, kind, eui64, role, usage,"
                  " status, manufacturing_flag, not_after, not_before, subject_key_id, subject_name,"
                  " issuer_name")


@dataclass(frozen=True, slots=True)
class UserRow:
    id: int
    name: str
    role: str  # party | operator
    api_key_sha256: bytes | None
    api_key_hint: str | None
    password_hash: str | None
    must_change_password: bool
    disabled: bool
    forecast_per_day: int | None
    forecast_bands: tuple[int, int, int, int] | None  # percentages of the day's forecast
    created_at: datetime
    updated_at: datetime


_USER_COLS = ("id, name, role, api_key_sha256, api_key_hint, password_hash, must_change_password,"
              " disabled, forecast_per_day, forecast_bands, created_at, updated_at")


def _user_row(r: asyncpg.Record) -> UserRow:
    bands = r["forecast_bands"]
    return UserRow(r["id"], r["name"], r["role"], r["api_key_sha256"], r["api_key_hint"],
                   r["password_hash"], r["must_change_password"], r["disabled"],
                   r["forecast_per_day"], tuple(bands) if bands is not None else None,
                   r["created_at"], r["updated_at"])


@dataclass(frozen=True, slots=True)
class CpmRow:
    month: str
    interface: str
    operation: str
    user_name: str
    received: int
    answered: int
    within_trt: int
    failed: int
    seconds_sum: float
    buckets: tuple[int, ...]
    trt_seconds: float  # the Target Response Time these counts were judged by
    refused: int = 0  # 400/401/403 answers: not in `received` (service_levels.REFUSED)


@dataclass(frozen=True, slots=True)
class IssuerRow:
    id: int
    subject_dn: bytes
    subject_key_id: bytes | None
    kind: str
    der: bytes


CrlRow = CrlRecord  # one CRL version (the replica keeps the same fields)


@dataclass(frozen=True, slots=True)
class DocumentRow:
    name: str
    version: int
    content_type: str
    size: int
    sha256: bytes
    lodged_at: datetime
    body: bytes | None  # None in listings


@dataclass(frozen=True, slots=True)
class ExtractMarkers:
    """What an extract covers: certificates with id <= cert_id, status changes numbered
    <= change, CRL versions with id <= crl_id, document versions with id <= document_id."""

    cert_id: int = 0
    change: int = 0
    crl_id: int = 0
    document_id: int = 0


@dataclass(frozen=True, slots=True)
class ExtractRow:
    id: int
    name: str
    kind: str  # full | delta
    slot: str | None
    state: str  # producing | published | failed | removed
    started_at: datetime
    published_at: datetime | None
    previous_id: int | None
    upto: ExtractMarkers
    size: int | None
    sha256: bytes | None
    counts: dict[str, Any]


_EXTRACT_COLS = ("id, name, kind, slot, state, started_at, published_at, previous_id,"
                 " cert_id_upto, change_upto, crl_id_upto, document_id_upto, size, sha256, counts")


def _extract_row(r: asyncpg.Record) -> ExtractRow:
    return ExtractRow(r["id"], r["name"], r["kind"], r["slot"], r["state"], r["started_at"],
                      r["published_at"], r["previous_id"],
                      ExtractMarkers(r["cert_id_upto"], r["change_upto"], r["crl_id_upto"],
                                     r["document_id_upto"]),
                      r["size"], r["sha256"], r["counts"])


@dataclass(frozen=True, slots=True)
class PortalSessionRow:
    user_name: str
    role: str
    must_change_password: bool
    created_at: datetime
    last_seen: datetime


Failures = tuple[datetime, ...]
# (recent failure times, locked until) -> the same after one more failure
FailureRule = Callable[[Failures, datetime | None], tuple[Failures, datetime | None]]
# (recent failure times, attempts in flight, locked until) -> may one more attempt begin
TryRule = Callable[[Failures, int, datetime | None], bool]
# An attempt in flight this long belonged to a process that died mid-check: a failure.
STALE_ATTEMPT_SECONDS = 120


async def _record_change(conn: asyncpg.Connection, kind: str, *, lo: int | None = None,
                         hi: int | None = None, xact: bool = False,
                         ids: Sequence[int] | None = None) -> int:
    """Append to the change log (the replica feed), last thing before commit. Returns the
    change's sequence number."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _FEED_LOCK)
    return int(await conn.fetchval(
        "INSERT INTO changes (seq, kind, lo, hi, xact, ids)"
        " SELECT coalesce(max(seq), 0) + 1, $1, $2, $3,"
        " CASE WHEN $4 THEN txid_current() END, $5::bigint[] FROM changes RETURNING seq",
        kind, lo, hi, xact, list(ids) if ids is not None else None))


def _user_conflict(exc: asyncpg.UniqueViolationError, name: str) -> str:
    if "api_key" in (exc.constraint_name or ""):
        return "that API key is already another user's"
    return f"a user named {name!r} already exists"


def _crl_row(r: asyncpg.Record) -> CrlRow:
    return CrlRow(id=r["id"], kind=r["kind"], issuer_key_id=r["issuer_key_id"],
                  issuer_name=r["issuer_name"], crl_number=int(r["crl_number"]),
                  this_update=r["this_update"], next_update=r["next_update"], sha256=r["sha256"],
                  der=r["der"], revoked_count=r["revoked_count"], lodged_at=r["lodged_at"])


# Columns of the COPY into the temporary table, in order (see insert_certificates).
_CERT_COLUMNS = (
    "idx", "serial", "issuer_dn", "issuer_name", "issuer_key_id", "subject_dn", "subject_name",
    "subject_key_id", "eui64", "role", "usage", "kind", "not_before", "not_after", "sha256",
    "sha1", "der", "status", "manufacturing_flag", "lint", "issuer_verified", "trust_anchor",
)


def cert_record(
    idx: int, info: CertInfo, *, status: str, manufacturing_flag: bool, issuer_verified: bool,
    trust_anchor: bool, extra_findings: Sequence[dict[str, str]] = (),
) -> tuple[Any, ...]:
    lint = [{"code": f.code, "message": f.message} for f in info.findings] + list(extra_findings)
    lint_text = json.dumps(lint) if lint else "[]"
    return (
        idx, info.serial, info.issuer_dn, info.issuer_name, info.issuer_key_id, info.subject_dn,
        info.subject_name, info.subject_key_id, info.eui64, info.role,
        info.usage.value if info.usage else None, info.kind.value, info.not_before,
        info.not_after, info.sha256, info.sha1, info.der, status, manufacturing_flag,
        lint_text, issuer_verified, trust_anchor,
    )


def _jsonb_encode(value: str | bytes) -> bytes:
    """jsonb binary format: version 1, then the JSON text (values arrive pre-serialised)."""
    return b"\x01" + (value if isinstance(value, bytes) else value.encode())


def _jsonb_decode(data: bytes) -> Any:
    return json.loads(data[1:])


async def _init_connection(conn: asyncpg.Connection) -> None:
    # binary, so that jsonb columns can be filled by COPY (binary) like everything else
    await conn.set_type_codec("jsonb", encoder=_jsonb_encode, decoder=_jsonb_decode,
                              schema="pg_catalog", format="binary")


async def _copy_records(conn: asyncpg.Connection, table: str, records: Sequence[tuple[Any, ...]],
                        columns: Sequence[str], timeout: float) -> None:
    """`conn.copy_records_to_table`, ended when the connection is lost or after `timeout`.
    asyncpg (0.32) waits for the socket to drain with no bound: a backend that dies in the
    middle of a COPY (PostgreSQL's PANIC on a full disk) or a stalled network would hold the
    lodging request (and its connection) for ever instead of answering 503. A COPY cut short
    takes its connection with it (the pool opens another): its protocol state is unknown."""
    lost = asyncio.get_running_loop().create_future()

    def on_lost(_conn: Any) -> None:
        if not lost.done():
            lost.set_result(None)

    conn.add_termination_listener(on_lost)
    copy = asyncio.ensure_future(conn.copy_records_to_table(table, records=records,
                                                            columns=columns))
    copy.add_done_callback(lambda task: task.cancelled() or task.exception())  # read, always
    try:
        await asyncio.wait((copy, lost), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        cut = not copy.done()
        if cut:
            copy.cancel()
            await asyncio.wait((copy,))  # (asyncpg ends the COPY at once, without waiting)
        # (a lost connection has left the pool already: its proxy then raises InterfaceError)
        with contextlib.suppress(asyncpg.InterfaceError):
            conn.remove_termination_listener(on_lost)
            if cut:
                conn.terminate()
    if lost.done():  # (whatever the COPY says then, its transaction cannot commit)
        raise asyncpg.ConnectionDoesNotExistError(f"connection lost during COPY to {table}")
    if not cut:
        copy.result()  # its own error, if any
        return
    raise TimeoutError(f"COPY to {table} took longer than {timeout} s")


async def _unlock(conn: Any, key: int) -> None:
    """Release a session advisory lock; if that fails (cancelled, connection trouble), end
    the session, which releases it: the pool does not reset connections (below)."""
    try:
        await conn.execute("SELECT pg_advisory_unlock($1)", key)
    except BaseException:
        conn.terminate()
        raise


async def _reset_connection(_conn: asyncpg.Connection) -> None:
    """What the pool runs on every release, after asyncpg's own `_reset` (which rolls back an
    open transaction and drops listeners). asyncpg's default adds a round trip, `SELECT
    pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;`, on every release: 15 % of
    the server's CPU on store lookups (py-spy: GET by serial, certificate cache off, 100k
    store), plus PostgreSQL's side. Our pooled connections keep no session state: no SET, no
    LISTEN (the catalog has its own connection), cursors only inside transactions, and the
    two session advisory locks (migrate, extract_lock) are released by their owners, who
    terminate the connection if the unlock itself fails."""


class _Acquired:
    """`async with pool.acquire() as conn`: a turn at the gate, then a connection, the whole
    wait bounded by `timeout`; the turn is given back with the connection."""

    def __init__(self, pool: BoundedPool, timeout: float) -> None:
        self.pool = pool
        self.timeout = timeout
        self.inner: Any = None

    async def __aenter__(self) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        async with asyncio.timeout(self.timeout):
            await self.pool.gate.acquire()
        try:
            self.inner = self.pool.raw.acquire(timeout=max(0.001, deadline - loop.time()))
            return await self.inner.__aenter__()
        except BaseException:
            self.pool.gate.release()
            raise

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self.inner.__aexit__(*exc)
        finally:
            self.pool.gate.release()


class BoundedPool:
    """The asyncpg pool, with every wait bounded. asyncpg's `pool.fetch()` and
    `pool.acquire()` wait for a free connection for ever, and a connection released without
    a timeout is reset without one: through a stalled network either would hang a request.
    Here acquiring (a turn, a free slot, or a new connection) and releasing (asyncpg rolls
    back a transaction left open; no reset query, see `_reset_connection`) are bounded by
    `acquire_timeout`, and each statement by the pool's `command_timeout`."""

    def __init__(self, pool: asyncpg.Pool, acquire_timeout: float) -> None:
        self.raw = pool
        self.acquire_timeout = acquire_timeout
        # First come, first served. asyncpg's pool hands a released connection to whoever
        # asks next, and a waiter woken for it finds it taken and queues again at the back:
        # with 64 clients on 10 connections, p99 went from 7 ms (16 clients) to 683 ms.
        # asyncio.Semaphore serves waiters in order, and only as many tasks as there are
        # connections ever reach the pool.
        self.gate = asyncio.Semaphore(pool.get_max_size())

    def acquire(self, *, timeout: float | None = None) -> _Acquired:
        return _Acquired(self, timeout or self.acquire_timeout)

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Any]:
        async with self.acquire() as conn:
            return list(await conn.fetch(query, *args, timeout=timeout))

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        async with self.acquire() as conn:
            return await conn.fetchrow(query, *args, timeout=timeout)

    async def fetchval(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        async with self.acquire() as conn:
            return await conn.fetchval(query, *args, timeout=timeout)

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        async with self.acquire() as conn:
            return str(await conn.execute(query, *args, timeout=timeout))

    async def close(self) -> None:
        await self.raw.close()


class Store:
    def __init__(self, pool: asyncpg.Pool, dsn: str, *, connect_timeout: float = 10.0,
                 command_timeout: float = 30.0) -> None:
        self.pool = BoundedPool(pool, connect_timeout)
        self.dsn = dsn
        self.connect_timeout = connect_timeout  # also for the catalog's LISTEN connection
        self.command_timeout = command_timeout  # (the pool's too: here for COPY, see _copy_records)

    @classmethod
    async def connect(cls, dsn: str, *, min_size: int = 2, max_size: int = 10,
                      command_timeout: float = 30.0, connect_timeout: float = 10.0,
                      migrate: bool = True) -> Store:
        pool = await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size, command_timeout=command_timeout,
            timeout=connect_timeout, init=_init_connection, reset=_reset_connection,
        )
        store = cls(pool, dsn, connect_timeout=connect_timeout, command_timeout=command_timeout)
        if migrate:
            await store.migrate()
        return store

    async def close(self) -> None:
        await self.pool.close()

    # -- schema -----------------------------------------------------------------------
    async def migrate(self) -> list[str]:
        """Apply pending migrations (files `NNNN_name.sql`) once, under an advisory lock."""
        scripts = sorted(
            (p.name, p.read_text())
            for p in resources.files("repository_server.store").joinpath("migrations").iterdir()
            if p.name.endswith(".sql")
        )
        applied: list[str] = []
        async with self.pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
            try:
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                )
                done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
                for name, sql in scripts:
                    if name in done:
                        continue
                    async with conn.transaction():
                        await conn.execute(sql)
                        await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", name)
                    log.info("applied migration %s", name)
                    applied.append(name)
            finally:
                await _unlock(conn, _MIGRATION_LOCK)
        return applied

    async def has_schema(self) -> bool:
        """Whether this database holds a store (our schema), before any migration."""
        found: bool = await self.pool.fetchval(
            "SELECT to_regclass('schema_migrations') IS NOT NULL")
        return found

    async def deployment_secret(self, name: str) -> bytes:
        """The deployment's secret `name`: 32 random bytes made by the first process to ask
        (race-free: a concurrent insert waits for the first one's commit and does nothing),
        the same for every process and node on this store."""
        async with self.pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO deployment_secrets (name, secret) VALUES ($1, $2)"
                " ON CONFLICT (name) DO NOTHING", name, secrets.token_bytes(32))
            value: bytes = await conn.fetchval(
                "SELECT secret FROM deployment_secrets WHERE name = $1", name)
        return value

    async def ping(self) -> None:
        async with self.pool.acquire(timeout=2) as conn:
            await conn.fetchval("SELECT 1", timeout=2)

    # -- certificates: reads ----------------------------------------------------------------
    async def certificates_by_serial(self, serial: str) -> list[CertRow]:
        rows = await self.pool.fetch(
            f"SELECT {_CERT_ROW_COLS} FROM certificates WHERE serial = $1 ORDER BY id", serial)
        return [CertRow(*r) for r in rows]

    # (every other read of what is lodged goes through the node's replica: store/feed.py)
    async def certificate_count(self) -> int:
        return int(await self.pool.fetchval("SELECT count(*) FROM certificates"))

    async def issuers(self, *, key_id: bytes | None = None, subject_dn: bytes | None = None,
                      cas_only: bool = True) -> list[IssuerRow]:
        """Certificates that may have issued something: CAs by default, any by key id."""
        sql = "SELECT id, subject_dn, subject_key_id, kind, der FROM certificates WHERE true"
        args: list[Any] = []
        if cas_only:
            sql += " AND kind IN ('root', 'ca')"
        if key_id is not None:
            args.append(key_id)
            sql += f" AND subject_key_id = ${len(args)}"
        if subject_dn is not None:
            args.append(subject_dn)
            sql += f" AND subject_dn = ${len(args)}"
        rows = await self.pool.fetch(sql + " ORDER BY id", *args)
        return [IssuerRow(*r) for r in rows]

    # -- certificates: writes (lodge/ only) ----------------------------------------------
    async def insert_certificates(
        self, records: Sequence[tuple[Any, ...]], *, lodged_by: str, audit: dict[str, Any],
    ) -> tuple[list[int], list[int], list[str], int]:
        """Store a batch atomically. Returns (indexes stored, indexes already present,
        change notifications sent: "serials:..." for serials now shared with another issuer's
        certificate, "certs:LO:HI" for the id range the new rows fall in, the change-log
        sequence number: 0 when nothing was stored).

        Raises ConflictError (and stores nothing) when a record has the issuer and serial
        of a different stored certificate. Committed (and so durable: synchronous_commit)
        before it returns.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", _CHANGE_LOCK)
            # Every id this batch takes is above the sequence's value now (sequences are not
            # transactional), and at most its value after the insert: readers drop what they
            # cached for the EUI-64s lodged in that range (a superset of ours, harmlessly).
            id_floor = int(await conn.fetchval("SELECT last_value - 1 FROM certificates_id_seq"))
            # Fast path, new certificates (the common case): COPY straight into the table
            # under a savepoint. PostgreSQL then spends about a third of the CPU of the
            # general path (70 vs 160-240 ms per 4,000 rows, measured on this VM). Any
            # unique violation (identical bytes, a conflict, a duplicate in the batch)
            # rolls back to the savepoint and the general path sorts it out.
            direct_cols = [c for c in _CERT_COLUMNS if c != "idx"] + ["lodged_by"]
            try:
                async with conn.transaction():
                    await _copy_records(conn, "certificates", [(*r[1:], lodged_by) for r in records],
                                        direct_cols, self.command_timeout)
                stored, identical = list(range(len(records))), list[int]()
            except asyncpg.UniqueViolationError:
                stored, identical = await self._insert_general(conn, records, lodged_by)
            # A serial now stored under two issuers: caches holding it must learn of the
            # sibling (rare: serials are random 16 octets). One index probe per serial,
            # whatever plan PostgreSQL caches for this prepared statement (`serial = ANY($1)`
            # got a generic plan that scanned the whole table: seconds per batch at 200k rows).
            serial_col = _CERT_COLUMNS.index("serial")
            shared = [r["s"] for r in await conn.fetch(
                "SELECT s FROM unnest($1::text[]) AS s WHERE"
                " (SELECT count(*) FROM certificates c WHERE c.serial = s) > 1 LIMIT 200",
                list({records[i][serial_col] for i in stored}))] if stored else []
            await self._audit(conn, **audit)
            changes = []
            seq = 0
            if shared:
                changes.append("serials:" + ",".join(shared))
            if stored:
                id_ceiling = int(await conn.fetchval("SELECT last_value FROM certificates_id_seq"))
                changes.append(f"certs:{id_floor}:{id_ceiling}")
                seq = await _record_change(conn, "certs", lo=id_floor, hi=id_ceiling, xact=True)
            for payload in changes:
                await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, payload)
        return stored, identical, changes, seq

    async def _insert_general(self, conn: asyncpg.Connection, records: Sequence[tuple[Any, ...]],
                              lodged_by: str) -> tuple[list[int], list[int]]:
        """Through a temporary table: conflicts refused, identical bytes and in-batch
        duplicates reported as identical. Returns (indexes stored, indexes identical)."""
        await conn.execute(
            "CREATE TEMPORARY TABLE incoming (LIKE certificates INCLUDING DEFAULTS,"
            " idx integer NOT NULL) ON COMMIT DROP")
        await conn.execute("ALTER TABLE incoming DROP COLUMN id, DROP COLUMN lodged_at,"
                           " DROP COLUMN lodged_by")
        await _copy_records(conn, "incoming", records, _CERT_COLUMNS, self.command_timeout)
        await conn.execute("ANALYZE incoming")
        conflicts = await conn.fetch(
            "SELECT i.idx FROM incoming i JOIN certificates c"
            " ON c.serial = i.serial AND c.issuer_dn = i.issuer_dn AND c.sha256 <> i.sha256"
            " UNION SELECT i.idx FROM incoming i JOIN incoming j"
            " ON j.serial = i.serial AND j.issuer_dn = i.issuer_dn AND j.sha256 <> i.sha256")
        if conflicts:
            raise ConflictError("a different certificate with the same issuer and serial"
                                " exists", sorted(r["idx"] for r in conflicts))
        present = {r["idx"] for r in await conn.fetch(
            "SELECT i.idx FROM incoming i WHERE EXISTS"
            " (SELECT 1 FROM certificates c WHERE c.sha256 = i.sha256)")}
        cols = ", ".join(c for c in _CERT_COLUMNS if c != "idx")
        inserted = {r["sha256"] for r in await conn.fetch(
            f"INSERT INTO certificates ({cols}, lodged_by)"
            f" SELECT DISTINCT ON (sha256) {cols}, $1 FROM incoming ORDER BY sha256, idx"
            " ON CONFLICT DO NOTHING RETURNING sha256", lodged_by)}
        sha_col = _CERT_COLUMNS.index("sha256")
        stored: list[int] = []
        identical: list[int] = []
        lost: list[int] = []
        seen: set[bytes] = set()
        for i, rec in enumerate(records):
            sha = rec[sha_col]
            if sha in inserted and sha not in seen:
                stored.append(i)
            elif sha in inserted or i in present:
                identical.append(i)
            else:
                lost.append(i)
            seen.add(sha)
        if lost:
            # Neither stored nor there before: a concurrent writer got there first.
            # Identical bytes are a no-op; anything else is a conflict.
            again = {r["idx"] for r in await conn.fetch(
                "SELECT i.idx FROM incoming i JOIN certificates c ON c.sha256 = i.sha256"
                " WHERE i.idx = ANY($1::int[])", lost)}
            bad = [i for i in lost if i not in again]
            if bad:
                raise ConflictError("a different certificate with the same issuer and"
                                    " serial exists", bad)
            identical = sorted(identical + lost)
        return stored, identical

    async def set_status(self, serial: str, issuer_key_id: bytes | None, status: str | None,
                         manufacturing_flag: bool | None, audit: dict[str, Any]
                         ) -> tuple[list[dict[str, Any]], int]:
        """Change a certificate's lodged status and/or flag. Returns the rows changed (one,
        or none if there is no such certificate) and the change-log sequence number."""
        seq = 0
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", _CHANGE_LOCK)
            rows = await conn.fetch(
                "UPDATE certificates SET status = coalesce($3, status),"
                " manufacturing_flag = coalesce($4, manufacturing_flag),"
                " changed_seq = nextval('certificate_changes_seq')"
                " WHERE serial = $1 AND ($2::bytea IS NULL OR issuer_key_id = $2)"
                " RETURNING id, serial, issuer_key_id, status, manufacturing_flag, eui64",
                serial, issuer_key_id, status, manufacturing_flag)
            if len(rows) == 1:
                await self._audit(conn, **audit)
                eui = rows[0]["eui64"]
                seq = await _record_change(conn, "status", ids=[rows[0]["id"]])
                await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL,
                                   f"status:{serial}:{eui.hex() if eui else ''}")
            elif len(rows) > 1:
                raise ConflictError("serial is not unique: give the issuer key id")
            return [dict(r) for r in rows], seq

    # -- CRLs ---------------------------------------------------------------------------
    async def insert_crl(self, info: CrlInfo, *, kind: str, issuer_key_id: bytes,
                         issuer_cert_id: int, lodged_by: str, audit: dict[str, Any],
                         lint: list[dict[str, str]]) -> tuple[str, int | None, int]:
        """Store a CRL version. Returns ('stored'|'identical', stored_max_before, change-log
        sequence number or 0).

        Raises ConflictError when the CRL number is not strictly greater than the stored one
        for this issuer (checked under a per-issuer advisory lock, so two lodgings of
        different CRLs cannot both pass the check)."""
        assert info.crl_number is not None
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", _CHANGE_LOCK)
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                               "crl:" + issuer_key_id.hex())
            existing = await conn.fetchval("SELECT id FROM crls WHERE sha256 = $1", info.sha256)
            current = await conn.fetchval(
                "SELECT max(crl_number) FROM crls WHERE issuer_key_id = $1", issuer_key_id)
            current_int = int(current) if current is not None else None
            if existing is not None:
                await self._audit(conn, **{**audit, "outcome": "noop"})
                return "identical", current_int, 0
            if current_int is not None and info.crl_number <= current_int:
                raise ConflictError(
                    f"CRL number {info.crl_number} is not greater than the stored"
                    f" {current_int} for this issuer")
            crl_id = await conn.fetchval(
                "INSERT INTO crls (kind, issuer_dn, issuer_name, issuer_key_id, issuer_cert_id,"
                " crl_number, this_update, next_update, sha256, der, revoked_count, lint,"
                " lodged_by) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12::text::jsonb,$13)"
                " RETURNING id",
                kind, info.issuer_dn, info.issuer_name, issuer_key_id, issuer_cert_id,
                info.crl_number, info.this_update, info.next_update, info.sha256, info.der,
                len(info.revoked), json.dumps(lint), lodged_by)
            if info.revoked:
                await _copy_records(
                    conn, "revoked_entries",
                    [(crl_id, e.serial, e.revocation_date, e.reason) for e in info.revoked],
                    ("crl_id", "serial", "revocation_date", "reason"), self.command_timeout)
            await self._audit(conn, **audit)
            seq = await _record_change(conn, "crl", ids=[crl_id])
            await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL,
                               "crl:" + issuer_key_id.hex())
        return "stored", current_int, seq

    _CRL_COLS = ("id, kind, issuer_key_id, issuer_name, crl_number, this_update, next_update,"
                 " sha256, der, revoked_count, lodged_at")

    # -- documents -------------------------------------------------------------------------
    async def insert_document(self, name: str, content_type: str, body: bytes, sha256: bytes,
                              *, lodged_by: str, audit: dict[str, Any]) -> tuple[str, int, int]:
        """New version of a document, or ('identical', version) if the current one matches;
        then the change-log sequence number (0 if identical)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", _CHANGE_LOCK)
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                               "doc:" + name)
            current = await conn.fetchrow(
                "SELECT version, sha256, content_type FROM documents WHERE name = $1"
                " ORDER BY version DESC LIMIT 1", name)
            if current and current["sha256"] == sha256 and current["content_type"] == content_type:
                await self._audit(conn, **{**audit, "outcome": "noop"})
                return "identical", int(current["version"]), 0
            version = int(current["version"]) + 1 if current else 1
            doc_id = await conn.fetchval(
                "INSERT INTO documents (name, version, content_type, body, size, sha256, lodged_by)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                name, version, content_type, body, len(body), sha256, lodged_by)
            await self._audit(conn, **{**audit, "detail": {**audit.get("detail", {}),
                                                           "version": version}})
            seq = await _record_change(conn, "doc", ids=[doc_id])
            await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, "doc:" + name)
        return "stored", version, seq

    _DOC_COLS = "name, version, content_type, size, sha256, lodged_at"

    # -- certificates: what the portal shows beyond the cached entry -------------------------
    # -- portal sign-in state ----------------------------------------------------------------
    async def portal_account(self, name: str) -> tuple[UserRow, Failures, datetime | None] | None:
        """A user with their recent sign-in failures and lock, or None if there is no such user."""
        r = await self.pool.fetchrow(
            f"SELECT {', '.join('u.' + c for c in _USER_COLS.split(', '))},"
            " coalesce(a.failures, '{}') AS failures, a.locked_until"
            " FROM users u LEFT JOIN portal_accounts a ON a.user_name = u.name WHERE u.name = $1",
            name)
        if r is None:
            return None
        return _user_row(r), tuple(r["failures"]), r["locked_until"]

    async def sign_in_begin(self, name: str, may_try: TryRule,
                            rule: FailureRule) -> int | None:
        """Register a password attempt for an existing user before its password is checked
        (migration 0007), or None if it may not be checked (locked, or as many attempts
        recently failed or in flight as the limit allows). Under the account's row lock, so
        attempts on several nodes at once are counted one after another. Attempts left in
        flight by a process that died are counted as failures first (`rule`)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO portal_accounts (user_name) VALUES ($1)"
                               " ON CONFLICT DO NOTHING", name)
            r = await conn.fetchrow("SELECT failures, locked_until FROM portal_accounts"
                                    " WHERE user_name = $1 FOR UPDATE", name)
            failures, locked_until = tuple(r["failures"]), r["locked_until"]
            stale = await conn.fetch(
                "DELETE FROM sign_in_attempts WHERE user_name = $1 AND started_at"
                " < clock_timestamp() - make_interval(secs => $2) RETURNING id",
                name, STALE_ATTEMPT_SECONDS)
            if stale:
                for _ in stale:
                    failures, locked_until = rule(failures, locked_until)
                await conn.execute("UPDATE portal_accounts SET failures = $2, locked_until = $3"
                                   " WHERE user_name = $1", name, list(failures), locked_until)
                await self._audit(conn, actor="repository", action="auth.attempt-abandoned",
                                  outcome="refused", object=name,
                                  detail={"reason": "attempt never finished (process ended)",
                                          "count": len(stale)})
            in_flight = await conn.fetchval(
                "SELECT count(*) FROM sign_in_attempts WHERE user_name = $1", name)
            if not may_try(failures, int(in_flight), locked_until):
                return None
            attempt: int = await conn.fetchval(
                "INSERT INTO sign_in_attempts (user_name) VALUES ($1) RETURNING id", name)
            return attempt

    async def sign_in_failed(self, name: str, attempt: int, rule: FailureRule,
                             audit: dict[str, Any]) -> tuple[Failures, datetime | None, bool]:
        """An attempt's password was wrong: it leaves the attempts in flight and counts as a
        failure; `rule` gets the stored state under a row lock and returns the new one. Returns
        that state and whether this failure locked the account."""
        async with self.pool.acquire() as conn, conn.transaction():
            r = await conn.fetchrow("SELECT failures, locked_until FROM portal_accounts"
                                    " WHERE user_name = $1 FOR UPDATE", name)
            await conn.execute("DELETE FROM sign_in_attempts WHERE id = $1", attempt)
            before = r["locked_until"]
            failures, locked_until = rule(tuple(r["failures"]), before)
            await conn.execute("UPDATE portal_accounts SET failures = $2, locked_until = $3"
                               " WHERE user_name = $1", name, list(failures), locked_until)
            await self._audit(conn, **audit)
        return failures, locked_until, locked_until is not None and locked_until != before

    async def sign_in_succeeded(self, name: str, attempt: int, still_locked: Callable[
            [datetime | None], bool], audit: dict[str, Any] | None, *,
            session: tuple[bytes, datetime] | None = None) -> bool:
        """An attempt's password was right: accepted only if the account is not locked now
        (failures counted on other attempts meanwhile may have locked it). Accepted: the
        failures are forgotten, the session (token SHA-256, start) stored, `audit` written,
        all in one transaction. Returns whether it was accepted."""
        async with self.pool.acquire() as conn, conn.transaction():
            locked_until = await conn.fetchval("SELECT locked_until FROM portal_accounts"
                                               " WHERE user_name = $1 FOR UPDATE", name)
            await conn.execute("DELETE FROM sign_in_attempts WHERE id = $1", attempt)
            if still_locked(locked_until):
                return False
            await conn.execute("UPDATE portal_accounts SET failures = '{}', locked_until = NULL"
                               " WHERE user_name = $1", name)
            if session is not None:
                await conn.execute("INSERT INTO portal_sessions (token_sha256, user_name,"
                                   " created_at, last_seen) VALUES ($1, $2, $3, $3)",
                                   session[0], name, session[1])
            if audit is not None:
                await self._audit(conn, **audit)
        return True

    async def portal_start_session(self, token_sha256: bytes, name: str, now: datetime,
                                   audit: dict[str, Any]) -> None:
        """A new session after a password change, audited. (The change's password attempt
        already forgot the failures, in `sign_in_succeeded`; clearing them again here could
        undo a lock that concurrent wrong passwords set in between.)"""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO portal_sessions (token_sha256, user_name, created_at,"
                               " last_seen) VALUES ($1, $2, $3, $3)", token_sha256, name, now)
            await self._audit(conn, **audit)

    async def portal_session(self, token_sha256: bytes) -> PortalSessionRow | None:
        """A stored session of an enabled user."""
        r = await self.pool.fetchrow(
            "SELECT s.user_name, u.role, u.must_change_password, s.created_at, s.last_seen"
            " FROM portal_sessions s JOIN users u ON u.name = s.user_name"
            " WHERE s.token_sha256 = $1 AND NOT u.disabled", token_sha256)
        return PortalSessionRow(*r) if r else None

    async def portal_touch_session(self, token_sha256: bytes, now: datetime) -> None:
        await self.pool.execute("UPDATE portal_sessions SET last_seen = greatest(last_seen, $2)"
                                " WHERE token_sha256 = $1", token_sha256, now)

    async def portal_end_session(self, token_sha256: bytes,
                                 audit: dict[str, Any] | None = None) -> None:
        """Sign-out or expiry: the session is deleted and every process drops its copy."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM portal_sessions WHERE token_sha256 = $1", token_sha256)
            if audit:
                await self._audit(conn, **audit)
            await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL,
                               "portal-session:" + token_sha256.hex())

    async def portal_purge_sessions(self, idle_before: datetime, created_before: datetime) -> int:
        """Delete sessions past their idle or absolute expiry (they are refused anyway)."""
        status = await self.pool.execute(
            "DELETE FROM portal_sessions WHERE last_seen < $1 OR created_at < $2",
            idle_before, created_before)
        return int(status.split()[-1])

    # -- users (operator commands write these; the portal only a user's own password) -------
    async def users(self) -> list[UserRow]:
        return [_user_row(r) for r in await self.pool.fetch(
            f"SELECT {_USER_COLS} FROM users ORDER BY name")]

    async def user(self, name: str) -> UserRow | None:
        r = await self.pool.fetchrow(f"SELECT {_USER_COLS} FROM users WHERE name = $1", name)
        return _user_row(r) if r else None

    async def create_user(self, name: str, role: str, *, api_key_sha256: bytes | None,
                          api_key_hint: str | None, password_hash: str | None,
                          actor: str) -> UserRow:
        """Raises ConflictError if the name or the API key is taken."""
        async with self.pool.acquire() as conn, conn.transaction():
            try:
                r = await conn.fetchrow(
                    "INSERT INTO users (name, role, api_key_sha256, api_key_hint, password_hash)"
                    f" VALUES ($1, $2, $3, $4, $5) RETURNING {_USER_COLS}",
                    name, role, api_key_sha256, api_key_hint, password_hash)
            except asyncpg.UniqueViolationError as exc:
                raise ConflictError(_user_conflict(exc, name)) from None
            await self._audit(conn, actor=actor, action="users.add", outcome="ok", object=name,
                              detail={"role": role})
            await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, "users:" + name)
        return _user_row(r)

    _USER_FIELDS = frozenset({"api_key_sha256", "api_key_hint", "password_hash",
                              "must_change_password", "disabled", "forecast_per_day",
                              "forecast_bands", "role"})

    async def update_user(self, name: str, *, actor: str, action: str,
                          **fields: Any) -> UserRow | None:
        """Set the given columns of one user; None if there is no such user. Raises
        ConflictError if a new API key is already another user's."""
        unknown = set(fields) - self._USER_FIELDS
        if unknown:
            raise ValueError(f"not user fields: {sorted(unknown)}")
        names = sorted(fields)
        sets = ", ".join(f"{n} = ${i}" for i, n in enumerate(names, start=2))
        async with self.pool.acquire() as conn, conn.transaction():
            try:
                r = await conn.fetchrow(
                    f"UPDATE users SET {sets}, updated_at = now() WHERE name = $1"
                    f" RETURNING {_USER_COLS}", name, *(fields[n] for n in names))
            except asyncpg.UniqueViolationError as exc:
                raise ConflictError(_user_conflict(exc, name)) from None
            if r is None:
                return None
            secret = {"api_key_sha256", "api_key_hint", "password_hash"}
            await self._audit(conn, actor=actor, action=action, outcome="ok", object=name,
                              detail={n: ("(changed)" if n in secret else fields[n]) for n in names})
            await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, "users:" + name)
        return _user_row(r)

    async def user_ssh_keys(self, name: str) -> tuple[UserRow, list[str]] | None:
        """An enabled or disabled user with their SFTP public keys (OpenSSH lines)."""
        r = await self.pool.fetchrow(f"SELECT {_USER_COLS}, ssh_keys FROM users WHERE name = $1",
                                     name)
        return (_user_row(r), list(r["ssh_keys"])) if r else None

    async def set_user_ssh_keys(self, name: str, keys: Sequence[str], *, actor: str,
                                detail: dict[str, Any]) -> bool:
        """Replace a user's SFTP public keys (audited); False if there is no such user."""
        async with self.pool.acquire() as conn, conn.transaction():
            status = await conn.execute(
                "UPDATE users SET ssh_keys = $2, updated_at = now() WHERE name = $1",
                name, list(keys))
            if status.split()[-1] == "0":
                return False
            await self._audit(conn, actor=actor, action="users.sshkey", outcome="ok",
                              object=name, detail=detail)
        return True

    # -- service levels: CPM 8 and demand ---------------------------------------------------
    async def add_service_level_counts(self, cpm: Sequence[CpmRow],
                                       demand: Sequence[tuple[Any, str, int, int]]) -> None:
        """Add one process's counts since its last flush (one transaction, additive, so
        every process and node can flush into the same rows)."""
        async with self.pool.acquire() as conn, conn.transaction():
            if cpm:
                await conn.executemany(
                    "INSERT INTO cpm_counts AS c (month, interface, operation, user_name, received,"
                    " answered, within_trt, failed, seconds_sum, buckets, trt_seconds, refused)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
                    " ON CONFLICT (month, interface, operation, user_name, trt_seconds)"
                    " DO UPDATE SET"
                    " received = c.received + excluded.received,"
                    " refused = c.refused + excluded.refused,"
                    " answered = c.answered + excluded.answered,"
                    " within_trt = c.within_trt + excluded.within_trt,"
                    " failed = c.failed + excluded.failed,"
                    " seconds_sum = c.seconds_sum + excluded.seconds_sum,"
                    " buckets = (SELECT array_agg(coalesce(a, 0) + coalesce(b, 0) ORDER BY i)"
                    "   FROM unnest(c.buckets, excluded.buckets) WITH ORDINALITY AS t(a, b, i))",
                    [(r.month, r.interface, r.operation, r.user_name, r.received, r.answered,
                      r.within_trt, r.failed, r.seconds_sum, list(r.buckets), r.trt_seconds,
                      r.refused) for r in cpm])
            if demand:
                await conn.executemany(
                    "INSERT INTO demand_counts AS d (day, user_name, band, requests)"
                    " VALUES ($1, $2, $3, $4) ON CONFLICT (day, user_name, band)"
                    " DO UPDATE SET requests = d.requests + excluded.requests", demand)

    async def cpm_counts(self, month: str) -> list[CpmRow]:
        rows = await self.pool.fetch(
            "SELECT month, interface, operation, user_name, received, answered, within_trt,"
            " failed, seconds_sum, buckets, trt_seconds, refused FROM cpm_counts"
            " WHERE month = $1 ORDER BY interface, operation, user_name, trt_seconds", month)
        return [CpmRow(*r[:9], tuple(r["buckets"]), r["trt_seconds"], r["refused"])  # type: ignore[call-arg]
                for r in rows]

    async def demand_counts(self, day: Any) -> list[tuple[str, int, int]]:
        """(user, band, requests) for one UK day (a datetime.date)."""
        rows = await self.pool.fetch(
            "SELECT user_name, band, requests FROM demand_counts WHERE day = $1"
            " ORDER BY user_name, band", day)
        return [(r[0], int(r[1]), int(r[2])) for r in rows]

    # -- extracts (keyset pages: bounded memory whatever the store size) -------------------
    @contextlib.asynccontextmanager
    async def extract_lock(self, *, wait: bool) -> AsyncIterator[bool]:
        """The cluster-wide extract producer lock, held on one connection for the duration:
        yields whether it was obtained (always, with `wait`)."""
        async with self.pool.acquire() as conn:
            if wait:
                await conn.execute("SELECT pg_advisory_lock($1)", _EXTRACT_LOCK)
                got = True
            else:
                got = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", _EXTRACT_LOCK))
            try:
                yield got
            finally:
                if got:
                    await _unlock(conn, _EXTRACT_LOCK)

    async def extract_markers(self) -> ExtractMarkers:
        """The highest ids and change number now, taken with no lodging in flight."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _CHANGE_LOCK)
            r = await conn.fetchrow(
                "SELECT (SELECT coalesce(max(id), 0) FROM certificates),"
                " (SELECT coalesce(max(changed_seq), 0) FROM certificates),"
                " (SELECT coalesce(max(id), 0) FROM crls),"
                " (SELECT coalesce(max(id), 0) FROM documents)")
        return ExtractMarkers(int(r[0]), int(r[1]), int(r[2]), int(r[3]))

    async def extract_certificates_page(self, after_id: int, upto_id: int,
                                        limit: int) -> list[CertRow]:
        rows = await self.pool.fetch(
            f"SELECT {_CERT_ROW_COLS} FROM certificates WHERE id > $1 AND id <= $2"
            " ORDER BY id LIMIT $3", after_id, upto_id, limit)
        return [CertRow(*r) for r in rows]

    async def extract_changed_page(self, after_change: int, upto_change: int, id_upto: int,
                                   limit: int) -> list[tuple[int, CertRow]]:
        """Certificates with id <= id_upto whose status changed in (after, upto], by change."""
        rows = await self.pool.fetch(
            f"SELECT changed_seq, {_CERT_ROW_COLS} FROM certificates WHERE changed_seq > $1"
            " AND changed_seq <= $2 AND id <= $3 ORDER BY changed_seq LIMIT $4",
            after_change, upto_change, id_upto, limit)
        return [(int(r[0]), CertRow(*r[1:])) for r in rows]

    async def extract_crls_page(self, after_id: int, upto_id: int, limit: int) -> list[CrlRow]:
        rows = await self.pool.fetch(
            f"SELECT {self._CRL_COLS} FROM crls WHERE id > $1 AND id <= $2 ORDER BY id LIMIT $3",
            after_id, upto_id, limit)
        return [_crl_row(r) for r in rows]

    async def extract_documents_page(self, after_id: int, upto_id: int,
                                     limit: int) -> list[tuple[int, DocumentRow]]:
        rows = await self.pool.fetch(
            f"SELECT id, {self._DOC_COLS}, body FROM documents WHERE id > $1 AND id <= $2"
            " ORDER BY id LIMIT $3", after_id, upto_id, limit)
        return [(int(r[0]), DocumentRow(*r[1:])) for r in rows]

    async def extract_next_id(self) -> int:
        return int(await self.pool.fetchval("SELECT nextval('extracts_id_seq')"))

    async def extract_begin(self, extract_id: int, name: str, kind: str, slot: str | None,
                            previous_id: int | None, upto: ExtractMarkers) -> None:
        await self.pool.execute(
            "INSERT INTO extracts (id, name, kind, slot, previous_id, cert_id_upto, change_upto,"
            " crl_id_upto, document_id_upto) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            extract_id, name, kind, slot, previous_id, upto.cert_id, upto.change, upto.crl_id,
            upto.document_id)

    async def extract_published(self, extract_id: int, size: int, sha256: bytes,
                                counts: dict[str, Any]) -> None:
        await self.pool.execute(
            "UPDATE extracts SET state = 'published', published_at = now(), size = $2,"
            " sha256 = $3, counts = $4::text::jsonb WHERE id = $1",
            extract_id, size, sha256, json.dumps(counts))

    async def extract_failed(self, extract_id: int | None = None) -> int:
        """Mark one extract, or (None) every one still 'producing', as failed: called under
        the producer lock, when none can really be in production."""
        status = await self.pool.execute(
            "UPDATE extracts SET state = 'failed' WHERE state = 'producing'"
            " AND ($1::bigint IS NULL OR id = $1)", extract_id)
        return int(status.split()[-1])

    async def extract_removed(self, ids: Sequence[int]) -> None:
        await self.pool.execute(
            "UPDATE extracts SET state = 'removed', removed_at = now() WHERE id = ANY($1::bigint[])",
            list(ids))

    async def extracts(self, states: Sequence[str] = ("published",)) -> list[ExtractRow]:
        """Extracts in these states, newest first."""
        rows = await self.pool.fetch(
            f"SELECT {_EXTRACT_COLS} FROM extracts WHERE state = ANY($1::text[]) ORDER BY id DESC",
            list(states))
        return [_extract_row(r) for r in rows]

    async def extract_latest(self) -> ExtractRow | None:
        """The newest extract produced (published, or published and since removed): where the
        next delta starts."""
        r = await self.pool.fetchrow(
            f"SELECT {_EXTRACT_COLS} FROM extracts WHERE state IN ('published', 'removed')"
            " ORDER BY id DESC LIMIT 1")
        return _extract_row(r) if r else None

    async def extract_slot_taken(self, slot: str) -> bool:
        return bool(await self.pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM extracts WHERE slot = $1 AND state <> 'failed')", slot))

    # -- audit ---------------------------------------------------------------------------
    @staticmethod
    async def _audit(conn: asyncpg.Connection, *, actor: str, action: str, outcome: str,
                     object: str | None = None, peer: str | None = None,
                     on_behalf_of: str | None = None, detail: dict[str, Any] | None = None) -> None:
        # Audit text comes partly from clients (paths, names): PostgreSQL text and jsonb
        # cannot hold NUL, which must not turn a refusal into an error.
        def clean(value: str | None) -> str | None:
            return value.replace("\x00", "\ufffd") if value else value

        await conn.execute(
            "INSERT INTO audit (actor, on_behalf_of, action, outcome, object, peer, detail)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7::text::jsonb)",
            clean(actor), clean(on_behalf_of), action, outcome, clean(object), clean(peer),
            json.dumps(detail or {}).replace("\\u0000", "\\ufffd"))

    async def audit(self, **entry: Any) -> None:
        """An audit entry on its own (refusals, failed validations)."""
        async with self.pool.acquire() as conn:
            await self._audit(conn, **entry)

    async def audit_entries(self, since_id: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            "SELECT * FROM audit WHERE id > $1 ORDER BY id LIMIT $2", since_id, limit)
        return [dict(r) for r in rows]
