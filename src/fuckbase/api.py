"""The operations of the wire contract: validate a request body, run it on the storage, shape the reply.

Each handler takes the parsed JSON body and the request's headers and returns the response
body as bytes; failures are ApiError (or a storage error, which `error_for` maps to one).
Every body is first checked against the endpoint's fields in the contract's table (presence
and JSON types); the handlers check the rest (names, limits, meaning). Nothing here knows
about HTTP framing or which process runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import orjson

from fuckbase import __version__
from fuckbase.auth import AdminGuard, DatabaseGuard, body_credentials, make_db_auth
from fuckbase.contract import (
    BY_PATH,
    ENDPOINTS,
    MAX_KEY_BYTES,
    MAX_NAME_CHARS,
    Endpoint,
    ErrorCode,
    InvalidField,
    validator,
)
from fuckbase.errors import ApiError, invalid
from fuckbase.names import is_backup_folder, is_database_name, is_key, is_object_name, sort_fields_problem
from fuckbase.storage import (
    BASIC,
    SORTABLE,
    AlreadyExists,
    BatchOp,
    Database,
    DatabaseExists,
    Delete,
    Entry,
    Get,
    IndexDef,
    Lookup,
    NotFound,
    PointRead,
    Put,
    Storage,
    StorageError,
    StorageFull,
    StorageUnavailable,
)

if TYPE_CHECKING:
    from fuckbase.backup import BackupService

log = logging.getLogger("fuckbase.api")

DEFAULT_LIMIT = 10
# names that passed validation, by kind: most requests repeat a few names
_VALID_DB_NAMES: set[str] = set()
_VALID_OBJECT_NAMES: set[str] = set()
_VALID_NAMES_MAX = 65536

PUT_OK = b'{"status":"success","message":"Data stored successfully"}'
DELETE_OK = b'{"status":"success","message":"Data deleted successfully"}'
DROP_OK = b'{"status":"success","message":"Database dropped successfully"}'
INDEX_DROP_OK = b'{"status":"success","message":"Index dropped successfully"}'


class Headers(Protocol):
    """Request headers, looked up by lower-case name."""

    def get(self, key: str, default: Any = None) -> Any: ...


Handler = Callable[[dict[str, Any], Headers], bytes]
AsyncHandler = Callable[[dict[str, Any], Headers], Awaitable[bytes]]


BACKUP_PATHS = frozenset(e.path for e in ENDPOINTS if e.path.startswith("/backup/"))


def error_for(exc: StorageError) -> ApiError:
    """The contract's status and code for a storage error."""
    if isinstance(exc, NotFound):
        return ApiError(404, _NOT_FOUND.get(exc.what, ErrorCode.KEY_NOT_FOUND), str(exc))
    if isinstance(exc, AlreadyExists):
        return ApiError(409, _EXISTS[exc.what], str(exc))
    if isinstance(exc, StorageFull):
        return ApiError(507, ErrorCode.INSUFFICIENT_STORAGE, str(exc))
    if isinstance(exc, StorageUnavailable):
        return ApiError(503, ErrorCode.STORAGE_UNAVAILABLE, str(exc))
    log.error("storage failure: %s", exc)
    return ApiError(500, ErrorCode.INTERNAL_ERROR, "storage failure")


_NOT_FOUND = {"database": ErrorCode.DB_NOT_FOUND, "set": ErrorCode.SET_NOT_FOUND, "index": ErrorCode.INDEX_NOT_FOUND}
_EXISTS = {"database": ErrorCode.DB_ALREADY_EXISTS, "set": ErrorCode.SET_ALREADY_EXISTS,
           "index": ErrorCode.INDEX_ALREADY_EXISTS}


# ---------------------------------------------------------------- field validation


def checked(endpoint: Endpoint, handler: Callable[[dict[str, Any], Headers], Any]) -> Any:
    """The handler, behind the check of the endpoint's declared fields."""
    check = validator(endpoint.request_fields())

    def run(body: dict[str, Any], headers: Headers) -> Any:
        try:
            check(body)
        except InvalidField as exc:
            raise invalid(str(exc)) from None
        return handler(body, headers)

    return run


def database_name(body: dict[str, Any], field: str = "database") -> str:
    """A name given (the table's check has seen it is a non-empty string), checked for the rules."""
    name: str = body[field]
    if name in _VALID_DB_NAMES:
        return name
    if not is_database_name(name):
        if name == "full":
            raise invalid('database name "full" is reserved (it names the full-backup folder)')
        raise invalid(
            f'"{field}" must be 1-64 characters of A-Z a-z 0-9 _ - . (and not "." or "..")'
        )
    _remember(_VALID_DB_NAMES, name)
    return name


def object_name(body: dict[str, Any], field: str) -> str:
    """A set or index name: 1-256 characters, no control characters."""
    name: str = body[field]
    if name in _VALID_OBJECT_NAMES:
        return name
    if not is_object_name(name):
        raise invalid(f'"{field}" must be 1-{MAX_NAME_CHARS} characters without control characters')
    _remember(_VALID_OBJECT_NAMES, name)
    return name


def _remember(cache: set[str], name: str) -> None:
    if len(cache) >= _VALID_NAMES_MAX:
        cache.clear()
    cache.add(name)


def key_field(body: dict[str, Any]) -> str:
    key: str = body["key"]
    if not is_key(key):
        raise invalid(f'"key" must be at most {MAX_KEY_BYTES} bytes of UTF-8')
    return key


def value_json(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        raise invalid(f'"value" cannot be stored: {exc}') from None


@contextlib.contextmanager
def _naming_the_protected(what: str) -> Iterator[None]:
    """A refusal, with no admin configured, of an operation that a protected database's
    credentials open: which database, and that an admin's credentials open any of them."""
    try:
        yield
    except ApiError as exc:
        if exc.code is not ErrorCode.AUTH_FAILED:
            raise
        raise ApiError(401, ErrorCode.AUTH_FAILED, f"Authentication failed: {what}; send its credentials, or"
                       " configure an admin user (--admin-username), whose credentials open any drop or restore"
                       ) from None


def _int_field(obj: dict[str, Any], name: str, default: int) -> int:
    v: int | None = obj.get(name)
    if v is None:
        return default
    if v < 0:
        raise invalid(f'"pagination.{name}" must be a non-negative integer')
    return v


def _order(spec: dict[str, Any], definition: IndexDef) -> tuple[str, bool]:
    field = spec["field"]
    if field not in definition.sort_fields:
        raise invalid(
            f"sort field {field!r} is not one of the index's sort fields {list(definition.sort_fields)}"
        )
    order = spec.get("order") or "asc"
    if order.lower() not in ("asc", "desc"):
        raise invalid('"sort.order" must be "asc" or "desc"')
    return field, order.lower() == "desc"


def _batch_ops(body: dict[str, Any]) -> list[BatchOp]:
    raw_ops: list[Any] = body["operations"]
    ops: list[BatchOp] = []
    append, dumps = ops.append, orjson.dumps
    for i, o in enumerate(raw_ops):
        if type(o) is not dict:
            raise invalid(f"operation {i}: must be an object")
        key = o.get("key")
        if type(key) is not str or not is_key(key):
            raise invalid(f'operation {i}: "key" must be a string of 1-{MAX_KEY_BYTES} bytes of UTF-8')
        kind = o.get("op")
        if kind == "put":
            if "value" not in o:
                raise invalid(f'operation {i}: "value" is required for a put')
            value = o["value"]
            try:
                append(Put(key, value, dumps(value)))
            except orjson.JSONEncodeError as exc:
                raise invalid(f'operation {i}: "value" cannot be stored: {exc}') from None
        elif kind == "delete":
            append(Delete(key))
        else:
            raise invalid(f'operation {i}: "op" must be "put" or "delete"')
    return ops


def _entry_json(key: str, value: bytes) -> bytes:
    return b'{"key":' + orjson.dumps(key) + b',"value":' + value + b"}"


def _entries_json(entries: list[Entry]) -> bytes:
    return b",".join([_entry_json(k, v) for k, v in entries])


class PreparedRead(NamedTuple):
    """A request answered by one point read: what to fetch, and how its result becomes the
    response body. A remote backend fetches the reads of many requests at once."""

    read: PointRead
    answer: Callable[[Any], bytes]

    def finish(self, result: Any) -> bytes:
        """The body for what `Storage.fetch` gave; raises what the read raised."""
        if isinstance(result, BaseException):
            try:
                raise result
            finally:
                del result  # the traceback holds this frame: no cycle through it
        return self.answer(result)


def _got(key: str, raw: bytes | None) -> bytes:
    if raw is None:
        raise ApiError(404, ErrorCode.KEY_NOT_FOUND, f"key {key!r} not found")
    return b'{"status":"success","data":' + raw + b"}"


def _found(entries: list[Entry]) -> bytes:
    # one match (a lookup by a unique field) skips the list and the join: 0.57 → 0.38 µs
    body = _entry_json(*entries[0]) if len(entries) == 1 else _entries_json(entries)
    return b'{"status":"success","data":{"count":%d,"data":[%s]}}' % (len(entries), body)


def success(message: str | None = None, **fields: Any) -> bytes:
    out: dict[str, Any] = {"status": "success"}
    if message is not None:
        out["message"] = message
    out.update(fields)
    return orjson.dumps(out)


# ---------------------------------------------------------------- the handlers


class Api:
    """Binds the endpoint handlers to one storage and one configuration.

    `backups` is given only where long operations run; `info` adds fields to /server/info.
    """

    def __init__(
        self,
        storage: Storage,
        admin: AdminGuard,
        db_guard: DatabaseGuard,
        info: Callable[[], dict[str, Any]],
        backups: BackupService | None = None,
    ):
        self.storage = storage
        self.admin = admin
        self.db_guard = db_guard
        self.backups = backups
        self.started = time.monotonic()
        self._info = info
        self.handlers: dict[str, Handler] = {
            e.path: checked(e, getattr(self, e.handler)) for e in ENDPOINTS if e.path not in BACKUP_PATHS
        }
        self.async_handlers: dict[str, AsyncHandler] = {
            e.path: checked(e, getattr(self, e.handler)) for e in ENDPOINTS if e.path in BACKUP_PATHS
        }
        self.point_reads: dict[str, Callable[[dict[str, Any], Headers], PreparedRead]] = {
            "/set/get": checked(BY_PATH["/set/get"], self.prepare_get),
            "/index/query": checked(BY_PATH["/index/query"], self.prepare_query),
        }

    def _view_database(self, view: Any, body: dict[str, Any], headers: Headers) -> Database:
        """The request's database in `view`, after its credentials (if it has any) are checked."""
        db: Database = view.database(database_name(body))
        if db.auth:
            self.db_guard.check(db.auth, headers.get("authorization"), body)
        return db

    def _access(self, body: dict[str, Any], headers: Headers) -> Any:
        return self.db_guard.access(headers.get("authorization"), body)

    # databases and server

    def create_database(self, body: dict[str, Any], headers: Headers) -> bytes:
        self.admin.check(headers.get("x-admin-authorization"), body)
        name = database_name(body, "name")
        creds = body_credentials(body, "auth")
        stored = None
        if creds is not None:
            if not creds[0] or not creds[1]:
                raise invalid('"auth" needs a non-empty "username" and "password"')
            with self.storage.read() as view:  # refuse before spending scrypt on it
                if name in view.database_names():
                    raise DatabaseExists(name)
            stored = make_db_auth(*creds)
        self.storage.create_database(name, stored)
        return success("Database created successfully", data={"database": name})

    def drop_database(self, body: dict[str, Any], headers: Headers) -> bytes:
        self.admin.check(headers.get("x-admin-authorization"), body)
        name = database_name(body, "name")
        if self.admin.enabled:
            self.storage.drop_database(name, lambda stored: None)
        else:
            access = self._access(body, headers)

            def check(stored: Any) -> None:  # wherever the storage runs it (a write group: later)
                with _naming_the_protected(f"{name!r} is a protected database"):
                    access(stored)

            self.storage.drop_database(name, check)
        return DROP_OK

    def server_info(self, body: dict[str, Any], headers: Headers) -> bytes:
        self.admin.check(headers.get("x-admin-authorization"), body)
        minutes = int(time.monotonic() - self.started) // 60
        uptime = f"{minutes // 1440}d {minutes // 60 % 24}h {minutes % 60}m"
        with self.storage.read() as view:
            count = len(view.database_names())
        return success(version=__version__, uptime=uptime, databases_count=count, **self._info())

    # sets and data

    def create_set(self, body: dict[str, Any], headers: Headers) -> bytes:
        name = object_name(body, "name")
        self.storage.create_set(database_name(body), name, self._access(body, headers))
        return success("Set created successfully", data={"set": name})

    def list_sets(self, body: dict[str, Any], headers: Headers) -> bytes:
        with self.storage.read() as view:
            db = self._view_database(view, body, headers)
            return success(data={"sets": sorted(db.sets)})

    def put(self, body: dict[str, Any], headers: Headers) -> bytes:
        set_name = object_name(body, "set")
        key = key_field(body)
        value = body["value"]
        self.storage.put(database_name(body), set_name, key, value, value_json(value), self._access(body, headers))
        return PUT_OK

    def get(self, body: dict[str, Any], headers: Headers) -> bytes:
        return self._fetched(self.prepare_get(body, headers))

    def prepare_get(self, body: dict[str, Any], headers: Headers) -> PreparedRead:
        key = key_field(body)
        set_name = object_name(body, "set")
        return PreparedRead(Get(database_name(body), set_name, key, self._access(body, headers)), partial(_got, key))

    def _fetched(self, prepared: PreparedRead) -> bytes:
        return prepared.finish(self.storage.fetch([prepared.read])[0])

    def delete(self, body: dict[str, Any], headers: Headers) -> bytes:
        set_name = object_name(body, "set")
        key = key_field(body)
        self.storage.delete(database_name(body), set_name, key, self._access(body, headers))
        return DELETE_OK

    def batch(self, body: dict[str, Any], headers: Headers) -> bytes:
        set_name = object_name(body, "set")
        database = database_name(body)
        applied = self.storage.batch(database, set_name, _batch_ops(body), self._access(body, headers))
        return success("Batch applied successfully", data={"applied": applied})

    # indexes

    def create_index(self, body: dict[str, Any], headers: Headers) -> bytes:
        set_name = object_name(body, "set")
        name = object_name(body, "name")
        field = object_name(body, "field")
        definition = IndexDef(name, field, BASIC)
        self.storage.create_index(database_name(body), set_name, definition, self._access(body, headers))
        return success("Index created successfully", data={"index": name})

    def create_sortable_index(self, body: dict[str, Any], headers: Headers) -> bytes:
        set_name = object_name(body, "set")
        name = object_name(body, "name")
        field = object_name(body, "primary_field")
        sort_fields: list[str] = body["sort_fields"]
        problem = sort_fields_problem(sort_fields)
        if problem is not None:
            raise invalid(problem)
        definition = IndexDef(name, field, SORTABLE, tuple(sort_fields))
        self.storage.create_index(database_name(body), set_name, definition, self._access(body, headers))
        return success("Sortable index created successfully", data={"index": name})

    def drop_index(self, body: dict[str, Any], headers: Headers) -> bytes:
        set_name = object_name(body, "set")
        name = object_name(body, "name")
        self.storage.drop_index(database_name(body), set_name, name, self._access(body, headers))
        return INDEX_DROP_OK

    def query(self, body: dict[str, Any], headers: Headers) -> bytes:
        return self._fetched(self.prepare_query(body, headers))

    def prepare_query(self, body: dict[str, Any], headers: Headers) -> PreparedRead:
        name = object_name(body, "index")
        text: str = body["value"]
        set_name = object_name(body, "set")
        return PreparedRead(Lookup(database_name(body), set_name, name, text, self._access(body, headers)), _found)

    def query_sorted(self, body: dict[str, Any], headers: Headers) -> bytes:
        return self._sorted(body, headers, multi=False)

    def query_multi_sorted(self, body: dict[str, Any], headers: Headers) -> bytes:
        return self._sorted(body, headers, multi=True)

    def _sorted(self, body: dict[str, Any], headers: Headers, multi: bool) -> bytes:
        name = object_name(body, "index")
        text: str = body["value"]
        set_name = object_name(body, "set")
        pagination = body.get("pagination") or {}
        offset = _int_field(pagination, "offset", 0)
        limit = _int_field(pagination, "limit", DEFAULT_LIMIT) or DEFAULT_LIMIT
        with self.storage.read() as view:
            db = self._view_database(view, body, headers)
            definition = self._index_of(db, set_name, name)
            if definition.kind != SORTABLE:
                raise invalid(f"index {name!r} is not a sortable index")
            spec = body.get("sort")
            if multi:
                if not spec:
                    raise invalid('"sort" must be a non-empty list of {"field", "order"}')
                order = [_order(o, definition) for o in spec]
            else:
                if spec is None:
                    spec = {"field": definition.sort_fields[0]}
                order = [_order(spec, definition)]
            page = view.page(db, set_name, name, text, order, offset, limit)
        return b'{"status":"success","count":%d,"total":%d,"offset":%d,"limit":%d,"data":[%s]}' % (
            len(page.entries), page.total, offset, limit, _entries_json(page.entries)
        )

    @staticmethod
    def _index_of(db: Database, set_name: str, name: str) -> IndexDef:
        s = db.sets.get(set_name)
        if s is None:
            raise ApiError(404, ErrorCode.SET_NOT_FOUND, f"set {set_name!r} not found in database {db.name!r}")
        definition = s.indexes.get(name)
        if definition is None:
            raise ApiError(404, ErrorCode.INDEX_NOT_FOUND, f"index {name!r} not found in set {set_name!r}")
        return definition

    # backups (coroutines: they wait on the object store)

    def _backup_service(self) -> BackupService:
        if self.backups is None:
            raise RuntimeError("backups run where long operations run")
        return self.backups

    def _optional_database(self, body: dict[str, Any]) -> str | None:
        """`{}`, `{"database": null}` (the Ruby client's "all") and `""` mean every database."""
        if body.get("database") in (None, ""):
            return None
        return database_name(body)

    async def backup_create(self, body: dict[str, Any], headers: Headers) -> bytes:
        self.admin.check(headers.get("x-admin-authorization"), body)
        database = self._optional_database(body)
        backups = self._backup_service()
        result = await backups.create(database)
        message = "Database backed up successfully" if database else "All databases backed up successfully"
        return success(message, **result, target=backups.target)

    async def backup_list(self, body: dict[str, Any], headers: Headers) -> bytes:
        """Lists the named backups and, when a continuous backup exists, its restorable range."""
        from fuckbase import continuous
        from fuckbase.backup import storage_error
        from fuckbase.objectstore import ObjectStoreError

        self.admin.check(headers.get("x-admin-authorization"), body)
        backups = self._backup_service()
        database = body.get("database") or None  # absent, null or "": all (the contract checked its type)
        if database is not None and not is_backup_folder(database):
            raise invalid('"database" must be a database name: no slash or control character, at most 256')
        listed = await backups.list(database)
        try:
            gens = await continuous.timeline(backups.store, backups.shipped(), histories=True, keyring=backups.keyring)
            span = continuous.window(gens, database)
        except ObjectStoreError as exc:
            raise storage_error(ErrorCode.LIST_FAILED, exc) from None
        extra: dict[str, Any] = {"point_in_time": span} if span is not None else {}
        return success(None, backups=listed, target=backups.target, **extra)

    async def backup_restore(self, body: dict[str, Any], headers: Headers) -> bytes:
        """A named backup, or with "at" the state at an instant; "as" restores one database
        into a new name and leaves the original alone."""
        from fuckbase import continuous

        self.admin.check(headers.get("x-admin-authorization"), body)
        backups = self._backup_service()
        name, at = body.get("backup_name"), body.get("at")
        if name and at:
            raise invalid('give "backup_name" or "at", not both')
        if not name and not at:
            raise invalid('"backup_name" is required (or "at" for a point-in-time restore)')
        into = database_name(body, "as") if body.get("as") is not None else None
        if at:
            instant = continuous.parse_instant(at)
            database = self._optional_database(body)
            if into is not None and database is None:
                raise invalid('"as" needs "database": the one database to restore under the new name')
            target = into or database
        else:
            target = backups.replaces(name)
            if into is not None and target is None:
                raise invalid('"as" needs a database backup, not a full one')
            target = into or target
        check = None if self.admin.enabled else await self._may_replace(target, body, headers)
        if at:
            result = await continuous.restore_to(backups, instant, database, into, check)
            restored = f"restored as of {result['at']}"
        else:
            result = await backups.restore(name, check, into)
            restored = "restored successfully"
        message = f"All databases {restored}" if result["full"] else f"Database {restored}"
        return success(message, **result, target=backups.target)

    async def _may_replace(self, target: str | None, body: dict[str, Any], headers: Headers) -> Callable[[Database], None]:
        """With no admin configured, a restore may replace or remove a protected database only
        with its credentials, as a drop may. They are checked here, before any download, on a
        thread (scrypt); the returned check runs inside the restore's commit and refuses any
        protected database they were not checked against (say, one created meanwhile)."""
        with self.storage.read() as view:
            present = view.database_names()
            names = present if target is None else [target] if target in present else []
            protected = [(db.name, db.auth) for db in map(view.database, names) if db.auth]
        for name, stored in protected:  # each raises 401 unless the request's credentials open it
            with _naming_the_protected(f"the restore replaces or removes the protected database {name!r}"):
                await asyncio.to_thread(self.db_guard.check, stored, headers.get("authorization"), body)
        verified = {stored["hash"] for _, stored in protected}

        def check(replaced: Database) -> None:
            if replaced.auth and replaced.auth["hash"] not in verified:
                raise ApiError(401, ErrorCode.AUTH_FAILED, "Authentication failed: the restore replaces a protected database")

        return check

    async def backup_verify(self, body: dict[str, Any], headers: Headers) -> bytes:
        self.admin.check(headers.get("x-admin-authorization"), body)
        backups = self._backup_service()
        result = await backups.verify(body.get("backup_name"))
        return success("Backup is valid", **result, target=backups.target)
