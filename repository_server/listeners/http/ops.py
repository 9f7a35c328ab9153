"""Operator-only JSON on the read listeners: service-level reports.

  GET /ops/reports/cpm?month=YYYY-MM        Code Performance Measure 8 (as `report cpm --json`)
  GET /ops/reports/demand?day=YYYY-MM-DD    demand against forecast (as `report demand --json`)
  GET /ops/loadtest/sample?devices=N&organisations=M
                                            what load tests ask for: N devices and M
                                            organisations at random (EUI-64s with their
                                            serials), CRL/ARL URLs and document names

All need the API key of a user with the operator role (`?apikey=` or X-API-Key). This
process's counts are flushed first, so the answer includes everything it has answered.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from datetime import date

from aiohttp import web

from repository_server.accounts import Accounts
from repository_server.listeners.http.apikeys import request_key
from repository_server.listeners.http.downloads import error
from repository_server.readmodel.catalog import Catalog
from repository_server.service_levels import ServiceLevels, cpm_report, demand_report
from repository_server.store.db import Store

_MONTH = re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])", re.ASCII)
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", re.ASCII)
SAMPLE_MAX = 10_000  # devices (and organisations) one sample may ask for
_COUNT = re.compile(r"[0-9]{1,5}", re.ASCII)  # str.isdigit() takes "²", which int() refuses

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Ops:
    def __init__(self, store: Store, accounts: Accounts, levels: ServiceLevels,
                 catalog: Catalog) -> None:
        self.store = store
        self.catalog = catalog
        self.accounts = accounts
        self.levels = levels

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [("GET", "/ops/reports/cpm", self.cpm), ("GET", "/ops/reports/demand", self.demand),
                ("GET", "/ops/loadtest/sample", self.sample)]

    def _refused(self, request: web.Request) -> web.Response | None:
        key = request_key(request)
        user = self.accounts.user_for_key(key) if key else None
        if user is None:
            return error(403, "an operator's API key is required (?apikey= or X-API-Key)")
        if not user.operator:
            return error(403, f"user {user.name!r} is not an operator")
        return None

    async def cpm(self, request: web.Request) -> web.StreamResponse:
        refused = self._refused(request)
        if refused:
            return refused
        month = request.query.get("month") or self.levels.current().month
        if not _MONTH.fullmatch(month):
            return error(400, f"month: expected YYYY-MM, got {month[:40]!r}")
        await self.levels.flush()
        report = cpm_report(month, await self.store.cpm_counts(month), self.levels.settings)
        return web.json_response(report, headers={"Cache-Control": "no-store"})

    async def demand(self, request: web.Request) -> web.StreamResponse:
        refused = self._refused(request)
        if refused:
            return refused
        text = request.query.get("day")
        try:
            if text and not _DAY.fullmatch(text):
                raise ValueError(text)
            day = date.fromisoformat(text) if text else self.levels.current().day
        except ValueError:
            return error(400, f"day: expected YYYY-MM-DD, got {(text or '')[:40]!r}")
        await self.levels.flush()
        report = demand_report(day, await self.store.demand_counts(day), await self.store.users(),
                               self.levels.settings.demand_threshold_percent)
        return web.json_response(report, headers={"Cache-Control": "no-store"})

    async def sample(self, request: web.Request) -> web.StreamResponse:
        refused = self._refused(request)
        if refused:
            return refused
        wanted = {}
        for name, default in (("devices", 100), ("organisations", 10)):
            text = request.query.get(name, str(default))
            if not _COUNT.fullmatch(text) or int(text) > SAMPLE_MAX:
                return error(400, f"{name}: expected a whole number from 0 to {SAMPLE_MAX},"
                                  f" got {text[:40]!r}")
            wanted[name] = int(text)
        sample = await self.catalog.reads.sample(wanted["devices"], wanted["organisations"])
        return web.json_response(sample, headers={"Cache-Control": "no-store"})
