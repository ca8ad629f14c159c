"""Snapshots that backups stream from, and restores staged aside and swapped in by one commit."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

from fuckbase.storage.interface import Credentials, Database, IndexDef
from fuckbase.storage.lmdb import keys as K
from fuckbase.storage.lmdb.catalog import IndexState, SetState, StoredDatabase, index_record
from fuckbase.storage.lmdb.store import STAGE_CHUNK, LmdbStorage, Writer, sequence_of

_STAGED_SET = b"S"
_STAGED_INDEX = b"I"


class LmdbSnapshot:
    """One LMDB read transaction: every database at one instant, while writes go on."""

    def __init__(self, storage: LmdbStorage) -> None:
        self._s = storage
        self._txn = storage.env.begin()
        self._closed = False

    def databases(self) -> list[Database]:
        return sorted(self._s.all_databases(self._txn), key=lambda d: d.name)

    def entries(self, db: Database, set_name: str) -> Iterator[tuple[str, bytes]]:
        prefix = cast(StoredDatabase, db).states[set_name].prefix
        cur = self._txn.cursor(db=self._s.data)
        if cur.set_range(prefix):
            for lkey, stored in cur:
                if not lkey.startswith(prefix):
                    break
                yield K.decode_entry(lkey, stored)

    def sequence(self) -> int:
        return sequence_of(self._txn, self._s.meta)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._txn.abort()


@dataclass
class _StagedSet:
    name: str
    id: int
    indexes: list[IndexState] = field(default_factory=list)
    filled: bool = False  # entries were written: a later index must scan them
    late: list[IndexState] = field(default_factory=list)

    def state(self) -> SetState:
        return SetState(self.name, self.id, tuple(self.indexes))


@dataclass
class StagedDatabase:
    name: str | None = None
    auth: Credentials | None = None
    sets: dict[str, _StagedSet] = field(default_factory=dict)


class LmdbRestoreWriter:
    """Stages under fresh set and index ids, each marked as staged from the moment it exists;
    the housekeeping leaves staged ids alone, an abort or the next start-up after a crash hands
    them to reclaiming, so a restore given up leaves nothing behind. The swap drops the marks
    and marks what it replaces for reclaiming instead."""

    def __init__(self, storage: LmdbStorage) -> None:
        self._s = storage
        self._dbs: list[StagedDatabase] = []

    def add_database(self) -> StagedDatabase:
        db = StagedDatabase()
        self._dbs.append(db)
        return db

    def _new_id(self, kind: bytes) -> int:
        def op(w: Writer) -> int:
            n = w.new_id()
            w.mark_for_reclaim(kind, K.id_bytes(n))
            return n

        return self._s.write(op, numbered=False)

    def _set(self, db: StagedDatabase, name: str) -> _StagedSet:
        st = db.sets.get(name)
        if st is None:
            st = db.sets[name] = _StagedSet(name, self._new_id(_STAGED_SET))
        return st

    def add_set(self, db: Any, name: str) -> None:
        self._set(db, name)

    def add_index(self, db: Any, set_name: str, definition: IndexDef) -> None:
        st = self._set(db, set_name)
        if any(ix.definition.name == definition.name for ix in st.indexes):
            raise ValueError(f"index {definition.name!r} appears twice for set {set_name!r}")
        ix = IndexState(definition, self._new_id(_STAGED_INDEX), ready=True)
        st.indexes.append(ix)
        if st.filled:
            st.late.append(ix)

    def write(self, db: Any, set_name: str, entries: Sequence[tuple[str, Any, bytes]]) -> None:
        st = self._set(db, set_name)
        st.filled = st.filled or bool(entries)
        state = st.state()
        for start in range(0, len(entries), STAGE_CHUNK):
            chunk = entries[start : start + STAGE_CHUNK]

            self._s.write(partial(Writer.stage, st=state, entries=chunk), numbered=False)

    def delete(self, db: Any, set_name: str, keys: Sequence[str]) -> None:
        st = db.sets.get(set_name)
        if st is None or not keys:
            return
        state = st.state()

        def op(w: Writer, chunk: Sequence[str]) -> None:
            for key in chunk:
                w.delete(state, key)

        for start in range(0, len(keys), STAGE_CHUNK):
            self._s.write(partial(op, chunk=keys[start : start + STAGE_CHUNK]), numbered=False)

    def drop_index(self, db: Any, set_name: str, name: str) -> None:
        st = db.sets.get(set_name)
        if st is None:
            return
        dropped = [ix for ix in st.indexes if ix.definition.name == name]
        st.indexes = [ix for ix in st.indexes if ix.definition.name != name]
        st.late = [ix for ix in st.late if ix.definition.name != name]
        self._s.release_staged([_STAGED_INDEX + ix.prefix for ix in dropped])

    def remove_database(self, db: Any) -> None:
        self._dbs = [d for d in self._dbs if d is not db]
        self._s.release_staged(_marks([db]))

    def _fill_late_indexes(self, st: _StagedSet) -> None:
        """Indexes whose definitions came after entries of their set: scan what is staged."""
        if not st.late:
            return
        state, late, start = st.state(), list(st.late), K.id_bytes(st.id)
        while True:
            last = self._s.write(partial(Writer.index_existing, st=state, indexes=late, start=start, limit=STAGE_CHUNK),
                                 numbered=False)
            if last is None:
                break
            start = last + b"\x00"
        st.late = []

    def commit(self, replace_all: bool, check: Callable[[Database], None] | None = None) -> None:
        names = [d.name for d in self._dbs]
        if None in names or len(set(names)) != len(names):
            raise ValueError("the backup names a database twice, or not at all")
        for db in self._dbs:
            for st in db.sets.values():
                self._fill_late_indexes(st)
        s = self._s

        def swap(w: Writer) -> None:
            if replace_all:
                replaced = s.all_databases(w.txn)
            else:
                replaced = []
                for name in names:
                    raw = w.txn.get(cast(str, name).encode(), db=s.catalog)
                    if raw is not None:
                        replaced.append(s.load_database(w.txn, cast(str, name)))
            if check is not None:  # all before any change
                for old in replaced:
                    check(old)
            for old in replaced:
                w.remove(old)
            for staged in self._dbs:
                sets: dict[str, Any] = {}
                for st in staged.sets.values():
                    w.unmark(_STAGED_SET, K.id_bytes(st.id))
                    for ix in st.indexes:
                        w.unmark(_STAGED_INDEX, ix.prefix)
                    sets[st.name] = {"id": st.id, "indexes": {ix.definition.name: index_record(ix) for ix in st.indexes}}
                auth = dict(staged.auth) if staged.auth else None
                w.save(cast(str, staged.name), {"id": w.new_id(), "auth": auth, "sets": sets})
            w.log(("restore", names, replace_all))

        s.write(swap)
        self._dbs = []

    def abort(self) -> None:
        marks = _marks(self._dbs)
        self._dbs = []
        self._s.release_staged(marks)


def _marks(dbs: list[StagedDatabase]) -> list[bytes]:
    """The staged marks of every set and index of these databases."""
    return [m for db in dbs for st in db.sets.values() for m in (
        _STAGED_SET + K.id_bytes(st.id), *(_STAGED_INDEX + ix.prefix for ix in st.indexes))]
