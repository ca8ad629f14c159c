"""A data dir written by release 0.1.0 opens under the current engine, upgraded once.

The fixture was made by release 0.1.0's server through its HTTP API: database "shop" with
users u000-u298 (u299 was deleted) and one key of 600 characters, an email index and a
sortable index by department (hired, name); sets "items" and "empty"; database "secret"
protected by alice/s3cr3t; database "gone", dropped.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

from conftest import basic

FIXTURE = Path(__file__).parent / "fixtures" / "datadir-0.1.0.tar.gz"
DEPTS = ["eng", "ops", "sales"]


def _user(i: int) -> dict[str, Any]:
    return {"name": f"n{i % 7}", "email": f"user{i}@example.com", "dept": DEPTS[i % 3], "hired": 2000 + i % 20}


def _old_data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "old"
    data.mkdir()
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(data, filter="data")
    return data


def test_release_0_1_data_dir_is_upgraded_in_place(make_server: Any, tmp_path: Path) -> None:
    srv = make_server(data_dir=_old_data_dir(tmp_path))
    assert "upgrading" in srv.log()
    for attempt in range(2):  # and once more after a restart, which must not upgrade again
        assert srv.ok("/set/list", {"database": "shop"})["data"]["sets"] == ["empty", "items", "users"]
        assert srv.ok("/set/get", {"database": "shop", "set": "users", "key": "u005"})["data"] == _user(5)
        assert srv.post("/set/get", {"database": "shop", "set": "users", "key": "u299"}).status_code == 404
        assert srv.ok("/set/get", {"database": "shop", "set": "users", "key": "x" * 600})["data"]["email"] == "long@example.com"
        assert srv.ok("/set/get", {"database": "shop", "set": "items", "key": "i2"})["data"] is None
        found = srv.ok("/index/query", {"database": "shop", "set": "users", "index": "email_index",
                                        "value": "user7@example.com"})["data"]
        assert found["count"] == 1 and found["data"][0]["key"] == "u007"
        eng = sorted(k for k in (f"u{i:03d}" for i in range(299)) if DEPTS[int(k[1:]) % 3] == "eng")
        eng.sort(key=lambda k: _user(int(k[1:]))["hired"], reverse=True)
        page = srv.ok("/index/query/sorted", {"database": "shop", "set": "users", "index": "by_dept", "value": "eng",
                                              "sort": {"field": "hired", "order": "desc"},
                                              "pagination": {"limit": 7}})
        long_key_is_eng = 1
        assert page["total"] == len(eng) + long_key_is_eng
        assert [e["key"] for e in page["data"]] == eng[:7]
        assert srv.post("/set/get", {"database": "secret", "set": "s", "key": "k"}).status_code == 401
        assert srv.ok("/set/get", {"database": "secret", "set": "s", "key": "k"},
                      headers={"Authorization": basic("alice", "s3cr3t")})["data"] == {"v": 1}
        assert srv.post("/set/list", {"database": "gone"}).status_code == 404
        assert srv.ok("/server/info")["databases_count"] == 2
        srv.ok("/set/put", {"database": "shop", "set": "users", "key": f"new{attempt}", "value": _user(1)})
        if attempt == 0:
            log_before = srv.log().count("upgrading")
            srv.restart()
    assert srv.log().count("upgrading") == log_before
    assert srv.ok("/index/query", {"database": "shop", "set": "users", "index": "email_index",
                                   "value": "user1@example.com"})["data"]["count"] == 3
