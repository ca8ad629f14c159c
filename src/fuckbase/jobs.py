"""Long operations, served by the job process to the workers over a local socket.

Index builds, backups, restores, listings and password hashing can take seconds (or wait for
a frozen object store for its whole timeout). Workers hand such requests to the job process
and await the answer on their event loop, so short requests never queue behind them and the
job process's Python work never competes for a worker's interpreter lock.

Messages are a header (a 4-byte length and an orjson object) and a body (a 4-byte length and
the JSON bytes as they are, never nested in the header: a body the worker could parse parses
here too), many in flight on one connection: request `{"id", "path", "headers"}`, answer
`{"id", "status"}`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import orjson

from fuckbase import heap
from fuckbase.api import Api, error_for
from fuckbase.app import parse_body, run_handler
from fuckbase.backup import BackupStats
from fuckbase.contract import ErrorCode
from fuckbase.errors import ApiError
from fuckbase.http import Response, error_response
from fuckbase.objectstore import ObjectStoreError
from fuckbase.storage import StorageError

if TYPE_CHECKING:
    from fuckbase.server import Runtime

log = logging.getLogger("fuckbase.jobs")

# A restore parses on one thread while another feeds the storage (COPY to PostgreSQL): the
# feeding thread needs the interpreter lock after every round trip and, behind a busy parser,
# waits up to the switch interval for it (5 ms by default), which left PostgreSQL idle for a
# quarter of a restore. Measured on a 1M-entry restore: 4.1 s at 5 ms, 3.2 s at 1 ms.
SWITCH_INTERVAL = 0.001

_LENGTH = 4
MAX_MESSAGE = 1 << 30


async def _read_message(reader: asyncio.StreamReader) -> tuple[Any, bytes]:
    n = int.from_bytes(await reader.readexactly(_LENGTH), "big")
    header = orjson.loads(await reader.readexactly(n))
    n = int.from_bytes(await reader.readexactly(_LENGTH), "big")
    return header, await reader.readexactly(n)


def _frame(header: dict[str, Any], body: bytes) -> bytes:
    raw = orjson.dumps(header)
    return len(raw).to_bytes(_LENGTH, "big") + raw + len(body).to_bytes(_LENGTH, "big") + body


class JobServer:
    """Runs the long operations of the Api: synchronous ones on a pool of threads (each may
    block for its whole duration), coroutines (backups) on this process's event loop."""

    def __init__(self, api: Api, threads: int) -> None:
        self.api = api
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="fuckbase-job")
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, path: str, raw: bytes, headers: dict[str, str]) -> Response:
        try:
            body = parse_body(raw)
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message)
        coroutine = self.api.async_handlers.get(path)
        if coroutine is None:
            handler = self.api.handlers[path]
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, run_handler, handler, body, headers)
        try:
            return Response(200, await coroutine(body, headers))
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message)
        except StorageError as exc:
            err = error_for(exc)
            return error_response(err.status, err.code, err.message)

    async def serve(self, address: str) -> asyncio.AbstractServer:
        return await asyncio.start_unix_server(self._client, path=address, limit=MAX_MESSAGE)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                msg, body = await _read_message(reader)
                task = asyncio.create_task(self._answer(msg, body, writer))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _answer(self, msg: dict[str, Any], body: bytes, writer: asyncio.StreamWriter) -> None:
        try:
            response = await self.run(msg["path"], body, msg["headers"])
        except Exception:
            log.exception("job %s failed", msg["path"])
            response = error_response(500, ErrorCode.INTERNAL_ERROR, "internal error")
        if not writer.is_closing():
            writer.write(_frame({"id": msg["id"], "status": response.status}, response.body))
        if len(self._tasks) == 1:  # this one: no other long operation is under way
            heap.give_back()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class JobClient:
    """A worker's connection to the job process; reconnects after the job process restarts."""

    def __init__(self, address: str) -> None:
        self._address = address
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[Response]] = {}
        self._next_id = 0
        self._connecting: asyncio.Lock | None = None

    async def __call__(self, path: str, body: bytes, headers: dict[str, str]) -> Response:
        """`body` is the request's JSON object as it arrived (already checked to parse)."""
        try:
            writer = await self._connected()
        except OSError:
            return error_response(503, ErrorCode.SERVICE_UNAVAILABLE, "long operations are unavailable; retry shortly")
        self._next_id += 1
        ident = self._next_id
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        headers = {k: v for k, v in headers.items() if k in ("authorization", "x-admin-authorization")}
        writer.write(_frame({"id": ident, "path": path, "headers": headers}, body))
        try:
            return await future
        finally:
            self._pending.pop(ident, None)

    async def _connected(self) -> asyncio.StreamWriter:
        if self._writer is not None and not self._writer.is_closing():
            return self._writer
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._writer is None or self._writer.is_closing():
                reader, self._writer = await asyncio.open_unix_connection(self._address, limit=MAX_MESSAGE)
                asyncio.create_task(self._read_answers(reader, self._writer))
            return self._writer

    async def _read_answers(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                msg, body = await _read_message(reader)
                future = self._pending.get(msg["id"])
                if future is not None and not future.done():
                    future.set_result(Response(msg["status"], body))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            if self._writer is writer:
                self._writer = None
            lost = error_response(503, ErrorCode.SERVICE_UNAVAILABLE,
                                  "the job process stopped while running this request; check its outcome and retry")
            for future in self._pending.values():
                if not future.done():
                    future.set_result(lost)


# ---------------------------------------------------------------------- the job process

HOUSEKEEPING_INTERVAL = 1.0
SYNC_INTERVAL = 1.0  # seconds between fsyncs with durability "os"
LEAD_CHECK = 2.0  # seconds between checks that this process still leads (or may now)


def job_process(rt: Runtime, ready_fd: int) -> None:
    """Main of the job process: opens (and if needed upgrades) the data, restores on start when
    asked, then serves long operations and runs the schedule and the housekeeping."""
    import signal

    import uvloop

    from fuckbase.auth import AdminGuard, DatabaseGuard
    from fuckbase.backup import BackupService
    from fuckbase.continuous import Retention, Shipper, stop_logging_changes
    from fuckbase.metrics import BACKEND_FIGURES, Published, publish_backend_figures
    from fuckbase.objectstore import open_store

    settings = rt.settings
    heap.keep_freed_memory()
    sys.setswitchinterval(SWITCH_INTERVAL)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)

    def report(status: dict[str, Any]) -> None:
        os.write(ready_fd, orjson.dumps(status))
        os.close(ready_fd)

    try:
        storage = rt.open_storage(primary=True)
    except Exception as exc:  # e.g. a damaged data file: one line, not a traceback
        report({"error": f"cannot open the data in {settings.storage_label}: {type(exc).__name__}: {exc}"})
        raise SystemExit(2) from None
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
        report({"error": f"bad S3 configuration: {exc}"})
        raise SystemExit(2) from None
    backups = BackupService(storage, store, settings.backup_compression, settings.backup_retention, rt.run_dir,
                            settings.keyring())
    shipper = None
    if settings.effective_backup_continuous:
        retention = None if settings.backup_retention_age is None else Retention(
            settings.backup_retention_age, settings.backup_keep_daily, settings.backup_keep_weekly,
            settings.backup_keep_monthly)
        shipper = Shipper(storage, backups, settings.data_dir, rt.run_dir, sync_interval=settings.backup_sync_interval,
                          snapshot_minutes=settings.backup_snapshot_interval_minutes,
                          snapshot_changes=settings.backup_snapshot_changes, retention=retention)
        backups.shipped = shipper.shipped
    else:
        stop_logging_changes(storage, settings.data_dir)
    api = Api(storage, AdminGuard(settings.admin_username, settings.admin_password), DatabaseGuard(inline=True),
              lambda: {}, backups)
    server = JobServer(api, settings.request_threads)
    published = Published(rt.run_dir, "backups")
    backups.stats = BackupStats.from_dump(published.read())
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    async def main() -> None:
        if settings.restore_on_start:
            error = await _restore_on_start(storage, backups, settings.restore_on_start)
            if error is not None:
                report({"error": error})
                raise SystemExit(2)
        listener = await server.serve(rt.jobs_address)
        report({"backup_target": backups.target})
        heap.settle()
        interval = settings.effective_backup_interval

        def duties() -> list[Coroutine[Any, Any, None]]:
            """What one process among all sharing the data runs."""
            jobs = [_housekeeping(storage), backups.remove_abandoned()]
            if shipper is not None:
                jobs.append(shipper.run())
            if interval > 0:
                jobs.append(backups.run_schedule(interval))
            return jobs

        figures = Published(rt.run_dir, f"{BACKEND_FIGURES}jobs")
        tasks = [asyncio.create_task(_leading(storage, duties)),
                 asyncio.create_task(publish_backend_figures(storage.figures, figures)),
                 asyncio.create_task(_publishing(published, backups.stats, shipper))]
        if settings.durability == "os":
            tasks.append(asyncio.create_task(_syncing(storage)))
        await stopping.wait()
        listener.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # the shipper ships what is left and gives its lease up
        published.write(backups.stats.dump())

    try:
        loop.run_until_complete(main())
    finally:
        server.close()
        storage.close()


async def _restore_on_start(storage: Any, backups: Any, which: str) -> str | None:
    """Disaster recovery of a new node: restore only into an empty data dir, never over data."""
    with storage.read() as view:
        if view.database_names():
            log.info("restore-on-start skipped: the data dir already holds databases")
            return None
    from fuckbase.continuous import latest_instant, restore_to

    try:
        name = await backups.latest_full() if which == "latest" else which
        newest_change = await latest_instant(backups.store) if which == "latest" else None
        if newest_change is not None and (name is None or newest_change >= backups.created_at(name)):
            result = await restore_to(backups, newest_change, None, None, None)
            name = f"the continuous backup up to {result['at']}"
        elif name is None:
            return f"restore-on-start: no full backup found in {backups.target}"
        else:
            result = await backups.restore(name)
    except ApiError as exc:
        return f"restore-on-start of {which} failed: {exc.message}"
    except ObjectStoreError as exc:
        return f"restore-on-start of {which} failed: {exc}"
    log.info("restore-on-start: restored %s (%d databases)", name, len(result["databases"]))
    return None


async def _leading(storage: Any, duties: Callable[[], list[Coroutine[Any, Any, None]]]) -> None:
    """Runs the duties while this process leads (on the embedded engine, always; on a shared
    backend, on one node at a time, another taking over when it dies)."""
    running: list[asyncio.Task[None]] = []
    try:
        while True:
            try:
                lead = await asyncio.to_thread(storage.lead, "jobs")
            except StorageError:
                lead = False
            if lead and not running:
                running = [asyncio.create_task(job) for job in duties()]
                log.info("this node runs the periodic jobs (housekeeping, scheduled and continuous backups)")
            elif not lead and running:
                log.warning("this node no longer runs the periodic jobs")
                for task in running:
                    task.cancel()
                await asyncio.gather(*running, return_exceptions=True)
                running = []
            await asyncio.sleep(LEAD_CHECK)
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


async def _housekeeping(storage: Any) -> None:
    while True:
        try:
            more = await asyncio.to_thread(storage.maintain)
        except StorageError as exc:
            log.warning("housekeeping: %s", exc)
            more = False
        await asyncio.sleep(0 if more else HOUSEKEEPING_INTERVAL)


async def _syncing(storage: Any) -> None:
    while True:
        await asyncio.sleep(SYNC_INTERVAL)
        try:
            await asyncio.to_thread(storage.flush)
        except StorageError as exc:
            log.error("fsync failed: %s", exc)


async def _publishing(published: Any, stats: BackupStats, shipper: Any) -> None:
    last = None
    while True:
        await asyncio.sleep(0.2)
        if shipper is not None:
            stats.continuous = dataclasses.asdict(shipper.status)
        now = stats.dump()
        if now != last:
            published.write(now)
            last = now
