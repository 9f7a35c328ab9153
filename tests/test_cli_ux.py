"""The command line as operators know such tools: exit statuses (0 ok, 1 refused, 2 usage,
configuration or unreachable), errors that name what to fix, help for every option, shell
completion, quiet exits into a closed pipe, `config check|show`, one time format in JSON and
one log format for every listener. Every command runs as a real subprocess."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest

from repository_server import __version__
from repository_server.listeners.ldap.fastpath import HOT
from tests.conftest import ROOT, cli_env, http_get, smki_cli

JSON_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z$")


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*smki_cli(), *args], capture_output=True, text=True, timeout=timeout,
                          env=env or cli_env(), input=stdin)


def db_env(dsn: str) -> dict[str, str]:
    env = cli_env()
    env["SMKI_DATABASE__URL"] = dsn
    return env


def one_line_error(res: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """The command exited `code` with an error that names `words`, and no traceback."""
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    for word in words:
        assert word in res.stderr, (word, res.stderr)
    return res.stderr


def server_toml(pki: dict[str, Any], listeners: dict[str, str], extra: str = "") -> str:
    """A configuration with these listeners (the others disabled) and the test PKI's TLS
    and DCC client files."""
    pki_dir: Path = pki["dir"]
    dcc = pki["dcc_client"]
    every = {name: "" for name in ("http", "https", "lodge", "ldap", "ldaps", "sftp", "metrics")}
    lines = ["[listeners]", *(f'{k} = "{v}"' for k, v in {**every, **listeners}.items()),
             "[tls]", f'cert = "{pki_dir / pki["tls"]["cert"]}"',
             f'key = "{pki_dir / pki["tls"]["key"]}"',
             "[lodge]", f'client_ca = "{pki_dir / dcc["ca"]}"',
             f'client_subject = "{dcc["subject"]}"']
    return "\n".join(lines) + "\n" + extra


# -- help and completion ----------------------------------------------------------------------
def _walk(ap: argparse.ArgumentParser, path: list[str]) -> list[tuple[list[str],
                                                                     argparse.ArgumentParser]]:
    found = [(path, ap)]
    for action in ap._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _walk(sub, [*path, name])
    return found


def test_every_option_is_described_with_its_default_and_every_command_has_an_example() -> None:
    from repository_server.cli.main import parser

    missing = []
    leaves = 0
    for path, ap in _walk(parser(), []):
        subcommands = any(isinstance(a, argparse._SubParsersAction) for a in ap._actions)
        for action in ap._actions:
            if isinstance(action, argparse._HelpAction | argparse._VersionAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
        if path and not subcommands:
            leaves += 1
            assert ap.epilog and f"smki-repository {' '.join(path)}" in ap.epilog, path
        text = ap.format_help()
        for action in ap._actions:
            if (action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
                    and action.help and isinstance(action.default, int | str)):
                assert str(action.default) in text, (path, action.dest, text)
    assert not missing, f"options without help: {missing}"
    assert leaves >= 20
    res = run("lodge", "--help")
    assert res.returncode == 0 and "(default: 50000)" in res.stdout and "Example" in res.stdout


def test_shell_completion_scripts() -> None:
    res = run("completion", "bash")
    assert res.returncode == 0, res.stderr
    assert "smki-repository" in res.stdout and "export-ldif" in res.stdout
    assert "--allow-unverified-issuer" in res.stdout
    # bash completes a command and an option as a user typing TAB would get them
    script = res.stdout + """
complete_words() { COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMPREPLY=()
  _shtab_smki_repository smki-repository "${COMP_WORDS[-1]}" "${COMP_WORDS[-2]}"
  echo "${COMPREPLY[*]}"; }
complete_words smki-repository us
complete_words smki-repository import --allow
complete_words smki-repository lodge --status ''
"""
    done = subprocess.run(["bash", "-c", script], text=True, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["users", "--allow-unverified-issuer", "P I N"], done.stdout
    res = run("completion", "zsh")
    assert res.returncode == 0 and res.stdout.startswith("#compdef smki-repository"), res.stdout[:80]
    assert run("completion", "fish").returncode == 2


# -- exit statuses and errors that name what to fix -------------------------------------------
@pytest.mark.asyncio(loop_scope="session")
async def test_exit_statuses_of_every_command(loaded: Any, tmp_path: Path) -> None:
    """0 ok, 1 refused, 2 usage/configuration/unreachable, each with one line and no
    traceback; run as an operator would."""
    env = db_env(loaded.repo.store.dsn)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run(*args, env=env)

    async def each(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(cli, *args)

    # usage errors, before the store is even opened: 2
    one_line_error(await each("users", "forecast", "tester"), 2, "--per-day")
    one_line_error(await each("users", "forecast", "tester", "--per-day", "5", "--bands", "1,2"), 2,
                   "--bands")
    one_line_error(await each("users", "add", "x1", "--api-key", "short"), 2, "API key")
    one_line_error(await each("report", "cpm", "--month", "May"), 2, "--month")
    one_line_error(await each("report", "demand", "--day", "yesterday"), 2, "--day")
    one_line_error(await each("users", "sshkey", "tester", "--add", str(tmp_path / "no.pub")), 2,
                   "--add", "no.pub")
    one_line_error(await each("import", str(tmp_path / "nowhere")), 2, "nowhere")
    one_line_error(await each("export-ldap-schema", "--out", str(tmp_path / "no" / "s.schema")), 2,
                   "--out")
    one_line_error(await each("serve", "--workers", "0"), 2, "--workers")
    one_line_error(await each("testpki", "--devices", "-1", "--out", str(tmp_path / "p")), 2,
                   "--devices")
    assert (await each("nonsense")).returncode == 2
    # refused: 1
    one_line_error(await each("users", "disable", "nobody"), 1, "nobody")
    one_line_error(await each("users", "add", "tester"), 1, "tester")
    # ok: 0
    assert (await each("users", "forecast", "tester", "--per-day", "10")).returncode == 0
    assert (await each("report", "cpm")).returncode == 0
    # lodge: unreachable 2, refused 1
    pki_dir = loaded.pki_dir
    dcc = loaded.pki["dcc_client"]
    cert, key = str(pki_dir / dcc["cert"]), str(pki_dir / dcc["key"])
    base = ["lodge", "--cert", cert, "--key", key, "--ca", loaded.tls_ca]
    org = str(pki_dir / loaded.objects("organisation")[0]["path"])
    one_line_error(await each(*base, "--url", "https://127.0.0.1:1", org), 2, "127.0.0.1:1")
    from tests.pkitools import pem, self_signed_ca

    root, _ = self_signed_ca("Lodged Without Trust Anchor")
    bad = tmp_path / "root.pem"
    bad.write_bytes(pem(root))
    res = await each(*base, "--url", loaded.lodge_url, str(bad))
    assert res.returncode == 1 and "refused (422)" in res.stdout, res.stdout + res.stderr
    # a client certificate the lodging listener does not accept (not from the DCC client
    # CA): its TLS handshake is refused, which is a refusal too
    tls = loaded.pki["tls"]
    res = await each("lodge", "--url", loaded.lodge_url, "--cert", str(pki_dir / tls["cert"]),
                     "--key", str(pki_dir / tls["key"]), "--ca", loaded.tls_ca, org)
    one_line_error(res, 1, "refused")
    one_line_error(await each("export-ldif", "--out", str(tmp_path / "no" / "x.ldif")), 2,
                   "--out")


@pytest.mark.asyncio(loop_scope="session")
async def test_lodge_errors_name_the_option_to_fix(loaded: Any, tmp_path: Path) -> None:
    pki_dir = loaded.pki_dir
    dcc = loaded.pki["dcc_client"]
    cert, key = str(pki_dir / dcc["cert"]), str(pki_dir / dcc["key"])
    other_key = str(pki_dir / dcc["other_key"])
    org = str(pki_dir / loaded.objects("organisation")[0]["path"])
    url = ["--url", loaded.lodge_url]

    async def lodge(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(run, "lodge", *url, *args)

    err = one_line_error(await lodge("--cert", cert, "--key", other_key, "--ca", loaded.tls_ca,
                                     org), 2, "--key", "--cert", "does not match")
    assert "KEY_VALUES_MISMATCH" not in err and len(err.strip().splitlines()) == 1
    missing = str(tmp_path / "missing.pem")
    err = one_line_error(await lodge("--cert", missing, "--key", key, "--ca", loaded.tls_ca, org),
                         2, "--cert", missing)
    assert "[Errno" not in err
    one_line_error(await lodge("--cert", cert, "--key", missing, "--ca", loaded.tls_ca, org), 2,
                   "--key", missing)
    one_line_error(await lodge("--cert", cert, "--key", key, "--ca", missing, org), 2, "--ca",
                   missing)
    one_line_error(await lodge("--cert", cert, "--key", key, "--ca", loaded.tls_ca, org, missing),
                   2, "FILE", missing)
    one_line_error(await lodge("--cert", cert, "--key", key, org), 2, "--ca",
                   "certificate verify failed")


# -- output into a closed pipe ----------------------------------------------------------------
def _into_closed_pipe(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run with stdout a pipe whose reader has gone (as `| head` does once it has its lines)."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([*smki_cli(), *args], stdout=write, stderr=subprocess.PIPE,
                              env=env, timeout=120, text=True)
    finally:
        os.close(write)
    return proc.returncode, proc.stderr


@pytest.mark.asyncio(loop_scope="session")
async def test_output_into_a_closed_pipe_ends_quietly(loaded: Any, tmp_path: Path) -> None:
    env = db_env(loaded.repo.store.dsn)
    env["SMKI_DATA_DIR"] = str(tmp_path / "var")  # export-ldif builds a replica there
    for args in (["report", "cpm"], ["export-ldif"], ["users", "list", "--json"],
                 ["export-ldap-schema"]):
        code, err = await asyncio.to_thread(_into_closed_pipe, args, env)
        assert "Traceback" not in err and "BrokenPipeError" not in err, (args, err)
        assert code in (0, 141), (args, code, err)


# -- JSON: users list, times ------------------------------------------------------------------
@pytest.mark.asyncio(loop_scope="session")
async def test_users_list_json_has_a_key_prefix_and_plain_times(loaded: Any) -> None:
    env = db_env(loaded.repo.store.dsn)
    res = await asyncio.to_thread(run, "users", "list", "--json", env=env)
    assert res.returncode == 0, res.stderr
    users = {u["name"]: u for u in json.loads(res.stdout)}
    tester = users["tester"]
    assert "api_key" not in tester and "…" not in res.stdout
    assert tester["api_key_prefix"] and "test-key-3f9a1c22d0e1".startswith(tester["api_key_prefix"])
    for field in ("created_at", "updated_at"):
        assert JSON_TIME.match(tester[field]), tester[field]


@pytest.mark.asyncio(loop_scope="session")
async def test_times_in_http_json_listings_are_utc_with_z(loaded: Any) -> None:
    from tests.conftest import TEST_KEY

    status, _, body = await asyncio.to_thread(http_get, f"{loaded.http}/crls")
    assert status == 200
    crls = json.loads(body)
    times = [c[k] for c in crls for k in ("this_update", "next_update") if c.get(k)]
    key_id = crls[0]["issuer_key_id"]
    status, _, body = await asyncio.to_thread(http_get, f"{loaded.http}/crls/{key_id}")
    if status == 200 and body.startswith((b"{", b"[")):
        history = json.loads(body)
        for item in history if isinstance(history, list) else history.get("crls", []):
            times += [item[k] for k in ("this_update", "next_update") if item.get(k)]
    status, _, body = await asyncio.to_thread(http_get, f"{loaded.http}/documents")
    assert status == 200
    docs = json.loads(body)
    times += [d["lodged_at"] for d in docs]
    status, _, body = await asyncio.to_thread(http_get, f"{loaded.http}/readyz")
    assert status == 200
    times.append(json.loads(body)["replica"]["built"])  # as `replica status` shows it
    assert times and all(JSON_TIME.match(t) for t in times), times
    # a CRL's thisUpdate has whole seconds: no fraction is invented
    assert all("." not in c["this_update"] for c in crls)
    # extracts
    res = await asyncio.to_thread(run, "extract", "full", "--json",
                                  "--data-dir", str(loaded.repo.config.data_dir),
                                  env=db_env(loaded.repo.store.dsn))
    assert res.returncode == 0, res.stderr
    status, _, body = await asyncio.to_thread(
        http_get, f"{loaded.http}/extracts?apikey={TEST_KEY}")
    assert status == 200, body
    published = [e["published_at"] for e in json.loads(body)]
    assert published and all(JSON_TIME.match(t) for t in published), published


# -- config check / show, shipped files -------------------------------------------------------
def test_config_check_and_show(tmp_path: Path, pki: dict[str, Any]) -> None:
    pki_dir: Path = pki["dir"]
    good = tmp_path / "good.toml"
    good.write_text(server_toml(pki, {"http": "127.0.0.1:0", "lodge": "127.0.0.1:0"}))
    res = run("config", "check", "--config", str(good))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ok" in res.stdout and str(good) in res.stdout
    # a bad value: exit 2, the setting named, like `nginx -t`
    bad = tmp_path / "bad.toml"
    bad.write_text('[lodge]\nmax_batch = "many"\n')
    one_line_error(run("config", "check", "--config", str(bad)), 2, "lodge.max_batch")
    # the environment is checked too
    env = cli_env()
    env["SMKI_WEB__IDLE_TIMEOUT_SECONDS"] = "-1"
    one_line_error(run("config", "check", "--config", str(good), env=env), 2,
                   "web.idle_timeout_seconds")
    # and what the settings point at: files that are not there, several problems at once
    broken = tmp_path / "broken.toml"
    broken.write_text(good.read_text().replace(str(pki_dir / pki["tls"]["cert"]),
                                               str(tmp_path / "gone.pem"))
                      .replace(str(pki_dir / pki["dcc_client"]["ca"]), str(tmp_path / "no-ca.pem")))
    err = one_line_error(run("config", "check", "--config", str(broken)), 2, "tls.cert",
                         "gone.pem", "lodge.client_ca", "no-ca.pem")
    assert "2 problems" in err
    # show: the effective settings as TOML, secrets redacted, loadable again
    env = cli_env()
    env["SMKI_DATABASE__URL"] = "postgresql://smki:s3cr3t-pw@db.example:5432/smki"
    res = run("config", "show", "--config", str(good), env=env)
    assert res.returncode == 0, res.stderr
    assert "s3cr3t-pw" not in res.stdout
    shown = tomllib.loads(res.stdout)
    assert shown["database"]["url"] == "postgresql://smki:REDACTED@db.example:5432/smki"
    assert shown["listeners"]["http"] == "127.0.0.1:0" and shown["lodge"]["max_batch"] == 50000
    assert shown["tls"]["key"] == str(pki_dir / pki["tls"]["key"])  # a path, not a key
    res = run("config", "show", "--defaults")
    assert res.returncode == 0 and res.stdout == (ROOT / "conf" / "repository.toml").read_text()


@pytest.mark.slow
def test_wheel_and_sdist_ship_the_configuration_files(tmp_path: Path) -> None:
    """`pip wheel`/`python -m build` as a packager runs them: conf/repository.toml and the
    load profiles are inside both, and `config show --defaults` finds them installed."""
    if subprocess.run([sys.executable, "-m", "build", "--version"],
                      capture_output=True).returncode != 0:
        pytest.skip("the `build` package is not installed (pip install -e '.[test]')")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "*.egg-info", "__pycache__", "var", "build", "dist", ".mypy_cache",
        ".ruff_cache", "node_modules", "*.so"))
    out = tmp_path / "dist"
    res = subprocess.run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir",
                          str(out), str(src)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    wheel = next(out.glob("*.whl"))
    sdist = next(out.glob("*.tar.gz"))
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("repository.toml", "loadtest/day.toml", "loadtest/peak.toml",
                 "loadtest/soak.toml", "loadtest/spike.toml"):
        assert f"repository_server/conf/{name}" in names, names
    import tarfile

    with tarfile.open(sdist) as tar:
        members = tar.getnames()
    for name in ("conf/repository.toml", "conf/loadtest/day.toml",
                 "repository_server/listeners/ldap/_hot.c"):
        assert any(m.endswith("/" + name) for m in members), members
    # the LDAP short way's C loop, compiled from that source by the build (CI has a compiler)
    if HOT is not None or os.environ.get("CI"):
        assert any(n.startswith("repository_server/listeners/ldap/_hot.") and n.endswith(".so")
                   for n in names), names
    # installed from the wheel, away from the source tree, `config show --defaults` works
    target = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target",
                          str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    env = cli_env()
    env["PYTHONPATH"] = str(target)
    res = subprocess.run([sys.executable, "-c", "import sys; from repository_server.cli.main import"
                          " main; sys.exit(main(['config', 'show', '--defaults']))"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout == (ROOT / "conf" / "repository.toml").read_text()


# -- progress ---------------------------------------------------------------------------------
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_is_one_bounded_line() -> None:
    from repository_server.cli.lodge_client import Progress

    now = [0.0]
    out = _Terminal()
    progress = Progress(out, clock=lambda: now[0], columns=60)
    progress("import", 0, 34)
    for step, done in enumerate((10, -5, 20, 40), start=1):  # negative, past the total
        now[0] = step * 2.0
        progress("import", done, 34)
    segments = out.getvalue().split("\r")
    assert all(len(s.rstrip("\n").replace("\033[K", "")) <= 60 for s in segments), segments
    assert "-" not in "".join(re.findall(r"\d[\d,]*/[\d,]+", out.getvalue()))
    assert out.getvalue().endswith("\n") and out.getvalue().count("\n") == 1


def test_import_of_a_test_pki_takes_its_smki_objects_and_counts_certificates(
        tmp_path: Path) -> None:
    from repository_server.pki.testpki import TestPkiParams, generate, load_manifest

    out = tmp_path / "pki"
    generate(out, TestPkiParams(devices=30, organisations=6, workers=1, seed=3))
    manifest = load_manifest(out, devices=True)
    smki = sum(1 for o in manifest["objects"] if o["kind"] in ("root", "ca", "organisation",
                                                                   "device"))
    res = run("import", "--data-dir", str(tmp_path / "var"), str(out), timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"imported {smki:,} new certificates (0 already present" in res.stdout, res.stdout
    assert "3 CRL/ARL" in res.stdout
    assert "test PKI" in res.stderr and "not imported" in res.stderr, res.stderr
    counts = [tuple(int(x.replace(",", "")) for x in m)
              for m in re.findall(r"import: (-?[\d,]+)/([\d,]+)", res.stderr)]
    assert counts and counts[-1] == (smki, smki), res.stderr
    assert all(0 <= done <= total == smki for done, total in counts), counts


# -- logs -------------------------------------------------------------------------------------
ACCESS_FIELDS = {"time", "level", "listener", "peer", "user", "operation", "outcome",
                 "duration_ms", "audit"}


@pytest.mark.asyncio(loop_scope="session")
async def test_json_logs_have_the_same_fields_on_every_listener(
        tmp_path: Path, pki: dict[str, Any], fresh_db: str) -> None:
    from ldap3 import Connection, Server

    from tests.test_process import free_port

    pki_dir: Path = pki["dir"]
    dcc = pki["dcc_client"]
    ports = {name: free_port() for name in ("http", "lodge", "ldap")}
    conf = tmp_path / "json.toml"
    conf.write_text(server_toml(pki, {k: f"127.0.0.1:{v}" for k, v in ports.items()},
                                f'[database]\nurl = "{fresh_db}"\n[extracts]\nschedule = false\n'
                                '[log]\nformat = "json"\n'))
    proc = subprocess.Popen([*smki_cli(), "serve", "--config", str(conf), "--data-dir",
                             str(tmp_path / "var")], env=cli_env(), stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    try:
        from tests.test_process import wait_http

        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{ports['http']}/readyz")
        await asyncio.to_thread(http_get, f"http://127.0.0.1:{ports['http']}/crls")

        def ldap_search() -> None:
            conn = Connection(Server(f"ldap://127.0.0.1:{ports['ldap']}"), auto_bind=True)
            conn.search("o=SMKI", "(objectClass=*)", search_scope="BASE")
            conn.unbind()

        await asyncio.to_thread(ldap_search)
        org = str(pki_dir / next(o for o in pki["objects"] if o["kind"] == "root")["path"])
        res = await asyncio.to_thread(
            run, "lodge", "--url", f"https://localhost:{ports['lodge']}", "--cert",
            str(pki_dir / dcc["cert"]), "--key", str(pki_dir / dcc["key"]), "--ca",
            str(pki_dir / pki["tls"]["ca"]), "--trust-anchor", org)
        assert res.returncode == 0, res.stdout + res.stderr
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, None, 60)
    records = []
    for line in err.splitlines():
        assert line.startswith("{"), f"not a JSON line: {line}"
        records.append(json.loads(line))
    for rec in records:
        assert {"time", "level", "logger", "message"} <= rec.keys(), rec
        assert JSON_TIME.match(rec["time"]), rec
    access = [r for r in records if "listener" in r]
    by_listener = {r["listener"]: r for r in access}
    assert {"http", "ldap", "lodge"} <= by_listener.keys(), access
    for rec in access:
        assert rec.keys() >= ACCESS_FIELDS, rec
    lodged = [r for r in access if r["listener"] == "lodge"]
    assert any(r.get("user_agent") == f"smki-repository-lodge/{__version__}" for r in lodged), lodged
    assert any(r["operation"] == "search" for r in access if r["listener"] == "ldap"), access
