"""Backups to the default local folder: create, list, verify, restore, and every way to fail."""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ServerProcess, basic


def backup_dir(srv: ServerProcess) -> Path:
    return srv.data_dir / "backups"


def fill(srv: ServerProcess, db: str = "shop", n: int = 50) -> None:
    srv.ok("/create", {"name": db})
    for i in range(n):
        srv.ok("/set/put", {"database": db, "set": "users", "key": f"u{i}", "value": {"email": f"u{i}@x", "n": i}})
    srv.ok("/index/create", {"database": db, "set": "users", "name": "email", "field": "email"})
    srv.ok("/index/create/sortable", {"database": db, "set": "users", "name": "srt", "primary_field": "email", "sort_fields": ["n"]})


def err(srv: ServerProcess, path: str, body: Any, status: int, code: str) -> dict[str, Any]:
    r = srv.post(path, body)
    assert r.status_code == status, r.text
    assert r.json()["code"] == code, r.text
    return r.json()  # type: ignore[no-any-return]


def test_database_backup_round_trip(server: ServerProcess) -> None:
    fill(server)
    created = server.ok("/backup/create", {"database": "shop"})
    assert created["message"] == "Database backed up successfully"
    name = created["backup_name"]
    assert name.startswith("backups/shop/") and name.endswith(".json")
    assert created["entries"] == 50 and created["size"] > 0
    listed = server.ok("/backup/list", {"database": "shop"})["backups"]
    assert listed[0]["name"] == name and listed[0]["database"] == "shop" and listed[0]["size"] == created["size"]
    assert listed[0]["timestamp"].endswith("Z")
    # change things, then restore: exactly the old state comes back, indexes included
    server.ok("/set/put", {"database": "shop", "set": "users", "key": "u1", "value": {"email": "changed@x", "n": -1}})
    server.ok("/set/put", {"database": "shop", "set": "users", "key": "new", "value": {"email": "new@x"}})
    server.ok("/set/delete", {"database": "shop", "set": "users", "key": "u2"})
    server.ok("/set/put", {"database": "shop", "set": "extra", "key": "k", "value": 1})
    assert server.ok("/backup/verify", {"backup_name": name})["checksum"] == "verified"
    r = server.ok("/backup/restore", {"backup_name": name})
    assert r["message"] == "Database restored successfully"
    assert server.ok("/set/get", {"database": "shop", "set": "users", "key": "u1"})["data"] == {"email": "u1@x", "n": 1}
    assert server.ok("/set/get", {"database": "shop", "set": "users", "key": "u2"})["data"]["n"] == 2
    err(server, "/set/get", {"database": "shop", "set": "users", "key": "new"}, 404, "KEY_NOT_FOUND")
    assert server.ok("/set/list", {"database": "shop"})["data"]["sets"] == ["users"]
    q = server.ok("/index/query", {"database": "shop", "set": "users", "index": "email", "value": "u1@x"})
    assert q["data"]["count"] == 1
    assert server.ok("/index/query", {"database": "shop", "set": "users", "index": "email", "value": "changed@x"})["data"]["count"] == 0
    page = server.ok("/index/query/sorted", {"database": "shop", "set": "users", "index": "srt", "value": "u7@x"})
    assert page["total"] == 1
    # and it survives a restart
    server.restart()
    assert server.ok("/set/get", {"database": "shop", "set": "users", "key": "u1"})["data"]["n"] == 1


def test_full_backup_replaces_all_databases(server: ServerProcess) -> None:
    fill(server, "a", 5)
    fill(server, "b", 5)
    created = server.ok("/backup/create", {})
    assert created["message"] == "All databases backed up successfully"
    name = created["backup_name"]
    assert name.startswith("backups/full/")
    assert server.ok("/backup/list", {})["backups"][0] == {
        "name": name, "timestamp": server.ok("/backup/list", {})["backups"][0]["timestamp"],
        "size": created["size"], "database": "all",
    }
    text = (backup_dir(server) / name).read_text()
    doc = json.loads(text)
    assert doc["metadata"]["database_count"] == 2 and doc["metadata"]["entry_count"] == 10
    assert set(doc["databases"]) == {"a", "b"}
    server.ok("/drop", {"name": "a"})
    server.ok("/create", {"name": "c"})
    server.ok("/backup/restore", {"backup_name": name})
    assert server.ok("/server/info", {})["databases_count"] == 2
    err(server, "/set/list", {"database": "c"}, 404, "DB_NOT_FOUND")
    assert server.ok("/set/get", {"database": "a", "set": "users", "key": "u4"})["data"]["n"] == 4


def test_database_restore_leaves_other_databases_alone(server: ServerProcess) -> None:
    fill(server, "a", 3)
    name = server.ok("/backup/create", {"database": "a"})["backup_name"]
    fill(server, "b", 3)
    server.ok("/backup/restore", {"backup_name": name})
    assert server.ok("/set/get", {"database": "b", "set": "users", "key": "u2"})["data"]["n"] == 2


def test_null_database_means_all_and_names_never_collide(server: ServerProcess) -> None:
    fill(server, "a", 2)
    names = [server.ok("/backup/create", {"database": None})["backup_name"] for _ in range(3)]
    names += [server.ok("/backup/create", {"database": "a"})["backup_name"] for _ in range(3)]
    assert len(set(names)) == 6
    listed = [b["name"] for b in server.ok("/backup/list", {})["backups"]]
    assert sorted(listed) == sorted(names)
    full = [b["name"] for b in server.ok("/backup/list", {})["backups"] if b["database"] == "all"]
    # newest first, and the names sort by time as well
    assert full == sorted(full, reverse=True) or len({n[:27] for n in full}) > 1


def test_list_filters_by_exact_database(server: ServerProcess) -> None:
    fill(server, "a", 1)
    fill(server, "ab", 1)
    server.ok("/backup/create", {"database": "a"})
    server.ok("/backup/create", {"database": "ab"})
    assert [b["database"] for b in server.ok("/backup/list", {"database": "a"})["backups"]] == ["a"]
    # a database that does not exist here: disaster recovery lists before restoring
    assert server.ok("/backup/list", {"database": "elsewhere"})["backups"] == []
    err(server, "/backup/list", {"database": "../x"}, 400, "INVALID_REQUEST")


def test_backup_errors(server: ServerProcess) -> None:
    err(server, "/backup/create", {"database": "nope"}, 404, "DB_NOT_FOUND")
    err(server, "/backup/create", {"database": 5}, 400, "INVALID_REQUEST")
    for bad in ["", None, 5, "../etc/passwd", "backups/../x.json", "backups/a/20250101-000000.txt",
                "/backups/a/20250101-000000.json", "backups/a/b/20250101-000000.json", "other/a/20250101-000000.json",
                "backups/../../20250101-000000.json"]:
        err(server, "/backup/restore", {"backup_name": bad}, 400, "INVALID_REQUEST")
        err(server, "/backup/verify", {"backup_name": bad}, 400, "INVALID_REQUEST")
    err(server, "/backup/restore", {"backup_name": "backups/a/20250101-000000.json"}, 404, "BACKUP_NOT_FOUND")
    err(server, "/backup/verify", {"backup_name": "backups/a/20250101-000000.json"}, 404, "BACKUP_NOT_FOUND")


CORRUPTIONS = {
    "empty object": b"{}",
    "no name": b'{"sets":{}}',
    "no sets": b'{"name":"shop"}',
    "sets not an object": b'{"name":"shop","sets":[1]}',
    "data not an object": b'{"name":"shop","sets":{"users":{"name":"users","data":5}}}',
    "key too long": b'{"name":"shop","sets":{"users":{"name":"users","data":{"' + b"k" * 1025 + b'":1}}}}',
    "bad index": b'{"name":"shop","indexes":{"i":{"name":"i","set_name":"users","field":5,"type":0}},"sets":{}}',
    "index field with a NUL": b'{"name":"shop","indexes":{"i":{"name":"i","set_name":"users","field":"a\\u0000",'
                              b'"type":0}},"sets":{"users":{"name":"users","data":{"k":{"a":1}}}}}',
    "index name too long": b'{"name":"shop","indexes":{"i":{"name":"' + b"x" * 257 + b'","set_name":"users","field":"a",'
                           b'"type":0}},"sets":{}}',
    "sort field with a NUL": b'{"name":"shop","indexes":{"i":{"name":"i","set_name":"users","field":"a","type":1,'
                             b'"sort_fields":["b\\u0000"]}},"sets":{"users":{"name":"users","data":{"k":{"a":1}}}}}',
    "repeated sort field": b'{"name":"shop","indexes":{"i":{"name":"i","set_name":"users","field":"a","type":1,'
                           b'"sort_fields":["b","b"]}},"sets":{}}',
    "garbage": b"\x00\x01garbage",
    "not utf-8": b'{"name":"shop","sets":{"users":{"name":"users","data":{"\xc0\x80":1}}}}',
    "not utf-8, spread over lines": b'{\n "name": "shop",\n "sets": {"us\xc0\x80ers": {}}\n}',
    "empty file": b"",
    "json array": b"[]",
    "two databases": b'{"fuckbase_format":1,"databases":{}}',
    "reserved name": b'{"name":"full","sets":{}}',
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_invalid_objects_are_refused_and_change_nothing(server: ServerProcess, kind: str) -> None:
    fill(server, "shop", 5)
    path = backup_dir(server) / "backups" / "shop" / "20250101-000000.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(CORRUPTIONS[kind])
    name = "backups/shop/20250101-000000.json"
    err(server, "/backup/verify", {"backup_name": name}, 422, "BACKUP_INVALID")
    err(server, "/backup/restore", {"backup_name": name}, 422, "BACKUP_INVALID")
    assert server.ok("/set/get", {"database": "shop", "set": "users", "key": "u3"})["data"]["n"] == 3
    assert server.ok("/index/query", {"database": "shop", "set": "users", "index": "email", "value": "u3@x"})["data"]["count"] == 1


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.95])
def test_truncated_backup_is_refused(server: ServerProcess, cut: float) -> None:
    fill(server, "shop", 30)
    name = server.ok("/backup/create", {"database": "shop"})["backup_name"]
    path = backup_dir(server) / name
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    (backup_dir(server) / (name + ".sha256")).unlink()  # even without the checksum
    server.ok("/set/put", {"database": "shop", "set": "users", "key": "after", "value": 1})
    err(server, "/backup/restore", {"backup_name": name}, 422, "BACKUP_INVALID")
    assert server.ok("/set/get", {"database": "shop", "set": "users", "key": "after"})["data"] == 1


def test_checksum_mismatch_is_refused(server: ServerProcess) -> None:
    fill(server, "shop", 10)
    name = server.ok("/backup/create", {"database": "shop"})["backup_name"]
    path = backup_dir(server) / name
    path.write_bytes(path.read_bytes().replace(b'"n":7', b'"n":8'))
    err(server, "/backup/verify", {"backup_name": name}, 422, "BACKUP_INVALID")
    err(server, "/backup/restore", {"backup_name": name}, 422, "BACKUP_INVALID")
    # a backup whose sidecar still says "pending" never completed
    (backup_dir(server) / (name + ".sha256")).write_bytes(b"pending")
    err(server, "/backup/restore", {"backup_name": name}, 422, "BACKUP_INVALID")


def test_original_format_with_plaintext_auth(server: ServerProcess) -> None:
    """An object as the original writes it: indented, sorted keys, plaintext auth."""
    original = {
        "auth": {"Enabled": True, "Password": "s3cr3t", "Username": "alice"},
        "indexes": {
            "email_index": {"field": "email", "name": "email_index", "set_name": "users", "type": 0},
            "by_dept": {"field": "dept", "name": "by_dept", "set_name": "users", "type": 1, "sort_fields": ["age", "name"]},
        },
        "name": "legacy",
        "sets": {"users": {"data": {
            "u1": {"email": "a@x", "dept": "eng", "age": 30, "name": "Ann"},
            "u2": {"email": "b@x", "dept": "eng", "age": 25, "name": "Bob"},
            "u3": None,
        }, "name": "users"}},
    }
    path = backup_dir(server) / "backups" / "legacy" / "20250318-123456.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(original, indent=2, sort_keys=True))
    listed = server.ok("/backup/list", {"database": "legacy"})["backups"]
    assert listed == [{"name": "backups/legacy/20250318-123456.json", "timestamp": "2025-03-18T12:34:56Z",
                       "size": path.stat().st_size, "database": "legacy"}]
    server.ok("/backup/restore", {"backup_name": "backups/legacy/20250318-123456.json"})
    err(server, "/set/get", {"database": "legacy", "set": "users", "key": "u1"}, 401, "AUTH_FAILED")
    auth = {"Authorization": basic("alice", "s3cr3t")}
    assert server.ok("/set/get", {"database": "legacy", "set": "users", "key": "u3"}, headers=auth)["data"] is None
    page = server.ok("/index/query/sorted", {"database": "legacy", "set": "users", "index": "by_dept", "value": "eng",
                                             "sort": {"field": "age", "order": "asc"}}, headers=auth)
    assert [e["key"] for e in page["data"]] == ["u2", "u1"]
    # our own backup of it never holds the plaintext password
    name = server.ok("/backup/create", {"database": "legacy"})["backup_name"]
    text = (backup_dir(server) / name).read_text()
    assert "s3cr3t" not in text and "scrypt$" in text
    assert json.loads(text)["name"] == "legacy"  # plain JSON in the original's shape


def test_numbers_beyond_64_bits_in_the_originals_backup_restore_as_a_put_stores_them(server: ServerProcess) -> None:
    """The original writes numbers from 2^64 up to 1e21 as integers (1e20 as
    100000000000000000000): a restore reads every number as a put of the same text does."""
    numbers = ('{"wei": 100000000000000000000, "max": 18446744073709552000, "low": -9223372036854775809,'
               ' "fits": 18446744073709551615, "half": 1.5, "e": 1e5, "neg": -0.0}')
    text = ('{\n  "indexes": {"wei": {"field": "wei", "name": "wei", "set_name": "s", "type": 0}},\n'
            '  "name": "big",\n  "sets": {"s": {"data": {"k": ' + numbers + '}, "name": "s"}}\n}')
    path = backup_dir(server) / "backups" / "big" / "20250318-123456.json"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    server.ok("/backup/restore", {"backup_name": "backups/big/20250318-123456.json"})
    server.ok("/create", {"name": "put"})
    assert server.post("/set/put", b'{"database":"put","set":"s","key":"k","value":' + numbers.encode() + b"}").status_code == 200
    restored = server.post("/set/get", {"database": "big", "set": "s", "key": "k"}).content
    assert restored == server.post("/set/get", {"database": "put", "set": "s", "key": "k"}).content
    assert json.loads(restored)["data"]["fits"] == 18446744073709551615
    found = server.ok("/index/query", {"database": "big", "set": "s", "index": "wei", "value": "100000000000000000000"})
    assert found["data"]["count"] == 1
    path.write_text(text.replace("1.5", "1e400"))
    err(server, "/backup/restore", {"backup_name": "backups/big/20250318-123456.json"}, 422, "BACKUP_INVALID")


def test_a_backup_never_takes_the_name_of_one_the_original_wrote(server: ServerProcess) -> None:
    """The original, sharing the target, writes no sidecar: a name whose object exists is
    skipped, and that object is left as it was, with no sidecar of ours beside it."""
    fill(server, "shop", 3)
    folder = backup_dir(server) / "backups" / "shop"
    folder.mkdir(parents=True)
    now = datetime.now(UTC)
    theirs = {folder / f"{(now + timedelta(seconds=s)).strftime('%Y%m%d-%H%M%S')}.json" for s in range(-1, 4)}
    for path in theirs:
        path.write_text('{"name": "shop", "sets": {}}')
    name = server.ok("/backup/create", {"database": "shop"})["backup_name"]
    assert name.endswith("_02.json") and backup_dir(server) / name not in theirs
    for path in theirs:
        assert path.read_text() == '{"name": "shop", "sets": {}}'
        assert not path.with_name(path.name + ".sha256").exists()
    server.ok("/backup/verify", {"backup_name": name})


def test_a_backup_of_a_database_whose_name_is_not_one_of_ours_restores_under_another(server: ServerProcess) -> None:
    """The original takes any database name ("my db"); its backup lists, and restores with "as"."""
    name = "backups/my db/20250318-123456.json"
    path = backup_dir(server) / name
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"name": "my db", "sets": {"s": {"name": "s", "data": {"k": 1}}}, "indexes": {}}))
    assert [b["name"] for b in server.ok("/backup/list", {})["backups"]] == [name]
    assert [b["name"] for b in server.ok("/backup/list", {"database": "my db"})["backups"]] == [name]
    for bad in ("a/b", "..", "a\x01"):
        err(server, "/backup/list", {"database": bad}, 400, "INVALID_REQUEST")
    refused = err(server, "/backup/restore", {"backup_name": name}, 422, "BACKUP_INVALID")
    assert '"as"' in refused["message"]
    server.ok("/backup/restore", {"backup_name": name, "as": "mydb"})
    assert server.ok("/set/get", {"database": "mydb", "set": "s", "key": "k"})["data"] == 1
    for bad in ("backups/../x/20250318-123456.json", "backups/a/b/20250318-123456.json", "backups/a\x01/20250318-123456.json"):
        err(server, "/backup/restore", {"backup_name": bad}, 400, "INVALID_REQUEST")


def test_our_backup_reads_as_the_originals_shape(server: ServerProcess) -> None:
    fill(server, "shop", 3)
    name = server.ok("/backup/create", {"database": "shop"})["backup_name"]
    doc = json.loads((backup_dir(server) / name).read_text())
    assert doc["name"] == "shop"
    assert doc["sets"]["users"]["name"] == "users"
    assert doc["sets"]["users"]["data"]["u1"] == {"email": "u1@x", "n": 1}
    assert doc["indexes"]["email"] == {"name": "email", "set_name": "users", "field": "email", "type": 0}
    assert doc["indexes"]["srt"]["type"] == 1 and doc["indexes"]["srt"]["sort_fields"] == ["n"]


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_compressed_backups(make_server: Any, compression: str) -> None:
    srv = make_server(args=["--backup-compression", compression])
    fill(srv, "shop", 20)
    name = srv.ok("/backup/create", {"database": "shop"})["backup_name"]
    assert name.endswith(".json.gz" if compression == "gzip" else ".json.zst")
    if compression == "gzip":
        assert json.loads(gzip.decompress((backup_dir(srv) / name).read_bytes()))["name"] == "shop"
    srv.ok("/set/delete", {"database": "shop", "set": "users", "key": "u5"})
    srv.ok("/backup/restore", {"backup_name": name})
    assert srv.ok("/set/get", {"database": "shop", "set": "users", "key": "u5"})["data"]["n"] == 5
    path = backup_dir(srv) / name
    path.write_bytes(path.read_bytes()[:-10])
    (backup_dir(srv) / (name + ".sha256")).unlink()
    err(srv, "/backup/restore", {"backup_name": name}, 422, "BACKUP_INVALID")


def test_backup_is_a_consistent_snapshot_while_writes_go_on(server: ServerProcess) -> None:
    """One writer puts keys 0, 1, 2, … in order: a snapshot must hold a gap-free prefix of them."""
    server.ok("/create", {"name": "shop"})
    stop = threading.Event()
    acked: list[int] = []

    def writer() -> None:
        with httpx.Client(base_url=server.url) as c:
            i = 0
            while not stop.is_set():
                r = c.post("/set/put", json={"database": "shop", "set": "seq", "key": f"{i:08d}", "value": i})
                assert r.status_code == 200
                acked.append(i)
                i += 1

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    name = server.ok("/backup/create", {"database": "shop"})["backup_name"]
    took = time.monotonic() - t0
    time.sleep(0.2)
    stop.set()
    t.join()
    doc = json.loads((backup_dir(server) / name).read_text())
    got = sorted(int(k) for k in doc["sets"]["seq"]["data"])
    assert got == list(range(len(got)))  # a prefix: no write missing before a later one
    assert 0 < len(got) <= len(acked)
    assert took < 10


def test_writes_during_restore_are_never_silently_lost(server: ServerProcess) -> None:
    fill(server, "shop", 5)
    big = [{"database": "shop", "set": "big", "key": f"k{i}", "value": {"v": "x" * 100}} for i in range(3000)]
    with httpx.Client(base_url=server.url) as c:
        for body in big:
            c.post("/set/put", json=body)
    name = server.ok("/backup/create", {"database": "shop"})["backup_name"]
    results: dict[str, int] = {}

    async def writes() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            for i in range(300):
                r = await c.post("/set/put", json={"database": "shop", "set": "live", "key": f"w{i}", "value": i})
                results[f"w{i}"] = r.status_code
                await asyncio.sleep(0)

    async def restore_and_write() -> float:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            task = asyncio.create_task(writes())
            await asyncio.sleep(0.01)
            r = await c.post("/backup/restore", json={"backup_name": name})
            assert r.status_code == 200, r.text
            done_at = time.monotonic()
            await task
            return done_at

    asyncio.run(restore_and_write())
    # the restore replaced the set, so writes acknowledged before the swap are gone by design;
    # every write acknowledged after it is there, and no request failed with a 5xx
    assert all(code in (200, 404) for code in results.values()), results
    live = server.post("/set/list", {"database": "shop"}).json()["data"]["sets"]
    assert "big" in live
    # the last writes came after the swap: they must all be readable
    last = [k for k in sorted(results, key=lambda k: int(k[1:]))][-5:]
    for k in last:
        if results[k] == 200:
            assert server.ok("/set/get", {"database": "shop", "set": "live", "key": k})["data"] == int(k[1:])


def test_restore_on_start_and_never_over_data(make_server: Any, tmp_path: Path) -> None:
    first = make_server(args=["--backup-dir", str(tmp_path / "shared-backups")])
    fill(first, "shop", 4)
    first.ok("/backup/create", {})
    first.stop()
    fresh = make_server(args=["--backup-dir", str(tmp_path / "shared-backups"), "--restore-on-start", "latest"])
    assert fresh.ok("/set/get", {"database": "shop", "set": "users", "key": "u3"})["data"]["n"] == 3
    # a node with data of its own is never overwritten
    fresh.ok("/set/put", {"database": "shop", "set": "users", "key": "u3", "value": "mine"})
    fresh.restart()
    assert fresh.ok("/set/get", {"database": "shop", "set": "users", "key": "u3"})["data"] == "mine"


def test_restore_on_start_without_backup_fails_clearly(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "d", args=["--restore-on-start", "latest"])
    with pytest.raises(RuntimeError, match="no full backup found"):
        srv.start(timeout=15)


def test_automatic_backups_skip_when_idle_and_keep_retention(make_server: Any) -> None:
    srv = make_server(args=["--backup-interval", "0.01", "--backup-retention", "2"])  # every 0.6 s
    srv.ok("/create", {"name": "shop"})
    srv.ok("/backup/create", {"database": None})  # manual: never deleted by retention
    manual = srv.ok("/backup/list", {})["backups"][0]["name"]
    for i in range(4):
        srv.ok("/set/put", {"database": "shop", "set": "s", "key": f"k{i}", "value": i})
        time.sleep(1.3)
    listed = [b["name"] for b in srv.ok("/backup/list", {})["backups"]]
    assert manual in listed
    assert len(listed) == 3  # the manual one and the newest two automatic ones
    before = listed
    time.sleep(1.5)  # idle: nothing changed, so no new backup
    assert [b["name"] for b in srv.ok("/backup/list", {})["backups"]] == before
    assert srv.client is not None
    metrics = srv.client.get("/metrics").text
    assert 'fuckbase_backup_last_success_timestamp_seconds{operation="create"}' in metrics
    info = srv.ok("/server/info", {})
    assert info["backup_target"].startswith("local folder")


def test_backup_endpoints_need_admin(make_server: Any) -> None:
    srv = make_server(args=["--admin-username", "root", "--admin-password", "pw"])
    for path, body in [("/backup/create", {}), ("/backup/list", {}),
                       ("/backup/restore", {"backup_name": "backups/a/20250101-000000.json"}),
                       ("/backup/verify", {"backup_name": "backups/a/20250101-000000.json"})]:
        err(srv, path, body, 401, "ADMIN_AUTH_REQUIRED")
    hdr = {"X-Admin-Authorization": basic("root", "pw")}
    assert srv.ok("/backup/list", {}, headers=hdr)["backups"] == []


def test_restores_over_protected_databases_need_their_credentials(server: ServerProcess) -> None:
    """With no admin configured, a drop of a protected database needs its credentials: so does
    a restore that replaces or removes one. Refused restores change nothing."""
    creds = {"username": "alice", "password": "s3cr3t"}
    alice = {"Authorization": basic("alice", "s3cr3t")}
    fill(server, "open", 3)
    server.ok("/create", {"name": "vault", "auth": creds})
    server.ok("/set/put", {"database": "vault", "set": "s", "key": "k", "value": "before"}, headers=alice)
    full = server.ok("/backup/create", {})["backup_name"]
    one = server.ok("/backup/create", {"database": "vault"})["backup_name"]
    server.ok("/set/put", {"database": "vault", "set": "s", "key": "k", "value": "after"}, headers=alice)
    err(server, "/drop", {"name": "vault"}, 401, "AUTH_FAILED")
    for name in (full, one):
        refused = err(server, "/backup/restore", {"backup_name": name}, 401, "AUTH_FAILED")
        assert "the protected database 'vault'" in refused["message"] and "admin" in refused["message"]
        r = server.post("/backup/restore", {"backup_name": name}, headers={"Authorization": basic("alice", "wrong")})
        assert r.status_code == 401
        assert server.ok("/set/get", {"database": "vault", "set": "s", "key": "k"}, headers=alice)["data"] == "after"
    # a restore of another database needs nothing; with the credentials, both restore
    other = server.ok("/backup/create", {"database": "open"})["backup_name"]
    server.ok("/backup/restore", {"backup_name": other})
    server.ok("/backup/restore", {"backup_name": one}, headers=alice)
    assert server.ok("/set/get", {"database": "vault", "set": "s", "key": "k"}, headers=alice)["data"] == "before"
    server.ok("/set/put", {"database": "vault", "set": "s", "key": "k", "value": "after"}, headers=alice)
    server.ok("/backup/restore", {"backup_name": full, "auth": creds})
    assert server.ok("/set/get", {"database": "vault", "set": "s", "key": "k"}, headers=alice)["data"] == "before"
    # a full backup taken before "vault" existed would remove it: refused the same way
    server.ok("/drop", {"name": "vault"}, headers=alice)
    bare = server.ok("/backup/create", {})["backup_name"]
    server.ok("/create", {"name": "vault", "auth": creds})
    err(server, "/backup/restore", {"backup_name": bare}, 401, "AUTH_FAILED")
    server.ok("/backup/restore", {"backup_name": bare}, headers=alice)
    err(server, "/set/list", {"database": "vault"}, 404, "DB_NOT_FOUND")


def test_restores_by_the_admin_need_only_the_admin(make_server: Any) -> None:
    srv = make_server(args=["--admin-username", "root", "--admin-password", "pw"])
    admin = {"X-Admin-Authorization": basic("root", "pw")}
    srv.ok("/create", {"name": "vault", "auth": {"username": "alice", "password": "s3cr3t"}}, headers=admin)
    name = srv.ok("/backup/create", {"database": "vault"}, headers=admin)["backup_name"]
    srv.ok("/backup/restore", {"backup_name": name}, headers=admin)


def test_backup_cli(make_server: Any) -> None:
    import os
    import subprocess
    import sys

    srv = make_server(args=["--admin-username", "root", "--admin-password", "pw"])
    srv.ok("/create", {"name": "shop"}, headers={"X-Admin-Authorization": basic("root", "pw")})
    env = {**os.environ, "FUCKBASE_URL": srv.url, "FUCKBASE_ADMIN_USERNAME": "root", "FUCKBASE_ADMIN_PASSWORD": "pw"}

    def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "fuckbase", "backup", *args], capture_output=True, text=True, env=env, timeout=60)
        assert (r.returncode == 0) == ok, r.stderr
        return r

    name = cli("create", "--database", "shop").stdout.split()[0]
    assert name.startswith("backups/shop/")
    assert name in cli("list").stdout
    assert "valid" in cli("verify", name).stdout
    assert "restored shop" in cli("restore", name).stdout
    assert "restored copy" in cli("restore", name, "--as", "copy").stdout
    assert "no backups of nothing" in cli("list", "--database", "nothing").stderr
    assert "NAME or --at" in cli("restore", ok=False).stderr
    assert "NAME or --at" in cli("restore", name, "--at", "2026-01-01T00:00:00Z", ok=False).stderr
    r = cli("restore", "--at", "2026-01-01T00:00:00Z", "--database", "shop", "--as", "then", ok=False)
    assert "BACKUP_NOT_FOUND" in r.stderr and "no continuous backup" in r.stderr, r.stderr  # the request went out
    r = cli("restore", "backups/shop/20200101-000000.json", ok=False)
    assert "BACKUP_NOT_FOUND" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    env["FUCKBASE_ADMIN_PASSWORD"] = "wrong"
    assert "ADMIN_AUTH_REQUIRED" in cli("list", ok=False).stderr


def test_backup_cli_restores_a_protected_database_with_its_credentials(server: ServerProcess) -> None:
    import os
    import subprocess
    import sys

    server.ok("/create", {"name": "vault", "auth": {"username": "alice", "password": "s3cr3t"}})
    name = server.ok("/backup/create", {"database": "vault"})["backup_name"]
    env = {**os.environ, "FUCKBASE_URL": server.url}
    command = [sys.executable, "-m", "fuckbase", "backup", "restore", name]
    r = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0 and "AUTH_FAILED" in r.stderr
    r = subprocess.run([*command, "--username", "alice", "--password", "s3cr3t"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0 and "restored vault" in r.stdout, r.stderr
