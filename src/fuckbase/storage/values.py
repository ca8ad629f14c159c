"""The index semantics every backend shares: which text a field matches, how values sort.

Matching is on a field's value written as text (strings as they are, numbers in shortest
form, `true`/`false`, `null`). Sorting: null < booleans < numbers < strings (by code point)
< arrays and objects (by their JSON text); numbers compare as 64-bit floats, as in the
original implementation, which stores every number as one; entries lacking the field last.
"""

from __future__ import annotations

import hashlib
import struct
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


SORT_TEXT_MAX = 100  # sort values longer than this (as UTF-8) are compared by their first bytes
_MISSING_TOKEN = b"\xff"
_TRUNCATED_END = b"\x00\x01"
_END = b"\x00\x00"


def sort_token(v: Any) -> bytes:
    """An order-preserving, self-delimiting byte form of a sort field's value.

    Texts (strings, and arrays or objects as JSON) longer than SORT_TEXT_MAX bytes keep only
    their first bytes and end in a mark that says so; entries whose tokens are equal are put in
    exact order by comparing their full values (see `is_truncated`).
    """
    rank, c = sort_rank(v)
    if rank == STRING_RANK or rank == COMPOSITE_RANK:
        tb: bytes = c.encode()
        end = _END if len(tb) <= SORT_TEXT_MAX else _TRUNCATED_END
        head = b"\x04" if rank == STRING_RANK else b"\x05"
        return head + tb[:SORT_TEXT_MAX].replace(b"\x00", b"\x00\xff") + end
    if rank == NUMBER_RANK:
        bits: int = struct.unpack(">Q", struct.pack(">d", c))[0]
        bits = bits ^ 0xFFFFFFFFFFFFFFFF if bits >> 63 else bits | (1 << 63)
        return b"\x03" + bits.to_bytes(8, "big")
    if rank == BOOL_RANK:
        return b"\x02\x01" if c else b"\x02\x00"
    if rank == MISSING_RANK:
        return _MISSING_TOKEN
    return b"\x01"  # null


MISSING_SORT_TOKEN = _MISSING_TOKEN


def is_truncated(token: bytes) -> bool:
    return token[:1] in (b"\x04", b"\x05") and token.endswith(_TRUNCATED_END)




GROUP_INLINE_MAX = 160
_LONG_GROUP = b"\xff\xff"


def group_token(text: str) -> bytes:
    """The indexed text, length-prefixed so that one group never prefixes another."""
    tb = text.encode()
    if len(tb) <= GROUP_INLINE_MAX:
        return len(tb).to_bytes(2, "big") + tb
    return _LONG_GROUP + hashlib.sha256(tb).digest()
