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
