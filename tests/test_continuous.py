"""Continuous backup against a real S3 server (SeaweedFS): changes shipped within a second,
restores to any instant, a lost node rebuilt from the bucket, and every way the stream can break."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ServerProcess
from pgserver import pg_url, postgres  # noqa: F401
from s3server import SeaweedS3, fresh_bucket, s3  # noqa: F401
from test_backup_s3 import get_object, object_keys, original_database, put_object, s3_args

from fuckbase.backup import BackupService
from fuckbase.backupformat import BackupInvalid
from fuckbase.continuous import (
    DatabaseHistory,
    Generation,
    Retention,
    SegmentObject,
    Shipper,
    SnapshotObject,
    _Replay,
    database_ranges,
    expired,
    ranges,
    restore_to,
    timeline,
)
from fuckbase.objectstore import LocalObjectStore
from fuckbase.storage import Change, Storage, allow_all

SEGMENTS = r"continuous/.*/segments/"


def instant() -> tuple[float, str]:
    """A moment clearly between the writes before and after it."""
    time.sleep(0.05)
    now = time.time()
    time.sleep(0.05)
    return now, datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z")


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def wait_shipped(srv: ServerProcess, after: float, timeout: float = 20.0) -> dict[str, Any]:
    """Waits until the server has shipped everything committed before `after`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = srv.ok("/server/info").get("continuous", {"state": "not published yet"})
        latest = info.get("window", {}).get("latest")
        if info["state"] == "shipping" and latest and ts(latest) > after:
            return info  # type: ignore[no-any-return]
        time.sleep(0.1)
    raise AssertionError(f"not shipped in {timeout}s: {srv.ok('/server/info')}")


KEYS = [f"u{i}" for i in range(13)]


def state(srv: ServerProcess, shop: str = "shop", only_shop: bool = False) -> dict[str, Any]:
    """Everything the API shows of the test's data, for exact comparison."""
    out: dict[str, Any] = {}

    def read(path: str, body: dict[str, Any]) -> Any:
        r = srv.post(path, body)
        data = r.json()
        return data.get("data") if r.status_code == 200 else data["code"]

    for key in KEYS:
        out[f"{shop}/{key}"] = read("/set/get", {"database": shop, "set": "users", "key": key})
    for text in ("e0", "e1", "e2"):
        out[f"email={text}"] = read("/index/query", {"database": shop, "set": "users", "index": "email", "value": text})
        out[f"srt={text}"] = read("/index/query/sorted", {"database": shop, "set": "users", "index": "srt",
                                                           "value": text, "pagination": {"limit": 100}})
    out["n_ix=12"] = read("/index/query", {"database": shop, "set": "users", "index": "n_ix", "value": "12"})
    if not only_shop:
        for db in ("other", "third"):
            out[f"{db}/k"] = read("/set/get", {"database": db, "set": "s", "key": "k"})
    return out


def put(srv: ServerProcess, key: str, value: Any, db: str = "shop", set_name: str = "users") -> None:
    srv.ok("/set/put", {"database": db, "set": set_name, "key": key, "value": value})


def start_shipping(make_server: Any, s3: SeaweedS3, bucket: str, *extra: str) -> ServerProcess:  # noqa: F811
    srv: ServerProcess = make_server(s3_args(s3, bucket, continuous=True) + ["--backup-sync-interval", "0.2", *extra])
    srv.bucket = bucket  # type: ignore[attr-defined]
    wait_shipped(srv, 0)  # the window opens with the first base snapshot
    return srv


@pytest.fixture
def shipping(make_server: Any, s3: SeaweedS3, fresh_bucket: str) -> ServerProcess:  # noqa: F811
    """A shipping server whose only snapshot is the first: every later instant needs the segments."""
    return start_shipping(make_server, s3, fresh_bucket)


def test_a_restore_to_an_instant_gives_exactly_the_state_at_that_instant(make_server: Any, s3: SeaweedS3,  # noqa: F811
                                                                           fresh_bucket: str) -> None:  # noqa: F811
    srv = start_shipping(make_server, s3, fresh_bucket, "--backup-snapshot-changes", "15",
                         "--backup-snapshot-interval", "0.01")
    srv.ok("/create", {"name": "shop", "auth": {"username": "u", "password": "p"}})
    auth = {"auth": {"username": "u", "password": "p"}}
    srv.client.headers["Authorization"] = "Basic dTpw"  # type: ignore[union-attr]
    for i in range(10):
        put(srv, f"u{i}", {"email": f"e{i % 3}", "n": i})
    srv.ok("/index/create", {"database": "shop", "set": "users", "name": "email", "field": "email", **auth})
    srv.ok("/index/create/sortable", {"database": "shop", "set": "users", "name": "srt", "primary_field": "email",
                                      "sort_fields": ["n"]})
    srv.ok("/create", {"name": "other"})
    put(srv, "k", "other-1", db="other", set_name="s")
    t1, at1 = instant()
    state1 = state(srv)

    srv.ok("/set/delete", {"database": "shop", "set": "users", "key": "u1"})
    srv.ok("/set/delete", {"database": "shop", "set": "users", "key": "u2"})
    put(srv, "u3", {"email": "e0", "n": 3})
    put(srv, "u10", {"email": "e1", "n": 10})
    srv.ok("/index/drop", {"database": "shop", "set": "users", "name": "email"})
    srv.ok("/set/batch", {"database": "shop", "set": "users", "operations": [
        {"op": "put", "key": "u11", "value": {"email": "e2", "n": 11}}, {"op": "delete", "key": "u4"}]})
    srv.ok("/create", {"name": "third"})
    put(srv, "k", "third-1", db="third", set_name="s")
    t2, at2 = instant()
    state2 = state(srv)

    srv.ok("/drop", {"name": "other"})
    srv.ok("/index/create", {"database": "shop", "set": "users", "name": "n_ix", "field": "n"})
    put(srv, "u12", {"email": "e0", "n": 12})
    put(srv, "k", "third-2", db="third", set_name="s")
    t3, at3 = instant()
    state3 = state(srv)
    assert state1 != state2 != state3
    wait_shipped(srv, t3)

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # a snapshot just taken is joined to the window by the next shipping round
        listed = srv.ok("/backup/list")["point_in_time"]
        if ts(listed["earliest"]) < t1 and ts(listed["latest"]) > t3:
            break
        time.sleep(0.1)
    assert ts(listed["earliest"]) < t1 and ts(listed["latest"]) > t3, listed
    assert len(listed["snapshots"]) >= 2  # a new base after 15 changes
    # each database's own range: from its creation (or the first snapshot) to its drop (or now)
    per_db = listed["databases"]
    assert set(per_db) == {"shop", "other", "third"}
    assert ts(per_db["shop"]["earliest"]) < t1 and ts(per_db["shop"]["latest"]) > t3
    assert t1 < ts(per_db["third"]["earliest"]) < t2 and ts(per_db["third"]["latest"]) > t3
    assert ts(per_db["other"]["earliest"]) < t1 and t2 < ts(per_db["other"]["latest"]) < t3
    assert srv.ok("/backup/list", {"database": "other"})["point_in_time"]["databases"].keys() == {"other"}
    r = srv.ok("/backup/restore", {"at": per_db["other"]["latest"], "database": "other", "as": "other_last"})
    assert srv.ok("/set/get", {"database": "other_last", "set": "s", "key": "k"})["data"] == "other-1"
    srv.ok("/drop", {"name": "other_last"})
    r = srv.post("/backup/restore", {"at": at3, "database": "other", "as": "other_gone"})
    assert (r.status_code, r.json()["code"]) == (404, "BACKUP_NOT_FOUND")

    # one database into a new name: the original stays as it is
    r = srv.ok("/backup/restore", {"at": at1, "database": "shop", "as": "shop_t1"})
    assert r["databases"] == ["shop_t1"]
    assert state(srv, "shop_t1", only_shop=True) == {k.replace("shop/", "shop_t1/"): v for k, v in state1.items()
                                                      if not k.startswith(("other/", "third/"))}
    assert state(srv) == state3
    r = srv.post("/backup/restore", {"at": at1, "database": "shop", "as": "shop_t1"})
    assert (r.status_code, r.json()["code"]) == (409, "DB_ALREADY_EXISTS")

    for at, expected in ((at2, state2), (at1, state1), (at3, state3)):
        r = srv.ok("/backup/restore", {"at": at})
        assert r["full"] is True
        assert state(srv) == expected, at
    srv.ok("/backup/restore", {"at": at2})
    info = srv.ok("/server/info")
    assert info["databases_count"] == 3  # shop, other, third: shop_t1 came later
    r = srv.post("/set/get", {"database": "shop", "set": "users", "key": "u0"}, headers={"Authorization": ""})
    assert r.status_code == 401  # the credentials came back with the database


def test_bad_point_in_time_requests_are_refused_and_change_nothing(shipping: ServerProcess) -> None:
    srv = shipping
    srv.ok("/create", {"name": "shop"})
    put(srv, "u0", 1)
    t, at = instant()
    wait_shipped(srv, t)
    for body, code in (
        ({"at": "yesterday"}, 400), ({"at": "2026-13-45T99:00:00Z"}, 400), ({"at": "2026-12-01T10:00:00"}, 400),
        ({"at": 5}, 400), ({"at": at, "backup_name": "backups/full/20260101-000000.json"}, 400),
        ({"at": at, "as": "copy"}, 400), ({"at": at, "database": "full"}, 400), ({}, 400),
        ({"at": "2001-01-01T00:00:00Z"}, 404), ({"at": "2999-01-01T00:00:00Z"}, 404),
        ({"at": at, "database": "nothere"}, 404),
        # in UTC these fall outside years 1-9999
        ({"at": "0001-01-01T00:00:00+23:59"}, 400), ({"at": "9999-12-31T23:59:59.999999-00:01"}, 400),
        ({"at": at, "database": "shop", "as": ""}, 400),  # not "no new name": that would restore over it
    ):
        r = srv.post("/backup/restore", body)
        assert r.status_code == code, (body, r.text)
        assert r.json()["status"] == "error"
    assert state(srv)["shop/u0"] == 1


def test_a_lost_node_is_rebuilt_from_the_bucket_with_every_write_older_than_a_second(
        make_server: Any, s3: SeaweedS3, fresh_bucket: str, tmp_path: Path) -> None:  # noqa: F811
    """RPO ≤ 1 s with the default sync interval: kill -9 under a steady put load, delete the
    data dir, start a new node from the bucket."""
    srv = make_server(s3_args(s3, fresh_bucket, continuous=None))  # on by default with S3
    srv.ok("/create", {"name": "shop"})
    acked: list[tuple[float, str, int]] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            n = 0
            while not stop.is_set():
                key = f"w{worker}-{n}"
                try:
                    r = c.post("/set/put", json={"database": "shop", "set": "s", "key": key, "value": n})
                except httpx.HTTPError:
                    return
                if r.status_code == 200:
                    acked.append((time.time(), key, n))
                n += 1

    threads = [threading.Thread(target=load, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    time.sleep(4)
    killed_at = time.time()
    srv.kill9()
    stop.set()
    for t in threads:
        t.join()
    shutil.rmtree(srv.data_dir)
    must_have = [(key, n) for t, key, n in acked if t < killed_at - 1.0]
    assert len(must_have) > 500

    fresh = make_server(s3_args(s3, fresh_bucket, continuous=None) + ["--restore-on-start", "latest"])
    assert fresh.client is not None
    missing = []
    for key, n in must_have:
        r = fresh.client.post("/set/get", json={"database": "shop", "set": "s", "key": key})
        if r.status_code != 200 or r.json()["data"] != n:
            missing.append(key)
    assert missing == [], f"{len(missing)} of {len(must_have)} acknowledged writes lost"
    newest = max(t for t, _, _ in acked)
    print(f"\nRPO: {len(must_have)} writes acknowledged >1 s before kill -9 all restored; "
          f"{len(acked)} acknowledged in all, the last {killed_at - newest:.3f}s before the kill")


def test_a_second_node_on_the_same_bucket_is_refused(shipping: ServerProcess, make_server: Any, own_storage: Any,
                                                     s3: SeaweedS3) -> None:  # noqa: F811
    """A node of other data (on PostgreSQL: another database; the nodes of one database take
    turns at shipping) may not ship into a bucket another node ships to."""
    first = shipping
    first.ok("/create", {"name": "a"})
    t, _ = instant()
    wait_shipped(first, t)
    second = make_server(own_storage() + s3_args(s3, first.bucket, continuous=True)  # type: ignore[attr-defined]
                         + ["--backup-sync-interval", "0.2"])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        info = second.ok("/server/info").get("continuous", {"state": ""})
        if info["state"].startswith("refused"):
            break
        time.sleep(0.1)
    assert "ships to this bucket" in info["state"], info
    assert 'fuckbase_continuous_failures_total{kind="lease"}' in second.client.get("/metrics").text  # type: ignore[union-attr]
    second.ok("/create", {"name": "b"})  # it serves on
    put(first, "k", 1, db="a", set_name="s")
    t, _ = instant()
    wait_shipped(first, t)  # the first ships on
    keys = object_keys(s3, first.bucket, "continuous/")  # type: ignore[attr-defined]
    assert len({k.split("/")[1] for k in keys if k != "continuous/lease.json"}) == 1  # one generation


def test_a_damaged_or_missing_segment_is_refused_naming_the_gap(shipping: ServerProcess, s3: SeaweedS3) -> None:  # noqa: F811
    srv = shipping
    bucket = srv.bucket  # type: ignore[attr-defined]
    srv.ok("/create", {"name": "shop"})
    put(srv, "u0", 0)
    t0, at0 = instant()
    put(srv, "m", 0, set_name="marks")  # its segment shows that nothing changed between u0 and it
    t0b, _ = instant()
    wait_shipped(srv, t0b)
    before = set(object_keys(s3, bucket, "continuous/"))
    put(srv, "u1", 1)
    t1, at1 = instant()
    wait_shipped(srv, t1)
    new = sorted(k for k in set(object_keys(s3, bucket, "continuous/")) - before if "/segments/" in k)
    assert len(new) == 1
    original = get_object(s3, bucket, new[0])
    expected = state(srv)

    for damage in (original[:-7], original[:20] + bytes(b ^ 0x55 for b in original[20:40]) + original[40:]):
        put_object(s3, bucket, new[0], damage)
        r = srv.post("/backup/restore", {"at": at1})
        assert (r.status_code, r.json()["code"]) == (422, "BACKUP_INVALID"), r.text
        assert new[0] in r.json()["message"] and "cannot be replayed" in r.json()["message"]
        assert state(srv) == expected  # nothing changed
    obj = s3.store(bucket)
    import obstore

    obstore.delete(obj, new[0])
    r = srv.post("/backup/restore", {"at": at1})
    assert (r.status_code, r.json()["code"]) == (422, "BACKUP_INVALID"), r.text
    assert "missing" in r.json()["message"]
    assert state(srv) == expected
    srv.ok("/backup/restore", {"at": at0})  # the instants before the gap are still there
    assert state(srv)["shop/u1"] == "KEY_NOT_FOUND" and state(srv)["shop/u0"] == 0
    assert srv.post("/set/get", {"database": "shop", "set": "marks", "key": "m"}).status_code == 404


@pytest.fixture
def own_s3() -> Iterator[SeaweedS3]:
    server = SeaweedS3().start()
    yield server
    server.stop()


def test_changes_wait_while_s3_is_frozen_or_down_and_none_is_lost(make_server: Any, own_s3: SeaweedS3,
                                                          fresh_bucket: str) -> None:  # noqa: F811
    srv = make_server(s3_args(own_s3, fresh_bucket, timeout=2, continuous=True) + ["--backup-sync-interval", "0.2"])
    srv.ok("/create", {"name": "shop"})
    put(srv, "before", 0)
    t, _ = instant()
    wait_shipped(srv, t)
    own_s3.freeze()
    try:
        started = time.monotonic()
        for i in range(200):
            put(srv, f"k{i}", i)  # writes go on
        assert time.monotonic() - started < 10
        time.sleep(3)
        metrics = srv.client.get("/metrics").text  # type: ignore[union-attr]
        pending = [line for line in metrics.splitlines() if line.startswith("fuckbase_continuous_pending_changes ")]
        assert float(pending[0].split()[1]) > 0, pending
    finally:
        own_s3.thaw()
    t, _ = instant()
    wait_shipped(srv, t, timeout=60)
    own_s3.kill()  # and now gone altogether for a while
    for i in range(200, 300):
        put(srv, f"k{i}", i)
    time.sleep(2)
    own_s3.start()
    t, at = instant()
    wait_shipped(srv, t, timeout=90)
    srv.ok("/drop", {"name": "shop"})
    srv.ok("/backup/restore", {"at": at})
    for i in range(300):
        assert srv.ok("/set/get", {"database": "shop", "set": "users", "key": f"k{i}"})["data"] == i
    failures = srv.client.get("/metrics").text  # type: ignore[union-attr]
    assert "fuckbase_continuous_failures_total{kind=" in failures


def test_a_restart_compacts_the_small_segments_and_keeps_every_instant(shipping: ServerProcess,
                                                                        s3: SeaweedS3) -> None:  # noqa: F811
    srv = shipping
    bucket = srv.bucket  # type: ignore[attr-defined]
    srv.ok("/create", {"name": "shop"})
    instants = []
    for i in range(5):
        put(srv, "k", i)
        time.sleep(0.3)  # one small segment each
        instants.append(instant())
    wait_shipped(srv, instants[-1][0])
    import re

    small = [k for k in object_keys(s3, bucket, "continuous/") if re.search(SEGMENTS, k)]
    assert len(small) >= 5
    srv.restart()
    deadline = time.monotonic() + 20
    while True:  # until the small ones are gone: one bulk delete, which a listing may see half done
        segments = [k for k in object_keys(s3, bucket, "continuous/") if re.search(SEGMENTS, k)]
        if len(segments) <= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(segments) <= 2, segments  # the compacted one (and perhaps one since)
    for i, (_, at) in enumerate(instants):
        srv.ok("/backup/restore", {"at": at})
        assert srv.ok("/set/get", {"database": "shop", "set": "users", "key": "k"})["data"] == i


def test_continuous_backup_to_the_local_folder(make_server: Any, tmp_path: Path) -> None:
    srv = make_server(["--backup-continuous", "--backup-sync-interval", "0.2"])
    srv.ok("/create", {"name": "shop"})
    put(srv, "a", 1, set_name="s")
    t, at = instant()
    put(srv, "a", 2, set_name="s")
    t2, _ = instant()
    wait_shipped(srv, t2)
    srv.ok("/backup/restore", {"at": at})
    assert srv.ok("/set/get", {"database": "shop", "set": "s", "key": "a"})["data"] == 1
    assert list((srv.data_dir / "backups" / "continuous").glob("*/segments/*.jsonl.zst"))
    cli = subprocess.run([sys.executable, "-m", "fuckbase", "backup", "--url", srv.url, "restore", "--at", at,
                          "--database", "shop", "--as", "then"], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and "restored then" in cli.stdout, cli.stderr
    assert srv.ok("/set/get", {"database": "then", "set": "s", "key": "a"})["data"] == 1
    scraped = httpx.get(srv.url + "/metrics").text  # every kind of failure from 0, for alerts written ahead
    assert all(f'fuckbase_continuous_failures_total{{kind="{kind}"}} 0.0' in scraped
               for kind in ("lease", "stream", "error", "retention")), scraped
    off = make_server([], data_dir=tmp_path / "off")
    assert off.ok("/server/info")["backup_continuous"] is False
    assert "continuous" not in off.ok("/backup/list")


def test_the_seed_flows_work_as_before_beside_the_stream(make_server: Any, s3: SeaweedS3,  # noqa: F811
                                                         fresh_bucket: str) -> None:  # noqa: F811
    """With continuous backup on (the default with S3), named backups, their list, restore and
    verify, and the original's objects behave exactly as without it."""
    srv = make_server(s3_args(s3, fresh_bucket, continuous=None))
    wait_shipped(srv, 0)
    srv.ok("/create", {"name": "shop"})
    put(srv, "u0", {"email": "a"})
    created = srv.ok("/backup/create", {"database": "shop"})["backup_name"]
    full = srv.ok("/backup/create", {})["backup_name"]
    put_object(s3, fresh_bucket, "backups/legacy/20250101-000000.json",
               json.dumps(original_database("legacy", 3), indent=2).encode())
    listed = srv.ok("/backup/list")
    assert sorted(b["name"] for b in listed["backups"]) == sorted(
        [created, full, "backups/legacy/20250101-000000.json"])
    assert "point_in_time" in listed
    assert [b["name"] for b in srv.ok("/backup/list", {"database": "shop"})["backups"]] == [created]
    put(srv, "u0", {"email": "b"})
    srv.ok("/backup/restore", {"backup_name": created})
    assert srv.ok("/set/get", {"database": "shop", "set": "users", "key": "u0"})["data"] == {"email": "a"}
    srv.ok("/backup/restore", {"backup_name": "backups/legacy/20250101-000000.json"})
    srv.ok("/backup/verify", {"backup_name": full})
    r = srv.ok("/backup/restore", {"backup_name": created, "as": "shop_copy"})
    assert r["databases"] == ["shop_copy"]
    r = srv.post("/backup/restore", {"backup_name": full, "as": "x"})
    assert r.status_code == 400
    keys = object_keys(s3, fresh_bucket, "")
    assert all(k.startswith(("backups/", "continuous/")) for k in keys), keys


# ------------------------------------------------------------------ retention by age

DAY = 86400.0


def _gen(name: str, snaps: list[tuple[int, float]], segs: list[tuple[int, int, float]]) -> Generation:
    g = Generation(name)
    g.snapshots = [SnapshotObject(f"{name}/snap{seq}", name, seq, t) for seq, t in snaps]
    g.segments = [SegmentObject(f"{name}/seg{a}-{b}", name, a, b, t) for a, b, t in segs]
    return g


def test_retention_keeps_the_window_and_the_snapshots_asked_for() -> None:
    now = 100 * DAY
    old = _gen("20260101T000000Z-00000000", [(0, 80 * DAY), (50, 85 * DAY)], [(0, 50, 85 * DAY), (50, 60, 86 * DAY)])
    cur = _gen("20260201T000000Z-00000000",
               [(0, 90 * DAY + 10), (100, 91 * DAY), (200, 92 * DAY), (300, 94 * DAY), (400, 97 * DAY)],
               [(0, 100, 91 * DAY), (100, 200, 92 * DAY), (200, 300, 94 * DAY), (300, 400, 97 * DAY),
                (400, 450, 99 * DAY)])
    old.history_key, cur.history_key = f"{old.name}/databases.json", f"{cur.name}/databases.json"
    gens = {g.name: g for g in (old, cur)}
    doomed = set(expired(gens, now, Retention(7 * DAY)))
    assert old.history_key in doomed and cur.history_key not in doomed  # nothing of the old generation is left
    doomed.discard(old.history_key)
    # the window starts at day 93: it rests on the snapshot of day 92 and everything after it
    assert doomed == {f"{cur.name}/snap{s}{x}" for s in (0, 100) for x in ("", ".sha256")} | {
        f"{old.name}/snap{s}{x}" for s in (0, 50) for x in ("", ".sha256")} | {
        f"{cur.name}/seg0-100", f"{cur.name}/seg100-200", f"{old.name}/seg0-50", f"{old.name}/seg50-60"}
    kept = set(expired(gens, now, Retention(7 * DAY, daily=2, monthly=3)))
    assert f"{cur.name}/snap100" not in kept and f"{cur.name}/snap0" not in kept  # the two newest days
    assert f"{old.name}/snap50" not in kept  # the newest of its month (day 85 is in March, 80 too)
    assert f"{old.name}/snap0" in kept and f"{cur.name}/seg0-100" in kept  # segments go all the same
    assert old.history_key not in kept  # a kept snapshot of its generation still needs it
    assert expired(gens, now, Retention(30 * DAY)) == []  # nothing is older than the window's base
    remaining = {k: g for k, g in gens.items()}
    for g in remaining.values():
        g.snapshots = [s for s in g.snapshots if s.key not in doomed]
        g.segments = [s for s in g.segments if s.key not in doomed]
    spans = ranges(remaining)
    assert spans[-1][0] == 92 * DAY and spans[-1][1] == 99 * DAY  # the window holds the last 7 days


def test_retention_deletes_old_objects_and_keeps_restoring_within_the_age(make_server: Any, s3: SeaweedS3,  # noqa: F811
                                                                            fresh_bucket: str) -> None:  # noqa: F811
    srv = make_server(s3_args(s3, fresh_bucket, continuous=True) + [
        "--backup-sync-interval", "0.2", "--backup-snapshot-changes", "3", "--backup-snapshot-interval", "0.01",
        "--backup-retention-age", "4s"])
    wait_shipped(srv, 0)
    srv.ok("/create", {"name": "shop"})
    first_t, first_at = instant()
    for i in range(12):
        put(srv, "k", i)
        time.sleep(0.5)
    recent_t, recent_at = instant()
    wait_shipped(srv, recent_t)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        span = srv.ok("/backup/list")["point_in_time"]
        if ts(span["earliest"]) > first_t:
            break
        time.sleep(0.2)
    assert ts(span["earliest"]) > first_t and time.time() - ts(span["earliest"]) < 12, span
    r = srv.post("/backup/restore", {"at": first_at})
    assert (r.status_code, r.json()["code"]) == (404, "BACKUP_NOT_FOUND"), r.text  # beyond the age now
    srv.ok("/backup/restore", {"at": recent_at})
    assert srv.ok("/set/get", {"database": "shop", "set": "users", "key": "k"})["data"] == 11
    keys = object_keys(s3, fresh_bucket, "continuous/")
    taken = [int(k.rsplit("-", 1)[1].split(".")[0]) / 1000 for k in keys if "/snapshots/" in k and k.endswith(".zst")]
    assert min(taken) > first_t  # the first snapshots are gone


def test_what_a_crash_left_behind_is_cleaned_up_at_the_next_start(make_server: Any, tmp_path: Path) -> None:
    srv = make_server(["--backup-continuous", "--backup-sync-interval", "0.2"])
    wait_shipped(srv, 0)
    srv.ok("/create", {"name": "shop"})
    put(srv, "k", 1)
    t, at = instant()
    wait_shipped(srv, t)
    srv.kill9()
    root = srv.data_dir / "backups"
    generation = next((root / "continuous").glob("*/snapshots")).parent
    # a snapshot cut short before its checksum file, a backup claimed but never written, temp files
    half = generation / "snapshots" / f"{99:020d}-{int(time.time() * 1000):013d}.json.zst"
    half.write_bytes(b"\x28\xb5\x2f\xfd partial")
    (root / "backups" / "shop").mkdir(parents=True)
    claim = root / "backups" / "shop" / "20260101-000000.json"
    claim.write_bytes(b'{"name":"sho')
    claim.with_name(claim.name + ".sha256").write_bytes(b"pending")
    fresh_claim = root / "backups" / "shop" / "20260101-000001.json.sha256"
    fresh_claim.write_bytes(b"pending")  # under way elsewhere, perhaps: left alone
    stale_tmp = root / "backups" / ".x.json.0123456789ab.fbtmp"
    stale_tmp.write_bytes(b"x")
    an_hour_ago = time.time() - 3700
    for p in (claim, claim.with_name(claim.name + ".sha256"), stale_tmp):
        os.utime(p, (an_hour_ago, an_hour_ago))
    srv.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (half.exists() or claim.exists() or stale_tmp.exists()):
        time.sleep(0.1)
    assert not half.exists() and not claim.exists() and not stale_tmp.exists()
    assert not claim.with_name(claim.name + ".sha256").exists() and fresh_claim.exists()
    srv.ok("/backup/restore", {"at": at})  # and the stream is whole
    assert srv.ok("/set/get", {"database": "shop", "set": "users", "key": "k"})["data"] == 1


def test_credentials_from_the_environment_chain(make_server: Any, s3: SeaweedS3, fresh_bucket: str) -> None:  # noqa: F811
    """No access key configured: the object-store library's standard chain (here its environment
    variables; web identity and instance roles come the same way) signs backups and shipping."""
    args = [a for a in s3_args(s3, fresh_bucket, continuous=True) if a not in (s3.access_key, s3.secret_key)]
    args = [a for a in args if a not in ("--s3-access-key", "--s3-secret-key")]
    srv = make_server(args + ["--backup-sync-interval", "0.2"],
                      env={"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key})
    wait_shipped(srv, 0)
    srv.ok("/create", {"name": "shop"})
    put(srv, "k", 1)
    t, at = instant()
    wait_shipped(srv, t)
    assert srv.ok("/backup/create", {})["backup_name"]
    srv.ok("/backup/restore", {"at": at})
    assert any("/segments/" in k for k in object_keys(s3, fresh_bucket, "continuous/"))


def test_a_gap_is_told_from_what_retention_let_go() -> None:
    g = _gen("20260201T000000Z-00000000", [(0, 1.0), (50, 5.0)], [(50, 60, 6.0), (70, 80, 8.0)])
    assert g.lost_after(60) == 80  # (60, 70] is missing between two segments left
    assert g.lost_after(0) is None  # below the lowest segment left: let go by retention
    g.vouched = (90, 9.0)
    assert g.lost_after(80) == 90  # the shipper had stored more than the segments show
    g.vouched = (80, 9.5)
    assert g.lost_after(80) is None and g.reach(g.snapshots[1]) == (60, 6.0)


def _change(sequence: int, t: float, *ops: list[Any]) -> Change:
    return Change(sequence, t, len(ops), json.dumps({"t": t, "n": len(ops), "ops": ops}).encode())


def test_each_database_has_its_own_range_from_the_history() -> None:
    history = DatabaseHistory()
    assert not history.note([_change(1, 5.0, ["create_database", "early", None])])  # before any snapshot: unknown
    assert history.note_snapshot(10, 10.0, ["a", "b"])
    assert not history.note_snapshot(10, 10.0, ["a", "b"])  # nothing new: not written again
    assert history.note([_change(9, 9.0, ["create_database", "late", None]),  # already in the snapshot
                         _change(11, 20.0, ["put", "a", "s", "k", 1]), _change(12, 30.0, ["create_database", "c", None]),
                         _change(13, 40.0, ["drop_database", "b"]), _change(14, 50.0, ["restore", ["a"], False])])
    assert history.names == {"a", "c"}
    assert history.note_snapshot(20, 60.0, ["a", "c"])  # a restored database can be rebuilt again from here
    history.note([_change(21, 70.0, ["restore", ["x"], True])])
    assert history.names == {"x"}
    history.note_snapshot(22, 80.0, ["x"])
    again = DatabaseHistory.from_bytes(history.to_bytes("g"))
    assert again.names == {"x"} and again.events == history.events
    lifetimes = again.lifetimes()
    assert lifetimes == {"a": [(10.0, 50.0), (60.0, 70.0)], "b": [(10.0, 40.0)], "c": [(30.0, 70.0)],
                         "x": [(80.0, float("inf"))]}

    gen = _gen("20260201T000000Z-00000000", [(10, 10.0), (22, 80.0)], [(10, 30, 100.0)])
    gen.history = again
    spans = database_ranges({gen.name: gen})
    assert spans["b"] == [(10.0, 39.999)]  # a drop at 40 s: 39.999 is the last restorable millisecond
    assert spans["c"] == [(30.0, 69.999)] and spans["x"] == [(80.0, 100.0)]
    gen.history.events[1]["t"] = 30.0004  # created within a millisecond: restorable from the next one
    assert database_ranges({gen.name: gen})["c"][0][0] == 30.001


async def test_a_drop_a_snapshot_holds_before_shipping_saw_it_ends_the_database_at_the_drop(
        storage: Storage, tmp_path: Path) -> None:
    """The shipper's rounds and snapshots race the writes: a drop committed after a round
    shipped and before the next snapshot began is dated by its own commit, not by the
    snapshot, so the database's last restorable instant is before the drop and restores."""
    backups = BackupService(storage, LocalObjectStore(tmp_path / "bucket"), spool_dir=tmp_path)
    shipper = Shipper(storage, backups, tmp_path, tmp_path)
    backups.shipped = shipper.shipped
    await shipper._start()  # the first snapshot
    storage.create_database("other", None)
    storage.create_set("other", "s", allow_all)
    storage.put("other", "s", "k", "v", b'"v"', allow_all)
    await shipper._ship()
    storage.drop_database("other", allow_all)
    dropped = time.time()  # the drop's own time is a little before
    await asyncio.sleep(0.05)
    await shipper._snapshot()  # holds the drop, which no round has shipped yet
    await shipper._ship()

    gens = await timeline(backups.store, shipper.shipped(), histories=True)
    spans = database_ranges(gens)["other"]
    last = spans[-1][1]
    assert last < dropped, (spans, dropped)
    restored = await restore_to(backups, last, "other", "other_last", None)
    assert restored["databases"] == ["other_last"]
    snapshot = storage.snapshot()
    try:
        db = next(d for d in snapshot.databases() if d.name == "other_last")
        assert list(snapshot.entries(db, "s")) == [("k", b'"v"')]
    finally:
        snapshot.close()


def test_a_logged_write_to_a_database_nothing_created_is_refused_as_invalid(storage: Storage) -> None:
    """A change that names a database the snapshot and the earlier changes do not hold (one
    is missing before it) makes the restore 422, not a 500, and stages nothing."""
    staging = storage.restore_writer()
    replay = _Replay(staging, {}, None)
    replay.apply_logged({"t": 1.0, "s": 7, "ops": [["put", "gone", "s", "k", 1]]})
    with pytest.raises(BackupInvalid, match="'gone'"):
        replay.flush()
    staging.abort()
