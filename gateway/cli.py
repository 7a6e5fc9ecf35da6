"""Command line: ``gateway index``, ``sources``, ``serve`` and ``viewer install``."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

from gateway import __version__
from gateway.config import Config, is_loopback, load_config
from gateway.errors import ConfigError, GatewayError
from gateway.redact import SafeLogFilter
from gateway.registry.store import SourceStats

__all__ = ["main"]

log = logging.getLogger("gateway")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description="DICOMweb federation gateway")
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="harvest every configured source into the registry")
    index.add_argument("--config", help="TOML configuration file (default: embedded demo)")
    index.add_argument("--source", help="harvest only this source (by name)")
    index.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes parsing headers (default: one per core)",
    )
    sources = commands.add_parser(
        "sources", help="list the sources with their health, last harvest and counts"
    )
    sources.add_argument("--config", help="TOML configuration file (default: embedded demo)")
    serve = commands.add_parser("serve", help="serve DICOMweb at /dicom-web, harvesting in the background")
    serve.add_argument("--config", help="TOML configuration file (default: embedded demo)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--no-harvest", action="store_true", help="serve the index as it is")
    saving = commands.add_parser(
        "backup", help="consistent copies of the access database and the registry, while serving"
    )
    saving.add_argument("--config", help="TOML configuration file (default: embedded demo)")
    saving.add_argument("directory", help="where the copies go (created if missing)")
    viewer = commands.add_parser("viewer", help="the bundled OHIF viewer, served at /viewer")
    viewer_commands = viewer.add_subparsers(dest="viewer_command", required=True)
    viewer_install = viewer_commands.add_parser(
        "install", help="fetch the OHIF viewer with npm into <data dir>/viewer"
    )
    viewer_install.add_argument("--config", help="TOML configuration file (default: embedded demo)")
    viewer_install.add_argument("--version", help="@ohif/app release (default: the one tested)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Every line, ours or a library's (uvicorn logs through the root handler, see _serve): no
    # secret, no raw newline from a file name or a client's path (gateway.redact).
    for handler in logging.getLogger().handlers:
        handler.addFilter(SafeLogFilter())
    # One line per upstream request or association is noise at INFO: their warnings still show.
    for chatty in ("httpx", "httpcore", "pynetdicom"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        config = load_config(args.config)
        if args.command == "index":
            return _index(config, args.workers, args.source)
        if args.command == "sources":
            return _sources(config)
        if args.command == "viewer":
            return _viewer_install(config, args.version)
        if args.command == "backup":
            from gateway.backup import backup

            for path in backup(config, Path(args.directory)):
                print(f"{path} ({path.stat().st_size:,} bytes)")
            return 0
        return _serve(config, args.host, args.port, not args.no_harvest)
    except GatewayError as exc:
        print(f"gateway: {exc.message}", file=sys.stderr)
        return 2


def _index(config: Config, workers: int, only: str | None = None) -> int:
    from tqdm import tqdm

    from gateway.service import Gateway

    gateway = Gateway(config)
    _announce(config)
    failed = False
    executor = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        names = [source.name for source in config.sources]
        if only is not None and only not in names:
            raise ConfigError(f"--source: no source named {only!r} (configured: {', '.join(names)})")
        for source in config.sources:
            if only is not None and source.name != only:
                continue
            bar = tqdm(
                desc=f"{source.name}", unit=" files", file=sys.stderr, disable=None
            )  # None: no bar when stderr is not a terminal

            def progress(stats: SourceStats, bar=bar) -> None:
                bar.n = stats.seen
                bar.set_postfix(
                    indexed=stats.indexed, skipped=stats.skipped, failed=stats.failed, refresh=False
                )
                bar.refresh()

            try:
                stats = gateway.harvest(source.name, progress, executor)
            except GatewayError as exc:
                bar.close()
                print(f"{source.name}: harvest failed: {exc.message}", file=sys.stderr)
                failed = True
                continue
            bar.close()
            if stats is None:
                print(f"{source.name}: being harvested by another node right now; not harvested")
                continue
            elapsed = (stats.finished or 0) - (stats.started or 0)
            print(
                f"{source.name}: {stats.seen} files seen, {stats.indexed} indexed, "
                f"{stats.skipped} unchanged, {stats.failed} failed, "
                + (f"{stats.conflicts} conflicting, " if stats.conflicts else "")
                + f"{stats.removed} removed "
                f"in {elapsed:.2f} s; {stats.instances} instances held"
            )
    finally:
        if executor is not None:
            executor.shutdown()
    counts = gateway.registry.counts()
    print(
        f"registry {config.registry_path}: {counts['patients']} patients, {counts['studies']} "
        f"studies, {counts['series']} series, {counts['instances']} instances"
    )
    return 1 if failed else 0


def _sources(config: Config) -> int:
    import asyncio
    import time

    from gateway.service import Gateway

    gateway = Gateway(config)
    runs = {run.name: run for run in gateway.registry.source_runs()}

    async def healths() -> list[str]:
        try:
            return list(await asyncio.gather(*(source.health() for source in gateway.sources.values())))
        finally:
            await gateway.aclose()

    states = asyncio.run(healths())
    conflicts: dict[str, int] = {}
    for row in gateway.registry.conflicts():
        conflicts[row["source"]] = conflicts.get(row["source"], 0) + 1
    print(
        f"{'source':<16} {'kind':<10} {'last harvest':<20} {'instances':>9} {'failed':>6} "
        f"{'conflicts':>9}  health"
    )
    for (name, source), health in zip(gateway.sources.items(), states, strict=True):
        run = runs.get(name)
        when = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.finished))
            if run and run.finished
            else "never"
        )
        counts = f"{run.instances if run else 0:>9} {run.failed if run else 0:>6} {conflicts.get(name, 0):>9}"
        print(f"{name:<16} {source.kind:<10} {when:<20} {counts}  {health}")
    return 0


def _serve(config: Config, host: str | None, port: int | None, harvest: bool) -> int:
    import uvicorn

    from gateway.app import create_app
    from gateway.dicomweb.protocol import BoundedHttpToolsProtocol
    from gateway.service import Gateway

    host = host or config.server.host
    port = port if port is not None else config.server.port
    if config.auth.open and not is_loopback(host) and not config.auth.open_beyond_loopback:
        raise ConfigError(
            f"auth.open: refusing to listen on {host}: open access shows every study to anyone who can "
            "reach it. Listen on 127.0.0.1, configure [[auth.issuers]], or set "
            "auth.open_beyond_loopback = true"
        )
    if not config.server.public_url and (host != config.server.host or port != config.server.port):
        config = replace(config, server=replace(config.server, host=host, port=port))
    _announce(config)
    app = create_app(Gateway(config), harvest=harvest)
    log.info("DICOMweb at http://%s:%d/dicom-web", host if ":" not in host else f"[{host}]", port)
    # Everything alive now (modules, pydicom's dictionaries, the app) stays alive: out of the
    # collector's sight, a full collection no longer walks it. Those walks were the 35-40 ms
    # tail of QIDO answers (p99 40 -> 10 ms at 1,000,000 instances; bench/scale.py).
    gc.freeze()
    # log_config=None: uvicorn's loggers go through the root handler and its SafeLogFilter.
    # X-Forwarded-For/-Proto are believed from the configured proxies only (uvicorn's default
    # believes any loopback client): they decide the audited client address and the scheme
    # (Secure cookies, HSTS).
    proxies = config.server.trusted_proxies
    uvicorn.run(
        app,
        http=BoundedHttpToolsProtocol,  # request heads bounded (uvicorn keeps them whole)
        host=host,
        port=port,
        log_level="info",
        access_log=False,
        log_config=None,
        proxy_headers=bool(proxies),
        forwarded_allow_ips=",".join(proxies) if proxies else None,
    )
    return 0


def _viewer_install(config: Config, version: str | None) -> int:
    from gateway.viewer.install import OHIF_VERSION, install_viewer

    version = version or OHIF_VERSION
    print(f"fetching @ohif/app@{version} with npm ...", file=sys.stderr)
    target = install_viewer(config.data_dir / "viewer", version)
    print(f"OHIF viewer {version} installed in {target}; `gateway serve` shows it at /viewer/")
    return 0


def _announce(config: Config) -> None:
    if config.embedded:
        log.info(
            "no --config given: running the embedded default (SQLite registry at %s, folder source %s)",
            config.registry_path,
            config.sources[0].path,
        )
    else:
        log.info("configuration from %s; registry %s", config.origin, config.registry_path)
    for note in config.notes:
        log.warning("%s", note)
