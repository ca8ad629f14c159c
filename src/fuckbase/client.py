"""The official Python client for the FuckBase HTTP API.

`Client` (blocking) and `AsyncClient` (asyncio) speak the wire contract of API.md so that
nobody has to hand-write JSON POSTs::

    with Client("http://localhost:8080", admin_auth=("admin", "secret")) as client:
        db = client.create_database("shop", auth=("alice", "s3cr3t"))
        users = db.create_set("users")
        users.put("u1", {"email": "a@example.com", "age": 30})
        users.create_index("by_email", "email")
        print(users.query("by_email", "a@example.com"))

Both clients share every piece of logic that is not I/O: each operation is first described
as a `_Call` (path, body, credentials, and how to read the answer) by a pure function, then
the sync or async transport sends it and hands the response to the same parser. Server
error codes become typed exceptions rooted at `FuckBaseError`.
"""

from __future__ import annotations

import base64
import builtins
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar, overload

import httpx

from fuckbase.contract import ErrorCode, scalar_text

__all__ = [
    "AdminAuthRequired",
    "AlreadyExistsError",
    "AsyncBackups",
    "AsyncClient",
    "AsyncDatabase",
    "AsyncSet",
    "AuthFailed",
    "BackupFailed",
    "BackupInfo",
    "BackupEncrypted",
    "BackupInvalid",
    "BackupNotFound",
    "Backups",
    "Client",
    "Database",
    "DatabaseExists",
    "DatabaseNotFound",
    "Entry",
    "FuckBaseConnectionError",
    "FuckBaseError",
    "IndexExists",
    "IndexNotFound",
    "InternalError",
    "InvalidRequest",
    "KeyNotFound",
    "ListFailed",
    "MethodNotAllowed",
    "NotFoundError",
    "Page",
    "PayloadTooLarge",
    "RestoreFailed",
    "S3NotEnabled",
    "Set",
    "SetExists",
    "SetNotFound",
    "StorageFull",
    "TooManyRequests",
    "Unavailable",
    "RequestTimeout",
]

T = TypeVar("T")
D = TypeVar("D")

Auth = tuple[str, str]
"""A `(username, password)` pair."""

Sort = str | tuple[str, str]
"""A sort key: `"field"` (ascending) or `("field", "asc" | "desc")`."""

QueryValue = str | int | float | bool
"""What an index query matches; a number or boolean is sent as its text form (`30`, `true`),
which is what the server matches (it refuses anything but a string, as the original does)."""

DEFAULT_URL = "http://localhost:8080"


# ------------------------------------------------------------------------------ errors


class FuckBaseError(Exception):
    """Any failure of a FuckBase call: the server's `code`, `message` and HTTP `status`.

    `code` is None when the server sent no error code (e.g. a non-JSON error page) and
    `status` is None when no response arrived at all. `codes`: the contract's error codes
    a subclass stands for.
    """

    codes: ClassVar[tuple[ErrorCode, ...]] = ()

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status

    def __str__(self) -> str:
        where = " ".join(p for p in (self.code, f"(HTTP {self.status})" if self.status else None) if p)
        return f"{where}: {self.message}" if where else self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # keep code and status across pickling (e.g. from a worker process)
        return (type(self), (self.message,), self.__dict__)


class FuckBaseConnectionError(FuckBaseError, ConnectionError):
    """The server could not be reached or did not answer in time (no HTTP status)."""


class InvalidRequest(FuckBaseError):
    """INVALID_REQUEST: a missing or malformed field, a bad name, an unknown sort field."""
    codes = (ErrorCode.INVALID_REQUEST, ErrorCode.URI_TOO_LONG, ErrorCode.HEADERS_TOO_LARGE)


class AuthFailed(FuckBaseError):
    """AUTH_FAILED: the database's credentials were missing or wrong."""
    codes = (ErrorCode.AUTH_FAILED,)


class AdminAuthRequired(FuckBaseError):
    """ADMIN_AUTH_REQUIRED: admin credentials were missing or wrong."""
    codes = (ErrorCode.ADMIN_AUTH_REQUIRED,)


class NotFoundError(FuckBaseError):
    """Base of the 404 errors: something named in the request does not exist."""
    codes = (ErrorCode.NOT_FOUND,)


class DatabaseNotFound(NotFoundError):
    """DB_NOT_FOUND."""
    codes = (ErrorCode.DB_NOT_FOUND,)


class SetNotFound(NotFoundError):
    """SET_NOT_FOUND."""
    codes = (ErrorCode.SET_NOT_FOUND,)


class IndexNotFound(NotFoundError):
    """INDEX_NOT_FOUND."""
    codes = (ErrorCode.INDEX_NOT_FOUND,)


class KeyNotFound(NotFoundError):
    """KEY_NOT_FOUND."""
    codes = (ErrorCode.KEY_NOT_FOUND,)


class BackupNotFound(NotFoundError):
    """BACKUP_NOT_FOUND: the backup name is well formed but no such backup exists."""
    codes = (ErrorCode.BACKUP_NOT_FOUND,)


class AlreadyExistsError(FuckBaseError):
    """Base of the 409 errors: the thing to create already exists."""


class DatabaseExists(AlreadyExistsError):
    """DB_ALREADY_EXISTS."""
    codes = (ErrorCode.DB_ALREADY_EXISTS,)


class SetExists(AlreadyExistsError):
    """SET_ALREADY_EXISTS."""
    codes = (ErrorCode.SET_ALREADY_EXISTS,)


class IndexExists(AlreadyExistsError):
    """INDEX_ALREADY_EXISTS."""
    codes = (ErrorCode.INDEX_ALREADY_EXISTS,)


class PayloadTooLarge(FuckBaseError):
    """PAYLOAD_TOO_LARGE: the request body is over the server's limit."""
    codes = (ErrorCode.PAYLOAD_TOO_LARGE,)


class MethodNotAllowed(FuckBaseError):
    """METHOD_NOT_ALLOWED."""
    codes = (ErrorCode.METHOD_NOT_ALLOWED,)


class S3NotEnabled(FuckBaseError):
    """S3_NOT_ENABLED: the original server has no backup target (FuckBase always has one)."""
    codes = (ErrorCode.S3_NOT_ENABLED,)


class BackupFailed(FuckBaseError):
    """BACKUP_FAILED: the object store failed or timed out while writing a backup."""
    codes = (ErrorCode.BACKUP_FAILED,)


class RestoreFailed(FuckBaseError):
    """RESTORE_FAILED: the object store failed or timed out while reading a backup."""
    codes = (ErrorCode.RESTORE_FAILED,)


class ListFailed(FuckBaseError):
    """LIST_FAILED: the object store failed or timed out while listing backups."""
    codes = (ErrorCode.LIST_FAILED,)


class BackupInvalid(FuckBaseError):
    """BACKUP_INVALID: the object is not a valid backup; nothing was changed."""
    codes = (ErrorCode.BACKUP_INVALID,)


class BackupEncrypted(FuckBaseError):
    """BACKUP_ENCRYPTED: the backup is encrypted under a key the server was not given; nothing was changed."""
    codes = (ErrorCode.BACKUP_ENCRYPTED,)


class InternalError(FuckBaseError):
    """INTERNAL_ERROR: the server failed on its own account."""
    codes = (ErrorCode.INTERNAL_ERROR,)


class StorageFull(FuckBaseError):
    """INSUFFICIENT_STORAGE: the server's disk is full; the write was not stored. Reads work."""
    codes = (ErrorCode.INSUFFICIENT_STORAGE,)


class Unavailable(FuckBaseError):
    """STORAGE_UNAVAILABLE / SERVICE_UNAVAILABLE: the server cannot do this right now; retry."""
    codes = (ErrorCode.STORAGE_UNAVAILABLE, ErrorCode.SERVICE_UNAVAILABLE)


class TooManyRequests(FuckBaseError):
    """TOO_MANY_REQUESTS: too many failed password checks lately; wait before trying again."""
    codes = (ErrorCode.TOO_MANY_REQUESTS,)


class RequestTimeout(FuckBaseError):
    """REQUEST_TIMEOUT: the request did not reach the server whole in time."""
    codes = (ErrorCode.REQUEST_TIMEOUT,)


def _error_classes(base: type[FuckBaseError]) -> list[type[FuckBaseError]]:
    found = [base]
    for sub in base.__subclasses__():
        found.extend(_error_classes(sub))
    return found


_ERRORS: dict[str, type[FuckBaseError]] = {
    code: cls for cls in _error_classes(FuckBaseError) for code in cls.codes
}


# ------------------------------------------------------------------------------ results


class Entry(NamedTuple):
    """One `(key, value)` pair found by an index query."""

    key: str
    value: Any


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a sorted query: `items` from `offset`, and `total` matches overall."""

    items: list[Entry]
    total: int
    offset: int
    limit: int

    @property
    def has_more(self) -> bool:
        """Whether matches exist after this page."""
        return self.offset + len(self.items) < self.total

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True, slots=True)
class BackupInfo:
    """A stored backup: its `name` (for restore), UTC `timestamp`, `size` in bytes, and
    `database` ("all" for a full backup)."""

    name: str
    timestamp: str
    size: int
    database: str


# ------------------------------------------------------------------------------ the shared, I/O-free layer

_MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class _Call(Generic[T]):
    """One operation, described without doing I/O: what to send and how to read the answer."""

    path: str
    body: dict[str, Any]
    parse: Callable[[dict[str, Any]], T]
    auth: str | None = None  # the Authorization header value, for database operations
    admin: bool = False  # whether the admin credentials go along
    content: bytes | None = None  # the body already encoded, instead of `body`


@dataclass(frozen=True, slots=True)
class _DbRef:
    name: str
    auth: str | None


@dataclass(frozen=True, slots=True)
class _SetRef:
    database: str
    name: str
    auth: str | None

    def body(self, **fields: Any) -> dict[str, Any]:
        return {"database": self.database, "set": self.name, **fields}


def _basic(auth: Auth | None) -> str | None:
    if auth is None:
        return None
    user, password = auth
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def _encode(body: dict[str, Any]) -> bytes:
    # allow_nan=False: NaN/Infinity are not JSON; fail here rather than send what the server rejects
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _body_of(call: _Call[Any]) -> bytes:
    return call.content if call.content is not None else _encode(call.body)


def _headers(call: _Call[Any], admin_header: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if call.auth is not None:
        headers["Authorization"] = call.auth
    if call.admin and admin_header is not None:
        headers["X-Admin-Authorization"] = admin_header
    return headers


def _error(status: int, content: bytes) -> FuckBaseError:
    """The exception for a response that is not a success."""
    try:
        data = json.loads(content)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("code"), str):
        code: str = data["code"]
        message = data.get("message")
        text = message if isinstance(message, str) else code
        return _ERRORS.get(code, FuckBaseError)(text, code=code, status=status)
    snippet = content[:200].decode("utf-8", "replace").strip()
    return FuckBaseError(snippet or f"HTTP {status} without an error body", status=status)


def _finish(call: _Call[T], status: int, content: bytes) -> T:
    """Read a response: the parsed result of a success, else the mapped exception."""
    if status != 200:
        raise _error(status, content)
    try:
        data = json.loads(content)
    except ValueError:
        raise FuckBaseError(f"{call.path} answered with non-JSON content", status=status) from None
    if not isinstance(data, dict) or data.get("status") != "success":
        raise _error(status, content)
    try:
        return call.parse(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise FuckBaseError(f"unexpected response shape from {call.path}: {exc!r}", status=status) from exc


def _connection_error(url: str, call: _Call[Any], exc: httpx.TransportError) -> FuckBaseConnectionError:
    kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
    return FuckBaseConnectionError(f"POST {url}{call.path} {kind}: {exc!r}")


# parsers


def _nothing(data: dict[str, Any]) -> None:
    return None


def _whole(data: dict[str, Any]) -> dict[str, Any]:
    return data


def _value(data: dict[str, Any]) -> Any:
    return data["data"]


def _set_names(data: dict[str, Any]) -> list[str]:
    inner = data.get("data")
    names = inner["sets"] if isinstance(inner, dict) else data["sets"]
    return [str(n) for n in names]


def _entries(items: Any) -> list[Entry]:
    return [Entry(str(item["key"]), item["value"]) for item in items]


def _query_result(data: dict[str, Any]) -> list[Entry]:
    return _entries(data["data"]["data"])


def _page(data: dict[str, Any]) -> Page:
    return Page(_entries(data["data"]), int(data["total"]), int(data["offset"]), int(data["limit"]))


def _backup_infos(data: dict[str, Any]) -> list[BackupInfo]:
    return [
        BackupInfo(str(b["name"]), str(b["timestamp"]), int(b["size"]), str(b["database"]))
        for b in data["backups"]
    ]


# builders


def _sort_spec(sort: Sort) -> dict[str, str]:
    if isinstance(sort, str):
        return {"field": sort, "order": "asc"}
    field, order = sort
    return {"field": field, "order": order}


def _create_database(name: str, auth: Auth | None) -> _Call[None]:
    body: dict[str, Any] = {"name": name}
    if auth is not None:
        body["auth"] = {"username": auth[0], "password": auth[1]}
    return _Call("/create", body, _nothing, admin=True)


def _drop_database(db: _DbRef) -> _Call[None]:
    # the database's own credentials go along: a server without admin auth checks them
    return _Call("/drop", {"name": db.name}, _nothing, auth=db.auth, admin=True)


def _server_info() -> _Call[dict[str, Any]]:
    return _Call("/server/info", {}, _whole, admin=True)


def _create_set(db: _DbRef, name: str) -> _Call[None]:
    return _Call("/set/create", {"database": db.name, "name": name}, _nothing, auth=db.auth)


def _list_sets(db: _DbRef) -> _Call[list[str]]:
    return _Call("/set/list", {"database": db.name}, _set_names, auth=db.auth)


def _put(s: _SetRef, key: str, value: Any) -> _Call[None]:
    return _Call("/set/put", s.body(key=key, value=value), _nothing, auth=s.auth)


def _get(s: _SetRef, key: str) -> _Call[Any]:
    return _Call("/set/get", s.body(key=key), _value, auth=s.auth)


def _delete(s: _SetRef, key: str) -> _Call[None]:
    return _Call("/set/delete", s.body(key=key), _nothing, auth=s.auth)


BatchOp = tuple[str, str] | tuple[str, str, Any] | dict[str, Any]


def batch_operation(op: BatchOp) -> dict[str, Any]:
    """`("put", key, value)`, `("delete", key)` or the wire form `{"op", "key", "value"?}`."""
    if isinstance(op, dict):
        return op
    if len(op) == 3 and op[0] == "put":
        return {"op": "put", "key": op[1], "value": op[2]}
    if len(op) == 2 and op[0] == "delete":
        return {"op": "delete", "key": op[1]}
    raise ValueError(f"not a batch operation: {op!r}")


def _applied(data: dict[str, Any]) -> int:
    return int(data["data"]["applied"])


def _batch(s: _SetRef, ops: Iterable[BatchOp]) -> _Call[int]:
    return _Call("/set/batch", s.body(operations=[batch_operation(o) for o in ops]), _applied, auth=s.auth)


def _batch_encoded(s: _SetRef, operations: bytes) -> _Call[int]:
    head = _encode(s.body())[:-1]
    return _Call("/set/batch", {}, _applied, auth=s.auth, content=head + b',"operations":' + operations + b"}")


def _create_index(s: _SetRef, name: str, field: str) -> _Call[None]:
    return _Call("/index/create", s.body(name=name, field=field), _nothing, auth=s.auth)


def _create_sortable_index(
    s: _SetRef, name: str, primary_field: str, sort_fields: Sequence[str]
) -> _Call[None]:
    if isinstance(sort_fields, str):
        raise TypeError("sort_fields must be a sequence of field names, not one string")
    body = s.body(name=name, primary_field=primary_field, sort_fields=list(sort_fields))
    return _Call("/index/create/sortable", body, _nothing, auth=s.auth)


def _drop_index(s: _SetRef, name: str) -> _Call[None]:
    return _Call("/index/drop", s.body(name=name), _nothing, auth=s.auth)


def _match_text(value: QueryValue) -> Any:
    """The query value the server matches; anything else is sent as it is, for it to refuse."""
    return scalar_text(value) if isinstance(value, str | bool | int | float) else value


def _query(s: _SetRef, index: str, value: QueryValue) -> _Call[list[Entry]]:
    return _Call("/index/query", s.body(index=index, value=_match_text(value)), _query_result, auth=s.auth)


def _query_sorted(
    s: _SetRef, index: str, value: QueryValue, sort: Sort | None, offset: int, limit: int
) -> _Call[Page]:
    body = s.body(index=index, value=_match_text(value), pagination={"offset": offset, "limit": limit})
    if sort is not None:
        body["sort"] = _sort_spec(sort)
    return _Call("/index/query/sorted", body, _page, auth=s.auth)


def _query_multi_sorted(
    s: _SetRef, index: str, value: QueryValue, sort: Sequence[Sort], offset: int, limit: int
) -> _Call[Page]:
    if isinstance(sort, (str, tuple)):
        # ("f", "desc") is one sort key, not two; a list of keys is required here
        raise TypeError("sort must be a list of sort keys, e.g. [('position', 'asc'), ('hireDate', 'desc')]")
    body = s.body(
        index=index,
        value=_match_text(value),
        sort=[_sort_spec(k) for k in sort],
        pagination={"offset": offset, "limit": limit},
    )
    return _Call("/index/query/multi-sorted", body, _page, auth=s.auth)


def _next_offset(page: Page) -> int | None:
    """Where the page after `page` starts, or None when `page` was the last one."""
    if not page.items or not page.has_more:
        return None
    return page.offset + len(page.items)


def _entries_of_pages(fetch: Callable[[int], Page], page_size: int) -> Iterator[Entry]:
    """The entries of the pages `fetch(offset)` returns, one request per page, on demand."""
    if page_size < 1:  # checked now, not at the first next()
        raise ValueError("page_size must be at least 1")

    def walk() -> Iterator[Entry]:
        offset: int | None = 0
        while offset is not None:
            page = fetch(offset)
            yield from page.items
            offset = _next_offset(page)

    return walk()


def _async_entries_of_pages(fetch: Callable[[int], Awaitable[Page]], page_size: int) -> AsyncIterator[Entry]:
    """The asyncio twin of `_entries_of_pages`."""
    if page_size < 1:
        raise ValueError("page_size must be at least 1")

    async def walk() -> AsyncIterator[Entry]:
        offset: int | None = 0
        while offset is not None:
            page = await fetch(offset)
            for entry in page.items:
                yield entry
            offset = _next_offset(page)

    return walk()


def _backup_create(database: str | None) -> _Call[dict[str, Any]]:
    body = {} if database is None else {"database": database}
    return _Call("/backup/create", body, _whole, admin=True)


def _backup_list(database: str | None) -> _Call[list[BackupInfo]]:
    body = {} if database is None else {"database": database}
    return _Call("/backup/list", body, _backup_infos, admin=True)


def _backup_window(database: str | None) -> _Call[dict[str, Any] | None]:
    body = {} if database is None else {"database": database}
    return _Call("/backup/list", body, _point_in_time, admin=True)


def _point_in_time(data: dict[str, Any]) -> dict[str, Any] | None:
    window = data.get("point_in_time")
    return window if isinstance(window, dict) else None


def _backup_restore(name: str, auth: Auth | None, into: str | None) -> _Call[dict[str, Any]]:
    body = {"backup_name": name, **({"as": into} if into else {})}
    return _Call("/backup/restore", body, _whole, auth=_basic(auth), admin=True)


def _backup_restore_to(at: datetime | str, database: str | None, into: str | None,
                       auth: Auth | None) -> _Call[dict[str, Any]]:
    if isinstance(at, datetime):
        if at.tzinfo is None:
            raise ValueError("a point in time needs its time zone (e.g. datetime.now(timezone.utc))")
        at = at.isoformat()
    body: dict[str, Any] = {"at": at}
    if database:
        body["database"] = database
    if into:
        body["as"] = into
    return _Call("/backup/restore", body, _whole, auth=_basic(auth), admin=True)


def _backup_verify(name: str) -> _Call[dict[str, Any]]:
    return _Call("/backup/verify", {"backup_name": name}, _whole, admin=True)


# ------------------------------------------------------------------------------ the blocking client


class Client:
    """A blocking FuckBase client over one pooled HTTP connection set.

    `auth` is the default database credentials (sent as `Authorization: Basic …`);
    `admin_auth` goes along, as `X-Admin-Authorization: Basic …`, on the admin operations
    (create/drop database, server info, backups). `timeout` is in seconds, None for none.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        auth: Auth | None = None,
        admin_auth: Auth | None = None,
        timeout: float | None = 30.0,
    ) -> None:
        self.url = url.rstrip("/")
        self._auth = auth
        self._admin_header = _basic(admin_auth)
        self._http = httpx.Client(base_url=self.url, timeout=timeout)
        self.backups = Backups(self)
        """The backup operations (`create`, `list`, `restore`, `verify`)."""

    def _run(self, call: _Call[T]) -> T:
        try:
            resp = self._http.post(
                call.path, content=_body_of(call), headers=_headers(call, self._admin_header)
            )
        except httpx.TransportError as exc:
            raise _connection_error(self.url, call, exc) from exc
        return _finish(call, resp.status_code, resp.content)

    def _db_ref(self, name: str, auth: Auth | None) -> _DbRef:
        return _DbRef(name, _basic(auth if auth is not None else self._auth))

    def create_database(self, name: str, auth: Auth | None = None) -> Database:
        """Create database `name`, protected by `auth` if given; returns its handle."""
        self._run(_create_database(name, auth))
        return Database(self, self._db_ref(name, auth))

    def database(self, name: str, auth: Auth | None = None) -> Database:
        """A handle on an existing database (no request); `auth` overrides the client's."""
        return Database(self, self._db_ref(name, auth))

    def drop_database(self, name: str, auth: Auth | None = None) -> None:
        """Delete database `name` with all its sets and indexes."""
        self._run(_drop_database(self._db_ref(name, auth)))

    def server_info(self) -> dict[str, Any]:
        """The server's version, uptime, database count and other facts."""
        return self._run(_server_info())

    def close(self) -> None:
        """Close the pooled connections."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.url!r})"


class Database:
    """A handle on one database; get it from `Client.database` or `Client.create_database`."""

    def __init__(self, client: Client, ref: _DbRef) -> None:
        self._client = client
        self._ref = ref

    @property
    def name(self) -> str:
        """The database's name."""
        return self._ref.name

    def create_set(self, name: str) -> Set:
        """Create set `name` (SetExists if it exists); returns its handle."""
        self._client._run(_create_set(self._ref, name))
        return self.set(name)

    def set(self, name: str) -> Set:
        """A handle on set `name` (no request; `put` creates the set if missing)."""
        return Set(self._client, _SetRef(self._ref.name, name, self._ref.auth))

    def sets(self) -> builtins.list[str]:
        """The names of the database's sets."""
        return self._client._run(_list_sets(self._ref))

    def drop(self) -> None:
        """Delete this database (same as `Client.drop_database`)."""
        self._client._run(_drop_database(self._ref))

    def __repr__(self) -> str:
        return f"Database({self.name!r})"


class Set:
    """A handle on one set of a database: its data, indexes and queries."""

    def __init__(self, client: Client, ref: _SetRef) -> None:
        self._client = client
        self._ref = ref

    @property
    def name(self) -> str:
        """The set's name."""
        return self._ref.name

    @property
    def database(self) -> str:
        """The name of the set's database."""
        return self._ref.database

    def put(self, key: str, value: Any) -> None:
        """Store `value` (any JSON) under `key`, replacing what was there."""
        self._client._run(_put(self._ref, key, value))

    @overload
    def get(self, key: str) -> Any: ...
    @overload
    def get(self, key: str, default: D) -> Any | D: ...
    def get(self, key: str, default: Any = _MISSING) -> Any:
        """The value under `key`; KeyNotFound if absent, unless a `default` is passed."""
        try:
            return self._client._run(_get(self._ref, key))
        except KeyNotFound:
            if default is _MISSING:
                raise
            return default

    def delete(self, key: str) -> None:
        """Remove `key` (KeyNotFound if absent)."""
        self._client._run(_delete(self._ref, key))

    def batch(self, ops: Iterable[BatchOp]) -> int:
        """Apply puts and deletes (`("put", key, value)`, `("delete", key)`) in one transaction,
        all or none: a bad operation raises InvalidRequest, a missing key KeyNotFound, and
        nothing is applied. Returns how many were applied."""
        return self._client._run(_batch(self._ref, ops))

    def batch_encoded(self, operations: bytes) -> int:
        """`batch` for bulk loaders that hold the operations as a JSON array already."""
        return self._client._run(_batch_encoded(self._ref, operations))

    def create_index(self, name: str, field: str) -> None:
        """Index the set's values by `field` for `query`."""
        self._client._run(_create_index(self._ref, name, field))

    def create_sortable_index(self, name: str, primary_field: str, sort_fields: Sequence[str]) -> None:
        """Index by `primary_field`, sortable by any of `sort_fields`, for the sorted queries."""
        self._client._run(_create_sortable_index(self._ref, name, primary_field, sort_fields))

    def drop_index(self, name: str) -> None:
        """Delete index `name`."""
        self._client._run(_drop_index(self._ref, name))

    def query(self, index: str, value: QueryValue) -> builtins.list[Entry]:
        """All entries whose indexed field equals `value`."""
        return self._client._run(_query(self._ref, index, value))

    def query_sorted(
        self, index: str, value: QueryValue, sort: Sort | None = None, offset: int = 0, limit: int = 10
    ) -> Page:
        """One page of matches of a sortable index, ordered by one sort field
        (`None`: the index's first sort field, ascending)."""
        return self._client._run(_query_sorted(self._ref, index, value, sort, offset, limit))

    def query_multi_sorted(
        self, index: str, value: QueryValue, sort: Sequence[Sort], offset: int = 0, limit: int = 10
    ) -> Page:
        """One page of matches of a sortable index, ordered by several sort fields in turn."""
        return self._client._run(_query_multi_sorted(self._ref, index, value, sort, offset, limit))

    def iter_sorted(
        self, index: str, value: QueryValue, sort: Sort | None = None, page_size: int = 100
    ) -> Iterator[Entry]:
        """Every match of `query_sorted`, fetched lazily page by page.

        Pages are separate requests: writes in between may shift entries across pages."""
        return _entries_of_pages(
            lambda offset: self.query_sorted(index, value, sort, offset, page_size), page_size
        )

    def iter_multi_sorted(
        self, index: str, value: QueryValue, sort: Sequence[Sort], page_size: int = 100
    ) -> Iterator[Entry]:
        """Every match of `query_multi_sorted`, fetched lazily page by page."""
        return _entries_of_pages(
            lambda offset: self.query_multi_sorted(index, value, sort, offset, page_size), page_size
        )

    def __repr__(self) -> str:
        return f"Set({self.database!r}, {self.name!r})"


class Backups:
    """Backup operations of a `Client` (admin operations)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def create(self, database: str | None = None) -> dict[str, Any]:
        """Back up `database`, or all databases when None; the server's answer
        (`message`, and on this server `backup_name`, `size`, `entries`)."""
        return self._client._run(_backup_create(database))

    def list(self, database: str | None = None) -> builtins.list[BackupInfo]:
        """The stored backups (of `database`, or all), newest first."""
        return self._client._run(_backup_list(database))

    def restore(self, name: str, auth: Auth | None = None, into: str | None = None) -> dict[str, Any]:
        """Replace the data with backup `name` (a database's, or all for a full backup).
        With no admin configured on the server, replacing a protected database needs its
        credentials: `auth`. `into` restores a database backup under that new name instead."""
        return self._client._run(_backup_restore(name, auth, into))

    def restore_to(self, at: datetime | str, database: str | None = None, into: str | None = None,
                   auth: Auth | None = None) -> dict[str, Any]:
        """[ext] Restore every database (or `database`, optionally `into` a new name) as it was
        at the instant `at`, from the server's continuous backup."""
        return self._client._run(_backup_restore_to(at, database, into, auth))

    def window(self, database: str | None = None) -> dict[str, Any] | None:
        """[ext] What the continuous backup can restore: `earliest`, `latest`, `ranges`,
        `snapshots`, and per database (or only `database`) its own range under `databases`;
        None without a continuous backup."""
        return self._client._run(_backup_window(database))

    def verify(self, name: str) -> dict[str, Any]:
        """Check that backup `name` exists and is valid, without restoring it."""
        return self._client._run(_backup_verify(name))


# ------------------------------------------------------------------------------ the asyncio client


class AsyncClient:
    """The asyncio twin of `Client`: same arguments, same methods, awaited."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        auth: Auth | None = None,
        admin_auth: Auth | None = None,
        timeout: float | None = 30.0,
    ) -> None:
        self.url = url.rstrip("/")
        self._auth = auth
        self._admin_header = _basic(admin_auth)
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout)
        self.backups = AsyncBackups(self)
        """The backup operations (`create`, `list`, `restore`, `verify`)."""

    async def _run(self, call: _Call[T]) -> T:
        try:
            resp = await self._http.post(
                call.path, content=_body_of(call), headers=_headers(call, self._admin_header)
            )
        except httpx.TransportError as exc:
            raise _connection_error(self.url, call, exc) from exc
        return _finish(call, resp.status_code, resp.content)

    def _db_ref(self, name: str, auth: Auth | None) -> _DbRef:
        return _DbRef(name, _basic(auth if auth is not None else self._auth))

    async def create_database(self, name: str, auth: Auth | None = None) -> AsyncDatabase:
        """Create database `name`, protected by `auth` if given; returns its handle."""
        await self._run(_create_database(name, auth))
        return AsyncDatabase(self, self._db_ref(name, auth))

    def database(self, name: str, auth: Auth | None = None) -> AsyncDatabase:
        """A handle on an existing database (no request); `auth` overrides the client's."""
        return AsyncDatabase(self, self._db_ref(name, auth))

    async def drop_database(self, name: str, auth: Auth | None = None) -> None:
        """Delete database `name` with all its sets and indexes."""
        await self._run(_drop_database(self._db_ref(name, auth)))

    async def server_info(self) -> dict[str, Any]:
        """The server's version, uptime, database count and other facts."""
        return await self._run(_server_info())

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncClient({self.url!r})"


class AsyncDatabase:
    """The asyncio twin of `Database`."""

    def __init__(self, client: AsyncClient, ref: _DbRef) -> None:
        self._client = client
        self._ref = ref

    @property
    def name(self) -> str:
        """The database's name."""
        return self._ref.name

    async def create_set(self, name: str) -> AsyncSet:
        """Create set `name` (SetExists if it exists); returns its handle."""
        await self._client._run(_create_set(self._ref, name))
        return self.set(name)

    def set(self, name: str) -> AsyncSet:
        """A handle on set `name` (no request; `put` creates the set if missing)."""
        return AsyncSet(self._client, _SetRef(self._ref.name, name, self._ref.auth))

    async def sets(self) -> builtins.list[str]:
        """The names of the database's sets."""
        return await self._client._run(_list_sets(self._ref))

    async def drop(self) -> None:
        """Delete this database (same as `AsyncClient.drop_database`)."""
        await self._client._run(_drop_database(self._ref))

    def __repr__(self) -> str:
        return f"AsyncDatabase({self.name!r})"


class AsyncSet:
    """The asyncio twin of `Set`."""

    def __init__(self, client: AsyncClient, ref: _SetRef) -> None:
        self._client = client
        self._ref = ref

    @property
    def name(self) -> str:
        """The set's name."""
        return self._ref.name

    @property
    def database(self) -> str:
        """The name of the set's database."""
        return self._ref.database

    async def put(self, key: str, value: Any) -> None:
        """Store `value` (any JSON) under `key`, replacing what was there."""
        await self._client._run(_put(self._ref, key, value))

    @overload
    async def get(self, key: str) -> Any: ...
    @overload
    async def get(self, key: str, default: D) -> Any | D: ...
    async def get(self, key: str, default: Any = _MISSING) -> Any:
        """The value under `key`; KeyNotFound if absent, unless a `default` is passed."""
        try:
            return await self._client._run(_get(self._ref, key))
        except KeyNotFound:
            if default is _MISSING:
                raise
            return default

    async def delete(self, key: str) -> None:
        """Remove `key` (KeyNotFound if absent)."""
        await self._client._run(_delete(self._ref, key))

    async def batch(self, ops: Iterable[BatchOp]) -> int:
        """Apply puts and deletes in one transaction, all or none (see `Set.batch`)."""
        return await self._client._run(_batch(self._ref, ops))

    async def create_index(self, name: str, field: str) -> None:
        """Index the set's values by `field` for `query`."""
        await self._client._run(_create_index(self._ref, name, field))

    async def create_sortable_index(self, name: str, primary_field: str, sort_fields: Sequence[str]) -> None:
        """Index by `primary_field`, sortable by any of `sort_fields`, for the sorted queries."""
        await self._client._run(_create_sortable_index(self._ref, name, primary_field, sort_fields))

    async def drop_index(self, name: str) -> None:
        """Delete index `name`."""
        await self._client._run(_drop_index(self._ref, name))

    async def query(self, index: str, value: QueryValue) -> builtins.list[Entry]:
        """All entries whose indexed field equals `value`."""
        return await self._client._run(_query(self._ref, index, value))

    async def query_sorted(
        self, index: str, value: QueryValue, sort: Sort | None = None, offset: int = 0, limit: int = 10
    ) -> Page:
        """One page of matches of a sortable index, ordered by one sort field
        (`None`: the index's first sort field, ascending)."""
        return await self._client._run(_query_sorted(self._ref, index, value, sort, offset, limit))

    async def query_multi_sorted(
        self, index: str, value: QueryValue, sort: Sequence[Sort], offset: int = 0, limit: int = 10
    ) -> Page:
        """One page of matches of a sortable index, ordered by several sort fields in turn."""
        return await self._client._run(_query_multi_sorted(self._ref, index, value, sort, offset, limit))

    def iter_sorted(
        self, index: str, value: QueryValue, sort: Sort | None = None, page_size: int = 100
    ) -> AsyncIterator[Entry]:
        """Every match of `query_sorted`, fetched lazily page by page (`async for`)."""
        return _async_entries_of_pages(
            lambda offset: self.query_sorted(index, value, sort, offset, page_size), page_size
        )

    def iter_multi_sorted(
        self, index: str, value: QueryValue, sort: Sequence[Sort], page_size: int = 100
    ) -> AsyncIterator[Entry]:
        """Every match of `query_multi_sorted`, fetched lazily page by page (`async for`)."""
        return _async_entries_of_pages(
            lambda offset: self.query_multi_sorted(index, value, sort, offset, page_size), page_size
        )

    def __repr__(self) -> str:
        return f"AsyncSet({self.database!r}, {self.name!r})"


class AsyncBackups:
    """Backup operations of an `AsyncClient` (admin operations)."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def create(self, database: str | None = None) -> dict[str, Any]:
        """Back up `database`, or all databases when None; the server's answer."""
        return await self._client._run(_backup_create(database))

    async def list(self, database: str | None = None) -> builtins.list[BackupInfo]:
        """The stored backups (of `database`, or all), newest first."""
        return await self._client._run(_backup_list(database))

    async def restore(self, name: str, auth: Auth | None = None, into: str | None = None) -> dict[str, Any]:
        """Replace the data with backup `name` (a database's, or all for a full backup).
        With no admin configured on the server, replacing a protected database needs its
        credentials: `auth`. `into` restores a database backup under that new name instead."""
        return await self._client._run(_backup_restore(name, auth, into))

    async def restore_to(self, at: datetime | str, database: str | None = None, into: str | None = None,
                   auth: Auth | None = None) -> dict[str, Any]:
        """[ext] Restore every database (or `database`, optionally `into` a new name) as it was
        at the instant `at`, from the server's continuous backup."""
        return await self._client._run(_backup_restore_to(at, database, into, auth))

    async def window(self, database: str | None = None) -> dict[str, Any] | None:
        """[ext] What the continuous backup can restore: `earliest`, `latest`, `ranges`,
        `snapshots`, and per database (or only `database`) its own range under `databases`;
        None without a continuous backup."""
        return await self._client._run(_backup_window(database))

    async def verify(self, name: str) -> dict[str, Any]:
        """Check that backup `name` exists and is valid, without restoring it."""
        return await self._client._run(_backup_verify(name))
