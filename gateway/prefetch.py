"""Prefetch: when a new study is announced, warm its patient's relevant priors held on slow DIMSE
sources before anyone opens them (a radiologist reads a new study beside its priors).

A DIMSE PACS answers C-FIND with few attributes (PS3.4 C.4.1.1.3.2): until an instance is
retrieved, its /metadata lacks most of its header, so a viewer's first /metadata of a prior waits
for a C-GET of the whole series, then each frame for a C-GET of its instance. A prefetch does that
retrieval ahead, one C-GET per series (the source's batch retrieval, PS3.4 C.4.3.2.1), and warms:

* the learnt headers (each instance received goes through the source's ``learn``, into the shared
  registry): the prior's /metadata is complete at once, on every node;
* the instances, in the room the source's in-memory cache has spare: first frames at memory
  speed, on this node only. A batch never evicts what a viewer is reading
  (``DimseSource._remember``, ``spare``).

Which priors: the ``[prefetch] priors`` best relevant priors of the new study
(``gateway.registry.priors.best_priors``, those Invoke Image Display opens beside it: the same
modality or body region), and of those, the instances whose preferred location (the federation's
first choice, where a viewer would read them) is on a source with ``prefetch = true``; what a
folder or a faster source serves needs no warming.

When: on a ``study.available`` event (the announcer's, once the study is quiet; ``study.updated``
does not warm again) of a study dated within ``within_days`` of today: the first harvest of an
archive announces its whole history, and those are not patients arriving. A prior warmed within
``_WARM_FOR`` seconds is not warmed again for another new study.

Bounds: at most ``max_instances`` instances for one new study, counted before any retrieval (a
C-FIND answer gives no sizes, so bytes cannot be bounded beforehand; the cache bounds what is
kept); one retrieval per source at a time; ``timeout`` seconds for each series, besides the
source's own deadlines; at most ``_QUEUE`` new studies waiting (more are dropped, with a log line).
``offer`` never blocks the announcer, retrievals run in their own tasks and never in a request's
way, and a failure is logged and forgotten.

Consent: prefetch decides nothing about access. It reads the registry unrestricted (warming is not
showing) and every request is still decided by the policy. It writes no audit record (nobody
accessed anything); each prior warmed is one log line naming study UIDs, never the patient.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import date, timedelta

import anyio
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from gateway.config import Config, PrefetchConfig
from gateway.errors import GatewayError, SourceError
from gateway.registry.history import study_summaries
from gateway.registry.priors import best_priors
from gateway.registry.store import Registry
from gateway.stream.federation import Federation
from gateway.stream.source import Source
from gateway.types import Change, InstanceFile

__all__ = ["Prefetch", "Warming", "plan", "prefetching"]

log = logging.getLogger("gateway.prefetch")

_QUEUE = 100  # new studies waiting to be planned; more are dropped
_LANE = 20  # priors waiting for one source's retrievals; more are dropped
_WARM_FOR = 600.0  # seconds a warmed prior is not warmed again (another new study of its patient)
_MAX_WARMED = 10_000  # priors remembered as warmed


@dataclass(frozen=True)
class Warming:
    """What one prior needs from one source: its runs of instances, one series each, in the
    order a viewer reads them (series, then instance number)."""

    prior: str  # the prior's StudyInstanceUID
    study: str  # the new study it is a prior of
    source: str
    series: tuple[tuple[InstanceFile, ...], ...]

    @property
    def instances(self) -> int:
        return sum(len(files) for files in self.series)


def prefetching(config: Config, sources: Mapping[str, Source]) -> frozenset[str]:
    """The sources a prefetch may retrieve from: ``prefetch = true``, and their headers learnt on
    retrieve with a batch retrieval (a DIMSE PACS)."""
    return frozenset(
        c.name
        for c in config.sources
        if c.prefetch
        and (source := sources.get(c.name)) is not None
        and source.learns_on_retrieve
        and source.batch is not None
    )


def plan(
    registry: Registry,
    federation: Federation,
    sources: Collection[str],
    study: str,
    config: PrefetchConfig,
    today: date,
) -> list[Warming]:
    """What a new ``study`` warms (blocking: run it in a worker thread): nothing when it is not
    dated within ``config.within_days`` of ``today``; else its best priors' instances preferred on
    ``sources``, per prior and source, ``config.max_instances`` in all."""
    found = study_summaries(registry, [study])
    if not found or not _recent(found[0].StudyDate, today, config.within_days):
        return []
    budget = config.max_instances
    out: list[Warming] = []
    for prior in best_priors(registry, study, None, config.priors):
        uid = prior.study.StudyInstanceUID
        runs: dict[str, dict[str, list[InstanceFile]]] = {}  # source -> series path -> files
        for alternatives in registry.instance_files({"StudyInstanceUID": uid}):
            first = federation.order(alternatives)[0]
            if first.source in sources:
                series = first.path.split("/instances/")[0]
                runs.setdefault(first.source, {}).setdefault(series, []).append(first)
        for source, by_series in runs.items():
            kept: list[tuple[InstanceFile, ...]] = []
            for files in by_series.values():
                if budget <= 0:
                    break
                kept.append(tuple(files[:budget]))
                budget -= len(kept[-1])
            if kept:
                out.append(Warming(uid, study, source, tuple(kept)))
    return out


def _recent(study_date: str | None, today: date, days: int) -> bool:
    """Whether a StudyDate (YYYYMMDD) is within ``days`` before ``today`` (or after it); an
    undated study is not taken as new."""
    if not study_date or len(study_date) != 8 or not study_date.isdigit():
        return False
    return study_date >= (today - timedelta(days=days)).strftime("%Y%m%d")


class Prefetch:
    """The prefetch of one node: ``offer`` the announcer's events, ``run`` the retrievals."""

    def __init__(
        self,
        config: PrefetchConfig,
        registry: Registry,
        federation: Federation,
        sources: Collection[str],
        today: Callable[[], date] = date.today,
    ) -> None:
        self.config = config
        self.registry = registry
        self.federation = federation
        self.sources = frozenset(sources)
        self._today = today
        self._studies: tuple[MemoryObjectSendStream[str], MemoryObjectReceiveStream[str]] = (
            anyio.create_memory_object_stream[str](_QUEUE)
        )
        self._lanes = {name: anyio.create_memory_object_stream[Warming](_LANE) for name in self.sources}
        self._waiting: set[str] = set()
        self._warmed: dict[str, float] = {}  # prior -> when it was planned (monotonic)

    def offer(self, changes: Iterable[Change]) -> int:
        """Queue the new studies among ``changes`` (never blocks); how many were queued."""
        if not self.sources:
            return 0
        queued = dropped = 0
        for change in changes:
            uid = change.StudyInstanceUID
            if change.kind != "study.available" or uid in self._waiting:
                continue
            try:
                self._studies[0].send_nowait(uid)
            except anyio.WouldBlock:
                dropped += 1
                continue
            self._waiting.add(uid)
            queued += 1
        if dropped:
            log.warning("prefetch: %d new studies not prefetched (%d already waiting)", dropped, _QUEUE)
        return queued

    async def run(self) -> None:
        """Plan each new study offered and warm its priors, one retrieval per source at a time,
        until cancelled."""
        try:
            async with anyio.create_task_group() as group:
                for _, receive in self._lanes.values():
                    group.start_soon(self._lane, receive)
                async for study in self._studies[1]:
                    self._waiting.discard(study)
                    for warming in await self._plan(study):
                        try:
                            self._lanes[warming.source][0].send_nowait(warming)
                        except anyio.WouldBlock:
                            log.warning(
                                "prefetch: prior %s of study %s not prefetched: source %s has %d waiting",
                                warming.prior,
                                study,
                                warming.source,
                                _LANE,
                            )
        finally:
            self.close()

    def close(self) -> None:
        """Close the queues (``run`` does when it ends)."""
        for stream in (*self._studies, *(end for lane in self._lanes.values() for end in lane)):
            stream.close()

    async def _plan(self, study: str) -> list[Warming]:
        try:
            planned = await anyio.to_thread.run_sync(
                plan, self.registry, self.federation, self.sources, study, self.config, self._today()
            )
        except GatewayError as exc:
            log.warning("prefetch: the priors of study %s were not found: %s", study, exc.message)
            return []
        except Exception:  # one study's plan never stops the prefetch of the next
            log.exception("prefetch: the priors of study %s were not found", study)
            return []
        now = time.monotonic()
        if len(self._warmed) > _MAX_WARMED:
            self._warmed = {uid: at for uid, at in self._warmed.items() if now - at < _WARM_FOR}
        fresh = [w for w in planned if now - self._warmed.get(w.prior, -_WARM_FOR) >= _WARM_FOR]
        for warming in fresh:
            self._warmed[warming.prior] = now
        return fresh

    async def _lane(self, receive: MemoryObjectReceiveStream[Warming]) -> None:
        async for warming in receive:
            await self.warm(warming)

    async def warm(self, warming: Warming) -> int:
        """Retrieve one prior's instances from one source, a series per retrieval; how many came.
        Logged, never raised."""
        source = self.federation.sources.get(warming.source)
        batch = source.batch if source is not None else None
        started, received, size = time.monotonic(), 0, 0
        try:
            if batch is None:
                raise SourceError(f"source {warming.source} is gone or retrieves no batch")
            for files in warming.series:
                with anyio.fail_after(self.config.timeout):
                    # Closed at once on a timeout: the PACS is told to stop (a C-CANCEL).
                    async with contextlib.aclosing(batch.aiter_instances(list(files))) as instances:
                        async for data in instances:
                            received += 1
                            size += len(data)
        except (GatewayError, TimeoutError) as exc:
            why = exc.message if isinstance(exc, GatewayError) else f"no end within {self.config.timeout:g} s"
            log.warning(
                "prefetch: prior %s of study %s from source %s failed after %d of %d instances: %s",
                warming.prior,
                warming.study,
                warming.source,
                received,
                warming.instances,
                why,
            )
        except Exception:  # a lane outlives whatever one prior hits
            log.exception(
                "prefetch: prior %s of study %s from source %s failed",
                warming.prior,
                warming.study,
                warming.source,
            )
        else:
            log.info(
                "prefetch: prior %s of study %s warmed from source %s: %d instances of %d series, "
                "%.1f MB, in %.2f s",
                warming.prior,
                warming.study,
                warming.source,
                received,
                len(warming.series),
                size / 1e6,
                time.monotonic() - started,
            )
        return received
