"""The `fuckbase` process: it checks the configuration, takes the data dir and the port, then
runs one job process and N worker processes, and replaces any of them that dies.

    fuckbase (this process: no data, no event loop)
    ├── job process   long operations, backups and their schedule, housekeeping, fsync
    └── worker × N    the HTTP server: every request, on an event loop each

All of them open the same LMDB directory. The children die with this process (kill -9
included), so the data-dir lock and the port go with them and a restart finds both free.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

import orjson

from fuckbase import heap
from fuckbase.config import Settings
from fuckbase.storage import Storage

log = logging.getLogger("fuckbase")

STARTUP_WAIT = 3.0  # seconds to wait for the lock and port of a process that is just exiting
STOP_WAIT = 20.0  # seconds a child gets to finish after SIGTERM
RESPAWN_LIMIT = 5  # deaths of one kind of child within RESPAWN_WINDOW before giving up
RESPAWN_WINDOW = 60.0
_SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT)
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}


class StartupError(RuntimeError):
    """The server cannot start; the message is the one line the operator sees."""


@dataclass(frozen=True)
class Runtime:
    """What every child needs besides the settings, fixed before the first fork."""

    settings: Settings
    stream: TextIO
    sock: socket.socket
    run_dir: Path
    jobs_address: str
    parent: int
    started: bool = False  # the first start is over: a process started again waits for an absent database

    @property
    def store_path(self) -> Path:
        return self.settings.data_dir / "store"

    def open_storage(self, *, primary: bool = False) -> Storage:
        """The configured backend: PostgreSQL for a `postgresql://` URL, else the embedded
        engine in the data dir (the job process opens it as the primary: it does the
        housekeeping)."""
        if self.settings.storage:
            from fuckbase.storage.postgresql import PostgresStorage

            threads = 4 if primary else self.settings.request_threads + 2
            return PostgresStorage(self.settings.storage, pool_size=threads,
                                   statement_timeout_ms=int(self.settings.storage_timeout * 1000),
                                   wait_for_database=self.started)
        from fuckbase.storage.lmdb import LmdbStorage

        return LmdbStorage(self.store_path, primary=primary)


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
    # httpx logs each request's URL at INFO: for S3 those are presigned (credential id, signature)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def lock_data_dir(data_dir: Path) -> int:
    """One server per data directory. Waits a moment first: a restart right after kill -9 may
    find the old processes still exiting."""
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


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + STARTUP_WAIT
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(2048)
            sock.setblocking(False)
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        time.sleep(0.05)


def _prepare_run_dir(data_dir: Path) -> Path:
    """`<data-dir>/run`: the processes' published metrics and the job socket; reset per start."""
    run_dir = data_dir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    return run_dir


def _jobs_address(run_dir: Path) -> str:
    path = str(run_dir / "jobs.sock")
    if len(path.encode()) < 100:  # sun_path holds 108 bytes
        return path
    return f"\0fuckbase-{os.getpid()}-{secrets.token_hex(8)}"  # Linux's abstract namespace


def die_with(parent: int) -> None:
    """This child gets SIGKILL when the `fuckbase` process dies, however it dies."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def run(settings: Settings) -> None:
    """Validate, lock the data dir, bind, start the children; serve until SIGTERM/SIGINT."""
    settings.validate()
    heap.few_arenas()
    stream = log_stream(settings)
    setup_logging(settings, stream)
    lock_data_dir(settings.data_dir)
    sock = listen(settings.host, settings.port)
    run_dir = _prepare_run_dir(settings.data_dir)
    runtime = Runtime(settings, stream, sock, run_dir, _jobs_address(run_dir), os.getpid())
    Supervisor(runtime).run()


class Supervisor:
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.job_pid = 0
        self.workers: dict[int, int] = {}  # pid -> slot
        self.backup_target = ""
        self._deaths: list[float] = []

    def run(self) -> None:
        settings = self.rt.settings
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            self._start_job_process()
            for slot in range(settings.workers):
                self._start_worker(slot)
            # a process that dies from now on is started again even while PostgreSQL is away
            # (it answers 503 until it is back); at the first start that is a configuration error
            self.rt = replace(self.rt, started=True)
            log.info(
                "fuckbase listening on %s:%d, data in %s, durability %s, %d worker%s",
                settings.host, settings.port, settings.storage_label, settings.durability, settings.workers,
                "" if settings.workers == 1 else "s",
            )
            self._watch()
        finally:
            self._stop_children()

    # ------------------------------------------------------------------ children

    def _fork(self, main: Callable[[], None]) -> int:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
                die_with(self.rt.parent)
                main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                log.exception("process failed")
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        return pid

    def _start_job_process(self) -> None:
        """Starts the job process and waits until it is ready (the data upgraded, a restore
        on start done, its socket listening) or has failed, which ends the server."""
        from fuckbase.jobs import job_process

        read_end, write_end = os.pipe()
        pid = self._fork(lambda: job_process(self.rt, write_end))
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            report = pipe.read()
        if not report:
            os.waitpid(pid, 0)
            raise StartupError("the job process died while starting")
        status = orjson.loads(report)
        if "error" in status:
            os.waitpid(pid, 0)
            raise StartupError(status["error"])
        self.backup_target = status["backup_target"]
        self.job_pid = pid

    def _start_worker(self, slot: int) -> None:
        from fuckbase.worker import worker_process

        pid = self._fork(lambda: worker_process(self.rt, slot, self.backup_target))
        self.workers[pid] = slot

    def _watch(self) -> None:
        while True:
            info = signal.sigwaitinfo(_SIGNALS)
            if info.si_signo != signal.SIGCHLD:
                log.info("stopping (signal %d)", info.si_signo)
                return
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    return
                if pid == 0:
                    break
                self._child_died(pid, status)

    def _child_died(self, pid: int, status: int) -> None:
        how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit status {os.WEXITSTATUS(status)}"
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < RESPAWN_WINDOW] + [now]
        if len(self._deaths) > RESPAWN_LIMIT:
            raise StartupError(f"processes keep dying ({len(self._deaths)} in {RESPAWN_WINDOW:.0f} s); stopped")
        if pid == self.job_pid:
            log.error("the job process died (%s); starting a new one", how)
            self._start_job_process()
        elif pid in self.workers:
            slot = self.workers.pop(pid)
            log.error("worker %d died (%s); starting a new one", slot, how)
            self._start_worker(slot)

    def _stop_children(self) -> None:
        """Workers first (they finish their requests), then the job process."""
        for group in (list(self.workers), [self.job_pid] if self.job_pid else []):
            for pid in group:
                _signal(pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_WAIT
            for pid in group:
                while True:
                    try:
                        done, _ = os.waitpid(pid, os.WNOHANG)
                    except ChildProcessError:
                        break
                    if done:
                        break
                    if time.monotonic() > deadline:
                        _signal(pid, signal.SIGKILL)
                        os.waitpid(pid, 0)
                        break
                    time.sleep(0.02)
        self.workers.clear()
        self.job_pid = 0
        log.info("fuckbase stopped")


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
