"""The index semantics every backend shares: which text a field matches, how values sort.

Matching is on a field's value written as text (strings as they are, numbers in shortest
form, `true`/`false`, `null`). Sorting: null < booleans < numbers < strings (by code point)
< arrays and objects (by their JSON text); numbers compare as 64-bit floats, as in the
original implementation, which stores every number as one; entries lacking the field last.
"""

from __future__ import annotations

from typing import Any

import orjson

from fuckbase.contract import scalar_text

MISSING: Any = object()


def field_of(value: Any, name: str) -> Any:
    """A top-level field of an object value, or MISSING."""
    if type(value) is dict:
        return value.get(name, MISSING)
    return MISSING


def match_text(v: Any) -> str:
    """A field's value as the text `/index/query`'s "value" is compared with."""
    if isinstance(v, str | bool | int | float):
        return scalar_text(v)
    if v is None:
        return "null"
    return orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode()


def indexed_text(value: Any, name: str) -> str | None:
    """The text under which a value is found in an index on field `name`, or None."""
    if type(value) is dict and name in value:
        return match_text(value[name])
    return None


NULL_RANK, BOOL_RANK, NUMBER_RANK, STRING_RANK, COMPOSITE_RANK, MISSING_RANK = range(6)


def sort_rank(v: Any) -> tuple[int, Any]:
    """(rank, comparable) of a sort field's value; MISSING ranks last."""
    if isinstance(v, str):
        return (STRING_RANK, v)
    if v is MISSING:
        return (MISSING_RANK, 0)
    if isinstance(v, bool):
        return (BOOL_RANK, int(v))
    if isinstance(v, (int, float)):
        f = float(v)
        return (NUMBER_RANK, f if f else 0.0)  # -0.0 and 0.0 are one value
    if v is None:
        return (NULL_RANK, 0)
    return (COMPOSITE_RANK, orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode())
