"""The server's request path in this process, for fast tests of pure validation.

A worker's `App` and the job process's `JobServer` (with a local-folder backup target) on one
LMDB store, behind an httpx transport: the same code as the subprocess server from parsing
the body on, minus the sockets, the processes and their start-up time. Everything that needs
a process (restarts, kill -9, timeouts, framing) stays with the subprocess tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx

from fuckbase.api import Api
from fuckbase.app import App, WriteGroup
from fuckbase.auth import AdminGuard, DatabaseGuard
from fuckbase.backup import BackupService
from fuckbase.contract import BY_PATH, GET_PATHS
from fuckbase.http import Request, Response
from fuckbase.jobs import JobServer
from fuckbase.metrics import Metrics, Tallies
from fuckbase.objectstore import LocalObjectStore
from fuckbase.storage.lmdb import LmdbStorage

_READ_HEADERS = ("authorization", "x-admin-authorization")


class AppTransport(httpx.AsyncBaseTransport):
    def __init__(self, app: App) -> None:
        self.app = app

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        headers = {k: request.headers[k] for k in _READ_HEADERS if k in request.headers}
        result = self.app(Request(request.method, request.url.path, headers, body, "127.0.0.1"))
        response: Response = result if isinstance(result, Response) else await result.wait()
        return httpx.Response(response.status, content=response.body,
                              headers={"content-type": response.content_type.decode()})


@contextmanager
def in_process_app(path: Path, admin: tuple[str, str] = ("", "")) -> Iterator[App]:
    """A fresh server's App (and the job process's JobServer it forwards to) on data under `path`."""
    storage = LmdbStorage(path / "store", primary=True)
    guard = AdminGuard(*admin)
    backups = BackupService(storage, LocalObjectStore(path / "backups"), spool_dir=path)
    jobs = JobServer(Api(storage, guard, DatabaseGuard(inline=True), dict, backups), threads=2)
    tallies = Tallies(path / "tallies.bin", (*BY_PATH, *GET_PATHS, "other"))
    try:
        yield App(Api(storage, guard, DatabaseGuard(inline=False), dict), Metrics(tallies, path), None, {},
                  jobs.run, WriteGroup(storage, None), None)
    finally:
        jobs.close()
        storage.close()


@asynccontextmanager
async def in_process(path: Path, admin: tuple[str, str] = ("", "")) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client whose requests run through a fresh server's App on data under `path`."""
    with in_process_app(path, admin) as app:
        async with httpx.AsyncClient(transport=AppTransport(app), base_url="http://in-process") as client:
            yield client
