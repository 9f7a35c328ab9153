"""The portal's web rules, with no I/O: CSRF tokens and safe redirects.

The CSRF token of a form is derived from the session token (HMAC-SHA-256 under the
deployment's CSRF key: 32 random bytes made once per store, `Store.deployment_secret`), so
every node can check it without storing anything, and neither a page from another site nor a
reader of this source can compute it.
"""

from __future__ import annotations

import hashlib
import hmac

CSRF_SECRET = "portal-csrf"  # the deployment secret the CSRF key is (store.deployment_secret)


def csrf_token(key: bytes, session_token: str) -> str:
    return hmac.new(key, session_token.encode(), hashlib.sha256).hexdigest()[:40]


def csrf_ok(key: bytes, session_token: str | None, submitted: str | None) -> bool:
    if not session_token or not submitted:
        return False
    return hmac.compare_digest(csrf_token(key, session_token), submitted)


def safe_next(target: str | None, default: str = "/portal/") -> str:
    """A redirect target after sign-in: only a path inside the portal (no other site)."""
    if (not target or not target.startswith("/portal/") or "//" in target or "\\" in target
            or any(ord(c) < 0x21 for c in target) or len(target) > 2000):
        return default
    return target
