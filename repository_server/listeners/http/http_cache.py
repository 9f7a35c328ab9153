"""HTTP validators and conditional requests (RFC 9110 §13), with no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from email.utils import parsedate_to_datetime


def etag_matches(header: str, etag: str) -> bool:
    """If-None-Match uses the weak comparison: W/ prefixes are ignored."""
    if header.strip() == "*":
        return True
    bare = etag.removeprefix("W/")
    return any(candidate.strip().removeprefix("W/") == bare for candidate in header.split(","))


def not_modified(headers: Mapping[str, str], etag: str, modified_ts: float) -> bool:
    """True when a GET/HEAD with these request headers may answer 304. If-None-Match wins
    over If-Modified-Since."""
    if_none_match = headers.get("If-None-Match")
    if_modified_since = headers.get("If-Modified-Since")
    if if_none_match is not None:
        return etag_matches(if_none_match, etag)
    if if_modified_since is not None:
        try:
            since = parsedate_to_datetime(if_modified_since)
        except (TypeError, ValueError, IndexError):
            return False
        if since.tzinfo is None:
            return False
        return modified_ts <= since.timestamp()
    return False
