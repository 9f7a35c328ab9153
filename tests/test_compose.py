"""docker-compose.yml without Docker: its structure, its validity against the Compose
Specification (dclint), then its services' own commands run natively as one cluster.

CI has no Docker engine, so this is what keeps the compose file honest. Each service's
entrypoint, command, environment, volumes and healthcheck come from the YAML (interpolated as
Compose does), and the image's ENV, WORKDIR, ENTRYPOINT and CMD from its Dockerfile. What
exists only inside containers is rewritten: a service's hostname becomes 127.0.0.1; every
(service, container port) gets a free port of its own (a peer's `node2:8083`, a service's
own `0.0.0.0:8083` or `127.0.0.1:8083`, and Locust's port flags); a volume's mount point
becomes a directory shared by the services that mount it, the image's WORKDIR the repository
(its COPY lines mirror the repository), and an absolute path in the image's ENV (the data
directory) a directory of the service's own. Everything else runs as written, so a wrong
flag, setting name, path or port in the file fails here. The services start in the order
their depends_on conditions give (which the structure test pins), each condition waited for
as Compose would: a healthcheck passing (the service's own command), a one-shot exiting 0.
PostgreSQL is the one image that is not ours: it is set up from the service's POSTGRES_*
variables as that image does (a password user and database, password authentication over
TCP) with the pgserver binaries, and then its own healthcheck is run.

Not checked here: the image builds, Docker's network and DNS, volume ownership, restart
policies, and `deploy` beyond the replica count.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from repository_server.cli.lodge_client import LodgeClient
from repository_server.pki.testpki import load_manifest
from repository_server.store.embedded import EmbeddedPostgres, _bin
from tests.conftest import ROOT, Running, cli_env, http_get
from tests.test_ldap import _devices
from tests.test_process import free_port

pytestmark = pytest.mark.timeout(240)

COMPOSE = ROOT / "docker-compose.yml"
DCLINT = ROOT / "tests" / "node" / "node_modules" / "dclint" / "bin" / "dclint.cjs"
SERVICES = {"postgres", "init", "node1", "node2", "locust-master", "locust-worker"}
# the only secrets the file may hold: documented demo defaults, overridable from the environment
DEMO_SECRETS = {"POSTGRES_PASSWORD": "smki-demo-only",
                "SMKI_LOADTEST_API_KEY": "compose-demo-loadtest-key",
                "SMKI_LOADTEST_OPERATOR_KEY": "compose-demo-operator-key"}
# Locust's flags that take a bare port: whose port it is (None: the service's own)
PORT_FLAGS = {"--master-bind-port": None, "--web-port": None, "--master-port": "--master-host"}

_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: Any, variables: dict[str, str]) -> Any:
    """Compose's interpolation of every string in the file: $$, ${VAR}, ${VAR:-default},
    ${VAR-default}, ${VAR:?message}. An unset variable without a default fails the test."""
    if isinstance(value, dict):
        return {k: interpolate(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, variables) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4)
        got = variables.get(name)
        if op in (":-", ":?") and got == "":
            got = None
        if got is not None:
            return got
        assert op in (":-", "-"), f"${{{name}}} is not set and has no default"
        return str(arg)

    return _VAR.sub(one, value)


def load_compose(variables: dict[str, str] | None = None) -> dict[str, Any]:
    raw = yaml.safe_load(COMPOSE.read_text())  # anchors and merge keys (<<) resolved here
    return dict(interpolate(raw, variables or {}))


def dockerfile(path: Path) -> dict[str, Any]:
    """ENV, WORKDIR, ENTRYPOINT and CMD of a Dockerfile (the forms ours use)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    image: dict[str, Any] = {"env": {}, "workdir": "/", "entrypoint": [], "cmd": []}
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        word = word.upper()
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                image["env"][key] = value
        elif word == "WORKDIR":
            image["workdir"] = rest.strip()
        elif word in ("ENTRYPOINT", "CMD"):
            image[word.lower()] = json.loads(rest)
    return image


def healthcheck_argv(test: Any) -> list[str]:
    if isinstance(test, str):
        return ["/bin/sh", "-c", test]
    kind, *rest = test
    assert kind in ("CMD", "CMD-SHELL"), test
    return ["/bin/sh", "-c", rest[0]] if kind == "CMD-SHELL" else list(rest)


# -- the file itself --------------------------------------------------------------------------
def test_compose_file_structure() -> None:
    text = COMPOSE.read_text()
    raw = yaml.safe_load(text)
    assert "version" not in raw  # the Compose Specification has none
    compose = load_compose()
    services = compose["services"]
    assert set(services) == SERVICES
    declared = set(compose["volumes"])
    for name, svc in services.items():
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            assert source in declared, f"{name}: volume {source} is not declared"
        for key in ("privileged", "network_mode", "pid", "cap_add"):
            assert key not in svc, f"{name}: {key}"
        if "build" in svc:
            build = svc["build"] if isinstance(svc["build"], dict) else {"context": svc["build"]}
            assert (ROOT / build["context"] / build.get("dockerfile", "Dockerfile")).is_file()

    pg = services["postgres"]
    assert pg["image"] == "postgres:15-bookworm"
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert "pgdata:/var/lib/postgresql/data" in pg["volumes"]
    assert "ports" not in pg  # reached by the nodes over the compose network only

    assert services["init"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for node in ("node1", "node2"):
        svc = services[node]
        assert svc["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                     "init": {"condition": "service_completed_successfully"}}
        assert "/readyz" in " ".join(svc["healthcheck"]["test"])
        assert "--workers" in svc["command"]
        assert svc["environment"]["SMKI_DATABASE__URL"].startswith("postgresql://")
    master, worker = services["locust-master"], services["locust-worker"]
    assert master["depends_on"] == {"node1": {"condition": "service_healthy"},
                                    "node2": {"condition": "service_healthy"}}
    assert worker["deploy"]["replicas"] == 2
    assert "http://node2:8083" in master["command"][master["command"].index("--extra-hosts") + 1]

    # every published port: on the loopback interface only, no host port twice
    published = []
    for name, svc in services.items():
        for port in svc.get("ports", []):
            host_ip, host_port, _container = str(port).split(":")
            assert host_ip == "127.0.0.1", f"{name}: {port} is published beyond loopback"
            published.append(int(host_port))
    assert len(published) == len(set(published)), published
    assert "127.0.0.1:8089:8089" in master["ports"]

    # secrets: only the documented demo defaults, each overridable by its variable
    defaults = dict(re.findall(r"\$\{([A-Z_]*(?:PASSWORD|KEY|SECRET|TOKEN)[A-Z_]*):-([^}]*)\}", text))
    assert defaults == DEMO_SECRETS
    for url in re.findall(r"\w+://[^\s\"']+@", text):  # a URL's user:password
        userinfo = url.split("://", 1)[1][:-1]
        assert ":" not in userinfo or userinfo == "smki:${POSTGRES_PASSWORD:-smki-demo-only}", url
    for name, svc in services.items():
        for key, value in svc.get("environment", {}).items():
            if re.search(r"PASSWORD|SECRET|TOKEN|_KEY$", key) and key not in ("SMKI_TLS__KEY",):
                assert value == DEMO_SECRETS[key], f"{name}: {key}"
    readme = (ROOT / "README.md").read_text()
    for value in DEMO_SECRETS.values():
        assert value in readme  # documented as demo-only there


def test_compose_file_is_valid_compose_specification() -> None:
    """dclint (pinned in tests/node) checks the file against the Compose Specification's
    JSON schema: a misspelt key or a wrong value type or enum fails here (its style rules,
    such as key order, are only warnings and do not)."""
    node = shutil.which("node")
    if (node is None or not DCLINT.is_file()) and not os.environ.get("CI"):
        pytest.skip("node or dclint not installed (npm ci in tests/node; .ci/run does it)")
    assert node is not None and DCLINT.is_file(), "CI must have node and tests/node's dclint"
    done = subprocess.run([node, str(DCLINT), "--quiet", "--no-color", str(COMPOSE)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


# -- running it ---------------------------------------------------------------------------------
class Cluster:
    """The compose file's services as native processes (see the module's docstring)."""

    def __init__(self, compose: dict[str, Any], tmp: Path) -> None:
        self.services: dict[str, dict[str, Any]] = compose["services"]
        self.tmp = tmp
        self.ports: dict[tuple[str, int], int] = {}
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.pg: EmbeddedPostgres | None = None
        names = "|".join(re.escape(n) for n in sorted(self.services, key=len, reverse=True))
        self._host_port = re.compile(
            rf"(?<![\w.-])({names}|0\.0\.0\.0|127\.0\.0\.1|localhost):(\d+)(?!\d)")

    # -- what a service is --------------------------------------------------------------------
    def port(self, name: str, port: int) -> int:
        """Here, the port `port` of service `name` (each container has its own ports)."""
        return self.ports.setdefault((name, port), free_port())

    def image(self, name: str) -> dict[str, Any]:
        build = self.services[name].get("build")
        if build is None:
            return {"env": {}, "workdir": "/", "entrypoint": [], "cmd": []}
        if not isinstance(build, dict):
            build = {"context": build}
        return dockerfile(ROOT / build["context"] / build.get("dockerfile", "Dockerfile"))

    def paths(self, name: str) -> dict[str, Path]:
        """Container path prefix → where it is here."""
        image = self.image(name)
        out: dict[str, Path] = {}
        for value in image["env"].values():
            if value.startswith("/"):
                out[value] = self.tmp / "fs" / name / value.lstrip("/")
        if image["workdir"] != "/":
            out[image["workdir"]] = ROOT
        for mount in self.services[name].get("volumes", []):
            source, target = mount.split(":")[:2]
            out[target] = self.tmp / "volumes" / source
        for path in out.values():
            if path != ROOT:
                path.mkdir(parents=True, exist_ok=True)
        return out

    def rewrite(self, name: str, text: str) -> str:
        if text in self.services:  # a peer's bare hostname (--master-host locust-master)
            return "127.0.0.1"

        def host_port(m: re.Match[str]) -> str:
            host, port = m.group(1), int(m.group(2))
            return f"127.0.0.1:{self.port(host if host in self.services else name, port)}"

        text = self._host_port.sub(host_port, text)
        paths = self.paths(name)
        for prefix in sorted(paths, key=len, reverse=True):
            text = re.sub(rf"(?<![\w./-]){re.escape(prefix)}(?=/|$|[^\w.-])",
                          str(paths[prefix]).replace("\\", r"\\"), text)
        return text

    def argv(self, name: str) -> list[str]:
        svc, image = self.services[name], self.image(name)
        entrypoint = svc.get("entrypoint", image["entrypoint"])
        # an entrypoint set by the service drops the image's CMD (as Docker does)
        command = svc.get("command", image["cmd"] if "entrypoint" not in svc else [])
        raw = [*entrypoint, *(shlex.split(command) if isinstance(command, str) else command)]
        if raw[:2] == ["/usr/bin/tini", "--"]:  # the container's PID 1; natively, not needed
            raw = raw[2:]
        out = []
        for i, arg in enumerate(raw):
            flag = raw[i - 1] if i else ""
            if flag in PORT_FLAGS:
                peer_flag = PORT_FLAGS[flag]
                owner = raw[raw.index(peer_flag) + 1] if peer_flag else name
                out.append(str(self.port(owner, int(arg))))
            else:
                out.append(self.rewrite(name, arg))
        return out

    def env(self, name: str) -> dict[str, str]:
        env = cli_env()
        bins = [str(Path(sys.executable).parent), str(_bin("pg_isready").parent)]
        env["PATH"] = os.pathsep.join([*bins, env.get("PATH", "")])
        merged = {**self.image(name)["env"], **self.services[name].get("environment", {})}
        merged.pop("PATH", None)  # the image's venv (/opt/venv/bin) is this interpreter's bin
        env.update({k: self.rewrite(name, str(v)) for k, v in merged.items()})
        return env

    # -- running it -----------------------------------------------------------------------------
    def log(self, name: str) -> Path:
        return self.tmp / "logs" / f"{name}.log"

    def start(self, name: str, *extra: str, replica: int = 0) -> subprocess.Popen[bytes]:
        log = self.tmp / "logs" / f"{name}{f'-{replica}' if replica else ''}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as fh:
            proc = subprocess.Popen([*self.argv(name), *extra], env=self.env(name),
                                    cwd=self.rewrite(name, self.image(name)["workdir"]),
                                    stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def run(self, name: str, timeout: float) -> str:
        """A one-shot service, to its end; its output (the test fails unless it exits 0)."""
        proc = self.start(name)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"{name} still running after {timeout} s:\n{self.tail(name)}") from None
        assert code == 0, f"{name} exited with {code}:\n{self.tail(name)}"
        return self.log(name).read_text(errors="replace")

    def tail(self, name: str) -> str:
        try:
            return self.log(name).read_text(errors="replace")[-3000:]
        except OSError:
            return "(no output)"

    def wait_healthy(self, name: str, timeout: float) -> None:
        """Run the service's own healthcheck until it passes."""
        argv = [self.rewrite(name, a) for a in healthcheck_argv(self.services[name]["healthcheck"]["test"])]
        deadline = time.monotonic() + timeout
        while True:
            for svc, proc in self.procs:
                assert svc != name or proc.poll() is None, f"{name} exited:\n{self.tail(name)}"
            done = subprocess.run(argv, env=self.env(name), capture_output=True, timeout=10)
            if done.returncode == 0:
                return
            assert time.monotonic() < deadline, (
                f"{name} not healthy: {argv}: {done.stderr.decode(errors='replace')}\n{self.tail(name)}")
            time.sleep(0.3)

    def start_postgres(self, name: str) -> None:
        """What the postgres image does on its first start, from the service's POSTGRES_*."""
        import asyncpg

        env = self.services[name]["environment"]
        user, password = env["POSTGRES_USER"], env["POSTGRES_PASSWORD"]
        port = self.port(name, 5432)
        pg = EmbeddedPostgres(self.tmp / "fs" / name)
        pg._prepare_root()
        pg._initdb()
        with (pg.pgdata / "postgresql.auto.conf").open("a") as fh:
            fh.write(f"listen_addresses = '127.0.0.1'\nport = {port}\n")
        (pg.pgdata / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
        pg.acquire()
        self.pg = pg

        async def setup() -> None:
            conn = await asyncpg.connect(host=str(pg.socket_dir), port=port, user="postgres",
                                         database="postgres")
            try:
                await conn.execute(f"CREATE ROLE {user} SUPERUSER LOGIN PASSWORD '{password}'")
                await conn.execute(f"CREATE DATABASE {env.get('POSTGRES_DB', user)} OWNER {user}")
            finally:
                await conn.close()

        asyncio.run(setup())

    def stop(self) -> None:
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _name, proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self.pg is not None:
            self.pg.release()


def _loadtest_requests(log: Path) -> int:
    return sum(1 for line in log.read_text(errors="replace").splitlines() if "user=loadtest" in line)


def test_compose_services_run_natively(tmp_path: Path) -> None:
    """postgres → init (twice: idempotent) → node1 + node2 → a lodging on node1 served by node2
    within a second → a short headless Locust run (master and 2 workers) on both nodes."""
    compose = load_compose({"TESTPKI_DEVICES": "20"})
    services = compose["services"]
    cluster = Cluster(compose, tmp_path)
    try:
        cluster.start_postgres("postgres")
        cluster.wait_healthy("postgres", timeout=30)

        first = cluster.run("init", timeout=120)
        assert "wrote" in first and "imported" in first and "user loadtest added" in first, first
        cluster.log("init").rename(tmp_path / "logs" / "init-first.log")
        again = cluster.run("init", timeout=120)  # a restart of the cluster runs it again
        assert "test PKI already in" in again and again.count("imported 0 new") == 4, again
        pki_dir = tmp_path / "volumes" / "pki" / "testpki"
        manifest = load_manifest(pki_dir, devices=True)
        assert manifest["params"]["devices"] == 20

        for node in ("node1", "node2"):
            cluster.start(node)
        for node in ("node1", "node2"):
            cluster.wait_healthy(node, timeout=90)

        key = services["init"]["environment"]["SMKI_LOADTEST_API_KEY"]
        http = {n: f"http://127.0.0.1:{cluster.port(n, 8083)}" for n in ("node1", "node2")}
        device = next(o for o in manifest["objects"] if o["kind"] == "device")
        organisation = next(o for o in manifest["objects"] if o["kind"] == "organisation")
        for node, base in http.items():
            for obj in (device, organisation):
                status, _headers, body = http_get(f"{base}/certificates/{obj['serial']}?apikey={key}")
                assert status == 200, (node, obj["serial"], status)
                if obj["kind"] == "organisation":
                    assert body == (pki_dir / obj["path"]).read_bytes(), node

        # a certificate lodged on node1 (mutual TLS, the DCC client) is served by node2 at once
        pki = {**manifest, "dir": pki_dir}
        pem, certs = _devices(Running(None, pki), 1, 900_000)  # type: ignore[arg-type]
        serial = format(certs[0].serial_number, "X")
        serial = serial.rjust(len(serial) + len(serial) % 2, "0")
        dcc = manifest["dcc_client"]
        client = LodgeClient(f"https://localhost:{cluster.port('node1', 8444)}",
                             str(pki_dir / dcc["cert"]), str(pki_dir / dcc["key"]),
                             str(pki_dir / manifest["tls"]["ca"]))
        try:
            reply = client.certificates(pem)
        finally:
            client.close()
        assert reply.status == 200, reply.body
        lodged = time.monotonic()
        while http_get(f"{http['node2']}/certificates/{serial}?apikey={key}")[0] != 200:
            assert time.monotonic() - lodged < 1.0, "node2 does not serve node1's lodging"
            time.sleep(0.02)

        # Locust: the master's own command, headless for a few seconds, and its workers
        before = {n: _loadtest_requests(cluster.log(n)) for n in http}
        replicas = services["locust-worker"]["deploy"]["replicas"]
        report = tmp_path / "locust"
        master = cluster.start("locust-master", "--headless", "--expect-workers", str(replicas),
                               "--rate", "8", "--run-time", "8s", "--csv", str(report),
                               "--only-summary")
        workers = [cluster.start("locust-worker", replica=i + 1) for i in range(replicas)]
        try:
            code = master.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"Locust still running:\n{cluster.tail('locust-master')}") from None
        out = cluster.log("locust-master").read_text(errors="replace")
        assert code == 0 and "Verdict: PASS" in out, out
        for proc in workers:
            assert proc.wait(timeout=30) == 0
        with open(f"{report}_stats.csv", newline="") as fh:
            total = next(r for r in csv.DictReader(fh) if r["Name"] == "Aggregated")
        assert int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0, total
        after = {n: _loadtest_requests(cluster.log(n)) for n in http}
        for node in http:
            assert after[node] > before[node], f"no load reached {node}: {before} {after}"
    finally:
        cluster.stop()
    for name, proc in cluster.procs:
        if name in ("node1", "node2"):
            assert proc.returncode == 0, f"{name} exited with {proc.returncode}"
