"""Snapshots from one REPEATABLE READ transaction, and restores staged in one transaction.

A restore writes everything it stages inside a single transaction of its own connection and
swaps the databases in with that transaction's commit: readers on every node see the old
data or the new, never a mix; an abort, or the death of the process, rolls it all back.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
import psycopg

from fuckbase.storage.interface import Credentials, Database, IndexDef, StorageError
from fuckbase.storage.postgresql.store import (
    Conn,
    IndexRow,
    PgDatabase,
    Tx,
    _discard_database,
    api_key,
    copy_records,
    copy_text,
    load_catalog,
    stored_key,
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


class PgRestoreWriter:
    """Stages in one open transaction; `commit` swaps and commits, `abort` rolls back.

    Entries arrive by COPY; index records and counts are built once, at the commit, from the
    entries staged by then, so replayed puts, deletes and dropped indexes cost nothing extra."""

    def __init__(self, storage: PostgresStorage) -> None:
        self._pool = storage.pool
        with translated():
            self._conn: Conn = self._pool.getconn()
            self._conn.execute("BEGIN; SET LOCAL enable_seqscan = on")
            self._conn.execute("CREATE TEMPORARY TABLE fb_incoming (set_id bigint, key text, value json)"
                               " ON COMMIT DROP")
        self._tx = Tx(self._conn, storage.catalogs, 0)
        self._tx.catalog_changed = True  # whatever it stages is looked up, never taken from a cache
        self._dbs: list[PgStagedDatabase] = []
        self._done = False

    @contextlib.contextmanager
    def _step(self) -> Iterator[Tx]:
        """A failure rolls the whole restore back: nothing it staged survives it."""
        try:
            with translated():
                yield self._tx
        except BaseException:
            self.abort()
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

    def write(self, db: Any, set_name: str, entries: Sequence[tuple[str, Any, bytes]]) -> None:
        """A repeated key keeps its last value."""
        if not entries:
            return
        with self._step() as tx:
            sid = self._set(db, set_name)
            last = {key: raw for key, _, raw in entries}
            lines = "".join(f"{sid}\t{copy_text(stored_key(key))}\t{copy_text(raw.decode())}\n" for key, raw in last.items())
            tx.q("SAVEPOINT fresh")
            try:  # keys new to the set (a backup's): straight in
                with tx.conn.cursor().copy("COPY fb_entries FROM STDIN") as copy:
                    copy.write(lines)
            except psycopg.errors.UniqueViolation:  # some were staged already (replayed changes)
                tx.q("ROLLBACK TO SAVEPOINT fresh")
                with tx.conn.cursor().copy("COPY fb_incoming FROM STDIN") as copy:
                    copy.write(lines)
                tx.q("INSERT INTO fb_entries SELECT * FROM fb_incoming ON CONFLICT (set_id, key)"
                     " DO UPDATE SET value = excluded.value")
                tx.q("TRUNCATE fb_incoming")
            tx.q("RELEASE SAVEPOINT fresh")

    def delete(self, db: Any, set_name: str, keys: Sequence[str]) -> None:
        sid = db.sets.get(set_name)
        if sid is None or not keys:
            return
        with self._step() as tx:
            tx.q("DELETE FROM fb_entries WHERE set_id = %s AND key = ANY(%s)", (sid, [stored_key(k) for k in keys]))

    def drop_index(self, db: Any, set_name: str, name: str) -> None:
        ix = db.indexes.get(set_name, {}).pop(name, None)
        if ix is None:
            return
        with self._step() as tx:
            tx.q("DELETE FROM fb_indexes WHERE id = %s", (ix.id,))

    def remove_database(self, db: Any) -> None:
        with self._step() as tx:
            tx.q("DELETE FROM fb_entries WHERE set_id = ANY(%s)", (list(db.sets.values()),))
            tx.q("DELETE FROM fb_databases WHERE id = %s", (db.id,))
        self._dbs.remove(db)

    def _build(self) -> None:
        """The index records of every staged set's final entries, then the counts, by COPY
        and aggregates: memory stays flat however many entries there are."""
        tx = self._tx
        for db in self._dbs:
            for set_name, sid in db.sets.items():
                indexes = tuple(db.indexes[set_name].values())
                if indexes:
                    self._index_set(sid, indexes)
            sets = list(db.sets.values())
            tx.q("INSERT INTO fb_set_counts SELECT set_id, count(*) FROM fb_entries WHERE set_id = ANY(%s)"
                 " GROUP BY set_id", (sets,))
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
        if not self._done:
            with contextlib.suppress(psycopg.Error, StorageError):
                self._conn.execute("ROLLBACK")
            self._release()

    def _release(self) -> None:
        if not self._done:
            self._done = True
            self._pool.putconn(self._conn)
