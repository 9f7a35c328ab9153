"""Accounts, one service for every interface that has users: API keys and password hashes
(`keys`), the lockout, session and password rules with no I/O (`policy`), and sign-in,
password attempts and sessions over the store (`signin`). The portal, LDAP binds and SFTP
all call it; none of them keeps a rule of its own."""
