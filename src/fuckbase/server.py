"""Assembles the server from Settings and runs it: granian serves WSGI from one worker process.

The `fuckbase` process checks the configuration, takes the data-dir lock and the port, then
granian forks the worker that opens the engine and answers requests on a few threads; the
worker dies with its parent (kill -9 included), so the lock and the port go with them.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import multiprocessing
import multiprocessing.util
import os
import signal
import socket
import sys
import time
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import orjson
from granian import Granian
from granian.constants import Interfaces
from prometheus_client.core import Metric

from fuckbase import openapi
from fuckbase.accesslog import AccessLog
from fuckbase.api import Api
from fuckbase.auth import AdminGuard
from fuckbase.background import BackgroundLoop
from fuckbase.backup import BackupService
from fuckbase.config import Settings
from fuckbase.engine import Engine
from fuckbase.errors import ApiError
from fuckbase.http import JSON, TEXT, HttpApp
from fuckbase.metrics import Metrics, counter, gauge
from fuckbase.objectstore import open_store

log = logging.getLogger("fuckbase")

RUNTIME_THREADS = int(os.environ.get("FUCKBASE_IO_THREADS", "1"))  # granian's socket threads
STARTUP_WAIT = 3.0  # seconds to wait for the lock and port of a process that is just exiting

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
    # granian's own chatter
    logging.getLogger("_granian").setLevel(logging.ERROR)
    logging.getLogger("granian").setLevel(logging.ERROR)
    # httpx logs each request's URL at INFO: for S3 those are presigned (credential id, signature)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def lock_data_dir(data_dir: Path) -> int:
    """One server per data directory: a second one would corrupt the in-memory indexes' view.

    Waits a moment first: a restart right after kill -9 may find the old worker still exiting.
    """
    fd = os.open(data_dir / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + STARTUP_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise StartupError(
                    f"data dir {str(data_dir)!r} is in use by another fuckbase process"
                ) from None
            time.sleep(0.05)


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
        self.io = BackgroundLoop()
        admin = AdminGuard(settings.admin_username, settings.admin_password)
        self.api = Api(self.engine, admin, self.backups, self.io.call, self._info)
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
        yield counter("fuckbase_commits", "Commits to the storage engine", [], [([], self.engine.commits)])

    def start(self) -> None:
        """Background work, then the restore a new node was asked for; before any request."""
        self.engine.start()
        self.io.start()
        if self.settings.restore_on_start:
            self.io.call(self._restore_on_start(self.settings.restore_on_start))
        interval = self.settings.effective_backup_interval
        if interval > 0:
            self.io.spawn(self.backups.run_schedule(interval))
        if self.access_log is not None:
            self.io.spawn(self.access_log.run())
        log.info(
            "fuckbase listening on %s:%d, data in %s, durability %s",
            self.settings.host,
            self.settings.port,
            self.settings.data_dir,
            self.settings.durability,
        )

    def close(self) -> None:
        self.io.stop()
        self.engine.close()
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
    """Validate, lock the data dir, bind, then serve from a worker until SIGTERM/SIGINT."""
    settings.validate()
    stream = log_stream(settings)
    setup_logging(settings, stream)
    lock_data_dir(settings.data_dir)
    _check_port_free(settings.host, settings.port)
    failures = multiprocessing.get_context("fork").SimpleQueue()
    server = Granian(
        "fuckbase",  # only a label: the worker's app comes from _worker_app
        address=settings.host,
        port=settings.port,
        interface=Interfaces.WSGI,
        workers=1,
        blocking_threads=settings.request_threads,
        runtime_threads=RUNTIME_THREADS,
        backlog=2048,
        websockets=False,
        log_enabled=False,
        workers_kill_timeout=60,
    )
    try:
        server.serve(target_loader=partial(_worker_app, settings, stream, os.getpid(), failures), wrap_loader=False)
    except SystemExit as exc:
        if not failures.empty():
            raise StartupError(failures.get()) from None
        if exc.code:  # granian stops when its worker dies; it does not say so
            log.error("the worker process died unexpectedly; fuckbase stopped")
        raise


def _worker_app(settings: Settings, stream: TextIO, parent: int, failures: Any) -> HttpApp:
    """Runs in granian's worker process: opens the data and returns the WSGI app."""
    _die_with(parent)
    try:
        service = Service(settings, stream)
        service.start()
    except StartupError as exc:
        failures.put(str(exc))
        os._exit(2)
    except Exception as exc:  # e.g. a data dir LMDB cannot open: still one line, not a traceback
        failures.put(f"cannot open the data in {settings.data_dir}: {type(exc).__name__}: {exc}")
        os._exit(2)
    # granian ends its worker through multiprocessing, which runs these finalizers
    multiprocessing.util.Finalize(None, service.close, exitpriority=10)
    return service.app


def _die_with(parent: int) -> None:
    """The worker gets SIGKILL when the `fuckbase` process dies, however it dies."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + STARTUP_WAIT
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
                return
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        time.sleep(0.05)
