"""[[sources]]: where the gateway's studies come from (a folder, a DICOMweb PACS, a DIMSE PACS),
and the deadlines of every upstream call."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.config.values import only, seconds, typed
from gateway.errors import ConfigError

__all__ = ["SOURCE_KINDS", "Deadlines", "SourceConfig", "read_source"]

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


def read_source(item: Any, where: str, base: Path, index: int) -> SourceConfig:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: must be a table")
    name = typed(item, f"{where}.name", str, None)
    if not name:
        raise ConfigError(f"{where}.name: missing")
    kind = typed(item, f"{where}.kind", str, None)
    if kind not in SOURCE_KINDS:
        raise ConfigError(f"{where}.kind: {kind!r} is not one of {', '.join(SOURCE_KINDS)}")
    if "prefetch" in item and kind != "dimse":
        # Prefetch warms what a source learns on retrieve (a DIMSE PACS's headers) and its
        # in-memory cache: a folder or a DICOMweb PACS answers at once with everything.
        raise ConfigError(f"{where}.prefetch: only a dimse source prefetches (it learns on retrieve)")
    only(item, where, _KEYS[kind])
    interval = typed(item, f"{where}.interval", (int, float), _DEFAULT_INTERVAL)
    if interval <= 0:
        raise ConfigError(f"{where}.interval: must be a positive number of seconds")
    priority = typed(item, f"{where}.priority", int, index)
    common = {"name": name, "kind": kind, "interval": float(interval), "priority": priority}
    if kind == "filesystem":
        path_value = typed(item, f"{where}.path", str, None)
        if not path_value:
            raise ConfigError(f"{where}.path: missing (the folder to index)")
        path = Path(path_value)
        watch = item.get("watch", True)
        if not isinstance(watch, bool):
            raise ConfigError(f"{where}.watch: expected true or false, got {type(watch).__name__} {watch!r}")
        return SourceConfig(**common, path=path if path.is_absolute() else base / path, watch=watch)
    deadlines = Deadlines(
        connect=seconds(item, f"{where}.connect_timeout", Deadlines.connect),
        message=seconds(item, f"{where}.timeout", Deadlines.message),
        total=seconds(item, f"{where}.total_timeout", Deadlines.total),
    )
    if kind == "dimse":
        return _dimse(item, where, common, deadlines)
    url = typed(item, f"{where}.url", str, None)
    if not url or not url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}.url: missing or not an http(s) URL (the upstream DICOMweb base)")
    if "@" in urlsplit(url).netloc:
        raise ConfigError(f"{where}.url: credentials in the URL; give them in {where}.headers")
    headers = typed(item, f"{where}.headers", dict, {})
    for key, value in headers.items():
        if not isinstance(value, str):
            raise ConfigError(f"{where}.headers.{key}: expected a string")
    max_answer = typed(item, f"{where}.max_answer_bytes", int, SourceConfig.max_answer_bytes)
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
    host = typed(item, f"{where}.host", str, None)
    if not host:
        raise ConfigError(f"{where}.host: missing (the PACS's address)")
    port = typed(item, f"{where}.port", int, 104)
    called = typed(item, f"{where}.called_ae", str, "ANY-SCP")
    calling = typed(item, f"{where}.calling_ae", str, "GATEWAY")
    source_ae = typed(item, f"{where}.move_source_ae", str, called)
    for key, title in (("called_ae", called), ("calling_ae", calling), ("move_source_ae", source_ae)):
        if not 0 < len(title) <= 16 or "\\" in title:
            raise ConfigError(f"{where}.{key}: {title!r} is not an AE title (1 to 16 characters)")
    retrieve = typed(item, f"{where}.retrieve", str, "c-get")
    if retrieve not in ("c-get", "c-move"):
        raise ConfigError(f"{where}.retrieve: {retrieve!r} is not c-get or c-move")
    move_port = typed(item, f"{where}.move_destination_port", int, None)
    if retrieve == "c-move" and move_port is None:
        raise ConfigError(f"{where}.move_destination_port: needed for c-move (where the PACS sends)")
    ian_port = typed(item, f"{where}.ian_port", int, None)
    for key, number in (("port", port), ("move_destination_port", move_port), ("ian_port", ian_port)):
        if number is not None and not 0 < number <= 65535:
            raise ConfigError(f"{where}.{key}: {number} is outside 1-65535")
    if ian_port is not None and ian_port == move_port:
        # Two listeners with other lifetimes and bounds (an instance, a notification) on one address.
        raise ConfigError(f"{where}.ian_port: {ian_port} is move_destination_port too; give another")
    listen = typed(item, f"{where}.move_listen_host", str, None)
    if listen is not None:
        try:
            ipaddress.ip_address(listen)
        except ValueError:
            raise ConfigError(f"{where}.move_listen_host: {listen!r} is not an IP address") from None
    max_instance = typed(item, f"{where}.max_instance_bytes", int, SourceConfig.max_instance_bytes)
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
