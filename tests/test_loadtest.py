"""The Locust load test (loadtest/): its shapes and verdict math (pure), and short headless
runs against a real server: one that passes the verdict and one, stalled (its event loop
blocked 2.5 s in every 3.1 s), that fails it. Locust (gevent) only ever runs in a subprocess."""

from __future__ import annotations

import asyncio
import csv
import re
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from loadtest import shapes, verdict
from tests.conftest import (
    ROOT,
    TEST_KEY,
    Running,
    add_user,
    cli_env,
    lodge_pki,
    loop_stalls,
    run_process,
    smki_cli,
    start_repository,
)

OPERATOR_KEY = "operator-key-5e1d0a77c3"
PROFILES = ROOT / "conf" / "loadtest"


# -- shapes (pure) -------------------------------------------------------------------------------
def test_day_profile_fixed_fallback() -> None:
    p = shapes.load(PROFILES / "day.toml")
    assert p.kind == "day" and p.source == "fixed"
    assert p.duration == pytest.approx(24 * 60)  # 24 minutes: one per hour of the day
    # shares per hour 10/7, 5/1, 70/12, 15/4 against the busiest (70/12): 20 requests/s
    expected = [(0, 20 * (10 / 7) / (70 / 12)), (419.9, 4.898), (420, 17.143), (480, 20.0),
                (1199.9, 20.0), (1200, 12.857), (1439.9, 12.857)]
    for t, rate in expected:
        assert p.rate_at(t) == pytest.approx(rate, rel=1e-3), t
    assert p.rate_at(1440) is None
    assert [s.label for s in p.stages] == ["00-07", "07-08", "08-20", "20-24"]
    assert p.mix == {"WebServiceUser": 60, "DownloadUser": 30, "LdapUser": 5, "PortalUser": 5}
    assert p.lodging_per_minute == 6
    # the mix shares a rate among the enabled classes only
    assert p.class_rates(10, ["WebServiceUser", "DownloadUser"]) == pytest.approx(
        {"WebServiceUser": 60 / 9, "DownloadUser": 30 / 9})
    assert p.scaled(1.2).rate_at(500) == pytest.approx(24.0)


def test_forecast_rates() -> None:
    """The sum of every user's band forecasts over the band's real length; users without a
    forecast count nothing; without any forecast the profile keeps its fixed rates."""
    def user(per_day: int | None, split: tuple[int, ...]) -> dict[str, Any]:
        return {"forecast": per_day,
                "bands": [{"forecast": None if per_day is None else per_day * p / 100}
                          for p in split]}

    demand = {"users": [user(864000, (10, 5, 70, 15)), user(86400, (25, 25, 25, 25)),
                        user(None, (0, 0, 0, 0))]}
    rates = shapes.forecast_band_rates(demand)
    assert rates == pytest.approx((86400 / 25200 + 21600 / 25200, 43200 / 3600 + 21600 / 3600,
                                   604800 / 43200 + 21600 / 43200, 129600 / 14400 + 21600 / 14400))
    day = shapes.parse({"kind": "day", "minutes": 0.4, "peak_rate": 5})
    with_f = shapes.with_forecasts(day, demand)
    assert with_f.source == "forecast"
    assert [s.rate for s in with_f.stages] == pytest.approx(rates)
    assert [s.seconds for s in with_f.stages] == pytest.approx([7, 1, 12, 4])
    assert shapes.with_forecasts(day, {"users": [user(None, (0, 0, 0, 0))]}) is day
    assert shapes.forecast_band_rates({"users": []}) is None


@pytest.mark.parametrize("name", ["peak", "spike", "soak"])
def test_stage_profiles(name: str) -> None:
    p = shapes.load(PROFILES / f"{name}.toml")
    assert p.rate_at(0) == p.stages[0].rate
    assert p.rate_at(p.duration + 1) is None
    t = 0.0
    for stage in p.stages:
        assert p.rate_at(t + stage.seconds / 2) == stage.rate
        t += stage.seconds


def test_spike_profile_shape() -> None:
    p = shapes.load(PROFILES / "spike.toml")
    assert [p.rate_at(t) for t in (0, 119, 120, 179, 180, 359)] == [10, 10, 100, 100, 10, 10]
    assert p.rate_at(360) is None


def test_profile_errors(tmp_path: Path) -> None:
    for bad in ({"kind": "hourly"}, {"kind": "stages"}, {"stage": [{"seconds": 0, "rate": 1}]},
                {"stage": [{"seconds": 1, "rate": -1}]},
                {"stage": [{"seconds": "x", "rate": 1}]},
                {"kind": "day", "minutes": 1, "peak_rate": 0},
                {"kind": "day", "minutes": 1, "peak_rate": 2,
                 "band": [{"start": 0, "end": 8, "share": 1}] * 4},
                {"stage": [{"seconds": 1, "rate": 1}], "mix": {"WebServiceUser": 0}}):
        with pytest.raises(shapes.ProfileError):
            shapes.parse(bad)
    with pytest.raises(shapes.ProfileError, match="demand factor"):
        shapes.load(PROFILES / "peak.toml").scaled(0)
    (tmp_path / "bad.toml").write_text("kind = [")
    with pytest.raises(shapes.ProfileError, match=r"bad\.toml: not TOML"):
        shapes.load(tmp_path / "bad.toml")


# -- verdict (pure) ------------------------------------------------------------------------------
def test_verdict_counts_failures_as_late() -> None:
    t = verdict.Tally(trt_seconds=3)
    for _ in range(97):
        t.add("WebServiceUser", "ws", 10.0, True, "08-20")
    t.add("WebServiceUser", "ws", 3000.0, True, "08-20")  # exactly the TRT: within
    t.add("WebServiceUser", "ws", 3000.1, True, "20-24")  # late
    t.add("WebServiceUser", "ws", 5.0, False, "20-24")  # fast but failed: late
    rows = dict(t.rows())
    total = rows[verdict.TOTAL]
    assert (total.total, total.within, total.failed, total.late) == (100, 98, 1, 2)
    assert total.percent == pytest.approx(98.0)
    assert (rows["band 08-20"].total, rows["band 20-24"].within) == (98, 0)
    t.add("WebServiceUser", "ws", 5.0, True, "spike")  # a stage profile's label
    assert dict(t.rows())["stage spike"].total == 1
    t.counts.pop(("WebServiceUser", "ws", "spike"))
    assert verdict.verdict(total.percent, 99, 96) == verdict.BELOW_TARGET
    assert not verdict.passed(t, 99, 96)  # band 20-24: 0 %
    t.counts.pop(("WebServiceUser", "ws", "20-24"))
    t.add("WebServiceUser", "ws", 3000.1, True, "08-20")
    t.add("WebServiceUser", "ws", 5.0, False, "08-20")
    assert verdict.passed(t, 99, 96)
    assert not verdict.passed(t, 99, 96, fail_below_target=True)
    assert not verdict.passed(t, 99, 98.5)
    assert verdict.verdict(None, 99, 96) == verdict.NO_REQUESTS
    assert verdict.verdict(99.0, 99, 96) == verdict.MEETS
    assert verdict.verdict(95.99, 99, 96) == verdict.BELOW_MINIMUM


def test_verdict_lodging_apart_and_every_row() -> None:
    t = verdict.Tally(trt_seconds=1)
    for _ in range(990):
        t.add("WebServiceUser", "ws", 1.0, True)
    for _ in range(10):
        t.add("DownloadUser", "download", 2000.0, True)  # all late
    t.add("LodgerUser", "lodge", 5000.0, True)  # late, but not in CPM 8's total
    rows = dict(t.rows())
    assert rows[verdict.TOTAL].percent == pytest.approx(99.0)
    assert rows["lodging (not in CPM 8)"].total == 1
    assert "class LodgerUser" not in rows
    assert not verdict.passed(t, 99, 96)  # the download interface is at 0 %
    assert not verdict.passed(verdict.Tally(), 99, 96)  # no requests: no pass
    report = verdict.format_report(t, 99, 96)
    assert "interface download" in report and "below minimum" in report
    assert "lodging (not in CPM 8)" in report


def test_verdict_merges_worker_reports() -> None:
    a, b, master = verdict.Tally(1), verdict.Tally(1), verdict.Tally(1)
    a.add("WebServiceUser", "ws", 10, True)
    a.arrived("WebServiceUser")
    b.add("WebServiceUser", "ws", 1500, True)
    b.add("DownloadUser", "download", 10, False)
    b.arrived("WebServiceUser")
    master.merge(a.take())
    master.merge(b.export())
    master.merge(None)
    assert a.counts == {} and a.arrivals == {}
    rows = dict(master.rows())
    total = rows[verdict.TOTAL]
    assert (total.total, total.within, total.failed) == (3, 1, 1)
    assert rows["class WebServiceUser"].max_ms == 1500
    assert master.arrivals == {"WebServiceUser": 2}


def test_shortfalls() -> None:
    assert verdict.shortfalls({"WebServiceUser": 100.0}, {"WebServiceUser": 89}, 10) == []
    short = verdict.shortfalls({"WebServiceUser": 100.0, "DownloadUser": 50.0},
                               {"WebServiceUser": 87, "DownloadUser": 50}, 10)
    assert len(short) == 1 and short[0].startswith("WebServiceUser: 87 arrivals"), short


def test_cpm_difference_and_server_warnings() -> None:
    before = {"interfaces": [{"interface": "ws", "received": 10, "within_trt": 9}],
              "total": {"received": 10, "within_trt": 9}}
    after = {"month": "2026-11", "trt_seconds": 3.0,
             "interfaces": [{"interface": "download", "received": 5, "within_trt": 5},
                            {"interface": "ws", "received": 30, "within_trt": 29}],
             "total": {"received": 35, "within_trt": 34}}
    server = verdict.cpm_difference(before, after)
    assert server == [("download", 5, 5), ("ws", 20, 20), ("TOTAL", 25, 25)]
    assert verdict.cpm_difference(None, after)[-1] == ("TOTAL", 35, 34)
    assert "received" in verdict.format_cpm(before, after)
    t = verdict.Tally(1)
    for i in range(20):
        t.add("WebServiceUser", "ws", 10 if i < 18 else 5000, True)
    for _ in range(5):
        t.add("DownloadUser", "download", 10, True)
    warnings = verdict.server_warnings(t, server)
    assert warnings == ["interface ws: the server counts 20 within TRT, the client saw 18",
                        f"{verdict.TOTAL}: the server counts 25 within TRT, the client saw 23"]
    outcome = verdict.Outcome(t, 80, 50, server=server, server_trt=1.0)
    assert outcome.warnings == warnings
    assert outcome.exit_code() == 0 and outcome.word == "PASS"
    strict = verdict.Outcome(t, 80, 50, server=server, server_trt=1.0, strict=True)
    assert strict.exit_code() == 1
    # counts judged by another TRT are shown, not compared
    other = verdict.Outcome(t, 80, 50, server=server, server_trt=3.0, strict=True)
    assert other.warnings == [] and other.exit_code() == 0
    assert other.notes == ["the server's TRT (3.0 s) is not --trt (1 s): its figures are"
                           " shown, not compared"]
    assert verdict.Outcome(t, 80, 50, problems=["no LdapUser made a request"]).exit_code() == 3


def test_verdict_reports() -> None:
    """The verdict's CSV, JUnit XML and HTML section carry TRT, within/late per row and the
    server's figures; a failing row is a JUnit failure."""
    import io
    import xml.etree.ElementTree as ET

    t = verdict.Tally(2)
    t.add("WebServiceUser", "ws", 10, True, "08-20")
    t.add("WebServiceUser", "ws", 2500, True, "08-20")
    outcome = verdict.Outcome(t, 99, 96, server=[("ws", 2, 2), ("TOTAL", 2, 2)],
                              server_trt=2.0)
    rows = list(csv.DictReader(io.StringIO(outcome.csv_text())))
    ws = next(r for r in rows if r["row"] == "interface ws")
    assert (ws["requests"], ws["within_trt"], ws["late"], ws["verdict"]) == (
        "2", "1", "1", verdict.BELOW_MINIMUM)
    assert (ws["server_received"], ws["server_within_trt"]) == ("2", "2")
    suite = ET.fromstring(outcome.junit_xml())
    assert int(suite.get("failures", "0")) >= 1 and suite.get("errors") == "0"
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None]
    assert any(n.startswith("interface ws: 1/2 within TRT 2 s") for n in failed), failed
    page = verdict.add_to_html("<html><body><div id=root></div></body></html>",
                               outcome.html_section())
    assert page.index('id="smki-verdict"') < page.index("id=root")
    assert "SMKI verdict: FAIL" in page and "server_within_trt" in page
    assert "warning: interface ws: the server counts 2 within TRT, the client saw 1" in page


# -- headless Locust against a real server ---------------------------------------------------------
async def _started(tmp_path: Path, pki: dict[str, Any], dsn: str, **over: Any) -> Running:
    repo = await start_repository(tmp_path, pki, dsn, **over)
    running = Running(repo, pki)
    await add_user(repo, "tester", TEST_KEY)
    await add_user(repo, "ops", OPERATOR_KEY, role="operator")
    await asyncio.to_thread(lodge_pki, running)
    return running


def _locust_args(host: str, tmp_path: Path, profile: str, *extra: str) -> list[str]:
    (tmp_path / "profile.toml").write_text(profile)
    return [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"),
            "--headless", "--host", host, "--load-profile", str(tmp_path / "profile.toml"),
            "--csv", str(tmp_path / "report"), "--html", str(tmp_path / "report.html"),
            "--only-summary", *extra]


async def _run_locust(args: list[str], tmp_path: Path, timeout: float = 90) -> tuple[int, str]:
    """Run Locust headless as a subprocess (the server may share this event loop: never
    block it)."""
    code, out, _ = await run_process(*args, timeout=timeout, merge_stderr=True,
                                     cwd=str(tmp_path), env=cli_env())
    text = out.decode(errors="replace")
    print(text)  # shown with -s, and with a failing test
    return code, text


async def _locust(running: Running, tmp_path: Path, profile: str, *extra: str,
                  lodging: bool = True) -> tuple[int, str]:
    cert, key = running.client_cert
    lodge = ["--pki-dir", str(running.pki_dir), "--lodge-host", running.lodge_url,
             "--dcc-cert", cert, "--dcc-key", key, "--tls-ca", running.tls_ca] if lodging else []
    return await _run_locust(_locust_args(running.http, tmp_path, profile, "--api-key", TEST_KEY,
                                          "--operator-key", OPERATOR_KEY, *lodge, *extra),
                             tmp_path)


def _stats(tmp_path: Path) -> dict[str, dict[str, str]]:
    with open(tmp_path / "report_stats.csv", newline="") as f:
        return {r["Name"]: r for r in csv.DictReader(f)}


def _shipped_day(minutes: float, **values: float) -> str:
    """The shipped day.toml with its day compressed to `minutes` (and other values set)."""
    text = (PROFILES / "day.toml").read_text()
    for name, value in {"minutes": minutes, **values}.items():
        text = re.sub(rf"(?m)^{name} = \S+", f"{name} = {value}", text)
    return text


def _steady(seconds: float, rate: float, mix: str = "WebServiceUser = 1") -> str:
    return (f'kind = "stages"\n[[stage]]\nseconds = {seconds}\nrate = {rate}\n'
            f"[mix]\n{mix}\n[lodging]\nper_minute = 0\n")


async def test_shipped_day_profile_lodges_and_passes(tmp_path: Path, pki: dict[str, Any],
                                                     fresh_db: str) -> None:
    """The shipped day profile, compressed to 12 s, with the lodging options: LodgerUser
    runs (its own rate, not the mix's 1 %) and is reported apart from CPM 8; the verdict is
    in the HTML report, a CSV and a JUnit file of its own."""
    running = await _started(tmp_path, pki, fresh_db)
    try:
        code, out = await _locust(running, tmp_path, _shipped_day(0.2, peak_rate=8))
    finally:
        await running.repo.stop()
    assert code == 0, out
    assert "Verdict: PASS" in out, out
    for row in ("class WebServiceUser", "class DownloadUser", "interface ws",
                "interface download", "band 00-07", "band 08-20", "lodging (not in CPM 8)",
                "Server CPM 8"):
        assert row in out, out
    stats = _stats(tmp_path)
    for name in ("ws search", "ws retrieve", "download crls", "download crl",
                 "download certificate", "download documents", "download document"):
        assert int(stats[name]["Request Count"]) > 0, (name, stats.get(name))
    assert int(stats["lodge certificates"]["Request Count"]) >= 1, stats.keys()
    assert int(stats["lodge certificates"]["Failure Count"]) == 0
    page = (tmp_path / "report.html").read_text()
    assert 'id="smki-verdict"' in page and "SMKI verdict: PASS" in page
    assert "lodging (not in CPM 8)" in (tmp_path / "report_verdict.csv").read_text()
    assert 'failures="0" errors="0"' in (tmp_path / "report_verdict.xml").read_text()


async def test_headless_run_against_a_stalled_server_fails(tmp_path: Path, pki: dict[str, Any],
                                                      fresh_db: str) -> None:
    """The server stalls 2.5 s in every 3.1 s (its event loop blocked). Arrivals come about
    once a second, so every stall's first 1.5 s holds one, which waits longer than the 1 s
    TRT: the verdict fails."""
    running = await _started(tmp_path, pki, fresh_db)
    try:
        async with loop_stalls(2.5, 3.1):
            code, out = await _locust(running, tmp_path, _steady(6, 3), "--trt", "1",
                                      lodging=False)
    finally:
        await running.repo.stop()
    assert code == 1, out
    assert "Verdict: FAIL" in out and "below minimum" in out, out
    assert "SMKI verdict: FAIL" in (tmp_path / "report.html").read_text()


async def test_a_user_class_that_raises_exits_3(tmp_path: Path, pki: dict[str, Any],
                                                fresh_db: str) -> None:
    """PortalUser's sign-in is refused (a wrong password): its on_start raises, the load is
    broken whatever the other classes' verdict: exit 3, not a PASS."""
    running = await _started(tmp_path, pki, fresh_db)
    try:
        code, out = await _locust(running, tmp_path, _steady(4, 4, "WebServiceUser = 1\n"
                                                                   "PortalUser = 1"),
                                  "--portal-user", "tester", "--portal-password", "wrong",
                                  lodging=False)
        # a relying party's key where the operator's belongs: a configuration error
        not_ops = _locust_args(running.http, tmp_path, _steady(2, 1), "--api-key", TEST_KEY,
                               "--operator-key", TEST_KEY)
        refused, refused_out = await _run_locust(not_ops, tmp_path)
    finally:
        await running.repo.stop()
    assert refused == 2 and "--operator-key: refused by /ops/loadtest/sample" in refused_out, (
        refused_out)
    assert "user 'tester' is not an operator" in refused_out, refused_out
    assert code == 3, out
    assert "LOAD BROKEN: a user class raised" in out and "portal sign-in as 'tester'" in out, out
    assert "no PortalUser made a request" in out, out
    assert "Verdict: LOAD BROKEN" in out, out
    assert 'errors="1"' in (tmp_path / "report_verdict.xml").read_text()


async def test_usage_errors_exit_2_and_an_unreachable_target_3(tmp_path: Path) -> None:
    profile = _steady(2, 1)
    closed = f"http://127.0.0.1:{_closed_port()}"
    for extra, code, text in (
            ((), 2, "--operator-key: an operator's API key is needed"),
            (("--operator-key", "k", "--trt", "0"), 2, "--trt: must be above 0"),
            (("--operator-key", "k", "--dcc-cert", "c.pem"), 2,
             "lodging needs all of --dcc-cert, --dcc-key and --tls-ca"),
            (("--operator-key", "k", "--ldap-host", "ldap://127.0.0.1:389"), 2, "--ldap-user"),
            (("--operator-key", "k"), 3, f"the target {closed} cannot be reached")):
        got, out = await _run_locust(_locust_args(closed, tmp_path, profile, "--api-key", "a",
                                                  *extra), tmp_path)
        assert got == code and text in out, (extra, out)
        assert "Traceback" not in out, out
    (tmp_path / "bad.toml").write_text('kind = "stages"\n[[stage]]\nseconds = 0\nrate = 1\n')
    args = _locust_args(closed, tmp_path, "", "--api-key", "a", "--operator-key", "k")
    args[args.index("--load-profile") + 1] = str(tmp_path / "bad.toml")
    got, out = await _run_locust(args, tmp_path)
    assert got == 2 and "seconds must be > 0" in out, out


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the load tests' data, from the server -------------------------------------------------------
async def test_sample_endpoint(tmp_path: Path, pki: dict[str, Any], fresh_db: str) -> None:
    """GET /ops/loadtest/sample: distinct EUI-64s the repository holds, with serials it
    serves, organisations, CRL/ARL URLs and document names; operators only; bad parameters
    are 400s naming the parameter."""
    import json

    from tests.conftest import http_get

    running = await _started(tmp_path, pki, fresh_db)
    base = f"{running.http}/ops/loadtest/sample"
    ops = {"X-API-Key": OPERATOR_KEY}
    try:
        status, _, body = await asyncio.to_thread(http_get, f"{base}?devices=8&organisations=3",
                                                  ops)
        assert status == 200, body
        sample = json.loads(body)
        devices, orgs = sample["devices"], sample["organisations"]
        assert len(devices) == 8 and len({d["eui64"] for d in devices}) == 8, devices
        assert len(orgs) == 3 and len({o["eui64"] for o in orgs}) == 3, orgs
        known = {o["eui64"].upper() for o in running.objects("organisation")}
        assert {o["eui64"] for o in orgs} <= known
        for d in devices:
            assert len(d["serials"]) == 2, d  # the test PKI's DS and KA certificates
            for serial in d["serials"]:
                got = await asyncio.to_thread(http_get, f"{running.http}/certificates/{serial}"
                                              f"?apikey={TEST_KEY}")
                assert got[0] == 200, (serial, got[2][:200])
        assert sample["crls"] and all(u.startswith("/crls/") for u in sample["crls"])
        assert sorted(sample["documents"]) == sorted(
            o["name"] for o in running.objects("document")), sample["documents"]
        assert sample["holding"]["devices"] >= 8
        # more than the repository holds: every one of them, once
        status, _, body = await asyncio.to_thread(http_get, f"{base}?devices=10000", ops)
        assert status == 200, body
        everyone = json.loads(body)["devices"]
        assert len(everyone) == len({d["eui64"] for d in everyone}) == sample["holding"]["devices"]
        for query, problem in (("devices=many", b"devices"), ("organisations=-1", b"organisations"),
                               ("devices=10001", b"10000")):
            status, _, body = await asyncio.to_thread(http_get, f"{base}?{query}", ops)
            assert status == 400 and problem in body, (query, status, body)
        status, _, body = await asyncio.to_thread(http_get, f"{base}?devices=1",
                                                  {"X-API-Key": TEST_KEY})
        assert status == 403 and b"operator" in body, body
    finally:
        await running.repo.stop()


# -- against `smki-repository demo`, a process of its own -----------------------------------------
class Demo:
    def __init__(self, proc: subprocess.Popen[str], data: Path, ports: dict[str, int],
                 operator_key: str, portal_password: str) -> None:
        self.proc = proc
        self.data = data
        self.ports = ports
        self.operator_key = operator_key
        self.portal_password = portal_password
        self.http = f"http://127.0.0.1:{ports['http']}"

    def args(self, tmp_path: Path, profile: str, *extra: str, lodging: bool = True) -> list[str]:
        """What the README tells a performance tester: the demo's key, operator key and (for
        lodging) its PKI and DCC client."""
        pki = self.data / "pki"
        lodge = ["--pki-dir", str(pki), "--lodge-host", f"https://localhost:{self.ports['lodge']}",
                 "--dcc-cert", str(pki / "dcc" / "client.pem"),
                 "--dcc-key", str(pki / "dcc" / "client.key.pem"),
                 "--tls-ca", str(pki / "tls" / "ca.pem")] if lodging else []
        return _locust_args(self.http, tmp_path, profile, "--api-key", DCC_BOXED_KEY,
                            "--operator-key", self.operator_key, *lodge, *extra)

    def cli(self, *args: str) -> str:
        res = subprocess.run([*smki_cli(), *args, "--data-dir", str(self.data)], env=cli_env(),
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout


DCC_BOXED_KEY = "u3bg9gt38htd0j2"
PORTAL_PASSWORD = "load-test portal password 7"


def _change_portal_password(base: str, user: str, old: str, new: str) -> None:
    """Sign in with the demo's first password and choose a new one, as a browser does."""
    import requests

    csrf = re.compile(r'name="csrf" value="([^"]*)"')
    with requests.Session() as s:
        form = s.get(f"{base}/portal/sign-in", timeout=10)
        r = s.post(f"{base}/portal/sign-in", allow_redirects=False, timeout=30, data={
            "csrf": csrf.findall(form.text)[0], "username": user, "password": old})
        assert r.status_code == 303 and r.headers["Location"] == "/portal/password", r.text
        form = s.get(f"{base}/portal/password", timeout=10)
        r = s.post(f"{base}/portal/password", allow_redirects=False, timeout=30, data={
            "csrf": csrf.findall(form.text)[0], "current": old, "new": new, "confirm": new})
        assert r.status_code == 303, r.text


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """`smki-repository demo` with its LDAP listener, its portal user's password changed."""
    from tests.test_process import ports_env, start_demo

    data = tmp_path_factory.mktemp("demo") / "var"
    env, ports = ports_env()
    ports["ldap"] = _closed_port()
    env["SMKI_LISTENERS__LDAP"] = f"127.0.0.1:{ports['ldap']}"
    proc, lines, ready = start_demo(data, env)
    try:
        assert ready.wait(120), "".join(lines[-40:])
        text = "".join(lines)
        keys = re.findall(r"operator user demo-operator: API key \(shown only now\): (\S+)",
                          text)
        password = re.findall(r"portal user demo-portal: initial portal password: (\S+)", text)
        assert keys and password, text
        running = Demo(proc, data, ports, keys[0], PORTAL_PASSWORD)
        _change_portal_password(running.http, "demo-portal", password[0], PORTAL_PASSWORD)
        yield running
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


async def test_every_user_class_against_the_demo(demo: Demo, tmp_path: Path) -> None:
    """WebServiceUser, DownloadUser, LdapUser (bound with the demo's API key), PortalUser
    (signed in as demo-portal) and LodgerUser in the shipped day profile compressed to 12 s:
    every class makes its requests, the verdict passes, and the server counts LDAP and the
    portal too."""
    args = demo.args(tmp_path, _shipped_day(0.2, peak_rate=10),
                     "--ldap-host", f"ldap://127.0.0.1:{demo.ports['ldap']}",
                     "--ldap-user", "dcc-boxed", "--portal-user", "demo-portal",
                     "--portal-password", demo.portal_password)
    code, out = await _run_locust(args, tmp_path)
    assert code == 0 and "Verdict: PASS" in out, out
    stats = _stats(tmp_path)
    for name in ("ldap search eui64", "ldap search serial", "portal search",
                 "portal certificate", "lodge certificates", "ws search", "download crl"):
        assert int(stats[name]["Request Count"]) > 0, (name, sorted(stats))
        assert int(stats[name]["Failure Count"]) == 0, stats[name]
    for row in ("class LdapUser", "class PortalUser", "interface ldap", "interface portal"):
        assert row in out, out
    server = {r["row"]: r for r in csv.DictReader(
        (tmp_path / "report_verdict.csv").read_text().splitlines())}
    for interface in ("ldap", "portal", "ws", "download"):
        assert int(server[f"interface {interface}"]["server_received"] or 0) > 0, server


async def test_forecast_derived_day_rates(demo: Demo, tmp_path: Path) -> None:
    """Forecasts set with `smki-repository users forecast`: the day profile's rate in each
    band is the sum of the forecasts for it over the band's length, times the demand factor,
    and the requests made in a band are that rate within 20 %."""
    demo.cli("users", "forecast", "dcc-boxed", "--per-day", "864000", "--bands", "10,5,70,15")
    demo.cli("users", "forecast", "demo-portal", "--per-day", "86400")
    try:
        profile = _shipped_day(0.5).split("[mix]")[0] + "[mix]\nDownloadUser = 1\n"
        code, out = await _run_locust(demo.args(tmp_path, profile, "--demand-factor", "1.2",
                                                lodging=False), tmp_path)
    finally:
        demo.cli("users", "forecast", "dcc-boxed", "--clear")
        demo.cli("users", "forecast", "demo-portal", "--clear")
    assert code == 0, out
    # per band (requests/s): (the day's forecast x band share / band seconds) x 1.2
    want = {"00-07": (86400 + 21600) / 25200 * 1.2, "07-08": (43200 + 21600) / 3600 * 1.2,
            "08-20": (604800 + 21600) / 43200 * 1.2, "20-24": (129600 + 21600) / 14400 * 1.2}
    line = next(ln for ln in out.splitlines() if ln.startswith("Load profile day"))
    assert "the server's forecasts, demand factor 1.2" in line, line
    for band, seconds in (("00-07", 8.75), ("07-08", 1.25), ("08-20", 15), ("20-24", 5)):
        assert f"{band} {seconds:g} s at {want[band]:.3f} requests/s" in line, (band, line)
    rows = {r["row"]: r for r in csv.DictReader(
        (tmp_path / "report_verdict.csv").read_text().splitlines())}
    made = int(rows["band 08-20"]["requests"])
    assert made == pytest.approx(want["08-20"] * 15, rel=0.2), (made, out)
    total = int(rows[verdict.TOTAL]["requests"])
    assert total == pytest.approx(sum(want[b] * s for b, s in (
        ("00-07", 8.75), ("07-08", 1.25), ("08-20", 15), ("20-24", 5))), rel=0.15), (total, out)


async def _locust_while(demo: Demo, args: list[str], tmp_path: Path,
                        disturb: Callable[[asyncio.Future[Any]], Awaitable[None]]
                        ) -> tuple[int, str, int]:
    """Run Locust while `disturb(its end)` signals the demo; the demo is always resumed.
    (exit code, output, late requests in the CPM 8 total)."""
    proc = await asyncio.create_subprocess_exec(*args, cwd=str(tmp_path), env=cli_env(),
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    communicate = asyncio.ensure_future(proc.communicate())
    try:
        await disturb(communicate)
        out_bytes, _ = await asyncio.wait_for(communicate, 90)
    finally:
        demo.proc.send_signal(signal.SIGCONT)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    out = out_bytes.decode(errors="replace")
    print(out)
    total = next((ln for ln in out.splitlines() if ln.startswith(verdict.TOTAL)), "")
    assert total, out
    return proc.returncode or 0, out, int(total.split()[-6])


async def test_a_server_frozen_at_the_end_fails(demo: Demo, tmp_path: Path) -> None:
    """The demo stopped (SIGSTOP) for the last 5 s of a 12 s run: the requests it never
    answers are waited for up to the TRT, then counted late: the verdict fails (it passed,
    exit 0, when in-flight requests were dropped)."""
    async def freeze(_end: asyncio.Future[Any]) -> None:
        await asyncio.sleep(9)  # Locust's start, and 7 s of the run
        demo.proc.send_signal(signal.SIGSTOP)

    args = demo.args(tmp_path, _steady(12, 6, "WebServiceUser = 1\nDownloadUser = 1"),
                     "--trt", "1", lodging=False)
    code, out, late = await _locust_while(demo, args, tmp_path, freeze)
    assert code == 1 and "Verdict: FAIL" in out, out
    assert "still in flight at the end of the run: counted late" in out, out
    assert late >= 4, out


async def test_a_server_paused_every_second_fails_the_client(demo: Demo, tmp_path: Path) -> None:
    """The client half of issue 15's paused server: the demo stopped 0.5 s in every second,
    TRT 0.25 s, one search (of an EUI-64 it does not hold) per arrival at 20/s: a request
    that arrives in the first half of a pause waits longer than the TRT, so about a quarter
    are late and the client's verdict fails. (The server's half, its own count, is not
    asserted here: the demo's TRT is 3 s.)"""
    async def pause(end: asyncio.Future[Any]) -> None:
        await asyncio.sleep(3)  # Locust's start (its test data is read unpaused)
        while not end.done():
            demo.proc.send_signal(signal.SIGSTOP)
            await asyncio.sleep(0.5)
            demo.proc.send_signal(signal.SIGCONT)
            await asyncio.sleep(0.5)

    args = demo.args(tmp_path, _steady(8, 20), "--trt", "0.25", "--unknown-share", "1",
                     lodging=False)
    code, out, late = await _locust_while(demo, args, tmp_path, pause)
    assert code == 1 and "Verdict: FAIL" in out, out
    assert late >= 10, out


async def test_distributed_a_server_frozen_at_the_end_fails(demo: Demo, tmp_path: Path) -> None:
    """The same frozen server with a master and a worker: the worker's in-flight requests
    are waited for and counted late before the master judges (Locust gives a worker's last
    report half a second, less than that wait: they were lost, and the run passed)."""
    port = str(_closed_port())
    profile = _steady(12, 8, "WebServiceUser = 1\nDownloadUser = 1")
    args = demo.args(tmp_path, profile, "--trt", "1", "--master", "--expect-workers", "1",
                     "--master-bind-port", port, lodging=False)
    worker = subprocess.Popen(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"),
         "--worker", "--master-port", port], cwd=str(tmp_path), env=cli_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def freeze(_end: asyncio.Future[Any]) -> None:
        await asyncio.sleep(10)
        demo.proc.send_signal(signal.SIGSTOP)

    try:
        code, out, late = await _locust_while(demo, args, tmp_path, freeze)
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.wait(30)
    assert code == 1 and "Verdict: FAIL" in out, out
    assert late >= 4, out
