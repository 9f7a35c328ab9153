"""Accounts, one service for every interface that has users (`Accounts`, in `service`):
API keys and password hashes (`keys`), the lockout, session and password rules with no I/O
(`policy`) and the password attempt under the lockout (`signin`). The read listeners, the
portal, LDAP binds and SFTP all call `Accounts`; none of them keeps a rule of its own."""

from repository_server.accounts.service import Accounts

__all__ = ["Accounts"]
