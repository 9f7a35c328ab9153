"""The one time format of every JSON we write (HTTP listings, `--json` outputs, JSON logs):
RFC 3339 in UTC with `Z`, whole seconds unless the value has a fraction (a timestamp the
store recorded keeps its microseconds; a CRL's thisUpdate has none, and none is invented)."""

from __future__ import annotations

from datetime import UTC, datetime


def json_time(value: datetime) -> str:
    """`2026-12-05T08:48:16Z` (or `...16.745Z`, `...16.123456Z`). A naive datetime is UTC."""
    moment = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")  # .745, not .745000
    return text + "Z"


def json_time_or_none(value: datetime | None) -> str | None:
    return None if value is None else json_time(value)
