"""Every endpoint and error code of the wire contract, against the real server process."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from conftest import ServerProcess, basic, stored_bytes


def err(srv: ServerProcess, path: str, body: Any, status: int, code: str, **kw: Any) -> dict[str, Any]:
    r = srv.post(path, body, **kw)
    assert r.status_code == status, r.text
    data = r.json()
    assert data["status"] == "error" and data["code"] == code, data
    assert isinstance(data["message"], str) and data["message"]
    return data  # type: ignore[no-any-return]


# ------------------------------------------------------------------ databases


def test_create_and_drop_database(server: ServerProcess) -> None:
    r = server.ok("/create", {"name": "mydb"})
    assert r == {"status": "success", "message": "Database created successfully", "data": {"database": "mydb"}}
    err(server, "/create", {"name": "mydb"}, 409, "DB_ALREADY_EXISTS")
    assert server.ok("/drop", {"name": "mydb"}) == {
        "status": "success",
        "message": "Database dropped successfully",
    }
    err(server, "/drop", {"name": "mydb"}, 404, "DB_NOT_FOUND")
    server.ok("/create", {"name": "mydb"})  # the name is free again


@pytest.mark.parametrize(
    "name", ["full", ".", "..", "a/b", "", "x" * 65, "spa ce", "ümlaut", 5, None, ["a"]]
)
async def test_bad_database_names(in_app: httpx.AsyncClient, name: Any) -> None:
    r = await in_app.post("/create", json={"name": name})
    assert r.status_code == 400 and r.json()["code"] == "INVALID_REQUEST", r.text


def test_good_database_names(server: ServerProcess) -> None:
    for name in ["a", "A-b_c.d", "x" * 64, "1.2.3", "..."]:
        server.ok("/create", {"name": name})


def test_server_info(server: ServerProcess) -> None:
    server.ok("/create", {"name": "a"})
    info = server.ok("/server/info", {})
    assert info["version"] and info["databases_count"] == 1
    assert info["uptime"].endswith("m") and "d " in info["uptime"]
    # an empty body is accepted, as the original ignores the body here
    assert server.post("/server/info", b"").status_code == 200


# ------------------------------------------------------------------ sets and data


def test_sets(server: ServerProcess) -> None:
    server.ok("/create", {"name": "shop"})
    assert server.ok("/set/create", {"database": "shop", "name": "users"}) == {
        "status": "success",
        "message": "Set created successfully",
        "data": {"set": "users"},
    }
    err(server, "/set/create", {"database": "shop", "name": "users"}, 409, "SET_ALREADY_EXISTS")
    server.ok("/set/create", {"database": "shop", "name": "products"})
    assert server.ok("/set/list", {"database": "shop"})["data"]["sets"] == ["products", "users"]
    err(server, "/set/list", {"database": "nope"}, 404, "DB_NOT_FOUND")
    err(server, "/set/create", {"database": "nope", "name": "x"}, 404, "DB_NOT_FOUND")
    err(server, "/set/create", {"database": "shop", "name": "a\x01b"}, 400, "INVALID_REQUEST")
    err(server, "/set/create", {"database": "shop", "name": "n" * 257}, 400, "INVALID_REQUEST")
    server.ok("/set/create", {"database": "shop", "name": "n" * 256})


def test_put_get_delete(shop: ServerProcess) -> None:
    base = {"database": "shop", "set": "users"}
    assert shop.ok("/set/put", {**base, "key": "u1", "value": {"name": "John"}}) == {
        "status": "success",
        "message": "Data stored successfully",
    }
    assert shop.ok("/set/get", {**base, "key": "u1"}) == {"status": "success", "data": {"name": "John"}}
    shop.ok("/set/put", {**base, "key": "u1", "value": [1, 2.5, "x", True, None]})
    assert shop.ok("/set/get", {**base, "key": "u1"})["data"] == [1, 2.5, "x", True, None]
    shop.ok("/set/put", {**base, "key": "nul", "value": None})
    r = shop.ok("/set/get", {**base, "key": "nul"})
    assert "data" in r and r["data"] is None
    assert shop.ok("/set/delete", {**base, "key": "u1"}) == {
        "status": "success",
        "message": "Data deleted successfully",
    }
    err(shop, "/set/get", {**base, "key": "u1"}, 404, "KEY_NOT_FOUND")
    err(shop, "/set/delete", {**base, "key": "u1"}, 404, "KEY_NOT_FOUND")
    err(shop, "/set/get", {**base, "set": "nope", "key": "u1"}, 404, "SET_NOT_FOUND")
    err(shop, "/set/delete", {**base, "set": "nope", "key": "u1"}, 404, "SET_NOT_FOUND")
    err(shop, "/set/get", {"database": "nope", "set": "users", "key": "u1"}, 404, "DB_NOT_FOUND")


def test_put_creates_the_set(shop: ServerProcess) -> None:
    shop.ok("/set/put", {"database": "shop", "set": "auto", "key": "k", "value": 1})
    assert "auto" in shop.ok("/set/list", {"database": "shop"})["data"]["sets"]
    assert shop.ok("/set/get", {"database": "shop", "set": "auto", "key": "k"})["data"] == 1


def test_keys_unicode_and_long(shop: ServerProcess) -> None:
    base = {"database": "shop", "set": "users"}
    for key in ["ключ", "🔑", "a b/c?d", "k" * 1024, "é" * 512, "x" * 480, "y" * 481]:
        shop.ok("/set/put", {**base, "key": key, "value": {"k": key}})
    for key in ["ключ", "🔑", "a b/c?d", "k" * 1024, "é" * 512, "x" * 480, "y" * 481]:
        assert shop.ok("/set/get", {**base, "key": key})["data"] == {"k": key}
    err(shop, "/set/put", {**base, "key": "k" * 1025, "value": 1}, 400, "INVALID_REQUEST")
    err(shop, "/set/put", {**base, "key": "é" * 513, "value": 1}, 400, "INVALID_REQUEST")
    # long keys that share a digest prefix never collide
    err(shop, "/set/get", {**base, "key": "k" * 1023}, 404, "KEY_NOT_FOUND")


def test_values_holding_nul(shop: ServerProcess) -> None:
    """U+0000 is valid JSON in strings and object keys; PostgreSQL's text holds no NUL, and
    its JSON functions unescape what they walk: values must go through as they are."""
    base = {"database": "shop", "set": "users"}
    shop.ok("/index/create", {**base, "name": "tag", "field": "tag"})
    values = [{"\x00": None}, {"tag": "a\x00b", "x": ["\x00", {"\x00\x01": "\x01"}]}, "\x00", ["\\u0000"]]
    for i, value in enumerate(values):
        shop.ok("/set/put", {**base, "key": f"k\x00{i}", "value": value})
    shop.ok("/set/batch", {**base, "operations": [{"op": "put", "key": "b", "value": values[1]}]})
    for i, value in enumerate(values):
        assert shop.ok("/set/get", {**base, "key": f"k\x00{i}"})["data"] == value
    found = shop.ok("/index/query", {**base, "index": "tag", "value": "a\x00b"})["data"]["data"]
    assert sorted(e["key"] for e in found) == ["b", "k\x001"]


@pytest.mark.parametrize(
    "body",
    [
        {"set": "users", "key": "k", "value": 1},
        {"database": "shop", "key": "k", "value": 1},
        {"database": "shop", "set": "users", "value": 1},
        {"database": "shop", "set": "users", "key": "k"},
        {"database": "shop", "set": "users", "key": 5, "value": 1},
        {"database": "shop", "set": ["users"], "key": "k", "value": 1},
        {"database": {"a": 1}, "set": "users", "key": "k", "value": 1},
        {"database": "shop", "set": "users", "key": "", "value": 1},
    ],
)
async def test_put_bad_fields(in_app: httpx.AsyncClient, body: dict[str, Any]) -> None:
    assert (await in_app.post("/create", json={"name": "shop"})).status_code == 200
    r = await in_app.post("/set/put", json=body)
    assert r.status_code == 400 and r.json()["code"] == "INVALID_REQUEST", r.text


# ------------------------------------------------------------------ transport


@pytest.mark.parametrize(
    "raw", [b"{", b"nonsense", b"[1,2]", b'"str"', b"42", b"null", b"\xff\xfe", b'{"a":NaN}', b"[" * 5000]
)
async def test_bad_bodies(in_app: httpx.AsyncClient, raw: bytes) -> None:
    r = await in_app.post("/set/get", content=raw)
    assert r.status_code == 400 and r.json()["code"] == "INVALID_REQUEST", r.text


def test_method_not_allowed(shop: ServerProcess) -> None:
    assert shop.client is not None
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        r = shop.client.request(method, "/set/get")
        assert r.status_code == 405
        assert r.json()["code"] == "METHOD_NOT_ALLOWED"


def test_unknown_path(shop: ServerProcess) -> None:
    r = shop.post("/nope", {})
    assert r.status_code == 404 and r.json()["status"] == "error"


def test_payload_too_large(make_server: Any) -> None:
    srv = make_server(args=["--max-body-size", "4096"])
    srv.ok("/create", {"name": "d"})
    big = {"database": "d", "set": "s", "key": "k", "value": "x" * 5000}
    err(srv, "/set/put", big, 413, "PAYLOAD_TOO_LARGE")

    def chunks() -> Any:  # no Content-Length: chunked transfer encoding
        yield b'{"database":"d","set":"s","key":"k","value":"'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    r = httpx.post(srv.url + "/set/put", content=chunks())
    assert r.status_code == 413 and r.json()["code"] == "PAYLOAD_TOO_LARGE"
    srv.ok("/set/put", {"database": "d", "set": "s", "key": "k", "value": "small"})


def test_json_content_type(shop: ServerProcess) -> None:
    r = shop.post("/set/list", {"database": "shop"})
    assert r.headers["content-type"] == "application/json"
    r = shop.post("/set/list", {"database": "nope"})
    assert r.headers["content-type"] == "application/json"


def test_health_metrics_openapi(shop: ServerProcess) -> None:
    assert shop.client is not None
    assert shop.client.get("/health").json() == {"status": "ok"}
    shop.ok("/set/put", {"database": "shop", "set": "users", "key": "a", "value": 1})
    text = shop.client.get("/metrics").text
    assert 'fuckbase_requests_total{endpoint="/set/put",status="200"} 1.0' in text
    assert 'fuckbase_keys{database="shop"} 1.0' in text
    assert "fuckbase_request_duration_seconds_bucket" in text
    spec = shop.client.get("/openapi.json").json()
    assert "/set/put" in spec["paths"] and spec["openapi"].startswith("3.")


# ------------------------------------------------------------------ auth


def test_database_auth_header_and_body(server: ServerProcess) -> None:
    server.ok("/create", {"name": "sec", "auth": {"username": "alice", "password": "s3cr3t"}})
    body = {"database": "sec", "set": "s", "key": "k", "value": 1}
    err(server, "/set/put", body, 401, "AUTH_FAILED")
    err(server, "/set/put", body, 401, "AUTH_FAILED", headers={"Authorization": basic("alice", "wrong")})
    err(server, "/set/put", {**body, "auth": {"username": "alice", "password": "nope"}}, 401, "AUTH_FAILED")
    err(server, "/set/put", body, 401, "AUTH_FAILED", headers={"Authorization": "Basic !!notbase64"})
    server.ok("/set/put", body, headers={"Authorization": basic("alice", "s3cr3t")})
    server.ok("/set/put", {**body, "auth": {"username": "alice", "password": "s3cr3t"}})
    get = {"database": "sec", "set": "s", "key": "k"}
    assert server.ok("/set/get", get, headers={"Authorization": basic("alice", "s3cr3t")})["data"] == 1
    err(server, "/set/list", {"database": "sec"}, 401, "AUTH_FAILED")
    err(server, "/index/query", {**get, "index": "i", "value": "x"}, 401, "AUTH_FAILED")
    # a wrong password after a right one is still refused (the success cache is per credential)
    err(server, "/set/get", get, 401, "AUTH_FAILED", headers={"Authorization": basic("alice", "s3cr3t!")})
    err(server, "/set/get", get, 401, "AUTH_FAILED", headers={"Authorization": basic("bob", "s3cr3t")})
    # the password is stored hashed, never in plaintext
    assert b"s3cr3t" not in stored_bytes(server)
    assert "s3cr3t" not in server.log()
    # without an admin configured, dropping a protected database needs its credentials
    refused = err(server, "/drop", {"name": "sec"}, 401, "AUTH_FAILED")
    assert "'sec' is a protected database" in refused["message"] and "admin" in refused["message"]
    server.ok("/drop", {"name": "sec"}, headers={"Authorization": basic("alice", "s3cr3t")})


def test_bad_auth_shapes(server: ServerProcess) -> None:
    err(server, "/create", {"name": "a", "auth": "alice:pw"}, 400, "INVALID_REQUEST")
    err(server, "/create", {"name": "a", "auth": {"username": "alice"}}, 400, "INVALID_REQUEST")
    err(server, "/create", {"name": "a", "auth": {"username": "", "password": ""}}, 400, "INVALID_REQUEST")


def test_credentials_left_out_or_null_read_as_the_original_reads_them(server: ServerProcess) -> None:
    """Clients fill "auth" from variables that may be unset: an open database answers, a
    protected one refuses, and only a wrong type is bad input."""
    server.ok("/create", {"name": "open"})
    server.ok("/create", {"name": "sec", "auth": {"username": "alice", "password": "s3cr3t"}})
    body = {"set": "s", "key": "k", "value": 1}
    for auth in ({}, {"username": "u"}, {"password": "p"}, {"username": None, "password": None}):
        server.ok("/set/put", {**body, "database": "open", "auth": auth})
        err(server, "/set/put", {**body, "database": "sec", "auth": auth}, 401, "AUTH_FAILED")
    err(server, "/set/put", {**body, "database": "sec", "auth": {"username": "alice"}}, 401, "AUTH_FAILED")
    err(server, "/set/put", {**body, "database": "open", "auth": {"username": 5}}, 400, "INVALID_REQUEST")
    err(server, "/set/put", {**body, "database": "open", "auth": []}, 400, "INVALID_REQUEST")


def test_a_surrogate_with_no_partner_reads_as_the_replacement_character(server: ServerProcess) -> None:
    """JavaScript's JSON.stringify of an emoji cut in half sends "\\ud83d" alone: U+FFFD, as
    the original reads it; a body that is not UTF-8 is still refused."""
    server.ok("/create", {"name": "d"})
    put = b'{"database":"d","set":"s","key":"k\\ud83d","value":{"t":"a\\udc00b","\\ud83d":1}}'
    assert server.post("/set/put", put).status_code == 200
    got = server.ok("/set/get", {"database": "d", "set": "s", "key": "k\ufffd"})["data"]
    assert got == {"t": "a\ufffdb", "\ufffd": 1}
    assert server.post("/set/get", b'{"database":"d","set":"s","key":"k\\ud83d"}').json()["data"] == got
    refused = err(server, "/set/put", b'{"database":"d","set":"s","key":"\xff","value":1}', 400, "INVALID_REQUEST")
    assert refused["message"] == "request body is not valid UTF-8"
    err(server, "/set/put", b'{"database":"d","set":"\\ud83d","key":"k","value":NaN}', 400, "INVALID_REQUEST")


def test_admin_auth(make_server: Any) -> None:
    srv = make_server(args=["--admin-username", "root", "--admin-password", "hunter2"])
    for path, body in [("/create", {"name": "d"}), ("/drop", {"name": "d"}), ("/server/info", {})]:
        err(srv, path, body, 401, "ADMIN_AUTH_REQUIRED")
        err(srv, path, body, 401, "ADMIN_AUTH_REQUIRED", headers={"X-Admin-Authorization": basic("root", "x")})
        err(srv, path, {**body, "admin_auth": {"username": "root", "password": "no"}}, 401, "ADMIN_AUTH_REQUIRED")
    hdr = {"X-Admin-Authorization": basic("root", "hunter2")}
    srv.ok("/create", {"name": "d"}, headers=hdr)
    srv.ok("/server/info", {"admin_auth": {"username": "root", "password": "hunter2"}})
    info = srv.ok("/server/info", {}, headers=hdr)
    assert "hunter2" not in str(info)
    # data endpoints of an open database do not need the admin
    srv.ok("/set/put", {"database": "d", "set": "s", "key": "k", "value": 1})
    srv.ok("/drop", {"name": "d"}, headers=hdr)
    assert "hunter2" not in srv.log()


def test_admin_env_configuration(make_server: Any) -> None:
    srv = make_server(env={"FUCKBASE_ADMIN_USERNAME": "root", "FUCKBASE_ADMIN_PASSWORD": "pw"})
    err(srv, "/create", {"name": "d"}, 401, "ADMIN_AUTH_REQUIRED")
    srv.ok("/create", {"name": "d"}, headers={"X-Admin-Authorization": basic("root", "pw")})


# ------------------------------------------------------------------ indexes


def _load_people(srv: ServerProcess) -> None:
    people = {
        "e1": {"name": "Ann", "department": "eng", "hireDate": "2020-01-05", "salary": 100, "position": "lead"},
        "e2": {"name": "Bob", "department": "eng", "hireDate": "2021-03-01", "salary": 90, "position": "dev"},
        "e3": {"name": "Cid", "department": "eng", "hireDate": "2019-07-11", "salary": 120, "position": "dev"},
        "e4": {"name": "Dan", "department": "ops", "hireDate": "2018-02-02", "salary": 80, "position": "dev"},
        "e5": {"name": "Eve", "department": "eng", "salary": 95, "position": "dev"},
        "e6": {"name": "Fay", "department": "eng", "hireDate": "2021-03-01", "salary": 70, "position": "lead"},
    }
    for k, v in people.items():
        srv.ok("/set/put", {"database": "shop", "set": "users", "key": k, "value": v})


def test_basic_index(shop: ServerProcess) -> None:
    base = {"database": "shop", "set": "users"}
    shop.ok("/set/put", {**base, "key": "u1", "value": {"email": "a@x", "age": 30}})
    shop.ok("/set/put", {**base, "key": "u2", "value": {"email": "b@x", "age": 30.0}})
    shop.ok("/set/put", {**base, "key": "u3", "value": {"name": "no email"}})
    shop.ok("/set/put", {**base, "key": "u4", "value": "not an object"})
    r = shop.ok("/index/create", {**base, "name": "email_index", "field": "email"})
    assert r == {"status": "success", "message": "Index created successfully", "data": {"index": "email_index"}}
    q = shop.ok("/index/query", {**base, "index": "email_index", "value": "a@x"})
    assert q == {"status": "success", "data": {"count": 1, "data": [{"key": "u1", "value": {"email": "a@x", "age": 30}}]}}
    # later writes keep the index current
    shop.ok("/set/put", {**base, "key": "u1", "value": {"email": "c@x"}})
    assert shop.ok("/index/query", {**base, "index": "email_index", "value": "a@x"}) == {
        "status": "success", "data": {"count": 0, "data": []}}
    assert shop.ok("/index/query", {**base, "index": "email_index", "value": "c@x"})["data"]["count"] == 1
    shop.ok("/set/put", {**base, "key": "u5", "value": {"email": "b@x"}})
    assert shop.ok("/index/query", {**base, "index": "email_index", "value": "b@x"}) == {
        "status": "success", "data": {"count": 2, "data": [{"key": "u2", "value": {"email": "b@x", "age": 30.0}},
                                                          {"key": "u5", "value": {"email": "b@x"}}]}}
    shop.ok("/set/delete", {**base, "key": "u5"})
    shop.ok("/set/delete", {**base, "key": "u1"})
    assert shop.ok("/index/query", {**base, "index": "email_index", "value": "c@x"})["data"]["count"] == 0
    # matching on the value as text: "30" finds 30 and 30.0
    shop.ok("/index/create", {**base, "name": "age", "field": "age"})
    got = shop.ok("/index/query", {**base, "index": "age", "value": "30"})["data"]
    assert got["count"] == 1 and got["data"][0]["key"] == "u2"
    # the original refuses a number or boolean as the value: it matches text only
    for not_text in (30, 30.0, True):
        err(shop, "/index/query", {**base, "index": "age", "value": not_text}, 400, "INVALID_REQUEST")
    # the Ruby client sends "sort": "asc" to /index/query: ignored
    shop.ok("/index/query", {**base, "index": "age", "value": "30", "sort": "asc"})
    err(shop, "/index/create", {**base, "name": "age", "field": "x"}, 409, "INDEX_ALREADY_EXISTS")
    err(shop, "/index/create", {**base, "set": "nope", "name": "i", "field": "x"}, 404, "SET_NOT_FOUND")
    err(shop, "/index/query", {**base, "index": "nope", "value": "x"}, 404, "INDEX_NOT_FOUND")
    err(shop, "/index/query", {**base, "index": "age"}, 400, "INVALID_REQUEST")
    err(shop, "/index/query", {**base, "index": "age", "value": {"a": 1}}, 400, "INVALID_REQUEST")
    assert shop.ok("/index/drop", {**base, "name": "age"}) == {
        "status": "success",
        "message": "Index dropped successfully",
    }
    err(shop, "/index/query", {**base, "index": "age", "value": "30"}, 404, "INDEX_NOT_FOUND")
    err(shop, "/index/drop", {**base, "name": "age"}, 404, "INDEX_NOT_FOUND")


def test_booleans_and_numbers_as_text(shop: ServerProcess) -> None:
    base = {"database": "shop", "set": "users"}
    shop.ok("/set/put", {**base, "key": "a", "value": {"f": True}})
    shop.ok("/set/put", {**base, "key": "b", "value": {"f": 1.5}})
    shop.ok("/set/put", {**base, "key": "c", "value": {"f": "true"}})
    shop.ok("/index/create", {**base, "name": "f", "field": "f"})
    keys = [e["key"] for e in shop.ok("/index/query", {**base, "index": "f", "value": "true"})["data"]["data"]]
    assert keys == ["a", "c"]
    assert shop.ok("/index/query", {**base, "index": "f", "value": "1.5"})["data"]["count"] == 1


def test_sortable_index(shop: ServerProcess) -> None:
    _load_people(shop)
    base = {"database": "shop", "set": "users"}
    r = shop.ok(
        "/index/create/sortable",
        {**base, "name": "dept", "primary_field": "department", "sort_fields": ["hireDate", "salary", "position"]},
    )
    assert r == {"status": "success", "message": "Sortable index created successfully", "data": {"index": "dept"}}
    q = {**base, "index": "dept", "value": "eng"}
    asc = shop.ok("/index/query/sorted", {**q, "sort": {"field": "hireDate", "order": "asc"}})
    assert [e["key"] for e in asc["data"]] == ["e3", "e1", "e2", "e6", "e5"]  # ties by key, missing last
    assert (asc["count"], asc["total"], asc["offset"], asc["limit"]) == (5, 5, 0, 10)
    desc = shop.ok("/index/query/sorted", {**q, "sort": {"field": "hireDate", "order": "desc"}})
    assert [e["key"] for e in desc["data"]] == ["e2", "e6", "e1", "e3", "e5"]
    page = shop.ok(
        "/index/query/sorted",
        {**q, "sort": {"field": "salary", "order": "desc"}, "pagination": {"offset": 1, "limit": 2}},
    )
    assert [e["key"] for e in page["data"]] == ["e1", "e5"]
    assert (page["count"], page["total"], page["offset"], page["limit"]) == (2, 5, 1, 2)
    assert page["data"][1]["value"]["name"] == "Eve"
    multi = shop.ok(
        "/index/query/multi-sorted",
        {**q, "sort": [{"field": "position", "order": "asc"}, {"field": "salary", "order": "desc"}]},
    )
    assert [e["key"] for e in multi["data"]] == ["e3", "e5", "e2", "e1", "e6"]
    multi2 = shop.ok(
        "/index/query/multi-sorted",
        {
            **q,
            "sort": [{"field": "hireDate", "order": "desc"}, {"field": "salary", "order": "asc"}],
            "pagination": {"offset": 0, "limit": 3},
        },
    )
    assert [e["key"] for e in multi2["data"]] == ["e6", "e2", "e1"]
    assert multi2["total"] == 5
    # basic queries work on a sortable index too
    assert shop.ok("/index/query", q)["data"]["count"] == 5
    # the index follows updates
    shop.ok("/set/put", {**base, "key": "e3", "value": {"department": "ops", "hireDate": "2000-01-01"}})
    asc = shop.ok("/index/query/sorted", {**q, "sort": {"field": "hireDate", "order": "asc"}})
    assert [e["key"] for e in asc["data"]] == ["e1", "e2", "e6", "e5"]
    beyond = shop.ok("/index/query/sorted", {**q, "pagination": {"offset": 50, "limit": 5}})
    assert beyond["data"] == [] and beyond["total"] == 4 and beyond["count"] == 0


def test_sortable_errors(shop: ServerProcess) -> None:
    _load_people(shop)
    base = {"database": "shop", "set": "users"}
    shop.ok("/index/create", {**base, "name": "plain", "field": "department"})
    shop.ok("/index/create/sortable", {**base, "name": "s", "primary_field": "department", "sort_fields": ["salary"]})
    q = {**base, "index": "s", "value": "eng"}
    err(shop, "/index/query/sorted", {**q, "sort": {"field": "name"}}, 400, "INVALID_REQUEST")
    err(shop, "/index/query/sorted", {**q, "sort": {"field": "salary", "order": "up"}}, 400, "INVALID_REQUEST")
    err(shop, "/index/query/sorted", {**q, "sort": "salary"}, 400, "INVALID_REQUEST")
    err(shop, "/index/query/sorted", {**q, "pagination": {"offset": -1}}, 400, "INVALID_REQUEST")
    err(shop, "/index/query/sorted", {**q, "pagination": {"limit": "10"}}, 400, "INVALID_REQUEST")
    err(shop, "/index/query/sorted", {**q, "pagination": [0, 10]}, 400, "INVALID_REQUEST")
    err(shop, "/index/query/multi-sorted", {**q, "sort": []}, 400, "INVALID_REQUEST")
    err(shop, "/index/query/multi-sorted", {**q, "sort": {"field": "salary"}}, 400, "INVALID_REQUEST")
    err(shop, "/index/query/sorted", {**q, "index": "plain"}, 400, "INVALID_REQUEST")
    for bad in [[], "salary", [1], ["a", "a"], None, ["a\x00b"], ["\x07"], ["x" * 257], [f"f{i}" for i in range(33)]]:
        err(
            shop,
            "/index/create/sortable",
            {**base, "name": "t", "primary_field": "department", "sort_fields": bad},
            400,
            "INVALID_REQUEST",
        )
    err(shop, "/index/create/sortable", {**base, "name": "t", "sort_fields": ["a"]}, 400, "INVALID_REQUEST")
    # limit 0 means the default page of 10, as in the original
    assert shop.ok("/index/query/sorted", {**q, "pagination": {"limit": 0}})["limit"] == 10
    # the default sort is the index's first sort field, ascending
    keys = [e["key"] for e in shop.ok("/index/query/sorted", q)["data"]]
    assert keys == ["e6", "e2", "e5", "e1", "e3"]


def test_sorting_mixed_types(shop: ServerProcess) -> None:
    base = {"database": "shop", "set": "users"}
    values = {"a": 10, "b": 9.5, "c": "10", "d": "9", "e": True, "f": False, "g": None, "h": -1}
    for k, v in values.items():
        shop.ok("/set/put", {**base, "key": k, "value": {"p": "x", "v": v}})
    shop.ok("/set/put", {**base, "key": "i", "value": {"p": "x"}})
    shop.ok("/index/create/sortable", {**base, "name": "s", "primary_field": "p", "sort_fields": ["v"]})
    q = {**base, "index": "s", "value": "x", "pagination": {"limit": 100}}
    asc = [e["key"] for e in shop.ok("/index/query/sorted", {**q, "sort": {"field": "v"}})["data"]]
    assert asc == ["g", "f", "e", "h", "b", "a", "c", "d", "i"]
    desc = [e["key"] for e in shop.ok("/index/query/sorted", {**q, "sort": {"field": "v", "order": "desc"}})["data"]]
    assert desc == ["d", "c", "a", "b", "h", "e", "f", "g", "i"]


def test_operations_on_dropped_database(shop: ServerProcess) -> None:
    shop.ok("/set/put", {"database": "shop", "set": "users", "key": "k", "value": 1})
    shop.ok("/drop", {"name": "shop"})
    err(shop, "/set/get", {"database": "shop", "set": "users", "key": "k"}, 404, "DB_NOT_FOUND")
    shop.ok("/create", {"name": "shop"})
    err(shop, "/set/get", {"database": "shop", "set": "users", "key": "k"}, 404, "SET_NOT_FOUND")
    assert shop.ok("/set/list", {"database": "shop"})["data"]["sets"] == []
