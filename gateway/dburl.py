"""Database URLs, understood in one place: ``sqlite:///PATH`` (the embedded default) or
``postgresql://[USER[:PASSWORD]@]HOST[:PORT]/DATABASE`` (``postgres://`` too, as libpq accepts).

The configuration, the database layer and the backup all ask this module which kind a URL is and
where it points, so a new spelling is taught once.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["SQLITE", "sqlite_path", "is_postgresql", "check", "anchored", "without_password"]

SQLITE = "sqlite:///"
_POSTGRESQL = ("postgresql://", "postgres://")
EXPECTED = "sqlite:///PATH or postgresql://HOST/DATABASE"


def sqlite_path(url: str) -> Path | None:
    """The SQLite file a URL names, or None for any other URL."""
    return Path(url.removeprefix(SQLITE)) if url.startswith(SQLITE) else None


def is_postgresql(url: str) -> bool:
    return url.startswith(_POSTGRESQL)


def check(url: str) -> str | None:
    """None when the URL is one we can open, else what is wrong with it (for a message)."""
    if sqlite_path(url) is not None or is_postgresql(url):
        return None
    return f"{url!r} is not {EXPECTED}"


def anchored(url: str, base: Path) -> str:
    """A SQLite URL with a relative path made relative to ``base`` (the configuration's folder);
    any other URL as it is."""
    path = sqlite_path(url)
    if path is None or path.is_absolute():
        return url
    return f"{SQLITE}{base / path}"


def without_password(url: str) -> str:
    """The URL as it may appear in a message or a log line."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)
