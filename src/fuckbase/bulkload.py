"""`fuckbase import`: JSON Lines into a set through /set/batch, a batch per request.

Lines are checked one by one (so an error names its line) but sent as they are: the body of
a batch is the lines joined, with `"op":"put"` added where a line has no "op". Two batches are
in flight at once, so reading the file and applying on the server overlap.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson

from fuckbase.client import Client, FuckBaseError

PUT_HEAD = b'{"op":"put",'


@dataclass
class ImportResult:
    lines: int
    applied: int
    seconds: float


def encode_line(line: bytes, number: int) -> bytes:
    """The operation of one line, as it goes into the batch's JSON array."""
    try:
        op = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"line {number}: not JSON: {exc}") from None
    if not isinstance(op, dict) or not isinstance(op.get("key"), str):
        raise ValueError(f'line {number}: must be an object with a string "key"')
    line = line.strip()
    if "op" in op:
        return line
    if "value" not in op:
        raise ValueError(f'line {number}: a put needs a "value"')
    return PUT_HEAD + line[1:]


def import_lines(lines: Iterable[bytes], url: str, database: str, set_name: str, auth: Any,
                 batch_size: int, progress: Callable[[int], None] = lambda n: None) -> ImportResult:
    started = time.monotonic()
    applied = count = 0
    with Client(url, auth=auth, timeout=600) as client, ThreadPoolExecutor(1) as sender:
        target = client.database(database).set(set_name)
        in_flight: Future[int] | None = None
        batch: list[bytes] = []
        first_line = 1

        def send(ops: list[bytes], first: int) -> Future[int]:
            body = b"[" + b",".join(ops) + b"]"
            return sender.submit(_send, target, body, first)

        for number, line in enumerate(lines, 1):
            progress(len(line))
            if not line.strip():
                continue
            batch.append(encode_line(line, number))
            count += 1
            if len(batch) >= batch_size:
                if in_flight is not None:
                    applied += in_flight.result()
                in_flight = send(batch, first_line)
                batch, first_line = [], number + 1
        if in_flight is not None:
            applied += in_flight.result()
        if batch:
            applied += send(batch, first_line).result()
    return ImportResult(count, applied, time.monotonic() - started)


def _send(target: Any, body: bytes, first_line: int) -> int:
    try:
        return int(target.batch_encoded(body))
    except FuckBaseError as exc:
        raise ValueError(f"the batch from line {first_line} on was refused: {exc.code}: {exc.message}") from None
