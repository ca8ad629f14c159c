"""The HTTP layer: HTTP/1.1 on an asyncio (uvloop) event loop, parsed by httptools (llhttp).

Each worker process runs one loop. A request is executed only once it has arrived whole
(a body cut short is never applied), short requests run inline on the loop, and anything
that can take long (long operations, password checks, fsync waits) is awaited, so it never
holds up another connection. Responses on one connection keep the order of its requests.
Every error a client can receive from us is the JSON error envelope, including those about
the HTTP framing itself (bad request line, header block too large, body too slow).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, cast

import httptools
import orjson

from fuckbase.contract import ErrorCode

log = logging.getLogger("fuckbase.http")

MAX_HEAD_BYTES = 64 * 1024  # request line and headers together
MAX_URL_BYTES = 8 * 1024
IDLE_TIMEOUT = 75.0  # seconds an idle keep-alive connection stays open
MAX_QUEUED = 64  # pipelined requests waiting on one connection before we stop reading it
SWEEP_INTERVAL = 1.0

JSON_TYPE = b"application/json"
PROMETHEUS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
_STATUS = {s.value: f"{s.value} {s.phrase}".encode() for s in HTTPStatus}
_STATUS[507] = b"507 Insufficient Storage"
_WANTED_HEADERS = frozenset({b"authorization", b"x-admin-authorization", b"content-length", b"expect"})


def error_body(code: ErrorCode, message: str) -> bytes:
    return orjson.dumps({"status": "error", "code": code, "message": message})


@dataclass(slots=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]  # only the ones the server reads, by lower-case name
    body: bytes
    peer: str = ""  # the client's address


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    content_type: bytes = JSON_TYPE
    extra_headers: bytes = b""  # complete header lines, each ending in CRLF
    head_only: bool = False  # an answer to HEAD: the headers of `body`, without it

    def head(self, close: bool) -> bytes:
        start = _HEAD_STARTS.get((self.status, self.content_type))
        if start is None:
            start = _HEAD_STARTS[(self.status, self.content_type)] = b"HTTP/1.1 %s\r\ncontent-type: %s\r\ncontent-length: " % (
                _STATUS.get(self.status, b"%d Status" % self.status), self.content_type)
        return start + b"%d\r\n%s%s\r\n" % (len(self.body), self.extra_headers, b"connection: close\r\n" if close else b"")


_HEAD_STARTS: dict[tuple[int, bytes], bytes] = {}  # the status line and content type, per pair


def error_response(status: int, code: ErrorCode, message: str, extra_headers: bytes = b"") -> Response:
    return Response(status, error_body(code, message), JSON_TYPE, extra_headers)


def answer_of(task: asyncio.Future[Response]) -> Response:
    """What a finished task answers; an unexpected failure is a 500 (and a log line)."""
    try:
        return task.result()
    except Exception:
        log.exception("request failed")
        return error_response(500, ErrorCode.INTERNAL_ERROR, "internal error")


class Pending:
    """An answer that is not ready yet. `joinable`: it waits only for the group commit of its
    loop turn, so further writes of the same connection may join that commit meanwhile."""

    __slots__ = ("response", "joinable", "_callback")

    def __init__(self, joinable: bool = False) -> None:
        self.response: Response | None = None
        self.joinable = joinable
        self._callback: Callable[[], None] | None = None

    @classmethod
    def ready(cls, response: Response) -> Pending:
        p = cls(joinable=True)
        p.response = response
        return p

    @classmethod
    def of(cls, work: Awaitable[Response]) -> Pending:
        """The answer a coroutine or future will give."""
        p = cls()
        asyncio.ensure_future(work).add_done_callback(p._settle)
        return p

    def _settle(self, task: asyncio.Future[Response]) -> None:
        self.resolve(answer_of(task))

    def then(self, callback: Callable[[], None]) -> None:
        if self.response is not None:
            callback()
        else:
            self._callback = callback

    def resolve(self, response: Response) -> None:
        self.response = response
        self._notify()

    @staticmethod
    def resolve_all(answers: list[tuple[Pending, Response]]) -> None:
        """Resolves them all before any callback runs: a connection waiting for several of
        them finds them all ready at once."""
        for pending, response in answers:
            pending.response = response
        for pending, _ in answers:
            pending._notify()

    def _notify(self) -> None:
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()

    def wait(self) -> asyncio.Future[Response]:
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()

        def settle() -> None:
            if not future.done():
                future.set_result(cast(Response, self.response))

        self.then(settle)
        return future


Dispatch = Callable[[Request], "Response | Pending"]


class _Refuse(Exception):
    """Raised from a parser callback: answer with this error and close the connection."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


class HttpServer:
    """Connections of one process, and the sweep that times out slow and idle ones."""

    def __init__(self, dispatch: Dispatch, max_body_bytes: int, read_timeout: float,
                 joins: Callable[[Request], bool] = lambda r: False) -> None:
        self.dispatch = dispatch
        self.joins = joins  # whether a request would join the group commit of the loop turn
        self.max_body = max_body_bytes
        self.read_timeout = read_timeout  # seconds for a request to arrive whole once begun
        self.connections: set[HttpProtocol] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    def protocol(self) -> HttpProtocol:
        return HttpProtocol(self)

    def start_sweeping(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweeper = loop.call_later(SWEEP_INTERVAL, self._sweep, loop)

    def stop_sweeping(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now = time.monotonic()
        for conn in list(self.connections):
            conn.check_timeouts(now)
        self._sweeper = loop.call_later(SWEEP_INTERVAL, self._sweep, loop)

    def close_idle(self) -> None:
        for conn in list(self.connections):
            conn.close_if_idle()


class HttpProtocol(asyncio.Protocol):
    """One client connection: parses requests, runs them in order, writes their responses."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_size = 0
        self._head_size = 0
        self._queue: deque[tuple[Request | Response, bool]] = deque()
        self._out: list[bytes] = []  # answers written in this event, not sent yet
        self._outstanding: deque[tuple[Pending, bool]] = deque()  # answers not written yet, in order
        self._only_joinable = False  # every outstanding answer waits for the same group commit
        self._running = False
        self._paused = False
        self._closing = False
        self._close_when_done = False
        self._refused = False
        self._in_request = False
        self._peer = ""
        self._last_activity = self._request_began = time.monotonic()

    # ------------------------------------------------------------------ connection events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) else ""
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        self._closing = True
        self._queue.clear()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._last_activity = time.monotonic()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            refused = exc.__context__
            if isinstance(refused, _Refuse):
                self._refuse(refused.response)
            else:
                log.error("HTTP parser callback failed: %r", refused)
                self._refuse(error_response(500, ErrorCode.INTERNAL_ERROR, "internal error"))
        except httptools.HttpParserUpgrade:
            # we do not switch protocols: answer what came, then close
            self._close_when_done = True
            self._stop_reading()
            if not self._outstanding and not self._queue:
                self._close()
        except httptools.HttpParserError as exc:
            self._refuse(error_response(400, ErrorCode.INVALID_REQUEST, f"malformed HTTP request: {exc}"))

    # ------------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []
        self._body_size = 0
        self._head_size = 0
        self._in_request = True
        self._request_began = self._last_activity = time.monotonic()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if len(self._url) > MAX_URL_BYTES:
            raise _Refuse(error_response(414, ErrorCode.URI_TOO_LONG, f"the request URI exceeds {MAX_URL_BYTES} bytes"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_HEAD_BYTES:
            raise _Refuse(error_response(
                431, ErrorCode.HEADERS_TOO_LARGE, f"the request header block exceeds {MAX_HEAD_BYTES} bytes"))
        lname = name.lower()
        if lname in _WANTED_HEADERS:
            self._headers[lname.decode()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        length = self._headers.get("content-length")
        if length is not None and int(length) > self._server.max_body:
            raise _Refuse(self._too_large())
        if self._headers.get("expect", "").lower() == "100-continue" and self._transport is not None:
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._server.max_body:
            raise _Refuse(self._too_large())
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_request = False
        url = self._url
        q = url.find(b"?")
        path = (url if q < 0 else url[:q]).decode("latin-1")
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        method = self._parser.get_method().decode("latin-1")
        request = Request(method, path, self._headers, body, self._peer)
        keep_alive = self._parser.should_keep_alive()
        if not (self._queue or self._outstanding or self._running or self._closing):  # the common case
            result = self._server.dispatch(request)
            if isinstance(result, Response):
                self._write(result, keep_alive)
                self._send()
                return
            self._only_joinable = result.joinable
            self._outstanding.append((result, keep_alive))
            result.then(self._run_queue)
            return
        self._queue.append((request, keep_alive))
        self._run_queue()  # a write after writes joins their group commit now
        if len(self._queue) > MAX_QUEUED and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def _too_large(self) -> Response:
        return error_response(
            413, ErrorCode.PAYLOAD_TOO_LARGE, f"request body exceeds the limit of {self._server.max_body} bytes")

    # ------------------------------------------------------------------ running requests

    def _run_queue(self) -> None:
        """Runs queued requests in order and writes answers as they become ready, in order.
        While answers are outstanding, a request may start only if it joins the same group
        commit as all of them (a write after writes); anything else waits, so a read after a
        write of the same connection sees that write."""
        if self._running:
            return
        self._running = True
        try:
            self._advance()
        finally:
            self._running = False
            self._send()

    def _advance(self) -> None:
        server = self._server
        outstanding = self._outstanding
        while not self._closing:
            while outstanding and outstanding[0][0].response is not None:
                pending, keep_alive = outstanding.popleft()
                self._write(cast(Response, pending.response), keep_alive)
            if not self._queue or self._closing:
                break
            item, keep_alive = self._queue[0]
            if outstanding and not (self._only_joinable and isinstance(item, Request) and server.joins(item)):
                return
            self._queue.popleft()
            if isinstance(item, Response):  # a refusal of the framing: the last thing we send
                self._write(item, keep_alive=False)
                return
            result = server.dispatch(item)
            if isinstance(result, Response):
                if not outstanding:
                    self._write(result, keep_alive)
                    continue
                result = Pending.ready(result)
            self._only_joinable = (self._only_joinable or not outstanding) and result.joinable
            outstanding.append((result, keep_alive))
            if result.response is None:
                result.then(self._run_queue)
        if self._closing or outstanding:
            return
        if self._close_when_done:
            self._close()
        elif self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()

    def _write(self, response: Response, keep_alive: bool) -> None:
        """Adds the answer to what goes out at the end of this event (`_send`): pipelined
        answers that became ready together leave in one write, not one each."""
        if self._transport is None or self._closing:
            return
        self._out.append(response.head(not keep_alive) + (b"" if response.head_only else response.body))
        if not keep_alive:
            self._close()

    def _send(self) -> None:
        out = self._out
        if not out:
            return
        if self._transport is not None and not self._closing:
            self._transport.write(out[0] if len(out) == 1 else b"".join(out))
            self._last_activity = time.monotonic()
        out.clear()

    def _refuse(self, response: Response) -> None:
        """A framing error: the requests before it are answered first, then this, then we close."""
        self._stop_reading()
        self._queue.append((response, False))
        if not self._outstanding:
            self._run_queue()

    def _stop_reading(self) -> None:
        self._refused = True
        if not self._paused and self._transport is not None and not self._closing:
            self._paused = True
            self._transport.pause_reading()

    def _close(self) -> None:
        self._send()
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    # ------------------------------------------------------------------ timeouts

    def check_timeouts(self, now: float) -> None:
        if self._closing or self._outstanding or self._queue:
            return
        if self._in_request:
            if now - self._request_began > self._server.read_timeout:
                self._stop_reading()
                self._write(error_response(
                    408, ErrorCode.REQUEST_TIMEOUT, f"the request did not arrive whole within {self._server.read_timeout:g} s"), False)
        elif now - self._last_activity > IDLE_TIMEOUT:
            self._close()

    def close_if_idle(self) -> None:
        if not (self._outstanding or self._queue or self._in_request):
            self._close()


def run_server(server: HttpServer, sock: Any, loop: asyncio.AbstractEventLoop) -> asyncio.AbstractServer:
    """Starts serving on an already bound, listening socket."""
    srv = loop.run_until_complete(loop.create_server(server.protocol, sock=sock, backlog=2048))
    server.start_sweeping(loop)
    return srv
