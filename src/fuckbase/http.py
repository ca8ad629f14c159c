"""The HTTP layer: a WSGI application (served by granian) that frames requests for the Api.

It enforces the transport rules of the contract — POST only, JSON object bodies, a body size
limit — renders ApiError as the error envelope, and records metrics and the access log with
a few hundred nanoseconds per request. WSGI because granian calls it straight from its
request threads: measured here, that costs half the CPU per request of its asyncio
interfaces, and the handlers are short synchronous calls into the engine anyway.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

import orjson

from fuckbase.accesslog import AccessLog
from fuckbase.api import Api
from fuckbase.errors import ApiError, invalid
from fuckbase.hotpath import HOT
from fuckbase.metrics import Metrics

log = logging.getLogger("fuckbase.http")

JSON = [("content-type", "application/json")]
TEXT = [("content-type", "text/plain; version=0.0.4; charset=utf-8")]
STATUS_LINES = {s.value: f"{s.value} {s.phrase}" for s in HTTPStatus}
READ_CHUNK = 1 << 16

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def error_body(code: str, message: str) -> bytes:
    return orjson.dumps({"status": "error", "code": code, "message": message})


class RequestHeaders:
    """Header lookup by lower-case name over a WSGI environ, as the Api expects."""

    __slots__ = ("_environ",)

    def __init__(self, environ: dict[str, Any]) -> None:
        self._environ = environ

    def get(self, key: str, default: Any = None) -> Any:
        return self._environ.get("HTTP_" + key.upper().replace("-", "_"), default)


class HttpApp:
    """WSGI entry point. `get_routes` answer GET; every API route answers POST only."""

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

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        HOT.enter()
        try:
            return self._serve(environ, start_response)
        finally:
            HOT.leave()

    def _serve(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        started = time.perf_counter()
        path = environ["PATH_INFO"]
        method = environ["REQUEST_METHOD"]
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
                out = handler(self._read_body(environ), RequestHeaders(environ))
                status = 200
            except ApiError as exc:
                status, out = exc.status, error_body(exc.code, exc.message)
            except Exception:
                log.exception("unexpected error on %s", path)
                status, out = 500, error_body("INTERNAL_ERROR", "internal error")
        start_response(STATUS_LINES[status], headers)
        elapsed = time.perf_counter() - started
        self.metrics.observe(label, status, elapsed)
        if self.access_log is not None:
            self.access_log.record(method, path, status, elapsed)
        return [out]

    def _non_api(self, path: str, method: str) -> tuple[int, list[tuple[str, str]], bytes]:
        get = self.get_routes.get(path)
        if get is None:
            return 404, JSON, error_body("NOT_FOUND", f"no endpoint {path}")
        if method not in ("GET", "HEAD"):
            return 405, JSON, error_body("METHOD_NOT_ALLOWED", f"{path} answers GET")
        return get()

    def _read_body(self, environ: dict[str, Any]) -> dict[str, Any]:
        length = environ.get("CONTENT_LENGTH")
        if length:
            try:
                declared = int(length)
            except ValueError:
                raise invalid("Content-Length is not a number") from None
            if declared > self.max_body:
                raise self._too_large()
            raw = environ["wsgi.input"].read(declared)
        else:
            raw = self._read_unsized(environ["wsgi.input"])
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

    def _read_unsized(self, stream: Any) -> bytes:
        """A chunked body: read until its end, refusing it as soon as it passes the limit."""
        parts: list[bytes] = []
        size = 0
        while chunk := stream.read(READ_CHUNK):
            size += len(chunk)
            if size > self.max_body:
                raise self._too_large()
            parts.append(chunk)
        return b"".join(parts)

    def _too_large(self) -> ApiError:
        return ApiError(
            413, "PAYLOAD_TOO_LARGE", f"request body exceeds the limit of {self.max_body} bytes"
        )
