"""An access log that costs one list append per request.

Lines are formatted and written by a task of the event loop a few times a second, instead of
going through logging's handlers on every request. Every worker writes to the same stream,
so a batch goes out in writes of whole lines of at most PIPE_BUF bytes: the kernel keeps each
such write in one piece, on a pipe as on a file opened for appending.
"""

from __future__ import annotations

import asyncio
import os
import select
import time
from typing import TextIO

FLUSH_INTERVAL = 0.05  # short: a long batch would stall the loop for milliseconds


class AccessLog:
    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._pending: list[tuple[float, str, str, int, float]] = []

    def record(self, method: str, path: str, status: int, seconds: float) -> None:
        self._pending.append((time.time(), method, path, status, seconds))

    def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        lines = []
        second, stamp = -1, ""
        for ts, method, path, status, seconds in batch:
            if int(ts) != second:
                second = int(ts)
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            lines.append(f"{stamp}.{int((ts - second) * 1000):03d}Z access {method} {path} {status} {int(seconds * 1e6)}us\n")
        self._stream.flush()  # what logging wrote before goes first
        fd = self._stream.fileno()
        chunk: list[bytes] = []
        size = 0
        for line in lines:
            raw = line.encode("utf-8", "replace")
            if size + len(raw) > select.PIPE_BUF and chunk:
                _write_all(fd, b"".join(chunk))
                chunk, size = [], 0
            chunk.append(raw)
            size += len(raw)
        if chunk:
            _write_all(fd, b"".join(chunk))

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(FLUSH_INTERVAL)
                self.flush()
        finally:
            self.flush()


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            n = os.write(fd, data)
        except BlockingIOError:
            time.sleep(0.001)
            continue
        except OSError:
            return  # a closed or full log: the lines are lost, the server goes on
        data = data[n:]
