"""Relying-party credentials: API keys (web service, downloads) and passwords (portal).

Only hashes are stored. An API key is a random secret of 144 bits (or a value an operator
sets, such as DCC Boxed's fixed key), so one SHA-256 is enough to make the stored value
useless to a reader and lets a request find its user with one dictionary lookup; passwords
are chosen by people and get scrypt. `Credentials` is each server process's in-memory view
of the users table, loaded at start and reloaded when PostgreSQL says a user changed
(NOTIFY `users:<name>`), so checking a key never costs a database round trip and an unknown
key costs an attacker's request nothing but a hash.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass

from repository_server.store.protocols import UserDirectory

log = logging.getLogger(__name__)

ROLES = ("party", "operator")
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


def _token(nbytes: int) -> str:
    """URL-safe random text that does not start with "-" or "_" (a key or password starting
    with "-" reads as an option on a command line)."""
    while True:
        token = secrets.token_urlsafe(nbytes)
        if token[0].isalnum():
            return token


def new_api_key() -> str:
    return _token(18)  # 24 characters, 144 bits (a little less: the first is alphanumeric)


def api_key_sha256(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def api_key_hint(key: str) -> str:
    return key[:4] + "…"


def new_password() -> str:
    return _token(12)


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P)
    b64 = base64.b64encode
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(password: str, stored: str | None) -> bool:
    if not stored:
        return False
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r),
                             p=int(p), dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


@dataclass(frozen=True, slots=True)
class User:
    name: str
    role: str

    @property
    def operator(self) -> bool:
        return self.role == "operator"


class Credentials:
    """API key → user, for enabled users that have a key."""

    def __init__(self, store: UserDirectory) -> None:
        self.store = store
        self._by_key: dict[bytes, User] = {}
        self._seen: dict[str, User | None] = {}  # key as sent -> user: no hash per request
        self._reload: asyncio.Task[None] | None = None

    async def load(self) -> None:
        rows = await self.store.users()
        self._by_key = {r.api_key_sha256: User(r.name, r.role)
                        for r in rows if r.api_key_sha256 and not r.disabled}
        self._seen = {}
        log.debug("credentials loaded: %d API keys", len(self._by_key))

    def changed(self, _payload: str = "") -> None:
        """A user changed somewhere: reload (coalescing bursts into one query)."""
        if self._reload is not None and not self._reload.done():
            return

        async def reload() -> None:
            try:
                await self.load()
            except Exception as exc:  # keep the old view; the next change retries
                log.warning("could not reload users: %s", exc)

        self._reload = asyncio.get_running_loop().create_task(reload())

    def user_for_key(self, key: str) -> User | None:
        seen = self._seen
        if key in seen:
            return seen[key]
        user = self._by_key.get(api_key_sha256(key))
        if len(seen) >= 4096:  # bounded: random keys from a scanner must not grow it
            seen.clear()
        seen[key] = user
        return user
