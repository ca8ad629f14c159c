"""Several stateless nodes on one PostgreSQL database: what each sees of the others' writes,
concurrent writers of the same keys, a node killed under load, PostgreSQL stopped and started
again under load, and the plans of the queries that must use an index."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from conftest import ServerProcess
from pgserver import PostgresServer, running_postgres
from s3server import fresh_bucket, s3  # noqa: F401

from fuckbase import continuous
from fuckbase.backup import BackupService
from fuckbase.continuous import CONSUMER, Shipper, restore_to, timeline
from fuckbase.objectstore import LocalObjectStore
from fuckbase.storage import (
    BASIC,
    SORTABLE,
    Credentials,
    Get,
    IndexDef,
    IndexExists,
    Lookup,
    Put,
    SetNotFound,
    allow_all,
)
from fuckbase.storage.postgresql import PostgresStorage, SchemaTooNew
from fuckbase.storage.postgresql.schema import MIGRATIONS, VERSION
from fuckbase.storage.postgresql.store import (
    BUILD_LOCK_SQL,
    FETCH_SQL,
    GUESS_AFTER,
    IDLE_CHECK_SECONDS,
    PointReads,
    page_sql,
)
from fuckbase.storage.values import MISSING_SORT_TOKEN, group_token


def nodes(make_server: Any, url: str, count: int) -> list[ServerProcess]:
    return [make_server(["--storage", url]) for _ in range(count)]


def test_every_node_sees_every_write_and_catalog_change_at_once(make_server: Any, pg_url: str) -> None:
    a, b, c = nodes(make_server, pg_url, 3)
    a.ok("/create", {"name": "shop"})
    b.ok("/set/put", {"database": "shop", "set": "users", "key": "u1", "value": {"e": "x", "n": 1}})
    assert c.ok("/set/get", {"database": "shop", "set": "users", "key": "u1"})["data"] == {"e": "x", "n": 1}
    c.ok("/index/create", {"database": "shop", "set": "users", "name": "e", "field": "e"})
    a.ok("/index/create/sortable", {"database": "shop", "set": "users", "name": "by", "primary_field": "e",
                                    "sort_fields": ["n"]})
    b.ok("/set/put", {"database": "shop", "set": "users", "key": "u2", "value": {"e": "x", "n": 0}})
    assert [d["key"] for d in a.ok("/index/query", {"database": "shop", "set": "users", "index": "e",
                                                    "value": "x"})["data"]["data"]] == ["u1", "u2"]
    page = c.ok("/index/query/sorted", {"database": "shop", "set": "users", "index": "by", "value": "x"})
    assert [d["key"] for d in page["data"]] == ["u2", "u1"] and page["total"] == 2
    b.ok("/drop", {"name": "shop"})
    for node in (a, c):
        r = node.post("/set/get", {"database": "shop", "set": "users", "key": "u1"})
        assert (r.status_code, r.json()["code"]) == (404, "DB_NOT_FOUND")
    assert a.ok("/server/info")["databases_count"] == 0


def _hammer(node: ServerProcess, keys: list[str], stop: threading.Event, acked: dict[str, Any],
            errors: list[str], seed: int) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=node.url, timeout=30) as client:
        i = 0
        while not stop.is_set():
            key = rng.choice(keys)
            if rng.random() < 0.15:
                r = client.post("/set/delete", json={"database": "d", "set": "s", "key": key})
                if r.status_code not in (200, 404):
                    errors.append(r.text)
                continue
            value = {"g": f"g{rng.randrange(4)}", "n": rng.randrange(1000), "w": seed, "i": i}
            r = client.post("/set/put", json={"database": "d", "set": "s", "key": key, "value": value})
            if r.status_code != 200:
                errors.append(r.text)
            else:
                acked[key] = value
            i += 1


def test_indexes_stay_exact_under_concurrent_writes_to_the_same_keys_from_several_nodes(
        make_server: Any, pg_url: str) -> None:
    a, b = nodes(make_server, pg_url, 2)
    _create_indexed_set(a, b)
    keys = [f"k{i}" for i in range(40)]
    stop = threading.Event()
    errors: list[str] = []
    threads = [threading.Thread(target=_hammer, args=(node, keys, stop, {}, errors, seed))
               for seed, node in enumerate([a, a, b, b])]
    for t in threads:
        t.start()
    time.sleep(4)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    _assert_indexes_exact([a, b], keys, [f"g{n}" for n in range(4)])


def _create_indexed_set(node: ServerProcess, sortable_by: ServerProcess) -> None:
    """Database "d", set "s", a basic index "g" on field g, and (made by `sortable_by`, which
    may be another node) a sortable index "by" on g sorted by n."""
    node.ok("/create", {"name": "d"})
    node.ok("/set/create", {"database": "d", "name": "s"})
    node.ok("/index/create", {"database": "d", "set": "s", "name": "g", "field": "g"})
    sortable_by.ok("/index/create/sortable", {"database": "d", "set": "s", "name": "by", "primary_field": "g",
                                              "sort_fields": ["n"]})


def _assert_indexes_exact(nodes: list[ServerProcess], keys: list[str], groups: list[str]) -> None:
    """Every node's basic index "g" and sortable index "by" (on g, sorted by n) hold exactly
    the stored values of `keys`."""
    current = {}
    for key in keys:
        r = nodes[0].post("/set/get", {"database": "d", "set": "s", "key": key})
        if r.status_code == 200:
            current[key] = r.json()["data"]
    for g in groups:
        want = sorted(k for k, v in current.items() if v["g"] == g)
        for node in nodes:
            found = node.ok("/index/query", {"database": "d", "set": "s", "index": "g", "value": g})["data"]["data"]
            assert sorted(d["key"] for d in found) == want, g
            page = node.ok("/index/query/sorted", {"database": "d", "set": "s", "index": "by", "value": g,
                                                   "pagination": {"limit": 10_000}})
            assert page["total"] == len(want)
            assert [d["key"] for d in page["data"]] == sorted(want, key=lambda k: (current[k]["n"], k))


def test_indexes_stay_exact_when_several_nodes_write_the_same_new_keys_at_once(make_server: Any,
                                                                              pg_url: str) -> None:
    """One node writes new keys in order, so that it skips reading its groups' entries; the
    other writes every fiftieth of the same keys, running ahead of it: the first node's guess
    that its keys are new is now right, now wrong, and the indexes must come out exact."""
    a, b = nodes(make_server, pg_url, 2)
    _create_indexed_set(a, a)
    keys = [f"k{i:05}" for i in range(3000)]
    errors: list[str] = []

    ahead = threading.Semaphore(0)  # a release per key the other node wrote

    def write(node: ServerProcess, writer: int, numbers: range) -> None:
        with httpx.Client(base_url=node.url, timeout=30) as client:
            if node is a:
                for _ in range(10):
                    ahead.acquire(timeout=30)
            for i in numbers:
                value = {"g": f"g{writer}", "n": i % 7}
                r = client.post("/set/put", json={"database": "d", "set": "s", "key": keys[i], "value": value})
                if r.status_code != 200:
                    errors.append(r.text)
                if node is b:
                    ahead.release()

    threads = [threading.Thread(target=write, args=(b, 2, range(0, len(keys), 100))),
               threading.Thread(target=write, args=(b, 3, range(50, len(keys), 100))),
               threading.Thread(target=write, args=(a, 0, range(0, len(keys), 2))),
               threading.Thread(target=write, args=(a, 1, range(1, len(keys), 2)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    _assert_indexes_exact([a, b], keys, [f"g{n}" for n in range(4)])
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT n FROM fb_set_counts").fetchall() == [(len(keys),)]
    wrong = [line for node in (a, b) for line in httpx.get(node.url + "/metrics").text.splitlines()
             if line.startswith("fuckbase_storage_write_groups_guessed_wrong_total ")]
    assert sum(float(line.split()[1]) for line in wrong) >= 1, wrong


def test_a_node_killed_under_load_leaves_the_others_serving_every_acknowledged_write(
        make_server: Any, pg_url: str) -> None:
    a, b = nodes(make_server, pg_url, 2)
    a.ok("/create", {"name": "d"})
    a.ok("/set/create", {"database": "d", "name": "s"})
    stop = threading.Event()
    acked_a: dict[str, Any] = {}
    acked_b: dict[str, Any] = {}
    errors_a: list[str] = []
    errors_b: list[str] = []
    ta = threading.Thread(target=_writer, args=(a, "a", stop, acked_a, errors_a))
    tb = threading.Thread(target=_writer, args=(b, "b", stop, acked_b, errors_b))
    ta.start()
    tb.start()
    time.sleep(1.5)
    a.kill9()
    time.sleep(1.5)
    stop.set()
    ta.join()
    tb.join()
    assert not errors_b, errors_b[:3]
    assert acked_a and acked_b
    for key, value in {**acked_a, **acked_b}.items():
        assert b.ok("/set/get", {"database": "d", "set": "s", "key": key})["data"] == value


def _writer(node: ServerProcess, name: str, stop: threading.Event, acked: dict[str, Any], errors: list[str]) -> None:
    with httpx.Client(base_url=node.url, timeout=10) as client:
        i = 0
        while not stop.is_set():
            key = f"{name}{i}"
            try:
                r = client.post("/set/put", json={"database": "d", "set": "s", "key": key, "value": i})
            except httpx.HTTPError:
                return  # this node is gone: what it acknowledged is checked on the other
            if r.status_code == 200:
                acked[key] = i
            else:
                errors.append(r.text)
            i += 1


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A cluster of the test's own, to stop and start."""
    with running_postgres() as server:
        yield server


def test_postgresql_stopped_and_started_again_under_load(make_server: Any, own_postgres: PostgresServer) -> None:
    url = own_postgres.new_database()
    node = make_server(["--storage", url])
    node.ok("/create", {"name": "d"})
    acked: dict[str, int] = {}
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=node.url, timeout=30) as client:
            i = 0
            while not stop.is_set():
                r = client.post("/set/put", json={"database": "d", "set": "s", "key": f"k{i}", "value": i})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    acked[f"k{i}"] = i
                else:
                    body = r.json()
                    assert (r.status_code, body["status"], body["code"]) == (503, "error", "STORAGE_UNAVAILABLE"), r.text
                    time.sleep(0.05)
                i += 1

    t = threading.Thread(target=load)
    t.start()
    time.sleep(1)
    own_postgres.stop()
    time.sleep(2)
    r = node.post("/set/get", {"database": "d", "set": "s", "key": "k0"})
    assert r.status_code == 503 and r.json()["code"] == "STORAGE_UNAVAILABLE", r.text
    metrics = httpx.get(node.url + "/metrics", timeout=30)
    assert metrics.status_code == 200 and 'fuckbase_storage_errors_total{kind="unavailable"}' in metrics.text
    assert "fuckbase_storage_pool_connections" in metrics.text
    time.sleep(5)  # longer than a request waits for a connection: writes meanwhile answer 503
    down = len(acked)
    own_postgres.start()
    deadline = time.monotonic() + 30  # the connection pools retry with a growing delay
    while time.monotonic() < deadline and len(acked) <= down:
        time.sleep(0.2)
    stop.set()
    t.join()
    assert 503 in statuses and len(acked) > down, "writes failed while it was down and went on after"
    while time.monotonic() < deadline and node.post("/set/get", {"database": "d", "set": "s", "key": "k0"}).status_code != 200:
        time.sleep(0.2)  # this client's worker may retry its connections later than the writer's
    assert node.post("/set/get", {"database": "d", "set": "s", "key": "k0"}).status_code == 200
    for key, value in acked.items():
        assert node.ok("/set/get", {"database": "d", "set": "s", "key": key})["data"] == value


def _until(ok: Any, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ok():
            return True
        time.sleep(0.2)
    return False


def test_an_idle_node_answers_every_request_once_postgresql_is_back(make_server: Any,
                                                                   own_postgres: PostgresServer) -> None:
    """Its pooled connections died with the restart; each is tried before use, not by a request."""
    node = make_server(["--storage", own_postgres.new_database()])
    node.ok("/create", {"name": "d"})
    node.ok("/set/put", {"database": "d", "set": "s", "key": "k", "value": 1})
    for _ in range(40):  # every worker's connections in use once
        node.ok("/set/get", {"database": "d", "set": "s", "key": "k"})
    own_postgres.stop()
    own_postgres.start()
    time.sleep(IDLE_CHECK_SECONDS + 0.5)
    codes = [node.post("/set/get", {"database": "d", "set": "s", "key": "k"}).status_code for _ in range(40)]
    codes += [node.post("/set/put", {"database": "d", "set": "s", "key": f"n{i}", "value": i}).status_code
              for i in range(10)]
    assert codes == [200] * 50


def test_a_primary_turned_standby_answers_503_until_promoted(make_server: Any, own_postgres: PostgresServer) -> None:
    """What a node sees of a failover gone wrong: reads go on, writes get 503 (never a 500)."""
    node = make_server(["--storage", own_postgres.new_database()])
    node.ok("/create", {"name": "d"})
    node.ok("/set/put", {"database": "d", "set": "s", "key": "k", "value": 1})
    own_postgres.stop()
    (own_postgres.data / "standby.signal").touch()
    own_postgres.start()
    assert _until(lambda: node.post("/set/get", {"database": "d", "set": "s", "key": "k"}).status_code == 200)
    for path, body in [("/set/put", {"database": "d", "set": "s", "key": "k", "value": 2}), ("/create", {"name": "e"}),
                       ("/index/create", {"database": "d", "set": "s", "name": "i", "field": "f"})]:
        r = node.post(path, body)
        assert (r.status_code, r.json()["code"]) == (503, "STORAGE_UNAVAILABLE"), r.text
        assert "read-only" in r.json()["message"]
    with psycopg.connect(own_postgres.url("postgres"), autocommit=True) as conn:
        conn.execute("SELECT pg_promote()")
    assert _until(lambda: node.post("/set/put", {"database": "d", "set": "s", "key": "k", "value": 2}).status_code == 200)
    assert node.ok("/set/get", {"database": "d", "set": "s", "key": "k"})["data"] == 2


@contextlib.contextmanager
def frozen(server: PostgresServer) -> Iterator[None]:
    """PostgreSQL stopped in its tracks (SIGSTOP): connections stay open and nothing answers."""
    assert server.proc is not None
    cluster = [server.proc.pid] + [int(p) for p in subprocess.run(
        ["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True).stdout.split()]
    for pid in cluster:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in cluster:
            os.kill(pid, signal.SIGCONT)


def test_a_frozen_postgresql_holds_up_a_metrics_scrape_but_not_the_node(make_server: Any,
                                                                        own_postgres: PostgresServer) -> None:
    node = make_server(["--storage", own_postgres.new_database(), "--workers", "1"])  # one loop answers both
    node.ok("/create", {"name": "d"})
    scraped: list[httpx.Response] = []
    time.sleep(IDLE_CHECK_SECONDS)  # the scrape's connection is tried first: that waits too
    with frozen(own_postgres):
        scrape = threading.Thread(target=lambda: scraped.append(httpx.get(node.url + "/metrics", timeout=60)))
        scrape.start()
        time.sleep(0.5)
        started = time.monotonic()
        assert httpx.get(node.url + "/health", timeout=10).status_code == 200
        assert time.monotonic() - started < 1
        assert not scraped, "the scrape waits for the frozen database"
    scrape.join()
    assert scraped[0].status_code == 200 and "fuckbase_databases 1.0" in scraped[0].text


def _timed_posts(node: ServerProcess, requests: list[tuple[str, dict[str, Any]]]
                 ) -> tuple[list[threading.Thread], list[tuple[httpx.Response, float]]]:
    """A thread per request (for the caller to start) that posts it and notes the answer and
    how long it took."""
    answers: list[tuple[httpx.Response, float]] = []

    def call(path: str, body: dict[str, Any]) -> None:
        started = time.monotonic()
        answers.append((httpx.post(node.url + path, json=body, timeout=60), time.monotonic() - started))

    return [threading.Thread(target=call, args=request) for request in requests], answers


def test_requests_to_a_frozen_postgresql_answer_503_after_the_storage_timeout(make_server: Any,
                                                                              own_postgres: PostgresServer) -> None:
    """Its statement timeout cannot fire (nothing runs there): the node's own deadline does."""
    node = make_server(["--storage", own_postgres.new_database(), "--storage-timeout", "2"])
    node.ok("/create", {"name": "d"})
    node.ok("/set/put", {"database": "d", "set": "s", "key": "k", "value": 1})
    calls, answers = _timed_posts(node, [("/set/get", {"database": "d", "set": "s", "key": "k"}),
                                         ("/set/put", {"database": "d", "set": "s", "key": "j", "value": 2}),
                                         ("/index/query", {"database": "d", "set": "s", "index": "i", "value": "x"})])
    with frozen(own_postgres):
        for t in calls:
            t.start()
        for t in calls:
            t.join()
    assert len(answers) == 3
    for r, took in answers:
        assert (r.status_code, r.json()["code"]) == (503, "STORAGE_UNAVAILABLE") and took < 10, (r.text, took)
    assert _until(lambda: node.post("/set/put", {"database": "d", "set": "s", "key": "k", "value": 3}).status_code == 200)
    assert node.ok("/set/get", {"database": "d", "set": "s", "key": "k"})["data"] == 3


@contextlib.contextmanager
def vanished_connections(server: PostgresServer) -> Iterator[None]:
    """PostgreSQL's ends of every connection to it destroyed, their resets lost (iptables), as
    when its host is powered off or cut off: the clients' ends stay open and hear nothing."""
    lost = ["OUTPUT", "-o", "lo", "-p", "tcp", "--sport", str(server.port), "--tcp-flags", "RST", "RST", "-j", "DROP"]
    subprocess.run(["iptables", "-I", *lost], check=True, capture_output=True)
    try:
        subprocess.run(["ss", "-K", "-t", "state", "established", f"( sport = :{server.port} )"], check=True,
                       capture_output=True)
        yield
    finally:
        subprocess.run(["iptables", "-D", *lost], check=True, capture_output=True)


def _can_make_connections_vanish() -> bool:
    if os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("iptables", "ss")):
        return False
    return subprocess.run(["iptables", "-S", "OUTPUT"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_make_connections_vanish(), reason="needs root, iptables and ss")
def test_connections_to_a_host_gone_without_a_word_are_given_up_within_the_storage_timeout(
        make_server: Any, own_postgres: PostgresServer) -> None:
    """A connection waiting for an answer sends nothing, so with the system's keepalive it
    would learn of a vanished host after two hours, holding its request thread all along:
    with the node's one thread held, every request would get 503 long after PostgreSQL
    (here: the same one, as after a failover to a standby on the host's address) is back."""
    node = make_server(["--storage", own_postgres.new_database(), "--storage-timeout", "3", "--workers", "1",
                        "--request-threads", "1"])
    node.ok("/create", {"name": "d"})
    node.ok("/set/put", {"database": "d", "set": "s", "key": "k", "value": 1})
    calls, answers = _timed_posts(node, [("/set/get", {"database": "d", "set": "s", "key": "k"}),
                                         ("/set/put", {"database": "d", "set": "s", "key": "j", "value": 2})])
    with frozen(own_postgres):
        for t in calls:
            t.start()
        time.sleep(1)  # the get waits for PostgreSQL on the node's request thread, the put behind it
        with vanished_connections(own_postgres):
            pass
    for t in calls:
        t.join()
    assert len(answers) == 2
    for r, took in answers:  # failed at their connection's end or at the node's deadline
        assert r.status_code == 200 or r.json()["code"] == "STORAGE_UNAVAILABLE", r.text
        assert took < 10, (r.text, took)
    started = time.monotonic()
    assert _until(lambda: node.post("/set/get", {"database": "d", "set": "s", "key": "k"}).status_code == 200, 30)
    assert time.monotonic() - started < 15
    node.ok("/set/put", {"database": "d", "set": "s", "key": "k", "value": 3})
    assert node.ok("/set/get", {"database": "d", "set": "s", "key": "k"})["data"] == 3


def test_a_node_whose_processes_restart_while_postgresql_is_away_stays_up_and_recovers(
        make_server: Any, own_postgres: PostgresServer) -> None:
    """Processes started again meanwhile wait for PostgreSQL, answering 503, instead of
    exiting: the supervisor would give up on a node whose processes keep dying. (A node's
    first start with PostgreSQL away stops with one line: tests/test_cli.py.)"""
    node = make_server(["--storage", own_postgres.new_database(), "--workers", "2"])
    own_postgres.stop()
    r = node.post("/create", {"name": "d"})
    assert (r.status_code, r.json()["code"]) == (503, "STORAGE_UNAVAILABLE"), r.text
    assert node.proc is not None
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(node.proc.pid)], capture_output=True,
                                              text=True).stdout.split()]
    for pid in workers:  # the job process too: each is started again, PostgreSQL still away
        os.kill(pid, signal.SIGKILL)
    time.sleep(8)  # longer than a process waits for its first connection
    assert node.proc.poll() is None and httpx.get(node.url + "/health", timeout=5).status_code == 200
    own_postgres.start()
    assert _until(lambda: node.post("/create", {"name": "d"}).status_code == 200)
    node.ok("/set/put", {"database": "d", "set": "s", "key": "k", "value": 1})
    assert node.ok("/set/get", {"database": "d", "set": "s", "key": "k"})["data"] == 1


@contextlib.contextmanager
def _two_nodes_on_an_indexed_set(pg_url: str) -> Iterator[tuple[PostgresStorage, PostgresStorage]]:
    """Two nodes on one database, which holds database "d", set "s" and a basic index "g"
    on field "g"."""
    a, b = PostgresStorage(pg_url), PostgresStorage(pg_url)
    try:
        _indexed_set(a)
        yield a, b
    finally:
        a.close()
        b.close()


def _indexed_set(storage: PostgresStorage) -> None:
    storage.create_database("d", None)
    storage.create_set("d", "s", allow_all)
    storage.create_index("d", "s", IndexDef("g", "g", BASIC), allow_all)


def _keys_in(storage: PostgresStorage, groups: tuple[str, ...]) -> list[list[str]]:
    """The keys index "g" finds under each of `groups`."""
    return [[e.key for e in found] for found in storage.fetch([Lookup("d", "s", "g", g, allow_all) for g in groups])]


def _samples(storage: PostgresStorage, figure: str) -> list[Any]:
    return next(f for f in storage.figures() if f.name == figure).samples


def test_a_group_whose_entry_another_node_wrote_meanwhile_runs_again_under_the_sequence_row(pg_url: str) -> None:
    """A group's writes run before it takes the sequence row; here another node writes the
    same entry in between (from inside the group's access check): the group must see that
    and run again under the row, so the index loses the other node's record, not a stale one."""
    with _two_nodes_on_an_indexed_set(pg_url) as (a, b):
        a.put("d", "s", "k", {"g": "one"}, b'{"g":"one"}', allow_all)
        checks: list[Credentials | None] = []

        def meanwhile(auth: Credentials | None) -> None:
            checks.append(auth)
            if len(checks) == 1:
                b.put("d", "s", "k", {"g": "two"}, b'{"g":"two"}', allow_all)

        a.begin_group()
        a.put("d", "s", "k", {"g": "three"}, b'{"g":"three"}', meanwhile)
        a.put("d", "s", "j", {"g": "three"}, b'{"g":"three"}', allow_all)
        assert a.end_group() == [None, None]
        assert len(checks) == 2  # before the row, then again under it
        assert _keys_in(a, ("one", "two", "three")) == [[], [], ["j", "k"]]
        assert a.fetch([Get("d", "s", "k", allow_all)]) == [b'{"g":"three"}']
        with a.read() as view:
            assert view.key_counts() == {"d": 2}
        assert _samples(a, "write_groups_replanned") == [({}, 1)]


def test_groups_guessed_to_write_new_keys_run_again_when_a_key_was_not_new(pg_url: str) -> None:
    """After groups whose keys were all new, a node writes the next ones without reading
    their entries first; here another node wrote two of them meanwhile: the commit must see
    that, and the group run again on what is stored, so the index loses the other node's
    record and the delete finds its entry."""
    with _two_nodes_on_an_indexed_set(pg_url) as (a, b):
        for n in range(GUESS_AFTER + 1):  # the first reads the catalog the index changed
            a.begin_group()
            a.put("d", "s", f"new{n}", {"g": "new"}, b'{"g":"new"}', allow_all)
            assert a.end_group() == [None]
        b.put("d", "s", "k", {"g": "other"}, b'{"g":"other"}', allow_all)
        b.put("d", "s", "gone", {"g": "other"}, b'{"g":"other"}', allow_all)
        a.begin_group()
        a.put("d", "s", "k", {"g": "mine"}, b'{"g":"mine"}', allow_all)
        a.delete("d", "s", "gone", allow_all)
        assert a.end_group() == [None, None]
        assert _keys_in(a, ("other", "mine")) == [[], ["k"]]
        with a.read() as view:
            assert view.key_counts() == {"d": GUESS_AFTER + 2}
        assert _samples(a, "write_groups_guessed_wrong") == [({}, 1)]


def test_a_put_of_the_value_an_entry_holds_is_logged_but_not_written_again(pg_url: str) -> None:
    storage = PostgresStorage(pg_url)
    try:
        _indexed_set(storage)
        for key in ("same", "other"):
            storage.put("d", "s", key, {"g": 1}, b'{"g":1}', allow_all)
        acked = storage.retain_changes("t")

        def row_versions() -> dict[str, str]:
            with psycopg.connect(pg_url) as conn:
                return dict(conn.execute("SELECT key, xmin::text FROM fb_entries").fetchall())

        before = row_versions()
        storage.begin_group()
        storage.put("d", "s", "same", {"g": 1}, b'{"g":1}', allow_all)
        storage.put("d", "s", "other", {"g": 2}, b'{"g":2}', allow_all)
        assert storage.end_group() == [None, None]
        after = row_versions()
        assert after["same"] == before["same"] and after["other"] != before["other"]
        assert [op for c in storage.changes(acked, 10) for op in c.ops] == [
            ("put", "d", "s", "same", b'{"g":1}'), ("put", "d", "s", "other", b'{"g":2}')]
        assert _keys_in(storage, ("1", "2")) == [["same"], ["other"]]
    finally:
        storage.close()


def test_a_database_of_the_first_schema_is_migrated_and_one_of_a_newer_release_refused(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:  # what the first release with this backend left
        conn.execute(MIGRATIONS[0].encode())
        conn.execute("INSERT INTO fb_meta VALUES ('schema_version', 1)")
        db_id = conn.execute("INSERT INTO fb_databases (name) VALUES ('d') RETURNING id").fetchone()
        set_id = conn.execute("INSERT INTO fb_sets (database_id, name) VALUES (%s, 's') RETURNING id", db_id).fetchone()
        assert set_id is not None
        conn.execute("SELECT fb_put(%s, 'k', '{\"e\": 1}')", set_id)
        conn.execute("SELECT fb_commit(%s, '{1}', '{}', '{}', '{}', 0, 1, '', true, true)", ([set_id[0]],))
    storage = PostgresStorage(pg_url)
    try:
        assert storage.fetch([Get("d", "s", "k", allow_all)]) == [b'{"e": 1}']  # the stored text, as it was
        storage.create_index("d", "s", IndexDef("e", "e"), allow_all)
        storage.begin_group()
        storage.put("d", "s", "k", {"e": 2}, b'{"e":2}', allow_all)
        storage.put("d", "s", "j", {"e": 2}, b'{"e":2}', allow_all)
        assert storage.end_group() == [None, None]
        (found,) = storage.fetch([Lookup("d", "s", "e", "2", allow_all)])
        assert [e.key for e in found] == ["j", "k"]
        with storage.read() as view:
            assert view.key_counts() == {"d": 2}
    finally:
        storage.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert conn.execute("SELECT value FROM fb_meta WHERE key = 'schema_version'").fetchone() == (VERSION,)
        conn.execute("UPDATE fb_meta SET value = %s WHERE key = 'schema_version'", (VERSION + 1,))
    with pytest.raises(SchemaTooNew, match=f"schema version {VERSION + 1}"):
        PostgresStorage(pg_url)


def test_the_periodic_jobs_run_on_one_node_at_a_time(pg_url: str) -> None:
    first, second = PostgresStorage(pg_url), PostgresStorage(pg_url)
    try:
        assert first.lead("jobs") and first.lead("jobs")
        assert not second.lead("jobs")
        first.close()
        assert second.lead("jobs")  # the lock went with the first process's connection
    finally:
        first.close()
        second.close()


def test_point_reads_see_a_catalog_changed_by_another_node_at_once(pg_url: str) -> None:
    """A node answers point reads from the catalog it cached, in one statement that also reads
    the catalog's version: a change made by another node is seen by the next read."""
    reader, writer = PostgresStorage(pg_url), PostgresStorage(pg_url)
    creds = {"username": "u", "hash": "h"}
    refused: list[Any] = []

    def refuse(stored: Any) -> None:
        if stored:
            refused.append(dict(stored))
            raise PermissionError("no")

    try:
        writer.create_database("d", None)
        writer.put("d", "s", "k", "old", b'"old"', allow_all)
        assert reader.fetch([Get("d", "s", "k", refuse)]) == [b'"old"']
        writer.drop_database("d", allow_all)
        writer.create_database("d", creds)  # the same name, now with credentials
        writer.put("d", "s", "k", "new", b'"new"', allow_all)
        (answer,) = reader.fetch([Get("d", "s", "k", refuse)])
        assert isinstance(answer, PermissionError) and refused == [creds]
        assert reader.fetch([Get("d", "s", "k", allow_all)]) == [b'"new"']
        writer.create_index("d", "s", IndexDef("v", "v"), allow_all)
        writer.put("d", "s", "j", {"v": 1}, b'{"v":1}', allow_all)
        (found,) = reader.fetch([Lookup("d", "s", "v", "1", allow_all)])
        assert [e.key for e in found] == ["j"]
        restore = writer.restore_writer()
        staged = restore.add_database()
        staged.name = "d"
        restore.write(staged, "t", [("x", 1, b"1")])
        restore.commit(replace_all=True)
        gone, got = reader.fetch([Get("d", "s", "k", allow_all), Get("d", "t", "x", allow_all)])
        assert isinstance(gone, SetNotFound) and got == b"1"
    finally:
        reader.close()
        writer.close()


def test_a_lookup_and_a_sorted_page_are_index_scans(pg_url: str) -> None:
    storage = PostgresStorage(pg_url)
    try:
        storage.create_database("d", None)
        rows = [Put(f"k{i:06d}", v, orjson.dumps(v)) for i in range(20_000)
                for v in [{"g": f"g{i % 200}", "n": i % 977}]]
        for i in range(0, len(rows), 5000):
            storage.batch("d", "s", rows[i : i + 5000], allow_all)
        storage.create_index("d", "s", IndexDef("g", "g"), allow_all)
        storage.create_index("d", "s", IndexDef("by", "g", SORTABLE, ("n",)), allow_all)
        with storage.read() as view:
            db = view.database("d")
            reads = PointReads(view.catalog, [Get("d", "s", "k000007", allow_all), Lookup("d", "s", "g", "g7", allow_all),
                                              Lookup("d", "s", "by", "g7", allow_all)])
        with psycopg.connect(pg_url) as conn:
            conn.execute("ANALYZE")
            set_id, sorted_id = db.set_ids["s"], db.index_ids[("s", "by")]
            plans = {
                "point reads": conn.execute(b"EXPLAIN " + FETCH_SQL, (orjson.dumps(reads.asked).decode(),)).fetchall(),
                "page": conn.execute("EXPLAIN " + page_sql("", desc=False, limited=True),
                                     {"sid": set_id, "ix": sorted_id, "f": 0, "g": group_token("g7"),
                                      "missing": MISSING_SORT_TOKEN, "off": 0, "lim": 10}).fetchall(),
                "page desc": conn.execute("EXPLAIN " + page_sql(" AND x.sort < %(missing)s", desc=True, limited=True),
                                          {"sid": set_id, "ix": sorted_id, "f": 0, "g": group_token("g7"),
                                           "missing": MISSING_SORT_TOKEN, "off": 0, "lim": 10}).fetchall(),
            }
        for name, plan in plans.items():
            text = "\n".join(r[0] for r in plan)
            scans = [line for line in text.splitlines() if "Seq Scan" in line and "fb_state" not in line]  # one row
            assert "Index" in text and not scans, f"{name}:\n{text}"
    finally:
        storage.close()


def test_a_writes_lookups_of_its_entries_are_index_lookups_even_when_planned_on_a_small_table(pg_url: str) -> None:
    """Sessions keep their plans; one made while the entries table was small must still look
    each entry up, not join the whole table (a hash or merge join over it, as PostgreSQL picks
    for a few rows, read every entry at every write once the table grew). auto_explain shows
    the plans run inside the functions, in the storage's own sessions."""
    storage = PostgresStorage(pg_url, pool_size=1)  # one session: the one auto_explain is loaded in
    try:
        storage.create_database("d", None)
        storage.create_set("d", "s", allow_all)
        storage.put("d", "s", "k", 1, b"1", allow_all)
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("ANALYZE")
        plans: list[str] = []
        with storage.pool.connection() as conn:
            conn.add_notice_handler(lambda notice: plans.append(notice.message_primary or ""))
            conn.execute("LOAD 'auto_explain'")
            conn.execute("SET auto_explain.log_min_duration = 0; SET auto_explain.log_nested_statements = on;"
                         " SET client_min_messages = log")
        for _ in range(8):  # past the five runs after which a prepared statement may take a generic plan
            storage.begin_group()
            storage.put("d", "s", "k", 2, b"2", allow_all)
            storage.put("d", "s", "j", 3, b"3", allow_all)
            storage.delete("d", "s", "k", allow_all)
            assert storage.end_group() == [None, None, None]
        nested = [p for p in plans if "fb_entries" in p]
        assert any("jsonb_array_elements" in p for p in nested), plans
        for plan in nested:
            assert "Hash Join" not in plan and "Merge Join" not in plan, plan
    finally:
        storage.close()


def test_continuous_backup_and_point_in_time_restore_on_postgresql(make_server: Any, pg_url: str, s3: Any,  # noqa: F811
                                                                   fresh_bucket: str) -> None:  # noqa: F811
    from test_backup_s3 import s3_args
    from test_continuous import instant, wait_shipped

    node = make_server(["--storage", pg_url, *s3_args(s3, fresh_bucket, continuous=True),
                        "--backup-sync-interval", "0.2"])
    wait_shipped(node, 0)
    node.ok("/create", {"name": "shop"})
    node.ok("/set/put", {"database": "shop", "set": "s", "key": "k", "value": "before"})
    node.ok("/index/create", {"database": "shop", "set": "s", "name": "v", "field": "v"})
    t, at = instant()
    node.ok("/set/put", {"database": "shop", "set": "s", "key": "k", "value": "after"})
    node.ok("/set/put", {"database": "shop", "set": "s", "key": "k2", "value": {"v": 1}})
    wait_shipped(node, time.time())
    r = node.ok("/backup/restore", {"at": at, "database": "shop", "as": "shop_then"})
    assert r["databases"] == ["shop_then"] and r["changes_replayed"] >= 3
    assert node.ok("/set/get", {"database": "shop_then", "set": "s", "key": "k"})["data"] == "before"
    assert node.post("/set/get", {"database": "shop_then", "set": "s", "key": "k2"}).status_code == 404
    assert node.ok("/set/get", {"database": "shop", "set": "s", "key": "k"})["data"] == "after"
    node.ok("/backup/restore", {"at": at})  # everything, in one transaction
    assert node.ok("/server/info")["databases_count"] == 1
    assert node.ok("/set/get", {"database": "shop", "set": "s", "key": "k"})["data"] == "before"


async def _lead(shipper: Any, storage: PostgresStorage, writers: list[PostgresStorage], puts: int,
                written: dict[str, int]) -> None:
    """One node's turn at shipping: it starts, both nodes write, it ships and compacts (the
    log lets go of what it acknowledged), and it stops as it does when the lead moves."""
    task = asyncio.create_task(shipper.run())
    await _until_async(lambda: shipper.status.state == "shipping")
    for i in range(puts):
        key = f"k{len(written)}"
        written[key] = i
        writers[i % 2].put("d", "s", key, i, str(i).encode(), allow_all)
    await _until_async(lambda: shipper.status.shipped_sequence >= storage.sequence() and not shipper._small)
    storage.maintain()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert shipper.status.state.startswith("stopped"), shipper.status.state


async def _until_async(ok: Any, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not ok():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_the_lead_moving_between_nodes_continues_the_stream_and_loses_no_change(
        pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whichever node leads continues the stream the nodes shipped last, from the shared log;
    a stream the log no longer follows on from (let go meanwhile) is not continued: a new
    generation begins. A restore to the newest instant holds every acknowledged write."""
    monkeypatch.setattr(continuous, "COMPACT_SECONDS", 0.1)  # every round compacts and acknowledges
    a, b = PostgresStorage(pg_url), PostgresStorage(pg_url)
    store = LocalObjectStore(tmp_path / "bucket")
    shippers = []
    for name, storage in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        backups = BackupService(storage, store, spool_dir=tmp_path / name)
        shippers.append(Shipper(storage, backups, tmp_path / name, tmp_path / name, sync_interval=0.05))
        backups.shipped = shippers[-1].shipped
    try:
        a.create_database("d", None)
        a.create_set("d", "s", allow_all)
        written: dict[str, int] = {}
        await _lead(shippers[0], a, [a, b], 40, written)
        await _lead(shippers[1], b, [a, b], 40, written)
        await _lead(shippers[0], a, [a, b], 40, written)
        assert len(await timeline(store)) == 1  # one stream, continued by each node in turn
        b.release_changes(CONSUMER)  # as a node with continuous backup off does: the log is let go
        b.put("d", "s", "unlogged", 1, b"1", allow_all)
        written["unlogged"] = 1
        await _lead(shippers[1], b, [a, b], 40, written)
        assert len(await timeline(store)) == 2  # a new generation, from a snapshot that holds it

        shipper = shippers[0]
        task = asyncio.create_task(shipper.run())
        await _until_async(lambda: shipper.status.state == "shipping")
        at = time.time()
        await _until_async(lambda: shipper.status.shipped_until > at)
        restored = await restore_to(shipper.backups, at, "d", "d_then", None)
        assert restored["databases"] == ["d_then"]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        snapshot = a.snapshot()
        try:
            db = next(d for d in snapshot.databases() if d.name == "d_then")
            assert {k: orjson.loads(v) for k, v in snapshot.entries(db, "s")} == written
        finally:
            snapshot.close()
    finally:
        a.close()
        b.close()


BUILDER = """
import sys
from fuckbase.storage import IndexDef, allow_all
from fuckbase.storage.postgresql import PostgresStorage
PostgresStorage(sys.argv[1]).create_index("d", "s", IndexDef("e", "e"), allow_all)
"""


def test_an_index_build_whose_process_dies_is_dropped_by_housekeeping(pg_url: str) -> None:
    import subprocess
    import sys

    storage = PostgresStorage(pg_url)
    try:
        storage.create_database("d", None)
        rows = [Put(f"k{i:06d}", v, orjson.dumps(v)) for i in range(60_000) for v in [{"e": f"v{i % 7}"}]]
        for i in range(0, len(rows), 5000):
            storage.batch("d", "s", rows[i : i + 5000], allow_all)
        builder = subprocess.Popen([sys.executable, "-c", BUILDER, pg_url])
        with psycopg.connect(pg_url, autocommit=True) as conn, psycopg.connect(pg_url, autocommit=True) as writer:
            deadline = time.monotonic() + 30
            while True:  # until the build has begun, then hold it between two ranges (writers wait)
                writer.execute("BEGIN")
                writer.execute("SELECT 1 FROM fb_state WHERE id = 1 FOR UPDATE")
                if writer.execute("SELECT 1 FROM fb_basic LIMIT 1").fetchone():
                    break
                writer.execute("ROLLBACK")
                assert time.monotonic() < deadline and builder.poll() is None
                time.sleep(0.02)
            storage.maintain()  # a live builder's index stays
            assert conn.execute("SELECT count(*) FROM fb_indexes WHERE NOT ready").fetchone() == (1,)
            builder.kill()
            builder.wait()
            writer.execute("ROLLBACK")
            while storage.maintain():
                pass
            assert conn.execute("SELECT count(*) FROM fb_indexes").fetchone() == (0,)
            assert conn.execute("SELECT count(*) FROM fb_basic").fetchone() == (0,)
        storage.create_index("d", "s", IndexDef("e", "e"), allow_all)  # the name is free again
        (found,) = storage.fetch([Lookup("d", "s", "e", "v3", allow_all)])
        assert len(found) == len(range(3, 60_000, 7))
    finally:
        storage.close()


def test_an_index_whose_build_failed_is_built_again_at_once(pg_url: str) -> None:
    """A failed build whose cleanup could not reach PostgreSQL (it was stopped) leaves its
    unfinished index behind; building it again replaces it rather than answering 409 until
    housekeeping drops it. One whose builder still works on it stays."""
    storage = PostgresStorage(pg_url)
    try:
        storage.create_database("d", None)
        rows = [Put(f"k{i}", v, orjson.dumps(v)) for i in range(700) for v in [{"e": f"v{i % 7}"}]]
        storage.batch("d", "s", rows, allow_all)
        with psycopg.connect(pg_url, autocommit=True) as conn, psycopg.connect(pg_url, autocommit=True) as builder:
            (index_id,) = conn.execute(
                "INSERT INTO fb_indexes (set_id, name, field, kind) SELECT s.id, 'e', 'e', 'basic' FROM fb_sets s"
                " JOIN fb_databases d ON d.id = s.database_id WHERE d.name = 'd' RETURNING id").fetchone() or (0,)
            builder.execute(BUILD_LOCK_SQL.format(op="pg_advisory_lock"), (index_id,))
            with pytest.raises(IndexExists):
                storage.create_index("d", "s", IndexDef("e", "e"), allow_all)
        storage.create_index("d", "s", IndexDef("e", "e"), allow_all)  # its builder gone: replaced
        (found,) = storage.fetch([Lookup("d", "s", "e", "v3", allow_all)])
        assert len(found) == 100
    finally:
        storage.close()


def test_a_restore_leaves_no_records_of_what_its_replay_dropped(pg_url: str) -> None:
    """Records made while a restore stages follow its replayed drops: a dropped index and a
    removed database take theirs along, and the survivors' records are exactly their entries'."""
    storage = PostgresStorage(pg_url)
    try:
        w = storage.restore_writer()
        db = w.add_database()
        db.name = "d"
        w.add_index(db, "s", IndexDef("e", "e"))
        w.add_index(db, "s", IndexDef("by", "e", SORTABLE, ("n",)))
        w.add_index(db, "s", IndexDef("dropped", "e", SORTABLE, ("n",)))
        w.write(db, "s", [(f"k{i}", v, orjson.dumps(v)) for i in range(100) for v in [{"e": i % 3, "n": i}]])
        w.write(db, "s", [(f"k{i}", v, orjson.dumps(v)) for i in range(50) for v in [{"e": "moved", "n": -i}]])
        w.delete(db, "s", [f"k{i}" for i in range(90, 100)])
        w.drop_index(db, "s", "dropped")
        gone = w.add_database()
        gone.name = "gone"
        w.add_index(gone, "s", IndexDef("e", "e"))
        w.write(gone, "s", [("a", {"e": 1}, b'{"e":1}')])
        w.remove_database(gone)
        w.commit(replace_all=False)
        with psycopg.connect(pg_url, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM fb_basic").fetchone() == (90,)
            assert conn.execute("SELECT count(*) FROM fb_sorted").fetchone() == (90,)
        (moved,) = storage.fetch([Lookup("d", "s", "e", "moved", allow_all)])
        assert sorted(e.key for e in moved) == sorted(f"k{i}" for i in range(50))
        with storage.read() as view:
            p = view.page(view.database("d"), "s", "by", "0", [("n", False)], 0, 100)
        assert (p.total, [e.key for e in p.entries]) == (13, [f"k{i}" for i in range(51, 90, 3)])
    finally:
        storage.close()


def test_a_staged_write_that_fails_on_its_thread_fails_the_next_call_and_rolls_the_restore_back(pg_url: str) -> None:
    """Restore writes are stored while the reader goes on: PostgreSQL refusing one (here a key
    too long for a B-tree entry) surfaces at the next call, and nothing of the restore stays."""
    import secrets

    from fuckbase.storage import StorageError

    storage = PostgresStorage(pg_url)
    try:
        storage.create_database("d", None)
        w = storage.restore_writer()
        db = w.add_database()
        db.name = "d"
        w.write(db, "s", [("fine", 1, b"1")])
        w.write(db, "s", [(secrets.token_hex(6000), 2, b"2")])  # returns: the failure comes later
        with pytest.raises(StorageError):
            w.commit(replace_all=False)
        w.abort()  # what a caller does after any failure: nothing more to undo
        with storage.read() as view:
            assert view.database("d").sets == {}
        assert storage.pool.get_stats()["pool_available"] == storage.pool.get_stats()["pool_size"]
    finally:
        storage.close()
