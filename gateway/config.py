"""Configuration: a TOML file, environment overrides, and the embedded default.

File layout::

    [server]
    host = "127.0.0.1"
    port = 8080

    [registry]
    url = "sqlite:///data/registry.db"   # relative paths are relative to the config file

    [[sources]]
    name = "archive"
    kind = "filesystem"
    path = "/mnt/pacs"
    interval = 300                       # seconds between harvests while serving

    [changes]
    quiet_seconds = 1.0                  # a study is announced once no instance came for this long
    keep_days = 30                       # events older than this are pruned (0: kept forever)

Environment overrides (they win over the file): GATEWAY_HOST, GATEWAY_PORT, GATEWAY_REGISTRY_URL,
GATEWAY_DATA_DIR (where the embedded default keeps its SQLite file).

Every problem is reported as one ``ConfigError`` line naming the key, never a traceback.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway import dburl
from gateway.errors import ConfigError

__all__ = [
    "Config",
    "ServerConfig",
    "SourceConfig",
    "Deadlines",
    "AuthConfig",
    "Issuer",
    "NotifyConfig",
    "PrefetchConfig",
    "notify_origin",
    "load_config",
    "default_config",
    "is_loopback",
]

SOURCE_KINDS = ("filesystem", "dicomweb", "dimse")
_DEFAULT_INTERVAL = 300.0
_COMMON_KEYS = {"name", "kind", "interval", "priority"}
_DEADLINE_KEYS = {"connect_timeout", "timeout", "total_timeout"}
_KEYS = {
    "filesystem": _COMMON_KEYS | {"path", "watch"},
    "dicomweb": _COMMON_KEYS | _DEADLINE_KEYS | {"url", "headers", "max_answer_bytes"},
    "dimse": _COMMON_KEYS
    | _DEADLINE_KEYS
    | {"host", "port", "called_ae", "calling_ae", "retrieve", "move_destination_port"}
    | {"move_source_ae", "move_listen_host", "max_instance_bytes", "prefetch", "ian_port"},
}


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    # Where users reach the gateway (https://imaging.example): study link URLs are built from it,
    # never from a request's Host header. None: http://host:port as bound.
    public_url: str | None = None
    # Reverse proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (addresses or
    # networks); from anyone else those headers are ignored.
    trusted_proxies: tuple[str, ...] = ()
    hsts_seconds: int = 0  # Strict-Transport-Security max-age on https answers (0: not sent)

    @property
    def base_url(self) -> str:
        """The gateway's public origin, without a trailing slash."""
        if self.public_url:
            return self.public_url
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class Deadlines:
    """Every upstream call has a deadline: to connect, for each message (a chunk, a reply), and
    for a whole exchange (a stream of "pending" replies or slow chunks does not reset it)."""

    connect: float = 5.0
    message: float = 30.0
    total: float = 600.0


@dataclass(frozen=True)
class SourceConfig:
    name: str
    kind: str
    path: Path | None = None  # filesystem
    url: str | None = None  # dicomweb: base URL of the upstream DICOMweb service
    headers: tuple[tuple[str, str], ...] = ()  # dicomweb: sent with every request (Authorization)
    # dicomweb: the largest JSON answer (a QIDO page, a series' /metadata) read at harvest. 64 MiB
    # holds the metadata of a 3,000-image CT series (~10 KB of JSON each) twice over, and bounds
    # what a hostile or broken upstream can make one harvest hold (parsed, several times that).
    max_answer_bytes: int = 64 * 1024 * 1024
    host: str | None = None  # dimse: the PACS's address, port and AE titles
    port: int = 104
    called_ae: str = "ANY-SCP"
    calling_ae: str = "GATEWAY"
    retrieve: str = "c-get"  # dimse: "c-get", or "c-move" to an in-process Storage SCP
    move_destination_port: int | None = None  # dimse c-move: where the PACS sends (as calling_ae)
    # dimse c-move: the AE title the PACS stores from (None: called_ae; some PACS send as another),
    # and the address the Storage SCP listens on (None: the local address that reaches the PACS).
    move_source_ae: str | None = None
    move_listen_host: str | None = None
    # dimse: where our Instance Availability Notification SCP listens (PS3.4 Annex R), on the
    # address move_listen_host names, for the PACS calling as called_ae or move_source_ae. None:
    # no notification is taken, the source is asked again every interval only.
    ian_port: int | None = None
    # dimse: the largest instance received (C-GET or C-MOVE), refused before it is buffered. Received
    # instances are held in memory, two copies while one arrives (measured: a 128 MiB instance
    # added 259 MiB at peak): 1 GiB holds any CT, MR, CR, mammography and most cine and
    # tomosynthesis objects, and bounds what one retrieval (or a hostile sender) makes the
    # process hold. Whole-slide images or long cine runs need more.
    max_instance_bytes: int = 1024 * 1024 * 1024
    interval: float = _DEFAULT_INTERVAL
    # filesystem: harvest what the kernel says changed at once, the interval's full scan kept as
    # the safety net (false: the interval alone, e.g. a network mount written by other hosts)
    watch: bool = True
    # dimse: warm the relevant priors this source holds when a new study of their patient is
    # announced ([prefetch]; gateway.prefetch)
    prefetch: bool = False
    priority: int = 0  # lower is tried first when an instance has several locations
    deadlines: Deadlines = field(default_factory=Deadlines)


@dataclass(frozen=True)
class Issuer:
    """An OpenID Connect issuer whose bearer JWTs are accepted (PSC for professionals, the
    portal for patients). Roles and identifiers are read from the configured claims."""

    issuer: str
    audience: str
    jwks_url: str | None = None
    jwks_file: Path | None = None
    # The role of this issuer's tokens: "professional", "patient", or "system": software (an EHR,
    # a RIS) with its own credentials, an OAuth 2.0 client-credentials token (RFC 6749 4.4) whose
    # subject is the client (RFC 9068 2.2), acting for the organization the token names.
    role: str = "professional"
    id_claim: str = "sub"  # the professional's id (RPPS) or the patient's subject
    ins_claim: str = "ins"  # patients: their INS
    organization_claim: str = "organization"  # professionals: their organization (FINESS)
    roles_claim: str = "roles"  # a list (or string) of role names in the token
    emergency_roles: tuple[str, ...] = ()  # role names that may open emergency access
    leeway: float = 30.0  # seconds of clock skew allowed on exp / nbf / iat
    # System issuers: the professional issuer whose organization identifiers this one's
    # organization claims are (a patient's grant to "org:<that issuer>|<FINESS>" then reaches the
    # organization's software too); None: its own.
    organizations_of: str | None = None


@dataclass(frozen=True)
class AuthConfig:
    open: bool = False  # no authentication at all: everyone sees everything (demo only)
    open_beyond_loopback: bool = False  # let an open gateway listen on other than loopback
    issuers: tuple[Issuer, ...] = ()
    emergency_minutes: float = 240.0  # how long an emergency access lasts
    session_minutes: float = 30.0  # a study link's session cookie lifetime (at most the link's)
    max_link_days: float = 90.0  # the longest expires_in a link may ask for
    cors_origins: tuple[str, ...] = ()  # viewer origins allowed to call the gateway


@dataclass(frozen=True)
class NotifyConfig:
    """Subscriptions (``gateway.notify``): where notifications may go, and how hard to try.
    Endpoints are addresses a client chose: only the origins listed here are delivered to."""

    # "https://ehr.example:443", "mllp://ris.example:2575": scheme, host and port, exactly.
    allowed_origins: tuple[str, ...] = ()
    deadline: float = 5.0  # seconds for one delivery attempt (connect, send, acknowledgement)
    max_backoff: float = 300.0  # seconds between retries at most (doubling from ``first_retry``)
    first_retry: float = 1.0  # seconds before the first retry of a failed delivery
    interval: float = 1.0  # seconds between the worker's passes over the feed and the outbox
    keep_days: float = 7.0  # settled outbox rows older than this are pruned (0: kept forever)


@dataclass(frozen=True)
class PrefetchConfig:
    """[prefetch] (``gateway.prefetch``): what a new study's announcement warms on the sources
    with ``prefetch = true``, and its bounds."""

    priors: int = 2  # the best relevant priors warmed, as many as Invoke Image Display opens
    max_instances: int = 1000  # instances retrieved for one new study, all its priors together
    # only a study dated within this many days of today is new (a first harvest of an archive
    # announces its whole history: that is not a patient arriving)
    within_days: int = 7
    timeout: float = 300.0  # seconds for one series' retrieval


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    registry_url: str
    sources: tuple[SourceConfig, ...]
    embedded: bool = False
    origin: str = "embedded default"
    notes: tuple[str, ...] = field(default=())
    auth: AuthConfig = field(default_factory=AuthConfig)
    access_url: str = ""  # grants, links, audit: never rebuilt (see access_database)
    data_dir_override: Path | None = None  # [registry] data_dir
    # [changes] quiet_seconds: a study is announced once no instance of it arrived for this long
    changes_quiet: float = 1.0
    # [changes] keep_days: events older than this are pruned once every subscription has them
    # (0: kept forever). 30 bounds the feed, which otherwise grows with every harvest, while a
    # reader away for a month still carries on where it stopped, without re-reading the index.
    changes_keep_days: float = 30.0
    notify: NotifyConfig = field(default_factory=NotifyConfig)  # [notify]: subscriptions
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)  # [prefetch]: priors warmed

    @property
    def registry_path(self) -> Path | str:
        """The SQLite file, or the PostgreSQL URL without its password (for messages)."""
        return dburl.sqlite_path(self.registry_url) or dburl.without_password(self.registry_url)

    @property
    def data_dir(self) -> Path:
        """Where the gateway keeps its files (viewer, SQLite access db): the SQLite registry's
        directory, or ``[registry] data_dir`` (default ``data`` beside the configuration)."""
        if self.data_dir_override is not None:
            return self.data_dir_override
        path = self.registry_path
        return path.parent if isinstance(path, Path) else Path("data").resolve()

    @property
    def access_database(self) -> str:
        """Where grants, links and the audit live: ``[access] url``; by default the registry's
        PostgreSQL database (every node must see the same decisions), or ``access.db`` beside a
        SQLite registry."""
        if self.access_url:
            return self.access_url
        if dburl.sqlite_path(self.registry_url) is None:
            return self.registry_url
        return f"{dburl.SQLITE}{self.data_dir / 'access.db'}"


def _fixtures_dir() -> Path:
    # The bundled fixtures live beside the package in a source checkout.
    here = Path(__file__).resolve().parent.parent / "fixtures" / "dicom"
    return here if here.is_dir() else Path.cwd() / "fixtures" / "dicom"


def default_config(env: dict[str, str] | None = None) -> Config:
    """The embedded default: SQLite in a data directory, the bundled fixtures, loopback only."""
    env = dict(os.environ if env is None else env)
    data_dir = Path(env.get("GATEWAY_DATA_DIR", "data")).resolve()
    raw: dict[str, Any] = {
        "registry": {"url": f"{dburl.SQLITE}{data_dir / 'registry.db'}"},
        "sources": [{"name": "fixtures", "kind": "filesystem", "path": str(_fixtures_dir())}],
    }
    # The demo is open (said loudly at start, and noted when not on loopback).
    raw["auth"] = {"open": True}
    config = _build(raw, base=Path.cwd(), env=env, origin="embedded default")
    return replace(config, embedded=True)


def load_config(path: str | Path | None, env: dict[str, str] | None = None) -> Config:
    if path is None:
        return default_config(env)
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot be read ({exc.strerror})") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: not valid TOML ({exc})") from exc
    return _build(
        raw, base=path.resolve().parent, env=dict(os.environ if env is None else env), origin=str(path)
    )


def _build(raw: dict[str, Any], base: Path, env: dict[str, str], origin: str) -> Config:
    known = {"changes", "server", "registry", "sources", "auth", "access", "notify", "prefetch"}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{key}: unknown section (expected one of {', '.join(sorted(known))})")
    server_raw = _table(raw, "server")
    _only(server_raw, "server", {"host", "port", "public_url", "trusted_proxies", "hsts_seconds"})
    host = env.get("GATEWAY_HOST") or _typed(server_raw, "server.host", str, "127.0.0.1")
    port_value: Any = env.get("GATEWAY_PORT") or _typed(server_raw, "server.port", int, 8080)
    try:
        port = int(port_value)
    except ValueError:
        raise ConfigError(f"server.port: {port_value!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"server.port: {port} is outside 0-65535")
    public_url = _typed(server_raw, "server.public_url", str, None)
    if public_url is not None:
        parts = urlsplit(public_url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise ConfigError(
                f"server.public_url: {public_url!r} is not an http(s) origin (https://host[:port][/path])"
            )
        public_url = public_url.rstrip("/")
    proxies = _typed(server_raw, "server.trusted_proxies", list, [])
    for proxy in proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except (TypeError, ValueError):
            raise ConfigError(f"server.trusted_proxies: {proxy!r} is not an address or network") from None
    hsts = _typed(server_raw, "server.hsts_seconds", int, 0)
    if hsts < 0:
        raise ConfigError("server.hsts_seconds: must be 0 (off) or a positive number of seconds")

    registry_raw = _table(raw, "registry")
    _only(registry_raw, "registry", {"url", "data_dir"})
    url = env.get("GATEWAY_REGISTRY_URL") or _typed(registry_raw, "registry.url", str, None)
    if url is None:
        raise ConfigError("registry.url: missing (for example sqlite:///data/registry.db)")
    if problem := dburl.check(url):
        raise ConfigError(f"registry.url: {problem}")
    url = dburl.anchored(url, base)
    data_dir_value = _typed(registry_raw, "registry.data_dir", str, None)
    data_dir = None
    if data_dir_value:
        data_dir = Path(data_dir_value) if Path(data_dir_value).is_absolute() else base / data_dir_value
    elif dburl.sqlite_path(url) is None:
        data_dir = base / "data"

    sources_raw = raw.get("sources", [])
    if not isinstance(sources_raw, list):
        raise ConfigError("sources: must be an array of tables ([[sources]])")
    sources: list[SourceConfig] = []
    for index, item in enumerate(sources_raw):
        sources.append(_source(item, f"sources[{index}]", base, index))
    names = [s.name for s in sources]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"sources: the name {name!r} is used twice")
    access_raw = _table(raw, "access")
    _only(access_raw, "access", {"url"})
    access_url = _typed(access_raw, "access.url", str, "")
    if access_url and (problem := dburl.check(access_url)):
        raise ConfigError(f"access.url: {problem}")
    access_url = dburl.anchored(access_url, base)
    auth = _auth(_table(raw, "auth"), base)
    changes_raw = _table(raw, "changes")
    _only(changes_raw, "changes", {"quiet_seconds", "keep_days"})
    changes_quiet = _seconds(changes_raw, "changes.quiet_seconds", 1.0)
    changes_keep_days = _days(changes_raw, "changes.keep_days", Config.changes_keep_days)
    notify = _notify(_table(raw, "notify"))
    prefetch = _prefetch(_table(raw, "prefetch"))
    notes: tuple[str, ...] = ()
    if auth.open and not is_loopback(host):
        notes = (f"auth.open on {host}: anyone who can reach this address sees every study",)
    return Config(
        ServerConfig(host, port, public_url, tuple(proxies), hsts),
        url,
        tuple(sources),
        origin=origin,
        auth=auth,
        access_url=access_url,
        notes=notes,
        data_dir_override=data_dir,
        changes_quiet=changes_quiet,
        changes_keep_days=changes_keep_days,
        notify=notify,
        prefetch=prefetch,
    )


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` reaches this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_ISSUER_KEYS = {
    "issuer", "audience", "jwks_url", "jwks_file", "role", "id_claim", "ins_claim",
    "organization_claim", "roles_claim", "emergency_roles", "leeway", "organizations_of",
}  # fmt: skip
_ROLES = ("professional", "patient", "system")  # of an issuer's tokens


def _auth(table: dict[str, Any], base: Path) -> AuthConfig:
    _only(
        table,
        "auth",
        {"open", "open_beyond_loopback", "issuers", "emergency_minutes", "session_minutes",
         "max_link_days", "cors_origins"},
    )  # fmt: skip
    open_ = table.get("open", False)
    if not isinstance(open_, bool):
        raise ConfigError(f"auth.open: expected true or false, got {open_!r}")
    beyond = table.get("open_beyond_loopback", False)
    if not isinstance(beyond, bool):
        raise ConfigError(f"auth.open_beyond_loopback: expected true or false, got {beyond!r}")
    issuers_raw = table.get("issuers", [])
    if not isinstance(issuers_raw, list):
        raise ConfigError("auth.issuers: must be an array of tables ([[auth.issuers]])")
    issuers = tuple(_issuer(item, f"auth.issuers[{i}]", base) for i, item in enumerate(issuers_raw))
    if not open_ and not issuers:
        raise ConfigError(
            "auth: no issuer configured; add [[auth.issuers]] (OpenID Connect), or set auth.open = true "
            "for a demo without authentication"
        )
    professionals = {i.issuer for i in issuers if i.role == "professional"}
    for i, item in enumerate(issuers):
        if item.organizations_of is not None and item.organizations_of not in professionals:
            raise ConfigError(
                f"auth.issuers[{i}].organizations_of: {item.organizations_of!r} is not a configured "
                "professional issuer"
            )
    origins = _typed(table, "auth.cors_origins", list, [])
    if not all(isinstance(origin, str) for origin in origins):
        raise ConfigError("auth.cors_origins: expected a list of origins (https://viewer.example)")
    return AuthConfig(
        open=open_,
        open_beyond_loopback=beyond,
        issuers=issuers,
        emergency_minutes=_seconds(table, "auth.emergency_minutes", AuthConfig.emergency_minutes),
        session_minutes=_seconds(table, "auth.session_minutes", AuthConfig.session_minutes),
        max_link_days=_seconds(table, "auth.max_link_days", AuthConfig.max_link_days),
        cors_origins=tuple(origin.rstrip("/") for origin in origins),
    )


def _issuer(item: Any, where: str, base: Path) -> Issuer:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: must be a table")
    _only(item, where, _ISSUER_KEYS)
    issuer = _typed(item, f"{where}.issuer", str, None)
    audience = _typed(item, f"{where}.audience", str, None)
    if not issuer or not audience:
        raise ConfigError(f"{where}: issuer and audience are both needed")
    jwks_url = _typed(item, f"{where}.jwks_url", str, None)
    jwks_file = _typed(item, f"{where}.jwks_file", str, None)
    if (jwks_url is None) == (jwks_file is None):
        raise ConfigError(f"{where}: give one of jwks_url (the issuer's keys) or jwks_file (offline)")
    role = _typed(item, f"{where}.role", str, "professional")
    if role not in _ROLES:
        raise ConfigError(f"{where}.role: {role!r} is not one of {', '.join(_ROLES)}")
    organizations_of = _typed(item, f"{where}.organizations_of", str, None)
    if organizations_of is not None and role != "system":
        raise ConfigError(f'{where}.organizations_of: only for a system issuer (role = "system")')
    emergency = _typed(item, f"{where}.emergency_roles", list, [])
    strings = {key: _typed(item, f"{where}.{key}", str, getattr(Issuer, key)) for key in (
        "id_claim", "ins_claim", "organization_claim", "roles_claim")}  # fmt: skip
    file_path = None
    if jwks_file is not None:
        file_path = Path(jwks_file) if Path(jwks_file).is_absolute() else base / jwks_file
    return Issuer(
        issuer=issuer,
        audience=audience,
        jwks_url=jwks_url,
        jwks_file=file_path,
        role=role,
        emergency_roles=tuple(str(name) for name in emergency),
        leeway=float(_typed(item, f"{where}.leeway", (int, float), 30.0)),
        organizations_of=organizations_of,
        **strings,
    )


def notify_origin(url: str) -> str | None:
    """The origin a notification endpoint is delivered to, as ``allowed_origins`` names it
    (``scheme://host:port``, the port always given), or None when ``url`` is not an http(s) or
    mllp address without credentials."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    default = {"http": 80, "https": 443}.get(parts.scheme)
    if parts.scheme not in ("http", "https", "mllp") or not parts.hostname or "@" in parts.netloc:
        return None
    port = port or default
    if port is None:  # mllp has no default port
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host.lower()}:{port}"


def _notify(table: dict[str, Any]) -> NotifyConfig:
    keys = {"allowed_origins", "deadline", "max_backoff", "first_retry", "interval", "keep_days"}
    _only(table, "notify", keys)
    origins = _typed(table, "notify.allowed_origins", list, [])
    allowed = []
    for origin in origins:
        found = notify_origin(origin) if isinstance(origin, str) else None
        if found is None or urlsplit(origin).path.strip("/"):
            raise ConfigError(
                f"notify.allowed_origins: {origin!r} is not an origin (https://host:port or mllp://host:port)"
            )
        allowed.append(found)
    return NotifyConfig(
        allowed_origins=tuple(allowed),
        deadline=_seconds(table, "notify.deadline", NotifyConfig.deadline),
        max_backoff=_seconds(table, "notify.max_backoff", NotifyConfig.max_backoff),
        first_retry=_seconds(table, "notify.first_retry", NotifyConfig.first_retry),
        interval=_seconds(table, "notify.interval", NotifyConfig.interval),
        keep_days=_days(table, "notify.keep_days", NotifyConfig.keep_days),
    )


_MAX_PRIORS = 5  # as Invoke Image Display's ``priors``


def _prefetch(table: dict[str, Any]) -> PrefetchConfig:
    _only(table, "prefetch", {"priors", "max_instances", "within_days", "timeout"})
    priors = _typed(table, "prefetch.priors", int, PrefetchConfig.priors)
    if not 1 <= priors <= _MAX_PRIORS:
        raise ConfigError(f"prefetch.priors: an integer from 1 to {_MAX_PRIORS} is required")
    most = _typed(table, "prefetch.max_instances", int, PrefetchConfig.max_instances)
    if most <= 0:
        raise ConfigError("prefetch.max_instances: must be a positive number of instances")
    days = _typed(table, "prefetch.within_days", int, PrefetchConfig.within_days)
    if days < 0:
        raise ConfigError("prefetch.within_days: must be 0 (today only) or a positive number of days")
    return PrefetchConfig(
        priors=priors,
        max_instances=most,
        within_days=days,
        timeout=_seconds(table, "prefetch.timeout", PrefetchConfig.timeout),
    )


def _source(item: Any, where: str, base: Path, index: int) -> SourceConfig:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: must be a table")
    name = _typed(item, f"{where}.name", str, None)
    if not name:
        raise ConfigError(f"{where}.name: missing")
    kind = _typed(item, f"{where}.kind", str, None)
    if kind not in SOURCE_KINDS:
        raise ConfigError(f"{where}.kind: {kind!r} is not one of {', '.join(SOURCE_KINDS)}")
    if "prefetch" in item and kind != "dimse":
        # Prefetch warms what a source learns on retrieve (a DIMSE PACS's headers) and its
        # in-memory cache: a folder or a DICOMweb PACS answers at once with everything.
        raise ConfigError(f"{where}.prefetch: only a dimse source prefetches (it learns on retrieve)")
    _only(item, where, _KEYS[kind])
    interval = _typed(item, f"{where}.interval", (int, float), _DEFAULT_INTERVAL)
    if interval <= 0:
        raise ConfigError(f"{where}.interval: must be a positive number of seconds")
    priority = _typed(item, f"{where}.priority", int, index)
    common = {"name": name, "kind": kind, "interval": float(interval), "priority": priority}
    if kind == "filesystem":
        path_value = _typed(item, f"{where}.path", str, None)
        if not path_value:
            raise ConfigError(f"{where}.path: missing (the folder to index)")
        path = Path(path_value)
        watch = item.get("watch", True)
        if not isinstance(watch, bool):
            raise ConfigError(f"{where}.watch: expected true or false, got {type(watch).__name__} {watch!r}")
        return SourceConfig(**common, path=path if path.is_absolute() else base / path, watch=watch)
    deadlines = Deadlines(
        connect=_seconds(item, f"{where}.connect_timeout", Deadlines.connect),
        message=_seconds(item, f"{where}.timeout", Deadlines.message),
        total=_seconds(item, f"{where}.total_timeout", Deadlines.total),
    )
    if kind == "dimse":
        return _dimse(item, where, common, deadlines)
    url = _typed(item, f"{where}.url", str, None)
    if not url or not url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}.url: missing or not an http(s) URL (the upstream DICOMweb base)")
    if "@" in urlsplit(url).netloc:
        raise ConfigError(f"{where}.url: credentials in the URL; give them in {where}.headers")
    headers = _typed(item, f"{where}.headers", dict, {})
    for key, value in headers.items():
        if not isinstance(value, str):
            raise ConfigError(f"{where}.headers.{key}: expected a string")
    max_answer = _typed(item, f"{where}.max_answer_bytes", int, SourceConfig.max_answer_bytes)
    if max_answer <= 0:
        raise ConfigError(f"{where}.max_answer_bytes: must be a positive number of bytes")
    return SourceConfig(
        **common,
        url=url.rstrip("/"),
        headers=tuple(headers.items()),
        deadlines=deadlines,
        max_answer_bytes=max_answer,
    )


def _dimse(item: dict[str, Any], where: str, common: dict[str, Any], deadlines: Deadlines) -> SourceConfig:
    host = _typed(item, f"{where}.host", str, None)
    if not host:
        raise ConfigError(f"{where}.host: missing (the PACS's address)")
    port = _typed(item, f"{where}.port", int, 104)
    called = _typed(item, f"{where}.called_ae", str, "ANY-SCP")
    calling = _typed(item, f"{where}.calling_ae", str, "GATEWAY")
    source_ae = _typed(item, f"{where}.move_source_ae", str, called)
    for key, title in (("called_ae", called), ("calling_ae", calling), ("move_source_ae", source_ae)):
        if not 0 < len(title) <= 16 or "\\" in title:
            raise ConfigError(f"{where}.{key}: {title!r} is not an AE title (1 to 16 characters)")
    retrieve = _typed(item, f"{where}.retrieve", str, "c-get")
    if retrieve not in ("c-get", "c-move"):
        raise ConfigError(f"{where}.retrieve: {retrieve!r} is not c-get or c-move")
    move_port = _typed(item, f"{where}.move_destination_port", int, None)
    if retrieve == "c-move" and move_port is None:
        raise ConfigError(f"{where}.move_destination_port: needed for c-move (where the PACS sends)")
    ian_port = _typed(item, f"{where}.ian_port", int, None)
    for key, number in (("port", port), ("move_destination_port", move_port), ("ian_port", ian_port)):
        if number is not None and not 0 < number <= 65535:
            raise ConfigError(f"{where}.{key}: {number} is outside 1-65535")
    if ian_port is not None and ian_port == move_port:
        # Two listeners with other lifetimes and bounds (an instance, a notification) on one address.
        raise ConfigError(f"{where}.ian_port: {ian_port} is move_destination_port too; give another")
    listen = _typed(item, f"{where}.move_listen_host", str, None)
    if listen is not None:
        try:
            ipaddress.ip_address(listen)
        except ValueError:
            raise ConfigError(f"{where}.move_listen_host: {listen!r} is not an IP address") from None
    max_instance = _typed(item, f"{where}.max_instance_bytes", int, SourceConfig.max_instance_bytes)
    if max_instance <= 0:
        raise ConfigError(f"{where}.max_instance_bytes: must be a positive number of bytes")
    prefetch = item.get("prefetch", False)
    if not isinstance(prefetch, bool):
        raise ConfigError(f"{where}.prefetch: expected true or false, got {prefetch!r}")
    return SourceConfig(
        **common,
        host=host,
        port=port,
        called_ae=called,
        calling_ae=calling,
        retrieve=retrieve,
        move_destination_port=move_port,
        move_source_ae=source_ae,
        move_listen_host=listen,
        max_instance_bytes=max_instance,
        prefetch=prefetch,
        ian_port=ian_port,
        deadlines=deadlines,
    )


def _seconds(table: dict[str, Any], key: str, default: float) -> float:
    value = _typed(table, key, (int, float), default)
    if value <= 0:
        raise ConfigError(f"{key}: must be a positive number of seconds")
    return float(value)


_MAX_KEEP_DAYS = 36_500.0  # a hundred years: past it, a typo rather than a retention


def _days(table: dict[str, Any], key: str, default: float) -> float:
    """A retention in days: 0 keeps forever."""
    value = _typed(table, key, (int, float), default)
    if not 0 <= value <= _MAX_KEEP_DAYS:
        raise ConfigError(f"{key}: must be a number of days from 0 (kept forever) to {_MAX_KEEP_DAYS:g}")
    return float(value)


def _table(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a table ([{key}])")
    return value


def _only(table: dict[str, Any], where: str, allowed: set[str]) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{where}.{key}: unknown key (expected one of {', '.join(sorted(allowed))})")


def _typed(table: dict[str, Any], key: str, kind: Any, default: Any) -> Any:
    name = key.rsplit(".", 1)[-1]
    if name not in table:
        return default
    value = table[name]
    if isinstance(value, bool) or not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else "number"
        raise ConfigError(f"{key}: expected {expected}, got {type(value).__name__} {value!r}")
    return value
