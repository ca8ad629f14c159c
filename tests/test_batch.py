"""/set/batch, the client's `batch` and `fuckbase import`: one transaction, all or nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerProcess, basic

from fuckbase import Client
from fuckbase.client import InvalidRequest, KeyNotFound


def _ops(*ops: Any) -> dict[str, Any]:
    return {"database": "shop", "set": "users", "operations": list(ops)}


def test_batch_applies_everything_in_order(shop: ServerProcess) -> None:
    shop.ok("/index/create", {"database": "shop", "set": "users", "name": "e", "field": "e"})
    r = shop.ok("/set/batch", _ops(
        {"op": "put", "key": "a", "value": {"e": "x"}},
        {"op": "put", "key": "b", "value": {"e": "x"}},
        {"op": "put", "key": "a", "value": {"e": "y"}},
        {"op": "delete", "key": "b"},
    ))
    assert r == {"status": "success", "message": "Batch applied successfully", "data": {"applied": 4}}
    assert shop.ok("/set/get", {"database": "shop", "set": "users", "key": "a"})["data"] == {"e": "y"}
    assert shop.post("/set/get", {"database": "shop", "set": "users", "key": "b"}).status_code == 404
    assert shop.ok("/index/query", {"database": "shop", "set": "users", "index": "e", "value": "x"})["data"]["count"] == 0
    assert shop.ok("/set/batch", {"database": "shop", "set": "new", "operations": [{"op": "put", "key": "k", "value": 1}]})
    assert "new" in shop.ok("/set/list", {"database": "shop"})["data"]["sets"]


@pytest.mark.parametrize(("ops", "status", "says"), [
    ([{"op": "put", "key": "ok", "value": 1}, {"op": "put", "key": "bad"}], 400, 'operation 1: "value" is required'),
    ([{"op": "put", "key": "ok", "value": 1}, {"op": "upsert", "key": "k", "value": 1}], 400, "operation 1: \"op\""),
    ([{"op": "put", "key": "ok", "value": 1}, "not an object"], 400, "operation 1: must be an object"),
    ([{"op": "put", "key": "ok", "value": 1}, {"op": "put", "key": 5, "value": 1}], 400, 'operation 1: "key"'),
    ([{"op": "put", "key": "ok", "value": 1}, {"op": "put", "key": "", "value": 1}], 400, 'operation 1: "key"'),
    ([{"op": "put", "key": "ok", "value": 1}, {"op": "put", "key": "k" * 1025, "value": 1}], 400, 'operation 1: "key"'),
    ([{"op": "put", "key": "ok", "value": 1}, {"op": "delete", "key": "missing"}], 404, "operation 1: key 'missing' not found"),
])
def test_a_bad_operation_applies_nothing(shop: ServerProcess, ops: list[Any], status: int, says: str) -> None:
    r = shop.post("/set/batch", _ops(*ops))
    assert r.status_code == status, r.text
    assert says in r.json()["message"]
    assert shop.post("/set/get", {"database": "shop", "set": "users", "key": "ok"}).status_code == 404


def test_a_refused_batch_creates_no_set_and_counts_its_own_deletes(shop: ServerProcess) -> None:
    fresh = {"database": "shop", "set": "fresh"}
    r = shop.post("/set/batch", {**fresh, "operations": [{"op": "put", "key": "a", "value": 1},
                                                         {"op": "delete", "key": "gone"}]})
    assert r.status_code == 404 and "operation 1: key 'gone' not found" in r.json()["message"], r.text
    assert "fresh" not in shop.ok("/set/list", {"database": "shop"})["data"]["sets"]
    twice = [{"op": "put", "key": "k", "value": 1}, {"op": "delete", "key": "k"}, {"op": "delete", "key": "k"}]
    r = shop.post("/set/batch", {**fresh, "operations": twice})
    assert r.status_code == 404 and "operation 2: key 'k' not found" in r.json()["message"], r.text
    once = [{"op": "put", "key": "k", "value": 1}, {"op": "delete", "key": "k"}, {"op": "put", "key": "k", "value": 2}]
    assert shop.ok("/set/batch", {**fresh, "operations": once})["data"]["applied"] == 3
    assert shop.ok("/set/get", {**fresh, "key": "k"})["data"] == 2


@pytest.mark.parametrize("body", [
    {"database": "shop", "set": "users"},
    {"database": "shop", "set": "users", "operations": {"op": "put"}},
    {"database": "shop", "operations": []},
    {"set": "users", "operations": []},
])
def test_malformed_batches(shop: ServerProcess, body: dict[str, Any]) -> None:
    assert shop.post("/set/batch", body).json()["code"] == "INVALID_REQUEST"


def test_batch_needs_the_databases_credentials(make_server: Any) -> None:
    srv = make_server()
    srv.ok("/create", {"name": "p", "auth": {"username": "u", "password": "pw"}})
    body = {"database": "p", "set": "s", "operations": [{"op": "put", "key": "k", "value": 1}]}
    assert srv.post("/set/batch", body).status_code == 401
    assert srv.post("/set/batch", body, headers={"Authorization": basic("u", "nope")}).status_code == 401
    assert srv.ok("/set/batch", body, headers={"Authorization": basic("u", "pw")})["data"]["applied"] == 1
    empty = {"database": "p", "set": "s", "operations": []}  # nothing to write still needs them
    assert srv.post("/set/batch", empty).json()["code"] == "AUTH_FAILED"
    assert srv.post("/set/batch", {**empty, "database": "nope"}).json()["code"] == "DB_NOT_FOUND"


def test_client_batch(shop: ServerProcess) -> None:
    with Client(shop.url) as client:
        users = client.database("shop").set("users")
        assert users.batch([("put", "a", {"n": 1}), ("put", "b", 2), {"op": "delete", "key": "a"}]) == 3
        assert users.get("b") == 2 and users.get("a", None) is None
        with pytest.raises(KeyNotFound):
            users.batch([("put", "c", 1), ("delete", "zzz")])
        assert users.get("c", None) is None
        with pytest.raises(InvalidRequest):
            users.batch([{"op": "nope", "key": "x"}])
        with pytest.raises(ValueError):
            users.batch([("upsert", "x", 1)])  # type: ignore[list-item]


def test_import_a_jsonl_file(shop: ServerProcess, tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"key": f"k{i}", "value": {"i": i}}) for i in range(12345)]
    lines.insert(100, "")
    lines[200] = "  " + lines[200] + "  "  # leading and trailing blanks
    lines[300] += "\r"  # a CRLF line end
    lines[400] = json.dumps({"value": {"i": 399, "key": "not this"}, "key": "k399"})
    lines[500] = json.dumps({"op": "put", "key": "k499", "value": {"i": 499}})
    lines.append(json.dumps({"op": "delete", "key": "k0"}))
    path.write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "-m", "fuckbase", "import", str(path), "--database", "shop", "--set", "users",
           "--url", shop.url, "--batch-size", "1000"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "imported 12346 operations from 12346 lines" in done.stdout
    assert shop.ok("/set/get", {"database": "shop", "set": "users", "key": "k12344"})["data"] == {"i": 12344}
    assert shop.post("/set/get", {"database": "shop", "set": "users", "key": "k0"}).status_code == 404
    assert shop.ok("/set/get", {"database": "shop", "set": "users", "key": "k199"})["data"] == {"i": 199}
    assert shop.ok("/set/get", {"database": "shop", "set": "users", "key": "k399"})["data"] == {"i": 399, "key": "not this"}
    bad = tmp_path / "bad.jsonl"
    for line, error in [('{"key": "x2"}', 'line 2: a put needs a "value"'),
                        ('{"key": "x2", "value": ', "line 2: not JSON"),
                        ("[1]", 'line 2: must be an object with a string "key"'),
                        ('{"key": 5, "value": 1}', 'line 2: must be an object with a string "key"'),
                        ('  {"value": 1}', 'line 2: must be an object with a string "key"')]:
        bad.write_text('{"key": "x1", "value": 1}\n' + line + "\n")
        done = subprocess.run([*cmd[:4], str(bad), *cmd[5:]], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and error in done.stderr, (line, done.stderr)
    assert shop.post("/set/get", {"database": "shop", "set": "users", "key": "x1"}).status_code == 404
    # refused by the server: the line of the operation named, counted as the file counts them
    bad.write_text('{"key": "x1", "value": 1}\n\n{"op": "delete", "key": "missing"}\n')
    done = subprocess.run([*cmd[:4], str(bad), *cmd[5:]], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "line 3: KEY_NOT_FOUND" in done.stderr and "lines 1-3" in done.stderr, done.stderr
    assert shop.post("/set/get", {"database": "shop", "set": "users", "key": "x1"}).status_code == 404
    done = subprocess.run([*cmd[:6], "nope", *cmd[7:]], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "DB_NOT_FOUND" in done.stderr
