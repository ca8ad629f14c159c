"""Assembles the server from Settings and runs it in one process on one event loop."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

import orjson
import uvloop
from granian.constants import Interfaces
from granian.server.embed import Server
from prometheus_client.core import Metric

from fuckbase import openapi
from fuckbase.accesslog import AccessLog
from fuckbase.api import Api
from fuckbase.auth import AdminGuard
from fuckbase.backup import BackupService
from fuckbase.config import Settings
from fuckbase.engine import Engine
from fuckbase.errors import ApiError
from fuckbase.http import JSON, TEXT, HttpApp
from fuckbase.metrics import Metrics, counter, gauge
from fuckbase.objectstore import open_store

log = logging.getLogger("fuckbase")

RUNTIME_THREADS = int(os.environ.get("FUCKBASE_IO_THREADS", "2"))  # granian I/O threads

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}


class StartupError(RuntimeError):
    """The server cannot start; the message is the one line the operator sees."""


def log_stream(settings: Settings) -> TextIO:
    if settings.log_file:
        return open(settings.log_file, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
    return sys.stdout


def setup_logging(settings: Settings, stream: TextIO) -> None:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[settings.log_level])
    # granian's own chatter (including its "embedded server is experimental" notice)
    logging.getLogger("_granian").setLevel(logging.ERROR)
    logging.getLogger("granian").setLevel(logging.ERROR)
    # httpx logs each request's URL at INFO: for S3 those are presigned (credential id, signature)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def lock_data_dir(data_dir: Path) -> int:
    """One server per data directory: a second one would corrupt the in-memory indexes' view."""
    fd = os.open(data_dir / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(f"data dir {str(data_dir)!r} is in use by another fuckbase process") from None
    return fd


class Service:
    """Everything one server process owns, wired together."""

    def __init__(self, settings: Settings, stream: TextIO) -> None:
        self.settings = settings
        self.engine = Engine(settings.data_dir / "store", settings.durability)
        self.metrics = Metrics()
        self.metrics.add_source(self._engine_metrics)
        try:
            store = open_store(
                s3_endpoint=settings.s3.endpoint,
                s3_bucket=settings.s3.bucket,
                s3_access_key=settings.s3.access_key,
                s3_secret_key=settings.s3.secret_key,
                s3_region=settings.s3.region,
                local_dir=settings.effective_backup_dir,
                op_timeout=settings.s3.timeout,
            )
        except ValueError as exc:
            raise StartupError(f"bad S3 configuration: {exc}") from None
        self.backups = BackupService(
            self.engine, store, settings.backup_compression, settings.backup_retention
        )
        self.metrics.add_source(self.backups.stats.metrics)
        admin = AdminGuard(settings.admin_username, settings.admin_password)
        self.api = Api(self.engine, admin, self.backups, self._info)
        want_access = settings.access_log and settings.log_level in ("debug", "info")
        self.access_log = AccessLog(stream) if want_access else None
        openapi_body = orjson.dumps(openapi.spec())
        self.app = HttpApp(
            self.api,
            self.metrics,
            self.access_log,
            settings.max_body_bytes,
            {
                "/health": lambda: (200, JSON, b'{"status":"ok"}'),
                "/metrics": lambda: (200, TEXT, self.metrics.render()),
                "/openapi.json": lambda: (200, JSON, openapi_body),
            },
        )

    def _info(self) -> dict[str, Any]:
        return {
            "durability": self.settings.durability,
            "backup_target": self.backups.target,
            "backup_interval_minutes": self.settings.effective_backup_interval,
        }

    def _engine_metrics(self) -> Iterable[Metric]:
        dbs = self.engine.databases
        yield gauge("fuckbase_databases", "Databases on this node", [], [([], len(dbs))])
        yield gauge(
            "fuckbase_keys",
            "Keys per database",
            ["database"],
            (([name], db.key_count) for name, db in sorted(dbs.items())),
        )
        yield counter("fuckbase_commits", "Group commits to the storage engine", [], [([], self.engine.commits)])

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.engine.start(loop)
        if self.settings.restore_on_start:
            await self._restore_on_start(self.settings.restore_on_start)
        tasks = []
        interval = self.settings.effective_backup_interval
        if interval > 0:
            tasks.append(loop.create_task(self.backups.run_schedule(interval)))
        if self.access_log is not None:
            tasks.append(loop.create_task(self.access_log.run()))
        server = Server(
            self.app,
            address=self.settings.host,
            port=self.settings.port,
            interface=Interfaces.RSGI,
            websockets=False,
            backlog=2048,
            runtime_threads=RUNTIME_THREADS,
            log_enabled=False,
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.stop)
        log.info(
            "fuckbase listening on %s:%d, data in %s, durability %s",
            self.settings.host,
            self.settings.port,
            self.settings.data_dir,
            self.settings.durability,
        )
        try:
            await server.serve()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.engine.close()
            log.info("fuckbase stopped")


    async def _restore_on_start(self, which: str) -> None:
        """Disaster recovery of a new node: restore only into an empty data dir, never over data."""
        if self.engine.databases:
            log.info("restore-on-start skipped: the data dir already holds databases")
            return
        try:
            name = await self.backups.latest_full() if which == "latest" else which
            if name is None:
                raise StartupError(f"restore-on-start: no full backup found in {self.backups.target}")
            result = await self.backups.restore(name)
        except ApiError as exc:
            raise StartupError(f"restore-on-start of {which} failed: {exc.message}") from None
        log.info("restore-on-start: restored %s (%d databases)", name, len(result["databases"]))


def run(settings: Settings) -> None:
    """Validate, lock the data dir, load the data, then serve until SIGTERM/SIGINT."""
    settings.validate()
    stream = log_stream(settings)
    setup_logging(settings, stream)
    lock_data_dir(settings.data_dir)
    _check_port_free(settings.host, settings.port)
    service = Service(settings, stream)
    uvloop.run(service.run())


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
