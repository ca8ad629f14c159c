"""No input produces a 500 or kills the server: random bodies at every endpoint."""

from __future__ import annotations

from typing import Any

from conftest import ServerProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuckbase.contract import BY_PATH

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
paths = st.sampled_from(sorted(BY_PATH))


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
    if r.status_code == 400:  # values nested beyond the encoder's limit
        return
    assert r.status_code == 200, r.text
    got = shop.ok("/set/get", {"database": "shop", "set": "users", "key": key})["data"]
    assert got == as_stored(value)


def as_stored(value: Any) -> Any:
    """Integers beyond 64 bits are stored as floats, as by the original (float64 numbers);
    a surrogate with no partner as U+FFFD, as the original reads it."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        return float(value)
    if isinstance(value, list):
        return [as_stored(v) for v in value]
    if isinstance(value, dict):
        return {as_stored(k): as_stored(v) for k, v in value.items()}
    return value


def test_server_survived(shop: ServerProcess) -> None:
    assert shop.client is not None
    assert shop.client.get("/health").status_code == 200


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_backups_never_break_the_server(shop: ServerProcess, data: st.DataObject) -> None:
    """Random damage to a real backup: the answer is success or 422, never a 5xx, and a refused
    restore leaves the data as it was."""
    shop.ok("/set/put", {"database": "shop", "set": "users", "key": "anchor", "value": {"n": 1}})
    if not hasattr(shop, "_fuzz_backup"):
        name = shop.ok("/backup/create", {"database": "shop"})["backup_name"]
        path = shop.data_dir / "backups" / name
        (shop.data_dir / "backups" / (name + ".sha256")).unlink()  # judge the structure, not the checksum
        shop._fuzz_backup = (name, path, path.read_bytes())  # type: ignore[attr-defined]
    name, path, original = shop._fuzz_backup  # type: ignore[attr-defined]
    blob = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        pos = data.draw(st.integers(0, max(0, len(blob) - 1)))
        if kind == "flip" and blob:
            blob[pos] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            del blob[pos:]
        elif kind == "insert":
            blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif blob:
            del blob[pos : pos + data.draw(st.integers(1, 16))]
    path.write_bytes(bytes(blob))
    r = shop.post("/backup/restore", {"backup_name": name})
    assert r.status_code in (200, 422), r.text
    if r.status_code == 422:
        assert r.json()["code"] == "BACKUP_INVALID"
        assert shop.ok("/set/get", {"database": "shop", "set": "users", "key": "anchor"})["data"] == {"n": 1}
    path.write_bytes(original)
