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
from gateway.config.auth import AuthConfig, Issuer, is_loopback, read_auth
from gateway.config.notify import NotifyConfig, notify_origin, read_notify
from gateway.config.prefetch import PrefetchConfig, read_prefetch
from gateway.config.sources import Deadlines, SourceConfig, read_source
from gateway.config.values import days, only, seconds, section, typed
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
    # The bundled fixtures live beside the package in a source checkout (this file is
    # gateway/config/__init__.py).
    here = Path(__file__).resolve().parents[2] / "fixtures" / "dicom"
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
    server_raw = section(raw, "server")
    only(server_raw, "server", {"host", "port", "public_url", "trusted_proxies", "hsts_seconds"})
    host = env.get("GATEWAY_HOST") or typed(server_raw, "server.host", str, "127.0.0.1")
    port_value: Any = env.get("GATEWAY_PORT") or typed(server_raw, "server.port", int, 8080)
    try:
        port = int(port_value)
    except ValueError:
        raise ConfigError(f"server.port: {port_value!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"server.port: {port} is outside 0-65535")
    public_url = typed(server_raw, "server.public_url", str, None)
    if public_url is not None:
        parts = urlsplit(public_url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise ConfigError(
                f"server.public_url: {public_url!r} is not an http(s) origin (https://host[:port][/path])"
            )
        public_url = public_url.rstrip("/")
    proxies = typed(server_raw, "server.trusted_proxies", list, [])
    for proxy in proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except (TypeError, ValueError):
            raise ConfigError(f"server.trusted_proxies: {proxy!r} is not an address or network") from None
    hsts = typed(server_raw, "server.hsts_seconds", int, 0)
    if hsts < 0:
        raise ConfigError("server.hsts_seconds: must be 0 (off) or a positive number of seconds")

    registry_raw = section(raw, "registry")
    only(registry_raw, "registry", {"url", "data_dir"})
    url = env.get("GATEWAY_REGISTRY_URL") or typed(registry_raw, "registry.url", str, None)
    if url is None:
        raise ConfigError("registry.url: missing (for example sqlite:///data/registry.db)")
    if problem := dburl.check(url):
        raise ConfigError(f"registry.url: {problem}")
    url = dburl.anchored(url, base)
    data_dir_value = typed(registry_raw, "registry.data_dir", str, None)
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
        sources.append(read_source(item, f"sources[{index}]", base, index))
    names = [s.name for s in sources]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"sources: the name {name!r} is used twice")
    access_raw = section(raw, "access")
    only(access_raw, "access", {"url"})
    access_url = typed(access_raw, "access.url", str, "")
    if access_url and (problem := dburl.check(access_url)):
        raise ConfigError(f"access.url: {problem}")
    access_url = dburl.anchored(access_url, base)
    auth = read_auth(section(raw, "auth"), base)
    changes_raw = section(raw, "changes")
    only(changes_raw, "changes", {"quiet_seconds", "keep_days"})
    changes_quiet = seconds(changes_raw, "changes.quiet_seconds", 1.0)
    changes_keep_days = days(changes_raw, "changes.keep_days", Config.changes_keep_days)
    notify = read_notify(section(raw, "notify"))
    prefetch = read_prefetch(section(raw, "prefetch"))
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
