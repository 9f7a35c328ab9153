"""The operations listener (listeners.metrics): Prometheus metrics, which name users (demand
per user), so never on the public read listeners; loopback by default."""

from __future__ import annotations

import contextlib

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from repository_server.obs.metrics import Metrics
from repository_server.readmodel.check import lag
from repository_server.readmodel.env import Replica, ReplicaUnavailable


def build_metrics_app(metrics: Metrics, replica: Replica) -> web.Application:
    """The operations listener (listeners.metrics): Prometheus metrics, which name users
    (demand per user), so never on the public read listeners."""

    async def metrics_handler(_request: web.Request) -> web.Response:
        with contextlib.suppress(ReplicaUnavailable):
            state = lag(replica)
            metrics.replica_applied.set(state["applied"])
            metrics.replica_behind.set(state["behind_changes"])
            metrics.replica_behind_seconds.set(state["behind_seconds"])
            metrics.replica_bytes.set(replica.size_bytes())
        return web.Response(body=generate_latest(metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def not_found(request: web.Request) -> web.Response:
        return web.json_response({"status": 404, "reason": f"no such resource: {request.path[:200]}"
                                  " (this listener serves /metrics)"}, status=404)

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler, allow_head=True)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app
