"""[notify]: where subscriptions' notifications may be delivered, and how hard to try."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from gateway.config.values import days, only, seconds, typed
from gateway.errors import ConfigError

__all__ = ["NotifyConfig", "notify_origin", "read_notify"]


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


def read_notify(table: dict[str, Any]) -> NotifyConfig:
    keys = {"allowed_origins", "deadline", "max_backoff", "first_retry", "interval", "keep_days"}
    only(table, "notify", keys)
    origins = typed(table, "notify.allowed_origins", list, [])
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
        deadline=seconds(table, "notify.deadline", NotifyConfig.deadline),
        max_backoff=seconds(table, "notify.max_backoff", NotifyConfig.max_backoff),
        first_retry=seconds(table, "notify.first_retry", NotifyConfig.first_retry),
        interval=seconds(table, "notify.interval", NotifyConfig.interval),
        keep_days=days(table, "notify.keep_days", NotifyConfig.keep_days),
    )
