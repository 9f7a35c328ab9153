"""The connection pool and what every area of the store shares: the advisory locks, the
change log, NOTIFY, COPY with a deadline, and which errors mean "the store is unreachable".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg

from repository_server import events

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


async def record_change(conn: asyncpg.Connection, kind: str, *, lo: int | None = None,
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


async def notify(conn: asyncpg.Connection, event: events.Event) -> None:
    """Send a change event on the channel, delivered when (and only if) the open transaction
    commits."""
    await conn.execute("SELECT pg_notify($1, $2)", events.CHANNEL, events.encode(event))


def _jsonb_encode(value: str | bytes) -> bytes:
    """jsonb binary format: version 1, then the JSON text (values arrive pre-serialised)."""
    return b"\x01" + (value if isinstance(value, bytes) else value.encode())


def _jsonb_decode(data: bytes) -> Any:
    return json.loads(data[1:])


def connection_setup(backend_pids: set[int]) -> Callable[[asyncpg.Connection], Awaitable[None]]:
    """The pool's `init`: jsonb in binary (so that jsonb columns can be filled by COPY, binary,
    like everything else); and each connection's server process id kept in `backend_pids`
    while it is open, so that the catalog knows the NOTIFYs this process sent."""

    async def setup(conn: asyncpg.Connection) -> None:
        await conn.set_type_codec("jsonb", encoder=_jsonb_encode, decoder=_jsonb_decode,
                                  schema="pg_catalog", format="binary")
        pid = conn.get_server_pid()
        backend_pids.add(pid)
        conn.add_termination_listener(lambda _conn: backend_pids.discard(pid))

    return setup


async def copy_records(conn: asyncpg.Connection, table: str, records: Sequence[tuple[Any, ...]],
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


async def unlock(conn: Any, key: int) -> None:
    """Release a session advisory lock; if that fails (cancelled, connection trouble), end
    the session, which releases it: the pool does not reset connections (`reset_connection`)."""
    try:
        await conn.execute("SELECT pg_advisory_unlock($1)", key)
    except BaseException:
        conn.terminate()
        raise


async def reset_connection(_conn: asyncpg.Connection) -> None:
    """What the pool runs on every release, after asyncpg's own `_reset` (which rolls back an
    open transaction and drops listeners): nothing more. asyncpg's default would add a round
    trip on every release (`SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET
    ALL;`), a noticeable share of the CPU of every store read. Our pooled connections keep no
    session state to undo: no SET, no LISTEN (the catalog has its own connection), cursors
    only inside transactions, and the two session advisory locks (migrate, extract_lock) are
    released by their owners, who terminate the connection if the unlock itself fails."""


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
    back a transaction left open; no reset query, see `reset_connection`) are bounded by
    `acquire_timeout`, and each statement by the pool's `command_timeout`."""

    def __init__(self, pool: asyncpg.Pool, acquire_timeout: float) -> None:
        self.raw = pool
        self.acquire_timeout = acquire_timeout
        # First come, first served. asyncpg's pool hands a released connection to whoever
        # asks next, and a waiter woken for it finds it taken and queues again at the back,
        # so with many more clients than connections the slowest waits grow without bound.
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


class StoreBase:
    """What every area of the store (the mixins of `Store`) works with."""

    pool: BoundedPool
    command_timeout: float  # the pool's too: here for COPY, see copy_records
