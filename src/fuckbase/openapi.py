"""The machine-readable form of the API contract, served at GET /openapi.json, generated from
the contract's table so that it states exactly what the server checks."""

from __future__ import annotations

from typing import Any

from fuckbase import __version__
from fuckbase.contract import ENDPOINTS, GET_PATHS, Endpoint, ErrorCode

_ERROR = {
    "type": "object",
    "properties": {
        "status": {"const": "error"},
        "code": {"type": "string", "enum": [c.value for c in ErrorCode]},
        "message": {"type": "string"},
    },
    "required": ["status", "code", "message"],
}
_SECURITY: dict[str, list[dict[str, list[str]]]] = {
    "none": [],
    "admin": [{}, {"admin": []}],
    "database": [{}, {"database": []}],
    "admin or database": [{}, {"admin": []}, {"database": []}],
}
_AUTH_NOTE = {
    "none": "",
    "admin": " Needs admin credentials when an admin user is configured.",
    "database": " Needs the database's credentials when it has them.",
    "admin or database": " Needs admin credentials when an admin user is configured, else the credentials of"
                         " each protected database it replaces or removes.",
}


def _operation(e: Endpoint) -> dict[str, Any]:
    fields = e.request_fields()
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {f.name: {**f.kind.json_schema(), **({"description": f.description} if f.description else {})}
                       for f in fields},
    }
    required = [f.name for f in fields if f.required]
    if required:
        schema["required"] = required
    schema.update(e.body_rule)
    return {
        "summary": e.summary,
        "description": e.summary + "." + _AUTH_NOTE[e.auth] + (" Long: served apart from short requests." if e.long else ""),
        "security": _SECURITY[e.auth],
        "requestBody": {"required": bool(required or e.body_rule), "content": {"application/json": {"schema": schema}}},
        "responses": {
            "200": {"description": "success", "content": {"application/json": {"schema": e.response}}},
            "default": {"description": "the error envelope", "content": {"application/json": {"schema": _ERROR}}},
        },
    }


def spec() -> dict[str, Any]:
    paths: dict[str, Any] = {e.path: {"post": _operation(e)} for e in ENDPOINTS}
    for path, summary in GET_PATHS.items():
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
