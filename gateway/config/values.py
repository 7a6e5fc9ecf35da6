"""The typed readers every section of the configuration is read with.

Each names the offending key in its ``ConfigError`` (``sources[0].port: expected int, got str '104'``),
so a mistake is one line, never a traceback.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import ConfigError

__all__ = ["section", "only", "typed", "seconds", "days"]


def seconds(table: dict[str, Any], key: str, default: float) -> float:
    value = typed(table, key, (int, float), default)
    if value <= 0:
        raise ConfigError(f"{key}: must be a positive number of seconds")
    return float(value)


_MAX_KEEP_DAYS = 36_500.0  # a hundred years: past it, a typo rather than a retention


def days(table: dict[str, Any], key: str, default: float) -> float:
    """A retention in days: 0 keeps forever."""
    value = typed(table, key, (int, float), default)
    if not 0 <= value <= _MAX_KEEP_DAYS:
        raise ConfigError(f"{key}: must be a number of days from 0 (kept forever) to {_MAX_KEEP_DAYS:g}")
    return float(value)


def section(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a table ([{key}])")
    return value


def only(table: dict[str, Any], where: str, allowed: set[str]) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{where}.{key}: unknown key (expected one of {', '.join(sorted(allowed))})")


def typed(table: dict[str, Any], key: str, kind: Any, default: Any) -> Any:
    name = key.rsplit(".", 1)[-1]
    if name not in table:
        return default
    value = table[name]
    if isinstance(value, bool) or not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else "number"
        raise ConfigError(f"{key}: expected {expected}, got {type(value).__name__} {value!r}")
    return value
