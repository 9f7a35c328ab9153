"""The one time format of every JSON we write (HTTP listings, `--json` outputs, JSON logs):
RFC 3339 in UTC with `Z`, whole seconds unless the value has a fraction (a timestamp the
store recorded keeps its microseconds; a CRL's thisUpdate has none, and none is invented)."""

from __future__ import annotations

from datetime import UTC, datetime


def json_time(value: datetime) -> str:
    """`2026-12-05T08:48:16Z` (or `...16.123456Z`). A naive datetime is taken as UTC."""
    moment = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    spec = "%Y-%m-%dT%H:%M:%S.%fZ" if moment.microsecond else "%Y-%m-%dT%H:%M:%SZ"
    return moment.strftime(spec)


def json_time_or_none(value: datetime | None) -> str | None:
    return None if value is None else json_time(value)
