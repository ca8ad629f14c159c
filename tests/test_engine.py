"""Engine unit tests: index builds never stall other threads' work; drops reclaim space later;
the map grows under concurrent lock-free reads; lookups never answer non-matching values."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import orjson

from fuckbase.engine import Engine, data_key
from fuckbase.indexes import IndexDef

N = 200_000


def _bulk_load(engine: Engine, db_name: str, set_name: str, n: int) -> None:
    engine.create_database(db_name, None)
    db = engine.database(db_name)
    engine.create_set(db, set_name)
    s = db.sets[set_name]

    def load(txn):  # type: ignore[no-untyped-def]
        for i in range(n):
            txn.put(data_key(s.prefix, f"k{i}"), orjson.dumps({"email": f"u{i}@x", "i": i}), db=engine.data)
        s.count = n

    engine.write(load)


def _until_reclaimed(engine: Engine, prefix: bytes) -> None:
    for _ in range(300):
        time.sleep(0.01)
        with engine.env.begin(db=engine.data) as txn:
            cur = txn.cursor()
            if not cur.set_range(prefix) or not cur.key().startswith(prefix):
                return
    raise AssertionError("the dropped set's entries were not reclaimed")


def _in_thread(fn: Any) -> threading.Thread:
    t = threading.Thread(target=fn)
    t.start()
    return t


def test_index_build_does_not_stop_reads_or_writes(tmp_path: Path) -> None:
    engine = Engine(tmp_path / "store")
    engine.start()
    _bulk_load(engine, "big", "s", N)
    engine.create_database("other", None)
    other = engine.database("other")
    engine.put(other, "t", "k", {"v": 1}, b'{"v":1}')
    other_set = other.sets["t"]
    big = engine.database("big")
    done = threading.Event()
    gaps: list[float] = []
    reads = writes = 0

    def reader() -> None:
        nonlocal reads
        last = time.perf_counter()
        while not done.is_set():
            assert engine.get(other_set, "k") == b'{"v":1}'
            reads += 1
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    def writer() -> None:
        nonlocal writes
        while not done.is_set():
            value = {"email": f"new{writes}@x"}
            engine.put(big, "s", f"k{writes}", value, orjson.dumps(value))
            writes += 1

    threads = [_in_thread(reader), _in_thread(writer)]
    try:
        engine.create_index(big, "s", IndexDef("by_email", "email"))
    finally:
        done.set()
        for t in threads:
            t.join()
    assert reads >= N // 2048 and writes > 0
    assert max(gaps) < 0.25, max(gaps)
    idx = big.sets["s"].indexes["by_email"]
    # exact: every entry once, with its current value (writes during the build included)
    assert idx.entry_count() == N
    assert idx.lookup("new0@x") == ["k0"] and idx.lookup("u0@x") == []
    assert idx.lookup(f"u{N - 1}@x") == [f"k{N - 1}"]
    engine.close()


def test_lookup_never_answers_a_value_that_does_not_match(tmp_path: Path) -> None:
    """Lookups take no lock; a write moving a key between two values must not leak through."""
    engine = Engine(tmp_path / "store")
    engine.start()
    engine.create_database("d", None)
    db = engine.database("d")
    engine.put(db, "s", "k", {"color": "red"}, b'{"color":"red"}')
    engine.create_index(db, "s", IndexDef("by_color", "color"))
    s = db.sets["s"]
    idx = s.indexes["by_color"]
    done = threading.Event()

    def flipper() -> None:
        for i in range(20_000):
            color = "blue" if i % 2 else "red"
            engine.put(db, "s", "k", {"color": color}, orjson.dumps({"color": color}))
        done.set()

    t = _in_thread(flipper)
    seen = 0
    while not done.is_set():
        for color in ("red", "blue"):
            for key, raw in engine.lookup(s, idx, color):
                assert key == "k" and orjson.loads(raw) == {"color": color}
                seen += 1
    t.join()
    assert seen > 0
    engine.close()


def test_dropped_database_space_is_reclaimed(tmp_path: Path) -> None:
    engine = Engine(tmp_path / "store")
    engine.start()
    _bulk_load(engine, "big", "s", 20_000)
    prefix = engine.database("big").sets["s"].prefix
    engine.drop_database(engine.database("big"))
    _until_reclaimed(engine, prefix)
    engine.close()


def test_reclaim_resumes_after_restart(tmp_path: Path) -> None:
    engine = Engine(tmp_path / "store")
    _bulk_load(engine, "big", "s", 30_000)
    prefix = engine.database("big").sets["s"].prefix
    engine.drop_database(engine.database("big"))  # no background thread: engine not started
    engine.env.close()
    engine = Engine(tmp_path / "store")
    assert "big" not in engine.databases
    engine.start()
    _until_reclaimed(engine, prefix)
    engine.close()


def test_storage_map_grows_under_concurrent_reads(tmp_path: Path, monkeypatch: Any) -> None:
    import fuckbase.engine as engine_module

    monkeypatch.setattr(engine_module, "MIN_MAP_SIZE", 1 << 20)
    monkeypatch.setattr(engine_module, "ROOM_CHECK_EVERY", 1)
    engine = Engine(tmp_path / "store")
    engine.start()
    engine.create_database("d", None)
    db = engine.database("d")
    engine.put(db, "s", "probe", {"v": 0}, b'{"v":0}')
    s = db.sets["s"]
    done = threading.Event()
    reads = 0

    def reader() -> None:  # lock-free gets while the map is remapped under them
        nonlocal reads
        while not done.is_set():
            assert engine.get(s, "probe") == b'{"v":0}'
            reads += 1

    readers = [_in_thread(reader) for _ in range(3)]
    value = {"v": "x" * 2000}
    try:
        for i in range(3000):  # ~6 MB through a 1 MiB initial map
            engine.put(db, "s", f"k{i}", value, orjson.dumps(value))
    finally:
        done.set()
        for t in readers:
            t.join()
    assert reads > 0
    assert engine.env.info()["map_size"] >= 8 << 20
    assert engine.get(s, "k2999") == orjson.dumps(value)
    engine.close()
    reopened = Engine(tmp_path / "store")
    assert reopened.database("d").sets["s"].count == 3001
    reopened.env.close()
