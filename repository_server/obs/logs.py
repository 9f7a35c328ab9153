"""One log format for every listener and command: `log.format = text` (the usual
`time LEVEL logger: message` lines) or `json` (one JSON object a line).

Every JSON line has `time` (UTC, `Z`), `level`, `logger` and `message`. An access line (HTTP,
lodging, LDAP: one per request or operation) adds the same fields whatever the listener:
`listener`, `peer` (address), `user` (null: anonymous), `operation`, `outcome`,
`duration_ms`, `audit` (the audit reference, or null), and what the listener knows
besides (`status`, `method`, `path`, `user_agent`, `entries`, ...). The access loggers
pass those fields with `access_extra`."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from repository_server.jsontime import json_time

ACCESS = "smki_access"  # the LogRecord attribute that carries an access line's fields


def access_extra(listener: str, peer: str, user: str | None, operation: str,
                 outcome: str | int | None, duration_ms: float | None, audit: str | None,
                 **more: Any) -> dict[str, Any]:
    """`extra=` for an access log call: the fields every listener's access line has."""
    fields: dict[str, Any] = {
        "listener": listener, "peer": peer, "user": None if user in (None, "-") else user,
        "operation": operation,
        "outcome": None if outcome is None else str(outcome),
        "duration_ms": None if duration_ms is None else round(duration_ms, 2),
        "audit": audit}
    fields.update(more)
    return {ACCESS: fields}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": json_time(datetime.fromtimestamp(record.created, UTC).replace(
                microsecond=int(record.msecs) * 1000)),
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        access = getattr(record, ACCESS, None)
        if isinstance(access, dict):
            line.update(access)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def setup(level: str, fmt: str = "text") -> None:
    """The root logger on stderr, in the configured format (replacing earlier handlers)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
