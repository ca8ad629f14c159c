"""A hostile client: guessing passwords, smuggled headers, deep values, odd names, prying metrics."""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import httpx
from conftest import ServerProcess, basic

CREDS = {"username": "alice", "password": "s3cr3t"}


def test_guessing_passwords_does_not_slow_anyone_else(make_server: Any) -> None:
    """8 clients guess a protected database's password as fast as they can; reads of an open
    database keep near their normal latency, and the guessers are slowed down with 429."""
    srv = make_server(["--workers", "1"])  # one process: one memory of verified credentials
    srv.ok("/create", {"name": "vault", "auth": CREDS})
    right = {"Authorization": basic("alice", "s3cr3t")}
    srv.ok("/set/put", {"database": "vault", "set": "s", "key": "k", "value": 1}, headers=right)
    srv.ok("/create", {"name": "open"})
    srv.ok("/set/put", {"database": "open", "set": "s", "key": "k", "value": 1})
    stop = threading.Event()
    statuses: list[int] = []

    def guess(n: int) -> None:
        with httpx.Client(base_url=srv.url, timeout=30, trust_env=False) as c:
            i = 0
            while not stop.is_set():
                i += 1
                r = c.post("/set/get", json={"database": "vault", "set": "s", "key": "k"},
                           headers={"Authorization": basic("alice", f"guess-{n}-{i}")})
                statuses.append(r.status_code)
                if r.status_code == 429:
                    assert r.json()["code"] == "TOO_MANY_REQUESTS"
                    assert int(r.headers["retry-after"]) >= 1

    guessers = [threading.Thread(target=guess, args=(n,)) for n in range(8)]
    for t in guessers:
        t.start()
    time.sleep(1.0)
    latencies = []
    with httpx.Client(base_url=srv.url, timeout=30, trust_env=False) as c:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            began = time.perf_counter()
            assert c.post("/set/get", json={"database": "open", "set": "s", "key": "k"}).status_code == 200
            latencies.append(time.perf_counter() - began)
            time.sleep(0.005)
    stop.set()
    for t in guessers:
        t.join()
    latencies.sort()
    p50, p99 = statistics.median(latencies), latencies[int(len(latencies) * 0.99)]
    print(f"\nunder 8 password guessers: get p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms; "
          f"guesses {len(statuses)}: {statuses.count(401)} x 401, {statuses.count(429)} x 429")
    assert statuses.count(429) > statuses.count(401)  # most guesses never reach scrypt
    assert 0 < statuses.count(401) <= 8 * 12  # each guesser: a few free failures, then back-off
    assert p50 < 0.01 and p99 < 0.1, (p50, p99)  # before: p50 172 ms, p99 255 ms
    # a credential verified before never waits, even from the address under back-off
    assert srv.ok("/set/get", {"database": "vault", "set": "s", "key": "k"}, headers=right)["data"] == 1
    r = srv.post("/set/get", {"database": "vault", "set": "s", "key": "k"}, headers={"Authorization": basic("alice", "x")})
    assert r.status_code == 429


def test_a_right_password_is_checked_once_for_a_crowd(make_server: Any) -> None:
    """Many requests with the same new credential at once share one scrypt check."""
    srv = make_server()
    srv.ok("/create", {"name": "vault", "auth": CREDS})
    results: list[int] = []

    def one() -> None:
        r = httpx.post(f"{srv.url}/set/put", json={"database": "vault", "set": "s", "key": "k", "value": 1},
                       headers={"Authorization": basic("alice", "s3cr3t")}, timeout=30, trust_env=False)
        results.append(r.status_code)

    threads = [threading.Thread(target=one) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 32


def test_the_admin_header_has_one_spelling(make_server: Any) -> None:
    srv = make_server(["--admin-username", "admin", "--admin-password", "pw"])
    assert srv.post("/server/info", {}, headers={"X-Admin-Authorization": basic("admin", "pw")}).status_code == 200
    for spelling in ("X_Admin_Authorization", "X-Admin_Authorization", "XAdminAuthorization"):
        r = srv.post("/server/info", {}, headers={spelling: basic("admin", "pw")})
        assert r.status_code == 401 and r.json()["code"] == "ADMIN_AUTH_REQUIRED", spelling


def test_metrics_do_not_name_protected_databases(server: ServerProcess) -> None:
    server.ok("/create", {"name": "secret-project", "auth": CREDS})
    server.ok("/create", {"name": "public"})
    server.ok("/set/put", {"database": "public", "set": "s", "key": "k", "value": 1})
    for i in range(3):
        server.ok("/set/put", {"database": "secret-project", "set": "s", "key": f"k{i}", "value": 1,
                               "auth": CREDS})
    text = httpx.get(f"{server.url}/metrics", trust_env=False).text
    assert "secret-project" not in text
    assert 'fuckbase_keys{database="public"} 1.0' in text
    assert "fuckbase_protected_keys 3.0" in text
    assert "fuckbase_databases 2.0" in text


def test_values_nested_beyond_the_limit_are_400(shop: ServerProcess) -> None:
    for depth in (254, 255, 300, 1023, 1024, 5000):
        deep = "[" * depth + "]" * depth
        for path, body in (
            ("/set/put", '{"database":"shop","set":"users","key":"d","value":' + deep + "}"),
            ("/set/batch", '{"database":"shop","set":"users","operations":[{"op":"put","key":"d","value":' + deep + "}]}"),
            ("/create", '{"name":"x","auth":' + deep + "}"),
            ("/index/query/sorted", '{"database":"shop","set":"users","index":"i","value":"v","sort":' + deep + "}"),
        ):
            r = shop.post(path, body.encode())
            assert r.status_code in (200, 400, 404), (path, depth, r.text)
            assert r.json()["status"] in ("success", "error")
            if r.status_code == 400:
                assert r.json()["code"] == "INVALID_REQUEST"
        r = shop.post("/set/put", ('{"database":"shop","set":"users","key":"d","value":' + deep + "}").encode())
        if depth < 255:
            assert r.status_code == 200
        elif depth > 255:  # at 255 exactly it depends on the orjson version's encoder
            assert r.status_code == 400 and r.json()["code"] == "INVALID_REQUEST", r.text


def test_malformed_backup_names_are_400(server: ServerProcess) -> None:
    for name in ("backups/./20250101-000000.json", "backups/../20250101-000000.json",
                 "backups/./x/20250101-000000.json", "backups/.//20250101-000000.json",
                 "backups/shop/20250101-000000.json/", "backups/shop/./20250101-000000.json"):
        for path in ("/backup/restore", "/backup/verify"):
            r = server.post(path, {"backup_name": name})
            assert r.status_code == 400 and r.json()["code"] == "INVALID_REQUEST", (path, name, r.text)
