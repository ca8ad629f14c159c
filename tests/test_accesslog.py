"""The access log's lines and how they are cut into writes (several workers share one stream)."""

from __future__ import annotations

import calendar
import re
import select
import time
from pathlib import Path

from fuckbase.accesslog import AccessLog, pieces


def test_lines_say_when_what_and_how_long(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    with path.open("w") as stream:
        log = AccessLog(stream)
        now = time.time()
        log.record("POST", "/set/get", 200, 0.000123)
        log.record("POST", "/set/put", 507, 1.5)
        log.record("GET", "/caf\u00e9", 404, 0)
        log.flush()
        log.flush()  # nothing pending: nothing written
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    assert re.fullmatch(stamp + r" access POST /set/get 200 123us", lines[0])
    assert re.fullmatch(stamp + r" access POST /set/put 507 1500000us", lines[1])
    assert re.fullmatch(stamp + " access GET /caf\u00e9 404 0us", lines[2])
    written = calendar.timegm(time.strptime(lines[0][:19], "%Y-%m-%dT%H:%M:%S"))
    assert abs(written + int(lines[0][20:23]) / 1000 - now) < 2


def test_writes_are_whole_lines_of_at_most_pipe_buf() -> None:
    lines = [b"x" * (n % 300) + b"\n" for n in range(2000)]
    lines[700] = b"y" * (select.PIPE_BUF * 2) + b"\n"  # too long for one atomic write: alone
    data = b"".join(lines)
    cut = pieces(data)
    assert b"".join(cut) == data
    for piece in cut:
        assert bytes(piece).endswith(b"\n")
        assert len(piece) <= select.PIPE_BUF or bytes(piece).count(b"\n") == 1
    assert max(len(p) for p in cut) == select.PIPE_BUF * 2 + 1
    assert pieces(b"") == []
