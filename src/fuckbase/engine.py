"""Durable storage: LMDB on disk, an in-memory catalog and indexes, one lock around both.

Requests run on a few threads. Every write is an operation run inside an LMDB write
transaction while holding the engine lock; its caller is answered only after the commit. With
durability "os" each operation commits at once (a commit without fsync costs about two
microseconds with writemap) and a background thread fsyncs every second; with "fsync" the
caller also waits for an fsync that covers its commit, and one fsync covers every commit made
while the previous one ran (group commit). The catalog (databases, sets, index definitions)
and the index contents live in memory and change under the same lock, before the commit.
Point reads and basic-index lookups take no lock: LMDB read transactions never wait, and a
lookup that overlapped a write re-checks its results against the values it read, so it never
answers an entry whose value does not match. Sorted pages (which walk sorted lists a writer
may be changing) take the lock. The lock is held for microseconds; long jobs (index builds,
restores, reclaiming dropped sets) take it a bounded chunk at a time.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import logging
import mmap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import orjson

from fuckbase.errors import ApiError, conflict, invalid, not_found
from fuckbase.hotpath import HOT
from fuckbase.indexes import BasicIndex, Index, IndexDef, SortableIndex, make_index

log = logging.getLogger("fuckbase.engine")

MIN_MAP_SIZE = 1 << 30  # the map (and the sparse file) doubles whenever it is half full
ROOM_CHECK_EVERY = 64  # commits between checks of the map's fill level
TRIM_EVERY = 16  # staged restore writes (of ~4096 entries) between unmapping written pages
STAGING_COMMIT = 512  # restored entries per commit: the lock is held ~2 ms
INLINE_KEY_MAX = 480  # LMDB keys are at most 511 bytes; longer keys are stored by digest
BUILD_CHUNK = 2048  # entries indexed per lock hold while an index is built (~3 ms)
GC_CHUNK = 8192  # entries deleted per commit when a dropped set is reclaimed
SYNC_INTERVAL = 1.0  # seconds between background fsyncs with durability "os"

_DB_PREFIX = b"db:"
_GC_PREFIX = b"gc:"
_SEQ_KEY = b"seq"


def data_key(prefix: bytes, key: str) -> bytes:
    kb = key.encode()
    if len(kb) <= INLINE_KEY_MAX:
        return prefix + b"k" + kb
    return prefix + b"h" + hashlib.sha256(kb).digest()


def stored_value(key: str, raw: bytes) -> bytes:
    """What LMDB holds for an entry: the JSON, preceded by the key when the key was digested."""
    kb = key.encode()
    if len(kb) <= INLINE_KEY_MAX:
        return raw
    return len(kb).to_bytes(2, "big") + kb + raw


def decode_entry(lkey: bytes, stored: bytes) -> tuple[str, bytes]:
    """(key, JSON bytes) of one LMDB entry of the data table."""
    if lkey[8:9] == b"k":
        return lkey[9:].decode(), stored
    n = int.from_bytes(stored[:2], "big")
    return stored[2 : 2 + n].decode(), stored[2 + n :]


def _value_of_stored(key: str, stored: bytes | None) -> bytes | None:
    if stored is None:
        return None
    kb = key.encode()
    if len(kb) <= INLINE_KEY_MAX:
        return stored
    n = int.from_bytes(stored[:2], "big")
    if stored[2 : 2 + n] != kb:
        return None
    return stored[2 + n :]


class IndexBuild:
    """An index being filled with a set's existing entries; queries on it wait for the end."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self.error: ApiError | None = None

    def finish(self, error: ApiError | None = None) -> None:
        if not self._done.is_set():
            self.error = error
            self._done.set()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        self._done.wait()
        if self.error is not None:
            raise self.error


@dataclass
class SetState:
    name: str
    id: int
    indexes: dict[str, Index] = field(default_factory=dict)
    building: dict[str, IndexBuild] = field(default_factory=dict)
    count: int = 0
    prefix: bytes = field(init=False)  # the set's keys in the data table start with it

    def __post_init__(self) -> None:
        self.prefix = self.id.to_bytes(8, "big")


@dataclass
class DatabaseState:
    name: str
    id: int
    auth: dict[str, str] | None = None
    sets: dict[str, SetState] = field(default_factory=dict)

    def record(self) -> bytes:
        return orjson.dumps(
            {
                "id": self.id,
                "auth": self.auth,
                "sets": {
                    s.name: {
                        "id": s.id,
                        "indexes": {n: i.definition.to_json() for n, i in s.indexes.items()},
                    }
                    for s in self.sets.values()
                },
            }
        )

    @property
    def key_count(self) -> int:
        # list() copies in one step: a set created meanwhile on another thread cannot break it
        return sum(s.count for s in list(self.sets.values()))


Op = Callable[[lmdb.Transaction], Any]


def _yield_lock() -> None:
    """Lets threads waiting for the engine lock in before a long job takes its next chunk."""
    time.sleep(0)


class Engine:
    """The one owner of the data directory; safe to call from any thread."""

    def __init__(self, path: Path, durability: str = "os") -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.durability = durability
        existing = path / "data.mdb"
        used = existing.stat().st_size if existing.exists() else 0
        # writemap: a commit writes into the shared mapping instead of calling pwrite per page,
        # about 4x cheaper; the page cache has the data at once, so it survives kill -9.
        self.env = lmdb.open(
            str(path),
            map_size=max(MIN_MAP_SIZE, used),
            max_dbs=4,
            sync=False,
            metasync=False,
            writemap=True,
            readahead=False,
            max_readers=512,
        )
        self._page_size = self.env.stat()["psize"]
        self._data_file = str((path / "data.mdb").resolve())
        self.open_snapshots = 0
        self.meta = self.env.open_db(b"meta")
        self.data = self.env.open_db(b"data")
        self.databases: dict[str, DatabaseState] = {}
        # guards the catalog, the indexes and every write transaction
        self.lock = threading.Lock()
        self.commits = 0
        self.writing = 0  # odd while a write runs: lock-free lookups compare it before and after
        self._room_check = 1
        # lock-free reads in progress, one token each: growing the map waits until it is empty
        self._readers: collections.deque[None] = collections.deque()
        self._remapping = False
        self._remap_over = threading.Event()
        self._sync_cond = threading.Condition()
        self._synced = 0  # commits covered by a finished fsync (durability "fsync")
        self._syncing = False
        self._stop = threading.Event()
        self._gc_wanted = threading.Event()
        self._threads: list[threading.Thread] = []
        self._load()

    # ----------------------------------------------------------------- life cycle

    def _load(self) -> None:
        """Rebuild the in-memory catalog and index contents from what is on disk."""
        self.databases = {}
        with self.env.begin(db=self.meta) as txn:
            for k, v in txn.cursor(db=self.meta):
                if not k.startswith(_DB_PREFIX):
                    continue
                rec = orjson.loads(v)
                db = DatabaseState(k[len(_DB_PREFIX) :].decode(), rec["id"], rec.get("auth"))
                for sname, srec in rec["sets"].items():
                    s = SetState(sname, srec["id"])
                    for iname, idef in srec["indexes"].items():
                        s.indexes[iname] = make_index(IndexDef.from_json(iname, idef))
                    db.sets[sname] = s
                self.databases[db.name] = db
        with self.env.begin(db=self.data) as txn:
            for db in self.databases.values():
                for s in db.sets.values():
                    self._scan_set(txn, s)

    def _scan_set(self, txn: lmdb.Transaction, s: SetState) -> None:
        cur = txn.cursor(db=self.data)
        prefix = s.prefix
        count = 0
        indexes = list(s.indexes.values())
        if cur.set_range(prefix):
            for lkey, stored in cur:
                if not lkey.startswith(prefix):
                    break
                count += 1
                if indexes:
                    key, raw = decode_entry(lkey, stored)
                    obj = orjson.loads(raw)
                    for idx in indexes:
                        idx.update(key, obj, obj)
        s.count = count

    def start(self) -> None:
        """Begin background work: reclaiming dropped sets, periodic fsync."""
        self._threads.append(_daemon("fuckbase-gc", self._collect_garbage))
        if self.durability == "os":
            self._threads.append(_daemon("fuckbase-fsync", self._sync_periodically))
        self._gc_wanted.set()

    def close(self) -> None:
        self._stop.set()
        self._gc_wanted.set()
        for t in self._threads:
            t.join(timeout=5)
        with self.lock:
            self.env.sync(True)
            self.env.close()

    def _sync_periodically(self) -> None:
        while not self._stop.wait(SYNC_INTERVAL):
            self.env.sync(True)

    # ----------------------------------------------------------------- the write path

    def write(self, op: Op) -> Any:
        """Runs `op` in a write transaction; returns its result once the commit is durable.

        `op` raises ApiError before it changes anything, or it succeeds. With durability "os"
        the commit (no fsync) is the end; with "fsync" the caller then waits for an fsync
        that covers its commit, shared with every caller that committed meanwhile.
        """
        with self.lock:
            self._room_check -= 1
            if self._room_check <= 0:
                self._room_check = ROOM_CHECK_EVERY
                self.ensure_room()
            self.writing += 1
            try:
                with self.env.begin(write=True) as txn:
                    result = op(txn)
            except ApiError:
                raise
            except Exception as exc:  # the commit itself failed: disk full, I/O error
                raise self._recover(exc) from exc
            finally:
                self.writing += 1
            self.commits += 1
            commit = self.commits
        if self.durability == "fsync":
            with HOT.released():
                self._wait_synced(commit)
        return result

    def _wait_synced(self, commit: int) -> None:
        """Group commit: the first waiter runs an fsync for all commits so far, others wait."""
        with self._sync_cond:
            while self._synced < commit:
                if self._syncing:
                    self._sync_cond.wait()
                    continue
                self._syncing = True
                covered = self.commits  # every commit counted here has finished
                self._sync_cond.release()
                try:
                    self.env.sync(True)
                except lmdb.Error as exc:
                    raise ApiError(500, "INTERNAL_ERROR", f"fsync failed: {exc}") from exc
                finally:
                    self._sync_cond.acquire()
                    self._syncing = False
                    self._sync_cond.notify_all()
                self._synced = max(self._synced, covered)

    def _recover(self, exc: Exception) -> ApiError:
        """After a failed commit the in-memory state may be ahead of the disk: reload it."""
        log.error("write failed, reloading state from disk: %s", exc)
        self._load()
        if isinstance(exc, lmdb.MapFullError):
            self.ensure_room()
            return ApiError(503, "STORAGE_BUSY", "the storage was growing; retry the request")
        return ApiError(500, "INTERNAL_ERROR", f"write failed: {exc}")

    def trim_resident(self) -> None:
        """Unmaps the data file's pages from this process (MADV_DONTNEED), after bulk writes.

        With writemap every page a restore writes stays mapped, and counted in RSS, although
        the kernel's page cache holds it anyway. For a shared file mapping dropping the
        mapping loses nothing (dirty pages stay in the page cache); later reads fault the
        pages back in from the cache.
        """
        try:
            with open("/proc/self/maps") as maps:
                ranges = [line.split()[0] for line in maps if line.rstrip().endswith(self._data_file)]
        except OSError:
            return
        libc = ctypes.CDLL(None, use_errno=True)
        for r in ranges:
            start, end = (int(x, 16) for x in r.split("-"))
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)

    def ensure_room(self) -> None:
        """Doubles the map when it is half full; called with the lock held, so no other
        transaction of this process is open. Growing would abort a backup snapshot's read
        transaction, so it waits while one is open (the map keeps half its size in reserve)."""
        info = self.env.info()
        used = (info["last_pgno"] + 1) * self._page_size
        if used * 2 > info["map_size"] and self.open_snapshots == 0:
            self._remap_over.clear()
            self._remapping = True
            try:
                while self._readers:  # lock-free reads finish within microseconds
                    time.sleep(0.0001)
                self.env.set_mapsize(info["map_size"] * 2)
            finally:
                self._remapping = False
                self._remap_over.set()
            log.info("storage map grown to %d MiB", info["map_size"] * 2 >> 20)

    def _enter_read(self) -> None:
        """Registers a lock-free read; while the map is being grown, waits for it first."""
        readers = self._readers
        readers.append(None)
        while self._remapping:
            readers.pop()
            self._remap_over.wait()
            readers.append(None)

    # ----------------------------------------------------------------- catalog helpers

    def database(self, name: str) -> DatabaseState:
        db = self.databases.get(name)
        if db is None:
            raise not_found("DB_NOT_FOUND", f"database {name!r} not found")
        return db

    @staticmethod
    def set_of(db: DatabaseState, name: str) -> SetState:
        s = db.sets.get(name)
        if s is None:
            raise not_found("SET_NOT_FOUND", f"set {name!r} not found in database {db.name!r}")
        return s

    def _live(self, db: DatabaseState) -> None:
        """An operation for a database that was dropped or replaced meanwhile fails cleanly."""
        if self.databases.get(db.name) is not db:
            raise not_found("DB_NOT_FOUND", f"database {db.name!r} not found")

    def _next_id(self, txn: lmdb.Transaction) -> int:
        cur = txn.get(_SEQ_KEY, db=self.meta)
        n = int.from_bytes(cur, "big") + 1 if cur else 1
        txn.put(_SEQ_KEY, n.to_bytes(8, "big"), db=self.meta)
        return n

    def _save(self, txn: lmdb.Transaction, db: DatabaseState) -> None:
        txn.put(_DB_PREFIX + db.name.encode(), db.record(), db=self.meta)

    def _new_set(self, txn: lmdb.Transaction, db: DatabaseState, name: str) -> SetState:
        s = SetState(name, self._next_id(txn))
        db.sets[name] = s
        self._save(txn, db)
        return s

    # ----------------------------------------------------------------- writes

    def create_database(self, name: str, auth: dict[str, str] | None) -> None:
        def op(txn: lmdb.Transaction) -> None:
            if name in self.databases:
                raise conflict("DB_ALREADY_EXISTS", f"database {name!r} already exists")
            db = DatabaseState(name, self._next_id(txn), auth)
            self._save(txn, db)
            self.databases[name] = db

        self.write(op)

    def drop_database(self, db: DatabaseState) -> None:
        def op(txn: lmdb.Transaction) -> None:
            self._live(db)
            txn.delete(_DB_PREFIX + db.name.encode(), db=self.meta)
            self._forget_sets(txn, db.sets.values())
            del self.databases[db.name]

        self.write(op)

    def _forget_sets(self, txn: lmdb.Transaction, sets: Any) -> None:
        """Marks sets' data for reclaiming in the background; a drop is O(sets), not O(entries)."""
        for s in sets:
            txn.put(_GC_PREFIX + s.prefix, b"", db=self.meta)
            for build in s.building.values():
                build.finish(not_found("INDEX_NOT_FOUND", "the index was dropped while building"))
        self._gc_wanted.set()

    def create_set(self, db: DatabaseState, name: str) -> None:
        def op(txn: lmdb.Transaction) -> None:
            self._live(db)
            if name in db.sets:
                raise conflict("SET_ALREADY_EXISTS", f"set {name!r} already exists")
            self._new_set(txn, db, name)

        self.write(op)

    def put(self, db: DatabaseState, set_name: str, key: str, value: Any, raw: bytes) -> None:
        stored = stored_value(key, raw)

        def op(txn: lmdb.Transaction) -> None:
            self._live(db)
            s = db.sets.get(set_name)
            if s is None:
                s = self._new_set(txn, db, set_name)
            old = txn.replace(data_key(s.prefix, key), stored, db=self.data)
            if old is None:
                s.count += 1
            if s.indexes:
                old_obj = None if old is None else orjson.loads(_value_of_stored(key, old) or b"null")
                for idx in s.indexes.values():
                    idx.update(key, old_obj, value)

        self.write(op)

    def delete(self, db: DatabaseState, set_name: str, key: str) -> None:
        def op(txn: lmdb.Transaction) -> None:
            self._live(db)
            s = self.set_of(db, set_name)
            old = txn.pop(data_key(s.prefix, key), db=self.data)
            if old is None:
                raise not_found("KEY_NOT_FOUND", f"key {key!r} not found")
            s.count -= 1
            if s.indexes:
                old_obj = orjson.loads(_value_of_stored(key, old) or b"null")
                for idx in s.indexes.values():
                    idx.update(key, old_obj, None)

        self.write(op)

    def create_index(self, db: DatabaseState, set_name: str, definition: IndexDef) -> None:
        """Registers the index (later writes keep it current), then indexes existing entries
        on the calling thread, a chunk per lock hold, so other requests go on meanwhile."""

        def op(txn: lmdb.Transaction) -> tuple[SetState, Index, IndexBuild]:
            self._live(db)
            s = self.set_of(db, set_name)
            if definition.name in s.indexes:
                raise conflict("INDEX_ALREADY_EXISTS", f"index {definition.name!r} already exists")
            idx = make_index(definition)
            s.indexes[definition.name] = idx
            self._save(txn, db)
            build = s.building[definition.name] = IndexBuild()
            return s, idx, build

        s, idx, build = self.write(op)
        with HOT.released():
            self._build(s, idx, build)

    def _build(self, s: SetState, idx: Index, build: IndexBuild) -> None:
        try:
            wanted = lambda: not build.finished and s.indexes.get(idx.definition.name) is idx  # noqa: E731
            if self._index_existing(s, [idx], wanted):
                build.finish()
        finally:
            build.finish(not_found("INDEX_NOT_FOUND", "the index was dropped while building"))
            with self.lock:
                if s.building.get(idx.definition.name) is build:
                    del s.building[idx.definition.name]
        build.wait()

    def _index_existing(self, s: SetState, indexes: list[Index], wanted: Callable[[], bool]) -> bool:
        """Feeds a set's committed entries to `indexes`, a chunk per lock hold, while `wanted()`.

        Writes committed during the scan update the indexes themselves; re-indexing an entry
        is idempotent (update with old == new), so the result is exact. False if abandoned.
        """
        start = s.prefix
        while True:
            with self.lock:
                if not wanted():
                    return False
                last, n = None, 0
                with self.env.begin(db=self.data) as txn:
                    cur = txn.cursor()
                    if cur.set_range(start):
                        for lkey, stored in cur:
                            if not lkey.startswith(s.prefix) or n >= BUILD_CHUNK:
                                break
                            key, raw = decode_entry(lkey, stored)
                            obj = orjson.loads(raw)
                            for idx in indexes:
                                idx.update(key, obj, obj)
                            last, n = lkey, n + 1
            if last is None or n < BUILD_CHUNK:
                return True
            start = last + b"\x00"
            _yield_lock()

    def drop_index(self, db: DatabaseState, set_name: str, name: str) -> None:
        def op(txn: lmdb.Transaction) -> None:
            self._live(db)
            s = self.set_of(db, set_name)
            if name not in s.indexes:
                raise not_found("INDEX_NOT_FOUND", f"index {name!r} not found")
            del s.indexes[name]
            build = s.building.pop(name, None)
            if build is not None:
                build.finish(not_found("INDEX_NOT_FOUND", "the index was dropped while building"))
            self._save(txn, db)

        self.write(op)

    # ----------------------------------------------------------------- reads

    def get(self, s: SetState, key: str) -> bytes | None:
        kb = key.encode()
        self._enter_read()
        try:
            with self.env.begin(db=self.data) as txn:
                if len(kb) <= INLINE_KEY_MAX:  # the common case, without a second encode
                    return txn.get(s.prefix + b"k" + kb)  # type: ignore[no-any-return]
                return _value_of_stored(key, txn.get(data_key(s.prefix, key)))
        finally:
            self._readers.pop()

    def index(self, s: SetState, name: str) -> Index:
        """An index ready to query; waits while it is still being built."""
        idx = s.indexes.get(name)
        if idx is None:
            raise not_found("INDEX_NOT_FOUND", f"index {name!r} not found in set {s.name!r}")
        build = s.building.get(name)
        if build is not None:
            with HOT.released():
                build.wait()
        return idx

    def lookup(self, s: SetState, idx: Index, text: str) -> list[tuple[str, bytes]]:
        """The (key, JSON) entries whose indexed field reads `text`; basic indexes without the lock.

        A write updates the index before its commit, so a lookup overlapping one may find a
        key whose committed value does not match (yet): then every result is checked.
        """
        if not isinstance(idx, BasicIndex):
            with self.lock:
                self._still_indexed(s, idx)
                return self._get_many(s, idx.lookup(text))
        before = self.writing
        self._still_indexed(s, idx)
        self._enter_read()
        try:
            entries = self._get_many(s, idx.lookup(text))
        finally:
            self._readers.pop()
        if before & 1 or self.writing != before:
            entries = [(k, raw) for k, raw in entries if idx.matches(orjson.loads(raw), text)]
        return entries

    def page(
        self, s: SetState, idx: SortableIndex, text: str, order: list[tuple[str, bool]], offset: int, limit: int
    ) -> tuple[int, list[tuple[str, bytes]]]:
        """One page of a sortable index's matches, in order, and the number of all matches."""
        with self.lock:
            self._still_indexed(s, idx)
            total, keys = idx.page(text, order, offset, limit)
            return total, self._get_many(s, keys)

    def _still_indexed(self, s: SetState, idx: Index) -> None:
        if s.indexes.get(idx.definition.name) is not idx:
            raise not_found("INDEX_NOT_FOUND", f"index {idx.definition.name!r} was dropped")

    def _get_many(self, s: SetState, keys: list[str]) -> list[tuple[str, bytes]]:
        out = []
        with self.env.begin(db=self.data) as txn:
            for key in keys:
                raw = _value_of_stored(key, txn.get(data_key(s.prefix, key)))
                if raw is not None:
                    out.append((key, raw))
        return out

    # ----------------------------------------------------------------- reclaiming space

    def _collect_garbage(self) -> None:
        """Deletes the entries of dropped or replaced sets, a bounded chunk per commit."""
        while True:
            self._gc_wanted.wait()
            self._gc_wanted.clear()
            while not self._stop.is_set():
                with self.lock, self.env.begin(db=self.meta) as txn:
                    pending = [k for k, _ in txn.cursor(db=self.meta) if k.startswith(_GC_PREFIX)]
                if not pending:
                    break
                for marker in pending:
                    prefix = marker[len(_GC_PREFIX) :]
                    while not self._stop.is_set() and not self.write(
                        lambda txn, p=prefix, m=marker: self._reclaim(txn, p, m)
                    ):
                        _yield_lock()
            if self._stop.is_set():
                return

    def _reclaim(self, txn: lmdb.Transaction, prefix: bytes, marker: bytes) -> bool:
        cur = txn.cursor(db=self.data)
        n = 0
        if cur.set_range(prefix):
            while cur.key().startswith(prefix) and n < GC_CHUNK:
                if not cur.delete():
                    break
                n += 1
        if n < GC_CHUNK:
            txn.delete(marker, db=self.meta)
            return True
        return False

    # ----------------------------------------------------------------- snapshots and restores

    def snapshot(self) -> Snapshot:
        return Snapshot(self)

    def staging(self) -> Staging:
        return Staging(self)


def _daemon(name: str, target: Callable[[], None]) -> threading.Thread:
    t = threading.Thread(target=target, name=name, daemon=True)
    t.start()
    return t


@dataclass
class StagedDatabase:
    """A database being restored; its name and auth may arrive after its sets in the stream."""

    name: str | None = None
    auth: dict[str, str] | None = None
    sets: dict[str, SetState] = field(default_factory=dict)


class Staging:
    """Databases being restored: written aside under fresh set ids, then swapped in by one commit.

    Until `commit`, nothing visible changes. Every staged set is marked for reclaiming from
    the moment it exists, so an abandoned or crashed restore leaves no residue; the swap
    removes those marks and marks the replaced sets instead. Used by one thread at a time.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.databases: list[StagedDatabase] = []
        self._needs_scan: list[SetState] = []
        self._writes = 0

    def add_database(self) -> StagedDatabase:
        staged = StagedDatabase()
        self.databases.append(staged)
        return staged

    def add_set(self, db: StagedDatabase, name: str) -> SetState:
        existing = db.sets.get(name)
        if existing is not None:
            return existing
        engine = self._engine

        def op(txn: lmdb.Transaction) -> SetState:
            s = SetState(name, engine._next_id(txn))
            txn.put(_GC_PREFIX + s.prefix, b"", db=engine.meta)
            return s

        s = db.sets[name] = engine.write(op)
        return s

    def add_index(self, db: StagedDatabase, set_name: str, definition: IndexDef) -> None:
        s = self.add_set(db, set_name)
        if definition.name in s.indexes:
            raise invalid(f"index {definition.name!r} appears twice for set {set_name!r}")
        s.indexes[definition.name] = make_index(definition)
        if s.count and s not in self._needs_scan:
            self._needs_scan.append(s)  # entries came before the definition

    def write(self, s: SetState, entries: list[tuple[str, Any, bytes]]) -> None:
        """Stores (key, value, JSON) entries in a staged set and feeds its indexes, a few
        hundred per commit, so requests wait a few milliseconds for the lock at most."""
        engine = self._engine
        self._writes += 1
        if self._writes % TRIM_EVERY == 0:
            engine.trim_resident()
        for start in range(0, len(entries), STAGING_COMMIT):
            if start:
                _yield_lock()
            self._write(s, entries[start : start + STAGING_COMMIT])

    def _write(self, s: SetState, entries: list[tuple[str, Any, bytes]]) -> None:
        engine = self._engine

        def op(txn: lmdb.Transaction) -> None:
            for key, value, raw in entries:
                old = txn.replace(data_key(s.prefix, key), stored_value(key, raw), db=engine.data)
                old_value = None
                if old is None:
                    s.count += 1
                elif s.indexes:  # the backup repeats a key: the last one wins, as in JSON
                    old_value = orjson.loads(_value_of_stored(key, old) or b"null")
                for idx in s.indexes.values():
                    idx.update(key, old_value, value)

        engine.write(op)

    def commit(self, replace_all: bool) -> None:
        """Swaps the staged databases in, in one commit: readers see all old or all new."""
        engine = self._engine
        names = [d.name for d in self.databases]
        if None in names or len(set(names)) != len(names):
            raise invalid("the backup names a database twice, or not at all")
        for s in self._needs_scan:
            s.indexes = {n: make_index(i.definition) for n, i in s.indexes.items()}
            engine._index_existing(s, list(s.indexes.values()), lambda: True)

        def op(txn: lmdb.Transaction) -> None:
            replaced = list(engine.databases.values()) if replace_all else [
                engine.databases[n] for n in names if n in engine.databases
            ]
            for old in replaced:
                txn.delete(_DB_PREFIX + old.name.encode(), db=engine.meta)
                engine._forget_sets(txn, old.sets.values())
                del engine.databases[old.name]
            for staged in self.databases:
                assert staged.name is not None
                db = DatabaseState(staged.name, engine._next_id(txn), staged.auth, dict(staged.sets))
                for s in db.sets.values():
                    txn.delete(_GC_PREFIX + s.prefix, db=engine.meta)
                engine._save(txn, db)
                engine.databases[db.name] = db

        engine.write(op)
        engine.trim_resident()
        self.databases = []

    def abort(self) -> None:
        """Drops what was staged; the reclaim marks written by add_set do the rest."""
        self.databases = []
        self._engine._gc_wanted.set()


class Snapshot:
    """A consistent read-only view of all databases at one instant (an LMDB read transaction).

    Usable from one thread at a time; writers go on while it is open.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        with engine.lock:
            self._txn = engine.env.begin()
            engine.open_snapshots += 1
        self._closed = False

    def databases(self) -> dict[str, dict[str, Any]]:
        out = {}
        for k, v in self._txn.cursor(db=self._engine.meta):
            if k.startswith(_DB_PREFIX):
                out[k[len(_DB_PREFIX) :].decode()] = orjson.loads(v)
        return out

    def entries(self, set_id: int) -> Iterator[tuple[str, bytes]]:
        prefix = set_id.to_bytes(8, "big")
        cur = self._txn.cursor(db=self._engine.data)
        if cur.set_range(prefix):
            for lkey, stored in cur:
                if not lkey.startswith(prefix):
                    break
                yield decode_entry(lkey, stored)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with self._engine.lock:
                self._txn.abort()
                self._engine.open_snapshots -= 1
