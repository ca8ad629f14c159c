"""The machine-readable form of the API contract, served at GET /openapi.json."""

from __future__ import annotations

from typing import Any

from fuckbase import __version__

_STR = {"type": "string"}
_CREDS = {
    "type": "object",
    "properties": {"username": _STR, "password": _STR},
    "required": ["username", "password"],
}
_SORT = {
    "type": "object",
    "properties": {"field": _STR, "order": {"type": "string", "enum": ["asc", "desc"]}},
    "required": ["field"],
}
_PAGE = {
    "type": "object",
    "properties": {
        "offset": {"type": "integer", "minimum": 0},
        "limit": {"type": "integer", "minimum": 0},
    },
}
_ANY: dict[str, Any] = {}

# path -> (summary, {field: schema}, required fields)
ENDPOINTS: dict[str, tuple[str, dict[str, Any], list[str]]] = {
    "/create": ("Create a database", {"name": _STR, "auth": _CREDS}, ["name"]),
    "/drop": ("Drop a database", {"name": _STR}, ["name"]),
    "/server/info": ("Server version, uptime, database count", {}, []),
    "/set/create": ("Create a set", {"database": _STR, "name": _STR}, ["database", "name"]),
    "/set/list": ("List the sets of a database", {"database": _STR}, ["database"]),
    "/set/put": (
        "Store a value (creates the set if needed)",
        {"database": _STR, "set": _STR, "key": _STR, "value": _ANY},
        ["database", "set", "key", "value"],
    ),
    "/set/get": (
        "Read a value",
        {"database": _STR, "set": _STR, "key": _STR},
        ["database", "set", "key"],
    ),
    "/set/delete": (
        "Delete a value",
        {"database": _STR, "set": _STR, "key": _STR},
        ["database", "set", "key"],
    ),
    "/set/batch": (
        "Apply puts and deletes in one transaction, all or none [ext]",
        {
            "database": _STR,
            "set": _STR,
            "operations": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"op": {"type": "string", "enum": ["put", "delete"]}, "key": _STR, "value": _ANY},
                    "required": ["op", "key"],
                },
            },
        },
        ["database", "set", "operations"],
    ),
    "/index/create": (
        "Create a basic index on a field",
        {"database": _STR, "set": _STR, "name": _STR, "field": _STR},
        ["database", "set", "name", "field"],
    ),
    "/index/create/sortable": (
        "Create a sortable index",
        {
            "database": _STR,
            "set": _STR,
            "name": _STR,
            "primary_field": _STR,
            "sort_fields": {"type": "array", "items": _STR, "minItems": 1},
        },
        ["database", "set", "name", "primary_field", "sort_fields"],
    ),
    "/index/drop": (
        "Drop an index",
        {"database": _STR, "set": _STR, "name": _STR},
        ["database", "set", "name"],
    ),
    "/index/query": (
        "Find entries whose field equals a value",
        {"database": _STR, "set": _STR, "index": _STR, "value": _ANY},
        ["database", "set", "index", "value"],
    ),
    "/index/query/sorted": (
        "Find entries, sorted by one field, one page",
        {
            "database": _STR,
            "set": _STR,
            "index": _STR,
            "value": _ANY,
            "sort": _SORT,
            "pagination": _PAGE,
        },
        ["database", "set", "index", "value"],
    ),
    "/index/query/multi-sorted": (
        "Find entries, sorted by several fields, one page",
        {
            "database": _STR,
            "set": _STR,
            "index": _STR,
            "value": _ANY,
            "sort": {"type": "array", "items": _SORT, "minItems": 1},
            "pagination": _PAGE,
        },
        ["database", "set", "index", "value", "sort"],
    ),
    "/backup/create": ("Back up one database, or all", {"database": _STR}, []),
    "/backup/list": ("List backups, newest first", {"database": _STR}, []),
    "/backup/restore": ("Restore a backup atomically", {"backup_name": _STR}, ["backup_name"]),
    "/backup/verify": ("Check a backup fully without applying it", {"backup_name": _STR}, ["backup_name"]),
}

_ERROR = {
    "type": "object",
    "properties": {"status": {"const": "error"}, "code": _STR, "message": _STR},
    "required": ["status", "code", "message"],
}


def spec() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for path, (summary, fields, required) in ENDPOINTS.items():
        paths[path] = {
            "post": {
                "summary": summary,
                "requestBody": {
                    "required": bool(required),
                    "content": {
                        "application/json": {
                            "schema": {"type": "object", "properties": fields, "required": required}
                        }
                    },
                },
                "responses": {
                    "200": {"description": "success: {\"status\": \"success\", …}"},
                    "default": {
                        "description": "error envelope",
                        "content": {"application/json": {"schema": _ERROR}},
                    },
                },
            }
        }
    for path, summary in (
        ("/health", "Liveness"),
        ("/metrics", "Prometheus metrics"),
        ("/openapi.json", "This document"),
    ):
        paths[path] = {"get": {"summary": summary, "responses": {"200": {"description": "OK"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "FuckBase", "version": __version__},
        "components": {
            "securitySchemes": {
                "database": {"type": "http", "scheme": "basic"},
                "admin": {"type": "apiKey", "in": "header", "name": "X-Admin-Authorization"},
            }
        },
        "paths": paths,
    }
