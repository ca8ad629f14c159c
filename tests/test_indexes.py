"""Index unit tests: pages equal a brute-force sort of the same entries, whatever the updates."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from fuckbase.indexes import (
    SORTABLE,
    BasicIndex,
    IndexDef,
    SortableIndex,
    match_text,
    sort_key,
)

field_values = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.sampled_from([1.5, -0.5, 2.0]), st.sampled_from(["a", "b", "B", "aa", ""])
)
maybe = st.one_of(st.just("<missing>"), field_values)
docs = st.fixed_dictionaries({"p": st.sampled_from(["x", "y"]), "s1": maybe, "s2": maybe}).map(
    lambda d: {k: v for k, v in d.items() if v != "<missing>"}
)
ops = st.lists(st.tuples(st.sampled_from([f"k{i}" for i in range(12)]), st.one_of(st.none(), docs)), max_size=60)


def replay(idx: BasicIndex | SortableIndex, ops: list[tuple[str, Any]]) -> dict[str, Any]:
    """Applies puts (doc) and deletes (None) to the index; returns the resulting data."""
    state: dict[str, Any] = {}
    for key, doc in ops:
        idx.update(key, state.get(key), doc)
        if doc is None:
            state.pop(key, None)
        else:
            state[key] = doc
    return state


def reference(state: dict[str, Any], text: str, order: list[tuple[str, bool]]) -> list[str]:
    keys = sorted(k for k, v in state.items() if match_text(v["p"]) == text)
    for field, desc in reversed(order):
        present = [k for k in keys if field in state[k]]
        missing = [k for k in keys if field not in state[k]]
        present.sort(key=lambda k: sort_key(state[k][field]), reverse=desc)
        keys = present + missing
    return keys


@settings(max_examples=300, deadline=None)
@given(
    ops=ops,
    order=st.lists(st.tuples(st.sampled_from(["s1", "s2"]), st.booleans()), min_size=1, max_size=2, unique_by=lambda t: t[0]),
    offset=st.integers(0, 8),
    limit=st.integers(1, 8),
)
def test_sortable_pages_match_reference(ops: list[tuple[str, Any]], order: list[tuple[str, bool]], offset: int, limit: int) -> None:
    idx = SortableIndex(IndexDef("i", "p", SORTABLE, ("s1", "s2")))
    state = replay(idx, ops)
    for text in ("x", "y"):
        expected = reference(state, text, order)
        total, page = idx.page(text, order, offset, limit)
        assert total == len(expected)
        assert page == expected[offset : offset + limit]
        assert idx.lookup(text) == sorted(expected)


@settings(max_examples=200, deadline=None)
@given(ops=ops)
def test_basic_index_matches_reference(ops: list[tuple[str, Any]]) -> None:
    idx = BasicIndex(IndexDef("i", "s1"))
    state = replay(idx, ops)
    texts = {match_text(v["s1"]) for v in state.values() if "s1" in v}
    for text in texts | {"nothing"}:
        want = sorted(k for k, v in state.items() if "s1" in v and match_text(v["s1"]) == text)
        assert idx.lookup(text) == want
    assert idx.entry_count() == sum(1 for v in state.values() if "s1" in v)


def test_match_text() -> None:
    assert match_text("abc") == "abc"
    assert match_text(30) == "30"
    assert match_text(30.0) == "30"
    assert match_text(1.5) == "1.5"
    assert match_text(True) == "true" and match_text(False) == "false"
    assert match_text(None) == "null"
    assert match_text(1e300) == "1e+300"
    assert match_text({"b": 1, "a": 2}) == '{"a":2,"b":1}'


def test_reindexing_is_idempotent() -> None:
    for idx in (BasicIndex(IndexDef("i", "p")), SortableIndex(IndexDef("i", "p", SORTABLE, ("s",)))):
        doc = {"p": "x", "s": 1}
        idx.update("k", None, doc)
        idx.update("k", doc, doc)  # the build scan meeting a key a write already indexed
        assert idx.lookup("x") == ["k"]
        assert idx.entry_count() == 1
