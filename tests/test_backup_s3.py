"""Backups to a real S3 server (SeaweedFS): round trips, the object format, and every way S3 can fail.

Each test gets its own bucket (`fresh_bucket`), which does not exist until the server makes it.
Tests that freeze or kill S3 get a private SeaweedFS (`own_s3`) so the session one stays healthy.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import httpx
import obstore
import pytest
import zstandard
from conftest import ServerProcess, basic
from s3server import CorruptingProxy, SeaweedS3, fresh_bucket, s3  # noqa: F401

STAMP = r"\d{8}-\d{6}(?:_\d+)?"
# Fault timings measured by the tests below, printed at the end of the module (pytest -s).
TIMINGS: dict[str, float] = {}


# ------------------------------------------------------------------------------ helpers


def s3_args(server: SeaweedS3, bucket: str, *, endpoint: str | None = None, timeout: float = 5,
            secret: str | None = None, continuous: bool | None = False) -> list[str]:
    """Server flags for this S3 server. Continuous backup (on by default with S3) is off unless
    asked for (None: the default): these tests count the requests and objects of named backups."""
    return [
        "--s3-endpoint", endpoint or server.endpoint,
        "--s3-bucket", bucket,
        "--s3-access-key", server.access_key,
        "--s3-secret-key", server.secret_key if secret is None else secret,
        "--s3-region", server.region,
        "--s3-timeout", str(timeout),
        *([] if continuous is None else ["--backup-continuous" if continuous else "--no-backup-continuous"]),
    ]


def get_object(server: SeaweedS3, bucket: str, key: str) -> bytes:
    return bytes(obstore.get(server.store(bucket), key).bytes())


def put_object(server: SeaweedS3, bucket: str, key: str, data: bytes) -> None:
    obstore.put(server.store(bucket), key, data)


def object_keys(server: SeaweedS3, bucket: str, prefix: str = "backups/") -> list[str]:
    return sorted(m["path"] for m in obstore.list(server.store(bucket), prefix).collect())


def bucket_exists(server: SeaweedS3, bucket: str) -> bool:
    url = obstore.sign(server.store(bucket), "HEAD", "", timedelta(minutes=1))
    status = httpx.head(url, timeout=5, trust_env=False).status_code
    assert status in (200, 404), status
    return status == 200


def fill(srv: ServerProcess, db: str = "shop", n: int = 20, value_bytes: int = 0) -> None:
    srv.ok("/create", {"name": db})
    assert srv.client is not None
    pad = "p" * value_bytes
    for i in range(n):
        value: dict[str, Any] = {"email": f"u{i}@x", "n": i}
        if pad:
            value["pad"] = pad
        r = srv.client.post("/set/put", json={"database": db, "set": "users", "key": f"u{i}", "value": value})
        assert r.status_code == 200, r.text
    srv.ok("/index/create", {"database": db, "set": "users", "name": "email", "field": "email"})
    srv.ok("/index/create/sortable", {"database": db, "set": "users", "name": "srt", "primary_field": "email",
                                      "sort_fields": ["n"]})


def err(srv: ServerProcess, path: str, body: Any, status: int | tuple[int, ...], code: str) -> dict[str, Any]:
    r = srv.post(path, body)
    allowed = status if isinstance(status, tuple) else (status,)
    assert r.status_code in allowed, r.text
    data = r.json()
    assert data["status"] == "error" and data["code"] == code, r.text
    return data  # type: ignore[no-any-return]


def get(srv: ServerProcess, db: str, set_name: str, key: str, **kw: Any) -> Any:
    return srv.ok("/set/get", {"database": db, "set": set_name, "key": key}, **kw)["data"]


def index_count(srv: ServerProcess, db: str, value: str, **kw: Any) -> int:
    body = {"database": db, "set": "users", "index": "email", "value": value}
    return srv.ok("/index/query", body, **kw)["data"]["count"]  # type: ignore[no-any-return]


def assert_shop_unchanged(srv: ServerProcess, n: int = 20) -> None:
    """The state `fill(srv, "shop", n)` plus the marker written by the fault tests."""
    assert get(srv, "shop", "users", "u3")["n"] == 3
    assert get(srv, "shop", "users", f"u{n - 1}")["n"] == n - 1
    assert get(srv, "shop", "users", "marker") == "kept"
    assert srv.ok("/set/list", {"database": "shop"})["data"]["sets"] == ["users"]
    assert index_count(srv, "shop", "u3@x") == 1
    page = srv.ok("/index/query/sorted", {"database": "shop", "set": "users", "index": "srt", "value": "u5@x"})
    assert page["total"] == 1


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def timed_get(srv: ServerProcess, path: str, body: Any) -> tuple[int, float]:
    """A request on a fresh client with a short timeout: the server must answer at once."""
    started = time.monotonic()
    with httpx.Client(base_url=srv.url, timeout=5, trust_env=False) as c:
        r = c.post(path, json=body) if path != "/health" else c.get(path)
    return r.status_code, time.monotonic() - started


class Background:
    """Runs one request in a thread; .result() waits for its response."""

    def __init__(self, srv: ServerProcess, path: str, body: Any, timeout: float = 120) -> None:
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.finished: float | None = None

        def run() -> None:
            try:
                with httpx.Client(base_url=srv.url, timeout=timeout, trust_env=False) as c:
                    self.response = c.post(path, json=body)
            except BaseException as exc:  # reported by result()
                self.error = exc
            self.finished = time.monotonic()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def done(self) -> bool:
        return not self.thread.is_alive()

    def result(self, timeout: float = 120) -> httpx.Response:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the request never returned"
        if self.error is not None:
            raise self.error
        assert self.response is not None
        return self.response

    @property
    def elapsed(self) -> float:
        assert self.finished is not None
        return self.finished - self.started


def original_database(name: str, entries: int, *, value: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """A database backup as the original implementation would hold it."""
    make = value or (lambda i: {"email": f"c{i}@x", "n": i})
    return {
        "name": name,
        "indexes": {"email": {"name": "email", "set_name": "users", "field": "email", "type": 0}},
        "sets": {"users": {"name": "users", "data": {f"c{i:07d}": make(i) for i in range(entries)}}},
    }


@pytest.fixture
def own_s3() -> Iterator[SeaweedS3]:
    """A private SeaweedFS that a test may freeze or kill."""
    server = SeaweedS3().start()
    yield server
    server.stop()


@pytest.fixture(scope="module", autouse=True)
def report_timings() -> Iterator[None]:
    yield
    if TIMINGS:
        print("\nS3 fault timings (s): " + ", ".join(f"{k}={v:.2f}" for k, v in TIMINGS.items()))


# ------------------------------------------------------------------------------ round trips


def test_round_trip_with_host_port_endpoint_creates_bucket(make_server: Any, s3: SeaweedS3,  # noqa: F811
                                                           fresh_bucket: str) -> None:  # noqa: F811
    host_port = s3.endpoint.removeprefix("http://")
    srv = make_server(args=s3_args(s3, fresh_bucket, endpoint=host_port))
    assert not bucket_exists(s3, fresh_bucket)
    target = f"s3://{fresh_bucket} (http://{host_port})"
    assert srv.ok("/server/info", {})["backup_target"] == target
    fill(srv, "shop")
    fill(srv, "sho")  # a prefix of "shop": the list filter must be exact
    created = srv.ok("/backup/create", {"database": "shop"})
    assert bucket_exists(s3, fresh_bucket)  # made on first use
    assert created["message"] == "Database backed up successfully"
    assert created["target"] == target and created["database"] == "shop"
    name = created["backup_name"]
    assert re.fullmatch(rf"backups/shop/{STAMP}\.json", name), name
    assert created["entries"] == 20 and created["size"] == len(get_object(s3, fresh_bucket, name))
    full = srv.ok("/backup/create", {})
    assert full["message"] == "All databases backed up successfully" and full["database"] == "all"
    assert re.fullmatch(rf"backups/full/{STAMP}\.json", full["backup_name"]) and full["entries"] == 40
    sho = srv.ok("/backup/create", {"database": "sho"})["backup_name"]

    listed = srv.ok("/backup/list", {"database": "shop"})["backups"]
    assert [b["name"] for b in listed] == [name]
    assert listed[0]["database"] == "shop" and listed[0]["size"] == created["size"]
    assert listed[0]["timestamp"].endswith("Z")
    assert [b["name"] for b in srv.ok("/backup/list", {"database": "sho"})["backups"]] == [sho]
    assert srv.ok("/backup/list", {"database": "sh"})["backups"] == []
    everything = srv.ok("/backup/list", {})
    assert everything["target"] == target
    assert sorted(b["name"] for b in everything["backups"]) == sorted([name, full["backup_name"], sho])
    assert {b["name"]: b["database"] for b in everything["backups"]}[full["backup_name"]] == "all"
    stamps = [b["timestamp"] for b in everything["backups"]]
    assert stamps == sorted(stamps, reverse=True)  # newest first

    verified = srv.ok("/backup/verify", {"backup_name": name})
    assert verified["checksum"] == "verified" and verified["target"] == target
    assert srv.ok("/backup/verify", {"backup_name": full["backup_name"]})["entries"] == 40

    # database restore: exactly the old state of that database, indexes included
    srv.ok("/set/put", {"database": "shop", "set": "users", "key": "u1", "value": {"email": "changed@x", "n": -1}})
    srv.ok("/set/put", {"database": "shop", "set": "users", "key": "new", "value": {"email": "new@x"}})
    srv.ok("/set/delete", {"database": "shop", "set": "users", "key": "u2"})
    srv.ok("/set/put", {"database": "shop", "set": "extra", "key": "k", "value": 1})
    srv.ok("/set/put", {"database": "sho", "set": "users", "key": "u1", "value": "sho changed"})
    restored = srv.ok("/backup/restore", {"backup_name": name})
    assert restored["target"] == target
    assert restored["message"] == "Database restored successfully"
    assert get(srv, "shop", "users", "u1") == {"email": "u1@x", "n": 1}
    assert get(srv, "shop", "users", "u2")["n"] == 2
    err(srv, "/set/get", {"database": "shop", "set": "users", "key": "new"}, 404, "KEY_NOT_FOUND")
    assert srv.ok("/set/list", {"database": "shop"})["data"]["sets"] == ["users"]
    assert index_count(srv, "shop", "u1@x") == 1 and index_count(srv, "shop", "changed@x") == 0
    page = srv.ok("/index/query/sorted", {"database": "shop", "set": "users", "index": "srt", "value": "u7@x"})
    assert page["total"] == 1
    assert get(srv, "sho", "users", "u1") == "sho changed"  # other databases untouched

    # full restore: every database replaced
    srv.ok("/drop", {"name": "shop"})
    srv.ok("/create", {"name": "later"})
    assert srv.ok("/backup/restore", {"backup_name": full["backup_name"]})["message"] == \
        "All databases restored successfully"
    err(srv, "/set/list", {"database": "later"}, 404, "DB_NOT_FOUND")
    assert get(srv, "shop", "users", "u19")["n"] == 19
    assert get(srv, "sho", "users", "u1")["n"] == 1
    assert index_count(srv, "sho", "u4@x") == 1
    srv.restart()
    assert get(srv, "shop", "users", "u1")["n"] == 1
    assert s3.secret_key not in srv.log()


def test_disaster_recovery_on_a_second_node(make_server: Any, own_storage: Any, s3: SeaweedS3,  # noqa: F811
                                            fresh_bucket: str) -> None:  # noqa: F811
    """Node A backs up to http://…; a fresh node B, configured by environment, lists and restores."""
    first = make_server(args=s3_args(s3, fresh_bucket))
    fill(first, "x")
    first.ok("/create", {"name": "locked", "auth": {"username": "bob", "password": "pw-of-bob"}})
    first.ok("/set/put", {"database": "locked", "set": "s", "key": "k", "value": "v"},
             headers={"Authorization": basic("bob", "pw-of-bob")})
    db_backup = first.ok("/backup/create", {"database": "x"})["backup_name"]
    locked_backup = first.ok("/backup/create", {"database": "locked"})["backup_name"]
    first.stop()

    env = {
        "FUCKBASE_S3_ENDPOINT": s3.endpoint,
        "FUCKBASE_S3_BUCKET": fresh_bucket,
        "FUCKBASE_S3_ACCESS_KEY": s3.access_key,
        "FUCKBASE_S3_SECRET_KEY": s3.secret_key,
        "FUCKBASE_S3_REGION": s3.region,
        "FUCKBASE_S3_TIMEOUT": "5",
    }
    second = make_server(args=own_storage(), env=env)
    err(second, "/set/list", {"database": "x"}, 404, "DB_NOT_FOUND")
    listed = second.ok("/backup/list", {"database": "x"})["backups"]  # x does not exist here
    assert [b["name"] for b in listed] == [db_backup]
    second.ok("/backup/restore", {"backup_name": listed[0]["name"]})
    assert get(second, "x", "users", "u7") == {"email": "u7@x", "n": 7}
    assert index_count(second, "x", "u7@x") == 1
    second.ok("/backup/restore", {"backup_name": locked_backup})
    err(second, "/set/get", {"database": "locked", "set": "s", "key": "k"}, 401, "AUTH_FAILED")
    assert get(second, "locked", "s", "k", headers={"Authorization": basic("bob", "pw-of-bob")}) == "v"
    assert "pw-of-bob" not in get_object(s3, fresh_bucket, locked_backup).decode()
    assert s3.secret_key not in second.log()


def test_restore_on_start_latest_from_s3(make_server: Any, own_storage: Any, s3: SeaweedS3,  # noqa: F811
                                        fresh_bucket: str) -> None:  # noqa: F811
    first = make_server(args=s3_args(s3, fresh_bucket))
    fill(first, "a", 5)
    first.ok("/backup/create", {})
    fill(first, "b", 3)
    latest = first.ok("/backup/create", {})["backup_name"]
    first.ok("/backup/create", {"database": "a"})  # newer, but not a full backup
    first.stop()
    fresh = make_server(args=[*own_storage(), *s3_args(s3, fresh_bucket), "--restore-on-start", "latest"])
    assert f"restored {latest}" in fresh.log()
    assert get(fresh, "b", "users", "u2")["n"] == 2
    assert index_count(fresh, "a", "u4@x") == 1
    # a node with data of its own is never overwritten
    fresh.ok("/set/put", {"database": "a", "set": "users", "key": "u1", "value": "mine"})
    fresh.restart()
    assert get(fresh, "a", "users", "u1") == "mine"


# ------------------------------------------------------------------------------ the objects


def test_objects_are_plain_json_in_the_originals_shape(make_server: Any, s3: SeaweedS3,  # noqa: F811
                                                       fresh_bucket: str) -> None:  # noqa: F811
    srv = make_server(args=s3_args(s3, fresh_bucket))
    fill(srv, "shop", 3)
    fill(srv, "other", 2)
    name = srv.ok("/backup/create", {"database": "shop"})["backup_name"]
    raw = get_object(s3, fresh_bucket, name)
    doc = json.loads(raw)
    assert doc["name"] == "shop"
    assert doc["sets"] == {"users": {"name": "users", "data": {f"u{i}": {"email": f"u{i}@x", "n": i} for i in range(3)}}}
    assert doc["indexes"]["email"] == {"name": "email", "set_name": "users", "field": "email", "type": 0}
    assert doc["indexes"]["srt"] == {"name": "srt", "set_name": "users", "field": "email", "type": 1,
                                     "sort_fields": ["n"]}
    sidecar = json.loads(get_object(s3, fresh_bucket, name + ".sha256"))
    assert sidecar["sha256"] == hashlib.sha256(raw).hexdigest()
    assert sidecar["size"] == len(raw) and sidecar["entries"] == 3 and sidecar["database"] == "shop"

    full = srv.ok("/backup/create", {})["backup_name"]
    doc = json.loads(get_object(s3, fresh_bucket, full))
    assert set(doc["databases"]) == {"shop", "other"}
    assert doc["databases"]["other"]["name"] == "other"
    assert doc["databases"]["other"]["sets"]["users"]["data"]["u1"] == {"email": "u1@x", "n": 1}
    meta = doc["metadata"]
    assert (meta["database_count"], meta["set_count"], meta["entry_count"]) == (2, 2, 5)
    assert meta["timestamp"] and meta["version"]
    assert object_keys(s3, fresh_bucket) == sorted([name, name + ".sha256", full, full + ".sha256"])


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_compressed_backups_round_trip(make_server: Any, s3: SeaweedS3, fresh_bucket: str,  # noqa: F811
                                       compression: str) -> None:
    srv = make_server(args=[*s3_args(s3, fresh_bucket), "--backup-compression", compression])
    fill(srv, "shop", 50, value_bytes=200)
    created = srv.ok("/backup/create", {"database": "shop"})
    name = created["backup_name"]
    ext = ".json.gz" if compression == "gzip" else ".json.zst"
    assert name.endswith(ext)
    stored = get_object(s3, fresh_bucket, name)
    assert created["size"] == len(stored)
    plain = gzip.decompress(stored) if compression == "gzip" else zstandard.ZstdDecompressor().decompressobj().decompress(stored)
    assert len(stored) < len(plain) / 3
    assert json.loads(plain)["sets"]["users"]["data"]["u5"]["n"] == 5
    assert json.loads(get_object(s3, fresh_bucket, name + ".sha256"))["sha256"] == hashlib.sha256(plain).hexdigest()
    assert srv.ok("/backup/list", {"database": "shop"})["backups"][0]["name"] == name
    srv.ok("/set/delete", {"database": "shop", "set": "users", "key": "u5"})
    srv.ok("/backup/restore", {"backup_name": name})
    assert get(srv, "shop", "users", "u5")["n"] == 5
    assert index_count(srv, "shop", "u5@x") == 1
    full = srv.ok("/backup/create", {})["backup_name"]
    assert full.startswith("backups/full/") and full.endswith(ext)
    srv.ok("/drop", {"name": "shop"})
    srv.ok("/backup/restore", {"backup_name": full})
    assert get(srv, "shop", "users", "u49")["n"] == 49
    # cut short, even without its checksum: refused
    put_object(s3, fresh_bucket, name, stored[: len(stored) // 2])
    obstore.delete(s3.store(fresh_bucket), name + ".sha256")
    srv.ok("/set/put", {"database": "shop", "set": "users", "key": "after", "value": 1})
    err(srv, "/backup/restore", {"backup_name": name}, 422, "BACKUP_INVALID")
    assert get(srv, "shop", "users", "after") == 1


def test_original_object_with_plaintext_auth_restores(make_server: Any, s3: SeaweedS3,  # noqa: F811
                                                      fresh_bucket: str) -> None:  # noqa: F811
    """Objects exactly as the original writes them: indented, sorted keys, plaintext auth, no sidecar."""
    s3.create_bucket(fresh_bucket)
    original = {
        "auth": {"Username": "alice", "Password": "s3cr3t-pw", "Enabled": True},
        "indexes": {
            "email_index": {"field": "email", "name": "email_index", "set_name": "users", "type": 0},
            "by_dept": {"field": "dept", "name": "by_dept", "set_name": "users", "type": 1,
                        "sort_fields": ["age", "name"]},
        },
        "name": "legacy",
        "sets": {"users": {"data": {
            "u1": {"email": "a@x", "dept": "eng", "age": 30, "name": "Ann"},
            "u2": {"email": "b@x", "dept": "eng", "age": 25, "name": "Bob"},
            "u3": {"email": "c@x", "dept": "ops", "age": 41, "name": "Cid"},
        }, "name": "users"}},
    }
    text = json.dumps(original, indent=2, sort_keys=True).encode()
    name = "backups/legacy/20250318-140947.json"
    put_object(s3, fresh_bucket, name, text)
    other = original_database("plain", 3)
    full_name = "backups/full/20250318-140950.json"
    put_object(s3, fresh_bucket, full_name, json.dumps({
        "databases": {"plain": other},
        "metadata": {"timestamp": "2025-03-18T14:09:50Z", "version": "1.0.0", "database_count": 1,
                     "set_count": 1, "entry_count": 3},
    }, indent=2, sort_keys=True).encode())

    srv = make_server(args=s3_args(s3, fresh_bucket))
    listed = srv.ok("/backup/list", {"database": "legacy"})["backups"]
    assert listed == [{"name": name, "timestamp": "2025-03-18T14:09:47Z", "size": len(text), "database": "legacy"}]
    assert srv.ok("/backup/verify", {"backup_name": name})["checksum"].startswith("none")
    srv.ok("/backup/restore", {"backup_name": name})
    err(srv, "/set/get", {"database": "legacy", "set": "users", "key": "u1"}, 401, "AUTH_FAILED")
    wrong = {"Authorization": basic("alice", "nope")}
    r = srv.post("/set/get", {"database": "legacy", "set": "users", "key": "u1"}, headers=wrong)
    assert r.status_code == 401
    auth = {"Authorization": basic("alice", "s3cr3t-pw")}
    assert get(srv, "legacy", "users", "u1", headers=auth)["name"] == "Ann"
    page = srv.ok("/index/query/sorted", {"database": "legacy", "set": "users", "index": "by_dept", "value": "eng",
                                          "sort": {"field": "age", "order": "asc"}}, headers=auth)
    assert [e["key"] for e in page["data"]] == ["u2", "u1"]
    q = srv.ok("/index/query", {"database": "legacy", "set": "users", "index": "email_index", "value": "c@x"},
               headers=auth)
    assert q["data"]["count"] == 1
    # a fresh backup of it never holds the plaintext password, and still restores with it
    ours = srv.ok("/backup/create", {"database": "legacy"})["backup_name"]
    raw = get_object(s3, fresh_bucket, ours).decode()
    assert "s3cr3t-pw" not in raw
    assert json.loads(raw)["name"] == "legacy"
    srv.ok("/drop", {"name": "legacy"}, headers=auth)
    srv.ok("/backup/restore", {"backup_name": ours})
    assert get(srv, "legacy", "users", "u3", headers=auth)["age"] == 41
    # and the original's full backup restores too: it removes "legacy", so only with its credentials
    err(srv, "/backup/restore", {"backup_name": full_name}, 401, "AUTH_FAILED")
    assert get(srv, "legacy", "users", "u3", headers=auth)["age"] == 41
    srv.ok("/backup/restore", {"backup_name": full_name}, headers=auth)
    assert get(srv, "plain", "users", "c0000002") == {"email": "c2@x", "n": 2}
    err(srv, "/set/list", {"database": "legacy"}, 404, "DB_NOT_FOUND")


def invalid_objects() -> dict[str, bytes]:
    good = original_database("shop", 3)
    compact = json.dumps(good).encode()
    return {
        "garbage": b"\x00\xffnot json at all",
        "empty": b"",
        "truncated json": compact[: len(compact) // 2],
        "foreign json": json.dumps({"kind": "terraform-state", "version": 4, "resources": []}).encode(),
        "json array": b"[1, 2, 3]",
        "a full backup in a database folder": json.dumps({"databases": {"shop": good}, "metadata": {}}).encode(),
        "two databases": json.dumps({"databases": {"shop": good, "b": original_database("b", 1)}}).encode(),
        "bad key type": b'{"name":"shop","sets":{"users":{"name":"users","data":{"' + b"k" * 2000 + b'":1}}}}',
        "bad index": json.dumps({**good, "indexes": {"i": {"name": "i", "set_name": "users", "field": 3,
                                                          "type": 7}}}).encode(),
        "gzip bytes in a .json": gzip.compress(compact),
    }


def test_corrupt_truncated_and_foreign_objects_are_refused(make_server: Any, s3: SeaweedS3,  # noqa: F811
                                                           fresh_bucket: str) -> None:  # noqa: F811
    srv = make_server(args=s3_args(s3, fresh_bucket))
    fill(srv, "shop")
    srv.ok("/set/put", {"database": "shop", "set": "users", "key": "marker", "value": "kept"})
    ours = srv.ok("/backup/create", {"database": "shop"})["backup_name"]  # also makes the bucket
    for n, (kind, data) in enumerate(sorted(invalid_objects().items())):
        name = f"backups/shop/20240101-0000{n:02d}.json"
        put_object(s3, fresh_bucket, name, data)
        for op in ("/backup/verify", "/backup/restore"):
            r = srv.post(op, {"backup_name": name})
            assert (r.status_code, r.json().get("code")) == (422, "BACKUP_INVALID"), (kind, op, r.text)
        assert_shop_unchanged(srv)
    # a full backup that holds garbage
    put_object(s3, fresh_bucket, "backups/full/20240101-000000.json", b'{"databases": {"shop": {"name": 5}}}')
    err(srv, "/backup/restore", {"backup_name": "backups/full/20240101-000000.json"}, 422, "BACKUP_INVALID")
    # a database backup in the full folder
    put_object(s3, fresh_bucket, "backups/full/20240101-000001.json", json.dumps(original_database("shop", 2)).encode())
    err(srv, "/backup/restore", {"backup_name": "backups/full/20240101-000001.json"}, 422, "BACKUP_INVALID")
    assert_shop_unchanged(srv)

    # our own object, modified but with its sidecar kept: checksum mismatch
    raw = get_object(s3, fresh_bucket, ours)
    assert b'"n":7' in raw
    put_object(s3, fresh_bucket, ours, raw.replace(b'"n":7', b'"n":8'))
    refused = err(srv, "/backup/verify", {"backup_name": ours}, 422, "BACKUP_INVALID")
    assert "checksum" in refused["message"]
    err(srv, "/backup/restore", {"backup_name": ours}, 422, "BACKUP_INVALID")
    # truncated at several points, with the sidecar gone
    obstore.delete(s3.store(fresh_bucket), ours + ".sha256")
    for cut in (0.1, 0.5, 0.97):
        put_object(s3, fresh_bucket, ours, raw[: int(len(raw) * cut)])
        err(srv, "/backup/restore", {"backup_name": ours}, 422, "BACKUP_INVALID")
    # a sidecar still saying "pending": the backup never completed
    put_object(s3, fresh_bucket, ours, raw)
    put_object(s3, fresh_bucket, ours + ".sha256", b"pending")
    err(srv, "/backup/restore", {"backup_name": ours}, 422, "BACKUP_INVALID")
    assert_shop_unchanged(srv)
    err(srv, "/backup/restore", {"backup_name": "backups/shop/20000101-000000.json"}, 404, "BACKUP_NOT_FOUND")


# ------------------------------------------------------------------------------ faults


def test_s3_down_at_start_then_back(make_server: Any, fresh_bucket: str) -> None:  # noqa: F811
    """Nothing listens at the endpoint: the server still starts, serves data, and fails backups fast."""
    later = SeaweedS3()  # its ports are chosen, nothing runs there yet
    try:
        srv = make_server(args=s3_args(later, fresh_bucket))
        fill(srv, "shop", 5)
        assert get(srv, "shop", "users", "u4")["n"] == 4
        started = time.monotonic()
        data = err(srv, "/backup/create", {"database": "shop"}, 502, "BACKUP_FAILED")
        TIMINGS["create_s3_down"] = took = time.monotonic() - started
        assert took < 5, took
        assert "connect" in data["message"] or "refused" in data["message"], data
        err(srv, "/backup/create", {}, 502, "BACKUP_FAILED")
        err(srv, "/backup/list", {}, 502, "LIST_FAILED")
        err(srv, "/backup/list", {"database": "shop"}, 502, "LIST_FAILED")
        name = "backups/shop/20250101-000000.json"
        err(srv, "/backup/restore", {"backup_name": name}, 502, "RESTORE_FAILED")
        err(srv, "/backup/verify", {"backup_name": name}, 502, "RESTORE_FAILED")
        assert get(srv, "shop", "users", "u1")["n"] == 1  # data keeps working
        srv.ok("/set/put", {"database": "shop", "set": "users", "key": "u9", "value": {"email": "u9@x"}})
        assert srv.client is not None and srv.client.get("/health").status_code == 200
        metrics = srv.client.get("/metrics").text
        assert any(x.startswith("fuckbase_backup_failures_total{") and 'operation="create"' in x
                   and 'kind="unavailable"' in x for x in metrics.splitlines()), metrics
        assert later.secret_key not in srv.log()
        # S3 comes up: backups work without a restart, the bucket is made then
        later.start()
        name = srv.ok("/backup/create", {"database": "shop"})["backup_name"]
        assert [b["name"] for b in srv.ok("/backup/list", {})["backups"]] == [name]
    finally:
        later.stop()


def test_restore_on_start_with_s3_down_fails_in_one_line(tmp_path: Any, fresh_bucket: str) -> None:  # noqa: F811
    """A new node that cannot reach S3 must say so in one line, not crash with a traceback."""
    nowhere = SeaweedS3()  # nothing listens on its ports
    srv = ServerProcess(tmp_path / "d", args=[*s3_args(nowhere, fresh_bucket), "--restore-on-start", "latest"])
    with pytest.raises(RuntimeError, match="server exited"):
        srv.start(timeout=30)
    log = srv.log()
    assert "restore-on-start" in log and "Traceback" not in log, log[-1500:]


def test_frozen_s3_during_create(make_server: Any, own_s3: SeaweedS3) -> None:
    bucket = "frozen-create"
    srv = make_server(args=s3_args(own_s3, bucket, timeout=5))
    fill(srv, "shop", 1500, value_bytes=8000)  # ~12 MB: more than one multipart part
    srv.ok("/set/put", {"database": "shop", "set": "users", "key": "marker", "value": "kept"})
    good = {srv.ok("/backup/create", {"database": "shop"})["backup_name"]}  # bucket made, storage allocated

    def claims() -> set[str]:
        return {k for k in object_keys(own_s3, bucket) if k.endswith(".sha256")}

    response = None
    for _attempt in range(3):
        before = claims()
        call = Background(srv, "/backup/create", {"database": "shop"})
        # freeze as soon as the backup has claimed its name (its sidecar): the upload is under way
        wait_for(lambda: call.done() or claims() - before, 20, "the backup to claim a name")  # noqa: B023
        own_s3.freeze()
        frozen_at = time.monotonic()
        try:
            if call.done():  # it won the race: try again
                own_s3.thaw()
                good.add(call.result().json()["backup_name"])
                continue
            # the server keeps serving while its backup hangs on S3
            for path, body in [("/health", None),
                               ("/set/get", {"database": "shop", "set": "users", "key": "u7"}),
                               ("/set/put", {"database": "shop", "set": "users", "key": "during", "value": 1})]:
                status, took = timed_get(srv, path, body)
                assert status == 200 and took < 1, (path, status, took)
                TIMINGS[f"{path}_while_create_frozen"] = took
            response = call.result(60)
            TIMINGS["create_frozen"] = failed = time.monotonic() - frozen_at
        finally:
            own_s3.thaw()
        break
    assert response is not None, "the backup always finished before S3 froze"
    assert response.status_code in (502, 504), response.text
    assert response.json()["code"] == "BACKUP_FAILED", response.text
    assert own_s3.secret_key not in response.text
    assert failed < 12, failed  # one --s3-timeout (5 s), not one per cleanup step

    # after the thaw: no trace of the failed backup in the list, and backups work again
    time.sleep(1)  # requests S3 got while frozen are served now
    assert sorted(b["name"] for b in srv.ok("/backup/list", {})["backups"]) == sorted(good)
    name = srv.ok("/backup/create", {"database": "shop"})["backup_name"]
    good.add(name)
    assert srv.ok("/backup/list", {"database": "shop"})["backups"][0]["name"] == name
    assert srv.ok("/backup/verify", {"backup_name": name})["checksum"] == "verified"
    objects = {k for k in object_keys(own_s3, bucket) if not k.endswith(".sha256")}
    assert objects == good  # no half-written object (a stray "pending" sidecar may remain)
    assert get(srv, "shop", "users", "during") == 1
    assert own_s3.secret_key not in srv.log()


@pytest.fixture
def big_backup(own_s3: SeaweedS3) -> tuple[str, str]:
    """A bucket holding a large original-style backup of "shop" (~35 MB: takes seconds to restore)."""
    bucket = "restore-faults"
    assert own_s3.create_bucket(bucket) == 200
    doc = original_database("shop", 200_000, value=lambda i: {"email": f"c{i}@x", "n": i, "pad": "y" * 100})
    name = "backups/shop/20250101-000000.json"
    put_object(own_s3, bucket, name, json.dumps(doc, indent=2, sort_keys=True).encode())
    return bucket, name


def restore_fault(make_server: Any, own_s3: SeaweedS3, bucket: str, name: str,
                  fault: Callable[[], None]) -> tuple[httpx.Response, float, ServerProcess]:
    srv = make_server(args=s3_args(own_s3, bucket, timeout=5))
    fill(srv, "shop")
    srv.ok("/set/put", {"database": "shop", "set": "users", "key": "marker", "value": "kept"})
    call = Background(srv, "/backup/restore", {"backup_name": name})
    time.sleep(0.6)  # the download and the parse are under way
    assert not call.done(), call.result().text
    fault()
    hit = time.monotonic()
    r = call.result(60)
    return r, time.monotonic() - hit, srv


def test_s3_killed_mid_backup(make_server: Any, own_s3: SeaweedS3) -> None:
    """S3 dies while a backup uploads: a clean BACKUP_FAILED, the server serves on, and once
    S3 is back no half-written backup is listed and a new one succeeds."""
    bucket = "killed-create"
    srv = make_server(args=s3_args(own_s3, bucket, timeout=5))
    fill(srv, "shop", 1500, value_bytes=8000)  # ~12 MB: more than one multipart part
    good = {srv.ok("/backup/create", {"database": "shop"})["backup_name"]}
    before = {k for k in object_keys(own_s3, bucket) if k.endswith(".sha256")}
    call = Background(srv, "/backup/create", {"database": "shop"})
    wait_for(lambda: call.done() or {k for k in object_keys(own_s3, bucket) if k.endswith(".sha256")} - before,
             20, "the backup to claim a name")
    own_s3.kill()
    killed_at = time.monotonic()
    response = call.result(60)
    took = time.monotonic() - killed_at
    status, quick = timed_get(srv, "/set/get", {"database": "shop", "set": "users", "key": "u7"})
    assert status == 200 and quick < 1
    if response.status_code == 200:  # it finished before the kill landed: nothing to judge
        pytest.skip("the backup completed before S3 was killed")
    assert response.status_code in (502, 504) and response.json()["code"] == "BACKUP_FAILED", response.text
    assert took < 12, took
    own_s3.start()  # same data dir: what S3 had survives
    listed = {b["name"] for b in srv.ok("/backup/list", {})["backups"]}
    assert listed <= good  # the failed backup never shows up
    name = srv.ok("/backup/create", {"database": "shop"})["backup_name"]
    assert srv.ok("/backup/verify", {"backup_name": name})["checksum"] == "verified"


def test_s3_killed_mid_restore(make_server: Any, own_s3: SeaweedS3, big_backup: tuple[str, str]) -> None:
    bucket, name = big_backup
    r, took, srv = restore_fault(make_server, own_s3, bucket, name, own_s3.kill)
    TIMINGS["restore_killed"] = took
    assert r.status_code == 502 and r.json()["code"] == "RESTORE_FAILED", r.text
    assert took < 10, took
    assert_shop_unchanged(srv)
    err(srv, "/set/get", {"database": "shop", "set": "users", "key": "c0000001"}, 404, "KEY_NOT_FOUND")
    srv.restart()  # and nothing half-restored shows up after a restart either
    assert_shop_unchanged(srv)
    err(srv, "/set/get", {"database": "shop", "set": "users", "key": "c0000001"}, 404, "KEY_NOT_FOUND")


def test_s3_frozen_mid_restore(make_server: Any, own_s3: SeaweedS3, big_backup: tuple[str, str]) -> None:
    bucket, name = big_backup
    try:
        r, took, srv = restore_fault(make_server, own_s3, bucket, name, own_s3.freeze)
        for path, body in [("/health", None), ("/set/get", {"database": "shop", "set": "users", "key": "u3"})]:
            status, quick = timed_get(srv, path, body)
            assert status == 200 and quick < 1, (path, status, quick)
    finally:
        own_s3.thaw()
    TIMINGS["restore_frozen"] = took
    assert r.status_code in (502, 504) and r.json()["code"] == "RESTORE_FAILED", r.text
    assert took < 30, took
    assert_shop_unchanged(srv)
    err(srv, "/set/get", {"database": "shop", "set": "users", "key": "c0000001"}, 404, "KEY_NOT_FOUND")
    # S3 is back: the same backup now restores
    srv.ok("/backup/restore", {"backup_name": name})
    assert get(srv, "shop", "users", "c0199999")["n"] == 199_999
    err(srv, "/set/get", {"database": "shop", "set": "users", "key": "marker"}, 404, "KEY_NOT_FOUND")


def test_reads_go_on_while_a_restore_hangs_on_frozen_s3(make_server: Any, own_s3: SeaweedS3) -> None:
    bucket = "frozen-restore-reads"
    srv = make_server(args=s3_args(own_s3, bucket, timeout=5))
    fill(srv, "shop")
    srv.ok("/set/put", {"database": "shop", "set": "users", "key": "marker", "value": "kept"})
    name = srv.ok("/backup/create", {"database": "shop"})["backup_name"]
    own_s3.freeze()
    try:
        call = Background(srv, "/backup/restore", {"backup_name": name})
        listing = Background(srv, "/backup/list", {})
        # more long operations waiting on the frozen store than there are job threads
        stuck = [Background(srv, "/backup/list", {"database": "shop"}) for _ in range(4)]
        stuck += [Background(srv, "/backup/create", {"database": "shop"}) for _ in range(4)]
        time.sleep(0.3)
        for path, body in [("/health", None), ("/set/get", {"database": "shop", "set": "users", "key": "u3"})]:
            status, took = timed_get(srv, path, body)  # a new connection is accepted at once
            assert status == 200 and took < 1, (path, status, took)
        with httpx.Client(base_url=srv.url, timeout=5, trust_env=False) as c:
            for _ in range(20):
                for path, body in [("/set/get", {"database": "shop", "set": "users", "key": "u3"}),
                                   ("/index/query", {"database": "shop", "set": "users", "index": "email", "value": "u3@x"})]:
                    started = time.monotonic()
                    r = c.post(path, json=body)
                    took = time.monotonic() - started
                    assert r.status_code == 200 and took < 0.1, (path, r.status_code, took)
        r = call.result(60)
        lr = listing.result(60)
        for b in stuck:
            assert b.result(60).status_code in (502, 504)
    finally:
        own_s3.thaw()
    TIMINGS["restore_frozen_from_start"] = call.elapsed
    TIMINGS["list_frozen"] = listing.elapsed
    assert r.status_code == 504 and r.json()["code"] == "RESTORE_FAILED", r.text
    assert "timed out" in r.json()["message"]
    assert lr.status_code == 504 and lr.json()["code"] == "LIST_FAILED", lr.text
    assert call.elapsed < 20 and listing.elapsed < 20
    assert_shop_unchanged(srv)


def test_a_backup_damaged_on_the_way_is_never_acknowledged(make_server: Any, s3: SeaweedS3,  # noqa: F811
                                                            fresh_bucket: str) -> None:  # noqa: F811
    """A proxy flips bytes of what is uploaded: every backup fails with BACKUP_FAILED (the
    store's ETag differs from the MD5s of what was sent, and the object read back differs
    too) instead of answering success for a corrupt object."""
    proxy = CorruptingProxy(s3.s3_port, b"needle-value", b"needle-vblue")
    try:
        srv = make_server(s3_args(s3, fresh_bucket, endpoint=proxy.endpoint))
        srv.ok("/create", {"name": "shop"})
        srv.ok("/set/put", {"database": "shop", "set": "users", "key": "k", "value": {"v": "needle-value"}})
        for _ in range(4):
            r = srv.post("/backup/create", {"database": "shop"})
            assert r.status_code == 502 and r.json()["code"] == "BACKUP_FAILED", r.text
            assert "differs from what was sent" in r.json()["message"], r.text
        assert proxy.changed >= 4
        assert srv.ok("/set/get", {"database": "shop", "set": "users", "key": "k"})["data"] == {"v": "needle-value"}
        # once the path is healthy again, backups succeed and verify
        proxy.needle = proxy.replacement = b"-nothing-to-change-"
        gets = proxy.gets
        name = srv.ok("/backup/create", {"database": "shop"})["backup_name"]
        assert proxy.gets == gets  # the store's ETag matched: no read-back was needed
        assert srv.ok("/backup/verify", {"backup_name": name})["checksum"] == "verified"
    finally:
        proxy.close()


def test_our_backup_without_its_checksum_file_is_refused(make_server: Any, s3: SeaweedS3,  # noqa: F811
                                                         fresh_bucket: str) -> None:  # noqa: F811
    srv = make_server(s3_args(s3, fresh_bucket))
    fill(srv, n=5)
    name = srv.ok("/backup/create", {"database": "shop"})["backup_name"]
    obstore.delete(s3.store(fresh_bucket), name + ".sha256")
    for path in ("/backup/verify", "/backup/restore"):
        r = srv.post(path, {"backup_name": name})
        assert r.status_code == 422 and r.json()["code"] == "BACKUP_INVALID", r.text
        assert "checksum file" in r.json()["message"]
    assert srv.ok("/set/get", {"database": "shop", "set": "users", "key": "u1"})["data"]["n"] == 1


def test_wrong_credentials(make_server: Any, s3: SeaweedS3, fresh_bucket: str) -> None:  # noqa: F811
    assert s3.create_bucket(fresh_bucket) == 200
    wrong_secret = "wrong-secret-" + "q" * 27
    srv = make_server(args=s3_args(s3, fresh_bucket, secret=wrong_secret))
    fill(srv, "shop", 3)
    responses = []
    started = time.monotonic()
    data = err(srv, "/backup/create", {"database": "shop"}, 502, "BACKUP_FAILED")
    TIMINGS["create_wrong_credentials"] = time.monotonic() - started
    assert "denied" in data["message"], data
    responses.append(json.dumps(data))
    responses.append(json.dumps(err(srv, "/backup/create", {}, 502, "BACKUP_FAILED")))
    responses.append(json.dumps(err(srv, "/backup/list", {}, 502, "LIST_FAILED")))
    r = srv.post("/backup/restore", {"backup_name": "backups/shop/20250101-000000.json"})
    assert r.status_code == 502 and r.json()["code"] == "RESTORE_FAILED", r.text
    responses.append(r.text)
    assert srv.client is not None
    responses.append(srv.client.get("/metrics").text)
    responses.append(json.dumps(srv.ok("/server/info", {})))
    srv.stop()
    for text in [*responses, srv.log()]:
        assert wrong_secret not in text and "q" * 27 not in text


def test_log_holds_no_presigned_urls(make_server: Any, s3: SeaweedS3, fresh_bucket: str) -> None:  # noqa: F811
    srv = make_server(args=s3_args(s3, fresh_bucket))
    srv.ok("/create", {"name": "shop"})
    srv.ok("/backup/create", {"database": "shop"})  # creates the bucket through a presigned PUT
    log = srv.log()
    assert "X-Amz-Signature" not in log and "X-Amz-Credential" not in log, log[-1500:]
    assert s3.secret_key not in log


# ------------------------------------------------------------------------------ load and scheduling


def test_backup_during_concurrent_writes_and_reads(make_server: Any, s3: SeaweedS3,  # noqa: F811
                                                   fresh_bucket: str) -> None:  # noqa: F811
    """20k entries, writers and readers running: the backup is a consistent snapshot, nobody fails."""
    assert s3.create_bucket(fresh_bucket) == 200
    n = 20_000
    seed = original_database("shop", n)
    put_object(s3, fresh_bucket, "backups/shop/20240101-000000.json", json.dumps(seed).encode())
    srv = make_server(args=s3_args(s3, fresh_bucket))
    srv.ok("/backup/restore", {"backup_name": "backups/shop/20240101-000000.json"})  # quick way to load 20k
    stop = threading.Event()
    failures: list[str] = []
    acked: dict[str, list[int]] = {}
    reads = [0]

    def writer(set_name: str) -> None:
        done = acked.setdefault(set_name, [])
        with httpx.Client(base_url=srv.url, timeout=30, trust_env=False) as c:
            i = 0
            while not stop.is_set():
                r = c.post("/set/put", json={"database": "shop", "set": set_name, "key": f"{i:08d}", "value": i})
                if r.status_code != 200:
                    failures.append(f"put {set_name}/{i}: {r.status_code} {r.text}")
                    return
                done.append(i)
                i += 1

    def reader(seed_: int) -> None:
        rng = random.Random(seed_)
        with httpx.Client(base_url=srv.url, timeout=30, trust_env=False) as c:
            while not stop.is_set():
                i = rng.randrange(n)
                r = c.post("/set/get", json={"database": "shop", "set": "users", "key": f"c{i:07d}"})
                if r.status_code != 200 or r.json()["data"] != {"email": f"c{i}@x", "n": i}:
                    failures.append(f"get c{i}: {r.status_code} {r.text}")
                    return
                reads[0] += 1

    threads = [threading.Thread(target=writer, args=(f"seq{k}",)) for k in range(3)]
    threads += [threading.Thread(target=reader, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        started = time.monotonic()
        created = srv.ok("/backup/create", {"database": "shop"})
        took = time.monotonic() - started
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:5]
    assert reads[0] > 50
    TIMINGS["create_20k_under_load"] = took
    assert took < 20, took
    doc = json.loads(get_object(s3, fresh_bucket, created["backup_name"]))
    assert len(doc["sets"]["users"]["data"]) == n
    assert doc["sets"]["users"]["data"]["c0012345"] == {"email": "c12345@x", "n": 12345}
    total = n
    for set_name, done in acked.items():
        got = sorted(int(k) for k in doc["sets"][set_name]["data"])
        assert got == list(range(len(got))), f"{set_name}: a write is missing before a later one"
        assert len(got) <= len(done) and len(done) > len(got) > 0  # writes went on before and after
        total += len(got)
        # every acknowledged write is there
        assert get(srv, "shop", set_name, f"{done[-1]:08d}") == done[-1]
    assert created["entries"] == total
    assert srv.ok("/backup/verify", {"backup_name": created["backup_name"]})["entries"] == total


def test_automatic_backups_with_retention(make_server: Any, s3: SeaweedS3, fresh_bucket: str) -> None:  # noqa: F811
    srv = make_server(args=[*s3_args(s3, fresh_bucket), "--backup-interval", "0.02", "--backup-retention", "2"])
    srv.ok("/create", {"name": "shop"})
    manual_full = srv.ok("/backup/create", {})["backup_name"]
    manual_db = srv.ok("/backup/create", {"database": "shop"})["backup_name"]
    manual = {manual_full, manual_db}

    def automatic() -> list[str]:
        return [b["name"] for b in srv.ok("/backup/list", {})["backups"] if b["name"] not in manual]

    def holding(i: int) -> str | None:
        """The newest automatic backup, once it is a new one holding the write just made (one
        the scheduler took just before that write may come first)."""
        a = automatic()
        if not a or a[0] in seen:
            return None
        sets = json.loads(get_object(s3, fresh_bucket, a[0]))["databases"]["shop"]["sets"]
        return a[0] if sets.get("s", {}).get("data", {}).get(f"k{i}") == i else None

    seen: list[str] = []
    for i in range(3):
        srv.ok("/set/put", {"database": "shop", "set": "s", "key": f"k{i}", "value": i})
        seen.append(wait_for(lambda i=i: holding(i), 10, f"automatic backup {i}"))
    assert len(set(seen)) == 3
    wait_for(lambda: len(automatic()) == 2, 10, "retention to delete the oldest automatic backups")
    listed = srv.ok("/backup/list", {})["backups"]
    names = [b["name"] for b in listed]
    assert names[:2] == [seen[2], seen[1]] and set(names[2:]) == manual
    assert all(b["database"] == "all" for b in listed if b["name"] in seen)
    keys = object_keys(s3, fresh_bucket)
    assert seen[0] not in keys and seen[0] + ".sha256" not in keys  # deleted with its sidecar
    assert json.loads(get_object(s3, fresh_bucket, seen[2] + ".sha256"))["automatic"] is True
    assert json.loads(get_object(s3, fresh_bucket, manual_full + ".sha256"))["automatic"] is False
    # idle: nothing changed, so no new backups
    before = names
    time.sleep(2.6)  # more than two intervals
    assert [b["name"] for b in srv.ok("/backup/list", {})["backups"]] == before
    assert srv.client is not None
    metrics = srv.client.get("/metrics").text
    line = next(x for x in metrics.splitlines()
                if x.startswith('fuckbase_backup_last_success_timestamp_seconds{operation="create"}'))
    assert abs(float(line.split()[-1]) - time.time()) < 60
    info = srv.ok("/server/info", {})
    assert info["backup_target"].startswith(f"s3://{fresh_bucket} ")
    assert info["backup_interval_minutes"] == 0.02


def test_backups_in_the_same_second_all_survive(make_server: Any, s3: SeaweedS3, fresh_bucket: str) -> None:  # noqa: F811
    srv = make_server(args=s3_args(s3, fresh_bucket))
    fill(srv, "shop", 5)
    names = [srv.ok("/backup/create", {"database": "shop"})["backup_name"] for _ in range(3)]
    calls = [Background(srv, "/backup/create", {"database": "shop"}) for _ in range(5)]
    calls += [Background(srv, "/backup/create", {}) for _ in range(3)]
    for call in calls:
        r = call.result(60)
        assert r.status_code == 200, r.text
        names.append(r.json()["backup_name"])
    assert len(set(names)) == len(names) == 11
    stamps = [n.rsplit("/", 1)[1][:15] for n in names]
    assert len(set(stamps)) < len(stamps)  # some really were made in the same second
    listed = srv.ok("/backup/list", {})["backups"]
    assert sorted(b["name"] for b in listed) == sorted(names)
    order = [(b["timestamp"], b["name"]) for b in listed if b["database"] == "shop"]
    assert [t for t, _ in order] == sorted((t for t, _ in order), reverse=True)
    for name in names:
        check = srv.ok("/backup/verify", {"backup_name": name})
        assert check["checksum"] == "verified" and check["entries"] == 5, name
    keys = object_keys(s3, fresh_bucket)
    assert len(keys) == 2 * len(names)  # each object and its sidecar, nothing else


def test_a_backup_stuck_on_frozen_s3_pins_no_storage(make_server: Any, own_s3: SeaweedS3,
                                                     server_backend: str | None) -> None:
    """The snapshot is encoded to a local spool and released at once: while the upload hangs,
    writes go on and the data file reuses its pages instead of growing with every overwrite."""
    if server_backend is not None:
        pytest.skip("the embedded engine's data file is what this measures")
    bucket = "frozen-pins-nothing"
    srv = make_server(args=s3_args(own_s3, bucket, timeout=15))
    fill(srv, "shop", n=200, value_bytes=20_000)  # ~4 MB live
    srv.ok("/backup/create", {"database": "shop"})  # the bucket exists, its storage is allocated
    data_file = srv.data_dir / "store" / "data.mdb"
    own_s3.freeze()
    try:
        stuck = Background(srv, "/backup/create", {"database": "shop"})
        time.sleep(1)
        assert srv.client is not None
        for round_ in range(10):  # ~40 MB of overwrites of the same 200 keys
            for i in range(200):
                r = srv.client.post("/set/put", json={"database": "shop", "set": "users", "key": f"u{i}",
                                                      "value": {"email": f"u{i}@x", "n": i, "round": round_,
                                                                "pad": "q" * 20_000}})
                assert r.status_code == 200, r.text
        assert not stuck.done()
        size = data_file.stat().st_size
        assert size < 24 << 20, size  # a held snapshot would keep every version: over 40 MB
        r = stuck.result(60)
    finally:
        own_s3.thaw()
    assert r.status_code in (502, 504)
