"""The accounts' rules, with no I/O: session tokens, session expiry, lockout and password
rules. `accounts.signin` applies them to the store and the clock, for the portal, LDAP binds
and SFTP alike.

* A session token is 256 random bits in the cookie; the store keeps only its SHA-256. A
  visitor who has not signed in gets an anonymous token (prefix "a.") that is never stored:
  it exists so that the sign-in form has a CSRF token bound to the browser. Signing in
  always issues a new token (prefix "s."), so a token planted before sign-in (session
  fixation) is worth nothing after it.
* Lockout (SEC): `failures` wrong passwords within `window` seconds lock the account for
  `lockout` seconds; the failures that caused a lock are then forgotten, as are all of them
  after a successful sign-in. Attempts while locked are refused without being counted.
  Under concurrency (`may_try`): an attempt may have its password checked only while the
  recent failures plus the attempts already in flight are below `failures`, so a burst of
  attempts, on any number of nodes, gets at most `failures` passwords checked; a right
  password is accepted only if the account is still unlocked when its success is recorded.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from repository_server.config import Portal as PortalSettings

ANONYMOUS_PREFIX = "a."
SESSION_PREFIX = "s."
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
MAX_PASSWORD = 1024  # characters: longer input is refused before any hashing
MAX_USERNAME = 100


def new_token(signed_in: bool) -> str:
    return (SESSION_PREFIX if signed_in else ANONYMOUS_PREFIX) + secrets.token_urlsafe(32)


def well_formed(token: str | None) -> bool:
    return (token is not None and 10 < len(token) <= 64
            and token.startswith((ANONYMOUS_PREFIX, SESSION_PREFIX))
            and _TOKEN_CHARS.issuperset(token))


def token_sha256(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class SessionPolicy:
    idle: timedelta
    absolute: timedelta

    def expired(self, created: datetime, last_seen: datetime, now: datetime) -> str | None:
        """Why a session has ended ("absolute", "idle"), or None while it is valid."""
        if now >= created + self.absolute:
            return "absolute"
        if now >= last_seen + self.idle:
            return "idle"
        return None


@dataclass(frozen=True)
class LockoutPolicy:
    failures: int
    window: timedelta
    lockout: timedelta

    @classmethod
    def from_settings(cls, settings: PortalSettings) -> LockoutPolicy:
        """The SEC rule as configured (`[portal]`): one rule for portal, LDAP and SFTP."""
        return cls(settings.lockout_failures, timedelta(seconds=settings.lockout_window_seconds),
                   timedelta(seconds=settings.lockout_seconds))

    @staticmethod
    def locked(locked_until: datetime | None, now: datetime) -> bool:
        return locked_until is not None and now < locked_until

    def may_try(self, failures: tuple[datetime, ...], in_flight: int,
                locked_until: datetime | None, now: datetime) -> bool:
        """Whether one more attempt may have its password checked now: not locked, and the
        failures in the window plus the attempts in flight (each may yet fail) below the
        limit."""
        if self.locked(locked_until, now):
            return False
        recent = sum(1 for f in failures if now - f < self.window)
        return recent + in_flight < self.failures

    def after_failure(self, failures: tuple[datetime, ...], locked_until: datetime | None,
                      now: datetime) -> tuple[tuple[datetime, ...], datetime | None]:
        """The state after one more wrong password at `now`."""
        if self.locked(locked_until, now):
            return failures, locked_until  # not counted while locked
        recent = (*tuple(f for f in failures if now - f < self.window), now)
        if len(recent) >= self.failures:
            return (), now + self.lockout
        return recent[-(self.failures - 1):] if self.failures > 1 else (), None


def password_problem(new: str, confirm: str, *, current: str, username: str,
                     min_length: int) -> str | None:
    """Why a new password is not acceptable, or None."""
    if new != confirm:
        return "The new password and its confirmation are different."
    if len(new) < min_length:
        return f"The new password must have at least {min_length} characters."
    if len(new) > MAX_PASSWORD:
        return f"The new password must have at most {MAX_PASSWORD} characters."
    if new == current:
        return "The new password must be different from the current one."
    if username.lower() in new.lower():
        return "The new password must not contain your username."
    if len(set(new)) < 5:
        return "The new password must have at least 5 different characters."
    return None
