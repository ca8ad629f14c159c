"""The storage interface: what the API, backup and server layers need, in the product's terms.

A backend stores databases, their sets of key -> JSON value entries, index definitions and
index contents, and numbers every commit. Everything read through one `ReadView` comes from
one consistent instant (catalog and data alike), and every write method is one atomic commit.
Values cross the boundary as JSON bytes (and the parsed value, where the caller has it), so a
backend never re-encodes what the HTTP layer already parsed.

Access control stays above this layer: write methods and point reads (`Storage.fetch`) take
an `AccessCheck`, a callable the backend calls with the database's stored credentials inside
the write or read, so a check and what it guards see the same database even while a restore
swaps it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

BASIC: Literal["basic"] = "basic"
SORTABLE: Literal["sortable"] = "sortable"
IndexKind = Literal["basic", "sortable"]

Credentials = Mapping[str, str]  # the stored (hashed) form: {"username", "hash"}
AccessCheck = Callable[[Credentials | None], None]


def allow_all(stored: Credentials | None) -> None:
    """The AccessCheck of callers that have already decided (restores, internal jobs)."""


# ------------------------------------------------------------------ catalog objects


@dataclass(frozen=True)
class IndexDef:
    name: str
    field: str  # the primary field of a sortable index
    kind: IndexKind = BASIC
    sort_fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class SetInfo:
    name: str
    indexes: Mapping[str, IndexDef] = field(default_factory=dict)  # ready to query


@dataclass(frozen=True)
class Database:
    """One database as a view saw it. `sets` and `indexes` hold only what is ready to use."""

    name: str
    auth: Credentials | None
    sets: Mapping[str, SetInfo]


class Entry(NamedTuple):
    key: str
    value: bytes  # JSON


@dataclass(frozen=True)
class Page:
    total: int  # every match, before paging
    entries: list[Entry]


SortOrder = Sequence[tuple[str, bool]]  # (sort field, descending) pairs, applied in order


class Put(NamedTuple):
    key: str
    value: Any  # parsed, for the indexes
    raw: bytes  # the same value as JSON


class Delete(NamedTuple):
    key: str


BatchOp = Put | Delete


class Get(NamedTuple):
    """A point read: one entry's JSON (None when the key is missing)."""

    database: str
    set_name: str
    key: str
    check: AccessCheck


class Lookup(NamedTuple):
    """A point read: the entries whose field indexed by `index_name` reads `text`, by key."""

    database: str
    set_name: str
    index_name: str
    text: str
    check: AccessCheck


PointRead = Get | Lookup


# ------------------------------------------------------------------ errors


class StorageError(Exception):
    """Base of the errors a backend raises; the API layer maps each to a status and code."""


class NotFound(StorageError):
    what = "object"

    def __init__(self, name: str, message: str | None = None) -> None:
        super().__init__(message or f"{self.what} {name!r} not found")
        self.name = name


class DatabaseNotFound(NotFound):
    what = "database"


class SetNotFound(NotFound):
    what = "set"

    @classmethod
    def in_database(cls, name: str, database: str) -> SetNotFound:
        """The message every backend gives a read that names a missing set."""
        return cls(name, f"set {name!r} not found in database {database!r}")


class IndexNotFound(NotFound):
    what = "index"

    @classmethod
    def in_set(cls, name: str, set_name: str) -> IndexNotFound:
        """The message every backend gives a read that names a missing index."""
        return cls(name, f"index {name!r} not found in set {set_name!r}")


class KeyNotFound(NotFound):
    what = "key"


class AlreadyExists(StorageError):
    what = "object"

    def __init__(self, name: str) -> None:
        super().__init__(f"{self.what} {name!r} already exists")
        self.name = name


class DatabaseExists(AlreadyExists):
    what = "database"


class SetExists(AlreadyExists):
    what = "set"


class IndexExists(AlreadyExists):
    what = "index"


class BatchKeyNotFound(KeyNotFound):
    """A delete in a batch names a missing key; `position` is the operation's index."""

    def __init__(self, name: str, position: int) -> None:
        super().__init__(name, f"operation {position}: key {name!r} not found")
        self.position = position


class StorageFull(StorageError):
    """The disk is full: nothing was written; reads go on, writes work again once space returns."""


class StorageUnavailable(StorageError):
    """The backend cannot serve right now (e.g. its server is down); nothing was written."""


class StorageFailure(StorageError):
    """An unexpected failure of the backend itself (I/O error, damaged data)."""


# ------------------------------------------------------------------ change sequence


@dataclass(frozen=True)
class Change:
    """One commit: its sequence number, its time (seconds since the epoch) and what it did.

    `record` is the commit as JSON, `{"t": time, "n": number of ops, "ops": [...]}`, which
    consumers can store as it is (continuous backup does); `ops` is the same, decoded, and
    `writes` its length (a group commit holds many). Each op is a list whose first item
    names it: ["put", database, set, key, value] · ["delete", database, set, key] ·
    ["create_database", name, credentials] · ["drop_database", name] ·
    ["create_set", database, set] · ["create_index", database, set, {"name", "field", "kind",
    "sort_fields"}] · ["drop_index", database, set, name] · ["restore", [database names], replace_all].
    A "restore" does not carry the restored data: a consumer needs a new snapshot.
    """

    sequence: int
    time: float
    writes: int
    record: bytes

    @property
    def ops(self) -> tuple[tuple[Any, ...], ...]:
        """The ops as tuples, put values as JSON bytes and index definitions as IndexDef."""
        import orjson

        out: list[tuple[Any, ...]] = []
        for op in orjson.loads(self.record)["ops"]:
            if op[0] == "put":
                out.append(("put", op[1], op[2], op[3], orjson.dumps(op[4])))
            elif op[0] == "create_index":
                d = op[3]
                out.append(("create_index", op[1], op[2], IndexDef(d["name"], d["field"], d["kind"],
                                                                   tuple(d["sort_fields"]))))
            else:
                out.append(tuple(op))
        return tuple(out)


# ------------------------------------------------------------------ views, snapshots, restores


class ReadView(Protocol):
    """A consistent, read-only view of everything at one instant."""

    def database(self, name: str) -> Database:
        """Raises DatabaseNotFound."""

    def database_names(self) -> list[str]: ...

    def page(
        self, db: Database, set_name: str, index: str, text: str, order: SortOrder, offset: int, limit: int
    ) -> Page:
        """One page of a sortable index's matches for `text` in `order`, ties by key."""

    def key_counts(self) -> dict[str, int]:
        """Entries per database."""


class Snapshot(Protocol):
    """A consistent view that a backup streams from while writes go on. One thread at a time."""

    def databases(self) -> list[Database]:
        """Every database, with every set and ready index, sorted by name."""

    def entries(self, db: Database, set_name: str) -> Iterator[tuple[str, bytes]]:
        """The set's (key, JSON) entries in key order."""

    def sequence(self) -> int:
        """The last commit this snapshot includes."""

    def close(self) -> None: ...


class StagedDatabase(Protocol):
    """A database being restored; its name and credentials may be known only later."""

    name: str | None
    auth: Credentials | None


class RestoreWriter(Protocol):
    """Writes restored databases aside; `commit` swaps them in at once, `abort` forgets them.

    Nothing a reader sees changes before `commit`, and a crash before it leaves no trace.
    Used from one thread at a time.
    """

    def add_database(self) -> StagedDatabase: ...

    def add_set(self, db: StagedDatabase, name: str) -> None: ...

    def add_index(self, db: StagedDatabase, set_name: str, definition: IndexDef) -> None:
        """Raises ValueError when the set already has an index of that name."""

    def write(self, db: StagedDatabase, set_name: str, entries: Sequence[tuple[str, Any, bytes]]) -> None:
        """Stores (key, value, JSON) entries; a repeated key keeps its last value. A backend
        may store them while the caller goes on: a failure then surfaces at the next call."""

    def delete(self, db: StagedDatabase, set_name: str, keys: Sequence[str]) -> None:
        """Removes staged entries (and their index records); keys not staged are skipped.
        With `drop_index` and `remove_database`, this lets logged changes be replayed on
        top of a restored snapshot before the swap."""

    def drop_index(self, db: StagedDatabase, set_name: str, name: str) -> None: ...

    def remove_database(self, db: StagedDatabase) -> None:
        """Forgets a staged database: it will not be swapped in."""

    def commit(self, replace_all: bool, check: Callable[[Database], None] | None = None) -> None:
        """Swaps the staged databases in, in one commit; with `replace_all` every other
        database goes too. `check` is called, inside that commit, for each database about to
        be replaced or removed; what it raises aborts the swap and leaves everything as it was."""

    def abort(self) -> None: ...


@dataclass(frozen=True)
class Figure:
    """A backend's own figure for /metrics (named fuckbase_storage_<name>)."""

    name: str
    doc: str
    kind: Literal["gauge", "counter"]
    samples: Sequence[tuple[Mapping[str, str], float]]


# ------------------------------------------------------------------ the storage


class Storage(Protocol):
    """A backend. Safe to call from any thread; every write is one atomic commit."""

    remote: bool  # its calls wait on the network: the HTTP layer runs reads off its event loop
    shared: bool  # several nodes serve its data: the change sequence and its consumers are theirs together

    def read(self) -> AbstractContextManager[ReadView]: ...

    def fetch(self, reads: Sequence[PointRead]) -> list[Any]:
        """Answers point reads, all from one instant: per read, a Get's JSON or None, a
        Lookup's entries, or what it raised (DatabaseNotFound, SetNotFound, IndexNotFound,
        its check's refusal). A failure of the backend itself raises. The HTTP layer hands a
        remote backend the reads of many requests at once: one round trip answers them all."""

    def create_database(self, name: str, auth: Credentials | None) -> None:
        """Raises DatabaseExists."""

    def drop_database(self, name: str, check: AccessCheck) -> None:
        """Raises DatabaseNotFound. The entries are reclaimed later, in the background."""

    def create_set(self, database: str, name: str, check: AccessCheck) -> None:
        """Raises DatabaseNotFound, SetExists."""

    def put(self, database: str, set_name: str, key: str, value: Any, raw: bytes, check: AccessCheck) -> None:
        """Stores or replaces one entry (creating the set), keeping its indexes current."""

    def delete(self, database: str, set_name: str, key: str, check: AccessCheck) -> None:
        """Raises DatabaseNotFound, SetNotFound, KeyNotFound."""

    def batch(self, database: str, set_name: str, ops: Sequence[BatchOp], check: AccessCheck) -> int:
        """Applies every op in one commit, or none of them (BatchKeyNotFound). Returns how many."""

    def create_index(self, database: str, set_name: str, definition: IndexDef, check: AccessCheck) -> None:
        """Defines the index and fills it from the existing entries. Long: while it runs,
        other requests go on and later writes keep it current; it is queryable once done.
        Raises DatabaseNotFound, SetNotFound, IndexExists (IndexNotFound if dropped meanwhile)."""

    def drop_index(self, database: str, set_name: str, name: str, check: AccessCheck) -> None: ...

    def begin_group(self) -> None:
        """From now until `end_group`, this thread's write methods only queue their write
        (they return at once, with no result and no error); `end_group` applies the queue in
        order, one commit for all, each write succeeding or failing on its own."""

    def queued_writes(self) -> int:
        """How many writes the open group holds (0 without one)."""

    def end_group(self) -> list[BaseException | None]:
        """Applies and commits the queued writes: per write, None or what it raised (every
        one fails with the same error when the commit itself fails)."""

    def snapshot(self) -> Snapshot: ...

    def restore_writer(self) -> RestoreWriter: ...

    def sequence(self) -> int:
        """The number of the last commit."""

    def changes(self, after: int, limit: int) -> list[Change]:
        """Commits after `after`, oldest first, as long as a consumer retains them."""

    def retain_changes(self, consumer: str) -> int:
        """Registers a consumer: from now on changes are kept until it acknowledges them.
        Returns the sequence it has acknowledged so far (the current one when new)."""

    def acknowledge(self, consumer: str, sequence: int) -> None: ...

    def release_changes(self, consumer: str) -> None: ...

    def figures(self) -> list[Figure]:
        """What the backend reports of itself (connections, failures); cheap, never fails."""

    def lead(self, role: str) -> bool:
        """Whether this process holds `role` among every process sharing the data, taking it
        when free: the periodic jobs (housekeeping, scheduled and continuous backups) run on
        its holder only. Held until `close`, or until the backend loses this process."""

    def maintain(self) -> bool:
        """Housekeeping for exactly one process: reclaim dropped data, trim acknowledged
        changes, forget readers of dead processes. Call it periodically; True when more
        is left for the next call."""

    def flush(self) -> None:
        """Makes every commit so far durable on disk (fsync)."""

    def close(self) -> None: ...
