"""No input produces a 500 or kills the server: random bodies at every endpoint."""

from __future__ import annotations

from typing import Any

from conftest import ServerProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuckbase.openapi import ENDPOINTS

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
names = st.sampled_from(["shop", "users", "idx", "", "full", "..", "a\x00b", "x" * 300]) | st.text(max_size=12)
fields = st.sampled_from(
    ["database", "set", "key", "value", "name", "field", "index", "primary_field", "sort_fields",
     "sort", "pagination", "auth", "admin_auth", "backup_name"]
)
bodies = st.dictionaries(fields, names | json_values, max_size=7)
raw_bodies = st.binary(max_size=200)
paths = st.sampled_from(sorted(ENDPOINTS))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=paths, body=bodies)
def test_random_json_bodies(shop: ServerProcess, path: str, body: dict[str, Any]) -> None:
    r = shop.post(path, body)
    assert r.status_code < 500 or r.status_code in (502, 503, 504), (path, body, r.text)
    assert r.json()["status"] in ("success", "error")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=paths, raw=raw_bodies)
def test_random_bytes(shop: ServerProcess, path: str, raw: bytes) -> None:
    r = shop.post(path, raw)
    assert r.status_code < 500, (path, raw, r.text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.text(min_size=1, max_size=40), value=json_values)
def test_any_key_and_value_round_trip(shop: ServerProcess, key: str, value: Any) -> None:
    body = {"database": "shop", "set": "users", "key": key, "value": value}
    r = shop.post("/set/put", body)
    if r.status_code == 400:  # keys with lone surrogates are not valid UTF-8
        return
    assert r.status_code == 200, r.text
    got = shop.ok("/set/get", {"database": "shop", "set": "users", "key": key})["data"]
    assert got == value


def test_server_survived(shop: ServerProcess) -> None:
    assert shop.client is not None
    assert shop.client.get("/health").status_code == 200
