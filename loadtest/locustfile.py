"""Locust load test of the SMKI repository (issue 5).

  locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8083 \
      --load-profile conf/loadtest/day.toml --api-key KEY --pki-dir var/pki \
      --html report.html --csv report

User classes (each request is reported to Locust with its own response time and outcome):

* WebServiceUser: Smart DCC's client: certificatesearch, then every result's serial
  retrieved in parallel (greenlets). A deliberately unknown EUI-64 answered 402 is a success.
* DownloadUser: /crls, each CRL/ARL by conditional GET (304 with the previous ETag is a
  success), a certificate, /documents and one document.
* LodgerUser: mutual-TLS lodging of a small batch of new device certificates signed by the
  test PKI's Issuing DCA; only with --dcc-cert, --dcc-key and --tls-ca.

With --extra-hosts URL[,URL...] (nodes of one cluster, sharing one store), WebServiceUser and
DownloadUser users are spread round-robin over --host and those URLs, one node per user.

At the end the verdict (loadtest/verdict.py) gives the share of requests answered within
--trt per user class, per interface and in total; the exit status is 1 below --minimum
(or below --target with --fail-below-target). With --operator-key the server's own CPM 8
report is read before and after the run and the difference printed.
"""

from __future__ import annotations

import csv
import datetime as dt
import itertools
import json
import logging
import os
import random
import re
import secrets
import sys
from pathlib import Path
from typing import Any

import gevent
import gevent.pool
from locust import FastHttpUser, HttpUser, LoadTestShape, between, events, task
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


# -- options -----------------------------------------------------------------------------------
@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    g = parser.add_argument_group("SMKI repository")
    g.add_argument("--load-profile", default="", help="load profile TOML (conf/loadtest/*.toml);"
                   " without it: -u/-r/--run-time as usual")
    g.add_argument("--api-key", default=os.environ.get("SMKI_LOADTEST_API_KEY", ""),
                   help="a relying party's API key")
    g.add_argument("--operator-key", default="", help="an operator's API key: read the server's"
                   " CPM 8 report before and after the run")
    g.add_argument("--extra-hosts", default="", metavar="URL[,URL...]",
                   help="more nodes serving the same store: users are spread round-robin over"
                        " --host and these base URLs (WebServiceUser, DownloadUser)")
    g.add_argument("--pki-dir", default="var/pki", help="the target's test PKI (manifest.json)")
    g.add_argument("--unknown-share", type=float, default=0.05,
                   help="share of searches for EUI-64s the repository does not hold (402)")
    g.add_argument("--trt", type=float, default=3.0, help="Target Response Time, seconds")
    g.add_argument("--target", type=float, default=99.0, help="target percent within TRT")
    g.add_argument("--minimum", type=float, default=96.0, help="minimum percent within TRT")
    g.add_argument("--fail-below-target", action="store_true",
                   help="exit non-zero below the target (not only below the minimum)")
    g.add_argument("--lodge-host", default="https://localhost:8444", help="the lodging listener")
    g.add_argument("--dcc-cert", default="", help="DCC client certificate (PEM): enables LodgerUser")
    g.add_argument("--dcc-key", default="", help="DCC client key (PEM)")
    g.add_argument("--tls-ca", default="", help="CA of the server's TLS certificate")
    g.add_argument("--lodge-batch", type=int, default=5, help="certificates per lodging")


# -- data drawn from the target's contents ------------------------------------------------------
class Data:
    def __init__(self) -> None:
        self.subjects: list[tuple[str, str]] = []  # (element, eui lower-case dashed)
        self.serials: list[str] = []  # device and organisation certificate serials (upper hex)
        self.known: set[str] = set()
        self.pki_dir = Path()
        self.manifest: dict[str, Any] = {}

    def load(self, pki_dir: str) -> None:
        self.pki_dir = Path(pki_dir)
        self.manifest = json.loads((self.pki_dir / "manifest.json").read_text())
        seen: set[tuple[str, str]] = set()
        # manifest format 2: device certificates are rows of devices/index.csv
        with open(self.pki_dir / self.manifest["devices"]["index"], newline="") as f:
            devices = ({"kind": "device", **row} for row in csv.DictReader(f))
            for o in itertools.chain(self.manifest["objects"], devices):
                if o.get("kind") not in ("device", "organisation") or "eui64" not in o:
                    continue
                el = "CertificateSubjectAltName" if o["kind"] == "device" else "CertificateSubjectName"
                eui = o["eui64"].lower()
                if (el, eui) not in seen:
                    seen.add((el, eui))
                    self.subjects.append((el, eui))
                self.known.add(eui.replace("-", ""))
                self.serials.append(o["serial"])
        if not self.subjects:
            raise SystemExit(f"{self.pki_dir}/manifest.json: no device or organisation certificates")

    def unknown_eui(self) -> str:
        while True:
            raw = "ff" + secrets.token_hex(7)  # a prefix the test PKI does not use
            if raw not in self.known:
                return "-".join(raw[i:i + 2] for i in range(0, 16, 2))


DATA = Data()
TALLY = verdict.Tally()
CPM_BEFORE: dict[str, Any] | None = None
PROFILE: shapes.Profile | None = None


def _opts(env: Environment) -> Any:
    return env.parsed_options


def _cpm(env: Environment, month: str | None) -> dict[str, Any] | None:
    import requests

    o = _opts(env)
    if not o.operator_key:
        return None
    url = f"{env.host.rstrip('/')}/ops/reports/cpm" + (f"?month={month}" if month else "")
    try:
        r = requests.get(url, headers={"X-API-Key": o.operator_key}, timeout=30,
                         verify=o.tls_ca or True)
        r.raise_for_status()
        return dict(r.json())
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
    if o.load_profile:
        PROFILE = shapes.load(o.load_profile)
        for cls in (WebServiceUser, DownloadUser, LodgerUser):
            if cls.__name__ in PROFILE.mix:
                cls.weight = max(0, round(PROFILE.mix[cls.__name__]))
            if cls is not LodgerUser:  # lodging keeps its own low rate
                cls.wait_time = between(*PROFILE.wait)
    if not isinstance(environment.runner, MasterRunner):
        DATA.load(o.pki_dir)
    if isinstance(environment.runner, WorkerRunner):
        environment.events.report_to_master.add_listener(
            lambda client_id, data: data.__setitem__("smki_tally", TALLY.take()))
    if isinstance(environment.runner, MasterRunner):
        environment.events.worker_report.add_listener(
            lambda client_id, data: TALLY.merge(data.get("smki_tally", [])))


def enabled_classes(env: Environment) -> list[type[Any]]:
    o = _opts(env)
    classes: list[type[Any]] = [WebServiceUser, DownloadUser]
    if o.dcc_cert and o.dcc_key and o.tls_ca:
        classes.append(LodgerUser)
    return [c for c in classes if c.weight > 0]


@events.request.add_listener
def _request(request_type: str, name: str, response_time: float, exception: Any,
             context: dict[str, Any], **_kw: Any) -> None:
    TALLY.add(context.get("user_class", "?"), name.split(" ", 1)[0], response_time or 0.0,
              exception is None)


@events.test_start.add_listener
def _start(environment: Environment, **_kw: Any) -> None:
    global CPM_BEFORE
    if isinstance(environment.runner, WorkerRunner):
        return
    CPM_BEFORE = _cpm(environment, None)


@events.quitting.add_listener
def _quitting(environment: Environment, **_kw: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    o = _opts(environment)
    print(verdict.format_report(TALLY, o.target, o.minimum), flush=True)
    after = _cpm(environment, CPM_BEFORE.get("month") if CPM_BEFORE else None)
    if after is not None:
        print(verdict.format_cpm(CPM_BEFORE, after), flush=True)
    ok = verdict.passed(TALLY, o.target, o.minimum, o.fail_below_target)
    print(f"Verdict: {'PASS' if ok else 'FAIL'}", flush=True)
    environment.process_exit_code = 0 if ok else 1


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


class WebServiceUser(_Tagged, _OnNode, FastHttpUser):  # type: ignore[misc]
    weight = 6
    wait_time = between(1, 2)
    concurrency = 10

    @task
    def search_and_retrieve(self) -> None:
        o = _opts(self.environment)
        unknown = random.random() < o.unknown_share
        if unknown:
            el, eui = "CertificateSubjectAltName", DATA.unknown_eui()
        else:
            el, eui = random.choice(DATA.subjects)
        serials: list[str] = []
        with self.client.post(f"/services/certificatesearch?apikey={o.api_key}",
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
        if serials:
            pool = gevent.pool.Pool(len(serials))
            for s in serials:
                pool.spawn(self.retrieve, format(int(s, 16), "x"))
            pool.join()

    def retrieve(self, serial: str) -> None:
        o = _opts(self.environment)
        with self.client.post(f"/services/retrievecertificate?apikey={o.api_key}",
                              data=RETRIEVE.format(serial=serial), headers=XML,
                              name="ws retrieve", catch_response=True) as r:
            if r.status_code == 200 and b"<CertificateBody>" in (r.content or b""):
                r.success()
            else:
                r.failure(f"serial {serial}: {r.status_code}")


class DownloadUser(_Tagged, _OnNode, FastHttpUser):  # type: ignore[misc]
    weight = 4
    wait_time = between(1, 2)

    def on_start(self) -> None:
        self.etags: dict[str, str] = {}

    def _get(self, url: str, name: str, conditional: bool = False) -> Any:
        headers = {"If-None-Match": self.etags[url]} if conditional and url in self.etags else {}
        with self.client.get(url, headers=headers, name=name, catch_response=True) as r:
            if r.status_code == 200:
                if conditional and r.headers.get("ETag"):
                    self.etags[url] = r.headers["ETag"]
                r.success()
            elif r.status_code == 304 and headers:
                r.success()
            else:
                r.failure(f"{url}: {r.status_code}")
            return r

    @task
    def downloads(self) -> None:
        o = _opts(self.environment)
        r = self._get("/crls", "download crls")
        crls = r.json() if r.status_code == 200 else []
        for item in crls:
            self._get(item["url"], "download crl", conditional=True)
        serial = random.choice(DATA.serials)
        self._get(f"/certificates/{serial}?apikey={o.api_key}", "download certificate")
        r = self._get("/documents", "download documents")
        docs = r.json() if r.status_code == 200 else []
        if docs:
            self._get(f"/documents/{random.choice(docs)['name']}", "download document",
                      conditional=True)


class LodgerUser(_Tagged, HttpUser):  # type: ignore[misc]
    """Lodges new device certificates over mutual TLS, rarely (the DCC lodges in batches)."""

    weight = 1
    wait_time = between(5, 10)

    def on_start(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        from repository_server.pki import testpki

        o = _opts(self.environment)
        self.client.cert = (o.dcc_cert, o.dcc_key)
        self.client.verify = o.tls_ca
        dca = next(x for x in DATA.manifest["objects"] if x.get("name") == "issuing-dca")
        self._dca_cert = x509.load_pem_x509_certificate((DATA.pki_dir / dca["pem"]).read_bytes())
        key = serialization.load_pem_private_key((DATA.pki_dir / dca["key"]).read_bytes(), None)
        self._dca_key = key
        self._key_id = testpki.key_identifier(key.public_key())  # type: ignore[union-attr]

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
            cert = testpki._device_builder(self._dca_cert.subject, not_before,
                                           random.choice(("DS", "KA")), serial, pub, eui,
                                           self._key_id).sign(self._dca_key, hashes.SHA256())
            out.append(cert.public_bytes(serialization.Encoding.PEM))
        return b"".join(out)

    @task
    def lodge(self) -> None:
        o = _opts(self.environment)
        with self.client.post(f"{o.lodge_host.rstrip('/')}/lodge/certificates",
                              data=self._batch(o.lodge_batch),
                              headers={"Content-Type": "application/x-pem-file"},
                              name="lodge certificates", catch_response=True) as r:
            if r.status_code == 200:
                r.success()
            else:
                r.failure(f"{r.status_code}: {r.text[:200]}")


# -- the load shape ------------------------------------------------------------------------------
class ProfileShape(LoadTestShape):
    """Follows --load-profile; without one, keeps -u users at -r per second (--run-time stops it)."""

    def tick(self) -> tuple[int, float, list[type[Any]]] | None:
        env = self.runner.environment
        o = _opts(env)
        classes = enabled_classes(env)
        if PROFILE is None:  # Locust ignores --run-time when a shape is present
            run_time = o.run_time
            if isinstance(run_time, str):
                from locust.util.timespan import parse_timespan

                run_time = parse_timespan(run_time)
            if run_time and self.get_run_time() >= run_time:
                return None
            return (o.num_users or 1, o.spawn_rate or 1, classes)
        now = PROFILE.at(self.get_run_time())
        if now is None:
            return None
        return (now[0], now[1], classes)
