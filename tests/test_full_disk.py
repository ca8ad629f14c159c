"""A full disk: writes get 507 and store nothing, reads go on, writes resume once there is
room again, and no acknowledged write is lost (on a small tmpfs; mounting it needs root)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk(make_server: Any, small_disk: Path) -> None:
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * (4 << 20))
    srv = make_server(data_dir=small_disk / "data")
    srv.ok("/create", {"name": "shop"})
    srv.ok("/set/put", {"database": "shop", "set": "s", "key": "first", "value": {"n": 0}})
    srv.ok("/index/create", {"database": "shop", "set": "s", "name": "n", "field": "n"})
    acknowledged = []
    blob = "x" * 60_000
    for i in range(2000):
        r = srv.post("/set/put", {"database": "shop", "set": "s", "key": f"k{i}", "value": {"n": i, "blob": blob}})
        if r.status_code == 507:
            assert r.json()["code"] == "INSUFFICIENT_STORAGE"
            break
        assert r.status_code == 200, r.text
        acknowledged.append(i)
    else:
        raise AssertionError("the disk never filled up")
    assert len(acknowledged) > 100
    # refused writes keep being refused, reads and queries go on
    for _ in range(5):
        assert srv.post("/set/put", {"database": "shop", "set": "s", "key": "more", "value": blob}).status_code == 507
    assert srv.ok("/set/get", {"database": "shop", "set": "s", "key": f"k{acknowledged[-1]}"})["data"]["n"] == acknowledged[-1]
    assert srv.ok("/index/query", {"database": "shop", "set": "s", "index": "n", "value": "0"})["data"]["count"] == 2
    assert srv.ok("/set/list", {"database": "shop"})["data"]["sets"] == ["s"]  # nothing looks missing
    ballast.unlink()  # room again: writes work by themselves
    srv.ok("/set/put", {"database": "shop", "set": "s", "key": "after", "value": {"n": -1}})
    srv.kill9()
    srv.start()
    for i in acknowledged:
        assert srv.ok("/set/get", {"database": "shop", "set": "s", "key": f"k{i}"})["data"]["n"] == i
    assert srv.ok("/set/get", {"database": "shop", "set": "s", "key": "after"})["data"] == {"n": -1}
    assert srv.post("/set/get", {"database": "shop", "set": "s", "key": "more"}).status_code == 404


def _fill_until_full(write: Any) -> int:
    """Calls write(i) until it raises StorageFull; how many calls succeeded."""
    from fuckbase.storage.interface import StorageFull

    for i in range(100_000):
        try:
            write(i)
        except StorageFull:
            return i
    raise AssertionError("the disk never filled up")


def test_every_kind_of_big_write_stops_whole_at_a_full_disk(small_disk: Path) -> None:
    """Each kind of transaction that writes much (puts in a group, batches, restores, index
    builds) runs until the disk is full: the call that does not fit fails with StorageFull
    and leaves nothing of itself, the calls before it stay, reads go on, and writes resume
    once there is room."""
    import orjson

    from fuckbase.storage.interface import BASIC, SORTABLE, IndexDef, Put, StorageFull, allow_all
    from fuckbase.storage.lmdb import LmdbStorage

    ballast = [small_disk / f"ballast{i}" for i in range(4)]
    for b, mb in zip(ballast, (4, 6, 6, 4), strict=True):  # room for each kind in turn
        b.write_bytes(b"\0" * (mb << 20))
    s = LmdbStorage(small_disk / "store", primary=True)

    def value(i: int, pad: int) -> tuple[Any, bytes]:
        v = {"tag": f"t{i % 97}", "n": i, "pad": "p" * pad}
        return v, orjson.dumps(v)

    def group_of_puts(i: int) -> None:
        s.begin_group()
        for j in range(10):
            s.put("d", "s", f"g{i}-{j}", *value(i * 10 + j, 300), allow_all)
        failure = next((f for f in s.end_group() if f is not None), None)
        if failure is not None:
            raise failure

    def batch(i: int) -> None:
        s.batch("d", "s", [Put(f"b{i}-{j}", *value(j, 40)) for j in range(100)], allow_all)

    def restore(i: int) -> None:
        w = s.restore_writer()
        db = w.add_database()
        db.name = f"r{i}"
        w.add_index(db, "s", IndexDef("by", "tag", SORTABLE, ("n",)))
        try:
            w.write(db, "s", [(f"k{j}", *value(j, 60)) for j in range(100)])
            w.commit(replace_all=False)
        except StorageFull:
            w.abort()
            raise

    def index_build(i: int) -> None:
        s.create_index("d", "s", IndexDef(f"late{i}", "n", SORTABLE, ("tag", "pad")), allow_all)

    try:
        s.create_database("d", None)
        s.create_set("d", "s", allow_all)
        s.create_index("d", "s", IndexDef("tag", "tag", BASIC), allow_all)
        s.create_index("d", "s", IndexDef("by", "tag", SORTABLE, ("n", "pad")), allow_all)
        def stored(kind: Any, i: int) -> bool:
            """Whether anything of call `i` of `kind` is there."""
            with s.read() as view:
                d = view.database("d")  # reads go on
                if kind is restore:
                    return f"r{i}" in view.database_names()
                if kind is index_build:
                    return f"late{i}" in d.sets["s"].indexes
                first = f"g{i}-0" if kind is group_of_puts else f"b{i}-0"
                return view.get(d, "s", first) is not None

        for kind, room in zip((group_of_puts, batch, restore, index_build), ballast, strict=True):
            room.unlink()  # room again: writes resume by themselves
            refused = _fill_until_full(kind)
            assert refused > 0 or kind is index_build, kind.__name__
            assert not stored(kind, refused) and (refused == 0 or stored(kind, refused - 1))
    finally:
        s.close()
