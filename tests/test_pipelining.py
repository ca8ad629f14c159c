"""Pipelined requests on one connection: writes join one group commit as they arrive, and the
answers that became ready together leave in one write (a connection's protocol fed in this
process, the App and LMDB store real; the transport records what would go on the wire)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from inprocess import in_process_app

from fuckbase.app import App
from fuckbase.http import HttpServer

PUTS = 100


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _post(path: str, body: Any) -> bytes:
    raw = json.dumps(body).encode()
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(raw)}\r\n\r\n".encode() + raw


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    with in_process_app(tmp_path) as app:
        app.api.storage.create_database("shop", None)
        yield app


async def _answers(transport: RecordingTransport, n: int) -> list[bytes]:
    for _ in range(100):
        wire = b"".join(transport.writes)
        if wire.count(b"HTTP/1.1 ") >= n:
            return [b"HTTP/1.1 " + part for part in wire.split(b"HTTP/1.1 ")[1:]]
        await asyncio.sleep(0.01)
    raise AssertionError(f"{wire.count(b'HTTP/1.1 ')} of {n} answers")


async def test_pipelined_puts_share_one_commit_and_one_write(app: App) -> None:
    protocol = HttpServer(app, 1 << 20, 30.0, app.joins).protocol()
    transport = RecordingTransport()
    protocol.connection_made(transport)
    storage = app.api.storage
    before = storage.sequence()
    puts = [_post("/set/put", {"database": "shop", "set": "users", "key": f"k{i}", "value": i}) for i in range(PUTS)]
    protocol.data_received(b"".join(puts) + _post("/set/get", {"database": "shop", "set": "users", "key": f"k{PUTS - 1}"}))
    answers = await _answers(transport, PUTS + 1)
    assert all(b" 200 OK\r\n" in a.split(b"\r\n", 1)[0] + b"\r\n" for a in answers)
    assert answers[-1].endswith(b'{"status":"success","data":%d}' % (PUTS - 1))  # the read sees the writes before it
    assert storage.sequence() - before == 1, "the pipelined puts were committed one group each"
    assert len(transport.writes) == 1, "the answers that became ready together left in one write"


async def test_a_read_between_writes_waits_for_their_commit(app: App) -> None:
    protocol = HttpServer(app, 1 << 20, 30.0, app.joins).protocol()
    transport = RecordingTransport()
    protocol.connection_made(transport)
    put = _post("/set/put", {"database": "shop", "set": "users", "key": "k", "value": 1})
    get = _post("/set/get", {"database": "shop", "set": "users", "key": "k"})
    put2 = _post("/set/put", {"database": "shop", "set": "users", "key": "k", "value": 2})
    protocol.data_received(put + get + put2 + get)
    answers = await _answers(transport, 4)
    assert answers[1].endswith(b'{"status":"success","data":1}')
    assert answers[3].endswith(b'{"status":"success","data":2}')
