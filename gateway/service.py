"""Wiring: a configuration becomes a registry, its sources, and the harvest schedule."""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Callable
from concurrent.futures import Executor

import anyio
import anyio.to_thread

from gateway.codec import framemap
from gateway.codec.dicomfile import read_header
from gateway.config import Config, SourceConfig
from gateway.errors import ConfigError, GatewayError
from gateway.registry.harvest import harvest
from gateway.registry.record import build_record
from gateway.registry.store import Registry, SourceStats
from gateway.stream.dicomweb_pacs import DicomwebSource
from gateway.stream.dimse.source import DimseSource
from gateway.stream.federation import Federation
from gateway.stream.folder import FolderSource
from gateway.stream.source import Source

__all__ = ["Gateway", "make_source"]

log = logging.getLogger("gateway")


def make_source(
    config: SourceConfig,
    learn: Callable[[str, bytes], None] | None = None,
    changed: Callable[[str], None] | None = None,
) -> Source:
    """The source a configuration names, given the callbacks its kind takes: ``learn`` (a source
    whose search answers are partial: an instance's path and bytes, the first time it comes) and
    ``changed`` (a folder: the path of a file found changed since it was indexed)."""
    if config.kind == "filesystem" and config.path is not None:
        return FolderSource(config.name, config.path, changed=changed)
    if config.kind == "dicomweb":
        return DicomwebSource(config)
    if config.kind == "dimse":
        return DimseSource(config, learn=learn)
    raise ConfigError(f"sources.{config.name}.kind: {config.kind!r} is not supported")


class Gateway:
    def __init__(self, config: Config, registry: Registry | None = None) -> None:
        self.config = config
        self.registry = registry or Registry(config.registry_url)
        self.registry.ranks = {s.name: s.priority for s in config.sources}
        # Folders get no ``changed`` yet: a file found changed is refused (502) until the source's
        # next scheduled harvest indexes it again.
        self.sources: dict[str, Source] = {
            s.name: make_source(s, learn=functools.partial(self._learn, s.name)) for s in config.sources
        }
        self.federation = Federation(self.sources, {s.name: s.priority for s in config.sources})

    def _learn(self, source: str, path: str, data: bytes) -> None:
        """Index what an instance received from a remote source says about itself."""
        try:
            ds, pixel = read_header(io.BytesIO(data))
            record = build_record(ds, pixel)
        except GatewayError as exc:
            log.warning("source %s: instance at %s cannot be indexed: %s", source, path, exc.message)
            return
        # The source checks what it received against what it asked for; this holds whatever a
        # source does: a record is learnt only under the UIDs of its own location.
        if record.uids != tuple(path.strip("/").split("/")[1::2]):  # studies/S/series/SE/instances/I
            log.warning(
                "source %s: the instance at %s says it is %s: not learnt", source, path, "/".join(record.uids)
            )
            return
        count = framemap.frame_count(pixel.frames) if pixel and pixel.frames else 0
        syntax = (
            pixel.transfer_syntax if pixel and pixel.transfer_syntax else str(ds.file_meta.TransferSyntaxUID)
        )
        refused = self.registry.learn(source, path, record, syntax, {"remote": count, "bulk": {}})
        if refused:
            log.warning("source %s: what %s sent was not learnt: %s", source, path, refused)

    def harvest(self, name: str, progress=None, executor: Executor | None = None) -> SourceStats | None:
        """Harvest one source; None when another node (or process) is harvesting it right now:
        one harvest per source at a time, whatever the number of nodes on the registry."""
        source = self.sources[name]
        with self.registry.harvesting(name) as mine:
            if not mine:
                log.info("source %s: being harvested by another node; skipped this round", name)
                return None
            # Worker processes parse files; remote sources hand over parsed metadata already.
            pool = executor if source.kind == "filesystem" else None
            return harvest(self.registry, source, progress, pool)

    async def harvest_forever(self, source_config: SourceConfig) -> None:
        """Harvest one source now and then every ``interval`` seconds; errors are logged, the
        loop goes on (the index keeps serving what it had)."""
        while True:
            try:
                await anyio.to_thread.run_sync(self.harvest, source_config.name)
            except GatewayError as exc:
                log.error("source %s: harvest failed: %s", source_config.name, exc.message)
            except Exception:  # keep the schedule alive whatever one run hits
                log.exception("source %s: harvest failed", source_config.name)
            await anyio.sleep(source_config.interval)

    async def aclose(self) -> None:
        for source in self.sources.values():
            await source.aclose()
        self.registry.close()
