"""Accounts: users (operator commands write them; the portal only a user's own password),
their SFTP keys, portal sign-in state (failures, lock, attempts in flight, sessions) and the
deployment's secrets."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import asyncpg

from repository_server import events
from repository_server.store.audit import write as audit_write
from repository_server.store.models import (
    STALE_ATTEMPT_SECONDS,
    USER_COLS,
    ConflictError,
    FailureRule,
    Failures,
    PortalSessionRow,
    TryRule,
    UserRow,
    user_row,
)
from repository_server.store.pool import StoreBase, notify


def _user_conflict(exc: asyncpg.UniqueViolationError, name: str) -> str:
    if "api_key" in (exc.constraint_name or ""):
        return "that API key is already another user's"
    return f"a user named {name!r} already exists"


class AccountStore(StoreBase):
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


    # -- portal sign-in state ----------------------------------------------------------------
    async def portal_account(self, name: str) -> tuple[UserRow, Failures, datetime | None] | None:
        """A user with their recent sign-in failures and lock, or None if there is no such user."""
        r = await self.pool.fetchrow(
            f"SELECT {', '.join('u.' + c for c in USER_COLS.split(', '))},"
            " coalesce(a.failures, '{}') AS failures, a.locked_until"
            " FROM users u LEFT JOIN portal_accounts a ON a.user_name = u.name WHERE u.name = $1",
            name)
        if r is None:
            return None
        return user_row(r), tuple(r["failures"]), r["locked_until"]

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
                await audit_write(conn, actor="repository", action="auth.attempt-abandoned",
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
            await audit_write(conn, **audit)
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
                await audit_write(conn, **audit)
        return True

    async def portal_start_session(self, token_sha256: bytes, name: str, now: datetime,
                                   audit: dict[str, Any]) -> None:
        """A new session after a password change, audited. (The change's password attempt
        already forgot the failures, in `sign_in_succeeded`; clearing them again here could
        undo a lock that concurrent wrong passwords set in between.)"""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO portal_sessions (token_sha256, user_name, created_at,"
                               " last_seen) VALUES ($1, $2, $3, $3)", token_sha256, name, now)
            await audit_write(conn, **audit)

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
                await audit_write(conn, **audit)
            await notify(conn, events.SessionEnded(token_sha256))

    async def portal_purge_sessions(self, idle_before: datetime, created_before: datetime) -> int:
        """Delete sessions past their idle or absolute expiry (they are refused anyway)."""
        status = await self.pool.execute(
            "DELETE FROM portal_sessions WHERE last_seen < $1 OR created_at < $2",
            idle_before, created_before)
        return int(status.split()[-1])

    # -- users (operator commands write these; the portal only a user's own password) -------
    async def users(self) -> list[UserRow]:
        return [user_row(r) for r in await self.pool.fetch(
            f"SELECT {USER_COLS} FROM users ORDER BY name")]

    async def user(self, name: str) -> UserRow | None:
        r = await self.pool.fetchrow(f"SELECT {USER_COLS} FROM users WHERE name = $1", name)
        return user_row(r) if r else None

    async def create_user(self, name: str, role: str, *, api_key_sha256: bytes | None,
                          api_key_hint: str | None, password_hash: str | None,
                          actor: str) -> UserRow:
        """Raises ConflictError if the name or the API key is taken."""
        async with self.pool.acquire() as conn, conn.transaction():
            try:
                r = await conn.fetchrow(
                    "INSERT INTO users (name, role, api_key_sha256, api_key_hint, password_hash)"
                    f" VALUES ($1, $2, $3, $4, $5) RETURNING {USER_COLS}",
                    name, role, api_key_sha256, api_key_hint, password_hash)
            except asyncpg.UniqueViolationError as exc:
                raise ConflictError(_user_conflict(exc, name)) from None
            await audit_write(conn, actor=actor, action="users.add", outcome="ok", object=name,
                              detail={"role": role})
            await notify(conn, events.UserChanged(name))
        return user_row(r)

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
                    f" RETURNING {USER_COLS}", name, *(fields[n] for n in names))
            except asyncpg.UniqueViolationError as exc:
                raise ConflictError(_user_conflict(exc, name)) from None
            if r is None:
                return None
            secret = {"api_key_sha256", "api_key_hint", "password_hash"}
            await audit_write(conn, actor=actor, action=action, outcome="ok", object=name,
                              detail={n: ("(changed)" if n in secret else fields[n]) for n in names})
            await notify(conn, events.UserChanged(name))
        return user_row(r)

    async def user_ssh_keys(self, name: str) -> tuple[UserRow, list[str]] | None:
        """An enabled or disabled user with their SFTP public keys (OpenSSH lines)."""
        r = await self.pool.fetchrow(f"SELECT {USER_COLS}, ssh_keys FROM users WHERE name = $1",
                                     name)
        return (user_row(r), list(r["ssh_keys"])) if r else None

    async def set_user_ssh_keys(self, name: str, keys: Sequence[str], *, actor: str,
                                detail: dict[str, Any]) -> bool:
        """Replace a user's SFTP public keys (audited); False if there is no such user."""
        async with self.pool.acquire() as conn, conn.transaction():
            status = await conn.execute(
                "UPDATE users SET ssh_keys = $2, updated_at = now() WHERE name = $1",
                name, list(keys))
            if status.split()[-1] == "0":
                return False
            await audit_write(conn, actor=actor, action="users.sshkey", outcome="ok",
                              object=name, detail=detail)
        return True
