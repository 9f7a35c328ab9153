"""One accounts service for every interface that has users (`Accounts`): API keys for the
read listeners, passwords for portal sign-in, LDAP binds and SFTP under one lockout rule,
SFTP public keys, portal sessions and password changes. Listeners call it and keep no rule
of their own; the rules themselves are `accounts.policy` (no I/O) and the password attempt
`accounts.signin`.

Sessions live in PostgreSQL (`portal_sessions`), so a session started on one node is good on
every node, and sign-out, a password change, an operator's `users reset` or `users disable`
end it everywhere: the store deletes the rows (a trigger does, for the user changes) and
sends NOTIFY, and each process drops its cached copy (`Catalog.subscribe`). Each process
keeps the sessions it has seen, so a request normally costs no database round trip; the last
use is written back at most every `_TOUCH` seconds, and a session that looks idle here is
read again before it is refused (another node may have seen it used).

The clock (`clock`, epoch seconds) is an attribute so that tests can move it (the lockout
hour, session expiry) in a server they run in-process. There is deliberately no setting for
it: a configuration key that moved the lockout clock would be a way to switch lockout off.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

from repository_server.accounts import policy as security
from repository_server.accounts.keys import Credentials, User, api_key_sha256, check_password, hash_password
from repository_server.accounts.policy import LockoutPolicy, SessionPolicy
from repository_server.accounts.signin import (
    Account,
    Session,
    SignIn,
    attempt_password,
    dummy_hash,
    password_accepted,
)
from repository_server.config import Portal as PortalSettings
from repository_server.store.protocols import AccountsStore

log = logging.getLogger(__name__)

_TOUCH = timedelta(seconds=30)  # last use written back at most this often per session
_CACHE_LIMIT = 50_000


class Accounts:
    """The users of every interface: API keys, passwords under the lockout rule, portal
    sessions and password changes. One per process, shared by the read listeners (API
    keys), the portal, LDAP binds and SFTP."""

    def __init__(self, store: AccountsStore, settings: PortalSettings, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.sessions = SessionPolicy(timedelta(seconds=settings.session_idle_seconds),
                                      timedelta(seconds=settings.session_absolute_seconds))
        self.lockout = LockoutPolicy.from_settings(settings)
        self.credentials = Credentials(store)
        # API key -> enabled user, from memory (bound here: the hottest call of all)
        self.user_for_key = self.credentials.user_for_key
        self._cache: OrderedDict[bytes, Session] = OrderedDict()
        self._background: set[asyncio.Task[None]] = set()

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    async def load(self) -> None:
        """Read the users' API keys (at start; `user_changed` keeps them current)."""
        await self.credentials.load()

    # -- LDAP binds and SFTP ---------------------------------------------------------------
    async def password_login(self, name: str, password: str, *, actor: str, action: str,
                             peer: str | None) -> User | None:
        """The user `password` lets in over a non-portal interface (`password_accepted`:
        enabled, not locked, first password changed; wrong ones counted towards the
        lockout), or None."""
        return await self._password_user(await self.store.portal_account(name), password,
                                         actor=actor, action=action, peer=peer)

    async def key_or_password_login(self, name: str, secret: str, *, actor: str, action: str,
                                    peer: str | None) -> User | None:
        """The user, if `secret` is its API key or its password. Passwords follow the SEC
        lockout (the same counters in PostgreSQL as the portal's); API keys are random
        secrets and are not counted."""
        account = await self.store.portal_account(name)
        if account is not None:
            row = account[0]
            if (not row.disabled and row.api_key_sha256 is not None
                    and hmac.compare_digest(api_key_sha256(secret), row.api_key_sha256)):
                return User(row.name, row.role)
        return await self._password_user(account, secret, actor=actor, action=action, peer=peer)

    async def _password_user(self, account: Account | None, password: str, *, actor: str,
                             action: str, peer: str | None) -> User | None:
        if await password_accepted(self.store, self.lockout, account, password, actor=actor,
                                   action=action, peer=peer):
            assert account is not None
            return User(account[0].name, account[0].role)
        return None

    async def enabled_user(self, name: str) -> User | None:
        """The user of that name if it exists and is enabled (a client certificate's common
        name, for LDAP SASL EXTERNAL: the TLS layer has already proved it)."""
        row = await self.store.user(name)
        return None if row is None or row.disabled else User(row.name, row.role)

    async def ssh_keys(self, name: str) -> list[str]:
        """The SFTP public keys (OpenSSH lines) of an enabled user; none for anyone else."""
        found = await self.store.user_ssh_keys(name)
        if found is None or found[0].disabled:
            return []
        return found[1]

    # -- change notifications (Catalog.subscribe) ------------------------------------------
    def session_ended(self, key: str) -> None:
        """NOTIFY portal-session:<sha256 hex>; "" = notifications may have been missed."""
        if not key:
            self._cache.clear()
            return
        with contextlib.suppress(ValueError):
            self._cache.pop(bytes.fromhex(key), None)

    def user_changed(self, name: str) -> None:
        """NOTIFY users:<name>: the API keys are reloaded and that user's sessions are read
        again (they may have ended)."""
        self.credentials.changed(name)
        self.forget_sessions(name)

    def forget_sessions(self, name: str) -> None:
        """Drop the cached sessions of user `name` ("" = everyone's)."""
        if not name:
            self._cache.clear()
            return
        for digest in [d for d, s in self._cache.items() if s.user == name]:
            del self._cache[digest]

    # -- sessions --------------------------------------------------------------------------
    async def session(self, token: str | None) -> Session | None:
        """The signed-in session a cookie names, or None (anonymous, unknown or expired)."""
        if not security.well_formed(token) or not token or not token.startswith(
                security.SESSION_PREFIX):
            return None
        digest = security.token_sha256(token)
        now = self.now()
        found = self._cache.get(digest)
        if found is None or self.sessions.expired(found.created, found.last_seen, now):
            found = await self._load(token, digest)
            if found is None:
                return None
            reason = self.sessions.expired(found.created, found.last_seen, now)
            if reason is not None:
                self._cache.pop(digest, None)
                await self.store.portal_end_session(digest, audit=self._audit(
                    found.user, "portal.session-expired", "ok", {"reason": reason}))
                return None
        found.last_seen = max(found.last_seen, now)
        if now - found.stored_last_seen >= _TOUCH:
            # Stored before the page is answered (one write per session per _TOUCH at most).
            # Written in the background, a copy dropped meanwhile (forget_sessions on a users
            # NOTIFY, the cache's limit) was read again with the older last use, and a session
            # in use was ended as idle.
            stored = found.stored_last_seen
            found.stored_last_seen = now
            try:
                await self.store.portal_touch_session(digest, now)
            except Exception as exc:  # the next use writes it again
                found.stored_last_seen = stored
                log.warning("portal: recording a session's use failed: %s", exc)
        return found

    async def _load(self, token: str, digest: bytes) -> Session | None:
        row = await self.store.portal_session(digest)
        if row is None:
            self._cache.pop(digest, None)
            return None
        cached = Session(token, row.user_name, row.role, row.must_change_password,
                         row.created_at, row.last_seen, row.last_seen)
        self._cache[digest] = cached
        if len(self._cache) > _CACHE_LIMIT:
            self._cache.popitem(last=False)
        return cached

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        async def run() -> None:
            try:
                await coro
            except Exception as exc:  # the next use writes it again
                log.warning("portal: session bookkeeping failed: %s", exc)

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def sign_out(self, session: Session, peer: str | None) -> None:
        digest = security.token_sha256(session.token)
        self._cache.pop(digest, None)
        await self.store.portal_end_session(digest, audit=self._audit(
            session.user, "portal.sign-out", "ok", peer=peer))

    async def _purge(self) -> None:
        """Delete the sessions past their expiry (refused anyway; this keeps the table small)."""
        now = self.now()
        await self.store.portal_purge_sessions(now - self.sessions.idle,
                                               now - self.sessions.absolute)

    # -- sign-in -----------------------------------------------------------------------------
    @staticmethod
    def _audit(user: str, action: str, outcome: str, detail: dict[str, object] | None = None,
               *, peer: str | None = None, actor: str | None = None) -> dict[str, object]:
        return {"actor": actor or f"portal:{user}", "action": action, "outcome": outcome,
                "object": user, "peer": peer, "detail": detail or {}}

    async def sign_in(self, username: str, password: str, peer: str | None) -> SignIn:
        username = username.strip()
        if not username or len(username) > security.MAX_USERNAME or not password or len(
                password) > security.MAX_PASSWORD:
            await asyncio.to_thread(check_password, "x", dummy_hash())
            return SignIn(None, "bad-input")
        account = await self.store.portal_account(username)
        now = self.now()
        if account is None:
            await asyncio.to_thread(check_password, password, dummy_hash())
            await self.store.audit(**self._audit(username, "portal.sign-in", "refused",
                                                 {"reason": "unknown user"}, peer=peer,
                                                 actor="unauthenticated"))
            return SignIn(None, "unknown")
        user = account[0]
        refusal = "disabled" if user.disabled else None
        token = security.new_token(signed_in=True)
        digest = security.token_sha256(token)
        outcome = await attempt_password(
            self.store, self.lockout, user, password, now,
            failure_audit=self._audit(user.name, "portal.sign-in", "refused",
                                      {"reason": "wrong password"}, peer=peer),
            success_audit=self._audit(user.name, "portal.sign-in", "refused" if refusal else "ok",
                                      {"reason": refusal} if refusal else None, peer=peer),
            session=None if refusal else digest)
        if outcome == "locked":
            await self.store.audit(**self._audit(user.name, "portal.sign-in", "refused",
                                                 {"reason": "locked"}, peer=peer))
            return SignIn(None, "locked")
        if outcome != "ok":
            return await self._failed(user.name, outcome, peer)
        if refusal:
            return SignIn(None, refusal)
        session = Session(token, user.name, user.role, user.must_change_password, now, now, now)
        self._remember(digest, session)
        return SignIn(session, "ok")

    async def _failed(self, name: str, outcome: str, peer: str | None) -> SignIn:
        if outcome == "lockout":
            log.warning("portal: user %s locked after %d wrong passwords", name,
                        self.lockout.failures)
            await self.store.audit(**self._audit(
                name, "portal.lockout", "locked", {"failures": self.lockout.failures},
                peer=peer))
            return SignIn(None, "locked")
        return SignIn(None, "wrong-password")

    def _remember(self, digest: bytes, session: Session) -> None:
        self._cache[digest] = session
        self._spawn(self._purge())  # sessions nobody came back to end here

    async def _start(self, name: str, role: str, must_change: bool, now: datetime,
                     audit: dict[str, object]) -> Session:
        token = security.new_token(signed_in=True)
        digest = security.token_sha256(token)
        await self.store.portal_start_session(digest, name, now, audit)
        session = Session(token, name, role, must_change, now, now, now)
        self._remember(digest, session)
        return session

    # -- password change ---------------------------------------------------------------------
    async def change_password(self, session: Session, current: str, new: str, confirm: str,
                              peer: str | None) -> tuple[Session | None, str | None]:
        """(the new session, None) after a change, or (None, what is wrong). A wrong current
        password counts towards the lockout like any other wrong password."""
        problem = security.password_problem(new, confirm, current=current, username=session.user,
                                            min_length=self.settings.password_min_length)
        account = await self.store.portal_account(session.user)
        if account is None:
            return None, "Your account no longer exists."
        user = account[0]
        now = self.now()
        outcome = "wrong" if len(current) > security.MAX_PASSWORD else await attempt_password(
            self.store, self.lockout, user, current, now,
            failure_audit=self._audit(user.name, "portal.password-change", "refused",
                                      {"reason": "wrong password"}, peer=peer))
        if outcome in ("locked", "lockout"):
            if outcome == "lockout":
                await self._failed(user.name, outcome, peer)
            return None, "Your account is locked for now. Try again later."
        if outcome != "ok":
            return None, "The current password is not right."
        if problem is not None:
            return None, problem
        new_hash = await asyncio.to_thread(hash_password, new)
        # The store ends every session of the user (trigger) and tells the other processes.
        await self.store.update_user(user.name, actor=f"portal:{user.name}",
                                     action="portal.password-change", password_hash=new_hash,
                                     must_change_password=False)
        self.forget_sessions(user.name)
        return await self._start(user.name, user.role, False, now, self._audit(
            user.name, "portal.sign-in", "ok", {"after": "password change"}, peer=peer)), None
