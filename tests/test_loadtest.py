"""The Locust load test (loadtest/): its shapes and verdict math (pure), and short headless
runs against a real server: one that passes the verdict and one, with an injected delay
(`web.test_delay_ms`), that fails it. Locust (gevent) only ever runs in a subprocess."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

from loadtest import shapes, verdict

from .conftest import (
    ROOT,
    TEST_KEY,
    Running,
    add_user,
    cli_env,
    lodge_pki,
    run_process,
    start_repository,
)

OPERATOR_KEY = "operator-key-5e1d0a77c3"
PROFILES = ROOT / "conf" / "loadtest"


# -- shapes (pure) -------------------------------------------------------------------------------
def test_day_profile_follows_the_sec_bands() -> None:
    p = shapes.load(PROFILES / "day.toml")
    assert p.duration == pytest.approx(24 * 60)  # 24 minutes: one per hour of the day
    # hourly rates 10/7, 5/1, 70/12, 15/4 against the busiest (70/12): 20 users at the peak
    expected = [(0, 5), (419.9, 5), (420, 17), (479.9, 17), (480, 20), (1199.9, 20),
                (1200, 13), (1439.9, 13)]
    for t, users in expected:
        at = p.at(t)
        assert at is not None and at[0] == users, (t, at)
    assert p.at(1440) is None
    assert p.mix == {"WebServiceUser": 60, "DownloadUser": 39, "LodgerUser": 1}


def test_day_compression_and_shares() -> None:
    stages = shapes.day_stages(minutes=0.2, peak_users=4, spawn_rate=2)
    assert [s.label for s in stages] == ["00-07", "07-08", "08-20", "20-24"]
    assert [s.seconds for s in stages] == pytest.approx([3.5, 0.5, 6.0, 2.0])
    assert [s.users for s in stages] == [1, 3, 4, 3]
    # a band without demand has no users; the busiest band always has peak_users
    flat = shapes.day_stages(24, 10, 1, (0, 0, 100, 0))
    assert [s.users for s in flat] == [0, 0, 10, 0]
    with pytest.raises(shapes.ProfileError):
        shapes.day_stages(24, 10, 1, (0, 0, 0, 0))
    with pytest.raises(shapes.ProfileError):
        shapes.parse({"kind": "day", "minutes": 1, "peak_users": 2,
                      "band": [{"start": 0, "end": 8, "share": 1}] * 4})


@pytest.mark.parametrize("name", ["peak", "spike", "soak"])
def test_stage_profiles(name: str) -> None:
    p = shapes.load(PROFILES / f"{name}.toml")
    assert p.at(0) == (p.stages[0].users, p.stages[0].spawn_rate)
    assert p.at(p.duration + 1) is None
    t = 0.0
    for stage in p.stages:
        assert p.at(t + stage.seconds / 2) == (stage.users, stage.spawn_rate)
        t += stage.seconds


def test_spike_profile_shape() -> None:
    p = shapes.load(PROFILES / "spike.toml")
    assert [p.at(t) for t in (0, 119, 120, 179, 180, 359)] == [
        (10, 10), (10, 10), (100, 100), (100, 100), (10, 10), (10, 10)]
    assert p.at(360) is None


def test_profile_errors() -> None:
    for bad in ({"kind": "hourly"}, {"kind": "stages"}, {"stage": [{"seconds": 0, "users": 1}]},
                {"stage": [{"seconds": 1, "users": 1}], "wait": {"min": 3, "max": 1}},
                {"stage": [{"seconds": "x", "users": 1}]}):
        with pytest.raises(shapes.ProfileError):
            shapes.parse(bad)


# -- verdict (pure) ------------------------------------------------------------------------------
def test_verdict_counts_failures_as_late() -> None:
    t = verdict.Tally(trt_seconds=3)
    for _ in range(97):
        t.add("WebServiceUser", "ws", 10.0, True)
    t.add("WebServiceUser", "ws", 3000.0, True)  # exactly the TRT: within
    t.add("WebServiceUser", "ws", 3000.1, True)  # late
    t.add("WebServiceUser", "ws", 5.0, False)  # fast but failed: late
    rows = dict(t.rows())
    total = rows["TOTAL"]
    assert (total.total, total.within, total.failed) == (100, 98, 1)
    assert total.percent == pytest.approx(98.0)
    assert verdict.verdict(total.percent, 99, 96) == verdict.BELOW_TARGET
    assert verdict.passed(t, 99, 96)
    assert not verdict.passed(t, 99, 96, fail_below_target=True)
    assert not verdict.passed(t, 99, 98.5)
    assert verdict.verdict(None, 99, 96) == verdict.NO_REQUESTS
    assert verdict.verdict(99.0, 99, 96) == verdict.MEETS
    assert verdict.verdict(95.99, 99, 96) == verdict.BELOW_MINIMUM


def test_verdict_every_row_must_pass() -> None:
    t = verdict.Tally(trt_seconds=1)
    for _ in range(990):
        t.add("WebServiceUser", "ws", 1.0, True)
    for _ in range(10):
        t.add("DownloadUser", "download", 2000.0, True)  # all late
    assert dict(t.rows())["TOTAL"].percent == pytest.approx(99.0)
    assert not verdict.passed(t, 99, 96)  # the download interface is at 0 %
    assert not verdict.passed(verdict.Tally(), 99, 96)  # no requests: no pass
    report = verdict.format_report(t, 99, 96)
    assert "interface download" in report and "below minimum" in report


def test_verdict_merges_worker_reports() -> None:
    a, b, master = verdict.Tally(1), verdict.Tally(1), verdict.Tally(1)
    a.add("WebServiceUser", "ws", 10, True)
    b.add("WebServiceUser", "ws", 1500, True)
    b.add("DownloadUser", "download", 10, False)
    master.merge(a.take())
    master.merge(b.export())
    master.merge([])
    assert a.counts == {}
    rows = dict(master.rows())
    assert (rows["TOTAL"].total, rows["TOTAL"].within, rows["TOTAL"].failed) == (3, 1, 1)
    assert rows["class WebServiceUser"].max_ms == 1500


def test_cpm_difference() -> None:
    before = {"interfaces": [{"interface": "ws", "received": 10, "within_trt": 9}],
              "total": {"received": 10, "within_trt": 9}}
    after = {"month": "2026-11", "trt_seconds": 3.0,
             "interfaces": [{"interface": "download", "received": 5, "within_trt": 5},
                            {"interface": "ws", "received": 30, "within_trt": 29}],
             "total": {"received": 35, "within_trt": 34}}
    assert verdict.cpm_difference(before, after) == [
        ("download", 5, 5), ("ws", 20, 20), ("TOTAL", 25, 25)]
    assert verdict.cpm_difference(None, after)[-1] == ("TOTAL", 35, 34)
    assert "received" in verdict.format_cpm(before, after)


# -- headless Locust against a real server ---------------------------------------------------------
async def _started(tmp_path: Path, pki: dict[str, Any], dsn: str, **over: Any) -> Running:
    repo = await start_repository(tmp_path, pki, dsn, **over)
    running = Running(repo, pki)
    await add_user(repo, "tester", TEST_KEY)
    await add_user(repo, "ops", OPERATOR_KEY, role="operator")
    await asyncio.to_thread(lodge_pki, running)
    return running


async def _locust(running: Running, tmp_path: Path, profile: str, *extra: str) -> tuple[int, str]:
    """Run Locust headless as a subprocess (the server shares this event loop: never block)."""
    (tmp_path / "profile.toml").write_text(profile)
    cert, key = running.client_cert
    args = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"),
            "--headless", "--host", running.http, "--load-profile", str(tmp_path / "profile.toml"),
            "--api-key", TEST_KEY, "--operator-key", OPERATOR_KEY,
            "--pki-dir", str(running.pki_dir), "--lodge-host", running.lodge_url,
            "--dcc-cert", cert, "--dcc-key", key, "--tls-ca", running.tls_ca,
            "--csv", str(tmp_path / "report"), "--html", str(tmp_path / "report.html"),
            "--only-summary", *extra]
    code, out, _ = await run_process(*args, timeout=90, merge_stderr=True, cwd=str(tmp_path),
                                     env=cli_env())
    text = out.decode(errors="replace")
    print(text)  # shown with -s, and with a failing test
    return code, text


DAY_12S = """
kind = "day"
minutes = 0.2
peak_users = 6
spawn_rate = 6
[mix]
WebServiceUser = 1
DownloadUser = 1
LodgerUser = 1
[wait]
min = 0.1
max = 0.3
"""

STEADY_6S = """
kind = "stages"
spawn_rate = 5
[[stage]]
seconds = 6
users = 3
[mix]
WebServiceUser = 1
DownloadUser = 0
LodgerUser = 0
[wait]
min = 0.1
max = 0.2
"""


async def test_headless_day_run_passes(tmp_path: Path, pki: dict[str, Any], fresh_db: str) -> None:
    running = await _started(tmp_path, pki, fresh_db)
    try:
        code, out = await _locust(running, tmp_path, DAY_12S)
    finally:
        await running.repo.stop()
    assert code == 0, out
    assert "Verdict: PASS" in out, out
    for row in ("class WebServiceUser", "class DownloadUser", "class LodgerUser",
                "interface ws", "interface download", "interface lodge"):
        assert row in out, out
    assert "Server CPM 8" in out, out
    assert (tmp_path / "report.html").stat().st_size > 0
    stats = (tmp_path / "report_stats.csv").read_text()
    for name in ("ws search", "ws retrieve", "download crls", "download crl",
                 "download certificate", "download documents", "download document",
                 "lodge certificates"):
        assert f",{name}," in stats, stats


async def test_headless_run_with_injected_delay_fails(tmp_path: Path, pki: dict[str, Any],
                                                      fresh_db: str) -> None:
    running = await _started(tmp_path, pki, fresh_db, web={"test_delay_ms": 1500})
    try:
        code, out = await _locust(running, tmp_path, STEADY_6S, "--trt", "1")
    finally:
        await running.repo.stop()
    assert code != 0, out
    assert "Verdict: FAIL" in out and "below minimum" in out, out


def test_headless_day_run_against_the_demo_passes(tmp_path: Path) -> None:
    """What the README tells a performance tester: `smki-repository demo`, then Locust with
    the demo's own key, PKI and DCC client (every user class), verdict checked, and the
    server's CPM report through the demo operator's key printed beside it."""
    import re
    import subprocess

    from .test_process import ports_env, start_demo

    data = tmp_path / "var"
    env, ports = ports_env()
    demo, lines, ready = start_demo(data, env)
    try:
        assert ready.wait(120), "".join(lines[-40:])
        keys = re.findall(r"operator user demo-operator: API key \(shown only now\): (\S+)", "".join(lines))
        assert keys, "".join(lines)
        (tmp_path / "profile.toml").write_text(DAY_12S)
        pki_dir = data / "pki"
        res = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"),
             "--headless", "--host", f"http://127.0.0.1:{ports['http']}",
             "--load-profile", str(tmp_path / "profile.toml"), "--api-key", "u3bg9gt38htd0j2",
             "--operator-key", keys[0], "--pki-dir", str(pki_dir),
             "--lodge-host", f"https://localhost:{ports['lodge']}",
             "--dcc-cert", str(pki_dir / "dcc" / "client.pem"),
             "--dcc-key", str(pki_dir / "dcc" / "client.key.pem"),
             "--tls-ca", str(pki_dir / "tls" / "ca.pem"), "--only-summary"],
            cwd=str(tmp_path), env=cli_env(), capture_output=True, text=True, timeout=90)
        out = res.stdout + res.stderr
        assert res.returncode == 0, out
        assert "Verdict: PASS" in out and "Server CPM 8" in out, out
        for row in ("interface ws", "interface download", "interface lodge"):
            assert row in out, out
    finally:
        demo.send_signal(2)
        demo.wait(60)
