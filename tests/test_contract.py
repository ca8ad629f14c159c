"""The contract's table against what is built from it: routes, OpenAPI, the client's error
map, and every field of every endpoint refusing every wrong JSON type with 400."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ServerProcess, basic
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from inprocess import in_process

import fuckbase
from fuckbase import client
from fuckbase.contract import BY_PATH, ENDPOINTS, GET_PATHS, ORIGINAL_ONLY, ErrorCode, Field, Kind

SRC = Path(__file__).resolve().parent.parent / "src" / "fuckbase"

# a valid body per endpoint: the tests make one field wrong at a time
VALID: dict[str, dict[str, Any]] = {
    "/create": {"name": "fresh", "auth": {"username": "u", "password": "p"}},
    "/drop": {"name": "shop"},
    "/server/info": {},
    "/set/create": {"database": "shop", "name": "more"},
    "/set/list": {"database": "shop"},
    "/set/put": {"database": "shop", "set": "users", "key": "k", "value": {"age": 1}},
    "/set/get": {"database": "shop", "set": "users", "key": "k"},
    "/set/delete": {"database": "shop", "set": "users", "key": "k"},
    "/set/batch": {"database": "shop", "set": "users", "operations": [{"op": "put", "key": "k", "value": 1}]},
    "/index/create": {"database": "shop", "set": "users", "name": "i", "field": "age"},
    "/index/create/sortable": {"database": "shop", "set": "users", "name": "s", "primary_field": "age",
                               "sort_fields": ["age"]},
    "/index/drop": {"database": "shop", "set": "users", "name": "i"},
    "/index/query": {"database": "shop", "set": "users", "index": "i", "value": "1"},
    "/index/query/sorted": {"database": "shop", "set": "users", "index": "s", "value": "1",
                            "sort": {"field": "age", "order": "asc"}, "pagination": {"offset": 0, "limit": 5}},
    "/index/query/multi-sorted": {"database": "shop", "set": "users", "index": "s", "value": "1",
                                  "sort": [{"field": "age", "order": "desc"}], "pagination": {"offset": 0, "limit": 5}},
    "/backup/create": {"database": "shop"},
    "/backup/list": {"database": "shop"},
    "/backup/restore": {"backup_name": "backups/shop/20250101-000000.json"},
    "/backup/verify": {"backup_name": "backups/shop/20250101-000000.json"},
}
CREDS = {"username": "u", "password": "p"}

WRONG: dict[str, list[Any]] = {
    "string": [1, 1.5, True, False, [], ["x"], {}, {"a": "b"}],
    "integer": ["1", 1.5, True, [], {}],
    "object": ["x", 1, True, [], ["x"]],
    "array": ["x", 1, True, {}, {"a": 1}],
}
wrong_values = {
    t: st.one_of(
        *([] if t == "string" else [st.text(max_size=5)]),
        *([] if t == "integer" else [st.integers()]),
        st.floats(allow_nan=False, allow_infinity=False).filter(lambda f, t=t: t != "integer" or not f.is_integer()),
        st.booleans(),
        *([] if t == "array" else [st.lists(st.integers(), max_size=3)]),
        *([] if t == "object" else [st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)]),
    )
    for t in WRONG
}


def field_paths(fields: tuple[Field, ...], prefix: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Kind]]:
    """Every declared field, nested ones too (list items as index 0)."""
    for f in fields:
        path = (*prefix, f.name)
        yield path, f.kind
        yield from field_paths(f.kind.fields, path)
        if f.kind.items is not None:
            yield (*path, 0), f.kind.items
            yield from field_paths(f.kind.items.fields, (*path, 0))


def label(path: tuple[Any, ...]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def with_value(body: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """A copy of body with the field at path replaced (containers made as needed)."""
    out = copy.deepcopy(body)
    node: Any = out
    for i, p in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(node, dict) and not isinstance(node.get(p), (dict, list)):
            node[p] = [{}] if isinstance(nxt, int) else {}
        node = node[p]
    node[path[-1]] = value
    return out


def example(path: str, database: str = "shop") -> dict[str, Any]:
    """VALID[path] on `database`, with every credential field the endpoint accepts."""
    body = dict(VALID[path])
    if "database" in body:
        body["database"] = database
    for f in BY_PATH[path].request_fields():
        if f.kind.fields and f.name in ("auth", "admin_auth"):
            body.setdefault(f.name, dict(CREDS))
    return body


CASES = [
    (e.path, path, kind.type)
    for e in ENDPOINTS
    for path, kind in field_paths(e.request_fields())
    if kind.type in WRONG
]


# ------------------------------------------------------------------------------ parity


def test_every_endpoint_has_a_valid_example() -> None:
    assert set(VALID) == set(BY_PATH)


def test_openapi_lists_every_route_and_states_the_rules(server: ServerProcess) -> None:
    spec = server.client.get("/openapi.json").json()  # type: ignore[union-attr]
    assert set(spec["paths"]) == set(BY_PATH) | set(GET_PATHS)
    for e in ENDPOINTS:
        schema = spec["paths"][e.path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert set(schema.get("required", [])) == {f.name for f in e.request_fields() if f.required}
        assert set(schema["properties"]) == {f.name for f in e.request_fields()}
    put = spec["paths"]["/set/put"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert put["properties"]["database"]["pattern"] == r"^[A-Za-z0-9_.\-]{1,64}$"
    assert put["properties"]["key"]["maxLength"] == 1024
    assert put["properties"]["set"]["maxLength"] == 256
    codes = spec["paths"]["/set/get"]["post"]["responses"]["default"]["content"]["application/json"]["schema"]
    assert set(codes["properties"]["code"]["enum"]) == {c.value for c in ErrorCode}


def test_the_client_maps_every_code_and_nothing_else() -> None:
    mapped = set(client._ERRORS)
    assert mapped == {c.value for c in ErrorCode}
    assert client._ERRORS["KEY_NOT_FOUND"] is client.KeyNotFound
    assert client._ERRORS["NOT_FOUND"] is client.NotFoundError
    assert client._ERRORS["STORAGE_UNAVAILABLE"] is client.Unavailable


def test_the_server_sends_every_code_and_only_the_contracts() -> None:
    server_src = {p: p.read_text() for p in SRC.rglob("*.py") if p.name not in ("client.py", "contract.py")}
    used = {m for text in server_src.values() for m in re.findall(r"ErrorCode\.([A-Z_0-9]+)", text)}
    assert used == {c.name for c in ErrorCode} - {c.name for c in ORIGINAL_ONLY}
    for path, text in server_src.items():  # no code as a bare string anywhere
        bare = {c.value for c in ErrorCode if f'"{c.value}"' in text}
        assert not bare, (path, bare)


def test_the_package_exports_the_whole_client() -> None:
    for name in client.__all__:
        assert getattr(fuckbase, name) is getattr(client, name)
    assert fuckbase.KeyNotFound is client.KeyNotFound
    assert issubclass(fuckbase.KeyNotFound, fuckbase.FuckBaseError)
    assert set(client.__all__) <= set(dir(fuckbase))
    with pytest.raises(AttributeError):
        _ = fuckbase.NoSuchThing  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------ wrong types


@pytest.fixture(scope="module")
def typed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One open database "shop" and one protected database "vault", each with set "users"."""
    srv = ServerProcess(tmp_path_factory.mktemp("typed") / "data").start()
    srv.ok("/create", {"name": "shop"})
    srv.ok("/set/create", {"database": "shop", "name": "users"})
    srv.ok("/create", {"name": "vault", "auth": CREDS})
    srv.ok("/set/create", {"database": "vault", "name": "users"}, headers={"Authorization": basic("u", "p")})
    yield srv
    srv.stop()


def _expect_400(srv: ServerProcess, path: str, body: dict[str, Any], field: str) -> None:
    _check_400(srv.post(path, body), path, body, field)


def _check_400(r: httpx.Response, path: str, body: dict[str, Any], field: str) -> None:
    assert r.status_code == 400, (path, body, r.status_code, r.text)
    got = r.json()
    assert got["code"] == "INVALID_REQUEST"
    assert f'"{field}"' in got["message"], (field, got["message"])


async def _two_databases(c: httpx.AsyncClient) -> None:
    """Open "shop" and protected "vault", each with set "users" (in process)."""
    for path, body in (("/create", {"name": "shop"}), ("/set/create", {"database": "shop", "name": "users"}),
                       ("/create", {"name": "vault", "auth": CREDS}),
                       ("/set/create", {"database": "vault", "name": "users", "auth": CREDS}),
                       ("/index/create", {"database": "shop", "set": "users", "name": "i", "field": "age"})):
        r = await c.post(path, json=body)
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("database", ["shop", "vault"])
async def test_every_field_refuses_every_wrong_type(tmp_path: Path, database: str) -> None:
    """In process: every declared field, nested ones too, every wrong JSON type."""
    assert CASES
    async with in_process(tmp_path) as c:
        await _two_databases(c)
        for path, field_path, json_type in CASES:
            base = example(path, database)
            for wrong in WRONG[json_type]:
                body = with_value(base, field_path, wrong)
                _check_400(await c.post(path, json=body), path, body, label(field_path))


@pytest.mark.parametrize("database", ["shop", "vault"])
async def test_batch_operations_of_the_wrong_type(tmp_path: Path, database: str) -> None:
    async with in_process(tmp_path) as c:
        await _two_databases(c)
        base = {"database": database, "set": "users", "auth": CREDS}
        for ops in ("x", 1, {"op": "put"}, [1], [[]], [{"op": 1, "key": "k"}], [{"op": "put", "key": 1, "value": 1}],
                    [{"op": "put", "key": "k"}]):
            r = await c.post("/set/batch", json={**base, "operations": ops})
            assert r.status_code == 400 and r.json()["code"] == "INVALID_REQUEST", (ops, r.text)


async def test_auth_of_the_wrong_type_on_an_open_database(tmp_path: Path) -> None:
    """The original refuses it; we used to ignore it on open databases."""
    async with in_process(tmp_path) as c:
        await _two_databases(c)
        for path in ("/set/create", "/set/list", "/set/put", "/set/get", "/set/delete"):
            for auth in ("u:p", 1, ["u", "p"], True):
                body = {**VALID[path], "auth": auth}
                _check_400(await c.post(path, json=body), path, body, "auth")


async def test_the_index_value_must_be_text(tmp_path: Path) -> None:
    async with in_process(tmp_path) as c:
        await _two_databases(c)
        for path in ("/index/query", "/index/query/sorted", "/index/query/multi-sorted"):
            for value in (1, 1.5, True, False):
                body = {**VALID[path], "value": value}
                _check_400(await c.post(path, json=body), path, body, "value")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(CASES), data=st.data())
def test_random_wrong_types_are_400(typed: ServerProcess, case: tuple[str, tuple[Any, ...], str],
                                    data: st.DataObject) -> None:
    path, field_path, json_type = case
    wrong = data.draw(wrong_values[json_type])
    _expect_400(typed, path, with_value(example(path), field_path, wrong), label(field_path))


def test_valid_bodies_are_not_refused_for_their_types(typed: ServerProcess) -> None:
    """The examples above are well typed: whatever they fail on, it is not a field's type."""
    for path, body in VALID.items():
        r = typed.post(path, body)
        assert r.status_code != 500, (path, r.text)
        if r.status_code == 400:
            assert "must be" not in r.json()["message"] and "is required" not in r.json()["message"], (path, r.text)


def test_a_client_error_for_every_code_the_server_sends(typed: ServerProcess) -> None:
    c = fuckbase.Client(typed.url)
    with pytest.raises(fuckbase.KeyNotFound):
        c.create_database("other").create_set("users").get("no-such-key")
    with pytest.raises(fuckbase.NotFoundError) as unknown:
        c._run(client._Call("/no/such/path", {}, lambda d: d))
    assert unknown.value.code == "NOT_FOUND"
    c.close()


# what a request valid under the OpenAPI document may still be refused for: the meaning of
# the data, which no schema states (and the byte length of a key, which JSON Schema cannot)
SEMANTIC = ("is not one of the index's sort fields", "is not a sortable index", "bytes of UTF-8",
            "is not a valid date and time", '"as" needs')


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def from_schema(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values valid under the JSON Schema subset the OpenAPI document uses."""
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "string":
        if "pattern" in schema:
            text = st.from_regex(schema["pattern"], fullmatch=True)
        else:
            text = st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 40), 40))
        if "maxLength" in schema:
            text = text.filter(lambda t: len(t) <= schema["maxLength"])
        if "not" in schema:
            text = text.filter(lambda t: t not in schema["not"]["enum"])
        return text
    if kind == "integer":
        return st.integers(schema.get("minimum", -(2**63)), schema.get("maximum", 2**63 - 1))
    if kind == "array":
        items = from_schema(schema["items"])
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=min(schema.get("maxItems", 5), 5),
                        unique=schema.get("uniqueItems", False))
    if kind == "object":
        if "oneOf" in schema:  # exactly one of some fields (a restore: a backup name or an instant)
            alternatives = [set(alt["required"]) for alt in schema["oneOf"]]
            others = set().union(*alternatives)
            return st.sampled_from(alternatives).flatmap(lambda chosen: from_schema({
                **{k: v for k, v in schema.items() if k != "oneOf"},
                "properties": {k: v for k, v in schema["properties"].items() if k not in others - chosen},
                "required": [*schema.get("required", []), *chosen]}))
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        needs_value = "if" in schema  # the operations' rule: a put has a value
        return st.fixed_dictionaries(
            {k: from_schema(v) for k, v in props.items() if k in required or (needs_value and k == "value")},
            optional={k: from_schema(v) for k, v in props.items() if k not in required and not (needs_value and k == "value")},
        )
    return st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                        max_leaves=8)


@pytest.fixture(scope="module")
def request_schemas(typed: ServerProcess) -> dict[str, Any]:
    spec = typed.client.get("/openapi.json").json()  # type: ignore[union-attr]
    return {path: spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
            for path in BY_PATH}


@pytest.mark.parametrize("path", sorted(BY_PATH))
def test_requests_valid_under_openapi_are_not_refused_as_malformed(typed: ServerProcess,
                                                                   request_schemas: dict[str, Any], path: str) -> None:
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=from_schema(request_schemas[path]))
    def check(body: dict[str, Any]) -> None:
        # JSON text cannot carry lone surrogates, which a schema's "string" allows
        assume(all(not any(0xD800 <= ord(c) <= 0xDFFF for c in s) for s in _strings(body)))
        r = typed.post(path, body)
        assert r.status_code != 500, (path, body, r.text)
        if r.status_code == 400:
            message = r.json()["message"]
            assert any(reason in message for reason in SEMANTIC), (path, body, message)

    check()
