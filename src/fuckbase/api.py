"""The operations of the wire contract: validate a request body, run it on the engine, shape the reply.

Each handler takes the parsed JSON body and the request's auth headers and returns the
response body as bytes; failures are ApiError. Nothing here knows about HTTP framing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import orjson

from fuckbase import __version__
from fuckbase.auth import AdminGuard, DatabaseGuard, body_credentials, make_db_auth
from fuckbase.backup import BackupService
from fuckbase.engine import DatabaseState, Engine, SetState
from fuckbase.errors import ApiError, invalid
from fuckbase.indexes import BASIC, SORTABLE, IndexDef, SortableIndex, match_text
from fuckbase.names import (
    MAX_KEY_BYTES,
    MAX_NAME_CHARS,
    is_database_name,
    is_key,
    is_object_name,
)

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
    """Request headers, looked up by lower-case name (granian's header map is one)."""

    def get(self, key: str, default: Any = None) -> Any: ...


Handler = Callable[[dict[str, Any], Headers], bytes]
RunAsync = Callable[[Coroutine[Any, Any, Any]], Any]


# ---------------------------------------------------------------- field validation


def text_field(body: dict[str, Any], name: str) -> str:
    v = body.get(name)
    if v is None or v == "":
        raise invalid(f'"{name}" is required')
    if not isinstance(v, str):
        raise invalid(f'"{name}" must be a string')
    return v


def database_name(body: dict[str, Any], field: str = "database") -> str:
    name = text_field(body, field)
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
    name = text_field(body, field)
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
    key = text_field(body, "key")
    if not is_key(key):
        raise invalid(f'"key" must be at most {MAX_KEY_BYTES} bytes of UTF-8')
    return key


def _int_field(obj: dict[str, Any], name: str, default: int) -> int:
    v = obj.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise invalid(f'"pagination.{name}" must be a non-negative integer')
    return v


def _order(spec: Any, sortable: SortableIndex) -> tuple[str, bool]:
    if not isinstance(spec, dict):
        raise invalid('each sort must be an object {"field": …, "order": "asc"|"desc"}')
    field = spec.get("field")
    if not isinstance(field, str) or not field:
        raise invalid('"sort.field" is required')
    if field not in sortable.sort_fields:
        raise invalid(
            f"sort field {field!r} is not one of the index's sort fields {list(sortable.sort_fields)}"
        )
    order = spec.get("order") or "asc"
    if not isinstance(order, str) or order.lower() not in ("asc", "desc"):
        raise invalid('"sort.order" must be "asc" or "desc"')
    return field, order.lower() == "desc"


def _match_value(body: dict[str, Any]) -> str:
    if "value" not in body:
        raise invalid('"value" is required')
    v = body["value"]
    if isinstance(v, (dict, list)) or v is None:
        raise invalid('"value" must be a string (or a number or boolean)')
    return match_text(v)


def _entries_json(entries: list[tuple[str, bytes]]) -> bytes:
    return b",".join(b'{"key":' + orjson.dumps(k) + b',"value":' + v + b"}" for k, v in entries)


def success(message: str | None = None, **fields: Any) -> bytes:
    out: dict[str, Any] = {"status": "success"}
    if message is not None:
        out["message"] = message
    out.update(fields)
    return orjson.dumps(out)


# ---------------------------------------------------------------- the handlers


class Api:
    """Binds the endpoint handlers to one engine and one configuration."""

    def __init__(
        self,
        engine: Engine,
        admin: AdminGuard,
        backups: BackupService,
        run_async: RunAsync,
        extra_info: Callable[[], dict[str, Any]],
    ):
        self.engine = engine
        self.admin = admin
        self.backups = backups
        self._run = run_async  # runs a backup coroutine on the I/O loop, waits for its result
        self.db_guard = DatabaseGuard()
        self.started = time.monotonic()
        self._extra_info = extra_info
        self.routes: dict[str, Handler] = {
            "/create": self.create_database,
            "/drop": self.drop_database,
            "/server/info": self.server_info,
            "/set/create": self.create_set,
            "/set/list": self.list_sets,
            "/set/put": self.put,
            "/set/get": self.get,
            "/set/delete": self.delete,
            "/index/create": self.create_index,
            "/index/create/sortable": self.create_sortable_index,
            "/index/drop": self.drop_index,
            "/index/query": self.query,
            "/index/query/sorted": self.query_sorted,
            "/index/query/multi-sorted": self.query_multi_sorted,
            "/backup/create": self.backup_create,
            "/backup/list": self.backup_list,
            "/backup/restore": self.backup_restore,
            "/backup/verify": self.backup_verify,
        }

    def _open(self, body: dict[str, Any], headers: Headers) -> DatabaseState:
        """The request's database, after its credentials (if it has any) are checked."""
        db = self.engine.database(database_name(body))
        if db.auth:
            self.db_guard.check(db.auth, headers.get("authorization"), body)
        return db

    def _open_set(self, body: dict[str, Any], headers: Headers) -> SetState:
        set_name = object_name(body, "set")
        db = self.engine.database(database_name(body))
        if db.auth:
            self.db_guard.check(db.auth, headers.get("authorization"), body)
        return self.engine.set_of(db, set_name)

    # databases and server

    def create_database(self, body: dict[str, Any], headers: Headers) -> bytes:
        self.admin.check(headers.get("x-admin-authorization"), body)
        name = database_name(body, "name")
        creds = body_credentials(body, "auth")
        stored = None
        if creds is not None:
            if not creds[0] or not creds[1]:
                raise invalid('"auth" needs a non-empty "username" and "password"')
            stored = make_db_auth(*creds)
        self.engine.create_database(name, stored)
        return success("Database created successfully", data={"database": name})

    def drop_database(self, body: dict[str, Any], headers: Headers) -> bytes:
        self.admin.check(headers.get("x-admin-authorization"), body)
        name = database_name(body, "name")
        db = self.engine.database(name)
        if db.auth and not self.admin.enabled:
            self.db_guard.check(db.auth, headers.get("authorization"), body)
        self.engine.drop_database(db)
        return DROP_OK

    def server_info(self, body: dict[str, Any], headers: Headers) -> bytes:
        self.admin.check(headers.get("x-admin-authorization"), body)
        minutes = int(time.monotonic() - self.started) // 60
        uptime = f"{minutes // 1440}d {minutes // 60 % 24}h {minutes % 60}m"
        return success(
            version=__version__,
            uptime=uptime,
            databases_count=len(self.engine.databases),
            **self._extra_info(),
        )

    # sets and data

    def create_set(self, body: dict[str, Any], headers: Headers) -> bytes:
        name = object_name(body, "name")
        db = self._open(body, headers)
        self.engine.create_set(db, name)
        return success("Set created successfully", data={"set": name})

    def list_sets(self, body: dict[str, Any], headers: Headers) -> bytes:
        db = self._open(body, headers)
        return success(data={"sets": sorted(db.sets)})

    def put(self, body: dict[str, Any], headers: Headers) -> bytes:
        set_name = object_name(body, "set")
        key = key_field(body)
        if "value" not in body:
            raise invalid('"value" is required')
        value = body["value"]
        db = self.engine.database(database_name(body))
        if db.auth:
            self.db_guard.check(db.auth, headers.get("authorization"), body)
        self.engine.put(db, set_name, key, value, orjson.dumps(value))
        return PUT_OK

    def get(self, body: dict[str, Any], headers: Headers) -> bytes:
        key = key_field(body)
        s = self._open_set(body, headers)
        raw = self.engine.get(s, key)
        if raw is None:
            raise ApiError(404, "KEY_NOT_FOUND", f"key {key!r} not found")
        return b'{"status":"success","data":' + raw + b"}"

    def delete(self, body: dict[str, Any], headers: Headers) -> bytes:
        set_name = object_name(body, "set")
        key = key_field(body)
        db = self._open(body, headers)
        self.engine.delete(db, set_name, key)
        return DELETE_OK

    # indexes

    def create_index(self, body: dict[str, Any], headers: Headers) -> bytes:
        set_name = object_name(body, "set")
        name = object_name(body, "name")
        field = object_name(body, "field")
        db = self._open(body, headers)
        self.engine.create_index(db, set_name, IndexDef(name, field, BASIC))
        return success("Index created successfully", data={"index": name})

    def create_sortable_index(self, body: dict[str, Any], headers: Headers) -> bytes:
        set_name = object_name(body, "set")
        name = object_name(body, "name")
        field = object_name(body, "primary_field")
        sort_fields = body.get("sort_fields")
        if (
            not isinstance(sort_fields, list)
            or not sort_fields
            or not all(isinstance(f, str) and f for f in sort_fields)
        ):
            raise invalid('"sort_fields" must be a non-empty list of field names')
        if len(set(sort_fields)) != len(sort_fields):
            raise invalid('"sort_fields" must not repeat a field')
        db = self._open(body, headers)
        definition = IndexDef(name, field, SORTABLE, tuple(sort_fields))
        self.engine.create_index(db, set_name, definition)
        return success("Sortable index created successfully", data={"index": name})

    def drop_index(self, body: dict[str, Any], headers: Headers) -> bytes:
        set_name = object_name(body, "set")
        name = object_name(body, "name")
        db = self._open(body, headers)
        self.engine.drop_index(db, set_name, name)
        return INDEX_DROP_OK

    def query(self, body: dict[str, Any], headers: Headers) -> bytes:
        name = object_name(body, "index")
        text = _match_value(body)
        s = self._open_set(body, headers)
        entries = self.engine.lookup(s, self.engine.index(s, name), text)
        return b'{"status":"success","data":{"count":%d,"data":[%s]}}' % (
            len(entries),
            _entries_json(entries),
        )

    def query_sorted(self, body: dict[str, Any], headers: Headers) -> bytes:
        return self._sorted(body, headers, multi=False)

    def query_multi_sorted(self, body: dict[str, Any], headers: Headers) -> bytes:
        return self._sorted(body, headers, multi=True)

    def _sorted(self, body: dict[str, Any], headers: Headers, multi: bool) -> bytes:
        name = object_name(body, "index")
        text = _match_value(body)
        pagination = body.get("pagination") or {}
        if not isinstance(pagination, dict):
            raise invalid('"pagination" must be an object {"offset", "limit"}')
        offset = _int_field(pagination, "offset", 0)
        limit = _int_field(pagination, "limit", DEFAULT_LIMIT) or DEFAULT_LIMIT
        s = self._open_set(body, headers)
        idx = self.engine.index(s, name)
        if not isinstance(idx, SortableIndex):
            raise invalid(f"index {name!r} is not a sortable index")
        spec = body.get("sort")
        if multi:
            if not isinstance(spec, list) or not spec:
                raise invalid('"sort" must be a non-empty list of {"field", "order"}')
            order = [_order(o, idx) for o in spec]
        else:
            if spec is None:
                spec = {"field": idx.sort_fields[0]}
            order = [_order(spec, idx)]
        total, entries = self.engine.page(s, idx, text, order, offset, limit)
        return (
            b'{"status":"success","count":%d,"total":%d,"offset":%d,"limit":%d,"data":[%s]}'
            % (len(entries), total, offset, limit, _entries_json(entries))
        )

    # backups

    def _optional_database(self, body: dict[str, Any]) -> str | None:
        """`{}`, `{"database": null}` (the Ruby client's "all") and `""` mean every database."""
        if body.get("database") in (None, ""):
            return None
        return database_name(body)

    def backup_create(self, body: dict[str, Any], headers: Headers) -> bytes:
        self.admin.check(headers.get("x-admin-authorization"), body)
        database = self._optional_database(body)
        result = self._run(self.backups.create(database))
        message = "Database backed up successfully" if database else "All databases backed up successfully"
        return success(message, **result, target=self.backups.target)

    def backup_list(self, body: dict[str, Any], headers: Headers) -> bytes:
        self.admin.check(headers.get("x-admin-authorization"), body)
        backups = self._run(self.backups.list(self._optional_database(body)))
        return success(backups=backups, target=self.backups.target)

    def backup_restore(self, body: dict[str, Any], headers: Headers) -> bytes:
        self.admin.check(headers.get("x-admin-authorization"), body)
        result = self._run(self.backups.restore(body.get("backup_name")))
        message = "All databases restored successfully" if result["full"] else "Database restored successfully"
        return success(message, **result)

    def backup_verify(self, body: dict[str, Any], headers: Headers) -> bytes:
        self.admin.check(headers.get("x-admin-authorization"), body)
        result = self._run(self.backups.verify(body.get("backup_name")))
        return success("Backup is valid", **result)
