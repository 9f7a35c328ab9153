"""One typed configuration tree: defaults, then `conf/*.toml` (or `--config FILE`), then
environment overrides (`SMKI_<SECTION>__<KEY>`, e.g. `SMKI_LISTENERS__HTTP=0.0.0.0:8083`),
validated once at start. An invalid setting stops the program with a message naming it."""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "SMKI_"
# every listener setting (`[listeners]`) and its `serve --NAME HOST:PORT` flag
LISTENER_NAMES = ("http", "https", "lodge", "ldap", "ldaps", "sftp", "metrics")


class ConfigError(ValueError):
    """A setting is invalid; the message names it (`section.key`)."""


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, setting: str) -> HostPort:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ConfigError(f"{setting}: expected \"host:port\", got {text!r}")
        host = host.strip("[]")
        try:
            number = int(port)
        except ValueError:
            raise ConfigError(f"{setting}: port is not a number in {text!r}") from None
        if not 0 <= number <= 65535:
            raise ConfigError(f"{setting}: port {number} out of range 0-65535")
        return cls(host, number)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Listeners:
    """Every listener as "host:port"; empty string disables it. All loopback by default."""

    http: str = "127.0.0.1:8083"
    https: str = "127.0.0.1:8443"
    lodge: str = "127.0.0.1:8444"
    ldap: str = "127.0.0.1:3890"
    ldaps: str = "127.0.0.1:6360"
    sftp: str = "127.0.0.1:2222"  # extract downloads over SFTP (read-only)
    # Operations: GET /metrics (Prometheus), which names users (demand per user): keep it off
    # the public networks. `serve --workers N`: worker i listens on this port + i.
    metrics: str = "127.0.0.1:9464"
    # SO_REUSEPORT on every listener: several server processes on one node share each port and
    # the kernel spreads connections over them (`serve --workers N` sets it).
    reuse_port: bool = False

    def address(self, name: str) -> HostPort | None:
        value: str = getattr(self, name)
        return HostPort.parse(value, f"listeners.{name}") if value else None


@dataclass(frozen=True)
class Database:
    url: str = ""  # empty = embedded PostgreSQL in <data_dir>/pgdata
    pool_min: int = 2
    pool_max: int = 10
    command_timeout: float = 30.0  # seconds for one statement
    connect_timeout: float = 10.0
    # A PostgreSQL streaming replica of `url` that this node's read replica is fed from (rows
    # only: lodging and accounts always use `url`); empty = feed from `url`.
    replica_url: str = ""


@dataclass(frozen=True)
class Tls:
    """Server certificate for https, lodge and ldaps. Relative paths are under data_dir."""

    cert: str = "pki/tls/server.pem"
    key: str = "pki/tls/server.key.pem"
    # A TLS connection (https, lodge, ldaps) whose handshake is not done this long is closed.
    handshake_timeout_seconds: float = 10.0
    # Refused handshakes are counted per minute, listener, reason and peer address (table
    # tls_refusals): at most this many peers a minute per listener, the rest as one "other".
    refusal_peers_per_minute: int = 100
    refusal_flush_seconds: float = 10.0  # the counts reach the store this often (and at stop)


@dataclass(frozen=True)
class Lodge:
    client_ca: str = "pki/dcc/client-ca.pem"  # the DCC client CA (trust anchor for mTLS)
    # The DCC identity: the client certificate must match every one that is set.
    client_subject: str = "CN=DCC SMKI Lodging Client,OU=DCC,O=Smart DCC Ltd"
    client_eui64: str = ""
    client_role: int = -1  # -1 = not checked
    max_batch: int = 50_000  # certificates in one request
    max_body_mb: int = 128  # request body cap (50,000 PEM certificates are ~40 MB)
    max_crl_bytes: int = 16 * 1024 * 1024
    max_document_mb: int = 64
    clock_skew_seconds: int = 300  # thisUpdate may be this far in the future
    parse_workers: int = 0  # processes for batch parsing; 0 = number of CPUs
    # open connections, those still in their TLS handshake included; more are closed at once
    max_connections: int = 256


@dataclass(frozen=True)
class Web:
    open_reads: bool = False  # searches and certificate retrieval without an API key
    cert_max_age: int = 31_536_000  # seconds; certificates never change
    crl_max_age: int = 3600  # upper bound; never beyond the CRL's nextUpdate
    document_max_age: int = 300
    # RFC 4387 search.cgi: certificates in one answer at most (a device issuer's iHash matches
    # millions); the total is in X-Total-Count
    search_max_results: int = 100
    client_max_size_kb: int = 64  # request bodies on the read listeners
    ws_max_body_bytes: int = 8192  # web service requests (a real one is under 300 bytes)
    # Slow or stalled clients (http and https listeners, per listener and process):
    max_connections: int = 4096  # more are answered 503 and closed at once
    idle_timeout_seconds: float = 30.0  # no complete request head this long (idle, slowloris)
    body_timeout_seconds: float = 30.0  # a request body (web service, portal forms) this long
    max_header_bytes: int = 8190  # the request line and each header line
    max_headers: int = 100  # header lines per request
    # the hot download (GET/HEAD /certificates/{serial}) answered by the httptools front of the
    # http and https listeners (listeners/http/front.py), the rest handed to aiohttp; false:
    # aiohttp for everything
    fast_front: bool = True


@dataclass(frozen=True)
class Ldap:
    """The LDAPv3 read interface (listeners.ldap with StartTLS, listeners.ldaps)."""

    suffix: str = "o=SMKI"  # the naming context; its first RDN is o=, ou= or dc=
    open_reads: bool = False  # device and organisation entries without a bound user
    client_ca: str = ""  # PEM: CAs whose client certificates may SASL EXTERNAL bind; "" = off
    size_limit: int = 1000  # entries per search (per page with paged results); 0 = none
    time_limit_seconds: int = 60  # per search (or page); 0 = none
    max_connections: int = 4096
    max_outstanding: int = 32  # operations in flight per connection
    max_request_kb: int = 256  # largest PDU accepted
    idle_timeout_seconds: int = 300
    write_timeout_seconds: int = 30  # a client that reads nothing this long is disconnected
    response_cache_mb: int = 64  # pre-encoded answers to repeated searches, per process
    # searches by EUI-64 answered the short way (ldap/fastpath.py); false: all the general way
    fast_path: bool = True
    # the short way's innermost loops in C (ldap/_hot.c) when it was built; false: in Python
    compiled: bool = True


@dataclass(frozen=True)
class ServiceLevelSettings:
    """Code Performance Measure 8 and demand (placeholders: the SEC values were not available)."""

    enabled: bool = True  # count every read request (CPM 8 and demand)
    trt_seconds: float = 3.0  # Target Response Time
    target_percent: float = 99.0
    minimum_percent: float = 96.0
    flush_seconds: float = 10.0  # counts reach PostgreSQL this often (a crash loses at most this)
    demand_threshold_percent: float = 120.0  # flag users above this share of their forecast
    timezone: str = "Europe/London"  # months, days and the SEC time bands are UK local time


@dataclass(frozen=True)
class Portal:
    """The browser portal (HTML under /portal/ on the http and https listeners)."""

    enabled: bool = True
    session_idle_seconds: int = 900  # a session unused this long ends
    session_absolute_seconds: int = 28_800  # and every session ends this long after sign-in
    lockout_failures: int = 5  # SEC: 5 wrong passwords ...
    lockout_window_seconds: int = 3600  # ... within one hour ...
    lockout_seconds: int = 3600  # ... lock the account for one hour
    password_min_length: int = 12  # for a new password
    page_size: int = 100  # revoked entries per page on a CRL page
    detail_cache_entries: int = 10_000  # decoded certificate pages kept per process


WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


@dataclass(frozen=True)
class Extracts:
    """Full (weekly) and delta (daily) extracts of everything lodged (format in the README)."""

    dir: str = "extracts"  # where they are published (relative: under data_dir)
    schedule: bool = True  # produce them on the schedule below (one process per cluster)
    full_weekday: str = "sunday"
    full_time: str = "02:00"  # HH:MM, local time in `timezone`
    delta_time: str = "02:00"  # daily; skipped when it falls on the full's tick
    timezone: str = "Europe/London"
    compression: str = "gzip"  # gzip | none
    retain_full: int = 4  # full extracts kept; deltas older than the oldest kept full go too
    page_size: int = 5000  # certificates read per query while streaming
    check_seconds: float = 60.0  # how often the scheduler looks at the clock
    # SFTP (listeners.sftp): the server's host key, made on first start when missing
    sftp_host_key: str = "sftp/ssh_host_ed25519_key"
    sftp_login_timeout_seconds: int = 60

    def times(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(full HH, MM), (delta HH, MM); ConfigError names a malformed one."""
        out = []
        for key in ("full_time", "delta_time"):
            text: str = getattr(self, key)
            hh, sep, mm = text.partition(":")
            if not (sep and hh.isdigit() and mm.isdigit() and int(hh) < 24 and int(mm) < 60):
                raise ConfigError(f"extracts.{key}: expected HH:MM (24-hour), got {text!r}")
            out.append((int(hh), int(mm)))
        return out[0], out[1]


@dataclass(frozen=True)
class Replica:
    """The node-local read replica (memory-mapped LMDB) every read interface serves from."""

    path: str = "replica"  # a directory (relative: under data_dir)
    map_size_gb: int = 256  # address space reserved for it (the file grows as needed)
    poll_seconds: float = 0.5  # the feeder looks for changes this often (and on NOTIFY)
    max_lag_seconds: float = 30.0  # /readyz says 503 when the oldest change not applied is older


@dataclass(frozen=True)
class Log:
    level: str = "INFO"
    access_log: bool = True
    format: str = "text"  # text | json (one JSON object a line, the same fields everywhere)


@dataclass(frozen=True)
class Config:
    data_dir: str = "./var"
    listeners: Listeners = field(default_factory=Listeners)
    database: Database = field(default_factory=Database)
    tls: Tls = field(default_factory=Tls)
    lodge: Lodge = field(default_factory=Lodge)
    web: Web = field(default_factory=Web)
    ldap: Ldap = field(default_factory=Ldap)
    replica: Replica = field(default_factory=Replica)
    portal: Portal = field(default_factory=Portal)
    extracts: Extracts = field(default_factory=Extracts)
    service_levels: ServiceLevelSettings = field(default_factory=ServiceLevelSettings)
    log: Log = field(default_factory=Log)

    def path(self, value: str) -> Path:
        """Resolve a configured path: relative ones live under data_dir."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else Path(self.data_dir).expanduser() / p

    def validate(self) -> Config:
        """Every setting checked, section by section (`_SECTION_CHECKS`); the first problem is
        a ConfigError naming the setting."""
        for section, check in _SECTION_CHECKS:
            check(getattr(self, section))
        return self


def _check_listeners(lis: Listeners) -> None:
    for name in LISTENER_NAMES:
        lis.address(name)


def _check_database(db: Database) -> None:
    if db.pool_min < 1 or db.pool_max < db.pool_min:
        raise ConfigError("database.pool_min/pool_max: need 1 <= pool_min <= pool_max")
    for key in ("url", "replica_url"):
        if getattr(db, key) and not getattr(db, key).startswith(("postgres://", "postgresql://")):
            raise ConfigError(f"database.{key}: must start with postgresql:// (or be empty)")


def _positive(section: str, settings: object, keys: tuple[str, ...]) -> None:
    for key in keys:
        if getattr(settings, key) <= 0:
            raise ConfigError(f"{section}.{key}: must be positive")


def _check_lodge(lodge: Lodge) -> None:
    if not 1 <= lodge.max_batch <= 1_000_000:
        raise ConfigError("lodge.max_batch: must be between 1 and 1,000,000")
    if lodge.client_role != -1 and not 0 <= lodge.client_role <= 255:
        raise ConfigError("lodge.client_role: must be -1 (unchecked) or 0-255")
    if not (lodge.client_subject or lodge.client_eui64):
        raise ConfigError("lodge.client_subject: set it or lodge.client_eui64 (the DCC identity)")
    if lodge.client_eui64:
        from repository_server.pki.ids import IdentifierError, parse_eui64

        try:
            parse_eui64(lodge.client_eui64)
        except IdentifierError as exc:
            raise ConfigError(f"lodge.client_eui64: {exc}") from None
    if lodge.client_subject:
        from cryptography.x509 import Name

        try:
            Name.from_rfc4514_string(lodge.client_subject)
        except ValueError as exc:
            raise ConfigError(f"lodge.client_subject: not an RFC 4514 name: {exc}") from None
    _positive("lodge", lodge, ("max_body_mb", "max_crl_bytes", "max_document_mb",
                               "max_connections"))


def _check_web(web: Web) -> None:
    if not 1 <= web.search_max_results <= 10_000:
        raise ConfigError("web.search_max_results: must be between 1 and 10000")
    if not 64 <= web.ws_max_body_bytes <= 1024 * 1024:
        raise ConfigError("web.ws_max_body_bytes: must be between 64 and 1048576")
    _positive("web", web, ("max_connections", "idle_timeout_seconds", "body_timeout_seconds",
                           "max_headers"))
    if not 256 <= web.max_header_bytes <= 1024 * 1024:
        raise ConfigError("web.max_header_bytes: must be between 256 and 1048576")


def _check_ldap(ldap: Ldap) -> None:
    from repository_server.listeners.ldap import dn

    try:
        suffix = dn.parse_normalised(ldap.suffix)
    except dn.DNError as exc:
        raise ConfigError(f"ldap.suffix: not a DN: {exc}") from None
    if not suffix or len(suffix[0]) != 1 or suffix[0][0][0] not in ("o", "ou", "dc"):
        raise ConfigError("ldap.suffix: must be a DN whose first RDN is o=, ou= or dc="
                          f" (got {ldap.suffix!r})")
    for key in ("size_limit", "time_limit_seconds", "response_cache_mb"):
        if getattr(ldap, key) < 0:
            raise ConfigError(f"ldap.{key}: must be >= 0")
    _positive("ldap", ldap, ("max_connections", "max_outstanding", "max_request_kb",
                             "idle_timeout_seconds", "write_timeout_seconds"))


def _check_tls(tls: Tls) -> None:
    if not 0.1 <= tls.handshake_timeout_seconds <= 300:
        raise ConfigError("tls.handshake_timeout_seconds: must be between 0.1 and 300")
    if not 1 <= tls.refusal_peers_per_minute <= 100_000:
        raise ConfigError("tls.refusal_peers_per_minute: must be between 1 and 100000")
    if not 0.1 <= tls.refusal_flush_seconds <= 3600:
        raise ConfigError("tls.refusal_flush_seconds: must be between 0.1 and 3600")


def _check_service_levels(sl: ServiceLevelSettings) -> None:
    if sl.trt_seconds <= 0:
        raise ConfigError("service_levels.trt_seconds: must be positive")
    if not 0 <= sl.minimum_percent <= sl.target_percent <= 100:
        raise ConfigError("service_levels.minimum_percent/target_percent: need"
                          " 0 <= minimum_percent <= target_percent <= 100")
    _positive("service_levels", sl, ("flush_seconds", "demand_threshold_percent"))
    _check_zone(sl.timezone, "service_levels.timezone")


def _check_portal(po: Portal) -> None:
    _positive("portal", po, ("session_idle_seconds", "session_absolute_seconds",
                             "lockout_failures", "lockout_window_seconds", "lockout_seconds",
                             "page_size"))
    if not 8 <= po.password_min_length <= 128:
        raise ConfigError("portal.password_min_length: must be between 8 and 128")
    if po.detail_cache_entries < 0:
        raise ConfigError("portal.detail_cache_entries: must be >= 0")


def _check_extracts(ex: Extracts) -> None:
    if not ex.dir:
        raise ConfigError("extracts.dir: must not be empty")
    if ex.full_weekday.lower() not in WEEKDAYS:
        raise ConfigError(f"extracts.full_weekday: one of {', '.join(WEEKDAYS)}")
    ex.times()
    if ex.compression not in ("gzip", "none"):
        raise ConfigError("extracts.compression: gzip or none")
    if ex.retain_full < 1:
        raise ConfigError("extracts.retain_full: must be at least 1")
    if not 1 <= ex.page_size <= 100_000:
        raise ConfigError("extracts.page_size: must be between 1 and 100000")
    _positive("extracts", ex, ("check_seconds",))
    if not ex.sftp_host_key:
        raise ConfigError("extracts.sftp_host_key: must not be empty")
    _positive("extracts", ex, ("sftp_login_timeout_seconds",))
    _check_zone(ex.timezone, "extracts.timezone")


def _check_replica(rep: Replica) -> None:
    if not 1 <= rep.map_size_gb <= 65536:
        raise ConfigError("replica.map_size_gb: must be between 1 and 65536")
    if not 0.05 <= rep.poll_seconds <= 60:
        raise ConfigError("replica.poll_seconds: must be between 0.05 and 60")
    _positive("replica", rep, ("max_lag_seconds",))


def _check_log(lg: Log) -> None:
    if lg.level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError("log.level: one of DEBUG, INFO, WARNING, ERROR")
    if lg.format not in ("text", "json"):
        raise ConfigError(f"log.format: text or json (got {lg.format!r})")


# (section, its check), in the order problems are reported
_SECTION_CHECKS: tuple[tuple[str, Callable[[Any], None]], ...] = (
    ("listeners", _check_listeners), ("database", _check_database), ("lodge", _check_lodge),
    ("web", _check_web), ("ldap", _check_ldap), ("tls", _check_tls),
    ("service_levels", _check_service_levels), ("portal", _check_portal),
    ("extracts", _check_extracts), ("replica", _check_replica), ("log", _check_log),
)


def _check_zone(name: str, setting: str) -> None:
    from zoneinfo import ZoneInfo

    try:
        ZoneInfo(name)
    except (ValueError, KeyError, OSError):
        raise ConfigError(f"{setting}: unknown time zone {name!r}") from None


def _coerce(value: Any, target: Any, setting: str) -> Any:
    """Check/convert one TOML or environment value to the field's declared type."""
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
            return value.lower() in {"1", "true", "yes", "on"}
        raise ConfigError(f"{setting}: expected true or false, got {value!r}")
    if target is int:
        if isinstance(value, bool):
            raise ConfigError(f"{setting}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{setting}: expected an integer, got {value!r}")
    if target is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{setting}: expected a number, got {value!r}")
    if target is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{setting}: expected a string, got {value!r}")
    raise ConfigError(f"{setting}: unsupported type")  # pragma: no cover


def _build(cls: Any, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            where = f"{prefix}{key}"
            raise ConfigError(f"{where}: unknown setting (known: {', '.join(sorted(known))})")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        hint = hints[f.name]
        value = data[f.name]
        setting = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{setting}: expected a table [{setting}]")
            kwargs[f.name] = _build(hint, value, f"{setting}.")
        else:
            if isinstance(hint, types.UnionType):  # pragma: no cover - not used yet
                hint = typing.get_args(hint)[0]
            kwargs[f.name] = _coerce(value, hint, setting)
    return cls(**kwargs)


def _env_overrides(environ: typing.Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        # Settings are SMKI_<SECTION>__<KEY> (and SMKI_DATA_DIR); other SMKI_* variables
        # (SMKI_CONFIG, a script's SMKI_BIN, ...) are not settings.
        if "__" not in rest and rest != "data_dir":
            continue
        path = rest.split("__")
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load(
    path: str | Path | None = None,
    *,
    data_dir: str | None = None,
    environ: typing.Mapping[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Defaults < TOML file < environment < explicit overrides (command-line flags)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            with p.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p}: {exc}") from None
    data = _merge(data, _env_overrides(os.environ if environ is None else environ))
    if data_dir is not None:
        data["data_dir"] = data_dir
    if overrides:
        data = _merge(data, overrides)
    config: Config = _build(Config, data, "")
    return config.validate()


# -- showing settings (`smki-repository config show`) ----------------------------------------
REDACTED = "REDACTED"


def redact_url(url: str) -> str:
    """A database URL with its password (in the authority or a `password=` parameter)
    replaced by REDACTED."""
    import re
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is not None:
        user = parts.username or ""
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{user}:{REDACTED}@{host}")
    query = re.sub(r"(^|&)(password=)[^&]*", rf"\g<1>\g<2>{REDACTED}", parts.query)
    return urlunsplit(parts._replace(query=query))


def _toml_value(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)  # a TOML basic string


def to_toml(config: Config) -> str:
    """The settings as TOML that `load` reads back, secrets redacted (database passwords;
    other settings hold file paths, never key material)."""
    lines = [f"data_dir = {_toml_value(config.data_dir)}"]
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        if not dataclasses.is_dataclass(values):
            continue
        lines += ["", f"[{section.name}]"]
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if section.name == "database" and f.name.endswith("url") and value:
                value = redact_url(value)
            lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def shipped_config_dir() -> Path:
    """The example configuration and load profiles: inside the installed package (the wheel
    carries them as repository_server/conf), or the source tree's conf/."""
    inside = Path(__file__).resolve().parent / "conf"
    if (inside / "repository.toml").is_file():
        return inside
    return Path(__file__).resolve().parent.parent / "conf"
