"""From a request to a response in a worker: routing, JSON bodies, errors, metrics, the access log.

Short operations run inline. Long ones (ROUTES[...].long) go to the job process and are
awaited; a credential seen for the first time is verified on a thread and the request run
again; with durability "fsync" a write is answered once a flush covers its commit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from fuckbase.accesslog import AccessLog
from fuckbase.api import ROUTES, Api, error_for
from fuckbase.auth import NeedsVerification
from fuckbase.errors import ApiError, invalid
from fuckbase.http import JSON_TYPE, Request, Response, error_response
from fuckbase.metrics import Metrics
from fuckbase.storage import StorageError

log = logging.getLogger("fuckbase.http")

GetRoute = Callable[[], Response]
Forward = Callable[[str, bytes, dict[str, str]], Awaitable[Response]]
_ALLOW_POST = b"allow: POST\r\n"
_ALLOW_GET = b"allow: GET, HEAD\r\n"


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw or raw.isspace():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise invalid("request body must be a JSON object")
    return body


def run_handler(handler: Callable[[dict[str, Any], Any], bytes], body: dict[str, Any], headers: Any) -> Response:
    """Runs a synchronous handler; every failure becomes the contract's error envelope."""
    try:
        return Response(200, handler(body, headers))
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message)
    except StorageError as exc:
        err = error_for(exc)
        return error_response(err.status, err.code, err.message)


class App:
    """The dispatch function of a worker's HttpServer."""

    def __init__(
        self,
        api: Api,
        metrics: Metrics,
        access_log: AccessLog | None,
        get_routes: dict[str, GetRoute],
        forward: Forward,
        flush: Callable[[], Awaitable[None]] | None,
    ) -> None:
        self.api = api
        self.metrics = metrics
        self.access_log = access_log
        self.get_routes = get_routes
        self.forward = forward
        self.flush = flush  # durability "fsync": awaits a flush covering the last commit

    def __call__(self, req: Request) -> Response | Awaitable[Response]:
        started = time.perf_counter()
        route = ROUTES.get(req.path)
        if route is None:
            response = self._non_api(req)
            label = req.path if req.path in self.get_routes else "other"
        elif req.method != "POST":
            response = error_response(405, "METHOD_NOT_ALLOWED", "Only POST method is allowed", _ALLOW_POST)
            label = req.path
        else:
            label = req.path
            try:
                body = parse_body(req.body)
            except ApiError as exc:
                response = error_response(exc.status, exc.code, exc.message)
            else:
                if route.long:
                    raw = req.body if body else b"{}"
                    return self._finish_later(self.forward(req.path, raw, req.headers), req, started)
                try:
                    response = run_handler(self.api.handlers[req.path], body, req.headers)
                except NeedsVerification as pending:
                    return self._finish_later(self._verify_then_run(pending, req, body), req, started)
                if route.writes and self.flush is not None and response.status == 200:
                    return self._finish_later(self._after_flush(response), req, started)
        self._record(req, label, response.status, started)
        return response

    def _non_api(self, req: Request) -> Response:
        get = self.get_routes.get(req.path)
        if get is None:
            return error_response(404, "NOT_FOUND", f"no endpoint {req.path}")
        if req.method not in ("GET", "HEAD"):
            return error_response(405, "METHOD_NOT_ALLOWED", f"{req.path} answers GET", _ALLOW_GET)
        response = get()
        if req.method == "HEAD":
            return Response(response.status, response.body, response.content_type, head_only=True)
        return response

    async def _finish_later(self, work: Awaitable[Response], req: Request, started: float) -> Response:
        try:
            response = await work
        except Exception:
            log.exception("unexpected error on %s", req.path)
            response = error_response(500, "INTERNAL_ERROR", "internal error")
        self._record(req, req.path, response.status, started)
        return response

    async def _verify_then_run(self, pending: NeedsVerification, req: Request, body: dict[str, Any]) -> Response:
        for _ in range(3):  # a restore may swap the credentials again meanwhile
            if not await asyncio.to_thread(pending.verify):
                return error_response(401, "AUTH_FAILED", "Authentication failed")
            try:
                response = run_handler(self.api.handlers[req.path], body, req.headers)
            except NeedsVerification as again:
                pending = again
                continue
            if ROUTES[req.path].writes and self.flush is not None and response.status == 200:
                await self.flush()
            return response
        return error_response(401, "AUTH_FAILED", "Authentication failed")

    async def _after_flush(self, response: Response) -> Response:
        assert self.flush is not None
        try:
            await self.flush()
        except StorageError as exc:
            err = error_for(exc)
            return error_response(err.status, err.code, f"the write is committed but not yet on disk: {err.message}")
        return response

    def _record(self, req: Request, label: str, status: int, started: float) -> None:
        elapsed = time.perf_counter() - started
        self.metrics.observe(label, status, elapsed)
        if self.access_log is not None:
            self.access_log.record(req.method, req.path, status, elapsed)


def json_response(body: bytes) -> Response:
    return Response(200, body, JSON_TYPE)
