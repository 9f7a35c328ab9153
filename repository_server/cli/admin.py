"""Operator commands over the store: `users …` and `report …` (called by cli.py).

Each function takes an open Store and returns what to print; errors a user can act on are
raised as AdminError with a one-line message (the CLI prints it and exits 1), or as
UsageError when an option's value is wrong (exit 2).
"""

from __future__ import annotations

import getpass
import json
import re
from datetime import date
from typing import Any

from repository_server.accounts.keys import (
    ROLES,
    api_key_hint,
    api_key_sha256,
    hash_password,
    new_api_key,
    new_password,
)
from repository_server.config import ServiceLevelSettings
from repository_server.errors import UsageError
from repository_server.jsontime import json_time
from repository_server.service_levels import (
    BANDS,
    ServiceLevels,
    cpm_report,
    demand_report,
    format_cpm_report,
    format_demand_report,
)
from repository_server.store.db import Store
from repository_server.store.models import ConflictError, UserRow
from repository_server.store.protocols import ServiceLevelReports, UserAdmin

# The web service puts the key in the URL: only characters that need no escaping there.
_KEY = re.compile(r"^[A-Za-z0-9._~-]{8,200}$")
DCC_BOXED_KEY = "u3bg9gt38htd0j2"  # what @smartdcc/dccboxed-keystore always sends


class AdminError(Exception):
    """Something was refused (no such user, a conflict): the CLI exits 1. An option's value
    that is wrong is a UsageError instead (exit 2)."""


def operator_name() -> str:
    return f"operator:{getpass.getuser()}"


def _check_key(key: str) -> str:
    if not _KEY.match(key):
        raise UsageError("API key: 8 to 200 characters from A-Z a-z 0-9 . _ ~ - (it travels in"
                         " the URL)")
    return key


async def _need(store: UserAdmin, name: str) -> UserRow:
    row = await store.user(name)
    if row is None:
        raise AdminError(f"no user named {name!r} (see `smki-repository users list`)")
    return row


async def users_add(store: UserAdmin, name: str, *, role: str = "party", api_key: str | None = None,
                    with_key: bool = True) -> str:
    if role not in ROLES:
        raise UsageError(f"role: one of {', '.join(ROLES)}")
    key = _check_key(api_key) if api_key else (new_api_key() if with_key else None)
    password = new_password()
    try:
        await store.create_user(name, role, api_key_sha256=api_key_sha256(key) if key else None,
                                api_key_hint=api_key_hint(key) if key else None,
                                password_hash=hash_password(password), actor=operator_name())
    except ConflictError as exc:
        raise AdminError(str(exc)) from None
    except Exception as exc:  # the name CHECK constraint
        if "users_name_check" in str(exc):
            raise UsageError("user name: letters, digits and . _ @ -, starting with a letter or"
                             " digit, up to 100 characters") from None
        raise
    lines = [f"user {name} added ({role})"]
    if key and not api_key:
        lines.append(f"API key (shown only now): {key}")
    elif key:
        lines.append("API key: the value given")
    lines.append(f"initial portal password (shown only now; to be changed at first sign-in):"
                 f" {password}")
    return "\n".join(lines)


def _user_json(u: UserRow) -> dict[str, Any]:
    return {"name": u.name, "role": u.role, "disabled": u.disabled,
            "api_key_prefix": u.api_key_hint.rstrip("…") if u.api_key_hint else None,
            "password_set": u.password_hash is not None,
            "must_change_password": u.must_change_password,
            "forecast_per_day": u.forecast_per_day,
            "forecast_bands": dict(zip(BANDS, u.forecast_bands, strict=True))
            if u.forecast_bands else None,
            "created_at": json_time(u.created_at), "updated_at": json_time(u.updated_at)}


async def users_list(store: UserAdmin, *, as_json: bool = False) -> str:
    rows = await store.users()
    if as_json:
        return json.dumps([_user_json(u) for u in rows], indent=2)
    if not rows:
        return "no users (add one with `smki-repository users add NAME`)"
    lines = [f"{'name':<24}{'role':<10}{'state':<10}{'api key':<10}{'forecast/day':>14}"
             f"  {'bands % ' + '/'.join(BANDS)}"]
    for u in rows:
        bands = "/".join(str(b) for b in u.forecast_bands) if u.forecast_bands else "-"
        lines.append(f"{u.name:<24}{u.role:<10}{'disabled' if u.disabled else 'enabled':<10}"
                     f"{u.api_key_hint or '-':<10}"
                     f"{u.forecast_per_day if u.forecast_per_day is not None else '-':>14}"
                     f"  {bands}")
    return "\n".join(lines)


async def _update(store: UserAdmin, name: str, action: str, **fields: Any) -> UserRow:
    await _need(store, name)
    try:
        row = await store.update_user(name, actor=operator_name(), action=action, **fields)
    except ConflictError as exc:
        raise AdminError(str(exc)) from None
    if row is None:
        raise AdminError(f"no user named {name!r}")
    return row


async def users_disable(store: UserAdmin, name: str, disabled: bool = True) -> str:
    await _update(store, name, "users.disable" if disabled else "users.enable", disabled=disabled)
    return f"user {name} {'disabled: its API key no longer works' if disabled else 'enabled'}"


async def users_reset(store: UserAdmin, name: str) -> str:
    password = new_password()
    await _update(store, name, "users.reset", password_hash=hash_password(password),
                  must_change_password=True)
    return (f"password of {name} reset; temporary password (shown only now; to be changed at"
            f" the next sign-in): {password}")


async def users_apikey(store: UserAdmin, name: str, value: str | None = None) -> str:
    key = _check_key(value) if value else new_api_key()
    await _update(store, name, "users.apikey", api_key_sha256=api_key_sha256(key),
                  api_key_hint=api_key_hint(key))
    if value:
        return f"API key of {name} set to the value given; the previous key no longer works"
    return f"new API key of {name} (shown only now; the previous key no longer works): {key}"


def parse_ssh_key(text: str) -> tuple[str, str]:
    """One OpenSSH public key line -> (the line, its SHA256 fingerprint)."""
    import asyncssh

    try:
        key = asyncssh.import_public_key(text.strip())
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise UsageError(f"not an OpenSSH public key: {exc}") from None
    line = key.export_public_key("openssh").decode().strip()
    return line, key.get_fingerprint("sha256")


async def users_sshkey(store: UserAdmin, name: str, add: str | None, clear: bool) -> str:
    """Add a public key (a .pub file's contents) to a user's SFTP keys, or clear them."""
    found = await store.user_ssh_keys(name)
    if found is None:
        raise AdminError(f"no user named {name!r}")
    keys = found[1]
    if clear:
        await store.set_user_ssh_keys(name, [], actor=operator_name(), detail={"cleared": True})
        return f"SFTP keys of {name} cleared"
    if add is None:
        raise UsageError("give --add FILE or --clear")
    line, fingerprint = parse_ssh_key(add)
    if line.split()[:2] in [k.split()[:2] for k in keys]:
        return f"{name} already has the key {fingerprint}"
    await store.set_user_ssh_keys(name, [*keys, line], actor=operator_name(),
                                  detail={"added": fingerprint})
    return f"SFTP key {fingerprint} added for {name} ({len(keys) + 1} in all)"


def parse_bands(text: str) -> tuple[int, int, int, int]:
    try:
        parts = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise UsageError(f"--bands: four whole percentages for {', '.join(BANDS)}, e.g."
                         f" 10,5,70,15 (got {text!r})") from None
    if len(parts) != 4 or any(p < 0 for p in parts) or sum(parts) != 100:
        raise UsageError(f"--bands: four percentages for {', '.join(BANDS)} adding up to 100"
                         f" (got {text!r})")
    return parts[0], parts[1], parts[2], parts[3]


async def users_forecast(store: UserAdmin, name: str, per_day: int | None, bands: str | None,
                         clear: bool = False) -> str:
    if clear:
        await _update(store, name, "users.forecast", forecast_per_day=None, forecast_bands=None)
        return f"forecast of {name} cleared"
    if per_day is None or per_day < 0:
        raise UsageError("--per-day: the forecast number of requests per 24 hours (>= 0)")
    split = parse_bands(bands) if bands else (25, 25, 25, 25)
    await _update(store, name, "users.forecast", forecast_per_day=per_day,
                  forecast_bands=list(split))
    return (f"forecast of {name}: {per_day} requests per day, "
            + ", ".join(f"{b} {p}%" for b, p in zip(BANDS, split, strict=True)))


async def report_cpm(store: ServiceLevelReports, settings: ServiceLevelSettings, month: str | None,
                     as_json: bool) -> str:
    if month is None:
        month = ServiceLevels(settings, None).current().month
    if not re.match(r"^\d{4}-(0[1-9]|1[0-2])$", month):
        raise UsageError(f"--month: expected YYYY-MM, got {month!r}")
    report = cpm_report(month, await store.cpm_counts(month), settings)
    return json.dumps(report, indent=2) if as_json else format_cpm_report(report)


async def report_demand(store: ServiceLevelReports, settings: ServiceLevelSettings, day_text: str | None,
                        as_json: bool) -> str:
    try:
        day = (date.fromisoformat(day_text) if day_text
               else ServiceLevels(settings, None).current().day)
    except ValueError:
        raise UsageError(f"--day: expected YYYY-MM-DD, got {day_text!r}") from None
    report = demand_report(day, await store.demand_counts(day), await store.users(),
                           settings.demand_threshold_percent)
    return json.dumps(report, indent=2) if as_json else format_demand_report(report)


async def report_tls_refusals(store: Store, hours: float, as_json: bool) -> str:
    """Refused TLS handshakes in the last `hours`: per listener, reason and peer address."""
    from datetime import UTC, datetime, timedelta

    from repository_server.obs.refusals import REASONS
    from repository_server.store import refusals as refusals_sql

    if not 0 < hours <= 24 * 366:
        raise AdminError(f"--hours: must be between 0 and 8784, got {hours:g}")
    until = datetime.now(UTC)
    since = until - timedelta(hours=hours)
    rows = await refusals_sql.summary(store, since, until)
    if as_json:
        return json.dumps({"since": since.isoformat(), "until": until.isoformat(), "rows": [
            {**r, "first_minute": r["first_minute"].isoformat(),
             "last_minute": r["last_minute"].isoformat()} for r in rows]}, indent=2)
    lines = [f"TLS handshakes refused from {since:%Y-%m-%d %H:%M} to {until:%Y-%m-%d %H:%M} UTC"
             f" ({sum(r['count'] for r in rows)} in all)", "",
             f"{'listener':<10}{'reason':<16}{'peer':<40}{'count':>9}  {'first':<5}  "
             f"{'last':<5}  last detail"]
    for r in rows:
        lines.append(f"{r['listener']:<10}{r['reason']:<16}{r['peer']:<40}{r['count']:>9}  "
                     f"{r['first_minute']:%H:%M}  {r['last_minute']:%H:%M}  {r['detail']}")
    if not rows:
        lines.append("(none)")
    lines += ["", "reasons: " + "; ".join(f"{k}: {v}" for k, v in REASONS.items())]
    return "\n".join(lines)
