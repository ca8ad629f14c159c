"""Fixtures: the real server as a subprocess on a free port, talked to over HTTP."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from inprocess import in_process
from pgserver import pg_url, postgres  # noqa: F401

from fuckbase.storage import Storage
from fuckbase.storage.lmdb import LmdbStorage
from fuckbase.storage.postgresql import PostgresStorage


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class ServerProcess:
    """One `fuckbase` process; start, stop, kill -9 and restart on the same data dir."""

    def __init__(self, data_dir: Path, args: list[str] | None = None, env: dict[str, str] | None = None):
        self.data_dir = data_dir
        self.args = args or []
        self.env = env or {}
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"server-{self.port}.log"
        self.client: httpx.Client | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FUCKBASE_")}
        env.update(self.env)
        cmd = [
            sys.executable,
            "-m",
            "fuckbase",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            *self.args,
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    self.client = httpx.Client(base_url=self.url, timeout=60)
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server did not start: {self.log()[-2000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def post(self, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        assert self.client is not None
        if body is None:
            body = {}
        if isinstance(body, (bytes, str)):
            return self.client.post(path, content=body, **kw)
        return self.client.post(path, json=body, **kw)

    def ok(self, path: str, body: Any = None, **kw: Any) -> dict[str, Any]:
        r = self.post(path, body, **kw)
        assert r.status_code == 200, r.text
        data = r.json()
        assert data["status"] == "success"
        return data  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill9(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def restart(self) -> ServerProcess:
        self.stop()
        return self.start()


# the HTTP suites that run against both backends: every server a test starts there shares
# one PostgreSQL database, as the nodes of one deployment do
BOTH_BACKENDS = {"test_api", "test_http", "test_batch", "test_hostile", "test_contract", "test_client", "test_backup",
                 "test_client_backups", "test_cli", "test_fuzz", "test_smoke", "test_readme", "test_backup_s3",
                 "test_encryption", "test_continuous"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "server_backend" in metafunc.fixturenames:
        both = metafunc.module.__name__.rsplit(".", 1)[-1] in BOTH_BACKENDS
        metafunc.parametrize("server_backend", BACKENDS if both else ["lmdb"], indirect=True)


@pytest.fixture
def server_backend(request: pytest.FixtureRequest) -> str | None:
    """The --storage of the test's servers: None for the embedded engine, else a new database."""
    if getattr(request, "param", "lmdb") == "postgresql":
        return str(request.getfixturevalue("pg_url"))
    return None


@pytest.fixture
def own_storage(server_backend: str | None, request: pytest.FixtureRequest) -> Callable[[], list[str]]:
    """The extra arguments of a server with storage of its own (make_server's all share the
    test's PostgreSQL database): a new database on PostgreSQL; its new data dir on LMDB."""
    def args() -> list[str]:
        if server_backend is None:
            return []
        return ["--storage", request.getfixturevalue("postgres").new_database()]

    return args


def stored_bytes(srv: ServerProcess) -> bytes:
    """Everything a server's backend stores, as bytes: the LMDB file, or PostgreSQL's rows."""
    if "--storage" not in srv.args:
        return (srv.data_dir / "store" / "data.mdb").read_bytes()
    import psycopg

    with psycopg.connect(srv.args[srv.args.index("--storage") + 1]) as conn:
        tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE tablename LIKE 'fb_%'")]
        return b"".join(str(conn.execute(f"SELECT * FROM {t}").fetchall()).encode() for t in tables)  # noqa: S608


@pytest.fixture
def make_server(tmp_path: Path, server_backend: str | None) -> Iterator[Any]:
    """Factory: make_server(args=[...], env={...}) -> a started ServerProcess, stopped at teardown."""
    servers: list[ServerProcess] = []

    def make(args: list[str] | None = None, env: dict[str, str] | None = None, data_dir: Path | None = None) -> ServerProcess:
        d = data_dir or tmp_path / f"data{len(servers)}"
        if server_backend is not None:
            args = ["--storage", server_backend, *(args or [])]
        srv = ServerProcess(d, args, env)
        servers.append(srv)
        return srv.start()

    yield make
    for srv in servers:
        srv.stop()


@pytest.fixture
async def in_app(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The server's request path in this process (tests/inprocess.py): for pure validation."""
    async with in_process(tmp_path) as client:
        yield client


@pytest.fixture
def server(make_server: Any) -> ServerProcess:
    return make_server()  # type: ignore[no-any-return]


@pytest.fixture
def shop(server: ServerProcess) -> ServerProcess:
    """A server with database "shop" holding set "users"."""
    server.ok("/create", {"name": "shop"})
    server.ok("/set/create", {"database": "shop", "name": "users"})
    return server


# ---------------------------------------------------------------------- storage backends (tests/storage)

BACKENDS = ["lmdb", "postgresql"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def reopen(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Callable[[], Storage]:
    """Opens (again) the same backend's data: what a restart of the server does."""
    if backend == "postgresql":
        url = request.getfixturevalue("pg_url")  # a fresh database of the suite's PostgreSQL
        return lambda: PostgresStorage(url)
    return lambda: LmdbStorage(tmp_path / "store", primary=True)


@pytest.fixture
def storage(reopen: Callable[[], Storage]) -> Iterator[Storage]:
    s = reopen()
    yield s
    s.close()
