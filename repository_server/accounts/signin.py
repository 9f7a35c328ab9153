"""Password attempts under the SEC lockout, over the store: the one way a password is checked
on every interface (portal sign-in and password change, LDAP binds, SFTP), and the portal
session's value types. `accounts.service.Accounts` calls these; listeners call `Accounts`.

Every attempt costs one scrypt, whether or not the user exists, is disabled or is locked, and
they all get the same answer: the response tells an attacker nothing about which usernames
exist. The audit says what really happened.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial

from repository_server.accounts.keys import check_password, hash_password
from repository_server.accounts.policy import LockoutPolicy
from repository_server.store.models import Failures, UserRow
from repository_server.store.protocols import SignInStore

log = logging.getLogger(__name__)


@functools.cache
def dummy_hash() -> str:
    """A hash nobody's password matches, checked for unknown usernames so that they take as
    long as known ones (made once, when first needed: scrypt is not free at start-up)."""
    return hash_password("smki-portal-no-such-user")


Account = tuple[UserRow, Failures, datetime | None]
_IN_FLIGHT: set[asyncio.Task[str]] = set()  # attempts whose caller may have gone away


async def attempt_password(store: SignInStore, policy: LockoutPolicy, user: UserRow, password: str,
                           now: datetime, *, failure_audit: dict[str, object],
                           success_audit: dict[str, object] | None = None,
                           session: bytes | None = None) -> str:
    """One password attempt under the SEC lockout, the same on every interface and node:
    "ok" (right, and the account unlocked when that was recorded: failures forgotten, the
    session `session` stored, `success_audit` written), "wrong" (counted), "lockout" (wrong,
    and this failure locked the account) or "locked" (refused, not counted: locked, or as many
    attempts in flight as the limit allows, or locked by others while this one was checked).

    The attempt is registered in the store before its password is checked, so a burst of
    attempts gets at most `policy.failures` checks, and it runs to the end in a task of its
    own: a caller that goes away (a client hanging up) cannot make a checked password
    uncounted."""
    task = asyncio.get_running_loop().create_task(_attempt(
        store, policy, user, password, now, failure_audit, success_audit, session))
    _IN_FLIGHT.add(task)
    task.add_done_callback(_IN_FLIGHT.discard)
    return await asyncio.shield(task)


async def _attempt(store: SignInStore, policy: LockoutPolicy, user: UserRow, password: str,
                   now: datetime, failure_audit: dict[str, object],
                   success_audit: dict[str, object] | None, session: bytes | None) -> str:
    attempt = await store.sign_in_begin(user.name, partial(policy.may_try, now=now),
                                        partial(policy.after_failure, now=now))
    if attempt is None:  # costs a check all the same: the answer's timing tells nothing
        await asyncio.to_thread(check_password, password, dummy_hash())
        return "locked"
    good = user.password_hash is not None and await asyncio.to_thread(
        check_password, password, user.password_hash)
    if not good:
        _f, _l, locked_now = await store.sign_in_failed(
            user.name, attempt, partial(policy.after_failure, now=now), failure_audit)
        return "lockout" if locked_now else "wrong"
    accepted = await store.sign_in_succeeded(
        user.name, attempt, partial(policy.locked, now=now), success_audit,
        session=(session, now) if session is not None else None)
    return "ok" if accepted else "locked"


async def password_accepted(store: SignInStore, policy: LockoutPolicy, account: Account | None,
                            password: str, *, actor: str, action: str, peer: str | None,
                            now: datetime | None = None) -> bool:
    """Whether `password` lets this account in over a non-portal interface (LDAP bind, SFTP):
    its portal password, the account enabled, not locked, the first password already changed.
    A wrong password counts towards the SEC lockout on the portal's counters
    (`attempt_password`); an unknown user costs the same scrypt as a known one."""
    if account is None:
        await asyncio.to_thread(check_password, password, dummy_hash())
        return False
    row = account[0]
    if row.disabled or not row.password_hash:
        return False
    outcome = await attempt_password(
        store, policy, row, password, now or datetime.now(UTC),
        failure_audit={"actor": f"{actor}:{row.name}", "action": action, "outcome": "refused",
                       "object": row.name, "peer": peer,
                       "detail": {"reason": "wrong password"}})
    if outcome == "lockout":
        log.warning("%s: user %s locked after %d wrong passwords", actor, row.name,
                    policy.failures)
    return outcome == "ok" and not row.must_change_password  # changed in the portal first


@dataclass(slots=True)
class Session:
    token: str
    user: str
    role: str
    must_change_password: bool
    created: datetime
    last_seen: datetime
    stored_last_seen: datetime  # what the store has


@dataclass(frozen=True, slots=True)
class SignIn:
    """The result of a sign-in attempt: a session, or None with the (private) reason."""

    session: Session | None
    reason: str  # ok | unknown | wrong-password | locked | disabled | no-password | bad-input
