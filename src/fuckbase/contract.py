"""The wire contract in one place: error codes and the table of endpoints.

The server's routes and request validation, the OpenAPI document and the client's error
map are all derived from what is declared here, so they cannot drift apart. This module
needs nothing but the standard library: the client imports it without the server's
dependencies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal


class ErrorCode(StrEnum):
    """Every `code` an error envelope can carry (API.md's table; [ext] marks our additions)."""

    INVALID_REQUEST = "INVALID_REQUEST"
    AUTH_FAILED = "AUTH_FAILED"
    ADMIN_AUTH_REQUIRED = "ADMIN_AUTH_REQUIRED"
    DB_NOT_FOUND = "DB_NOT_FOUND"
    SET_NOT_FOUND = "SET_NOT_FOUND"
    INDEX_NOT_FOUND = "INDEX_NOT_FOUND"
    KEY_NOT_FOUND = "KEY_NOT_FOUND"
    DB_ALREADY_EXISTS = "DB_ALREADY_EXISTS"
    SET_ALREADY_EXISTS = "SET_ALREADY_EXISTS"  # [ext]
    INDEX_ALREADY_EXISTS = "INDEX_ALREADY_EXISTS"  # [ext]
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"  # [ext]
    S3_NOT_ENABLED = "S3_NOT_ENABLED"
    BACKUP_FAILED = "BACKUP_FAILED"
    RESTORE_FAILED = "RESTORE_FAILED"
    LIST_FAILED = "LIST_FAILED"
    BACKUP_NOT_FOUND = "BACKUP_NOT_FOUND"  # [ext]
    BACKUP_INVALID = "BACKUP_INVALID"  # [ext]
    BACKUP_ENCRYPTED = "BACKUP_ENCRYPTED"  # [ext] encrypted under a key this server was not given
    INTERNAL_ERROR = "INTERNAL_ERROR"
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    NOT_FOUND = "NOT_FOUND"  # [ext] no such path
    TOO_MANY_REQUESTS = "TOO_MANY_REQUESTS"  # [ext] too many failed password checks
    INSUFFICIENT_STORAGE = "INSUFFICIENT_STORAGE"  # [ext] the disk is full
    STORAGE_UNAVAILABLE = "STORAGE_UNAVAILABLE"  # [ext]
    SERVICE_UNAVAILABLE = "SERVICE_UNAVAILABLE"  # [ext] long operations restarting
    REQUEST_TIMEOUT = "REQUEST_TIMEOUT"  # [ext] the body did not arrive in time
    URI_TOO_LONG = "URI_TOO_LONG"  # [ext]
    HEADERS_TOO_LARGE = "HEADERS_TOO_LARGE"  # [ext]


ORIGINAL_ONLY = frozenset({ErrorCode.S3_NOT_ENABLED})
"""Codes only the original sends (it can run without a backup target; we always have one).
Clients still map them: they talk to both servers."""


# ------------------------------------------------------------------------------ field kinds

DB_NAME_PATTERN = r"^[A-Za-z0-9_.\-]{1,64}$"
RESERVED_DB_NAMES = frozenset({"full", ".", ".."})  # "full" names the full-backup folder
OBJECT_NAME_PATTERN = r"^[^\x00-\x1f\x7f]{1,256}$"
INSTANT_PATTERN = r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,6})?([Zz]|[+-]\d{2}:\d{2})$"
# a backup's folder: any database name the original accepted, not "." or ".." (a backup of
# one outside our names is restored with "as")
_BACKUP_FOLDER = r"(?!\.\.?(?:/|$))[^/\x00-\x1f\x7f]{1,256}"
BACKUP_FOLDER_PATTERN = rf"^{_BACKUP_FOLDER}$"
BACKUP_NAME_PATTERN = rf"^backups/({_BACKUP_FOLDER})/(\d{{8}}-\d{{6}})(?:_(\d+))?(\.json(?:\.gz|\.zst)?)$"
MAX_SORT_FIELDS = 32
MAX_KEY_BYTES = 1024
MAX_NAME_CHARS = 256
MAX_INT = 2**63 - 1

JsonType = Literal["string", "integer", "object", "array", "any"]
_PYTHON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "object": (dict,),
    "array": (list,),
}
_WORDS = {"string": "a string", "integer": "an integer", "object": "an object", "array": "a list"}


@dataclass(frozen=True)
class Kind:
    """What a field holds: its JSON type, its JSON Schema (published in OpenAPI), and for
    objects and lists the kinds inside them (checked by the same validator)."""

    type: JsonType
    schema: dict[str, Any] = field(default_factory=dict)
    fields: tuple[Field, ...] = ()  # of an object
    items: Kind | None = None  # of a list; None: the handler checks each item itself
    blank_is_missing: bool = False  # a name: "" is no name at all

    def json_schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.type == "any" else {"type": self.type}
        if self.fields:
            out["properties"] = {f.name: f.kind.json_schema() for f in self.fields}
            required = [f.name for f in self.fields if f.required]
            if required:
                out["required"] = required
        if self.items is not None:
            out["items"] = self.items.json_schema()
        out.update(self.schema)
        return out


@dataclass(frozen=True)
class Field:
    name: str
    kind: Kind
    required: bool = False
    description: str = ""


STRING = Kind("string")
DATABASE_NAME = Kind("string", {
    "pattern": DB_NAME_PATTERN, "not": {"enum": sorted(RESERVED_DB_NAMES)},
    "description": '1-64 of A-Z a-z 0-9 _ - ., not "." or "..", and not "full" (it names the full-backup folder)',
}, blank_is_missing=True)
OBJECT_NAME = Kind("string", {
    "pattern": OBJECT_NAME_PATTERN, "minLength": 1, "maxLength": MAX_NAME_CHARS,
    "description": f"1-{MAX_NAME_CHARS} characters, no control characters",
}, blank_is_missing=True)
KEY = Kind("string", {"minLength": 1, "maxLength": MAX_KEY_BYTES, "description": f"1-{MAX_KEY_BYTES} bytes of UTF-8"},
           blank_is_missing=True)
ANY_JSON = Kind("any", {"description": "any JSON value, nested at most 254 levels deep"})
MATCH_VALUE = Kind("string", {"description": "matched against the indexed field's value written as text"})
CREDENTIALS = Kind("object", fields=(  # either may be left out, as the original reads them: see body_credentials
    Field("username", STRING), Field("password", STRING),
))
NEW_CREDENTIALS = Kind("object", fields=(
    Field("username", Kind("string", {"minLength": 1}), required=True),
    Field("password", Kind("string", {"minLength": 1}), required=True),
))
SORT = Kind("object", fields=(
    Field("field", Kind("string", {"minLength": 1}), required=True),
    Field("order", Kind("string", {"pattern": "^([Aa][Ss][Cc]|[Dd][Ee][Ss][Cc])$", "default": "asc"})),
))
PAGINATION = Kind("object", fields=(
    Field("offset", Kind("integer", {"minimum": 0, "maximum": MAX_INT, "default": 0})),
    Field("limit", Kind("integer", {"minimum": 0, "maximum": MAX_INT, "default": 10,
                                    "description": "0 means the default, 10"})),
))
SORT_FIELDS = Kind("array", {"minItems": 1, "maxItems": MAX_SORT_FIELDS, "uniqueItems": True},
                   items=Kind("string", {"pattern": OBJECT_NAME_PATTERN, "minLength": 1, "maxLength": MAX_NAME_CHARS}))
OPERATION = Kind("object", {"if": {"properties": {"op": {"const": "put"}}}, "then": {"required": ["value"]}}, fields=(
    Field("op", Kind("string", {"enum": ["put", "delete"]}), required=True),
    Field("key", KEY, required=True),
    Field("value", ANY_JSON, description="required for a put"),
))
OPERATIONS = Kind("array", {"items": OPERATION.json_schema()})  # items checked by the handler, by index
BACKUP_NAME = Kind("string", {"pattern": BACKUP_NAME_PATTERN}, blank_is_missing=True)
BACKUP_FOLDER = Kind("string", {"pattern": BACKUP_FOLDER_PATTERN, "description": "a database name as backups"
                                " name it: ours, or any the original took (no slash or control character)"},
                     blank_is_missing=True)
INSTANT = Kind("string", {"pattern": INSTANT_PATTERN, "description": "RFC 3339, e.g. 2026-12-01T14:00:00Z"},
               blank_is_missing=True)

AUTH = Field("auth", CREDENTIALS, description="the database's credentials (or an Authorization: Basic header)")
ADMIN_AUTH = Field("admin_auth", CREDENTIALS, description="admin credentials (or an X-Admin-Authorization header)")


# ------------------------------------------------------------------------------ responses

def _success(**properties: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"status": {"const": "success"}, "message": {"type": "string"}, **properties},
        "required": ["status", *properties],
    }


def _data(**properties: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties)}


_STR = {"type": "string"}
_INT = {"type": "integer"}
_ENTRY = {"type": "object", "properties": {"key": _STR, "value": {}}, "required": ["key", "value"]}
_ENTRIES = {"type": "array", "items": _ENTRY}
_PAGE = _success(count=_INT, total=_INT, offset=_INT, limit=_INT, data=_ENTRIES)
_BACKUP = {
    "type": "object",
    "properties": {"name": _STR, "timestamp": _STR, "size": _INT, "database": _STR},
    "required": ["name", "timestamp", "size", "database"],
}


# ------------------------------------------------------------------------------ the table

AuthKind = Literal["none", "admin", "database", "admin or database"]


@dataclass(frozen=True)
class Endpoint:
    """One POST operation. `long`: may run for seconds (a build, an upload, password hashing)
    and is served apart from short requests; `writes`: commits data, so durability "fsync"
    waits for a flush before answering."""

    path: str
    summary: str
    handler: str
    fields: tuple[Field, ...]
    auth: AuthKind
    response: dict[str, Any]
    long: bool = False
    writes: bool = False
    body_rule: Mapping[str, Any] = field(default_factory=dict)  # JSON Schema over the whole body

    def request_fields(self) -> tuple[Field, ...]:
        """The declared fields and the credential fields its auth kind accepts."""
        extra = []
        if "admin" in self.auth:
            extra.append(ADMIN_AUTH)
        if "database" in self.auth and all(f.name != "auth" for f in self.fields):
            extra.append(AUTH)
        return (*self.fields, *extra)


_DB = Field("database", DATABASE_NAME, required=True)
_SET = Field("set", OBJECT_NAME, required=True)
_KEY = Field("key", KEY, required=True)
_INDEX = Field("index", OBJECT_NAME, required=True)
_OK = _success()

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("/create", "Create a database", "create_database",
             (Field("name", DATABASE_NAME, required=True),
              Field("auth", NEW_CREDENTIALS, description="credentials the new database will require")),
             "admin", _success(data=_data(database=_STR)), long=True, writes=True),
    Endpoint("/drop", "Drop a database", "drop_database", (Field("name", DATABASE_NAME, required=True),),
             "admin or database", _OK, writes=True),
    Endpoint("/server/info", "Server version, uptime, database count", "server_info", (),
             "admin", _success(version=_STR, uptime=_STR, databases_count=_INT)),
    Endpoint("/set/create", "Create a set", "create_set", (_DB, Field("name", OBJECT_NAME, required=True)),
             "database", _success(data=_data(set=_STR)), writes=True),
    Endpoint("/set/list", "List the sets of a database", "list_sets", (_DB,),
             "database", _success(data=_data(sets={"type": "array", "items": _STR}))),
    Endpoint("/set/put", "Store a value (creates the set if needed)", "put",
             (_DB, _SET, _KEY, Field("value", ANY_JSON, required=True)), "database", _OK, writes=True),
    Endpoint("/set/get", "Read a value", "get", (_DB, _SET, _KEY), "database", _success(data={})),
    Endpoint("/set/delete", "Delete a value", "delete", (_DB, _SET, _KEY), "database", _OK, writes=True),
    Endpoint("/set/batch", "Apply puts and deletes in one transaction, all or none [ext]", "batch",
             (_DB, _SET, Field("operations", OPERATIONS, required=True)),
             "database", _success(data=_data(applied=_INT)), writes=True),
    Endpoint("/index/create", "Create a basic index on a field", "create_index",
             (_DB, _SET, Field("name", OBJECT_NAME, required=True), Field("field", OBJECT_NAME, required=True)),
             "database", _success(data=_data(index=_STR)), long=True, writes=True),
    Endpoint("/index/create/sortable", "Create a sortable index", "create_sortable_index",
             (_DB, _SET, Field("name", OBJECT_NAME, required=True), Field("primary_field", OBJECT_NAME, required=True),
              Field("sort_fields", SORT_FIELDS, required=True)),
             "database", _success(data=_data(index=_STR)), long=True, writes=True),
    Endpoint("/index/drop", "Drop an index", "drop_index", (_DB, _SET, Field("name", OBJECT_NAME, required=True)),
             "database", _OK, writes=True),
    Endpoint("/index/query", "Find entries whose field equals a value", "query",
             (_DB, _SET, _INDEX, Field("value", MATCH_VALUE, required=True)),
             "database", _success(data=_data(count=_INT, data=_ENTRIES))),
    Endpoint("/index/query/sorted", "Find entries, sorted by one field, one page", "query_sorted",
             (_DB, _SET, _INDEX, Field("value", MATCH_VALUE, required=True),
              Field("sort", SORT, description="default: the index's first sort field, ascending"),
              Field("pagination", PAGINATION)),
             "database", _PAGE),
    Endpoint("/index/query/multi-sorted", "Find entries, sorted by several fields, one page", "query_multi_sorted",
             (_DB, _SET, _INDEX, Field("value", MATCH_VALUE, required=True),
              Field("sort", Kind("array", {"minItems": 1}, items=SORT), required=True),
              Field("pagination", PAGINATION)),
             "database", _PAGE),
    Endpoint("/backup/create", "Back up one database, or all", "backup_create",
             (Field("database", DATABASE_NAME, description="absent, null or empty: all databases"),),
             "admin", _success(backup_name=_STR, size=_INT, entries=_INT, target=_STR), long=True),
    Endpoint("/backup/list", "List backups, newest first", "backup_list",
             (Field("database", BACKUP_FOLDER, description="absent, null or empty: all databases"),),
             "admin", _success(backups={"type": "array", "items": _BACKUP}), long=True),
    Endpoint("/backup/restore", "Restore a backup, or the state at an instant, atomically", "backup_restore",
             (Field("backup_name", BACKUP_NAME, description="the backup to restore; or give \"at\""),
              Field("at", INSTANT, description="[ext] restore the state as of this instant, from the continuous backup"),
              Field("database", DATABASE_NAME, description="[ext] with \"at\": this database only; absent: all"),
              Field("as", DATABASE_NAME, description="[ext] restore one database into this new name instead")),
             "admin or database", {**_success(databases={"type": "array", "items": _STR}),
                                   "properties": {**_success()["properties"], "backup_name": _STR, "at": _STR,
                                                  "databases": {"type": "array", "items": _STR}}},
             long=True, writes=True,
             body_rule={"oneOf": [{"required": ["backup_name"]}, {"required": ["at"]}]}),
    Endpoint("/backup/verify", "Check a backup fully without applying it", "backup_verify",
             (Field("backup_name", BACKUP_NAME, required=True),),
             "admin", _success(backup_name=_STR, checksum=_STR), long=True),
)
BY_PATH = {e.path: e for e in ENDPOINTS}
GET_PATHS = {"/health": "Liveness", "/metrics": "Prometheus metrics", "/openapi.json": "This document"}


def scalar_text(v: str | bool | int | float) -> str:
    """A string, boolean or number as the text an index matches: numbers in shortest form."""
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if v.is_integer() and abs(v) < 1e21:
        return str(int(v))
    return repr(v)


# ------------------------------------------------------------------------------ validation

class InvalidField(ValueError):
    """A field is missing or of the wrong JSON type; the message names it."""

    def __init__(self, label: str, problem: str) -> None:
        super().__init__(f'"{label}" {problem}')
        self.label = label
        self.problem = problem


Check = Callable[[Any], None]


def validator(fields: tuple[Field, ...]) -> Check:
    """A function that checks an object's declared fields for presence and JSON type.

    Undeclared fields are ignored, as the original does. An optional field given as null
    counts as absent; a required one given as null (or, for names, as "") counts as missing:
    the original reads both as its zero value. A required field of any JSON type may be null.
    Lengths and patterns are the handlers' to check, with messages that say the rule.
    """
    checks = [(f.name, f.required, f.kind.type == "any", f.kind.blank_is_missing, _PYTHON_TYPES.get(f.kind.type, ()),
               _WORDS.get(f.kind.type, ""), _inner(f.kind)) for f in fields]

    def check(obj: Any) -> None:
        for name, required, nullable, blank_missing, types, word, inner in checks:
            value = obj.get(name)
            if value is None or (blank_missing and value == ""):
                if required and (not nullable or name not in obj):
                    raise InvalidField(name, "is required")
                continue
            if types and (type(value) not in types):
                raise InvalidField(name, f"must be {word}")
            if inner is not None:
                _within(name, inner, value)

    return check


def _within(prefix: str, check: Check, value: Any) -> None:
    """Runs a nested check; the label of what fails gets the prefix of where it sits."""
    try:
        check(value)
    except InvalidField as exc:
        raise InvalidField(prefix + exc.label, exc.problem) from None


def _inner(kind: Kind) -> Check | None:
    """The check of what an object or list holds; labels come back relative (".x", "[2]")."""
    if kind.fields:
        fields = validator(kind.fields)

        def check_object(value: Any) -> None:
            _within(".", fields, value)

        return check_object
    if kind.items is not None:
        item = kind.items
        types, word, inner = _PYTHON_TYPES.get(item.type, ()), _WORDS.get(item.type, ""), _inner(item)

        def check_items(values: Any) -> None:
            for i, value in enumerate(values):
                if types and type(value) not in types:
                    raise InvalidField(f"[{i}]", f"must be {word}")
                if inner is not None:
                    _within(f"[{i}]", inner, value)

        return check_items
    return None
