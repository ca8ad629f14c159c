"""The catalog as LMDB holds it: one JSON record per database, parsed once per version.

A record names the database's id (new whenever the database is created or restored), its
stored credentials, and its sets with their ids and index definitions:
`{"id", "auth", "sets": {name: {"id", "indexes": {name: {"id", "field", "kind",
"sort_fields", "ready"}}}}}`. Readers parse a record the first time they meet its exact
bytes and reuse the result afterwards, so a catalog change made by any process is seen by the
next read of every other one, and a view never mixes two versions.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from fuckbase.storage.interface import BASIC, Database, IndexDef, SetInfo
from fuckbase.storage.lmdb.keys import id_bytes, set_count_key

CACHE_MAX = 4096


@dataclass(frozen=True)
class IndexState:
    definition: IndexDef
    id: int
    ready: bool
    prefix: bytes = field(init=False)
    basic: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", id_bytes(self.id))
        object.__setattr__(self, "basic", self.definition.kind == BASIC)


@dataclass(frozen=True)
class SetState:
    name: str
    id: int
    indexes: tuple[IndexState, ...]  # every index the writes maintain, ready or being built
    prefix: bytes = field(init=False)
    count_key: bytes = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", id_bytes(self.id))
        object.__setattr__(self, "count_key", set_count_key(self.prefix))

    def index(self, name: str) -> IndexState | None:
        for ix in self.indexes:
            if ix.definition.name == name:
                return ix
        return None

    def index_by_id(self, index_id: int) -> IndexState | None:
        for ix in self.indexes:
            if ix.id == index_id:
                return ix
        return None


@dataclass(frozen=True)
class StoredDatabase(Database):
    """A Database as this backend knows it: with the ids behind its names."""

    id: int = 0
    states: Mapping[str, SetState] = field(default_factory=dict)


def index_record(ix: IndexState) -> dict[str, Any]:
    d = ix.definition
    return {"id": ix.id, "field": d.field, "kind": d.kind, "sort_fields": list(d.sort_fields), "ready": ix.ready}


def parse_record(name: str, raw: bytes) -> StoredDatabase:
    rec = orjson.loads(raw)
    states = {}
    for set_name, srec in rec["sets"].items():
        indexes = tuple(
            IndexState(
                IndexDef(iname, irec["field"], irec.get("kind", BASIC), tuple(irec.get("sort_fields") or ())),
                irec["id"],
                irec.get("ready", True),
            )
            for iname, irec in srec["indexes"].items()
        )
        states[set_name] = SetState(set_name, srec["id"], indexes)
    sets = {
        n: SetInfo(n, {ix.definition.name: ix.definition for ix in s.indexes if ix.ready})
        for n, s in states.items()
    }
    return StoredDatabase(name, rec.get("auth"), sets, rec["id"], states)


class RecordCache:
    """Parsed records by name, valid while the stored bytes are the same."""

    def __init__(self) -> None:
        self._parsed: dict[str, tuple[bytes, StoredDatabase]] = {}
        self._lock = threading.Lock()

    def get(self, name: str, raw: bytes) -> StoredDatabase:
        hit = self._parsed.get(name)
        if hit is not None and hit[0] == raw:
            return hit[1]
        db = parse_record(name, raw)
        with self._lock:
            if len(self._parsed) >= CACHE_MAX:
                self._parsed.clear()
            self._parsed[name] = (raw, db)
        return db


def new_record(db_id: int, auth: Mapping[str, str] | None) -> dict[str, Any]:
    return {"id": db_id, "auth": dict(auth) if auth else None, "sets": {}}
