"""Command line: serve, demo, testpki, import, lodge, users, report.

Every command that touches the store takes `--config FILE` and `--data-dir DIR` (default
`./var`) and may run while the server runs (they share the embedded PostgreSQL by lease).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from repository_server import __version__
from repository_server.cli.common import load_config
from repository_server.cli.data import (
    cmd_export_ldap_schema,
    cmd_export_ldif,
    cmd_extract,
    cmd_import,
    cmd_lodge,
    cmd_replica,
    cmd_report,
    cmd_users,
)
from repository_server.cli.demo import cmd_demo, cmd_testpki
from repository_server.cli.serve import cmd_serve
from repository_server.config import LISTENER_NAMES, ConfigError
from repository_server.errors import UsageError

log = logging.getLogger("smki-repository")


# -- config ---------------------------------------------------------------------------------
def cmd_config(args: argparse.Namespace) -> int:
    """`config check`: every problem in the file, the environment and the files they name
    (exit 2), like `nginx -t`; `config show`: the effective settings as TOML."""
    from repository_server.config import shipped_config_dir, to_toml

    source = args.config or os.environ.get("SMKI_CONFIG") or None
    where = source or "the built-in defaults"
    env = sorted(k for k in os.environ if k.startswith("SMKI_") and k != "SMKI_CONFIG")
    if args.action == "show":
        if args.defaults:
            shipped = shipped_config_dir() / "repository.toml"
            try:
                sys.stdout.write(shipped.read_text())
            except OSError as exc:
                print(f"error: the example configuration is not installed ({shipped}:"
                      f" {exc.strerror or exc}); reinstall the package", file=sys.stderr)
                return 1
            return 0
        sys.stdout.write(f"# effective settings: {where}"
                         + (f" + {', '.join(env)}" if env else "") + "\n" + to_toml(load_config(args)))
        return 0
    from repository_server.listeners.tls import tls_problems

    try:
        config = load_config(args)
    except ConfigError as exc:
        problems = [str(exc)]
    else:
        problems = tls_problems(config)
        data = Path(config.data_dir).expanduser()
        existing = next((p for p in (data, *data.absolute().parents) if p.exists()), None)
        if existing is not None and not os.access(existing, os.W_OK):
            problems.append(f"data_dir: {data} cannot be written ({existing} is not writable)")
    for problem in problems:
        print(f"configuration error: {problem}", file=sys.stderr)
    env_text = f" with {', '.join(env)}" if env else ""
    if problems:
        count = f"{len(problems)} problem" + ("s" if len(problems) > 1 else "")
        print(f"config check: {where}{env_text}: {count}", file=sys.stderr)
        return 2
    print(f"config check: {where}{env_text}: ok")
    return 0


# -- parser ---------------------------------------------------------------------------------
class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option's help (not for options without one, or flags), and
    the epilog's examples kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in text:
            return text
        return super()._get_help_string(action)


# shtab's completion hints (a FILE or DIR argument), set without importing shtab
_FILE = {"bash": "_shtab_compgen_files", "zsh": "_files", "tcsh": "f"}
_DIR = {"bash": "_shtab_compgen_dirs", "zsh": "_files -/", "tcsh": "d"}


def _complete(action: argparse.Action, kind: dict[str, str]) -> argparse.Action:
    action.complete = kind  # type: ignore[attr-defined]
    return action


def _command(sub: Any, name: str, text: str, examples: list[str],
             func: Callable[[argparse.Namespace], int] | None = None) -> argparse.ArgumentParser:
    epilog = "Example" + ("s" if len(examples) > 1 else "") + ":\n" + "\n".join(
        f"  {line}" for line in examples)
    p: argparse.ArgumentParser = sub.add_parser(name, help=text, description=text, epilog=epilog,
                                                formatter_class=_Help)
    if func is not None:
        p.set_defaults(func=func)
    return p


def _store_args(p: argparse.ArgumentParser) -> None:
    _complete(p.add_argument("--config", metavar="FILE",
                             help="TOML configuration file (default: $SMKI_CONFIG, else built-in"
                                  " defaults; see `smki-repository config show`)"), _FILE)
    _complete(p.add_argument("--data-dir", metavar="DIR", default=None,
                             help="data directory (default: data_dir from the configuration,"
                                  " ./var)"), _DIR)


def _json_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} as JSON")


def _short_way() -> str:
    """How the LDAP short way's inner loops run here (`--version`): the C module when it was
    built and loads, else Python."""
    try:
        importlib.import_module("repository_server.listeners.ldap._hot")
    except ImportError:
        return "Python, no C compiler at install"
    return "compiled, ldap/_hot.c"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="smki-repository", formatter_class=_Help,
        description="SMKI certificate repository and revocation server",
        epilog="Exit status: 0 success, 1 something was refused (details on stderr),\n"
               "2 usage or configuration error, or a server that cannot be reached.\n\n"
               "Examples:\n  smki-repository demo\n  smki-repository lodge --help\n"
               "  source <(smki-repository completion bash)")
    ap.add_argument("--version", action="version",
                    version=f"%(prog)s {__version__} (LDAP short way: {_short_way()})")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND",
                            help="what to do (each has its own --help)")

    p = _command(sub, "serve", "run the server", [
        "smki-repository serve --config /etc/smki/repository.toml",
        "smki-repository serve --data-dir /srv/smki --http 0.0.0.0:8083 --ldaps '' --workers 2"],
        cmd_serve)
    _store_args(p)
    for name in LISTENER_NAMES:
        p.add_argument(f"--{name}", metavar="HOST:PORT",
                       help=f"override listeners.{name} (an empty string disables it)")
    _complete(p.add_argument("--pid-file", metavar="FILE",
                             help="write the process id here once listening; removed at exit"),
              _FILE)
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="N server processes sharing every listener (SO_REUSEPORT)")

    p = _command(sub, "demo", "generate a test PKI, start everything, lodge the PKI", [
        "smki-repository demo", "smki-repository demo --data-dir /tmp/smki --devices 1000"],
        cmd_demo)
    _store_args(p)
    p.add_argument("--devices", type=int, metavar="N",
                   help="devices in the test PKI (default: 50); used when it is generated,"
                        " ignored (and said so) once DATA_DIR/pki exists")
    p.add_argument("--organisations", type=int, metavar="M",
                   help="organisation certificates in the test PKI (default: 24); used when"
                        " it is generated")
    _complete(p.add_argument("--pid-file", metavar="FILE",
                             help="write the process id here once listening"), _FILE)

    p = _command(sub, "testpki", "generate a test PKI in the GB profile", [
        "smki-repository testpki --devices 1000 --organisations 24 --out /tmp/pki --seed 7"],
        cmd_testpki)
    p.add_argument("--devices", type=int, default=50, metavar="N",
                   help="devices (each has a digital-signing and a key-agreement certificate)")
    p.add_argument("--organisations", type=int, default=24, metavar="M",
                   help="organisation certificates")
    p.add_argument("--workers", type=int, default=0, metavar="W",
                   help="processes making certificates (0: one per core)")
    p.add_argument("--seed", type=int, default=None, metavar="S",
                   help="random seed, for the same serials and EUI-64s every time (default:"
                        " random)")
    _complete(p.add_argument("--out", required=True, metavar="DIR",
                             help="directory to create (must not hold a test PKI yet)"), _DIR)

    p = _command(sub, "import", "bulk-load certificates and CRLs from a directory", [
        "smki-repository import --data-dir /srv/smki /srv/incoming/certificates",
        "smki-repository import /tmp/pki      # a testpki folder: its SMKI objects only"],
        cmd_import)
    _store_args(p)
    _complete(p.add_argument("dir", metavar="DIR",
                             help="a directory (recursed into) or one file; a test PKI's"
                                  " folder (manifest.json) imports the SMKI objects it lists"),
              _DIR)
    p.add_argument("--allow-unverified-issuer", action="store_true",
                   help="store certificates whose issuer is not available, marked unverified"
                        " (self-signed CA certificates are always imported as trust anchors)")
    p.add_argument("--skip-signature-check", action="store_true",
                   help="link certificates to their issuers by name and key id without checking"
                        " signatures (a trusted source, e.g. our own extract); recorded on each")

    p = _command(sub, "lodge", "lodge files through the mutual-TLS lodging API (DCC side)", [
        "smki-repository lodge --url https://localhost:8444 --ca var/pki/tls/ca.pem \\\n"
        "    --cert var/pki/dcc/client.pem --key var/pki/dcc/client.key.pem \\\n"
        "    var/pki/crl/issuing-oca.crl var/pki/documents/SMKI-Recovery-Procedure.txt"],
        cmd_lodge)
    p.add_argument("--url", default="https://localhost:8444",
                   help="the repository's lodging listener (https://HOST:PORT)")
    _complete(p.add_argument("--cert", required=True, metavar="FILE",
                             help="the DCC lodging client's certificate (PEM)"), _FILE)
    _complete(p.add_argument("--key", required=True, metavar="FILE",
                             help="the private key of --cert (PEM)"), _FILE)
    _complete(p.add_argument("--ca", metavar="FILE",
                             help="CA certificate that issued the server's TLS certificate (PEM;"
                                  " default: the system's trusted CAs)"), _FILE)
    p.add_argument("--name", help="document name (default: the file name without extension)")
    p.add_argument("--trust-anchor", action="store_true",
                   help="lodge self-signed root CA certificates as trust anchors")
    p.add_argument("--status", choices=["P", "I", "N"],
                   help="device certificate status to record: P pending, I in use, N not in use")
    p.add_argument("--manufacturing-flag", choices=["true", "false"],
                   help="the device certificates' manufacturing flag")
    p.add_argument("--on-behalf-of", metavar="OFFICER",
                   help="the DCC officer lodging (sent as X-On-Behalf-Of, kept in the audit log)")
    p.add_argument("--batch-size", type=int, default=50_000, metavar="N",
                   help="certificates per request when a bundle is split")
    _complete(p.add_argument("files", nargs="+", metavar="FILE",
                             help="certificates (PEM/DER), CRLs/ARLs or documents"), _FILE)

    p = _command(sub, "users", "relying-party users: API keys, passwords, forecasts",
                 ["smki-repository users list"], cmd_users)
    us = p.add_subparsers(dest="action", required=True, metavar="ACTION",
                           help="what to do with users")
    q = _command(us, "add", "add a user; prints its API key and initial password once", [
        "smki-repository users add acme-energy", "smki-repository users add ops1 --operator"])
    q.add_argument("name", help="user name: letters, digits and . _ @ -")
    q.add_argument("--operator", action="store_true",
                   help="operator role (may read the service-level reports over HTTP)")
    q.add_argument("--api-key", metavar="KEY", help="use this key instead of a random one")
    q.add_argument("--no-api-key", action="store_true", help="portal sign-in only")
    q = _command(us, "list", "list users (never their keys or passwords)",
                 ["smki-repository users list --json"])
    _json_arg(q, "the users")
    for verb, text in (("disable", "disable a user (its API key stops working)"),
                       ("enable", "enable a disabled user"),
                       ("reset", "new temporary portal password, to be changed at sign-in")):
        q = _command(us, verb, text, [f"smki-repository users {verb} acme-energy"])
        q.add_argument("name", help="the user")
    q = _command(us, "apikey", "new random API key (printed once), or --set a given one", [
        "smki-repository users apikey acme-energy",
        "smki-repository users apikey dcc-boxed --set u3bg9gt38htd0j2"])
    q.add_argument("name", help="the user")
    q.add_argument("--set", metavar="KEY", help="e.g. DCC Boxed's fixed key u3bg9gt38htd0j2")
    q = _command(us, "forecast", "set a user's demand forecast", [
        "smki-repository users forecast acme-energy --per-day 20000 --bands 10,5,70,15",
        "smki-repository users forecast acme-energy --clear"])
    q.add_argument("name", help="the user")
    q.add_argument("--per-day", type=int, metavar="N",
                   help="requests per 24 hours (required unless --clear)")
    q.add_argument("--bands", metavar="A,B,C,D",
                   help="percent of the day's requests in 00-07,07-08,08-20,20-24 (UK time);"
                        " 25,25,25,25 when not given")
    q.add_argument("--clear", action="store_true", help="remove the forecast")
    q = _command(us, "sshkey", "add an SFTP public key for a user, or clear its keys", [
        "smki-repository users sshkey acme-energy --add ~/.ssh/id_ed25519.pub"])
    q.add_argument("name", help="the user")
    g = q.add_mutually_exclusive_group(required=True)
    _complete(g.add_argument("--add", metavar="FILE",
                             help="an OpenSSH public key file (e.g. id_ed25519.pub)"), _FILE)
    g.add_argument("--clear", action="store_true", help="remove every key of the user")
    for q in us.choices.values():
        _store_args(q)

    p = _command(sub, "report", "service-level reports (CPM 8, demand), refused TLS handshakes",
                 ["smki-repository report cpm", "smki-repository report tls-refusals --hours 1"],
                 cmd_report)
    rs = p.add_subparsers(dest="kind", required=True, metavar="REPORT", help="which report")
    q = _command(rs, "cpm", "Code Performance Measure 8 for a calendar month",
                 ["smki-repository report cpm --month 2026-11 --json"])
    q.add_argument("--month", metavar="YYYY-MM", help="the month (default: this month, UK time)")
    _json_arg(q, "the report")
    _store_args(q)
    q = _command(rs, "demand", "requests per user and time band against forecast",
                 ["smki-repository report demand --day 2026-11-30"])
    q.add_argument("--day", metavar="YYYY-MM-DD", help="the day (default: today, UK time)")
    _json_arg(q, "the report")
    _store_args(q)
    q = _command(rs, "tls-refusals", "refused TLS handshakes per listener, reason and peer"
                 " address (counted per minute)", ["smki-repository report tls-refusals --hours 1"])
    q.add_argument("--hours", type=float, default=24, help="this far back")
    _json_arg(q, "the report")
    _store_args(q)

    p = _command(sub, "replica", "this node's read replica: status, verify, rebuild", [
        "smki-repository replica status", "smki-repository replica verify --no-catch-up"],
        cmd_replica)
    p.add_argument("action", choices=("status", "verify", "rebuild"),
                   help="status: how far behind, sizes; verify: compare with the store (counts"
                        " and a digest per id range); rebuild: build anew from the store")
    p.add_argument("--no-catch-up", action="store_true",
                   help="verify: compare as it is, without applying pending changes first")
    _store_args(p)

    p = _command(sub, "export-ldif", "write the LDAP directory as LDIF (e.g. to load slapd)", [
        "smki-repository export-ldif --out directory.ldif",
        "smki-repository export-ldif | head -40"], cmd_export_ldif)
    _store_args(p)
    _complete(p.add_argument("--out", metavar="FILE",
                             help="output file, written as FILE.partial and renamed when"
                                  " complete (default: standard output)"), _FILE)

    p = _command(sub, "extract", "produce a full or delta extract now",
                 ["smki-repository extract full --json"], cmd_extract)
    p.add_argument("kind", choices=("full", "delta"),
                   help="full: every certificate; delta: changes since the last extract")
    p.add_argument("--json", action="store_true", help="describe it as JSON")
    _store_args(p)

    p = _command(sub, "export-ldap-schema",
                 "write our LDAP attribute types and object classes as an OpenLDAP schema",
                 ["smki-repository export-ldap-schema --out /etc/ldap/schema/smki.schema"],
                 cmd_export_ldap_schema)
    _complete(p.add_argument("--out", metavar="FILE",
                             help="output file (default: standard output)"), _FILE)

    p = _command(sub, "config", "check the configuration, or show the effective settings",
                 ["smki-repository config check --config /etc/smki/repository.toml"],
                 cmd_config)
    cs = p.add_subparsers(dest="action", required=True, metavar="ACTION", help="check or show")
    q = _command(cs, "check", "validate the file, the SMKI_* environment and the files they"
                 " name; exit 0 when good, 2 with every problem found (like `nginx -t`)",
                 ["smki-repository config check --config /etc/smki/repository.toml"])
    _store_args(q)
    q = _command(cs, "show", "print the effective settings (defaults < file < environment) as"
                 " TOML, passwords redacted", [
                     "smki-repository config show --config /etc/smki/repository.toml",
                     "smki-repository config show --defaults > repository.toml"])
    _store_args(q)
    q.add_argument("--defaults", action="store_true",
                   help="print the shipped example configuration instead (every setting, its"
                        " default and what it does)")

    p = _command(sub, "completion", "print a shell completion script", [
        "smki-repository completion bash > /etc/bash_completion.d/smki-repository",
        "smki-repository completion zsh > ~/.zfunc/smki_command-repository"], cmd_completion)
    p.add_argument("shell", choices=("bash", "zsh"), help="the shell")
    return ap


def cmd_completion(args: argparse.Namespace) -> int:
    import shtab

    sys.stdout.write(shtab.complete(parser(), shell=args.shell))
    return 0


def _quiet_broken_pipe() -> int:
    """stdout's reader has gone (`| head`): stop quietly, as tools killed by SIGPIPE do, and
    keep Python's exit-time flush from complaining about it."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 128 + signal.SIGPIPE


def main(argv: list[str] | None = None) -> int:
    from repository_server.store.embedded import NoStore

    args = parser().parse_args(argv)
    try:
        result: int = args.func(args)
        sys.stdout.flush()
        return result
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except (NoStore, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except KeyboardInterrupt:
        return 130
