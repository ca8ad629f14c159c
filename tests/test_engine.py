"""Engine unit tests: building an index never stalls other work; drops reclaim space later."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson

from fuckbase.engine import Engine, data_key
from fuckbase.indexes import IndexDef

N = 200_000


async def _bulk_load(engine: Engine, db_name: str, set_name: str, n: int) -> None:
    await engine.create_database(db_name, None)
    db = engine.database(db_name)
    await engine.create_set(db, set_name)
    s = db.sets[set_name]

    def load(txn):  # type: ignore[no-untyped-def]
        for i in range(n):
            txn.put(data_key(s.prefix, f"k{i}"), orjson.dumps({"email": f"u{i}@x", "i": i}), db=engine.data)
        s.count = n

    await engine.submit(load)


async def _until_reclaimed(engine: Engine, prefix: bytes) -> None:
    for _ in range(300):
        await asyncio.sleep(0.01)
        with engine.env.begin(db=engine.data) as txn:
            cur = txn.cursor()
            if not cur.set_range(prefix) or not cur.key().startswith(prefix):
                return
    raise AssertionError("the dropped set's entries were not reclaimed")


async def test_index_build_does_not_stop_reads(tmp_path: Path) -> None:
    engine = Engine(tmp_path / "store")
    engine.start(asyncio.get_running_loop())
    await _bulk_load(engine, "big", "s", N)
    await engine.create_database("other", None)
    other = engine.database("other")
    await engine.put(other, "t", "k", {"v": 1}, b'{"v":1}')
    other_set = other.sets["t"]
    big = engine.database("big")

    gaps: list[float] = []
    reads = 0

    async def reader() -> None:
        nonlocal reads
        last = time.perf_counter()
        while not build.done():
            assert engine.get(other_set, "k") == b'{"v":1}'
            reads += 1
            await asyncio.sleep(0)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async def writer() -> None:
        i = 0
        while not build.done():
            await engine.put(big, "s", f"k{i}", {"email": f"new{i}@x"}, orjson.dumps({"email": f"new{i}@x"}))
            i += 1
            await asyncio.sleep(0)

    build = asyncio.ensure_future(engine.create_index(big, "s", IndexDef("by_email", "email")))
    await asyncio.gather(build, reader(), writer())
    assert reads >= N // 4096  # at least one read between every two chunks of the build
    assert max(gaps) < 0.25, max(gaps)
    idx = big.sets["s"].indexes["by_email"]
    # exact: every entry once, with its current value (writes during the build included)
    assert idx.entry_count() == N
    assert idx.lookup("new0@x") == ["k0"] and idx.lookup("u0@x") == []
    assert idx.lookup(f"u{N - 1}@x") == [f"k{N - 1}"]
    await engine.close()


async def test_dropped_database_space_is_reclaimed(tmp_path: Path) -> None:
    engine = Engine(tmp_path / "store")
    engine.start(asyncio.get_running_loop())
    await _bulk_load(engine, "big", "s", 20_000)
    prefix = engine.database("big").sets["s"].prefix
    await engine.drop_database(engine.database("big"))
    await _until_reclaimed(engine, prefix)
    await engine.close()


async def test_reclaim_resumes_after_restart(tmp_path: Path) -> None:
    engine = Engine(tmp_path / "store")
    await _bulk_load(engine, "big", "s", 30_000)
    prefix = engine.database("big").sets["s"].prefix
    await engine.drop_database(engine.database("big"))  # no background task: engine not started
    engine.env.close()
    engine = Engine(tmp_path / "store")
    assert "big" not in engine.databases
    engine.start(asyncio.get_running_loop())
    await _until_reclaimed(engine, prefix)
    await engine.close()


async def test_storage_map_grows_on_demand(tmp_path: Path, monkeypatch: Any) -> None:
    import fuckbase.engine as engine_module

    monkeypatch.setattr(engine_module, "MIN_MAP_SIZE", 1 << 20)
    monkeypatch.setattr(engine_module, "ROOM_CHECK_EVERY", 1)
    engine = Engine(tmp_path / "store")
    engine.start(asyncio.get_running_loop())
    await engine.create_database("d", None)
    db = engine.database("d")
    value = {"v": "x" * 2000}
    for i in range(3000):  # ~6 MB through a 1 MiB initial map
        await engine.put(db, "s", f"k{i}", value, orjson.dumps(value))
    assert engine.env.info()["map_size"] >= 8 << 20
    assert engine.get(db.sets["s"], "k2999") == orjson.dumps(value)
    await engine.close()
    reopened = Engine(tmp_path / "store")
    assert reopened.database("d").sets["s"].count == 3000
    reopened.env.close()
