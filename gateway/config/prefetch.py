"""[prefetch]: which priors a new study's announcement warms, and its bounds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.config.values import only, seconds, typed
from gateway.errors import ConfigError

__all__ = ["PrefetchConfig", "read_prefetch"]


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


_MAX_PRIORS = 5  # as Invoke Image Display's ``priors``


def read_prefetch(table: dict[str, Any]) -> PrefetchConfig:
    only(table, "prefetch", {"priors", "max_instances", "within_days", "timeout"})
    priors = typed(table, "prefetch.priors", int, PrefetchConfig.priors)
    if not 1 <= priors <= _MAX_PRIORS:
        raise ConfigError(f"prefetch.priors: an integer from 1 to {_MAX_PRIORS} is required")
    most = typed(table, "prefetch.max_instances", int, PrefetchConfig.max_instances)
    if most <= 0:
        raise ConfigError("prefetch.max_instances: must be a positive number of instances")
    days = typed(table, "prefetch.within_days", int, PrefetchConfig.within_days)
    if days < 0:
        raise ConfigError("prefetch.within_days: must be 0 (today only) or a positive number of days")
    return PrefetchConfig(
        priors=priors,
        max_instances=most,
        within_days=days,
        timeout=seconds(table, "prefetch.timeout", PrefetchConfig.timeout),
    )
