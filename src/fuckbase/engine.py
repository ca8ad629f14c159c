"""Durable storage: LMDB on disk, one write path on the event loop, an in-memory catalog and indexes.

Every write is an operation run inside an LMDB write transaction on the event-loop thread;
its caller is answered only after the commit. With durability "os" each operation commits at
once (a commit without fsync costs about two microseconds with writemap) and a background
fsync runs every second; with "fsync" the operations of one loop tick share one commit and
one fsync (group commit), made off the loop. Reads open their own LMDB read transaction: they
see the last commit and never wait for the writer. The catalog (databases, sets, index
definitions) and the index contents live in memory and change inside the same synchronous
step as the commit, so readers always see the two agree.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import logging
import mmap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import orjson

from fuckbase.errors import ApiError, conflict, invalid, not_found
from fuckbase.indexes import Index, IndexDef, make_index

log = logging.getLogger("fuckbase.engine")

MIN_MAP_SIZE = 1 << 30  # the map (and the sparse file) doubles whenever it is half full
ROOM_CHECK_EVERY = 64  # commits between checks of the map's fill level
TRIM_EVERY = 16  # staged restore writes (of ~4096 entries) between unmapping written pages
STAGING_COMMIT = 512  # restored entries per commit: ~3 ms of the event loop
INLINE_KEY_MAX = 480  # LMDB keys are at most 511 bytes; longer keys are stored by digest
BUILD_CHUNK = 4096  # entries indexed per loop tick while an index is built
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


@dataclass
class SetState:
    name: str
    id: int
    indexes: dict[str, Index] = field(default_factory=dict)
    building: dict[str, asyncio.Future[None]] = field(default_factory=dict)
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
        return sum(s.count for s in self.sets.values())


Op = Callable[[lmdb.Transaction], Any]


class Engine:
    """The one owner of the data directory. All methods run on the event loop thread."""

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
        self._pending: list[tuple[Op, asyncio.Future[Any]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.commits = 0
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

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begin background work: reclaiming dropped sets, periodic fsync."""
        self._loop = loop
        self._spawn(self._collect_garbage())
        if self.durability == "os":
            self._spawn(self._sync_periodically())

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        self._flush()
        await asyncio.sleep(0)
        self.env.sync(True)
        self.env.close()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _sync_periodically(self) -> None:
        while True:
            await asyncio.sleep(SYNC_INTERVAL)
            await asyncio.to_thread(self.env.sync, True)

    # ----------------------------------------------------------------- the write path

    async def submit(self, op: Op) -> Any:
        """Runs `op` in a write transaction; returns its result once the commit is durable.

        With durability "os" a commit costs a few microseconds (no fsync), so `op` commits at
        once, without a suspension. With "fsync", operations queued during one loop tick
        share one commit and one fsync (group commit), which runs off the event loop.
        """
        if self.commits % ROOM_CHECK_EVERY == 0:
            self.ensure_room()
        if self.durability == "os":
            try:
                with self.env.begin(write=True) as txn:
                    result = op(txn)
            except ApiError:
                raise  # raised before the operation changed anything
            except Exception as exc:
                raise self._recover(exc) from exc
            self.commits += 1
            return result
        return await self._enqueue(op)

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
        """Doubles the map when it is half full. Growing aborts open read transactions, so it
        waits while a backup snapshot is open (the map keeps half its size in reserve)."""
        info = self.env.info()
        used = (info["last_pgno"] + 1) * self._page_size
        if used * 2 > info["map_size"] and self.open_snapshots == 0:
            self.env.set_mapsize(info["map_size"] * 2)
            log.info("storage map grown to %d MiB", info["map_size"] * 2 >> 20)

    def _enqueue(self, op: Op) -> asyncio.Future[Any]:
        loop = self._loop or asyncio.get_running_loop()
        fut = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((op, fut))
        return fut

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        results: list[Any] = []
        try:
            with self.env.begin(write=True) as txn:
                for op, _ in batch:
                    try:
                        results.append(op(txn))
                    except ApiError as exc:
                        results.append(_Failed(exc))
        except Exception as exc:  # the commit itself failed: disk full, I/O error
            results = [_Failed(self._recover(exc))] * len(batch)
            _resolve(batch, results)
            return
        self.commits += 1
        if self.durability == "fsync":
            self._spawn(self._sync_then_resolve(batch, results))
        else:
            _resolve(batch, results)

    async def _sync_then_resolve(self, batch: list[tuple[Op, asyncio.Future[Any]]], results: list[Any]) -> None:
        await asyncio.to_thread(self.env.sync, True)
        _resolve(batch, results)

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
        """An operation queued for a database that was dropped or replaced meanwhile fails cleanly."""
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

    async def create_database(self, name: str, auth: dict[str, str] | None) -> None:
        def op(txn: lmdb.Transaction) -> None:
            if name in self.databases:
                raise conflict("DB_ALREADY_EXISTS", f"database {name!r} already exists")
            db = DatabaseState(name, self._next_id(txn), auth)
            self._save(txn, db)
            self.databases[name] = db

        await self.submit(op)

    async def drop_database(self, db: DatabaseState) -> None:
        def op(txn: lmdb.Transaction) -> None:
            self._live(db)
            txn.delete(_DB_PREFIX + db.name.encode(), db=self.meta)
            self._forget_sets(txn, db.sets.values())
            del self.databases[db.name]

        await self.submit(op)

    def _forget_sets(self, txn: lmdb.Transaction, sets: Any) -> None:
        """Marks sets' data for reclaiming in the background; a drop is O(sets), not O(entries)."""
        for s in sets:
            txn.put(_GC_PREFIX + s.prefix, b"", db=self.meta)
            for fut in s.building.values():
                if not fut.done():
                    fut.set_exception(not_found("INDEX_NOT_FOUND", "the index was dropped while building"))
                    fut.exception()
        if self._loop is not None:
            self._spawn(self._collect_garbage())

    async def create_set(self, db: DatabaseState, name: str) -> None:
        def op(txn: lmdb.Transaction) -> None:
            self._live(db)
            if name in db.sets:
                raise conflict("SET_ALREADY_EXISTS", f"set {name!r} already exists")
            self._new_set(txn, db, name)

        await self.submit(op)

    async def put(self, db: DatabaseState, set_name: str, key: str, value: Any, raw: bytes) -> None:
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

        await self.submit(op)

    async def delete(self, db: DatabaseState, set_name: str, key: str) -> None:
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

        await self.submit(op)

    async def create_index(self, db: DatabaseState, set_name: str, definition: IndexDef) -> None:
        """Registers the index (later writes keep it current), then indexes existing entries."""

        def op(txn: lmdb.Transaction) -> tuple[SetState, Index, asyncio.Future[None]]:
            self._live(db)
            s = self.set_of(db, set_name)
            if definition.name in s.indexes:
                raise conflict("INDEX_ALREADY_EXISTS", f"index {definition.name!r} already exists")
            idx = make_index(definition)
            s.indexes[definition.name] = idx
            self._save(txn, db)
            built: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            s.building[definition.name] = built
            return s, idx, built

        s, idx, built = await self.submit(op)
        self._spawn(self._build_index(db, s, idx, built))
        await built

    async def _build_index(
        self, db: DatabaseState, s: SetState, idx: Index, built: asyncio.Future[None]
    ) -> None:
        """Indexes the committed entries a chunk per tick, so other requests go on meanwhile.

        Writes committed during the build update the index themselves; re-indexing an entry
        the scan reaches later is idempotent, so the result is exact.
        """
        try:
            wanted = lambda: not built.done() and s.indexes.get(idx.definition.name) is idx  # noqa: E731
            if await self._index_existing(s, [idx], wanted) and not built.done():
                built.set_result(None)
        finally:
            if s.building.get(idx.definition.name) is built:
                del s.building[idx.definition.name]

    async def _index_existing(self, s: SetState, indexes: list[Index], wanted: Callable[[], bool]) -> bool:
        """Feeds a set's committed entries to `indexes`, a chunk per loop tick, while `wanted()`.

        Re-indexing an entry is idempotent (update with old == new), so entries that writes
        already indexed meanwhile come out right. False if abandoned.
        """
        start = s.prefix
        while wanted():
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
            await asyncio.sleep(0)
        return False

    async def drop_index(self, db: DatabaseState, set_name: str, name: str) -> None:
        def op(txn: lmdb.Transaction) -> None:
            self._live(db)
            s = self.set_of(db, set_name)
            if name not in s.indexes:
                raise not_found("INDEX_NOT_FOUND", f"index {name!r} not found")
            del s.indexes[name]
            fut = s.building.pop(name, None)
            if fut is not None and not fut.done():
                fut.set_exception(not_found("INDEX_NOT_FOUND", "the index was dropped while building"))
                fut.exception()
            self._save(txn, db)

        await self.submit(op)

    # ----------------------------------------------------------------- reads

    def get(self, s: SetState, key: str) -> bytes | None:
        kb = key.encode()
        with self.env.begin(db=self.data) as txn:
            if len(kb) <= INLINE_KEY_MAX:  # the common case, without a second encode
                return txn.get(s.prefix + b"k" + kb)  # type: ignore[no-any-return]
            return _value_of_stored(key, txn.get(data_key(s.prefix, key)))

    def get_many(self, s: SetState, keys: list[str]) -> list[tuple[str, bytes]]:
        out = []
        with self.env.begin(db=self.data) as txn:
            for key in keys:
                raw = _value_of_stored(key, txn.get(data_key(s.prefix, key)))
                if raw is not None:
                    out.append((key, raw))
        return out

    async def index(self, s: SetState, name: str) -> Index:
        """An index ready to query; waits while it is still being built."""
        idx = s.indexes.get(name)
        if idx is None:
            raise not_found("INDEX_NOT_FOUND", f"index {name!r} not found in set {s.name!r}")
        building = s.building.get(name)
        if building is not None:
            await asyncio.shield(building)
        return idx

    # ----------------------------------------------------------------- reclaiming space

    async def _collect_garbage(self) -> None:
        """Deletes the entries of dropped or replaced sets, a bounded chunk per commit."""
        while True:
            with self.env.begin(db=self.meta) as txn:
                pending = [k for k, _ in txn.cursor(db=self.meta) if k.startswith(_GC_PREFIX)]
            if not pending:
                return
            for marker in pending:
                prefix = marker[len(_GC_PREFIX) :]
                while not await self.submit(lambda txn, p=prefix, m=marker: self._reclaim(txn, p, m)):
                    pass

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
    removes those marks and marks the replaced sets instead.
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

    async def add_set(self, db: StagedDatabase, name: str) -> SetState:
        existing = db.sets.get(name)
        if existing is not None:
            return existing
        engine = self._engine

        def op(txn: lmdb.Transaction) -> SetState:
            s = SetState(name, engine._next_id(txn))
            txn.put(_GC_PREFIX + s.prefix, b"", db=engine.meta)
            return s

        s = db.sets[name] = await engine.submit(op)
        return s

    async def add_index(self, db: StagedDatabase, set_name: str, definition: IndexDef) -> None:
        s = await self.add_set(db, set_name)
        if definition.name in s.indexes:
            raise invalid(f"index {definition.name!r} appears twice for set {set_name!r}")
        s.indexes[definition.name] = make_index(definition)
        if s.count and s not in self._needs_scan:
            self._needs_scan.append(s)  # entries came before the definition

    async def write(self, s: SetState, entries: list[tuple[str, Any, bytes]]) -> None:
        """Stores (key, value, JSON) entries in a staged set and feeds its indexes, a few
        hundred per commit with a loop turn between, so requests wait a few ms at most."""
        engine = self._engine
        engine.ensure_room()
        self._writes += 1
        if self._writes % TRIM_EVERY == 0:
            engine.trim_resident()
        for start in range(0, len(entries), STAGING_COMMIT):
            if start:
                await asyncio.sleep(0)
            await self._write(s, entries[start : start + STAGING_COMMIT])

    async def _write(self, s: SetState, entries: list[tuple[str, Any, bytes]]) -> None:
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

        await engine.submit(op)

    async def commit(self, replace_all: bool) -> None:
        """Swaps the staged databases in, in one commit: readers see all old or all new."""
        engine = self._engine
        names = [d.name for d in self.databases]
        if None in names or len(set(names)) != len(names):
            raise invalid("the backup names a database twice, or not at all")
        for s in self._needs_scan:
            s.indexes = {n: make_index(i.definition) for n, i in s.indexes.items()}
            await engine._index_existing(s, list(s.indexes.values()), lambda: True)

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

        await engine.submit(op)
        engine.trim_resident()
        self.databases = []

    def abort(self) -> None:
        """Drops what was staged; the reclaim marks written by add_set do the rest."""
        self.databases = []
        if self._engine._loop is not None:
            self._engine._spawn(self._engine._collect_garbage())


class Snapshot:
    """A consistent read-only view of all databases at one instant (an LMDB read transaction).

    Usable from one worker thread at a time; writers go on while it is open.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
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
            self._txn.abort()
            self._engine.open_snapshots -= 1


def _resolve(batch: list[tuple[Op, asyncio.Future[Any]]], results: list[Any]) -> None:
    for (_, fut), result in zip(batch, results):
        if fut.done():  # its caller went away
            continue
        if isinstance(result, _Failed):
            fut.set_exception(result.error)
        else:
            fut.set_result(result)


class _Failed:
    """An operation's error, kept in its outcome slot until its caller wakes up."""

    __slots__ = ("error",)

    def __init__(self, error: ApiError) -> None:
        self.error = error

