"""A worker process: the HTTP server on one event loop, on the shared listening socket."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Awaitable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import orjson
import uvloop
from prometheus_client.core import Metric

from fuckbase import heap, openapi
from fuckbase.accesslog import AccessLog
from fuckbase.api import Api
from fuckbase.app import App, ReadGroup, ThreadedWriteGroup, WriteGroup
from fuckbase.auth import AdminGuard, DatabaseGuard
from fuckbase.backup import BackupStats
from fuckbase.contract import BY_PATH, GET_PATHS
from fuckbase.http import JSON_TYPE, PROMETHEUS_TYPE, HttpServer, Response, run_server
from fuckbase.jobs import JobClient
from fuckbase.metrics import (
    BACKEND_FIGURES,
    Metrics,
    Published,
    Tallies,
    backend_metrics,
    counter,
    gauge,
    publish_backend_figures,
)
from fuckbase.storage import Storage, StorageError

if TYPE_CHECKING:
    from fuckbase.server import Runtime

log = logging.getLogger("fuckbase.worker")

ENDPOINTS = (*BY_PATH, *GET_PATHS, "other")  # the last one counts every unknown path
DRAIN_WAIT = 10.0  # seconds in-flight requests get to finish at a stop


class GroupFlush:
    """Durability "fsync": a write is answered once an fsync that began after its commit has
    ended. One fsync covers every write committed while the previous one ran."""

    def __init__(self, storage: Storage, loop: asyncio.AbstractEventLoop) -> None:
        self._storage = storage
        self._loop = loop
        self._waiting: list[asyncio.Future[None]] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._run, name="fuckbase-fsync", daemon=True).start()

    async def __call__(self) -> None:
        future = self._loop.create_future()
        with self._cond:
            self._waiting.append(future)
            self._cond.notify()
        await future

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting:
                    self._cond.wait()
                batch, self._waiting = self._waiting, []
            error: StorageError | None = None
            try:
                self._storage.flush()
            except StorageError as exc:
                error = exc
            self._loop.call_soon_threadsafe(_settle, batch, error)


def _settle(futures: list[asyncio.Future[None]], error: StorageError | None) -> None:
    for f in futures:
        if not f.done():
            if error is None:
                f.set_result(None)
            else:
                f.set_exception(error)


def storage_metrics(storage: Storage) -> Iterable[Metric]:
    """Protected databases are not named: /metrics needs no credentials, and what a protected
    database holds is only for those who have them. Their keys are counted together. With
    the backend unavailable, these are left out (its own figures say why)."""
    try:
        with storage.read() as view:
            counts = view.key_counts()
            protected = {n for n in counts if view.database(n).auth}
        sequence = storage.sequence()
    except StorageError as exc:
        log.warning("/metrics without the storage's counts: %s", exc)
        return
    yield gauge("fuckbase_databases", "Databases", [], [([], len(counts))])
    yield gauge("fuckbase_keys", "Keys per open database", ["database"],
                (([n], c) for n, c in sorted(counts.items()) if n not in protected))
    yield gauge("fuckbase_protected_keys", "Keys of all protected databases together", [],
                [([], sum(counts[n] for n in protected))])
    yield counter("fuckbase_commits", "Commits to the storage", [], [([], sequence)])


def backup_metrics(published: Published) -> Iterable[Metric]:
    yield from BackupStats.from_dump(published.read()).metrics()


def worker_process(rt: Runtime, slot: int, backup_target: str) -> None:
    settings = rt.settings
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    storage = rt.open_storage()
    metrics = Metrics(Tallies(rt.run_dir / f"tallies-worker-{slot}.bin", ENDPOINTS), rt.run_dir)
    metrics.add_source(lambda: storage_metrics(storage))
    metrics.add_source(lambda: backend_metrics(rt.run_dir))
    backup_figures = Published(rt.run_dir, "backups")
    metrics.add_source(lambda: backup_metrics(backup_figures))
    info = {
        "durability": settings.durability,
        "backup_target": backup_target,
        "backup_interval_minutes": settings.effective_backup_interval,
        "backup_continuous": settings.effective_backup_continuous,
        "backup_encryption": bool(settings.backup_encryption_key_file or settings.backup_encryption_key),
        "workers": settings.workers,
    }

    def server_info() -> dict[str, Any]:
        shipping = BackupStats.from_dump(backup_figures.read()).continuous
        if not shipping:
            return info
        keep = ("state", "generation", "shipped_sequence", "pending_changes", "lag_seconds", "window")
        return {**info, "continuous": {k: shipping[k] for k in keep if k in shipping}}

    api = Api(storage, AdminGuard(settings.admin_username, settings.admin_password),
              DatabaseGuard(inline=False), server_info)
    want_access = settings.access_log and settings.log_level in ("debug", "info")
    access_log = AccessLog(rt.stream) if want_access else None
    openapi_body = orjson.dumps(openapi.spec())
    flush = GroupFlush(storage, loop) if settings.durability == "fsync" else None
    threads = ThreadPoolExecutor(settings.request_threads, thread_name_prefix="reads") if storage.remote else None

    # a frozen database answers nothing, not even its statement timeout: the requests waiting on it
    # get 503 a second after that timeout (PostgreSQL's own cancel answers first when it can)
    deadline = settings.storage_timeout + 1.0

    def render_metrics() -> Response:
        return Response(200, metrics.render(), PROMETHEUS_TYPE)

    def metrics_route() -> Response | Awaitable[Response]:
        """Remote storage's counts are read off the loop: a slow or frozen database holds up
        that scrape alone, not /health and every other request of this worker."""
        return render_metrics() if threads is None else loop.run_in_executor(threads, render_metrics)
    app = App(
        api,
        metrics,
        access_log,
        {
            "/health": lambda: Response(200, b'{"status":"ok"}'),
            "/metrics": metrics_route,
            "/openapi.json": lambda: Response(200, openapi_body, JSON_TYPE),
        },
        JobClient(rt.jobs_address),
        WriteGroup(storage, flush) if threads is None else ThreadedWriteGroup(storage, threads, flush, deadline),
        flush,
        threads,
        ReadGroup(storage, threads, deadline) if threads is not None else None,
    )
    server = HttpServer(app, settings.max_body_bytes, settings.read_timeout, app.joins)
    listener = run_server(server, rt.sock, loop)
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    tasks = [loop.create_task(publish_backend_figures(storage.figures, Published(rt.run_dir, f"{BACKEND_FIGURES}worker-{slot}")))]
    if access_log is not None:
        tasks.append(loop.create_task(access_log.run()))
    tasks.append(loop.create_task(heap.give_back_when_quiet(metrics.tallies.answered)))
    heap.settle()
    loop.run_until_complete(stopping.wait())
    listener.close()
    server.close_idle()
    loop.run_until_complete(_drain(server))
    for t in tasks:
        t.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    storage.close()


async def _drain(server: HttpServer) -> None:
    deadline = asyncio.get_running_loop().time() + DRAIN_WAIT
    while server.connections and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
        server.close_idle()
