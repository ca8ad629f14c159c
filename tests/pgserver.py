"""A real PostgreSQL server for tests: Debian's `postgresql` package, a throw-away cluster on a
free port of 127.0.0.1, started once per test session; each test gets a database of its own.

`initdb` refuses to run as root, so as root the cluster belongs to the unprivileged `nobody`.
As a real process it can be stopped and started again under load.
Use from a test module: `from pgserver import postgres, pg_url  # noqa: F401`.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

HOST = "127.0.0.1"
OWNER = "nobody"  # who runs the cluster when the tests run as root


def pg_bin(name: str) -> str:
    """A PostgreSQL server program: Debian keeps them under /usr/lib/postgresql/<version>/bin."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    if found:
        return found[-1]
    on_path = shutil.which(name)
    if on_path is None:
        raise RuntimeError(f"{name} not found: apt-get install postgresql")
    return on_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: no server outlives a crashed test run


class PostgresServer:
    """One cluster in a fresh temp dir; start, stop (fast), start again, kill."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fuckbase-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        self.user = "fuckbase"
        self.proc: subprocess.Popen[bytes] | None = None
        self._as_owner: dict[str, Any] = {}
        if os.geteuid() == 0:
            shutil.chown(self.dir, OWNER)
            self._as_owner = {"user": OWNER, "group": "nogroup"}

    def init(self) -> None:
        subprocess.run([pg_bin("initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8",
                        "--locale=C.UTF-8", "--no-sync"], check=True, capture_output=True, **self._as_owner)

    def start(self, timeout: float = 30.0) -> None:
        log = open(self.dir / "server.log", "ab")  # noqa: SIM115 (the server writes it while it runs)
        self.proc = subprocess.Popen(
            [pg_bin("postgres"), "-D", str(self.data), "-p", str(self.port), "-h", HOST, "-k", str(self.dir),
             "-c", "max_connections=300", "-c", "shared_buffers=128MB", "-c", "fsync=on",
             "-c", "log_min_messages=warning"],
            stdout=log, stderr=log, preexec_fn=_die_with_parent, **self._as_owner)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(self.url("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"postgres exited: {(self.dir / 'server.log').read_text()[-2000:]}") from None
                time.sleep(0.1)
        raise RuntimeError("postgres did not start")

    def stop(self) -> None:
        """A fast shutdown: sessions are cut, what was committed stays."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=30)
        self.proc = None

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@{HOST}:{self.port}/{database}"

    def new_database(self) -> str:
        name = "t_" + secrets.token_hex(6)
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A new cluster, started, and removed at the end."""
    server = PostgresServer()
    server.init()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    with running_postgres() as server:
        yield server


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """A new, empty database of the session's cluster."""
    return postgres.new_database()
