"""The embedded backend: LMDB holds the catalog, the data, the indexes and their counts.

Every write is one LMDB write transaction: catalog, data, index entries, counts, the commit's
sequence number and (while a consumer retains them) its change record commit together, so
nothing is ever rebuilt at start-up. Every read is one LMDB read transaction (MVCC: it never
waits for a writer), which makes a create, drop or restore swap atomic for readers.

Several processes may open the same directory at once: LMDB serialises their writers with a
lock shared through its lock file, and each reader sees the newest commit of any process.
Commits write through pwrite (no shared writable mapping), so a full disk fails a commit with
ENOSPC instead of killing the process, and the file grows only by the pages written.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import lmdb
import orjson

from fuckbase.storage.interface import (
    AccessCheck,
    BatchKeyNotFound,
    BatchOp,
    Change,
    Credentials,
    Database,
    DatabaseExists,
    DatabaseNotFound,
    Entry,
    Figure,
    Get,
    IndexDef,
    IndexExists,
    IndexNotFound,
    KeyNotFound,
    NotFound,
    Page,
    PointRead,
    Put,
    SetExists,
    SetNotFound,
    SortOrder,
    StorageError,
    StorageFailure,
    StorageFull,
)
from fuckbase.storage.lmdb import keys as K
from fuckbase.storage.lmdb.catalog import (
    IndexState,
    RecordCache,
    SetState,
    StoredDatabase,
    index_record,
    new_record,
)
from fuckbase.storage.values import (
    MISSING,
    MISSING_SORT_TOKEN,
    field_of,
    indexed_text,
    is_truncated,
    match_text,
    sort_rank,
    sort_token,
)

if TYPE_CHECKING:
    from fuckbase.storage.lmdb.restore import LmdbRestoreWriter, LmdbSnapshot

log = logging.getLogger("fuckbase.storage")

FORMAT = b"2"
MAP_SIZE = 1 << 40  # address space only: the file grows with what is written
MAX_READERS = 1024
BUILD_CHUNK = 2048  # entries indexed per commit while an index is built (~2 ms of the write lock)
RECLAIM_CHUNK = 4096  # entries deleted per commit when dropped data is reclaimed
STAGE_CHUNK = 2048  # restored entries per commit

T = TypeVar("T")

_SEQUENCE = b"sequence"
_IDS = b"ids"
_FORMAT_KEY = b"format"
_CONSUMER = b"consumer:"
_GC_SET = b"s"
_GC_INDEX = b"i"
# ids a restore is staging under: reclaimed only once that restore is given up (its own
# abort, or the start-up of a process after a crash), never while it runs
_STAGED = {b"S": _GC_SET, b"I": _GC_INDEX}


class NotUpgraded(StorageError):
    """The directory holds an older format: open it once with `primary=True` to upgrade it."""


FULL_BELOW = 16 << 20  # free bytes under which a failed write is taken for a full disk


def _translate(exc: lmdb.Error, path: Path | None = None) -> StorageError:
    """LMDB reports a write cut short by a full disk as EIO: free space tells the two apart."""
    text = str(exc)
    full = isinstance(exc, lmdb.MapFullError) or "No space left" in text
    if not full and "Input/output error" in text and path is not None:
        try:
            st = os.statvfs(path)
            full = st.f_bavail * st.f_frsize < FULL_BELOW
        except OSError:
            pass
    if full:
        return StorageFull("the disk is full: the write was not stored")
    return StorageFailure(f"storage error: {text}")


class LmdbStorage:
    """One process's handle on an LMDB data directory. Thread-safe."""

    remote = False  # reads take microseconds: inline on the event loop beats a thread hop
    shared = False  # one node's data dir

    def __init__(self, path: Path, *, primary: bool = False, map_size: int = MAP_SIZE) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.primary = primary
        self.env = lmdb.open(
            str(path),
            map_size=map_size,
            max_dbs=16,
            max_readers=MAX_READERS,
            sync=False,
            metasync=False,
            writemap=False,
            readahead=False,
        )
        self.meta = self.env.open_db(b"meta")
        self.data = self.env.open_db(b"data")
        self.catalog = self.env.open_db(b"catalog")
        self.index = self.env.open_db(b"index")
        self.counts = self.env.open_db(b"counts")
        self.changelog = self.env.open_db(b"changes")
        self.gc = self.env.open_db(b"gc")
        self._records = RecordCache()
        self._closed = False
        self._reclaim_lock = threading.Lock()
        self._groups = threading.local()
        from fuckbase.storage.lmdb.upgrade import upgrade_if_needed

        with self.env.begin() as txn:
            fmt = txn.get(_FORMAT_KEY, db=self.meta)
        if fmt != FORMAT:
            if not primary:
                raise NotUpgraded(f"{path} is not in format {FORMAT.decode()} yet")
            upgrade_if_needed(self)
        if primary:
            self._abandon_unfinished_builds()
            self.release_staged(None)

    # ------------------------------------------------------------------ life cycle

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.env.sync(True)
            self.env.close()

    def flush(self) -> None:
        try:
            self.env.sync(True)
        except lmdb.Error as exc:
            raise _translate(exc, self.path) from exc

    # ------------------------------------------------------------------ reads

    def read(self) -> View:
        return View(self)

    def fetch(self, reads: Sequence[PointRead]) -> list[Any]:
        with View(self) as view:
            return [view.answer(r) for r in reads]

    def sequence(self) -> int:
        with self.env.begin() as txn:
            return sequence_of(txn, self.meta)

    def load_database(self, txn: lmdb.Transaction, name: str) -> StoredDatabase:
        raw = txn.get(name.encode(), db=self.catalog)
        if raw is None:
            raise DatabaseNotFound(name)
        return self._records.get(name, raw)

    def all_databases(self, txn: lmdb.Transaction) -> list[StoredDatabase]:
        return [self._records.get(k.decode(), v) for k, v in txn.cursor(db=self.catalog)]

    # ------------------------------------------------------------------ the write path

    def write(self, fn: Callable[[Writer], T], numbered: bool = True) -> T:
        """Runs `fn` in one write transaction and commits it. `fn` raises before it changes
        anything, or succeeds; a failed commit raises StorageFull or StorageFailure.
        `numbered=False` is for work no reader can tell apart (housekeeping, index fills,
        staged restores): it gets no sequence number and no change record."""
        group: _Group | None = getattr(self._groups, "open", None)
        if group is not None:
            group.queue(fn)
            return cast(T, None)  # a queued write has no result yet; group callers use none
        try:
            with self.env.begin(write=True) as txn:
                w = Writer(self, txn, numbered)
                result = fn(w)
                w.finish()
            return result
        except lmdb.Error as exc:
            raise _translate(exc, self.path) from exc

    def begin_group(self) -> None:
        """From now until `end_group`, this thread's writes are queued, not run: `end_group`
        runs them in order in one transaction that commits them all as one numbered commit (each
        write fails before it changes anything, or not at all: a refused one leaves the others
        be). For an event loop serving many clients: one commit per turn of the loop instead of
        one per write, and the write lock held only while the writes run."""
        if getattr(self._groups, "open", None) is not None:
            raise RuntimeError("a write group is already open on this thread")
        self._groups.open = _Group(self)

    def queued_writes(self) -> int:
        group: _Group | None = getattr(self._groups, "open", None)
        return len(group) if group is not None else 0

    def end_group(self) -> list[BaseException | None]:
        """Runs and commits the queued writes: per write, None or what it raised."""
        group: _Group = self._groups.open
        self._groups.open = None
        return group.end()

    def create_database(self, name: str, auth: Credentials | None) -> None:
        def op(w: Writer) -> None:
            key = name.encode()
            if w.txn.get(key, db=self.catalog) is not None:
                raise DatabaseExists(name)
            w.save(name, new_record(w.new_id(), auth))
            w.log(("create_database", name, dict(auth) if auth else None))

        self.write(op)

    def drop_database(self, name: str, check: AccessCheck) -> None:
        def op(w: Writer) -> None:
            w.remove(w.database(name, check))
            w.log(("drop_database", name))

        self.write(op)

    def create_set(self, database: str, name: str, check: AccessCheck) -> None:
        def op(w: Writer) -> None:
            db = w.database(database, check)
            if name in db.states:
                raise SetExists(name)
            w.add_set(db, name)

        self.write(op)

    def put(self, database: str, set_name: str, key: str, value: Any, raw: bytes, check: AccessCheck) -> None:
        def op(w: Writer) -> None:
            db = w.database(database, check)
            st = db.states.get(set_name) or w.add_set(db, set_name)
            w.put(st, key, value, raw)
            if w.logging:
                w.log(("put", database, set_name, key, orjson.Fragment(raw)))

        self.write(op)

    def delete(self, database: str, set_name: str, key: str, check: AccessCheck) -> None:
        def op(w: Writer) -> None:
            db = w.database(database, check)
            st = db.states.get(set_name)
            if st is None:
                raise SetNotFound(set_name)
            if not w.delete(st, key):
                raise KeyNotFound(key)
            if w.logging:
                w.log(("delete", database, set_name, key))

        self.write(op)

    def batch(self, database: str, set_name: str, ops: Sequence[BatchOp], check: AccessCheck) -> int:
        def apply(w: Writer) -> None:
            db = w.database(database, check)
            if not ops:
                return
            st = db.states.get(set_name)
            only_puts = all(type(o) is Put for o in ops)
            missing = None if only_puts else _first_missing_delete(w, st, ops)
            if missing is not None:  # refused before anything changed
                raise BatchKeyNotFound(ops[missing].key, missing)
            if st is None:
                st = w.add_set(db, set_name)
            if only_puts and len({o.key for o in ops}) == len(ops):
                w.put_many(st, sorted(cast("list[Put]", ops), key=itemgetter(0)))  # by key
            else:
                # in key order, stable: neighbouring keys share pages, and the operations on one
                # key keep their order, so the outcome is the same as one after the other
                for i in sorted(range(len(ops)), key=lambda i: ops[i].key):
                    o = ops[i]
                    if isinstance(o, Put):
                        w.put(st, o.key, o.value, o.raw)
                    else:
                        w.delete(st, o.key)
            if w.logging:  # in the order they were given
                for o in ops:
                    if isinstance(o, Put):
                        w.log(("put", database, set_name, o.key, orjson.Fragment(o.raw)))
                    else:
                        w.log(("delete", database, set_name, o.key))

        self.write(apply)
        return len(ops)

    def drop_index(self, database: str, set_name: str, name: str, check: AccessCheck) -> None:
        def op(w: Writer) -> None:
            db = w.database(database, check)
            st = db.states.get(set_name)
            if st is None:
                raise SetNotFound(set_name)
            ix = st.index(name)
            if ix is None:
                raise IndexNotFound(name)
            rec = w.record_of(db)
            del rec["sets"][set_name]["indexes"][name]
            w.save(database, rec)
            w.mark_for_reclaim(_GC_INDEX, ix.prefix)
            w.log(("drop_index", database, set_name, name))

        self.write(op)

    # ------------------------------------------------------------------ index builds

    def create_index(self, database: str, set_name: str, definition: IndexDef, check: AccessCheck) -> None:
        def define(w: Writer) -> tuple[int, int]:
            db = w.database(database, check)
            st = db.states.get(set_name)
            if st is None:
                raise SetNotFound(set_name)
            if st.index(definition.name) is not None:
                raise IndexExists(definition.name)
            ix = IndexState(definition, w.new_id(), ready=False)
            rec = w.record_of(db)
            rec["sets"][set_name]["indexes"][definition.name] = index_record(ix)
            w.save(database, rec)
            return st.id, ix.id

        set_id, index_id = self.write(define, numbered=False)
        self._fill_index(database, set_name, set_id, index_id)

        def publish(w: Writer) -> None:
            db = w.database(database, lambda _: None)
            st = db.states.get(set_name)
            ix = st.index(definition.name) if st is not None and st.id == set_id else None
            if ix is None or ix.id != index_id:
                raise IndexNotFound(definition.name, f"index {definition.name!r} was dropped while it was built")
            rec = w.record_of(db)
            rec["sets"][set_name]["indexes"][definition.name]["ready"] = True
            w.save(database, rec)
            w.log(("create_index", database, set_name, definition))

        self.write(publish)

    def _fill_index(self, database: str, set_name: str, set_id: int, index_id: int) -> None:
        """Indexes the set's existing entries a chunk per commit, in key order. Each chunk reads
        the values as committed at that moment, and writes in between keep the entries they
        touch current themselves, so the result is exact however the two interleave."""
        start = K.id_bytes(set_id)
        prefix = start
        while True:

            def chunk(w: Writer, start: bytes = start) -> bytes | None:
                db = w.database(database, lambda _: None)
                st = db.states.get(set_name)
                ix = st.index_by_id(index_id) if st is not None and st.id == set_id else None
                if st is None or ix is None:
                    raise IndexNotFound(set_name, "the index was dropped while it was built")
                return w.index_existing(st, [ix], start, BUILD_CHUNK)

            try:
                last = self.write(chunk, numbered=False)
            except DatabaseNotFound:
                raise IndexNotFound(set_name, "the database was dropped while the index was built") from None
            if last is None:
                return
            start = last + b"\x00"
            if not start.startswith(prefix):
                return
            time.sleep(0)  # let waiting writers of this process in

    def _abandon_unfinished_builds(self) -> None:
        """An index whose build died with its process never became visible: drop it."""

        def op(w: Writer) -> None:
            for db in self.all_databases(w.txn):
                rec = None
                for st in db.states.values():
                    for ix in st.indexes:
                        if not ix.ready:
                            rec = rec or w.record_of(db)
                            del rec["sets"][st.name]["indexes"][ix.definition.name]
                            w.mark_for_reclaim(_GC_INDEX, ix.prefix)
                            log.warning("dropped index %r of %s/%s: its build did not finish",
                                        ix.definition.name, db.name, st.name)
                if rec is not None:
                    w.save(db.name, rec)

        self.write(op, numbered=False)

    # ------------------------------------------------------------------ snapshots and restores

    def snapshot(self) -> LmdbSnapshot:
        from fuckbase.storage.lmdb.restore import LmdbSnapshot

        return LmdbSnapshot(self)

    def restore_writer(self) -> LmdbRestoreWriter:
        from fuckbase.storage.lmdb.restore import LmdbRestoreWriter

        return LmdbRestoreWriter(self)

    # ------------------------------------------------------------------ the change sequence

    def changes(self, after: int, limit: int) -> list[Change]:
        out = []
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.changelog)
            if cur.set_range(K.id_bytes(after + 1)):
                for k, v in cur:
                    out.append(_decode_change(int.from_bytes(k, "big"), v))
                    if len(out) >= limit:
                        break
        return out

    def retain_changes(self, consumer: str) -> int:
        def op(w: Writer) -> int:
            key = _CONSUMER + consumer.encode()
            acked = w.txn.get(key, db=self.meta)
            if acked is None:
                acked = K.id_bytes(sequence_of(w.txn, self.meta))
                w.txn.put(key, acked, db=self.meta)
            _set_logging(w.txn, self.meta, True)
            return int.from_bytes(acked, "big")

        return self.write(op, numbered=False)

    def acknowledge(self, consumer: str, sequence: int) -> None:
        def op(w: Writer) -> None:
            key = _CONSUMER + consumer.encode()
            acked = w.txn.get(key, db=self.meta)
            if acked is not None and int.from_bytes(acked, "big") < sequence:
                w.txn.put(key, K.id_bytes(sequence), db=self.meta)

        self.write(op, numbered=False)

    def release_changes(self, consumer: str) -> None:
        def op(w: Writer) -> None:
            w.txn.delete(_CONSUMER + consumer.encode(), db=self.meta)
            if not self._consumers(w.txn):
                _set_logging(w.txn, self.meta, False)

        self.write(op, numbered=False)

    def _consumers(self, txn: lmdb.Transaction) -> dict[str, int]:
        out = {}
        cur = txn.cursor(db=self.meta)
        if cur.set_range(_CONSUMER):
            for k, v in cur:
                if not k.startswith(_CONSUMER):
                    break
                out[k[len(_CONSUMER) :].decode()] = int.from_bytes(v, "big")
        return out

    # ------------------------------------------------------------------ housekeeping

    def figures(self) -> list[Figure]:
        """Nothing beyond what /metrics reports of every backend."""
        return []

    def lead(self, role: str) -> bool:
        """The primary (the job process, alone on its data dir) holds every role."""
        return self.primary

    def maintain(self) -> bool:
        """One round of housekeeping; True when more is left to do. One process calls it."""
        self.env.reader_check()
        with self._reclaim_lock:
            more = self._reclaim_some()
            more = self._trim_changes() or more
        return more

    def release_staged(self, marks: list[bytes] | None) -> None:
        """Hands staged ids over to reclaiming: `marks`, or every one (at start-up)."""

        def op(w: Writer) -> None:
            staged = marks if marks is not None else [k for k, _ in w.txn.cursor(db=self.gc) if k[:1] in _STAGED]
            for mark in staged:
                if w.txn.delete(mark, db=self.gc):
                    w.txn.put(_STAGED[mark[:1]] + mark[1:], b"", db=self.gc)

        self.write(op, numbered=False)

    def _reclaim_some(self) -> bool:
        with self.env.begin() as txn:
            marks = [k for k, _ in txn.cursor(db=self.gc) if k[:1] not in _STAGED]
        for mark in marks:
            if self.write(partial(Writer.reclaim, mark=mark, limit=RECLAIM_CHUNK), numbered=False):
                return True
        return False

    def _trim_changes(self) -> bool:
        def op(w: Writer) -> bool:
            consumers = self._consumers(w.txn)
            upto = min(consumers.values()) if consumers else None
            cur = w.txn.cursor(db=self.changelog)
            n = 0
            if cur.first():
                while n < RECLAIM_CHUNK and (upto is None or int.from_bytes(cur.key(), "big") <= upto):
                    if not cur.delete():
                        break
                    n += 1
            return n >= RECLAIM_CHUNK

        return self.write(op, numbered=False)


class _Group:
    """The writes queued by a write group (see LmdbStorage.begin_group)."""

    __slots__ = ("_s", "_queued")

    def __init__(self, storage: LmdbStorage) -> None:
        self._s = storage
        self._queued: list[Callable[[Writer], Any]] = []

    def queue(self, fn: Callable[[Writer], Any]) -> None:
        self._queued.append(fn)

    def __len__(self) -> int:
        return len(self._queued)

    def end(self) -> list[BaseException | None]:
        """Runs the queued writes in one transaction, then commits it. A write that fails
        fails before it changes anything; a failure of the storage fails them all."""
        queued = self._queued
        if not queued:
            return []
        outcomes: list[BaseException | None] = []
        try:
            with self._s.env.begin(write=True) as txn:
                group = Writer(self._s, txn, True)
                for fn in queued:
                    try:
                        fn(group)
                    except lmdb.Error:
                        raise
                    except Exception as exc:  # refused before it changed anything
                        outcomes.append(exc.with_traceback(None))  # its frames hold `outcomes`: no cycle
                        continue
                    outcomes.append(None)
                group.finish()
        except lmdb.Error as exc:
            return [_translate(exc, self._s.path)] * len(queued)
        return outcomes


def _first_missing_delete(w: Writer, st: SetState | None, ops: Sequence[BatchOp]) -> int | None:
    """The position of the batch's first delete of a key that is absent by then, taking the
    batch's own earlier operations into account; None when every delete finds its key."""
    present: dict[str, bool] = {}
    for i, o in enumerate(ops):
        if type(o) is Put:
            present[o.key] = True
            continue
        found = present.get(o.key)
        if found is None:
            found = st is not None and w.has(st, o.key)
        if not found:
            return i
        present[o.key] = False
    return None


def sequence_of(txn: lmdb.Transaction, meta: Any) -> int:
    """The last commit's number. Its record also holds a flag: whether changes are retained."""
    raw = txn.get(_SEQUENCE, db=meta)
    return int.from_bytes(raw[:8], "big") if raw else 0


def _set_logging(txn: lmdb.Transaction, meta: Any, on: bool) -> None:
    txn.put(_SEQUENCE, K.id_bytes(sequence_of(txn, meta)) + (b"\x01" if on else b""), db=meta)


def _decode_change(seq: int, raw: bytes) -> Change:
    """Reads the time and the op count from the record's head, {"t":<number>,"n":<count>,…},
    which the writer puts first, without parsing the rest."""
    comma = raw.index(b",", 5)
    return Change(seq, float(raw[5:comma]), int(raw[comma + 5 : raw.index(b",", comma + 5)]), bytes(raw))


def _index_op_json(definition: IndexDef) -> dict[str, Any]:
    return {"name": definition.name, "field": definition.field, "kind": definition.kind,
            "sort_fields": list(definition.sort_fields)}


class Writer:
    """The operations of one write transaction on the catalog, the data and the indexes."""

    __slots__ = ("storage", "txn", "logging", "_ops", "_numbered", "_sequence", "_deltas", "_data", "_index",
                 "_databases")

    def __init__(self, storage: LmdbStorage, txn: lmdb.Transaction, numbered: bool = True) -> None:
        self.storage = storage
        self.txn = txn
        self._numbered = numbered
        self._sequence = txn.get(_SEQUENCE, db=storage.meta) if numbered else None
        self.logging = self._sequence is not None and len(self._sequence) > 8
        self._ops: list[Any] = []
        self._deltas: dict[bytes, int] = {}  # count key -> change, written once at the end
        self._data = storage.data
        self._index = storage.index
        self._databases: dict[str, StoredDatabase] = {}  # read in this transaction; a group's writes share them

    def finish(self) -> None:
        """Writes the counts; numbers the commit and, while changes are retained, records it."""
        txn, counts = self.txn, self.storage.counts
        for key, delta in self._deltas.items():
            if delta:
                n = K.count_of(txn.get(key, db=counts)) + delta
                if n:
                    txn.put(key, K.count_bytes(n), db=counts)
                else:
                    txn.delete(key, db=counts)
        if not self._numbered:
            return
        raw = self._sequence
        seq = (int.from_bytes(raw[:8], "big") if raw else 0) + 1
        txn.put(_SEQUENCE, K.id_bytes(seq) + (raw[8:] if raw else b""), db=self.storage.meta)
        if self.logging and self._ops:
            txn.put(K.id_bytes(seq), orjson.dumps({"t": time.time(), "n": len(self._ops), "ops": self._ops}), db=self.storage.changelog)

    def log(self, op: tuple[Any, ...]) -> None:
        if self.logging:
            if op[0] == "create_index":
                op = (*op[:3], _index_op_json(op[3]))
            self._ops.append(op)

    # catalog

    def database(self, name: str, check: AccessCheck) -> StoredDatabase:
        db = self._databases.get(name)
        if db is None:
            db = self._databases[name] = self.storage.load_database(self.txn, name)
        check(db.auth)
        return db

    def record_of(self, db: StoredDatabase) -> dict[str, Any]:
        """A fresh, mutable copy of the database's catalog record."""
        return cast(dict[str, Any], orjson.loads(self.txn.get(db.name.encode(), db=self.storage.catalog)))

    def save(self, name: str, record: dict[str, Any]) -> None:
        self.txn.put(name.encode(), orjson.dumps(record), db=self.storage.catalog)
        self._databases.pop(name, None)

    def remove(self, db: StoredDatabase) -> None:
        """Removes the database's catalog record and marks its sets and indexes for reclaiming:
        O(sets), not O(entries)."""
        self.txn.delete(db.name.encode(), db=self.storage.catalog)
        self._databases.pop(db.name, None)
        for st in db.states.values():
            self.mark_for_reclaim(_GC_SET, st.prefix)
            for ix in st.indexes:
                self.mark_for_reclaim(_GC_INDEX, ix.prefix)

    def new_id(self) -> int:
        n = K.count_of(self.txn.get(_IDS, db=self.storage.meta)) + 1
        self.txn.put(_IDS, K.id_bytes(n), db=self.storage.meta)
        return n

    def add_set(self, db: StoredDatabase, name: str) -> SetState:
        st = SetState(name, self.new_id(), ())
        rec = self.record_of(db)
        rec["sets"][name] = {"id": st.id, "indexes": {}}
        self.save(db.name, rec)
        self.log(("create_set", db.name, name))
        return st

    def mark_for_reclaim(self, kind: bytes, prefix: bytes) -> None:
        self.txn.put(kind + prefix, b"", db=self.storage.gc)

    def unmark(self, kind: bytes, prefix: bytes) -> None:
        self.txn.delete(kind + prefix, db=self.storage.gc)

    # entries

    def put(self, st: SetState, key: str, value: Any, raw: bytes) -> None:
        txn = self.txn
        kb = key.encode()
        if len(kb) <= K.INLINE_KEY_MAX:
            old = txn.replace(st.prefix + b"k" + kb, raw, db=self._data)
        else:
            old = txn.replace(K.data_key(st.prefix, key), K.stored_value(key, raw), db=self._data)
            if old is not None:
                old = K.value_of_stored(key, old)
        if old is None:
            deltas, ck = self._deltas, st.count_key
            deltas[ck] = deltas.get(ck, 0) + 1
        if st.indexes:
            old_value = MISSING if old is None else orjson.loads(old)
            for ix in st.indexes:
                self._reindex(ix, kb, old_value, value)

    def put_many(self, st: SetState, puts: Sequence[Put]) -> None:
        """Puts of distinct keys, in key order. Those with inline keys (all but the longest) are
        written in bulk: the values they replace are found, and the new ones written, by one
        cursor's multi-key calls, and the new entries' index records made in one pass."""
        encoded = [p.key.encode() for p in puts]
        if encoded and max(map(len, encoded)) > K.INLINE_KEY_MAX:  # stored apart: one by one
            for p, kb in zip(puts, encoded, strict=True):
                if len(kb) > K.INLINE_KEY_MAX:
                    self.put(st, p.key, p.value, p.raw)
            inline = [i for i, kb in enumerate(encoded) if len(kb) <= K.INLINE_KEY_MAX]
            puts, encoded = [puts[i] for i in inline], [encoded[i] for i in inline]
        if not puts:
            return
        prefix = st.prefix + b"k"
        keys = [prefix + kb for kb in encoded]
        cur = self.txn.cursor(db=self._data)
        replaced = dict(cur.getmulti(keys))
        cur.putmulti(zip(keys, [p.raw for p in puts], strict=True))
        self._count(st.count_key, len(keys) - len(replaced))
        if not st.indexes:
            return
        new = []
        for dk, kb, p in zip(keys, encoded, puts, strict=True):
            before = replaced.get(dk)
            if before is None:
                new.append((kb, p.value))
            else:
                old_value = orjson.loads(before)
                for ix in st.indexes:
                    self._reindex(ix, kb, old_value, p.value)
        self._insert_records(*_records_of_new(st.indexes, new))

    def has(self, st: SetState, key: str) -> bool:
        """Whether the set holds the key."""
        return K.value_of_stored(key, self.txn.get(K.data_key(st.prefix, key), db=self._data)) is not None

    def delete(self, st: SetState, key: str) -> bool:
        s, txn = self.storage, self.txn
        old = txn.pop(K.data_key(st.prefix, key), db=s.data)
        if old is None:
            return False
        self._count(st.count_key, -1)
        if st.indexes:
            kb = key.encode()
            old_value = orjson.loads(K.value_of_stored(key, old) or b"null")
            for ix in st.indexes:
                self._reindex(ix, kb, old_value, MISSING)
        return True

    def _count(self, key: bytes, delta: int) -> None:
        deltas = self._deltas
        deltas[key] = deltas.get(key, 0) + delta

    def _reindex(self, ix: IndexState, kb: bytes, old: Any, new: Any) -> None:
        """Moves one entry's index records from its old value to its new one (MISSING: none)."""
        d = ix.definition
        f = d.field
        new_t = match_text(new[f]) if type(new) is dict and f in new else None
        old_t = match_text(old[f]) if type(old) is dict and f in old else None
        if old_t == new_t and ix.basic:
            return
        txn, index = self.txn, self._index
        if len(kb) <= K.TOKEN_KEY_MAX:
            token, key_value = kb, b""
        else:
            token, key_value = K.key_token(kb), kb
        if ix.basic:
            if old_t is not None:
                txn.delete(ix.prefix + K.group_token(old_t) + token, db=index)
            if new_t is not None:
                txn.put(ix.prefix + K.group_token(new_t) + token, key_value, db=index)
            return
        old_g = K.group_token(old_t) if old_t is not None else None
        new_g = K.group_token(new_t) if new_t is not None else None
        for i, f in enumerate(d.sort_fields):
            head = ix.prefix + bytes((i,))
            old_k = head + old_g + sort_token(field_of(old, f)) + token if old_g is not None else None
            new_k = head + new_g + sort_token(field_of(new, f)) + token if new_g is not None else None
            if old_k == new_k:
                continue
            removed = old_k is not None and txn.delete(old_k, db=index)
            added = new_k is not None and txn.put(new_k, key_value, db=index, overwrite=False)
            if i == 0 and old_g != new_g:
                if removed:
                    self._count(K.group_count_key(ix.prefix, cast(bytes, old_g)), -1)
                if added:
                    self._count(K.group_count_key(ix.prefix, cast(bytes, new_g)), 1)

    def index_existing(self, st: SetState, indexes: list[IndexState], start: bytes, limit: int) -> bytes | None:
        """Adds the index records of up to `limit` entries from `start` on; the last data key
        done, or None at the end of the set. Records already present are left as they are."""
        cur = self.txn.cursor(db=self.storage.data)
        last = None
        entries: list[tuple[bytes, Any]] = []
        loads, add = orjson.loads, entries.append
        if cur.set_range(start):
            prefix = st.prefix
            for lkey, stored in cur:
                if not lkey.startswith(prefix) or len(entries) >= limit:
                    break
                if lkey[8] == 0x6B:  # "k": the key inline
                    add((lkey[9:], loads(stored)))
                else:
                    key, raw = K.decode_entry(lkey, stored)
                    add((key.encode(), loads(raw)))
                last = lkey
        self._insert_records(*_records_of_new(indexes, entries))
        return last if len(entries) >= limit else None

    def _insert_records(self, plain: list[tuple[bytes, bytes]], counted: list[tuple[bytes, bytes, bytes | None]]) -> None:
        """Puts index records in key order (neighbours share pages), leaving those already
        there as they are; counts the new ones of `counted` that add to a group's count."""
        index = self.txn.cursor(db=self.storage.index)
        if plain:
            plain.sort()
            index.putmulti(plain, overwrite=False)
        counted.sort()
        put, deltas = index.put, self._deltas
        for k, v, count_key in counted:
            if put(k, v, overwrite=False) and count_key is not None:
                deltas[count_key] = deltas.get(count_key, 0) + 1

    def stage(self, st: SetState, entries: Sequence[tuple[str, Any, bytes]]) -> None:
        """Bulk-writes restored entries into a staged set, which no one else writes."""
        cur = self.txn.cursor(db=self._data)
        new: list[tuple[bytes, Any]] = []
        again = []
        for key, value, raw in entries:
            kb = key.encode()
            if len(kb) <= K.INLINE_KEY_MAX:
                added = cur.put(st.prefix + b"k" + kb, raw, overwrite=False)
            else:
                added = cur.put(K.data_key(st.prefix, key), K.stored_value(key, raw), overwrite=False)
            if not added:  # the backup repeats a key: the last one wins, as in JSON
                again.append((key, value, raw))
                continue
            new.append((kb, value))
        self._count(st.count_key, len(new))
        if st.indexes:
            self._insert_records(*_records_of_new(st.indexes, new))
        for key, value, raw in again:
            self.put(st, key, value, raw)

    def reclaim(self, mark: bytes, limit: int) -> bool:
        """Deletes up to `limit` records under a reclaim mark; True while some are left."""
        s = self.storage
        kind, prefix = mark[:1], mark[1:]
        table = s.data if kind == _GC_SET else s.index
        cur = self.txn.cursor(db=table)
        n = 0
        if cur.set_range(prefix):
            while n < limit and cur.key().startswith(prefix):
                if not cur.delete():
                    break
                n += 1
        if n >= limit:
            return True
        counts = self.txn.cursor(db=s.counts)
        count_prefix = K.set_count_key(prefix) if kind == _GC_SET else K.group_count_key(prefix, b"")
        if counts.set_range(count_prefix):
            while counts.key().startswith(count_prefix):
                if not counts.delete():
                    break
        self.txn.delete(mark, db=s.gc)
        return False


class View:
    """The ReadView of one LMDB read transaction, which `with` opens and ends."""

    __slots__ = ("_s", "_txn")

    def __init__(self, storage: LmdbStorage) -> None:
        self._s = storage

    def __enter__(self) -> View:
        self._txn = self._s.env.begin()
        return self

    def __exit__(self, *exc: object) -> None:
        self._txn.abort()

    def database(self, name: str) -> StoredDatabase:
        return self._s.load_database(self._txn, name)

    def database_names(self) -> list[str]:
        return [k.decode() for k in self._txn.cursor(db=self._s.catalog).iternext(values=False)]

    def _set(self, db: Database, set_name: str) -> SetState:
        st = cast(StoredDatabase, db).states.get(set_name)
        if st is None:
            raise SetNotFound.in_database(set_name, db.name)
        return st

    def _ready_index(self, st: SetState, name: str) -> IndexState:
        ix = st.index(name)
        if ix is None or not ix.ready:
            raise IndexNotFound.in_set(name, st.name)
        return ix

    def answer(self, read: PointRead) -> Any:
        """A point read's answer, or what it raised."""
        try:
            db = self.database(read.database)
        except NotFound as exc:
            return exc
        try:
            read.check(db.auth)
        except Exception as exc:  # noqa: BLE001 (the check's refusal is the read's answer)
            return exc
        try:
            if isinstance(read, Get):
                return self.get(db, read.set_name, read.key)
            return self.lookup(db, read.set_name, read.index_name, read.text)
        except NotFound as exc:
            return exc

    def get(self, db: Database, set_name: str, key: str) -> bytes | None:
        st = self._set(db, set_name)
        kb = key.encode()
        if len(kb) <= K.INLINE_KEY_MAX:
            return cast(bytes | None, self._txn.get(st.prefix + b"k" + kb, db=self._s.data))
        return K.value_of_stored(key, self._txn.get(K.data_key(st.prefix, key), db=self._s.data))

    def _values(self, st: SetState, keys: list[bytes]) -> list[Entry]:
        out = []
        get, data, prefix = self._txn.get, self._s.data, st.prefix + b"k"
        for kb in keys:
            if len(kb) <= K.INLINE_KEY_MAX:
                raw = get(prefix + kb, db=data)
            else:
                raw = K.value_of_stored(kb.decode(), get(K.data_key(st.prefix, kb.decode()), db=data))
            if raw is not None:
                out.append(Entry(kb.decode(), raw))
        return out

    def lookup(self, db: Database, set_name: str, index: str, text: str) -> list[Entry]:
        st = self._set(db, set_name)
        ix = self._ready_index(st, index)
        cur = self._txn.cursor(db=self._s.index)
        if not ix.basic:
            keys, _ = _scan_keys(cur, ix.prefix + b"\x00" + K.group_token(text), True)
            keys.sort()
            return self._values(st, keys)
        prefix = ix.prefix + K.group_token(text)
        n = len(prefix)
        keys = []
        long_keys = False
        if cur.set_range(prefix):
            for lkey, value in cur:  # basic records: the key in the LMDB key, unless it was too long
                if not lkey.startswith(prefix):
                    break
                if value:
                    keys.append(value)
                    long_keys = True
                else:
                    keys.append(lkey[n:])
        if long_keys:
            keys.sort()
        return self._values(st, keys)

    def page(self, db: Database, set_name: str, index: str, text: str, order: SortOrder,
             offset: int, limit: int) -> Page:
        st = self._set(db, set_name)
        ix = self._ready_index(st, index)
        group = K.group_token(text)
        total = K.count_of(self._txn.get(K.group_count_key(ix.prefix, group), db=self._s.counts))
        if total == 0 or offset >= total:
            return Page(total, [])
        fields = ix.definition.sort_fields
        first, desc = order[0]
        head = ix.prefix + bytes((fields.index(first),)) + group
        rest = list(order[1:])
        picked: list[bytes] = []
        seen, runs = _runs(self._txn.cursor(db=self._s.index), head, desc, offset)
        for token, run in runs:
            if seen + len(run) <= offset:
                seen += len(run)
                continue
            if len(run) > 1 and (rest or is_truncated(token) or not all(e for _, e in run)):
                run = self._order_run(st, run, first if is_truncated(token) else None, desc, rest)
            picked.extend(kb for kb, _ in run[max(0, offset - seen) :])
            seen += len(run)
            if len(picked) >= limit:
                break
        return Page(total, self._values(st, picked[:limit]))

    def _order_run(self, st: SetState, run: list[tuple[bytes, bool]], first: str | None, desc: bool,
                   rest: list[tuple[str, bool]]) -> list[tuple[bytes, bool]]:
        """Exact order of entries whose keys tie in the index: by the full first sort value
        when it was truncated in the keys, then by the other sort fields, then by key."""
        values = {e.key.encode(): orjson.loads(e.value) for e in self._values(st, [kb for kb, _ in run])}
        ordered = sorted(values)  # by key: UTF-8 byte order is code point order
        for f, d in ([*reversed(rest), (first, desc)] if first is not None else reversed(rest)):
            present = [kb for kb in ordered if field_of(values[kb], f) is not MISSING]
            missing = [kb for kb in ordered if field_of(values[kb], f) is MISSING]
            present.sort(key=partial(_rank_of, values, f), reverse=d)
            ordered = present + missing
        return [(kb, True) for kb in ordered]

    def key_counts(self) -> dict[str, int]:
        out = {}
        txn, counts = self._txn, self._s.counts
        for db in self._s.all_databases(txn):
            out[db.name] = sum(
                K.count_of(txn.get(K.set_count_key(st.prefix), db=counts)) for st in db.states.values()
            )
        return out


def _records_of_new(indexes: Sequence[IndexState], entries: Iterable[tuple[bytes, Any]]
                    ) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes, bytes | None]]]:
    """The index records of entries (key bytes, value) not indexed yet: those of basic indexes
    under short keys, most of a bulk write, made here inline; the others by `_index_records`,
    with the group count each adds to."""
    basic = [(ix.prefix, ix.definition.field) for ix in indexes if ix.basic]
    sortable = [ix for ix in indexes if not ix.basic]
    plain: list[tuple[bytes, bytes]] = []
    counted: list[tuple[bytes, bytes, bytes | None]] = []
    add, group_token = plain.append, K.group_token
    for kb, value in entries:
        if type(value) is not dict:
            continue  # no field to index
        if len(kb) > K.TOKEN_KEY_MAX:
            for ix in indexes:
                _index_records(ix, kb, value, counted)
            continue
        for prefix, f in basic:
            if f in value:
                v = value[f]
                add((prefix + group_token(v if type(v) is str else match_text(v)) + kb, b""))
        for ix in sortable:
            _index_records(ix, kb, value, counted)
    return plain, counted


def _index_records(ix: IndexState, kb: bytes, value: Any, out: list[tuple[bytes, bytes, bytes | None]]) -> None:
    """The index records of one entry: (key, value, the group count it adds to, if any)."""
    d = ix.definition
    text = indexed_text(value, d.field)
    if text is None:
        return
    token = K.key_token(kb)
    key_value = b"" if K.is_exact_key_token(len(token)) else kb
    group = K.group_token(text)
    if ix.basic:
        out.append((ix.prefix + group + token, key_value, None))
        return
    count_key = K.group_count_key(ix.prefix, group)
    for i, f in enumerate(d.sort_fields):
        out.append((ix.prefix + bytes((i,)) + group + sort_token(field_of(value, f)) + token, key_value,
                    count_key if i == 0 else None))


def _rank_of(values: dict[bytes, Any], f: str, kb: bytes) -> tuple[int, Any]:
    return sort_rank(field_of(values[kb], f))


def _key_of(lkey: bytes, start: int, value: bytes) -> tuple[bytes, bool]:
    token = lkey[start:]
    if value:
        return bytes(value), False
    return token, True


def _scan_keys(cur: lmdb.Cursor, prefix: bytes, sortable: bool) -> tuple[list[bytes], bool]:
    """Keys of every record under `prefix`; False when some key token was inexact."""
    keys = []
    exact = True
    if cur.set_range(prefix):
        n = len(prefix)
        for lkey, value in cur:
            if not lkey.startswith(prefix):
                break
            start = _sort_token_end(lkey, n) if sortable else n
            kb, ok = _key_of(lkey, start, value)
            keys.append(kb)
            exact = exact and ok
    return keys, exact


def _sort_token_end(lkey: bytes, start: int) -> int:
    kind = lkey[start]
    if kind == 0x01 or kind == 0xFF:
        return start + 1
    if kind == 0x02:
        return start + 2
    if kind == 0x03:
        return start + 9
    i = start + 1
    while True:
        j = lkey.index(b"\x00", i)
        if lkey[j + 1] != 0xFF:
            return j + 2
        i = j + 2


Runs = Iterator[tuple[bytes, list[tuple[bytes, bool]]]]


def _runs(cur: lmdb.Cursor, head: bytes, desc: bool, offset: int) -> tuple[int, Runs]:
    """(sort token, [(key, exact)]) runs of equal sort value, in the requested direction,
    keys ascending inside a run; entries lacking the field come last either way. The runs
    start with the one holding entry number `offset`; also returns how many entries come
    before it. Skipping moves the cursor only, without reading the entries it passes."""
    n = len(head)
    missing_start = head + MISSING_SORT_TOKEN

    def token() -> bytes:
        k = cur.key()
        return bytes(k[n : _sort_token_end(k, n)])

    if not desc:
        if not cur.set_range(head) or not cur.key().startswith(head):
            return 0, iter(())
        i = 0
        while i < offset and cur.next() and cur.key().startswith(head):
            i += 1
        if i < offset:
            return i, iter(())
        t = token()
        while i > 0 and cur.prev():  # back to the start of this entry's run
            if not cur.key().startswith(head) or token() != t:
                cur.next()
                break
            i -= 1
        return i, _forward_runs(cur, head, n)
    ok = cur.prev() if cur.set_range(missing_start) else cur.last()
    i = 0
    while ok and cur.key().startswith(head) and i < offset:
        ok = cur.prev()
        i += 1
    if not ok or not cur.key().startswith(head):  # the offset is past every present value
        if not cur.set_range(missing_start):
            return i, iter(())
        j = 0
        while i + j < offset and cur.next() and cur.key().startswith(missing_start):
            j += 1
        return i + j, _forward_runs(cur, missing_start, n)
    t = token()
    while i > 0 and cur.next():  # to the first entry of this run in descending order
        k = cur.key()
        if not k.startswith(head) or k.startswith(missing_start) or token() != t:
            cur.prev()
            break
        i -= 1
    return i, _descending_runs(cur, head, n, missing_start)


def _descending_runs(cur: lmdb.Cursor, head: bytes, n: int, missing_start: bytes) -> Runs:
    token: bytes | None = None
    run: list[tuple[bytes, bool]] = []
    ok = True
    while ok:
        lkey = cur.key()
        if not lkey.startswith(head):
            break
        end = _sort_token_end(lkey, n)
        t = lkey[n:end]
        if t != token:
            if run:
                run.reverse()
                yield cast(bytes, token), run
            token, run = t, []
        run.append(_key_of(lkey, end, cur.value()))
        ok = cur.prev()
    if run:
        run.reverse()
        yield cast(bytes, token), run
    if cur.set_range(missing_start):
        yield from _forward_runs(cur, missing_start, n)


def _forward_runs(cur: lmdb.Cursor, prefix: bytes, n: int) -> Iterator[tuple[bytes, list[tuple[bytes, bool]]]]:
    token: bytes | None = None
    run: list[tuple[bytes, bool]] = []
    for lkey, value in cur:
        if not lkey.startswith(prefix):
            break
        end = _sort_token_end(lkey, n)
        t = lkey[n:end]
        if t != token:
            if run:
                yield cast(bytes, token), run
            token, run = t, []
        run.append(_key_of(lkey, end, value))
    if run:
        yield cast(bytes, token), run


