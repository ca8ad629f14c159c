"""The HTTP layer: an RSGI application (served by granian) that frames requests for the Api.

It enforces the transport rules of the contract — POST only, JSON object bodies, a body size
limit — renders ApiError as the error envelope, and records metrics and the access log with
a few hundred nanoseconds per request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import orjson

from fuckbase.accesslog import AccessLog
from fuckbase.api import Api
from fuckbase.errors import ApiError, invalid
from fuckbase.metrics import Metrics

log = logging.getLogger("fuckbase.http")

JSON = [("content-type", "application/json")]
TEXT = [("content-type", "text/plain; version=0.0.4; charset=utf-8")]


def error_body(code: str, message: str) -> bytes:
    return orjson.dumps({"status": "error", "code": code, "message": message})


class HttpApp:
    """RSGI entry point. `get_routes` answer GET; every API route answers POST only."""

    def __init__(
        self,
        api: Api,
        metrics: Metrics,
        access_log: AccessLog | None,
        max_body_bytes: int,
        get_routes: dict[str, Callable[[], tuple[int, list[tuple[str, str]], bytes]]],
    ) -> None:
        self.routes = api.routes
        self.metrics = metrics
        self.access_log = access_log
        self.max_body = max_body_bytes
        self.get_routes = get_routes

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        started = time.perf_counter()
        path = scope.path
        method = scope.method
        handler = self.routes.get(path)
        if handler is None:
            status, headers, out = self._non_api(path, method)
            label = path if path in self.get_routes else "other"
        elif method != "POST":
            status, headers, out = 405, JSON, error_body(
                "METHOD_NOT_ALLOWED", "Only POST method is allowed"
            )
            label = path
        else:
            label = path
            headers = JSON
            try:
                body = await self._read_body(scope, proto)
                out = await handler(body, scope.headers)
                status = 200
            except ApiError as exc:
                status, out = exc.status, error_body(exc.code, exc.message)
            except Exception:
                log.exception("unexpected error on %s", path)
                status, out = 500, error_body("INTERNAL_ERROR", "internal error")
        proto.response_bytes(status, headers, out)
        elapsed = time.perf_counter() - started
        self.metrics.observe(label, status, elapsed)
        if self.access_log is not None:
            self.access_log.record(method, path, status, elapsed)

    def _non_api(self, path: str, method: str) -> tuple[int, list[tuple[str, str]], bytes]:
        get = self.get_routes.get(path)
        if get is None:
            return 404, JSON, error_body("NOT_FOUND", f"no endpoint {path}")
        if method not in ("GET", "HEAD"):
            return 405, JSON, error_body("METHOD_NOT_ALLOWED", f"{path} answers GET")
        return get()

    async def _read_body(self, scope: Any, proto: Any) -> dict[str, Any]:
        length = scope.headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                raise invalid("Content-Length is not a number") from None
            if declared > self.max_body:
                raise self._too_large()
            raw = await proto()
        else:
            raw = await self._read_chunked(proto)
        if len(raw) > self.max_body:
            raise self._too_large()
        if not raw or raw.isspace():
            return {}
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise invalid(f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise invalid("request body must be a JSON object")
        return body

    async def _read_chunked(self, proto: Any) -> bytes:
        parts: list[bytes] = []
        size = 0
        async for chunk in proto:
            size += len(chunk)
            if size > self.max_body:
                raise self._too_large()
            parts.append(chunk)
        return b"".join(parts)

    def _too_large(self) -> ApiError:
        return ApiError(
            413, "PAYLOAD_TOO_LARGE", f"request body exceeds the limit of {self.max_body} bytes"
        )
