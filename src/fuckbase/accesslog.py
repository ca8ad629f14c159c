"""An access log that costs one list append per request.

Lines are formatted and written by a background task a few times a second, in one write,
instead of going through logging's handlers and locks on every request.
"""

from __future__ import annotations

import asyncio
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
            lines.append(
                "%s.%03dZ access %s %s %d %dus\n"
                % (stamp, (ts - second) * 1000, method, path, status, seconds * 1e6)
            )
        self._stream.write("".join(lines))
        self._stream.flush()

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(FLUSH_INTERVAL)
                self.flush()
        finally:
            self.flush()
