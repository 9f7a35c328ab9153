"""Who a bind names, and whether its credentials are good: the LDAP side of the accounts
service (`accounts/`). No protocol here: the connection turns the answers into
BindResponses.

A simple bind names a repository user as ``uid=NAME,ou=Users,<suffix>`` (or ``cn=``), or as
the bare NAME, and proves it with the user's API key or portal password (passwords follow
the portal's lockout; API keys are random secrets and are not counted). SASL EXTERNAL names
the user by the client certificate's common name.
"""

from __future__ import annotations

import hmac

from repository_server.accounts.keys import User, api_key_sha256
from repository_server.accounts.policy import LockoutPolicy
from repository_server.accounts.signin import password_accepted
from repository_server.listeners.ldap import dn
from repository_server.store.db import Store

USERS_RDN = "ou=Users"


class BindCredentials:
    def __init__(self, store: Store, lockout: LockoutPolicy, suffix: str) -> None:
        self.store = store
        self.lockout = lockout
        self.users_dn = f"{USERS_RDN},{suffix}"
        self._nusers = dn.parse_normalised(self.users_dn)

    def user_name(self, bind_dn: str) -> str | None:
        """The repository user a bind DN names: uid=NAME,ou=Users,<suffix>, or NAME itself.
        None if it names none (a NUL can be in no user's name: PostgreSQL text refuses it)."""
        if "\x00" in bind_dn:
            return None
        if "=" not in bind_dn:
            return bind_dn.strip() or None
        try:
            parsed = dn.parse(bind_dn)
            normal = dn.normalise(parsed)
        except dn.DNError:
            return None
        if len(parsed) == len(self._nusers) + 1 and normal[1:] == self._nusers and \
                len(parsed[0]) == 1 and normal[0][0][0] in ("uid", "cn"):
            return parsed[0][0][1]
        return None

    async def check_secret(self, name: str, secret: bytes, peer: str) -> User | None:
        """The user, if `secret` is its API key or its portal password. Passwords follow the
        portal's SEC lockout (the same counters in PostgreSQL); API keys are random secrets
        and are not counted."""
        try:
            text = secret.decode("utf-8")
        except UnicodeDecodeError:
            return None
        store = self.store
        account = await store.portal_account(name)
        if account is not None:
            row = account[0]
            if (not row.disabled and row.api_key_sha256 is not None
                    and hmac.compare_digest(api_key_sha256(text), row.api_key_sha256)):
                return User(row.name, row.role)
        if await password_accepted(store, self.lockout, account, text, actor="ldap",
                                   action="ldap.bind", peer=peer):
            assert account is not None
            return User(account[0].name, account[0].role)
        return None

    async def external(self, cn: str | None, wanted: str) -> User | None:
        """The enabled user a client certificate's common name names, if the bind's
        authorisation identity (`wanted`: "", "dn:…" or "u:…") names the same user."""
        row = await self.store.user(cn) if cn else None
        if row is None or row.disabled or (wanted and self.user_name(
                wanted.removeprefix("dn:").removeprefix("u:")) != row.name):
            return None
        return User(row.name, row.role)
