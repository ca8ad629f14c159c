"""The storage interface's behaviour, written once and run against every backend."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from fuckbase.storage import (
    SORTABLE,
    BatchKeyNotFound,
    DatabaseExists,
    DatabaseNotFound,
    Delete,
    Get,
    IndexDef,
    IndexExists,
    IndexNotFound,
    KeyNotFound,
    Lookup,
    PointRead,
    Put,
    SetExists,
    SetNotFound,
    Storage,
    allow_all,
)


def put(s: Storage, db: str, set_name: str, key: str, value: Any) -> None:
    s.put(db, set_name, key, value, orjson.dumps(value), allow_all)


def load(s: Storage, db: str, set_name: str, items: dict[str, Any]) -> None:
    ops = [Put(k, v, orjson.dumps(v)) for k, v in items.items()]
    for i in range(0, len(ops), 5000):
        s.batch(db, set_name, ops[i : i + 5000], allow_all)


def fetched(s: Storage, read: PointRead) -> Any:
    """One point read's result; raises what it raised."""
    (result,) = s.fetch([read])
    if isinstance(result, BaseException):
        raise result
    return result


def get(s: Storage, db: str, set_name: str, key: str) -> Any:
    raw = fetched(s, Get(db, set_name, key, allow_all))
    return None if raw is None else orjson.loads(raw)


def lookup(s: Storage, db: str, set_name: str, index: str, text: str) -> list[str]:
    return [e.key for e in fetched(s, Lookup(db, set_name, index, text, allow_all))]


def page(s: Storage, index: str, text: str, order: list[tuple[str, bool]], offset: int = 0,
         limit: int = 100, db: str = "d", set_name: str = "s") -> tuple[int, list[str]]:
    with s.read() as view:
        p = view.page(view.database(db), set_name, index, text, order, offset, limit)
    return p.total, [e.key for e in p.entries]


# ------------------------------------------------------------------ catalog


def test_databases_and_sets(storage: Storage) -> None:
    storage.create_database("a", None)
    storage.create_database("b", {"username": "u", "hash": "h"})
    with pytest.raises(DatabaseExists):
        storage.create_database("a", None)
    storage.create_set("a", "s1", allow_all)
    with pytest.raises(SetExists):
        storage.create_set("a", "s1", allow_all)
    with pytest.raises(DatabaseNotFound):
        storage.create_set("nope", "s1", allow_all)
    with storage.read() as view:
        assert sorted(view.database_names()) == ["a", "b"]
        assert dict(view.database("b").auth or {}) == {"username": "u", "hash": "h"}
        assert list(view.database("a").sets) == ["s1"]
        with pytest.raises(DatabaseNotFound):
            view.database("c")
    storage.drop_database("a", allow_all)
    with pytest.raises(DatabaseNotFound):
        storage.drop_database("a", allow_all)
    storage.create_database("a", None)  # a new database of the same name starts empty
    with storage.read() as view:
        assert view.database("a").sets == {}


def test_access_check_sees_the_stored_credentials_and_can_refuse(storage: Storage) -> None:
    creds = {"username": "u", "hash": "h"}
    storage.create_database("p", creds)
    seen: list[Any] = []

    def refuse(stored: Any) -> None:
        seen.append(dict(stored))
        raise PermissionError("no")

    for write in (
        lambda: storage.put("p", "s", "k", 1, b"1", refuse),
        lambda: storage.create_set("p", "s", refuse),
        lambda: storage.batch("p", "s", [Put("k", 1, b"1")], refuse),
        lambda: storage.drop_database("p", refuse),
    ):
        with pytest.raises(PermissionError):
            write()
    assert seen == [creds] * 4
    with storage.read() as view:
        assert view.database("p").sets == {}  # nothing was written


def test_point_reads_answer_each_read_alone_and_check_before_telling_anything(storage: Storage) -> None:
    creds = {"username": "u", "hash": "h"}
    storage.create_database("open", None)
    storage.create_database("closed", creds)
    put(storage, "open", "s", "k", {"e": "x"})
    put(storage, "open", "s", "j", {"e": "x"})
    put(storage, "closed", "s", "k", 2)
    storage.create_index("open", "s", IndexDef("e", "e"), allow_all)
    storage.create_index("open", "s", IndexDef("t", "e", SORTABLE, ("e",)), allow_all)
    seen: list[Any] = []

    def refuse(stored: Any) -> None:
        seen.append(stored and dict(stored))
        raise PermissionError("no")

    results = storage.fetch([
        Get("open", "s", "k", allow_all),
        Get("open", "s", "missing", allow_all),
        Get("nope", "s", "k", allow_all),
        Get("open", "nope", "k", allow_all),
        Get("closed", "s", "k", refuse),
        Get("closed", "nope", "k", refuse),  # refused, not "set not found": nothing told
        Lookup("open", "s", "e", "x", allow_all),
        Lookup("open", "s", "t", "x", allow_all),  # a sortable index answers lookups too
        Lookup("open", "s", "e", "none", allow_all),
        Lookup("open", "s", "nope", "x", allow_all),
        Lookup("closed", "s", "e", "x", refuse),
        Get("closed", "s", "k", allow_all),
    ])
    assert orjson.loads(results[0]) == {"e": "x"}
    assert results[1] is None
    assert isinstance(results[2], DatabaseNotFound)
    assert isinstance(results[3], SetNotFound) and str(results[3]) == "set 'nope' not found in database 'open'"
    assert all(isinstance(results[i], PermissionError) for i in (4, 5, 10))
    assert [[e.key for e in results[i]] for i in (6, 7, 8)] == [["j", "k"], ["j", "k"], []]
    assert isinstance(results[9], IndexNotFound) and str(results[9]) == "index 'nope' not found in set 's'"
    assert results[11] == b"2"
    assert seen == [creds] * 3
    assert storage.fetch([]) == []


# ------------------------------------------------------------------ entries


def test_put_get_replace_delete(storage: Storage) -> None:
    storage.create_database("d", None)
    put(storage, "d", "s", "k", {"a": 1})
    put(storage, "d", "s", "n", None)
    assert get(storage, "d", "s", "k") == {"a": 1}
    assert fetched(storage, Get("d", "s", "n", allow_all)) == b"null"  # a stored null is not a miss
    assert fetched(storage, Get("d", "s", "missing", allow_all)) is None
    with pytest.raises(SetNotFound):
        get(storage, "d", "nope", "k")
    put(storage, "d", "s", "k", [1, 2])
    assert get(storage, "d", "s", "k") == [1, 2]
    storage.delete("d", "s", "k", allow_all)
    assert get(storage, "d", "s", "k") is None
    with pytest.raises(KeyNotFound):
        storage.delete("d", "s", "k", allow_all)
    with pytest.raises(SetNotFound):
        storage.delete("d", "nope", "k", allow_all)
    with pytest.raises(DatabaseNotFound):
        put(storage, "nope", "s", "k", 1)
    with storage.read() as view:
        assert view.key_counts() == {"d": 1}


@pytest.mark.parametrize("length", [1, 239, 240, 241, 480, 481, 1024])
def test_keys_of_every_length(storage: Storage, length: int) -> None:
    storage.create_database("d", None)
    key = "é" * (length // 2) + "x" * (length % 2)
    other = key[:-1] + "y"
    put(storage, "d", "s", key, {"e": "same", "n": 1})
    put(storage, "d", "s", other, {"e": "same", "n": 2})
    storage.create_index("d", "s", IndexDef("e", "e"), allow_all)
    storage.create_index("d", "s", IndexDef("n", "e", SORTABLE, ("n",)), allow_all)
    assert get(storage, "d", "s", key) == {"e": "same", "n": 1}
    assert lookup(storage, "d", "s", "e", "same") == sorted([key, other])
    assert page(storage, "n", "same", [("n", True)]) == (2, [other, key])
    storage.delete("d", "s", key, allow_all)
    assert lookup(storage, "d", "s", "e", "same") == [other]
    with storage.read() as view:
        assert view.key_counts() == {"d": 1}


def test_keys_with_nul_and_control_characters(storage: Storage) -> None:
    """Any string is a key: NUL included (which PostgreSQL's text cannot hold as it is)."""
    storage.create_database("d", None)
    keys = ["a\x00", "a\x01", "a", "a\x00b", "\x00", "\x01\x01", "\x01\x02", "b\x02"]
    load(storage, "d", "s", {k: {"g": 1, "k": k} for k in keys})
    storage.create_index("d", "s", IndexDef("g", "g"), allow_all)
    storage.create_index("d", "s", IndexDef("by", "g", SORTABLE, ("g",)), allow_all)
    assert all(get(storage, "d", "s", k) == {"g": 1, "k": k} for k in keys)
    assert lookup(storage, "d", "s", "g", "1") == sorted(keys)
    assert page(storage, "by", "1", [("g", False)]) == (len(keys), sorted(keys))
    snap = storage.snapshot()
    try:
        db = next(d for d in snap.databases() if d.name == "d")
        assert [k for k, _ in snap.entries(db, "s")] == sorted(keys)
    finally:
        snap.close()
    storage.delete("d", "s", "a\x00", allow_all)
    assert get(storage, "d", "s", "a\x00") is None and get(storage, "d", "s", "a") == {"g": 1, "k": "a"}


def test_a_group_applies_each_write_alone_in_order_in_one_commit(storage: Storage) -> None:
    storage.create_database("d", None)
    load(storage, "d", "s", {"old": {"e": "a"}, "gone": {"e": "a"}, "back": {"e": "a"}})
    load(storage, "d", "plain", {"p": 1})
    storage.create_index("d", "s", IndexDef("e", "e"), allow_all)
    at = storage.sequence()

    def refuse(stored: Any) -> None:
        raise PermissionError("no")

    writes: list[Callable[[], Any]] = [
        lambda: put(storage, "d", "s", "new", {"e": "a"}),
        lambda: put(storage, "d", "s", "old", {"e": "b"}),  # replaced: moves in the index
        lambda: storage.delete("d", "s", "gone", allow_all),
        lambda: storage.delete("d", "s", "never", allow_all),  # fails alone
        lambda: put(storage, "d", "s", "brief", {"e": "a"}),
        lambda: storage.delete("d", "s", "brief", allow_all),  # what the group itself put
        lambda: storage.delete("d", "s", "brief", allow_all),  # and now it is gone
        lambda: storage.delete("d", "s", "back", allow_all),
        lambda: put(storage, "d", "s", "back", {"e": "c"}),
        lambda: put(storage, "d", "s", "old", {"e": "b", "n": 2}),  # the same key twice: the last wins
        lambda: put(storage, "d", "plain", "p", 2),
        lambda: put(storage, "d", "fresh", "f", 1),  # creates the set
        lambda: put(storage, "d", "fresh", "g", 2),
        lambda: put(storage, "nope", "s", "k", 1),
        lambda: storage.put("d", "s", "refused", 1, b"1", refuse),
        lambda: storage.batch("d", "s", [Put("b1", {"e": "a"}, b'{"e":"a"}'), Delete("missing")], allow_all),
        lambda: storage.batch("d", "s", [Put("b2", {"e": "a"}, b'{"e":"a"}'), Delete("new")], allow_all),
    ]
    storage.begin_group()
    for write in writes:
        write()
    assert storage.queued_writes() == len(writes)
    results = storage.end_group()
    failed = {i: type(r) for i, r in enumerate(results) if r is not None}
    assert failed == {3: KeyNotFound, 6: KeyNotFound, 13: DatabaseNotFound, 14: PermissionError, 15: BatchKeyNotFound}
    assert storage.sequence() == at + 1  # one commit for the group
    assert get(storage, "d", "s", "old") == {"e": "b", "n": 2}
    assert [get(storage, "d", "s", k) for k in ("gone", "brief", "never", "b1", "new")] == [None] * 5
    assert get(storage, "d", "s", "back") == {"e": "c"} and get(storage, "d", "s", "b2") == {"e": "a"}
    assert get(storage, "d", "plain", "p") == 2 and get(storage, "d", "fresh", "g") == 2
    assert lookup(storage, "d", "s", "e", "a") == ["b2"]
    assert lookup(storage, "d", "s", "e", "b") == ["old"] and lookup(storage, "d", "s", "e", "c") == ["back"]
    with storage.read() as view:
        assert view.key_counts() == {"d": 6}  # old, back, b2 · p · f, g
        assert set(view.database("d").sets) == {"s", "plain", "fresh"}


def test_writes_of_a_group_see_the_catalog_changes_of_the_writes_before_them(storage: Storage) -> None:
    storage.create_database("d", None)
    storage.create_database("gone", None)
    put(storage, "d", "s", "a", {"e": "x"})
    storage.create_index("d", "s", IndexDef("e", "e"), allow_all)
    storage.begin_group()
    put(storage, "gone", "s", "k", 1)
    storage.drop_database("gone", allow_all)
    put(storage, "gone", "s", "k", 2)  # the database the group dropped
    put(storage, "d", "s", "b", {"e": "x"})
    storage.create_set("d", "t", allow_all)
    put(storage, "d", "t", "c", {"e": "x"})  # into the set the group made
    put(storage, "d", "new", "n1", 1)  # creates the set
    put(storage, "d", "new", "n2", 2)  # and finds it
    storage.create_database("gone", {"username": "u", "hash": "h"})
    put(storage, "gone", "s", "k", 3)  # the database the group made anew

    def refuse(stored: Any) -> None:
        raise PermissionError(stored)

    storage.put("gone", "s", "k", 4, b"4", refuse)
    results = storage.end_group()
    assert [type(r) if r else None for r in results] == [
        None, None, DatabaseNotFound, None, None, None, None, None, None, None, PermissionError]
    assert lookup(storage, "d", "s", "e", "x") == ["a", "b"]
    assert get(storage, "d", "t", "c") == {"e": "x"} and get(storage, "gone", "s", "k") == 3
    assert [get(storage, "d", "new", k) for k in ("n1", "n2")] == [1, 2]
    with storage.read() as view:
        assert view.key_counts() == {"d": 5, "gone": 1}



def test_batch_is_all_or_nothing(storage: Storage) -> None:
    storage.create_database("d", None)
    put(storage, "d", "s", "a", {"e": "x"})
    storage.create_index("d", "s", IndexDef("e", "e"), allow_all)
    ops = [Put("b", {"e": "x"}, b'{"e":"x"}'), Delete("a"), Delete("zzz"), Put("c", 1, b"1")]
    with pytest.raises(BatchKeyNotFound) as exc:
        storage.batch("d", "s", ops, allow_all)
    assert exc.value.position == 2
    assert get(storage, "d", "s", "a") == {"e": "x"} and get(storage, "d", "s", "b") is None
    assert lookup(storage, "d", "s", "e", "x") == ["a"]
    assert storage.batch("d", "s", [*ops[:2], ops[3]], allow_all) == 3
    assert lookup(storage, "d", "s", "e", "x") == ["b"]
    assert get(storage, "d", "s", "c") == 1
    with pytest.raises(BatchKeyNotFound):
        storage.batch("d", "new", [Delete("k")], allow_all)
    assert storage.batch("d", "s", [], allow_all) == 0


def test_an_empty_batch_still_needs_its_database_and_access(storage: Storage) -> None:
    def refuse(stored: Any) -> None:
        raise PermissionError(stored)

    with pytest.raises(DatabaseNotFound):
        storage.batch("nope", "s", [], allow_all)
    storage.create_database("d", {"username": "alice", "hash": "h"})
    with pytest.raises(PermissionError):
        storage.batch("d", "s", [], refuse)
    assert storage.batch("d", "s", [], allow_all) == 0


def test_a_batch_leaves_what_its_operations_one_by_one_leave(storage: Storage) -> None:
    """Random batches (distinct puts only, which an engine may write in bulk, or puts and
    deletes that repeat keys) against the same operations as single writes: the same values,
    matches, pages and counts after every batch."""
    rnd = random.Random(8)
    keys = [f"k{i}" for i in range(40)] + ["é" * 300, "x" * 500, "y" * 480]
    values = [{"e": "x", "n": 1}, {"e": "y", "n": 2.5}, {"e": "x"}, {"e": "z", "n": "a"}, {"n": 3},
              {"e": 30, "n": None}, {"e": None}, 5, "x", [1], {"e": "y", "n": True}]
    for db in ("batched", "single"):
        storage.create_database(db, None)
        storage.create_set(db, "s", allow_all)
        storage.create_index(db, "s", IndexDef("e", "e"), allow_all)
        storage.create_index(db, "s", IndexDef("by_n", "e", SORTABLE, ("n",)), allow_all)
    present: set[str] = set()
    for round_ in range(30):
        ops: list[Put | Delete] = []
        if round_ % 2 == 0:
            for key in rnd.sample(keys, rnd.randint(1, 25)):
                value = rnd.choice(values)
                ops.append(Put(key, value, orjson.dumps(value)))
                present.add(key)
        else:
            for _ in range(rnd.randint(1, 25)):
                if present and rnd.random() < 0.3:
                    key = rnd.choice(sorted(present))
                    ops.append(Delete(key))
                    present.discard(key)
                else:
                    key, value = rnd.choice(keys), rnd.choice(values)
                    ops.append(Put(key, value, orjson.dumps(value)))
                    present.add(key)
        assert storage.batch("batched", "s", ops, allow_all) == len(ops)
        for op in ops:
            if isinstance(op, Put):
                storage.put("single", "s", op.key, op.value, op.raw, allow_all)
            else:
                storage.delete("single", "s", op.key, allow_all)
        for key in keys:
            assert get(storage, "batched", "s", key) == get(storage, "single", "s", key), key
        for text in ("x", "y", "z", "30", "null"):
            assert lookup(storage, "batched", "s", "e", text) == lookup(storage, "single", "s", "e", text)
            for desc in (False, True):
                assert (page(storage, "by_n", text, [("n", desc)], db="batched")
                        == page(storage, "by_n", text, [("n", desc)], db="single"))
        with storage.read() as view:
            counts = view.key_counts()
        assert counts["batched"] == counts["single"] == len(present)


# ------------------------------------------------------------------ indexes


def test_basic_index_follows_every_write(storage: Storage) -> None:
    storage.create_database("d", None)
    load(storage, "d", "s", {
        "a": {"age": 30}, "b": {"age": 30.0}, "c": {"age": "30"}, "d": {"age": True},
        "e": {"age": None}, "f": {"other": 1}, "g": [1], "h": {"age": [1, {"x": 2}]}, "i": {"age": 1.5},
    })
    storage.create_index("d", "s", IndexDef("age", "age"), allow_all)
    assert lookup(storage, "d", "s", "age", "30") == ["a", "b", "c"]
    assert lookup(storage, "d", "s", "age", "true") == ["d"]
    assert lookup(storage, "d", "s", "age", "null") == ["e"]
    assert lookup(storage, "d", "s", "age", "1.5") == ["i"]
    assert lookup(storage, "d", "s", "age", '[1,{"x":2}]') == ["h"]
    put(storage, "d", "s", "a", {"age": 31})
    put(storage, "d", "s", "f", {"age": 30})
    storage.delete("d", "s", "b", allow_all)
    assert lookup(storage, "d", "s", "age", "30") == ["c", "f"]
    assert lookup(storage, "d", "s", "age", "31") == ["a"]
    put(storage, "d", "s", "a", "not an object")
    assert lookup(storage, "d", "s", "age", "31") == []
    with pytest.raises(IndexExists):
        storage.create_index("d", "s", IndexDef("age", "other"), allow_all)
    with pytest.raises(SetNotFound):
        storage.create_index("d", "nope", IndexDef("x", "x"), allow_all)
    storage.drop_index("d", "s", "age", allow_all)
    with pytest.raises(IndexNotFound):
        lookup(storage, "d", "s", "age", "30")
    with pytest.raises(IndexNotFound):
        storage.drop_index("d", "s", "age", allow_all)
    storage.create_index("d", "s", IndexDef("age", "age"), allow_all)  # a new one, filled afresh
    assert lookup(storage, "d", "s", "age", "30") == ["c", "f"]


def test_long_texts_match_exactly(storage: Storage) -> None:
    storage.create_database("d", None)
    long_a, long_b = "x" * 500 + "a", "x" * 500 + "b"
    load(storage, "d", "s", {"1": {"f": long_a}, "2": {"f": long_b}, "3": {"f": long_a}})
    storage.create_index("d", "s", IndexDef("f", "f"), allow_all)
    assert lookup(storage, "d", "s", "f", long_a) == ["1", "3"]
    assert lookup(storage, "d", "s", "f", long_b) == ["2"]
    assert lookup(storage, "d", "s", "f", "x" * 500) == []


SORT_VALUES: dict[str, Any] = {
    "m1": None, "m2": False, "m3": True, "m4": -1e300, "m5": -2, "m6": 0, "m7": 0.5, "m8": 3,
    "m9": 10, "m10": "", "m11": "A", "m12": "B", "m13": "a", "m14": "é", "m15": "😀", "m16": [1], "m17": {"a": 1},
}


def test_sorting_rules(storage: Storage) -> None:
    """null < booleans < numbers < strings (code point) < arrays and objects; missing last."""
    storage.create_database("d", None)
    items = {k: {"g": "x", "v": v} for k, v in SORT_VALUES.items()}
    items["z1"] = {"g": "x"}
    items["z0"] = {"g": "x"}
    items["other"] = {"g": "y", "v": 1}
    load(storage, "d", "s", items)
    storage.create_index("d", "s", IndexDef("by", "g", SORTABLE, ("v",)), allow_all)
    ascending = [*SORT_VALUES]
    assert page(storage, "by", "x", [("v", False)]) == (19, [*ascending, "z0", "z1"])
    assert page(storage, "by", "x", [("v", True)]) == (19, [*reversed(ascending), "z0", "z1"])
    assert page(storage, "by", "x", [("v", False)], offset=5, limit=3) == (19, ascending[5:8])
    assert page(storage, "by", "x", [("v", True)], offset=16, limit=10) == (19, ["m1", "z0", "z1"])
    assert page(storage, "by", "x", [("v", False)], offset=19) == (19, [])
    assert page(storage, "by", "nothing", [("v", False)]) == (0, [])


def test_ties_by_key_and_multi_field_order(storage: Storage) -> None:
    storage.create_database("d", None)
    rows = {f"k{i:02d}": {"dept": "eng" if i % 3 else "ops", "year": 2000 + i % 4, "name": f"n{i % 5}"}
            for i in range(40)}
    rows["k99"] = {"dept": "eng", "name": "n0"}  # no year: last in both orders
    load(storage, "d", "s", rows)
    storage.create_index("d", "s", IndexDef("by", "dept", SORTABLE, ("year", "name")), allow_all)
    eng = {k: v for k, v in rows.items() if v["dept"] == "eng"}

    def expected(order: list[tuple[str, bool]]) -> list[str]:
        keys = sorted(eng)
        for f, desc in reversed(order):
            present = [k for k in keys if f in eng[k]]
            absent = [k for k in keys if f not in eng[k]]
            present.sort(key=lambda k: eng[k][f], reverse=desc)
            keys = present + absent
        return keys

    for order in ([("year", True)], [("year", False)], [("name", True)], [("year", True), ("name", False)],
                  [("year", False), ("name", True)], [("name", False), ("year", True)]):
        want = expected(order)
        assert page(storage, "by", "eng", order, limit=1000) == (len(eng), want), order
        for offset in (0, 3, 10, 25):
            assert page(storage, "by", "eng", order, offset, 4)[1] == want[offset : offset + 4], (order, offset)


def test_long_sort_values_and_keys_keep_exact_order(storage: Storage) -> None:
    storage.create_database("d", None)
    prefix = "p" * 150
    rows = {"a": prefix + "c", "b": prefix + "a", "c": prefix + "b", "d": prefix, "e": "p" * 149 + "z"}
    items: dict[str, Any] = {k: {"g": 1, "v": v} for k, v in rows.items()}
    long_key_1, long_key_2 = "k" * 300 + "2", "k" * 300 + "1"
    items[long_key_1] = {"g": 1, "v": prefix + "a"}
    items[long_key_2] = {"g": 1, "v": prefix + "a"}
    load(storage, "d", "s", items)
    storage.create_index("d", "s", IndexDef("by", "g", SORTABLE, ("v",)), allow_all)
    want = sorted(items, key=lambda k: (items[k]["v"], k))
    assert page(storage, "by", "1", [("v", False)]) == (7, want)
    desc = sorted(items, key=lambda k: k)
    desc.sort(key=lambda k: items[k]["v"], reverse=True)
    assert page(storage, "by", "1", [("v", True)]) == (7, desc)


def test_sortable_index_follows_writes(storage: Storage) -> None:
    storage.create_database("d", None)
    storage.create_set("d", "s", allow_all)
    storage.create_index("d", "s", IndexDef("by", "g", SORTABLE, ("n",)), allow_all)
    put(storage, "d", "s", "a", {"g": "x", "n": 2})
    put(storage, "d", "s", "b", {"g": "x", "n": 1})
    assert page(storage, "by", "x", [("n", False)]) == (2, ["b", "a"])
    put(storage, "d", "s", "b", {"g": "y", "n": 1})
    put(storage, "d", "s", "a", {"g": "x", "n": 0})
    assert page(storage, "by", "x", [("n", False)]) == (1, ["a"])
    assert page(storage, "by", "y", [("n", False)]) == (1, ["b"])
    assert lookup(storage, "d", "s", "by", "x") == ["a"]
    storage.delete("d", "s", "a", allow_all)
    assert page(storage, "by", "x", [("n", False)]) == (0, [])


def test_an_index_is_invisible_until_built_and_exact_under_concurrent_writes(storage: Storage) -> None:
    storage.create_database("d", None)
    n = 30_000
    load(storage, "d", "s", {f"k{i:06d}": {"e": f"v{i % 100}", "i": i} for i in range(n)})
    done = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def writer() -> None:
        i = 0
        while not done.is_set():
            key = f"k{(i * 7919) % n:06d}"
            put(storage, "d", "s", key, {"e": "moved", "i": i})
            i += 1

    def reader() -> None:
        while not done.is_set():
            try:
                seen.append(len(lookup(storage, "d", "s", "e", "v1")))
            except IndexNotFound:
                seen.append(-1)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    try:
        storage.create_index("d", "s", IndexDef("e", "e"), allow_all)
    finally:
        done.set()
        for t in threads:
            t.join()
    assert not errors
    keys = [f"k{i:06d}" for i in range(n)]
    values = dict(zip(keys, (orjson.loads(raw or b"null") for raw in storage.fetch([Get("d", "s", k, allow_all) for k in keys])),
                      strict=True))
    want = {"moved": sorted(k for k, v in values.items() if v["e"] == "moved"),
            "v1": sorted(k for k, v in values.items() if v["e"] == "v1")}
    assert want["moved"], "the writer ran during the build"
    assert lookup(storage, "d", "s", "e", "moved") == want["moved"]
    assert lookup(storage, "d", "s", "e", "v1") == want["v1"]
    assert -1 in seen or not seen  # queries before the build ended found no index at all
    done.clear()
    moving = threading.Thread(target=writer)
    moving.start()
    try:  # a sortable index too: its counts (a page's total) stay exact
        storage.create_index("d", "s", IndexDef("by", "e", SORTABLE, ("i",)), allow_all)
    finally:
        done.set()
        moving.join()
    values = dict(zip(keys, (orjson.loads(raw or b"null") for raw in storage.fetch([Get("d", "s", k, allow_all) for k in keys])),
                      strict=True))
    moved = sorted((v["i"], k) for k, v in values.items() if v["e"] == "moved")
    assert page(storage, "by", "moved", [("i", False)], limit=len(moved) + 1) == (len(moved), [k for _, k in moved])
    assert page(storage, "by", "v2", [("i", False)])[0] == sum(1 for v in values.values() if v["e"] == "v2")


# ------------------------------------------------------------------ snapshots, restores, changes


def test_snapshot_is_one_instant_while_writes_go_on(storage: Storage) -> None:
    storage.create_database("d", None)
    load(storage, "d", "s", {f"k{i}": i for i in range(100)})
    snap = storage.snapshot()
    try:
        at = snap.sequence()
        put(storage, "d", "s", "k1", "changed")
        storage.create_database("later", None)
        storage.drop_database("d", allow_all)
        dbs = snap.databases()
        assert [d.name for d in dbs] == ["d"]
        entries = dict(snap.entries(dbs[0], "s"))
        assert len(entries) == 100 and entries["k1"] == b"1"
        assert list(entries) == sorted(entries)
        assert storage.sequence() == at + 3
    finally:
        snap.close()


def test_restore_is_invisible_until_commit_and_atomic(storage: Storage) -> None:
    storage.create_database("keep", None)
    storage.create_database("old", None)
    put(storage, "old", "s", "k", "old")
    w = storage.restore_writer()
    db = w.add_database()
    db.name = "old"
    w.add_index(db, "s", IndexDef("e", "e"))
    w.write(db, "s", [("a", {"e": 1}, b'{"e":1}'), ("b", {"e": 2}, b'{"e":2}')])
    w.add_index(db, "s", IndexDef("late", "e", SORTABLE, ("e",)))  # after its entries
    with pytest.raises(ValueError):
        w.add_index(db, "s", IndexDef("e", "x"))
    before = storage.read()
    with before as view:
        assert get(storage, "old", "s", "k") == "old"
        w.commit(replace_all=False)
        assert view.key_counts() == {"keep": 0, "old": 1}  # a view keeps its instant
        assert not view.database("old").sets["s"].indexes
    assert get(storage, "old", "s", "k") is None
    assert lookup(storage, "old", "s", "e", "2") == ["b"]
    assert page(storage, "late", "1", [("e", False)], db="old") == (1, ["a"])
    with storage.read() as view:
        assert sorted(view.database_names()) == ["keep", "old"]
    w = storage.restore_writer()
    db = w.add_database()
    db.name = "only"
    w.write(db, "s", [("k", 1, b"1")])
    with pytest.raises(PermissionError):
        w.commit(replace_all=True, check=lambda d: (_ for _ in ()).throw(PermissionError(d.name)))
    with storage.read() as view:
        assert sorted(view.database_names()) == ["keep", "old"]  # the refused swap changed nothing
    w.commit(replace_all=True)
    with storage.read() as view:
        assert view.database_names() == ["only"]


def test_a_restore_that_repeats_keys_keeps_the_last_value(storage: Storage) -> None:
    """A backup is JSON: a key given twice keeps its last value, in one write of entries or
    across writes, and the indexes and counts follow the value kept."""
    w = storage.restore_writer()
    db = w.add_database()
    db.name = "d"
    w.add_index(db, "s", IndexDef("e", "e"))
    w.add_index(db, "s", IndexDef("by_n", "e", SORTABLE, ("n",)))
    a, b = {"e": "a", "n": 1}, {"e": "b", "n": 2}
    w.write(db, "s", [(f"k{i}", a, orjson.dumps(a)) for i in range(50)])
    w.write(db, "s", [("k1", b, orjson.dumps(b)), ("new", a, orjson.dumps(a)), ("k2", b, orjson.dumps(b)),
                      ("k2", a, orjson.dumps(a)), ("k3", b, orjson.dumps(b))])
    w.write(db, "s", [("k3", a, orjson.dumps(a)), ("x" * 600, b, orjson.dumps(b)), ("x" * 600, a, orjson.dumps(a))])
    w.commit(replace_all=True)
    assert get(storage, "d", "s", "k1") == b and get(storage, "d", "s", "k2") == a and get(storage, "d", "s", "k3") == a
    assert get(storage, "d", "s", "x" * 600) == a
    assert lookup(storage, "d", "s", "e", "b") == ["k1"]
    assert page(storage, "by_n", "b", [("n", False)]) == (1, ["k1"])
    assert page(storage, "by_n", "a", [("n", False)], limit=1000)[0] == 51  # k0-k49 but k1, new, x…
    with storage.read() as view:
        assert view.key_counts() == {"d": 52}


def test_an_aborted_restore_leaves_nothing(storage: Storage) -> None:
    storage.create_database("d", None)
    w = storage.restore_writer()
    db = w.add_database()
    db.name = "d"
    w.write(db, "s", [(f"k{i}", i, b"%d" % i) for i in range(1000)])
    w.abort()
    while storage.maintain():
        pass
    with storage.read() as view:
        assert view.database("d").sets == {}
        assert view.key_counts() == {"d": 0}


def test_changes_replayed_on_a_staged_restore(storage: Storage) -> None:
    """Deletes, index drops and removed databases on staged data, as a point-in-time replay
    applies them: the swap shows exactly the replayed state, indexes and counts included."""
    storage.create_database("live", None)
    w = storage.restore_writer()
    db = w.add_database()
    db.name = "d"
    w.add_index(db, "s", IndexDef("e", "e"))
    w.add_index(db, "s", IndexDef("srt", "e", SORTABLE, ("n",)))
    w.add_index(db, "s", IndexDef("kept", "e"))
    w.write(db, "s", [(f"k{i}", {"e": i % 2, "n": i}, orjson.dumps({"e": i % 2, "n": i})) for i in range(6)])
    w.delete(db, "s", ["k0", "k3", "missing"])
    w.write(db, "s", [("k1", {"e": 0, "n": 9}, b'{"e":0,"n":9}')])  # a replaced value moves in the indexes
    w.drop_index(db, "s", "e")
    w.delete(db, "nothing", ["x"])  # a set never staged: nothing to do
    gone = w.add_database()
    gone.name = "gone"
    w.write(gone, "s", [("a", 1, b"1")])
    w.remove_database(gone)
    w.commit(replace_all=True)
    while storage.maintain():
        pass
    with storage.read() as view:
        assert view.database_names() == ["d"]
        d = view.database("d")
        assert set(d.sets["s"].indexes) == {"srt", "kept"}
        assert view.key_counts() == {"d": 4}
    assert lookup(storage, "d", "s", "kept", "0") == ["k1", "k2", "k4"]
    assert lookup(storage, "d", "s", "kept", "1") == ["k5"]
    assert storage.fetch([Get("d", "s", "k0", allow_all), Get("d", "s", "k1", allow_all)]) == [None, b'{"e":0,"n":9}']
    assert page(storage, "srt", "0", [("n", False)]) == (3, ["k2", "k4", "k1"])
    assert page(storage, "srt", "1", [("n", True)]) == (1, ["k5"])
    with pytest.raises(IndexNotFound):
        lookup(storage, "d", "s", "e", "0")


def test_change_sequence_and_retention(storage: Storage) -> None:
    start = storage.sequence()
    storage.create_database("d", None)
    assert storage.sequence() == start + 1
    assert storage.changes(start, 100) == []  # nobody retains changes yet
    acked = storage.retain_changes("backup")
    assert acked == start + 1
    put(storage, "d", "s", "k", {"a": 1})
    storage.batch("d", "s", [Put("k2", 2, b"2"), Delete("k")], allow_all)
    storage.create_index("d", "s", IndexDef("a", "a"), allow_all)
    storage.drop_database("d", allow_all)
    changes = storage.changes(acked, 100)
    assert [c.sequence for c in changes] == list(range(acked + 1, acked + 1 + len(changes)))
    ops = [op for c in changes for op in c.ops]
    assert ops == [
        ("create_set", "d", "s"), ("put", "d", "s", "k", b'{"a":1}'),
        ("put", "d", "s", "k2", b"2"), ("delete", "d", "s", "k"),
        ("create_index", "d", "s", IndexDef("a", "a")),
        ("drop_database", "d"),
    ]
    assert all(c.time > 0 for c in changes)
    storage.acknowledge("backup", changes[1].sequence)
    storage.maintain()
    assert [c.sequence for c in storage.changes(0, 100)] == [c.sequence for c in changes[2:]]
    storage.release_changes("backup")
    storage.maintain()
    assert storage.changes(0, 100) == []


def test_everything_survives_a_reopen(storage: Storage, reopen: Callable[[], Storage]) -> None:
    storage.create_database("d", {"username": "u", "hash": "h"})
    load(storage, "d", "s", {f"k{i}": {"g": i % 2, "n": i} for i in range(50)})
    storage.create_index("d", "s", IndexDef("g", "g"), allow_all)
    storage.create_index("d", "s", IndexDef("by", "g", SORTABLE, ("n",)), allow_all)
    seq = storage.sequence()
    storage.close()
    again = reopen()
    try:
        assert again.sequence() == seq
        assert len(lookup(again, "d", "s", "g", "1")) == 25
        assert page(again, "by", "0", [("n", True)], limit=2) == (25, ["k48", "k46"])
        with again.read() as view:
            assert view.key_counts() == {"d": 50}
    finally:
        again.close()


def test_every_offset_of_a_page_agrees_with_the_rules(storage: Storage) -> None:
    """Many ties, missing values and mixed types: each page equals the same slice of the
    whole order, at every offset, in both directions."""
    import random

    rng = random.Random(7)
    choices: list[Any] = [None, True, False, 1, 2, 2.5, "a", "b", "é" * 60, [1], {"k": 1}]
    rows: dict[str, Any] = {}
    for _ in range(300):
        v: dict[str, Any] = {"g": "x"}
        if rng.random() < 0.85:
            v["v"] = rng.choice(choices)
        rows[f"k{rng.randrange(10**6):06d}"] = v
    storage.create_database("d", None)
    load(storage, "d", "s", rows)
    storage.create_index("d", "s", IndexDef("by", "g", SORTABLE, ("v",)), allow_all)
    from fuckbase.storage.values import sort_rank

    for desc in (False, True):
        present = sorted(k for k in rows if "v" in rows[k])
        present.sort(key=lambda k: sort_rank(rows[k]["v"]), reverse=desc)
        want = present + sorted(k for k in rows if "v" not in rows[k])
        for offset in range(0, len(rows) + 2, 3):
            assert page(storage, "by", "x", [("v", desc)], offset, 7) == (len(rows), want[offset : offset + 7]), (desc, offset)


def test_housekeeping_during_a_restore_keeps_what_is_staged(storage: Storage, reopen: Callable[[], Storage]) -> None:
    """Reclaiming runs while a restore stages (the job process does both): it must leave the
    staged data alone; only a restore given up (abort, or a crash) is reclaimed."""
    storage.create_database("d", None)
    w = storage.restore_writer()
    db = w.add_database()
    db.name = "d"
    w.add_index(db, "s", IndexDef("e", "e"))
    for chunk in range(5):
        w.write(db, "s", [(f"k{chunk}-{i}", {"e": i % 3}, b'{"e":%d}' % (i % 3)) for i in range(500)])
        while storage.maintain():
            pass
    w.commit(replace_all=False)
    with storage.read() as view:
        assert view.key_counts() == {"d": 2500}
    assert len(lookup(storage, "d", "s", "e", "1")) == 5 * 167  # i % 3 == 1 for 167 of 500
    crashed = storage.restore_writer()  # staged, then the process "dies": nothing commits or aborts
    staged = crashed.add_database()
    staged.name = "d"
    crashed.write(staged, "s", [("lost", 1, b"1")])
    storage.close()
    again = reopen()
    try:
        while again.maintain():
            pass
        with again.read() as view:
            assert view.key_counts() == {"d": 2500}
        assert get(again, "d", "s", "lost") is None
    finally:
        again.close()


def test_a_restore_keeps_keys_and_values_with_every_character(storage: Storage) -> None:
    """Backslashes, tabs, newlines, carriage returns and NULs in keys and values come back as
    they went in, and are found by their indexes: basic and sortable ones, defined before the
    entries, after them (built at the commit) and once restored (built by create_index)."""
    keys = ["plain", "back\\slash", "tab\there", "new\nline", "carriage\rreturn", "nul\x00key", "all\\\t\n\r\x00\x01"]
    w = storage.restore_writer()
    db = w.add_database()
    db.name = "d"
    w.add_index(db, "s", IndexDef("e", "e"))
    w.add_index(db, "s", IndexDef("by", "g", SORTABLE, ("e",)))
    raws = {k: orjson.dumps({"e": k, "g": 1, "pad": "\\\t"}) + b"\n\t " for k in keys}  # JSON whitespace around it too
    w.write(db, "s", [(k, orjson.loads(raw), raw) for k, raw in raws.items()])
    w.add_index(db, "s", IndexDef("later", "e"))
    w.add_index(db, "s", IndexDef("later_by", "g", SORTABLE, ("e",)))
    w.commit(replace_all=False)
    storage.create_index("d", "s", IndexDef("built", "e"), allow_all)
    storage.create_index("d", "s", IndexDef("built_by", "g", SORTABLE, ("e",)), allow_all)
    for k, raw in raws.items():
        assert fetched(storage, Get("d", "s", k, allow_all)) == raw
        for index in ("e", "later", "built"):
            assert lookup(storage, "d", "s", index, k) == [k]
    for index in ("by", "later_by", "built_by"):
        assert page(storage, index, "1", [("e", False)]) == (len(keys), sorted(keys))


def test_values_holding_nul_through_every_write_path(storage: Storage) -> None:
    """U+0000 in strings and object keys is valid JSON, which PostgreSQL's text cannot hold:
    a put, a batch, a restore and a snapshot keep such values as they are."""
    value = {"\x00": "a\x00b", "tag": "t\x00"}
    storage.create_database("d", None)
    storage.create_set("d", "s", allow_all)
    storage.create_index("d", "s", IndexDef("tag", "tag"), allow_all)
    put(storage, "d", "s", "put", value)
    load(storage, "d", "s", {"batch": value})
    w = storage.restore_writer()
    db = w.add_database()
    db.name = "r"
    w.add_index(db, "s", IndexDef("tag", "tag"))
    w.write(db, "s", [("restored", value, orjson.dumps(value))])
    w.commit(replace_all=False)
    assert get(storage, "d", "s", "put") == get(storage, "d", "s", "batch") == get(storage, "r", "s", "restored") == value
    assert sorted(lookup(storage, "d", "s", "tag", "t\x00")) == ["batch", "put"]
    assert lookup(storage, "r", "s", "tag", "t\x00") == ["restored"]
    snap = storage.snapshot()
    try:
        restored = next(d for d in snap.databases() if d.name == "r")
        entries = {k: orjson.loads(v) for k, v in snap.entries(restored, "s")}
    finally:
        snap.close()
    assert entries == {"restored": value}
