"""How the LMDB backend lays its records out as ordered byte keys.

LMDB keys are at most 511 bytes, so anything longer (keys, indexed texts, sort values) is
stored as a prefix or digest in the key, with the full item in the record's value.

- data:    set id (8) + "k" + key            -> JSON       (keys up to INLINE_KEY_MAX bytes)
           set id (8) + "h" + sha256(key)    -> len(2) + key + JSON
- index:   index id (8) + group + key token  -> key (basic index)
           index id (8) + field number (1) + group + sort token + key token -> key (sortable)
- counts:  "s" + set id -> entries; "g" + index id + group -> entries in that group
The data layout is the one release 0.1.0 wrote, so upgrading does not rewrite the data.
"""

from __future__ import annotations

import hashlib

from fuckbase.storage.values import GROUP_INLINE_MAX, group_token

__all__ = ["GROUP_INLINE_MAX", "group_token"]  # part of this layout; its form is shared with the other backends

INLINE_KEY_MAX = 480
TOKEN_KEY_MAX = 240  # key tokens longer than this end in a digest instead

_SET_COUNT = b"s"
_GROUP_COUNT = b"g"


def id_bytes(n: int) -> bytes:
    return n.to_bytes(8, "big")


# ------------------------------------------------------------------ data


def data_key(set_prefix: bytes, key: str) -> bytes:
    kb = key.encode()
    if len(kb) <= INLINE_KEY_MAX:
        return set_prefix + b"k" + kb
    return set_prefix + b"h" + hashlib.sha256(kb).digest()


def stored_value(key: str, raw: bytes) -> bytes:
    """What the data table holds for an entry: the JSON, after the key when the key is digested."""
    kb = key.encode()
    if len(kb) <= INLINE_KEY_MAX:
        return raw
    return len(kb).to_bytes(2, "big") + kb + raw


def decode_entry(lkey: bytes, stored: bytes) -> tuple[str, bytes]:
    """(key, JSON) of one record of the data table."""
    if lkey[8:9] == b"k":
        return lkey[9:].decode(), stored
    n = int.from_bytes(stored[:2], "big")
    return stored[2 : 2 + n].decode(), stored[2 + n :]


def value_of_stored(key: str, stored: bytes | None) -> bytes | None:
    """The JSON of `key` from its data record (None when absent or a digest collision)."""
    if stored is None:
        return None
    kb = key.encode()
    if len(kb) <= INLINE_KEY_MAX:
        return stored
    n = int.from_bytes(stored[:2], "big")
    if stored[2 : 2 + n] != kb:
        return None
    return stored[2 + n :]


# ------------------------------------------------------------------ indexes


def key_token(kb: bytes) -> bytes:
    """Orders like the key itself; a long key keeps its first bytes and then a digest."""
    if len(kb) <= TOKEN_KEY_MAX:
        return kb
    return kb[:TOKEN_KEY_MAX] + hashlib.sha256(kb).digest()[:16]


def is_exact_key_token(token_length: int) -> bool:
    return token_length <= TOKEN_KEY_MAX


def set_count_key(set_prefix: bytes) -> bytes:
    return _SET_COUNT + set_prefix


def group_count_key(index_prefix: bytes, group: bytes) -> bytes:
    return _GROUP_COUNT + index_prefix + group


def count_of(raw: bytes | None) -> int:
    return int.from_bytes(raw, "big", signed=True) if raw else 0


def count_bytes(n: int) -> bytes:
    return n.to_bytes(8, "big", signed=True)
