"""Locust load test of the SMKI repository (issues 5 and 15).

  locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8083 \
      --load-profile conf/loadtest/day.toml --api-key KEY --operator-key OPS_KEY \
      --html report.html --csv report

An open model: the load profile (loadtest/shapes.py) says how many requests per second the
read interfaces are offered, from the users' forecasts the server holds when it has any, and
each user class turns its share into arrivals, each started on time in a greenlet of its own
whether or not the previous ones were answered (so a slow server does not slow the load).
Every user class has a fixed number of users (--users-per-class; the master defaults to
--expect-workers): users only generate arrivals.

User classes (each request is reported to Locust with its own response time and outcome):

* WebServiceUser: Smart DCC's client: certificatesearch, then every result's serial
  retrieved in parallel. A deliberately unknown EUI-64 answered 402 is a success.
* DownloadUser: /crls, each CRL/ARL by conditional GET (304 with the previous ETag is a
  success), a certificate, /documents and one document.
* LdapUser (with --ldap-host and --ldap-user): searches by EUI-64, then by serial, over
  connections bound with --api-key (ldap3).
* PortalUser (with --portal-user and --portal-password): signs in once, then searches by
  EUI-64 and opens a certificate page.
* LodgerUser (with --dcc-cert, --dcc-key and --tls-ca): mutual-TLS lodging of a small batch
  of new device certificates signed by --pki-dir's Issuing DCA, at the profile's
  [lodging] per_minute, apart from the read load (CPM 8 leaves lodging out).

The EUI-64s, serials, CRL/ARL URLs and document names come from the server
(GET /ops/loadtest/sample, with --operator-key). At the end, requests still in flight are
waited for up to --stop-timeout (default: the TRT) and then counted late; the verdict
(loadtest/verdict.py) goes to stdout, a CSV and JUnit XML file of its own and a section of the
HTML report. Exit status: 0 pass, 1 verdict below the minimum (the target with
--fail-below-target; the server's count above the client's with --strict), 2 usage or
configuration error, 3 the load itself broke (a user class raised, an enabled class made no
request or fell short of its rate, the target unreachable).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import html
import itertools
import json
import logging
import os
import random
import re
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import gevent
import gevent.event
import gevent.pool
import gevent.queue
from locust import FastHttpUser, HttpUser, LoadTestShape, User, constant, events
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # loadtest/ is not a package: locust loads this file by path
import verdict

log = logging.getLogger("smki-loadtest")

XML = {"Content-Type": "application/xml"}
SEARCH = ('<?xml version="1.0" encoding="utf-8"?><CertificateSearchRequest>'
          "<{el}>{eui}</{el}></CertificateSearchRequest>")
RETRIEVE = ('<?xml version="1.0" encoding="utf-8"?><CertificateDataRequest>'
            "<CertificateSerial>{serial}</CertificateSerial></CertificateDataRequest>")
SERIAL_RE = re.compile(r"<CertificateSerial>([0-9A-Fa-f]+)</CertificateSerial>")
CSRF_RE = re.compile(r'name="csrf" value="([^"]*)"')
CERT_LINK_RE = re.compile(r'href="(/portal/certificates/[^"]+)"')
NOT_COUNTED = {"portal sign-in form", "portal sign-in", "ldap bind"}  # CPM 8 counts neither
BEHIND_SECONDS = 1.0  # arrivals due longer ago than this are lost, not sent in a burst
READ_CLASSES = ("WebServiceUser", "DownloadUser", "LdapUser", "PortalUser")


class UsageError(Exception):
    pass


# -- options -----------------------------------------------------------------------------------
@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    g = parser.add_argument_group("SMKI repository")
    g.add_argument("--load-profile", default="", help="load profile TOML (conf/loadtest/*.toml);"
                   " without it: --rate requests/s until --run-time")
    g.add_argument("--rate", type=float, default=10.0,
                   help="without --load-profile: requests per second offered (open model)")
    g.add_argument("--demand-factor", type=float, default=1.0,
                   help="multiplies every rate of the profile: 1.0 as forecast, 1.2 the SEC's"
                        " demand threshold")
    g.add_argument("--api-key", default=os.environ.get("SMKI_LOADTEST_API_KEY", ""),
                   help="a relying party's API key")
    g.add_argument("--operator-key", default=os.environ.get("SMKI_LOADTEST_OPERATOR_KEY", ""),
                   help="an operator's API key: the test data (/ops/loadtest/sample), the"
                        " forecasts (/ops/reports/demand) and the server's CPM 8 report")
    g.add_argument("--extra-hosts", default="", metavar="URL[,URL...]",
                   help="more nodes serving the same store: users are spread round-robin over"
                        " --host and these base URLs (WebServiceUser, DownloadUser, PortalUser)")
    g.add_argument("--users-per-class", type=int, default=0,
                   help="users of each enabled class (default 1; the master: --expect-workers)")
    g.add_argument("--max-in-flight", type=int, default=200,
                   help="arrivals one user keeps in flight at most; one more is counted late")
    g.add_argument("--count-margin", type=float, default=10.0,
                   help="percent fewer arrivals than the rates should produce that still pass")
    g.add_argument("--sample-devices", type=int, default=200, help="devices drawn from the server")
    g.add_argument("--sample-organisations", type=int, default=20,
                   help="organisations drawn from the server")
    g.add_argument("--pki-dir", default="var/pki",
                   help="lodging only: the test PKI whose Issuing DCA signs new certificates")
    g.add_argument("--unknown-share", type=float, default=0.05,
                   help="share of searches for EUI-64s the repository does not hold (402)")
    g.add_argument("--trt", type=float, default=3.0, help="Target Response Time, seconds")
    g.add_argument("--target", type=float, default=99.0, help="target percent within TRT")
    g.add_argument("--minimum", type=float, default=96.0, help="minimum percent within TRT")
    g.add_argument("--fail-below-target", action="store_true",
                   help="exit 1 below the target (not only below the minimum)")
    g.add_argument("--strict", action="store_true",
                   help="exit 1 when the server counts more requests within TRT than the client")
    g.add_argument("--junit-xml", default="", help="the verdict as JUnit XML (default with"
                   " --csv: PREFIX_verdict.xml)")
    g.add_argument("--lodge-host", default="https://localhost:8444", help="the lodging listener")
    g.add_argument("--dcc-cert", default="", help="DCC client certificate (PEM): enables LodgerUser")
    g.add_argument("--dcc-key", default="", help="DCC client key (PEM)")
    g.add_argument("--tls-ca", default="", help="CA of the server's TLS certificate")
    g.add_argument("--lodge-batch", type=int, default=5, help="certificates per lodging")
    g.add_argument("--ldap-host", default="", help="ldap://HOST:PORT or ldaps://…: enables LdapUser")
    g.add_argument("--ldap-user", default="", help="the name of --api-key's user (LDAP binds as"
                   " uid=NAME,ou=Users,o=SMKI with the key)")
    g.add_argument("--portal-user", default="", help="a portal user: enables PortalUser")
    g.add_argument("--portal-password", default="", help="its (changed) portal password")


def _opts(env: Environment) -> Any:
    return env.parsed_options


# -- test data from the server -----------------------------------------------------------------
def _ops_get(env: Environment, path: str, timeout: float = 10.0) -> Any:
    import requests

    o = _opts(env)
    r = requests.get(f"{(env.host or '').rstrip('/')}{path}", timeout=timeout,
                     headers={"X-API-Key": o.operator_key}, verify=o.tls_ca or True)
    if r.status_code in (401, 403):
        raise UsageError(f"--operator-key: refused by {path}: {r.status_code} {r.text[:200]}")
    if r.status_code != 200:
        raise ConnectionError(f"{path}: {r.status_code} {r.text[:200]}")
    return r.json()


class Data:
    def __init__(self) -> None:
        self.subjects: list[tuple[str, str]] = []  # (element, eui lower-case dashed)
        self.devices: list[tuple[str, list[str]]] = []  # (EUI-64, its serials)
        self.serials: list[str] = []  # device and organisation certificate serials (upper hex)
        self.crls: list[str] = []
        self.documents: list[str] = []
        self.known: set[str] = set()
        self.per_subject = 1.0  # certificates per subject, on average

    def load(self, env: Environment) -> None:
        o = _opts(env)
        sample = _ops_get(env, f"/ops/loadtest/sample?devices={o.sample_devices}"
                               f"&organisations={o.sample_organisations}", timeout=60)
        found = 0
        for key, el in (("devices", "CertificateSubjectAltName"),
                        ("organisations", "CertificateSubjectName")):
            for s in sample.get(key, []):
                eui = s["eui64"].lower()
                self.subjects.append((el, eui))
                self.known.add(eui.replace("-", ""))
                self.serials.extend(s["serials"])
                found += len(s["serials"])
                if key == "devices":
                    self.devices.append((s["eui64"], s["serials"]))
        self.crls = list(sample.get("crls", []))
        self.documents = list(sample.get("documents", []))
        if not self.subjects or not self.serials:
            raise ConnectionError(f"{env.host}: the repository holds no device or organisation"
                                  " certificates to load it with")
        self.per_subject = found / len(self.subjects)

    def unknown_eui(self) -> str:
        while True:
            raw = "ff" + secrets.token_hex(7)  # a prefix the test PKI does not use
            if raw not in self.known:
                return "-".join(raw[i:i + 2] for i in range(0, 16, 2))

    def requests_per_arrival(self, cls: str, unknown_share: float) -> float:
        """What one arrival of a class asks, on average: how a class's share of the
        requests/s becomes arrivals/s."""
        if cls == "WebServiceUser":
            return 1 + (1 - unknown_share) * self.per_subject
        if cls == "DownloadUser":
            return 3 + len(self.crls) + (1 if self.documents else 0)
        return 2.0 if cls in ("LdapUser", "PortalUser") else 1.0


class Schedule:
    """What the shape says now: the period (SEC band or stage label) and each class's
    arrivals per second per user. The master sends it to its workers every second."""

    def __init__(self) -> None:
        self.period = ""
        self.rates: dict[str, float] = {}

    def update(self, data: dict[str, Any]) -> None:
        self.period = str(data.get("period", ""))
        self.rates = {str(k): float(v) for k, v in data.get("rates", {}).items()}


DATA = Data()
TALLY = verdict.Tally()
SCHEDULE = Schedule()
PROFILE: shapes.Profile | None = None
CPM_BEFORE: dict[str, Any] | None = None
EXPECTED: dict[str, float] = {}  # arrivals each class should have made (master, local)
LAST_TICK: list[float] = []  # run time of the shape's previous tick
CLASS_RATES: dict[str, float] = {}  # arrivals/s per class, all its users together
STOPPING = gevent.event.Event()
INFLIGHT = gevent.pool.Group()  # every arrival's greenlets
CURRENT: dict[Any, tuple[str, str, str, float]] = {}  # greenlet -> class, type, name, start
DRAINED: list[str] = []  # (master) workers whose final counts are in


def enabled_classes(env: Environment) -> list[type[Any]]:
    o = _opts(env)
    mix = PROFILE.mix if PROFILE else shapes.DEFAULT_MIX
    on = {"WebServiceUser": True, "DownloadUser": True, "LdapUser": bool(o.ldap_host),
          "PortalUser": bool(o.portal_user and o.portal_password)}
    classes: list[type[Any]] = [c for c in (WebServiceUser, DownloadUser, LdapUser, PortalUser)
                                if on[c.__name__] and mix.get(c.__name__, 0) > 0]
    if o.dcc_cert and o.dcc_key and o.tls_ca and (PROFILE is None or PROFILE.lodging_per_minute):
        classes.append(LodgerUser)
    return classes


def _check_usage(env: Environment) -> None:
    """Everything that can be wrong before a request is made: exit 2 with the reason."""
    o = _opts(env)
    if not env.host:
        raise UsageError("--host: the repository's base URL is needed")
    if not o.operator_key:
        raise UsageError("--operator-key: an operator's API key is needed (the test data is"
                         " read from /ops/loadtest/sample)")
    if not o.api_key:
        raise UsageError("--api-key: a relying party's API key is needed")
    for name in ("trt", "rate", "demand_factor"):
        if getattr(o, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')}: must be above 0")
    if not 0 <= o.minimum <= o.target <= 100:
        raise UsageError("--minimum and --target: need 0 <= minimum <= target <= 100")
    if o.ldap_host and not o.ldap_user:
        raise UsageError("--ldap-user: the name of --api-key's user is needed to bind over LDAP")
    if o.ldap_host and not re.match(r"^ldaps?://[^/:]+(:\d+)?/?$", o.ldap_host):
        raise UsageError(f"--ldap-host: expected ldap://HOST:PORT or ldaps://HOST:PORT,"
                         f" got {o.ldap_host!r}")
    if bool(o.portal_user) != bool(o.portal_password):
        raise UsageError("--portal-user and --portal-password go together")
    lodging = [o.dcc_cert, o.dcc_key, o.tls_ca]
    if any(lodging) and not all(lodging):
        raise UsageError("lodging needs all of --dcc-cert, --dcc-key and --tls-ca")
    if all(lodging) and not isinstance(env.runner, MasterRunner):
        for path in (*lodging, str(Path(o.pki_dir) / "manifest.json")):
            if not Path(path).is_file():
                raise UsageError(f"lodging: {path}: no such file (--pki-dir holds the test PKI"
                                 " whose Issuing DCA signs the new certificates)")


def _usage_exit(message: str, code: int) -> None:
    print(f"smki-loadtest: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def _cpm(env: Environment, month: str | None) -> dict[str, Any] | None:
    try:
        return dict(_ops_get(env, "/ops/reports/cpm" + (f"?month={month}" if month else "")))
    except Exception as exc:
        log.warning("server CPM report not read: %s", exc)
        return None


@events.init.add_listener
def _init(environment: Environment, **_kw: Any) -> None:
    global PROFILE
    o = _opts(environment)
    if o is None:
        return
    TALLY.trt_seconds = o.trt
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        # the master sends its options with the first spawn: everything else at test_start
        runner.register_message("smki_schedule", _on_schedule)
        runner.register_message("smki_drain", _on_drain, concurrent=True)
        environment.events.report_to_master.add_listener(
            lambda client_id, data: data.__setitem__("smki_tally", TALLY.take()))
        return
    try:
        _check_usage(environment)
        if o.load_profile:
            PROFILE = shapes.load(o.load_profile)
        else:
            from locust.util.timespan import parse_timespan

            run_time = parse_timespan(o.run_time) if isinstance(o.run_time, str) else o.run_time
            seconds = float(run_time) if run_time else float("inf")
            PROFILE = shapes.Profile("rate", "stages", (shapes.Stage(seconds, o.rate, ""),))
    except (UsageError, shapes.ProfileError) as exc:
        _usage_exit(str(exc), 2)
    assert PROFILE is not None
    try:
        DATA.load(environment)
        if PROFILE.kind == "day":
            PROFILE = shapes.with_forecasts(PROFILE, _ops_get(environment, "/ops/reports/demand"))
    except UsageError as exc:
        _usage_exit(str(exc), 2)
    except Exception as exc:
        _usage_exit(f"the target {environment.host} cannot be reached: {exc}", 3)
    try:
        PROFILE = PROFILE.scaled(o.demand_factor)
    except shapes.ProfileError as exc:
        _usage_exit(str(exc), 2)
    n = o.users_per_class or (max(1, o.expect_workers) if isinstance(runner, MasterRunner) else 1)
    for cls in (WebServiceUser, DownloadUser, LdapUser, PortalUser, LodgerUser):
        cls.fixed_count = n
    where = ("the server's forecasts" if PROFILE.source == "forecast" else "fixed rates")
    print(f"Load profile {PROFILE.name} ({where}, demand factor {o.demand_factor:g}): "
          + ", ".join(f"{s.label or 'stage'} {s.seconds:g} s at {s.rate:.3f} requests/s"
                      for s in PROFILE.stages), flush=True)
    if isinstance(runner, MasterRunner):
        environment.events.worker_report.add_listener(
            lambda client_id, data: TALLY.merge(data.get("smki_tally")))
        runner.register_message("smki_drained", _on_drained)
    else:
        runner.register_message("smki_schedule", _on_schedule)


def _on_schedule(environment: Environment, msg: Any, **_kw: Any) -> None:
    SCHEDULE.update(msg.data)


@events.request.add_listener
def _request(request_type: str, name: str, response_time: float, exception: Any,
             context: dict[str, Any], **_kw: Any) -> None:
    if name in NOT_COUNTED:
        return
    TALLY.add(context.get("user_class", "?"), name.split(" ", 1)[0], response_time or 0.0,
              exception is None, SCHEDULE.period)


@events.test_start.add_listener
def _start(environment: Environment, **_kw: Any) -> None:
    global CPM_BEFORE
    STOPPING.clear()
    TALLY.take()  # a new run (the web UI's Start again) starts from nothing
    EXPECTED.clear()
    LAST_TICK.clear()
    if isinstance(environment.runner, WorkerRunner):
        if not DATA.subjects:
            try:
                DATA.load(environment)
            except Exception as exc:  # the users raise it: the master exits 3
                log.error("test data not read from %s: %s", environment.host, exc)
        return
    CPM_BEFORE = _cpm(environment, None)


def _integrate(now: float) -> None:
    """Add what each class should have made since the last tick at its rate then."""
    if LAST_TICK:
        for cls, rate in CLASS_RATES.items():
            EXPECTED[cls] = EXPECTED.get(cls, 0.0) + rate * max(0.0, now - LAST_TICK[0])
        LAST_TICK[0] = now
    else:
        LAST_TICK.append(now)


def _drain_wait(environment: Environment) -> float:
    return float(environment.stop_timeout or _opts(environment).trt)


@events.test_stopping.add_listener
def _stopping(environment: Environment, **_kw: Any) -> None:
    """Stop making arrivals; wait up to --stop-timeout (default: the TRT) for the requests
    in flight, then count those still unanswered as late and end them. A master has its
    workers do it, and waits for their counts: Locust's own stop gives a worker's final
    report half a second, less than that wait."""
    runner = environment.runner
    if not isinstance(runner, WorkerRunner) and environment.shape_class is not None:
        _integrate(environment.shape_class.get_run_time())  # stopped before the profile's end
        CLASS_RATES.clear()
    if isinstance(runner, MasterRunner):
        DRAINED.clear()
        runner.send_message("smki_drain")
        deadline = time.monotonic() + _drain_wait(environment) + 10
        while len(DRAINED) < runner.worker_count and time.monotonic() < deadline:
            gevent.sleep(0.05)
        if len(DRAINED) < runner.worker_count:
            log.warning("%d of %d workers sent no final counts", runner.worker_count - len(DRAINED),
                        runner.worker_count)
        return
    _drain(environment)


def _drain(environment: Environment) -> None:
    STOPPING.set()
    INFLIGHT.join(timeout=_drain_wait(environment))
    now = time.perf_counter()
    stuck = list(CURRENT.values())
    CURRENT.clear()
    INFLIGHT.kill(block=False)
    for cls, kind, name, started in stuck:
        environment.events.request.fire(
            request_type=kind, name=name, response_time=(now - started) * 1000,
            response_length=0, context={"user_class": cls},
            exception=TimeoutError("still in flight at the end of the run: counted late"))


def _on_drain(environment: Environment, msg: Any, **_kw: Any) -> None:
    """A worker told to stop by its master: drain, then send the counts at once."""
    _drain(environment)
    environment.runner.send_message("smki_drained", TALLY.take())


def _on_drained(environment: Environment, msg: Any, **_kw: Any) -> None:
    TALLY.merge(msg.data)
    DRAINED.append(str(msg.node_id))


def _problems(environment: Environment) -> list[str]:
    """What says the load itself broke (exit 3)."""
    o = _opts(environment)
    runner = environment.runner
    out = [f"a user class raised {e['count']} time(s): {e['msg']}"
           for e in (runner.exceptions.values() if runner is not None else [])]
    for cls in enabled_classes(environment):
        if not TALLY.arrivals.get(cls.__name__) and EXPECTED.get(cls.__name__, 0) >= 1:
            out.append(f"no {cls.__name__} made a request")
    out += verdict.shortfalls({c: n for c, n in EXPECTED.items() if TALLY.arrivals.get(c)},
                              TALLY.arrivals, o.count_margin)
    return out


@events.quitting.add_listener
def _quitting(environment: Environment, **_kw: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    o = _opts(environment)
    after = _cpm(environment, CPM_BEFORE.get("month") if CPM_BEFORE else None)
    outcome = verdict.Outcome(
        TALLY, o.target, o.minimum, o.fail_below_target,
        server=verdict.cpm_difference(CPM_BEFORE, after) if after is not None else None,
        server_trt=after.get("trt_seconds") if after else None, expected=dict(EXPECTED),
        problems=_problems(environment), strict=o.strict)
    print(verdict.format_report(TALLY, o.target, o.minimum), flush=True)
    print("Arrivals (made / the rates' due): " + ", ".join(
        f"{c} {TALLY.arrivals.get(c, 0)}/{EXPECTED.get(c, 0):.0f}" for c in sorted(EXPECTED)),
        flush=True)
    if after is not None:
        print(verdict.format_cpm(CPM_BEFORE, after), flush=True)
    for w in outcome.warnings:
        print(f"WARNING: {w}", flush=True)
    for n in outcome.notes:
        print(f"Note: {n}", flush=True)
    for p in outcome.problems:
        print(f"LOAD BROKEN: {p}", flush=True)
    print(f"Verdict: {outcome.word}", flush=True)
    _write_reports(o, outcome)
    environment.process_exit_code = outcome.exit_code()


def _write_reports(o: Any, outcome: verdict.Outcome) -> None:
    junit = o.junit_xml or (f"{o.csv_prefix}_verdict.xml" if o.csv_prefix else "")
    try:
        if o.csv_prefix:
            Path(f"{o.csv_prefix}_verdict.csv").write_text(outcome.csv_text())
        if junit:
            Path(junit).write_text(outcome.junit_xml())
        if o.html_file and Path(o.html_file).is_file():  # Locust wrote it before quitting
            page = Path(o.html_file).read_text(encoding="utf-8")
            Path(o.html_file).write_text(verdict.add_to_html(page, outcome.html_section()),
                                         encoding="utf-8")
    except OSError as exc:
        log.error("verdict report not written: %s", exc)


# -- users ---------------------------------------------------------------------------------------
class _Tagged:
    def context(self) -> dict[str, Any]:
        return {"user_class": type(self).__name__}


HOST_TURN = itertools.count()


def user_host(env: Environment, host: str | None) -> str | None:
    """The base URL of the next user: --host, or with --extra-hosts each of --host and those
    in turn. A worker starts its turn at its own index, so that two workers running one user
    each load two nodes."""
    o = _opts(env)
    extra = [h.strip() for h in (o.extra_hosts if o is not None else "").split(",") if h.strip()]
    if not extra or not host:
        return host
    hosts = [host, *extra]
    start = max(0, getattr(env.runner, "worker_index", 0) or 0)
    return hosts[(start + next(HOST_TURN)) % len(hosts)]


class _OnNode:
    """A user that talks to one node for its whole life (see user_host): like a real client,
    it keeps its connections to that node."""

    host: str | None

    def __init__(self, environment: Environment) -> None:
        self.host = user_host(environment, self.host)
        super().__init__(environment)  # type: ignore[call-arg]  # the HTTP client takes self.host


class _Arrivals(_Tagged):
    """The open model: arrivals at the rate the shape gives this class, each in a greenlet
    of its own, whether or not earlier ones were answered. `arrive` is one arrival."""

    environment: Environment
    wait_time = constant(0.2)
    first_request = ("GET", "?")  # what an arrival refused for --max-in-flight is counted as

    def arrive(self) -> None:
        raise NotImplementedError

    def arrivals(self) -> None:
        if not DATA.subjects:
            raise RuntimeError(f"no test data from {self.environment.host}"
                               " (/ops/loadtest/sample): see the log")
        name = type(self).__name__
        limit = _opts(self.environment).max_in_flight
        self.in_flight = 0
        last: float | None = None  # the first arrival is at once
        while not STOPPING.is_set():
            rate = SCHEDULE.rates.get(name, 0.0)
            now = time.monotonic()
            if rate <= 0:
                last = now
                gevent.sleep(0.1)
                continue
            due = now if last is None else last + 1.0 / rate
            if due > now:
                gevent.sleep(min(due - now, 0.1))
                continue
            if now - due > BEHIND_SECONDS:  # this generator fell behind: those are lost
                due = now
            last = due
            TALLY.arrived(name)
            if self.in_flight >= limit:
                self._fire(*self.first_request, 0.0, RuntimeError(
                    f"not sent: {limit} arrivals of this user in flight (--max-in-flight)"))
                continue
            self.in_flight += 1
            INFLIGHT.spawn(self._one)

    tasks: ClassVar[list[Any]] = [arrivals]  # (Locust collects tasks from its User classes' bases only)

    def _one(self) -> None:
        try:
            self.arrive()
        except Exception as exc:
            log.exception("%s: an arrival raised", type(self).__name__)
            self.environment.events.user_error.fire(user_instance=self, exception=exc,
                                                    tb=exc.__traceback__)
        finally:
            self.in_flight -= 1

    def spawn_all(self, calls: list[Any]) -> None:
        """Run these in parallel greenlets of the arrival (counted late if cut at the end)."""
        gevent.joinall([INFLIGHT.spawn(c) for c in calls])

    @contextlib.contextmanager
    def flight(self, kind: str, name: str) -> Iterator[None]:
        """Mark a request in flight: one still unanswered at the end is counted late."""
        me = gevent.getcurrent()
        CURRENT[me] = (type(self).__name__, kind, name, time.perf_counter())
        try:
            yield
        finally:
            CURRENT.pop(me, None)

    def _fire(self, kind: str, name: str, ms: float, exc: BaseException | None,
              length: int = 0) -> None:
        self.environment.events.request.fire(request_type=kind, name=name, response_time=ms,
                                             response_length=length, exception=exc,
                                             context=self.context())


class WebServiceUser(_Arrivals, _OnNode, FastHttpUser):  # type: ignore[misc]
    concurrency = 200
    first_request = ("POST", "ws search")

    def arrive(self) -> None:
        o = _opts(self.environment)
        unknown = random.random() < o.unknown_share
        if unknown:
            el, eui = "CertificateSubjectAltName", DATA.unknown_eui()
        else:
            el, eui = random.choice(DATA.subjects)
        serials: list[str] = []
        with self.flight("POST", "ws search"), self.client.post(
                f"/services/certificatesearch?apikey={o.api_key}",
                data=SEARCH.format(el=el, eui=eui), headers=XML, name="ws search",
                catch_response=True) as r:
            if unknown:
                if r.status_code == 402:
                    r.success()
                else:
                    r.failure(f"unknown EUI-64 {eui}: expected 402, got {r.status_code}")
            elif r.status_code == 200:
                serials = SERIAL_RE.findall(r.text or "")
                if serials:
                    r.success()
                else:
                    r.failure("200 without a CertificateSerial")
            else:
                r.failure(f"{eui}: expected 200, got {r.status_code}")
        self.spawn_all([lambda s=s: self.retrieve(format(int(s, 16), "x")) for s in serials])

    def retrieve(self, serial: str) -> None:
        o = _opts(self.environment)
        with self.flight("POST", "ws retrieve"), self.client.post(
                f"/services/retrievecertificate?apikey={o.api_key}",
                data=RETRIEVE.format(serial=serial), headers=XML,
                name="ws retrieve", catch_response=True) as r:
            if r.status_code == 200 and b"<CertificateBody>" in (r.content or b""):
                r.success()
            else:
                r.failure(f"serial {serial}: {r.status_code}")


class DownloadUser(_Arrivals, _OnNode, FastHttpUser):  # type: ignore[misc]
    concurrency = 200
    first_request = ("GET", "download crls")

    def on_start(self) -> None:
        self.etags: dict[str, str] = {}

    def _get(self, url: str, name: str, conditional: bool = False) -> Any:
        headers = {"If-None-Match": self.etags[url]} if conditional and url in self.etags else {}
        with self.flight("GET", name), self.client.get(url, headers=headers, name=name,
                                                       catch_response=True) as r:
            if r.status_code == 200:
                if conditional and r.headers.get("ETag"):
                    self.etags[url] = r.headers["ETag"]
                r.success()
            elif r.status_code == 304 and headers:
                r.success()
            else:
                r.failure(f"{url}: {r.status_code}")
            return r

    def arrive(self) -> None:
        o = _opts(self.environment)
        r = self._get("/crls", "download crls")
        crls = [c["url"] for c in r.json()] if r.status_code == 200 else DATA.crls
        for url in crls:
            self._get(url, "download crl", conditional=True)
        serial = random.choice(DATA.serials)
        self._get(f"/certificates/{serial}?apikey={o.api_key}", "download certificate")
        r = self._get("/documents", "download documents")
        docs = [d["name"] for d in r.json()] if r.status_code == 200 else DATA.documents
        if docs:
            self._get(f"/documents/{random.choice(docs)}", "download document",
                      conditional=True)


class LdapUser(_Arrivals, User):  # type: ignore[misc]
    """Searches the LDAP directory by EUI-64 (a device's entry and its certificates) and by
    serial, over connections bound with the API key, kept and reused (ldap3: one request
    at a time per connection, so arrivals in flight together use several)."""

    first_request = ("LDAP", "ldap search eui64")

    def on_start(self) -> None:
        self.pool: gevent.queue.Queue[Any] = gevent.queue.Queue()

    def _connection(self) -> Any:
        import ldap3

        with contextlib.suppress(gevent.queue.Empty):
            return self.pool.get_nowait()
        o = _opts(self.environment)
        server = ldap3.Server(o.ldap_host, get_info=ldap3.NONE, connect_timeout=30)
        conn = ldap3.Connection(server, user=f"uid={o.ldap_user},ou=Users,o=SMKI",
                                password=o.api_key, receive_timeout=60)
        started = time.perf_counter()
        with self.flight("LDAP", "ldap bind"):
            try:
                ok = conn.bind()
                problem = None if ok else f"bind refused: {conn.result.get('description')}"
            except Exception as exc:
                ok, problem = False, f"bind failed: {exc}"
        self._fire("LDAP", "ldap bind", (time.perf_counter() - started) * 1000,
                   RuntimeError(problem) if problem else None)
        if not ok:
            raise RuntimeError(f"LDAP {problem} (uid={o.ldap_user},ou=Users,o=SMKI with"
                               " --api-key)")
        return conn

    def _search(self, conn: Any, name: str, base: str, flt: str, attrs: list[str]) -> None:
        import ldap3

        started = time.perf_counter()
        problem: str | None = None
        broken: Exception | None = None
        length = 0
        with self.flight("LDAP", name):
            try:
                conn.search(base, flt, ldap3.SUBTREE, attributes=attrs)
                entries = [e for e in conn.response or [] if e.get("type") == "searchResEntry"]
                length = sum(len(e.get("raw_dn", b"")) for e in entries)
                if conn.result.get("result") != 0:
                    problem = f"{flt}: {conn.result.get('description')}"
                elif not entries:
                    problem = f"{flt}: no entry"
            except Exception as exc:  # the connection is of no more use
                broken = exc
                problem = f"{flt}: {type(exc).__name__}: {exc}"
        self._fire("LDAP", name, (time.perf_counter() - started) * 1000,
                   RuntimeError(problem) if problem else None, length)
        if broken is not None:
            raise ConnectionError(problem) from broken

    def arrive(self) -> None:
        conn = self._connection()
        eui, serials = random.choice(DATA.devices)
        try:
            self._search(conn, "ldap search eui64", "ou=Devices,o=SMKI",
                         f"(smkiEui64={eui})", ["smkiSerial"])
            self._search(conn, "ldap search serial", "o=SMKI",
                         f"(smkiSerial={random.choice(serials)})", ["userCertificate;binary"])
        except ConnectionError:
            with contextlib.suppress(Exception):
                conn.unbind()
            return
        self.pool.put(conn)


class PortalUser(_Arrivals, _OnNode, FastHttpUser):  # type: ignore[misc]
    """Signs in once (form, CSRF token, cookie), then each arrival searches by EUI-64 and
    opens one of the certificate pages found."""

    concurrency = 200
    first_request = ("GET", "portal search")

    def _cookie(self, r: Any) -> None:
        for value in (r.headers.get("Set-Cookie") or "").split(","):
            name, _, rest = value.strip().partition("=")
            if name == "smki_portal":
                self.cookie = rest.split(";", 1)[0]

    def _headers(self) -> dict[str, str]:
        return {"Cookie": f"smki_portal={self.cookie}"} if self.cookie else {}

    def on_start(self) -> None:
        o = _opts(self.environment)
        self.cookie = ""
        form = self.client.get("/portal/sign-in", name="portal sign-in form")
        self._cookie(form)
        token = CSRF_RE.search(form.text or "")
        if form.status_code != 200 or token is None:
            raise RuntimeError(f"portal sign-in form: {form.status_code}")
        r = self.client.post("/portal/sign-in", name="portal sign-in", allow_redirects=False,
                             headers=self._headers(),
                             data={"csrf": html.unescape(token.group(1)),
                                   "username": o.portal_user, "password": o.portal_password})
        self._cookie(r)
        where = r.headers.get("Location") or ""
        if r.status_code != 303 or where.endswith("/portal/password"):
            problem = ("its password must be changed first (sign in once in a browser)"
                       if where.endswith("/portal/password") else f"answered {r.status_code}")
            raise RuntimeError(f"portal sign-in as {o.portal_user!r} refused: {problem}")

    def arrive(self) -> None:
        eui, _serials = random.choice(DATA.devices)
        links: list[str] = []
        with self.flight("GET", "portal search"), self.client.get(
                f"/portal/search?q={eui}&by=eui", headers=self._headers(), name="portal search",
                allow_redirects=False, catch_response=True) as r:
            links = [html.unescape(u) for u in CERT_LINK_RE.findall(r.text or "")]
            if r.status_code == 200 and links:
                r.success()
            else:
                r.failure(f"search {eui}: {r.status_code}, {len(links)} certificate links")
        if links:
            with self.flight("GET", "portal certificate"), self.client.get(
                    random.choice(links), headers=self._headers(), name="portal certificate",
                    allow_redirects=False, catch_response=True) as r:
                if r.status_code == 200:
                    r.success()
                else:
                    r.failure(f"certificate page: {r.status_code}")


class LodgerUser(_Arrivals, HttpUser):  # type: ignore[misc]
    """Lodges new device certificates over mutual TLS at the profile's lodging rate."""

    first_request = ("POST", "lodge certificates")

    def on_start(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        from repository_server.pki import testpki

        o = _opts(self.environment)
        self.client.cert = (o.dcc_cert, o.dcc_key)
        self.client.verify = o.tls_ca
        pki_dir = Path(o.pki_dir)
        manifest = json.loads((pki_dir / "manifest.json").read_text())
        dca = next(x for x in manifest["objects"] if x.get("name") == "issuing-dca")
        self._dca_cert = x509.load_pem_x509_certificate((pki_dir / dca["pem"]).read_bytes())
        key = serialization.load_pem_private_key((pki_dir / dca["key"]).read_bytes(), None)
        self._dca_key = key
        self._key_id = testpki.key_identifier(key.public_key())  # type: ignore[arg-type]

    def _batch(self, n: int) -> bytes:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        from repository_server.pki import testpki

        not_before = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(days=1)
        out = []
        for _ in range(n):
            eui = bytes.fromhex("fe") + secrets.token_bytes(7)
            serial = int.from_bytes(secrets.token_bytes(16), "big") | (1 << 126)
            serial &= (1 << 127) - 1  # positive, 16 octets in DER
            pub = ec.generate_private_key(ec.SECP256R1()).public_key()
            cert = testpki.device_builder(self._dca_cert.subject, not_before,
                                          random.choice(("DS", "KA")), serial, pub, eui,
                                          self._key_id).sign(self._dca_key, hashes.SHA256())
            out.append(cert.public_bytes(serialization.Encoding.PEM))
        return b"".join(out)

    def arrive(self) -> None:
        o = _opts(self.environment)
        body = self._batch(o.lodge_batch)
        with self.flight("POST", "lodge certificates"), self.client.post(
                f"{o.lodge_host.rstrip('/')}/lodge/certificates", data=body,
                headers={"Content-Type": "application/x-pem-file"},
                name="lodge certificates", catch_response=True) as r:
            if r.status_code == 200:
                r.success()
            else:
                r.failure(f"{r.status_code}: {r.text[:200]}")


# -- the load shape ------------------------------------------------------------------------------
class ProfileShape(LoadTestShape):
    """Follows the load profile: a fixed number of users per enabled class, and every second
    each class's arrival rate (sent to the workers in distributed mode)."""

    def tick(self) -> tuple[int, float, list[type[Any]]] | None:
        env = self.runner.environment
        o = _opts(env)
        assert PROFILE is not None
        t = self.get_run_time()
        _integrate(t)
        stage = PROFILE.stage_at(t)
        CLASS_RATES.clear()
        if stage is None:
            return None
        classes = enabled_classes(env)
        read = [c.__name__ for c in classes if c.__name__ in READ_CLASSES]
        for cls, rate in PROFILE.class_rates(stage.rate, read).items():
            CLASS_RATES[cls] = rate / DATA.requests_per_arrival(cls, o.unknown_share)
        if LodgerUser in classes:
            CLASS_RATES["LodgerUser"] = PROFILE.lodging_per_minute / 60
        rates = {c.__name__: CLASS_RATES.get(c.__name__, 0.0) / c.fixed_count for c in classes}
        self.runner.send_message("smki_schedule", {"period": stage.label, "rates": rates})
        return (sum(c.fixed_count for c in classes), 100, classes)
