"""The PostgreSQL backend: any number of stateless nodes serving one shared database.

Every write is one PostgreSQL transaction, which first locks the one row holding the sequence
number and ends by taking the next number from it (`fb_commit`, with the counts): commits are
numbered in the order they become visible, without gaps, across every node, retained changes
are stored in the same transaction, and writers never deadlock. A read view is one REPEATABLE
READ transaction: catalog and data from one instant; point reads, many at once, are one
statement that reads the catalog version too. Index contents are computed here, with
the same rules as the embedded backend (`fuckbase.storage.values`), and kept in side tables.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson
import psycopg
import psycopg.errors
from psycopg.adapt import Loader
from psycopg_pool import ConnectionPool, PoolTimeout

from fuckbase.storage.interface import (
    BASIC,
    SORTABLE,
    AccessCheck,
    BatchKeyNotFound,
    BatchOp,
    Change,
    Credentials,
    Database,
    DatabaseExists,
    DatabaseNotFound,
    Delete,
    Entry,
    Figure,
    Get,
    IndexDef,
    IndexExists,
    IndexNotFound,
    KeyNotFound,
    Lookup,
    Page,
    PointRead,
    RestoreWriter,
    SetExists,
    SetInfo,
    SetNotFound,
    Snapshot,
    SortOrder,
    StorageError,
    StorageFailure,
    StorageFull,
    StorageUnavailable,
)
from fuckbase.storage.postgresql.schema import migrate
from fuckbase.storage.values import (
    MISSING,
    MISSING_SORT_TOKEN,
    field_of,
    group_token,
    indexed_text,
    is_truncated,
    match_text,
    sort_rank,
    sort_token,
)

log = logging.getLogger("fuckbase.storage.postgresql")

Conn = psycopg.Connection[tuple[Any, ...]]

BUILD_CHUNK = 5000  # entries an index build reads per transaction
COPY_SLICE = 500  # index records computed and sent at a time
BUILD_LOCK_SQL = "SELECT {op}(hashtextextended('fuckbase:build:' || %s, 0))"  # held while an index is built
RECLAIM_CHUNK = 10_000  # rows housekeeping deletes per statement
STATEMENT_TIMEOUT_MS = 60_000
GROUPS_UNDER_THE_ROW_AFTER_A_MOVE = 16  # contended entries: planning again and again wastes the work
GUESS_AFTER = 8  # groups in a row whose entries were all new before the next ones are guessed new unread
GUESS_AFTER_MOST = 1024  # each wrong guess doubles GUESS_AFTER, up to this
# Sessions run with enable_seqscan off, and merge and hash joins off: every statement here
# reaches its rows through an index, one lookup per row it names, and a plan cached while a
# table was small (a new database) must not go on scanning it whole once it grew (until the
# next ANALYZE: 800 µs a put were measured so, and 650 µs with a kept merge join of a group's
# JSON array of entries with the whole entries table). Restores scan their staging table,
# which has no index, and turn seqscan back on for their transaction.
# JIT off: with seqscan off, a statement that must scan a small table (housekeeping's) costs
# over jit_above_cost, and compiling it took ~100 ms of CPU each time, every second.
SESSION_OPTIONS = ("-c statement_timeout={timeout_ms} -c enable_seqscan=off -c enable_mergejoin=off"
                   " -c enable_hashjoin=off -c jit=off")


IDLE_CHECK_SECONDS = 0.25


def liveness(timeout_ms: int) -> dict[str, Any]:
    """libpq's TCP settings that give up on a database host gone without a word (powered off,
    cut off, its address moved to a standby) within about the storage timeout, where the
    system's defaults wait two hours: a connection waiting for an answer sends nothing, so
    only keepalives can find that out. A live host's kernel answers them however long a
    statement runs."""
    seconds = max(3, timeout_ms // 1000)
    return {"keepalives": 1, "keepalives_idle": seconds // 3, "keepalives_interval": max(1, seconds // 9),
            "keepalives_count": 3, "tcp_user_timeout": seconds * 1000}


class _IdleCheck:
    """The pool's check of a connection as it is handed out: one last handed out
    IDLE_CHECK_SECONDS ago or more is tried with an empty statement first, so that a
    PostgreSQL restarted meanwhile (which takes longer than that) costs no request a 503: a
    dead connection is dropped and another taken. Under load connections come back within
    milliseconds and no round trip is added; at a few requests a second it costs nothing that
    shows. (Timed at checkout: the pool's `reset` hook would move every return to its worker
    thread.)"""

    def __init__(self) -> None:
        self._handed_out: weakref.WeakKeyDictionary[Conn, float] = weakref.WeakKeyDictionary()

    def __call__(self, conn: Conn) -> None:
        now = time.monotonic()
        last = self._handed_out.get(conn)
        self._handed_out[conn] = now
        if last is not None and now - last >= IDLE_CHECK_SECONDS:
            ConnectionPool.check_connection(conn)


class _RawJson(Loader):
    """`json` columns come back as the stored bytes: the exact text the API was given."""

    def load(self, data: Any) -> bytes:
        return bytes(data)


def _configure(conn: Conn) -> None:
    conn.adapters.register_loader("json", _RawJson)


ERRORS: dict[str, int] = {}  # database errors by kind, for /metrics (one process's)


def _failed(kind: str) -> None:
    ERRORS[kind] = ERRORS.get(kind, 0) + 1


def _one_line(exc: BaseException) -> str:
    """libpq's messages run over several lines; an error answer and a log line hold one."""
    return " ".join(str(exc).split())


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """PostgreSQL's failures as the storage errors the API maps to statuses, counted by kind."""
    try:
        yield
    except StorageError:
        raise
    except PoolTimeout as exc:
        _failed("no_connection")
        raise StorageUnavailable(f"PostgreSQL is unavailable: no connection ({_one_line(exc)})") from None
    except psycopg.errors.DiskFull as exc:
        _failed("disk_full")
        raise StorageFull(f"PostgreSQL's disk is full: {_one_line(exc)}") from None
    except psycopg.errors.QueryCanceled as exc:
        _failed("timeout")
        raise StorageUnavailable(f"PostgreSQL did not answer in time: {_one_line(exc)}") from None
    except (psycopg.OperationalError, psycopg.errors.AdminShutdown, psycopg.errors.CannotConnectNow) as exc:
        _failed("unavailable")
        raise StorageUnavailable(f"PostgreSQL is unavailable: {_one_line(exc)}") from None
    except psycopg.errors.ReadOnlySqlTransaction as exc:  # a standby: a failover is under way or went wrong
        _failed("read_only")
        raise StorageUnavailable(f"PostgreSQL is read-only (a standby, not the primary): {_one_line(exc)}") from None
    except psycopg.Error as exc:
        _failed("failure")
        raise StorageFailure(f"PostgreSQL failed: {type(exc).__name__}: {_one_line(exc)}") from None


# ------------------------------------------------------------------ catalog objects


@dataclass(frozen=True)
class PgDatabase(Database):
    """A database as a view saw it, with the ids its rows are found by."""

    id: int = 0
    set_ids: dict[str, int] = field(default_factory=dict)
    index_ids: dict[tuple[str, str], int] = field(default_factory=dict)


@dataclass(frozen=True)
class IndexRow:
    """An index as writes keep it: while it is built (not `ready`), only for the keys up to
    `filled_to`, the build adding the records of the others."""

    id: int
    field: str
    kind: str
    sort_fields: tuple[str, ...]
    ready: bool = True
    filled_to: str | None = None

    def covers(self, stored: str) -> bool:
        return self.ready or (self.filled_to is not None and stored <= self.filled_to)

    @property
    def definition(self) -> IndexDef:
        return IndexDef("", self.field, SORTABLE if self.kind == SORTABLE else BASIC, self.sort_fields)


@dataclass(frozen=True)
class Catalog:
    """Every database, set and index at one catalog version: read views take their databases
    from it, writes their sets and every index to keep current (ready or being built)."""

    version: int
    databases: dict[str, PgDatabase]
    indexes: dict[int, tuple[IndexRow, ...]]  # by set id

    def names(self) -> list[str]:
        return sorted(self.databases)

    def has_indexes(self, set_id: int) -> bool:
        return bool(self.indexes.get(set_id))


# every named database with its sets and indexes: [[set id, name, [[index id, name, field,
# kind, sort fields, ready], ...]], ...]
CATALOG_SQL = """
SELECT d.id, d.name, d.auth,
       (SELECT json_agg(json_build_array(s.id, s.name,
                (SELECT json_agg(json_build_array(i.id, i.name, i.field, i.kind, i.sort_fields, i.ready, i.filled_to)
                                  ORDER BY i.id)
                   FROM fb_indexes i WHERE i.set_id = s.id)) ORDER BY s.name)
          FROM fb_sets s WHERE s.database_id = d.id)
  FROM fb_databases d WHERE d.name IS NOT NULL
"""


def load_catalog(conn: Conn, version: int) -> Catalog:
    """The catalog as the connection's transaction sees it (whose version is `version`)."""
    databases: dict[str, PgDatabase] = {}
    all_indexes: dict[int, tuple[IndexRow, ...]] = {}
    for db_id, name, auth, sets_json in conn.execute(CATALOG_SQL).fetchall():
        sets: dict[str, SetInfo] = {}
        set_ids: dict[str, int] = {}
        index_ids: dict[tuple[str, str], int] = {}
        for set_id, set_name, indexes in orjson.loads(sets_json) if sets_json else []:
            ready = {}
            rows = []
            for ix_id, ix_name, fld, kind, sort_fields, is_ready, filled_to in indexes or []:
                rows.append(IndexRow(ix_id, fld, kind, tuple(sort_fields or ()), is_ready, filled_to))
                if is_ready:
                    ready[ix_name] = IndexDef(ix_name, fld, SORTABLE if kind == SORTABLE else BASIC,
                                              tuple(sort_fields or ()))
                    index_ids[(set_name, ix_name)] = ix_id
            sets[set_name] = SetInfo(set_name, ready)
            set_ids[set_name] = set_id
            all_indexes[set_id] = tuple(rows)
        databases[name] = PgDatabase(name, auth, sets, db_id, set_ids, index_ids)
    return Catalog(version, databases, all_indexes)


class CatalogCache:
    """The newest catalog this process read, by version: a view or write whose transaction
    sees the same version uses it without reading the catalog again. Every change to the
    catalog moves the version (`fb_commit`), on whichever node makes it."""

    def __init__(self) -> None:
        self._catalog: Catalog | None = None
        self._lock = threading.Lock()

    @property
    def newest(self) -> Catalog | None:
        return self._catalog

    def at(self, conn: Conn, version: int) -> Catalog:
        cached = self._catalog
        if cached is not None and cached.version == version:
            return cached
        catalog = load_catalog(conn, version)
        with self._lock:
            if self._catalog is None or self._catalog.version < version:
                self._catalog = catalog
        return catalog


# ------------------------------------------------------------------ index records of an entry


def _records(indexes: Sequence[IndexRow], value: Any) -> tuple[list[tuple[int, bytes]], list[tuple[int, int, bytes, bytes]]]:
    """The basic (index id, group) and sortable (index id, field number, group, sort token)
    records of one value; none when it is absent (MISSING)."""
    basic: list[tuple[int, bytes]] = []
    sortable: list[tuple[int, int, bytes, bytes]] = []
    if value is MISSING:
        return basic, sortable
    for ix in indexes:
        text = indexed_text(value, ix.field)
        if text is None:
            continue
        group = group_token(text)
        if ix.kind == BASIC:
            basic.append((ix.id, group))
        else:
            for i, f in enumerate(ix.sort_fields):
                sortable.append((ix.id, i, group, sort_token(field_of(value, f))))
    return basic, sortable


class _Unknown:
    """What a write transaction has not read of an entry."""


UNKNOWN = _Unknown()
PRESENT = b"?"  # an entry read ahead without its value (its set has no index to keep)

# entries read ahead: [[set id, stored key, with its value], ...] -> (position, value or NULL,
# row version); PEEK_SQL, before the sequence row is taken, answers the catalog version
# beside them (one row of NULLs when none is found), in one prepared statement
READ_AHEAD_SQL = b"SELECT * FROM fb_peek(%s::json)"
PEEK_SQL = (b"SELECT s.catalog, q.i - 1, CASE WHEN q.r->>2 = 'true' THEN e.value END, e.xmin::text"
            b" FROM fb_state s LEFT JOIN (jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS q(r, i)"
            b" JOIN fb_entries e ON e.set_id = (q.r->>0)::bigint AND e.key = (q.r->>1) COLLATE \"C\") ON true"
            b" WHERE s.id = 1")
WRITE_PARTS = ("puts", "deletes", "add_basic", "del_basic", "add_sorted", "del_sorted")  # fb_write_parts's parameters
_PARTS = ", ".join(["%s::jsonb"] * len(WRITE_PARTS))
WRITE_SQL = f"SELECT fb_write_parts({_PARTS})"
FINISH_SQL = (f"SELECT fb_finish(%s::bigint, %s::json, {_PARTS}, %s::bigint[], %s::bigint[], %s::float8, %s::int,"
              " %s::bytea, %s::boolean)")


def _read_ahead_param(wanted: Sequence[EntryKey], values: Callable[[int], bool]) -> str:
    return orjson.dumps([[sid, key, values(sid)] for sid, key in wanted]).decode()


@dataclass
class _Touched:
    """An entry a transaction changed: its value before the transaction and now (MISSING: absent)."""

    indexes: Sequence[IndexRow]
    before: Any
    after: Any


EntryKey = tuple[int, str]  # (set id, stored key)


class _NeedsLock(Exception):
    """A write of a group run before its transaction began needs a statement of its own."""


class Tx:
    """One write transaction: the ops it logs, the entries it touched, the counts it moves.

    Entries whose values it read ahead (`read_ahead`) are written at the end, all at once
    (`pending`): a group of writes or a batch costs a few statements, not one per entry.
    A `planned` one runs before its transaction begins, on what was read ahead alone: a
    write that needs a statement raises _NeedsLock."""

    def __init__(self, conn: Conn, catalogs: CatalogCache, version: int, parent: Tx | None = None,
                 planned: bool = False) -> None:
        self.conn = conn
        self.catalogs = catalogs
        self.version = version  # of the catalog as the transaction began
        self.parent = parent
        self.planned = planned
        self.catalog_changed = False
        self.ops: list[Any] = []
        self.touched: dict[EntryKey, _Touched] = {}
        self.set_deltas: dict[int, int] = {}
        self.known: dict[EntryKey, bytes | None] = {}  # an entry's JSON as this transaction sees it (None: absent)
        self.pending: dict[EntryKey, bytes | None] = {}  # what to write at the end (None: delete)

    def current(self, entry: EntryKey) -> bytes | None | _Unknown:
        """The entry as this transaction sees it, if read ahead or written by it."""
        tx: Tx | None = self
        while tx is not None:
            if entry in tx.known:
                return tx.known[entry]
            tx = tx.parent
        return UNKNOWN

    def read_ahead(self, entries: Sequence[EntryKey], values: Callable[[int], bool]) -> None:
        """Reads the entries not known yet in one statement; their values only for the sets
        where `values(set id)` (the sets with indexes), else just whether they exist."""
        wanted = [e for e in dict.fromkeys(entries) if self.current(e) is UNKNOWN]
        if wanted:
            self.took(wanted, self.q(READ_AHEAD_SQL, (_read_ahead_param(wanted, values),)).fetchall())

    def took(self, wanted: Sequence[EntryKey], rows: Sequence[tuple[Any, ...]]) -> None:
        """What READ_AHEAD_SQL answered for `wanted`: the others are absent."""
        for i, value, _ in rows:
            self.known[wanted[i]] = PRESENT if value is None else value
        for e in wanted:
            self.known.setdefault(e, None)

    def q(self, sql: str | bytes, params: Sequence[Any] | dict[str, Any] | None = None) -> psycopg.Cursor[tuple[Any, ...]]:
        if self.planned:
            raise _NeedsLock
        return self.conn.execute(sql, params)

    def log(self, op: Any) -> None:
        self.ops.append(op)

    def nested(self) -> Tx:
        return Tx(self.conn, self.catalogs, self.version, parent=self, planned=self.planned)

    def touch(self, set_id: int, key: str, indexes: Sequence[IndexRow], before: Any, after: Any) -> None:
        seen = self.touched.get((set_id, key))
        if seen is None:
            self.touched[(set_id, key)] = _Touched(indexes, before, after)
        else:
            seen.after = after
        if (before is MISSING) != (after is MISSING):
            self.set_deltas[set_id] = self.set_deltas.get(set_id, 0) + (1 if before is MISSING else -1)

    def absorb(self, child: Tx) -> None:
        """Takes in what a nested write (a savepoint) did, once it succeeded."""
        self.ops.extend(child.ops)
        self.catalog_changed = self.catalog_changed or child.catalog_changed
        for k, t in child.touched.items():
            if k in self.touched:
                self.touched[k].after = t.after
            else:
                self.touched[k] = t
        for sid, n in child.set_deltas.items():
            self.set_deltas[sid] = self.set_deltas.get(sid, 0) + n
        self.known.update(child.known)
        self.pending.update(child.pending)

    def _records_moved(self, into: dict[str, list[Any]]) -> None:
        """The index records of every touched entry, from its value before to its value now,
        as fb_write_parts takes them."""
        for (_, key), t in self.touched.items():
            indexes = [ix for ix in t.indexes if ix.covers(key)]
            if not indexes:
                continue
            ob, os_ = _records(indexes, t.before)
            nb, ns = _records(indexes, t.after)
            if ob == nb and os_ == ns:
                continue
            into["del_basic"] += [[i, g.hex(), key] for i, g in ob if (i, g) not in nb]
            into["add_basic"] += [[i, g.hex(), key] for i, g in nb if (i, g) not in ob]
            into["del_sorted"] += [[i, f, g.hex(), o.hex(), key] for i, f, g, o in os_ if (i, f, g, o) not in ns]
            into["add_sorted"] += [[i, f, g.hex(), o.hex(), key] for i, f, g, o in ns if (i, f, g, o) not in os_]
        self.touched.clear()

    def _changes(self, entries: bool) -> list[str | None] | None:
        """fb_write_parts's arguments, a JSON array per part (None: nothing of it): the index records
        moved so far, and (`entries`) the pending entries; None when there is nothing to write."""
        w: dict[str, list[Any]] = {"del_basic": [], "add_basic": [], "del_sorted": [], "add_sorted": []}
        self._records_moved(w)
        if entries and self.pending:
            w["puts"] = [[sid, key, raw.decode()] for (sid, key), raw in self.pending.items() if raw is not None]
            w["deletes"] = [[sid, key] for (sid, key), raw in self.pending.items() if raw is None]
            self.pending.clear()
        if not any(w.values()):
            return None
        return [orjson.dumps(w[part]).decode() if w.get(part) else None for part in WRITE_PARTS]

    def write_index_records(self) -> None:
        """Writes the index records of what was touched so far (before a savepoint, say)."""
        changes = self._changes(entries=False)
        if changes is not None:
            self.q(WRITE_SQL, changes)

    def finish(self, seen: tuple[int, str] | None = None) -> int | None:
        """The transaction's end, in one round trip: its pending entries and index records,
        the set counts, and the commit; numbered (its sequence number and change) when it
        logged what it did — writes that only prepare or fill an index are not. `seen` (the
        catalog version and entry versions a planned group read): the transaction is this
        one prepared statement, which first takes the sequence row and checks that nothing
        read moved."""
        changes = self._changes(entries=True) or [None] * len(WRITE_PARTS)
        sets = sorted((k, v) for k, v in self.set_deltas.items() if v)
        now = time.time()
        record = orjson.dumps({"t": now, "n": len(self.ops), "ops": self.ops}) if self.ops else b""
        params = [*(seen or (None, None)), *changes, [k for k, _ in sets], [v for _, v in sets], now,
                  len(self.ops), record, self.catalog_changed]
        if seen is not None:
            row = self.conn.execute(FINISH_SQL, params, prepare=True).fetchone()
        else:
            cur = psycopg.ClientCursor(self.conn)
            cur.execute(FINISH_SQL + "; COMMIT", params)
            row = cur.fetchone()
        return None if row is None or row[0] is None else int(row[0])


@contextlib.contextmanager
def writing(conn: Conn, then: tuple[bytes, str] | None = None) -> Iterator[tuple[int, list[tuple[Any, ...]]]]:
    """A write transaction; yields the catalog version it sees, and the rows of `then` (a
    query and its one parameter, run once the lock is held). It takes the sequence row first:
    writers on every node run one at a time from there to their commit (which numbering needs
    anyway), so none waits for a lock another holds while that one waits for its, whatever
    keys a group of writes touches, and the catalog cannot change under it; the same round
    trip begins the transaction and runs `then`."""
    begin = b"BEGIN; SELECT fb_lock()"
    try:
        if then is None:
            cur = conn.execute(begin)
        else:
            cur = psycopg.ClientCursor(conn)
            cur.execute(begin + b"; " + then[0], (then[1],))
        cur.nextset()
        row = cur.fetchone()
        rows = cur.fetchall() if then is not None and cur.nextset() else []
        yield (int(row[0]) if row else 0), rows
    except BaseException:
        with contextlib.suppress(psycopg.Error):
            conn.execute("ROLLBACK")
        raise
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:  # not committed by Tx.finish
        conn.execute("COMMIT")


@dataclass(frozen=True)
class Target:
    """What a write found of its database and set (locked against drops and restores)."""

    database_id: int
    set_id: int | None
    indexes: tuple[IndexRow, ...]


def target(tx: Tx, database: str, set_name: str, check: AccessCheck, *, create_set: bool = False) -> Target:
    """The database and set a write goes to (with every index of the set, ready or being
    built), its credentials checked: from the cached catalog when it is the transaction's,
    else (the transaction changed it already) read."""
    if not tx.catalog_changed:
        catalog = tx.catalogs.at(tx.conn, tx.version)
        db = catalog.databases.get(database)
        if db is None:
            raise DatabaseNotFound(database)
        db_id, auth, set_id = db.id, db.auth, db.set_ids.get(set_name)
        indexes = catalog.indexes.get(set_id, ()) if set_id is not None else ()
    else:
        row = tx.q(TARGET_SQL, (set_name, database)).fetchone()
        if row is None:
            raise DatabaseNotFound(database)
        db_id, auth, set_id, found = row
        indexes = tuple(IndexRow(i, f, k, tuple(s or ()), r, upto) for i, f, k, s, r, upto in orjson.loads(found)) \
            if found else ()
    check(auth)
    if set_id is None and create_set:
        set_id = _create_set(tx, db_id, database, set_name)
    return Target(db_id, set_id, indexes)


TARGET_SQL = """
SELECT d.id, d.auth, s.id,
       (SELECT json_agg(json_build_array(i.id, i.field, i.kind, i.sort_fields, i.ready, i.filled_to) ORDER BY i.id)
          FROM fb_indexes i WHERE i.set_id = s.id)
  FROM fb_databases d LEFT JOIN fb_sets s ON s.database_id = d.id AND s.name = %s
 WHERE d.name = %s
"""


def _create_set(tx: Tx, db_id: int, database: str, set_name: str) -> int:
    row = tx.q("INSERT INTO fb_sets (database_id, name) VALUES (%s, %s) ON CONFLICT DO NOTHING RETURNING id",
               (db_id, set_name)).fetchone()
    if row is None:  # created meanwhile by another writer
        found = tx.q("SELECT id FROM fb_sets WHERE database_id = %s AND name = %s", (db_id, set_name)).fetchone()
        assert found is not None
        return int(found[0])
    tx.log(("create_set", database, set_name))
    tx.catalog_changed = True
    return int(row[0])


def stored_key(key: str) -> str:
    """A key as the tables hold it: PostgreSQL's text holds no NUL, so NUL and U+0001 are
    written as two characters each (U+0001 U+0001, U+0001 U+0002), which keeps the order."""
    if "\x00" in key or "\x01" in key:
        return key.replace("\x01", "\x01\x02").replace("\x00", "\x01\x01")
    return key


def _each_where_needed(texts: list[str], marks: str, convert: Callable[[str], str]) -> list[str]:
    """`convert` of each text, with one look at them all first: almost none holds any of `marks`."""
    joined = "".join(texts)
    if any(mark in joined for mark in marks):
        return [convert(text) for text in texts]
    return texts


def stored_keys(keys: list[str]) -> list[str]:
    """Many keys as `stored_key` writes them."""
    return _each_where_needed(keys, "\x00\x01", stored_key)


def api_key(stored: str) -> str:
    """The key `stored_key` wrote."""
    if "\x01" in stored:
        return stored.replace("\x01\x01", "\x00").replace("\x01\x02", "\x01")
    return stored


def _parsed(raw: bytes | str | None) -> Any:
    return MISSING if raw is None else orjson.loads(raw)


# ------------------------------------------------------------------ the storage


class PostgresStorage:
    """One process's handle on a PostgreSQL database (`postgresql://…`). Thread-safe; any
    number of processes on any number of machines may share the database."""

    remote = True
    shared = True  # every node on the database

    def __init__(self, url: str, *, pool_size: int = 8, connect_timeout: float = 5.0,
                 statement_timeout_ms: int = STATEMENT_TIMEOUT_MS, wait_for_database: bool = False) -> None:
        """`wait_for_database`: if PostgreSQL cannot be reached, answer StorageUnavailable until
        it can (a process started again while it is away) rather than raise it here."""
        self.url = url
        self._unmigrated = True  # until a connection has brought the schema to this release's
        self._migrating = threading.Lock()
        self._alive = liveness(statement_timeout_ms)
        session: dict[str, Any] = {"autocommit": True, "connect_timeout": max(1, int(connect_timeout)),
                                   "options": SESSION_OPTIONS.format(timeout_ms=statement_timeout_ms), **self._alive}
        self.pool: ConnectionPool[Conn] = ConnectionPool(
            url, min_size=1, max_size=pool_size, open=False, timeout=connect_timeout, configure=self._configure,
            check=_IdleCheck(), kwargs=session, name="fuckbase")
        self._groups = threading.local()
        self._groups_under_the_row = 0  # groups to run under the sequence row before planning again
        self.replanned_groups = 0  # planned groups whose entries moved before they took the row
        self._new_keys = _NewKeys()
        self.catalogs = CatalogCache()
        self._leading: dict[str, Conn] = {}  # a connection per role asked for
        self._held: set[str] = set()  # the roles whose lock those hold
        self._leading_lock = threading.Lock()
        try:
            with translated(), psycopg.connect(url, **session) as conn:
                migrate(conn)  # SchemaTooNew: this release cannot serve that database
            self._unmigrated = False
        except StorageUnavailable as exc:
            if not wait_for_database:
                raise
            # the pool's first new connection migrates the schema once PostgreSQL is back
            log.warning("%s: answering 503 until it is reachable", exc)
        self.pool.open(wait=False)

    def _configure(self, conn: Conn) -> None:
        """Every new connection: our loaders; the first one also migrates the schema (a newer
        schema than this release's is refused then: SchemaTooNew)."""
        _configure(conn)
        if self._unmigrated:
            with self._migrating:
                if self._unmigrated:
                    migrate(conn)
                    self._unmigrated = False

    # -- plumbing

    @contextlib.contextmanager
    def _conn(self) -> Iterator[Conn]:
        with translated(), self.pool.connection() as conn:
            yield conn

    def _write(self, op: Callable[[Tx], Any], *, savepoint: bool = False,
               entry: tuple[str, str, str] | None = None) -> Any:
        """Runs a write as its own transaction, or queues it in this thread's open group;
        `savepoint`: it may fail after changing something (in a group, it then runs under
        a savepoint of its own); `entry`: the (database, set, key) it writes, which a group
        reads ahead with the others'."""
        group: _Group | None = getattr(self._groups, "open", None)
        if group is not None:
            group.queue.append((op, savepoint))
            if entry is not None:
                group.entries.append(entry)
            return None
        with self._conn() as conn, writing(conn) as (version, _):
            tx = Tx(conn, self.catalogs, version)
            result = op(tx)
            tx.finish()
        return result

    # -- groups

    def begin_group(self) -> None:
        """From now until `end_group`, this thread's writes are queued; `end_group` runs them
        in order in one transaction (a failing one changes nothing, see `_run_writes`), and
        commits them all as one numbered commit."""
        if getattr(self._groups, "open", None) is not None:
            raise RuntimeError("a write group is already open on this thread")
        self._groups.open = _Group()

    def queued_writes(self) -> int:
        group: _Group | None = getattr(self._groups, "open", None)
        return len(group.queue) if group is not None else 0

    def end_group(self) -> list[BaseException | None]:
        """Each write fails before it changes anything (a missing database, a refused access
        check) or not at all, but for batches, which run under a savepoint; a failure of
        PostgreSQL itself fails the whole group."""
        group: _Group = self._groups.open
        self._groups.open = None
        if not group.queue:
            return []
        try:
            with self._conn() as conn:
                results = self._planned_group(conn, group)
                return results if results is not None else self._locked_group(conn, group)
        except StorageError as exc:
            return [exc] * len(group.queue)

    def _planned_group(self, conn: Conn, group: _Group) -> list[BaseException | None] | None:
        """The group's writes done before the sequence row is taken, on entries read without
        it, then written, checked and committed in one round trip: the writers of every node
        hold the row for that round trip only. While groups come whose entries are all new
        (keys loaded or appended), the read is skipped: the writes run on the guess that none
        of their entries exists, which the commit checks like a read. None when the writes
        need statements of their own (a new set, a batch), or when what they read moved
        meanwhile (a few groups after that go straight to the row); the group is then to run
        under the row."""
        if self._groups_under_the_row > 0:
            self._groups_under_the_row -= 1
            return None
        catalog = self.catalogs.newest
        if catalog is None or any(savepoint for _, savepoint in group.queue):
            return None
        wanted = _known_entries(catalog, group.entries)
        if not wanted:
            return None
        if self._new_keys.likely():
            try:
                return self._planned_on(conn, group, catalog.version, wanted, [])
            except psycopg.errors.SerializationFailure:
                self._new_keys.wrong()
        peeked = conn.execute(PEEK_SQL, (_read_ahead_param(wanted, catalog.has_indexes),), prepare=True).fetchall()
        if not peeked or int(peeked[0][0]) != catalog.version:
            return None
        rows = [r[1:] for r in peeked if r[1] is not None]
        self._new_keys.read(found=bool(rows))
        try:
            return self._planned_on(conn, group, catalog.version, wanted, rows)
        except psycopg.errors.SerializationFailure:
            self.replanned_groups += 1
            self._groups_under_the_row = GROUPS_UNDER_THE_ROW_AFTER_A_MOVE
            return None

    def _planned_on(self, conn: Conn, group: _Group, version: int, wanted: list[EntryKey],
                    rows: list[tuple[Any, ...]]) -> list[BaseException | None] | None:
        """The group run and committed on catalog `version` and the entries of `wanted` as
        `rows` found them (the others absent); SerializationFailure if any of that moved."""
        tx = Tx(conn, self.catalogs, version, planned=True)
        tx.took(wanted, rows)
        versions: dict[int, str] = {i: version for i, _, version in rows}
        seen = orjson.dumps([[sid, key, versions.get(i)] for i, (sid, key) in enumerate(wanted)]).decode()
        try:
            results = _run_writes(tx, group.queue)
        except _NeedsLock:
            return None
        tx.finish(seen=(version, seen))
        return results

    def _locked_group(self, conn: Conn, group: _Group) -> list[BaseException | None]:
        """The group's writes in a transaction that takes the sequence row first."""
        catalog = self.catalogs.newest
        wanted = _known_entries(catalog, group.entries) if catalog is not None else []
        then = (READ_AHEAD_SQL, _read_ahead_param(wanted, catalog.has_indexes)) \
            if catalog is not None and wanted else None
        with writing(conn, then) as (version, ahead):
            tx = Tx(conn, self.catalogs, version)
            if catalog is None or catalog.version != version:  # it moved: read again, by its new ids
                catalog = self.catalogs.at(conn, version)
                tx.read_ahead(_known_entries(catalog, group.entries), catalog.has_indexes)
            elif then is not None:
                tx.took(wanted, ahead)
            results = _run_writes(tx, group.queue)
            tx.finish()
        return results

    # -- catalog

    def read(self) -> contextlib.AbstractContextManager[PgView]:
        return self._view()

    def fetch(self, reads: Sequence[PointRead]) -> list[Any]:
        """One statement, resolved against the newest catalog this process knows; when the
        version that statement saw is another, again in a transaction at the new catalog."""
        with self._conn() as conn:
            catalog = self.catalogs.newest
            if catalog is not None:
                fetch = PointReads(catalog, reads)
                if fetch.run(conn):
                    return fetch.answers()
            with self._view_on(conn) as view:
                fetch = PointReads(view.catalog, reads)
                fetch.run(conn)
                return fetch.answers()

    @contextlib.contextmanager
    def _view(self) -> Iterator[PgView]:
        with self._conn() as conn, self._view_on(conn) as view:
            yield view

    @contextlib.contextmanager
    def _view_on(self, conn: Conn) -> Iterator[PgView]:
        # the snapshot is taken by a transaction's first query: here, so the view's instant is now
        cur = conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT catalog FROM fb_state WHERE id = 1")
        cur.nextset()
        row = cur.fetchone()
        try:
            yield PgView(conn, self.catalogs.at(conn, int(row[0]) if row else 0))
        finally:
            with contextlib.suppress(psycopg.Error):
                conn.execute("ROLLBACK")

    def create_database(self, name: str, auth: Credentials | None) -> None:
        def op(tx: Tx) -> None:
            row = tx.q("INSERT INTO fb_databases (name, auth) VALUES (%s, %s) ON CONFLICT DO NOTHING RETURNING id",
                       (name, orjson.dumps(dict(auth)).decode() if auth else None)).fetchone()
            if row is None:
                raise DatabaseExists(name)
            tx.log(("create_database", name, dict(auth) if auth else None))
            tx.catalog_changed = True

        self._write(op)

    def drop_database(self, name: str, check: AccessCheck) -> None:
        def op(tx: Tx) -> None:
            row = tx.q("SELECT id, auth FROM fb_databases WHERE name = %s", (name,)).fetchone()
            if row is None:
                raise DatabaseNotFound(name)
            check(row[1])
            _discard_database(tx, row[0])
            tx.log(("drop_database", name))

        self._write(op)

    def create_set(self, database: str, name: str, check: AccessCheck) -> None:
        def op(tx: Tx) -> None:
            t = target(tx, database, name, check)
            if t.set_id is not None:
                raise SetExists(name)
            row = tx.q("INSERT INTO fb_sets (database_id, name) VALUES (%s, %s) ON CONFLICT DO NOTHING RETURNING id",
                       (t.database_id, name)).fetchone()
            if row is None:
                raise SetExists(name)
            tx.log(("create_set", database, name))
            tx.catalog_changed = True

        self._write(op)

    # -- entries

    def put(self, database: str, set_name: str, key: str, value: Any, raw: bytes, check: AccessCheck) -> None:
        def op(tx: Tx) -> None:
            t = target(tx, database, set_name, check, create_set=True)
            assert t.set_id is not None
            _put(tx, t, key, value, raw)
            tx.log(("put", database, set_name, key, orjson.Fragment(raw)))

        self._write(op, entry=(database, set_name, key))

    def delete(self, database: str, set_name: str, key: str, check: AccessCheck) -> None:
        def op(tx: Tx) -> None:
            t = target(tx, database, set_name, check)
            if t.set_id is None:
                raise SetNotFound(set_name)
            if not _delete(tx, t, key):
                raise KeyNotFound(key)
            tx.log(("delete", database, set_name, key))

        self._write(op, entry=(database, set_name, key))

    def batch(self, database: str, set_name: str, ops: Sequence[BatchOp], check: AccessCheck) -> int:
        def op(tx: Tx) -> int:
            t = target(tx, database, set_name, check)
            if t.set_id is not None and len(ops) > 1:
                tx.read_ahead([(t.set_id, stored_key(o.key)) for o in ops], lambda _: bool(t.indexes))
            for i, o in enumerate(ops):
                if isinstance(o, Delete):
                    if t.set_id is None or not _delete(tx, t, o.key):
                        raise BatchKeyNotFound(o.key, i)
                    tx.log(("delete", database, set_name, o.key))
                else:
                    if t.set_id is None:
                        t = Target(t.database_id, _create_set(tx, t.database_id, database, set_name), t.indexes)
                    _put(tx, t, o.key, o.value, o.raw)
                    tx.log(("put", database, set_name, o.key, orjson.Fragment(o.raw)))
            return len(ops)

        result = self._write(op, savepoint=True)  # an empty batch too: its database and access are checked
        return len(ops) if result is None else int(result)

    # -- indexes

    def create_index(self, database: str, set_name: str, definition: IndexDef, check: AccessCheck) -> None:
        """Defines the index (not yet ready), so that every write from then on keeps it
        current; fills it a chunk per write transaction, from the values committed at that
        moment (writes go on between the chunks); then makes it ready, as one numbered commit.
        The builder holds a lock on the index's id meanwhile (on a connection of its own): if
        its process dies, PostgreSQL lets the lock go and housekeeping drops the unfinished index."""
        with translated():
            builder = psycopg.connect(self.url, autocommit=True, connect_timeout=5, **self._alive)
        try:
            self._build_index(builder, database, set_name, definition, check)
        finally:
            builder.close()

    def _build_index(self, builder: Conn, database: str, set_name: str, definition: IndexDef,
                     check: AccessCheck) -> None:
        with translated():
            allotted = builder.execute("SELECT nextval(pg_get_serial_sequence('fb_indexes', 'id'))").fetchone()
            assert allotted is not None
            index_id = int(allotted[0])
            builder.execute(BUILD_LOCK_SQL.format(op="pg_advisory_lock"), (index_id,))

        def define(tx: Tx) -> int:
            row = tx.q("SELECT d.id, d.auth, s.id FROM fb_databases d LEFT JOIN fb_sets s ON s.database_id = d.id"
                       " AND s.name = %s WHERE d.name = %s", (set_name, database)).fetchone()
            if row is None:
                raise DatabaseNotFound(database)
            check(row[1])
            if row[2] is None:
                raise SetNotFound(set_name)
            insert = ("INSERT INTO fb_indexes (id, set_id, name, field, kind, sort_fields)"
                      " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING id")
            values = (index_id, row[2], definition.name, definition.field, definition.kind, list(definition.sort_fields))
            made = tx.q(insert, values).fetchone()
            if made is None:  # an unfinished index of that name whose builder is gone gives way
                unfinished = tx.q("SELECT id FROM fb_indexes WHERE set_id = %s AND name = %s AND NOT ready",
                                  (row[2], definition.name)).fetchone()
                if unfinished is not None and _drop_if_abandoned(tx, int(unfinished[0])):
                    made = tx.q(insert, values).fetchone()
            if made is None:
                raise IndexExists(definition.name)
            tx.catalog_changed = True  # writes from now on keep it current, as far as it is filled
            return int(row[2])

        set_id = self._write(define)
        ix = IndexRow(index_id, definition.field, definition.kind, tuple(definition.sort_fields), False)
        try:
            self._fill_index(set_id, ix, definition.name, partial(_log_index, database, set_name, definition))
        except BaseException:
            with contextlib.suppress(StorageError):
                self._write(lambda tx: _discard_index(tx, index_id, unfinished=True))
            raise
        with self._conn() as conn:  # the planner learns the new records' spread (else it may sort a page)
            conn.execute("ANALYZE fb_basic, fb_sorted, fb_group_counts")

    def _fill_index(self, set_id: int, ix: IndexRow, name: str, publish: Callable[[Tx], None]) -> None:
        """A key range per write transaction: the records of its entries, then `filled_to`
        moves past it (writes keep the records of those keys from then on); the last range's
        transaction makes the index ready and is a numbered commit (`publish` logs it)."""
        after: str | None = None
        while True:
            def chunk(tx: Tx, after: str | None = after) -> str | None:
                alive = tx.q("SELECT 1 FROM fb_indexes WHERE id = %s", (ix.id,)).fetchone()
                if alive is None:
                    raise IndexNotFound(name, f"index {name!r} was dropped while it was built")
                rows = tx.q("SELECT key, value FROM fb_entries WHERE set_id = %s" + ("" if after is None else " AND key > %s")
                            + " ORDER BY key LIMIT %s",
                            (set_id, BUILD_CHUNK) if after is None else (set_id, after, BUILD_CHUNK)).fetchall()
                sortable = copy_records(tx.conn, (ix,), rows)
                counts = Counter((i, g) for i, f, g, _, _ in sortable if f == 0)
                if counts:
                    tx.q("INSERT INTO fb_group_counts AS c SELECT * FROM unnest(%s::bigint[], %s::bytea[], %s::bigint[])"
                         " ON CONFLICT (index_id, grp) DO UPDATE SET n = c.n + excluded.n",
                         ([i for i, _ in counts], [g for _, g in counts], list(counts.values())))
                tx.catalog_changed = True  # every node learns how far writes keep the records
                if len(rows) < BUILD_CHUNK:
                    tx.q("UPDATE fb_indexes SET ready = true, filled_to = NULL WHERE id = %s", (ix.id,))
                    publish(tx)
                    return None
                last = str(rows[-1][0])
                tx.q("UPDATE fb_indexes SET filled_to = %s WHERE id = %s", (last, ix.id))
                return last

            after = self._write(chunk)
            if after is None:
                return

    def drop_index(self, database: str, set_name: str, name: str, check: AccessCheck) -> None:
        def op(tx: Tx) -> None:
            row = tx.q("SELECT d.auth, i.id FROM fb_databases d JOIN fb_sets s ON s.database_id = d.id AND s.name = %s"
                       " LEFT JOIN fb_indexes i ON i.set_id = s.id AND i.name = %s AND i.ready"
                       " WHERE d.name = %s", (set_name, name, database)).fetchone()
            if row is None:
                exists = tx.q("SELECT auth FROM fb_databases WHERE name = %s", (database,)).fetchone()
                if exists is None:
                    raise DatabaseNotFound(database)
                check(exists[0])
                raise SetNotFound(set_name)
            check(row[0])
            if row[1] is None:
                raise IndexNotFound(name)
            _discard_index(tx, row[1])
            tx.log(("drop_index", database, set_name, name))

        self._write(op)

    # -- snapshots, restores, changes

    def snapshot(self) -> Snapshot:
        from fuckbase.storage.postgresql.restore import PgSnapshot

        return PgSnapshot(self)

    def restore_writer(self) -> RestoreWriter:
        from fuckbase.storage.postgresql.restore import PgRestoreWriter

        return PgRestoreWriter(self)

    def sequence(self) -> int:
        with self._conn() as conn:
            row = conn.execute("SELECT seq FROM fb_state WHERE id = 1").fetchone()
        return int(row[0]) if row else 0

    def changes(self, after: int, limit: int) -> list[Change]:
        with self._conn() as conn:
            rows = conn.execute("SELECT seq, t, n, record FROM fb_changes WHERE seq > %s ORDER BY seq LIMIT %s",
                                (after, limit)).fetchall()
        return [Change(int(s), float(t), int(n), bytes(r)) for s, t, n, r in rows]

    def retain_changes(self, consumer: str) -> int:
        """Registered under the sequence row's lock: a write either numbers itself before the
        registration (and is acknowledged by it) or after it (and sees the consumer)."""
        with self._conn() as conn, conn.transaction():
            conn.execute("SELECT seq FROM fb_state WHERE id = 1 FOR UPDATE")
            conn.execute("INSERT INTO fb_consumers SELECT %s, seq FROM fb_state WHERE id = 1 ON CONFLICT DO NOTHING",
                         (consumer,))
            row = conn.execute("SELECT acked FROM fb_consumers WHERE name = %s", (consumer,)).fetchone()
        assert row is not None
        return int(row[0])

    def acknowledge(self, consumer: str, sequence: int) -> None:
        with self._conn() as conn:
            conn.execute("UPDATE fb_consumers SET acked = greatest(acked, %s) WHERE name = %s", (sequence, consumer))

    def release_changes(self, consumer: str) -> None:
        with self._conn() as conn:
            conn.execute("DELETE FROM fb_consumers WHERE name = %s", (consumer,))

    def figures(self) -> list[Figure]:
        stats = self.pool.get_stats()
        size, idle = stats.get("pool_size", 0), stats.get("pool_available", 0)
        return [
            Figure("pool_connections", "Connections to PostgreSQL in this process's pool, by state", "gauge",
                   [({"state": "busy"}, size - idle), ({"state": "idle"}, idle)]),
            Figure("pool_max_connections", "The most connections this process's pool opens", "gauge",
                   [({}, self.pool.max_size)]),
            Figure("pool_waiting", "Requests waiting for a connection", "gauge", [({}, stats.get("requests_waiting", 0))]),
            Figure("errors", "PostgreSQL errors met, by kind", "counter",
                   [({"kind": kind}, n) for kind, n in sorted(ERRORS.items())]),
            Figure("write_groups_replanned", "Groups of writes run again under the sequence row: what they"
                   " had read moved before they took it", "counter", [({}, self.replanned_groups)]),
            Figure("write_groups_guessed_wrong", "Groups of writes run on the guess that their keys were new,"
                   " run again: a key was not, or the catalog had moved", "counter",
                   [({}, self._new_keys.wrong_guesses)]),
        ]

    def lead(self, role: str) -> bool:
        """A session advisory lock on a connection of its own per role, kept between calls
        (held or not): PostgreSQL lets go of the lock when this process dies or its connection
        breaks, and another node takes it."""
        with self._leading_lock:
            try:
                conn = self._leading.get(role)
                if conn is None or conn.closed:
                    conn = self._leading[role] = psycopg.connect(self.url, autocommit=True, connect_timeout=5,
                                                                 **self._alive)
                    self._held.discard(role)
                if role in self._held:
                    conn.execute("SELECT 1")
                    return True
                row = conn.execute("SELECT pg_try_advisory_lock(hashtextextended('fuckbase:' || %s, 0))",
                                   (role,)).fetchone()
            except psycopg.Error:
                if role in self._held:
                    log.warning("lost the lead of %r with the connection to PostgreSQL", role)
                self._held.discard(role)
                broken = self._leading.pop(role, None)
                if broken is not None:
                    with contextlib.suppress(psycopg.Error):
                        broken.close()
                return False
            if row is not None and row[0]:
                self._held.add(role)
                return True
            return False

    def maintain(self) -> bool:
        """Trims acknowledged changes, drops index builds whose builder died, reclaims what
        drops and restores left a chunk at a time, and forgets counts that reached zero.
        True when more is left."""
        with self._conn() as conn:
            for (index_id,) in conn.execute("SELECT id FROM fb_indexes WHERE NOT ready").fetchall():
                # a look at the lock first, which waits for no writer: a build in progress is left alone
                row = conn.execute(BUILD_LOCK_SQL.format(op="pg_try_advisory_lock"), (index_id,)).fetchone()
                if row is not None and row[0]:
                    conn.execute(BUILD_LOCK_SQL.format(op="pg_advisory_unlock"), (index_id,))
                    if self._write(partial(_drop_if_abandoned, index_id=index_id)):
                        log.warning("dropped index %d: the process building it died", index_id)
            conn.execute("DELETE FROM fb_changes WHERE seq <= coalesce((SELECT min(acked) FROM fb_consumers),"
                         " (SELECT seq FROM fb_state WHERE id = 1))")
            garbage = conn.execute("SELECT kind, id FROM fb_garbage ORDER BY kind, id LIMIT 1").fetchone()
            if garbage is None:
                conn.execute("DELETE FROM fb_group_counts WHERE n = 0")
                return False
            kind, gid = garbage
            if kind == "index":
                more = _reclaim_index(conn, gid)
            else:
                more = _reclaim_database(conn, gid)
            if not more:
                conn.execute("DELETE FROM fb_garbage WHERE kind = %s AND id = %s", (kind, gid))
            return True

    def flush(self) -> None:
        """Every commit is durable when PostgreSQL acknowledges it."""

    def close(self) -> None:
        with self._leading_lock:
            for conn in self._leading.values():
                with contextlib.suppress(psycopg.Error):
                    conn.close()
            self._leading.clear()
            self._held.clear()
        self.pool.close()


class _NewKeys:
    """Whether a group's entries are likely all new, from the groups before it: after
    GUESS_AFTER groups in a row whose read found none of their entries, and for as long as
    that guess holds. Each wrong guess costs a commit's round trip, so it doubles the groups
    needed before the next."""

    def __init__(self) -> None:
        self._streak = 0
        self._needed = GUESS_AFTER
        self.wrong_guesses = 0

    def likely(self) -> bool:
        return self._streak >= self._needed

    def read(self, found: bool) -> None:
        self._streak = 0 if found else self._streak + 1

    def wrong(self) -> None:
        self.wrong_guesses += 1
        self._streak = 0
        self._needed = min(self._needed * 2, GUESS_AFTER_MOST)


@dataclass
class _Group:
    queue: list[tuple[Callable[[Tx], Any], bool]] = field(default_factory=list)  # (write, savepoint)
    entries: list[tuple[str, str, str]] = field(default_factory=list)  # (database, set, key) of its puts and deletes


def _run_writes(tx: Tx, queue: Sequence[tuple[Callable[[Tx], Any], bool]]) -> list[BaseException | None]:
    """Runs a group's writes in order in `tx`. Each fails before it changes anything or not
    at all, but a batch (`savepoint`), which runs in a nested transaction under a savepoint
    of its own, taken in when it succeeds. Returns each one's failure (None: done); a
    failure of PostgreSQL itself fails them all."""
    results: list[BaseException | None] = []
    for op, savepoint in queue:
        try:
            if savepoint:
                child = tx.nested()
                tx.write_index_records()  # the child's records change from these
                with tx.conn.transaction():
                    op(child)
                    child.write_index_records()
                tx.absorb(child)
            else:
                op(tx)
        except (psycopg.Error, _NeedsLock):
            raise
        except Exception as exc:  # noqa: BLE001 (a storage error or an access check's refusal)
            results.append(exc)
            continue
        results.append(None)
    return results


def _known_entries(catalog: Catalog, entries: Sequence[tuple[str, str, str]]) -> list[EntryKey]:
    """The entries of a group's puts and deletes in the sets `catalog` knows, once each."""
    wanted: list[EntryKey] = []
    for database, set_name, key in entries:
        db = catalog.databases.get(database)
        sid = db.set_ids.get(set_name) if db is not None else None
        if sid is not None:
            wanted.append((sid, stored_key(key)))
    return list(dict.fromkeys(wanted))


def _put(tx: Tx, t: Target, key: str, value: Any, raw: bytes) -> None:
    """Written at once when not read ahead (fb_put returns the value it replaces), else at
    the transaction's end; a value read ahead as the very text it is to become is not
    written again (a row version, its WAL and its vacuuming for nothing)."""
    assert t.set_id is not None
    entry = (t.set_id, stored_key(key))
    old = tx.current(entry)
    if isinstance(old, _Unknown):
        row = tx.q("SELECT fb_put(%s, %s, %s::json)", (*entry, raw.decode())).fetchone()
        old = row[0] if row else None
    elif old == raw:
        return
    else:
        tx.pending[entry] = raw
    tx.known[entry] = raw
    tx.touch(*entry, t.indexes, _parsed(old) if t.indexes else (MISSING if old is None else None), value)


def _delete(tx: Tx, t: Target, key: str) -> bool:
    assert t.set_id is not None
    entry = (t.set_id, stored_key(key))
    old = tx.current(entry)
    if isinstance(old, _Unknown):
        row = tx.q("DELETE FROM fb_entries WHERE set_id = %s AND key = %s RETURNING value", entry).fetchone()
        old = row[0] if row else None
    elif old is not None:
        tx.pending[entry] = None
    if old is None:
        return False
    tx.known[entry] = None
    tx.touch(*entry, t.indexes, _parsed(old) if t.indexes else None, MISSING)
    return True


def _discard_database(tx: Tx, db_id: int) -> None:
    """Out of sight at once (its name is free again); its rows are reclaimed later."""
    tx.catalog_changed = True
    tx.q("UPDATE fb_databases SET name = NULL, dropped = true WHERE id = %s", (db_id,))
    tx.q("INSERT INTO fb_garbage VALUES ('database', %s) ON CONFLICT DO NOTHING", (db_id,))


def _log_index(database: str, set_name: str, definition: IndexDef, tx: Tx) -> None:
    tx.log(("create_index", database, set_name, definition))


class RecordMaker:
    """Makes the index records of (stored key as COPY text, parsed value) entries: basic ones
    as COPY lines, sortable ones kept (`sortable`) for their counts. Builds and restores spend
    most of their Python time here: basic records are made inline, not through `_records`."""

    def __init__(self, indexes: Sequence[IndexRow]) -> None:
        self.basic = [(ix.id, ix.field) for ix in indexes if ix.kind == BASIC]
        self._others = [ix for ix in indexes if ix.kind != BASIC]
        self.sortable: list[tuple[int, int, bytes, bytes, str]] = []

    def basic_lines(self, entries: Sequence[tuple[str, Any]]) -> list[str]:
        lines: list[str] = []
        for key, value in entries:
            if type(value) is not dict:
                continue  # no field to index
            for index_id, name in self.basic:
                if name in value:
                    field_value = value[name]
                    text = field_value if type(field_value) is str else match_text(field_value)
                    lines.append(f"{index_id}\t\\\\x{group_token(text).hex()}\t{key}\n")
            if self._others:
                self.sortable.extend((*r, key) for r in _records(self._others, value)[1])
        return lines

    def copy_sortable(self, conn: Conn) -> None:
        if self.sortable:
            with conn.cursor().copy("COPY fb_sorted FROM STDIN") as copy:
                for start in range(0, len(self.sortable), COPY_SLICE):
                    copy.write("".join(f"{i}\t{f}\t\\\\x{g.hex()}\t\\\\x{o.hex()}\t{k}\n"
                                       for i, f, g, o, k in self.sortable[start : start + COPY_SLICE]))


def copy_basic(conn: Conn, lines: Sequence[str]) -> None:
    with conn.cursor().copy("COPY fb_basic FROM STDIN") as copy:
        for start in range(0, len(lines), COPY_SLICE):
            copy.write("".join(lines[start : start + COPY_SLICE]))


def copy_records(conn: Conn, indexes: Sequence[IndexRow], entries: Sequence[tuple[str, bytes]]
                 ) -> list[tuple[int, int, bytes, bytes, str]]:
    """COPYs the index records of (stored key, JSON) entries that have none yet; returns the
    sortable ones, whose counts the caller keeps. The COPY text is sent a slice at a time, so
    PostgreSQL stores one slice while the next is made (per row, psycopg's writer would cost
    more than the record)."""
    maker = RecordMaker(indexes)
    with contextlib.ExitStack() as stack:
        copy = stack.enter_context(conn.cursor().copy("COPY fb_basic FROM STDIN")) if maker.basic else None
        for start in range(0, len(entries), COPY_SLICE):
            part = entries[start : start + COPY_SLICE]
            keys = copy_texts([key for key, _ in part])
            lines = maker.basic_lines([(key, orjson.loads(raw)) for key, (_, raw) in zip(keys, part, strict=True)])
            if copy is not None and lines:
                copy.write("".join(lines))
    maker.copy_sortable(conn)
    return maker.sortable


def delete_records(conn: Conn, indexes: Sequence[IndexRow], entries: Sequence[tuple[str, bytes]]) -> None:
    """Deletes the index records of (stored key, JSON) entries."""
    basic: list[tuple[int, bytes, str]] = []
    sortable: list[tuple[int, int, bytes, bytes, str]] = []
    for key, value in entries:
        b, srt = _records(indexes, orjson.loads(value))
        basic.extend((*r, key) for r in b)
        sortable.extend((*r, key) for r in srt)
    with conn.cursor() as cur:
        if basic:
            cur.execute("DELETE FROM fb_basic b USING unnest(%s::bigint[], %s::bytea[], %s::text[]) AS r(i, g, k)"
                        " WHERE b.index_id = r.i AND b.grp = r.g AND b.key = r.k COLLATE \"C\"",
                        [list(c) for c in zip(*basic, strict=True)])
        if sortable:
            cur.execute("DELETE FROM fb_sorted s USING unnest(%s::bigint[], %s::smallint[], %s::bytea[], %s::bytea[],"
                        " %s::text[]) AS r(i, f, g, o, k) WHERE s.index_id = r.i AND s.field = r.f AND s.grp = r.g"
                        " AND s.sort = r.o AND s.key = r.k COLLATE \"C\"", [list(c) for c in zip(*sortable, strict=True)])


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def copy_text(text: str) -> str:
    """A value as COPY's text format writes it (translate is slow: most text needs nothing)."""
    if "\\" in text or "\n" in text or "\t" in text or "\r" in text:
        return text.translate(_COPY_ESCAPES)
    return text


def copy_texts(texts: list[str]) -> list[str]:
    """Values as COPY's text format writes them."""
    return _each_where_needed(texts, "\\\n\t\r", copy_text)


def _drop_if_abandoned(tx: Tx, index_id: int) -> bool:
    """Drops an unfinished index whose builder is gone (its build lock is free: the build
    failed, or its process died); False while a builder works on it."""
    free = tx.q(BUILD_LOCK_SQL.format(op="pg_try_advisory_xact_lock"), (index_id,)).fetchone()
    if free is None or not free[0]:
        return False
    _discard_index(tx, index_id, unfinished=True)
    return True


def _discard_index(tx: Tx, index_id: int, unfinished: bool = False) -> None:
    tx.catalog_changed = True
    tx.q("DELETE FROM fb_indexes WHERE id = %s" + (" AND NOT ready" if unfinished else ""), (index_id,))
    tx.q("INSERT INTO fb_garbage VALUES ('index', %s) ON CONFLICT DO NOTHING", (index_id,))


def _reclaim_index(conn: Conn, index_id: int) -> bool:
    n = 0
    for table in ("fb_basic", "fb_sorted", "fb_group_counts"):
        cur = conn.execute(f"DELETE FROM {table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {table}"  # noqa: S608
                           f" WHERE index_id = %s LIMIT %s))", (index_id, RECLAIM_CHUNK))
        n += cur.rowcount
    return n > 0


def _reclaim_database(conn: Conn, db_id: int) -> bool:
    sets = [r[0] for r in conn.execute("SELECT id FROM fb_sets WHERE database_id = %s", (db_id,)).fetchall()]
    indexes = [r[0] for r in conn.execute("SELECT id FROM fb_indexes WHERE set_id = ANY(%s)", (sets,)).fetchall()]
    for ix in indexes:
        if _reclaim_index(conn, ix):
            return True
    cur = conn.execute("DELETE FROM fb_entries WHERE ctid = ANY(ARRAY(SELECT ctid FROM fb_entries"
                       " WHERE set_id = ANY(%s) LIMIT %s))", (sets, RECLAIM_CHUNK))
    if cur.rowcount:
        return True
    conn.execute("DELETE FROM fb_set_counts WHERE set_id = ANY(%s)", (sets,))
    conn.execute("DELETE FROM fb_databases WHERE id = %s AND dropped", (db_id,))
    return False


# ------------------------------------------------------------------ reads


class PgView:
    """A consistent, read-only view: one REPEATABLE READ transaction, and the catalog at its
    version."""

    def __init__(self, conn: Conn, catalog: Catalog) -> None:
        self.conn = conn
        self.catalog = catalog

    def database(self, name: str) -> PgDatabase:
        db = self.catalog.databases.get(name)
        if db is None:
            raise DatabaseNotFound(name)
        return db

    def database_names(self) -> list[str]:
        return self.catalog.names()

    def _set_id(self, db: Database, set_name: str) -> int:
        assert isinstance(db, PgDatabase)
        sid = db.set_ids.get(set_name)
        if sid is None:
            raise SetNotFound.in_database(set_name, db.name)
        return sid

    def _index(self, db: Database, set_name: str, index: str) -> tuple[int, int, IndexDef]:
        assert isinstance(db, PgDatabase)
        sid = self._set_id(db, set_name)
        definition = db.sets[set_name].indexes.get(index)
        if definition is None:
            raise IndexNotFound.in_set(index, set_name)
        return sid, db.index_ids[(set_name, index)], definition

    def page(self, db: Database, set_name: str, index: str, text: str, order: SortOrder,
             offset: int, limit: int) -> Page:
        sid, ix_id, definition = self._index(db, set_name, index)
        if definition.kind != SORTABLE:
            raise IndexNotFound(index, f"index {index!r} is not sortable")
        grp = group_token(text)
        row = self.conn.execute("SELECT n FROM fb_group_counts WHERE index_id = %s AND grp = %s", (ix_id, grp)).fetchone()
        total = int(row[0]) if row else 0
        if total == 0 or offset >= total or limit <= 0:
            return Page(total, [])
        first, desc = order[0]
        pager = _Pager(self.conn, sid, ix_id, definition.sort_fields.index(first), grp, first, list(order[1:]))
        if not desc:
            entries = pager.run("", False, offset, limit)
        else:
            entries = pager.run(" AND x.sort < %(missing)s", True, offset, limit)
            if len(entries) < limit:
                present = total - pager.count(" AND x.sort = %(missing)s")
                entries += pager.run(" AND x.sort = %(missing)s", False, max(0, offset - present), limit - len(entries))
        return Page(total, entries)

    def key_counts(self) -> dict[str, int]:
        rows = self.conn.execute("SELECT d.name, coalesce(sum(c.n), 0) FROM fb_databases d"
                                 " LEFT JOIN fb_sets s ON s.database_id = d.id LEFT JOIN fb_set_counts c ON c.set_id = s.id"
                                 " WHERE d.name IS NOT NULL GROUP BY d.name").fetchall()
        return {name: int(n) for name, n in rows}


# point reads as rows (read number, key, value, version): the catalog version first (read 0),
# then the entries got, then the records of basic and of sortable lookups (the primary
# field's), each value by a subquery: one primary-key probe per row. The reads come as one
# JSON parameter, [[number, kind, set id, key or index id, group token in hex], ...]: one
# value to send, and one plan whatever the reads
FETCH_SQL = b"""
WITH q AS (SELECT r->>0 AS i, (r->>1)::int AS kind, (r->>2)::bigint AS set_id, r->>3 AS arg, r->>4 AS grp
             FROM json_array_elements(%s::json) AS r)
SELECT 0, NULL, NULL::json, catalog FROM fb_state WHERE id = 1
UNION ALL
SELECT q.i::int, NULL, e.value, NULL FROM q JOIN fb_entries e ON e.set_id = q.set_id AND e.key = q.arg COLLATE "C"
 WHERE q.kind = 0
UNION ALL
SELECT q.i::int, x.key, (SELECT e.value FROM fb_entries e WHERE e.set_id = q.set_id AND e.key = x.key), NULL
  FROM q CROSS JOIN LATERAL (SELECT b.key FROM fb_basic b
                              WHERE b.index_id = q.arg::bigint AND b.grp = decode(q.grp, 'hex')) x
 WHERE q.kind = 1
UNION ALL
SELECT q.i::int, x.key, (SELECT e.value FROM fb_entries e WHERE e.set_id = q.set_id AND e.key = x.key), NULL
  FROM q CROSS JOIN LATERAL (SELECT r.key FROM fb_sorted r
                              WHERE r.index_id = q.arg::bigint AND r.field = 0 AND r.grp = decode(q.grp, 'hex')) x
 WHERE q.kind = 2
"""


class PointReads:
    """Point reads resolved against one catalog and answered by one statement (FETCH_SQL),
    whose snapshot reads the catalog version too: the answers hold when that version is the
    catalog's. Access checks run only then, once, with the credentials of that catalog."""

    def __init__(self, catalog: Catalog, reads: Sequence[PointRead]) -> None:
        self.catalog = catalog
        self.reads = reads
        self.dbs: list[PgDatabase | None] = []
        self.results: list[Any] = []  # a resolution error, or what the statement fills in
        self.asked: list[list[Any]] = []  # FETCH_SQL's parameter
        for i, read in enumerate(reads, 1):
            db = catalog.databases.get(read.database)
            self.dbs.append(db)
            self.results.append(None)
            if db is None:
                continue
            sid = db.set_ids.get(read.set_name)
            if sid is None:
                self.results[-1] = SetNotFound.in_database(read.set_name, read.database)
            elif isinstance(read, Get):
                self.asked.append([i, 0, sid, stored_key(read.key)])
            else:
                self._lookup(i, db, sid, read)

    def _lookup(self, i: int, db: PgDatabase, sid: int, read: Lookup) -> None:
        definition = db.sets[read.set_name].indexes.get(read.index_name)
        if definition is None:
            self.results[-1] = IndexNotFound.in_set(read.index_name, read.set_name)
            return
        self.results[-1] = []  # of (stored key, value)
        self.asked.append([i, 1 if definition.kind == BASIC else 2, sid, db.index_ids[(read.set_name, read.index_name)],
                           group_token(read.text).hex()])

    def run(self, conn: Conn) -> bool:
        """Runs the statement; whether it saw this catalog's version."""
        rows = conn.execute(FETCH_SQL, (orjson.dumps(self.asked).decode(),)).fetchall()
        if not rows or rows[0][0] != 0 or rows[0][3] != self.catalog.version:
            return False
        results = self.results
        for i, key, value, _ in rows[1:]:
            if key is None:
                results[i - 1] = value
            else:
                results[i - 1].append((key, value))
        return True

    def answers(self) -> list[Any]:
        out: list[Any] = []
        for read, db, result in zip(self.reads, self.dbs, self.results, strict=True):
            if db is None:
                out.append(DatabaseNotFound(read.database))
                continue
            try:
                read.check(db.auth)
            except Exception as exc:  # noqa: BLE001 (the check's refusal is the read's answer)
                out.append(exc)
                continue
            if isinstance(result, list):
                result.sort()  # by stored key: the order of the keys they escape
                out.append([Entry(api_key(k), v) for k, v in result])
            else:
                out.append(result)
        return out


def page_sql(extra: str, desc: bool, limited: bool) -> str:
    """One direction of a sortable index's records for one group, sort token then key, with
    their values; `extra` narrows the range of tokens. The records skipped by the offset are
    read from the index alone; only the page's values are looked up."""
    order = " ORDER BY x.sort" + (" DESC" if desc else "") + ", x.key"
    return ("SELECT x.key, x.sort, (SELECT e.value FROM fb_entries e WHERE e.set_id = %(sid)s AND e.key = x.key)"
            " FROM (SELECT x.key, x.sort FROM fb_sorted x WHERE x.index_id = %(ix)s AND x.field = %(f)s"
            " AND x.grp = %(g)s" + extra + order + " OFFSET %(off)s" + (" LIMIT %(lim)s" if limited else "")
            + ") x" + order)


class _Pager:
    """One direction of a sortable index's records for one group, as an index scan; entries
    whose sort tokens tie are put in exact order (other sort fields, long values, keys)."""

    def __init__(self, conn: Conn, set_id: int, index_id: int, field_no: int, grp: bytes, first: str,
                 rest: list[tuple[str, bool]]) -> None:
        self.conn = conn
        self.first = first
        self.rest = rest
        self.params: dict[str, Any] = {"sid": set_id, "ix": index_id, "f": field_no, "g": grp,
                                       "missing": MISSING_SORT_TOKEN}
        self.where = "x.index_id = %(ix)s AND x.field = %(f)s AND x.grp = %(g)s"

    def _rows(self, extra: str, desc: bool, offset: int, limit: int | None, params: dict[str, Any] | None = None
              ) -> list[tuple[str, bytes, bytes]]:
        sql = page_sql(extra, desc, limit is not None)
        # planned for its offset and limit each time: a prepared statement's generic plan may
        # sort every match to find a descending page
        rows = self.conn.execute(sql.encode(), {**self.params, **(params or {}), "off": offset, "lim": limit},
                                 prepare=False).fetchall()
        return [(k, bytes(s), bytes(v)) for k, s, v in rows]

    def count(self, extra: str, params: dict[str, Any] | None = None) -> int:
        row = self.conn.execute(f"SELECT count(*) FROM fb_sorted x WHERE {self.where}{extra}",  # noqa: S608
                                {**self.params, **(params or {})}).fetchone()
        return int(row[0]) if row else 0

    def run(self, extra: str, desc: bool, offset: int, limit: int) -> list[Entry]:
        rows = self._rows(extra, desc, offset, limit)
        if not rows:
            return []
        if not self.rest and not any(is_truncated(s) for _, s, _ in rows):
            return [Entry(api_key(k), v) for k, _, v in rows]
        # the runs at the page's ends may go on beyond it: take them whole, order, then cut
        lo, hi = rows[0][1], rows[-1][1]
        before_op, a, b = (">", hi, lo) if desc else ("<", lo, hi)
        bounds = {"lo": a, "hi": b}
        before = self.count(f"{extra} AND x.sort {before_op} %(edge)s", {"edge": lo})
        window = self._rows(f"{extra} AND x.sort BETWEEN %(lo)s AND %(hi)s", desc, 0, None, bounds)
        ordered: list[Entry] = []
        i = 0
        while i < len(window):
            j = i
            while j < len(window) and window[j][1] == window[i][1]:
                j += 1
            run = window[i:j]
            if len(run) > 1:
                run = self._order_run(run, is_truncated(run[0][1]), desc)
            ordered.extend(Entry(api_key(k), v) for k, _, v in run)
            i = j
        start = offset - before
        return ordered[start : start + limit]

    def _order_run(self, run: list[tuple[str, bytes, bytes]], truncated: bool, desc: bool
                   ) -> list[tuple[str, bytes, bytes]]:
        values = {k: orjson.loads(v) for k, _, v in run}
        ordered = sorted(run, key=lambda r: r[0].encode())
        for f, d in [*reversed(self.rest), *([(self.first, desc)] if truncated else [])]:
            present = [r for r in ordered if field_of(values[r[0]], f) is not MISSING]
            missing = [r for r in ordered if field_of(values[r[0]], f) is MISSING]
            present.sort(key=lambda r, f=f: sort_rank(field_of(values[r[0]], f)), reverse=d)  # type: ignore[misc]
            ordered = present + missing
        return ordered

