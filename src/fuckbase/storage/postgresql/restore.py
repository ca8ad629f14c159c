"""Snapshots from one REPEATABLE READ transaction, and restores staged in one transaction.

A restore writes everything it stages inside a single transaction of its own connection and
swaps the databases in with that transaction's commit: readers on every node see the old
data or the new, never a mix; an abort, or the death of the process, rolls it all back.
"""

from __future__ import annotations

import contextlib
import secrets
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
import psycopg

from fuckbase.storage.interface import Credentials, Database, IndexDef, StorageError
from fuckbase.storage.postgresql.store import (
    COPY_SLICE,
    Conn,
    IndexRow,
    PgDatabase,
    RecordMaker,
    Tx,
    _discard_database,
    api_key,
    copy_basic,
    copy_records,
    copy_texts,
    delete_records,
    load_catalog,
    stored_key,
    stored_keys,
    translated,
)

if TYPE_CHECKING:
    from fuckbase.storage.postgresql.store import PostgresStorage

ENTRY_CHUNK = 2000  # rows a snapshot fetches at a time


class PgSnapshot:
    """Every database at one instant while writes go on: a REPEATABLE READ READ ONLY
    transaction held on a connection of its own until `close`."""

    def __init__(self, storage: PostgresStorage) -> None:
        self._pool = storage.pool
        with translated():
            self._conn: Conn = self._pool.getconn()
            try:
                self._conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                row = self._conn.execute("SELECT seq FROM fb_state WHERE id = 1").fetchone()
            except BaseException:
                self._pool.putconn(self._conn)
                raise
        self._sequence = int(row[0]) if row else 0
        self._closed = False

    def databases(self) -> list[Database]:
        with translated():
            catalog = load_catalog(self._conn, 0)
        return [catalog.databases[name] for name in catalog.names()]

    def entries(self, db: Database, set_name: str) -> Iterator[tuple[str, bytes]]:
        assert isinstance(db, PgDatabase)
        with translated(), self._conn.cursor(name=f"fb_snapshot_{secrets.token_hex(4)}") as cur:
            cur.execute("SELECT key, value FROM fb_entries WHERE set_id = %s ORDER BY key", (db.set_ids[set_name],))
            while rows := cur.fetchmany(ENTRY_CHUNK):  # by the chunk: a row at a time costs more than the row
                for key, value in rows:
                    yield api_key(key), value

    def sequence(self) -> int:
        return self._sequence

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(psycopg.Error):
                self._conn.execute("ROLLBACK")
            self._pool.putconn(self._conn)


@dataclass
class PgStagedDatabase:
    id: int
    name: str | None = None
    auth: Credentials | None = None
    sets: dict[str, int] = field(default_factory=dict)
    indexes: dict[str, dict[str, IndexRow]] = field(default_factory=dict)  # by set, by name


class _Staging:
    """One write's entries and their index records as COPY text, made on the caller's thread
    while the writer's thread stores the previous write. A repeated key keeps its last value."""

    def __init__(self, set_id: int, entries: Sequence[tuple[str, Any, bytes]], kept: tuple[IndexRow, ...]) -> None:
        last = dict(zip(stored_keys([key for key, _, _ in entries]), entries, strict=True))
        self.set_id, self.keys, self.kept = set_id, list(last), kept
        self.maker = RecordMaker(kept)
        self.slices: list[str] = []
        self.basic: list[str] = []
        chosen = list(last.values())
        for start in range(0, len(chosen), COPY_SLICE):
            part = chosen[start : start + COPY_SLICE]
            keys = copy_texts(self.keys[start : start + COPY_SLICE])
            values = copy_texts([raw.decode() for _, _, raw in part])
            self.slices.append("".join([f"{set_id}\t{key}\t{value}\n" for key, value in zip(keys, values, strict=True)]))
            if kept:
                self.basic.extend(self.maker.basic_lines([(key, e[1]) for key, e in zip(keys, part, strict=True)]))

    def copy_entries(self, conn: Conn) -> None:
        with conn.cursor().copy("COPY fb_entries FROM STDIN") as copy:
            for text in self.slices:
                copy.write(text)

    def copy_records(self, conn: Conn) -> None:
        if self.basic:
            copy_basic(conn, self.basic)
        self.maker.copy_sortable(conn)


class PgRestoreWriter:
    """Stages in one open transaction; `commit` swaps and commits, `abort` rolls back.

    Entries arrive by COPY, with the records of the indexes their set had before its first
    entry (a backup defines them first), made from the values the reader parsed already;
    replayed puts and deletes move those records as they go. An index defined on a set that
    has entries already gets its records at the commit, from the entries staged by then; the
    counts are aggregated then too."""

    def __init__(self, storage: PostgresStorage) -> None:
        self._pool = storage.pool
        with translated():
            self._conn: Conn = self._pool.getconn()
            self._conn.execute("BEGIN; SET LOCAL enable_seqscan = on")
        self._tx = Tx(self._conn, storage.catalogs, 0)
        self._tx.catalog_changed = True  # whatever it stages is looked up, never taken from a cache
        self._dbs: list[PgStagedDatabase] = []
        self._counts: Counter[int] = Counter()  # entries staged, by set that has had any (the writer's thread adds to it)
        self._deferred: set[int] = set()  # indexes whose records are made at the commit
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="fb-restore")
        self._in_flight: Future[None] | None = None
        self._done = False

    def _settled(self) -> None:
        """Waits for the write in flight; its failure (which rolled the restore back) is raised
        here, to the next caller."""
        if self._in_flight is not None:
            pending, self._in_flight = self._in_flight, None
            pending.result()

    @contextlib.contextmanager
    def _step(self) -> Iterator[Tx]:
        """Every step but a write's waits for the write in flight first."""
        self._settled()
        with self._guarded() as tx:
            yield tx

    @contextlib.contextmanager
    def _guarded(self) -> Iterator[Tx]:
        """A failure rolls the whole restore back: nothing it staged survives it."""
        try:
            with translated():
                yield self._tx
        except BaseException:
            self._rollback()
            raise

    def add_database(self) -> PgStagedDatabase:
        with self._step() as tx:
            row = tx.q("INSERT INTO fb_databases (name) VALUES (NULL) RETURNING id").fetchone()
        assert row is not None
        db = PgStagedDatabase(int(row[0]))
        self._dbs.append(db)
        return db

    def _set(self, db: PgStagedDatabase, name: str) -> int:
        sid = db.sets.get(name)
        if sid is None:
            row = self._tx.q("INSERT INTO fb_sets (database_id, name) VALUES (%s, %s) RETURNING id",
                             (db.id, name)).fetchone()
            assert row is not None
            sid = db.sets[name] = int(row[0])
            db.indexes[name] = {}
        return sid

    def add_set(self, db: Any, name: str) -> None:
        with self._step():
            self._set(db, name)

    def add_index(self, db: Any, set_name: str, definition: IndexDef) -> None:
        self._settled()
        if definition.name in db.indexes.get(set_name, {}):
            raise ValueError(f"index {definition.name!r} is defined twice")
        with self._step() as tx:
            sid = self._set(db, set_name)
            row = tx.q("INSERT INTO fb_indexes (set_id, name, field, kind, sort_fields, ready)"
                       " VALUES (%s, %s, %s, %s, %s, true) RETURNING id",
                       (sid, definition.name, definition.field, definition.kind, list(definition.sort_fields))).fetchone()
            assert row is not None
            db.indexes[set_name][definition.name] = IndexRow(int(row[0]), definition.field, definition.kind,
                                                              tuple(definition.sort_fields))
            if sid in self._counts:  # its entries are staged already
                self._deferred.add(int(row[0]))

    def _kept(self, db: PgStagedDatabase, set_name: str) -> tuple[IndexRow, ...]:
        """The set's indexes whose records move with every staged change."""
        return tuple(ix for ix in db.indexes.get(set_name, {}).values() if ix.id not in self._deferred)

    def write(self, db: Any, set_name: str, entries: Sequence[tuple[str, Any, bytes]]) -> None:
        """Made into COPY text here, stored on a thread of the writer's while the caller reads
        and makes the next ones (PostgreSQL's work and ours overlap); one write is in flight
        at a time."""
        if not entries:
            return
        sid = db.sets.get(set_name)
        if sid is None:
            with self._step():
                sid = self._set(db, set_name)
        staging = _Staging(sid, entries, self._kept(db, set_name))
        self._settled()
        self._in_flight = self._writer.submit(self._store, staging)

    def _store(self, staging: _Staging) -> None:
        with self._guarded() as tx:
            tx.q("SAVEPOINT fresh")
            replaced: list[tuple[Any, ...]] = []
            try:  # keys new to the set (a backup's): straight in
                staging.copy_entries(tx.conn)
            except psycopg.errors.UniqueViolation:  # some were staged already (replayed changes)
                tx.q("ROLLBACK TO SAVEPOINT fresh")
                replaced = tx.q("DELETE FROM fb_entries WHERE set_id = %s AND key = ANY(%s) RETURNING key, value",
                                (staging.set_id, staging.keys)).fetchall()
                staging.copy_entries(tx.conn)
                if staging.kept:
                    delete_records(tx.conn, staging.kept, replaced)
            tx.q("RELEASE SAVEPOINT fresh")
            self._counts[staging.set_id] += len(staging.keys) - len(replaced)
            staging.copy_records(tx.conn)

    def delete(self, db: Any, set_name: str, keys: Sequence[str]) -> None:
        self._settled()
        sid = db.sets.get(set_name)
        if sid is None or not keys:
            return
        with self._step() as tx:
            gone = tx.q("DELETE FROM fb_entries WHERE set_id = %s AND key = ANY(%s) RETURNING key, value",
                        (sid, [stored_key(k) for k in keys])).fetchall()
            if gone:
                self._counts[sid] -= len(gone)
            kept = self._kept(db, set_name)
            if kept:
                delete_records(tx.conn, kept, gone)

    def drop_index(self, db: Any, set_name: str, name: str) -> None:
        self._settled()
        ix = db.indexes.get(set_name, {}).pop(name, None)
        if ix is None:
            return
        with self._step() as tx:
            tx.q("DELETE FROM fb_indexes WHERE id = %s", (ix.id,))
            self._forget_records([ix.id])

    def _forget_records(self, index_ids: list[int]) -> None:
        kept = [i for i in index_ids if i not in self._deferred]
        if kept:
            self._tx.q("DELETE FROM fb_basic WHERE index_id = ANY(%s)", (kept,))
            self._tx.q("DELETE FROM fb_sorted WHERE index_id = ANY(%s)", (kept,))

    def remove_database(self, db: Any) -> None:
        with self._step() as tx:
            self._forget_records([ix.id for by_name in db.indexes.values() for ix in by_name.values()])
            tx.q("DELETE FROM fb_entries WHERE set_id = ANY(%s)", (list(db.sets.values()),))
            tx.q("DELETE FROM fb_databases WHERE id = %s", (db.id,))
        self._dbs.remove(db)

    def _build(self) -> None:
        """The records of the indexes defined after their set's first entry, from the final
        entries, by COPY, then the counts: the sets' as staged, the groups' by aggregates
        (memory stays flat however many entries there are)."""
        tx = self._tx
        for db in self._dbs:
            for set_name, sid in db.sets.items():
                indexes = tuple(ix for ix in db.indexes[set_name].values() if ix.id in self._deferred)
                if indexes:
                    self._index_set(sid, indexes)
            filled = [sid for sid in db.sets.values() if self._counts[sid]]
            tx.q("INSERT INTO fb_set_counts SELECT * FROM unnest(%s::bigint[], %s::bigint[])",
                 (filled, [self._counts[sid] for sid in filled]))
            ixs = [ix.id for by_name in db.indexes.values() for ix in by_name.values()]
            tx.q("INSERT INTO fb_group_counts SELECT index_id, grp, count(*) FROM fb_sorted"
                 " WHERE index_id = ANY(%s) AND field = 0 GROUP BY index_id, grp", (ixs,))

    def _index_set(self, sid: int, indexes: tuple[IndexRow, ...]) -> None:
        conn = self._conn
        with conn.cursor(name=f"fb_build_{secrets.token_hex(4)}") as entries:
            entries.itersize = ENTRY_CHUNK
            entries.execute("SELECT key, value FROM fb_entries WHERE set_id = %s", (sid,))
            while rows := entries.fetchmany(ENTRY_CHUNK):
                copy_records(conn, indexes, rows)

    def commit(self, replace_all: bool, check: Callable[[Database], None] | None = None) -> None:
        """Takes the sequence row (as every write does), checks what the swap replaces,
        renames, numbers, commits."""
        self._settled()
        names = [db.name for db in self._dbs]
        if any(n is None for n in names):
            self.abort()
            raise ValueError("every staged database needs its name before the swap")
        staged_ids = [db.id for db in self._dbs]
        with self._step() as tx:
            tx.q("SAVEPOINT swap")
        try:
            with translated():
                self._swap(replace_all, check, staged_ids, names)
        except BaseException:
            with self._step() as tx:  # a refused swap leaves the staged data as it was
                tx.q("ROLLBACK TO SAVEPOINT swap")
            raise
        with self._step() as tx:
            tx.log(("restore", sorted(str(n) for n in names), replace_all))
            tx.finish()  # and commits
        self._release()

    def _swap(self, replace_all: bool, check: Callable[[Database], None] | None, staged_ids: list[int],
              names: list[str | None]) -> None:
        tx = self._tx
        self._build()  # under the savepoint: a refused swap takes the records back too
        tx.q("SELECT seq FROM fb_state WHERE id = 1 FOR UPDATE")  # before the swap, as every write does
        if replace_all:
            rows = tx.q("SELECT id, name, auth FROM fb_databases WHERE name IS NOT NULL AND NOT id = ANY(%s)"
                        " ORDER BY id", (staged_ids,)).fetchall()
        else:
            rows = tx.q("SELECT id, name, auth FROM fb_databases WHERE name = ANY(%s) ORDER BY id",
                        (names,)).fetchall()
        for db_id, name, auth in rows:
            if check is not None:
                check(PgDatabase(name, auth, {}, db_id))
            _discard_database(tx, db_id)
        for db in self._dbs:
            tx.q("UPDATE fb_databases SET name = %s, auth = %s WHERE id = %s",
                 (db.name, orjson.dumps(dict(db.auth)).decode() if db.auth else None, db.id))

    def abort(self) -> None:
        with contextlib.suppress(Exception):  # a failed write in flight rolled back already
            self._settled()
        self._rollback()

    def _rollback(self) -> None:
        if not self._done:
            with contextlib.suppress(psycopg.Error, StorageError):
                self._conn.execute("ROLLBACK")
            self._release()

    def _release(self) -> None:
        if not self._done:
            self._done = True
            self._writer.shutdown(wait=False)
            self._pool.putconn(self._conn)
