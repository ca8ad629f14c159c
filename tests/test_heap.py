"""How the server's processes hold memory (`fuckbase.heap`).

- Requests leave no reference cycles behind. Workers collect the youngest generation far less
  often than Python's default: that is cheap only while what a request allocates dies by its
  reference count. A request path that starts making cycles would make every worker's memory
  swing by thousands of objects between collections; the first test names it instead.
- The allocator keeps freed memory for reuse while a long operation runs, and the job process
  gives it back once the operation has ended; a worker gives back what its requests freed
  once they stop for a while.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import ServerProcess
from inprocess import in_process_app

from fuckbase import heap
from fuckbase.app import App
from fuckbase.http import Request, Response

REPEATS = 200


async def _call(app: App, path: str, body: dict[str, Any] | bytes) -> Response:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    result = app(Request("POST", path, {}, raw, "127.0.0.1"))
    return result if isinstance(result, Response) else await result.wait()


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    with in_process_app(tmp_path) as app:
        yield app


S = {"database": "shop", "set": "users"}

CASES: dict[str, tuple[str, Any, int]] = {
    "put": ("/set/put", lambda i: {**S, "key": f"k{i}", "value": {"email": f"e{i % 7}", "age": i, "tags": [i, {"a": None}]}}, 200),
    "get": ("/set/get", lambda i: {**S, "key": f"k{i}"}, 200),
    "get of a missing key": ("/set/get", lambda i: {**S, "key": f"missing{i}"}, 404),
    "get in a missing database": ("/set/get", lambda i: {**S, "database": f"nope{i}", "key": "k"}, 404),
    "query": ("/index/query", lambda i: {**S, "index": "by_email", "value": f"e{i % 7}"}, 200),
    "sorted query": ("/index/query/sorted", lambda i: {**S, "index": "by_age", "value": f"e{i % 7}",
                                                       "pagination": {"offset": i % 3, "limit": 5}}, 200),
    "batch": ("/set/batch", lambda i: {**S, "operations": [{"op": "put", "key": f"b{i}", "value": i},
                                                           {"op": "delete", "key": f"b{i}"}]}, 200),
    "batch deleting a missing key": ("/set/batch", lambda i: {**S, "operations": [{"op": "delete", "key": f"none{i}"}]}, 404),
    "delete": ("/set/delete", lambda i: {**S, "key": f"k{i}"}, 200),
    "malformed JSON": ("/set/put", lambda i: b'{"database": ', 400),
    "a field of the wrong type": ("/set/put", lambda i: {**S, "key": i, "value": 1}, 400),
}


async def test_requests_make_no_reference_cycles(app: App) -> None:
    assert (await _call(app, "/create", {"name": "shop"})).status == 200
    assert (await _call(app, "/set/create", {"database": "shop", "name": "users"})).status == 200
    assert (await _call(app, "/index/create", {**S, "name": "by_email", "field": "email"})).status == 200
    sortable = {**S, "name": "by_age", "primary_field": "email", "sort_fields": ["age"]}
    assert (await _call(app, "/index/create/sortable", sortable)).status == 200
    gc.collect()
    gc.disable()
    try:
        for name, (path, body, status) in CASES.items():
            for i in range(REPEATS, REPEATS + 20):  # caches fill on the first requests
                await _call(app, path, body(i))
            gc.collect()
            for i in range(REPEATS):
                response = await _call(app, path, body(i))
                assert response.status == status, (name, response.body)
            assert gc.collect() == 0, f"{name}: {REPEATS} requests left cycles behind"
    finally:
        gc.enable()


def _anonymous_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise AssertionError("no RssAnon")


def _job_process(srv: ServerProcess) -> int:
    assert srv.proc is not None
    children = [int(c) for task in Path(f"/proc/{srv.proc.pid}/task").iterdir()
                for c in (task / "children").read_text().split()]
    return min(children)  # forked first, before the workers


def test_the_job_process_gives_back_what_a_restore_freed(server: ServerProcess) -> None:
    server.ok("/create", {"name": "big"})
    for start in range(0, 200_000, 20_000):
        ops = [{"op": "put", "key": f"k{i}", "value": {"email": f"user{i}@example.com", "n": i, "pad": "x" * 100}}
               for i in range(start, start + 20_000)]
        server.ok("/set/batch", {"database": "big", "set": "users", "operations": ops}, timeout=60)
    name = server.ok("/backup/create", {"database": "big"}, timeout=120)["backup_name"]
    job = _job_process(server)
    before = _anonymous_kib(job)
    server.ok("/backup/restore", {"backup_name": name}, timeout=120)
    time.sleep(0.5)
    grown = _anonymous_kib(job) - before
    assert grown < 16 * 1024, f"the job process kept {grown} KiB after a restore"


def test_a_worker_gives_back_freed_memory_once_per_burst_when_requests_stop() -> None:
    quiet = heap.Quiet(0, ticks=2)
    assert [quiet.tick(0) for _ in range(3)] == [False] * 3  # nothing happened: nothing to give back
    assert [quiet.tick(n) for n in (3, 9, 9, 14)] == [False] * 4  # a burst, with a pause shorter than the wait
    assert [quiet.tick(14) for _ in range(4)] == [False, True, False, False]  # quiet since: once
    assert [quiet.tick(15), quiet.tick(15), quiet.tick(15)] == [False, False, True]  # the next burst
