"""Wiring: a configuration becomes a registry, its sources, and the harvest schedule."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
import time
from collections.abc import Callable, Collection
from concurrent.futures import Executor

import anyio
import anyio.to_thread

from gateway.codec import framemap
from gateway.codec.dicomfile import read_header
from gateway.config import Config, SourceConfig
from gateway.errors import ConfigError, GatewayError
from gateway.notify.store import SubscriptionStore
from gateway.prefetch import Prefetch, prefetching
from gateway.registry.harvest import harvest
from gateway.registry.record import build_record
from gateway.registry.store import Registry, SourceStats
from gateway.stream.dicomweb_pacs import DicomwebSource
from gateway.stream.dimse.source import DimseSource
from gateway.stream.federation import Federation
from gateway.stream.folder import FolderSource
from gateway.stream.source import Source, Watcher
from gateway.types import Change

__all__ = ["Gateway", "make_source"]

log = logging.getLogger("gateway")

ANNOUNCE_PERIOD = 0.25  # seconds between the announcer's looks for quiet studies (an index probe)
PRUNE_PERIOD = 3600.0  # seconds between retention passes over the change feed and the outbox
_DAY = 86400.0


def make_source(
    config: SourceConfig,
    learn: Callable[[str, bytes], None] | None = None,
    changed: Callable[[str], None] | None = None,
) -> Source:
    """The source a configuration names, given the callbacks its kind takes: ``learn`` (a source
    whose search answers are partial: an instance's path and bytes, the first time it comes) and
    ``changed`` (a folder: the path of a file found changed since it was indexed)."""
    if config.kind == "filesystem" and config.path is not None:
        return FolderSource(config.name, config.path, changed=changed, watch=config.watch)
    if config.kind == "dicomweb":
        return DicomwebSource(config)
    if config.kind == "dimse":
        return DimseSource(config, learn=learn)
    raise ConfigError(f"sources.{config.name}.kind: {config.kind!r} is not supported")


# More changed paths than this before a harvest starts: list the whole folder instead (a bulk
# copy; one walk then costs less than as many lookups, and the set stays bounded).
MAX_CHANGED_PATHS = 10_000
_BUSY_RETRY = 2.0  # seconds before changes are harvested again when another node held the source


class _Pending:
    """What the next harvest of one source must cover: the paths its watcher named since the
    last harvest started, or everything (``full``). Changes that come during a harvest make the
    next one: harvests of a source never overlap, and none is lost."""

    def __init__(self) -> None:
        self.full = True  # the first harvest lists everything
        self.paths: set[str] = set()
        self.ready = anyio.Event()

    def add(self, paths: Collection[str]) -> None:
        if "" in paths or len(self.paths) + len(paths) > MAX_CHANGED_PATHS:
            self.full = True
            self.paths.clear()
        elif not self.full:
            self.paths.update(paths)
        self.ready.set()

    def take(self) -> set[str] | None:
        """The paths to harvest (None: everything), or an empty set when nothing is due."""
        paths = None if self.full else self.paths
        self.full, self.paths, self.ready = False, set(), anyio.Event()
        return paths


class Gateway:
    def __init__(self, config: Config, registry: Registry | None = None) -> None:
        self.config = config
        self.registry = registry or Registry(config.registry_url)
        self.registry.ranks = {s.name: s.priority for s in config.sources}
        # A file a folder finds changed while serving it is refused (502) and harvested again at
        # once (``_changed``), not at the source's next full scan.
        self.sources: dict[str, Source] = {
            s.name: make_source(
                s,
                learn=functools.partial(self._learn, s.name),
                changed=functools.partial(self._changed, s.name),
            )
            for s in config.sources
        }
        # Each harvested source's pending changes and the event loop its schedule runs on.
        self._pending: dict[str, tuple[asyncio.AbstractEventLoop, _Pending]] = {}
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

    def _changed(self, source: str, path: str) -> None:
        """A served file was found changed since it was indexed (called from a reader thread, or
        on the event loop): its source harvests that path at once."""
        found = self._pending.get(source)
        if found is not None:
            loop, pending = found
            with contextlib.suppress(RuntimeError):  # the loop is closed: the gateway is stopping
                loop.call_soon_threadsafe(pending.add, {path})

    def harvest(
        self,
        name: str,
        progress=None,
        executor: Executor | None = None,
        paths: Collection[str] | None = None,
    ) -> SourceStats | None:
        """Harvest one source (``paths``: only those, as its watcher named them); None when
        another node (or process) is harvesting it right now: one harvest per source at a time,
        whatever the number of nodes on the registry."""
        source = self.sources[name]
        with self.registry.harvesting(name) as mine:
            if not mine:
                log.info("source %s: being harvested by another node; skipped this round", name)
                return None
            # Worker processes parse files; remote sources hand over parsed metadata already.
            pool = executor if source.kind == "filesystem" else None
            return harvest(self.registry, source, progress, pool, paths=paths)

    async def harvest_forever(self, source_config: SourceConfig) -> None:
        """Harvest one source now, then whenever its watcher says something changed (only
        that, at once), and all of it every ``interval`` seconds: the safety net, and the only
        schedule of a source that is not watched or whose watcher failed. Errors are logged,
        the loop goes on (the index keeps serving what it had)."""
        name = source_config.name
        watcher = self.sources[name].watch if source_config.watch else None
        pending = _Pending()
        self._pending[name] = (asyncio.get_running_loop(), pending)
        stop = anyio.Event()
        async with anyio.create_task_group() as group:
            if watcher is not None:
                group.start_soon(self._watch, source_config, watcher, pending, stop)
            try:
                await self._harvest_when_due(source_config, pending)
            finally:
                stop.set()

    async def _watch(
        self, config: SourceConfig, watcher: Watcher, pending: _Pending, stop: anyio.Event
    ) -> None:
        try:
            await watcher.watch_changes(pending.add, stop)
        except GatewayError as exc:  # inotify's limits, a folder gone: the interval still holds
            log.warning(
                "source %s: changes are not watched (%s); harvested every %g s instead",
                config.name,
                exc.message,
                config.interval,
            )
        except Exception:
            log.exception(
                "source %s: changes are not watched; harvested every %g s instead",
                config.name,
                config.interval,
            )

    async def _harvest_when_due(self, config: SourceConfig, pending: _Pending) -> None:
        full_at = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= full_at:
                pending.full = True
            elif not pending.ready.is_set():
                with anyio.move_on_after(full_at - now):
                    await pending.ready.wait()
                continue
            paths = pending.take()
            if paths is None:
                full_at = time.monotonic() + config.interval
            elif not paths:
                continue
            try:
                done = await anyio.to_thread.run_sync(
                    functools.partial(self.harvest, config.name, paths=paths)
                )
                if done is None and paths is not None:  # another node holds the source: again soon
                    pending.add(paths)
                    await anyio.sleep(_BUSY_RETRY)
            except GatewayError as exc:
                log.error("source %s: harvest failed: %s", config.name, exc.message)
            except Exception:  # keep the schedule alive whatever one run hits
                log.exception("source %s: harvest failed", config.name)

    def announce(self) -> int:
        """Announce the studies quiet for ``[changes] quiet_seconds`` (the change feed's
        ``study.*`` events); how many were announced."""
        return len(self._announce())

    def _announce(self) -> list[Change]:
        return self.registry.announce(self.config.changes_quiet, time.time())

    async def announce_forever(
        self, period: float = ANNOUNCE_PERIOD, announced: Callable[[], None] | None = None
    ) -> None:
        """Announce quiet studies every ``period`` seconds, calling ``announced`` after a pass
        that announced some (the subscription worker starts delivering at once); errors are
        logged, the loop goes on (what was not announced is announced by a later pass, on this
        node or another). New studies are offered to this node's prefetch (``gateway.prefetch``:
        their priors on sources with ``prefetch = true`` warmed in the background)."""
        prefetch = Prefetch(
            self.config.prefetch, self.registry, self.federation, prefetching(self.config, self.sources)
        )
        async with anyio.create_task_group() as group:
            if prefetch.sources:
                group.start_soon(prefetch.run)
            else:
                prefetch.close()
            while True:
                try:
                    made = await anyio.to_thread.run_sync(self._announce)
                    if made:
                        prefetch.offer(made)  # never blocks
                        if announced is not None:
                            announced()
                except GatewayError as exc:
                    log.error("change feed: announcing failed: %s", exc.message)
                except Exception:  # keep the announcer alive whatever one pass hits
                    log.exception("change feed: announcing failed")
                await anyio.sleep(period)

    def prune(self, subscriptions: SubscriptionStore | None, now: float | None = None) -> tuple[int, int]:
        """One retention pass: the feed's events older than ``[changes] keep_days`` that every
        active subscription has fanned out (its lowest cursor bounds the pruning: none is lost
        to a subscriber), then the outbox's rows settled more than ``[notify] keep_days`` ago.
        Returns (events, outbox rows) deleted; 0 days keeps forever."""
        now = time.time() if now is None else now
        events = rows = 0
        if self.config.changes_keep_days > 0:
            through = subscriptions.lowest_cursor() if subscriptions is not None else None
            events = self.registry.prune_changes(now - self.config.changes_keep_days * _DAY, through)
        if subscriptions is not None and self.config.notify.keep_days > 0:
            rows = subscriptions.prune(now - self.config.notify.keep_days * _DAY)
        if events or rows:
            log.info("retention: %d change feed events and %d outbox rows pruned", events, rows)
        return events, rows

    async def prune_forever(
        self, subscriptions: SubscriptionStore | None, period: float = PRUNE_PERIOD
    ) -> None:
        """A retention pass (``prune``) now and every ``period`` seconds; errors are logged, the
        loop goes on (what was not pruned is by a later pass). Deletions are idempotent: every
        node may run it."""
        while True:
            try:
                await anyio.to_thread.run_sync(self.prune, subscriptions)
            except GatewayError as exc:
                log.error("retention: pruning failed: %s", exc.message)
            except Exception:  # keep the loop alive whatever one pass hits
                log.exception("retention: pruning failed")
            await anyio.sleep(period)

    async def aclose(self) -> None:
        for source in self.sources.values():
            await source.aclose()
        self.registry.close()
