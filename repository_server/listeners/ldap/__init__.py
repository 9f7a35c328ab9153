"""LDAPv3 protocol support (sans-I/O message codec; the server itself is still to come)."""
