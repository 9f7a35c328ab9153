"""Who a bind names, and whether its credentials are good: the LDAP side of the accounts
service (`accounts/`). No protocol here: the connection turns the answers into
BindResponses.

A simple bind names a repository user as ``uid=NAME,ou=Users,<suffix>`` (or ``cn=``), or as
the bare NAME, and proves it with the user's API key or portal password (passwords follow
the portal's lockout; API keys are random secrets and are not counted). SASL EXTERNAL names
the user by the client certificate's common name.
"""

from __future__ import annotations

from repository_server.accounts import Accounts
from repository_server.accounts.keys import User
from repository_server.listeners.ldap import dn

USERS_RDN = "ou=Users"


class BindCredentials:
    def __init__(self, accounts: Accounts, suffix: str) -> None:
        self.accounts = accounts
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
        return await self.accounts.key_or_password_login(name, text, actor="ldap",
                                                         action="ldap.bind", peer=peer)

    async def external(self, cn: str | None, wanted: str) -> User | None:
        """The enabled user a client certificate's common name names, if the bind's
        authorisation identity (`wanted`: "", "dn:…" or "u:…") names the same user."""
        user = await self.accounts.enabled_user(cn) if cn else None
        if user is None or (wanted and self.user_name(
                wanted.removeprefix("dn:").removeprefix("u:")) != user.name):
            return None
        return user
