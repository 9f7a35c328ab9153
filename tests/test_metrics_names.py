"""GET /metrics on the operations listener, scraped and read with prometheus_client's own
parser: Prometheus naming (counters end in _total), smki_build_info and the process
collector's metrics."""

from __future__ import annotations

import asyncio
import platform
import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from repository_server import config as config_mod
from tests.conftest import Running, http_get

pytestmark = pytest.mark.asyncio(loop_scope="session")
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


async def test_metric_names_build_info_and_process_metrics(server: Running) -> None:
    # something in every family first: a download (HTTP and CPM 8 counts), a 404
    for path in ("/crls", "/certificates/0A0B", "/no/such/path"):
        await asyncio.to_thread(http_get, server.http + path)
    status, headers, body = await asyncio.to_thread(http_get, server.metrics)
    assert status == 200 and headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    counters = [f for f in families.values() if f.type == "counter"]
    assert {"smki_http_requests", "smki_cpm_requests", "smki_cpm_within_trt",
            "smki_tls_refused", "smki_connections_over_cap", "process_cpu_seconds"} <= {
                f.name for f in counters}
    for family in families.values():
        assert _NAME.fullmatch(family.name), family.name
        for sample in family.samples:
            if family.type == "counter":
                assert sample.name in (family.name + "_total", family.name + "_created"), (
                    family.name, sample.name)
            else:
                assert not sample.name.endswith("_total"), (
                    f"{sample.name} ends in _total but is a {family.type}")
    # every counter has its _total sample in the exposition itself (not only in the parser)
    lines = body.decode().splitlines()
    for family in counters:
        if family.samples:
            assert any(line.startswith(family.name + "_total") for line in lines), family.name
    # the build, and the process collector's metrics on our registry
    info = families["smki_build_info"]  # an Info: a gauge of 1 in the text format
    assert info.type == "gauge"
    (sample,) = info.samples
    assert sample.value == 1.0
    assert sample.labels["python"] == platform.python_version()
    assert sample.labels["version"]
    for name in ("process_cpu_seconds", "process_resident_memory_bytes",
                 "process_start_time_seconds", "process_open_fds", "python_info"):
        assert name in families and families[name].samples, name
    # never on the read listeners
    status, _, _ = await asyncio.to_thread(http_get, server.http + "/metrics")
    assert status == 404


async def test_metrics_listener_default() -> None:
    assert config_mod.load(None, environ={}).listeners.metrics == "127.0.0.1:9464"
